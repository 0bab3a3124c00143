//! The `executions` table: fire history and the durable delivery queue.
//!
//! Write paths are batched (one multi-row statement per batch) because they run once per
//! fire: a node firing thousands of jobs a second must not pay a round trip per fire.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{AnyQuery, Fence, LOAD_TIMEOUT, OP_TIMEOUT, Store, StoreError, bind_slots, in_list};

/// Rows per multi-row statement; keeps bind counts far below both backends' limits.
const CHUNK: usize = 500;
const MAX_ERROR_LEN: usize = 1000;

/// An execution's identity: one (job, scheduled time). Its API id is `scheduled_at` in ms.
/// What [`Store::begin_attempt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Stored: send the attempt.
    Started,
    /// Pending, but `attempts` attempts are already begun: by an earlier try of the same
    /// statement whose reply was lost, or by a former owner of the slot.
    Moved { attempts: u32 },
    /// No pending row: the job was deleted or the delivery has finished.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecKey {
    pub job_id: Arc<str>,
    pub scheduled_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStatus {
    Pending,
    Succeeded,
    Failed,
    Missed,
}

impl ExecStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Pending => "pending",
            ExecStatus::Succeeded => "succeeded",
            ExecStatus::Failed => "failed",
            ExecStatus::Missed => "missed",
        }
    }

    /// The status named `s`, if it is one.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::parse(s).ok()
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => ExecStatus::Pending,
            "succeeded" => ExecStatus::Succeeded,
            "failed" => ExecStatus::Failed,
            "missed" => ExecStatus::Missed,
            other => return Err(StoreError::Corrupt(format!("execution status {other:?}"))),
        })
    }
}

/// A fire to record. `Pending` fires are recorded with `attempts = 1` *before* attempt 1 is
/// sent (the contract: the attempt number is persisted before each attempt), with
/// `next_attempt_at` = when to retry should the node die before recording the outcome.
///
/// The delivery snapshot (`request`) is not written here: most deliveries succeed at once,
/// and writing ~300 bytes per fire only to clear them again was the largest share of the
/// database's write volume. It is written with a retry or a failure; a delivery resumed
/// after a crash before its first outcome uses the job's stored definition.
#[derive(Debug, Clone)]
pub struct NewFire {
    pub key: ExecKey,
    pub slot: u32,
    pub manual: bool,
    pub fired_at: i64,
    pub status: ExecStatus,
    pub next_attempt_at: Option<i64>,
}

/// Where a job's schedule stands after a batch of fires.
#[derive(Debug, Clone)]
pub struct Progress {
    pub job_id: Arc<str>,
    pub slot: u32,
    pub last_fire_at: i64,
    pub next_fire_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `log` (the attempt log's JSON) is None for a first attempt that succeeded: the bulk
    /// of all outcomes, written in grouped statements, their one entry implied by the row.
    Succeeded { status: u16, log: Option<String> },
    /// `request` is the delivery snapshot, kept for the retry (JSON of [`crate::job::Target`]).
    Retry {
        next_attempt_at: i64,
        error: String,
        status: Option<u16>,
        request: String,
        log: Option<String>,
    },
    /// `request` is kept so a dead letter can be inspected and re-driven.
    Failed {
        error: String,
        status: Option<u16>,
        request: String,
        log: Option<String>,
    },
}

/// A pending delivery as found at start-up: `attempts` were (maybe) sent already.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    pub key: ExecKey,
    pub slot: u32,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub fired_at: i64,
    /// The stored snapshot; empty when attempt 1's outcome was never recorded.
    pub request: String,
    /// The job's stored `spec`, the fallback for an empty snapshot (None: job gone).
    pub job_spec: Option<String>,
    /// The last attempt allowed, if not the target's `max_attempts` (a re-driven delivery).
    pub attempt_limit: Option<u32>,
    /// The attempts made so far, as JSON (see [`Outcome`]).
    pub attempt_log: Option<String>,
}

/// What [`Store::redrive`] found.
#[derive(Debug, Clone)]
pub enum Redrive {
    /// Pending again, due now, with a fresh budget of attempts.
    Redriven(PendingDelivery),
    NotFound,
    /// Only a `failed` delivery can be re-driven.
    NotFailed(ExecStatus),
    /// The job's slot lease is not (or no longer) this node's at the given epoch: the slot is
    /// moving, and its next owner must do it.
    NotOwner,
}

const PENDING_COLUMNS: &str = "e.job_id, e.scheduled_at, e.slot, e.attempts, e.next_attempt_at, \
     e.fired_at, e.request, e.attempt_limit, e.attempt_log, j.spec";

fn pending_from_row(row: &AnyRow) -> Result<PendingDelivery, StoreError> {
    let job_id: String = row.try_get("job_id")?;
    Ok(PendingDelivery {
        key: ExecKey {
            job_id: job_id.into(),
            scheduled_at: row.try_get("scheduled_at")?,
        },
        slot: row.try_get::<i64, _>("slot")? as u32,
        attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
        next_attempt_at: row
            .try_get::<Option<i64>, _>("next_attempt_at")?
            .unwrap_or(0),
        fired_at: row.try_get("fired_at")?,
        request: row.try_get("request")?,
        job_spec: row.try_get("spec")?,
        attempt_limit: row
            .try_get::<Option<i64>, _>("attempt_limit")?
            .map(|n| n.clamp(0, i64::from(u32::MAX)) as u32),
        attempt_log: row.try_get("attempt_log")?,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionRecord {
    pub job_id: String,
    pub scheduled_at: i64,
    pub manual: bool,
    pub fired_at: i64,
    pub node: String,
    pub attempts: u32,
    pub status: ExecStatus,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub response_status: Option<u16>,
    /// The attempts made, as JSON (see [`Outcome`]).
    pub attempt_log: Option<String>,
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_ERROR_LEN {
        return s;
    }
    let mut end = MAX_ERROR_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn exec_from_row(row: &AnyRow) -> Result<ExecutionRecord, StoreError> {
    let status: String = row.try_get("status")?;
    let response_status: Option<i64> = row.try_get("response_status")?;
    Ok(ExecutionRecord {
        job_id: row.try_get("job_id")?,
        scheduled_at: row.try_get("scheduled_at")?,
        manual: row.try_get::<i64, _>("manual")? != 0,
        fired_at: row.try_get("fired_at")?,
        node: row.try_get("node")?,
        attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
        status: ExecStatus::parse(&status)?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        response_status: response_status.and_then(|s| u16::try_from(s).ok()),
        attempt_log: row.try_get("attempt_log")?,
    })
}

/// `(?, ?, ?, ?, ?, ?, ?, ?, ?, '')` per row: the snapshot column starts empty.
fn fire_rows(rows: usize) -> String {
    vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, '')"; rows].join(", ")
}

/// What [`Store::record_batch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Written now. The fires of `lost_slots` were left out (this node no longer holds
    /// those leases); every other fire is this node's to dispatch.
    Committed { lost_slots: Vec<u32> },
    /// An earlier attempt of this batch committed (its reply was lost): its fires were
    /// written then. `lost_slots` are those whose lease this node does not hold now.
    AlreadyCommitted { lost_slots: Vec<u32> },
}

fn bind_fire<'q>(q: AnyQuery<'q>, f: &NewFire, node: &str) -> AnyQuery<'q> {
    q.bind(f.key.job_id.to_string())
        .bind(f.key.scheduled_at)
        .bind(i64::from(f.slot))
        .bind(i64::from(f.manual))
        .bind(f.fired_at)
        .bind(node.to_string())
        .bind(i64::from(f.status == ExecStatus::Pending))
        .bind(f.status.as_str())
        .bind(f.next_attempt_at)
}

impl Store {
    /// Records a batch of fires and advances their jobs, atomically, fenced by the slot
    /// leases in `leases` (see [`Store::fence`]): fires and progress of a slot whose lease
    /// moved are left out.
    ///
    /// `batch` identifies the batch across attempts. Call again with the same id and the
    /// same fires after any error: a COMMIT whose reply was lost is then found (the batch's
    /// row exists) instead of being recorded twice. The batch's row is written after the
    /// fence, so a retry waits for an attempt the server is still finishing.
    ///
    /// Fires recorded already by someone else fail the batch with [`StoreError::Recorded`]
    /// naming them: the caller leaves them out (they are not its to dispatch) and retries.
    pub async fn record_batch(
        &self,
        node: &str,
        batch: i64,
        fires: &[NewFire],
        progress: &[Progress],
        leases: &HashMap<u32, i64>,
        now: i64,
    ) -> Result<BatchOutcome, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            let lost_slots = self.fence(&mut tx, node, leases).await?;
            let lost: HashSet<u32> = lost_slots.iter().copied().collect();
            let inserted = sqlx::query("INSERT INTO fire_batches (id, node, created_at) VALUES (?, ?, ?)")
                .bind(batch)
                .bind(node.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await;
            match inserted.map_err(StoreError::from) {
                Ok(_) => {}
                Err(StoreError::Conflict) => {
                    tx.rollback().await?;
                    return Ok(BatchOutcome::AlreadyCommitted { lost_slots });
                }
                Err(e) => return Err(e),
            }
            let fires: Vec<&NewFire> = fires.iter().filter(|f| !lost.contains(&f.slot)).collect();
            for chunk in fires.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "{} INTO executions (job_id, scheduled_at, slot, manual, fired_at, node, attempts, \
                     status, next_attempt_at, request) VALUES {}",
                    self.insert_ignore(),
                    fire_rows(chunk.len())
                ));
                let mut q = sqlx::query(sql);
                for f in chunk {
                    q = bind_fire(q, f, node);
                }
                if q.execute(&mut *tx).await?.rows_affected() < chunk.len() as u64 {
                    // Rare (a make-up of a fire recorded before a crash): name the rows that
                    // exist, in one query, so the caller can retry without them.
                    tx.rollback().await?;
                    let existing = self.existing(chunk).await?;
                    return Err(StoreError::Recorded(existing));
                }
            }
            let progress: Vec<&Progress> =
                progress.iter().filter(|p| !lost.contains(&p.slot)).collect();
            for chunk in progress.chunks(CHUNK) {
                let whens = vec!["WHEN ? THEN ?"; chunk.len()].join(" ");
                let ids = in_list(chunk.len());
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE jobs SET last_fire_at = {}(COALESCE(last_fire_at, 0), CASE id {whens} END), \
                     next_fire_at = CASE id {whens} END WHERE id IN ({ids})",
                    self.greatest()
                ));
                let mut q = sqlx::query(sql);
                for p in chunk {
                    q = q.bind(p.job_id.to_string()).bind(p.last_fire_at);
                }
                for p in chunk {
                    q = q.bind(p.job_id.to_string()).bind(p.next_fire_at);
                }
                for p in chunk {
                    q = q.bind(p.job_id.to_string());
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            crate::faults::after_commit()?;
            Ok(BatchOutcome::Committed { lost_slots })
        })
        .await
    }

    /// Which of `fires` have a row already.
    async fn existing(&self, fires: &[&NewFire]) -> Result<Vec<ExecKey>, StoreError> {
        let wanted: HashSet<(&str, i64)> = fires
            .iter()
            .map(|f| (&*f.key.job_id, f.key.scheduled_at))
            .collect();
        let ids: BTreeSet<&str> = wanted.iter().map(|(id, _)| *id).collect();
        let times: BTreeSet<i64> = wanted.iter().map(|(_, t)| *t).collect();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT job_id, scheduled_at FROM executions WHERE job_id IN ({}) AND scheduled_at IN ({})",
            in_list(ids.len()),
            in_list(times.len())
        ));
        let mut q = sqlx::query(sql);
        for id in &ids {
            q = q.bind(id.to_string());
        }
        for t in &times {
            q = q.bind(*t);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut found = Vec::new();
        for r in rows {
            let id: String = r.try_get("job_id")?;
            let at: i64 = r.try_get("scheduled_at")?;
            if wanted.contains(&(id.as_str(), at)) {
                found.push(ExecKey {
                    job_id: id.into(),
                    scheduled_at: at,
                });
            }
        }
        Ok(found)
    }

    /// Gives recorded fires that this node will not send (its slot is being handed over)
    /// back to the queue as never attempted: attempt 1 is then sent by the slot's next
    /// owner, on time. Fenced by the lease, which this node still holds.
    pub async fn hand_back(
        &self,
        node: &str,
        leases: &HashMap<u32, i64>,
        fires: &[(ExecKey, u32)],
    ) -> Result<(), StoreError> {
        if fires.is_empty() {
            return Ok(());
        }
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            let lost: HashSet<u32> = self
                .fence(&mut tx, node, leases)
                .await?
                .into_iter()
                .collect();
            // A slot that moved already belongs to its next owner, with whatever it loaded.
            let fires: Vec<&ExecKey> = fires
                .iter()
                .filter(|(_, slot)| leases.contains_key(slot) && !lost.contains(slot))
                .map(|(k, _)| k)
                .collect();
            for chunk in fires.chunks(CHUNK) {
                // Keys as OR terms, not a row-value IN list: SQLite looks those up by key.
                let (table, pending) = self.executions_by_key();
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE {table} SET attempts = 0, next_attempt_at = scheduled_at \
                     WHERE {pending} AND attempts = 1 AND last_error IS NULL AND node = ? \
                     AND ({})",
                    vec!["(job_id = ? AND scheduled_at = ?)"; chunk.len()].join(" OR ")
                ));
                let mut q = sqlx::query(sql).bind(node.to_string());
                for k in chunk {
                    q = q.bind(k.job_id.to_string()).bind(k.scheduled_at);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Deletes the fire batch ids older than `cutoff`: a batch is looked up only while its
    /// commit outcome is unknown, seconds after it was written.
    pub async fn prune_fire_batches(&self, cutoff: i64) -> Result<u64, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            Ok(sqlx::query("DELETE FROM fire_batches WHERE created_at < ?")
                .bind(cutoff)
                .execute(&self.pool)
                .await?
                .rows_affected())
        })
        .await
    }

    /// Persists that `attempt` is about to be sent, if `fence` still holds the job's slot
    /// and the row is pending at `attempt - 1`. Otherwise says what the row shows instead.
    pub async fn begin_attempt(
        &self,
        key: &ExecKey,
        attempt: u32,
        fence: &Fence,
    ) -> Result<Begin, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            // The lease is checked in the statement itself (no lock on the lease row, which
            // fire batches update): a former owner cannot begin an attempt after a handover.
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE executions SET attempts = ? WHERE job_id = ? AND scheduled_at = ? \
                 AND attempts = ? AND status = 'pending' AND EXISTS (SELECT 1 FROM slot_leases \
                 WHERE slot = ? AND owner = ? AND epoch = ? AND expires_at > {})",
                self.db_now()
            ));
            let n = sqlx::query(sql)
                .bind(i64::from(attempt))
                .bind(key.job_id.to_string())
                .bind(key.scheduled_at)
                .bind(i64::from(attempt) - 1)
                .bind(i64::from(fence.slot))
                .bind(fence.node.to_string())
                .bind(fence.epoch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if n == 1 {
                crate::faults::after_begin_attempt()?;
                return Ok(Begin::Started);
            }
            let row = sqlx::query(
                "SELECT attempts, status FROM executions WHERE job_id = ? AND scheduled_at = ?",
            )
            .bind(key.job_id.to_string())
            .bind(key.scheduled_at)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                return Ok(Begin::Gone);
            };
            let attempts: i64 = row.try_get("attempts")?;
            let status: String = row.try_get("status")?;
            if status != "pending" {
                Ok(Begin::Gone)
            } else if attempts == i64::from(attempt) - 1 {
                Err(StoreError::Fenced(fence.slot))
            } else {
                Ok(Begin::Moved {
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            }
        })
        .await
    }

    /// Whether the delivery is still pending at `attempts` (not deleted, not finished).
    pub async fn still_pending(&self, key: &ExecKey, attempts: u32) -> Result<bool, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let found = sqlx::query(
                "SELECT 1 FROM executions WHERE job_id = ? AND scheduled_at = ? \
                 AND attempts = ? AND status = 'pending'",
            )
            .bind(key.job_id.to_string())
            .bind(key.scheduled_at)
            .bind(i64::from(attempts))
            .fetch_optional(&self.pool)
            .await?;
            Ok(found.is_some())
        })
        .await
    }

    /// Records attempt outcomes. Returns, per outcome, whether its row was still pending at
    /// that attempt (a retry is scheduled only then).
    pub async fn record_outcomes(
        &self,
        outcomes: &[(ExecKey, u32, Outcome)],
    ) -> Result<Vec<bool>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut applied = vec![false; outcomes.len()];
            let mut tx = self.pool.begin().await?;
            // Successes are the bulk: one statement per chunk, grouped by response status.
            let mut by_status: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
            for (i, (_, _, o)) in outcomes.iter().enumerate() {
                if let Outcome::Succeeded { status, log: None } = o {
                    by_status.entry(*status).or_default().push(i);
                }
            }
            for (status, idxs) in by_status {
                for chunk in idxs.chunks(CHUNK) {
                    let (table, pending) = self.executions_by_key();
                    let conds = vec!["(job_id = ? AND scheduled_at = ? AND attempts = ?)"; chunk.len()]
                        .join(" OR ");
                    let sql = sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET status = 'succeeded', response_status = ?, \
                         next_attempt_at = NULL, request = '' \
                         WHERE {pending} AND ({conds})"
                    ));
                    let mut q = sqlx::query(sql).bind(i64::from(status));
                    for &i in chunk {
                        let (key, attempt, _) = &outcomes[i];
                        q = q
                            .bind(key.job_id.to_string())
                            .bind(key.scheduled_at)
                            .bind(i64::from(*attempt));
                    }
                    q.execute(&mut *tx).await?;
                    for &i in chunk {
                        applied[i] = true;
                    }
                }
            }
            for (i, (key, attempt, outcome)) in outcomes.iter().enumerate() {
                let q = match outcome {
                    Outcome::Succeeded { log: None, .. } => continue,
                    // After retries: the log says why they were needed.
                    Outcome::Succeeded {
                        status,
                        log: Some(log),
                    } => sqlx::query(
                        "UPDATE executions SET status = 'succeeded', response_status = ?, \
                         next_attempt_at = NULL, request = '', attempt_log = ? \
                         WHERE job_id = ? AND scheduled_at = ? AND attempts = ? AND status = 'pending'",
                    )
                    .bind(i64::from(*status))
                    .bind(log.clone()),
                    Outcome::Retry {
                        next_attempt_at,
                        error,
                        status,
                        request,
                        log,
                    } => sqlx::query(
                        "UPDATE executions SET next_attempt_at = ?, last_error = ?, response_status = ?, \
                         request = ?, attempt_log = COALESCE(?, attempt_log) \
                         WHERE job_id = ? AND scheduled_at = ? AND attempts = ? AND status = 'pending'",
                    )
                    .bind(*next_attempt_at)
                    .bind(truncate(error).to_string())
                    .bind(status.map(i64::from))
                    .bind(request.clone())
                    .bind(log.clone()),
                    Outcome::Failed {
                        error,
                        status,
                        request,
                        log,
                    } => sqlx::query(
                        "UPDATE executions SET status = 'failed', next_attempt_at = NULL, \
                         last_error = ?, response_status = ?, request = ?, \
                         attempt_log = COALESCE(?, attempt_log) \
                         WHERE job_id = ? AND scheduled_at = ? AND attempts = ? AND status = 'pending'",
                    )
                    .bind(truncate(error).to_string())
                    .bind(status.map(i64::from))
                    .bind(request.clone())
                    .bind(log.clone()),
                };
                let n = q
                    .bind(key.job_id.to_string())
                    .bind(key.scheduled_at)
                    .bind(i64::from(*attempt))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                applied[i] = n == 1;
            }
            tx.commit().await?;
            Ok(applied)
            })
        .await
    }

    /// Pending deliveries of `slots` (resume them with their next attempt number).
    pub async fn load_pending(&self, slots: &[u32]) -> Result<Vec<PendingDelivery>, StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let mut rows = Vec::new();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "SELECT {PENDING_COLUMNS} FROM executions e \
                     LEFT JOIN jobs j ON j.id = e.job_id \
                     WHERE e.status = 'pending' AND e.slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql);
                q = bind_slots(q, chunk);
                rows.extend(q.fetch_all(&self.pool).await?);
            }
            rows.iter().map(pending_from_row).collect()
        })
        .await
    }

    /// Makes a `failed` delivery pending again, due at `now`, allowed `extra_attempts` more
    /// attempts. Its snapshot is cleared, so it is sent with the job's current definition (a
    /// fixed URL takes effect); attempt numbers go on from where they stopped.
    ///
    /// Fenced like fires: only `node` holding the slot's lease at `epoch` may do it, so a
    /// re-drive racing a handover is either seen by the next owner's load or refused.
    pub async fn redrive(
        &self,
        key: &ExecKey,
        extra_attempts: u32,
        now: i64,
        node: &str,
        epoch: i64,
    ) -> Result<Redrive, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE executions SET status = 'pending', next_attempt_at = ?, request = '', \
                 attempt_limit = attempts + ? \
                 WHERE job_id = ? AND scheduled_at = ? AND status = 'failed' \
                 AND EXISTS (SELECT 1 FROM slot_leases l WHERE l.slot = executions.slot \
                 AND l.owner = ? AND l.epoch = ? AND l.expires_at > {})",
                self.db_now()
            ));
            let n = sqlx::query(sql)
                .bind(now)
                .bind(i64::from(extra_attempts))
                .bind(key.job_id.to_string())
                .bind(key.scheduled_at)
                .bind(node.to_string())
                .bind(epoch)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let result = if n == 1 {
                let sql = sqlx::AssertSqlSafe(format!(
                    "SELECT {PENDING_COLUMNS} FROM executions e \
                     LEFT JOIN jobs j ON j.id = e.job_id \
                     WHERE e.job_id = ? AND e.scheduled_at = ?"
                ));
                let row = sqlx::query(sql)
                    .bind(key.job_id.to_string())
                    .bind(key.scheduled_at)
                    .fetch_one(&mut *tx)
                    .await?;
                Redrive::Redriven(pending_from_row(&row)?)
            } else {
                let status: Option<String> = sqlx::query_scalar(
                    "SELECT status FROM executions WHERE job_id = ? AND scheduled_at = ?",
                )
                .bind(key.job_id.to_string())
                .bind(key.scheduled_at)
                .fetch_optional(&mut *tx)
                .await?;
                match status.as_deref().map(ExecStatus::parse).transpose()? {
                    None => Redrive::NotFound,
                    Some(ExecStatus::Failed) => Redrive::NotOwner,
                    Some(s) => Redrive::NotFailed(s),
                }
            };
            tx.commit().await?;
            Ok(result)
        })
        .await
    }

    /// Newest first.
    pub async fn list_executions(
        &self,
        job_id: &str,
        limit: u32,
    ) -> Result<Vec<ExecutionRecord>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let rows = sqlx::query(
                "SELECT job_id, scheduled_at, manual, fired_at, node, attempts, status, \
                 next_attempt_at, last_error, response_status, attempt_log FROM executions WHERE job_id = ? \
                 ORDER BY scheduled_at DESC LIMIT ?",
            )
            .bind(job_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(exec_from_row).collect()
        })
        .await
    }

    /// Executions of every job with `status`, newest first, after the keyset cursor
    /// `(scheduled_at, job_id)` of the previous page's last row.
    pub async fn list_executions_by_status(
        &self,
        status: ExecStatus,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<ExecutionRecord>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let (at, id) = after.unwrap_or((i64::MAX, ""));
            let rows = sqlx::query(
                "SELECT job_id, scheduled_at, manual, fired_at, node, attempts, status, \
                 next_attempt_at, last_error, response_status, attempt_log FROM executions WHERE status = ? \
                 AND (scheduled_at < ? OR (scheduled_at = ? AND job_id > ?)) \
                 ORDER BY scheduled_at DESC, job_id LIMIT ?",
            )
            .bind(status.as_str())
            .bind(at)
            .bind(at)
            .bind(id.to_string())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(exec_from_row).collect()
        })
        .await
    }

    /// Keeps the newest `keep` executions of each of `job_ids` (and every pending one), in
    /// one transaction: with thousands of jobs firing every second, one commit per job was
    /// hundreds of commits a second. Returns how many rows went.
    pub async fn prune_job_history(
        &self,
        job_ids: &[Arc<str>],
        keep: u32,
    ) -> Result<u64, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            let mut removed = 0;
            for job_id in job_ids {
                let cutoff: Option<i64> = sqlx::query_scalar(
                    "SELECT scheduled_at FROM executions WHERE job_id = ? \
                     ORDER BY scheduled_at DESC LIMIT 1 OFFSET ?",
                )
                .bind(job_id.to_string())
                .bind(i64::from(keep) - 1)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(cutoff) = cutoff else {
                    continue;
                };
                removed += sqlx::query(
                    "DELETE FROM executions WHERE job_id = ? AND scheduled_at < ? AND status <> 'pending'",
                )
                .bind(job_id.to_string())
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok(removed)
        })
        .await
    }

    /// Deletes finished executions scheduled before `cutoff`, at most `limit` rows (so a
    /// large purge does not hold locks for long); returns how many went.
    pub async fn prune_older_than(&self, cutoff: i64, limit: u32) -> Result<u64, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let sql = match self.dialect {
                super::Dialect::MySql => {
                    "DELETE FROM executions WHERE scheduled_at < ? AND status <> 'pending' LIMIT ?"
                }
                super::Dialect::Sqlite => {
                    "DELETE FROM executions WHERE (job_id, scheduled_at) IN (SELECT job_id, \
                     scheduled_at FROM executions WHERE scheduled_at < ? AND status <> 'pending' \
                     LIMIT ?)"
                }
            };
            let n = sqlx::query(sql)
                .bind(cutoff)
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await?
                .rows_affected();
            Ok(n)
        })
        .await
    }
}
