//! The one HTTP client every provider uses: timeouts, bounded retries with
//! exponential backoff, `Retry-After`, a per-account rate limiter, and request-id
//! logging. Response bodies are never logged: a rotate response carries a secret.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::RateLimit;
use crate::evidence::Anchor;
use crate::http_body::BodyError;
use crate::skew::SkewMeter;

/// Whether a request may be sent again after a failure whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads: retried on 429, 5xx, timeouts and connection errors.
    Idempotent,
    /// Rotate: retried only when the provider certainly did not act (429, or the
    /// connection never opened). Anything else goes back to the caller, because sending
    /// it again means another rotation, which the state machine must record.
    Once,
}

/// A failed request, with what the caller needs to classify it. Never holds a body
/// beyond the provider's short error message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    #[error("{provider}: {what} answered {status}{}: {message}", rid(.request_id))]
    Status {
        provider: String,
        what: String,
        status: u16,
        message: String,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The connection could not be opened: the request never reached the provider.
    #[error("{provider}: {what}: cannot connect: {detail}")]
    Connect {
        provider: String,
        what: String,
        detail: String,
    },
    #[error("{provider}: {what}: no answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        provider: String,
        what: String,
        timeout: Duration,
    },
    /// Sent, but the exchange broke (connection reset, truncated body).
    #[error("{provider}: {what}: {detail}")]
    Transport {
        provider: String,
        what: String,
        detail: String,
    },
    #[error("{provider}: invalid client setup: {detail}")]
    Setup { provider: String, detail: String },
}

fn rid(r: &Option<String>) -> String {
    r.as_ref()
        .map(|r| format!(" (request id {r})"))
        .unwrap_or_default()
}

impl HttpError {
    /// Transient: worth retrying later.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => *status == 429 || *status >= 500,
            HttpError::Connect { .. } | HttpError::Timeout { .. } | HttpError::Transport { .. } => {
                true
            }
            HttpError::Setup { .. } => false,
        }
    }

    /// The provider certainly did not act on the request.
    pub fn certainly_not_applied(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => (400..500).contains(status),
            HttpError::Connect { .. } | HttpError::Setup { .. } => true,
            HttpError::Timeout { .. } | HttpError::Transport { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful (2xx) response, body read in full.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: bytes::Bytes,
    pub request_id: Option<String>,
}

/// The largest response body rekey reads from a provider. Real answers are a few
/// KiB; a body past this is a broken or hostile peer, not data.
pub const MAX_BODY: usize = 1 << 20;

/// An answer as it came off the wire, any status.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The connection never opened: the request did not reach the provider.
    Connect(String),
    /// No complete answer within the client's timeout.
    Timeout,
    /// Sent, but the exchange broke (reset, truncated or oversized body).
    Broken(String),
}

/// How a request reaches a provider: the network in production, an in-process model
/// of the provider in the deterministic simulation. Everything above it — retries,
/// `Retry-After`, the rate limiter, error classification — is the same code in both.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn execute(
        &self,
        request: reqwest::Request,
        timeout: Duration,
    ) -> Result<RawResponse, TransportError>;
}

/// The network, through reqwest (whose client carries the timeouts).
struct NetTransport {
    client: reqwest::Client,
}

#[async_trait::async_trait]
impl Transport for NetTransport {
    async fn execute(
        &self,
        request: reqwest::Request,
        _timeout: Duration,
    ) -> Result<RawResponse, TransportError> {
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                TransportError::Timeout
            } else if e.is_connect() {
                TransportError::Connect(crate::errors::chain(&e))
            } else {
                TransportError::Broken(crate::errors::chain(&e))
            }
        };
        let mut resp = self.client.execute(request).await.map_err(classify)?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let body = read_capped(&mut resp, MAX_BODY)
            .await
            .map_err(|e| match e {
                TransportError::Broken(d) => {
                    TransportError::Broken(format!("reading the response body: {d}"))
                }
                other => other,
            })?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

/// Reads a body with [`crate::http_body::read_capped`], classified for the retry rules.
pub async fn read_capped(
    resp: &mut reqwest::Response,
    max: usize,
) -> Result<bytes::Bytes, TransportError> {
    crate::http_body::read_capped(resp, max)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => {
                TransportError::Broken(format!("the body is larger than {max} bytes; not read"))
            }
            BodyError::Read(e) if e.is_timeout() => TransportError::Timeout,
            BodyError::Read(e) => TransportError::Broken(crate::errors::chain(&e)),
        })
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, including the first.
    pub attempts: usize,
    pub base: Duration,
    pub max: Duration,
    /// A `Retry-After` longer than this is not waited out inside one call; the error
    /// goes back to the caller, which reschedules.
    pub max_retry_after: Duration,
    /// Randomises each wait (so a fleet's retries spread out). Off only where runs
    /// must replay exactly (the simulation).
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(500),
            max: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(120),
            jitter: true,
        }
    }
}

/// A token bucket shared by every call to one provider account, including
/// confirmation polls. A 429 pauses the whole bucket until `Retry-After` passes, so
/// the other calls to that account do not walk into the same wall.
///
/// The bucket holds a few tokens fewer than the limit allows ([`reserve`]); it refills
/// at the full rate. A request reaches the provider a varying moment after its token
/// was taken, so two sent one token apart can arrive closer than that; the provider's
/// own bucket, kept that many tokens fuller than ours, absorbs it. The sustained rate
/// is the limit; only the first burst is smaller.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    paused_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            state: Mutex::new(Bucket {
                tokens: f64::from(capacity(limit)),
                at: Instant::now(),
                paused_until: None,
            }),
        }
    }

    fn per_token(&self) -> Duration {
        self.limit.per / self.limit.count
    }

    /// Waits until a request may be sent.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = self.state.lock().await;
                let now = Instant::now();
                if let Some(p) = b.paused_until {
                    if now < p {
                        Some(p - now)
                    } else {
                        b.paused_until = None;
                        None
                    }
                } else {
                    None
                }
                .or_else(|| {
                    let refill =
                        now.duration_since(b.at).as_secs_f64() / self.per_token().as_secs_f64();
                    b.tokens = (b.tokens + refill).min(f64::from(capacity(self.limit)));
                    b.at = now;
                    if b.tokens >= 1.0 {
                        b.tokens -= 1.0;
                        None
                    } else {
                        // At least a millisecond: a bucket a rounding error short of a
                        // token would otherwise sleep for nothing, and on a clock that
                        // only moves when tasks wait (tokio's paused clock), spin.
                        Some(self.per_token().mul_f64(1.0 - b.tokens).max(MIN_TOKEN_WAIT))
                    }
                })
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }

    pub async fn pause_for(&self, d: Duration) {
        let mut b = self.state.lock().await;
        let until = Instant::now() + d;
        b.paused_until = Some(b.paused_until.map_or(until, |p| p.max(until)));
    }
}

/// Tokens of an account's limit kept unused: one in twenty, at least one (none for a
/// limit of one).
fn reserve(limit: RateLimit) -> u32 {
    if limit.count > 1 {
        (limit.count / 20).max(1)
    } else {
        0
    }
}

/// The bucket's size: the limit less the [`reserve`].
fn capacity(limit: RateLimit) -> u32 {
    limit.count - reserve(limit)
}

/// The shortest wait for a token (tokio's timer resolution).
const MIN_TOKEN_WAIT: Duration = Duration::from_millis(1);

/// The HTTP client of one provider account.
#[derive(Clone)]
pub struct HttpClient {
    name: String,
    base_url: String,
    /// Builds requests; [`HttpClient::transport`] sends them.
    client: reqwest::Client,
    transport: Arc<dyn Transport>,
    timeout: Duration,
    limiter: Arc<RateLimiter>,
    retry: RetryPolicy,
    /// Rekey's wall clock, read around each call to measure the provider's.
    clock: Arc<dyn Clock>,
    /// The provider's clock offset, from the `Date` of every answer.
    skew: Arc<SkewMeter>,
}

impl HttpClient {
    pub fn new(
        name: &str,
        base_url: &str,
        timeout: Duration,
        limit: RateLimit,
    ) -> Result<Self, HttpError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("rekey/", env!("CARGO_PKG_VERSION")))
            .https_only(!base_url.starts_with("http://"))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HttpError::Setup {
                provider: name.to_string(),
                detail: e.to_string(),
            })?;
        Ok(HttpClient {
            name: name.to_string(),
            base_url: base_url.trim_end_matches('/').to_string(),
            transport: Arc::new(NetTransport {
                client: client.clone(),
            }),
            client,
            timeout,
            limiter: Arc::new(RateLimiter::new(limit)),
            retry: RetryPolicy::default(),
            clock: crate::clock::system(),
            skew: Arc::new(SkewMeter::new(name)),
        })
    }

    /// Reads wall time from `clock` (the simulation's) instead of the system's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The provider's clock offset as measured so far.
    pub fn skew(&self) -> &SkewMeter {
        &self.skew
    }

    /// The inputs of an evidence rule for a secret published at `published_at`.
    pub fn anchor(&self, published_at: DateTime<Utc>, longest_delivery: Duration) -> Anchor {
        Anchor {
            published_at,
            offset: self.skew.offset_or_assumed(),
            longest_delivery,
        }
    }

    /// Sends every request through `transport` instead of the network (the
    /// simulation, and tests of the retry rules).
    pub fn with_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = transport;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Sends the request `build` makes (again on each attempt), retrying as
    /// `idempotency` allows. `what` names the call in logs and errors
    /// (e.g. `POST /webhook-subscriptions/801/rotate-secret`).
    pub async fn send<F>(
        &self,
        what: &str,
        idempotency: Idempotency,
        build: F,
    ) -> Result<Response, HttpError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.base)
            .with_max_delay(self.retry.max)
            .with_max_times(self.retry.attempts.saturating_sub(1));
        if self.retry.jitter {
            backoff = backoff.with_jitter();
        }
        let max_retry_after = self.retry.max_retry_after;
        (|| self.attempt(what, &build))
            .retry(backoff)
            .when(|e: &HttpError| {
                let retryable = match idempotency {
                    Idempotency::Idempotent => e.is_transient(),
                    Idempotency::Once => {
                        e.status() == Some(429) || matches!(e, HttpError::Connect { .. })
                    }
                };
                retryable && e.retry_after().is_none_or(|d| d <= max_retry_after)
            })
            .adjust(|e: &HttpError, planned| {
                // Retry-After wins over our own backoff, but never shortens it. `None`
                // means the attempts are used up: it stays `None`, whatever the
                // provider asked for, or a 429 would be retried for ever.
                planned.map(|p| e.retry_after().map_or(p, |ra| ra.max(p)))
            })
            .notify(|e: &HttpError, wait: Duration| {
                tracing::warn!(
                    provider = %self.name,
                    call = what,
                    error = %e,
                    retry_in = %humantime::format_duration(wait),
                    "provider call failed; retrying"
                );
            })
            .await
    }

    async fn attempt<F>(&self, what: &str, build: &F) -> Result<Response, HttpError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        self.limiter.acquire().await;
        let request = build(&self.client).build().map_err(|e| HttpError::Setup {
            provider: self.name.clone(),
            detail: crate::errors::chain(&e),
        })?;
        let sent = self.clock.now();
        let resp = self
            .transport
            .execute(request, self.timeout)
            .await
            .map_err(|e| match e {
                TransportError::Timeout => HttpError::Timeout {
                    provider: self.name.clone(),
                    what: what.to_string(),
                    timeout: self.timeout,
                },
                TransportError::Connect(detail) => HttpError::Connect {
                    provider: self.name.clone(),
                    what: what.to_string(),
                    detail,
                },
                TransportError::Broken(detail) => HttpError::Transport {
                    provider: self.name.clone(),
                    what: what.to_string(),
                    detail,
                },
            })?;
        let date = header(&resp.headers, "date");
        self.skew.observe(sent, self.clock.now(), date.as_deref());
        let status = resp.status;
        let request_id = header(&resp.headers, "x-request-id");
        let retry_after = header(&resp.headers, "retry-after").and_then(|v| parse_retry_after(&v));
        tracing::debug!(
            provider = %self.name,
            call = what,
            status = status.as_u16(),
            request_id = request_id.as_deref().unwrap_or("-"),
            "provider answered"
        );
        if status.is_success() {
            return Ok(Response {
                status,
                body: resp.body,
                request_id,
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let pause = retry_after.unwrap_or(self.retry.base);
            self.limiter.pause_for(pause).await;
        }
        tracing::info!(
            provider = %self.name,
            call = what,
            status = status.as_u16(),
            request_id = request_id.as_deref().unwrap_or("-"),
            "provider refused the call"
        );
        Err(HttpError::Status {
            provider: self.name.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            message: error_message(&resp.body),
            request_id,
            retry_after,
        })
    }
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs; treated as absent).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A provider's error message from the body, whatever its convention
/// (`{"message"}`, `{"error"}`, `{"error":{"message"}}`, `{"detail":[{"msg"}]}`),
/// shortened; or a note that the body was not JSON. The body itself is untrusted and
/// never echoed whole.
pub fn error_message(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return format!("(non-JSON body, {} bytes)", body.len());
    };
    let pick = |v: &serde_json::Value| -> Option<String> {
        if let Some(s) = v.get("message").and_then(|m| m.as_str()) {
            return Some(s.to_string());
        }
        match v.get("error") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(e) => {
                if let Some(s) = e.get("message").and_then(|m| m.as_str()) {
                    return Some(s.to_string());
                }
            }
            None => {}
        }
        v.get("detail")
            .and_then(|d| d.as_array())
            .and_then(|a| a.first())
            .and_then(|d| d.get("msg"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
    };
    let msg = pick(&v).unwrap_or_else(|| "(no message)".into());
    msg.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_follow_each_provider_convention() {
        assert_eq!(
            error_message(br#"{"message":"Unauthenticated."}"#),
            "Unauthenticated."
        );
        assert_eq!(
            error_message(br#"{"error":"Too many requests."}"#),
            "Too many requests."
        );
        assert_eq!(error_message(br#"{"error":{"message":"nope"}}"#), "nope");
        assert_eq!(
            error_message(br#"{"detail":[{"loc":["x"],"msg":"bad","type":"t"}]}"#),
            "bad"
        );
        assert_eq!(error_message(b"<html>"), "(non-JSON body, 6 bytes)");
    }

    #[test]
    fn classification_drives_rotation_safety() {
        let st = |status| HttpError::Status {
            provider: "p".into(),
            what: "w".into(),
            status,
            message: String::new(),
            request_id: None,
            retry_after: None,
        };
        assert!(st(403).certainly_not_applied() && !st(403).is_transient());
        assert!(st(429).certainly_not_applied() && st(429).is_transient());
        assert!(!st(500).certainly_not_applied() && st(500).is_transient());
        let t = HttpError::Timeout {
            provider: "p".into(),
            what: "w".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!t.certainly_not_applied());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_spaces_requests() {
        let l = RateLimiter::new(RateLimit {
            count: 3,
            per: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        l.acquire().await;
        l.acquire().await;
        assert_eq!(
            Instant::now() - t0,
            Duration::ZERO,
            "a burst of 3 less 1 reserved"
        );
        l.acquire().await;
        let waited = Instant::now() - t0;
        assert!(
            waited >= Duration::from_millis(332) && waited <= Duration::from_millis(340),
            "{waited:?}"
        );
        l.pause_for(Duration::from_secs(5)).await;
        let t1 = Instant::now();
        l.acquire().await;
        assert!(Instant::now() - t1 >= Duration::from_secs(5));
    }

    /// Requests sent one token apart may arrive bunched: the provider's bucket (the
    /// same limit, started full) must never be empty when one arrives, however the
    /// delays between our send and its arrival vary within a token's time.
    #[tokio::test(start_paused = true)]
    async fn requests_arriving_bunched_never_find_the_providers_bucket_empty() {
        for (count, per) in [(20, 1), (120, 60), (30, 1), (2, 1)] {
            let limit = RateLimit {
                count,
                per: Duration::from_secs(per),
            };
            let per_token = limit.per / limit.count;
            let l = RateLimiter::new(limit);
            let t0 = Instant::now();
            let mut sent = vec![];
            for i in 0..(count * 5) {
                l.acquire().await;
                // In flight for up to one token's time: the worst bunching.
                let delay = if i % 2 == 0 {
                    per_token
                } else {
                    Duration::ZERO
                };
                sent.push((Instant::now() - t0 + delay).as_secs_f64());
            }
            sent.sort_by(f64::total_cmp);
            // The provider's bucket, replayed over the arrivals.
            let (mut tokens, mut at) = (f64::from(count), 0.0);
            for t in sent {
                tokens = (tokens + (t - at) / per_token.as_secs_f64()).min(f64::from(count));
                at = t;
                assert!(tokens >= 1.0 - 1e-9, "{count}/{per}s: empty at {t:.3}s");
                tokens -= 1.0;
            }
        }
    }

    /// Answers every request with `status` and the given `Retry-After`, counting them.
    struct Scripted {
        status: u16,
        retry_after: Option<&'static str>,
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Transport for Scripted {
        async fn execute(
            &self,
            _request: reqwest::Request,
            _timeout: Duration,
        ) -> Result<RawResponse, TransportError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut headers = reqwest::header::HeaderMap::new();
            if let Some(ra) = self.retry_after {
                headers.insert("retry-after", ra.parse().unwrap());
            }
            Ok(RawResponse {
                status: StatusCode::from_u16(self.status).unwrap(),
                headers,
                body: bytes::Bytes::from_static(br#"{"message":"slow down"}"#),
            })
        }
    }

    fn scripted(status: u16, retry_after: Option<&'static str>) -> (Arc<Scripted>, HttpClient) {
        let t = Arc::new(Scripted {
            status,
            retry_after,
            calls: Default::default(),
        });
        let c = HttpClient::new(
            "p",
            "http://127.0.0.1:9",
            Duration::from_secs(5),
            RateLimit {
                count: 1000,
                per: Duration::from_secs(1),
            },
        )
        .unwrap()
        .with_transport(t.clone());
        (t, c)
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_keeps_asking_to_retry_after_is_given_up_on() {
        // Regression: with Retry-After ≤ max_retry_after, "no attempts left" was read
        // as "retry after Retry-After", and the call never returned.
        for idem in [Idempotency::Idempotent, Idempotency::Once] {
            let (t, c) = scripted(429, Some("2"));
            let r = tokio::time::timeout(
                Duration::from_secs(3600),
                c.send("GET /x", idem, |c| c.get("http://127.0.0.1:9/x")),
            )
            .await
            .expect("the call returns within the hour");
            assert!(
                matches!(r, Err(HttpError::Status { status: 429, .. })),
                "{r:?}"
            );
            assert_eq!(
                t.calls.load(std::sync::atomic::Ordering::SeqCst),
                RetryPolicy::default().attempts,
                "{idem:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_error_on_a_call_sent_once_is_not_repeated() {
        let (t, c) = scripted(503, Some("1"));
        let r = c
            .send("POST /rotate", Idempotency::Once, |c| {
                c.post("http://127.0.0.1:9/rotate")
            })
            .await;
        assert!(matches!(r, Err(HttpError::Status { status: 503, .. })));
        assert_eq!(t.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_not_read() {
        let big = vec![b'x'; MAX_BODY + 1];
        let mut resp = reqwest::Response::from(http_response(big));
        let e = read_capped(&mut resp, MAX_BODY).await.unwrap_err();
        assert!(
            matches!(e, TransportError::Broken(ref d) if d.contains("larger than")),
            "{e:?}"
        );
        let mut ok = reqwest::Response::from(http_response(b"{}".to_vec()));
        assert_eq!(&read_capped(&mut ok, MAX_BODY).await.unwrap()[..], b"{}");
    }

    fn http_response(body: Vec<u8>) -> axum::http::Response<Vec<u8>> {
        axum::http::Response::builder()
            .status(200)
            .body(body)
            .unwrap()
    }

    /// Found by the simulation (seed 6): a bucket a hair short of a token computed a
    /// zero wait and, on tokio's paused clock, never let time move again.
    #[test]
    fn a_bucket_a_rounding_error_short_of_a_token_waits_instead_of_spinning() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let l = RateLimiter::new(RateLimit {
                    count: 60,
                    per: Duration::from_secs(60),
                });
                {
                    let mut b = l.state.lock().await;
                    b.tokens = 1.0 - 1e-12;
                    b.at = Instant::now();
                }
                l.acquire().await;
            });
            let _ = done.send(());
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(20))
                .is_ok(),
            "acquire spun instead of waiting for the token"
        );
    }
}
