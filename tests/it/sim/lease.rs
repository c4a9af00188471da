//! The cluster lease under partitions, pauses and clocks that run at different
//! rates: two or three rekey instances sharing one state, on tokio's paused clock.
//!
//! Production code runs for each instance: the lease's instance side
//! ([`Keeper`]: the epoch, the trust window on its own clock, the local half of
//! the fence), the daemon's standby and renewal loops ([`lead::await_lease`],
//! [`lead::keep_lease`]), the guard before a rotate call ([`lease::covers_call`])
//! and the server-side idle limit a write transaction runs under
//! ([`lease::idle_in_transaction`]). PostgreSQL is a model ([`Db`]) of what
//! `rekey_lease` and the fenced write do in SQL: `now()` read at a statement's
//! start, the takeover's `WHERE expires_at <= now()`, the write's `SELECT … FOR
//! SHARE` lock held until its commit (an `UPDATE` of the row waits for it), and a
//! transaction ended by the server once its client was silent for the idle limit
//! or its connection was seen to close. Between each instance and the database
//! lies a network that can be cut for a while (requests and answers wait, as TCP
//! retransmits, a request no longer than the connection's TCP user timeout
//! ([`lease::unacknowledged_limit`]), or die with the connection); each
//! instance can be paused (SIGSTOP: none of its code runs, its messages in flight
//! still travel), anywhere or on purpose in the middle of a write's transaction.
//!
//! Checked throughout, with the seed in the failure:
//! - fencing: no write commits under an epoch older than the lease's, so no write
//!   under an old epoch follows one under a newer epoch;
//! - stepping down: no instance that could act (not paused) believes it leads at
//!   an epoch the database has already replaced, and one whose lease ran out on
//!   its own clock stops working within [`STEP_DOWN`], whatever its calls to the
//!   database are waiting for;
//! - rotate calls: none reaches the provider after a newer epoch took over;
//! - progress: while some instance is running and connected, the cluster is not
//!   without an acting leader for longer than lease + renew interval + a standby's
//!   look + [`SLACK`] after the database last granted the lease (taken or
//!   extended, whether or not the answer reached the instance).
//!
//! Three controls break one mechanism each (no row lock, no idle limit, a clock
//! slower than the trust window allows) and must be caught, so the checks are known
//! to bite. `REKEY_SIM_LEASE_SEEDS=N` runs N seeds, `REKEY_SIM_LEASE_SEED=S` replays
//! one, `REKEY_SIM_LEASE_MINUTES=M` changes the simulated span.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey::daemon::lead::{self, Cluster};
use rekey::state::StateError;
use rekey::state::lease::{self, Keeper, Leader, Leadership, LeaseTable};
use tokio::time::{Instant, sleep, sleep_until};

/// Beyond lease + renew + look, what a takeover may take: round trips, a renewal
/// in flight when the lease ran out.
const SLACK: Duration = Duration::from_secs(1);

/// How soon a leader whose lease ran out on its own clock stops its work (the
/// daemon's loop looks every 200 ms).
const STEP_DOWN: Duration = Duration::from_secs(1);

/// Like `PgDb`'s: the longest one call waits before it drops the connection.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the checks look at every instance.
const SAMPLE: Duration = Duration::from_millis(50);

/// What one run breaks on purpose (the controls), or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    Nothing,
    /// The write's check of the epoch neither locks the row until the commit nor
    /// runs under the idle limit. (Either one alone keeps the fence: the lock holds
    /// a takeover back, and the idle limit, shorter than the lease, ends a
    /// transaction before the lease of the instance that opened it can run out.)
    NoRowLock,
    /// The server never ends a transaction whose client fell silent.
    NoIdleLimit,
    /// One instance's clock runs at 80% of real time (the trust window allows 90%).
    SlowClock,
}

/// The settings one seed draws.
#[derive(Debug, Clone, Copy)]
struct Plan {
    instances: usize,
    lease: Duration,
    renew: Duration,
    /// The providers' timeout (a rotate call's longest wait).
    call_timeout: Duration,
    minutes: u64,
    broken: Broken,
}

/// What one run came to.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub commits: u64,
    pub takeovers: u64,
    pub refused: u64,
    pub calls: u64,
    pub pauses: u64,
    pub partitions: u64,
    pub longest_leaderless: Duration,
    pub trace: Vec<String>,
}

// ---------------------------------------------------------------- the database

#[derive(Debug, Clone)]
struct Row {
    holder: String,
    epoch: i64,
    expires_at: Instant,
}

/// A write's transaction, open at the server.
#[derive(Debug)]
struct OpenTx {
    instance: usize,
    /// The client connection it runs on (a dropped connection ends it).
    conn: u64,
    epoch: i64,
    /// Whether it holds the row lock (`FOR SHARE`).
    locked: bool,
    /// When its last statement finished: the idle limit counts from here.
    last: Instant,
    idle_limit: Option<Duration>,
}

#[derive(Default)]
struct Db {
    row: Option<Row>,
    txs: std::collections::BTreeMap<u64, OpenTx>,
    next_tx: u64,
    /// `UPDATE`s of the row waiting for its lock; later lockers queue behind them.
    updates_waiting: usize,
    /// Commits in order: (when, epoch, instance).
    commits: Vec<(Instant, i64, usize)>,
    takeovers: u64,
    /// When the lease was last taken or extended: until it runs out from then,
    /// no other instance can lead, whether or not the answer reached its holder.
    granted: Option<Instant>,
    violations: Vec<String>,
}

impl Db {
    /// Ends the transactions whose client was silent for longer than their limit.
    fn sweep(&mut self, now: Instant) {
        self.txs.retain(|_, t| match t.idle_limit {
            Some(limit) => now.saturating_duration_since(t.last) <= limit,
            None => true,
        });
    }

    fn row_locked(&mut self, now: Instant) -> bool {
        self.sweep(now);
        self.txs.values().any(|t| t.locked)
    }

    /// Whether an `UPDATE` of the row must wait for the writes holding its lock;
    /// `queued` says whether this one already counts among those waiting.
    fn update_waits(&mut self, queued: &mut bool) -> bool {
        let locked = self.row_locked(Instant::now());
        match (locked, *queued) {
            (true, false) => self.updates_waiting += 1,
            (false, true) => self.updates_waiting -= 1,
            _ => {}
        }
        *queued = locked;
        locked
    }

    fn epoch(&self) -> i64 {
        self.row.as_ref().map_or(0, |r| r.epoch)
    }

    fn commit(&mut self, tx: u64, now: Instant) -> Result<(), String> {
        self.sweep(now);
        let Some(t) = self.txs.remove(&tx) else {
            return Err("the server ended the transaction".into());
        };
        if t.epoch != self.epoch() {
            self.violations.push(format!(
                "{now:?}: instance {} committed a write under epoch {} while the lease was at epoch {}",
                t.instance,
                t.epoch,
                self.epoch()
            ));
        }
        if let Some(&(_, last, _)) = self.commits.last()
            && last > t.epoch
        {
            self.violations.push(format!(
                "{now:?}: a write under epoch {} committed after one under epoch {last}",
                t.epoch
            ));
        }
        self.commits.push((now, t.epoch, t.instance));
        Ok(())
    }
}

// ---------------------------------------------------------------- one instance

/// SIGSTOP for a task: while set, the futures behind it are not polled.
#[derive(Default)]
struct Gate {
    paused: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Gate {
    fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            for w in self.wakers.lock().unwrap().drain(..) {
                w.wake();
            }
        }
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

struct Pausable<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
}

impl<F: Future> Future for Pausable<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.gate.is_paused() {
            self.gate.wakers.lock().unwrap().push(cx.waker().clone());
            return Poll::Pending;
        }
        self.inner.as_mut().poll(cx)
    }
}

struct Instance {
    id: usize,
    holder: String,
    keeper: Keeper,
    gate: Arc<Gate>,
    /// Until when it is paused.
    paused_until: Mutex<Option<Instant>>,
    /// Until when its network to the database is cut.
    cut_until: Mutex<Option<Instant>>,
    /// Its connection: one statement (or transaction) at a time, as `PgDb`'s.
    conn: tokio::sync::Mutex<()>,
    conn_id: AtomicU64,
    /// Whether it acts as leader (its scheduler runs), by the daemon's loop.
    working: AtomicBool,
    /// Whether it is inside a write's transaction (for faults aimed there).
    in_tx: AtomicBool,
    /// A rate below 1: its monotonic clock runs slow.
    rate: f64,
}

/// Everything one run shares.
struct World {
    plan: Plan,
    db: Mutex<Db>,
    rng: Mutex<StdRng>,
    instances: Vec<Arc<Instance>>,
    /// Rotate calls that reached the provider: (when, epoch, instance).
    calls: Mutex<Vec<(Instant, i64, usize)>>,
    start: Instant,
    /// What happened, for a replay (`REKEY_SIM_LEASE_SEED`).
    trace: Mutex<Vec<String>>,
}

impl World {
    fn note(&self, what: String) {
        let at = Instant::now() - self.start;
        self.trace.lock().unwrap().push(format!("{at:?}: {what}"));
    }

    fn latency(&self) -> Duration {
        Duration::from_micros(self.rng.lock().unwrap().random_range(200..3_000))
    }

    fn cut_until(&self, i: usize) -> Option<Instant> {
        let cut = *self.instances[i].cut_until.lock().unwrap();
        cut.filter(|&t| t > Instant::now())
    }

    /// A request's leg to the database: waits out a cut, as TCP retransmits, but
    /// only until the connection's TCP user timeout after it was sent (false: the
    /// client's kernel gave up and reset the connection).
    async fn send_leg(&self, i: usize, sent: Instant) -> bool {
        sleep(self.latency()).await;
        let limit = sent + lease::unacknowledged_limit(self.plan.renew);
        while let Some(until) = self.cut_until(i) {
            if until > limit {
                sleep_until(limit).await;
                return false;
            }
            sleep_until(until).await;
        }
        true
    }

    /// An answer's leg back (the server's retransmissions are not limited).
    async fn travel(&self, i: usize) {
        sleep(self.latency()).await;
        while let Some(until) = self.cut_until(i) {
            sleep_until(until).await;
        }
    }

    /// Sends `op` to the database from instance `i` on its connection `conn` and
    /// waits for the answer. The statement runs when it arrives (if the connection
    /// is still open), waiting while `op` says the row is locked.
    async fn request<R: Send + 'static>(
        self: &Arc<Self>,
        i: usize,
        op: impl FnMut(&mut Db, Instant) -> Option<R> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let world = self.clone();
        let conn = self.instances[i].conn_id.load(Ordering::SeqCst);
        let sent = Instant::now();
        tokio::spawn(async move {
            if !world.send_leg(i, sent).await {
                world.drop_connection(i, conn);
                return;
            }
            if world.instances[i].conn_id.load(Ordering::SeqCst) != conn {
                return;
            }
            let answer = world.execute(op).await;
            world.travel(i).await;
            let _ = tx.send(answer);
        });
        rx.await.map_err(|_| lost())
    }

    /// Runs one statement at the database: `now()` is when it started.
    async fn execute<R>(&self, mut op: impl FnMut(&mut Db, Instant) -> Option<R>) -> R {
        let started = Instant::now();
        loop {
            if let Some(r) = op(&mut self.db.lock().unwrap(), started) {
                return r;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// Instance `i` dropped its connection (a call timed out): the server ends its
    /// open transaction once the close reaches it.
    fn drop_connection(self: &Arc<Self>, i: usize, conn: u64) {
        let ids = &self.instances[i].conn_id;
        if ids
            .compare_exchange(conn, conn + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let world = self.clone();
        tokio::spawn(async move {
            world.travel(i).await;
            let mut db = world.db.lock().unwrap();
            db.txs.retain(|_, t| !(t.instance == i && t.conn == conn));
        });
    }
}

fn lost() -> StateError {
    StateError::Postgres {
        url: "sim".into(),
        detail: "connection lost".into(),
    }
}

/// Instance `i`'s view of the lease row, through its network.
struct Table {
    world: Arc<World>,
    i: usize,
}

impl LeaseTable for Table {
    async fn take(&self, holder: &str, lease: Duration) -> Result<Option<i64>, StateError> {
        let holder = holder.to_string();
        let mut queued = false;
        self.world
            .request(self.i, move |db, now| {
                // `INSERT … ON CONFLICT DO UPDATE` locks the row: it waits for
                // the writes holding it, then judges expiry by its start time.
                if db.update_waits(&mut queued) {
                    return None;
                }
                let free = db.row.as_ref().is_none_or(|r| r.expires_at <= now);
                if !free {
                    return Some(None);
                }
                let epoch = db.epoch() + 1;
                db.row = Some(Row {
                    holder: holder.clone(),
                    epoch,
                    expires_at: now + lease,
                });
                db.takeovers += 1;
                db.granted = Some(Instant::now());
                Some(Some(epoch))
            })
            .await
    }

    async fn extend(&self, epoch: i64, lease: Duration) -> Result<bool, StateError> {
        let mut queued = false;
        self.world
            .request(self.i, move |db, now| {
                if db.update_waits(&mut queued) {
                    return None;
                }
                match db.row.as_mut() {
                    Some(r) if r.epoch == epoch => {
                        r.expires_at = now + lease;
                        db.granted = Some(Instant::now());
                        Some(true)
                    }
                    _ => Some(false),
                }
            })
            .await
    }

    async fn expire(&self, epoch: i64) -> Result<(), StateError> {
        self.world
            .request(self.i, move |db, now| {
                if let Some(r) = db.row.as_mut().filter(|r| r.epoch == epoch) {
                    r.expires_at = now;
                }
                Some(())
            })
            .await
    }

    async fn leader(&self) -> Result<Option<Leader>, StateError> {
        self.world
            .request(self.i, move |db, now| {
                Some(db.row.as_ref().map(|r| Leader {
                    holder: r.holder.clone(),
                    epoch: r.epoch,
                    live: r.expires_at > now,
                }))
            })
            .await
    }
}

/// Instance `i` as the daemon's lease loops see it.
#[derive(Clone)]
struct SimCluster {
    world: Arc<World>,
    i: usize,
}

impl SimCluster {
    fn me(&self) -> &Arc<Instance> {
        &self.world.instances[self.i]
    }

    fn table(&self) -> Table {
        Table {
            world: self.world.clone(),
            i: self.i,
        }
    }

    /// One call on the connection, bounded as `PgDb::run` bounds it.
    async fn on_connection<R>(
        &self,
        op: impl AsyncFnOnce(&Table) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let _conn = self.me().conn.lock().await;
        let table = self.table();
        let conn = self.me().conn_id.load(Ordering::SeqCst);
        match tokio::time::timeout(OP_TIMEOUT, op(&table)).await {
            Ok(r) => r,
            Err(_) => {
                self.world.drop_connection(self.i, conn);
                Err(lost())
            }
        }
    }

    /// A fenced write: check the epoch (locking the row), `statements` more
    /// round trips, commit.
    async fn write(&self, statements: u32) -> Result<(), StateError> {
        let me = self.me().clone();
        let world = self.world.clone();
        let i = self.i;
        let lock_row = world.plan.broken != Broken::NoRowLock;
        let idle_limit = (!matches!(world.plan.broken, Broken::NoIdleLimit | Broken::NoRowLock))
            .then(|| lease::idle_in_transaction(world.plan.renew));
        let conn = me.conn_id.load(Ordering::SeqCst);
        let outcome = self
            .on_connection(async |_| {
                let Some(epoch) = me.keeper.admit()? else {
                    return Err(lost());
                };
                me.in_tx.store(true, Ordering::SeqCst);
                let opened = world
                    .request(i, move |db, now| {
                        // `FOR SHARE` queues behind an `UPDATE` already waiting.
                        if lock_row && db.updates_waiting > 0 {
                            return None;
                        }
                        // The lease row at this epoch and not run out (`now()`
                        // being the transaction's start).
                        let live = db.row.as_ref().is_some_and(|r| r.expires_at > now);
                        if db.epoch() != epoch || !live {
                            return Some(None);
                        }
                        let id = db.next_tx;
                        db.next_tx += 1;
                        db.txs.insert(
                            id,
                            OpenTx {
                                instance: i,
                                conn,
                                epoch,
                                locked: lock_row,
                                last: Instant::now(),
                                idle_limit,
                            },
                        );
                        Some(Some(id))
                    })
                    .await?;
                let Some(tx) = opened else {
                    me.keeper.refuse();
                    return Err(me.keeper.deposed(epoch));
                };
                for _ in 0..statements {
                    world
                        .request(i, move |db, _| {
                            db.sweep(Instant::now());
                            Some(db.txs.get_mut(&tx).map(|t| t.last = Instant::now()))
                        })
                        .await?
                        .ok_or_else(lost)?;
                }
                world
                    .request(i, move |db, _| Some(db.commit(tx, Instant::now())))
                    .await?
                    .map_err(|_| lost())
            })
            .await;
        me.in_tx.store(false, Ordering::SeqCst);
        outcome
    }
}

impl Cluster for SimCluster {
    async fn try_lead(&self, holder: &str) -> Result<Leadership, StateError> {
        let me = self.me().clone();
        let r = self
            .on_connection(async |t| me.keeper.try_lead(t, holder).await)
            .await;
        if std::env::var_os("REKEY_SIM_LEASE_VERBOSE").is_some() {
            self.world
                .note(format!("instance {} try_lead: {r:?}", self.i));
        }
        r
    }

    fn is_deposed(&self) -> bool {
        self.me().keeper.is_deposed()
    }

    fn renew_every(&self) -> Option<Duration> {
        Some(self.world.plan.renew)
    }

    async fn asks_mark(&self) -> Option<String> {
        // A query like any other (nothing in the simulation asks).
        let world = self.world.clone();
        let i = self.i;
        let asked = self
            .on_connection(async |_| world.request(i, |_, _| Some(None)).await)
            .await;
        asked.ok().flatten()
    }

    async fn release(&self) -> Result<(), StateError> {
        let me = self.me().clone();
        self.on_connection(async |t| me.keeper.release(t).await)
            .await
    }
}

// ---------------------------------------------------------------- what instances do

/// The daemon's life with a shared state: stand by until leading, then keep the
/// lease while working, and stand by again once it is lost.
async fn live(c: SimCluster) {
    let holder = c.me().holder.clone();
    loop {
        if lead::await_lease(&c, &holder, std::future::pending(), None)
            .await
            .is_none()
        {
            return;
        }
        let (wake, _woken) = tokio::sync::mpsc::channel(4);
        c.world.note(format!("instance {} leads", c.i));
        c.me().working.store(true, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let working = work(c.clone(), stop.clone());
        tokio::pin!(working);
        tokio::select! {
            biased;
            () = lead::keep_lease(c.clone(), holder.clone(), wake) => {
                // As the daemon steps down: no new step, and the one under way
                // finishes (its writes meet the fence).
                c.me().working.store(false, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
                working.await;
            }
            () = &mut working => {}
        }
        c.me().working.store(false, Ordering::SeqCst);
        c.world.note(format!("instance {} stands by", c.i));
    }
}

/// The engine's side while leading: writes, and now and then a rotate call.
async fn work(c: SimCluster, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let (gap, rotate, statements) = {
            let mut rng = c.world.rng.lock().unwrap();
            (
                Duration::from_millis(rng.random_range(20..400)),
                rng.random_bool(0.2),
                rng.random_range(0..3),
            )
        };
        sleep(gap).await;
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if rotate {
            rotate_call(&c).await;
        } else {
            let _ = c.write(statements).await;
        }
    }
}

/// As the engine rotates: the intent committed under the epoch, the lease renewed
/// and found to cover the call's timeout, the call, the answer saved.
async fn rotate_call(c: &SimCluster) {
    if c.write(1).await.is_err() {
        return;
    }
    let me = c.me().clone();
    let Ok(left) = c
        .on_connection(async |t| me.keeper.renew_now(t).await)
        .await
    else {
        return;
    };
    let Some(epoch) = me.keeper.epoch() else {
        return;
    };
    let timeout = c.world.plan.call_timeout;
    if lease::covers_call(left, timeout).is_err() {
        return;
    }
    // The call's timeout runs on the host's clock: a slow clock stretches it.
    let reach = {
        let longest = timeout.mul_f64(1.0 / me.rate);
        let ms = longest.as_millis() as u64;
        Duration::from_millis(c.world.rng.lock().unwrap().random_range(0..=ms))
    };
    let (done, answered) = tokio::sync::oneshot::channel();
    let world = c.world.clone();
    let i = c.i;
    tokio::spawn(async move {
        sleep(reach).await;
        world.provider_reached(epoch, i);
        let _ = done.send(());
    });
    let _ = answered.await;
    let _ = c.write(1).await;
}

impl World {
    fn provider_reached(&self, epoch: i64, i: usize) {
        let now = Instant::now();
        self.calls.lock().unwrap().push((now, epoch, i));
        let mut db = self.db.lock().unwrap();
        if db.epoch() > epoch {
            let current = db.epoch();
            db.violations.push(format!(
                "{:?}: instance {i}'s rotate call under epoch {epoch} reached the provider after epoch {current} took over",
                now - self.start
            ));
        }
    }
}

// ---------------------------------------------------------------- faults and checks

#[derive(Debug, Clone, Copy)]
enum Fault {
    Pause,
    PauseInTransaction,
    Cut,
    CutInTransaction,
}

/// Until `end` minus a quiet spell: pauses and cuts, at random moments or in the
/// middle of a write's transaction.
async fn faults(world: Arc<World>, end: Instant, report: Arc<Mutex<Report>>) {
    let lease = world.plan.lease;
    loop {
        let (gap, i, d, fault) = {
            let mut rng = world.rng.lock().unwrap();
            let fault = match rng.random_range(0..4) {
                0 => Fault::Pause,
                1 => Fault::PauseInTransaction,
                2 => Fault::Cut,
                _ => Fault::CutInTransaction,
            };
            (
                Duration::from_millis(rng.random_range(500..15_000)),
                rng.random_range(0..world.instances.len()),
                Duration::from_millis(rng.random_range(100..(3 * lease.as_millis() as u64))),
                fault,
            )
        };
        sleep(gap).await;
        if Instant::now() + d + 2 * lease >= end {
            return;
        }
        let me = world.instances[i].clone();
        if matches!(fault, Fault::PauseInTransaction | Fault::CutInTransaction) {
            let give_up = Instant::now() + Duration::from_secs(5);
            while !me.in_tx.load(Ordering::SeqCst) && Instant::now() < give_up {
                sleep(Duration::from_millis(1)).await;
            }
        }
        let until = Instant::now() + d;
        world.note(format!("{fault:?} instance {i} for {d:?}"));
        match fault {
            Fault::Pause | Fault::PauseInTransaction => {
                report.lock().unwrap().pauses += 1;
                {
                    let mut paused = me.paused_until.lock().unwrap();
                    *paused = Some(paused.map_or(until, |p| p.max(until)));
                }
                me.gate.set(true);
                tokio::spawn(async move {
                    sleep_until(until).await;
                    // Overlapping pauses: the latest to end resumes it.
                    let last = *me.paused_until.lock().unwrap();
                    if last.is_some_and(|p| p <= Instant::now()) {
                        me.gate.set(false);
                    }
                });
            }
            Fault::Cut | Fault::CutInTransaction => {
                report.lock().unwrap().partitions += 1;
                let mut cut = me.cut_until.lock().unwrap();
                *cut = Some(cut.map_or(until, |c| c.max(until)));
            }
        }
    }
}

/// Every [`SAMPLE`]: no instance that could act believes in a replaced epoch, and
/// the cluster is never without an acting leader for long while it could have one.
async fn watch(world: Arc<World>, end: Instant, report: Arc<Mutex<Report>>) {
    let p = world.plan;
    let bound = p.lease + p.renew + lead::STANDBY_LOOK + SLACK;
    let mut leaderless_since: Option<Instant> = None;
    let mut told = false;
    let mut lost_since: Vec<Option<Instant>> = vec![None; world.instances.len()];
    while Instant::now() < end {
        sleep(SAMPLE).await;
        let now = Instant::now();
        let current = world.db.lock().unwrap().epoch();
        let mut healthy = false;
        let mut acting = false;
        for me in &world.instances {
            if me.gate.is_paused() {
                lost_since[me.id] = None;
                continue;
            }
            let cut = world.cut_until(me.id).is_some();
            healthy |= !cut;
            let lost = me.working.load(Ordering::SeqCst) && me.keeper.is_deposed();
            match (lost, lost_since[me.id]) {
                (false, _) => lost_since[me.id] = None,
                (true, None) => lost_since[me.id] = Some(now),
                (true, Some(since)) if now - since > STEP_DOWN => {
                    let v = format!(
                        "{:?}: instance {} still works {:?} after its lease ran out on its clock",
                        now - world.start,
                        me.id,
                        now - since
                    );
                    world.db.lock().unwrap().violations.push(v);
                    lost_since[me.id] = None;
                }
                (true, Some(_)) => {}
            }
            match me.keeper.epoch() {
                Some(e) if e < current => {
                    let v = format!(
                        "{:?}: instance {} still believes it leads at epoch {e}; the database is at epoch {current}",
                        now - world.start,
                        me.id
                    );
                    world.db.lock().unwrap().violations.push(v);
                }
                Some(e) if e == current && !cut => acting = true,
                _ => {}
            }
        }
        if healthy && !acting {
            let granted = world.db.lock().unwrap().granted.unwrap_or(world.start);
            let since = (*leaderless_since.get_or_insert(now)).max(granted);
            let long = now - since;
            let mut r = report.lock().unwrap();
            r.longest_leaderless = r.longest_leaderless.max(long);
            if long > bound && !told {
                told = true;
                world.note(format!("no acting leader for {long:?}"));
                world.db.lock().unwrap().violations.push(format!(
                    "{:?}: no instance has acted for {long:?} while one was running and connected (bound {bound:?})",
                    now - world.start
                ));
            }
        } else {
            leaderless_since = None;
            told = false;
        }
    }
}

// ---------------------------------------------------------------- runs

fn plan(seed: u64, minutes: u64, broken: Broken) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1ea5e);
    let (lease, renew, call_timeout) = if rng.random_bool(0.5) {
        (4, 1, 2)
    } else {
        (15, 5, 10)
    };
    Plan {
        instances: rng.random_range(2..=3),
        lease: Duration::from_secs(lease),
        renew: Duration::from_secs(renew),
        call_timeout: Duration::from_secs(call_timeout),
        minutes,
        broken,
    }
}

/// One seed: its instances, faults and checks for `minutes` of simulated time.
pub fn run(seed: u64, minutes: u64, broken: Broken) -> Report {
    let plan = plan(seed, minutes, broken);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(play(seed, plan))
}

async fn play(seed: u64, plan: Plan) -> Report {
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let instances = (0..plan.instances)
        .map(|id| {
            let rate = match (plan.broken, id) {
                (Broken::SlowClock, 0) => 0.8,
                _ => rng.random_range(0.95..1.05),
            };
            let clock: lease::MonotonicClock =
                Arc::new(move || start + (Instant::now() - start).mul_f64(rate));
            Arc::new(Instance {
                id,
                holder: format!("host-{id}:1"),
                keeper: Keeper::with_clock("sim", plan.lease, clock),
                gate: Arc::default(),
                paused_until: Mutex::new(None),
                cut_until: Mutex::new(None),
                conn: tokio::sync::Mutex::new(()),
                conn_id: AtomicU64::new(0),
                in_tx: AtomicBool::new(false),
                working: AtomicBool::new(false),
                rate,
            })
        })
        .collect();
    let world = Arc::new(World {
        plan,
        db: Mutex::default(),
        rng: Mutex::new(rng),
        instances,
        calls: Mutex::default(),
        start,
        trace: Mutex::default(),
    });
    let report = Arc::new(Mutex::new(Report {
        seed,
        ..Report::default()
    }));
    let end = start + Duration::from_secs(plan.minutes * 60);
    for i in 0..plan.instances {
        let c = SimCluster {
            world: world.clone(),
            i,
        };
        tokio::spawn(Pausable {
            inner: Box::pin(live(c)),
            gate: world.instances[i].gate.clone(),
        });
    }
    tokio::spawn(faults(world.clone(), end, report.clone()));
    watch(world.clone(), end, report.clone()).await;
    let mut r = std::mem::take(&mut *report.lock().unwrap());
    let db = world.db.lock().unwrap();
    r.violations = db.violations.clone();
    r.commits = db.commits.len() as u64;
    r.takeovers = db.takeovers;
    r.refused = world
        .instances
        .iter()
        .map(|i| i.keeper.refused_writes())
        .sum();
    r.calls = world.calls.lock().unwrap().len() as u64;
    r.trace = std::mem::take(&mut *world.trace.lock().unwrap());
    if r.commits == 0 || r.calls == 0 {
        r.violations
            .push("nothing was written or called: the run proves nothing".into());
    }
    r
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `seeds` on every core; the reports, in seed order.
fn run_many(seeds: Vec<u64>, minutes: u64, broken: Broken) -> Vec<Report> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let queue = Arc::new(Mutex::new(seeds));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (queue, reports) = (queue.clone(), reports.clone());
            std::thread::spawn(move || {
                while let Some(seed) = queue.lock().unwrap().pop() {
                    let r = run(seed, minutes, broken);
                    reports.lock().unwrap().push(r);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("simulation thread");
    }
    let mut reports = std::mem::take(&mut *reports.lock().unwrap());
    reports.sort_by_key(|r| r.seed);
    reports
}

/// The default budget: about half a minute of a debug build on two cores.
const DEFAULT_SEEDS: u64 = 16;
const DEFAULT_MINUTES: u64 = 30;

fn budget() -> (Vec<u64>, u64) {
    let minutes = env_u64("REKEY_SIM_LEASE_MINUTES").unwrap_or(DEFAULT_MINUTES);
    if let Some(seed) = env_u64("REKEY_SIM_LEASE_SEED") {
        return (vec![seed], minutes);
    }
    let n = env_u64("REKEY_SIM_LEASE_SEEDS").unwrap_or(DEFAULT_SEEDS);
    ((1..=n).collect(), minutes)
}

#[test]
fn the_lease_fences_every_write_and_moves_on_under_partitions_and_pauses() {
    let (seeds, minutes) = budget();
    let reports = run_many(seeds, minutes, Broken::Nothing);
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let longest = reports.iter().map(|r| r.longest_leaderless).max();
    eprintln!(
        "lease simulation: {} seeds × {minutes} min: {} commits, {} takeovers, {} writes refused, {} rotate calls, {} pauses, {} cuts; longest without an acting leader {longest:?}",
        reports.len(),
        sum(|r| r.commits),
        sum(|r| r.takeovers),
        sum(|r| r.refused),
        sum(|r| r.calls),
        sum(|r| r.pauses),
        sum(|r| r.partitions),
    );
    let traced = env_u64("REKEY_SIM_LEASE_TRACE");
    for r in (reports.iter()).filter(|r| reports.len() == 1 || Some(r.seed) == traced) {
        // A replay: the whole story.
        for line in &r.trace {
            eprintln!("{line}");
        }
    }
    let mut msg = String::new();
    for r in reports.iter().filter(|r| !r.violations.is_empty()) {
        msg.push_str(&format!(
            "\nseed {} broke an invariant (replay: REKEY_SIM_LEASE_SEED={} REKEY_SIM_LEASE_MINUTES={minutes} cargo test --test it sim::lease -- --nocapture):\n",
            r.seed, r.seed
        ));
        for v in r.violations.iter().take(8) {
            msg.push_str(&format!("  - {v}\n"));
        }
    }
    assert!(msg.is_empty(), "{msg}");
    if reports.len() > 1 {
        // Takeovers under faults did happen, and refused writes with them: the
        // fence was exercised, not just present.
        assert!(sum(|r| r.takeovers) > reports.len() as u64);
        assert!(sum(|r| r.refused) > 0);
    }
}

/// A control: `broken` must be caught by some seed of the default budget, with a
/// violation naming `what`.
fn caught(broken: Broken, what: &str) {
    let (seeds, minutes) = budget();
    let reports = run_many(seeds, minutes, broken);
    let found = reports
        .iter()
        .flat_map(|r| &r.violations)
        .find(|v| v.contains(what));
    assert!(
        found.is_some(),
        "{broken:?} went unnoticed: {:?}",
        reports
            .iter()
            .flat_map(|r| &r.violations)
            .take(4)
            .collect::<Vec<_>>()
    );
}

#[test]
fn control_a_write_whose_check_does_not_lock_the_row_commits_under_an_old_epoch() {
    caught(Broken::NoRowLock, "committed a write under epoch");
}

#[test]
fn control_without_an_idle_limit_a_frozen_transaction_holds_the_takeover_back() {
    caught(Broken::NoIdleLimit, "no instance has acted for");
}

#[test]
fn control_a_clock_slower_than_the_trust_window_allows_acts_on_a_replaced_lease() {
    caught(Broken::SlowClock, "still believes it leads");
}
