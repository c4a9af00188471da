//! Fintoro subscriptions rotated against a real Vault-API server (RustyVault), by the
//! real `rekey` binary, including real crashes (SIGKILL at named failpoints).

use rekey::sandbox::fintoro::{Fault, FaultKind, Route};
use serde_json::Value;

use crate::support::rekey::{assert_exit, stderr};
use crate::support::util::s;
use crate::support::world::World;

fn events(history: &[Value]) -> Vec<String> {
    history.iter().map(|h| s(h, "event")).collect()
}

#[tokio::test]
async fn rotating_a_fintoro_subscription_publishes_both_secrets_then_retires_the_old_one_after_last_success_at_passes_the_rotation_time()
 {
    let w = World::new().await;
    let before = w.sim.deliver(w.id, "clients.created").await;
    assert!(before.success, "the receiver verifies today's secret");

    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "confirming", "{st}");
    assert_eq!(w.sim.rotation_count(w.id), 1);

    // Dual-published: receivers accept the new secret and still the old one.
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(s(&entry, "provider"), "fintoro");
    assert_eq!(s(&entry, "subscription"), "801");
    assert_eq!(s(&entry, "rotation_id"), s(&st, "rotation_id"));
    chrono::DateTime::parse_from_rfc3339(&s(&entry, "rotated_at")).expect("rotated_at is RFC 3339");

    // Without evidence, another pass keeps both published.
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.entry().await, "previous"), w.initial);

    // A delivery signed with the new secret succeeds: lastSuccessAt passes the
    // publication time, and the next pass retires the old secret.
    w.until_evidence_counts().await;
    let after = w.sim.deliver(w.id, "clients.updated").await;
    assert!(after.success);
    assert_eq!(w.stats().accepted_with_current, 2);
    assert_exit(&w.rekey.once(&[]).await, 0);

    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "idle", "{st}");
    assert!(st["last_rotated_at"].is_string());
    assert!(st["next_due_at"].is_string());
    assert!(st["last_error"].is_null());
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(
        entry.get("previous").is_none(),
        "old secret retired: {entry}"
    );
    assert_eq!(w.sim.rotation_count(w.id), 1);

    let history = w.rekey.history(&w.name).await;
    let ev = events(&history);
    for want in [
        "start",
        "preflight-passed",
        "rotate-sent",
        "rotate-succeeded",
        "published",
        "checked",
        "retired",
    ] {
        assert!(
            ev.contains(&want.to_string()),
            "history lacks {want}: {ev:?}"
        );
    }
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("lastSuccessAt")),
        "the evidence is recorded"
    );
    // What the confirmation rested on: the field, its stamp, the mark it passed
    // (the publication plus the clock offset bound) and that bound.
    let ev = history
        .iter()
        .find_map(|h| h.get("evidence"))
        .unwrap_or_else(|| panic!("no evidence object: {history:?}"));
    assert_eq!(s(ev, "source"), "lastSuccessAt");
    let t = |k: &str| chrono::DateTime::parse_from_rfc3339(&s(ev, k)).expect(k);
    let published = w.rekey.published_at(&w.name).await.expect("published");
    assert!(t("stamp") > t("counted_after"), "{ev}");
    assert!(
        t("counted_after") > published - chrono::TimeDelta::milliseconds(50),
        "{ev}"
    );
    assert!(
        ev["offset"]["low_ms"].is_i64() && ev["offset"]["high_ms"].is_i64(),
        "{ev}"
    );
    let text = w.rekey.run(&["history", &w.name]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("[lastSuccessAt {} > ", t("stamp").to_rfc3339()))
            && text.contains("provider clock offset ["),
        "the text shows the rule: {text}"
    );
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_crash_between_mint_and_publish_recovers_with_the_providers_secret_in_vault() {
    let w = World::new().await;
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;

    // The provider rotated; only rekey's state holds the new secret.
    assert_eq!(w.sim.rotation_count(w.id), 1);
    assert_ne!(w.live(), w.initial);
    assert_eq!(
        s(&w.entry().await, "current"),
        w.initial,
        "not yet published"
    );
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "minted");

    // The next run publishes the stored secret: nothing lost, no extra rotation.
    let out = w.rekey.once(&[]).await;
    assert_exit(&out, 0);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(w.sim.rotation_count(w.id), 1);
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.created").await.success);
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    let history = w.rekey.history(&w.name).await;
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("publishing the locally stored secret")),
        "{history:?}"
    );
    // Once published, no copy of the secret stays in the state directory.
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_crash_while_the_rotate_response_is_in_flight_costs_exactly_one_extra_rotation() {
    let w = World::new().await;
    // The provider committed and answered, but the process dies before storing it.
    w.rekey
        .crash_at("after:rotate-call", &["--force", &w.name])
        .await;
    assert_eq!(w.sim.rotation_count(w.id), 1);
    let lost = w.live();
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "rotating");

    let out = w.rekey.once(&[]).await;
    assert_exit(&out, 0);
    assert_eq!(w.sim.rotation_count(w.id), 2, "exactly one extra rotation");
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_ne!(w.live(), lost);
    assert_eq!(
        s(&entry, "previous"),
        w.initial,
        "receivers keep the old secret"
    );
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(st["lost_responses"], 1);
    let history = w.rekey.history(&w.name).await;
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("response was lost")),
        "the extra rotation is recorded: {history:?}"
    );
    w.assert_no_leak(&[&lost]);
}

#[tokio::test]
async fn a_rotate_response_cut_off_on_the_wire_is_handled_as_lost() {
    let w = World::new().await;
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::CommitThenDrop,
    });
    // The same one-shot run rotates again (issue 8, defect 6): the next run may be a
    // day away, and receivers cannot verify until the provider's secret is known.
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert!(
        ["confirming", "idle"].contains(&s(&st, "state").as_str()),
        "{st}"
    );
    assert_eq!(st["lost_responses"], 1);
    assert_eq!(w.sim.rotation_count(w.id), 2);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(
        s(&entry, "previous"),
        w.initial,
        "the lost secret never published"
    );
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn no_successful_delivery_before_the_deadline_holds_with_both_secrets_published() {
    let w = World::with_policy(Some(
        "every = \"30d\"\nconfirm_timeout = \"1s\"\nconfirm_poll = \"1s\"\non_timeout = \"hold\"",
    ))
    .await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "confirming");
    let deadline = chrono::DateTime::parse_from_rfc3339(&s(&st, "confirm_deadline")).unwrap();
    let wait = (deadline.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    let out = w.rekey.once(&[]).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "held", "{st}");
    assert!(s(&st, "last_error").contains("deadline"));
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial, "both stay published");

    // Held stays held: no later run retires without evidence.
    assert_exit(&w.rekey.once(&[]).await, 1);
    assert_eq!(s(&w.entry().await, "previous"), w.initial);
    let status = w.rekey.run(&["status"]).await;
    assert_exit(&status, 1);
    assert!(String::from_utf8_lossy(&status.stdout).contains("held"));
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_refused_rotation_changes_nothing_and_says_why() {
    let w = World::new().await;
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::Status(403),
    });
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("403"), "{st}");
    assert!(
        s(&st, "last_error").contains("This action is unauthorized."),
        "{st}"
    );
    assert_eq!(w.sim.rotation_count(w.id), 0);
    assert_eq!(s(&w.entry().await, "current"), w.initial);
    assert!(w.entry().await.get("previous").is_none());
    assert!(w.sim.deliver(w.id, "clients.created").await.success);
}

#[tokio::test]
async fn a_sealed_vault_stops_the_rotation_before_the_provider_is_called() {
    let w = World::new().await;
    w.vault.seal().await;
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("sealed"), "{st}");
    assert_eq!(
        w.sim.request_count(Route::Rotate),
        0,
        "provider never called"
    );
    assert_eq!(w.sim.rotation_count(w.id), 0);

    w.vault.unseal().await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(s(&w.entry().await, "current"), w.live());
}

#[tokio::test]
async fn vault_failing_after_mint_keeps_the_secret_locally_and_publishes_when_vault_returns() {
    let w = World::new().await;
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    w.vault.seal().await;
    let out = w.rekey.once(&[]).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "minted", "the secret stays in local state");
    assert!(s(&st, "last_error").contains("sealed"), "{st}");

    w.vault.unseal().await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(w.sim.rotation_count(w.id), 1);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_second_rekey_on_the_same_state_directory_is_refused() {
    let w = World::new().await;
    let mut first = w.rekey.command(&["run", "--once", "--force", &w.name]);
    first.env("REKEY_FAILPOINT", "after:rotate-succeeded");
    let mut child = first.spawn().unwrap();
    let stderr_pipe = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr_pipe));
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains(rekey::failpoint::REACHED) {
            break;
        }
    }
    let second = w.rekey.once(&[]).await;
    assert_exit(&second, 75);
    let pid = child.id().unwrap();
    assert!(
        stderr(&second).contains(&format!("pid {pid}")),
        "{}",
        stderr(&second)
    );
    child.kill().await.unwrap();
    // The kernel released the lock with the process: the next run proceeds.
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(w.sim.rotation_count(w.id), 1);
}
