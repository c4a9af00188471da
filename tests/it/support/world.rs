//! One scenario's world: a RustyVault, the Fintoro simulator with one subscription
//! whose secret is already published (as in any real deployment), a receiver that
//! verifies deliveries against Vault, and a rekey config pointing at all of them.

use std::sync::Arc;
use std::time::Duration;

use rekey::config::{KvVersion, VaultAuth, VaultSettings};
use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::sandbox::receiver::{Receiver, ReceiverStats};
use rekey::secret::secret;
use rekey::store::{SecretStore, VaultStore};
use serde_json::json;

use super::rekey::{PROVIDER, Rekey, Setup, Store};
use super::rvault::RustyVault;

pub const FINTORO_TOKEN: &str = "fintoro-company-token-0123456789";

pub struct World {
    pub vault: RustyVault,
    pub sim: FintoroSim,
    pub receiver: Receiver,
    pub rekey: Rekey,
    pub id: u64,
    /// `<provider>/<id>`.
    pub name: String,
    pub path: String,
    /// The secret the subscription had before rekey touched it.
    pub initial: String,
}

impl World {
    pub async fn new() -> World {
        Self::with_policy(None).await
    }

    /// `policy`: the body of the `[[policies]]` entry, if not the default.
    pub async fn with_policy(policy: Option<&str>) -> World {
        let vault = RustyVault::start().await;
        let sim = FintoroSim::start(FintoroSimOptions {
            token: FINTORO_TOKEN.into(),
            ..Default::default()
        })
        .await
        .expect("start the Fintoro simulator");
        let store: Arc<dyn SecretStore> = Arc::new(
            VaultStore::connect(&VaultSettings {
                address: vault.addr(),
                auth: VaultAuth::Token(secret(vault.root_token().to_string())),
                mount: "secret".into(),
                kv_version: KvVersion::V1,
                ca_cert: None,
                timeout: Duration::from_secs(5),
                namespace: None,
                destroy_old_versions: false,
                min_token_ttl: Duration::from_secs(60),
            })
            .await
            .expect("receiver's vault client"),
        );
        let receiver = Receiver::start(store).await.expect("start the receiver");
        let path = "webhooks/fintoro/801".to_string();
        let url = receiver.register("fintoro/801", &path);
        let (id, initial) = sim.add_subscription(&url);
        assert_eq!(id, 801);
        vault.kv1_write(&path, json!({ "current": initial })).await;
        let mut setup = Setup::new(
            Store::Vault {
                addr: vault.addr(),
                token: vault.root_token().to_string(),
            },
            &sim.base_url(),
            FINTORO_TOKEN,
        )
        .subscription(id, &path);
        if let Some(p) = policy {
            setup = setup.policy(p);
        }
        let rekey = Rekey::new(&setup);
        World {
            vault,
            sim,
            receiver,
            rekey,
            id,
            name: format!("{PROVIDER}/{id}"),
            path,
            initial,
        }
    }

    /// The live secret at the provider: the test oracle.
    pub fn live(&self) -> String {
        self.sim.secret_of(self.id).expect("subscription exists")
    }

    /// Vault's entry for the subscription.
    pub async fn entry(&self) -> serde_json::Value {
        self.vault
            .kv1_read(&self.path)
            .await
            .expect("an entry is published")
    }

    pub fn stats(&self) -> ReceiverStats {
        self.receiver.stats("fintoro/801")
    }

    /// Every secret that passed through, for the leak check.
    pub fn secrets(&self) -> Vec<String> {
        vec![
            self.initial.clone(),
            self.live(),
            FINTORO_TOKEN.to_string(),
            self.vault.root_token().to_string(),
        ]
    }

    pub fn assert_no_leak(&self, extra: &[&str]) {
        let mut all = self.secrets();
        all.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.rekey.assert_no_leak(&refs);
    }
}
