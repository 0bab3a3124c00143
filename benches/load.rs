//! Load benchmark for one chime node on MySQL/MariaDB, with callbacks to a receiver on
//! loopback inside this process.
//!
//!     cargo bench --bench load -- [registration|memory|firing|cluster|delivery|rebalance|all] [--runs N] [--jobs N]
//!                                 [--rates 1000,5000,10000] [--sqlite] [--via http|grpc|consul]
//!                                 (--sqlite and --via: delivery only)
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
//!
//! Setup rows for memory, firing and rebalance are inserted directly (the schema is chime's own) so that
//! what is measured is the node, not the registration path. Each scenario runs `--runs`
//! times (default 3) and reports every run and the median. MySQL comes from
//! CHIME_TEST_MYSQL_URL (default mysql://chime:chime@127.0.0.1:3306).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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
        let started = Instant::now();
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
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().ok_or("bad listen line")?;
                break addr.parse()?;
            }
        };
        // Keep draining stderr so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
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
}

impl Drop for Node {
    fn drop(&mut self) {
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

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut which = "all".to_string();
    let mut runs = 3;
    let mut jobs: Option<usize> = None;
    let mut rates = vec![1_000, 5_000, 10_000];
    let mut sqlite = false;
    let mut via: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().ok_or("--runs N")?.parse()?,
            "--jobs" => jobs = Some(it.next().ok_or("--jobs N")?.parse()?),
            "--sqlite" => sqlite = true,
            "--via" => via = Some(it.next().ok_or("--via http|grpc|consul")?.clone()),
            "--rates" => {
                rates = it
                    .next()
                    .ok_or("--rates R1,R2")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            s if !s.starts_with('-') => which = s.to_string(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    println!(
        "# chime load benchmark ({} cores, {})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    if which == "registration" || which == "all" {
        registration(runs, jobs.unwrap_or(100_000)).await?;
    }
    if which == "memory" || which == "all" {
        memory(runs, jobs.unwrap_or(1_000_000)).await?;
    }
    if which == "firing" || which == "all" {
        firing(runs, &rates, 1).await?;
    }
    if which == "cluster" || which == "all" {
        firing(runs, &rates, 3).await?;
    }
    if which == "delivery" || which == "all" {
        delivery(runs, jobs.unwrap_or(5_000), sqlite, via.as_deref()).await?;
    }
    if which == "rebalance" || which == "all" {
        for n in jobs
            .map(|j| vec![j])
            .unwrap_or_else(|| vec![100_000, 1_000_000])
        {
            rebalance(runs, n).await?;
        }
    }
    Ok(())
}
