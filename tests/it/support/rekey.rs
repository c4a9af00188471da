//! Runs the real `rekey` binary against a config written for the test, the way an
//! operator would: separate processes, real signals, real exit codes.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where the published secrets go.
pub enum Store {
    /// A Vault-API server, KV v1 at `secret/`.
    Vault { addr: String, token: String },
    /// The local file store.
    Files,
}

/// The `[[providers]]` entry of a scenario, named [`PROVIDER`]: its kind, base url,
/// the kind's own keys, and the credential files those keys point at.
pub struct ProviderConf {
    pub kind: &'static str,
    pub base_url: String,
    /// Extra `key = value` lines (e.g. `company = "…"`).
    pub lines: Vec<String>,
    /// `(file name, content)` written next to the config.
    pub files: Vec<(String, String)>,
}

/// The `longest_delivery` every scenario's provider gets: the simulators' deliveries
/// complete in milliseconds, and only the test of the allowance itself needs the
/// provider's default (10 s at Fintoro), which would make every scenario that waits
/// for evidence wait that long.
pub const LONGEST_DELIVERY: Duration = Duration::from_millis(1);
const LONGEST_DELIVERY_LINE: &str = "longest_delivery = \"1ms\"";

impl ProviderConf {
    pub fn fintoro(base_url: &str, token: &str) -> ProviderConf {
        ProviderConf {
            kind: "fintoro",
            base_url: base_url.to_string(),
            lines: vec![
                "token_file = \"fintoro.token\"".into(),
                LONGEST_DELIVERY_LINE.into(),
            ],
            files: vec![("fintoro.token".into(), token.to_string())],
        }
    }

    /// Leaves `longest_delivery` at the provider's default.
    pub fn default_longest_delivery(mut self) -> ProviderConf {
        self.lines.retain(|l| l != LONGEST_DELIVERY_LINE);
        self
    }

    pub fn monite(
        base_url: &str,
        client_id: &str,
        client_secret: &str,
        entity: &str,
    ) -> ProviderConf {
        ProviderConf {
            kind: "monite",
            base_url: base_url.to_string(),
            lines: vec![
                format!("client_id = \"{client_id}\""),
                "client_secret_file = \"monite.secret\"".into(),
                format!("entity_id = \"{entity}\""),
                LONGEST_DELIVERY_LINE.into(),
            ],
            files: vec![("monite.secret".into(), client_secret.to_string())],
        }
    }

    pub fn storno(base_url: &str, token: &str, company: &str) -> ProviderConf {
        ProviderConf {
            kind: "storno",
            base_url: base_url.to_string(),
            lines: vec![
                "token_file = \"storno.token\"".into(),
                format!("company = \"{company}\""),
                LONGEST_DELIVERY_LINE.into(),
            ],
            files: vec![("storno.token".into(), token.to_string())],
        }
    }
}

/// The knobs the scenarios turn; the rest is the documented example config.
pub struct Setup {
    pub store: Store,
    pub provider: ProviderConf,
    /// `(id, vault_path)` pairs.
    pub subscriptions: Vec<(String, String)>,
    pub policy: String,
}

impl Setup {
    /// A Fintoro account (the first provider rekey had; most scenarios use it).
    pub fn new(store: Store, fintoro_url: &str, fintoro_token: &str) -> Setup {
        Self::with_provider(store, ProviderConf::fintoro(fintoro_url, fintoro_token))
    }

    pub fn with_provider(store: Store, provider: ProviderConf) -> Setup {
        Setup {
            store,
            provider,
            subscriptions: vec![],
            policy: r#"schedule = "0 3 1 * *"
timezone = "Europe/Bratislava"
confirm_timeout = "1h"
confirm_poll = "1s"
on_timeout = "hold"
retry_base = "1s"
retry_max = "2s""#
                .to_string(),
        }
    }

    pub fn subscription(mut self, id: impl ToString, vault_path: &str) -> Setup {
        self.subscriptions
            .push((id.to_string(), vault_path.to_string()));
        self
    }

    pub fn policy(mut self, body: &str) -> Setup {
        self.policy = body.to_string();
        self
    }
}

/// A state directory, config and secret files for one scenario.
pub struct Rekey {
    pub dir: TempDir,
    pub config: PathBuf,
    /// Every stdout/stderr this Rekey's processes printed, for the leak check.
    pub transcript: std::sync::Mutex<String>,
}

pub const PROVIDER: &str = "acme";

impl Rekey {
    /// A rekey directory whose config the test writes itself, with the token files
    /// for `vault` (at `addr`) in place.
    pub fn for_vault(addr: &str, token: &str) -> Rekey {
        Rekey::new(&Setup::new(
            Store::Vault {
                addr: addr.to_string(),
                token: token.to_string(),
            },
            "http://127.0.0.1:9/unused",
            crate::support::world::FINTORO_TOKEN,
        ))
    }

    pub fn new(setup: &Setup) -> Rekey {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for (name, content) in &setup.provider.files {
            std::fs::write(d.join(name), content).expect("credential file");
        }
        let store = match &setup.store {
            Store::Vault { addr, token } => {
                std::fs::write(d.join("vault.token"), token).expect("vault token file");
                format!(
                    "[vault]\naddress = \"{addr}\"\ntoken_file = \"vault.token\"\nmount = \"secret\"\nkv_version = 1\ntimeout = \"5s\"\n"
                )
            }
            Store::Files => "[file_store]\ndir = \"published\"\n".to_string(),
        };
        let p = &setup.provider;
        let mut toml = format!(
            "version = 1\nstate_dir = \"state\"\n\n{store}\n[log]\nlevel = \"debug\"\n\n\
             [[providers]]\nname = \"{PROVIDER}\"\nkind = \"{}\"\nbase_url = \"{}\"\n\
             {}\ntimeout = \"2s\"\n\n[[policies]]\nname = \"p\"\n{}\n",
            p.kind,
            p.base_url,
            p.lines.join("\n"),
            setup.policy
        );
        for (id, path) in &setup.subscriptions {
            toml.push_str(&format!(
                "\n[[subscriptions]]\nprovider = \"{PROVIDER}\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"{path}\"\n"
            ));
        }
        let config = d.join("rekey.toml");
        std::fs::write(&config, toml).expect("config");
        Rekey {
            dir,
            config,
            transcript: std::sync::Mutex::new(String::new()),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The command with a clean environment: nothing from the developer's shell
    /// (VAULT_ADDR, REKEY__…) leaks into a test.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rekey"));
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    fn record(&self, out: &Output) {
        let mut t = self.transcript.lock().expect("transcript");
        t.push_str(&String::from_utf8_lossy(&out.stdout));
        t.push_str(&String::from_utf8_lossy(&out.stderr));
    }

    /// Runs to completion; returns the output (recorded for the leak check).
    pub async fn run(&self, args: &[&str]) -> Output {
        let out = tokio::time::timeout(Duration::from_secs(120), self.command(args).output())
            .await
            .expect("rekey did not finish within 120 s")
            .expect("spawn rekey");
        self.record(&out);
        out
    }

    pub async fn once(&self, extra: &[&str]) -> Output {
        let mut args = vec!["run", "--once"];
        args.extend_from_slice(extra);
        self.run(&args).await
    }

    pub async fn force(&self, sub: &str) -> Output {
        self.once(&["--force", sub]).await
    }

    pub async fn status(&self) -> Vec<Value> {
        let out = self.run(&["status", "--json"]).await;
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub async fn state_of(&self, sub: &str) -> Value {
        self.status()
            .await
            .into_iter()
            .find(|r| r["subscription"] == sub)
            .unwrap_or_else(|| panic!("{sub} not in status"))
    }

    pub async fn history(&self, sub: &str) -> Vec<Value> {
        let out = self.run(&["history", sub, "--json"]).await;
        serde_json::from_slice(&out.stdout).expect("history --json")
    }

    /// When the newest rotation of `sub` was published (rekey's clock), from its
    /// history; `None` before any publication.
    pub async fn published_at(&self, sub: &str) -> Option<DateTime<Utc>> {
        self.history(sub)
            .await
            .iter()
            .rev()
            .find(|h| h["event"] == "published")
            .map(|h| {
                let at = h["at"].as_str().expect("history rows have a time");
                DateTime::parse_from_rfc3339(at)
                    .expect("an RFC 3339 time")
                    .with_timezone(&Utc)
            })
    }

    /// Starts `rekey run --once …` with `REKEY_FAILPOINT=point`, waits until the
    /// process reports it froze there, and SIGKILLs it: a real crash at that boundary.
    pub async fn crash_at(&self, point: &str, extra: &[&str]) {
        assert!(
            self.try_crash_at(point, extra).await,
            "rekey never reached failpoint {point}"
        );
    }

    /// As [`Rekey::crash_at`], but the run may also end without passing `point`
    /// (returns false then, the run having completed normally).
    pub async fn try_crash_at(&self, point: &str, extra: &[&str]) -> bool {
        let mut args = vec!["run", "--once"];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        cmd.env("REKEY_FAILPOINT", point);
        let mut child: Child = cmd.spawn().expect("spawn rekey");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let marker = format!("{} {point}", rekey::failpoint::REACHED);
        let mut seen = String::new();
        let reached = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(&marker) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if reached {
            child.start_kill().expect("SIGKILL");
        }
        let status = child.wait().await.expect("wait");
        self.transcript.lock().expect("transcript").push_str(&seen);
        if reached {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
        }
        reached
    }

    /// Asserts that none of `secrets` appears in anything rekey printed, nor in any
    /// file under the state directory.
    pub fn assert_no_leak(&self, secrets: &[&str]) {
        let t = self.transcript.lock().expect("transcript").clone();
        for s in secrets.iter().filter(|s| s.len() >= 8) {
            assert!(!t.contains(s), "a secret leaked into rekey's output:\n{t}");
            for entry in walk(&self.state_dir()) {
                let bytes = std::fs::read(&entry).unwrap_or_default();
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "a secret is still in {}",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code, showing what rekey printed if it differs.
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
