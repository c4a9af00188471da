//! When each subscription that is not running next wakes, ordered by time within
//! each provider account, so the loop finds what is due in O(log N) and never looks
//! at what is not. Keyed by account so free slots are shared out across accounts
//! (one whose requests wait on its rate limit does not take every slot).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

#[derive(Debug, Default)]
pub struct WakeQueue {
    by_account: HashMap<String, BTreeSet<(DateTime<Utc>, String)>>,
    /// Subscription → (account, wake time): each is in the queue at most once.
    at: HashMap<String, (String, DateTime<Utc>)>,
}

impl WakeQueue {
    /// Sets when `name` (of `account`) next wakes; `None` takes it out.
    pub fn set(&mut self, name: &str, account: &str, at: Option<DateTime<Utc>>) {
        self.remove(name);
        let Some(t) = at else { return };
        self.by_account
            .entry(account.to_string())
            .or_default()
            .insert((t, name.to_string()));
        self.at.insert(name.to_string(), (account.to_string(), t));
    }

    /// Takes `name` out; returns when it was due.
    pub fn remove(&mut self, name: &str) -> Option<DateTime<Utc>> {
        let (account, t) = self.at.remove(name)?;
        if let Some(set) = self.by_account.get_mut(&account) {
            set.remove(&(t, name.to_string()));
            if set.is_empty() {
                self.by_account.remove(&account);
            }
        }
        Some(t)
    }

    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<DateTime<Utc>> {
        self.at.get(name).map(|(_, t)| *t)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.at.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// The earliest wake time later than `now`: what the loop sleeps until. Entries
    /// already due are left out: they wait for a free slot, and a finishing task
    /// wakes the loop.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = (now + chrono::Duration::nanoseconds(1), String::new());
        self.by_account
            .values()
            .filter_map(|set| set.range(&from..).next().map(|(t, _)| *t))
            .min()
    }

    /// The subscription to start next among those due by `now`: from the account
    /// `load` ranks lowest (its running count; `None` when it is full), earliest due
    /// first within it, ties by name so the choice is deterministic.
    pub fn next_due(
        &self,
        now: DateTime<Utc>,
        mut load: impl FnMut(&str) -> Option<usize>,
    ) -> Option<(DateTime<Utc>, &str)> {
        let mut best: Option<(usize, DateTime<Utc>, &str, &str)> = None;
        for (account, set) in &self.by_account {
            let Some((t, name)) = set.first() else {
                continue;
            };
            if *t > now {
                continue;
            }
            let Some(rank) = load(account) else { continue };
            let key = (rank, *t, account.as_str(), name.as_str());
            if best.is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
                best = Some(key);
            }
        }
        best.map(|(_, t, _, name)| (t, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn each_subscription_is_queued_once_at_its_latest_time() {
        let mut q = WakeQueue::default();
        q.set("a/1", "a", Some(at(10)));
        q.set("a/1", "a", Some(at(5)));
        q.set("a/2", "a", Some(at(7)));
        assert_eq!(q.len(), 2);
        assert_eq!(q.get("a/1"), Some(at(5)));
        assert_eq!(q.next_after(at(0)), Some(at(5)));
        assert_eq!(
            q.next_after(at(5)),
            Some(at(7)),
            "due ones are not slept for"
        );
        q.set("a/1", "a", None);
        assert_eq!(q.remove("a/2"), Some(at(7)));
        assert!(q.is_empty());
        assert_eq!(q.next_after(at(0)), None);
    }

    #[test]
    fn the_next_due_comes_from_the_least_loaded_account_with_room() {
        let mut q = WakeQueue::default();
        for i in 0..3 {
            q.set(&format!("a/{i}"), "a", Some(at(i)));
            q.set(&format!("b/{i}"), "b", Some(at(i + 1)));
        }
        q.set("c/1", "c", Some(at(100)));
        let running = |a: &str| if a == "a" { Some(2) } else { Some(0) };
        assert_eq!(q.next_due(at(50), running), Some((at(1), "b/0")));
        // Equal load: the earliest due.
        assert_eq!(q.next_due(at(50), |_| Some(0)), Some((at(0), "a/0")));
        // A full account is passed over; nothing due is never picked.
        let b_full = |a: &str| (a != "b").then_some(5);
        assert_eq!(q.next_due(at(50), b_full), Some((at(0), "a/0")));
        assert_eq!(q.next_due(at(50), |_| None), None);
        assert_eq!(q.next_due(at(-1), |_| Some(0)), None);
    }
}
