//! TEMPORARY STUB (replaced by the real module): same API, naive semantics.
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
pub const MIN_EVERY: Duration = Duration::from_secs(1);
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);
pub fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, ScheduleError> {
    name.parse()
        .map_err(|_| ScheduleError(format!("unknown time zone {name:?}")))
}
#[derive(Debug, Clone)]
pub struct Schedule {
    src: Arc<str>,
    tz: chrono_tz::Tz,
    every: Option<i64>,
    at: Option<i64>,
    cron: Option<Arc<cron::Schedule>>,
}
impl Schedule {
    pub fn parse(expr: &str, tz: chrono_tz::Tz) -> Result<Schedule, ScheduleError> {
        let e = expr.trim();
        let mut s = Schedule {
            src: e.into(),
            tz,
            every: None,
            at: None,
            cron: None,
        };
        if let Some(d) = e.strip_prefix("@every ") {
            let d = crate::config::parse_duration(d).map_err(ScheduleError)?;
            if d < MIN_EVERY {
                return Err(ScheduleError("@every must be at least 1s".into()));
            }
            s.every = Some(d.as_millis() as i64);
        } else if let Some(t) = e.strip_prefix("@at ") {
            s.at = Some(
                crate::clock::parse_rfc3339_ms(t).ok_or_else(|| ScheduleError("bad @at".into()))?,
            );
        } else {
            let c = if e.split_whitespace().count() == 5 {
                format!("0 {e}")
            } else {
                e.to_string()
            };
            s.cron = Some(Arc::new(
                cron::Schedule::from_str(&c).map_err(|x| ScheduleError(x.to_string()))?,
            ));
        }
        Ok(s)
    }
    pub fn next_after(&self, after_ms: i64, anchor_ms: i64) -> Option<i64> {
        if let Some(p) = self.every {
            let k = if after_ms < anchor_ms {
                1
            } else {
                (after_ms - anchor_ms) / p + 1
            };
            return Some(anchor_ms + k * p);
        }
        if let Some(a) = self.at {
            return (a > after_ms).then_some(a);
        }
        let after = chrono::DateTime::from_timestamp_millis(after_ms)?.with_timezone(&self.tz);
        self.cron
            .as_ref()?
            .after(&after)
            .map(|t| t.timestamp_millis())
            .find(|t| *t > after_ms)
    }
    pub fn prev_at_or_before(&self, at_ms: i64, anchor_ms: i64) -> Option<i64> {
        if let Some(p) = self.every {
            let k = (at_ms - anchor_ms) / p;
            return (k >= 1).then_some(anchor_ms + k * p);
        }
        if let Some(a) = self.at {
            return (a <= at_ms).then_some(a);
        }
        let at = chrono::DateTime::from_timestamp_millis(at_ms + 1)?.with_timezone(&self.tz);
        self.cron
            .as_ref()?
            .after(&at)
            .rev()
            .map(|t| t.timestamp_millis())
            .find(|t| *t <= at_ms)
    }
    pub fn is_one_shot(&self) -> bool {
        self.at.is_some()
    }
    pub fn source(&self) -> &str {
        &self.src
    }
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.tz
    }
}
