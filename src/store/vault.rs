//! HashiCorp Vault (or any Vault-API server, such as RustyVault) as the secret store:
//! KV v1 and KV v2 (writes with check-and-set against the version read), token or
//! AppRole auth, token renewal, request timeouts always set.
//!
//! This is a small client over reqwest rather than vaultrs: vaultrs deserializes
//! Vault's response envelope strictly (`request_id`, `accessor`, … required), so it
//! cannot read anything from Vault-API servers that leave those out — RustyVault, the
//! server the integration tests run against, among them. Every field read here is
//! optional until rekey actually needs it, and every error names what was wrong.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::RwLock;

use super::{Entry, Expect, SecretStore, StoreError, Versioned};
use crate::config::{KvVersion, VaultAuth, VaultSettings};
use crate::secret::{ExposeSecret, SecretString, secret};

/// The token in use and, when known, when it expires.
struct Token {
    value: SecretString,
    expires_at: Option<DateTime<Utc>>,
}

pub struct VaultStore {
    settings: VaultSettings,
    http: reqwest::Client,
    token: RwLock<Token>,
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
        let describe = describe(settings);
        let setup = |detail: String| StoreError::Other {
            store: describe.clone(),
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
        let http = http.build().map_err(|e| setup(e.to_string()))?;
        let token = match &settings.auth {
            VaultAuth::Token(t) => t.clone(),
            VaultAuth::AppRole { .. } => secret(String::new()),
        };
        let store = VaultStore {
            settings: settings.clone(),
            http,
            token: RwLock::new(Token {
                value: token,
                expires_at: None,
            }),
        };
        if matches!(settings.auth, VaultAuth::AppRole { .. }) {
            store.login().await?;
        }
        Ok(store)
    }

    fn url(&self, api_path: &str) -> String {
        format!("{}/v1/{api_path}", self.settings.address)
    }

    /// One request with the current token. Never retried here: the rotation state
    /// machine owns retries, so every attempt is recorded.
    async fn call(
        &self,
        method: Method,
        api_path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, StoreError> {
        let token = self.token.read().await.value.expose_secret().to_string();
        let mut req = self.http.request(method, self.url(api_path));
        if !token.is_empty() {
            req = req.header("X-Vault-Token", token);
        }
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: crate::errors::chain(&e),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: format!("reading the answer: {}", crate::errors::chain(&e)),
        })?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body })
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
        let url = self.url(&format!("auth/{mount}/login"));
        let mut req = self.http.post(url).json(&body);
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req.send().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: crate::errors::chain(&e),
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(StoreError::Sealed {
                store: self.describe(),
            });
        }
        let auth = body.get("auth");
        let client_token = auth
            .and_then(|a| a.get("client_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        let Some(client_token) = client_token.filter(|_| status.is_success()) else {
            return Err(StoreError::Auth {
                store: self.describe(),
                detail: format!(
                    "AppRole login at auth/{mount} answered {status}: {}",
                    vault_errors(&body)
                ),
            });
        };
        let lease = auth
            .and_then(|a| a.get("lease_duration"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut t = self.token.write().await;
        t.value = secret(client_token.to_string());
        t.expires_at = (lease > 0).then(|| Utc::now() + chrono::Duration::seconds(lease as i64));
        tracing::info!(store = %self.describe(), ttl_seconds = lease, "logged in with AppRole");
        Ok(())
    }

    /// Seal status and token validity, renewing (or logging in again) when the token
    /// would expire before `min_token_ttl`.
    async fn check_token(&self) -> Result<(), StoreError> {
        let seal = self.call(Method::GET, "sys/seal-status", None).await?;
        if seal.status == StatusCode::SERVICE_UNAVAILABLE
            || seal.body.get("sealed").and_then(Value::as_bool) == Some(true)
        {
            return Err(StoreError::Sealed {
                store: self.describe(),
            });
        }
        let is_approle = matches!(self.settings.auth, VaultAuth::AppRole { .. });
        let min = chrono::Duration::from_std(self.settings.min_token_ttl)
            .unwrap_or(chrono::Duration::MAX);
        if is_approle {
            let expires = self.token.read().await.expires_at;
            if expires.is_some_and(|e| e - Utc::now() < min) {
                self.login().await?;
            }
        }
        let a = self
            .call(Method::GET, "auth/token/lookup-self", None)
            .await?;
        match a.status.as_u16() {
            200 => {}
            503 => {
                return Err(StoreError::Sealed {
                    store: self.describe(),
                });
            }
            400 | 401 | 403 if is_approle => {
                // The AppRole token expired or was revoked: a new login fixes that.
                self.login().await?;
                return Ok(());
            }
            400 | 401 | 403 => {
                return Err(StoreError::Auth {
                    store: self.describe(),
                    detail: format!(
                        "token lookup answered {}: {} (expired or revoked?)",
                        a.status,
                        vault_errors(&a.body)
                    ),
                });
            }
            _ => return Err(self.fail("token lookup", "auth/token/lookup-self", &a)),
        }
        let data = a.body.get("data").cloned().unwrap_or(Value::Null);
        // ttl 0 means a token that never expires (e.g. root).
        let ttl = data.get("ttl").and_then(Value::as_u64).unwrap_or(0);
        if ttl == 0 || chrono::Duration::seconds(ttl as i64) >= min {
            return Ok(());
        }
        if is_approle {
            return self.login().await;
        }
        if data.get("renewable").and_then(Value::as_bool) == Some(true) {
            let r = self
                .call(Method::POST, "auth/token/renew-self", Some(&json!({})))
                .await?;
            let lease = r
                .body
                .get("auth")
                .and_then(|a| a.get("lease_duration"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if r.status.is_success() {
                tracing::info!(store = %self.describe(), ttl_seconds = lease, "renewed the Vault token");
                if chrono::Duration::seconds(lease as i64) >= min {
                    return Ok(());
                }
            }
        }
        Err(StoreError::Auth {
            store: self.describe(),
            detail: format!(
                "the token expires in {} (less than min_token_ttl {}) and cannot be renewed further",
                humantime::format_duration(Duration::from_secs(ttl)),
                humantime::format_duration(self.settings.min_token_ttl)
            ),
        })
    }

    fn data_path(&self, path: &str) -> String {
        match self.settings.kv_version {
            KvVersion::V1 => format!("{}/{path}", self.settings.mount),
            KvVersion::V2 => format!("{}/data/{path}", self.settings.mount),
        }
    }
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
        describe(&self.settings)
    }

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
            rotated_at: Utc::now(),
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

    #[tokio::test]
    async fn bad_token_and_sealed_are_told_apart() {
        let (addr, kv) = fake().await;
        let bad = VaultStore::connect(&settings(&addr, "nope", false))
            .await
            .unwrap();
        let err = bad.read("p").await.unwrap_err();
        assert!(matches!(err, StoreError::Forbidden { .. }), "{err}");
        assert!(err.to_string().contains("permission denied"), "{err}");
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
        let v = VaultStore::connect(&settings(&addr, "root", false))
            .await
            .unwrap();
        // Never-expiring (ttl 0) and long-lived tokens pass without renewal.
        v.preflight("p").await.unwrap();
        kv.lock().unwrap().ttl = 7200;
        v.preflight("p").await.unwrap();
        assert_eq!(kv.lock().unwrap().renewals, 0);
        // Below min_token_ttl (60 s here) and renewable: renewed once, then fine.
        {
            let mut k = kv.lock().unwrap();
            k.ttl = 30;
            k.renewable = true;
        }
        v.preflight("p").await.unwrap();
        assert_eq!(kv.lock().unwrap().renewals, 1);
        // Below min_token_ttl and not renewable: the rotation must not start.
        {
            let mut k = kv.lock().unwrap();
            k.ttl = 30;
            k.renewable = false;
        }
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
