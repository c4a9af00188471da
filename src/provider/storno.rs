//! Storno (`kind = "storno"`): an API key or a JWT, one company per account.
//!
//! An API key (`af_…`) is sent as `Authorization: af_…` with no scheme, anything
//! else as a bearer JWT; `X-Company` picks the company. Rotate is
//! `POST /webhooks/{uuid}/regenerate-secret`; the backend answers
//! `{data: {…, secret}, secret}` while the public reference shows the bare object,
//! so both are read. Confirmation is active: Storno can send a signed test delivery
//! on demand (`POST /webhooks/{uuid}/test`) and reports whether the receiver
//! accepted it, so rekey does not have to wait for real traffic. Real deliveries
//! (`GET /webhooks/{uuid}/deliveries`) that succeeded after the publication count
//! as evidence too and are checked first, which spares the receiver a test event.
//!
//! **Evidence rule.** Storno signs each attempt when it sends it (its retry endpoint
//! exists to resend, with the live secret, what failed while a secret changed). A
//! logged delivery counts if its last attempt was *sent* after the publication plus
//! the measured clock offset: sent = `completedAt − durationMs` (or, without a
//! duration, `completedAt − longest_delivery`), and never earlier than `triggeredAt`.
//! The test delivery needs no clock at all: rekey asks for it after the publication
//! and Storno signs it then with the live secret. Failed logged deliveries past the
//! same mark, and a failed test delivery, are receivers refusing the new secret.
//! Worst case: a confirmation by the log is seen the offset later than it could
//! have been; the test delivery confirms at the first check.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::http::{HttpClient, HttpError, Idempotency, Response};
use super::{Provider, ProviderError, Redelivery, RemoteSubscription, RotateError};
use crate::config::ProviderKind;
use crate::evidence::{Anchor, Evidence, FailureCount, Failures, Finding};
use crate::secret::{ExposeSecret, SecretString};
use crate::skew::Offset;

/// Storno caps `limit` at 100.
const PAGE_LIMIT: u64 = 100;
/// The delivery log is read at most this many pages deep per check.
const MAX_PAGES: u64 = 20;
/// The prefix that marks a Storno API key (sent without `Bearer`).
const API_KEY_PREFIX: &str = "af_";

/// An endpoint as the backend (`id`) or the public reference (`uuid`) names it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    is_active: Option<bool>,
    /// Masked on reads (`***` + the last 8 characters); full only from rotate.
    #[serde(default)]
    secret: Option<String>,
}

impl Endpoint {
    fn ident(&self) -> Option<&str> {
        self.id.as_deref().or(self.uuid.as_deref())
    }
}

/// `{data: T}` or a bare `T`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Wrapped<T> {
    Data { data: T },
    Bare(T),
}

impl<T> Wrapped<T> {
    fn into_inner(self) -> T {
        match self {
            Wrapped::Data { data } | Wrapped::Bare(data) => data,
        }
    }
}

#[derive(Deserialize)]
struct Rotated {
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    data: Option<Endpoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestResult {
    success: bool,
    #[serde(default)]
    status_code: Option<i64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Delivery {
    pub(crate) id: String,
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) event_type: Option<String>,
    #[serde(default)]
    pub(crate) triggered_at: Option<String>,
    #[serde(default)]
    pub(crate) completed_at: Option<String>,
    #[serde(default)]
    pub(crate) duration_ms: Option<u64>,
}

impl Delivery {
    /// When the last attempt was sent, hence signed (Storno's clock): its completion
    /// minus its duration, or minus `longest` when the log gives no duration, and
    /// never before the delivery was triggered. Only an attempt *sent* after the
    /// publication is known to carry the new secret; one sent earlier and completed
    /// later may have been signed with the old one.
    fn sent_at(&self, longest: std::time::Duration) -> Option<DateTime<Utc>> {
        let done = parse_time(self.completed_at.as_deref())?;
        let took = match self.duration_ms {
            Some(ms) => chrono::Duration::milliseconds(i64::try_from(ms).ok()?),
            None => chrono::Duration::from_std(longest).ok()?,
        };
        let sent = done.checked_sub_signed(took)?;
        Some(match parse_time(self.triggered_at.as_deref()) {
            Some(t) => sent.max(t),
            None => sent,
        })
    }
}

#[derive(Deserialize)]
struct DeliveryPage {
    data: Vec<Delivery>,
    #[serde(default)]
    meta: Option<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    total: Option<u64>,
}

pub struct StornoClient {
    http: HttpClient,
    token: SecretString,
    company: String,
    longest_delivery: std::time::Duration,
}

/// The `Authorization` value for a credential: API keys go bare, JWTs as bearer.
pub fn authorization(token: &str) -> String {
    if token.starts_with(API_KEY_PREFIX) {
        token.to_string()
    } else {
        format!("Bearer {token}")
    }
}

fn parse_time(v: Option<&str>) -> Option<DateTime<Utc>> {
    v.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl StornoClient {
    pub fn new(http: HttpClient, token: SecretString, company: String) -> Self {
        StornoClient {
            http,
            token,
            company,
            longest_delivery: ProviderKind::Storno.default_longest_delivery(),
        }
    }

    /// The longest a delivery can take (`longest_delivery` in the config).
    pub fn with_longest_delivery(mut self, d: std::time::Duration) -> Self {
        self.longest_delivery = d;
        self
    }

    fn malformed(&self, what: &str, detail: impl Into<String>) -> ProviderError {
        ProviderError::Malformed {
            provider: self.http.name().to_string(),
            what: what.to_string(),
            detail: detail.into(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        idempotency: Idempotency,
    ) -> Result<Response, HttpError> {
        let url = self.http.url(path);
        // The header value is a copy of the credential: wiped when the call ends.
        let auth = zeroize::Zeroizing::new(authorization(self.token.expose_secret()));
        self.http
            .send(&format!("{method} {path}"), idempotency, |c| {
                c.request(method.clone(), &url)
                    .header(reqwest::header::AUTHORIZATION, auth.as_str())
                    .header("X-Company", &self.company)
                    .query(query)
            })
            .await
    }

    async fn endpoint(&self, id: &str) -> Result<Endpoint, ProviderError> {
        let path = format!("/webhooks/{}", crate::provider::uuid_id("Storno", id)?);
        let resp = self
            .send(reqwest::Method::GET, &path, &[], Idempotency::Idempotent)
            .await
            .map_err(ProviderError::from)?;
        serde_json::from_slice::<Wrapped<Endpoint>>(&resp.body)
            .map(Wrapped::into_inner)
            .map_err(|e| self.malformed(&format!("GET {path}"), e.to_string()))
    }

    /// The last characters of the live secret as Storno shows them (`***` + 8),
    /// for drift detection; `None` when the endpoint shows no masked secret.
    pub async fn masked_secret_tail(&self, id: &str) -> Result<Option<String>, ProviderError> {
        let ep = self.endpoint(id).await?;
        Ok(ep
            .secret
            .as_deref()
            .and_then(|s| s.strip_prefix("***"))
            .filter(|t| !t.is_empty())
            .map(str::to_string))
    }

    /// Deliveries, newest pages first, until `keep` says stop or the log ends.
    async fn deliveries(
        &self,
        id: &str,
        mut keep: impl FnMut(&Delivery) -> bool,
    ) -> Result<(), ProviderError> {
        let path = format!(
            "/webhooks/{}/deliveries",
            crate::provider::uuid_id("Storno", id)?
        );
        let what = format!("GET {path}");
        for page in 1..=MAX_PAGES {
            let query = [
                ("page", page.to_string()),
                ("limit", PAGE_LIMIT.to_string()),
            ];
            let resp = self
                .send(reqwest::Method::GET, &path, &query, Idempotency::Idempotent)
                .await
                .map_err(ProviderError::from)?;
            let p: DeliveryPage = serde_json::from_slice(&resp.body)
                .map_err(|e| self.malformed(&what, e.to_string()))?;
            let n = p.data.len() as u64;
            for d in &p.data {
                if !keep(d) {
                    return Ok(());
                }
            }
            let total = p.meta.and_then(|m| m.total).unwrap_or(0);
            if n < PAGE_LIMIT || page * PAGE_LIMIT >= total {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Failed deliveries triggered in `[from, to]` (rekey's clock): the ones a
    /// receiver may have rejected while it did not yet hold the new secret. The
    /// window is moved onto Storno's clock by the measured offset, widened both ways,
    /// and widened to whole seconds for Storno's coarser timestamps: a failed delivery
    /// just outside it is redelivered too, which costs a duplicate at worst, while one
    /// missed would be an event lost.
    pub async fn failed_between(
        &self,
        id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<String>, ProviderError> {
        let (from, to) = self.http.skew().offset_or_assumed().covering(from, to);
        let from = from - chrono::Duration::seconds(1);
        let to = to + chrono::Duration::seconds(1);
        let mut out = Vec::new();
        self.deliveries(id, |d| {
            let t = parse_time(d.triggered_at.as_deref());
            if d.status == "failed" && t.is_some_and(|t| t >= from && t <= to) {
                out.push(d.id.clone());
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// A logged delivery sent after the publication that succeeded (evidence), or
    /// else the ids of those that failed.
    async fn logged_evidence(
        &self,
        id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<(Option<Evidence>, Vec<String>), ProviderError> {
        let mut found = None;
        let mut failed = Vec::new();
        // The offset known before the first page; the pages only narrow it.
        let anchor: Anchor = self.http.anchor(published_at, self.longest_delivery);
        let mark = anchor.sent_after();
        self.deliveries(id, |d| {
            let Some(sent) = d.sent_at(self.longest_delivery).filter(|t| *t > mark) else {
                return true;
            };
            match d.status.as_str() {
                "success" => {
                    found = Some(anchor.evidence(
                        "delivery sent",
                        sent,
                        mark,
                        format!(
                            "Storno delivery {} ({}) sent at {} succeeded, after the \
                             publication at {}",
                            d.id,
                            d.event_type.as_deref().unwrap_or("?"),
                            sent.to_rfc3339(),
                            published_at.to_rfc3339()
                        ),
                    ));
                    false
                }
                "failed" => {
                    failed.push(d.id.clone());
                    true
                }
                _ => true,
            }
        })
        .await?;
        Ok((found, failed))
    }

    /// Asks Storno to send a signed test delivery now and says how it went.
    async fn test_delivery(&self, id: &str) -> Result<TestResult, ProviderError> {
        let path = format!("/webhooks/{}/test", crate::provider::uuid_id("Storno", id)?);
        let what = format!("POST {path}");
        let resp = self
            .send(reqwest::Method::POST, &path, &[], Idempotency::Idempotent)
            .await
            .map_err(ProviderError::from)?;
        serde_json::from_slice(&resp.body).map_err(|e| self.malformed(&what, e.to_string()))
    }

    /// Asks Storno to deliver a failed delivery again (signed with the live secret).
    pub async fn retry_delivery(&self, id: &str, delivery: &str) -> Result<(), ProviderError> {
        let delivery = crate::provider::uuid_id("Storno", delivery)?;
        let path = format!(
            "/webhooks/{}/deliveries/{delivery}/retry",
            crate::provider::uuid_id("Storno", id)?
        );
        // A duplicate retry only means a duplicate delivery, which receivers must
        // tolerate anyway (providers retry); but do not multiply them on timeouts.
        let resp = self
            .send(reqwest::Method::POST, &path, &[], Idempotency::Once)
            .await
            .map_err(ProviderError::from)?;
        // Storno answers 202 `{"status":"queued"}`; a 2xx without it (a proxy's page,
        // say) queued nothing and must not be recorded as a redelivery.
        let queued = serde_json::from_slice::<serde_json::Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_owned));
        if queued.as_deref() == Some("queued") {
            Ok(())
        } else {
            Err(self.malformed(
                &format!("POST {path}"),
                "answered 2xx without `\"status\": \"queued\"`; nothing was queued",
            ))
        }
    }
}

#[async_trait]
impl Provider for StornoClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Storno
    }

    async fn preflight(&self, id: &str) -> Result<(), ProviderError> {
        let ep = self.endpoint(id).await?;
        if ep.is_active == Some(false) {
            return Err(self.malformed(
                &format!("GET /webhooks/{id}"),
                "the webhook is disabled at Storno; no delivery could confirm a rotation",
            ));
        }
        Ok(())
    }

    async fn rotate(&self, id: &str) -> Result<SecretString, RotateError> {
        let path = format!(
            "/webhooks/{}/regenerate-secret",
            crate::provider::uuid_id("Storno", id).map_err(RotateError::NotRotated)?
        );
        let what = format!("POST {path}");
        let resp = self
            .send(reqwest::Method::POST, &path, &[], Idempotency::Once)
            .await
            .map_err(RotateError::from_http)?;
        // The top-level `secret` is the backend's; `data.secret` is full there too,
        // and the only place in the unwrapped shape is top level.
        super::secret_from_rotate_answer(
            self.http.name(),
            &what,
            &resp.body,
            "an unmasked `secret`",
            |r: Rotated| r.secret.or_else(|| r.data.and_then(|d| d.secret)),
        )
    }

    async fn evidence(
        &self,
        id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<Finding, ProviderError> {
        let (logged, failed) = match self.logged_evidence(id, published_at).await {
            Ok((Some(ev), _)) => return Ok(Finding::Confirmed(ev)),
            Ok((None, failed)) => (true, failed),
            Err(e) => {
                // The test delivery below is evidence of its own: a delivery list this
                // key cannot read must not hold every rotation until its deadline.
                tracing::warn!(subscription = id, error = %e, "cannot read the delivery list; probing with a test delivery");
                (false, Vec::new())
            }
        };
        // No real delivery yet: probe. The test is signed with the live (new) secret
        // and sent now, after the publication, so success means the receiver holds it.
        let t = self.test_delivery(id).await?;
        if t.success {
            return Ok(Finding::Confirmed(Evidence::untimed(
                "test delivery",
                format!(
                    "Storno test delivery accepted by the receiver (status {}), sent after \
                     the publication at {}",
                    super::status_text(t.status_code),
                    published_at.to_rfc3339()
                ),
            )));
        }
        let mut seen = vec![FailureCount::Probe];
        if logged && let Some(newest) = failed.first() {
            // The log is newest first: its top failure changes with every new one.
            seen.push(FailureCount::Listed(
                u32::try_from(failed.len()).unwrap_or(u32::MAX),
            ));
            seen.push(FailureCount::Newest(newest.clone()));
        }
        Ok(Finding::Failing(Failures {
            seen,
            detail: format!(
                "Storno test delivery refused (status {}{})",
                super::status_text(t.status_code),
                t.error
                    .as_deref()
                    .map(|e| format!(": {}", e.chars().take(200).collect::<String>()))
                    .unwrap_or_default()
            ),
        }))
    }

    fn clock_offset(&self) -> Option<Offset> {
        self.http.skew().offset()
    }

    fn shows_secret_hint(&self) -> bool {
        true
    }

    async fn secret_hint(&self, id: &str) -> Result<Option<String>, ProviderError> {
        self.masked_secret_tail(id).await
    }

    async fn redeliver(
        &self,
        id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Redelivery, ProviderError> {
        let mut out = Redelivery::default();
        // One refused retry must not keep the others from being redelivered.
        for delivery in self.failed_between(id, from, to).await? {
            match self.retry_delivery(id, &delivery).await {
                Ok(()) => out.done.push(delivery),
                Err(e) => out.failed.push((delivery, e.to_string())),
            }
        }
        Ok(out)
    }

    async fn list(&self) -> Result<Vec<RemoteSubscription>, ProviderError> {
        let resp = self
            .send(
                reqwest::Method::GET,
                "/webhooks",
                &[],
                Idempotency::Idempotent,
            )
            .await
            .map_err(ProviderError::from)?;
        let list: Wrapped<Vec<Endpoint>> = serde_json::from_slice(&resp.body)
            .map_err(|e| self.malformed("GET /webhooks", e.to_string()))?;
        list.into_inner()
            .into_iter()
            .map(|e| {
                let id = e
                    .ident()
                    .ok_or_else(|| self.malformed("GET /webhooks", "an endpoint without an id"))?
                    .to_string();
                Ok(RemoteSubscription {
                    id,
                    url: e.url,
                    active: e.is_active.unwrap_or(true),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_go_bare_and_jwts_as_bearer() {
        assert_eq!(authorization("af_live_123"), "af_live_123");
        assert_eq!(authorization("eyJhbGciOi.x.y"), "Bearer eyJhbGciOi.x.y");
    }

    #[test]
    fn both_rotate_shapes_yield_the_secret() {
        let wrapped: Rotated =
            serde_json::from_str(r#"{"data":{"id":"a","secret":"abc"},"secret":"abc"}"#).unwrap();
        assert_eq!(wrapped.secret.as_deref(), Some("abc"));
        let bare: Rotated =
            serde_json::from_str(r#"{"uuid":"a","url":"u","secret":"whsec_x"}"#).unwrap();
        assert_eq!(bare.secret.as_deref(), Some("whsec_x"));
        let data_only: Rotated =
            serde_json::from_str(r#"{"data":{"id":"a","secret":"s"}}"#).unwrap();
        assert_eq!(data_only.data.and_then(|d| d.secret).as_deref(), Some("s"));
    }

    #[test]
    fn endpoints_are_read_wrapped_or_bare() {
        let w: Wrapped<Endpoint> =
            serde_json::from_str(r#"{"data":{"id":"a","secret":"***12345678"}}"#).unwrap();
        assert_eq!(w.into_inner().ident(), Some("a"));
        let b: Wrapped<Endpoint> =
            serde_json::from_str(r#"{"uuid":"b","isActive":false}"#).unwrap();
        let b = b.into_inner();
        assert_eq!((b.ident(), b.is_active), (Some("b"), Some(false)));
    }

    use std::sync::Arc;
    use std::time::Duration;

    use crate::config::RateLimit;
    use crate::sandbox::receiver::{Receiver, tests::MemStore};
    use crate::sandbox::storno::{AuthSeen, StornoSim, StornoSimOptions, masked};

    fn client_for(sim: &StornoSim, token: &str) -> StornoClient {
        let http = HttpClient::new(
            "acme-storno",
            &sim.base_url(),
            Duration::from_secs(5),
            RateLimit {
                count: 1000,
                per: Duration::from_secs(1),
            },
        )
        .expect("http");
        StornoClient::new(
            http,
            crate::secret::secret(token),
            sim.options().company.clone(),
        )
    }

    #[tokio::test]
    async fn api_key_and_jwt_reach_storno_in_their_own_header_forms() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let o = sim.options().clone();
        let (id, _) = sim.add_endpoint("http://127.0.0.1:9/x");
        client_for(&sim, &o.api_key)
            .preflight(&id)
            .await
            .expect("api key");
        client_for(&sim, &o.jwt).preflight(&id).await.expect("jwt");
        assert_eq!(sim.auth_seen(), vec![AuthSeen::ApiKey, AuthSeen::Jwt]);
        let err = client_for(&sim, &o.expired_jwt)
            .preflight(&id)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Rejected(_)));
        assert!(
            err.to_string().contains("401") && err.to_string().contains("Expired JWT Token"),
            "{err}"
        );
        let err = client_for(&sim, "af_revoked")
            .preflight(&id)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("403") && err.to_string().contains("Invalid API Token"),
            "{err}"
        );
        assert!(!err.to_string().contains("af_revoked"));
    }

    #[tokio::test]
    async fn both_rotate_response_shapes_give_the_live_secret() {
        for unwrapped in [false, true] {
            let sim = StornoSim::start(StornoSimOptions {
                unwrapped,
                ..Default::default()
            })
            .await
            .expect("sim");
            let (id, first) = sim.add_endpoint("http://127.0.0.1:9/x");
            let c = client_for(&sim, &sim.options().api_key.clone());
            let new = c.rotate(&id).await.expect("rotate");
            assert_ne!(new.expose_secret(), first);
            assert_eq!(sim.secret_of(&id).as_deref(), Some(new.expose_secret()));
            let tail = c
                .masked_secret_tail(&id)
                .await
                .expect("masked")
                .expect("tail");
            assert_eq!(format!("***{tail}"), masked(new.expose_secret()));
        }
    }

    #[tokio::test]
    async fn evidence_from_a_real_delivery_or_else_an_active_test() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("rx");
        let (id, first) = sim.add_endpoint(&rx.register("storno/e", "p"));
        store.publish("p", &first, None);
        let c = client_for(&sim, &sim.options().api_key.clone());
        let new = c.rotate(&id).await.expect("rotate");
        // Unpublished: no real success, and the test delivery is rejected. The
        // publication is put 2 s back so that the offset bound measured from the
        // simulator's `Date` (a second wide at first) stays clear of what follows.
        let since = Utc::now() - chrono::Duration::seconds(2);
        match c.evidence(&id, since).await.expect("check") {
            Finding::Failing(f) => assert_eq!(f.seen, vec![FailureCount::Probe]),
            other => panic!("a refused test delivery is a failure: {other:?}"),
        }
        assert_eq!(rx.stats("storno/e").rejected, 1);
        store.publish("p", new.expose_secret(), Some(&first));
        let Finding::Confirmed(ev) = c.evidence(&id, since).await.expect("check") else {
            panic!("the accepted test delivery confirms");
        };
        assert_eq!(ev.source, "test delivery");
        assert!(
            c.clock_offset().is_some(),
            "measured from the answers' Date"
        );
        // A real success after `since` is found first; no test is sent then.
        let tests_before = sim.request_count(crate::sandbox::storno::Route::Test);
        assert_eq!(
            sim.deliver(&id, "invoice.created").await.expect("d").status,
            "success"
        );
        let Finding::Confirmed(ev) = c.evidence(&id, since).await.expect("check") else {
            panic!("the real delivery confirms");
        };
        assert!(ev.detail.contains("invoice.created"), "{ev}");
        assert!(ev.counted_after.is_some() && ev.offset.is_some(), "{ev:?}");
        assert_eq!(
            sim.request_count(crate::sandbox::storno::Route::Test),
            tests_before
        );
    }

    #[tokio::test]
    async fn failed_deliveries_in_a_window_are_found_and_retried() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("rx");
        let (id, first) = sim.add_endpoint(&rx.register("storno/e", "p"));
        store.publish("p", &first, None);
        let c = client_for(&sim, &sim.options().api_key.clone());
        let before = sim.deliver(&id, "invoice.created").await.expect("d");
        let from = Utc::now();
        let new = c.rotate(&id).await.expect("rotate");
        let lost = sim.deliver(&id, "invoice.validated").await.expect("d");
        assert_eq!(lost.status, "failed");
        let to = Utc::now();
        store.publish("p", new.expose_secret(), Some(&first));
        let failed = c.failed_between(&id, from, to).await.expect("list");
        assert_eq!(failed, vec![lost.id.clone()]);
        assert!(!failed.contains(&before.id));
        c.retry_delivery(&id, &lost.id).await.expect("retry");
        assert_eq!(sim.retries(), vec![lost.id.clone()]);
    }

    #[tokio::test]
    async fn list_reads_every_endpoint_with_its_state() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let (a, _) = sim.add_endpoint("http://127.0.0.1:9/a");
        let (b, _) = sim.add_endpoint("http://127.0.0.1:9/b");
        let c = client_for(&sim, &sim.options().api_key.clone());
        let mut listed = c.list().await.expect("list");
        listed.sort_by(|x, y| x.id.cmp(&y.id));
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(
            listed.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            want
        );
        assert!(listed.iter().all(|r| r.active && r.url.is_some()));
    }
}
