//! Issue 9 against the real binary: only a delivery signed with the new secret
//! confirms a rotation — not a slow one signed with the old secret that completes
//! after the publication, not one a provider clock 5 s off stamps after it — and
//! receivers that reject the new secret hold the rotation within `fail_after`.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::sandbox::monite::{MoniteSim, MoniteSimOptions};
use rekey::sandbox::storno::{StornoSim, StornoSimOptions};
use rekey::secret::Fingerprint;
use rustix::process::Signal;
use serde_json::{Value, json};

use crate::support::daemon::{Daemon, until_state};
use crate::support::rekey::{ProviderConf, assert_exit};
use crate::support::util::{Scenario, run_table, s};
use crate::support::world::{FINTORO_TOKEN, ProviderWorld, Sim};

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("{v}: {e}"))
        .with_timezone(&Utc)
}

async fn fintoro(skew: TimeDelta) -> FintoroSim {
    FintoroSim::start(FintoroSimOptions {
        token: FINTORO_TOKEN.into(),
        clock_skew: skew,
        ..Default::default()
    })
    .await
    .expect("start the Fintoro simulator")
}

async fn monite(skew: TimeDelta) -> MoniteSim {
    MoniteSim::start(MoniteSimOptions {
        clock_skew: skew,
        ..Default::default()
    })
    .await
    .expect("start the Monite simulator")
}

async fn storno(skew: TimeDelta) -> StornoSim {
    StornoSim::start(StornoSimOptions {
        clock_skew: skew,
        ..Default::default()
    })
    .await
    .expect("start the Storno simulator")
}

/// A lower bound on when the newest rotation was published: the history's time is
/// read just after the step that set the publication time.
async fn published<S: Sim>(w: &ProviderWorld<S>) -> DateTime<Utc> {
    let at = w.rekey.published_at(&w.name).await.expect("published");
    at - TimeDelta::milliseconds(50)
}

/// The history row that retired on evidence, and its `evidence` object.
async fn evidence_row<S: Sim>(w: &ProviderWorld<S>) -> (Value, Value) {
    let history = w.rekey.history(&w.name).await;
    let row = history
        .iter()
        .find(|h| h["evidence"].is_object())
        .unwrap_or_else(|| panic!("no evidence in the history: {history:?}"))
        .clone();
    (row["evidence"].clone(), row)
}

#[tokio::test]
async fn a_slow_delivery_signed_with_the_old_secret_and_completed_after_publication_never_confirms()
{
    // The provider's default longest_delivery (10 s): the allowance under test.
    let sim = fintoro(TimeDelta::zero()).await;
    let w = ProviderWorld::build(sim, None, ProviderConf::default_longest_delivery).await;
    // Signed with today's secret; its receiver answers only later.
    let slow = w
        .sim
        .start_delivery(w.id, "clients.updated")
        .expect("active");
    assert_eq!(slow.secret_fingerprint(), &Fingerprint::of_str(&w.initial));
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let published = published(&w).await;

    // It completes when a delivery would count but for the allowance: past the
    // publication and the clock bound, in a later second. The receiver accepts the
    // old secret (still published as `previous`), so Fintoro records a success.
    w.until_evidence_counts().await;
    let out = slow.complete().await;
    assert!(out.success, "{out:?}");
    assert_eq!(w.stats().accepted_with_previous, 1);
    let last_success = time(&w.sim.subscription_json(w.id).expect("sub")["lastSuccessAt"]);
    assert!(
        last_success > published,
        "lastSuccessAt passed the publication"
    );
    assert_exit(&w.rekey.once(&[]).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(
        s(&st, "state"),
        "confirming",
        "the old signature confirmed: {st}"
    );
    assert_eq!(s(&w.entry().await, "previous"), w.initial);

    // Signed with the new secret, and past the allowance: this one confirms.
    w.until_evidence_counts_with(Duration::from_secs(10)).await;
    assert!(w.sim.deliver(w.id, "clients.updated").await.success);
    assert_eq!(w.stats().accepted_with_current, 1);
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "idle");
    assert!(w.entry().await.get("previous").is_none());
    let (ev, _) = evidence_row(&w).await;
    assert_eq!(s(&ev, "source"), "lastSuccessAt");
    assert!(
        time(&ev["counted_after"]) >= published + TimeDelta::seconds(10),
        "{ev}"
    );
    assert!(time(&ev["stamp"]) > time(&ev["counted_after"]), "{ev}");
    w.assert_no_leak(&[]);
}

/// A provider whose clock is `skew` off: a delivery from before the rotation (signed
/// with the old secret, stamped `skew` away) never confirms it, and a delivery
/// signed with the new secret later does, on the evidence the rule allowed for.
async fn clock_off<S: Sim>(w: ProviderWorld<S>) -> Vec<String> {
    let skew = w.sim.clock_skew();
    assert!(w.sim.deliver_event(&w.id).await, "today's delivery");
    // Storno would confirm at once with its test delivery: refuse it, so that only
    // its delivery log can confirm.
    w.sim.refuse_probe();
    // (Storno's run exits 1: the refused probe failed its check.)
    w.rekey.force(&w.name).await;
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "confirming", "confirmed early: {st}");
    assert_eq!(s(&w.entry().await, "previous"), w.initial);
    let published = published(&w).await;

    w.until_evidence_counts().await;
    assert!(
        w.sim.deliver_event(&w.id).await,
        "a delivery with the new secret"
    );
    assert_exit(&w.rekey.once(&[]).await, 0);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(
        s(&st, "state"),
        "idle",
        "the real delivery was missed: {st}"
    );
    assert!(w.entry().await.get("previous").is_none());
    assert_eq!(w.stats().accepted_with_current, 2);

    // The measured offset covers the skew, and the rule's mark allowed for it.
    let (ev, row) = evidence_row(&w).await;
    assert_ne!(
        s(&ev, "source"),
        "test delivery",
        "the log's delivery confirmed"
    );
    let (low, high) = (&ev["offset"]["low_ms"], &ev["offset"]["high_ms"]);
    let skew_ms = skew.num_milliseconds();
    assert!(
        low.as_i64() <= Some(skew_ms) && high.as_i64() >= Some(skew_ms),
        "{ev}"
    );
    let counted_after = time(&ev["counted_after"]);
    assert!(
        counted_after >= published + skew.max(TimeDelta::zero()),
        "{ev}"
    );
    if !ev["stamp"].is_null() {
        assert!(time(&ev["stamp"]) > counted_after, "{ev}");
    }
    // `rekey history` shows the rule the confirmation rested on.
    let text = w.rekey.run(&["history", &w.name]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    for part in [
        s(&ev, "source"),
        counted_after.to_rfc3339(),
        "provider clock offset".into(),
    ] {
        assert!(text.contains(&part), "history lacks {part}: {text}");
    }
    assert!(text.contains(&s(&row, "detail")), "{text}");
    w.assert_no_leak(&[]);
    vec![]
}

#[tokio::test]
async fn a_provider_clock_5s_off_either_way_never_confirms_early_and_still_confirms_a_real_delivery()
 {
    let mut cases: Vec<(String, Scenario)> = vec![];
    for secs in [5, -5] {
        let skew = TimeDelta::seconds(secs);
        cases.push((
            format!("fintoro {secs:+} s"),
            Box::pin(async move {
                clock_off(ProviderWorld::build(fintoro(skew).await, None, |c| c).await).await
            }),
        ));
        cases.push((
            format!("monite {secs:+} s"),
            Box::pin(async move {
                clock_off(ProviderWorld::build(monite(skew).await, None, |c| c).await).await
            }),
        ));
        cases.push((
            format!("storno {secs:+} s"),
            Box::pin(async move {
                clock_off(ProviderWorld::build(storno(skew).await, None, |c| c).await).await
            }),
        ));
    }
    run_table("provider clock off", cases).await;
}

#[tokio::test]
async fn storno_deliveries_failed_in_the_exposure_window_are_redelivered_with_its_clock_5s_off() {
    let mut cases: Vec<(String, Scenario)> = vec![];
    for secs in [5, -5] {
        cases.push((
            format!("storno {secs:+} s"),
            Box::pin(async move {
                let sim = storno(TimeDelta::seconds(secs)).await;
                let w = ProviderWorld::build(sim, None, |c| c).await;
                // Rotated, not yet published: a delivery now fails at the receiver.
                w.rekey
                    .crash_at("after:rotate-succeeded", &["--force", &w.name])
                    .await;
                let lost = w
                    .sim
                    .deliver(&w.id, "invoice.validated")
                    .await
                    .expect("attempted");
                assert_eq!(lost.status, "failed");
                assert_exit(&w.rekey.once(&[]).await, 0);
                assert_eq!(
                    w.sim.retries(),
                    vec![lost.id.clone()],
                    "a failure stamped {secs:+} s away is still in the window"
                );
                w.assert_no_leak(&[]);
                vec![]
            }),
        ));
    }
    run_table("storno redelivery, clock off", cases).await;
}

const FAIL_AFTER: Duration = Duration::from_secs(2);
const CONFIRM_POLL: Duration = Duration::from_secs(1);

/// Receivers that never picked up the new secret: every delivery signed with it
/// fails. The daemon must hold the rotation within `fail_after` of the first
/// failure it saw, say why and where the secret is, and keep both published.
async fn rejected<S: Sim>(w: ProviderWorld<S>) -> Vec<String> {
    // The receiver reads a copy that only ever holds today's secret.
    let stale = format!("{}-stale", w.path);
    w.vault
        .kv1_write(&stale, json!({ "current": w.initial }))
        .await;
    w.receiver.register(&w.route, &stale);
    w.rekey.force(&w.name).await;
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "confirming");
    w.until_evidence_counts().await;
    assert!(!w.sim.deliver_event(&w.id).await, "the receiver rejects it");

    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    let st = until_state(&w.rekey, &w.name, "held").await;
    d.signal(Signal::TERM);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
    d.record(&w.rekey);

    let err = s(&st, "last_error");
    assert!(
        err.contains("receivers are rejecting the new secret"),
        "{err}"
    );
    assert!(
        err.contains(&format!("`{}`", w.path)),
        "names the path: {err}"
    );
    let history = w.rekey.history(&w.name).await;
    let at = |pred: &dyn Fn(&Value) -> bool| {
        history
            .iter()
            .find(|h| pred(h))
            .map(|h| time(&h["at"]))
            .unwrap_or_else(|| panic!("{history:?}"))
    };
    let first = at(&|h| s(h, "detail").contains("signed with the new secret failed"));
    let held = at(&|h| s(h, "to") == "held");
    let took = (held - first).to_std().unwrap_or_default();
    assert!(
        took >= FAIL_AFTER && took <= FAIL_AFTER + CONFIRM_POLL + Duration::from_millis(1500),
        "held {took:?} after the first failure"
    );
    let status = w.rekey.run(&["status"]).await;
    assert_exit(&status, 1);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("held") && table.contains("receivers are rejecting"),
        "{table}"
    );
    let entry = w.entry().await;
    assert_eq!(s(&entry, "current"), w.live());
    assert_eq!(s(&entry, "previous"), w.initial, "both stay published");
    assert_eq!(w.stats().accepted_with_current, 0);
    w.assert_no_leak(&[]);
    vec![]
}

#[tokio::test]
async fn receivers_rejecting_the_new_secret_hold_the_rotation_within_fail_after() {
    let policy = format!(
        "every = \"30d\"\nconfirm_timeout = \"1h\"\nconfirm_poll = \"{}s\"\n\
         on_timeout = \"hold\"\nfail_after = \"{}s\"",
        CONFIRM_POLL.as_secs(),
        FAIL_AFTER.as_secs()
    );
    let p = policy.clone();
    let cases: Vec<(String, Scenario)> = vec![
        (
            "fintoro lastFailureAt".into(),
            Box::pin(async move {
                let sim = fintoro(TimeDelta::zero()).await;
                rejected(ProviderWorld::build(sim, Some(&p), |c| c).await).await
            }),
        ),
        ("monite failed deliveries".into(), {
            let p = policy.clone();
            Box::pin(async move {
                let sim = monite(TimeDelta::zero()).await;
                rejected(ProviderWorld::build(sim, Some(&p), |c| c).await).await
            })
        }),
        ("storno failed test and logged deliveries".into(), {
            let p = policy.clone();
            Box::pin(async move {
                let sim = storno(TimeDelta::zero()).await;
                rejected(ProviderWorld::build(sim, Some(&p), |c| c).await).await
            })
        }),
    ];
    run_table("receivers rejecting", cases).await;
}
