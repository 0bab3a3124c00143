//! `/v1/jobs` handlers.
//!
//! Every write follows one order, under the job's lock, in a task of its own that finishes
//! even if the client disconnects: take the job out of the scheduler (`hold`: after it no
//! fire of the old definition is sent, and its recorded, unsent fires are cancelled) →
//! write the store in one transaction fenced by the slot's lease, deleting those fires'
//! rows → arm what the store now holds. A write that failed puts back what was there
//! before; one whose outcome is unknown reads the store to find out which.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::extract::{JsonBody, PathParams};
use super::{ApiError, ApiState};
use crate::clock::{fmt_ms, now_ms};
use crate::job::{self, Callback, Job, JobInput, RetryPolicy, StoredSpec, ValidJob};
use crate::scheduler::Held;
use crate::store::{
    ExecKey, ExecStatus, ExecutionRecord, JobRecord, Precondition, PutOutcome, Redrive, StoreError,
};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Serialize)]
pub struct JobView {
    id: String,
    schedule: String,
    timezone: String,
    callback: Callback,
    payload: Box<RawValue>,
    retry: RetryPolicy,
    paused: bool,
    owner: String,
    next_fire_at: Option<String>,
    last_fire_at: Option<String>,
    created_at: String,
    updated_at: String,
    /// Bumped by every write of the job; also its `ETag`.
    version: i64,
}

impl JobView {
    fn new(rec: JobRecord, owner: &str) -> Result<Self, ApiError> {
        let spec: StoredSpec = serde_json::from_str(&rec.spec).map_err(|e| {
            ApiError::Internal(format!("job {} has an unreadable spec: {e}", rec.id))
        })?;
        Ok(JobView {
            id: rec.id,
            schedule: spec.schedule,
            timezone: spec.timezone,
            callback: spec.callback,
            payload: spec.payload,
            retry: spec.retry,
            paused: rec.paused,
            owner: owner.to_string(),
            next_fire_at: rec.next_fire_at.map(fmt_ms),
            last_fire_at: rec.last_fire_at.map(fmt_ms),
            created_at: fmt_ms(rec.created_at),
            updated_at: fmt_ms(rec.updated_at),
            version: rec.version,
        })
    }

    /// The job as a response, with its version as a strong `ETag`.
    fn respond(self, status: StatusCode) -> Response {
        let etag = HeaderValue::from_str(&format!("\"{}\"", self.version))
            .expect("digits and quotes are a valid header value");
        let mut resp = (status, Json(self)).into_response();
        resp.headers_mut().insert(header::ETAG, etag);
        resp
    }
}

/// The precondition of a write, from `If-Match` (`*` or one ETag) and `If-None-Match: *`.
fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let text = |name: header::HeaderName| match headers.get(&name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::BadRequest(format!("{name} is not ASCII"))),
    };
    if let Some(v) = text(header::IF_NONE_MATCH)? {
        if v != "*" {
            return Err(ApiError::BadRequest(
                "If-None-Match on a write takes only * (create, never replace)".into(),
            ));
        }
        return Ok(Precondition::Absent);
    }
    match text(header::IF_MATCH)? {
        None => Ok(Precondition::Any),
        Some("*") => Ok(Precondition::Exists),
        Some(tag) => tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .and_then(|t| t.parse::<i64>().ok())
            .map(Precondition::Version)
            .ok_or_else(|| {
                let shown: String = tag.chars().take(64).collect();
                ApiError::BadRequest(format!(
                    "If-Match {shown:?} is not one of this API's ETags (a quoted version such \
                     as \"3\", from a GET of the job) or *"
                ))
            }),
    }
}

#[derive(Serialize)]
struct ExecutionView {
    /// The execution's id within its job: its scheduled time in unix ms.
    id: String,
    job_id: String,
    scheduled_at: String,
    fired_at: String,
    node: String,
    attempts: u32,
    status: &'static str,
    manual: bool,
    next_attempt_at: Option<String>,
    last_error: Option<String>,
    response_status: Option<u16>,
    /// The attempts made (sent, or refused before sending), oldest first, the last ten.
    attempt_history: Box<RawValue>,
}

/// The execution's attempt log. A first attempt that succeeded has none stored: its one
/// entry is the row itself. Rows from before the log existed show what the row says.
fn attempt_history(e: &ExecutionRecord) -> Box<RawValue> {
    if let Some(log) = e.attempt_log.as_deref()
        && let Ok(raw) = RawValue::from_string(log.to_string())
    {
        return raw;
    }
    let entry = match e.status {
        ExecStatus::Succeeded => serde_json::json!([{
            "attempt": e.attempts,
            "at": fmt_ms(e.fired_at),
            "outcome": "succeeded",
            "status": e.response_status,
        }]),
        ExecStatus::Failed => serde_json::json!([{
            "attempt": e.attempts,
            "outcome": "failed",
            "status": e.response_status,
            "error": e.last_error,
        }]),
        _ => serde_json::json!([]),
    };
    RawValue::from_string(entry.to_string()).expect("serde_json writes valid JSON")
}

impl From<ExecutionRecord> for ExecutionView {
    fn from(e: ExecutionRecord) -> Self {
        let history = attempt_history(&e);
        ExecutionView {
            attempt_history: history,
            id: e.scheduled_at.to_string(),
            job_id: e.job_id,
            scheduled_at: fmt_ms(e.scheduled_at),
            fired_at: fmt_ms(e.fired_at),
            node: e.node,
            attempts: e.attempts,
            status: e.status.as_str(),
            manual: e.manual,
            next_attempt_at: e.next_attempt_at.map(fmt_ms),
            last_error: e.last_error,
            response_status: e.response_status,
        }
    }
}

fn check_path_id(id: &str) -> Result<(), ApiError> {
    job::validate_id("id", id).map_err(ApiError::from)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("job {id:?} does not exist"))
}

fn record_of(v: &ValidJob, now: i64) -> Result<(JobRecord, Arc<Job>), ApiError> {
    let spec = serde_json::to_string(&v.spec)
        .map_err(|e| ApiError::Internal(format!("cannot encode job: {e}")))?;
    let slot = job::slot_of(&v.id);
    let job = Arc::new(Job::new(
        &v.id,
        slot,
        v.schedule.clone(),
        v.spec.target(),
        v.paused,
        now,
    ));
    let rec = JobRecord {
        id: v.id.clone(),
        slot,
        spec,
        paused: v.paused,
        active_since: now,
        last_fire_at: None,
        next_fire_at: job.first_due(now),
        created_at: now,
        updated_at: now,
        version: 1,
    };
    Ok((rec, job))
}

pub async fn put(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<JobInput>,
) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    let expect = precondition(&headers)?;
    let valid = input.validate(Some(&id), job::generate_id, now_ms(), &state.rules)?;
    state.require_lease(&id)?;
    write(state, id, Change::Replace(valid), expect).await
}

/// `PATCH` with a JSON merge patch (RFC 7396) over the job's definition (the fields a PUT
/// takes). The current definition is read under the slot's write lock, so concurrent
/// patches of different fields all land; with `If-Match`, a stale version is a 412.
pub async fn patch(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    let expect = precondition(&headers)?;
    if expect == Precondition::Absent {
        return Err(ApiError::BadRequest(
            "If-None-Match: * cannot hold for PATCH, which needs an existing job".into(),
        ));
    }
    state.require_lease(&id)?;
    write(state, id, Change::Patch(patch), expect).await
}

/// What a write makes of the job.
enum Change {
    Replace(ValidJob),
    /// A merge patch over the stored definition.
    Patch(serde_json::Value),
}

/// The job's definition as a PUT body: what a merge patch applies to. Includes the secret,
/// which no response shows.
fn definition_of(rec: &JobRecord) -> Result<serde_json::Value, ApiError> {
    let mut doc: serde_json::Value = serde_json::from_str(&rec.spec)
        .map_err(|e| ApiError::Internal(format!("job {} has an unreadable spec: {e}", rec.id)))?;
    if let Some(map) = doc.as_object_mut() {
        map.insert("paused".into(), serde_json::Value::Bool(rec.paused));
    }
    Ok(doc)
}

/// RFC 7396: objects merge member by member, `null` removes, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in changes {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(
                map.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}

/// Replaces (or creates) the job if the stored one meets `expect`.
async fn write(
    state: ApiState,
    id: String,
    change: Change,
    expect: Precondition,
) -> Result<Response, ApiError> {
    to_completion(async move {
        let guard = state.lock(&id).await;
        let fence = state.fence(&id)?;
        // Under the lock nothing else writes the job (and no other node can: the fence).
        let (valid, expect) = match change {
            Change::Replace(valid) => (valid, expect),
            Change::Patch(patch) => {
                let Some(current) = state.store.get_job(&id).await? else {
                    return Err(match expect {
                        Precondition::Any => not_found(&id),
                        _ => StoreError::PreconditionFailed { current: None }.into(),
                    });
                };
                let mut doc = definition_of(&current)?;
                merge_patch(&mut doc, &patch);
                let bytes = serde_json::to_vec(&doc).map_err(|e| {
                    ApiError::Internal(format!("cannot encode the patched job: {e}"))
                })?;
                let input: JobInput = super::extract::parse_json(&bytes)?;
                let valid = input.validate(Some(&id), job::generate_id, now_ms(), &state.rules)?;
                let expect = match expect {
                    Precondition::Version(v) => Precondition::Version(v),
                    _ => Precondition::Version(current.version),
                };
                (valid, expect)
            }
        };
        let held = state.scheduler.hold(&id).await?;
        // After `hold` no fire of the old definition is sent: the new one starts from here.
        let now = now_ms();
        let (rec, job) = record_of(&valid, now)?;
        let outcome = match state
            .store
            .put_job_if(&rec, &fence, &held.cancelled_times(), expect)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                let due = rec.next_fire_at;
                let written = move |r: Option<&JobRecord>| r.is_some_and(|r| r.updated_at == now);
                return Err(undo(&state, guard, &id, held, e, written, Some((job, due))));
            }
        };
        state.scheduler.arm(job, rec.next_fire_at);
        let stored = state
            .store
            .get_job(&id)
            .await?
            .ok_or_else(|| not_found(&id))?;
        let status = match outcome {
            PutOutcome::Created => StatusCode::CREATED,
            PutOutcome::Replaced => StatusCode::OK,
        };
        Ok(JobView::new(stored, &state.node_id)?.respond(status))
    })
    .await
}

pub async fn create(
    State(state): State<ApiState>,
    JsonBody(input): JsonBody<JobInput>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let valid = input.validate(None, || owned_id(&state), now, &state.rules)?;
    let (rec, job) = record_of(&valid, now)?;
    state.require_lease(&rec.id)?;
    to_completion(async move {
        let _guard = state.lock(&rec.id).await;
        let fence = state.fence(&rec.id)?;
        match state.store.insert_job(&rec, &fence).await {
            Ok(()) => {}
            Err(crate::store::StoreError::Conflict) => {
                return Err(ApiError::Conflict(format!(
                    "job {:?} already exists; use PUT /v1/jobs/{} to replace it",
                    rec.id, rec.id
                )));
            }
            Err(e) if e.is_unavailable() => {
                // Maybe written: arm it if the store has it, under the job's lock.
                let id = rec.id.clone();
                let written = move |r: Option<&JobRecord>| r.is_some_and(|r| r.created_at == now);
                let new = Some((job, rec.next_fire_at));
                return Err(undo(&state, _guard, &id, Held::default(), e, written, new));
            }
            Err(e) => return Err(e.into()),
        }
        state.scheduler.arm(job, rec.next_fire_at);
        Ok(JobView::new(rec, &state.node_id)?.respond(StatusCode::CREATED))
    })
    .await
}

/// Runs a write to completion even if the client goes away: axum drops a handler whose
/// connection closed, and a write abandoned between taking its job out of the scheduler and
/// putting it back would leave the job disarmed.
async fn to_completion<T: Send + 'static>(
    write: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(write)
        .await
        .map_err(|e| ApiError::Internal(format!("write task failed: {e}")))?
}

/// After a failed store write: a write that certainly did not happen puts back what `hold`
/// took. One whose outcome is unknown (timeout, lost connection) is settled in the
/// background, still under the job's lock: the stored row says whether it happened
/// (`written`), and the scheduler then arms `new` or puts back the old definition.
fn undo(
    state: &ApiState,
    guard: crate::cluster::WriteGuard,
    id: &str,
    held: Held,
    error: StoreError,
    written: impl Fn(Option<&JobRecord>) -> bool + Send + 'static,
    new: Option<(Arc<Job>, Option<i64>)>,
) -> ApiError {
    if !error.is_unavailable() {
        state.scheduler.restore(held);
        return error.into();
    }
    let state2 = state.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let _guard = guard;
        for _ in 0..120 {
            match state2.store.get_job(&id).await {
                Ok(rec) => {
                    if written(rec.as_ref()) {
                        if let Some((job, due)) = new {
                            state2.scheduler.arm(job, due);
                        }
                    } else {
                        state2.scheduler.restore(held);
                    }
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
        tracing::error!(job_id = %id, "cannot tell whether a write was stored; the job is not fired here until it is written again or its slot is reloaded");
    });
    error.into()
}

pub async fn get(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    let rec = state
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    // The owner is whoever holds the slot's lease (it fires the job), else the ring's pick.
    let owner = match state.store.lease_holder(rec.slot).await? {
        Some(holder) => holder,
        None => state
            .cluster
            .ring()
            .owner_of(rec.slot)
            .unwrap_or(&state.node_id)
            .to_string(),
    };
    Ok(JobView::new(rec, &owner)?.respond(StatusCode::OK))
}

/// An id for a job created without one, in a slot this node holds, so the request needs no
/// hop (with N nodes, one random id in N lands in our slots).
fn owned_id(state: &ApiState) -> String {
    let mut id = job::generate_id();
    for _ in 0..256 {
        if state.leases.writable_epoch(job::slot_of(&id)).is_some() {
            break;
        }
        id = job::generate_id();
    }
    id
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Serialize)]
pub struct JobList {
    jobs: Vec<JobView>,
    next_cursor: Option<String>,
}

fn parse_limit(raw: Option<&str>, default: u32) -> Result<u32, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(ApiError::Invalid(job::FieldError::new(
                "limit",
                format!("{s:?} is not a number from 1 to {MAX_PAGE}"),
            ))),
        },
    }
}

pub async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = parse_limit(q.limit.as_deref(), DEFAULT_PAGE)?;
    let cursor = q.cursor.filter(|c| !c.is_empty());
    if let Some(c) = &cursor {
        job::validate_id("cursor", c)?;
    }
    // One row more than the page tells whether there is a next page: a cursor after the
    // last row would cost the client one empty call.
    let mut records = state.store.list_jobs(cursor.as_deref(), limit + 1).await?;
    let more = records.len() > limit as usize;
    records.truncate(limit as usize);
    let next_cursor = more.then(|| records.last().map(|r| r.id.clone())).flatten();
    // One lease lookup per job would make a page cost a query per row; the ring's owner is
    // who holds the lease except while a slot is moving.
    let ring = state.cluster.ring();
    let jobs = records
        .into_iter()
        .map(|r| {
            let owner = ring.owner_of(r.slot).unwrap_or(&state.node_id).to_string();
            JobView::new(r, &owner)
        })
        .collect::<Result<_, _>>()?;
    Ok(Json(JobList { jobs, next_cursor }))
}

pub async fn delete(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    check_path_id(&id)?;
    let expect = precondition(&headers)?;
    state.require_lease(&id)?;
    to_completion(async move {
        let guard = state.lock(&id).await;
        let fence = state.fence(&id)?;
        let held = state.scheduler.hold(&id).await?;
        match state.store.delete_job_if(&id, &fence, expect).await {
            Ok(true) => {
                // Its rows are gone; deliveries already queued in memory go with them.
                state.delivery.cancel_job(&id);
                Ok(StatusCode::NO_CONTENT)
            }
            Ok(false) => {
                state.scheduler.restore(held);
                Err(not_found(&id))
            }
            Err(e) => Err(undo(&state, guard, &id, held, e, |r| r.is_none(), None)),
        }
    })
    .await
}

#[derive(Serialize)]
struct TriggerView {
    job_id: String,
    execution_id: String,
    scheduled_at: String,
    fired_at: String,
}

pub async fn trigger(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    let (_guard, rec) = lock_existing(&state, &id).await?;
    let job = stored_job(&rec)?;
    let t = state.scheduler.trigger(job).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TriggerView {
            job_id: id,
            execution_id: t.scheduled_at.to_string(),
            scheduled_at: fmt_ms(t.scheduled_at),
            fired_at: fmt_ms(t.fired_at),
        }),
    )
        .into_response())
}

/// For a write about an existing job: checks this node holds the job's slot, takes the
/// job's lock, and reads the stored record under it (404 if there is none).
async fn lock_existing(
    state: &ApiState,
    id: &str,
) -> Result<(crate::cluster::WriteGuard, JobRecord), ApiError> {
    state.require_lease(id)?;
    let guard = state.lock(id).await;
    let rec = state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok((guard, rec))
}

fn stored_job(rec: &JobRecord) -> Result<Arc<Job>, ApiError> {
    Job::from_stored(&rec.id, rec.slot, &rec.spec, rec.paused, rec.active_since)
        .map(Arc::new)
        .map_err(|e| ApiError::Internal(format!("job {}: {e}", rec.id)))
}

pub async fn pause(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    set_paused(state, id, true).await
}

pub async fn resume(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    set_paused(state, id, false).await
}

async fn set_paused(state: ApiState, id: String, paused: bool) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    state.require_lease(&id)?;
    to_completion(async move {
        let (guard, rec) = lock_existing(&state, &id).await?;
        if rec.paused == paused {
            // Already so: resuming a running job must not restart its `@every` period.
            return Ok(JobView::new(rec, &state.node_id)?.respond(StatusCode::OK));
        }
        let fence = state.fence(&id)?;
        let held = state.scheduler.hold(&id).await?;
        let now = now_ms();
        let job = Job::from_stored(&rec.id, rec.slot, &rec.spec, paused, now)
            .map(Arc::new)
            .map_err(|e| ApiError::Internal(format!("job {id}: {e}")))?;
        let due = job.first_due(now);
        let updated = match state
            .store
            .set_paused(&id, paused, now, due, &fence, &held.cancelled_times())
            .await
        {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                state.scheduler.restore(held);
                return Err(not_found(&id));
            }
            Err(e) => {
                let written = move |r: Option<&JobRecord>| r.is_some_and(|r| r.updated_at == now);
                return Err(undo(&state, guard, &id, held, e, written, Some((job, due))));
            }
        };
        state.scheduler.arm(job, due);
        Ok(JobView::new(updated, &state.node_id)?.respond(StatusCode::OK))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    limit: Option<String>,
}

#[derive(Serialize)]
pub struct ExecList {
    executions: Vec<ExecutionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/executions?status=failed`: every node answers from the shared database, so the
/// list is cluster-wide without forwarding. The cursor is `<scheduled_at ms>:<job id>`.
pub async fn executions_by_status(
    State(state): State<ApiState>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ExecList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let raw = q.status.ok_or_else(|| {
        job::FieldError::new(
            "status",
            "is required: pending, succeeded, failed or missed",
        )
    })?;
    let status = ExecStatus::from_name(&raw).ok_or_else(|| {
        job::FieldError::new(
            "status",
            format!("{raw:?} is not one of pending, succeeded, failed, missed"),
        )
    })?;
    let limit = parse_limit(q.limit.as_deref(), DEFAULT_PAGE)?;
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let bad = || {
                job::FieldError::new(
                    "cursor",
                    format!("{c:?} is not a cursor from a previous page"),
                )
            };
            let (at, id) = c.split_once(':').ok_or_else(bad)?;
            let at: i64 = at.parse().map_err(|_| bad())?;
            job::validate_id("cursor", id)?;
            Some((at, id.to_string()))
        }
    };
    let mut list = state
        .store
        .list_executions_by_status(
            status,
            cursor.as_ref().map(|(a, i)| (*a, i.as_str())),
            limit + 1,
        )
        .await?;
    let more = list.len() > limit as usize;
    list.truncate(limit as usize);
    let next_cursor = more
        .then(|| {
            list.last()
                .map(|e| format!("{}:{}", e.scheduled_at, e.job_id))
        })
        .flatten();
    Ok(Json(ExecList {
        executions: list.into_iter().map(ExecutionView::from).collect(),
        next_cursor,
    }))
}

pub async fn executions(
    State(state): State<ApiState>,
    PathParams(id): PathParams<String>,
    query: Result<Query<ExecQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ExecList>, ApiError> {
    check_path_id(&id)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = parse_limit(q.limit.as_deref(), 20)?;
    if state.store.get_job(&id).await?.is_none() {
        return Err(not_found(&id));
    }
    let list = state.store.list_executions(&id, limit).await?;
    Ok(Json(ExecList {
        executions: list.into_iter().map(ExecutionView::from).collect(),
        next_cursor: None,
    }))
}

#[derive(Serialize)]
struct RedriveView {
    job_id: String,
    execution_id: String,
    scheduled_at: String,
    status: &'static str,
    attempts: u32,
    /// The last attempt this delivery may now make.
    attempt_limit: u32,
    next_attempt_at: String,
}

/// `POST /v1/jobs/{id}/executions/{execution_id}/retry`: re-drives a dead letter.
pub async fn retry_execution(
    State(state): State<ApiState>,
    PathParams((id, execution_id)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    check_path_id(&id)?;
    let scheduled_at = execution_id
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "execution id {execution_id:?} is not valid: it is the scheduled time in unix \
                 milliseconds, as listed by GET /v1/jobs/{id}/executions"
            ))
        })?;
    let (_guard, rec) = lock_existing(&state, &id).await?;
    let job = stored_job(&rec)?;
    let key = ExecKey {
        job_id: id.as_str().into(),
        scheduled_at,
    };
    let epoch = state
        .leases
        .writable_epoch(rec.slot)
        .ok_or_else(|| ApiError::unavailable("the job's slot is moving between nodes"))?;
    match state
        .store
        .redrive(
            &key,
            job.target.retry.max_attempts,
            now_ms(),
            &state.node_id,
            epoch,
        )
        .await?
    {
        Redrive::Redriven(pending) => {
            let view = RedriveView {
                job_id: id.clone(),
                execution_id: scheduled_at.to_string(),
                scheduled_at: fmt_ms(scheduled_at),
                status: ExecStatus::Pending.as_str(),
                attempts: pending.attempts,
                attempt_limit: pending
                    .attempt_limit
                    .unwrap_or(job.target.retry.max_attempts),
                next_attempt_at: fmt_ms(pending.next_attempt_at),
            };
            state
                .delivery
                .submit(crate::delivery::resume_tasks(vec![pending]));
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
        Redrive::NotOwner => Err(ApiError::unavailable(
            "the job's slot is moving between nodes",
        )),
        Redrive::NotFound => Err(ApiError::NotFound(format!(
            "job {id:?} has no execution {execution_id} (pruned, or never scheduled)"
        ))),
        Redrive::NotFailed(status) => Err(ApiError::Conflict(format!(
            "execution {execution_id} of job {id:?} is {}; only failed deliveries can be retried",
            status.as_str()
        ))),
    }
}
