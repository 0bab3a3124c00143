//! The store's contract, run against SQLite and against the real MariaDB/MySQL.
//!
//! MySQL comes from `CHIME_TEST_MYSQL_URL` (server URL without a database; `.ci/run` sets
//! it up); each test creates its own database. A missing server fails the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use chime::store::{
    ExecKey, ExecStatus, JobRecord, NewFire, Outcome, Progress, PutOutcome, Redrive, Store,
    StoreError,
};

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

fn mysql_server() -> String {
    std::env::var("CHIME_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://chime:chime@127.0.0.1:3306".into())
}

async fn mysql_store() -> Store {
    sqlx::any::install_default_drivers();
    let server = mysql_server();
    let name = format!(
        "chime_store_{}_{}",
        std::process::id(),
        DB_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let admin = sqlx::AnyPool::connect(&server).await.unwrap_or_else(|e| {
        panic!(
            "MariaDB/MySQL at {server} is required (run .ci/run, or set CHIME_TEST_MYSQL_URL): {e}"
        )
    });
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let store = Store::connect(&format!("{server}/{name}")).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn sqlite_store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("chime.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite_store().await).await; })*
        }
        mod mysql {
            $(#[tokio::test] async fn $name() { super::$name(super::mysql_store().await).await; })*
        }
    };
}

store_suite!(
    put_creates_then_replaces_keeping_history_fields,
    insert_conflicts_on_existing_id,
    list_paginates_by_id,
    delete_takes_executions_with_it,
    pause_and_resume,
    fires_are_recorded_once_and_advance_the_job,
    attempts_and_outcomes_are_compare_and_set,
    pending_deliveries_survive_for_restart,
    history_is_pruned_but_pending_kept,
    migrations_are_idempotent,
    leases_fence_fires_to_one_node,
    executions_list_by_status_across_jobs,
    a_dead_letter_is_redriven_with_a_fresh_budget,
);

fn all_slots() -> Vec<u32> {
    (0..chime::job::SLOTS).collect()
}

/// Every slot's lease for `node`, as a node holding them would pass to the fence.
async fn leased(store: &Store, node: &str) -> HashMap<u32, i64> {
    store.ensure_lease_rows().await.unwrap();
    store
        .acquire_leases(node, &all_slots(), 60_000)
        .await
        .unwrap()
}

fn job(id: &str, now: i64) -> JobRecord {
    JobRecord {
        id: id.into(),
        slot: chime::job::slot_of(id),
        spec: format!("{{\"schedule\":\"@every 1s\",\"id\":\"{id}\"}}"),
        paused: false,
        active_since: now,
        last_fire_at: None,
        next_fire_at: Some(now + 1000),
        created_at: now,
        updated_at: now,
    }
}

fn fire(id: &str, at: i64) -> NewFire {
    NewFire {
        key: ExecKey {
            job_id: id.into(),
            scheduled_at: at,
        },
        slot: chime::job::slot_of(id),
        manual: false,
        fired_at: at + 1,
        status: ExecStatus::Pending,
        next_attempt_at: Some(at + 1000),
    }
}

async fn put_creates_then_replaces_keeping_history_fields(store: Store) {
    let l = leased(&store, "n1").await;
    let j = job("a", 1_000);
    assert_eq!(store.put_job(&j).await.unwrap(), PutOutcome::Created);
    store
        .record_fires(
            "n1",
            &[fire("a", 2_000)],
            &[Progress {
                job_id: "a".into(),
                slot: chime::job::slot_of("a"),
                last_fire_at: 2_000,
                next_fire_at: Some(3_000),
            }],
            &l,
        )
        .await
        .unwrap();
    let replacement = JobRecord {
        spec: "{\"v\":2}".into(),
        created_at: 5_000,
        updated_at: 5_000,
        active_since: 5_000,
        next_fire_at: Some(6_000),
        ..job("a", 5_000)
    };
    assert_eq!(
        store.put_job(&replacement).await.unwrap(),
        PutOutcome::Replaced
    );
    let got = store.get_job("a").await.unwrap().unwrap();
    assert_eq!(got.spec, "{\"v\":2}");
    assert_eq!(got.created_at, 1_000, "replace keeps created_at");
    assert_eq!(got.last_fire_at, Some(2_000), "replace keeps last_fire_at");
    assert_eq!(got.next_fire_at, Some(6_000));
    assert_eq!(got.updated_at, 5_000);
    assert_eq!(got.slot, chime::job::slot_of("a"));
    assert!(store.get_job("missing").await.unwrap().is_none());
}

async fn insert_conflicts_on_existing_id(store: Store) {
    store.insert_job(&job("dup", 1)).await.unwrap();
    assert!(matches!(
        store.insert_job(&job("dup", 2)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_job("dup").await.unwrap().unwrap().created_at, 1);
    assert_eq!(store.count_jobs().await.unwrap(), 1);
}

async fn list_paginates_by_id(store: Store) {
    for id in ["c", "a", "e", "b", "d"] {
        store.insert_job(&job(id, 1)).await.unwrap();
    }
    let page1: Vec<String> = store
        .list_jobs(None, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page1, ["a", "b"]);
    let page2: Vec<String> = store
        .list_jobs(Some("b"), 2)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page2, ["c", "d"]);
    let page3 = store.list_jobs(Some("d"), 2).await.unwrap();
    assert_eq!(page3.len(), 1);
    let mut seen = 0;
    store
        .for_each_job_in(&all_slots(), |_| {
            seen += 1;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(seen, 5);
}

async fn delete_takes_executions_with_it(store: Store) {
    let l = leased(&store, "n1").await;
    store.insert_job(&job("d", 1)).await.unwrap();
    store.insert_job(&job("keep", 1)).await.unwrap();
    store
        .record_fires(
            "n1",
            &[fire("d", 10), fire("d", 20), fire("keep", 10)],
            &[],
            &l,
        )
        .await
        .unwrap();
    assert!(store.delete_job("d").await.unwrap());
    assert!(!store.delete_job("d").await.unwrap());
    assert!(store.list_executions("d", 10).await.unwrap().is_empty());
    assert_eq!(store.list_executions("keep", 10).await.unwrap().len(), 1);
    let pending = store.load_pending(&all_slots()).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(&*pending[0].key.job_id, "keep");
}

async fn pause_and_resume(store: Store) {
    store.insert_job(&job("p", 1)).await.unwrap();
    let paused = store
        .set_paused("p", true, 50, None)
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    assert_eq!(paused.next_fire_at, None);
    assert_eq!(paused.active_since, 1);
    let resumed = store
        .set_paused("p", false, 90, Some(1_090))
        .await
        .unwrap()
        .unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.active_since, 90, "resume restarts the schedule");
    assert_eq!(resumed.next_fire_at, Some(1_090));
    assert!(
        store
            .set_paused("nope", true, 1, None)
            .await
            .unwrap()
            .is_none()
    );
}

async fn fires_are_recorded_once_and_advance_the_job(store: Store) {
    let l = leased(&store, "n1").await;
    store.insert_job(&job("f", 0)).await.unwrap();
    store.insert_job(&job("g", 0)).await.unwrap();
    let progress = |id: &str, last, next| Progress {
        job_id: id.into(),
        slot: chime::job::slot_of(id),
        last_fire_at: last,
        next_fire_at: next,
    };
    let inserted = store
        .record_fires(
            "n1",
            &[fire("f", 1_000), fire("g", 1_000)],
            &[
                progress("f", 1_000, Some(2_000)),
                progress("g", 1_000, None),
            ],
            &l,
        )
        .await
        .unwrap()
        .inserted;
    assert_eq!(inserted, [true, true]);
    // The same (job, time) again, next to a new one: only the new one is ours to send.
    let inserted = store
        .record_fires("n1", &[fire("f", 1_000), fire("f", 2_000)], &[], &l)
        .await
        .unwrap()
        .inserted;
    assert_eq!(inserted, [false, true]);
    let f = store.get_job("f").await.unwrap().unwrap();
    assert_eq!((f.last_fire_at, f.next_fire_at), (Some(1_000), Some(2_000)));
    let g = store.get_job("g").await.unwrap().unwrap();
    assert_eq!((g.last_fire_at, g.next_fire_at), (Some(1_000), None));
    // last_fire_at never goes backwards.
    store
        .record_fires("n1", &[], &[progress("f", 500, Some(600))], &l)
        .await
        .unwrap();
    let f = store.get_job("f").await.unwrap().unwrap();
    assert_eq!(f.last_fire_at, Some(1_000));
    let execs = store.list_executions("f", 10).await.unwrap();
    assert_eq!(
        execs.iter().map(|e| e.scheduled_at).collect::<Vec<_>>(),
        [2_000, 1_000],
        "newest first"
    );
    assert_eq!(execs[1].fired_at, 1_001, "the first writer's row is kept");
    assert_eq!(execs[1].attempts, 1, "attempt 1 is stored with the fire");
    assert_eq!(execs[1].status, ExecStatus::Pending);
}

async fn attempts_and_outcomes_are_compare_and_set(store: Store) {
    let l = leased(&store, "n1").await;
    store.insert_job(&job("o", 0)).await.unwrap();
    store
        .record_fires("n1", &[fire("o", 1), fire("o", 2), fire("o", 3)], &[], &l)
        .await
        .unwrap();
    let key = |t| ExecKey {
        job_id: "o".into(),
        scheduled_at: t,
    };
    let applied = store
        .record_outcomes(&[
            (key(1), 1, Outcome::Succeeded { status: 200 }),
            (
                key(2),
                1,
                Outcome::Retry {
                    next_attempt_at: 9_000,
                    error: "HTTP 503".into(),
                    status: Some(503),
                    request: "{\"snapshot\":2}".into(),
                },
            ),
            (
                key(3),
                1,
                Outcome::Failed {
                    error: "not retried: HTTP 404".into(),
                    status: Some(404),
                    request: "{}".into(),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(applied, [true, true, true]);
    // Attempt 2 of the retried one: only from attempt 1, only once.
    assert!(store.begin_attempt(&key(2), 2).await.unwrap());
    assert!(!store.begin_attempt(&key(2), 2).await.unwrap());
    assert!(!store.begin_attempt(&key(1), 2).await.unwrap(), "finished");
    // An outcome for a stale attempt number changes nothing.
    let applied = store
        .record_outcomes(&[(
            key(2),
            1,
            Outcome::Failed {
                error: "late".into(),
                status: None,
                request: String::new(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(applied, [false]);
    let execs = store.list_executions("o", 10).await.unwrap();
    let by_time = |t| execs.iter().find(|e| e.scheduled_at == t).unwrap();
    assert_eq!(by_time(1).status, ExecStatus::Succeeded);
    assert_eq!(by_time(1).response_status, Some(200));
    assert_eq!(by_time(2).status, ExecStatus::Pending);
    assert_eq!(by_time(2).attempts, 2);
    assert_eq!(by_time(2).next_attempt_at, Some(9_000));
    assert_eq!(by_time(2).last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(by_time(3).status, ExecStatus::Failed);
    assert_eq!(by_time(3).response_status, Some(404));
    // A long error is cut, not rejected.
    let applied = store
        .record_outcomes(&[(
            key(2),
            2,
            Outcome::Failed {
                error: "é".repeat(3000),
                status: None,
                request: String::new(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(applied, [true]);
}

async fn pending_deliveries_survive_for_restart(store: Store) {
    let l = leased(&store, "n1").await;
    store.insert_job(&job("r", 0)).await.unwrap();
    let mut missed = fire("r", 5);
    missed.status = ExecStatus::Missed;
    missed.next_attempt_at = None;
    store
        .record_fires("n1", &[fire("r", 7), missed], &[], &l)
        .await
        .unwrap();
    let pending = store.load_pending(&all_slots()).await.unwrap();
    assert_eq!(pending.len(), 1, "missed rows are history, not deliveries");
    let p = &pending[0];
    assert_eq!(
        (p.key.scheduled_at, p.attempts, p.next_attempt_at),
        (7, 1, 1007)
    );
    assert_eq!(p.fired_at, 8);
    assert_eq!(p.request, "", "no snapshot before the first outcome");
    assert_eq!(p.job_spec.as_deref(), Some(job("r", 0).spec.as_str()));
    // Once a retry is scheduled, the snapshot travels with the delivery.
    let key = ExecKey {
        job_id: "r".into(),
        scheduled_at: 7,
    };
    store
        .record_outcomes(&[(
            key,
            1,
            Outcome::Retry {
                next_attempt_at: 2_000,
                error: "HTTP 503".into(),
                status: Some(503),
                request: "{\"snapshot\":true}".into(),
            },
        )])
        .await
        .unwrap();
    let pending = store.load_pending(&all_slots()).await.unwrap();
    assert_eq!(pending[0].request, "{\"snapshot\":true}");
    assert_eq!(pending[0].next_attempt_at, 2_000);
    let execs = store.list_executions("r", 10).await.unwrap();
    assert_eq!(execs[1].status, ExecStatus::Missed);
    assert_eq!(execs[1].attempts, 0);
}

async fn history_is_pruned_but_pending_kept(store: Store) {
    let l = leased(&store, "n1").await;
    store.insert_job(&job("h", 0)).await.unwrap();
    let fires: Vec<NewFire> = (1..=10).map(|t| fire("h", t)).collect();
    store.record_fires("n1", &fires, &[], &l).await.unwrap();
    // Finish all but t=2 (left pending).
    let done: Vec<_> = (1..=10)
        .filter(|t| *t != 2)
        .map(|t| {
            (
                ExecKey {
                    job_id: "h".into(),
                    scheduled_at: t,
                },
                1,
                Outcome::Succeeded { status: 204 },
            )
        })
        .collect();
    store.record_outcomes(&done).await.unwrap();
    let removed = store.prune_job_history("h", 3).await.unwrap();
    assert_eq!(
        removed, 6,
        "7 older than the newest 3, minus the pending one"
    );
    let left: Vec<i64> = store
        .list_executions("h", 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.scheduled_at)
        .collect();
    assert_eq!(left, [10, 9, 8, 2]);
    assert_eq!(store.prune_older_than(9, 1000).await.unwrap(), 1);
    let left: Vec<i64> = store
        .list_executions("h", 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.scheduled_at)
        .collect();
    assert_eq!(left, [10, 9, 2], "pending survives the age limit");
}

async fn migrations_are_idempotent(store: Store) {
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.count_jobs().await.unwrap(), 0);
}

async fn leases_fence_fires_to_one_node(store: Store) {
    let l1 = leased(&store, "n1").await;
    assert_eq!(l1.len(), chime::job::SLOTS as usize);
    store.insert_job(&job("x", 0)).await.unwrap();
    let slot = chime::job::slot_of("x");
    // n2 wants the slot while n1's lease is live: refused.
    let got = store.acquire_leases("n2", &[slot], 60_000).await.unwrap();
    assert!(got.is_empty(), "a live lease is not taken over");
    // n2 fires anyway (its gossip view says it owns x): fenced out, nothing recorded.
    let l2: HashMap<u32, i64> = [(slot, 1)].into();
    let rec = store
        .record_fires("n2", &[fire("x", 10)], &[], &l2)
        .await
        .unwrap();
    assert_eq!(rec.inserted, [false]);
    assert_eq!(rec.lost_slots, [slot]);
    assert!(store.list_executions("x", 10).await.unwrap().is_empty());
    // n1 hands over: n2 takes the slot with a new epoch; n1 is now fenced out.
    store.release_leases("n1", &[slot]).await.unwrap();
    let l2 = store.acquire_leases("n2", &[slot], 60_000).await.unwrap();
    assert!(l2[&slot] > l1[&slot], "a new epoch");
    let rec = store
        .record_fires("n1", &[fire("x", 20)], &[], &l1)
        .await
        .unwrap();
    assert_eq!((rec.inserted, rec.lost_slots), (vec![false], vec![slot]));
    let rec = store
        .record_fires("n2", &[fire("x", 20)], &[], &l2)
        .await
        .unwrap();
    assert_eq!((rec.inserted, rec.lost_slots), (vec![true], vec![]));
    assert_eq!(
        store.lease_holder(slot).await.unwrap().as_deref(),
        Some("n2")
    );
    // An expired lease can be taken over; renewing keeps a live one.
    let other = (slot + 1) % chime::job::SLOTS;
    store.release_leases("n1", &[other]).await.unwrap();
    store.acquire_leases("n2", &[other], -1).await.unwrap();
    let taken = store.acquire_leases("n3", &[other], 60_000).await.unwrap();
    assert!(taken.contains_key(&other), "expired lease taken over");
    let renewed = store.renew_leases("n3", &[other], 60_000).await.unwrap();
    assert_eq!(renewed.get(&other), taken.get(&other));
    let lost = store.renew_leases("n2", &[other], 60_000).await.unwrap();
    assert!(lost.is_empty(), "the old holder cannot renew");
    let counts = store.lease_counts().await.unwrap();
    assert!(
        counts.iter().any(|(o, n)| o == "n3" && *n == 1),
        "{counts:?}"
    );
}

async fn executions_list_by_status_across_jobs(store: Store) {
    let l = leased(&store, "n1").await;
    for id in ["a", "b"] {
        store.insert_job(&job(id, 0)).await.unwrap();
    }
    let fires = [fire("a", 10), fire("b", 10), fire("a", 20), fire("b", 30)];
    store.record_fires("n1", &fires, &[], &l).await.unwrap();
    let failed = |id: &str, at| {
        (
            ExecKey {
                job_id: id.into(),
                scheduled_at: at,
            },
            1,
            Outcome::Failed {
                error: "not retried: HTTP 404".into(),
                status: Some(404),
                request: "{}".into(),
            },
        )
    };
    store
        .record_outcomes(&[failed("a", 10), failed("b", 10), failed("b", 30)])
        .await
        .unwrap();
    let page = |after: Option<(i64, &'static str)>| {
        let store = store.clone();
        async move {
            store
                .list_executions_by_status(ExecStatus::Failed, after, 2)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.job_id, e.scheduled_at))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(None).await,
        [("b".to_string(), 30), ("a".to_string(), 10)]
    );
    assert_eq!(page(Some((10, "a"))).await, [("b".to_string(), 10)]);
    assert!(page(Some((10, "b"))).await.is_empty());
    let pending = store
        .list_executions_by_status(ExecStatus::Pending, None, 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "a@20 is still pending");
}

async fn a_dead_letter_is_redriven_with_a_fresh_budget(store: Store) {
    let l = leased(&store, "n1").await;
    let epoch = l[&chime::job::slot_of("d")];
    store.insert_job(&job("d", 0)).await.unwrap();
    store
        .record_fires("n1", &[fire("d", 10), fire("d", 20)], &[], &l)
        .await
        .unwrap();
    let key = |at| ExecKey {
        job_id: "d".into(),
        scheduled_at: at,
    };
    assert!(store.begin_attempt(&key(10), 2).await.unwrap());
    store
        .record_outcomes(&[(
            key(10),
            2,
            Outcome::Failed {
                error: "gave up after 2 attempts: HTTP 500".into(),
                status: Some(500),
                request: r#"{"old":"snapshot"}"#.into(),
            },
        )])
        .await
        .unwrap();

    // Only a failed delivery can be re-driven.
    assert!(matches!(
        store.redrive(&key(20), 5, 1000, "n1", epoch).await.unwrap(),
        Redrive::NotFailed(ExecStatus::Pending)
    ));
    assert!(matches!(
        store.redrive(&key(99), 5, 1000, "n1", epoch).await.unwrap(),
        Redrive::NotFound
    ));
    // Fenced: another node, or this node at a stale epoch, may not re-drive it.
    assert!(matches!(
        store.redrive(&key(10), 5, 1000, "n2", epoch).await.unwrap(),
        Redrive::NotOwner
    ));
    assert!(matches!(
        store
            .redrive(&key(10), 5, 1000, "n1", epoch - 1)
            .await
            .unwrap(),
        Redrive::NotOwner
    ));
    let Redrive::Redriven(p) = store.redrive(&key(10), 5, 1000, "n1", epoch).await.unwrap() else {
        panic!("a failed delivery is re-driven")
    };
    assert_eq!(
        (p.attempts, p.attempt_limit, p.next_attempt_at),
        (2, Some(7), 1000)
    );
    assert!(
        p.request.is_empty(),
        "sent with the job's current definition"
    );
    assert!(p.job_spec.is_some());
    let e = &store.list_executions("d", 10).await.unwrap()[1];
    assert_eq!((e.scheduled_at, e.status), (10, ExecStatus::Pending));
    // A second re-drive of the same delivery is refused while it is pending.
    assert!(matches!(
        store.redrive(&key(10), 5, 1000, "n1", epoch).await.unwrap(),
        Redrive::NotFailed(ExecStatus::Pending)
    ));
    // The budget survives a restart: the pending row carries it.
    let pending = store.load_pending(&all_slots()).await.unwrap();
    let p = pending.iter().find(|p| p.key == key(10)).unwrap();
    assert_eq!(p.attempt_limit, Some(7));
    let fresh = pending.iter().find(|p| p.key == key(20)).unwrap();
    assert_eq!(fresh.attempt_limit, None);
    // Attempt numbers go on from where they stopped.
    assert!(store.begin_attempt(&key(10), 3).await.unwrap());
}
