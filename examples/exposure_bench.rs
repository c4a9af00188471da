//! The exposure window next to its floor, against the file store and RustyVault.
//!
//! ```sh
//! REKEY_TEST_RVAULT=/path/to/rvault cargo run --release --example exposure_bench
//! cargo run --release --example exposure_bench -- --rotations 2000 --store files
//! ```
//!
//! Rotates `--rotations` Fintoro subscriptions (default 1,000) per store, each forced
//! from idle to confirming by the real engine, and reads each rotation's window from
//! its record: from the provider's response (`rotated_at`) to the store's
//! acknowledgement (`published_at`). Between rotations, in the same run, it times
//! the bare pieces the window cannot do without:
//!
//! - a bare fsync: 4 KiB written to a file in the state directory and `fsync`ed;
//! - a bare store write: the store's `write` of an entry like a publication's, the
//!   read that tells it the expected version done beforehand and left out.
//!
//! The floor is their sum: the two cannot overlap. The secret must be in the fsync'd
//! local state before it leaves for the store; were the store written first, a crash
//! before the local commit would leave the store holding a secret that local state
//! does not know, the rotation would run again, and the secret from before it (still
//! signing deliveries in flight) would be pushed out of `previous` without evidence.
//! (Were they allowed to overlap, the floor would be the slower of the two; it is
//! printed too, for reference.)
//!
//! Also printed, to explain the gap: the engine's own mint commit (SQLite, WAL,
//! `synchronous=FULL`) and a bare store read (the publication reads the store's
//! `current` to publish it as `previous`). Figures, not pass/fail; the RustyVault part
//! is skipped with a note when no `rvault` is found (`REKEY_TEST_RVAULT`, or `rvault`
//! on `PATH`; otherwise it is installed once, as the integration tests do).

#[path = "../tests/it/support/rvault.rs"]
mod rvault;

use std::io::{Seek, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rekey::config::Config;
use rekey::engine::{Engine, Outcome};
use rekey::rotation::{Phase, Trigger};
use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::secret::secret;
use rekey::state::StateDb;
use rekey::store::{Entry, Expect, SecretStore};

/// What one store's run measured, each a sample per rotation.
#[derive(Default)]
struct Samples {
    window: Vec<Duration>,
    fsync: Vec<Duration>,
    write: Vec<Duration>,
    mint_commit: Vec<Duration>,
    read: Vec<Duration>,
    /// State commits and fsync'd ones, from idle to confirming, over all rotations.
    commits: u64,
    synced: u64,
    /// One confirmation poll per subscription afterwards (no evidence yet): the
    /// time each took, and the commits and fsync'd ones they cost in all.
    poll: Vec<Duration>,
    poll_commits: u64,
    poll_synced: u64,
}

enum Store {
    Files,
    Vault { addr: String, token: String },
}

fn median(v: &[Duration]) -> Duration {
    pct(v, 0.5)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// A config for `n` Fintoro subscriptions at `sim` and `store`; returns it loaded.
fn config(dir: &std::path::Path, sim: &FintoroSim, store: &Store, n: usize) -> Config {
    std::fs::write(dir.join("fintoro.token"), "bench").expect("token file");
    let store = match store {
        Store::Files => "[file_store]\ndir = \"published\"\n".to_string(),
        Store::Vault { addr, token } => {
            std::fs::write(dir.join("vault.token"), token).expect("vault token file");
            format!(
                "[vault]\naddress = \"{addr}\"\ntoken_file = \"vault.token\"\nmount = \"secret\"\n\
             kv_version = 1\ntimeout = \"10s\"\nmin_token_ttl = \"1s\"\n"
            )
        }
    };
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n{store}[log]\nlevel = \"off\"\n\
         [[providers]]\nname = \"b\"\nkind = \"fintoro\"\nbase_url = \"{}\"\n\
         token_file = \"fintoro.token\"\nrate_limit = \"100000/s\"\n\
         [[policies]]\nname = \"p\"\nevery = \"30d\"\nconfirm_poll = \"1m\"\n",
        sim.base_url()
    );
    for _ in 0..n {
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/unused");
        toml.push_str(&format!(
            "[[subscriptions]]\nprovider = \"b\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"bench/{id}\"\n"
        ));
    }
    let path = dir.join("rekey.toml");
    std::fs::write(&path, toml).expect("config");
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn entry(value: String, rotation_id: &str) -> Entry {
    Entry {
        current: secret(value),
        previous: None,
        rotated_at: Utc::now(),
        rotation_id: rotation_id.into(),
        provider: "fintoro".into(),
        subscription: "bench".into(),
    }
}

/// The bare pieces, once each.
async fn time_pieces(
    i: usize,
    scratch: &mut std::fs::File,
    db: &StateDb,
    store: &dyn SecretStore,
    s: &mut Samples,
) {
    let page = [i as u8; 4096];
    scratch.rewind().expect("seek");
    let t = Instant::now();
    scratch.write_all(&page).expect("write");
    scratch.sync_all().expect("fsync");
    s.fsync.push(t.elapsed());

    // The engine's mint commit: a record taking a secret, synchronous=FULL.
    let mut rec = db.load_or_create("bench/mint", Utc::now()).expect("record");
    rec.state.phase = Phase::Minted;
    rec.state.pending_secret = Some(secret(format!("whsec_bench_mint_{i}")));
    let t = Instant::now();
    db.save(&rec, None, Utc::now()).expect("mint commit");
    s.mint_commit.push(t.elapsed());

    let t = Instant::now();
    let read = store.read("bench/bare").await.expect("bare read");
    s.read.push(t.elapsed());
    let e = entry(format!("whsec_bench_bare_{i}"), &format!("bare-{i}"));
    let t = Instant::now();
    store
        .write("bench/bare", &e, Expect::from_read(&read))
        .await
        .expect("bare write");
    s.write.push(t.elapsed());
}

async fn run(store: Store, n: usize) -> Samples {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = FintoroSim::start(FintoroSimOptions {
        token: "bench".into(),
        rate_limit_per_minute: 10_000_000,
        ..Default::default()
    })
    .await
    .expect("simulator");
    let config = Arc::new(config(dir.path(), &sim, &store, n));
    let db = Arc::new(StateDb::open(&config.state_dir).expect("state"));
    let engine = Engine::new(config.clone(), db.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store = engine.store().clone();
    for sub in &config.subscriptions {
        let live = sim
            .secret_of(sub.id.parse().expect("numeric id"))
            .expect("live secret");
        store
            .write(&sub.vault_path, &entry(live, "initial"), Expect::Absent)
            .await
            .expect("seed the store");
    }
    let mut scratch = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.state_dir.join("fsync-probe"))
        .expect("scratch file");
    let mut s = Samples::default();
    for (i, sub) in config.subscriptions.iter().enumerate() {
        let before = db.save_counts();
        let (outcome, _) = engine
            .advance(sub, Some(Trigger::Forced), true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let after = db.save_counts();
        s.commits += after.commits - before.commits;
        s.synced += after.synced - before.synced;
        assert!(
            matches!(outcome, Outcome::Waiting(Phase::Confirming, _)),
            "{}: {outcome:?}",
            sub.name
        );
        let rec = db.load(&sub.name).expect("load").expect("record");
        let (Some(rotated), Some(published)) = (rec.state.rotated_at, rec.state.published_at)
        else {
            panic!("{}: no window recorded", sub.name)
        };
        s.window
            .push((published - rotated).to_std().unwrap_or_default());
        time_pieces(i, &mut scratch, &db, store.as_ref(), &mut s).await;
    }
    let before = db.save_counts();
    for sub in &config.subscriptions {
        let t = Instant::now();
        let (outcome, _) = engine.advance(sub, None, true).await.expect("poll");
        s.poll.push(t.elapsed());
        assert!(
            matches!(outcome, Outcome::Waiting(Phase::Confirming, _)),
            "{outcome:?}"
        );
    }
    let after = db.save_counts();
    s.poll_commits = after.commits - before.commits;
    s.poll_synced = after.synced - before.synced;
    s
}

fn report(name: &str, s: &Samples) {
    let n = s.window.len().max(1) as f64;
    let (fsync, write) = (median(&s.fsync), median(&s.write));
    let floor = fsync + write;
    let window = median(&s.window);
    println!("\n### {name}: {} rotations\n", s.window.len());
    println!("| measure (ms) | p50 | p95 |");
    println!("|---|---|---|");
    for (label, v) in [
        (
            "exposure window (provider response → store acknowledged)",
            &s.window,
        ),
        ("bare fsync (4 KiB write + fsync)", &s.fsync),
        ("bare store write", &s.write),
        ("mint commit (SQLite, synchronous=FULL)", &s.mint_commit),
        ("bare store read", &s.read),
    ] {
        println!("| {label} | {} | {} |", ms(median(v)), ms(pct(v, 0.95)));
    }
    println!();
    println!(
        "floor = fsync + store write (they cannot overlap) = {} ms; window p50 = {} ms; \
         ratio {:.2} × (target ≤ 1.1 ×)",
        ms(floor),
        ms(window),
        window.as_secs_f64() / floor.as_secs_f64().max(1e-9)
    );
    println!(
        "(were they allowed to overlap: floor = the slower = {} ms, ratio {:.2} ×)",
        ms(fsync.max(write)),
        window.as_secs_f64() / fsync.max(write).as_secs_f64().max(1e-9)
    );
    // The store is read before the rotate call (Engine::publish uses that read).
    println!(
        "what the window holds: mint commit + store write = {} ms; rekey's own work: the rest",
        ms(median(&s.mint_commit) + write)
    );
    println!(
        "state commits per rotation, idle → confirming: {:.1} ({:.1} fsync'd)",
        s.commits as f64 / n,
        s.synced as f64 / n
    );
    let polls = s.poll.len().max(1) as f64;
    println!(
        "confirmation poll without evidence: p50 {} ms; state commits per poll {:.2} ({:.2} fsync'd)",
        ms(median(&s.poll)),
        s.poll_commits as f64 / polls,
        s.poll_synced as f64 / polls
    );
}

fn args() -> (usize, bool, bool) {
    let mut rotations = 1_000;
    let (mut files, mut vault) = (true, true);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--rotations", Some(n)) => {
                rotations = n.parse().expect("--rotations takes a number");
            }
            ("--store", Some(s)) => {
                files = s == "files" || s == "both";
                vault = s == "vault" || s == "both";
            }
            _ => panic!("usage: exposure_bench [--rotations N] [--store files|vault|both]"),
        }
    }
    (rotations, files, vault)
}

#[tokio::main]
async fn main() {
    let (n, files, vault) = args();
    println!(
        "## Exposure window against its floor ({} build, {n} rotations per store)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    if files {
        let s = run(Store::Files, n).await;
        report("File store", &s);
    }
    if vault {
        let server = rvault::RustyVault::start().await;
        let store = Store::Vault {
            addr: server.addr(),
            token: server.root_token().to_string(),
        };
        let s = run(store, n).await;
        report("RustyVault (KV v1, loopback HTTP)", &s);
    }
}
