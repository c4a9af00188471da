//! `rekey history` at scale and history retention, with the real binary: rows are
//! streamed page by page, `--since`/`--limit` choose them, and old rows are pruned
//! at start without touching a rotation still under way.

use chrono::{DateTime, Duration, Utc};
use rekey::rotation::Phase;
use rekey::state::StateDb;
use serde_json::Value;

use crate::support::daemon::Daemon;
use crate::support::rekey::{Rekey, Setup, Store, assert_exit, stderr};
use crate::support::util::s;

fn rekey() -> Rekey {
    Rekey::new(
        &Setup::new(Store::Files, "http://127.0.0.1:9/api/public/v1", "tok")
            .subscription(801, "webhooks/fintoro/801"),
    )
}

/// A state directory holding `old` rows of `acme/801` from 500 days ago (more than
/// one page), two rows of `acme/802`'s held rotation from as long ago, and three
/// recent rows of `acme/801`.
fn seed(r: &Rekey, old: usize) -> DateTime<Utc> {
    let now = Utc::now();
    let db = StateDb::open(&r.state_dir()).expect("state");
    let mut held = db.load_or_create("acme/802", now).expect("record");
    held.state.phase = Phase::Held;
    held.state.rotation_id = Some("r-held".into());
    db.save(&held, None, now).expect("save");
    drop(db);
    let conn = rusqlite::Connection::open(r.state_dir().join("rekey.db")).expect("open");
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let long_ago = now - Duration::days(500);
    let mut rows: Vec<(&str, Option<&str>, String)> = (0..old)
        .map(|_| ("acme/801", Some("r-old"), at(long_ago)))
        .collect();
    rows.push(("acme/802", Some("r-held"), at(long_ago)));
    rows.push(("acme/802", Some("r-held"), at(long_ago)));
    for h in [3, 2, 1] {
        rows.push(("acme/801", None, at(now - Duration::hours(h))));
    }
    conn.execute_batch("BEGIN").expect("begin");
    for (sub, rotation, at) in rows {
        conn.execute(
            "INSERT INTO history (subscription, at, rotation_id, from_phase, to_phase, event, detail)
             VALUES (?1, ?2, ?3, 'idle', 'idle', 'test', 'seeded')",
            rusqlite::params![sub, at, rotation],
        )
        .expect("insert");
    }
    conn.execute_batch("COMMIT").expect("commit");
    now
}

async fn json(r: &Rekey, args: &[&str]) -> Vec<Value> {
    let args = [&["history"][..], args, &["--json"]].concat();
    let out = r.run(&args).await;
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "history {args:?} is not a JSON array ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn seqs(rows: &[Value]) -> Vec<i64> {
    rows.iter()
        .map(|r| r["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn history_streams_every_page_and_since_and_limit_choose_rows() {
    let r = rekey();
    seed(&r, 1_100);
    let all = json(&r, &[]).await;
    assert_eq!(all.len(), 1_105, "three pages, none lost or repeated");
    assert!(seqs(&all).windows(2).all(|w| w[0] < w[1]), "oldest first");

    let newest = json(&r, &["--limit", "2"]).await;
    assert_eq!(seqs(&newest), seqs(&all[1_103..]));
    let recent = json(&r, &["--since", "1d"]).await;
    assert_eq!(seqs(&recent), seqs(&all[1_102..]));
    let day = (Utc::now() - Duration::days(2))
        .format("%Y-%m-%d")
        .to_string();
    assert_eq!(json(&r, &["acme/801", "--since", &day]).await.len(), 3);
    let held = json(&r, &["acme/802", "--limit", "600"]).await;
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|h| s(h, "subscription") == "acme/802"));

    let text = r.run(&["history", "--limit", "3"]).await;
    assert_exit(&text, 0);
    assert_eq!(String::from_utf8_lossy(&text.stdout).lines().count(), 3);

    for bad in [&["--since", "last tuesday"][..], &["--limit", "0"][..]] {
        let mut args = vec!["history"];
        args.extend_from_slice(bad);
        let out = r.run(&args).await;
        assert_exit(&out, 2);
        assert!(stderr(&out).contains(bad[0]), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn the_daemon_prunes_old_history_at_start_but_not_a_held_rotation_s() {
    let r = rekey();
    seed(&r, 1_100);
    let mut d = Daemon::start(&r, &[]).await;
    d.log_line(&["history pruned", "1100"]).await;
    d.signal(rustix::process::Signal::TERM);
    assert!(d.exit(std::time::Duration::from_secs(30)).await.success());
    d.record(&r);
    let left = json(&r, &[]).await;
    let subs: Vec<String> = left.iter().map(|h| s(h, "subscription")).collect();
    assert_eq!(
        subs,
        ["acme/802", "acme/802", "acme/801", "acme/801", "acme/801"],
        "{left:?}"
    );
}

/// `rekey status --json | head -1`: a reader that stops reading is not an error, and
/// never a panic. The pipe's read end is closed before rekey starts, so every write
/// meets a broken pipe.
#[tokio::test]
async fn status_and_history_into_a_closed_pipe_end_quietly() {
    let r = rekey();
    seed(&r, 3);
    for args in [
        &["status"][..],
        &["status", "--json"][..],
        &["history"][..],
        &["history", "--json"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut cmd = r.command(args);
        cmd.stdout(writer);
        // `output()` would capture stdout whatever was set; `spawn` keeps the pipe.
        let out = cmd
            .spawn()
            .expect("spawn rekey")
            .wait_with_output()
            .await
            .expect("wait for rekey");
        assert!(out.stdout.is_empty(), "stdout went to the closed pipe");
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "rekey {args:?} panicked: {err}");
        let code = out.status.code();
        assert!(
            code == Some(0) || (args[0] == "status" && code == Some(1)),
            "rekey {args:?}: exit {code:?}, stderr: {err}"
        );
    }
}
