//! The default GetPreferredAllocation policy: which devices kubelet should pick
//! when it has a choice.
//!
//! 1. every `must_include` device, in the order given;
//! 2. then devices on NUMA nodes those already use;
//! 3. then, if one NUMA node can supply all that is still needed, the node with the
//!    fewest available devices that can (best fit, leaving larger groups whole for
//!    larger requests); otherwise the nodes with the most available devices first.
//!
//! Devices without NUMA information form one group of their own. Within a group,
//! devices keep the order kubelet listed them in. Ids the resource does not know
//! are never preferred.

use std::collections::{BTreeMap, HashSet};

use crate::domain::DeviceSet;

/// Picks `size` device ids from `available` (see the module docs).
pub fn preferred_allocation(
    set: &DeviceSet,
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::with_capacity(size);
    let mut taken: HashSet<&str> = HashSet::new();
    for id in must_include {
        if taken.insert(id.as_str()) {
            chosen.push(id.clone());
        }
    }
    if chosen.len() >= size {
        return chosen;
    }
    let node_of = |id: &str| set.get(id).map(|d| d.numa_nodes.first().copied());
    let used_nodes: HashSet<Option<i64>> = chosen.iter().filter_map(|id| node_of(id)).collect();

    // Candidates grouped by NUMA node, in kubelet's order.
    let mut groups: BTreeMap<Option<i64>, Vec<&str>> = BTreeMap::new();
    for id in available {
        if taken.contains(id.as_str()) {
            continue;
        }
        if let Some(node) = node_of(id) {
            groups.entry(node).or_default().push(id.as_str());
        }
    }

    let mut order: Vec<Option<i64>> = groups
        .keys()
        .copied()
        .filter(|n| used_nodes.contains(n))
        .collect();
    let remaining = size - chosen.len();
    let from_used: usize = order.iter().map(|n| groups[n].len()).sum();
    let mut rest: Vec<Option<i64>> = groups
        .keys()
        .copied()
        .filter(|n| !used_nodes.contains(n))
        .collect();
    let still_needed = remaining.saturating_sub(from_used);
    if still_needed > 0 {
        match rest
            .iter()
            .filter(|n| groups[*n].len() >= still_needed)
            .min_by_key(|n| groups[*n].len())
        {
            Some(best) => {
                let best = *best;
                rest.retain(|n| *n != best);
                rest.insert(0, best);
            }
            None => rest.sort_by_key(|n| std::cmp::Reverse(groups[n].len())),
        }
    }
    order.extend(rest);

    for node in order {
        for id in &groups[&node] {
            if chosen.len() == size {
                return chosen;
            }
            chosen.push((*id).to_string());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Device, Health};

    fn set(devices: &[(&str, Option<i64>)]) -> DeviceSet {
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

    #[test]
    fn must_include_comes_first() {
        let s = set(&[("a", None), ("b", None), ("c", None)]);
        assert_eq!(
            preferred_allocation(&s, &ids(&["a", "b", "c"]), &ids(&["c"]), 2),
            ids(&["c", "a"])
        );
    }

    #[test]
    fn stays_on_the_numa_node_of_must_include() {
        let s = set(&[
            ("a0", Some(0)),
            ("b1", Some(1)),
            ("c1", Some(1)),
            ("d0", Some(0)),
        ]);
        let got = preferred_allocation(&s, &ids(&["a0", "b1", "c1", "d0"]), &ids(&["c1"]), 2);
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
        let got = preferred_allocation(&s, &ids(&["a0", "b0", "c0", "d1", "e1"]), &[], 2);
        assert_eq!(got, ids(&["d1", "e1"]));
    }

    #[test]
    fn largest_nodes_first_when_none_suffices() {
        let s = set(&[("a0", Some(0)), ("b1", Some(1)), ("c1", Some(1))]);
        let got = preferred_allocation(&s, &ids(&["a0", "b1", "c1"]), &[], 3);
        assert_eq!(got, ids(&["b1", "c1", "a0"]));
    }

    #[test]
    fn unknown_ids_are_not_preferred() {
        let s = set(&[("a", None)]);
        assert_eq!(
            preferred_allocation(&s, &ids(&["zz", "a"]), &[], 2),
            ids(&["a"])
        );
    }
}
