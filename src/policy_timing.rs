//! Policy timing: when a subscription's rotation is due and when it may start. Pure —
//! explicit times in, times out — so schedules, windows, jitter, DST and catch-up are
//! unit-tested without a clock. The daemon's loop ([`crate::scheduler`]) and the engine
//! ask it; the config builds its types.
//!
//! *Due*: a policy's cron expression in its time zone, or a fixed interval counted from
//! the last successful rotation. rekey keeps each subscription's last rotation and
//! first-seen times in its own state, so a schedule only has to answer "when is the next
//! rotation after time t?" — croner's job, evaluated in the policy's real zone (not a
//! fixed offset), so DST changes shift nothing.
//!
//! *Start*: a due rotation starts at its subscription's fixed jitter offset after the
//! due time, inside the policy's window ([`StartRules`]); one missed while rekey was
//! down runs at once or moves to the next occurrence ([`CatchUp`]).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
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

/// A daily time-of-day range in the policy's zone, `start` inclusive, `end` exclusive.
/// `end` before `start` wraps midnight (`22:00-04:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl Window {
    /// Parses `"HH:MM-HH:MM"`; `24:00` is accepted as an end meaning midnight.
    pub fn parse(s: &str) -> Result<Window, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not a window; write e.g. \"02:00-05:00\""))?;
        let time = |x: &str| {
            let x = x.trim();
            if x == "24:00" {
                return Ok(NaiveTime::MIN);
            }
            NaiveTime::parse_from_str(x, "%H:%M")
                .map_err(|_| format!("`{x}` in `{s}` is not a time of day (HH:MM, 00:00-24:00)"))
        };
        let w = Window {
            start: time(a)?,
            end: time(b)?,
        };
        if w.start == w.end {
            return Err(format!(
                "`{s}` is empty (start equals end); omit `window` to allow any time"
            ));
        }
        Ok(w)
    }

    /// The nominal length, ignoring DST (which can shorten or lengthen one day's window).
    pub fn length(&self) -> Duration {
        let secs = (self.end - self.start).num_seconds();
        let secs = if secs <= 0 { secs + 86_400 } else { secs };
        Duration::from_secs(secs.unsigned_abs())
    }

    pub fn contains(&self, t: DateTime<Utc>, tz: Tz) -> bool {
        let local = t.with_timezone(&tz).time();
        if self.start < self.end {
            local >= self.start && local < self.end
        } else {
            local >= self.start || local < self.end
        }
    }

    /// The earliest instant at or after `t` that lies inside the window.
    pub fn next_open(&self, t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        if self.contains(t, tz) {
            return t;
        }
        let today = t.with_timezone(&tz).date_naive();
        // A window can fall entirely into a DST gap on one day (02:00-02:30 on a
        // spring-forward night), so look a few days ahead rather than only tomorrow.
        for day in 0..4 {
            let Some(date) = today.checked_add_days(chrono::Days::new(day)) else {
                break;
            };
            if let Some(open) = local_instant(tz, date, self.start)
                && open >= t
                && self.contains(open, tz)
            {
                return open;
            }
        }
        // Unreachable for real zones; starting now beats never starting.
        t
    }
}

/// The instant a local date and time denote in `tz`: the earlier one when the clock
/// shows it twice (fall-back), the first minute after the gap when it never shows it
/// (spring-forward).
fn local_instant(tz: Tz, date: NaiveDate, time: NaiveTime) -> Option<DateTime<Utc>> {
    let naive = date.and_time(time);
    (0..=180).find_map(|m| {
        tz.from_local_datetime(&(naive + chrono::Duration::minutes(m)))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    })
}

/// What to do with a rotation whose due time passed while the daemon was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Run it as soon as the daemon starts (inside the window, if any).
    Run,
    /// Move it to the schedule's next occurrence.
    Skip,
}

/// A policy's rules for when a due rotation may *start*. Later steps of a rotation in
/// flight are never held back by them.
#[derive(Debug, Clone)]
pub struct StartRules {
    pub window: Option<Window>,
    /// The zone of the window (the policy's `timezone`).
    pub tz: Tz,
    /// Each subscription starts a fixed offset in `[0, jitter)` after its due time.
    pub jitter: Duration,
    pub catch_up: CatchUp,
}

impl Default for StartRules {
    fn default() -> Self {
        StartRules {
            window: None,
            tz: chrono_tz::UTC,
            jitter: Duration::ZERO,
            catch_up: CatchUp::Run,
        }
    }
}

/// When a rotation due at `due` may start, seen at `now`: never before now, offset by
/// the subscription's jitter, and inside the window (at the next opening plus the same
/// offset when it falls outside).
pub fn start_time(
    rules: &StartRules,
    name: &str,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    fit(rules, jitter_offset(name, rules.jitter), due, now)
}

/// When a retry after a failure, due at `at`, may start, seen at `now`: as
/// [`start_time`] but without the jitter offset (the rotation already started once).
pub fn retry_start(rules: &StartRules, at: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    fit(rules, Duration::ZERO, at, now)
}

/// As [`start_time`] with an explicit offset.
fn fit(
    rules: &StartRules,
    offset: Duration,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let t = after(due, offset).max(now);
    match &rules.window {
        None => t,
        Some(w) if w.contains(t, rules.tz) => t,
        Some(w) => {
            let open = w.next_open(t, rules.tz);
            let shifted = after(open, offset);
            // DST can make one night's window shorter than the offset.
            if w.contains(shifted, rules.tz) {
                shifted
            } else {
                open
            }
        }
    }
}

/// The schedule's first occurrence after `after`, for a subscription that was due at
/// `due`: an interval keeps its phase (due + k·interval), a cron expression its times.
pub fn next_occurrence(
    schedule: &Schedule,
    due: DateTime<Utc>,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    match schedule {
        Schedule::Every(d) => {
            let step = i64::try_from(d.as_secs()).ok().filter(|s| *s > 0)?;
            let behind = (after - due).num_seconds().max(0);
            let n = behind / step + 1;
            Some(due + chrono::Duration::seconds(step.checked_mul(n)?))
        }
        Schedule::Cron { .. } => schedule.next_after(after),
    }
}

/// At daemon start: the new due time of a rotation that was due before `started`, if
/// its policy says to skip missed rotations; `None` keeps it (it runs now).
pub fn catch_up(
    schedule: &Schedule,
    rules: &StartRules,
    due: DateTime<Utc>,
    started: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if rules.catch_up == CatchUp::Run || due >= started {
        return None;
    }
    next_occurrence(schedule, due, started)
}

/// The next `n` start times of a subscription that rotates on schedule from `from` on
/// (what `rekey check-config` prints as the plan).
pub fn plan(
    schedule: &Schedule,
    rules: &StartRules,
    name: &str,
    from: DateTime<Utc>,
    n: usize,
) -> Vec<DateTime<Utc>> {
    let mut out = Vec::with_capacity(n);
    let mut due = schedule.next_due(None, from, false);
    while let Some(d) = due {
        if out.len() == n {
            break;
        }
        let start = start_time(rules, name, d, d);
        out.push(start);
        due = schedule.next_after(match schedule {
            // An interval counts from the rotation, which happens at `start`.
            Schedule::Every(_) => start,
            Schedule::Cron { .. } => d,
        });
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    pub(crate) fn bratislava() -> Tz {
        Schedule::parse_zone("Europe/Bratislava").unwrap()
    }

    pub(crate) fn rules(window: Option<&str>, jitter: u64) -> StartRules {
        StartRules {
            window: window.map(|w| Window::parse(w).unwrap()),
            tz: bratislava(),
            jitter: Duration::from_secs(jitter),
            catch_up: CatchUp::Run,
        }
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

    #[test]
    fn windows_parse_and_explain_mistakes() {
        let w = Window::parse("02:00-05:00").unwrap();
        assert_eq!(w.length(), Duration::from_secs(3 * 3600));
        assert_eq!(
            Window::parse("22:00-04:00").unwrap().length(),
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(
            Window::parse("22:00-24:00").unwrap().length(),
            Duration::from_secs(2 * 3600)
        );
        assert!(Window::parse("02:00").unwrap_err().contains("not a window"));
        assert!(Window::parse("2am-5am").unwrap_err().contains("HH:MM"));
        assert!(Window::parse("25:00-05:00").unwrap_err().contains("25:00"));
        assert!(Window::parse("03:00-03:00").unwrap_err().contains("empty"));
    }

    #[test]
    fn a_due_time_outside_the_window_waits_for_the_opening_in_the_policy_zone() {
        let r = rules(Some("02:00-05:00"), 0);
        // 12:00 UTC on 23 Nov = 13:00 in Bratislava (CET): next opening 02:00 CET
        // on 24 Nov = 01:00 UTC.
        let due = utc("2026-11-23T12:00:00Z");
        assert_eq!(start_time(&r, "a/1", due, due), utc("2026-11-24T01:00:00Z"));
        // 02:30 CET is inside: starts at once.
        let inside = utc("2026-11-24T01:30:00Z");
        assert_eq!(start_time(&r, "a/1", inside, inside), inside);
        // 05:00 local is the (exclusive) end.
        let end = utc("2026-11-24T04:00:00Z");
        assert_eq!(start_time(&r, "a/1", end, end), utc("2026-11-25T01:00:00Z"));
        // In summer (CEST, UTC+2) the same window opens at 00:00 UTC.
        let summer = utc("2026-07-01T12:00:00Z");
        assert_eq!(
            start_time(&r, "a/1", summer, summer),
            utc("2026-07-02T00:00:00Z")
        );
    }

    #[test]
    fn a_window_that_wraps_midnight() {
        let r = rules(Some("22:00-04:00"), 0);
        let tz = bratislava();
        let w = r.window.unwrap();
        // 23:30 and 03:59 local are inside; 04:00 and 12:00 are not.
        assert!(w.contains(utc("2026-11-23T22:30:00Z"), tz));
        assert!(w.contains(utc("2026-11-24T02:59:00Z"), tz));
        assert!(!w.contains(utc("2026-11-24T03:00:00Z"), tz));
        assert!(!w.contains(utc("2026-11-24T11:00:00Z"), tz));
        // From noon, the window opens at 22:00 local the same day.
        let noon = utc("2026-11-24T11:00:00Z");
        assert_eq!(
            start_time(&r, "a/1", noon, noon),
            utc("2026-11-24T21:00:00Z")
        );
        // Just after midnight it is open already.
        let late = utc("2026-11-23T23:30:00Z");
        assert_eq!(start_time(&r, "a/1", late, late), late);
    }

    #[test]
    fn an_overdue_rotation_starts_now_if_the_window_is_open_else_at_the_opening() {
        let r = rules(Some("02:00-05:00"), 0);
        let due = utc("2026-11-20T01:00:00Z");
        let now_open = utc("2026-11-23T02:00:00Z");
        assert_eq!(start_time(&r, "a/1", due, now_open), now_open);
        let now_closed = utc("2026-11-23T10:00:00Z");
        assert_eq!(
            start_time(&r, "a/1", due, now_closed),
            utc("2026-11-24T01:00:00Z")
        );
    }

    #[test]
    fn spring_forward_shortens_the_window_and_a_missing_opening_moves_past_the_gap() {
        let tz = bratislava();
        // 2026-03-29: at 02:00 CET clocks jump to 03:00 CEST (01:00 UTC).
        let w = Window::parse("02:00-05:00").unwrap();
        // The window opens at the first instant after the gap: 03:00 CEST = 01:00 UTC,
        // and holds only two hours that night.
        assert_eq!(
            w.next_open(utc("2026-03-28T12:00:00Z"), tz),
            utc("2026-03-29T01:00:00Z")
        );
        assert!(w.contains(utc("2026-03-29T02:59:00Z"), tz));
        assert!(!w.contains(utc("2026-03-29T03:00:00Z"), tz));
        // A window inside the gap does not exist that night: the next night's opening.
        let gap = Window::parse("02:15-02:45").unwrap();
        assert_eq!(
            gap.next_open(utc("2026-03-28T12:00:00Z"), tz),
            utc("2026-03-30T00:15:00Z")
        );
        // A cron time in the gap still runs that day, right after the jump.
        let s = Schedule::cron("30 2 * * *", tz).unwrap();
        let next = s.next_after(utc("2026-03-28T12:00:00Z")).unwrap();
        assert!(
            next >= utc("2026-03-29T01:00:00Z") && next <= utc("2026-03-29T01:30:00Z"),
            "{next}"
        );
        // And the day after, 02:30 CEST again.
        assert_eq!(s.next_after(next), Some(utc("2026-03-30T00:30:00Z")));
    }

    #[test]
    fn fall_back_runs_once_and_lengthens_the_window() {
        let tz = bratislava();
        // 2026-10-25: at 03:00 CEST clocks go back to 02:00 CET; 02:30 happens twice
        // (00:30 UTC and 01:30 UTC).
        let s = Schedule::cron("30 2 * * *", tz).unwrap();
        let first = s.next_after(utc("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z"));
        assert_eq!(
            s.next_after(first),
            Some(utc("2026-10-26T01:30:00Z")),
            "no second run at the repeated 02:30"
        );
        let w = Window::parse("02:00-05:00").unwrap();
        // Opens at the first 02:00 (CEST, 00:00 UTC); open four hours that night.
        assert_eq!(
            w.next_open(utc("2026-10-24T12:00:00Z"), tz),
            utc("2026-10-25T00:00:00Z")
        );
        assert!(w.contains(utc("2026-10-25T03:59:00Z"), tz));
        assert!(!w.contains(utc("2026-10-25T04:00:00Z"), tz));
    }

    #[test]
    fn jitter_is_stable_per_name_within_bounds_and_spreads_a_fleet() {
        let j = Duration::from_secs(600);
        let offsets: Vec<Duration> = (0..500)
            .map(|i| jitter_offset(&format!("acme/{i}"), j))
            .collect();
        assert!(offsets.iter().all(|o| *o < j));
        assert_eq!(
            jitter_offset("acme/7", j),
            offsets[7],
            "same name, same offset"
        );
        // Spread: every tenth of the range is used by someone.
        for bucket in 0..10u64 {
            let lo = Duration::from_secs(bucket * 60);
            let hi = lo + Duration::from_secs(60);
            assert!(
                offsets.iter().any(|o| *o >= lo && *o < hi),
                "no offset in [{lo:?}, {hi:?})"
            );
        }
        assert_eq!(jitter_offset("acme/1", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn jitter_offsets_the_start_and_stays_inside_the_window() {
        let r = rules(Some("02:00-05:00"), 3600);
        let off = jitter_offset("acme/801", r.jitter);
        let due = utc("2026-11-23T12:00:00Z");
        let start = start_time(&r, "acme/801", due, due);
        assert_eq!(start, after(utc("2026-11-24T01:00:00Z"), off));
        assert!(r.window.unwrap().contains(start, r.tz));
        // Without a window: due + offset.
        let r = rules(None, 3600);
        assert_eq!(start_time(&r, "acme/801", due, due), after(due, off));
    }

    #[test]
    fn catch_up_run_keeps_a_missed_rotation_and_skip_moves_it_to_the_next_occurrence() {
        let tz = bratislava();
        let monthly = Schedule::cron("0 3 1 * *", tz).unwrap();
        let mut r = rules(None, 0);
        let due = utc("2026-11-01T02:00:00Z");
        let started = utc("2026-11-23T10:00:00Z");
        assert_eq!(
            catch_up(&monthly, &r, due, started),
            None,
            "run: due stays, runs now"
        );
        assert_eq!(
            start_time(&r, "a/1", due, started),
            started,
            "and starts at once"
        );
        r.catch_up = CatchUp::Skip;
        assert_eq!(
            catch_up(&monthly, &r, due, started),
            Some(utc("2026-12-01T02:00:00Z"))
        );
        // Not missed (due after the start): nothing to skip.
        assert_eq!(
            catch_up(&monthly, &r, utc("2026-12-01T02:00:00Z"), started),
            None
        );

        // An interval keeps its phase: due + k·interval past the start.
        let weekly = Schedule::Every(Duration::from_secs(7 * 86_400));
        assert_eq!(
            catch_up(&weekly, &r, utc("2026-11-02T00:00:00Z"), started),
            Some(utc("2026-11-30T00:00:00Z"))
        );
    }

    #[test]
    fn the_plan_lists_window_adjusted_starts() {
        let tz = bratislava();
        let noon = Schedule::cron("0 12 * * *", tz).unwrap();
        let r = rules(Some("02:00-05:00"), 0);
        let from = utc("2026-11-23T00:00:00Z");
        assert_eq!(
            plan(&noon, &r, "a/1", from, 2),
            vec![utc("2026-11-24T01:00:00Z"), utc("2026-11-25T01:00:00Z")]
        );
    }
}
