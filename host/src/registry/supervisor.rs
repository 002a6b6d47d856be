//! The module supervisor: starts a task per module file, feeds it the module's
//! newer files, and stops it when its file is removed, as the modules directory
//! changes. Owns every module task below the token it is given.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::registry::watch::{DirEvent, ModuleFiles};
use crate::registry::{Context, ModuleState, module};

/// Starts, feeds and stops lifecycle tasks as the modules directory changes.
pub struct Supervisor {
    ctx: Arc<Context>,
    running: HashMap<String, Running>,
    token: CancellationToken,
}

/// A module's task, as the supervisor holds it.
struct Running {
    files: watch::Sender<ModuleFiles>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Supervisor {
    /// A supervisor of no modules yet, whose module tasks stop with `token`.
    pub fn new(ctx: Arc<Context>, token: CancellationToken) -> Self {
        Self {
            ctx,
            running: HashMap::new(),
            token,
        }
    }

    /// Follows `events` until the token is cancelled or the directory watch
    /// ends, then waits for every module task to stop.
    pub async fn run(mut self, mut events: mpsc::Receiver<DirEvent>) {
        loop {
            let event = tokio::select! {
                () = self.token.cancelled() => break,
                event = events.recv() => event,
            };
            let Some(event) = event else { break };
            match event {
                DirEvent::Removed(name) => self.remove(&name).await,
                DirEvent::Module(files) => match self.running.get(&files.name) {
                    // Never waits: a module still busy with older files gets
                    // only the newest when it is done.
                    Some(running) => {
                        running.files.send_replace(files);
                    }
                    None => self.spawn(files),
                },
                DirEvent::Settling(name) => self.settling(&name),
            }
        }
        // Every module's token is a child of ours: they are all stopping.
        let tasks: Vec<_> = self.running.drain().map(|(_, r)| r.task).collect();
        futures::future::join_all(tasks).await;
    }

    /// Handles an event of the initial listing, before the supervisor runs.
    pub fn handle_now(&mut self, event: DirEvent) {
        match event {
            DirEvent::Module(files) => self.spawn(files),
            DirEvent::Settling(name) => self.settling(&name),
            DirEvent::Removed(_) => {}
        }
    }

    fn settling(&self, name: &str) {
        if !self.running.contains_key(name) {
            self.ctx.set_state(name, ModuleState::Settling);
        }
    }

    fn spawn(&mut self, files: ModuleFiles) {
        let name = files.name.clone();
        tracing::info!(module = %name, file = %files.wasm_path.display(), "module found");
        // Loading from now, so a `settled` wait that starts next waits for it.
        self.ctx.set_state(&name, ModuleState::Loading);
        let token = self.token.child_token();
        let (files, files_rx) = watch::channel(files);
        let task = tokio::spawn(module::run(self.ctx.clone(), files_rx, token.clone()));
        self.running.insert(name, Running { files, token, task });
    }

    /// Stops a removed module and waits until its sockets are gone, so that a
    /// module added again under the same name finds its resource names free.
    async fn remove(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            tracing::info!(module = %name, "module file removed; stopping it");
            running.token.cancel();
            let _ = running.task.await;
            tracing::info!(module = %name, "module stopped; its sockets are removed");
        }
        self.ctx.remove_state(name);
    }
}
