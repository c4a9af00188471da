//! Leading a cluster that shares its state in PostgreSQL (`[state] url`): waiting as
//! a standby until the lease is free, keeping it while leading, and noticing when it
//! is lost. The lease itself, and the fence on every write, are the state's
//! ([`crate::state::PgDb`]); this is the daemon's side of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::notify::{Notify, notify};
use crate::scheduler::Control;
use crate::state::{Leadership, StateDb, StateError};

/// How often a standby looks at the lease: a graceful stop releases it, so a
/// standby takes over within this; a crash costs the lease's rest on top.
const STANDBY_LOOK: Duration = Duration::from_millis(500);

/// How often a leader checks its own clock on the lease, between renewals.
const TICK: Duration = Duration::from_millis(200);

/// This instance's name in the lease: host and pid.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

async fn try_lead(db: &Arc<StateDb>, holder: &str) -> Result<Leadership, StateError> {
    let (db, holder) = (db.clone(), holder.to_string());
    tokio::task::spawn_blocking(move || match db.shared() {
        Some(pg) => pg.try_lead(&holder),
        None => Ok(Leadership::Leading { epoch: 0 }),
    })
    .await
    .unwrap_or_else(|e| {
        Err(StateError::Postgres {
            url: String::new(),
            detail: format!("the lease task failed: {e}"),
        })
    })
}

/// Waits, as a standby, until this instance leads: its epoch, or `None` when told
/// to stop first. systemd hears READY=1 at once (a standby is a healthy service)
/// and a STATUS naming the leader.
pub async fn await_lease(
    db: &Arc<StateDb>,
    holder: &str,
    term: &mut Signal,
    int: &mut Signal,
    metrics: Option<&Metrics>,
) -> Option<i64> {
    let mut told: Option<String> = None;
    loop {
        match try_lead(db, holder).await {
            Ok(Leadership::Leading { epoch }) => {
                tracing::info!(
                    epoch,
                    holder,
                    "leading the cluster: resuming from the committed state"
                );
                notify(&[Notify::Status(&format!("leading (epoch {epoch})"))]);
                if let Some(m) = metrics {
                    m.set_leadership(Some(epoch));
                }
                return Some(epoch);
            }
            Ok(Leadership::Standby { leader }) => {
                if told.as_deref() != Some(leader.holder.as_str()) {
                    let status = format!("standby, leader is {}", leader.holder);
                    tracing::info!(leader = %leader.holder, epoch = leader.epoch, "standing by: another instance leads the cluster");
                    notify(&[Notify::Ready, Notify::Status(&status)]);
                    if let Some(m) = metrics {
                        m.set_leadership(None);
                    }
                    told = Some(leader.holder);
                }
            }
            Err(e) => {
                if told.as_deref() != Some("") {
                    tracing::warn!(error = %e, "cannot read the cluster lease; standing by and trying again");
                    notify(&[
                        Notify::Ready,
                        Notify::Status("standby: the state database cannot be reached"),
                    ]);
                    if let Some(m) = metrics {
                        m.set_leadership(None);
                    }
                    told = Some(String::new());
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(STANDBY_LOOK) => {}
            _ = term.recv() => return None,
            _ = int.recv() => return None,
        }
    }
}

/// While leading: renews the lease every `renew_every`, wakes the scheduler when an
/// operator's ask waits in the database (a CLI on another host cannot signal this
/// one), and returns once the lease is lost: another instance took over, or it could
/// not be renewed before this host's clock says it may have run out.
pub async fn keep_lease(db: Arc<StateDb>, holder: String, scheduler: mpsc::Sender<Control>) {
    let Some(every) = db.shared().map(|pg| pg.settings().renew_every) else {
        return std::future::pending().await;
    };
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        if db.shared().is_some_and(|pg| pg.is_deposed()) {
            return;
        }
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        // A renewal that hangs (a database gone silent) must not hide the lease
        // running out on this host's clock meanwhile.
        let renewal = try_lead(&db, &holder);
        tokio::pin!(renewal);
        let renewed = loop {
            tokio::select! {
                r = &mut renewal => break r,
                () = tokio::time::sleep(TICK) => {
                    if db.shared().is_some_and(|pg| pg.is_deposed()) {
                        return;
                    }
                }
            }
        };
        match renewed {
            Ok(Leadership::Leading { .. }) => {}
            Ok(Leadership::Standby { .. }) | Err(StateError::Deposed { .. }) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the cluster lease; trying again until it runs out");
            }
        }
        let asks = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || db.shared().map(|pg| pg.has_asks()))
        };
        if let Ok(Some(Ok(true))) = asks.await {
            let _ = scheduler.send(Control::Wake).await;
        }
    }
}

/// Gives the lease up at a graceful stop, so a standby takes over at its next look.
pub async fn release(db: &Arc<StateDb>) {
    let db = db.clone();
    let released = tokio::task::spawn_blocking(move || db.shared().map(|pg| pg.release())).await;
    match released {
        Ok(Some(Err(e))) => {
            tracing::warn!(error = %e, "cannot release the cluster lease; a standby takes over when it runs out")
        }
        Ok(Some(Ok(()))) => tracing::info!("cluster lease released"),
        _ => {}
    }
}
