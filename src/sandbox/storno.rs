//! An in-process simulator of Storno's webhook API, on 127.0.0.1.
//!
//! It follows Storno's backend where rekey depends on it: an API key is accepted
//! only as a bare `Authorization: af_…` (a bad key answers 403 `Invalid API
//! Token`), a JWT only as `Bearer` (an expired one answers 401 `Expired JWT
//! Token`), and `X-Company` picks the company. `regenerate-secret` returns a new
//! 64-hex secret once (wrapped `{data, secret}`, or the public reference's bare
//! shape when [`StornoSimOptions::unwrapped`] is set) and invalidates the old one;
//! reads show it masked (`***` + last 8). Deliveries are signed
//! (`X-Webhook-Signature`, see [`signing`]) with the live secret and logged; the
//! `test` endpoint sends a signed `webhook.test` synchronously and reports the
//! receiver's answer; the `retry` endpoint redelivers a logged delivery, signed with
//! the secret live at that moment. 429s and faults work as in the other simulators.

// The request pipeline returns the early answer (a `Response`) as its error; boxing
// it would only add noise to a test simulator's handlers.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::{Value, json};

pub use super::faults::FaultKind;
use super::signing;
use crate::secret::Fingerprint;

const SECRET_FIELD: &str = "secret";

#[derive(Debug, Clone)]
pub struct StornoSimOptions {
    /// The API key the simulator accepts (bare, no `Bearer`).
    pub api_key: String,
    /// A JWT the simulator accepts as `Bearer`.
    pub jwt: String,
    /// A JWT that has expired (401 `Expired JWT Token`).
    pub expired_jwt: String,
    /// The company uuid expected in `X-Company`.
    pub company: String,
    /// Answer rotate with the public reference's bare object instead of the
    /// backend's `{data, secret}`.
    pub unwrapped: bool,
    /// Requests per minute before 429.
    pub rate_limit_per_minute: u32,
    pub delivery_timeout: Duration,
    /// How far the simulator's clock is from the host's (signed): `triggeredAt`,
    /// `completedAt` and the `Date` header read it.
    pub clock_skew: chrono::TimeDelta,
}

impl Default for StornoSimOptions {
    fn default() -> Self {
        StornoSimOptions {
            api_key: "af_sandbox_0123456789abcdef0123456789abcdef".into(),
            jwt: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZWtleSJ9.c2FuZGJveA".into(),
            expired_jwt: "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.ZXhwaXJlZA".into(),
            company: "550e8400-e29b-41d4-a716-446655440000".into(),
            unwrapped: false,
            rate_limit_per_minute: 600,
            delivery_timeout: Duration::from_secs(10),
            clock_skew: chrono::TimeDelta::zero(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    List,
    Get,
    Rotate,
    Test,
    Deliveries,
    Retry,
    /// In a fault: any route. In [`StornoSim::request_count`]: all routes.
    Any,
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub route: Route,
    pub kind: FaultKind,
}

/// How a request authenticated (for the API-key-vs-JWT tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthSeen {
    ApiKey,
    Jwt,
}

/// One logged delivery (what `GET …/deliveries` shows, plus the fingerprint of
/// the secret its last attempt was signed with).
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: String,
    pub webhook_id: String,
    pub event_type: String,
    /// `pending`, `success`, `failed` or `retrying`.
    pub status: String,
    pub response_status_code: Option<u16>,
    pub attempt: u32,
    pub triggered_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// How long the last attempt took.
    pub duration_ms: u64,
    pub secret_fingerprint: Fingerprint,
    body: String,
}

struct Endpoint {
    url: String,
    description: String,
    events: Vec<String>,
    is_active: bool,
    secret: String,
    rotations: u32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

struct SimState {
    endpoints: BTreeMap<String, Endpoint>,
    faults: VecDeque<Fault>,
    counts: HashMap<Route, u64>,
    window: Option<(Instant, u32)>,
    /// Newest last.
    deliveries: Vec<DeliveryRecord>,
    auth_seen: Vec<AuthSeen>,
    retries: Vec<String>,
}

struct Shared {
    opts: StornoSimOptions,
    http: reqwest::Client,
    state: Mutex<SimState>,
}

#[derive(Clone)]
pub struct StornoSim {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: super::ServerGuard,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Storno's secrets: 64 hex characters.
fn new_secret() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

/// What reads show of a secret: `***` and its last 8 characters.
pub fn masked(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("***{tail}")
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(code: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &json!({ "error": message }))
}

fn too_many(retry_after: Option<u64>) -> Response {
    let mut res = error(429, "Too many requests. Please try again later.");
    if let Some(secs) = retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

fn endpoint_json(id: &str, e: &Endpoint, secret: &str) -> Value {
    json!({
        "id": id, "url": e.url, "description": e.description, "events": e.events,
        "secret": secret, "isActive": e.is_active,
        "createdAt": ts(e.created_at), "updatedAt": ts(e.updated_at),
    })
}

fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id, "eventType": d.event_type, "status": d.status,
        "responseStatusCode": d.response_status_code, "durationMs": d.duration_ms,
        "attempt": d.attempt, "errorMessage": if d.status == "failed" { Some("HTTP error") } else { None },
        "triggeredAt": ts(d.triggered_at), "completedAt": d.completed_at.map(ts),
    })
}

/// A signed POST of `body` to `url`; the status, if any answer came.
async fn post_signed(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    event: &str,
    delivery_id: &str,
    body: &str,
) -> Option<u16> {
    let res = http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, signing::STORNO_USER_AGENT)
        .header(signing::STORNO_EVENT_HEADER, event)
        .header(signing::STORNO_ID_HEADER, delivery_id)
        .header(
            signing::STORNO_SIGNATURE_HEADER,
            signing::storno_signature(secret, body.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    let _ = res.bytes().await;
    Some(status)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().expect("storno sim state mutex poisoned")
    }

    /// The simulator's clock (the host's, moved by `clock_skew`).
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.opts.clock_skew
    }

    /// Count, authenticate, check the company, throttle, pick a fault.
    fn admit(&self, route: Route, headers: &HeaderMap) -> Result<Option<FaultKind>, Response> {
        let mut st = self.lock();
        *st.counts.entry(route).or_default() += 1;
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let seen = match auth {
            None => {
                return Err(json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"code": 401, "message": "JWT Token not found"}),
                ));
            }
            Some(a) => match a.strip_prefix("Bearer ") {
                Some(jwt) if jwt == self.opts.jwt => AuthSeen::Jwt,
                Some(jwt) if jwt == self.opts.expired_jwt => {
                    return Err(json_response(
                        StatusCode::UNAUTHORIZED,
                        &json!({"code": 401, "message": "Expired JWT Token"}),
                    ));
                }
                Some(_) => {
                    return Err(json_response(
                        StatusCode::UNAUTHORIZED,
                        &json!({"code": 401, "message": "Invalid JWT Token"}),
                    ));
                }
                None if a == self.opts.api_key => AuthSeen::ApiKey,
                None => {
                    return Err(json_response(
                        StatusCode::FORBIDDEN,
                        &json!({"status_code": 403, "message": "Invalid API Token", "type": "access_denied"}),
                    ));
                }
            },
        };
        st.auth_seen.push(seen);
        if headers.get("x-company").and_then(|v| v.to_str().ok()) != Some(&self.opts.company) {
            return Err(error(403, "Company not found or access denied."));
        }
        let now = Instant::now();
        let (started, hits) = match st.window {
            Some((s, h)) if now.duration_since(s) < Duration::from_secs(60) => (s, h),
            _ => (now, 0),
        };
        if hits >= self.opts.rate_limit_per_minute {
            let left = Duration::from_secs(60).saturating_sub(now.duration_since(started));
            return Err(too_many(Some(left.as_secs().max(1))));
        }
        st.window = Some((started, hits + 1));
        let pos = st
            .faults
            .iter()
            .position(|f| f.route == route || f.route == Route::Any);
        Ok(pos.and_then(|p| st.faults.remove(p)).map(|f| f.kind))
    }

    fn early(fault: &Option<FaultKind>) -> Option<Response> {
        match fault {
            Some(FaultKind::Status(429)) => Some(too_many(Some(1))),
            Some(FaultKind::Status(402)) => Some(json_response(
                StatusCode::PAYMENT_REQUIRED,
                &json!({"error": "Plan limit reached.", "code": "PLAN_LIMIT"}),
            )),
            Some(FaultKind::Status(code)) => Some(error(
                *code,
                match code {
                    403 => "Insufficient permissions.",
                    404 => "Webhook endpoint not found.",
                    _ => "Internal server error.",
                },
            )),
            Some(FaultKind::TooManyRequests { retry_after }) => Some(too_many(*retry_after)),
            Some(FaultKind::Garbage) => Some(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><body>502 Bad Gateway</body></html>",
                )
                    .into_response(),
            ),
            _ => None,
        }
    }

    async fn finish(&self, status: StatusCode, body: Value, fault: Option<FaultKind>) -> Response {
        let body = body.to_string();
        super::faults::committed_response(&self.http, status, body, fault, SECRET_FIELD).await
    }

    /// Sends (or re-sends) the logged delivery `delivery_id` with the live secret and
    /// records the outcome on it.
    async fn attempt(&self, delivery_id: &str) {
        let target = {
            let st = self.lock();
            st.deliveries
                .iter()
                .find(|d| d.id == delivery_id)
                .and_then(|d| {
                    st.endpoints
                        .get(&d.webhook_id)
                        .filter(|e| e.is_active)
                        .map(|e| {
                            (
                                e.url.clone(),
                                e.secret.clone(),
                                d.event_type.clone(),
                                d.body.clone(),
                            )
                        })
                })
        };
        let Some((url, secret, event, body)) = target else {
            return;
        };
        let started = Instant::now();
        let status = post_signed(&self.http, &url, &secret, &event, delivery_id, &body).await;
        let took = started.elapsed();
        let mut st = self.lock();
        if let Some(d) = st.deliveries.iter_mut().find(|d| d.id == delivery_id) {
            let ok = status.is_some_and(|c| (200..300).contains(&c));
            d.status = if ok { "success" } else { "failed" }.into();
            d.response_status_code = status;
            d.completed_at = Some(self.now());
            // Rounded up, so completion minus duration never lands after the send.
            d.duration_ms = took.as_millis() as u64 + 1;
            d.secret_fingerprint = Fingerprint::of_str(&secret);
        }
    }
}

/// Admits a request; `Err` is the answer when auth, the limit or a fault decides it.
fn run(s: &Shared, route: Route, headers: &HeaderMap) -> Result<Option<FaultKind>, Response> {
    let fault = s.admit(route, headers)?;
    match Shared::early(&fault) {
        Some(r) => Err(r),
        None => Ok(fault),
    }
}

async fn list(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let fault = match run(&s, Route::List, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let data: Vec<Value> = s
        .lock()
        .endpoints
        .iter()
        .map(|(id, e)| endpoint_json(id, e, &masked(&e.secret)))
        .collect();
    s.finish(StatusCode::OK, json!({ "data": data }), fault)
        .await
}

async fn show(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match run(&s, Route::Get, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let body = s
        .lock()
        .endpoints
        .get(&id)
        .map(|e| endpoint_json(&id, e, &masked(&e.secret)));
    match body {
        Some(b) => s.finish(StatusCode::OK, json!({ "data": b }), fault).await,
        None => error(404, "Webhook endpoint not found."),
    }
}

async fn regenerate(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match run(&s, Route::Rotate, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let body = {
        let mut st = s.lock();
        let Some(e) = st.endpoints.get_mut(&id) else {
            return error(404, "Webhook endpoint not found.");
        };
        if matches!(fault, Some(FaultKind::MissingSecret)) {
            json!({ "data": endpoint_json(&id, e, &masked(&e.secret)) })
        } else {
            // The old secret is replaced the moment this commits.
            e.secret = new_secret();
            e.rotations += 1;
            e.updated_at = s.now();
            if s.opts.unwrapped {
                let mut v = endpoint_json(&id, e, &e.secret);
                if let Some(o) = v.as_object_mut() {
                    o.remove("id");
                    o.insert("uuid".into(), Value::String(id.clone()));
                }
                v
            } else {
                json!({ "data": endpoint_json(&id, e, &e.secret), "secret": e.secret })
            }
        }
    };
    s.finish(StatusCode::OK, body, fault).await
}

async fn test(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match run(&s, Route::Test, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let target = s
        .lock()
        .endpoints
        .get(&id)
        .map(|e| (e.url.clone(), e.secret.clone()));
    let Some((url, secret)) = target else {
        return error(404, "Webhook endpoint not found.");
    };
    let delivery_id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "event": "webhook.test", "id": delivery_id, "timestamp": ts(s.now()),
        "data": { "message": "This is a test webhook from Storno." },
    })
    .to_string();
    let started = Instant::now();
    let status = post_signed(&s.http, &url, &secret, "webhook.test", &delivery_id, &body).await;
    let success = status.is_some_and(|c| (200..300).contains(&c));
    let out = json!({
        "success": success, "statusCode": status,
        "durationMs": started.elapsed().as_millis() as u64,
        "error": if success { Value::Null } else { Value::String(match status {
            Some(c) => format!("HTTP {c}"), None => "connection failed".into() }) },
    });
    s.finish(StatusCode::OK, out, fault).await
}

async fn deliveries(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let fault = match run(&s, Route::Deliveries, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let page = q
        .get("page")
        .map_or(Ok(1), |p| p.parse::<usize>())
        .ok()
        .filter(|p| *p >= 1);
    let limit = q
        .get("limit")
        .map_or(Ok(20), |l| l.parse::<usize>())
        .ok()
        .filter(|l| (1..=100).contains(l));
    let (Some(page), Some(limit)) = (page, limit) else {
        return error(400, "Invalid page or limit (limit is 1 to 100).");
    };
    let body = {
        let st = s.lock();
        if !st.endpoints.contains_key(&id) {
            return error(404, "Webhook endpoint not found.");
        }
        // Newest first, as the backend orders them.
        let mine: Vec<&DeliveryRecord> = st
            .deliveries
            .iter()
            .rev()
            .filter(|d| d.webhook_id == id)
            .collect();
        let total = mine.len();
        let data: Vec<Value> = mine
            .into_iter()
            .skip((page - 1) * limit)
            .take(limit)
            .map(delivery_json)
            .collect();
        json!({ "data": data, "meta": { "page": page, "limit": limit, "total": total } })
    };
    s.finish(StatusCode::OK, body, fault).await
}

async fn retry(
    State(s): State<Arc<Shared>>,
    Path((id, delivery)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = run(&s, Route::Retry, &headers) {
        return r;
    }
    {
        let mut st = s.lock();
        match st.endpoints.get(&id) {
            None => return error(404, "Webhook endpoint not found."),
            Some(e) if !e.is_active => return error(409, "Webhook endpoint is disabled."),
            Some(_) => {}
        }
        let Some(d) = st
            .deliveries
            .iter_mut()
            .find(|d| d.id == delivery && d.webhook_id == id)
        else {
            return error(404, "Delivery not found.");
        };
        d.status = "retrying".into();
        d.attempt += 1;
        st.retries.push(delivery.clone());
    }
    // Queued, as Storno's message bus does: delivered shortly after the answer.
    let shared = s.clone();
    tokio::spawn(async move { shared.attempt(&delivery).await });
    json_response(StatusCode::ACCEPTED, &json!({ "status": "queued" }))
}

impl StornoSim {
    pub async fn start(opts: StornoSimOptions) -> std::io::Result<StornoSim> {
        let http = super::delivery_client(opts.delivery_timeout)?;
        let shared = Arc::new(Shared {
            opts,
            http,
            state: Mutex::new(SimState {
                endpoints: BTreeMap::new(),
                faults: VecDeque::new(),
                counts: HashMap::new(),
                window: None,
                deliveries: Vec::new(),
                auth_seen: Vec::new(),
                retries: Vec::new(),
            }),
        });
        let api = Router::new()
            .route("/webhooks", get(list))
            .route("/webhooks/{id}", get(show))
            .route("/webhooks/{id}/regenerate-secret", post(regenerate))
            .route("/webhooks/{id}/test", post(test))
            .route("/webhooks/{id}/deliveries", get(deliveries))
            .route("/webhooks/{id}/deliveries/{delivery}/retry", post(retry));
        let app = Router::new()
            .nest("/api/v1", api)
            .fallback(|| async { error(404, "Not found.") })
            .layer(axum::middleware::map_response(super::add_request_id))
            .layer(axum::middleware::map_response_with_state(
                shared.opts.clock_skew,
                super::add_date,
            ))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = super::serve_until_dropped(listener, app, "storno sim");
        Ok(StornoSim {
            handle: Arc::new(Handle {
                shared,
                addr,
                _server: server,
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// `http://127.0.0.1:PORT/api/v1`, the value for rekey's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1", self.handle.addr)
    }

    pub fn options(&self) -> &StornoSimOptions {
        &self.shared().opts
    }

    /// Creates an active endpoint delivering to `url`; returns its uuid and secret.
    pub fn add_endpoint(&self, url: &str) -> (String, String) {
        let id = uuid::Uuid::new_v4().to_string();
        let secret = new_secret();
        let now = self.shared().now();
        self.shared().lock().endpoints.insert(
            id.clone(),
            Endpoint {
                url: url.to_string(),
                description: "rekey sandbox".into(),
                events: vec!["invoice.created".into(), "invoice.validated".into()],
                is_active: true,
                secret: secret.clone(),
                rotations: 0,
                created_at: now,
                updated_at: now,
            },
        );
        (id, secret)
    }

    pub fn remove_endpoint(&self, id: &str) -> bool {
        self.shared().lock().endpoints.remove(id).is_some()
    }

    /// Regenerates the secret the way someone in Storno's UI would: outside rekey.
    pub fn rotate_outside(&self, id: &str) -> Option<String> {
        let mut st = self.shared().lock();
        let e = st.endpoints.get_mut(id)?;
        e.secret = new_secret();
        e.updated_at = self.shared().now();
        Some(e.secret.clone())
    }

    /// Changes the delivery url (a PUT in the real API); does not rotate.
    pub fn set_url(&self, id: &str, url: &str) -> bool {
        let mut st = self.shared().lock();
        st.endpoints.get_mut(id).is_some_and(|s| {
            s.url = url.to_string();
            true
        })
    }

    pub fn secret_of(&self, id: &str) -> Option<String> {
        self.shared()
            .lock()
            .endpoints
            .get(id)
            .map(|e| e.secret.clone())
    }

    pub fn rotation_count(&self, id: &str) -> u32 {
        self.shared()
            .lock()
            .endpoints
            .get(id)
            .map_or(0, |e| e.rotations)
    }

    pub fn inject(&self, fault: Fault) {
        self.shared().lock().faults.push_back(fault);
    }

    pub fn request_count(&self, route: Route) -> u64 {
        let st = self.shared().lock();
        match route {
            Route::Any => st.counts.values().sum(),
            r => st.counts.get(&r).copied().unwrap_or(0),
        }
    }

    /// How each authenticated request presented its credential, oldest first.
    pub fn auth_seen(&self) -> Vec<AuthSeen> {
        self.shared().lock().auth_seen.clone()
    }

    /// Delivery ids whose retry was requested, in order.
    pub fn retries(&self) -> Vec<String> {
        self.shared().lock().retries.clone()
    }

    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.shared().lock().deliveries.clone()
    }

    pub fn delivery(&self, id: &str) -> Option<DeliveryRecord> {
        self.shared()
            .lock()
            .deliveries
            .iter()
            .find(|d| d.id == id)
            .cloned()
    }

    /// One signed delivery of an event now, logged; `None` for an unknown or
    /// disabled endpoint.
    pub async fn deliver(&self, id: &str, event: &str) -> Option<DeliveryRecord> {
        let s = self.shared();
        let (active, secret) = {
            let st = s.lock();
            let e = st.endpoints.get(id)?;
            (e.is_active, e.secret.clone())
        };
        if !active {
            return None;
        }
        let delivery_id = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "event": event, "id": delivery_id, "timestamp": ts(s.now()),
            "data": { "invoiceId": uuid::Uuid::new_v4().to_string() },
        })
        .to_string();
        s.lock().deliveries.push(DeliveryRecord {
            id: delivery_id.clone(),
            webhook_id: id.to_string(),
            event_type: event.to_string(),
            status: "pending".into(),
            response_status_code: None,
            attempt: 1,
            triggered_at: s.now(),
            completed_at: None,
            duration_ms: 0,
            secret_fingerprint: Fingerprint::of_str(&secret),
            body,
        });
        s.attempt(&delivery_id).await;
        self.delivery(&delivery_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::receiver::{Receiver, tests::MemStore};

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    async fn call(sim: &StornoSim, method: &str, path: &str, auth: &str) -> (u16, Value) {
        let url = format!("{}{path}", sim.base_url());
        let req = if method == "POST" {
            client().post(url)
        } else {
            client().get(url)
        };
        let res = req
            .header("Authorization", auth)
            .header("X-Company", &sim.options().company)
            .send()
            .await
            .expect("send");
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn a_skewed_clock_moves_the_date_header_and_the_log_times() {
        for skew in [5i64, -5] {
            let sim = StornoSim::start(StornoSimOptions {
                clock_skew: chrono::TimeDelta::seconds(skew),
                ..Default::default()
            })
            .await
            .expect("sim");
            let store = Arc::new(MemStore::default());
            let rx = Receiver::start(store.clone()).await.expect("rx");
            let (id, first) = sim.add_endpoint(&rx.register("storno/a", "p"));
            store.publish("p", &first, None);
            let before = Utc::now();
            let res = client()
                .get(format!("{}/webhooks", sim.base_url()))
                .send()
                .await
                .expect("send");
            let date = res.headers()[header::DATE]
                .to_str()
                .expect("date")
                .to_string();
            let date = DateTime::parse_from_rfc2822(&date).expect("an HTTP date");
            let within = skew * 1000 - 1000..=skew * 1000 + 1000;
            let off = (date.with_timezone(&Utc) - before).num_milliseconds();
            assert!(within.contains(&off), "{skew}: Date {date} is {off} ms off");
            let d = sim.deliver(&id, "invoice.created").await.expect("d");
            assert_eq!(d.status, "success");
            for (what, t) in [
                ("triggeredAt", Some(d.triggered_at)),
                ("completedAt", d.completed_at),
            ] {
                let off = (t.expect("stamped") - before).num_milliseconds();
                assert!(within.contains(&off), "{skew}: {what} is {off} ms off");
            }
        }
    }

    #[tokio::test]
    async fn api_keys_bare_jwts_as_bearer_and_their_errors() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let o = sim.options().clone();
        let (id, secret) = sim.add_endpoint("http://127.0.0.1:9/x");
        let (code, v) = call(&sim, "GET", &format!("/webhooks/{id}"), &o.api_key).await;
        assert_eq!(code, 200);
        assert_eq!(v["data"]["secret"], masked(&secret));
        assert_eq!(masked(&secret).len(), 11);
        let (code, _) = call(&sim, "GET", "/webhooks", &format!("Bearer {}", o.jwt)).await;
        assert_eq!(code, 200);
        assert_eq!(sim.auth_seen(), vec![AuthSeen::ApiKey, AuthSeen::Jwt]);
        let (code, v) = call(
            &sim,
            "GET",
            "/webhooks",
            &format!("Bearer {}", o.expired_jwt),
        )
        .await;
        assert_eq!(
            (code, v),
            (401, json!({"code": 401, "message": "Expired JWT Token"}))
        );
        let (code, v) = call(&sim, "GET", "/webhooks", "af_wrong").await;
        assert_eq!(
            (code, v["message"].as_str()),
            (403, Some("Invalid API Token"))
        );
        // An API key sent as a bearer token is read as a (bad) JWT.
        let (code, _) = call(&sim, "GET", "/webhooks", &format!("Bearer {}", o.api_key)).await;
        assert_eq!(code, 401);
    }

    #[tokio::test]
    async fn rotate_test_deliveries_and_retry() {
        let sim = StornoSim::start(StornoSimOptions::default())
            .await
            .expect("sim");
        let key = sim.options().api_key.clone();
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("rx");
        let (id, first) = sim.add_endpoint(&rx.register("storno/e", "p"));
        store.publish("p", &first, None);
        assert_eq!(
            sim.deliver(&id, "invoice.created").await.expect("d").status,
            "success"
        );

        let (code, v) = call(
            &sim,
            "POST",
            &format!("/webhooks/{id}/regenerate-secret"),
            &key,
        )
        .await;
        assert_eq!(code, 200);
        let new = v["secret"].as_str().expect("secret").to_string();
        assert_eq!(v["data"]["secret"], new.as_str());
        assert_eq!(new.len(), 64);
        assert!(new.chars().all(|c| c.is_ascii_hexdigit()));
        // Not published yet: a real delivery fails and so does the test.
        let failed = sim.deliver(&id, "invoice.validated").await.expect("d");
        assert_eq!(failed.status, "failed");
        let (_, t) = call(&sim, "POST", &format!("/webhooks/{id}/test"), &key).await;
        assert_eq!(
            (t["success"].as_bool(), t["statusCode"].as_u64()),
            (Some(false), Some(401))
        );

        store.publish("p", &new, Some(&first));
        let (_, t) = call(&sim, "POST", &format!("/webhooks/{id}/test"), &key).await;
        assert_eq!(t["success"], true);
        let (code, v) = call(
            &sim,
            "POST",
            &format!("/webhooks/{id}/deliveries/{}/retry", failed.id),
            &key,
        )
        .await;
        assert_eq!((code, v), (202, json!({"status": "queued"})));
        for _ in 0..100 {
            if sim
                .delivery(&failed.id)
                .is_some_and(|d| d.status == "success")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = sim.delivery(&failed.id).expect("d");
        assert_eq!((d.status.as_str(), d.attempt), ("success", 2));
        assert_eq!(d.secret_fingerprint, Fingerprint::of_str(&new));

        let (_, v) = call(
            &sim,
            "GET",
            &format!("/webhooks/{id}/deliveries?page=1&limit=1"),
            &key,
        )
        .await;
        assert_eq!(v["meta"], json!({"page": 1, "limit": 1, "total": 2}));
        assert_eq!(v["data"][0]["id"], failed.id.as_str(), "newest first");
        let (code, _) = call(
            &sim,
            "GET",
            &format!("/webhooks/{id}/deliveries?limit=101"),
            &key,
        )
        .await;
        assert_eq!(code, 400);
    }

    #[tokio::test]
    async fn unwrapped_shape_and_faults() {
        let sim = StornoSim::start(StornoSimOptions {
            unwrapped: true,
            rate_limit_per_minute: 2,
            ..Default::default()
        })
        .await
        .expect("sim");
        let key = sim.options().api_key.clone();
        let (id, _) = sim.add_endpoint("http://127.0.0.1:9/x");
        let (_, v) = call(
            &sim,
            "POST",
            &format!("/webhooks/{id}/regenerate-secret"),
            &key,
        )
        .await;
        assert_eq!(v["uuid"], id.as_str());
        assert_eq!(v["secret"].as_str().map(str::len), Some(64));
        sim.inject(Fault {
            route: Route::Any,
            kind: FaultKind::Status(402),
        });
        let (code, v) = call(&sim, "GET", "/webhooks", &key).await;
        assert_eq!((code, v["code"].as_str()), (402, Some("PLAN_LIMIT")));
        let (code, v) = call(&sim, "GET", "/webhooks", &key).await;
        assert_eq!(code, 429);
        assert_eq!(v["error"], "Too many requests. Please try again later.");
    }
}
