//! Load benchmark for one chime node on MySQL/MariaDB, with callbacks to a receiver on
//! loopback inside this process.
//!
//!     cargo bench --bench load -- [registration|memory|firing|cluster|delivery|rebalance|herd|spread|all]
//!                                 [--runs N] [--jobs N[,N…]] [--rates R1,R2,…] [--sqlite]
//!                                 [--via http|grpc|consul]
//!                                 (--sqlite: delivery, herd and spread; --via: delivery only;
//!                                 a list after --jobs: herd only, the others take its first value)
//!
//! - registration: PUT /v1/jobs/{id} for N jobs (default 100,000) with 64 concurrent
//!   clients: throughput and latency percentiles.
//! - memory: 1,000,000 jobs written straight into the database, then the node is started:
//!   time until /readyz answers 200, and the node's RSS once ready.
//! - firing: R jobs `@every 1s` with phases spread evenly over the second, so the node fires
//!   R times a second; for R in 1,000 / 5,000 / 10,000: achieved fires/s and fire delay
//!   (callback arrival − scheduled_at) p50/p99/max over a steady 15 s window.
//!
//! - cluster: the firing scenario on a 3-node cluster on this same machine.
//! - delivery: R jobs (default 5,000) `@every 1s` delivered over HTTP, over gRPC (a tonic
//!   receiver in this process), and over HTTP to a Consul service (the Consul API double of
//!   the tests) whose three instances include one that answers 503 to everything while
//!   Consul still lists it as passing: successful deliveries/s and delay (arrival of the
//!   successful attempt − scheduled_at) p50/p99/max, plus the attempts the failing instance
//!   absorbed.
//! - rebalance: N jobs (100,000 and 1,000,000), 2 nodes; a third joins, then is killed
//!   with -9: time from the event until every slot is leased by its ring owner.
//! - herd: N jobs (10,000 and 50,000) `* * * * * *`, all due on the same second, on one node
//!   (MariaDB, or a fresh SQLite file with --sqlite), registered by PUT /v1/jobs/{id} with 32
//!   in flight while the first ones already fire (a 503 with Retry-After is retried and
//!   counted). Registration rate, PUT latency and failures; then a 10 s window after a 3 s
//!   settle: delivered vs expected, missed and duplicated keys, fire delay p50/p99/max;
//!   over the whole run, every (job, second) from the job's first `next_fire_at` to the end
//!   of the window must arrive exactly once. During the window a prober PUTs 20/s (replacing
//!   100 extra jobs, left out of the accounting) and GETs 20/s: latency p50/p99/max. The
//!   node's log is kept in $TMPDIR/chime-bench-logs/, and its WARN/ERROR lines are counted.
//!   A registration with fewer than N/20 successful PUTs in the last 60 s is stopped and
//!   reported as collapsed.
//! - spread: R jobs (5,000 / 10,000 / 20,000) `@every 1s` registered by PUT, phases as
//!   registration left them: achieved fires/s, delay p50/p99/max, missed and duplicated
//!   keys over a 15 s window after a 5 s settle; on MariaDB also commits, rows written and
//!   redo bytes per fire from `SHOW GLOBAL STATUS` deltas (server-wide: keep the server
//!   otherwise idle).
//!
//! Setup rows for memory, firing and rebalance are inserted directly (the schema is chime's own) so that
//! what is measured is the node, not the registration path; herd and spread register through
//! the REST API, as users do. Each scenario runs `--runs` times (default 3) and reports every
//! run and the median. MySQL comes from CHIME_TEST_MYSQL_URL (default
//! mysql://chime:chime@127.0.0.1:3306). CHIME_BENCH_NODE_ARGS adds `chime serve` flags
//! (delivery, herd, spread).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

#[allow(dead_code)]
#[path = "../tests/common/consul.rs"]
mod consul;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const CHIME: &str = env!("CARGO_BIN_EXE_chime");

fn mysql_server() -> String {
    std::env::var("CHIME_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://chime:chime@127.0.0.1:3306".into())
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// A fresh SQLite database file, migrated: the single-node embedded default.
fn fresh_sqlite(dir: &std::path::Path) -> Res<String> {
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}?mode=rwc", dir.join("chime.db").display());
    let status = Command::new(CHIME)
        .args(["migrate", "--database-url", &url])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err("chime migrate failed".into());
    }
    Ok(url)
}

async fn fresh_db(name: &str) -> Res<String> {
    sqlx::any::install_default_drivers();
    let server = mysql_server();
    let admin = sqlx::AnyPool::connect(&server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let url = format!("{server}/{name}");
    let status = Command::new(CHIME)
        .args(["migrate", "--database-url", &url])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err("chime migrate failed".into());
    }
    Ok(url)
}

struct Node {
    child: Child,
    addr: SocketAddr,
    gossip: String,
    ready_after: Duration,
}

fn free_udp_port() -> Res<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    async fn start(db: &str) -> Res<Node> {
        Node::start_as(db, "bench", None).await
    }

    async fn start_as(db: &str, id: &str, seed: Option<&str>) -> Res<Node> {
        Node::start_with(db, id, seed, &[]).await
    }

    async fn start_with(db: &str, id: &str, seed: Option<&str>, extra: &[&str]) -> Res<Node> {
        Node::start_logged(db, id, seed, extra, None).await
    }

    /// As `start_with`, with the node's stderr copied line by line into the file `log`.
    async fn start_logged(
        db: &str,
        id: &str,
        seed: Option<&str>,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Res<Node> {
        let started = Instant::now();
        let mut log = log.map(std::fs::File::create).transpose()?;
        let gossip = format!("127.0.0.1:{}", free_udp_port()?);
        let mut cmd = Command::new(CHIME);
        cmd.args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--gossip-addr",
            &gossip,
            "--node-id",
            id,
            "--database-url",
            db,
        ]);
        if let Some(seed) = seed {
            cmd.args(["--seeds", seed]);
        }
        cmd.args(extra);
        let mut child = cmd
            .env("CHIME_LOG", "warn,chime::node=info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr: SocketAddr = loop {
            let line = lines.next().ok_or("chime exited before listening")??;
            if let Some(f) = log.as_mut() {
                writeln!(f, "{line}")?;
            }
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().ok_or("bad listen line")?;
                break addr.parse()?;
            }
        };
        // Keep draining stderr so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let client = reqwest::Client::new();
        loop {
            let ready = client.get(format!("http://{addr}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err("node not ready after 600 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Node {
            child,
            addr,
            gossip,
            ready_after: started.elapsed(),
        })
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// False once the process has exited (also while it is an unreaped zombie).
    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with(['Z', 'X']))
            })
            .unwrap_or(false)
    }

    /// SIGTERM, then SIGKILL if the node has not exited within `limit`: a node that
    /// collapsed must not hang the bench on its way out.
    async fn stop_within(mut self, limit: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < limit {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "    node did not exit {} s after SIGTERM: killed",
            limit.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Records (arrival − scheduled_at) for every callback it receives.
#[derive(Clone, Default)]
struct Receiver {
    delays_us: Arc<Mutex<Vec<(i64, i64)>>>,
    count: Arc<AtomicU64>,
}

impl Receiver {
    /// Over callbacks of fires scheduled in `[from_ms, to_ms)`: callbacks per second and
    /// delay p50 / p99 / max in ms.
    fn window(&self, from_ms: i64, to_ms: i64) -> (f64, f64, f64, f64) {
        let mut delays: Vec<f64> = self
            .delays_us
            .lock()
            .unwrap()
            .iter()
            .filter(|(ms, _)| *ms >= from_ms && *ms < to_ms)
            .map(|(_, d)| *d as f64 / 1000.0)
            .collect();
        delays.sort_by(f64::total_cmp);
        (
            delays.len() as f64 / ((to_ms - from_ms) as f64 / 1000.0),
            percentile(&delays, 0.5),
            percentile(&delays, 0.99),
            delays.last().copied().unwrap_or(f64::NAN),
        )
    }
}

async fn start_receiver(rx: Receiver) -> Res<SocketAddr> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| {
            let rx = rx.clone();
            async move {
                let arrived = now_us();
                let scheduled_ms = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|k| k.rsplit('@').next())
                    .and_then(|ms| ms.parse::<i64>().ok());
                if let Some(ms) = scheduled_ms {
                    rx.delays_us.lock().unwrap().push((ms, arrived - ms * 1000));
                }
                rx.count.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn spec_json(schedule: &str, hook: &str) -> String {
    spec_with_callback(
        schedule,
        &format!(
            "{{\"http\":{{\"url\":\"{hook}\",\"method\":\"POST\",\
             \"headers\":{{\"X-Team\":\"web\"}},\"timeout_ms\":5000}}}}"
        ),
    )
}

fn spec_with_callback(schedule: &str, callback: &str) -> String {
    format!(
        "{{\"schedule\":\"{schedule}\",\"timezone\":\"UTC\",\"callback\":{callback},\
         \"payload\":{{\"replicas\":12,\"tier\":\"web\"}},\"retry\":{{\"max_attempts\":5,\
         \"initial_backoff_ms\":1000,\"max_backoff_ms\":60000}}}}"
    )
}

/// Inserts `n` jobs; job i has `schedule(i)` and first fire `next(i)`.
async fn insert_jobs(
    db: &str,
    n: usize,
    hook: &str,
    schedule: impl Fn(usize) -> String,
    anchor: impl Fn(usize) -> i64,
    next: impl Fn(usize) -> i64,
) -> Res<()> {
    insert_specs(db, n, |i| spec_json(&schedule(i), hook), anchor, next).await
}

/// Inserts `n` jobs; job i has `spec(i)` and first fire `next(i)`.
async fn insert_specs(
    db: &str,
    n: usize,
    spec: impl Fn(usize) -> String,
    anchor: impl Fn(usize) -> i64,
    next: impl Fn(usize) -> i64,
) -> Res<()> {
    let pool = sqlx::AnyPool::connect(db).await?;
    let started = Instant::now();
    const ROWS: usize = 1000;
    for chunk_start in (0..n).step_by(ROWS) {
        let end = (chunk_start + ROWS).min(n);
        let values = vec!["(?, ?, ?, 0, ?, NULL, ?, ?, ?)"; end - chunk_start].join(", ");
        let sql = format!(
            "INSERT INTO jobs (id, slot, spec, paused, active_since, last_fire_at, next_fire_at, \
             created_at, updated_at) VALUES {values}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in chunk_start..end {
            let id = format!("bench-{i:08}");
            q = q
                .bind(id.clone())
                .bind(i64::from(chime::job::slot_of(&id)))
                .bind(spec(i))
                .bind(anchor(i))
                .bind(next(i))
                .bind(anchor(i))
                .bind(anchor(i));
        }
        q.execute(&pool).await?;
        if end.is_multiple_of(100_000) {
            eprintln!(
                "  inserted {end}/{n} jobs ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    pool.close().await;
    Ok(())
}

/// `jobs` daily jobs over 1,000 distinct cron expressions (minute/hour combinations), none
/// due today: the set-up of the memory and rebalance scenarios.
async fn insert_daily_jobs(db: &str, jobs: usize) -> Res<()> {
    let now = chrono::Utc::now().timestamp_millis();
    insert_jobs(
        db,
        jobs,
        "http://127.0.0.1:9/hook",
        |i| format!("0 {} {} * * *", i % 60, (i / 60) % 17),
        |_| now,
        |_| now + 86_400_000,
    )
    .await
}

async fn registration(runs: usize, jobs: usize) -> Res<()> {
    println!("\n## registration: PUT /v1/jobs/{{id}} x {jobs}, 64 concurrent clients");
    println!("| run | jobs/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    let (mut rates, mut p50s, mut p99s) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let db = fresh_db("chime_bench_reg").await?;
        let node = Node::start(&db).await?;
        let base = format!("http://{}", node.addr);
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..64 {
            let (client, base, next) = (client.clone(), base.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= jobs {
                        break;
                    }
                    // Yearly at a fixed instant: registration only, nothing fires.
                    let body = spec_json("0 0 3 1 1 *", "http://127.0.0.1:9/hook");
                    let t = Instant::now();
                    let resp = client
                        .put(format!("{base}/v1/jobs/reg-{i:08}"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(
                        resp.status(),
                        201,
                        "{}",
                        resp.text().await.unwrap_or_default()
                    );
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for w in workers {
            lat.extend(w.await?);
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let rate = jobs as f64 / secs;
        let (p50, p99, max) = (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1],
        );
        println!("| {run} | {rate:.0} | {p50:.2} | {p99:.2} | {max:.1} |");
        rates.push(rate);
        p50s.push(p50);
        p99s.push(p99);
        drop(node);
    }
    println!(
        "| **median** | **{:.0}** | **{:.2}** | **{:.2}** | |",
        median(rates),
        median(p50s),
        median(p99s)
    );
    Ok(())
}

async fn memory(runs: usize, jobs: usize) -> Res<()> {
    println!("\n## memory and start-up: {jobs} registered jobs");
    let db = fresh_db("chime_bench_mem").await?;
    insert_daily_jobs(&db, jobs).await?;
    println!("| run | ready after s | RSS MiB |\n|---|---|---|");
    let (mut readies, mut rsss) = (vec![], vec![]);
    for run in 1..=runs {
        let node = Node::start(&db).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ready, rss) = (node.ready_after.as_secs_f64(), node.rss_mib());
        println!("| {run} | {ready:.2} | {rss:.0} |");
        readies.push(ready);
        rsss.push(rss);
    }
    println!(
        "| **median** | **{:.2}** | **{:.0}** |",
        median(readies),
        median(rsss)
    );
    Ok(())
}

async fn firing(runs: usize, rates: &[usize], nodes: usize) -> Res<()> {
    println!(
        "\n## firing on {nodes} node(s): R jobs `@every 1s`, phases spread over the second, HTTP callbacks"
    );
    println!(
        "| target fires/s | run | achieved fires/s | delay p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|"
    );
    const WARMUP: Duration = Duration::from_secs(5);
    const WINDOW: Duration = Duration::from_secs(15);
    let mut summary = Vec::new();
    for &rate in rates {
        let (mut achieved, mut p50s, mut p99s, mut maxs) = (vec![], vec![], vec![], vec![]);
        for run in 1..=runs {
            let receiver = Receiver::default();
            let hook_addr = start_receiver(receiver.clone()).await?;
            let hook = format!("http://{hook_addr}/hook");
            let db = fresh_db("chime_bench_fire").await?;
            // Anchors a few seconds ahead so the first fires come after start-up.
            let base = chrono::Utc::now().timestamp_millis() + 3_000;
            let anchor = |i: usize| base + (i * 1000 / rate) as i64 - 1000;
            insert_jobs(
                &db,
                rate,
                &hook,
                |_| "@every 1s".into(),
                anchor,
                |i| anchor(i) + 1000,
            )
            .await?;
            let first = Node::start_as(&db, "n1", None).await?;
            let seed = first.gossip.clone();
            let mut cluster = vec![first];
            for i in 2..=nodes {
                cluster.push(Node::start_as(&db, &format!("n{i}"), Some(&seed)).await?);
            }
            wait_converged(&cluster[0], nodes).await?;
            tokio::time::sleep(WARMUP).await;
            let from_ms = chrono::Utc::now().timestamp_millis();
            tokio::time::sleep(WINDOW).await;
            let to_ms = chrono::Utc::now().timestamp_millis() - 1000;
            // Only fires scheduled in the window, and only once their callbacks had time to land.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(cluster);
            let (got, p50, p99, max) = receiver.window(from_ms, to_ms);
            println!("| {rate} | {run} | {got:.0} | {p50:.2} | {p99:.2} | {max:.1} |");
            achieved.push(got);
            p50s.push(p50);
            p99s.push(p99);
            maxs.push(max);
        }
        summary.push((
            rate,
            median(achieved),
            median(p50s),
            median(p99s),
            median(maxs),
        ));
    }
    println!(
        "\n| target fires/s | achieved (median) | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|"
    );
    for (rate, got, p50, p99, max) in summary {
        println!("| {rate} | {got:.0} | {p50:.2} | {p99:.2} | {max:.1} |");
    }
    Ok(())
}

/// Answers 503 to everything (an instance Consul still believes healthy), counting requests.
async fn start_failing_receiver(count: Arc<AtomicU64>) -> Res<SocketAddr> {
    let app = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

struct GrpcReceiver(Receiver);

#[tonic::async_trait]
impl chime::pb::callback_service_server::CallbackService for GrpcReceiver {
    async fn fire(
        &self,
        request: tonic::Request<chime::pb::FireRequest>,
    ) -> Result<tonic::Response<chime::pb::FireResponse>, tonic::Status> {
        let arrived = now_us();
        let ms = request.get_ref().scheduled_at_ms;
        self.0
            .delays_us
            .lock()
            .unwrap()
            .push((ms, arrived - ms * 1000));
        self.0.count.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(chime::pb::FireResponse {}))
    }
}

async fn start_grpc_receiver(rx: Receiver) -> Res<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let svc = chime::pb::callback_service_server::CallbackServiceServer::new(GrpcReceiver(rx));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
    });
    Ok(addr)
}

async fn delivery(runs: usize, rate: usize, sqlite: bool, only: Option<&str>) -> Res<()> {
    let store = if sqlite {
        "SQLite (embedded)"
    } else {
        "MariaDB"
    };
    println!(
        "\n## delivery at {rate} fires/s: one node on {store}, R jobs `@every 1s` spread over the second"
    );
    println!(
        "| via | run | delivered/s | delay p50 ms | p99 ms | max ms | attempts to the failing instance |\n|---|---|---|---|---|---|---|"
    );
    const WARMUP: Duration = Duration::from_secs(5);
    const WINDOW: Duration = Duration::from_secs(15);
    let mut summary = Vec::new();
    for via in ["http", "grpc", "consul, 1 of 3 failing"] {
        if only.is_some_and(|o| !via.starts_with(o)) {
            continue;
        }
        let (mut achieved, mut p50s, mut p99s, mut maxs, mut absorbed) =
            (vec![], vec![], vec![], vec![], vec![]);
        for run in 1..=runs {
            let receiver = Receiver::default();
            let failing = Arc::new(AtomicU64::new(0));
            let mut extra: Vec<String> = Vec::new();
            let mut _consul = None;
            let callback = match via {
                "http" => {
                    let addr = start_receiver(receiver.clone()).await?;
                    format!(
                        "{{\"http\":{{\"url\":\"http://{addr}/hook\",\"method\":\"POST\",\"timeout_ms\":5000}}}}"
                    )
                }
                "grpc" => {
                    let addr = start_grpc_receiver(receiver.clone()).await?;
                    format!("{{\"grpc\":{{\"target\":\"http://{addr}\",\"timeout_ms\":5000}}}}")
                }
                _ => {
                    let double = consul::ConsulDouble::start().await;
                    for i in 0..2 {
                        let addr = start_receiver(receiver.clone()).await?;
                        double.add_instance("web", &format!("web-{i}"), "127.0.0.1", addr.port());
                    }
                    let bad = start_failing_receiver(failing.clone()).await?;
                    double.add_instance("web", "web-bad", "127.0.0.1", bad.port());
                    extra = vec!["--consul-addr".into(), double.url()];
                    _consul = Some(double);
                    "{\"http\":{\"url\":\"consul://web/hook\",\"method\":\"POST\",\"timeout_ms\":5000}}".to_string()
                }
            };
            let tmp = tempfile::tempdir()?;
            let db = if sqlite {
                fresh_sqlite(tmp.path())?
            } else {
                fresh_db("chime_bench_delivery").await?
            };
            let base = chrono::Utc::now().timestamp_millis() + 3_000;
            let anchor = |i: usize| base + (i * 1000 / rate) as i64 - 1000;
            insert_specs(
                &db,
                rate,
                |_| spec_with_callback("@every 1s", &callback),
                anchor,
                |i| anchor(i) + 1000,
            )
            .await?;
            if let Ok(more) = std::env::var("CHIME_BENCH_NODE_ARGS") {
                extra.extend(more.split_whitespace().map(str::to_string));
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let node = Node::start_with(&db, "n1", None, &extra).await?;
            tokio::time::sleep(WARMUP).await;
            let from_ms = chrono::Utc::now().timestamp_millis();
            let failing_from = failing.load(Ordering::Relaxed);
            tokio::time::sleep(WINDOW).await;
            let to_ms = chrono::Utc::now().timestamp_millis() - 1000;
            let failing_in_window = failing.load(Ordering::Relaxed) - failing_from;
            // Retries of the window's last fires need their backoff (up to ~1 s) to land.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(node);
            let (got, p50, p99, max) = receiver.window(from_ms, to_ms);
            println!(
                "| {via} | {run} | {got:.0} | {p50:.2} | {p99:.2} | {max:.1} | {failing_in_window} |"
            );
            achieved.push(got);
            p50s.push(p50);
            p99s.push(p99);
            maxs.push(max);
            absorbed.push(failing_in_window as f64);
        }
        summary.push((
            via,
            median(achieved),
            median(p50s),
            median(p99s),
            median(maxs),
            median(absorbed),
        ));
    }
    println!(
        "\n| via | delivered/s (median) | p50 ms | p99 ms | max ms | attempts to the failing instance |\n|---|---|---|---|---|---|"
    );
    for (via, got, p50, p99, max, bad) in summary {
        println!("| {via} | {got:.0} | {p50:.2} | {p99:.2} | {max:.1} | {bad:.0} |");
    }
    Ok(())
}

/// Until `node` sees `n` members whose leases match the ring.
async fn wait_converged(node: &Node, n: usize) -> Res<Duration> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let body: serde_json::Value = client
            .get(format!("http://{}/v1/cluster", node.addr))
            .send()
            .await?
            .json()
            .await?;
        let members = body["members"].as_array().cloned().unwrap_or_default();
        let leased: u64 = members
            .iter()
            .filter_map(|m| m["leased_slots"].as_u64())
            .sum();
        if members.len() == n
            && leased == u64::from(chime::job::SLOTS)
            && members.iter().all(|m| m["leased_slots"] == m["ring_slots"])
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("cluster of {n} did not converge: {body}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Join and crash of a node with `jobs` registered: from the event until every slot is
/// leased by its ring owner (all moved jobs armed on their new owners).
async fn rebalance(runs: usize, jobs: usize) -> Res<()> {
    println!("\n## rebalance with {jobs} jobs (2 nodes + a third joining, then killed with -9)");
    let db = fresh_db("chime_bench_rebalance").await?;
    insert_daily_jobs(&db, jobs).await?;
    let n1 = Node::start_as(&db, "n1", None).await?;
    let n2 = Node::start_as(&db, "n2", Some(&n1.gossip)).await?;
    wait_converged(&n1, 2).await?;
    println!("| run | join: converged after s | crash: converged after s |\n|---|---|---|");
    let (mut joins, mut crashes) = (vec![], vec![]);
    for run in 1..=runs {
        let started = Instant::now();
        let mut n3 = Node::start_as(&db, "n3", Some(&n1.gossip)).await?;
        wait_converged(&n1, 3).await?;
        let join = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        n3.child.kill()?;
        let _ = n3.child.wait();
        wait_converged(&n1, 2).await?;
        let crash = started.elapsed().as_secs_f64();
        std::mem::forget(n3);
        println!("| {run} | {join:.2} | {crash:.2} |");
        joins.push(join);
        crashes.push(crash);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "| **median** | **{:.2}** | **{:.2}** |",
        median(joins),
        median(crashes)
    );
    drop(n2);
    Ok(())
}

// herd and spread: jobs registered through the REST API, the way users drive chime.

/// PUTs in flight while registering.
const REG_CONCURRENCY: usize = 32;
/// A registration with fewer than N/`STALL_FRACTION` successful PUTs (at least one) in the
/// last `STALL` is stopped and reported: a pace at which N jobs would take over 20 minutes.
const STALL: Duration = Duration::from_secs(60);
const STALL_FRACTION: usize = 20;
/// Upper bound on one registration, however it still progresses.
const REG_LIMIT: Duration = Duration::from_secs(600);
/// Timeout of one registration PUT.
const PUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one prober request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Jobs the prober replaces during the window; their fires are not accounted.
const PROBE_JOBS: usize = 100;
/// Prober requests per second, of each kind (PUT and GET).
const PROBE_RATE: u64 = 20;

fn store_name(sqlite: bool) -> &'static str {
    if sqlite {
        "SQLite (embedded)"
    } else {
        "MariaDB"
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn sleep_until_ms(ms: i64) {
    let wait = ms - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// Extra `chime serve` arguments from CHIME_BENCH_NODE_ARGS.
fn bench_node_args() -> Vec<String> {
    std::env::var("CHIME_BENCH_NODE_ARGS")
        .map(|more| more.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Where a run's node log goes: kept after the run for a closer look.
fn node_log(scenario: &str, jobs: usize, sqlite: bool, run: usize) -> Res<PathBuf> {
    let dir = std::env::temp_dir().join("chime-bench-logs");
    std::fs::create_dir_all(&dir)?;
    let store = if sqlite { "sqlite" } else { "mariadb" };
    Ok(dir.join(format!("{scenario}-{jobs}-{store}-run{run}.log")))
}

/// One callback: which job (`job-{index}`; `u32::MAX` for any other id), the scheduled time
/// from its Idempotency-Key, and when it arrived.
#[derive(Clone, Copy)]
struct Arrival {
    job: u32,
    scheduled_ms: i64,
    arrived_us: i64,
}

/// Records every callback it receives, and answers 204 at once.
#[derive(Clone, Default)]
struct KeyReceiver(Arc<Mutex<Vec<Arrival>>>);

impl KeyReceiver {
    fn with_capacity(n: usize) -> Self {
        KeyReceiver(Arc::new(Mutex::new(Vec::with_capacity(n))))
    }

    /// Callbacks so far of fires scheduled before `to_ms`.
    fn count_before(&self, to_ms: i64) -> usize {
        let seen = self.0.lock().unwrap();
        seen.iter().filter(|a| a.scheduled_ms < to_ms).count()
    }

    /// Until callbacks of fires scheduled before `to_ms` stop coming: three polls a second
    /// apart without a new one, 30 s at most.
    async fn drain(&self, to_ms: i64) {
        let started = Instant::now();
        let (mut last, mut unchanged) = (usize::MAX, 0);
        while started.elapsed() < Duration::from_secs(30) && unchanged < 3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let count = self.count_before(to_ms);
            if count == last {
                unchanged += 1;
            } else {
                (last, unchanged) = (count, 0);
            }
        }
    }
}

async fn start_key_receiver(rx: KeyReceiver) -> Res<SocketAddr> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| {
            let rx = rx.clone();
            async move {
                let arrived_us = now_us();
                if let Some((id, ms)) = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|k| k.rsplit_once('@'))
                    && let Ok(scheduled_ms) = ms.parse::<i64>()
                {
                    let job = id
                        .strip_prefix("job-")
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(u32::MAX);
                    rx.0.lock().unwrap().push(Arrival {
                        job,
                        scheduled_ms,
                        arrived_us,
                    });
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Failed registration attempts, by kind; every one of them is retried.
#[derive(Default)]
struct Failures {
    /// 503 with Retry-After, retried after the time it asks for.
    retried_503: AtomicU64,
    /// Other 5xx answers.
    server_errors: AtomicU64,
    timeouts: AtomicU64,
    connection_errors: AtomicU64,
}

enum PutAttempt {
    /// 2xx: the job's `next_fire_at` (unix ms) and the request's latency.
    Done(i64, f64),
    RetryAfter(Duration),
    Failed,
}

/// One PUT. An answer other than 2xx, 5xx or a timeout is a setup error.
async fn put_once(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    fail: &Failures,
) -> Res<PutAttempt> {
    let t = Instant::now();
    let counted = |e: reqwest::Error| {
        if e.is_timeout() {
            fail.timeouts.fetch_add(1, Ordering::Relaxed);
        } else {
            fail.connection_errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PutAttempt::Failed)
    };
    let resp = match client
        .put(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => return counted(e),
    };
    let status = resp.status();
    if status.is_success() {
        let job: serde_json::Value = match resp.json().await {
            Ok(job) => job,
            Err(e) => return counted(e),
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let due = job["next_fire_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .ok_or_else(|| format!("PUT {url}: answer without next_fire_at: {job}"))?;
        return Ok(PutAttempt::Done(due.timestamp_millis(), ms));
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && let Some(secs) = retry_after
    {
        fail.retried_503.fetch_add(1, Ordering::Relaxed);
        return Ok(PutAttempt::RetryAfter(Duration::from_secs(secs.min(10))));
    }
    if status.is_server_error() {
        fail.server_errors.fetch_add(1, Ordering::Relaxed);
        return Ok(PutAttempt::Failed);
    }
    Err(format!(
        "PUT {url}: {status} {}",
        resp.text().await.unwrap_or_default()
    )
    .into())
}

/// PUT until it succeeds: `Some((next_fire_at, latency of the successful attempt))`, or
/// None once `abort` is set or after `STALL` without success.
async fn put_retrying(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    fail: &Failures,
    abort: &AtomicBool,
) -> Res<Option<(i64, f64)>> {
    let started = Instant::now();
    while !abort.load(Ordering::Relaxed) && started.elapsed() < STALL {
        match put_once(client, url, body, fail).await? {
            PutAttempt::Done(due, ms) => return Ok(Some((due, ms))),
            PutAttempt::RetryAfter(wait) => tokio::time::sleep(wait).await,
            PutAttempt::Failed => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    Ok(None)
}

fn put_client() -> Res<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(REG_CONCURRENCY)
        .timeout(PUT_TIMEOUT)
        .build()?)
}

/// The outcome of registering `job-{i}` for i in 0..n.
struct Registered {
    /// Per job, its first `next_fire_at` (unix ms); None if no PUT of it succeeded.
    first_due: Vec<Option<i64>>,
    /// Latency of each successful PUT, sorted.
    put_ms: Vec<f64>,
    /// Successful PUTs per second, up to the last one.
    rate: f64,
    fail: Failures,
    /// Why registration was stopped before every job was in.
    stalled: Option<String>,
}

#[derive(Default)]
struct RegState {
    next: AtomicUsize,
    done: AtomicUsize,
    abort: AtomicBool,
    fail: Failures,
    put_ms: Mutex<Vec<f64>>,
    first_due: Mutex<Vec<Option<i64>>>,
    last_ok: Mutex<Option<Instant>>,
    fatal: Mutex<Option<String>>,
}

/// PUTs `job-{i}` for i in 0..n with `REG_CONCURRENCY` in flight, retrying failures; stops
/// (and says why) once registration stalls (see `STALL`) or the node has exited.
async fn register(node: &Node, n: usize, spec: &str, label: &str) -> Res<Registered> {
    let st = Arc::new(RegState {
        first_due: Mutex::new(vec![None; n]),
        ..RegState::default()
    });
    let client = put_client()?;
    let base = format!("http://{}", node.addr);
    let spec: Arc<str> = spec.into();
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..REG_CONCURRENCY {
        let (st, client, base, spec) = (st.clone(), client.clone(), base.clone(), spec.clone());
        workers.spawn(async move {
            loop {
                let i = st.next.fetch_add(1, Ordering::Relaxed);
                if i >= n || st.abort.load(Ordering::Relaxed) {
                    break;
                }
                let url = format!("{base}/v1/jobs/job-{i:08}");
                match put_retrying(&client, &url, &spec, &st.fail, &st.abort).await {
                    Ok(Some((due, ms))) => {
                        st.put_ms.lock().unwrap().push(ms);
                        st.first_due.lock().unwrap()[i] = Some(due);
                        *st.last_ok.lock().unwrap() = Some(Instant::now());
                        st.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        *st.fatal.lock().unwrap() = Some(e.to_string());
                        st.abort.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }
    let mut progress = Instant::now();
    // (when, PUTs done then), over the last `STALL`.
    let mut history = std::collections::VecDeque::from([(started, 0)]);
    let stalled = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(e) = st.fatal.lock().unwrap().take() {
            workers.abort_all();
            return Err(format!("{label}: registration failed: {e}").into());
        }
        let done = st.done.load(Ordering::Relaxed);
        if done == n {
            break None;
        }
        if !node.alive() {
            break Some(format!("node exited during registration, at {done} jobs"));
        }
        history.push_back((Instant::now(), done));
        while history.len() > 1 && history[1].0.elapsed() >= STALL {
            history.pop_front();
        }
        let (since, done_then) = history[0];
        let recent = done - done_then;
        if since.elapsed() >= STALL && recent < (n / STALL_FRACTION).max(1) {
            break Some(format!(
                "registration stalled at {done} jobs ({recent} PUTs succeeded in the last {} s)",
                STALL.as_secs()
            ));
        }
        if started.elapsed() > REG_LIMIT {
            break Some(format!(
                "registration unfinished after {} s, at {done} jobs",
                REG_LIMIT.as_secs()
            ));
        }
        if progress.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "    {label}: {done}/{n} registered after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            progress = Instant::now();
        }
    };
    st.abort.store(true, Ordering::Relaxed);
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    let done = st.done.load(Ordering::Relaxed);
    let last_ok = st.last_ok.lock().unwrap().unwrap_or(started);
    let mut put_ms = std::mem::take(&mut *st.put_ms.lock().unwrap());
    put_ms.sort_by(f64::total_cmp);
    let first_due = std::mem::take(&mut *st.first_due.lock().unwrap());
    let st = Arc::into_inner(st).ok_or("registration workers still running")?;
    Ok(Registered {
        first_due,
        put_ms,
        rate: done as f64 / last_ok.duration_since(started).as_secs_f64().max(1e-3),
        fail: st.fail,
        stalled,
    })
}

/// `/readyz` asked once a second until the task is aborted: (checks, not ready).
fn watch_ready(addr: SocketAddr) -> (Arc<(AtomicU64, AtomicU64)>, tokio::task::JoinHandle<()>) {
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let c = counts.clone();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        loop {
            let ready = client.get(format!("http://{addr}/readyz")).send().await;
            c.0.fetch_add(1, Ordering::Relaxed);
            if !ready.is_ok_and(|r| r.status().is_success()) {
                c.1.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (counts, task)
}

/// Request latencies of the prober, sorted, and its failed requests (non-2xx or timeout).
#[derive(Default)]
struct Probed {
    put_ms: Vec<f64>,
    get_ms: Vec<f64>,
    put_failed: u64,
    get_failed: u64,
}

/// For `length`: `PROBE_RATE` PUTs a second replacing `probe-{k}` with the same spec and
/// `PROBE_RATE` GETs a second of random `job-{i}`, each request timed on its own.
async fn probe(base: String, jobs: usize, spec: String, length: Duration) -> Res<Probed> {
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
    let mut requests = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PROBE_RATE));
    let started = Instant::now();
    let mut k = 0usize;
    while started.elapsed() < length {
        tick.tick().await;
        let put = client
            .put(format!("{base}/v1/jobs/probe-{:03}", k % PROBE_JOBS))
            .header("content-type", "application/json")
            .body(spec.clone());
        let get = client.get(format!(
            "{base}/v1/jobs/job-{:08}",
            rand::random_range(0..jobs)
        ));
        k += 1;
        for (is_put, req) in [(true, put), (false, get)] {
            requests.spawn(async move {
                let t = Instant::now();
                let ok = req.send().await.is_ok_and(|r| r.status().is_success());
                (is_put, ok, t.elapsed().as_secs_f64() * 1000.0)
            });
        }
    }
    let mut probed = Probed::default();
    while let Some(done) = requests.join_next().await {
        match done? {
            (true, false, _) => probed.put_failed += 1,
            (false, false, _) => probed.get_failed += 1,
            (true, true, ms) => probed.put_ms.push(ms),
            (false, true, ms) => probed.get_ms.push(ms),
        }
    }
    probed.put_ms.sort_by(f64::total_cmp);
    probed.get_ms.sort_by(f64::total_cmp);
    Ok(probed)
}

/// Fires of the accounted jobs, each due every second from its first `next_fire_at`,
/// whose scheduled times fall in `[from_ms, to_ms)`.
#[derive(Default)]
struct Tally {
    expected: u64,
    /// Expected (job, time) keys that arrived.
    delivered: u64,
    missed: u64,
    /// Callbacks beyond the first for a key.
    duplicates: u64,
    /// Keys at or after their job's first fire but off its one-second grid.
    unexpected: u64,
    /// Arrival of a key's first callback − its scheduled time, sorted.
    delays_ms: Vec<f64>,
}

/// How many of `due`, `due` + 1 s, … fall in `[from_ms, to_ms)`.
fn fires_between(due: i64, from_ms: i64, to_ms: i64) -> u64 {
    let first = if due >= from_ms {
        due
    } else {
        due + (from_ms - due + 999) / 1000 * 1000
    };
    if first >= to_ms {
        0
    } else {
        ((to_ms - 1 - first) / 1000 + 1) as u64
    }
}

fn tally(arrivals: &[Arrival], first_due: &[Option<i64>], from_ms: i64, to_ms: i64) -> Tally {
    let mut keys: Vec<(u32, i64, i64)> = arrivals
        .iter()
        .filter(|a| (a.job as usize) < first_due.len())
        .filter(|a| a.scheduled_ms >= from_ms && a.scheduled_ms < to_ms)
        .map(|a| (a.job, a.scheduled_ms, a.arrived_us))
        .collect();
    keys.sort_unstable();
    let mut t = Tally::default();
    for same in keys.chunk_by(|a, b| a.0 == b.0 && a.1 == b.1) {
        let (job, ms, first_arrival) = same[0];
        t.duplicates += same.len() as u64 - 1;
        match first_due[job as usize] {
            Some(due) if ms >= due && (ms - due) % 1000 == 0 => {
                t.delivered += 1;
                t.delays_ms
                    .push((first_arrival - ms * 1000) as f64 / 1000.0);
            }
            Some(due) if ms >= due => t.unexpected += 1,
            // Fired before the PUT's answer read the job back: not part of the count.
            _ => {}
        }
    }
    t.delays_ms.sort_by(f64::total_cmp);
    t.expected = first_due
        .iter()
        .flatten()
        .map(|&due| fires_between(due, from_ms, to_ms))
        .sum();
    t.missed = t.expected.saturating_sub(t.delivered);
    t
}

/// chime's `/metrics` samples, by name (labels included in the name).
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let text = match client.get(format!("http://{addr}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, v)| Some((name.to_string(), v.parse().ok()?)))
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, name: &str) -> f64 {
    match (before.get(name), after.get(name)) {
        (Some(b), Some(a)) => a - b,
        _ => f64::NAN,
    }
}

/// MariaDB's `SHOW GLOBAL STATUS`, numeric values only.
async fn global_status(pool: &sqlx::AnyPool) -> Res<HashMap<String, f64>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SHOW GLOBAL STATUS").fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect())
}

/// A node log's WARN and ERROR lines, and its five most frequent messages with their
/// fields (`key=value`) cut off.
fn log_summary(path: &Path) -> (usize, usize, Vec<(usize, String)>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut warns, mut errors) = (0, 0);
    let mut messages: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let (level, rest) = if let Some((_, rest)) = line.split_once(" WARN ") {
            warns += 1;
            ("WARN", rest)
        } else if let Some((_, rest)) = line.split_once(" ERROR ") {
            errors += 1;
            ("ERROR", rest)
        } else {
            continue;
        };
        let words: Vec<&str> = rest
            .split(' ')
            .take_while(|w| {
                !w.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
            })
            .collect();
        *messages
            .entry(format!("{level} {}", words.join(" ")))
            .or_default() += 1;
    }
    let mut top: Vec<(usize, String)> = messages.into_iter().map(|(m, n)| (n, m)).collect();
    top.sort_by(|a, b| b.cmp(a));
    top.truncate(5);
    (warns, errors, top)
}

/// One markdown row: text cells, then numbers.
struct Row {
    texts: Vec<String>,
    values: Vec<f64>,
}

/// Rows numbered as runs, then (with more than one) the median of each numeric column over
/// its finite values. `cols` are (header, decimals); "–" stands for a missing figure.
fn print_table(header: bool, texts: &[&str], cols: &[(&str, usize)], rows: &[Row]) {
    let cell = |v: f64, d: usize| {
        if v.is_finite() {
            format!("{v:.d$}")
        } else {
            "–".to_string()
        }
    };
    if header {
        let names: Vec<&str> = std::iter::once("run")
            .chain(texts.iter().copied())
            .chain(cols.iter().map(|c| c.0))
            .collect();
        println!("| {} |", names.join(" | "));
        println!("|{}", "---|".repeat(names.len()));
    }
    for (i, row) in rows.iter().enumerate() {
        let values = row.values.iter().zip(cols).map(|(&v, c)| cell(v, c.1));
        let cells: Vec<String> = std::iter::once((i + 1).to_string())
            .chain(row.texts.iter().cloned())
            .chain(values)
            .collect();
        println!("| {} |", cells.join(" | "));
    }
    if rows.len() > 1 {
        let medians = cols.iter().enumerate().map(|(j, c)| {
            let finite: Vec<f64> = rows
                .iter()
                .map(|r| r.values[j])
                .filter(|v| v.is_finite())
                .collect();
            if finite.is_empty() {
                "–".to_string()
            } else {
                format!("**{}**", cell(median(finite), c.1))
            }
        });
        let texts = rows[0].texts.iter().enumerate().map(|(j, t)| {
            // A column that is the same in every row (the store, the rate) stays; others blank.
            if j == 0 && rows.iter().all(|r| r.texts[0] == *t) {
                t.clone()
            } else {
                String::new()
            }
        });
        let cells: Vec<String> = std::iter::once("**median**".to_string())
            .chain(texts)
            .chain(medians)
            .collect();
        println!("| {} |", cells.join(" | "));
    }
}

fn p(sorted: &[f64], q: f64) -> f64 {
    percentile(sorted, q)
}

fn max_of(sorted: &[f64]) -> f64 {
    sorted.last().copied().unwrap_or(f64::NAN)
}

struct HerdRun {
    outcome: String,
    registered: usize,
    reg: Registered,
    ready_checks: u64,
    not_ready: u64,
    window: Option<Tally>,
    whole: Tally,
    probed: Option<Probed>,
    metrics: HashMap<String, f64>,
    log: PathBuf,
    warns: usize,
    errors: usize,
    top: Vec<(usize, String)>,
}

async fn herd_run(n: usize, sqlite: bool, run: usize) -> Res<HerdRun> {
    const SETTLE: Duration = Duration::from_secs(3);
    const WINDOW_MS: i64 = 10_000;
    let rx = KeyReceiver::with_capacity(n * 64);
    let hook = format!("http://{}/hook", start_key_receiver(rx.clone()).await?);
    let tmp = tempfile::tempdir()?;
    let db = if sqlite {
        fresh_sqlite(tmp.path())?
    } else {
        fresh_db("bench_herd").await?
    };
    let log = node_log("herd", n, sqlite, run)?;
    let extra = bench_node_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let node = Node::start_logged(&db, "n1", None, &extra, Some(&log)).await?;
    let base = format!("http://{}", node.addr);
    let spec = spec_json("* * * * * *", &hook);

    // The prober's jobs, registered first and left out of the accounting.
    let client = put_client()?;
    let (fail, abort) = (Failures::default(), AtomicBool::new(false));
    for k in 0..PROBE_JOBS {
        let url = format!("{base}/v1/jobs/probe-{k:03}");
        put_retrying(&client, &url, &spec, &fail, &abort)
            .await?
            .ok_or("registering the prober's jobs failed")?;
    }

    let (ready, ready_task) = watch_ready(node.addr);
    let label = format!("herd {n} on {}, run {run}", store_name(sqlite));
    let reg = register(&node, n, &spec, &label).await?;
    let (window, probed, outcome, to_ms);
    if let Some(why) = &reg.stalled {
        eprintln!("    {label}: {why}; stopping the run");
        outcome = format!("collapsed: {why}");
        to_ms = now_ms();
        (window, probed) = (None, None);
    } else {
        tokio::time::sleep(SETTLE).await;
        let from_ms = (now_ms() / 1000 + 1) * 1000;
        to_ms = from_ms + WINDOW_MS;
        sleep_until_ms(from_ms).await;
        let prober = tokio::spawn(probe(
            base.clone(),
            n,
            spec.clone(),
            Duration::from_millis(WINDOW_MS as u64),
        ));
        sleep_until_ms(to_ms).await;
        probed = Some(prober.await??);
        outcome = "ok".to_string();
        window = Some(from_ms);
    }
    rx.drain(to_ms).await;
    let metrics = scrape(node.addr).await;
    ready_task.abort();
    node.stop_within(Duration::from_secs(20)).await;
    drop(tmp);
    let arrivals = std::mem::take(&mut *rx.0.lock().unwrap());
    let window = window.map(|from_ms| tally(&arrivals, &reg.first_due, from_ms, to_ms));
    let whole = tally(&arrivals, &reg.first_due, i64::MIN, to_ms);
    let (warns, errors, top) = log_summary(&log);
    Ok(HerdRun {
        outcome,
        registered: reg.first_due.iter().flatten().count(),
        reg,
        ready_checks: ready.0.load(Ordering::Relaxed),
        not_ready: ready.1.load(Ordering::Relaxed),
        window,
        whole,
        probed,
        metrics,
        log,
        warns,
        errors,
        top,
    })
}

/// N jobs `* * * * * *` registered by PUT while the first ones already fire.
async fn herd(runs: usize, sizes: &[usize], sqlite: bool) -> Res<()> {
    for &n in sizes {
        println!(
            "\n## herd: {n} jobs `* * * * * *` (all due on the same second) on one node on {}, \
             registered by PUT with {REG_CONCURRENCY} in flight, HTTP callbacks",
            store_name(sqlite)
        );
        let mut results = Vec::new();
        for run in 1..=runs {
            results.push(herd_run(n, sqlite, run).await?);
        }
        let nan = f64::NAN;
        println!(
            "\nRegistration (PUT latency of the successful attempt; failed attempts are retried):\n"
        );
        let rows: Vec<Row> = results
            .iter()
            .map(|r| Row {
                texts: vec![r.outcome.clone()],
                values: vec![
                    r.registered as f64,
                    r.reg.rate,
                    p(&r.reg.put_ms, 0.5),
                    p(&r.reg.put_ms, 0.99),
                    max_of(&r.reg.put_ms),
                    r.reg.fail.retried_503.load(Ordering::Relaxed) as f64,
                    r.reg.fail.server_errors.load(Ordering::Relaxed) as f64,
                    r.reg.fail.timeouts.load(Ordering::Relaxed) as f64,
                    r.reg.fail.connection_errors.load(Ordering::Relaxed) as f64,
                    r.not_ready as f64,
                    r.ready_checks as f64,
                    r.warns as f64,
                    r.errors as f64,
                ],
            })
            .collect();
        print_table(
            true,
            &["outcome"],
            &[
                ("registered", 0),
                ("PUT/s", 0),
                ("PUT p50 ms", 1),
                ("p99 ms", 1),
                ("max ms", 0),
                ("503 retried", 0),
                ("other 5xx", 0),
                ("timeouts", 0),
                ("conn. errors", 0),
                ("/readyz failed", 0),
                ("of checks", 0),
                ("WARN lines", 0),
                ("ERROR lines", 0),
            ],
            &rows,
        );
        println!(
            "\nFiring: a 10 s window after a 3 s settle, and the whole run (every second of every \
             job from its first `next_fire_at` to the window's end); prober jobs excluded:\n"
        );
        let rows: Vec<Row> = results
            .iter()
            .map(|r| {
                let w = r.window.as_ref();
                let wv = |f: &dyn Fn(&Tally) -> f64| w.map(f).unwrap_or(nan);
                Row {
                    texts: vec![],
                    values: vec![
                        wv(&|t| t.delivered as f64),
                        wv(&|t| t.expected as f64),
                        wv(&|t| t.missed as f64),
                        wv(&|t| t.duplicates as f64),
                        wv(&|t| p(&t.delays_ms, 0.5)),
                        wv(&|t| p(&t.delays_ms, 0.99)),
                        wv(&|t| max_of(&t.delays_ms)),
                        r.whole.expected as f64,
                        r.whole.missed as f64,
                        r.whole.duplicates as f64,
                        r.metrics
                            .get("chime_fires_fenced_total")
                            .copied()
                            .unwrap_or(nan),
                        r.metrics
                            .get("chime_store_errors_total")
                            .copied()
                            .unwrap_or(nan),
                    ],
                }
            })
            .collect();
        print_table(
            true,
            &[],
            &[
                ("window delivered", 0),
                ("expected", 0),
                ("missed", 0),
                ("dup", 0),
                ("delay p50 ms", 1),
                ("p99 ms", 1),
                ("max ms", 0),
                ("run expected", 0),
                ("run missed", 0),
                ("run dup", 0),
                ("fenced fires", 0),
                ("store errors", 0),
            ],
            &rows,
        );
        println!(
            "\nProber during the window: {PROBE_RATE} PUT/s replacing {PROBE_JOBS} extra jobs, \
             {PROBE_RATE} GET/s of herd jobs; latency of the successful ones, failed = non-2xx \
             or no answer within {} s:\n",
            PROBE_TIMEOUT.as_secs()
        );
        let rows: Vec<Row> = results
            .iter()
            .map(|r| {
                let pv = |f: &dyn Fn(&Probed) -> f64| r.probed.as_ref().map(f).unwrap_or(nan);
                Row {
                    texts: vec![],
                    values: vec![
                        pv(&|q| p(&q.put_ms, 0.5)),
                        pv(&|q| p(&q.put_ms, 0.99)),
                        pv(&|q| max_of(&q.put_ms)),
                        pv(&|q| p(&q.get_ms, 0.5)),
                        pv(&|q| p(&q.get_ms, 0.99)),
                        pv(&|q| max_of(&q.get_ms)),
                        pv(&|q| q.put_failed as f64),
                        pv(&|q| q.get_failed as f64),
                    ],
                }
            })
            .collect();
        print_table(
            true,
            &[],
            &[
                ("PUT p50 ms", 1),
                ("p99 ms", 1),
                ("max ms", 0),
                ("GET p50 ms", 1),
                ("p99 ms", 1),
                ("max ms", 0),
                ("PUT failed", 0),
                ("GET failed", 0),
            ],
            &rows,
        );
        for (i, r) in results.iter().enumerate() {
            let odd = r.whole.unexpected + r.window.as_ref().map_or(0, |w| w.unexpected);
            if odd > 0 {
                println!(
                    "\nRun {}: {odd} callbacks off their job's one-second grid.",
                    i + 1
                );
            }
            if !r.top.is_empty() {
                println!(
                    "\nRun {}: node log {} — most frequent WARN/ERROR messages:\n",
                    i + 1,
                    r.log.display()
                );
                for (count, msg) in &r.top {
                    println!("- {count} × `{msg}`");
                }
            }
        }
    }
    Ok(())
}

/// R jobs `@every 1s` registered by PUT: phases follow registration, nothing is spread by
/// hand.
async fn spread(runs: usize, rates: &[usize], sqlite: bool) -> Res<()> {
    const SETTLE: Duration = Duration::from_secs(5);
    const WINDOW: Duration = Duration::from_secs(15);
    println!(
        "\n## spread: R jobs `@every 1s` registered by PUT ({REG_CONCURRENCY} in flight) on one node on {}, \
         HTTP callbacks; {} s window after a {} s settle",
        store_name(sqlite),
        WINDOW.as_secs(),
        SETTLE.as_secs()
    );
    println!(
        "\nAchieved = distinct fires scheduled in the window that arrived; fires = chime_fires_total \
         over the window; database cost per fire from SHOW GLOBAL STATUS deltas (the whole server).\n"
    );
    let admin = if sqlite {
        None
    } else {
        sqlx::any::install_default_drivers();
        Some(
            sqlx::pool::PoolOptions::<sqlx::Any>::new()
                .max_connections(1)
                .connect(&mysql_server())
                .await?,
        )
    };
    let mut first_table = true;
    let mut rows_source = None;
    for &rate in rates {
        let mut rows = Vec::new();
        for run in 1..=runs {
            let rx = KeyReceiver::with_capacity(rate * 64);
            let hook = format!("http://{}/hook", start_key_receiver(rx.clone()).await?);
            let tmp = tempfile::tempdir()?;
            let db = if sqlite {
                fresh_sqlite(tmp.path())?
            } else {
                fresh_db("bench_spread").await?
            };
            let log = node_log("spread", rate, sqlite, run)?;
            let extra = bench_node_args();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let node = Node::start_logged(&db, "n1", None, &extra, Some(&log)).await?;
            let label = format!("spread {rate} on {}, run {run}", store_name(sqlite));
            let spec = spec_json("@every 1s", &hook);
            let reg = register(&node, rate, &spec, &label).await?;
            let mut values = vec![f64::NAN; 16];
            let mut outcome = match &reg.stalled {
                Some(why) => format!("collapsed: {why}"),
                None => "ok".to_string(),
            };
            for (count, what) in [
                (&reg.fail.retried_503, "503 retried"),
                (&reg.fail.server_errors, "other 5xx"),
                (&reg.fail.connection_errors, "connection errors"),
            ] {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    outcome.push_str(&format!("; {count} {what}"));
                }
            }
            values[13..].copy_from_slice(&[
                reg.rate,
                p(&reg.put_ms, 0.99),
                reg.fail.timeouts.load(Ordering::Relaxed) as f64,
            ]);
            if reg.stalled.is_none() {
                tokio::time::sleep(SETTLE).await;
                let from_ms = now_ms();
                let m0 = scrape(node.addr).await;
                let s0 = match &admin {
                    Some(pool) => Some(global_status(pool).await?),
                    None => None,
                };
                tokio::time::sleep(WINDOW).await;
                let to_ms = now_ms();
                let m1 = scrape(node.addr).await;
                let s1 = match &admin {
                    Some(pool) => Some(global_status(pool).await?),
                    None => None,
                };
                rx.drain(to_ms).await;
                let secs = (to_ms - from_ms) as f64 / 1000.0;
                let t = tally(&rx.0.lock().unwrap(), &reg.first_due, from_ms, to_ms);
                let fires = delta(&m0, &m1, "chime_fires_total");
                values[..8].copy_from_slice(&[
                    t.delivered as f64 / secs,
                    p(&t.delays_ms, 0.5),
                    p(&t.delays_ms, 0.99),
                    max_of(&t.delays_ms),
                    t.missed as f64,
                    t.duplicates as f64,
                    fires / secs,
                    delta(&m0, &m1, "chime_fires_fenced_total")
                        + delta(&m0, &m1, "chime_store_errors_total"),
                ]);
                if let (Some(s0), Some(s1)) = (s0, s1) {
                    let fires = if fires > 0.0 {
                        fires
                    } else {
                        t.delivered as f64
                    };
                    let d = |name: &str| delta(&s0, &s1, name);
                    let rows_written = if s1.contains_key("Innodb_rows_inserted") {
                        rows_source = Some("Innodb_rows_inserted+updated+deleted");
                        d("Innodb_rows_inserted")
                            + d("Innodb_rows_updated")
                            + d("Innodb_rows_deleted")
                    } else {
                        rows_source = Some(
                            "Handler_write+Handler_update+Handler_delete (this MariaDB has no Innodb_rows_*)",
                        );
                        d("Handler_write") + d("Handler_update") + d("Handler_delete")
                    };
                    values[8..13].copy_from_slice(&[
                        d("Com_commit") / fires,
                        d("Handler_commit") / fires,
                        rows_written / fires,
                        d("Innodb_os_log_written") / fires,
                        d("Innodb_lsn_current") / fires,
                    ]);
                }
            } else {
                eprintln!("    {label}: {outcome}; stopping the run");
            }
            node.stop_within(Duration::from_secs(20)).await;
            drop(tmp);
            let (warns, errors, top) = log_summary(&log);
            if warns + errors > 0 {
                eprintln!(
                    "    {label}: {warns} WARN, {errors} ERROR lines in {}; top: {top:?}",
                    log.display()
                );
            }
            rows.push(Row {
                texts: vec![rate.to_string(), format!("{outcome}; {warns} WARN")],
                values,
            });
        }
        print_table(
            first_table,
            &["R", "outcome"],
            &[
                ("achieved fires/s", 0),
                ("delay p50 ms", 1),
                ("p99 ms", 1),
                ("max ms", 0),
                ("missed", 0),
                ("dup", 0),
                ("chime fires/s", 0),
                ("fenced + store errors", 0),
                ("Com_commit/fire", 3),
                ("Handler_commit/fire", 3),
                ("rows written/fire", 2),
                ("redo B/fire (os_log_written)", 0),
                ("redo B/fire (LSN)", 0),
                ("reg. PUT/s", 0),
                ("PUT p99 ms", 0),
                ("PUT timeouts", 0),
            ],
            &rows,
        );
        first_table = false;
    }
    if let Some(source) = rows_source {
        println!("\nRows written: {source}.");
    }
    if let Some(pool) = admin {
        pool.close().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut which = "all".to_string();
    let mut runs = 3;
    let mut jobs: Option<Vec<usize>> = None;
    let mut rates: Option<Vec<usize>> = None;
    let mut sqlite = false;
    let mut via: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().ok_or("--runs N")?.parse()?,
            "--jobs" => {
                jobs = Some(
                    it.next()
                        .ok_or("--jobs N1,N2")?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?,
                )
            }
            "--sqlite" => sqlite = true,
            "--via" => via = Some(it.next().ok_or("--via http|grpc|consul")?.clone()),
            "--rates" => {
                rates = Some(
                    it.next()
                        .ok_or("--rates R1,R2")?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?,
                )
            }
            s if !s.starts_with('-') => which = s.to_string(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    const SCENARIOS: [&str; 9] = [
        "registration",
        "memory",
        "firing",
        "cluster",
        "delivery",
        "rebalance",
        "herd",
        "spread",
        "all",
    ];
    if !SCENARIOS.contains(&which.as_str()) {
        return Err(format!("unknown scenario {which}: one of {}", SCENARIOS.join("|")).into());
    }
    let job = jobs.as_ref().and_then(|j| j.first().copied());
    let firing_rates = rates.clone().unwrap_or_else(|| vec![1_000, 5_000, 10_000]);
    println!(
        "# chime load benchmark ({} cores, {})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    if which == "registration" || which == "all" {
        registration(runs, job.unwrap_or(100_000)).await?;
    }
    if which == "memory" || which == "all" {
        memory(runs, job.unwrap_or(1_000_000)).await?;
    }
    if which == "firing" || which == "all" {
        firing(runs, &firing_rates, 1).await?;
    }
    if which == "cluster" || which == "all" {
        firing(runs, &firing_rates, 3).await?;
    }
    if which == "delivery" || which == "all" {
        delivery(runs, job.unwrap_or(5_000), sqlite, via.as_deref()).await?;
    }
    if which == "rebalance" || which == "all" {
        for n in job
            .map(|j| vec![j])
            .unwrap_or_else(|| vec![100_000, 1_000_000])
        {
            rebalance(runs, n).await?;
        }
    }
    if which == "herd" || which == "all" {
        let sizes = jobs.clone().unwrap_or_else(|| vec![10_000, 50_000]);
        herd(runs, &sizes, sqlite).await?;
    }
    if which == "spread" || which == "all" {
        let rates = rates.unwrap_or_else(|| vec![5_000, 10_000, 20_000]);
        spread(runs, &rates, sqlite).await?;
    }
    Ok(())
}
