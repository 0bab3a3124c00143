//! gRPC callbacks against a real tonic receiver: the request carries the contract's fields,
//! UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED and client-side deadlines are retried,
//! anything else fails at once, and the channel is reused across fires.

mod common;

use std::time::Duration;

use common::grpc::{GrpcReceiver, GrpcScript};
use common::*;
use serde_json::{Value, json};
use tonic::Code;

fn grpc_job(target: &str, timeout_ms: u64, max_attempts: u32) -> Value {
    json!({
        // Fired by trigger only: a far-future one-shot never fires on its own during a test.
        "schedule": "@at 2099-01-01T00:00:00Z",
        "callback": {"grpc": {"target": target, "timeout_ms": timeout_ms}},
        "payload": {"replicas": 12, "tier": "web"},
        "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 100, "max_backoff_ms": 200}
    })
}

/// Triggers `id` and waits until its execution is no longer pending.
async fn trigger_and_settle(node: &Chime, id: &str) -> Value {
    let t = node.post(&format!("/v1/jobs/{id}/trigger"), None).await;
    assert_eq!(t.status, 202, "{t}");
    let exec_id: i64 = t.json["execution_id"].as_str().unwrap().parse().unwrap();
    wait_for(Duration::from_secs(20), async || {
        node.execution(id, exec_id)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .unwrap_or_else(|| panic!("execution {exec_id} of {id} settles"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fire_arrives_as_a_grpc_call_with_the_contract_fields() {
    let db = fresh_sqlite();
    let rx = GrpcReceiver::start(GrpcScript::always(Code::Ok)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let r = node
        .put("/v1/jobs/scale-web", &grpc_job(&rx.target(), 2500, 3))
        .await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(
        r.json["callback"]["grpc"]["target"],
        rx.target(),
        "the job reads back as written"
    );

    let e = trigger_and_settle(&node, "scale-web").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["attempts"], 1);
    let got = rx.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = &got[0].req;
    let exec_id: i64 = e["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(req.job_id, "scale-web");
    assert_eq!(req.scheduled_at_ms, exec_id);
    assert!(req.fired_at_ms >= req.scheduled_at_ms);
    assert_eq!(req.attempt, 1);
    assert_eq!(req.idempotency_key, format!("scale-web@{exec_id}"));
    let payload: Value = serde_json::from_str(&req.payload_json).unwrap();
    assert_eq!(payload, json!({"replicas": 12, "tier": "web"}));
    // The per-job deadline travels as grpc-timeout (e.g. "2500m" or "2500000u").
    let timeout = got[0]
        .grpc_timeout
        .as_deref()
        .expect("grpc-timeout is sent");
    assert!(
        timeout.ends_with('m') || timeout.ends_with('u'),
        "{timeout}"
    );

    // More fires reuse the channel: all arrive over the one connection.
    for _ in 0..5 {
        trigger_and_settle(&node, "scale-web").await;
    }
    let got = rx.requests();
    assert_eq!(got.len(), 6);
    let peers: std::collections::BTreeSet<_> = got.iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 1, "one connection for all fires: {peers:?}");
    assert!(
        got[0].peer.is_some(),
        "the receiver sees the client's address"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_codes_are_retried_with_backoff_until_ok() {
    let db = fresh_sqlite();
    let rx = GrpcReceiver::start(GrpcScript::first(
        &[
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ],
        Code::Ok,
    ))
    .await;
    let node = Chime::start(&db, "n1", &[]).await;
    assert_eq!(
        node.put("/v1/jobs/flaky", &grpc_job(&rx.target(), 2000, 5))
            .await
            .status,
        201
    );
    let e = trigger_and_settle(&node, "flaky").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["attempts"], 4);
    let got = rx.requests();
    let attempts: Vec<u32> = got.iter().map(|r| r.req.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4], "{got:?}");
    assert!(
        got.iter()
            .all(|r| r.req.idempotency_key == got[0].req.idempotency_key),
        "every attempt of one fire carries the same key"
    );
    for pair in got.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(
            gap >= 50,
            "retries wait for the backoff (equal jitter of 100-200 ms): {gap} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_past_the_deadline_is_retried() {
    let db = fresh_sqlite();
    let rx =
        GrpcReceiver::start(GrpcScript::always(Code::Ok).delayed(Duration::from_secs(3))).await;
    let node = Chime::start(&db, "n1", &[]).await;
    assert_eq!(
        node.put("/v1/jobs/slow", &grpc_job(&rx.target(), 300, 5))
            .await
            .status,
        201
    );
    let t = node.post("/v1/jobs/slow/trigger", None).await;
    let exec_id: i64 = t.json["execution_id"].as_str().unwrap().parse().unwrap();
    // The first attempt is cut off at its 300 ms deadline and scheduled again.
    let e = wait_for(Duration::from_secs(10), async || {
        node.execution("slow", exec_id)
            .await
            .filter(|e| e["last_error"].as_str().is_some())
    })
    .await
    .expect("the timed-out attempt is recorded");
    assert_eq!(e["status"], "pending", "{e}");
    assert!(
        e["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{e}"
    );
    rx.set_script(GrpcScript::always(Code::Ok));
    let e = wait_for(Duration::from_secs(10), async || {
        node.execution("slow", exec_id)
            .await
            .filter(|e| e["status"] == "succeeded")
    })
    .await
    .expect("a later attempt within the deadline succeeds");
    assert!(e["attempts"].as_u64().unwrap() >= 2, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn other_codes_fail_at_once_and_a_dead_receiver_is_retried() {
    let db = fresh_sqlite();
    let rx = GrpcReceiver::start(GrpcScript::always(Code::InvalidArgument)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    assert_eq!(
        node.put("/v1/jobs/rejected", &grpc_job(&rx.target(), 1000, 5))
            .await
            .status,
        201
    );
    let e = trigger_and_settle(&node, "rejected").await;
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["attempts"], 1, "INVALID_ARGUMENT is not retried");
    assert!(
        e["last_error"]
            .as_str()
            .unwrap()
            .contains("InvalidArgument"),
        "{e}"
    );
    assert_eq!(rx.count(), 1);

    // Nothing listening: connection refused is UNAVAILABLE, retried until attempts run out.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    assert_eq!(
        node.put(
            "/v1/jobs/nobody",
            &grpc_job(&format!("http://127.0.0.1:{port}"), 1000, 3)
        )
        .await
        .status,
        201
    );
    let e = trigger_and_settle(&node, "nobody").await;
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["attempts"], 3, "{e}");
    assert!(
        e["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_grpc_targets_are_rejected_and_nothing_is_stored() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    for (target, needle) in [
        ("localhost:50051", "scheme"),
        ("http://h:1/chime.v1.CallbackService/Fire", "no path"),
        ("http://169.254.169.254:80", "refused network"),
        ("consul://billing", "--consul-addr"),
    ] {
        let r = node.put("/v1/jobs/bad", &grpc_job(target, 1000, 1)).await;
        let msg = r.assert_error(422);
        assert!(msg.contains("callback.grpc.target"), "{target}: {msg}");
        assert!(msg.contains(needle), "{target}: {msg}");
    }
    assert_eq!(node.get("/v1/jobs/bad").await.status, 404);
}
