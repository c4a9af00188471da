//! One active instance per cluster: a lease whose epoch fences every state write.
//!
//! The lease is a row in the shared database ([`LeaseTable`]; `rekey_lease` in
//! PostgreSQL) that says who holds it, its epoch (rising on every takeover) and when
//! it expires, on the database's clock, so hosts' clocks never decide who leads. An
//! instance takes the lease only once it has expired (or was released), and renews
//! it every `renew_every`. Every write of the holder runs in a transaction that
//! first locks the row *at its epoch* (PostgreSQL's `FOR SHARE`): after a takeover
//! that row is gone (or has run out), so a paused or partitioned former leader's
//! write is refused ([`StateError::Deposed`]) instead of committed, and a takeover
//! waits for a write already under way to finish. A write transaction whose client falls silent
//! (paused, cut off) is ended by the server after [`idle_in_transaction`], so its
//! lock cannot hold a takeover back. The holder also gives up by its own monotonic
//! clock a tenth of a lease before the database could let anyone else take over, so
//! it never acts on a lease it may have lost ([`Keeper`]). No advisory locks: they
//! break behind transaction poolers and carry no token.
//!
//! The instance's side ([`Keeper`]) is the same code whatever the table is: the
//! deterministic simulation (`tests/it/sim/lease.rs`) runs it against a model of the
//! table with partitions, pauses and clocks that run at different rates.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::StateError;

/// What a rotate call must leave of the lease beyond its timeout: the answer's save
/// and a round trip.
pub const CALL_MARGIN: Duration = Duration::from_secs(1);

/// The database's side of the lease. All expiry is judged on the database's clock.
pub trait LeaseTable {
    /// Takes the lease for `holder` for `lease` if nobody holds a live one: the new
    /// epoch, or `None` while another instance holds it.
    fn take(
        &self,
        holder: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<i64>, StateError>> + Send;

    /// Extends the lease held at `epoch` by `lease` from now: false if the lease is
    /// no longer at that epoch (another instance took over).
    fn extend(
        &self,
        epoch: i64,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StateError>> + Send;

    /// Lets the lease held at `epoch` run out now (a graceful stop).
    fn expire(&self, epoch: i64) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Who holds the lease; `None` if nobody ever did.
    fn leader(&self) -> impl Future<Output = Result<Option<Leader>, StateError>> + Send;
}

/// Who leads a cluster, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub holder: String,
    pub epoch: i64,
    /// Whether the lease is still running (else the next instance to try takes it).
    pub live: bool,
}

/// The outcome of [`Keeper::try_lead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This instance leads, at this epoch.
    Leading { epoch: i64 },
    /// Another instance holds a live lease.
    Standby { leader: Leader },
}

/// How long the server lets a write transaction sit idle (its client paused or cut
/// off) before it ends it, releasing the lease row it locked: one renew interval
/// (at most half the lease), so a silent former leader holds a takeover back by
/// no more than that. A healthy client is idle mid-transaction for a round trip.
pub fn idle_in_transaction(renew_every: Duration) -> Duration {
    renew_every.max(Duration::from_secs(1))
}

/// How long a request to the database may go unacknowledged before the client's
/// kernel resets the connection (TCP user timeout): a request held up by a network
/// cut must not reach the server long after it was sent, where a late renewal
/// would keep the lease from the standbys for a whole lease more.
pub fn unacknowledged_limit(renew_every: Duration) -> Duration {
    renew_every.max(Duration::from_secs(1))
}

/// Whether a rotate call with `timeout` may start with `left` of the lease: the call
/// cannot be fenced like a write, so no other instance may take over while it can
/// still be answered.
pub fn covers_call(left: Duration, timeout: Duration) -> Result<(), String> {
    if left < timeout + CALL_MARGIN {
        return Err(format!(
            "not rotated: {}s left on the cluster lease, the rotate call may take {}s; \
             set [state] lease above the provider's timeout",
            left.as_secs(),
            timeout.as_secs()
        ));
    }
    Ok(())
}

/// The lease this instance holds, as far as it knows.
#[derive(Debug, Clone, Copy)]
struct Fence {
    epoch: i64,
    /// When this instance stops trusting the lease, by its own monotonic clock.
    valid_until: Instant,
    /// Whether a write was refused or the lease was given up: the instance must stop.
    deposed: bool,
    /// Whether the database was told this instance gave it up.
    given_back: bool,
}

/// This instance's monotonic clock (tokio's, so a paused runtime controls it).
pub type MonotonicClock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The instance's side of the lease: what it holds, until when it trusts it, and
/// the local half of every write's fence.
pub struct Keeper {
    cluster: String,
    lease: Duration,
    clock: MonotonicClock,
    fence: Mutex<Option<Fence>>,
    /// Writes refused because the lease was lost.
    refused: AtomicU64,
}

impl Keeper {
    /// A keeper for `cluster` holding leases of `lease`, on tokio's monotonic clock.
    pub fn new(cluster: &str, lease: Duration) -> Keeper {
        Keeper::with_clock(cluster, lease, Arc::new(Instant::now))
    }

    /// A keeper on another monotonic clock (the simulation's, running fast or slow).
    pub fn with_clock(cluster: &str, lease: Duration, clock: MonotonicClock) -> Keeper {
        Keeper {
            cluster: cluster.to_string(),
            lease,
            clock,
            fence: Mutex::new(None),
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Fence>> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    /// How long before the database's expiry this instance stops trusting a lease
    /// asked for at `sent` (clock rates differ a little; a round trip takes a little).
    fn trusted(&self, sent: Instant) -> Instant {
        sent + self.lease - self.lease / 10
    }

    /// Takes the cluster's lease if nobody holds a live one (a new epoch), or renews
    /// it if this instance holds it. `holder` names this instance (host and pid).
    pub async fn try_lead(
        &self,
        table: &impl LeaseTable,
        holder: &str,
    ) -> Result<Leadership, StateError> {
        let sent = self.now();
        let current = *self.lock();
        if let Some(f) = current {
            if !f.deposed && sent < f.valid_until {
                return self
                    .renew(table, f.epoch)
                    .await
                    .map(|()| Leadership::Leading { epoch: f.epoch });
            }
            // Run out on this clock (a pause, a renewal that failed) or refused:
            // extending it now would only keep a standby waiting for a lease this
            // instance gave up, and so would a renewal of it that the network
            // delivered late. It gives the lease back (a no-op if another instance
            // took over) and takes a new one like anyone else.
            if !f.given_back {
                if let Some(g) = self.lock().as_mut().filter(|g| g.epoch == f.epoch) {
                    g.deposed = true;
                }
                self.give_back(table, f.epoch).await;
            }
        }
        if let Some(epoch) = table.take(holder, self.lease).await? {
            let valid_until = self.trusted(sent);
            let late = self.now() >= valid_until;
            *self.lock() = Some(Fence {
                epoch,
                valid_until,
                deposed: late,
                given_back: false,
            });
            if !late {
                return Ok(Leadership::Leading { epoch });
            }
            // The answer came back after the lease could have run out (a request
            // held up on the network): of no use to this instance, and holding it
            // would keep every other instance waiting a whole lease.
            self.give_back(table, epoch).await;
            return Ok(Leadership::Standby {
                leader: Leader {
                    holder: holder.to_string(),
                    epoch,
                    live: false,
                },
            });
        }
        let leader = table.leader().await?.unwrap_or(Leader {
            // Released between the two statements: the next try takes it.
            holder: String::new(),
            epoch: 0,
            live: false,
        });
        let mine = self.lock().map(|f| f.epoch);
        if leader.live && leader.holder == holder && mine != Some(leader.epoch) {
            // Taken for this instance by a request whose answer was lost: it never
            // learnt the epoch, so it cannot use the lease; others can.
            self.give_back(table, leader.epoch).await;
        }
        Ok(Leadership::Standby { leader })
    }

    /// Extends the lease held at `epoch`; [`StateError::Deposed`] if it is no
    /// longer this instance's (or ran out on this instance's clock meanwhile).
    async fn renew(&self, table: &impl LeaseTable, epoch: i64) -> Result<(), StateError> {
        let sent = self.now();
        let extended = table.extend(epoch, self.lease).await?;
        let now = self.now();
        let trusted = {
            let mut fence = self.lock();
            let Some(f) = fence.as_mut().filter(|f| f.epoch == epoch) else {
                return Err(self.deposed(epoch));
            };
            let trusted = extended && now < f.valid_until && !f.deposed;
            if trusted {
                f.valid_until = self.trusted(sent);
            } else {
                f.deposed = true;
            }
            trusted
        };
        if trusted {
            return Ok(());
        }
        if extended {
            // Extended, but answered too late to be trusted: give it back.
            self.give_back(table, epoch).await;
        }
        Err(self.deposed(epoch))
    }

    /// Lets a lease this instance cannot use run out now, so that another takes
    /// over at its next look; if this fails, the next look tries again, and the
    /// lease runs out by itself meanwhile.
    async fn give_back(&self, table: &impl LeaseTable, epoch: i64) {
        match table.expire(epoch).await {
            Ok(()) => {
                if let Some(f) = self.lock().as_mut().filter(|f| f.epoch == epoch) {
                    f.given_back = true;
                }
            }
            Err(e) => tracing::debug!(error = %e, epoch, "cannot give back a lease"),
        }
    }

    /// Renews the lease this instance holds now (before a provider call it cannot
    /// take back), and says how long it may act on it: [`StateError::Deposed`]
    /// when it holds none or lost it.
    pub async fn renew_now(&self, table: &impl LeaseTable) -> Result<Duration, StateError> {
        let Some(f) = *self.lock() else {
            return Err(self.deposed(0));
        };
        if f.deposed {
            return Err(self.deposed(f.epoch));
        }
        self.renew(table, f.epoch).await?;
        self.lease_left().ok_or_else(|| self.deposed(f.epoch))
    }

    /// Gives the lease up (a graceful stop), so a standby takes over at its next
    /// look instead of waiting for the lease to run out.
    pub async fn release(&self, table: &impl LeaseTable) -> Result<(), StateError> {
        // Given up for good: any write after this is refused, as a deposed one is.
        let Some(f) = self.lock().as_mut().map(|f| {
            f.deposed = true;
            *f
        }) else {
            return Ok(());
        };
        table.expire(f.epoch).await?;
        if let Some(g) = self.lock().as_mut().filter(|g| g.epoch == f.epoch) {
            g.given_back = true;
        }
        Ok(())
    }

    /// The epoch this instance leads at, while it trusts its lease.
    pub fn epoch(&self) -> Option<i64> {
        let now = self.now();
        self.lock()
            .filter(|f| !f.deposed && now < f.valid_until)
            .map(|f| f.epoch)
    }

    /// How long this instance may still act on its lease without renewing it:
    /// `None` when it holds none (or lost it).
    pub fn lease_left(&self) -> Option<Duration> {
        let now = self.now();
        self.lock()
            .filter(|f| !f.deposed)
            .map(|f| f.valid_until.saturating_duration_since(now))
    }

    /// Whether a write was refused because another instance took over (or the lease
    /// ran out on this host's clock, or was given up).
    pub fn is_deposed(&self) -> bool {
        let now = self.now();
        self.lock()
            .is_some_and(|f| f.deposed || now >= f.valid_until)
    }

    /// The local half of a write's fence: the epoch the write's transaction must
    /// find the lease row at (`None`: this instance never took a lease, as the
    /// CLI's commands do not), or [`StateError::Deposed`] without asking the
    /// database once the lease is lost.
    pub fn admit(&self) -> Result<Option<i64>, StateError> {
        let Some(f) = *self.lock() else {
            return Ok(None);
        };
        if f.deposed || self.now() >= f.valid_until {
            self.refuse();
            return Err(self.deposed(f.epoch));
        }
        Ok(Some(f.epoch))
    }

    /// The database found the lease row at another epoch: the write is refused and
    /// this instance must stop.
    pub fn refuse(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.lock().as_mut() {
            f.deposed = true;
        }
    }

    /// How many writes this instance had refused for want of the lease.
    pub fn refused_writes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn deposed(&self, epoch: i64) -> StateError {
        StateError::Deposed {
            cluster: self.cluster.clone(),
            epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease row in memory whose answers take `delay` to come back.
    #[derive(Default)]
    struct Row {
        state: Mutex<Option<(i64, bool)>>,
        delay: Mutex<Duration>,
        expired: Mutex<Vec<i64>>,
    }

    impl LeaseTable for Row {
        async fn take(&self, _: &str, _: Duration) -> Result<Option<i64>, StateError> {
            let epoch = {
                let mut st = self.state.lock().unwrap();
                let epoch = st.map_or(1, |(e, _)| e + 1);
                *st = Some((epoch, true));
                epoch
            };
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            Ok(Some(epoch))
        }

        async fn extend(&self, epoch: i64, _: Duration) -> Result<bool, StateError> {
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            Ok(self.state.lock().unwrap().is_some_and(|(e, _)| e == epoch))
        }

        async fn expire(&self, epoch: i64) -> Result<(), StateError> {
            self.expired.lock().unwrap().push(epoch);
            Ok(())
        }

        async fn leader(&self) -> Result<Option<Leader>, StateError> {
            Ok(None)
        }
    }

    const LEASE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_trusted_for_nine_tenths_of_it_from_when_it_was_asked_for() {
        let (row, keeper) = (Row::default(), Keeper::new("c", LEASE));
        *row.delay.lock().unwrap() = Duration::from_secs(1);
        let led = keeper.try_lead(&row, "me").await.unwrap();
        assert_eq!(led, Leadership::Leading { epoch: 1 });
        // Asked at 0, answered at 1: trusted until 9, by this clock.
        assert_eq!(keeper.lease_left(), Some(Duration::from_secs(8)));
        assert_eq!(keeper.admit().unwrap(), Some(1));
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(keeper.is_deposed());
        assert!(
            keeper.admit().is_err(),
            "a write after the window is refused"
        );
        assert_eq!(keeper.refused_writes(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_answered_after_it_could_have_run_out_is_given_back_at_once() {
        let (row, keeper) = (Row::default(), Keeper::new("c", LEASE));
        *row.delay.lock().unwrap() = Duration::from_secs(9);
        let led = keeper.try_lead(&row, "me").await.unwrap();
        assert!(matches!(led, Leadership::Standby { .. }), "{led:?}");
        assert_eq!(keeper.epoch(), None);
        assert_eq!(*row.expired.lock().unwrap(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_run_out_on_this_clock_is_given_back_not_extended() {
        let (row, keeper) = (Row::default(), Keeper::new("c", LEASE));
        keeper.try_lead(&row, "me").await.unwrap();
        // Paused past its window: its next look must not extend the old lease.
        tokio::time::advance(Duration::from_secs(9)).await;
        let led = keeper.try_lead(&row, "me").await.unwrap();
        assert_eq!(*row.expired.lock().unwrap(), vec![1]);
        assert_eq!(
            led,
            Leadership::Leading { epoch: 2 },
            "a new epoch, not the old one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_answered_too_late_gives_the_lease_back_and_deposes() {
        let (row, keeper) = (Row::default(), Keeper::new("c", LEASE));
        keeper.try_lead(&row, "me").await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        *row.delay.lock().unwrap() = Duration::from_secs(5);
        assert!(matches!(
            keeper.renew_now(&row).await,
            Err(StateError::Deposed { epoch: 1, .. })
        ));
        assert!(keeper.is_deposed());
        assert_eq!(*row.expired.lock().unwrap(), vec![1]);
    }

    #[test]
    fn a_rotate_call_needs_its_timeout_and_a_margin_left_on_the_lease() {
        let t = Duration::from_secs(30);
        assert!(covers_call(t + CALL_MARGIN, t).is_ok());
        let refused = covers_call(t, t).unwrap_err();
        assert!(refused.contains("30s left"), "{refused}");
        assert_eq!(
            idle_in_transaction(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }
}
