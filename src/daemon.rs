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

use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::Engine;
use crate::exit;
use crate::lock::{Role, StateLock};
use crate::scheduler::{Control, Scheduler};
use crate::state::StateDb;

/// The notifications rekey sends.
#[derive(Debug, Clone, Copy)]
pub enum Notify<'a> {
    Ready,
    /// Sent with MONOTONIC_USEC, as systemd 253+ expects for `Type=notify-reload`.
    Reloading,
    Stopping,
    Watchdog,
    Status(&'a str),
}

/// Tells systemd (when it listens) how rekey is doing. Failures are logged, not fatal:
/// a daemon started by hand has no socket to talk to.
pub fn notify(states: &[Notify<'_>]) {
    let mut out: Vec<NotifyState<'_>> = Vec::with_capacity(states.len() + 1);
    for s in states {
        match s {
            Notify::Ready => out.push(NotifyState::Ready),
            Notify::Reloading => {
                out.push(NotifyState::Reloading);
                if let Ok(m) = NotifyState::monotonic_usec_now() {
                    out.push(m);
                }
            }
            Notify::Stopping => out.push(NotifyState::Stopping),
            Notify::Watchdog => out.push(NotifyState::Watchdog),
            Notify::Status(s) => out.push(NotifyState::Status(s)),
        }
    }
    if let Err(e) = sd_notify::notify(&out) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The signals rekey handles. Installed before the state directory is locked, so the
/// holder of the lock, daemon or not, is never killed by a SIGUSR1 or SIGHUP, and
/// SIGTERM/SIGINT always drain to a saved step.
pub struct Signals {
    pub hup: Signal,
    pub usr1: Signal,
    pub term: Signal,
    pub int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Runs the daemon until SIGTERM/SIGINT; returns the exit code.
pub async fn run(
    path: &Path,
    engine: Arc<Engine>,
    db: Arc<StateDb>,
    force: Vec<String>,
    signals: Signals,
    lock: &StateLock,
) -> u8 {
    let Signals {
        mut hup,
        mut usr1,
        mut term,
        mut int,
    } = signals;
    tracing::info!(
        pid = std::process::id(),
        config = %path.display(),
        subscriptions = engine.config().subscriptions.len(),
        "rekey daemon starting"
    );
    let mut sched = Scheduler::new(engine.clone(), &force);
    if let Some(addr) = engine.config().metrics_listen {
        let listener = match crate::metrics::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot listen for metrics ([metrics] listen)");
                return exit::SOFTWARE;
            }
        };
        tracing::info!(address = %addr, "serving /metrics and /healthz");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
        sched = sched.with_metrics(metrics);
    }
    let (tx, rx) = mpsc::channel(16);
    let mut current = engine.config().clone();
    let mut scheduler = tokio::spawn(sched.run(rx));
    let mut stopping = false;
    loop {
        tokio::select! {
            joined = &mut scheduler => {
                return match joined {
                    Ok(()) => exit::OK,
                    Err(e) => {
                        tracing::error!(error = %e, "the scheduler failed");
                        exit::SOFTWARE
                    }
                };
            }
            _ = hup.recv(), if !stopping => {
                if let Some(config) = reload(path, &current, &db, &tx).await {
                    current = config;
                }
            }
            _ = usr1.recv(), if !stopping => {
                let _ = tx.send(Control::Wake).await;
            }
            _ = term.recv() => {
                tracing::info!(signal = "SIGTERM", "stop requested");
                stopping = true;
                leaving(lock);
                let _ = tx.send(Control::Stop).await;
            }
            _ = int.recv() => {
                tracing::info!(signal = "SIGINT", "stop requested");
                stopping = true;
                leaving(lock);
                let _ = tx.send(Control::Stop).await;
            }
        }
    }
}

/// Tells `rekey rotate|resume|retire` that this process takes no more requests, so
/// they say the next start does instead of waking it.
pub fn leaving(lock: &StateLock) {
    if let Err(e) = lock.set_role(Role::Exiting) {
        tracing::warn!(error = %e, "cannot mark the lock file as exiting");
    }
}

/// Loads and validates the config at `path` and builds its engine; hands it to the
/// scheduler only if all of that worked. Returns the new config when it was applied.
async fn reload(
    path: &Path,
    current: &Config,
    db: &Arc<StateDb>,
    tx: &mpsc::Sender<Control>,
) -> Option<Config> {
    notify(&[Notify::Reloading]);
    tracing::info!(config = %path.display(), "reloading the config (SIGHUP)");
    let refuse = |why: &str| {
        tracing::error!("reload refused, the running config stays: {why}");
        notify(&[
            Notify::Status("reload refused; running the previous config"),
            Notify::Ready,
        ]);
        None
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                tracing::error!(file = %e.file.display(), key = %p.key, "invalid config: {}", p.message);
            }
            return refuse(&e.to_string());
        }
    };
    if config.state_dir != current.state_dir {
        return refuse(&format!(
            "state_dir changed from {} to {}; restart rekey to move its state",
            current.state_dir.display(),
            config.state_dir.display()
        ));
    }
    if config.log.format != current.log.format || config.log.level != current.log.level {
        tracing::warn!("[log] settings change at the next restart, not on reload");
    }
    if config.metrics_listen != current.metrics_listen {
        tracing::warn!("[metrics] listen changes at the next restart, not on reload");
    }
    let engine = match Engine::new(Arc::new(config.clone()), db.clone()).await {
        Ok(e) => e,
        Err(e) => return refuse(&e.to_string()),
    };
    // The scheduler swaps engines and sends READY=1 once the new one is in use.
    if tx.send(Control::Reload(Arc::new(engine))).await.is_err() {
        return None;
    }
    Some(config)
}
