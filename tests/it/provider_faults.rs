//! Provider faults on every call rekey makes to Monite and Storno, as `faults.rs`
//! does for Fintoro: each case checks the outcome class (retried inside the run,
//! refused, or a rotate whose outcome is unknown and is handled as "lost"), that
//! Vault never holds a secret rekey was not given, the number of rotations at the
//! provider, the final state after recovery, and that nothing leaked. Confirmation
//! faults must never retire the old secret without evidence, and a failed
//! redelivery (Storno) must not block confirmation.
//!
//! Each table runs its cases in independent worlds, a few at a time.

use std::time::{Duration, Instant};

use rekey::sandbox::faults::FaultKind;
use rekey::sandbox::monite::{self, MoniteSim, MoniteSimOptions};
use rekey::sandbox::storno::{self, StornoSim, StornoSimOptions};
use serde_json::Value;

use crate::support::util::{Scenario, run_table, s};
use crate::support::world::{ProviderWorld, Sim};

type MoniteWorld = ProviderWorld<MoniteSim>;
type StornoWorld = ProviderWorld<StornoSim>;

/// The provider client's backoff before a second attempt (500 ms; jitter only
/// adds to it), and before the second, third and fourth (0.5 + 1 + 2 s).
const ONE_RETRY: Duration = Duration::from_millis(500);
const THREE_RETRIES: Duration = Duration::from_millis(3500);

async fn monite_world() -> MoniteWorld {
    ProviderWorld::monite(MoniteSimOptions::default(), None).await
}

/// `unwrapped`: rotate answers with the public reference's bare object instead of
/// the backend's `{data, secret}`.
async fn storno_world(unwrapped: bool) -> StornoWorld {
    ProviderWorld::storno(
        StornoSimOptions {
            unwrapped,
            ..Default::default()
        },
        None,
        |c| c,
    )
    .await
}

/// Vault must hold only secrets rekey was given: never one whose rotate response
/// was lost (`unknown`), and nothing but the secret from before as `previous`.
async fn check_vault<S: Sim>(
    w: &ProviderWorld<S>,
    unknown: &[String],
    when: &str,
    problems: &mut Vec<String>,
) {
    let Some(entry) = w.vault.kv1_read(&w.path).await else {
        problems.push(format!("{when}: the Vault entry is gone"));
        return;
    };
    let current = s(&entry, "current");
    if unknown.contains(&current) {
        problems.push(format!(
            "{when}: Vault's current is a secret rekey never got"
        ));
    }
    if let Some(p) = entry.get("previous").and_then(Value::as_str)
        && p != w.initial
    {
        problems.push(format!(
            "{when}: Vault's previous is not the secret from before"
        ));
    }
}

/// Finishes the rotation in flight (a delivery, then a run, until idle) and checks
/// the end: idle, Vault's `current` is the provider's live secret, `previous`
/// retired.
async fn finish<S: Sim>(w: &ProviderWorld<S>, unknown: &[String], problems: &mut Vec<String>) {
    for _ in 0..4 {
        if s(&w.rekey.state_of(&w.name).await, "state") == "idle" {
            break;
        }
        w.until_evidence_counts().await;
        w.sim.deliver_event(&w.id).await;
        w.rekey.once(&[]).await;
        check_vault(w, unknown, "recovering", problems).await;
    }
    let st = w.rekey.state_of(&w.name).await;
    if s(&st, "state") != "idle" {
        problems.push(format!("did not recover: {st}"));
    }
    let entry = w.entry().await;
    if s(&entry, "current") != w.live() {
        problems.push("after recovery, Vault's current is not the live secret".into());
    }
    if entry.get("previous").is_some() {
        problems.push("after recovery, previous is still published".into());
    }
}

fn leak_check<S: Sim>(w: &ProviderWorld<S>, extra: &[String]) {
    let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    w.assert_no_leak(&refs);
}

// ---------------------------------------------------------------------------------
// The rotate call (Monite `regenerate_secret`, Storno `regenerate-secret`).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Retried inside the run (429, a renewed token): the rotation went through.
    Retried,
    /// A definite refusal: nothing rotated, the rotation failed and is retried later.
    Refused,
    /// The outcome is unknown: handled as a lost response and rotated again within
    /// the same run.
    Lost,
}

#[derive(Clone)]
struct RotateCase {
    what: &'static str,
    /// Queued on the rotate route, first first.
    faults: Vec<FaultKind>,
    class: Class,
    /// Rotations the faulty calls committed although rekey never got their secret.
    committed: u32,
    /// Rotate requests the provider saw in the faulty run.
    sent: u64,
    /// The faulty run took at least this long (a `Retry-After` waited out).
    waited: Duration,
}

fn rc(what: &'static str, kind: FaultKind, class: Class, committed: u32) -> RotateCase {
    RotateCase {
        what,
        faults: vec![kind],
        class,
        committed,
        sent: if class == Class::Refused { 1 } else { 2 },
        waited: Duration::ZERO,
    }
}

/// The classes every provider's rotate call is tried with.
fn rotate_cases() -> Vec<RotateCase> {
    use Class::*;
    vec![
        rc("500", FaultKind::Status(500), Lost, 0),
        rc("502", FaultKind::Status(502), Lost, 0),
        rc("503", FaultKind::Status(503), Lost, 0),
        RotateCase {
            waited: Duration::from_secs(2),
            ..rc(
                "429 with Retry-After: 2",
                FaultKind::TooManyRequests {
                    retry_after: Some(2),
                },
                Retried,
                0,
            )
        },
        rc(
            "429 without Retry-After",
            FaultKind::TooManyRequests { retry_after: None },
            Retried,
            0,
        ),
        rc(
            "committed, answer after the client timeout",
            FaultKind::Delay(Duration::from_secs(4)),
            Lost,
            1,
        ),
        rc(
            "committed, connection reset mid-body",
            FaultKind::CommitThenDrop,
            Lost,
            1,
        ),
        rc(
            "committed, connection closed before answering",
            FaultKind::CommitThenClose,
            Lost,
            1,
        ),
        rc(
            "committed, truncated JSON",
            FaultKind::CommitThenTruncate,
            Lost,
            1,
        ),
        rc("non-JSON 200", FaultKind::Garbage, Lost, 0),
        rc("200 without the secret", FaultKind::MissingSecret, Lost, 0),
        rc("403", FaultKind::Status(403), Refused, 0),
        rc("404", FaultKind::Status(404), Refused, 0),
    ]
}

async fn rotate_fault<S: Sim>(w: ProviderWorld<S>, case: RotateCase) -> Vec<String> {
    let mut problems = vec![];
    for kind in &case.faults {
        w.sim.inject_fault(S::ROTATE, kind.clone());
    }
    let t0 = Instant::now();
    let out = w.rekey.force(&w.name).await;
    let took = t0.elapsed();
    let st = w.rekey.state_of(&w.name).await;
    let (code, states): (i32, &[&str]) = match case.class {
        Class::Retried => (0, &["confirming", "idle"]),
        Class::Refused => (1, &["failed"]),
        Class::Lost => (0, &["confirming", "idle"]),
    };
    if out.status.code() != Some(code) {
        problems.push(format!("exit {:?}, expected {code}", out.status.code()));
    }
    if !states.contains(&s(&st, "state").as_str()) {
        problems.push(format!("state {}, expected {states:?}", s(&st, "state")));
    }
    if st["lost_responses"] != u64::from(case.class == Class::Lost) {
        problems.push(format!("lost_responses {}", st["lost_responses"]));
    }
    let sent = w.sim.requests(S::ROTATE);
    if sent != case.sent {
        problems.push(format!("{sent} rotate requests, expected {}", case.sent));
    }
    if took < case.waited {
        problems.push(format!(
            "took {took:?}, expected at least {:?}",
            case.waited
        ));
    }
    // A committed rotation whose response was lost left the provider with a secret
    // nobody has; the same run rotated over it, so it is gone. It must never have
    // reached Vault: `previous` is the old secret, `current` the live one.
    let unknown: Vec<String> = vec![];
    let entry = w.entry().await;
    if case.class != Class::Refused {
        // Published (Storno may have confirmed and retired already).
        if s(&entry, "current") != w.live() {
            problems.push("the retried rotation's secret is not Vault's current".into());
        }
        if entry.get("previous").is_some() && s(&entry, "previous") != w.initial {
            problems.push("Vault's previous is not the secret before the rotation".into());
        }
    } else if s(&entry, "current") != w.initial || entry.get("previous").is_some() {
        problems.push("Vault changed before a secret was known".into());
    }
    check_vault(&w, &unknown, "after the fault", &mut problems).await;
    // Recovery: the next run retries a refused rotation; a retried or re-rotated one
    // only confirms.
    w.rekey.once(&[]).await;
    check_vault(&w, &unknown, "after the recovery run", &mut problems).await;
    finish(&w, &unknown, &mut problems).await;
    let rotations = w.sim.rotations(&w.id);
    let want = 1 + case.committed;
    if rotations != want {
        problems.push(format!(
            "{rotations} rotations at the provider, expected {want}"
        ));
    }
    if case.class == Class::Lost {
        let history = w.rekey.history(&w.name).await;
        if !history
            .iter()
            .any(|h| s(h, "event") == "rotate-outcome-unknown")
        {
            problems.push("the lost response is not in the history".into());
        }
    }
    leak_check(&w, &unknown);
    problems
}

#[tokio::test]
async fn every_monite_regenerate_secret_fault_ends_with_the_live_secret_in_vault() {
    let mut cases = rotate_cases();
    // Monite's own: a 401 means the partner token was revoked early; rekey renews it
    // and sends the rotate once more (a 401 is an answer: nothing was rotated). A
    // second 401 is a refusal.
    cases.push(rc(
        "401 once (token renewed, rotate resent)",
        FaultKind::Status(401),
        Class::Retried,
        0,
    ));
    cases.push(RotateCase {
        faults: vec![FaultKind::Status(401), FaultKind::Status(401)],
        sent: 2,
        ..rc(
            "401 twice (renewed once, then refused)",
            FaultKind::Status(401),
            Class::Refused,
            0,
        )
    });
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let scenario: Scenario =
                Box::pin(async move { rotate_fault(monite_world().await, case).await });
            (name, scenario)
        })
        .collect();
    run_table("monite regenerate_secret", table).await;
}

#[tokio::test]
async fn every_storno_regenerate_secret_fault_ends_with_the_live_secret_in_vault() {
    let mut cases: Vec<(bool, RotateCase)> = rotate_cases()
        .into_iter()
        .chain([rc("401", FaultKind::Status(401), Class::Refused, 0)])
        .map(|c| (false, c))
        .collect();
    // The public reference's bare shape: the cases whose answer is read, or cut
    // around the secret field, which sits elsewhere in that shape.
    for c in rotate_cases() {
        if matches!(
            c.faults[0],
            FaultKind::TooManyRequests { retry_after: None }
                | FaultKind::CommitThenDrop
                | FaultKind::CommitThenClose
                | FaultKind::CommitThenTruncate
        ) {
            cases.push((true, c));
        }
    }
    let table = cases
        .into_iter()
        .map(|(bare, case)| {
            let name = format!("{} ({})", case.what, if bare { "bare" } else { "wrapped" });
            let scenario: Scenario =
                Box::pin(async move { rotate_fault(storno_world(bare).await, case).await });
            (name, scenario)
        })
        .collect();
    run_table("storno regenerate-secret", table).await;
}

// ---------------------------------------------------------------------------------
// Before the rotate call: Monite's token and subscription read, Storno's endpoint
// read (preflight). A failure there stops the rotation before anything changes.

/// Something a start case does to the world before the forced run (and undoes).
#[derive(Clone, Copy)]
enum Prep {
    None,
    /// Monite: a wrong client secret in `monite.secret` (put right for recovery).
    WrongClientSecret,
    /// Monite: the partner token dies just before the rotate call, so rekey must
    /// renew it there.
    ExpireTokenAtRotate,
}

struct StartCase<R> {
    what: &'static str,
    faults: Vec<(R, FaultKind)>,
    prep: Prep,
    /// Retried inside the run (rotation went through) or stopped (failed).
    class: Class,
    /// Requests a route must have seen in the faulty run: retries are bounded.
    requests: Option<(R, u64)>,
    /// Words the failed run's `last_error` must contain.
    error_has: &'static str,
    /// The faulty run took at least this long: retries were backed off.
    waited: Duration,
}

async fn start_fault<S: Sim>(w: ProviderWorld<S>, case: StartCase<S::Route>) -> Vec<String> {
    let mut problems = vec![];
    match case.prep {
        Prep::None | Prep::ExpireTokenAtRotate => {}
        Prep::WrongClientSecret => {
            std::fs::write(w.rekey.path().join("monite.secret"), "wrong-client-secret")
                .expect("secret file");
        }
    }
    for (route, kind) in &case.faults {
        w.sim.inject_fault(*route, kind.clone());
    }
    let t0 = Instant::now();
    let out = w.rekey.force(&w.name).await;
    if t0.elapsed() < case.waited {
        problems.push(format!(
            "took {:?}, expected at least {:?}",
            t0.elapsed(),
            case.waited
        ));
    }
    let st = w.rekey.state_of(&w.name).await;
    match case.class {
        Class::Retried => {
            if out.status.code() != Some(0) {
                problems.push(format!("exit {:?}, expected 0", out.status.code()));
            }
            if w.sim.rotations(&w.id) != 1 {
                problems.push("the retried run did not rotate once".into());
            }
        }
        _ => {
            if out.status.code() != Some(1) {
                problems.push(format!("exit {:?}, expected 1", out.status.code()));
            }
            if s(&st, "state") != "failed" {
                problems.push(format!("state {}, expected failed", s(&st, "state")));
            }
            if !s(&st, "last_error").contains(case.error_has) {
                problems.push(format!(
                    "last_error lacks `{}`: {}",
                    case.error_has,
                    s(&st, "last_error")
                ));
            }
            if w.sim.rotations(&w.id) != 0 {
                problems.push("rotated although the run stopped".into());
            }
            let entry = w.entry().await;
            if s(&entry, "current") != w.initial || entry.get("previous").is_some() {
                problems.push("Vault changed although nothing rotated".into());
            }
        }
    }
    if let Some((route, want)) = case.requests {
        let got = w.sim.requests(route);
        if got != want {
            problems.push(format!("{got} requests on {route:?}, expected {want}"));
        }
    }
    if let Prep::ExpireTokenAtRotate = case.prep {
        // The rotate was answered 401 (expired token); its resend needed a token
        // that never came, so it was never sent again.
        if w.sim.requests(S::ROTATE) != 1 {
            problems.push(format!(
                "{} rotate requests, expected 1",
                w.sim.requests(S::ROTATE)
            ));
        }
    }
    if let Prep::WrongClientSecret = case.prep {
        let right = w.sim.credentials()[0].clone();
        std::fs::write(w.rekey.path().join("monite.secret"), right).expect("secret file");
    }
    // Recovery: the next run retries the rotation; it goes through.
    w.rekey.once(&[]).await;
    finish(&w, &[], &mut problems).await;
    if w.sim.rotations(&w.id) != 1 {
        problems.push(format!(
            "{} rotations at the provider, expected 1",
            w.sim.rotations(&w.id)
        ));
    }
    leak_check(&w, &["wrong-client-secret".to_string()]);
    problems
}

#[tokio::test]
async fn monite_token_and_subscription_faults_before_the_rotate_change_nothing() {
    use monite::Route::{Get, Token};
    let sc =
        |what, faults: Vec<(monite::Route, FaultKind)>, class, requests, error_has| StartCase {
            what,
            faults,
            prep: Prep::None,
            class,
            requests,
            error_has,
            waited: Duration::ZERO,
        };
    let cases = vec![
        StartCase {
            waited: ONE_RETRY,
            ..sc(
                "/auth/token 500 once (retried)",
                vec![(Token, FaultKind::Status(500))],
                Class::Retried,
                Some((Token, 2)),
                "",
            )
        },
        StartCase {
            waited: THREE_RETRIES,
            ..sc(
                "/auth/token 500 every time (4 attempts, then stop)",
                vec![(Token, FaultKind::Status(500)); 4],
                Class::Refused,
                Some((Token, 4)),
                "500",
            )
        },
        sc(
            "/auth/token 200 with an HTML page",
            vec![(Token, FaultKind::Garbage)],
            Class::Refused,
            Some((Token, 1)),
            "not a token response",
        ),
        StartCase {
            prep: Prep::WrongClientSecret,
            ..sc(
                "/auth/token 401 (bad client secret; not retried)",
                vec![],
                Class::Refused,
                Some((Token, 1)),
                "Wrong client_id or client_secret",
            )
        },
        StartCase {
            prep: Prep::ExpireTokenAtRotate,
            waited: THREE_RETRIES,
            ..sc(
                "token expired at the rotate, renewal answers 500 every time",
                // The first token request (preflight) is answered normally.
                std::iter::once((Token, FaultKind::Delay(Duration::ZERO)))
                    .chain(std::iter::repeat_n((Token, FaultKind::Status(500)), 4))
                    .collect(),
                Class::Refused,
                Some((Token, 5)),
                "old secret unchanged",
            )
        },
        sc(
            "subscription GET 404",
            vec![(Get, FaultKind::Status(404))],
            Class::Refused,
            Some((Get, 1)),
            "404",
        ),
        StartCase {
            waited: THREE_RETRIES,
            ..sc(
                "subscription GET 503 every time",
                vec![(Get, FaultKind::Status(503)); 4],
                Class::Refused,
                Some((Get, 4)),
                "503",
            )
        },
        sc(
            "subscription GET non-JSON 200",
            vec![(Get, FaultKind::Garbage)],
            Class::Refused,
            Some((Get, 1)),
            "unexpected response",
        ),
    ];
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let expire = matches!(case.prep, Prep::ExpireTokenAtRotate);
            let scenario: Scenario = Box::pin(async move {
                let w = monite_world().await;
                if expire {
                    w.sim.expire_tokens_at(monite::Route::Rotate);
                }
                start_fault(w, case).await
            });
            (name, scenario)
        })
        .collect();
    run_table("monite token + preflight", table).await;
}

#[tokio::test]
async fn storno_endpoint_read_faults_before_the_rotate_change_nothing() {
    use storno::Route::Get;
    let sc =
        |what, faults: Vec<(storno::Route, FaultKind)>, class, requests, error_has| StartCase {
            what,
            faults,
            prep: Prep::None,
            class,
            requests,
            error_has,
            waited: Duration::ZERO,
        };
    let cases = vec![
        sc(
            "endpoint GET 404",
            vec![(Get, FaultKind::Status(404))],
            Class::Refused,
            Some((Get, 1)),
            "404",
        ),
        StartCase {
            waited: THREE_RETRIES,
            ..sc(
                "endpoint GET 500 every time",
                vec![(Get, FaultKind::Status(500)); 4],
                Class::Refused,
                Some((Get, 4)),
                "500",
            )
        },
        sc(
            "endpoint GET non-JSON 200",
            vec![(Get, FaultKind::Garbage)],
            Class::Refused,
            Some((Get, 1)),
            "unexpected response",
        ),
    ];
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let scenario: Scenario =
                Box::pin(async move { start_fault(storno_world(false).await, case).await });
            (name, scenario)
        })
        .collect();
    run_table("storno preflight", table).await;
}

// ---------------------------------------------------------------------------------
// Confirmation: Monite's delivery log and subscription read, Storno's delivery list
// and test endpoint. The old secret is retired only on evidence.

struct ConfirmCase<R> {
    what: &'static str,
    faults: Vec<(R, FaultKind)>,
    /// Retired in the run the faults hit (retried inside it, or the failure did
    /// not stand in the way); otherwise both secrets must stay published.
    retired: bool,
    /// A history event that run must record.
    records: Option<&'static str>,
    /// Requests a route must have seen in that run: retries are bounded.
    requests: Option<(R, u64)>,
    /// That run took at least this long: retries were backed off.
    waited: Duration,
}

/// `rotate_first`: rotate in a run of its own and deliver (Monite needs real
/// traffic for evidence), so the faults hit a run that has evidence to find. Storno
/// finds its own (the test delivery), so the faults hit the forced run.
async fn confirm_fault<S: Sim>(
    w: ProviderWorld<S>,
    case: ConfirmCase<S::Route>,
    rotate_first: bool,
) -> Vec<String> {
    let mut problems = vec![];
    if rotate_first {
        let out = w.rekey.force(&w.name).await;
        if out.status.code() != Some(0) {
            problems.push(format!("the rotation run exited {:?}", out.status.code()));
        }
        w.until_evidence_counts().await;
        if !w.sim.deliver_event(&w.id).await {
            problems.push("a delivery after the publication failed".into());
        }
    }
    let before = case.requests.map(|(r, _)| w.sim.requests(r));
    for (route, kind) in &case.faults {
        w.sim.inject_fault(*route, kind.clone());
    }
    let t0 = Instant::now();
    let out = if rotate_first {
        w.rekey.once(&[]).await
    } else {
        w.rekey.force(&w.name).await
    };
    if t0.elapsed() < case.waited {
        problems.push(format!(
            "took {:?}, expected at least {:?}",
            t0.elapsed(),
            case.waited
        ));
    }
    let st = w.rekey.state_of(&w.name).await;
    let entry = w.entry().await;
    if case.retired {
        if out.status.code() != Some(0) {
            problems.push(format!("exit {:?}, expected 0", out.status.code()));
        }
        if s(&st, "state") != "idle" || entry.get("previous").is_some() {
            problems.push(format!("not retired: {st}"));
        }
    } else {
        if out.status.code() != Some(1) {
            problems.push(format!("exit {:?}, expected 1", out.status.code()));
        }
        if s(&st, "state") != "confirming" {
            problems.push(format!("state {}, expected confirming", s(&st, "state")));
        }
        if !s(&st, "last_error").contains("confirmation check failed") {
            problems.push(format!("last_error: {}", s(&st, "last_error")));
        }
        if s(&entry, "previous") != w.initial {
            problems.push("the old secret was retired without evidence".into());
        }
    }
    if s(&entry, "current") != w.live() {
        problems.push("Vault's current is not the live secret".into());
    }
    if let (Some((route, want)), Some(was)) = (case.requests, before) {
        let got = w.sim.requests(route) - was;
        if got != want {
            problems.push(format!("{got} requests on {route:?}, expected {want}"));
        }
    }
    if let Some(event) = case.records {
        let history = w.rekey.history(&w.name).await;
        if !history.iter().any(|h| s(h, "event") == event) {
            problems.push(format!("no `{event}` in the history"));
        }
    }
    // Recovery: the provider answers again; the evidence counts.
    finish(&w, &[], &mut problems).await;
    if w.sim.rotations(&w.id) != 1 {
        problems.push(format!(
            "{} rotations at the provider, expected 1",
            w.sim.rotations(&w.id)
        ));
    }
    leak_check(&w, &[]);
    problems
}

#[tokio::test]
async fn monite_confirmation_faults_never_retire_the_old_secret_without_evidence() {
    use monite::Route::{Deliveries, Get, Token};
    let cc = |what, faults: Vec<(monite::Route, FaultKind)>, retired, requests| ConfirmCase {
        what,
        faults,
        retired,
        records: None,
        requests,
        waited: Duration::ZERO,
    };
    let cases = vec![
        ConfirmCase {
            waited: ONE_RETRY,
            ..cc(
                "delivery log 503 once (retried)",
                vec![(Deliveries, FaultKind::Status(503))],
                true,
                Some((Deliveries, 2)),
            )
        },
        ConfirmCase {
            waited: THREE_RETRIES,
            ..cc(
                "delivery log 500 every time (4 attempts)",
                vec![(Deliveries, FaultKind::Status(500)); 4],
                false,
                Some((Deliveries, 4)),
            )
        },
        ConfirmCase {
            waited: Duration::from_secs(1),
            ..cc(
                "delivery log 429 with Retry-After: 1",
                vec![(
                    Deliveries,
                    FaultKind::TooManyRequests {
                        retry_after: Some(1),
                    },
                )],
                true,
                Some((Deliveries, 2)),
            )
        },
        ConfirmCase {
            waited: ONE_RETRY,
            ..cc(
                "delivery log connection reset mid-body (retried)",
                vec![(Deliveries, FaultKind::CommitThenDrop)],
                true,
                Some((Deliveries, 2)),
            )
        },
        cc(
            "delivery log non-JSON 200",
            vec![(Deliveries, FaultKind::Garbage)],
            false,
            Some((Deliveries, 1)),
        ),
        cc(
            "delivery log truncated JSON",
            vec![(Deliveries, FaultKind::CommitThenTruncate)],
            false,
            Some((Deliveries, 1)),
        ),
        cc(
            "delivery log 404",
            vec![(Deliveries, FaultKind::Status(404))],
            false,
            Some((Deliveries, 1)),
        ),
        cc(
            "delivery log 401 once (token renewed)",
            vec![(Deliveries, FaultKind::Status(401))],
            true,
            Some((Token, 2)),
        ),
        ConfirmCase {
            waited: THREE_RETRIES,
            ..cc(
                "subscription GET 500 every time",
                vec![(Get, FaultKind::Status(500)); 4],
                false,
                Some((Get, 4)),
            )
        },
        cc(
            "subscription GET non-JSON 200",
            vec![(Get, FaultKind::Garbage)],
            false,
            Some((Deliveries, 0)),
        ),
        cc(
            "subscription GET 404",
            vec![(Get, FaultKind::Status(404))],
            false,
            Some((Deliveries, 0)),
        ),
        ConfirmCase {
            waited: THREE_RETRIES,
            ..cc(
                "/auth/token 500 every time",
                vec![(Token, FaultKind::Status(500)); 4],
                false,
                Some((Token, 4)),
            )
        },
        cc(
            "/auth/token non-JSON 200",
            vec![(Token, FaultKind::Garbage)],
            false,
            Some((Get, 0)),
        ),
    ];
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let scenario: Scenario =
                Box::pin(async move { confirm_fault(monite_world().await, case, true).await });
            (name, scenario)
        })
        .collect();
    run_table("monite confirmation", table).await;
}

#[tokio::test]
async fn storno_confirmation_faults_never_retire_the_old_secret_without_evidence() {
    use storno::Route::{Deliveries, Test};
    let cc = |what, faults: Vec<(storno::Route, FaultKind)>, retired, requests| ConfirmCase {
        what,
        faults,
        retired,
        records: None,
        requests,
        waited: Duration::ZERO,
    };
    let cases = vec![
        ConfirmCase {
            waited: ONE_RETRY,
            ..cc(
                "test endpoint 502 once (retried)",
                vec![(Test, FaultKind::Status(502))],
                true,
                Some((Test, 2)),
            )
        },
        ConfirmCase {
            waited: THREE_RETRIES,
            ..cc(
                "test endpoint 500 every time (4 attempts)",
                vec![(Test, FaultKind::Status(500)); 4],
                false,
                Some((Test, 4)),
            )
        },
        cc(
            "test endpoint non-JSON 200",
            vec![(Test, FaultKind::Garbage)],
            false,
            Some((Test, 1)),
        ),
        cc(
            "test endpoint 404",
            vec![(Test, FaultKind::Status(404))],
            false,
            Some((Test, 1)),
        ),
        ConfirmCase {
            waited: ONE_RETRY,
            ..cc(
                "delivery list 500 once (retried)",
                vec![(Deliveries, FaultKind::Status(500))],
                true,
                Some((Deliveries, 3)),
            )
        },
        // The first read of the list looks for what to redeliver: its failure is
        // recorded and confirmation goes on.
        ConfirmCase {
            records: Some("redeliver-failed"),
            ..cc(
                "delivery list 404 once (the redelivery's read)",
                vec![(Deliveries, FaultKind::Status(404))],
                true,
                Some((Test, 1)),
            )
        },
        // When the evidence's read of the list fails too, the test delivery is still
        // evidence of its own: a list this key cannot read must not hold every
        // rotation until its deadline.
        ConfirmCase {
            records: Some("redeliver-failed"),
            ..cc(
                "delivery list 404 twice",
                vec![(Deliveries, FaultKind::Status(404)); 2],
                true,
                Some((Test, 1)),
            )
        },
        ConfirmCase {
            records: Some("redeliver-failed"),
            ..cc(
                "delivery list non-JSON 200 twice",
                vec![(Deliveries, FaultKind::Garbage); 2],
                true,
                Some((Test, 1)),
            )
        },
    ];
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let scenario: Scenario =
                Box::pin(
                    async move { confirm_fault(storno_world(false).await, case, false).await },
                );
            (name, scenario)
        })
        .collect();
    run_table("storno confirmation", table).await;
}

/// A test delivery the receiver does not accept (`success: false`) is no evidence:
/// both secrets stay published, run after run, until one is accepted.
#[tokio::test]
async fn a_storno_test_delivery_answering_success_false_is_not_evidence() {
    let w = storno_world(false).await;
    assert!(w.sim.set_url(&w.id, "http://127.0.0.1:9/gone"));
    let out = w.rekey.force(&w.name).await;
    assert_eq!(out.status.code(), Some(0), "no error: just no evidence yet");
    for run in 0..2 {
        if run > 0 {
            w.rekey.once(&[]).await;
        }
        let st = w.rekey.state_of(&w.name).await;
        assert_eq!(s(&st, "state"), "confirming", "{st}");
        let entry = w.entry().await;
        assert_eq!(s(&entry, "current"), w.live());
        assert_eq!(s(&entry, "previous"), w.initial, "not retired");
        assert_eq!(w.sim.request_count(storno::Route::Test), run + 1);
    }
    assert!(
        w.sim
            .set_url(&w.id, &w.receiver.register(&w.route, &w.path))
    );
    w.rekey.once(&[]).await;
    let mut problems = vec![];
    finish(&w, &[], &mut problems).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(w.sim.rotation_count(&w.id), 1);
    assert_eq!(w.stats().rejected, 0);
    w.assert_no_leak(&[]);
}

/// Storno's retry endpoint failing: the redelivery is recorded as failed, and the
/// confirmation (by the test delivery) goes on; a 429 is waited out and retried.
#[tokio::test]
async fn storno_redelivery_failures_do_not_block_confirmation() {
    struct RetryCase {
        what: &'static str,
        kind: FaultKind,
        redelivered: bool,
        sent: u64,
        /// Deliveries that fail in the window (the fault hits the first retry).
        in_window: usize,
    }
    let cases = vec![
        RetryCase {
            what: "retry 409",
            kind: FaultKind::Status(409),
            redelivered: false,
            sent: 1,
            in_window: 1,
        },
        RetryCase {
            what: "retry 500 (not resent: a retry is not idempotent)",
            kind: FaultKind::Status(500),
            redelivered: false,
            sent: 1,
            in_window: 1,
        },
        RetryCase {
            what: "retry 429 with Retry-After: 1 (waited out)",
            kind: FaultKind::TooManyRequests {
                retry_after: Some(1),
            },
            redelivered: true,
            sent: 2,
            in_window: 1,
        },
        RetryCase {
            what: "retry answering a 2xx page that queued nothing",
            kind: FaultKind::Garbage,
            redelivered: false,
            sent: 1,
            in_window: 1,
        },
        RetryCase {
            what: "two failed in the window, the first retry refused: the second still goes",
            kind: FaultKind::Status(409),
            redelivered: true,
            sent: 2,
            in_window: 2,
        },
    ];
    let table = cases
        .into_iter()
        .map(|case| {
            let name = case.what.to_string();
            let scenario: Scenario = Box::pin(async move {
                let mut problems = vec![];
                let w = storno_world(false).await;
                // The exposure window held open by a crash: a delivery fails in it.
                w.rekey
                    .crash_at("after:rotate-succeeded", &["--force", &w.name])
                    .await;
                for _ in 0..case.in_window {
                    if w.sim.deliver_event(&w.id).await {
                        problems.push("a delivery in the window verified".into());
                    }
                }
                w.sim.inject_fault(storno::Route::Retry, case.kind.clone());
                let out = w.rekey.once(&[]).await;
                if out.status.code() != Some(0) {
                    problems.push(format!("exit {:?}, expected 0", out.status.code()));
                }
                let st = w.rekey.state_of(&w.name).await;
                if s(&st, "state") != "idle" {
                    problems.push(format!("not confirmed: {st}"));
                }
                let sent = w.sim.request_count(storno::Route::Retry);
                if sent != case.sent {
                    problems.push(format!("{sent} retry requests, expected {}", case.sent));
                }
                let history = w.rekey.history(&w.name).await;
                // Every retry that was refused is recorded, and every one that went.
                let refused = case.in_window - usize::from(case.redelivered);
                let mut want = vec![];
                if case.redelivered {
                    want.push("redelivered");
                }
                if refused > 0 {
                    want.push("redeliver-failed");
                }
                for want in want {
                    if !history.iter().any(|h| s(h, "event") == want) {
                        problems.push(format!("no `{want}` in the history"));
                    }
                }
                // A redelivery is queued: give it a moment.
                let mut left = w.sim.undelivered(&w.id);
                for _ in 0..100 {
                    if left == Some(0) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    left = w.sim.undelivered(&w.id);
                }
                let want_left = Some(case.in_window - usize::from(case.redelivered));
                if left != want_left {
                    problems.push(format!("{left:?} undelivered, expected {want_left:?}"));
                }
                finish(&w, &[], &mut problems).await;
                if w.sim.rotation_count(&w.id) != 1 {
                    problems.push("more than one rotation".into());
                }
                leak_check(&w, &[]);
                problems
            });
            (name, scenario)
        })
        .collect();
    run_table("storno redelivery", table).await;
}
