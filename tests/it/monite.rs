//! Monite subscriptions rotated against a real Vault-API server (RustyVault) by the
//! real `rekey` binary, confirmed from Monite's delivery log.

use rekey::sandbox::monite::{MoniteSim, MoniteSimOptions, Route};

use crate::support::rekey::assert_exit;
use crate::support::util::s;
use crate::support::world::ProviderWorld;

type World = ProviderWorld<MoniteSim>;

async fn world() -> World {
    World::monite(MoniteSimOptions::default(), None).await
}

/// A successful delivery that counts as evidence for the newest publication, if any.
async fn deliver_ok(w: &World) {
    w.until_evidence_counts().await;
    let d = w.sim.deliver(&w.id, "updated").await.expect("delivered");
    assert!(d.was_successful, "{d:?}");
}

#[tokio::test]
async fn rotating_a_monite_subscription_publishes_both_secrets_then_retires_the_old_one_after_a_logged_delivery_succeeds()
 {
    let w = world().await;
    deliver_ok(&w).await;

    assert_exit(&w.rekey.force(&w.name).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "confirming", "{st}");
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(s(&entry, "provider"), "monite");
    assert_eq!(s(&entry, "subscription"), w.id);

    // The success logged before the rotation proves nothing: both stay published.
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.entry().await, "previous"), w.initial);

    deliver_ok(&w).await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "idle", "{st}");
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert!(entry.get("previous").is_none(), "retired: {entry}");
    assert_eq!(w.stats().rejected, 0, "no delivery was lost");
    let history = w.rekey.history(&w.name).await;
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("Monite delivery")),
        "the evidence is recorded: {history:?}"
    );
    // Every call carried the version header (the simulator refuses any without),
    // and one partner token served each process.
    assert_eq!(w.sim.tokens_issued(), 3, "one token per rekey run");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_monite_crash_between_mint_and_publish_recovers_with_the_providers_secret_in_vault() {
    let w = world().await;
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    assert_eq!(
        s(&w.entry().await, "current"),
        w.initial,
        "not yet published"
    );
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "minted");

    assert_exit(&w.rekey.once(&[]).await, 0);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial);
    assert_eq!(w.sim.rotation_count(&w.id), 1, "no extra rotation");
    deliver_ok(&w).await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    w.assert_no_leak(&[]);
}

#[tokio::test]
async fn a_monite_rotation_without_a_successful_delivery_is_held_with_both_secrets_published() {
    let w = World::monite(
        MoniteSimOptions::default(),
        Some("every = \"30d\"\nconfirm_timeout = \"1s\"\nconfirm_poll = \"1s\"\non_timeout = \"hold\""),
    )
    .await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    // Deliveries fail: the receiver is gone from this url.
    assert!(w.sim.set_url(&w.id, "http://127.0.0.1:9/gone"));
    let failed = w.sim.deliver(&w.id, "updated").await.expect("attempted");
    assert!(!failed.was_successful);
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
async fn a_monite_token_that_expires_mid_run_is_renewed_and_the_rotate_sent_once_more() {
    let w = world().await;
    // The token obtained for preflight dies just before the rotate call: Monite
    // answers 401, which proves nothing was rotated, so the call is safe to resend.
    w.sim.expire_tokens_at(Route::Rotate);
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(w.sim.tokens_issued(), 2, "renewed once");
    assert_eq!(w.sim.request_count(Route::Rotate), 2);
    assert_eq!(w.sim.rotation_count(&w.id), 1, "exactly one rotation");
    assert_eq!(s(&w.entry().await, "current"), w.live());

    // And again while confirming: the delivery-log read renews and succeeds.
    deliver_ok(&w).await;
    w.sim.expire_tokens_at(Route::Deliveries);
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert_eq!(w.sim.tokens_issued(), 4);
    w.assert_no_leak(&[]);
}

/// `id = "*"`: every subscription the (paginated) list shows is managed, new ones
/// are picked up on a later pass, and one that disappears is reported, not dropped.
#[tokio::test]
async fn a_star_entry_discovers_new_monite_subscriptions_and_reports_vanished_ones() {
    use crate::support::rekey::{LONGEST_DELIVERY, PROVIDER, Rekey, Setup, Store};
    use crate::support::rvault::RustyVault;
    use crate::support::world::{Sim, evidence_counts_for, receiver_for};

    let vault = RustyVault::start().await;
    let receiver = receiver_for(&vault).await;
    // One subscription per page: discovery must follow the cursor.
    let sim = MoniteSim::start(MoniteSimOptions {
        default_page_size: 1,
        ..Default::default()
    })
    .await
    .expect("sim");
    let add = |sim: &MoniteSim| {
        let (id, secret) = sim.add_subscription("http://127.0.0.1:9/unrouted");
        let path = format!("webhooks/{PROVIDER}/{id}");
        assert!(sim.set_url(&id, &receiver.register(&format!("monite/{id}"), &path)));
        (id, secret, path)
    };
    let (a, a_secret, a_path) = add(&sim);
    let (b, b_secret, b_path) = add(&sim);
    for (path, secret) in [(&a_path, &a_secret), (&b_path, &b_secret)] {
        vault
            .kv1_write(path, serde_json::json!({ "current": secret }))
            .await;
    }
    let rekey = Rekey::new(
        &Setup::with_provider(
            Store::Vault {
                addr: vault.addr(),
                token: vault.root_token().to_string(),
            },
            sim.provider_conf(),
        )
        .subscription("*", "webhooks/{provider}/{id}"),
    );
    let name = |id: &str| format!("{PROVIDER}/{id}");

    assert_exit(&rekey.once(&[]).await, 0);
    for id in [&a, &b] {
        let st = rekey.state_of(&name(id)).await;
        assert_eq!(s(&st, "state"), "idle", "{st}");
        assert_eq!(st["discovered"], true);
        assert_eq!(s(&st, "vault_path"), format!("webhooks/{PROVIDER}/{id}"));
        assert!(
            st["next_due_at"].is_string(),
            "scheduled, not rotated at once"
        );
        let h = rekey.history(&name(id)).await;
        assert!(h.iter().any(|r| s(r, "event") == "discovered"), "{h:?}");
    }
    assert_eq!(
        sim.rotation_count(&a) + sim.rotation_count(&b),
        0,
        "no mass rotation"
    );

    // A subscription created later is picked up by the next pass, and can be
    // rotated like any other, publishing at its templated path.
    let (c, c_secret, c_path) = add(&sim);
    vault
        .kv1_write(&c_path, serde_json::json!({ "current": c_secret }))
        .await;
    assert_exit(&rekey.force(&name(&c)).await, 0);
    assert_eq!(s(&rekey.state_of(&name(&c)).await, "state"), "confirming");
    evidence_counts_for(&rekey, &name(&c), &sim, LONGEST_DELIVERY).await;
    assert!(sim.deliver(&c, "updated").await.expect("d").was_successful);
    assert_exit(&rekey.once(&[]).await, 0);
    assert_eq!(s(&rekey.state_of(&name(&c)).await, "state"), "idle");
    let entry = vault.kv1_read(&c_path).await.expect("entry");
    assert_eq!(
        s(&entry, "current"),
        MoniteSim::secret_of(&sim, &c).expect("live")
    );

    // One disappears at Monite: reported once, kept in state, never rotated.
    assert!(sim.remove_subscription(&b));
    assert_exit(&rekey.once(&[]).await, 0);
    assert_exit(&rekey.once(&[]).await, 0);
    let st = rekey.state_of(&name(&b)).await;
    assert!(st["vanished_at"].is_string(), "{st}");
    assert!(s(&st, "last_error").starts_with("vanished:"), "{st}");
    let h = rekey.history(&name(&b)).await;
    assert_eq!(
        h.iter().filter(|r| s(r, "event") == "vanished").count(),
        1,
        "{h:?}"
    );
    let table = rekey.run(&["status"]).await;
    assert!(String::from_utf8_lossy(&table.stdout).contains(&format!("{} (vanished)", name(&b))));
    assert_eq!(
        s(&vault.kv1_read(&b_path).await.expect("kept"), "current"),
        b_secret
    );
    let mut secrets = vec![a_secret, b_secret, c_secret, vault.root_token().to_string()];
    secrets.extend(sim.credentials());
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    rekey.assert_no_leak(&refs);
}

#[tokio::test]
async fn a_monite_rotate_response_lost_on_the_wire_costs_exactly_one_extra_rotation() {
    use rekey::sandbox::monite::{Fault, FaultKind};
    let w = world().await;
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::CommitThenDrop,
    });
    // The same run rotates again (issue 8, defect 6).
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(st["lost_responses"], 1, "{st}");
    assert_eq!(w.sim.rotation_count(&w.id), 2);
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(
        s(&entry, "previous"),
        w.initial,
        "receivers keep the old secret; the lost one is never published"
    );
    w.assert_no_leak(&[]);
}
