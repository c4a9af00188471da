//! Durable state: one SQLite database in `state_dir`.
//!
//! `subscriptions` holds each subscription's current [`RotationState`]; `history` is the
//! append-only log of every transition (the audit trail `rekey history` shows). Each
//! state change and its history row are written in one transaction, with WAL and
//! `synchronous = FULL`, so a commit that returned is on disk: that is the fsync the
//! mint step relies on. The minted secret is the only secret ever stored here, and only
//! until it is published; `secure_delete` zeroes the freed pages and a WAL checkpoint
//! truncates the log, so no copy lingers in the file afterwards.
//!
//! With `[state] url`, the same tables live in PostgreSQL instead ([`postgres`]),
//! shared by several rekey instances of which one leads at a time ([`lease`]).
//! [`StateDb`] is the one face of both: callers never know which one they use.

pub mod lease;
mod postgres;

pub use lease::{Keeper, Leader, Leadership, LeaseTable};
pub use postgres::{PG_SCHEMA_VERSION, PgDb, PgSettings};

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::evidence::{Evidence, FailureTally};
use crate::rotation::{Phase, RotationState, Transition};
use crate::secret::{ExposeSecret, Fingerprint, secret};

/// The schema as a list of migrations: `MIGRATIONS[i]` takes a database from
/// version `i` to `i + 1`, so a schema change appends a step (an `ALTER TABLE`, say).
/// [`StateDb::open`] runs the missing steps in the immediate transaction that read the
/// version, so two openers never both migrate and no reader sees half a schema.
const MIGRATIONS: &[&str] = &[SCHEMA_1, SCHEMA_2, SCHEMA_3];

/// The version this rekey writes; a database from a newer one is refused with a
/// clear message instead of being misread.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SCHEMA_1: &str = "
    CREATE TABLE subscriptions (
        name TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        rotation_id TEXT,
        intent_at TEXT,
        rotated_at TEXT,
        published_at TEXT,
        confirm_deadline TEXT,
        pending_secret TEXT,
        new_fingerprint TEXT,
        previous_fingerprint TEXT,
        rotate_in_flight INTEGER NOT NULL DEFAULT 0,
        lost_responses INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        not_before TEXT,
        last_error TEXT,
        last_rotated_at TEXT,
        last_outcome TEXT,
        first_seen_at TEXT NOT NULL,
        next_due_at TEXT,
        phase_since TEXT NOT NULL
    );
    CREATE TABLE history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription TEXT NOT NULL,
        at TEXT NOT NULL,
        rotation_id TEXT,
        from_phase TEXT NOT NULL,
        to_phase TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX history_by_subscription ON history (subscription, seq);
    CREATE TABLE requests (
        subscription TEXT PRIMARY KEY,
        requested_at TEXT NOT NULL
    );
";

/// Version 2: each record keeps its rotation's [`Target`].
const SCHEMA_2: &str = "ALTER TABLE subscriptions ADD COLUMN target TEXT;";

/// Version 3: a confirmation's failed deliveries (JSON [`FailureTally`]) and, in the
/// history, what a confirmation rested on (JSON [`Evidence`]).
const SCHEMA_3: &str = "
    ALTER TABLE subscriptions ADD COLUMN delivery_failures TEXT;
    ALTER TABLE history ADD COLUMN evidence TEXT;
";

/// Tables schema 1 gained after its release, without a version bump (an older rekey
/// ignores them): created whenever a database is at version 1, before any later step,
/// so a version-1 database from before them gains them too.
const SCHEMA_1_LATE: &str = "
    CREATE TABLE IF NOT EXISTS operator_decisions (
        subscription TEXT PRIMARY KEY,
        decision TEXT NOT NULL CHECK (decision IN ('resume', 'retire')),
        requested_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS discovered (
        name TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        id TEXT NOT NULL,
        vault_path TEXT NOT NULL,
        first_seen_at TEXT NOT NULL,
        vanished_at TEXT
    );
";

pub const DB_FILE: &str = "rekey.db";

/// How long an opener or writer waits for another connection's lock (a first start
/// creating the schema, a daemon's write) before it gives up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long truncating the WAL after a publication waits for readers (`rekey status`)
/// to finish; SQLite's busy handler retries with short sleeps until then. Longer would
/// stall the rotation for the sake of a cleanup the next save retries anyway.
const CHECKPOINT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// How much zeroed space the WAL keeps after a truncation (see
/// [`SqliteDb::reserve_wal`]): what the log held before it, so one rotation's
/// commits fit again, within these bounds. 256 KiB is two rotations' worth of
/// commits; more than 1 MiB would make each truncation a large write for little.
const WAL_RESERVE_MIN: u64 = 256 * 1024;
const WAL_RESERVE_MAX: u64 = 1024 * 1024;

/// Those of `names` not among the `existing` records' names: the records a fleet's
/// adoption creates (either backend).
fn absent<'a>(names: &[&'a str], existing: Vec<String>) -> Vec<&'a str> {
    let existing: std::collections::HashSet<String> = existing.into_iter().collect();
    names
        .iter()
        .copied()
        .filter(|n| !existing.contains(*n))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error(
        "state database {path} has schema version {found}, this rekey understands {SCHEMA_VERSION}; \
         use the rekey version that wrote it, or move the file aside to start afresh"
    )]
    SchemaVersion { path: PathBuf, found: i64 },
    #[error(
        "state database {path} has schema version {found}; `rekey run` upgrades it to \
         {SCHEMA_VERSION} when it next starts, and this command can read it after that"
    )]
    Outdated { path: PathBuf, found: i64 },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database {url}: {detail}")]
    Postgres { url: String, detail: String },
    #[error(
        "state database {url} has schema version {found}, this rekey understands {PG_SCHEMA_VERSION}; \
         use the rekey version that wrote it"
    )]
    PostgresSchema { url: String, found: i64 },
    #[error(
        "state write refused: another rekey instance took over cluster `{cluster}` \
         (this one held epoch {epoch}); this instance stops acting and stands by"
    )]
    Deposed { cluster: String, epoch: i64 },
    #[error("state database: stored row for `{subscription}` is corrupt: {detail}")]
    Corrupt {
        subscription: String,
        detail: String,
    },
}

/// A subscription's stored record.
#[derive(Debug, Clone)]
pub struct Record {
    /// `<provider>/<id>`.
    pub name: String,
    pub state: RotationState,
    pub first_seen_at: DateTime<Utc>,
    pub next_due_at: Option<DateTime<Utc>>,
    /// When the phase last changed ("time in state").
    pub phase_since: DateTime<Utc>,
    /// Where the rotation under way publishes and whom it asks; set while a rotation
    /// id is, `None` otherwise.
    pub target: Option<Target>,
}

/// What a rotation works on, fixed when it starts: a config changed mid-rotation (a
/// moved `vault_path`, a renamed provider, a removed subscription) neither strands
/// its secret nor sends it somewhere its retire cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    /// The provider account's name in the config.
    pub provider: String,
    /// The provider's kind (`fintoro`…), for the store entry.
    pub kind: String,
    pub id: String,
    pub policy: String,
    pub vault_path: String,
}

/// One history row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryRow {
    pub seq: i64,
    pub subscription: String,
    pub at: DateTime<Utc>,
    pub rotation_id: Option<String>,
    pub from: String,
    pub to: String,
    pub event: String,
    pub detail: String,
    /// What a confirmation rested on (confirming rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// Which history rows to read (see [`StateDb::history_page`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryFilter<'a> {
    /// One subscription's rows; all when `None`.
    pub subscription: Option<&'a str>,
    /// Rows recorded at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl HistoryFilter<'_> {
    /// The filter as `AND …` clauses and their values, in order. A clause is in the
    /// text only when its filter is set, so one subscription's rows come through its
    /// index instead of a walk over everyone's. `at` is always written by `ts1`
    /// (fixed width, UTC), so text order is time order.
    fn condition(&self) -> (String, Vec<rusqlite::types::Value>) {
        let mut sql = String::new();
        let mut values = Vec::new();
        if let Some(name) = self.subscription {
            sql.push_str(" AND subscription = ?");
            values.push(name.to_string().into());
        }
        if let Some(since) = self.since {
            sql.push_str(" AND at >= ?");
            values.push(ts1(since).into());
        }
        (sql, values)
    }
}

/// How many history rows one read returns at most, for callers that walk the table.
pub const HISTORY_PAGE: usize = 500;

/// History rows [`StateDb::prune_history`] deletes per transaction in the daemon and
/// one-shot runs: short enough that a rotation's save never waits long behind one.
pub const PRUNE_BATCH: usize = 500;

/// A history row as stored, before validation.
struct RawHistoryRow {
    seq: i64,
    subscription: String,
    at: String,
    rotation_id: Option<String>,
    from: String,
    to: String,
    event: String,
    detail: String,
    evidence: Option<String>,
}

impl RawHistoryRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawHistoryRow> {
        Ok(RawHistoryRow {
            seq: r.get(0)?,
            subscription: r.get(1)?,
            at: r.get(2)?,
            rotation_id: r.get(3)?,
            from: r.get(4)?,
            to: r.get(5)?,
            event: r.get(6)?,
            detail: r.get(7)?,
            evidence: r.get(8)?,
        })
    }

    fn into_row(self) -> Result<HistoryRow, StateError> {
        let at = parse_ts(&self.subscription, "history.at", Some(self.at))?.unwrap_or_default();
        let evidence = self
            .evidence
            .map(|e| serde_json::from_str(&e))
            .transpose()
            .map_err(|e| StateError::Corrupt {
                subscription: self.subscription.clone(),
                detail: format!("history row {}, column evidence: {e}", self.seq),
            })?;
        Ok(HistoryRow {
            seq: self.seq,
            subscription: self.subscription,
            at,
            rotation_id: self.rotation_id,
            from: self.from,
            to: self.to,
            event: self.event,
            detail: self.detail,
            evidence,
        })
    }
}

/// The state, in SQLite or PostgreSQL (see the module's documentation).
pub struct StateDb {
    backend: Backend,
}

enum Backend {
    Sqlite(SqliteDb),
    Postgres(Box<postgres::PgDb>),
}

/// Where the state lives: SQLite in `state_dir`, or PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub enum Location<'a> {
    Dir(&'a Path),
    Postgres(&'a PgSettings),
}

/// Calls the same method on whichever backend holds the state.
macro_rules! each {
    ($self:ident, $db:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($db) => $call,
            Backend::Postgres($db) => off_worker(|| $call),
        }
    };
}

/// Runs a PostgreSQL call, which waits on the network (up to its timeout), so that
/// on a daemon's async worker it first hands the worker's other tasks to another
/// thread: with the database cut off, saves waiting out their timeouts must not
/// stall the lease's step-down, the signals or the metrics. SQLite's calls take
/// microseconds and stay where they are.
pub fn off_worker<R>(call: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

impl StateDb {
    /// Opens (creating if needed) SQLite's database in `state_dir` (see
    /// [`StateDb::open_at`] for either backend).
    pub fn open(state_dir: &Path) -> Result<StateDb, StateError> {
        StateDb::open_at(Location::Dir(state_dir))
    }

    /// Opens the state, creating or upgrading its schema.
    pub fn open_at(at: Location<'_>) -> Result<StateDb, StateError> {
        let backend = match at {
            Location::Dir(dir) => Backend::Sqlite(SqliteDb::open(dir)?),
            Location::Postgres(pg) => Backend::Postgres(Box::new(postgres::PgDb::open(pg)?)),
        };
        Ok(StateDb { backend })
    }

    /// For the commands that only show the state: creates nothing, and `None` while
    /// there is no state yet.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<StateDb>, StateError> {
        StateDb::open_read_only_at(Location::Dir(state_dir))
    }

    pub fn open_read_only_at(at: Location<'_>) -> Result<Option<StateDb>, StateError> {
        Ok(match at {
            Location::Dir(dir) => SqliteDb::open_read_only(dir)?.map(Backend::Sqlite),
            Location::Postgres(pg) => {
                postgres::PgDb::open_read_only(pg)?.map(|db| Backend::Postgres(Box::new(db)))
            }
        }
        .map(|backend| StateDb { backend }))
    }

    /// Where the state is, for messages: the SQLite file or the PostgreSQL URL.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(db) => db.path().display().to_string(),
            Backend::Postgres(db) => db.url().to_string(),
        }
    }

    /// The PostgreSQL backend, for the lease: `None` on SQLite, where the state
    /// directory's lock keeps a second instance out instead.
    pub fn shared(&self) -> Option<&postgres::PgDb> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(db) => Some(db),
        }
    }

    pub fn save_counts(&self) -> SaveCounts {
        each!(self, db => db.save_counts())
    }

    /// Hands back the memory SQLite's page cache holds (up to 2 MiB, full after a
    /// fleet's records were loaded) at a quiet moment; it fills again as pages are
    /// read. Nothing on PostgreSQL.
    pub fn release_memory(&self) {
        if let Backend::Sqlite(db) = &self.backend
            && let Err(e) = db.conn().execute_batch("PRAGMA shrink_memory")
        {
            tracing::debug!(error = %e, "cannot shrink the state database's cache");
        }
    }

    /// Whether a WAL truncation is still owed (SQLite; see [`StateDb::save`]).
    pub fn checkpoint_owed(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(db) => db.checkpoint_owed(),
            Backend::Postgres(_) => false,
        }
    }

    /// Returns the record, creating an idle one first seen `now` if there is none.
    pub fn load_or_create(&self, name: &str, now: DateTime<Utc>) -> Result<Record, StateError> {
        each!(self, db => db.load_or_create(name, now))
    }

    pub fn load(&self, name: &str) -> Result<Option<Record>, StateError> {
        each!(self, db => db.load(name))
    }

    pub fn load_all(&self) -> Result<Vec<Record>, StateError> {
        each!(self, db => db.load_all())
    }

    /// Hands `each` the record of every name in `names`, creating an idle one first
    /// seen `now` for each that has none, all in one transaction. `each` runs while
    /// the database is held, so it must not use it.
    pub fn load_or_create_many(
        &self,
        names: &[&str],
        now: DateTime<Utc>,
        each: impl FnMut(Record),
    ) -> Result<(), StateError> {
        each!(self, db => db.load_or_create_many(names, now, each))
    }

    /// The name of every record.
    pub fn names(&self) -> Result<Vec<String>, StateError> {
        each!(self, db => db.names())
    }

    /// The names of the records with a rotation started (a rotation id set).
    pub fn rotating_names(&self) -> Result<Vec<String>, StateError> {
        each!(self, db => db.rotating_names())
    }

    /// Sets the next due time of each named record, in one transaction.
    pub fn set_next_due(&self, dues: &[(String, Option<DateTime<Utc>>)]) -> Result<(), StateError> {
        each!(self, db => db.set_next_due(dues))
    }

    /// Persists `record` and appends `transition` to the history, atomically and
    /// durably. When this returns `Ok`, the state survives a crash or power loss.
    pub fn save(
        &self,
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        match &self.backend {
            Backend::Sqlite(db) => db.save(record, transition, now),
            Backend::Postgres(db) => off_worker(|| db.save(record, transition, now, true)),
        }
    }

    /// Persists a routine step (a confirmation poll without news, waking from a wait):
    /// no history row, and no wait for the disk. A record that did not change is not
    /// written at all (see the SQLite backend's `save_routine` for why this is safe).
    pub fn save_routine(&self, record: &Record, now: DateTime<Utc>) -> Result<(), StateError> {
        match &self.backend {
            Backend::Sqlite(db) => db.save_routine(record, now),
            Backend::Postgres(db) => off_worker(|| db.save(record, None, now, false)),
        }
    }

    /// The whole history of one subscription (or all, with `None`), oldest first. For
    /// tests and the sandbox: anything facing a real fleet reads [`StateDb::history_page`].
    pub fn history(&self, name: Option<&str>) -> Result<Vec<HistoryRow>, StateError> {
        let filter = HistoryFilter {
            subscription: name,
            since: None,
        };
        let mut rows = Vec::new();
        loop {
            let after = rows.last().map_or(0, |r: &HistoryRow| r.seq);
            let page = self.history_page(&filter, after, HISTORY_PAGE)?;
            let more = page.len() == HISTORY_PAGE;
            rows.extend(page);
            if !more {
                return Ok(rows);
            }
        }
    }

    /// At most `limit` history rows after `after_seq` that `filter` lets through,
    /// oldest first; a caller walking a large table pages on with the last `seq`.
    pub fn history_page(
        &self,
        filter: &HistoryFilter<'_>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StateError> {
        each!(self, db => db.history_page(filter, after_seq, limit))
    }

    /// Where to start paging to read only the newest `newest` rows `filter` passes.
    pub fn history_tail_start(
        &self,
        filter: &HistoryFilter<'_>,
        newest: usize,
    ) -> Result<i64, StateError> {
        each!(self, db => db.history_tail_start(filter, newest))
    }

    /// At most `limit` history rows after `seq` (all subscriptions), oldest first.
    pub fn history_after(&self, seq: i64, limit: usize) -> Result<Vec<HistoryRow>, StateError> {
        self.history_page(&HistoryFilter::default(), seq, limit)
    }

    /// Deletes up to `batch` of the oldest history rows recorded before `before`
    /// (never those of a rotation under way); returns how many went.
    pub fn prune_history(&self, before: DateTime<Utc>, batch: usize) -> Result<usize, StateError> {
        each!(self, db => db.prune_history(before, batch))
    }

    /// The newest history row's sequence number (0 when empty).
    pub fn last_seq(&self) -> Result<i64, StateError> {
        each!(self, db => db.last_seq())
    }

    /// Records an operator's request to rotate `name` as soon as possible.
    pub fn add_request(&self, name: &str, now: DateTime<Utc>) -> Result<(), StateError> {
        self.ask(Ask::Rotate(&[name.to_string()]), now, || ())
    }

    /// The operator's requests and decisions waiting, oldest first. Each stays in
    /// the state until [`StateDb::clear_ask`] once the job it started has finished,
    /// so an ask outlives a crash, or a failover to another instance, between being
    /// read and being acted on.
    pub fn pending_asks(&self) -> Result<Vec<PendingAsk>, StateError> {
        each!(self, db => db.pending_asks())
    }

    /// Removes `ask`, unless it was asked again since it was read (a newer stamp).
    pub fn clear_ask(&self, ask: &PendingAsk) -> Result<(), StateError> {
        each!(self, db => db.clear_ask(ask))
    }

    /// Records what an operator asks of the running rekey and, before committing,
    /// calls `then` (which reads who holds the state directory): ordered against
    /// [`StateDb::take_asks`], so either the ask is among those taken, or `then`
    /// runs after the taker's `then` (which says it takes no more).
    pub fn ask<T>(
        &self,
        ask: Ask<'_>,
        now: DateTime<Utc>,
        then: impl FnOnce() -> T,
    ) -> Result<T, StateError> {
        each!(self, db => db.ask(ask, now, then))
    }

    /// Takes every recorded request and decision at once; `then` sees them before
    /// the commit (see [`StateDb::ask`] for why).
    pub fn take_asks(&self, then: impl FnOnce(&Asks)) -> Result<Asks, StateError> {
        each!(self, db => db.take_asks(then))
    }

    /// Records that the provider lists `name` now. Returns true when it is new or
    /// came back after vanishing (worth a history row).
    pub fn saw_discovered(
        &self,
        name: &str,
        provider: &str,
        id: &str,
        vault_path: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        each!(self, db => db.saw_discovered(name, provider, id, vault_path, now))
    }

    /// Marks a discovered subscription as no longer listed.
    pub fn mark_vanished(&self, name: &str, now: DateTime<Utc>) -> Result<(), StateError> {
        each!(self, db => db.mark_vanished(name, now))
    }

    /// Every discovered subscription, vanished or not.
    pub fn discovered(&self) -> Result<Vec<Discovered>, StateError> {
        each!(self, db => db.discovered())
    }

    /// Records an operator's decision on a held subscription (`retire` or resume) for
    /// the running daemon to apply; a later decision replaces an earlier one.
    pub fn add_decision(
        &self,
        name: &str,
        retire: bool,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.ask(Ask::Decide { name, retire }, now, || ())
    }

    #[cfg(test)]
    fn sqlite(&self) -> &SqliteDb {
        match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Postgres(_) => panic!("an SQLite test on PostgreSQL"),
        }
    }

    #[cfg(test)]
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.sqlite().conn()
    }
}

pub(crate) struct SqliteDb {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// A WAL truncation that readers kept busy, retried at the next save: until it
    /// succeeds, the page image of a published secret may remain in the `-wal` file.
    checkpoint_owed: AtomicBool,
    /// The connection may be left at `synchronous = NORMAL` by a routine save (see
    /// [`StateDb::save_routine`]); a synced save sets FULL again first.
    relaxed: AtomicBool,
    /// Record saves that wrote something, and those of them that waited for an fsync.
    commits: AtomicU64,
    synced: AtomicU64,
}

/// How many record saves ([`StateDb::save`], [`StateDb::save_routine`]) this
/// connection committed: what a rotation step costs in writes and in fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaveCounts {
    /// Transactions that wrote to the database.
    pub commits: u64,
    /// Those of them that returned only once on disk (an fsync of the WAL).
    pub synced: u64,
}

fn ts(t: &Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

fn ts1(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(name: &str, col: &str, v: Option<String>) -> Result<Option<DateTime<Utc>>, StateError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| StateError::Corrupt {
                subscription: name.to_string(),
                detail: format!("column {col}: {e}"),
            })
    })
    .transpose()
}

/// Switches the database to WAL (a no-op once it is). The first switch needs an
/// exclusive lock, and SQLite answers a contended one with BUSY at once instead of
/// through the busy handler (waiting could deadlock two openers), so a first start
/// racing another rekey command retries here, for at most [`BUSY_TIMEOUT`].
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// An SQL error while opening most likely means a damaged file or a read-only
/// directory; say so next to the path.
fn damaged(path: &Path, e: StateError) -> StateError {
    match e {
        StateError::Sql(e) => StateError::Open {
            path: path.to_path_buf(),
            detail: format!("{e} (is the file damaged, or the directory read-only?)"),
        },
        other => other,
    }
}

impl SqliteDb {
    /// Opens (creating if needed) the database in `state_dir`. The directory is created
    /// with mode 0700 and the file with 0600. Any number of rekey processes may open a
    /// fresh directory at once: one creates the schema, the others wait for it.
    pub fn open(state_dir: &Path) -> Result<SqliteDb, StateError> {
        let path = state_dir.join(DB_FILE);
        let open_err = |detail: String| StateError::Open {
            path: path.clone(),
            detail,
        };
        if !state_dir.exists() {
            std::fs::create_dir_all(state_dir)
                .map_err(|e| open_err(format!("cannot create state_dir: {e}")))?;
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| open_err(format!("cannot set state_dir mode: {e}")))?;
        }
        // Create it owner-only before SQLite opens it, so it is never world-readable.
        // Another opener may have just done so.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(open_err(format!("cannot create: {e}"))),
        }
        let conn = Connection::open(&path).map_err(|e| open_err(e.to_string()))?;
        let db = SqliteDb::with(conn, path.clone());
        db.init().map_err(|e| damaged(&path, e))?;
        Ok(db)
    }

    /// Opens the database for reading only, creating nothing: `None` while there is
    /// no state yet (no file, or a first start still creating the schema). For the
    /// commands that only show the state.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<SqliteDb>, StateError> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(|e| StateError::Open {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let db = SqliteDb::with(conn, path.clone());
        let has_schema = db.check_read_only().map_err(|e| damaged(&path, e))?;
        Ok(has_schema.then_some(db))
    }

    fn with(conn: Connection, path: PathBuf) -> SqliteDb {
        SqliteDb {
            conn: Mutex::new(conn),
            path,
            checkpoint_owed: AtomicBool::new(false),
            relaxed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A poisoned lock means a panic mid-transaction; SQLite rolled it back, so the
        // connection is still consistent and safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn init(&self) -> Result<(), StateError> {
        let mut conn = self.conn();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        enable_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Immediate: the write lock is taken before the version is read, so a second
        // opener waits here until the first has committed the whole schema.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        self.migrate(&tx)?;
        tx.commit()?;
        self.quick_check(&conn)
    }

    /// Brings the schema to [`SCHEMA_VERSION`], inside the caller's transaction.
    fn migrate(&self, tx: &Transaction<'_>) -> Result<(), StateError> {
        let found = self.schema_version(tx)?;
        if found > SCHEMA_VERSION {
            return Err(self.version_error(found));
        }
        let mut version = found;
        loop {
            if version == 1 {
                tx.execute_batch(SCHEMA_1_LATE)?;
            }
            let Some(step) = MIGRATIONS.get(version as usize) else {
                break;
            };
            tx.execute_batch(step)?;
            version += 1;
        }
        if version != found {
            tx.pragma_update(None, "user_version", version)?;
        }
        Ok(())
    }

    /// The stored version; an empty database is version 0, and one with tables but no
    /// version is not rekey's.
    fn schema_version(&self, conn: &Connection) -> Result<i64, StateError> {
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        if found < 0 || (found == 0 && tables > 0) {
            return Err(self.version_error(found));
        }
        Ok(found)
    }

    fn version_error(&self, found: i64) -> StateError {
        StateError::SchemaVersion {
            path: self.path.clone(),
            found,
        }
    }

    /// A read-only database is usable as it is, or not at all: true when it holds
    /// the current schema, false when it is still empty.
    fn check_read_only(&self) -> Result<bool, StateError> {
        let mut conn = self.conn();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // One snapshot for both reads: a first start commits its schema atomically.
        let tx = conn.transaction()?;
        let found = self.schema_version(&tx)?;
        drop(tx);
        match found {
            0 => Ok(false),
            SCHEMA_VERSION => self.quick_check(&conn).map(|()| true),
            older if older < SCHEMA_VERSION => Err(StateError::Outdated {
                path: self.path.clone(),
                found: older,
            }),
            newer => Err(self.version_error(newer)),
        }
    }

    /// Fails fast on a damaged file rather than at the first rotation.
    fn quick_check(&self, conn: &Connection) -> Result<(), StateError> {
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(StateError::Open {
                path: self.path.clone(),
                detail: format!("integrity check failed: {ok}"),
            });
        }
        Ok(())
    }

    pub fn save_counts(&self) -> SaveCounts {
        SaveCounts {
            commits: self.commits.load(Ordering::Relaxed),
            synced: self.synced.load(Ordering::Relaxed),
        }
    }

    /// Whether a WAL truncation is still owed (see [`StateDb::save`]).
    pub fn checkpoint_owed(&self) -> bool {
        self.checkpoint_owed.load(Ordering::Relaxed)
    }

    /// Returns the record, creating an idle one first seen `now` if there is none.
    pub fn load_or_create(&self, name: &str, now: DateTime<Utc>) -> Result<Record, StateError> {
        if let Some(r) = self.load(name)? {
            return Ok(r);
        }
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO subscriptions (name, phase, first_seen_at, phase_since)
             VALUES (?1, 'idle', ?2, ?2)",
            params![name, ts1(now)],
        )?;
        drop(conn);
        self.load(name)?.ok_or_else(|| StateError::Corrupt {
            subscription: name.to_string(),
            detail: "row vanished right after insert".into(),
        })
    }

    pub fn load(&self, name: &str) -> Result<Option<Record>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM subscriptions WHERE name = ?1"
        ))?;
        let row = stmt.query_row([name], RawRow::from_row).optional()?;
        row.map(RawRow::into_record).transpose()
    }

    pub fn load_all(&self) -> Result<Vec<Record>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM subscriptions ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([], RawRow::from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawRow::into_record).collect()
    }

    /// Hands `each` the record of every name in `names`, creating an idle one first
    /// seen `now` for each that has none: all the new ones in one transaction, so
    /// adopting a fleet costs one commit, not one per subscription. The records are
    /// read one at a time (a fleet's are never all in memory at once); `each` runs
    /// while the database is held, so it must not use it.
    pub fn load_or_create_many(
        &self,
        names: &[&str],
        now: DateTime<Utc>,
        mut each: impl FnMut(Record),
    ) -> Result<(), StateError> {
        let missing = absent(names, self.names()?);
        if !missing.is_empty() {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO subscriptions (name, phase, first_seen_at, phase_since)
                     VALUES (?1, 'idle', ?2, ?2)",
                )?;
                let at = ts1(now);
                for n in &missing {
                    insert.execute(params![n, at])?;
                }
            }
            tx.commit()?;
        }
        // A few are read one by one; many, in one pass over the table.
        if names.len() <= 64 {
            for n in names {
                let rec = self.load(n)?.ok_or_else(|| StateError::Corrupt {
                    subscription: n.to_string(),
                    detail: "row vanished right after insert".into(),
                })?;
                each(rec);
            }
            return Ok(());
        }
        let wanted: std::collections::HashSet<&str> = names.iter().copied().collect();
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM subscriptions ORDER BY name"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let raw = RawRow::from_row(row)?;
            if wanted.contains(raw.name.as_str()) {
                each(raw.into_record()?);
            }
        }
        Ok(())
    }

    /// The name of every record.
    pub fn names(&self) -> Result<Vec<String>, StateError> {
        self.names_where("1")
    }

    /// The names of the records with a rotation started (a rotation id set).
    pub fn rotating_names(&self) -> Result<Vec<String>, StateError> {
        self.names_where("rotation_id IS NOT NULL")
    }

    fn names_where(&self, condition: &str) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT name FROM subscriptions WHERE {condition} ORDER BY name"
        ))?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    }

    /// Sets the next due time of each named record, in one transaction.
    pub fn set_next_due(&self, dues: &[(String, Option<DateTime<Utc>>)]) -> Result<(), StateError> {
        if dues.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut update =
                tx.prepare_cached("UPDATE subscriptions SET next_due_at = ?2 WHERE name = ?1")?;
            for (name, due) in dues {
                update.execute(params![name, ts(due)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Persists `record` and appends `transition` to the history, atomically and
    /// durably. When this returns `Ok`, the state survives a crash or power loss.
    pub fn save(
        &self,
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.save_with(record, transition, now, true)
    }

    /// Persists a routine step (a confirmation poll without news, waking from a wait):
    /// no history row, and no wait for an fsync. The write is committed and visible at
    /// once, survives the process dying, and becomes durable with the next
    /// [`StateDb::save`] (the WAL is synced in order, so it never outlives a later
    /// write). A power cut can lose it, and only it: the record then reads as it did
    /// before that step, and the step simply happens again, which is all a routine
    /// step is worth. A record that did not change is not written at all.
    pub fn save_routine(&self, record: &Record, now: DateTime<Utc>) -> Result<(), StateError> {
        self.save_with(record, None, now, false)
    }

    fn save_with(
        &self,
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
        synced: bool,
    ) -> Result<(), StateError> {
        let mut values = record_values(record);
        let mut conn = self.conn();
        if synced == self.relaxed.load(Ordering::Relaxed) {
            // A routine save relaxes the connection for its commit only; a synced save
            // after one whose restore failed makes sure it is back to FULL.
            self.relaxed.store(true, Ordering::Relaxed);
            conn.pragma_update(None, "synchronous", if synced { "FULL" } else { "NORMAL" })?;
            self.relaxed.store(!synced, Ordering::Relaxed);
        }
        let result = self.write_record(&mut conn, &values, record, transition, now);
        forget_secret(&mut values);
        if !synced {
            // Not the save's failure: it is committed. The next synced save retries.
            match conn.pragma_update(None, "synchronous", "FULL") {
                Ok(()) => self.relaxed.store(false, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set the state database back to synchronous=FULL; retried at the next save")
                }
            }
        }
        let written = result?;
        if written.is_some() {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.synced.fetch_add(u64::from(synced), Ordering::Relaxed);
        }
        if written == Some(true) || self.checkpoint_owed() {
            // The overwritten row's old page image still sits in the WAL until a
            // checkpoint; truncating the WAL removes that last copy of the secret.
            self.truncate_wal(&conn, &record.name);
        }
        Ok(())
    }

    /// One transaction: the record's row (`values`, in [`RECORD_COLUMNS`] order) and
    /// the history row. `None` when there was nothing to write (the stored row is
    /// `values` already and no transition is recorded); otherwise whether it wiped a
    /// stored secret.
    fn write_record(
        &self,
        conn: &mut Connection,
        values: &[rusqlite::types::Value],
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, StateError> {
        let tx = conn.transaction()?;
        let Some(t) = transition else {
            return write_routine(tx, values, &record.name);
        };
        // A step writes its history row whatever the record, so the stored row is
        // not read to compare (the mint commit, which the exposure window waits for,
        // reads nothing): SQLite itself leaves a row rewritten unchanged, and its
        // page, as they were. Only a save without a secret asks whether one was stored.
        let wiped_secret = values[SECRET_COLUMN] == rusqlite::types::Value::Null
            && tx
                .prepare_cached(
                    "SELECT pending_secret IS NOT NULL FROM subscriptions WHERE name = ?1",
                )?
                .query_row([&record.name], |r| r.get::<_, bool>(0))
                .optional()?
                .unwrap_or(false);
        upsert(&tx, values)?;
        tx.prepare_cached(
            "INSERT INTO history (subscription, at, rotation_id, from_phase, to_phase, event,
                detail, evidence)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            record.name,
            ts1(now),
            record.state.rotation_id,
            t.from.as_str(),
            t.to.as_str(),
            t.event,
            t.detail,
            t.evidence
                .as_ref()
                .and_then(|e| serde_json::to_string(e).ok()),
        ])?;
        tx.commit()?;
        Ok(Some(wiped_secret))
    }

    /// Truncates the WAL, or, when readers keep it busy past [`CHECKPOINT_PATIENCE`],
    /// says so and owes it to the next save. Never fails the save: the state is
    /// committed, only the cleanup is late.
    fn truncate_wal(&self, conn: &Connection, subscription: &str) {
        let used = std::fs::metadata(self.wal_path()).map_or(0, |m| m.len());
        let attempt = || -> Result<bool, rusqlite::Error> {
            conn.busy_timeout(CHECKPOINT_PATIENCE)?;
            // (busy, frames in the log, frames checkpointed)
            let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
            conn.busy_timeout(BUSY_TIMEOUT)?;
            Ok(busy? == 0)
        };
        let result = attempt();
        if matches!(result, Ok(true)) {
            self.reserve_wal(conn, used.clamp(WAL_RESERVE_MIN, WAL_RESERVE_MAX));
        }
        let was_owed = self
            .checkpoint_owed
            .swap(!matches!(result, Ok(true)), Ordering::Relaxed);
        match result {
            Ok(true) if was_owed => {
                tracing::info!(
                    "state database WAL truncated; no copy of a published secret remains in it"
                )
            }
            Ok(true) => {}
            Ok(false) if was_owed => {
                tracing::debug!("state database WAL still busy; truncation stays owed")
            }
            Ok(false) => tracing::warn!(
                subscription = %subscription,
                wal = %format!("{}-wal", self.path.display()),
                "state database WAL busy with a reader: the page that held the minted secret may \
                 remain in the WAL until the next checkpoint; retried at the next save"
            ),
            Err(e) => tracing::warn!(
                subscription = %subscription,
                error = %e,
                "cannot truncate the state database WAL: the page that held the minted secret \
                 may remain in it until the next checkpoint; retried at the next save"
            ),
        }
    }

    fn wal_path(&self) -> PathBuf {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        PathBuf::from(wal)
    }

    /// Gives the WAL just truncated `len` bytes of zeros back. SQLite writes its log
    /// from the start again after a truncation; into an empty file, each commit
    /// extends it, and its fsync then waits for the file system to allocate the
    /// blocks and journal the new size (on ext4, a commit of a few pages cost twice a
    /// bare fsync). Into zeros already on disk, a commit is an overwrite in place and
    /// costs one fsync, like any other. This matters most for the mint commit, which
    /// the exposure window waits for. The zeros are not synced here: the next
    /// commit's first fsync (of the log's new header) writes them out, off the
    /// window, and an fdatasync here cost a fleet of 1,000 a third of its speed (a
    /// publication every 14 ms, each holding the database for it). Zeros past
    /// SQLite's last frame, on disk or not yet, are what stale frames always are to
    /// it: they fail the frame checksum and end the log. Done under the write lock,
    /// and only while the log is still empty, so no frame another process wrote
    /// since the truncation is overwritten. A failure only costs speed: logged,
    /// never the save's.
    fn reserve_wal(&self, conn: &Connection, len: u64) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let zero_fill = || -> Result<(), String> {
            let _write_lock =
                rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
                    .map_err(|e| e.to_string())?;
            let mut wal = std::fs::OpenOptions::new()
                .write(true)
                .open(self.wal_path())
                .map_err(|e| e.to_string())?;
            if wal.metadata().map_err(|e| e.to_string())?.len() != 0 {
                return Ok(());
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64) as usize;
                std::io::Write::write_all(&mut wal, &ZEROS[..n]).map_err(|e| e.to_string())?;
                left -= n as u64;
            }
            Ok(())
        };
        // Another process holding the write lock longer than this is not worth
        // waiting for: the space is only an optimisation.
        let result = conn
            .busy_timeout(CHECKPOINT_PATIENCE)
            .map_err(|e| e.to_string())
            .and_then(|()| zero_fill());
        let restored = conn.busy_timeout(BUSY_TIMEOUT);
        if let Err(e) = result.and(restored.map_err(|e| e.to_string())) {
            tracing::debug!(error = %e, "cannot reserve space for the state database WAL");
        }
    }

    /// At most `limit` history rows after `after_seq` that `filter` lets through,
    /// oldest first. One short read: a caller walking a large table pages on
    /// with the last row's `seq`, so neither its memory nor the time it holds a read
    /// snapshot (which keeps the daemon from truncating the WAL) grows with the table.
    pub fn history_page(
        &self,
        filter: &HistoryFilter<'_>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StateError> {
        let (condition, mut values) = filter.condition();
        let sql = format!(
            "SELECT seq, subscription, at, rotation_id, from_phase, to_phase, event, detail,
                evidence
             FROM history WHERE seq > ? {condition} ORDER BY seq LIMIT ?"
        );
        values.insert(0, after_seq.into());
        values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), RawHistoryRow::from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawHistoryRow::into_row).collect()
    }

    /// Where to start paging (an `after_seq` for [`StateDb::history_page`]) to read
    /// only the newest `newest` rows that `filter` lets through. Walks back `newest`
    /// rows, not the table.
    pub fn history_tail_start(
        &self,
        filter: &HistoryFilter<'_>,
        newest: usize,
    ) -> Result<i64, StateError> {
        if newest == 0 {
            return self.last_seq();
        }
        let (condition, mut values) = filter.condition();
        let sql = format!(
            "SELECT seq FROM history WHERE 1 {condition} ORDER BY seq DESC LIMIT 1 OFFSET ?"
        );
        values.push(i64::try_from(newest - 1).unwrap_or(i64::MAX).into());
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let nth: Option<i64> = stmt
            .query_row(rusqlite::params_from_iter(values), |r| r.get(0))
            .optional()?;
        Ok(nth.map_or(0, |seq| seq - 1))
    }

    /// Deletes up to `batch` of the oldest history rows recorded before `before`, in
    /// one short transaction; returns how many went (fewer than `batch`: nothing
    /// older is left). The rows of a rotation still under way (its subscription holds
    /// its rotation id: in flight or held) stay whatever their age: they are what an
    /// operator reads to decide on it.
    ///
    /// Rows go in `seq` order and the walk stops at the first one recorded at or after
    /// `before`, so a batch costs its own rows, never a scan of the table. A row written
    /// while the clock ran fast stops it early: rows behind it are kept a little
    /// longer, never dropped early.
    pub fn prune_history(&self, before: DateTime<Utc>, batch: usize) -> Result<usize, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let oldest: Vec<(i64, String)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, at FROM history
                 WHERE rotation_id IS NULL OR rotation_id NOT IN
                    (SELECT rotation_id FROM subscriptions WHERE rotation_id IS NOT NULL)
                 ORDER BY seq LIMIT ?1",
            )?;
            let limit = i64::try_from(batch).unwrap_or(i64::MAX);
            stmt.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let cutoff = ts1(before);
        let mut deleted = 0;
        {
            let mut delete = tx.prepare_cached("DELETE FROM history WHERE seq = ?1")?;
            for (seq, _) in oldest.iter().take_while(|(_, at)| *at < cutoff) {
                deleted += delete.execute([seq])?;
            }
        }
        tx.commit()?;
        Ok(deleted)
    }

    /// The newest history row's sequence number (0 when empty).
    pub fn last_seq(&self) -> Result<i64, StateError> {
        Ok(self
            .conn()
            .query_row("SELECT coalesce(max(seq), 0) FROM history", [], |r| {
                r.get(0)
            })?)
    }

    pub fn pending_asks(&self) -> Result<Vec<PendingAsk>, StateError> {
        let conn = self.conn();
        let mut asks = {
            let mut stmt = conn.prepare_cached(
                "SELECT subscription, requested_at FROM requests ORDER BY requested_at",
            )?;
            stmt.query_map([], |r| {
                Ok(PendingAsk {
                    name: r.get(0)?,
                    retire: None,
                    stamp: r.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let mut stmt = conn.prepare_cached(
            "SELECT subscription, decision, requested_at FROM operator_decisions
             ORDER BY requested_at",
        )?;
        let decisions = stmt.query_map([], |r| {
            Ok(PendingAsk {
                name: r.get(0)?,
                retire: Some(r.get::<_, String>(1)? == "retire"),
                stamp: r.get(2)?,
            })
        })?;
        for d in decisions {
            asks.push(d?);
        }
        Ok(asks)
    }

    pub fn clear_ask(&self, ask: &PendingAsk) -> Result<(), StateError> {
        let table = if ask.retire.is_some() {
            "operator_decisions"
        } else {
            "requests"
        };
        self.conn().execute(
            &format!("DELETE FROM {table} WHERE subscription = ?1 AND requested_at = ?2"),
            rusqlite::params![ask.name, ask.stamp],
        )?;
        Ok(())
    }

    /// Records what an operator asks of the running rekey and, before committing,
    /// calls `then` (which reads who holds the state directory). Both sides of the
    /// hand-over use immediate transactions, so this is ordered against
    /// [`StateDb::take_asks`]: either the ask is among those taken, or `then` runs
    /// after the taker's `then` (which says it takes no more).
    pub fn ask<T>(
        &self,
        ask: Ask<'_>,
        now: DateTime<Utc>,
        then: impl FnOnce() -> T,
    ) -> Result<T, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        match ask {
            Ask::Rotate(names) => {
                for n in names {
                    insert_request(&tx, n, now)?;
                }
            }
            Ask::Decide { name, retire } => insert_decision(&tx, name, retire, now)?,
        }
        let out = then();
        tx.commit()?;
        Ok(out)
    }

    /// Takes every recorded request and decision at once; `then` sees them before
    /// the commit (see [`StateDb::ask`] for why).
    pub fn take_asks(&self, then: impl FnOnce(&Asks)) -> Result<Asks, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let asks = Asks {
            rotate: drain_requests(&tx)?,
            decide: drain_decisions(&tx)?,
        };
        then(&asks);
        tx.commit()?;
        Ok(asks)
    }
}

/// An operator's request (`retire: None`) or decision waiting in the state, with
/// the stamp it was recorded at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAsk {
    pub name: String,
    /// `Some(true)` for `rekey retire`, `Some(false)` for `rekey resume`.
    pub retire: Option<bool>,
    pub stamp: String,
}

/// What an operator asks of the rekey holding the state directory.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// `rekey rotate`.
    Rotate(&'a [String]),
    /// `rekey resume` (`retire: false`) or `rekey retire`.
    Decide { name: &'a str, retire: bool },
}

/// Asks taken from the database: requests to rotate, and decisions `(name, retire)`,
/// each oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Asks {
    pub rotate: Vec<String>,
    pub decide: Vec<(String, bool)>,
}

impl Asks {
    pub fn is_empty(&self) -> bool {
        self.rotate.is_empty() && self.decide.is_empty()
    }
}

/// A save without a history row, in `tx`: the record's row (`values`) written only if
/// it changed (`None` if not); otherwise whether it wiped a stored secret.
fn write_routine(
    tx: Transaction<'_>,
    values: &[rusqlite::types::Value],
    name: &str,
) -> Result<Option<bool>, StateError> {
    let mut stored = tx
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM subscriptions WHERE name = ?1"
        ))?
        .query_row([name], |r| {
            (0..values.len())
                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .optional()?;
    if stored.as_deref() == Some(values) {
        return Ok(None);
    }
    let wiped_secret = stored.as_ref().is_some_and(|row| {
        row[SECRET_COLUMN] != rusqlite::types::Value::Null
            && values[SECRET_COLUMN] == rusqlite::types::Value::Null
    });
    if let Some(row) = &mut stored {
        forget_secret(row);
    }
    upsert(&tx, values)?;
    tx.commit()?;
    Ok(Some(wiped_secret))
}

/// Writes a record's row (`values`, in [`RECORD_COLUMNS`] order), inserting or
/// replacing it.
fn upsert(tx: &Transaction<'_>, values: &[rusqlite::types::Value]) -> Result<(), StateError> {
    tx.prepare_cached(
        "INSERT INTO subscriptions (name, phase, rotation_id, intent_at, rotated_at,
            published_at, confirm_deadline, pending_secret, new_fingerprint,
            previous_fingerprint, rotate_in_flight, lost_responses, failures, not_before,
            last_error, last_rotated_at, last_outcome, first_seen_at, next_due_at,
            phase_since, target, delivery_failures)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
            ?17, ?18, ?19, ?20, ?21, ?22)
         ON CONFLICT (name) DO UPDATE SET phase = ?2, rotation_id = ?3, intent_at = ?4,
            rotated_at = ?5, published_at = ?6, confirm_deadline = ?7,
            pending_secret = ?8, new_fingerprint = ?9, previous_fingerprint = ?10,
            rotate_in_flight = ?11, lost_responses = ?12, failures = ?13,
            not_before = ?14, last_error = ?15, last_rotated_at = ?16,
            last_outcome = ?17, first_seen_at = ?18, next_due_at = ?19,
            phase_since = ?20, target = ?21, delivery_failures = ?22",
    )?
    .execute(rusqlite::params_from_iter(values))?;
    Ok(())
}

fn insert_request(conn: &Connection, name: &str, now: DateTime<Utc>) -> Result<(), StateError> {
    conn.execute(
        "INSERT OR REPLACE INTO requests (subscription, requested_at) VALUES (?1, ?2)",
        params![name, ts1(now)],
    )?;
    Ok(())
}

fn drain_requests(conn: &Connection) -> Result<Vec<String>, StateError> {
    let names = {
        let mut stmt = conn.prepare("SELECT subscription FROM requests ORDER BY requested_at")?;
        stmt.query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
    };
    conn.execute("DELETE FROM requests", [])?;
    Ok(names)
}

fn insert_decision(
    conn: &Connection,
    name: &str,
    retire: bool,
    now: DateTime<Utc>,
) -> Result<(), StateError> {
    conn.execute(
        "INSERT OR REPLACE INTO operator_decisions (subscription, decision, requested_at)
         VALUES (?1, ?2, ?3)",
        params![name, if retire { "retire" } else { "resume" }, ts1(now)],
    )?;
    Ok(())
}

fn drain_decisions(conn: &Connection) -> Result<Vec<(String, bool)>, StateError> {
    let rows = {
        let mut stmt = conn.prepare(
            "SELECT subscription, decision FROM operator_decisions ORDER BY requested_at",
        )?;
        stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)? == "retire"))
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    conn.execute("DELETE FROM operator_decisions", [])?;
    Ok(rows)
}

/// A subscription found by discovery (`id = "*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub name: String,
    pub provider: String,
    pub id: String,
    pub vault_path: String,
    /// When the provider stopped listing it, if it did.
    pub vanished_at: Option<DateTime<Utc>>,
}

impl SqliteDb {
    /// Records that the provider lists `name` now. Returns true when it is new or
    /// came back after vanishing (worth a history row).
    pub fn saw_discovered(
        &self,
        name: &str,
        provider: &str,
        id: &str,
        vault_path: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let conn = self.conn();
        let before: Option<(Option<String>, String)> = conn
            .query_row(
                "SELECT vanished_at, vault_path FROM discovered WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        // Listed again as it was: nothing to write (discovery lists every few minutes).
        if let Some((None, path)) = &before
            && path == vault_path
        {
            return Ok(false);
        }
        conn.execute(
            "INSERT INTO discovered (name, provider, id, vault_path, first_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET vault_path = ?4, vanished_at = NULL",
            params![name, provider, id, vault_path, ts1(now)],
        )?;
        Ok(!matches!(before, Some((None, _))))
    }

    /// Marks a discovered subscription as no longer listed.
    pub fn mark_vanished(&self, name: &str, now: DateTime<Utc>) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE discovered SET vanished_at = ?2 WHERE name = ?1",
            params![name, ts1(now)],
        )?;
        Ok(())
    }

    /// Every discovered subscription, vanished or not.
    pub fn discovered(&self) -> Result<Vec<Discovered>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, provider, id, vault_path, vanished_at FROM discovered ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, provider, id, vault_path, vanished)| {
                Ok(Discovered {
                    vanished_at: parse_ts(&name, "discovered.vanished_at", vanished)?,
                    name,
                    provider,
                    id,
                    vault_path,
                })
            })
            .collect()
    }
}

/// The columns [`RawRow::from_row`] reads, in its order.
const RECORD_COLUMNS: &str = "name, phase, rotation_id, intent_at, rotated_at, published_at, confirm_deadline, pending_secret, new_fingerprint, previous_fingerprint, rotate_in_flight, lost_responses, failures, not_before, last_error, last_rotated_at, last_outcome, first_seen_at, next_due_at, phase_since, target, delivery_failures";

/// Where `pending_secret` sits in [`RECORD_COLUMNS`] (and [`record_values`]).
const SECRET_COLUMN: usize = 7;

/// A record as the values of its row, in [`RECORD_COLUMNS`] order.
fn record_values(record: &Record) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let s = &record.state;
    let text = |v: Option<String>| v.map_or(Value::Null, Value::Text);
    vec![
        Value::Text(record.name.clone()),
        Value::Text(s.phase.as_str().to_string()),
        text(s.rotation_id.clone()),
        text(ts(&s.intent_at)),
        text(ts(&s.rotated_at)),
        text(ts(&s.published_at)),
        text(ts(&s.confirm_deadline)),
        text(
            s.pending_secret
                .as_ref()
                .map(|p| p.expose_secret().to_owned()),
        ),
        text(s.new_fingerprint.as_ref().map(|f| f.as_str().to_owned())),
        text(
            s.previous_fingerprint
                .as_ref()
                .map(|f| f.as_str().to_owned()),
        ),
        Value::Integer(i64::from(s.rotate_in_flight)),
        Value::Integer(i64::from(s.lost_responses)),
        Value::Integer(i64::from(s.failures)),
        text(ts(&s.not_before)),
        text(s.last_error.clone()),
        text(ts(&s.last_rotated_at)),
        text(s.last_outcome.clone()),
        Value::Text(ts1(record.first_seen_at)),
        text(ts(&record.next_due_at)),
        Value::Text(ts1(record.phase_since)),
        text(
            record
                .target
                .as_ref()
                .and_then(|t| serde_json::to_string(t).ok()),
        ),
        text(
            (s.delivery_failures != FailureTally::default())
                .then(|| serde_json::to_string(&s.delivery_failures).ok())
                .flatten(),
        ),
    ]
}

/// Zeroes the plain copy of a minted secret in a row's values once it is written.
fn forget_secret(values: &mut [rusqlite::types::Value]) {
    if let Some(rusqlite::types::Value::Text(t)) = values.get_mut(SECRET_COLUMN) {
        zeroize::Zeroize::zeroize(t);
    }
}

/// A row as stored, before validation: the database is input too.
struct RawRow {
    name: String,
    phase: String,
    rotation_id: Option<String>,
    intent_at: Option<String>,
    rotated_at: Option<String>,
    published_at: Option<String>,
    confirm_deadline: Option<String>,
    pending_secret: Option<String>,
    new_fingerprint: Option<String>,
    previous_fingerprint: Option<String>,
    rotate_in_flight: bool,
    lost_responses: u32,
    failures: u32,
    not_before: Option<String>,
    last_error: Option<String>,
    last_rotated_at: Option<String>,
    last_outcome: Option<String>,
    first_seen_at: String,
    next_due_at: Option<String>,
    phase_since: String,
    target: Option<String>,
    delivery_failures: Option<String>,
}

impl RawRow {
    /// Reads a row selected with [`RECORD_COLUMNS`], by position: looking columns up by
    /// name costs a scan of every column name per field, on the scheduler's hot path.
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            name: r.get(0)?,
            phase: r.get(1)?,
            rotation_id: r.get(2)?,
            intent_at: r.get(3)?,
            rotated_at: r.get(4)?,
            published_at: r.get(5)?,
            confirm_deadline: r.get(6)?,
            pending_secret: r.get(7)?,
            new_fingerprint: r.get(8)?,
            previous_fingerprint: r.get(9)?,
            rotate_in_flight: r.get(10)?,
            lost_responses: r.get(11)?,
            failures: r.get(12)?,
            not_before: r.get(13)?,
            last_error: r.get(14)?,
            last_rotated_at: r.get(15)?,
            last_outcome: r.get(16)?,
            first_seen_at: r.get(17)?,
            next_due_at: r.get(18)?,
            phase_since: r.get(19)?,
            target: r.get(20)?,
            delivery_failures: r.get(21)?,
        })
    }

    fn into_record(self) -> Result<Record, StateError> {
        let n = self.name.clone();
        let corrupt = |detail: String| StateError::Corrupt {
            subscription: n.clone(),
            detail,
        };
        let phase = Phase::parse(&self.phase)
            .ok_or_else(|| corrupt(format!("unknown phase `{}`", self.phase)))?;
        if phase == Phase::Minted && self.pending_secret.is_none() {
            return Err(corrupt("phase minted but no stored secret".into()));
        }
        let state = RotationState {
            phase,
            rotation_id: self.rotation_id,
            intent_at: parse_ts(&n, "intent_at", self.intent_at)?,
            rotated_at: parse_ts(&n, "rotated_at", self.rotated_at)?,
            published_at: parse_ts(&n, "published_at", self.published_at)?,
            confirm_deadline: parse_ts(&n, "confirm_deadline", self.confirm_deadline)?,
            pending_secret: self.pending_secret.map(secret),
            new_fingerprint: self.new_fingerprint.map(Fingerprint::from_stored),
            previous_fingerprint: self.previous_fingerprint.map(Fingerprint::from_stored),
            rotate_in_flight: self.rotate_in_flight,
            lost_responses: self.lost_responses,
            failures: self.failures,
            not_before: parse_ts(&n, "not_before", self.not_before)?,
            last_error: self.last_error,
            last_rotated_at: parse_ts(&n, "last_rotated_at", self.last_rotated_at)?,
            last_outcome: self.last_outcome,
            delivery_failures: self
                .delivery_failures
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt(format!("column delivery_failures: {e}")))?
                .unwrap_or_default(),
        };
        Ok(Record {
            state,
            first_seen_at: parse_ts(&n, "first_seen_at", Some(self.first_seen_at))?
                .unwrap_or_default(),
            next_due_at: parse_ts(&n, "next_due_at", self.next_due_at)?,
            phase_since: parse_ts(&n, "phase_since", Some(self.phase_since))?.unwrap_or_default(),
            target: self
                .target
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt(format!("column target: {e}")))?,
            name: self.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::{Phase, Transition};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Appends a history row for `name` recorded at `at`, the record carrying
    /// `rotation_id` (which marks a rotation under way while it stays there).
    fn row_at(db: &StateDb, name: &str, rotation_id: Option<&str>, at: DateTime<Utc>) -> i64 {
        let mut r = db.load_or_create(name, now()).unwrap();
        r.state.rotation_id = rotation_id.map(str::to_string);
        let t = Transition::note(Phase::Idle, "test", format!("at {at}"));
        db.save(&r, Some(&t), at).unwrap();
        db.last_seq().unwrap()
    }

    fn seqs(rows: &[HistoryRow]) -> Vec<i64> {
        rows.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn history_is_read_in_pages_filtered_by_subscription_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let h = |n: i64| now() + chrono::Duration::hours(n);
        let mut a = vec![];
        let mut b = vec![];
        for n in 0..5 {
            a.push(row_at(&db, "a/1", None, h(n)));
            b.push(row_at(&db, "b/2", None, h(n)));
        }
        let all = HistoryFilter::default();
        let first = db.history_page(&all, 0, 4).unwrap();
        assert_eq!(seqs(&first), vec![a[0], b[0], a[1], b[1]]);
        let next = db.history_page(&all, first[3].seq, 4).unwrap();
        assert_eq!(seqs(&next), vec![a[2], b[2], a[3], b[3]]);
        assert_eq!(db.history_page(&all, next[3].seq, 4).unwrap().len(), 2);

        let only_a = HistoryFilter {
            subscription: Some("a/1"),
            since: Some(h(3)),
        };
        assert_eq!(
            seqs(&db.history_page(&only_a, 0, 10).unwrap()),
            vec![a[3], a[4]]
        );
        // The newest two of `b/2`, read forward from where the tail starts.
        let only_b = HistoryFilter {
            subscription: Some("b/2"),
            since: None,
        };
        let start = db.history_tail_start(&only_b, 2).unwrap();
        assert_eq!(
            seqs(&db.history_page(&only_b, start, 10).unwrap()),
            vec![b[3], b[4]]
        );
        assert_eq!(
            db.history_tail_start(&only_b, 50).unwrap(),
            0,
            "fewer rows than asked"
        );
        assert_eq!(db.history_after(b[4], 10).unwrap().len(), 0);
        assert_eq!(db.history(Some("a/1")).unwrap().len(), 5);
    }

    #[test]
    fn pruning_removes_old_rows_in_batches_but_never_a_rotation_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let days = |n: i64| now() - chrono::Duration::days(n);
        let old_done = row_at(&db, "a/1", Some("r-done"), days(500));
        let old_held = row_at(&db, "b/2", Some("r-held"), days(499));
        let old_idle = [
            row_at(&db, "a/1", None, days(498)),
            row_at(&db, "a/1", None, days(497)),
        ];
        let recent = row_at(&db, "a/1", None, days(10));
        // Written while the clock ran fast: kept until `recent`'s turn.
        let behind_recent = row_at(&db, "a/1", None, days(450));
        assert!(old_done < old_held && old_held < old_idle[0]);
        // b/2 still carries `r-held`: its rotation is under way.
        let before = days(400);
        assert_eq!(db.prune_history(before, 2).unwrap(), 2, "a full batch");
        assert_eq!(
            db.prune_history(before, 2).unwrap(),
            1,
            "the rest, then stop"
        );
        assert_eq!(db.prune_history(before, 2).unwrap(), 0);
        let left = seqs(&db.history(None).unwrap());
        assert_eq!(left, vec![old_held, recent, behind_recent]);
    }

    #[test]
    fn an_unchanged_record_is_not_written_and_a_routine_save_waits_for_no_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        r.state.phase = Phase::Confirming;
        db.save(&r, None, now()).unwrap();
        let changes = || db.conn().total_changes();
        let (before, rows) = (db.save_counts(), changes());
        db.save(&r, None, now()).unwrap();
        db.save_routine(&r, now()).unwrap();
        assert_eq!(
            (db.save_counts(), changes()),
            (before, rows),
            "nothing to write"
        );

        r.state.not_before = Some(now() + chrono::Duration::seconds(30));
        db.save_routine(&r, now()).unwrap();
        let after = db.save_counts();
        assert_eq!(
            (after.commits, after.synced),
            (before.commits + 1, before.synced)
        );
        let synchronous: i64 = db
            .conn()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 2, "FULL again for the next save");
        let other = StateDb::open_read_only(dir.path()).unwrap().unwrap();
        let seen = other.load("fintoro/801").unwrap().unwrap();
        assert_eq!(
            seen.state.not_before, r.state.not_before,
            "committed, visible"
        );
        // A transition is always written, and synced.
        let t = Transition::note(Phase::Confirming, "test", "x".into());
        db.save(&r, Some(&t), now()).unwrap();
        assert_eq!(db.save_counts().synced, before.synced + 1);
        assert_eq!(db.history(None).unwrap().len(), 1);
    }

    #[test]
    fn creates_owner_only_files_and_round_trips_a_minted_record() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        let db = StateDb::open(&sd).unwrap();
        assert_eq!(sd.metadata().unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(
            sd.join(DB_FILE).metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        assert_eq!(r.state.phase, Phase::Idle);
        r.state.phase = Phase::Minted;
        r.state.pending_secret = Some(secret("whsec_minted_value"));
        r.state.new_fingerprint = Some(Fingerprint::of_str("whsec_minted_value"));
        r.state.rotated_at = Some(now());
        let t = Transition {
            from: Phase::Rotating,
            to: Phase::Minted,
            event: "rotate-succeeded",
            detail: "x".into(),
            quiet: false,
            evidence: None,
        };
        db.save(&r, Some(&t), now()).unwrap();
        drop(db);
        let db = StateDb::open(&sd).unwrap();
        let back = db.load("fintoro/801").unwrap().unwrap();
        assert_eq!(back.state.phase, Phase::Minted);
        assert_eq!(
            back.state.pending_secret.unwrap().expose_secret(),
            "whsec_minted_value"
        );
        assert_eq!(back.state.rotated_at, Some(now()));
        let h = db.history(Some("fintoro/801")).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            (h[0].from.as_str(), h[0].to.as_str()),
            ("rotating", "minted")
        );
    }

    #[test]
    fn published_secret_leaves_no_trace_in_the_database_files() {
        // Saved as a routine step and as a step with its history row: the two find
        // out differently whether the save took a secret away.
        for with_history in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let db = StateDb::open(dir.path()).unwrap();
            let mut r = db.load_or_create("fintoro/801", now()).unwrap();
            r.state.phase = Phase::Minted;
            r.state.pending_secret = Some(secret("whsec_SHOULD_VANISH_0123456789"));
            let minted = Transition::note(Phase::Rotating, "rotate-succeeded", "minted".into());
            db.save(&r, with_history.then_some(&minted), now()).unwrap();
            r.state.phase = Phase::Published;
            r.state.pending_secret = None;
            let published = Transition::note(Phase::Minted, "published", "published".into());
            db.save(&r, with_history.then_some(&published), now())
                .unwrap();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let p = entry.unwrap().path();
                let bytes = std::fs::read(&p).unwrap();
                let needle = b"SHOULD_VANISH";
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "secret still in {} (with history: {with_history})",
                    p.display()
                );
            }
        }
    }

    #[test]
    fn refuses_a_database_from_another_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateDb::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 7).unwrap();
        drop(conn);
        let err = StateDb::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("schema version 7"), "{err}");
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DB_FILE),
            b"this is not a database at all, no",
        )
        .unwrap();
        let err = StateDb::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("rekey.db"), "{err}");
        assert!(
            err.contains("damaged") || err.contains("not a database"),
            "{err}"
        );
    }

    #[test]
    fn reading_a_fresh_state_dir_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        assert!(StateDb::open_read_only(&sd).unwrap().is_none());
        assert!(!sd.exists());
        std::fs::create_dir(&sd).unwrap();
        assert!(StateDb::open_read_only(&sd).unwrap().is_none());
        assert_eq!(std::fs::read_dir(&sd).unwrap().count(), 0);
        // A first start that has created the file but not yet the schema.
        std::fs::write(sd.join(DB_FILE), b"").unwrap();
        assert!(StateDb::open_read_only(&sd).unwrap().is_none());
    }

    #[test]
    fn a_read_only_open_reads_what_a_closed_writer_left_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        db.load_or_create("fintoro/801", now()).unwrap();
        drop(db);
        let ro = StateDb::open_read_only(dir.path()).unwrap().unwrap();
        assert_eq!(ro.load_all().unwrap().len(), 1);
        assert!(ro.add_request("fintoro/801", now()).is_err());
    }

    #[test]
    fn a_version_1_database_from_before_the_late_tables_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(SCHEMA_1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let db = StateDb::open(dir.path()).unwrap();
        assert!(db.discovered().unwrap().is_empty());
        assert!(db.pending_asks().unwrap().is_empty());
    }

    /// The hand-over between a CLI and a one-shot run, from two processes' worth of
    /// connections: an ask recorded while the run's last look is open waits for it,
    /// and then sees what the look left behind (here a flag standing for the lock
    /// file's `exiting`), so it is never both missed and promised.
    #[test]
    fn an_ask_during_the_last_look_sees_that_look_s_marker() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc;
        let dir = tempfile::tempdir().unwrap();
        let run = StateDb::open(dir.path()).unwrap();
        let cli = StateDb::open(dir.path()).unwrap();
        let exiting = AtomicBool::new(false);
        let names = vec!["fintoro/802".to_string()];
        let (in_look, look_open) = mpsc::channel();
        let (asking, cli_started) = mpsc::channel();
        std::thread::scope(|s| {
            let (cli, names, exiting) = (&cli, &names, &exiting);
            let cli_side = s.spawn(move || {
                look_open.recv().unwrap();
                asking.send(()).unwrap();
                cli.ask(Ask::Rotate(names), now(), || exiting.load(Ordering::SeqCst))
                    .unwrap()
            });
            let taken = run
                .take_asks(|found| {
                    in_look.send(()).unwrap();
                    cli_started.recv().unwrap();
                    // Whether the CLI is blocked yet cannot be observed; give it time
                    // to get there, so a missing lock would show.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    assert!(found.is_empty());
                    exiting.store(true, Ordering::SeqCst);
                })
                .unwrap();
            assert!(taken.is_empty());
            assert!(cli_side.join().unwrap(), "the CLI read the marker");
        });
        assert_eq!(
            run.take_asks(|_| {}).unwrap().rotate,
            names,
            "left for the next run"
        );
    }

    #[test]
    fn discovered_subscriptions_are_new_once_and_again_after_vanishing() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let saw = |db: &StateDb| {
            db.saw_discovered("acme/a", "acme", "a", "w/acme/a", now())
                .unwrap()
        };
        assert!(saw(&db), "first sight");
        assert!(!saw(&db), "seen before");
        db.mark_vanished("acme/a", now()).unwrap();
        let d = db.discovered().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].vanished_at, Some(now()));
        assert!(saw(&db), "came back");
        assert_eq!(db.discovered().unwrap()[0].vanished_at, None);
        // Reopening keeps the table and its rows (created IF NOT EXISTS).
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.discovered().unwrap().len(), 1);
    }

    /// A first start meets any other rekey command on an empty state directory: every
    /// opener waits for the one creating the schema, never trips over it, and a
    /// reader sees either no state yet or the whole schema.
    #[test]
    fn concurrent_first_opens_of_a_fresh_directory_all_succeed() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let sd = dir.path().join("state");
            let start = std::sync::Barrier::new(8);
            let errors: Vec<String> = std::thread::scope(|s| {
                let openers: Vec<_> = (0..8)
                    .map(|i| {
                        let (sd, start) = (&sd, &start);
                        s.spawn(move || {
                            start.wait();
                            if i % 2 == 0 {
                                StateDb::open(sd).err().map(|e| e.to_string())
                            } else {
                                StateDb::open_read_only(sd)
                                    .and_then(|db| db.map(|db| db.load_all()).transpose())
                                    .err()
                                    .map(|e| e.to_string())
                            }
                        })
                    })
                    .collect();
                openers
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect()
            });
            assert!(errors.is_empty(), "round {round}: {errors:#?}");
        }
    }

    fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                std::fs::read(p)
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle)
            })
            .collect()
    }

    #[test]
    fn a_reader_blocking_the_wal_truncation_owes_it_to_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        r.state.phase = Phase::Minted;
        r.state.pending_secret = Some(secret("whsec_LINGERS_IN_WAL_0123456789"));
        db.save(&r, None, now()).unwrap();
        // `rekey status` in another process, mid-read.
        let reader = Connection::open(dir.path().join(DB_FILE)).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM subscriptions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        r.state.phase = Phase::Published;
        r.state.pending_secret = None;
        db.save(&r, None, now()).unwrap();
        println!(
            "after publish: {:?}",
            files_holding(dir.path(), b"LINGERS_IN_WAL")
        );
        drop(reader);
        let other = db.load_or_create("fintoro/802", now()).unwrap();
        db.save(&other, None, now()).unwrap();
        assert_eq!(
            files_holding(dir.path(), b"LINGERS_IN_WAL"),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn the_wal_keeps_zeroed_space_after_its_truncation_and_commits_fill_it_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        r.state.phase = Phase::Minted;
        r.state.pending_secret = Some(secret("whsec_ZEROED_AWAY_0123456789"));
        db.save(&r, None, now()).unwrap();
        r.state.phase = Phase::Published;
        r.state.pending_secret = None;
        db.save(&r, None, now()).unwrap();
        let reserved = std::fs::read(&wal).unwrap();
        assert!(
            reserved.len() as u64 >= WAL_RESERVE_MIN,
            "the truncated WAL kept {} bytes",
            reserved.len()
        );
        assert!(
            reserved.iter().all(|b| *b == 0),
            "the reserve is zeros only"
        );

        // The next mint commits into that space: the file does not grow.
        let mut next = db.load_or_create("fintoro/802", now()).unwrap();
        next.state.phase = Phase::Minted;
        next.state.pending_secret = Some(secret("whsec_after_the_reserve"));
        let t = Transition::note(Phase::Rotating, "rotate-succeeded", "minted".into());
        db.save(&next, Some(&t), now()).unwrap();
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            reserved.len() as u64
        );

        // A crash now: the log (frames, then zeros) is all another process finds.
        let copy = tempfile::tempdir().unwrap();
        for f in [DB_FILE.to_string(), format!("{DB_FILE}-wal")] {
            std::fs::copy(dir.path().join(&f), copy.path().join(&f)).unwrap();
        }
        let after = StateDb::open(copy.path()).unwrap();
        let back = after.load("fintoro/802").unwrap().unwrap();
        assert_eq!(
            back.state.pending_secret.unwrap().expose_secret(),
            "whsec_after_the_reserve"
        );
        assert_eq!(after.history(Some("fintoro/802")).unwrap().len(), 1);
    }
}
