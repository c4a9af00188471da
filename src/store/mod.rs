//! Where published secrets live: the contract receivers read.
//!
//! One entry per subscription, at the subscription's `vault_path`:
//!
//! ```json
//! { "current": "<secret>", "previous": "<secret, only while dual>",
//!   "rotated_at": "2026-03-18T15:04:05Z", "rotation_id": "…",
//!   "provider": "fintoro", "subscription": "801" }
//! ```
//!
//! Receivers depend on this layout; change it only with a migration note. Two
//! implementations: [`VaultStore`] (KV v1 / v2) and [`FileStore`] (one 0600 JSON
//! file per entry, for the sandbox and single-host setups).

mod file;
mod vault;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use file::FileStore;
pub use vault::VaultStore;

use crate::secret::{ExposeSecret, Fingerprint, SecretString, secret};

/// A published entry, as receivers see it.
#[derive(Clone)]
pub struct Entry {
    pub current: SecretString,
    pub previous: Option<SecretString>,
    pub rotated_at: DateTime<Utc>,
    pub rotation_id: String,
    /// Provider kind (`fintoro`, `monite`, `storno`).
    pub provider: String,
    /// The subscription's id at the provider.
    pub subscription: String,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("current", &Fingerprint::of(&self.current))
            .field("previous", &self.previous.as_ref().map(Fingerprint::of))
            .field("rotated_at", &self.rotated_at)
            .field("rotation_id", &self.rotation_id)
            .field("provider", &self.provider)
            .field("subscription", &self.subscription)
            .finish()
    }
}

impl Entry {
    /// The flat string map written to the KV engine (and to files).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("current".into(), self.current.expose_secret().to_owned());
        if let Some(p) = &self.previous {
            m.insert("previous".into(), p.expose_secret().to_owned());
        }
        m.insert(
            "rotated_at".into(),
            self.rotated_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        m.insert("rotation_id".into(), self.rotation_id.clone());
        m.insert("provider".into(), self.provider.clone());
        m.insert("subscription".into(), self.subscription.clone());
        m
    }

    /// Parses an entry read from the store. The data is untrusted: someone may have
    /// written the path by hand, so every field is checked and a bad one is named.
    /// Only `current` is required; an entry seeded by hand (`current` alone) is valid.
    pub fn from_json(data: &serde_json::Value) -> Result<Entry, String> {
        let obj = data
            .as_object()
            .ok_or_else(|| "entry is not a JSON object".to_string())?;
        let text = |key: &str| -> Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("field `{key}` is not a string")),
            }
        };
        let current = text("current")?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "field `current` is missing or empty".to_string())?;
        let rotated_at = match text("rotated_at")? {
            Some(s) => DateTime::parse_from_rfc3339(&s)
                .map_err(|e| format!("field `rotated_at` is not an RFC 3339 time: {e}"))?
                .with_timezone(&Utc),
            None => DateTime::<Utc>::UNIX_EPOCH,
        };
        Ok(Entry {
            current: secret(current),
            previous: text("previous")?.filter(|s| !s.is_empty()).map(secret),
            rotated_at,
            rotation_id: text("rotation_id")?.unwrap_or_default(),
            provider: text("provider")?.unwrap_or_default(),
            subscription: text("subscription")?.unwrap_or_default(),
        })
    }
}

/// An entry together with the store's version of it (KV v2's version number; other
/// stores report none), used for check-and-set on the next write.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub entry: Entry,
    pub version: Option<u64>,
}

/// What a write must find in place, so a concurrent writer is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing is at the path yet.
    Absent,
    /// The entry is still at this version (KV v2); stores without versions ignore it.
    Version(Option<u64>),
}

impl Expect {
    pub fn from_read(read: &Option<Versioned>) -> Expect {
        match read {
            None => Expect::Absent,
            Some(v) => Expect::Version(v.version),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store} cannot be reached: {detail}")]
    Unreachable { store: String, detail: String },
    #[error("{store} is sealed")]
    Sealed { store: String },
    #[error("{store} refused the token: {detail}")]
    Auth { store: String, detail: String },
    #[error("{store}: permission denied on `{path}`: {detail}")]
    Forbidden {
        store: String,
        path: String,
        detail: String,
    },
    #[error("{store}: `{path}` was changed by another writer (check-and-set failed)")]
    Conflict { store: String, path: String },
    #[error("{store}: entry at `{path}` is malformed: {detail}")]
    Malformed {
        store: String,
        path: String,
        detail: String,
    },
    #[error("{store}: {detail}")]
    Other { store: String, detail: String },
}

/// A place published secrets live. All methods are idempotent.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Short human description, e.g. `vault https://vault:8200 (kv v2 at secret/)`.
    fn describe(&self) -> String;

    /// The store's clock offset from this host's, where it is measured (Vault: from
    /// each answer's `Date`); `None` for stores without a clock of their own.
    fn clock_offset(&self) -> Option<crate::skew::Offset> {
        None
    }

    /// Checks that a rotation of `path` could be published: the store is reachable,
    /// unsealed, the credentials are valid for long enough, and `path` is readable and
    /// writable. Called before the provider is touched.
    async fn preflight(&self, path: &str) -> Result<(), StoreError>;

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError>;

    /// Writes `entry` at `path`, failing with [`StoreError::Conflict`] when the entry
    /// is no longer what `expect` says.
    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError>;

    /// After retirement: removes the superseded version that still held the old secret,
    /// where the store keeps versions (KV v2 with `destroy_old_versions`). No-op elsewhere.
    async fn destroy_version(&self, _path: &str, _version: u64) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entry_round_trips_through_the_documented_layout() {
        let e = Entry {
            current: secret("new"),
            previous: Some(secret("old")),
            rotated_at: DateTime::parse_from_rfc3339("2026-03-18T15:04:05Z")
                .unwrap()
                .with_timezone(&Utc),
            rotation_id: "r1".into(),
            provider: "fintoro".into(),
            subscription: "801".into(),
        };
        let v = serde_json::to_value(e.to_map()).unwrap();
        assert_eq!(
            v,
            json!({"current":"new","previous":"old","rotated_at":"2026-03-18T15:04:05Z",
                   "rotation_id":"r1","provider":"fintoro","subscription":"801"})
        );
        let back = Entry::from_json(&v).unwrap();
        assert_eq!(back.current.expose_secret(), "new");
        assert_eq!(back.previous.unwrap().expose_secret(), "old");
        assert_eq!(back.rotation_id, "r1");
    }

    #[test]
    fn hand_seeded_entry_with_only_current_is_accepted() {
        let e = Entry::from_json(&json!({"current": "s"})).unwrap();
        assert!(e.previous.is_none());
    }

    #[test]
    fn malformed_entries_name_the_field() {
        assert!(
            Entry::from_json(&json!([1]))
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            Entry::from_json(&json!({}))
                .unwrap_err()
                .contains("`current`")
        );
        assert!(
            Entry::from_json(&json!({"current": 5}))
                .unwrap_err()
                .contains("`current` is not a string")
        );
        assert!(
            Entry::from_json(&json!({"current": "a", "rotated_at": "yesterday"}))
                .unwrap_err()
                .contains("`rotated_at`")
        );
    }

    #[test]
    fn entry_debug_shows_fingerprints_only() {
        let e =
            Entry::from_json(&json!({"current": "supersecret", "previous": "oldsecret"})).unwrap();
        let d = format!("{e:?}");
        assert!(
            !d.contains("supersecret") && !d.contains("oldsecret"),
            "{d}"
        );
    }
}
