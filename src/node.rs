//! Builds a node from its parts and runs it: the only module that knows all the others.
//!
//! Start-up: database (connect, migrate) → delivery → scheduler → HTTP listener (health
//! answers, `/v1` says 503 "starting") → load jobs and pending deliveries → ready.
//! Shutdown: not ready → HTTP server drains → scheduler and delivery stop (attempts in
//! flight get `shutdown_grace` to finish; the rest stay pending in the store) → close.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiConfig, ApiState};
use crate::clock::now_ms;
use crate::config::{Config, redact_url};
use crate::job::Job;
use crate::scheduler::{SchedulerConfig, SchedulerHandle};
use crate::store::{Store, StoreError};
use crate::{delivery, scheduler};

/// Jobs armed per scheduler command while loading.
const LOAD_CHUNK: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open database {url}: {source}; check --database-url and that the server is up")]
    Database { url: String, source: StoreError },
    #[error("cannot load jobs: {0}")]
    Load(StoreError),
    #[error("http server failed: {0}")]
    Http(std::io::Error),
}

/// Runs a node on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let db_err = |source| NodeError::Database {
        url: redact_url(&config.database_url),
        source,
    };
    let store = Store::connect(&config.database_url).await.map_err(db_err)?;
    store.migrate().await.map_err(db_err)?;

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let delivery = delivery::spawn(
        delivery::DeliveryConfig {
            concurrency: config.delivery_concurrency,
            shutdown_grace: config.shutdown_grace,
        },
        store.clone(),
        cancel.child_token(),
        &tasks,
    );
    let scheduler = scheduler::spawn(
        SchedulerConfig {
            node_id: config.node_id.as_str().into(),
            catchup_window: config.catchup_window,
            history_keep: config.history_keep,
            history_max_age: config.history_max_age,
        },
        store.clone(),
        delivery.clone(),
        cancel.child_token(),
        &tasks,
    );

    let local_addr = listener.local_addr().map_err(NodeError::Http)?;
    let state = ApiState::new(
        ApiConfig {
            node_id: config.node_id.clone(),
            http_addr: local_addr.to_string(),
            api_token: config.api_token.clone(),
        },
        store.clone(),
        scheduler.clone(),
    );
    let app = api::router(state.clone(), config.max_body_bytes);
    let http_stop = CancellationToken::new();
    let http = {
        let stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(node_id = %config.node_id, database = %redact_url(&config.database_url), "chime listening on http://{local_addr}");

    // Shutdown may be requested while loading; watch for it from here on.
    let stop_requested = CancellationToken::new();
    {
        let stop_requested = stop_requested.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_requested.cancel();
        });
    }

    let loaded = tokio::select! {
        r = load(&store, &scheduler, &delivery) => Some(r),
        _ = stop_requested.cancelled() => None,
    };
    match loaded {
        Some(Ok(())) => {
            state.set_ready(true);
            stop_requested.cancelled().await;
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "start-up failed");
            stop(&http_stop, http, &cancel, &tasks, &store, &config).await;
            return Err(e);
        }
        None => {}
    }
    tracing::info!("shutting down");
    state.set_ready(false);
    stop(&http_stop, http, &cancel, &tasks, &store, &config).await;
    tracing::info!("stopped");
    Ok(())
}

async fn stop(
    http_stop: &CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
    store: &Store,
    config: &Config,
) {
    // API first, so no write races the scheduler's exit; then the background workers.
    http_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), http).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server ended with an error"),
        Err(_) => tracing::warn!("http server did not drain within 5s"),
        _ => {}
    }
    cancel.cancel();
    tasks.close();
    let deadline = config.shutdown_grace + Duration::from_secs(5);
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        tracing::warn!(
            "background tasks did not stop within {deadline:?}; exiting anyway (pending deliveries resume after restart)"
        );
    }
    store.close().await;
}

/// Arms every stored job and queues every pending delivery.
async fn load(
    store: &Store,
    scheduler: &SchedulerHandle,
    delivery: &delivery::DeliveryHandle,
) -> Result<(), NodeError> {
    let started = Instant::now();
    let now = now_ms();
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    let mut chunks = Vec::new();
    let mut broken = 0u64;
    let total = store
        .for_each_job(|rec| {
            match Job::from_stored(&rec.id, rec.slot, &rec.spec, rec.paused, rec.active_since) {
                Ok(job) => {
                    // The stored next time is where this job stands; one in the past is made
                    // up by the scheduler's normal catch-up (within the window, then once).
                    let due = if rec.paused { None } else { rec.next_fire_at };
                    chunk.push((Arc::new(job), due));
                    if chunk.len() == LOAD_CHUNK {
                        chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK)));
                    }
                }
                Err(e) => {
                    broken += 1;
                    tracing::error!(job_id = %rec.id, error = %e, "stored job cannot be read; it will not fire until it is replaced");
                }
            }
            Ok(())
        })
        .await
        .map_err(NodeError::Load)?;
    chunks.push(chunk);
    for c in chunks {
        scheduler
            .arm_many(c)
            .await
            .map_err(|_| NodeError::Load(StoreError::Corrupt("scheduler stopped".into())))?;
    }
    let pending = store.load_pending().await.map_err(NodeError::Load)?;
    let resumed = pending.len();
    delivery.submit(delivery::resume_tasks(pending));
    tracing::info!(
        jobs = total,
        unreadable = broken,
        pending_deliveries = resumed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        behind_ms = now_ms() - now,
        "jobs loaded, node ready"
    );
    Ok(())
}
