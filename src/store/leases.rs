//! Slot leases: the database-side fence that makes "each fire by exactly one node" hold
//! while gossip views disagree. Expiry is measured with the database's clock, so node
//! clock skew cannot make two nodes believe they hold the same slot.

use std::collections::HashMap;

use sqlx::Row;

use super::{Dialect, LOAD_TIMEOUT, OP_TIMEOUT, Store, StoreError, bind_slots, in_list};
use crate::job::SLOTS;

const CHUNK: usize = 500;
/// `expires_at` of a lease that never expires: an embedded (SQLite) node holds every slot
/// for as long as it holds the database file's lock.
pub const NEVER_EXPIRES: i64 = 253_402_300_799_000;

/// The lease a write is fenced with: `node` must hold `slot` at `epoch`, unexpired by the
/// database's clock, when the write's transaction runs.
#[derive(Debug, Clone)]
pub struct Fence {
    pub node: std::sync::Arc<str>,
    pub slot: u32,
    pub epoch: i64,
}

impl Store {
    /// The database's clock in unix ms, as an SQL expression.
    pub(super) fn db_now(&self) -> &'static str {
        match self.dialect {
            Dialect::MySql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        }
    }

    /// Creates the lease row of every slot (idempotent).
    pub async fn ensure_lease_rows(&self) -> Result<(), StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let slots: Vec<u32> = (0..SLOTS).collect();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "{} INTO slot_leases (slot) VALUES {}",
                    self.insert_ignore(),
                    vec!["(?)"; chunk.len()].join(", ")
                ));
                let mut q = sqlx::query(sql);
                q = bind_slots(q, chunk);
                q.execute(&self.control).await?;
            }
            Ok(())
        })
        .await
    }

    /// Takes every slot in `slots` that is free, expired, or already `node`'s, with a new
    /// epoch each. Returns the slots now held, with their epochs.
    pub async fn acquire_leases(
        &self,
        node: &str,
        slots: &[u32],
        ttl_ms: i64,
    ) -> Result<HashMap<u32, i64>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut held = HashMap::new();
            let now = self.db_now();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET owner = ?, epoch = epoch + 1, expires_at = {now} + ? \
                     WHERE slot IN ({}) AND (owner = '' OR owner = ? OR expires_at < {now})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(node.to_string()).bind(ttl_ms);
                q = bind_slots(q, chunk);
                q.bind(node.to_string()).execute(&self.control).await?;
                held.extend(self.held_among(node, chunk).await?);
            }
            Ok(held)
        })
        .await
    }

    /// Extends `node`'s unexpired leases on `slots`; returns those still held, with their
    /// epochs. A lease that expired is not revived (its jobs may have been dropped here, and
    /// another node may be about to take it): it must be acquired again, at a new epoch.
    pub async fn renew_leases(
        &self,
        node: &str,
        slots: &[u32],
        ttl_ms: i64,
    ) -> Result<HashMap<u32, i64>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut held = HashMap::new();
            let now = self.db_now();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET expires_at = {now} + ? WHERE owner = ? \
                     AND expires_at > {now} AND slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(ttl_ms).bind(node.to_string());
                q = bind_slots(q, chunk);
                q.execute(&self.control).await?;
                held.extend(self.held_among(node, chunk).await?);
            }
            Ok(held)
        })
        .await
    }

    /// Takes every one of `slots` whatever its state, never to expire. Only for a node that
    /// is the database's sole user (SQLite, guarded by a file lock): a lease left by an
    /// earlier process on the same file, under another node id, is taken over at start.
    pub async fn acquire_exclusive(
        &self,
        node: &str,
        slots: &[u32],
    ) -> Result<HashMap<u32, i64>, StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let mut held = HashMap::new();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET owner = ?, epoch = epoch + 1, expires_at = ? \
                     WHERE slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(node.to_string()).bind(NEVER_EXPIRES);
                q = bind_slots(q, chunk);
                q.execute(&self.control).await?;
                held.extend(self.held_among(node, chunk).await?);
            }
            Ok(held)
        })
        .await
    }

    /// The fence of a transaction: a conditional write on the lease row of each slot in
    /// `leases` (slot → epoch this node believes it holds). Returns the slots whose lease is
    /// not `node`'s at that epoch any more.
    ///
    /// The write takes the lease rows' locks, so a competing acquisition (an `UPDATE` of the
    /// same rows) waits for this transaction and then sees what it wrote, and this
    /// transaction fails the fence if the acquisition came first. Run it as the first
    /// statement: every transaction locks lease rows before job and execution rows, in slot
    /// order, so fences never deadlock with each other or with renewals.
    pub(super) async fn fence(
        &self,
        conn: &mut sqlx::AnyConnection,
        node: &str,
        leases: &HashMap<u32, i64>,
    ) -> Result<Vec<u32>, StoreError> {
        let mut slots: Vec<(u32, i64)> = leases.iter().map(|(s, e)| (*s, *e)).collect();
        slots.sort_unstable();
        let mut fenced = 0u64;
        for chunk in slots.chunks(CHUNK) {
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE slot_leases SET fence = fence + 1 WHERE owner = ? AND expires_at > {} \
                 AND slot IN ({}) AND (slot, epoch) IN ({})",
                self.db_now(),
                in_list(chunk.len()),
                vec!["(?, ?)"; chunk.len()].join(", ")
            ));
            let mut q = sqlx::query(sql).bind(node.to_string());
            for (s, _) in chunk {
                q = q.bind(i64::from(*s));
            }
            for (s, e) in chunk {
                q = q.bind(i64::from(*s)).bind(*e);
            }
            fenced += q.execute(&mut *conn).await?.rows_affected();
        }
        if fenced == slots.len() as u64 {
            return Ok(Vec::new());
        }
        // Rare: some lease moved. Which ones, read after the fence in the same transaction.
        let mut lost = Vec::new();
        for chunk in slots.chunks(CHUNK) {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT slot, epoch FROM slot_leases WHERE owner = ? AND expires_at > {} \
                 AND slot IN ({})",
                self.db_now(),
                in_list(chunk.len())
            ));
            let mut q = sqlx::query(sql).bind(node.to_string());
            for (s, _) in chunk {
                q = q.bind(i64::from(*s));
            }
            let rows = q.fetch_all(&mut *conn).await?;
            let mut valid = std::collections::HashSet::new();
            for r in rows {
                valid.insert((
                    r.try_get::<i64, _>("slot")? as u32,
                    r.try_get::<i64, _>("epoch")?,
                ));
            }
            lost.extend(chunk.iter().filter(|p| !valid.contains(p)).map(|(s, _)| *s));
        }
        Ok(lost)
    }

    async fn held_among(&self, node: &str, slots: &[u32]) -> Result<Vec<(u32, i64)>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT slot, epoch FROM slot_leases WHERE owner = ? AND expires_at > {} \
             AND slot IN ({})",
            self.db_now(),
            in_list(slots.len())
        ));
        let mut q = sqlx::query(sql).bind(node.to_string());
        q = bind_slots(q, slots);
        let rows = q.fetch_all(&self.control).await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>("slot")? as u32, r.try_get("epoch")?)))
            .collect()
    }

    /// Gives up `node`'s leases on `slots` at once, so the next owner need not wait for expiry.
    pub async fn release_leases(&self, node: &str, slots: &[u32]) -> Result<(), StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET owner = '', expires_at = 0 WHERE owner = ? AND slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(node.to_string());
                q = bind_slots(q, chunk);
                q.execute(&self.control).await?;
            }
            Ok(())
            })
        .await
    }

    /// The live holder of `slot`, if any.
    pub async fn lease_holder(&self, slot: u32) -> Result<Option<String>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT owner FROM slot_leases WHERE slot = ? AND owner <> '' AND expires_at > {}",
                self.db_now()
            ));
            Ok(sqlx::query_scalar(sql)
                .bind(i64::from(slot))
                .fetch_optional(&self.pool)
                .await?)
        })
        .await
    }

    /// Live lease holders and how many slots each holds.
    pub async fn lease_counts(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT owner, COUNT(*) AS n FROM slot_leases WHERE owner <> '' AND expires_at > {} \
                 GROUP BY owner ORDER BY owner",
                self.db_now()
            ));
            let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
            rows.iter()
                .map(|r| Ok((r.try_get("owner")?, r.try_get::<i64, _>("n")? as u32)))
                .collect()
            })
        .await
    }

    /// Jobs per slot, for the cluster view.
    pub async fn jobs_per_slot(&self) -> Result<HashMap<u32, u64>, StoreError> {
        self.timed(LOAD_TIMEOUT, async move {
            let rows = sqlx::query("SELECT slot, COUNT(*) AS n FROM jobs GROUP BY slot")
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<i64, _>("slot")? as u32,
                        r.try_get::<i64, _>("n")? as u64,
                    ))
                })
                .collect()
        })
        .await
    }
}
