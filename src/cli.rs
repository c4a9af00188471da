//! The command line: argument parsing and the commands. `main.rs` only calls [`main`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, StoreSettings};
use crate::engine::{self, Engine, Outcome};
use crate::lock::{LockError, StateLock};
use crate::rotation::Trigger;
use crate::state::StateDb;
use crate::status;

/// Exit codes (sysexits where one fits).
pub mod exit {
    pub const OK: u8 = 0;
    /// A rotation failed or is held, or a subscription drifted.
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 64;
    pub const SOFTWARE: u8 = 70;
    /// Another rekey holds the state directory.
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
}

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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and print the plan, touching nothing.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a whole rotation against in-process simulated providers and a local secret
    /// store (or a Vault given with --vault-addr), printing each step.
    Sandbox(crate::sandbox::demo::SandboxArgs),
}

pub fn main() -> ExitCode {
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
    ExitCode::from(runtime.block_on(dispatch(cli)))
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
            json,
        } => history_cmd(&config.config, subscription.as_deref(), json),
        Command::CheckConfig { config } => check_config(&config.config),
        Command::Sandbox(args) => crate::sandbox::demo::run(args).await,
    }
}

fn load(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        eprintln!("rekey: invalid config: {e}");
        exit::CONFIG
    })
}

/// Logs to stderr, as text or JSON per the config; `REKEY_LOG` overrides the level.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("REKEY_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn open_db(config: &Config) -> Result<Arc<StateDb>, u8> {
    StateDb::open(&config.state_dir).map(Arc::new).map_err(|e| {
        eprintln!("rekey: {e}");
        exit::SOFTWARE
    })
}

async fn run(path: &Path, once: bool, force: Vec<String>) -> u8 {
    let config = match load(path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    init_logging(&config);
    for f in &force {
        if config.subscription(f).is_none() && config.discovery_for(f).is_none() {
            eprintln!(
                "rekey: --force {f}: no such subscription in {} (names are <provider>/<id>)",
                path.display()
            );
            return exit::USAGE;
        }
    }
    let _lock = match StateLock::acquire(&config.state_dir) {
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
    let engine = match Engine::new(config.clone(), db).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    if once {
        pass(&engine, &force, true).await
    } else {
        daemon(&engine, force).await
    }
}

/// One pass over every subscription. Returns the exit code.
async fn pass(engine: &Engine, force: &[String], eager: bool) -> u8 {
    let mut code = exit::OK;
    let subs = engine.subscriptions().await;
    for f in force {
        if !subs.iter().any(|s| &s.name == f) {
            tracing::error!(subscription = %f, "--force: the provider does not list this subscription");
            code = exit::FAILED;
        }
    }
    for sub in &subs {
        let trigger = force.contains(&sub.name).then_some(Trigger::Forced);
        match engine.advance(sub, trigger, eager).await {
            Ok((outcome, rec)) => {
                if outcome.is_problem(&rec) {
                    code = exit::FAILED;
                }
                match &outcome {
                    Outcome::NotDue => {}
                    Outcome::Drifted => tracing::warn!(
                        subscription = %sub.name,
                        "drifted: rotated outside rekey; `rekey status` says how to recover"
                    ),
                    Outcome::Held => tracing::warn!(
                        subscription = %sub.name,
                        "held: no evidence before the deadline; see `rekey status` and `rekey history`"
                    ),
                    Outcome::Rested(p) => {
                        tracing::info!(subscription = %sub.name, state = %p, "pass complete")
                    }
                    Outcome::Waiting(p, t) => tracing::info!(
                        subscription = %sub.name,
                        state = %p,
                        until = %t.to_rfc3339(),
                        "waiting; a later run continues"
                    ),
                }
            }
            Err(e) => {
                tracing::error!(subscription = %sub.name, error = %e, "cannot advance");
                code = exit::FAILED;
            }
        }
    }
    code
}

/// The long-running mode: a pass whenever something is due, sleeping in between.
/// SIGTERM/SIGINT stop it between steps (every step's state is already persisted).
async fn daemon(engine: &Engine, mut force: Vec<String>) -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("rekey: cannot install signal handlers");
            return exit::SOFTWARE;
        }
    };
    tracing::info!(
        subscriptions = engine.config().subscriptions.len(),
        "rekey started"
    );
    loop {
        pass(engine, &force, false).await;
        force.clear();
        let wake = engine
            .config()
            .subscriptions
            .iter()
            .filter_map(|s| engine.record(s).ok())
            .filter_map(|r| engine.wake_at(&r))
            .min();
        let now = engine::now();
        // Re-check at least hourly so a clock jump cannot strand a rotation.
        let cap = now + chrono::Duration::hours(1);
        let until = wake.map_or(cap, |w| w.min(cap));
        let sleep = (until - now).to_std().unwrap_or_default();
        tracing::debug!(until = %until.to_rfc3339(), "sleeping until the next due step");
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping: every subscription's state is persisted");
    exit::OK
}

fn status_cmd(path: &Path, json: bool) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match open_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let now = engine::now();
    let rows = match status::rows(&config, &db, now) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("rekey: {e}");
                return exit::SOFTWARE;
            }
        }
    } else {
        print!("{}", status::table(&rows, now));
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

fn history_cmd(path: &Path, subscription: Option<&str>, json: bool) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match open_db(&config) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let rows = match db.history(subscription) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rekey: {e}");
            return exit::SOFTWARE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("rekey: {e}");
                return exit::SOFTWARE;
            }
        }
    } else {
        for r in &rows {
            println!(
                "{}  {:<24} {:<10} -> {:<10} {:<22} {}",
                r.at.format("%Y-%m-%d %H:%M:%S%.3fZ"),
                r.subscription,
                r.from,
                r.to,
                r.event,
                r.detail
            );
        }
    }
    exit::OK
}

fn check_config(path: &Path) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
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
    let now = engine::now();
    for p in &config.policies {
        println!("  policy {}: {}", p.name, p.schedule.describe());
    }
    for s in &config.subscriptions {
        let next = config
            .policy(&s.policy)
            .and_then(|p| p.schedule.next_due(None, now, p.rotate_on_adopt))
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into());
        println!(
            "  {} -> {} (policy {}, first due {next} if never rotated)",
            s.name, s.vault_path, s.policy
        );
    }
    for d in &config.discoveries {
        println!(
            "  {}/* -> {} (policy {}; every subscription the provider lists, found on each pass)",
            d.provider, d.vault_path_template, d.policy
        );
    }
    exit::OK
}
