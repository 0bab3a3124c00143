//! The slot leases this node holds, as last confirmed by the database.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

/// The slots this node holds, with the epoch of each lease. Shared with the scheduler (which
/// fences each batch of fires with it) and the API (which writes only jobs of held slots).
#[derive(Default)]
pub struct Leases {
    held: RwLock<HashMap<u32, i64>>,
}

impl Leases {
    pub fn holds(&self, slot: u32) -> bool {
        self.held
            .read()
            .expect("lease map lock")
            .contains_key(&slot)
    }

    /// The epochs of those of `slots` held now: what a batch of fires is fenced with.
    pub fn epochs_of(&self, slots: impl IntoIterator<Item = u32>) -> HashMap<u32, i64> {
        let held = self.held.read().expect("lease map lock");
        slots
            .into_iter()
            .filter_map(|s| held.get(&s).map(|e| (s, *e)))
            .collect()
    }

    pub fn snapshot(&self) -> HashMap<u32, i64> {
        self.held.read().expect("lease map lock").clone()
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

    pub(crate) fn replace(&self, held: HashMap<u32, i64>) {
        *self.held.write().expect("lease map lock") = held;
    }

    pub(crate) fn remove(&self, slots: &[u32]) {
        let mut held = self.held.write().expect("lease map lock");
        for s in slots {
            held.remove(s);
        }
    }

    pub(crate) fn extend(&self, gained: HashMap<u32, i64>) {
        self.held.write().expect("lease map lock").extend(gained);
    }
}
