//! A webhook receiver that verifies deliveries against the published secrets.
//!
//! It plays the part of a customer's service in the sandbox and the tests: it knows
//! nothing about rekey except the [`SecretStore`] entry layout, reads the entry
//! fresh on every delivery (a correct receiver never caches a secret that may have
//! been rotated), and accepts a delivery signed with `current` or `previous`. Its
//! per-route counters are the evidence that a rotation broke nothing: every
//! `rejected` is a delivery a real customer would have lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::Utc;

use super::signing;
use crate::secret::{ExposeSecret, Fingerprint};
use crate::store::SecretStore;

/// Per-route counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    pub accepted_with_current: u64,
    pub accepted_with_previous: u64,
    /// Signature (or timestamp) did not verify: 401.
    pub rejected: u64,
    /// No entry published, or the store could not be read: 503.
    pub unavailable: u64,
}

/// Cheap-to-clone handle; the server stops when the last clone is dropped (the
/// server task holds only `Shared`, never `Handle`).
#[derive(Clone)]
pub struct Receiver {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: super::ServerGuard,
}

struct Shared {
    store: Arc<dyn SecretStore>,
    routes: Mutex<HashMap<String, RouteState>>,
}

struct RouteState {
    vault_path: String,
    stats: ReceiverStats,
}

/// A delivery's signature, by the provider scheme that produced it.
enum Scheme {
    Fintoro(String),
    Monite(String),
    Storno(String),
}

impl Scheme {
    fn verify(&self, secret: &str, body: &[u8]) -> bool {
        match self {
            Scheme::Fintoro(sig) => signing::verify_fintoro(secret, body, sig),
            Scheme::Monite(header) => signing::verify_monite(secret, body, header),
            Scheme::Storno(sig) => signing::verify_storno(secret, body, sig),
        }
    }
}

enum Verdict {
    Current,
    Previous,
    Rejected(&'static str),
    Unavailable(String),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, RouteState>> {
        self.routes.lock().expect("receiver routes mutex poisoned")
    }

    async fn check(
        &self,
        route: &str,
        vault_path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Verdict {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // The provider kind is the route's first segment and picks the scheme.
        let fresh = |t: Option<i64>, tolerance: i64| {
            t.is_some_and(|t| (Utc::now().timestamp() - t).abs() <= tolerance)
        };
        let scheme = match route.split('/').next() {
            Some("fintoro") => {
                let Some(signature) = header(signing::FINTORO_SIGNATURE_HEADER) else {
                    return Verdict::Rejected("missing signature");
                };
                let t = header(signing::FINTORO_TIMESTAMP_HEADER)
                    .and_then(|t| t.trim().parse::<i64>().ok());
                if !fresh(t, signing::FINTORO_TIMESTAMP_TOLERANCE_SECS) {
                    return Verdict::Rejected("timestamp missing or outside tolerance");
                }
                Scheme::Fintoro(signature.to_string())
            }
            Some("monite") => {
                let Some(h) = header(signing::MONITE_SIGNATURE_HEADER) else {
                    return Verdict::Rejected("missing signature");
                };
                let t = signing::parse_monite_header(h).map(|(t, _)| t);
                if !fresh(t, signing::MONITE_TIMESTAMP_TOLERANCE_SECS) {
                    return Verdict::Rejected("timestamp missing or outside tolerance");
                }
                Scheme::Monite(h.to_string())
            }
            Some("storno") => match header(signing::STORNO_SIGNATURE_HEADER) {
                // Storno signs no timestamp: nothing to check for freshness.
                Some(sig) => Scheme::Storno(sig.to_string()),
                None => return Verdict::Rejected("missing signature"),
            },
            _ => return Verdict::Rejected("no verifier for this provider"),
        };
        // Fresh read every time: no cache that could hold a retired secret.
        let entry = match self.store.read(vault_path).await {
            Ok(Some(v)) => v.entry,
            Ok(None) => {
                return Verdict::Unavailable(format!("nothing published at `{vault_path}`"));
            }
            Err(e) => return Verdict::Unavailable(e.to_string()),
        };
        if scheme.verify(entry.current.expose_secret(), body) {
            return Verdict::Current;
        }
        let prev_ok = entry
            .previous
            .as_ref()
            .is_some_and(|p| scheme.verify(p.expose_secret(), body));
        if prev_ok {
            Verdict::Previous
        } else {
            tracing::info!(
                route,
                current = %Fingerprint::of(&entry.current),
                previous = ?entry.previous.as_ref().map(Fingerprint::of),
                "receiver: signature matches no published secret"
            );
            Verdict::Rejected("signature matches no published secret")
        }
    }
}

async fn hook(
    State(s): State<Arc<Shared>>,
    Path(route): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Some(vault_path) = s.lock().get(&route).map(|r| r.vault_path.clone()) else {
        return StatusCode::NOT_FOUND;
    };
    let verdict = s.check(&route, &vault_path, &headers, &body).await;
    let mut routes = s.lock();
    let Some(stats) = routes.get_mut(&route).map(|r| &mut r.stats) else {
        return StatusCode::NOT_FOUND;
    };
    match verdict {
        Verdict::Current => {
            stats.accepted_with_current += 1;
            StatusCode::NO_CONTENT
        }
        Verdict::Previous => {
            stats.accepted_with_previous += 1;
            StatusCode::NO_CONTENT
        }
        Verdict::Rejected(why) => {
            tracing::debug!(route, why, "receiver rejected a delivery");
            stats.rejected += 1;
            StatusCode::UNAUTHORIZED
        }
        Verdict::Unavailable(why) => {
            tracing::warn!(route, why, "receiver cannot verify: secret unavailable");
            stats.unavailable += 1;
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl Receiver {
    /// Binds 127.0.0.1 on a free port and starts serving `POST /hooks/{route}`.
    pub async fn start(store: Arc<dyn SecretStore>) -> std::io::Result<Receiver> {
        let shared = Arc::new(Shared {
            store,
            routes: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/hooks/{*route}", post(hook))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = super::serve_until_dropped(listener, app, "receiver");
        Ok(Receiver {
            handle: Arc::new(Handle {
                shared,
                addr,
                _server: server,
            }),
        })
    }

    /// Accepts deliveries on `route` (e.g. `fintoro/801`; the first segment names
    /// the provider's signing scheme), verified against the entry at `vault_path`.
    /// Returns the url to give the provider. Re-registering keeps the counters.
    pub fn register(&self, route: &str, vault_path: &str) -> String {
        let route = route.trim_matches('/').to_string();
        let mut routes = self.handle.shared.lock();
        routes
            .entry(route.clone())
            .and_modify(|r| r.vault_path = vault_path.to_string())
            .or_insert_with(|| RouteState {
                vault_path: vault_path.to_string(),
                stats: ReceiverStats::default(),
            });
        self.url(&route)
    }

    /// The url for `route`, registered or not (an unregistered one answers 404).
    pub fn url(&self, route: &str) -> String {
        format!(
            "http://{}/hooks/{}",
            self.handle.addr,
            route.trim_matches('/')
        )
    }

    /// Counters for `route` (zeros for an unknown route).
    pub fn stats(&self, route: &str) -> ReceiverStats {
        let routes = self.handle.shared.lock();
        routes
            .get(route.trim_matches('/'))
            .map(|r| r.stats)
            .unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secret::secret;
    use crate::store::{Entry, Expect, StoreError, Versioned};
    use async_trait::async_trait;

    /// An in-memory store for the sandbox tests, with a switch to make it unreachable.
    #[derive(Default)]
    pub(crate) struct MemStore {
        entries: Mutex<HashMap<String, Entry>>,
        pub(crate) down: std::sync::atomic::AtomicBool,
    }

    impl MemStore {
        pub(crate) fn publish(&self, path: &str, current: &str, previous: Option<&str>) {
            let entry = Entry {
                current: secret(current),
                previous: previous.map(secret),
                rotated_at: Utc::now(),
                rotation_id: "test".into(),
                provider: "fintoro".into(),
                subscription: "801".into(),
            };
            self.entries.lock().expect("mem").insert(path.into(), entry);
        }
    }

    #[async_trait]
    impl SecretStore for MemStore {
        fn describe(&self) -> String {
            "memory".into()
        }
        async fn preflight(&self, _path: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unreachable {
                    store: "memory".into(),
                    detail: "down".into(),
                });
            }
            let entries = self.entries.lock().expect("mem");
            Ok(entries.get(path).map(|e| Versioned {
                entry: e.clone(),
                version: None,
            }))
        }
        async fn write(
            &self,
            path: &str,
            entry: &Entry,
            _expect: Expect,
        ) -> Result<(), StoreError> {
            self.entries
                .lock()
                .expect("mem")
                .insert(path.into(), entry.clone());
            Ok(())
        }
    }

    async fn post(url: &str, secret: &str, ts: i64) -> u16 {
        let body = br#"{"id":"evt_1","type":"invoices.created"}"#;
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .post(url)
            .header("webhook-id", "evt_1")
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                signing::fintoro_signature(secret, body),
            )
            .body(&body[..])
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn accepts_current_and_previous_and_rejects_unknown() {
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("start");
        let url = rx.register("fintoro/801", "webhooks/fintoro/801");
        assert!(url.ends_with("/hooks/fintoro/801") && url.starts_with("http://127.0.0.1:"));
        store.publish("webhooks/fintoro/801", "whsec_new", Some("whsec_old"));
        let now = Utc::now().timestamp();
        assert_eq!(post(&url, "whsec_new", now).await, 204);
        assert_eq!(post(&url, "whsec_old", now).await, 204);
        assert_eq!(post(&url, "whsec_other", now).await, 401);
        // Once the old secret is retired, it no longer verifies.
        store.publish("webhooks/fintoro/801", "whsec_new", None);
        assert_eq!(post(&url, "whsec_old", now).await, 401);
        let stats = rx.stats("fintoro/801");
        assert_eq!(
            stats,
            ReceiverStats {
                accepted_with_current: 1,
                accepted_with_previous: 1,
                rejected: 2,
                unavailable: 0
            }
        );
    }

    #[tokio::test]
    async fn stale_timestamps_are_rejected() {
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("start");
        let url = rx.register("fintoro/801", "p");
        store.publish("p", "whsec_s", None);
        let now = Utc::now().timestamp();
        assert_eq!(post(&url, "whsec_s", now - 290).await, 204);
        assert_eq!(post(&url, "whsec_s", now - 400).await, 401);
        assert_eq!(post(&url, "whsec_s", now + 400).await, 401);
        assert_eq!(rx.stats("fintoro/801").rejected, 2);
    }

    #[tokio::test]
    async fn missing_entry_or_store_down_is_unavailable_and_unknown_route_404() {
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("start");
        let url = rx.register("fintoro/801", "p");
        let now = Utc::now().timestamp();
        assert_eq!(post(&url, "whsec_s", now).await, 503);
        store.publish("p", "whsec_s", None);
        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(post(&url, "whsec_s", now).await, 503);
        store.down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(post(&url, "whsec_s", now).await, 204);
        assert_eq!(rx.stats("fintoro/801").unavailable, 2);
        assert_eq!(post(&rx.url("fintoro/999"), "whsec_s", now).await, 404);
        assert_eq!(rx.stats("fintoro/999"), ReceiverStats::default());
    }

    async fn post_with(url: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
        let mut req = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .post(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.body(body.to_vec())
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn monite_and_storno_routes_verify_their_own_schemes() {
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("receiver");
        let m = rx.register("monite/0c8e5d7a", "m");
        let st = rx.register("storno/9b1c", "s");
        store.publish("m", "whsec_new_m", Some("whsec_old_m"));
        store.publish("s", "aa11", Some("bb22"));
        let body = br#"{"id":"e"}"#;
        let now = Utc::now().timestamp();
        let monite = |secret: &str, t: i64| {
            vec![(
                "Monite-Signature",
                signing::monite_signature_header(secret, t, body),
            )]
        };
        assert_eq!(post_with(&m, &monite("whsec_new_m", now), body).await, 204);
        assert_eq!(post_with(&m, &monite("whsec_old_m", now), body).await, 204);
        assert_eq!(post_with(&m, &monite("whsec_x", now), body).await, 401);
        assert_eq!(
            post_with(&m, &monite("whsec_new_m", now - 900), body).await,
            401
        );
        // A Fintoro-style signature on a Monite route does not verify.
        let fintoro = vec![
            (
                "webhook-signature",
                signing::fintoro_signature("whsec_new_m", body),
            ),
            ("webhook-timestamp", now.to_string()),
        ];
        assert_eq!(post_with(&m, &fintoro, body).await, 401);
        let stats = rx.stats("monite/0c8e5d7a");
        assert_eq!(
            (
                stats.accepted_with_current,
                stats.accepted_with_previous,
                stats.rejected
            ),
            (1, 1, 3)
        );

        let storno = |secret: &str| {
            vec![(
                "X-Webhook-Signature",
                signing::storno_signature(secret, body),
            )]
        };
        assert_eq!(post_with(&st, &storno("aa11"), body).await, 204);
        assert_eq!(post_with(&st, &storno("bb22"), body).await, 204);
        assert_eq!(post_with(&st, &storno("cc33"), body).await, 401);
        assert_eq!(post_with(&st, &[], body).await, 401);
        let stats = rx.stats("storno/9b1c");
        assert_eq!(
            (
                stats.accepted_with_current,
                stats.accepted_with_previous,
                stats.rejected
            ),
            (1, 1, 2)
        );
    }
}
