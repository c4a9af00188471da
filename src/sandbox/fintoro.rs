//! An in-process simulator of Fintoro's public API (the webhook part), on 127.0.0.1.
//!
//! It is stateful and behaves like the provider where rekey's correctness depends
//! on it: rotate returns the new secret exactly once and invalidates the old one at
//! once; deliveries are really signed (with the secret live at send time) and sent to
//! the subscription's url, and only `lastSuccessAt` / `lastFailureAt` tell how they
//! went; the rate limit answers 429 with Fintoro's headers. Faults can be queued
//! ([`FintoroSim::inject`]) to reproduce what real networks and providers do — above
//! all, a rotation committed at the provider whose response never arrives.
//!
//! The handle is cheap to clone; the server and any background traffic stop when the
//! last clone is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};

pub use super::faults::FaultKind;
use super::signing;
use crate::secret::Fingerprint;

/// Prefix of every secret Fintoro issues.
pub const SECRET_PREFIX: &str = "whsec_fintoro_";
/// First id handed out by [`FintoroSim::add_subscription`] (Fintoro's docs use 801).
pub const FIRST_SUBSCRIPTION_ID: u64 = 801;
/// The response field that carries the new secret (cut before it by faults).
const SECRET_FIELD: &str = "plainTextSecret";

/// How the simulator is set up. `Default` mimics production with retry waits scaled
/// from 10 s / 100 s / 1000 s / 10000 s down to milliseconds.
#[derive(Debug, Clone)]
pub struct FintoroSimOptions {
    pub token: String,
    pub company_name: String,
    pub company_id: u64,
    /// Requests per window per token before 429 (Fintoro: 120 per minute).
    pub rate_limit_per_minute: u32,
    /// The rate-limit window; one minute unless a test wants to see it reset.
    pub rate_limit_window: Duration,
    /// Waits between delivery attempts; attempts = waits + 1.
    pub retry_waits: Vec<Duration>,
    /// A delivery succeeds only on a 2xx within this time (Fintoro: 10 s).
    pub delivery_timeout: Duration,
    /// How far the simulator's clock is from the host's (signed): every time it
    /// stamps (`lastSuccessAt`, webhook timestamps, the `Date` header) reads it.
    pub clock_skew: chrono::TimeDelta,
}

impl Default for FintoroSimOptions {
    fn default() -> Self {
        FintoroSimOptions {
            token: "fintoro_sandbox_token".into(),
            company_name: "Sandbox s.r.o.".into(),
            company_id: 15,
            rate_limit_per_minute: 120,
            rate_limit_window: Duration::from_secs(60),
            retry_waits: [50, 100, 200, 400].map(Duration::from_millis).to_vec(),
            delivery_timeout: Duration::from_secs(10),
            clock_skew: chrono::TimeDelta::zero(),
        }
    }
}

/// API routes, for fault matching and request counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Whoami,
    List,
    Get,
    Rotate,
    /// In a fault: matches any route. In [`FintoroSim::request_count`]: all routes.
    Any,
}

/// A fault consumed by the next request on a matching route (first queued first).
#[derive(Debug, Clone)]
pub struct Fault {
    pub route: Route,
    pub kind: FaultKind,
}

/// What one delivery (with or without retries) came to.
#[derive(Debug, Clone)]
pub struct DeliveryOutcome {
    /// The `webhook-id` sent (the same for every attempt of one event).
    pub webhook_id: String,
    /// Attempts made; 0 when the subscription is missing or inactive.
    pub attempts: u32,
    /// Status of the last attempt, `None` if it got no HTTP answer.
    pub status: Option<u16>,
    pub success: bool,
    /// Why the last attempt got no answer (timeout, connection refused, …).
    pub error: Option<String>,
}

/// One attempt in the delivery log. Never holds the secret, only its fingerprint.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub webhook_id: String,
    pub subscription_id: u64,
    /// 1-based attempt number.
    pub attempt: u32,
    pub status: Option<u16>,
    pub success: bool,
    pub at: DateTime<Utc>,
    /// Fingerprint of the secret this attempt was signed with.
    pub secret_fingerprint: Fingerprint,
}

/// One delivery attempt, signed and not yet sent.
struct Signed {
    id: u64,
    webhook_id: String,
    body: String,
    attempt: u32,
    url: String,
    signature: String,
    /// `webhook-timestamp`: when it was signed (the simulator's clock).
    timestamp: i64,
    fingerprint: Fingerprint,
}

/// A delivery signed and still in flight, as to a receiver slow to answer: Fintoro
/// stamps `lastSuccessAt` / `lastFailureAt` only when it completes, which may be
/// after a rotation that happened meanwhile. From [`FintoroSim::start_delivery`].
pub struct InFlight {
    shared: Arc<Shared>,
    signed: Signed,
}

impl InFlight {
    /// Fingerprint of the secret the delivery was signed with.
    pub fn secret_fingerprint(&self) -> &Fingerprint {
        &self.signed.fingerprint
    }

    /// Lets the delivery reach the receiver and records its outcome now.
    pub async fn complete(self) -> DeliveryOutcome {
        self.shared.send(self.signed).await
    }
}

/// Cheap-to-clone handle on a running simulator.
#[derive(Clone)]
pub struct FintoroSim {
    handle: Arc<Handle>,
}

/// Owns the tasks; dropping the last handle stops them. The tasks hold only
/// `Shared`, never `Handle`, so they cannot keep the simulator alive.
struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: super::ServerGuard,
    traffic: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut t) = self.traffic.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
    }
}

struct Shared {
    opts: FintoroSimOptions,
    http: reqwest::Client,
    state: Mutex<SimState>,
}

struct Sub {
    name: String,
    url: String,
    is_active: bool,
    events: Vec<String>,
    secret: String,
    rotations: u32,
    last_success_at: Option<DateTime<Utc>>,
    last_failure_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

struct SimState {
    subs: BTreeMap<u64, Sub>,
    next_id: u64,
    faults: VecDeque<Fault>,
    counts: HashMap<Route, u64>,
    window: Option<(Instant, u32)>,
    deliveries: Vec<DeliveryRecord>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn new_secret() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

fn sub_json(id: u64, company_id: u64, s: &Sub) -> Value {
    json!({
        "id": id, "companyId": company_id, "name": s.name, "url": s.url,
        "isActive": s.is_active, "subscribedEvents": s.events,
        "lastSuccessAt": s.last_success_at.map(ts), "lastFailureAt": s.last_failure_at.map(ts),
        "disabledAt": null, "disabledReason": null,
        "createdAt": ts(s.created_at), "updatedAt": ts(s.updated_at),
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The provider's error body for a status, as its framework renders it.
fn error_response(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match code {
        401 => "Unauthenticated.",
        403 => "This action is unauthorized.",
        404 => "No query results for model.",
        422 => "The given data was invalid.",
        429 => "Too Many Attempts.",
        503 => "Service Unavailable",
        c if c >= 500 => "Server Error",
        _ => status.canonical_reason().unwrap_or("Error"),
    };
    let mut body = json!({ "message": message });
    if code == 422 {
        body["errors"] = json!({});
    }
    json_response(status, &body)
}

fn too_many(limit: u32, retry_after: Option<u64>) -> Response {
    let mut res = error_response(429);
    let h = res.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(0));
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        let reset = Utc::now().timestamp() + secs as i64;
        h.insert("x-ratelimit-reset", HeaderValue::from(reset));
    }
    res
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().expect("fintoro sim state mutex poisoned")
    }

    /// The simulator's clock (the host's, moved by `clock_skew`).
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.opts.clock_skew
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.trim() == self.opts.token)
    }

    /// Fixed-window limiter (as Laravel's throttle): `Ok(remaining)` or
    /// `Err(seconds until the window resets)`. Refused requests do not count.
    fn hit(&self, st: &mut SimState) -> Result<u32, u64> {
        let (limit, window, now) = (
            self.opts.rate_limit_per_minute,
            self.opts.rate_limit_window,
            Instant::now(),
        );
        let (started, hits) = match st.window {
            Some((s, h)) if now.duration_since(s) < window => (s, h),
            _ => (now, 0),
        };
        if hits >= limit {
            let left = window.saturating_sub(now.duration_since(started));
            return Err(left.as_secs_f64().ceil().max(1.0) as u64);
        }
        st.window = Some((started, hits + 1));
        Ok(limit - hits - 1)
    }

    /// The whole request pipeline: count, authenticate, throttle, apply a queued
    /// fault, do the work, shape the answer.
    async fn serve(&self, route: Route, headers: &HeaderMap, id: Option<&str>) -> Response {
        let limit = self.opts.rate_limit_per_minute;
        let (fault, remaining) = {
            let mut st = self.lock();
            *st.counts.entry(route).or_default() += 1;
            if !self.authorized(headers) {
                return error_response(401);
            }
            let remaining = match self.hit(&mut st) {
                Ok(r) => r,
                Err(retry_after) => return too_many(limit, Some(retry_after)),
            };
            let pos = st
                .faults
                .iter()
                .position(|f| f.route == route || f.route == Route::Any);
            (
                pos.and_then(|p| st.faults.remove(p)).map(|f| f.kind),
                remaining,
            )
        };
        let mut res = self.answer(route, id, fault).await;
        let h = res.headers_mut();
        if !h.contains_key("x-ratelimit-limit") {
            h.insert("x-ratelimit-limit", HeaderValue::from(limit));
            h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        }
        res
    }

    async fn answer(&self, route: Route, id: Option<&str>, fault: Option<FaultKind>) -> Response {
        match fault {
            Some(FaultKind::Status(429)) => {
                return too_many(self.opts.rate_limit_per_minute, Some(60));
            }
            Some(FaultKind::Status(code)) => return error_response(code),
            Some(FaultKind::TooManyRequests { retry_after }) => {
                return too_many(self.opts.rate_limit_per_minute, retry_after);
            }
            Some(FaultKind::Garbage) => {
                let page =
                    "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>";
                return (StatusCode::OK, [(header::CONTENT_TYPE, "text/html")], page)
                    .into_response();
            }
            _ => {}
        }
        let commit = !matches!(fault, Some(FaultKind::MissingSecret));
        let body = match self.work(route, id, commit) {
            Some(v) => v.to_string(),
            None => return error_response(404),
        };
        super::faults::committed_response(&self.http, StatusCode::OK, body, fault, SECRET_FIELD)
            .await
    }

    /// The API's actual behaviour; `None` means 404.
    fn work(&self, route: Route, id: Option<&str>, commit: bool) -> Option<Value> {
        let company = self.opts.company_id;
        let mut st = self.lock();
        match route {
            Route::Whoami | Route::Any => Some(json!({ "name": self.opts.company_name })),
            Route::List => {
                let data: Vec<Value> = st
                    .subs
                    .iter()
                    .map(|(id, s)| sub_json(*id, company, s))
                    .collect();
                Some(json!({ "data": data }))
            }
            Route::Get => {
                let id: u64 = id?.parse().ok()?;
                st.subs.get(&id).map(|s| sub_json(id, company, s))
            }
            Route::Rotate => {
                let id: u64 = id?.parse().ok()?;
                let sub = st.subs.get_mut(&id)?;
                if !commit {
                    return Some(sub_json(id, company, sub));
                }
                // The old secret is gone the moment this returns: no overlap.
                let secret = new_secret();
                sub.secret = secret.clone();
                sub.rotations += 1;
                sub.updated_at = self.now();
                let mut v = sub_json(id, company, sub);
                v["plainTextSecret"] = Value::String(secret);
                Some(v)
            }
        }
    }

    /// One signed attempt, signed with the secret live right now.
    async fn attempt(
        &self,
        id: u64,
        webhook_id: &str,
        body: &str,
        attempt: u32,
    ) -> Option<DeliveryOutcome> {
        let signed = self.sign(id, webhook_id, body, attempt)?;
        Some(self.send(signed).await)
    }

    /// Signs an attempt with the secret live right now (`None`: no such active
    /// subscription).
    fn sign(&self, id: u64, webhook_id: &str, body: &str, attempt: u32) -> Option<Signed> {
        let st = self.lock();
        let sub = st.subs.get(&id).filter(|s| s.is_active)?;
        Some(Signed {
            id,
            webhook_id: webhook_id.to_string(),
            body: body.to_string(),
            attempt,
            url: sub.url.clone(),
            signature: signing::fintoro_signature(&sub.secret, body.as_bytes()),
            timestamp: self.now().timestamp(),
            fingerprint: Fingerprint::of_str(&sub.secret),
        })
    }

    /// Sends a signed attempt and records how it went, when it completes.
    async fn send(&self, a: Signed) -> DeliveryOutcome {
        let Signed {
            id,
            webhook_id,
            body,
            attempt,
            url,
            signature,
            timestamp,
            fingerprint,
        } = a;
        let sent = self
            .http
            .post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(signing::FINTORO_ID_HEADER, &webhook_id)
            .header(signing::FINTORO_TIMESTAMP_HEADER, timestamp.to_string())
            .header(signing::FINTORO_SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(res) => {
                let status = res.status().as_u16();
                // Drain so the connection can be reused; the body does not matter.
                let _ = res.bytes().await;
                (Some(status), None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        let success = status.is_some_and(|s| (200..300).contains(&s));
        let now = self.now();
        let mut st = self.lock();
        if let Some(sub) = st.subs.get_mut(&id) {
            if success {
                sub.last_success_at = Some(now);
            } else {
                sub.last_failure_at = Some(now);
            }
        }
        st.deliveries.push(DeliveryRecord {
            webhook_id: webhook_id.clone(),
            subscription_id: id,
            attempt,
            status,
            success,
            at: now,
            secret_fingerprint: fingerprint,
        });
        tracing::debug!(subscription = id, attempt, ?status, "fintoro sim delivery");
        DeliveryOutcome {
            webhook_id,
            attempts: attempt,
            status,
            success,
            error,
        }
    }

    /// A new event's `webhook-id` and body.
    fn event(&self, event_type: &str) -> (String, String) {
        let webhook_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
        let kind = event_type.split('.').next().unwrap_or("resource");
        let resource_id: u32 = rand::rng().random_range(1..100_000);
        let body = json!({
            "id": webhook_id, "type": event_type, "occurredAt": ts(self.now()),
            "resource": { "type": kind.trim_end_matches('s'), "id": resource_id },
        })
        .to_string();
        (webhook_id, body)
    }

    async fn deliver(&self, id: u64, event_type: &str, with_retries: bool) -> DeliveryOutcome {
        let (webhook_id, body) = self.event(event_type);
        let waits: &[Duration] = if with_retries {
            &self.opts.retry_waits
        } else {
            &[]
        };
        let mut last = DeliveryOutcome {
            webhook_id: webhook_id.clone(),
            attempts: 0,
            status: None,
            success: false,
            error: Some(format!("subscription {id} does not exist or is inactive")),
        };
        for attempt in 1..=waits.len() as u32 + 1 {
            if attempt > 1 {
                tokio::time::sleep(waits[attempt as usize - 2]).await;
            }
            match self.attempt(id, &webhook_id, &body, attempt).await {
                Some(out) if out.success => return out,
                Some(out) => last = out,
                // Removed or disabled between attempts: the provider stops retrying.
                None => break,
            }
        }
        last
    }
}

async fn whoami(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    s.serve(Route::Whoami, &h, None).await
}
async fn list(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    s.serve(Route::List, &h, None).await
}
async fn show(State(s): State<Arc<Shared>>, Path(id): Path<String>, h: HeaderMap) -> Response {
    s.serve(Route::Get, &h, Some(&id)).await
}
async fn rotate(State(s): State<Arc<Shared>>, Path(id): Path<String>, h: HeaderMap) -> Response {
    s.serve(Route::Rotate, &h, Some(&id)).await
}

impl FintoroSim {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(opts: FintoroSimOptions) -> std::io::Result<FintoroSim> {
        let http = super::delivery_client(opts.delivery_timeout)?;
        let shared = Arc::new(Shared {
            opts,
            http,
            state: Mutex::new(SimState {
                subs: BTreeMap::new(),
                next_id: FIRST_SUBSCRIPTION_ID,
                faults: VecDeque::new(),
                counts: HashMap::new(),
                window: None,
                deliveries: Vec::new(),
            }),
        });
        let api = Router::new()
            .route("/whoami", get(whoami))
            .route("/webhook-subscriptions", get(list))
            .route("/webhook-subscriptions/{id}", get(show))
            .route("/webhook-subscriptions/{id}/rotate-secret", post(rotate));
        let app = Router::new()
            .nest("/api/public/v1", api)
            .fallback(|| async { error_response(404) })
            .layer(axum::middleware::map_response(super::add_request_id))
            .layer(axum::middleware::map_response_with_state(
                shared.opts.clock_skew,
                super::add_date,
            ))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = super::serve_until_dropped(listener, app, "fintoro sim");
        Ok(FintoroSim {
            handle: Arc::new(Handle {
                shared,
                addr,
                _server: server,
                traffic: Mutex::new(None),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// `http://127.0.0.1:PORT/api/public/v1`, the value for rekey's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/public/v1", self.handle.addr)
    }

    pub fn options(&self) -> &FintoroSimOptions {
        &self.shared().opts
    }

    /// The one bearer token the simulator accepts.
    pub fn token(&self) -> String {
        self.shared().opts.token.clone()
    }

    /// Creates an active subscription delivering to `url`; returns its id and the
    /// initial secret (what Fintoro's create returns once).
    pub fn add_subscription(&self, url: &str) -> (u64, String) {
        let mut st = self.shared().lock();
        let id = st.next_id;
        st.next_id += 1;
        let secret = new_secret();
        let now = self.shared().now();
        st.subs.insert(
            id,
            Sub {
                name: format!("rekey sandbox {id}"),
                url: url.to_string(),
                is_active: true,
                events: vec!["invoices.created".into(), "invoices.updated".into()],
                secret: secret.clone(),
                rotations: 0,
                last_success_at: None,
                last_failure_at: None,
                created_at: now,
                updated_at: now,
            },
        );
        (id, secret)
    }

    /// The secret Fintoro signs with right now (test oracle; no such API exists).
    pub fn secret_of(&self, id: u64) -> Option<String> {
        self.shared().lock().subs.get(&id).map(|s| s.secret.clone())
    }

    /// Rotations committed for `id` (0 for an unknown id).
    pub fn rotation_count(&self, id: u64) -> u32 {
        self.shared()
            .lock()
            .subs
            .get(&id)
            .map_or(0, |s| s.rotations)
    }

    /// What `GET /webhook-subscriptions/{id}` would return.
    pub fn subscription_json(&self, id: u64) -> Option<Value> {
        let company = self.shared().opts.company_id;
        self.shared()
            .lock()
            .subs
            .get(&id)
            .map(|s| sub_json(id, company, s))
    }

    /// Changes the url; like Fintoro's PUT, this does not rotate. False if unknown.
    pub fn set_url(&self, id: u64, url: &str) -> bool {
        let mut st = self.shared().lock();
        st.subs.get_mut(&id).is_some_and(|s| {
            s.url = url.to_string();
            s.updated_at = self.shared().now();
            true
        })
    }

    /// Enables or disables delivery (`isActive`). False if unknown.
    pub fn set_active(&self, id: u64, active: bool) -> bool {
        let mut st = self.shared().lock();
        st.subs.get_mut(&id).is_some_and(|s| {
            s.is_active = active;
            s.updated_at = self.shared().now();
            true
        })
    }

    /// Deletes the subscription (as `DELETE`); pending retries stop. False if unknown.
    pub fn remove_subscription(&self, id: u64) -> bool {
        self.shared().lock().subs.remove(&id).is_some()
    }

    /// One signed delivery attempt now, no retries.
    pub async fn deliver(&self, id: u64, event_type: &str) -> DeliveryOutcome {
        self.shared().deliver(id, event_type, false).await
    }

    /// Signs one delivery attempt now, with the live secret, and holds it until
    /// [`InFlight::complete`]: a delivery whose receiver answers only when the test
    /// says so (`None` for an unknown or inactive subscription). Holding it on an
    /// explicit release rather than for a fixed time lets a test order "signed",
    /// "rotated" and "completed" exactly.
    pub fn start_delivery(&self, id: u64, event_type: &str) -> Option<InFlight> {
        let shared = self.handle.shared.clone();
        let (webhook_id, body) = shared.event(event_type);
        let signed = shared.sign(id, &webhook_id, &body, 1)?;
        Some(InFlight { shared, signed })
    }

    /// Fintoro's schedule: up to `retry_waits.len() + 1` attempts, each signed with
    /// the secret live at that moment.
    pub async fn deliver_with_retries(&self, id: u64, event_type: &str) -> DeliveryOutcome {
        self.shared().deliver(id, event_type, true).await
    }

    /// Emits one event to every active subscription every `every`, with retries,
    /// until [`stop_traffic`](Self::stop_traffic) or the simulator is dropped.
    pub fn start_traffic(&self, every: Duration) {
        let shared = self.handle.shared.clone();
        let task = tokio::spawn(async move {
            // In-flight retries live in the set, so stopping traffic stops them too.
            let mut inflight = JoinSet::new();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                while inflight.try_join_next().is_some() {}
                let targets: Vec<(u64, String)> = {
                    let st = shared.lock();
                    st.subs
                        .iter()
                        .filter(|(_, s)| s.is_active)
                        .map(|(id, s)| {
                            let i = rand::rng().random_range(0..s.events.len().max(1));
                            (
                                *id,
                                s.events
                                    .get(i)
                                    .cloned()
                                    .unwrap_or_else(|| "invoices.updated".into()),
                            )
                        })
                        .collect()
                };
                for (id, event) in targets {
                    let shared = shared.clone();
                    inflight.spawn(async move { shared.deliver(id, &event, true).await });
                }
            }
        });
        let mut slot = self
            .handle
            .traffic
            .lock()
            .expect("fintoro sim traffic mutex poisoned");
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    /// Stops background traffic, including its pending retries.
    pub fn stop_traffic(&self) {
        let mut slot = self
            .handle
            .traffic
            .lock()
            .expect("fintoro sim traffic mutex poisoned");
        if let Some(t) = slot.take() {
            t.abort();
        }
    }

    /// Every delivery attempt so far, oldest first.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.shared().lock().deliveries.clone()
    }

    /// Queues a fault for the next request on a matching route.
    pub fn inject(&self, fault: Fault) {
        self.shared().lock().faults.push_back(fault);
    }

    /// Requests received on `route` (all routes for [`Route::Any`]), including
    /// refused ones.
    pub fn request_count(&self, route: Route) -> u64 {
        let st = self.shared().lock();
        match route {
            Route::Any => st.counts.values().sum(),
            r => st.counts.get(&r).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::receiver::{Receiver, tests::MemStore};

    async fn sim() -> FintoroSim {
        FintoroSim::start(FintoroSimOptions::default())
            .await
            .expect("start sim")
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    async fn call(
        sim: &FintoroSim,
        method: &str,
        path: &str,
    ) -> reqwest::Result<reqwest::Response> {
        let url = format!("{}{path}", sim.base_url());
        let req = if method == "POST" {
            client().post(url)
        } else {
            client().get(url)
        };
        req.bearer_auth(sim.token()).send().await
    }

    async fn rotate_801(sim: &FintoroSim) -> reqwest::Result<reqwest::Response> {
        call(sim, "POST", "/webhook-subscriptions/801/rotate-secret").await
    }

    async fn get_json(sim: &FintoroSim, path: &str) -> Value {
        json_of(call(sim, "GET", path).await.expect("GET")).await
    }

    async fn json_of(res: reqwest::Response) -> Value {
        res.json().await.expect("a JSON body")
    }

    /// A webhook sink answering with the given statuses in turn (then the last one).
    async fn sink(statuses: Vec<u16>) -> String {
        let statuses = Arc::new(Mutex::new(VecDeque::from(statuses)));
        let app = Router::new().route(
            "/hook",
            post(move || {
                let statuses = statuses.clone();
                async move {
                    let mut q = statuses.lock().expect("sink");
                    let code = if q.len() > 1 {
                        q.pop_front()
                    } else {
                        q.front().copied()
                    };
                    StatusCode::from_u16(code.unwrap_or(204)).expect("status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("sink serve") });
        format!("http://{addr}/hook")
    }

    #[tokio::test]
    async fn api_shapes_auth_and_request_ids() {
        let sim = sim().await;
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/hook");
        assert_eq!(id, 801);

        let res = call(&sim, "GET", "/whoami").await.expect("whoami");
        assert_eq!(res.status(), 200);
        assert!(res.headers().contains_key("x-request-id"));
        assert_eq!(json_of(res).await, json!({"name": "Sandbox s.r.o."}));

        let list = get_json(&sim, "/webhook-subscriptions").await;
        let sub = &list["data"][0];
        assert_eq!(sub["id"], 801);
        assert_eq!(sub["companyId"], 15);
        assert_eq!(sub["isActive"], true);
        assert!(sub["lastSuccessAt"].is_null() && sub.get("plainTextSecret").is_none());
        assert!(sub["createdAt"].as_str().expect("createdAt").ends_with('Z'));
        let keys = "name url subscribedEvents lastFailureAt disabledAt disabledReason updatedAt";
        for key in keys.split(' ') {
            assert!(sub.get(key).is_some(), "missing {key}");
        }
        let one = get_json(&sim, "/webhook-subscriptions/801").await;
        assert_eq!(&one, sub);

        for path in [
            "/webhook-subscriptions/999",
            "/webhook-subscriptions/abc",
            "/nope",
        ] {
            let res = call(&sim, "GET", path).await.expect("404");
            assert_eq!(res.status(), 404, "{path}");
            assert!(res.headers().contains_key("x-request-id"));
            assert_eq!(json_of(res).await["message"], "No query results for model.");
        }

        let res = client()
            .get(format!("{}/whoami", sim.base_url()))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("401");
        assert_eq!(res.status(), 401);
        assert!(res.headers().contains_key("x-request-id"));
        assert_eq!(json_of(res).await, json!({"message": "Unauthenticated."}));
        assert_eq!(sim.request_count(Route::Whoami), 2);
        assert_eq!(sim.request_count(Route::Get), 3);
        // The unknown path reached no route, so it is not counted.
        assert_eq!(sim.request_count(Route::Any), 6);
    }

    #[tokio::test]
    async fn rotate_returns_the_new_secret_once_and_replaces_the_old() {
        let sim = sim().await;
        let (id, old) = sim.add_subscription("http://127.0.0.1:9/hook");
        assert!(old.starts_with(SECRET_PREFIX));
        let res = rotate_801(&sim).await.expect("rotate");
        assert_eq!(res.status(), 200);
        let body = json_of(res).await;
        let new = body["plainTextSecret"]
            .as_str()
            .expect("secret")
            .to_string();
        let hexpart = new.strip_prefix(SECRET_PREFIX).expect("prefix");
        assert_eq!(hexpart.len(), 32);
        assert!(
            hexpart
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(new, old);
        assert_eq!(sim.secret_of(id).as_deref(), Some(new.as_str()));
        assert_eq!(sim.rotation_count(id), 1);
        assert_eq!(body["id"], 801);
        let got = get_json(&sim, "/webhook-subscriptions/801").await;
        assert!(got.get("plainTextSecret").is_none());
        let res = call(&sim, "POST", "/webhook-subscriptions/802/rotate-secret")
            .await
            .expect("404");
        assert_eq!(res.status(), 404);
    }

    #[tokio::test]
    async fn signed_delivery_verifies_and_rotation_invalidates_the_old_secret() {
        let sim = sim().await;
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("receiver");
        let url = rx.register("fintoro/801", "webhooks/fintoro/801");
        let (id, first) = sim.add_subscription(&url);
        store.publish("webhooks/fintoro/801", &first, None);

        let out = sim.deliver(id, "invoices.created").await;
        assert!(
            out.success && out.status == Some(204) && out.attempts == 1,
            "{out:?}"
        );
        let sub = sim.subscription_json(id).expect("sub");
        assert!(sub["lastSuccessAt"].is_string() && sub["lastFailureAt"].is_null());
        assert_eq!(rx.stats("fintoro/801").accepted_with_current, 1);

        // Rotate without publishing: the receiver only knows the old secret now.
        let res = rotate_801(&sim).await.expect("rotate");
        let new = json_of(res).await["plainTextSecret"]
            .as_str()
            .expect("s")
            .to_string();
        let out = sim.deliver(id, "invoices.updated").await;
        assert!(!out.success && out.status == Some(401), "{out:?}");
        assert!(sim.subscription_json(id).expect("sub")["lastFailureAt"].is_string());

        store.publish("webhooks/fintoro/801", &new, Some(&first));
        assert!(sim.deliver(id, "invoices.updated").await.success);
        let log = sim.deliveries();
        assert_eq!(log.len(), 3);
        assert_eq!(log[0].secret_fingerprint, Fingerprint::of_str(&first));
        assert_eq!(log[2].secret_fingerprint, Fingerprint::of_str(&new));
        assert!(!format!("{log:?}").contains(&new));
    }

    #[tokio::test]
    async fn a_delivery_in_flight_across_a_rotation_keeps_its_old_signature_and_completes_after_it()
    {
        let sim = sim().await;
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("receiver");
        let (id, first) = sim.add_subscription(&rx.register("fintoro/801", "p"));
        store.publish("p", &first, None);
        let held = sim.start_delivery(id, "invoices.updated").expect("active");
        assert_eq!(held.secret_fingerprint(), &Fingerprint::of_str(&first));
        let res = rotate_801(&sim).await.expect("rotate");
        let new = json_of(res).await["plainTextSecret"]
            .as_str()
            .expect("s")
            .to_string();
        store.publish("p", &new, Some(&first));
        let rotated = Utc::now();
        let out = held.complete().await;
        // Accepted on `previous`, and stamped as a success after the rotation.
        assert!(out.success, "{out:?}");
        assert_eq!(rx.stats("fintoro/801").accepted_with_previous, 1);
        let done = sim.subscription_json(id).expect("sub")["lastSuccessAt"]
            .as_str()
            .map(|t| DateTime::parse_from_rfc3339(t).expect("time"))
            .expect("lastSuccessAt");
        assert!(done >= rotated - chrono::TimeDelta::seconds(1), "{done}");
        assert_eq!(
            sim.deliveries()[0].secret_fingerprint,
            Fingerprint::of_str(&first)
        );
        assert!(sim.start_delivery(999, "invoices.updated").is_none());
    }

    #[tokio::test]
    async fn a_skewed_clock_moves_the_date_header_and_every_stamp() {
        for skew in [5, -5] {
            let sim = FintoroSim::start(FintoroSimOptions {
                clock_skew: chrono::TimeDelta::seconds(skew),
                ..Default::default()
            })
            .await
            .expect("sim");
            let (id, _) = sim.add_subscription(&sink(vec![204]).await);
            let before = Utc::now();
            let res = call(&sim, "GET", "/whoami").await.expect("whoami");
            let date = res.headers()[header::DATE]
                .to_str()
                .expect("date")
                .to_string();
            let date = DateTime::parse_from_rfc2822(&date).expect("an HTTP date");
            let off = (date.with_timezone(&Utc) - before).num_milliseconds();
            assert!(
                (skew * 1000 - 1000..=skew * 1000 + 1000).contains(&off),
                "{skew}: Date {date} is {off} ms off"
            );
            assert!(sim.deliver(id, "invoices.created").await.success);
            let stamp = sim.subscription_json(id).expect("sub")["lastSuccessAt"]
                .as_str()
                .map(|t| DateTime::parse_from_rfc3339(t).expect("time"))
                .expect("lastSuccessAt");
            let off = (stamp.with_timezone(&Utc) - before).num_milliseconds();
            assert!(
                (skew * 1000 - 1000..=skew * 1000 + 1000).contains(&off),
                "{skew}: lastSuccessAt {stamp} is {off} ms off"
            );
        }
    }

    #[tokio::test]
    async fn last_success_at_moves_only_on_2xx() {
        let sim = sim().await;
        for code in [500u16, 302, 404] {
            let (id, _) = sim.add_subscription(&sink(vec![code]).await);
            let out = sim.deliver(id, "invoices.created").await;
            assert!(!out.success && out.status == Some(code));
            let sub = sim.subscription_json(id).expect("sub");
            assert!(
                sub["lastSuccessAt"].is_null() && sub["lastFailureAt"].is_string(),
                "{code}"
            );
        }
        let (id, _) = sim.add_subscription(&sink(vec![200]).await);
        assert!(sim.deliver(id, "invoices.created").await.success);
        // No receiver at all: a failure without a status.
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/hook");
        let out = sim.deliver(id, "invoices.created").await;
        assert!(!out.success && out.status.is_none() && out.error.is_some());
    }

    #[tokio::test]
    async fn retries_follow_the_schedule_and_sign_with_the_live_secret() {
        let sim = sim().await;
        let (id, _) = sim.add_subscription(&sink(vec![500, 503, 204]).await);
        let out = sim.deliver_with_retries(id, "invoices.created").await;
        assert!(out.success && out.attempts == 3, "{out:?}");
        let (id2, _) = sim.add_subscription(&sink(vec![500]).await);
        let started = Instant::now();
        let out = sim.deliver_with_retries(id2, "invoices.created").await;
        assert!(!out.success && out.attempts == 5, "{out:?}");
        assert!(started.elapsed() >= Duration::from_millis(750));
        let attempts: Vec<u32> = sim
            .deliveries()
            .iter()
            .filter(|d| d.subscription_id == id2)
            .map(|d| d.attempt)
            .collect();
        assert_eq!(attempts, vec![1, 2, 3, 4, 5]);

        // Attempt 1 signed with the old secret fails; rotate + publish during the wait;
        // attempt 2 is signed with the new one and is accepted.
        let opts = FintoroSimOptions {
            retry_waits: vec![Duration::from_millis(300)],
            ..Default::default()
        };
        let sim = FintoroSim::start(opts).await.expect("sim");
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("receiver");
        let (id, _) = sim.add_subscription(&rx.register("fintoro/801", "p"));
        let task = tokio::spawn({
            let sim = sim.clone();
            async move { sim.deliver_with_retries(id, "invoices.created").await }
        });
        while sim.deliveries().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let res = rotate_801(&sim).await.expect("rotate");
        let new = json_of(res).await["plainTextSecret"]
            .as_str()
            .expect("s")
            .to_string();
        store.publish("p", &new, None);
        let out = task.await.expect("join");
        assert!(out.success && out.attempts == 2, "{out:?}");
        let log = sim.deliveries();
        assert_eq!(log[0].webhook_id, log[1].webhook_id);
        assert_eq!(log[1].secret_fingerprint, Fingerprint::of_str(&new));
        assert_eq!(rx.stats("fintoro/801").unavailable, 1);
    }

    #[tokio::test]
    async fn rate_limit_answers_429_with_headers() {
        let opts = FintoroSimOptions {
            rate_limit_per_minute: 3,
            ..Default::default()
        };
        let sim = FintoroSim::start(opts).await.expect("sim");
        for left in (0..3).rev() {
            let res = call(&sim, "GET", "/whoami").await.expect("ok");
            assert_eq!(res.status(), 200);
            assert_eq!(
                res.headers()["x-ratelimit-remaining"],
                left.to_string().as_str()
            );
        }
        let res = call(&sim, "GET", "/whoami").await.expect("429");
        assert_eq!(res.status(), 429);
        let h = res.headers();
        let retry: u64 = h["retry-after"].to_str().expect("s").parse().expect("n");
        assert!((1..=60).contains(&retry));
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        let reset: i64 = h["x-ratelimit-reset"]
            .to_str()
            .expect("s")
            .parse()
            .expect("n");
        assert!(reset > Utc::now().timestamp() - 1);
        assert!(h.contains_key("x-request-id"));
        assert_eq!(json_of(res).await, json!({"message": "Too Many Attempts."}));

        let opts = FintoroSimOptions {
            rate_limit_per_minute: 1,
            rate_limit_window: Duration::from_millis(200),
            ..Default::default()
        };
        let sim = FintoroSim::start(opts).await.expect("sim");
        assert_eq!(call(&sim, "GET", "/whoami").await.expect("a").status(), 200);
        assert_eq!(call(&sim, "GET", "/whoami").await.expect("b").status(), 429);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(call(&sim, "GET", "/whoami").await.expect("c").status(), 200);
    }

    fn fault(route: Route, kind: FaultKind) -> Fault {
        Fault { route, kind }
    }

    #[tokio::test]
    async fn status_faults_carry_the_provider_bodies_and_commit_nothing() {
        let sim = sim().await;
        let (id, first) = sim.add_subscription("http://127.0.0.1:9/hook");
        for (code, msg) in [
            (500, "Server Error"),
            (503, "Service Unavailable"),
            (403, "This action is unauthorized."),
        ] {
            sim.inject(fault(Route::Rotate, FaultKind::Status(code)));
            // A fault for Rotate leaves other routes alone.
            assert_eq!(call(&sim, "GET", "/whoami").await.expect("w").status(), 200);
            let res = rotate_801(&sim).await.expect("r");
            assert_eq!(res.status().as_u16(), code);
            assert!(res.headers().contains_key("x-request-id"));
            assert_eq!(json_of(res).await, json!({"message": msg}));
        }
        assert_eq!(sim.secret_of(id).as_deref(), Some(first.as_str()));
        sim.inject(fault(
            Route::Any,
            FaultKind::TooManyRequests {
                retry_after: Some(7),
            },
        ));
        let res = call(&sim, "GET", "/webhook-subscriptions")
            .await
            .expect("429");
        assert_eq!(
            (res.status().as_u16(), &res.headers()["retry-after"]),
            (429, &HeaderValue::from(7))
        );
        sim.inject(fault(
            Route::Get,
            FaultKind::TooManyRequests { retry_after: None },
        ));
        let res = call(&sim, "GET", "/webhook-subscriptions/801")
            .await
            .expect("429");
        assert_eq!(res.status(), 429);
        assert!(!res.headers().contains_key("retry-after"));
        assert_eq!(json_of(res).await["message"], "Too Many Attempts.");
        // Faults are consumed: the next call is normal.
        assert_eq!(
            call(&sim, "GET", "/webhook-subscriptions/801")
                .await
                .expect("ok")
                .status(),
            200
        );
    }

    #[tokio::test]
    async fn garbage_and_missing_secret_do_not_commit() {
        let sim = sim().await;
        let (id, first) = sim.add_subscription("http://127.0.0.1:9/hook");
        sim.inject(fault(Route::Rotate, FaultKind::Garbage));
        let res = rotate_801(&sim).await.expect("g");
        assert_eq!(res.status(), 200);
        assert!(serde_json::from_str::<Value>(&res.text().await.expect("text")).is_err());
        sim.inject(fault(Route::Rotate, FaultKind::MissingSecret));
        let res = rotate_801(&sim).await.expect("m");
        let body = json_of(res).await;
        assert_eq!(body["id"], 801);
        assert!(body.get("plainTextSecret").is_none());
        assert_eq!(sim.secret_of(id).as_deref(), Some(first.as_str()));
        assert_eq!(sim.rotation_count(id), 0);
    }

    #[tokio::test]
    async fn commit_then_drop_loses_the_response_but_not_the_rotation() {
        let sim = sim().await;
        let (id, first) = sim.add_subscription("http://127.0.0.1:9/hook");
        sim.inject(fault(Route::Rotate, FaultKind::CommitThenDrop));
        let res = rotate_801(&sim).await;
        // The head arrives (200), the body does not.
        let res = res.expect("status line and headers arrive");
        assert_eq!(res.status(), 200);
        assert!(res.headers().contains_key("x-request-id"));
        let err = res.text().await.expect_err("the body must fail");
        assert!(err.is_body() || err.is_decode(), "{err:?}");
        let second = sim.secret_of(id).expect("secret");
        assert_ne!(second, first);
        assert_eq!(sim.rotation_count(id), 1);

        sim.inject(fault(Route::Rotate, FaultKind::CommitThenClose));
        let res = rotate_801(&sim).await;
        assert!(res.is_err(), "the send itself fails");
        assert_ne!(sim.secret_of(id).expect("secret"), second);
        assert_eq!(sim.rotation_count(id), 2);
        // The simulator keeps serving afterwards.
        assert_eq!(call(&sim, "GET", "/whoami").await.expect("w").status(), 200);
    }

    #[tokio::test]
    async fn commit_then_truncate_and_delay_commit() {
        let sim = sim().await;
        let (id, first) = sim.add_subscription("http://127.0.0.1:9/hook");
        sim.inject(fault(Route::Rotate, FaultKind::CommitThenTruncate));
        let res = rotate_801(&sim).await.expect("t");
        assert_eq!(res.status(), 200);
        let text = res.text().await.expect("a complete (but truncated) body");
        assert!(serde_json::from_str::<Value>(&text).is_err() && !text.contains(SECRET_PREFIX));
        let second = sim.secret_of(id).expect("secret");
        assert_ne!(second, first);

        sim.inject(fault(
            Route::Rotate,
            FaultKind::Delay(Duration::from_millis(500)),
        ));
        let url = format!("{}/webhook-subscriptions/801/rotate-secret", sim.base_url());
        let res = client()
            .post(url)
            .bearer_auth(sim.token())
            .timeout(Duration::from_millis(100))
            .send()
            .await;
        assert!(res.is_err_and(|e| e.is_timeout()));
        assert_ne!(sim.secret_of(id).expect("secret"), second);
        assert_eq!(sim.rotation_count(id), 2);

        sim.inject(fault(
            Route::Whoami,
            FaultKind::Delay(Duration::from_millis(100)),
        ));
        let started = Instant::now();
        assert_eq!(call(&sim, "GET", "/whoami").await.expect("w").status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn traffic_flows_until_stopped_and_drop_stops_the_server() {
        let sim = sim().await;
        let url = sink(vec![204]).await;
        let (a, _) = sim.add_subscription(&url);
        let (b, _) = sim.add_subscription(&url);
        sim.set_active(b, false);
        sim.start_traffic(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(150)).await;
        sim.stop_traffic();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let n = sim.deliveries().len();
        assert!(n >= 2, "{n}");
        assert!(
            sim.deliveries()
                .iter()
                .all(|d| d.subscription_id == a && d.success)
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(sim.deliveries().len(), n);

        assert!(sim.set_url(a, "http://127.0.0.1:9/x"));
        assert_eq!(
            sim.subscription_json(a).expect("a")["url"],
            "http://127.0.0.1:9/x"
        );
        assert!(sim.remove_subscription(a) && !sim.remove_subscription(a));
        assert_eq!(sim.deliver(a, "invoices.created").await.attempts, 0);

        // A kept-alive connection must not outlive the simulator either.
        let (base, keep) = (sim.base_url(), client());
        let res = keep
            .get(format!("{base}/whoami"))
            .send()
            .await
            .expect("alive");
        assert_eq!(res.status(), 401);
        drop(sim);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(keep.get(format!("{base}/whoami")).send().await.is_err());
    }
}
