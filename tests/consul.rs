//! `consul://` targets against the Consul HTTP API double: traffic spreads over the passing
//! instances, an instance that turns critical gets nothing once chime's blocking query has
//! returned, each node keeps one watch per service, and with every instance critical the
//! deliveries wait and retry until one passes again: none is lost.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::consul::ConsulDouble;
use common::grpc::{GrpcReceiver, GrpcScript};
use common::*;
use serde_json::json;

/// Three receivers answering 200, registered as passing instances `<service>-0..2`.
async fn three_instances(consul: &ConsulDouble, service: &str) -> Vec<Receiver> {
    let rxs: Vec<Receiver> =
        futures::future::join_all((0..3).map(|_| Receiver::start(Script::always(200)))).await;
    for (i, rx) in rxs.iter().enumerate() {
        consul.add_instance(service, &format!("{service}-{i}"), "127.0.0.1", rx.port());
    }
    rxs
}

/// Waits until chime has asked again after the service's index moved past `index`: from
/// then on every pick uses the new list.
async fn next_round(consul: &ConsulDouble, service: &str, index: u64) {
    let ok = wait_until(Duration::from_secs(10), async || {
        consul
            .recent_queries()
            .iter()
            .any(|q| q.service == service && q.index_value().is_some_and(|i| i >= index))
    })
    .await;
    assert!(ok, "chime re-queries {service} after index {index}");
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_spreads_and_a_critical_instance_gets_nothing_after_the_next_round() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    let rxs = three_instances(&consul, "web").await;
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    for j in 0..30 {
        let r = node
            .put(
                &format!("/v1/jobs/c-{j}"),
                &http_job("@every 1s", "consul://web/hook?src=chime"),
            )
            .await;
        assert_eq!(r.status, 201, "{r}");
    }
    assert_eq!(
        node.get("/v1/jobs/c-0").await.json["callback"]["http"]["url"],
        "consul://web/hook?src=chime"
    );
    let ok = wait_until(Duration::from_secs(15), async || {
        rxs.iter().map(Receiver::count).sum::<usize>() >= 150
    })
    .await;
    assert!(ok, "deliveries arrive");
    let counts: Vec<usize> = rxs.iter().map(Receiver::count).collect();
    let total: usize = counts.iter().sum();
    for c in &counts {
        assert!(
            *c * 100 >= total * 15,
            "spread over all three instances: {counts:?}"
        );
    }
    let r = &rxs[0].requests()[0];
    assert_eq!(r.path, "/hook");
    assert!(r.idempotency_key().starts_with("c-"), "{r:?}");

    // One shared watch per service, blocking with index and wait.
    assert_eq!(consul.max_concurrent_blocking("web"), 1);
    let qs = consul.recent_queries();
    assert!(
        qs.iter()
            .any(|q| q.index_value().is_some_and(|i| i > 0) && q.wait.is_some()),
        "{:?}",
        qs.iter().map(|q| &q.query).collect::<Vec<_>>()
    );
    assert!(
        qs.iter().all(|q| q.passing.is_some()),
        "asks for passing instances only"
    );

    consul.set_status("web", "web-1", "critical");
    next_round(&consul, "web", consul.index("web")).await;
    // Attempts picked just before the answer may still be on the wire.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rxs[1].count();
    let others_before = rxs[0].count() + rxs[2].count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rxs[1].count(),
        before,
        "the critical instance receives nothing"
    );
    assert!(
        rxs[0].count() + rxs[2].count() >= others_before + 60,
        "the others take its share"
    );

    // Consul failing for a while: the last known instances stay in use.
    consul.fail_next(3, 500);
    consul.touch("web");
    let during = rxs[0].count() + rxs[2].count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rxs[0].count() + rxs[2].count() >= during + 60,
        "deliveries go on while consul errs"
    );
    assert_eq!(rxs[1].count(), before);
    // It passes again: back in rotation after the next round.
    consul.set_status("web", "web-1", "passing");
    let ok = wait_until(Duration::from_secs(15), async || rxs[1].count() > before).await;
    assert!(ok, "a passing instance gets traffic again");
    let failed = node.get("/v1/executions?status=failed").await;
    assert!(
        failed.json["executions"].as_array().unwrap().is_empty(),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_instance_critical_deliveries_wait_and_none_is_lost() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    let rxs = three_instances(&consul, "api").await;
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    for j in 0..10 {
        let mut job = http_job("@every 1s", "consul://api/fire");
        job["retry"] =
            json!({"max_attempts": 20, "initial_backoff_ms": 200, "max_backoff_ms": 1000});
        assert_eq!(node.put(&format!("/v1/jobs/w-{j}"), &job).await.status, 201);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        consul.set_status("api", &format!("api-{i}"), "critical");
    }
    next_round(&consul, "api", consul.index("api")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = rxs.iter().map(Receiver::count).sum::<usize>();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rxs.iter().map(Receiver::count).sum::<usize>(),
        cut,
        "nothing to send to"
    );
    let waiting = node.get("/v1/executions?status=pending&limit=1000").await;
    assert!(
        !waiting.json["executions"].as_array().unwrap().is_empty(),
        "fires of the outage wait as pending deliveries: {waiting}"
    );
    consul.set_status("api", "api-2", "passing");
    let outage = outage.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for j in 0..10 {
        node.post(&format!("/v1/jobs/w-{j}/pause"), None).await;
    }

    let ok = wait_until(Duration::from_secs(30), async || {
        let r = node.get("/v1/executions?status=pending&limit=1000").await;
        r.json["executions"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(ok, "every delivery of the outage completes");
    let mut per_job: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for j in 0..10 {
        let id = format!("w-{j}");
        for e in node.executions(&id).await {
            assert_eq!(e["status"], "succeeded", "{e}");
            per_job
                .entry(id.clone())
                .or_default()
                .push(e["id"].as_str().unwrap().parse().unwrap());
        }
    }
    let delivered: std::collections::HashSet<String> = rxs
        .iter()
        .flat_map(Receiver::requests)
        .filter(|r| r.answered == 200)
        .map(|r| r.idempotency_key().to_string())
        .collect();
    for (id, mut times) in per_job {
        times.sort_unstable();
        assert!(times.len() >= 5, "{id}: {times:?}");
        for w in times.windows(2) {
            assert_eq!(
                w[1] - w[0],
                1000,
                "{id}: no scheduled second is missing: {times:?}"
            );
        }
        for t in times {
            assert!(
                delivered.contains(&format!("{id}@{t}")),
                "{id}@{t} reached a receiver"
            );
        }
    }
    eprintln!(
        "outage of {outage:?} survived; {} callbacks delivered",
        delivered.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_callbacks_balance_over_a_consul_service() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    let a = GrpcReceiver::start(GrpcScript::always(tonic::Code::Ok)).await;
    let b = GrpcReceiver::start(GrpcScript::always(tonic::Code::Ok)).await;
    consul.add_instance("billing", "billing-a", "127.0.0.1", a.port());
    consul.add_instance("billing", "billing-b", "127.0.0.1", b.port());
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    for j in 0..10 {
        let job = json!({
            "schedule": "@every 1s",
            "callback": {"grpc": {"target": "consul://billing", "timeout_ms": 2000}},
        });
        assert_eq!(node.put(&format!("/v1/jobs/g-{j}"), &job).await.status, 201);
    }
    let ok = wait_until(Duration::from_secs(15), async || {
        a.count() + b.count() >= 40
    })
    .await;
    assert!(ok, "gRPC deliveries arrive");
    assert!(
        a.count() >= 8 && b.count() >= 8,
        "both instances used: {} / {}",
        a.count(),
        b.count()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_instance_is_avoided_on_retry_and_then_ejected() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    // Consul still lists the bad one as passing: its own check has not noticed yet.
    let good = Receiver::start(Script::always(200)).await;
    let bad = Receiver::start(Script::always(503)).await;
    for (id, rx) in [("good", &good), ("bad", &bad)] {
        consul.add_instance("pay", id, "127.0.0.1", rx.port());
    }
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    for j in 0..10 {
        let mut job = http_job("@every 1s", "consul://pay/hook");
        job["retry"] = json!({"max_attempts": 5, "initial_backoff_ms": 100, "max_backoff_ms": 200});
        assert_eq!(node.put(&format!("/v1/jobs/p-{j}"), &job).await.status, 201);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let bad_reqs = bad.requests();
    assert!(!bad_reqs.is_empty(), "the bad instance was tried");
    // Every fire that failed on the bad instance was retried on the good one.
    let good_keys: std::collections::HashMap<String, Vec<u64>> =
        good.requests().iter().fold(Default::default(), |mut m, r| {
            m.entry(r.idempotency_key().to_string())
                .or_default()
                .push(r.attempt());
            m
        });
    for r in &bad_reqs {
        let next = good_keys.get(r.idempotency_key()).unwrap_or_else(|| {
            panic!(
                "{} failed on the bad instance and never reached the good one",
                r.idempotency_key()
            )
        });
        assert!(
            next.contains(&(r.attempt() + 1)),
            "the retry after {r:?} went to the other instance: {next:?}"
        );
    }
    // Three failures in a row eject it: 10 jobs a second would otherwise send it ~half.
    let seconds = 6;
    assert!(
        bad_reqs.len() < 10 * seconds / 4,
        "{} requests reached the failing instance in {seconds} s",
        bad_reqs.len()
    );
    let failed = node.get("/v1/executions?status=failed").await;
    assert!(
        failed.json["executions"].as_array().unwrap().is_empty(),
        "{failed}"
    );
}

/// A `consul://` service that never has an instance (a misspelt name) does not hold its
/// deliveries pending forever: they expire at the job's `retry.max_age_ms`.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_to_a_service_without_instances_expire() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    let mut job = http_job("@every 1s", "consul://no-such-service/hook");
    job["retry"] = serde_json::json!({"max_age_ms": 2000});
    let r = node.put("/v1/jobs/misspelt", &job).await;
    assert_eq!(r.status, 201, "{r}");
    let expired = wait_for(Duration::from_secs(20), async || {
        node.executions("misspelt").await.into_iter().find(|e| {
            e["status"] == "failed"
                && e["last_error"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("expired: "))
        })
    })
    .await;
    assert!(expired.is_some(), "{:?}", node.executions("misspelt").await);
}

/// Misspelt service names must not take every watch slot for good: a service that has had
/// no instance for a while gives its slot up, and a real service is resolved.
#[tokio::test(flavor = "multi_thread")]
async fn junk_services_do_not_starve_real_ones() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    let rx = Receiver::start(Script::always(200)).await;
    consul.add_instance("web", "web-1", "127.0.0.1", rx.port());
    let node = Chime::start(&db, "n1", &["--consul-addr", &consul.url()]).await;
    // More junk names than one node watches (64), each firing every second.
    for i in 0..70 {
        let r = node
            .put(
                &format!("/v1/jobs/junk-{i}"),
                &http_job("@every 1s", &format!("consul://junk-{i}/hook")),
            )
            .await;
        assert_eq!(r.status, 201, "{r}");
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let r = node
        .put("/v1/jobs/real", &http_job("@every 1s", "consul://web/hook"))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let delivered = wait_until(Duration::from_secs(20), async || {
        rx.requests().iter().any(|c| c.job_id() == "real")
    })
    .await;
    assert!(
        delivered,
        "the real service never got a callback: {:?}",
        node.executions("real").await.first()
    );
}

/// A delivery waiting for Consul's first answer about its service must not hold one of the
/// node's delivery permits: with a single permit and a wedged Consul, callbacks to a plain
/// URL still go out on time.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_consul_holds_no_node_permit() {
    let db = fresh_sqlite();
    let consul = ConsulDouble::start().await;
    consul.stall_next(1_000);
    let rx = Receiver::start(Script::always(200)).await;
    let node = Chime::start(
        &db,
        "n1",
        &[
            "--consul-addr",
            &consul.url(),
            "--delivery-concurrency",
            "1",
        ],
    )
    .await;
    let r = node
        .put(
            "/v1/jobs/wedged",
            &http_job("@every 1s", "consul://stalled/hook"),
        )
        .await;
    assert_eq!(r.status, 201, "{r}");
    let r = node
        .put("/v1/jobs/plain", &http_job("@every 1s", &rx.url()))
        .await;
    assert_eq!(r.status, 201, "{r}");
    tokio::time::sleep(Duration::from_secs(9)).await;
    let calls: Vec<Received> = rx
        .requests()
        .into_iter()
        .filter(|c| c.job_id() == "plain" && c.attempt() == 1)
        .collect();
    assert!(
        calls.len() >= 6,
        "{} callbacks in 9 s: {calls:?}",
        calls.len()
    );
    let worst = calls
        .iter()
        .map(|c| c.at_ms - c.scheduled_ms())
        .max()
        .unwrap_or(0);
    assert!(
        worst < 1000,
        "a plain callback waited {worst} ms behind the Consul lookup: {calls:?}"
    );
}
