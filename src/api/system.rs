//! Cluster view, schedule preview, health, readiness, metrics.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, ApiState};
use crate::clock::{fmt_ms, now_ms};
use crate::job::{FieldError, SLOTS};
use crate::schedule::{Schedule, parse_timezone};

#[derive(Serialize)]
struct Member {
    node_id: String,
    http_addr: String,
    state: &'static str,
    slots: u32,
    jobs: usize,
}

pub async fn cluster(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let stats = state.scheduler.stats().await?;
    let members = vec![Member {
        node_id: state.node_id.to_string(),
        http_addr: state.http_addr.to_string(),
        state: "ready",
        slots: SLOTS,
        jobs: stats.jobs,
    }];
    Ok(Json(json!({
        "node_id": state.node_id,
        "members": members,
        "ring": {"slots": SLOTS, "nodes": 1},
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
