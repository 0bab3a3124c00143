//! Sends requests about a job to the node that owns the job's slot.
//!
//! Any node accepts any request. For `/v1/jobs/{id}…` (and `POST /v1/jobs` with an `id` in
//! the body) the owner is looked up in this node's ring; a request for another owner is
//! proxied there with `X-Chime-Forwarded-By`, and a forwarded request is always handled where
//! it lands, so rings that disagree cannot bounce a request around. An unreachable owner
//! gives 503 with `Retry-After`.

use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, ApiState};
use crate::job::slot_of;

pub const FORWARDED_BY: &str = "x-chime-forwarded-by";
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The job a request is about, from its path: `/v1/jobs/{id}` and below.
fn job_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/jobs/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

pub async fn route_to_owner(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if req.headers().contains_key(FORWARDED_BY) {
        return Ok(next.run(req).await);
    }
    // Inside the router nested at /v1 the path has lost its prefix; route on the original.
    let path = original_uri(&req).path().to_string();
    if let Some(id) = job_in_path(&path) {
        let id = percent_decode(id);
        return match state.remote_owner(&id) {
            Some(owner) => forward(&state, &owner, req, None).await,
            None => Ok(next.run(req).await),
        };
    }
    if req.method() == Method::POST && path == "/v1/jobs" {
        // The id, if any, is in the body: read it (bounded) to route the request.
        let (parts, body) = req.into_parts();
        let bytes = state.read_body(body).await?;
        let id = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
        if let Some(owner) = id.as_deref().and_then(|id| state.remote_owner(id)) {
            return forward(
                &state,
                &owner,
                Request::from_parts(parts, Body::empty()),
                Some(bytes),
            )
            .await;
        }
        return Ok(next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await);
    }
    Ok(next.run(req).await)
}

fn original_uri(req: &Request) -> axum::http::Uri {
    req.extensions()
        .get::<OriginalUri>()
        .map(|o| o.0.clone())
        .unwrap_or_else(|| req.uri().clone())
}

impl ApiState {
    /// Takes the body `read_body_first` has already read (within its limit and deadline).
    async fn read_body(&self, body: Body) -> Result<axum::body::Bytes, ApiError> {
        to_bytes(body, self.body.max_bytes)
            .await
            .map_err(|_| ApiError::TooLarge(self.body.max_bytes))
    }

    /// The owner of `id`'s slot if it is another node (None: this node, or no ring yet).
    fn remote_owner(&self, id: &str) -> Option<String> {
        let ring = self.cluster.ring();
        let owner = ring.owner_of(slot_of(id))?;
        (owner != self.cluster.node_id()).then(|| owner.to_string())
    }
}

async fn forward(
    state: &ApiState,
    owner: &str,
    req: Request,
    body: Option<bytes::Bytes>,
) -> Result<Response, ApiError> {
    let unavailable = |why: String| ApiError::Unavailable {
        message: format!("the job's owner {owner} cannot be reached ({why}); retry shortly"),
        retry_after_secs: 1,
    };
    let addr = state
        .cluster
        .http_addr_of(owner)
        .ok_or_else(|| unavailable("address unknown".into()))?;
    let (parts, req_body) = req.into_parts();
    let bytes = match body {
        Some(b) => b,
        None => state.read_body(req_body).await?,
    };
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map(|o| o.0.clone())
        .unwrap_or_else(|| parts.uri.clone());
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = state
        .forwarder
        .request(
            parts.method.clone(),
            format!("http://{addr}{path_and_query}"),
        )
        .timeout(FORWARD_TIMEOUT)
        .header(FORWARDED_BY, state.cluster.node_id())
        .body(bytes);
    for (name, value) in &parts.headers {
        if !is_hop_header(name) {
            out = out.header(name, value);
        }
    }
    let resp = out.send().await.map_err(|e| unavailable(e.to_string()))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if !is_hop_header(name) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from(body))
        .map_err(|e| ApiError::Internal(format!("cannot relay the owner's response: {e}")))
}

fn is_hop_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade"
    )
}

/// Ids are restricted to URL-safe characters, so only a malformed path has escapes; decode
/// them so the owner lookup matches what the handler will see.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_job_in_paths() {
        assert_eq!(job_in_path("/v1/jobs/a"), Some("a"));
        assert_eq!(job_in_path("/v1/jobs/a/trigger"), Some("a"));
        assert_eq!(job_in_path("/v1/jobs/"), None);
        assert_eq!(job_in_path("/v1/jobs"), None);
        assert_eq!(job_in_path("/v1/cluster"), None);
        assert_eq!(percent_decode("bad%20id"), "bad id");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("trail%2"), "trail%2");
        assert_eq!(percent_decode("é%zz%41"), "é%zzA");
    }
}
