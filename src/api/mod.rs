//! The REST API (`/v1`), health, readiness and metrics, on one axum router.

mod error;
mod extract;
mod forward;
mod jobs;
mod server;
pub(crate) mod system;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};

pub use error::ApiError;
pub use extract::BodyRules;
pub use server::serve;
pub use system::{MAX_PREVIEW, preview_times};

use crate::cluster::{Cluster, Leases};
use crate::scheduler::SchedulerHandle;
use crate::store::Store;

/// Shared by all handlers; every field is cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    node_id: Arc<str>,
    store: Store,
    scheduler: SchedulerHandle,
    /// For re-driven dead letters (everything else reaches delivery through the scheduler).
    delivery: crate::delivery::DeliveryHandle,
    cluster: Cluster,
    leases: Arc<Leases>,
    /// Client for forwarding requests to other nodes.
    forwarder: reqwest::Client,
    body: BodyRules,
    rules: crate::job::TargetRules,
    api_token: Option<Arc<str>>,
    ready: Arc<AtomicBool>,
}

pub struct ApiConfig {
    pub node_id: String,
    pub api_token: Option<String>,
    pub body: BodyRules,
    pub rules: crate::job::TargetRules,
}

impl ApiState {
    pub fn new(
        config: ApiConfig,
        store: Store,
        scheduler: SchedulerHandle,
        delivery: crate::delivery::DeliveryHandle,
        cluster: Cluster,
        leases: Arc<Leases>,
    ) -> Self {
        ApiState {
            node_id: config.node_id.into(),
            store,
            scheduler,
            delivery,
            cluster,
            leases,
            forwarder: reqwest::Client::builder()
                .no_proxy()
                // The owner's answer, redirect or not, goes back to the client as it is.
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("a client with static settings builds"),
            body: config.body,
            rules: config.rules,
            api_token: config.api_token.map(Into::into),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Owned jobs are loaded: `/v1` and `/readyz` start answering.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Writes of a job happen only on the holder of its slot's lease, so that the scheduler
    /// that fires the job is the one that sees the write.
    fn require_lease(&self, id: &str) -> Result<(), ApiError> {
        let slot = crate::job::slot_of(id);
        if self.leases.writable_epoch(slot).is_some() {
            Ok(())
        } else {
            Err(ApiError::unavailable(format!(
                "slot {slot} of job {id:?} is moving to this node; retry shortly"
            )))
        }
    }

    /// Serializes writes of the job's slot, and keeps a handover of the slot waiting until
    /// the write has armed (or put back) what it wrote.
    async fn lock(&self, id: &str) -> crate::cluster::WriteGuard {
        self.leases.write_lock(crate::job::slot_of(id)).await
    }

    /// The lease a write of job `id` is fenced with in its transaction.
    fn fence(&self, id: &str) -> Result<crate::store::Fence, ApiError> {
        let slot = crate::job::slot_of(id);
        let epoch = self.leases.writable_epoch(slot).ok_or_else(|| {
            ApiError::unavailable(format!(
                "slot {slot} of job {id:?} is moving to this node; retry shortly"
            ))
        })?;
        Ok(crate::store::Fence {
            node: self.node_id.clone(),
            slot,
            epoch,
        })
    }
}

pub fn router(state: ApiState) -> Router {
    let body = state.body;
    let v1 = Router::new()
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route(
            "/jobs/{id}",
            put(jobs::put)
                .get(jobs::get)
                .patch(jobs::patch)
                .delete(jobs::delete),
        )
        .route("/jobs/{id}/trigger", post(jobs::trigger))
        .route("/jobs/{id}/pause", post(jobs::pause))
        .route("/jobs/{id}/resume", post(jobs::resume))
        .route("/jobs/{id}/executions", get(jobs::executions))
        .route(
            "/jobs/{id}/executions/{execution_id}/retry",
            post(jobs::retry_execution),
        )
        .route("/executions", get(jobs::executions_by_status))
        .route("/cluster", get(system::cluster))
        .route("/schedule/preview", get(system::preview))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::route_to_owner,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            extract::require_ready,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            extract::require_token,
        ))
        .route_layer(middleware::from_fn(extract::refuse_cross_origin));
    let node_header = HeaderValue::from_str(&state.node_id).ok();
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .layer(middleware::from_fn(extract::read_body_first))
        .layer(axum::Extension(body))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let node_header = node_header.clone();
            async move {
                let mut resp: Response = next.run(req).await;
                // A forwarded response already names the node that handled it.
                if let Some(v) = node_header {
                    resp.headers_mut().entry("x-chime-node").or_insert(v);
                }
                resp
            }
        }))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
