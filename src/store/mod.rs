//! Durable state: jobs and executions, in SQLite (embedded, single node) or MySQL/MariaDB.
//!
//! One code path serves both through sqlx's `Any` driver; the few statements whose syntax
//! differs are chosen by [`Dialect`]. Times are stored as unix milliseconds (`BIGINT`), which
//! `Any` can carry on both backends, and JSON as text.
//!
//! The `executions` primary key `(job_id, scheduled_at)` is the exactly-once fence: a fire
//! is dispatched only by the writer whose insert created the row.

mod executions;
mod jobs;
mod leases;
mod nodes;

use std::future::Future;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Connection, Row};

pub use executions::{
    BatchOutcome, Begin, ExecKey, ExecStatus, ExecutionRecord, NewFire, Outcome, PendingDelivery,
    Progress, Redrive,
};
pub use jobs::{JobRecord, Precondition, PutOutcome};
pub use leases::{Fence, NEVER_EXPIRES};
pub use nodes::{Claim, NodeRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or timed out: worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A row with this key exists already.
    #[error("already exists")]
    Conflict,
    /// A stored row could not be read back (edited by hand, or a newer schema).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database did not answer in time (e.g. a frozen connection during a network
    /// partition); the operation was abandoned together with its connection.
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    /// The slot's lease is not this node's (at the epoch it believed) any more: the slot is
    /// moving to another node, and the write was not made.
    #[error("this node no longer holds slot {0}'s lease")]
    Fenced(u32),
    /// The stored job is not the one a conditional write asked for (`current`: its version,
    /// None if there is none); nothing was written.
    #[error("the job does not match the precondition")]
    PreconditionFailed { current: Option<i64> },
    /// Some fires of a batch were recorded already (by whoever recorded them first, who
    /// dispatches them); the batch was not written and must be retried without them.
    #[error("{} fires of the batch were recorded already", .0.len())]
    Recorded(Vec<ExecKey>),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            // SQLITE_BUSY / SQLITE_LOCKED: another writer held the lock past busy_timeout.
            sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("5" | "6")) => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Query(e),
        }
    }
}

/// Deadline of one store operation. sqlx has no statement timeout, and a statement on a
/// connection frozen by a partition would otherwise wait for TCP to give up (many minutes),
/// stalling the scheduler or the ownership worker long after the database is back.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of bulk reads (loading the jobs of many slots) and of migrations.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How often SQLite's write-ahead log is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Set on every SQLite connection.
/// - WAL lets readers run beside the single writer; `busy_timeout` makes writers wait for
///   the lock instead of failing at once.
/// - A fire batch dirties a few thousand scattered index pages: a larger cache keeps them
///   from spilling mid-transaction.
/// - Checkpoints run beside the writers ([`Store::run_checkpoints`]); copying the log back
///   inside a writer's COMMIT took 60-90 ms of a 2,000-fire batch's 150. The
///   autocheckpoint is only the backstop.
const SQLITE_PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA cache_size = -32768",
    "PRAGMA wal_autocheckpoint = 20000",
];

/// Every MySQL session reads committed data. chime's writes are conditional statements that
/// check what they need (the lease fence, `attempts`, `status`) on the latest committed row,
/// so repeatable-read snapshots buy nothing; its gap and next-key locks, though, made fire
/// batches deadlock with job writes and lease releases that touched neighbouring keys.
///
/// Lock waits end after [`LOCK_WAIT_SECS`], before chime's own deadline on the statement:
/// with the server's 50 s a statement chime had given up on kept its pooled connection busy,
/// and a node whose control connections all waited on rows of a peer cut off mid-transaction
/// could not renew its own leases. A session idle for [`IDLE_SESSION_SECS`] is closed by the
/// server: that is what ends the open transaction of a node cut off from the database, and
/// with it the locks its peers wait for.
async fn set_mysql_session(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    // Lease times come from `UNIX_TIMESTAMP(NOW(3))`, which converts through the session's
    // zone: in a zone with DST the autumn hour repeats and a lease would look valid an hour
    // longer. sqlx sends UTC by default, but a `timezone=` URL parameter overrides that.
    sqlx::query("SET time_zone = '+00:00'")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    let sql = format!(
        "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECS}, wait_timeout = {IDLE_SESSION_SECS}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

const LOCK_WAIT_SECS: u32 = 3;
const IDLE_SESSION_SECS: u32 = 30;

/// What [`Store::clock`] reads.
#[derive(Debug, Clone)]
pub struct DbClock {
    pub now_ms: i64,
    pub time_zone: String,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Lease renewal, acquisition and pings: connections of their own, so a pool busy with
    /// API writes and fire batches never makes a lease expire (MySQL; on SQLite the same
    /// pool, whose writes are serialized anyway).
    control: AnyPool,
    /// SQLite has one writer: write transactions queue here, in order, instead of polling
    /// SQLite's busy handler (whose sleeps of up to 100 ms showed as API latency).
    write_gate: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    dialect: Dialect,
}

impl Store {
    /// Connects (creating a missing SQLite file) and checks the connection works.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (url, dialect, max_conns) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (sqlite_url(rest), Dialect::Sqlite, 6)
        } else {
            (url.to_string(), Dialect::MySql, 16)
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(StoreError::Unavailable)?
            .disable_statement_logging();
        let control_options = options.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(max_conns)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            // Before the server's `wait_timeout` closes them under the pool.
            .idle_timeout(Duration::from_secs(20))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        for pragma in SQLITE_PRAGMAS {
                            sqlx::query(*pragma).execute(&mut *conn).await?;
                        }
                    } else {
                        set_mysql_session(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        let (control, write_gate) = match dialect {
            Dialect::Sqlite => (pool.clone(), Some(Default::default())),
            Dialect::MySql => (
                AnyPoolOptions::new()
                    .max_connections(2)
                    .min_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .idle_timeout(Duration::from_secs(20))
                    .after_connect(|conn, _| Box::pin(set_mysql_session(conn)))
                    .connect_with(control_options)
                    .await
                    .map_err(StoreError::Unavailable)?,
                None,
            ),
        };
        Ok(Store {
            pool,
            control,
            write_gate,
            dialect,
        })
    }

    /// Waits for this process's turn to write (SQLite only; MySQL writers run in parallel).
    async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        }
    }

    /// Runs `op` with a deadline; a late operation is dropped, and with it its connection.
    async fn timed<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(limit, op)
            .await
            .unwrap_or(Err(StoreError::Timeout(limit)))
    }

    /// SQLite: copies the write-ahead log back into the database file every
    /// [`CHECKPOINT_EVERY`], on a pooled connection and outside the write gate (a passive
    /// checkpoint runs beside the writer), so that no writer pays for it in its COMMIT.
    /// Returns at once on MySQL. Runs until `cancel`.
    pub async fn run_checkpoints(self, cancel: tokio_util::sync::CancellationToken) {
        if self.dialect != Dialect::Sqlite {
            return;
        }
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let done = self
                .timed(LOAD_TIMEOUT, async {
                    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                })
                .await;
            match done {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("database checkpoints work again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot checkpoint the database's write-ahead log; writers will do it, more slowly");
                }
                Err(_) => {}
            }
        }
    }

    /// How many write transactions are worth running at once: SQLite has one writer.
    pub fn parallel_writers(&self) -> usize {
        match self.dialect {
            Dialect::Sqlite => 1,
            Dialect::MySql => 4,
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Applies pending migrations. Nodes starting together serialize on a named lock: sqlx's
    /// own locking through the `Any` driver still let two nodes apply migration 1 at once
    /// (seen: duplicate key in `_sqlx_migrations`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let mut conn = self.pool.acquire().await?;
            match self.dialect {
                Dialect::MySql => {
                    let got: Option<i64> =
                        sqlx::query_scalar("SELECT GET_LOCK('chime_migrate', 60)")
                            .fetch_one(&mut *conn)
                            .await?;
                    if got != Some(1) {
                        return Err(StoreError::Corrupt(
                            "timed out waiting for another node's migration".into(),
                        ));
                    }
                    let result = sqlx::migrate!("migrations/mysql").run(&mut *conn).await;
                    let _ = sqlx::query("SELECT RELEASE_LOCK('chime_migrate')")
                        .execute(&mut *conn)
                        .await;
                    result?;
                }
                Dialect::Sqlite => sqlx::migrate!("migrations/sqlite").run(&mut *conn).await?,
            }
            Ok(())
        })
        .await
    }

    /// One round trip: is the database there?
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let mut conn = self.control.acquire().await?;
            conn.ping().await?;
            Ok(())
        })
        .await
    }

    /// The database's clock (unix ms) and the time zone of this store's sessions, read on
    /// a pooled connection: leases are timed by this clock, fires by the node's.
    pub async fn clock(&self) -> Result<DbClock, StoreError> {
        let sql = match self.dialect {
            Dialect::MySql => format!("SELECT {}, @@session.time_zone", self.db_now()),
            Dialect::Sqlite => format!("SELECT {}, 'UTC'", self.db_now()),
        };
        self.timed(OP_TIMEOUT, async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(&self.pool)
                .await?;
            Ok(DbClock {
                now_ms: row.try_get(0)?,
                time_zone: row.try_get(1)?,
            })
        })
        .await
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.control.close().await;
    }

    /// `INSERT IGNORE` (MySQL) / `INSERT OR IGNORE` (SQLite).
    fn insert_ignore(&self) -> &'static str {
        match self.dialect {
            Dialect::MySql => "INSERT IGNORE",
            Dialect::Sqlite => "INSERT OR IGNORE",
        }
    }

    /// The executions table, for a statement that names its rows by primary key (OR terms
    /// of `job_id = ? AND scheduled_at = ?`), and its `status = 'pending'` test. Both
    /// planners otherwise pick the `(status, slot, next_attempt_at)` index and test the keys
    /// against every pending row: 1.3 s for 500 outcomes with 80,000 deliveries pending on
    /// SQLite, and most of MariaDB's CPU under a herd. MySQL takes an index hint; SQLite's
    /// unary `+` keeps the status column from being used as an index.
    fn executions_by_key(&self) -> (&'static str, &'static str) {
        match self.dialect {
            Dialect::MySql => ("executions FORCE INDEX (PRIMARY)", "status = 'pending'"),
            Dialect::Sqlite => ("executions", "+status = 'pending'"),
        }
    }

    fn greatest(&self) -> &'static str {
        match self.dialect {
            Dialect::MySql => "GREATEST",
            Dialect::Sqlite => "MAX",
        }
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// `?, ?, ?` for an `IN (…)` list of `n` values.
fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Binds each slot of an `IN (…)` list.
fn bind_slots<'q>(mut q: AnyQuery<'q>, slots: &[u32]) -> AnyQuery<'q> {
    for s in slots {
        q = q.bind(i64::from(*s));
    }
    q
}

/// `sqlite://chime.db` → `sqlite://chime.db?mode=rwc`: without `mode=rwc` a missing file is an
/// error instead of a new database.
fn sqlite_url(rest: &str) -> String {
    if rest.contains("mode=") || rest.contains(":memory:") {
        format!("sqlite:{rest}")
    } else if rest.contains('?') {
        format!("sqlite:{rest}&mode=rwc")
    } else {
        format!("sqlite:{rest}?mode=rwc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_create_missing_files() {
        assert_eq!(sqlite_url("//chime.db"), "sqlite://chime.db?mode=rwc");
        assert_eq!(
            sqlite_url("//a.db?cache=shared"),
            "sqlite://a.db?cache=shared&mode=rwc"
        );
        assert_eq!(sqlite_url("//a.db?mode=ro"), "sqlite://a.db?mode=ro");
    }
}
