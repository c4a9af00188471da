//! The subscriptions the daemon manages, what it knows of each one's record, and when
//! each next wakes: kept in step with every change the loop makes, so a wake reads
//! nothing from the database and looks only at what is due.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::queue::WakeQueue;
use crate::config::Subscription;
use crate::rotation::Phase;
use crate::state::Record;

/// What the scheduler keeps of a subscription's record: enough to say when it next
/// wakes ([`super::wake_time`]) and to count it, never a secret, and small enough to
/// hold for a fleet of ten thousand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Brief {
    pub phase: Phase,
    /// A rotation id is set: a rotation started (and may be under way).
    pub rotating: bool,
    pub next_due_at: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    pub last_rotated_at: Option<DateTime<Utc>>,
}

impl Brief {
    pub fn of(rec: &Record) -> Brief {
        Brief {
            phase: rec.state.phase,
            rotating: rec.state.rotation_id.is_some(),
            next_due_at: rec.next_due_at,
            not_before: rec.state.not_before,
            last_rotated_at: rec.state.last_rotated_at,
        }
    }
}

#[derive(Default)]
pub struct Fleet {
    subs: Vec<Subscription>,
    index: HashMap<String, usize>,
    briefs: HashMap<String, Brief>,
    /// Managed subscriptions by phase (those whose record was read).
    counts: HashMap<Phase, usize>,
    pub queue: WakeQueue,
}

impl Fleet {
    pub fn subs(&self) -> &[Subscription] {
        &self.subs
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn get(&self, name: &str) -> Option<&Subscription> {
        self.index.get(name).map(|&i| &self.subs[i])
    }

    pub fn brief(&self, name: &str) -> Option<&Brief> {
        self.briefs.get(name)
    }

    pub fn count(&self, phase: Phase) -> usize {
        self.counts.get(&phase).copied().unwrap_or(0)
    }

    /// Manages `subs` from now on. What is known of those that stay is kept; returns
    /// the names that left (their briefs and queue entries are gone) and the
    /// subscriptions whose records are yet to be read.
    pub fn replace(&mut self, subs: Vec<Subscription>) -> (Vec<String>, Vec<Subscription>) {
        let index: HashMap<String, usize> = subs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let gone: Vec<String> = self
            .subs
            .iter()
            .filter(|s| !index.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in &gone {
            self.forget(name);
        }
        let unread = subs
            .iter()
            .filter(|s| !self.briefs.contains_key(&s.name))
            .cloned()
            .collect();
        self.subs = subs;
        self.index = index;
        (gone, unread)
    }

    fn forget(&mut self, name: &str) {
        self.queue.remove(name);
        if let Some(old) = self.briefs.remove(name) {
            self.uncount(old.phase);
        }
    }

    fn uncount(&mut self, phase: Phase) {
        if let Some(n) = self.counts.get_mut(&phase) {
            *n = n.saturating_sub(1);
        }
    }

    /// Records what `name`'s record now says. Returns false (and keeps nothing) for a
    /// subscription not managed.
    pub fn note(&mut self, name: &str, brief: Brief) -> bool {
        if !self.index.contains_key(name) {
            return false;
        }
        if let Some(old) = self.briefs.insert(name.to_string(), brief) {
            self.uncount(old.phase);
        }
        *self.counts.entry(brief.phase).or_default() += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(name: &str) -> Subscription {
        let (provider, id) = name.split_once('/').unwrap();
        Subscription {
            name: name.into(),
            provider: provider.into(),
            id: id.into(),
            policy: "p".into(),
            vault_path: format!("w/{name}"),
        }
    }

    fn brief(phase: Phase) -> Brief {
        Brief {
            phase,
            rotating: phase.in_flight(),
            next_due_at: None,
            not_before: None,
            last_rotated_at: None,
        }
    }

    #[test]
    fn counts_follow_every_change_and_leave_with_the_subscription() {
        let mut f = Fleet::default();
        let (gone, unread) = f.replace(vec![sub("a/1"), sub("a/2"), sub("b/1")]);
        assert!(gone.is_empty());
        assert_eq!(unread.len(), 3);
        for n in ["a/1", "a/2", "b/1"] {
            assert!(f.note(n, brief(Phase::Idle)));
        }
        assert!(!f.note("c/1", brief(Phase::Idle)), "not managed");
        f.note("a/2", brief(Phase::Confirming));
        assert_eq!((f.count(Phase::Idle), f.count(Phase::Confirming)), (2, 1));
        f.queue.set("a/2", "a", Some(chrono::Utc::now()));

        let (gone, unread) = f.replace(vec![sub("a/1"), sub("b/1"), sub("b/2")]);
        assert_eq!(gone, ["a/2"]);
        assert_eq!(
            unread.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["b/2"]
        );
        assert_eq!((f.count(Phase::Idle), f.count(Phase::Confirming)), (2, 0));
        assert!(f.queue.is_empty(), "a subscription that left is not woken");
        assert_eq!(f.get("b/2").map(|s| s.provider.as_str()), Some("b"));
        assert!(f.get("a/2").is_none());
        assert_eq!(f.len(), 3);
    }
}
