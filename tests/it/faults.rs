//! Provider faults on every call rekey makes, and what each must lead to: bounded,
//! backed-off retries; a rotate whose outcome is unknown handled as "lost" (rotated
//! again, recorded); the old secret never retired without evidence; nothing lost.

use std::time::{Duration, Instant};

use rekey::sandbox::fintoro::{Fault, FaultKind, Route};

use crate::support::rekey::assert_exit;
use crate::support::util::s;
use crate::support::world::World;

/// Finishes the rotation in flight: deliver with the live secret, run once, expect idle
/// with Vault's `current` equal to the provider's live secret and no `previous`.
async fn finish_and_check(w: &World) {
    for _ in 0..3 {
        let st = w.rekey.state_of(&w.name).await;
        if s(&st, "state") == "idle" {
            break;
        }
        w.until_evidence_counts().await;
        w.sim.deliver(w.id, "clients.updated").await;
        w.rekey.once(&[]).await;
    }
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "idle", "{st}");
    let entry = w.entry().await;
    assert_eq!(
        s(&entry, "current"),
        w.live(),
        "Vault holds the live secret"
    );
    assert!(entry.get("previous").is_none(), "{entry}");
}

struct RotateCase {
    what: &'static str,
    kind: FaultKind,
    /// The provider rotated although rekey never got the secret.
    committed: bool,
    /// The rotate outcome is unknown to rekey (vs a definite refusal).
    unknown: bool,
}

#[tokio::test]
async fn every_rotate_fault_ends_with_the_live_secret_in_vault() {
    let cases = vec![
        RotateCase {
            what: "500",
            kind: FaultKind::Status(500),
            committed: false,
            unknown: true,
        },
        RotateCase {
            what: "502",
            kind: FaultKind::Status(502),
            committed: false,
            unknown: true,
        },
        RotateCase {
            what: "503",
            kind: FaultKind::Status(503),
            committed: false,
            unknown: true,
        },
        RotateCase {
            what: "401",
            kind: FaultKind::Status(401),
            committed: false,
            unknown: false,
        },
        RotateCase {
            what: "403",
            kind: FaultKind::Status(403),
            committed: false,
            unknown: false,
        },
        RotateCase {
            what: "404",
            kind: FaultKind::Status(404),
            committed: false,
            unknown: false,
        },
        RotateCase {
            what: "non-JSON 200",
            kind: FaultKind::Garbage,
            committed: false,
            unknown: true,
        },
        RotateCase {
            what: "200 without plainTextSecret",
            kind: FaultKind::MissingSecret,
            committed: false,
            unknown: true,
        },
        RotateCase {
            what: "committed, connection reset mid-body",
            kind: FaultKind::CommitThenDrop,
            committed: true,
            unknown: true,
        },
        RotateCase {
            what: "committed, connection closed before answering",
            kind: FaultKind::CommitThenClose,
            committed: true,
            unknown: true,
        },
        RotateCase {
            what: "committed, truncated JSON",
            kind: FaultKind::CommitThenTruncate,
            committed: true,
            unknown: true,
        },
        RotateCase {
            what: "committed, answer after the client timeout",
            kind: FaultKind::Delay(Duration::from_secs(4)),
            committed: true,
            unknown: true,
        },
    ];
    let mut failures = vec![];
    for case in cases {
        let w = World::new().await;
        w.sim.inject(Fault {
            route: Route::Rotate,
            kind: case.kind.clone(),
        });
        let out = w.rekey.force(&w.name).await;
        let st = w.rekey.state_of(&w.name).await;
        let mut problems = vec![];
        // A refused rotation fails and waits for the next run; an unknown outcome is
        // rotated over within the same run (the next one may be a day away).
        let (want_exit, want_states): (i32, &[&str]) = if case.unknown {
            (0, &["confirming", "idle"])
        } else {
            (1, &["failed"])
        };
        if out.status.code() != Some(want_exit) {
            problems.push(format!(
                "exit {:?}, expected {want_exit}",
                out.status.code()
            ));
        }
        if !want_states.contains(&s(&st, "state").as_str()) {
            problems.push(format!(
                "state {}, expected {want_states:?}",
                s(&st, "state")
            ));
        }
        if st["lost_responses"] != u64::from(case.unknown) {
            problems.push(format!("lost_responses {}", st["lost_responses"]));
        }
        let entry = w.entry().await;
        if case.unknown {
            // The lost secret never reached Vault: previous is the old one.
            if s(&entry, "current") != w.live() || s(&entry, "previous") != w.initial {
                problems.push("Vault does not hold live and old after the re-rotation".into());
            }
        } else if s(&entry, "current") != w.initial {
            problems.push("Vault changed before a secret was known".into());
        }
        // Recovery: the next one-shot run retries a refused rotation (which now
        // succeeds) or confirms the re-rotated one.
        w.rekey.once(&[]).await;
        let rotations = w.sim.rotation_count(w.id);
        let want = 1 + u32::from(case.committed);
        if rotations != want {
            problems.push(format!(
                "{rotations} rotations at the provider, expected {want}"
            ));
        }
        finish_and_check(&w).await;
        w.assert_no_leak(&[]);
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.what, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn transient_read_errors_are_retried_with_backoff_and_a_bound() {
    let w = World::new().await;
    // Preflight's token check fails twice, then works: retried inside one run.
    w.sim.inject(Fault {
        route: Route::Whoami,
        kind: FaultKind::Status(503),
    });
    w.sim.inject(Fault {
        route: Route::Whoami,
        kind: FaultKind::Status(502),
    });
    let t0 = Instant::now();
    assert_exit(&w.rekey.force(&w.name).await, 0);
    let took = t0.elapsed();
    assert_eq!(w.sim.request_count(Route::Whoami), 3);
    assert!(
        took >= Duration::from_millis(700),
        "backed off between attempts: {took:?}"
    );
    assert_eq!(w.sim.rotation_count(w.id), 1);

    // A provider that keeps failing: the attempts are bounded, the rotation does not
    // start, nothing changes.
    let w = World::new().await;
    for _ in 0..10 {
        w.sim.inject(Fault {
            route: Route::Whoami,
            kind: FaultKind::Status(500),
        });
    }
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    assert_eq!(
        w.sim.request_count(Route::Whoami),
        4,
        "4 attempts, then give up"
    );
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("500"), "{st}");
    assert_eq!(w.sim.rotation_count(w.id), 0);
}

#[tokio::test]
async fn rate_limits_are_honoured_with_and_without_retry_after() {
    let w = World::new().await;
    w.sim.inject(Fault {
        route: Route::Rotate,
        kind: FaultKind::TooManyRequests {
            retry_after: Some(2),
        },
    });
    let t0 = Instant::now();
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "waited out Retry-After"
    );
    assert_eq!(w.sim.rotation_count(w.id), 1);
    assert_eq!(w.sim.request_count(Route::Rotate), 2);

    let w = World::new().await;
    w.sim.inject(Fault {
        route: Route::Get,
        kind: FaultKind::TooManyRequests { retry_after: None },
    });
    assert_exit(&w.rekey.force(&w.name).await, 0);
    assert_eq!(w.sim.rotation_count(w.id), 1);
    assert_eq!(
        s(&w.entry().await, "current"),
        w.live(),
        "a 429 without Retry-After is retried with backoff"
    );
}

#[tokio::test]
async fn confirmation_errors_never_retire_the_old_secret() {
    let w = World::new().await;
    assert_exit(&w.rekey.force(&w.name).await, 0);
    w.until_evidence_counts().await;
    assert!(w.sim.deliver(w.id, "clients.created").await.success);
    // The evidence is there, but the provider answers garbage, then 404.
    for kind in [FaultKind::Garbage, FaultKind::Status(404)] {
        w.sim.inject(Fault {
            route: Route::Get,
            kind,
        });
        let out = w.rekey.once(&[]).await;
        assert_exit(&out, 1);
        let st = w.rekey.state_of(&w.name).await;
        assert_eq!(s(&st, "state"), "confirming", "{st}");
        assert!(
            s(&st, "last_error").contains("confirmation check failed"),
            "{st}"
        );
        assert_eq!(
            s(&w.entry().await, "previous"),
            w.initial,
            "not retired on an error"
        );
    }
    // The provider recovers: the evidence counts and the old secret goes.
    assert_exit(&w.rekey.once(&[]).await, 0);
    finish_and_check(&w).await;
}

#[tokio::test]
async fn an_unreachable_provider_stops_the_rotation_before_anything_changes() {
    let w = World::new().await;
    // Point rekey at a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let cfg = std::fs::read_to_string(&w.rekey.config).unwrap();
    let base = w.sim.base_url();
    std::fs::write(
        &w.rekey.config,
        cfg.replace(&base, &format!("http://127.0.0.1:{port}/api/public/v1")),
    )
    .unwrap();
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("cannot connect"), "{st}");
    assert_eq!(s(&w.entry().await, "current"), w.initial);
}

#[tokio::test]
async fn a_revoked_vault_token_stops_the_rotation_before_the_provider_is_called() {
    let w = World::new().await;
    let token = w.vault.create_token(&["default"], "1h").await;
    std::fs::write(w.rekey.path().join("vault.token"), &token).unwrap();
    w.vault.revoke_token(&token).await;
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("revoked"), "{st}");
    assert_eq!(w.sim.request_count(Route::Rotate), 0);
    w.assert_no_leak(&[&token]);
}

#[tokio::test]
async fn vault_down_before_the_rotation_stops_it_and_down_after_mint_keeps_the_secret() {
    let mut w = World::new().await;
    w.vault.stop().await;
    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 1);
    let st = w.rekey.state_of(&w.name).await;
    assert_eq!(s(&st, "state"), "failed");
    assert!(s(&st, "last_error").contains("cannot be reached"), "{st}");
    assert_eq!(w.sim.request_count(Route::Rotate), 0);

    w.vault.restart().await;
    w.rekey
        .crash_at("after:rotate-succeeded", &["--force", &w.name])
        .await;
    w.vault.stop().await;
    assert_exit(&w.rekey.once(&[]).await, 1);
    assert_eq!(s(&w.rekey.state_of(&w.name).await, "state"), "minted");
    w.vault.restart().await;
    assert_exit(&w.rekey.once(&[]).await, 0);
    assert_eq!(s(&w.entry().await, "current"), w.live());
    finish_and_check(&w).await;
}
