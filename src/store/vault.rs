//! HashiCorp Vault (or a Vault-API server such as RustyVault) as the secret store,
//! through vaultrs: KV v1 and KV v2 (writes with check-and-set against the version
//! read), token or AppRole auth, token renewal, request timeouts always set.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::RwLock;
use vaultrs::api::kv2::requests::SetSecretRequestOptions;
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{Entry, Expect, SecretStore, StoreError, Versioned};
use crate::config::{KvVersion, VaultAuth, VaultSettings};
use crate::secret::ExposeSecret;

pub struct VaultStore {
    settings: VaultSettings,
    client: RwLock<VaultClient>,
    /// For the few endpoints whose answers vaultrs parses too strictly for every
    /// Vault-API server (token lookup, seal status).
    http: reqwest::Client,
}

impl VaultStore {
    /// Builds the client and logs in (AppRole) if configured. Does not contact Vault
    /// otherwise: reachability is the preflight's job.
    pub async fn connect(settings: &VaultSettings) -> Result<VaultStore, StoreError> {
        let describe = describe(settings);
        let token = match &settings.auth {
            VaultAuth::Token(t) => t.expose_secret().to_string(),
            VaultAuth::AppRole { .. } => String::new(),
        };
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&settings.address)
            .token(token)
            .timeout(Some(settings.timeout))
            // Explicit: never let $VAULT_SKIP_VERIFY turn verification off behind our back.
            .verify(true)
            .ca_certs(
                settings
                    .ca_cert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            );
        if let Some(ns) = &settings.namespace {
            b.namespace(Some(ns.clone()));
        }
        let client_settings = b.build().map_err(|e| StoreError::Other {
            store: describe.clone(),
            detail: format!("invalid client settings: {e}"),
        })?;
        let client = VaultClient::new(client_settings).map_err(|e| StoreError::Other {
            store: describe.clone(),
            detail: format!("cannot build the client: {}", chain(&e)),
        })?;
        let mut http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .https_only(settings.address.starts_with("https://"));
        if let Some(ca) = &settings.ca_cert {
            let pem = std::fs::read(ca).map_err(|e| StoreError::Other {
                store: describe.clone(),
                detail: format!("reading ca_cert {}: {e}", ca.display()),
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| StoreError::Other {
                store: describe.clone(),
                detail: format!("ca_cert {} is not a PEM certificate: {e}", ca.display()),
            })?;
            http = http.add_root_certificate(cert);
        }
        let http = http.build().map_err(|e| StoreError::Other {
            store: describe.clone(),
            detail: e.to_string(),
        })?;
        let store = VaultStore {
            settings: settings.clone(),
            client: RwLock::new(client),
            http,
        };
        if matches!(settings.auth, VaultAuth::AppRole { .. }) {
            store.login().await?;
        }
        Ok(store)
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
        let mut client = self.client.write().await;
        let auth =
            vaultrs::auth::approle::login(&*client, mount, role_id, secret_id.expose_secret())
                .await
                .map_err(|e| self.map_err("AppRole login", "", e))?;
        client.set_token(&auth.client_token);
        tracing::info!(store = %self.describe(), ttl = auth.lease_duration, "logged in with AppRole");
        Ok(())
    }

    fn map_err(&self, what: &str, path: &str, e: ClientError) -> StoreError {
        map_error(&self.describe(), what, path, e)
    }

    fn full(&self, path: &str) -> String {
        format!("{}/{}", self.settings.mount, path)
    }

    /// `GET {addr}/v1/{path}` with the current token; returns status and JSON body.
    async fn raw_get(&self, api_path: &str) -> Result<(u16, serde_json::Value), StoreError> {
        let token = self.client.read().await.settings.token.clone();
        let url = format!("{}/v1/{api_path}", self.settings.address);
        let mut req = self.http.get(&url).header("X-Vault-Token", token);
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req.send().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: chain(&e),
        })?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// Seal status and token validity/TTL, renewing (or logging in again) when the
    /// token would expire before `min_token_ttl`.
    async fn check_token(&self) -> Result<(), StoreError> {
        let (status, body) = self.raw_get("sys/seal-status").await?;
        if status == 503 || body.get("sealed").and_then(|s| s.as_bool()) == Some(true) {
            return Err(StoreError::Sealed {
                store: self.describe(),
            });
        }
        let (status, body) = self.raw_get("auth/token/lookup-self").await?;
        match status {
            200 => {}
            503 => {
                return Err(StoreError::Sealed {
                    store: self.describe(),
                });
            }
            401 | 403 => {
                if matches!(self.settings.auth, VaultAuth::AppRole { .. }) {
                    self.login().await?;
                    return Ok(());
                }
                return Err(StoreError::Auth {
                    store: self.describe(),
                    detail: format!(
                        "token lookup answered {status}: {} (expired or revoked?)",
                        vault_errors(&body)
                    ),
                });
            }
            other => {
                return Err(StoreError::Other {
                    store: self.describe(),
                    detail: format!("token lookup answered {other}: {}", vault_errors(&body)),
                });
            }
        }
        let data = body.get("data").cloned().unwrap_or_default();
        // ttl 0 means a token that never expires (e.g. root).
        let ttl = data.get("ttl").and_then(|t| t.as_u64()).unwrap_or(0);
        let min = self.settings.min_token_ttl;
        if ttl == 0 || Duration::from_secs(ttl) >= min {
            return Ok(());
        }
        if matches!(self.settings.auth, VaultAuth::AppRole { .. }) {
            return self.login().await;
        }
        if data.get("renewable").and_then(|r| r.as_bool()) == Some(true) {
            let client = self.client.read().await;
            let renewed = vaultrs::token::renew_self(&*client, None)
                .await
                .map_err(|e| map_error(&self.describe(), "token renewal", "", e))?;
            tracing::info!(store = %self.describe(), ttl = renewed.lease_duration, "renewed the Vault token");
            if Duration::from_secs(renewed.lease_duration) >= min {
                return Ok(());
            }
        }
        Err(StoreError::Auth {
            store: self.describe(),
            detail: format!(
                "the token expires in {} (less than min_token_ttl {}) and cannot be renewed further",
                humantime::format_duration(Duration::from_secs(ttl)),
                humantime::format_duration(min)
            ),
        })
    }

    /// Asks Vault what the token may do on the path. Servers without the endpoint
    /// (404/405) fall back to the read the preflight does anyway.
    async fn check_capabilities(&self, path: &str) -> Result<(), StoreError> {
        let api_path = match self.settings.kv_version {
            KvVersion::V1 => self.full(path),
            KvVersion::V2 => format!("{}/data/{path}", self.settings.mount),
        };
        let token = self.client.read().await.settings.token.clone();
        let url = format!("{}/v1/sys/capabilities-self", self.settings.address);
        let mut req = self
            .http
            .post(&url)
            .header("X-Vault-Token", token)
            .json(&serde_json::json!({ "paths": [api_path], "path": api_path }));
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req.send().await.map_err(|e| StoreError::Unreachable {
            store: self.describe(),
            detail: chain(&e),
        })?;
        let status = resp.status().as_u16();
        if matches!(status, 404 | 405) {
            tracing::debug!(store = %self.describe(), "no capabilities-self endpoint; relying on the read check");
            return Ok(());
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status != 200 {
            return Err(StoreError::Other {
                store: self.describe(),
                detail: format!(
                    "capabilities check answered {status}: {}",
                    vault_errors(&body)
                ),
            });
        }
        let caps: Vec<String> = body
            .get(&api_path)
            .or_else(|| body.get("capabilities"))
            .or_else(|| body.get("data").and_then(|d| d.get(&api_path)))
            .and_then(|c| c.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let has = |c: &str| caps.iter().any(|x| x == c);
        let allowed =
            has("root") || (!has("deny") && has("read") && (has("update") || has("create")));
        if !allowed {
            return Err(StoreError::Forbidden {
                store: self.describe(),
                path: path.to_string(),
                detail: format!(
                    "token capabilities are [{}]; need read and create or update",
                    caps.join(", ")
                ),
            });
        }
        Ok(())
    }
}

fn describe(s: &VaultSettings) -> String {
    let kv = match s.kv_version {
        KvVersion::V1 => "kv v1",
        KvVersion::V2 => "kv v2",
    };
    format!("vault {} ({kv} at {}/)", s.address, s.mount)
}

fn vault_errors(body: &serde_json::Value) -> String {
    body.get("errors")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(no error message)".into())
        .chars()
        .take(200)
        .collect()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Maps vaultrs' errors onto what they mean for a rotation.
fn map_error(store: &str, what: &str, path: &str, e: ClientError) -> StoreError {
    let store = store.to_string();
    let status = |code: u16, detail: String| match code {
        503 => StoreError::Sealed {
            store: store.clone(),
        },
        401 => StoreError::Auth {
            store: store.clone(),
            detail: format!("{what}: {detail}"),
        },
        403 => StoreError::Forbidden {
            store: store.clone(),
            path: path.to_string(),
            detail: format!("{what}: {detail}"),
        },
        400 if detail.contains("check-and-set") => StoreError::Conflict {
            store: store.clone(),
            path: path.to_string(),
        },
        _ => StoreError::Other {
            store: store.clone(),
            detail: format!(
                "{what}{}: answered {code}: {detail}",
                if path.is_empty() {
                    String::new()
                } else {
                    format!(" `{path}`")
                }
            ),
        },
    };
    match e {
        ClientError::APIError { code, errors } => status(code, errors.join("; ")),
        ClientError::RestClientError { source } => match source {
            rustify::errors::ClientError::ServerResponseError { code, content } => {
                let detail = content
                    .as_deref()
                    .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
                    .map(|v| vault_errors(&v))
                    .unwrap_or_else(|| "(no error message)".into());
                status(code, detail)
            }
            rustify::errors::ClientError::RequestError { source, .. } => StoreError::Unreachable {
                store,
                detail: format!("{what}: {}", chain(source.as_ref())),
            },
            other => StoreError::Other {
                store,
                detail: format!("{what}: {}", chain(&other)),
            },
        },
        ClientError::JsonParseError { source } => StoreError::Malformed {
            store,
            path: path.to_string(),
            detail: format!("{what}: {source}"),
        },
        other => StoreError::Other {
            store,
            detail: format!("{what}: {}", chain(&other)),
        },
    }
}

fn is_not_found(e: &ClientError) -> bool {
    match e {
        ClientError::APIError { code: 404, .. } => true,
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code: 404, .. },
        } => true,
        // KV v1 on some servers answers a missing key with an empty 200/204.
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => true,
        _ => false,
    }
}

#[async_trait]
impl SecretStore for VaultStore {
    fn describe(&self) -> String {
        describe(&self.settings)
    }

    async fn preflight(&self, path: &str) -> Result<(), StoreError> {
        self.check_token().await?;
        self.check_capabilities(path).await?;
        // The read proves the path is readable and its entry (if any) well-formed.
        self.read(path).await.map(|_| ())
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        let client = self.client.read().await;
        let mount = &self.settings.mount;
        let malformed = |detail: String| StoreError::Malformed {
            store: self.describe(),
            path: path.to_string(),
            detail,
        };
        match self.settings.kv_version {
            KvVersion::V1 => {
                match vaultrs::kv1::get::<serde_json::Value>(&*client, mount, path).await {
                    Ok(v) => Ok(Some(Versioned {
                        entry: Entry::from_json(&v).map_err(malformed)?,
                        version: None,
                    })),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(self.map_err("read", path, e)),
                }
            }
            KvVersion::V2 => {
                let meta = match vaultrs::kv2::read_metadata(&*client, mount, path).await {
                    Ok(m) => m,
                    Err(e) if is_not_found(&e) => return Ok(None),
                    Err(e) => return Err(self.map_err("read metadata", path, e)),
                };
                let version = meta.current_version;
                match vaultrs::kv2::read_version::<serde_json::Value>(
                    &*client, mount, path, version,
                )
                .await
                {
                    Ok(v) => Ok(Some(Versioned {
                        entry: Entry::from_json(&v).map_err(malformed)?,
                        version: Some(version),
                    })),
                    // The latest version was deleted or destroyed: treat as empty, but
                    // the next write must still check-and-set against that version.
                    Err(e) if is_not_found(&e) => Err(malformed(format!(
                        "the latest version ({version}) is deleted; undelete it or write a new `current` by hand"
                    ))),
                    Err(e) => Err(self.map_err("read", path, e)),
                }
            }
        }
    }

    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        let client = self.client.read().await;
        let mount = &self.settings.mount;
        let data = entry.to_map();
        match self.settings.kv_version {
            KvVersion::V1 => {
                let data: std::collections::HashMap<&str, &String> =
                    data.iter().map(|(k, v)| (k.as_str(), v)).collect();
                vaultrs::kv1::set(&*client, mount, path, &data)
                    .await
                    .map_err(|e| self.map_err("write", path, e))
            }
            KvVersion::V2 => {
                let cas = match expect {
                    Expect::Absent => 0,
                    Expect::Version(Some(v)) => u32::try_from(v).unwrap_or(u32::MAX),
                    Expect::Version(None) => {
                        return Err(StoreError::Other {
                            store: self.describe(),
                            detail: "KV v2 write without a version to check against".into(),
                        });
                    }
                };
                vaultrs::kv2::set_with_options(
                    &*client,
                    mount,
                    path,
                    &data,
                    SetSecretRequestOptions { cas },
                )
                .await
                .map(|_| ())
                .map_err(|e| self.map_err("write", path, e))
            }
        }
    }

    async fn destroy_version(&self, path: &str, version: u64) -> Result<(), StoreError> {
        if !(self.settings.destroy_old_versions && self.settings.kv_version == KvVersion::V2) {
            return Ok(());
        }
        let client = self.client.read().await;
        vaultrs::kv2::destroy_versions(&*client, &self.settings.mount, path, vec![version])
            .await
            .map_err(|e| self.map_err("destroy version", path, e))
    }
}
