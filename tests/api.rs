//! Black-box tests of the REST API and the HTTP callback: the real `chime` binary, a real
//! receiver, on SQLite and on MySQL (`sqlite::<name>` and `mysql::<name>`).
//!
//! Times are compared on one clock: chime and the test run on the same machine. "After the
//! answer" means after the test has read the response, which is never earlier than chime's
//! answer, so the write-ordering checks are conservative, never too strict.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use axum::http::Method;
use serde_json::{Value, json};

use common::{
    Backend, Chime, Db, Received, Receiver, Script, holds_for, http_job, now_ms, parse_ms,
    rfc3339_ms, unique_id, wait_for, wait_until,
};

common::backend_tests! {
    callbacks_follow_the_contract,
    replace_keeps_created_at_and_switches_payload,
    pause_stops_fires_trigger_fires_anyway_resume_restarts,
    delete_stops_fires_and_forgets_the_job,
    retries_back_off_with_growing_gaps_until_success,
    client_error_is_not_retried,
    bad_input_is_rejected_and_never_stored,
    cluster_preview_metrics_auth_and_node_header,
    ready_node_serves_writes_at_once,
}

const NODE: &str = "e2e-api";
/// Deadline of every positive wait: generous, since it costs nothing when chime is on time,
/// and the MariaDB the suite shares with benchmarks can stall writes for many seconds.
const FIRES_TIMEOUT: Duration = Duration::from_secs(30);
/// How long "no fire after the answer" is observed: more than two periods of `@every 1s`.
const QUIET: Duration = Duration::from_millis(2500);

/// Checks one callback against the contract: method, headers, exactly the body fields,
/// agreeing times. Returns its scheduled time in ms.
fn check_callback(cb: &Received, job_id: &str, attempt: u64, payload: &Value) -> i64 {
    assert_eq!(cb.method, Method::POST, "{cb:?}");
    assert_eq!(cb.path, "/hook", "{cb:?}");
    assert!(
        cb.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "Content-Type: {cb:?}"
    );
    let fields: BTreeSet<&str> = cb
        .body
        .as_object()
        .unwrap_or_else(|| panic!("body is not a JSON object: {cb:?}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["job_id", "scheduled_at", "fired_at", "attempt", "payload"]),
        "exactly the contract's body fields"
    );
    assert_eq!(cb.job_id(), job_id);
    assert_eq!(cb.header("x-chime-job-id"), Some(job_id), "{cb:?}");
    assert_eq!(cb.attempt(), attempt, "{cb:?}");
    assert_eq!(cb.attempt_header(), attempt, "{cb:?}");
    assert_eq!(&cb.body["payload"], payload, "payload is echoed");

    let scheduled_text = cb.body["scheduled_at"].as_str().expect("scheduled_at");
    let fired_text = cb.body["fired_at"].as_str().expect("fired_at");
    assert!(
        scheduled_text.ends_with('Z') && fired_text.ends_with('Z'),
        "times are RFC3339 UTC: {cb:?}"
    );
    assert_eq!(
        cb.header("x-chime-scheduled-at"),
        Some(scheduled_text),
        "X-Chime-Scheduled-At agrees with the body"
    );
    let scheduled = cb.scheduled_ms();
    assert_eq!(
        cb.idempotency_key(),
        format!("{job_id}@{scheduled}"),
        "Idempotency-Key is <job_id>@<scheduled_at unix ms>"
    );
    assert!(
        cb.fired_ms() >= scheduled,
        "fired_at before scheduled_at: {cb:?}"
    );
    assert!(
        cb.at_ms >= scheduled,
        "callback arrived before its scheduled time: {cb:?}"
    );
    scheduled
}

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{id}")
}

/// Callbacks scheduled strictly after `t_ms`.
fn scheduled_after(rx: &Receiver, t_ms: i64) -> Vec<Received> {
    rx.requests()
        .into_iter()
        .filter(|c| c.scheduled_ms() > t_ms)
        .collect()
}

async fn callbacks_follow_the_contract(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("contract");
    let payload = json!({"replicas": 12});
    let mut body = http_job("@every 1s", &rx.url());
    body["payload"] = payload.clone();

    let before = now_ms();
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.json["id"], id.as_str(), "{r}");
    assert_eq!(r.json["payload"], payload, "{r}");

    assert!(
        wait_until(FIRES_TIMEOUT, async || rx.count() >= 3).await,
        "3 callbacks of an @every 1s job within {FIRES_TIMEOUT:?}; got {}",
        rx.count()
    );
    let got = rx.requests();
    let mut times: Vec<i64> = got
        .iter()
        .map(|cb| check_callback(cb, &id, 1, &payload))
        .collect();
    let keys: HashSet<&str> = got.iter().map(Received::idempotency_key).collect();
    assert_eq!(keys.len(), got.len(), "no Idempotency-Key twice: {got:?}");
    times.sort_unstable();
    assert!(
        times[0] >= before,
        "first fire scheduled before the job existed"
    );
    for w in times.windows(2) {
        assert_eq!(
            w[1] - w[0],
            1000,
            "consecutive fires of @every 1s: {times:?}"
        );
    }
    for cb in &got {
        assert!(
            cb.at_ms - cb.scheduled_ms() < 5000,
            "fired far too late: {cb:?}"
        );
    }
}

async fn replace_keeps_created_at_and_switches_payload(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("replace");
    let old = json!({"replicas": 12});
    let new = json!({"replicas": 3, "version": 2});
    let mut body = http_job("@every 1s", &rx.url());
    body["payload"] = old.clone();
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");
    let created_at = r.json["created_at"].clone();
    assert!(created_at.is_string(), "{r}");

    assert!(
        wait_until(FIRES_TIMEOUT, async || rx.count() >= 1).await,
        "the first definition fires"
    );
    assert_eq!(rx.requests()[0].body["payload"], old);

    body["payload"] = new.clone();
    let r = chime.put(&job_path(&id), &body).await;
    let answered = now_ms();
    assert_eq!(r.status, 200, "a replace answers 200: {r}");
    assert_eq!(r.json["created_at"], created_at, "created_at is kept: {r}");
    assert_eq!(r.json["payload"], new, "{r}");
    let g = chime.get(&job_path(&id)).await;
    assert_eq!(g.status, 200, "{g}");
    assert_eq!(g.json["payload"], new, "{g}");
    assert_eq!(g.json["created_at"], created_at, "{g}");

    assert!(
        wait_until(FIRES_TIMEOUT, async || scheduled_after(&rx, answered).len()
            >= 2)
        .await,
        "the replaced job keeps firing"
    );
    for cb in scheduled_after(&rx, answered) {
        check_callback(&cb, &id, 1, &new);
    }
}

async fn pause_stops_fires_trigger_fires_anyway_resume_restarts(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("pause");
    let payload = json!({"replicas": 12});
    let mut body = http_job("@every 1s", &rx.url());
    body["payload"] = payload.clone();
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");
    assert!(
        wait_until(FIRES_TIMEOUT, async || rx.count() >= 1).await,
        "the job fires before it is paused"
    );

    let r = chime.post(&format!("/v1/jobs/{id}/pause"), None).await;
    let paused_at = now_ms();
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json["paused"], true, "{r}");

    // A trigger fires even a paused job, at once, as a manual execution.
    let t = chime.post(&format!("/v1/jobs/{id}/trigger"), None).await;
    assert_eq!(t.status, 202, "{t}");
    assert_eq!(t.json["job_id"], id.as_str(), "{t}");
    let trig_sched = parse_ms(t.json["scheduled_at"].as_str().expect("scheduled_at"));
    let trig_fired = parse_ms(t.json["fired_at"].as_str().expect("fired_at"));
    assert!(trig_fired >= trig_sched, "{t}");
    let exec_id = t.json["execution_id"].as_str().expect("execution_id");
    let triggered = wait_for(FIRES_TIMEOUT, async || {
        rx.requests()
            .into_iter()
            .find(|c| c.scheduled_ms() == trig_sched)
    })
    .await
    .expect("the triggered fire is delivered");
    check_callback(&triggered, &id, 1, &payload);

    let execs = chime.executions(&id).await;
    let listed = execs
        .iter()
        .find(|e| e["id"].as_str() == Some(exec_id))
        .unwrap_or_else(|| panic!("execution {exec_id} is listed: {execs:?}"));
    assert_eq!(listed["manual"], true, "{listed}");
    assert_eq!(
        parse_ms(listed["scheduled_at"].as_str().unwrap_or_default()),
        trig_sched
    );
    assert!(
        execs.iter().any(|e| e["manual"] == false),
        "scheduled fires are not manual: {execs:?}"
    );

    // Paused: nothing scheduled after the pause answer is sent (the trigger aside).
    let quiet_until = paused_at + QUIET.as_millis() as i64;
    let quiet = holds_for(
        Duration::from_millis((quiet_until - now_ms()).max(0) as u64),
        async || {
            scheduled_after(&rx, paused_at)
                .iter()
                .all(|c| c.scheduled_ms() == trig_sched)
        },
    )
    .await;
    assert!(
        quiet,
        "a paused job fired: {:?}",
        scheduled_after(&rx, paused_at)
    );

    let r = chime.post(&format!("/v1/jobs/{id}/resume"), None).await;
    let resumed_at = now_ms();
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json["paused"], false, "{r}");
    assert!(
        wait_until(FIRES_TIMEOUT, async || scheduled_after(&rx, resumed_at)
            .len()
            >= 2)
        .await,
        "a resumed job fires again"
    );
    for cb in scheduled_after(&rx, resumed_at) {
        check_callback(&cb, &id, 1, &payload);
    }
}

async fn delete_stops_fires_and_forgets_the_job(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("delete");
    let r = chime
        .put(&job_path(&id), &http_job("@every 1s", &rx.url()))
        .await;
    assert_eq!(r.status, 201, "{r}");
    assert!(
        wait_until(FIRES_TIMEOUT, async || rx.count() >= 1).await,
        "the job fires before it is deleted"
    );

    let r = chime.delete(&job_path(&id)).await;
    let deleted_at = now_ms();
    assert_eq!(r.status, 204, "{r}");
    assert!(r.text.is_empty(), "204 has no body: {r}");

    chime.get(&job_path(&id)).await.assert_error(404);
    chime
        .get(&format!("/v1/jobs/{id}/executions"))
        .await
        .assert_error(404);
    assert!(
        !chime.job_ids().await.contains(&id),
        "a deleted job is not listed"
    );

    let quiet = holds_for(QUIET, async || scheduled_after(&rx, deleted_at).is_empty()).await;
    assert!(
        quiet,
        "a deleted job fired: {:?}",
        scheduled_after(&rx, deleted_at)
    );
    // Only now: a second DELETE must not be what stops the fires observed above.
    chime.delete(&job_path(&id)).await.assert_error(404);
}

async fn retries_back_off_with_growing_gaps_until_success(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::first(&[503, 503], 200)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("retry");
    let at = now_ms() + 1500;
    let mut body = http_job(&format!("@at {}", rfc3339_ms(at)), &rx.url());
    body["retry"] = json!({"initial_backoff_ms": 200, "max_backoff_ms": 5000});
    body["payload"] = json!({"n": 1});
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");

    assert!(
        wait_until(FIRES_TIMEOUT, async || rx.count() >= 3).await,
        "3 attempts arrive; got {:?}",
        rx.requests()
    );
    let done = wait_for(FIRES_TIMEOUT, async || {
        chime
            .execution(&id, at)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .expect("the execution finishes");
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 3, "{done}");
    assert_eq!(done["response_status"], 200, "{done}");
    assert_eq!(done["manual"], false, "{done}");
    assert!(
        holds_for(Duration::from_millis(500), async || rx.count() == 3).await,
        "no attempt after success: {:?}",
        rx.requests()
    );

    let got = rx.requests();
    for (i, cb) in got.iter().enumerate() {
        let scheduled = check_callback(cb, &id, i as u64 + 1, &json!({"n": 1}));
        assert_eq!(scheduled, at, "every attempt carries the @at time");
    }
    assert_eq!(
        got.iter().map(|c| c.answered).collect::<Vec<_>>(),
        [503, 503, 200]
    );
    // Equal jitter: the delay after attempt k lies in [b/2, b] with b = 200 * 2^(k-1) ms, so
    // gap 1 >= 100 ms and gap 2 >= 200 ms >= the largest delay gap 1 can have; a gap also
    // holds the time to record the outcome, hence the slack on the upper bounds.
    let gap1 = got[1].at_ms - got[0].at_ms;
    let gap2 = got[2].at_ms - got[1].at_ms;
    assert!(
        (100..=1200).contains(&gap1),
        "gap after attempt 1 must be in [100, 200] ms plus overhead: {gap1}"
    );
    assert!(
        (200..=1400).contains(&gap2),
        "gap after attempt 2 must be in [200, 400] ms plus overhead: {gap2}"
    );
    assert!(
        gap2 + 100 >= gap1,
        "gaps never shrink (100 ms allowed for the noise of recording outcomes): {gap1} then {gap2}"
    );
}

async fn client_error_is_not_retried(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(404)).await;
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("notfound");
    let at = now_ms() + 1500;
    let mut body = http_job(&format!("@at {}", rfc3339_ms(at)), &rx.url());
    // A retry, were there one, would come within 200 ms.
    body["retry"] = json!({"initial_backoff_ms": 100, "max_backoff_ms": 200});
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");

    let first = wait_for(FIRES_TIMEOUT, async || rx.requests().into_iter().next())
        .await
        .expect("attempt 1 arrives");
    check_callback(&first, &id, 1, &Value::Null);
    let done = wait_for(FIRES_TIMEOUT, async || {
        chime
            .execution(&id, at)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .expect("the execution finishes");
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(done["response_status"], 404, "{done}");
    assert!(
        done["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{done}"
    );
    let until = Duration::from_millis((first.at_ms + 3000 - now_ms()).max(0) as u64);
    assert!(
        holds_for(until, async || rx.count() == 1).await,
        "a 404 is not retried: {:?}",
        rx.requests()
    );
}

/// One bad `PUT /v1/jobs/{id}`: the status it must get and the field a 422 must name.
struct BadCase {
    case: &'static str,
    id: String,
    body: String,
    status: u16,
    field: Option<&'static str>,
}

async fn bad_input_is_rejected_and_never_stored(backend: Backend) {
    let db = Db::fresh(backend).await;
    let chime = Chime::start(&db, NODE, &["--max-body-bytes", "4096"]).await;
    let url = "http://127.0.0.1:9/hook";

    // One stored job: the 409 case, and the list every bad request must leave unchanged.
    let existing = unique_id("exists");
    let mut original = http_job("@every 1h", url);
    original["id"] = json!(existing);
    original["payload"] = json!({"v": 1});
    let r = chime.post("/v1/jobs", Some(&original)).await;
    assert_eq!(r.status, 201, "{r}");
    let jobs_before = chime.job_ids().await;
    assert_eq!(jobs_before, std::slice::from_ref(&existing));

    let valid = http_job("@every 1h", url);
    let with = |key: &str, value: Value| {
        let mut b = valid.clone();
        b[key] = value;
        b.to_string()
    };
    let past = "@at 2001-01-01T00:00:00Z";
    let pad = "x".repeat(8 * 1024);
    let case = |case, id: &str, body: String, status, field| BadCase {
        case,
        id: unique_id(id),
        body,
        status,
        field,
    };
    let cases = [
        case(
            "bad cron",
            "cron",
            with("schedule", json!("* * *")),
            422,
            Some("schedule"),
        ),
        case(
            "unknown time zone",
            "tz",
            with("timezone", json!("Mars/Olympus_Mons")),
            422,
            Some("timezone"),
        ),
        case(
            "missing callback",
            "nocb",
            json!({"schedule": "@every 1h"}).to_string(),
            422,
            Some("callback"),
        ),
        case(
            "http and grpc callbacks",
            "twocb",
            with(
                "callback",
                json!({"http": {"url": url}, "grpc": {"target": "http://127.0.0.1:9"}}),
            ),
            422,
            Some("callback"),
        ),
        case(
            "negative timeout_ms",
            "timeout",
            with("callback", json!({"http": {"url": url, "timeout_ms": -5}})),
            422,
            Some("callback.http.timeout_ms"),
        ),
        case(
            "@at in the past",
            "past",
            with("schedule", json!(past)),
            422,
            Some("schedule"),
        ),
        case(
            "malformed JSON",
            "malformed",
            r#"{"schedule": "@every 1h", "callback": "#.to_string(),
            400,
            None,
        ),
        case(
            "body over --max-body-bytes",
            "large",
            with("payload", json!({"pad": pad})),
            413,
            None,
        ),
    ];
    for BadCase {
        case,
        id,
        body,
        status,
        field,
    } in &cases
    {
        let r = chime.send_raw(Method::PUT, &job_path(id), body).await;
        let message = r.assert_error(*status);
        if let Some(field) = field {
            assert!(
                message.starts_with(&format!("{field}: ")),
                "{case}: the message names {field:?}: {r}"
            );
        }
        chime.get(&job_path(id)).await.assert_error(404);
    }

    // A bad id in the path: named in the message, not stored (GET cannot even name it).
    let r = chime.put("/v1/jobs/bad%20id%21", &valid).await;
    let message = r.assert_error(422);
    assert!(message.starts_with("id: "), "the message names id: {r}");
    let g = chime.get("/v1/jobs/bad%20id%21").await;
    assert!(matches!(g.status, 404 | 422), "{g}");

    // POST of an existing id: 409, and the stored job is untouched.
    let mut again = original.clone();
    again["payload"] = json!({"v": 2});
    chime.post("/v1/jobs", Some(&again)).await.assert_error(409);
    let g = chime.get(&job_path(&existing)).await;
    assert_eq!(g.status, 200, "{g}");
    assert_eq!(g.json["payload"], json!({"v": 1}), "{g}");

    assert_eq!(
        chime.job_ids().await,
        jobs_before,
        "bad input stored nothing"
    );
}

async fn cluster_preview_metrics_auth_and_node_header(backend: Backend) {
    let db = Db::fresh(backend).await;
    let token = "e2e-token-7f3a";
    let chime = Chime::start(&db, NODE, &["--api-token", token]).await;

    // Auth: /v1 needs the bearer token; health does not.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let no_token = chime.send(client.get(chime.url("/v1/jobs"))).await;
    no_token.assert_error(401);
    let wrong = chime
        .send(client.get(chime.url("/v1/jobs")).bearer_auth("wrong"))
        .await;
    wrong.assert_error(401);
    let ok = chime.get("/v1/jobs").await;
    assert_eq!(ok.status, 200, "{ok}");
    assert!(ok.json["jobs"].is_array(), "{ok}");
    let health = chime.send(client.get(chime.url("/healthz"))).await;
    assert_eq!(health.status, 200, "{health}");
    let unknown = chime.get("/no/such/route").await;
    assert_eq!(unknown.status, 404, "{unknown}");

    let c = chime.get("/v1/cluster").await;
    assert_eq!(c.status, 200, "{c}");
    assert_eq!(c.json["node_id"], NODE, "{c}");
    let members = c.json["members"].as_array().expect("members is a list");
    let me = members
        .iter()
        .find(|m| m["node_id"] == NODE)
        .unwrap_or_else(|| panic!("this node is a member: {c}"));
    assert_eq!(me["http_addr"], chime.addr.as_str(), "{c}");
    assert!(me["state"].is_string(), "{c}");

    let from = now_ms();
    let p = chime
        .get("/v1/schedule/preview?schedule=0%20*%2F5%20*%20*%20*%20*&count=3")
        .await;
    assert_eq!(p.status, 200, "{p}");
    let times: Vec<i64> = p.json["times"]
        .as_array()
        .unwrap_or_else(|| panic!("times is a list: {p}"))
        .iter()
        .map(|t| parse_ms(t.as_str().expect("a time string")))
        .collect();
    assert_eq!(times.len(), 3, "{p}");
    assert!(times[0] > from - 1000, "{p}");
    for t in &times {
        assert_eq!(t % 300_000, 0, "every 5 minutes at second 0: {p}");
    }
    assert!(
        times.windows(2).all(|w| w[1] - w[0] == 300_000),
        "consecutive: {p}"
    );
    let bad_preview = chime
        .get("/v1/schedule/preview?schedule=%2A%20%2A%20%2A&count=3")
        .await;
    bad_preview.assert_error(422);

    let m = chime.send(client.get(chime.url("/metrics"))).await;
    assert_eq!(m.status, 200, "{m}");
    assert!(
        m.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{m}"
    );
    assert!(
        m.text
            .lines()
            .any(|l| l.starts_with("chime_fires_total ") || l.starts_with("chime_fires_total{")),
        "chime_fires_total is exported: {}",
        m.text
    );
    assert!(
        m.text.contains("# TYPE chime_fires_total counter"),
        "{}",
        m.text
    );

    // Every response names the node that handled it: here, always this one.
    for r in [
        &no_token,
        &wrong,
        &ok,
        &health,
        &unknown,
        &c,
        &p,
        &bad_preview,
        &m,
    ] {
        assert_eq!(r.header("x-chime-node"), Some(NODE), "{r}");
    }
}

async fn ready_node_serves_writes_at_once(backend: Backend) {
    let db = Db::fresh(backend).await;
    // `start` returns as soon as /readyz answers 200, which the contract defines as "joined
    // the cluster, database reachable, owned jobs loaded": the API must then serve writes
    // without a 503 "retry shortly". Sent once, without the client's 503 retry.
    let chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("ready");
    let body = http_job("@every 1h", "http://127.0.0.1:9/hook");
    let r = chime
        .send_once(chime.request(Method::PUT, &job_path(&id)).json(&body))
        .await;
    assert_eq!(r.status, 201, "a ready node accepts a PUT at once: {r}");
    let g = chime
        .send_once(chime.request(Method::GET, &job_path(&id)))
        .await;
    assert_eq!(g.status, 200, "{g}");
    assert_eq!(g.header("x-chime-node"), Some(NODE), "{g}");
}
