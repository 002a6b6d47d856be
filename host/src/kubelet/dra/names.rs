//! Device names in a ResourceSlice: the API server takes only DNS labels, and
//! guest ids are free text (`/node1/dev1/3`, `0000:3b:00.0`), so each id maps
//! to a name stably (the same id, the same name, across rescans and
//! restarts) and without collisions, and back.
//!
//! An id that is a DNS label (1 to 63 of `[a-z0-9-]`, starting and ending
//! alphanumeric) is its own name. Any other id is lowercased, every character
//! outside `[a-z0-9]` becomes `-`, runs of `-` collapse, leading and trailing
//! `-` go, the rest is cut to 54 characters, and `-` and the first 8 hex digits
//! of the SHA-256 of the whole id are appended (`/node1/dev1/3` →
//! `node1-dev1-3-<8 hex>`; nothing left → `dev-<8 hex>`). The id itself is
//! published beside the name as the `id` attribute.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::domain::DeviceSet;

/// The longest DNS label.
const MAX_LABEL: usize = 63;
/// What a mapped name keeps of the id, leaving room for `-` and 8 hex digits.
const KEEP: usize = MAX_LABEL - 9;

/// Whether `s` is a DNS-1123 label.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The slice device name of guest id `id` (see the module doc).
pub fn device_name(id: &str) -> String {
    if is_dns_label(id) {
        return id.to_string();
    }
    let mut base = String::with_capacity(id.len());
    for c in id.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            base.push(c);
        } else if !base.ends_with('-') {
            base.push('-');
        }
    }
    let mut base = base.trim_matches('-').to_string();
    base.truncate(KEEP);
    let base = base.trim_end_matches('-');
    let digest = Sha256::digest(id.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    if base.is_empty() {
        format!("dev-{hash}")
    } else {
        format!("{base}-{hash}")
    }
}

/// The names of one device set, both ways. A device whose name another took
/// first (an id chosen to equal another's mapped name) is left out and
/// reported, never merged.
#[derive(Debug, Clone, Default)]
pub struct DeviceNames {
    /// Slice device name → position in the set.
    by_name: HashMap<String, usize>,
    /// Per position, its name (`None` when left out).
    names: Vec<Option<String>>,
}

impl DeviceNames {
    /// The names of `set`'s devices, and the ids left out (with the id whose
    /// name they would take).
    pub fn of(set: &DeviceSet) -> (Self, Vec<(String, String)>) {
        let mut by_name: HashMap<String, usize> = HashMap::with_capacity(set.len());
        let mut names = Vec::with_capacity(set.len());
        let mut left_out = Vec::new();
        for (at, device) in set.devices().iter().enumerate() {
            let name = device_name(&device.id);
            if let Some(&first) = by_name.get(&name) {
                left_out.push((device.id.clone(), set.devices()[first].id.clone()));
                names.push(None);
                continue;
            }
            by_name.insert(name.clone(), at);
            names.push(Some(name));
        }
        (Self { by_name, names }, left_out)
    }

    /// The position of the device named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The name of the device at `at`, unless it was left out.
    pub fn name(&self, at: usize) -> Option<&str> {
        self.names.get(at).and_then(|n| n.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Device, Health};

    #[test]
    fn a_dns_label_is_its_own_name_and_anything_else_maps_stably() {
        assert_eq!(device_name("gpu-0"), "gpu-0");
        let mapped = device_name("/node1/dev-1/3");
        assert!(mapped.starts_with("node1-dev-1-3-"), "{mapped}");
        assert_eq!(mapped, device_name("/node1/dev-1/3"), "stable");
        assert!(is_dns_label(&mapped));
        // Ids that sanitize alike stay apart.
        assert_ne!(device_name("a:b"), device_name("a/b"));
        assert_ne!(device_name("GPU0"), "gpu0");
        assert!(device_name("///").starts_with("dev-"));
        let long = device_name(&"x".repeat(253));
        assert!(is_dns_label(&long) && long.len() == 63, "{long}");
        assert!(is_dns_label(&device_name("0000:3b:00.0")));
    }

    #[test]
    fn a_name_taken_first_leaves_the_later_device_out() {
        let taken = device_name("A");
        let set = DeviceSet::new(
            ["A", taken.as_str(), "b"]
                .iter()
                .map(|id| Device {
                    id: (*id).to_string(),
                    health: Health::Healthy,
                    numa_nodes: vec![],
                })
                .collect(),
        )
        .expect("valid");
        let (names, left_out) = DeviceNames::of(&set);
        assert_eq!(left_out, vec![(taken.clone(), "A".to_string())]);
        assert_eq!(names.position(&taken), Some(0));
        assert_eq!(names.name(1), None);
        assert_eq!(names.position("b"), Some(2));
    }
}
