//! [`ConsulDouble`]: a test double of the one part of Consul's HTTP API that chime uses,
//! `GET /v1/health/service/{name}` with blocking queries, since the Consul binary cannot be
//! installed here.
//!
//! Faithful to Consul 1.x as documented (api-docs/health "List Service Instances for
//! Service", api-docs/features/blocking) and as implemented (agent/http.go `parseWait`,
//! agent/health_endpoint.go, agent/blockingquery, the state store's `maxIndexForService`,
//! `RPCQueryTimeout`):
//! - One raft-like index for the whole catalog, starting at [`FIRST_INDEX`]; every write
//!   takes the next value. A service's index is the last write that touched it (its
//!   instances, their checks, or the `serfHealth` check of a node that hosts it). An unknown
//!   service reports the index of the last time any service lost its last instance, or the
//!   catalog index if none ever did, so the header is never 0.
//! - `index=0` or no `index` answers at once. Otherwise the query is held until the
//!   service's index passes the given one or `wait` plus up to `wait/16` of jitter elapses,
//!   then answers with the current state, changed or not. `wait` is a Go duration; absent,
//!   empty, zero or negative means 5 min, and it is capped at 10 min. An index the client
//!   holds from "the future" (greater than the current one) therefore blocks for the whole
//!   wait, as it does in Consul after a snapshot restore.
//! - Setting a check to the status it already has is not a write, as in Consul's state
//!   store, and wakes no one; [`ConsulDouble::touch`] is the idempotent write that moves the
//!   index without changing the result.
//! - `passing` (bare, or any value Go's `strconv.ParseBool` takes) keeps only instances
//!   whose checks, node checks included, are all `passing`; it is parsed after the wait, so
//!   a bad value is a 400 that comes after the block, as in Consul. `tag` (repeatable,
//!   case-insensitive, all must match) filters instances. The index ignores both filters.
//! - Errors are plain text with Consul's words: 400 `Invalid wait time`, `Invalid index`,
//!   `Invalid value for ?passing`, `Cannot specify ?stale with ?consistent, conflicting
//!   semantics.`; 500 `No path to datacenter` for a `dc` other than `dc1`.
//! - Headers: `X-Consul-Index`, `X-Consul-Knownleader: true`, `X-Consul-Lastcontact: 0`,
//!   `X-Consul-Effective-Consistency`, `X-Consul-Query-Backend: blocking-query`.
//! - Body: the `[{Node, Service, Checks}]` shape of Consul 1.x, sorted by node then service
//!   ID, with a `serfHealth` node check before each service check.
//! - Dropping the double is a graceful Consul shutdown: held queries answer at once with the
//!   current state, the listener closes, and idle keep-alive connections are closed.
//!
//! Left out: ACLs and tokens, `filter` (accepted and ignored), `near` (ignored, the order is
//! fixed), `cached`/`max_stale`/hash-based blocking, Connect, peering, namespaces and
//! partitions, every other endpoint except `GET /v1/status/leader`, and Consul's habit of
//! waking a watcher early when a busy catalog overflows the per-query watch limit. A
//! failing `serfHealth` is modelled by [`ConsulDouble::set_node_status`], but nodes are never
//! deregistered.
//!
//! Misbehaviour for robustness tests: [`ConsulDouble::set_index_override`] (an index that goes
//! backwards, or 0), [`ConsulDouble::fail_next`] (error statuses), and
//! [`ConsulDouble::stall_next`] (requests that never answer, for the client's own timeout).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The catalog index before the first write. Above 1 so that a client which treats 0 and 1
/// specially is not flattered by the double.
pub const FIRST_INDEX: u64 = 10;
pub const DATACENTER: &str = "dc1";
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Consul adds up to `wait / JITTER_FRACTION` so that many watchers do not wake together.
const JITTER_FRACTION: u32 = 16;
/// How many queries [`ConsulDouble::recent_queries`] keeps; a long test must not grow
/// without bound.
const RECENT_QUERIES: usize = 1000;

/// One health request as the double received it, raw, so that a test can check exactly
/// what the client sent (`"60s"` and `"1m"` are different requests).
#[derive(Debug, Clone)]
pub struct HealthQuery {
    pub service: String,
    pub index: Option<String>,
    pub wait: Option<String>,
    pub passing: Option<String>,
    /// The whole query string, undecoded.
    pub query: String,
    pub at: std::time::Instant,
}

impl HealthQuery {
    /// `index` as Consul reads it; `None` when absent, empty or invalid.
    pub fn index_value(&self) -> Option<u64> {
        self.index.as_deref().and_then(parse_go_uint)
    }

    /// `wait` as Consul reads it, before the default, the cap and the jitter; `None` when
    /// absent, empty, invalid or negative.
    pub fn wait_value(&self) -> Option<Duration> {
        let ns = parse_go_duration(self.wait.as_deref()?)?;
        u64::try_from(ns).ok().map(Duration::from_nanos)
    }
}

pub struct ConsulDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl ConsulDouble {
    pub async fn start() -> ConsulDouble {
        ConsulDouble::start_on("127.0.0.1:0".parse().expect("a socket address")).await
    }

    /// Starts on a given address, to bring "the same agent" back after dropping one. The
    /// catalog starts empty at [`FIRST_INDEX`] again, so a client that remembered an index
    /// sees it go backwards, as after a Consul restore.
    pub async fn start_on(addr: SocketAddr) -> ConsulDouble {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(DoubleState {
                catalog: Catalog {
                    raft_index: FIRST_INDEX,
                    last_extinction: None,
                    nodes_created: 0,
                    nodes: BTreeMap::new(),
                    services: BTreeMap::new(),
                },
                index_override: None,
                fail: None,
                stall: 0,
                requests: HashMap::new(),
                blocking_now: HashMap::new(),
                blocking_max: HashMap::new(),
                recent: VecDeque::new(),
            }),
            changed,
            shutdown: CancellationToken::new(),
        });
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the consul double");
        let addr = listener.local_addr().expect("consul double address");
        let app = axum::Router::new()
            .route("/v1/health/service/{service}", get(health_service))
            .route("/v1/health/service/", get(missing_service_name))
            .route("/v1/status/leader", get(status_leader))
            .with_state(shared.clone());
        let signal = shared.shutdown.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
                .expect("consul double runs");
        });
        ConsulDouble {
            addr,
            shared,
            server,
        }
    }

    /// For `CONSUL_HTTP_ADDR`-style settings that take `host:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers `id` of `service` on its own node `node-<id>` at `address`, with a passing
    /// service check. Registering an existing `id` again moves it to the new address and
    /// port and keeps its check status, as a re-registration does.
    pub fn add_instance(&self, service: &str, id: &str, address: &str, port: u16) {
        self.add_instance_on_node(service, id, &format!("node-{id}"), address, address, port);
    }

    /// As [`add_instance`](Self::add_instance), on a named node that may host other
    /// instances. `service_address` may be empty: Consul then leaves `Service.Address` empty
    /// and clients are expected to use `Node.Address`.
    pub fn add_instance_on_node(
        &self,
        service: &str,
        id: &str,
        node: &str,
        node_address: &str,
        service_address: &str,
        port: u16,
    ) {
        self.write(|c| {
            let idx = c.next_index();
            c.ensure_node(node, node_address, idx);
            let svc = c.services.entry(service.to_string()).or_insert(ServiceRec {
                index: idx,
                instances: BTreeMap::new(),
            });
            svc.index = idx;
            match svc.instances.get_mut(id) {
                Some(inst) => {
                    inst.node = node.to_string();
                    inst.address = service_address.to_string();
                    inst.port = port;
                    inst.modify_index = idx;
                }
                None => {
                    svc.instances.insert(
                        id.to_string(),
                        InstanceRec {
                            node: node.to_string(),
                            address: service_address.to_string(),
                            port,
                            tags: Vec::new(),
                            create_index: idx,
                            modify_index: idx,
                            check: CheckRec::new("passing", idx),
                        },
                    );
                }
            }
        });
    }

    /// Replaces the instance's tags (a re-registration, so a write).
    pub fn set_tags(&self, service: &str, id: &str, tags: &[&str]) {
        self.write(|c| {
            let idx = c.next_index();
            let svc = c.service_mut(service);
            svc.index = idx;
            let inst = svc.instance_mut(service, id);
            inst.tags = tags.iter().map(|t| t.to_string()).collect();
            inst.modify_index = idx;
        });
    }

    /// Sets the instance's service check to `passing`, `warning` or `critical`. The same
    /// status again is no write at all.
    pub fn set_status(&self, service: &str, id: &str, status: &str) {
        let status = check_status(status);
        self.write_if(|c| {
            if c.service_mut(service)
                .instance_mut(service, id)
                .check
                .status
                == status
            {
                return false;
            }
            let idx = c.next_index();
            let svc = c.service_mut(service);
            svc.index = idx;
            let check = &mut svc.instance_mut(service, id).check;
            check.status = status;
            check.modify_index = idx;
            true
        });
    }

    /// Sets a node's `serfHealth` check, as when its agent stops answering gossip. Every
    /// instance on the node then fails `passing`, and every service on it is written.
    pub fn set_node_status(&self, node: &str, status: &str) {
        let status = check_status(status);
        self.write_if(|c| {
            let current = c
                .nodes
                .get(node)
                .unwrap_or_else(|| panic!("consul double: no node {node:?}"));
            if current.serf.status == status {
                return false;
            }
            let idx = c.next_index();
            let serf = &mut c.nodes.get_mut(node).expect("checked above").serf;
            serf.status = status;
            serf.modify_index = idx;
            for svc in c.services.values_mut() {
                if svc.instances.values().any(|i| i.node == node) {
                    svc.index = idx;
                }
            }
            true
        });
    }

    /// Deregisters the instance. Removing a service's last instance makes the service
    /// unknown, and its index becomes this write's (Consul's "last extinction" index).
    pub fn remove_instance(&self, service: &str, id: &str) {
        self.write(|c| {
            let idx = c.next_index();
            let svc = c.service_mut(service);
            if svc.instances.remove(id).is_none() {
                panic!("consul double: {service:?} has no instance {id:?}");
            }
            svc.index = idx;
            if svc.instances.is_empty() {
                c.services.remove(service);
                c.last_extinction = Some(idx);
            }
        });
    }

    /// An idempotent write: the service's index moves, its instances do not. Held queries
    /// return with the same body, which a client must treat as "no change".
    pub fn touch(&self, service: &str) {
        self.write(|c| {
            let idx = c.next_index();
            c.service_mut(service).index = idx;
        });
    }

    /// The `X-Consul-Index` the next answer for `service` would carry.
    pub fn index(&self, service: &str) -> u64 {
        self.shared.effective_index(service)
    }

    /// While `Some(n)`, every service reports index `n` and blocks against `n`, whatever
    /// the writes: an index that goes backwards, stays put, or is 0. `None` restores the
    /// real index. Wakes held queries, since their answer may have changed.
    pub fn set_index_override(&self, index: Option<u64>) {
        self.shared.state().index_override = index;
        self.shared.wake();
    }

    /// The next `count` health requests answer `status` at once, with no `X-Consul-Index`.
    /// Replaces any failures still pending; `count = usize::MAX` is an outage.
    pub fn fail_next(&self, count: usize, status: u16) {
        StatusCode::from_u16(status).expect("a valid HTTP status");
        self.shared.state().fail = (count > 0).then_some((count, status));
    }

    /// The next `count` health requests are never answered (until the double is dropped),
    /// as from a wedged agent, so only the client's own timeout ends them.
    pub fn stall_next(&self, count: usize) {
        self.shared.state().stall = count;
    }

    /// Health requests received for `service`, failed and invalid ones included.
    pub fn requests(&self, service: &str) -> usize {
        self.shared
            .state()
            .requests
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// Queries for `service` held open right now.
    pub fn blocking_now(&self, service: &str) -> usize {
        self.shared
            .state()
            .blocking_now
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// The most queries for `service` ever held open at once. A query counts from when it
    /// starts to wait until it answers or its connection is dropped; one that answers at
    /// once never counts.
    pub fn max_concurrent_blocking(&self, service: &str) -> usize {
        self.shared
            .state()
            .blocking_max
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// The last health requests, oldest first (at most 1000).
    pub fn recent_queries(&self) -> Vec<HealthQuery> {
        self.shared.state().recent.iter().cloned().collect()
    }

    fn write(&self, f: impl FnOnce(&mut Catalog)) {
        self.write_if(|c| {
            f(c);
            true
        });
    }

    /// Runs a catalog change and, if it wrote, wakes held queries (after unlocking, so
    /// they can read the new state at once).
    fn write_if(&self, f: impl FnOnce(&mut Catalog) -> bool) {
        let wrote = f(&mut self.shared.state().catalog);
        if wrote {
            self.shared.wake();
        }
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------
// State

struct Shared {
    state: Mutex<DoubleState>,
    /// Bumped on every write; held queries re-read their service's index when it moves.
    changed: watch::Sender<u64>,
    shutdown: CancellationToken,
}

impl Shared {
    /// A test that panicked while holding the lock must not turn every later request (and
    /// the drop guards) into a second panic.
    fn state(&self) -> MutexGuard<'_, DoubleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    fn effective_index(&self, service: &str) -> u64 {
        let st = self.state();
        st.index_override
            .unwrap_or_else(|| st.catalog.service_index(service))
    }
}

struct DoubleState {
    catalog: Catalog,
    index_override: Option<u64>,
    fail: Option<(usize, u16)>,
    stall: usize,
    requests: HashMap<String, usize>,
    blocking_now: HashMap<String, usize>,
    blocking_max: HashMap<String, usize>,
    recent: VecDeque<HealthQuery>,
}

enum Fault {
    Stall,
    Fail(u16),
}

impl DoubleState {
    fn take_fault(&mut self) -> Option<Fault> {
        if self.stall > 0 {
            self.stall -= 1;
            return Some(Fault::Stall);
        }
        let (count, status) = self.fail.as_mut()?;
        let status = *status;
        *count -= 1;
        if *count == 0 {
            self.fail = None;
        }
        Some(Fault::Fail(status))
    }
}

struct Catalog {
    raft_index: u64,
    /// The write that removed some service's last instance, which is what Consul reports
    /// for a service it does not know.
    last_extinction: Option<u64>,
    nodes_created: u64,
    nodes: BTreeMap<String, NodeRec>,
    services: BTreeMap<String, ServiceRec>,
}

struct NodeRec {
    id: String,
    address: String,
    create_index: u64,
    modify_index: u64,
    serf: CheckRec,
}

struct ServiceRec {
    index: u64,
    instances: BTreeMap<String, InstanceRec>,
}

struct InstanceRec {
    node: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    create_index: u64,
    modify_index: u64,
    check: CheckRec,
}

struct CheckRec {
    status: &'static str,
    create_index: u64,
    modify_index: u64,
}

impl CheckRec {
    fn new(status: &'static str, idx: u64) -> CheckRec {
        CheckRec {
            status,
            create_index: idx,
            modify_index: idx,
        }
    }
}

impl Catalog {
    fn next_index(&mut self) -> u64 {
        self.raft_index += 1;
        self.raft_index
    }

    fn service_index(&self, service: &str) -> u64 {
        match self.services.get(service) {
            Some(svc) => svc.index,
            None => self.last_extinction.unwrap_or(self.raft_index),
        }
    }

    fn ensure_node(&mut self, name: &str, address: &str, idx: u64) {
        if let Some(node) = self.nodes.get_mut(name) {
            if node.address != address {
                node.address = address.to_string();
                node.modify_index = idx;
            }
            return;
        }
        self.nodes_created += 1;
        let n = self.nodes_created;
        self.nodes.insert(
            name.to_string(),
            NodeRec {
                id: format!("{n:08x}-0000-4000-8000-{n:012x}"),
                address: address.to_string(),
                create_index: idx,
                modify_index: idx,
                serf: CheckRec::new("passing", idx),
            },
        );
    }

    /// A test that names a service the double does not have is a broken test.
    fn service_mut(&mut self, service: &str) -> &mut ServiceRec {
        self.services
            .get_mut(service)
            .unwrap_or_else(|| panic!("consul double: no service {service:?}"))
    }

    /// The instances of `service` with the given tags, in Consul's order (node, then
    /// service ID), each with whether all of its checks pass.
    fn entries(&self, service: &str, tags: &[String]) -> Vec<(bool, Value)> {
        let Some(svc) = self.services.get(service) else {
            return Vec::new();
        };
        let mut instances: Vec<(&String, &InstanceRec)> = svc
            .instances
            .iter()
            .filter(|(_, inst)| {
                tags.iter()
                    .all(|want| inst.tags.iter().any(|t| t.eq_ignore_ascii_case(want)))
            })
            .collect();
        instances.sort_by(|a, b| (&a.1.node, a.0).cmp(&(&b.1.node, b.0)));
        instances
            .into_iter()
            .map(|(id, inst)| {
                let node = &self.nodes[&inst.node];
                let passing = node.serf.status == "passing" && inst.check.status == "passing";
                (passing, entry_json(service, id, inst, node))
            })
            .collect()
    }
}

impl ServiceRec {
    fn instance_mut(&mut self, service: &str, id: &str) -> &mut InstanceRec {
        self.instances
            .get_mut(id)
            .unwrap_or_else(|| panic!("consul double: {service:?} has no instance {id:?}"))
    }
}

fn check_status(status: &str) -> &'static str {
    match status {
        "passing" => "passing",
        "warning" => "warning",
        "critical" => "critical",
        other => panic!("consul double: check status {other:?} is not passing/warning/critical"),
    }
}

fn entry_json(service: &str, id: &str, inst: &InstanceRec, node: &NodeRec) -> Value {
    let node_name = &inst.node;
    let serf_output = if node.serf.status == "passing" {
        "Agent alive and reachable"
    } else {
        "Agent not live or unreachable"
    };
    let serf_check = check_json(
        node_name,
        "serfHealth",
        "Serf Health Status",
        &node.serf,
        serf_output,
        "",
        "",
        &[],
    );
    let service_check = check_json(
        node_name,
        &format!("service:{id}"),
        &format!("Service '{service}' check"),
        &inst.check,
        "",
        id,
        service,
        &inst.tags,
    );
    json!({
        "Node": {
            "ID": node.id,
            "Node": node_name,
            "Address": node.address,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {
                "lan": node.address,
                "lan_ipv4": node.address,
                "wan": node.address,
                "wan_ipv4": node.address,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": node.create_index,
            "ModifyIndex": node.modify_index,
        },
        "Service": {
            "ID": id,
            "Service": service,
            "Tags": inst.tags,
            "Address": inst.address,
            "Meta": {},
            "Port": inst.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": false,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "CreateIndex": inst.create_index,
            "ModifyIndex": inst.modify_index,
        },
        "Checks": [serf_check, service_check],
    })
}

#[allow(clippy::too_many_arguments)] // one JSON object's fields, named at the call site
fn check_json(
    node: &str,
    check_id: &str,
    name: &str,
    check: &CheckRec,
    output: &str,
    service_id: &str,
    service_name: &str,
    service_tags: &[String],
) -> Value {
    json!({
        "Node": node,
        "CheckID": check_id,
        "Name": name,
        "Status": check.status,
        "Notes": "",
        "Output": output,
        "ServiceID": service_id,
        "ServiceName": service_name,
        "ServiceTags": service_tags,
        "Type": if service_id.is_empty() { "" } else { "ttl" },
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    })
}

// ---------------------------------------------------------------------------------------
// HTTP

/// Counts a query as held from construction to drop, so a client that hangs up mid-wait
/// stops counting when its connection does.
struct Held {
    shared: Arc<Shared>,
    service: String,
}

impl Held {
    fn enter(shared: &Arc<Shared>, service: &str) -> Held {
        let mut st = shared.state();
        let now = st.blocking_now.entry(service.to_string()).or_default();
        *now += 1;
        let now = *now;
        let max = st.blocking_max.entry(service.to_string()).or_default();
        *max = (*max).max(now);
        Held {
            shared: shared.clone(),
            service: service.to_string(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(now) = self.shared.state().blocking_now.get_mut(&self.service) {
            *now = now.saturating_sub(1);
        }
    }
}

fn text(status: u16, body: &str) -> Response {
    let status = StatusCode::from_u16(status).expect("a valid HTTP status");
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

async fn missing_service_name() -> Response {
    text(400, "Missing service name")
}

async fn status_leader() -> axum::Json<&'static str> {
    axum::Json("127.0.0.1:8300")
}

async fn health_service(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    let params: Vec<(String, String)> = url::form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect();
    // Go's `url.Values.Get`: the first value, "" when present without one.
    let first = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let has = |key: &str| params.iter().any(|(k, _)| k == key);

    let fault = {
        let mut st = shared.state();
        *st.requests.entry(service.clone()).or_default() += 1;
        if st.recent.len() == RECENT_QUERIES {
            st.recent.pop_front();
        }
        st.recent.push_back(HealthQuery {
            service: service.clone(),
            index: first("index").map(str::to_string),
            wait: first("wait").map(str::to_string),
            passing: first("passing").map(str::to_string),
            query: raw.clone(),
            at: std::time::Instant::now(),
        });
        st.take_fault()
    };
    match fault {
        Some(Fault::Stall) => {
            shared.shutdown.cancelled().await;
            return text(503, "Consul agent shutting down");
        }
        Some(Fault::Fail(500)) => return text(500, "No cluster leader"),
        Some(Fault::Fail(status)) => {
            let reason = StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            return text(status, reason);
        }
        None => {}
    }

    // Consul's order: consistency, then wait and index, then the datacenter (the RPC
    // forward fails before any block), then the block, then `passing`.
    let stale = has("stale");
    let consistent = has("consistent");
    if stale && consistent {
        return text(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        );
    }
    let wait = match first("wait").filter(|w| !w.is_empty()) {
        None => None,
        Some(w) => match parse_go_duration(w) {
            Some(ns) => Some(ns),
            None => return text(400, "Invalid wait time"),
        },
    };
    let min_index = match first("index").filter(|i| !i.is_empty()) {
        None => 0,
        Some(i) => match parse_go_uint(i) {
            Some(v) => v,
            None => return text(400, "Invalid index"),
        },
    };
    if let Some(dc) = first("dc").filter(|dc| !dc.is_empty())
        && dc != DATACENTER
    {
        return text(500, "No path to datacenter");
    }
    let tags: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.clone())
        .collect();

    if min_index > 0 {
        hold(&shared, &service, min_index, query_timeout(wait)).await;
    }

    let passing = match first("passing") {
        None => false,
        Some("") => true,
        Some(v) => match parse_go_bool(v) {
            Some(b) => b,
            None => return text(400, "Invalid value for ?passing"),
        },
    };

    let (index, entries) = {
        let st = shared.state();
        let index = st
            .index_override
            .unwrap_or_else(|| st.catalog.service_index(&service));
        (index, st.catalog.entries(&service, &tags))
    };
    let body: Vec<Value> = entries
        .into_iter()
        .filter(|(all_passing, _)| *all_passing || !passing)
        .map(|(_, entry)| entry)
        .collect();
    let consistency = if stale {
        "stale"
    } else if consistent {
        "consistent"
    } else {
        "leader"
    };
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/json".to_string(),
            ),
            ("x-consul-index", index.to_string()),
            ("x-consul-knownleader", "true".to_string()),
            ("x-consul-lastcontact", "0".to_string()),
            ("x-consul-effective-consistency", consistency.to_string()),
            ("x-consul-query-backend", "blocking-query".to_string()),
        ],
        Value::Array(body).to_string(),
    )
        .into_response()
}

/// Consul's blocking query: returns once the service's index passes `min_index`, the
/// timeout elapses, or the agent shuts down.
async fn hold(shared: &Arc<Shared>, service: &str, min_index: u64, timeout: Duration) {
    let mut changes = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut held = None;
    loop {
        // Mark the current generation seen before reading, so a write between the read
        // and the wait still wakes us.
        changes.borrow_and_update();
        if shared.effective_index(service) > min_index {
            return;
        }
        if held.is_none() {
            held = Some(Held::enter(shared, service));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Consul's `RPCQueryTimeout`: no or a non-positive wait is the default, a long one is
/// capped, then up to 1/16 more at random.
fn query_timeout(wait_ns: Option<i128>) -> Duration {
    let wait = match wait_ns {
        Some(ns) if ns > 0 => Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)),
        _ => DEFAULT_WAIT,
    }
    .min(MAX_WAIT);
    let spread = u64::try_from((wait / JITTER_FRACTION).as_nanos()).unwrap_or(u64::MAX);
    let jitter = if spread == 0 {
        0
    } else {
        rand::random_range(0..spread)
    };
    wait + Duration::from_nanos(jitter)
}

/// Go's `time.ParseDuration`, in signed nanoseconds; `None` wherever Go returns an error
/// (no unit, unknown unit, overflow, empty).
pub fn parse_go_duration(s: &str) -> Option<i128> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (whole, after) = rest.split_at(digits(rest));
        let (fraction, after) = match after.strip_prefix('.') {
            Some(a) => a.split_at(digits(a)),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut ns = whole.checked_mul(unit_ns)?;
        // Digits past the 18th are below a nanosecond for every unit; Go drops them too.
        let fraction = &fraction[..fraction.len().min(18)];
        if !fraction.is_empty() {
            let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
            ns += fraction.parse::<u128>().ok()? * unit_ns / scale;
        }
        total = total.checked_add(ns)?;
        if total > i64::MAX as u128 + u128::from(negative) {
            return None;
        }
        rest = after;
    }
    let total = i128::try_from(total).ok()?;
    Some(if negative { -total } else { total })
}

/// Go's `strconv.ParseUint(s, 10, 64)`: digits only, no sign.
fn parse_go_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}
