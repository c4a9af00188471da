//! `rekey sandbox`: one whole rotation against the simulated Fintoro, with live,
//! signed webhook traffic to a receiver that verifies against what rekey publishes —
//! the demo for anyone without provider accounts, and a smoke test of the real engine
//! (the same [`Engine`] the daemon runs, with a real config file and state database).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::cli::{exit, init_logging};
use crate::config::Config;
use crate::engine::{Engine, Outcome};
use crate::rotation::{Phase, Trigger};
use crate::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use crate::sandbox::receiver::Receiver;
use crate::secret::{Fingerprint, secret};
use crate::state::StateDb;
use crate::store::{Entry, Expect, SecretStore};

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
}

const TOKEN: &str = "sandbox-fintoro-token";

/// `config/sandbox.toml`, with placeholders the demo fills in.
const TEMPLATE: &str = include_str!("../../config/sandbox.toml");

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
    println!("rekey sandbox: one rotation of a simulated Fintoro subscription, end to end\n");

    let sim = FintoroSim::start(FintoroSimOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await?;
    step(format!("Fintoro simulator listening at {}", sim.base_url()));

    let store_section = match (&args.vault_addr, &args.vault_token_file) {
        (Some(addr), Some(token)) => format!(
            "[vault]\naddress = \"{addr}\"\ntoken_file = \"{}\"\nmount = \"secret\"\nkv_version = {}\n",
            token.canonicalize()?.display(),
            args.kv_version
        ),
        _ => "[file_store]\ndir = \"published\"\n".to_string(),
    };
    std::fs::write(dir.join("fintoro.token"), TOKEN)?;
    let config_path = dir.join("rekey.toml");
    let id = crate::sandbox::fintoro::FIRST_SUBSCRIPTION_ID.to_string();
    std::fs::write(
        &config_path,
        TEMPLATE
            .replace("{{STORE}}", &store_section)
            .replace("{{BASE_URL}}", &sim.base_url())
            .replace(
                "{{CONFIRM_TIMEOUT}}",
                &humantime::format_duration(args.timeout).to_string(),
            )
            .replace("{{ID}}", &id),
    )?;
    let config = Arc::new(Config::load(&config_path)?);
    init_logging(&config);
    let db = Arc::new(StateDb::open(&config.state_dir)?);
    let engine = Engine::new(config.clone(), db.clone()).await?;
    let store: Arc<dyn SecretStore> = engine.store().clone();
    step(format!("secret store: {}", store.describe()));

    let receiver = Receiver::start(store.clone()).await?;
    let sub = config.subscriptions[0].clone();
    let url = receiver.register(&format!("fintoro/{}", sub.id), &sub.vault_path);
    let (id, initial) = sim.add_subscription(&url);
    anyhow::ensure!(
        id.to_string() == sub.id,
        "simulator assigned id {id}, expected {}",
        sub.id
    );
    step(format!(
        "subscription {} delivers to the receiver at {url}; its secret is {}",
        sub.name,
        Fingerprint::of_str(&initial)
    ));
    // A receiver that already verifies today: its secret is published before rekey
    // takes over, as in any real deployment. A fresh simulator has a fresh secret, so
    // whatever an earlier sandbox run left in the store is replaced.
    let existing = store.read(&sub.vault_path).await?;
    store
        .write(
            &sub.vault_path,
            &Entry {
                current: secret(initial.clone()),
                previous: None,
                rotated_at: Utc::now(),
                rotation_id: "initial".into(),
                provider: "fintoro".into(),
                subscription: sub.id.clone(),
            },
            Expect::from_read(&existing),
        )
        .await?;
    step(format!(
        "published the current secret at `{}`",
        sub.vault_path
    ));

    sim.start_traffic(Duration::from_millis(250));
    step("Fintoro is sending signed webhooks every 250 ms");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = receiver.stats(&format!("fintoro/{}", sub.id));
    step(format!(
        "receiver so far: {} accepted, {} rejected",
        before.accepted_with_current + before.accepted_with_previous,
        before.rejected
    ));

    println!();
    step(format!(
        "rotating {} (forced; the policy would wait 30 days)",
        sub.name
    ));
    let mut shown = 0;
    let mut show_history = || -> anyhow::Result<()> {
        let rows = db.history(Some(&sub.name))?;
        for r in rows.iter().skip(shown) {
            println!(
                "{}   {:<10} -> {:<10} {}",
                r.at.format("%H:%M:%S%.3f"),
                r.from,
                r.to,
                r.detail
            );
        }
        shown = rows.len();
        Ok(())
    };
    let deadline = tokio::time::Instant::now() + args.timeout + Duration::from_secs(5);
    let mut trigger = Some(Trigger::Forced);
    let outcome = loop {
        let (outcome, _) = engine.advance(&sub, trigger.take(), false).await?;
        show_history()?;
        match outcome {
            Outcome::Waiting(_, until) if tokio::time::Instant::now() < deadline => {
                let wait = (until - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
            other => break other,
        }
    };
    sim.stop_traffic();
    println!();

    let after = receiver.stats(&format!("fintoro/{}", sub.id));
    let live = sim
        .secret_of(id)
        .ok_or_else(|| anyhow::anyhow!("the simulator lost subscription {id}"))?;
    let published = store
        .read(&sub.vault_path)
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing published at {}", sub.vault_path))?;
    let matches = Fingerprint::of(&published.entry.current) == Fingerprint::of_str(&live);
    step(format!(
        "Fintoro's live secret {} {} the published current {}; previous: {}",
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
    step(format!(
        "receiver: {} accepted with the current secret, {} with the previous, {} rejected",
        after.accepted_with_current, after.accepted_with_previous, after.rejected
    ));
    let ok = outcome == Outcome::Rested(Phase::Idle) && matches;
    println!();
    if ok {
        println!(
            "Rotation complete: rotated, stored, dual-published, confirmed by a delivery, retired."
        );
    } else {
        println!("Rotation did not complete: {outcome:?}. See the history above.");
    }
    if args.dir.is_some() {
        println!(
            "\nInspect it:\n  rekey status --config {0}\n  rekey history --config {0}",
            config_path.display()
        );
    }
    Ok(if ok { exit::OK } else { exit::FAILED })
}
