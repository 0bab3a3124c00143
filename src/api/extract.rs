//! Request guards: JSON bodies with errors that name the field, bearer auth, readiness.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use super::{ApiError, ApiState};

/// Like `axum::Json`, but every rejection is an [`ApiError`]: malformed JSON → 400, a
/// well-formed body with a wrong field → 422 naming the field's path, too large → 413.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit_hint = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(limit_hint)
            } else {
                ApiError::BadRequest(format!("cannot read request body: {}", e.body_text()))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The configured body limit, for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

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
            ApiError::BadRequest(format!("request body: {inner}"))
        } else {
            ApiError::Invalid(crate::job::FieldError::new(
                path,
                strip_position(&inner.to_string()),
            ))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    Ok(value)
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
