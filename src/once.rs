//! One-shot runs: `rekey run --once`, and `rekey rotate|resume|retire` when no daemon
//! holds the state directory. A one-shot run advances what it was asked to (for
//! `run --once`: everything due or unfinished too) and, before it exits, takes the
//! requests and decisions operators recorded meanwhile: their CLI found the state
//! directory held by a one-shot run (the lock file says so) and told the operator
//! that this run takes them.
//!
//! That promise is kept by ordering, not by signals. The run's look at the recorded
//! asks and its lock file turning `exiting` happen in one database transaction, and
//! the CLI records an ask and reads the lock file in one too: an ask is either in a
//! look this run serves, or its CLI reads `exiting` and says the next run takes it.
//! The looks repeat while operators keep asking, at most [`ROUNDS`] times.
//!
//! SIGTERM/SIGINT drain as in the daemon: nothing new starts, a step under way goes
//! on to its next saved state (at most `drain_timeout`; a second signal exits at
//! once), and an ask not served is recorded again for the next run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Subscription;
use crate::engine::{Engine, EngineError, Outcome};
use crate::exit;
use crate::lock::{StateLock, leaving};
use crate::rotation::Trigger;
use crate::signals::Signals;
use crate::state::{Asks, PRUNE_BATCH, Record, StateDb};

/// Looks at the asks recorded while the run works, after its own work: enough for an
/// operator typing commands during a pass, bounded against a script that never stops.
pub const ROUNDS: usize = 5;

/// Batches of history pruning a one-shot run does at most: a timer every few minutes
/// keeps up with any fleet, and a first run after an upgrade does not hold up the
/// rotations it was started for (the next runs take the rest).
const PRUNE_BATCHES: usize = 20;

/// What one subscription is advanced for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Whatever is due or unfinished.
    Due,
    /// Start a rotation now (`--force`, `rekey rotate`).
    Start(Trigger),
    /// `rekey resume` or `rekey retire` on a held subscription.
    Decide { retire: bool },
}

/// Runs one pass and returns the exit code. `jobs` are the subscriptions asked for by
/// name; with `everything`, every other subscription is advanced as far as it can go
/// too (`run --once`).
pub async fn run(
    engine: &Engine,
    lock: &StateLock,
    signals: Signals,
    jobs: BTreeMap<String, Job>,
    everything: bool,
) -> u8 {
    let Signals {
        mut hup,
        mut usr1,
        mut term,
        mut int,
    } = signals;
    let stop = AtomicBool::new(false);
    let pass = pass(engine, lock, jobs, everything, &stop);
    tokio::pin!(pass);
    let drain = tokio::time::sleep(std::time::Duration::MAX);
    tokio::pin!(drain);
    loop {
        let name = tokio::select! {
            code = &mut pass => return code,
            () = &mut drain => {
                tracing::warn!("drain timeout: exiting with a step still under way; it resumes from its last saved state at the next run");
                return exit::OK;
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: requests are taken from the state database before this one-shot run exits");
                continue;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP ignored: a one-shot run reads the config when it starts");
                continue;
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if stop.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                signal = name,
                "second stop signal: exiting without waiting; every subscription resumes from its last saved state"
            );
            return exit::OK;
        }
        let timeout = engine.config().daemon.drain_timeout;
        tracing::info!(signal = name, timeout = %humantime::format_duration(timeout), "stop requested: starting nothing new, letting the step under way reach a saved state");
        leaving(lock);
        drain.as_mut().reset(tokio::time::Instant::now() + timeout);
    }
}

/// The pass itself: the jobs asked for (and, with `everything`, every subscription),
/// then the asks recorded meanwhile.
async fn pass(
    engine: &Engine,
    lock: &StateLock,
    mut jobs: BTreeMap<String, Job>,
    everything: bool,
    stop: &AtomicBool,
) -> u8 {
    let mut subs = engine.subscriptions().await;
    if everything {
        // A rotation whose subscription left the config is finished too.
        let orphans = engine.orphans(&subs);
        subs.extend(orphans);
    }
    let by_name: HashMap<&str, &Subscription> = subs.iter().map(|s| (s.name.as_str(), s)).collect();
    // Asks recorded before this run took the lock (or while it started) join its work.
    if let Some(asks) = take(engine.db(), |_| {}) {
        merge(&mut jobs, asks);
    }
    let mut work: Vec<(&Subscription, Job)> = vec![];
    if everything {
        for sub in &subs {
            work.push((sub, jobs.remove(&sub.name).unwrap_or(Job::Due)));
        }
    }
    let unknown = resolve(&by_name, jobs, &mut work);
    let served = serve(engine, work, stop).await;
    let meanwhile = asked_meanwhile(engine, lock, &by_name, stop).await;
    unknown.max(served).max(meanwhile)
}

/// Serves the asks recorded while this run worked, looking again after each round.
/// The look that finds none, or the last one allowed, marks the lock file `exiting`
/// in the same transaction: from then on the CLI says the next run takes an ask.
async fn asked_meanwhile(
    engine: &Engine,
    lock: &StateLock,
    by_name: &HashMap<&str, &Subscription>,
    stop: &AtomicBool,
) -> u8 {
    let mut code = exit::OK;
    for round in 1..=ROUNDS {
        // A stopping run has marked itself exiting already.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let last = round == ROUNDS;
        let Some(asks) = take(engine.db(), |found| {
            if found.is_empty() || last {
                leaving(lock);
            }
        }) else {
            leaving(lock);
            break;
        };
        if asks.is_empty() {
            break;
        }
        let mut jobs = BTreeMap::new();
        merge(&mut jobs, asks);
        let mut work = vec![];
        code = code.max(resolve(by_name, jobs, &mut work));
        code = code.max(serve(engine, work, stop).await);
    }
    code
}

/// Takes the recorded asks; `then` runs in the same transaction. `None` (logged) when
/// the database cannot be read: the asks stay recorded for the next run.
fn take(db: &StateDb, then: impl FnOnce(&Asks)) -> Option<Asks> {
    match db.take_asks(then) {
        Ok(asks) => Some(asks),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the recorded requests; they stay for the next run");
            None
        }
    }
}

/// Adds taken asks to `jobs`, one job per subscription: a decision wins over a
/// request (a held subscription cannot start a rotation anyway), as in the daemon.
fn merge(jobs: &mut BTreeMap<String, Job>, asks: Asks) {
    for n in asks.rotate {
        tracing::info!(subscription = %n, "rotation requested");
        jobs.insert(n, Job::Start(Trigger::Requested));
    }
    for (n, retire) in asks.decide {
        tracing::info!(
            subscription = %n,
            decision = if retire { "retire" } else { "resume" },
            "operator decision received"
        );
        jobs.insert(n, Job::Decide { retire });
    }
}

/// Appends each job whose subscription is managed to `work`; returns the exit code
/// for those that are not.
fn resolve<'a>(
    by_name: &HashMap<&str, &'a Subscription>,
    jobs: BTreeMap<String, Job>,
    work: &mut Vec<(&'a Subscription, Job)>,
) -> u8 {
    let mut code = exit::OK;
    for (name, job) in jobs {
        match by_name.get(name.as_str()) {
            Some(sub) => work.push((sub, job)),
            None => {
                tracing::error!(subscription = %name, "neither configured nor listed by its provider; not advanced");
                code = exit::FAILED;
            }
        }
    }
    code
}

/// Advances each subscription in turn; once stopping, leaves the rest (and records
/// again the asks it cannot serve).
async fn serve(engine: &Engine, work: Vec<(&Subscription, Job)>, stop: &AtomicBool) -> u8 {
    let mut code = exit::OK;
    for (sub, job) in work {
        if stop.load(Ordering::SeqCst) {
            leave(engine, sub, job);
            continue;
        }
        let result = match job {
            Job::Due => engine.advance_until(sub, None, true, stop).await,
            Job::Start(t) => engine.advance_until(sub, Some(t), true, stop).await,
            Job::Decide { retire } => engine.operator(sub, retire).await,
        };
        // A stop that came first refused to start the rotation.
        if stop.load(Ordering::SeqCst)
            && matches!(&result, Ok((Outcome::NotDue, rec)) if !rec.state.phase.in_flight())
        {
            leave(engine, sub, job);
        }
        code = code.max(report(sub, result));
    }
    code
}

/// Records again, for the next run, an ask this stopping run cannot serve.
fn leave(engine: &Engine, sub: &Subscription, job: Job) {
    let db = engine.db();
    let now = engine.now();
    let saved = match job {
        Job::Due => return,
        Job::Start(Trigger::Requested) => db.add_request(&sub.name, now),
        Job::Start(_) => {
            tracing::warn!(subscription = %sub.name, "stopping: not rotated; run the command again");
            return;
        }
        Job::Decide { retire } => db.add_decision(&sub.name, retire, now),
    };
    match saved {
        Ok(()) => {
            tracing::info!(subscription = %sub.name, "stopping: the operator's request is left for the next run")
        }
        Err(e) => {
            tracing::error!(subscription = %sub.name, error = %e, "stopping: cannot keep the operator's request; ask again")
        }
    }
}

/// Logs where one subscription got to; returns its exit code.
fn report(sub: &Subscription, result: Result<(Outcome, Record), EngineError>) -> u8 {
    let (outcome, rec) = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(subscription = %sub.name, error = %e, "cannot advance");
            return exit::FAILED;
        }
    };
    match &outcome {
        Outcome::NotDue | Outcome::Checked => {}
        Outcome::Drifted => tracing::warn!(
            subscription = %sub.name,
            "drifted: rotated outside rekey; `rekey status` says how to recover"
        ),
        Outcome::Held => tracing::warn!(
            subscription = %sub.name,
            "held: no evidence before the deadline; see `rekey status` and `rekey history`"
        ),
        Outcome::Rested(p) => {
            tracing::info!(subscription = %sub.name, state = %p, "pass complete")
        }
        Outcome::Waiting(p, t) => tracing::info!(
            subscription = %sub.name,
            state = %p,
            until = %t.to_rfc3339(),
            "waiting; a later run continues"
        ),
    }
    if outcome.is_problem(&rec) {
        exit::FAILED
    } else {
        exit::OK
    }
}

/// Deletes history rows older than `[state] history_retention`, a bounded amount
/// (see [`PRUNE_BATCHES`]). A failure is logged, never fatal: the next run retries.
pub fn prune_history(engine: &Engine) {
    let keep = engine.config().state.history_retention;
    let Some(before) = chrono::Duration::from_std(keep)
        .ok()
        .and_then(|d| engine.now().checked_sub_signed(d))
    else {
        return;
    };
    let mut pruned = 0;
    for _ in 0..PRUNE_BATCHES {
        match engine.db().prune_history(before, PRUNE_BATCH) {
            Ok(n) => {
                pruned += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune the history; the next run tries again");
                break;
            }
        }
    }
    if pruned > 0 {
        tracing::info!(
            rows = pruned,
            before = %before.to_rfc3339(),
            "history pruned: rows older than [state] history_retention deleted"
        );
    }
}
