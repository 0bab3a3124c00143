//! Process-wide metrics in Prometheus text format.
//!
//! A handful of atomics is all chime needs; each stage of a fire (record, deliver) has a
//! counter or histogram here, and `/metrics` renders them.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }
    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub struct Gauge {
    name: &'static str,
    help: &'static str,
    value: AtomicI64,
}

impl Gauge {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: AtomicI64::new(0),
        }
    }
    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, d: i64) {
        self.value.fetch_add(d, Ordering::Relaxed);
    }
}

/// A counter with one label whose values are fixed at compile time.
pub struct LabeledCounter<const N: usize> {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: [&'static str; N],
    counts: [AtomicU64; N],
}

impl<const N: usize> LabeledCounter<N> {
    /// Panics on an unknown label value: a programming error caught by any test that counts.
    pub fn inc(&self, value: &str) {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or_else(|| panic!("unknown {} label {value:?}", self.name));
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

pub struct Histogram {
    name: &'static str,
    help: &'static str,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, so it fits an integer atomic.
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

pub static FIRES: Counter = Counter::new(
    "chime_fires_total",
    "Fires recorded and dispatched by this node.",
);
pub static FIRES_DEDUPED: Counter = Counter::new(
    "chime_fires_deduplicated_total",
    "Fires found already recorded (dispatched before) and not sent again.",
);
pub static FIRES_FENCED: Counter = Counter::new(
    "chime_fires_fenced_total",
    "Fires not dispatched because this node no longer held their slot's lease.",
);
pub static FIRES_MISSED: Counter = Counter::new(
    "chime_fires_missed_total",
    "Scheduled times older than the catch-up window, recorded as missed.",
);
pub static STORE_ERRORS: Counter = Counter::new(
    "chime_store_errors_total",
    "Database operations that failed and were retried.",
);
pub static JOBS_LOADED: Gauge = Gauge::new("chime_jobs", "Jobs held by this node's scheduler.");
pub static FIRES_RECORDED_UNSENT: Gauge = Gauge::new(
    "chime_fires_recorded_unsent",
    "Fires recorded ahead of their time and waiting for it.",
);
pub static DELIVERIES_WAITING: Gauge = Gauge::new(
    "chime_deliveries_waiting",
    "Delivery attempts queued in memory (mostly waiting for a retry).",
);
pub static DELIVERIES_DEFERRED: Counter = Counter::new(
    "chime_deliveries_deferred_total",
    "Deliveries held back, unsent and uncharged, because their target's circuit was open.",
);
pub static OPEN_CIRCUITS: Gauge = Gauge::new(
    "chime_open_circuits",
    "Targets whose circuit breaker is open or probing.",
);
pub static DELIVERIES: LabeledCounter<4> = LabeledCounter {
    name: "chime_delivery_attempts_total",
    help: "Callback attempts by outcome (expired: given up unsent, past retry.max_age_ms).",
    label: "outcome",
    values: ["succeeded", "retried", "failed", "expired"],
    counts: [const { AtomicU64::new(0) }; 4],
};
pub static FIRE_LAG_SECONDS: Histogram = Histogram::new(
    "chime_fire_lag_seconds",
    "Time from a fire's scheduled time to its hand-over to delivery.",
);
pub static RECORD_AHEAD_SECONDS: Histogram = Histogram::new(
    "chime_record_ahead_seconds",
    "How long before its scheduled time a fire was recorded (0: recorded late).",
);
pub static RECORD_BATCH_SECONDS: Histogram = Histogram::new(
    "chime_record_batch_seconds",
    "Time to record one batch of fires in the database.",
);
pub static REBALANCE_SECONDS: Histogram = Histogram::new(
    "chime_rebalance_seconds",
    "Time to acquire gained slots and arm their jobs.",
);
pub static DELIVERY_DELAY_SECONDS: Histogram = Histogram::new(
    "chime_delivery_delay_seconds",
    "Time from scheduled time to the end of the first callback attempt.",
);

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut out = String::with_capacity(4096);
    for c in [
        &FIRES,
        &FIRES_DEDUPED,
        &FIRES_FENCED,
        &FIRES_MISSED,
        &STORE_ERRORS,
        &DELIVERIES_DEFERRED,
    ] {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} counter\n{} {}",
            c.name,
            c.help,
            c.name,
            c.name,
            c.get()
        );
    }
    for g in [
        &JOBS_LOADED,
        &FIRES_RECORDED_UNSENT,
        &DELIVERIES_WAITING,
        &OPEN_CIRCUITS,
    ] {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} gauge\n{} {}",
            g.name,
            g.help,
            g.name,
            g.name,
            g.value.load(Ordering::Relaxed)
        );
    }
    let d = &DELIVERIES;
    let _ = writeln!(
        out,
        "# HELP {} {}\n# TYPE {} counter",
        d.name, d.help, d.name
    );
    for (v, c) in d.values.iter().zip(&d.counts) {
        let _ = writeln!(
            out,
            "{}{{{}=\"{v}\"}} {}",
            d.name,
            d.label,
            c.load(Ordering::Relaxed)
        );
    }
    for h in [
        &FIRE_LAG_SECONDS,
        &RECORD_AHEAD_SECONDS,
        &RECORD_BATCH_SECONDS,
        &REBALANCE_SECONDS,
        &DELIVERY_DELAY_SECONDS,
    ] {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} histogram",
            h.name, h.help, h.name
        );
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&h.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}_bucket{{le=\"{b}\"}} {cumulative}", h.name);
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {count}", h.name);
        let _ = writeln!(
            out,
            "{}_sum {}\n{}_count {count}",
            h.name,
            h.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            h.name
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        FIRES.inc();
        DELIVERIES.inc("retried");
        FIRE_LAG_SECONDS.observe(0.003);
        let text = render();
        assert!(text.contains("# TYPE chime_fires_total counter"));
        assert!(text.contains("chime_delivery_attempts_total{outcome=\"retried\"} "));
        assert!(text.contains("chime_fire_lag_seconds_bucket{le=\"0.005\"} "));
        assert!(text.contains("chime_fire_lag_seconds_bucket{le=\"+Inf\"} "));
    }
}
