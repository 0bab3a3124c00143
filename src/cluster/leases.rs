//! The slot leases this node holds, as last confirmed by the database.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// When this node stops trusting the lease without a renewal: measured from before the
    /// renewal (or acquisition) was sent, minus a margin, so it passes before the database
    /// could let another node take the slot. None: never expires (an embedded node).
    valid_until: Option<Instant>,
    /// The slot's jobs and pending deliveries are loaded: API writes may proceed. Before
    /// that a write could race the load (the load arming a definition read before it).
    loaded: bool,
}

impl Held {
    fn valid(&self, now: Instant) -> bool {
        self.valid_until.is_none_or(|t| now < t)
    }
}

/// The slots this node holds, with the epoch of each lease. Shared with the scheduler (which
/// fences each batch of fires with it and sends a fire only while its lease is valid) and
/// the API (which writes only jobs of held slots).
///
/// It also serializes job writes per slot ([`Leases::write_lock`]): a handover takes the
/// locks of the slots it gives away ([`Leases::lock_writes`]), so each write either ends
/// before the handover starts (and what it armed is handed over) or finds the slot gone.
pub struct Leases {
    held: RwLock<HashMap<u32, Held>>,
    write_locks: Box<[Arc<tokio::sync::Mutex<()>>]>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            held: Default::default(),
            write_locks: (0..crate::job::SLOTS).map(|_| Default::default()).collect(),
        }
    }
}

/// Held while a job write of a slot runs (or while a handover of the slot runs).
pub type WriteGuard = tokio::sync::OwnedMutexGuard<()>;

impl Leases {
    /// Waits for the slot's turn to write a job of it.
    pub async fn write_lock(&self, slot: u32) -> WriteGuard {
        let lock = &self.write_locks[slot as usize % self.write_locks.len()];
        lock.clone().lock_owned().await
    }

    /// Waits until no write of `slots` runs and keeps new ones out while the guards live.
    /// Takes the locks in slot order (a write takes one), so two callers cannot deadlock.
    pub(crate) async fn lock_writes(&self, slots: &[u32]) -> Vec<WriteGuard> {
        let mut sorted: Vec<u32> = slots.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut guards = Vec::with_capacity(sorted.len());
        for s in sorted {
            guards.push(self.write_lock(s).await);
        }
        guards
    }

    /// Held and not past its local deadline.
    pub fn holds(&self, slot: u32) -> bool {
        let now = Instant::now();
        self.held
            .read()
            .expect("lease map lock")
            .get(&slot)
            .is_some_and(|h| h.valid(now))
    }

    /// The epoch to fence a job write of `slot` with: held, valid, and loaded.
    pub fn writable_epoch(&self, slot: u32) -> Option<i64> {
        let now = Instant::now();
        self.held
            .read()
            .expect("lease map lock")
            .get(&slot)
            .filter(|h| h.loaded && h.valid(now))
            .map(|h| h.epoch)
    }

    /// The epochs of those of `slots` held now: what a batch of fires is fenced with.
    pub fn epochs_of(&self, slots: impl IntoIterator<Item = u32>) -> HashMap<u32, i64> {
        let now = Instant::now();
        let held = self.held.read().expect("lease map lock");
        slots
            .into_iter()
            .filter_map(|s| held.get(&s).filter(|h| h.valid(now)).map(|h| (s, h.epoch)))
            .collect()
    }

    /// Slot → epoch of every lease in the map, valid or not (renewal compares with these).
    pub fn snapshot(&self) -> HashMap<u32, i64> {
        self.held
            .read()
            .expect("lease map lock")
            .iter()
            .map(|(s, h)| (*s, h.epoch))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.held.read().expect("lease map lock").len()
    }

    pub(crate) fn slots(&self) -> BTreeSet<u32> {
        self.held
            .read()
            .expect("lease map lock")
            .keys()
            .copied()
            .collect()
    }

    pub(crate) fn clear(&self) {
        self.held.write().expect("lease map lock").clear();
    }

    pub(crate) fn remove(&self, slots: &[u32]) {
        let mut held = self.held.write().expect("lease map lock");
        for s in slots {
            held.remove(s);
        }
    }

    /// Of `lost` (slot, epoch) reports, the slots still held at that very epoch: a report
    /// about an older lease must not drop a slot that was acquired again since.
    pub(crate) fn still_at(&self, lost: &[(u32, i64)]) -> Vec<u32> {
        let held = self.held.read().expect("lease map lock");
        lost.iter()
            .filter(|(s, e)| held.get(s).is_some_and(|h| h.epoch == *e))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Held slots past their local deadline.
    pub(crate) fn lapsed(&self) -> Vec<u32> {
        let now = Instant::now();
        self.held
            .read()
            .expect("lease map lock")
            .iter()
            .filter(|(_, h)| !h.valid(now))
            .map(|(s, _)| *s)
            .collect()
    }

    /// The slots' jobs are loaded: writes of them may proceed.
    pub(crate) fn mark_loaded(&self, slots: &[u32]) {
        let mut held = self.held.write().expect("lease map lock");
        for s in slots {
            if let Some(h) = held.get_mut(s) {
                h.loaded = true;
            }
        }
    }

    /// Adds leases just acquired, trusted until `valid_until`.
    pub(crate) fn extend(&self, gained: HashMap<u32, i64>, valid_until: Option<Instant>) {
        let mut held = self.held.write().expect("lease map lock");
        for (slot, epoch) in gained {
            held.insert(
                slot,
                Held {
                    epoch,
                    valid_until,
                    loaded: false,
                },
            );
        }
    }

    /// Moves the deadline of every lease the database confirmed (same epoch) to `valid_until`.
    pub(crate) fn renewed(&self, confirmed: &HashMap<u32, i64>, valid_until: Instant) {
        let mut held = self.held.write().expect("lease map lock");
        for (slot, h) in held.iter_mut() {
            if confirmed.get(slot) == Some(&h.epoch) {
                h.valid_until = Some(valid_until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lease_past_its_local_deadline_is_not_held() {
        let leases = Leases::default();
        let now = Instant::now();
        leases.extend(HashMap::from([(1, 7)]), Some(now + Duration::from_secs(60)));
        leases.extend(
            HashMap::from([(2, 3)]),
            Some(now - Duration::from_millis(1)),
        );
        leases.extend(HashMap::from([(3, 1)]), None);
        assert!(leases.holds(1));
        assert!(!leases.holds(2), "expired locally");
        assert!(leases.holds(3), "never expires");
        assert_eq!(
            leases.epochs_of([1, 2, 3, 4]),
            HashMap::from([(1, 7), (3, 1)])
        );
        leases.renewed(&HashMap::from([(2, 3)]), now + Duration::from_secs(60));
        assert!(leases.holds(2), "renewed at the same epoch");
        leases.renewed(&HashMap::from([(1, 8)]), now - Duration::from_secs(1));
        assert!(
            leases.holds(1),
            "a different epoch is not a renewal of this lease"
        );
    }
}
