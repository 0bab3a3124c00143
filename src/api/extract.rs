//! Request guards: JSON bodies with errors that name the field, path parameters, bearer
//! auth, readiness, and the checks that keep browsers and slow clients from abusing the API.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use super::{ApiError, ApiState};

/// Like `axum::Json`, but every rejection is an [`ApiError`]: malformed JSON → 400, a
/// well-formed body with a wrong field → 422 naming the field's path, too large → 413, not
/// declared JSON → 415 (size and read deadline: see [`read_body_first`]).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        require_json(req.headers())?;
        // `read_body_first` has read the body within its limit and deadline: this only takes
        // it out of memory.
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::BadRequest(format!("cannot read request body: {}", e.body_text()))
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// How request bodies are read: the largest accepted, and how long a client may take to
/// send one.
#[derive(Clone, Copy)]
pub struct BodyRules {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

impl Default for BodyRules {
    fn default() -> Self {
        BodyRules {
            max_bytes: crate::config::DEFAULT_MAX_BODY_BYTES,
            read_timeout: crate::config::DEFAULT_REQUEST_READ_TIMEOUT,
        }
    }
}

/// Reads every request body in full before routing, within the size limit and the read
/// timeout. A body declared (`Content-Length`) over the limit is refused before any of it is
/// read: waiting for bytes a client may never send would hold the connection open. And a
/// request rejected before its handler read the body (401, 403, 415, …) would otherwise
/// leave the rest of the body on the connection: hyper then closes it after the answer,
/// racing the client's next request on it.
pub async fn read_body_first(req: Request, next: Next) -> Result<Response, ApiError> {
    let rules = req
        .extensions()
        .get::<BodyRules>()
        .copied()
        .unwrap_or_default();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > rules.max_bytes as u64) {
        return Err(ApiError::TooLarge(rules.max_bytes));
    }
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if declared.unwrap_or(0) == 0 && !chunked {
        return Ok(next.run(req).await);
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, rules.max_bytes);
    let bytes = tokio::time::timeout(rules.read_timeout, read)
        .await
        .map_err(|_| {
            ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} ms",
                rules.read_timeout.as_millis()
            ))
        })?
        .map_err(|e| {
            if declared.is_none() {
                ApiError::TooLarge(rules.max_bytes)
            } else {
                ApiError::BadRequest(format!("cannot read the request body: {e}"))
            }
        })?;
    Ok(next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await)
}

/// Bodies must be declared JSON (`application/json`, or an `application/…+json` type):
/// a web page can send `text/plain` or a form without a CORS preflight, and accepting
/// those would let any site a user visits write jobs on an unauthenticated node.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => Ok(()),
        Some(t) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {t:?} is not accepted; send the body as application/json"
        ))),
        None => Err(ApiError::UnsupportedMediaType(
            "the request has no Content-Type; send the body as application/json".into(),
        )),
    }
}

/// Refuses writes a browser sends on behalf of a page from another origin (it always sends
/// `Origin` on those). Body-less writes (pause, trigger, delete) need this: no content type
/// can tell a page's request from a client's. Forwarded requests were checked where they
/// arrived (and a page cannot add the forwarding header without a preflight).
pub async fn refuse_cross_origin(req: Request, next: Next) -> Result<Response, ApiError> {
    let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let forwarded = req.headers().contains_key(super::forward::FORWARDED_BY);
    if let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .filter(|_| is_write && !forwarded)
    {
        let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let same = host.is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(&host))
        });
        if !same {
            let shown: String = origin.chars().take(100).collect();
            return Err(ApiError::Forbidden(format!(
                "cross-origin write from {shown:?} refused; call the API from a client, \
                 not from a page of another site"
            )));
        }
    }
    Ok(next.run(req).await)
}

/// Like `axum::extract::Path`, with rejections as the contract's JSON errors.
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParams(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                Err(ApiError::BadRequest(match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => format!(
                        "path: {key} is not valid UTF-8 once percent-decoded; \
                         percent-encode the UTF-8 bytes of the value"
                    ),
                    _ => format!("path: {}", e.body_text()),
                }))
            }
            Err(e) => Err(ApiError::BadRequest(format!("path: {}", e.body_text()))),
        }
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "request body is empty; send a JSON object".into(),
        ));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::BadRequest(format!("request body: {}", humanize(&inner.to_string())))
        } else {
            ApiError::Invalid(crate::job::FieldError::new(
                path,
                humanize(&inner.to_string()),
            ))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// serde's message in the API's words: no position, no Rust type names, and for a misspelt
/// field the closest valid one.
fn humanize(msg: &str) -> String {
    let mut out = strip_position(msg);
    for (rust, plain) in [
        ("expected i64", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected a map", "expected an object"),
        ("expected a sequence", "expected a list"),
    ] {
        out = out.replace(rust, plain);
    }
    if let Some(i) = out.find("expected struct ") {
        let rest = &out[i + "expected struct ".len()..];
        let end = rest
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        out = format!("{}expected an object{}", &out[..i], &rest[end..]);
    }
    if let Some(suggestion) = closest_field(&out) {
        out.push_str(&format!("; did you mean `{suggestion}`?"));
    }
    out
}

/// For "unknown field `shedule`, expected one of `id`, `schedule`, …": the valid field
/// nearest the misspelt one, if it is near enough to be a typo.
fn closest_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (given, rest) = rest.split_once('`')?;
    let valid = rest.split('`').skip(1).step_by(2);
    crate::config::closest_name(given, valid).map(str::to_string)
}

/// serde_json appends " at line 1 column 42", which means nothing once the field is named.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

pub async fn require_token(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.api_token {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(req).await)
}

/// Until owned jobs are loaded, an answer could contradict what the scheduler will do.
pub async fn require_ready(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.is_ready() {
        return Err(ApiError::unavailable("the node is starting; retry shortly"));
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobInput;

    #[test]
    fn json_errors_are_classified() {
        let e = parse_json::<JobInput>(b"{not json").unwrap_err();
        assert!(
            matches!(e, ApiError::BadRequest(ref m) if m.starts_with("malformed JSON")),
            "{e}"
        );
        let e = parse_json::<JobInput>(b"").unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = parse_json::<JobInput>(br#"{"schedule": 5}"#).unwrap_err();
        assert!(
            matches!(e, ApiError::Invalid(ref f) if f.field == "schedule"),
            "{e}"
        );
        let e =
            parse_json::<JobInput>(br#"{"callback": {"http": {"timeout_ms": "x"}}}"#).unwrap_err();
        assert!(
            matches!(e, ApiError::Invalid(ref f) if f.field == "callback.http.timeout_ms"),
            "{e}"
        );
        let e = parse_json::<JobInput>(br#"{"shedule": "@hourly"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `shedule`"), "{e}");
        assert!(e.to_string().contains("did you mean `schedule`?"), "{e}");
        let e = parse_json::<JobInput>(br#"{"zzz": 1}"#).unwrap_err();
        assert!(
            !e.to_string().contains("did you mean"),
            "no wild guesses: {e}"
        );
        // No Rust type names reach the client.
        let e = parse_json::<JobInput>(br#"{"callback": "http://h/"}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected an object") && !e.to_string().contains("struct"),
            "{e}"
        );
        let e = parse_json::<JobInput>(br#"{"retry": {"max_attempts": "x"}}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected an integer") && !e.to_string().contains("i64"),
            "{e}"
        );
        let e = parse_json::<JobInput>(br#"{} {}"#).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = parse_json::<JobInput>(b"[1]").unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
