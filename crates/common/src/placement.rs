//! Placement of chunk groups on storage nodes: which nodes hold the replicas of each group.
//!
//! Every group (the meta group 0 and the data groups `1..=groups`) keeps one replica, a Raft
//! voter, in each datacenter. Within a datacenter the groups are spread over its nodes in
//! proportion to their free space. The volume manager computes the placement when it forms
//! the storage cluster (with free space from the nodes' heartbeats) and records it; a cluster
//! configured statically (`--cluster`) computes it from the member list alone, the same on
//! every node.

use std::collections::BTreeMap;

/// A node that may hold replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub datacenter: String,
    /// Free bytes (equal for every node when unknown).
    pub free_bytes: u64,
}

/// Whether a node holding `a_held` groups with `a_free` bytes free should take the next group
/// before one holding `b_held` with `b_free`: the one with more free space per group it would
/// then hold (exact, in integers), the lower id on a tie.
fn better(a: (u64, u64, u64), b: (u64, u64, u64)) -> bool {
    let (a_id, a_free, a_held) = a;
    let (b_id, b_free, b_held) = b;
    // a_free / (a_held + 1) > b_free / (b_held + 1), free space of at least one byte.
    let lhs = u128::from(a_free.max(1)) * u128::from(b_held + 1);
    let rhs = u128::from(b_free.max(1)) * u128::from(a_held + 1);
    lhs > rhs || (lhs == rhs && a_id < b_id)
}

/// The voters of groups `0..=groups` (index = group), one per datacenter, in datacenter order.
/// Deterministic: the same nodes give the same placement.
pub fn place_groups(nodes: &[Candidate], groups: u32) -> Vec<Vec<u64>> {
    let mut by_dc: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for n in nodes {
        by_dc.entry(n.datacenter.as_str()).or_default().push(n);
    }
    for list in by_dc.values_mut() {
        list.sort_by_key(|n| n.id);
    }
    let mut held: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::with_capacity(groups as usize + 1);
    for _ in 0..=groups {
        let mut voters = Vec::with_capacity(by_dc.len());
        for list in by_dc.values() {
            let mut best: Option<&Candidate> = None;
            for &n in list {
                let n_held = held.get(&n.id).copied().unwrap_or(0);
                let take = match best {
                    None => true,
                    Some(b) => better(
                        (n.id, n.free_bytes, n_held),
                        (b.id, b.free_bytes, held.get(&b.id).copied().unwrap_or(0)),
                    ),
                };
                if take {
                    best = Some(n);
                }
            }
            if let Some(b) = best {
                *held.entry(b.id).or_default() += 1;
                voters.push(b.id);
            }
        }
        out.push(voters);
    }
    out
}

/// The node of `candidates` that should take one more replica, given how many each holds
/// already (`held`): the most free space per replica held, the lower id on a tie.
pub fn pick_target(candidates: &[Candidate], held: &BTreeMap<u64, u64>) -> Option<u64> {
    let mut best: Option<&Candidate> = None;
    for n in candidates {
        let h = |id| held.get(&id).copied().unwrap_or(0);
        if best.is_none_or(|b| better((n.id, n.free_bytes, h(n.id)), (b.id, b.free_bytes, h(b.id))))
        {
            best = Some(n);
        }
    }
    best.map(|n| n.id)
}

/// How many replicas each node holds under `placement` (nodes holding none are absent).
pub fn replicas_held(placement: &[Vec<u64>]) -> BTreeMap<u64, u64> {
    let mut held = BTreeMap::new();
    for voters in placement {
        for &v in voters {
            *held.entry(v).or_default() += 1;
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, dc: &str, free: u64) -> Candidate {
        Candidate { id, datacenter: dc.into(), free_bytes: free }
    }

    #[test]
    fn one_node_per_datacenter_holds_every_group() {
        let nodes = [node(3, "c", 0), node(1, "a", 0), node(2, "b", 0)];
        let p = place_groups(&nodes, 4);
        assert_eq!(p.len(), 5, "the meta group and four data groups");
        assert!(p.iter().all(|v| v == &vec![1, 2, 3]));
    }

    #[test]
    fn equal_nodes_share_the_groups_of_their_datacenter_evenly() {
        let nodes: Vec<_> =
            (1..=6).map(|i| node(i, ["a", "b", "c"][(i as usize - 1) % 3], 100)).collect();
        let p = place_groups(&nodes, 15);
        let held = replicas_held(&p);
        assert_eq!(held.values().copied().collect::<Vec<_>>(), vec![8; 6]);
        for voters in &p {
            assert_eq!(voters.len(), 3);
            let dcs: std::collections::BTreeSet<_> = voters
                .iter()
                .map(|v| nodes.iter().find(|n| n.id == *v).unwrap().datacenter.clone())
                .collect();
            assert_eq!(dcs.len(), 3, "one voter per datacenter: {voters:?}");
        }
    }

    #[test]
    fn more_free_space_takes_more_groups() {
        // Node 1 has three times node 4's free space, in the same datacenter.
        let nodes = [node(1, "a", 300), node(4, "a", 100), node(2, "b", 1), node(3, "c", 1)];
        let held = replicas_held(&place_groups(&nodes, 31));
        assert_eq!((held[&1], held[&4]), (24, 8));
        assert_eq!(held[&2], 32);
    }

    #[test]
    fn the_same_nodes_give_the_same_placement() {
        let a = [node(5, "b", 7), node(1, "a", 9), node(9, "a", 9), node(2, "c", 3)];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(place_groups(&a, 20), place_groups(&b, 20));
    }

    #[test]
    fn the_target_has_the_most_free_space_per_replica() {
        let c = [node(1, "a", 100), node(2, "a", 100)];
        let held = BTreeMap::from([(1, 3), (2, 1)]);
        assert_eq!(pick_target(&c, &held), Some(2));
        assert_eq!(pick_target(&c, &BTreeMap::new()), Some(1), "a tie goes to the lower id");
        assert_eq!(pick_target(&[], &held), None);
    }
}
