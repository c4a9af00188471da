//! The shipped units, byte for byte, under a real systemd (the host's; 252 on Debian 12)
//! booted in a throwaway systemd-nspawn container over this host's root
//! (`scripts/real-systemd`, through `support::nspawn`), against the Fintoro simulator and
//! a real RustyVault.
//!
//! Where things run: the guest has only loopback, so the test joins the guest's network
//! namespace and starts the simulator, the receiver and RustyVault there exactly as the
//! other tests do: in this process (RustyVault as its child), reachable by the guest's
//! services at 127.0.0.1 and in the test's hands. The guest gets the test build of rekey
//! (it has the failpoints) at `/usr/bin/rekey` and the repository's units, bound
//! read-only; the units are installed as shipped (no path needs changing) and the config
//! and tokens written to `/etc/rekey` in the guest. Operator commands run in the guest
//! as root, as `sudo rekey …` would.
//!
//! To run an installed package instead: boot with the package bound in, `dpkg -i` it
//! instead of [`install_build`], then [`Stage::new`] and the same steps.

use std::process::Output;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rekey::sandbox::fintoro::{Fault, FaultKind, Route};
use serde_json::{Value, json};

use crate::support::nspawn::{Bind, Container, PATIENCE};
use crate::support::rekey::{LONGEST_DELIVERY, PROVIDER};
use crate::support::util::{s, until_evidence_counts};
use crate::support::world::{FINTORO_TOKEN, World};

const DAEMON: &str = "rekey.service";
const ONCE: &str = "rekey-once.service";
const TIMER: &str = "rekey-once.timer";
/// Where the guest sees the repository's `systemd/` directory.
const UNITS: &str = "/run/rekey-units";
const CONFIG: &str = "/etc/rekey/rekey.toml";
/// systemd's range for DynamicUser= ids.
const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

/// Boots a guest with this build's binary and the repository's units bound in.
fn boot_with_build(what: &str) -> Option<Container> {
    Container::boot_or_skip(
        what,
        &[
            Bind::ro(env!("CARGO_BIN_EXE_rekey"), "/usr/bin/rekey"),
            Bind::ro(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd"), UNITS),
        ],
    )
}

/// Installs the units as docs/daemon.md does (the binary is bound in already).
async fn install_build(c: &Container) {
    for unit in [DAEMON, ONCE, TIMER] {
        let from = format!("{UNITS}/{unit}");
        c.ok(&["install", "-m", "0644", &from, "/etc/systemd/system/"])
            .await;
    }
    c.ok(&["systemctl", "daemon-reload"]).await;
}

/// A config for the guest: `subs` of the world's Fintoro account, the tokens read from
/// `unit`'s credentials directory (each unit has its own).
fn config(w: &World, subs: &[u64], unit: &str) -> String {
    let creds = format!("/run/credentials/{unit}");
    let mut text = format!(
        r#"version = 1
state_dir = "/var/lib/rekey"

[vault]
address = "{vault}"
token_file = "{creds}/vault-token"
mount = "secret"
kv_version = 1
timeout = "5s"

[[providers]]
name = "{PROVIDER}"
kind = "fintoro"
base_url = "{base}"
token_file = "{creds}/fintoro-acme.token"
longest_delivery = "1ms"
timeout = "2s"

[[policies]]
name = "p"
schedule = "0 3 1 * *"
confirm_timeout = "1h"
confirm_poll = "1s"
on_timeout = "hold"
retry_base = "1s"
retry_max = "2s"
"#,
        vault = w.vault.addr(),
        base = w.sim.base_url(),
    );
    for id in subs {
        text.push_str(&format!(
            "\n[[subscriptions]]\nprovider = \"{PROVIDER}\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"webhooks/fintoro/{id}\"\n"
        ));
    }
    text
}

/// The world a guest's rekey talks to, and its config: the world's first subscription
/// for the daemon, with the root-only token files the units load as credentials.
struct Stage<'a> {
    c: &'a Container,
    w: World,
    /// A second subscription on the account, not yet in the config.
    other: u64,
}

impl<'a> Stage<'a> {
    async fn new(c: &'a Container) -> Stage<'a> {
        let w = World::new().await;
        let url = w.receiver.register("fintoro/802", "webhooks/fintoro/802");
        let (other, initial) = w.sim.add_subscription(&url);
        w.vault
            .kv1_write("webhooks/fintoro/802", json!({ "current": initial }))
            .await;
        c.write("/etc/rekey/vault-token", w.vault.root_token(), 0o600)
            .await;
        c.write("/etc/rekey/fintoro-acme.token", FINTORO_TOKEN, 0o600)
            .await;
        let s = Stage { c, w, other };
        s.config(&config(&s.w, &[s.w.id], DAEMON)).await;
        s
    }

    async fn config(&self, text: &str) {
        self.c.write(CONFIG, text, 0o644).await;
    }

    fn name(&self, id: u64) -> String {
        format!("{PROVIDER}/{id}")
    }

    /// `rekey ARGS --config /etc/rekey/rekey.toml` in the guest, as root.
    async fn rekey(&self, args: &[&str]) -> Output {
        let mut all = vec!["rekey"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", CONFIG]);
        self.c.run(&all).await
    }

    async fn state_of(&self, id: u64) -> Value {
        let out = self.rekey(&["status", "--json"]).await;
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let name = self.name(id);
        rows.into_iter()
            .find(|r| r["subscription"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} is not in the status"))
    }

    async fn until_state(&self, id: u64, state: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let st = self.state_of(id).await;
            if st["state"] == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {state}: {st}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn until_rotated_at_provider(&self, id: u64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.w.sim.rotation_count(id) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} was never rotated; the journal:\n{}",
                self.c.journal(None, DAEMON).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn main_pid(&self) -> u32 {
        let pid = self.c.show(DAEMON, "MainPID").await;
        pid.parse().unwrap_or_else(|_| panic!("MainPID {pid:?}"))
    }

    /// The secret Vault holds as current for `id` is the one live at the provider.
    async fn published(&self, id: u64) -> Value {
        let entry = self
            .w
            .vault
            .kv1_read(&format!("webhooks/fintoro/{id}"))
            .await
            .expect("an entry");
        let live = self.w.sim.secret_of(id).expect("subscription");
        assert_eq!(
            s(&entry, "current"),
            live,
            "{id}: Vault has the live secret"
        );
        entry
    }
}

#[test]
fn rekey_service_and_the_once_timer_work_under_a_real_systemd() {
    let Some(c) =
        boot_with_build("real_systemd::rekey_service_and_the_once_timer_work_under_a_real_systemd")
    else {
        return;
    };
    c.in_network(|| async {
        install_build(&c).await;
        let s = Stage::new(&c).await;
        let pid = start_returns_after_ready(&s).await;
        confined_as_shipped(&s, pid).await;
        reloads_keep_the_daemon_running(&s, pid).await;
        usr1_makes_the_daemon_take_a_recorded_request(&s).await;
        rotate_hands_over_and_stop_drains(&s, pid).await;
        once_finishes_what_the_daemon_left(&s).await;
        timer_schedules_the_pass(&s).await;
    });
}

async fn start_returns_after_ready(s: &Stage<'_>) -> u32 {
    let c = s.c;
    c.ok(&["systemctl", "start", DAEMON]).await;
    // Read at once, no polling: a Type=notify service turns active only on READY=1,
    // so start returned after it.
    assert_eq!(c.show(DAEMON, "Type").await, "notify");
    assert_eq!(c.show(DAEMON, "ActiveState").await, "active");
    assert_eq!(c.show(DAEMON, "SubState").await, "running");
    c.until_show(DAEMON, "StatusText", |t| {
        t.starts_with("1 subscription, 0 active")
    })
    .await;
    s.main_pid().await
}

/// The first number of `key`'s line in a /proc/PID/status text.
fn proc_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key} in:\n{status}"))
        .to_string()
}

/// DynamicUser=, StateDirectory=, LoadCredential= and the hardening as systemd applied
/// them to the running daemon: checked on the process itself and, for the files, by
/// entering its mount namespace with its uid and no capabilities.
async fn confined_as_shipped(s: &Stage<'_>, pid: u32) {
    let c = s.c;
    let status = c.ok(&["cat", &format!("/proc/{pid}/status")]).await;
    let uid: u32 = proc_field(&status, "Uid:").parse().expect("uid");
    assert!(DYNAMIC_UIDS.contains(&uid), "not a dynamic user: {uid}");
    assert_eq!(proc_field(&status, "NoNewPrivs:"), "1");
    assert_eq!(proc_field(&status, "Seccomp:"), "2", "a syscall filter");
    assert_eq!(proc_field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(proc_field(&status, "CapBnd:"), "0000000000000000");
    let state = c
        .ok(&["stat", "-c", "%a %u", "/var/lib/private/rekey"])
        .await;
    assert_eq!(state.trim(), format!("700 {uid}"), "the state directory");
    assert_eq!(
        c.ok(&["readlink", "/var/lib/rekey"]).await.trim(),
        "private/rekey"
    );

    let (pid, uid) = (pid.to_string(), uid.to_string());
    let in_guest: &[&str] = &[];
    let as_daemon = ["nsenter", "-t", &pid, "-m", "-S", &uid, "-G", &uid, "--"];
    let as_root_there = ["nsenter", "-t", &pid, "-m", "--"];
    let touch = |path: &str| format!("touch {path} && rm {path}");
    let (etc, var_lib, state) = (
        touch("/etc/rekey-probe"),
        touch("/var/lib/rekey-probe"),
        touch("/var/lib/rekey/probe"),
    );
    let creds = "/run/credentials/rekey.service/vault-token";
    let probes: [(&[&str], &[&str], bool, &str); 6] = [
        (
            in_guest,
            &["sh", "-c", &etc],
            true,
            "root in the guest (not the sandbox) writes /etc",
        ),
        (
            &as_root_there,
            &["sh", "-c", &etc],
            false,
            "the sandbox's root writes /etc",
        ),
        (
            &as_root_there,
            &["sh", "-c", &var_lib],
            false,
            "the sandbox's root writes /var/lib",
        ),
        (
            &as_daemon,
            &["sh", "-c", &state],
            true,
            "the daemon writes its state",
        ),
        (
            &as_daemon,
            &["test", "-r", creds],
            true,
            "the daemon reads its credential",
        ),
        (
            &as_daemon,
            &["test", "-r", "/etc/rekey/vault-token"],
            false,
            "the daemon reads the root-only token file",
        ),
    ];
    for (how, cmd, allowed, what) in probes {
        let mut args = how.to_vec();
        args.extend_from_slice(cmd);
        let out = c.run(&args).await;
        assert_eq!(
            out.status.success(),
            allowed,
            "`{what}` should be {} ({})",
            if allowed { "allowed" } else { "refused" },
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn reloads_keep_the_daemon_running(s: &Stage<'_>, pid: u32) {
    let c = s.c;
    let both = config(&s.w, &[s.w.id, s.other], DAEMON);
    let mark = c.cursor().await;
    s.config(&both).await;
    c.ok(&["systemctl", "reload", DAEMON]).await;
    let line = c.until_logged(&mark, DAEMON, &["config reloaded"]).await;
    assert!(line.contains("subscriptions=2"), "{line}");
    c.until_show(DAEMON, "StatusText", |t| t.starts_with("2 subscriptions"))
        .await;

    let mark = c.cursor().await;
    s.config(&format!(
        "{both}\n[[subscriptions]]\nprovider = \"{PROVIDER}\"\nid = \"803\"\npolicy = \"nope\"\nvault_path = \"webhooks/fintoro/803\"\n"
    )).await;
    c.ok(&["systemctl", "reload", DAEMON]).await;
    let why = c.until_logged(&mark, DAEMON, &["invalid config"]).await;
    assert!(why.contains("nope"), "the journal names the problem: {why}");
    c.until_logged(&mark, DAEMON, &["reload refused, the running config stays"])
        .await;
    c.until_show(DAEMON, "StatusText", |t| t.contains("reload refused"))
        .await;
    assert_eq!(s.main_pid().await, pid, "the daemon kept running");
    assert_eq!(c.show(DAEMON, "ActiveState").await, "active");

    let mark = c.cursor().await;
    s.config(&both).await;
    c.ok(&["systemctl", "reload", DAEMON]).await;
    c.until_logged(&mark, DAEMON, &["config reloaded"]).await;
    assert_eq!(s.main_pid().await, pid, "the daemon kept running");
}

/// A `rekey rotate` that may not signal the daemon (here: `kill` filtered out) records
/// the request and says so; `systemctl kill -s USR1` makes the daemon take it.
async fn usr1_makes_the_daemon_take_a_recorded_request(s: &Stage<'_>) {
    let c = s.c;
    let name = s.name(s.w.id);
    let out = c
        .run(&[
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "-p",
            "SystemCallFilter=~kill",
            "-p",
            "SystemCallErrorNumber=EPERM",
            "rekey",
            "rotate",
            &name,
            "--config",
            CONFIG,
        ])
        .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{said}");
    assert!(said.contains("could not be woken"), "{said}");

    let mark = c.cursor().await;
    c.ok(&["systemctl", "kill", "-s", "USR1", DAEMON]).await;
    c.until_logged(&mark, DAEMON, &["woken (SIGUSR1)"]).await;
    c.until_logged(&mark, DAEMON, &["rotation requested", &name])
        .await;
    s.until_rotated_at_provider(s.w.id).await;
    s.until_state(s.w.id, "confirming").await;
    s.published(s.w.id).await;
}

/// `rekey rotate` wakes the daemon itself; a stop while that rotate call is in flight
/// lets it finish and publish, and the daemon exits 0.
async fn rotate_hands_over_and_stop_drains(s: &Stage<'_>, pid: u32) {
    let c = s.c;
    let name = s.name(s.other);
    s.w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::Delay(Duration::from_millis(1500)),
    });
    let mark = c.cursor().await;
    let out = s.rekey(&["rotate", &name]).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("handed to the running rekey daemon (pid {pid})")),
        "{said}"
    );
    c.until_logged(&mark, DAEMON, &["rotate call sent", &name])
        .await;

    c.ok(&["systemctl", "stop", DAEMON]).await;
    c.until_logged(
        &mark,
        DAEMON,
        &["stopping: letting in-flight steps reach a saved state"],
    )
    .await;
    assert_eq!(c.show(DAEMON, "ActiveState").await, "inactive");
    assert_eq!(c.show(DAEMON, "Result").await, "success");
    assert_eq!(c.show(DAEMON, "ExecMainStatus").await, "0");
    assert_eq!(s.w.sim.rotation_count(s.other), 1);
    s.published(s.other).await;

    // The operator's commands ran as root: none left a file the service cannot open.
    let uid = c.ok(&["stat", "-c", "%u", "/var/lib/private/rekey"]).await;
    let foreign = c
        .ok(&["find", "/var/lib/private/rekey", "!", "-uid", uid.trim()])
        .await;
    assert_eq!(
        foreign, "",
        "files in the state directory not owned by the service"
    );
}

/// With the daemon stopped, the timer's one-shot pass completes both rotations (a
/// delivery with each new secret has since arrived) and exits 0.
async fn once_finishes_what_the_daemon_left(s: &Stage<'_>) {
    let c = s.c;
    s.config(&config(&s.w, &[s.w.id, s.other], ONCE)).await;
    // Both were published before now (the stop returned after the drain).
    until_evidence_counts(
        Utc::now(),
        s.w.sim.options().clock_skew,
        TimeDelta::seconds(1),
        LONGEST_DELIVERY,
    )
    .await;
    for id in [s.w.id, s.other] {
        assert!(
            s.w.sim.deliver(id, "clients.updated").await.success,
            "{id}: delivered"
        );
    }
    let mark = c.cursor().await;
    c.ok(&["systemctl", "start", ONCE]).await;
    assert_eq!(c.show(ONCE, "Result").await, "success");
    assert_eq!(c.show(ONCE, "ExecMainStatus").await, "0");
    for id in [s.w.id, s.other] {
        c.until_logged(&mark, ONCE, &["retired the old secret", &s.name(id)])
            .await;
        let entry = s.published(id).await;
        assert!(
            entry["previous"].is_null(),
            "{id}: the old secret is retired: {entry}"
        );
    }
}

async fn timer_schedules_the_pass(s: &Stage<'_>) {
    let c = s.c;
    c.ok(&["systemctl", "start", TIMER]).await;
    assert_eq!(c.show(TIMER, "ActiveState").await, "active");
    assert_eq!(c.show(TIMER, "SubState").await, "waiting");
    assert_eq!(c.show(TIMER, "Triggers").await, ONCE);
    let next = c.show(TIMER, "NextElapseUSecRealtime").await;
    assert!(!next.is_empty(), "the timer has a next run");
}

/// A scheduler that stops pinging (frozen by a failpoint on SIGUSR1) is killed by
/// systemd's watchdog and restarted. Only the watchdog's timing is shortened.
#[test]
fn the_watchdog_restarts_a_daemon_whose_scheduler_froze() {
    let Some(c) =
        boot_with_build("real_systemd::the_watchdog_restarts_a_daemon_whose_scheduler_froze")
    else {
        return;
    };
    c.in_network(|| async {
        install_build(&c).await;
        let s = Stage::new(&c).await;
        c.write(
            "/etc/systemd/system/rekey.service.d/watchdog.conf",
            &format!(
                "[Service]\nWatchdogSec=2s\nRestartSec=100ms\nEnvironment=REKEY_FAILPOINT={}\n",
                rekey::failpoint::SCHEDULER_WOKEN
            ),
            0o644,
        )
        .await;
        c.ok(&["systemctl", "daemon-reload"]).await;
        c.ok(&["systemctl", "start", DAEMON]).await;
        let pid = s.main_pid().await;

        let mark = c.cursor().await;
        c.ok(&["systemctl", "kill", "-s", "USR1", DAEMON]).await;
        c.until_logged(&mark, DAEMON, &[rekey::failpoint::REACHED])
            .await;
        c.until_logged(&mark, DAEMON, &["Watchdog timeout"]).await;
        c.until_show(DAEMON, "NRestarts", |n| n == "1").await;
        c.until_show(DAEMON, "ActiveState", |a| a == "active").await;
        assert_ne!(s.main_pid().await, pid, "a new process runs");
    });
}
