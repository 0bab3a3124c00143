//! Fires the node's jobs on time, as a pipeline of three stages over one shared [`table`]:
//!
//! 1. **arming** (API writes, slot loads): a job's next time enters the table;
//! 2. **recording** ([`recorder`]): fires due within the lookahead horizon are written to
//!    the store ahead of their time, in large batches fenced by the slot leases; the batch
//!    also advances each job's `next_fire_at`. A recorded fire is durable: if this node
//!    dies, the slot's next owner finds it pending and delivers it;
//! 3. **sending** ([`sender`]): at each fire's instant it goes to delivery, with no database
//!    round trip on the way.
//!
//! Database latency therefore moves a fire only when it exceeds the horizon. API writes
//! never wait for the fire path: a write takes the job out of the table (cancelling its
//! recorded, unsent fires), writes the store, deleting those fires' rows in the same
//! transaction, and arms what it wrote. It waits only if a batch holding a fire of this very
//! job is being committed, so the store never keeps a fire of a replaced definition.

mod recorder;
mod retention;
mod sender;
mod table;

pub mod ownership;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::cluster::Leases;
use crate::delivery::{DeliveryHandle, DeliveryTask};
use crate::job::Job;
use crate::metrics;
use crate::store::{
    BatchOutcome, ExecKey, ExecStatus, NewFire, PendingDelivery, Store, StoreError,
};
use table::Table;

pub(crate) use table::Held;

/// How long a write waits for a batch holding a fire of its job before answering 503.
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler is shutting down")]
    Stopped,
    #[error("this node does not hold the job's slot")]
    NotOwner,
    #[error("a batch of this job's fires is still being recorded")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct SchedulerConfig {
    pub node_id: Arc<str>,
    pub catchup_window: Duration,
    /// How far ahead of their time fires are recorded.
    pub record_ahead: Duration,
    pub history_keep: u32,
    pub history_max_age: Duration,
}

/// A manual fire, as recorded.
#[derive(Debug, Clone)]
pub struct Triggered {
    pub scheduled_at: i64,
    pub fired_at: i64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub jobs: usize,
    pub armed: usize,
    pub unsent: usize,
}

struct Shared {
    table: Mutex<Table>,
    /// An arm made a time due within the horizon: the recorder should look now.
    record_wake: Notify,
    /// A recorded fire may now be the earliest to send.
    send_wake: Notify,
    /// A batch finished: writes waiting for it look again.
    batch_done: Notify,
    horizon_ms: i64,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("scheduler table lock")
    }
}

/// Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    store: Store,
    leases: Arc<Leases>,
    delivery: DeliveryHandle,
    node: Arc<str>,
    cancel: CancellationToken,
}

impl SchedulerHandle {
    /// Adds or replaces a job; it fires first at `due` (None: known but not armed). A job of
    /// a slot this node does not hold (it moved while the write ran) is not armed.
    pub fn arm(&self, job: Arc<Job>, due: Option<i64>) {
        if !self.leases.holds(job.slot) {
            return;
        }
        let earliest = self.shared.table().arm(job, due);
        self.wake_recorder(due, earliest);
        self.publish_stats();
    }

    /// Adds many jobs at once (a slot load).
    pub fn arm_many(&self, jobs: Vec<(Arc<Job>, Option<i64>)>) {
        let mut first = None::<i64>;
        let mut earliest = false;
        {
            let mut table = self.shared.table();
            for (job, due) in jobs {
                if let Some(d) = due {
                    first = Some(first.map_or(d, |e| e.min(d)));
                }
                earliest |= table.arm(job, due);
            }
        }
        self.wake_recorder(first, earliest);
        self.publish_stats();
    }

    /// Wakes the recorder if `due` is within the horizon (record it now) or is the table's
    /// new earliest time (the recorder's planned wake-up is too late for it).
    fn wake_recorder(&self, due: Option<i64>, earliest: bool) {
        if earliest || due.is_some_and(|d| d <= now_ms() + self.shared.horizon_ms) {
            self.shared.record_wake.notify_one();
        }
    }

    /// Queues fires handed back unsent by a slot's previous owner (pending rows at attempt
    /// 0) under their jobs, which must be armed already: a write of the job then cancels
    /// them like its own recorded fires. Returns those whose job is not in the table.
    pub fn adopt(&self, pending: Vec<PendingDelivery>) -> Vec<PendingDelivery> {
        let mut rest = Vec::new();
        {
            let mut table = self.shared.table();
            for p in pending {
                if !table.adopt(&p.key.job_id, p.slot, p.key.scheduled_at, p.fired_at) {
                    rest.push(p);
                }
            }
        }
        self.shared.send_wake.notify_one();
        self.publish_stats();
        rest
    }

    /// Takes a job out for a write: from now on none of its fires is recorded or sent until
    /// [`SchedulerHandle::arm`] (the write succeeded) or [`SchedulerHandle::restore`] (it
    /// failed). Its fires recorded but not sent are cancelled and listed in the result: the
    /// write deletes their rows in its own transaction. Waits while a batch holding a fire
    /// of this job is being committed.
    pub(crate) async fn hold(&self, id: &str) -> Result<Held, SchedulerError> {
        let deadline = tokio::time::Instant::now() + HOLD_TIMEOUT;
        loop {
            let done = self.shared.batch_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let now = now_ms();
            let held = self.shared.table().hold(id, now);
            if let Ok(mut held) = held {
                sender::dispatch(
                    std::mem::take(&mut held.due),
                    now,
                    &self.leases,
                    &self.delivery,
                );
                self.publish_stats();
                return Ok(held);
            }
            tokio::select! {
                _ = &mut done => {}
                _ = tokio::time::sleep_until(deadline) => return Err(SchedulerError::Busy),
                _ = self.cancel.cancelled() => return Err(SchedulerError::Stopped),
            }
        }
    }

    /// Puts back what [`SchedulerHandle::hold`] took, after a write that did not happen.
    pub(crate) fn restore(&self, held: Held) {
        let due = held.previous.as_ref().and_then(|(_, d)| *d);
        self.shared.table().restore(held);
        self.wake_recorder(due, true);
        self.shared.send_wake.notify_one();
        self.publish_stats();
    }

    /// Forgets every job of `slots`; returns the fires of theirs that were recorded but not
    /// sent, with their slots. With `wait` (a handover) first waits until no batch of theirs
    /// is being committed, so that everything recorded is either handed back or sent; a
    /// lost lease needs no wait (the fence refuses its batches).
    pub async fn drop_slots(&self, slots: &[u32], wait: bool) -> Vec<(ExecKey, u32)> {
        let slots: HashSet<u32> = slots.iter().copied().collect();
        let deadline = tokio::time::Instant::now() + HOLD_TIMEOUT;
        if wait {
            self.shared.table().disarm_slots(&slots);
            loop {
                let done = self.shared.batch_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !self.shared.table().in_flight_in(&slots) {
                    break;
                }
                tokio::select! {
                    _ = &mut done => {}
                    // A batch stuck on an unreachable database: its fires stay pending in the
                    // store (if it committed) for the next owner.
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.cancel.cancelled() => break,
                }
            }
        }
        let unsent = self.shared.table().drop_slots(&slots);
        self.publish_stats();
        unsent
            .into_iter()
            .map(|f| {
                (
                    ExecKey {
                        job_id: f.job.id.clone(),
                        scheduled_at: f.scheduled_at,
                    },
                    f.job.slot,
                )
            })
            .collect()
    }

    /// Fires the job now, out of schedule: recorded in its own batch, then sent at once.
    pub async fn trigger(&self, job: Arc<Job>) -> Result<Triggered, SchedulerError> {
        let now = now_ms();
        let scheduled_at = self.shared.table().manual_time(&job.id, now);
        let fire = NewFire {
            key: ExecKey {
                job_id: job.id.clone(),
                scheduled_at,
            },
            slot: job.slot,
            manual: true,
            fired_at: now,
            status: ExecStatus::Pending,
            next_attempt_at: Some(first_retry_at(&job, now)),
        };
        let leases = self.leases.epochs_of([job.slot]);
        if leases.is_empty() {
            return Err(SchedulerError::NotOwner);
        }
        let batch = recorder::new_batch_id();
        let mut fires = vec![fire];
        let outcome = loop {
            match self
                .store
                .record_batch(&self.node, batch, &fires, &[], &leases, now)
                .await
            {
                Ok(o) => break o,
                // Recorded by an earlier attempt whose reply was lost is `AlreadyCommitted`;
                // a row of this exact time from elsewhere is a clash: take the next ms.
                Err(StoreError::Recorded(_)) => {
                    fires[0].key.scheduled_at = self.shared.table().manual_time(&job.id, now);
                }
                Err(e) if e.is_unavailable() => {
                    // Unknown outcome: the same batch id settles it on the next try.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = self.cancel.cancelled() => return Err(SchedulerError::Stopped),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let lost = match outcome {
            BatchOutcome::Committed { lost_slots }
            | BatchOutcome::AlreadyCommitted { lost_slots } => lost_slots,
        };
        if !lost.is_empty() {
            return Err(SchedulerError::NotOwner);
        }
        let fire = &fires[0];
        metrics::FIRES.inc();
        self.delivery.submit(vec![DeliveryTask::first(
            fire.key.clone(),
            job.slot,
            fire.fired_at,
            job.target.clone(),
        )]);
        Ok(Triggered {
            scheduled_at: fire.key.scheduled_at,
            fired_at: fire.fired_at,
        })
    }

    pub fn stats(&self) -> Stats {
        let t = self.shared.table();
        Stats {
            jobs: t.len(),
            armed: t.armed(),
            unsent: t.unsent(),
        }
    }

    fn publish_stats(&self) {
        let s = self.stats();
        metrics::JOBS_LOADED.set(s.jobs as i64);
        metrics::FIRES_RECORDED_UNSENT.set(s.unsent as i64);
    }
}

/// When to retry attempt 1 should this node die before recording its outcome.
fn first_retry_at(job: &Job, fired_at: i64) -> i64 {
    fired_at + crate::delivery::retry_delay(&job.target.retry, 1, None).as_millis() as i64
}

/// Starts the recorder, the sender and the retention worker on `tracker`. Fires are fenced
/// by `leases`; leases found lost are reported on `lost_tx` as (slot, epoch).
pub fn spawn(
    config: SchedulerConfig,
    store: Store,
    delivery: DeliveryHandle,
    leases: Arc<Leases>,
    lost_tx: mpsc::UnboundedSender<Vec<(u32, i64)>>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> SchedulerHandle {
    let shared = Arc::new(Shared {
        table: Mutex::new(Table::default()),
        record_wake: Notify::new(),
        send_wake: Notify::new(),
        batch_done: Notify::new(),
        horizon_ms: config.record_ahead.as_millis() as i64,
    });
    let (prune_tx, prune_rx) = mpsc::unbounded_channel();
    tracker.spawn(retention::run(
        store.clone(),
        config.history_keep,
        config.history_max_age,
        prune_rx,
        cancel.clone(),
    ));
    tracker.spawn(
        recorder::Recorder {
            shared: shared.clone(),
            store: store.clone(),
            leases: leases.clone(),
            node: config.node_id.clone(),
            catchup_window_ms: config.catchup_window.as_millis() as i64,
            // Prune a job's history each time it has grown by half of what is kept: history
            // stays within 1.5 × `history_keep`, at two queries per `keep / 2` fires.
            prune_every: (config.history_keep / 2).max(1),
            fired_since_prune: Default::default(),
            counts_swept: std::time::Instant::now(),
            prune_tx,
            lost_tx,
            cancel: cancel.clone(),
            summary: Default::default(),
        }
        .run(),
    );
    tracker.spawn(sender::run(
        shared.clone(),
        leases.clone(),
        delivery.clone(),
        cancel.clone(),
    ));
    SchedulerHandle {
        shared,
        store,
        leases,
        delivery,
        node: config.node_id,
        cancel,
    }
}
