//! A first start on an empty state directory: the commands that only show the state
//! create nothing, and any rekey command may run alongside the one creating it (an
//! operator typing `rekey status` right after `systemctl start rekey`).

use serde_json::Value;

use crate::support::rekey::{Rekey, Setup, Store, assert_exit, stderr};

fn rekey() -> Rekey {
    Rekey::new(
        &Setup::new(Store::Files, "http://127.0.0.1:9/api/public/v1", "tok")
            .subscription(801, "webhooks/fintoro/801"),
    )
}

#[tokio::test]
async fn status_and_history_on_a_fresh_state_dir_create_nothing() {
    let r = rekey();
    let out = r.run(&["status"]).await;
    assert_exit(&out, 0);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("acme/801") && table.contains("idle"),
        "{table}"
    );
    assert!(stderr(&out).contains("no state yet"), "{}", stderr(&out));
    let rows = r.status().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "idle");
    assert!(rows[0]["last_rotated_at"].is_null(), "never rotated");
    assert!(
        rows[0]["next_due_at"].is_string(),
        "the plan is still shown"
    );
    assert_exit(&r.run(&["history"]).await, 0);
    assert_eq!(r.history("acme/801").await, Vec::<Value>::new());
    assert!(
        !r.state_dir().exists(),
        "reading the state created {}",
        r.state_dir().display()
    );
}

#[tokio::test]
async fn showing_the_state_while_a_first_start_creates_it_breaks_neither() {
    for round in 0..10 {
        let r = rekey();
        let (run, status, history, json) = tokio::join!(
            r.once(&[]),
            r.run(&["status"]),
            r.run(&["history"]),
            r.run(&["status", "--json"]),
        );
        for (what, out) in [
            ("run --once", &run),
            ("status", &status),
            ("history", &history),
            ("status --json", &json),
        ] {
            assert_exit_in_round(round, what, out);
        }
    }
}

fn assert_exit_in_round(round: usize, what: &str, out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "round {round}: `rekey {what}` failed: {}",
        stderr(out)
    );
}
