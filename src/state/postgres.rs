//! The state in PostgreSQL (`[state] url`): the same tables and the same guarantees
//! as the SQLite file, shared by the rekey instances of a cluster.
//!
//! The callers are synchronous (as with SQLite) and may run inside a tokio runtime,
//! including the simulation's paused current-thread one, where a nested `block_on`
//! panics. So the connection lives on a runtime of its own (one worker thread), and a
//! call waits for its statements with a plain executor, bounded by [`OP_TIMEOUT`] on
//! that runtime's timer.
//!
//! Every write is one transaction, committed with `synchronous_commit = on` (a
//! routine save alone relaxes it, like SQLite's `NORMAL`). Writes of the instance
//! holding the cluster's lease are fenced: see [`super::lease`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::lease::{
    Keeper, Leader, Leadership, LeaseTable, idle_in_transaction, unacknowledged_limit,
};
use super::{
    Ask, Asks, Discovered, HistoryFilter, HistoryRow, PendingAsk, RECORD_COLUMNS, RawHistoryRow,
    RawRow, Record, SECRET_COLUMN, SaveCounts, StateError, forget_secret, parse_ts, record_values,
    ts, ts1,
};
use crate::rotation::Transition;
use crate::secret::{ExposeSecret, SecretString};

/// The version this rekey writes in PostgreSQL (its own numbering: the first
/// PostgreSQL schema already has everything SQLite's third one has).
pub const PG_SCHEMA_VERSION: i64 = 1;

/// `PG_MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const PG_MIGRATIONS: &[&str] = &[PG_SCHEMA_1];

const PG_SCHEMA_1: &str = "
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
        rotate_in_flight BIGINT NOT NULL DEFAULT 0,
        lost_responses BIGINT NOT NULL DEFAULT 0,
        failures BIGINT NOT NULL DEFAULT 0,
        not_before TEXT,
        last_error TEXT,
        last_rotated_at TEXT,
        last_outcome TEXT,
        first_seen_at TEXT NOT NULL,
        next_due_at TEXT,
        phase_since TEXT NOT NULL,
        target TEXT,
        delivery_failures TEXT
    );
    CREATE TABLE history (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        subscription TEXT NOT NULL,
        at TEXT NOT NULL,
        rotation_id TEXT,
        from_phase TEXT NOT NULL,
        to_phase TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL,
        evidence TEXT,
        epoch BIGINT
    );
    CREATE INDEX history_by_subscription ON history (subscription, seq);
    CREATE TABLE requests (
        subscription TEXT PRIMARY KEY,
        requested_at TEXT NOT NULL
    );
    CREATE TABLE operator_decisions (
        subscription TEXT PRIMARY KEY,
        decision TEXT NOT NULL CHECK (decision IN ('resume', 'retire')),
        requested_at TEXT NOT NULL
    );
    CREATE TABLE discovered (
        name TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        id TEXT NOT NULL,
        vault_path TEXT NOT NULL,
        first_seen_at TEXT NOT NULL,
        vanished_at TEXT
    );
    CREATE TABLE rekey_lease (
        cluster TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
";

/// The longest one call waits for the database before it gives up (and drops the
/// connection, so the next call starts on a fresh one).
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection attempts beyond the first before a call gives up (see
/// [`PgDb::reconnect`]).
const CONNECT_RETRIES: usize = 4;

/// How long a first connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of [`RECORD_COLUMNS`] stored as integers.
const INT_COLUMNS: [usize; 3] = [10, 11, 12];

/// Where the state lives and how to reach it (built from `[state]` by the CLI).
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// The URL without password or TLS parameters, for messages.
    pub url: String,
    pub connect: tokio_postgres::Config,
    /// Whether to use TLS (always verified); false only for loopback hosts.
    pub tls: bool,
    /// A CA file for the server's certificate, besides the system's.
    pub root_cert: Option<std::path::PathBuf>,
    pub password: Option<SecretString>,
    pub cluster: String,
    pub lease: Duration,
    pub renew_every: Duration,
}

pub struct PgDb {
    settings: PgSettings,
    /// Drives the connection; `None` only while being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    client: Mutex<Option<Client>>,
    read_only: bool,
    commits: AtomicU64,
    synced: AtomicU64,
    /// This instance's side of the cluster's lease (see [`super::lease`]).
    keeper: Keeper,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which panics inside another
        // runtime (a daemon's state is dropped in async code): let it go instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn pg_err(settings: &PgSettings, e: impl std::fmt::Display) -> StateError {
    StateError::Postgres {
        url: settings.url.clone(),
        detail: e.to_string(),
    }
}

/// A driver error as text: the server's message where there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl PgDb {
    /// Connects, and brings the schema to [`PG_SCHEMA_VERSION`] (any number of
    /// instances may start at once: the version table's lock orders them).
    pub fn open(settings: &PgSettings) -> Result<PgDb, StateError> {
        let db = PgDb::connect_only(settings, false)?;
        db.migrate()?;
        Ok(db)
    }

    /// For the commands that only show the state: `None` while no rekey has
    /// created the schema yet.
    pub fn open_read_only(settings: &PgSettings) -> Result<Option<PgDb>, StateError> {
        let db = PgDb::connect_only(settings, true)?;
        match db.stored_version()? {
            None => Ok(None),
            Some(PG_SCHEMA_VERSION) => Ok(Some(db)),
            Some(v) => Err(db.version_error(v)),
        }
    }

    fn connect_only(settings: &PgSettings, read_only: bool) -> Result<PgDb, StateError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rekey-postgres")
            .enable_all()
            .build()
            .map_err(|e| pg_err(settings, format!("cannot start its I/O thread: {e}")))?;
        let db = PgDb {
            settings: settings.clone(),
            runtime: Some(runtime),
            client: Mutex::new(None),
            read_only,
            commits: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            keeper: Keeper::new(&settings.cluster, settings.lease),
        };
        db.run(async |_| Ok(()))?;
        Ok(db)
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    pub(super) fn err(&self, e: impl std::fmt::Display) -> StateError {
        pg_err(&self.settings, e)
    }

    pub(super) fn sql(&self) -> impl Fn(tokio_postgres::Error) -> StateError + '_ {
        move |e| self.err(describe(&e))
    }

    fn version_error(&self, found: i64) -> StateError {
        StateError::PostgresSchema {
            url: self.settings.url.clone(),
            found,
        }
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StateError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system store with one unreadable entry still has the others.
            let _ = roots.add(cert);
        }
        if let Some(path) = &self.settings.root_cert {
            let pem = std::fs::read(path)
                .map_err(|e| self.err(format!("sslrootcert {}: {e}", path.display())))?;
            let certs = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
                .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()
                .map_err(|e| self.err(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| self.err(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        if roots.is_empty() {
            return Err(self.err(
                "no CA certificates to verify the server with: install the system's (ca-certificates) or set sslrootcert",
            ));
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| self.err(e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    /// A new connection, set up for durable writes. The error says whether trying
    /// again may help: the server was unreachable or not accepting connections yet
    /// (a restart), rather than refusing us (a wrong password, no such database).
    async fn connect(&self) -> Result<Client, (StateError, bool)> {
        let mut config = self.settings.connect.clone();
        if let Some(p) = &self.settings.password {
            config.password(p.expose_secret().as_bytes());
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.tcp_user_timeout(unacknowledged_limit(self.settings.renew_every));
        config.application_name("rekey");
        let rt = self.rt().map_err(|e| (e, false))?;
        let transient = |e: tokio_postgres::Error| {
            let retry = e
                .as_db_error()
                .is_none_or(|db| db.code() == &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW);
            (self.err(describe(&e)), retry)
        };
        let client = if self.settings.tls {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = self.tls().map_err(|e| (e, false))?;
            let (client, conn) = config.connect(tls).await.map_err(transient)?;
            rt.spawn(conn);
            client
        } else {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(transient)?;
            rt.spawn(conn);
            client
        };
        let setup = if self.read_only {
            "SET default_transaction_read_only = on"
        } else {
            // A server or pooler default of `off` would make a commit return before
            // it is on disk: the mint step relies on it being there.
            "SET synchronous_commit = on"
        };
        client.batch_execute(setup).await.map_err(transient)?;
        Ok(client)
    }

    /// [`PgDb::connect`], tried again a few times over about 1.5 s: a server
    /// restarting (or failing over) refuses connections for a moment, and nothing
    /// was sent yet, so trying again is safe. Bounded by [`OP_TIMEOUT`] as well.
    async fn reconnect(&self) -> Result<Client, StateError> {
        let mut pause = Duration::from_millis(100);
        for _ in 0..CONNECT_RETRIES {
            match self.connect().await {
                Ok(c) => return Ok(c),
                Err((e, false)) => return Err(e),
                Err((e, true)) => {
                    tracing::debug!(error = %e, "cannot connect to the state database; trying again")
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        self.connect().await.map_err(|(e, _)| e)
    }

    fn rt(&self) -> Result<&tokio::runtime::Runtime, StateError> {
        self.runtime
            .as_ref()
            .ok_or_else(|| self.err("the connection is shutting down"))
    }

    /// Runs `op` on the connection (opening one if there is none or it broke),
    /// waiting at most [`OP_TIMEOUT`]. A connection that timed out is dropped: its
    /// state is unknown, and the server rolls back whatever it left open.
    pub(super) fn run<R>(
        &self,
        op: impl AsyncFnOnce(&mut Client) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let rt = self.rt()?;
        // Timers and spawns below belong to our runtime; `block_on` from the
        // `futures` executor is safe inside a caller's runtime, unlike tokio's.
        let _enter = rt.enter();
        let work = async {
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(self.reconnect().await?);
            }
            match slot.as_mut() {
                Some(client) => op(client).await,
                None => Err(self.err("no connection")),
            }
        };
        let outcome = futures_executor::block_on(tokio::time::timeout(OP_TIMEOUT, work));
        match outcome {
            Ok(result) => result,
            Err(_) => {
                *slot = None;
                Err(self.err(format!(
                    "no answer within {}s; the connection is dropped and reopened at the next call",
                    OP_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// The stored schema version; `None` before any rekey created it.
    fn stored_version(&self) -> Result<Option<i64>, StateError> {
        let sql = self.sql();
        self.run(async |c| {
            let exists: Option<String> = c
                .query_one("SELECT to_regclass('rekey_schema')::text", &[])
                .await
                .map_err(&sql)?
                .get(0);
            if exists.is_none() {
                return Ok(None);
            }
            let row = c
                .query_opt("SELECT version FROM rekey_schema", &[])
                .await
                .map_err(&sql)?;
            Ok(Some(row.map_or(0, |r| r.get(0))))
        })
    }

    /// Creates or upgrades the schema in one transaction, holding the version
    /// table's lock so that concurrent starters take turns. Two starters on an empty
    /// database may both try to create the version table; the loser retries.
    fn migrate(&self) -> Result<(), StateError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.migrate_once() {
                Err(StateError::Postgres { detail, .. })
                    if attempt < 3
                        && (detail.contains("already exists")
                            || detail.contains("duplicate key")) =>
                {
                    tracing::debug!(detail = %detail, "another rekey created the schema; looking again");
                }
                other => return other,
            }
        }
    }

    fn migrate_once(&self) -> Result<(), StateError> {
        let sql = self.sql();
        self.run(async |c| {
            let tx = c.transaction().await.map_err(&sql)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS rekey_schema (version BIGINT NOT NULL);
                 LOCK TABLE rekey_schema IN ACCESS EXCLUSIVE MODE;",
            )
            .await
            .map_err(&sql)?;
            let found: i64 = tx
                .query_opt("SELECT version FROM rekey_schema", &[])
                .await
                .map_err(&sql)?
                .map_or(0, |r| r.get(0));
            if found > PG_SCHEMA_VERSION {
                return Err(self.version_error(found));
            }
            for step in &PG_MIGRATIONS[found as usize..] {
                tx.batch_execute(step).await.map_err(&sql)?;
            }
            if found != PG_SCHEMA_VERSION {
                tx.execute("DELETE FROM rekey_schema", &[])
                    .await
                    .map_err(&sql)?;
                tx.execute(
                    "INSERT INTO rekey_schema (version) VALUES ($1)",
                    &[&PG_SCHEMA_VERSION],
                )
                .await
                .map_err(&sql)?;
            }
            tx.commit().await.map_err(&sql)
        })
    }

    pub fn save_counts(&self) -> SaveCounts {
        SaveCounts {
            commits: self.commits.load(Ordering::Relaxed),
            synced: self.synced.load(Ordering::Relaxed),
        }
    }

    pub fn load_or_create(&self, name: &str, now: DateTime<Utc>) -> Result<Record, StateError> {
        if let Some(r) = self.load(name)? {
            return Ok(r);
        }
        self.insert_idle(&[name], now)?;
        self.load(name)?.ok_or_else(|| StateError::Corrupt {
            subscription: name.to_string(),
            detail: "row vanished right after insert".into(),
        })
    }

    fn insert_idle(&self, names: &[&str], now: DateTime<Utc>) -> Result<(), StateError> {
        let sql = self.sql();
        let at = ts1(now);
        self.fenced_write(async |tx| {
            let insert = tx
                .prepare(
                    "INSERT INTO subscriptions (name, phase, first_seen_at, phase_since)
                     VALUES ($1, 'idle', $2, $2) ON CONFLICT (name) DO NOTHING",
                )
                .await
                .map_err(&sql)?;
            for n in names {
                tx.execute(&insert, &[n, &at]).await.map_err(&sql)?;
            }
            Ok(())
        })
    }

    pub fn load(&self, name: &str) -> Result<Option<Record>, StateError> {
        let sql = self.sql();
        let row = self.run(async |c| {
            c.query_opt(
                &format!("SELECT {RECORD_COLUMNS} FROM subscriptions WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(&sql)
        })?;
        row.map(|r| raw_row(&r).and_then(RawRow::into_record))
            .transpose()
    }

    pub fn load_all(&self) -> Result<Vec<Record>, StateError> {
        self.records_where("TRUE", &[])
    }

    fn records_where(
        &self,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Record>, StateError> {
        let sql = self.sql();
        let rows = self.run(async |c| {
            c.query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM subscriptions WHERE {condition} ORDER BY name"
                ),
                params,
            )
            .await
            .map_err(&sql)
        })?;
        rows.iter()
            .map(|r| raw_row(r).and_then(RawRow::into_record))
            .collect()
    }

    pub fn load_or_create_many(
        &self,
        names: &[&str],
        now: DateTime<Utc>,
        mut each: impl FnMut(Record),
    ) -> Result<(), StateError> {
        let missing = super::absent(names, self.names()?);
        if !missing.is_empty() {
            self.insert_idle(&missing, now)?;
        }
        let wanted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        for rec in self.records_where("name = ANY($1)", &[&wanted])? {
            each(rec);
        }
        Ok(())
    }

    pub fn names(&self) -> Result<Vec<String>, StateError> {
        self.names_where("TRUE")
    }

    pub fn rotating_names(&self) -> Result<Vec<String>, StateError> {
        self.names_where("rotation_id IS NOT NULL")
    }

    fn names_where(&self, condition: &str) -> Result<Vec<String>, StateError> {
        let sql = self.sql();
        let rows = self.run(async |c| {
            c.query(
                &format!("SELECT name FROM subscriptions WHERE {condition} ORDER BY name"),
                &[],
            )
            .await
            .map_err(&sql)
        })?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub fn set_next_due(&self, dues: &[(String, Option<DateTime<Utc>>)]) -> Result<(), StateError> {
        if dues.is_empty() {
            return Ok(());
        }
        let sql = self.sql();
        self.fenced_write(async |tx| {
            let update = tx
                .prepare("UPDATE subscriptions SET next_due_at = $2 WHERE name = $1")
                .await
                .map_err(&sql)?;
            for (name, due) in dues {
                tx.execute(&update, &[name, &ts(due)]).await.map_err(&sql)?;
            }
            Ok(())
        })
    }

    pub fn save(
        &self,
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
        synced: bool,
    ) -> Result<(), StateError> {
        let mut values = record_values(record);
        let result = self.write_record(&values, record, transition, now, synced);
        forget_secret(&mut values);
        let written = result?;
        if written.is_some() {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.synced.fetch_add(u64::from(synced), Ordering::Relaxed);
        }
        if written == Some(true) {
            self.vacuum_secret(&record.name);
        }
        Ok(())
    }

    /// The row version that held a published secret stays in the table file until
    /// vacuum reclaims it: ask for that now rather than whenever autovacuum comes.
    /// A failure only delays the cleanup.
    fn vacuum_secret(&self, subscription: &str) {
        let sql = self.sql();
        let result = self.run(async |c| {
            c.batch_execute("VACUUM (SKIP_LOCKED) subscriptions")
                .await
                .map_err(&sql)
        });
        if let Err(e) = result {
            tracing::warn!(subscription = %subscription, error = %e, "cannot vacuum the state's subscriptions table: the old row version that held the minted secret stays until autovacuum reclaims it");
        }
    }

    /// One transaction: the record's row and the history row (see the SQLite
    /// backend's `write_record`, which this mirrors).
    fn write_record(
        &self,
        values: &[Value],
        record: &Record,
        transition: Option<&Transition>,
        now: DateTime<Utc>,
        synced: bool,
    ) -> Result<Option<bool>, StateError> {
        let sql = self.sql();
        self.fenced_write(async |tx| {
            if !synced {
                tx.batch_execute("SET LOCAL synchronous_commit = off")
                    .await
                    .map_err(&sql)?;
            }
            let stored = tx
                .query_opt(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM subscriptions WHERE name = $1 FOR UPDATE"
                    ),
                    &[&record.name],
                )
                .await
                .map_err(&sql)?;
            let mut stored = stored.map(|r| row_values(&r));
            let unchanged = stored.as_deref() == Some(values);
            let wiped_secret = stored.as_ref().is_some_and(|row| {
                row[SECRET_COLUMN] != Value::Null && values[SECRET_COLUMN] == Value::Null
            });
            if let Some(row) = &mut stored {
                forget_secret(row);
            }
            if unchanged && transition.is_none() {
                return Ok(None);
            }
            if !unchanged {
                let params = pg_params(values);
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
                tx.execute(UPSERT, &refs).await.map_err(&sql)?;
            }
            if let Some(t) = transition {
                let evidence = t
                    .evidence
                    .as_ref()
                    .and_then(|e| serde_json::to_string(e).ok());
                let epoch = self.keeper.epoch();
                tx.execute(
                    "INSERT INTO history (subscription, at, rotation_id, from_phase, to_phase,
                        event, detail, evidence, epoch)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &record.name,
                        &ts1(now),
                        &record.state.rotation_id,
                        &t.from.as_str(),
                        &t.to.as_str(),
                        &t.event,
                        &t.detail,
                        &evidence,
                        &epoch,
                    ],
                )
                .await
                .map_err(&sql)?;
            }
            Ok(Some(wiped_secret))
        })
    }

    pub fn history_page(
        &self,
        filter: &HistoryFilter<'_>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StateError> {
        let (condition, mut params) = pg_condition(filter, 2);
        let n = params.len() + 2;
        let query = format!(
            "SELECT seq, subscription, at, rotation_id, from_phase, to_phase, event, detail,
                evidence
             FROM history WHERE seq > $1 {condition} ORDER BY seq LIMIT ${n}"
        );
        params.insert(0, Box::new(after_seq));
        params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let sql = self.sql();
        let rows = self.run(async |c| c.query(&query, &refs).await.map_err(&sql))?;
        rows.iter()
            .map(|r| {
                RawHistoryRow {
                    seq: r.get(0),
                    subscription: r.get(1),
                    at: r.get(2),
                    rotation_id: r.get(3),
                    from: r.get(4),
                    to: r.get(5),
                    event: r.get(6),
                    detail: r.get(7),
                    evidence: r.get(8),
                }
                .into_row()
            })
            .collect()
    }

    pub fn history_tail_start(
        &self,
        filter: &HistoryFilter<'_>,
        newest: usize,
    ) -> Result<i64, StateError> {
        if newest == 0 {
            return self.last_seq();
        }
        let (condition, mut params) = pg_condition(filter, 1);
        let n = params.len() + 1;
        let query = format!(
            "SELECT seq FROM history WHERE TRUE {condition} ORDER BY seq DESC LIMIT 1 OFFSET ${n}"
        );
        params.push(Box::new(i64::try_from(newest - 1).unwrap_or(i64::MAX)));
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let sql = self.sql();
        let nth = self.run(async |c| c.query_opt(&query, &refs).await.map_err(&sql))?;
        Ok(nth.map_or(0, |r| r.get::<_, i64>(0) - 1))
    }

    pub fn prune_history(&self, before: DateTime<Utc>, batch: usize) -> Result<usize, StateError> {
        let sql = self.sql();
        let cutoff = ts1(before);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        self.fenced_write(async |tx| {
            let oldest = tx
                .query(
                    "SELECT seq, at FROM history
                     WHERE rotation_id IS NULL OR rotation_id NOT IN
                        (SELECT rotation_id FROM subscriptions WHERE rotation_id IS NOT NULL)
                     ORDER BY seq LIMIT $1",
                    &[&limit],
                )
                .await
                .map_err(&sql)?;
            let doomed: Vec<i64> = oldest
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .take_while(|(_, at)| *at < cutoff)
                .map(|(seq, _)| seq)
                .collect();
            let deleted = tx
                .execute("DELETE FROM history WHERE seq = ANY($1)", &[&doomed])
                .await
                .map_err(&sql)?;
            Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
        })
    }

    pub fn last_seq(&self) -> Result<i64, StateError> {
        let sql = self.sql();
        self.run(async |c| {
            Ok(
                c.query_one("SELECT coalesce(max(seq), 0)::bigint FROM history", &[])
                    .await
                    .map_err(&sql)?
                    .get(0),
            )
        })
    }

    /// Records an ask. Asks are not fenced: any instance's CLI may leave one for
    /// whichever instance leads. The table lock orders it against [`PgDb::take_asks`]
    /// as SQLite's immediate transactions do.
    pub fn ask<T>(
        &self,
        ask: Ask<'_>,
        now: DateTime<Utc>,
        then: impl FnOnce() -> T,
    ) -> Result<T, StateError> {
        let sql = self.sql();
        let at = ts1(now);
        self.run(async |c| {
            let tx = c.transaction().await.map_err(&sql)?;
            tx.batch_execute(SYNCED).await.map_err(&sql)?;
            tx.batch_execute(LOCK_ASKS).await.map_err(&sql)?;
            match ask {
                Ask::Rotate(names) => {
                    for n in names {
                        tx.execute(INSERT_REQUEST, &[n, &at]).await.map_err(&sql)?;
                    }
                }
                Ask::Decide { name, retire } => {
                    let decision = if retire { "retire" } else { "resume" };
                    tx.execute(INSERT_DECISION, &[&name, &decision, &at])
                        .await
                        .map_err(&sql)?;
                }
            }
            let out = then();
            tx.commit().await.map_err(&sql)?;
            Ok(out)
        })
    }

    pub fn take_asks(&self, then: impl FnOnce(&Asks)) -> Result<Asks, StateError> {
        let sql = self.sql();
        self.fenced_write(async |tx| {
            tx.batch_execute(LOCK_ASKS).await.map_err(&sql)?;
            let rotate = tx
                .query(
                    "DELETE FROM requests RETURNING subscription, requested_at",
                    &[],
                )
                .await
                .map_err(&sql)?;
            let decide = tx
                .query(
                    "DELETE FROM operator_decisions RETURNING subscription, decision, requested_at",
                    &[],
                )
                .await
                .map_err(&sql)?;
            let asks = Asks {
                rotate: oldest_first(&rotate, 1).iter().map(|r| r.get(0)).collect(),
                decide: oldest_first(&decide, 2)
                    .iter()
                    .map(|r| (r.get(0), r.get::<_, String>(1) == "retire"))
                    .collect(),
            };
            then(&asks);
            Ok(asks)
        })
    }

    pub fn pending_asks(&self) -> Result<Vec<PendingAsk>, StateError> {
        let sql = self.sql();
        let (requests, decisions) = self.run(async |c| {
            let r = c
                .query("SELECT subscription, requested_at FROM requests", &[])
                .await
                .map_err(&sql)?;
            let d = c
                .query(
                    "SELECT subscription, decision, requested_at FROM operator_decisions",
                    &[],
                )
                .await
                .map_err(&sql)?;
            Ok((r, d))
        })?;
        let mut asks: Vec<PendingAsk> = (oldest_first(&requests, 1).iter())
            .map(|r| PendingAsk {
                name: r.get(0),
                retire: None,
                stamp: r.get(1),
            })
            .collect();
        asks.extend(oldest_first(&decisions, 2).iter().map(|r| PendingAsk {
            name: r.get(0),
            retire: Some(r.get::<_, String>(1) == "retire"),
            stamp: r.get(2),
        }));
        Ok(asks)
    }

    pub fn clear_ask(&self, ask: &PendingAsk) -> Result<(), StateError> {
        let sql = self.sql();
        let table = if ask.retire.is_some() {
            "operator_decisions"
        } else {
            "requests"
        };
        let delete = format!("DELETE FROM {table} WHERE subscription = $1 AND requested_at = $2");
        self.fenced_write(async |tx| {
            tx.execute(&delete, &[&ask.name, &ask.stamp])
                .await
                .map_err(&sql)
                .map(|_| ())
        })
    }

    /// How many operator's requests and decisions wait, and the newest one's stamp
    /// (`None`: none waits). The leader looks every few seconds, since a CLI on
    /// another host cannot signal it, and wakes its scheduler when this changes:
    /// asks stay until their job ran, so "any waiting" would wake it at every look.
    pub fn asks_mark(&self) -> Result<Option<String>, StateError> {
        let sql = self.sql();
        self.run(async |c| {
            Ok(c.query_one(
                "SELECT CASE WHEN count(*) = 0 THEN NULL
                        ELSE count(*)::text || ' ' || max(at) END
                   FROM (SELECT requested_at AS at FROM requests
                         UNION ALL SELECT requested_at FROM operator_decisions) AS asks",
                &[],
            )
            .await
            .map_err(&sql)?
            .get(0))
        })
    }

    pub fn saw_discovered(
        &self,
        name: &str,
        provider: &str,
        id: &str,
        vault_path: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let sql = self.sql();
        let before = self.run(async |c| {
            c.query_opt(
                "SELECT vanished_at, vault_path FROM discovered WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(&sql)
        })?;
        let before: Option<(Option<String>, String)> = before.map(|r| (r.get(0), r.get(1)));
        if let Some((None, path)) = &before
            && path == vault_path
        {
            return Ok(false);
        }
        let at = ts1(now);
        self.fenced_write(async |tx| {
            tx.execute(
                "INSERT INTO discovered (name, provider, id, vault_path, first_seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET vault_path = $4, vanished_at = NULL",
                &[&name, &provider, &id, &vault_path, &at],
            )
            .await
            .map_err(&sql)
            .map(|_| ())
        })?;
        Ok(!matches!(before, Some((None, _))))
    }

    pub fn mark_vanished(&self, name: &str, now: DateTime<Utc>) -> Result<(), StateError> {
        let sql = self.sql();
        let at = ts1(now);
        self.fenced_write(async |tx| {
            tx.execute(
                "UPDATE discovered SET vanished_at = $2 WHERE name = $1",
                &[&name, &at],
            )
            .await
            .map_err(&sql)
            .map(|_| ())
        })
    }

    pub fn discovered(&self) -> Result<Vec<Discovered>, StateError> {
        let sql = self.sql();
        let rows = self.run(async |c| {
            c.query(
                "SELECT name, provider, id, vault_path, vanished_at FROM discovered ORDER BY name",
                &[],
            )
            .await
            .map_err(&sql)
        })?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(0);
                Ok(Discovered {
                    vanished_at: parse_ts(&name, "discovered.vanished_at", r.get(4))?,
                    provider: r.get(1),
                    id: r.get(2),
                    vault_path: r.get(3),
                    name,
                })
            })
            .collect()
    }

    /// Runs `op` in a transaction that commits only while this instance's lease
    /// (if it holds one) is still the cluster's: see [`super::lease`].
    pub(super) fn fenced_write<R>(
        &self,
        op: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let sql = self.sql();
        let idle = format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}",
            idle_in_transaction(self.settings.renew_every).as_millis()
        );
        self.run(async |c| {
            let tx = c.transaction().await.map_err(&sql)?;
            // Per transaction, not per session: behind a transaction pooler a
            // session's settings do not follow the next transaction. A client gone
            // silent mid-transaction (paused, cut off) must not keep the lease row
            // locked past the lease: a standby's takeover waits on that lock.
            tx.batch_execute(SYNCED).await.map_err(&sql)?;
            tx.batch_execute(&idle).await.map_err(&sql)?;
            self.check_fence(&tx).await?;
            crate::failpoint::hit(crate::failpoint::IN_FENCED_WRITE);
            let out = op(&tx).await?;
            tx.commit().await.map_err(&sql)?;
            Ok(out)
        })
    }

    /// Inside a write's transaction: refuses it unless this instance's lease (if it
    /// took one) is still the cluster's, holding the lease row until the commit.
    async fn check_fence(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<(), StateError> {
        let Some(epoch) = self.keeper.admit()? else {
            return Ok(());
        };
        let row = tx
            .query_opt(
                "SELECT 1 FROM rekey_lease
                 WHERE cluster = $1 AND epoch = $2 AND expires_at > now() FOR SHARE",
                &[&self.settings.cluster, &epoch],
            )
            .await
            .map_err(self.sql())?;
        if row.is_none() {
            self.keeper.refuse();
            return Err(self.keeper.deposed(epoch));
        }
        Ok(())
    }

    /// Takes the cluster's lease if nobody holds a live one (a new epoch), or renews
    /// it if this instance holds it. `holder` names this instance (host and pid).
    pub fn try_lead(&self, holder: &str) -> Result<Leadership, StateError> {
        self.run(async |c| self.keeper.try_lead(&self.lease_table(c), holder).await)
    }

    /// Renews the lease this instance holds now (before a provider call it cannot
    /// take back), and says how long it may act on it.
    pub fn renew_now(&self) -> Result<Duration, StateError> {
        self.run(async |c| self.keeper.renew_now(&self.lease_table(c)).await)
    }

    /// Gives the lease up (a graceful stop), so a standby takes over at its next
    /// look instead of waiting for the lease to run out.
    pub fn release(&self) -> Result<(), StateError> {
        self.run(async |c| self.keeper.release(&self.lease_table(c)).await)
    }

    /// Who leads the cluster; `None` if nobody ever did.
    pub fn leader(&self) -> Result<Option<Leader>, StateError> {
        self.run(async |c| self.lease_table(c).leader().await)
    }

    /// This instance's side of the lease: its epoch, what is left of it, whether it
    /// was deposed, how many writes were refused.
    pub fn keeper(&self) -> &Keeper {
        &self.keeper
    }

    fn lease_table<'a>(&'a self, client: &'a Client) -> PgLease<'a> {
        PgLease { db: self, client }
    }
}

/// The `rekey_lease` row of this instance's cluster, on one connection.
struct PgLease<'a> {
    db: &'a PgDb,
    client: &'a Client,
}

impl PgLease<'_> {
    fn cluster(&self) -> &str {
        &self.db.settings.cluster
    }
}

/// A lease's length as PostgreSQL reads it (`$n::text::interval`).
fn interval(lease: Duration) -> String {
    format!("{} milliseconds", lease.as_millis())
}

impl LeaseTable for PgLease<'_> {
    async fn take(&self, holder: &str, lease: Duration) -> Result<Option<i64>, StateError> {
        let row = self
            .client
            .query_opt(
                "INSERT INTO rekey_lease (cluster, holder, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + $3::text::interval)
                 ON CONFLICT (cluster) DO UPDATE
                    SET holder = $2, epoch = rekey_lease.epoch + 1,
                        expires_at = now() + $3::text::interval
                    WHERE rekey_lease.expires_at <= now()
                 RETURNING epoch",
                &[&self.cluster(), &holder, &interval(lease)],
            )
            .await
            .map_err(self.db.sql())?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn extend(&self, epoch: i64, lease: Duration) -> Result<bool, StateError> {
        let rows = self
            .client
            .execute(
                "UPDATE rekey_lease SET expires_at = now() + $3::text::interval
                 WHERE cluster = $1 AND epoch = $2",
                &[&self.cluster(), &epoch, &interval(lease)],
            )
            .await
            .map_err(self.db.sql())?;
        Ok(rows == 1)
    }

    async fn expire(&self, epoch: i64) -> Result<(), StateError> {
        self.client
            .execute(
                "UPDATE rekey_lease SET expires_at = now() - interval '1 second'
                 WHERE cluster = $1 AND epoch = $2",
                &[&self.cluster(), &epoch],
            )
            .await
            .map_err(self.db.sql())?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Leader>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT holder, epoch, expires_at > now() FROM rekey_lease WHERE cluster = $1",
                &[&self.cluster()],
            )
            .await
            .map_err(self.db.sql())?;
        Ok(row.map(|r| Leader {
            holder: r.get(0),
            epoch: r.get(1),
            live: r.get(2),
        }))
    }
}

/// Every write transaction starts with this: its commit returns only once on disk
/// (a routine save then relaxes it for itself alone).
const SYNCED: &str = "SET LOCAL synchronous_commit = on";

/// Both sides of an ask's hand-over take this lock first (it conflicts with itself
/// and with plain inserts), so a recorder and a taker never interleave.
const LOCK_ASKS: &str = "LOCK TABLE requests, operator_decisions IN SHARE ROW EXCLUSIVE MODE";

const INSERT_REQUEST: &str = "INSERT INTO requests (subscription, requested_at) VALUES ($1, $2)
     ON CONFLICT (subscription) DO UPDATE SET requested_at = $2";

const INSERT_DECISION: &str =
    "INSERT INTO operator_decisions (subscription, decision, requested_at)
     VALUES ($1, $2, $3)
     ON CONFLICT (subscription) DO UPDATE SET decision = $2, requested_at = $3";

const UPSERT: &str = "INSERT INTO subscriptions (name, phase, rotation_id, intent_at, rotated_at,
        published_at, confirm_deadline, pending_secret, new_fingerprint,
        previous_fingerprint, rotate_in_flight, lost_responses, failures, not_before,
        last_error, last_rotated_at, last_outcome, first_seen_at, next_due_at,
        phase_since, target, delivery_failures)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
        $17, $18, $19, $20, $21, $22)
     ON CONFLICT (name) DO UPDATE SET phase = $2, rotation_id = $3, intent_at = $4,
        rotated_at = $5, published_at = $6, confirm_deadline = $7,
        pending_secret = $8, new_fingerprint = $9, previous_fingerprint = $10,
        rotate_in_flight = $11, lost_responses = $12, failures = $13,
        not_before = $14, last_error = $15, last_rotated_at = $16,
        last_outcome = $17, first_seen_at = $18, next_due_at = $19,
        phase_since = $20, target = $21, delivery_failures = $22";

/// Rows sorted by their `requested_at` column (`at`), oldest first.
fn oldest_first(rows: &[Row], at: usize) -> Vec<&Row> {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by_key(|r| r.get::<_, String>(at));
    sorted
}

/// A record's values as PostgreSQL parameters, in [`RECORD_COLUMNS`] order.
fn pg_params(values: &[Value]) -> Vec<Box<dyn ToSql + Sync>> {
    values
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync> {
            match v {
                Value::Integer(i) => Box::new(*i),
                Value::Text(t) => Box::new(Some(t.clone())),
                _ => Box::new(None::<String>),
            }
        })
        .collect()
}

/// A stored record row as SQLite-style values, to compare with [`record_values`].
fn row_values(r: &Row) -> Vec<Value> {
    (0..r.len())
        .map(|i| {
            if INT_COLUMNS.contains(&i) {
                Value::Integer(r.get(i))
            } else {
                r.get::<_, Option<String>>(i)
                    .map_or(Value::Null, Value::Text)
            }
        })
        .collect()
}

fn raw_row(r: &Row) -> Result<RawRow, StateError> {
    let name: String = r.get(0);
    let count = |i: usize| {
        u32::try_from(r.get::<_, i64>(i)).map_err(|e| StateError::Corrupt {
            subscription: name.clone(),
            detail: format!("column {i}: {e}"),
        })
    };
    Ok(RawRow {
        phase: r.get(1),
        rotation_id: r.get(2),
        intent_at: r.get(3),
        rotated_at: r.get(4),
        published_at: r.get(5),
        confirm_deadline: r.get(6),
        pending_secret: r.get(7),
        new_fingerprint: r.get(8),
        previous_fingerprint: r.get(9),
        rotate_in_flight: r.get::<_, i64>(10) != 0,
        lost_responses: count(11)?,
        failures: count(12)?,
        not_before: r.get(13),
        last_error: r.get(14),
        last_rotated_at: r.get(15),
        last_outcome: r.get(16),
        first_seen_at: r.get(17),
        next_due_at: r.get(18),
        phase_since: r.get(19),
        target: r.get(20),
        delivery_failures: r.get(21),
        name,
    })
}

/// The history filter as `AND …` clauses with `$first`… placeholders, and values.
fn pg_condition(filter: &HistoryFilter<'_>, first: usize) -> (String, Vec<Box<dyn ToSql + Sync>>) {
    let mut sql = String::new();
    let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::new();
    if let Some(name) = filter.subscription {
        values.push(Box::new(name.to_string()));
        sql.push_str(&format!(
            " AND subscription = ${}",
            first + values.len() - 1
        ));
    }
    if let Some(since) = filter.since {
        values.push(Box::new(ts1(since)));
        sql.push_str(&format!(" AND at >= ${}", first + values.len() - 1));
    }
    (sql, values)
}
