//! A bad config never starts rekey: `check-config` and `run` exit 78 with a message
//! naming the file, the key and what is wrong. A token file is read only by the
//! commands that use it (`check-config --preflight`, `run`), so its problems are
//! checked through those.

use crate::support::rekey::{Rekey, Setup, Store, assert_exit, stderr};

const TOKEN_FILE_LINE: &str = "token_file = \"fintoro.token\"";

/// Replaces the file store by a `[vault]` section with this body.
fn vault(c: String, body: &str) -> String {
    c.replace(
        "[file_store]\ndir = \"published\"\n",
        &format!("[vault]\n{body}\n"),
    )
}

/// Adds a second account of the same kind, and an `id = "*"` entry for each of the
/// two accounts with these `vault_path` templates.
fn two_discovering_accounts(c: String, first: &str, second: &str) -> String {
    let star = |provider: &str, template: &str| {
        format!(
            "\n[[subscriptions]]\nprovider = \"{provider}\"\nid = \"*\"\npolicy = \"p\"\nvault_path = \"{template}\"\n"
        )
    };
    format!(
        "{c}\n[[providers]]\nname = \"acme-eu\"\nkind = \"fintoro\"\n\
         base_url = \"http://127.0.0.1:9/api/public/v1\"\n{TOKEN_FILE_LINE}\n{}{}",
        star("acme", first),
        star("acme-eu", second)
    )
}

fn base() -> Rekey {
    Rekey::new(
        &Setup::new(Store::Files, "http://127.0.0.1:9/api/public/v1", "tok")
            .subscription(801, "webhooks/fintoro/801"),
    )
}

/// (what is wrong, edit to the valid config, expected key, expected words)
type Case = (
    &'static str,
    fn(String) -> String,
    &'static str,
    &'static str,
);

fn cases() -> Vec<Case> {
    vec![
        (
            "unknown top-level key",
            |c| format!("colour = \"blue\"\n{c}"),
            "colour",
            "unknown key",
        ),
        (
            "unknown provider key",
            |c| c.replace("kind = \"fintoro\"", "kind = \"fintoro\"\nregion = \"eu\""),
            "providers[0].region",
            "unknown key",
        ),
        (
            "wrong type",
            |c| c.replace("version = 1", "version = \"one\""),
            "version",
            "string",
        ),
        (
            "missing version",
            |c| c.replace("version = 1\n", ""),
            "version",
            "is required",
        ),
        (
            "future version",
            |c| c.replace("version = 1", "version = 2"),
            "version",
            "not supported",
        ),
        (
            "missing state_dir",
            |c| c.replace("state_dir = \"state\"\n", ""),
            "state_dir",
            "is required",
        ),
        (
            "no store",
            |c| c.replace("[file_store]\ndir = \"published\"\n", ""),
            "vault",
            "is required",
        ),
        (
            "unknown provider kind",
            |c| c.replace("kind = \"fintoro\"", "kind = \"stripe\""),
            "providers[0].kind",
            "not a provider kind",
        ),
        (
            "http to a remote host",
            |c| c.replace("http://127.0.0.1:9", "http://fintoro.example"),
            "providers[0].base_url",
            "https",
        ),
        (
            "unreadable token file",
            |c| c.replace(TOKEN_FILE_LINE, "token_file = \"missing.token\""),
            "providers[0].token_file",
            "cannot read",
        ),
        (
            "subscription names a missing provider",
            |c| c.replace("provider = \"acme\"", "provider = \"nope\""),
            "subscriptions[0].provider",
            "no [[providers]] entry is named `nope`",
        ),
        (
            "subscription names a missing policy",
            |c| c.replace("policy = \"p\"", "policy = \"weekly\""),
            "subscriptions[0].policy",
            "no [[policies]] entry is named `weekly`",
        ),
        (
            "policy without schedule or every",
            |c| {
                c.replace(
                    "schedule = \"0 3 1 * *\"\ntimezone = \"Europe/Bratislava\"\n",
                    "",
                )
            },
            "policies[0].schedule",
            "needs `schedule`",
        ),
        (
            "bad cron",
            |c| c.replace("0 3 1 * *", "0 3 1 *"),
            "policies[0].schedule",
            "expected 5",
        ),
        (
            "bad zone",
            |c| c.replace("Europe/Bratislava", "Europe/Atlantis"),
            "policies[0].timezone",
            "IANA",
        ),
        (
            "bad duration",
            |c| c.replace("confirm_timeout = \"1h\"", "confirm_timeout = \"a while\""),
            "policies[0].confirm_timeout",
            "not a duration",
        ),
        (
            "bad on_timeout",
            |c| c.replace("on_timeout = \"hold\"", "on_timeout = \"panic\""),
            "policies[0].on_timeout",
            "not one of",
        ),
        (
            "poll longer than timeout",
            |c| c.replace("confirm_poll = \"1s\"", "confirm_poll = \"2h\""),
            "policies[0].confirm_poll",
            "longer than confirm_timeout",
        ),
        (
            "duplicate subscription",
            |c| {
                format!(
                    "{c}\n[[subscriptions]]\nprovider = \"acme\"\nid = \"801\"\npolicy = \"p\"\nvault_path = \"other\"\n"
                )
            },
            "subscriptions[1].id",
            "listed twice",
        ),
        (
            "shared vault path",
            |c| {
                format!(
                    "{c}\n[[subscriptions]]\nprovider = \"acme\"\nid = \"802\"\npolicy = \"p\"\nvault_path = \"webhooks/fintoro/801\"\n"
                )
            },
            "subscriptions[1].vault_path",
            "also the path of",
        ),
        (
            "vault path escaping",
            |c| {
                c.replace(
                    "vault_path = \"webhooks/fintoro/801\"",
                    "vault_path = \"webhooks/../801\"",
                )
            },
            "subscriptions[0].vault_path",
            "`..`",
        ),
        (
            "duplicate provider",
            |c| {
                c.replace("[[policies]]", "[[providers]]\nname = \"acme\"\nkind = \"fintoro\"\ntoken_file = \"fintoro.token\"\n\n[[policies]]")
            },
            "providers[1].name",
            "defined twice",
        ),
        (
            "both stores",
            |c| {
                format!(
                    "{c}\n[vault]\naddress = \"https://v.example\"\ntoken_file = \"fintoro.token\"\n"
                )
            },
            "file_store",
            "not both",
        ),
        (
            "bad rate limit",
            |c| {
                c.replace(
                    TOKEN_FILE_LINE,
                    &format!("{TOKEN_FILE_LINE}\nrate_limit = \"lots\""),
                )
            },
            "providers[0].rate_limit",
            "not a rate",
        ),
        ("not TOML", |c| format!("{c}\n[[[broken"), "", "TOML"),
        (
            "unknown vault key",
            |c| {
                vault(
                    c,
                    "address = \"https://v.example\"\ntoken_file = \"fintoro.token\"\nport = 8200",
                )
            },
            "vault.port",
            "unknown key",
        ),
        (
            "kv_version 3",
            |c| {
                vault(
                    c,
                    "address = \"https://v.example\"\ntoken_file = \"fintoro.token\"\nkv_version = 3",
                )
            },
            "vault.kv_version",
            "not 1 or 2",
        ),
        (
            "vault over http to a remote host",
            |c| {
                vault(
                    c,
                    "address = \"http://vault.internal:8200\"\ntoken_file = \"fintoro.token\"",
                )
            },
            "vault.address",
            "https",
        ),
        (
            "no vault credentials",
            |c| vault(c, "address = \"https://v.example\""),
            "vault.token_file",
            "no Vault credentials",
        ),
        (
            "token file and approle",
            |c| {
                vault(
                    c,
                    "address = \"https://v.example\"\ntoken_file = \"fintoro.token\"\n[vault.approle]\nrole_id = \"r\"\nsecret_id_file = \"fintoro.token\"",
                )
            },
            "vault.approle",
            "not both",
        ),
        (
            "destroy versions on kv v1",
            |c| {
                vault(
                    c,
                    "address = \"https://v.example\"\ntoken_file = \"fintoro.token\"\nkv_version = 1\ndestroy_old_versions = true",
                )
            },
            "vault.destroy_old_versions",
            "kv_version = 2",
        ),
        (
            "empty token file",
            |c| c.replace(TOKEN_FILE_LINE, "token_file = \"empty.token\""),
            "providers[0].token_file",
            "is empty",
        ),
        (
            "schedule and every",
            |c| {
                c.replace(
                    "schedule = \"0 3 1 * *\"",
                    "schedule = \"0 3 1 * *\"\nevery = \"30d\"",
                )
            },
            "policies[0].every",
            "not both",
        ),
        (
            "every with a time zone",
            |c| c.replace("schedule = \"0 3 1 * *\"", "every = \"30d\""),
            "policies[0].timezone",
            "only applies to `schedule`",
        ),
        (
            "zero duration",
            |c| c.replace("confirm_timeout = \"1h\"", "confirm_timeout = \"0s\""),
            "policies[0].confirm_timeout",
            "longer than zero",
        ),
        (
            "subscription id with a slash",
            |c| c.replace("id = \"801\"", "id = \"80/1\""),
            "subscriptions[0].id",
            "must not contain",
        ),
        (
            "missing subscription id",
            |c| c.replace("id = \"801\"\n", ""),
            "subscriptions[0].id",
            "is required",
        ),
        (
            "bad log format",
            |c| c.replace("[log]", "[log]\nformat = \"xml\""),
            "log.format",
            "not one of",
        ),
        (
            "zero rate",
            |c| {
                c.replace(
                    TOKEN_FILE_LINE,
                    &format!("{TOKEN_FILE_LINE}\nrate_limit = \"0/s\""),
                )
            },
            "providers[0].rate_limit",
            "positive",
        ),
        (
            "provider name with a space",
            |c| {
                c.replace("name = \"acme\"", "name = \"ac me\"")
                    .replace("provider = \"acme\"", "provider = \"ac me\"")
            },
            "providers[0].name",
            "must not contain",
        ),
        (
            "two accounts' discovery templates without the account",
            |c| two_discovering_accounts(c, "webhooks/{id}", "webhooks/{id}"),
            "subscriptions[2].vault_path",
            "`webhooks/{id}` of subscriptions[1] (provider `acme`) can both produce",
        ),
        (
            "discovery templates apart only by a provider name that prefixes the other",
            |c| two_discovering_accounts(c, "w/{provider}-{id}", "w/{provider}-{id}"),
            "subscriptions[2].vault_path",
            "can both produce one path (e.g. `w/acme-eu-x`)",
        ),
    ]
}

#[tokio::test]
async fn every_bad_config_is_refused_with_file_key_and_reason() {
    let r = base();
    std::fs::write(r.path().join("empty.token"), "\n").unwrap();
    let valid = std::fs::read_to_string(&r.config).unwrap();
    let ok = r.run(&["check-config"]).await;
    assert_exit(&ok, 0);
    let mut failures = vec![];
    for (what, edit, key, words) in cases() {
        std::fs::write(&r.config, edit(valid.clone())).unwrap();
        let secret_file = key.ends_with("token_file") || key.ends_with("secret_file");
        for args in [&["check-config", "--preflight"][..], &["check-config"]] {
            if secret_file && args.len() == 1 {
                continue;
            }
            let out = r.run(args).await;
            let err = stderr(&out);
            let file = r.config.display().to_string();
            let good = out.status.code() == Some(78)
                && err.contains(&file)
                && err.contains(key)
                && err.contains(words);
            if !good {
                failures.push(format!(
                    "{what} ({args:?}): exit {:?}, expected key `{key}` and `{words}` in:\n{err}",
                    out.status.code()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        cases().len() >= 40,
        "the corpus keeps at least 40 bad configs"
    );
}

#[tokio::test]
async fn run_refuses_to_start_on_a_bad_config_and_touches_nothing() {
    let r = base();
    let valid = std::fs::read_to_string(&r.config).unwrap();
    std::fs::write(&r.config, valid.replace("0 3 1 * *", "every day")).unwrap();
    let out = r.once(&[]).await;
    assert_exit(&out, 78);
    assert!(!r.state_dir().exists(), "no state created by a refused run");
}

#[tokio::test]
async fn environment_overlay_can_fix_or_break_a_key() {
    let r = base();
    let valid = std::fs::read_to_string(&r.config).unwrap();
    std::fs::write(&r.config, valid.replace("state_dir = \"state\"\n", "")).unwrap();
    let out = r.run(&["check-config"]).await;
    assert_exit(&out, 78);
    let dir = r.path().join("from-env");
    let out = r
        .command(&["check-config"])
        .env("REKEY__STATE_DIR", &dir)
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-env"));
}

/// The same corpus through SIGHUP: a running daemon refuses every bad config, keeps
/// the one it runs with, and still takes a good one afterwards.
#[tokio::test]
async fn a_running_daemon_keeps_its_config_through_every_bad_reload() {
    use crate::support::daemon::Daemon;
    use rustix::process::Signal;

    let r = base();
    std::fs::write(r.path().join("empty.token"), "\n").unwrap();
    let valid = std::fs::read_to_string(&r.config).unwrap();
    let mut d = Daemon::start(&r, &[]).await;
    d.notified("READY=1").await;
    for (what, edit, _, _) in cases() {
        std::fs::write(&r.config, edit(valid.clone())).unwrap();
        d.signal(Signal::HUP);
        d.notified("RELOADING=1").await;
        let line = d
            .log_line(&["reload refused, the running config stays"])
            .await;
        assert!(!line.is_empty(), "{what}");
        d.notified("READY=1").await;
    }
    // Still alive, still serving its config, and a valid reload is taken.
    std::fs::write(
        &r.config,
        valid.replace("confirm_poll = \"1s\"", "confirm_poll = \"2s\""),
    )
    .unwrap();
    d.signal(Signal::HUP);
    d.log_line(&["config reloaded"]).await;
    d.notified("READY=1").await;
    d.signal(Signal::TERM);
    let status = d.exit(std::time::Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
    d.record(&r);
}
