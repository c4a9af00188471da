//! The state's behaviours, run against both backends: SQLite in a state directory
//! and PostgreSQL (a real server, see `support::postgres`). Whatever the engine,
//! scheduler and CLI rely on must read the same from either.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rekey::rotation::{Phase, Transition};
use rekey::secret::{ExposeSecret, Fingerprint, secret};
use rekey::state::{Ask, HistoryFilter, Leadership, Location, StateDb, StateError};

use crate::support::postgres::{TestDb, database};

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn days(n: i64) -> DateTime<Utc> {
    now() - chrono::Duration::days(n)
}

/// Runs `check` on a fresh SQLite state and on a fresh PostgreSQL one.
macro_rules! on_both {
    ($name:ident, $check:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let db = StateDb::open(&dir.path().join("state")).unwrap();
                ($check)(&db);
            }

            #[tokio::test]
            async fn postgres() {
                let pg = database().await;
                let db = StateDb::open_at(Location::Postgres(&pg.settings())).unwrap();
                ($check)(&db);
            }
        }
    };
}

on_both!(
    a_minted_record_and_its_history_round_trip,
    |db: &StateDb| {
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        assert_eq!(r.state.phase, Phase::Idle);
        assert_eq!(r.first_seen_at, now());
        r.state.phase = Phase::Minted;
        r.state.rotation_id = Some("rot-1".into());
        r.state.pending_secret = Some(secret("whsec_minted_value"));
        r.state.new_fingerprint = Some(Fingerprint::of_str("whsec_minted_value"));
        r.state.rotated_at = Some(now());
        r.state.lost_responses = 2;
        r.state.rotate_in_flight = true;
        let t = Transition {
            from: Phase::Rotating,
            to: Phase::Minted,
            event: "rotate-succeeded",
            detail: "x".into(),
            quiet: false,
            evidence: None,
        };
        db.save(&r, Some(&t), now()).unwrap();
        let back = db.load("fintoro/801").unwrap().unwrap();
        assert_eq!(back.state.phase, Phase::Minted);
        assert_eq!(
            back.state.pending_secret.as_ref().unwrap().expose_secret(),
            "whsec_minted_value"
        );
        assert_eq!(back.state.rotated_at, Some(now()));
        assert_eq!(back.state.lost_responses, 2);
        assert!(back.state.rotate_in_flight);
        assert_eq!(
            db.rotating_names().unwrap(),
            vec!["fintoro/801".to_string()]
        );
        let h = db.history(Some("fintoro/801")).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            (h[0].from.as_str(), h[0].to.as_str()),
            ("rotating", "minted")
        );
        assert_eq!(h[0].rotation_id.as_deref(), Some("rot-1"));
        // Published: the stored copy is gone.
        r.state.phase = Phase::Published;
        r.state.pending_secret = None;
        db.save(&r, None, now()).unwrap();
        assert!(
            db.load("fintoro/801")
                .unwrap()
                .unwrap()
                .state
                .pending_secret
                .is_none()
        );
    }
);

on_both!(
    an_unchanged_record_is_not_written_and_a_routine_save_is_counted_unsynced,
    |db: &StateDb| {
        let mut r = db.load_or_create("fintoro/801", now()).unwrap();
        r.state.phase = Phase::Confirming;
        db.save(&r, None, now()).unwrap();
        let before = db.save_counts();
        db.save(&r, None, now()).unwrap();
        db.save_routine(&r, now()).unwrap();
        assert_eq!(db.save_counts(), before, "nothing to write");
        r.state.not_before = Some(now() + chrono::Duration::seconds(30));
        db.save_routine(&r, now()).unwrap();
        let after = db.save_counts();
        assert_eq!(
            (after.commits, after.synced),
            (before.commits + 1, before.synced)
        );
        assert_eq!(
            db.load("fintoro/801").unwrap().unwrap().state.not_before,
            r.state.not_before
        );
        let t = Transition::note(Phase::Confirming, "test", "x".into());
        db.save(&r, Some(&t), now()).unwrap();
        assert_eq!(db.save_counts().synced, before.synced + 1);
        assert_eq!(db.history(None).unwrap().len(), 1);
    }
);

on_both!(
    requests_and_decisions_stay_until_done_and_the_latest_decision_wins,
    |db: &StateDb| {
        db.add_request("fintoro/801", now()).unwrap();
        db.add_request("fintoro/802", now() + chrono::Duration::seconds(1))
            .unwrap();
        db.add_decision("fintoro/801", false, now()).unwrap();
        db.add_decision("fintoro/801", true, now()).unwrap();
        let pending = db.pending_asks().unwrap();
        let view: Vec<(&str, Option<bool>)> = (pending.iter())
            .map(|a| (a.name.as_str(), a.retire))
            .collect();
        assert_eq!(
            view,
            vec![
                ("fintoro/801", None),
                ("fintoro/802", None),
                ("fintoro/801", Some(true))
            ]
        );
        // Read, they stay until done: a crash or a failover before that leaves
        // them for the next instance.
        assert_eq!(db.pending_asks().unwrap(), pending);
        // One asked again after it was read is not cleared by the older one's done.
        db.add_request("fintoro/802", now() + chrono::Duration::seconds(2))
            .unwrap();
        for ask in &pending {
            db.clear_ask(ask).unwrap();
        }
        let left = db.pending_asks().unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].name.as_str(), left[0].retire),
            ("fintoro/802", None)
        );
        db.clear_ask(&left[0]).unwrap();
        assert!(db.pending_asks().unwrap().is_empty());
        let names = vec!["fintoro/803".to_string()];
        let seen = db.ask(Ask::Rotate(&names), now(), || 7).unwrap();
        assert_eq!(seen, 7, "`then` ran inside the ask");
        db.ask(
            Ask::Decide {
                name: "fintoro/804",
                retire: false,
            },
            now(),
            || (),
        )
        .unwrap();
        let mut saw = None;
        let asks = db.take_asks(|a| saw = Some(a.clone())).unwrap();
        assert_eq!(asks.rotate, names);
        assert_eq!(asks.decide, vec![("fintoro/804".to_string(), false)]);
        assert_eq!(saw, Some(asks));
        assert!(db.take_asks(|_| {}).unwrap().is_empty());
    }
);

on_both!(
    discovered_subscriptions_are_new_once_and_again_after_vanishing,
    |db: &StateDb| {
        let saw = |db: &StateDb| {
            db.saw_discovered("acme/a", "acme", "a", "w/acme/a", now())
                .unwrap()
        };
        assert!(saw(db), "first sight");
        assert!(!saw(db), "seen before");
        db.mark_vanished("acme/a", now()).unwrap();
        let d = db.discovered().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].vanished_at, Some(now()));
        assert!(saw(db), "came back");
        assert_eq!(db.discovered().unwrap()[0].vanished_at, None);
        assert!(
            !db.saw_discovered("acme/a", "acme", "a", "w/acme/moved", now())
                .unwrap(),
            "a moved path is not news"
        );
        assert_eq!(db.discovered().unwrap()[0].vault_path, "w/acme/moved");
    }
);

/// Appends a history row for `name` recorded at `at`, the record carrying
/// `rotation_id` (a rotation under way while it stays there).
fn row_at(db: &StateDb, name: &str, rotation_id: Option<&str>, at: DateTime<Utc>) -> i64 {
    let mut r = db.load_or_create(name, now()).unwrap();
    r.state.rotation_id = rotation_id.map(str::to_string);
    let t = Transition::note(Phase::Idle, "test", format!("at {at}"));
    db.save(&r, Some(&t), at).unwrap();
    db.last_seq().unwrap()
}

on_both!(
    pruning_keeps_a_rotation_under_way_and_stops_at_the_first_recent_row,
    |db: &StateDb| {
        let _done = row_at(db, "a/1", Some("r-done"), days(500));
        let held = row_at(db, "b/2", Some("r-held"), days(499));
        row_at(db, "a/1", None, days(498));
        row_at(db, "a/1", None, days(497));
        let recent = row_at(db, "a/1", None, days(10));
        let behind_recent = row_at(db, "a/1", None, days(450));
        let before = days(400);
        assert_eq!(db.prune_history(before, 2).unwrap(), 2, "a full batch");
        assert_eq!(
            db.prune_history(before, 2).unwrap(),
            1,
            "the rest, then stop"
        );
        assert_eq!(db.prune_history(before, 2).unwrap(), 0);
        let left: Vec<i64> = db.history(None).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![held, recent, behind_recent]);
    }
);

on_both!(history_pages_filters_and_tails, |db: &StateDb| {
    let mut seqs = vec![];
    for i in 0..7 {
        let name = if i % 2 == 0 { "a/1" } else { "b/2" };
        seqs.push(row_at(db, name, None, days(10 - i)));
    }
    assert_eq!(db.last_seq().unwrap(), *seqs.last().unwrap());
    let all = HistoryFilter::default();
    let page = db.history_page(&all, 0, 3).unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs[..3]);
    let next = db.history_page(&all, page[2].seq, 3).unwrap();
    assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs[3..6]);
    let a = HistoryFilter {
        subscription: Some("a/1"),
        since: Some(days(6)),
    };
    let rows = db.history_page(&a, 0, 100).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![seqs[4], seqs[6]]
    );
    assert!(rows.iter().all(|r| r.subscription == "a/1"));
    let start = db
        .history_tail_start(
            &HistoryFilter {
                subscription: Some("b/2"),
                since: None,
            },
            2,
        )
        .unwrap();
    let tail = db
        .history_page(
            &HistoryFilter {
                subscription: Some("b/2"),
                since: None,
            },
            start,
            100,
        )
        .unwrap();
    assert_eq!(
        tail.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![seqs[3], seqs[5]]
    );
    assert_eq!(
        db.history_tail_start(&all, 0).unwrap(),
        db.last_seq().unwrap()
    );
    assert_eq!(db.history_after(seqs[5], 10).unwrap().len(), 1);
});

on_both!(
    a_fleet_is_adopted_in_one_pass_and_its_due_times_set,
    |db: &StateDb| {
        let names: Vec<String> = (0..100).map(|i| format!("fintoro/{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut seen = vec![];
        db.load_or_create_many(&refs, now(), |r| seen.push(r.name))
            .unwrap();
        seen.sort();
        assert_eq!(seen, names);
        let few = &refs[..3];
        let mut again = 0;
        db.load_or_create_many(few, now(), |_| again += 1).unwrap();
        assert_eq!(again, 3);
        assert_eq!(db.names().unwrap().len(), 100);
        let due = now() + chrono::Duration::hours(1);
        db.set_next_due(&[(names[0].clone(), Some(due)), (names[1].clone(), None)])
            .unwrap();
        let all = db.load_all().unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[0].next_due_at, Some(due));
        assert_eq!(all[1].next_due_at, None);
    }
);

on_both!(evidence_and_failure_tallies_round_trip, |db: &StateDb| {
    use rekey::evidence::{Evidence, FailureCount, Failures};
    let mut r = db.load_or_create("fintoro/801", now()).unwrap();
    r.state.phase = Phase::Confirming;
    r.state.delivery_failures.add(
        &Failures {
            seen: vec![FailureCount::Newest("d1".into()), FailureCount::Listed(2)],
            detail: "status 401".into(),
        },
        now(),
    );
    let ev = Evidence {
        source: "lastSuccessAt".into(),
        stamp: Some(now()),
        counted_after: Some(now() - chrono::Duration::seconds(11)),
        offset: Some(rekey::skew::UNMEASURED),
        detail: "Fintoro lastSuccessAt".into(),
    };
    let t = Transition {
        from: Phase::Confirming,
        to: Phase::Retiring,
        event: "checked",
        detail: format!("evidence: {ev}"),
        quiet: false,
        evidence: Some(ev.clone()),
    };
    db.save(&r, Some(&t), now()).unwrap();
    let back = db.load("fintoro/801").unwrap().unwrap();
    assert_eq!(back.state.delivery_failures, r.state.delivery_failures);
    assert_eq!(back.state.delivery_failures.count(), 2);
    let rows = db.history(Some("fintoro/801")).unwrap();
    assert_eq!(rows.last().unwrap().evidence.as_ref(), Some(&ev));
});

#[tokio::test]
async fn postgres_concurrent_first_starts_all_succeed_and_reopening_keeps_the_state() {
    let pg = database().await;
    let settings = pg.settings();
    let start = std::sync::Barrier::new(6);
    let errors: Vec<String> = std::thread::scope(|s| {
        let openers: Vec<_> = (0..6)
            .map(|_| {
                let (settings, start) = (&settings, &start);
                s.spawn(move || {
                    start.wait();
                    StateDb::open_at(Location::Postgres(settings))
                        .and_then(|db| db.load_or_create("fintoro/801", now()))
                        .err()
                        .map(|e| e.to_string())
                })
            })
            .collect();
        openers
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(errors.is_empty(), "{errors:#?}");
    let db = StateDb::open_at(Location::Postgres(&settings)).unwrap();
    assert_eq!(db.names().unwrap(), vec!["fintoro/801"]);
    assert_eq!(pg.psql("SELECT version FROM rekey_schema"), "1");
}

#[tokio::test]
async fn postgres_read_only_open_creates_nothing_and_a_newer_schema_is_refused() {
    let pg = database().await;
    let settings = pg.settings();
    assert!(
        StateDb::open_read_only_at(Location::Postgres(&settings))
            .unwrap()
            .is_none()
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0"
    );
    drop(StateDb::open_at(Location::Postgres(&settings)).unwrap());
    let ro = StateDb::open_read_only_at(Location::Postgres(&settings))
        .unwrap()
        .unwrap();
    assert!(ro.add_request("fintoro/801", now()).is_err(), "read only");
    pg.psql("UPDATE rekey_schema SET version = 7");
    for err in [
        StateDb::open_at(Location::Postgres(&settings))
            .err()
            .unwrap(),
        StateDb::open_read_only_at(Location::Postgres(&settings))
            .err()
            .unwrap(),
    ] {
        assert!(
            matches!(err, StateError::PostgresSchema { found: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&settings.url), "{err}");
    }
}

#[tokio::test]
async fn postgres_a_wrong_password_or_unreachable_server_is_a_clear_error_without_the_password() {
    let pg: TestDb = database().await;
    let mut settings = pg.settings();
    settings.password = Some("not-the-password-9d2".to_string().into());
    let err = StateDb::open_at(Location::Postgres(&settings))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password-9d2"), "{err}");
    let mut gone = pg.settings();
    gone.connect.port(crate::support::util::free_port());
    let started = std::time::Instant::now();
    let err = StateDb::open_at(Location::Postgres(&gone))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("127.0.0.1") || err.contains("refused"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Opens the PostgreSQL state of `pg` as one instance of `cluster`.
fn instance(pg: &TestDb, cluster: &str, lease: Duration) -> StateDb {
    StateDb::open_at(Location::Postgres(&pg.settings_for(cluster, lease))).unwrap()
}

fn lead(db: &StateDb, holder: &str) -> Leadership {
    db.shared().unwrap().try_lead(holder).unwrap()
}

#[tokio::test]
async fn lease_one_instance_leads_racers_and_each_cluster_has_its_own() {
    let pg = database().await;
    let racers: Vec<StateDb> = (0..6)
        .map(|_| instance(&pg, "default", Duration::from_secs(15)))
        .collect();
    let start = std::sync::Barrier::new(racers.len());
    let outcomes: Vec<Leadership> = std::thread::scope(|s| {
        let handles: Vec<_> = (racers.iter().enumerate())
            .map(|(i, db)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    lead(db, &format!("host:{i}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let leaders: Vec<_> = (outcomes.iter())
        .filter(|o| matches!(o, Leadership::Leading { epoch: 1 }))
        .collect();
    assert_eq!(leaders.len(), 1, "{outcomes:?}");
    let holder = match outcomes
        .iter()
        .find(|o| matches!(o, Leadership::Standby { .. }))
    {
        Some(Leadership::Standby { leader }) => leader.holder.clone(),
        other => panic!("{other:?}"),
    };
    let i = outcomes
        .iter()
        .position(|o| matches!(o, Leadership::Leading { .. }))
        .unwrap();
    assert_eq!(holder, format!("host:{i}"), "standbys name the leader");
    // A leader renews at its epoch; another cluster on the same database is apart.
    assert_eq!(lead(&racers[i], "host:x"), Leadership::Leading { epoch: 1 });
    let other = instance(&pg, "other", Duration::from_secs(15));
    assert_eq!(lead(&other, "host:o"), Leadership::Leading { epoch: 1 });
}

#[tokio::test]
async fn lease_a_deposed_leader_s_writes_are_refused_inside_their_transaction() {
    let pg = database().await;
    let a = instance(&pg, "default", Duration::from_secs(15));
    let b = instance(&pg, "default", Duration::from_secs(15));
    assert_eq!(lead(&a, "a"), Leadership::Leading { epoch: 1 });
    let mut rec = a.load_or_create("fintoro/801", now()).unwrap();
    rec.state.phase = Phase::Rotating;
    a.save(&rec, None, now()).unwrap();
    assert!(matches!(lead(&b, "b"), Leadership::Standby { .. }));
    // `a` pauses past its lease (its expiry, on the database's clock, passes).
    pg.psql("UPDATE rekey_lease SET expires_at = now() - interval '1 second'");
    assert_eq!(lead(&b, "b"), Leadership::Leading { epoch: 2 });
    rec.state.phase = Phase::Minted;
    rec.state.pending_secret = Some(secret("whsec_from_the_deposed_leader"));
    let t = Transition::note(Phase::Rotating, "test", "late".into());
    for write in [
        a.save(&rec, Some(&t), now()),
        a.set_next_due(&[("fintoro/801".into(), Some(now()))]),
        a.take_asks(|_| {}).map(|_| ()),
        a.mark_vanished("x/1", now()),
    ] {
        assert!(
            matches!(write, Err(StateError::Deposed { epoch: 1, .. })),
            "{write:?}"
        );
    }
    assert!(a.shared().unwrap().keeper().is_deposed());
    assert_eq!(
        b.load("fintoro/801").unwrap().unwrap().state.phase,
        Phase::Rotating
    );
    assert!(
        b.history(None).unwrap().is_empty(),
        "nothing from the old epoch"
    );
    // The new leader writes; the old one, leading again only after a takeover of
    // its own, would get a new epoch.
    b.save(&rec, Some(&t), now()).unwrap();
    assert!(matches!(lead(&a, "a"), Leadership::Standby { .. }));
}

#[tokio::test]
async fn lease_a_leader_steps_down_by_its_own_clock_and_a_release_hands_over_at_once() {
    let pg = database().await;
    let lease = Duration::from_millis(600);
    let a = instance(&pg, "default", lease);
    let b = instance(&pg, "default", lease);
    assert_eq!(lead(&a, "a"), Leadership::Leading { epoch: 1 });
    let pa = a.shared().unwrap();
    assert!(pa.keeper().lease_left().unwrap() <= lease - lease / 10);
    // No renewal for a whole lease: `a` stops trusting it before anyone could take
    // over, and refuses its own write without asking the database.
    std::thread::sleep(lease);
    assert!(pa.keeper().is_deposed());
    let rec = a.load_or_create("fintoro/801", now());
    assert!(matches!(rec, Err(StateError::Deposed { .. })), "{rec:?}");
    assert_eq!(
        lead(&a, "a"),
        Leadership::Leading { epoch: 2 },
        "takes it afresh"
    );
    pa.release().unwrap();
    let late = a.load_or_create("fintoro/802", now());
    assert!(
        matches!(late, Err(StateError::Deposed { .. })),
        "released: no more writes: {late:?}"
    );
    assert_eq!(
        lead(&b, "b"),
        Leadership::Leading { epoch: 3 },
        "released: no wait"
    );
    let pb = b.shared().unwrap();
    assert_eq!(pb.keeper().epoch(), Some(3));
    assert!(pb.renew_now().unwrap() > Duration::from_millis(400));
}

#[tokio::test]
async fn postgres_tls_is_verified_against_the_given_ca_and_refused_without_it() {
    let pg = database().await;
    let mut settings = pg.settings();
    settings.tls = true;
    settings.root_cert = Some(pg.ca_file.clone());
    for host in ["localhost", "127.0.0.1"] {
        let mut s = settings.clone();
        s.connect = format!(
            "postgres://{}@{host}:{}/{}",
            crate::support::postgres::USER,
            pg.port,
            pg.name
        )
        .parse()
        .unwrap();
        let db = StateDb::open_at(Location::Postgres(&s)).unwrap_or_else(|e| panic!("{host}: {e}"));
        db.load_or_create("fintoro/801", now()).unwrap();
        let encrypted = pg.psql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'rekey' AND a.datname = current_database()",
        );
        assert_eq!(encrypted, "t", "{host}: rekey's sessions are encrypted");
    }
    // The system's CAs do not know the test CA: the server is not trusted.
    settings.root_cert = None;
    let err = StateDb::open_at(Location::Postgres(&settings))
        .err()
        .unwrap()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// The leader wakes its scheduler when the asks waiting change, not at every look
/// while one waits (asks stay until their job ran): the mark it compares.
#[tokio::test]
async fn postgres_asks_mark_changes_when_asks_come_and_go_and_only_then() {
    let pg = database().await;
    let db = StateDb::open_at(Location::Postgres(&pg.settings())).unwrap();
    let pgdb = db.shared().unwrap();
    assert_eq!(pgdb.asks_mark().unwrap(), None);
    db.add_request("fintoro/801", now()).unwrap();
    let one = pgdb.asks_mark().unwrap();
    assert!(one.is_some());
    assert_eq!(pgdb.asks_mark().unwrap(), one, "nothing changed");
    // An ask stamped earlier (another host's clock behind) still changes it.
    db.add_decision("fintoro/802", true, now() - chrono::Duration::hours(1))
        .unwrap();
    let two = pgdb.asks_mark().unwrap();
    assert!(two.is_some() && two != one, "{two:?} vs {one:?}");
    for ask in db.pending_asks().unwrap() {
        db.clear_ask(&ask).unwrap();
    }
    assert_eq!(pgdb.asks_mark().unwrap(), None);
}
