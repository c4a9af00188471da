//! The daemon shell around the [`crate::scheduler`]: Unix signals and systemd.
//!
//! SIGHUP reloads the config (validated, and its Vault and provider clients built,
//! before anything is swapped: a bad config leaves the running one in place), SIGUSR1
//! wakes the scheduler to take manual requests, SIGTERM/SIGINT drain. systemd hears
//! about each through sd-notify (READY, RELOADING with MONOTONIC_USEC, STOPPING, STATUS;
//! WATCHDOG comes from the scheduler loop itself, so a stuck scheduler is restarted).
//! Without `NOTIFY_SOCKET` every notification is a no-op.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::config::Config;
use crate::engine::Engine;
use crate::exit;
use crate::lock::{StateLock, leaving};
use crate::metrics;
use crate::notify::{Notify, notify};
use crate::scheduler::{Control, Scheduler};
use crate::signals::Signals;
use crate::state::{PRUNE_BATCH, StateDb};

pub mod lead;

pub use lead::holder_name;

/// Runs the daemon until SIGTERM/SIGINT; returns the exit code. With a state shared
/// in PostgreSQL, it acts only while it leads the cluster, standing by before and
/// after (see [`lead`]).
pub async fn run(
    path: &Path,
    engine: Arc<Engine>,
    db: Arc<StateDb>,
    force: Vec<String>,
    signals: Signals,
    lock: &StateLock,
) -> u8 {
    let mut signals = signals;
    tracing::info!(
        pid = std::process::id(),
        config = %path.display(),
        subscriptions = engine.config().subscriptions.len(),
        "rekey daemon starting"
    );
    let metrics = match serve_metrics(&engine).await {
        Ok(m) => m,
        Err(code) => return code,
    };
    let holder = lead::holder_name();
    let (mut engine, mut force) = (engine, force);
    loop {
        if db.shared().is_some() {
            let Signals { term, int, .. } = &mut signals;
            let stop = async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            };
            if lead::await_lease(&db, &holder, stop, metrics.as_deref())
                .await
                .is_none()
            {
                return exit::OK;
            }
        }
        let ctx = Acting {
            path,
            db: &db,
            lock,
            metrics: metrics.clone(),
            holder: &holder,
        };
        match ctx.act(engine, &force, &mut signals).await {
            Acted::Stopped(code) => {
                lead::release(&db).await;
                return code;
            }
            Acted::Deposed(last) => {
                tracing::warn!("standing by: another instance took over the cluster");
                if let Some(m) = &metrics {
                    m.set_leadership(None);
                }
                (engine, force) = (last, vec![]);
            }
        }
    }
}

/// Binds and serves `/metrics` and `/healthz` when `[metrics] listen` is set.
async fn serve_metrics(engine: &Engine) -> Result<Option<Arc<metrics::Metrics>>, u8> {
    let Some(addr) = engine.config().metrics_listen else {
        return Ok(None);
    };
    let listener = match metrics::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %addr, error = %e, "cannot listen for metrics ([metrics] listen)");
            return Err(exit::SOFTWARE);
        }
    };
    tracing::info!(address = %addr, "serving /metrics and /healthz");
    let metrics = Arc::new(metrics::Metrics::new());
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    Ok(Some(metrics))
}

/// What one spell of acting needs besides its engine.
struct Acting<'a> {
    path: &'a Path,
    db: &'a Arc<StateDb>,
    lock: &'a StateLock,
    metrics: Option<Arc<metrics::Metrics>>,
    holder: &'a str,
}

/// How a spell of acting ended.
enum Acted {
    /// SIGTERM/SIGINT, or the scheduler's end: the process exits with this code.
    Stopped(u8),
    /// The cluster's lease was lost; the engine last in use, for the next spell.
    Deposed(Arc<Engine>),
}

impl Acting<'_> {
    /// Runs the scheduler until a stop signal or, with a shared state, the loss of
    /// the lease (then it drains without telling systemd it stops).
    async fn act(&self, engine: Arc<Engine>, force: &[String], signals: &mut Signals) -> Acted {
        let Signals {
            hup,
            usr1,
            term,
            int,
        } = signals;
        let mut sched = Scheduler::new(engine.clone(), force);
        if let Some(m) = &self.metrics {
            sched = sched.with_metrics(m.clone());
        }
        let (tx, rx) = mpsc::channel(16);
        let mut current = engine.config().clone();
        let mut engine = engine;
        let (retention, retention_rx) = watch::channel(current.state.history_retention);
        let _pruner = AbortOnDrop(
            tokio::spawn(prune_history(
                self.db.clone(),
                engine.clock().clone(),
                retention_rx,
            ))
            .abort_handle(),
        );
        let mut scheduler = tokio::spawn(sched.run(rx));
        let mut lease = tokio::spawn(lead::keep_lease(
            self.db.clone(),
            self.holder.to_string(),
            tx.clone(),
        ));
        let _lease = AbortOnDrop(lease.abort_handle());
        let (mut stopping, mut deposed) = (false, false);
        loop {
            tokio::select! {
                joined = &mut scheduler => {
                    // A stop asked for while stepping down is still a stop.
                    if deposed && !stopping {
                        return Acted::Deposed(engine);
                    }
                    return Acted::Stopped(match joined {
                        Ok(()) => exit::OK,
                        Err(e) => {
                            tracing::error!(error = %e, "the scheduler failed");
                            exit::SOFTWARE
                        }
                    });
                }
                _ = &mut lease, if !deposed && !stopping => {
                    let refused = self.db.shared().map_or(0, |pg| pg.keeper().refused_writes());
                    tracing::error!(refused_writes = refused, "the cluster lease is lost: this instance stops acting (its writes are refused) and drains");
                    deposed = true;
                    let _ = tx.send(Control::StepDown).await;
                }
                _ = hup.recv(), if !stopping && !deposed => {
                    if let Some((config, new)) = reload(self.path, &current, self.db, &tx).await {
                        retention.send_replace(config.state.history_retention);
                        (current, engine) = (config, new);
                    }
                }
                _ = usr1.recv(), if !stopping => {
                    let _ = tx.send(Control::Wake).await;
                }
                _ = term.recv() => {
                    tracing::info!(signal = "SIGTERM", "stop requested");
                    stopping = true;
                    leaving(self.lock);
                    let _ = tx.send(Control::Stop).await;
                }
                _ = int.recv() => {
                    tracing::info!(signal = "SIGINT", "stop requested");
                    stopping = true;
                    leaving(self.lock);
                    let _ = tx.send(Control::Stop).await;
                }
            }
        }
    }
}

/// Loads and validates the config at `path` and builds its engine; hands it to the
/// scheduler only if all of that worked. Returns the new config and engine when they
/// were applied.
async fn reload(
    path: &Path,
    current: &Config,
    db: &Arc<StateDb>,
    tx: &mpsc::Sender<Control>,
) -> Option<(Config, Arc<Engine>)> {
    notify(&[Notify::Reloading]);
    tracing::info!(config = %path.display(), "reloading the config (SIGHUP)");
    // The scheduler owns STATUS= (it would not know to replace a line sent from here).
    let refuse = async |why: &str| {
        tracing::error!("reload refused, the running config stays: {why}");
        let _ = tx.send(Control::ReloadRefused).await;
        notify(&[Notify::Ready]);
        None
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                tracing::error!(file = %e.file.display(), key = %p.key, "invalid config: {}", p.message);
            }
            return refuse(&e.to_string()).await;
        }
    };
    if config.state_dir != current.state_dir {
        return refuse(&format!(
            "state_dir changed from {} to {}; restart rekey to move its state",
            current.state_dir.display(),
            config.state_dir.display()
        ))
        .await;
    }
    let shared =
        |c: &Config| (c.state.postgres.as_ref()).map(|pg| (pg.url.clone(), pg.cluster.clone()));
    if shared(&config) != shared(current) {
        return refuse("[state] url or cluster changed; restart rekey to move its state").await;
    }
    if config.log.format != current.log.format || config.log.level != current.log.level {
        tracing::warn!("[log] settings change at the next restart, not on reload");
    }
    if config.metrics_listen != current.metrics_listen {
        tracing::warn!("[metrics] listen changes at the next restart, not on reload");
    }
    let engine = match Engine::new(Arc::new(config.clone()), db.clone()).await {
        Ok(e) => Arc::new(e),
        Err(e) => return refuse(&e.to_string()).await,
    };
    // The scheduler swaps engines and sends READY=1 once the new one is in use.
    if tx.send(Control::Reload(engine.clone())).await.is_err() {
        return None;
    }
    Some((config, engine))
}

/// How often the daemon prunes the history; it also does when it starts and when a
/// reload changes `[state] history_retention`.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The pause between batches, so a large backlog (a first start after an upgrade)
/// leaves the database to the rotations in between.
const PRUNE_PAUSE: Duration = Duration::from_millis(50);

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes history rows older than the retention, at start and then every
/// [`PRUNE_INTERVAL`], until the daemon stops.
async fn prune_history(
    db: Arc<StateDb>,
    clock: Arc<dyn Clock>,
    mut retention: watch::Receiver<Duration>,
) {
    loop {
        let keep = *retention.borrow_and_update();
        let before = chrono::Duration::from_std(keep)
            .ok()
            .and_then(|d| clock.now().checked_sub_signed(d));
        if let Some(before) = before {
            prune_before(&db, before).await;
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
            changed = retention.changed() => if changed.is_err() { return },
        }
    }
}

/// One round: batches until nothing older than `before` is left. A failed batch ends
/// the round; the next round, an interval later, tries again.
async fn prune_before(db: &Arc<StateDb>, before: DateTime<Utc>) {
    let mut pruned = 0;
    loop {
        let batch_db = db.clone();
        let result =
            tokio::task::spawn_blocking(move || batch_db.prune_history(before, PRUNE_BATCH)).await;
        match result {
            Ok(Ok(n)) => {
                pruned += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot prune the history; trying again in an hour");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "history pruning stopped; trying again in an hour");
                break;
            }
        }
        tokio::time::sleep(PRUNE_PAUSE).await;
    }
    if pruned > 0 {
        tracing::info!(
            rows = pruned,
            before = %before.to_rfc3339(),
            "history pruned: rows older than [state] history_retention deleted"
        );
    }
}
