//! Several `chime serve` processes on loopback sharing the real MariaDB: churn, forwarding,
//! database loss and a gossip partition. Each test checks, from the receiver and the
//! executions table, that no (job, scheduled time) is dispatched twice and none is lost.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Documented failover bounds (README, "Cluster"): lease TTL 6 s plus a reconcile tick and
/// the load, and ~0.5 s of gossip for a graceful leave. Asserted with slack for a loaded
/// 2-core machine.
const CRASH_FAILOVER_BOUND_MS: i64 = 10_000;
const LEAVE_FAILOVER_BOUND_MS: i64 = 4_000;

/// Creates `count` jobs `@every 1s` through the given nodes in turn (retrying 503s while
/// slots move); returns each job's anchor (created_at) in ms.
async fn create_jobs(nodes: &[&Chime], count: usize, url: &str) -> BTreeMap<String, i64> {
    let mut anchors = BTreeMap::new();
    let mut pending = Vec::new();
    for i in 0..count {
        let node = nodes[i % nodes.len()];
        let id = format!("churn-{i:04}");
        let body = http_job("@every 1s", url);
        pending.push(async move {
            for _ in 0..50 {
                let r = node.put(&format!("/v1/jobs/{id}"), &body).await;
                if r.status == 201 {
                    let created = parse_ms(r.json["created_at"].as_str().unwrap());
                    return (id, created);
                }
                assert_eq!(r.status, 503, "PUT {id}: {r}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("PUT {id} kept failing");
        });
        if pending.len() == 32 {
            for (id, at) in futures::future::join_all(pending.drain(..)).await {
                anchors.insert(id, at);
            }
        }
    }
    for (id, at) in futures::future::join_all(pending).await {
        anchors.insert(id, at);
    }
    anchors
}

/// Every callback the receiver got, grouped: (job, scheduled ms) → attempts seen.
fn deliveries(rx: &Receiver) -> HashMap<(String, i64), Vec<Received>> {
    let mut by_key: HashMap<(String, i64), Vec<Received>> = HashMap::new();
    for r in rx.requests() {
        by_key
            .entry((r.job_id().to_string(), r.scheduled_ms()))
            .or_default()
            .push(r);
    }
    by_key
}

/// No fire dispatched twice (attempt 1 at most once per key) and every scheduled second
/// of every job between its first fire and `until_ms` delivered. Returns the delays.
fn check_exactly_once(
    rx: &Receiver,
    anchors: &BTreeMap<String, i64>,
    until_ms: i64,
) -> HashMap<(String, i64), i64> {
    let by_key = deliveries(rx);
    let mut first_arrival = HashMap::new();
    for ((job, at), got) in &by_key {
        let firsts = got.iter().filter(|r| r.attempt() == 1).count();
        assert!(firsts <= 1, "{job}@{at} dispatched {firsts} times: {got:?}");
        let arrival = got.iter().map(|r| r.at_ms).min().unwrap();
        first_arrival.insert((job.clone(), *at), arrival - at);
    }
    let mut missing = Vec::new();
    for (job, anchor) in anchors {
        let mut t = anchor + 1000;
        while t <= until_ms {
            if !by_key.contains_key(&(job.clone(), t)) {
                missing.push(format!("{job}@{t}"));
            }
            t += 1000;
        }
    }
    if !missing.is_empty() {
        let mut per_job: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        for m in &missing {
            let (j, t) = m.split_once('@').unwrap();
            let e = per_job.entry(j).or_insert((0, t));
            e.0 += 1;
        }
        eprintln!(
            "DIAG missing jobs={} until={until_ms} anchors-min={:?}: {:?}",
            per_job.len(),
            anchors.values().min(),
            per_job.iter().take(40).collect::<Vec<_>>()
        );
    }
    assert!(
        missing.is_empty(),
        "{} scheduled fires never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    first_arrival
}

/// The largest delay of a fire scheduled in `[from, to)`: the failover gap.
fn worst_delay(delays: &HashMap<(String, i64), i64>, from: i64, to: i64) -> i64 {
    delays
        .iter()
        .filter(|((_, at), _)| *at >= from && *at < to)
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_kill_join_leave_never_duplicates_or_loses_a_fire() {
    let db = fresh_mysql().await;
    let rx = Receiver::start(Script::always(200)).await;
    let n1 = start_node(&db, "n1", None, &[]).await;
    let mut n2 = start_node(&db, "n2", Some(&n1), &[]).await;
    let mut n3 = start_node(&db, "n3", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n2, &n3], 3).await;

    let anchors = create_jobs(&[&n1, &n2, &n3], 1000, &rx.url()).await;
    let owners_before: BTreeMap<String, String> = {
        let mut m = BTreeMap::new();
        for id in anchors.keys().take(200) {
            let r = n1.get(&format!("/v1/jobs/{id}")).await;
            m.insert(id.clone(), r.json["owner"].as_str().unwrap().to_string());
        }
        m
    };
    assert!(
        owners_before.values().any(|o| o == "n2"),
        "n2 owns some jobs"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    // kill -9: n2's slots come back after its leases expire.
    let t_kill = now_ms();
    n2.kill9();
    wait_converged(&[&n1, &n3], 2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    // A fourth node joins and takes its share.
    let n4 = start_node(&db, "n4", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n3, &n4], 3).await;
    let t_join_done = now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;

    // SIGTERM: n3 hands its slots over at once.
    let t_term = now_ms();
    let (status, took) = n3.sigterm().await;
    assert!(status.success(), "n3 exited {status}");
    assert!(took < Duration::from_secs(15), "n3 took {took:?} to stop");
    wait_converged(&[&n1, &n4], 2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Judge every fire scheduled up to a few seconds ago (later ones may be in flight).
    let until = now_ms() - 3_000;
    let delays = check_exactly_once(&rx, &anchors, until);
    let crash_gap = worst_delay(&delays, t_kill, t_kill + 10_000);
    let leave_gap = worst_delay(&delays, t_term, t_term + 5_000);
    let steady = worst_delay(&delays, t_join_done + 1_000, t_term);
    println!(
        "churn: {} deliveries; failover gap after kill -9: {crash_gap} ms, after SIGTERM: {leave_gap} ms, steady worst delay {steady} ms",
        rx.count()
    );
    assert!(
        crash_gap <= CRASH_FAILOVER_BOUND_MS,
        "kill -9 failover took {crash_gap} ms"
    );
    assert!(
        leave_gap <= LEAVE_FAILOVER_BOUND_MS,
        "SIGTERM failover took {leave_gap} ms"
    );

    // The executions table agrees: one row per (job, time), each succeeded, by one node.
    let mut seen = BTreeSet::new();
    for id in anchors.keys().take(50) {
        for e in n1.executions(id).await {
            let at = parse_ms(e["scheduled_at"].as_str().unwrap());
            assert!(seen.insert((id.clone(), at)), "duplicate execution row");
            if at < until - 10_000 {
                assert_eq!(e["status"], "succeeded", "{id}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_to_a_non_owner_act_as_on_the_owner() {
    let db = fresh_mysql().await;
    let rx = Receiver::start(Script::always(200)).await;
    let n1 = start_node(&db, "n1", None, &[]).await;
    let n2 = start_node(&db, "n2", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n2], 2).await;
    let nodes = [&n1, &n2];

    // Find a job id owned by each node.
    let mut owned: HashMap<String, String> = HashMap::new();
    for i in 0..200 {
        let id = format!("fwd-{i}");
        let body = http_job("@every 1h", &rx.url());
        let r = n1.put(&format!("/v1/jobs/{id}"), &body).await;
        assert_eq!(r.status, 201, "{r}");
        let owner = r.header("x-chime-node").unwrap().to_string();
        owned.entry(owner).or_insert(id);
        if owned.len() == 2 {
            break;
        }
    }
    assert_eq!(owned.len(), 2, "both nodes own jobs");

    for (owner, id) in &owned {
        let (on_owner, other) = if owner == "n1" {
            (nodes[0], nodes[1])
        } else {
            (nodes[1], nodes[0])
        };
        let path = format!("/v1/jobs/{id}");
        let a = on_owner.get(&path).await;
        let b = other.get(&path).await;
        assert_eq!((a.status, b.status), (200, 200));
        assert_eq!(a.json, b.json, "GET differs");
        assert_eq!(
            b.header("x-chime-node"),
            Some(owner.as_str()),
            "handled by the owner"
        );

        let replaced = other.put(&path, &http_job("@every 2h", &rx.url())).await;
        assert_eq!(replaced.status, 200, "{replaced}");
        assert_eq!(replaced.header("x-chime-node"), Some(owner.as_str()));
        assert_eq!(on_owner.get(&path).await.json["schedule"], "@every 2h");

        let paused = other.post(&format!("{path}/pause"), None).await;
        assert_eq!(paused.status, 200, "{paused}");
        assert_eq!(on_owner.get(&path).await.json["paused"], true);

        let trig = other.post(&format!("{path}/trigger"), None).await;
        assert_eq!(trig.status, 202, "{trig}");
        let at = trig.json["execution_id"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap();
        let got = wait_until(Duration::from_secs(10), async || {
            rx.requests()
                .iter()
                .any(|r| r.job_id() == id && r.scheduled_ms() == at)
        })
        .await;
        assert!(got, "triggered fire of {id} via the non-owner arrived");

        let bad = other.put(&path, &json!({"schedule": "nope"})).await;
        assert_eq!(bad.status, 422, "{bad}");
        assert_eq!(bad.header("x-chime-node"), Some(owner.as_str()));

        let del = other.delete(&path).await;
        assert_eq!(del.status, 204, "{del}");
        assert_eq!(on_owner.get(&path).await.status, 404);
        assert_eq!(other.get(&path).await.status, 404);
    }

    // A create without an id needs no hop: the receiving node picks an id it owns.
    for node in nodes {
        let r = node
            .post("/v1/jobs", Some(&http_job("@every 1h", &rx.url())))
            .await;
        assert_eq!(r.status, 201, "{r}");
        assert_eq!(r.header("x-chime-node"), Some(node.node_id.as_str()));
        assert_eq!(r.json["owner"], node.node_id.as_str());
    }
}

/// A TCP proxy the test can cut: while cut, every connection through it hangs (packets
/// into the void), like a network partition between one node and the database.
struct CuttableProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
}

impl CuttableProxy {
    async fn start(upstream: SocketAddr) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch_tx, _) = tokio::sync::watch::channel(0u64);
        let epoch = Arc::new(epoch_tx);
        let (cut2, epoch2) = (cut.clone(), epoch.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    break;
                };
                let cut = cut2.clone();
                let mut epoch_rx = epoch2.subscribe();
                tokio::spawn(async move {
                    if cut.load(Ordering::SeqCst) {
                        // Hold it open, silent, until the cut ends; then drop it.
                        let _ = epoch_rx.changed().await;
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        let _ = client.shutdown().await;
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        // A cut freezes established connections too: stop relaying.
                        _ = epoch_rx.changed() => { futures::future::pending::<()>().await }
                    }
                });
            }
        });
        CuttableProxy { addr, cut, epoch }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_loses_the_database_neither_double_fires_nor_loses_fires() {
    let db = fresh_mysql().await;
    let rx = Receiver::start(Script::always(200)).await;
    // n1 reaches MySQL through a proxy the test can cut; n2 directly.
    let direct = db.url().to_string();
    let (scheme_creds, rest) = direct.split_once('@').unwrap();
    let (hostport, dbname) = rest.split_once('/').unwrap();
    let upstream: SocketAddr = tokio::net::lookup_host(hostport)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = CuttableProxy::start(upstream).await;
    let proxied = format!("{scheme_creds}@{}/{dbname}", proxy.addr);
    let n1 = Chime::start(&db.with_url(&proxied), "n1", &[]).await;
    let n2 = start_node(&db, "n2", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n2], 2).await;
    let anchors = create_jobs(&[&n1, &n2], 200, &rx.url()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t_cut = now_ms();
    proxy.set_cut(true);
    tokio::time::sleep(Duration::from_secs(12)).await;
    proxy.set_cut(false);
    // Back: n1 rejoins and takes its share again. Under parallel test load this took more
    // than 30 s in about one run in ten (not yet diagnosed: likely frozen pool connections
    // each running into the 5 s store deadline before being replaced); no contract bound
    // applies to it, the assertions below are what the test is about.
    wait_converged_within(&[&n1, &n2], 2, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let until = now_ms() - 3_000;
    let delays = check_exactly_once(&rx, &anchors, until);
    let gap = worst_delay(&delays, t_cut, t_cut + 12_000);
    println!("database cut for 12 s: worst delay of a fire scheduled during the cut {gap} ms");
    assert!(
        n1.logs()
            .iter()
            .any(|l| l.contains("leaving the ring until it is back")),
        "n1 noticed the outage"
    );
}

/// nftables rules dropping one gossip port; removed on drop.
struct GossipPartition {
    table: String,
}

impl GossipPartition {
    fn isolate(port: u16) -> GossipPartition {
        let table = format!("chime_test_{port}");
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority 0; }}\n\
             add rule inet {table} input udp dport {port} drop\n\
             add rule inet {table} input udp sport {port} drop\n"
        );
        let out = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft is required for the partition test (.ci/run installs nftables)");
        assert!(out.status.success(), "nft failed: {out:?}");
        GossipPartition { table }
    }
}

impl Drop for GossipPartition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_gossip_but_not_the_database_does_not_double_fire() {
    let db = fresh_mysql().await;
    let rx = Receiver::start(Script::always(200)).await;
    let n1 = start_node(&db, "n1", None, &[]).await;
    let n2 = start_node(&db, "n2", Some(&n1), &[]).await;
    let n3 = start_node(&db, "n3", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n2, &n3], 3).await;
    let anchors = create_jobs(&[&n1, &n2, &n3], 300, &rx.url()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let port: u16 = n3.gossip.rsplit(':').next().unwrap().parse().unwrap();
    {
        let _partition = GossipPartition::isolate(port);
        // Both sides now believe the other side is dead and want its slots; the leases
        // (n3 still renews them) must keep each slot with one node.
        let split = wait_until(Duration::from_secs(20), async || {
            let c = n3.get("/v1/cluster").await;
            c.json["members"].as_array().is_some_and(|m| m.len() == 1)
        })
        .await;
        assert!(split, "n3 sees itself alone while partitioned");
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    wait_converged(&[&n1, &n2, &n3], 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let until = now_ms() - 3_000;
    check_exactly_once(&rx, &anchors, until);
}

/// Two processes under one node id would both believe they hold its leases: the second is
/// refused at start-up, naming the id and the running node, and the first keeps its slots.
/// A crash restart under the same id is not refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_a_node_id_in_use_is_refused() {
    let db = fresh_mysql().await;
    let mut n1 = start_node(&db, "n1", None, &[]).await;
    wait_converged(&[&n1], 1).await;

    let started = std::time::Instant::now();
    let mut dup = std::process::Command::new(env!("CARGO_BIN_EXE_chime"))
        .env_remove("CHIME_API_TOKEN")
        .args([
            "serve",
            "--node-id",
            "n1",
            "--http-addr",
            "127.0.0.1:0",
            "--gossip-addr",
            &format!("127.0.0.1:{}", free_udp_port()),
            "--database-url",
            db.url(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), async || {
        dup.try_wait().unwrap().is_some()
    })
    .await;
    if !exited {
        let _ = dup.kill();
    }
    let out = dup.wait_with_output().unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited, "the duplicate was still running after 20 s: {err}");
    assert!(!out.status.success(), "the duplicate started: {err}");
    assert!(
        err.contains("node id \"n1\" is in use") && err.contains(&n1.addr),
        "the error names the id and the running node: {err}"
    );
    assert!(
        took < Duration::from_secs(15),
        "refused within the wait: {took:?}"
    );
    let c = n1.get("/v1/cluster").await;
    assert_eq!(c.json["members"][0]["leased_slots"], 4096, "{c}");

    // After a crash, the same id starts again without waiting for the old claim to age.
    n1.kill9();
    let started = std::time::Instant::now();
    let n1 = start_node(&db, "n1", None, &[]).await;
    wait_converged(&[&n1], 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "restart took {:?}",
        started.elapsed()
    );
}

/// Gossip forgets a crashed node within seconds; `GET /v1/cluster` keeps showing it, as
/// `dead` with when it was last seen, and a node that left gracefully is not shown.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_node_is_listed_as_dead_with_when_it_was_last_seen() {
    let db = fresh_mysql().await;
    let n1 = start_node(&db, "n1", None, &[]).await;
    let mut n2 = start_node(&db, "n2", Some(&n1), &[]).await;
    let mut n3 = start_node(&db, "n3", Some(&n1), &[]).await;
    wait_converged(&[&n1, &n2, &n3], 3).await;

    n2.kill9();
    let killed_at = now_ms();
    let (_, _) = n3.sigterm().await;
    let dead = wait_for(Duration::from_secs(30), async || {
        let c = n1.get("/v1/cluster").await;
        let dead = c.json["dead_members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        dead.into_iter()
            .find(|m| m["node_id"] == "n2" && m["state"] == "dead")
    })
    .await
    .expect("n2 is listed as dead");
    let seen = parse_ms(dead["last_seen_at"].as_str().expect("last_seen_at"));
    assert!(
        (killed_at - 3000..=killed_at + 500).contains(&seen),
        "last seen {seen} vs killed at {killed_at}: {dead}"
    );
    assert_eq!(dead["ring_slots"], 0, "{dead}");
    let c = n1.get("/v1/cluster").await;
    let members = c.json["members"].as_array().cloned().unwrap_or_default();
    let dead = c.json["dead_members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        members.iter().chain(&dead).all(|m| m["node_id"] != "n3"),
        "a node that left is not listed: {c}"
    );
    assert_eq!(members.len(), 1, "members are the live ones: {c}");
    assert!(
        members.iter().any(|m| m["node_id"] == "n1"
            && m["state"] == "ready"
            && m.get("last_seen_at").is_none()),
        "{c}"
    );
}
