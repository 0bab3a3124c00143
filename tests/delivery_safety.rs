//! Deliveries that must not be sent, and deliveries that must not be dropped: a deleted
//! job's queued callbacks, and an attempt whose stored number's reply was lost.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

common::backend_tests! {
    a_deleted_job_sends_nothing_after_the_answer,
    an_attempt_whose_stored_number_is_lost_is_still_delivered,
    a_fire_already_made_is_delivered_as_it_was_despite_replace_or_pause,
    a_delivery_older_than_its_max_age_expires_and_can_be_redriven,
    each_attempt_is_kept_on_the_execution,
}

/// Jobs fire every second at a target that fails until its circuit opens; their first
/// attempts wait behind the open circuit. They are deleted, then the target recovers:
/// nothing of the deleted jobs may arrive after the DELETE answered.
async fn a_deleted_job_sends_nothing_after_the_answer(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(500)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let ids: Vec<String> = (0..5).map(|i| format!("doomed-{i}")).collect();
    for id in &ids {
        let r = node
            .put(&format!("/v1/jobs/{id}"), &http_job("@every 1s", &rx.url()))
            .await;
        assert_eq!(r.status, 201, "{r}");
    }
    // Long enough for the circuit to open and for fires to queue behind it.
    let opened = wait_until(Duration::from_secs(20), async || {
        node.logs().iter().any(|l| l.contains("circuit opened"))
    })
    .await;
    assert!(opened, "the circuit never opened");
    // The log says why, and the gauge shows it at once (not at the next minute's sweep).
    let line = node
        .logs()
        .into_iter()
        .find(|l| l.contains("circuit opened"))
        .unwrap_or_default();
    assert!(line.contains("HTTP 500"), "names the failure: {line}");
    let gauge = node.get("/metrics").await.text;
    assert!(
        gauge.lines().any(|l| l == "chime_open_circuits 1"),
        "chime_open_circuits is live: {gauge}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut deleted_at = 0;
    for id in &ids {
        let r = node.delete(&format!("/v1/jobs/{id}")).await;
        assert_eq!(r.status, 204, "{r}");
        deleted_at = now_ms();
    }
    let r = node.get("/v1/executions?status=pending&limit=1000").await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json["executions"], serde_json::json!([]), "{r}");

    // The target recovers. A job created now on the same target proves the circuit closed
    // and the queue behind it drained.
    rx.set_script(Script::always(200));
    let r = node
        .put("/v1/jobs/canary", &http_job("@every 1s", &rx.url()))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let delivered = wait_until(Duration::from_secs(90), async || {
        rx.requests()
            .iter()
            .any(|c| c.job_id() == "canary" && c.answered == 200)
    })
    .await;
    assert!(delivered, "the canary was never delivered");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        node.logs().iter().any(|l| l.contains("circuit closed")),
        "the log says when the circuit closed"
    );
    let gauge = node.get("/metrics").await.text;
    assert!(
        gauge.lines().any(|l| l == "chime_open_circuits 0"),
        "chime_open_circuits is back to 0: {gauge}"
    );

    let doomed: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let late: Vec<Received> = rx
        .requests()
        .into_iter()
        .filter(|c| doomed.contains(c.job_id()) && c.at_ms > deleted_at)
        .collect();
    assert!(
        late.is_empty(),
        "{} callbacks of deleted jobs arrived after the DELETE answered, e.g. {:?}",
        late.len(),
        late.first()
    );
}

/// Storing attempt 2's number commits but its reply is lost (fault injection): the delivery
/// must still go out (with a later attempt number), not stay pending unsent.
async fn an_attempt_whose_stored_number_is_lost_is_still_delivered(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::first(&[503], 200)).await;
    let node = Chime::start_with_env(
        &db,
        "n1",
        &[],
        &[("CHIME_FAULTS", Some("lose_attempt_reply:1"))],
    )
    .await;
    let in_a_moment = rfc3339_ms(now_ms() + 1500);
    let mut job = http_job(&format!("@at {in_a_moment}"), &rx.url());
    job["retry"] = serde_json::json!({"initial_backoff_ms": 100, "max_backoff_ms": 200});
    let r = node.put("/v1/jobs/once", &job).await;
    assert_eq!(r.status, 201, "{r}");
    let done = wait_for(Duration::from_secs(30), async || {
        node.executions("once")
            .await
            .into_iter()
            .find(|e| e["status"] != "pending")
    })
    .await;
    let calls = rx.requests();
    assert!(
        node.logs()
            .iter()
            .any(|l| l.contains("reply to a stored attempt number is lost")),
        "the fault was injected"
    );
    let done = done.unwrap_or_else(|| panic!("the delivery stayed pending; callbacks: {calls:?}"));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(calls.len(), 2, "one failure, then one success: {calls:?}");
    assert!(
        calls[1].attempt() > 2,
        "the lost attempt number is not reused: {calls:?}"
    );
}

/// The documented choice: a replace or a pause changes what fires from now on, not fires
/// already made. A delivery retrying when the job is replaced or paused goes on, with the
/// payload and target it was fired with. (Only a delete cancels it.)
async fn a_fire_already_made_is_delivered_as_it_was_despite_replace_or_pause(backend: Backend) {
    let db = Db::fresh(backend).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let at = rfc3339_ms(now_ms() + 1500);
    let mut receivers = Vec::new();
    for id in ["replaced", "paused"] {
        let rx = Receiver::start(Script::first(&[503, 503], 200)).await;
        let mut job = http_job(&format!("@at {at}"), &rx.url());
        job["payload"] = serde_json::json!({"v": 1});
        job["retry"] = serde_json::json!({"initial_backoff_ms": 700, "max_backoff_ms": 700});
        let r = node.put(&format!("/v1/jobs/{id}"), &job).await;
        assert_eq!(r.status, 201, "{r}");
        receivers.push(rx);
    }
    // The first attempts have failed: the deliveries are retrying.
    let failing = wait_until(Duration::from_secs(10), async || {
        receivers.iter().all(|rx| rx.count() >= 1)
    })
    .await;
    assert!(failing, "the first attempts never came");
    let other = Receiver::start(Script::always(200)).await;
    let mut replacement = http_job("@at 2099-01-01T00:00:00Z", &other.url());
    replacement["payload"] = serde_json::json!({"v": 2});
    let r = node.put("/v1/jobs/replaced", &replacement).await;
    assert_eq!(r.status, 200, "{r}");
    let r = node.post("/v1/jobs/paused/pause", None).await;
    assert_eq!(r.status, 200, "{r}");

    for (id, rx) in ["replaced", "paused"].into_iter().zip(&receivers) {
        let done = wait_for(Duration::from_secs(20), async || {
            node.executions(id)
                .await
                .into_iter()
                .find(|e| e["status"] == "succeeded")
        })
        .await
        .unwrap_or_else(|| panic!("{id}: the retrying delivery was not completed"));
        assert_eq!(done["attempts"], 3, "{id}: {done}");
        let calls = rx.requests();
        assert_eq!(calls.len(), 3, "{id}: {calls:?}");
        assert!(
            calls
                .iter()
                .all(|c| c.body["payload"] == serde_json::json!({"v": 1})),
            "{id}: every attempt carries the payload it was fired with: {calls:?}"
        );
    }
    assert_eq!(other.count(), 0, "the replacement's target got nothing");
}

/// A target down for good must not pile up pending deliveries that all go out (stale) when
/// it recovers: past `retry.max_age_ms` a delivery ends `failed`, as expired, is listed
/// with the dead letters, and can be re-driven by hand.
async fn a_delivery_older_than_its_max_age_expires_and_can_be_redriven(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(503)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let mut job = http_job("@every 1s", &rx.url());
    job["retry"] = serde_json::json!({"max_age_ms": 500});
    let r = node.put("/v1/jobs/bounded", &job).await;
    let msg = r.assert_error(422);
    assert!(msg.starts_with("retry.max_age_ms: "), "{r}");
    job["retry"] =
        serde_json::json!({"max_age_ms": 3000, "initial_backoff_ms": 200, "max_backoff_ms": 400});
    let r = node.put("/v1/jobs/bounded", &job).await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.json["retry"]["max_age_ms"], 3000, "{r}");

    let expired = wait_for(Duration::from_secs(20), async || {
        node.executions("bounded").await.into_iter().find(|e| {
            e["status"] == "failed"
                && e["last_error"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("expired: "))
        })
    })
    .await
    .expect("a delivery expires");
    // Expiry keeps the backlog bounded: with one fire a second and a 3 s age limit, only
    // the last few seconds' fires are still pending.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pending = node
        .executions("bounded")
        .await
        .into_iter()
        .filter(|e| e["status"] == "pending")
        .count();
    assert!(pending <= 6, "{pending} deliveries still pending");
    let r = node.get("/v1/executions?status=failed&limit=1000").await;
    let listed = r.json["executions"].as_array().cloned().unwrap_or_default();
    assert!(
        listed.iter().any(|e| e["id"] == expired["id"]),
        "expired deliveries are listed with the dead letters: {r}"
    );

    // Re-driven by hand, it is sent (and does not expire again) once the target is back.
    let r = node
        .put("/v1/jobs/bounded", &{
            let mut paused = job.clone();
            paused["paused"] = serde_json::json!(true);
            paused
        })
        .await;
    assert_eq!(r.status, 200, "{r}");
    rx.set_script(Script::always(200));
    let id = expired["id"].as_str().unwrap();
    let r = node
        .post(&format!("/v1/jobs/bounded/executions/{id}/retry"), None)
        .await;
    assert_eq!(r.status, 202, "{r}");
    let delivered = wait_until(Duration::from_secs(15), async || {
        node.executions("bounded")
            .await
            .iter()
            .any(|e| e["id"] == id && e["status"] == "succeeded")
    })
    .await;
    assert!(delivered, "the re-driven delivery was not sent");
    let metrics = node.get("/metrics").await.text;
    assert!(
        metrics.contains("chime_delivery_attempts_total{outcome=\"expired\"}"),
        "expiry is counted"
    );
}

/// Why a delivery was retried stays visible after it succeeds: every attempt's time,
/// outcome, status and error are on the execution, and a success keeps `last_error`.
async fn each_attempt_is_kept_on_the_execution(backend: Backend) {
    let db = Db::fresh(backend).await;
    let flaky = Receiver::start(Script::first(&[503, 500], 200)).await;
    let fine = Receiver::start(Script::always(200)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let at = rfc3339_ms(now_ms() + 1500);
    let mut job = http_job(&format!("@at {at}"), &flaky.url());
    job["retry"] = serde_json::json!({"initial_backoff_ms": 100, "max_backoff_ms": 200});
    assert_eq!(node.put("/v1/jobs/flaky", &job).await.status, 201);
    let job = http_job(&format!("@at {at}"), &fine.url());
    assert_eq!(node.put("/v1/jobs/fine", &job).await.status, 201);

    let done = wait_for(Duration::from_secs(20), async || {
        node.executions("flaky")
            .await
            .into_iter()
            .find(|e| e["status"] == "succeeded")
    })
    .await
    .expect("the flaky delivery succeeds");
    let history = done["attempt_history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let summary: Vec<(u64, &str, u64)> = history
        .iter()
        .map(|h| {
            (
                h["attempt"].as_u64().unwrap_or(0),
                h["outcome"].as_str().unwrap_or(""),
                h["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "retrying", 503),
            (2, "retrying", 500),
            (3, "succeeded", 200)
        ],
        "{done}"
    );
    assert!(
        history[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{done}"
    );
    assert!(history.iter().all(|h| h["at"].as_str().is_some()), "{done}");
    assert!(
        done["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "a success keeps the last error: {done}"
    );

    let first = wait_for(Duration::from_secs(20), async || {
        node.executions("fine")
            .await
            .into_iter()
            .find(|e| e["status"] == "succeeded")
    })
    .await
    .expect("the fine delivery succeeds");
    let history = first["attempt_history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(history.len(), 1, "{first}");
    assert_eq!(history[0]["outcome"], "succeeded", "{first}");
    assert_eq!(history[0]["status"], 200, "{first}");
}
