//! The modules directory, watched: inotify events (through the `notify` crate)
//! are debounced into "this module's files are complete and differ from what was
//! last reported" and "this module is gone".
//!
//! What counts is the directory's content, not the events: after a burst of
//! events the whole directory is listed again and each module's files are read
//! (through symlinks, so a Kubernetes ConfigMap or Secret volume, whose files are
//! symlinks into a `..data` directory swapped atomically, works) and compared by
//! SHA-256 with what was reported. A file that is still being written (it had
//! creation or write events and no close-after-write yet) is left alone until it
//! is closed, or until it has been quiet for the settle time, so a module copied
//! in place is read once, whole. Atomic renames and symlink swaps are complete at
//! once. A file is also read again if it changed while being read.
//!
//! Owns no module: `app` turns the events into lifecycle tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runtime::cache::content_hash;

/// Largest module file read; a bigger one is refused.
pub const MAX_MODULE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// How long a burst of events is gathered before the directory is read again.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the directory is read again without any event, in case one was lost.
const RESYNC: Duration = Duration::from_secs(30);

/// A module's files as read from the directory.
#[derive(Debug, Clone)]
pub struct ModuleFiles {
    /// The module's name: the file name without `.wasm`.
    pub name: String,
    /// The `.wasm` file.
    pub wasm_path: PathBuf,
    /// Its bytes, or why they could not be read.
    pub wasm: Result<Arc<[u8]>, String>,
    /// SHA-256 of the bytes (or of the error).
    pub wasm_hash: String,
    /// The manifest file (`<name>.toml`), whether or not it exists.
    pub manifest_path: PathBuf,
    /// Its text, if there is one (or why it could not be read).
    pub manifest: Option<Result<String, String>>,
    /// SHA-256 of the text (or of the error), if there is a manifest.
    pub manifest_hash: Option<String>,
}

impl ModuleFiles {
    fn fingerprint(&self) -> (String, Option<String>) {
        (self.wasm_hash.clone(), self.manifest_hash.clone())
    }
}

/// What changed in the directory.
#[derive(Debug)]
pub enum DirEvent {
    /// A module's files, new or different from the last report.
    Module(ModuleFiles),
    /// A new module's file is still being written; it is reported once complete.
    Settling(String),
    /// A module's `.wasm` is gone (or a settling one vanished before it was complete).
    Removed(String),
}

/// Lists the directory once and returns every module in it, then watches it,
/// reporting changes on the returned channel until `token` is cancelled.
///
/// # Errors
/// The directory cannot be read.
pub fn watch(
    dir: &Path,
    settle: Duration,
    token: CancellationToken,
) -> io::Result<(Vec<DirEvent>, mpsc::Receiver<DirEvent>)> {
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event| {
        // The receiver is gone only when the watch task ended: nothing to do.
        let _ = raw_tx.send(event);
    })
    .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(err) => {
            tracing::warn!(dir = %dir.display(), cause = %err, resync_s = RESYNC.as_secs(), "cannot watch the modules directory; changes are picked up by periodic re-reads only");
            None
        }
    };
    let mut state = DirState {
        dir: dir.to_path_buf(),
        settle,
        known: BTreeMap::new(),
        pending: HashMap::new(),
        settling: BTreeSet::new(),
        stamps: HashMap::new(),
    };
    let mut initial = Vec::new();
    state.reconcile(Instant::now(), &mut initial)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(state, watcher, raw_rx, tx, token));
    Ok((initial, rx))
}

/// A file with recent events.
#[derive(Debug, Clone, Copy)]
struct Pending {
    last_event: Instant,
    /// Created or written and not closed since.
    writing: bool,
}

struct DirState {
    dir: PathBuf,
    settle: Duration,
    /// What was last reported, by module name.
    known: BTreeMap<String, (String, Option<String>)>,
    pending: HashMap<OsString, Pending>,
    /// New modules reported as settling.
    settling: BTreeSet<String>,
    /// The module and manifest files' identities when last read, by module: a
    /// file whose identity, size and modification time are unchanged is not read
    /// and hashed again.
    stamps: HashMap<String, (Option<Stamp>, Option<Stamp>)>,
}

/// What identifies a file's content without reading it: device, inode (a
/// symlink swap or rename gives a new one), size and modification time.
type Stamp = (u64, u64, u64, SystemTime);

/// The stamp of the file `path` resolves to, if it exists.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.modified().ok()?))
}

async fn run(
    mut state: DirState,
    watcher: Option<RecommendedWatcher>,
    mut raw: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    tx: mpsc::Sender<DirEvent>,
    token: CancellationToken,
) {
    // Dropped when this task ends, which stops the inotify thread.
    let _watcher = watcher;
    let mut next: Option<Instant> = None;
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        let wake = next.unwrap_or_else(|| Instant::now() + RESYNC);
        tokio::select! {
            () = token.cancelled() => return,
            event = raw.recv() => {
                let Some(event) = event else { return };
                let now = Instant::now();
                if state.record(event, now) {
                    let at = now + DEBOUNCE;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                continue;
            }
            _ = resync.tick() => {}
            // The debounce / settle deadline: "no event for a while" has no
            // event of its own, so this one is a timer by design.
            () = tokio::time::sleep_until(wake), if next.is_some() => {}
        }
        let mut events = Vec::new();
        let now = Instant::now();
        if let Err(err) = state.reconcile(now, &mut events) {
            tracing::error!(dir = %state.dir.display(), cause = %err, "cannot read the modules directory; keeping every module as it is");
        }
        next = state.next_wake();
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

impl DirState {
    /// Notes an event; true if the directory should be read again.
    fn record(&mut self, event: notify::Result<notify::Event>, now: Instant) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                // Queue overflow and the like: read everything again.
                tracing::debug!(cause = %err, "modules directory watch error; re-reading");
                return true;
            }
        };
        let writing = match event.kind {
            // Opening or reading changes nothing.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
            EventKind::Access(_) => return false,
            EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => true,
            _ => false,
        };
        for path in &event.paths {
            if let Some(name) = path.file_name()
                && path.parent() == Some(self.dir.as_path())
            {
                self.pending.insert(
                    name.to_os_string(),
                    Pending {
                        last_event: now,
                        writing,
                    },
                );
            }
        }
        true
    }

    /// When the next read is due: when the earliest file still being written
    /// has been quiet for the settle time.
    fn next_wake(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| p.writing)
            .map(|p| p.last_event + self.settle)
            .min()
    }

    fn unsettled(&self, file: &Path, now: Instant) -> bool {
        file.file_name()
            .and_then(|n| self.pending.get(n))
            .is_some_and(|p| p.writing && now < p.last_event + self.settle)
    }

    /// Reads the directory and appends what changed since the last report.
    fn reconcile(&mut self, now: Instant, events: &mut Vec<DirEvent>) -> io::Result<()> {
        let mut present = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = module_name(&path) else {
                continue;
            };
            // Follows symlinks: a ConfigMap's files are symlinks into `..data`.
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            present.insert(name.clone());
            let manifest_path = path.with_extension("toml");
            if self.unsettled(&path, now) || self.unsettled(&manifest_path, now) {
                if !self.known.contains_key(&name) && self.settling.insert(name.clone()) {
                    tracing::info!(module = %name, "module file is being written; loading it once complete");
                    events.push(DirEvent::Settling(name));
                }
                continue;
            }
            let stamps = (stamp(&path), stamp(&manifest_path));
            if self.known.contains_key(&name) && self.stamps.get(&name) == Some(&stamps) {
                continue;
            }
            let Some(files) = read_module(name.clone(), path, manifest_path) else {
                // Changed while being read: try again shortly.
                self.pending.insert(
                    OsString::from(format!("{name}.wasm")),
                    Pending {
                        last_event: now,
                        writing: true,
                    },
                );
                continue;
            };
            self.settling.remove(&name);
            self.stamps.insert(name.clone(), stamps);
            let fingerprint = files.fingerprint();
            if self.known.get(&name) != Some(&fingerprint) {
                self.known.insert(name, fingerprint);
                events.push(DirEvent::Module(files));
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            self.stamps.remove(&name);
            events.push(DirEvent::Removed(name));
        }
        // A new file that vanished before it was complete was never reported
        // as a module; its "settling" report is withdrawn.
        let abandoned: Vec<String> = self
            .settling
            .iter()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in abandoned {
            self.settling.remove(&name);
            events.push(DirEvent::Removed(name));
        }
        let settle = self.settle;
        self.pending
            .retain(|_, p| p.writing && now < p.last_event + settle);
        Ok(())
    }
}

/// The module name of `path` if it is a `<name>.wasm` that is not hidden (editors
/// and rsync write hidden temporary files, then rename them into place).
fn module_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    (!name.is_empty() && !name.starts_with('.')).then(|| name.to_string())
}

/// Reads a file of at most `max` bytes; `None` if it changed while being read.
fn read_bounded(path: &Path, max: u64) -> Option<Result<Vec<u8>, String>> {
    let before = stamp(path);
    let result = match before {
        Some((_, _, len, _)) if len > max => {
            return Some(Err(format!(
                "{len} bytes is more than the {} MiB allowed",
                max / (1024 * 1024)
            )));
        }
        _ => std::fs::read(path).map_err(|e| format!("cannot read: {e}")),
    };
    (stamp(path) == before).then_some(result)
}

fn read_module(name: String, wasm_path: PathBuf, manifest_path: PathBuf) -> Option<ModuleFiles> {
    let wasm = read_bounded(&wasm_path, MAX_MODULE_BYTES)?;
    let wasm_hash = match &wasm {
        Ok(bytes) => content_hash(bytes),
        Err(e) => content_hash(e.as_bytes()),
    };
    let manifest = if std::fs::symlink_metadata(&manifest_path).is_ok() {
        Some(
            read_bounded(&manifest_path, MAX_MANIFEST_BYTES)?.and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
            }),
        )
    } else {
        None
    };
    let manifest_hash = manifest.as_ref().map(|m| match m {
        Ok(text) => content_hash(text.as_bytes()),
        Err(e) => content_hash(e.as_bytes()),
    });
    Some(ModuleFiles {
        name,
        wasm_path,
        wasm: wasm.map(Arc::from),
        wasm_hash,
        manifest_path,
        manifest,
        manifest_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_skip_hidden_and_other_files() {
        assert_eq!(module_name(Path::new("/m/a.wasm")).as_deref(), Some("a"));
        assert_eq!(module_name(Path::new("/m/.a.wasm")), None);
        assert_eq!(module_name(Path::new("/m/a.toml")), None);
        assert_eq!(module_name(Path::new("/m/a.wasm.part")), None);
    }
}
