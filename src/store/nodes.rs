//! The node registry: one row per node id, so that two processes never run under one id
//! (they would both believe they hold its leases), and so that a node that died is still
//! shown, as dead, after gossip has forgotten it.

use sqlx::Row;

use super::{OP_TIMEOUT, Store, StoreError};

/// What [`Store::claim_node_id`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// Another process holds the id and said so `seen_ms_ago` ago.
    InUse {
        http_addr: String,
        seen_ms_ago: i64,
    },
}

/// A row of the registry, with ages by the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub http_addr: String,
    /// Unix ms of the last heartbeat (database clock).
    pub heartbeat_at: i64,
    pub seen_ms_ago: i64,
    pub left: bool,
}

impl Store {
    /// Takes `node_id` for this process (`instance`) unless another process has
    /// heartbeated it within `stale_ms` without leaving.
    pub async fn claim_node_id(
        &self,
        node_id: &str,
        instance: &str,
        http_addr: &str,
        stale_ms: i64,
    ) -> Result<Claim, StoreError> {
        let now = self.db_now();
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let sql = sqlx::AssertSqlSafe(format!(
                "{} INTO nodes (node_id, instance, http_addr, heartbeat_at) VALUES (?, ?, ?, {now})",
                self.insert_ignore()
            ));
            let inserted = sqlx::query(sql)
                .bind(node_id)
                .bind(instance)
                .bind(http_addr)
                .execute(&self.control)
                .await?
                .rows_affected();
            if inserted == 1 {
                return Ok(Claim::Claimed);
            }
            let sql = sqlx::AssertSqlSafe(format!(
                "UPDATE nodes SET instance = ?, http_addr = ?, heartbeat_at = {now}, left_at = NULL \
                 WHERE node_id = ? AND (instance = ? OR left_at IS NOT NULL \
                 OR heartbeat_at < {now} - ?)"
            ));
            let taken = sqlx::query(sql)
                .bind(instance)
                .bind(http_addr)
                .bind(node_id)
                .bind(instance)
                .bind(stale_ms)
                .execute(&self.control)
                .await?
                .rows_affected();
            if taken == 1 {
                return Ok(Claim::Claimed);
            }
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT http_addr, {now} - heartbeat_at AS age FROM nodes WHERE node_id = ?"
            ));
            let row = sqlx::query(sql)
                .bind(node_id)
                .fetch_one(&self.control)
                .await?;
            Ok(Claim::InUse {
                http_addr: row.try_get("http_addr")?,
                seen_ms_ago: row.try_get("age")?,
            })
        })
        .await
    }

    /// Refreshes this process's claim; false if the id is no longer this process's (another
    /// took it over after this one stopped heartbeating).
    pub async fn heartbeat_node(&self, node_id: &str, instance: &str) -> Result<bool, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE nodes SET heartbeat_at = {} WHERE node_id = ? AND instance = ?",
            self.db_now()
        ));
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            let n = sqlx::query(sql)
                .bind(node_id)
                .bind(instance)
                .execute(&self.control)
                .await?
                .rows_affected();
            if n == 1 {
                return Ok(true);
            }
            // MySQL counts only changed rows: a heartbeat in the same millisecond as the last
            // one changes nothing. Ask who holds the id.
            let holder: Option<String> =
                sqlx::query_scalar("SELECT instance FROM nodes WHERE node_id = ?")
                    .bind(node_id)
                    .fetch_optional(&self.control)
                    .await?;
            Ok(holder.as_deref() == Some(instance))
        })
        .await
    }

    /// A graceful leave: the id is free at once, and the node is not shown as dead.
    pub async fn leave_node(&self, node_id: &str, instance: &str) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE nodes SET left_at = {} WHERE node_id = ? AND instance = ?",
            self.db_now()
        ));
        self.timed(OP_TIMEOUT, async move {
            let _turn = self.write_turn().await;
            sqlx::query(sql)
                .bind(node_id)
                .bind(instance)
                .execute(&self.control)
                .await?;
            Ok(())
        })
        .await
    }

    /// Every registered node that has not left and was seen within `within_ms`.
    pub async fn nodes(&self, within_ms: i64) -> Result<Vec<NodeRow>, StoreError> {
        let now = self.db_now();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT node_id, http_addr, heartbeat_at, {now} - heartbeat_at AS age, \
             CASE WHEN left_at IS NULL THEN 0 ELSE 1 END AS has_left \
             FROM nodes WHERE heartbeat_at >= {now} - ? ORDER BY node_id"
        ));
        self.timed(OP_TIMEOUT, async move {
            let rows = sqlx::query(sql)
                .bind(within_ms)
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(NodeRow {
                        node_id: r.try_get("node_id")?,
                        http_addr: r.try_get("http_addr")?,
                        heartbeat_at: r.try_get("heartbeat_at")?,
                        seen_ms_ago: r.try_get("age")?,
                        left: r.try_get::<i64, _>("has_left")? == 1,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }
}
