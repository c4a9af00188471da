//! Fintoro (`kind = "fintoro"`): one bearer token per company.
//!
//! Rotate is `POST /webhook-subscriptions/{id}/rotate-secret`, answering the
//! subscription with `plainTextSecret` — the only copy of the new secret. Fintoro has no
//! delivery log and no test endpoint; the only confirmation signals are `lastSuccessAt`
//! and `lastFailureAt` on the subscription, and both say when a delivery *completed*.
//!
//! **Evidence rule.** A success counts only if `lastSuccessAt` is later than the
//! publication, plus the provider's measured clock offset, plus `longest_delivery`
//! (Fintoro's 10 s delivery timeout): such a delivery was sent, so signed, after the
//! publication. Fintoro signs every attempt when it sends it (its `webhook-timestamp`
//! must be within ±300 s of receipt, which a retry 1000 s later could not meet
//! otherwise), so a retry of an older event counts only if its attempt was sent after
//! the publication — and then it carried the new secret. A `lastFailureAt` past the
//! same mark with no such success is a delivery signed with the new secret that a
//! receiver refused. Worst case: a confirmation is seen up to `longest_delivery` plus
//! the offset later than it could have been.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::http::{HttpClient, HttpError, Idempotency, Response};
use super::{Provider, ProviderError, RemoteSubscription, RotateError};
use crate::config::ProviderKind;
use crate::evidence::{FailureCount, Failures, Finding};
use crate::secret::{ExposeSecret, SecretString};
use crate::skew::Offset;

/// The fields rekey reads from a `WebhookSubscription`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WebhookSubscription {
    id: serde_json::Value,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    is_active: Option<bool>,
    #[serde(default)]
    last_success_at: Option<String>,
    #[serde(default)]
    last_failure_at: Option<String>,
    #[serde(default)]
    disabled_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rotated {
    #[serde(default)]
    plain_text_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
struct List {
    data: Vec<WebhookSubscription>,
}

pub struct FintoroClient {
    http: HttpClient,
    token: SecretString,
    longest_delivery: std::time::Duration,
}

impl FintoroClient {
    pub fn new(http: HttpClient, token: SecretString) -> Self {
        FintoroClient {
            http,
            token,
            longest_delivery: ProviderKind::Fintoro.default_longest_delivery(),
        }
    }

    /// The longest a delivery can take (`longest_delivery` in the config).
    pub fn with_longest_delivery(mut self, d: std::time::Duration) -> Self {
        self.longest_delivery = d;
        self
    }

    async fn get(&self, path: &str) -> Result<Response, HttpError> {
        let url = self.http.url(path);
        self.http
            .send(&format!("GET {path}"), Idempotency::Idempotent, |c| {
                c.get(&url).bearer_auth(self.token.expose_secret())
            })
            .await
    }

    fn malformed(&self, what: &str, detail: impl Into<String>) -> ProviderError {
        ProviderError::Malformed {
            provider: self.http.name().to_string(),
            what: what.to_string(),
            detail: detail.into(),
        }
    }

    async fn subscription(&self, id: &str) -> Result<WebhookSubscription, ProviderError> {
        let path = format!("/webhook-subscriptions/{}", path_id(id)?);
        let resp = self.get(&path).await.map_err(ProviderError::from)?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| self.malformed(&format!("GET {path}"), e.to_string()))
    }
}

/// Fintoro ids are integers; anything else would never match and might smuggle a path.
fn path_id(id: &str) -> Result<&str, ProviderError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id)
    } else {
        Err(ProviderError::Malformed {
            provider: "fintoro".into(),
            what: "subscription id".into(),
            detail: format!("`{id}` is not a Fintoro subscription id (an integer)"),
        })
    }
}

fn parse_time(field: &str, v: &Option<String>) -> Result<Option<DateTime<Utc>>, String> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("`{field}` = `{s}` is not an ISO 8601 time: {e}"))
        })
        .transpose()
}

#[async_trait]
impl Provider for FintoroClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Fintoro
    }

    async fn preflight(&self, id: &str) -> Result<(), ProviderError> {
        self.get("/whoami").await.map_err(ProviderError::from)?;
        let sub = self.subscription(id).await?;
        if sub.disabled_at.is_some() || sub.is_active == Some(false) {
            // Rotating is harmless, but confirmation can never come: say so up front.
            return Err(self.malformed(
                &format!("GET /webhook-subscriptions/{id}"),
                "the subscription is disabled at Fintoro; no delivery could confirm a rotation",
            ));
        }
        Ok(())
    }

    async fn rotate(&self, id: &str) -> Result<SecretString, RotateError> {
        let path = format!(
            "/webhook-subscriptions/{}/rotate-secret",
            path_id(id).map_err(RotateError::NotRotated)?
        );
        let url = self.http.url(&path);
        let what = format!("POST {path}");
        let resp = self
            .http
            .send(&what, Idempotency::Once, |c| {
                c.post(&url).bearer_auth(self.token.expose_secret())
            })
            .await
            .map_err(RotateError::from_http)?;
        super::secret_from_rotate_answer(
            self.http.name(),
            &what,
            &resp.body,
            "`plainTextSecret`",
            |r: Rotated| r.plain_text_secret,
        )
    }

    async fn evidence(
        &self,
        id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<Finding, ProviderError> {
        let sub = self.subscription(id).await?;
        let what = format!("GET /webhook-subscriptions/{id}");
        let success = parse_time("lastSuccessAt", &sub.last_success_at)
            .map_err(|e| self.malformed(&what, e))?;
        let failure = parse_time("lastFailureAt", &sub.last_failure_at)
            .map_err(|e| self.malformed(&what, e))?;
        // Taken after the answer, so its `Date` is part of the offset used.
        let anchor = self.http.anchor(published_at, self.longest_delivery);
        let mark = anchor.completed_after();
        if let Some(t) = success.filter(|t| *t > mark) {
            return Ok(Finding::Confirmed(anchor.evidence(
                "lastSuccessAt",
                t,
                mark,
                format!(
                    "Fintoro lastSuccessAt {} is past the publication at {} plus the longest \
                     delivery and the clock offset",
                    t.to_rfc3339(),
                    published_at.to_rfc3339()
                ),
            )));
        }
        Ok(match failure.filter(|f| *f > mark) {
            Some(f) => Finding::Failing(Failures {
                seen: vec![FailureCount::Newest(f.to_rfc3339())],
                detail: format!("Fintoro lastFailureAt {}", f.to_rfc3339()),
            }),
            None => Finding::Nothing,
        })
    }

    fn clock_offset(&self) -> Option<Offset> {
        self.http.skew().offset()
    }

    async fn list(&self) -> Result<Vec<RemoteSubscription>, ProviderError> {
        let resp = self
            .get("/webhook-subscriptions")
            .await
            .map_err(ProviderError::from)?;
        let list: List = serde_json::from_slice(&resp.body)
            .map_err(|e| self.malformed("GET /webhook-subscriptions", e.to_string()))?;
        Ok(list
            .data
            .into_iter()
            .map(|s| RemoteSubscription {
                id: match &s.id {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                url: s.url,
                active: s.is_active.unwrap_or(true) && s.disabled_at.is_none(),
            })
            .collect())
    }
}
