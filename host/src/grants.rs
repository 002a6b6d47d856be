//! What the operator lets a module reach on the host, and the check of the host
//! paths a module hands to containers.
//!
//! A guest sees no host files unless its manifest grants read-only directories
//! (enforced by the runtime as WASI preopens). What it may make kubelet put into a
//! pod is checked here: a device node's host path must lie under `device-paths`
//! (default `/dev`), a mount's under `mount-paths` (default: none). The check is
//! made on the path with every symlink on the host resolved, so `/dev/x` pointing
//! at `/etc` is refused, and kubelet is given the resolved path. Some paths are
//! never handed out, whatever the grants say ([`PROTECTED`] and the kubelet
//! directory), and neither is any directory that holds one of them.
//!
//! Paths are resolved as this process sees them: run in a container, the host
//! must see the node's directories at the node's paths (as the DaemonSet mounts
//! `/dev`).

use std::io;
use std::path::{Path, PathBuf};

/// Host paths no allocation hands to a container, whatever the grants: the
/// node's configuration, the kernel's process and memory interfaces, kubelet's
/// state (pod volumes and secrets, the device-plugin sockets). The
/// `--kubelet-dir` is added to these at start. (Read-only grants are not
/// limited by this list: what a module may read is the operator's choice.)
pub const PROTECTED: &[&str] = &[
    "/etc",
    "/proc",
    "/var/lib/kubelet",
    "/dev/mem",
    "/dev/kmem",
    "/dev/port",
];

/// The prefix device nodes may use when the manifest does not say.
pub const DEFAULT_DEVICE_PATH: &str = "/dev";

/// A host path as given, and as it resolved when the grants were built.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefix {
    given: PathBuf,
    real: PathBuf,
}

impl Prefix {
    fn new(given: PathBuf) -> Self {
        let real = resolve(&given).unwrap_or_else(|_| given.clone());
        Self { given, real }
    }
}

/// What a module may reach beyond its own memory. Granted and protected paths
/// are resolved once, when the grants are built (when the manifest is read), so
/// a check costs the resolution of the path checked only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    read_only_dirs: Vec<PathBuf>,
    device_paths: Vec<Prefix>,
    mount_paths: Vec<Prefix>,
    protected: Vec<Prefix>,
}

impl Default for Grants {
    fn default() -> Self {
        Self::new(
            Vec::new(),
            vec![PathBuf::from(DEFAULT_DEVICE_PATH)],
            Vec::new(),
        )
    }
}

/// What a host path in an allocation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathUse {
    /// A device node (`device-spec.host-path`).
    Device,
    /// A bind mount (`mount.host-path`).
    Mount,
}

impl PathUse {
    fn grant(self) -> &'static str {
        match self {
            PathUse::Device => "device-paths",
            PathUse::Mount => "mount-paths",
        }
    }
}

/// Why a host path may not be handed to a container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPathError {
    /// A part of it exists but cannot be resolved.
    #[error("`{path}` cannot be resolved: {cause}")]
    Unresolvable {
        /// The path.
        path: String,
        /// Why (a dangling symlink, a loop, no permission).
        cause: String,
    },
    /// It is, lies in or holds a protected path.
    #[error("{shown} is or holds the protected host path `{protected}`, which no grant reaches")]
    Protected {
        /// The path, and what it resolves to when that differs.
        shown: String,
        /// The protected path.
        protected: String,
    },
    /// It lies under no granted prefix.
    #[error(
        "{shown} is not under a host path the operator allowed ({granted}; the manifest's [grants] {grant} widens this)"
    )]
    NotGranted {
        /// The path, and what it resolves to when that differs.
        shown: String,
        /// The granted prefixes, or "none are granted".
        granted: String,
        /// The manifest key that grants more.
        grant: &'static str,
    },
}

impl Grants {
    /// Grants of `read_only_dirs` to read, and of `device_paths` and
    /// `mount_paths` as prefixes of what allocations may hand out; [`PROTECTED`]
    /// stays out of reach. Resolves the prefixes now.
    pub fn new(
        read_only_dirs: Vec<PathBuf>,
        device_paths: Vec<PathBuf>,
        mount_paths: Vec<PathBuf>,
    ) -> Self {
        Self {
            read_only_dirs,
            device_paths: device_paths.into_iter().map(Prefix::new).collect(),
            mount_paths: mount_paths.into_iter().map(Prefix::new).collect(),
            protected: PROTECTED
                .iter()
                .map(|p| Prefix::new(PathBuf::from(p)))
                .collect(),
        }
    }

    /// The grants with `dir` protected too (the kubelet directory).
    pub fn protecting(mut self, dir: &Path) -> Self {
        if !self.protected.iter().any(|p| p.given == dir) {
            self.protected.push(Prefix::new(dir.to_path_buf()));
        }
        self
    }

    /// Directories the guest may read (not write), each visible in the guest at
    /// the same path. Nothing outside them is reachable, through `..` or
    /// symlinks either.
    pub fn read_only_dirs(&self) -> &[PathBuf] {
        &self.read_only_dirs
    }

    /// Prefixes a device node's host path must lie under, as given.
    pub fn device_paths(&self) -> impl Iterator<Item = &Path> {
        self.device_paths.iter().map(|p| p.given.as_path())
    }

    /// Prefixes a mount's host path must lie under (none: no mounts), as given.
    pub fn mount_paths(&self) -> impl Iterator<Item = &Path> {
        self.mount_paths.iter().map(|p| p.given.as_path())
    }

    /// Paths handed out under no grant: [`PROTECTED`] and those added by
    /// [`Grants::protecting`].
    pub fn protected(&self) -> impl Iterator<Item = &Path> {
        self.protected.iter().map(|p| p.given.as_path())
    }

    /// Checks that `path` (absolute and normalised) may be handed to a
    /// container as `use_`: after resolving symlinks it lies under a granted
    /// prefix, and neither it nor anything it contains is protected. Returns
    /// the resolved path, which is what kubelet should be given: the runtime
    /// then opens what was checked, whatever the symlinks say later.
    ///
    /// Costs about two system calls per part of `path`; reads nothing.
    ///
    /// # Errors
    /// [`HostPathError`] naming the rule broken.
    pub fn check_host_path(&self, use_: PathUse, path: &str) -> Result<PathBuf, HostPathError> {
        let raw = Path::new(path);
        let resolved = resolve(raw).map_err(|e| HostPathError::Unresolvable {
            path: path.to_string(),
            cause: e.to_string(),
        })?;
        let shown = || {
            if resolved == raw {
                format!("`{path}`")
            } else {
                format!("`{path}` (resolves to `{}`)", resolved.display())
            }
        };
        for protected in &self.protected {
            let meets = |p: &Path| {
                [&protected.given, &protected.real]
                    .iter()
                    .any(|q| p.starts_with(q) || q.starts_with(p))
            };
            if meets(raw) || meets(&resolved) {
                return Err(HostPathError::Protected {
                    shown: shown(),
                    protected: protected.given.display().to_string(),
                });
            }
        }
        let prefixes = match use_ {
            PathUse::Device => &self.device_paths,
            PathUse::Mount => &self.mount_paths,
        };
        if prefixes.iter().any(|p| resolved.starts_with(&p.real)) {
            return Ok(resolved);
        }
        let granted = if prefixes.is_empty() {
            "none are granted".to_string()
        } else {
            let list: Vec<String> = prefixes
                .iter()
                .map(|p| format!("`{}`", p.given.display()))
                .collect();
            format!("granted: {}", list.join(", "))
        };
        Err(HostPathError::NotGranted {
            shown: shown(),
            granted,
            grant: use_.grant(),
        })
    }
}

/// `path` with every symlink resolved, as far as it exists: the longest existing
/// ancestor (found walking down, one `lstat` per part, stopping at the first
/// missing one) is resolved and the rest, which cannot hold symlinks as it does
/// not exist, appended. `path` must be absolute without `.` or `..` parts.
///
/// # Errors
/// A part exists but cannot be resolved: a dangling symlink, a loop, no
/// permission, a file where a directory should be.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut existing = PathBuf::new();
    let mut missing = PathBuf::new();
    for part in path.components() {
        if missing.as_os_str().is_empty() {
            let next = existing.join(part);
            match std::fs::symlink_metadata(&next) {
                Ok(_) => {
                    existing = next;
                    continue;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        missing.push(part);
    }
    let mut real = std::fs::canonicalize(&existing).map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{}` is a dangling symlink", existing.display()),
            )
        } else {
            err
        }
    })?;
    if !missing.as_os_str().is_empty() {
        real.push(missing);
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(dir: &Path) -> Grants {
        Grants::new(Vec::new(), vec![dir.join("dev")], vec![dir.join("opt")])
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("dev/fpga")).expect("dev");
        std::fs::create_dir_all(root.join("opt/lib")).expect("opt");
        std::fs::write(root.join("dev/fpga/port0"), "").expect("node");
        std::os::unix::fs::symlink("/etc", root.join("dev/etc-link")).expect("link");
        std::os::unix::fs::symlink(root.join("dev/fpga"), root.join("opt/fpga-link"))
            .expect("link");
        std::os::unix::fs::symlink(root.join("gone"), root.join("dev/dangling")).expect("link");
        dir
    }

    fn check(g: &Grants, use_: PathUse, path: &Path) -> Result<PathBuf, String> {
        g.check_host_path(use_, path.to_str().expect("utf-8"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn paths_under_a_granted_prefix_pass_as_they_resolve_existing_or_not() {
        let dir = tree();
        let g = grants(dir.path());
        let root = dir.path();
        let port = root.join("dev/fpga/port0");
        assert_eq!(check(&g, PathUse::Device, &port), Ok(port.clone()));
        let later = root.join("dev/not-yet/node");
        assert_eq!(check(&g, PathUse::Device, &later), Ok(later.clone()));
        let lib = root.join("opt/lib");
        assert_eq!(check(&g, PathUse::Mount, &lib), Ok(lib.clone()));
        // A symlink is judged, and handed out, as its target.
        assert!(check(&g, PathUse::Mount, &root.join("opt/fpga-link")).is_err());
        assert_eq!(
            check(&g, PathUse::Device, &root.join("opt/fpga-link/port0")),
            Ok(port)
        );
    }

    #[test]
    fn symlinks_out_of_the_prefix_dangling_or_through_files_are_refused() {
        let dir = tree();
        let g = grants(dir.path());
        let root = dir.path();
        let err = check(&g, PathUse::Device, &root.join("dev/etc-link")).expect_err("etc");
        assert!(err.contains("resolves to `/etc`"), "{err}");
        let err =
            check(&g, PathUse::Device, &root.join("dev/etc-link/passwd")).expect_err("passwd");
        assert!(err.contains("protected"), "{err}");
        let err = check(&g, PathUse::Device, &root.join("dev/dangling")).expect_err("dangling");
        assert!(err.contains("dangling"), "{err}");
        let err = check(&g, PathUse::Device, &root.join("dev/dangling/x")).expect_err("through it");
        assert!(err.contains("dangling"), "{err}");
        assert!(check(&g, PathUse::Device, &root.join("dev/fpga/port0/x")).is_err());
    }

    #[test]
    fn a_long_missing_tail_resolves_in_one_walk() {
        let dir = tree();
        let g = grants(dir.path());
        let deep: PathBuf = std::iter::once(dir.path().join("dev"))
            .chain(std::iter::repeat_n(PathBuf::from("a"), 2000))
            .collect();
        assert_eq!(check(&g, PathUse::Device, &deep), Ok(deep.clone()));
    }

    #[test]
    fn default_grants_allow_devices_under_dev_and_no_mounts() {
        let g = Grants::default().protecting(Path::new("/var/lib/kubelet/device-plugins"));
        assert_eq!(
            g.check_host_path(PathUse::Device, "/dev/null"),
            Ok(PathBuf::from("/dev/null"))
        );
        for (use_, path) in [
            (PathUse::Device, "/tmp/x"),
            (PathUse::Mount, "/dev/null"),
            (PathUse::Mount, "/opt"),
        ] {
            let err = g.check_host_path(use_, path).expect_err(path);
            assert!(matches!(err, HostPathError::NotGranted { .. }), "{err}");
        }
    }

    #[test]
    fn protected_paths_and_their_parents_are_refused_whatever_the_grants() {
        let g = Grants::new(Vec::new(), vec!["/".into()], vec!["/".into()])
            .protecting(Path::new("/srv/kubelet/plugins"));
        for path in [
            "/etc",
            "/etc/shadow",
            "/var/lib/kubelet",
            "/var/lib/kubelet/pods",
            "/var/lib",
            "/",
            "/dev/mem",
            "/srv/kubelet/plugins/kubelet.sock",
            "/srv",
        ] {
            let err = g.check_host_path(PathUse::Mount, path).expect_err(path);
            assert!(
                matches!(err, HostPathError::Protected { .. }),
                "{path}: {err}"
            );
        }
        assert_eq!(
            g.check_host_path(PathUse::Mount, "/opt/data"),
            Ok(PathBuf::from("/opt/data"))
        );
    }
}
