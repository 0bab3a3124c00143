//! Harness for chime's black-box tests: the real `chime` binary on loopback ports, a
//! callback receiver inside the test, a fresh database per test, and predicate waits.
//!
//! - [`Db`]: a fresh SQLite file in a tempdir or a fresh MySQL database on the server named
//!   by `CHIME_TEST_MYSQL_URL`. A MySQL server that cannot be reached fails the test.
//! - [`Chime`]: one `chime serve` process; start, wait for ready, call the API (retrying a
//!   503 with `Retry-After` as the contract asks clients to), SIGKILL or SIGTERM it. Every
//!   reply is checked for `X-Chime-Node`.
//! - [`Receiver`]: an axum server that records every callback and answers with a scripted
//!   status sequence ([`Script`]).
//! - [`wait_until`], [`wait_for`], [`holds_for`]: every wait is a predicate with a deadline.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sqlx::Connection;

pub mod consul;
pub mod grpc;

/// How long a node may take from spawn to `/readyz` = 200 (MySQL migrations on a busy
/// two-core machine are the slow part).
pub const READY_TIMEOUT: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(20);
/// How long [`Chime::send`] retries a 503 that carries `Retry-After`.
pub const UNAVAILABLE_RETRY_FOR: Duration = Duration::from_secs(15);
const DEFAULT_MYSQL_URL: &str = "mysql://chime:chime@127.0.0.1:3306";
/// Lines of a node's log printed when a test fails.
const LOG_TAIL: usize = 80;

/// Runs each listed `async fn name(backend: Backend)` as `sqlite::name` and `mysql::name`.
#[allow(unused_macros)] // each test crate uses its own part of this module
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await;
                }
            )+
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::common::Backend::Mysql).await;
                }
            )+
        }
    };
}
#[allow(unused_imports)]
pub(crate) use backend_tests;

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// `2026-11-21T08:05:00.000Z`, as the contract prints times.
pub fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .expect("time in range")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC3339 time to unix ms; panics naming the bad value.
pub fn parse_ms(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?} is not an RFC3339 time: {e}"))
        .timestamp_millis()
}

/// A name no other test (or earlier run) uses: `<prefix>-<pid>-<n>-<random>`.
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{:06x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Runs the `chime` binary to completion with `args` (and no `CHIME_DATABASE_URL` from the
/// test's environment): whether it succeeded, its stdout and its stderr.
pub fn run_chime(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chime"))
        .args(args)
        .env_remove("CHIME_DATABASE_URL")
        .output()
        .expect("run chime");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal valid job body with an HTTP callback.
pub fn http_job(schedule: &str, url: &str) -> Value {
    json!({"schedule": schedule, "callback": {"http": {"url": url}}})
}

// ---------------------------------------------------------------------------------------
// Waiting

/// Polls `pred` until it is true (→ true) or `timeout` has passed (→ false).
pub async fn wait_until(timeout: Duration, mut pred: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pred().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` until it returns `Some` (→ that value) or `timeout` has passed (→ None).
pub async fn wait_for<T>(timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks `pred` repeatedly for `duration`: false as soon as it fails once. Used to observe
/// that something does *not* happen, which only a period of observation can show.
pub async fn holds_for(duration: Duration, mut pred: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if !pred().await {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// Databases

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Mysql,
}

/// A database no other test uses. MySQL databases are dropped when the test passes and kept
/// (name printed) when it fails; `.ci/run` drops leftovers.
pub struct Db {
    pub backend: Backend,
    url: String,
    _dir: Option<tempfile::TempDir>,
    mysql: Option<MysqlDb>,
}

struct MysqlDb {
    server_url: String,
    name: String,
}

impl Db {
    pub async fn fresh(backend: Backend) -> Db {
        match backend {
            Backend::Sqlite => fresh_sqlite(),
            Backend::Mysql => fresh_mysql().await,
        }
    }

    /// The `--database-url` to give chime.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The same database reached through another URL (e.g. a proxy). The view owns
    /// nothing: dropping it drops no database.
    pub fn with_url(&self, url: &str) -> Db {
        Db {
            backend: self.backend,
            url: url.to_string(),
            _dir: None,
            mysql: None,
        }
    }
}

/// `sqlite:///abs/tempdir/chime.db`; the file is created by chime.
pub fn fresh_sqlite() -> Db {
    let dir = tempfile::tempdir().expect("create a tempdir");
    let path = dir.path().join("chime.db");
    Db {
        backend: Backend::Sqlite,
        url: format!("sqlite://{}", path.display()),
        _dir: Some(dir),
        mysql: None,
    }
}

/// The MySQL server URL without a database: `CHIME_TEST_MYSQL_URL` or the local default.
pub fn mysql_server_url() -> String {
    std::env::var("CHIME_TEST_MYSQL_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_MYSQL_URL.to_string())
        .trim()
        .trim_end_matches('/')
        .to_string()
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

async fn mysql_connect(server_url: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let connect = sqlx::AnyConnection::connect(server_url);
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "MySQL test server at {} is not usable: {e}. Start it (.ci/run does) or point \
             CHIME_TEST_MYSQL_URL at one; MySQL tests are never skipped",
            redact(server_url)
        ),
        Err(_) => panic!(
            "MySQL test server at {} did not answer within 15s. Start it (.ci/run does) or \
             point CHIME_TEST_MYSQL_URL at one; MySQL tests are never skipped",
            redact(server_url)
        ),
    }
}

/// Creates `chime_e2e_<unique>` on the test server.
pub async fn fresh_mysql() -> Db {
    let server_url = mysql_server_url();
    let name = unique_id("chime_e2e").replace('-', "_");
    let mut conn = mysql_connect(&server_url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let _ = conn.close().await;
    Db {
        backend: Backend::Mysql,
        url: format!("{server_url}/{name}"),
        _dir: None,
        mysql: Some(MysqlDb { server_url, name }),
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Some(m) = self.mysql.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!(
                "test failed: keeping MySQL database {} for inspection",
                m.name
            );
            return;
        }
        // Drop runs inside the test's runtime; a fresh thread may block on its own one.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                let work = async {
                    let mut conn = mysql_connect(&m.server_url).await;
                    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS `{}`",
                        m.name
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                    dropped
                };
                match tokio::time::timeout(Duration::from_secs(20), work).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("cannot drop database {}: {e}", m.name),
                    Err(_) => eprintln!("dropping database {} timed out", m.name),
                }
            });
        });
        let _ = dropper.join();
    }
}

// ---------------------------------------------------------------------------------------
// The chime process

/// One `chime serve` process. Dropping it kills the process.
pub struct Chime {
    child: Option<Child>,
    pub node_id: String,
    /// `127.0.0.1:PORT`, as the node logged it.
    pub addr: String,
    /// The `--gossip-addr` given to the node, `127.0.0.1:PORT` (a seed for other nodes).
    pub gossip: String,
    base: String,
    token: Option<String>,
    logs: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
    _cwd: tempfile::TempDir,
}

/// A free loopback UDP port for `--gossip-addr`, so parallel nodes never share one.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a udp port")
        .port()
}

impl Chime {
    /// Spawns `chime serve` on `db` with `extra` flags and waits until `/readyz` is 200.
    /// A `--api-token T` in `extra` is sent with every request made through this handle.
    pub async fn start(db: &Db, node_id: &str, extra: &[&str]) -> Chime {
        Chime::start_with_env(db, node_id, extra, &[]).await
    }

    /// [`Chime::start`], with the process environment changed by `envs`, applied last (after
    /// the `CHIME_*` variables are cleared and `CHIME_LOG` is set): `(name, Some(value))` sets
    /// a variable, `(name, None)` removes one the test's own environment would pass on (e.g.
    /// `SSL_CERT_FILE`).
    pub async fn start_with_env(
        db: &Db,
        node_id: &str,
        extra: &[&str],
        envs: &[(&str, Option<&str>)],
    ) -> Chime {
        let cwd = tempfile::tempdir().expect("create a tempdir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chime"));
        // Settings must come from the flags below only, never from the test's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHIME_") {
                cmd.env_remove(&key);
            }
        }
        let gossip = format!("127.0.0.1:{}", free_udp_port());
        cmd.current_dir(cwd.path())
            .env("CHIME_LOG", "info")
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--gossip-addr",
                &gossip,
            ])
            .args(["--node-id", node_id, "--database-url", db.url()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let mut child = cmd.spawn().expect("spawn the chime binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("chime listening on http://").nth(1) {
                        let addr: String =
                            rest.chars().take_while(|c| !c.is_whitespace()).collect();
                        if let Some(tx) = addr_tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let token = extra
            .iter()
            .position(|a| *a == "--api-token")
            .and_then(|i| extra.get(i + 1))
            .map(|t| t.to_string());
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("an http client");
        let mut node = Chime {
            child: Some(child),
            node_id: node_id.to_string(),
            addr: String::new(),
            gossip,
            base: String::new(),
            token,
            logs,
            client,
            _cwd: cwd,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(addr) = addr_rx.try_recv() {
                node.addr = addr;
                break;
            }
            node.fail_if_exited("before it logged its listen address");
            if Instant::now() >= deadline {
                panic!(
                    "chime did not log `chime listening on` within {READY_TIMEOUT:?}\n{}",
                    node.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        node.base = format!("http://{}", node.addr);
        loop {
            let ready = node
                .client
                .get(node.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ready {
                break;
            }
            node.fail_if_exited("before it was ready");
            if Instant::now() >= deadline {
                panic!(
                    "chime was not ready within {READY_TIMEOUT:?}\n{}",
                    node.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        node
    }

    fn fail_if_exited(&mut self, when: &str) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            // Let the reader thread catch the last lines.
            std::thread::sleep(Duration::from_millis(100));
            panic!("chime exited {when}: {status}\n{}", self.log_tail());
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    /// The node's log so far (stderr lines).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn log_tail(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let start = logs.len().saturating_sub(LOG_TAIL);
        let mut out = format!("--- last lines of node {} ---\n", self.node_id);
        for l in &logs[start..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// SIGKILL, and reap the process: nothing of it runs after this returns.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the node is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `kill -TERM <pid>`, then waits (up to 30 s) for the exit: its status and how long the
    /// node took to exit.
    pub async fn sigterm(&mut self) -> (ExitStatus, Duration) {
        let pid = self.pid();
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let deadline = started + Duration::from_secs(30);
        loop {
            let child = self.child.as_mut().expect("the node is running");
            if let Some(status) = child.try_wait().expect("wait for chime") {
                self.child = None;
                return (status, started.elapsed());
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.kill9();
                panic!("chime did not exit within 30s of SIGTERM\n{tail}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A request builder for `path`, with the bearer token if the node has one.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends `rb` (built on this node's client) as a client following the contract does: a
    /// 503 with `Retry-After` (node not ready, owner unreachable) is retried for up to
    /// [`UNAVAILABLE_RETRY_FOR`]; the last reply is returned. See [`Chime::send_once`].
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Reply {
        let deadline = Instant::now() + UNAVAILABLE_RETRY_FOR;
        let mut rb = rb;
        loop {
            let again = rb.try_clone();
            let reply = self.send_once(rb).await;
            match again {
                Some(next)
                    if reply.status == 503
                        && reply.header("retry-after").is_some()
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    rb = next;
                }
                _ => return reply,
            }
        }
    }

    /// Sends `rb` once and checks that the reply carries `X-Chime-Node`, as every response
    /// must (which node: the one that handled it, so the owner when forwarded).
    pub async fn send_once(&self, rb: reqwest::RequestBuilder) -> Reply {
        let req = rb.build().expect("a valid request");
        let what = format!("{} {}", req.method(), req.url().path());
        let resp = self
            .client
            .execute(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: no response from node {}: {e}", self.node_id));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: cannot read the body: {e}"));
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        let reply = Reply {
            what,
            status,
            headers,
            text,
            json,
        };
        assert!(
            reply.header("x-chime-node").is_some_and(|n| !n.is_empty()),
            "every response carries X-Chime-Node: {reply}"
        );
        reply
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.request(Method::DELETE, path)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(self.request(Method::PUT, path).json(body)).await
    }

    /// POST with a JSON body, or with none.
    pub async fn post(&self, path: &str, body: Option<&Value>) -> Reply {
        let rb = self.request(Method::POST, path);
        let rb = match body {
            Some(b) => rb.json(b),
            None => rb,
        };
        self.send(rb).await
    }

    /// A request whose body is sent verbatim as JSON (malformed or oversized bodies).
    pub async fn send_raw(&self, method: Method, path: &str, body: impl Into<String>) -> Reply {
        let rb = self
            .request(method, path)
            .header("content-type", "application/json")
            .body(body.into());
        self.send(rb).await
    }

    /// `GET /v1/jobs/{id}/executions?limit=100` (newest first); panics unless 200.
    pub async fn executions(&self, job_id: &str) -> Vec<Value> {
        let r = self
            .get(&format!("/v1/jobs/{job_id}/executions?limit=100"))
            .await;
        assert_eq!(r.status, 200, "{r}");
        r.json["executions"]
            .as_array()
            .unwrap_or_else(|| panic!("executions is not a list: {r}"))
            .clone()
    }

    /// The execution of `job_id` scheduled at `scheduled_ms`, if listed.
    pub async fn execution(&self, job_id: &str, scheduled_ms: i64) -> Option<Value> {
        self.executions(job_id)
            .await
            .into_iter()
            .find(|e| e["scheduled_at"].as_str().map(parse_ms) == Some(scheduled_ms))
    }

    /// Job ids in `GET /v1/jobs`, in order.
    pub async fn job_ids(&self) -> Vec<String> {
        let r = self.get("/v1/jobs?limit=1000").await;
        assert_eq!(r.status, 200, "{r}");
        r.json["jobs"]
            .as_array()
            .unwrap_or_else(|| panic!("jobs is not a list: {r}"))
            .iter()
            .map(|j| j["id"].as_str().expect("job id").to_string())
            .collect()
    }
}

impl Drop for Chime {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// A response from chime, read in full.
pub struct Reply {
    /// `METHOD /path`, for messages.
    pub what: String,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// The body as JSON; `Null` when empty or not JSON.
    pub json: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the contract's error shape: `status` and `{"error": {"code", "message"}}`
    /// with non-empty strings; returns the message.
    pub fn assert_error(&self, status: u16) -> &str {
        assert_eq!(self.status, status, "{self}");
        let code = self.json["error"]["code"].as_str().unwrap_or_default();
        let message = self.json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && !message.is_empty(),
            "error body must be {{\"error\": {{\"code\", \"message\"}}}}: {self}"
        );
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "error bodies are JSON: {self}"
        );
        message
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.what, self.status, self.text)
    }
}

// ---------------------------------------------------------------------------------------
// The callback receiver

/// What a [`Receiver`] answers: `queue` in order, then `then` forever, each after `delay`.
#[derive(Debug, Clone)]
pub struct Script {
    queue: VecDeque<u16>,
    then: u16,
    delay: Duration,
    location: Option<String>,
}

impl Script {
    pub fn always(status: u16) -> Script {
        Script::first(&[], status)
    }

    /// `Script::first(&[503, 503], 200)`: two 503s, then 200 forever.
    pub fn first(statuses: &[u16], then: u16) -> Script {
        Script {
            queue: statuses.iter().copied().collect(),
            then,
            delay: Duration::ZERO,
            location: None,
        }
    }

    /// Every answer is `status` (a 3xx) with `Location: location`.
    pub fn redirect(status: u16, location: &str) -> Script {
        Script {
            location: Some(location.to_string()),
            ..Script::always(status)
        }
    }

    /// Every answer waits `delay` after the request has been recorded.
    pub fn delayed(mut self, delay: Duration) -> Script {
        self.delay = delay;
        self
    }

    fn next(&mut self) -> (u16, Duration, Option<String>) {
        (
            self.queue.pop_front().unwrap_or(self.then),
            self.delay,
            self.location.clone(),
        )
    }
}

/// One callback as it arrived.
#[derive(Clone)]
pub struct Received {
    /// Arrival time, unix ms (the same clock chime uses: both run on this machine).
    pub at_ms: i64,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub raw: Bytes,
    /// The body as JSON; `Null` if it is not JSON.
    pub body: Value,
    /// The status this request was answered with.
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn idempotency_key(&self) -> &str {
        self.header("idempotency-key")
            .unwrap_or_else(|| panic!("callback without Idempotency-Key: {self:?}"))
    }

    /// `X-Chime-Attempt` as a number.
    pub fn attempt_header(&self) -> u64 {
        self.header("x-chime-attempt")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("callback without a numeric X-Chime-Attempt: {self:?}"))
    }

    /// `attempt` of the body.
    pub fn attempt(&self) -> u64 {
        self.body["attempt"]
            .as_u64()
            .unwrap_or_else(|| panic!("callback body without a numeric attempt: {self:?}"))
    }

    pub fn job_id(&self) -> &str {
        self.body["job_id"].as_str().unwrap_or_default()
    }

    /// `scheduled_at` of the body, unix ms.
    pub fn scheduled_ms(&self) -> i64 {
        parse_ms(self.body["scheduled_at"].as_str().unwrap_or_default())
    }

    /// `fired_at` of the body, unix ms.
    pub fn fired_ms(&self) -> i64 {
        parse_ms(self.body["fired_at"].as_str().unwrap_or_default())
    }
}

impl fmt::Debug for Received {
    /// One line: what a failing assertion needs to tell callbacks apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} key={} attempt={} arrived={} answered={} body={}",
            self.method,
            self.path,
            self.header("idempotency-key").unwrap_or("-"),
            self.header("x-chime-attempt").unwrap_or("-"),
            rfc3339_ms(self.at_ms),
            self.answered,
            String::from_utf8_lossy(&self.raw)
        )
    }
}

struct Shared {
    script: Mutex<Script>,
    requests: Mutex<Vec<Received>>,
}

/// An HTTP server on 127.0.0.1:0 that records every request and answers by its [`Script`].
pub struct Receiver {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(script: Script) -> Receiver {
        Receiver::start_on("127.0.0.1", script).await
    }

    /// Like [`Receiver::start`], bound to another loopback address (e.g. 127.0.0.2).
    pub async fn start_on(ip: &str, script: Script) -> Receiver {
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver runs");
        });
        Receiver {
            addr,
            shared,
            server,
        }
    }

    /// The callback URL to give a job.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The port it listens on (to register it as a Consul instance).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the script for the requests still to come.
    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().unwrap() = script;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> (StatusCode, HeaderMap, &'static str) {
    let at_ms = now_ms();
    let (status, delay, location) = shared.script.lock().unwrap().next();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.requests.lock().unwrap().push(Received {
        at_ms,
        method,
        path: uri.path().to_string(),
        headers,
        raw,
        body,
        answered: status,
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = StatusCode::from_u16(status).expect("a valid scripted status");
    let mut out = HeaderMap::new();
    if let Some(location) = location {
        out.insert("location", location.parse().expect("a valid Location"));
    }
    (status, out, if status.is_success() { "ok" } else { "no" })
}

pub async fn start_node(db: &Db, id: &str, seed: Option<&Chime>, extra: &[&str]) -> Chime {
    let mut args: Vec<&str> = extra.to_vec();
    let seed_addr;
    if let Some(s) = seed {
        seed_addr = s.gossip.clone();
        args.extend(["--seeds", seed_addr.as_str()]);
    }
    Chime::start(db, id, &args).await
}

/// Waits until every node sees `n` ready members and the leases match the ring.
pub async fn wait_converged(nodes: &[&Chime], n: usize) {
    wait_converged_within(nodes, n, Duration::from_secs(30)).await
}

pub async fn wait_converged_within(nodes: &[&Chime], n: usize, limit: Duration) {
    let ok = wait_until(limit, async || {
        for node in nodes {
            let c = node.get("/v1/cluster").await;
            if c.status != 200 {
                return false;
            }
            let members = c.json["members"].as_array().cloned().unwrap_or_default();
            let ready = members.iter().filter(|m| m["state"] == "ready").count();
            let balanced = members.iter().all(|m| {
                m["leased_slots"] == m["ring_slots"] && m["ring_slots"].as_u64() > Some(0)
            });
            if ready != n || members.len() != n || !balanced {
                return false;
            }
        }
        true
    })
    .await;
    assert!(ok, "cluster of {n} did not converge");
}
