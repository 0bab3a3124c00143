//! Every route of the real binary under a stream of malformed and hostile requests, built
//! from valid ones by random mutation (seeded, so a failure can be replayed with
//! `CHIME_FUZZ_SEED`). For each: no 5xx, an answer within the deadline, the contract's JSON
//! error body on every 4xx, and nothing stored by a rejected write. The node must still be
//! healthy at the end.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::Method;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use common::*;

const REQUESTS: usize = 1500;

fn valid_job(rng: &mut StdRng) -> Value {
    let schedule = *[
        "@hourly",
        "0 0 8 * * MON-FRI",
        "@every 90s",
        "*/5 * * * * *",
        "@at 2099-01-01T00:00:00Z",
    ]
    .choose(rng)
    .unwrap();
    json!({
        "schedule": schedule,
        "timezone": *["UTC", "Asia/Shanghai", "Europe/London"].choose(rng).unwrap(),
        "callback": {"http": {"url": "http://127.0.0.1:9/hook", "method": "POST",
                              "headers": {"X-A": "b"}, "timeout_ms": 1000}},
        "payload": {"replicas": 3},
        "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000,
                  "max_age_ms": 60000},
    })
}

/// A value meant to break whatever field it lands in.
fn hostile_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..16) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(i64::MAX),
        3 => json!(1e308),
        4 => json!(""),
        5 => json!(" ".repeat(rng.random_range(1..5))),
        6 => json!("x".repeat(rng.random_range(1000..70_000))),
        7 => json!("\u{0}\u{feff}\u{202e}é🙂"),
        8 => json!([1, "two", null]),
        9 => json!({"nested": {"deeper": [{}]}}),
        10 => json!(true),
        11 => json!("* * * * * * * *"),
        12 => json!("@every 0s"),
        13 => json!("http://[::1"),
        14 => json!("consul://"),
        _ => {
            let mut v = json!(0);
            for _ in 0..rng.random_range(1..200) {
                v = json!([v]);
            }
            v
        }
    }
}

/// Replaces, removes or adds a member somewhere in `v`.
fn mutate(rng: &mut StdRng, v: &mut Value) {
    let Value::Object(map) = v else {
        *v = hostile_value(rng);
        return;
    };
    let keys: Vec<String> = map.keys().cloned().collect();
    match rng.random_range(0..5) {
        0 if !keys.is_empty() => {
            map.remove(keys.choose(rng).unwrap());
        }
        1 if !keys.is_empty() => {
            let k = keys.choose(rng).unwrap().clone();
            mutate(rng, map.get_mut(&k).unwrap());
        }
        2 => {
            let k = *["shedule", "id", "paused", "secret", "Callback", "", "\u{0}"]
                .choose(rng)
                .unwrap();
            map.insert(k.into(), hostile_value(rng));
        }
        _ if !keys.is_empty() => {
            let k = keys.choose(rng).unwrap().clone();
            map.insert(k, hostile_value(rng));
        }
        _ => {}
    }
}

fn random_id(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => "%FF".into(),
        1 => "%C0%AF".into(),
        2 => "..".into(),
        3 => "a%2Fb".into(),
        4 => "x".repeat(rng.random_range(100..400)),
        5 => "%00".into(),
        6 => "caf%C3%A9".into(),
        _ => format!("fz-{}", rng.random_range(0..40)),
    }
}

/// The id a path segment names, if it decodes to UTF-8 (else no job can have it).
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_survives_hostile_requests() {
    let seed: u64 = std::env::var("CHIME_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c41e);
    let mut rng = StdRng::seed_from_u64(seed);
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--max-body-bytes", "65536"]).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut stored: BTreeSet<String> = BTreeSet::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();

    let mut previous = String::new();
    for n in 0..REQUESTS {
        let id = random_id(&mut rng);
        let (method, path) = match rng.random_range(0..12) {
            0 => (Method::POST, "/v1/jobs".to_string()),
            1..=3 => (Method::PUT, format!("/v1/jobs/{id}")),
            4 => (Method::PATCH, format!("/v1/jobs/{id}")),
            5 => (Method::GET, format!("/v1/jobs/{id}")),
            6 => (Method::DELETE, format!("/v1/jobs/{id}")),
            7 => {
                let action = *["trigger", "pause", "resume"].choose(&mut rng).unwrap();
                (Method::POST, format!("/v1/jobs/{id}/{action}"))
            }
            8 => {
                let q = *[
                    "limit=0",
                    "limit=x",
                    "limit=100",
                    "cursor=%FF",
                    "bogus=1",
                    "",
                ]
                .choose(&mut rng)
                .unwrap();
                (Method::GET, format!("/v1/jobs/{id}/executions?{q}"))
            }
            9 => {
                let exec = *["1", "-1", "abc", "99999999999999999999", "%FF"]
                    .choose(&mut rng)
                    .unwrap();
                (
                    Method::POST,
                    format!("/v1/jobs/{id}/executions/{exec}/retry"),
                )
            }
            10 => {
                let q = *[
                    "schedule=%40hourly&count=3",
                    "schedule=*+*&count=2",
                    "schedule=%40every+1s&count=100000",
                    "timezone=Mars&schedule=%40daily",
                    "count=-1",
                    "",
                ]
                .choose(&mut rng)
                .unwrap();
                (Method::GET, format!("/v1/schedule/preview?{q}"))
            }
            _ => {
                let q = *["status=failed", "status=bogus", "limit=5000", "cursor=x:y"]
                    .choose(&mut rng)
                    .unwrap();
                (Method::GET, format!("/v1/executions?{q}"))
            }
        };
        let mut body = valid_job(&mut rng);
        for _ in 0..rng.random_range(0..4) {
            mutate(&mut rng, &mut body);
        }
        if method == Method::POST && path == "/v1/jobs" && rng.random_bool(0.5) {
            body["id"] = json!(id);
        }
        let text = match rng.random_range(0..10) {
            0 => "{\"schedule\": ".to_string(),
            1 => "[]".to_string(),
            2 => String::new(),
            3 => "\u{feff}{}".to_string(),
            _ => body.to_string(),
        };
        let ctype = *[
            "application/json",
            "application/json",
            "application/json",
            "application/merge-patch+json",
            "text/plain",
            "application/json; charset=latin1",
        ]
        .choose(&mut rng)
        .unwrap();
        let mut rb = client
            .request(method.clone(), node.url(&path))
            .header("content-type", ctype)
            .body(text);
        match rng.random_range(0..8) {
            0 => rb = rb.header("if-match", "\"1\""),
            1 => rb = rb.header("if-match", "garbage"),
            2 => rb = rb.header("if-none-match", "*"),
            3 => rb = rb.header("origin", "https://evil.example"),
            _ => {}
        }
        let what = format!("#{n} {method} {path} ({ctype})");
        let resp = rb.send().await.unwrap_or_else(|e| {
            let mut chain = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            panic!("{what}: no answer: {chain} (seed {seed}; previous: {previous})")
        });
        previous = what.clone();
        let status = resp.status().as_u16();
        let is_json = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        let text = resp.text().await.unwrap_or_default();
        *statuses.entry(status).or_default() += 1;
        assert!(
            status < 500 || status == 503,
            "{what}: {status} {text} (seed {seed})"
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert!(
                is_json
                    && v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                "{what}: {status} without the JSON error body: {text} (seed {seed})"
            );
            assert!(text.len() < 4096, "{what}: error of {} bytes", text.len());
        }
        // Track what is stored; a rejected write must not have stored a new job.
        let job_id = match (&method, path.as_str()) {
            (&Method::POST, "/v1/jobs") => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string)),
            _ => path
                .strip_prefix("/v1/jobs/")
                .filter(|rest| !rest.contains('/'))
                .and_then(percent_decode),
        };
        if let Some(job_id) = job_id {
            let writes = matches!(method, Method::PUT | Method::POST | Method::PATCH);
            if writes && (200..300).contains(&status) {
                stored.insert(job_id);
            } else if method == Method::DELETE && status == 204 {
                stored.remove(&job_id);
            } else if writes && !stored.contains(&job_id) && job_id.is_ascii() {
                let g = client
                    .get(node.url(&format!("/v1/jobs/{job_id}")))
                    .send()
                    .await
                    .unwrap();
                assert_ne!(
                    g.status().as_u16(),
                    200,
                    "{what}: answered {status} but stored the job (seed {seed})"
                );
            }
        }
    }

    // Still healthy, and what is listed is exactly what was accepted.
    assert_eq!(node.get("/readyz").await.status, 200);
    let listed: BTreeSet<String> = node.job_ids().await.into_iter().collect();
    assert_eq!(listed, stored, "(seed {seed})");
    eprintln!("statuses over {REQUESTS} requests: {statuses:?}");
    assert!(
        statuses.keys().any(|s| (200..300).contains(s)) && statuses.keys().any(|s| *s >= 400),
        "the mix exercised both accepted and rejected requests: {statuses:?}"
    );
}
