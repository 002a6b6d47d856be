//! The data plane: one thread running a single-threaded tokio runtime that
//! serves every resource's `DevicePlugin` gRPC server (Allocate, ListAndWatch,
//! GetPreferredAllocation), apart from the host's multi-threaded runtime, which
//! keeps the control plane (module loads, scans, health checks, registration,
//! directory watches, metrics).
//!
//! Why a thread of its own: Allocate sits on kubelet's pod-admission path. On a
//! work-stealing runtime each request's socket readiness, the handler and the
//! reply may be picked up by different worker threads, and those cross-thread
//! wake-ups cost more than the whole guest call (a bare tonic call over a unix
//! socket measured p50 143 µs multi-threaded against 66 µs on a current-thread
//! runtime on a 2-core machine; `BENCHMARKS.md` has this host's figures, before
//! and after). On one thread, a request is
//! read, answered and written without leaving it, and a compile or a scan of
//! thousands of devices on the control plane never delays it. Kubelet sends its
//! Allocates one pod at a time, so one thread is ample; a guest that computes
//! long yields it at every epoch tick (`runtime::engine::EPOCH_TICK`).
//!
//! Owns only the thread and its runtime; what runs there is the frontends'.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The data plane's runtime. Cloning the handle is cheap; the thread stops when
/// the last [`DataPlane`] drops, and the tasks still on it are dropped then.
#[derive(Debug)]
pub struct DataPlane {
    handle: Handle,
    /// Dropping it ends the thread's `block_on`.
    _stop: oneshot::Sender<()>,
}

impl DataPlane {
    /// Starts the thread and its runtime.
    ///
    /// # Errors
    /// The runtime or the thread could not be created.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("wdp-dataplane")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("wdp-dataplane".into())
            .spawn(move || {
                // Runs the spawned servers until the plane is dropped; an error
                // from the channel means just that.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    /// Runs `task` on the data plane.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}
