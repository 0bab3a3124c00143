//! Stage 2 of the fire path: records fires ahead of their time.
//!
//! Each pass takes every job due within the horizon (up to [`MAX_BATCH`] fires), plans its
//! fire and its next time under the table lock, and commits the batch in one transaction
//! outside it. Passes are paced so that a fire is recorded between `horizon − horizon/4`
//! and `horizon` before its time: at steady load that is a handful of large commits a
//! second however many jobs share an instant. An arm that is due sooner wakes a pass at
//! once (bursts of arms coalesce for up to [`COALESCE`]).
//!
//! A batch that fails is retried with the same batch id until the store answers: a commit
//! whose reply was lost is then recognised, not written twice, and its fires are sent once.
//! A node that falls behind records late fires as they come, and a job more than the
//! catch-up window behind fires once, with at most [`MISSED_ROWS_PER_JOB`] `missed` rows:
//! the work per fire does not grow with lateness.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::table::{RecordedFire, Table};
use crate::clock::now_ms;
use crate::cluster::Leases;
use crate::job::Job;
use crate::metrics;
use crate::store::{BatchOutcome, ExecKey, ExecStatus, NewFire, Progress, Store, StoreError};

/// Most jobs taken into one batch (its rows go in multi-row statements of 500).
pub(super) const MAX_BATCH: usize = 2000;
/// Most `missed` rows written for one job when it is made up after an outage.
pub(super) const MISSED_ROWS_PER_JOB: u32 = 10;
/// How long a wake-up by an arm waits for more arms before recording.
const COALESCE: Duration = Duration::from_millis(10);
/// Summaries of repeated events are logged at most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A fresh batch id (random: ids of different nodes must not collide).
pub(super) fn new_batch_id() -> i64 {
    (rand::random::<u64>() >> 1) as i64
}

/// Counts of events worth a line in the log, summed between summaries.
#[derive(Default)]
pub(super) struct Summary {
    made_up_jobs: u64,
    missed_recorded: u64,
    missed_unrecorded: u64,
    late_fires: u64,
    duplicate_fires: u64,
    store_errors: u64,
    last_error: Option<String>,
    since: Option<Instant>,
}

pub(super) struct Recorder {
    pub shared: Arc<Shared>,
    pub store: Store,
    pub leases: Arc<Leases>,
    pub node: Arc<str>,
    pub catchup_window_ms: i64,
    pub prune_every: u32,
    pub fired_since_prune: HashMap<Arc<str>, u32>,
    /// When `fired_since_prune` last dropped the jobs that left the table.
    pub counts_swept: Instant,
    pub prune_tx: mpsc::UnboundedSender<Arc<str>>,
    pub lost_tx: mpsc::UnboundedSender<Vec<(u32, i64)>>,
    pub cancel: CancellationToken,
    pub summary: Summary,
}

/// One batch in the making.
#[derive(Default)]
struct Batch {
    rows: Vec<NewFire>,
    progress: HashMap<Arc<str>, Progress>,
    /// One per job taken: the fire to send once recorded.
    sendable: Vec<RecordedFire>,
}

impl Recorder {
    pub async fn run(mut self) {
        let horizon = self.shared.horizon_ms;
        let pace = (horizon / 4).max(1);
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let now = now_ms();
            let batch = self.plan(now, now + horizon);
            let full = batch.sendable.len() >= MAX_BATCH;
            if !batch.sendable.is_empty() && !self.record(batch, now).await {
                break;
            }
            self.log_summary();
            if full {
                continue;
            }
            let wake_at = self
                .shared
                .table()
                .next_to_record()
                .map_or(now + 3_600_000, |t| (t - horizon + pace).max(now + 1));
            let sleep = Duration::from_millis((wake_at - now_ms()).max(0) as u64);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                _ = self.shared.record_wake.notified() => {
                    // Let a burst of arms (a registration storm) gather into one batch,
                    // unless something is due sooner than that.
                    let urgent = self.shared.table().next_to_record().is_some_and(|t| t - now_ms() < 50);
                    if !urgent {
                        tokio::time::sleep(COALESCE).await;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::debug!("recorder stopped");
    }

    /// Takes what is due by `until` out of the table and plans its rows.
    fn plan(&mut self, now: i64, until: i64) -> Batch {
        let mut b = Batch::default();
        let window_start = now - self.catchup_window_ms;
        let summary = &mut self.summary;
        self.shared
            .table()
            .take_due(until, MAX_BATCH, |job, generation, due| {
                let mut fire_at = due;
                if due < window_start {
                    fire_at = collapse_missed(job, due, window_start, now, &mut b.rows, summary);
                }
                if fire_at < now {
                    summary.late_fires += 1;
                }
                let fired_at = now.max(fire_at);
                b.rows.push(NewFire {
                    key: ExecKey {
                        job_id: job.id.clone(),
                        scheduled_at: fire_at,
                    },
                    slot: job.slot,
                    manual: false,
                    fired_at,
                    status: ExecStatus::Pending,
                    next_attempt_at: Some(super::first_retry_at(job, fired_at)),
                });
                b.sendable.push(RecordedFire {
                    job: job.clone(),
                    generation,
                    scheduled_at: fire_at,
                    fired_at,
                    claimed: true,
                });
                let next = job.schedule.next_after(fire_at, job.active_since);
                b.progress.insert(
                    job.id.clone(),
                    Progress {
                        job_id: job.id.clone(),
                        slot: job.slot,
                        last_fire_at: fire_at,
                        next_fire_at: next,
                    },
                );
                next
            });
        b
    }

    /// Commits the batch (retrying until the store answers) and queues its fires for
    /// sending. False if cancelled while the store was down.
    async fn record(&mut self, mut b: Batch, now: i64) -> bool {
        let started = Instant::now();
        let batch_id = new_batch_id();
        let mut backoff = Duration::from_millis(100);
        // Slots this node does not hold any more are left out before the store is asked.
        let leases = self.leases.epochs_of(b.rows.iter().map(|f| f.slot));
        let mut lost: HashSet<u32> = b
            .rows
            .iter()
            .map(|f| f.slot)
            .filter(|s| !leases.contains_key(s))
            .collect();
        b.rows.retain(|f| !lost.contains(&f.slot));
        b.progress.retain(|_, p| !lost.contains(&p.slot));
        let progress: Vec<Progress> = b.progress.into_values().collect();
        let mut skipped: HashSet<ExecKey> = HashSet::new();
        loop {
            match self
                .store
                .record_batch(&self.node, batch_id, &b.rows, &progress, &leases, now)
                .await
            {
                Ok(BatchOutcome::Committed { lost_slots })
                | Ok(BatchOutcome::AlreadyCommitted { lost_slots }) => {
                    lost.extend(lost_slots);
                    break;
                }
                Err(StoreError::Recorded(keys)) => {
                    // Someone recorded these first; they are theirs to dispatch.
                    self.summary.duplicate_fires += keys.len() as u64;
                    metrics::FIRES_DEDUPED.add(keys.len() as u64);
                    skipped.extend(keys);
                    b.rows.retain(|f| !skipped.contains(&f.key));
                }
                Err(e) => {
                    metrics::STORE_ERRORS.inc();
                    self.summary.store_errors += 1;
                    if self.summary.store_errors == 1 {
                        tracing::warn!(error = %e, fires = b.rows.len(), "cannot record fires; retrying with the same batch id (a lost commit is recognised, never doubled)");
                    }
                    self.summary.last_error = Some(e.to_string());
                    tokio::select! {
                        _ = self.cancel.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        metrics::RECORD_BATCH_SECONDS.observe(started.elapsed().as_secs_f64());
        for f in &b.sendable {
            metrics::RECORD_AHEAD_SECONDS.observe((f.scheduled_at - now).max(0) as f64 / 1000.0);
        }
        let ok = |f: &RecordedFire| {
            !lost.contains(&f.job.slot)
                && !skipped.contains(&ExecKey {
                    job_id: f.job.id.clone(),
                    scheduled_at: f.scheduled_at,
                })
        };
        let fenced = b.sendable.iter().filter(|f| !ok(f)).count();
        if fenced > 0 {
            metrics::FIRES_FENCED.add(fenced as u64);
        }
        for f in b.sendable.iter().filter(|f| ok(f)) {
            self.count_for_pruning(&f.job.id);
        }
        {
            let mut table = self.shared.table();
            table.finish_batch(b.sendable, ok);
            if self.counts_swept.elapsed() >= SWEEP_COUNTS_EVERY {
                self.counts_swept = Instant::now();
                forget_gone(&mut self.fired_since_prune, &table);
            }
        }
        self.shared.send_wake.notify_one();
        self.shared.batch_done.notify_waiters();
        if !lost.is_empty() {
            // Another node holds these now (our lease expired, e.g. during a database
            // outage): their jobs are its to fire. Ownership drops them here.
            // Only leases the fence refused have an epoch to report; a lease that lapsed
            // locally is dropped by ownership's own check.
            let lost: Vec<(u32, i64)> = lost
                .into_iter()
                .filter_map(|s| leases.get(&s).map(|e| (s, *e)))
                .collect();
            if !lost.is_empty() {
                let _ = self.lost_tx.send(lost);
            }
        }
        true
    }

    fn count_for_pruning(&mut self, id: &Arc<str>) {
        let n = self.fired_since_prune.entry(id.clone()).or_insert(0);
        *n += 1;
        if *n >= self.prune_every {
            self.fired_since_prune.remove(id);
            let _ = self.prune_tx.send(id.clone());
        }
    }

    /// One line per [`SUMMARY_EVERY`] for what would otherwise be a line per job per fire.
    fn log_summary(&mut self) {
        let s = &mut self.summary;
        let since = *s.since.get_or_insert_with(Instant::now);
        if since.elapsed() < SUMMARY_EVERY {
            return;
        }
        if s.made_up_jobs > 0 || s.late_fires > 0 || s.duplicate_fires > 0 || s.store_errors > 0 {
            tracing::warn!(
                late_fires = s.late_fires,
                made_up_jobs = s.made_up_jobs,
                missed_recorded = s.missed_recorded,
                jobs_with_older_missed_not_recorded = s.missed_unrecorded,
                duplicate_fires = s.duplicate_fires,
                store_errors = s.store_errors,
                last_error = s.last_error.as_deref().unwrap_or(""),
                "fire path behind in the last {}s: fires were recorded after their time (see chime_fire_lag_seconds)",
                SUMMARY_EVERY.as_secs()
            );
        }
        *s = Summary {
            since: Some(Instant::now()),
            ..Summary::default()
        };
    }
}

/// `due` is older than the make-up window: fire only the latest time at or before the
/// window start, and record up to [`MISSED_ROWS_PER_JOB`] older ones as `missed` (so a daily
/// job missed during an outage fires once and an `@every 1s` job does not flood).
fn collapse_missed(
    job: &Job,
    due: i64,
    window_start: i64,
    now: i64,
    rows: &mut Vec<NewFire>,
    summary: &mut Summary,
) -> i64 {
    let latest = job
        .schedule
        .prev_at_or_before(window_start, job.active_since)
        .filter(|t| *t >= due)
        .unwrap_or(due);
    let mut t = latest;
    let mut recorded = 0;
    while recorded < MISSED_ROWS_PER_JOB {
        match job.schedule.prev_at_or_before(t - 1, job.active_since) {
            Some(p) if p >= due => {
                rows.push(NewFire {
                    key: ExecKey {
                        job_id: job.id.clone(),
                        scheduled_at: p,
                    },
                    slot: job.slot,
                    manual: false,
                    fired_at: now,
                    status: ExecStatus::Missed,
                    next_attempt_at: None,
                });
                recorded += 1;
                t = p;
            }
            _ => break,
        }
    }
    // Older ones are not written (nor counted: counting would cost time per missed
    // fire); the job's history says where the `missed` rows stop.
    metrics::FIRES_MISSED.add(u64::from(recorded));
    summary.made_up_jobs += 1;
    summary.missed_recorded += u64::from(recorded);
    if recorded == MISSED_ROWS_PER_JOB {
        summary.missed_unrecorded += 1;
    }
    latest
}

/// How often the per-job fire counts forget jobs no longer in the table (deleted, moved to
/// another node, or one-shots that have fired): without it the map only grows.
const SWEEP_COUNTS_EVERY: Duration = Duration::from_secs(60);

fn forget_gone(counts: &mut HashMap<Arc<str>, u32>, table: &Table) {
    counts.retain(|id, _| table.contains(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fire_counts_forget_jobs_that_left_the_table() {
        let mut table = Table::default();
        let kept = super::super::table::tests::job("kept", 3);
        table.arm(kept.clone(), Some(1_000));
        let mut counts: HashMap<Arc<str>, u32> = HashMap::new();
        counts.insert(kept.id.clone(), 3);
        counts.insert("deleted".into(), 7);
        counts.insert("moved".into(), 1);
        forget_gone(&mut counts, &table);
        assert_eq!(counts.len(), 1);
        assert_eq!(counts.get("kept"), Some(&3));
    }
}
