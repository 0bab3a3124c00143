//! Black-box crash and restart tests: SIGKILL during a retry wait, fires missed while the
//! node was down (inside and beyond the catch-up window), SIGTERM with a callback in flight.
//! Each runs on SQLite and on MySQL; a restart is a new process on the same database.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use common::{
    Backend, Chime, Db, Received, Receiver, Script, holds_for, http_job, now_ms, parse_ms,
    rfc3339_ms, unique_id, wait_for, wait_until,
};

common::backend_tests! {
    crash_during_retry_wait_resumes_with_attempt_2,
    missed_fires_within_window_are_made_up_once_each,
    missed_fires_beyond_window_fire_once_and_are_recorded_missed,
    sigterm_exits_cleanly_without_losing_inflight_delivery,
}

const NODE: &str = "e2e-dur";
/// Deadline of every positive wait (see `FIRES_TIMEOUT` in api.rs for why it is generous).
const TIMEOUT: Duration = Duration::from_secs(30);

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{id}")
}

/// Executions by scheduled time (ms).
async fn executions_by_time(chime: &Chime, id: &str) -> BTreeMap<i64, Value> {
    chime
        .executions(id)
        .await
        .into_iter()
        .map(|e| (parse_ms(e["scheduled_at"].as_str().unwrap_or_default()), e))
        .collect()
}

/// Every callback of the test has its own Idempotency-Key: no fire was delivered twice.
fn assert_no_key_twice(delivered: &[Received]) {
    let mut seen = HashSet::new();
    let twice: Vec<&Received> = delivered
        .iter()
        .filter(|c| !seen.insert(c.idempotency_key()))
        .collect();
    assert!(
        twice.is_empty(),
        "no Idempotency-Key twice over the whole test; sent again: {twice:#?}\nall: {delivered:#?}"
    );
}

/// Waits for a delivered fire whose execution is recorded `succeeded` with at least
/// `margin_ms` left before the next fire of an `@every period_ms` job, so that a SIGKILL then
/// interrupts nothing. Returns that fire's scheduled time.
async fn quiet_moment(chime: &Chime, rx: &Receiver, id: &str, period_ms: i64) -> i64 {
    let margin_ms = period_ms / 2;
    wait_for(TIMEOUT, async || {
        let last = rx.requests().iter().map(Received::scheduled_ms).max()?;
        let execs = executions_by_time(chime, id).await;
        let settled = execs.values().all(|e| e["status"] == "succeeded");
        (settled && execs.contains_key(&last) && now_ms() < last + period_ms - margin_ms)
            .then_some(last)
    })
    .await
    .expect("a fire delivered and recorded, with time to spare before the next one")
}

async fn crash_during_retry_wait_resumes_with_attempt_2(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::first(&[503], 200)).await;
    let mut chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("crash");
    let at = now_ms() + 1500;
    let mut body = http_job(&format!("@at {}", rfc3339_ms(at)), &rx.url());
    body["retry"] = json!({"initial_backoff_ms": 3000, "max_backoff_ms": 3000});
    body["payload"] = json!({"step": "drain"});
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");

    // Attempt 1 is answered 503; once its outcome is stored, the delivery waits 1.5-3 s.
    assert!(
        wait_until(TIMEOUT, async || rx.count() >= 1).await,
        "attempt 1 arrives"
    );
    let waiting = wait_for(TIMEOUT, async || {
        chime.execution(&id, at).await.filter(|e| {
            e["status"] == "pending" && e["last_error"].as_str().is_some_and(|s| !s.is_empty())
        })
    })
    .await
    .expect("the execution is pending with last_error after attempt 1");
    chime.kill9();
    let killed_at = now_ms();
    assert_eq!(waiting["attempts"], 1, "{waiting}");
    assert_eq!(waiting["response_status"], 503, "{waiting}");
    assert_eq!(
        rx.count(),
        1,
        "attempt 2 came before the kill: the retry wait was shorter than 1.5 s: {:?}",
        rx.requests()
    );
    let first = rx.requests().remove(0);
    assert_eq!(first.attempt_header(), 1);
    assert_eq!(first.attempt(), 1);

    let chime = Chime::start(&db, NODE, &[]).await;
    let second = wait_for(TIMEOUT, async || rx.requests().get(1).cloned())
        .await
        .expect("the restarted node sends attempt 2");
    assert_eq!(second.attempt_header(), 2, "{second:?}");
    assert_eq!(second.attempt(), 2, "{second:?}");
    assert_eq!(second.idempotency_key(), first.idempotency_key());
    assert_eq!(second.idempotency_key(), format!("{id}@{at}"));
    assert_eq!(second.body["payload"], json!({"step": "drain"}));
    assert!(
        second.at_ms >= first.at_ms + 1500,
        "the stored retry time is kept across the crash: attempt 2 {} ms after attempt 1",
        second.at_ms - first.at_ms
    );
    assert!(second.at_ms > killed_at);

    let done = wait_for(TIMEOUT, async || {
        chime
            .execution(&id, at)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .expect("the execution finishes after the restart");
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert!(
        holds_for(Duration::from_millis(500), async || rx.count() == 2).await,
        "nothing is sent after success: {:?}",
        rx.requests()
    );
    let attempt_ones = rx.requests().iter().filter(|c| c.attempt() == 1).count();
    assert_eq!(attempt_ones, 1, "attempt 1 is sent at most once");
}

async fn missed_fires_within_window_are_made_up_once_each(backend: Backend) {
    let db = Db::fresh(backend).await;
    // A receiver that takes 300 ms per callback and a 20 ms retry delay: a made-up fire whose
    // attempt 1 is still in flight must not also be resumed as a pending delivery (a second
    // request, attempt 2) by the restarted node.
    let rx = Receiver::start(Script::always(200).delayed(Duration::from_millis(300))).await;
    let mut chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("catchup");
    let period = 2000;
    let mut body = http_job("@every 2s", &rx.url());
    body["retry"] = json!({"initial_backoff_ms": 20, "max_backoff_ms": 20});
    let r = chime.put(&job_path(&id), &body).await;
    assert_eq!(r.status, 201, "{r}");

    let last_before = quiet_moment(&chime, &rx, &id, period).await;
    chime.kill9();
    let before = rx.requests();
    // The outage: at least two scheduled times pass while no node runs.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let restarted_at = now_ms();
    let chime = Chime::start(&db, NODE, &["--catchup-window", "60s"]).await;
    let ready_at = now_ms();

    // Settled: an on-time fire after the restart was delivered and everything is recorded.
    assert!(
        wait_until(TIMEOUT, async || {
            let delivered = rx.requests();
            let Some(last) = delivered.iter().map(Received::scheduled_ms).max() else {
                return false;
            };
            if last <= ready_at {
                return false;
            }
            let execs = executions_by_time(&chime, &id).await;
            delivered.iter().all(|c| {
                execs
                    .get(&c.scheduled_ms())
                    .is_some_and(|e| e["status"] == "succeeded")
            })
        })
        .await,
        "the job fires on time after the restart; got {:?}",
        rx.requests()
    );

    let delivered = rx.requests();
    assert_no_key_twice(&delivered);
    let mut times: Vec<i64> = delivered.iter().map(Received::scheduled_ms).collect();
    times.sort_unstable();
    assert!(
        times.windows(2).all(|w| w[1] - w[0] == period),
        "every scheduled time is delivered, none skipped: {times:?}"
    );
    let made_up: Vec<&Received> = delivered
        .iter()
        .filter(|c| c.scheduled_ms() > last_before && c.scheduled_ms() < restarted_at)
        .collect();
    assert!(
        made_up.len() >= 2,
        "a 5 s outage of an @every 2s job misses at least 2 times: {times:?} (last before {last_before}, restart {restarted_at})"
    );
    for c in &made_up {
        assert!(
            c.at_ms >= restarted_at && c.fired_ms() >= restarted_at,
            "a missed time is made up by the restarted node: {c:?}"
        );
        assert!(
            !before.iter().any(|b| b.scheduled_ms() == c.scheduled_ms()),
            "{c:?}"
        );
    }
    assert!(
        made_up
            .iter()
            .any(|c| c.fired_ms() - c.scheduled_ms() >= period),
        "made-up fires are late: {made_up:?}"
    );
    let execs = executions_by_time(&chime, &id).await;
    for t in &times {
        let e = &execs[t];
        assert_eq!(e["status"], "succeeded", "{e}");
        assert_eq!(e["attempts"], 1, "{e}");
    }
    assert!(
        execs.values().all(|e| e["status"] != "missed"),
        "inside the window nothing is recorded missed: {execs:?}"
    );
}

async fn missed_fires_beyond_window_fire_once_and_are_recorded_missed(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let mut chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("collapse");
    let period = 3000;
    let r = chime
        .put(&job_path(&id), &http_job("@every 3s", &rx.url()))
        .await;
    assert_eq!(r.status, 201, "{r}");

    let last_before = quiet_moment(&chime, &rx, &id, period).await;
    chime.kill9();
    // The outage: exactly three scheduled times pass; the new node starts 50 ms after the
    // third, so with a zero window the first two are `missed` and the third is the one
    // make-up fire (if the node loads its jobs within the 2.95 s before the fourth).
    let (t1, t2, t3) = (
        last_before + period,
        last_before + 2 * period,
        last_before + 3 * period,
    );
    let restart_at = t3 + 50;
    tokio::time::sleep(Duration::from_millis((restart_at - now_ms()).max(0) as u64)).await;
    let restarted_at = now_ms();
    let chime = Chime::start(&db, NODE, &["--catchup-window", "0s"]).await;

    // Settled: the first on-time fire after the restart delivered, everything recorded.
    assert!(
        wait_until(TIMEOUT, async || {
            let delivered = rx.requests();
            if !delivered.iter().any(|c| c.scheduled_ms() > t3) {
                return false;
            }
            let execs = executions_by_time(&chime, &id).await;
            delivered.iter().all(|c| {
                execs
                    .get(&c.scheduled_ms())
                    .is_some_and(|e| e["status"] == "succeeded")
            })
        })
        .await,
        "the job fires on time after the restart; got {:?}",
        rx.requests()
    );

    let delivered = rx.requests();
    assert_no_key_twice(&delivered);
    let execs = executions_by_time(&chime, &id).await;
    let last_delivered = delivered.iter().map(Received::scheduled_ms).max().unwrap();
    let first = *execs.keys().next().expect("executions are listed");
    let times: Vec<i64> = execs
        .keys()
        .copied()
        .filter(|t| *t <= last_delivered)
        .collect();
    assert!(
        times
            .iter()
            .enumerate()
            .all(|(i, t)| *t == first + i as i64 * period),
        "every scheduled time has an execution, none dropped silently: {times:?}"
    );
    let missed: Vec<i64> = times
        .iter()
        .copied()
        .filter(|t| execs[t]["status"] == "missed")
        .collect();
    assert_eq!(
        missed,
        [t1, t2],
        "the downtime times older than the latest are recorded missed (a longer block means \
         the restarted node took over {} ms to load its jobs): {execs:?}",
        period - 50
    );
    for t in &times {
        let status = &execs[t]["status"];
        let calls = delivered.iter().filter(|c| c.scheduled_ms() == *t).count();
        if missed.contains(t) {
            assert_eq!(calls, 0, "a missed time is not delivered: {t}");
        } else {
            assert_eq!(status, "succeeded", "{t}: {execs:?}");
            assert_eq!(calls, 1, "every other time is delivered once: {t}");
        }
    }

    // The one make-up fire: the latest missed time, sent by the restarted node at start-up.
    let cb = delivered
        .iter()
        .find(|c| c.scheduled_ms() == t3)
        .expect("the latest missed time is made up");
    assert!(
        cb.fired_ms() >= restarted_at && cb.at_ms >= restarted_at,
        "the make-up fire is sent by the restarted node: {cb:?}"
    );
    assert!(
        cb.fired_ms() - t3 < period,
        "it is made up at start-up, before the next scheduled time: {cb:?}"
    );
}

async fn sigterm_exits_cleanly_without_losing_inflight_delivery(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200).delayed(Duration::from_secs(1))).await;
    let mut chime = Chime::start(&db, NODE, &[]).await;
    let id = unique_id("sigterm");
    let r = chime
        .put(&job_path(&id), &http_job("@every 1h", &rx.url()))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let t = chime.post(&format!("/v1/jobs/{id}/trigger"), None).await;
    assert_eq!(t.status, 202, "{t}");
    let scheduled = parse_ms(t.json["scheduled_at"].as_str().expect("scheduled_at"));

    assert!(
        wait_until(TIMEOUT, async || rx.count() >= 1).await,
        "the callback is in flight"
    );
    let (status, took) = chime.sigterm().await;
    assert!(
        status.success(),
        "SIGTERM is a graceful stop, exit 0: {status}"
    );
    assert!(
        took <= Duration::from_secs(5),
        "the node exits within a few seconds of SIGTERM: {took:?}"
    );

    // Whatever the stopped node recorded, the restarted one finishes it: never lost.
    let chime = Chime::start(&db, NODE, &[]).await;
    let done = wait_for(TIMEOUT, async || {
        chime
            .execution(&id, scheduled)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .expect("the delivery in flight at SIGTERM is finished, after the restart at the latest");
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["manual"], true, "{done}");
    let calls: Vec<Received> = rx
        .requests()
        .into_iter()
        .filter(|c| c.scheduled_ms() == scheduled)
        .collect();
    let attempts: Vec<u64> = calls.iter().map(Received::attempt).collect();
    let expected: Vec<u64> = (1..=calls.len() as u64).collect();
    assert_eq!(
        attempts, expected,
        "attempt numbers go on after the restart, none repeated"
    );
    assert_eq!(
        done["attempts"],
        calls.len(),
        "the execution counts every attempt sent: {done}"
    );
}
