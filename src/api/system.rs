//! Cluster view, schedule preview, health, readiness, metrics.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, ApiState};
use crate::clock::{fmt_ms, now_ms};
use crate::cluster::{FORGET_DEAD_AFTER_MS, NODE_STALE_MS};
use crate::job::{FieldError, SLOTS};
use crate::schedule::{Schedule, parse_timezone};

#[derive(Serialize)]
struct MemberView {
    node_id: String,
    http_addr: String,
    state: &'static str,
    /// Slots the ring assigns to this member.
    ring_slots: u32,
    /// Slots whose lease this member holds (it fires their jobs).
    leased_slots: u32,
    /// Jobs in the slots the ring assigns to this member.
    jobs: u64,
    /// For a member gossip no longer shows (`dead`, or `unreachable` while it still
    /// heartbeats in the database): when it was last seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen_at: Option<String>,
}

pub async fn cluster(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let members = state.cluster.members();
    let ring = state.cluster.ring();
    let leased: HashMap<String, u32> = state.store.lease_counts().await?.into_iter().collect();
    let mut jobs_by_owner: HashMap<&str, u64> = HashMap::new();
    let mut total_jobs = 0;
    for (slot, n) in state.store.jobs_per_slot().await? {
        total_jobs += n;
        if let Some(owner) = ring.owner_of(slot) {
            *jobs_by_owner.entry(owner).or_default() += n;
        }
    }
    let shares: HashMap<String, u32> = ring
        .shares()
        .into_iter()
        .map(|(m, n)| (m.to_string(), n))
        .collect();
    let views: Vec<MemberView> = members
        .iter()
        .map(|m| MemberView {
            node_id: m.node_id.clone(),
            http_addr: m.http_addr.to_string(),
            state: m.state.as_str(),
            ring_slots: shares.get(&m.node_id).copied().unwrap_or(0),
            leased_slots: leased.get(&m.node_id).copied().unwrap_or(0),
            jobs: jobs_by_owner.get(m.node_id.as_str()).copied().unwrap_or(0),
            last_seen_at: None,
        })
        .collect();
    // Gossip forgets a dead node within seconds; the registry remembers it. Listed apart:
    // `members` is the live view the contract describes.
    let mut absent = Vec::new();
    for row in state.store.nodes(FORGET_DEAD_AFTER_MS).await? {
        if row.left || members.iter().any(|m| m.node_id == row.node_id) {
            continue;
        }
        absent.push(MemberView {
            state: if row.seen_ms_ago > NODE_STALE_MS {
                "dead"
            } else {
                "unreachable"
            },
            ring_slots: 0,
            leased_slots: leased.get(&row.node_id).copied().unwrap_or(0),
            jobs: 0,
            last_seen_at: Some(fmt_ms(row.heartbeat_at)),
            node_id: row.node_id,
            http_addr: row.http_addr,
        });
    }
    Ok(Json(json!({
        "node_id": state.node_id,
        "members": views,
        "dead_members": absent,
        "ring": {"slots": SLOTS, "nodes": ring.members().len(), "jobs": total_jobs},
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    schedule: Option<String>,
    timezone: Option<String>,
    count: Option<String>,
}

pub const MAX_PREVIEW: usize = 1000;

/// The next `count` fire times of `expr` after `from_ms`, as `chime schedule` prints them.
pub fn preview_times(
    expr: &str,
    timezone: &str,
    from_ms: i64,
    count: usize,
) -> Result<Vec<i64>, FieldError> {
    let tz = parse_timezone(timezone).map_err(|e| FieldError::new("timezone", e.to_string()))?;
    let schedule =
        Schedule::parse(expr, tz).map_err(|e| FieldError::new("schedule", e.to_string()))?;
    let mut times = Vec::with_capacity(count.min(MAX_PREVIEW));
    let mut after = from_ms;
    while times.len() < count {
        match schedule.next_after(after, from_ms) {
            Some(t) => {
                times.push(t);
                after = t;
            }
            None => break,
        }
    }
    Ok(times)
}

pub async fn preview(
    query: Result<Query<PreviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let expr = q
        .schedule
        .ok_or_else(|| FieldError::new("schedule", "is required"))?;
    let timezone = q.timezone.unwrap_or_else(|| "UTC".into());
    let count = match q.count.as_deref() {
        None => 10,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PREVIEW).contains(&n) => n,
            _ => {
                return Err(FieldError::new(
                    "count",
                    format!("{s:?} is not a number from 1 to {MAX_PREVIEW}"),
                )
                .into());
            }
        },
    };
    let times = preview_times(&expr, &timezone, now_ms(), count)?;
    Ok(Json(json!({
        "schedule": expr.trim(),
        "timezone": timezone,
        "times": times.into_iter().map(fmt_ms).collect::<Vec<_>>(),
    }))
    .into_response())
}

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(state): State<ApiState>) -> Response {
    if !state.is_ready() {
        return ApiError::unavailable("owned jobs are still loading").into_response();
    }
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            ApiError::unavailable("the database is unreachable").into_response()
        }
    }
}

pub async fn metrics() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}
