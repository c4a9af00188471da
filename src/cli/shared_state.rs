//! The command line's side of a state shared in PostgreSQL (`[state] url`): where
//! the state is, the preflight's look at it, asks handed to whichever instance leads,
//! a one-shot pass taking the lease, and the leader in `rekey status`.

use crate::config::Config;
use crate::exit;

use super::open_db;
use crate::state::{Ask, Leadership, Location, PG_SCHEMA_VERSION, PgSettings, StateDb};

/// The PostgreSQL state of `[state] url`, if set (else SQLite in `state_dir`).
pub(super) fn pg_settings(config: &Config) -> Option<PgSettings> {
    config.state.postgres.as_ref().map(|pg| PgSettings {
        url: pg.url.clone(),
        connect: pg.connect.clone(),
        tls: pg.tls,
        root_cert: pg.root_cert.clone(),
        password: pg.password.clone(),
        cluster: pg.cluster.clone(),
        lease: pg.lease,
        renew_every: pg.renew_every,
    })
}

pub(super) fn state_location<'a>(config: &'a Config, pg: &'a Option<PgSettings>) -> Location<'a> {
    match pg {
        Some(pg) => Location::Postgres(pg),
        None => Location::Dir(&config.state_dir),
    }
}

/// A one-shot pass on a shared state acts only as the cluster's leader: `None` when
/// it took the lease, else the exit code (another instance leads: it does the work).
pub(super) fn lead_once(db: &StateDb) -> Option<u8> {
    let pg = db.shared()?;
    match pg.try_lead(&crate::daemon::holder_name()) {
        Ok(Leadership::Leading { .. }) => None,
        Ok(Leadership::Standby { leader }) => {
            eprintln!(
                "rekey: {} leads cluster `{}`: it does the work; nothing done here",
                leader.holder,
                pg.settings().cluster
            );
            Some(exit::TEMPFAIL)
        }
        Err(e) => {
            eprintln!("rekey: {e}");
            Some(exit::SOFTWARE)
        }
    }
}

/// With the state shared in PostgreSQL: records `ask` there for whichever instance
/// leads the cluster (it looks every `renew_every`), from any host.
pub(super) fn hand_over_shared(config: &Config, what: &str, ask: Ask<'_>) -> u8 {
    let db = match open_db(config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    if let Err(e) = db.ask(ask, chrono::Utc::now(), || ()) {
        eprintln!("rekey: {e}");
        return exit::SOFTWARE;
    }
    let Some(pg) = db.shared() else {
        return exit::SOFTWARE;
    };
    let cluster = &pg.settings().cluster;
    match pg.leader() {
        Ok(Some(l)) if l.live => {
            println!(
                "{what}: recorded in the shared state; {} leads cluster `{cluster}` and takes it within {}; follow it with `rekey status` and `rekey history`",
                l.holder,
                humantime::format_duration(pg.settings().renew_every)
            );
            exit::OK
        }
        Ok(_) => {
            eprintln!(
                "rekey: {what}: recorded in the shared state, but no instance leads cluster `{cluster}` now; the next to lead takes it"
            );
            exit::TEMPFAIL
        }
        Err(e) => {
            eprintln!("rekey: {what}: recorded, but the cluster's leader cannot be read: {e}");
            exit::TEMPFAIL
        }
    }
}

/// With a state shared by a cluster: which instance leads it, as a status line.
pub(super) fn leader_line(db: Option<&StateDb>) -> String {
    let Some(pg) = db.and_then(StateDb::shared) else {
        return String::new();
    };
    let cluster = &pg.settings().cluster;
    match pg.leader() {
        Ok(Some(l)) if l.live => format!(
            "cluster `{cluster}`: led by {} (epoch {})\n",
            l.holder, l.epoch
        ),
        Ok(_) => format!("cluster `{cluster}`: no instance leads now\n"),
        Err(e) => format!("cluster `{cluster}`: leader unknown: {e}\n"),
    }
}

/// `check-config --preflight` on a PostgreSQL state: connects (TLS, password) and
/// reads the schema version, writing nothing. SQLite needs no check.
pub(super) fn check_state(config: &Config) -> u8 {
    let Some(pg) = pg_settings(config) else {
        return exit::OK;
    };
    match StateDb::open_read_only_at(Location::Postgres(&pg)) {
        Ok(Some(_)) => {
            println!(
                "  preflight: state {}: ok (schema version {PG_SCHEMA_VERSION})",
                pg.url
            );
            exit::OK
        }
        Ok(None) => {
            println!(
                "  preflight: state {}: ok, empty (`rekey run` creates the schema)",
                pg.url
            );
            exit::OK
        }
        Err(e) => {
            println!("  preflight: state: FAILED: {e}");
            exit::FAILED
        }
    }
}
