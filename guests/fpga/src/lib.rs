//! FPGA accelerators driven by Linux's DFL driver, served the way Intel's FPGA device
//! plugin serves them (`intel/intel-device-plugins-for-kubernetes`, `cmd/fpga_plugin`).
//!
//! # What it reads
//!
//! The DFL sysfs tree, read-only (the operator grants it in the manifest):
//!
//! ```text
//! <sysfs-root>/regionN/                               one FPGA card (on a node, a symlink into /sys/devices)
//!   dfl-fme.M/dfl-fme-region.K/fpga_region/regionJ/compat_id   its interface id
//!   dfl-port.P/afu_id                                 the accelerator function loaded behind port P
//! <dev-root>/dfl-fme.M, <dev-root>/dfl-port.P         their device nodes
//! ```
//!
//! Ids are 128-bit, printed by the driver as 32 hex digits (read case-insensitively,
//! used in lower case). The FME's own partial-reconfiguration region is an
//! `fpga_region` too (`regionJ` above also appears in `<sysfs-root>`); an entry with
//! neither an FME nor a port is such a region and is passed over quietly.
//!
//! Configuration (all optional):
//! - `mode`: `af` (default, as Intel's plugin), `region` or `regiondevel`;
//! - `sysfs-root`: default `/sys/class/fpga_region`;
//! - `dev-root`: where the device nodes are, default `/dev`.
//!
//! # What it serves
//!
//! Resource names are full names in Intel's domain `fpga.intel.com` (its admission
//! webhook and CRI hook look for that domain), so a manifest's `domain` does not
//! apply to them.
//!
//! - **`af`**: one resource per accelerator function type, one device per port
//!   (`dfl-port.P`) that has that function loaded. The name is Intel's encoding of
//!   the region's interface id and the function id, which fits the 63-character
//!   limit: `af-<3 hex of interface>.<3 hex of function>.<base64url of both ids' 32
//!   bytes, unpadded>`, e.g. `fpga.intel.com/af-ce4.d84.zkiWk5jwXzOUbVYHCL4QithCTcSko8QT-J5DNoP5BAs`.
//!   A container gets the port's node. A port with no function loaded (`afu_id`
//!   missing, unreadable, empty or all zeros) is not offered.
//! - **`region`**: one resource per interface id, `fpga.intel.com/region-<interface id>`,
//!   one device per card, its id the FME's name (`dfl-fme.M`), whatever its ports
//!   hold (function ids are not read). A container gets the nodes of every port of
//!   the card, and post-allocate annotates every container with
//!   `com.intel.fpga.mode: fpga.intel.com/region`, which tells Intel's CRI hook to
//!   program the function the pod asks for.
//! - **`regiondevel`**: as `region`, plus the FME's node, and no annotation: the
//!   container programs the card itself.
//!
//! Device nodes keep their name in the container: `<dev-root>/dfl-port.P` on the
//! host is `/dev/dfl-port.P` inside, with permissions `rw`. No environment
//! variables are set (Intel's plugin sets none; its webhook sets `FPGA_*`).
//!
//! # Health
//!
//! A device is unhealthy when the driver reports its id as all `f`s (the device's
//! firmware crashed: the interface id for regions, the function id for ports), or
//! when one of its device nodes is missing (in region mode the FME's too: Intel's
//! CRI hook programs the card through it). `health` (exported, so health is checked
//! every health interval) scans again: a device whose sysfs entry is gone is
//! unhealthy until the next scan withdraws it.
//!
//! The module exports `scan`, `health` and `post-allocate`; `allocate` is the
//! host's, the merge of the nodes scan reported for each device.
//!
//! Nodes are checked only when the guest can see `dev-root`: granting `/dev`
//! read-only would let the module read every device the host can, so the example
//! manifest does not, and the module then relies on sysfs alone (the driver removes
//! an entry and its node together).
//!
//! # Errors and odd entries
//!
//! An unreadable `sysfs-root` means a node without FPGAs: no devices, not an error.
//! An entry that breaks the layout (ports without an FME, two FMEs, no or several
//! `compat_id`s, an id that is not 32 hex digits) is logged as a warning and
//! skipped, and the rest is served (Intel's plugin stops scanning instead). An
//! unknown `mode` is the only error.
//!
//! # Grants
//!
//! On a node the `<sysfs-root>` entries are symlinks into `/sys/devices`, and the
//! WASI layer follows a symlink only within the granted directory, so grant `/sys`
//! (`read-only-dirs = ["/sys"]`), not `/sys/class/fpga_region`. Device nodes must lie
//! under `device-paths` (the default `/dev` covers them).

use std::path::{Path, PathBuf};

use wdp_sdk::{
    AllocateRequest, ContainerResponse, Device, DeviceKind, DevicePlugin, DeviceRef, Health,
    HealthCheck, ModuleError, PostAllocate, config, debug, health_from_scan, warn,
};

/// Intel's resource domain.
const DOMAIN: &str = "fpga.intel.com";
/// The annotation Intel's CRI hook reads, and its value in region mode.
const MODE_ANNOTATION: &str = "com.intel.fpga.mode";
const REGION_MODE_VALUE: &str = "fpga.intel.com/region";
const DEFAULT_SYSFS_ROOT: &str = "/sys/class/fpga_region";
const DEFAULT_DEV_ROOT: &str = "/dev";

/// What the module serves; see the crate doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Af,
    Region,
    RegionDevel,
}

impl Mode {
    fn from_config() -> Result<Self, ModuleError> {
        match config::get("mode").as_deref().map(str::trim) {
            None | Some("af") => Ok(Self::Af),
            Some("region") => Ok(Self::Region),
            Some("regiondevel") => Ok(Self::RegionDevel),
            Some(other) => Err(ModuleError::InvalidRequest(format!(
                "config `mode`: `{other}` is not one of af, region, regiondevel"
            ))),
        }
    }
}

/// A 128-bit id as the driver prints it: 32 hex digits, kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Id(String);

impl Id {
    fn parse(raw: &str) -> Option<Self> {
        let hex = raw.trim();
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(hex.to_ascii_lowercase()))
    }

    /// No function loaded.
    fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }

    /// What the driver reports when the device's firmware crashed.
    fn is_crashed(&self) -> bool {
        self.0.bytes().all(|b| b == b'f')
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.0.as_bytes().chunks(2).map(|pair| {
            // `parse` lets only hex digits in.
            let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            digit(pair[0]) << 4 | digit(pair[1])
        })
    }
}

/// The resource name (without domain) of function `afu` in a region with
/// interface `interface`, encoded as Intel's `fpga.GetAfuDevType` does so that it
/// fits kubelet's 63 characters and a socket path.
fn af_name(interface: &Id, afu: &Id) -> String {
    let bytes: Vec<u8> = interface.bytes().chain(afu.bytes()).collect();
    format!(
        "af-{}.{}.{}",
        &interface.0[..3],
        &afu.0[..3],
        base64url(&bytes)
    )
}

/// RFC 4648 base64 with the URL-safe alphabet and no padding (Go's
/// `base64.RawURLEncoding`).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |bits, (i, b)| bits | u32::from(*b) << (16 - 8 * i));
        // n bytes carry 8n bits: n + 1 sextets.
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(bits >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// `name` is `<prefix><number>`: the number.
fn numbered(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The entries of `dir` named `<prefix><number>`, by number; empty when `dir`
/// cannot be read.
fn numbered_entries(dir: &Path, prefix: &str) -> Vec<(u32, String)> {
    let mut found: Vec<(u32, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some((numbered(&name, prefix)?, name))
        })
        .collect();
    found.sort();
    found
}

/// One port of a card.
struct Port {
    /// `dfl-port.P`: its device id in af mode and its node's name.
    name: String,
    sysfs: PathBuf,
}

/// One FPGA card (a base DFL region): its FME and ports.
struct Region {
    /// `regionN`, for log messages.
    entry: String,
    /// `dfl-fme.M`: its device id in region modes and its node's name.
    fme: String,
    interface: Id,
    ports: Vec<Port>,
}

/// What the function behind a port is.
enum Function {
    Loaded(Id),
    /// No function loaded (or the port is busy being reprogrammed).
    None,
    /// Something that is not an id.
    Malformed(String),
}

impl Port {
    fn function(&self) -> Function {
        match std::fs::read_to_string(self.sysfs.join("afu_id")) {
            Err(_) => Function::None,
            Ok(raw) if raw.trim().is_empty() => Function::None,
            Ok(raw) => match Id::parse(&raw) {
                Some(id) if id.is_zero() => Function::None,
                Some(id) => Function::Loaded(id),
                None => Function::Malformed(raw.trim().to_string()),
            },
        }
    }
}

/// One scan of the sysfs tree.
struct Scan {
    mode: Mode,
    sysfs_root: PathBuf,
    dev_root: PathBuf,
    /// Whether the guest can see `dev_root`, so that a missing node means something.
    check_nodes: bool,
    /// Whether to log what is skipped: `scan` does, `health` repeats the scan far
    /// more often and stays quiet.
    verbose: bool,
}

impl Scan {
    fn new(verbose: bool) -> Result<Self, ModuleError> {
        let mode = Mode::from_config()?;
        let sysfs_root = PathBuf::from(config::get_or("sysfs-root", DEFAULT_SYSFS_ROOT));
        let dev_root = PathBuf::from(config::get_or("dev-root", DEFAULT_DEV_ROOT));
        let check_nodes = std::fs::metadata(&dev_root).is_ok_and(|m| m.is_dir());
        if !check_nodes && verbose {
            debug!(
                "{} is not visible: device nodes are not checked",
                dev_root.display()
            );
        }
        Ok(Self {
            mode,
            sysfs_root,
            dev_root,
            check_nodes,
            verbose,
        })
    }

    fn warn(&self, message: &str) {
        if self.verbose {
            warn!("{message}; skipped");
        }
    }

    fn debug(&self, message: &str) {
        if self.verbose {
            debug!("{message}");
        }
    }

    /// The base DFL regions under the sysfs root, by number.
    fn regions(&self) -> Vec<Region> {
        if let Err(err) = std::fs::read_dir(&self.sysfs_root) {
            self.debug(&format!(
                "cannot read {} ({err}): no FPGAs",
                self.sysfs_root.display()
            ));
            return Vec::new();
        }
        numbered_entries(&self.sysfs_root, "region")
            .into_iter()
            .filter_map(|(_, entry)| self.region(entry))
            .collect()
    }

    fn region(&self, entry: String) -> Option<Region> {
        let dir = self.sysfs_root.join(&entry);
        let fmes = numbered_entries(&dir, "dfl-fme.");
        let ports: Vec<Port> = numbered_entries(&dir, "dfl-port.")
            .into_iter()
            .map(|(_, name)| Port {
                sysfs: dir.join(&name),
                name,
            })
            .collect();
        let fme = match fmes.as_slice() {
            [] if ports.is_empty() => {
                // The FME's own partial-reconfiguration region, or not DFL.
                self.debug(&format!("{}: not a base DFL region", dir.display()));
                return None;
            }
            [] => {
                self.warn(&format!("{}: ports without an FME", dir.display()));
                return None;
            }
            [(_, fme)] => fme.clone(),
            _ => {
                self.warn(&format!(
                    "{}: more than one FME; one per card is supported",
                    dir.display()
                ));
                return None;
            }
        };
        let interface = self.interface(&dir.join(&fme))?;
        if ports.is_empty() {
            // Its ports may have been released to virtual functions.
            self.debug(&format!("{}: no ports", dir.display()));
            return None;
        }
        Some(Region {
            entry,
            fme,
            interface,
            ports,
        })
    }

    /// The interface id of the FME at `fme`: the one
    /// `dfl-fme-region.*/fpga_region/region*/compat_id` below it.
    fn interface(&self, fme: &Path) -> Option<Id> {
        let mut found = Vec::new();
        for (_, pr) in numbered_entries(fme, "dfl-fme-region.") {
            let class = fme.join(pr).join("fpga_region");
            for (_, region) in numbered_entries(&class, "region") {
                let path = class.join(region).join("compat_id");
                if path.is_file() {
                    found.push(path);
                }
            }
        }
        let path = match found.as_slice() {
            [path] => path,
            [] => {
                self.warn(&format!(
                    "{}: no dfl-fme-region.*/fpga_region/region*/compat_id",
                    fme.display()
                ));
                return None;
            }
            _ => {
                self.warn(&format!(
                    "{}: more than one dfl-fme-region.*/fpga_region/region*/compat_id",
                    fme.display()
                ));
                return None;
            }
        };
        match std::fs::read_to_string(path) {
            Ok(raw) => Id::parse(&raw).or_else(|| {
                self.warn(&format!(
                    "{}: `{}` is not an interface id",
                    path.display(),
                    raw.trim()
                ));
                None
            }),
            Err(err) => {
                self.warn(&format!("{}: {err}", path.display()));
                None
            }
        }
    }

    /// Whether the node `name` is known to be missing (only when the guest can
    /// see `dev_root`).
    fn node_missing(&self, name: &str) -> bool {
        let missing = self.check_nodes && std::fs::metadata(self.dev_root.join(name)).is_err();
        if missing {
            self.debug(&format!(
                "{}: device node missing",
                self.dev_root.join(name).display()
            ));
        }
        missing
    }

    /// `device`, and a container given it gets the node `name` at `/dev/<name>`.
    fn with_node(&self, device: Device, name: &str) -> Device {
        let host = self.dev_root.join(name);
        device.node(&host.to_string_lossy(), &format!("/dev/{name}"), "rw")
    }

    fn kinds(&self) -> Vec<DeviceKind> {
        let mut kinds: Vec<DeviceKind> = Vec::new();
        for region in self.regions() {
            match self.mode {
                Mode::Af => {
                    for port in &region.ports {
                        if let Some((name, device)) = self.af_device(&region, port) {
                            add(&mut kinds, name, device);
                        }
                    }
                }
                Mode::Region | Mode::RegionDevel => {
                    let name = format!("{DOMAIN}/region-{}", region.interface.0);
                    add(&mut kinds, name, self.region_device(&region));
                }
            }
        }
        kinds
    }

    /// The card as one device: its ports' nodes (and in regiondevel its FME's).
    fn region_device(&self, region: &Region) -> Device {
        let mut healthy = !region.interface.is_crashed();
        let mut nodes: Vec<&str> = region.ports.iter().map(|p| p.name.as_str()).collect();
        if self.mode == Mode::RegionDevel {
            nodes.push(&region.fme);
        } else if self.node_missing(&region.fme) {
            // Intel's CRI hook programs the card through the FME's node on the host.
            healthy = false;
        }
        let mut device = Device::new(region.fme.clone());
        for node in nodes {
            if self.node_missing(node) {
                healthy = false;
            } else {
                device = self.with_node(device, node);
            }
        }
        device.healthy(healthy)
    }

    /// The port as one device of its function's kind, if a function is loaded.
    fn af_device(&self, region: &Region, port: &Port) -> Option<(String, Device)> {
        let afu = match port.function() {
            Function::Loaded(id) => id,
            Function::None => {
                self.debug(&format!(
                    "{}/{}: no accelerator function loaded",
                    region.entry, port.name
                ));
                return None;
            }
            Function::Malformed(raw) => {
                self.warn(&format!(
                    "{}: `{raw}` is not an accelerator function id",
                    port.sysfs.join("afu_id").display()
                ));
                return None;
            }
        };
        let name = format!("{DOMAIN}/{}", af_name(&region.interface, &afu));
        let device = Device::new(port.name.clone());
        let device = if self.node_missing(&port.name) {
            device.healthy(false)
        } else {
            self.with_node(device, &port.name)
                .healthy(!afu.is_crashed())
        };
        Some((name, device))
    }
}

/// Adds `device` to the kind `name`, created at the end if new.
fn add(kinds: &mut Vec<DeviceKind>, name: String, device: Device) {
    match kinds.iter_mut().find(|k| k.name == name) {
        Some(kind) => kind.devices.push(device),
        None => kinds.push(DeviceKind::new(name).device(device)),
    }
}

struct Fpga;

impl DevicePlugin for Fpga {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(Scan::new(true)?.kinds())
    }
}

// Health at the health interval, not only at each scan: a crashed function must
// stop being allocated soon.
impl HealthCheck for Fpga {
    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        // Scan again (a device no longer found is unhealthy), without repeating
        // scan's log lines every health interval.
        Ok(health_from_scan(&Scan::new(false)?.kinds(), &devices))
    }
}

// No `allocate`: the host gives each container the nodes scan reported for its
// devices, merged.

impl PostAllocate for Fpga {
    fn post_allocate(
        request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        let _ = request;
        Ok(match Mode::from_config()? {
            Mode::Region => response
                .into_iter()
                .map(|reply| reply.annotation(MODE_ANNOTATION, REGION_MODE_VALUE))
                .collect(),
            Mode::Af | Mode::RegionDevel => response,
        })
    }
}

wdp_sdk::export_device_plugin!(Fpga with health, post_allocate);

#[cfg(test)]
mod tests {
    use super::*;

    fn id(hex: &str) -> Id {
        Id::parse(hex).expect("an id")
    }

    #[test]
    fn af_names_match_intels_encoding() {
        // The cases of Intel's pkg/fpga/devtypes_test.go.
        assert_eq!(
            af_name(
                &id("ce48969398f05f33946d560708be108a"),
                &id("d8424dc4a4a3c413f89e433683f9040b")
            ),
            "af-ce4.d84.zkiWk5jwXzOUbVYHCL4QithCTcSko8QT-J5DNoP5BAs"
        );
        assert_eq!(
            af_name(
                &id("bfac4d851ee856fe8c95865ce1bbaa2d"),
                &id("f7df405cbd7acf7222f144b0b93acd18")
            ),
            "af-bfa.f7d.v6xNhR7oVv6MlYZc4buqLfffQFy9es9yIvFEsLk6zRg"
        );
    }

    #[test]
    fn base64url_has_no_padding() {
        // RFC 4648 test vectors, unpadded.
        for (input, output) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(input.as_bytes()), output);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn ids_are_32_hex_digits_read_in_any_case() {
        assert_eq!(
            Id::parse(" CE48969398F05F33946D560708BE108A\n"),
            Some(id("ce48969398f05f33946d560708be108a"))
        );
        for bad in [
            "",
            "ce48",
            "ce48969398f05f33946d560708be108a0",
            "x".repeat(32).as_str(),
        ] {
            assert_eq!(Id::parse(bad), None, "{bad:?}");
        }
        assert!(id(&"0".repeat(32)).is_zero());
        assert!(id(&"F".repeat(32)).is_crashed());
    }

    #[test]
    fn numbered_names_need_a_number() {
        assert_eq!(numbered("dfl-port.12", "dfl-port."), Some(12));
        assert_eq!(numbered("region0", "region"), Some(0));
        for bad in ["dfl-port.", "dfl-port.1a", "dfl-port.-1", "dfl-fme.0"] {
            assert_eq!(numbered(bad, "dfl-port."), None, "{bad}");
        }
    }
}
