//! Wall-clock time as chime stores and prints it: unix milliseconds, RFC3339 UTC with ms.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Microseconds, for sleeping precisely up to a millisecond deadline.
pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// `2026-11-21T08:05:00.000Z`; out-of-range values (never produced by chime) print as ms.
pub fn fmt_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ms = 1_795_248_300_002;
        assert_eq!(fmt_ms(ms), "2026-11-21T08:05:00.002Z");
        assert_eq!(parse_rfc3339_ms("2026-11-21T08:05:00.002Z"), Some(ms));
        assert_eq!(parse_rfc3339_ms("2026-11-21T16:05:00.002+08:00"), Some(ms));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
