//! `rekey run --once` (the `rekey-once.timer` setup) while an operator runs commands
//! and while systemd stops it: a real process, real signals, the Fintoro simulator and
//! a real Vault-API server.

use std::time::Duration;

use rekey::sandbox::fintoro::{Fault, FaultKind, Route};
use rustix::process::Signal;
use serde_json::json;

use crate::support::daemon::{Daemon, PATIENCE};
use crate::support::rekey::assert_exit;
use crate::support::util::s;
use crate::support::world::World;

/// Adds a second subscription on the world's account to the provider, Vault and the
/// config; under the default policy it is not due. Returns its id and first secret.
async fn second_subscription(w: &World) -> (u64, String) {
    let url = w.receiver.register("fintoro/802", "webhooks/fintoro/802");
    let (id, initial) = w.sim.add_subscription(&url);
    assert_eq!(id, 802);
    w.vault
        .kv1_write("webhooks/fintoro/802", json!({ "current": initial }))
        .await;
    let text = std::fs::read_to_string(&w.rekey.config).expect("config");
    std::fs::write(
        &w.rekey.config,
        format!(
            "{text}\n[[subscriptions]]\nprovider = \"acme\"\nid = \"802\"\npolicy = \"p\"\nvault_path = \"webhooks/fintoro/802\"\n"
        ),
    )
    .expect("config");
    (id, initial)
}

/// Holds the world's first rotate answer for 1.5 s (committed at once; under the 2 s
/// client timeout), so a test can act while a one-shot pass is mid-call.
fn slow_rotate(w: &World) {
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::Delay(Duration::from_millis(1500)),
    });
}

#[tokio::test]
async fn rekey_rotate_during_a_once_pass_is_served_by_that_pass_which_exits_normally() {
    let w = World::new().await;
    let (other, initial) = second_subscription(&w).await;
    let other_name = format!("acme/{other}");
    slow_rotate(&w);
    let mut once = Daemon::start(&w.rekey, &["--once", "--force", &w.name]).await;
    once.log_line(&["rotate call sent"]).await;

    let out = w.rekey.run(&["rotate", &other_name]).await;
    assert_exit(&out, 0);
    // Not killed by a SIGUSR1 from the CLI (that was exit 138)...
    let status = once.exit(PATIENCE).await;
    once.record(&w.rekey);
    assert_eq!(status.code(), Some(0), "{status}: {}", once.log());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!("one-shot pass (pid {})", once.pid))
            && said.contains("takes it before it exits"),
        "the CLI says who takes the request: {said}"
    );
    // ...and the request was not left behind: the same pass served it.
    assert_eq!(w.sim.rotation_count(w.id), 1);
    assert_eq!(
        w.sim.rotation_count(other),
        1,
        "the pass served the request"
    );
    let st = w.rekey.state_of(&other_name).await;
    assert_eq!(s(&st, "state"), "confirming", "{st}");
    let entry = w
        .vault
        .kv1_read("webhooks/fintoro/802")
        .await
        .expect("published");
    let live = w.sim.secret_of(other).expect("exists");
    assert_eq!(s(&entry, "current"), live);
    assert_eq!(s(&entry, "previous"), initial);
    assert!(
        w.rekey
            .history(&other_name)
            .await
            .iter()
            .any(|h| s(h, "detail").contains("(requested)")),
        "the trigger is recorded"
    );
    assert_eq!(
        s(&w.rekey.state_of(&w.name).await, "state"),
        "confirming",
        "the forced rotation finished its pass too"
    );
    w.assert_no_leak(&[&initial, &live]);
}

#[tokio::test]
async fn sigterm_during_a_once_pass_stops_at_a_saved_step_and_exits_0() {
    let w = World::new().await;
    slow_rotate(&w);
    let mut once = Daemon::start(&w.rekey, &["--once", "--force", &w.name]).await;
    once.log_line(&["rotate call sent"]).await;
    once.signal(Signal::TERM);
    let status = once.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", once.log());
    once.log_line(&["stopping at a saved step"]).await;
    once.record(&w.rekey);

    // The rotate call was let finish and its secret published before the pass left.
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "published", "{st}");
    assert_eq!(w.sim.rotation_count(w.id), 1);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    w.assert_no_leak(&[]);
}
