//! The command line: argument parsing and the commands. `main.rs` only calls [`main`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, StoreSettings, WithoutSecrets};
use crate::engine::Engine;
use crate::exit;
use crate::lock::{Holder, LockError, Role, StateLock};
use crate::logging;
use crate::once::Job;
use crate::policy_timing::{self, CatchUp};
use crate::rotation::Trigger;
use crate::signals::Signals;
use crate::state::{Ask, HISTORY_PAGE, HistoryFilter, HistoryRow, StateDb};

mod shared_state;
use crate::status;
use shared_state::{
    check_state, hand_over_shared, lead_once, leader_line, pg_settings, state_location,
};

const DEFAULT_CONFIG: &str = "/etc/rekey/rekey.toml";

#[derive(Debug, Parser)]
#[command(
    name = "rekey",
    version,
    about = "Rotates webhook signing secrets at SaaS providers and publishes them to Vault without breaking delivery",
    long_about = "Rotates webhook signing secrets at SaaS providers (Fintoro, Monite, Storno) and publishes them \
to HashiCorp Vault so receivers always hold a secret that verifies: rotate, store durably, \
publish old and new, confirm that deliveries with the new secret succeed, then retire the old one.\n\n\
Exit codes: 0 ok; 1 a rotation failed or is held, or a subscription drifted; 64 bad usage; 75 another rekey holds the \
state directory; 78 invalid config.",
    after_help = "Start with `rekey sandbox` to watch a whole rotation against simulated providers."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The config file.
    #[arg(long, short = 'c', env = "REKEY_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// What `resume` and `retire` take: one held subscription.
#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// `<provider>/<id>`.
    #[arg(value_name = "PROVIDER/ID")]
    pub subscription: String,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rotate what is due. With --once: one pass, then exit; without: run as a daemon.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Advance every due, forced or unfinished subscription as far as it can go
        /// without waiting, then exit. A later --once continues a rotation still
        /// confirming.
        #[arg(long)]
        once: bool,
        /// Rotate this subscription (`<provider>/<id>`) now, due or not. Repeatable.
        #[arg(long, value_name = "PROVIDER/ID")]
        force: Vec<String>,
    },
    /// Show each subscription's state, rotation times, next due time and last error.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the transition history (all subscriptions, or one).
    History {
        #[command(flatten)]
        config: ConfigArg,
        /// `<provider>/<id>`; all subscriptions when omitted.
        subscription: Option<String>,
        /// Only rows from this time on: a UTC time (`2026-11-23T10:00:00Z`, `2026-11-23`)
        /// or a duration back from now (`90m`, `7d`).
        #[arg(long, value_name = "TIME|DURATION", value_parser = parse_since)]
        since: Option<Since>,
        /// Only the newest N rows (still printed oldest first).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and print the plan (each subscription's next start times),
    /// touching nothing. Reads the token files only with --preflight.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Also check the credentials: Vault (reachable, unsealed, token valid, each
        /// path readable) and each provider (token accepted, subscription exists).
        #[arg(long)]
        preflight: bool,
    },
    /// Rotate these subscriptions now. With a daemon running on the same state
    /// directory, records the request and wakes the daemon (SIGUSR1) to do it; with a
    /// one-shot run (`run --once`) there, records it for that run to take before it
    /// exits; otherwise rotates here, as `run --once --force` would.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// `<provider>/<id>`, one or more.
        #[arg(required = true, value_name = "PROVIDER/ID")]
        subscriptions: Vec<String>,
    },
    /// Held subscription: keep both secrets published and wait another
    /// confirm_timeout for evidence.
    Resume(DecideArgs),
    /// Held subscription: retire the old secret without evidence that deliveries
    /// signed with the new one succeed.
    Retire(DecideArgs),
    /// Run a whole rotation against in-process simulated providers and a local secret
    /// store (or a Vault given with --vault-addr), printing each step.
    Sandbox(crate::sandbox::demo::SandboxArgs),
}

pub fn main() -> ExitCode {
    crate::memory::limit_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekey: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(dispatch(cli));
    // A daemon that gave up draining may leave a step stuck in a call; the state is
    // saved, so do not let that step hold the exit open.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

async fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Run {
            config,
            once,
            force,
        } => run(&config.config, once, force).await,
        Command::Status { config, json } => status_cmd(&config.config, json),
        Command::History {
            config,
            subscription,
            since,
            limit,
            json,
        } => {
            let filter = HistoryFilter {
                subscription: subscription.as_deref(),
                since: since.map(|s| s.resolve(chrono::Utc::now())),
            };
            let limit = limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            history_cmd(&config.config, &filter, limit, json)
        }
        Command::CheckConfig { config, preflight } => check_config(&config.config, preflight).await,
        Command::Rotate {
            config,
            subscriptions,
        } => rotate_cmd(&config.config, &subscriptions).await,
        Command::Resume(a) => decide_cmd(&a.config.config, &a.subscription, false, a.yes).await,
        Command::Retire(a) => decide_cmd(&a.config.config, &a.subscription, true, a.yes).await,
        Command::Sandbox(args) => crate::sandbox::demo::run(args).await,
    }
}

fn load(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(invalid_config)
}

/// For the commands that call no provider or Vault, or only sometimes: the secret
/// files are read, by [`with_secrets`], only when the command does call out.
fn load_without_secrets(path: &Path) -> Result<WithoutSecrets, u8> {
    Config::load_without_secrets(path).map_err(invalid_config)
}

fn with_secrets(config: &WithoutSecrets) -> Result<Config, u8> {
    config.with_secrets().map_err(invalid_config)
}

fn invalid_config(e: crate::config::ConfigError) -> u8 {
    eprintln!("rekey: invalid config: {e}");
    exit::CONFIG
}

fn open_db(config: &Config) -> Result<Arc<StateDb>, u8> {
    let pg = pg_settings(config);
    StateDb::open_at(state_location(config, &pg))
        .map(Arc::new)
        .map_err(|e| {
            eprintln!("rekey: {e}");
            exit::SOFTWARE
        })
}

/// For the commands that only show the state: creates nothing, and `None` when
/// nothing has run yet (or a first start is still creating the database).
fn read_db(config: &Config) -> Result<Option<StateDb>, u8> {
    let pg = pg_settings(config);
    StateDb::open_read_only_at(state_location(config, &pg)).map_err(|e| {
        eprintln!("rekey: {e}");
        exit::SOFTWARE
    })
}

/// Says, on stderr, why there is nothing to show from the state.
fn no_state_yet(config: &Config) {
    eprintln!(
        "rekey: no state yet in {}: nothing has run there (it is created by `rekey run`)",
        config.state_dir.display()
    );
}

async fn run(path: &Path, once: bool, force: Vec<String>) -> u8 {
    let config = match load(path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    logging::init(&config);
    for f in &force {
        if config.subscription(f).is_none() && config.discovery_for(f).is_none() {
            eprintln!(
                "rekey: --force {f}: no such subscription in {} (names are <provider>/<id>)",
                path.display()
            );
            return exit::USAGE;
        }
    }
    let signals = match install_signals() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let role = if once { Role::Once } else { Role::Daemon };
    let lock = match StateLock::acquire(&config.state_dir, role) {
        Ok(l) => l,
        Err(e @ LockError::Held { .. }) => {
            eprintln!("rekey: {e}");
            return exit::TEMPFAIL;
        }
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    let db = match open_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let engine = match Engine::new(config.clone(), db.clone()).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    if once {
        if let Some(code) = lead_once(&db) {
            return code;
        }
        let jobs = force
            .iter()
            .map(|f| (f.clone(), Job::Start(Trigger::Forced)))
            .collect();
        crate::once::prune_history(&engine);
        let code = crate::once::run(&engine, &lock, signals, jobs, true).await;
        if let Some(Err(e)) = db.shared().map(|pg| pg.release()) {
            eprintln!("rekey: cannot release the cluster lease (it runs out by itself): {e}");
        }
        code
    } else {
        crate::daemon::run(path, Arc::new(engine), db, force, signals, &lock).await
    }
}

/// Installs the signal handlers; done before taking the state directory, so whatever
/// holds it is never killed by a signal meant for a daemon.
fn install_signals() -> Result<Signals, u8> {
    Signals::install().map_err(|e| {
        eprintln!("rekey: cannot install signal handlers: {e}");
        exit::SOFTWARE
    })
}

/// Checks that every name is a configured subscription, or one discovery found.
fn known(config: &Config, names: &[String]) -> Result<(), u8> {
    let discovered: Vec<String> = if config.discoveries.is_empty() {
        vec![]
    } else {
        let pg = pg_settings(config);
        StateDb::open_read_only_at(state_location(config, &pg))
            .ok()
            .flatten()
            .and_then(|db| db.discovered().ok())
            .map(|d| d.into_iter().map(|d| d.name).collect())
            .unwrap_or_default()
    };
    for n in names {
        if config.subscription(n).is_none() && !discovered.contains(n) {
            eprintln!(
                "rekey: {n}: no such subscription in {} (names are <provider>/<id>)",
                config.source.display()
            );
            return Err(exit::USAGE);
        }
    }
    Ok(())
}

/// Wakes the daemon holding the state directory.
fn wake_daemon(pid: u32) -> Result<(), String> {
    use rustix::process::{Pid, Signal, kill_process};
    let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
    let target = Pid::from_raw(raw).ok_or(format!("pid {pid} is not a process id"))?;
    kill_process(target, Signal::USR1).map_err(|e| format!("cannot signal pid {pid}: {e}"))
}

/// Records `ask` for the rekey holding the state directory and tells the operator
/// who takes it: only a daemon is woken (SIGUSR1); a one-shot run takes it before it
/// exits; anything else leaves it for the next `rekey run` (exit 75).
fn hand_over(config: &Config, what: &str, ask: Ask<'_>) -> u8 {
    let db = match open_db(config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    // Read inside the transaction that records the ask: see `StateDb::ask`.
    let holder = match db.ask(ask, chrono::Utc::now(), || {
        crate::lock::holder(&config.state_dir)
    }) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    let follow = "follow it with `rekey status` and `rekey history`";
    let left = |why: String| {
        eprintln!("rekey: {what}: recorded, but {why}; the next `rekey run` takes it");
        exit::TEMPFAIL
    };
    match holder {
        Some(Holder {
            pid,
            role: Some(Role::Daemon),
        }) => match wake_daemon(pid) {
            Ok(()) => {
                println!(
                    "{what}: recorded and handed to the running rekey daemon (pid {pid}); {follow}"
                );
                exit::OK
            }
            Err(e) => left(format!("the daemon could not be woken ({e})")),
        },
        Some(Holder {
            pid,
            role: Some(Role::Once),
        }) => {
            println!(
                "{what}: recorded; the running one-shot pass (pid {pid}) takes it before it exits \
                 (if it is stopped first, the next `rekey run` does); {follow}"
            );
            exit::OK
        }
        Some(Holder {
            pid,
            role: Some(Role::Exiting),
        }) => left(format!(
            "the rekey holding the state directory (pid {pid}) is exiting and takes no more requests"
        )),
        Some(Holder { pid, role: None }) => left(format!(
            "the rekey holding the state directory (pid {pid}) does not say it is a daemon (an older rekey?), so it was not signalled"
        )),
        None if !crate::lock::is_held(&config.state_dir) => {
            left("the rekey that held the state directory has just exited".into())
        }
        None => left("the lock file does not say which rekey holds the state directory".into()),
    }
}

async fn rotate_cmd(path: &Path, names: &[String]) -> u8 {
    let config = match load_without_secrets(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(&config);
    if let Err(code) = known(&config, names) {
        return code;
    }
    let what = format!("rotation of {}", names.join(", "));
    let jobs = names
        .iter()
        .map(|n| (n.clone(), Job::Start(Trigger::Requested)))
        .collect();
    here_or_hand_over(&config, &what, Ask::Rotate(names), jobs).await
}

/// Taking the lock decides it without a race: either nothing holds the state
/// directory and this process does the work as a one-shot run, or the holder gets
/// the ask.
async fn here_or_hand_over(
    config: &WithoutSecrets,
    what: &str,
    ask: Ask<'_>,
    jobs: BTreeMap<String, Job>,
) -> u8 {
    if config.state.postgres.is_some() {
        return hand_over_shared(config, what, ask);
    }
    let signals = match install_signals() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let lock = match StateLock::acquire(&config.state_dir, Role::Once) {
        Ok(l) => l,
        Err(LockError::Held { .. }) => return hand_over(config, what, ask),
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    // Doing the work here, this process calls the providers and Vault itself.
    let config = match with_secrets(config) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    let db = match open_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let engine = match Engine::new(config, db).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    crate::once::run(&engine, &lock, signals, jobs, false).await
}

/// Asks the operator to confirm on the terminal; false on anything but yes.
fn confirm(question: &str) -> bool {
    use std::io::Write;
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `rekey resume|retire`: an operator's decision on a held subscription.
async fn decide_cmd(path: &Path, name: &str, retire: bool, yes: bool) -> u8 {
    use std::io::IsTerminal;
    let verb = if retire { "retire" } else { "resume" };
    let config = match load_without_secrets(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(&config);
    if let Err(code) = known(&config, &[name.to_string()]) {
        return code;
    }
    let db = match open_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let phase = match db.load(name) {
        Ok(r) => r.map(|r| r.state.phase),
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    if phase != Some(crate::rotation::Phase::Held) {
        eprintln!(
            "rekey: {name} is {}, not held; `rekey {verb}` only decides for a held subscription",
            phase.map_or("idle", |p| p.as_str())
        );
        return exit::USAGE;
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            eprintln!(
                "rekey: {verb} {name}: no terminal to confirm on; add --yes to decide without asking"
            );
            return exit::USAGE;
        }
        let question = if retire {
            format!(
                "Retire the old secret of {name} without evidence that deliveries signed with the new one succeed? Receivers will reject anything still signed with the old one."
            )
        } else {
            format!(
                "Keep both secrets of {name} published and wait another confirm_timeout for evidence?"
            )
        };
        if !confirm(&question) {
            eprintln!("rekey: {verb} {name}: not confirmed; nothing changed");
            return exit::FAILED;
        }
    }
    let jobs = BTreeMap::from([(name.to_string(), Job::Decide { retire })]);
    here_or_hand_over(
        &config,
        &format!("{verb} {name}"),
        Ask::Decide { name, retire },
        jobs,
    )
    .await
}

fn status_cmd(path: &Path, json: bool) -> u8 {
    let config = match load_without_secrets(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match read_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    if db.is_none() && !json {
        no_state_yet(&config);
    }
    let now = chrono::Utc::now();
    let rows = match status::rows(&config, db.as_ref(), now) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    let printed = if json {
        print_json(&rows)
    } else {
        let mut text = status::table(&rows, now);
        text.push_str(&leader_line(db.as_ref()));
        print_out(&text)
    };
    if let Err(code) = printed {
        return code;
    }
    if rows
        .iter()
        .any(|r| r.state == "failed" || r.state == "held" || r.state == "drifted")
    {
        exit::FAILED
    } else {
        exit::OK
    }
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), u8> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| {
        eprintln!("rekey: {e}");
        exit::SOFTWARE
    })?;
    text.push('\n');
    print_out(&text)
}

/// Writes `text` to stdout. A reader that went away (`rekey status | head`) has what
/// it wanted: that is not an error, and never a panic as `print!` would make it.
fn print_out(text: &str) -> Result<(), u8> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => {
            eprintln!("rekey: cannot write to stdout: {e}");
            Err(exit::SOFTWARE)
        }
    }
}

/// Where `history --since` starts: a time, or a duration back from now.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    At(chrono::DateTime<chrono::Utc>),
    Ago(std::time::Duration),
}

impl Since {
    fn resolve(self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        match self {
            Since::At(t) => t,
            Since::Ago(d) => chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC),
        }
    }
}

fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(t.with_timezone(&chrono::Utc)));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Since::At(d.and_time(chrono::NaiveTime::MIN).and_utc()));
    }
    humantime::parse_duration(s).map(Since::Ago).map_err(|_| {
        format!(
            "`{s}` is neither a time (2026-11-23T10:00:00Z, 2026-11-23, in UTC) nor a \
             duration back from now (90m, 7d)"
        )
    })
}

/// `rekey history`: streams the rows page by page, so a year of a large fleet's
/// history never sits in memory, and a reader stalled by a pager holds no read
/// snapshot that would keep the daemon from truncating its WAL.
fn history_cmd(path: &Path, filter: &HistoryFilter<'_>, limit: Option<usize>, json: bool) -> u8 {
    let config = match load_without_secrets(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match read_db(&config) {
        Ok(Some(db)) => db,
        Ok(None) => {
            if json {
                return print_out("[]\n").err().unwrap_or(exit::OK);
            } else {
                no_state_yet(&config);
            }
            return exit::OK;
        }
        Err(code) => return code,
    };
    let mut out = HistoryOut::new(json);
    match stream_history(&db, filter, limit, &mut out).and_then(|()| out.finish()) {
        Ok(()) => exit::OK,
        // `rekey history | head`: the reader has what it wanted.
        Err(HistoryError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("rekey: {e}");
            exit::SOFTWARE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HistoryError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("cannot write the history to stdout: {0}")]
    Write(#[from] std::io::Error),
}

fn stream_history(
    db: &StateDb,
    filter: &HistoryFilter<'_>,
    limit: Option<usize>,
    out: &mut HistoryOut,
) -> Result<(), HistoryError> {
    let mut after = match limit {
        Some(n) => db.history_tail_start(filter, n)?,
        None => 0,
    };
    let mut left = limit.unwrap_or(usize::MAX);
    while left > 0 {
        let want = left.min(HISTORY_PAGE);
        let page = db.history_page(filter, after, want)?;
        for row in &page {
            out.row(row)?;
        }
        left -= page.len();
        match page.last() {
            Some(last) if page.len() == want => after = last.seq,
            _ => break,
        }
    }
    Ok(())
}

/// The history on stdout, a row at a time: text lines, or a JSON array with one
/// row per line.
struct HistoryOut {
    out: std::io::BufWriter<std::io::Stdout>,
    json: bool,
    rows: usize,
}

impl HistoryOut {
    fn new(json: bool) -> HistoryOut {
        HistoryOut {
            out: std::io::BufWriter::new(std::io::stdout()),
            json,
            rows: 0,
        }
    }

    fn row(&mut self, r: &HistoryRow) -> Result<(), HistoryError> {
        use std::io::Write;
        if self.json {
            let sep = if self.rows == 0 { "[\n" } else { ",\n" };
            let text = serde_json::to_string(r).map_err(std::io::Error::other)?;
            write!(self.out, "{sep}{text}")?;
        } else {
            writeln!(
                self.out,
                "{}  {:<24} {:<10} -> {:<10} {:<22} {}",
                r.at.format("%Y-%m-%d %H:%M:%S%.3fZ"),
                r.subscription,
                r.from,
                r.to,
                r.event,
                r.detail
            )?;
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), HistoryError> {
        use std::io::Write;
        if self.json {
            let end = if self.rows == 0 { "[]\n" } else { "\n]\n" };
            self.out.write_all(end.as_bytes())?;
        }
        self.out.flush()?;
        Ok(())
    }
}

async fn check_config(path: &Path, preflight: bool) -> u8 {
    let config = match load_without_secrets(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Only --preflight uses the credentials; unreadable ones fail it before the plan.
    let full = match preflight.then(|| with_secrets(&config)).transpose() {
        Ok(full) => full,
        Err(code) => return code,
    };
    println!("{}: ok", path.display());
    println!("  state_dir: {}", config.state_dir.display());
    match &config.store {
        StoreSettings::Vault(v) => println!(
            "  store: vault {} (kv v{}, mount {})",
            v.address,
            match v.kv_version {
                crate::config::KvVersion::V1 => 1,
                crate::config::KvVersion::V2 => 2,
            },
            v.mount
        ),
        StoreSettings::File { dir } => println!("  store: files in {}", dir.display()),
    }
    let now = chrono::Utc::now();
    println!(
        "  daemon: max_concurrent {}, drain_timeout {}",
        config.daemon.max_concurrent,
        humantime::format_duration(config.daemon.drain_timeout)
    );
    println!(
        "  state: history kept {}",
        humantime::format_duration(config.state.history_retention)
    );
    if let Some(pg) = &config.state.postgres {
        println!(
            "  state: postgres {} (cluster {}, lease {}, renewed every {})",
            pg.url,
            pg.cluster,
            humantime::format_duration(pg.lease),
            humantime::format_duration(pg.renew_every)
        );
    }
    for p in &config.policies {
        let mut rules = p.schedule.describe();
        if let Some(w) = &p.start.window {
            rules.push_str(&format!(
                ", starting {}-{} {}",
                w.start.format("%H:%M"),
                w.end.format("%H:%M"),
                p.start.tz
            ));
        }
        if !p.start.jitter.is_zero() {
            rules.push_str(&format!(
                ", jitter {}",
                humantime::format_duration(p.start.jitter)
            ));
        }
        if p.start.catch_up == CatchUp::Skip {
            rules.push_str(", missed rotations skipped");
        }
        println!("  policy {}: {rules}", p.name);
    }
    println!("  plan (next starts if never rotated; the state may move them):");
    for s in &config.subscriptions {
        let Some(p) = config.policy(&s.policy) else {
            continue;
        };
        let starts: Vec<String> = policy_timing::plan(&p.schedule, &p.start, &s.name, now, 3)
            .iter()
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .collect();
        println!(
            "    {} -> {} (policy {}): {}",
            s.name,
            s.vault_path,
            s.policy,
            starts.join(", ")
        );
    }
    for d in &config.discoveries {
        println!(
            "  {}/* -> {} (policy {}; every subscription the provider lists, found on each pass)",
            d.provider, d.vault_path_template, d.policy
        );
    }
    let Some(full) = full else {
        return exit::OK;
    };
    let state = check_state(&full);
    let credentials = check_credentials(&full).await;
    if state == exit::OK {
        credentials
    } else {
        state
    }
}

/// `check-config --preflight`: the rotation's preflight for every subscription, with
/// nothing written anywhere (no state database either).
async fn check_credentials(config: &Config) -> u8 {
    use crate::store::{FileStore, SecretStore, VaultStore};
    let store: Arc<dyn SecretStore> = match &config.store {
        StoreSettings::Vault(v) => match VaultStore::connect(v).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                println!("  preflight: vault: FAILED: {e}");
                return exit::FAILED;
            }
        },
        StoreSettings::File { dir } => Arc::new(FileStore::new(dir)),
    };
    let mut providers = std::collections::HashMap::new();
    let mut code = exit::OK;
    for p in &config.providers {
        match crate::provider::build(p, crate::clock::system()) {
            Ok(c) => {
                providers.insert(p.name.clone(), c);
            }
            Err(e) => {
                println!("  preflight: provider {}: FAILED: {e}", p.name);
                code = exit::FAILED;
            }
        }
    }
    for s in &config.subscriptions {
        let store_ok = store.preflight(&s.vault_path).await;
        let provider_ok = match providers.get(&s.provider) {
            Some(p) => p.preflight(&s.id).await.map_err(|e| e.to_string()),
            None => Err("provider client unavailable".into()),
        };
        match (store_ok, provider_ok) {
            (Ok(()), Ok(())) => println!("  preflight: {}: ok", s.name),
            (a, b) => {
                code = exit::FAILED;
                if let Err(e) = a {
                    println!("  preflight: {}: store FAILED: {e}", s.name);
                }
                if let Err(e) = b {
                    println!("  preflight: {}: provider FAILED: {e}", s.name);
                }
            }
        }
    }
    code
}
