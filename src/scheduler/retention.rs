//! Keeps execution history bounded: the newest `keep` per job, and nothing finished older
//! than `max_age`. Pending deliveries are never pruned. Fire batch ids go after an hour.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::store::Store;

const AGE_SWEEP_EVERY: Duration = Duration::from_secs(60);
const AGE_SWEEP_ROWS: u32 = 10_000;
const FIRE_BATCH_KEEP_MS: i64 = 3_600_000;
/// Jobs whose history is pruned in one transaction.
const PRUNE_GROUP: usize = 500;
const GATHER: Duration = Duration::from_secs(1);

/// `jobs_rx` receives ids of jobs whose history grew by a tenth of `keep`.
pub(super) async fn run(
    store: Store,
    keep: u32,
    max_age: Duration,
    mut jobs_rx: mpsc::UnboundedReceiver<Arc<str>>,
    cancel: CancellationToken,
) {
    let mut sweep = tokio::time::interval(AGE_SWEEP_EVERY);
    let mut due: BTreeSet<Arc<str>> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(id) = jobs_rx.recv() => {
                due.insert(id);
                // Nothing here is urgent: let a second's requests gather, so that thousands
                // of jobs firing together are pruned in a few commits, not one each.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(GATHER) => {}
                }
                while let Ok(id) = jobs_rx.try_recv() {
                    due.insert(id);
                }
                while !due.is_empty() {
                    let group: Vec<Arc<str>> =
                        std::iter::from_fn(|| due.pop_first()).take(PRUNE_GROUP).collect();
                    if let Err(e) = store.prune_job_history(&group, keep).await {
                        tracing::warn!(error = %e, jobs = group.len(), "cannot prune execution history, will retry");
                        due.extend(group);
                        break;
                    }
                    if cancel.is_cancelled() {
                        return;
                    }
                }
            }
            _ = sweep.tick() => {
                // A batch id is looked up only while its commit's outcome is unknown, seconds
                // after it was written; an hour is ample.
                if let Err(e) = store.prune_fire_batches(now_ms() - FIRE_BATCH_KEEP_MS).await {
                    tracing::warn!(error = %e, "cannot prune fire batch ids, will retry");
                }
                let cutoff = now_ms() - max_age.as_millis() as i64;
                loop {
                    match store.prune_older_than(cutoff, AGE_SWEEP_ROWS).await {
                        Ok(n) if n == u64::from(AGE_SWEEP_ROWS) && !cancel.is_cancelled() => continue,
                        Ok(n) => {
                            if n > 0 {
                                tracing::debug!(rows = n, "pruned old executions");
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot prune old executions, will retry");
                            break;
                        }
                    }
                }
            }
        }
    }
}
