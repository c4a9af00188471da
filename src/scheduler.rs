//! The daemon's scheduler: the one task that decides when each subscription's next
//! step runs, and runs it.
//!
//! There is no polling tick and no timer per subscription. The scheduler keeps what it
//! needs of every managed subscription's record ([`fleet::Brief`]) and when each next
//! has something to do (a due rotation moved into its policy's window and offset by
//! its jitter, a retry backoff, a confirmation poll) in a queue ordered by time
//! ([`queue::WakeQueue`]), both updated from the record each finished step returns. A
//! wake starts what is due within the concurrency caps, re-checking each one's time as
//! it is taken (a window may have closed meanwhile), and then sleeps until the
//! earliest time left, a finished step, or a control message (SIGUSR1, SIGHUP, SIGTERM
//! from [`crate::daemon`]). A wake costs O(log N) and reads nothing from the database;
//! the records are read once at start, and again only for a reload, a discovery
//! listing or SIGUSR1. Because the times come from the state database, a restart or a
//! reload loses nothing.
//!
//! When a policy lets a rotation start (schedule, window, jitter, catch-up) is
//! [`crate::policy_timing`]'s to say; this file combines it with each subscription's
//! phase ([`wake_time`]) and runs the loop.

mod fleet;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::{Config, Policy, Subscription};
use crate::engine::{Engine, EngineError, Outcome};
use crate::failpoint;
use crate::metrics::Metrics;
use crate::notify::{self, Notify, notify};
use crate::policy_timing::{after, catch_up, retry_start, start_time};
use crate::rotation::{Phase, Transition, Trigger};
use crate::state::HISTORY_PAGE;
pub use fleet::Brief;
use fleet::Fleet;

/// When a subscription whose record says `rec` next needs the engine, by the daemon's
/// rules: `None` for never (held).
/// A new rotation (idle, or failed and retrying) starts only per the policy's start
/// rules; steps of a rotation in flight run at their own time. Each time agrees with
/// what [`Engine::advance`] will accept as due, or the loop would wake for nothing.
///
/// `drift_check` is when the engine next looks for a rotation made outside rekey
/// ([`Engine::drift_check_at`]): an idle subscription wakes for it as well as for its
/// rotation, and a drifted one only for it, so a drift is re-checked at that pace and
/// never in a loop.
pub fn wake_time(
    policy: &Policy,
    name: &str,
    rec: &Brief,
    now: DateTime<Utc>,
    drift_check: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let earliest = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match rec.phase {
        Phase::Held => None,
        Phase::Drifted => drift_check.map(|t| t.max(now)),
        Phase::Idle if !rec.rotating => earliest(
            rec.next_due_at
                .map(|due| start_time(&policy.start, name, due, now)),
            drift_check.map(|t| t.max(now)),
        ),
        Phase::Idle => Some(now),
        // After a failure the engine retries only once the backoff has passed, even
        // if the schedule says the rotation is (over)due.
        Phase::Failed => rec
            .not_before
            .or(rec.next_due_at)
            .map(|t| retry_start(&policy.start, t, now)),
        _ => Some(rec.not_before.unwrap_or(now).max(now)),
    }
}

/// When a rotation left behind by the config ([`Engine::orphans`]) next needs the
/// engine: only the steps of the rotation under way, never a new one.
pub fn orphan_wake_time(rec: &Brief, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match rec.phase {
        _ if !rec.rotating => None,
        Phase::Held | Phase::Drifted => None,
        _ => Some(rec.not_before.unwrap_or(now).max(now)),
    }
}

// ---------------------------------------------------------------------------------
// The loop.

/// What the daemon shell tells the scheduler.
pub enum Control {
    /// SIGUSR1: take manual requests and operator decisions, run anything due.
    Wake,
    /// SIGHUP, after the new config validated and its engine was built.
    Reload(Arc<Engine>),
    /// SIGHUP with a config that did not validate: the running one stays, and the
    /// STATUS= line says so until a reload succeeds.
    ReloadRefused,
    /// SIGTERM/SIGINT: stop starting steps and drain. A second one stops waiting.
    Stop,
    /// The cluster's lease is lost: drain as for `Stop`, but the process stays (a
    /// standby), so systemd is not told it stops.
    StepDown,
}

/// Why a subscription is being advanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Due,
    Start(Trigger),
    Operator { retire: bool },
}

struct Done {
    name: String,
    job: Job,
    result: Result<(Outcome, crate::state::Record), EngineError>,
}

/// Re-evaluate at least this often even if nothing is due: a wall-clock jump (NTP
/// step, suspend) must not strand a rotation behind a monotonic sleep.
const MAX_SLEEP: Duration = Duration::from_secs(15 * 60);

pub struct Scheduler {
    engine: Arc<Engine>,
    started_at: DateTime<Utc>,
    /// Subscription → provider, for each subscription a task is advancing. Its own
    /// count (instead of semaphores) survives a reload that changes the caps.
    running: HashMap<String, String>,
    /// Requests waiting for a free slot (or for their subscription's task to end).
    pending: BTreeMap<String, Job>,
    tasks: JoinSet<Done>,
    /// Task → subscription, so a task that panicked still frees its subscription.
    task_names: HashMap<tokio::task::Id, String>,
    /// Set on SIGTERM: tasks stop at the next saved step boundary.
    stop: Arc<AtomicBool>,
    watchdog: Option<Duration>,
    /// The STATUS= text sent last. The scheduler is the only sender of STATUS=, so
    /// this is what systemd shows.
    last_status: String,
    /// A reload was refused since the config in use was loaded.
    reload_refused: bool,
    metrics: Option<Arc<Metrics>>,
    /// The last history row the metrics counted.
    counted_seq: i64,
    /// Subscriptions the engine found not due although [`wake_time`] said they were,
    /// held back until then so a disagreement cannot spin the loop.
    cooldown: HashMap<String, DateTime<Utc>>,
    /// Consecutive failed steps (engine errors, panics) per subscription, for the
    /// growing cooldown after each: a fault that persists (a full disk, a bug) must not
    /// spin the loop, and one that clears is retried soon.
    failures: HashMap<String, u32>,
    /// The operator's asks read from the database whose job is pending or running,
    /// by subscription (removed from the database once it ran).
    asks: HashMap<String, Vec<crate::state::PendingAsk>>,
    /// The subscriptions managed now (the configured ones plus those discovery found
    /// with `id = "*"`, refreshed every [`DISCOVERY_INTERVAL`] and on SIGUSR1 or
    /// reload), what their records say, and when each next wakes.
    fleet: Fleet,
    /// When the providers were last listed for discovery.
    listed_at: Option<DateTime<Utc>>,
}

/// How often the daemon lists providers for `id = "*"` entries.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(300);

/// How long a subscription the engine refused as not due waits before the next try.
const COOLDOWN: Duration = Duration::from_secs(60);

/// The first wait after a failed step (an engine error, a panic), doubling with each
/// failure in a row: short, because most such faults pass (a database restarting, a
/// disk briefly full), and growing, so one that persists never spins the loop.
const FIRST_FAILURE_COOLDOWN: Duration = Duration::from_secs(5);

/// The longest wait between retries of a step that keeps failing.
const MAX_FAILURE_COOLDOWN: Duration = Duration::from_secs(15 * 60);

/// The wait after the `n`th failed step in a row (n ≥ 1).
fn failure_cooldown(n: u32) -> Duration {
    FIRST_FAILURE_COOLDOWN
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(MAX_FAILURE_COOLDOWN)
}

impl Scheduler {
    /// `force`: subscriptions to rotate now (`rekey run --force` without `--once`).
    pub fn new(engine: Arc<Engine>, force: &[String]) -> Scheduler {
        let started_at = engine.now();
        Scheduler {
            engine,
            started_at,
            running: HashMap::new(),
            pending: force
                .iter()
                .map(|f| (f.clone(), Job::Start(Trigger::Forced)))
                .collect(),
            tasks: JoinSet::new(),
            task_names: HashMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
            watchdog: notify::watchdog_interval(),
            last_status: String::new(),
            reload_refused: false,
            metrics: None,
            counted_seq: 0,
            cooldown: HashMap::new(),
            failures: HashMap::new(),
            asks: HashMap::new(),
            fleet: Fleet::default(),
            listed_at: None,
        }
    }

    /// Refreshes the managed subscriptions: the configured ones at once; discovered
    /// ones by listing the providers, when due (or `now_please`).
    ///
    /// Rotations under way whose subscription left the config are added too
    /// ([`Engine::orphans`]), so each is advanced until it rests.
    async fn refresh_subscriptions(&mut self, now_please: bool) {
        let config = self.engine.config();
        let now = self.engine.now();
        let mut subs = if config.discoveries.is_empty() {
            // The configured list changes only with the config (a reload asks).
            if !now_please && self.listed_at.is_some() {
                return;
            }
            config.subscriptions.clone()
        } else {
            let due = self.listed_at.is_none_or(|t| {
                now - t >= chrono::Duration::from_std(DISCOVERY_INTERVAL).unwrap_or_default()
            });
            if !(due || now_please) {
                return;
            }
            self.engine.subscriptions().await
        };
        self.listed_at = Some(now);
        let orphans = self.engine.orphans(&subs);
        for o in &orphans {
            tracing::warn!(subscription = %o.name, vault_path = %o.vault_path, "rotation under way for a subscription no longer in the config; finishing it");
        }
        subs.extend(orphans);
        self.engine.set_account_sizes(&subs);
        self.manage(subs);
    }

    /// Makes `subs` the managed subscriptions: reads the records of those new to the
    /// fleet (creating what is missing in one commit), drops those that left, and
    /// works out again when each wakes (the engine, so the policies, may be new).
    fn manage(&mut self, subs: Vec<Subscription>) {
        let (gone, unread) = self.fleet.replace(subs);
        if let Some(m) = &self.metrics {
            for name in &gone {
                m.forget_subscription(name);
            }
        }
        let engine = self.engine.clone();
        if let Err(e) = engine.records(&unread, |rec| self.note(&rec.name, Brief::of(rec))) {
            tracing::error!(error = %e, "cannot read state");
        }
        let names: Vec<String> = self.fleet.subs().iter().map(|s| s.name.clone()).collect();
        for name in &names {
            self.requeue(name);
        }
    }

    /// Takes in what `name`'s record says now: counts, gauges, wake time.
    fn note(&mut self, name: &str, brief: Brief) {
        if !self.fleet.note(name, brief) {
            return;
        }
        if let Some(m) = &self.metrics {
            m.set_subscription(name, brief.next_due_at, brief.last_rotated_at);
        }
        self.requeue(name);
    }

    /// Puts `name` in the queue at its wake time (or out of it, while a task runs it
    /// or when it has nothing to wait for).
    fn requeue(&mut self, name: &str) {
        let (Some(sub), false) = (self.fleet.get(name), self.running.contains_key(name)) else {
            self.fleet.queue.remove(name);
            return;
        };
        let at = self.wake_of(sub, self.engine.now());
        let provider = sub.provider.clone();
        self.fleet.queue.set(name, &provider, at);
    }

    /// When `sub` next needs the engine, from what its record said last.
    fn wake_of(&self, sub: &Subscription, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let brief = self.fleet.brief(&sub.name)?;
        if self.engine.is_orphan(&sub.name) {
            return orphan_wake_time(brief, now);
        }
        let policy = self.engine.config().policy(&sub.policy)?;
        let drift_check = self.engine.drift_check_at(sub);
        wake_time(policy, &sub.name, brief, now, drift_check)
    }

    /// When discovery next lists the providers, if any entry uses it.
    fn next_listing(&self) -> Option<DateTime<Utc>> {
        if self.engine.config().discoveries.is_empty() {
            return None;
        }
        self.listed_at
            .map(|t| t + chrono::Duration::from_std(DISCOVERY_INTERVAL).unwrap_or_default())
    }

    /// Feeds `metrics` from now on (transitions from before are not counted).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Scheduler {
        self.counted_seq = self.engine.db().last_seq().unwrap_or(0);
        self.metrics = Some(metrics);
        self
    }

    /// Runs until told to stop, then drains. Returns when every task finished or the
    /// drain timeout passed; either way every subscription's state is a saved one.
    pub async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        self.refresh_subscriptions(true).await;
        self.catch_up_missed();
        self.take_requests();
        let mut next = self.pass();
        // Loading the config and the records was the burst of the daemon's life.
        self.engine.db().release_memory();
        crate::memory::release_freed();
        notify(&[Notify::Ready]);
        tracing::info!(subscriptions = self.fleet.len(), "scheduler ready");
        let mut stepping_down = false;
        loop {
            self.report_status(next);
            self.count_history();
            if self.watchdog.is_some() {
                notify(&[Notify::Watchdog]);
            }
            let now = self.engine.now();
            let mut sleep = next.map_or(MAX_SLEEP, |t| (t - now).to_std().unwrap_or_default());
            sleep = sleep.min(MAX_SLEEP);
            if let Some(wd) = self.watchdog {
                sleep = sleep.min(wd / 2);
            }
            if let Some(t) = next {
                tracing::debug!(until = %t.to_rfc3339(), "sleeping until the next step");
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(done);
                }
                msg = control.recv() => match msg {
                    Some(Control::Wake) => {
                        failpoint::hit(failpoint::SCHEDULER_WOKEN);
                        tracing::info!("woken (SIGUSR1): taking requests and anything due");
                        self.refresh_subscriptions(true).await;
                        self.take_requests();
                    }
                    Some(Control::Reload(engine)) => {
                        self.reload_refused = false;
                        self.reload(engine);
                        self.refresh_subscriptions(true).await;
                    }
                    Some(Control::ReloadRefused) => self.reload_refused = true,
                    Some(Control::Stop) | None => break,
                    Some(Control::StepDown) => {
                        stepping_down = true;
                        break;
                    }
                },
            }
            self.refresh_subscriptions(false).await;
            next = self.pass();
        }
        self.drain(&mut control, stepping_down).await;
    }
    async fn drain(&mut self, control: &mut mpsc::Receiver<Control>, stepping_down: bool) {
        self.stop.store(true, Ordering::SeqCst);
        if !stepping_down {
            notify(&[Notify::Stopping]);
        }
        let timeout = self.engine.config().daemon.drain_timeout;
        tracing::info!(
            in_flight = self.running.len(),
            timeout = %humantime::format_duration(timeout),
            "stopping: letting in-flight steps reach a saved state"
        );
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(done) = self.tasks.join_next_with_id() => self.finish(done),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        still_running = ?self.running.keys().collect::<Vec<_>>(),
                        "drain timeout: exiting with steps still under way; each resumes from its last saved state at the next start"
                    );
                    break;
                }
                msg = control.recv() => if matches!(msg, Some(Control::Stop | Control::StepDown)) {
                    tracing::warn!("second stop signal: exiting without waiting; every subscription resumes from its last saved state");
                    break;
                },
            }
        }
        self.tasks.abort_all();
        tracing::info!("stopped: every subscription's state is persisted");
    }

    fn config(&self) -> &Config {
        self.engine.config()
    }

    /// Applies `catch_up = "skip"` to rotations that fell due while the daemon was down.
    /// Only records whose due time was missed are read and written.
    fn catch_up_missed(&mut self) {
        let engine = self.engine.clone();
        let missed: Vec<(Subscription, DateTime<Utc>, DateTime<Utc>)> = (self.fleet.subs().iter())
            .filter_map(|sub| {
                let policy = engine.config().policy(&sub.policy)?;
                let brief = self.fleet.brief(&sub.name)?;
                if brief.phase != Phase::Idle {
                    return None;
                }
                let due = brief.next_due_at?;
                let new_due = catch_up(&policy.schedule, &policy.start, due, self.started_at)?;
                Some((sub.clone(), due, new_due))
            })
            .collect();
        for (sub, due, new_due) in missed {
            let mut rec = match engine.record(&sub) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(subscription = %sub.name, error = %e, "cannot read state");
                    continue;
                }
            };
            let detail = format!(
                "rotation due {} was missed while rekey was down; catch_up = \"skip\": next due {}",
                due.to_rfc3339(),
                new_due.to_rfc3339()
            );
            tracing::info!(subscription = %sub.name, "{detail}");
            rec.next_due_at = Some(new_due);
            let t = Transition::note(Phase::Idle, "catch-up-skipped", detail);
            if let Err(e) = engine.db().save(&rec, Some(&t), engine.now()) {
                tracing::error!(subscription = %sub.name, error = %e, "cannot save state");
                continue;
            }
            self.note(&sub.name, Brief::of(&rec));
        }
    }

    /// Puts the operator's requests and decisions waiting in the database into
    /// `pending`, each once. They stay in the database until their job has run
    /// ([`Scheduler::asks_done`]): a crash, or a failover to another instance, in
    /// between leaves them for the next one to take.
    fn take_requests(&mut self) {
        let asks = match self.engine.db().pending_asks() {
            Ok(asks) => asks,
            Err(e) => {
                tracing::error!(error = %e, "cannot read rotation requests and operator decisions");
                return;
            }
        };
        for ask in asks {
            let taken = self.asks.entry(ask.name.clone()).or_default();
            if taken.contains(&ask) {
                continue;
            }
            let job = match ask.retire {
                None => {
                    tracing::info!(subscription = %ask.name, "rotation requested");
                    Job::Start(Trigger::Requested)
                }
                Some(retire) => {
                    tracing::info!(
                        subscription = %ask.name,
                        decision = if retire { "retire" } else { "resume" },
                        "operator decision received"
                    );
                    Job::Operator { retire }
                }
            };
            self.pending.insert(ask.name.clone(), job);
            taken.push(ask);
        }
    }

    /// The job the operator asked for on `name` has run (or cannot run): its asks
    /// leave the database. One that cannot be removed is taken again later.
    fn asks_done(&mut self, name: &str) {
        let Some(asks) = self.asks.remove(name) else {
            return;
        };
        for ask in &asks {
            if let Err(e) = self.engine.db().clear_ask(ask) {
                tracing::warn!(subscription = %name, error = %e, "cannot mark the operator's ask as done; it may be acted on again");
            }
        }
    }

    fn reload(&mut self, new: Arc<Engine>) {
        let old = std::mem::replace(&mut self.engine, new);
        self.engine.adopt_seen(&old);
        self.reschedule_changed_policies(old.config());
        tracing::info!(
            subscriptions = self.config().subscriptions.len(),
            discoveries = self.config().discoveries.len(),
            "config reloaded"
        );
        // The old config and the new one's parse are freed by now.
        self.engine.db().release_memory();
        crate::memory::release_freed();
        notify(&[Notify::Ready]);
    }

    /// A changed schedule applies to the next rotation at once, not after the one the
    /// old schedule had already planned: the idle subscriptions whose policy's schedule
    /// (or `rotate_on_adopt`) changed get a new due time, all in one commit.
    fn reschedule_changed_policies(&mut self, old: &Config) {
        let old_policy: HashMap<&str, &Policy> = (old.subscriptions.iter())
            .filter_map(|s| Some((s.name.as_str(), old.policy(&s.policy)?)))
            .collect();
        let engine = self.engine.clone();
        let config = engine.config();
        let changed: Vec<(&Subscription, &Policy)> = (config.subscriptions.iter())
            .filter_map(|sub| {
                let (p_new, p_old) = (config.policy(&sub.policy)?, old_policy.get(&*sub.name)?);
                let same = p_new.schedule.describe() == p_old.schedule.describe()
                    && p_new.rotate_on_adopt == p_old.rotate_on_adopt;
                let idle = self
                    .fleet
                    .brief(&sub.name)
                    .is_none_or(|b| b.phase == Phase::Idle);
                (!same && idle).then_some((sub, p_new))
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        let db = engine.db();
        let mut dues = Vec::with_capacity(changed.len());
        let mut briefs = Vec::with_capacity(changed.len());
        for (sub, p_new) in changed {
            match db.load(&sub.name) {
                Ok(Some(mut rec)) if rec.state.phase == Phase::Idle => {
                    rec.next_due_at = p_new.schedule.next_due(
                        rec.state.last_rotated_at,
                        rec.first_seen_at,
                        p_new.rotate_on_adopt,
                    );
                    dues.push((rec.name.clone(), rec.next_due_at));
                    briefs.push((rec.name.clone(), Brief::of(&rec)));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(subscription = %sub.name, error = %e, "cannot read state")
                }
            }
        }
        if let Err(e) = db.set_next_due(&dues) {
            tracing::error!(error = %e, "cannot save the new due times");
            return;
        }
        for (name, brief) in briefs {
            self.note(&name, brief);
        }
    }

    /// Starts whatever is due (within the caps) and returns the earliest later time
    /// something will be.
    fn pass(&mut self) -> Option<DateTime<Utc>> {
        let now = self.engine.now();
        self.start_requested();
        self.start_due(now);
        [self.fleet.queue.next_after(now), self.next_listing()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Starts the requests and operator decisions waiting, as the caps allow; drops
    /// those for subscriptions not managed.
    fn start_requested(&mut self) {
        let waiting: Vec<(String, Job)> =
            self.pending.iter().map(|(n, j)| (n.clone(), *j)).collect();
        for (name, job) in waiting {
            let Some(sub) = self.fleet.get(&name).cloned() else {
                tracing::warn!(subscription = %name, "request for a subscription neither configured nor discovered; dropped");
                self.pending.remove(&name);
                self.asks_done(&name);
                continue;
            };
            // When the caps are full it stays pending; a finished task wakes the loop
            // and the next pass tries again.
            if !self.running.contains_key(&name) && self.try_spawn(&sub, job) {
                self.fleet.queue.remove(&name);
            }
        }
    }

    /// Starts the subscriptions due by `now` while there is room, from the accounts
    /// with the fewest running first. Each one's wake time is checked again as it is
    /// taken (the queue may hold a time computed before a window closed, say): one no
    /// longer due goes back in at its new time.
    fn start_due(&mut self, now: DateTime<Utc>) {
        while !self.stop.load(Ordering::SeqCst)
            && self.running.len() < self.config().daemon.max_concurrent
        {
            let Some((_, name)) = self.fleet.queue.next_due(now, |a| self.room(a)) else {
                break;
            };
            let name = name.to_string();
            let Some(sub) = self.fleet.get(&name).cloned() else {
                self.fleet.queue.remove(&name);
                continue;
            };
            let at = match self.wake_of(&sub, now) {
                Some(t) if t <= now => Some(self.cooling(&name, now).unwrap_or(t)),
                other => other,
            };
            if at.is_none_or(|t| t > now) {
                self.fleet.queue.set(&name, &sub.provider, at);
                continue;
            }
            let job = self.pending.get(&name).copied().unwrap_or(Job::Due);
            if self.try_spawn(&sub, job) {
                self.fleet.queue.remove(&name);
            } else {
                break;
            }
        }
    }

    /// How many tasks run for provider account `account`; `None` when it is at its
    /// own cap (`max_concurrent` on the provider).
    fn room(&self, account: &str) -> Option<usize> {
        let running = self.running.values().filter(|p| *p == account).count();
        let cap = self
            .config()
            .provider(account)
            .and_then(|p| p.max_concurrent);
        cap.is_none_or(|c| running < c).then_some(running)
    }

    /// Until when `name` is cooling down, if it is.
    fn cooling(&mut self, name: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.cooldown.get(name) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                self.cooldown.remove(name);
                None
            }
            None => None,
        }
    }

    fn try_spawn(&mut self, sub: &Subscription, job: Job) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        let config = self.config();
        if self.running.len() >= config.daemon.max_concurrent {
            return false;
        }
        if let Some(cap) = config
            .provider(&sub.provider)
            .and_then(|p| p.max_concurrent)
            && self
                .running
                .values()
                .filter(|p| **p == sub.provider)
                .count()
                >= cap
        {
            return false;
        }
        let name = sub.name.clone();
        self.pending.remove(&sub.name);
        self.running.insert(sub.name.clone(), sub.provider.clone());
        let engine = self.engine.clone();
        let stop = self.stop.clone();
        let sub = sub.clone();
        let handle = self.tasks.spawn(async move {
            let result = match job {
                Job::Due => engine.advance_until(&sub, None, false, &stop).await,
                Job::Start(t) => engine.advance_until(&sub, Some(t), false, &stop).await,
                Job::Operator { retire } => engine.operator(&sub, retire).await,
            };
            Done {
                name: sub.name,
                job,
                result,
            }
        });
        self.task_names.insert(handle.id(), name);
        true
    }

    fn finish(&mut self, joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>) {
        let done = match joined {
            Ok((id, done)) => {
                self.task_names.remove(&id);
                done
            }
            Err(e) => {
                // A panicked step: the saved state is intact, so the subscription is
                // simply free to be advanced again from it.
                let name = self.task_names.remove(&e.id()).unwrap_or_default();
                // Taken again at the next look, to run from the saved state.
                self.asks.remove(&name);
                let wait = self.failed(&name);
                tracing::error!(subscription = %name, error = %e, "a rotation task failed; the subscription resumes from its saved state in {}", humantime::format_duration(wait));
                self.running.remove(&name);
                self.reread(&name);
                return;
            }
        };
        self.running.remove(&done.name);
        if matches!(
            done.job,
            Job::Start(Trigger::Requested) | Job::Operator { .. }
        ) {
            self.asks_done(&done.name);
        }
        let name = &done.name;
        match done.result {
            Ok((outcome, rec)) => {
                self.failures.remove(name);
                self.log_outcome(name, done.job, &outcome, &rec);
                self.note(name, Brief::of(&rec));
            }
            Err(e) => {
                let wait = self.failed(name);
                tracing::error!(subscription = %name, error = %e, "cannot advance; retrying in {}", humantime::format_duration(wait));
                self.reread(name);
            }
        }
    }

    /// Counts a failed step of `name` and holds it back for the growing cooldown;
    /// returns how long.
    fn failed(&mut self, name: &str) -> Duration {
        let n = self.failures.entry(name.to_string()).or_default();
        *n = n.saturating_add(1);
        let wait = failure_cooldown(*n);
        self.cooldown
            .insert(name.to_string(), after(self.engine.now(), wait));
        wait
    }

    /// Takes in `name`'s record from the database, after a step that returned none.
    fn reread(&mut self, name: &str) {
        match self.engine.db().load(name) {
            Ok(Some(rec)) => self.note(name, Brief::of(&rec)),
            Ok(None) => self.requeue(name),
            Err(e) => {
                tracing::error!(subscription = %name, error = %e, "cannot read state");
                self.requeue(name);
            }
        }
    }

    fn log_outcome(&mut self, name: &str, job: Job, outcome: &Outcome, rec: &crate::state::Record) {
        match outcome {
            Outcome::NotDue => {
                if matches!(job, Job::Start(_)) && rec.state.phase.in_flight() {
                    tracing::info!(subscription = %name, state = %rec.state.phase, "already rotating; request merged");
                }
                if job == Job::Due && !self.stop.load(Ordering::SeqCst) {
                    tracing::warn!(
                        subscription = %name,
                        state = %rec.state.phase,
                        "woke for a step the engine did not find due; retrying in {}",
                        humantime::format_duration(COOLDOWN)
                    );
                    self.cooldown
                        .insert(name.to_string(), after(self.engine.now(), COOLDOWN));
                }
            }
            Outcome::Checked => {
                tracing::debug!(subscription = %name, "checked for drift; none")
            }
            Outcome::Held => tracing::warn!(
                subscription = %name,
                "held: no evidence before the deadline; see `rekey status` and `rekey history`, then `rekey resume` or `rekey retire`"
            ),
            Outcome::Drifted => tracing::warn!(
                subscription = %name,
                "drifted: rotated outside rekey; `rekey status` says how to recover"
            ),
            Outcome::Rested(p) => {
                tracing::info!(subscription = %name, state = %p, "rotation cycle complete")
            }
            Outcome::Waiting(p, t) => {
                tracing::debug!(subscription = %name, state = %p, until = %t.to_rfc3339(), "waiting")
            }
        }
    }
    /// Feeds the transitions recorded since the last call to the metrics.
    fn count_history(&mut self) {
        let Some(m) = &self.metrics else { return };
        m.beat(self.engine.now());
        // Page by page: a backlog (a burst of rotations) never sits in memory whole.
        loop {
            match self
                .engine
                .db()
                .history_after(self.counted_seq, HISTORY_PAGE)
            {
                Ok(rows) => {
                    if let Some(last) = rows.last() {
                        self.counted_seq = last.seq;
                    }
                    m.observe(&rows);
                    if rows.len() < HISTORY_PAGE {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the history for metrics");
                    return;
                }
            }
        }
    }

    /// Sends a STATUS= line to systemd when the summary changed; updates the gauges.
    /// Both come from counts kept as records change, never from reading them all.
    fn report_status(&mut self, next: Option<DateTime<Utc>>) {
        if let Some(m) = &self.metrics {
            m.set_state_counts(Phase::ALL.map(|p| (p, self.fleet.count(p))));
            m.set_clock_offsets(&self.engine.clock_offsets());
        }
        let count = |p: Phase| self.fleet.count(p);
        let confirming = count(Phase::Confirming) + count(Phase::Published);
        let n = self.fleet.len();
        let mut status = String::new();
        if self.reload_refused {
            status.push_str("reload refused; running the previous config; ");
        }
        status.push_str(&format!(
            "{n} subscription{}, {} active, {} confirming, {} held, {} failed",
            if n == 1 { "" } else { "s" },
            self.running.len(),
            confirming,
            count(Phase::Held),
            count(Phase::Failed)
        ));
        if let Some(t) = next {
            status.push_str(&format!(", next step {}", t.format("%Y-%m-%d %H:%M:%SZ")));
        }
        if status != self.last_status {
            notify(&[Notify::Status(&status)]);
            self.last_status = status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_timing::tests::{rules, utc};
    use crate::policy_timing::{Schedule, StartRules};
    use crate::rotation::Timing;

    fn policy(schedule: Schedule, start: StartRules) -> Policy {
        Policy {
            name: "p".into(),
            schedule,
            timing: Timing::default(),
            rotate_on_adopt: false,
            start,
        }
    }

    /// Counts rotate calls in progress, overall and per provider and subscription.
    #[derive(Default)]
    struct Gauge {
        now: HashMap<String, usize>,
        max: HashMap<String, usize>,
        calls: usize,
        /// The provider of each rotate call, in the order they started.
        order: Vec<String>,
        /// Preflight calls, and how many more of them panic (a bug in a step).
        preflights: usize,
        panic_preflights: usize,
    }

    impl Gauge {
        fn enter(&mut self, keys: &[String]) {
            self.calls += 1;
            self.order.push(keys[1].clone());
            for k in keys {
                let n = self.now.entry(k.clone()).or_default();
                *n += 1;
                let m = self.max.entry(k.clone()).or_default();
                *m = (*m).max(*n);
            }
        }
        fn leave(&mut self, keys: &[String]) {
            for k in keys {
                *self.now.entry(k.clone()).or_default() -= 1;
            }
        }
        fn max(&self, k: &str) -> usize {
            self.max.get(k).copied().unwrap_or(0)
        }
    }

    struct SlowProvider {
        name: String,
        gauge: Arc<std::sync::Mutex<Gauge>>,
    }

    #[async_trait::async_trait]
    impl crate::provider::Provider for SlowProvider {
        fn kind(&self) -> crate::config::ProviderKind {
            crate::config::ProviderKind::Fintoro
        }
        async fn preflight(&self, _id: &str) -> Result<(), crate::provider::ProviderError> {
            let mut g = self.gauge.lock().unwrap();
            g.preflights += 1;
            if g.panic_preflights > 0 {
                g.panic_preflights -= 1;
                drop(g);
                panic!("a step that fails every time");
            }
            Ok(())
        }
        async fn rotate(
            &self,
            id: &str,
        ) -> Result<crate::secret::SecretString, crate::provider::RotateError> {
            let keys = vec![
                "all".to_string(),
                self.name.clone(),
                format!("{}/{id}", self.name),
            ];
            self.gauge.lock().unwrap().enter(&keys);
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.gauge.lock().unwrap().leave(&keys);
            Ok(crate::secret::secret(format!(
                "whsec_{}_{id}_{}",
                self.name,
                uuid::Uuid::new_v4()
            )))
        }
        async fn evidence(
            &self,
            _id: &str,
            _since: DateTime<Utc>,
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

    /// Five subscriptions due at once, two providers: `a` capped at one rotation at a
    /// time, everything capped at two.
    fn fleet(dir: &std::path::Path) -> Config {
        fleet_with(dir, "every = \"30d\"\nrotate_on_adopt = true\n")
    }

    fn fleet_with(dir: &std::path::Path, policy: &str) -> Config {
        fleet_capped(dir, policy, "max_concurrent = 1\n")
    }

    /// [`fleet_with`], with `a_cap` as account `a`'s own settings.
    fn fleet_capped(dir: &std::path::Path, policy: &str, a_cap: &str) -> Config {
        std::fs::write(dir.join("token"), "t").unwrap();
        let mut toml = format!(
            "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"published\"\n\
             [daemon]\nmax_concurrent = 2\n\
             [[providers]]\nname = \"a\"\nkind = \"fintoro\"\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"token\"\n{a_cap}\
             [[providers]]\nname = \"b\"\nkind = \"fintoro\"\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"token\"\n\
             [[policies]]\nname = \"p\"\n",
        );
        toml.push_str(policy);
        for (p, id) in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)] {
            toml.push_str(&format!(
                "[[subscriptions]]\nprovider = \"{p}\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"w/{p}/{id}\"\n"
            ));
        }
        std::fs::write(dir.join("rekey.toml"), toml).unwrap();
        Config::load_with(
            &dir.join("rekey.toml"),
            &BTreeMap::<String, String>::new(),
            false,
        )
        .unwrap()
    }

    type Parts = (
        Arc<Engine>,
        Arc<crate::state::StateDb>,
        Arc<std::sync::Mutex<Gauge>>,
    );

    fn parts(dir: &std::path::Path, config: Arc<Config>) -> Parts {
        let db = Arc::new(crate::state::StateDb::open(&config.state_dir).unwrap());
        let gauge = Arc::new(std::sync::Mutex::new(Gauge::default()));
        let providers = ["a", "b"]
            .into_iter()
            .map(|n| {
                let p: Arc<dyn crate::provider::Provider> = Arc::new(SlowProvider {
                    name: n.into(),
                    gauge: gauge.clone(),
                });
                (n.to_string(), p)
            })
            .collect();
        let store: Arc<dyn crate::store::SecretStore> =
            Arc::new(crate::store::FileStore::new(dir.join("published")));
        let engine = Arc::new(Engine::with_parts(config, db.clone(), store, providers));
        (engine, db, gauge)
    }

    async fn until_rotations(db: &crate::state::StateDb, name: &str, n: usize) {
        for _ in 0..500 {
            let done = db
                .history(Some(name))
                .unwrap()
                .iter()
                .filter(|h| h.event == "retired")
                .count();
            if done >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} did not finish {n} rotations");
    }

    #[tokio::test]
    async fn due_rotations_run_within_the_global_and_provider_caps_one_per_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(fleet(dir.path()));
        let (engine, db, gauge) = parts(dir.path(), config.clone());
        let (tx, rx) = mpsc::channel(4);
        let sched = tokio::spawn(Scheduler::new(engine, &[]).run(rx));
        for s in &config.subscriptions {
            until_rotations(&db, &s.name, 1).await;
        }
        {
            let g = gauge.lock().unwrap();
            assert_eq!(g.calls, 5, "each due subscription rotated once");
            assert_eq!(g.max("all"), 2, "global cap reached, never passed");
            assert_eq!(g.max("a"), 1, "provider cap");
            for s in &config.subscriptions {
                assert_eq!(g.max(&s.name), 1, "one rotation of {} at a time", s.name);
            }
        }
        // Rotated: next due in 30 days. A manual request (what SIGUSR1 takes) rotates
        // again, once, however often it is asked for.
        db.add_request("a/2", chrono::Utc::now()).unwrap();
        db.add_request("a/2", chrono::Utc::now()).unwrap();
        tx.send(Control::Wake).await.unwrap();
        until_rotations(&db, "a/2", 2).await;
        tx.send(Control::Stop).await.unwrap();
        sched.await.unwrap();
        assert_eq!(gauge.lock().unwrap().calls, 6);
        let rec = db.load("a/2").unwrap().unwrap();
        assert_eq!(rec.state.phase, Phase::Idle);
        assert!(rec.next_due_at.unwrap() > chrono::Utc::now() + chrono::Duration::days(29));
    }

    /// A step that fails every time (here a panic; an engine error takes the same
    /// path) is retried after a cooldown that grows, never in a loop.
    #[tokio::test(start_paused = true)]
    async fn a_step_that_keeps_failing_is_retried_with_a_growing_cooldown_not_in_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(fleet(dir.path()));
        let (engine, db, gauge) = parts(dir.path(), config.clone());
        let clock = Arc::new(crate::clock::VirtualClock::starting_at(utc(
            "2026-11-23T00:00:00Z",
        )));
        let engine = Arc::new(Arc::into_inner(engine).unwrap().with_clock(clock));
        // Enough that a loop without a cooldown uses them up at once (and the test
        // still ends); far more than a cooldown allows in the time below.
        gauge.lock().unwrap().panic_preflights = 200;
        let (tx, rx) = mpsc::channel(4);
        let sched = tokio::spawn(Scheduler::new(engine, &[]).run(rx));
        let hour = Duration::from_secs(3600);
        tokio::time::sleep(hour + Duration::from_secs(30)).await;
        // 5 s, doubling, 15 minutes at most: attempts at 0, 5, 15, 35, 75 s, … —
        // eleven in the first hour.
        let (mut at, mut expected) = (Duration::ZERO, 0);
        while at <= hour {
            expected += 1;
            at += failure_cooldown(expected);
        }
        assert_eq!(expected, 11);
        let tries = gauge.lock().unwrap().preflights;
        let n = config.subscriptions.len();
        assert_eq!(
            tries,
            expected as usize * n,
            "attempts in the first hour, for each of {n}"
        );
        tx.send(Control::Stop).await.unwrap();
        sched.await.unwrap();
        assert_eq!(
            gauge.lock().unwrap().calls,
            0,
            "no rotate call after a failed preflight"
        );
        for s in &config.subscriptions {
            let rec = db.load(&s.name).unwrap().unwrap();
            assert_eq!(
                rec.state.phase,
                Phase::Idle,
                "{} waits to start again",
                s.name
            );
        }
        assert_eq!(failure_cooldown(1), FIRST_FAILURE_COOLDOWN);
        assert_eq!(failure_cooldown(40), MAX_FAILURE_COOLDOWN);
    }

    /// An account listed first must not take every slot: when its calls wait on its
    /// rate limit, the other accounts' slots would sit idle.
    #[tokio::test]
    async fn free_slots_go_to_the_account_with_the_fewest_running() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(fleet_capped(
            dir.path(),
            "every = \"30d\"\nrotate_on_adopt = true\n",
            "",
        ));
        let (engine, db, gauge) = parts(dir.path(), config.clone());
        let (tx, rx) = mpsc::channel(4);
        let sched = tokio::spawn(Scheduler::new(engine, &[]).run(rx));
        for s in &config.subscriptions {
            until_rotations(&db, &s.name, 1).await;
        }
        tx.send(Control::Stop).await.unwrap();
        sched.await.unwrap();
        let g = gauge.lock().unwrap();
        let mut first_two = g.order[..2].to_vec();
        first_two.sort();
        assert_eq!(
            first_two,
            ["a", "b"],
            "rotate calls in order: {:?}",
            g.order
        );
        assert_eq!(g.calls, 5);
    }

    #[tokio::test]
    async fn stopping_lets_rotate_calls_in_flight_publish_and_starts_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(fleet(dir.path()));
        let (engine, db, gauge) = parts(dir.path(), config.clone());
        let (tx, rx) = mpsc::channel(4);
        let sched = tokio::spawn(Scheduler::new(engine, &[]).run(rx));
        for _ in 0..500 {
            // Both slots (a/1 and b/1) are in their rotate calls.
            if gauge.lock().unwrap().calls == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tx.send(Control::Stop).await.unwrap();
        sched.await.unwrap();
        let calls = gauge.lock().unwrap().calls;
        assert_eq!(calls, 2, "nothing new started after the stop");
        let phases: Vec<Phase> = db
            .load_all()
            .unwrap()
            .iter()
            .map(|r| r.state.phase)
            .collect();
        // The rotated ones got their secret into the store and stopped before the
        // confirmation check; the rest never started.
        assert_eq!(
            phases.iter().filter(|p| **p == Phase::Published).count(),
            calls,
            "{phases:?}"
        );
        assert_eq!(
            phases.iter().filter(|p| **p == Phase::Idle).count(),
            5 - calls,
            "{phases:?}"
        );
        assert!(
            db.load_all()
                .unwrap()
                .iter()
                .all(|r| r.state.pending_secret.is_none())
        );
    }

    #[tokio::test]
    async fn a_rotation_missed_while_down_runs_at_start_or_moves_on_per_catch_up() {
        for (catch_up, rotates) in [("run", true), ("skip", false)] {
            let dir = tempfile::tempdir().unwrap();
            let config = Arc::new(fleet_with(
                dir.path(),
                &format!("every = \"30d\"\ncatch_up = \"{catch_up}\"\n"),
            ));
            let (engine, db, gauge) = parts(dir.path(), config);
            // a/1 was last rotated 31 days ago: due a day ago, while rekey was down.
            // (Microseconds: what the state database keeps.)
            let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
            let due = now - chrono::Duration::days(1);
            let mut rec = db
                .load_or_create("a/1", now - chrono::Duration::days(60))
                .unwrap();
            rec.state.last_rotated_at = Some(now - chrono::Duration::days(31));
            rec.next_due_at = Some(due);
            db.save(&rec, None, now).unwrap();

            let (tx, rx) = mpsc::channel(4);
            let sched = tokio::spawn(Scheduler::new(engine, &[]).run(rx));
            if rotates {
                until_rotations(&db, "a/1", 1).await;
            } else {
                for _ in 0..500 {
                    let h = db.history(Some("a/1")).unwrap();
                    if h.iter().any(|r| r.event == "catch-up-skipped") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            tx.send(Control::Stop).await.unwrap();
            sched.await.unwrap();
            let calls = gauge.lock().unwrap().calls;
            assert_eq!(calls, usize::from(rotates), "catch_up = {catch_up}");
            let rec = db.load("a/1").unwrap().unwrap();
            if !rotates {
                assert_eq!(
                    rec.next_due_at,
                    Some(due + chrono::Duration::days(30)),
                    "the next occurrence of the interval"
                );
                assert!(
                    db.history(Some("a/1"))
                        .unwrap()
                        .iter()
                        .any(|r| r.event == "catch-up-skipped"),
                    "the skip is in the history"
                );
            }
            // Never-seen subscriptions without rotate_on_adopt were not touched.
            assert_eq!(db.load("b/1").unwrap().unwrap().state.phase, Phase::Idle);
        }
    }

    #[test]
    fn a_failed_rotation_wakes_at_its_backoff_not_at_its_overdue_schedule() {
        let p = policy(
            Schedule::Every(Duration::from_secs(3600)),
            rules(Some("02:00-05:00"), 600),
        );
        let now = utc("2026-11-23T01:30:00Z"); // 02:30 CET, window open
        let mut rec = crate::state::Record {
            name: "a/1".into(),
            state: crate::rotation::RotationState::new(),
            first_seen_at: utc("2026-11-01T00:00:00Z"),
            next_due_at: Some(utc("2026-11-01T00:00:00Z")),
            phase_since: now,
            target: None,
        };
        rec.state.phase = Phase::Failed;
        rec.state.not_before = Some(utc("2026-11-23T01:35:00Z"));
        assert_eq!(
            wake_time(&p, "a/1", &Brief::of(&rec), now, None),
            Some(utc("2026-11-23T01:35:00Z")),
            "no jitter on a retry, and not the long-past due time"
        );
        // A retry that falls outside the window waits for it.
        rec.state.not_before = Some(utc("2026-11-23T05:00:00Z"));
        assert_eq!(
            wake_time(&p, "a/1", &Brief::of(&rec), now, None),
            Some(utc("2026-11-24T01:00:00Z"))
        );
        // In flight: its own time, window or not.
        rec.state.phase = Phase::Confirming;
        rec.state.not_before = Some(utc("2026-11-23T12:00:00Z"));
        assert_eq!(
            wake_time(&p, "a/1", &Brief::of(&rec), now, None),
            Some(utc("2026-11-23T12:00:00Z"))
        );
        rec.state.phase = Phase::Held;
        assert_eq!(wake_time(&p, "a/1", &Brief::of(&rec), now, None), None);
    }
}
