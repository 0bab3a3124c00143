//! Cluster membership over gossip (chitchat), and the ring of slot ownership derived from it.
//!
//! Each node publishes its HTTP address and state (`joining`, `ready`, `leaving`) as gossip
//! keys. Gossip values are untrusted input: a value that does not parse makes the node
//! invisible rather than crashing or misrouting anything. The ring covers `ready` members
//! only and is published on a `watch` channel, which keeps only the latest value, so a burst
//! of membership changes collapses into one rebalance.
//!
//! Gossip only says who *should* own a slot. Who may *fire* it is decided by slot leases
//! in the database (see `scheduler::ownership`), because gossip views disagree for seconds
//! during joins, crashes and partitions.

mod leases;
mod ring;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState as GossipState,
    ProtocolVersion, spawn_chitchat,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use leases::{Leases, WriteGuard};
pub use ring::Ring;

pub(crate) const KEY_HTTP_ADDR: &str = "chime.http_addr";
pub(crate) const KEY_STATE: &str = "chime.state";

/// Gossip round interval. With phi 8 a dead peer is noticed after roughly 8 × the observed
/// heartbeat interval, about 2–4 s on a LAN (measured in docs/benchmarks.md).
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
const PHI_THRESHOLD: f64 = 8.0;
/// Dead ids (e.g. old generations of a restarted node) are forgotten after this; 24 h (the
/// default) lets them pile up in every digest.
const DEAD_NODE_GRACE: Duration = Duration::from_secs(15 * 60);

/// A node id whose holder has not heartbeated in the database for this long is dead: free
/// for another process to take, and shown as `dead` (a restart after a crash waits at most
/// this long for its own old claim).
pub const NODE_STALE_MS: i64 = 5_000;
/// A dead node is listed in `GET /v1/cluster` until it has been silent this long.
pub const FORGET_DEAD_AFTER_MS: i64 = DEAD_NODE_GRACE.as_millis() as i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Joining,
    Ready,
    Leaving,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Ready => "ready",
            MemberState::Leaving => "leaving",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "joining" => Some(MemberState::Joining),
            "ready" => Some(MemberState::Ready),
            "leaving" => Some(MemberState::Leaving),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub http_addr: SocketAddr,
    pub state: MemberState,
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start gossip on {addr}: {message}")]
    Start { addr: SocketAddr, message: String },
}

pub struct ClusterConfig {
    pub node_id: String,
    pub cluster_id: String,
    pub gossip_addr: SocketAddr,
    pub gossip_advertise: SocketAddr,
    pub http_advertise: SocketAddr,
    pub seeds: Vec<String>,
}

/// The senders behind a solo node's fixed member list and ring.
type SoloSenders = (watch::Sender<Arc<Vec<Member>>>, watch::Sender<Arc<Ring>>);

/// Handle to this node's membership. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    node_id: Arc<str>,
    /// None for a solo node (embedded SQLite: no other node can share its database).
    handle: Option<Arc<ChitchatHandle>>,
    /// Keeps a solo node's channels open.
    _solo: Option<Arc<SoloSenders>>,
    members_rx: watch::Receiver<Arc<Vec<Member>>>,
    ring_rx: watch::Receiver<Arc<Ring>>,
}

impl Cluster {
    /// Starts gossip as `joining` and the task that turns gossip into members and rings.
    pub async fn join(
        config: ClusterConfig,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Cluster, ClusterError> {
        // A restarted node must present a larger generation, or peers ignore its heartbeats.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                config.node_id.clone(),
                generation,
                config.gossip_advertise,
            ),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: config.gossip_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                // The default 5 s prior would slow detection for the first minute after a join.
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: DEAD_NODE_GRACE,
                ..Default::default()
            },
            marked_for_deletion_grace_period: DEAD_NODE_GRACE,
            catchup_callback: None,
            // Peers without a parseable address are useless to us; do not count them as live.
            extra_liveness_predicate: Some(Box::new(|s: &GossipState| {
                s.get(KEY_HTTP_ADDR)
                    .is_some_and(|a| a.parse::<SocketAddr>().is_ok())
            })),
            protocol_version: ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_HTTP_ADDR.to_string(), config.http_advertise.to_string()),
            (
                KEY_STATE.to_string(),
                MemberState::Joining.as_str().to_string(),
            ),
        ];
        let handle = spawn_chitchat(chitchat_config, initial, &UdpTransport)
            .await
            .map_err(|e| ClusterError::Start {
                addr: config.gossip_addr,
                message: format!("{e:#}"),
            })?;
        let me = Member {
            node_id: config.node_id.clone(),
            http_addr: config.http_advertise,
            state: MemberState::Joining,
            generation,
        };
        let (members_tx, members_rx) = watch::channel(Arc::new(vec![me]));
        let (ring_tx, ring_rx) = watch::channel(Arc::new(Ring::new::<&str>(&[])));
        let live_rx = handle.chitchat().lock().await.live_nodes_watcher();
        tracker.spawn(watch_members(
            config.node_id.clone(),
            live_rx,
            members_tx,
            ring_tx,
            cancel,
        ));
        Ok(Cluster {
            node_id: config.node_id.into(),
            handle: Some(Arc::new(handle)),
            _solo: None,
            members_rx,
            ring_rx,
        })
    }

    /// A one-node cluster without gossip: it owns every slot.
    pub fn solo(node_id: &str, http_addr: SocketAddr) -> Cluster {
        let me = Member {
            node_id: node_id.to_string(),
            http_addr,
            state: MemberState::Ready,
            generation: 0,
        };
        let (members_tx, members_rx) = watch::channel(Arc::new(vec![me]));
        let (ring_tx, ring_rx) = watch::channel(Arc::new(Ring::new(&[node_id])));
        Cluster {
            node_id: node_id.into(),
            handle: None,
            _solo: Some(Arc::new((members_tx, ring_tx))),
            members_rx,
            ring_rx,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub async fn set_state(&self, state: MemberState) {
        if let Some(handle) = &self.handle {
            handle
                .with_chitchat(|cc| cc.self_node_state().set(KEY_STATE, state.as_str()))
                .await;
        }
    }

    /// Live members as last seen, this node included.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.members_rx.borrow().clone()
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring_rx.borrow().clone()
    }

    /// Changes of the ring; the latest value only.
    pub fn ring_watch(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring_rx.clone()
    }

    pub fn http_addr_of(&self, node_id: &str) -> Option<SocketAddr> {
        self.members_rx
            .borrow()
            .iter()
            .find(|m| m.node_id == node_id)
            .map(|m| m.http_addr)
    }

    /// Stops gossiping; peers then see this node die (it should have said `leaving` first).
    pub async fn shutdown(&self) {
        if let Some(handle) = &self.handle
            && let Err(e) = handle.initiate_shutdown()
        {
            tracing::debug!(error = %e, "gossip already stopped");
        }
    }
}

/// One gossip entry as a member; None if anything about it is off.
fn parse_member(
    node_id: &str,
    generation: u64,
    http_addr: Option<&str>,
    state: Option<&str>,
) -> Option<Member> {
    crate::job::validate_id("node_id", node_id).ok()?;
    Some(Member {
        node_id: node_id.to_string(),
        http_addr: http_addr?.parse().ok()?,
        state: MemberState::parse(state?)?,
        generation,
    })
}

/// Members from parsed entries: one per node id, its newest generation.
fn newest_generations(entries: impl IntoIterator<Item = Member>) -> Vec<Member> {
    let mut by_id: BTreeMap<String, Member> = BTreeMap::new();
    for m in entries {
        match by_id.get(&m.node_id) {
            Some(existing) if existing.generation >= m.generation => {}
            _ => {
                by_id.insert(m.node_id.clone(), m);
            }
        }
    }
    by_id.into_values().collect()
}

fn members_of(live: &BTreeMap<ChitchatId, GossipState>) -> Vec<Member> {
    newest_generations(live.iter().filter_map(|(id, st)| {
        parse_member(
            &id.node_id,
            id.generation_id,
            st.get(KEY_HTTP_ADDR),
            st.get(KEY_STATE),
        )
    }))
}

async fn watch_members(
    self_id: String,
    mut live_rx: watch::Receiver<BTreeMap<ChitchatId, GossipState>>,
    members_tx: watch::Sender<Arc<Vec<Member>>>,
    ring_tx: watch::Sender<Arc<Ring>>,
    cancel: CancellationToken,
) {
    loop {
        let members = members_of(&live_rx.borrow_and_update());
        // The watcher's map is empty until the first gossip round; keep our own entry.
        if !members.is_empty() || members_tx.borrow().iter().all(|m| m.node_id != self_id) {
            let ready: Vec<&str> = members
                .iter()
                .filter(|m| m.state == MemberState::Ready)
                .map(|m| m.node_id.as_str())
                .collect();
            let ring = Ring::new(&ready);
            if **ring_tx.borrow() != ring {
                tracing::info!(members = ?ready, "ring changed");
                let _ = ring_tx.send(Arc::new(ring));
            }
            let _ = members_tx.send(Arc::new(members));
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = live_rx.changed() => if changed.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_or_stale_entries_are_ignored() {
        let entries = [
            ("a", 1, Some("127.0.0.1:1"), Some("ready")),
            ("a", 2, Some("127.0.0.1:2"), Some("joining")),
            ("b", 1, Some("not an addr"), Some("ready")),
            ("c", 1, Some("127.0.0.1:3"), Some("bogus")),
            ("d e", 1, Some("127.0.0.1:4"), Some("ready")),
            ("f", 1, None, Some("ready")),
            ("g", 1, Some("127.0.0.1:5"), None),
        ];
        let members = newest_generations(
            entries
                .iter()
                .filter_map(|(n, g, a, s)| parse_member(n, *g, *a, *s)),
        );
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].node_id, "a");
        assert_eq!(members[0].generation, 2, "the newest generation wins");
        assert_eq!(members[0].state, MemberState::Joining);
        assert_eq!(members[0].http_addr, "127.0.0.1:2".parse().unwrap());
    }
}
