//! Protection of downstreams, and of everyone else from one bad downstream.
//!
//! Each target (the origin `scheme://host:port` of a URL, or a Consul service) gets
//! - a concurrency limit: attempts to it wait for one of its permits before taking one of the
//!   node's, so a target that hangs holds at most its own share of the node's capacity;
//! - a circuit breaker: after [`OPEN_AFTER`] consecutive failures that point at the target
//!   (timeouts, refused connections, 5xx, UNAVAILABLE, …) its deliveries are deferred, not
//!   sent and not charged an attempt, for a cool-down that doubles up to [`MAX_COOLDOWN`];
//!   then one probe goes through, and its result closes or re-opens the circuit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::metrics;

pub(crate) const OPEN_AFTER: u32 = 5;
const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
const MAX_COOLDOWN: Duration = Duration::from_secs(60);
/// While a probe is out, other deliveries look again after this long.
const PROBE_RECHECK: Duration = Duration::from_secs(1);
/// Targets unused this long are forgotten.
const IDLE_TARGET: Duration = Duration::from_secs(600);

/// What the breaker allows for one delivery right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Send,
    /// Send: this delivery is the half-open circuit's one probe, and must report back (a
    /// probe that ends up not sent hands the role over with `record(None)`).
    Probe,
    /// The circuit is open: try again at this time (unix ms).
    Defer(i64),
}

#[derive(Debug)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: i64,
        cooldown_ms: i64,
        /// When the circuit first opened (it stays "not closed" through its probes).
        since: i64,
    },
    /// Cool-down over: one probe is (or may be) out.
    HalfOpen {
        probing: bool,
        cooldown_ms: i64,
        since: i64,
    },
}

/// What one recorded result did to the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Unchanged,
    /// Closed → open.
    Opened,
    /// Back to closed after being open for `open_ms`.
    Closed {
        open_ms: i64,
    },
}

pub(crate) struct TargetState {
    pub permits: Arc<Semaphore>,
    circuit: Mutex<Circuit>,
    last_used: std::sync::atomic::AtomicI64,
}

impl TargetState {
    fn new(limit: usize) -> TargetState {
        TargetState {
            permits: Arc::new(Semaphore::new(limit)),
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
            last_used: now_ms().into(),
        }
    }

    /// Whether the circuit would hold deliveries back now (and until when), without taking
    /// the probe role: a cheap filter before a delivery waits for a permit.
    pub fn deferring(&self, now: i64) -> Option<i64> {
        match *self.circuit.lock().expect("circuit lock") {
            Circuit::Open { until, .. } if now < until => Some(until),
            Circuit::HalfOpen { probing: true, .. } => Some(now + PROBE_RECHECK.as_millis() as i64),
            _ => None,
        }
    }

    /// Decides for one delivery about to be sent (call it once, with the permit in hand).
    pub fn admit(&self, now: i64) -> Admission {
        self.last_used
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let mut c = self.circuit.lock().expect("circuit lock");
        match *c {
            Circuit::Closed { .. } => Admission::Send,
            Circuit::Open {
                until,
                cooldown_ms,
                since,
            } if now >= until => {
                *c = Circuit::HalfOpen {
                    probing: true,
                    cooldown_ms,
                    since,
                };
                Admission::Probe
            }
            Circuit::Open { until, .. } => Admission::Defer(until),
            Circuit::HalfOpen {
                probing: false,
                cooldown_ms,
                since,
            } => {
                *c = Circuit::HalfOpen {
                    probing: true,
                    cooldown_ms,
                    since,
                };
                Admission::Probe
            }
            Circuit::HalfOpen { probing: true, .. } => {
                Admission::Defer(now + PROBE_RECHECK.as_millis() as i64)
            }
        }
    }

    /// Records an attempt's result as a health signal: `Some(false)` for failures that say
    /// the target is unwell, `Some(true)` for an answer (even a rejection), `None` when the
    /// attempt says nothing about the target (nothing was sent). Keeps
    /// `chime_open_circuits` current.
    pub fn record(&self, healthy: Option<bool>, now: i64) -> Transition {
        let mut c = self.circuit.lock().expect("circuit lock");
        let first = FIRST_COOLDOWN.as_millis() as i64;
        let (cooldown_ms, since) = match (healthy, &*c) {
            (Some(true), Circuit::Closed { .. }) => {
                *c = Circuit::Closed { failures: 0 };
                return Transition::Unchanged;
            }
            (Some(true), Circuit::Open { since, .. } | Circuit::HalfOpen { since, .. }) => {
                let open_ms = now - since;
                *c = Circuit::Closed { failures: 0 };
                metrics::OPEN_CIRCUITS.add(-1);
                return Transition::Closed { open_ms };
            }
            // A probe that could not be sent: let the next delivery probe instead.
            (
                None,
                Circuit::HalfOpen {
                    cooldown_ms, since, ..
                },
            ) => {
                *c = Circuit::HalfOpen {
                    probing: false,
                    cooldown_ms: *cooldown_ms,
                    since: *since,
                };
                return Transition::Unchanged;
            }
            (None, _) => return Transition::Unchanged,
            (Some(false), Circuit::Closed { failures }) if failures + 1 >= OPEN_AFTER => {
                (first, now)
            }
            (Some(false), Circuit::Closed { failures }) => {
                *c = Circuit::Closed {
                    failures: failures + 1,
                };
                return Transition::Unchanged;
            }
            // A failed probe: back off further (still open; not a new opening).
            (
                Some(false),
                Circuit::HalfOpen {
                    cooldown_ms, since, ..
                },
            ) => {
                let cooldown_ms = (cooldown_ms * 2).min(MAX_COOLDOWN.as_millis() as i64);
                *c = Circuit::Open {
                    until: now + cooldown_ms,
                    cooldown_ms,
                    since: *since,
                };
                return Transition::Unchanged;
            }
            // Attempts sent before the circuit opened keep failing: already open.
            (Some(false), Circuit::Open { .. }) => return Transition::Unchanged,
        };
        *c = Circuit::Open {
            until: now + cooldown_ms,
            cooldown_ms,
            since,
        };
        metrics::OPEN_CIRCUITS.add(1);
        Transition::Opened
    }

    pub fn is_open(&self) -> bool {
        !matches!(
            *self.circuit.lock().expect("circuit lock"),
            Circuit::Closed { .. }
        )
    }
}

/// Every target's state, created on first use.
pub(crate) struct Targets {
    limit: usize,
    map: Mutex<HashMap<Arc<str>, Arc<TargetState>>>,
}

impl Targets {
    pub fn new(limit: usize) -> Targets {
        Targets {
            limit,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &str) -> Arc<TargetState> {
        let mut map = self.map.lock().expect("targets lock");
        if let Some(t) = map.get(key) {
            return t.clone();
        }
        let t = Arc::new(TargetState::new(self.limit));
        map.insert(key.into(), t.clone());
        t
    }

    /// Forgets targets nobody used for a while and nobody is using now.
    pub fn sweep(&self, now: i64) {
        let limit = self.limit;
        self.map.lock().expect("targets lock").retain(|_, t| {
            now - t.last_used.load(std::sync::atomic::Ordering::Relaxed)
                < IDLE_TARGET.as_millis() as i64
                || t.permits.available_permits() < limit
                || Arc::strong_count(t) > 1
        });
    }

    pub fn open_circuits(&self) -> usize {
        let map = self.map.lock().expect("targets lock");
        map.values().filter(|t| t.is_open()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_probes() {
        let t = TargetState::new(4);
        let now = 1_000_000;
        for _ in 0..OPEN_AFTER - 1 {
            assert_eq!(t.record(Some(false), now), Transition::Unchanged);
        }
        // A success in between resets the count.
        t.record(Some(true), now);
        for _ in 0..OPEN_AFTER - 1 {
            assert_eq!(t.record(Some(false), now), Transition::Unchanged);
        }
        assert_eq!(t.admit(now), Admission::Send);
        assert_eq!(
            t.record(Some(false), now),
            Transition::Opened,
            "the fifth failure in a row opens"
        );
        let until = now + FIRST_COOLDOWN.as_millis() as i64;
        assert_eq!(t.admit(now + 10), Admission::Defer(until));
        // Cool-down over: exactly one probe.
        assert_eq!(t.admit(until), Admission::Probe);
        assert!(matches!(t.admit(until + 1), Admission::Defer(_)));
        // The probe fails: open again, twice as long (not a new opening).
        assert_eq!(t.record(Some(false), until + 5), Transition::Unchanged);
        assert_eq!(
            t.admit(until + 6),
            Admission::Defer(until + 5 + 2 * FIRST_COOLDOWN.as_millis() as i64)
        );
        let later = until + 5 + 2 * FIRST_COOLDOWN.as_millis() as i64;
        assert_eq!(t.admit(later), Admission::Probe);
        // The probe succeeds: closed, having been open since the fifth failure.
        assert_eq!(
            t.record(Some(true), later + 1),
            Transition::Closed {
                open_ms: later + 1 - now
            }
        );
        assert_eq!(t.admit(later + 2), Admission::Send);
        assert_eq!(t.admit(later + 2), Admission::Send);
        assert!(!t.is_open());
    }

    #[test]
    fn a_probe_that_was_not_sent_hands_over_and_neutral_results_change_nothing() {
        let t = TargetState::new(1);
        for _ in 0..OPEN_AFTER - 1 {
            t.record(Some(false), 0);
        }
        // "No instance" or "refused" says nothing about the target: no reset, no count.
        t.record(None, 0);
        assert_eq!(
            t.record(Some(false), 0),
            Transition::Opened,
            "still the fifth failure in a row"
        );
        let until = FIRST_COOLDOWN.as_millis() as i64;
        assert_eq!(t.admit(until), Admission::Probe);
        assert!(matches!(t.admit(until), Admission::Defer(_)));
        t.record(None, until);
        assert_eq!(
            t.admit(until + 1),
            Admission::Probe,
            "the next delivery probes"
        );
    }

    #[test]
    fn cooldown_is_capped() {
        let t = TargetState::new(1);
        let mut now = 0;
        for _ in 0..OPEN_AFTER {
            t.record(Some(false), now);
        }
        for _ in 0..20 {
            let Admission::Defer(until) = t.admit(now) else {
                panic!("open")
            };
            assert!(until - now <= MAX_COOLDOWN.as_millis() as i64);
            now = until;
            assert_eq!(t.admit(now), Admission::Probe);
            t.record(Some(false), now);
        }
    }
}
