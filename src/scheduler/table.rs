//! Every job this node fires, and every fire between being recorded and being sent, in one
//! structure behind one short-held lock. No I/O and no waiting here: the recorder, the
//! sender and API writes each take the lock for microseconds and do their I/O outside it.
//!
//! A job's life in the table:
//! - *armed*: its next time is in `to_record`;
//! - *in flight*: fires of it are in a batch being committed (`in_flight > 0`); a write
//!   waits for that batch to finish, so the database never sees a fire of a definition
//!   that has been replaced;
//! - *recorded*: its committed fires wait in `to_send` for their instant;
//! - *held*: an API write took it out (with its unsent fires) and puts it back after the
//!   database answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::job::Job;

/// A fire recorded in the store, to be sent at `scheduled_at` (or at once if late).
#[derive(Debug, Clone)]
pub(crate) struct RecordedFire {
    pub job: Arc<Job>,
    /// The generation of the job's entry that produced this fire.
    pub generation: u64,
    pub scheduled_at: i64,
    pub fired_at: i64,
    /// True when its row already counts attempt 1 (recorded here); false for a fire handed
    /// back by the slot's previous owner (attempt 0), which delivery claims before sending.
    pub claimed: bool,
}

struct Entry {
    job: Arc<Job>,
    generation: u64,
    /// Next time to record; None: known but not armed (paused or finished).
    next: Option<i64>,
    /// Fires of this entry in batches being committed.
    in_flight: u32,
    /// Scheduled times of this job's fires waiting in `to_send`.
    unsent: Vec<i64>,
}

/// What a write took out of the table; [`Table::restore`] puts it back if the write failed.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub previous: Option<(Arc<Job>, Option<i64>)>,
    /// Recorded fires of the old definition not yet due: they are never sent.
    pub cancelled: Vec<RecordedFire>,
    /// Recorded fires due already (at or before the write) that the sender had not taken
    /// yet: they belong to the old definition's past and are sent, not cancelled.
    pub due: Vec<RecordedFire>,
}

impl Held {
    pub fn cancelled_times(&self) -> Vec<i64> {
        self.cancelled.iter().map(|f| f.scheduled_at).collect()
    }
}

/// The job has fires in a batch being committed; wait for the batch and try again.
#[derive(Debug)]
pub(crate) struct InFlight;

/// `last_manual` is never pruned below this size (pruning is O(n): amortised by doubling).
const MANUAL_PRUNE_MIN: usize = 64;

#[derive(Default)]
pub(crate) struct Table {
    jobs: HashMap<Arc<str>, Entry>,
    to_record: BTreeSet<(i64, Arc<str>)>,
    to_send: BTreeMap<(i64, Arc<str>), RecordedFire>,
    generation: u64,
    /// Last manual fire time per job, so two triggers in one millisecond get distinct times.
    /// Only entries not in the past matter; the rest are dropped as the map grows.
    last_manual: HashMap<Arc<str>, i64>,
    /// `last_manual`'s size that triggers the next drop of past entries.
    last_manual_prune_at: usize,
}

impl Table {
    /// Adds or replaces a job (a fresh generation); fires first at `due`. True if `due` is
    /// now the earliest time to record.
    pub fn arm(&mut self, job: Arc<Job>, due: Option<i64>) -> bool {
        let id = job.id.clone();
        self.generation += 1;
        let entry = Entry {
            job,
            generation: self.generation,
            next: due,
            in_flight: 0,
            unsent: Vec::new(),
        };
        if let Some(old) = self.jobs.insert(id.clone(), entry) {
            // Replacing without `hold` (a slot reloaded): the old entry's unsent fires are
            // the store's pending rows, and the reload resumed them from there.
            if let Some(n) = old.next {
                self.to_record.remove(&(n, id.clone()));
            }
            for t in old.unsent {
                self.to_send.remove(&(t, id.clone()));
            }
        }
        let Some(d) = due else {
            return false;
        };
        self.to_record.insert((d, id.clone()));
        self.to_record
            .first()
            .is_some_and(|(t, first)| *t == d && *first == id)
    }

    /// Takes the job out for a write: it is neither recorded nor sent until it is armed (or
    /// restored) again. Its recorded fires due after `now` are cancelled and returned; those
    /// due by `now` are returned for sending at once (cancelling them would lose a fire that
    /// was due before the write came).
    pub fn hold(&mut self, id: &str, now: i64) -> Result<Held, InFlight> {
        let Some(entry) = self.jobs.get(id) else {
            return Ok(Held::default());
        };
        if entry.in_flight > 0 {
            return Err(InFlight);
        }
        let (key, entry) = self.jobs.remove_entry(id).expect("present");
        if let Some(n) = entry.next {
            self.to_record.remove(&(n, key.clone()));
        }
        let (due, cancelled) = entry
            .unsent
            .iter()
            .filter_map(|t| self.to_send.remove(&(*t, key.clone())))
            .partition(|f| f.scheduled_at <= now);
        self.last_manual.remove(&key);
        Ok(Held {
            previous: Some((entry.job, entry.next)),
            cancelled,
            due,
        })
    }

    /// Undoes [`Table::hold`] after a failed write: the old definition and its unsent fires
    /// (whose rows are still in the store) are back.
    pub fn restore(&mut self, held: Held) {
        let Some((job, next)) = held.previous else {
            return;
        };
        let id = job.id.clone();
        self.arm(job, next);
        let generation = self.jobs[&id].generation;
        for mut fire in held.cancelled {
            fire.generation = generation;
            self.push_unsent(fire);
        }
    }

    /// Queues a fire recorded by the slot's previous owner and handed back unsent (its row
    /// at attempt 0), under its job as loaded here, so that a write cancels it like any
    /// recorded fire. False if the job is not in the table (or has that fire already).
    pub fn adopt(&mut self, id: &str, slot: u32, scheduled_at: i64, fired_at: i64) -> bool {
        let Some(e) = self.jobs.get(id) else {
            return false;
        };
        if e.job.slot != slot || e.unsent.contains(&scheduled_at) {
            return false;
        }
        let fire = RecordedFire {
            job: e.job.clone(),
            generation: e.generation,
            scheduled_at,
            fired_at,
            claimed: false,
        };
        self.push_unsent(fire);
        true
    }

    fn push_unsent(&mut self, fire: RecordedFire) {
        let id = fire.job.id.clone();
        if let Some(e) = self.jobs.get_mut(&id) {
            e.unsent.push(fire.scheduled_at);
            self.to_send.insert((fire.scheduled_at, id), fire);
        }
    }

    /// Removes every job of `slots`; returns their recorded fires that were not sent.
    pub fn drop_slots(&mut self, slots: &std::collections::HashSet<u32>) -> Vec<RecordedFire> {
        let ids: Vec<Arc<str>> = self
            .jobs
            .iter()
            .filter(|(_, e)| slots.contains(&e.job.slot))
            .map(|(id, _)| id.clone())
            .collect();
        let mut unsent = Vec::new();
        for id in ids {
            let e = self.jobs.remove(&id).expect("present");
            if let Some(n) = e.next {
                self.to_record.remove(&(n, id.clone()));
            }
            for t in e.unsent {
                unsent.extend(self.to_send.remove(&(t, id.clone())));
            }
            self.last_manual.remove(&id);
        }
        unsent
    }

    /// Stops recording fires of `slots` (a handover about to drop them): batches already
    /// taken still finish, and no new one starts, so waiting for them ends.
    pub fn disarm_slots(&mut self, slots: &std::collections::HashSet<u32>) {
        for (id, e) in self.jobs.iter_mut() {
            if slots.contains(&e.job.slot)
                && let Some(n) = e.next.take()
            {
                self.to_record.remove(&(n, id.clone()));
            }
        }
    }

    /// Whether any job of `slots` has fires in a batch being committed.
    pub fn in_flight_in(&self, slots: &std::collections::HashSet<u32>) -> bool {
        self.jobs
            .values()
            .any(|e| e.in_flight > 0 && slots.contains(&e.job.slot))
    }

    /// The earliest time still to be recorded.
    pub fn next_to_record(&self) -> Option<i64> {
        self.to_record.first().map(|(t, _)| *t)
    }

    /// Takes up to `max` jobs whose next time is at or before `until`, in time order, and
    /// marks them in flight. `plan` gets each job and its due time and returns the job's
    /// next time after this fire (and whatever it recorded), so the job is re-armed at once.
    pub fn take_due(
        &mut self,
        until: i64,
        max: usize,
        mut plan: impl FnMut(&Arc<Job>, u64, i64) -> Option<i64>,
    ) -> usize {
        let mut taken = 0;
        while taken < max {
            let Some((due, _)) = self.to_record.first() else {
                break;
            };
            if *due > until {
                break;
            }
            let (due, id) = self.to_record.pop_first().expect("present");
            let Some(e) = self.jobs.get_mut(&id) else {
                continue;
            };
            e.in_flight += 1;
            let next = plan(&e.job, e.generation, due);
            e.next = next;
            if let Some(n) = next {
                self.to_record.insert((n, id));
            }
            taken += 1;
        }
        taken
    }

    /// A batch finished: `fires` holds one fire per job taken by [`Table::take_due`] (each
    /// take counted once towards its entry's `in_flight`). `committed` says whether a fire
    /// is this node's to send; it is queued only if its job is still the generation that
    /// produced it.
    pub fn finish_batch(
        &mut self,
        fires: Vec<RecordedFire>,
        committed: impl Fn(&RecordedFire) -> bool,
    ) {
        for fire in fires {
            let Some(e) = self.jobs.get_mut(&fire.job.id) else {
                continue;
            };
            if e.generation != fire.generation {
                continue;
            }
            e.in_flight = e.in_flight.saturating_sub(1);
            if committed(&fire) {
                self.push_unsent(fire);
            }
        }
    }

    /// The earliest recorded fire's time.
    pub fn next_to_send(&self) -> Option<i64> {
        self.to_send.first_key_value().map(|((t, _), _)| *t)
    }

    /// Takes every recorded fire due at or before `now`.
    pub fn take_sendable(&mut self, now: i64, out: &mut Vec<RecordedFire>) {
        while let Some(entry) = self.to_send.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let fire = entry.remove();
            if let Some(e) = self.jobs.get_mut(&fire.job.id)
                && let Some(i) = e.unsent.iter().position(|t| *t == fire.scheduled_at)
            {
                e.unsent.swap_remove(i);
            }
            out.push(fire);
        }
    }

    /// A manual fire's time: `now`, or the next free millisecond of this job (after its last
    /// trigger, and not the time of a scheduled fire of it that is armed or recorded).
    pub fn manual_time(&mut self, id: &Arc<str>, now: i64) -> i64 {
        let mut t = match self.last_manual.get(id) {
            Some(&last) if last >= now => last + 1,
            _ => now,
        };
        if let Some(e) = self.jobs.get(id) {
            while e.next == Some(t) || e.unsent.contains(&t) {
                t += 1;
            }
        }
        if self.last_manual.len() >= self.last_manual_prune_at {
            self.last_manual.retain(|_, last| *last >= now);
            self.last_manual_prune_at = (self.last_manual.len() * 2).max(MANUAL_PRUNE_MIN);
        }
        self.last_manual.insert(id.clone(), t);
        t
    }

    pub fn contains(&self, id: &str) -> bool {
        self.jobs.contains_key(id)
    }

    #[cfg(test)]
    fn manual_entries(&self) -> usize {
        self.last_manual.len()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn armed(&self) -> usize {
        self.to_record.len()
    }

    pub fn unsent(&self) -> usize {
        self.to_send.len()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::job::{Callback, HttpCallback, RetryPolicy, Target};
    use crate::schedule::Schedule;

    pub(crate) fn job(id: &str, slot: u32) -> Arc<Job> {
        let target = Target {
            callback: Callback::Http(HttpCallback {
                url: "http://h/".into(),
                method: crate::job::HttpMethod::Post,
                headers: Default::default(),
                timeout_ms: 1000,
            }),
            payload: serde_json::value::RawValue::from_string("null".into()).unwrap(),
            retry: RetryPolicy::default(),
            secret: None,
        };
        Arc::new(Job {
            id: id.into(),
            slot,
            schedule: Schedule::parse("@every 1s", chrono_tz::UTC).unwrap(),
            target: Arc::new(target),
            paused: false,
            active_since: 0,
        })
    }

    /// Takes what is due by `until`, re-arming each job one second later.
    fn take(t: &mut Table, until: i64) -> Vec<RecordedFire> {
        let mut fires = Vec::new();
        t.take_due(until, 100, |job, generation, due| {
            fires.push(RecordedFire {
                job: job.clone(),
                generation,
                scheduled_at: due,
                fired_at: due,
                claimed: true,
            });
            Some(due + 1000)
        });
        fires
    }

    #[test]
    fn arm_reports_a_new_earliest_time() {
        let mut t = Table::default();
        assert!(t.arm(job("a", 0), Some(5_000)));
        assert!(!t.arm(job("b", 0), Some(9_000)), "later than the earliest");
        assert!(t.arm(job("c", 0), Some(1_000)));
        assert!(!t.arm(job("d", 0), None));
        assert_eq!((t.len(), t.armed()), (4, 3));
    }

    #[test]
    fn a_recorded_fire_is_sent_once_unless_a_write_cancels_it() {
        let mut t = Table::default();
        t.arm(job("a", 0), Some(1_000));
        t.arm(job("b", 0), Some(1_000));
        let fires = take(&mut t, 2_500);
        assert_eq!(fires.len(), 4, "both jobs, at 1,000 and 2,000");
        // While the batch is committed, a write of `a` must wait.
        assert!(t.hold("a", 0).is_err());
        t.finish_batch(fires, |_| true);
        assert_eq!(t.unsent(), 4);
        let held = t.hold("a", 0).expect("batch finished");
        assert_eq!(held.cancelled_times(), vec![1_000, 2_000]);
        let mut out = Vec::new();
        t.take_sendable(2_000, &mut out);
        let sent: Vec<(&str, i64)> = out.iter().map(|f| (&*f.job.id, f.scheduled_at)).collect();
        assert_eq!(sent, vec![("b", 1_000), ("b", 2_000)]);
        // The write failed: the old definition and its unsent fires come back.
        t.restore(held);
        out.clear();
        t.take_sendable(2_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(t.next_to_record(), Some(3_000));
    }

    #[test]
    fn a_fire_of_a_replaced_generation_is_not_queued() {
        let mut t = Table::default();
        t.arm(job("a", 7), Some(1_000));
        let fires = take(&mut t, 1_000);
        // The slot was dropped and loaded again while the batch was in flight.
        let unsent = t.drop_slots(&[7].into_iter().collect());
        assert!(unsent.is_empty());
        t.arm(job("a", 7), Some(1_000));
        t.finish_batch(fires, |_| true);
        assert_eq!(t.unsent(), 0, "the reloaded job records its own fires");
        assert!(
            t.hold("a", 0).is_ok(),
            "nothing of the new generation is in flight"
        );
    }

    #[test]
    fn a_write_sends_the_fires_already_due_and_cancels_the_rest() {
        let mut t = Table::default();
        t.arm(job("a", 0), Some(1_000));
        let fires = take(&mut t, 2_500);
        t.finish_batch(fires, |_| true);
        // The write comes at 1,500: the sender has not taken the fire of 1,000 yet.
        let held = t.hold("a", 1_500).expect("nothing in flight");
        let due: Vec<i64> = held.due.iter().map(|f| f.scheduled_at).collect();
        assert_eq!(due, vec![1_000]);
        assert_eq!(held.cancelled_times(), vec![2_000]);
        // A failed write puts back only what was cancelled: the due fire was sent.
        t.restore(held);
        assert_eq!(t.unsent(), 1);
    }

    #[test]
    fn a_handed_back_fire_is_adopted_by_its_loaded_job() {
        let mut t = Table::default();
        t.arm(job("a", 3), Some(5_000));
        assert!(t.adopt("a", 3, 4_000, 3_990));
        assert!(!t.adopt("a", 3, 4_000, 3_990), "the same fire twice");
        assert!(!t.adopt("gone", 3, 4_000, 3_990), "no such job here");
        assert!(!t.adopt("a", 4, 4_000, 3_990), "not the job's slot");
        // A write cancels it like a fire recorded here.
        let held = t.hold("a", 3_000).expect("nothing in flight");
        assert_eq!(held.cancelled_times(), vec![4_000]);
        assert!(!held.cancelled[0].claimed);
    }

    #[test]
    fn past_manual_times_are_forgotten_as_triggers_go_on() {
        let mut t = Table::default();
        for i in 0..10_000i64 {
            let id: Arc<str> = format!("j{i}").into();
            t.manual_time(&id, 1_000 + i);
        }
        assert!(
            t.manual_entries() <= 2 * MANUAL_PRUNE_MIN,
            "{} entries kept for 10,000 one-off triggers",
            t.manual_entries()
        );
        // Entries still in the future are kept: two triggers in one millisecond differ.
        let id: Arc<str> = "same".into();
        let first = t.manual_time(&id, 50_000);
        for i in 0..200i64 {
            let other: Arc<str> = format!("k{i}").into();
            t.manual_time(&other, 50_000);
        }
        assert_eq!(t.manual_time(&id, 50_000), first + 1);
    }

    #[test]
    fn manual_times_avoid_scheduled_ones_and_each_other() {
        let mut t = Table::default();
        let j = job("a", 0);
        t.arm(j.clone(), Some(1_000));
        assert_eq!(t.manual_time(&j.id, 1_000), 1_001);
        assert_eq!(t.manual_time(&j.id, 1_000), 1_002);
        assert_eq!(t.manual_time(&j.id, 5_000), 5_000);
    }
}
