//! One active instance per cluster: a lease row in PostgreSQL whose epoch fences
//! every state write.
//!
//! `rekey_lease` has one row per cluster: who holds it, its epoch (rising on every
//! takeover) and when it expires, on the database's clock (`now()`), so hosts' clocks
//! never decide who leads. An instance takes the lease only once it has expired (or
//! was released), and renews it every `renew_every`. Every write of the holder runs
//! in a transaction that first locks the row *at its epoch* (`FOR SHARE`): after a
//! takeover that row is gone, so a paused or partitioned former leader's write is
//! refused ([`StateError::Deposed`]) instead of committed, and a takeover waits for
//! a write already under way to finish. The holder also gives up by its own
//! monotonic clock a tenth of a lease before the database could let anyone else
//! take over, so it never acts on a lease it may have lost. No advisory locks: they
//! break behind transaction poolers and carry no token.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StateError;
use super::postgres::PgDb;

/// The lease this instance holds, as far as it knows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence {
    epoch: i64,
    /// When this instance stops trusting the lease, by its own monotonic clock.
    valid_until: Instant,
    /// Whether a write was refused or the lease ran out: the instance must stop.
    deposed: bool,
}

pub(crate) type FenceCell = Mutex<Option<Fence>>;

/// Who leads a cluster, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub holder: String,
    pub epoch: i64,
    /// Whether the lease is still running (else the next instance to try takes it).
    pub live: bool,
}

/// The outcome of [`PgDb::try_lead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This instance leads, at this epoch.
    Leading { epoch: i64 },
    /// Another instance holds a live lease.
    Standby { leader: Leader },
}

fn lock(cell: &FenceCell) -> std::sync::MutexGuard<'_, Option<Fence>> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

impl PgDb {
    /// How long before the database's expiry this instance stops trusting a lease
    /// (clock rates differ a little; a round trip takes a little).
    fn trusted(&self, sent: Instant) -> Instant {
        let lease = self.settings().lease;
        sent + lease - lease / 10
    }

    fn lease_interval(&self) -> String {
        format!("{} milliseconds", self.settings().lease.as_millis())
    }

    /// Takes the cluster's lease if nobody holds a live one (a new epoch), or renews
    /// it if this instance holds it. `holder` names this instance (host and pid).
    pub fn try_lead(&self, holder: &str) -> Result<Leadership, StateError> {
        let current = *lock(&self.fence);
        if let Some(f) = current
            && !f.deposed
        {
            return self
                .renew(f.epoch)
                .map(|()| Leadership::Leading { epoch: f.epoch });
        }
        let sent = Instant::now();
        let sql = self.sql();
        let cluster = self.settings().cluster.clone();
        let interval = self.lease_interval();
        let taken = self.run(async |c| {
            c.query_opt(
                "INSERT INTO rekey_lease (cluster, holder, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + $3::text::interval)
                 ON CONFLICT (cluster) DO UPDATE
                    SET holder = $2, epoch = rekey_lease.epoch + 1,
                        expires_at = now() + $3::text::interval
                    WHERE rekey_lease.expires_at <= now()
                 RETURNING epoch",
                &[&cluster, &holder, &interval],
            )
            .await
            .map_err(&sql)
        })?;
        match taken {
            Some(row) => {
                let epoch: i64 = row.get(0);
                *lock(&self.fence) = Some(Fence {
                    epoch,
                    valid_until: self.trusted(sent),
                    deposed: false,
                });
                Ok(Leadership::Leading { epoch })
            }
            None => match self.leader()? {
                Some(leader) => Ok(Leadership::Standby { leader }),
                // Released between the two statements: the next try takes it.
                None => Ok(Leadership::Standby {
                    leader: Leader {
                        holder: String::new(),
                        epoch: 0,
                        live: false,
                    },
                }),
            },
        }
    }

    /// Extends the lease held at `epoch`; [`StateError::Deposed`] if it is no
    /// longer this instance's.
    fn renew(&self, epoch: i64) -> Result<(), StateError> {
        let sent = Instant::now();
        let sql = self.sql();
        let cluster = self.settings().cluster.clone();
        let interval = self.lease_interval();
        let renewed = self.run(async |c| {
            c.execute(
                "UPDATE rekey_lease SET expires_at = now() + $3::text::interval
                 WHERE cluster = $1 AND epoch = $2",
                &[&cluster, &epoch, &interval],
            )
            .await
            .map_err(&sql)
        });
        let mut fence = lock(&self.fence);
        let Some(f) = fence.as_mut().filter(|f| f.epoch == epoch) else {
            return Err(self.deposed(epoch));
        };
        match renewed {
            Ok(1) if Instant::now() < f.valid_until => {
                f.valid_until = self.trusted(sent);
                Ok(())
            }
            Ok(_) => {
                f.deposed = true;
                Err(self.deposed(epoch))
            }
            Err(e) => Err(e),
        }
    }

    /// Renews the lease this instance holds now (before a provider call it cannot
    /// take back), and says how long it may act on it: [`StateError::Deposed`]
    /// when it holds none or lost it.
    pub fn renew_now(&self) -> Result<Duration, StateError> {
        let Some(f) = *lock(&self.fence) else {
            return Err(self.deposed(0));
        };
        if f.deposed {
            return Err(self.deposed(f.epoch));
        }
        self.renew(f.epoch)?;
        self.lease_left().ok_or_else(|| self.deposed(f.epoch))
    }

    /// Gives the lease up (a graceful stop), so a standby takes over at its next
    /// look instead of waiting for the lease to run out.
    pub fn release(&self) -> Result<(), StateError> {
        // Given up for good: any write after this is refused, as a deposed one is.
        let Some(f) = lock(&self.fence).as_mut().map(|f| {
            f.deposed = true;
            *f
        }) else {
            return Ok(());
        };
        let sql = self.sql();
        let cluster = self.settings().cluster.clone();
        self.run(async |c| {
            c.execute(
                "UPDATE rekey_lease SET expires_at = now() - interval '1 second'
                 WHERE cluster = $1 AND epoch = $2",
                &[&cluster, &f.epoch],
            )
            .await
            .map_err(&sql)
            .map(|_| ())
        })
    }

    /// Who leads the cluster; `None` if nobody ever did.
    pub fn leader(&self) -> Result<Option<Leader>, StateError> {
        let sql = self.sql();
        let cluster = self.settings().cluster.clone();
        let row = self.run(async |c| {
            c.query_opt(
                "SELECT holder, epoch, expires_at > now() FROM rekey_lease WHERE cluster = $1",
                &[&cluster],
            )
            .await
            .map_err(&sql)
        })?;
        Ok(row.map(|r| Leader {
            holder: r.get(0),
            epoch: r.get(1),
            live: r.get(2),
        }))
    }

    /// The epoch this instance leads at, while it trusts its lease.
    pub fn epoch(&self) -> Option<i64> {
        lock(&self.fence)
            .filter(|f| !f.deposed && Instant::now() < f.valid_until)
            .map(|f| f.epoch)
    }

    /// How long this instance may still act on its lease without renewing it:
    /// `None` when it holds none (or lost it).
    pub fn lease_left(&self) -> Option<Duration> {
        lock(&self.fence)
            .filter(|f| !f.deposed)
            .map(|f| f.valid_until.saturating_duration_since(Instant::now()))
    }

    /// Whether a write was refused because another instance took over (or the lease
    /// ran out on this host's clock).
    pub fn is_deposed(&self) -> bool {
        lock(&self.fence).is_some_and(|f| f.deposed || Instant::now() >= f.valid_until)
    }

    fn deposed(&self, epoch: i64) -> StateError {
        StateError::Deposed {
            cluster: self.settings().cluster.clone(),
            epoch,
        }
    }

    /// Inside a write's transaction: refuses it unless this instance's lease (if it
    /// took one) is still the cluster's, holding the lease row until the commit.
    pub(super) async fn check_fence(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), StateError> {
        let Some(f) = *lock(&self.fence) else {
            return Ok(());
        };
        if f.deposed || Instant::now() >= f.valid_until {
            self.mark_deposed();
            return Err(self.deposed(f.epoch));
        }
        let cluster = self.settings().cluster.clone();
        let row = tx
            .query_opt(
                "SELECT 1 FROM rekey_lease WHERE cluster = $1 AND epoch = $2 FOR SHARE",
                &[&cluster, &f.epoch],
            )
            .await
            .map_err(self.sql())?;
        if row.is_none() {
            self.mark_deposed();
            return Err(self.deposed(f.epoch));
        }
        Ok(())
    }

    /// How many writes this instance had refused for want of the lease.
    pub fn refused_writes(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn mark_deposed(&self) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = lock(&self.fence).as_mut() {
            f.deposed = true;
        }
    }
}
