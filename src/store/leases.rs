//! Slot leases: the database-side fence that makes "each fire by exactly one node" hold
//! while gossip views disagree. Expiry is measured with the database's clock, so node
//! clock skew cannot make two nodes believe they hold the same slot.

use std::collections::HashMap;

use sqlx::Row;

use super::{Dialect, LOAD_TIMEOUT, OP_TIMEOUT, Store, StoreError, bind_slots, in_list};
use crate::job::SLOTS;

const CHUNK: usize = 500;

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
            let slots: Vec<u32> = (0..SLOTS).collect();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "{} INTO slot_leases (slot) VALUES {}",
                    self.insert_ignore(),
                    vec!["(?)"; chunk.len()].join(", ")
                ));
                let mut q = sqlx::query(sql);
                q = bind_slots(q, chunk);
                q.execute(&self.pool).await?;
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
                q.bind(node.to_string()).execute(&self.pool).await?;
                held.extend(self.held_among(node, chunk).await?);
            }
            Ok(held)
        })
        .await
    }

    /// Extends `node`'s leases on `slots`; returns those still held, with their epochs.
    pub async fn renew_leases(
        &self,
        node: &str,
        slots: &[u32],
        ttl_ms: i64,
    ) -> Result<HashMap<u32, i64>, StoreError> {
        self.timed(OP_TIMEOUT, async move {
            let mut held = HashMap::new();
            let now = self.db_now();
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET expires_at = {now} + ? WHERE owner = ? AND slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(ttl_ms).bind(node.to_string());
                q = bind_slots(q, chunk);
                q.execute(&self.pool).await?;
                held.extend(self.held_among(node, chunk).await?);
            }
            Ok(held)
            })
        .await
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
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>("slot")? as u32, r.try_get("epoch")?)))
            .collect()
    }

    /// Gives up `node`'s leases on `slots` at once, so the next owner need not wait for expiry.
    pub async fn release_leases(&self, node: &str, slots: &[u32]) -> Result<(), StoreError> {
        self.timed(OP_TIMEOUT, async move {
            for chunk in slots.chunks(CHUNK) {
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE slot_leases SET owner = '', expires_at = 0 WHERE owner = ? AND slot IN ({})",
                    in_list(chunk.len())
                ));
                let mut q = sqlx::query(sql).bind(node.to_string());
                q = bind_slots(q, chunk);
                q.execute(&self.pool).await?;
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
