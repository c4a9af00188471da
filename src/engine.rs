//! The driver: runs the pure state machine ([`crate::rotation`]) against the real
//! world. For each step it persists the state the machine returned, *then* performs the
//! action, then feeds the result back as the next event. Nothing else decides anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::config::{Config, Policy, StoreSettings, Subscription};
use crate::failpoint;
use crate::policy_timing::{after, jitter_offset};
use crate::provider::{self, Provider, RotateError};
use crate::rotation::{self, Action, Event, Phase, Trigger};
use crate::secret::{ExposeSecret, Fingerprint};
use crate::state::{Record, StateDb, StateError, Target};
use crate::store::{Entry, Expect, FileStore, SecretStore, StoreError, VaultStore, Versioned};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Setup(String),
    #[error("internal error for `{subscription}`: {source}")]
    Invalid {
        subscription: String,
        source: rotation::InvalidEvent,
    },
}

/// Where one subscription stands after the engine advanced it as far as it could.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not due; nothing was done.
    NotDue,
    /// Finished a step sequence and rests in this phase (idle or failed).
    Rested(Phase),
    /// Must wait until this time before the next step (confirm poll, retry backoff).
    Waiting(Phase, DateTime<Utc>),
    /// Held: needs an operator.
    Held,
    /// Rotated outside rekey: needs an operator (see the record's `last_error`).
    Drifted,
    /// Not due; a paced check for drift ran and found none.
    Checked,
}

impl Outcome {
    /// Counts as a failure for the exit code: a failed or held rotation, or a step
    /// that is backing off after an error.
    pub fn is_problem(&self, rec: &Record) -> bool {
        match self {
            Outcome::Held | Outcome::Drifted | Outcome::Rested(Phase::Failed) => true,
            Outcome::Waiting(_, _) => rec.state.last_error.is_some(),
            _ => false,
        }
    }
}

/// A listed id becomes a name and a Vault path segment: only plain ids qualify
/// (Fintoro integers, Monite and Storno uuids), never `..` or anything with a `/`.
fn usable_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// Why preflight stopped a rotation.
enum Preflight {
    /// Something is unreachable or refused; retried after a backoff.
    Failed(String),
    /// The provider's secret is not the store's: wait for an operator.
    Drifted(String),
}

pub struct Engine {
    config: Arc<Config>,
    db: Arc<StateDb>,
    store: Arc<dyn SecretStore>,
    providers: HashMap<String, Arc<dyn Provider>>,
    clock: Arc<dyn Clock>,
    /// Subscriptions this process has already advanced: resuming any other in-flight
    /// one means resuming after a restart.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    /// When each subscription is next checked for drift by this process.
    drift_next: std::sync::Mutex<HashMap<String, DateTime<Utc>>>,
    /// Subscriptions per provider account, for pacing drift checks.
    account_sizes: std::sync::Mutex<HashMap<String, usize>>,
    /// Rotations under way whose subscription left the config.
    orphans: std::sync::Mutex<std::collections::HashSet<String>>,
    /// What the store held at each subscription's path just before its rotate call,
    /// by rotation id: the publication then writes at once instead of reading first,
    /// so the exposure window (provider response to store write) holds no store
    /// round trip. A read from another rotation is never used.
    store_reads: std::sync::Mutex<HashMap<String, (String, Option<Versioned>)>>,
}

/// The share of an account's rate limit that drift checks may use: a fleet too large
/// to check every `[daemon] drift_check` is checked more slowly, never faster than
/// this share allows, so rotations and confirmations keep the rest. (A `--once` run
/// is a new process: it always checks.)
const DRIFT_SHARE_OF_RATE_LIMIT: f64 = 0.1;

impl Engine {
    pub async fn new(config: Arc<Config>, db: Arc<StateDb>) -> Result<Engine, EngineError> {
        let store: Arc<dyn SecretStore> = match &config.store {
            StoreSettings::Vault(v) => Arc::new(
                VaultStore::connect(v)
                    .await
                    .map_err(|e| EngineError::Setup(e.to_string()))?,
            ),
            StoreSettings::File { dir } => Arc::new(FileStore::new(dir)),
        };
        let mut providers = HashMap::new();
        for p in &config.providers {
            let client = provider::build(p, crate::clock::system())
                .map_err(|e| EngineError::Setup(e.to_string()))?;
            providers.insert(p.name.clone(), client);
        }
        Ok(Engine::with_parts(config, db, store, providers))
    }

    /// Assembles an engine from parts (tests and the sandbox inject their own).
    pub fn with_parts(
        config: Arc<Config>,
        db: Arc<StateDb>,
        store: Arc<dyn SecretStore>,
        providers: HashMap<String, Arc<dyn Provider>>,
    ) -> Engine {
        Engine {
            config,
            db,
            store,
            providers,
            clock: crate::clock::system(),
            seen: Default::default(),
            drift_next: Default::default(),
            account_sizes: Default::default(),
            orphans: Default::default(),
            store_reads: Default::default(),
        }
    }

    /// Runs this engine on `clock` instead of the system clock (the simulation).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Engine {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Each peer's measured clock offset (provider accounts by name, and `vault`), for
    /// the metrics; unmeasured peers are left out.
    pub fn clock_offsets(&self) -> Vec<(String, crate::skew::Offset)> {
        let mut out: Vec<(String, crate::skew::Offset)> = self
            .providers
            .iter()
            .filter_map(|(name, p)| p.clock_offset().map(|o| (name.clone(), o)))
            .collect();
        if let Some(o) = self.store.clock_offset() {
            out.push(("vault".to_string(), o));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Wall time now, by this engine's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// How often `sub` is checked for drift: `[daemon] drift_check`, or slower when
    /// its account's fleet would otherwise take more than its share of the rate limit.
    fn drift_interval(&self, sub: &Subscription) -> std::time::Duration {
        let n = self
            .account_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sub.provider)
            .copied()
            .unwrap_or(1)
            .max(1);
        let every = self.config.daemon.drift_check;
        let Some(p) = self.config.provider(&sub.provider) else {
            return every;
        };
        let per_request = p.rate_limit.per.as_secs_f64() / f64::from(p.rate_limit.count.max(1));
        let fleet = std::time::Duration::from_secs_f64(
            (n as f64 * per_request / DRIFT_SHARE_OF_RATE_LIMIT).min(86_400.0 * 7.0),
        );
        fleet.max(every)
    }

    /// When `sub` is next checked for a rotation made outside rekey, for providers
    /// that show part of their live secret; `None` for the others. A fleet's first
    /// checks are spread over one interval (by a hash of the name), not made at once.
    pub fn drift_check_at(&self, sub: &Subscription) -> Option<DateTime<Utc>> {
        if !self.providers.get(&sub.provider)?.shows_secret_hint() {
            return None;
        }
        let mut next = self.drift_next.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = next.get(&sub.name) {
            return Some(*t);
        }
        let every = self.drift_interval(sub);
        let t = after(self.now(), jitter_offset(&sub.name, every));
        next.insert(sub.name.clone(), t);
        Some(t)
    }

    /// Whether a drift check of `sub` is due now (`eager`: always); if so, the next one
    /// is booked an interval later.
    fn take_drift_check(&self, sub: &Subscription, eager: bool) -> bool {
        let now = self.now();
        let due = eager || self.drift_check_at(sub).is_some_and(|t| t <= now);
        if due {
            let next = after(now, self.drift_interval(sub));
            self.drift_next
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sub.name.clone(), next);
        }
        due
    }

    /// Records how many subscriptions each account has (drift checks are paced by it).
    pub fn set_account_sizes(&self, subs: &[Subscription]) {
        let mut sizes: HashMap<String, usize> = HashMap::new();
        for s in subs {
            *sizes.entry(s.provider.clone()).or_default() += 1;
        }
        *self.account_sizes.lock().unwrap_or_else(|p| p.into_inner()) = sizes;
    }

    /// Carries over which subscriptions this process already advanced, so an engine
    /// built for a reloaded config does not report each of them as resumed "after a
    /// restart".
    pub fn adopt_seen(&self, from: &Engine) {
        let theirs = from.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(theirs);
        let drift = from
            .drift_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.drift_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(drift);
    }

    fn first_sight(&self, name: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn db(&self) -> &StateDb {
        &self.db
    }

    pub fn store(&self) -> &Arc<dyn SecretStore> {
        &self.store
    }

    /// The subscription's policy. Configured subscriptions always have one (config
    /// validation); a rotation that outlived its policy in the config has none.
    fn policy(&self, sub: &Subscription) -> Option<&Policy> {
        self.config.policy(&sub.policy)
    }

    /// The policy's timing, or the defaults for a rotation whose policy is gone.
    fn timing(&self, sub: &Subscription) -> rotation::Timing {
        self.policy(sub)
            .map(|p| p.timing.clone())
            .unwrap_or_default()
    }

    /// The next due time by the policy; none once the policy is gone (an orphaned
    /// rotation finishes, and nothing new starts).
    fn next_due(&self, sub: &Subscription, rec: &Record) -> Option<DateTime<Utc>> {
        let p = self.policy(sub)?;
        p.schedule.next_due(
            rec.state.last_rotated_at,
            rec.first_seen_at,
            p.rotate_on_adopt,
        )
    }

    /// The provider account's client; `None` once the account left the config.
    fn provider(&self, sub: &Subscription) -> Option<&Arc<dyn Provider>> {
        self.providers.get(&sub.provider)
    }

    /// The provider account's client, or why there is none.
    fn client(&self, sub: &Subscription) -> Result<&Arc<dyn Provider>, String> {
        self.provider(sub).ok_or_else(|| {
            format!(
                "provider account `{}` is no longer in the config",
                sub.provider
            )
        })
    }

    /// Why a rotation left behind by the config cannot take its next step, if so: one
    /// that has not reached the provider yet is given up (nothing new starts for a
    /// subscription rekey no longer manages), and one whose provider account is gone
    /// cannot rotate again or confirm. Publishing and retiring need only the store, so
    /// those always go ahead.
    fn orphaned(&self, sub: &Subscription, rec: &Record, action: &Action) -> Option<String> {
        if !self.is_orphan(&sub.name) {
            return None;
        }
        let s = &rec.state;
        let rotation = s.rotation_id.as_deref().unwrap_or("-");
        if matches!(s.phase, Phase::Idle | Phase::Failed) && *action == Action::Preflight {
            return Some(format!(
                "`{}` left the config before rotation {rotation} reached the provider; \
                 the rotation is given up and nothing changed",
                sub.name
            ));
        }
        let needs_provider = matches!(action, Action::Rotate | Action::Check { .. });
        if !needs_provider || self.provider(sub).is_some() {
            return None;
        }
        let what = if s.phase == Phase::Rotating {
            "rotate again after a lost answer (the provider's secret is unknown)"
        } else {
            "confirm that receivers verify the new secret"
        };
        Some(format!(
            "`{}` left the config during rotation {rotation}: provider account `{}` is gone, \
             so rekey cannot {what}. `{}` in the store keeps what this rotation published. \
             Put the account back under the same name and run `rekey resume {}`, or once \
             receivers verify the new secret, `rekey retire {}`",
            sub.name, sub.provider, sub.vault_path, sub.name, sub.name
        ))
    }

    /// What a rotation of `sub` starting now works on.
    fn target_of(&self, sub: &Subscription) -> Target {
        Target {
            provider: sub.provider.clone(),
            kind: self
                .provider(sub)
                .map(|p| p.kind().as_str().to_string())
                .unwrap_or_default(),
            id: sub.id.clone(),
            policy: sub.policy.clone(),
            vault_path: sub.vault_path.clone(),
        }
    }

    /// The subscription a record's rotation under way works on: the one its target
    /// recorded when it started, whatever the config says now.
    fn working_on(sub: &Subscription, rec: &Record) -> Subscription {
        match &rec.target {
            Some(t) if rec.state.rotation_id.is_some() => Subscription {
                name: sub.name.clone(),
                provider: t.provider.clone(),
                id: t.id.clone(),
                policy: t.policy.clone(),
                vault_path: t.vault_path.clone(),
            },
            _ => sub.clone(),
        }
    }

    /// Rotations under way whose subscription is not in `managed` (removed from the
    /// config, its provider renamed, no longer discovered): they are advanced until
    /// they rest, so no minted secret stays only in the local database. Remembered
    /// so that none of them starts a new rotation.
    pub fn orphans(&self, managed: &[Subscription]) -> Vec<Subscription> {
        let names: std::collections::HashSet<&str> =
            managed.iter().map(|s| s.name.as_str()).collect();
        // Names first: only the few records left behind are read whole.
        let left: Vec<String> = match self.db.rotating_names() {
            Ok(r) => r
                .into_iter()
                .filter(|n| !names.contains(n.as_str()))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the state for rotations left by the config");
                return vec![];
            }
        };
        let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        orphans.clear();
        let mut out = vec![];
        for name in left {
            let r = match self.db.load(&name) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(subscription = %name, error = %e, "cannot read state");
                    continue;
                }
            };
            let Some(t) = r.target.filter(|_| r.state.rotation_id.is_some()) else {
                continue;
            };
            orphans.insert(r.name.clone());
            out.push(Subscription {
                name: r.name,
                provider: t.provider,
                id: t.id,
                policy: t.policy,
                vault_path: t.vault_path,
            });
        }
        out
    }

    /// Whether `name` is a rotation left behind by the config ([`Engine::orphans`]).
    pub fn is_orphan(&self, name: &str) -> bool {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// The subscriptions of this pass: the configured ones, then every one the
    /// `id = "*"` entries discover. A newly listed subscription is recorded
    /// (`discovered`) and scheduled like any other; one the provider no longer lists
    /// is recorded (`vanished`, with a `last_error` saying so) and left alone, never
    /// silently dropped: its state and Vault entry stay. When a list call fails, the
    /// subscriptions discovered before carry on, so rotations in flight finish.
    pub async fn subscriptions(&self) -> Vec<Subscription> {
        let mut out = self.config.subscriptions.clone();
        if self.config.discoveries.is_empty() {
            return out;
        }
        for d in &self.config.discoveries {
            let Some(provider) = self.providers.get(&d.provider) else {
                continue;
            };
            match provider.list().await {
                Ok(listed) => {
                    if let Err(e) = self.reconcile(d, &listed) {
                        tracing::error!(provider = %d.provider, error = %e, "cannot record discovery");
                    }
                }
                Err(e) => tracing::warn!(
                    provider = %d.provider,
                    error = %e,
                    "cannot list subscriptions; continuing with those discovered before"
                ),
            }
        }
        let known = match self.db.discovered() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cannot read discovered subscriptions");
                return out;
            }
        };
        let mut names: std::collections::HashSet<String> =
            out.iter().map(|s| s.name.clone()).collect();
        for k in &known {
            // A vanished subscription rests, except one mid-rotation: a minted secret
            // still gets published, so nothing is stranded if the listing was wrong.
            if k.vanished_at.is_some()
                && !matches!(self.db.load(&k.name), Ok(Some(r)) if r.state.phase.in_flight())
            {
                continue;
            }
            let Some(d) = self
                .config
                .discoveries
                .iter()
                .find(|d| d.provider == k.provider)
            else {
                continue;
            };
            if !names.insert(k.name.clone()) {
                continue;
            }
            out.push(d.subscription(&k.id));
        }
        out
    }

    /// Records what one list call found: new subscriptions, and vanished ones. Ids
    /// the provider lists that could not be a safe path segment are skipped.
    fn reconcile(
        &self,
        d: &crate::config::Discovery,
        listed: &[crate::provider::RemoteSubscription],
    ) -> Result<(), EngineError> {
        let now = self.now();
        // Every path taken: configured, and recorded for discovered subscriptions (a
        // vanished one keeps its entry, and another account's template may still map
        // onto a path the config check could not see, such as one recorded before a
        // template changed).
        let discovered = self.db.discovered()?;
        let mut taken: HashMap<&str, &str> = HashMap::new();
        for (name, path) in (self.config.subscriptions.iter())
            .map(|s| (&s.name, &s.vault_path))
            .chain(discovered.iter().map(|k| (&k.name, &k.vault_path)))
        {
            taken.entry(path.as_str()).or_insert(name.as_str());
        }
        let configured: std::collections::HashSet<&str> = (self.config.subscriptions.iter())
            .map(|s| s.name.as_str())
            .collect();
        for r in listed.iter().filter(|r| usable_id(&r.id)) {
            let sub = d.subscription(&r.id);
            // Explicit entries win; a templated path must not take another's entry.
            if configured.contains(sub.name.as_str()) {
                continue;
            }
            if let Some(other) = taken
                .get(sub.vault_path.as_str())
                .filter(|name| **name != sub.name)
            {
                tracing::warn!(
                    subscription = %sub.name,
                    vault_path = %sub.vault_path,
                    other = %other,
                    "discovered subscription's vault_path belongs to another; not managed"
                );
                continue;
            }
            if self
                .db
                .saw_discovered(&sub.name, &d.provider, &sub.id, &sub.vault_path, now)?
            {
                let mut rec = self.record(&sub)?;
                if rec
                    .state
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("vanished:"))
                {
                    rec.state.last_error = None;
                }
                let t = rotation::Transition::note(
                    rec.state.phase,
                    "discovered",
                    format!(
                        "listed by {} (active: {}); managed with policy `{}`, published at `{}`",
                        d.provider, r.active, sub.policy, sub.vault_path
                    ),
                );
                self.db.save(&rec, Some(&t), now)?;
                log_transition(&sub, &rec, &t);
            }
        }
        // The rows read above serve here too: a row added or revived in this call is
        // listed, so it is skipped either way.
        let listed_ids: std::collections::HashSet<&str> =
            listed.iter().map(|r| r.id.as_str()).collect();
        for k in &discovered {
            if k.provider != d.provider
                || k.vanished_at.is_some()
                || listed_ids.contains(k.id.as_str())
            {
                continue;
            }
            self.db.mark_vanished(&k.name, now)?;
            let sub = d.subscription(&k.id);
            let mut rec = self.record(&sub)?;
            let detail = format!(
                "vanished: {} no longer lists this subscription (deleted at the provider?); \
                 rekey no longer rotates it. Its state and the Vault entry at `{}` are kept; \
                 remove them when the subscription is gone for good",
                d.provider, k.vault_path
            );
            rec.state.last_error = Some(detail.clone());
            let t = rotation::Transition::note(rec.state.phase, "vanished", detail);
            self.db.save(&rec, Some(&t), now)?;
            log_transition(&sub, &rec, &t);
        }
        Ok(())
    }

    /// Loads (creating on first sight) a subscription's record with its next due time.
    pub fn record(&self, sub: &Subscription) -> Result<Record, EngineError> {
        let now = self.now();
        let mut rec = self.db.load_or_create(&sub.name, now)?;
        if rec.next_due_at.is_none() && !rec.state.phase.in_flight() {
            rec.next_due_at = self.next_due(sub, &rec);
            if rec.next_due_at.is_some() {
                self.db.save(&rec, None, now)?;
            }
        }
        Ok(rec)
    }

    /// [`Engine::record`] for many subscriptions at once, each handed to `each` as it
    /// is read: the missing records are created in one commit and the unset due times
    /// set in another, so a start adopting a fleet does not commit once per
    /// subscription, nor hold every record in memory.
    pub fn records(
        &self,
        subs: &[Subscription],
        mut each: impl FnMut(&Record),
    ) -> Result<(), EngineError> {
        let by_name: HashMap<&str, &Subscription> =
            subs.iter().map(|s| (s.name.as_str(), s)).collect();
        let names: Vec<&str> = by_name.keys().copied().collect();
        let mut dues = vec![];
        self.db.load_or_create_many(&names, self.now(), |mut rec| {
            if rec.next_due_at.is_none() && !rec.state.phase.in_flight() {
                rec.next_due_at = by_name
                    .get(rec.name.as_str())
                    .and_then(|sub| self.next_due(sub, &rec));
                if rec.next_due_at.is_some() {
                    dues.push((rec.name.clone(), rec.next_due_at));
                }
            }
            each(&rec);
        })?;
        self.db.set_next_due(&dues)?;
        Ok(())
    }

    /// The time the engine next has something to do for `sub`, if any.
    pub fn wake_at(&self, rec: &Record) -> Option<DateTime<Utc>> {
        match rec.state.phase {
            // Both wait for an operator; a drifted one is re-checked on every pass.
            Phase::Held | Phase::Drifted => None,
            Phase::Idle => rec.next_due_at,
            Phase::Failed => match (rec.state.not_before, rec.next_due_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            _ => Some(rec.state.not_before.unwrap_or_else(|| self.now())),
        }
    }

    /// Advances one subscription as far as it can go without waiting.
    /// `trigger` starts a rotation now (forced or requested) if none is in flight.
    /// `eager` (one-shot runs) performs scheduled retries and polls now rather than
    /// waiting for their time: the operator's timer is the cadence then.
    pub async fn advance(
        &self,
        sub: &Subscription,
        trigger: Option<Trigger>,
        eager: bool,
    ) -> Result<(Outcome, Record), EngineError> {
        self.advance_until(sub, trigger, eager, &AtomicBool::new(false))
            .await
    }

    /// As [`Engine::advance`], but once `stop` is set (the daemon is shutting down) it
    /// starts no new rotation and returns at the next saved step boundary whose next
    /// action can wait, as `Waiting(phase, now)`. Two actions are never cut off: the
    /// rotate call once its intent is saved (stopping there would record a lost
    /// response that never happened) and the publish of a minted secret (every second
    /// until it is in the store is exposure).
    pub async fn advance_until(
        &self,
        sub: &Subscription,
        trigger: Option<Trigger>,
        eager: bool,
        stop: &AtomicBool,
    ) -> Result<(Outcome, Record), EngineError> {
        let mut rec = self.record(sub)?;
        let sub = &Self::working_on(sub, &rec);
        if self.is_orphan(&sub.name) && rec.state.rotation_id.is_none() {
            // Left behind by the config and at rest: nothing more to do, ever.
            return Ok((Outcome::NotDue, rec));
        }
        let mut event = match self.first_event(sub, &rec, trigger, eager, stop).await {
            Ok(event) => event,
            Err(outcome) => return Ok((outcome, rec)),
        };
        let mut run = Run {
            // The operator's answer to a drift may be to rotate to a secret rekey
            // knows: that rotation must not stop at the drift it is meant to repair.
            accept_drift: rec.state.phase == Phase::Drifted,
            eager,
            stop,
            urgent_waits: 0,
        };
        let timing = self.timing(sub);
        loop {
            let action = self.take_step(sub, &mut rec, event, &timing)?;
            if stop.load(Ordering::SeqCst) && can_wait(&action, &rec.state) {
                tracing::info!(subscription = %sub.name, state = %rec.state.phase, "stopping at a saved step; the next start continues from here");
                return Ok((Outcome::Waiting(rec.state.phase, self.now()), rec));
            }
            if let Some(detail) = self.orphaned(sub, &rec, &action) {
                event = Event::Orphaned {
                    detail,
                    now: self.now(),
                };
                continue;
            }
            event = match self.perform(sub, &rec, action, &mut run).await? {
                Ok(event) => event,
                Err(outcome) => return Ok((outcome, rec)),
            };
        }
    }

    /// The event that sets `rec` going, or the outcome when there is nothing to do:
    /// held, drifted (and not yet repaired), not due, or only a drift check due.
    async fn first_event(
        &self,
        sub: &Subscription,
        rec: &Record,
        trigger: Option<Trigger>,
        eager: bool,
        stop: &AtomicBool,
    ) -> Result<Event, Outcome> {
        let now = self.now();
        let restarted = self.first_sight(&sub.name);
        let start = |trigger| Event::Start {
            rotation_id: uuid::Uuid::new_v4().to_string(),
            trigger,
            now,
        };
        match rec.state.phase {
            Phase::Held => Err(Outcome::Held),
            // Only an operator's request rotates a drifted subscription; otherwise see
            // whether the operator has reconciled the store in the meantime.
            Phase::Drifted if trigger.is_none() && !self.take_drift_check(sub, eager) => {
                Err(Outcome::Drifted)
            }
            Phase::Drifted if trigger.is_none() => match self.drift(sub).await {
                Ok(None) => Ok(Event::DriftResolved { now }),
                Ok(Some(_)) => Err(Outcome::Drifted),
                Err(e) => {
                    tracing::warn!(subscription = %sub.name, error = %e, "cannot re-check drift");
                    Err(Outcome::Drifted)
                }
            },
            Phase::Drifted => Ok(start(trigger.unwrap_or(Trigger::Forced))),
            // In flight, or started but interrupted before the preflight finished.
            p if p.in_flight() || (p == Phase::Idle && rec.state.rotation_id.is_some()) => {
                Ok(Event::Recover {
                    now,
                    restarted,
                    eager,
                })
            }
            Phase::Idle | Phase::Failed => match self.start_trigger(rec, trigger, eager, now) {
                Some(_) if stop.load(Ordering::SeqCst) => Err(Outcome::NotDue),
                Some(trigger) => Ok(start(trigger)),
                // Not due: still look for a rotation made outside rekey, so status
                // reports drift when it happens, not at the next rotation. Costs
                // nothing for providers that show no part of their secret.
                None if rec.state.phase == Phase::Idle && self.take_drift_check(sub, eager) => {
                    match self.drift(sub).await {
                        Ok(Some(detail)) => Ok(Event::DriftDetected { detail, now }),
                        Ok(None) => Err(Outcome::Checked),
                        Err(e) => {
                            tracing::debug!(subscription = %sub.name, error = %e, "drift check skipped");
                            Err(Outcome::Checked)
                        }
                    }
                }
                None => Err(Outcome::NotDue),
            },
            _ => unreachable!("in_flight covers every other phase"),
        }
    }

    /// Why a rotation of an idle or failed `rec` starts now, if it does: asked for,
    /// due by the schedule, or (failed) its retry backoff passed.
    fn start_trigger(
        &self,
        rec: &Record,
        trigger: Option<Trigger>,
        eager: bool,
        now: DateTime<Utc>,
    ) -> Option<Trigger> {
        let due = rec.next_due_at.is_some_and(|t| t <= now);
        let retry_due = eager || rec.state.not_before.is_none_or(|t| t <= now);
        match trigger {
            Some(t) => Some(t),
            None if due && (rec.state.phase == Phase::Idle || retry_due) => Some(Trigger::Schedule),
            None if rec.state.phase == Phase::Failed && retry_due => Some(Trigger::Schedule),
            None => None,
        }
    }

    /// Feeds `event` to the state machine and persists what it returned (with its
    /// history row) before anything acts on it; returns the action to perform.
    fn take_step(
        &self,
        sub: &Subscription,
        rec: &mut Record,
        event: Event,
        timing: &rotation::Timing,
    ) -> Result<Action, EngineError> {
        let event_name = event.name();
        let step =
            rotation::apply(&rec.state, event, timing).map_err(|source| EngineError::Invalid {
                subscription: sub.name.clone(),
                source,
            })?;
        let t = self.now();
        if step.state.phase != rec.state.phase {
            rec.phase_since = t;
        }
        rec.state = step.state;
        if matches!(rec.state.phase, Phase::Idle | Phase::Failed) {
            rec.next_due_at = self.next_due(sub, rec);
        }
        // The target lives exactly as long as the rotation id.
        match (&rec.state.rotation_id, &rec.target) {
            (Some(_), None) => rec.target = Some(self.target_of(sub)),
            (None, Some(_)) => rec.target = None,
            _ => {}
        }
        if step.transition.quiet {
            // Routine (a poll without news): no fsync; a power cut only repeats it.
            self.db.save_routine(rec, t)?;
        } else {
            self.db.save(rec, Some(&step.transition), t)?;
            log_transition(sub, rec, &step.transition);
        }
        failpoint::hit(&format!("after:{event_name}"));
        Ok(step.action)
    }

    /// Performs `action` at the provider or the store; returns the event its result
    /// makes, or the outcome when the run ends here (a wait, an operator, rest).
    async fn perform(
        &self,
        sub: &Subscription,
        rec: &Record,
        action: Action,
        run: &mut Run<'_>,
    ) -> Result<Result<Event, Outcome>, EngineError> {
        let event = match action {
            Action::Preflight => match self.preflight(sub, run.accept_drift).await {
                Ok(()) => Event::PreflightPassed { now: self.now() },
                Err(Preflight::Failed(error)) => Event::PreflightFailed {
                    error,
                    now: self.now(),
                },
                Err(Preflight::Drifted(detail)) => Event::DriftDetected {
                    detail,
                    now: self.now(),
                },
            },
            Action::Rotate if !rec.state.rotate_in_flight => Event::RotateSent { now: self.now() },
            Action::Rotate => self.rotate_call(sub, rec).await,
            Action::Publish => match self.publish(sub, rec).await {
                Ok(previous) => {
                    failpoint::hit("after:publish-write");
                    Event::Published {
                        previous,
                        now: self.now(),
                    }
                }
                Err(e) => Event::PublishFailed {
                    error: e.to_string(),
                    now: self.now(),
                },
            },
            Action::Check { since } => self.check(sub, rec, since).await?,
            Action::Retire => match self.retire(sub, rec).await {
                Ok(()) => {
                    failpoint::hit("after:retire-write");
                    Event::Retired { now: self.now() }
                }
                Err(e) => Event::RetireFailed {
                    error: e.to_string(),
                    now: self.now(),
                },
            },
            Action::WaitUntil(t) if self.may_wait_here(rec, t, run) => {
                self.wait_here(sub, rec, t, run).await
            }
            Action::WaitUntil(t) => return Ok(Err(Outcome::Waiting(rec.state.phase, t))),
            Action::AwaitOperator if rec.state.phase == Phase::Drifted => {
                return Ok(Err(Outcome::Drifted));
            }
            Action::AwaitOperator => return Ok(Err(Outcome::Held)),
            Action::Rest => return Ok(Err(Outcome::Rested(rec.state.phase))),
        };
        Ok(Ok(event))
    }

    /// The provider's rotate call (its intent is saved), as the event its answer makes.
    async fn rotate_call(&self, sub: &Subscription, rec: &Record) -> Event {
        if let Err(why) = self.lease_covers_call(sub) {
            return Event::RotateRejected {
                error: why,
                now: self.now(),
            };
        }
        self.read_before_rotating(sub, rec).await;
        failpoint::hit("before:rotate-call");
        let result = match self.client(sub) {
            Ok(p) => p.rotate(&sub.id).await,
            Err(e) => Err(RotateError::NotRotated(
                provider::ProviderError::Malformed {
                    provider: sub.provider.clone(),
                    what: "rotate".into(),
                    detail: e,
                },
            )),
        };
        failpoint::hit("after:rotate-call");
        if result.is_err() {
            self.store_reads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sub.name);
        }
        match result {
            Ok(secret) => Event::RotateSucceeded {
                secret,
                now: self.now(),
            },
            Err(RotateError::NotRotated(e)) => Event::RotateRejected {
                error: e.to_string(),
                now: self.now(),
            },
            Err(RotateError::Unknown(e)) => Event::RotateOutcomeUnknown {
                error: e.to_string(),
                now: self.now(),
            },
        }
    }

    /// With a state shared by a cluster, a rotate call starts only while the lease
    /// (renewed just now) outlasts the call's timeout: the call cannot be fenced like
    /// a write, so no other instance may take over while it can still be answered.
    fn lease_covers_call(&self, sub: &Subscription) -> Result<(), String> {
        let Some(pg) = self.db.shared() else {
            return Ok(());
        };
        let timeout = (self.config().provider(&sub.provider))
            .map_or(std::time::Duration::from_secs(30), |p| p.timeout);
        let left = crate::state::off_worker(|| pg.renew_now()).map_err(|e| e.to_string())?;
        crate::state::lease::covers_call(left, timeout)
    }

    /// Reads the store's entry for `sub` before the rotate call, for [`Engine::publish`]
    /// to use. A failed read is left to the publication to repeat: it must not stop
    /// a rotation the preflight found ready.
    async fn read_before_rotating(&self, sub: &Subscription, rec: &Record) {
        let Some(rotation_id) = &rec.state.rotation_id else {
            return;
        };
        self.store_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sub.name);
        if let Ok(read) = self.store.read(&sub.vault_path).await {
            self.store_reads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sub.name.clone(), (rotation_id.clone(), read));
        }
    }

    /// The store's entry for `sub` as read before this rotation's rotate call, if this
    /// process read it (taken: a retry of the publication reads again); else read now.
    async fn read_for_publish(
        &self,
        sub: &Subscription,
        rotation_id: &str,
    ) -> Result<Option<Versioned>, StoreError> {
        let before = self
            .store_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sub.name);
        match before {
            Some((id, read)) if id == rotation_id => Ok(read),
            _ => self.store.read(&sub.vault_path).await,
        }
    }

    /// One confirmation check: redelivers what failed in the exposure window, then
    /// asks the provider for evidence since `since`.
    async fn check(
        &self,
        sub: &Subscription,
        rec: &Record,
        since: DateTime<Utc>,
    ) -> Result<Event, EngineError> {
        self.redeliver(sub, rec).await?;
        let finding = match self.client(sub) {
            Ok(p) => p.evidence(&sub.id, since).await,
            Err(e) => Err(provider::ProviderError::Malformed {
                provider: sub.provider.clone(),
                what: "confirmation".into(),
                detail: e,
            }),
        };
        Ok(match finding {
            Ok(finding) => Event::Checked {
                finding,
                store_path: rec
                    .target
                    .as_ref()
                    .map_or_else(|| sub.vault_path.clone(), |t| t.vault_path.clone()),
                now: self.now(),
            },
            Err(e) => Event::CheckFailed {
                error: e.to_string(),
                now: self.now(),
            },
        })
    }

    /// Whether a one-shot run waits for `t` itself rather than leaving the step for
    /// its next start: only while a secret is at stake ([`is_urgent`]), a few times,
    /// and never long.
    fn may_wait_here(&self, rec: &Record, t: DateTime<Utc>, run: &Run<'_>) -> bool {
        run.eager
            && run.urgent_waits < URGENT_WAITS
            && is_urgent(&rec.state)
            && !run.stop.load(Ordering::SeqCst)
            && t <= after(self.now(), URGENT_WAIT_MAX)
    }

    async fn wait_here(
        &self,
        sub: &Subscription,
        rec: &Record,
        t: DateTime<Utc>,
        run: &mut Run<'_>,
    ) -> Event {
        run.urgent_waits += 1;
        let wait = (t - self.now()).to_std().unwrap_or_default();
        tracing::info!(
            subscription = %sub.name,
            state = %rec.state.phase,
            retry_in = %humantime::format_duration(wait),
            "retrying within this run: a secret is at stake"
        );
        tokio::time::sleep(wait).await;
        Event::Recover {
            now: self.now(),
            restarted: false,
            eager: true,
        }
    }

    /// Applies an operator decision (`OperatorResume` / `OperatorRetire`) to a held
    /// subscription, then advances it.
    pub async fn operator(
        &self,
        sub: &Subscription,
        retire: bool,
    ) -> Result<(Outcome, Record), EngineError> {
        let mut rec = self.record(sub)?;
        let sub = &Self::working_on(sub, &rec);
        let timing = self.timing(sub);
        let t = self.now();
        let event = if retire {
            Event::OperatorRetire { now: t }
        } else {
            Event::OperatorResume { now: t }
        };
        let step =
            rotation::apply(&rec.state, event, &timing).map_err(|source| EngineError::Invalid {
                subscription: sub.name.clone(),
                source,
            })?;
        rec.phase_since = t;
        rec.state = step.state;
        self.db.save(&rec, Some(&step.transition), t)?;
        log_transition(sub, &rec, &step.transition);
        self.advance(sub, None, true).await
    }

    async fn preflight(&self, sub: &Subscription, accept_drift: bool) -> Result<(), Preflight> {
        self.store
            .preflight(&sub.vault_path)
            .await
            .map_err(|e| Preflight::Failed(e.to_string()))?;
        self.client(sub)
            .map_err(Preflight::Failed)?
            .preflight(&sub.id)
            .await
            .map_err(|e| Preflight::Failed(e.to_string()))?;
        if accept_drift {
            return Ok(());
        }
        match self.drift(sub).await {
            Ok(None) => Ok(()),
            Ok(Some(detail)) => Err(Preflight::Drifted(detail)),
            Err(e) => Err(Preflight::Failed(e)),
        }
    }

    /// Compares what the provider shows of its live secret (Storno: the last 8
    /// characters) with the store's `current`. `Some` explains a mismatch: someone
    /// rotated outside rekey, so receivers hold a secret that no longer verifies, and
    /// rotating now would publish the stale one as `previous` as if it were valid.
    /// The provider's characters are compared, never shown.
    pub async fn drift(&self, sub: &Subscription) -> Result<Option<String>, String> {
        let Some(tail) = self
            .client(sub)?
            .secret_hint(&sub.id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let Some(read) = self
            .store
            .read(&sub.vault_path)
            .await
            .map_err(|e| e.to_string())?
        else {
            // Nothing published yet: nothing to disagree with.
            return Ok(None);
        };
        if read.entry.current.expose_secret().ends_with(&tail) {
            return Ok(None);
        }
        Ok(Some(format!(
            "drift: the secret live at the provider does not end like `current` ({}) at `{}`; \
             it was rotated outside rekey and receivers cannot verify its deliveries. rekey \
             changed nothing. To recover, either write the live secret into `current` at `{}` \
             (rekey returns to idle on its next pass), or run `rekey run --once --force {}` to \
             rotate to a new secret that rekey publishes",
            Fingerprint::of(&read.entry.current),
            sub.vault_path,
            sub.vault_path,
            sub.name
        )))
    }

    /// Before each confirmation check: has the provider redeliver what failed in the
    /// exposure window (from the intent, just before the rotate call, to the
    /// publication), and records what was redelivered in the history. Retrying a
    /// delivery changes its status, so a later check does not send it again. A
    /// failure here is logged, not fatal: confirmation must not wait on it.
    async fn redeliver(&self, sub: &Subscription, rec: &Record) -> Result<(), EngineError> {
        let s = &rec.state;
        let (Some(from), Some(to)) = (s.intent_at, s.published_at) else {
            return Ok(());
        };
        let Some(provider) = self.provider(sub) else {
            return Ok(());
        };
        let mut rows: Vec<(&'static str, String)> = Vec::new();
        match provider.redeliver(&sub.id, from, to).await {
            Ok(r) => {
                if !r.done.is_empty() {
                    rows.push((
                        "redelivered",
                        format!(
                            "asked the provider to redeliver {} delivery(ies) that failed between the rotation and the publication: {}",
                            r.done.len(),
                            r.done.join(", ")
                        ),
                    ));
                }
                if !r.failed.is_empty() {
                    let list: Vec<String> =
                        r.failed.iter().map(|(id, e)| format!("{id} ({e})")).collect();
                    rows.push((
                        "redeliver-failed",
                        format!(
                            "the provider did not redeliver {} delivery(ies) that failed in the exposure window: {}; retry them from the provider's delivery log",
                            r.failed.len(),
                            list.join("; ")
                        ),
                    ));
                }
            }
            Err(e) => rows.push((
                "redeliver-failed",
                format!(
                    "could not redeliver what failed in the exposure window: {e}; check the provider's delivery log"
                ),
            )),
        }
        for (event, detail) in rows {
            let t = rotation::Transition::note(s.phase, event, detail);
            self.db.save(rec, Some(&t), self.now())?;
            log_transition(sub, rec, &t);
        }
        Ok(())
    }

    /// Writes `current` = the minted secret, `previous` = what the store held as
    /// `current`. Idempotent: finding this rotation already published is success.
    async fn publish(
        &self,
        sub: &Subscription,
        rec: &Record,
    ) -> Result<Option<Fingerprint>, StoreError> {
        let s = &rec.state;
        let other = |detail: &str| StoreError::Other {
            store: self.store.describe(),
            detail: detail.to_string(),
        };
        let (Some(new), Some(rotation_id)) = (&s.pending_secret, &s.rotation_id) else {
            return Err(other("no minted secret in local state to publish"));
        };
        let new_fp = Fingerprint::of(new);
        let read = self.read_for_publish(sub, rotation_id).await?;
        if let Some(v) = &read
            && v.entry.rotation_id == *rotation_id
            && Fingerprint::of(&v.entry.current) == new_fp
        {
            return Ok(v.entry.previous.as_ref().map(Fingerprint::of));
        }
        let previous = read.as_ref().map(|v| v.entry.current.clone());
        let entry = Entry {
            current: new.clone(),
            previous: previous.clone(),
            rotated_at: s.rotated_at.unwrap_or_else(|| self.now()),
            rotation_id: rotation_id.clone(),
            provider: match (self.provider(sub), &rec.target) {
                (Some(p), _) => p.kind().as_str().to_string(),
                (None, Some(t)) => t.kind.clone(),
                (None, None) => sub.provider.clone(),
            },
            subscription: sub.id.clone(),
        };
        if let Some(p) = &previous
            && p.expose_secret() == new.expose_secret()
        {
            return Err(other(
                "the store already holds the new secret as current under another rotation id",
            ));
        }
        self.store
            .write(&sub.vault_path, &entry, Expect::from_read(&read))
            .await?;
        Ok(previous.as_ref().map(Fingerprint::of))
    }

    /// Writes `current` only. Refuses if the store's `current` is not the secret this
    /// rotation published: someone else changed it, and overwriting would be worse.
    async fn retire(&self, sub: &Subscription, rec: &Record) -> Result<(), StoreError> {
        let s = &rec.state;
        let Some(read) = self.store.read(&sub.vault_path).await? else {
            return Err(StoreError::Other {
                store: self.store.describe(),
                detail: format!("`{}` is empty; nothing to retire", sub.vault_path),
            });
        };
        let current_fp = Fingerprint::of(&read.entry.current);
        if Some(&current_fp) != s.new_fingerprint.as_ref() {
            return Err(StoreError::Other {
                store: self.store.describe(),
                detail: format!(
                    "`{}` holds current={current_fp}, not this rotation's {}; refusing to retire (changed outside rekey?)",
                    sub.vault_path,
                    s.new_fingerprint
                        .as_ref()
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "?".into())
                ),
            });
        }
        // The dual version and the one before it held the old secret. Already retired
        // (`previous` gone), the dual is the version before this one: a crash between
        // the write and the destroy must not leave them. Destroying twice is harmless.
        let dual = if read.entry.previous.is_none() {
            read.version.map(|v| v.saturating_sub(1))
        } else {
            let entry = Entry {
                previous: None,
                ..read.entry.clone()
            };
            self.store
                .write(&sub.vault_path, &entry, Expect::Version(read.version))
                .await?;
            read.version
        };
        if let Some(v) = dual {
            for old in [v.saturating_sub(1), v].into_iter().filter(|x| *x > 0) {
                self.store.destroy_version(&sub.vault_path, old).await?;
            }
        }
        Ok(())
    }
}

/// What one call of [`Engine::advance_until`] carries from step to step.
struct Run<'a> {
    /// Rotating out of a drift the operator asked to repair: preflight accepts it.
    accept_drift: bool,
    /// A one-shot run (`--once`): it may wait out a short urgent retry itself.
    eager: bool,
    stop: &'a AtomicBool,
    /// How often this run has waited for an urgent retry.
    urgent_waits: u32,
}

/// A one-shot run does not leave these for its next start (which may be a day away):
/// a rotate call whose outcome is unknown (the provider may hold a secret nobody has,
/// and receivers fail until it is rotated again) and a minted secret not yet
/// published. It retries them at their backoff, at most [`URGENT_WAITS`] times and
/// never waiting longer than [`URGENT_WAIT_MAX`] at once.
fn is_urgent(s: &rotation::RotationState) -> bool {
    matches!(s.phase, Phase::Rotating | Phase::Minted)
}

const URGENT_WAITS: u32 = 4;
const URGENT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether `action` may be left for the next start when the daemon is stopping.
fn can_wait(action: &Action, state: &rotation::RotationState) -> bool {
    match action {
        Action::Rotate => !state.rotate_in_flight,
        Action::Publish => false,
        Action::Preflight | Action::Check { .. } | Action::Retire => true,
        Action::WaitUntil(_) | Action::AwaitOperator | Action::Rest => false,
    }
}

fn log_transition(sub: &Subscription, rec: &Record, t: &rotation::Transition) {
    let rotation = rec.state.rotation_id.as_deref().unwrap_or("-");
    if rec.state.last_error.is_some() && matches!(t.to, Phase::Failed | Phase::Held)
        || t.event.ends_with("failed")
        || t.event == "rotate-outcome-unknown"
    {
        tracing::warn!(subscription = %sub.name, rotation, from = %t.from, to = %t.to, event = t.event, "{}", t.detail);
    } else {
        tracing::info!(subscription = %sub.name, rotation, from = %t.from, to = %t.to, event = t.event, "{}", t.detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_listed_ids_become_vault_paths() {
        assert!(usable_id("801"));
        assert!(usable_id("0c8e5d7a-5a4f-4c33-9a43-7b8c3f0e6f11"));
        for bad in ["", ".", "..", "a/b", "a b", "{id}", "x\n"] {
            assert!(!usable_id(bad), "{bad:?}");
        }
    }

    /// An account that lists subscriptions and is never asked for anything else.
    struct Listing(Vec<&'static str>);

    #[async_trait::async_trait]
    impl Provider for Listing {
        fn kind(&self) -> crate::config::ProviderKind {
            crate::config::ProviderKind::Fintoro
        }
        async fn preflight(&self, _: &str) -> Result<(), crate::provider::ProviderError> {
            Ok(())
        }
        async fn rotate(
            &self,
            _: &str,
        ) -> Result<crate::secret::SecretString, crate::provider::RotateError> {
            unreachable!("discovery only")
        }
        async fn evidence(
            &self,
            _: &str,
            _: DateTime<Utc>,
        ) -> Result<crate::evidence::Finding, crate::provider::ProviderError> {
            Ok(crate::evidence::Finding::Nothing)
        }
        fn clock_offset(&self) -> Option<crate::skew::Offset> {
            None
        }
        async fn list(
            &self,
        ) -> Result<Vec<crate::provider::RemoteSubscription>, crate::provider::ProviderError>
        {
            Ok(self
                .0
                .iter()
                .map(|id| crate::provider::RemoteSubscription {
                    id: id.to_string(),
                    url: None,
                    active: true,
                })
                .collect())
        }
    }

    /// A config in `dir` with a file store, one Fintoro account `b`, policy `p` and
    /// one `[[subscriptions]]` entry of `b` whose other lines are `lines`.
    fn one_account_config(dir: &std::path::Path, lines: &str) -> Config {
        std::fs::write(dir.join("token"), "t").unwrap();
        let toml = format!(
            "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"published\"\n\
             [[providers]]\nname = \"b\"\nkind = \"fintoro\"\nbase_url = \"http://127.0.0.1:9\"\n\
             token_file = \"token\"\n[[policies]]\nname = \"p\"\nevery = \"30d\"\n\
             [[subscriptions]]\nprovider = \"b\"\npolicy = \"p\"\n{lines}\n"
        );
        std::fs::write(dir.join("rekey.toml"), toml).unwrap();
        Config::load_with(
            &dir.join("rekey.toml"),
            &std::collections::BTreeMap::new(),
            false,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_discovered_subscription_never_takes_a_path_another_one_holds() {
        let dir = tempfile::tempdir().unwrap();
        let config = one_account_config(dir.path(), "id = \"*\"\nvault_path = \"w/{id}\"");
        let db = Arc::new(StateDb::open(&config.state_dir).unwrap());
        // Account `a`, discovered under an earlier config, still holds `w/1`.
        db.saw_discovered("a/1", "a", "1", "w/1", Utc::now())
            .unwrap();
        let provider: Arc<dyn Provider> = Arc::new(Listing(vec!["1", "2"]));
        let store: Arc<dyn SecretStore> =
            Arc::new(crate::store::FileStore::new(dir.path().join("published")));
        let engine = Engine::with_parts(
            Arc::new(config),
            db.clone(),
            store,
            [("b".to_string(), provider)].into(),
        );
        let names: Vec<String> = engine
            .subscriptions()
            .await
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["b/2"]);
        let recorded: Vec<String> = db
            .discovered()
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(recorded, ["a/1", "b/2"]);
    }

    /// Logs each store and provider call in one sequence.
    type Log = Arc<std::sync::Mutex<Vec<&'static str>>>;

    struct LoggedStore(FileStore, Log, Arc<std::sync::Mutex<Vec<Entry>>>);

    #[async_trait::async_trait]
    impl SecretStore for LoggedStore {
        fn describe(&self) -> String {
            self.0.describe()
        }
        async fn preflight(&self, path: &str) -> Result<(), StoreError> {
            self.0.preflight(path).await
        }
        async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
            self.1.lock().unwrap().push("read");
            self.0.read(path).await
        }
        async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
            self.1.lock().unwrap().push("write");
            self.2.lock().unwrap().push(entry.clone());
            self.0.write(path, entry, expect).await
        }
    }

    struct LoggedProvider(Log);

    #[async_trait::async_trait]
    impl Provider for LoggedProvider {
        fn kind(&self) -> crate::config::ProviderKind {
            crate::config::ProviderKind::Fintoro
        }
        async fn preflight(&self, _: &str) -> Result<(), crate::provider::ProviderError> {
            Ok(())
        }
        async fn rotate(
            &self,
            _: &str,
        ) -> Result<crate::secret::SecretString, crate::provider::RotateError> {
            self.0.lock().unwrap().push("rotate");
            Ok(crate::secret::secret(format!(
                "whsec_{}",
                uuid::Uuid::new_v4()
            )))
        }
        async fn evidence(
            &self,
            _: &str,
            _: DateTime<Utc>,
        ) -> Result<crate::evidence::Finding, crate::provider::ProviderError> {
            Ok(crate::evidence::Finding::Confirmed(
                crate::evidence::Evidence::untimed("test", "a delivery succeeded".into()),
            ))
        }
        fn clock_offset(&self) -> Option<crate::skew::Offset> {
            None
        }
        async fn list(
            &self,
        ) -> Result<Vec<crate::provider::RemoteSubscription>, crate::provider::ProviderError>
        {
            Ok(vec![])
        }
    }

    /// The exposure window runs from the provider's answer to the store's: the store
    /// is read before the rotate call, so the publication is a single write, with the
    /// secret from before the rotation as `previous`.
    #[tokio::test]
    async fn the_publication_after_a_rotate_call_writes_without_reading_first() {
        let dir = tempfile::tempdir().unwrap();
        let config = one_account_config(dir.path(), "id = \"1\"\nvault_path = \"w/1\"");
        let sub = config.subscriptions[0].clone();
        let db = Arc::new(StateDb::open(&config.state_dir).unwrap());
        let log: Log = Default::default();
        let files = FileStore::new(dir.path().join("published"));
        let writes: Arc<std::sync::Mutex<Vec<Entry>>> = Default::default();
        let store: Arc<dyn SecretStore> = Arc::new(LoggedStore(files, log.clone(), writes.clone()));
        let provider: Arc<dyn Provider> = Arc::new(LoggedProvider(log.clone()));
        let engine = Engine::with_parts(
            Arc::new(config),
            db.clone(),
            store.clone(),
            [("b".to_string(), provider)].into(),
        );
        for _ in 0..2 {
            log.lock().unwrap().clear();
            let (outcome, _) = engine
                .advance(&sub, Some(Trigger::Forced), true)
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Rested(_)), "{outcome:?}");
            let calls = log.lock().unwrap().clone();
            let rotate = calls.iter().position(|c| *c == "rotate").expect("rotated");
            assert_eq!(
                calls[rotate - 1],
                "read",
                "read just before the rotate call: {calls:?}"
            );
            assert_eq!(
                calls[rotate + 1],
                "write",
                "publication right after it: {calls:?}"
            );
        }
        // The first publication (nothing to retire after it), the second, and the
        // second's retirement.
        let w = writes.lock().unwrap();
        let fp = |s: &crate::secret::SecretString| Fingerprint::of(s);
        assert_eq!(w.len(), 3);
        assert!(w[0].previous.is_none(), "nothing before the first rotation");
        assert_eq!(
            w[1].previous.as_ref().map(fp),
            Some(fp(&w[0].current)),
            "the second publication kept the first rotation's secret as previous"
        );
    }
}
