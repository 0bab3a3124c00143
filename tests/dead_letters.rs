//! Deliveries that used up their attempts are listed cluster-wide and can be re-driven.

mod common;

use std::time::Duration;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

#[tokio::test(flavor = "multi_thread")]
async fn failed_deliveries_are_listed_with_paging() {
    let db = fresh_sqlite();
    let bad = Receiver::start(Script::always(404)).await;
    let good = Receiver::start(Script::always(200)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    for id in ["dl-1", "dl-2", "dl-3"] {
        assert_eq!(
            node.put(
                &format!("/v1/jobs/{id}"),
                &http_job("@every 1s", &bad.url())
            )
            .await
            .status,
            201
        );
    }
    assert_eq!(
        node.put("/v1/jobs/fine", &http_job("@every 1s", &good.url()))
            .await
            .status,
        201
    );

    let listed = wait_for(Duration::from_secs(10), async || {
        let r = node.get("/v1/executions?status=failed&limit=1000").await;
        let list = r.json["executions"].as_array().cloned().unwrap_or_default();
        let jobs: std::collections::BTreeSet<String> = list
            .iter()
            .map(|e| e["job_id"].as_str().unwrap().to_string())
            .collect();
        (jobs.len() == 3).then_some(list)
    })
    .await
    .expect("all three failing jobs are listed");
    assert!(
        listed
            .iter()
            .all(|e| e["status"] == "failed" && e["response_status"] == 404)
    );
    assert!(
        listed.iter().all(|e| e["job_id"] != "fine"),
        "succeeded deliveries are not dead letters"
    );

    // Paging walks the same rows, newest first, without repeats.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = node
            .get(&format!(
                "/v1/executions?status=failed&limit=2&cursor={cursor}"
            ))
            .await;
        assert_eq!(r.status, 200, "{r}");
        for e in r.json["executions"].as_array().unwrap() {
            seen.push((
                e["scheduled_at"].as_str().unwrap().to_string(),
                e["job_id"].as_str().unwrap().to_string(),
            ));
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    assert_eq!(seen, sorted, "newest first");
    sorted.dedup();
    assert_eq!(seen.len(), sorted.len(), "no row twice");
    assert!(seen.len() >= 3);

    node.get("/v1/executions").await.assert_error(422);
    node.get("/v1/executions?status=lost")
        .await
        .assert_error(422);
    node.get("/v1/executions?status=failed&cursor=garbage")
        .await
        .assert_error(422);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_redriven_end_to_end_and_signed() {
    let db = fresh_sqlite();
    let rx = Receiver::start(Script::always(500)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let job = json!({
        // Fired by trigger only.
        "schedule": "@at 2099-01-01T00:00:00Z",
        "callback": {"http": {"url": rx.url()}},
        "payload": {"replicas": 3},
        "retry": {"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100},
        "secret": "whsec-redrive"
    });
    assert_eq!(node.put("/v1/jobs/dl", &job).await.status, 201);
    let t = node.post("/v1/jobs/dl/trigger", None).await;
    assert_eq!(t.status, 202, "{t}");
    let exec_id = t.json["execution_id"].as_str().unwrap().to_string();
    let scheduled: i64 = exec_id.parse().unwrap();

    let dead = wait_for(Duration::from_secs(10), async || {
        node.execution("dl", scheduled)
            .await
            .filter(|e| e["status"] == "failed")
    })
    .await
    .expect("the delivery uses up its 2 attempts");
    assert_eq!(dead["attempts"], 2, "{dead}");
    let listed = node.get("/v1/executions?status=failed").await;
    assert!(
        listed.json["executions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["job_id"] == "dl" && e["id"] == exec_id.as_str()),
        "{listed}"
    );

    // Wrong ids get clear errors and change nothing.
    node.post("/v1/jobs/dl/executions/not-a-time/retry", None)
        .await
        .assert_error(400);
    node.post("/v1/jobs/dl/executions/12345/retry", None)
        .await
        .assert_error(404);
    node.post(&format!("/v1/jobs/nope/executions/{exec_id}/retry"), None)
        .await
        .assert_error(404);
    assert_eq!(rx.count(), 2);

    // The receiver is fixed; the dead letter is re-driven with a fresh budget.
    rx.set_script(Script::always(200));
    let r = node
        .post(&format!("/v1/jobs/dl/executions/{exec_id}/retry"), None)
        .await;
    assert_eq!(r.status, 202, "{r}");
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["attempts"], 2);
    assert_eq!(r.json["attempt_limit"], 4);
    let done = wait_for(Duration::from_secs(10), async || {
        node.execution("dl", scheduled)
            .await
            .filter(|e| e["status"] == "succeeded")
    })
    .await
    .expect("the re-driven delivery succeeds");
    assert_eq!(done["attempts"], 3, "attempt numbers go on: {done}");
    let got = rx.requests();
    assert_eq!(got.len(), 3, "{got:?}");
    let last = &got[2];
    assert_eq!(last.attempt(), 3);
    assert_eq!(last.attempt_header(), 3);
    assert_eq!(last.idempotency_key(), format!("dl@{exec_id}"));
    assert_eq!(last.body["payload"], json!({"replicas": 3}));
    // Verified as a receiver would, with the hmac crate.
    let ts = last.header("x-chime-timestamp").expect("signed");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec-redrive").unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(&last.raw);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(last.header("x-chime-signature"), Some(want.as_str()));

    // Delivered: no longer a dead letter, and not re-drivable again.
    let listed = node.get("/v1/executions?status=failed").await;
    assert!(
        listed.json["executions"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    node.post(&format!("/v1/jobs/dl/executions/{exec_id}/retry"), None)
        .await
        .assert_error(409);
}
