//! Which commands read the token files: only those that call a provider or Vault.
//! Under systemd the files are credentials only the service can read, so an operator
//! must be able to run `rekey status`, `history` and `check-config` without them, and
//! hand a `rekey rotate` to the running daemon.

use rustix::process::Signal;

use crate::support::daemon::{Daemon, PATIENCE};
use crate::support::rekey::{Rekey, Setup, Store, assert_exit, stderr};

/// A provider and a Vault nobody listens at: a command that reached for either would
/// fail, so these tests also show the read-only commands call out to nothing.
const NOWHERE: &str = "http://127.0.0.1:1";

fn rekey(store: Store) -> Rekey {
    Rekey::new(&Setup::new(store, NOWHERE, "fintoro-token").subscription("801", "webhooks/801"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the files holding the provider token and the Vault token.
fn remove_credentials(rekey: &Rekey) {
    for f in ["fintoro.token", "vault.token"] {
        let _ = std::fs::remove_file(rekey.path().join(f));
    }
}

/// The error every command that needs the provider's token gives without it.
fn assert_token_unreadable(out: &std::process::Output) {
    assert_exit(out, 78);
    let err = stderr(out);
    assert!(
        err.contains("invalid config")
            && err.contains("providers[0].token_file")
            && err.contains("cannot read")
            && err.contains("fintoro.token"),
        "{err}"
    );
}

#[tokio::test]
async fn status_history_and_check_config_read_no_token_file() {
    let r = rekey(Store::Vault {
        addr: NOWHERE.into(),
        token: "vault-token".into(),
    });
    remove_credentials(&r);

    let out = r.run(&["status", "--json"]).await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("acme/801"), "{}", stdout(&out));
    let out = r.run(&["history"]).await;
    assert_exit(&out, 0);
    let out = r.run(&["check-config"]).await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(": ok"), "{}", stdout(&out));
    assert!(stdout(&out).contains("acme/801 -> webhooks/801"));
}

#[tokio::test]
async fn run_once_and_preflight_still_need_the_token_files() {
    let r = rekey(Store::Vault {
        addr: NOWHERE.into(),
        token: "vault-token".into(),
    });
    remove_credentials(&r);
    for args in [
        &["run", "--once"][..],
        &["run"],
        &["check-config", "--preflight"],
        // Nothing holds the state directory, so rotate would do the work here.
        &["rotate", "acme/801"],
    ] {
        let out = r.run(args).await;
        assert_token_unreadable(&out);
        assert!(stderr(&out).contains("vault.token_file"), "{args:?}");
    }
}

#[tokio::test]
async fn rotate_hands_over_to_the_daemon_without_reading_the_token_files() {
    let r = rekey(Store::Files);
    let mut d = Daemon::start(&r, &[]).await;
    d.notified("READY=1").await;
    remove_credentials(&r);

    let out = r.run(&["rotate", "acme/801"]).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("handed to the running rekey daemon"),
        "{}",
        stdout(&out)
    );
    d.log_line(&["woken (SIGUSR1)"]).await;

    // The woken daemon tries the unreachable provider; its retries end within the
    // drain, which SIGTERM waits for.
    d.signal(Signal::TERM);
    let status = d.exit(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
}
