//! One HTTP callback attempt, exactly as the contract describes it.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use super::OutboundPolicy;
use super::error::AttemptError;
use crate::clock::fmt_ms;
use crate::job::HttpCallback;

/// Bytes of a failed response body kept for `last_error`; the rest is never read.
const MAX_ERROR_BODY: usize = 512;

#[derive(Serialize)]
struct Body<'a> {
    job_id: &'a str,
    scheduled_at: String,
    fired_at: String,
    attempt: u32,
    payload: &'a RawValue,
}

pub(crate) struct Attempt<'a> {
    pub job_id: &'a str,
    pub scheduled_at: i64,
    pub fired_at: i64,
    pub attempt: u32,
    pub payload: &'a RawValue,
    pub secret: Option<&'a str>,
}

/// Sends one attempt; `Ok(status)` for a 2xx.
pub(crate) async fn send(
    client: &reqwest::Client,
    outbound: &OutboundPolicy,
    cb: &HttpCallback,
    url: reqwest::Url,
    a: &Attempt<'_>,
) -> Result<u16, AttemptError> {
    // Host names are checked by the client's resolver; IP literals never reach it.
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(ip) = literal {
        outbound
            .check(ip)
            .map_err(|e| AttemptError::Refused(format!("refused: {e}")))?;
    }
    let scheduled = fmt_ms(a.scheduled_at);
    let body = serde_json::to_vec(&Body {
        job_id: a.job_id,
        scheduled_at: scheduled.clone(),
        fired_at: fmt_ms(a.fired_at),
        attempt: a.attempt,
        payload: a.payload,
    })
    .map_err(|e| AttemptError::Transport(format!("cannot encode body: {e}")))?;
    let mut req = client
        .request(cb.method.as_reqwest(), url)
        .timeout(Duration::from_millis(cb.timeout_ms))
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            format!("{}@{}", a.job_id, a.scheduled_at),
        )
        .header("x-chime-job-id", a.job_id)
        .header("x-chime-scheduled-at", scheduled)
        .header("x-chime-attempt", a.attempt.to_string());
    for (k, v) in &cb.headers {
        req = req.header(k, v);
    }
    if let Some(secret) = a.secret {
        let ts = chrono::Utc::now().timestamp().to_string();
        req = req
            .header("x-chime-signature", sign(secret, &ts, &body))
            .header("x-chime-timestamp", ts);
    }
    let resp = req
        .body(body)
        .send()
        .await
        .map_err(|e| classify(e, cb.timeout_ms))?;
    let status = resp.status().as_u16();
    if resp.status().is_redirection() {
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(256)
                    .collect()
            })
            .unwrap_or_default();
        return Err(AttemptError::Redirect { status, location });
    }
    if resp.status().is_success() {
        // Not reading the body would cost the keep-alive connection; reading all of a hostile
        // one would cost memory: drain at most a few KB within the request timeout.
        drain(resp, 64 * 1024).await;
        return Ok(status);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = drain(resp, MAX_ERROR_BODY).await;
    Err(AttemptError::Status {
        status,
        retry_after,
        body,
    })
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub(crate) fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Reads up to `limit` bytes of the body, as printable text.
async fn drain(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk[..chunk.len().min(limit - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf)
        .chars()
        .take(MAX_ERROR_BODY)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn classify(e: reqwest::Error, timeout_ms: u64) -> AttemptError {
    if e.is_timeout() {
        return AttemptError::Timeout(timeout_ms);
    }
    // reqwest's Display is terse ("error sending request"); the source chain says why.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<super::outbound::Refused>() {
            return AttemptError::Refused(refused.to_string());
        }
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        AttemptError::Connect(msg)
    } else {
        AttemptError::Transport(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac k
        assert_eq!(
            sign("k", "1700000000", b"{}"),
            "sha256=c6ef4734033cee2367414a0939385eca0397754aa7a59716da7463a9298b5146"
        );
    }
}
