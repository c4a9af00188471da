//! How far a peer's clock (a provider's, Vault's) is from rekey's, measured from the
//! HTTP `Date` header of its answers.
//!
//! A `Date` is the peer's clock when it formed the answer, truncated to the second.
//! rekey reads its own clock just before sending (`sent`) and just after the answer
//! arrives (`received`). The peer's clock therefore read some time in `[D, D + 1 s)` at
//! some rekey instant in `[sent, received]`, so its offset (peer − rekey) lies in
//! `[D − received, D + 1 s − sent]`, and later by up to half a second more for
//! servers that cache their `Date` ([`DATE_STALENESS`]). One answer gives an
//! interval at least a second and a half wide; answers taken at different fractions of a second narrow it. The estimate is
//! the intersection of the recent answers, newest first: a clock step makes the
//! intersection empty, and then the answers after the step win.
//!
//! Bounds, not a point: evidence rules ([`crate::evidence`]) need "certainly after",
//! which only a bound gives.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// The offset assumed for a peer that has sent no usable `Date` yet: RFC 9110 makes
/// `Date` mandatory for servers with a clock, so this is a fallback for the first
/// call, not a way of life.
pub const UNMEASURED: Offset = Offset {
    low: TimeDelta::seconds(-5),
    high: TimeDelta::seconds(5),
};

/// A peer whose clock is certainly further than this from rekey's is logged as a
/// warning (once, until it comes back); the metric carries the figure for alerts.
pub const WARN_AT: Duration = Duration::from_secs(2);

/// Answers older than this (relative to the newest) no longer narrow the estimate:
/// clocks drift, and a bound from an hour ago may exclude the offset now.
const WINDOW: TimeDelta = TimeDelta::minutes(15);
/// At most this many answers are kept per peer.
const MAX_SAMPLES: usize = 32;
/// The resolution of an HTTP date.
const DATE_RESOLUTION: TimeDelta = TimeDelta::seconds(1);
/// How stale a `Date` may be when it leaves the server: some servers format it once
/// and reuse it (actix-web refreshes it every 500 ms), so the clock that stamped the
/// answer may be ahead of the `Date` by this much more than its resolution.
const DATE_STALENESS: TimeDelta = TimeDelta::milliseconds(500);

/// Bounds on a peer's clock offset: at a rekey instant `t`, the peer's clock read
/// somewhere in `[t + low, t + high]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    pub low: TimeDelta,
    pub high: TimeDelta,
}

impl Offset {
    /// The bounds one answer gives, or `None` for a `Date` that is not an HTTP date.
    pub fn from_answer(sent: DateTime<Utc>, received: DateTime<Utc>, date: &str) -> Option<Self> {
        let d = DateTime::parse_from_rfc2822(date.trim())
            .ok()?
            .with_timezone(&Utc);
        let (sent, received) = (sent.min(received), sent.max(received));
        Some(Offset {
            low: d - received,
            high: d + DATE_RESOLUTION + DATE_STALENESS - sent,
        })
    }

    fn intersect(&self, other: &Offset) -> Option<Offset> {
        let o = Offset {
            low: self.low.max(other.low),
            high: self.high.min(other.high),
        };
        (o.low <= o.high).then_some(o)
    }

    /// The earliest peer timestamp that certainly came after the rekey instant `t`.
    /// A peer whose `Date` says it runs *behind* rekey is not trusted to make this
    /// earlier than `t` itself: a `Date` from a proxy with its own clock would
    /// otherwise let old deliveries count. Being late by the peer's lag only delays a
    /// confirmation; counting early could retire a secret a receiver still needs.
    pub fn surely_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.high.max(TimeDelta::zero())
    }

    /// A peer-clock window surely covering the rekey instants `[from, to]`: widened
    /// by both bounds (and never narrowed), for finding what happened in it.
    pub fn covering(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        (
            from + self.low.min(TimeDelta::zero()),
            to + self.high.max(TimeDelta::zero()),
        )
    }

    /// The largest the offset can be, either way.
    pub fn bound(&self) -> Duration {
        self.low
            .abs()
            .max(self.high.abs())
            .to_std()
            .unwrap_or(Duration::MAX)
    }

    /// The offset is certainly larger than `limit`, one way or the other.
    pub fn certainly_beyond(&self, limit: Duration) -> bool {
        let limit = TimeDelta::from_std(limit).unwrap_or(TimeDelta::MAX);
        self.low > limit || self.high < -limit
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: TimeDelta| d.num_milliseconds() as f64 / 1000.0;
        write!(f, "[{:+.3} s, {:+.3} s]", s(self.low), s(self.high))
    }
}

impl serde::Serialize for Offset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Offset", 2)?;
        st.serialize_field("low_ms", &self.low.num_milliseconds())?;
        st.serialize_field("high_ms", &self.high.num_milliseconds())?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Offset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Raw {
            low_ms: i64,
            high_ms: i64,
        }
        let r = Raw::deserialize(d)?;
        Ok(Offset {
            low: TimeDelta::milliseconds(r.low_ms),
            high: TimeDelta::milliseconds(r.high_ms),
        })
    }
}

/// The running estimate of one peer's clock offset.
#[derive(Debug)]
pub struct SkewMeter {
    peer: String,
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    /// (when rekey received the answer, its bounds), oldest first.
    samples: VecDeque<(DateTime<Utc>, Offset)>,
    warned: bool,
}

impl SkewMeter {
    pub fn new(peer: &str) -> Self {
        SkewMeter {
            peer: peer.to_string(),
            state: Mutex::new(MeterState::default()),
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Takes one answer's `Date` header into account (answers without one, or with a
    /// malformed one, say nothing about the clock and are skipped).
    pub fn observe(&self, sent: DateTime<Utc>, received: DateTime<Utc>, date: Option<&str>) {
        let Some(sample) = date.and_then(|d| Offset::from_answer(sent, received, d)) else {
            return;
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.samples.push_back((received, sample));
        while st.samples.len() > MAX_SAMPLES {
            st.samples.pop_front();
        }
        let now = estimate(&st.samples);
        self.warn_on_change(&mut st, now);
    }

    fn warn_on_change(&self, st: &mut MeterState, now: Option<Offset>) {
        let beyond = now.is_some_and(|o| o.certainly_beyond(WARN_AT));
        if beyond && !st.warned {
            tracing::warn!(
                peer = %self.peer,
                offset = %now.map(|o| o.to_string()).unwrap_or_default(),
                limit = %humantime::format_duration(WARN_AT),
                "the peer's clock differs from this host's by more than the limit; evidence \
                 comparisons allow for it, but check NTP on both sides"
            );
        } else if !beyond && st.warned {
            tracing::info!(peer = %self.peer, "the peer's clock is within the limit again");
        }
        st.warned = beyond;
    }

    /// The measured bounds, or `None` before the first usable `Date`.
    pub fn offset(&self) -> Option<Offset> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        estimate(&st.samples)
    }

    /// The measured bounds, or [`UNMEASURED`].
    pub fn offset_or_assumed(&self) -> Offset {
        self.offset().unwrap_or(UNMEASURED)
    }
}

/// The intersection of the recent samples, newest first, stopping where it would
/// become empty (a clock step: what came before it no longer applies).
fn estimate(samples: &VecDeque<(DateTime<Utc>, Offset)>) -> Option<Offset> {
    let (newest_at, newest) = *samples.back()?;
    let mut acc = newest;
    for (at, o) in samples.iter().rev().skip(1) {
        if newest_at - *at > WINDOW {
            break;
        }
        match acc.intersect(o) {
            Some(narrower) => acc = narrower,
            None => break,
        }
    }
    Some(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    /// The `Date` a peer whose clock is `offset_ms` ahead sends at rekey instant `ms`.
    fn date(ms: i64, offset_ms: i64) -> String {
        let peer = at(ms + offset_ms);
        peer.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    }

    #[test]
    fn one_answer_bounds_the_offset_within_a_second_and_the_round_trip() {
        let m = SkewMeter::new("p");
        assert_eq!(m.offset(), None);
        assert_eq!(m.offset_or_assumed(), UNMEASURED);
        // Peer 300 ms ahead; answer formed 20 ms into a 40 ms round trip.
        m.observe(at(0), at(40), Some(&date(20, 300)));
        let o = m.offset().unwrap();
        assert!(
            o.low <= TimeDelta::milliseconds(300) && TimeDelta::milliseconds(300) <= o.high,
            "{o}"
        );
        assert!(o.high - o.low <= TimeDelta::milliseconds(1540), "{o}");
    }

    #[test]
    fn answers_at_different_fractions_of_a_second_narrow_the_bounds() {
        for true_ms in [-5_000, -700, 0, 450, 5_000] {
            let m = SkewMeter::new("p");
            for i in 0..20 {
                let t = i * 1_137; // a different fraction of a second each time
                m.observe(at(t), at(t + 30), Some(&date(t + 15, true_ms)));
            }
            let o = m.offset().unwrap();
            assert!(
                o.low <= TimeDelta::milliseconds(true_ms)
                    && TimeDelta::milliseconds(true_ms) <= o.high,
                "true {true_ms} ms outside {o}"
            );
            // Down to the staleness allowance and the round trip.
            assert!(
                o.high - o.low <= TimeDelta::milliseconds(600),
                "too wide: {o}"
            );
        }
    }

    #[test]
    fn a_clock_step_replaces_the_old_estimate() {
        let m = SkewMeter::new("p");
        for i in 0..10 {
            let t = i * 1_137;
            m.observe(at(t), at(t + 30), Some(&date(t + 15, 0)));
        }
        // The peer's clock steps 8 s ahead.
        let t = 20_000;
        m.observe(at(t), at(t + 30), Some(&date(t + 15, 8_000)));
        let o = m.offset().unwrap();
        assert!(o.low >= TimeDelta::milliseconds(6_900), "{o}");
        assert!(o.certainly_beyond(WARN_AT));
    }

    #[test]
    fn old_answers_stop_counting() {
        let m = SkewMeter::new("p");
        m.observe(at(0), at(10), Some(&date(5, 0)));
        let later = WINDOW.num_milliseconds() + 60_000;
        m.observe(at(later), at(later + 900), Some(&date(later + 450, 0)));
        // Only the newest, wide answer remains.
        let o = m.offset().unwrap();
        assert!(o.high - o.low >= TimeDelta::milliseconds(2_300), "{o}");
    }

    #[test]
    fn malformed_or_missing_dates_are_ignored() {
        let m = SkewMeter::new("p");
        m.observe(at(0), at(10), None);
        m.observe(at(0), at(10), Some("yesterday"));
        assert_eq!(m.offset(), None);
    }

    #[test]
    fn thresholds_never_move_before_the_instant_and_windows_only_widen() {
        let behind = Offset {
            low: TimeDelta::seconds(-7),
            high: TimeDelta::seconds(-6),
        };
        assert_eq!(behind.surely_after(at(0)), at(0));
        let ahead = Offset {
            low: TimeDelta::seconds(4),
            high: TimeDelta::seconds(5),
        };
        assert_eq!(ahead.surely_after(at(0)), at(5_000));
        assert_eq!(ahead.covering(at(0), at(100)), (at(0), at(5_100)));
        assert_eq!(behind.covering(at(0), at(100)), (at(-7_000), at(100)));
        assert_eq!(behind.bound(), Duration::from_secs(7));
    }
}
