//! When rotations are due: a policy's cron expression in its time zone, or a fixed
//! interval counted from the last successful rotation.
//!
//! rekey keeps each subscription's last rotation and first-seen times in its own state,
//! so a schedule only has to answer "when is the next rotation after time t?" — croner's
//! job, evaluated in the policy's real zone (not a fixed offset), so DST changes shift
//! nothing.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use sha2::{Digest, Sha256};

/// `t` plus `d`, saturating instead of overflowing (a duration from config can be
/// absurdly long).
pub fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A subscription's offset in `[0, jitter)`: derived from a hash of its name, so it is
/// the same on every run and every machine (restarts do not reshuffle the fleet), and
/// spread evenly so a fleet does not hit a provider in the same second.
pub fn jitter_offset(name: &str, jitter: Duration) -> Duration {
    let ms = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Duration::from_millis(u64::from_be_bytes(first) % ms)
}

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        expr: String,
        cron: Box<Cron>,
        tz: Tz,
    },
    Every(Duration),
}

impl Schedule {
    /// Parses a 5-field cron expression (minute hour day-of-month month day-of-week).
    pub fn cron(expr: &str, tz: Tz) -> Result<Schedule, String> {
        let fields = expr.split_whitespace().count();
        if fields != 5 && !expr.trim_start().starts_with('@') {
            return Err(format!(
                "`{expr}` has {fields} fields; expected 5 (minute hour day-of-month month day-of-week)"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("`{expr}` is not a valid cron expression: {e}"))?;
        Ok(Schedule::Cron {
            expr: expr.to_string(),
            cron: Box::new(cron),
            tz,
        })
    }

    pub fn parse_zone(name: &str) -> Result<Tz, String> {
        Tz::from_str(name).map_err(|_| {
            format!(
                "`{name}` is not a time zone name from the IANA database (e.g. Europe/Bratislava)"
            )
        })
    }

    /// The first due time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| after + d),
            Schedule::Cron { cron, tz, .. } => cron
                .find_next_occurrence(&after.with_timezone(tz), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// When a subscription is next due. One rekey has never rotated is due one interval
    /// after it was first seen (or at the next cron occurrence), so adding a fleet to
    /// the config does not set off a mass rotation; `rotate_on_adopt` makes it due at once.
    pub fn next_due(
        &self,
        last_rotated_at: Option<DateTime<Utc>>,
        first_seen_at: DateTime<Utc>,
        rotate_on_adopt: bool,
    ) -> Option<DateTime<Utc>> {
        match last_rotated_at {
            Some(t) => self.next_after(t),
            None if rotate_on_adopt => Some(first_seen_at),
            None => self.next_after(first_seen_at),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Schedule::Cron { expr, tz, .. } => format!("cron `{expr}` in {tz}"),
            Schedule::Every(d) => format!("every {}", humantime::format_duration(*d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_is_evaluated_in_the_policy_zone() {
        let tz = Schedule::parse_zone("Europe/Bratislava").unwrap();
        let s = Schedule::cron("0 3 1 * *", tz).unwrap();
        // 03:00 Bratislava in winter is 02:00 UTC; in summer 01:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-11-23T12:00:00Z")),
            Some(utc("2026-12-01T02:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-05-02T00:00:00Z")),
            Some(utc("2026-06-01T01:00:00Z"))
        );
    }

    #[test]
    fn interval_counts_from_the_last_rotation() {
        let s = Schedule::Every(Duration::from_secs(30 * 86400));
        let last = utc("2026-01-01T00:00:00Z");
        assert_eq!(
            s.next_due(Some(last), utc("2025-01-01T00:00:00Z"), false),
            Some(utc("2026-01-31T00:00:00Z"))
        );
    }

    #[test]
    fn never_rotated_subscriptions_wait_one_interval_unless_policy_opts_in() {
        let s = Schedule::Every(Duration::from_secs(3600));
        let seen = utc("2026-11-23T10:00:00Z");
        assert_eq!(
            s.next_due(None, seen, false),
            Some(utc("2026-11-23T11:00:00Z"))
        );
        assert_eq!(s.next_due(None, seen, true), Some(seen));
    }

    #[test]
    fn bad_cron_and_zone_are_explained() {
        let tz = Schedule::parse_zone("UTC").unwrap();
        assert!(
            Schedule::cron("0 3 1 *", tz)
                .unwrap_err()
                .contains("4 fields")
        );
        assert!(
            Schedule::cron("0 3 1 * * *", tz)
                .unwrap_err()
                .contains("6 fields")
        );
        assert!(
            Schedule::cron("61 3 1 * *", tz)
                .unwrap_err()
                .contains("not a valid cron")
        );
        assert!(
            Schedule::parse_zone("Mars/Olympus")
                .unwrap_err()
                .contains("IANA")
        );
    }
}
