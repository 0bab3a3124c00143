//! Which node owns which slot: a consistent-hash ring (hashring, with virtual nodes) over the
//! ready members, evaluated once per topology into a slot → node table.
//!
//! Every node computes the same table from the same member set: points come from SipHash-2-4
//! with zero keys over our own byte encodings, never from std's `Hash` (not stable across
//! Rust releases), and the ring is rebuilt from the sorted member list rather than edited
//! incrementally (hashring's `add` does not deduplicate).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use hashring::HashRing;

use crate::job::SLOTS;

/// Virtual nodes per member: with 128, three members get shares within a few percent of 1/3.
const VNODES: u32 = 128;

fn sip(bytes: &[u8]) -> u64 {
    let mut h = siphasher::sip::SipHasher24::new();
    h.write(bytes);
    h.finish()
}

/// A point on the ring; hashes to exactly its value under [`IdentityBuild`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct Point(u64);

impl Hash for Point {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

#[derive(Clone, PartialEq, Eq)]
struct VNode {
    member: u16,
    point: u64,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.point);
    }
}

/// Hashes a `u64` to itself, so the ring places keys at points we computed ourselves.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 points are hashed here; fold anything else deterministically anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Clone, Default)]
struct IdentityBuild;

impl BuildHasher for IdentityBuild {
    type Hasher = Identity;
    fn build_hasher(&self) -> Identity {
        Identity(0)
    }
}

/// The slot → owner table for one member set. Cheap to share (`Arc<Ring>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    members: Vec<Arc<str>>,
    /// Index into `members` for each slot; empty when there are no members.
    owners: Vec<u16>,
}

impl Ring {
    /// Builds the ring over `members` (order and duplicates do not matter).
    pub fn new<S: AsRef<str>>(members: &[S]) -> Ring {
        let mut names: Vec<Arc<str>> = members.iter().map(|m| Arc::from(m.as_ref())).collect();
        names.sort();
        names.dedup();
        names.truncate(usize::from(u16::MAX));
        if names.is_empty() {
            return Ring {
                members: names,
                owners: Vec::new(),
            };
        }
        let mut ring: HashRing<VNode, IdentityBuild> = HashRing::with_hasher(IdentityBuild);
        let mut vnodes = Vec::with_capacity(names.len() * VNODES as usize);
        for (i, name) in names.iter().enumerate() {
            for v in 0..VNODES {
                vnodes.push(VNode {
                    member: i as u16,
                    point: sip(format!("{name}#{v}").as_bytes()),
                });
            }
        }
        ring.batch_add(vnodes);
        let owners = (0..SLOTS)
            .map(|slot| {
                let point = Point(sip(&slot.to_be_bytes()));
                ring.get(&point).map(|v| v.member).unwrap_or(0)
            })
            .collect();
        Ring {
            members: names,
            owners,
        }
    }

    pub fn owner_of(&self, slot: u32) -> Option<&str> {
        let i = *self.owners.get(slot as usize)?;
        self.members.get(usize::from(i)).map(|m| &**m)
    }

    /// The slots `node` owns, ascending.
    pub fn slots_of(&self, node: &str) -> Vec<u32> {
        let Some(i) = self.members.iter().position(|m| &**m == node) else {
            return Vec::new();
        };
        (0..SLOTS)
            .filter(|s| self.owners[*s as usize] == i as u16)
            .collect()
    }

    pub fn members(&self) -> &[Arc<str>] {
        &self.members
    }

    /// Slots per member, in member order.
    pub fn shares(&self) -> Vec<(Arc<str>, u32)> {
        let mut counts = vec![0u32; self.members.len()];
        for o in &self.owners {
            counts[usize::from(*o)] += 1;
        }
        self.members.iter().cloned().zip(counts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_owners_are_stable() {
        // A change here reassigns slots on upgrade: nodes of two versions would disagree.
        let ring = Ring::new(&["chime-0", "chime-1", "chime-2"]);
        let got: Vec<&str> = [0, 1, 2, 100, 4095]
            .iter()
            .map(|s| ring.owner_of(*s).unwrap())
            .collect();
        assert_eq!(got, GOLDEN);
    }
    const GOLDEN: [&str; 5] = ["chime-0", "chime-0", "chime-2", "chime-0", "chime-2"];

    #[test]
    fn every_slot_has_one_owner_and_shares_are_fair() {
        let ring = Ring::new(&["c", "a", "b", "a"]);
        assert_eq!(ring.members().len(), 3);
        let total: u32 = ring.shares().iter().map(|(_, n)| n).sum();
        assert_eq!(total, SLOTS);
        for (m, n) in ring.shares() {
            let share = f64::from(n) / f64::from(SLOTS);
            assert!((0.25..0.42).contains(&share), "{m}: {share}");
            assert_eq!(ring.slots_of(&m).len() as u32, n);
        }
        assert_eq!(Ring::new(&["b", "a", "c"]), ring, "order does not matter");
    }

    #[test]
    fn a_join_or_leave_moves_about_one_nth() {
        let three = Ring::new(&["a", "b", "c"]);
        let four = Ring::new(&["a", "b", "c", "d"]);
        let moved = (0..SLOTS)
            .filter(|s| three.owner_of(*s) != four.owner_of(*s))
            .count() as f64
            / f64::from(SLOTS);
        assert!((0.18..0.32).contains(&moved), "join moved {moved}");
        // Only slots that went to the newcomer moved.
        for s in 0..SLOTS {
            if three.owner_of(s) != four.owner_of(s) {
                assert_eq!(four.owner_of(s), Some("d"));
            }
        }
        let two = Ring::new(&["a", "c"]);
        for s in 0..SLOTS {
            if three.owner_of(s) != Some("b") {
                assert_eq!(
                    three.owner_of(s),
                    two.owner_of(s),
                    "slot {s} moved needlessly"
                );
            }
        }
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let ring = Ring::new::<&str>(&[]);
        assert_eq!(ring.owner_of(0), None);
        assert!(ring.slots_of("a").is_empty());
    }
}
