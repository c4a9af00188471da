//! The long-running daemon (`rekey run` without `--once`) as systemd runs it: a real
//! process, real signals, sd-notify datagrams on a socket the test binds, against a
//! real Vault-API server and the Fintoro simulator.

use std::time::Duration;

use rekey::sandbox::fintoro::{Fault, FaultKind, Route};
use rustix::process::Signal;

use crate::support::daemon::{Daemon, PATIENCE, until_state};
use crate::support::rekey::{Rekey, assert_exit, stderr};
use crate::support::util::{free_port, s};
use crate::support::world::World;

/// Scrapes `/metrics` until every line in `want` is there (the daemon updates its
/// gauges when its loop next turns, just after the state changed).
async fn until_metrics(port: u16, want: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        if want.iter().all(|w| body.contains(w)) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics lack some of {want:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rewrite_config(rekey: &Rekey, from: &str, to: &str) {
    let text = std::fs::read_to_string(&rekey.config).expect("config");
    assert!(text.contains(from), "config lacks {from:?}:\n{text}");
    std::fs::write(&rekey.config, text.replace(from, to)).expect("write config");
}

#[tokio::test]
async fn the_daemon_reports_ready_keeps_its_config_on_a_bad_reload_applies_a_good_one_and_stops_on_sigterm()
 {
    let w = World::new().await;
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    let status = d.notified("STATUS=1 subscription,").await;
    assert!(status.contains("0 held"), "{status}");

    // An invalid config: refused with the key named, the running one stays.
    rewrite_config(
        &w.rekey,
        "confirm_poll = \"1s\"",
        "confirm_poll = \"often\"",
    );
    d.signal(Signal::HUP);
    let reloading = d.notified("RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    d.log_line(&["policies[0].confirm_poll", "often"]).await;
    d.log_line(&["reload refused, the running config stays"])
        .await;
    d.notified("READY=1").await;
    assert_eq!(w.sim.rotation_count(w.id), 0);

    // A valid one that makes the subscription due at once: the daemon acts on it.
    rewrite_config(
        &w.rekey,
        "confirm_poll = \"often\"",
        "confirm_poll = \"1s\"",
    );
    rewrite_config(
        &w.rekey,
        "schedule = \"0 3 1 * *\"\ntimezone = \"Europe/Bratislava\"",
        "every = \"30d\"\nrotate_on_adopt = true",
    );
    d.signal(Signal::HUP);
    d.notified("RELOADING=1").await;
    d.log_line(&["config reloaded"]).await;
    d.notified("READY=1").await;
    let st = until_state(&w.rekey, &w.name, "confirming").await;
    assert_eq!(w.sim.rotation_count(w.id), 1);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert!(st["since"].is_string(), "status shows time in state: {st}");

    d.signal(Signal::TERM);
    d.notified("STOPPING=1").await;
    let status = d.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
    d.record(&w.rekey);
    w.assert_no_leak(&[]);
}

/// systemd shows the last STATUS= it got: after a refused reload and then a valid one
/// (which changes no subscription's state), it must be the scheduler's summary again,
/// not the refusal.
#[tokio::test]
async fn a_valid_reload_after_a_refused_one_restores_the_status_summary() {
    let w = World::new().await;
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    d.notified("STATUS=1 subscription,").await;

    rewrite_config(
        &w.rekey,
        "confirm_poll = \"1s\"",
        "confirm_poll = \"often\"",
    );
    d.signal(Signal::HUP);
    d.log_line(&["reload refused, the running config stays"])
        .await;
    let refused = d.notified("STATUS=reload refused").await;
    assert!(refused.contains("running the previous config"), "{refused}");

    rewrite_config(
        &w.rekey,
        "confirm_poll = \"often\"",
        "confirm_poll = \"1s\"",
    );
    d.signal(Signal::HUP);
    d.log_line(&["config reloaded"]).await;
    let status = d.notified("STATUS=").await;
    assert!(
        status.starts_with("STATUS=1 subscription, 0 active,"),
        "{status}"
    );

    d.signal(Signal::TERM);
    let exit = d.exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "{}", d.log());
}

#[tokio::test]
async fn rekey_rotate_wakes_the_running_daemon_which_rotates_and_confirms_on_its_own() {
    let w = World::new().await;
    let port = free_port();
    let text = std::fs::read_to_string(&w.rekey.config).expect("config");
    std::fs::write(
        &w.rekey.config,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let out = w.rekey.run(&["rotate", "acme/9999"]).await;
    assert_exit(&out, 64);
    assert!(
        stderr(&out).contains("no such subscription"),
        "{}",
        stderr(&out)
    );

    let out = w.rekey.run(&["rotate", &w.name]).await;
    assert_exit(&out, 0);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!("running rekey daemon (pid {})", d.pid)),
        "{said}"
    );
    d.log_line(&["woken (SIGUSR1)"]).await;
    until_state(&w.rekey, &w.name, "confirming").await;
    assert_eq!(w.sim.rotation_count(w.id), 1);

    // Evidence arrives; the daemon's own confirmation poll (every 1 s) sees it and
    // retires the old secret, with no further command.
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    until_state(&w.rekey, &w.name, "idle").await;
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(entry.get("previous").is_none(), "{entry}");
    let events: Vec<String> = w
        .rekey
        .history(&w.name)
        .await
        .iter()
        .map(|h| s(h, "event"))
        .collect();
    assert!(events.contains(&"retired".to_string()), "{events:?}");
    assert!(
        w.rekey
            .history(&w.name)
            .await
            .iter()
            .any(|h| s(h, "detail").contains("(requested)")),
        "the trigger is recorded"
    );

    // The metrics saw the whole rotation.
    let metrics = until_metrics(
        port,
        &[
            r#"rekey_rotations_total{provider="acme",outcome="retired"} 1"#,
            r#"rekey_subscriptions{state="idle"} 1"#,
            "rekey_exposure_window_seconds_count 1",
            "rekey_confirmation_latency_seconds_count 1",
            r#"rekey_last_success_timestamp_seconds{subscription="acme/801"}"#,
            r#"rekey_next_rotation_timestamp_seconds{subscription="acme/801"}"#,
            r#"rekey_clock_offset_seconds{peer="acme",bound="low"}"#,
            r#"rekey_clock_offset_seconds{peer="vault",bound="high"}"#,
        ],
    )
    .await;
    assert!(!metrics.contains(&w.live()) && !metrics.contains(&w.initial));
    // Clock offsets, measured from the answers' `Date`: the provider's bounds hold
    // its true offset (none: the simulator shares this host's clock).
    let bound = |peer: &str, bound: &str| -> f64 {
        let key = format!(r#"rekey_clock_offset_seconds{{peer="{peer}",bound="{bound}"}} "#);
        let line = metrics.lines().find(|l| l.starts_with(&key));
        let value = line.and_then(|l| l[key.len()..].trim().parse().ok());
        value.unwrap_or_else(|| panic!("no {key}in:\n{metrics}"))
    };
    let (low, high) = (bound("acme", "low"), bound("acme", "high"));
    assert!(
        low <= 0.0 && 0.0 <= high && high - low <= 1.5,
        "[{low}, {high}]"
    );
    assert!(bound("vault", "low") <= bound("vault", "high"));

    d.signal(Signal::INT);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
    d.record(&w.rekey);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn sigterm_mid_rotation_lets_the_rotate_call_publish_exits_0_and_a_later_run_finishes() {
    let w = World::new().await;
    // The provider commits the rotation and answers 1.5 s later (under the 2 s
    // client timeout): SIGTERM lands while the only copy of the secret is on the wire.
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::Delay(Duration::from_millis(1500)),
    });
    let mut d = Daemon::start(&w.rekey, &["--force", &w.name]).await;
    d.log_line(&["rotate call sent"]).await;
    d.signal(Signal::TERM);
    d.notified("STOPPING=1").await;
    let started = std::time::Instant::now();
    let status = d.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(started.elapsed() < Duration::from_secs(5), "exits promptly");
    d.log_line(&["stopping at a saved step"]).await;
    d.record(&w.rekey);

    // The secret made it: published (both), at a saved boundary, before the check.
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "published", "{st}");
    assert_eq!(w.sim.rotation_count(w.id), 1);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);

    // A later run continues from there and finishes on evidence.
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "confirming");
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert_eq!(w.sim.rotation_count(w.id), 1, "no second rotation");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_held_subscription_is_retired_through_the_daemon_only_when_the_operator_confirms() {
    let w = World::with_policy(Some(
        r#"schedule = "0 3 1 * *"
timezone = "Europe/Bratislava"
confirm_timeout = "2s"
confirm_poll = "1s"
on_timeout = "hold"
retry_base = "1s"
retry_max = "2s""#,
    ))
    .await;
    // No daemon yet: `rekey rotate` rotates right here.
    let out = w.rekey.run(&["rotate", &w.name]).await;
    assert_exit(&out, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "confirming");

    // The daemon keeps polling; no delivery comes, so the deadline holds it.
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    until_state(&w.rekey, &w.name, "held").await;
    assert_eq!(
        s(&w.entry().await, "previous"),
        w.initial,
        "both stay published"
    );

    // Without a terminal and without --yes: refused, nothing changes.
    let out = w.rekey.run(&["retire", &w.name]).await;
    assert_exit(&out, 64);
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "held");

    let out = w.rekey.run(&["retire", &w.name, "--yes"]).await;
    assert_exit(&out, 0);
    d.log_line(&["operator decision received", "retire"]).await;
    until_state(&w.rekey, &w.name, "idle").await;
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(entry.get("previous").is_none(), "{entry}");

    // Deciding again is refused: it is no longer held.
    let out = w.rekey.run(&["resume", &w.name, "--yes"]).await;
    assert_exit(&out, 64);

    d.signal(Signal::TERM);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
    d.record(&w.rekey);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn with_the_watchdog_on_the_idle_scheduler_still_pings_at_half_the_interval() {
    let w = World::new().await;
    // 600 ms: systemd would expect a ping at least every 300 ms; nothing is due for
    // weeks, so only the scheduler loop's own wake-ups can send them.
    let mut d = Daemon::start_with_env(&w.rekey, &[], &[("WATCHDOG_USEC", "600000")]).await;
    d.notified("READY=1").await;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        d.notified("WATCHDOG=1").await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "pings came every ~300 ms, took {:?}",
        started.elapsed()
    );
    d.signal(Signal::TERM);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test]
async fn check_config_prints_the_plan_touching_nothing_and_preflight_finds_a_sealed_vault() {
    let w = World::new().await;
    let out = w.rekey.run(&["check-config"]).await;
    assert_exit(&out, 0);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    // 03:00 in Bratislava on the 1st (02:00 UTC in winter, 01:00 in summer).
    let tz = rekey::policy_timing::Schedule::parse_zone("Europe/Bratislava").expect("zone");
    let first = rekey::policy_timing::Schedule::cron("0 3 1 * *", tz)
        .expect("cron")
        .next_after(chrono::Utc::now())
        .expect("next");
    assert!(said.contains("acme/801"), "{said}");
    assert!(
        said.contains(&first.format("%Y-%m-%d %H:%M:%SZ").to_string()),
        "the plan lists start times: {said}"
    );
    assert!(!w.rekey.state_dir().exists(), "check-config created state");

    let out = w.rekey.run(&["check-config", "--preflight"]).await;
    assert_exit(&out, 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("preflight: acme/801: ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    w.vault.seal().await;
    let out = w.rekey.run(&["check-config", "--preflight"]).await;
    assert_exit(&out, 1);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("FAILED"), "{said}");
    assert!(!w.rekey.state_dir().exists(), "preflight created state");
    assert_eq!(w.sim.rotation_count(w.id), 0);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_rotate_call_slower_than_the_drain_timeout_cannot_hold_sigterm_and_is_recovered_later() {
    let w = World::new().await;
    rewrite_config(
        &w.rekey,
        "[log]",
        "[daemon]\ndrain_timeout = \"1s\"\n\n[log]",
    );
    // Committed at the provider, answered after 1.8 s: longer than the drain timeout
    // (1 s), shorter than the client timeout (2 s).
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::Delay(Duration::from_millis(1800)),
    });
    let mut d = Daemon::start(&w.rekey, &["--force", &w.name]).await;
    d.log_line(&["rotate call sent"]).await;
    d.signal(Signal::TERM);
    let started = std::time::Instant::now();
    let status = d.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the drain timeout, took {:?}",
        started.elapsed()
    );
    d.log_line(&["drain timeout"]).await;
    d.record(&w.rekey);

    // The process left while the response was on the wire (it did not wait for it:
    // the state is still `rotating`), and the
    // next run treats the response as lost, rotates again and publishes that secret.
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "rotating");
    assert_exit(&w.rekey.once(&[]).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(st["lost_responses"], 1, "{st}");
    assert_eq!(w.sim.rotation_count(w.id), 2);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn the_daemon_adopts_a_subscription_the_provider_starts_listing() {
    let w = World::with_policy(Some(
        "every = \"30d\"\nrotate_on_adopt = true\nconfirm_timeout = \"1h\"\nconfirm_poll = \"1s\"",
    ))
    .await;
    // Manage everything the account lists, besides the explicit 801.
    let text = std::fs::read_to_string(&w.rekey.config).unwrap();
    std::fs::write(
        &w.rekey.config,
        format!(
            "{text}\n[[subscriptions]]\nprovider = \"acme\"\nid = \"*\"\npolicy = \"p\"\nvault_path = \"webhooks/{{provider}}/{{id}}\"\n"
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;

    // A new subscription appears at the provider while the daemon runs.
    let url = w.receiver.register("fintoro/802", "webhooks/acme/802");
    let (id, initial) = w.sim.add_subscription(&url);
    assert_eq!(id, 802);
    d.signal(Signal::USR1);
    // Not in the status until the daemon has listed it: poll, bounded.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let rows = w.rekey.status().await;
        if rows
            .iter()
            .any(|r| r["subscription"] == "acme/802" && r["state"] == "confirming")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acme/802 never reached confirming: {rows:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        w.sim.rotation_count(802),
        1,
        "adopted and rotated (rotate_on_adopt)"
    );
    let entry = w
        .vault
        .kv1_read("webhooks/acme/802")
        .await
        .expect("published");
    assert_eq!(s(&entry, "current"), w.sim.secret_of(802).unwrap());
    let history = w.rekey.history("acme/802").await;
    assert!(
        history.iter().any(|h| s(h, "event") == "discovered"),
        "{history:?}"
    );

    d.signal(Signal::TERM);
    let status = d.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
    d.record(&w.rekey);
    w.assert_no_leak(&[&initial]);
}

#[tokio::test]
async fn with_discovery_only_the_status_line_and_the_gauges_count_the_discovered_subscriptions() {
    let w = World::new().await;
    let url = w.receiver.register("fintoro/802", "webhooks/fintoro/802");
    let (other, initial) = w.sim.add_subscription(&url);
    // Nothing configured by id: the account's list (801 and 802) is the fleet.
    rewrite_config(&w.rekey, "id = \"801\"", "id = \"*\"");
    rewrite_config(
        &w.rekey,
        "vault_path = \"webhooks/fintoro/801\"",
        "vault_path = \"webhooks/{kind}/{id}\"",
    );
    let port = free_port();
    let text = std::fs::read_to_string(&w.rekey.config).expect("config");
    std::fs::write(
        &w.rekey.config,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    let status = d.notified("STATUS=").await;
    assert!(
        status.contains("STATUS=2 subscriptions,"),
        "{status}\n{}",
        d.log()
    );
    until_metrics(
        port,
        &[
            r#"rekey_subscriptions{state="idle"} 2"#,
            r#"rekey_next_rotation_timestamp_seconds{subscription="acme/801"}"#,
            &format!(r#"rekey_next_rotation_timestamp_seconds{{subscription="acme/{other}"}}"#),
        ],
    )
    .await;

    d.signal(Signal::TERM);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
    d.record(&w.rekey);
    w.assert_no_leak(&[&initial]);
}
