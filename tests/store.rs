//! The store's contract, run against SQLite and against the real MariaDB/MySQL.
//!
//! MySQL comes from `CHIME_TEST_MYSQL_URL` (server URL without a database; `.ci/run` sets
//! it up); each test creates its own database. A missing server fails the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use chime::job::{SLOTS, slot_of};
use chime::store::{
    BatchOutcome, Begin, ExecKey, ExecStatus, ExecutionRecord, Fence, JobRecord, NEVER_EXPIRES,
    NewFire, Outcome, Progress, PutOutcome, Redrive, Store, StoreError,
};
use sqlx::Row;

static DB_SEQ: AtomicU32 = AtomicU32::new(0);
static BATCH_SEQ: AtomicI64 = AtomicI64::new(1);

/// A store under test, and the URL of its database for what the store's API does not show
/// (row counts, the lease rows' columns).
struct Db {
    store: Store,
    url: String,
}

impl Db {
    async fn raw(&self) -> sqlx::AnyPool {
        sqlx::AnyPool::connect(&self.url).await.unwrap()
    }

    async fn count(&self, table: &str) -> i64 {
        let pool = self.raw().await;
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
        pool.close().await;
        n
    }

    /// `(owner, epoch, expires_at)` of a slot's lease row.
    async fn lease(&self, slot: u32) -> (String, i64, i64) {
        let pool = self.raw().await;
        let row = sqlx::query("SELECT owner, epoch, expires_at FROM slot_leases WHERE slot = ?")
            .bind(i64::from(slot))
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        (
            row.get("owner"),
            row.get::<i64, _>("epoch"),
            row.get::<i64, _>("expires_at"),
        )
    }
}

fn mysql_server() -> String {
    std::env::var("CHIME_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://chime:chime@127.0.0.1:3306".into())
}

async fn mysql_db() -> Db {
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
    let url = format!("{server}/{name}");
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Db { store, url }
}

async fn sqlite_db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("chime.db");
    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Db { store, url }
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite_db().await).await; })*
        }
        mod mysql {
            $(#[tokio::test] async fn $name() { super::$name(super::mysql_db().await).await; })*
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
    a_batch_retried_after_its_commit_is_not_recorded_twice,
    a_batch_with_a_recorded_fire_writes_nothing,
    a_stale_lease_leaves_its_slot_out_of_a_batch,
    a_stale_fence_refuses_job_writes,
    put_and_pause_cancel_exactly_the_unsent_fires,
    hand_back_requeues_only_the_given_unsent_fires,
    acquire_exclusive_takes_every_slot_for_good,
    old_fire_batch_ids_are_pruned,
    the_database_clock_is_utc_whatever_the_url_says,
);

fn all_slots() -> Vec<u32> {
    (0..SLOTS).collect()
}

/// Every slot's lease for `node`, as a node holding them would pass to the fence.
async fn leased(store: &Store, node: &str) -> HashMap<u32, i64> {
    store.ensure_lease_rows().await.unwrap();
    store
        .acquire_leases(node, &all_slots(), 60_000)
        .await
        .unwrap()
}

/// The fence of a write of job `id` by `node`, which holds `leases`.
fn fence(node: &str, leases: &HashMap<u32, i64>, id: &str) -> Fence {
    let slot = slot_of(id);
    Fence {
        node: node.into(),
        slot,
        epoch: leases[&slot],
    }
}

/// `leases` restricted to `slots`, each at the epoch before (a lease this node held once).
fn stale(leases: &HashMap<u32, i64>, slots: &[u32]) -> HashMap<u32, i64> {
    slots.iter().map(|s| (*s, leases[s] - 1)).collect()
}

/// A job id (other than `taken`) whose slot is `slot`.
fn id_in_slot(slot: u32, taken: &str) -> String {
    (0..)
        .map(|i| format!("in-{slot}-{i}"))
        .find(|id| id != taken && slot_of(id) == slot)
        .unwrap()
}

/// Records `fires` and `progress` as a new batch.
async fn record(
    store: &Store,
    node: &str,
    leases: &HashMap<u32, i64>,
    fires: &[NewFire],
    progress: &[Progress],
) -> Result<BatchOutcome, StoreError> {
    let batch = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    store
        .record_batch(node, batch, fires, progress, leases, 0)
        .await
}

fn committed(lost_slots: &[u32]) -> BatchOutcome {
    BatchOutcome::Committed {
        lost_slots: lost_slots.to_vec(),
    }
}

fn job(id: &str, now: i64) -> JobRecord {
    JobRecord {
        id: id.into(),
        slot: slot_of(id),
        spec: format!("{{\"schedule\":\"@every 1s\",\"id\":\"{id}\"}}"),
        paused: false,
        active_since: now,
        last_fire_at: None,
        next_fire_at: Some(now + 1000),
        created_at: now,
        updated_at: now,
        version: 1,
    }
}

fn fire(id: &str, at: i64) -> NewFire {
    NewFire {
        key: key(id, at),
        slot: slot_of(id),
        manual: false,
        fired_at: at + 1,
        status: ExecStatus::Pending,
        next_attempt_at: Some(at + 1000),
    }
}

fn key(id: &str, at: i64) -> ExecKey {
    ExecKey {
        job_id: id.into(),
        scheduled_at: at,
    }
}

fn progress(id: &str, last: i64, next: Option<i64>) -> Progress {
    Progress {
        job_id: id.into(),
        slot: slot_of(id),
        last_fire_at: last,
        next_fire_at: next,
    }
}

/// Every execution row, by job and time.
async fn executions(store: &Store) -> Vec<ExecutionRecord> {
    let mut all = Vec::new();
    for status in [
        ExecStatus::Pending,
        ExecStatus::Succeeded,
        ExecStatus::Failed,
        ExecStatus::Missed,
    ] {
        all.extend(
            store
                .list_executions_by_status(status, None, 10_000)
                .await
                .unwrap(),
        );
    }
    all.sort_by(|a, b| (&a.job_id, a.scheduled_at).cmp(&(&b.job_id, b.scheduled_at)));
    all
}

/// The `(job, time)` of each execution row.
fn keys_of(execs: &[ExecutionRecord]) -> Vec<(&str, i64)> {
    execs
        .iter()
        .map(|e| (e.job_id.as_str(), e.scheduled_at))
        .collect()
}

async fn jobs(store: &Store, ids: &[&str]) -> Vec<Option<JobRecord>> {
    let mut out = Vec::new();
    for id in ids {
        out.push(store.get_job(id).await.unwrap());
    }
    out
}

async fn put_creates_then_replaces_keeping_history_fields(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    let f = fence("n1", &l, "a");
    let j = job("a", 1_000);
    assert_eq!(
        store.put_job(&j, &f, &[]).await.unwrap(),
        PutOutcome::Created
    );
    let rec = record(
        &store,
        "n1",
        &l,
        &[fire("a", 2_000)],
        &[progress("a", 2_000, Some(3_000))],
    )
    .await
    .unwrap();
    assert_eq!(rec, committed(&[]));
    let replacement = JobRecord {
        spec: "{\"v\":2}".into(),
        created_at: 5_000,
        updated_at: 5_000,
        active_since: 5_000,
        next_fire_at: Some(6_000),
        ..job("a", 5_000)
    };
    assert_eq!(
        store.put_job(&replacement, &f, &[]).await.unwrap(),
        PutOutcome::Replaced
    );
    let got = store.get_job("a").await.unwrap().unwrap();
    assert_eq!(got.spec, "{\"v\":2}");
    assert_eq!(got.created_at, 1_000, "replace keeps created_at");
    assert_eq!(got.last_fire_at, Some(2_000), "replace keeps last_fire_at");
    assert_eq!(got.next_fire_at, Some(6_000));
    assert_eq!(got.updated_at, 5_000);
    assert_eq!(got.slot, slot_of("a"));
    assert!(store.get_job("missing").await.unwrap().is_none());
    assert_eq!(
        store.list_executions("a", 10).await.unwrap().len(),
        1,
        "nothing cancelled, nothing deleted"
    );
}

async fn insert_conflicts_on_existing_id(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    let f = fence("n1", &l, "dup");
    store.insert_job(&job("dup", 1), &f).await.unwrap();
    assert!(matches!(
        store.insert_job(&job("dup", 2), &f).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_job("dup").await.unwrap().unwrap().created_at, 1);
    assert_eq!(store.count_jobs().await.unwrap(), 1);
}

async fn list_paginates_by_id(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    for id in ["c", "a", "e", "b", "d"] {
        store
            .insert_job(&job(id, 1), &fence("n1", &l, id))
            .await
            .unwrap();
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

async fn delete_takes_executions_with_it(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    let f = fence("n1", &l, "d");
    store.insert_job(&job("d", 1), &f).await.unwrap();
    store
        .insert_job(&job("keep", 1), &fence("n1", &l, "keep"))
        .await
        .unwrap();
    record(
        &store,
        "n1",
        &l,
        &[fire("d", 10), fire("d", 20), fire("keep", 10)],
        &[],
    )
    .await
    .unwrap();
    assert!(store.delete_job("d", &f).await.unwrap());
    assert!(!store.delete_job("d", &f).await.unwrap());
    assert!(store.list_executions("d", 10).await.unwrap().is_empty());
    assert_eq!(store.list_executions("keep", 10).await.unwrap().len(), 1);
    let pending = store.load_pending(&all_slots()).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(&*pending[0].key.job_id, "keep");
}

async fn pause_and_resume(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    let f = fence("n1", &l, "p");
    store.insert_job(&job("p", 1), &f).await.unwrap();
    let paused = store
        .set_paused("p", true, 50, None, &f, &[])
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    assert_eq!(paused.next_fire_at, None);
    assert_eq!(paused.active_since, 1);
    let resumed = store
        .set_paused("p", false, 90, Some(1_090), &f, &[])
        .await
        .unwrap()
        .unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.active_since, 90, "resume restarts the schedule");
    assert_eq!(resumed.next_fire_at, Some(1_090));
    assert_eq!(store.get_job("p").await.unwrap().unwrap(), resumed);
    assert!(
        store
            .set_paused("nope", true, 1, None, &fence("n1", &l, "nope"), &[])
            .await
            .unwrap()
            .is_none()
    );
}

async fn fires_are_recorded_once_and_advance_the_job(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    for id in ["f", "g"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l, id))
            .await
            .unwrap();
    }
    let rec = record(
        &store,
        "n1",
        &l,
        &[fire("f", 1_000), fire("g", 1_000)],
        &[
            progress("f", 1_000, Some(2_000)),
            progress("g", 1_000, None),
        ],
    )
    .await
    .unwrap();
    assert_eq!(rec, committed(&[]));
    // The same (job, time) again, next to a new one: the batch is refused, naming the fire
    // recorded already (someone else's to send); without it, the new one is recorded.
    let mut again = fire("f", 1_000);
    again.fired_at = 1_500;
    match record(&store, "n1", &l, &[again, fire("f", 2_000)], &[]).await {
        Err(StoreError::Recorded(keys)) => assert_eq!(keys, [key("f", 1_000)]),
        other => panic!("expected Recorded, got {other:?}"),
    }
    let rec = record(&store, "n1", &l, &[fire("f", 2_000)], &[])
        .await
        .unwrap();
    assert_eq!(rec, committed(&[]));
    let f = store.get_job("f").await.unwrap().unwrap();
    assert_eq!((f.last_fire_at, f.next_fire_at), (Some(1_000), Some(2_000)));
    let g = store.get_job("g").await.unwrap().unwrap();
    assert_eq!((g.last_fire_at, g.next_fire_at), (Some(1_000), None));
    // last_fire_at never goes backwards.
    record(&store, "n1", &l, &[], &[progress("f", 500, Some(600))])
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
    assert_eq!(execs[1].node, "n1");
}

async fn attempts_and_outcomes_are_compare_and_set(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    store
        .insert_job(&job("o", 0), &fence("n1", &l, "o"))
        .await
        .unwrap();
    record(
        &store,
        "n1",
        &l,
        &[fire("o", 1), fire("o", 2), fire("o", 3)],
        &[],
    )
    .await
    .unwrap();
    let key = |t| key("o", t);
    let applied = store
        .record_outcomes(&[
            (
                key(1),
                1,
                Outcome::Succeeded {
                    status: 200,
                    log: None,
                },
            ),
            (
                key(2),
                1,
                Outcome::Retry {
                    next_attempt_at: 9_000,
                    error: "HTTP 503".into(),
                    status: Some(503),
                    request: "{\"snapshot\":2}".into(),
                    log: None,
                },
            ),
            (
                key(3),
                1,
                Outcome::Failed {
                    error: "not retried: HTTP 404".into(),
                    status: Some(404),
                    request: "{}".into(),
                    log: None,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(applied, [true, true, true]);
    // Attempt 2 of the retried one: only from attempt 1, only once.
    let f = fence("n1", &l, "o");
    // Not with a lease the node no longer holds at that epoch, nor with another's.
    let old = Fence {
        epoch: f.epoch - 1,
        ..f.clone()
    };
    assert!(matches!(
        store.begin_attempt(&key(2), 2, &old).await,
        Err(StoreError::Fenced(_))
    ));
    let other = Fence {
        node: "n2".into(),
        ..f.clone()
    };
    assert!(matches!(
        store.begin_attempt(&key(2), 2, &other).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        store.begin_attempt(&key(2), 2, &f).await.unwrap(),
        Begin::Started
    );
    // Repeated (a retry after a lost reply): the row says where it is.
    assert_eq!(
        store.begin_attempt(&key(2), 2, &f).await.unwrap(),
        Begin::Moved { attempts: 2 }
    );
    assert_eq!(
        store.begin_attempt(&key(1), 2, &f).await.unwrap(),
        Begin::Gone,
        "finished"
    );
    assert_eq!(
        store.begin_attempt(&key(9), 2, &f).await.unwrap(),
        Begin::Gone,
        "no such row"
    );
    assert!(store.still_pending(&key(2), 2).await.unwrap());
    assert!(!store.still_pending(&key(2), 1).await.unwrap());
    assert!(!store.still_pending(&key(1), 1).await.unwrap(), "finished");
    // An outcome for a stale attempt number changes nothing.
    let applied = store
        .record_outcomes(&[(
            key(2),
            1,
            Outcome::Failed {
                error: "late".into(),
                status: None,
                request: String::new(),
                log: None,
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
                log: None,
            },
        )])
        .await
        .unwrap();
    assert_eq!(applied, [true]);
}

async fn pending_deliveries_survive_for_restart(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    store
        .insert_job(&job("r", 0), &fence("n1", &l, "r"))
        .await
        .unwrap();
    let mut missed = fire("r", 5);
    missed.status = ExecStatus::Missed;
    missed.next_attempt_at = None;
    record(&store, "n1", &l, &[fire("r", 7), missed], &[])
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
    store
        .record_outcomes(&[(
            key("r", 7),
            1,
            Outcome::Retry {
                next_attempt_at: 2_000,
                error: "HTTP 503".into(),
                status: Some(503),
                request: "{\"snapshot\":true}".into(),
                log: None,
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

async fn history_is_pruned_but_pending_kept(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    store
        .insert_job(&job("h", 0), &fence("n1", &l, "h"))
        .await
        .unwrap();
    let fires: Vec<NewFire> = (1..=10).map(|t| fire("h", t)).collect();
    record(&store, "n1", &l, &fires, &[]).await.unwrap();
    // Finish all but t=2 (left pending).
    let done: Vec<_> = (1..=10)
        .filter(|t| *t != 2)
        .map(|t| {
            (
                key("h", t),
                1,
                Outcome::Succeeded {
                    status: 204,
                    log: None,
                },
            )
        })
        .collect();
    store.record_outcomes(&done).await.unwrap();
    let removed = store.prune_job_history(&["h".into()], 3).await.unwrap();
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

async fn migrations_are_idempotent(db: Db) {
    let store = &db.store;
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.count_jobs().await.unwrap(), 0);
    assert_eq!(db.count("fire_batches").await, 0);
}

async fn leases_fence_fires_to_one_node(Db { store, .. }: Db) {
    let l1 = leased(&store, "n1").await;
    assert_eq!(l1.len(), SLOTS as usize);
    store
        .insert_job(&job("x", 0), &fence("n1", &l1, "x"))
        .await
        .unwrap();
    let slot = slot_of("x");
    // n2 wants the slot while n1's lease is live: refused.
    let got = store.acquire_leases("n2", &[slot], 60_000).await.unwrap();
    assert!(got.is_empty(), "a live lease is not taken over");
    // n2 fires anyway (its gossip view says it owns x), even naming n1's epoch: fenced out,
    // nothing recorded.
    let l2: HashMap<u32, i64> = [(slot, l1[&slot])].into();
    let rec = record(&store, "n2", &l2, &[fire("x", 10)], &[])
        .await
        .unwrap();
    assert_eq!(rec, committed(&[slot]));
    assert!(store.list_executions("x", 10).await.unwrap().is_empty());
    // n1 hands over: n2 takes the slot with a new epoch; n1 is now fenced out.
    store.release_leases("n1", &[slot]).await.unwrap();
    let l2 = store.acquire_leases("n2", &[slot], 60_000).await.unwrap();
    assert!(l2[&slot] > l1[&slot], "a new epoch");
    let rec = record(&store, "n1", &l1, &[fire("x", 20)], &[])
        .await
        .unwrap();
    assert_eq!(rec, committed(&[slot]));
    assert!(store.list_executions("x", 10).await.unwrap().is_empty());
    let rec = record(&store, "n2", &l2, &[fire("x", 20)], &[])
        .await
        .unwrap();
    assert_eq!(rec, committed(&[]));
    let execs = store.list_executions("x", 10).await.unwrap();
    assert_eq!(
        execs
            .iter()
            .map(|e| (e.scheduled_at, e.node.as_str()))
            .collect::<Vec<_>>(),
        [(20, "n2")]
    );
    assert_eq!(
        store.lease_holder(slot).await.unwrap().as_deref(),
        Some("n2")
    );
    // An expired lease can be taken over; renewing keeps a live one.
    let other = (slot + 1) % SLOTS;
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

async fn executions_list_by_status_across_jobs(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    for id in ["a", "b"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l, id))
            .await
            .unwrap();
    }
    let fires = [fire("a", 10), fire("b", 10), fire("a", 20), fire("b", 30)];
    record(&store, "n1", &l, &fires, &[]).await.unwrap();
    let failed = |id: &str, at| {
        (
            key(id, at),
            1,
            Outcome::Failed {
                error: "not retried: HTTP 404".into(),
                status: Some(404),
                request: "{}".into(),
                log: None,
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

async fn a_dead_letter_is_redriven_with_a_fresh_budget(Db { store, .. }: Db) {
    let l = leased(&store, "n1").await;
    let epoch = l[&slot_of("d")];
    store
        .insert_job(&job("d", 0), &fence("n1", &l, "d"))
        .await
        .unwrap();
    record(&store, "n1", &l, &[fire("d", 10), fire("d", 20)], &[])
        .await
        .unwrap();
    let key = |at| key("d", at);
    assert_eq!(
        store
            .begin_attempt(&key(10), 2, &fence("n1", &l, "d"))
            .await
            .unwrap(),
        Begin::Started
    );
    store
        .record_outcomes(&[(
            key(10),
            2,
            Outcome::Failed {
                error: "gave up after 2 attempts: HTTP 500".into(),
                status: Some(500),
                request: r#"{"old":"snapshot"}"#.into(),
                log: None,
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
    assert_eq!(
        store
            .begin_attempt(&key(10), 3, &fence("n1", &l, "d"))
            .await
            .unwrap(),
        Begin::Started
    );
}

/// A batch whose COMMIT succeeded but whose reply was lost is retried with the same id: the
/// retry finds the batch and writes nothing.
async fn a_batch_retried_after_its_commit_is_not_recorded_twice(db: Db) {
    let store = &db.store;
    let l = leased(store, "n1").await;
    for id in ["f", "g"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l, id))
            .await
            .unwrap();
    }
    let sg = slot_of("g");
    assert_ne!(slot_of("f"), sg);
    let batch = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    let fires = [fire("f", 1_000), fire("g", 1_000)];
    let prog = [
        progress("f", 1_000, Some(2_000)),
        progress("g", 1_000, Some(2_000)),
    ];
    assert_eq!(
        store
            .record_batch("n1", batch, &fires, &prog, &l, 100)
            .await
            .unwrap(),
        committed(&[])
    );
    let execs = executions(store).await;
    assert_eq!(keys_of(&execs), [("f", 1_000), ("g", 1_000)]);
    let jobs_then = jobs(store, &["f", "g"]).await;
    assert_eq!(jobs_then[0].as_ref().unwrap().last_fire_at, Some(1_000));
    assert_eq!(db.count("fire_batches").await, 1);

    assert_eq!(
        store
            .record_batch("n1", batch, &fires, &prog, &l, 200)
            .await
            .unwrap(),
        BatchOutcome::AlreadyCommitted { lost_slots: vec![] }
    );
    // Not even different contents under the same id are written: a retry applies nothing.
    let later = [
        progress("f", 3_000, Some(4_000)),
        progress("g", 3_000, None),
    ];
    assert_eq!(
        store
            .record_batch("n1", batch, &[fire("f", 3_000)], &later, &l, 300)
            .await
            .unwrap(),
        BatchOutcome::AlreadyCommitted { lost_slots: vec![] }
    );
    assert_eq!(executions(store).await, execs);
    assert_eq!(jobs(store, &["f", "g"]).await, jobs_then);
    assert_eq!(db.count("executions").await, 2);
    assert_eq!(db.count("fire_batches").await, 1);

    // A retry after one of the slots moved says whose fires are no longer this node's.
    store.release_leases("n1", &[sg]).await.unwrap();
    store.acquire_leases("n2", &[sg], 60_000).await.unwrap();
    assert_eq!(
        store
            .record_batch("n1", batch, &fires, &prog, &l, 400)
            .await
            .unwrap(),
        BatchOutcome::AlreadyCommitted {
            lost_slots: vec![sg]
        }
    );
    assert_eq!(executions(store).await, execs);
    assert_eq!(jobs(store, &["f", "g"]).await, jobs_then);
    assert_eq!(db.count("fire_batches").await, 1);
}

/// A fire recorded already (by whoever recorded it first, who sends it) fails the whole
/// batch, naming it; nothing of the batch is written, so the retry without it commits.
async fn a_batch_with_a_recorded_fire_writes_nothing(db: Db) {
    let store = &db.store;
    let l = leased(store, "n1").await;
    for id in ["x", "y"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l, id))
            .await
            .unwrap();
    }
    assert_ne!(slot_of("x"), slot_of("y"));
    let rec = record(
        store,
        "n1",
        &l,
        &[fire("x", 10)],
        &[progress("x", 10, Some(20))],
    )
    .await
    .unwrap();
    assert_eq!(rec, committed(&[]));
    let execs = executions(store).await;
    let jobs_then = jobs(store, &["x", "y"]).await;
    assert_eq!(db.count("fire_batches").await, 1);

    let batch = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut dup = fire("x", 10);
    dup.fired_at = 99;
    let fires = [fire("y", 10), dup, fire("x", 20)];
    let prog = [progress("x", 20, Some(30)), progress("y", 10, Some(20))];
    match store.record_batch("n1", batch, &fires, &prog, &l, 0).await {
        Err(StoreError::Recorded(keys)) => assert_eq!(keys, [key("x", 10)]),
        other => panic!("expected Recorded([x@10]), got {other:?}"),
    }
    assert_eq!(executions(store).await, execs, "no row of the batch");
    assert_eq!(jobs(store, &["x", "y"]).await, jobs_then, "no progress");
    assert_eq!(db.count("fire_batches").await, 1, "no batch row");

    // Several recorded fires are all named.
    match record(store, "n1", &l, &fires, &prog).await {
        Err(StoreError::Recorded(keys)) => assert_eq!(keys, [key("x", 10)]),
        other => panic!("expected Recorded([x@10]), got {other:?}"),
    }
    record(store, "n1", &l, &[fire("y", 5)], &[]).await.unwrap();
    let execs = executions(store).await;
    match record(
        store,
        "n1",
        &l,
        &[fire("x", 10), fire("y", 5), fire("y", 6)],
        &[],
    )
    .await
    {
        Err(StoreError::Recorded(mut keys)) => {
            keys.sort();
            assert_eq!(keys, [key("x", 10), key("y", 5)]);
        }
        other => panic!("expected Recorded([x@10, y@5]), got {other:?}"),
    }
    assert_eq!(executions(store).await, execs);

    // The caller retries the same batch without the recorded fire: this commits, the whole
    // of it.
    let rest: Vec<NewFire> = fires
        .iter()
        .filter(|f| f.key != key("x", 10))
        .cloned()
        .collect();
    assert_eq!(
        store
            .record_batch("n1", batch, &rest, &prog, &l, 0)
            .await
            .unwrap(),
        committed(&[])
    );
    let now = executions(store).await;
    assert_eq!(keys_of(&now), [("x", 10), ("x", 20), ("y", 5), ("y", 10)]);
    assert_eq!(now[0].fired_at, 11, "the first writer's row is untouched");
    let now_jobs = jobs(store, &["x", "y"]).await;
    let [Some(x), Some(y)] = &now_jobs[..] else {
        panic!("{now_jobs:?}")
    };
    assert_eq!((x.last_fire_at, x.next_fire_at), (Some(20), Some(30)));
    assert_eq!((y.last_fire_at, y.next_fire_at), (Some(10), Some(20)));
    assert_eq!(db.count("fire_batches").await, 3);
}

/// A batch carries the epochs its node believed it held; each slot whose lease is not that
/// (taken over, expired, or re-acquired at a newer epoch) is left out, fires and progress,
/// while the slots still held are written.
async fn a_stale_lease_leaves_its_slot_out_of_a_batch(db: Db) {
    let store = &db.store;
    let l1 = leased(store, "n1").await;
    let ids = ["x", "e", "r", "y"];
    for id in ids {
        store
            .insert_job(&job(id, 0), &fence("n1", &l1, id))
            .await
            .unwrap();
    }
    let [sx, se, sr, sy] = ids.map(slot_of);
    let mut distinct = vec![sx, se, sr, sy];
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4);
    // x: n1's lease expires and n2 takes the slot.
    store.acquire_leases("n1", &[sx], -1).await.unwrap();
    let l2 = store.acquire_leases("n2", &[sx], 60_000).await.unwrap();
    assert!(l2.contains_key(&sx));
    // e: n1's lease expired, nobody took it: same owner, same epoch.
    assert!(
        store
            .renew_leases("n1", &[se], -1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.lease(se).await.1, l1[&se]);
    // r: n1 holds it again, at a newer epoch than the batch's.
    let again = store.acquire_leases("n1", &[sr], 60_000).await.unwrap();
    assert!(again[&sr] > l1[&sr]);

    let jobs_then = jobs(store, &ids).await;
    let fires: Vec<NewFire> = ids.iter().map(|id| fire(id, 10)).collect();
    let prog: Vec<Progress> = ids.iter().map(|id| progress(id, 10, Some(20))).collect();
    let rec = record(store, "n1", &l1, &fires, &prog).await.unwrap();
    let BatchOutcome::Committed { mut lost_slots } = rec else {
        panic!("expected Committed, got {rec:?}")
    };
    lost_slots.sort_unstable();
    let mut expect = vec![sx, se, sr];
    expect.sort_unstable();
    assert_eq!(lost_slots, expect);
    let execs = executions(store).await;
    assert_eq!(keys_of(&execs), [("y", 10)]);
    let jobs_now = jobs(store, &ids).await;
    assert_eq!(jobs_now[..3], jobs_then[..3], "no progress in lost slots");
    let y = jobs_now[3].as_ref().unwrap();
    assert_eq!((y.last_fire_at, y.next_fire_at), (Some(10), Some(20)));
    let (owner, epoch, _) = db.lease(sx).await;
    assert_eq!(
        (owner.as_str(), epoch),
        ("n2", l2[&sx]),
        "the new lease is untouched"
    );

    // The slot's new owner records its fires.
    let rec = record(
        store,
        "n2",
        &l2,
        &[fire("x", 10)],
        &[progress("x", 10, Some(20))],
    )
    .await
    .unwrap();
    assert_eq!(rec, committed(&[]));
    let x = store.list_executions("x", 10).await.unwrap();
    assert_eq!((x.len(), x[0].node.as_str()), (1, "n2"));
}

/// Job writes are fenced by the job's slot lease: a stale fence writes nothing, neither the
/// job nor the deletion of its cancelled fires.
async fn a_stale_fence_refuses_job_writes(db: Db) {
    let store = &db.store;
    let l1 = leased(store, "n1").await;
    for id in ["x", "y", "z"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l1, id))
            .await
            .unwrap();
    }
    let sx = slot_of("x");
    record(store, "n1", &l1, &[fire("x", 10), fire("x", 20)], &[])
        .await
        .unwrap();
    let taken_over = fence("n1", &l1, "x");
    store.release_leases("n1", &[sx]).await.unwrap();
    let l2 = store.acquire_leases("n2", &[sx], 60_000).await.unwrap();
    // y: n1's own lease, expired. z: n1's own lease, at an older epoch.
    let expired = fence("n1", &l1, "y");
    assert!(
        store
            .renew_leases("n1", &[expired.slot], -1)
            .await
            .unwrap()
            .is_empty()
    );
    let old_epoch = Fence {
        epoch: l1[&slot_of("z")] - 1,
        ..fence("n1", &l1, "z")
    };

    let jobs_then = jobs(store, &["x", "y", "z"]).await;
    let execs = executions(store).await;
    let count = store.count_jobs().await.unwrap();
    let fenced = |r: Result<_, StoreError>, slot: u32| match r {
        Err(StoreError::Fenced(s)) => assert_eq!(s, slot),
        Err(e) => panic!("expected Fenced({slot}), got {e:?}"),
        Ok(_) => panic!("expected Fenced({slot}), got Ok"),
    };
    let newcomer = id_in_slot(sx, "x");
    fenced(
        store
            .insert_job(&job(&newcomer, 5), &taken_over)
            .await
            .map(|_| ()),
        sx,
    );
    let v2 = |id: &str| JobRecord {
        spec: "{\"v\":2}".into(),
        ..job(id, 5)
    };
    fenced(
        store
            .put_job(&v2("x"), &taken_over, &[10, 20])
            .await
            .map(|_| ()),
        sx,
    );
    fenced(
        store
            .put_job(&v2(&newcomer), &taken_over, &[])
            .await
            .map(|_| ()),
        sx,
    );
    fenced(store.delete_job("x", &taken_over).await.map(|_| ()), sx);
    fenced(
        store
            .set_paused("x", true, 5, None, &taken_over, &[10])
            .await
            .map(|_| ()),
        sx,
    );
    fenced(
        store.put_job(&v2("y"), &expired, &[]).await.map(|_| ()),
        expired.slot,
    );
    fenced(
        store.delete_job("y", &expired).await.map(|_| ()),
        expired.slot,
    );
    fenced(
        store.put_job(&v2("z"), &old_epoch, &[]).await.map(|_| ()),
        old_epoch.slot,
    );
    fenced(
        store
            .set_paused("z", true, 5, None, &old_epoch, &[])
            .await
            .map(|_| ()),
        old_epoch.slot,
    );
    assert_eq!(jobs(store, &["x", "y", "z"]).await, jobs_then);
    assert!(store.get_job(&newcomer).await.unwrap().is_none());
    assert_eq!(store.count_jobs().await.unwrap(), count);
    assert_eq!(executions(store).await, execs);

    // The slot's new owner may write it.
    let fresh = fence("n2", &l2, "x");
    assert_eq!(
        store.put_job(&v2("x"), &fresh, &[10]).await.unwrap(),
        PutOutcome::Replaced
    );
    assert_eq!(store.get_job("x").await.unwrap().unwrap().spec, "{\"v\":2}");
    assert_eq!(
        keys_of(&store.list_executions("x", 10).await.unwrap()),
        [("x", 20)]
    );
    store.insert_job(&job(&newcomer, 5), &fresh).await.unwrap();
    assert!(store.delete_job(&newcomer, &fresh).await.unwrap());
}

/// A replace (or a pause) deletes the fires of the old definition recorded ahead and not
/// sent: exactly the given pending, never-attempted rows of that job.
async fn put_and_pause_cancel_exactly_the_unsent_fires(db: Db) {
    let store = &db.store;
    let l = leased(store, "n1").await;
    for id in ["c", "o"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l, id))
            .await
            .unwrap();
    }
    let mut missed = fire("c", 60);
    missed.status = ExecStatus::Missed;
    missed.next_attempt_at = None;
    let mut fires: Vec<NewFire> = [10, 20, 30, 40, 45, 50].map(|t| fire("c", t)).to_vec();
    fires.extend([missed, fire("o", 10), fire("o", 20)]);
    record(store, "n1", &l, &fires, &[]).await.unwrap();
    store
        .record_outcomes(&[
            (
                key("c", 40),
                1,
                Outcome::Succeeded {
                    status: 200,
                    log: None,
                },
            ),
            (
                key("c", 45),
                1,
                Outcome::Failed {
                    error: "not retried: HTTP 404".into(),
                    status: Some(404),
                    request: "{}".into(),
                    log: None,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_attempt(&key("c", 50), 2, &fence("n1", &l, "c"))
            .await
            .unwrap(),
        Begin::Started
    );
    let before = executions(store).await;
    assert_eq!(before.len(), 9);
    let f = fence("n1", &l, "c");
    let cancelled = [10, 20, 40, 45, 50, 60, 70];
    let v2 = JobRecord {
        spec: "{\"v\":2}".into(),
        ..job("c", 5)
    };

    // Fenced out: the job is not replaced and no fire is deleted.
    let stale = Fence {
        epoch: f.epoch - 1,
        ..f.clone()
    };
    assert!(matches!(
        store.put_job(&v2, &stale, &cancelled).await,
        Err(StoreError::Fenced(s)) if s == f.slot
    ));
    assert!(matches!(
        store.set_paused("c", true, 5, None, &stale, &cancelled).await,
        Err(StoreError::Fenced(s)) if s == f.slot
    ));
    assert_eq!(executions(store).await, before);
    assert_eq!(store.get_job("c").await.unwrap().unwrap(), job("c", 0));

    assert_eq!(
        store.put_job(&v2, &f, &cancelled).await.unwrap(),
        PutOutcome::Replaced
    );
    assert_eq!(store.get_job("c").await.unwrap().unwrap().spec, "{\"v\":2}");
    let gone = [key("c", 10), key("c", 20)];
    let expect: Vec<ExecutionRecord> = before
        .iter()
        .filter(|e| !gone.contains(&key(&e.job_id, e.scheduled_at)))
        .cloned()
        .collect();
    let after = executions(store).await;
    assert_eq!(
        keys_of(&after),
        [
            ("c", 30),
            ("c", 40),
            ("c", 45),
            ("c", 50),
            ("c", 60),
            ("o", 10),
            ("o", 20)
        ]
    );
    assert_eq!(after, expect, "the other rows are untouched");

    // Pausing cancels the same way; resuming with nothing to cancel deletes nothing.
    let paused = store
        .set_paused("c", true, 6, None, &f, &[30, 40, 50])
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    let after_pause = executions(store).await;
    assert_eq!(
        after_pause,
        after
            .iter()
            .filter(|e| e.scheduled_at != 30 || e.job_id != "c")
            .cloned()
            .collect::<Vec<_>>()
    );
    store
        .set_paused("c", false, 7, Some(1_007), &f, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(executions(store).await, after_pause);
    // Pausing a missing job cancels nothing either.
    let o = fence("n1", &l, "nope");
    assert!(
        store
            .set_paused("nope", true, 8, None, &o, &[10])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(executions(store).await, after_pause);
}

/// Fires recorded ahead and not sent go back to the queue as never attempted, due on time,
/// for the slot's next owner to send as attempt 1.
async fn hand_back_requeues_only_the_given_unsent_fires(db: Db) {
    let store = &db.store;
    store.ensure_lease_rows().await.unwrap();
    let [sh, sk, sm] = ["h", "k", "m"].map(slot_of);
    let mut distinct = vec![sh, sk, sm];
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
    // m@10 is recorded by n2, which held m's slot before n1.
    let l2 = store.acquire_leases("n2", &[sm], 60_000).await.unwrap();
    store
        .insert_job(&job("m", 0), &fence("n2", &l2, "m"))
        .await
        .unwrap();
    record(store, "n2", &l2, &[fire("m", 10)], &[])
        .await
        .unwrap();
    store.release_leases("n2", &[sm]).await.unwrap();
    let l1 = leased(store, "n1").await;
    for id in ["h", "k"] {
        store
            .insert_job(&job(id, 0), &fence("n1", &l1, id))
            .await
            .unwrap();
    }
    let fires = [
        fire("h", 10),
        fire("h", 20),
        fire("h", 30),
        fire("h", 40),
        fire("k", 10),
    ];
    record(store, "n1", &l1, &fires, &[]).await.unwrap();
    assert_eq!(
        store
            .begin_attempt(&key("h", 30), 2, &fence("n1", &l1, "h"))
            .await
            .unwrap(),
        Begin::Started
    );
    store
        .record_outcomes(&[(
            key("h", 40),
            1,
            Outcome::Succeeded {
                status: 200,
                log: None,
            },
        )])
        .await
        .unwrap();
    // k's slot moves to n3 before n1 hands back.
    store.release_leases("n1", &[sk]).await.unwrap();
    assert!(
        store
            .acquire_leases("n3", &[sk], 60_000)
            .await
            .unwrap()
            .contains_key(&sk)
    );
    let given = [
        (key("h", 10), sh),
        (key("h", 30), sh),
        (key("h", 40), sh),
        (key("k", 10), sk),
        (key("m", 10), sm),
    ];
    let leases: HashMap<u32, i64> = [sh, sk, sm].iter().map(|s| (*s, l1[s])).collect();
    let before = executions(store).await;

    // With stale leases nothing is handed back.
    store
        .hand_back("n1", &stale(&l1, &[sh, sk, sm]), &given)
        .await
        .unwrap();
    assert_eq!(executions(store).await, before);
    store.hand_back("n1", &leases, &[]).await.unwrap();
    assert_eq!(executions(store).await, before);

    store.hand_back("n1", &leases, &given).await.unwrap();
    let after = executions(store).await;
    let row = |k: &ExecKey| {
        after
            .iter()
            .find(|e| key(&e.job_id, e.scheduled_at) == *k)
            .unwrap()
    };
    let h10 = row(&key("h", 10));
    assert_eq!(
        (h10.status, h10.attempts, h10.next_attempt_at),
        (ExecStatus::Pending, 0, Some(10))
    );
    // Only h@10 changed: not the row left out (h@20), nor one attempted already (h@30), nor a
    // finished one (h@40), nor one of a lost slot (k@10), nor another node's (m@10).
    let others_before: Vec<_> = before
        .iter()
        .filter(|e| key(&e.job_id, e.scheduled_at) != key("h", 10))
        .collect();
    let others_after: Vec<_> = after
        .iter()
        .filter(|e| key(&e.job_id, e.scheduled_at) != key("h", 10))
        .collect();
    assert_eq!(others_after, others_before);
    assert_eq!(row(&key("h", 30)).attempts, 2);
    assert_eq!(row(&key("k", 10)).attempts, 1);
    assert_eq!(row(&key("m", 10)).attempts, 1);

    let pending = store.load_pending(&[sh]).await.unwrap();
    let p = pending.iter().find(|p| p.key == key("h", 10)).unwrap();
    assert_eq!((p.attempts, p.next_attempt_at), (0, 10));
    let p = pending.iter().find(|p| p.key == key("h", 20)).unwrap();
    assert_eq!((p.attempts, p.next_attempt_at), (1, 1_020));
    // The next owner sends it as attempt 1.
    assert_eq!(
        store
            .begin_attempt(&key("h", 10), 1, &fence("n1", &l1, "h"))
            .await
            .unwrap(),
        Begin::Started
    );
}

/// The embedded node takes every slot whatever its state, including leases another node
/// holds live, and never needs to renew them.
async fn acquire_exclusive_takes_every_slot_for_good(db: Db) {
    let store = &db.store;
    store.ensure_lease_rows().await.unwrap();
    let (a, b, c) = (1, 2, 3);
    let l1 = store.acquire_leases("n1", &[a, b], 60_000).await.unwrap();
    assert_eq!(l1.len(), 2);
    let ex = store.acquire_exclusive("n2", &[a, b, c]).await.unwrap();
    assert_eq!(ex.len(), 3);
    assert!(ex[&a] > l1[&a] && ex[&b] > l1[&b]);
    for s in [a, b, c] {
        assert_eq!(db.lease(s).await, ("n2".into(), ex[&s], NEVER_EXPIRES));
        assert_eq!(store.lease_holder(s).await.unwrap().as_deref(), Some("n2"));
    }
    // The old holder lost them: no renewal, no fires, no job writes.
    assert!(
        store
            .renew_leases("n1", &[a, b], 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .acquire_leases("n3", &[a, b, c], 60_000)
            .await
            .unwrap()
            .is_empty(),
        "the new leases are live"
    );
    let id = id_in_slot(a, "");
    let rec = record(store, "n1", &l1, &[fire(&id, 10)], &[])
        .await
        .unwrap();
    assert_eq!(
        rec,
        committed(&[a, b]),
        "every slot of the batch's leases is lost"
    );
    assert!(matches!(
        store.insert_job(&job(&id, 0), &fence("n1", &l1, &id)).await,
        Err(StoreError::Fenced(s)) if s == a
    ));
    store
        .insert_job(&job(&id, 0), &fence("n2", &ex, &id))
        .await
        .unwrap();
    let rec = record(store, "n2", &ex, &[fire(&id, 10)], &[])
        .await
        .unwrap();
    assert_eq!(rec, committed(&[]));
    assert_eq!(store.list_executions(&id, 10).await.unwrap().len(), 1);

    // Every slot at once (more than one statement's worth).
    let all = store.acquire_exclusive("n3", &all_slots()).await.unwrap();
    assert_eq!(all.len(), SLOTS as usize);
    assert!(all[&a] > ex[&a]);
    assert_eq!(
        store.lease_counts().await.unwrap(),
        [("n3".to_string(), SLOTS)]
    );
    assert_eq!(db.lease(SLOTS - 1).await.2, NEVER_EXPIRES);
}

/// Batch ids are kept only while a commit's outcome may be unknown.
async fn old_fire_batch_ids_are_pruned(db: Db) {
    let store = &db.store;
    let l = leased(store, "n1").await;
    store
        .insert_job(&job("p", 0), &fence("n1", &l, "p"))
        .await
        .unwrap();
    let early = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    let late = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    for (batch, at, now) in [(early, 10, 100), (late, 20, 200)] {
        let rec = store
            .record_batch("n1", batch, &[fire("p", at)], &[], &l, now)
            .await
            .unwrap();
        assert_eq!(rec, committed(&[]));
    }
    assert_eq!(
        store.prune_fire_batches(100).await.unwrap(),
        0,
        "strictly older"
    );
    assert_eq!(store.prune_fire_batches(150).await.unwrap(), 1);
    assert_eq!(db.count("fire_batches").await, 1);
    assert_eq!(
        store
            .record_batch("n1", late, &[fire("p", 20)], &[], &l, 300)
            .await
            .unwrap(),
        BatchOutcome::AlreadyCommitted { lost_slots: vec![] }
    );
    // A forgotten batch retried is still not recorded twice: its fires exist.
    match store
        .record_batch("n1", early, &[fire("p", 10)], &[], &l, 300)
        .await
    {
        Err(StoreError::Recorded(keys)) => assert_eq!(keys, [key("p", 10)]),
        other => panic!("expected Recorded([p@10]), got {other:?}"),
    }
    assert_eq!(db.count("executions").await, 2);
    assert_eq!(store.prune_fire_batches(i64::MAX).await.unwrap(), 1);
    assert_eq!(db.count("fire_batches").await, 0);
}

/// Leases are timed by `UNIX_TIMESTAMP(NOW(3))`, which converts through the session's zone:
/// in a zone with DST the repeated autumn hour would stretch leases. A `timezone=` in the
/// URL (which sqlx sends as the session zone) must not reach chime's sessions.
async fn the_database_clock_is_utc_whatever_the_url_says(db: Db) {
    let url = if db.url.starts_with("mysql:") {
        // A zone with DST, as the issue saw it (needs the server's zone tables: .ci/run
        // loads them with mysql_tzinfo_to_sql).
        let pool = db.raw().await;
        let known: Option<String> = sqlx::query_scalar(
            "SELECT CAST(CONVERT_TZ('2026-11-01 05:30:00', '+00:00', 'America/New_York') AS CHAR)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        assert!(
            known.is_some(),
            "the MySQL server has no time zone tables; load them with \
             `mysql_tzinfo_to_sql /usr/share/zoneinfo | mysql -uroot mysql` (.ci/run does)"
        );
        format!("{}?timezone=America%2FNew_York", db.url)
    } else {
        db.url.clone()
    };
    let store = Store::connect(&url).await.unwrap();
    // Every pooled connection, not only the first.
    let clocks = futures::future::join_all((0..4).map(|_| store.clock())).await;
    for clock in clocks {
        let clock = clock.unwrap();
        assert!(
            matches!(clock.time_zone.as_str(), "+00:00" | "UTC"),
            "session time zone is {:?}",
            clock.time_zone
        );
        let local = chrono::Utc::now().timestamp_millis();
        assert!(
            (clock.now_ms - local).abs() < 2000,
            "database clock {} vs local {local}",
            clock.now_ms
        );
    }
    store.close().await;
}
