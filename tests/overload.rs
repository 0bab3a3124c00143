//! Overload of the fire path on one node (embedded SQLite): a herd of jobs due on the same
//! second demands far more callbacks per second than the receiver lets the node deliver.
//! The node must stay live (ready, answering reads and writes) while the backlog grows, and
//! once the receiver speeds up it must drain the backlog and have delivered every scheduled
//! fire exactly once: overload may delay fires, never drop or double them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use common::{Chime, Receiver, Script, fresh_sqlite, now_ms, parse_ms};

/// Jobs `* * * * * *`: all due on every second, so JOBS fires/s are demanded.
const JOBS: usize = 2_000;
/// PUTs in flight while registering.
const REGISTER_IN_FLIGHT: usize = 32;
/// `--delivery-per-target-concurrency`: with SLOW_ANSWER the node can deliver
/// PER_TARGET / SLOW_ANSWER = 320 callbacks/s, a sixth of what is demanded.
const PER_TARGET: usize = 32;
const SLOW_ANSWER: Duration = Duration::from_millis(100);
/// How long the receiver stays slow, counted from the first PUT.
const OVERLOAD: Duration = Duration::from_secs(10);
/// Bound for one liveness probe (readyz, PUT, GET) during the overload: this is a liveness
/// test, not a latency test.
const PROBE_BOUND: Duration = Duration::from_secs(5);
/// How long the backlog may take to drain once the receiver answers at once.
const DRAIN_BOUND: Duration = Duration::from_secs(60);
/// Fires are judged up to this long after the switch.
const CUTOFF_AFTER_SWITCH_MS: i64 = 3_000;
/// A backlog this small would mean the node was never overloaded: the test would prove
/// nothing.
const MIN_BACKLOG: i64 = 5_000;
const MAX_WARN_LINES: usize = 50;

fn herd_job(url: &str, i: usize) -> Value {
    json!({
        "schedule": "* * * * * *",
        "callback": {"http": {"url": url}},
        "payload": {"i": i},
    })
}

/// One liveness probe: `rb` answered within [`PROBE_BOUND`] with `want`; returns the time
/// it took.
async fn probe(node: &Chime, rb: reqwest::RequestBuilder, want: u16, what: &str) -> Duration {
    let started = Instant::now();
    match tokio::time::timeout(PROBE_BOUND, node.send_once(rb)).await {
        Ok(r) => {
            assert_eq!(
                r.status,
                want,
                "{what} during the overload ({:?} after the start): {r}",
                started.elapsed()
            );
            started.elapsed()
        }
        Err(_) => panic!("{what} did not answer within {PROBE_BOUND:?} during the overload"),
    }
}

/// Polls `pred` every `period` (it clones every callback received, so not every 20 ms)
/// until it holds or `timeout` has passed.
async fn poll_every(period: Duration, timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(period).await;
    }
}

/// Fires of `first_fire`'s jobs scheduled up to `at` (each job fires every second from its
/// first fire).
fn fires_due_by(first_fire: &BTreeMap<String, i64>, at: i64) -> i64 {
    first_fire
        .values()
        .filter(|f| **f <= at)
        .map(|f| (at - f) / 1000 + 1)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_larger_than_the_node_can_deliver_degrades_without_loss() {
    let test_started = Instant::now();
    let db = fresh_sqlite();
    let rx = Receiver::start(Script::always(200).delayed(SLOW_ANSWER)).await;
    let node = Chime::start(
        &db,
        "overload",
        &["--delivery-per-target-concurrency", &PER_TARGET.to_string()],
    )
    .await;
    let url = rx.url();

    // Register the herd (32 PUTs in flight; early jobs fire while later ones are written),
    // and probe the node's liveness until the overload ends.
    let switch_at = Instant::now() + OVERLOAD;
    let register = async {
        let started = Instant::now();
        let firsts: Vec<(String, i64)> = futures::stream::iter(0..JOBS)
            .map(|i| {
                let (node, url) = (&node, &url);
                async move {
                    let id = format!("herd-{i:04}");
                    let r = node.put(&format!("/v1/jobs/{id}"), &herd_job(url, i)).await;
                    assert_eq!(r.status, 201, "{r}");
                    (id, parse_ms(r.json["next_fire_at"].as_str().unwrap()))
                }
            })
            .buffer_unordered(REGISTER_IN_FLIGHT)
            .collect()
            .await;
        (firsts, started.elapsed())
    };
    let readiness = async {
        let (mut probes, mut worst) = (0u32, Duration::ZERO);
        while Instant::now() < switch_at {
            let rb = node.request(Method::GET, "/readyz");
            worst = worst.max(probe(&node, rb, 200, "GET /readyz").await);
            probes += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (probes, worst)
    };
    let api = async {
        let mut probe_jobs = Vec::new();
        let (mut worst_put, mut worst_get) = (Duration::ZERO, Duration::ZERO);
        while Instant::now() < switch_at {
            let id = format!("probe-{}", probe_jobs.len());
            let path = format!("/v1/jobs/{id}");
            let put = node
                .request(Method::PUT, &path)
                .json(&herd_job(&url, JOBS + probe_jobs.len()));
            let started = Instant::now();
            let r = tokio::time::timeout(PROBE_BOUND, node.send_once(put))
                .await
                .unwrap_or_else(|_| {
                    panic!("PUT {path} did not answer within {PROBE_BOUND:?} during the overload")
                });
            worst_put = worst_put.max(started.elapsed());
            assert_eq!(r.status, 201, "PUT during the overload: {r}");
            probe_jobs.push((id, parse_ms(r.json["next_fire_at"].as_str().unwrap())));
            let get = node.request(Method::GET, &path);
            worst_get = worst_get.max(probe(&node, get, 200, &format!("GET {path}")).await);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        (probe_jobs, worst_put, worst_get)
    };
    let ((herd, register_took), (readyz_probes, worst_readyz), (probe_jobs, worst_put, worst_get)) =
        tokio::join!(register, readiness, api);
    tokio::time::sleep_until(switch_at.into()).await;
    let first_fire: BTreeMap<String, i64> = herd.into_iter().chain(probe_jobs).collect();

    // The load drops: the receiver answers at once from now on.
    let t_switch = now_ms();
    rx.set_script(Script::always(200));
    let backlog = fires_due_by(&first_fire, t_switch) - rx.count() as i64;
    let figures = format!(
        "{JOBS} jobs registered in {register_took:?}; at the switch ({:?} after the start) \
         {backlog} fires were due and not delivered; liveness during the overload: \
         {readyz_probes} readyz probes (worst {worst_readyz:?}), {} PUT+GET probes \
         (worst PUT {worst_put:?}, worst GET {worst_get:?})",
        test_started.elapsed(),
        first_fire.len() - JOBS,
    );
    println!("{figures}");
    assert!(
        backlog >= MIN_BACKLOG,
        "the node was not overloaded (backlog < {MIN_BACKLOG}): {figures}"
    );

    // The backlog drains: some second after the switch has every job's fire delivered
    // within 1 s of its time.
    let mut drained_at = None;
    let drained = poll_every(Duration::from_millis(500), DRAIN_BOUND, || {
        let mut on_time: HashMap<i64, usize> = HashMap::new();
        for r in rx.requests() {
            let at = r.scheduled_ms();
            if at > t_switch && r.at_ms - at <= 1000 {
                *on_time.entry(at).or_default() += 1;
            }
        }
        let jobs_at = |s: i64| first_fire.values().filter(|f| **f <= s).count();
        drained_at = on_time
            .iter()
            .filter(|(s, n)| **n >= jobs_at(**s))
            .map(|(s, _)| *s)
            .min();
        drained_at.is_some()
    })
    .await;
    let drain_took = Duration::from_millis((now_ms() - t_switch) as u64);
    let figures = match drained_at {
        Some(s) => format!(
            "{figures}; drained {drain_took:?} after the switch (first on-time second: {} ms \
             after the switch)",
            s - t_switch
        ),
        None => format!("{figures}; not drained {drain_took:?} after the switch"),
    };
    println!("{figures}");
    assert!(
        drained,
        "the backlog did not drain within {DRAIN_BOUND:?} of the load dropping \
         ({} callbacks received): {figures}",
        rx.count()
    );

    // Every scheduled second of every job up to the cutoff arrived exactly once.
    let cutoff = t_switch + CUTOFF_AFTER_SWITCH_MS;
    let expected = fires_due_by(&first_fire, cutoff);
    let complete = poll_every(Duration::from_millis(500), Duration::from_secs(20), || {
        let got: std::collections::HashSet<(String, i64)> = rx
            .requests()
            .iter()
            .filter(|r| r.scheduled_ms() <= cutoff)
            .map(|r| (r.job_id().to_string(), r.scheduled_ms()))
            .collect();
        got.len() as i64 >= expected
    })
    .await;
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in rx.requests() {
        by_key
            .entry(r.idempotency_key().to_string())
            .or_default()
            .push(r.at_ms);
    }
    let mut duplicates: Vec<String> = by_key
        .iter()
        .filter(|(_, arrivals)| arrivals.len() > 1)
        .map(|(k, arrivals)| format!("{k} ×{} (arrived at {arrivals:?})", arrivals.len()))
        .collect();
    duplicates.sort();
    let mut missing = Vec::new();
    let mut unexpected = Vec::new();
    for (id, first) in &first_fire {
        let mut t = *first;
        while t <= cutoff {
            if !by_key.contains_key(&format!("{id}@{t}")) {
                missing.push(format!("{id}@{t}"));
            }
            t += 1000;
        }
    }
    for r in rx.requests() {
        let (id, at) = (r.job_id(), r.scheduled_ms());
        let fits = first_fire
            .get(id)
            .is_some_and(|first| at >= *first && (at - first) % 1000 == 0);
        if !fits || r.idempotency_key() != format!("{id}@{at}") {
            unexpected.push(format!("{r:?}"));
        }
    }
    assert!(
        complete && missing.is_empty(),
        "{} of {expected} fires scheduled up to {CUTOFF_AFTER_SWITCH_MS} ms after the switch \
         never arrived, e.g. {:?}: {figures}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        duplicates.is_empty(),
        "{} fires arrived more than once (the receiver always answered 2xx, so each is a \
         duplicate dispatch), e.g. {:?}: {figures}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(10)]
    );
    assert!(
        unexpected.is_empty(),
        "{} callbacks for times their job never had, e.g. {:?}: {figures}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );

    // The log shows no lease trouble, no doubled fire, no panic, and stays readable.
    let logs = node.logs();
    for bad in ["lost slot leases", "fenced", "already recorded", "panicked"] {
        let hits: Vec<&String> = logs.iter().filter(|l| l.contains(bad)).collect();
        assert!(
            hits.is_empty(),
            "the node logged {:?} {} times, e.g. {:?}: {figures}",
            bad,
            hits.len(),
            &hits[..hits.len().min(5)]
        );
    }
    let warns: Vec<&String> = logs.iter().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warns.len() < MAX_WARN_LINES,
        "{} WARN lines (at most {MAX_WARN_LINES} keep a log readable), e.g. {:?}: {figures}",
        warns.len(),
        &warns[..warns.len().min(10)]
    );
    println!(
        "overload: {} callbacks checked, test took {:?}; {} WARN lines: {warns:#?}",
        by_key.len(),
        test_started.elapsed(),
        warns.len(),
    );
}
