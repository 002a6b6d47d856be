//! The device-plugin frontend: kubelet's v1beta1 device-plugin API. The
//! generated protocol (`proto`), the `DevicePlugin` service of one resource
//! (`server`), registration with kubelet (`registration`), preferred
//! allocations (`preferred`), and a kubelet simulator for the demo and the tests
//! (`simulator`). This file holds the task that keeps one resource served and
//! registered across kubelet restarts ([`serve`]). Never names a wasmtime type.

pub mod preferred;
pub mod proto;
pub mod registration;
pub mod server;
pub mod simulator;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::ResourceName;
use crate::frontend::{Frontend, ServeRequest, Served, Snapshots};
use crate::gauge::Gauge;
use crate::kubelet::dataplane::DataPlane;
use crate::kubelet::dir::{FileIdentity, KubeletDir, file_identity};
use crate::kubelet::socket;
use crate::metrics::ResourceMetrics;
use registration::RegistrationError;
use server::PluginService;

/// Why one attempt to serve a resource failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Binding or checking the plugin socket failed.
    #[error("socket {path}: {cause}")]
    Socket {
        /// The socket path.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// Kubelet did not take the registration.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
}

pub use crate::kubelet::registrations::{PluginStatus, Registrations};

/// What the plugin tasks of every resource share.
#[derive(Debug, Clone)]
pub struct Plugins {
    /// The watched kubelet directory.
    pub dir: Arc<KubeletDir>,
    /// Counts the open ListAndWatch streams.
    pub streams: Gauge,
    /// Where each resource stands with kubelet.
    pub registrations: Registrations,
    /// The thread that every resource's gRPC server runs on.
    pub data_plane: Arc<DataPlane>,
}

/// First wait before retrying a failed registration; doubled on each failure.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between retries while kubelet is absent or unreachable.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest wait between retries after kubelet refused a registration.
const RETRY_MAX_REFUSED: Duration = Duration::from_secs(60);
/// How often a registered plugin re-checks its socket and kubelet's when the
/// kubelet directory is not watched (see `dir`); with a watch it only wakes on
/// a change, so an idle host does not wake periodically.
const RECHECK: Duration = Duration::from_secs(5);

/// Serves `resource` and keeps it registered, in a task of its own; returns at
/// once. Each incarnation binds a new socket in the kubelet directory, confirms it
/// accepts, then registers (serve first, so kubelet can dial the endpoint the
/// moment it learns of it). When kubelet restarts (a new `kubelet.sock`) or the
/// socket is deleted, the incarnation is stopped and a new one registered; while
/// kubelet is absent or refuses, it retries with backoff, woken early by a new
/// `kubelet.sock`.
/// The task ends, its socket removed and its entry in [`Registrations`] gone,
/// once the request's token is cancelled.
pub fn serve(plugins: &Plugins, request: ServeRequest) -> Served {
    let ServeRequest {
        serve_as: _,
        snapshots,
        metrics,
        shutdown,
    } = request;
    let resource = snapshots.borrow().name().clone();
    plugins.registrations.set(&resource, PluginStatus::Waiting);
    let plugin = Plugin {
        changes: plugins.dir.changes(),
        dir: plugins.dir.clone(),
        resource,
        snapshots,
        streams: plugins.streams.clone(),
        data_plane: plugins.data_plane.clone(),
        metrics,
        shutdown,
        registrations: plugins.registrations.clone(),
        unregistered_since: None,
        last_error: String::new(),
    };
    let task = tokio::spawn(plugin.run());
    Served { task }
}

impl Frontend for Plugins {
    fn serve(&self, request: ServeRequest) -> Result<Served, String> {
        Ok(serve(self, request))
    }
}

/// Why a registered incarnation ended.
enum Ended {
    Shutdown,
    KubeletRestarted,
    KubeletGone,
    SocketRemoved,
    ServerStopped,
}

/// What to do after one attempt to serve and register.
enum Next {
    /// Shut down.
    Stop,
    /// Try again at once (a registered incarnation ended).
    Now,
    /// Try again after the backoff, which grows up to this cap.
    Backoff(Duration),
}

/// One resource's plugin task and what it keeps between attempts.
struct Plugin {
    dir: Arc<KubeletDir>,
    resource: ResourceName,
    snapshots: Snapshots,
    /// Counts the open ListAndWatch streams.
    streams: Gauge,
    data_plane: Arc<DataPlane>,
    metrics: ResourceMetrics,
    shutdown: CancellationToken,
    registrations: Registrations,
    changes: watch::Receiver<u64>,
    /// Since when the resource has not been registered (for the log).
    unregistered_since: Option<Instant>,
    /// The last failure logged, so that repeats are logged quietly.
    last_error: String,
}

impl Plugin {
    /// Keeps the resource served and registered until shutdown.
    async fn run(mut self) {
        let mut backoff = RETRY_FIRST;
        while !self.shutdown.is_cancelled() {
            self.changes.mark_unchanged();
            let kubelet = self.dir.kubelet_identity();
            match self.attempt(kubelet).await {
                Next::Stop => break,
                Next::Now => backoff = RETRY_FIRST,
                Next::Backoff(cap) => {
                    if !self.retry_wait(kubelet, &mut backoff, cap).await {
                        break;
                    }
                }
            }
        }
        self.registrations.remove(&self.resource);
    }

    /// Serves a new incarnation and registers it with the kubelet whose socket
    /// has identity `kubelet`; once registered, waits until it must end.
    async fn attempt(&mut self, kubelet: Option<FileIdentity>) -> Next {
        let resource = &self.resource;
        if kubelet.is_none() {
            if self.unregistered_since.is_none() {
                tracing::info!(resource = %resource, socket = %self.dir.kubelet_socket().display(), "waiting for kubelet to create its socket");
                self.unregistered_since = Some(Instant::now());
            }
            return Next::Backoff(RETRY_MAX);
        }
        let incarnation = match Incarnation::start(self).await {
            Ok(incarnation) => incarnation,
            Err(err) => {
                log_retry(resource, &err, &mut self.last_error);
                return Next::Backoff(RETRY_MAX);
            }
        };
        let registered = tokio::select! {
            () = self.shutdown.cancelled() => None,
            result = registration::register(self.dir.path(), &incarnation.endpoint, resource) => Some(result),
        };
        match registered {
            None => {
                incarnation.stop().await;
                Next::Stop
            }
            Some(Err(err)) => {
                incarnation.stop().await;
                self.metrics.registered(match err {
                    RegistrationError::Refused(_) => "refused",
                    RegistrationError::Unreachable { .. } => "unreachable",
                });
                let cap = match err {
                    RegistrationError::Refused(_) => RETRY_MAX_REFUSED,
                    RegistrationError::Unreachable { .. } => RETRY_MAX,
                };
                log_retry(
                    resource,
                    &PluginError::Registration(err),
                    &mut self.last_error,
                );
                Next::Backoff(cap)
            }
            Some(Ok(())) => {
                let waited_ms = self
                    .unregistered_since
                    .take()
                    .map(|since| since.elapsed().as_millis() as u64);
                self.last_error.clear();
                self.metrics.registered("ok");
                self.registrations.set(
                    &self.resource,
                    PluginStatus::Registered(incarnation.endpoint.clone()),
                );
                tracing::info!(resource = %resource, endpoint = %incarnation.endpoint, waited_ms, "registered with kubelet");
                let ended = incarnation
                    .watch(&self.dir, &mut self.changes, kubelet, &self.shutdown)
                    .await;
                self.registrations
                    .set(&self.resource, PluginStatus::Waiting);
                incarnation.stop().await;
                self.unregistered_since = Some(Instant::now());
                match ended {
                    Ended::Shutdown => return Next::Stop,
                    Ended::KubeletRestarted => {
                        tracing::info!(resource = %resource, "kubelet restarted; registering again")
                    }
                    Ended::KubeletGone => {
                        tracing::info!(resource = %resource, "kubelet's socket is gone; registering again once kubelet is back")
                    }
                    Ended::SocketRemoved => {
                        tracing::info!(resource = %resource, "plugin socket was removed; serving on a new one and registering again")
                    }
                    Ended::ServerStopped => {
                        tracing::warn!(resource = %resource, "plugin server stopped; starting it again")
                    }
                }
                Next::Now
            }
        }
    }

    /// Waits out `backoff` (then doubles it, up to `cap`), or less when kubelet's
    /// socket changes from `kubelet` (a kubelet started or restarted). False on
    /// shutdown.
    async fn retry_wait(
        &mut self,
        kubelet: Option<FileIdentity>,
        backoff: &mut Duration,
        cap: Duration,
    ) -> bool {
        // Backoff between retries, cut short by the readiness signal that
        // matters (a new kubelet socket) below.
        let deadline = tokio::time::sleep(*backoff);
        *backoff = (*backoff * 2).min(cap);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                () = &mut deadline => return true,
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // Cannot happen while `dir` lives; the timer is left.
                        (&mut deadline).await;
                        return true;
                    }
                    // Our own socket coming and going changes the directory too:
                    // only a different kubelet socket is worth an early retry.
                    let now = self.dir.kubelet_identity();
                    if now.is_some() && now != kubelet {
                        *backoff = RETRY_FIRST;
                        return true;
                    }
                }
            }
        }
    }
}

/// Logs a failed attempt: an error the first time it happens, at debug level
/// while it repeats, so a node without kubelet does not flood the log.
fn log_retry(resource: &ResourceName, err: &PluginError, last_error: &mut String) {
    let message = err.to_string();
    if *last_error == message {
        tracing::debug!(resource = %resource, cause = %message, "still cannot register; retrying");
    } else {
        match err {
            PluginError::Registration(RegistrationError::Unreachable { .. }) => {
                tracing::info!(resource = %resource, cause = %message, "kubelet not reachable yet; retrying with backoff")
            }
            _ => {
                tracing::error!(resource = %resource, cause = %message, "cannot register with kubelet; retrying with backoff")
            }
        }
        *last_error = message;
    }
}

/// One bound socket with its gRPC server.
struct Incarnation {
    endpoint: String,
    path: PathBuf,
    socket: Option<FileIdentity>,
    token: CancellationToken,
    task: JoinHandle<()>,
    /// Cancelled when the server task ends, however it ends.
    stopped: CancellationToken,
}

impl Incarnation {
    /// Binds a new socket for `plugin`'s resource, serves it on the data plane
    /// and checks that it accepts.
    async fn start(plugin: &Plugin) -> Result<Self, PluginError> {
        let Plugin {
            dir,
            resource,
            snapshots,
            streams,
            data_plane,
            metrics,
            shutdown,
            ..
        } = plugin;
        let endpoint = socket::plugin_socket_name(dir.path(), resource);
        let socket_path = dir.path().join(&endpoint).display().to_string();
        let socket_err = |cause| PluginError::Socket {
            path: socket_path.clone(),
            cause,
        };
        let (listener, socket_file) = socket::bind(dir.path(), &endpoint).map_err(socket_err)?;
        let path = socket_file.path().to_path_buf();
        let socket = file_identity(&path);
        let token = shutdown.child_token();
        let service = PluginService::new(
            resource.clone(),
            snapshots.clone(),
            streams.clone(),
            token.clone(),
        )
        .with_metrics(metrics.clone());
        let span_resource = resource.to_string();
        // The server runs on the data plane; the listener moves there
        // unregistered, so that its connections belong to that thread's reactor.
        let listener = listener.into_std().map_err(socket_err)?;
        let stopped = CancellationToken::new();
        let stopped_on_drop = stopped.clone().drop_guard();
        let task = data_plane.spawn(async move {
            let _stopped = stopped_on_drop;
            let served = match tokio::net::UnixListener::from_std(listener) {
                Ok(listener) => service.serve(listener).await.map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            };
            if let Err(err) = served {
                tracing::error!(resource = %span_resource, cause = %err, "device plugin server failed");
            }
            // Dropped only after the server has stopped accepting.
            drop(socket_file);
        });
        let incarnation = Self {
            endpoint,
            path,
            socket,
            token,
            task,
            stopped,
        };
        if let Err(cause) = socket::check_accepting(&incarnation.path).await {
            let err = socket_err(cause);
            incarnation.stop().await;
            return Err(err);
        }
        Ok(incarnation)
    }

    /// Waits until this incarnation must end: shutdown, a new kubelet, our socket
    /// gone or replaced, or the server stopped on its own.
    async fn watch(
        &self,
        dir: &KubeletDir,
        changes: &mut watch::Receiver<u64>,
        kubelet: Option<FileIdentity>,
        shutdown: &CancellationToken,
    ) -> Ended {
        // Only an unwatched directory needs looking at on a timer (its first
        // tick, at once, is one more look).
        let mut recheck = (!dir.watched()).then(|| tokio::time::interval(RECHECK));
        let mut watching = true;
        loop {
            let tick = async {
                match recheck.as_mut() {
                    Some(recheck) => {
                        recheck.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let lost_watch = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ended::Shutdown,
                () = self.token.cancelled() => return Ended::Shutdown,
                () = self.stopped.cancelled() => return Ended::ServerStopped,
                () = tick => false,
                changed = changes.changed(), if watching => changed.is_err(),
            };
            if lost_watch {
                // Cannot happen while `dir` lives; fall back to the timer.
                watching = false;
                recheck.get_or_insert_with(|| tokio::time::interval(RECHECK));
            }
            if file_identity(&self.path) != self.socket {
                return Ended::SocketRemoved;
            }
            match dir.kubelet_identity() {
                None => return Ended::KubeletGone,
                now if now != kubelet => return Ended::KubeletRestarted,
                _ => {}
            }
        }
    }

    /// Stops the server (its ListAndWatch streams end) and waits until the socket
    /// is removed.
    async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}
