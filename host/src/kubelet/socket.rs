//! Unix sockets in the device-plugin directory: naming a plugin socket uniquely per
//! incarnation, binding it (replacing a stale file), removing it when the plugin
//! stops, checking that it accepts, and dialing one with tonic.
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

/// A file name for a resource's socket that no earlier incarnation used:
/// `<resource made file-safe>-<unix millis>-<sequence>.sock`. Kubelet does not
/// support a new registration on an old socket path, so every (re)start gets a
/// new one.
pub fn plugin_socket_name(resource: &ResourceName) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{millis}-{seq}.sock", resource.file_safe())
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
