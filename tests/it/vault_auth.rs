//! Vault authentication as operators configure it: AppRole instead of a token file.

use crate::support::rekey::assert_exit;
use crate::support::world::World;

#[tokio::test]
async fn a_rotation_authenticates_to_vault_with_approle() {
    let w = World::new().await;
    let (role_id, secret_id) = w.vault.approle("rekey", &["rekey"], "1h").await;
    std::fs::write(w.rekey.path().join("secret-id"), &secret_id).unwrap();
    let cfg = std::fs::read_to_string(&w.rekey.config).unwrap();
    let cfg = cfg.replace("token_file = \"vault.token\"\n", "");
    let cfg = cfg.replace(
        "[log]",
        &format!(
            "[vault.approle]\nrole_id = \"{role_id}\"\nsecret_id_file = \"secret-id\"\n\n[log]"
        ),
    );
    std::fs::write(&w.rekey.config, cfg).unwrap();
    std::fs::remove_file(w.rekey.path().join("vault.token")).unwrap();

    let out = w.rekey.force(&w.name).await;
    assert_exit(&out, 0);
    let entry = w.entry().await;
    assert_eq!(entry["current"], w.live());
    assert_eq!(entry["previous"], w.initial.as_str());
    w.assert_no_leak(&[&secret_id]);

    // A wrong secret id is refused before the provider is touched, and says so.
    std::fs::write(w.rekey.path().join("secret-id"), "not-the-secret-id").unwrap();
    let before = w.sim.rotation_count(w.id);
    let out = w.rekey.once(&[]).await;
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AppRole login"), "{err}");
    assert_eq!(w.sim.rotation_count(w.id), before);
}
