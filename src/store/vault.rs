//! HashiCorp Vault (or any Vault-API server, such as RustyVault) as the secret store:
//! KV v1 and KV v2 (writes with check-and-set against the version read), token or
//! AppRole auth, token renewal, request timeouts always set.
//!
//! This is a small client over reqwest rather than vaultrs: vaultrs deserializes
//! Vault's response envelope strictly (`request_id`, `accessor`, … required), so it
//! cannot read anything from Vault-API servers that leave those out — RustyVault, the
//! server the integration tests run against, among them. Every field read here is
//! optional until rekey actually needs it, and every error names what was wrong.
//!
//! The token is kept valid before *every* call, not only in preflight: a daemon lives
//! through many token TTLs between monthly rotations, and a Vault outage after a mint
//! can outlast one. The expiry is tracked from Vault's own answers (lookup-self,
//! renew-self, login) on monotonic time. A renewable token is renewed once it is past
//! two thirds of its TTL or within `min_token_ttl` of expiry; an AppRole token that
//! cannot be renewed enough is replaced by a new login; a static token that cannot be
//! kept valid is refused with an error saying so, before any call is made with it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use super::{Entry, Expect, SecretStore, StoreError, Versioned};
use crate::config::{KvVersion, VaultAuth, VaultSettings};
use crate::http_body::BodyError;
use crate::secret::{ExposeSecret, SecretString, secret};

/// Where the store reads monotonic time: tokio's clock by default, so a paused runtime
/// (the simulation) controls it; [`VaultStore::connect_with_clock`] takes another.
pub type MonotonicClock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Vault answers larger than this are refused. Entries and token answers are a few
/// hundred bytes; anything near this is not Vault talking (a proxy's page, a broken
/// server), and reading it whole would let it fill rekey's memory.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A renewable token is renewed once this fraction of its granted TTL has passed, as
/// Vault Agent does: early enough that an outage at that moment still leaves a third.
const RENEW_AFTER_NUM: u32 = 2;
const RENEW_AFTER_DEN: u32 = 3;

/// What is known about how long the token in use lives.
#[derive(Debug, Clone, Copy)]
enum Lifetime {
    /// Not looked up yet (a token from a file, before the first call).
    Unknown,
    /// Vault said TTL 0: the token never expires (root tokens).
    Unlimited,
    Limited {
        /// When the TTL was granted, taken as the moment the request was *sent*: the
        /// expiry estimate then errs early by the round trip, never late.
        granted_at: Instant,
        ttl: Duration,
        renewable: bool,
    },
}

impl Lifetime {
    fn granted(sent_at: Instant, ttl_seconds: u64, renewable: bool) -> Lifetime {
        if ttl_seconds == 0 {
            return Lifetime::Unlimited;
        }
        Lifetime::Limited {
            granted_at: sent_at,
            ttl: Duration::from_secs(ttl_seconds),
            renewable,
        }
    }

    /// Time left at `now`; `None` when unlimited or not known.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        match self {
            Lifetime::Limited {
                granted_at, ttl, ..
            } => Some((*granted_at + *ttl).saturating_duration_since(now)),
            Lifetime::Unknown | Lifetime::Unlimited => None,
        }
    }

    /// Past the renewal fraction of its TTL, or within `margin` of expiry.
    fn wants_refresh(&self, now: Instant, margin: Duration) -> bool {
        match self {
            Lifetime::Limited {
                granted_at, ttl, ..
            } => {
                let renew_at = *granted_at + *ttl * RENEW_AFTER_NUM / RENEW_AFTER_DEN;
                now >= renew_at || self.remaining(now).is_some_and(|left| left < margin)
            }
            Lifetime::Unknown => true,
            Lifetime::Unlimited => false,
        }
    }

    /// Renewing makes sense: renewable and not yet expired (renewing an expired token
    /// would be a call made with an expired token, and Vault refuses it anyway).
    fn renewable_at(&self, now: Instant) -> bool {
        matches!(
            self,
            Lifetime::Limited {
                renewable: true,
                ..
            }
        ) && self.remaining(now).is_some_and(|left| !left.is_zero())
    }
}

/// How long the token must still be valid for what comes next, and which setting says so
/// (named in the error when it cannot be).
#[derive(Debug, Clone, Copy)]
struct Need {
    time: Duration,
    setting: &'static str,
}

/// The token in use.
struct Token {
    value: SecretString,
    life: Lifetime,
    /// Bumped whenever the token is replaced, so a call that saw its token refused can
    /// tell whether another call has already logged in again.
    generation: u64,
}

/// What `auth/token/lookup-self` said about the token.
enum Lookup {
    Alive,
    /// Refused: expired or revoked. Vault's message.
    Dead(String),
}

/// The Vault secret store: a client shared with the task that keeps its token alive.
pub struct VaultStore {
    client: Arc<Client>,
    keeper: tokio::task::AbortHandle,
}

impl Drop for VaultStore {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// How often the keep-alive task looks at the token (see [`keep_alive`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAlivePacing {
    /// Before the first look at a token nothing has asked about yet: long enough that
    /// a short CLI command never makes one.
    pub first_look: Duration,
    /// Never sooner than this after the last attempt, so a token that renewal cannot
    /// extend (at its max TTL) or a Vault that fails is not asked in a loop.
    pub cooldown: Duration,
}

impl Default for KeepAlivePacing {
    fn default() -> Self {
        KeepAlivePacing {
            first_look: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
        }
    }
}

struct Client {
    settings: VaultSettings,
    http: reqwest::Client,
    token: RwLock<Token>,
    /// Serialises lookups, renewals and logins, so concurrent calls share one instead
    /// of each renewing (or logging in) on its own.
    refresh: Mutex<()>,
    clock: MonotonicClock,
    /// Vault's clock offset from this host's, from each answer's `Date`: token TTLs
    /// are relative, but an operator reading Vault's audit log next to rekey's
    /// journal needs to know the clocks agree.
    skew: crate::skew::SkewMeter,
}

/// A Vault answer: status and JSON body (`Null` when empty or not JSON).
struct Answer {
    status: StatusCode,
    body: Value,
}

impl VaultStore {
    /// Builds the client and logs in (AppRole) if configured. Does not otherwise contact
    /// Vault: reachability is the preflight's job.
    pub async fn connect(settings: &VaultSettings) -> Result<VaultStore, StoreError> {
        VaultStore::connect_with_clock(settings, Arc::new(Instant::now)).await
    }

    /// [`VaultStore::connect`] with token expiry measured on `clock`.
    pub async fn connect_with_clock(
        settings: &VaultSettings,
        clock: MonotonicClock,
    ) -> Result<VaultStore, StoreError> {
        VaultStore::connect_paced(settings, clock, KeepAlivePacing::default()).await
    }

    pub(crate) async fn connect_paced(
        settings: &VaultSettings,
        clock: MonotonicClock,
        pacing: KeepAlivePacing,
    ) -> Result<VaultStore, StoreError> {
        let token = match &settings.auth {
            VaultAuth::Token(t) => t.clone(),
            VaultAuth::AppRole { .. } => secret(String::new()),
        };
        let client = Arc::new(Client {
            settings: settings.clone(),
            http: http_client(settings)?,
            token: RwLock::new(Token {
                value: token,
                life: Lifetime::Unknown,
                generation: 0,
            }),
            refresh: Mutex::new(()),
            clock,
            skew: crate::skew::SkewMeter::new("vault"),
        });
        if client.is_approle() {
            client.login().await?;
        }
        let keeper = tokio::spawn(keep_alive(Arc::downgrade(&client), pacing)).abort_handle();
        Ok(VaultStore { client, keeper })
    }
}

impl Client {
    fn describe(&self) -> String {
        describe(&self.settings)
    }

    fn url(&self, api_path: &str) -> String {
        format!("{}/v1/{api_path}", self.settings.address)
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    fn is_approle(&self) -> bool {
        matches!(self.settings.auth, VaultAuth::AppRole { .. })
    }

    async fn current(&self) -> (SecretString, u64) {
        let t = self.token.read().await;
        (t.value.clone(), t.generation)
    }

    async fn life(&self) -> Lifetime {
        self.token.read().await.life
    }

    /// One request with a token kept valid for it. Never retried here (the rotation
    /// state machine owns retries, so every attempt is recorded) — except once, after a
    /// new AppRole login, when Vault refused a token that turned out to be dead.
    async fn call(
        &self,
        method: Method,
        api_path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, StoreError> {
        self.ensure_token(self.call_need()).await?;
        let (token, generation) = self.current().await;
        let a = self
            .exchange(method.clone(), api_path, body, Some(&token))
            .await?;
        if !matches!(a.status.as_u16(), 401 | 403) {
            return Ok(a);
        }
        match self.after_refusal(generation).await? {
            Some(fresh) => self.exchange(method, api_path, body, Some(&fresh)).await,
            None => Ok(a),
        }
    }

    /// One HTTP exchange, exactly as given; the answer's body read up to
    /// [`MAX_ANSWER_BYTES`].
    async fn exchange(
        &self,
        method: Method,
        api_path: &str,
        body: Option<&Value>,
        token: Option<&SecretString>,
    ) -> Result<Answer, StoreError> {
        let mut req = self.http.request(method, self.url(api_path));
        if let Some(t) = token.filter(|t| !t.expose_secret().is_empty()) {
            let mut value =
                HeaderValue::from_str(t.expose_secret()).map_err(|_| StoreError::Auth {
                    store: self.describe(),
                    detail: "the token contains characters not allowed in a header".into(),
                })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let sent = chrono::Utc::now();
        let resp = req.send().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: crate::errors::chain(&e),
        })?;
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok());
        self.skew.observe(sent, chrono::Utc::now(), date);
        let status = resp.status();
        let bytes = self.read_capped(api_path, resp).await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body })
    }

    /// The answer's body, refused once it passes [`MAX_ANSWER_BYTES`] (read in chunks:
    /// a missing or lying `Content-Length` does not get past the cap).
    async fn read_capped(
        &self,
        api_path: &str,
        mut resp: reqwest::Response,
    ) -> Result<bytes::Bytes, StoreError> {
        let too_large = || StoreError::Other {
            store: self.describe(),
            detail: format!(
                "Vault response to `{api_path}` larger than {MAX_ANSWER_BYTES} bytes; not read \
                 (not a Vault answer: a proxy or a broken server in the way?)"
            ),
        };
        crate::http_body::read_capped(&mut resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => too_large(),
                BodyError::Read(e) => StoreError::Unreachable {
                    store: self.describe(),
                    detail: format!("reading the answer: {}", crate::errors::chain(&e)),
                },
            })
    }

    /// Maps a non-success answer onto what it means for a rotation.
    fn fail(&self, what: &str, path: &str, a: &Answer) -> StoreError {
        let msg = vault_errors(&a.body);
        let store = self.describe();
        match a.status.as_u16() {
            503 => StoreError::Sealed { store },
            401 => StoreError::Auth {
                store,
                detail: format!("{what}: {msg}"),
            },
            403 => StoreError::Forbidden {
                store,
                path: path.to_string(),
                detail: format!(
                    "{what}: {msg} (token expired or revoked, or no policy for the path)"
                ),
            },
            400 if msg.contains("check-and-set") => StoreError::Conflict {
                store,
                path: path.to_string(),
            },
            code => StoreError::Other {
                store,
                detail: format!("{what} `{path}` answered {code}: {msg}"),
            },
        }
    }

    async fn login(&self) -> Result<(), StoreError> {
        let VaultAuth::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.settings.auth
        else {
            return Ok(());
        };
        let body = json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() });
        let sent = self.now();
        let a = self
            .exchange(
                Method::POST,
                &format!("auth/{mount}/login"),
                Some(&body),
                None,
            )
            .await?;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(StoreError::Sealed {
                store: self.describe(),
            });
        }
        let client_token = a
            .body
            .pointer("/auth/client_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && a.status.is_success());
        let Some(client_token) = client_token else {
            return Err(StoreError::Auth {
                store: self.describe(),
                detail: format!(
                    "AppRole login at auth/{mount} answered {}: {}",
                    a.status,
                    vault_errors(&a.body)
                ),
            });
        };
        let (lease, renewable) = lease_of(&a.body);
        let mut t = self.token.write().await;
        t.value = secret(client_token.to_string());
        t.life = Lifetime::granted(sent, lease, renewable.unwrap_or(false));
        t.generation += 1;
        tracing::info!(store = %self.describe(), ttl_seconds = lease, "logged in with AppRole");
        Ok(())
    }

    /// Asks Vault about the token in use, recording its TTL when it answers.
    async fn lookup_self(&self) -> Result<Lookup, StoreError> {
        let (token, _) = self.current().await;
        let sent = self.now();
        let a = self
            .exchange(Method::GET, "auth/token/lookup-self", None, Some(&token))
            .await?;
        match a.status.as_u16() {
            200 => {
                let data = a.body.get("data").cloned().unwrap_or(Value::Null);
                // ttl 0 means a token that never expires (e.g. root).
                let ttl = data.get("ttl").and_then(Value::as_u64).unwrap_or(0);
                let renewable = data.get("renewable").and_then(Value::as_bool) == Some(true);
                self.token.write().await.life = Lifetime::granted(sent, ttl, renewable);
                Ok(Lookup::Alive)
            }
            400 | 401 | 403 => Ok(Lookup::Dead(format!(
                "token lookup answered {}: {}",
                a.status,
                vault_errors(&a.body)
            ))),
            503 => Err(StoreError::Sealed {
                store: self.describe(),
            }),
            _ => Err(self.fail("token lookup", "auth/token/lookup-self", &a)),
        }
    }

    /// Renews the token in use. A refusal (not renewable after all, or renew-self not
    /// allowed) is not an error here: the token is marked not renewable, and the expiry
    /// check that follows decides whether it still does.
    async fn renew_self(&self) -> Result<(), StoreError> {
        let (token, _) = self.current().await;
        let sent = self.now();
        let a = self
            .exchange(
                Method::POST,
                "auth/token/renew-self",
                Some(&json!({})),
                Some(&token),
            )
            .await?;
        if a.status.is_success() {
            let (lease, renewable) = lease_of(&a.body);
            self.token.write().await.life =
                Lifetime::granted(sent, lease, renewable.unwrap_or(true));
            tracing::info!(store = %self.describe(), ttl_seconds = lease, "renewed the Vault token");
            return Ok(());
        }
        if a.status.is_server_error() {
            return Err(self.fail("token renewal", "auth/token/renew-self", &a));
        }
        tracing::warn!(store = %self.describe(), status = %a.status, error = %vault_errors(&a.body), "the Vault token cannot be renewed");
        if let Lifetime::Limited { renewable, .. } = &mut self.token.write().await.life {
            *renewable = false;
        }
        Ok(())
    }

    /// Makes sure the token is still valid `need.time` from now, renewing it (or
    /// logging in again) when it is past the renewal point. Errors say why it cannot be.
    async fn ensure_token(&self, need: Need) -> Result<(), StoreError> {
        let margin = need.time.max(self.margin());
        if !self.life().await.wants_refresh(self.now(), margin) {
            return Ok(());
        }
        let _one_at_a_time = self.refresh.lock().await;
        if matches!(self.life().await, Lifetime::Unknown)
            && let Lookup::Dead(why) = self.lookup_self().await?
        {
            self.replace_dead_token(why).await?;
        }
        if self.life().await.renewable_at(self.now())
            && self.life().await.wants_refresh(self.now(), margin)
        {
            self.renew_self().await?;
        }
        if !self.is_approle() {
            return self.require(need).await;
        }
        // A new login is always at hand, so AppRole logs in again only for `need`
        // itself (not for `min_token_ttl` on every call, which would mint a token per
        // call for roles whose token_ttl is shorter), and needs no more than a call.
        if self.life().await.wants_refresh(self.now(), need.time) {
            self.login().await?;
        }
        self.require(self.call_need()).await
    }

    /// How close to expiry a renewable token is renewed whatever the call.
    fn margin(&self) -> Duration {
        self.settings.timeout.max(self.settings.min_token_ttl)
    }

    /// What an ordinary call needs of the token: to outlive the call.
    fn call_need(&self) -> Need {
        Need {
            time: self.settings.timeout,
            setting: "vault.timeout",
        }
    }

    /// The token was refused: a new AppRole login replaces it; a static token cannot be.
    async fn replace_dead_token(&self, why: String) -> Result<(), StoreError> {
        if self.is_approle() {
            return self.login().await;
        }
        Err(StoreError::Auth {
            store: self.describe(),
            detail: format!(
                "{why} (the token expired or was revoked; give rekey a new one: token_file or $VAULT_TOKEN)"
            ),
        })
    }

    /// Vault refused the token of a call made with token `generation`. Returns the token
    /// to repeat the call with once, or `None` when the refusal stands (the token is
    /// alive: the path is not allowed to it).
    async fn after_refusal(&self, generation: u64) -> Result<Option<SecretString>, StoreError> {
        let _one_at_a_time = self.refresh.lock().await;
        let (token, now_generation) = self.current().await;
        if now_generation != generation {
            // Another call has already logged in again meanwhile.
            return Ok(Some(token));
        }
        match self.lookup_self().await? {
            Lookup::Alive => Ok(None),
            Lookup::Dead(why) => {
                self.replace_dead_token(why).await?;
                Ok(Some(self.current().await.0))
            }
        }
    }

    /// Fails, naming the problem, when the token will not last `need.time`.
    async fn require(&self, need: Need) -> Result<(), StoreError> {
        let life = self.life().await;
        let Some(left) = life.remaining(self.now()) else {
            return Ok(());
        };
        if left >= need.time {
            return Ok(());
        }
        let needed = format!(
            "less than {} ({})",
            need.setting,
            humantime::format_duration(need.time)
        );
        let detail = if self.is_approle() {
            format!(
                "a new AppRole login gives a token that lives {}, {needed}; raise the role's token_ttl",
                whole_seconds(left)
            )
        } else if left.is_zero() {
            format!(
                "the token has expired and cannot be renewed ({needed} left); give rekey a new token (token_file or $VAULT_TOKEN), or use AppRole"
            )
        } else {
            format!(
                "the token expires in {}, {needed}, and cannot be renewed further (not renewable, or at its max TTL); give rekey a new token (token_file or $VAULT_TOKEN), or use AppRole",
                whole_seconds(left)
            )
        };
        Err(StoreError::Auth {
            store: self.describe(),
            detail,
        })
    }

    /// Seal status, then a token valid for at least `min_token_ttl`.
    async fn check_token(&self) -> Result<(), StoreError> {
        let seal = self
            .exchange(Method::GET, "sys/seal-status", None, None)
            .await?;
        if seal.status == StatusCode::SERVICE_UNAVAILABLE
            || seal.body.get("sealed").and_then(Value::as_bool) == Some(true)
        {
            return Err(StoreError::Sealed {
                store: self.describe(),
            });
        }
        self.ensure_token(Need {
            time: self.settings.min_token_ttl,
            setting: "min_token_ttl",
        })
        .await
    }

    fn data_path(&self, path: &str) -> String {
        match self.settings.kv_version {
            KvVersion::V1 => format!("{}/{path}", self.settings.mount),
            KvVersion::V2 => format!("{}/data/{path}", self.settings.mount),
        }
    }
}

/// Keeps a static renewable token alive while nothing else calls Vault: a daemon whose
/// subscriptions rotate monthly may make no Vault call for longer than the token's TTL,
/// and an expired token cannot be renewed. AppRole needs no keeper (a new login is
/// always at hand), nor does a token that never expires or cannot be renewed. Ends when
/// the store is dropped or nothing is left to keep; never asks Vault twice within
/// `pacing.cooldown`.
async fn keep_alive(client: Weak<Client>, pacing: KeepAlivePacing) {
    let mut wait = pacing.first_look;
    loop {
        tokio::time::sleep(wait).await;
        let Some(c) = client.upgrade() else { return };
        if c.is_approle() || keep_alive_wait(c.life().await, c.now(), c.margin()).is_none() {
            return;
        }
        if let Err(e) = c.ensure_token(c.call_need()).await {
            tracing::warn!(store = %c.describe(), error = %e, "could not keep the Vault token valid; trying again later");
        }
        let Some(next) = keep_alive_wait(c.life().await, c.now(), c.margin()) else {
            return;
        };
        wait = next.max(pacing.cooldown);
    }
}

/// How long until a token needs the keeper's attention: now when not looked up yet;
/// at its renewal point when it is renewable and alive; never otherwise.
fn keep_alive_wait(life: Lifetime, now: Instant, margin: Duration) -> Option<Duration> {
    match life {
        Lifetime::Unknown => Some(Duration::ZERO),
        Lifetime::Limited {
            granted_at,
            ttl,
            renewable: true,
        } if life.remaining(now).is_some_and(|left| !left.is_zero()) => {
            let renew_at = granted_at + ttl * RENEW_AFTER_NUM / RENEW_AFTER_DEN;
            let due = renew_at.min((granted_at + ttl).checked_sub(margin).unwrap_or(now));
            Some(due.saturating_duration_since(now))
        }
        Lifetime::Limited { .. } | Lifetime::Unlimited => None,
    }
}

/// The HTTP client: timeouts always set, no redirects (a token must not follow one),
/// https only for https addresses, the configured CA added.
fn http_client(settings: &VaultSettings) -> Result<reqwest::Client, StoreError> {
    let setup = |detail: String| StoreError::Other {
        store: describe(settings),
        detail,
    };
    let mut http = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .user_agent(concat!("rekey/", env!("CARGO_PKG_VERSION")))
        .https_only(settings.address.starts_with("https://"))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &settings.ca_cert {
        let pem = std::fs::read(ca)
            .map_err(|e| setup(format!("reading ca_cert {}: {e}", ca.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            setup(format!(
                "ca_cert {} is not a PEM certificate: {e}",
                ca.display()
            ))
        })?;
        http = http.add_root_certificate(cert);
    }
    http.build().map_err(|e| setup(e.to_string()))
}

fn whole_seconds(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// `auth.lease_duration` and `auth.renewable` of a login or renewal answer.
fn lease_of(body: &Value) -> (u64, Option<bool>) {
    let auth = body.get("auth");
    let lease = auth
        .and_then(|a| a.get("lease_duration"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let renewable = auth
        .and_then(|a| a.get("renewable"))
        .and_then(Value::as_bool);
    (lease, renewable)
}

fn describe(s: &VaultSettings) -> String {
    let kv = match s.kv_version {
        KvVersion::V1 => "kv v1",
        KvVersion::V2 => "kv v2",
    };
    format!("vault {} ({kv} at {}/)", s.address, s.mount)
}

/// Vault's `{"errors":[…]}` or RustyVault's `{"error":"…"}`, shortened.
fn vault_errors(body: &Value) -> String {
    let from_list = body.get("errors").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("; ")
    });
    let single = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string);
    from_list
        .filter(|s| !s.is_empty())
        .or(single)
        .unwrap_or_else(|| "(no error message)".into())
        .chars()
        .take(200)
        .collect()
}

#[async_trait]
impl SecretStore for VaultStore {
    fn describe(&self) -> String {
        self.client.describe()
    }

    fn clock_offset(&self) -> Option<crate::skew::Offset> {
        self.client.skew.offset()
    }

    async fn preflight(&self, path: &str) -> Result<(), StoreError> {
        self.client.preflight(path).await
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        self.client.read(path).await
    }

    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        self.client.write(path, entry, expect).await
    }

    async fn destroy_version(&self, path: &str, version: u64) -> Result<(), StoreError> {
        self.client.destroy_version(path, version).await
    }
}

impl Client {
    async fn preflight(&self, path: &str) -> Result<(), StoreError> {
        self.check_token().await?;
        // The read proves the path is readable and its entry (if any) well-formed; a
        // token without read on the path is refused here, before the provider is called.
        self.read(path).await.map(|_| ())
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        let a = self.call(Method::GET, &self.data_path(path), None).await?;
        let malformed = |detail: String| StoreError::Malformed {
            store: self.describe(),
            path: path.to_string(),
            detail,
        };
        if a.status == StatusCode::NOT_FOUND {
            // KV v2 answers 404 *with metadata* when the latest version is deleted;
            // that is not "absent": a write must still check-and-set against it.
            if let Some(v) = a
                .body
                .pointer("/data/metadata/version")
                .and_then(Value::as_u64)
            {
                return Err(malformed(format!(
                    "the latest version ({v}) is deleted; undelete it, or write a new `current` by hand"
                )));
            }
            return Ok(None);
        }
        if !a.status.is_success() {
            return Err(self.fail("read", path, &a));
        }
        match self.settings.kv_version {
            KvVersion::V1 => {
                let data = a
                    .body
                    .get("data")
                    .ok_or_else(|| malformed("the answer has no `data`".into()))?;
                Ok(Some(Versioned {
                    entry: Entry::from_json(data).map_err(malformed)?,
                    version: None,
                }))
            }
            KvVersion::V2 => {
                let data = a
                    .body
                    .pointer("/data/data")
                    .ok_or_else(|| malformed("the answer has no `data.data`".into()))?;
                let version = a
                    .body
                    .pointer("/data/metadata/version")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| malformed("the answer has no `data.metadata.version`".into()))?;
                Ok(Some(Versioned {
                    entry: Entry::from_json(data).map_err(malformed)?,
                    version: Some(version),
                }))
            }
        }
    }

    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        let data = serde_json::to_value(entry.to_map()).unwrap_or(Value::Null);
        let body = match self.settings.kv_version {
            KvVersion::V1 => data,
            KvVersion::V2 => {
                let cas = match expect {
                    Expect::Absent => 0,
                    Expect::Version(Some(v)) => v,
                    Expect::Version(None) => {
                        return Err(StoreError::Other {
                            store: self.describe(),
                            detail: "a KV v2 write needs the version it replaces".into(),
                        });
                    }
                };
                json!({ "options": { "cas": cas }, "data": data })
            }
        };
        let a = self
            .call(Method::POST, &self.data_path(path), Some(&body))
            .await?;
        if a.status.is_success() {
            Ok(())
        } else {
            Err(self.fail("write", path, &a))
        }
    }

    async fn destroy_version(&self, path: &str, version: u64) -> Result<(), StoreError> {
        if !(self.settings.destroy_old_versions && self.settings.kv_version == KvVersion::V2) {
            return Ok(());
        }
        let api = format!("{}/destroy/{path}", self.settings.mount);
        let a = self
            .call(Method::PUT, &api, Some(&json!({ "versions": [version] })))
            .await?;
        if a.status.is_success() {
            Ok(())
        } else {
            Err(self.fail("destroy version", path, &a))
        }
    }
}

/// KV v2 contract tests: RustyVault has no KV v2, so these run the client against a
/// fake that follows Vault's documented KV v2 API (versions, check-and-set, 404 for
/// a deleted latest version, `{"errors":[…]}`).
#[cfg(test)]
mod token_contract;

#[cfg(test)]
mod kv2_contract {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, put};

    use super::*;
    use crate::config::VaultAuth;

    #[derive(Default)]
    struct Kv {
        versions: HashMap<String, Vec<Option<Value>>>,
        sealed: bool,
        /// The root token's remaining TTL (0 = never expires) and renewability.
        ttl: u64,
        renewable: bool,
        renewals: u32,
        /// Answers reads only after this long (a slow or overloaded Vault).
        delay: Duration,
        /// Answers reads with a body this large (a proxy's page, a broken server).
        huge: Option<usize>,
        /// Destroy requests are told here and never answered (rekey dies in them).
        hold_destroy: Option<Arc<tokio::sync::Notify>>,
    }

    type S = Arc<Mutex<Kv>>;

    fn authed(h: &HeaderMap) -> bool {
        h.get("x-vault-token").and_then(|v| v.to_str().ok()) == Some("root")
    }

    fn errors(status: StatusCode, msg: &str) -> (StatusCode, Json<Value>) {
        (status, Json(json!({ "errors": [msg] })))
    }

    async fn read(
        State(s): State<S>,
        h: HeaderMap,
        Path(p): Path<String>,
    ) -> (StatusCode, Json<Value>) {
        let delay = s.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        let kv = s.lock().unwrap();
        if let Some(n) = kv.huge {
            let padding = "x".repeat(n);
            return (
                StatusCode::OK,
                Json(json!({ "data": { "padding": padding } })),
            );
        }
        if kv.sealed {
            return errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed");
        }
        if !authed(&h) {
            return errors(StatusCode::FORBIDDEN, "permission denied");
        }
        match kv.versions.get(&p) {
            None => (StatusCode::NOT_FOUND, Json(json!({ "errors": [] }))),
            Some(vs) => {
                let n = vs.len() as u64;
                match vs.last().cloned().flatten() {
                    Some(d) => (
                        StatusCode::OK,
                        Json(
                            json!({"request_id": "x", "data": {"data": d, "metadata": {"version": n, "destroyed": false, "deletion_time": ""}}}),
                        ),
                    ),
                    None => (
                        StatusCode::NOT_FOUND,
                        Json(
                            json!({"data": {"data": null, "metadata": {"version": n, "destroyed": true}}}),
                        ),
                    ),
                }
            }
        }
    }

    async fn write(
        State(s): State<S>,
        h: HeaderMap,
        Path(p): Path<String>,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let mut kv = s.lock().unwrap();
        if !authed(&h) {
            return errors(StatusCode::FORBIDDEN, "permission denied");
        }
        let current = kv.versions.get(&p).map_or(0, |v| v.len() as u64);
        if let Some(cas) = body.pointer("/options/cas").and_then(Value::as_u64)
            && cas != current
        {
            return errors(
                StatusCode::BAD_REQUEST,
                "check-and-set parameter did not match the current version",
            );
        }
        let data = body.get("data").cloned().unwrap_or(Value::Null);
        let vs = kv.versions.entry(p).or_default();
        vs.push(Some(data));
        (StatusCode::OK, Json(json!({"data": {"version": vs.len()}})))
    }

    async fn destroy(
        State(s): State<S>,
        Path(p): Path<String>,
        Json(body): Json<Value>,
    ) -> StatusCode {
        let hold = s.lock().unwrap().hold_destroy.clone();
        if let Some(reached) = hold {
            reached.notify_one();
            std::future::pending::<()>().await;
        }
        let mut kv = s.lock().unwrap();
        let wanted: Vec<u64> = body["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        if let Some(vs) = kv.versions.get_mut(&p) {
            for v in wanted {
                if let Some(slot) = vs.get_mut(v as usize - 1) {
                    *slot = None;
                }
            }
        }
        StatusCode::NO_CONTENT
    }

    async fn seal_status(State(s): State<S>) -> Json<Value> {
        Json(json!({ "sealed": s.lock().unwrap().sealed }))
    }

    async fn lookup_self(State(s): State<S>, h: HeaderMap) -> (StatusCode, Json<Value>) {
        if !authed(&h) {
            return errors(StatusCode::FORBIDDEN, "permission denied");
        }
        let kv = s.lock().unwrap();
        (
            StatusCode::OK,
            Json(
                json!({"data": {"ttl": kv.ttl, "renewable": kv.renewable, "policies": ["rekey"]}}),
            ),
        )
    }

    async fn renew_self(State(s): State<S>) -> (StatusCode, Json<Value>) {
        let mut kv = s.lock().unwrap();
        if !kv.renewable {
            return errors(StatusCode::BAD_REQUEST, "lease is not renewable");
        }
        kv.renewals += 1;
        kv.ttl = 3600;
        (
            StatusCode::OK,
            Json(json!({"auth": {"lease_duration": 3600, "renewable": true}})),
        )
    }

    async fn fake() -> (String, S) {
        let s: S = Arc::default();
        let app = axum::Router::new()
            .route("/v1/sys/seal-status", get(seal_status))
            .route("/v1/auth/token/lookup-self", get(lookup_self))
            .route("/v1/auth/token/renew-self", axum::routing::post(renew_self))
            .route("/v1/secret/data/{*p}", get(read).post(write))
            .route("/v1/secret/destroy/{*p}", put(destroy))
            .with_state(s.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (addr, s)
    }

    fn settings(addr: &str, token: &str, destroy: bool) -> VaultSettings {
        VaultSettings {
            address: addr.to_string(),
            auth: VaultAuth::Token(secret(token.to_string())),
            mount: "secret".into(),
            kv_version: KvVersion::V2,
            ca_cert: None,
            timeout: Duration::from_secs(5),
            namespace: None,
            destroy_old_versions: destroy,
            min_token_ttl: Duration::from_secs(60),
        }
    }

    fn entry(cur: &str, prev: Option<&str>) -> Entry {
        Entry {
            current: secret(cur.to_string()),
            previous: prev.map(|p| secret(p.to_string())),
            rotated_at: chrono::Utc::now(),
            rotation_id: "r".into(),
            provider: "fintoro".into(),
            subscription: "801".into(),
        }
    }

    #[tokio::test]
    async fn writes_check_and_set_against_the_version_read() {
        let (addr, _) = fake().await;
        let v = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        assert!(v.read("w/801").await.unwrap().is_none());
        v.write("w/801", &entry("a", None), Expect::Absent)
            .await
            .unwrap();
        let r = v.read("w/801").await.unwrap().unwrap();
        assert_eq!(r.version, Some(1));
        assert_eq!(r.entry.current.expose_secret(), "a");
        // A second "absent" write loses: someone wrote in between.
        let err = v
            .write("w/801", &entry("b", None), Expect::Absent)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        v.write("w/801", &entry("b", Some("a")), Expect::Version(Some(1)))
            .await
            .unwrap();
        let err = v
            .write("w/801", &entry("c", None), Expect::Version(Some(1)))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        let r = v.read("w/801").await.unwrap().unwrap();
        assert_eq!(r.version, Some(2));
        assert_eq!(r.entry.previous.unwrap().expose_secret(), "a");
    }

    #[tokio::test]
    async fn destroying_old_versions_only_when_configured() {
        let (addr, kv) = fake().await;
        let off = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        off.write("p", &entry("a", None), Expect::Absent)
            .await
            .unwrap();
        off.destroy_version("p", 1).await.unwrap();
        assert!(kv.lock().unwrap().versions["p"][0].is_some());
        let on = VaultStore::connect(&settings(&addr, "root", true))
            .await
            .unwrap();
        on.destroy_version("p", 1).await.unwrap();
        assert!(kv.lock().unwrap().versions["p"][0].is_none());
        // The latest version destroyed: reads refuse to call it "absent".
        let err = on.read("p").await.unwrap_err();
        assert!(err.to_string().contains("deleted"), "{err}");
    }

    /// The rotation's evidence is in and rekey dies after the retire write, before
    /// `destroy_old_versions` ran: the next run (which finds `previous` already gone)
    /// still destroys the two versions that held the old secret.
    #[tokio::test]
    async fn a_retire_cut_off_before_its_destroy_destroys_on_the_next_run() {
        use crate::engine::Engine;
        use crate::rotation::{Phase, Trigger};
        let (addr, kv) = fake().await;
        kv.lock().unwrap().versions.insert(
            "w/801".into(),
            vec![Some(json!({ "current": "whsec_old" }))],
        );
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(one_subscription(dir.path()));
        let sub = config.subscriptions[0].clone();
        let db = Arc::new(crate::state::StateDb::open(&config.state_dir).unwrap());
        let engine = || async {
            let store: Arc<dyn SecretStore> = Arc::new(
                VaultStore::connect(&settings(&addr, "root", true))
                    .await
                    .unwrap(),
            );
            let provider: Arc<dyn crate::provider::Provider> = Arc::new(Confirms);
            let providers = [("a".to_string(), provider)].into_iter().collect();
            Engine::with_parts(config.clone(), db.clone(), store, providers)
        };

        let reached = Arc::new(tokio::sync::Notify::new());
        kv.lock().unwrap().hold_destroy = Some(reached.clone());
        let first = engine().await;
        let run = tokio::spawn({
            let sub = sub.clone();
            async move { first.advance(&sub, Some(Trigger::Forced), true).await }
        });
        reached.notified().await;
        run.abort();
        let _ = run.await;
        {
            let k = kv.lock().unwrap();
            let vs = &k.versions["w/801"];
            assert_eq!(vs.len(), 3, "old, dual, retired");
            assert!(vs.iter().all(Option::is_some), "nothing destroyed yet");
            assert!(vs[2].as_ref().unwrap().get("previous").is_none());
        }

        kv.lock().unwrap().hold_destroy = None;
        let (_, rec) = engine().await.advance(&sub, None, true).await.unwrap();
        assert_eq!(rec.state.phase, Phase::Idle, "{:?}", rec.state);
        let k = kv.lock().unwrap();
        let vs = &k.versions["w/801"];
        assert!(
            vs[0].is_none(),
            "the version before the rotation is destroyed"
        );
        assert!(vs[1].is_none(), "the dual version is destroyed");
        assert_eq!(vs[2].as_ref().unwrap()["current"], "whsec_new");
    }

    /// A provider that rotates to `whsec_new` and confirms at once.
    struct Confirms;

    #[async_trait]
    impl crate::provider::Provider for Confirms {
        fn kind(&self) -> crate::config::ProviderKind {
            crate::config::ProviderKind::Fintoro
        }
        async fn preflight(&self, _id: &str) -> Result<(), crate::provider::ProviderError> {
            Ok(())
        }
        async fn rotate(&self, _id: &str) -> Result<SecretString, crate::provider::RotateError> {
            Ok(secret("whsec_new".to_string()))
        }
        async fn evidence(
            &self,
            _id: &str,
            _since: chrono::DateTime<chrono::Utc>,
        ) -> Result<crate::evidence::Finding, crate::provider::ProviderError> {
            Ok(crate::evidence::Finding::Confirmed(
                crate::evidence::Evidence::untimed(
                    "test",
                    "a delivery signed with the new secret succeeded".into(),
                ),
            ))
        }
        fn clock_offset(&self) -> Option<crate::skew::Offset> {
            None
        }
        async fn list(
            &self,
        ) -> Result<Vec<crate::provider::RemoteSubscription>, crate::provider::ProviderError>
        {
            Ok(vec![])
        }
    }

    fn one_subscription(dir: &std::path::Path) -> crate::config::Config {
        std::fs::write(dir.join("token"), "t").unwrap();
        let toml = "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"unused\"\n\
             [[providers]]\nname = \"a\"\nkind = \"fintoro\"\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"token\"\n\
             [[policies]]\nname = \"p\"\nevery = \"30d\"\n\
             [[subscriptions]]\nprovider = \"a\"\nid = \"801\"\npolicy = \"p\"\nvault_path = \"w/801\"\n";
        std::fs::write(dir.join("rekey.toml"), toml).unwrap();
        crate::config::Config::load_with(
            &dir.join("rekey.toml"),
            &std::collections::BTreeMap::<String, String>::new(),
            false,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn bad_token_and_sealed_are_told_apart() {
        let (addr, kv) = fake().await;
        let bad = VaultStore::connect(&settings(&addr, "nope", false))
            .await
            .unwrap();
        // A refused token is named as the problem (a path without policy is
        // `Forbidden`: see the token contract tests).
        let err = bad.read("p").await.unwrap_err();
        assert!(matches!(err, StoreError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("permission denied"), "{err}");
        assert!(err.to_string().contains("expired or was revoked"), "{err}");
        kv.lock().unwrap().sealed = true;
        let good = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        assert!(matches!(
            good.read("p").await.unwrap_err(),
            StoreError::Sealed { .. }
        ));
    }

    #[tokio::test]
    async fn a_token_near_expiry_is_renewed_before_a_rotation_or_refused() {
        let (addr, kv) = fake().await;
        // Each case is a new token (a new store): the store learns its TTL once.
        let fresh = || async {
            VaultStore::connect(&settings(&addr, "root", false))
                .await
                .unwrap()
        };
        // Never-expiring (ttl 0) and long-lived tokens pass without renewal.
        fresh().await.preflight("p").await.unwrap();
        kv.lock().unwrap().ttl = 7200;
        fresh().await.preflight("p").await.unwrap();
        assert_eq!(kv.lock().unwrap().renewals, 0);
        // Below min_token_ttl (60 s here) and renewable: renewed once, then fine.
        {
            let mut k = kv.lock().unwrap();
            k.ttl = 30;
            k.renewable = true;
        }
        let v = fresh().await;
        v.preflight("p").await.unwrap();
        v.preflight("p").await.unwrap();
        assert_eq!(kv.lock().unwrap().renewals, 1);
        // Below min_token_ttl and not renewable: the rotation must not start.
        {
            let mut k = kv.lock().unwrap();
            k.ttl = 30;
            k.renewable = false;
        }
        let v = fresh().await;
        let err = v.preflight("p").await.unwrap_err();
        assert!(matches!(err, StoreError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("min_token_ttl"), "{err}");
        // Sealed is reported as sealed, first.
        kv.lock().unwrap().sealed = true;
        assert!(matches!(
            v.preflight("p").await.unwrap_err(),
            StoreError::Sealed { .. }
        ));
    }

    #[tokio::test]
    async fn a_vault_slower_than_the_timeout_is_reported_not_waited_on() {
        let (addr, kv) = fake().await;
        kv.lock().unwrap().delay = Duration::from_secs(3);
        let mut s = settings(&addr, "root", false);
        s.timeout = Duration::from_millis(300);
        let v = VaultStore::connect(&s).await.unwrap();
        let t0 = std::time::Instant::now();
        let err = v.read("p").await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_cap_is_refused_and_one_below_is_read() {
        let (addr, kv) = fake().await;
        let v = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        kv.lock().unwrap().huge = Some(MAX_ANSWER_BYTES - 100);
        // Under the cap: read (and found malformed, as it is no entry).
        let err = v.read("p").await.unwrap_err();
        assert!(matches!(err, StoreError::Malformed { .. }), "{err}");
        kv.lock().unwrap().huge = Some(MAX_ANSWER_BYTES);
        let err = v.read("p").await.unwrap_err();
        assert!(
            err.to_string()
                .contains("Vault response to `secret/data/p` larger than 1048576 bytes"),
            "{err}"
        );
    }

    /// No `Content-Length`, a body that never ends: reading stops at the cap.
    #[tokio::test]
    async fn an_endless_chunked_answer_is_cut_off_at_the_cap() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn({
            let sent = sent.clone();
            async move {
                let (mut c, _) = l.accept().await.unwrap();
                let mut request = [0u8; 4096];
                let _ = c.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                c.write_all(head.as_bytes()).await.unwrap();
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                // 64 MiB at most, so a client without a cap fails the test, not the box.
                for _ in 0..1024 {
                    if c.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    sent.fetch_add(64 * 1024, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = c.write_all(b"0\r\n\r\n").await;
            }
        });
        let v = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        let err = v.read("p").await.unwrap_err();
        assert!(
            err.to_string().contains("larger than 1048576 bytes"),
            "{err}"
        );
        server.abort();
        let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            sent < 16 * MAX_ANSWER_BYTES,
            "stopped reading early: {sent}"
        );
    }

    #[tokio::test]
    async fn unreachable_vault_is_reported_as_such() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let v = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        assert!(matches!(
            v.read("p").await.unwrap_err(),
            StoreError::Unreachable { .. }
        ));
    }
}
