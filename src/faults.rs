//! Fault injection for chime's own black-box tests: failures that cannot be provoked from
//! outside the process at a precise point, such as a COMMIT that succeeds but whose reply is
//! lost. Read once from `CHIME_FAULTS` (unset in production: every check is then one
//! relaxed atomic load).
//!
//! `CHIME_FAULTS=lose_commit_reply:N` makes the first N fire batches that commit report a
//! timeout instead, as if the reply had been lost on the way back;
//! `lose_attempt_reply:N` does the same to the first N stored attempt numbers
//! ([`Store::begin_attempt`](crate::store::Store::begin_attempt)).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::StoreError;

struct Faults {
    lose_commit_reply: AtomicU64,
    lose_attempt_reply: AtomicU64,
}

static FAULTS: LazyLock<Faults> = LazyLock::new(|| {
    let mut lose = 0;
    let mut lose_attempt = 0;
    if let Ok(spec) = std::env::var("CHIME_FAULTS") {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            match item.split_once(':') {
                Some(("lose_commit_reply", n)) => lose = n.parse().unwrap_or(0),
                Some(("lose_attempt_reply", n)) => lose_attempt = n.parse().unwrap_or(0),
                _ => tracing::warn!(fault = item, "unknown fault in CHIME_FAULTS, ignored"),
            }
        }
        tracing::warn!(faults = %spec, "fault injection is on (CHIME_FAULTS); never use this in production");
    }
    Faults {
        lose_commit_reply: AtomicU64::new(lose),
        lose_attempt_reply: AtomicU64::new(lose_attempt),
    }
});

/// After a fire batch's COMMIT succeeded: maybe pretend its reply was lost.
pub(crate) fn after_commit() -> Result<(), StoreError> {
    lose_reply(&FAULTS.lose_commit_reply, "a committed fire batch")
}

/// After an attempt number was stored: maybe pretend the reply was lost.
pub(crate) fn after_begin_attempt() -> Result<(), StoreError> {
    lose_reply(&FAULTS.lose_attempt_reply, "a stored attempt number")
}

fn lose_reply(left: &AtomicU64, what: &str) -> Result<(), StoreError> {
    if left.load(Ordering::Relaxed) == 0 {
        return Ok(());
    }
    if left
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        tracing::warn!("fault injected: the reply to {what} is lost");
        return Err(StoreError::Timeout(Duration::ZERO));
    }
    Ok(())
}
