//! `consul://<service>` targets: one watch per service, client-side balancing, ejection.
//!
//! - Each service in use has exactly one watch task per node. It follows
//!   `/v1/health/service/<name>?passing` with Consul blocking queries (`index`, `wait`,
//!   `X-Consul-Index`) and publishes the passing instances on a `watch` channel that every
//!   delivery to the service reads; a service unused for [`IDLE_STOP`] stops being watched.
//! - If Consul cannot be reached, the last known instances stay in use (stale beats empty) and
//!   the watch retries with backoff.
//! - Picking is power-of-two-choices on in-flight requests. An instance that fails
//!   [`EJECT_AFTER`] times in a row is left out for a while (doubling up to [`MAX_EJECTION`]),
//!   which covers the time before Consul's own health check notices; if every instance is
//!   ejected they are all used again rather than none.
//!
//! consulrs 0.1 has no `health/service` endpoint, so it is declared here on top of the
//! crate's generic blocking-query support. Its client has no timeouts and unwraps response
//! headers, so every call runs in its own task under a deadline: a panic or a hang there is
//! an error of that one query, never of the node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consulrs::api::Features;
use consulrs::api::features::{Blocking, FeaturedEndpoint};
use consulrs::client::{ConsulClient, ConsulClientSettingsBuilder};
use rand::Rng;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::error::AttemptError;
use crate::clock::now_ms;

/// How long one blocking query may wait for a change (Consul's default is 5 min; shorter
/// keeps a dead TCP peer from going unnoticed for long).
const WAIT: Duration = Duration::from_secs(60);
/// Consul adds up to wait/16 of jitter; anything beyond this means the connection is dead.
const QUERY_DEADLINE: Duration = Duration::from_secs(60 + 60 / 16 + 5);
/// Queries never come faster than this, even if the index keeps moving.
const MIN_QUERY_INTERVAL: Duration = Duration::from_millis(50);
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);
/// How long the first delivery to a service waits for its first list of instances.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);
const IDLE_STOP: Duration = Duration::from_secs(600);
/// Consecutive failures that eject an instance.
pub(crate) const EJECT_AFTER: u32 = 3;
const FIRST_EJECTION: Duration = Duration::from_secs(10);
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Services watched at once per node: each holds a long poll on the agent, whose
/// `http_max_conns_per_client` (default 200) would otherwise be exhausted by job writers
/// naming many services, starving the real ones.
const MAX_SERVICES: usize = 64;
/// When every watch slot is taken, a service that has had no instance for this long (a
/// misspelt name, say) gives its slot up to a service not watched yet.
const EMPTY_YIELD: Duration = Duration::from_secs(10);
/// More instances than this in one answer is not a real service; the rest are ignored.
const MAX_INSTANCES: usize = 10_000;

#[derive(Debug, Default, rustify_derive::Endpoint)]
#[endpoint(path = "health/service/{self.service}", response = "Vec<HealthEntry>")]
struct HealthService {
    #[endpoint(skip)]
    features: Option<Features>,
    #[endpoint(skip)]
    service: String,
    #[endpoint(query)]
    passing: Option<bool>,
}

impl FeaturedEndpoint for HealthService {
    fn features(&self) -> Option<Features> {
        self.features.clone()
    }
}

/// The part of Consul's answer chime uses; everything else is ignored, and anything missing
/// defaults so that one odd entry cannot fail the whole list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    #[serde(default, deserialize_with = "null_as_default")]
    node: NodeInfo,
    #[serde(default, deserialize_with = "null_as_default")]
    service: ServiceInfo,
}

/// `null` reads as the default, so one odd entry is skipped later rather than failing the
/// whole answer.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeInfo {
    #[serde(default, deserialize_with = "null_as_default")]
    address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceInfo {
    #[serde(rename = "ID", default, deserialize_with = "null_as_default")]
    id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    port: u32,
}

/// One instance of a service, with its balancing and ejection state. The state survives
/// list refreshes as long as Consul keeps listing the instance at the same address.
#[derive(Debug)]
pub(crate) struct Instance {
    pub id: Arc<str>,
    pub host: String,
    pub port: u16,
    in_flight: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: AtomicI64,
}

impl Instance {
    fn new(id: Arc<str>, host: String, port: u16) -> Instance {
        Instance {
            id,
            host,
            port,
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicI64::new(0),
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn ejected(&self, now: i64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }
}

/// An instance chosen for one request; counts as in flight until dropped.
pub(crate) struct Picked(Arc<Instance>);

impl Picked {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }

    /// Feeds ejection: `healthy` is false for failures that say the instance is unwell.
    pub fn report(&self, healthy: bool) {
        let i = &self.0;
        if healthy {
            i.failures.store(0, Ordering::Relaxed);
            i.ejections.store(0, Ordering::Relaxed);
            return;
        }
        if i.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER {
            i.failures.store(0, Ordering::Relaxed);
            let n = i.ejections.fetch_add(1, Ordering::Relaxed).min(16);
            let ms = (FIRST_EJECTION.as_millis() as i64)
                .saturating_mul(1 << n)
                .min(MAX_EJECTION.as_millis() as i64);
            i.ejected_until.store(now_ms() + ms, Ordering::Relaxed);
            tracing::warn!(instance = %i.id, address = %i.authority(), ejected_for_ms = ms, "instance keeps failing; ejected from balancing");
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

type Instances = Option<Arc<[Arc<Instance>]>>;

struct Service {
    instances: watch::Receiver<Instances>,
    last_used: AtomicI64,
    /// Since when Consul has listed no passing instance (unix ms; 0: it has some, or no
    /// answer yet).
    empty_since: AtomicI64,
    /// Stops the watch when its slot is given to another service.
    stop: CancellationToken,
}

/// Resolves `consul://` targets; cheap to clone.
#[derive(Clone)]
pub(crate) struct Consul {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<ConsulClient>,
    address: String,
    services: Mutex<HashMap<String, Arc<Service>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Consul {
    /// `address` is the agent's `http(s)://host:port`; `CONSUL_HTTP_TOKEN` supplies an ACL
    /// token if the agent needs one.
    pub fn new(
        address: &str,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Consul, String> {
        let settings = ConsulClientSettingsBuilder::default()
            .address(address)
            .build()
            .map_err(|e| format!("consul client settings: {e}"))?;
        let client = ConsulClient::new(settings).map_err(|e| format!("consul client: {e}"))?;
        Ok(Consul {
            inner: Arc::new(Inner {
                client: Arc::new(client),
                address: address.to_string(),
                services: Mutex::new(HashMap::new()),
                cancel,
                tracker,
            }),
        })
    }

    /// Picks an instance of `service`, preferring ones not in `avoid` (those that just
    /// failed this delivery).
    pub async fn pick(&self, service: &str, avoid: &[Arc<str>]) -> Result<Picked, AttemptError> {
        let svc = self.service(service).ok_or_else(|| {
            AttemptError::NoInstance(format!(
                "consul service {service:?}: already watching {MAX_SERVICES} services, the most \
                 one node watches; it is resolved once one of them falls idle or has had no \
                 instance for {EMPTY_YIELD:?}"
            ))
        })?;
        svc.last_used.store(now_ms(), Ordering::Relaxed);
        let mut rx = svc.instances.clone();
        let list = match tokio::time::timeout(FIRST_LIST_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(list)) => list.clone().unwrap_or_else(|| Arc::from(Vec::new())),
            _ => {
                return Err(AttemptError::NoInstance(format!(
                    "consul service {service:?}: no answer from consul at {} yet",
                    self.inner.address
                )));
            }
        };
        choose(&list, avoid, now_ms())
            .map(|i| {
                i.in_flight.fetch_add(1, Ordering::Relaxed);
                Picked(i)
            })
            .ok_or_else(|| {
                AttemptError::NoInstance(format!(
                    "consul service {service:?} has no passing instance"
                ))
            })
    }

    /// True when no instance of `service` is left to balance over (all ejected, or none
    /// passing): only then is a failure the whole service's, for its circuit breaker.
    pub fn exhausted(&self, service: &str) -> bool {
        let services = self.inner.services.lock().expect("services lock");
        let Some(svc) = services.get(service) else {
            return true;
        };
        let now = now_ms();
        svc.instances
            .borrow()
            .as_deref()
            .is_none_or(|list| list.iter().all(|i| i.ejected(now)))
    }

    fn service(&self, name: &str) -> Option<Arc<Service>> {
        let mut services = self.inner.services.lock().expect("services lock");
        if let Some(s) = services.get(name) {
            return Some(s.clone());
        }
        let now = now_ms();
        if services.len() >= MAX_SERVICES {
            let yield_ms = EMPTY_YIELD.as_millis() as i64;
            let victim = services
                .iter()
                .map(|(n, s)| (s.empty_since.load(Ordering::Relaxed), n))
                .filter(|(since, _)| *since > 0 && now - since > yield_ms)
                .min()
                .map(|(since, n)| (since, n.clone()))?;
            let (since, victim) = victim;
            if let Some(old) = services.remove(&victim) {
                old.stop.cancel();
            }
            tracing::info!(service = %victim, empty_for_ms = now - since, replaced_by = %name, "consul service without instances gives its watch slot up");
        }
        let (tx, rx) = watch::channel(None);
        let svc = Arc::new(Service {
            instances: rx,
            last_used: AtomicI64::new(now),
            empty_since: AtomicI64::new(0),
            stop: self.inner.cancel.child_token(),
        });
        services.insert(name.to_string(), svc.clone());
        let this = self.clone();
        let name = name.to_string();
        let me = svc.clone();
        self.inner
            .tracker
            .spawn(async move { this.watch(name, me, tx).await });
        Some(svc)
    }

    /// Follows one service until shutdown or until nobody has used it for [`IDLE_STOP`].
    async fn watch(self, name: String, me: Arc<Service>, tx: watch::Sender<Instances>) {
        let mut index: u64 = 0;
        let mut errors: u32 = 0;
        let mut known: HashMap<(String, String, u16), Arc<Instance>> = HashMap::new();
        loop {
            if me.stop.is_cancelled() {
                return; // its slot went to another service
            }
            let idle =
                now_ms() - me.last_used.load(Ordering::Relaxed) > IDLE_STOP.as_millis() as i64;
            if idle {
                let mut services = self.inner.services.lock().expect("services lock");
                if services.get(&name).is_some_and(|s| Arc::ptr_eq(s, &me)) {
                    services.remove(&name);
                }
                tracing::debug!(service = %name, "consul service unused; watch stopped");
                return;
            }
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.query(&name, index) => r,
                _ = me.stop.cancelled() => return,
            };
            match result {
                Ok((entries, new_index)) => {
                    if errors > 0 {
                        tracing::info!(service = %name, "consul reachable again");
                    }
                    errors = 0;
                    // Consul's rules: an index that goes backwards means a reset, and 0 is
                    // never a valid index to block on.
                    index = match new_index {
                        Some(i) if i >= index => i.max(1),
                        _ => 0,
                    };
                    let list = instances_of(&name, entries, &mut known);
                    if list.is_empty() {
                        let _ = me.empty_since.compare_exchange(
                            0,
                            now_ms(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    } else {
                        me.empty_since.store(0, Ordering::Relaxed);
                    }
                    tx.send_if_modified(|current| {
                        let changed = current.as_deref().map(ids) != Some(ids(&list));
                        if changed || current.is_none() {
                            tracing::info!(service = %name, passing = list.len(), "consul instances");
                        }
                        *current = Some(list.into());
                        true
                    });
                }
                Err(e) => {
                    errors += 1;
                    index = 0;
                    let backoff = Duration::from_millis(500)
                        .saturating_mul(1 << errors.min(6))
                        .min(MAX_ERROR_BACKOFF);
                    if errors == 1 || errors.is_power_of_two() {
                        tracing::warn!(service = %name, error = %e, errors, retry_in = ?backoff, "consul query failed; keeping the last known instances");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = me.stop.cancelled() => return,
                    }
                    // The first delivery waits for a first answer; an unreachable Consul is
                    // an answer too (no instance), so it does not wait in vain.
                    tx.send_if_modified(|current| {
                        if current.is_none() {
                            *current = Some(Arc::from(Vec::new()));
                            true
                        } else {
                            false
                        }
                    });
                }
            }
            tokio::time::sleep_until(started + MIN_QUERY_INTERVAL).await;
        }
    }

    /// One (blocking, if `index` > 0) health query: the entries and `X-Consul-Index`.
    async fn query(
        &self,
        name: &str,
        index: u64,
    ) -> Result<(Vec<HealthEntry>, Option<u64>), String> {
        let features = Features {
            blocking: (index > 0).then(|| Blocking {
                index,
                wait: Some(format!("{}s", WAIT.as_secs())),
            }),
            ..Default::default()
        };
        let endpoint = HealthService {
            features: Some(features),
            service: name.to_string(),
            passing: Some(true),
        };
        let client = self.inner.client.clone();
        // Aborted when dropped: a watch cancelled at shutdown takes its query with it.
        let mut call = AbortOnDropHandle::new(tokio::spawn(async move {
            consulrs::api::exec_with_result(&*client, endpoint).await
        }));
        let joined = match tokio::time::timeout(QUERY_DEADLINE, &mut call).await {
            Ok(joined) => joined,
            Err(_) => return Err(format!("no answer within {QUERY_DEADLINE:?}")),
        };
        let response = match joined {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) if e.is_panic() => return Err("the consul client panicked on the answer".into()),
            Err(e) => return Err(e.to_string()),
        };
        let new_index = response
            .index
            .as_deref()
            .and_then(|i| i.trim().parse().ok());
        Ok((response.response, new_index))
    }
}

fn ids(list: &[Arc<Instance>]) -> Vec<(&str, String)> {
    list.iter().map(|i| (&*i.id, i.authority())).collect()
}

/// Turns Consul's entries into instances, reusing the state of instances already known.
fn instances_of(
    service: &str,
    entries: Vec<HealthEntry>,
    known: &mut HashMap<(String, String, u16), Arc<Instance>>,
) -> Vec<Arc<Instance>> {
    let mut out = Vec::with_capacity(entries.len().min(MAX_INSTANCES));
    for e in entries.into_iter().take(MAX_INSTANCES) {
        // Consul's documented fallback: an empty service address means the node's address.
        let host = if e.service.address.is_empty() {
            e.node.address
        } else {
            e.service.address
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = match u16::try_from(e.service.port) {
            Ok(p) if p > 0 => p,
            _ => {
                tracing::warn!(service, instance = %e.service.id, port = e.service.port, "consul instance without a usable port; skipped");
                continue;
            }
        };
        if !usable_host(&host) {
            tracing::warn!(service, instance = %e.service.id, "consul instance without a usable address; skipped");
            continue;
        }
        let key = (e.service.id.clone(), host.clone(), port);
        let inst = known
            .entry(key)
            .or_insert_with(|| Arc::new(Instance::new(e.service.id.into(), host, port)))
            .clone();
        out.push(inst);
    }
    let listed: std::collections::HashSet<*const Instance> = out.iter().map(Arc::as_ptr).collect();
    known.retain(|_, i| listed.contains(&Arc::as_ptr(i)));
    out
}

/// A host that can go into a URL as it is: an IP address or a DNS name, nothing that would
/// change the URL's meaning (`#`, `?`, `/`, `@`, `%`, spaces).
fn usable_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

/// Power of two choices over the instances not ejected and not in `avoid`; falls back to the
/// avoided ones, then to the ejected ones, rather than to nothing.
fn choose(list: &[Arc<Instance>], avoid: &[Arc<str>], now: i64) -> Option<Arc<Instance>> {
    let healthy: Vec<&Arc<Instance>> = list.iter().filter(|i| !i.ejected(now)).collect();
    let fresh: Vec<&Arc<Instance>> = healthy
        .iter()
        .copied()
        .filter(|i| !avoid.contains(&i.id))
        .collect();
    let pool: Vec<&Arc<Instance>> = if !fresh.is_empty() {
        fresh
    } else if !healthy.is_empty() {
        healthy
    } else {
        list.iter().collect()
    };
    match pool.len() {
        0 => None,
        1 => Some(pool[0].clone()),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (pool[a], pool[b]);
            let load = |i: &Instance| i.in_flight.load(Ordering::Relaxed);
            Some(if load(b) < load(a) { b } else { a }.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: usize) -> Vec<Arc<Instance>> {
        (0..n)
            .map(|i| {
                Arc::new(Instance::new(
                    format!("i{i}").into(),
                    "10.0.0.1".into(),
                    8000 + i as u16,
                ))
            })
            .collect()
    }

    #[test]
    fn picks_spread_and_prefer_the_less_loaded() {
        let l = list(3);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            let i = choose(&l, &[], 0).unwrap();
            counts[usize::from(i.port - 8000)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 700), "{counts:?}");
        l[0].in_flight.store(100, Ordering::Relaxed);
        for _ in 0..200 {
            // Two distinct choices: the loaded one can never beat an idle one.
            assert_ne!(&*choose(&l, &[], 0).unwrap().id, "i0");
        }
    }

    #[test]
    fn avoided_and_ejected_instances_are_left_out_but_never_all() {
        let l = list(3);
        let avoid: Vec<Arc<str>> = vec!["i1".into()];
        for _ in 0..100 {
            assert_ne!(&*choose(&l, &avoid, 0).unwrap().id, "i1");
        }
        let p = Picked(l[2].clone());
        l[2].in_flight.fetch_add(1, Ordering::Relaxed);
        for _ in 0..EJECT_AFTER {
            p.report(false);
        }
        let now = now_ms();
        assert!(l[2].ejected(now));
        for _ in 0..100 {
            let id = choose(&l, &avoid, now).unwrap().id.clone();
            assert_eq!(&*id, "i0", "i1 avoided, i2 ejected");
        }
        // Everything ejected or avoided: still an answer.
        let all: Vec<Arc<str>> = vec!["i0".into(), "i1".into()];
        assert!(choose(&l, &all, now).is_some());
        assert!(choose(&[], &[], now).is_none());
        p.report(true);
        assert_eq!(l[2].failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn hostile_entries_are_skipped() {
        let entries: Vec<HealthEntry> = serde_json::from_str(
            r#"[
              {"Node":{"Address":"10.0.0.9"},"Service":{"ID":"a","Address":"","Port":80}},
              {"Node":{"Address":"10.0.0.9"},"Service":{"ID":"b","Address":"10.0.0.2","Port":0}},
              {"Node":{"Address":"10.0.0.9"},"Service":{"ID":"c","Address":"10.0.0.3","Port":70000}},
              {"Node":{},"Service":{"ID":"d","Address":"evil/../x","Port":81}},
              {"Service":{"ID":"e","Address":"::1","Port":82}},
              {"Node":null,"Service":{"ID":null,"Address":null,"Port":83}},
              {"Node":{"Address":"h#x"},"Service":{"ID":"g","Address":"","Port":84}},
              {"Service":null}
            ]"#,
        )
        .unwrap();
        let mut known = HashMap::new();
        let got = instances_of("s", entries, &mut known);
        let got: Vec<String> = got.iter().map(|i| i.authority()).collect();
        assert_eq!(got, ["10.0.0.9:80", "[::1]:82"]);
    }
}
