//! One bad downstream must not hold up anyone else: a target that hangs gets at most its own
//! share of the node's delivery capacity, and a failing target's circuit breaker defers its
//! deliveries without using up their attempts.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn p99(mut v: Vec<i64>) -> i64 {
    assert!(!v.is_empty());
    v.sort_unstable();
    v[(v.len() * 99).div_ceil(100) - 1]
}

/// Delays (arrival - scheduled time) of first attempts scheduled in `[from, to)`.
fn delays(rx: &Receiver, from: i64, to: i64) -> Vec<i64> {
    rx.requests()
        .iter()
        .filter(|r| r.attempt() == 1 && (from..to).contains(&r.scheduled_ms()))
        .map(|r| r.at_ms - r.scheduled_ms())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_target_does_not_delay_other_jobs() {
    let db = fresh_sqlite();
    let good = Receiver::start(Script::always(200)).await;
    let hang = Receiver::start(Script::always(200).delayed(Duration::from_secs(120))).await;
    // A node-wide limit the hanging target alone could fill within a second.
    let node = Chime::start(
        &db,
        "n1",
        &[
            "--delivery-concurrency",
            "16",
            "--delivery-per-target-concurrency",
            "4",
        ],
    )
    .await;
    for i in 0..100 {
        let r = node
            .put(
                &format!("/v1/jobs/good-{i}"),
                &http_job("@every 1s", &good.url()),
            )
            .await;
        assert_eq!(r.status, 201, "{r}");
    }
    // Baseline: the normal delay of these jobs on this machine, now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base_from = now_ms();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let base_to = now_ms();
    let baseline = delays(&good, base_from, base_to);
    assert!(
        baseline.len() >= 400,
        "100 jobs fire every second: {}",
        baseline.len()
    );
    let base_p99 = p99(baseline);

    for i in 0..20 {
        let mut job = http_job("@every 1s", &hang.url());
        job["callback"]["http"]["timeout_ms"] = json!(60_000);
        let r = node.put(&format!("/v1/jobs/hang-{i}"), &job).await;
        assert_eq!(r.status, 201, "{r}");
    }
    let hang_from = now_ms() + 1000;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let hang_to = now_ms() - 500;
    let during = delays(&good, hang_from, hang_to);
    assert!(
        during.len() >= 600,
        "every good job keeps firing every second while the other target hangs: {} fires",
        during.len()
    );
    let during_p99 = p99(during);
    let hung = hang.count();
    eprintln!(
        "good jobs' delay p99: {base_p99} ms before, {during_p99} ms while 20 jobs' target hangs; \
         requests held by the hanging target: {hung}"
    );
    assert!(
        during_p99 <= base_p99 + 100,
        "delay p99 rose from {base_p99} ms to {during_p99} ms while another target hung"
    );
    assert!(
        (1..=4).contains(&hung),
        "the hanging target holds at most its 4 permits, got {hung} requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_circuit_defers_deliveries_without_spending_their_attempts() {
    let db = fresh_sqlite();
    let rx = Receiver::start(Script::always(503)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    for i in 0..10 {
        let mut job = http_job("@every 1s", &rx.url());
        job["retry"] = json!({"max_attempts": 4, "initial_backoff_ms": 100, "max_backoff_ms": 200});
        let r = node.put(&format!("/v1/jobs/cb-{i}"), &job).await;
        assert_eq!(r.status, 201, "{r}");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failing_requests = rx.count();
    rx.set_script(Script::always(200));
    let stop_at = now_ms();
    for i in 0..10 {
        node.post(&format!("/v1/jobs/cb-{i}/pause"), None).await;
    }

    // Every fire of the failing period is delivered in the end: deferral cost no attempts.
    let ok = wait_until(Duration::from_secs(30), async || {
        let mut all = true;
        for i in 0..10 {
            let execs = node.executions(&format!("cb-{i}")).await;
            all &= execs.iter().all(|e| e["status"] == "succeeded");
        }
        all
    })
    .await;
    let mut summary = Vec::new();
    for i in 0..10 {
        for e in node.executions(&format!("cb-{i}")).await {
            summary.push(format!("{} {} {}", e["job_id"], e["status"], e["attempts"]));
        }
    }
    assert!(
        ok,
        "all deliveries succeed after the target recovers: {summary:?}"
    );
    let fires = summary.len();
    assert!(fires >= 30, "10 jobs fired for ~4 s: {fires}");
    // Without the breaker each fire would have been tried 4 times (100-200 ms apart).
    assert!(
        failing_requests < fires * 2,
        "{failing_requests} requests reached the failing target for {fires} fires"
    );
    let metrics = node.get("/metrics").await.text;
    let deferred: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chime_deliveries_deferred_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the deferral counter is exported");
    assert!(deferred > 0.0, "{metrics}");
    eprintln!(
        "{fires} fires, {failing_requests} requests while failing, {deferred} deferrals, \
         recovered {} ms after the target did",
        now_ms() - stop_at
    );
}
