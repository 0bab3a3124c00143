//! Jobs as the API receives them and as the rest of chime uses them. No I/O here.
//!
//! [`JobInput`] is the untrusted request body; [`JobInput::validate`] turns it into a
//! [`ValidJob`] or a [`FieldError`] naming the first bad field. Every field is checked here,
//! before anything is stored, so bad input never reaches the store or the scheduler.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::delivery::OutboundPolicy;
use crate::schedule::{Schedule, parse_timezone};

/// Jobs are spread over this many fixed slots; a slot is the unit of ownership in a cluster
/// (the ring maps slots to nodes, and rows carry their slot so gained slots load by index).
/// Changing it changes every job's slot: it is part of the storage format.
pub const SLOTS: u32 = 4096;

pub const MAX_ID_LEN: usize = 128;
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
pub const MAX_TIMEOUT_MS: u64 = 300_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const MAX_ATTEMPTS: u32 = 100;
pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 1_000;
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 60_000;
pub const MAX_BACKOFF_MS: u64 = 24 * 3_600_000;
/// A delivery not made within this long of its scheduled time is given up as `expired`
/// (EventBridge Scheduler's default maximum event age).
pub const DEFAULT_MAX_AGE_MS: u64 = 24 * 3_600_000;
pub const MAX_MAX_AGE_MS: u64 = 7 * 24 * 3_600_000;
const MAX_HEADERS: usize = 64;
const MAX_SECRET_LEN: usize = 256;

/// Headers chime sets itself; a job may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "idempotency-key",
    "x-chime-job-id",
    "x-chime-scheduled-at",
    "x-chime-attempt",
    "x-chime-timestamp",
    "x-chime-signature",
];

/// Stable slot of a job id: SipHash-2-4 with zero keys over the id's bytes. Never use std's
/// `Hash` here: its encoding may change between Rust releases and the slot is stored.
pub fn slot_of(id: &str) -> u32 {
    let mut h = siphasher::sip::SipHasher24::new();
    h.write(id.as_bytes());
    (h.finish() % u64::from(SLOTS)) as u32
}

/// A bad field: the API answers 422 with `"<field>: <reason>"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Longest reason kept: reasons quote the offending value, and a hostile body must not be
/// echoed back whole.
const MAX_REASON_CHARS: usize = 300;

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
            reason.truncate(cut);
            reason.push_str("… (truncated)");
        }
        Self {
            field: field.into(),
            reason,
        }
    }
}

pub fn validate_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "must be 1-{MAX_ID_LEN} characters, got {}",
                id.chars().count()
            ),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
    {
        return Err(FieldError::new(
            field,
            format!("character {c:?} is not allowed; use A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(())
}

/// The request body of `PUT /v1/jobs/{id}` and `POST /v1/jobs`. Everything is optional here
/// so that a missing field gets chime's own message (422 naming it), not serde's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobInput {
    pub id: Option<String>,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub callback: Option<CallbackInput>,
    pub payload: Option<Box<RawValue>>,
    pub retry: Option<RetryInput>,
    pub paused: Option<bool>,
    pub secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackInput {
    pub http: Option<HttpInput>,
    pub grpc: Option<GrpcInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpInput {
    pub url: Option<String>,
    pub method: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcInput {
    pub target: Option<String>,
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryInput {
    pub max_attempts: Option<i64>,
    pub initial_backoff_ms: Option<i64>,
    pub max_backoff_ms: Option<i64>,
    pub max_age_ms: Option<i64>,
}

/// Where and how a fire is delivered. One `Arc<Target>` is shared by a job and all of its
/// fires in memory, and its JSON is the durable snapshot stored with each execution, so a
/// retry after a crash sends exactly what the first attempt sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub callback: Callback,
    pub payload: Box<RawValue>,
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Callback {
    Http(HttpCallback),
    Grpc(GrpcCallback),
}

/// A gRPC callback: `CallbackService/Fire` at `target` (`http://host:port`,
/// `https://host:port` or `consul://<service>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrpcCallback {
    pub target: String,
    pub timeout_ms: u64,
}

/// What a callback target may be, from the node's configuration.
#[derive(Debug, Clone, Default)]
pub struct TargetRules {
    pub outbound: OutboundPolicy,
    /// `consul://` targets need a Consul agent to resolve them.
    pub consul: bool,
}

/// Consul service names: DNS labels (Consul warns about anything else), at most 255 bytes.
fn validate_consul_service(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("the consul service name must be 1-255 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.'))
    {
        return Err(format!(
            "character {c:?} is not allowed in a consul service name; use A-Z a-z 0-9 - _ ."
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpCallback {
    pub url: String,
    pub method: HttpMethod,
    /// A list, not a map, in memory: a `BTreeMap` node costs ~600 bytes even for one header,
    /// which at a million jobs was half of the node's memory. On the wire it is a JSON map.
    #[serde(default, with = "header_map")]
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl HttpMethod {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GET" => HttpMethod::Get,
            "POST" => HttpMethod::Post,
            "PUT" => HttpMethod::Put,
            "PATCH" => HttpMethod::Patch,
            "DELETE" => HttpMethod::Delete,
            _ => return None,
        })
    }

    pub fn as_reqwest(self) -> reqwest::Method {
        match self {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Patch => reqwest::Method::PATCH,
            HttpMethod::Delete => reqwest::Method::DELETE,
        }
    }
}

mod header_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        let mut v: Vec<(String, String)> = map.into_iter().collect();
        v.shrink_to_fit();
        Ok(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long after its scheduled time a delivery may still be attempted. Absent from
    /// definitions stored before it existed: those get the default.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
}

fn default_max_age_ms() -> u64 {
    DEFAULT_MAX_AGE_MS
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            max_age_ms: DEFAULT_MAX_AGE_MS,
        }
    }
}

/// What is stored in `jobs.spec`: the definition without the columns the database
/// queries on (id, slot, paused, times). Flat rather than `#[serde(flatten)]` over
/// [`Target`]: flatten cannot carry a `RawValue` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSpec {
    pub schedule: String,
    pub timezone: String,
    pub callback: Callback,
    pub payload: Box<RawValue>,
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl StoredSpec {
    pub fn target(&self) -> Target {
        Target {
            callback: self.callback.clone(),
            payload: self.payload.clone(),
            retry: self.retry,
            secret: self.secret.clone(),
        }
    }
}

/// A job that passed validation.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub id: String,
    pub schedule: Schedule,
    pub paused: bool,
    pub spec: StoredSpec,
}

impl JobInput {
    /// Checks every field. `path_id` is the id from the URL (PUT); `generated_id` is used when
    /// neither the URL nor the body has one (POST). `now_ms` decides whether `@at` is past.
    pub fn validate(
        self,
        path_id: Option<&str>,
        generated_id: impl FnOnce() -> String,
        now_ms: i64,
        rules: &TargetRules,
    ) -> Result<ValidJob, FieldError> {
        let id = match (path_id, self.id) {
            (Some(p), Some(b)) if p != b => {
                return Err(FieldError::new(
                    "id",
                    format!("body id {b:?} does not match the id {p:?} in the path"),
                ));
            }
            (Some(p), _) => p.to_string(),
            (None, Some(b)) => b,
            (None, None) => generated_id(),
        };
        validate_id("id", &id)?;

        let tz = match self.timezone.as_deref().map(str::trim) {
            None => chrono_tz::Tz::UTC,
            Some("") => {
                return Err(FieldError::new(
                    "timezone",
                    "is empty; give an IANA zone such as Europe/London, or leave it out for UTC",
                ));
            }
            Some(name) => {
                parse_timezone(name).map_err(|e| FieldError::new("timezone", e.to_string()))?
            }
        };
        // The canonical name, not the input: " Europe/London\n" is stored as Europe/London.
        let tz_name = tz.name().to_string();
        let expr = self
            .schedule
            .ok_or_else(|| FieldError::new("schedule", "is required"))?;
        let schedule =
            Schedule::parse(&expr, tz).map_err(|e| FieldError::new("schedule", e.to_string()))?;
        if schedule.next_after(now_ms, now_ms).is_none() {
            let reason = if schedule.is_one_shot() {
                "the @at time is in the past"
            } else {
                "the expression never matches a future time"
            };
            return Err(FieldError::new("schedule", reason));
        }

        let callback = validate_callback(
            self.callback
                .ok_or_else(|| FieldError::new("callback", "is required (http or grpc)"))?,
            rules,
        )?;
        let retry = validate_retry(self.retry)?;
        let secret = match self.secret {
            Some(s) if s.is_empty() || s.len() > MAX_SECRET_LEN => {
                return Err(FieldError::new(
                    "secret",
                    format!("must be 1-{MAX_SECRET_LEN} bytes"),
                ));
            }
            other => other,
        };
        let payload = self
            .payload
            .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is valid json"));

        Ok(ValidJob {
            id,
            paused: self.paused.unwrap_or(false),
            spec: StoredSpec {
                schedule: schedule.source().to_string(),
                timezone: tz_name,
                callback,
                payload,
                retry,
                secret,
            },
            schedule,
        })
    }
}

fn validate_callback(input: CallbackInput, rules: &TargetRules) -> Result<Callback, FieldError> {
    match (input.http, input.grpc) {
        (Some(_), Some(_)) => Err(FieldError::new(
            "callback",
            "give exactly one of http or grpc, not both",
        )),
        (None, None) => Err(FieldError::new(
            "callback",
            "give exactly one of http or grpc",
        )),
        (None, Some(grpc)) => validate_grpc(grpc, rules).map(Callback::Grpc),
        (Some(http), None) => validate_http(http, rules).map(Callback::Http),
    }
}

/// Checks a target URL's scheme and host; `consul://` needs Consul configured and a valid
/// service name in the host position.
fn validate_target_url(
    field: &str,
    raw: &str,
    rules: &TargetRules,
) -> Result<reqwest::Url, FieldError> {
    let url = reqwest::Url::parse(raw).map_err(|e| {
        let reason = match e {
            url::ParseError::RelativeUrlWithoutBase => format!(
                "{raw:?} has no scheme; write it in full, e.g. http://{}",
                raw.trim_start_matches('/')
            ),
            e => format!("{raw:?} is not a URL: {e}"),
        };
        FieldError::new(field, reason)
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(
            field,
            "credentials in the URL are not allowed; use headers",
        ));
    }
    match url.scheme() {
        "http" | "https" => {}
        "consul" => {
            if !rules.consul {
                return Err(FieldError::new(
                    field,
                    "consul:// targets need Consul: start chime with --consul-addr",
                ));
            }
            if url.port().is_some() {
                return Err(FieldError::new(
                    field,
                    "a consul:// target takes no port: the instances' ports come from Consul",
                ));
            }
            let service = url.host_str().unwrap_or_default();
            validate_consul_service(service).map_err(|e| FieldError::new(field, e))?;
            return Ok(url);
        }
        other => {
            return Err(FieldError::new(
                field,
                format!("scheme {other:?} is not supported; use http, https or consul"),
            ));
        }
    }
    match url.host() {
        None | Some(url::Host::Domain("")) => Err(FieldError::new(field, "has no host")),
        Some(url::Host::Ipv4(ip)) => check_ip(field, &rules.outbound, ip.into()).map(|_| url),
        Some(url::Host::Ipv6(ip)) => check_ip(field, &rules.outbound, ip.into()).map(|_| url),
        Some(url::Host::Domain(d)) if d.len() > MAX_HOST_LEN => Err(FieldError::new(
            field,
            format!("the host name is longer than DNS allows ({MAX_HOST_LEN} characters)"),
        )),
        Some(url::Host::Domain(_)) => Ok(url),
    }
}

/// The longest host name DNS can resolve.
const MAX_HOST_LEN: usize = 253;

fn validate_grpc(input: GrpcInput, rules: &TargetRules) -> Result<GrpcCallback, FieldError> {
    const FIELD: &str = "callback.grpc.target";
    let raw = input
        .target
        .ok_or_else(|| FieldError::new(FIELD, "is required, e.g. http://host:50051"))?;
    let url = validate_target_url(FIELD, &raw, rules)?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(
            FIELD,
            "takes no path or query: the method is always /chime.v1.CallbackService/Fire",
        ));
    }
    let timeout_ms = bounded(
        "callback.grpc.timeout_ms",
        input.timeout_ms,
        DEFAULT_TIMEOUT_MS,
        1,
        MAX_TIMEOUT_MS,
    )?;
    // Stored without the trailing slash the URL parser adds: "http://h:1", "consul://svc".
    let target = format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    );
    Ok(GrpcCallback { target, timeout_ms })
}

fn validate_http(input: HttpInput, rules: &TargetRules) -> Result<HttpCallback, FieldError> {
    let raw = input
        .url
        .ok_or_else(|| FieldError::new("callback.http.url", "is required"))?;
    let url = validate_target_url("callback.http.url", &raw, rules)?;
    let raw_method = input.method.unwrap_or_else(|| "POST".into()).to_uppercase();
    let method = HttpMethod::parse(&raw_method).ok_or_else(|| {
        FieldError::new(
            "callback.http.method",
            format!("{raw_method:?} is not one of GET, POST, PUT, PATCH, DELETE"),
        )
    })?;
    let headers = input.headers.unwrap_or_default();
    if headers.len() > MAX_HEADERS {
        return Err(FieldError::new(
            "callback.http.headers",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    for (name, value) in &headers {
        let field = format!("callback.http.headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(FieldError::new(field, "is not a valid header name"));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(FieldError::new(
                field,
                "is set by chime and cannot be overridden",
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(FieldError::new(
                field,
                "value must be visible ASCII without control characters",
            ));
        }
    }
    let timeout_ms = bounded(
        "callback.http.timeout_ms",
        input.timeout_ms,
        DEFAULT_TIMEOUT_MS,
        1,
        MAX_TIMEOUT_MS,
    )?;
    Ok(HttpCallback {
        url: url.to_string(),
        method,
        headers: headers.into_iter().collect(),
        timeout_ms,
    })
}

fn check_ip(
    field: &str,
    outbound: &OutboundPolicy,
    ip: std::net::IpAddr,
) -> Result<(), FieldError> {
    outbound.check(ip).map_err(|e| FieldError::new(field, e))
}

fn validate_retry(input: Option<RetryInput>) -> Result<RetryPolicy, FieldError> {
    let Some(input) = input else {
        return Ok(RetryPolicy::default());
    };
    let max_attempts = bounded(
        "retry.max_attempts",
        input.max_attempts,
        u64::from(DEFAULT_MAX_ATTEMPTS),
        1,
        u64::from(MAX_ATTEMPTS),
    )? as u32;
    let initial_backoff_ms = bounded(
        "retry.initial_backoff_ms",
        input.initial_backoff_ms,
        DEFAULT_INITIAL_BACKOFF_MS,
        1,
        MAX_BACKOFF_MS,
    )?;
    let max_backoff_ms = bounded(
        "retry.max_backoff_ms",
        input.max_backoff_ms,
        DEFAULT_MAX_BACKOFF_MS.max(initial_backoff_ms),
        1,
        MAX_BACKOFF_MS,
    )?;
    if max_backoff_ms < initial_backoff_ms {
        return Err(FieldError::new(
            "retry.max_backoff_ms",
            format!("must be at least initial_backoff_ms ({initial_backoff_ms})"),
        ));
    }
    let max_age_ms = bounded(
        "retry.max_age_ms",
        input.max_age_ms,
        DEFAULT_MAX_AGE_MS,
        1000,
        MAX_MAX_AGE_MS,
    )?;
    Ok(RetryPolicy {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
        max_age_ms,
    })
}

fn bounded(
    field: &str,
    value: Option<i64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, FieldError> {
    match value {
        None => Ok(default),
        Some(v) if v >= min as i64 && v <= max as i64 => Ok(v as u64),
        Some(v) => Err(FieldError::new(
            field,
            format!("{v} is out of range {min}-{max}"),
        )),
    }
}

/// Makes an id for `POST /v1/jobs` without one: time-ordered, so lists read naturally.
pub fn generate_id() -> String {
    let now = chrono::Utc::now().timestamp_millis();
    format!("job-{now:x}-{:08x}", rand::random::<u32>())
}

/// A job's definition as the scheduler and delivery hold it in memory.
#[derive(Debug)]
pub struct Job {
    pub id: Arc<str>,
    pub slot: u32,
    pub schedule: Schedule,
    pub target: Arc<Target>,
    pub paused: bool,
    /// When the current definition became active (create, replace, resume): `@every`
    /// counts from here, and no fire at or before it is ever made up.
    pub active_since: i64,
}

impl Job {
    /// Rebuilds a job from its stored columns; Err names what is wrong with the row.
    pub fn from_stored(
        id: &str,
        slot: u32,
        spec_json: &str,
        paused: bool,
        active_since: i64,
    ) -> Result<Job, String> {
        let spec: StoredSpec =
            serde_json::from_str(spec_json).map_err(|e| format!("spec is not valid: {e}"))?;
        let tz = parse_timezone(&spec.timezone).map_err(|e| e.to_string())?;
        let schedule = Schedule::parse(&spec.schedule, tz).map_err(|e| e.to_string())?;
        Ok(Job::new(
            id,
            slot,
            schedule,
            spec.target(),
            paused,
            active_since,
        ))
    }

    pub fn new(
        id: &str,
        slot: u32,
        schedule: Schedule,
        target: Target,
        paused: bool,
        active_since: i64,
    ) -> Job {
        Job {
            id: id.into(),
            slot,
            schedule,
            target: Arc::new(target),
            paused,
            active_since,
        }
    }

    /// The first fire time of this definition at or after `now` (None: paused or finished).
    pub fn first_due(&self, now: i64) -> Option<i64> {
        if self.paused {
            return None;
        }
        self.schedule
            .next_after(now.max(self.active_since), self.active_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> JobInput {
        serde_json::from_str(json).unwrap()
    }

    const NOW: i64 = 1_790_000_000_000;

    #[test]
    fn slot_is_stable_and_in_range() {
        // Golden values: a change here moves every stored job to another slot.
        assert_eq!(slot_of("scale-web-up"), slot_of("scale-web-up"));
        assert!(slot_of("x") < SLOTS);
        let golden: Vec<u32> = ["a", "job-1", "scale-web-up"]
            .iter()
            .map(|s| slot_of(s))
            .collect();
        assert_eq!(golden, GOLDEN_SLOTS);
    }
    const GOLDEN_SLOTS: [u32; 3] = [GOLDEN_A, GOLDEN_JOB1, GOLDEN_SCALE];
    const GOLDEN_A: u32 = 585;
    const GOLDEN_JOB1: u32 = 1444;
    const GOLDEN_SCALE: u32 = 4009;

    #[test]
    fn minimal_job_gets_defaults() {
        let j = input(r#"{"schedule":"*/5 * * * *","callback":{"http":{"url":"http://h:1/x"}}}"#)
            .validate(Some("a"), || unreachable!(), NOW, &TargetRules::default())
            .unwrap();
        let Callback::Http(h) = &j.spec.callback else {
            panic!("an http callback")
        };
        assert_eq!(h.method, HttpMethod::Post);
        assert_eq!(h.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(j.spec.retry, RetryPolicy::default());
        assert_eq!(j.spec.timezone, "UTC");
        assert_eq!(j.spec.payload.get(), "null");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#"{"callback":{"http":{"url":"http://h/"}}}"#, "schedule"),
            (
                r#"{"schedule":"bogus","callback":{"http":{"url":"http://h/"}}}"#,
                "schedule",
            ),
            (
                r#"{"schedule":"@hourly","timezone":"Mars/Base","callback":{"http":{"url":"http://h/"}}}"#,
                "timezone",
            ),
            (r#"{"schedule":"@hourly"}"#, "callback"),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/"},"grpc":{"target":"http://h"}}}"#,
                "callback",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/","timeout_ms":-1}}}"#,
                "callback.http.timeout_ms",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"ftp://h/"}}}"#,
                "callback.http.url",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/","method":"BREW"}}}"#,
                "callback.http.method",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/","headers":{"Idempotency-Key":"x"}}}}"#,
                "callback.http.headers.Idempotency-Key",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/"}},"retry":{"max_attempts":0}}"#,
                "retry.max_attempts",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/"}},"retry":{"initial_backoff_ms":5000,"max_backoff_ms":10}}"#,
                "retry.max_backoff_ms",
            ),
            (
                r#"{"schedule":"@at 2001-01-01T00:00:00Z","callback":{"http":{"url":"http://h/"}}}"#,
                "schedule",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://h/"}},"secret":""}"#,
                "secret",
            ),
            (
                r#"{"id":"other","schedule":"@hourly","callback":{"http":{"url":"http://h/"}}}"#,
                "id",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://169.254.169.254/latest/meta-data"}}}"#,
                "callback.http.url",
            ),
            (
                r#"{"schedule":"@hourly","callback":{"http":{"url":"http://[fd00:ec2::254]/"}}}"#,
                "callback.http.url",
            ),
        ];
        for (body, field) in cases {
            let err = input(body)
                .validate(Some("a"), || unreachable!(), NOW, &TargetRules::default())
                .unwrap_err();
            assert_eq!(err.field, field, "{body} -> {err}");
        }
    }

    #[test]
    fn grpc_and_consul_targets() {
        let with_consul = TargetRules {
            consul: true,
            ..TargetRules::default()
        };
        let ok = |json: &str, rules: &TargetRules| {
            input(json)
                .validate(Some("a"), || unreachable!(), NOW, rules)
                .map(|j| j.spec.callback)
        };
        let Ok(Callback::Grpc(g)) = ok(
            r#"{"schedule":"@hourly","callback":{"grpc":{"target":"http://h:50051/","timeout_ms":500}}}"#,
            &TargetRules::default(),
        ) else {
            panic!("a grpc callback")
        };
        assert_eq!((g.target.as_str(), g.timeout_ms), ("http://h:50051", 500));
        let Ok(Callback::Grpc(g)) = ok(
            r#"{"schedule":"@hourly","callback":{"grpc":{"target":"consul://billing"}}}"#,
            &with_consul,
        ) else {
            panic!("a grpc callback")
        };
        assert_eq!(g.target, "consul://billing");
        let Ok(Callback::Http(h)) = ok(
            r#"{"schedule":"@hourly","callback":{"http":{"url":"consul://web-api/hooks/scale?x=1"}}}"#,
            &with_consul,
        ) else {
            panic!("an http callback")
        };
        assert_eq!(h.url, "consul://web-api/hooks/scale?x=1");

        let cases = [
            (r#"{"grpc":{}}"#, "callback.grpc.target", &with_consul),
            (
                r#"{"grpc":{"target":"http://h:1/chime.v1.CallbackService/Fire"}}"#,
                "callback.grpc.target",
                &with_consul,
            ),
            (
                r#"{"grpc":{"target":"h:1"}}"#,
                "callback.grpc.target",
                &with_consul,
            ),
            (
                r#"{"grpc":{"target":"http://169.254.169.254:80"}}"#,
                "callback.grpc.target",
                &with_consul,
            ),
            (
                r#"{"grpc":{"target":"http://h:1","timeout_ms":0}}"#,
                "callback.grpc.timeout_ms",
                &with_consul,
            ),
            (
                r#"{"http":{"url":"consul://web/x"}}"#,
                "callback.http.url",
                &TargetRules::default(),
            ),
            (
                r#"{"http":{"url":"consul://we b/x"}}"#,
                "callback.http.url",
                &with_consul,
            ),
            (
                r#"{"http":{"url":"consul://web:80/x"}}"#,
                "callback.http.url",
                &with_consul,
            ),
            (
                r#"{"http":{"url":"consul:///x"}}"#,
                "callback.http.url",
                &with_consul,
            ),
            (
                r#"{"http":{"url":"http://u:p@h/x"}}"#,
                "callback.http.url",
                &with_consul,
            ),
        ];
        for (cb, field, rules) in cases {
            let body = format!(r#"{{"schedule":"@hourly","callback":{cb}}}"#);
            let err = ok(&body, rules).unwrap_err();
            assert_eq!(err.field, field, "{body} -> {err}");
        }
        let err = ok(
            r#"{"schedule":"@hourly","callback":{"http":{"url":"consul://web/x"}}}"#,
            &TargetRules::default(),
        )
        .unwrap_err();
        assert!(err.reason.contains("--consul-addr"), "{err}");
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("id", "scale-web_up.v2:eu").is_ok());
        assert!(validate_id("id", "").is_err());
        assert!(validate_id("id", "has space").is_err());
        assert!(validate_id("id", "slash/no").is_err());
        assert!(validate_id("id", &"x".repeat(129)).is_err());
        assert!(validate_id("id", &generate_id()).is_ok());
    }
}
