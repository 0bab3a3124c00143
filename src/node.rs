//! Builds a node from its parts and runs it: the only module that knows all the others.
//!
//! Start-up: database (connect, migrate) → delivery → scheduler → HTTP listener (health
//! answers, `/v1` says 503 "starting") → gossip as `ready` → ownership takes the slot
//! leases the ring gives this node and loads their jobs and pending deliveries → ready.
//! Shutdown (SIGTERM): not ready, gossip `leaving` → stop firing and release every lease →
//! HTTP server drains → delivery gets `shutdown_grace` for attempts in flight (the rest stay
//! pending in the store for the slot's next owner) → gossip stops → close.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiConfig, ApiState};
use crate::cluster::{Cluster, ClusterConfig, ClusterError, Leases, MemberState, NODE_STALE_MS};
use crate::config::{Config, redact_url};
use crate::scheduler::SchedulerConfig;
use crate::scheduler::ownership::Ownership;
use crate::store::{Claim, Dialect, Store, StoreError};
use crate::{delivery, scheduler};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open database {url}: {source}; check --database-url and that the server is up")]
    Database { url: String, source: StoreError },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    #[error("http server failed: {0}")]
    Http(std::io::Error),
    #[error(
        "{path} is in use by another chime process (an embedded database has one node); stop \
         it, or give this one its own --database-url"
    )]
    DatabaseInUse { path: String },
    #[error(
        "node id {node_id:?} is in use by a running node at {http_addr} (seen {seen_ms_ago} ms \
         ago); give this node another --node-id, or stop the other one"
    )]
    NodeIdInUse {
        node_id: String,
        http_addr: String,
        seen_ms_ago: i64,
    },
    #[error("cannot lock {path}: {source}")]
    DatabaseLock {
        path: String,
        source: std::io::Error,
    },
}

impl NodeError {
    /// Fills in the (redacted) database URL of a database error raised without it.
    fn or_database(self, url: &str) -> NodeError {
        match self {
            NodeError::Database { source, .. } => NodeError::Database {
                url: redact_url(url),
                source,
            },
            other => other,
        }
    }
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
    // One process per embedded database: its leases never expire, so a second process on
    // the same file must be refused, not left to fight over them.
    let _sqlite_lock = match sqlite_path(&config.database_url) {
        Some(path) => Some(lock_database_file(&path)?),
        None => None,
    };
    let store = Store::connect(&config.database_url).await.map_err(db_err)?;
    store.migrate().await.map_err(db_err)?;
    store.ensure_lease_rows().await.map_err(db_err)?;
    warn_on_clock_skew(&store).await;
    let local_addr = listener.local_addr().map_err(NodeError::Http)?;
    let advertise_ip = advertise_ip(&config, local_addr);
    let http_advertise = SocketAddr::new(advertise_ip, local_addr.port());
    // Two processes under one id would both believe they hold its leases.
    let instance = if store.dialect() == Dialect::MySql {
        let addr = http_advertise.to_string();
        let claim = claim_node_id(&store, &config.node_id, &addr);
        Some(
            claim
                .await
                .map_err(|e| e.or_database(&config.database_url))?,
        )
    } else {
        None // the database file's lock already makes the node unique
    };

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(store.clone().run_checkpoints(cancel.child_token()));
    let leases = Arc::new(Leases::default());
    let delivery = delivery::spawn(
        delivery::DeliveryConfig {
            node_id: config.node_id.as_str().into(),
            concurrency: config.delivery_concurrency,
            per_target_concurrency: config.delivery_per_target_concurrency,
            outbound: config.outbound.clone(),
            consul_addr: config.consul_addr.clone(),
            shutdown_grace: config.shutdown_grace,
        },
        store.clone(),
        leases.clone(),
        cancel.child_token(),
        &tasks,
    )?;
    let (lost_tx, lost_rx) = tokio::sync::mpsc::unbounded_channel();
    let scheduler = scheduler::spawn(
        SchedulerConfig {
            node_id: config.node_id.as_str().into(),
            catchup_window: config.catchup_window,
            record_ahead: config.record_ahead,
            history_keep: config.history_keep,
            history_max_age: config.history_max_age,
        },
        store.clone(),
        delivery.clone(),
        leases.clone(),
        lost_tx.clone(),
        cancel.child_token(),
        &tasks,
    );

    let cluster = if store.dialect() == Dialect::Sqlite {
        // An embedded database cannot be shared: this node is the whole cluster.
        Cluster::solo(&config.node_id, http_advertise)
    } else {
        Cluster::join(
            ClusterConfig {
                node_id: config.node_id.clone(),
                cluster_id: config.cluster_id.clone(),
                gossip_addr: config.gossip_addr,
                gossip_advertise: SocketAddr::new(advertise_ip, config.gossip_addr.port()),
                http_advertise,
                seeds: config.seeds.clone(),
            },
            cancel.child_token(),
            &tasks,
        )
        .await?
    };
    let state = ApiState::new(
        ApiConfig {
            node_id: config.node_id.clone(),
            api_token: config.api_token.clone(),
            body: api::BodyRules {
                max_bytes: config.max_body_bytes,
                read_timeout: config.request_read_timeout,
            },
            rules: crate::job::TargetRules {
                outbound: config.outbound.clone(),
                consul: config.consul_addr.is_some(),
            },
        },
        store.clone(),
        scheduler.clone(),
        delivery.clone(),
        cluster.clone(),
        leases.clone(),
    );
    let app = api::router(state.clone());
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(api::serve(
        listener,
        app,
        config.request_read_timeout,
        http_stop.clone(),
    ));
    tracing::info!(node_id = %config.node_id, database = %redact_url(&config.database_url), "chime listening on http://{local_addr}");

    // Shutdown may be requested at any point from here on.
    let stop_requested = CancellationToken::new();
    {
        let stop_requested = stop_requested.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_requested.cancel();
        });
    }

    if let Some(instance) = &instance {
        tasks.spawn(heartbeat(
            store.clone(),
            config.node_id.clone(),
            instance.clone(),
            stop_requested.clone(),
            cancel.child_token(),
        ));
    }

    // Joining the ring as `ready` makes peers hand over this node's share; the ownership
    // worker takes the leases as they are released (or expire) and loads their jobs.
    cluster.set_state(MemberState::Ready).await;
    let started = Instant::now();
    let exclusive = store.dialect() == Dialect::Sqlite;
    let (first_pass_tx, first_pass_rx) = tokio::sync::oneshot::channel();
    let ownership_stop = CancellationToken::new();
    let renewal = (!exclusive).then(|| {
        tokio::spawn(scheduler::ownership::renew(
            config.node_id.as_str().into(),
            store.clone(),
            leases.clone(),
            lost_tx.clone(),
            ownership_stop.clone(),
        ))
    });
    let ownership = tokio::spawn(
        Ownership {
            node_id: config.node_id.as_str().into(),
            store: store.clone(),
            scheduler: scheduler.clone(),
            delivery: delivery.clone(),
            leases: leases.clone(),
            cluster: cluster.clone(),
            ring: cluster.ring_watch(),
            lost_rx,
            first_pass: Some(first_pass_tx),
            exclusive,
        }
        .run(ownership_stop.clone()),
    );
    tokio::select! {
        _ = first_pass_rx => {
            state.set_ready(true);
            tracing::info!(slots = leases.count(), elapsed_ms = started.elapsed().as_millis() as u64, "node ready");
            stop_requested.cancelled().await;
        }
        _ = stop_requested.cancelled() => {}
    }

    tracing::info!("shutting down: leaving the cluster");
    state.set_ready(false);
    cluster.set_state(MemberState::Leaving).await;
    // Stop firing and release every lease at once, so the next owners start within a tick.
    ownership_stop.cancel();
    let _ = ownership.await;
    if let Some(renewal) = renewal {
        let _ = renewal.await;
    }
    if let Some(instance) = &instance
        && let Err(e) = store.leave_node(&config.node_id, instance).await
    {
        tracing::warn!(error = %e, "cannot mark this node as left; peers will show it as dead until it is forgotten");
    }
    http_stop.cancel();
    // `serve` bounds its own drain; this only guards against a bug there.
    if tokio::time::timeout(Duration::from_secs(10), http)
        .await
        .is_err()
    {
        tracing::warn!("http server did not stop within 10s");
    }
    cancel.cancel();
    tasks.close();
    let deadline = config.shutdown_grace + Duration::from_secs(5);
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        tracing::warn!(
            "background tasks did not stop within {deadline:?}; exiting anyway (pending deliveries resume on the slot's next owner)"
        );
    }
    cluster.shutdown().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The address peers reach this node at: `--advertise-addr`, else the listen address, else
/// (listening on all interfaces) loopback, which only suits a single machine.
fn advertise_ip(config: &Config, local: SocketAddr) -> IpAddr {
    if let Some(ip) = config
        .advertise_addr
        .as_deref()
        .and_then(|a| a.parse::<IpAddr>().ok())
    {
        return ip;
    }
    if local.ip().is_unspecified() {
        tracing::warn!(
            "listening on all interfaces without --advertise-addr; advertising 127.0.0.1"
        );
        return IpAddr::from([127, 0, 0, 1]);
    }
    local.ip()
}

/// The file of a `sqlite:` database URL (None: another engine, or in memory).
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.contains(":memory:")).then(|| path.to_string())
}

/// Takes an exclusive lock on `<database>.lock`, held for the life of the returned file.
fn lock_database_file(db: &str) -> Result<std::fs::File, NodeError> {
    let path = format!("{db}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NodeError::DatabaseLock {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::DatabaseInUse { path: db.into() }),
        Err(std::fs::TryLockError::Error(source)) => Err(NodeError::DatabaseLock { path, source }),
    }
}

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Claims `node_id` in the registry for this process. A claim still fresh may be a process
/// that has just died (a crash restart): if nothing listens at its address any more, it is
/// taken at once; otherwise it is waited out, and refused if its holder keeps renewing it.
async fn claim_node_id(store: &Store, node_id: &str, http_addr: &str) -> Result<String, NodeError> {
    let instance = format!("{:016x}", rand::random::<u64>());
    let deadline = Instant::now() + Duration::from_millis(NODE_STALE_MS as u64 + 1000);
    let mut stale_ms = NODE_STALE_MS;
    let mut told = false;
    loop {
        let claim = store
            .claim_node_id(node_id, &instance, http_addr, stale_ms)
            .await
            .map_err(|e| NodeError::Database {
                url: String::new(),
                source: e,
            })?;
        let (holder, seen_ms_ago) = match claim {
            Claim::Claimed => return Ok(instance),
            Claim::InUse {
                http_addr,
                seen_ms_ago,
            } => (http_addr, seen_ms_ago),
        };
        if Instant::now() >= deadline {
            return Err(NodeError::NodeIdInUse {
                node_id: node_id.to_string(),
                http_addr: holder,
                seen_ms_ago,
            });
        }
        if stale_ms > 0 && nothing_listens_at(&holder).await {
            tracing::info!(node_id, previous = %holder, "taking over the node id of a process that has stopped");
            stale_ms = 0;
            continue;
        }
        if !told {
            told = true;
            tracing::warn!(node_id, holder = %holder, seen_ms_ago, "node id is held by another process; waiting up to {NODE_STALE_MS} ms in case it has just died");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A refused connection says no process listens at `addr` (a timeout says nothing).
async fn nothing_listens_at(addr: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(addr);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), connect).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Keeps this process's claim on its node id fresh. If another process has taken the id
/// (this one was silent for longer than [`NODE_STALE_MS`], e.g. cut off from the database),
/// this one stops: two nodes under one id would fight over its leases.
async fn heartbeat(
    store: Store,
    node_id: String,
    instance: String,
    stop: CancellationToken,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.heartbeat_node(&node_id, &instance).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    node_id,
                    "another process has taken this node id; stopping this node"
                );
                stop.cancel();
                return;
            }
            // The lease renewal reports database trouble; the claim just waits for it.
            Err(_) => {}
        }
    }
}

/// Leases are timed by the database's clock and fires by the node's: a large difference
/// between them makes fires late or a handover early. Worth one warning at start-up.
async fn warn_on_clock_skew(store: &Store) {
    const TOLERATED_MS: i64 = 1000;
    if let Ok(clock) = store.clock().await {
        let skew_ms = clock.now_ms - crate::clock::now_ms();
        if skew_ms.abs() > TOLERATED_MS {
            tracing::warn!(
                skew_ms,
                "the database's clock differs from this node's by more than {TOLERATED_MS} ms; \
                 synchronise both with NTP"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://chime.db").as_deref(),
            Some("chime.db")
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/x/c.db?mode=rwc").as_deref(),
            Some("/tmp/x/c.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("mysql://h/db"), None);
    }
}
