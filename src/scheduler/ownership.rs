//! Turns "the ring says I own these slots" into "I hold these slots' leases and their jobs
//! are armed here", and back.
//!
//! Renewal runs in its own task ([`renew`]) on its own database connections, so a long
//! slot load or a busy fire path never delays it; each renewal moves the leases' local
//! deadline (see [`Leases`]). A node that is the database's only user (SQLite, guarded by a
//! file lock) takes every lease once, never to expire, and renews nothing.
//!
//! Every tick (and at once when the ring changes; bursts coalesce because the ring is a
//! `watch` value) the worker:
//! 1. drops slots whose lease renewal found lost;
//! 2. drops slots it should no longer own: disarm their jobs (the scheduler answers only
//!    after any batch in flight is recorded), then release the leases so the new owner can
//!    take them without waiting for expiry;
//! 3. acquires slots it should own that are free or expired, loads their jobs (a job whose
//!    stored next time is past is made up by the scheduler's catch-up) and their pending
//!    deliveries.
//!
//! Failover after a crash is therefore bounded by the lease TTL plus one tick plus the load.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::SchedulerHandle;
use crate::cluster::{Cluster, Leases, MemberState};
use crate::delivery::{self, DeliveryHandle};
use crate::job::Job;
use crate::store::{Store, StoreError};

/// How long a lease lasts without renewal. A crashed node's slots are taken over after this.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// Renewal and reconcile period; several renewals fit in one TTL, so a slow database
/// round trip or two does not lose leases.
pub const TICK: Duration = Duration::from_millis(500);
/// A lease is trusted locally until TTL − this after the renewal that confirmed it was sent:
/// the margin covers clock-rate differences and the time a fire takes to leave.
const LOCAL_MARGIN: Duration = Duration::from_secs(1);
/// Longest a handover waits for job writes of its slots to end.
const WRITES_WAIT: Duration = Duration::from_secs(5);

pub struct Ownership {
    pub node_id: Arc<str>,
    pub store: Store,
    pub scheduler: SchedulerHandle,
    pub delivery: DeliveryHandle,
    pub leases: Arc<Leases>,
    pub cluster: Cluster,
    pub ring: watch::Receiver<Arc<crate::cluster::Ring>>,
    /// Slots the scheduler found it no longer holds (a fenced batch was refused).
    pub lost_rx: mpsc::UnboundedReceiver<Vec<(u32, i64)>>,
    /// Set after the first pass: everything this node could take is loaded.
    pub first_pass: Option<tokio::sync::oneshot::Sender<()>>,
    /// The database is this node's alone (SQLite): leases never expire.
    pub exclusive: bool,
}

impl Ownership {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        let mut degraded = false;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(mut lost) = self.lost_rx.recv() => {
                    while let Ok(more) = self.lost_rx.try_recv() {
                        lost.extend(more);
                    }
                    // Reports about an older lease of a slot held again since are stale.
                    let lost = self.leases.still_at(&lost);
                    if !lost.is_empty() {
                        tracing::warn!(slots = lost.len(), "lost slot leases (taken over or expired); dropping their jobs");
                        self.drop_slots(&lost, false).await;
                    }
                    continue;
                }
                changed = self.ring.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
            }
            let result = self.reconcile().await;
            let pass_ok = result.is_ok();
            match result {
                Ok(()) => {
                    last_ok = Instant::now();
                    if degraded {
                        degraded = false;
                        tracing::info!("database reachable again; rejoining the ring");
                        self.cluster.set_state(MemberState::Ready).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ownership pass failed; retrying next tick");
                    // A pass can fail with the database up (a lock wait on rows of a peer
                    // that was cut off mid-transaction): that is no reason to leave.
                    if !self.exclusive && self.store.ping().await.is_ok() {
                        last_ok = Instant::now();
                    }
                    // Without the database this node can neither fire nor renew. Leave the
                    // ring so peers take its slots once the leases expire, instead of the
                    // slots waiting for this node's database to come back.
                    if !self.exclusive && !degraded && last_ok.elapsed() > LEASE_TTL {
                        degraded = true;
                        tracing::warn!(
                            "database unreachable for longer than the lease TTL; leaving the ring until it is back"
                        );
                        self.cluster.set_state(MemberState::Joining).await;
                    }
                }
            }
            // Ready once a pass ran with this node in the ring: before the first gossip round
            // the ring is empty and a pass would "succeed" holding nothing.
            let in_ring = self
                .ring
                .borrow()
                .members()
                .iter()
                .any(|m| **m == *self.node_id);
            if in_ring
                && pass_ok
                && let Some(done) = self.first_pass.take()
            {
                let _ = done.send(());
            }
        }
        self.leave().await;
    }

    async fn reconcile(&mut self) -> Result<(), StoreError> {
        let ttl = LEASE_TTL.as_millis() as i64;
        if !self.exclusive {
            // Peers can take over this node's share only if it notices it lost the database.
            self.store.ping().await?;
        }
        // A lease past its local deadline may be someone else's by now: its jobs are dropped
        // (the store's rows are consistent) and the slot is acquired again, at a new epoch,
        // and reloaded.
        let lapsed = self.leases.lapsed();
        if !lapsed.is_empty() {
            tracing::warn!(
                slots = lapsed.len(),
                "slot leases lapsed without renewal; dropping their jobs until they are acquired again"
            );
            self.drop_slots(&lapsed, false).await;
        }
        let ring = self.ring.borrow_and_update().clone();
        let desired: BTreeSet<u32> = ring.slots_of(&self.node_id).into_iter().collect();
        let held = self.leases.slots();
        let lost: Vec<u32> = held.difference(&desired).copied().collect();
        if !lost.is_empty() {
            tracing::info!(slots = lost.len(), "handing over slots");
            self.drop_slots(&lost, true).await;
        }
        let wanted: Vec<u32> = desired.difference(&held).copied().collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (acquired, valid_until) = if self.exclusive {
            (
                self.store.acquire_exclusive(&self.node_id, &wanted).await?,
                None,
            )
        } else {
            let acquired = self
                .store
                .acquire_leases(&self.node_id, &wanted, ttl)
                .await?;
            (acquired, Some(started + LEASE_TTL - LOCAL_MARGIN))
        };
        if acquired.is_empty() {
            return Ok(());
        }
        let slots: Vec<u32> = acquired.keys().copied().collect();
        // Publish the leases first: fires of these slots are fenced against this map.
        self.leases.extend(acquired, valid_until);
        match self.load(&slots).await {
            Ok((jobs, pending)) => {
                self.leases.mark_loaded(&slots);
                crate::metrics::REBALANCE_SECONDS.observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    slots = slots.len(),
                    still_wanted = wanted.len() - slots.len(),
                    jobs,
                    pending,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "took over slots"
                );
                Ok(())
            }
            Err(e) => {
                // Half-loaded slots must not fire: give them back and try again next tick.
                self.drop_slots(&slots, true).await;
                Err(e)
            }
        }
    }

    /// Queues the pending deliveries and arms the jobs of newly held slots, in that order:
    /// once armed, a job can record a make-up fire as pending, and reading pending rows after
    /// that would queue the same fire twice.
    async fn load(&self, slots: &[u32]) -> Result<(u64, usize), StoreError> {
        let pending = self.store.load_pending(slots).await?;
        let n = pending.len();
        let mut chunk = Vec::new();
        let mut chunks = Vec::new();
        let jobs = self
            .store
            .for_each_job_in(slots, |rec| {
                match Job::from_stored(&rec.id, rec.slot, &rec.spec, rec.paused, rec.active_since) {
                    // The stored next time is where the job stands; a past one is made up.
                    Ok(job) => chunk.push((Arc::new(job), if rec.paused { None } else { rec.next_fire_at })),
                    Err(e) => tracing::error!(job_id = %rec.id, error = %e, "stored job cannot be read; it will not fire until replaced"),
                }
                if chunk.len() >= 10_000 {
                    chunks.push(std::mem::take(&mut chunk));
                }
                Ok(())
            })
            .await?;
        chunks.push(chunk);
        // Fires the previous owner recorded and handed back unsent (attempt 0) join their
        // jobs in the scheduler, where a write cancels them; everything else is a delivery
        // to resume.
        let (handed_back, resumed): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|p| p.attempts == 0 && p.request.is_empty());
        self.delivery.submit(delivery::resume_tasks(resumed));
        for c in chunks {
            self.scheduler.arm_many(c);
        }
        let orphans = self.scheduler.adopt(handed_back);
        self.delivery.submit(delivery::resume_tasks(orphans));
        Ok((jobs, n))
    }

    /// Stops firing `slots` here; with `release`, hands their recorded, unsent fires back
    /// to the queue (so the next owner sends attempt 1 on time) and frees their leases for
    /// the next owner.
    async fn drop_slots(&self, slots: &[u32], release: bool) {
        // A handover first waits for job writes of these slots to end: a write that took a
        // job's recorded fires out of the scheduler puts them back (or arms its own) before
        // they are handed over. Bounded: a write whose outcome is being settled against an
        // unreachable database may hold its slot for a minute.
        let _writes = if release {
            self.stop_writes(slots).await
        } else {
            None
        };
        let unsent = self.scheduler.drop_slots(slots, release).await;
        if release {
            let leases = self.leases.epochs_of(slots.iter().copied());
            if let Err(e) = self.store.hand_back(&self.node_id, &leases, &unsent).await {
                tracing::warn!(error = %e, fires = unsent.len(), "cannot hand back recorded fires; the next owner resumes them as attempt 2");
            }
        }
        self.leases.remove(slots);
        if release && let Err(e) = self.store.release_leases(&self.node_id, slots).await {
            tracing::warn!(error = %e, "cannot release leases; they expire on their own");
        }
    }

    /// Waits (bounded by [`WRITES_WAIT`]) for job writes of `slots` to end, and keeps new
    /// ones waiting while the guards live; they then find the leases gone.
    async fn stop_writes(&self, slots: &[u32]) -> Option<Vec<crate::cluster::WriteGuard>> {
        tokio::time::timeout(WRITES_WAIT, self.leases.lock_writes(slots))
            .await
            .ok()
    }

    /// Graceful leave: stop firing everything, hand back what was recorded and not sent,
    /// then release every lease at once.
    async fn leave(&mut self) {
        let slots: Vec<u32> = self.leases.slots().into_iter().collect();
        if slots.is_empty() {
            return;
        }
        // As in a handover: writes end first, and later ones find no lease.
        let _writes = self.stop_writes(&slots).await;
        // Bounded: during a database outage a batch may be stuck retrying.
        let unsent = self.scheduler.drop_slots(&slots, true).await;
        let leases = self.leases.epochs_of(slots.iter().copied());
        match tokio::time::timeout(
            Duration::from_secs(3),
            self.store.hand_back(&self.node_id, &leases, &unsent),
        )
        .await
        {
            Ok(Ok(())) => {}
            _ => tracing::warn!(
                fires = unsent.len(),
                "cannot hand back recorded fires; the next owner resumes them as attempt 2"
            ),
        }
        self.leases.clear();
        match tokio::time::timeout(
            Duration::from_secs(3),
            self.store.release_leases(&self.node_id, &slots),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(slots = slots.len(), "released slot leases"),
            _ => tracing::warn!("could not release leases; they expire within {LEASE_TTL:?}"),
        }
    }
}

/// Renews this node's leases every [`TICK`] and moves their local deadline; reports slots
/// the database no longer confirms on `lost_tx`. Runs beside the ownership worker so that
/// neither a long slot load nor fire traffic delays a renewal.
pub async fn renew(
    node_id: Arc<str>,
    store: Store,
    leases: Arc<Leases>,
    lost_tx: mpsc::UnboundedSender<Vec<(u32, i64)>>,
    cancel: CancellationToken,
) {
    let ttl = LEASE_TTL.as_millis() as i64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let known = leases.snapshot();
        if known.is_empty() {
            continue;
        }
        let slots: Vec<u32> = known.keys().copied().collect();
        let sent_at = Instant::now();
        match store.renew_leases(&node_id, &slots, ttl).await {
            Ok(renewed) => {
                if failing_since.take().is_some() {
                    tracing::info!("lease renewal works again");
                }
                leases.renewed(&renewed, sent_at + LEASE_TTL - LOCAL_MARGIN);
                let mut lost: Vec<(u32, i64)> = known
                    .iter()
                    .filter(|(s, e)| renewed.get(s) != Some(e))
                    .map(|(s, e)| (*s, *e))
                    .collect();
                // Slots released (a handover) while the renewal ran are not lost.
                let still_held = leases.still_at(&lost);
                lost.retain(|(s, _)| still_held.contains(s));
                if !lost.is_empty() {
                    tracing::warn!(
                        slots = lost.len(),
                        "leases expired or taken over; dropping their jobs"
                    );
                    let _ = lost_tx.send(lost);
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(error = %e, "cannot renew slot leases; fires stop when they expire locally, and resume once renewal works");
                }
            }
        }
    }
}
