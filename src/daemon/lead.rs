//! Leading a cluster that shares its state in PostgreSQL (`[state] url`): waiting as
//! a standby until the lease is free, keeping it while leading, and noticing when it
//! is lost. The lease itself, and the fence on every write, are the state's
//! ([`crate::state::PgDb`]); this is the daemon's side of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::notify::{Notify, notify};
use crate::scheduler::Control;
use crate::state::{Leadership, StateDb, StateError};

/// How often a standby looks at the lease: a graceful stop releases it, so a
/// standby takes over within this; a crash costs the lease's rest on top.
pub const STANDBY_LOOK: Duration = Duration::from_millis(500);

/// How often a leader checks its own clock on the lease, between renewals.
const TICK: Duration = Duration::from_millis(200);

/// This instance's name in the lease: host and pid.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// What leading needs of the shared state: the daemon's is PostgreSQL's (through
/// [`StateDb`]); the deterministic simulation's is a model with partitions and pauses.
pub trait Cluster: Clone + Send + Sync + 'static {
    /// Takes the lease if it is free, or renews it if this instance holds it.
    fn try_lead(&self, holder: &str)
    -> impl Future<Output = Result<Leadership, StateError>> + Send;

    /// Whether this instance lost its lease (refused, given up, or run out on its clock).
    fn is_deposed(&self) -> bool;

    /// How often the leader renews; `None` when the state is not shared.
    fn renew_every(&self) -> Option<Duration>;

    /// What the operator's asks waiting in the shared state look like (`None`:
    /// none), to tell when they changed.
    fn asks_mark(&self) -> impl Future<Output = Option<String>> + Send;

    /// Gives the lease up.
    fn release(&self) -> impl Future<Output = Result<(), StateError>> + Send;
}

/// The lease calls block on the database: off the async workers.
async fn blocking<R: Send + 'static>(
    db: &Arc<StateDb>,
    op: impl FnOnce(&crate::state::PgDb) -> Result<R, StateError> + Send + 'static,
) -> Option<Result<R, StateError>> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.shared().map(op))
        .await
        .unwrap_or_else(|e| {
            Some(Err(StateError::Postgres {
                url: String::new(),
                detail: format!("the lease task failed: {e}"),
            }))
        })
}

impl Cluster for Arc<StateDb> {
    async fn try_lead(&self, holder: &str) -> Result<Leadership, StateError> {
        let holder = holder.to_string();
        blocking(self, move |pg| pg.try_lead(&holder))
            .await
            .unwrap_or(Ok(Leadership::Leading { epoch: 0 }))
    }

    fn is_deposed(&self) -> bool {
        self.shared().is_some_and(|pg| pg.keeper().is_deposed())
    }

    fn renew_every(&self) -> Option<Duration> {
        self.shared().map(|pg| pg.settings().renew_every)
    }

    async fn asks_mark(&self) -> Option<String> {
        blocking(self, |pg| pg.asks_mark()).await?.ok().flatten()
    }

    async fn release(&self) -> Result<(), StateError> {
        blocking(self, |pg| pg.release()).await.unwrap_or(Ok(()))
    }
}

/// Waits, as a standby, until this instance leads: its epoch, or `None` when told
/// to stop first. systemd hears READY=1 at once (a standby is a healthy service)
/// and a STATUS naming the leader.
pub async fn await_lease(
    cluster: &impl Cluster,
    holder: &str,
    stop: impl Future<Output = ()>,
    metrics: Option<&Metrics>,
) -> Option<i64> {
    let mut told: Option<String> = None;
    tokio::pin!(stop);
    loop {
        match cluster.try_lead(holder).await {
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
            biased;
            () = &mut stop => return None,
            () = tokio::time::sleep(STANDBY_LOOK) => {}
        }
    }
}

/// While leading: renews the lease every `renew_every`, wakes the scheduler when an
/// operator's ask waits in the database (a CLI on another host cannot signal this
/// one), and returns once the lease is lost: another instance took over, or it could
/// not be renewed before this host's clock says it may have run out.
pub async fn keep_lease(cluster: impl Cluster, holder: String, scheduler: mpsc::Sender<Control>) {
    let Some(every) = cluster.renew_every() else {
        return std::future::pending().await;
    };
    // Once it returns, the daemon stands by, and its first look gives the lease
    // back if it is still this instance's (see `Keeper::try_lead`).
    renew_while_trusted(&cluster, &holder, every, &scheduler).await;
}

async fn renew_while_trusted(
    cluster: &impl Cluster,
    holder: &str,
    every: Duration,
    scheduler: &mpsc::Sender<Control>,
) {
    let mut last = Instant::now();
    // Asks stay in the database until their job ran: the scheduler is woken when
    // they change, not at every look while one waits.
    let mut seen_asks = None;
    loop {
        tokio::time::sleep(TICK).await;
        if cluster.is_deposed() {
            return;
        }
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        match while_trusted(cluster, cluster.try_lead(holder)).await {
            None | Some(Ok(Leadership::Standby { .. }) | Err(StateError::Deposed { .. })) => {
                return;
            }
            Some(Ok(Leadership::Leading { .. })) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the cluster lease; trying again until it runs out");
                continue;
            }
        }
        let Some(mark) = while_trusted(cluster, cluster.asks_mark()).await else {
            return;
        };
        if mark.is_some() && mark != seen_asks {
            // A wake already queued does as well.
            drop(scheduler.try_send(Control::Wake));
        }
        seen_asks = mark;
    }
}

/// Waits for `call` while this instance still trusts its lease; `None` once it no
/// longer does. A call that hangs (a database gone silent, a connection being
/// reopened) must not hide the lease running out on this host's clock meanwhile.
async fn while_trusted<T>(cluster: &impl Cluster, call: impl Future<Output = T>) -> Option<T> {
    tokio::pin!(call);
    loop {
        // Biased, so that a simulated run replays: the answer first.
        tokio::select! {
            biased;
            r = &mut call => return Some(r),
            () = tokio::time::sleep(TICK) => {
                if cluster.is_deposed() {
                    return None;
                }
            }
        }
    }
}

/// Gives the lease up at a graceful stop, so a standby takes over at its next look.
pub async fn release(cluster: &impl Cluster) {
    if cluster.renew_every().is_none() {
        return;
    }
    match cluster.release().await {
        Err(e) => {
            tracing::warn!(error = %e, "cannot release the cluster lease; a standby takes over when it runs out")
        }
        Ok(()) => tracing::info!("cluster lease released"),
    }
}
