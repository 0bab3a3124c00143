//! Stage 3 of the fire path: hands each recorded fire to delivery at its instant. No store
//! access here: the fire's row (attempt 1, pending) was committed by the recorder.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use super::table::RecordedFire;
use crate::clock::{now_ms, now_us};
use crate::cluster::Leases;
use crate::delivery::{DeliveryHandle, DeliveryTask};
use crate::metrics;
use crate::store::ExecKey;

pub(super) async fn run(
    shared: Arc<Shared>,
    leases: Arc<Leases>,
    delivery: DeliveryHandle,
    cancel: CancellationToken,
) {
    let mut due = Vec::new();
    loop {
        let now = now_ms();
        let next = {
            let mut table = shared.table();
            table.take_sendable(now, &mut due);
            metrics::FIRES_RECORDED_UNSENT.set(table.unsent() as i64);
            table.next_to_send()
        };
        if !due.is_empty() {
            dispatch(std::mem::take(&mut due), now, &leases, &delivery);
        }
        let sleep = match next {
            Some(t) => Duration::from_micros((t * 1000 - now_us()).max(0) as u64),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = shared.send_wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    tracing::debug!("sender stopped");
}

/// Hands fires due by `now` to delivery, each while this node still holds its slot.
pub(super) fn dispatch(
    fires: Vec<RecordedFire>,
    now: i64,
    leases: &Leases,
    delivery: &DeliveryHandle,
) {
    if fires.is_empty() {
        return;
    }
    let mut tasks = Vec::with_capacity(fires.len());
    for f in fires {
        // A lease past its local deadline: the slot may be someone else's by now.
        // The row stays pending; the slot's next owner resumes it.
        if !leases.holds(f.job.slot) {
            metrics::FIRES_FENCED.inc();
            continue;
        }
        metrics::FIRES.inc();
        metrics::FIRE_LAG_SECONDS.observe((now - f.scheduled_at).max(0) as f64 / 1000.0);
        let key = ExecKey {
            job_id: f.job.id.clone(),
            scheduled_at: f.scheduled_at,
        };
        let mut task = DeliveryTask::first(key, f.job.slot, f.fired_at, f.job.target.clone());
        // A handed-back fire's row is at attempt 0: delivery claims attempt 1 before
        // sending, so that of two nodes that both think they hold it, one sends.
        task.attempt_persisted = f.claimed;
        tasks.push(task);
    }
    delivery.submit(tasks);
}
