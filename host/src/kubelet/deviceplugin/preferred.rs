//! The default GetPreferredAllocation policy: which devices kubelet should pick
//! when it has a choice.
//!
//! Advertised ids may be replicas that share one real device (`a::0`, `a::1`, see
//! [`DeviceSet::replicated`]); the caller says which device each id belongs to, and
//! a container is given distinct devices before it is given a second replica of
//! any. In order:
//!
//! 1. every `must_include` id, in the order given; each counts as a use of its
//!    device;
//! 2. then one id of each device not yet used, on NUMA nodes those already use;
//! 3. then, if one NUMA node can supply all that is still needed with devices not
//!    yet used, the node with the fewest such devices that can (best fit, leaving
//!    larger groups whole for larger requests); otherwise the nodes with the most
//!    such devices first;
//! 4. when distinct devices run out, further replicas, a round at a time: each
//!    round gives one more replica to each of the least-used devices, in the node
//!    order of 2 and 3.
//!
//! Devices without NUMA information form one group of their own. Within a group,
//! ids keep the order kubelet listed them in, so the answer depends only on the
//! request. Ids the resource does not know are never preferred. When every
//! device is advertised once, steps 2 and 3 take ids in that order and step 4
//! never runs.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::domain::DeviceSet;

/// Picks `size` ids from `available` (see the module docs); `device_of` names
/// the real device behind an advertised id (the id itself when devices are not
/// shared). NUMA nodes come from `set`.
pub fn preferred_allocation<'a>(
    set: &DeviceSet,
    device_of: impl Fn(&'a str) -> &'a str,
    available: &'a [String],
    must_include: &'a [String],
    size: usize,
) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::with_capacity(size);
    let mut taken: HashSet<&str> = HashSet::new();
    // How many chosen ids each real device already has.
    let mut uses: HashMap<&'a str, usize> = HashMap::new();
    for id in must_include {
        if taken.insert(id.as_str()) {
            chosen.push(id.clone());
            *uses.entry(device_of(id)).or_default() += 1;
        }
    }
    if chosen.len() >= size {
        return chosen;
    }
    let node_of = |id: &str| set.get(id).map(|d| d.numa_nodes.first().copied());
    let used_nodes: HashSet<Option<i64>> = chosen.iter().filter_map(|id| node_of(id)).collect();

    // Candidates grouped by NUMA node, in kubelet's order, and per node the
    // devices it can give without sharing: those no chosen id uses yet.
    let mut groups: BTreeMap<Option<i64>, Vec<&'a str>> = BTreeMap::new();
    let mut unused: BTreeMap<Option<i64>, HashSet<&'a str>> = BTreeMap::new();
    for id in available {
        if !taken.insert(id.as_str()) {
            continue;
        }
        if let Some(node) = node_of(id) {
            groups.entry(node).or_default().push(id.as_str());
            let device = device_of(id);
            if !uses.contains_key(device) {
                unused.entry(node).or_default().insert(device);
            }
        }
    }
    let distinct = |node: &Option<i64>| unused.get(node).map_or(0, HashSet::len);

    let mut order: Vec<Option<i64>> = groups
        .keys()
        .copied()
        .filter(|n| used_nodes.contains(n))
        .collect();
    let remaining = size - chosen.len();
    let from_used: usize = order.iter().map(distinct).sum();
    let mut rest: Vec<Option<i64>> = groups
        .keys()
        .copied()
        .filter(|n| !used_nodes.contains(n))
        .collect();
    let still_needed = remaining.saturating_sub(from_used);
    if still_needed > 0 {
        match rest
            .iter()
            .filter(|n| distinct(n) >= still_needed)
            .min_by_key(|n| distinct(n))
        {
            Some(best) => {
                let best = *best;
                rest.retain(|n| *n != best);
                rest.insert(0, best);
            }
            None => rest.sort_by_key(|n| std::cmp::Reverse(distinct(n))),
        }
    }
    order.extend(rest);

    let mut candidates: Vec<&'a str> = order
        .iter()
        .flat_map(|node| groups[node].iter().copied())
        .collect();
    while chosen.len() < size {
        // One round: among the devices with the fewest uses, one more id each.
        // The first round takes each unused device once; each round takes at
        // least one id, so the loop ends when `size` is reached or ids run out.
        let Some(level) = candidates
            .iter()
            .map(|id| uses.get(device_of(id)).copied().unwrap_or(0))
            .min()
        else {
            break;
        };
        candidates.retain(|id| {
            if chosen.len() == size {
                return true;
            }
            let count = uses.entry(device_of(id)).or_default();
            if *count > level {
                return true;
            }
            *count += 1;
            chosen.push((*id).to_string());
            false
        });
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::domain::{Device, Health, ResourceName};
    use crate::snapshot::testing::Nothing;
    use crate::snapshot::{ResourceSnapshot, SnapshotParts};

    /// A resource of `devices`, each advertised once.
    fn set(devices: &[(&str, Option<i64>)]) -> ResourceSnapshot {
        shared(devices, 1)
    }

    fn real(devices: &[(&str, Option<i64>)]) -> DeviceSet {
        DeviceSet::new(
            devices
                .iter()
                .map(|(id, node)| Device {
                    id: id.to_string(),
                    health: Health::Healthy,
                    numa_nodes: node.iter().copied().collect(),
                })
                .collect(),
        )
        .expect("valid set")
    }

    fn ids(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|s| s.to_string()).collect()
    }

    /// A resource of `devices`, each advertised `replicas` times.
    fn shared(devices: &[(&str, Option<i64>)], replicas: u32) -> ResourceSnapshot {
        ResourceSnapshot::new(SnapshotParts {
            name: ResourceName::parse("example.com/dev").expect("valid"),
            kind: "dev".into(),
            generation: 1,
            replicas,
            real: Arc::new(real(devices)),
            allocations: Arc::default(),
            cdi: None,
            backend: Arc::new(Nothing),
        })
        .expect("snapshot")
    }

    /// The preferred allocation with devices as the snapshot maps them, as the
    /// server asks.
    fn pick(
        snapshot: &ResourceSnapshot,
        available: &[&str],
        must_include: &[&str],
        size: usize,
    ) -> Vec<String> {
        preferred_allocation(
            snapshot.advertised(),
            |id| snapshot.device_of(id).map_or(id, |d| d.id.as_str()),
            &ids(available),
            &ids(must_include),
            size,
        )
    }

    #[test]
    fn must_include_comes_first() {
        let s = set(&[("a", None), ("b", None), ("c", None)]);
        assert_eq!(pick(&s, &["a", "b", "c"], &["c"], 2), ids(&["c", "a"]));
    }

    #[test]
    fn stays_on_the_numa_node_of_must_include() {
        let s = set(&[
            ("a0", Some(0)),
            ("b1", Some(1)),
            ("c1", Some(1)),
            ("d0", Some(0)),
        ]);
        let got = pick(&s, &["a0", "b1", "c1", "d0"], &["c1"], 2);
        assert_eq!(got, ids(&["c1", "b1"]));
    }

    #[test]
    fn best_fit_node_when_one_node_suffices() {
        // Node 0 has 3 free, node 1 has 2 free: a request for 2 fits node 1 exactly.
        let s = set(&[
            ("a0", Some(0)),
            ("b0", Some(0)),
            ("c0", Some(0)),
            ("d1", Some(1)),
            ("e1", Some(1)),
        ]);
        let got = pick(&s, &["a0", "b0", "c0", "d1", "e1"], &[], 2);
        assert_eq!(got, ids(&["d1", "e1"]));
    }

    #[test]
    fn largest_nodes_first_when_none_suffices() {
        let s = set(&[("a0", Some(0)), ("b1", Some(1)), ("c1", Some(1))]);
        let got = pick(&s, &["a0", "b1", "c1"], &[], 3);
        assert_eq!(got, ids(&["b1", "c1", "a0"]));
    }

    #[test]
    fn unknown_ids_are_not_preferred() {
        let s = set(&[("a", None)]);
        assert_eq!(pick(&s, &["zz", "a"], &[], 2), ids(&["a"]));
    }

    #[test]
    fn replicas_of_distinct_devices_come_before_a_second_replica() {
        let s = shared(&[("a", None), ("b", None)], 2);
        assert_eq!(
            pick(&s, &["a::0", "a::1", "b::0", "b::1"], &[], 2),
            ids(&["a::0", "b::0"])
        );
    }

    #[test]
    fn must_include_counts_toward_its_device() {
        let s = shared(&[("a", None), ("b", None)], 2);
        assert_eq!(
            pick(&s, &["a::0", "a::1", "b::0", "b::1"], &["a::1"], 2),
            ids(&["a::1", "b::0"])
        );
    }

    #[test]
    fn must_include_stays_even_when_it_shares_a_device() {
        let s = shared(&[("a", None), ("b", None)], 2);
        assert_eq!(
            pick(&s, &["a::0", "a::1", "b::0", "b::1"], &["a::0", "a::1"], 3),
            ids(&["a::0", "a::1", "b::0"])
        );
    }

    #[test]
    fn replicas_fill_the_least_used_devices_first() {
        // a has two uses from must_include; b and c get a second replica before
        // a gets a third.
        let s = shared(&[("a", None), ("b", None), ("c", None)], 3);
        let all = [
            "a::0", "a::1", "a::2", "b::0", "b::1", "b::2", "c::0", "c::1", "c::2",
        ];
        assert_eq!(
            pick(&s, &all, &["a::0", "a::1"], 6),
            ids(&["a::0", "a::1", "b::0", "c::0", "b::1", "c::1"])
        );
    }

    #[test]
    fn replicas_spread_evenly_when_devices_run_short() {
        let s = shared(&[("a", None), ("b", None)], 3);
        let all = ["a::0", "a::1", "a::2", "b::0", "b::1", "b::2"];
        assert_eq!(
            pick(&s, &all, &[], 5),
            ids(&["a::0", "b::0", "a::1", "b::1", "a::2"])
        );
    }

    #[test]
    fn one_numa_node_with_enough_distinct_devices_is_preferred() {
        // Node 0 offers two replicas of one device, node 1 two devices: only
        // node 1 gives two without sharing.
        let s = shared(&[("a0", Some(0)), ("b1", Some(1)), ("c1", Some(1))], 2);
        let all = ["a0::0", "a0::1", "b1::0", "b1::1", "c1::0", "c1::1"];
        assert_eq!(pick(&s, &all, &[], 2), ids(&["b1::0", "c1::0"]));
    }

    #[test]
    fn best_fit_counts_devices_not_replicas() {
        // Node 0 has 3 devices (6 ids), node 1 has 2 (4 ids): a request for 2
        // fits node 1 exactly.
        let s = shared(
            &[
                ("a0", Some(0)),
                ("b0", Some(0)),
                ("c0", Some(0)),
                ("d1", Some(1)),
                ("e1", Some(1)),
            ],
            2,
        );
        let all: Vec<String> = s
            .advertised()
            .devices()
            .iter()
            .map(|d| d.id.clone())
            .collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        assert_eq!(pick(&s, &all, &[], 2), ids(&["d1::0", "e1::0"]));
    }

    #[test]
    fn distinct_devices_beat_staying_on_the_numa_node_of_must_include() {
        let s = shared(&[("a0", Some(0)), ("b1", Some(1))], 2);
        assert_eq!(
            pick(&s, &["a0::0", "a0::1", "b1::0", "b1::1"], &["a0::0"], 2),
            ids(&["a0::0", "b1::0"])
        );
    }

    #[test]
    fn kubelet_order_decides_within_a_round() {
        let s = shared(&[("a", None), ("b", None)], 2);
        assert_eq!(
            pick(&s, &["b::1", "a::1", "b::0", "a::0"], &[], 3),
            ids(&["b::1", "a::1", "b::0"])
        );
    }

    #[test]
    fn ids_like_replicas_are_distinct_devices_in_an_unshared_set() {
        let s = set(&[("a::0", None), ("a::1", None), ("b", None)]);
        assert_eq!(
            pick(&s, &["a::0", "a::1", "b"], &[], 2),
            ids(&["a::0", "a::1"])
        );
    }

    #[test]
    fn a_device_map_from_the_caller_decides_what_is_shared() {
        // The map, not the id's shape, says which ids share a device.
        let s = set(&[("x", None), ("y", None), ("z", None)]);
        let available = ids(&["x", "y", "z"]);
        let got = preferred_allocation(
            s.advertised(),
            |id| if id == "z" { "z" } else { "xy" },
            &available,
            &[],
            2,
        );
        assert_eq!(got, ids(&["x", "z"]));
    }
}
