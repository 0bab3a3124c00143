//! All armed jobs of a node in one ordered set: O(log n) per arm, disarm and fire, one
//! sleeping task in total (not a task or a sleep per job).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::job::Job;

struct Entry {
    job: Arc<Job>,
    due: Option<i64>,
}

#[derive(Default)]
pub(crate) struct Timer {
    jobs: HashMap<Arc<str>, Entry>,
    queue: BTreeSet<(i64, Arc<str>)>,
}

impl Timer {
    /// Adds or replaces a job; `due = None` keeps it known but unarmed (paused, finished).
    pub fn insert(&mut self, job: Arc<Job>, due: Option<i64>) {
        let id = job.id.clone();
        if let Some(Entry { due: Some(d), .. }) = self.jobs.insert(id.clone(), Entry { job, due }) {
            self.queue.remove(&(d, id.clone()));
        }
        if let Some(d) = due {
            self.queue.insert((d, id));
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<(Arc<Job>, Option<i64>)> {
        let (key, entry) = self.jobs.remove_entry(id)?;
        if let Some(d) = entry.due {
            self.queue.remove(&(d, key));
        }
        Some((entry.job, entry.due))
    }

    /// Removes every job matching `pred` (a slot handed over); O(jobs).
    pub fn remove_where(&mut self, pred: impl Fn(&Job) -> bool) -> usize {
        let ids: Vec<Arc<str>> = self
            .jobs
            .iter()
            .filter(|(_, e)| pred(&e.job))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.remove(id);
        }
        ids.len()
    }

    pub fn next_due(&self) -> Option<i64> {
        self.queue.first().map(|(d, _)| *d)
    }

    /// Takes the earliest entry due at or before `now`, leaving its job unarmed.
    pub fn pop_due(&mut self, now: i64) -> Option<(i64, Arc<Job>)> {
        let (due, _) = self.queue.first()?;
        if *due > now {
            return None;
        }
        let (due, id) = self.queue.pop_first()?;
        let entry = self.jobs.get_mut(&id)?;
        entry.due = None;
        Some((due, entry.job.clone()))
    }

    /// Arms an already known job (after it fired).
    pub fn rearm(&mut self, id: &Arc<str>, due: i64) {
        if let Some(entry) = self.jobs.get_mut(id) {
            if let Some(old) = entry.due.replace(due) {
                self.queue.remove(&(old, id.clone()));
            }
            self.queue.insert((due, id.clone()));
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn armed(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Callback, HttpCallback, RetryPolicy, Target};
    use crate::schedule::Schedule;

    fn job(id: &str) -> Arc<Job> {
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
            slot: 0,
            schedule: Schedule::parse("@every 1s", chrono_tz::UTC).unwrap(),
            target: Arc::new(target),
            paused: false,
            active_since: 0,
        })
    }

    #[test]
    fn fires_in_due_order_and_replacement_drops_old_entry() {
        let mut t = Timer::default();
        t.insert(job("a"), Some(30));
        t.insert(job("b"), Some(10));
        t.insert(job("c"), None);
        t.insert(job("a"), Some(20)); // replace: the 30 entry must be gone
        assert_eq!(t.len(), 3);
        assert_eq!(t.armed(), 2);
        assert_eq!(t.next_due(), Some(10));
        assert!(t.pop_due(5).is_none());
        let (d, j) = t.pop_due(100).unwrap();
        assert_eq!((d, &*j.id), (10, "b"));
        let (d, j) = t.pop_due(100).unwrap();
        assert_eq!((d, &*j.id), (20, "a"));
        assert!(t.pop_due(100).is_none());
        t.rearm(&j.id, 40);
        assert_eq!(t.remove("a").unwrap().1, Some(40));
        assert_eq!(t.armed(), 0);
        assert!(t.remove("a").is_none());
    }
}
