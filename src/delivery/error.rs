//! Why an attempt did not succeed, and whether another attempt can help.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    /// A 3xx: callbacks do not follow redirects, so the attempt failed and is not retried
    /// (the job's URL has to be corrected).
    #[error(
        "HTTP {status} redirect to {location:?} not followed: callbacks are never redirected; \
         set the job's callback URL to the final address"
    )]
    Redirect { status: u16, location: String },
    #[error("gRPC {code:?}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Grpc { code: tonic::Code, message: String },
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The destination is refused by the outbound policy: never retried.
    #[error("{0}")]
    Refused(String),
    /// The connection could not be made, so nothing was sent: another instance of a Consul
    /// service can be tried at once.
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Transport(String),
    /// A Consul service with no passing instance (or an unreachable Consul): nothing was sent.
    #[error("{0}")]
    NoInstance(String),
    /// Not delivered within the job's `retry.max_age_ms` of its scheduled time: given up.
    #[error(
        "expired: not delivered within {max_age_ms} ms (retry.max_age_ms) of its scheduled \
         time ({age_ms} ms ago); re-drive it to send it anyway"
    )]
    Expired { age_ms: i64, max_age_ms: u64 },
}

impl AttemptError {
    /// HTTP: 5xx, 408, 429, timeouts and connection errors are worth another attempt; other
    /// statuses mean the receiver rejected the request and repeating it will not help.
    /// gRPC: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED, as the contract says.
    pub fn is_retryable(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            AttemptError::Grpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
            ),
            AttemptError::Timeout(_)
            | AttemptError::Connect(_)
            | AttemptError::Transport(_)
            | AttemptError::NoInstance(_) => true,
            AttemptError::Refused(_)
            | AttemptError::Redirect { .. }
            | AttemptError::Expired { .. } => false,
        }
    }

    /// Whether the failure says the downstream is unhealthy (as opposed to the receiver
    /// rejecting this one request): these feed the circuit breaker and instance ejection.
    pub fn is_downstream_failure(&self) -> bool {
        self.is_retryable() && !matches!(self, AttemptError::NoInstance(_))
    }

    /// Nothing reached the target: the attempt says nothing about its health.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            AttemptError::NoInstance(_) | AttemptError::Refused(_) | AttemptError::Expired { .. }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptError::Status { status, .. } | AttemptError::Redirect { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_contract() {
        let st = |status| AttemptError::Status {
            status,
            retry_after: None,
            body: String::new(),
        };
        for s in [500, 502, 503, 408, 429] {
            assert!(st(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 404, 410, 422] {
            assert!(!st(s).is_retryable(), "{s}");
        }
        let grpc = |code| AttemptError::Grpc {
            code,
            message: String::new(),
        };
        for c in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::ResourceExhausted,
        ] {
            assert!(grpc(c).is_retryable(), "{c:?}");
        }
        for c in [
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
            tonic::Code::Internal,
            tonic::Code::Unimplemented,
            tonic::Code::PermissionDenied,
        ] {
            assert!(!grpc(c).is_retryable(), "{c:?}");
        }
        assert!(AttemptError::Timeout(5).is_retryable());
        assert!(AttemptError::Transport("reset".into()).is_retryable());
        assert!(AttemptError::Connect("refused".into()).is_retryable());
        assert!(!AttemptError::Refused("metadata".into()).is_retryable());
        let redirect = AttemptError::Redirect {
            status: 307,
            location: "http://127.0.0.2/".into(),
        };
        assert!(!redirect.is_retryable() && !redirect.is_downstream_failure());
        assert!(AttemptError::NoInstance("none".into()).is_retryable());
        assert!(!AttemptError::NoInstance("none".into()).is_downstream_failure());
    }
}
