//! The real `rekey` binary with its state in PostgreSQL (`[state] url`): a full
//! rotation against the Fintoro simulator and RustyVault, a crash between mint and
//! publication recovered from the database, and the CLI reading the same state.

use crate::support::postgres::{TestDb, database};
use crate::support::rekey::{Rekey, assert_exit, stderr};
use crate::support::util::s;
use crate::support::world::World;

/// Points `rekey`'s config at `pg` instead of SQLite in its state directory.
pub fn use_postgres(rekey: &Rekey, pg: &TestDb) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&rekey.config)
        .unwrap();
    write!(
        f,
        "\n{}lease = \"4s\"\nrenew_every = \"1s\"\n",
        pg.state_section()
    )
    .unwrap();
}

/// Waits (bounded) until the cluster lease a killed process held has run out.
pub async fn until_lease_expires(pg: &TestDb) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pg.psql("SELECT count(*) FROM rekey_lease WHERE expires_at > now()") != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_rotation_with_the_state_in_postgres_completes_and_leaves_no_secret_in_it() {
    let w = World::new().await;
    let pg = database().await;
    use_postgres(&w.rekey, &pg);

    let check = w.rekey.run(&["check-config", "--preflight"]).await;
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        out.contains("preflight: state postgres://"),
        "{out}{}",
        stderr(&check)
    );
    assert!(out.contains("empty"), "{out}");

    // Killed with the secret only in the database: the next run publishes it.
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    assert_eq!(w.sim.rotation_count(w.id), 1);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "minted");
    assert_eq!(
        pg.psql("SELECT count(*) FROM subscriptions WHERE pending_secret IS NOT NULL"),
        "1"
    );
    // The killed run's lease still runs: a one-shot pass does not act beside it.
    let refused = w.rekey.once(&[]).await;
    assert_exit(&refused, 75);
    assert!(
        stderr(&refused).contains("leads cluster `default`"),
        "{}",
        stderr(&refused)
    );
    until_lease_expires(&pg).await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(
        pg.psql("SELECT count(*) FROM subscriptions WHERE pending_secret IS NOT NULL"),
        "0",
        "the stored copy is wiped once published"
    );

    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(entry.get("previous").is_none(), "{entry}");
    assert_eq!(w.sim.rotation_count(w.id), 1);

    let events: Vec<String> = (w.rekey.history(&w.name).await.iter())
        .map(|h| s(h, "event"))
        .collect();
    for want in ["rotate-succeeded", "published", "checked", "retired"] {
        assert!(events.contains(&want.to_string()), "{events:?}");
    }
    assert_eq!(
        pg.psql("SELECT count(*) > 5 FROM history"),
        "t",
        "the history is in PostgreSQL"
    );
    assert!(
        !w.rekey.state_dir().join("rekey.db").exists(),
        "no SQLite file beside it"
    );
    let check = w.rekey.run(&["check-config", "--preflight"]).await;
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(out.contains("ok (schema version 1)"), "{out}");
    w.assert_no_leak(&[]);
}
