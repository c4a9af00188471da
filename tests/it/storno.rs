//! Storno webhooks rotated against a real Vault-API server (RustyVault) by the real
//! `rekey` binary. Confirmation is active: Storno's test endpoint sends a signed
//! delivery on demand, so a healthy rotation retires within one run.

use rekey::sandbox::storno::{AuthSeen, Route, StornoSim, StornoSimOptions};

use crate::support::rekey::{ProviderConf, assert_exit};
use crate::support::util::s;
use crate::support::world::ProviderWorld;

type World = ProviderWorld<StornoSim>;

async fn world() -> World {
    World::storno(StornoSimOptions::default(), None, |c| c).await
}

/// The same provider entry with another credential in its token file.
fn with_token(token: String) -> impl FnOnce(ProviderConf) -> ProviderConf {
    move |mut c| {
        c.files = vec![("storno.token".into(), token)];
        c
    }
}

#[tokio::test]
async fn rotating_a_storno_webhook_confirms_with_a_test_delivery_and_retires_in_one_run() {
    let w = world().await;
    assert_eq!(
        w.sim
            .deliver(&w.id, "invoice.created")
            .await
            .expect("d")
            .status,
        "success"
    );

    assert_exit(&w.rekey.force(&w.name).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "idle", "{st}");
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    assert_eq!(w.sim.request_count(Route::Test), 1, "one active probe");
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(entry.get("previous").is_none(), "retired: {entry}");
    assert_eq!(s(&entry, "provider"), "storno");
    let stats = w.stats();
    assert_eq!((stats.accepted_with_current, stats.rejected), (2, 0));

    let history = w.rekey.history(&w.name).await;
    let events: Vec<String> = history.iter().map(|h| s(h, "event")).collect();
    for want in ["rotate-succeeded", "published", "checked", "retired"] {
        assert!(events.contains(&want.to_string()), "{events:?}");
    }
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("test delivery accepted")),
        "{history:?}"
    );
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_storno_crash_between_mint_and_publish_recovers_with_the_providers_secret_in_vault() {
    let w = world().await;
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    assert_eq!(s(&w.entry().await, "current"), w.initial);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "minted");

    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert_eq!(s(&w.entry().await, "current"), w.live());
    assert_eq!(w.sim.rotation_count(&w.id), 1, "no extra rotation");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_storno_rotation_whose_test_deliveries_fail_is_held_with_both_secrets_published() {
    let w = World::storno(
        StornoSimOptions::default(),
        Some("every = \"30d\"\nconfirm_timeout = \"1s\"\nconfirm_poll = \"1s\"\non_timeout = \"hold\""),
        |c| c,
    )
    .await;
    assert!(w.sim.set_url(&w.id, "http://127.0.0.1:9/gone"));
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "confirming");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_exit(&w.rekey.once(&[]).await, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "held", "{st}");
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial, "both stay published");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_storno_api_key_is_sent_bare_and_a_jwt_as_bearer() {
    let w = world().await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let seen = w.sim.auth_seen();
    assert!(!seen.is_empty() && seen.iter().all(|a| *a == AuthSeen::ApiKey));

    let jwt = StornoSimOptions::default().jwt;
    let w = World::storno(StornoSimOptions::default(), None, with_token(jwt)).await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let seen = w.sim.auth_seen();
    assert!(!seen.is_empty() && seen.iter().all(|a| *a == AuthSeen::Jwt));
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn an_expired_storno_jwt_stops_the_rotation_before_anything_changes() {
    let expired = StornoSimOptions::default().expired_jwt;
    let w = World::storno(
        StornoSimOptions::default(),
        None,
        with_token(expired.clone()),
    )
    .await;
    assert_exit(&w.rekey.force(&w.name).await, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("Expired JWT Token"), "{st}");
    assert_eq!(w.sim.request_count(Route::Rotate), 0);
    assert_eq!(s(&w.entry().await, "current"), w.initial);
    w.assert_no_leak(&[&expired]);
}

#[tokio::test]
async fn deliveries_that_failed_in_the_exposure_window_are_redelivered_once_the_secret_is_published()
 {
    let w = world().await;
    // Rotated, and the process dies before publishing: the window stays open.
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    let before = w.stats().accepted_with_current;
    let lost = w
        .sim
        .deliver(&w.id, "invoice.validated")
        .await
        .expect("attempted");
    assert_eq!(lost.status, "failed", "the receiver cannot verify it yet");
    assert_eq!(w.stats().rejected, 1);

    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(w.sim.retries(), vec![lost.id.clone()], "redelivered once");
    let mut redelivered = None;
    for _ in 0..200 {
        redelivered = w.sim.delivery(&lost.id).filter(|d| d.status == "success");
        if redelivered.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let d = redelivered.expect("the redelivery succeeds with the new secret");
    assert_eq!(d.attempt, 2);
    assert!(w.stats().accepted_with_current > before);
    let history = w.rekey.history(&w.name).await;
    let row = history
        .iter()
        .find(|h| s(h, "event") == "redelivered")
        .unwrap_or_else(|| panic!("no redelivery in the history: {history:?}"));
    assert!(s(row, "detail").contains(&lost.id), "{row}");

    // Nothing left to redeliver: a later pass asks for no more retries.
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(w.sim.retries().len(), 1);
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_storno_webhook_rotated_outside_rekey_is_reported_as_drifted_and_not_clobbered() {
    let w = world().await;
    let outside = w.sim.rotate_outside(&w.id).expect("endpoint exists");
    let tail = outside[outside.len() - 8..].to_string();

    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "drifted", "{st}");
    let err = s(&st, "last_error");
    assert!(err.contains("rotated outside rekey"), "{err}");
    assert!(
        err.contains(&format!("--force {}", w.name)),
        "says how: {err}"
    );
    assert_eq!(w.sim.rotation_count(&w.id), 0, "rekey rotated nothing");
    assert_eq!(w.live(), outside);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.initial, "Vault untouched");
    assert!(entry.get("previous").is_none());
    assert_exit(&w.rekey.run(&["status"]).await, 1);
    let history = w.rekey.history(&w.name).await;
    assert!(history.iter().any(|h| s(h, "event") == "drift-detected"));
    // Later passes neither rotate nor forget the drift.
    assert_exit(&w.rekey.once(&[]).await, 1);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "drifted");

    // Recovery 1: the operator writes the live secret into Vault.
    w.vault
        .kv1_write(&w.path, serde_json::json!({ "current": outside }))
        .await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    let history = w.rekey.history(&w.name).await;
    assert!(history.iter().any(|h| s(h, "event") == "drift-resolved"));

    // Recovery 2: drifted again — seen by an ordinary pass, with no rotation due —
    // and the operator forces a rotation to a known secret.
    let outside2 = w.sim.rotate_outside(&w.id).expect("endpoint exists");
    assert_exit(&w.rekey.once(&[]).await, 1);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "drifted");
    assert_eq!(w.sim.request_count(Route::Rotate), 0);
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    assert_eq!(s(&w.entry().await, "current"), w.live());
    w.assert_no_leak(&[&outside, &outside2, &tail]);
}

#[tokio::test]
async fn a_storno_crash_while_the_rotate_response_is_in_flight_costs_exactly_one_extra_rotation() {
    let w = world().await;
    w.rekey
        .crash_at("after:rotate-call", &["--force", &w.name])
        .await;
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    let lost = w.live();
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(w.sim.rotation_count(&w.id), 2, "exactly one extra rotation");
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert_eq!(s(&w.entry().await, "current"), w.live());
    w.assert_no_leak(&[&lost]);
}
