//! Self-test of the Consul test double (`tests/common/consul.rs`): the behaviour chime's
//! Consul tests rely on must be Consul's, or those tests prove nothing.

mod common;

use std::time::{Duration, Instant};

use common::consul::{ConsulDouble, FIRST_INDEX, parse_go_duration};
use reqwest::StatusCode;
use serde_json::Value;

struct Answer {
    status: StatusCode,
    index: Option<u64>,
    content_type: String,
    knownleader: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    /// The `Service.ID`s in the answer, in order.
    fn ids(&self) -> Vec<String> {
        self.json()
            .as_array()
            .expect("a JSON array")
            .iter()
            .map(|e| e["Service"]["ID"].as_str().expect("Service.ID").to_string())
            .collect()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("reqwest client")
}

/// `GET {base}/v1/health/service/{service}?{query}`, with the query exactly as written
/// (so a bare `passing` stays bare).
async fn health(base: &str, service: &str, query: &str) -> Answer {
    let resp = client()
        .get(format!("{base}/v1/health/service/{service}?{query}"))
        .send()
        .await
        .expect("the double answers");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_string())
    };
    let index = header("x-consul-index").map(|v| v.parse().expect("a numeric index"));
    let content_type = header("content-type").unwrap_or_default();
    let knownleader = header("x-consul-knownleader");
    Answer {
        status: resp.status(),
        index,
        content_type,
        knownleader,
        body: resp.text().await.expect("a body"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_service_is_an_empty_list_with_an_index() {
    let consul = ConsulDouble::start().await;
    let a = health(&consul.url(), "nope", "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.content_type, "application/json");
    assert_eq!(a.knownleader.as_deref(), Some("true"));
    assert_eq!(a.body, "[]");
    assert_eq!(a.index, Some(FIRST_INDEX));

    // Losing its last instance makes a service unknown again, and its index is that write.
    consul.add_instance("web", "web-1", "127.0.0.1", 8080);
    consul.remove_instance("web", "web-1");
    let a = health(&consul.url(), "web", "passing").await;
    assert_eq!(a.body, "[]");
    assert_eq!(a.index, Some(FIRST_INDEX + 2));
    assert_eq!(consul.index("nope"), FIRST_INDEX + 2);

    let resp = client()
        .get(format!("{}/v1/status/leader", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "\"127.0.0.1:8300\"");
}

#[tokio::test(flavor = "multi_thread")]
async fn blocking_query_waits_out_wait_when_nothing_changes() {
    let consul = ConsulDouble::start().await;
    consul.add_instance("web", "web-1", "10.0.0.1", 8080);
    let first = health(&consul.url(), "web", "passing").await;
    let index = first.index.expect("an index");
    assert!(index > 1);

    let started = Instant::now();
    let again = health(
        &consul.url(),
        "web",
        &format!("passing&index={index}&wait=1s"),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "returned after {took:?}, before wait"
    );
    // 1 s + at most 1/16 jitter; the rest is slack for a busy machine.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.index, Some(index), "nothing changed");
    assert_eq!(again.body, first.body);
    assert_eq!(consul.max_concurrent_blocking("web"), 1);
    assert_eq!(consul.blocking_now("web"), 0);

    let seen = consul.recent_queries();
    let last = seen.last().expect("queries are recorded");
    assert_eq!(last.service, "web");
    assert_eq!(last.index.as_deref(), Some(index.to_string().as_str()));
    assert_eq!(last.index_value(), Some(index));
    assert_eq!(last.wait.as_deref(), Some("1s"));
    assert_eq!(last.wait_value(), Some(Duration::from_secs(1)));
    assert_eq!(last.passing.as_deref(), Some(""));
    assert_eq!(consul.requests("web"), 2);

    // An idempotent write wakes the query with a new index and the same body: a return is
    // no guarantee of change.
    let url = consul.url();
    let held = tokio::spawn(async move {
        health(&url, "web", &format!("passing&index={index}&wait=5s")).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    consul.touch("web");
    let woken = held.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(woken.index.unwrap() > index);
    assert_eq!(woken.body, first.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn blocking_query_returns_early_on_change() {
    let consul = ConsulDouble::start().await;
    consul.add_instance("web", "web-1", "10.0.0.1", 8080);
    consul.add_instance("web", "web-2", "10.0.0.2", 8080);
    let index = consul.index("web");

    let url = consul.url();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        health(&url, "web", &format!("passing=true&index={index}&wait=4s")).await
    });
    assert!(
        common::wait_until(Duration::from_secs(2), async || consul.blocking_now("web")
            == 1)
        .await,
        "the query is held"
    );
    consul.set_status("web", "web-2", "critical");
    let a = held.await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?} of a 4 s wait");
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.index.unwrap() > index);
    assert_eq!(a.ids(), ["web-1"]);
    assert_eq!(consul.blocking_now("web"), 0);
    assert_eq!(consul.max_concurrent_blocking("web"), 1);

    // The same status again is not a write.
    let before = consul.index("web");
    consul.set_status("web", "web-2", "critical");
    assert_eq!(consul.index("web"), before);
    // A write to another service does not move this one's index.
    consul.add_instance("db", "db-1", "10.0.0.9", 5432);
    assert_eq!(consul.index("web"), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn passing_filters_warning_and_critical() {
    let consul = ConsulDouble::start().await;
    consul.add_instance("web", "a", "10.0.0.1", 8081);
    consul.add_instance("web", "b", "10.0.0.2", 8082);
    consul.add_instance("web", "c", "10.0.0.3", 8083);
    consul.set_status("web", "b", "warning");
    consul.set_status("web", "c", "critical");
    let url = consul.url();

    assert_eq!(health(&url, "web", "").await.ids(), ["a", "b", "c"]);
    for on in ["passing", "passing=true", "passing=1", "passing=T"] {
        assert_eq!(health(&url, "web", on).await.ids(), ["a"], "?{on}");
    }
    for off in ["passing=false", "passing=0"] {
        assert_eq!(health(&url, "web", off).await.ids().len(), 3, "?{off}");
    }
    let bad = health(&url, "web", "passing=maybe").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body, "Invalid value for ?passing");

    let a = health(&url, "web", "passing").await.json();
    let entry = &a[0];
    assert_eq!(entry["Service"]["Address"], "10.0.0.1");
    assert_eq!(entry["Service"]["Port"], 8081);
    assert_eq!(entry["Service"]["Service"], "web");
    assert_eq!(entry["Node"]["Address"], "10.0.0.1");
    assert_eq!(entry["Node"]["Datacenter"], "dc1");
    let checks: Vec<&str> = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["serfHealth", "service:a"]);

    // A failing node check fails `passing` for every instance on the node.
    consul.set_node_status("node-a", "critical");
    assert_eq!(health(&url, "web", "passing").await.body, "[]");
    consul.set_node_status("node-a", "passing");

    // Tags: case-insensitive, all must match.
    consul.set_tags("web", "a", &["primary", "v2"]);
    assert_eq!(health(&url, "web", "tag=PRIMARY").await.ids(), ["a"]);
    assert!(
        health(&url, "web", "tag=primary&tag=v3")
            .await
            .ids()
            .is_empty()
    );

    // An empty service address is left empty; the node's address is the fallback.
    consul.add_instance_on_node("api", "api-1", "node-x", "10.0.0.7", "", 9000);
    let api = health(&url, "api", "passing").await.json();
    assert_eq!(api[0]["Service"]["Address"], "");
    assert_eq!(api[0]["Node"]["Address"], "10.0.0.7");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_are_answered_like_consul() {
    let consul = ConsulDouble::start().await;
    let url = consul.url();
    for wait in ["abc", "5", "1x", "-", "1d"] {
        let a = health(&url, "web", &format!("index=1&wait={wait}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "wait={wait}");
        assert_eq!(a.body, "Invalid wait time");
        assert!(a.content_type.starts_with("text/plain"));
        assert_eq!(a.index, None);
    }
    for index in ["abc", "-1", "+5", "1.5"] {
        let a = health(&url, "web", &format!("index={index}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "index={index}");
        assert_eq!(a.body, "Invalid index");
    }
    let a = health(&url, "web", "stale&consistent").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = health(&url, "web", "dc=dc2").await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.body, "No path to datacenter");
    let a = health(
        &url,
        "web",
        "dc=dc1&stale&wait=1m30s&index=0&near=_agent&filter=x",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(consul.requests("web"), 12);

    let ms = 1_000_000;
    assert_eq!(parse_go_duration("100ms"), Some(100 * ms));
    assert_eq!(parse_go_duration("1.5s"), Some(1500 * ms));
    assert_eq!(parse_go_duration(".5s"), Some(500 * ms));
    assert_eq!(parse_go_duration("1h2m3s"), Some(3_723_000 * ms));
    assert_eq!(parse_go_duration("10m"), Some(600_000 * ms));
    assert_eq!(parse_go_duration("-5s"), Some(-5000 * ms));
    assert_eq!(parse_go_duration("3µs"), Some(3000));
    assert_eq!(parse_go_duration("0"), Some(0));
    assert_eq!(parse_go_duration(""), None);
    assert_eq!(parse_go_duration("5"), None);
    assert_eq!(parse_go_duration("99999999999h"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaviour_knobs() {
    let consul = ConsulDouble::start().await;
    consul.add_instance("web", "web-1", "10.0.0.1", 8080);
    let url = consul.url();
    let real = consul.index("web");

    // An index that went backwards: reported, and blocked against.
    consul.set_index_override(Some(3));
    assert_eq!(health(&url, "web", "").await.index, Some(3));
    let started = Instant::now();
    let a = health(&url, "web", &format!("index={real}&wait=300ms")).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(a.index, Some(3));
    consul.set_index_override(None);
    assert_eq!(health(&url, "web", "").await.index, Some(real));

    consul.fail_next(2, 500);
    for _ in 0..2 {
        let a = health(&url, "web", "passing").await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(a.index, None);
    }
    assert_eq!(health(&url, "web", "passing").await.status, StatusCode::OK);

    // Three watchers at once are counted as three.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { health(&url, "web", &format!("index={real}&wait=300ms")).await },
            )
        })
        .collect();
    for h in held {
        assert_eq!(h.await.unwrap().index, Some(real));
    }
    assert_eq!(consul.max_concurrent_blocking("web"), 3);

    consul.stall_next(1);
    let stalled = reqwest::Client::new()
        .get(format!("{url}/v1/health/service/web"))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(stalled.is_err_and(|e| e.is_timeout()));
    assert_eq!(health(&url, "web", "").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_double_answers_held_queries_and_closes() {
    let consul = ConsulDouble::start().await;
    consul.add_instance("web", "web-1", "10.0.0.1", 8080);
    let index = consul.index("web");
    let url = consul.url();
    let held = {
        let url = url.clone();
        tokio::spawn(async move { health(&url, "web", &format!("index={index}&wait=10s")).await })
    };
    assert!(
        common::wait_until(Duration::from_secs(2), async || consul.blocking_now("web")
            == 1)
        .await
    );
    let started = Instant::now();
    drop(consul);
    let a = held.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.ids(), ["web-1"]);
    assert!(
        common::wait_until(Duration::from_secs(2), async || {
            reqwest::get(format!("{url}/v1/health/service/web"))
                .await
                .is_err()
        })
        .await,
        "the listener closes"
    );
}
