//! What counts as evidence that receivers hold the new secret, and what a
//! confirmation rested on.
//!
//! rekey retires the old secret only when a delivery **signed with the new secret**
//! succeeded. Providers report deliveries with their own timestamps, on their own
//! clocks, and some only say when a delivery *completed*, not when it was signed. So
//! every rule compares against an [`Anchor`]: the publication time moved later by the
//! provider's measured clock offset ([`crate::skew`]) and, for completion times, by
//! the longest a delivery can take. The rule per provider, and why a delivery signed
//! before the publication can never satisfy it, is in `docs/providers.md`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::skew::Offset;

/// What a confirmation rested on: stored with the transition in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The provider's signal: `lastSuccessAt`, `delivery log`, `test delivery`…
    pub source: String,
    /// The provider's timestamp of the delivery (its clock), where it gave one.
    pub stamp: Option<DateTime<Utc>>,
    /// The earliest provider timestamp that counted, where a timestamp rule applied.
    pub counted_after: Option<DateTime<Utc>>,
    /// The clock offset bounds the rule allowed for.
    pub offset: Option<Offset>,
    /// One line for people (ids, status codes); never a secret.
    pub detail: String,
}

impl Evidence {
    /// Evidence that needs no clock (an active probe rekey sent after publishing).
    pub fn untimed(source: &str, detail: String) -> Evidence {
        Evidence {
            source: source.to_string(),
            stamp: None,
            counted_after: None,
            offset: None,
            detail,
        }
    }
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)?;
        let Some(after) = self.counted_after else {
            return Ok(());
        };
        match self.stamp {
            Some(stamp) => write!(
                f,
                " [{} {} > {}",
                self.source,
                stamp.to_rfc3339(),
                after.to_rfc3339()
            )?,
            None => write!(f, " [{} after {}", self.source, after.to_rfc3339())?,
        }
        if let Some(o) = self.offset {
            write!(f, "; provider clock offset {o}")?;
        }
        f.write_str("]")
    }
}

/// What one confirmation check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A delivery signed with the new secret succeeded.
    Confirmed(Evidence),
    /// Deliveries signed with the new secret failed, and none succeeded.
    Failing(Failures),
    /// Nothing signed with the new secret has been delivered yet.
    Nothing,
}

/// Deliveries signed with the new secret that receivers did not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures {
    /// What the provider shows of them (a log count and a failed probe, say).
    pub seen: Vec<FailureCount>,
    /// The newest failure, for people (status, error text — never a secret).
    pub detail: String,
}

/// How much of the failure record a provider shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCount {
    /// Every failure since the anchor is listed: this many (Monite's log, Storno's).
    Listed(u32),
    /// The newest failure, by something that changes with every new one (Fintoro's
    /// `lastFailureAt`, the id at the top of a newest-first log): each new value is
    /// at least one more failure, even where a capped list stops growing.
    Newest(String),
    /// An active probe (Storno's test delivery) just failed.
    Probe,
}

/// The failures seen during one confirmation, persisted with the record so that a
/// restart neither forgets them nor counts them twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureTally {
    /// Rekey's clock when the first failure was seen.
    pub first_seen: Option<DateTime<Utc>>,
    /// Rekey's clock when the latest new failure was seen.
    #[serde(default)]
    pub last_seen: Option<DateTime<Utc>>,
    /// The largest listed count seen.
    #[serde(default)]
    pub listed: u32,
    /// Listed failures an operator already looked at (resumed past): not counted.
    #[serde(default)]
    pub listed_base: u32,
    /// Failures counted one by one: new `Newest` stamps and failed probes.
    #[serde(default)]
    pub singles: u32,
    /// The newest `Newest` value counted.
    #[serde(default)]
    pub newest: Option<String>,
    /// The newest failure's description.
    #[serde(default)]
    pub last: Option<String>,
}

impl FailureTally {
    /// Failures counted so far.
    pub fn count(&self) -> u32 {
        self.listed
            .saturating_sub(self.listed_base)
            .saturating_add(self.singles)
    }

    /// Adds what one check found; returns whether anything new was counted.
    pub fn add(&mut self, f: &Failures, now: DateTime<Utc>) -> bool {
        let before = self.count();
        // A list that grew already counts the newest failure: do not count it twice.
        let listed_before = self.listed;
        for seen in &f.seen {
            if let FailureCount::Listed(n) = seen {
                self.listed = self.listed.max(*n);
            }
        }
        let listed_grew = self.listed > listed_before;
        for seen in &f.seen {
            match seen {
                FailureCount::Listed(_) => {}
                FailureCount::Newest(key) if self.newest.as_ref() != Some(key) => {
                    self.newest = Some(key.clone());
                    if !listed_grew {
                        self.singles = self.singles.saturating_add(1);
                    }
                }
                FailureCount::Newest(_) => {}
                FailureCount::Probe => self.singles = self.singles.saturating_add(1),
            }
        }
        let grew = self.count() > before;
        if grew {
            self.first_seen.get_or_insert(now);
            self.last_seen = Some(now);
            self.last = Some(f.detail.clone());
        }
        grew
    }

    /// How long failures have kept coming: from the first seen to the latest new one.
    /// A single failure followed by silence spans nothing — the receiver may have
    /// caught up since, and only the next delivery can say.
    pub fn span(&self) -> chrono::TimeDelta {
        match (self.first_seen, self.last_seen) {
            (Some(a), Some(b)) => b - a,
            _ => chrono::TimeDelta::zero(),
        }
    }

    /// An operator resumed confirmation: what was seen so far is answered for, and
    /// only failures after this count towards the next hold.
    pub fn acknowledge(&mut self) {
        *self = FailureTally {
            listed: self.listed,
            listed_base: self.listed,
            newest: self.newest.clone(),
            ..FailureTally::default()
        };
    }
}

/// The inputs of a timestamp rule for one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// When the secret store acknowledged the new secret (rekey's clock).
    pub published_at: DateTime<Utc>,
    /// The provider's clock offset, measured (or assumed before the first answer).
    pub offset: Offset,
    /// The longest a delivery can take at this provider (its delivery timeout).
    pub longest_delivery: Duration,
}

impl Anchor {
    /// The earliest provider time at which a delivery *created or sent* must be
    /// stamped to have been signed after the publication.
    pub fn sent_after(&self) -> DateTime<Utc> {
        self.offset.surely_after(self.published_at)
    }

    /// The earliest provider time at which a delivery *completed* must be stamped to
    /// have been sent (so signed) after the publication: a delivery signed just before
    /// it can take up to `longest_delivery` to complete.
    pub fn completed_after(&self) -> DateTime<Utc> {
        let start = self.sent_after();
        chrono::TimeDelta::from_std(self.longest_delivery)
            .ok()
            .and_then(|d| start.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Evidence resting on a provider timestamp compared with `counted_after`.
    pub fn evidence(
        &self,
        source: &str,
        stamp: DateTime<Utc>,
        counted_after: DateTime<Utc>,
        detail: String,
    ) -> Evidence {
        Evidence {
            source: source.to_string(),
            stamp: Some(stamp),
            counted_after: Some(counted_after),
            offset: Some(self.offset),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn fail(seen: FailureCount) -> Failures {
        Failures {
            seen: vec![seen],
            detail: "401".into(),
        }
    }

    #[test]
    fn anchors_move_later_by_the_offset_and_the_longest_delivery() {
        let a = Anchor {
            published_at: t(0),
            offset: Offset {
                low: TimeDelta::milliseconds(4_800),
                high: TimeDelta::milliseconds(5_200),
            },
            longest_delivery: Duration::from_secs(10),
        };
        assert_eq!(a.sent_after(), t(0) + TimeDelta::milliseconds(5_200));
        assert_eq!(a.completed_after(), t(15) + TimeDelta::milliseconds(200));
    }

    #[test]
    fn tallies_count_each_failure_once_across_checks() {
        let mut tally = FailureTally::default();
        assert!(tally.add(&fail(FailureCount::Newest(t(10).to_rfc3339())), t(20)));
        assert!(
            !tally.add(&fail(FailureCount::Newest(t(10).to_rfc3339())), t(30)),
            "same stamp twice"
        );
        assert!(tally.add(&fail(FailureCount::Newest(t(40).to_rfc3339())), t(50)));
        assert_eq!(tally.count(), 2);
        assert_eq!(tally.first_seen, Some(t(20)));

        let mut listed = FailureTally::default();
        listed.add(&fail(FailureCount::Listed(3)), t(0));
        listed.add(&fail(FailureCount::Listed(2)), t(1)); // a shorter page: no loss
        listed.add(&fail(FailureCount::Probe), t(2));
        assert_eq!(listed.count(), 4);
    }

    #[test]
    fn a_capped_list_still_counts_new_failures_by_its_newest_entry() {
        let seen = |n, key: &str| Failures {
            seen: vec![FailureCount::Listed(n), FailureCount::Newest(key.into())],
            detail: "401".into(),
        };
        let mut tally = FailureTally::default();
        tally.add(&seen(500, "d1"), t(0));
        assert_eq!(tally.count(), 500, "the newest is one of the listed");
        // The list is capped at 500: only its top entry says more failed.
        assert!(tally.add(&seen(500, "d2"), t(60)));
        assert!(!tally.add(&seen(500, "d2"), t(120)));
        assert_eq!(tally.count(), 501);
        assert_eq!(tally.span(), chrono::TimeDelta::seconds(60));
    }

    #[test]
    fn an_acknowledged_tally_counts_only_what_comes_after() {
        let mut tally = FailureTally::default();
        tally.add(&fail(FailureCount::Listed(5)), t(0));
        tally.add(&fail(FailureCount::Newest("d3".into())), t(0));
        tally.acknowledge();
        assert_eq!(tally.count(), 0);
        assert_eq!(tally.first_seen, None);
        assert!(!tally.add(&fail(FailureCount::Listed(5)), t(10)));
        assert!(!tally.add(&fail(FailureCount::Newest("d3".into())), t(10)));
        assert!(tally.add(&fail(FailureCount::Listed(6)), t(20)));
        assert_eq!((tally.count(), tally.first_seen), (1, Some(t(20))));
    }
}
