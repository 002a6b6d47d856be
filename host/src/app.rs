//! Wires the subsystems together: the runtime, one lifecycle task per module, and
//! the tree of cancellation tokens that stops them. Owns the root token's children
//! and every task it spawns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::registry::lifecycle::{self, Control};
use crate::registry::{self, Claims, ModuleState, ModuleStates, Settings};
use crate::runtime::{ModuleConfig, Runtime};

/// Everything `run` needs, already parsed and defaulted (see `config`).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory holding the `*.wasm` modules.
    pub modules_dir: PathBuf,
    /// Registry settings (kubelet directory, intervals, limits, domain).
    pub settings: Settings,
}

/// A running host: one lifecycle task per module.
pub struct Host {
    states: watch::Receiver<ModuleStates>,
    controls: HashMap<String, mpsc::Sender<Control>>,
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Host {
    /// Loads every module in the modules directory and starts serving them; each
    /// module registers its resources as soon as its own first scan returns.
    /// Returns once the tasks are started, not when they are ready.
    ///
    /// # Errors
    /// The runtime cannot start, or a directory is missing or unreadable.
    pub fn start(config: HostConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let settings = Arc::new(config.settings);
        anyhow::ensure!(
            settings.kubelet_dir.is_dir(),
            "kubelet directory {} does not exist (is kubelet running? is the directory mounted?)",
            settings.kubelet_dir.display()
        );
        let specs = registry::discover(&config.modules_dir).with_context(|| {
            format!(
                "cannot read modules directory {}",
                config.modules_dir.display()
            )
        })?;
        if specs.is_empty() {
            tracing::warn!(dir = %config.modules_dir.display(), "no *.wasm modules found");
        }
        let runtime = Arc::new(Runtime::new()?);
        let token = shutdown.child_token();
        let tasks = TaskTracker::new();
        let initial: ModuleStates = specs
            .iter()
            .map(|s| (s.name.clone(), ModuleState::Loading))
            .collect();
        let (states_tx, states) = watch::channel(initial);
        let mut controls = HashMap::new();
        let claims = Claims::default();
        for spec in specs {
            let (tx, rx) = mpsc::channel(8);
            controls.insert(spec.name.clone(), tx);
            tasks.spawn(lifecycle::run(
                runtime.clone(),
                settings.clone(),
                spec,
                claims.clone(),
                states_tx.clone(),
                rx,
                token.child_token(),
            ));
        }
        tasks.close();
        Ok(Self {
            states,
            controls,
            token,
            tasks,
        })
    }

    /// The state of every module, updated as they change.
    pub fn states(&self) -> watch::Receiver<ModuleStates> {
        self.states.clone()
    }

    /// Waits until no module is loading any more (each is serving or failed), at
    /// most `timeout`, and returns the states then.
    ///
    /// # Errors
    /// The timeout passed first.
    pub async fn settled(&self, timeout: Duration) -> anyhow::Result<ModuleStates> {
        let mut rx = self.states.clone();
        let states = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.values().all(|m| *m != ModuleState::Loading)),
        )
        .await
        .context("modules still loading")??;
        Ok(states.clone())
    }

    /// Gives module `name` a new configuration for its later calls; with
    /// `rescan` it re-scans at once, otherwise the next health check or scheduled
    /// scan sees it. Returns once the module uses it (and has re-scanned), or
    /// false when there is no such running module.
    pub async fn set_module_config(&self, name: &str, config: ModuleConfig, rescan: bool) -> bool {
        let Some(tx) = self.controls.get(name) else {
            return false;
        };
        let (applied, done) = oneshot::channel();
        tx.send(Control::SetConfig {
            config,
            rescan,
            applied,
        })
        .await
        .is_ok()
            && done.await.is_ok()
    }

    /// Stops every module: streams end, servers stop, sockets are removed.
    pub async fn stop(self) {
        self.token.cancel();
        self.tasks.wait().await;
    }
}

/// Runs the host until `shutdown` is cancelled.
///
/// # Errors
/// As [`Host::start`].
pub async fn run(config: HostConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let host = Host::start(config, &shutdown)?;
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    host.stop().await;
    Ok(())
}
