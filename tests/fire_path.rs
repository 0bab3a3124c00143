//! Black-box tests of the fire path's record-ahead stage: a write answered while a fire of
//! the job is already recorded (inside the lookahead horizon) cancels that fire, and a fire
//! batch whose COMMIT reply is lost is dispatched exactly once. Each runs on SQLite and on
//! MySQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use common::{
    Backend, Chime, Db, Received, Receiver, Script, now_ms, parse_ms, unique_id, wait_until,
};

common::backend_tests! {
    writes_inside_the_horizon_cancel_the_recorded_fire,
    a_fire_batch_whose_commit_reply_is_lost_is_dispatched_once,
}

const NODE: &str = "e2e-fire";
const TIMEOUT: Duration = Duration::from_secs(30);

fn job(schedule: &str, url: &str, v: u32) -> Value {
    json!({"schedule": schedule, "callback": {"http": {"url": url}}, "payload": {"v": v}})
}

fn of_job<'a>(rx: &'a [Received], id: &str) -> Vec<&'a Received> {
    rx.iter().filter(|r| r.job_id() == id).collect()
}

/// For a job every 5 s: waits until the fire at the next multiple of 5 s has been recorded
/// ahead (the job's `last_fire_at` is that time while it is still in the future, at least
/// `margin_ms` away). Returns that time, or None if this cycle was missed.
async fn recorded_ahead(chime: &Chime, id: &str, margin_ms: i64) -> Option<i64> {
    let next = (now_ms() / 5000 + 1) * 5000;
    let mut found = None;
    wait_until(Duration::from_secs(6), async || {
        let r = chime.get(&format!("/v1/jobs/{id}")).await;
        let last = r.json["last_fire_at"].as_str().map(parse_ms);
        if last == Some(next) || last == Some(next + 5000) {
            found = last;
            return true;
        }
        false
    })
    .await;
    found.filter(|t| t - now_ms() >= margin_ms)
}

async fn writes_inside_the_horizon_cancel_the_recorded_fire(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start(&db, NODE, &["--record-ahead", "2s"]).await;
    let url = rx.url();
    let replace = unique_id("replace");
    let pause = unique_id("pause");
    let delete = unique_id("delete");
    for id in [&replace, &pause, &delete] {
        let r = chime
            .put(&format!("/v1/jobs/{id}"), &job("*/5 * * * * *", &url, 1))
            .await;
        assert_eq!(r.status, 201, "{r}");
    }

    // Find a cycle where the three fires are recorded and still ≥ 400 ms away, then write.
    let mut attempt = 0;
    let (due, answered) = loop {
        attempt += 1;
        assert!(
            attempt <= 5,
            "never saw a fire recorded ahead with time to spare"
        );
        let Some(due) = recorded_ahead(&chime, &replace, 400).await else {
            // Too close to this cycle's fire: try the next cycle, not this one again.
            let next_cycle = (now_ms() / 5000 + 1) * 5000 + 100;
            tokio::time::sleep(Duration::from_millis((next_cycle - now_ms()).max(0) as u64)).await;
            continue;
        };
        // All three share the schedule and were armed together: the same batch took them.
        for id in [&pause, &delete] {
            let r = chime.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(
                r.json["last_fire_at"].as_str().map(parse_ms),
                Some(due),
                "{id} was not recorded with the same batch: {r}"
            );
        }
        let r = chime
            .put(
                &format!("/v1/jobs/{replace}"),
                &job("*/5 * * * * *", &url, 2),
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
        let r = chime.post(&format!("/v1/jobs/{pause}/pause"), None).await;
        assert_eq!(r.status, 200, "{r}");
        let r = chime.delete(&format!("/v1/jobs/{delete}")).await;
        assert_eq!(r.status, 204, "{r}");
        let answered = now_ms();
        if answered < due - 50 {
            break (due, answered);
        }
        // Too slow to prove anything this cycle (a loaded machine): put things back, retry.
        let r = chime.post(&format!("/v1/jobs/{pause}/resume"), None).await;
        assert_eq!(r.status, 200, "{r}");
        let r = chime
            .put(
                &format!("/v1/jobs/{delete}"),
                &job("*/5 * * * * *", &url, 1),
            )
            .await;
        assert_eq!(r.status, 201, "{r}");
        let r = chime
            .put(
                &format!("/v1/jobs/{replace}"),
                &job("*/5 * * * * *", &url, 1),
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
    };

    // The replaced job fires at `due` with the new definition, and only with it.
    assert!(
        wait_until(TIMEOUT, async || of_job(&rx.requests(), &replace)
            .iter()
            .any(|r| r.scheduled_ms() == due))
        .await,
        "the replaced job did not fire at {due}: {:?}",
        rx.requests()
    );
    // Past the instant by a margin: anything of the old definition would be here by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = rx.requests();
    let at_due: Vec<&Received> = of_job(&got, &replace)
        .into_iter()
        .filter(|r| r.scheduled_ms() == due)
        .collect();
    assert_eq!(
        at_due.len(),
        1,
        "one callback for the fire at {due}: {at_due:?}"
    );
    assert_eq!(
        at_due[0].body["payload"],
        json!({"v": 2}),
        "{:?}",
        at_due[0]
    );
    for r in of_job(&got, &replace) {
        assert!(
            !(r.at_ms >= answered && r.body["payload"] == json!({"v": 1})),
            "a callback of the replaced definition arrived after the answer: {r:?}"
        );
    }
    for id in [&pause, &delete] {
        let late: Vec<&Received> = of_job(&got, id)
            .into_iter()
            .filter(|r| r.scheduled_ms() >= due || r.at_ms >= answered)
            .collect();
        assert!(
            late.is_empty(),
            "{id} fired after its write was answered: {late:?}"
        );
    }
    // The cancelled fires left no row behind; the new definition's fire has exactly one.
    let execs = chime.executions(&replace).await;
    let at: Vec<&Value> = execs
        .iter()
        .filter(|e| e["scheduled_at"].as_str().map(parse_ms) == Some(due))
        .collect();
    assert_eq!(at.len(), 1, "{execs:?}");
    assert!(
        chime
            .executions(&pause)
            .await
            .iter()
            .all(|e| e["scheduled_at"].as_str().map(parse_ms) != Some(due)),
        "the paused job kept a row for the cancelled fire"
    );
    assert_eq!(chime.get(&format!("/v1/jobs/{delete}")).await.status, 404);
}

async fn a_fire_batch_whose_commit_reply_is_lost_is_dispatched_once(backend: Backend) {
    let db = Db::fresh(backend).await;
    let rx = Receiver::start(Script::always(200)).await;
    let chime = Chime::start_with_env(
        &db,
        NODE,
        &[],
        &[("CHIME_FAULTS", Some("lose_commit_reply:3"))],
    )
    .await;
    let url = rx.url();
    let mut first: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..20 {
        let id = format!("{}-{i}", unique_id("lost"));
        let r = chime
            .put(&format!("/v1/jobs/{id}"), &job("* * * * * *", &url, 1))
            .await;
        assert_eq!(r.status, 201, "{r}");
        // The first fire: already recorded (then it is `last_fire_at`), or `next_fire_at`.
        let at = r.json["last_fire_at"]
            .as_str()
            .or(r.json["next_fire_at"].as_str());
        first.insert(id, parse_ms(at.expect("next_fire_at")));
    }
    // Three batches committed and were reported lost; each was retried with its id.
    assert!(
        wait_until(TIMEOUT, async || chime
            .logs()
            .iter()
            .filter(|l| l.contains("fault injected"))
            .count()
            >= 3)
        .await,
        "the fault never fired: {:?}",
        chime.logs()
    );
    let until = now_ms() + 3000;
    assert!(
        wait_until(TIMEOUT, async || {
            let got = rx.requests();
            first
                .keys()
                .all(|id| of_job(&got, id).iter().any(|r| r.scheduled_ms() >= until))
        })
        .await,
        "fires stopped after the lost replies"
    );
    let got = rx.requests();
    for (id, from) in &first {
        let mut seen: BTreeMap<i64, u32> = BTreeMap::new();
        for r in of_job(&got, id) {
            *seen.entry(r.scheduled_ms()).or_default() += 1;
        }
        let doubled: Vec<i64> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(t, _)| *t)
            .collect();
        assert!(
            doubled.is_empty(),
            "{id}: fires delivered twice at {doubled:?}"
        );
        let expected: BTreeSet<i64> = (0..)
            .map(|k| from + k * 1000)
            .take_while(|t| *t <= until)
            .collect();
        let missing: Vec<&i64> = expected.iter().filter(|t| !seen.contains_key(t)).collect();
        assert!(
            missing.is_empty(),
            "{id}: fires never delivered at {missing:?}"
        );
    }
    assert!(
        got.iter().all(|r| r.attempt() == 1),
        "every fire went out once, as attempt 1"
    );
}
