//! Two controllers editing one job must not silently overwrite each other: every job has a
//! version (its `ETag`), writes honour `If-Match` / `If-None-Match`, and `PATCH` applies a
//! JSON merge patch on the current version.

mod common;

use axum::http::Method;
use serde_json::{Value, json};

use common::*;

common::backend_tests! {
    writes_carry_a_version_and_honour_if_match,
    patch_merges_and_concurrent_patches_all_land,
}

const URL: &str = "http://127.0.0.1:9/hook";

async fn put_if(node: &Chime, id: &str, body: &Value, header: (&str, &str)) -> Reply {
    let rb = node
        .request(Method::PUT, &format!("/v1/jobs/{id}"))
        .header(header.0, header.1)
        .json(body);
    node.send(rb).await
}

async fn patch(node: &Chime, id: &str, body: &Value, if_match: Option<&str>) -> Reply {
    let mut rb = node
        .request(Method::PATCH, &format!("/v1/jobs/{id}"))
        .header("content-type", "application/merge-patch+json")
        .body(body.to_string());
    if let Some(tag) = if_match {
        rb = rb.header("if-match", tag);
    }
    node.send(rb).await
}

async fn writes_carry_a_version_and_honour_if_match(backend: Backend) {
    let db = Db::fresh(backend).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let mut v1 = http_job("@hourly", URL);
    v1["payload"] = json!({"replicas": 1});
    let r = node.put("/v1/jobs/a", &v1).await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.header("etag"), Some("\"1\""), "{r}");
    assert_eq!(r.json["version"], 1, "{r}");
    let g = node.get("/v1/jobs/a").await;
    assert_eq!(g.header("etag"), Some("\"1\""), "{g}");

    // The first controller writes at version 1...
    let mut v2 = v1.clone();
    v2["payload"] = json!({"replicas": 2});
    let r = put_if(&node, "a", &v2, ("if-match", "\"1\"")).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.header("etag"), Some("\"2\""), "{r}");
    // ...the second, also from version 1, is refused and changes nothing.
    let mut v3 = v1.clone();
    v3["payload"] = json!({"replicas": 3});
    let r = put_if(&node, "a", &v3, ("if-match", "\"1\"")).await;
    let msg = r.assert_error(412);
    assert!(msg.contains("\"2\""), "names the current version: {r}");
    let r = patch(
        &node,
        "a",
        &json!({"payload": {"replicas": 4}}),
        Some("\"1\""),
    )
    .await;
    r.assert_error(412);
    let r = node
        .send(
            node.request(Method::DELETE, "/v1/jobs/a")
                .header("if-match", "\"1\""),
        )
        .await;
    r.assert_error(412);
    let g = node.get("/v1/jobs/a").await;
    assert_eq!(g.json["payload"], json!({"replicas": 2}), "{g}");
    assert_eq!(g.header("etag"), Some("\"2\""), "{g}");

    // Create-only: refused over an existing job, accepted for a new one.
    let r = put_if(&node, "a", &v3, ("if-none-match", "*")).await;
    r.assert_error(412);
    let r = put_if(&node, "b", &v3, ("if-none-match", "*")).await;
    assert_eq!(r.status, 201, "{r}");
    // If-Match on a job that does not exist.
    let r = put_if(&node, "c", &v3, ("if-match", "*")).await;
    r.assert_error(412);
    assert_eq!(node.get("/v1/jobs/c").await.status, 404);
    // A tag this API never gives out is a client error, not a mismatch.
    let r = put_if(&node, "a", &v3, ("if-match", "W/\"x\"")).await;
    r.assert_error(400);

    // Pause and resume are writes too: they bump the version.
    let r = node.post("/v1/jobs/a/pause", None).await;
    assert_eq!(r.header("etag"), Some("\"3\""), "{r}");
    let r = node
        .send(
            node.request(Method::DELETE, "/v1/jobs/a")
                .header("if-match", "\"3\""),
        )
        .await;
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(node.get("/v1/jobs/a").await.status, 404);
}

async fn patch_merges_and_concurrent_patches_all_land(backend: Backend) {
    let db = Db::fresh(backend).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let mut job = http_job("@hourly", URL);
    job["payload"] = json!({"a": 1});
    job["callback"]["http"]["headers"] = json!({"X-Team": "web"});
    job["retry"] = json!({"max_attempts": 7, "initial_backoff_ms": 500});
    assert_eq!(node.put("/v1/jobs/p", &job).await.status, 201);

    let r = patch(
        &node,
        "p",
        &json!({"payload": {"b": 2}, "retry": {"max_attempts": 3}}),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.json["payload"],
        json!({"a": 1, "b": 2}),
        "objects merge: {r}"
    );
    assert_eq!(r.json["retry"]["max_attempts"], 3, "{r}");
    assert_eq!(
        r.json["retry"]["initial_backoff_ms"], 500,
        "untouched fields stay: {r}"
    );
    assert_eq!(
        r.json["callback"]["http"]["headers"],
        json!({"X-Team": "web"}),
        "{r}"
    );
    assert_eq!(r.header("etag"), Some("\"2\""), "{r}");

    // null removes; switching transports takes the old one out.
    let r = patch(
        &node,
        "p",
        &json!({"callback": {"http": null, "grpc": {"target": "http://127.0.0.1:9"}}}),
        Some("\"2\""),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    assert!(r.json["callback"]["http"].is_null(), "{r}");
    assert_eq!(
        r.json["callback"]["grpc"]["target"], "http://127.0.0.1:9",
        "{r}"
    );

    // A bad result is refused naming the field, and nothing changes.
    let r = patch(&node, "p", &json!({"schedule": "* * *"}), None).await;
    let msg = r.assert_error(422);
    assert!(msg.starts_with("schedule: "), "{r}");
    let r = patch(&node, "p", &json!({"shedule": "@daily"}), None).await;
    r.assert_error(422);
    let g = node.get("/v1/jobs/p").await;
    assert_eq!(g.json["schedule"], "@hourly", "{g}");
    assert_eq!(g.header("etag"), Some("\"3\""), "{g}");

    let r = patch(&node, "p", &json!({"paused": true}), None).await;
    assert_eq!(r.json["paused"], true, "{r}");
    let r = patch(&node, "missing", &json!({"paused": true}), None).await;
    r.assert_error(404);
    // A patch is JSON too.
    let rb = node
        .request(Method::PATCH, "/v1/jobs/p")
        .header("content-type", "text/plain")
        .body("{}");
    node.send(rb).await.assert_error(415);

    // Ten controllers patch different keys at once: none of them is lost.
    let patches = (0..10).map(|i| {
        let node = &node;
        async move {
            let key = format!("k{i}");
            patch(node, "p", &json!({"payload": {key: i}}), None).await
        }
    });
    for r in futures::future::join_all(patches).await {
        assert_eq!(r.status, 200, "{r}");
    }
    let g = node.get("/v1/jobs/p").await;
    for i in 0..10 {
        assert_eq!(
            g.json["payload"][format!("k{i}")],
            i,
            "patch {i} was lost: {g}"
        );
    }
    assert_eq!(g.json["payload"]["a"], 1, "{g}");
}
