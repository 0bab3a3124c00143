//! Fires the node's jobs on time.
//!
//! One actor task owns every armed job in a [`timer::Timer`]. It sleeps until the earliest
//! due time, takes everything due, records the batch in the store in one transaction (the
//! durable fence: only fires whose rows this node inserted are dispatched), re-arms each job
//! at its next time and hands the fires to delivery.
//!
//! API writes go through the same actor: `disarm` → database write → `arm`. Because the actor
//! records a batch before it looks at the next command, once `disarm` has answered no fire of
//! the old definition is in flight, so after the API responds a paused, deleted or replaced
//! job never fires with its old definition.

pub mod ownership;
mod retention;
mod timer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{now_ms, now_us};
use crate::cluster::Leases;
use crate::delivery::{DeliveryHandle, DeliveryTask};
use crate::job::Job;
use crate::metrics;
use crate::store::{ExecKey, ExecStatus, NewFire, Progress, Store};

/// Most fires recorded in one transaction.
const MAX_BATCH: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler is shutting down")]
    Stopped,
    #[error("this node does not hold the job's slot")]
    NotOwner,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub struct SchedulerConfig {
    pub node_id: Arc<str>,
    pub catchup_window: Duration,
    pub history_keep: u32,
    pub history_max_age: Duration,
}

/// A manual fire, as recorded.
#[derive(Debug, Clone)]
pub struct Triggered {
    pub scheduled_at: i64,
    pub fired_at: i64,
}

enum Command {
    Arm {
        job: Arc<Job>,
        due: Option<i64>,
        done: oneshot::Sender<()>,
    },
    ArmMany {
        jobs: Vec<(Arc<Job>, Option<i64>)>,
        done: oneshot::Sender<()>,
    },
    Disarm {
        id: Arc<str>,
        done: oneshot::Sender<Option<(Arc<Job>, Option<i64>)>>,
    },
    DropSlots {
        slots: Vec<u32>,
        done: oneshot::Sender<usize>,
    },
    Trigger {
        job: Arc<Job>,
        done: oneshot::Sender<Result<Triggered, SchedulerError>>,
    },
    Stats {
        done: oneshot::Sender<Stats>,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub jobs: usize,
    pub armed: usize,
}

/// Cheap to clone; every call waits until the actor has applied it.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
}

impl SchedulerHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SchedulerError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(make(done))
            .await
            .map_err(|_| SchedulerError::Stopped)?;
        rx.await.map_err(|_| SchedulerError::Stopped)
    }

    /// Adds or replaces a job; it fires first at `due` (None: known but not armed).
    pub async fn arm(&self, job: Arc<Job>, due: Option<i64>) -> Result<(), SchedulerError> {
        self.call(|done| Command::Arm { job, due, done }).await
    }

    /// Adds many jobs in one command (start-up load).
    pub async fn arm_many(&self, jobs: Vec<(Arc<Job>, Option<i64>)>) -> Result<(), SchedulerError> {
        self.call(|done| Command::ArmMany { jobs, done }).await
    }

    /// Removes a job; returns what was armed so a failed write can restore it.
    pub async fn disarm(
        &self,
        id: &str,
    ) -> Result<Option<(Arc<Job>, Option<i64>)>, SchedulerError> {
        let id: Arc<str> = id.into();
        self.call(|done| Command::Disarm { id, done }).await
    }

    /// Forgets every job of `slots`; answers once no batch of them is in flight.
    pub async fn drop_slots(&self, slots: Vec<u32>) -> Result<usize, SchedulerError> {
        self.call(|done| Command::DropSlots { slots, done }).await
    }

    /// Fires the job now, out of schedule.
    pub async fn trigger(&self, job: Arc<Job>) -> Result<Triggered, SchedulerError> {
        self.call(|done| Command::Trigger { job, done }).await?
    }

    pub async fn stats(&self) -> Result<Stats, SchedulerError> {
        self.call(|done| Command::Stats { done }).await
    }
}

/// Starts the scheduler actor and its retention worker on `tracker`. Fires are fenced by
/// `leases`; slots found lost are reported on `lost_tx`.
pub fn spawn(
    config: SchedulerConfig,
    store: Store,
    delivery: DeliveryHandle,
    leases: Arc<Leases>,
    lost_tx: mpsc::UnboundedSender<Vec<u32>>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::channel(1024);
    let (prune_tx, prune_rx) = mpsc::unbounded_channel();
    tracker.spawn(retention::run(
        store.clone(),
        config.history_keep,
        config.history_max_age,
        prune_rx,
        cancel.clone(),
    ));
    let actor = Actor {
        catchup_window_ms: config.catchup_window.as_millis() as i64,
        // Prune a job's history each time it has grown by half of what is kept: history
        // stays within 1.5 × `history_keep`, at two queries per `keep / 2` fires. (A tenth
        // made thousands of jobs that fire together ask for pruning in the same second,
        // a visible stall in the fire path at 5,000 fires/s.)
        prune_every: (config.history_keep / 2).max(1),
        keep: config.history_keep,
        node: config.node_id,
        store,
        delivery,
        timer: timer::Timer::default(),
        rx,
        cancel,
        fired_since_prune: HashMap::new(),
        prune_tx,
        last_manual: HashMap::new(),
        leases,
        lost_tx,
    };
    tracker.spawn(actor.run());
    SchedulerHandle { tx }
}

struct Actor {
    node: Arc<str>,
    catchup_window_ms: i64,
    keep: u32,
    prune_every: u32,
    store: Store,
    delivery: DeliveryHandle,
    timer: timer::Timer,
    rx: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    fired_since_prune: HashMap<Arc<str>, u32>,
    prune_tx: mpsc::UnboundedSender<Arc<str>>,
    /// Last manual fire time per job in this process, so two triggers in one millisecond
    /// get distinct scheduled times instead of colliding on the primary key.
    last_manual: HashMap<Arc<str>, i64>,
    leases: Arc<Leases>,
    lost_tx: mpsc::UnboundedSender<Vec<u32>>,
}

impl Actor {
    async fn run(mut self) {
        loop {
            // Due fires come before commands so an API burst cannot delay them.
            if self.timer.next_due().is_some_and(|d| d <= now_ms()) {
                if !self.fire_due().await {
                    break;
                }
                continue;
            }
            let sleep = match self.timer.next_due() {
                Some(due) => Duration::from_micros((due * 1000 - now_us()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::debug!("scheduler stopped");
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Arm { job, due, done } => {
                self.timer.insert(job, due);
                let _ = done.send(());
            }
            Command::ArmMany { jobs, done } => {
                for (job, due) in jobs {
                    self.timer.insert(job, due);
                }
                let _ = done.send(());
            }
            Command::Disarm { id, done } => {
                self.last_manual.remove(&id);
                let _ = done.send(self.timer.remove(&id));
            }
            Command::DropSlots { slots, done } => {
                let slots: std::collections::HashSet<u32> = slots.into_iter().collect();
                let dropped = self.timer.remove_where(|job| slots.contains(&job.slot));
                let _ = done.send(dropped);
            }
            Command::Trigger { job, done } => {
                let _ = done.send(self.trigger(job).await);
            }
            Command::Stats { done } => {
                let _ = done.send(Stats {
                    jobs: self.timer.len(),
                    armed: self.timer.armed(),
                });
            }
        }
        metrics::JOBS_LOADED.set(self.timer.len() as i64);
    }

    async fn trigger(&mut self, job: Arc<Job>) -> Result<Triggered, SchedulerError> {
        let now = now_ms();
        let scheduled_at = match self.last_manual.get(&job.id) {
            Some(&last) if last >= now => last + 1,
            _ => now,
        };
        let fire = self.pending_fire(&job, scheduled_at, true, now);
        // A same-millisecond scheduled fire can hold the key; move on by a millisecond.
        let mut fire = fire;
        for _ in 0..5 {
            let recorded = self
                .store
                .record_fires(
                    &self.node,
                    std::slice::from_ref(&fire),
                    &[],
                    &self.leases.epochs_of([job.slot]),
                )
                .await?;
            if !recorded.lost_slots.is_empty() {
                return Err(SchedulerError::NotOwner);
            }
            if recorded.inserted.first() == Some(&true) {
                self.last_manual
                    .insert(job.id.clone(), fire.key.scheduled_at);
                metrics::FIRES.inc();
                self.delivery.submit(vec![self.task(&job, &fire)]);
                return Ok(Triggered {
                    scheduled_at: fire.key.scheduled_at,
                    fired_at: fire.fired_at,
                });
            }
            fire.key.scheduled_at += 1;
        }
        Err(SchedulerError::Store(crate::store::StoreError::Conflict))
    }

    fn pending_fire(&self, job: &Job, scheduled_at: i64, manual: bool, now: i64) -> NewFire {
        let fired_at = now.max(scheduled_at);
        NewFire {
            key: ExecKey {
                job_id: job.id.clone(),
                scheduled_at,
            },
            slot: job.slot,
            manual,
            fired_at,
            status: ExecStatus::Pending,
            // If this node dies before attempt 1's outcome is recorded, a restart retries then.
            next_attempt_at: Some(
                fired_at
                    + crate::delivery::retry_delay(&job.target.retry, 1, None).as_millis() as i64,
            ),
        }
    }

    fn task(&self, job: &Arc<Job>, fire: &NewFire) -> DeliveryTask {
        DeliveryTask {
            due: fire.fired_at,
            ..DeliveryTask::first(
                fire.key.clone(),
                job.slot,
                fire.fired_at,
                job.target.clone(),
            )
        }
    }

    /// Records and dispatches everything due. False if cancelled while the database was down.
    async fn fire_due(&mut self) -> bool {
        let now = now_ms();
        let window_start = now - self.catchup_window_ms;
        let mut fires: Vec<NewFire> = Vec::new();
        let mut fired_jobs: Vec<(Arc<Job>, usize)> = Vec::new();
        let mut progress: HashMap<Arc<str>, Progress> = HashMap::new();
        while fires.len() < MAX_BATCH {
            let Some((due, job)) = self.timer.pop_due(now) else {
                break;
            };
            let mut fire_at = due;
            if due < window_start {
                fire_at = self.collapse_missed(&job, due, window_start, now, &mut fires);
            }
            fired_jobs.push((job.clone(), fires.len()));
            fires.push(self.pending_fire(&job, fire_at, false, now));
            let next = job.schedule.next_after(fire_at, job.active_since);
            progress.insert(
                job.id.clone(),
                Progress {
                    job_id: job.id.clone(),
                    slot: job.slot,
                    last_fire_at: fire_at,
                    next_fire_at: next,
                },
            );
            if let Some(next) = next {
                self.timer.rearm(&job.id, next);
            }
        }
        let progress: Vec<Progress> = progress.into_values().collect();
        let started = std::time::Instant::now();
        let recorded = loop {
            let leases = self.leases.epochs_of(fires.iter().map(|f| f.slot));
            match self
                .store
                .record_fires(&self.node, &fires, &progress, &leases)
                .await
            {
                Ok(recorded) => break recorded,
                Err(e) => {
                    // Nothing is lost: the batch is retried until the database is back (or,
                    // on shutdown, made up after restart since last_fire_at did not move).
                    metrics::STORE_ERRORS.inc();
                    tracing::warn!(error = %e, fires = fires.len(), "cannot record fires, retrying in 1s");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return false,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        metrics::RECORD_BATCH_SECONDS.observe(started.elapsed().as_secs_f64());
        let inserted = recorded.inserted;
        if !recorded.lost_slots.is_empty() {
            // Another node holds these now (our lease expired, e.g. during a database outage):
            // their jobs are its to fire. Forget them here; ownership may re-acquire later.
            let lost: std::collections::HashSet<u32> =
                recorded.lost_slots.iter().copied().collect();
            self.timer.remove_where(|job| lost.contains(&job.slot));
            let _ = self.lost_tx.send(recorded.lost_slots);
        }
        let mut tasks = Vec::with_capacity(fired_jobs.len());
        for (job, idx) in fired_jobs {
            let fire = &fires[idx];
            metrics::FIRE_LAG_SECONDS.observe((now - fire.key.scheduled_at) as f64 / 1000.0);
            if inserted[idx] {
                metrics::FIRES.inc();
                tasks.push(self.task(&job, fire));
            } else if !self.leases.holds(job.slot) {
                metrics::FIRES_FENCED.inc();
            } else {
                metrics::FIRES_DEDUPED.inc();
                tracing::info!(job_id = %job.id, scheduled_at = fire.key.scheduled_at, "fire already recorded, not dispatched again");
            }
            self.count_for_pruning(&job.id);
        }
        self.delivery.submit(tasks);
        true
    }

    /// `due` is older than the make-up window: fire only the latest time at or before the
    /// window start, and record up to `keep` older ones as `missed` (the contract's rule, so a
    /// daily job missed during an outage fires once and an `@every 1s` job does not flood).
    fn collapse_missed(
        &self,
        job: &Job,
        due: i64,
        window_start: i64,
        now: i64,
        fires: &mut Vec<NewFire>,
    ) -> i64 {
        let latest = job
            .schedule
            .prev_at_or_before(window_start, job.active_since)
            .filter(|t| *t >= due)
            .unwrap_or(due);
        let mut t = latest;
        let mut recorded = 0;
        while recorded < self.keep {
            match job.schedule.prev_at_or_before(t - 1, job.active_since) {
                Some(p) if p >= due => {
                    fires.push(NewFire {
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
                    metrics::FIRES_MISSED.inc();
                    recorded += 1;
                    t = p;
                }
                _ => break,
            }
        }
        tracing::info!(job_id = %job.id, from = due, fired = latest, recorded_missed = recorded, "made up a fire missed beyond the catch-up window");
        latest
    }

    fn count_for_pruning(&mut self, id: &Arc<str>) {
        let n = self.fired_since_prune.entry(id.clone()).or_insert(0);
        *n += 1;
        if *n >= self.prune_every {
            self.fired_since_prune.remove(id);
            let _ = self.prune_tx.send(id.clone());
        }
    }
}
