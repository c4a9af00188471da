//! A damaged or foreign state database gives a clear error and is never overwritten:
//! whatever it still holds (perhaps a minted secret) stays for an operator to recover.

use crate::support::rekey::{Rekey, Setup, Store, assert_exit, stderr};

fn rekey() -> Rekey {
    Rekey::new(
        &Setup::new(Store::Files, "http://127.0.0.1:9/api/public/v1", "tok")
            .subscription(801, "webhooks/fintoro/801"),
    )
}

#[tokio::test]
async fn a_truncated_database_is_refused_and_left_untouched() {
    let r = rekey();
    assert_exit(&r.once(&[]).await, 0);
    let db = r.state_dir().join("rekey.db");
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 3]).unwrap();
    let damaged = std::fs::read(&db).unwrap();
    for args in [&["status"][..], &["run", "--once"][..], &["history"][..]] {
        let out = r.run(args).await;
        assert_exit(&out, 70);
        let err = stderr(&out);
        assert!(err.contains(&db.display().to_string()), "{err}");
        assert!(
            err.contains("damaged") || err.contains("malformed"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read(&db).unwrap(),
        damaged,
        "no write to a damaged file"
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused() {
    let r = rekey();
    std::fs::create_dir_all(r.state_dir()).unwrap();
    let db = r.state_dir().join("rekey.db");
    std::fs::write(
        &db,
        "these are someone's notes, not a database\n".repeat(200),
    )
    .unwrap();
    let out = r.once(&[]).await;
    assert_exit(&out, 70);
    assert!(stderr(&out).contains("rekey.db"), "{}", stderr(&out));
    assert!(
        std::fs::read_to_string(&db)
            .unwrap()
            .starts_with("these are")
    );
}

#[tokio::test]
async fn a_database_from_another_schema_version_is_refused() {
    let r = rekey();
    assert_exit(&r.once(&[]).await, 0);
    let db = r.state_dir().join("rekey.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let out = r.once(&[]).await;
    assert_exit(&out, 70);
    let err = stderr(&out);
    assert!(err.contains("schema version 99"), "{err}");
    assert!(err.contains("move the file aside"), "{err}");
}

#[tokio::test]
async fn an_unusable_state_directory_is_a_clear_error() {
    let r = rekey();
    // A path below a regular file can never be a directory (root bypasses modes, so
    // a chmod'ed directory would not prove anything when the tests run as root).
    let blocker = r.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let cfg = std::fs::read_to_string(&r.config).unwrap();
    std::fs::write(
        &r.config,
        cfg.replace("state_dir = \"state\"", "state_dir = \"blocker/state\""),
    )
    .unwrap();
    let out = r.once(&[]).await;
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("blocker/state"), "{err}");
}
