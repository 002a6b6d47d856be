//! The cluster's programs: the Go binaries built from the modules in `e2e/cluster/`
//! (cached under `target/e2e/bin/`, keyed by version and by the module's files), and the
//! Debian packages the node needs. Owns no running process.
//!
//! `cargo xtask test` builds two of them too ([`build_control_plane`]: kube-apiserver and
//! etcd, for the test crate's `ApiServer` fixture) into the same cache directory, so
//! whichever task runs first builds what they share and the other builds only the rest.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{output, root, run};

/// A Go module under `e2e/cluster/` and the commands built from it.
struct GoModule {
    /// Its directory under `e2e/cluster/`.
    dir: &'static str,
    /// The module whose version names the cache directory (as its `require` line says).
    versioned_by: &'static str,
    /// Prefix of the cache directory's name.
    cache_prefix: &'static str,
    /// Packages to build, each into a binary named after its last path element.
    packages: &'static [&'static str],
}

const KUBERNETES: GoModule = GoModule {
    dir: "kubernetes",
    versioned_by: "k8s.io/kubernetes",
    cache_prefix: "kubernetes",
    packages: &[
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-scheduler",
        "k8s.io/kubernetes/cmd/kubelet",
        "k8s.io/kubernetes/cmd/kubectl",
        "./etcd",
    ],
};

const CONTAINERD: GoModule = GoModule {
    dir: "containerd",
    versioned_by: "github.com/containerd/containerd/v2",
    cache_prefix: "containerd",
    packages: &[
        "github.com/containerd/containerd/v2/cmd/containerd",
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
        "github.com/containerd/containerd/v2/cmd/ctr",
    ],
};

/// `go build`'s flags (part of the cache key): no paths of this machine in the
/// binaries, no symbol tables (half the size).
const GO_BUILD_FLAGS: [&str; 2] = ["-trimpath", "-ldflags=-s -w"];
/// The GOFLAGS `go build` runs with (part of the cache key).
const GOFLAGS: &str = "-mod=readonly -buildvcs=false";

/// Debian packages the node needs, and a file each installs.
const PACKAGES: [(&str, &str); 3] = [
    // Debian's runc 1.1.5: the OCI runtime under containerd's shim.
    ("runc", "/usr/sbin/runc"),
    // bridge, host-local and loopback: the pod network.
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // A static busybox: the test pods' image.
    ("busybox-static", "/bin/busybox"),
];

/// Where Debian's CNI plugins are.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Debian's runc.
pub const RUNC: &str = "/usr/sbin/runc";
/// Debian's static busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// The directories holding the built programs.
pub struct Binaries {
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, etcd.
    pub kubernetes: PathBuf,
    /// containerd, containerd-shim-runc-v2, ctr.
    pub containerd: PathBuf,
    /// The Kubernetes version, e.g. `v1.35.4`.
    pub kubernetes_version: String,
    /// The containerd version, e.g. `v2.3.7`.
    pub containerd_version: String,
}

impl Binaries {
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }

    pub fn containerd(&self, name: &str) -> PathBuf {
        self.containerd.join(name)
    }
}

/// Installs the missing [`PACKAGES`] with apt-get.
pub fn ensure_packages() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("e2e: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .map_err(|e| {
        format!(
            "{e}\n(the node needs Debian's {}; install them by hand where apt-get is not available)",
            missing.join(", ")
        )
    })
}

/// Builds both modules' commands unless their cache directories hold them already.
pub fn build() -> Result<Binaries, String> {
    let (kubernetes, kubernetes_version) = build_module(&KUBERNETES, KUBERNETES.packages)?;
    let (containerd, containerd_version) = build_module(&CONTAINERD, CONTAINERD.packages)?;
    Ok(Binaries {
        kubernetes,
        containerd,
        kubernetes_version,
        containerd_version,
    })
}

/// The packages of [`KUBERNETES`] that [`build_control_plane`] builds.
const CONTROL_PLANE: [&str; 2] = ["k8s.io/kubernetes/cmd/kube-apiserver", "./etcd"];

/// The control plane the test crate's `ApiServer` fixture runs (no kubelet, no
/// scheduler), built into the e2e's cache unless it is there already: the paths of
/// kube-apiserver and etcd. A cold build takes minutes (kube-apiserver is most of
/// Kubernetes' shared packages); the e2e then builds only its other binaries.
pub fn build_control_plane() -> Result<(PathBuf, PathBuf), String> {
    let (dir, _) = build_module(&KUBERNETES, &CONTROL_PLANE)?;
    Ok((dir.join("kube-apiserver"), dir.join("etcd")))
}

/// Builds `wanted` (some of `module`'s packages) into
/// `target/e2e/bin/<prefix>-<version>/` with one `go build` (so shared packages compile
/// once), except those a stamp there records as built from the same module files.
/// Returns the directory and the version.
///
/// The stamp holds the key of the module files every binary in the directory was built
/// from: when the files change, the old binaries are deleted before anything is built,
/// so a directory never mixes builds of two versions.
fn build_module(module: &GoModule, wanted: &[&str]) -> Result<(PathBuf, String), String> {
    let dir = root().join("e2e/cluster").join(module.dir);
    let go_mod = read(&dir.join("go.mod"))?;
    let version = required_version(&go_mod, module.versioned_by).ok_or_else(|| {
        format!(
            "{} requires no version of {}",
            dir.join("go.mod").display(),
            module.versioned_by
        )
    })?;
    let out = root()
        .join("target/e2e/bin")
        .join(format!("{}-{version}", module.cache_prefix));
    let stamp = out.join(".stamp");
    let key = module_key(&dir)?;
    if !std::fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
        for package in module.packages {
            let stale = out.join(binary_name(package));
            if stale.exists() {
                std::fs::remove_file(&stale)
                    .map_err(|e| format!("cannot remove {}: {e}", stale.display()))?;
            }
        }
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !out.join(binary_name(p)).is_file())
        .collect();
    if missing.is_empty() {
        return Ok((out, version));
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let go = Command::new("go").arg("version").output().map_err(|e| {
        format!("the e2e builds Kubernetes and containerd with Go, and `go` cannot run: {e}")
    })?;
    eprintln!(
        "building {} of {} {version} into {} ({}; the first build takes several minutes)",
        missing
            .iter()
            .map(|p| binary_name(p))
            .collect::<Vec<_>>()
            .join(", "),
        module.dir,
        out.display(),
        String::from_utf8_lossy(&go.stdout).trim()
    );
    let started = std::time::Instant::now();
    let mut out_arg = out.clone().into_os_string();
    out_arg.push("/");
    run(Command::new("go")
        .current_dir(&dir)
        .arg("build")
        .args(GO_BUILD_FLAGS)
        .arg("-o")
        .arg(out_arg)
        .args(&missing)
        // go.mod and go.sum decide every dependency: a build never edits them. No VCS
        // stamp: the binaries are Kubernetes' and containerd's, not this repository's
        // (and a checkout owned by another user would make the stamp fail the build).
        .env("GOFLAGS", GOFLAGS)
        // The machine's own Go, never one a go.mod line would download.
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "1"))?;
    eprintln!(
        "built {} of {} {version} in {:.0?}",
        missing.len(),
        module.dir,
        started.elapsed()
    );
    std::fs::write(&stamp, key).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok((out, version))
}

/// The binary `go build -o DIR/` writes for `package`.
fn binary_name(package: &str) -> &str {
    package.rsplit('/').next().unwrap_or(package)
}

/// The version of `module` in a `go.mod`'s require lines.
fn required_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let line = line.trim().trim_start_matches("require").trim();
        let (name, rest) = line.split_once(char::is_whitespace)?;
        (name == module).then(|| rest.split_whitespace().next().unwrap_or("").to_string())
    })
}

/// A digest of everything in a module's directory that decides what it builds, and of
/// the Go that builds it.
fn module_key(dir: &Path) -> Result<String, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).map_err(|e| format!("cannot read {}: {e}", d.display()))?
        {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hash = Sha256::new();
    for file in &files {
        hash.update(
            file.strip_prefix(dir)
                .unwrap_or(file)
                .to_string_lossy()
                .as_bytes(),
        );
        hash.update(
            std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        );
    }
    hash.update(output(Command::new("go").arg("version"))?.as_bytes());
    hash.update(GO_BUILD_FLAGS.join(" ").as_bytes());
    hash.update(GOFLAGS.as_bytes());
    Ok(format!("{:x}\n", hash.finalize()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_version_reads_single_and_block_requires() {
        let go_mod = "module x\n\nrequire k8s.io/kubernetes v1.35.4\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.6.5\n\tk8s.io/api v0.0.0 // indirect\n)\n";
        assert_eq!(
            required_version(go_mod, "k8s.io/kubernetes").as_deref(),
            Some("v1.35.4")
        );
        assert_eq!(
            required_version(go_mod, "go.etcd.io/etcd/server/v3").as_deref(),
            Some("v3.6.5")
        );
        assert_eq!(required_version(go_mod, "k8s.io/kube"), None);
    }
}
