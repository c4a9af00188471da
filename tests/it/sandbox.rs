//! The README's first command (for every simulated provider), and the shipped
//! example config.

use std::process::Stdio;

use crate::support::rekey::assert_exit;

#[tokio::test]
async fn the_sandbox_demo_runs_a_whole_rotation_with_no_rejected_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(["sandbox", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    for step in [
        "stored locally",
        "published current=",
        "evidence:",
        "retired the old secret",
    ] {
        assert!(text.contains(step), "missing `{step}` in:\n{text}");
    }
    assert!(text.contains("Rotation complete"), "{text}");
    assert!(text.contains(" 0 rejected"), "{text}");
    assert!(!text.contains("whsec_"), "a secret was printed:\n{text}");
    // What it leaves behind is a working config for the other commands.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(["status", "--json", "--config"])
        .arg(dir.path().join("rekey.toml"))
        .output()
        .await
        .unwrap();
    assert_exit(&status, 0);
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["subscription"], "sandbox/801");
    assert_eq!(rows[0]["state"], "idle");
}

#[tokio::test]
async fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/rekey.example.toml"
    ))
    .unwrap();
    // Point its token files at real files.
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("vault-token"), "hvs.example").unwrap();
    std::fs::write(etc.join("fintoro-acme.token"), "token").unwrap();
    let config = dir.path().join("rekey.toml");
    std::fs::write(
        &config,
        example
            .replace("/etc/rekey/", &format!("{}/", etc.display()))
            .replace(
                "/var/lib/rekey",
                &dir.path().join("state").display().to_string(),
            ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env_clear()
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme-fintoro/801"));
}

#[tokio::test]
async fn the_sandbox_demo_rotates_at_every_simulated_provider() {
    for provider in ["fintoro", "monite", "storno"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
            .args(["sandbox", "--provider", provider, "--timeout", "20s"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run rekey sandbox");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{provider}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("Rotation complete"),
            "{provider}:\n{stdout}"
        );
    }
}
