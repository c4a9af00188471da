//! Webhook providers, behind one trait.
//!
//! A provider module holds only what is specific to that provider: its endpoints,
//! wire types, and what counts as evidence. Everything shared — timeouts, retries with
//! backoff, `Retry-After`, rate limiting, request-id logging, error mapping — lives once
//! in [`http`].

pub mod fintoro;
pub mod http;
pub mod monite;
pub mod storno;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::config::{KindSettings, ProviderKind, ProviderSettings};
use crate::evidence::Finding;
use crate::secret::SecretString;
use crate::skew::Offset;

pub use http::{HttpClient, HttpError, RawResponse, Transport, TransportError};

/// Why a provider call failed, classified by what it means for the rotation.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered and refused (401/403/404/422…): retrying will not help
    /// until an operator fixes something. For rotate: nothing was rotated.
    #[error("{0}")]
    Rejected(HttpError),
    /// The call may succeed later (5xx, 429, timeouts, connection problems) and retries
    /// were exhausted.
    #[error("{0}")]
    Unavailable(HttpError),
    /// The provider answered 2xx with something rekey cannot understand.
    #[error("{provider}: unexpected response to {what}: {detail}")]
    Malformed {
        provider: String,
        what: String,
        detail: String,
    },
}

impl From<HttpError> for ProviderError {
    /// Transient failures (5xx, 429, timeouts, connection trouble) may heal; anything
    /// else the provider refused.
    fn from(e: HttpError) -> Self {
        if e.is_transient() {
            ProviderError::Unavailable(e)
        } else {
            ProviderError::Rejected(e)
        }
    }
}

/// The outcome of a rotate call. The distinction matters because the response is the
/// only copy of the new secret.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The provider certainly did not rotate: the published secret still verifies.
    #[error("{0}")]
    NotRotated(ProviderError),
    /// The provider may have rotated and the response with the secret was lost.
    #[error("{0}")]
    Unknown(ProviderError),
}

impl RotateError {
    /// A rotate call that failed on the wire: "not rotated" only where the provider
    /// certainly did not act (it refused, or the connection never opened); anything
    /// else may have rotated, and the secret would then be lost.
    pub fn from_http(e: HttpError) -> Self {
        if e.certainly_not_applied() {
            RotateError::NotRotated(e.into())
        } else {
            RotateError::Unknown(e.into())
        }
    }
}

/// Reads the new secret from a 2xx rotate answer. The provider has rotated by then, so
/// an answer rekey cannot use — not the expected JSON, or no (unmasked) secret in it —
/// means the secret is lost ([`RotateError::Unknown`]), never "not rotated".
#[allow(
    clippy::result_large_err,
    reason = "the error `Provider::rotate` returns; it is built once per rotation, not on a hot path"
)]
pub(crate) fn secret_from_rotate_answer<T: serde::de::DeserializeOwned>(
    provider: &str,
    what: &str,
    body: &[u8],
    missing: &str,
    pick: impl FnOnce(T) -> Option<String>,
) -> Result<SecretString, RotateError> {
    let unusable = |detail: String| {
        RotateError::Unknown(ProviderError::Malformed {
            provider: provider.to_string(),
            what: what.to_string(),
            detail,
        })
    };
    let answer: T = serde_json::from_slice(body)
        .map_err(|e| unusable(format!("body is not the expected JSON: {e}")))?;
    pick(answer)
        .filter(|s| !s.trim().is_empty() && !s.starts_with("***"))
        .map(crate::secret::secret)
        .ok_or_else(|| unusable(format!("2xx without {missing}")))
}

/// Checks that a subscription id is a uuid (Monite, Storno), which also keeps anything
/// else out of request paths.
pub(crate) fn uuid_id<'a>(kind: &str, id: &'a str) -> Result<&'a str, ProviderError> {
    if uuid::Uuid::parse_str(id).is_ok() {
        Ok(id)
    } else {
        Err(ProviderError::Malformed {
            provider: kind.to_string(),
            what: "subscription id".into(),
            detail: format!("`{id}` is not a {kind} subscription id (a uuid)"),
        })
    }
}

/// A delivery's HTTP status for people, `-` when the provider gave none.
pub(crate) fn status_text(code: Option<i64>) -> String {
    code.map_or_else(|| "-".to_string(), |c| c.to_string())
}

/// What a redelivery pass did: the deliveries the provider queued again, and those
/// it would not, with why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Redelivery {
    pub done: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// What a provider knows about one of its subscriptions, for discovery and status.
#[derive(Debug, Clone)]
pub struct RemoteSubscription {
    pub id: String,
    pub url: Option<String>,
    pub active: bool,
}

/// One webhook provider account.
#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// Cheap checks before a rotation: credentials valid, subscription exists. A failure
    /// here stops the rotation before anything changes.
    async fn preflight(&self, id: &str) -> Result<(), ProviderError>;

    /// Rotates the subscription's secret and returns the new one.
    async fn rotate(&self, id: &str) -> Result<SecretString, RotateError>;

    /// Looks for a delivery signed with the new secret, published (by rekey's clock)
    /// at `published_at`: one that succeeded confirms; ones that failed, with none
    /// succeeding, say receivers reject the new secret. Each provider's rule — why a
    /// delivery signed before the publication cannot count — is in its module doc
    /// and `docs/providers.md`.
    async fn evidence(
        &self,
        id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<Finding, ProviderError>;

    /// The provider's clock offset from rekey's, as measured from its answers
    /// (`None` before the first answer with a usable `Date`).
    fn clock_offset(&self) -> Option<Offset>;

    /// Every subscription the account has (discovery).
    async fn list(&self) -> Result<Vec<RemoteSubscription>, ProviderError>;

    /// Whether [`Provider::secret_hint`] can show anything: only then is drift
    /// checked (each check is a request).
    fn shows_secret_hint(&self) -> bool {
        false
    }

    /// The last characters of the live secret, where the provider shows them (Storno:
    /// masked `***` + last 8), for drift detection; `None` where it shows nothing.
    async fn secret_hint(&self, _id: &str) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Asks the provider to deliver again what failed in `[from, to]` — the exposure
    /// window, when deliveries were signed with a secret receivers did not have yet —
    /// now that the new secret is published. Every failed delivery is tried, whatever
    /// happened to the others; an error means the failed deliveries could not even be
    /// listed. Providers without a retry endpoint redeliver nothing (their own retries
    /// must do).
    async fn redeliver(
        &self,
        _id: &str,
        _from: DateTime<Utc>,
        _to: DateTime<Utc>,
    ) -> Result<Redelivery, ProviderError> {
        Ok(Redelivery::default())
    }
}

/// Builds the client for a configured provider account.
pub fn build(
    settings: &ProviderSettings,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Provider>, HttpError> {
    build_with(settings, clock, None, None)
}

/// As [`build`], sending through `transport` instead of the network, and retrying by
/// `retry`, when given (the deterministic simulation runs the production clients this
/// way, with a retry policy without random jitter).
pub fn build_with(
    settings: &ProviderSettings,
    clock: Arc<dyn Clock>,
    transport: Option<Arc<dyn Transport>>,
    retry: Option<http::RetryPolicy>,
) -> Result<Arc<dyn Provider>, HttpError> {
    let mut http = HttpClient::new(
        &settings.name,
        &settings.base_url,
        settings.timeout,
        settings.rate_limit,
    )?
    .with_clock(clock);
    if let Some(t) = transport {
        http = http.with_transport(t);
    }
    if let Some(r) = retry {
        http = http.with_retry(r);
    }
    Ok(match &settings.settings {
        KindSettings::Fintoro => Arc::new(
            fintoro::FintoroClient::new(http, settings.token.clone())
                .with_longest_delivery(settings.longest_delivery),
        ),
        KindSettings::Monite {
            client_id,
            entity_id,
            api_version,
        } => Arc::new(monite::MoniteClient::new(
            http,
            client_id.clone(),
            settings.token.clone(),
            entity_id.clone(),
            api_version.clone(),
        )),
        KindSettings::Storno { company } => Arc::new(
            storno::StornoClient::new(http, settings.token.clone(), company.clone())
                .with_longest_delivery(settings.longest_delivery),
        ),
    })
}
