//! `rekey sandbox`, the one-command demo, completes a rotation for every provider.

use std::process::Stdio;

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
