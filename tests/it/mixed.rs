//! One config holding a Fintoro, a Monite and a Storno account side by side: each
//! rotates, publishes, confirms by its own provider's evidence and retires.

use rekey::sandbox::fintoro::{FintoroSim, FintoroSimOptions};
use rekey::sandbox::monite::{MoniteSim, MoniteSimOptions};
use rekey::sandbox::storno::{StornoSim, StornoSimOptions};
use serde_json::json;

use crate::support::rekey::{LONGEST_DELIVERY, ProviderConf, Rekey, assert_exit};
use crate::support::rvault::RustyVault;
use crate::support::util::s;
use crate::support::world::{FINTORO_TOKEN, Sim, evidence_counts_for, receiver_for};

/// The `[[providers]]` block for `conf`, named `name`, and its credential files.
fn block(rekey: &Rekey, name: &str, conf: ProviderConf) -> String {
    for (file, content) in &conf.files {
        std::fs::write(rekey.path().join(file), content).expect("credential file");
    }
    format!(
        "\n[[providers]]\nname = \"{name}\"\nkind = \"{}\"\nbase_url = \"{}\"\n{}\ntimeout = \"2s\"\n",
        conf.kind,
        conf.base_url,
        conf.lines.join("\n")
    )
}

#[tokio::test]
async fn fintoro_monite_and_storno_accounts_rotate_side_by_side_in_one_config() {
    let vault = RustyVault::start().await;
    let receiver = receiver_for(&vault).await;
    let fintoro = FintoroSim::start(FintoroSimOptions {
        token: FINTORO_TOKEN.into(),
        ..Default::default()
    })
    .await
    .expect("fintoro");
    let monite = MoniteSim::start(MoniteSimOptions::default())
        .await
        .expect("monite");
    let storno = StornoSim::start(StornoSimOptions::default())
        .await
        .expect("storno");

    // One subscription each, published and routed to the verifying receiver.
    async fn adopt<S: Sim>(
        sim: &S,
        vault: &RustyVault,
        receiver: &rekey::sandbox::receiver::Receiver,
        account: &str,
    ) -> (String, String, String) {
        let (id, secret) = sim.add("http://127.0.0.1:9/unrouted");
        let path = format!("webhooks/{}/{id}", S::KIND);
        assert!(sim.set_url(&id, &receiver.register(&format!("{}/{id}", S::KIND), &path)));
        vault.kv1_write(&path, json!({ "current": secret })).await;
        (format!("{account}/{id}"), id.to_string(), path)
    }
    let f = adopt(&fintoro, &vault, &receiver, "f").await;
    let m = adopt(&monite, &vault, &receiver, "m").await;
    let st = adopt(&storno, &vault, &receiver, "s").await;

    let rekey = Rekey::for_vault(&vault.addr(), vault.root_token());
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n\n[vault]\naddress = \"{}\"\ntoken_file = \"vault.token\"\n\
         mount = \"secret\"\nkv_version = 1\ntimeout = \"5s\"\n\n[[policies]]\nname = \"p\"\n\
         every = \"30d\"\nconfirm_timeout = \"1h\"\nconfirm_poll = \"1s\"\n",
        vault.addr()
    );
    toml.push_str(&block(&rekey, "f", fintoro.provider_conf()));
    toml.push_str(&block(&rekey, "m", monite.provider_conf()));
    toml.push_str(&block(&rekey, "s", storno.provider_conf()));
    for (account, (_, id, path)) in [("f", &f), ("m", &m), ("s", &st)] {
        toml.push_str(&format!(
            "\n[[subscriptions]]\nprovider = \"{account}\"\nid = \"{id}\"\npolicy = \"p\"\nvault_path = \"{path}\"\n"
        ));
    }
    std::fs::write(&rekey.config, toml).expect("config");
    assert_exit(&rekey.run(&["check-config"]).await, 0);

    assert_exit(
        &rekey
            .once(&["--force", &f.0, "--force", &m.0, "--force", &st.0])
            .await,
        0,
    );
    // Storno confirmed at once with its test delivery; the others wait for traffic.
    assert_eq!(s(&rekey.state_of(&st.0).await, "state"), "idle");
    assert_eq!(s(&rekey.state_of(&f.0).await, "state"), "confirming");
    assert_eq!(s(&rekey.state_of(&m.0).await, "state"), "confirming");
    // Deliveries that count as evidence: past each publication and clock bound.
    evidence_counts_for(&rekey, &f.0, &fintoro, LONGEST_DELIVERY).await;
    evidence_counts_for(&rekey, &m.0, &monite, LONGEST_DELIVERY).await;
    let fid: u64 = f.1.parse().expect("fintoro id");
    assert!(fintoro.deliver(fid, "clients.created").await.success);
    assert!(
        monite
            .deliver(&m.1, "updated")
            .await
            .expect("d")
            .was_successful
    );
    assert_exit(&rekey.once(&[]).await, 0);

    for (name, path, live) in [
        (&f.0, &f.2, Sim::secret_of(&fintoro, &fid)),
        (&m.0, &m.2, Sim::secret_of(&monite, &m.1)),
        (&st.0, &st.2, Sim::secret_of(&storno, &st.1)),
    ] {
        assert_eq!(s(&rekey.state_of(name).await, "state"), "idle", "{name}");
        let entry = vault.kv1_read(path).await.expect("entry");
        assert_eq!(Some(s(&entry, "current")), live, "{name}");
        assert!(entry.get("previous").is_none(), "{name}: retired");
    }
    let history = rekey.history(&m.0).await;
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("Monite delivery"))
    );
    let history = rekey.history(&f.0).await;
    assert!(
        history
            .iter()
            .any(|h| s(h, "detail").contains("lastSuccessAt"))
    );
}
