//! Two real `rekey run` daemons sharing one PostgreSQL state (one cluster): exactly
//! one leads; when it is killed at a crash point of a rotation, the standby takes
//! over within the lease and finishes the rotation with the provider's live secret
//! in Vault; a leader paused past its lease has its writes refused and stands by,
//! and the provider is never asked to rotate twice for it.

use std::time::{Duration, Instant};

use rekey::failpoint::ROTATION_POINTS;
use rustix::process::Signal;

use crate::postgres_state::use_postgres;
use crate::support::daemon::{Daemon, until_state};
use crate::support::postgres::{Dedicated, Proxy, TestDb, database};
use crate::support::rekey::LONGEST_DELIVERY;
use crate::support::rekey::Rekey;
use crate::support::util::s;
use crate::support::world::{World, evidence_counts_for};
use serde_json::json;

/// The lease the tests run with (`use_postgres` writes it): short, so that failovers
/// are quick, and still longer than the simulators' 2 s provider timeout plus a
/// tenth and 1 s.
const LEASE: Duration = Duration::from_secs(4);
const RENEW: Duration = Duration::from_secs(1);
/// How often a standby looks (`daemon::lead`), and slack for process scheduling on
/// a busy 2-core machine.
const STANDBY_LOOK: Duration = Duration::from_millis(500);
const SLACK: Duration = Duration::from_millis(1500);

/// For daemons whose sd-notify messages no test reads: a datagram socket nobody
/// reads fills after a few messages, and rekey then warns at each one it drops.
const UNWATCHED: (&str, &str) = ("NOTIFY_SOCKET", "/nonexistent/rekey-test-notify");

/// Points `rekey` at `pg`, with [`LEASE`] and [`RENEW`].
fn share(rekey: &Rekey, pg: &TestDb) {
    use_postgres(rekey, pg);
}

/// A second host: the same config and credential files in a directory of its own
/// (its own state directory and lock), the same database.
fn second_host(first: &Rekey) -> Rekey {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(first.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() && !p.to_string_lossy().ends_with(".sock") {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let config = dir.path().join("rekey.toml");
    Rekey {
        dir,
        config,
        transcript: Default::default(),
    }
}

/// Adds `[metrics] listen` on a free port to `rekey`'s config; returns the port.
fn listen_metrics(rekey: &Rekey) -> u16 {
    use std::io::Write as _;
    let port = crate::support::util::free_port();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&rekey.config)
        .unwrap();
    write!(f, "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n").unwrap();
    port
}

/// `GET /<path>` on a daemon's metrics listener: status and body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/{path}"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The lease row: `(holder, epoch)`.
fn lease_row(pg: &TestDb) -> (String, i64) {
    let row = pg.psql("SELECT holder || '|' || epoch FROM rekey_lease");
    let (holder, epoch) = row.split_once('|').unwrap_or_else(|| panic!("{row}"));
    (holder.to_string(), epoch.parse().unwrap())
}

/// How long after `since` a daemon logged `line` (by the line's own timestamp, so
/// the time the test takes to read it does not count).
fn logged_after(line: &str, since: chrono::DateTime<chrono::Utc>) -> Duration {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let at = chrono::DateTime::parse_from_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("no timestamp in {line:?}: {e}"));
    (at.with_timezone(&chrono::Utc) - since)
        .to_std()
        .unwrap_or_default()
}

/// The crash points after which the leader has to have seen evidence.
const RETIRE_POINTS: &[&str] = &["after:retire-write", "after:retired"];

/// Polls `rekey status` until `sub` is confirming or done (idle with no rotation
/// under way: `idle` alone is also where a rotation starts); which one.
async fn until_confirming_or_done(rekey: &Rekey, sub: &str) -> &'static str {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = rekey.state_of(sub).await;
        match s(&st, "state").as_str() {
            "confirming" => return "confirming",
            "idle" if st["rotation_id"].is_null() => return "done",
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{sub} never confirming or done: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The fencing invariant, from the history (each row carries the epoch it was
/// written under): once a row of a newer epoch is committed, no row of an older
/// one follows it.
fn assert_no_write_under_an_old_epoch(pg: &TestDb) {
    let late = pg.psql(
        "SELECT count(*) FROM history h WHERE EXISTS
            (SELECT 1 FROM history n WHERE n.seq < h.seq AND n.epoch > h.epoch)",
    );
    assert_eq!(
        late, "0",
        "rows written under an old epoch after a newer one"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM history WHERE epoch IS NULL"),
        "0"
    );
}

#[tokio::test]
async fn two_daemons_racing_to_start_one_leads_and_a_graceful_stop_hands_over_without_waiting_out_the_lease()
 {
    let w = World::new().await;
    let pg = database().await;
    share(&w.rekey, &pg);
    let other = second_host(&w.rekey);
    let ports = [listen_metrics(&w.rekey), listen_metrics(&other)];
    let mut a = Daemon::start(&w.rekey, &[]).await;
    let mut b = Daemon::start(&other, &[]).await;
    let ready = [a.notified("READY=1").await, b.notified("READY=1").await];
    let (holder, epoch) = lease_row(&pg);
    assert_eq!(epoch, 1, "one takeover, no contention churn");
    let (leader, standby, standby_ready, [leader_port, standby_port]) =
        if holder.ends_with(&format!(":{}", a.pid)) {
            (&mut a, &mut b, &ready[1], ports)
        } else {
            assert!(holder.ends_with(&format!(":{}", b.pid)), "{holder}");
            (&mut b, &mut a, &ready[0], [ports[1], ports[0]])
        };
    leader.log_line(&["leading the cluster"]).await;
    standby.log_line(&["standing by", &holder]).await;
    assert!(
        standby_ready.contains(&format!("STATUS=standby, leader is {holder}")),
        "a standby is ready, and says who leads: {standby_ready}"
    );
    assert!(!standby.log().contains("leading the cluster"));
    let (code, health) = get(standby_port, "healthz").await;
    assert_eq!(
        (code, health.as_str()),
        (200, "ok, standby: another instance leads\n")
    );
    assert!(
        get(standby_port, "metrics")
            .await
            .1
            .contains("rekey_leader 0")
    );
    let metrics = get(leader_port, "metrics").await.1;
    assert!(
        metrics.contains("rekey_leader 1") && metrics.contains("rekey_lease_epoch 1"),
        "{metrics}"
    );
    let status = String::from_utf8_lossy(&other.run(&["status"]).await.stdout).to_string();
    assert!(
        status.contains(&format!("cluster `default`: led by {holder} (epoch 1)")),
        "{status}"
    );

    // `rekey status` from either host reads the one state; `rekey rotate` from the
    // standby's host is taken by the leader through the database.
    let out = other.run(&["rotate", &w.name]).await;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(&format!("{holder} leads cluster `default`")),
        "{said}"
    );
    until_state(&w.rekey, &w.name, "confirming").await;
    assert_eq!(w.sim.rotation_count(w.id), 1);

    leader.signal(Signal::TERM);
    let stopped = Instant::now();
    assert_eq!(leader.exit(Duration::from_secs(30)).await.code(), Some(0));
    standby.log_line(&["leading the cluster"]).await;
    let handover = stopped.elapsed();
    assert!(handover < STANDBY_LOOK + SLACK, "{handover:?}");
    assert_eq!(lease_row(&pg).1, 2);
    println!("graceful handover: {handover:?}");
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&w.rekey, &w.name, "idle").await;
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_eq!(w.sim.rotation_count(w.id), 1);
    standby.signal(Signal::TERM);
    assert_eq!(standby.exit(Duration::from_secs(30)).await.code(), Some(0));
    assert_no_write_under_an_old_epoch(&pg);
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
}

/// Kills the leader at `point` of a forced rotation; the standby must take over
/// within the lease and finish. Returns the takeover time and the rotations the
/// provider made.
async fn kill_the_leader_at(point: &'static str) -> (Duration, u32) {
    let w = World::new().await;
    let pg = database().await;
    share(&w.rekey, &pg);
    let other = second_host(&w.rekey);
    let mut a = Daemon::start_with_env(
        &w.rekey,
        &["--force", &w.name],
        &[("REKEY_FAILPOINT", point), UNWATCHED],
    )
    .await;
    a.log_line(&["leading the cluster"]).await;
    let mut b = Daemon::start_with_env(&other, &[], &[UNWATCHED]).await;
    b.log_line(&["standing by"]).await;
    if RETIRE_POINTS.contains(&point) {
        // The leader retires only on evidence: give it some.
        until_state(&w.rekey, &w.name, "confirming").await;
        w.until_evidence_counts().await;
        assert!(w.sim.deliver(w.id, "clients.created").await.success);
    }
    a.log_line(&[rekey::failpoint::REACHED, point]).await;
    a.signal(Signal::KILL);
    let killed = Instant::now();
    a.exit(Duration::from_secs(10)).await;
    b.log_line(&["leading the cluster"]).await;
    let takeover = killed.elapsed();
    // The promise: within the lease plus one renew interval (the standby looks
    // twice as often as the leader renews).
    assert!(takeover < LEASE + RENEW, "{point}: {takeover:?}");
    // The standby resumes from the committed state as a restart would.
    if until_confirming_or_done(&w.rekey, &w.name).await == "confirming" {
        w.until_evidence_counts().await;
        assert!(w.sim.deliver(w.id, "clients.updated").await.success);
        until_state(&w.rekey, &w.name, "idle").await;
    }
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live(), "{point}");
    assert!(entry.get("previous").is_none(), "{point}: {entry}");
    b.signal(Signal::TERM);
    b.exit(Duration::from_secs(30)).await;
    assert_no_write_under_an_old_epoch(&pg);
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
    (takeover, w.sim.rotation_count(w.id))
}

#[tokio::test]
async fn the_standby_finishes_a_rotation_whose_leader_was_killed_at_any_crash_point() {
    let mut takeovers = vec![];
    // A few worlds (RustyVault, a simulator, two daemons each) at a time.
    for chunk in ROTATION_POINTS.chunks(3) {
        let runs: Vec<_> = (chunk.iter())
            .map(|&point| (point, tokio::spawn(kill_the_leader_at(point))))
            .collect();
        for (point, run) in runs {
            let (takeover, made) = run.await.unwrap_or_else(|e| panic!("{point}: {e}"));
            // Only a rotate response that died with the leader costs a rotation.
            let rotations = if point == "after:rotate-call" { 2 } else { 1 };
            assert_eq!(made, rotations, "{point}: rotations at the provider");
            println!(
                "failover after kill -9 at {point}: takeover {takeover:?}, {made} rotation(s)"
            );
            takeovers.push(takeover);
        }
    }
    takeovers.sort();
    println!(
        "failover: takeover median {:?}, max {:?} (lease {LEASE:?}, renew {RENEW:?})",
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1]
    );
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_is_refused_and_stands_by_with_no_second_rotate_call() {
    let w = World::new().await;
    let pg = database().await;
    share(&w.rekey, &pg);
    let other = second_host(&w.rekey);
    let mut a = Daemon::start_with_env(&w.rekey, &["--force", &w.name], &[UNWATCHED]).await;
    a.log_line(&["leading the cluster"]).await;
    let mut b = Daemon::start_with_env(&other, &[], &[UNWATCHED]).await;
    b.log_line(&["standing by"]).await;
    until_state(&w.rekey, &w.name, "confirming").await;

    a.signal(Signal::STOP);
    let paused = Instant::now();
    b.log_line(&["leading the cluster"]).await;
    let takeover = paused.elapsed();
    assert!(takeover < LEASE + RENEW, "{takeover:?}");
    assert_eq!(lease_row(&pg).1, 2);
    a.signal(Signal::CONT);
    let line = a.log_line(&["the cluster lease is lost"]).await;
    a.log_line(&["standing by"]).await;
    println!("deposed leader: {line}");

    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&w.rekey, &w.name, "idle").await;
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_eq!(w.sim.rotation_count(w.id), 1, "no second rotate call");
    // Everything after the takeover was written at epoch 2 by `b`: the history has
    // one publication and one retirement.
    let events: Vec<String> = (w.rekey.history(&w.name).await.iter())
        .map(|h| s(h, "event"))
        .collect();
    let count = |e: &str| events.iter().filter(|x| *x == e).count();
    assert_eq!((count("published"), count("retired")), (1, 1), "{events:?}");
    for d in [&mut a, &mut b] {
        d.signal(Signal::TERM);
        assert_eq!(d.exit(Duration::from_secs(30)).await.code(), Some(0));
    }
    assert_no_write_under_an_old_epoch(&pg);
    assert_eq!(pg.psql("SELECT max(epoch) FROM history"), "2");
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
}

/// A leader that falls silent inside a write's transaction (paused, cut off by a
/// network that drops packets) holds the lease row's lock; the server must end
/// that transaction well inside the lease, or the standby's takeover waits on the
/// lock for as long as the connection looks alive: hours.
#[tokio::test]
async fn a_leader_frozen_inside_a_write_transaction_does_not_hold_the_takeover_back() {
    let w = World::new().await;
    let pg = database().await;
    share(&w.rekey, &pg);
    let other = second_host(&w.rekey);
    let point = rekey::failpoint::IN_FENCED_WRITE;
    let mut a = Daemon::start_with_env(
        &w.rekey,
        &["--force", &w.name],
        &[("REKEY_FAILPOINT", point), UNWATCHED],
    )
    .await;
    a.log_line(&[rekey::failpoint::REACHED, point]).await;
    let frozen = Instant::now();
    let mut b = Daemon::start_with_env(&other, &["--force", &w.name], &[UNWATCHED]).await;
    b.log_line(&["leading the cluster"]).await;
    let takeover = frozen.elapsed();
    println!("leader frozen mid-transaction: the other took over after {takeover:?}");
    assert!(takeover < LEASE + RENEW + SLACK, "{takeover:?}");
    assert_eq!(lease_row(&pg).1, 2);
    a.signal(Signal::KILL);
    a.exit(Duration::from_secs(10)).await;
    // The new leader acts: it rotates, and the provider's live secret ends in the
    // store once a delivery signed with it succeeded.
    until_state(&other, &w.name, "confirming").await;
    evidence_counts_for(&other, &w.name, &w.sim, LONGEST_DELIVERY).await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&other, &w.name, "idle").await;
    assert_eq!(w.sim.rotation_count(w.id), 1);
    b.signal(Signal::TERM);
    assert_eq!(b.exit(Duration::from_secs(30)).await.code(), Some(0));
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_no_write_under_an_old_epoch(&pg);
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_leader_cut_off_from_the_database_stops_acting_and_the_other_takes_over() {
    let w = World::new().await;
    let pg = database().await;
    let proxy = Proxy::start(pg.port).await;
    share(&w.rekey, &pg.through(&proxy));
    let other = second_host(&w.rekey);
    let config = std::fs::read_to_string(&other.config).unwrap();
    let direct = config.replace(
        &format!("127.0.0.1:{}/", proxy.port),
        &format!("127.0.0.1:{}/", pg.port),
    );
    assert_ne!(config, direct);
    std::fs::write(&other.config, direct).unwrap();
    let mut a = Daemon::start_with_env(&w.rekey, &["--force", &w.name], &[UNWATCHED]).await;
    a.log_line(&["leading the cluster"]).await;
    let mut b = Daemon::start_with_env(&other, &[], &[UNWATCHED]).await;
    b.log_line(&["standing by"]).await;
    until_state(&other, &w.name, "confirming").await;

    proxy.cut();
    let cut = chrono::Utc::now();
    let stepped_down = logged_after(&a.log_line(&["the cluster lease is lost"]).await, cut);
    let takeover = logged_after(&b.log_line(&["leading the cluster"]).await, cut);
    // Its writes stop when its own clock says so; the history check below is what
    // proves no late write landed. The slack is for process scheduling on a busy
    // machine, as elsewhere in this file.
    assert!(stepped_down < LEASE, "{stepped_down:?}:\n{}", a.log());
    assert!(takeover < LEASE + RENEW + SLACK, "{takeover:?}");
    println!(
        "cut off from the database: stepped down after {stepped_down:?}, other took over after {takeover:?}"
    );
    a.log_line(&["standing by"]).await;

    // Read from the host that still reaches the database.
    evidence_counts_for(&other, &w.name, &w.sim, LONGEST_DELIVERY).await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&other, &w.name, "idle").await;
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_eq!(w.sim.rotation_count(w.id), 1);
    for d in [&mut a, &mut b] {
        d.signal(Signal::TERM);
        assert_eq!(d.exit(Duration::from_secs(30)).await.code(), Some(0));
    }
    assert_no_write_under_an_old_epoch(&pg);
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn the_database_restarted_mid_rotation_costs_a_reconnect_and_nothing_else() {
    let w = World::new().await;
    let server = Dedicated::start().await;
    let pg = server.database();
    share(&w.rekey, &pg);
    let other = second_host(&w.rekey);
    let mut a = Daemon::start_with_env(&w.rekey, &["--force", &w.name], &[UNWATCHED]).await;
    a.log_line(&["leading the cluster"]).await;
    let mut b = Daemon::start_with_env(&other, &[], &[UNWATCHED]).await;
    b.log_line(&["standing by"]).await;
    until_state(&w.rekey, &w.name, "confirming").await;

    server.restart().await;
    // Whoever leads after the restart (the same leader, or the standby if the
    // restart outlasted the lease) finishes the rotation.
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&w.rekey, &w.name, "idle").await;
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_eq!(w.sim.rotation_count(w.id), 1);
    println!("after the restart: lease epoch {}", lease_row(&pg).1);
    for d in [&mut a, &mut b] {
        d.signal(Signal::TERM);
        assert_eq!(d.exit(Duration::from_secs(30)).await.code(), Some(0));
    }
    assert_no_write_under_an_old_epoch(&pg);
    a.record(&w.rekey);
    b.record(&w.rekey);
    w.assert_no_leak(&[]);
}

/// How many subscriptions of the fleet have finished their rotation (idle, with a
/// retirement in their history), read from the database through `rekey`.
async fn finished(rekey: &Rekey) -> usize {
    let mut n = 0;
    for row in rekey.status().await {
        let name = s(&row, "subscription");
        if s(&row, "state") == "idle"
            && row["rotation_id"].is_null()
            && (rekey.history(&name).await.iter()).any(|h| s(h, "event") == "retired")
        {
            n += 1;
        }
    }
    n
}

/// Waits until at least `n` subscriptions have finished; panics showing what the
/// acting daemon printed if they do not within a minute and a half.
async fn until_finished(rekey: &Rekey, n: usize, acting: &Daemon) -> usize {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = finished(rekey).await;
        if done >= n {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} finished; the acting daemon printed:\n{}",
            acting.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The "done when": two daemons on one PostgreSQL rotate a fleet (Storno,
/// which confirms with its own test delivery, one rotation at a time, each rotate
/// call answered after 300 ms; asked for with `rekey rotate` from the standby's
/// host) with first one, then the other, killed mid-fleet;
/// every subscription ends with the provider's live secret as the store's
/// `current`, the old one retired on evidence, and no write under an old epoch.
#[tokio::test]
async fn two_daemons_rotate_a_fleet_with_either_one_killed_mid_fleet() {
    use rekey::sandbox::faults::FaultKind;
    use rekey::sandbox::storno::{Fault, Route, StornoSim, StornoSimOptions};

    use crate::support::rekey::ProviderConf;
    use crate::support::rvault::RustyVault;
    use crate::support::world::{Sim, receiver_for};

    const FLEET: usize = 9;
    let vault = RustyVault::start().await;
    let receiver = receiver_for(&vault).await;
    let storno = StornoSim::start(StornoSimOptions::default())
        .await
        .expect("storno");
    let rekey = Rekey::for_vault(&vault.addr(), vault.root_token());
    let conf: ProviderConf = storno.provider_conf();
    for (file, content) in &conf.files {
        std::fs::write(rekey.path().join(file), content).unwrap();
    }
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n\n[vault]\naddress = \"{}\"\ntoken_file = \"vault.token\"\n\
         mount = \"secret\"\nkv_version = 1\ntimeout = \"5s\"\n\n[[policies]]\nname = \"p\"\n\
         every = \"30d\"\nconfirm_timeout = \"1h\"\nconfirm_poll = \"1s\"\n\n[[providers]]\n\
         name = \"s\"\nkind = \"{}\"\nbase_url = \"{}\"\n{}\ntimeout = \"2s\"\nmax_concurrent = 1\n",
        vault.addr(),
        conf.kind,
        conf.base_url,
        conf.lines.join("\n")
    );
    let mut subs = vec![];
    for _ in 0..FLEET {
        let (id, secret) = storno.add("http://127.0.0.1:9/unrouted");
        let path = format!("webhooks/storno/{id}");
        assert!(storno.set_url(&id, &receiver.register(&format!("storno/{id}"), &path)));
        vault.kv1_write(&path, json!({ "current": secret })).await;
        toml.push_str(&format!(
            "\n[[subscriptions]]\nprovider = \"s\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"{path}\"\n"
        ));
        subs.push((format!("s/{id}"), id, path, secret));
    }
    std::fs::write(&rekey.config, toml).unwrap();
    let pg = database().await;
    share(&rekey, &pg);
    let other = second_host(&rekey);
    for _ in 0..3 * FLEET {
        storno.inject(Fault {
            route: Route::Rotate,
            kind: FaultKind::Delay(Duration::from_millis(300)),
        });
    }
    // A leads, B stands by; the operator asks from B's host (through the
    // database, as `rekey run --force` on one host could not survive a failover);
    // A is killed a third of the way through.
    let mut a = Daemon::start_with_env(&rekey, &[], &[UNWATCHED]).await;
    a.log_line(&["leading the cluster"]).await;
    let mut b = Daemon::start_with_env(&other, &[], &[UNWATCHED]).await;
    b.log_line(&["standing by"]).await;
    let mut ask = vec!["rotate"];
    ask.extend(subs.iter().map(|(n, ..)| n.as_str()));
    crate::support::rekey::assert_exit(&other.run(&ask).await, 0);
    let done = until_finished(&rekey, FLEET / 3, &a).await;
    assert!(
        done < FLEET,
        "the fleet finished before the kill: nothing tested"
    );
    a.signal(Signal::KILL);
    a.exit(Duration::from_secs(10)).await;
    a.record(&rekey);
    b.log_line(&["leading the cluster"]).await;

    // A comes back as the standby; B is killed two thirds of the way through.
    let mut a = Daemon::start_with_env(&rekey, &[], &[UNWATCHED]).await;
    a.log_line(&["standing by"]).await;
    let done = until_finished(&rekey, 2 * FLEET / 3, &b).await;
    assert!(done < FLEET, "the fleet finished before the second kill");
    b.signal(Signal::KILL);
    b.exit(Duration::from_secs(10)).await;
    b.record(&rekey);
    a.log_line(&["leading the cluster"]).await;
    until_finished(&rekey, FLEET, &a).await;
    a.signal(Signal::TERM);
    assert_eq!(a.exit(Duration::from_secs(30)).await.code(), Some(0));
    a.record(&rekey);

    let mut secrets = storno.credentials();
    for (name, id, path, old) in &subs {
        secrets.push(old.clone());
        secrets.extend(Sim::secret_of(&storno, id));
        let entry = vault.kv1_read(path).await.expect("entry");
        assert_eq!(
            Some(s(&entry, "current")),
            Sim::secret_of(&storno, id),
            "{name}"
        );
        assert!(entry.get("previous").is_none(), "{name}: {entry}");
        // A rotation is repeated only when its response died with a leader.
        assert!((1..=2).contains(&storno.rotation_count(id)), "{name}");
    }
    assert_no_write_under_an_old_epoch(&pg);
    assert_eq!(lease_row(&pg).1, 3, "two takeovers");
    let made: u32 = subs
        .iter()
        .map(|(_, id, ..)| storno.rotation_count(id))
        .sum();
    println!(
        "fleet failover: {FLEET} subscriptions, 2 leaders killed, {made} rotations at the provider, all retired on evidence"
    );
    rekey.assert_no_leak(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
}
