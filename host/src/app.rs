//! Wires the subsystems together: the runtime, the device-plugin frontend on the
//! watched kubelet directory, and the registry's supervisor following the
//! modules directory. Owns the tree of cancellation tokens below the caller's
//! and every task it spawns; answers the probes; sweeps the CDI specs an
//! earlier run left for resources this one does not serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cdi::CdiDir;
use crate::frontend::{Frontend, Frontends, ServeAs};
use crate::gauge::Gauge;
use crate::kubelet::dataplane::DataPlane;
use crate::kubelet::deviceplugin::{PluginStatus, Plugins, Registrations};
use crate::kubelet::dir::KubeletDir;
use crate::metrics::{self, Metrics, Probes};
use crate::registry;
use crate::registry::supervisor::Supervisor;
use crate::registry::{
    Claims, Context, ModuleState, ModuleStates, ModuleVersions, Refusals, Settings,
};
use crate::runtime::{Runtime, RuntimeStats};

/// How long a module file that is being written without being closed must stay
/// unchanged before it is read.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// Everything `run` needs, already parsed and defaulted (see `config`).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory holding the `*.wasm` modules and their manifests.
    pub modules_dir: PathBuf,
    /// Where compiled modules are cached; `None` compiles every module at load.
    pub cache_dir: Option<PathBuf>,
    /// See [`DEFAULT_SETTLE`].
    pub settle: Duration,
    /// Registry settings (kubelet directory, intervals, limits, domain).
    pub settings: Settings,
    /// What resources served through DRA need.
    pub dra: DraConfig,
}

/// What resources served through DRA need (the `run` flags; see `config`).
/// Nothing of DRA starts until a resource asks for it.
#[derive(Debug, Clone)]
pub struct DraConfig {
    /// This node's name (`--node-name`); DRA resources are refused without it.
    pub node_name: Option<String>,
    /// The kubeconfig (`--kubeconfig`); `None`: in-cluster, then the usual places.
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's plugin-watcher directory.
    pub registry_dir: PathBuf,
    /// kubelet's plugins directory.
    pub plugins_dir: PathBuf,
    /// Where prepared claims are checkpointed.
    pub state_dir: PathBuf,
    /// The host pod's UID, for rolling-update socket names.
    pub pod_uid: Option<String>,
}

/// kubelet's plugin-watcher directory, by default.
pub const DEFAULT_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// kubelet's plugins directory, by default.
pub const DEFAULT_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
/// The host's state directory, by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wasm-device-plugin";

impl Default for DraConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            kubeconfig: None,
            registry_dir: DEFAULT_REGISTRY_DIR.into(),
            plugins_dir: DEFAULT_PLUGINS_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            pod_uid: None,
        }
    }
}

/// The host's frontends: the device-plugin one, always running, and the DRA
/// one, created when a resource first asks for it.
struct HostFrontends {
    device_plugin: Arc<Plugins>,
    dra: DraConfig,
    cdi: Arc<CdiDir>,
    host_stopping: CancellationToken,
    #[cfg(feature = "dra")]
    dra_frontend: std::sync::OnceLock<Arc<crate::kubelet::dra::Dra>>,
}

impl Frontends for HostFrontends {
    fn frontend(&self, serve_as: &ServeAs) -> Result<Arc<dyn Frontend>, String> {
        match serve_as {
            ServeAs::DevicePlugin => Ok(self.device_plugin.clone()),
            ServeAs::Dra { .. } => self.dra(),
        }
    }
}

impl HostFrontends {
    #[cfg(feature = "dra")]
    fn dra(&self) -> Result<Arc<dyn Frontend>, String> {
        let node_name = self.dra.node_name.clone().ok_or_else(|| {
            "serving through DRA needs this node's name: pass --node-name or set NODE_NAME (deploy/ sets it from spec.nodeName)".to_string()
        })?;
        let dra = self.dra_frontend.get_or_init(|| {
            tracing::info!(node = %node_name, "starting the DRA frontend");
            Arc::new(crate::kubelet::dra::Dra::new(
                crate::kubelet::dra::DraSettings {
                    node_name,
                    kubeconfig: self.dra.kubeconfig.clone(),
                    registry_dir: self.dra.registry_dir.clone(),
                    plugins_dir: self.dra.plugins_dir.clone(),
                    state_dir: self.dra.state_dir.clone(),
                    pod_uid: self.dra.pod_uid.clone(),
                },
                self.cdi.clone(),
                self.device_plugin.data_plane.clone(),
                self.device_plugin.registrations.clone(),
                self.host_stopping.clone(),
            ))
        });
        Ok(dra.clone())
    }

    #[cfg(not(feature = "dra"))]
    fn dra(&self) -> Result<Arc<dyn Frontend>, String> {
        let _ = (&self.dra, &self.cdi, &self.host_stopping);
        Err("this host was built without DRA (the `dra` cargo feature); serve the resource through the device-plugin API".into())
    }
}

/// A running host: one lifecycle task per module file.
pub struct Host {
    ctx: Arc<Context>,
    states: watch::Receiver<ModuleStates>,
    /// `None` until the start-up sweep of CDI specs ran; then what it removed.
    cdi_swept: watch::Receiver<Option<Vec<PathBuf>>>,
    /// The device-plugin frontend every resource is served through.
    plugins: Arc<Plugins>,
    supervisor: AbortHandle,
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Host {
    /// Starts serving every module in the modules directory and following the
    /// directory; each module registers its resources as soon as its own first
    /// scan returns. Returns once the tasks are started, not when they are ready.
    ///
    /// # Errors
    /// The runtime cannot start, or a directory is missing or unreadable.
    pub fn start(config: HostConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let settings = Arc::new(config.settings);
        anyhow::ensure!(
            settings.kubelet_dir.is_dir(),
            "kubelet directory {} does not exist (is the kubelet's device-plugins directory mounted?)",
            settings.kubelet_dir.display()
        );
        let token = shutdown.child_token();
        let (initial, events) =
            registry::watch::watch(&config.modules_dir, config.settle, token.child_token())
                .with_context(|| {
                    format!(
                        "cannot read modules directory {}",
                        config.modules_dir.display()
                    )
                })?;
        if initial.is_empty() {
            tracing::warn!(dir = %config.modules_dir.display(), "no *.wasm modules yet; watching the directory for some");
        }
        let metrics = Arc::new(Metrics::new());
        let runtime = Arc::new(Runtime::new(config.cache_dir.as_deref(), metrics.clone())?);
        let (states_tx, states) = watch::channel(ModuleStates::new());
        let plugins = Arc::new(Plugins {
            dir: KubeletDir::watch(&settings.kubelet_dir, metrics),
            streams: Gauge::default(),
            registrations: Registrations::default(),
            data_plane: Arc::new(
                DataPlane::start().context("cannot start the data plane's thread")?,
            ),
        });
        let cdi = Arc::new(CdiDir::new(&settings.cdi_dir));
        let ctx = Arc::new(Context {
            runtime,
            settings,
            claims: Claims::default(),
            frontends: Arc::new(HostFrontends {
                device_plugin: plugins.clone(),
                dra: config.dra,
                cdi: cdi.clone(),
                host_stopping: token.clone(),
                #[cfg(feature = "dra")]
                dra_frontend: std::sync::OnceLock::new(),
            }),
            states: states_tx,
            refusals: watch::channel(Refusals::new()).0,
            versions: watch::channel(ModuleVersions::new()).0,
            cdi: cdi.clone(),
            host_stopping: token.clone(),
        });
        let mut supervisor = Supervisor::new(ctx.clone(), token.clone());
        for event in initial {
            supervisor.handle_now(event);
        }
        let tasks = TaskTracker::new();
        // After the modules found at start have loaded (each has written the
        // specs of what it serves by then), so specs of resources served
        // before a restart stay in place meanwhile.
        let (swept_tx, cdi_swept) = watch::channel(None);
        tasks.spawn(sweep_cdi_specs(
            cdi,
            states.clone(),
            swept_tx,
            token.clone(),
        ));
        let supervisor = tasks.spawn(supervisor.run(events)).abort_handle();
        tasks.spawn(log_readiness(
            states.clone(),
            plugins.registrations.watch(),
            token.clone(),
        ));
        tasks.close();
        Ok(Self {
            ctx,
            states,
            cdi_swept,
            plugins,
            supervisor,
            token,
            tasks,
        })
    }

    /// `None` until the CDI specs of an earlier run that this one does not
    /// serve have been removed (once the modules found at start have loaded);
    /// then the files removed.
    pub fn cdi_swept(&self) -> watch::Receiver<Option<Vec<PathBuf>>> {
        self.cdi_swept.clone()
    }

    /// The state of every module, updated as they change.
    pub fn states(&self) -> watch::Receiver<ModuleStates> {
        self.states.clone()
    }

    /// What the host refused of each module so far (the newest 64, last last):
    /// module files, naming the file and why (a refused file leaves its module as
    /// it was), and scans or health checks that started failing, naming the call
    /// and why (the module keeps its last good state).
    pub fn refusals(&self) -> watch::Receiver<Refusals> {
        self.ctx.refusals.subscribe()
    }

    /// The files each loaded module runs from, updated as the host applies new
    /// ones (a test that edits a manifest waits here for it to be in use).
    pub fn versions(&self) -> watch::Receiver<ModuleVersions> {
        self.ctx.versions.subscribe()
    }

    /// What loading modules has cost: compilations, cache hits, refusals.
    pub fn stats(&self) -> RuntimeStats {
        self.ctx.runtime.stats()
    }

    /// Guest calls running now, across every module (a call abandoned because
    /// kubelet hung up or the module was removed is counted out at once).
    pub fn calls_in_flight(&self) -> watch::Receiver<u64> {
        self.ctx.runtime.calls().watch()
    }

    /// ListAndWatch streams open now, across every resource.
    pub fn open_streams(&self) -> watch::Receiver<u64> {
        self.plugins.streams.watch()
    }

    /// The host's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics().clone()
    }

    /// What `/healthz` and `/readyz` ask.
    pub fn probes(&self) -> Arc<dyn Probes> {
        Arc::new(HostProbes {
            states: self.states.clone(),
            registrations: self.plugins.registrations.watch(),
            supervisor: self.supervisor.clone(),
            streams: self.plugins.streams.clone(),
            calls: self.ctx.runtime.calls().clone(),
        })
    }

    /// `Ok` once every loaded module's resources are registered with kubelet
    /// (what `/readyz` answers); what is missing otherwise.
    ///
    /// # Errors
    /// What the host still waits for.
    pub fn ready(&self) -> Result<(), String> {
        readiness(
            &self.states.borrow(),
            &self.plugins.registrations.watch().borrow(),
        )
    }

    /// Waits until [`Host::ready`] holds or stops holding (`want`), at most
    /// `timeout`.
    ///
    /// # Errors
    /// The timeout passed first; says what was missing then.
    pub async fn wait_ready(&self, want: bool, timeout: Duration) -> anyhow::Result<()> {
        let mut states = self.states.clone();
        let mut registrations = self.plugins.registrations.watch();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let now = readiness(
                    &states.borrow_and_update(),
                    &registrations.borrow_and_update(),
                );
                if now.is_ok() == want {
                    return;
                }
                tokio::select! {
                    _ = states.changed() => {}
                    _ = registrations.changed() => {}
                }
            }
        })
        .await;
        waited.map_err(|_| {
            anyhow::anyhow!(
                "readiness is not {want} after {timeout:?}: {:?}",
                self.ready()
            )
        })
    }

    /// Waits until no module is settling or loading any more (each is serving or
    /// failed), at most `timeout`, and returns the states then.
    ///
    /// # Errors
    /// The timeout passed first.
    pub async fn settled(&self, timeout: Duration) -> anyhow::Result<ModuleStates> {
        let mut rx = self.states.clone();
        let states = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| {
                s.values()
                    .all(|m| !matches!(m, ModuleState::Loading | ModuleState::Settling))
            }),
        )
        .await
        .context("modules still loading")??;
        Ok(states.clone())
    }

    /// Stops every module: streams end, servers stop, sockets are removed.
    pub async fn stop(self) {
        self.token.cancel();
        self.tasks.wait().await;
    }
}

/// Once no module found at start is settling or loading, removes the CDI
/// specs an earlier run wrote for resources this run does not serve
/// ([`CdiDir::sweep`]), each logged. A missing directory is only worth a
/// debug line: most hosts serve nothing with CDI.
async fn sweep_cdi_specs(
    cdi: Arc<CdiDir>,
    mut states: watch::Receiver<ModuleStates>,
    swept: watch::Sender<Option<Vec<PathBuf>>>,
    token: CancellationToken,
) {
    let settled = states.wait_for(|s| {
        s.values()
            .all(|m| !matches!(m, ModuleState::Loading | ModuleState::Settling))
    });
    let settled = tokio::select! {
        () = token.cancelled() => return,
        settled = settled => settled.is_ok(),
    };
    if !settled {
        return;
    }
    let removed = match cdi.sweep() {
        Ok(removed) => {
            for path in &removed {
                tracing::info!(path = %path.display(), "removed a CDI spec of an earlier run: its resource is not served now");
            }
            removed
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(dir = %cdi.dir().display(), "no CDI spec directory; nothing to sweep");
            Vec::new()
        }
        Err(err) => {
            tracing::warn!(dir = %cdi.dir().display(), cause = %err, "cannot list the CDI spec directory to remove stale specs");
            Vec::new()
        }
    };
    swept.send_replace(Some(removed));
}

/// Ready when no module is settling or loading, and every resource of every
/// serving module is registered with kubelet. Failed modules do not hold
/// readiness back (they are logged, counted and retried when their files
/// change); with no modules at all the host is ready.
fn readiness(
    states: &ModuleStates,
    registrations: &std::collections::BTreeMap<crate::domain::ResourceName, PluginStatus>,
) -> Result<(), String> {
    let mut missing = Vec::new();
    for (name, state) in states {
        match state {
            ModuleState::Settling => {
                missing.push(format!("module {name}: file still being written"))
            }
            ModuleState::Loading => missing.push(format!("module {name}: loading")),
            ModuleState::Serving(resources) => {
                for resource in resources {
                    let registered = registrations
                        .iter()
                        .find(|(r, _)| r.as_str() == resource)
                        .is_some_and(|(_, s)| matches!(s, PluginStatus::Registered(_)));
                    if !registered {
                        missing.push(format!(
                            "resource {resource} (module {name}): not registered with kubelet"
                        ));
                    }
                }
            }
            ModuleState::Failed(_) | ModuleState::Stopped => {}
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not ready: {}", missing.join("; ")))
    }
}

/// Logs each change of readiness: when the host becomes ready, and when it
/// stops being ready, with what is missing.
async fn log_readiness(
    mut states: watch::Receiver<ModuleStates>,
    mut registrations: watch::Receiver<
        std::collections::BTreeMap<crate::domain::ResourceName, PluginStatus>,
    >,
    token: CancellationToken,
) {
    let mut was_ready = None;
    loop {
        let now = readiness(
            &states.borrow_and_update(),
            &registrations.borrow_and_update(),
        );
        match (&now, was_ready) {
            (Ok(()), Some(true)) | (Err(_), Some(false) | None) => {}
            (Ok(()), _) => {
                tracing::info!("ready: every loaded module's resources are registered with kubelet")
            }
            (Err(why), Some(true)) => tracing::info!(%why, "no longer ready"),
        }
        was_ready = Some(now.is_ok());
        let changed = tokio::select! {
            () = token.cancelled() => break,
            changed = states.changed() => changed,
            changed = registrations.changed() => changed,
        };
        if changed.is_err() {
            // The host is gone.
            break;
        }
    }
}

/// The probes of a running host.
struct HostProbes {
    states: watch::Receiver<ModuleStates>,
    registrations:
        watch::Receiver<std::collections::BTreeMap<crate::domain::ResourceName, PluginStatus>>,
    supervisor: AbortHandle,
    streams: Gauge,
    calls: Gauge,
}

impl Probes for HostProbes {
    fn live(&self) -> Result<(), String> {
        // The supervisor follows the modules directory and owns every module's
        // task; it ends only on shutdown. Without it the host serves stale
        // modules forever: restart it.
        if self.supervisor.is_finished() {
            return Err("the module supervisor has stopped".into());
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        readiness(&self.states.borrow(), &self.registrations.borrow())
    }

    fn refresh(&self, metrics: &Metrics) {
        metrics.set_live(self.streams.get(), self.calls.get());
    }
}

/// Runs the host until `shutdown` is cancelled, with its metrics and probes
/// served over HTTP on `metrics_addr` when given.
///
/// # Errors
/// As [`Host::start`]; or `metrics_addr` cannot be listened on.
pub async fn run(
    config: HostConfig,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Bound first: a host that cannot be probed would be restarted by kubelet
    // anyway, so it fails at once and says why.
    let listener = match metrics_addr {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for metrics and probes (--metrics-addr; `off` turns them off)")
        })?),
        None => None,
    };
    // Before any module binds, so only an earlier run's dead sockets are there.
    crate::kubelet::socket::remove_stale_plugin_sockets(&config.settings.kubelet_dir).await;
    let host = Host::start(config, &shutdown)?;
    let endpoints = listener.map(|listener| {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        let (metrics, probes) = (host.metrics(), host.probes());
        let token = shutdown.child_token();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(listener, metrics, probes, token).await {
                tracing::error!(cause = %err, "metrics and probes server failed");
            }
        })
    });
    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping every module and removing its sockets");
    host.stop().await;
    if let Some(endpoints) = endpoints {
        let _ = endpoints.await;
    }
    tracing::info!("stopped");
    Ok(())
}
