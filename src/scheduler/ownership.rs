//! Turns "the ring says I own these slots" into "I hold these slots' leases and their jobs
//! are armed here", and back.
//!
//! Every tick (and at once when the ring changes; bursts coalesce because the ring is a
//! `watch` value) the worker:
//! 1. renews the leases it holds, keeping those the database confirms;
//! 2. drops slots it should no longer own: disarm their jobs (the scheduler answers only
//!    after any batch in flight is recorded), then release the leases so the new owner can
//!    take them without waiting for expiry;
//! 3. acquires slots it should own that are free or expired, loads their jobs (a job whose
//!    stored next time is past is made up by the scheduler's catch-up) and their pending
//!    deliveries.
//!
//! Failover after a crash is therefore bounded by the lease TTL plus one tick plus the load.

use std::collections::{BTreeSet, HashMap};
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

pub struct Ownership {
    pub node_id: Arc<str>,
    pub store: Store,
    pub scheduler: SchedulerHandle,
    pub delivery: DeliveryHandle,
    pub leases: Arc<Leases>,
    pub cluster: Cluster,
    pub ring: watch::Receiver<Arc<crate::cluster::Ring>>,
    /// Slots the scheduler found it no longer holds (a fenced batch was refused).
    pub lost_rx: mpsc::UnboundedReceiver<Vec<u32>>,
    /// Set after the first pass: everything this node could take is loaded.
    pub first_pass: Option<tokio::sync::oneshot::Sender<()>>,
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
                Some(lost) = self.lost_rx.recv() => {
                    tracing::warn!(slots = lost.len(), "lost slot leases (fenced out); dropping their jobs");
                    self.drop_slots(&lost, false).await;
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
                    // Without the database this node can neither fire nor renew. Leave the
                    // ring so peers take its slots once the leases expire, instead of the
                    // slots waiting for this node's database to come back.
                    if !degraded && last_ok.elapsed() > LEASE_TTL {
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
        let held = self.leases.slots();
        if !held.is_empty() {
            let slots: Vec<u32> = held.iter().copied().collect();
            let renewed = self.store.renew_leases(&self.node_id, &slots, ttl).await?;
            let known = self.leases.snapshot();
            let lost: Vec<u32> = slots
                .iter()
                .copied()
                .filter(|s| renewed.get(s) != known.get(s))
                .collect();
            if !lost.is_empty() {
                tracing::warn!(
                    slots = lost.len(),
                    "leases expired or taken over; dropping their jobs"
                );
                self.drop_slots(&lost, false).await;
            }
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
        let acquired = self
            .store
            .acquire_leases(&self.node_id, &wanted, ttl)
            .await?;
        if acquired.is_empty() {
            return Ok(());
        }
        let slots: Vec<u32> = acquired.keys().copied().collect();
        // Publish the leases first: fires of these slots are fenced against this map.
        self.leases.extend(acquired);
        match self.load(&slots).await {
            Ok((jobs, pending)) => {
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
        self.delivery.submit(delivery::resume_tasks(pending));
        for c in chunks {
            self.scheduler
                .arm_many(c)
                .await
                .map_err(|_| StoreError::Corrupt("scheduler stopped".into()))?;
        }
        Ok((jobs, n))
    }

    /// Stops firing `slots` here; with `release`, frees their leases for the next owner.
    async fn drop_slots(&self, slots: &[u32], release: bool) {
        // The scheduler answers once no batch of these slots is in flight.
        if self.scheduler.drop_slots(slots.to_vec()).await.is_err() {
            return;
        }
        self.leases.remove(slots);
        if release && let Err(e) = self.store.release_leases(&self.node_id, slots).await {
            tracing::warn!(error = %e, "cannot release leases; they expire on their own");
        }
    }

    /// Graceful leave: stop firing everything, then release every lease at once.
    async fn leave(&mut self) {
        let slots: Vec<u32> = self.leases.slots().into_iter().collect();
        if slots.is_empty() {
            return;
        }
        // Bounded: during a database outage the scheduler is busy retrying its last batch
        // and only stops when the node cancels it, after this returns.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.scheduler.drop_slots(slots.clone()),
        )
        .await;
        self.leases.replace(HashMap::new());
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
