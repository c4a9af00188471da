//! What ships in `contrib/`: Prometheus alert rules (with promtool's own unit tests)
//! and a Grafana dashboard, checked against the metrics a real daemon exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use rustix::process::Signal;

use crate::support::daemon::Daemon;
use crate::support::world::World;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `promtool`, installed by the project's own script on first use.
fn promtool() -> &'static str {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        let out = Command::new("bash")
            .arg(root().join("scripts/install-promtool"))
            .output()
            .expect("run scripts/install-promtool");
        assert!(
            out.status.success(),
            "scripts/install-promtool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        *done = true;
    }
    "promtool"
}

fn run(cmd: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_promtool_unit_tests() {
    let dir = root().join("contrib/prometheus");
    let p = promtool();
    let checked = run(p, &["check", "rules", "rekey.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(p, &["test", "rules", "rekey.rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `rekey_…` name in `text` (the rules, the dashboard's queries).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("rekey_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        // (The bare prefix, as prose names it, is no metric.)
        if boundary && end > start + "rekey_".len() {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The sample names a scrape can carry, from its `# TYPE` lines: a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_use_is_one_the_daemon_exports() {
    let rules =
        std::fs::read_to_string(root().join("contrib/prometheus/rekey.rules.yml")).expect("rules");
    let dashboard =
        std::fs::read_to_string(root().join("contrib/grafana/rekey.json")).expect("dashboard");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let used: BTreeSet<String> = metric_names(&rules)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(used.len() >= 7, "{used:?}");

    let w = World::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let text = std::fs::read_to_string(&w.rekey.config).expect("config");
    std::fs::write(
        &w.rekey.config,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let mut d = Daemon::start(&w.rekey, &[]).await;
    d.notified("READY=1").await;
    let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let have = exported(&scrape);
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "contrib/ uses metrics the daemon does not export: {missing:?}\nexported: {have:?}"
    );
    d.signal(Signal::TERM);
    assert_eq!(d.exit(Duration::from_secs(10)).await.code(), Some(0));
}
