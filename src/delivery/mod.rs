//! Delivers fires as callbacks, retrying until delivered or out of attempts.
//!
//! - The dispatcher task keeps deliveries waiting for a retry in one ordered set and starts
//!   each attempt as its own task, at most `concurrency` at a time, on one shared keep-alive
//!   HTTP client.
//! - Attempt numbers are persisted before the attempt is sent (attempt 1 by the fire's own
//!   insert, later ones by [`Store::begin_attempt`]); a delivery resumed after a crash goes
//!   on with the next number.
//! - Outcomes are written by the recorder task in batches; a retry is re-queued only once its
//!   `next_attempt_at` is stored, so the queue in memory is always a subset of the durable one.

mod http;
mod outbound;
mod retry;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use outbound::OutboundPolicy;
pub use retry::retry_delay;

use crate::clock::{now_ms, now_us};
use crate::cluster::Leases;
use crate::job::{Callback, Target};
use crate::metrics;
use crate::store::{ExecKey, Outcome, PendingDelivery, Store};

const OUTCOME_BATCH: usize = 500;

/// One attempt to make.
#[derive(Debug, Clone)]
pub struct DeliveryTask {
    pub key: ExecKey,
    /// The job's slot: a delivery is attempted only while this node holds the slot.
    pub slot: u32,
    pub attempt: u32,
    /// True when `attempt` is already stored (attempt 1 of a fresh fire).
    pub attempt_persisted: bool,
    /// Not before this time (unix ms).
    pub due: i64,
    pub fired_at: i64,
    pub target: Arc<Target>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct DeliveryHandle {
    tx: mpsc::UnboundedSender<DeliveryTask>,
}

impl DeliveryHandle {
    pub fn submit(&self, tasks: Vec<DeliveryTask>) {
        for t in tasks {
            // Fails only after shutdown; the row stays pending and resumes after restart.
            let _ = self.tx.send(t);
        }
    }
}

pub struct DeliveryConfig {
    pub concurrency: usize,
    pub outbound: OutboundPolicy,
    /// How long shutdown waits for attempts in flight.
    pub shutdown_grace: Duration,
}

/// Starts the dispatcher and the outcome recorder on `tracker`.
pub fn spawn(
    config: DeliveryConfig,
    store: Store,
    leases: Arc<Leases>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> DeliveryHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
    let handle = DeliveryHandle { tx };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .dns_resolver(Arc::new(outbound::CheckedResolver {
            policy: config.outbound.clone(),
        }))
        .user_agent(concat!("chime/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with static settings builds");
    let dispatcher = Dispatcher {
        store: store.clone(),
        client,
        rx,
        waiting: BTreeMap::new(),
        seq: 0,
        permits: Arc::new(Semaphore::new(config.concurrency)),
        outbound: config.outbound.clone(),
        attempts: TaskTracker::new(),
        outcome_tx,
        recorder_stop: CancellationToken::new(),
        requeue: handle.clone(),
        leases,
        cancel: cancel.clone(),
        grace: config.shutdown_grace,
    };
    let recorder_stop = dispatcher.recorder_stop.clone();
    tracker.spawn(dispatcher.run());
    tracker.spawn(record_outcomes(
        store,
        outcome_rx,
        handle.clone(),
        recorder_stop,
    ));
    handle
}

/// Turns stored pending deliveries into tasks: each resumes with its next attempt number.
/// Rows whose snapshot cannot be read are reported and left for an operator.
pub fn resume_tasks(pending: Vec<PendingDelivery>) -> Vec<DeliveryTask> {
    pending
        .into_iter()
        .filter_map(|p| match stored_target(&p) {
            Ok(target) => Some(DeliveryTask {
                key: p.key,
                slot: p.slot,
                attempt: p.attempts + 1,
                attempt_persisted: false,
                due: p.next_attempt_at,
                fired_at: p.fired_at,
                target: Arc::new(target),
            }),
            Err(e) => {
                tracing::error!(job_id = %p.key.job_id, scheduled_at = p.key.scheduled_at, error = %e, "stored delivery snapshot is unreadable; leaving it pending");
                None
            }
        })
        .collect()
}

/// The delivery's own snapshot if it has one, else the job's current definition.
fn stored_target(p: &PendingDelivery) -> Result<Target, String> {
    if !p.request.is_empty() {
        return serde_json::from_str::<Target>(&p.request).map_err(|e| e.to_string());
    }
    let spec = p.job_spec.as_deref().ok_or("the job no longer exists")?;
    serde_json::from_str::<crate::job::StoredSpec>(spec)
        .map(|s| s.target())
        .map_err(|e| e.to_string())
}

struct Dispatcher {
    store: Store,
    client: reqwest::Client,
    rx: mpsc::UnboundedReceiver<DeliveryTask>,
    /// Tasks not due yet, by (due, arrival order).
    waiting: BTreeMap<(i64, u64), DeliveryTask>,
    seq: u64,
    permits: Arc<Semaphore>,
    outbound: OutboundPolicy,
    attempts: TaskTracker,
    outcome_tx: mpsc::UnboundedSender<(DeliveryTask, Result<u16, http::AttemptError>)>,
    /// Tells the recorder that no more outcomes are worth waiting for: attempts still running
    /// after the grace period are abandoned (their rows stay pending).
    recorder_stop: CancellationToken,
    requeue: DeliveryHandle,
    leases: Arc<Leases>,
    cancel: CancellationToken,
    grace: Duration,
}

impl Dispatcher {
    async fn run(mut self) {
        loop {
            let sleep = match self.waiting.first_key_value() {
                Some(((due, _), _)) => Duration::from_micros((due * 1000 - now_us()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                task = self.rx.recv() => match task {
                    Some(task) => self.accept(task).await,
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => {}
            }
            self.start_due().await;
        }
        // Let attempts in flight finish (their outcomes get recorded); whatever is still
        // running after the grace period stays pending in the store and resumes on restart.
        self.attempts.close();
        if tokio::time::timeout(self.grace, self.attempts.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "callbacks still in flight at shutdown; they resume after restart");
        }
        self.recorder_stop.cancel();
        metrics::DELIVERIES_WAITING.set(0);
    }

    async fn accept(&mut self, task: DeliveryTask) {
        self.enqueue(task);
        while let Ok(task) = self.rx.try_recv() {
            self.enqueue(task);
        }
    }

    fn enqueue(&mut self, task: DeliveryTask) {
        self.seq += 1;
        self.waiting.insert((task.due, self.seq), task);
        metrics::DELIVERIES_WAITING.set(self.waiting.len() as i64);
    }

    async fn start_due(&mut self) {
        let now = now_ms();
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = self.cancel.cancelled() => return,
            };
            let task = entry.remove();
            if !self.leases.holds(task.slot) {
                // The slot moved: its new owner loaded this delivery from the store.
                drop(permit);
                continue;
            }
            let store = self.store.clone();
            let client = self.client.clone();
            let outcome_tx = self.outcome_tx.clone();
            let requeue = self.requeue.clone();
            let outbound = self.outbound.clone();
            self.attempts.spawn(async move {
                let _permit = permit;
                attempt(store, client, outbound, task, outcome_tx, requeue).await;
            });
        }
        metrics::DELIVERIES_WAITING.set(self.waiting.len() as i64);
    }
}

async fn attempt(
    store: Store,
    client: reqwest::Client,
    outbound: OutboundPolicy,
    mut task: DeliveryTask,
    outcome_tx: mpsc::UnboundedSender<(DeliveryTask, Result<u16, http::AttemptError>)>,
    requeue: DeliveryHandle,
) {
    if !task.attempt_persisted {
        match store.begin_attempt(&task.key, task.attempt).await {
            Ok(true) => task.attempt_persisted = true,
            // Job deleted, or the delivery finished elsewhere: nothing to send.
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, job_id = %task.key.job_id, "cannot persist attempt number, retrying in 1s");
                task.due = now_ms() + 1000;
                requeue.submit(vec![task]);
                return;
            }
        }
    }
    let target = task.target.clone();
    let Callback::Http(cb) = &target.callback;
    let result = http::send(
        &client,
        &outbound,
        cb,
        &http::Attempt {
            job_id: &task.key.job_id,
            scheduled_at: task.key.scheduled_at,
            fired_at: task.fired_at,
            attempt: task.attempt,
            payload: &target.payload,
            secret: target.secret.as_deref(),
        },
    )
    .await;
    if task.attempt == 1 {
        metrics::DELIVERY_DELAY_SECONDS
            .observe((now_ms() - task.key.scheduled_at).max(0) as f64 / 1000.0);
    }
    let _ = outcome_tx.send((task, result));
}

/// Writes outcomes in batches and re-queues retries once they are stored.
async fn record_outcomes(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<(DeliveryTask, Result<u16, http::AttemptError>)>,
    requeue: DeliveryHandle,
    stop: CancellationToken,
) {
    // Runs until every sender is gone or the dispatcher gives up on the stragglers, so the
    // outcomes of attempts that completed during shutdown are still written.
    let mut batch = Vec::with_capacity(OUTCOME_BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, OUTCOME_BATCH) => n,
            _ = stop.cancelled() => {
                while batch.len() < OUTCOME_BATCH {
                    match rx.try_recv() {
                        Ok(o) => batch.push(o),
                        Err(_) => break,
                    }
                }
                batch.len()
            }
        };
        if n == 0 {
            break;
        }
        let rows: Vec<_> = batch
            .iter()
            .map(|(task, result)| (task.key.clone(), task.attempt, outcome_of(task, result)))
            .collect();
        let applied = loop {
            match store.record_outcomes(&rows).await {
                Ok(applied) => break applied,
                Err(e) => {
                    metrics::STORE_ERRORS.inc();
                    tracing::warn!(error = %e, outcomes = rows.len(), "cannot record delivery outcomes, retrying in 1s");
                    if stop.is_cancelled() {
                        // Shutting down without a database: the rows stay pending and their
                        // deliveries resume (with the next attempt number) on the next owner.
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        for (((task, _), (_, _, outcome)), applied) in batch.drain(..).zip(rows).zip(applied) {
            match outcome {
                Outcome::Succeeded { .. } => metrics::DELIVERIES.inc("succeeded"),
                Outcome::Failed { error, .. } => {
                    metrics::DELIVERIES.inc("failed");
                    tracing::warn!(job_id = %task.key.job_id, scheduled_at = task.key.scheduled_at, attempt = task.attempt, error = %error, "delivery failed for good");
                }
                Outcome::Retry {
                    next_attempt_at,
                    error,
                    ..
                } => {
                    metrics::DELIVERIES.inc("retried");
                    tracing::debug!(job_id = %task.key.job_id, attempt = task.attempt, error = %error, "attempt failed, will retry");
                    if applied {
                        requeue.submit(vec![DeliveryTask {
                            attempt: task.attempt + 1,
                            attempt_persisted: false,
                            due: next_attempt_at,
                            ..task
                        }]);
                    }
                }
            }
        }
    }
}

fn outcome_of(task: &DeliveryTask, result: &Result<u16, http::AttemptError>) -> Outcome {
    let snapshot = || serde_json::to_string(&*task.target).unwrap_or_default();
    match result {
        Ok(status) => Outcome::Succeeded { status: *status },
        Err(e) if e.is_retryable() && task.attempt < task.target.retry.max_attempts => {
            let delay = retry_delay(&task.target.retry, task.attempt, e.retry_after());
            Outcome::Retry {
                next_attempt_at: now_ms() + delay.as_millis() as i64,
                error: e.to_string(),
                status: e.status(),
                request: snapshot(),
            }
        }
        Err(e) if e.is_retryable() => Outcome::Failed {
            error: format!("gave up after {} attempts: {e}", task.attempt),
            status: e.status(),
            request: snapshot(),
        },
        Err(e) => Outcome::Failed {
            error: format!("not retried: {e}"),
            status: e.status(),
            request: snapshot(),
        },
    }
}
