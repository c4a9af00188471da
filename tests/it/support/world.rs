//! One scenario's world: a RustyVault, a provider simulator with one subscription
//! whose secret is already published (as in any real deployment), a receiver that
//! verifies deliveries against Vault, and a rekey config pointing at all of them.
//!
//! The world is generic over the simulator ([`Sim`]), so each provider's scenarios
//! get the same Vault, receiver and leak checks; [`World`] is the Fintoro one.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use rekey::config::{KvVersion, VaultAuth, VaultSettings};
use rekey::sandbox::faults::FaultKind;
use rekey::sandbox::fintoro::{self, FintoroSim, FintoroSimOptions};
use rekey::sandbox::monite::{self, MoniteSim, MoniteSimOptions};
use rekey::sandbox::receiver::{Receiver, ReceiverStats};
use rekey::sandbox::storno::{self, StornoSim, StornoSimOptions};
use rekey::secret::secret;
use rekey::store::{SecretStore, VaultStore};
use serde_json::json;

use super::rekey::{LONGEST_DELIVERY, PROVIDER, ProviderConf, Rekey, Setup, Store};
use super::rvault::RustyVault;
use super::util::until_evidence_counts;

pub const FINTORO_TOKEN: &str = "fintoro-company-token-0123456789";

/// What a scenario needs from a provider simulator. `Send + Sync + 'static`, so a
/// generic scenario can run on its own task (the crash matrix runs several at once).
pub trait Sim: Sized + Send + Sync + 'static {
    type Id: Clone + Display + Send + Sync + 'static;
    /// The simulator's API routes, for fault injection and request counts.
    type Route: Copy + std::fmt::Debug + Send + Sync + 'static;
    /// The route prefix (and Vault path segment) naming the signing scheme.
    const KIND: &'static str;
    /// The rotate call's route.
    const ROTATE: Self::Route;
    /// How finely the provider stamps the deliveries rekey reads as evidence.
    const STAMP_RESOLUTION: TimeDelta;
    /// Creates a subscription delivering to `url`: its id and initial secret.
    fn add(&self, url: &str) -> (Self::Id, String);
    /// Points the subscription at `url` (no rotation).
    fn set_url(&self, id: &Self::Id, url: &str) -> bool;
    /// The live secret at the provider: the test oracle.
    fn secret_of(&self, id: &Self::Id) -> Option<String>;
    /// The `[[providers]]` entry that points rekey at this simulator.
    fn provider_conf(&self) -> ProviderConf;
    /// Credentials that must never appear in rekey's output.
    fn credentials(&self) -> Vec<String>;
    /// One signed delivery of an ordinary event now, a single attempt: whether the
    /// receiver accepted it. (Each provider logs it where rekey looks for evidence.)
    fn deliver_event(&self, id: &Self::Id) -> impl Future<Output = bool> + Send;
    /// Rotations the provider committed for the subscription (whether or not their
    /// response reached rekey).
    fn rotations(&self, id: &Self::Id) -> u32;
    /// Logged deliveries that failed and were not delivered since; `None` where
    /// rekey cannot ask the provider to redeliver (only Storno has a retry endpoint).
    fn undelivered(&self, _id: &Self::Id) -> Option<usize> {
        None
    }
    /// Queues `kind` for the next request on `route`.
    fn inject_fault(&self, route: Self::Route, kind: FaultKind);
    /// Requests received on `route` so far.
    fn requests(&self, route: Self::Route) -> u64;
    /// How far the simulator's clock runs ahead of this host's.
    fn clock_skew(&self) -> TimeDelta;
    /// Makes the next active probe fail as refused (Storno's test delivery), so that
    /// only logged deliveries can confirm; nothing where the provider has none.
    fn refuse_probe(&self) {}
}

impl Sim for FintoroSim {
    type Id = u64;
    type Route = fintoro::Route;
    const KIND: &'static str = "fintoro";
    const ROTATE: fintoro::Route = fintoro::Route::Rotate;
    // `lastSuccessAt` and `lastFailureAt` have whole seconds.
    const STAMP_RESOLUTION: TimeDelta = TimeDelta::seconds(1);
    fn add(&self, url: &str) -> (u64, String) {
        self.add_subscription(url)
    }
    fn set_url(&self, id: &u64, url: &str) -> bool {
        FintoroSim::set_url(self, *id, url)
    }
    fn secret_of(&self, id: &u64) -> Option<String> {
        FintoroSim::secret_of(self, *id)
    }
    fn provider_conf(&self) -> ProviderConf {
        ProviderConf::fintoro(&self.base_url(), FINTORO_TOKEN)
    }
    fn credentials(&self) -> Vec<String> {
        vec![FINTORO_TOKEN.to_string()]
    }
    async fn deliver_event(&self, id: &u64) -> bool {
        self.deliver(*id, "clients.updated").await.success
    }
    fn rotations(&self, id: &u64) -> u32 {
        self.rotation_count(*id)
    }
    fn inject_fault(&self, route: fintoro::Route, kind: FaultKind) {
        self.inject(fintoro::Fault { route, kind });
    }
    fn requests(&self, route: fintoro::Route) -> u64 {
        self.request_count(route)
    }
    fn clock_skew(&self) -> TimeDelta {
        self.options().clock_skew
    }
}

impl Sim for MoniteSim {
    type Id = String;
    type Route = monite::Route;
    const KIND: &'static str = "monite";
    const ROTATE: monite::Route = monite::Route::Rotate;
    // Creation times are compared at full precision (`created_at__gte`).
    const STAMP_RESOLUTION: TimeDelta = TimeDelta::microseconds(1);
    fn add(&self, url: &str) -> (String, String) {
        self.add_subscription(url)
    }
    fn set_url(&self, id: &String, url: &str) -> bool {
        MoniteSim::set_url(self, id, url)
    }
    fn secret_of(&self, id: &String) -> Option<String> {
        MoniteSim::secret_of(self, id)
    }
    fn provider_conf(&self) -> ProviderConf {
        let o = self.options();
        ProviderConf::monite(
            &self.base_url(),
            &o.client_id,
            &o.client_secret,
            &o.entity_id,
        )
    }
    fn credentials(&self) -> Vec<String> {
        vec![self.options().client_secret.clone()]
    }
    async fn deliver_event(&self, id: &String) -> bool {
        self.deliver(id, "updated")
            .await
            .is_some_and(|d| d.was_successful)
    }
    fn rotations(&self, id: &String) -> u32 {
        self.rotation_count(id)
    }
    fn inject_fault(&self, route: monite::Route, kind: FaultKind) {
        self.inject(monite::Fault { route, kind });
    }
    fn requests(&self, route: monite::Route) -> u64 {
        self.request_count(route)
    }
    fn clock_skew(&self) -> TimeDelta {
        self.options().clock_skew
    }
}

impl Sim for StornoSim {
    type Id = String;
    type Route = storno::Route;
    const KIND: &'static str = "storno";
    const ROTATE: storno::Route = storno::Route::Rotate;
    // `completedAt` and `durationMs` have milliseconds.
    const STAMP_RESOLUTION: TimeDelta = TimeDelta::milliseconds(1);
    fn add(&self, url: &str) -> (String, String) {
        self.add_endpoint(url)
    }
    fn set_url(&self, id: &String, url: &str) -> bool {
        StornoSim::set_url(self, id, url)
    }
    fn secret_of(&self, id: &String) -> Option<String> {
        StornoSim::secret_of(self, id)
    }
    fn provider_conf(&self) -> ProviderConf {
        let o = self.options();
        ProviderConf::storno(&self.base_url(), &o.api_key, &o.company)
    }
    fn credentials(&self) -> Vec<String> {
        let o = self.options();
        vec![o.api_key.clone(), o.jwt.clone()]
    }
    async fn deliver_event(&self, id: &String) -> bool {
        self.deliver(id, "invoice.created")
            .await
            .is_some_and(|d| d.status == "success")
    }
    fn rotations(&self, id: &String) -> u32 {
        self.rotation_count(id)
    }
    fn undelivered(&self, id: &String) -> Option<usize> {
        Some(
            self.deliveries()
                .iter()
                .filter(|d| d.webhook_id == *id && d.status != "success")
                .count(),
        )
    }
    fn inject_fault(&self, route: storno::Route, kind: FaultKind) {
        self.inject(storno::Fault { route, kind });
    }
    fn requests(&self, route: storno::Route) -> u64 {
        self.request_count(route)
    }
    fn clock_skew(&self) -> TimeDelta {
        self.options().clock_skew
    }
    fn refuse_probe(&self) {
        // Not retried (a 403 is an answer), so one fault fails one check.
        self.inject(storno::Fault {
            route: storno::Route::Test,
            kind: FaultKind::Status(403),
        });
    }
}

/// Waits until a delivery by `sim` made from now on counts as evidence for the
/// newest publication of `sub` (at once if there was none): see
/// [`until_evidence_counts`].
pub async fn evidence_counts_for<S: Sim>(
    rekey: &Rekey,
    sub: &str,
    sim: &S,
    longest_delivery: Duration,
) {
    if let Some(published) = rekey.published_at(sub).await {
        until_evidence_counts(
            published,
            sim.clock_skew(),
            S::STAMP_RESOLUTION,
            longest_delivery,
        )
        .await;
    }
}

pub struct ProviderWorld<S: Sim> {
    pub vault: RustyVault,
    pub sim: S,
    pub receiver: Receiver,
    pub rekey: Rekey,
    pub id: S::Id,
    /// `<provider>/<id>`.
    pub name: String,
    pub path: String,
    /// The receiver route (`<kind>/<id>`).
    pub route: String,
    /// The secret the subscription had before rekey touched it.
    pub initial: String,
}

/// The Fintoro world most scenarios use.
pub type World = ProviderWorld<FintoroSim>;

/// A Vault-backed secret store for the receiver, reading what rekey publishes.
pub async fn receiver_for(vault: &RustyVault) -> Receiver {
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
    Receiver::start(store).await.expect("start the receiver")
}

impl World {
    pub async fn new() -> World {
        Self::with_policy(None).await
    }

    /// `policy`: the body of the `[[policies]]` entry, if not the default.
    pub async fn with_policy(policy: Option<&str>) -> World {
        let sim = FintoroSim::start(FintoroSimOptions {
            token: FINTORO_TOKEN.into(),
            ..Default::default()
        })
        .await
        .expect("start the Fintoro simulator");
        ProviderWorld::build(sim, policy, |c| c).await
    }
}

impl ProviderWorld<MoniteSim> {
    pub async fn monite(opts: MoniteSimOptions, policy: Option<&str>) -> Self {
        let sim = MoniteSim::start(opts)
            .await
            .expect("start the Monite simulator");
        ProviderWorld::build(sim, policy, |c| c).await
    }
}

impl ProviderWorld<StornoSim> {
    /// `conf` may change the provider entry (e.g. give a JWT instead of the key).
    pub async fn storno(
        opts: StornoSimOptions,
        policy: Option<&str>,
        conf: impl FnOnce(ProviderConf) -> ProviderConf,
    ) -> Self {
        let sim = StornoSim::start(opts)
            .await
            .expect("start the Storno simulator");
        ProviderWorld::build(sim, policy, conf).await
    }
}

impl<S: Sim> ProviderWorld<S> {
    pub async fn build(
        sim: S,
        policy: Option<&str>,
        conf: impl FnOnce(ProviderConf) -> ProviderConf,
    ) -> Self {
        let vault = RustyVault::start().await;
        let receiver = receiver_for(&vault).await;
        // Ids are the provider's to assign, so the subscription is created first and
        // then pointed at its receiver route (as an operator would PATCH it).
        let (id, initial) = sim.add("http://127.0.0.1:9/unrouted");
        let route = format!("{}/{id}", S::KIND);
        let path = format!("webhooks/{}/{id}", S::KIND);
        assert!(sim.set_url(&id, &receiver.register(&route, &path)));
        vault.kv1_write(&path, json!({ "current": initial })).await;
        let mut setup = Setup::with_provider(
            Store::Vault {
                addr: vault.addr(),
                token: vault.root_token().to_string(),
            },
            conf(sim.provider_conf()),
        )
        .subscription(&id, &path);
        if let Some(p) = policy {
            setup = setup.policy(p);
        }
        let rekey = Rekey::new(&setup);
        ProviderWorld {
            vault,
            sim,
            receiver,
            rekey,
            name: format!("{PROVIDER}/{id}"),
            id,
            path,
            route,
            initial,
        }
    }

    pub fn live(&self) -> String {
        self.sim.secret_of(&self.id).expect("subscription exists")
    }

    /// Vault's entry for the subscription.
    pub async fn entry(&self) -> serde_json::Value {
        self.vault
            .kv1_read(&self.path)
            .await
            .expect("an entry is published")
    }

    pub fn stats(&self) -> ReceiverStats {
        self.receiver.stats(&self.route)
    }

    /// Waits until a delivery made from now on counts as evidence for the newest
    /// publication (at once if there was none): see [`until_evidence_counts`].
    pub async fn until_evidence_counts(&self) {
        self.until_evidence_counts_with(LONGEST_DELIVERY).await;
    }

    /// As [`Self::until_evidence_counts`], for a provider configured with another
    /// `longest_delivery`.
    pub async fn until_evidence_counts_with(&self, longest_delivery: Duration) {
        evidence_counts_for(&self.rekey, &self.name, &self.sim, longest_delivery).await;
    }

    /// Every secret that passed through, for the leak check.
    pub fn secrets(&self) -> Vec<String> {
        let mut all = vec![
            self.initial.clone(),
            self.live(),
            self.vault.root_token().to_string(),
        ];
        all.extend(self.sim.credentials());
        all
    }

    pub fn assert_no_leak(&self, extra: &[&str]) {
        let mut all = self.secrets();
        all.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.rekey.assert_no_leak(&refs);
    }
}
