//! Job schedules: parsing the `schedule` + `timezone` pair of a job definition and computing
//! fire times.
//!
//! Accepted forms (see chime's interface document):
//! - cron with seconds: `sec min hour dom month dow [year]`; a 5-field crontab means second 0;
//!   day-of-week uses Vixie numbering (0 and 7 are Sunday) and Vixie's DOM/DOW OR rule;
//! - `@yearly` `@annually` `@monthly` `@weekly` `@daily` `@midnight` `@hourly`;
//! - `@every <duration>` (e.g. `30s`, `1h30m`), fired at `anchor + k * period`, k >= 1;
//! - `@at <RFC3339>`, a one-shot fire.
//!
//! The `cron` crate does the calendar search, but it speaks Quartz (Sunday = 1, DOM AND DOW)
//! and fires an ambiguous DST wall time twice, stepping backwards in between. So every field is
//! tokenized and validated here and handed to it in a canonical form (day-of-week as names),
//! and the crate is only ever asked about *wall-clock* times, which this module maps to instants
//! itself (nonexistent times skipped, repeated times fired once).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone,
    Timelike,
};
use chrono_tz::Tz;
use cron::TimeUnitSpec;

/// `@every` periods below this are rejected.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// 1970-01-01T00:00:00Z: the cron crate cannot express years before 1970.
const RANGE_START_MS: i64 = 0;
/// 2100-12-31T23:59:59.999Z: the cron crate's last year is 2100.
const RANGE_END_MS: i64 = 4_133_980_800_000 - 1;

/// How many candidate wall times one call may reject before giving up. In every real zone the
/// first or second candidate is taken; the bound only guarantees termination.
const MAX_CANDIDATES: usize = 16;

/// Longest DST gap searched for. The longest in the tz database is a whole day (Samoa, 2011).
const MAX_GAP_SECS: i64 = 4 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "schedule is empty (expected a cron expression, @every <duration> or @at <RFC3339 time>)"
    )]
    Empty,
    #[error("expected 5, 6 or 7 fields, got {0}")]
    FieldCount(usize),
    #[error("{field} value {value} is out of range {min}-{max}{hint}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: u32,
        max: u32,
        hint: &'static str,
    },
    #[error("invalid {field} value \"{value}\" ({expected})")]
    InvalidValue {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{field} range {start}-{end} is backwards (the start must not be after the end)")]
    BackwardsRange {
        field: &'static str,
        start: String,
        end: String,
    },
    #[error(
        "invalid step \"{step}\" in {field} field (a step is a whole number of at least 1, as in */5)"
    )]
    InvalidStep { field: &'static str, step: String },
    #[error("empty list item in {field} field \"{text}\"")]
    EmptyItem { field: &'static str, text: String },
    #[error("'{0}' is not supported")]
    Unsupported(char),
    #[error("@reboot is not supported (chime only runs time-based schedules)")]
    Reboot,
    #[error(
        "unknown shorthand \"{0}\" (accepted: @yearly, @annually, @monthly, @weekly, @daily, \
         @midnight, @hourly, @every <duration>, @at <RFC3339 time>)"
    )]
    UnknownShorthand(String),
    #[error("{keyword} takes no argument, got \"{argument}\"")]
    UnexpectedArgument { keyword: String, argument: String },
    #[error("@every needs a duration such as 30s or 1h30m, got \"{0}\"")]
    InvalidEvery(String),
    #[error("@every must be at least 1s, got \"{0}\"")]
    EveryTooShort(String),
    #[error("@every duration \"{0}\" is too long")]
    EveryTooLong(String),
    #[error("@at needs an RFC3339 time such as 2026-05-01T09:00:00Z, got \"{0}\"")]
    InvalidAt(String),
    #[error("@at time {0} is outside the supported years 1970-2100")]
    AtOutOfRange(String),
    #[error("unknown time zone \"{0}\" (use an IANA name such as Europe/London)")]
    UnknownTimeZone(String),
    /// The cron crate refused an expression this module had already validated and normalized.
    #[error("internal error: cron rejected normalized expression \"{expr}\": {reason}")]
    Internal { expr: String, reason: String },
}

/// Parses an IANA time zone name; an empty name means UTC (the documented default).
pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::UnknownTimeZone(name.to_string()))
}

/// A parsed job schedule. Cloning is one reference-count increment; compiled cron schedules
/// are shared between all schedules with an equivalent expression (see `INTERNER`).
#[derive(Clone)]
pub struct Schedule {
    inner: Arc<Inner>,
}

struct Inner {
    source: Box<str>,
    tz: Tz,
    kind: Kind,
}

enum Kind {
    Cron(Arc<Compiled>),
    Every { period_ms: i64 },
    At { at_ms: i64 },
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Schedule");
        d.field("source", &self.inner.source)
            .field("timezone", &self.inner.tz.name());
        match &self.inner.kind {
            Kind::Cron(c) => d.field("cron", &c.main.source()),
            Kind::Every { period_ms } => d.field("every_ms", period_ms),
            Kind::At { at_ms } => d.field("at_ms", at_ms),
        };
        d.finish()
    }
}

impl Schedule {
    pub fn parse(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        let source = expr.trim();
        if source.is_empty() {
            return Err(ScheduleError::Empty);
        }
        // Equal (expression, zone) pairs share one handle: a million jobs on a few hundred
        // expressions then cost a pointer each instead of ~90 bytes.
        let key = format!("{}\u{0}{source}", tz.name());
        if let Some(inner) = handles().get(&key) {
            return Ok(Schedule { inner });
        }
        let kind = if source.starts_with('@') {
            parse_keyword(source)?
        } else {
            Kind::Cron(compile_cron(source)?)
        };
        let inner = Arc::new(Inner {
            source: source.into(),
            tz,
            kind,
        });
        handles().insert(key, &inner);
        Ok(Schedule { inner })
    }

    /// First fire time strictly after `after_ms` (unix ms, UTC). `anchor_ms` is when the job's
    /// current definition became active; only `@every` uses it: it fires at anchor + k*period,
    /// k >= 1 (drift-free: computed arithmetically, never by accumulating). None = never again.
    ///
    /// `after_ms` must lie in 1970..=2100 (one millisecond before the epoch is accepted, so a
    /// fire exactly at the epoch can be found); anything else gives None.
    pub fn next_after(&self, after_ms: i64, anchor_ms: i64) -> Option<i64> {
        if !(RANGE_START_MS - 1..=RANGE_END_MS).contains(&after_ms) {
            return None;
        }
        let t = match &self.inner.kind {
            Kind::Cron(c) => next_cron(c, self.inner.tz, after_ms)?,
            Kind::Every { period_ms } => next_every(*period_ms, after_ms, anchor_ms)?,
            Kind::At { at_ms } => *at_ms,
        };
        (t > after_ms && t <= RANGE_END_MS).then_some(t)
    }

    /// The greatest fire time t with t <= at_ms (for @every: t = anchor + k*period, k >= 1), or
    /// None. Consistent with `next_after`: if p = prev_at_or_before(x) then
    /// next_after(p - 1) == Some(p). `at_ms` outside 1970..=2100 gives None.
    pub fn prev_at_or_before(&self, at_ms: i64, anchor_ms: i64) -> Option<i64> {
        if !(RANGE_START_MS..=RANGE_END_MS).contains(&at_ms) {
            return None;
        }
        let t = match &self.inner.kind {
            Kind::Cron(c) => prev_cron(c, self.inner.tz, at_ms)?,
            Kind::Every { period_ms } => prev_every(*period_ms, at_ms, anchor_ms)?,
            Kind::At { at_ms } => *at_ms,
        };
        (t <= at_ms && t >= RANGE_START_MS).then_some(t)
    }

    pub fn is_one_shot(&self) -> bool {
        matches!(self.inner.kind, Kind::At { .. })
    }

    pub fn source(&self) -> &str {
        &self.inner.source
    }

    pub fn timezone(&self) -> Tz {
        self.inner.tz
    }
}

// ---------------------------------------------------------------------------------------------
// @-forms

fn parse_keyword(source: &str) -> Result<Kind, ScheduleError> {
    let (keyword, argument) = match source.find(char::is_whitespace) {
        Some(i) => (&source[..i], source[i..].trim()),
        None => (source, ""),
    };
    let lower = keyword.to_ascii_lowercase();
    let cron = match lower.as_str() {
        "@every" => return parse_every(argument).map(|period_ms| Kind::Every { period_ms }),
        "@at" => return parse_at(argument).map(|at_ms| Kind::At { at_ms }),
        "@reboot" => return Err(ScheduleError::Reboot),
        "@yearly" | "@annually" => "0 0 0 1 1 *",
        "@monthly" => "0 0 0 1 * *",
        "@weekly" => "0 0 0 * * 0",
        "@daily" | "@midnight" => "0 0 0 * * *",
        "@hourly" => "0 0 * * * *",
        _ => return Err(ScheduleError::UnknownShorthand(keyword.to_string())),
    };
    if !argument.is_empty() {
        return Err(ScheduleError::UnexpectedArgument {
            keyword: lower,
            argument: argument.to_string(),
        });
    }
    compile_cron(cron).map(Kind::Cron)
}

/// Parses `1h30m`, `90m`, `30s`, `1500ms`, `2d`: one or more `<integer><unit>` pairs.
fn parse_every(text: &str) -> Result<i64, ScheduleError> {
    let invalid = || ScheduleError::InvalidEvery(text.to_string());
    let too_long = || ScheduleError::EveryTooLong(text.to_string());
    if text.is_empty() {
        return Err(invalid());
    }
    let mut rest = text;
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let (number, after) = rest.split_at(digits);
        let letters = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(letters);
        let unit_ms: i64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let n: i64 = number.parse().map_err(|_| too_long())?;
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_long)?;
        rest = after;
    }
    if u128::try_from(total).unwrap_or(0) < MIN_EVERY.as_millis() {
        return Err(ScheduleError::EveryTooShort(text.to_string()));
    }
    Ok(total)
}

fn parse_at(text: &str) -> Result<i64, ScheduleError> {
    let t = DateTime::parse_from_rfc3339(text)
        .map_err(|_| ScheduleError::InvalidAt(text.to_string()))?;
    let ms = t.timestamp_millis();
    if !(RANGE_START_MS..=RANGE_END_MS).contains(&ms) {
        return Err(ScheduleError::AtOutOfRange(text.to_string()));
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------------
// @every arithmetic. i128 holds every intermediate value of i64 inputs; checked ops anyway.

fn next_every(period_ms: i64, after_ms: i64, anchor_ms: i64) -> Option<i64> {
    let (p, after, anchor) = (
        i128::from(period_ms),
        i128::from(after_ms),
        i128::from(anchor_ms),
    );
    let elapsed = after.checked_sub(anchor)?;
    let k = if elapsed < p {
        1
    } else {
        elapsed.checked_div(p)?.checked_add(1)?
    };
    i64::try_from(anchor.checked_add(k.checked_mul(p)?)?).ok()
}

fn prev_every(period_ms: i64, at_ms: i64, anchor_ms: i64) -> Option<i64> {
    let (p, at, anchor) = (
        i128::from(period_ms),
        i128::from(at_ms),
        i128::from(anchor_ms),
    );
    let elapsed = at.checked_sub(anchor)?;
    if elapsed < p {
        return None;
    }
    let k = elapsed.checked_div(p)?;
    i64::try_from(anchor.checked_add(k.checked_mul(p)?)?).ok()
}

// ---------------------------------------------------------------------------------------------
// Cron fields

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
    Year,
}

const FIELDS: [Field; 7] = [
    Field::Second,
    Field::Minute,
    Field::Hour,
    Field::DayOfMonth,
    Field::Month,
    Field::DayOfWeek,
    Field::Year,
];

const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const MONTH_FULL_NAMES: [&str; 12] = [
    "JANUARY",
    "FEBRUARY",
    "MARCH",
    "APRIL",
    "MAY",
    "JUNE",
    "JULY",
    "AUGUST",
    "SEPTEMBER",
    "OCTOBER",
    "NOVEMBER",
    "DECEMBER",
];
const DOW_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const DOW_FULL_NAMES: [&str; 7] = [
    "SUNDAY",
    "MONDAY",
    "TUESDAY",
    "WEDNESDAY",
    "THURSDAY",
    "FRIDAY",
    "SATURDAY",
];

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
            Field::Year => "year",
        }
    }

    /// Inclusive bounds as the user may write them (day-of-week 7 is Sunday again).
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Second | Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
            Field::Year => (1970, 2100),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Field::Second | Field::Minute => "use a number 0-59",
            Field::Hour => "use a number 0-23",
            Field::DayOfMonth => "use a number 1-31",
            Field::Month => "use 1-12 or JAN-DEC",
            Field::DayOfWeek => "use 0-7 or SUN-SAT; 0 and 7 are Sunday",
            Field::Year => "use a number 1970-2100",
        }
    }

    fn range_hint(self) -> &'static str {
        match self {
            Field::DayOfWeek => " (0 and 7 are Sunday)",
            Field::Month => " (or JAN-DEC)",
            _ => "",
        }
    }

    fn name_value(self, upper: &str) -> Option<u32> {
        let position = |short: &[&str], long: &[&str]| {
            short
                .iter()
                .position(|n| *n == upper)
                .or_else(|| long.iter().position(|n| *n == upper))
        };
        match self {
            Field::Month => position(&MONTH_NAMES, &MONTH_FULL_NAMES).map(|i| i as u32 + 1),
            Field::DayOfWeek => position(&DOW_NAMES, &DOW_FULL_NAMES).map(|i| i as u32),
            _ => None,
        }
    }
}

/// Set of values of one field, bit i = value `min + i` (years need 131 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FieldSet {
    bits: [u64; 3],
    min: u32,
}

impl FieldSet {
    fn empty(field: Field) -> Self {
        FieldSet {
            bits: [0; 3],
            min: field.bounds().0,
        }
    }

    fn full(field: Field) -> Self {
        let mut s = Self::empty(field);
        let (lo, hi) = field.bounds();
        s.insert_range(lo, hi, 1);
        s.fold_sunday(field);
        s
    }

    fn insert_range(&mut self, lo: u32, hi: u32, step: u32) {
        if step == 1 {
            // Word at a time: `*` and plain ranges are the common case on the parse path,
            // which runs for every job at start-up.
            let (first, last) = ((lo - self.min) as usize, (hi - self.min) as usize);
            for (w, word) in self.bits.iter_mut().enumerate() {
                let (start, end) = (w * 64, w * 64 + 63);
                if last < start || first > end {
                    continue;
                }
                let from = first.max(start) - start;
                let to = last.min(end) - start;
                *word |= (u64::MAX >> (63 - to)) & (u64::MAX << from);
            }
            return;
        }
        let mut v = lo;
        while v <= hi {
            let i = (v - self.min) as usize;
            self.bits[i / 64] |= 1 << (i % 64);
            match v.checked_add(step) {
                Some(n) => v = n,
                None => break,
            }
        }
    }

    fn contains(&self, v: u32) -> bool {
        match v.checked_sub(self.min) {
            Some(i) if (i as usize) < 192 => self.bits[i as usize / 64] & (1 << (i % 64)) != 0,
            _ => false,
        }
    }

    /// Day-of-week 7 is Sunday, stored as 0.
    fn fold_sunday(&mut self, field: Field) {
        if field == Field::DayOfWeek && self.contains(7) {
            self.bits[0] = (self.bits[0] & !(1 << 7)) | 1;
        }
    }

    fn values(&self, field: Field) -> impl Iterator<Item = u32> + '_ {
        let (lo, hi) = field.bounds();
        (lo..=hi).filter(|v| self.contains(*v))
    }

    fn is_full(&self, field: Field) -> bool {
        *self == Self::full(field)
    }

    /// Canonical text for the cron crate: `*`, day-of-week names, or numbers with runs
    /// collapsed to ranges. Equal sets give equal text, so the interner shares them.
    fn to_cron(self, field: Field) -> String {
        if self.is_full(field) {
            return "*".to_string();
        }
        let values: Vec<u32> = self.values(field).collect();
        if field == Field::DayOfWeek {
            // Names, never numbers: the cron crate counts Sunday as 1.
            return values
                .iter()
                .map(|v| DOW_NAMES[*v as usize])
                .collect::<Vec<_>>()
                .join(",");
        }
        let mut parts = Vec::new();
        let mut i = 0;
        while i < values.len() {
            let mut j = i;
            while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
                j += 1;
            }
            parts.push(if i == j {
                values[i].to_string()
            } else {
                format!("{}-{}", values[i], values[j])
            });
            i = j + 1;
        }
        parts.join(",")
    }
}

fn is_star(text: &str) -> bool {
    text == "*" || text == "?"
}

/// Vixie: a DOM or DOW field that starts with `*` does not restrict the day, so the two are
/// ANDed; only when both are restricted is a day matched by either.
fn is_star_led(text: &str) -> bool {
    text.starts_with('*') || text.starts_with('?')
}

fn parse_field(field: Field, text: &str) -> Result<FieldSet, ScheduleError> {
    if text.contains('#') {
        return Err(ScheduleError::Unsupported('#'));
    }
    let (min, max) = field.bounds();
    let mut set = FieldSet::empty(field);
    for item in text.split(',') {
        if item.is_empty() {
            return Err(ScheduleError::EmptyItem {
                field: field.name(),
                text: text.to_string(),
            });
        }
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => (base, Some(parse_step(field, step)?)),
            None => (item, None),
        };
        let invalid_item = || ScheduleError::InvalidValue {
            field: field.name(),
            value: item.to_string(),
            expected: field.expected(),
        };
        let (lo, hi) = if is_star(base) {
            (min, max)
        } else if let Some((a, b)) = base.split_once('-') {
            if a.is_empty() || b.is_empty() {
                return Err(invalid_item());
            }
            let lo = parse_value(field, a)?;
            let mut hi = parse_value(field, b)?;
            // `SAT-SUN`, `FRI-SUN`: Sunday as the end of a range means 7.
            if field == Field::DayOfWeek && hi == 0 && !b.starts_with(|c: char| c.is_ascii_digit())
            {
                hi = 7;
            }
            if lo > hi {
                return Err(ScheduleError::BackwardsRange {
                    field: field.name(),
                    start: a.to_string(),
                    end: b.to_string(),
                });
            }
            (lo, hi)
        } else {
            let v = parse_value(field, base)?;
            // Quartz `5/15`: from 5 to the end of the range.
            if step.is_some() { (v, max) } else { (v, v) }
        };
        set.insert_range(lo, hi, step.unwrap_or(1));
    }
    set.fold_sunday(field);
    Ok(set)
}

fn parse_step(field: Field, step: &str) -> Result<u32, ScheduleError> {
    match step.parse::<u32>() {
        Ok(n) if n >= 1 && step.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        // A step far beyond the range is legal and selects only the start.
        Err(_) if !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()) => Ok(u32::MAX),
        _ => Err(ScheduleError::InvalidStep {
            field: field.name(),
            step: step.to_string(),
        }),
    }
}

fn parse_value(field: Field, token: &str) -> Result<u32, ScheduleError> {
    let (min, max) = field.bounds();
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
        return match token.parse::<u32>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(ScheduleError::OutOfRange {
                field: field.name(),
                value: token.to_string(),
                min,
                max,
                hint: field.range_hint(),
            }),
        };
    }
    let upper = token.to_ascii_uppercase();
    if let Some(v) = field.name_value(&upper) {
        return Ok(v);
    }
    if let Some(c) = quartz_special(&upper) {
        return Err(ScheduleError::Unsupported(c));
    }
    Err(ScheduleError::InvalidValue {
        field: field.name(),
        value: token.to_string(),
        expected: field.expected(),
    })
}

/// Recognizes Quartz's `L` (last), `W` (nearest weekday) and their combinations (`L`, `LW`,
/// `15W`, `5L`, `FRIL`) so the user is told they are unsupported instead of "invalid".
fn quartz_special(upper: &str) -> Option<char> {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match upper {
        "L" | "LW" => Some('L'),
        "W" => Some('W'),
        _ if upper.strip_suffix('W').is_some_and(numeric) => Some('W'),
        _ if upper
            .strip_suffix('L')
            .is_some_and(|p| numeric(p) || DOW_NAMES.contains(&p)) =>
        {
            Some('L')
        }
        _ => None,
    }
}

/// A validated cron expression, before translation for the cron crate.
#[derive(Clone, Debug)]
struct ParsedCron {
    /// Indexed like `FIELDS`; the year is full when absent.
    sets: [FieldSet; 7],
    /// Both DOM and DOW restricted: a day matches if either does.
    day_or: bool,
}

fn parse_cron_fields(text: &str) -> Result<ParsedCron, ScheduleError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let words: Vec<&str> = match words.len() {
        5 => std::iter::once("0").chain(words).collect(),
        6 | 7 => words,
        n => return Err(ScheduleError::FieldCount(n)),
    };
    let mut sets = FIELDS.map(FieldSet::full);
    for (i, word) in words.iter().enumerate() {
        sets[i] = parse_field(FIELDS[i], word)?;
    }
    Ok(ParsedCron {
        sets,
        day_or: !is_star_led(words[3]) && !is_star_led(words[5]),
    })
}

impl ParsedCron {
    /// The expression(s) for the cron crate: one, or for the DOM/DOW OR rule a DOM-only and a
    /// DOW-only schedule whose union is the schedule.
    fn cron_texts(&self) -> (String, Option<String>) {
        let text = |f: usize| self.sets[f].to_cron(FIELDS[f]);
        let (sec, min, hour, dom, month, dow) =
            (text(0), text(1), text(2), text(3), text(4), text(5));
        let year = match text(6) {
            y if y == "*" => String::new(),
            y => format!(" {y}"),
        };
        let build = |dom: &str, dow: &str| format!("{sec} {min} {hour} {dom} {month} {dow}{year}");
        if self.day_or && dom != "*" && dow != "*" {
            (build(&dom, "*"), Some(build("*", &dow)))
        } else if self.day_or {
            // One side matches every day, so the union does too.
            (build("*", "*"), None)
        } else {
            (build(&dom, &dow), None)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled cron schedules and their interner

/// The cron crate's schedule(s) for one normalized expression: 0.3-2 KB of BTreeSets each,
/// against a million jobs that mostly share a few expressions, hence the interner.
struct Compiled {
    main: cron::Schedule,
    /// DOW-only half of a DOM/DOW OR schedule (`main` is then the DOM-only half).
    alt: Option<cron::Schedule>,
}

impl Compiled {
    fn new(main: &str, alt: Option<&str>) -> Result<Compiled, ScheduleError> {
        let compile = |expr: &str| {
            expr.parse::<cron::Schedule>()
                .map_err(|e| ScheduleError::Internal {
                    expr: expr.to_string(),
                    reason: e.to_string(),
                })
        };
        Ok(Compiled {
            main: compile(main)?,
            alt: alt.map(compile).transpose()?,
        })
    }

    /// First matching wall-clock time strictly after `after`, whole seconds.
    fn next_wall(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        // Asked in UTC, where every wall time exists exactly once; time zones are mapped by
        // the caller.
        let next = |s: &cron::Schedule| s.after(&after.and_utc()).next().map(|t| t.naive_utc());
        let main = next(&self.main);
        match &self.alt {
            None => main,
            Some(alt) => match (main, next(alt)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// Last matching wall-clock time at or before `at`.
    fn prev_wall(&self, at: NaiveDateTime) -> Option<NaiveDateTime> {
        let main = cron_prev(&self.main, at);
        match &self.alt {
            None => main,
            Some(alt) => main.max(cron_prev(alt, at)),
        }
    }
}

fn cron_prev(s: &cron::Schedule, at: NaiveDateTime) -> Option<NaiveDateTime> {
    let mut at = at.with_nanosecond(0)?;
    // cron 0.17's backward search, when the start year is not in the year field, moves to an
    // earlier year without resetting month/day/hour/minute/second to their maxima, so it
    // returns e.g. Jan 1 00:00:00 instead of Dec 31 23:59:59 (its forward search does reset).
    // Starting at the last second of the latest allowed year avoids that path.
    let year = u32::try_from(at.year()).ok()?;
    let allowed = s.years().range(..=year).next_back()?;
    if allowed != year {
        at = NaiveDate::from_ymd_opt(i32::try_from(allowed).ok()?, 12, 31)?
            .and_hms_opt(23, 59, 59)?;
    }
    // The cron crate searches strictly before a whole second, so start one second later.
    let bound = at.checked_add_signed(TimeDelta::seconds(1))?;
    s.after(&bound.and_utc()).next_back().map(|t| t.naive_utc())
}

struct Interner<T> {
    map: HashMap<Box<str>, Weak<T>>,
    len_after_sweep: usize,
}

/// Below this size the map is never swept: sweeping a tiny map saves nothing.
const SWEEP_FLOOR: usize = 64;

impl<T> Interner<T> {
    fn new() -> Self {
        Interner {
            map: HashMap::new(),
            len_after_sweep: 0,
        }
    }

    fn get(&self, key: &str) -> Option<Arc<T>> {
        self.map.get(key).and_then(Weak::upgrade)
    }

    fn insert(&mut self, key: String, compiled: &Arc<T>) {
        self.map
            .insert(key.into_boxed_str(), Arc::downgrade(compiled));
        // Dead entries are only dropped here, in bulk, so that a sweep costs O(1) amortized
        // per insertion and dropping a job never has to take the lock.
        if self.map.len() >= 2 * self.len_after_sweep.max(SWEEP_FLOOR) {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.len_after_sweep = self.map.len();
        }
    }
}

static INTERNER: LazyLock<Mutex<Interner<Compiled>>> =
    LazyLock::new(|| Mutex::new(Interner::new()));
static HANDLES: LazyLock<Mutex<Interner<Inner>>> = LazyLock::new(|| Mutex::new(Interner::new()));

fn interner() -> MutexGuard<'static, Interner<Compiled>> {
    // The map is consistent after any panic (inserts and retains are single calls), so a
    // poisoned lock is safe to keep using.
    INTERNER.lock().unwrap_or_else(|e| e.into_inner())
}

fn handles() -> MutexGuard<'static, Interner<Inner>> {
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

fn compile_cron(text: &str) -> Result<Arc<Compiled>, ScheduleError> {
    let parsed = parse_cron_fields(text)?;
    let (main, alt) = parsed.cron_texts();
    let key = match &alt {
        Some(alt) => format!("{main} | {alt}"),
        None => main.clone(),
    };
    if let Some(c) = interner().get(&key) {
        return Ok(c);
    }
    // Compiled outside the lock (about 8 us) so that start-up parsing on several threads does not
    // serialize on it; a racing thread's duplicate is simply dropped.
    let compiled = Arc::new(Compiled::new(&main, alt.as_deref())?);
    let mut interner = interner();
    if let Some(c) = interner.get(&key) {
        return Ok(c);
    }
    interner.insert(key, &compiled);
    Ok(compiled)
}

// ---------------------------------------------------------------------------------------------
// Wall-clock times to instants

fn millis(t: DateTime<Tz>) -> i64 {
    t.timestamp_millis()
}

fn wall_at(tz: Tz, ms: i64) -> Option<NaiveDateTime> {
    Some(
        DateTime::from_timestamp_millis(ms)?
            .with_timezone(&tz)
            .naive_local(),
    )
}

fn exists(tz: Tz, wall: NaiveDateTime) -> bool {
    !matches!(tz.offset_from_local_datetime(&wall), LocalResult::None)
}

/// Nearest existing wall time beyond a nonexistent `wall`, in direction `dir` (+1 or -1),
/// whole seconds. Galloping then bisecting: a 1-hour gap takes about 24 zone lookups.
fn gap_edge(tz: Tz, wall: NaiveDateTime, dir: i64) -> Option<NaiveDateTime> {
    let at = |secs: i64| wall.checked_add_signed(TimeDelta::seconds(dir * secs));
    let (mut missing, mut present) = (0_i64, 1_i64);
    while !exists(tz, at(present)?) {
        missing = present;
        present *= 2;
        if present > MAX_GAP_SECS {
            return None;
        }
    }
    while present - missing > 1 {
        let mid = missing + (present - missing) / 2;
        if exists(tz, at(mid)?) {
            present = mid;
        } else {
            missing = mid;
        }
    }
    at(present)
}

/// First fire strictly after `after_ms`. Wall times are searched forward from the wall time of
/// `after`; each one maps to its first instant, or its second if the first is not after
/// `after` (the job is then already in the repeated hour and that wall time has not fired).
fn next_cron(c: &Compiled, tz: Tz, after_ms: i64) -> Option<i64> {
    let mut cursor = wall_at(tz, after_ms)?;
    for _ in 0..MAX_CANDIDATES {
        let wall = c.next_wall(cursor)?;
        match tz.from_local_datetime(&wall) {
            LocalResult::Single(t) if millis(t) > after_ms => return Some(millis(t)),
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = (millis(a).min(millis(b)), millis(a).max(millis(b)));
                if first > after_ms {
                    return Some(first);
                }
                if second > after_ms {
                    return Some(second);
                }
            }
            LocalResult::None => {
                // Skip the whole gap at once: a per-second schedule would otherwise try each
                // of its 3600 nonexistent seconds.
                cursor = gap_edge(tz, wall, 1)?.checked_sub_signed(TimeDelta::seconds(1))?;
                continue;
            }
            LocalResult::Single(_) => {}
        }
        cursor = wall;
    }
    None
}

/// The latest wall time already reached at instant `at_ms`. Normally its own wall time, but
/// during the repeated hour after a fall-back, the top of the first pass (e.g. 01:59:59.999
/// EDT when `at` is 01:10 EST): every wall time up to there has had its first instant.
fn high_water_wall(tz: Tz, at_ms: i64) -> Option<NaiveDateTime> {
    let wall = wall_at(tz, at_ms)?;
    if let LocalResult::Ambiguous(a, b) = tz.from_local_datetime(&wall) {
        let first = millis(a).min(millis(b));
        if first < at_ms {
            let offset = |ms: i64| {
                DateTime::from_timestamp_millis(ms)
                    .map(|t| tz.offset_from_utc_datetime(&t.naive_utc()).fix())
            };
            let now = offset(at_ms)?;
            // Bisect for the transition: offset(lo) != now, offset(hi) == now.
            let (mut lo, mut hi) = (first, at_ms);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset(mid)? == now {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            return wall_at(tz, lo);
        }
    }
    Some(wall)
}

/// Greatest fire at or before `at_ms`, where the fires are the first instants of the matching
/// wall times (what `next_cron` yields when iterated from any fire).
fn prev_cron(c: &Compiled, tz: Tz, at_ms: i64) -> Option<i64> {
    let mut cap = high_water_wall(tz, at_ms)?;
    for _ in 0..MAX_CANDIDATES {
        let wall = c.prev_wall(cap)?;
        match tz.from_local_datetime(&wall) {
            LocalResult::Single(t) if millis(t) <= at_ms => return Some(millis(t)),
            LocalResult::Ambiguous(a, b) => {
                let first = millis(a).min(millis(b));
                if first <= at_ms {
                    return Some(first);
                }
            }
            LocalResult::None => {
                cap = gap_edge(tz, wall, -1)?;
                continue;
            }
            LocalResult::Single(_) => {}
        }
        cap = wall.checked_sub_signed(TimeDelta::seconds(1))?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;
    use proptest::prelude::*;
    use std::time::Instant;

    const NY: Tz = chrono_tz::America::New_York;
    const LONDON: Tz = chrono_tz::Europe::London;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap_or_else(|e| panic!("bad test time {rfc3339}: {e}"))
            .timestamp_millis()
    }

    fn fmt(tz: Tz, t: i64) -> String {
        DateTime::from_timestamp_millis(t)
            .unwrap()
            .with_timezone(&tz)
            .to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    fn sched(expr: &str, tz: Tz) -> Schedule {
        Schedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// The next `n` fires after `after`, formatted in the schedule's zone; anchor = `after`.
    fn fires(expr: &str, tz: Tz, after: &str, n: usize) -> Vec<String> {
        let s = sched(expr, tz);
        let anchor = ms(after);
        let mut t = anchor;
        let mut out = Vec::new();
        for _ in 0..n {
            match s.next_after(t, anchor) {
                Some(next) => {
                    assert!(next > t, "{expr}: {next} not after {t}");
                    out.push(fmt(tz, next));
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    #[test]
    fn next_fire_table() {
        // 2026-01-01 is a Thursday.
        let t0 = "2026-01-01T00:00:00Z";
        let cases: &[(&str, &str, &[&str])] = &[
            // 6 fields
            (
                "*/15 * * * * *",
                t0,
                &["2026-01-01T00:00:15Z", "2026-01-01T00:00:30Z"],
            ),
            (
                "30 5 10 * * *",
                t0,
                &["2026-01-01T10:05:30Z", "2026-01-02T10:05:30Z"],
            ),
            (
                "0 0 9-17/4 * * *",
                t0,
                &[
                    "2026-01-01T09:00:00Z",
                    "2026-01-01T13:00:00Z",
                    "2026-01-01T17:00:00Z",
                    "2026-01-02T09:00:00Z",
                ],
            ),
            (
                "0 0 0 1 JAN,jul *",
                t0,
                &["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"],
            ),
            (
                "0 0 0 1 5/3 *",
                t0,
                &[
                    "2026-05-01T00:00:00Z",
                    "2026-08-01T00:00:00Z",
                    "2026-11-01T00:00:00Z",
                    "2027-05-01T00:00:00Z",
                ],
            ),
            // 7 fields
            ("0 0 12 1 1 * 2027", t0, &["2027-01-01T12:00:00Z"]),
            (
                "0 0 0 1 1 * 2026-2028",
                t0,
                &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
            ),
            ("0 0 0 1 1 * *", t0, &["2027-01-01T00:00:00Z"]),
            // 5 fields: second 0
            (
                "*/5 * * * *",
                t0,
                &["2026-01-01T00:05:00Z", "2026-01-01T00:10:00Z"],
            ),
            (
                "15 14 1 * *",
                t0,
                &["2026-01-01T14:15:00Z", "2026-02-01T14:15:00Z"],
            ),
            // shorthands
            ("@yearly", t0, &["2027-01-01T00:00:00Z"]),
            ("@annually", t0, &["2027-01-01T00:00:00Z"]),
            (
                "@monthly",
                t0,
                &["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"],
            ),
            (
                "@weekly",
                t0,
                &["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z"],
            ),
            ("@daily", t0, &["2026-01-02T00:00:00Z"]),
            ("@midnight", t0, &["2026-01-02T00:00:00Z"]),
            (
                "@hourly",
                t0,
                &["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"],
            ),
            ("@DAILY", t0, &["2026-01-02T00:00:00Z"]),
            // @every (anchor = t0)
            (
                "@every 30s",
                t0,
                &["2026-01-01T00:00:30Z", "2026-01-01T00:01:00Z"],
            ),
            (
                "@every 1h30m",
                t0,
                &["2026-01-01T01:30:00Z", "2026-01-01T03:00:00Z"],
            ),
            (
                "@every 90m",
                t0,
                &["2026-01-01T01:30:00Z", "2026-01-01T03:00:00Z"],
            ),
            (
                "@every 1500ms",
                t0,
                &["2026-01-01T00:00:01.500Z", "2026-01-01T00:00:03Z"],
            ),
            ("@every 2d", t0, &["2026-01-03T00:00:00Z"]),
            // @at: one fire, then nothing
            (
                "@at 2026-03-01T12:00:00+01:00",
                t0,
                &["2026-03-01T11:00:00Z"],
            ),
            // day-of-week: Vixie numbers and names
            (
                "0 0 9 * * 0",
                t0,
                &["2026-01-04T09:00:00Z", "2026-01-11T09:00:00Z"],
            ),
            (
                "0 0 9 * * 7",
                t0,
                &["2026-01-04T09:00:00Z", "2026-01-11T09:00:00Z"],
            ),
            ("0 0 9 * * SUN", t0, &["2026-01-04T09:00:00Z"]),
            ("0 0 9 * * sunday", t0, &["2026-01-04T09:00:00Z"]),
            ("0 0 9 * * 1", t0, &["2026-01-05T09:00:00Z"]),
            ("0 0 9 * * 6", t0, &["2026-01-03T09:00:00Z"]),
            (
                "0 0 9 * * 1-5",
                "2026-01-02T10:00:00Z",
                &[
                    "2026-01-05T09:00:00Z",
                    "2026-01-06T09:00:00Z",
                    "2026-01-07T09:00:00Z",
                    "2026-01-08T09:00:00Z",
                    "2026-01-09T09:00:00Z",
                    "2026-01-12T09:00:00Z",
                ],
            ),
            (
                "0 0 9 * * mon-FRI",
                "2026-01-02T10:00:00Z",
                &["2026-01-05T09:00:00Z", "2026-01-06T09:00:00Z"],
            ),
            // */2 over 0-7 = Sun, Tue, Thu, Sat
            (
                "0 0 9 * * */2",
                t0,
                &[
                    "2026-01-01T09:00:00Z",
                    "2026-01-03T09:00:00Z",
                    "2026-01-04T09:00:00Z",
                    "2026-01-06T09:00:00Z",
                    "2026-01-08T09:00:00Z",
                ],
            ),
            (
                "0 0 9 * * 1-5/2",
                t0,
                &[
                    "2026-01-02T09:00:00Z",
                    "2026-01-05T09:00:00Z",
                    "2026-01-07T09:00:00Z",
                ],
            ),
            (
                "0 0 9 * * FRI-SUN",
                t0,
                &[
                    "2026-01-02T09:00:00Z",
                    "2026-01-03T09:00:00Z",
                    "2026-01-04T09:00:00Z",
                    "2026-01-09T09:00:00Z",
                ],
            ),
            (
                "0 0 9 * * 5-7",
                t0,
                &[
                    "2026-01-02T09:00:00Z",
                    "2026-01-03T09:00:00Z",
                    "2026-01-04T09:00:00Z",
                    "2026-01-09T09:00:00Z",
                ],
            ),
            // DOM/DOW both restricted: OR (Fridays and the 13th; Friday the 13th once)
            (
                "0 0 0 13 * 5",
                t0,
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-09T00:00:00Z",
                    "2026-01-13T00:00:00Z",
                    "2026-01-16T00:00:00Z",
                    "2026-01-23T00:00:00Z",
                    "2026-01-30T00:00:00Z",
                    "2026-02-06T00:00:00Z",
                    "2026-02-13T00:00:00Z",
                    "2026-02-20T00:00:00Z",
                ],
            ),
            (
                "0 0 0 13 * FRI",
                t0,
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-09T00:00:00Z",
                    "2026-01-13T00:00:00Z",
                ],
            ),
            // one side *-led or ?: AND
            (
                "0 0 0 */2 * MON",
                t0,
                &[
                    "2026-01-05T00:00:00Z",
                    "2026-01-19T00:00:00Z",
                    "2026-02-09T00:00:00Z",
                ],
            ),
            (
                "0 0 0 13 * */1",
                t0,
                &["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z"],
            ),
            (
                "0 0 0 13 * ?",
                t0,
                &["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z"],
            ),
            (
                "0 0 0 ? * FRI",
                t0,
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-09T00:00:00Z",
                    "2026-01-16T00:00:00Z",
                ],
            ),
            (
                "0 0 0 13 * *",
                t0,
                &["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z"],
            ),
        ];
        for (expr, after, expected) in cases {
            let got = fires(expr, Tz::UTC, after, expected.len() + 1);
            let want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            let n = want.len();
            assert_eq!(&got[..n.min(got.len())], &want[..], "{expr} after {after}");
            if expr.starts_with("@at") {
                assert_eq!(got.len(), n, "{expr} fired more than once");
            }
        }
    }

    #[test]
    fn timezone_applies_to_cron_but_not_every_or_at() {
        let s = sched("0 0 9 * * *", NY);
        assert_eq!(
            fmt(NY, s.next_after(ms("2026-01-01T00:00:00Z"), 0).unwrap()),
            "2026-01-01T09:00:00-05:00"
        );
        let s = sched("0 0 9 * * *", chrono_tz::Asia::Kolkata);
        assert_eq!(
            fmt(
                Tz::UTC,
                s.next_after(ms("2026-01-01T00:00:00Z"), 0).unwrap()
            ),
            "2026-01-01T03:30:00Z"
        );
        let every = sched("@every 1h", NY);
        let a = ms("2026-01-01T00:00:00Z");
        assert_eq!(every.next_after(a, a), Some(a + 3_600_000));
        let at = sched("@at 2026-06-01T00:00:00Z", NY);
        assert_eq!(at.next_after(a, a), Some(ms("2026-06-01T00:00:00Z")));
    }

    #[test]
    fn next_is_strict_and_handles_subseconds() {
        let s = sched("* * * * * *", Tz::UTC);
        let t = ms("2026-01-01T08:00:00Z");
        assert_eq!(s.next_after(t, 0), Some(t + 1000));
        assert_eq!(s.next_after(t + 500, 0), Some(t + 1000));
        assert_eq!(s.next_after(t - 1, 0), Some(t));
        assert_eq!(s.prev_at_or_before(t, 0), Some(t));
        assert_eq!(s.prev_at_or_before(t + 999, 0), Some(t));
        assert_eq!(s.prev_at_or_before(t - 1, 0), Some(t - 1000));
    }

    #[test]
    fn dst_new_york_spring_forward() {
        // 2026-03-08 02:00 EST -> 03:00 EDT: 02:30 does not exist that day and is skipped.
        assert_eq!(
            fires("0 30 2 * * *", NY, "2026-03-07T00:00:00-05:00", 3),
            [
                "2026-03-07T02:30:00-05:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00"
            ]
        );
        assert_eq!(
            fires("0 30 1 * * *", NY, "2026-03-07T12:00:00-05:00", 2),
            ["2026-03-08T01:30:00-05:00", "2026-03-09T01:30:00-04:00"]
        );
        assert_eq!(
            fires("0 */20 * * * *", NY, "2026-03-08T01:10:00-05:00", 4),
            [
                "2026-03-08T01:20:00-05:00",
                "2026-03-08T01:40:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:20:00-04:00"
            ]
        );
        // Every second of hour 2: the whole gap is skipped in one step.
        assert_eq!(
            fires("* * 2 * * *", NY, "2026-03-08T01:59:58-05:00", 2),
            ["2026-03-09T02:00:00-04:00", "2026-03-09T02:00:01-04:00"]
        );
        let s = sched("0 30 2 * * *", NY);
        assert_eq!(
            fmt(
                NY,
                s.prev_at_or_before(ms("2026-03-08T23:00:00-04:00"), 0)
                    .unwrap()
            ),
            "2026-03-07T02:30:00-05:00"
        );
        let s = sched("* * 2 * * *", NY);
        assert_eq!(
            fmt(
                NY,
                s.prev_at_or_before(ms("2026-03-08T12:00:00-04:00"), 0)
                    .unwrap()
            ),
            "2026-03-07T02:59:59-05:00"
        );
    }

    #[test]
    fn dst_new_york_fall_back() {
        // 2026-11-01 02:00 EDT -> 01:00 EST: 01:xx happens twice and fires once.
        assert_eq!(
            fires("0 30 1 * * *", NY, "2026-10-31T12:00:00-04:00", 3),
            [
                "2026-11-01T01:30:00-04:00",
                "2026-11-02T01:30:00-05:00",
                "2026-11-03T01:30:00-05:00"
            ]
        );
        assert_eq!(
            fires("0 30 2 * * *", NY, "2026-10-31T12:00:00-04:00", 2),
            ["2026-11-01T02:30:00-05:00", "2026-11-02T02:30:00-05:00"]
        );
        assert_eq!(
            fires("0 */20 * * * *", NY, "2026-11-01T00:30:00-04:00", 7),
            [
                "2026-11-01T00:40:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:20:00-04:00",
                "2026-11-01T01:40:00-04:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T02:20:00-05:00",
                "2026-11-01T02:40:00-05:00",
            ]
        );
        // Already in the second pass: its wall times have not fired since `after`.
        assert_eq!(
            fires("0 */20 * * * *", NY, "2026-11-01T01:10:00-05:00", 3),
            [
                "2026-11-01T01:20:00-05:00",
                "2026-11-01T01:40:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
        // Just before the transition: 1 s later the wall clock reads 01:00 again; no refire.
        assert_eq!(
            fires("0 0 * * * *", NY, "2026-11-01T01:59:59.500-04:00", 1),
            ["2026-11-01T02:00:00-05:00"]
        );
        // Catch-up from the second pass finds the first pass's latest fire.
        let s = sched("0 */20 * * * *", NY);
        let p = s
            .prev_at_or_before(ms("2026-11-01T01:10:00-05:00"), 0)
            .unwrap();
        assert_eq!(fmt(NY, p), "2026-11-01T01:40:00-04:00");
        assert_eq!(s.next_after(p - 1, 0), Some(p));
        assert_eq!(
            fmt(NY, s.next_after(p, 0).unwrap()),
            "2026-11-01T02:00:00-05:00"
        );
        let p = s
            .prev_at_or_before(ms("2026-11-01T02:05:00-05:00"), 0)
            .unwrap();
        assert_eq!(fmt(NY, p), "2026-11-01T02:00:00-05:00");
        let s = sched("0 30 1 * * *", NY);
        let p = s
            .prev_at_or_before(ms("2026-11-01T01:45:00-05:00"), 0)
            .unwrap();
        assert_eq!(fmt(NY, p), "2026-11-01T01:30:00-04:00");
    }

    #[test]
    fn dst_london() {
        // Spring 2026-03-29 01:00 GMT -> 02:00 BST: 01:30 does not exist, 02:30 does.
        assert_eq!(
            fires("0 30 1 * * *", LONDON, "2026-03-28T12:00:00Z", 2),
            ["2026-03-30T01:30:00+01:00", "2026-03-31T01:30:00+01:00"]
        );
        assert_eq!(
            fires("0 30 2 * * *", LONDON, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T02:30:00+01:00", "2026-03-30T02:30:00+01:00"]
        );
        assert_eq!(
            fires("0 */20 * * * *", LONDON, "2026-03-29T00:30:00Z", 3),
            [
                "2026-03-29T00:40:00Z",
                "2026-03-29T02:00:00+01:00",
                "2026-03-29T02:20:00+01:00"
            ]
        );
        // Fall 2026-10-25 02:00 BST -> 01:00 GMT: 01:xx happens twice.
        assert_eq!(
            fires("0 30 1 * * *", LONDON, "2026-10-24T12:00:00+01:00", 2),
            ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00Z"]
        );
        assert_eq!(
            fires("0 30 2 * * *", LONDON, "2026-10-24T12:00:00+01:00", 2),
            ["2026-10-25T02:30:00Z", "2026-10-26T02:30:00Z"]
        );
        assert_eq!(
            fires("0 */20 * * * *", LONDON, "2026-10-25T00:50:00+01:00", 5),
            [
                "2026-10-25T01:00:00+01:00",
                "2026-10-25T01:20:00+01:00",
                "2026-10-25T01:40:00+01:00",
                "2026-10-25T02:00:00Z",
                "2026-10-25T02:20:00Z",
            ]
        );
    }

    #[test]
    fn leap_years() {
        assert_eq!(
            fires("0 0 0 29 2 *", Tz::UTC, "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]
        );
        // 2100 is not a leap year, and the cron crate knows no year after it.
        assert_eq!(
            fires("0 0 0 29 2 *", Tz::UTC, "2096-03-01T00:00:00Z", 1),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_is_drift_free() {
        let anchor = ms("2026-01-01T00:00:00.123Z");
        for (expr, period) in [("@every 7s", 7_000_i64), ("@every 1h30m", 5_400_000)] {
            let s = sched(expr, Tz::UTC);
            let mut t = anchor;
            for _ in 0..100_000 {
                t = s.next_after(t, anchor).unwrap();
            }
            assert_eq!(t, anchor + 100_000 * period, "{expr}");
            // Arbitrary points land on the same grid.
            assert_eq!(s.next_after(t - 1, anchor), Some(t));
            assert_eq!(s.prev_at_or_before(t + period - 1, anchor), Some(t));
            assert_eq!(s.prev_at_or_before(anchor + period - 1, anchor), None);
            assert_eq!(
                s.prev_at_or_before(anchor + period, anchor),
                Some(anchor + period)
            );
        }
    }

    #[test]
    fn every_extreme_anchors_do_not_overflow() {
        let s = sched("@every 1s", Tz::UTC);
        let t = ms("2026-01-01T00:00:00Z");
        for anchor in [i64::MIN, i64::MIN + 1, -1, 0, t, i64::MAX - 1, i64::MAX] {
            if let Some(n) = s.next_after(t, anchor) {
                assert!(n > t, "{anchor}");
                assert_eq!((i128::from(n) - i128::from(anchor)) % 1000, 0, "{anchor}");
            }
            if let Some(p) = s.prev_at_or_before(t, anchor) {
                assert!(p <= t);
            }
        }
        let big = sched("@every 106751991167d", Tz::UTC);
        assert_eq!(big.next_after(t, t), None);
        assert_eq!(big.prev_at_or_before(t, i64::MIN), None);
    }

    #[test]
    fn at_is_one_shot() {
        let s = sched("  @at 2026-05-01T09:00:00+02:00  ", NY);
        assert!(s.is_one_shot());
        assert_eq!(s.source(), "@at 2026-05-01T09:00:00+02:00");
        assert_eq!(s.timezone(), NY);
        let at = ms("2026-05-01T07:00:00Z");
        assert_eq!(s.next_after(at - 1, 0), Some(at));
        assert_eq!(s.next_after(at, 0), None);
        assert_eq!(s.prev_at_or_before(at, 0), Some(at));
        assert_eq!(s.prev_at_or_before(at - 1, 0), None);
        assert!(!sched("@every 1m", Tz::UTC).is_one_shot());
        assert!(!sched("@daily", Tz::UTC).is_one_shot());
    }

    #[test]
    fn never_matching_and_out_of_range() {
        for expr in [
            "0 0 0 30 2 *",
            "0 0 0 31 4,6 *",
            "0 0 0 1 1 * 1999",
            "0 0 0 29 2 ? 2100",
        ] {
            let s = sched(expr, NY);
            let start = Instant::now();
            assert_eq!(s.next_after(ms("2026-01-01T00:00:00Z"), 0), None, "{expr}");
            assert_eq!(
                s.prev_at_or_before(ms("1990-01-01T00:00:00Z"), 0),
                None,
                "{expr}"
            );
            // Generous: the real cost is tens of microseconds.
            assert!(start.elapsed() < Duration::from_secs(1), "{expr} slow");
        }
        let s = sched("0 0 0 1 1 * 2030", Tz::UTC);
        assert_eq!(s.next_after(ms("2030-06-01T00:00:00Z"), 0), None);
        assert_eq!(
            s.prev_at_or_before(ms("2031-01-01T00:00:00Z"), 0),
            Some(ms("2030-01-01T00:00:00Z"))
        );
        // Both restricted: Mondays of February 2100 or the 29th (which 2100 lacks).
        let s = sched("0 0 0 29 2 MON 2100", Tz::UTC);
        assert_eq!(
            fires("0 0 0 29 2 MON 2100", Tz::UTC, "2100-01-01T00:00:00Z", 9),
            [
                "2100-02-01T00:00:00Z",
                "2100-02-08T00:00:00Z",
                "2100-02-15T00:00:00Z",
                "2100-02-22T00:00:00Z"
            ]
        );
        assert_eq!(
            s.prev_at_or_before(RANGE_END_MS, 0),
            Some(ms("2100-02-22T00:00:00Z"))
        );
        // The start year is not in the year field: the latest fire is the end of 2030.
        let s = sched("* * * * * * 2030", Tz::UTC);
        assert_eq!(
            s.prev_at_or_before(ms("2035-06-01T00:00:00Z"), 0),
            Some(ms("2030-12-31T23:59:59Z"))
        );
        let s = sched("@yearly", Tz::UTC);
        for t in [i64::MIN, -2, 4_133_980_800_000, i64::MAX] {
            assert_eq!(s.next_after(t, 0), None, "{t}");
            assert_eq!(s.prev_at_or_before(t, 0), None, "{t}");
        }
        assert_eq!(s.next_after(-1, 0), Some(0));
        assert_eq!(s.prev_at_or_before(0, 0), Some(0));
        assert_eq!(s.prev_at_or_before(-1, 0), None);
        assert_eq!(s.next_after(ms("2100-06-01T00:00:00Z"), 0), None);
        assert_eq!(RANGE_END_MS, ms("2100-12-31T23:59:59.999Z"));
    }

    #[test]
    fn prev_is_consistent_with_next_for_each_syntax() {
        let exprs = [
            "*/15 * * * * *",
            "30 5 10 * * *",
            "0 0 12 1 1 * 2027",
            "*/5 * * * *",
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
            "@every 30s",
            "@every 1h30m",
            "@every 90m",
            "@at 2026-03-01T12:00:00Z",
            "0 0 9 * * 0",
            "0 0 9 * * 7",
            "0 0 9 * * 1-5",
            "0 0 9 * * */2",
            "0 0 0 13 * 5",
            "0 0 0 */2 * MON",
            "0 0 0 29 2 *",
            "0 */20 * * * *",
            "0 30 1 * * *",
            "0 30 2 * * *",
        ];
        let anchor = ms("2025-12-31T23:59:59Z");
        let points = [
            "2026-01-01T00:00:00Z",
            "2026-03-08T02:30:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-11-01T01:10:00-04:00",
            "2026-11-01T01:10:00-05:00",
            "2026-11-01T01:59:59.999-05:00",
            "2026-10-25T01:30:00Z",
            "2027-01-01T12:00:00Z",
            "2030-07-04T15:04:05.678Z",
        ];
        for tz in [Tz::UTC, NY, LONDON] {
            for expr in exprs {
                let s = sched(expr, tz);
                let mut found = 0;
                for x in points.map(ms) {
                    let Some(p) = s.prev_at_or_before(x, anchor) else {
                        continue;
                    };
                    found += 1;
                    assert!(p <= x, "{expr} {tz}: prev {p} > {x}");
                    assert_eq!(s.next_after(p - 1, anchor), Some(p), "{expr} {tz} at {x}");
                    // p is the latest fire at or before x, so the one after it is beyond x.
                    assert!(
                        s.next_after(p, anchor).is_none_or(|n| n > x),
                        "{expr} {tz} at {x}"
                    );
                }
                assert!(found >= 1, "{expr} {tz}: prev never found anything");
            }
        }
    }

    #[test]
    fn rejections() {
        let cases: &[(&str, &str)] = &[
            (
                "0 0 * * * 8",
                "day-of-week value 8 is out of range 0-7 (0 and 7 are Sunday)",
            ),
            ("* * * *", "expected 5, 6 or 7 fields, got 4"),
            ("* * * * * * * *", "expected 5, 6 or 7 fields, got 8"),
            (
                "@every abc",
                "@every needs a duration such as 30s or 1h30m, got \"abc\"",
            ),
            (
                "@every",
                "@every needs a duration such as 30s or 1h30m, got \"\"",
            ),
            (
                "@every 30",
                "@every needs a duration such as 30s or 1h30m, got \"30\"",
            ),
            (
                "@every 1.5h",
                "@every needs a duration such as 30s or 1h30m",
            ),
            ("@every 500ms", "@every must be at least 1s"),
            ("@every 0s", "@every must be at least 1s"),
            (
                "@every 99999999999999999999h",
                "@every duration \"99999999999999999999h\" is too long",
            ),
            ("0 0 0 L * *", "'L' is not supported"),
            ("0 0 0 LW * *", "'L' is not supported"),
            ("0 0 0 15W * *", "'W' is not supported"),
            ("0 0 0 ? * 5L", "'L' is not supported"),
            ("0 0 0 ? * FRIL", "'L' is not supported"),
            ("0 0 0 ? * 5#3", "'#' is not supported"),
            ("@reboot", "@reboot is not supported"),
            ("60 * * * * *", "second value 60 is out of range 0-59"),
            ("0 60 * * * *", "minute value 60 is out of range 0-59"),
            ("0 0 24 * * *", "hour value 24 is out of range 0-23"),
            ("0 0 0 0 * *", "day-of-month value 0 is out of range 1-31"),
            ("0 0 0 32 * *", "day-of-month value 32 is out of range 1-31"),
            ("0 0 0 1 13 *", "month value 13 is out of range 1-12"),
            (
                "0 0 0 1 1 * 2101",
                "year value 2101 is out of range 1970-2100",
            ),
            (
                "0 0 0 1 1 * 1969",
                "year value 1969 is out of range 1970-2100",
            ),
            (
                "0 99999999999 * * * *",
                "minute value 99999999999 is out of range 0-59",
            ),
            (
                "0 0 0 * FOO *",
                "invalid month value \"FOO\" (use 1-12 or JAN-DEC)",
            ),
            (
                "0 0 0 * * FUNDAY",
                "invalid day-of-week value \"FUNDAY\" (use 0-7 or SUN-SAT",
            ),
            (
                "0 MON * * * *",
                "invalid minute value \"MON\" (use a number 0-59)",
            ),
            ("0 5$ * * * *", "invalid minute value \"5$\""),
            ("0 -5 * * * *", "invalid minute value \"-5\""),
            ("0 30-10 * * * *", "minute range 30-10 is backwards"),
            (
                "0 0 0 * * FRI-MON",
                "day-of-week range FRI-MON is backwards",
            ),
            ("0 */0 * * * *", "invalid step \"0\" in minute field"),
            ("0 */x * * * *", "invalid step \"x\" in minute field"),
            ("0 1,,2 * * * *", "empty list item in minute field \"1,,2\""),
            ("@fortnightly", "unknown shorthand \"@fortnightly\""),
            ("@daily 5", "@daily takes no argument, got \"5\""),
            (
                "@at tomorrow",
                "@at needs an RFC3339 time such as 2026-05-01T09:00:00Z, got \"tomorrow\"",
            ),
            (
                "@at 2200-01-01T00:00:00Z",
                "@at time 2200-01-01T00:00:00Z is outside the supported years 1970-2100",
            ),
            ("", "schedule is empty"),
            ("   ", "schedule is empty"),
        ];
        for (expr, want) in cases {
            match Schedule::parse(expr, Tz::UTC) {
                Ok(s) => panic!("{expr:?} parsed as {s:?}, expected error {want:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{expr:?}: got {msg:?}, want {want:?}");
                }
            }
        }
        assert_eq!(
            parse_timezone("Mars/Base").unwrap_err().to_string(),
            "unknown time zone \"Mars/Base\" (use an IANA name such as Europe/London)"
        );
        assert_eq!(parse_timezone("Europe/London").unwrap(), LONDON);
        assert_eq!(parse_timezone("").unwrap(), Tz::UTC);
    }

    #[test]
    fn error_messages_start_lowercase() {
        for expr in [
            "* * * *",
            "0 0 * * * 8",
            "@every abc",
            "0 0 0 L * *",
            "@reboot",
            "@x",
            "0 1,,2 * * * *",
        ] {
            let msg = Schedule::parse(expr, Tz::UTC).unwrap_err().to_string();
            let first = msg.chars().next().unwrap();
            assert!(
                first.is_lowercase() || first == '@' || first == '\'',
                "{msg}"
            );
        }
    }

    #[test]
    fn interner_shares_equal_expressions() {
        let cron_of = |s: &Schedule| match &s.inner.kind {
            Kind::Cron(c) => Arc::clone(c),
            _ => panic!("not cron"),
        };
        let a = sched("0 0 * * *", Tz::UTC);
        let b = sched("0 0 0 * * *", NY);
        let c = sched("@daily", LONDON);
        let d = sched("0  0 0 ? * 0-7 *", Tz::UTC);
        assert!(Arc::ptr_eq(&cron_of(&a), &cron_of(&b)));
        assert!(Arc::ptr_eq(&cron_of(&a), &cron_of(&c)));
        assert!(Arc::ptr_eq(&cron_of(&a), &cron_of(&d)));
        // Same text, different meaning (AND vs OR): must not share.
        let and = sched("0 0 0 */2 * MON", Tz::UTC);
        let or = sched("0 0 0 1-31/2 * MON", Tz::UTC);
        assert!(!Arc::ptr_eq(&cron_of(&and), &cron_of(&or)));
        assert_eq!(b.source(), "0 0 0 * * *");
        assert_eq!(b.timezone(), NY);
    }

    #[test]
    fn interner_sweeps_dead_entries_when_doubled() {
        let mut interner = Interner::new();
        let keep = Arc::new(Compiled::new("0 0 0 * * *", None).unwrap());
        interner.insert("keep".to_string(), &keep);
        for i in 0..1000 {
            let dead = Arc::new(Compiled::new("0 0 0 * * *", None).unwrap());
            interner.insert(format!("dead{i}"), &dead);
            assert!(interner.map.len() < 2 * SWEEP_FLOOR, "not swept at {i}");
        }
        assert!(interner.get("keep").is_some());
    }

    #[test]
    fn schedule_is_cheap_send_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Schedule>();
        assert_eq!(
            std::mem::size_of::<Schedule>(),
            std::mem::size_of::<usize>()
        );
        let s = sched("0 0 9 * * MON-FRI", NY);
        let debug = format!("{s:?}");
        assert!(
            debug.contains("0 0 9 * * MON-FRI") && debug.contains("America/New_York"),
            "{debug}"
        );
    }

    #[test]
    fn half_hour_dst_lord_howe() {
        // Lord Howe falls back by 30 minutes (02:00 -> 01:30) on 2026-04-05.
        let tz = chrono_tz::Australia::Lord_Howe;
        assert_eq!(
            fires("0 */15 * * * *", tz, "2026-04-05T01:20:00+11:00", 5),
            [
                "2026-04-05T01:30:00+11:00",
                "2026-04-05T01:45:00+11:00",
                "2026-04-05T02:00:00+10:30",
                "2026-04-05T02:15:00+10:30",
                "2026-04-05T02:30:00+10:30",
            ]
        );
        let s = sched("0 */15 * * * *", tz);
        let p = s
            .prev_at_or_before(ms("2026-04-05T01:40:00+10:30"), 0)
            .unwrap();
        assert_eq!(fmt(tz, p), "2026-04-05T01:45:00+11:00");
    }

    #[test]
    fn samoa_skipped_a_whole_day() {
        // 2011-12-29 23:59:59 -10:00 was followed by 2011-12-31 00:00:00 +14:00.
        let tz = chrono_tz::Pacific::Apia;
        assert_eq!(
            fires("0 0 12 * * *", tz, "2011-12-29T13:00:00-10:00", 1),
            ["2011-12-31T12:00:00+14:00"]
        );
        assert_eq!(
            fires("* * * * * *", tz, "2011-12-29T23:59:58-10:00", 2),
            ["2011-12-29T23:59:59-10:00", "2011-12-31T00:00:00+14:00"]
        );
        let s = sched("0 0 12 * * *", tz);
        let p = s
            .prev_at_or_before(ms("2011-12-31T11:00:00+14:00"), 0)
            .unwrap();
        assert_eq!(fmt(tz, p), "2011-12-29T12:00:00-10:00");
        assert_eq!(s.next_after(p - 1, 0), Some(p));
    }

    // --- property tests ----------------------------------------------------------------------

    const ZONES: [Tz; 10] = [
        Tz::UTC,
        NY,
        LONDON,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::Asia::Kolkata,
        chrono_tz::Pacific::Apia,
        chrono_tz::America::Sao_Paulo,
        chrono_tz::Africa::Casablanca,
        chrono_tz::Asia::Tehran,
        chrono_tz::Pacific::Chatham,
    ];

    fn item(field: Field) -> BoxedStrategy<String> {
        let (lo, hi) = field.bounds();
        let value = move || -> BoxedStrategy<String> {
            match field {
                Field::Month => prop_oneof![
                    (lo..=hi).prop_map(|v| v.to_string()),
                    (0..12usize).prop_map(|i| MONTH_NAMES[i].to_lowercase()),
                ]
                .boxed(),
                Field::DayOfWeek => prop_oneof![
                    (lo..=hi).prop_map(|v| v.to_string()),
                    (0..7usize).prop_map(|i| DOW_NAMES[i].to_string()),
                ]
                .boxed(),
                _ => (lo..=hi).prop_map(|v| v.to_string()).boxed(),
            }
        };
        let range = (lo..=hi, lo..=hi).prop_map(move |(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            format!("{a}-{b}")
        });
        prop_oneof![
            Just("*".to_string()),
            Just("?".to_string()),
            (1u32..=70).prop_map(|s| format!("*/{s}")),
            value(),
            range.clone(),
            (range, 1u32..=20).prop_map(|(r, s)| format!("{r}/{s}")),
            (value(), 1u32..=20).prop_map(|(v, s)| format!("{v}/{s}")),
        ]
        .boxed()
    }

    fn field_text(field: Field) -> BoxedStrategy<String> {
        prop::collection::vec(item(field), 1..=3)
            .prop_map(|items| items.join(","))
            .boxed()
    }

    fn well_formed_cron() -> impl Strategy<Value = String> {
        let six = (
            field_text(Field::Second),
            field_text(Field::Minute),
            field_text(Field::Hour),
            field_text(Field::DayOfMonth),
            field_text(Field::Month),
            field_text(Field::DayOfWeek),
        );
        (six, prop::option::of(field_text(Field::Year)), 0..3u8).prop_map(
            |((s, m, h, dom, mon, dow), year, shape)| match (shape, year) {
                (0, _) => format!("{m} {h} {dom} {mon} {dow}"),
                (1, Some(y)) => format!("{s} {m} {h} {dom} {mon} {dow} {y}"),
                _ => format!("{s} {m} {h} {dom} {mon} {dow}"),
            },
        )
    }

    fn any_schedule_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => well_formed_cron(),
            1 => prop_oneof![
                Just("@yearly"), Just("@monthly"), Just("@weekly"), Just("@daily"), Just("@hourly"),
            ]
            .prop_map(str::to_string),
            1 => (1u64..100_000).prop_map(|s| format!("@every {s}s")),
            1 => (0i64..4_000_000_000).prop_map(|s| format!(
                "@at {}", DateTime::from_timestamp(s, 0).unwrap().to_rfc3339()
            )),
            2 => "[0-9*?/,LW#@a-zA-Z -]{0,40}",
            1 => any::<String>(),
        ]
    }

    fn any_time() -> impl Strategy<Value = i64> {
        prop_oneof![
            1 => any::<i64>(),
            1 => -1_000i64..1_000,
            6 => -100_000_000_000i64..4_200_000_000_000,
        ]
    }

    /// `PROPTEST_CASES` overrides the default case count, for a deeper search by hand.
    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn check_calls(s: &Schedule, t: i64, anchor: i64) -> Result<(), TestCaseError> {
        let start = Instant::now();
        let next = s.next_after(t, anchor);
        let prev = s.prev_at_or_before(t, anchor);
        if let Some(n) = next {
            prop_assert!(n > t, "{:?}: next {} <= {}", s, n, t);
        }
        if let Some(p) = prev {
            prop_assert!(p <= t, "{:?}: prev {} > {}", s, p, t);
            prop_assert_eq!(s.next_after(p - 1, anchor), Some(p), "{:?} at {}", s, t);
            prop_assert!(
                s.next_after(p, anchor).is_none_or(|n| n > t),
                "{:?}: a fire between prev {} and {}",
                s,
                p,
                t
            );
        }
        // Generous bound against a shared, loaded CI machine; a call takes microseconds.
        prop_assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?} slow at {}",
            s,
            t
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(512), ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_and_calls_are_sane(
            text in any_schedule_text(),
            zone in 0..ZONES.len(),
            times in prop::collection::vec(any_time(), 1..4),
            anchor in any_time(),
        ) {
            if let Ok(s) = Schedule::parse(&text, ZONES[zone]) {
                for t in times {
                    check_calls(&s, t, anchor)?;
                }
            }
        }

        #[test]
        fn well_formed_cron_parses(text in well_formed_cron(), zone in 0..ZONES.len(), t in any_time()) {
            let s = Schedule::parse(&text, ZONES[zone]);
            prop_assert!(s.is_ok(), "{:?}: {:?}", text, s.err());
            check_calls(&s.unwrap(), t, 0)?;
        }

        /// Iterating fires never goes backwards and never repeats a wall-clock time.
        #[test]
        fn fire_sequences_are_monotonic_in_time_and_wall_clock(
            text in well_formed_cron(),
            zone in 0..ZONES.len(),
            start in 0i64..4_100_000_000_000,
        ) {
            let tz = ZONES[zone];
            let s = Schedule::parse(&text, tz).unwrap();
            let mut t = start;
            let mut last_wall = None;
            for _ in 0..40 {
                let Some(n) = s.next_after(t, 0) else { break };
                prop_assert!(n > t);
                let wall = wall_at(tz, n).unwrap();
                if let Some(w) = last_wall {
                    prop_assert!(wall > w, "{}: wall {} after {}", text, wall, w);
                }
                last_wall = Some(wall);
                t = n;
            }
        }
    }

    // Brute-force reference for UTC: checks the translation to the cron crate and the cron
    // crate's own search against a plain scan of days with the Vixie day rule.

    fn day_matches(p: &ParsedCron, d: NaiveDate) -> bool {
        let [_, _, _, dom, month, dow, year] = &p.sets;
        let dom_ok = dom.contains(d.day());
        let dow_ok = dow.contains(d.weekday().num_days_from_sunday());
        let day_ok = if p.day_or {
            dom_ok || dow_ok
        } else {
            dom_ok && dow_ok
        };
        day_ok && month.contains(d.month()) && year.contains(d.year() as u32)
    }

    fn times_of_day(p: &ParsedCron) -> Vec<u32> {
        let [sec, min, hour, ..] = &p.sets;
        let mut out = Vec::new();
        for h in hour.values(Field::Hour) {
            for m in min.values(Field::Minute) {
                for s in sec.values(Field::Second) {
                    out.push(h * 3600 + m * 60 + s);
                }
            }
        }
        out
    }

    fn reference_next(p: &ParsedCron, after: NaiveDateTime, days: i64) -> Option<NaiveDateTime> {
        let tod = times_of_day(p);
        let start_secs = after.num_seconds_from_midnight();
        for i in 0..days {
            let d = after.date() + TimeDelta::days(i);
            if !day_matches(p, d) {
                continue;
            }
            let found = tod.iter().find(|s| i > 0 || **s > start_secs);
            if let Some(s) = found {
                return Some(d.and_hms_opt(0, 0, 0).unwrap() + TimeDelta::seconds(i64::from(*s)));
            }
        }
        None
    }

    fn reference_prev(p: &ParsedCron, at: NaiveDateTime, days: i64) -> Option<NaiveDateTime> {
        let tod = times_of_day(p);
        let end_secs = at.num_seconds_from_midnight();
        for i in 0..days {
            let d = at.date() - TimeDelta::days(i);
            if !day_matches(p, d) {
                continue;
            }
            let found = tod.iter().rev().find(|s| i > 0 || **s <= end_secs);
            if let Some(s) = found {
                return Some(d.and_hms_opt(0, 0, 0).unwrap() + TimeDelta::seconds(i64::from(*s)));
            }
        }
        None
    }

    // Brute-force reference in instant space around real DST transitions: the fires before a
    // time are the first instants of matching wall times; after a time, the earliest instant
    // whose wall time is later than `after`'s and that is its wall time's first instant, or
    // whose first instant was not after `after` (the job is already in the repeated hour).

    const DST_ZONES: [Tz; 4] = [
        NY,
        LONDON,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::Pacific::Chatham,
    ];

    fn transitions_2026(tz: Tz) -> Vec<i64> {
        let start = ms("2026-01-01T00:00:00Z");
        let offset = |t: i64| {
            wall_at(tz, t).unwrap() - DateTime::from_timestamp_millis(t).unwrap().naive_utc()
        };
        (0..366 * 24)
            .map(|h| start + h * 3_600_000)
            .filter(|t| offset(*t) != offset(t + 3_600_000))
            .collect()
    }

    fn wall_matches(p: &ParsedCron, w: NaiveDateTime) -> bool {
        let [sec, min, hour, ..] = &p.sets;
        day_matches(p, w.date())
            && hour.contains(w.hour())
            && min.contains(w.minute())
            && sec.contains(w.second())
    }

    fn first_instant(tz: Tz, w: NaiveDateTime) -> Option<i64> {
        match tz.from_local_datetime(&w) {
            LocalResult::Single(t) => Some(millis(t)),
            LocalResult::Ambiguous(a, b) => Some(millis(a).min(millis(b))),
            LocalResult::None => None,
        }
    }

    fn reference_next_tz(p: &ParsedCron, tz: Tz, after: i64, window_s: i64) -> Option<i64> {
        let after_wall = wall_at(tz, after).unwrap();
        let start = after.div_euclid(1000) + 1;
        (start..start + window_s).map(|s| s * 1000).find(|&t| {
            let w = wall_at(tz, t).unwrap();
            let first = first_instant(tz, w).unwrap();
            w > after_wall && wall_matches(p, w) && (first == t || first <= after)
        })
    }

    fn reference_prev_tz(p: &ParsedCron, tz: Tz, at: i64, window_s: i64) -> Option<i64> {
        let end = at.div_euclid(1000);
        (end - window_s..=end).rev().map(|s| s * 1000).find(|&t| {
            let w = wall_at(tz, t).unwrap();
            wall_matches(p, w) && first_instant(tz, w) == Some(t)
        })
    }

    fn frequent_cron() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("0"), Just("30"), Just("0,30"), Just("*/20")],
            field_text(Field::Minute),
            prop_oneof![
                Just("*"),
                Just("0-3"),
                Just("1"),
                Just("2"),
                Just("1-2"),
                Just("*/2")
            ],
        )
            .prop_map(|(s, m, h)| format!("{s} {m} {h} * * *"))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(96), ..ProptestConfig::default() })]

        #[test]
        fn dst_matches_brute_force(
            text in frequent_cron(),
            zone in 0..DST_ZONES.len(),
            which in 0..2usize,
            shift_ms in -4 * 3_600_000i64..4 * 3_600_000,
        ) {
            const WINDOW_S: i64 = 5 * 3600;
            let tz = DST_ZONES[zone];
            let transitions = transitions_2026(tz);
            prop_assert_eq!(transitions.len(), 2, "{}", tz);
            let t = transitions[which] + shift_ms;
            let parsed = parse_cron_fields(&text).unwrap();
            let s = Schedule::parse(&text, tz).unwrap();
            let got = s.next_after(t, 0);
            match reference_next_tz(&parsed, tz, t, WINDOW_S) {
                Some(want) => prop_assert_eq!(got, Some(want), "next {} {} after {}", text, tz, fmt(tz, t)),
                None => prop_assert!(got.is_none_or(|g| g > t + WINDOW_S * 1000 - 1000), "next {}", text),
            }
            let got = s.prev_at_or_before(t, 0);
            match reference_prev_tz(&parsed, tz, t, WINDOW_S) {
                Some(want) => prop_assert_eq!(got, Some(want), "prev {} {} at {}", text, tz, fmt(tz, t)),
                None => prop_assert!(got.is_none_or(|g| g < t - WINDOW_S * 1000), "prev {}", text),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

        #[test]
        fn utc_matches_brute_force(text in well_formed_cron(), t in 0i64..4_000_000_000_000) {
            const WINDOW_DAYS: i64 = 800;
            let parsed = parse_cron_fields(&text).unwrap();
            let s = Schedule::parse(&text, Tz::UTC).unwrap();
            let after = DateTime::from_timestamp_millis(t).unwrap().naive_utc();
            let horizon = t + WINDOW_DAYS * 86_400_000 - 86_400_000;
            let got = s.next_after(t, 0);
            match reference_next(&parsed, after, WINDOW_DAYS) {
                Some(want) => prop_assert_eq!(got, Some(want.and_utc().timestamp_millis()), "next {}", text),
                None => prop_assert!(got.is_none_or(|g| g > horizon), "next {}: {:?}", text, got),
            }
            let low = t - WINDOW_DAYS * 86_400_000 + 86_400_000;
            let got = s.prev_at_or_before(t, 0);
            match reference_prev(&parsed, after, WINDOW_DAYS) {
                Some(want) => prop_assert_eq!(got, Some(want.and_utc().timestamp_millis()), "prev {}", text),
                None => prop_assert!(got.is_none_or(|g| g < low), "prev {}: {:?}", text, got),
            }
        }
    }
}
