//! When to retry a failed attempt.

use std::time::Duration;

use crate::job::RetryPolicy;

/// Longest `Retry-After` honoured: a hostile receiver must not park a delivery for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delay after attempt `attempt` failed. Exponential (`initial * 2^(attempt-1)`, capped at
/// `max`) with "equal jitter": a random point in the upper half of the step. Full jitter
/// would spread retries better but could make a later gap shorter than an earlier one; with
/// equal jitter gaps never shrink, which receivers and operators can reason about.
/// A `Retry-After` from a 429/503 raises the delay to at least that.
pub fn retry_delay(policy: &RetryPolicy, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = attempt.saturating_sub(1).min(40);
    let base = policy
        .initial_backoff_ms
        .saturating_mul(1u64 << exp)
        .min(policy.max_backoff_ms);
    let half = base / 2;
    let jittered = half + rand::random_range(0..=base - half);
    let delay = Duration::from_millis(jittered);
    match retry_after {
        Some(ra) => delay.max(ra.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_age_ms: 60_000,
        };
        for _ in 0..200 {
            let d: Vec<u128> = (1..=6)
                .map(|a| retry_delay(&p, a, None).as_millis())
                .collect();
            assert!((50..=100).contains(&d[0]), "{d:?}");
            assert!((100..=200).contains(&d[1]), "{d:?}");
            assert!((200..=400).contains(&d[2]), "{d:?}");
            assert!(
                (500..=1000).contains(&d[4]) && (500..=1000).contains(&d[5]),
                "{d:?}"
            );
            assert!(d.windows(2).take(3).all(|w| w[0] <= w[1]), "{d:?}");
        }
        assert!(retry_delay(&p, u32::MAX, None) <= Duration::from_millis(1000));
    }

    #[test]
    fn retry_after_raises_but_is_capped() {
        let p = RetryPolicy::default();
        assert!(retry_delay(&p, 1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert!(retry_delay(&p, 1, Some(Duration::from_secs(10_000_000))) <= MAX_RETRY_AFTER);
    }
}
