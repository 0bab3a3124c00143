//! Node configuration: command-line flags, `CHIME_*` environment variables and an optional
//! TOML file, resolved once (flags > env > file > defaults) into an immutable, typed [`Config`].
//!
//! clap reads flags and env together (a flag wins over its env var); every clap field is an
//! `Option` so that "not given" can fall through to the file and then to the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::delivery::OutboundPolicy;

/// Everything `chime serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub http_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    pub advertise_addr: Option<String>,
    pub seeds: Vec<String>,
    pub cluster_id: String,
    pub database_url: String,
    pub consul_addr: Option<String>,
    pub api_token: Option<String>,
    /// Missed fires newer than this are all dispatched after downtime; older ones collapse
    /// into one fire plus `missed` records (see the contract's "Missed fires").
    pub catchup_window: Duration,
    /// Fires due within this horizon are recorded ahead of their time; database latency
    /// delays a fire only when it exceeds this.
    pub record_ahead: Duration,
    /// Newest executions kept per job; older finished ones are pruned.
    pub history_keep: u32,
    /// Finished executions older than this are pruned.
    pub history_max_age: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, and then its body.
    pub request_read_timeout: Duration,
    /// Callbacks in flight at once on this node.
    pub delivery_concurrency: usize,
    /// Callbacks in flight at once to one target (scheme and host:port, or Consul service),
    /// so one slow downstream cannot take every slot.
    pub delivery_per_target_concurrency: usize,
    /// How long SIGTERM waits for in-flight callbacks before leaving them to the retry queue.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Which addresses callbacks may reach (link-local and metadata refused by default).
    pub outbound: OutboundPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_GOSSIP_ADDR: &str = "127.0.0.1:7946";
pub const DEFAULT_CLUSTER_ID: &str = "chime";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://chime.db";
pub const DEFAULT_CATCHUP_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_RECORD_AHEAD: Duration = Duration::from_secs(2);
/// The record-ahead horizon must leave the database time (at least this) and stay well
/// inside the lease TTL (at most this), or a handover would find most fires recorded.
pub const RECORD_AHEAD_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));
pub const DEFAULT_HISTORY_KEEP: u32 = 100;
pub const DEFAULT_HISTORY_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_DELIVERY_CONCURRENCY: usize = 4096;
pub const DEFAULT_DELIVERY_PER_TARGET_CONCURRENCY: usize = 256;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Flags of `chime serve`; each one is also read from `CHIME_<NAME>`.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names with `_` (e.g. `http_addr`)
    #[arg(long, env = "CHIME_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unique, stable name of this node [default: hostname]
    #[arg(long, env = "CHIME_NODE_ID")]
    pub node_id: Option<String>,
    /// REST API, /metrics and health listen address [default: 127.0.0.1:8080]
    #[arg(long, env = "CHIME_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Gossip (UDP) listen address [default: 127.0.0.1:7946]
    #[arg(long, env = "CHIME_GOSSIP_ADDR")]
    pub gossip_addr: Option<String>,
    /// Host other nodes use to reach this one [default: the listen host]
    #[arg(long, env = "CHIME_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Comma-separated gossip seeds, host:port
    #[arg(long, env = "CHIME_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Nodes only join peers with the same id [default: chime]
    #[arg(long, env = "CHIME_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// sqlite://FILE (embedded, single node) or mysql://user:pass@host:3306/db [default: sqlite://chime.db]
    #[arg(long, env = "CHIME_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Consul HTTP address, enables consul:// callback targets
    #[arg(long, env = "CHIME_CONSUL_ADDR")]
    pub consul_addr: Option<String>,
    /// When set, every /v1 request must carry `Authorization: Bearer <token>`
    #[arg(long, env = "CHIME_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Missed fires within this window are all made up after downtime, e.g. 60s [default: 60s]
    #[arg(long, env = "CHIME_CATCHUP_WINDOW")]
    pub catchup_window: Option<String>,
    /// Record fires this long before their time, from 100ms to 5s [default: 2s]
    #[arg(long, env = "CHIME_RECORD_AHEAD")]
    pub record_ahead: Option<String>,
    /// Executions kept per job [default: 100]
    #[arg(long, env = "CHIME_HISTORY_KEEP")]
    pub history_keep: Option<u32>,
    /// Finished executions older than this are deleted, e.g. 7d [default: 7d]
    #[arg(long, env = "CHIME_HISTORY_MAX_AGE")]
    pub history_max_age: Option<String>,
    /// Largest accepted request body in bytes [default: 1048576]
    #[arg(long, env = "CHIME_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Time a client may take to send a request's headers, and then its body [default: 10s]
    #[arg(long, env = "CHIME_REQUEST_READ_TIMEOUT")]
    pub request_read_timeout: Option<String>,
    /// Callbacks in flight at once [default: 4096]
    #[arg(long, env = "CHIME_DELIVERY_CONCURRENCY")]
    pub delivery_concurrency: Option<usize>,
    /// Callbacks in flight at once to one target host or Consul service [default: 256]
    #[arg(long, env = "CHIME_DELIVERY_PER_TARGET_CONCURRENCY")]
    pub delivery_per_target_concurrency: Option<usize>,
    /// Time SIGTERM waits for in-flight callbacks, e.g. 10s [default: 10s]
    #[arg(long, env = "CHIME_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Log format [default: text]
    #[arg(long, env = "CHIME_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Networks callbacks may reach even if refused by default, e.g. 169.254.10.0/24
    #[arg(long, env = "CHIME_OUTBOUND_ALLOW", value_delimiter = ',')]
    pub outbound_allow: Option<Vec<String>>,
    /// More networks callbacks may not reach, e.g. 10.0.0.0/8 (link-local and cloud
    /// metadata addresses are always refused unless allowed)
    #[arg(long, env = "CHIME_OUTBOUND_DENY", value_delimiter = ',')]
    pub outbound_deny: Option<Vec<String>>,
}

/// The TOML file: same keys as the flags, unknown keys rejected so typos are caught.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    http_addr: Option<String>,
    gossip_addr: Option<String>,
    advertise_addr: Option<String>,
    seeds: Option<Vec<String>>,
    cluster_id: Option<String>,
    database_url: Option<String>,
    consul_addr: Option<String>,
    api_token: Option<String>,
    catchup_window: Option<String>,
    record_ahead: Option<String>,
    history_keep: Option<u32>,
    history_max_age: Option<String>,
    max_body_bytes: Option<usize>,
    request_read_timeout: Option<String>,
    delivery_concurrency: Option<usize>,
    delivery_per_target_concurrency: Option<usize>,
    shutdown_grace: Option<String>,
    log_format: Option<LogFormat>,
    outbound_allow: Option<Vec<String>>,
    outbound_deny: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl ServeArgs {
    /// Resolves flags/env over the file over defaults, then validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let node_id = self
            .node_id
            .or(file.node_id)
            .unwrap_or_else(default_node_id);
        validate_node_id(&node_id)?;
        let http_addr = parse_addr(
            "http_addr",
            &self
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into()),
        )?;
        let gossip_addr = parse_addr(
            "gossip_addr",
            &self
                .gossip_addr
                .or(file.gossip_addr)
                .unwrap_or_else(|| DEFAULT_GOSSIP_ADDR.into()),
        )?;
        let seeds: Vec<String> = self
            .seeds
            .or(file.seeds)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let database_url = self
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        check_database_url(&database_url).map_err(|m| invalid("database_url", m))?;
        let api_token = self.api_token.or(file.api_token).filter(|t| !t.is_empty());
        let record_ahead = duration_or(
            "record_ahead",
            self.record_ahead.or(file.record_ahead),
            DEFAULT_RECORD_AHEAD,
        )?;
        let request_read_timeout = duration_or(
            "request_read_timeout",
            self.request_read_timeout.or(file.request_read_timeout),
            DEFAULT_REQUEST_READ_TIMEOUT,
        )?;
        if request_read_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "request_read_timeout",
                format!("{request_read_timeout:?} is too short; give at least 100ms"),
            ));
        }
        let (lo, hi) = RECORD_AHEAD_RANGE;
        if !(lo..=hi).contains(&record_ahead) {
            return Err(invalid(
                "record_ahead",
                format!("{record_ahead:?} is outside {lo:?}..={hi:?}"),
            ));
        }
        let history_keep = self
            .history_keep
            .or(file.history_keep)
            .unwrap_or(DEFAULT_HISTORY_KEEP);
        if history_keep == 0 {
            return Err(invalid(
                "history_keep",
                "must be at least 1 (the newest execution is needed to make up missed fires)",
            ));
        }
        let max_body_bytes = self
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=64 * 1024 * 1024).contains(&max_body_bytes) {
            return Err(invalid(
                "max_body_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        let delivery_concurrency = self
            .delivery_concurrency
            .or(file.delivery_concurrency)
            .unwrap_or(DEFAULT_DELIVERY_CONCURRENCY);
        if delivery_concurrency == 0 {
            return Err(invalid("delivery_concurrency", "must be at least 1"));
        }
        let delivery_per_target_concurrency = self
            .delivery_per_target_concurrency
            .or(file.delivery_per_target_concurrency)
            .unwrap_or(DEFAULT_DELIVERY_PER_TARGET_CONCURRENCY);
        if delivery_per_target_concurrency == 0 {
            return Err(invalid(
                "delivery_per_target_concurrency",
                "must be at least 1",
            ));
        }
        let consul_addr = match self.consul_addr.or(file.consul_addr) {
            None => None,
            Some(raw) => Some(consul_address(&raw).map_err(|m| invalid("consul_addr", m))?),
        };
        let outbound = OutboundPolicy::new(
            &self
                .outbound_allow
                .or(file.outbound_allow)
                .unwrap_or_default(),
            &self
                .outbound_deny
                .or(file.outbound_deny)
                .unwrap_or_default(),
        )
        .map_err(|m| invalid("outbound_allow/outbound_deny", m))?;
        Ok(Config {
            node_id,
            http_addr,
            gossip_addr,
            advertise_addr: self.advertise_addr.or(file.advertise_addr),
            seeds,
            cluster_id: self
                .cluster_id
                .or(file.cluster_id)
                .unwrap_or_else(|| DEFAULT_CLUSTER_ID.into()),
            database_url,
            consul_addr,
            api_token,
            catchup_window: duration_or(
                "catchup_window",
                self.catchup_window.or(file.catchup_window),
                DEFAULT_CATCHUP_WINDOW,
            )?,
            record_ahead,
            history_keep,
            history_max_age: duration_or(
                "history_max_age",
                self.history_max_age.or(file.history_max_age),
                DEFAULT_HISTORY_MAX_AGE,
            )?,
            max_body_bytes,
            request_read_timeout,
            delivery_concurrency,
            delivery_per_target_concurrency,
            shutdown_grace: duration_or(
                "shutdown_grace",
                self.shutdown_grace.or(file.shutdown_grace),
                DEFAULT_SHUTDOWN_GRACE,
            )?,
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            outbound,
        })
    }
}

/// `http://host:port` or `https://host:port` of a Consul agent, without a trailing slash.
fn consul_address(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw)
        .map_err(|e| format!("{raw:?} is not a URL ({e}); use e.g. http://127.0.0.1:8500"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "{raw:?} must be an http:// or https:// address, e.g. http://127.0.0.1:8500"
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!("{raw:?} must not have a path or query"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "chime".into())
}

fn validate_node_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "node_id",
            format!("{id:?} must be 1-128 characters of A-Z a-z 0-9 . _ : -"),
        ))
    }
}

/// `ip:port`, `host:port` (resolved now; `localhost` is 127.0.0.1) or `:port` (every
/// interface).
fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    let v = value.trim();
    let bad = || {
        invalid(
            key,
            format!(
                "{value:?} is not an address to listen on; write ip:port, host:port or :port \
                 (every interface), e.g. 127.0.0.1:8080"
            ),
        )
    };
    if let Ok(addr) = v.parse() {
        return Ok(addr);
    }
    if let Some(port) = v.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    use std::net::ToSocketAddrs;
    let mut addrs = (host, port).to_socket_addrs().map_err(|e| {
        invalid(
            key,
            format!("cannot resolve {host:?} in {value:?}: {e}; give an ip:port"),
        )
    })?;
    addrs.find(SocketAddr::is_ipv4).ok_or_else(bad)
}

/// The candidate nearest `given`, if near enough to be a typo of it (case-insensitive).
pub fn closest_name<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let given = given.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&given, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What `chime` can tell about a database URL before connecting, with what to do about it.
pub fn check_database_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path.contains(":memory:") {
            return Ok(());
        }
        let parent = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(format!(
                "the directory {} of {path:?} does not exist; create it, or point \
                 --database-url at a file in an existing directory",
                parent.display()
            ));
        }
        return Ok(());
    }
    if url.starts_with("mysql:") {
        let parsed = url::Url::parse(url).map_err(|e| {
            format!(
                "{:?} is not a URL ({e}); use mysql://user:pass@host:3306/chime",
                redact_url(url)
            )
        })?;
        if parsed.path().trim_matches('/').is_empty() {
            return Err(format!(
                "{:?} names no database; add one, e.g. mysql://user:pass@host:3306/chime \
                 (create it first: CREATE DATABASE chime)",
                redact_url(url)
            ));
        }
        return Ok(());
    }
    Err(format!(
        "unsupported scheme in {:?}; use sqlite://FILE or mysql://user:pass@host:3306/db",
        redact_url(url)
    ))
}

fn duration_or(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration(&v).map_err(|m| invalid(key, m)),
    }
}

/// Parses `90s`, `1h30m`, `500ms`, `7d`: a sequence of integers with units d, h, m, s, ms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let bad = || format!("{text:?} is not a duration such as 500ms, 30s, 1h30m or 7d");
    if s.is_empty() {
        return Err(bad());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{text:?} is too long"))?;
    }
    Ok(Duration::from_millis(total))
}

/// Hides the password of a database URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_the_forms_people_write() {
        let a = |v: &str| parse_addr("http_addr", v).map(|a| a.to_string());
        assert_eq!(a("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(a("localhost:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(a(":8080").unwrap(), "0.0.0.0:8080");
        assert_eq!(a("[::1]:8080").unwrap(), "[::1]:8080");
        for bad in ["nope", ":x", "localhost", "1.2.3.4:99999"] {
            let e = a(bad).unwrap_err().to_string();
            assert!(e.contains("host:port or :port"), "{bad}: {e}");
        }
    }

    #[test]
    fn typos_find_their_name() {
        let known = ["CHIME_HTTP_ADDR", "CHIME_GOSSIP_ADDR", "CHIME_LOG"];
        assert_eq!(
            closest_name("CHIME_HTTP_ADRR", known),
            Some("CHIME_HTTP_ADDR")
        );
        assert_eq!(closest_name("CHIME_WHATEVER", known), None);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "s", "10", "10x", "-5s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn precedence_flags_over_file_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chime.toml");
        std::fs::write(
            &path,
            "node_id = \"from-file\"\nhttp_addr = \"127.0.0.1:9999\"\nhistory_keep = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            node_id: Some("from-flag".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.http_addr, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.history_keep, 7);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.catchup_window, DEFAULT_CATCHUP_WINDOW);
    }

    #[test]
    fn misspelled_file_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chime.toml");
        std::fs::write(&path, "htp_addr = \"127.0.0.1:1\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `htp_addr`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = ServeArgs {
            http_addr: Some("nope".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("http_addr:"), "{err}");
        let err = ServeArgs {
            database_url: Some("postgres://x".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("database_url:"), "{err}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("mysql://chime:secret@127.0.0.1:3306/chime"),
            "mysql://chime:***@127.0.0.1:3306/chime"
        );
        assert_eq!(redact_url("sqlite://chime.db"), "sqlite://chime.db");
    }
}
