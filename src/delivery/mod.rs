//! Delivers fires as callbacks, retrying until delivered or out of attempts.
//!
//! - The dispatcher task keeps deliveries waiting for a retry in one ordered set and starts
//!   each attempt as its own task. An attempt first takes a permit of its target (see
//!   [`limits`]: per-target concurrency and a circuit breaker), then one of the node's
//!   `concurrency`, so a slow downstream holds up only its own deliveries.
//! - HTTP goes through one shared keep-alive client, gRPC through one channel per
//!   destination ([`grpc`]), and `consul://` targets are resolved to a passing instance of
//!   the service ([`consul`]); an attempt that could not connect moves on to another instance
//!   at once, and the next attempt of a delivery avoids the instances that failed it.
//! - Attempt numbers are persisted before the attempt is sent (attempt 1 by the fire's own
//!   insert, later ones by [`Store::begin_attempt`]); a delivery resumed after a crash goes
//!   on with the next number.
//! - Outcomes are written by the recorder task in batches; a retry is re-queued only once its
//!   `next_attempt_at` is stored, so the queue in memory is always a subset of the durable one.

mod consul;
mod error;
mod grpc;
mod http;
mod limits;
mod outbound;
mod retry;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use outbound::OutboundPolicy;
pub use retry::retry_delay;

use crate::clock::{now_ms, now_us};
use crate::cluster::Leases;
use crate::job::{Callback, Target};
use crate::metrics;
use crate::store::{Begin, ExecKey, Fence, Outcome, PendingDelivery, Store, StoreError};
use consul::{Consul, Picked};
use error::AttemptError;
use grpc::GrpcClients;
use limits::{Admission, TargetState, Targets, Transition};

const OUTCOME_BATCH: usize = 500;
/// How often a delivery to a Consul service without a passing instance looks again.
const NO_INSTANCE_RECHECK_MS: i64 = 1000;

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
    /// The last attempt that may be made; `None`: the target's `retry.max_attempts`. A
    /// re-driven dead letter gets a fresh budget on top of the attempts already made.
    pub attempt_limit: Option<u32>,
    /// Consul instances that failed this delivery; its next attempt prefers others.
    pub avoid: Vec<Arc<str>>,
    /// When this delivery was handed to this node's delivery: a job deleted after that has
    /// cancelled it (see [`Deleted`]).
    pub queued: Instant,
    /// The attempts made so far, oldest first, at most [`MAX_LOGGED_ATTEMPTS`].
    pub log: Vec<AttemptEntry>,
}

/// Attempts kept in an execution's log: the newest.
const MAX_LOGGED_ATTEMPTS: usize = 10;
/// Characters of an attempt's error kept in the log.
const MAX_LOGGED_ERROR: usize = 300;

/// One attempt as the execution shows it (`attempt_history`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttemptEntry {
    pub attempt: u32,
    /// When its result came (RFC 3339, UTC).
    pub at: String,
    /// `succeeded`, `retrying` or `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeliveryTask {
    /// A fresh fire's first attempt, already persisted by the fire's insert.
    pub fn first(key: ExecKey, slot: u32, fired_at: i64, target: Arc<Target>) -> DeliveryTask {
        DeliveryTask {
            key,
            slot,
            attempt: 1,
            attempt_persisted: true,
            due: 0,
            fired_at,
            target,
            attempt_limit: None,
            avoid: Vec::new(),
            queued: Instant::now(),
            log: Vec::new(),
        }
    }

    fn attempt_limit(&self) -> u32 {
        self.attempt_limit.unwrap_or(self.target.retry.max_attempts)
    }

    /// Past its job's `retry.max_age_ms` at `now`. A re-driven dead letter (someone asked
    /// for it by hand) does not expire.
    fn expired(&self, now: i64) -> bool {
        self.expires_at().is_some_and(|at| now >= at)
    }

    /// When it expires (None: a re-driven delivery, which does not).
    fn expires_at(&self) -> Option<i64> {
        self.attempt_limit
            .is_none()
            .then(|| self.key.scheduled_at + self.target.retry.max_age_ms as i64 + 1)
    }

    /// Deferred until `until`, but looked at again when it expires, so that an expired
    /// delivery ends then, not when a long cool-down is over.
    fn defer(&mut self, until: i64) {
        self.due = self.expires_at().map_or(until, |at| until.min(at));
    }
}

/// The outcome that ends an expired delivery. Keyed by the attempts already stored (the
/// attempt it was waiting to make was never begun), so the outcome's compare-and-set holds.
fn expired_outcome(mut task: DeliveryTask) -> (DeliveryTask, AttemptResult) {
    if !task.attempt_persisted {
        task.attempt = task.attempt.saturating_sub(1);
        task.attempt_persisted = true;
    }
    let error = AttemptError::Expired {
        age_ms: now_ms().saturating_sub(task.key.scheduled_at),
        max_age_ms: task.target.retry.max_age_ms,
    };
    (task, Err(error))
}

/// Cheap to clone.
#[derive(Clone)]
pub struct DeliveryHandle {
    tx: mpsc::UnboundedSender<DeliveryTask>,
    deleted: Arc<Deleted>,
}

/// A first attempt is not re-checked against the store (its row was written by the fire
/// itself, and checking every fire would cost a query per fire). A job deleted while such
/// deliveries wait (for a permit, or behind an open circuit) must still stop them: deletes
/// are remembered here for [`DELETED_MEMORY`], and a delivery queued longer ago than
/// [`VERIFY_AFTER`] asks the store instead. `VERIFY_AFTER < DELETED_MEMORY`, so one of the
/// two always covers a delivery queued before the delete.
#[derive(Default)]
struct Deleted {
    jobs: Mutex<HashMap<Arc<str>, Instant>>,
}

const DELETED_MEMORY: Duration = Duration::from_secs(120);
const VERIFY_AFTER: Duration = Duration::from_secs(60);

impl Deleted {
    fn remember(&self, job_id: &str) {
        let now = Instant::now();
        let mut jobs = self.jobs.lock().expect("deleted jobs lock");
        // Pruned as it grows, so a burst of deletes costs amortised O(1) each.
        if jobs.len() >= 1024 && jobs.len().is_power_of_two() {
            jobs.retain(|_, at| now.duration_since(*at) < DELETED_MEMORY);
        }
        jobs.insert(job_id.into(), now);
    }

    /// The delivery's job was deleted after the delivery was queued.
    fn cancels(&self, task: &DeliveryTask) -> bool {
        self.jobs
            .lock()
            .expect("deleted jobs lock")
            .get(&*task.key.job_id)
            .is_some_and(|at| task.queued <= *at)
    }
}

impl DeliveryHandle {
    /// Called before a job's delete is written: no delivery of the job queued until now is
    /// started after this returns (one already being sent may finish).
    pub fn cancel_job(&self, job_id: &str) {
        self.deleted.remember(job_id);
    }

    pub fn submit(&self, tasks: Vec<DeliveryTask>) {
        for t in tasks {
            // Fails only after shutdown; the row stays pending and resumes after restart.
            let _ = self.tx.send(t);
        }
    }
}

pub struct DeliveryConfig {
    /// This node: attempts are fenced by its leases.
    pub node_id: Arc<str>,
    pub concurrency: usize,
    pub per_target_concurrency: usize,
    pub outbound: OutboundPolicy,
    /// The Consul agent resolving `consul://` targets.
    pub consul_addr: Option<String>,
    /// How long shutdown waits for attempts in flight.
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("consul_addr: {0}")]
    Consul(String),
    #[error(
        "cannot set up the callback HTTP client: {0} (is the ca-certificates package installed, \
         or SSL_CERT_FILE pointing at a readable CA bundle?)"
    )]
    HttpClient(String),
}

/// Starts the dispatcher and the outcome recorder (and Consul watches, as services are
/// used) on `tracker`.
pub fn spawn(
    config: DeliveryConfig,
    store: Store,
    leases: Arc<Leases>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<DeliveryHandle, DeliveryError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
    let handle = DeliveryHandle {
        tx,
        deleted: Arc::default(),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        // A followed redirect would reach an address the outbound policy never saw (IP
        // literals bypass the resolver) and carry the job's headers there: a 3xx is a
        // failed attempt instead.
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(outbound::CheckedResolver {
            policy: config.outbound.clone(),
        }))
        .user_agent(concat!("chime/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            DeliveryError::HttpClient(msg)
        })?;
    let consul = match &config.consul_addr {
        Some(addr) => Some(
            Consul::new(addr, cancel.clone(), tracker.clone()).map_err(DeliveryError::Consul)?,
        ),
        None => None,
    };
    let transports = Arc::new(Transports {
        http: client,
        grpc: GrpcClients::new(config.outbound.clone()),
        consul,
        outbound: config.outbound.clone(),
        targets: Targets::new(config.per_target_concurrency),
        permits: Arc::new(Semaphore::new(config.concurrency)),
    });
    let dispatcher = Dispatcher {
        node_id: config.node_id.clone(),
        store: store.clone(),
        transports,
        rx,
        waiting: BTreeMap::new(),
        seq: 0,
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
    Ok(handle)
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
                attempt_limit: p.attempt_limit,
                avoid: Vec::new(),
                queued: Instant::now(),
                log: p
                    .attempt_log
                    .as_deref()
                    .and_then(|l| serde_json::from_str(l).ok())
                    .unwrap_or_default(),
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

/// Everything an attempt needs to reach a target.
struct Transports {
    http: reqwest::Client,
    grpc: GrpcClients,
    consul: Option<Consul>,
    outbound: OutboundPolicy,
    targets: Targets,
    /// The node-wide concurrency limit, taken after the target's own.
    permits: Arc<Semaphore>,
}

type AttemptResult = Result<u16, AttemptError>;
type OutcomeTx = mpsc::UnboundedSender<(DeliveryTask, AttemptResult)>;

struct Dispatcher {
    node_id: Arc<str>,
    store: Store,
    transports: Arc<Transports>,
    rx: mpsc::UnboundedReceiver<DeliveryTask>,
    /// Tasks not due yet, by (due, arrival order).
    waiting: BTreeMap<(i64, u64), DeliveryTask>,
    seq: u64,
    attempts: TaskTracker,
    outcome_tx: OutcomeTx,
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
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = sweep.tick() => {
                    self.transports.targets.sweep(now_ms());
                    metrics::OPEN_CIRCUITS.set(self.transports.targets.open_circuits() as i64);
                }
            }
            self.start_due();
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
        // (async only to keep the select arm uniform)
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

    /// Starts every due task as its own attempt task; the attempt waits for its permits, so
    /// this loop never waits on a slow target.
    fn start_due(&mut self) {
        let now = now_ms();
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let mut task = entry.remove();
            if !self.leases.holds(task.slot) {
                // The slot moved: its new owner loaded this delivery from the store.
                continue;
            }
            if task.expired(now) {
                let _ = self.outcome_tx.send(expired_outcome(task));
                continue;
            }
            let dest = Destination::of(&task.target);
            let target = self.transports.targets.get(&dest.key);
            if let Some(until) = target.deferring(now) {
                // Circuit open: not sent, not charged an attempt, looked at again later.
                metrics::DELIVERIES_DEFERRED.inc();
                task.defer(until);
                self.enqueue(task);
                continue;
            }
            let ctx = AttemptCtx {
                node_id: self.node_id.clone(),
                deleted: self.requeue.deleted.clone(),
                store: self.store.clone(),
                transports: self.transports.clone(),
                dest,
                target,
                outcome_tx: self.outcome_tx.clone(),
                requeue: self.requeue.clone(),
                leases: self.leases.clone(),
                cancel: self.cancel.clone(),
            };
            self.attempts.spawn(ctx.run(task));
        }
        metrics::DELIVERIES_WAITING.set(self.waiting.len() as i64);
    }
}

/// Instances one attempt tries when they refuse the connection, before giving up.
const MAX_INSTANCES_PER_ATTEMPT: usize = 3;

/// The last instance tried could not be used: a refusal by the outbound policy must not
/// dead-letter a delivery that other (or later) instances can take, so it stays retryable.
fn no_instance_left(service: &str, last: AttemptError) -> AttemptError {
    match last {
        AttemptError::Refused(why) => AttemptError::Transport(format!(
            "consul service {service:?}: no usable instance ({why})"
        )),
        other => other,
    }
}

/// Where a target points, parsed once per attempt.
struct Destination {
    /// The callback URL (`http(s)://…` or `consul://…`), or why it does not parse.
    url: Result<reqwest::Url, String>,
    /// What limits and breaks circuits: `scheme://host:port`, or `consul://<service>`.
    key: String,
    /// The service of a `consul://` target.
    service: Option<String>,
}

impl Destination {
    fn of(target: &Target) -> Destination {
        let raw = match &target.callback {
            Callback::Http(h) => &h.url,
            Callback::Grpc(g) => &g.target,
        };
        match reqwest::Url::parse(raw) {
            Ok(u) => {
                let host = u.host_str().unwrap_or_default();
                let key = match u.port_or_known_default() {
                    Some(port) => format!("{}://{host}:{port}", u.scheme()),
                    None => format!("{}://{host}", u.scheme()),
                };
                let service = (u.scheme() == "consul").then(|| host.to_string());
                Destination {
                    url: Ok(u),
                    key,
                    service,
                }
            }
            Err(e) => Destination {
                url: Err(format!("bad target {raw}: {e}")),
                key: raw.clone(),
                service: None,
            },
        }
    }
}

struct AttemptCtx {
    node_id: Arc<str>,
    deleted: Arc<Deleted>,
    store: Store,
    transports: Arc<Transports>,
    dest: Destination,
    target: Arc<TargetState>,
    outcome_tx: OutcomeTx,
    requeue: DeliveryHandle,
    leases: Arc<Leases>,
    cancel: CancellationToken,
}

impl AttemptCtx {
    async fn run(self, task: DeliveryTask) {
        let mut probe = false;
        if let Some((task, result)) = self.attempt(task, &mut probe).await {
            let _ = self.outcome_tx.send((task, result));
        } else if probe {
            // The breaker's probe was not sent after all: the next delivery probes instead.
            self.target.record(None, now_ms());
        }
    }

    /// Waits for the permits and makes the attempt; None if it was not made (the task is
    /// re-queued, or it is not this node's to send any more).
    async fn attempt(
        &self,
        mut task: DeliveryTask,
        probe: &mut bool,
    ) -> Option<(DeliveryTask, AttemptResult)> {
        // The target's permit first: waiting for it must not hold one of the node's.
        let _target_permit = tokio::select! {
            p = self.target.permits.clone().acquire_owned() => p.ok()?,
            _ = self.cancel.cancelled() => return None,
        };
        // Decided only now: the circuit may have opened while this delivery waited.
        match self.target.admit(now_ms()) {
            Admission::Send => {}
            Admission::Probe => *probe = true,
            Admission::Defer(until) => {
                metrics::DELIVERIES_DEFERRED.inc();
                task.defer(until);
                self.requeue.submit(vec![task]);
                return None;
            }
        }
        if !self.leases.holds(task.slot) {
            return None;
        }
        // A Consul service with no passing instance: nothing can be sent, so the delivery
        // waits (re-checked every second) without being charged an attempt. Looked up
        // before taking a node-wide permit: waiting for Consul's first answer about a
        // service must not hold one.
        let picked = match self.pick_instance(&task.avoid).await {
            Ok(p) => p,
            Err(e) => {
                if task.expired(now_ms()) {
                    return Some(self.expire(task, probe));
                }
                tracing::debug!(job_id = %task.key.job_id, error = %e, "delivery waits for a passing instance");
                metrics::DELIVERIES_DEFERRED.inc();
                task.due = now_ms() + NO_INSTANCE_RECHECK_MS;
                self.requeue.submit(vec![task]);
                return None;
            }
        };
        let _node_permit = tokio::select! {
            p = self.transports.permits.clone().acquire_owned() => p.ok()?,
            _ = self.cancel.cancelled() => return None,
        };
        if !self.leases.holds(task.slot) {
            return None;
        }
        if task.expired(now_ms()) {
            return Some(self.expire(task, probe));
        }
        if self.deleted.cancels(&task) {
            return None;
        }
        let fence = Fence {
            node: self.node_id.clone(),
            slot: task.slot,
            epoch: self.leases.epochs_of([task.slot]).remove(&task.slot)?,
        };
        if !task.attempt_persisted {
            match self
                .store
                .begin_attempt(&task.key, task.attempt, &fence)
                .await
            {
                Ok(Begin::Started) => task.attempt_persisted = true,
                // Job deleted, or the delivery finished elsewhere: nothing to send.
                Ok(Begin::Gone) | Err(StoreError::Fenced(_)) => return None,
                // Begun already: by an earlier try of this statement whose reply was lost,
                // or by a former owner that may have sent it. Either way that number is
                // spent; go on with the next.
                Ok(Begin::Moved { attempts }) => {
                    if attempts >= task.attempt_limit() {
                        tracing::warn!(job_id = %task.key.job_id, scheduled_at = task.key.scheduled_at, attempts, "delivery's attempts are spent but it is still pending; it resumes when its slot is next loaded");
                        return None;
                    }
                    task.attempt = attempts + 1;
                    task.due = now_ms();
                    self.requeue.submit(vec![task]);
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, job_id = %task.key.job_id, "cannot persist attempt number, retrying in 1s");
                    task.due = now_ms() + 1000;
                    self.requeue.submit(vec![task]);
                    return None;
                }
            }
        } else if task.queued.elapsed() > VERIFY_AFTER {
            // Too old for the memory of deletes: ask the store whether it is still due.
            match self.store.still_pending(&task.key, task.attempt).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, job_id = %task.key.job_id, "cannot check a waiting delivery, retrying in 1s");
                    task.due = now_ms() + 1000;
                    self.requeue.submit(vec![task]);
                    return None;
                }
            }
        }
        let (result, failed_instance) = self.send(&task, picked).await;
        if task.attempt == 1 {
            metrics::DELIVERY_DELAY_SECONDS
                .observe((now_ms() - task.key.scheduled_at).max(0) as f64 / 1000.0);
        }
        let healthy = match &result {
            Ok(_) => Some(true),
            Err(e) if e.nothing_sent() => None,
            // One bad instance of a Consul service is ejection's business; the service's
            // breaker opens only when no instance is left to fail over to.
            Err(e) if e.is_downstream_failure() && !self.service_exhausted() => None,
            Err(e) => Some(!e.is_downstream_failure()),
        };
        // Only the probe may hand its role over; other unsent attempts say nothing.
        if healthy.is_some() || *probe {
            match self.target.record(healthy, now_ms()) {
                Transition::Opened => {
                    let error = result.as_ref().err().map(ToString::to_string);
                    tracing::warn!(target = %self.dest.key, failures = limits::OPEN_AFTER, last_error = error.as_deref().unwrap_or("-"), "target keeps failing; circuit opened, its deliveries wait");
                }
                Transition::Closed { open_ms } => {
                    tracing::info!(target = %self.dest.key, open_ms, "target answers again; circuit closed");
                }
                Transition::Unchanged => {}
            }
        }
        if let Some(id) = failed_instance
            && !task.avoid.contains(&id)
        {
            task.avoid.push(id);
        }
        Some((task, result))
    }

    /// Gives up a delivery past its maximum age: recorded as failed (`expired`), and the
    /// breaker's probe role, if this attempt had it, goes to the next delivery.
    fn expire(&self, task: DeliveryTask, probe: &mut bool) -> (DeliveryTask, AttemptResult) {
        if std::mem::take(probe) {
            self.target.record(None, now_ms());
        }
        expired_outcome(task)
    }

    /// For a non-Consul target always true: its one destination is the whole target.
    fn service_exhausted(&self) -> bool {
        match (&self.transports.consul, &self.dest.service) {
            (Some(consul), Some(service)) => consul.exhausted(service),
            _ => true,
        }
    }

    /// For a `consul://` target on a node with Consul: an instance to try first. The error
    /// means the service has no passing instance now.
    async fn pick_instance(&self, avoid: &[Arc<str>]) -> Result<Option<Picked>, AttemptError> {
        let Some(consul) = &self.transports.consul else {
            return Ok(None);
        };
        match &self.dest.service {
            Some(service) => consul.pick(service, avoid).await.map(Some),
            None => Ok(None),
        }
    }

    /// One attempt; for a Consul target also the instance that failed it, if one did.
    async fn send(
        &self,
        task: &DeliveryTask,
        first: Option<Picked>,
    ) -> (AttemptResult, Option<Arc<str>>) {
        let t = &*task.target;
        let a = http::Attempt {
            job_id: &task.key.job_id,
            scheduled_at: task.key.scheduled_at,
            fired_at: task.fired_at,
            attempt: task.attempt,
            payload: &t.payload,
            secret: t.secret.as_deref(),
        };
        let url = match &self.dest.url {
            Ok(u) => u.clone(),
            Err(e) => return (Err(AttemptError::Refused(e.clone())), None),
        };
        if self.dest.service.is_none() {
            let result = match &t.callback {
                Callback::Http(cb) => {
                    http::send(
                        &self.transports.http,
                        &self.transports.outbound,
                        cb,
                        url,
                        &a,
                    )
                    .await
                }
                Callback::Grpc(cb) => self
                    .transports
                    .grpc
                    .send(&cb.target, cb.timeout_ms, &a)
                    .await
                    .map(|()| 0),
            };
            return (result, None);
        }
        let (Some(consul), Some(mut picked)) = (&self.transports.consul, first) else {
            // Retryable: during a rolling change of --consul-addr another node may send it.
            return (
                Err(AttemptError::Transport(
                    "consul:// target, but this node runs without --consul-addr".into(),
                )),
                None,
            );
        };
        let service = self.dest.service.clone().unwrap_or_default();
        // Instances that could not be connected to, or are refused by the outbound policy:
        // nothing was sent to them, so another one is tried within the same attempt.
        let mut skipped: Vec<Arc<str>> = Vec::new();
        loop {
            let result = self.send_to(task, &a, &url, &picked).await;
            let id = picked.instance().id.clone();
            let healthy = !matches!(&result, Err(e) if e.is_downstream_failure());
            if !matches!(&result, Err(e) if e.nothing_sent()) {
                picked.report(healthy);
            }
            match result {
                Err(e @ (AttemptError::Connect(_) | AttemptError::Refused(_)))
                    if skipped.len() < MAX_INSTANCES_PER_ATTEMPT =>
                {
                    tracing::debug!(service, instance = %id, error = %e, "instance not usable; trying another");
                    skipped.push(id.clone());
                    let avoid: Vec<Arc<str>> = task.avoid.iter().chain(&skipped).cloned().collect();
                    match consul.pick(&service, &avoid).await {
                        Ok(next) if !skipped.contains(&next.instance().id) => picked = next,
                        // No other instance: report this one's failure.
                        _ => return (Err(no_instance_left(&service, e)), Some(id)),
                    }
                }
                Err(e @ (AttemptError::Connect(_) | AttemptError::Refused(_))) => {
                    return (Err(no_instance_left(&service, e)), Some(id));
                }
                Err(e) => return (Err(e), (!healthy).then_some(id)),
                Ok(s) => return (Ok(s), None),
            }
        }
    }

    async fn send_to(
        &self,
        task: &DeliveryTask,
        a: &http::Attempt<'_>,
        url: &reqwest::Url,
        picked: &Picked,
    ) -> AttemptResult {
        let inst = picked.instance();
        if let Ok(ip) = inst.host.parse::<std::net::IpAddr>()
            && let Err(e) = self.transports.outbound.check(ip)
        {
            return Err(AttemptError::Refused(format!(
                "refused: consul instance {}: {e}",
                inst.id
            )));
        }
        match &task.target.callback {
            Callback::Http(cb) => {
                let mut resolved = format!("http://{}{}", inst.authority(), url.path());
                if let Some(q) = url.query() {
                    resolved.push('?');
                    resolved.push_str(q);
                }
                match reqwest::Url::parse(&resolved) {
                    Ok(u) => {
                        http::send(&self.transports.http, &self.transports.outbound, cb, u, a).await
                    }
                    Err(e) => Err(AttemptError::Transport(format!(
                        "consul instance {}: bad address: {e}",
                        inst.id
                    ))),
                }
            }
            Callback::Grpc(cb) => self
                .transports
                .grpc
                .send(&format!("http://{}", inst.authority()), cb.timeout_ms, a)
                .await
                .map(|()| 0),
        }
    }
}

/// Writes outcomes in batches and re-queues retries once they are stored. Up to
/// [`Store::parallel_writers`] batches are written at once: a herd delivers thousands of
/// callbacks a second, and one MySQL transaction at a time fell behind them.
async fn record_outcomes(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<(DeliveryTask, AttemptResult)>,
    requeue: DeliveryHandle,
    stop: CancellationToken,
) {
    let writers = store.parallel_writers();
    let mut writing = tokio::task::JoinSet::new();
    let mut unrecorded = 0usize;
    // Runs until every sender is gone or the dispatcher gives up on the stragglers, so the
    // outcomes of attempts that completed during shutdown are still written.
    loop {
        let mut batch = Vec::with_capacity(OUTCOME_BATCH);
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
        while writing.len() >= writers {
            unrecorded += writing.join_next().await.and_then(Result::ok).unwrap_or(0);
        }
        writing.spawn(write_outcomes(
            store.clone(),
            batch,
            requeue.clone(),
            stop.clone(),
        ));
    }
    while let Some(n) = writing.join_next().await {
        unrecorded += n.unwrap_or(0);
    }
    if unrecorded > 0 {
        tracing::warn!(
            outcomes = unrecorded,
            "shut down without recording some delivery outcomes (no database); those deliveries stay pending and resume, as a further attempt, on the slot's next owner"
        );
    }
}

/// Returns how many outcomes were given up on (shutting down without a database).
async fn write_outcomes(
    store: Store,
    batch: Vec<(DeliveryTask, AttemptResult)>,
    requeue: DeliveryHandle,
    stop: CancellationToken,
) -> usize {
    let mut batch = batch;
    for (task, result) in &mut batch {
        log_attempt(task, result);
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
                if stop.is_cancelled() {
                    // Shutting down without a database: the rows stay pending and their
                    // deliveries resume (with the next attempt number) on the next owner.
                    // Counted, and logged once by the caller.
                    return rows.len();
                }
                tracing::warn!(error = %e, outcomes = rows.len(), "cannot record delivery outcomes, retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut expired = 0usize;
    for (((task, result), (_, _, outcome)), applied) in batch.into_iter().zip(rows).zip(applied) {
        match outcome {
            Outcome::Succeeded { .. } => metrics::DELIVERIES.inc("succeeded"),
            // Expiry comes in bursts (a target down for a day): one summary line below.
            Outcome::Failed { .. } if matches!(result, Err(AttemptError::Expired { .. })) => {
                metrics::DELIVERIES.inc("expired");
                expired += 1;
            }
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
                    let mut next = DeliveryTask {
                        attempt: task.attempt + 1,
                        attempt_persisted: false,
                        ..task
                    };
                    next.defer(next_attempt_at);
                    requeue.submit(vec![next]);
                }
            }
        }
    }
    if expired > 0 {
        tracing::warn!(
            deliveries = expired,
            "deliveries expired (not delivered within their job's retry.max_age_ms); they are listed as failed and can be re-driven"
        );
    }
    0
}

fn outcome_of(task: &DeliveryTask, result: &AttemptResult) -> Outcome {
    let snapshot = || serde_json::to_string(&*task.target).unwrap_or_default();
    // Empty only for a first attempt that succeeded: the row implies its one entry.
    let log = (!task.log.is_empty())
        .then(|| serde_json::to_string(&task.log).ok())
        .flatten();
    match result {
        Ok(status) => Outcome::Succeeded {
            status: *status,
            log,
        },
        Err(e) if e.is_retryable() && task.attempt < task.attempt_limit() => {
            // A re-driven delivery's backoff starts over with its fresh budget.
            let redriven_after = task
                .attempt_limit
                .map_or(0, |l| l.saturating_sub(task.target.retry.max_attempts));
            let delay = retry_delay(
                &task.target.retry,
                task.attempt.saturating_sub(redriven_after).max(1),
                e.retry_after(),
            );
            Outcome::Retry {
                next_attempt_at: now_ms() + delay.as_millis() as i64,
                error: e.to_string(),
                status: e.status(),
                request: snapshot(),
                log,
            }
        }
        Err(e) if e.is_retryable() => Outcome::Failed {
            error: format!("gave up after {} attempts: {e}", task.attempt),
            status: e.status(),
            request: snapshot(),
            log,
        },
        Err(e @ AttemptError::Expired { .. }) => Outcome::Failed {
            error: e.to_string(),
            status: None,
            request: snapshot(),
            log,
        },
        Err(e) => Outcome::Failed {
            error: format!("not retried: {e}"),
            status: e.status(),
            request: snapshot(),
            log,
        },
    }
}

/// Adds the attempt just made to the delivery's log (an expiry is not an attempt). A first
/// attempt that succeeded, the bulk of all deliveries, is left out: the row says it all, and
/// the delivery path does no work for it.
fn log_attempt(task: &mut DeliveryTask, result: &AttemptResult) {
    if result.is_ok() && task.attempt == 1 && task.log.is_empty() {
        return;
    }
    let (outcome, status, error) = match result {
        Ok(status) => ("succeeded", Some(*status), None),
        Err(AttemptError::Expired { .. }) => return,
        Err(e) => {
            let outcome = if e.is_retryable() && task.attempt < task.attempt_limit() {
                "retrying"
            } else {
                "failed"
            };
            let error: String = e.to_string().chars().take(MAX_LOGGED_ERROR).collect();
            (outcome, e.status(), Some(error))
        }
    };
    if task.log.len() >= MAX_LOGGED_ATTEMPTS {
        task.log.remove(0);
    }
    task.log.push(AttemptEntry {
        attempt: task.attempt,
        at: crate::clock::fmt_ms(now_ms()),
        outcome: outcome.into(),
        status,
        error,
    });
}
