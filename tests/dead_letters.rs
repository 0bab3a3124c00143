//! Deliveries that used up their attempts are listed cluster-wide.

mod common;

use std::time::Duration;

use common::*;

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
