//! What a confirmation poll costs the state database: a poll that finds no evidence
//! waits for no fsync, and what it wrote is there for the next start.

use std::sync::Arc;

use chrono::Utc;
use rekey::config::{Config, Subscription};
use rekey::engine::{Engine, Outcome};
use rekey::rotation::{Phase, Trigger};
use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::secret::secret;
use rekey::state::StateDb;
use rekey::store::{Entry, Expect};
use tempfile::TempDir;

/// `n` Fintoro subscriptions (file store) rotated to `confirming`; the simulator sends
/// no deliveries, so every poll finds nothing.
async fn confirming(n: usize) -> (TempDir, FintoroSim, Arc<Engine>, Arc<StateDb>) {
    let dir = tempfile::tempdir().expect("dir");
    let sim = FintoroSim::start(FintoroSimOptions {
        token: "t".into(),
        rate_limit_per_minute: 100_000,
        ..Default::default()
    })
    .await
    .expect("sim");
    std::fs::write(dir.path().join("t"), "t").expect("token");
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"published\"\n\
         [[providers]]\nname = \"b\"\nkind = \"fintoro\"\nbase_url = \"{}\"\ntoken_file = \"t\"\n\
         rate_limit = \"100000/s\"\n[[policies]]\nname = \"p\"\nevery = \"30d\"\nconfirm_poll = \"1s\"\n",
        sim.base_url()
    );
    for _ in 0..n {
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/unused");
        toml.push_str(&format!(
            "[[subscriptions]]\nprovider = \"b\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"w/{id}\"\n"
        ));
    }
    std::fs::write(dir.path().join("rekey.toml"), toml).expect("config");
    let config = Arc::new(Config::load(&dir.path().join("rekey.toml")).expect("config"));
    let db = Arc::new(StateDb::open(&config.state_dir).expect("db"));
    let engine = Arc::new(
        Engine::new(config.clone(), db.clone())
            .await
            .expect("engine"),
    );
    for sub in &config.subscriptions {
        let initial = sim.secret_of(sub.id.parse().expect("id")).expect("secret");
        let entry = Entry {
            current: secret(initial),
            previous: None,
            rotated_at: Utc::now(),
            rotation_id: "initial".into(),
            provider: "fintoro".into(),
            subscription: sub.id.clone(),
        };
        engine
            .store()
            .write(&sub.vault_path, &entry, Expect::Absent)
            .await
            .expect("seed");
        let (outcome, _) = engine
            .advance(sub, Some(Trigger::Forced), true)
            .await
            .expect("rotate");
        assert!(
            matches!(outcome, Outcome::Waiting(Phase::Confirming, _)),
            "{outcome:?}"
        );
    }
    (dir, sim, engine, db)
}

/// Times as stored (microseconds).
fn micros(t: Option<chrono::DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_micros())
}

/// One poll now (`eager`, as a one-shot run polls); returns the next poll's time.
async fn poll(engine: &Engine, sub: &Subscription) -> chrono::DateTime<Utc> {
    match engine.advance(sub, None, true).await.expect("poll") {
        (Outcome::Waiting(Phase::Confirming, next), _) => next,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_poll_without_evidence_waits_for_no_fsync_and_writes_once_at_most() {
    let (_dir, _sim, engine, db) = confirming(1).await;
    let sub = &engine.config().subscriptions[0].clone();
    for _ in 0..3 {
        let before = db.save_counts();
        let next = poll(&engine, sub).await;
        let after = db.save_counts();
        assert_eq!(
            after.synced, before.synced,
            "no fsync'd write for a quiet poll"
        );
        assert!(
            after.commits - before.commits <= 1,
            "{before:?} → {after:?}"
        );
        let rec = db.load(&sub.name).expect("load").expect("record");
        assert_eq!(
            micros(rec.state.not_before),
            micros(Some(next)),
            "next poll recorded"
        );
    }
}

#[tokio::test]
async fn polls_finishing_together_take_no_fsync_and_a_restart_sees_what_they_wrote() {
    let (dir, _sim, engine, db) = confirming(12).await;
    let before = db.save_counts();
    let mut polls = tokio::task::JoinSet::new();
    for sub in engine.config().subscriptions.clone() {
        let engine = engine.clone();
        polls.spawn(async move { (poll(&engine, &sub).await, sub.name) });
    }
    let nexts = polls.join_all().await;
    let after = db.save_counts();
    assert_eq!(after.synced, before.synced, "{before:?} → {after:?}");
    assert!(
        after.commits - before.commits <= 12,
        "{before:?} → {after:?}"
    );
    // A process that dies here loses nothing the OS was handed: a new connection (the
    // next start) reads every poll's time. (A power cut may lose them; the
    // subscriptions then poll again at once, as if those polls had not happened.)
    drop(engine);
    let reopened = StateDb::open(&dir.path().join("state")).expect("reopen");
    for (next, name) in nexts {
        let rec = reopened.load(&name).expect("load").expect("record");
        assert_eq!(rec.state.phase, Phase::Confirming);
        assert_eq!(micros(rec.state.not_before), micros(Some(next)), "{name}");
    }
}
