//! Unix sockets in the device-plugin directory: naming a plugin socket uniquely per
//! incarnation, binding it (replacing a stale file), removing it when the plugin
//! stops, checking that it accepts, dialing one with tonic, and at start removing
//! the dead sockets an earlier run of the host left (it was killed before it could).
//! Never touches a file whose name is not of our naming scheme.
//!
//! Owns no protocol: `server` and `registration` decide what runs over the sockets.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

use crate::domain::ResourceName;

/// The longest path a unix socket address holds on Linux (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A file name in `dir` for a resource's socket that no earlier incarnation used:
/// `<resource made file-safe>-<unix millis>-<sequence>.sock`. Kubelet does not
/// support a new registration on an old socket path, so every (re)start gets a
/// new one.
///
/// A unix socket path holds at most [`MAX_SOCKET_PATH`] bytes, and resource names
/// may be long (Intel's FPGA function resources are 69 characters; the kubelet
/// directory takes 32 more): when the whole path would not fit, the resource part
/// is cut and ends in `~` and 8 hex digits of its SHA-256, so the name still says
/// which resource it serves and stays distinct from other cut names. Kubelet only
/// uses the name to dial the socket.
pub fn plugin_socket_name(dir: &Path, resource: &ResourceName) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("-{millis}-{seq}.sock");
    let name = resource.file_safe();
    // `dir/` + name + suffix must fit.
    let room = MAX_SOCKET_PATH.saturating_sub(dir.as_os_str().len() + 1 + suffix.len());
    if name.len() <= room {
        return format!("{name}{suffix}");
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    // `file_safe` is ASCII, so any byte index is a character boundary.
    let keep = room.saturating_sub(1 + hash.len());
    format!("{}~{hash}{suffix}", &name[..keep.min(name.len())])
}

/// A bound socket file that is removed when the guard drops, so a stopped plugin
/// never leaves a socket behind for kubelet to dial.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket's file name (what goes in `RegisterRequest.endpoint`).
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(socket = %self.path.display(), "removed socket"),
            // Kubelet wipes the directory when it restarts: gone already is fine.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(socket = %self.path.display(), cause = %err, "could not remove socket")
            }
        }
    }
}

/// Binds `dir/name`, first removing a stale socket file of that name.
///
/// # Errors
/// The directory is missing or not writable, the path is too long for a unix
/// socket, or a non-socket file is in the way.
pub fn bind(dir: &Path, name: &str) -> io::Result<(UnixListener, SocketFile)> {
    let path = dir.join(name);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                path.display()
            ),
        ));
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(&path)?;
    Ok((listener, SocketFile { path }))
}

/// Connects once to check that a server is accepting on `path`.
///
/// # Errors
/// The connection is refused or the file is missing.
pub async fn check_accepting(path: &Path) -> io::Result<()> {
    UnixStream::connect(path).await.map(drop)
}

/// Whether `name` is a file name [`plugin_socket_name`] makes: a resource name made
/// file-safe (or such a name cut, then `~` and 8 hex digits), `-<millis>-<n>.sock`.
///
/// Strict on purpose: [`remove_stale_plugin_sockets`] deletes what matches, and the
/// directory is shared with other vendors' plugins and kubelet. A whole name must
/// read back as a valid resource name (`file_safe` turns only the `/` into `_`, and
/// a domain has no `_`, so the first `_` is the `/`).
fn is_plugin_socket_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = name.strip_suffix(".sock") else {
        return false;
    };
    let Some((rest, seq)) = rest.rsplit_once('-') else {
        return false;
    };
    let Some((stem, millis)) = rest.rsplit_once('-') else {
        return false;
    };
    if !digits(seq) || !digits(millis) {
        return false;
    }
    match stem.split_once('~') {
        Some((cut, hash)) => {
            hash.len() == 8
                && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && cut
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => ResourceName::parse(&stem.replacen('_', "/", 1)).is_ok(),
    }
}

/// Removes the plugin sockets an earlier run of this host left in `dir`: sockets
/// whose name is of [`plugin_socket_name`]'s scheme and on which a connect is
/// refused, so nobody serves them. A host killed with SIGKILL (an OOM kill, say)
/// never drops its [`SocketFile`]s, and every restart names its sockets anew, so
/// without this a crash loop fills kubelet's directory. Returns the paths removed.
///
/// Keeps everything else: `kubelet.sock` and other plugins' sockets (not our
/// names), regular files and symlinks, and sockets that accept a connect or fail
/// it any other way (a live host, an old pod still terminating during a rolling
/// update, a full backlog, no permission): only a refused connect proves a socket
/// dead. Call it before serving anything, so none of this run's sockets is seen.
///
/// Never fails: an unreadable directory or a file that cannot be removed is a
/// warning, since leftover sockets cost kubelet nothing but a directory entry.
pub async fn remove_stale_plugin_sockets(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), cause = %err, "cannot list the kubelet directory; sockets an earlier run left there stay");
            return Vec::new();
        }
    };
    let (mut removed, mut live) = (Vec::new(), 0usize);
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), cause = %err, "cannot list the kubelet directory to the end; sockets an earlier run left there may stay");
                break;
            }
        };
        if !entry
            .file_name()
            .to_str()
            .is_some_and(is_plugin_socket_name)
        {
            continue;
        }
        // `DirEntry::file_type` does not follow symlinks.
        if !entry.file_type().is_ok_and(|t| t.is_socket()) {
            continue;
        }
        let path = entry.path();
        // Asynchronous, so a live socket with a full backlog fails at once
        // (would block) instead of holding up the start.
        match UnixStream::connect(&path).await {
            Ok(_) => {
                live += 1;
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(_) => continue,
        }
        // A name carries the millisecond and sequence number of the run that made
        // it, so no later run binds this path between the connect and the removal.
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(socket = %path.display(), "removed a dead plugin socket an earlier run of the host left");
                removed.push(path);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(socket = %path.display(), cause = %err, "cannot remove a dead plugin socket an earlier run of the host left")
            }
        }
    }
    if removed.is_empty() {
        tracing::debug!(dir = %dir.display(), live, "no dead plugin sockets of an earlier run");
    } else {
        tracing::info!(dir = %dir.display(), removed = removed.len(), live, "removed the dead plugin sockets an earlier run of the host left");
    }
    removed
}

/// A tonic channel to the gRPC server on the unix socket `path`. The channel
/// connects lazily and reconnects on its own; the URI is a placeholder that tonic
/// requires and never resolves.
///
/// # Errors
/// Only when the placeholder URI is rejected, which does not happen.
pub fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Ok(
        Endpoint::try_from("http://[::1]:50051")?.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            },
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET_DIR: &str = "/var/lib/kubelet/device-plugins";

    #[test]
    fn short_names_keep_the_whole_resource() {
        let resource = ResourceName::parse("example.com/dev-1").expect("valid");
        let name = plugin_socket_name(Path::new(KUBELET_DIR), &resource);
        assert!(name.starts_with("example.com_dev-1-"), "{name}");
        assert!(name.ends_with(".sock"));
    }

    #[test]
    fn long_names_are_cut_to_fit_a_socket_path_and_stay_distinct() {
        let long = |f: &str| {
            ResourceName::parse(&format!(
                "fpga.intel.com/af-ce4.d84.zkiWk5jwXzOUbVYHCL4QithCTcSko8QT-J5DNoP5B{f}"
            ))
            .expect("valid")
        };
        let dir = Path::new(KUBELET_DIR);
        let a = plugin_socket_name(dir, &long("As"));
        let b = plugin_socket_name(dir, &long("Bs"));
        for name in [&a, &b] {
            assert!(
                dir.join(name).as_os_str().len() <= MAX_SOCKET_PATH,
                "{name} is too long"
            );
            assert!(name.starts_with("fpga.intel.com_af-ce4.d84."), "{name}");
        }
        let resource_part = |n: &str| {
            n.split_once('~')
                .map(|(r, h)| (r.to_string(), h[..8].to_string()))
        };
        let (ra, ha) = resource_part(&a).expect("cut");
        let (rb, hb) = resource_part(&b).expect("cut");
        assert_eq!(ra, rb, "same prefix");
        assert_ne!(ha, hb, "the hash tells them apart");
        // And a bind in a directory that long works.
        let tmp = tempfile::tempdir().expect("tmp");
        let deep = tmp.path().join("d".repeat(40));
        std::fs::create_dir(&deep).expect("dir");
        let name = plugin_socket_name(&deep, &long("As"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (_listener, file) = bind(&deep, &name).expect("fits");
            assert!(file.path().exists());
        });
    }

    /// A socket file at `dir/name` that nobody listens on, as a killed host leaves
    /// it (std's listener does not remove its file when dropped).
    fn dead_socket(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        path
    }

    fn our_name(dir: &Path) -> String {
        let resource = ResourceName::parse("example.com/dev-1").expect("valid");
        plugin_socket_name(dir, &resource)
    }

    #[test]
    fn names_plugin_socket_name_makes_are_of_our_scheme() {
        let dir = Path::new(KUBELET_DIR);
        let cut =
            ResourceName::parse(&format!("fpga.intel.com/af-{}", "a".repeat(60))).expect("valid");
        for name in [our_name(dir), plugin_socket_name(dir, &cut)] {
            assert!(is_plugin_socket_name(&name), "{name}");
        }
    }

    #[test]
    fn other_names_are_not_of_our_scheme() {
        for name in [
            "kubelet.sock",
            "nvidia-gpu.sock",
            "gpu.intel.com-i915.sock",
            "example.com_dev-1.sock",
            "example.com_dev-1-1700000000000-x.sock",
            "example.com_dev-1-1700000000000-0.sock.tmp",
            "no-domain-1700000000000-0.sock",
            "example.com_dev-1~XYZ-1700000000000-0.sock",
        ] {
            assert!(!is_plugin_socket_name(name), "{name}");
        }
    }

    #[tokio::test]
    async fn a_dead_socket_of_our_scheme_is_removed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dead = dead_socket(tmp.path(), &our_name(tmp.path()));
        assert_eq!(
            remove_stale_plugin_sockets(tmp.path()).await,
            vec![dead.clone()]
        );
        assert!(!dead.exists());
    }

    #[tokio::test]
    async fn a_live_socket_of_our_scheme_is_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (_listener, file) = bind(tmp.path(), &our_name(tmp.path())).expect("bind");
        assert!(remove_stale_plugin_sockets(tmp.path()).await.is_empty());
        assert!(file.path().exists());
    }

    #[tokio::test]
    async fn a_dead_socket_with_a_foreign_name_is_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let foreign = dead_socket(tmp.path(), "vendor-gpu.sock");
        let kubelet = dead_socket(tmp.path(), "kubelet.sock");
        assert!(remove_stale_plugin_sockets(tmp.path()).await.is_empty());
        assert!(foreign.exists() && kubelet.exists());
    }

    #[tokio::test]
    async fn a_regular_file_named_like_our_sockets_is_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join(our_name(tmp.path()));
        std::fs::write(&file, b"not a socket").expect("write");
        assert!(remove_stale_plugin_sockets(tmp.path()).await.is_empty());
        assert!(file.exists());
    }

    #[tokio::test]
    async fn a_missing_directory_removes_nothing_and_does_not_fail() {
        let tmp = tempfile::tempdir().expect("tmp");
        let missing = tmp.path().join("missing");
        assert!(remove_stale_plugin_sockets(&missing).await.is_empty());
    }
}
