//! The kubelet's device-plugin directory, watched: every change in it (kubelet
//! restarting and recreating `kubelet.sock`, kubelet wiping plugin sockets) bumps
//! a counter that plugin tasks wait on, so they re-check their registration at
//! once instead of polling. Which change matters is decided by looking at the
//! files (`kubelet_identity`, a socket's inode), never by decoding events, so
//! coalesced events cost nothing. Plugins rely on this watch alone (no timer:
//! an idle host must not wake periodically), which inotify allows: it loses
//! events only when its queue overflows, and an overflow reaches us as an event
//! of its own (`notify` reports `Q_OVERFLOW` as a `Rescan` event), which, like
//! any event or watch error, counts as a change, so every plugin looks again.
//!
//! A `kubelet.sock` with a new identity after an earlier one is counted as a
//! kubelet restart in the metrics, once, by whichever look notices it first.
//!
//! Uses inotify through the `notify` crate; if the watch cannot be set up (no
//! inotify instances left, say), [`KubeletDir::watched`] is false, plugins
//! re-check on a timer instead, and a warning says so.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::watch;

use crate::kubelet::deviceplugin::proto;
use crate::metrics::Metrics;

/// A file's identity: device and inode. A recreated file has a new one.
pub type FileIdentity = (u64, u64);

/// The identity of the file at `path`, if there is one.
pub fn file_identity(path: &Path) -> Option<FileIdentity> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The watched directory.
pub struct KubeletDir {
    path: PathBuf,
    restarts: Arc<Restarts>,
    changes: watch::Receiver<u64>,
    // Kept so that `changes` never reports a closed channel, watcher or not.
    _sender: Arc<watch::Sender<u64>>,
    // Dropping the watcher stops the inotify thread; kept for the directory's life.
    _watcher: Option<RecommendedWatcher>,
}

impl std::fmt::Debug for KubeletDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletDir")
            .field("path", &self.path)
            .field("watched", &self._watcher.is_some())
            .finish()
    }
}

/// Counts kubelet restarts: `kubelet.sock` found again after it was seen gone,
/// or found recreated (a new inode, or the same inode number reused with a new
/// change time, as a quick delete-and-create often gives).
struct Restarts {
    socket: PathBuf,
    last: Mutex<Seen>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Seen {
    /// Device, inode and change time (seconds, nanoseconds) of the last socket seen.
    socket: Option<(u64, u64, i64, i64)>,
    /// The socket was seen gone since.
    gone: bool,
}

impl Restarts {
    /// Looks at `kubelet.sock` and returns its identity, counting a restart if
    /// it is new.
    fn look(&self) -> Option<FileIdentity> {
        let meta = std::fs::symlink_metadata(&self.socket).ok();
        let mut seen = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &meta {
            None => seen.gone = seen.socket.is_some(),
            Some(m) => {
                let now = (m.dev(), m.ino(), m.ctime(), m.ctime_nsec());
                if seen.socket.is_some_and(|before| before != now || seen.gone) {
                    self.metrics.kubelet_restarted();
                }
                *seen = Seen {
                    socket: Some(now),
                    gone: false,
                };
            }
        }
        meta.map(|m| (m.dev(), m.ino()))
    }
}

impl KubeletDir {
    /// Starts watching `path`; kubelet restarts are counted in `metrics`.
    pub fn watch(path: &Path, metrics: Arc<Metrics>) -> Arc<Self> {
        let restarts = Arc::new(Restarts {
            socket: path.join(proto::KUBELET_SOCKET),
            last: Mutex::new(Seen::default()),
            metrics,
        });
        restarts.look();
        let (sender, changes) = watch::channel(0u64);
        let sender = Arc::new(sender);
        let tx = sender.clone();
        let seen = restarts.clone();
        // Any event means "look again": a queue overflow (a `Rescan` event
        // without paths) and a watch error included, since events may have
        // been lost then.
        let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
            // Counted before the plugins are woken, so a restart is in the
            // metrics by the time anything re-registers.
            seen.look();
            tx.send_modify(|n| *n = n.wrapping_add(1));
        })
        .and_then(|mut w| w.watch(path, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(dir = %path.display(), cause = %err, "cannot watch the kubelet directory; kubelet restarts are noticed by periodic checks only");
                None
            }
        };
        Arc::new(Self {
            path: path.to_path_buf(),
            restarts,
            changes,
            _sender: sender,
            _watcher: watcher,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether changes are watched; if not, [`KubeletDir::changes`] never
    /// changes and callers must look on a timer.
    pub fn watched(&self) -> bool {
        self._watcher.is_some()
    }

    /// A counter that changes whenever something in the directory changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Kubelet's registration socket.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.path.join(proto::KUBELET_SOCKET)
    }

    /// The identity of `kubelet.sock` now; a restarted kubelet has a new one.
    pub fn kubelet_identity(&self) -> Option<FileIdentity> {
        self.restarts.look()
    }
}
