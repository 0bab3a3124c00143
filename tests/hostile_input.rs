//! Hostile and malformed requests against the real binary: every rejection is the contract's
//! JSON error, nothing is stored, and no client can hold a connection open.
//!
//! These are API-layer checks, identical on both backends, so they run on SQLite only.

mod common;

use std::time::{Duration, Instant};

use axum::http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

const URL: &str = "http://127.0.0.1:9/hook";

/// A write whose body is not declared JSON is refused (415) and stores nothing: a web page
/// can send a `text/plain` POST without a CORS preflight, so accepting one would let any
/// site a user visits create jobs on an unauthenticated node.
#[tokio::test(flavor = "multi_thread")]
async fn writes_require_a_json_content_type() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    let body = http_job("@hourly", URL).to_string();
    for (method, path, ctype) in [
        (Method::POST, "/v1/jobs", Some("text/plain")),
        (
            Method::PUT,
            "/v1/jobs/plain",
            Some("text/plain;charset=UTF-8"),
        ),
        (
            Method::PUT,
            "/v1/jobs/form",
            Some("application/x-www-form-urlencoded"),
        ),
        (
            Method::PUT,
            "/v1/jobs/multipart",
            Some("multipart/form-data; boundary=x"),
        ),
        (Method::PUT, "/v1/jobs/none", None),
        (Method::PUT, "/v1/jobs/jsonish", Some("application/jsonx")),
    ] {
        let mut rb = node.request(method.clone(), path).body(body.clone());
        if let Some(c) = ctype {
            rb = rb.header("content-type", c);
        }
        let r = node.send(rb).await;
        let msg = r.assert_error(415);
        assert!(
            msg.contains("application/json"),
            "{method} {path} with {ctype:?}: the message says what to send: {r}"
        );
    }
    assert!(node.job_ids().await.is_empty(), "nothing was stored");

    // Parameters and case do not matter; a JSON body with a JSON type is accepted.
    let rb = node
        .request(Method::PUT, "/v1/jobs/ok")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(body.clone());
    let r = node.send(rb).await;
    assert_eq!(r.status, 201, "{r}");
    // Body-less actions need no content type.
    let r = node.post("/v1/jobs/ok/pause", None).await;
    assert_eq!(r.status, 200, "{r}");
}

/// A browser sends `Origin` on every cross-origin write; chime serves no cross-origin
/// clients, so such writes are refused even when they carry no body (pause, trigger).
#[tokio::test(flavor = "multi_thread")]
async fn cross_origin_browser_writes_are_refused() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    let r = node.put("/v1/jobs/a", &http_job("@hourly", URL)).await;
    assert_eq!(r.status, 201, "{r}");
    for (method, path) in [
        (Method::POST, "/v1/jobs/a/trigger"),
        (Method::POST, "/v1/jobs/a/pause"),
        (Method::DELETE, "/v1/jobs/a"),
    ] {
        let rb = node
            .request(method.clone(), path)
            .header("origin", "https://evil.example");
        let r = node.send(rb).await;
        let msg = r.assert_error(403);
        assert!(msg.contains("https://evil.example"), "{method} {path}: {r}");
    }
    let g = node.get("/v1/jobs/a").await;
    assert_eq!(g.status, 200, "{g}");
    assert_eq!(
        g.json["paused"], false,
        "the refused pause changed nothing: {g}"
    );

    // The same origin (a page served by the node itself) is allowed.
    let same = format!("http://{}", node.addr);
    let rb = node
        .request(Method::POST, "/v1/jobs/a/pause")
        .header("origin", same);
    let r = node.send(rb).await;
    assert_eq!(r.status, 200, "{r}");
    // Reads are not writes: a cross-origin GET is answered (browsers keep the answer from
    // the page unless CORS allows it).
    let rb = node
        .request(Method::GET, "/v1/jobs/a")
        .header("origin", "https://evil.example");
    assert_eq!(node.send(rb).await.status, 200);
}

/// Percent-escapes that do not decode to UTF-8 get the contract's JSON error, not the
/// framework's plain-text rejection.
#[tokio::test(flavor = "multi_thread")]
async fn undecodable_path_escapes_get_the_json_error() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    let body = http_job("@hourly", URL);
    for bad in ["%FF", "%C0%AF", "%ED%A0%80"] {
        let r = node.put(&format!("/v1/jobs/{bad}"), &body).await;
        let msg = r.assert_error(400);
        assert!(
            msg.contains("path"),
            "{bad}: the message names the path: {r}"
        );
        for (method, path) in [
            (Method::GET, format!("/v1/jobs/{bad}")),
            (Method::DELETE, format!("/v1/jobs/{bad}")),
            (Method::POST, format!("/v1/jobs/{bad}/trigger")),
            (Method::GET, format!("/v1/jobs/{bad}/executions")),
            (Method::POST, format!("/v1/jobs/a/executions/{bad}/retry")),
        ] {
            let r = node.send(node.request(method, &path)).await;
            r.assert_error(400);
        }
    }
    assert!(node.job_ids().await.is_empty());
}

/// Sends raw bytes on a new connection and reads until the server closes it or `limit`
/// passes; returns what was read and how long it took.
async fn raw_exchange(node: &Chime, request: &[u8], limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(node.addr.as_str())
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // One response is all we wait for.
                let text = String::from_utf8_lossy(&out);
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if out.len() >= head_end + 4 + len {
                        break;
                    }
                }
            }
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// A body declared larger than the limit is refused from the header (413, JSON) without
/// waiting for bytes that will never come.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_declared_body_is_refused_from_the_header() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--max-body-bytes", "4096"]).await;
    for (path, declared) in [
        ("/v1/jobs/big", "10000000000"),
        ("/v1/jobs/big", "4097"),
        ("/v1/jobs", "4097"),
    ] {
        let method = if path == "/v1/jobs" { "POST" } else { "PUT" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {declared}\r\n\r\n{{\"schedule\""
        );
        let (resp, took) = raw_exchange(&node, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            resp.starts_with("HTTP/1.1 413"),
            "{method} {path} with Content-Length {declared}: answered 413 from the header, \
             got {resp:?} after {took:?}"
        );
        assert!(
            resp.contains("payload_too_large"),
            "JSON error body: {resp}"
        );
        assert!(took < Duration::from_secs(1), "answered at once: {took:?}");
    }
    assert!(node.job_ids().await.is_empty());
}

/// A client that stops sending headers or body is cut off after `--request-read-timeout`,
/// so idle clients cannot hold connections (and request tasks) open.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_requests_are_cut_off() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--request-read-timeout", "1500ms"]).await;
    // A body that stops half-way: answered 408 (JSON) once the deadline passes.
    let req = "PUT /v1/jobs/slow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
               content-length: 100\r\n\r\n{\"schedule\"";
    let (resp, took) = raw_exchange(&node, req.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "a stalled body is cut off at the deadline: {took:?} {resp:?}"
    );
    assert!(resp.starts_with("HTTP/1.1 408"), "answered 408: {resp:?}");
    assert!(resp.contains("request_timeout"), "JSON error body: {resp}");
    // The same through the router's POST, which reads the body to find the owner.
    let req = "POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
               content-length: 100\r\n\r\n{\"schedule\"";
    let (resp, took) = raw_exchange(&node, req.as_bytes(), Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "{took:?} {resp:?}");
    assert!(resp.starts_with("HTTP/1.1 408"), "answered 408: {resp:?}");
    // Headers that never end: the connection is closed after the deadline.
    let (resp, took) = raw_exchange(
        &node,
        b"GET /v1/jobs HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        took < Duration::from_secs(5),
        "unfinished headers are cut off near the deadline: {took:?} {resp:?}"
    );
    assert!(node.job_ids().await.is_empty());
    // A bad value is a start-up error naming the setting.
    let (ok, _, err) = run_chime(&[
        "serve",
        "--request-read-timeout",
        "soon",
        "--database-url",
        db.url(),
    ]);
    assert!(!ok);
    assert!(err.contains("request_read_timeout"), "{err}");
}

/// Smaller cases of input that used to be stored or echoed as given.
#[tokio::test(flavor = "multi_thread")]
async fn time_zones_are_trimmed_and_long_inputs_are_bounded() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--max-body-bytes", "2000000"]).await;
    let mut job = http_job("0 0 8 * * *", URL);

    // Surrounding blanks are trimmed; the stored zone is the canonical name.
    for (i, tz) in [" Europe/London ", "Europe/London\n"]
        .into_iter()
        .enumerate()
    {
        job["timezone"] = json!(tz);
        let r = node.put(&format!("/v1/jobs/tz{i}"), &job).await;
        assert_eq!(r.status, 201, "{r}");
        assert_eq!(r.json["timezone"], "Europe/London", "{r}");
    }
    // An empty zone is an error, not UTC by accident.
    for tz in ["", "   "] {
        job["timezone"] = json!(tz);
        let r = node.put("/v1/jobs/tzempty", &job).await;
        let msg = r.assert_error(422);
        assert!(msg.starts_with("timezone: "), "{r}");
    }
    job["timezone"] = json!("UTC");

    // A huge refused value is not echoed whole.
    let huge = "Z".repeat(512 * 1024);
    let mut bad = job.clone();
    bad["timezone"] = json!(huge);
    let r = node.put("/v1/jobs/hugetz", &bad).await;
    let msg = r.assert_error(422);
    assert!(
        msg.starts_with("timezone: "),
        "{}",
        &msg[..msg.len().min(200)]
    );
    assert!(
        r.text.len() < 2048,
        "error is bounded: {} bytes",
        r.text.len()
    );
    let mut bad = job.clone();
    bad["schedule"] = json!(format!("0 0 8 * * {huge}"));
    let r = node.put("/v1/jobs/hugecron", &bad).await;
    r.assert_error(422);
    assert!(
        r.text.len() < 2048,
        "error is bounded: {} bytes",
        r.text.len()
    );

    // A host name longer than DNS allows (253) is refused.
    let mut bad = job.clone();
    bad["callback"]["http"]["url"] = json!(format!("http://{}.example/hook", "a".repeat(300)));
    let r = node.put("/v1/jobs/longhost", &bad).await;
    let msg = r.assert_error(422);
    assert!(msg.starts_with("callback.http.url: "), "{r}");
    let mut bad = job.clone();
    let label = "b".repeat(63);
    let host = vec![label.as_str(); 9 * 1024].join(".");
    bad["callback"]["http"]["url"] = json!(format!("http://{host}/hook"));
    let r = node.put("/v1/jobs/hugehost", &bad).await;
    r.assert_error(422);
    assert!(
        r.text.len() < 2048,
        "error is bounded: {} bytes",
        r.text.len()
    );

    let ids = node.job_ids().await;
    assert_eq!(ids, ["tz0", "tz1"], "only the valid jobs were stored");
}

/// Found by the fuzz test: a request rejected before its body was read (here a wrong token)
/// left the body on the connection, and the server closed the connection after answering
/// while the client, told nothing, sent its next request on it. Now the body is read first
/// and the connection stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_request_with_a_body_leaves_the_connection_usable() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--api-token", "s3cret"]).await;
    let mut s = tokio::net::TcpStream::connect(node.addr.as_str())
        .await
        .unwrap();
    let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(200_000));
    let first = format!(
        "PUT /v1/jobs/a HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(first.as_bytes()).await.unwrap();
    let second = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    s.write_all(second.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() >= 2 {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(
        statuses,
        ["401", "200"],
        "both requests on one connection are answered: {text}"
    );
}
