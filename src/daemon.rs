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

use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::Engine;
use crate::exit;
use crate::lock::{StateLock, leaving};
use crate::metrics;
use crate::notify::{Notify, notify};
use crate::scheduler::{Control, Scheduler};
use crate::signals::Signals;
use crate::state::StateDb;

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
        let listener = match metrics::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot listen for metrics ([metrics] listen)");
                return exit::SOFTWARE;
            }
        };
        tracing::info!(address = %addr, "serving /metrics and /healthz");
        let metrics = Arc::new(metrics::Metrics::new());
        tokio::spawn(metrics::serve(listener, metrics.clone()));
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
