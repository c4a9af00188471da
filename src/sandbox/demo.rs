//! `rekey sandbox`: one whole rotation against a simulated provider (Fintoro, Monite
//! or Storno), with live,
//! signed webhook traffic to a receiver that verifies against what rekey publishes —
//! the demo for anyone without provider accounts, and a smoke test of the real engine
//! (the same [`Engine`] the daemon runs, with a real config file and state database).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::config::{Config, Subscription};
use crate::engine::{Engine, Outcome};
use crate::exit;
use crate::logging;
use crate::rotation::{Phase, Trigger};
use crate::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use crate::sandbox::monite::{MoniteSim, MoniteSimOptions};
use crate::sandbox::receiver::Receiver;
use crate::sandbox::storno::{StornoSim, StornoSimOptions};
use crate::secret::{Fingerprint, secret};
use crate::state::StateDb;
use crate::store::{Entry, Expect, SecretStore, StoreError};

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Keep the sandbox's files (config, state database, published secrets) here
    /// instead of a temporary directory that is removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Publish to this Vault instead of local files (e.g. http://127.0.0.1:8200).
    #[arg(long, value_name = "URL", requires = "vault_token_file")]
    pub vault_addr: Option<String>,
    /// File holding the Vault token (with --vault-addr).
    #[arg(long, value_name = "FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// KV engine version at `secret/` (with --vault-addr).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub kv_version: u8,
    /// How long to wait for a confirming delivery before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Which simulated provider to rotate at.
    #[arg(long, value_enum, default_value = "fintoro")]
    pub provider: DemoProvider,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoProvider {
    Fintoro,
    Monite,
    Storno,
}

const TOKEN: &str = "sandbox-fintoro-token";

/// `config/sandbox.toml`, with placeholders the demo fills in.
const TEMPLATE: &str = include_str!("../../config/sandbox.toml");

/// The simulator the demo runs, behind the few operations the demo needs.
enum DemoSim {
    Fintoro(FintoroSim),
    Monite(MoniteSim),
    Storno(StornoSim),
}

impl DemoSim {
    async fn start(which: DemoProvider) -> std::io::Result<DemoSim> {
        Ok(match which {
            DemoProvider::Fintoro => DemoSim::Fintoro(
                FintoroSim::start(FintoroSimOptions {
                    token: TOKEN.into(),
                    ..Default::default()
                })
                .await?,
            ),
            DemoProvider::Monite => {
                DemoSim::Monite(MoniteSim::start(MoniteSimOptions::default()).await?)
            }
            DemoProvider::Storno => {
                DemoSim::Storno(StornoSim::start(StornoSimOptions::default()).await?)
            }
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            DemoSim::Fintoro(_) => "fintoro",
            DemoSim::Monite(_) => "monite",
            DemoSim::Storno(_) => "storno",
        }
    }

    fn base_url(&self) -> String {
        match self {
            DemoSim::Fintoro(s) => s.base_url(),
            DemoSim::Monite(s) => s.base_url(),
            DemoSim::Storno(s) => s.base_url(),
        }
    }

    /// Writes the credential file and returns the kind's `[[providers]]` key lines.
    fn credentials(&self, dir: &std::path::Path) -> std::io::Result<String> {
        Ok(match self {
            DemoSim::Fintoro(_) => {
                std::fs::write(dir.join("fintoro.token"), TOKEN)?;
                "token_file = \"fintoro.token\"\n".into()
            }
            DemoSim::Monite(s) => {
                let o = s.options();
                std::fs::write(dir.join("monite.secret"), &o.client_secret)?;
                format!(
                    "client_id = \"{}\"\nclient_secret_file = \"monite.secret\"\nentity_id = \"{}\"\n",
                    o.client_id, o.entity_id
                )
            }
            DemoSim::Storno(s) => {
                let o = s.options();
                std::fs::write(dir.join("storno.token"), &o.api_key)?;
                format!(
                    "token_file = \"storno.token\"\ncompany = \"{}\"\n",
                    o.company
                )
            }
        })
    }

    /// Creates the subscription (its url is set once the receiver listens).
    fn add(&self) -> (String, String) {
        const UNROUTED: &str = "http://127.0.0.1:9/unrouted";
        match self {
            DemoSim::Fintoro(s) => {
                let (id, secret) = s.add_subscription(UNROUTED);
                (id.to_string(), secret)
            }
            DemoSim::Monite(s) => s.add_subscription(UNROUTED),
            DemoSim::Storno(s) => s.add_endpoint(UNROUTED),
        }
    }

    fn set_url(&self, id: &str, url: &str) -> bool {
        match self {
            DemoSim::Fintoro(s) => id.parse().is_ok_and(|id| s.set_url(id, url)),
            DemoSim::Monite(s) => s.set_url(id, url),
            DemoSim::Storno(s) => s.set_url(id, url),
        }
    }

    fn secret_of(&self, id: &str) -> Option<String> {
        match self {
            DemoSim::Fintoro(s) => id.parse().ok().and_then(|id| s.secret_of(id)),
            DemoSim::Monite(s) => s.secret_of(id),
            DemoSim::Storno(s) => s.secret_of(id),
        }
    }

    /// Signed webhooks every `every` until the returned task is aborted (Fintoro's
    /// simulator has its own traffic, with retries; stopped in `stop_traffic`).
    fn start_traffic(&self, id: &str, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let id = id.to_string();
        match self {
            DemoSim::Fintoro(s) => {
                s.start_traffic(every);
                None
            }
            DemoSim::Monite(s) => {
                let s = s.clone();
                Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let _ = s.deliver(&id, "updated").await;
                    }
                }))
            }
            DemoSim::Storno(s) => {
                let s = s.clone();
                Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let _ = s.deliver(&id, "invoice.created").await;
                    }
                }))
            }
        }
    }

    fn stop_traffic(&self, task: Option<tokio::task::JoinHandle<()>>) {
        if let DemoSim::Fintoro(s) = self {
            s.stop_traffic();
        }
        if let Some(t) = task {
            t.abort();
        }
    }
}

fn step(msg: impl AsRef<str>) {
    println!("{} {}", Utc::now().format("%H:%M:%S%.3f"), msg.as_ref());
}

pub async fn run(args: SandboxArgs) -> u8 {
    match demo(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rekey sandbox: {e:#}");
            exit::FAILED
        }
    }
}

async fn demo(args: SandboxArgs) -> anyhow::Result<u8> {
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.canonicalize()?
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let sim = DemoSim::start(args.provider).await?;
    let kind = sim.kind();
    println!("rekey sandbox: one rotation of a simulated {kind} subscription, end to end\n");
    step(format!("{kind} simulator listening at {}", sim.base_url()));

    let (config_path, id, initial) = write_config(&args, &sim, &dir)?;
    let config = Arc::new(Config::load(&config_path)?);
    logging::init(&config);
    let db = Arc::new(StateDb::open(&config.state_dir)?);
    let engine = Engine::new(config.clone(), db.clone()).await?;
    let store: Arc<dyn SecretStore> = engine.store().clone();
    step(format!("secret store: {}", store.describe()));

    let sub = config.subscriptions[0].clone();
    let receiver = Receiver::start(store.clone()).await?;
    let route = connect_receiver(&sim, &receiver, &sub, &id, &initial)?;
    publish_initial(store.as_ref(), &sub, kind, &initial).await?;

    let traffic = sim.start_traffic(&id, Duration::from_millis(250));
    step(format!("{kind} is sending signed webhooks every 250 ms"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = receiver.stats(&route);
    step(format!(
        "receiver so far: {} accepted, {} rejected",
        before.accepted_with_current + before.accepted_with_previous,
        before.rejected
    ));

    let outcome = rotate(&engine, &db, &sub, args.timeout).await?;
    sim.stop_traffic(traffic);
    println!();

    let after = receiver.stats(&route);
    let matches = compare_secrets(&sim, &id, store.as_ref(), &sub).await?;
    step(format!(
        "receiver: {} accepted with the current secret, {} with the previous, {} rejected",
        after.accepted_with_current, after.accepted_with_previous, after.rejected
    ));
    let ok = outcome == Outcome::Rested(Phase::Idle) && matches;
    conclude(ok, &outcome, args.dir.is_some().then_some(&config_path));
    Ok(if ok { exit::OK } else { exit::FAILED })
}

/// The verdict, and how to look at a kept sandbox directory.
fn conclude(ok: bool, outcome: &Outcome, kept_config: Option<&PathBuf>) {
    println!();
    if ok {
        println!(
            "Rotation complete: rotated, stored, dual-published, confirmed by a delivery, retired."
        );
    } else {
        println!("Rotation did not complete: {outcome:?}. See the history above.");
    }
    if let Some(config_path) = kept_config {
        println!(
            "\nInspect it:\n  rekey status --config {0}\n  rekey history --config {0}",
            config_path.display()
        );
    }
}

/// Writes the credential file and `rekey.toml` into `dir`, after creating the
/// subscription at the simulator (the provider assigns its id, so it exists before the
/// config). Returns the config's path, the subscription's id and its initial secret.
fn write_config(
    args: &SandboxArgs,
    sim: &DemoSim,
    dir: &std::path::Path,
) -> anyhow::Result<(PathBuf, String, String)> {
    let store_section = match (&args.vault_addr, &args.vault_token_file) {
        (Some(addr), Some(token)) => format!(
            "[vault]\naddress = \"{addr}\"\ntoken_file = \"{}\"\nmount = \"secret\"\nkv_version = {}\n",
            token.canonicalize()?.display(),
            args.kv_version
        ),
        _ => "[file_store]\ndir = \"published\"\n".to_string(),
    };
    let credentials = sim.credentials(dir)?;
    let (id, initial) = sim.add();
    let config_path = dir.join("rekey.toml");
    std::fs::write(
        &config_path,
        TEMPLATE
            .replace("{{STORE}}", &store_section)
            .replace("{{KIND}}", sim.kind())
            .replace("{{BASE_URL}}", &sim.base_url())
            .replace("{{CREDENTIALS}}", credentials.trim_end())
            .replace(
                "{{CONFIRM_TIMEOUT}}",
                &humantime::format_duration(args.timeout).to_string(),
            )
            .replace("{{ID}}", &id),
    )?;
    Ok((config_path, id, initial))
}

/// Points the subscription's deliveries at the receiver; returns the receiver route.
fn connect_receiver(
    sim: &DemoSim,
    receiver: &Receiver,
    sub: &Subscription,
    id: &str,
    initial: &str,
) -> anyhow::Result<String> {
    let route = format!("{}/{}", sim.kind(), sub.id);
    let url = receiver.register(&route, &sub.vault_path);
    anyhow::ensure!(
        sim.set_url(id, &url),
        "the simulator lost subscription {id}"
    );
    step(format!(
        "subscription {} delivers to the receiver at {url}; its secret is {}",
        sub.name,
        Fingerprint::of_str(initial)
    ));
    Ok(route)
}

/// A receiver that already verifies today: its secret is published before rekey takes
/// over, as in any real deployment. An entry already there (a kept `--dir`) stays.
async fn publish_initial(
    store: &dyn SecretStore,
    sub: &Subscription,
    kind: &str,
    initial: &str,
) -> anyhow::Result<()> {
    store
        .write(
            &sub.vault_path,
            &Entry {
                current: secret(initial.to_string()),
                previous: None,
                rotated_at: Utc::now(),
                rotation_id: "initial".into(),
                provider: kind.into(),
                subscription: sub.id.clone(),
            },
            Expect::Absent,
        )
        .await
        .or_else(|e| match e {
            StoreError::Conflict { .. } => Ok(()),
            e => Err(e),
        })?;
    step(format!(
        "published the current secret at `{}`",
        sub.vault_path
    ));
    Ok(())
}

/// Forces one rotation and advances it until it rests or `timeout` (plus a margin)
/// passes, printing each transition as it is recorded.
async fn rotate(
    engine: &Engine,
    db: &StateDb,
    sub: &Subscription,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    println!();
    step(format!(
        "rotating {} (forced; the policy would wait 30 days)",
        sub.name
    ));
    let mut shown = 0;
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
    let mut trigger = Some(Trigger::Forced);
    loop {
        let (outcome, _) = engine.advance(sub, trigger.take(), false).await?;
        shown = show_history(db, &sub.name, shown)?;
        match outcome {
            Outcome::Waiting(_, until) if tokio::time::Instant::now() < deadline => {
                let wait = (until - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
            other => return Ok(other),
        }
    }
}

/// Prints the subscription's history rows after `shown` (a `seq`); returns the last
/// `seq` shown.
fn show_history(db: &StateDb, name: &str, shown: i64) -> anyhow::Result<i64> {
    let filter = crate::state::HistoryFilter {
        subscription: Some(name),
        since: None,
    };
    let rows = db.history_page(&filter, shown, crate::state::HISTORY_PAGE)?;
    for r in &rows {
        println!(
            "{}   {:<10} -> {:<10} {}",
            r.at.format("%H:%M:%S%.3f"),
            r.from,
            r.to,
            r.detail
        );
    }
    Ok(rows.last().map_or(shown, |r| r.seq))
}

/// Whether the provider's live secret is the one published as current; says so.
async fn compare_secrets(
    sim: &DemoSim,
    id: &str,
    store: &dyn SecretStore,
    sub: &Subscription,
) -> anyhow::Result<bool> {
    let live = sim
        .secret_of(id)
        .ok_or_else(|| anyhow::anyhow!("the simulator lost subscription {id}"))?;
    let published = store
        .read(&sub.vault_path)
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing published at {}", sub.vault_path))?;
    let matches = Fingerprint::of(&published.entry.current) == Fingerprint::of_str(&live);
    step(format!(
        "{}'s live secret {} {} the published current {}; previous: {}",
        sim.kind(),
        Fingerprint::of_str(&live),
        if matches { "equals" } else { "DIFFERS FROM" },
        Fingerprint::of(&published.entry.current),
        published
            .entry
            .previous
            .as_ref()
            .map(|p| Fingerprint::of(p).to_string())
            .unwrap_or_else(|| "none (retired)".into())
    ));
    Ok(matches)
}
