//! What the operator lets a module reach on the host, and the check of the host
//! paths a module hands to containers.
//!
//! A guest sees no host files unless its manifest grants read-only directories
//! (enforced by the runtime as WASI preopens). What it may make kubelet put into a
//! pod is checked here: a device node's host path must lie under `device-paths`
//! (default `/dev`), a mount's under `mount-paths` (default: none). The check is
//! made on the path with every symlink on the host resolved, so `/dev/x` pointing
//! at `/etc` is refused. Some paths are never handed out, whatever the grants say
//! ([`PROTECTED`] and the kubelet directory), and neither is any directory that
//! holds one of them.

use std::io;
use std::path::{Path, PathBuf};

/// Host paths no grant reaches: the node's configuration, the kernel's process
/// and memory interfaces, kubelet's state (pod volumes and secrets, the
/// device-plugin sockets). The `--kubelet-dir` is added to these at start.
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

/// What a module may reach beyond its own memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Host directories the guest may read (not write), each visible in the guest
    /// at the same path. Nothing outside them is reachable, through `..` or
    /// symlinks either.
    pub read_only_dirs: Vec<PathBuf>,
    /// Prefixes a device node's host path must lie under.
    pub device_paths: Vec<PathBuf>,
    /// Prefixes a mount's host path must lie under (none: no mounts).
    pub mount_paths: Vec<PathBuf>,
    /// Paths handed out under no grant: [`PROTECTED`] and the host's
    /// `--kubelet-dir`.
    pub protected: Vec<PathBuf>,
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            read_only_dirs: Vec::new(),
            device_paths: vec![PathBuf::from(DEFAULT_DEVICE_PATH)],
            mount_paths: Vec::new(),
            protected: PROTECTED.iter().map(PathBuf::from).collect(),
        }
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

impl Grants {
    /// The grants with `dir` protected too (the kubelet directory).
    pub fn protecting(mut self, dir: &Path) -> Self {
        if !self.protected.iter().any(|p| p == dir) {
            self.protected.push(dir.to_path_buf());
        }
        self
    }

    /// Checks that `path` (absolute and normalised) may be handed to a
    /// container as `use_`: after resolving symlinks it lies under a granted
    /// prefix, and neither it nor anything it contains is protected.
    ///
    /// Costs one `realpath` of the path and of each prefix: a few system calls,
    /// no reads.
    ///
    /// # Errors
    /// The rule broken, naming the resolved path when it differs.
    pub fn check_host_path(&self, use_: PathUse, path: &str) -> Result<(), String> {
        let raw = Path::new(path);
        let resolved = resolve(raw).map_err(|e| format!("`{path}` cannot be resolved: {e}"))?;
        let shown = if resolved == raw {
            format!("`{path}`")
        } else {
            format!("`{path}` (resolves to `{}`)", resolved.display())
        };
        for protected in &self.protected {
            let real = resolve(protected).unwrap_or_else(|_| protected.clone());
            let inside = |p: &Path| p.starts_with(protected) || p.starts_with(&real);
            let holds = |p: &Path| protected.starts_with(p) || real.starts_with(p);
            if inside(raw) || inside(&resolved) || holds(raw) || holds(&resolved) {
                return Err(format!(
                    "{shown} is or holds the protected host path `{}`, which no grant reaches",
                    protected.display()
                ));
            }
        }
        let prefixes = match use_ {
            PathUse::Device => &self.device_paths,
            PathUse::Mount => &self.mount_paths,
        };
        let allowed = prefixes.iter().any(|prefix| {
            let real = resolve(prefix).unwrap_or_else(|_| prefix.clone());
            resolved.starts_with(&real)
        });
        if allowed {
            return Ok(());
        }
        let granted = if prefixes.is_empty() {
            "none are granted".to_string()
        } else {
            let list: Vec<String> = prefixes
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect();
            format!("granted: {}", list.join(", "))
        };
        Err(format!(
            "{shown} is not under a host path the operator allowed ({granted}; the manifest's [grants] {} widens this)",
            use_.grant()
        ))
    }
}

/// `path` with every symlink resolved, as far as it exists: the longest existing
/// ancestor is resolved and the rest (which cannot hold symlinks, as it does not
/// exist) appended. `path` must be absolute without `.` or `..` parts.
///
/// # Errors
/// A part exists but cannot be resolved: a dangling symlink, a loop, no
/// permission.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut existing = path;
    let mut missing = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut real) => {
                real.extend(missing.iter().rev());
                return Ok(real);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(existing).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("`{}` is a dangling symlink", existing.display()),
                    ));
                }
                match (existing.parent(), existing.file_name()) {
                    (Some(parent), Some(name)) => {
                        missing.push(name);
                        existing = parent;
                    }
                    _ => return Ok(path.to_path_buf()),
                }
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(dir: &Path) -> Grants {
        Grants {
            device_paths: vec![dir.join("dev")],
            mount_paths: vec![dir.join("opt")],
            ..Grants::default()
        }
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

    fn check(g: &Grants, use_: PathUse, path: &Path) -> Result<(), String> {
        g.check_host_path(use_, path.to_str().expect("utf-8"))
    }

    #[test]
    fn paths_under_a_granted_prefix_pass_existing_or_not() {
        let dir = tree();
        let g = grants(dir.path());
        let root = dir.path();
        assert_eq!(
            check(&g, PathUse::Device, &root.join("dev/fpga/port0")),
            Ok(())
        );
        assert_eq!(
            check(&g, PathUse::Device, &root.join("dev/not-yet")),
            Ok(())
        );
        assert_eq!(check(&g, PathUse::Mount, &root.join("opt/lib")), Ok(()));
        // A symlink whose target is under another allowed prefix is judged by
        // its target.
        assert!(check(&g, PathUse::Mount, &root.join("opt/fpga-link")).is_err());
        assert_eq!(
            check(&g, PathUse::Device, &root.join("opt/fpga-link")),
            Ok(())
        );
    }

    #[test]
    fn symlinks_out_of_the_prefix_are_refused() {
        let dir = tree();
        let g = grants(dir.path());
        let err = check(&g, PathUse::Device, &dir.path().join("dev/etc-link")).expect_err("etc");
        assert!(err.contains("resolves to `/etc`"), "{err}");
        let err = check(&g, PathUse::Device, &dir.path().join("dev/etc-link/passwd"))
            .expect_err("etc/passwd");
        assert!(err.contains("protected"), "{err}");
        let err =
            check(&g, PathUse::Device, &dir.path().join("dev/dangling")).expect_err("dangling");
        assert!(err.contains("dangling"), "{err}");
    }

    #[test]
    fn default_grants_allow_devices_under_dev_and_no_mounts() {
        let g = Grants::default().protecting(Path::new("/var/lib/kubelet/device-plugins"));
        assert_eq!(g.check_host_path(PathUse::Device, "/dev/null"), Ok(()));
        for (use_, path) in [
            (PathUse::Device, "/tmp/x"),
            (PathUse::Mount, "/dev/null"),
            (PathUse::Mount, "/opt"),
        ] {
            let err = g.check_host_path(use_, path).expect_err(path);
            assert!(err.contains("not under a host path"), "{err}");
        }
    }

    #[test]
    fn protected_paths_and_their_parents_are_refused_whatever_the_grants() {
        let g = Grants {
            device_paths: vec![PathBuf::from("/")],
            mount_paths: vec![PathBuf::from("/")],
            ..Grants::default()
        }
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
            assert!(err.contains("protected"), "{path}: {err}");
        }
        assert_eq!(g.check_host_path(PathUse::Mount, "/opt/data"), Ok(()));
    }
}
