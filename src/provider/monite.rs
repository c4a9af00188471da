//! Monite (`kind = "monite"`): partner-level client credentials, a delivery log.
//!
//! Every call carries `x-monite-version` and a partner token from `POST /auth/token`,
//! which this client caches and renews before `expires_in` runs out (and once more
//! when a call answers 401, since Monite may revoke a token early). Rotate is
//! `POST /webhook_subscriptions/{id}/regenerate_secret`, whose `secret` is the only
//! copy of the new secret. Confirmation reads the delivery log (`GET
//! /webhook_deliveries`, scoped to the entity by `x-monite-entity-id`): its records
//! carry neither the subscription id nor a time, so rekey asks only for deliveries
//! created since the publication (`created_at__gte`) and matches them by the
//! subscription's `url`.
//!
//! **Evidence rule.** A successful delivery to the subscription's url counts only if
//! Monite created it after the publication plus the measured clock offset (asked for
//! with `created_at__gte`, at full precision). A delivery is signed no earlier than it
//! is created, so every signature it carried was made with the new secret; retries
//! of deliveries created earlier never count. Unsuccessful deliveries in the same
//! window, with none successful, are receivers refusing the new secret. Worst case:
//! a confirmation is seen the offset later than it could have been; a receiver that
//! shares its url with another subscription of the entity could confirm for both
//! (Monite's log does not say which subscription a delivery belongs to).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::http::{HttpClient, HttpError, Idempotency, Response};
use super::{Provider, ProviderError, RemoteSubscription, RotateError};
use crate::config::ProviderKind;
use crate::evidence::{Evidence, FailureCount, Failures, Finding};
use crate::secret::{ExposeSecret, SecretString, secret};
use crate::skew::Offset;

/// Monite caps `limit` at 100.
const PAGE_LIMIT: u32 = 100;
/// A log or list longer than this many pages is not followed further: the bound
/// keeps a misbehaving cursor from looping forever within the rate limit.
const MAX_PAGES: usize = 50;
/// A confirmation check reads the delivery log newest first, at most this many
/// pages: a success since the publication is at the top once receivers accept the
/// new secret, and a log of failures only has to show that it is still growing.
const EVIDENCE_PAGES: usize = 5;
/// A subscription's url (what its deliveries are matched by) is read again after
/// this long, so a confirmation poll is one request, not two.
const URL_TTL: Duration = Duration::from_secs(3600);
/// Renew this long before the token expires, so no call races its expiry.
const RENEW_MARGIN: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
    #[serde(default)]
    token_type: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Subscription {
    id: String,
    url: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct Rotated {
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize)]
struct Page<T> {
    data: Vec<T>,
    #[serde(default)]
    next_pagination_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delivery {
    id: String,
    url: String,
    #[serde(default)]
    was_successful: Option<bool>,
    #[serde(default)]
    response_status_code: Option<i64>,
}

/// A failed authenticated call: before it was sent (no token) or by its answer.
enum CallError {
    Token(ProviderError),
    Http(HttpError),
}

impl CallError {
    fn into_provider(self) -> ProviderError {
        match self {
            CallError::Token(e) => e,
            CallError::Http(e) => e.into(),
        }
    }
}

struct CachedToken {
    value: SecretString,
    renew_at: Instant,
}

pub struct MoniteClient {
    http: HttpClient,
    client_id: String,
    client_secret: SecretString,
    entity_id: String,
    api_version: String,
    /// One token for the account, shared by every call; the lock also makes
    /// concurrent callers wait for one renewal instead of each asking for a token.
    token: Mutex<Option<CachedToken>>,
    /// Subscription id → (url, when read), for confirmation polls.
    urls: std::sync::Mutex<std::collections::HashMap<String, (String, Instant)>>,
}

/// How long before expiry to renew: a minute, or a tenth of a short lifetime.
fn renew_after(expires_in: Duration) -> Duration {
    expires_in.saturating_sub(RENEW_MARGIN.min(expires_in / 10))
}

impl MoniteClient {
    pub fn new(
        http: HttpClient,
        client_id: String,
        client_secret: SecretString,
        entity_id: String,
        api_version: String,
    ) -> Self {
        MoniteClient {
            http,
            client_id,
            client_secret,
            entity_id,
            api_version,
            token: Mutex::new(None),
            urls: Default::default(),
        }
    }

    fn malformed(&self, what: &str, detail: impl Into<String>) -> ProviderError {
        ProviderError::Malformed {
            provider: self.http.name().to_string(),
            what: what.to_string(),
            detail: detail.into(),
        }
    }

    /// The cached partner token, fetched or renewed when missing or near expiry.
    async fn token(&self) -> Result<SecretString, ProviderError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let what = "POST /auth/token";
        let url = self.http.url("/auth/token");
        let body = serde_json::json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret.expose_secret(),
            "grant_type": "client_credentials",
        });
        // Asking for a token twice is harmless, so it retries like a read.
        let resp = self
            .http
            .send(what, Idempotency::Idempotent, |c| {
                c.post(&url)
                    .header("x-monite-version", &self.api_version)
                    .json(&body)
            })
            .await
            .map_err(ProviderError::from)?;
        let t: TokenResponse = serde_json::from_slice(&resp.body)
            .map_err(|e| self.malformed(what, format!("body is not a token response: {e}")))?;
        if t.access_token.trim().is_empty() || t.expires_in == 0 {
            return Err(self.malformed(what, "empty access_token or expires_in = 0"));
        }
        if let Some(tt) = &t.token_type
            && !tt.eq_ignore_ascii_case("bearer")
        {
            return Err(self.malformed(what, format!("token_type `{tt}` is not Bearer")));
        }
        let value = secret(t.access_token);
        *slot = Some(CachedToken {
            value: value.clone(),
            renew_at: Instant::now() + renew_after(Duration::from_secs(t.expires_in)),
        });
        tracing::debug!(provider = %self.http.name(), expires_in = t.expires_in, "monite partner token obtained");
        Ok(value)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// Sends an authenticated call. A 401 means the token was revoked or expired
    /// early: the call is sent once more with a fresh token. (A 401 is an answer,
    /// so the provider certainly did not act: even rotate may be resent.)
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        entity: bool,
        idempotency: Idempotency,
    ) -> Result<Response, CallError> {
        let what = format!("{method} {path}");
        let url = self.http.url(path);
        let mut renewed = false;
        loop {
            // Without a token the call itself was never sent.
            let token = self.token().await.map_err(CallError::Token)?;
            let result = self
                .http
                .send(&what, idempotency, |c| {
                    let mut r = c
                        .request(method.clone(), &url)
                        .bearer_auth(token.expose_secret())
                        .header("x-monite-version", &self.api_version)
                        .query(query);
                    if entity {
                        r = r.header("x-monite-entity-id", &self.entity_id);
                    }
                    r
                })
                .await;
            match result {
                Err(e) if e.status() == Some(401) && !renewed => {
                    tracing::info!(provider = %self.http.name(), call = %what, "monite token refused; renewing once");
                    self.forget_token().await;
                    renewed = true;
                }
                other => return other.map_err(CallError::Http),
            }
        }
    }

    async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        entity: bool,
    ) -> Result<Response, ProviderError> {
        self.call(
            reqwest::Method::GET,
            path,
            query,
            entity,
            Idempotency::Idempotent,
        )
        .await
        .map_err(CallError::into_provider)
    }

    async fn subscription(&self, id: &str) -> Result<Subscription, ProviderError> {
        let path = format!(
            "/webhook_subscriptions/{}",
            crate::provider::uuid_id("Monite", id)?
        );
        let resp = self.get(&path, &[], false).await?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| self.malformed(&format!("GET {path}"), e.to_string()))
    }

    /// The subscription's url, from a read at most [`URL_TTL`] old.
    async fn url_of(&self, id: &str) -> Result<String, ProviderError> {
        let cached = self
            .urls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(_, at)| at.elapsed() < URL_TTL)
            .map(|(u, _)| u.clone());
        if let Some(u) = cached {
            return Ok(u);
        }
        let url = self.subscription(id).await?.url;
        self.urls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (url.clone(), Instant::now()));
        Ok(url)
    }

    /// Follows `next_pagination_token` through every page. Monite ignores the other
    /// filters once a token is given (the token carries them), so later pages send
    /// only the token and the limit.
    async fn pages<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        first: Vec<(&str, String)>,
        entity: bool,
        mut keep: impl FnMut(Vec<T>) -> bool,
    ) -> Result<(), ProviderError> {
        let what = format!("GET {path}");
        let mut query = first;
        for _ in 0..MAX_PAGES {
            let resp = self.get(path, &query, entity).await?;
            let page: Page<T> = serde_json::from_slice(&resp.body)
                .map_err(|e| self.malformed(&what, e.to_string()))?;
            if !keep(page.data) {
                return Ok(());
            }
            match page.next_pagination_token.filter(|t| !t.is_empty()) {
                None => return Ok(()),
                Some(t) => {
                    query = vec![("limit", PAGE_LIMIT.to_string()), ("pagination_token", t)];
                }
            }
        }
        Err(self.malformed(
            &what,
            format!("more than {MAX_PAGES} pages; refusing to follow the cursor further"),
        ))
    }
}

#[async_trait]
impl Provider for MoniteClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Monite
    }

    async fn preflight(&self, id: &str) -> Result<(), ProviderError> {
        // Fetching the subscription proves the credentials and the id at once.
        let sub = self.subscription(id).await?;
        if sub.status.as_deref() == Some("disabled") {
            return Err(self.malformed(
                &format!("GET /webhook_subscriptions/{id}"),
                "the subscription is disabled at Monite; no delivery could confirm a rotation",
            ));
        }
        Ok(())
    }

    async fn rotate(&self, id: &str) -> Result<SecretString, RotateError> {
        let path = format!(
            "/webhook_subscriptions/{}/regenerate_secret",
            crate::provider::uuid_id("Monite", id).map_err(RotateError::NotRotated)?
        );
        let what = format!("POST {path}");
        let resp = self
            .call(reqwest::Method::POST, &path, &[], false, Idempotency::Once)
            .await
            .map_err(|e| match e {
                CallError::Token(e) => RotateError::NotRotated(e),
                CallError::Http(e) => RotateError::from_http(e),
            })?;
        // 2xx: Monite has regenerated. An unreadable body means the secret is lost.
        super::secret_from_rotate_answer(
            self.http.name(),
            &what,
            &resp.body,
            "`secret`",
            |r: Rotated| r.secret,
        )
    }

    async fn evidence(
        &self,
        id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<Finding, ProviderError> {
        let url = self.url_of(id).await?;
        let anchor = self.http.anchor(published_at, Duration::ZERO);
        let mark = anchor.sent_after();
        let mut found: Option<Delivery> = None;
        let mut failed: Vec<Delivery> = Vec::new();
        let first = vec![
            ("limit", PAGE_LIMIT.to_string()),
            // Full precision: truncating to the second would admit deliveries from
            // just before the publication, which may have used the old secret.
            (
                "created_at__gte",
                mark.to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
            ("sort", "created_at".to_string()),
            ("order", "desc".to_string()),
        ];
        let mut pages = 0;
        self.pages("/webhook_deliveries", first, true, |data: Vec<Delivery>| {
            pages += 1;
            for d in data.into_iter().filter(|d| d.url == url) {
                match d.was_successful {
                    Some(true) => {
                        found = Some(d);
                        return false;
                    }
                    Some(false) => failed.push(d),
                    None => {}
                }
            }
            pages < EVIDENCE_PAGES
        })
        .await?;
        if let Some(d) = found {
            return Ok(Finding::Confirmed(Evidence {
                source: "delivery log".into(),
                stamp: None,
                counted_after: Some(mark),
                offset: Some(anchor.offset),
                detail: format!(
                    "Monite delivery {} to the subscription's url succeeded (status {}), \
                     created after the publication at {}",
                    d.id,
                    super::status_text(d.response_status_code),
                    published_at.to_rfc3339()
                ),
            }));
        }
        // Newest first: the top failure changes with every new one.
        Ok(match failed.first() {
            None => Finding::Nothing,
            Some(d) => Finding::Failing(Failures {
                seen: vec![
                    FailureCount::Listed(u32::try_from(failed.len()).unwrap_or(u32::MAX)),
                    FailureCount::Newest(d.id.clone()),
                ],
                detail: format!(
                    "Monite delivery {} answered {}",
                    d.id,
                    super::status_text(d.response_status_code)
                ),
            }),
        })
    }

    fn clock_offset(&self) -> Option<Offset> {
        self.http.skew().offset()
    }

    async fn list(&self) -> Result<Vec<RemoteSubscription>, ProviderError> {
        let mut out = Vec::new();
        self.pages(
            "/webhook_subscriptions",
            vec![("limit", PAGE_LIMIT.to_string())],
            false,
            |data: Vec<Subscription>| {
                out.extend(data.into_iter().map(|s| RemoteSubscription {
                    active: s.status.as_deref() != Some("disabled"),
                    id: s.id,
                    url: Some(s.url),
                }));
                true
            },
        )
        .await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        assert_eq!(
            renew_after(Duration::from_secs(86400)),
            Duration::from_secs(86340)
        );
        // A short-lived token is renewed at 90 % of its life, not after it died.
        assert_eq!(
            renew_after(Duration::from_secs(30)),
            Duration::from_secs(27)
        );
    }

    #[test]
    fn only_uuids_reach_the_request_path() {
        assert!(crate::provider::uuid_id("Monite", "0c8e5d7a-5a4f-4c33-9a43-7b8c3f0e6f11").is_ok());
        assert!(crate::provider::uuid_id("Monite", "../auth/token").is_err());
        assert!(crate::provider::uuid_id("Monite", "801").is_err());
    }

    use crate::config::RateLimit;
    use crate::sandbox::monite::{Fault, FaultKind, MoniteSim, MoniteSimOptions, Route};
    use crate::sandbox::receiver::{Receiver, tests::MemStore};
    use std::sync::Arc;

    fn client_for(sim: &MoniteSim) -> MoniteClient {
        let o = sim.options();
        let http = HttpClient::new(
            "acme-monite",
            &sim.base_url(),
            Duration::from_secs(5),
            RateLimit {
                count: 1000,
                per: Duration::from_secs(1),
            },
        )
        .expect("http")
        .with_retry(super::super::http::RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(2),
            jitter: true,
        });
        MoniteClient::new(
            http,
            o.client_id.clone(),
            secret(o.client_secret.clone()),
            o.entity_id.clone(),
            "2024-01-31".into(),
        )
    }

    #[tokio::test]
    async fn one_token_serves_many_calls_and_a_401_renews_it_once() {
        let sim = MoniteSim::start(MoniteSimOptions::default())
            .await
            .expect("sim");
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/x");
        let c = client_for(&sim);
        c.preflight(&id).await.expect("preflight");
        c.preflight(&id).await.expect("preflight again");
        assert_eq!(sim.tokens_issued(), 1, "cached");
        sim.expire_tokens();
        c.preflight(&id).await.expect("renewed after 401");
        assert_eq!(sim.tokens_issued(), 2);
        // Bad credentials: rejected, naming the call, never echoing the secret.
        let mut bad = client_for(&sim);
        bad.client_secret = secret("wrong-secret-value");
        let err = bad.preflight(&id).await.unwrap_err();
        assert!(matches!(err, ProviderError::Rejected(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("POST /auth/token") && text.contains("401"),
            "{text}"
        );
        assert!(!text.contains("wrong-secret-value"));
    }

    #[tokio::test]
    async fn a_short_lived_token_is_renewed_before_it_expires() {
        let sim = MoniteSim::start(MoniteSimOptions {
            token_ttl: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("sim");
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/x");
        let c = client_for(&sim);
        c.preflight(&id).await.expect("first");
        tokio::time::sleep(Duration::from_millis(950)).await;
        c.preflight(&id).await.expect("second");
        assert_eq!(sim.tokens_issued(), 2, "renewed at 90 % of its life");
        assert_eq!(sim.request_count(Route::Get), 2, "no call was refused");
    }

    #[tokio::test]
    async fn evidence_is_a_successful_delivery_to_the_url_after_publication() {
        let sim = MoniteSim::start(MoniteSimOptions {
            default_page_size: 2,
            ..Default::default()
        })
        .await
        .expect("sim");
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("rx");
        let (other, other_secret) = sim.add_subscription(&rx.register("monite/other", "o"));
        store.publish("o", &other_secret, None);
        let (id, first) = sim.add_subscription(&rx.register("monite/sub", "p"));
        store.publish("p", &first, None);
        let c = client_for(&sim);
        let new = c.rotate(&id).await.expect("rotate");
        // 2 s back, so that the offset bound measured from the simulator's `Date` (a
        // second wide at first) stays clear of the deliveries below.
        let published = Utc::now() - chrono::Duration::seconds(2);
        // Successes for another subscription's url prove nothing, and failures for
        // ours are receivers refusing the new secret; the log pages by 2, so the
        // match is on a later page.
        for _ in 0..3 {
            assert!(
                sim.deliver(&other, "created")
                    .await
                    .expect("d")
                    .was_successful
            );
        }
        assert!(!sim.deliver(&id, "created").await.expect("d").was_successful);
        match c.evidence(&id, published).await.expect("check") {
            Finding::Failing(f) => assert_eq!(f.seen[0], FailureCount::Listed(1)),
            other => panic!("the failed delivery is a failure: {other:?}"),
        }
        store.publish("p", new.expose_secret(), Some(&first));
        assert!(sim.deliver(&id, "updated").await.expect("d").was_successful);
        let Finding::Confirmed(ev) = c.evidence(&id, published).await.expect("check") else {
            panic!("the successful delivery confirms");
        };
        assert!(ev.detail.contains("Monite delivery"), "{ev}");
        assert_eq!(ev.source, "delivery log");
        // Deliveries before the publication (plus the offset) do not count.
        let later = Utc::now() + chrono::Duration::seconds(5);
        assert_eq!(
            c.evidence(&id, later).await.expect("check"),
            Finding::Nothing
        );
        let listed = c.list().await.expect("list");
        assert_eq!(listed.len(), 2, "both pages");
    }

    #[tokio::test]
    async fn rotate_outcomes_are_classified_for_safety() {
        let sim = MoniteSim::start(MoniteSimOptions::default())
            .await
            .expect("sim");
        let (id, first) = sim.add_subscription("http://127.0.0.1:9/x");
        let c = client_for(&sim);
        sim.inject(Fault {
            route: Route::Rotate,
            kind: FaultKind::Status(422),
        });
        assert!(matches!(
            c.rotate(&id).await,
            Err(RotateError::NotRotated(_))
        ));
        sim.inject(Fault {
            route: Route::Rotate,
            kind: FaultKind::CommitThenTruncate,
        });
        assert!(matches!(c.rotate(&id).await, Err(RotateError::Unknown(_))));
        assert_ne!(sim.secret_of(&id).as_deref(), Some(first.as_str()));
        sim.inject(Fault {
            route: Route::Rotate,
            kind: FaultKind::Status(500),
        });
        assert!(matches!(c.rotate(&id).await, Err(RotateError::Unknown(_))));
        let s = c.rotate(&id).await.expect("rotate");
        assert_eq!(sim.secret_of(&id).as_deref(), Some(s.expose_secret()));
        // No token, no rotate call: certainly not rotated, even on a 5xx.
        let fresh = client_for(&sim);
        sim.inject(Fault {
            route: Route::Token,
            kind: FaultKind::Status(503),
        });
        sim.inject(Fault {
            route: Route::Token,
            kind: FaultKind::Status(503),
        });
        assert!(matches!(
            fresh.rotate(&id).await,
            Err(RotateError::NotRotated(_))
        ));
        assert_eq!(
            sim.request_count(Route::Rotate),
            4,
            "the rotate was never sent"
        );
    }

    #[tokio::test]
    async fn token_requests_share_the_accounts_rate_limiter() {
        let sim = MoniteSim::start(MoniteSimOptions::default())
            .await
            .expect("sim");
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/x");
        let o = sim.options();
        // One request per 300 ms, no burst beyond one.
        let http = HttpClient::new(
            "acme-monite",
            &sim.base_url(),
            Duration::from_secs(5),
            RateLimit {
                count: 1,
                per: Duration::from_millis(300),
            },
        )
        .expect("http");
        let c = MoniteClient::new(
            http,
            o.client_id.clone(),
            secret(o.client_secret.clone()),
            o.entity_id.clone(),
            "2024-01-31".into(),
        );
        let started = std::time::Instant::now();
        // Token, subscription, then the subscription again: three calls, two waits.
        c.preflight(&id).await.expect("preflight");
        c.preflight(&id).await.expect("preflight");
        assert!(
            started.elapsed() >= Duration::from_millis(590),
            "the token request counted against the limit: {:?}",
            started.elapsed()
        );
        assert_eq!(sim.request_count(Route::Token), 1);
    }
}
