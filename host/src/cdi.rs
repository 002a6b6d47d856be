//! Container Device Interface (CDI) specs: what the host writes so that a
//! container runtime can resolve the CDI names a resource's allocations carry.
//!
//! Owns three things, all in domain terms (no protocol type, no registry type,
//! so the DRA frontend can write its claims' specs with it too):
//!
//! - **names**: the CDI kind of a resource ([`kind`]), the CDI device name of a
//!   device id ([`device_name`]) and the syntax of fully qualified names
//!   ([`is_qualified_name`]), as the runtimes' CDI parser
//!   (container-device-interface `pkg/parser`) accepts them;
//! - **specs**: [`build`] turns a resource's devices and what each one's
//!   container needs into one [`Spec`] value and the CDI name of every device in
//!   it; [`substitute`] turns an allocation into one that names the CDI devices
//!   instead of carrying their device nodes and mounts again;
//! - **files**: [`CdiDir`] writes a spec as a careful daemon does (a temporary
//!   file renamed into place, mode 0644), removes it, and sweeps the specs an
//!   earlier run left behind. Only files with both of this host's marks are ever
//!   touched: the file name prefix [`FILE_PREFIX`] and the spec annotation
//!   [`OWNER_ANNOTATION`].
//!
//! # The name mapping
//!
//! A device id that is a valid CDI device name without `:` (1 or more of
//! `[A-Za-z0-9_.-]`, starting and ending with a letter or digit) is its own
//! name: `ttyUSB0`, `0000:3b:00.0` is not (`:`), `gpu-1` is. Any other id is
//! mapped: each character outside `[A-Za-z0-9_.-]` becomes `_`, leading and
//! trailing characters other than letters and digits are dropped, and `-` and
//! the first 8 hex digits of the SHA-256 of the whole id are appended
//! (`/node1/dev1/1` → `node1_dev1_1-<8 hex>`; an id with nothing left is
//! `dev-<8 hex>`). The mapping depends on the id alone, so a device keeps its
//! name across rescans and host restarts. The suffix keeps ids that sanitize
//! alike apart; should two devices of one resource still end up with one name
//! (a hash collision, or an id chosen to equal another's mapped name),
//! [`build`] refuses the resource rather than merge them.
//!
//! `:` is left out of names (the parser takes it, the spec's text does not).
//!
//! # Spec version
//!
//! [`SPEC_VERSION`] is 0.6.0: the lowest version that allows the fields used
//! (spec annotations and dots in the class, 0.6.0; `hostPath` of device nodes
//! and names starting with a digit, 0.5.0; a mount `type`, 0.4.0), computed by
//! the rules of the CDI library's `MinimumRequiredVersion`. The newest version
//! every containerd 2.x and CRI-O since 1.31 reads is 0.8.0 (they vendor CDI
//! library 0.8); 0.7.0 and 0.8.0 add nothing used here, and 0.6.0 is read by
//! containerd 1.7 too (it vendors CDI library 0.7).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{ContainerAllocation, ResourceName};

/// The CDI spec version written (see the module doc).
pub const SPEC_VERSION: &str = "0.6.0";
/// Every spec file this host writes is named `<FILE_PREFIX><resource>.json`,
/// the resource name made file-safe (`wasm-device-plugin_example.com_dev-1.json`).
pub const FILE_PREFIX: &str = "wasm-device-plugin_";
/// The spec annotation that marks a spec as this host's; its value is the
/// resource name.
pub const OWNER_ANNOTATION: &str = "wasm-device-plugin/resource";
/// The CDI spec directory of `run` by default (the runtimes' default dynamic
/// directory).
pub const DEFAULT_DIR: &str = "/var/run/cdi";

/// Why a resource's spec cannot be built, written or removed.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// The resource name is not a CDI kind (vendor and class must start with a
    /// letter and be at least 2 characters).
    #[error(
        "resource {resource}: the name is not a valid CDI kind (vendor and class must each be 2 or more of [A-Za-z0-9_.-], starting with a letter and ending with a letter or digit)"
    )]
    Kind {
        /// The resource.
        resource: String,
    },
    /// Two devices of one resource map to one CDI device name.
    #[error(
        "resource {resource}: devices `{first}` and `{second}` both map to the CDI device name `{name}`"
    )]
    NameCollision {
        /// The resource.
        resource: String,
        /// The device that had the name first.
        first: String,
        /// The device that maps to it too.
        second: String,
        /// The name.
        name: String,
    },
    /// The spec file could not be written.
    #[error("cannot write CDI spec {}: {cause} (is --cdi-dir an existing, writable directory?)", path.display())]
    Write {
        /// The file (or the directory, when that is what failed).
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The spec file could not be removed.
    #[error("cannot remove CDI spec {}: {cause}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

/// A CDI spec, as written: the fields of the CDI JSON specification this host
/// uses, in its spelling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// [`SPEC_VERSION`].
    pub cdi_version: String,
    /// `vendor/class`: the resource name ([`kind`]).
    pub kind: String,
    /// [`OWNER_ANNOTATION`] → the resource name.
    pub annotations: BTreeMap<String, String>,
    /// One per device with something to inject, in device order.
    pub devices: Vec<SpecDevice>,
}

/// One CDI device of a [`Spec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDevice {
    /// The device's CDI name ([`device_name`]).
    pub name: String,
    /// What a container given the device gets.
    pub container_edits: ContainerEdits,
}

/// The container edits of one CDI device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    /// `NAME=value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNodeEdit>,
    /// Bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountEdit>,
}

/// A device node edit. Type and major/minor numbers are left to the runtime,
/// which reads them from `host_path` when it creates the container, so a spec
/// never goes stale when a node is re-created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNodeEdit {
    /// Where the container sees it.
    pub path: String,
    /// The node on the host (symlinks resolved, as the output policy hands it out).
    pub host_path: String,
    /// cgroup permissions (`r`, `w`, `m`).
    pub permissions: String,
}

/// A mount edit: always a recursive, private bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountEdit {
    /// The host path (symlinks resolved).
    pub host_path: String,
    /// Where the container sees it.
    pub container_path: String,
    /// `bind`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `rbind`, `rprivate`, and `ro` for a read-only mount.
    pub options: Vec<String>,
}

/// Per device id, its fully qualified CDI name (`vendor/class=name`), for the
/// devices a spec holds.
pub type CdiNames = HashMap<String, String>;

/// A resource's spec and the names of its devices in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// The spec; `None` when no device has anything to inject (CDI does not
    /// allow a device without edits, nor a spec without devices).
    pub spec: Option<Spec>,
    /// Per device in the spec, its qualified name.
    pub names: CdiNames,
}

/// The part of a device's checked allocation that a device-plugin resource's
/// spec carries: its device nodes and mounts. Environment variables and
/// annotations stay in the Allocate answer: the host's merge joins a variable
/// that several devices of one container set (`A=x,y`), which per-device CDI
/// edits cannot express (each would replace the other), and annotations are
/// not container edits at all.
pub fn device_plugin_edits(allocation: &ContainerAllocation) -> ContainerAllocation {
    ContainerAllocation {
        devices: allocation.devices.clone(),
        mounts: allocation.mounts.clone(),
        ..ContainerAllocation::default()
    }
}

/// The container edits of `allocation`: its env, device nodes and mounts, in order.
pub fn edits(allocation: &ContainerAllocation) -> ContainerEdits {
    ContainerEdits {
        env: allocation
            .envs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        device_nodes: allocation
            .devices
            .iter()
            .map(|d| DeviceNodeEdit {
                path: d.container_path.clone(),
                host_path: d.host_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: allocation
            .mounts
            .iter()
            .map(|m| {
                let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
                if m.read_only {
                    options.push("ro".into());
                }
                MountEdit {
                    host_path: m.host_path.clone(),
                    container_path: m.container_path.clone(),
                    kind: "bind".into(),
                    options,
                }
            })
            .collect(),
    }
}

impl ContainerEdits {
    /// Whether there is nothing to inject.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.device_nodes.is_empty() && self.mounts.is_empty()
    }
}

/// The CDI kind of `resource`: the resource name itself (`example.com/dev-1`),
/// its domain the vendor and its name the class.
///
/// # Errors
/// [`CdiError::Kind`]: a resource name may start with a digit or have a
/// one-character part, which CDI kinds may not.
pub fn kind(resource: &ResourceName) -> Result<String, CdiError> {
    let kind = resource.as_str();
    if is_qualified_name(&format!("{kind}=x")) {
        Ok(kind.to_string())
    } else {
        Err(CdiError::Kind {
            resource: kind.to_string(),
        })
    }
}

/// The CDI device name of device `id` (see the module doc).
pub fn device_name(id: &str) -> String {
    if is_plain_name(id) {
        return id.to_string();
    }
    let sanitized: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = sanitized.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let base = if trimmed.is_empty() { "dev" } else { trimmed };
    let digest = Sha256::digest(id.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{base}-{hash}")
}

/// A name the mapping keeps: `[A-Za-z0-9_.-]+`, starting and ending
/// alphanumeric.
fn is_plain_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A fully qualified CDI device name as the runtime's CDI parser
/// (container-device-interface `pkg/parser`) accepts it: `vendor/class=name`, each
/// part made of `[A-Za-z0-9_.-]` (the name may also hold `:`) and ending with a
/// letter or digit; vendor and class start with a letter, the name with a letter or
/// digit. Vendor and class need two characters: that parser slices `[1:len-1]`,
/// which panics on one.
pub fn is_qualified_name(s: &str) -> bool {
    let Some((kind, name)) = s.split_once('=') else {
        return false;
    };
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    let part = |p: &str, min: usize, first: fn(&u8) -> bool, extra: &[u8]| {
        let b = p.as_bytes();
        b.len() >= min
            && b.first().is_some_and(first)
            && b.last().is_some_and(u8::is_ascii_alphanumeric)
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c) || extra.contains(c))
    };
    part(vendor, 2, u8::is_ascii_alphabetic, b"")
        && part(class, 2, u8::is_ascii_alphabetic, b"")
        && part(name, 1, u8::is_ascii_alphanumeric, b":")
}

/// The spec of `resource` holding `devices`: (id, what a container given the
/// device gets from the spec), in order. A device with nothing to inject gets
/// no CDI device (and no name).
///
/// # Errors
/// [`CdiError::Kind`] or [`CdiError::NameCollision`].
pub fn build<'a>(
    resource: &ResourceName,
    devices: impl IntoIterator<Item = (&'a str, &'a ContainerAllocation)>,
) -> Result<ResourceSpec, CdiError> {
    let kind = kind(resource)?;
    let mut names = CdiNames::new();
    let mut owners: HashMap<String, &str> = HashMap::new();
    let mut spec_devices = Vec::new();
    for (id, allocation) in devices {
        let container_edits = edits(allocation);
        if container_edits.is_empty() {
            continue;
        }
        let name = device_name(id);
        if let Some(first) = owners.insert(name.clone(), id) {
            return Err(CdiError::NameCollision {
                resource: resource.to_string(),
                first: first.to_string(),
                second: id.to_string(),
                name,
            });
        }
        names.insert(id.to_string(), format!("{kind}={name}"));
        spec_devices.push(SpecDevice {
            name,
            container_edits,
        });
    }
    let spec = (!spec_devices.is_empty()).then(|| Spec {
        cdi_version: SPEC_VERSION.to_string(),
        kind,
        annotations: [(OWNER_ANNOTATION.to_string(), resource.to_string())].into(),
        devices: spec_devices,
    });
    Ok(ResourceSpec { spec, names })
}

/// Rewrites one container's allocation to use CDI: each of `devices` (id,
/// what its CDI device injects) that has a name in `names` is named once in
/// `cdi_devices`, and the allocation's device nodes and mounts at a container
/// path those CDI devices fill are dropped (the runtime would replace them
/// with the spec's anyway; kubelet is never sent both). Environment variables,
/// annotations and the CDI names the module gave itself are kept.
pub fn substitute<'a>(
    allocation: &mut ContainerAllocation,
    devices: impl IntoIterator<Item = (&'a str, Option<&'a ContainerAllocation>)>,
    names: &CdiNames,
) {
    let mut nodes: HashSet<&str> = HashSet::new();
    let mut mounts: HashSet<&str> = HashSet::new();
    for (id, injected) in devices {
        let Some(name) = names.get(id) else { continue };
        if !allocation.cdi_devices.contains(name) {
            allocation.cdi_devices.push(name.clone());
        }
        if let Some(injected) = injected {
            nodes.extend(injected.devices.iter().map(|d| d.container_path.as_str()));
            mounts.extend(injected.mounts.iter().map(|m| m.container_path.as_str()));
        }
    }
    allocation
        .devices
        .retain(|d| !nodes.contains(d.container_path.as_str()));
    allocation
        .mounts
        .retain(|m| !mounts.contains(m.container_path.as_str()));
}

/// The file name prefix of the specs written per DRA claim. Not
/// [`FILE_PREFIX`]: the start-up sweep leaves these alone, because a claim's
/// spec belongs to the claim (the DRA frontend's checkpoint), not to a
/// resource, and lives until kubelet unprepares the claim.
pub const CLAIM_FILE_PREFIX: &str = "wasm-device-plugin-claim_";

/// The annotation naming the claim (its UID) a claim spec was written for.
pub const CLAIM_ANNOTATION: &str = "wasm-device-plugin/claim";

/// The CDI kind of the specs of DRA driver `driver`'s claims: `<driver>/claim`.
///
/// # Errors
/// The driver name does not make a CDI vendor (it must start with a letter);
/// says so.
pub fn claim_kind(driver: &str) -> Result<String, String> {
    let kind = format!("{driver}/claim");
    if is_qualified_name(&format!("{kind}=x")) {
        Ok(kind)
    } else {
        Err(format!(
            "DRA driver `{driver}` cannot be a CDI vendor (it must start with a letter); choose another `driver`"
        ))
    }
}

/// The spec of one prepared DRA claim: kind [`claim_kind`], one CDI device per
/// (name, edits) in `devices` with something to inject, marked with the
/// claim's UID. `None` when nothing has edits (CDI allows no empty spec).
pub fn claim_spec(
    kind: &str,
    claim_uid: &str,
    devices: impl IntoIterator<Item = (String, ContainerEdits)>,
) -> Option<Spec> {
    let devices: Vec<SpecDevice> = devices
        .into_iter()
        .filter(|(_, edits)| !edits.is_empty())
        .map(|(name, container_edits)| SpecDevice {
            name,
            container_edits,
        })
        .collect();
    (!devices.is_empty()).then(|| Spec {
        cdi_version: SPEC_VERSION.to_string(),
        kind: kind.to_string(),
        annotations: [(CLAIM_ANNOTATION.to_string(), claim_uid.to_string())].into(),
        devices,
    })
}

/// The file name of the spec of claim `claim_uid` of driver `driver`.
pub fn claim_file_name(driver: &str, claim_uid: &str) -> String {
    let safe: String = claim_uid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{CLAIM_FILE_PREFIX}{driver}_{safe}.json")
}

/// The CDI spec directory, and the specs this host has written to it since
/// it started.
#[derive(Debug)]
pub struct CdiDir {
    dir: PathBuf,
    /// File names of the specs written by this process and not removed since:
    /// the sweep leaves these alone.
    written: Mutex<HashSet<String>>,
}

impl CdiDir {
    /// The directory `dir` (not created: a missing directory is the operator's
    /// to fix, and each write says so).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            written: Mutex::new(HashSet::new()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The spec file of `resource`.
    pub fn path_of(&self, resource: &ResourceName) -> PathBuf {
        self.dir.join(file_name(resource))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes (or, with `None`, removes) the spec of `resource`; returns the
    /// file written. The spec goes to a hidden temporary file beside it (a name
    /// no runtime reads: not `*.json`), mode 0644, synced, then renamed over
    /// the file: a runtime reading the directory sees the old spec or the new
    /// one, never part of one. Writing the same bytes again does nothing.
    ///
    /// # Errors
    /// [`CdiError::Write`] or [`CdiError::Remove`]; the file is as it was.
    pub fn write(
        &self,
        resource: &ResourceName,
        spec: Option<&Spec>,
    ) -> Result<Option<PathBuf>, CdiError> {
        let Some(spec) = spec else {
            self.remove(resource)?;
            return Ok(None);
        };
        self.write_file(file_name(resource), spec).map(Some)
    }

    /// Writes `spec` to the file `name` in the directory, as [`CdiDir::write`]
    /// does; returns the file written.
    ///
    /// # Errors
    /// [`CdiError::Write`]; the file is as it was.
    pub fn write_file(&self, name: String, spec: &Spec) -> Result<PathBuf, CdiError> {
        let path = self.dir.join(&name);
        let mut bytes = serde_json::to_vec_pretty(spec).map_err(|e| CdiError::Write {
            path: path.clone(),
            cause: e.into(),
        })?;
        bytes.push(b'\n');
        let mut written = self.written();
        if written.contains(&name) && std::fs::read(&path).is_ok_and(|current| current == bytes) {
            return Ok(path);
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            // The umask may have taken bits off the mode asked for.
            file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(cause) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(CdiError::Write { path, cause });
        }
        written.insert(name);
        Ok(path)
    }

    /// Removes the spec of `resource`, if there is one.
    ///
    /// # Errors
    /// [`CdiError::Remove`]: it exists and cannot be removed.
    pub fn remove(&self, resource: &ResourceName) -> Result<(), CdiError> {
        self.remove_file(&file_name(resource))
    }

    /// Removes the file `name` from the directory, if it is there.
    ///
    /// # Errors
    /// [`CdiError::Remove`]: it exists and cannot be removed.
    pub fn remove_file(&self, name: &str) -> Result<(), CdiError> {
        let path = self.dir.join(name);
        let mut written = self.written();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(cause) => return Err(CdiError::Remove { path, cause }),
        }
        written.remove(name);
        Ok(())
    }

    /// Removes every spec an earlier run of this host wrote that this run has
    /// not written (so serves no more), and temporary files it left; returns
    /// what it removed. A file counts as ours only with both marks: the name
    /// ([`FILE_PREFIX`]`*.json`, or `.`[`FILE_PREFIX`]`*.json.tmp`) and, for a
    /// spec, the [`OWNER_ANNOTATION`] in it; anything else (another vendor's
    /// spec, a symlink, a directory, a file that does not parse) is left alone.
    ///
    /// # Errors
    /// The directory cannot be listed.
    pub fn sweep(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else { continue };
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let ours = if let Some(spec) = name.strip_prefix(FILE_PREFIX) {
                spec.ends_with(".json") && is_marked(&path)
            } else {
                name.strip_prefix('.')
                    .and_then(|n| n.strip_prefix(FILE_PREFIX))
                    .is_some_and(|n| n.ends_with(".json.tmp"))
            };
            // Held while removing, so a spec being written now is never taken.
            let written = self.written();
            if !ours || written.contains(&name) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "cannot remove a stale CDI spec")
                }
            }
        }
        Ok(removed)
    }
}

/// `<FILE_PREFIX><resource, file-safe>.json`.
fn file_name(resource: &ResourceName) -> String {
    format!("{FILE_PREFIX}{}.json", resource.file_safe())
}

/// Whether the file at `path` is a spec carrying [`OWNER_ANNOTATION`].
fn is_marked(path: &Path) -> bool {
    #[derive(Deserialize)]
    struct Marks {
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Marks>(&bytes).ok())
        .is_some_and(|m| m.annotations.contains_key(OWNER_ANNOTATION))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeviceNode, Mount};

    fn resource(name: &str) -> ResourceName {
        ResourceName::parse(name).expect("valid")
    }

    fn with_node(host: &str, container: &str) -> ContainerAllocation {
        ContainerAllocation {
            devices: vec![DeviceNode {
                host_path: host.into(),
                container_path: container.into(),
                permissions: "rw".into(),
            }],
            ..ContainerAllocation::default()
        }
    }

    #[test]
    fn valid_ids_are_their_own_names() {
        for id in ["ttyUSB0", "gpu-1", "a", "0", "GPU_0.1"] {
            assert_eq!(device_name(id), id);
        }
    }

    #[test]
    fn other_ids_are_sanitized_with_a_stable_hash() {
        let name = device_name("/node1/dev1/1");
        assert!(name.starts_with("node1_dev1_1-"), "{name}");
        assert_eq!(name.len(), "node1_dev1_1-".len() + 8);
        // Stable: the same id, the same name, always.
        assert_eq!(device_name("/node1/dev1/1"), name);
        // Ids that sanitize alike stay apart.
        assert_ne!(device_name("snd/pcm"), device_name("snd:pcm"));
        assert!(device_name("snd/pcm").starts_with("snd_pcm-"));
        assert!(device_name("0000:3b:00.0").starts_with("0000_3b_00.0-"));
        // Nothing usable left: a fixed stem.
        assert!(device_name("///").starts_with("dev-"));
        assert!(device_name("-x-").starts_with("x-"));
        for id in ["/node1/dev1/1", "a b", "é", "::", "-", "x::0", "ab/"] {
            let name = device_name(id);
            assert!(is_plain_name(&name), "{id} -> {name}");
            assert!(
                is_qualified_name(&format!("example.com/dev={name}")),
                "{id} -> {name}"
            );
        }
    }

    #[test]
    fn kinds_are_resource_names_cdi_accepts() {
        assert_eq!(
            kind(&resource("example.com/dev-1")).expect("kind"),
            "example.com/dev-1"
        );
        assert_eq!(
            kind(&resource("fpga.intel.com/region-ce48")).expect("kind"),
            "fpga.intel.com/region-ce48"
        );
        for bad in [
            "1vendor.com/gpu",
            "example.com/1gpu",
            "a/gpu",
            "example.com/g",
        ] {
            assert!(
                matches!(kind(&resource(bad)), Err(CdiError::Kind { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn build_names_each_device_with_edits() {
        let a = with_node("/dev/null", "/dev/a");
        let nothing = ContainerAllocation::default();
        let env_only = ContainerAllocation {
            envs: [("X".to_string(), "1".to_string())].into(),
            ..ContainerAllocation::default()
        };
        let built = build(
            &resource("example.com/dev"),
            [
                ("/n/a", &a),
                ("b", &nothing),
                ("c", &device_plugin_edits(&env_only)),
            ],
        )
        .expect("spec");
        let spec = built.spec.expect("a device has edits");
        assert_eq!(spec.cdi_version, SPEC_VERSION);
        assert_eq!(spec.kind, "example.com/dev");
        assert_eq!(spec.annotations[OWNER_ANNOTATION], "example.com/dev");
        assert_eq!(spec.devices.len(), 1);
        let name = device_name("/n/a");
        assert_eq!(spec.devices[0].name, name);
        assert_eq!(
            spec.devices[0].container_edits.device_nodes,
            [DeviceNodeEdit {
                path: "/dev/a".into(),
                host_path: "/dev/null".into(),
                permissions: "rw".into()
            }]
        );
        assert_eq!(built.names.len(), 1);
        assert_eq!(built.names["/n/a"], format!("example.com/dev={name}"));
        assert!(is_qualified_name(&built.names["/n/a"]));

        let none = build(&resource("example.com/dev"), [("b", &nothing)]).expect("built");
        assert_eq!(none.spec, None);
        assert!(none.names.is_empty());
    }

    #[test]
    fn build_refuses_two_devices_with_one_name() {
        let a = with_node("/dev/null", "/dev/a");
        let mapped = device_name("/x");
        let err = build(
            &resource("example.com/dev"),
            [("/x", &a), (mapped.as_str(), &a)],
        )
        .expect_err("collision");
        assert!(matches!(err, CdiError::NameCollision { .. }), "{err}");
    }

    #[test]
    fn mounts_are_private_recursive_binds() {
        let a = ContainerAllocation {
            mounts: vec![Mount {
                host_path: "/opt/lib".into(),
                container_path: "/usr/lib/x".into(),
                read_only: true,
            }],
            ..ContainerAllocation::default()
        };
        let e = edits(&a);
        assert_eq!(e.mounts[0].kind, "bind");
        assert_eq!(e.mounts[0].options, ["rbind", "rprivate", "ro"]);
    }

    #[test]
    fn substitute_names_devices_once_and_drops_what_the_spec_injects() {
        let a = with_node("/dev/null", "/dev/a");
        let b = with_node("/dev/zero", "/dev/b");
        let names: CdiNames = [("a".to_string(), "example.com/dev=a".to_string())].into();
        let mut allocation = ContainerAllocation {
            envs: [("A".to_string(), "1".to_string())].into(),
            devices: vec![a.devices[0].clone(), b.devices[0].clone()],
            cdi_devices: vec!["vendor.com/other=x".into()],
            ..ContainerAllocation::default()
        };
        substitute(
            &mut allocation,
            [("a", Some(&a)), ("b", Some(&b)), ("a", Some(&a))],
            &names,
        );
        assert_eq!(
            allocation.cdi_devices,
            ["vendor.com/other=x", "example.com/dev=a"]
        );
        assert_eq!(allocation.devices, b.devices, "b has no CDI device");
        assert_eq!(allocation.envs.len(), 1);
    }

    #[test]
    fn qualified_names_follow_the_cdi_parser() {
        for name in [
            "A/0=0",
            "-/-=-",
            ".vendor/class=x",
            "vendor./class=x",
            "vendor/1class=x",
            "vendor/class=-x",
            "vendor/class=x:",
            "v/class=x",
            "vendor/c=x",
        ] {
            assert!(!is_qualified_name(name), "{name} accepted");
        }
        for name in [
            "vendor.com/class=dev0",
            "nvidia.com/gpu=0",
            "intel.com/fpga=region:0",
            "ab/c_d=e",
        ] {
            assert!(is_qualified_name(name), "{name} refused");
        }
    }

    fn spec_for(resource_name: &str) -> Spec {
        let a = with_node("/dev/null", "/dev/a");
        build(&resource(resource_name), [("a", &a)])
            .expect("built")
            .spec
            .expect("spec")
    }

    #[test]
    fn writes_are_atomic_0644_and_removable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cdi = CdiDir::new(dir.path());
        let r = resource("example.com/dev");
        let spec = spec_for("example.com/dev");
        let path = cdi
            .write(&r, Some(&spec))
            .expect("written")
            .expect("a file");
        assert_eq!(
            path,
            dir.path().join("wasm-device-plugin_example.com_dev.json")
        );
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let back: Spec =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(back, spec);
        // No temporary file is left.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        cdi.write(&r, None).expect("removed");
        assert!(!path.exists());
        cdi.remove(&r).expect("removing nothing is fine");
    }

    #[test]
    fn a_missing_or_unusable_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("file");
        let r = resource("example.com/dev");
        let spec = spec_for("example.com/dev");
        for bad in [dir.path().join("missing"), file.join("below")] {
            let err = CdiDir::new(&bad).write(&r, Some(&spec)).expect_err("fails");
            assert!(matches!(err, CdiError::Write { .. }), "{err}");
        }
    }

    #[test]
    fn sweep_removes_only_our_stale_specs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let earlier = CdiDir::new(dir.path());
        let (kept, stale) = (resource("example.com/kept"), resource("example.com/stale"));
        earlier
            .write(&kept, Some(&spec_for("example.com/kept")))
            .expect("written");
        earlier
            .write(&stale, Some(&spec_for("example.com/stale")))
            .expect("written");
        let foreign = dir.path().join("nvidia.com-gpu.json");
        std::fs::write(
            &foreign,
            r#"{"cdiVersion":"0.6.0","kind":"nvidia.com/gpu","devices":[]}"#,
        )
        .expect("foreign");
        // Our prefix without our annotation: not ours either.
        let lookalike = dir.path().join(format!("{FILE_PREFIX}x.json"));
        std::fs::write(&lookalike, r#"{"kind":"x/y"}"#).expect("lookalike");
        let tmp = dir.path().join(format!(".{FILE_PREFIX}x.json.tmp"));
        std::fs::write(&tmp, "partial").expect("tmp");

        // A new run that serves `kept` again.
        let now = CdiDir::new(dir.path());
        now.write(&kept, Some(&spec_for("example.com/kept")))
            .expect("written");
        let mut removed = now.sweep().expect("swept");
        removed.sort();
        assert_eq!(removed, [tmp.clone(), now.path_of(&stale)]);
        assert!(now.path_of(&kept).exists());
        assert!(foreign.exists() && lookalike.exists());
    }
}
