//! The `jobs` table.

use futures::TryStreamExt;
use sqlx::Row;
use sqlx::any::AnyRow;

use std::collections::HashMap;

use super::{Fence, LOAD_TIMEOUT, OP_TIMEOUT, Store, StoreError, bind_slots, in_list};

/// A job row. `spec` is the JSON of [`crate::job::StoredSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub slot: u32,
    pub spec: String,
    pub paused: bool,
    pub active_since: i64,
    pub last_fire_at: Option<i64>,
    pub next_fire_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Bumped by every write of the job (not by fires): its ETag.
    pub version: i64,
}

/// What a write requires of the stored job (`If-Match` / `If-None-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No requirement.
    Any,
    /// The job exists (`If-Match: *`).
    Exists,
    /// The job does not exist (`If-None-Match: *`).
    Absent,
    /// The job exists at this version.
    Version(i64),
}

impl Precondition {
    /// Checks the stored version (None: no such job).
    fn check(self, stored: Option<i64>) -> Result<(), StoreError> {
        let ok = match self {
            Precondition::Any => true,
            Precondition::Exists => stored.is_some(),
            Precondition::Absent => stored.is_none(),
            Precondition::Version(v) => stored == Some(v),
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::PreconditionFailed { current: stored })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
}

const COLUMNS: &str = "id, slot, spec, paused, active_since, last_fire_at, next_fire_at, \
                       created_at, updated_at, version";

fn from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let slot: i64 = row.try_get("slot")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        slot: u32::try_from(slot).map_err(|_| StoreError::Corrupt(format!("slot {slot}")))?,
        spec: row.try_get("spec")?,
        paused: row.try_get::<i64, _>("paused")? != 0,
        active_since: row.try_get("active_since")?,
        last_fire_at: row.try_get("last_fire_at")?,
        next_fire_at: row.try_get("next_fire_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

impl Store {
    /// Starts a job write: a transaction whose first statement is the lease fence.
    async fn fenced_tx(
        &self,
        fence: &Fence,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let leases = HashMap::from([(fence.slot, fence.epoch)]);
        if !self.fence(&mut tx, &fence.node, &leases).await?.is_empty() {
            tx.rollback().await?;
            return Err(StoreError::Fenced(fence.slot));
        }
        Ok(tx)
    }

    /// Creates the job; [`StoreError::Conflict`] if the id exists.
    pub async fn insert_job(&self, job: &JobRecord, fence: &Fence) -> Result<(), StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.fenced_tx(fence).await?;
            insert(&mut tx, job).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Creates or replaces the job, and deletes the fires of the old definition that were
    /// recorded ahead but not sent (`cancelled`, scheduled times), in one transaction fenced
    /// by the slot's lease. A replace keeps `created_at` and `last_fire_at` (so a replaced
    /// job never re-fires a time it already fired).
    pub async fn put_job(
        &self,
        job: &JobRecord,
        fence: &Fence,
        cancelled: &[i64],
    ) -> Result<PutOutcome, StoreError> {
        self.put_job_if(job, fence, cancelled, Precondition::Any)
            .await
    }

    /// [`Store::put_job`], only if the stored job meets `expect`
    /// ([`StoreError::PreconditionFailed`] otherwise, and nothing is written).
    pub async fn put_job_if(
        &self,
        job: &JobRecord,
        fence: &Fence,
        cancelled: &[i64],
        expect: Precondition,
    ) -> Result<PutOutcome, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.fenced_tx(fence).await?;
            // Every write of this job holds the lease row's lock first, so nothing can
            // create, change or delete the row between this read and the write below.
            let stored = stored_version(&mut tx, &job.id).await?;
            expect.check(stored)?;
            let outcome = if stored.is_some() {
                sqlx::query(
                    "UPDATE jobs SET spec = ?, paused = ?, active_since = ?, next_fire_at = ?, \
                     updated_at = ?, version = version + 1 WHERE id = ?",
                )
                .bind(&job.spec)
                .bind(i64::from(job.paused))
                .bind(job.active_since)
                .bind(job.next_fire_at)
                .bind(job.updated_at)
                .bind(&job.id)
                .execute(&mut *tx)
                .await?;
                delete_unsent(&mut tx, &job.id, cancelled).await?;
                PutOutcome::Replaced
            } else {
                insert(&mut tx, job).await?;
                PutOutcome::Created
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM jobs WHERE id = ?"));
            let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
            row.as_ref().map(from_row).transpose()
        })
        .await
    }

    /// Jobs ordered by id, strictly after `after` (keyset pagination).
    pub async fn list_jobs(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM jobs WHERE id > ? ORDER BY id LIMIT ?"
            ));
            let rows = sqlx::query(sql)
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(from_row).collect()
        })
        .await
    }

    /// Deletes the job and its executions (its pending deliveries with it). False if absent.
    pub async fn delete_job(&self, id: &str, fence: &Fence) -> Result<bool, StoreError> {
        self.delete_job_if(id, fence, Precondition::Any).await
    }

    /// [`Store::delete_job`], only if the stored job meets `expect`.
    pub async fn delete_job_if(
        &self,
        id: &str,
        fence: &Fence,
        expect: Precondition,
    ) -> Result<bool, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.fenced_tx(fence).await?;
            if expect != Precondition::Any {
                expect.check(stored_version(&mut tx, id).await?)?;
            }
            sqlx::query("DELETE FROM executions WHERE job_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let deleted = sqlx::query("DELETE FROM jobs WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(deleted > 0)
        })
        .await
    }

    /// Pauses or resumes, deleting the fires recorded ahead and not sent (`cancelled`).
    /// Resuming restarts the schedule at `now` (no make-up of the paused time). Returns the
    /// updated row, None if absent.
    pub async fn set_paused(
        &self,
        id: &str,
        paused: bool,
        now: i64,
        next_fire_at: Option<i64>,
        fence: &Fence,
        cancelled: &[i64],
    ) -> Result<Option<JobRecord>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut tx = self.fenced_tx(fence).await?;
            let result = if paused {
                sqlx::query(
                    "UPDATE jobs SET paused = 1, next_fire_at = NULL, updated_at = ?, \
                     version = version + 1 WHERE id = ?",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?
            } else {
                sqlx::query(
                    "UPDATE jobs SET paused = 0, active_since = ?, next_fire_at = ?, updated_at = ?, \
                     version = version + 1 WHERE id = ?",
                )
                .bind(now)
                .bind(next_fire_at)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?
            };
            if result.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            delete_unsent(&mut tx, id, cancelled).await?;
            let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM jobs WHERE id = ?"));
            let row = sqlx::query(sql).bind(id).fetch_one(&mut *tx).await?;
            let rec = from_row(&row)?;
            tx.commit().await?;
            Ok(Some(rec))
        })
        .await
    }

    /// Streams the jobs of `slots` to `each` (a node loading the slots it gained).
    pub async fn for_each_job_in(
        &self,
        slots: &[u32],
        mut each: impl FnMut(JobRecord) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let mut n = 0;
            for chunk in slots.chunks(500) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM jobs WHERE slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql);
                q = bind_slots(q, chunk);
                let mut rows = q.fetch(&self.pool);
                while let Some(row) = rows.try_next().await? {
                    each(from_row(&row)?)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    pub async fn count_jobs(&self) -> Result<u64, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
                .fetch_one(&self.pool)
                .await?;
            Ok(n as u64)
        })
        .await
    }
}

async fn insert(tx: &mut sqlx::AnyConnection, job: &JobRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO jobs (id, slot, spec, paused, active_since, last_fire_at, next_fire_at, \
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&job.id)
    .bind(i64::from(job.slot))
    .bind(&job.spec)
    .bind(i64::from(job.paused))
    .bind(job.active_since)
    .bind(job.last_fire_at)
    .bind(job.next_fire_at)
    .bind(job.created_at)
    .bind(job.updated_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Deletes the job's fires recorded ahead that the scheduler took back before sending them.
/// Only rows that look never attempted go (pending, no error, `attempts = 1` as recorded
/// or `0` as handed back by a slot's previous owner); the scheduler answered that none of
/// them was sent.
async fn delete_unsent(
    tx: &mut sqlx::AnyConnection,
    id: &str,
    cancelled: &[i64],
) -> Result<(), StoreError> {
    for chunk in cancelled.chunks(500) {
        let sql = sqlx::AssertSqlSafe(format!(
            "DELETE FROM executions WHERE job_id = ? AND status = 'pending' AND attempts <= 1 \
             AND last_error IS NULL AND scheduled_at IN ({})",
            in_list(chunk.len())
        ));
        let mut q = sqlx::query(sql).bind(id);
        for t in chunk {
            q = q.bind(*t);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// The stored job's version, None if there is no such job.
async fn stored_version(tx: &mut sqlx::AnyConnection, id: &str) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("SELECT version FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?)
}
