//! Figures, not pass/fail: how long rekey's steps take, measured in one run so the
//! ratios hold on a noisy shared machine. Run with `cargo bench --bench rotation`.
//!
//! - the pure state machine: one transition;
//! - the durable state save (SQLite, WAL, synchronous=FULL, fsync);
//! - a whole forced rotation against the Fintoro simulator and the file store, and its
//!   exposure window (provider response → publication acknowledged), over many runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rekey::config::Config;
use rekey::engine::{Engine, Outcome};
use rekey::rotation::{self, Event, Phase, RotationState, Timing, Trigger};
use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::sandbox::receiver::Receiver;
use rekey::secret::secret;
use rekey::state::StateDb;
use rekey::store::{Entry, Expect};

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn show(name: &str, v: &[Duration]) -> Duration {
    let p50 = pct(v.to_vec(), 0.5);
    println!(
        "{name:<44} n={:<6} p50={:>10.3?} p95={:>10.3?} max={:>10.3?}",
        v.len(),
        p50,
        pct(v.to_vec(), 0.95),
        v.iter().max().copied().unwrap_or_default()
    );
    p50
}

fn bench_transitions() -> Duration {
    let timing = Timing::default();
    let mut samples = Vec::new();
    for i in 0..20_000 {
        let s = RotationState::new();
        let t0 = Instant::now();
        let step = rotation::apply(
            &s,
            Event::Start {
                rotation_id: format!("r{i}"),
                trigger: Trigger::Forced,
                now: Utc::now(),
            },
            &timing,
        )
        .expect("valid");
        let step = rotation::apply(
            &step.state,
            Event::PreflightPassed { now: Utc::now() },
            &timing,
        )
        .expect("valid");
        std::hint::black_box(step);
        samples.push(t0.elapsed() / 2);
    }
    show("state machine: one transition", &samples)
}

fn bench_saves(dir: &std::path::Path) -> Duration {
    let db = StateDb::open(&dir.join("bench-state")).expect("db");
    let mut rec = db.load_or_create("bench/1", Utc::now()).expect("record");
    let mut samples = Vec::new();
    for i in 0..200 {
        rec.state.phase = if i % 2 == 0 {
            Phase::Minted
        } else {
            Phase::Published
        };
        rec.state.pending_secret = (i % 2 == 0).then(|| secret(format!("whsec_bench_{i}")));
        let t0 = Instant::now();
        db.save(&rec, None, Utc::now()).expect("save");
        samples.push(t0.elapsed());
    }
    show("state save (fsync'd transaction)", &samples)
}

async fn bench_rotations(dir: &std::path::Path, n: usize) -> (Duration, Duration) {
    let sim = FintoroSim::start(FintoroSimOptions {
        token: "bench-token".into(),
        rate_limit_per_minute: 100_000,
        ..Default::default()
    })
    .await
    .expect("sim");
    std::fs::write(dir.join("t"), "bench-token").expect("token");
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"published\"\n[log]\nlevel = \"off\"\n\
         [[providers]]\nname = \"b\"\nkind = \"fintoro\"\nbase_url = \"{}\"\ntoken_file = \"t\"\nrate_limit = \"100000/s\"\n\
         [[policies]]\nname = \"p\"\nevery = \"30d\"\nconfirm_poll = \"1s\"\n",
        sim.base_url()
    );
    let mut ids = vec![];
    for _ in 0..n {
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/unused");
        toml.push_str(&format!(
            "[[subscriptions]]\nprovider = \"b\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"w/{id}\"\n"
        ));
        ids.push(id);
    }
    let cfg_path = dir.join("rekey.toml");
    std::fs::write(&cfg_path, toml).expect("config");
    let config = Arc::new(Config::load(&cfg_path).expect("config"));
    let db = Arc::new(StateDb::open(&config.state_dir).expect("db"));
    let engine = Engine::new(config.clone(), db.clone())
        .await
        .expect("engine");
    let receiver = Receiver::start(engine.store().clone())
        .await
        .expect("receiver");
    for (sub, id) in config.subscriptions.iter().zip(&ids) {
        sim.set_url(
            *id,
            &receiver.register(&format!("fintoro/{id}"), &sub.vault_path),
        );
        let initial = sim.secret_of(*id).expect("secret");
        engine
            .store()
            .write(
                &sub.vault_path,
                &Entry {
                    current: secret(initial),
                    previous: None,
                    rotated_at: Utc::now(),
                    rotation_id: "initial".into(),
                    provider: "fintoro".into(),
                    subscription: id.to_string(),
                },
                Expect::Absent,
            )
            .await
            .expect("seed");
    }
    let mut to_confirming = vec![];
    for sub in &config.subscriptions {
        let t0 = Instant::now();
        let (outcome, _) = engine
            .advance(sub, Some(Trigger::Forced), true)
            .await
            .expect("advance");
        assert!(
            matches!(outcome, Outcome::Waiting(Phase::Confirming, _)),
            "{outcome:?}"
        );
        to_confirming.push(t0.elapsed());
    }
    // The exposure window of each rotation, as the engine recorded it in the history.
    let mut windows = vec![];
    for row in db.history(None).expect("history") {
        if let Some(ms) = row
            .detail
            .split("exposure window ")
            .nth(1)
            .and_then(|r| r.trim_end_matches(" ms").parse::<u64>().ok())
        {
            windows.push(Duration::from_millis(ms));
        }
    }
    let total = show("rotation: idle → confirming (file store)", &to_confirming);
    let window = show("exposure window (ms resolution)", &windows);
    (total, window)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    println!(
        "rekey benchmark ({} build)\n",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let transition = bench_transitions();
    let save = bench_saves(dir.path());
    let (rotation, window) = rt.block_on(bench_rotations(dir.path(), 100));
    println!();
    println!(
        "ratio: durable save / pure transition      = {:>8.0}×",
        save.as_secs_f64() / transition.as_secs_f64().max(1e-9)
    );
    println!(
        "ratio: exposure window / whole step run    = {:>8.2}",
        window.as_secs_f64() / rotation.as_secs_f64().max(1e-9)
    );
    println!(
        "ratio: rotation / durable save             = {:>8.1}× (saves per rotation step run ≈ 7)",
        rotation.as_secs_f64() / save.as_secs_f64().max(1e-9)
    );
}
