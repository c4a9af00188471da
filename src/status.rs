//! What `rekey status` shows: one row per subscription, as a table or JSON. Built
//! from the config and the state database only; it never contacts anything and never
//! holds a secret (fingerprints only).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, Subscription};
use crate::state::{Discovered, Record, StateDb, StateError};

#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    /// `<provider>/<id>`.
    pub subscription: String,
    pub state: String,
    /// When the subscription entered `state`.
    pub since: Option<DateTime<Utc>>,
    pub last_rotated_at: Option<DateTime<Utc>>,
    pub next_due_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub rotation_id: Option<String>,
    pub current_fingerprint: Option<String>,
    pub previous_fingerprint: Option<String>,
    pub confirm_deadline: Option<DateTime<Utc>>,
    pub retry_at: Option<DateTime<Utc>>,
    pub lost_responses: u32,
    /// Deliveries signed with the new secret that failed during this confirmation.
    pub delivery_failures: u32,
    pub last_outcome: Option<String>,
    pub policy: Option<String>,
    pub vault_path: Option<String>,
    /// False for a subscription the state remembers but the config no longer lists.
    pub in_config: bool,
    /// Found by an `id = "*"` entry rather than listed by id.
    pub discovered: bool,
    /// When the provider stopped listing this discovered subscription.
    pub vanished_at: Option<DateTime<Utc>>,
}

fn row(
    rec: Option<&Record>,
    config: &Config,
    configured: Option<&Subscription>,
    name: &str,
    found: Option<&Discovered>,
    now: DateTime<Utc>,
) -> StatusRow {
    let found = found.filter(|d| config.discovery_for(&d.name).is_some());
    let discovered_sub = found.and_then(|d| {
        config
            .discovery_for(&d.name)
            .map(|disc| disc.subscription(&d.id))
    });
    let sub = configured.or(discovered_sub.as_ref());
    let policy = sub.and_then(|s| config.policy(&s.policy));
    let next_due_at = match rec {
        Some(r) => r.next_due_at,
        // Never seen: what the first pass would compute.
        None => policy.and_then(|p| p.schedule.next_due(None, now, p.rotate_on_adopt)),
    };
    let s = rec.map(|r| &r.state);
    StatusRow {
        subscription: name.to_string(),
        state: s.map_or("idle", |s| s.phase.as_str()).to_string(),
        since: rec.map(|r| r.phase_since),
        last_rotated_at: s.and_then(|s| s.last_rotated_at),
        next_due_at,
        last_error: s.and_then(|s| s.last_error.clone()),
        rotation_id: s.and_then(|s| s.rotation_id.clone()),
        current_fingerprint: s.and_then(|s| s.new_fingerprint.as_ref().map(|f| f.to_string())),
        previous_fingerprint: s
            .and_then(|s| s.previous_fingerprint.as_ref().map(|f| f.to_string())),
        confirm_deadline: s.and_then(|s| s.confirm_deadline),
        delivery_failures: s.map_or(0, |s| s.delivery_failures.count()),
        retry_at: s.and_then(|s| s.not_before),
        lost_responses: s.map_or(0, |s| s.lost_responses),
        last_outcome: s.and_then(|s| s.last_outcome.clone()),
        policy: sub.map(|s| s.policy.clone()),
        vault_path: sub.map(|s| s.vault_path.clone()),
        in_config: sub.is_some(),
        discovered: discovered_sub.is_some(),
        vanished_at: found.and_then(|d| d.vanished_at),
    }
}

/// Rows for every configured subscription, then any the state still remembers.
/// Without a database yet (`None`), every configured subscription is as never rotated.
/// Each lookup is by name in a map: a fleet of ten thousand is read once, not once
/// per row.
pub fn rows(
    config: &Config,
    db: Option<&StateDb>,
    now: DateTime<Utc>,
) -> Result<Vec<StatusRow>, StateError> {
    let (records, found) = match db {
        Some(db) => (db.load_all()?, db.discovered()?),
        None => (vec![], vec![]),
    };
    let by_name: HashMap<&str, &Record> = records.iter().map(|r| (r.name.as_str(), r)).collect();
    let found_by_name: HashMap<&str, &Discovered> =
        found.iter().map(|d| (d.name.as_str(), d)).collect();
    let configured: HashMap<&str, &Subscription> = (config.subscriptions.iter())
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut out: Vec<StatusRow> = config
        .subscriptions
        .iter()
        .map(|s| {
            let rec = by_name.get(s.name.as_str()).copied();
            row(rec, config, Some(s), &s.name, None, now)
        })
        .collect();
    for r in &records {
        if !configured.contains_key(r.name.as_str()) {
            let found = found_by_name.get(r.name.as_str()).copied();
            out.push(row(Some(r), config, None, &r.name, found, now));
        }
    }
    Ok(out)
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let secs = (now - t).num_seconds().max(0) as u64;
            humantime::format_duration(std::time::Duration::from_secs(secs))
                .to_string()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

/// A fixed-width table for humans.
pub fn table(rows: &[StatusRow], now: DateTime<Utc>) -> String {
    let header = [
        "SUBSCRIPTION",
        "STATE",
        "IN STATE",
        "LAST ROTATED",
        "NEXT DUE",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let mut err = r.last_error.clone().unwrap_or_else(|| "-".into());
            if err.chars().count() > 80 {
                err = err.chars().take(77).collect::<String>() + "...";
            }
            [
                if r.vanished_at.is_some() {
                    format!("{} (vanished)", r.subscription)
                } else if r.in_config {
                    r.subscription.clone()
                } else {
                    format!("{} (not in config)", r.subscription)
                },
                r.state.clone(),
                ago(r.since, now),
                when(r.last_rotated_at),
                when(r.next_due_at),
                err,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, vals: &[&str]| {
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                out.push_str(v);
            } else {
                out.push_str(&format!("{v:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for c in &cells {
        let refs: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&mut out, &refs);
    }
    out
}
