//! The simulated world outside rekey: provider accounts answering rekey's real HTTP
//! clients through an in-process [`Transport`], the receivers that verify each
//! delivery against what the secret store published, and the store itself. Everything
//! here runs on virtual time and knows the truth rekey cannot see — which secret signed
//! each delivery, which secret is live — so the invariants can be checked against it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey::clock::VirtualClock;
use rekey::config::ProviderKind;
use rekey::provider::{RawResponse, Transport, TransportError};
use rekey::secret::{ExposeSecret, secret};
use rekey::store::{Entry, Expect, SecretStore, StoreError, Versioned};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How a provider account misbehaves at the moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability that a request fails (with one of the kinds below).
    pub rate: f64,
    /// Whether the account answers 429 (some with `Retry-After`) among its failures.
    pub throttle: bool,
    /// Whether an answer can be lost after the provider acted (timeouts, cut
    /// connections, truncated or garbage rotate answers).
    pub lose_answers: bool,
}

/// What the store does at the moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreMode {
    #[default]
    Up,
    Down,
    Sealed,
    Forbidden,
}

/// A subscription at a provider, as only the provider knows it.
#[derive(Debug)]
pub struct RemoteSub {
    pub id: String,
    /// Vault path receivers of this subscription read (the scenario's truth, not
    /// rekey's config: a path changed in rekey's config is a different receiver).
    pub receiver_path: String,
    /// Every secret this subscription was live with, from when.
    pub live: Vec<(DateTime<Utc>, String)>,
    /// Deliveries are sent every `interval`, each taking its own time.
    pub interval: Duration,
    pub slow: bool,
    /// The receiver reloads the store's entry this long after it changes.
    pub receiver_lag: Duration,
    /// Deliveries sent on request (Storno retries, tests), beside the regular ones.
    pub extra: Vec<Delivery>,
    pub rotate_in_flight: u32,
    /// Set while a rotation made outside rekey is not reconciled yet.
    pub drifted_since: Option<DateTime<Utc>>,
    pub created: DateTime<Utc>,
    pub listed: bool,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub sent: DateTime<Utc>,
    pub took: Duration,
    pub signer: String,
    pub ok: bool,
}

impl Delivery {
    pub fn done(&self) -> DateTime<Utc> {
        self.sent + chrono::Duration::from_std(self.took).unwrap_or_default()
    }
}

pub struct Account {
    pub kind: ProviderKind,
    pub name: String,
    /// The provider's clock runs this far ahead of true time.
    pub skew: chrono::Duration,
    pub latency: (u64, u64),
    pub limit: (u32, Duration),
    bucket: (f64, DateTime<Utc>),
    pub faults: Faults,
    pub subs: BTreeMap<String, RemoteSub>,
    /// Requests per (subscription id or "-", day number).
    pub per_day: HashMap<(String, i64), u32>,
    monite_tokens: HashMap<String, DateTime<Utc>>,
    next_token: u64,
}

/// One version of a store entry, and when it was written (true time).
#[derive(Debug, Clone)]
pub struct StoreVersion {
    pub at: DateTime<Utc>,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub rotation_id: String,
}

#[derive(Default)]
pub struct StoreModel {
    pub mode: StoreMode,
    pub paths: BTreeMap<String, Vec<StoreVersion>>,
}

pub struct Inner {
    pub rng: StdRng,
    pub accounts: BTreeMap<String, Account>,
    pub store: StoreModel,
    pub violations: Vec<String>,
    pub clock: Option<Arc<VirtualClock>>,
    pub requests: u64,
    pub rotations: u64,
    pub retired_with_evidence: u64,
    /// Retire writes not yet compared with rekey's history: (path, rotation, evidence).
    pub retires: Vec<(String, String, bool)>,
    pub seed: u64,
    /// Requests per route (`GET /webhooks/{id}`), for the report.
    pub by_route: BTreeMap<String, u64>,
}

/// The world: shared by every transport and the store, outliving rekey's crashes.
pub struct World {
    pub inner: Mutex<Inner>,
    pub seed: u64,
}

/// Requests per subscription per simulated day above which rekey is flooding.
pub const MAX_REQUESTS_PER_SUB_DAY: u32 = 400;

fn new_secret(rng: &mut StdRng, kind: ProviderKind) -> String {
    let body: String = (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect();
    match kind {
        ProviderKind::Fintoro => format!("whsec_{body}"),
        ProviderKind::Monite => format!("mnt_{body}"),
        ProviderKind::Storno => format!("sk_{body}"),
    }
}

fn hash(parts: &[u64]) -> u64 {
    // SplitMix64 over the parts: cheap, and the same on every machine.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for p in parts {
        x ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(x << 6);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    }
    x
}

fn str_hash(s: &str) -> u64 {
    hash(&s.bytes().map(u64::from).collect::<Vec<_>>())
}

impl Account {
    /// Starts the provider-side rate check afresh (a full bucket).
    pub fn reset_bucket(&mut self, now: DateTime<Utc>) {
        self.bucket = (f64::from(self.limit.0), now);
    }
}

impl RemoteSub {
    pub fn live_at(&self, t: DateTime<Utc>) -> &str {
        self.live
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .or(self.live.first())
            .map(|(_, s)| s.as_str())
            .unwrap_or("")
    }

    pub fn live_now(&self) -> &str {
        self.live.last().map(|(_, s)| s.as_str()).unwrap_or("")
    }

    /// The regular delivery number `k`: sent at a jittered multiple of the interval.
    fn regular(&self, seed: u64, k: i64, store: &StoreModel) -> Delivery {
        let step = self.interval.as_millis() as i64;
        let h = hash(&[seed, str_hash(&self.id), k as u64]);
        let jitter = (h % (step as u64 / 2 + 1)) as i64;
        let sent = self.created + chrono::Duration::milliseconds(k * step + jitter);
        let took = if self.slow && h.is_multiple_of(5) {
            Duration::from_millis(2_000 + (h >> 8) % 8_000)
        } else {
            Duration::from_millis(20 + (h >> 8) % 400)
        };
        let signer = self.live_at(sent).to_string();
        let ok = self.accepts(store, sent, &signer);
        Delivery {
            id: format!("{}-{k}", self.id),
            sent,
            took,
            signer,
            ok,
        }
    }

    /// Whether the receiver, which sees the store `receiver_lag` late, verifies a
    /// delivery signed with `signer` that arrives at `t`.
    pub fn accepts(&self, store: &StoreModel, t: DateTime<Utc>, signer: &str) -> bool {
        let seen = t - chrono::Duration::from_std(self.receiver_lag).unwrap_or_default();
        let Some(versions) = store.paths.get(&self.receiver_path) else {
            return false;
        };
        versions
            .iter()
            .rev()
            .find(|v| v.at <= seen)
            .is_some_and(|v| {
                v.current.as_deref() == Some(signer) || v.previous.as_deref() == Some(signer)
            })
    }

    /// The deliveries sent in `[from, to]`, regular and extra, newest first, at most
    /// `limit` of the regular ones (they are made on demand, so only what is asked
    /// for costs anything).
    pub fn deliveries(
        &self,
        seed: u64,
        store: &StoreModel,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<Delivery> {
        let step = self.interval.as_millis() as i64;
        let from = from.max(self.created);
        let first = ((from - self.created).num_milliseconds() / step - 1).max(0);
        let last = (to - self.created).num_milliseconds() / step;
        let mut out: Vec<Delivery> = (first..=last.max(first))
            .rev()
            .map(|k| self.regular(seed, k, store))
            .filter(|d| d.sent >= from && d.sent <= to)
            .take(limit)
            .collect();
        out.extend(
            self.extra
                .iter()
                .filter(|d| d.sent >= from && d.sent <= to)
                .cloned(),
        );
        out.sort_by_key(|d| std::cmp::Reverse(d.sent));
        out
    }
}

impl World {
    pub fn new(seed: u64) -> Arc<World> {
        Arc::new(World {
            seed,
            inner: Mutex::new(Inner {
                rng: StdRng::seed_from_u64(seed),
                accounts: BTreeMap::new(),
                store: StoreModel::default(),
                violations: Vec::new(),
                clock: None,
                requests: 0,
                rotations: 0,
                retired_with_evidence: 0,
                retires: Vec::new(),
                seed,
                by_route: BTreeMap::new(),
            }),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.lock()
            .clock
            .as_ref()
            .map(|c| c.true_now())
            .expect("a clock is set while rekey runs")
    }

    pub fn violation(&self, what: String) {
        let mut w = self.lock();
        let at = w.clock.as_ref().map(|c| c.true_now());
        w.violations.push(format!(
            "{}: {what}",
            at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ));
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_account(
        &self,
        name: &str,
        kind: ProviderKind,
        skew: chrono::Duration,
        latency: (u64, u64),
        limit: (u32, Duration),
        start: DateTime<Utc>,
    ) {
        let mut w = self.lock();
        w.accounts.insert(
            name.to_string(),
            Account {
                kind,
                name: name.to_string(),
                skew,
                latency,
                limit,
                bucket: (f64::from(limit.0), start),
                faults: Faults::default(),
                subs: BTreeMap::new(),
                per_day: HashMap::new(),
                monite_tokens: HashMap::new(),
                next_token: 0,
            },
        );
    }

    /// A subscription whose first secret is already published at `path` (as an
    /// operator seeds it before handing the subscription to rekey).
    #[allow(clippy::too_many_arguments)]
    pub fn add_sub(
        &self,
        account: &str,
        id: &str,
        path: &str,
        interval: Duration,
        slow: bool,
        receiver_lag: Duration,
        at: DateTime<Utc>,
    ) {
        let mut w = self.lock();
        let kind = w.accounts[account].kind;
        let s = new_secret(&mut w.rng, kind);
        w.store
            .paths
            .entry(path.to_string())
            .or_default()
            .push(StoreVersion {
                at,
                current: Some(s.clone()),
                previous: None,
                rotation_id: "seeded".into(),
            });
        let acct = w.accounts.get_mut(account).expect("account exists");
        acct.subs.insert(
            id.to_string(),
            RemoteSub {
                id: id.to_string(),
                receiver_path: path.to_string(),
                live: vec![(at, s)],
                interval,
                slow,
                receiver_lag,
                extra: Vec::new(),
                rotate_in_flight: 0,
                drifted_since: None,
                created: at,
                listed: true,
            },
        );
    }

    /// Someone rotates `id` outside rekey (drift).
    pub fn rotate_outside(&self, account: &str, id: &str) {
        let now = self.now();
        let mut w = self.lock();
        let kind = w.accounts[account].kind;
        let s = new_secret(&mut w.rng, kind);
        if let Some(sub) = w.accounts.get_mut(account).and_then(|a| a.subs.get_mut(id)) {
            sub.live.push((now, s));
            sub.drifted_since.get_or_insert(now);
        }
    }

    /// The operator's repair of a drift: writes the live secret into `current`.
    pub fn reconcile_drift(&self, account: &str, id: &str) {
        let now = self.now();
        let mut w = self.lock();
        let Some(sub) = w.accounts.get_mut(account).and_then(|a| a.subs.get_mut(id)) else {
            return;
        };
        sub.drifted_since = None;
        let live = sub.live_now().to_string();
        let path = sub.receiver_path.clone();
        w.store.paths.entry(path).or_default().push(StoreVersion {
            at: now,
            current: Some(live),
            previous: None,
            rotation_id: "operator".into(),
        });
    }

    pub fn transport(self: &Arc<World>, account: &str) -> Arc<dyn Transport> {
        Arc::new(SimTransport {
            world: self.clone(),
            account: account.to_string(),
        })
    }

    pub fn store(self: &Arc<World>) -> Arc<dyn SecretStore> {
        Arc::new(SimStore {
            world: self.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------
// The providers, on the wire.

struct SimTransport {
    world: Arc<World>,
    account: String,
}

/// What the provider decided to do with a request before answering.
enum Fate {
    /// Never reached the provider.
    Refused(TransportError),
    /// Answered without acting.
    Answer(StatusCode, Value, Option<u64>),
    /// Acted, then the answer was lost on the way (or came back unreadable).
    Lost(TransportError),
    Garbage,
    Normal,
}

/// Decrements the in-flight rotate count when the exchange ends, even if rekey's
/// runtime is dropped mid-call (a crash).
struct InFlight {
    world: Arc<World>,
    account: String,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut w = self.world.lock();
        if let Some(s) = w
            .accounts
            .get_mut(&self.account)
            .and_then(|a| a.subs.get_mut(&self.id))
        {
            s.rotate_in_flight = s.rotate_in_flight.saturating_sub(1);
        }
    }
}

#[async_trait]
impl Transport for SimTransport {
    async fn execute(
        &self,
        request: reqwest::Request,
        timeout: Duration,
    ) -> Result<RawResponse, TransportError> {
        let method = request.method().as_str().to_string();
        let path = request.url().path().to_string();
        let query: HashMap<String, String> = request.url().query_pairs().into_owned().collect();
        let auth = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (fate, latency, rotate_of) = self.arrive(&method, &path);
        let _guard = rotate_of.map(|id| InFlight {
            world: self.world.clone(),
            account: self.account.clone(),
            id,
        });
        if let Fate::Refused(e) = fate {
            return Err(e);
        }
        let answer = match fate {
            Fate::Answer(status, ref body, retry_after) => Ok((status, body.clone(), retry_after)),
            _ => Err(()),
        };
        let (status, body, retry_after) = match answer {
            Ok(a) => a,
            Err(()) => {
                let (status, body) = self.handle(&method, &path, &query, auth.as_deref());
                (status, body, None)
            }
        };
        let took = Duration::from_millis(latency);
        match fate {
            Fate::Lost(TransportError::Timeout) => {
                tokio::time::sleep(timeout).await;
                return Err(TransportError::Timeout);
            }
            Fate::Lost(e) => {
                tokio::time::sleep(took).await;
                return Err(e);
            }
            _ => {}
        }
        if took >= timeout {
            tokio::time::sleep(timeout).await;
            return Err(TransportError::Timeout);
        }
        tokio::time::sleep(took).await;
        let mut headers = reqwest::header::HeaderMap::new();
        let provider_now = self.provider_now();
        if let Ok(v) = provider_now
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
            .parse()
        {
            headers.insert("date", v);
        }
        if let Some(s) = retry_after
            && let Ok(v) = s.to_string().parse()
        {
            headers.insert("retry-after", v);
        }
        let body = if matches!(fate, Fate::Garbage) {
            bytes::Bytes::from_static(b"{\"data\": {\"secr")
        } else {
            bytes::Bytes::from(body.to_string())
        };
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn rotate_target(kind: ProviderKind, method: &str, path: &str) -> Option<String> {
    if method != "POST" {
        return None;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (kind, parts.as_slice()) {
        (ProviderKind::Fintoro, ["webhook-subscriptions", id, "rotate-secret"])
        | (ProviderKind::Monite, ["webhook_subscriptions", id, "regenerate_secret"])
        | (ProviderKind::Storno, ["webhooks", id, "regenerate-secret"]) => Some(id.to_string()),
        _ => None,
    }
}

impl SimTransport {
    fn provider_now(&self) -> DateTime<Utc> {
        let now = self.world.now();
        let w = self.world.lock();
        now + w.accounts[&self.account].skew
    }

    /// Counts the request, checks the account's limits and decides its fate.
    fn arrive(&self, method: &str, path: &str) -> (Fate, u64, Option<String>) {
        let now = self.world.now();
        let mut violations = Vec::new();
        let mut w = self.world.lock();
        w.requests += 1;
        let route: String = path
            .split('/')
            .map(|p| {
                if p.len() > 2 && p.bytes().any(|b| b.is_ascii_digit()) {
                    "{id}"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        *w.by_route.entry(format!("{method} {route}")).or_default() += 1;
        let inner = &mut *w;
        let acct = inner
            .accounts
            .get_mut(&self.account)
            .expect("account exists");
        let rotate_of = rotate_target(acct.kind, method, path);
        // Which subscription the request is about, for the per-day bound.
        let about = path
            .trim_matches('/')
            .split('/')
            .nth(1)
            .filter(|id| acct.subs.contains_key(*id))
            .unwrap_or("-")
            .to_string();
        let day = (now - DateTime::<Utc>::UNIX_EPOCH).num_days();
        let n = acct.per_day.entry((about.clone(), day)).or_default();
        *n += 1;
        if about != "-" && *n == MAX_REQUESTS_PER_SUB_DAY + 1 {
            violations.push(format!(
                "flood: more than {MAX_REQUESTS_PER_SUB_DAY} requests for {}/{about} in one day",
                self.account
            ));
        }
        // The account's limit, as a token bucket with the configured parameters.
        let (count, per) = acct.limit;
        let per_token = per.as_secs_f64() / f64::from(count);
        let elapsed = (now - acct.bucket.1).num_microseconds().unwrap_or(0) as f64 / 1e6;
        acct.bucket.0 = (acct.bucket.0 + elapsed / per_token).min(f64::from(count));
        acct.bucket.1 = now;
        if acct.bucket.0 < 1.0 - 1e-6 {
            violations.push(format!(
                "rate limit: {} exceeded {count} per {per:?} ({method} {path})",
                self.account
            ));
            drop(w);
            for v in violations {
                self.world.violation(v);
            }
            return (
                Fate::Answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"message": "rate limited"}),
                    Some(per_token.ceil() as u64),
                ),
                5,
                None,
            );
        }
        acct.bucket.0 -= 1.0;
        let (lo, hi) = acct.latency;
        let latency = inner.rng.random_range(lo..=hi);
        let f = acct.faults;
        let fate = if f.rate > 0.0 && inner.rng.random_bool(f.rate.min(1.0)) {
            match inner.rng.random_range(0..6) {
                0 => Fate::Refused(TransportError::Connect("connection refused".into())),
                1 | 2 if f.throttle => Fate::Answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"message": "slow down"}),
                    inner
                        .rng
                        .random_bool(0.5)
                        .then(|| inner.rng.random_range(1..90)),
                ),
                3 if f.lose_answers => Fate::Lost(TransportError::Timeout),
                4 if f.lose_answers => {
                    if inner.rng.random_bool(0.5) {
                        Fate::Lost(TransportError::Broken("connection reset".into()))
                    } else {
                        Fate::Garbage
                    }
                }
                _ => Fate::Answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"message": "unavailable"}),
                    None,
                ),
            }
        } else {
            Fate::Normal
        };
        // A 503 without acting: the provider did not rotate. (Rotating and then
        // answering 5xx is what `Lost` models.)
        let acts = matches!(fate, Fate::Normal | Fate::Lost(_) | Fate::Garbage);
        let mut rotate = None;
        if let Some(id) = &rotate_of
            && acts
            && let Some(sub) = acct.subs.get_mut(id)
        {
            sub.rotate_in_flight += 1;
            if sub.rotate_in_flight > 1 {
                violations.push(format!(
                    "two rotate calls in flight for {}/{id}",
                    self.account
                ));
            }
            rotate = Some(id.clone());
        }
        drop(w);
        for v in violations {
            self.world.violation(v);
        }
        (fate, latency, rotate)
    }

    /// The provider's answer to a request it acts on.
    fn handle(
        &self,
        method: &str,
        path: &str,
        query: &HashMap<String, String>,
        auth: Option<&str>,
    ) -> (StatusCode, Value) {
        let now = self.world.now();
        let seed = self.world.seed;
        let mut w = self.world.lock();
        let inner = &mut *w;
        let acct = inner
            .accounts
            .get_mut(&self.account)
            .expect("account exists");
        let skew = acct.skew;
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let not_found = (StatusCode::NOT_FOUND, json!({"message": "not found"}));
        let kind = acct.kind;
        if kind == ProviderKind::Monite {
            if path == "/auth/token" {
                acct.next_token += 1;
                let tok = format!("tok{}", acct.next_token);
                acct.monite_tokens
                    .insert(tok.clone(), now + chrono::Duration::seconds(900));
                return (
                    StatusCode::OK,
                    json!({"access_token": tok, "expires_in": 900, "token_type": "Bearer"}),
                );
            }
            let tok = auth.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
            if acct.monite_tokens.get(tok).is_none_or(|exp| *exp <= now) {
                return (
                    StatusCode::UNAUTHORIZED,
                    json!({"message": "token expired"}),
                );
            }
        }
        let store = &inner.store;
        match (kind, method, parts.as_slice()) {
            (ProviderKind::Fintoro, "GET", ["whoami"]) => (StatusCode::OK, json!({"id": 1})),
            (ProviderKind::Fintoro, "GET", ["webhook-subscriptions"]) => {
                let data: Vec<Value> = acct
                    .subs
                    .values()
                    .filter(|s| s.listed)
                    .map(|s| json!({"id": s.id.parse::<u64>().unwrap_or(0), "url": "https://r.example/h", "isActive": true}))
                    .collect();
                (StatusCode::OK, json!({"data": data}))
            }
            (ProviderKind::Fintoro, "GET", ["webhook-subscriptions", id]) => {
                let Some(s) = acct.subs.get(*id) else {
                    return not_found;
                };
                // lastSuccessAt/lastFailureAt: completion times, whole seconds, on the
                // provider's clock, of deliveries done by now.
                let recent = s.deliveries(seed, store, now - chrono::Duration::days(1), now, 200);
                let done: Vec<&Delivery> = recent.iter().filter(|d| d.done() <= now).collect();
                let last = |ok: bool| {
                    done.iter()
                        .filter(|d| d.ok == ok)
                        .map(|d| d.done())
                        .max()
                        .map(|t| {
                            let p = t + skew;
                            p.format("%Y-%m-%dT%H:%M:%SZ").to_string()
                        })
                };
                (
                    StatusCode::OK,
                    json!({"id": id.parse::<u64>().unwrap_or(0), "url": "https://r.example/h", "isActive": true,
                           "lastSuccessAt": last(true), "lastFailureAt": last(false), "disabledAt": null}),
                )
            }
            (ProviderKind::Monite, "GET", ["webhook_subscriptions"]) => {
                let data: Vec<Value> = acct
                    .subs
                    .values()
                    .filter(|s| s.listed)
                    .map(|s| json!({"id": s.id, "url": format!("https://r.example/{}", s.id), "status": "enabled"}))
                    .collect();
                (
                    StatusCode::OK,
                    json!({"data": data, "next_pagination_token": null}),
                )
            }
            (ProviderKind::Monite, "GET", ["webhook_subscriptions", id]) => {
                match acct.subs.get(*id) {
                    Some(s) => (
                        StatusCode::OK,
                        json!({"id": s.id, "url": format!("https://r.example/{}", s.id), "status": "enabled"}),
                    ),
                    None => not_found,
                }
            }
            (ProviderKind::Monite, "GET", ["webhook_deliveries"]) => {
                let gte = query
                    .get("created_at__gte")
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&Utc) - skew)
                    .unwrap_or(now - chrono::Duration::days(1));
                let mut data = Vec::new();
                for s in acct.subs.values() {
                    for d in s.deliveries(
                        seed,
                        store,
                        gte.max(now - chrono::Duration::days(3)),
                        now,
                        200,
                    ) {
                        let done = d.done() <= now;
                        data.push(json!({
                            "id": d.id, "url": format!("https://r.example/{}", s.id),
                            "created_at": ts(d.sent + skew),
                            "was_successful": if done { Some(d.ok) } else { None },
                            "response_status_code": if done { Some(if d.ok { 200 } else { 401 }) } else { None },
                        }));
                    }
                }
                (
                    StatusCode::OK,
                    json!({"data": data, "next_pagination_token": null}),
                )
            }
            (ProviderKind::Storno, "GET", ["webhooks"]) => {
                let data: Vec<Value> = acct
                    .subs
                    .values()
                    .filter(|s| s.listed)
                    .map(|s| json!({"id": s.id, "url": "https://r.example/s", "isActive": true}))
                    .collect();
                (StatusCode::OK, json!({"data": data}))
            }
            (ProviderKind::Storno, "GET", ["webhooks", id]) => match acct.subs.get(*id) {
                Some(s) => {
                    let live = s.live_now();
                    let tail = &live[live.len().saturating_sub(8)..];
                    (
                        StatusCode::OK,
                        json!({"data": {"id": s.id, "url": "https://r.example/s", "isActive": true, "secret": format!("***{tail}")}}),
                    )
                }
                None => not_found,
            },
            (ProviderKind::Storno, "GET", ["webhooks", id, "deliveries"]) => {
                let Some(s) = acct.subs.get(*id) else {
                    return not_found;
                };
                let mut all = s.deliveries(seed, store, now - chrono::Duration::days(2), now, 100);
                all.truncate(100);
                let data: Vec<Value> = all
                    .iter()
                    .map(|d| {
                        let done = d.done() <= now;
                        json!({"id": storno_uuid(&d.id), "status": if !done { "pending" } else if d.ok { "success" } else { "failed" },
                               "eventType": "invoice.created", "triggeredAt": ts(d.sent + skew),
                               "completedAt": done.then(|| ts(d.done() + skew)),
                               "durationMs": done.then_some(d.took.as_millis() as u64)})
                    })
                    .collect();
                let total = data.len();
                (
                    StatusCode::OK,
                    json!({"data": data, "meta": {"total": total}}),
                )
            }
            (ProviderKind::Storno, "POST", ["webhooks", id, "deliveries", did, "retry"]) => {
                let Some(s) = acct.subs.get_mut(*id) else {
                    return not_found;
                };
                let signer = s.live_now().to_string();
                let ok = s.accepts(store, now, &signer);
                s.extra.push(Delivery {
                    id: format!("retry-{did}-{}", s.extra.len()),
                    sent: now,
                    took: Duration::from_millis(100),
                    signer,
                    ok,
                });
                (StatusCode::ACCEPTED, json!({"status": "queued"}))
            }
            (ProviderKind::Storno, "POST", ["webhooks", id, "test"]) => {
                let Some(s) = acct.subs.get_mut(*id) else {
                    return not_found;
                };
                let signer = s.live_now().to_string();
                let ok = s.accepts(store, now, &signer);
                s.extra.push(Delivery {
                    id: format!("test-{}", s.extra.len()),
                    sent: now,
                    took: Duration::ZERO,
                    signer,
                    ok,
                });
                (
                    StatusCode::OK,
                    json!({"success": ok, "statusCode": if ok { 200 } else { 401 }}),
                )
            }
            (_, "POST", [_, id, _]) if rotate_target(kind, method, path).is_some() => {
                let s = new_secret(&mut inner.rng, kind);
                inner.rotations += 1;
                let Some(sub) = inner
                    .accounts
                    .get_mut(&self.account)
                    .and_then(|a| a.subs.get_mut(*id))
                else {
                    return not_found;
                };
                sub.live.push((now, s.clone()));
                match kind {
                    ProviderKind::Fintoro => {
                        (StatusCode::OK, json!({"id": 1, "plainTextSecret": s}))
                    }
                    ProviderKind::Monite => (StatusCode::OK, json!({"secret": s})),
                    ProviderKind::Storno => {
                        (StatusCode::OK, json!({"data": {"id": id, "secret": s}}))
                    }
                }
            }
            _ => not_found,
        }
    }
}

/// Storno's delivery ids are uuids; derive a stable one from the model's id.
fn storno_uuid(id: &str) -> String {
    let h = str_hash(id);
    let g = hash(&[h]);
    uuid::Uuid::from_u64_pair(h, g).to_string()
}

// ---------------------------------------------------------------------------------
// The secret store.

struct SimStore {
    world: Arc<World>,
}

impl SimStore {
    fn check(&self, path: &str) -> Result<(), StoreError> {
        let store = "sim-vault".to_string();
        match self.world.lock().store.mode {
            StoreMode::Up => Ok(()),
            StoreMode::Down => Err(StoreError::Unreachable {
                store,
                detail: "connection refused".into(),
            }),
            StoreMode::Sealed => Err(StoreError::Sealed { store }),
            StoreMode::Forbidden => Err(StoreError::Forbidden {
                store,
                path: path.into(),
                detail: "permission denied".into(),
            }),
        }
    }
}

#[async_trait]
impl SecretStore for SimStore {
    fn describe(&self) -> String {
        "sim-vault".into()
    }

    async fn preflight(&self, path: &str) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(3)).await;
        self.check(path)
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.check(path)?;
        let w = self.world.lock();
        let Some(versions) = w.store.paths.get(path) else {
            return Ok(None);
        };
        let Some(v) = versions.last() else {
            return Ok(None);
        };
        let Some(current) = &v.current else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            entry: Entry {
                current: secret(current.clone()),
                previous: v.previous.clone().map(secret),
                rotated_at: v.at,
                rotation_id: v.rotation_id.clone(),
                provider: "sim".into(),
                subscription: path.into(),
            },
            version: Some(versions.len() as u64),
        }))
    }

    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(3)).await;
        self.check(path)?;
        let now = self.world.now();
        let mut w = self.world.lock();
        let versions = w.store.paths.entry(path.to_string()).or_default();
        let have = versions.len() as u64;
        let ok = match expect {
            Expect::Absent => versions.is_empty(),
            Expect::Version(v) => v.is_none_or(|v| v == have),
        };
        if !ok {
            return Err(StoreError::Conflict {
                store: "sim-vault".into(),
                path: path.into(),
            });
        }
        let current = entry.current.expose_secret().to_string();
        let previous = entry
            .previous
            .as_ref()
            .map(|p| p.expose_secret().to_string());
        let retiring = previous.is_none()
            && versions
                .last()
                .is_some_and(|v| v.previous.is_some() && v.current.as_deref() == Some(&current));
        versions.push(StoreVersion {
            at: now,
            current: Some(current.clone()),
            previous,
            rotation_id: entry.rotation_id.clone(),
        });
        if retiring {
            let evidence = evidence_for(&w, path, &current, now);
            drop(w);
            self.world.note_retire(path, &entry.rotation_id, evidence);
        }
        Ok(())
    }
}

/// Whether a delivery signed with `secret` succeeded by `now` for the subscription
/// whose receivers read `path`.
fn evidence_for(w: &Inner, path: &str, secret: &str, now: DateTime<Utc>) -> bool {
    w.accounts
        .values()
        .flat_map(|a| a.subs.values())
        .filter(|s| s.receiver_path == path)
        .any(|s| {
            let Some(since) = s.live.iter().find(|(_, x)| x == secret).map(|(t, _)| *t) else {
                return false;
            };
            s.deliveries(w.seed, &w.store, since, now, usize::MAX)
                .iter()
                .any(|d| d.signer == secret && d.ok && d.done() <= now)
        })
}

impl World {
    /// Starts a delivery now, signed with the live secret, taking `took`.
    pub fn slow_delivery(&self, account: &str, id: &str, took: Duration) {
        let now = self.now();
        let mut w = self.lock();
        let inner = &mut *w;
        let Some(s) = inner
            .accounts
            .get_mut(account)
            .and_then(|a| a.subs.get_mut(id))
        else {
            return;
        };
        let signer = s.live_now().to_string();
        // Receivers verify on arrival, which is now: the secret is current there.
        let ok = s.accepts(&inner.store, now, &signer);
        s.extra.push(Delivery {
            id: format!("slow-{}", s.extra.len()),
            sent: now,
            took,
            signer,
            ok,
        });
    }

    /// A retire write: recorded so the checker can compare it with rekey's reason.
    fn note_retire(&self, path: &str, rotation_id: &str, evidence: bool) {
        let mut w = self.lock();
        if evidence {
            w.retired_with_evidence += 1;
        }
        w.retires
            .push((path.to_string(), rotation_id.to_string(), evidence));
    }
}
