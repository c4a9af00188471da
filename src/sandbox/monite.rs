//! An in-process simulator of Monite's API (auth and webhooks), on 127.0.0.1.
//!
//! Where rekey depends on it, it behaves like Monite: every call needs
//! `x-monite-version` (422 without); webhook calls need a partner token from
//! `POST /auth/token`, which expires after `token_ttl` (or at once, when a test
//! calls [`MoniteSim::expire_tokens`]) and is then refused with 401;
//! `regenerate_secret` returns the new secret once and invalidates the old one at
//! once; deliveries are signed (`Monite-Signature: t=…,v1=…`, see [`signing`]) with
//! the secret live at send time and land in a delivery log that needs
//! `x-monite-entity-id`, filters by `created_at__gte` and pages with opaque
//! `pagination_token`s, as does the subscription list. A per-second limit answers
//! 429 with `Retry-After`, and faults can be queued as for the Fintoro simulator.

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

/// The response field that carries the new secret.
const SECRET_FIELD: &str = "secret";

#[derive(Debug, Clone)]
pub struct MoniteSimOptions {
    pub client_id: String,
    pub client_secret: String,
    /// The entity whose delivery log the simulator keeps.
    pub entity_id: String,
    /// `expires_in` of issued tokens (Monite: 86400 s).
    pub token_ttl: Duration,
    /// Requests per second per client before 429 (Monite: about 30).
    pub rate_limit_per_second: u32,
    /// Page size when the client gives no `limit` (Monite caps `limit` at 100).
    pub default_page_size: usize,
    pub delivery_timeout: Duration,
    /// How far the simulator's clock is from the host's (signed): deliveries'
    /// `created_at` (and so the `created_at__gte` filter), signature timestamps and
    /// the `Date` header read it.
    pub clock_skew: chrono::TimeDelta,
}

impl Default for MoniteSimOptions {
    fn default() -> Self {
        MoniteSimOptions {
            client_id: "5b4daced-6b9a-4707-83c6-dc1d6ad6ae08".into(),
            client_secret: "monite_sandbox_client_secret_0123456789".into(),
            entity_id: "9d2b4c8f-2dfd-4a2e-b3d9-07c3b1c6a8a1".into(),
            token_ttl: Duration::from_secs(86400),
            rate_limit_per_second: 30,
            default_page_size: 100,
            delivery_timeout: Duration::from_secs(10),
            clock_skew: chrono::TimeDelta::zero(),
        }
    }
}

/// API routes, for fault matching and request counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Token,
    List,
    Get,
    Rotate,
    Deliveries,
    /// In a fault: any route. In [`MoniteSim::request_count`]: all routes.
    Any,
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub route: Route,
    pub kind: FaultKind,
}

/// What an opaque cursor stands for: (route, offset, `created_at__gte` filter, newest
/// first).
type Cursor = (Route, usize, Option<DateTime<Utc>>, bool);

/// One entry of the delivery log (what `GET /webhook_deliveries` shows, plus the
/// creation time and secret fingerprint the API does not show).
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: String,
    pub event_id: String,
    pub subscription_id: String,
    pub url: String,
    pub status: Option<u16>,
    pub was_successful: bool,
    pub created_at: DateTime<Utc>,
    pub secret_fingerprint: Fingerprint,
}

struct Sub {
    url: String,
    object_type: String,
    event_types: Vec<String>,
    enabled: bool,
    secret: String,
    rotations: u32,
}

struct SimState {
    subs: BTreeMap<String, Sub>,
    /// Issued tokens and when each stops being valid.
    tokens: HashMap<String, Instant>,
    faults: VecDeque<Fault>,
    counts: HashMap<Route, u64>,
    window: Option<(Instant, u32)>,
    deliveries: Vec<DeliveryRecord>,
    /// Expire every token when the next request on this route arrives.
    expire_on: Option<Route>,
    /// Opaque cursor → what it stands for.
    cursors: HashMap<String, Cursor>,
}

struct Shared {
    opts: MoniteSimOptions,
    http: reqwest::Client,
    state: Mutex<SimState>,
}

#[derive(Clone)]
pub struct MoniteSim {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: super::ServerGuard,
}

fn new_secret() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    format!("whsec_{}", hex::encode(bytes))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Monite's error body: `{"error":{"message"}}`, or FastAPI's `detail` list for 422.
fn error_response(code: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &json!({ "error": { "message": message } }))
}

fn validation_error(loc: &[&str], msg: &str) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({ "detail": [{ "loc": loc, "msg": msg, "type": "value_error.missing" }] }),
    )
}

fn default_message(code: u16) -> &'static str {
    match code {
        401 => "Bad authorization token",
        403 => "Access forbidden",
        404 => "Object not found",
        429 => "Too many requests",
        _ => "Internal server error",
    }
}

fn too_many(retry_after: Option<u64>) -> Response {
    let mut res = error_response(429, default_message(429));
    if let Some(secs) = retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

fn sub_json(id: &str, s: &Sub) -> Value {
    json!({
        "id": id, "event_types": s.event_types, "object_type": s.object_type,
        "status": if s.enabled { "enabled" } else { "disabled" }, "url": s.url,
    })
}

fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id, "event_id": d.event_id, "requests_made_count": 1,
        "response": d.status.map(|s| format!("HTTP {s}")),
        "response_status_code": d.status, "url": d.url, "was_successful": d.was_successful,
    })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().expect("monite sim state mutex poisoned")
    }

    fn hit(&self, st: &mut SimState) -> Result<(), u64> {
        let now = Instant::now();
        let (started, hits) = match st.window {
            Some((s, h)) if now.duration_since(s) < Duration::from_secs(1) => (s, h),
            _ => (now, 0),
        };
        if hits >= self.opts.rate_limit_per_second {
            return Err(1);
        }
        st.window = Some((started, hits + 1));
        Ok(())
    }

    /// Count, check the version header, throttle, authenticate, pick a fault.
    fn admit(&self, route: Route, headers: &HeaderMap) -> Result<Option<FaultKind>, Response> {
        let mut st = self.lock();
        *st.counts.entry(route).or_default() += 1;
        if headers.get("x-monite-version").is_none() {
            return Err(validation_error(
                &["header", "x-monite-version"],
                "field required",
            ));
        }
        if let Err(retry) = self.hit(&mut st) {
            return Err(too_many(Some(retry)));
        }
        if st.expire_on == Some(route) {
            st.expire_on = None;
            let past = Instant::now();
            st.tokens.values_mut().for_each(|exp| *exp = past);
        }
        if route != Route::Token {
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let valid = token
                .and_then(|t| st.tokens.get(t))
                .is_some_and(|exp| Instant::now() < *exp);
            if !valid {
                return Err(error_response(401, default_message(401)));
            }
        }
        let pos = st
            .faults
            .iter()
            .position(|f| f.route == route || f.route == Route::Any);
        Ok(pos.and_then(|p| st.faults.remove(p)).map(|f| f.kind))
    }

    /// Applies the faults that answer instead of the API; `Ok` lets the work run.
    fn early(fault: &Option<FaultKind>) -> Option<Response> {
        match fault {
            Some(FaultKind::Status(429)) => Some(too_many(Some(1))),
            Some(FaultKind::Status(code)) => Some(error_response(*code, default_message(*code))),
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

    /// Shapes a successful body per the fault (delay, cut connection, truncation).
    async fn finish(&self, body: Value, fault: Option<FaultKind>) -> Response {
        let body = body.to_string();
        super::faults::committed_response(&self.http, StatusCode::OK, body, fault, SECRET_FIELD)
            .await
    }

    fn page_size(&self, q: &HashMap<String, String>) -> Result<usize, Response> {
        match q.get("limit") {
            None => Ok(self.opts.default_page_size),
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err(validation_error(
                    &["query", "limit"],
                    "ensure this value is between 1 and 100",
                )),
            },
        }
    }

    /// Resolves the page start and filter: from the cursor when one is given
    /// (Monite then ignores the other filters), else from the query.
    fn page_start(
        &self,
        route: Route,
        q: &HashMap<String, String>,
    ) -> Result<(usize, Option<DateTime<Utc>>, bool), Response> {
        if let Some(tok) = q.get("pagination_token") {
            return match self.lock().cursors.get(tok) {
                Some((r, offset, gte, desc)) if *r == route => Ok((*offset, *gte, *desc)),
                _ => Err(error_response(400, "Invalid pagination token")),
            };
        }
        let gte = match q.get("created_at__gte") {
            None => None,
            Some(s) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => Some(t.with_timezone(&Utc)),
                Err(_) => {
                    return Err(validation_error(
                        &["query", "created_at__gte"],
                        "invalid datetime format",
                    ));
                }
            },
        };
        Ok((0, gte, q.get("order").is_some_and(|o| o == "desc")))
    }

    fn paginate(
        &self,
        route: Route,
        items: Vec<Value>,
        offset: usize,
        size: usize,
        gte: Option<DateTime<Utc>>,
        desc: bool,
    ) -> Value {
        let end = (offset + size).min(items.len());
        let data: Vec<Value> = items.get(offset..end).unwrap_or_default().to_vec();
        let next = (end < items.len()).then(|| {
            let tok = format!("pt_{}", uuid::Uuid::new_v4().simple());
            self.lock()
                .cursors
                .insert(tok.clone(), (route, end, gte, desc));
            tok
        });
        json!({ "data": data, "next_pagination_token": next, "prev_pagination_token": null })
    }
}

async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fault = match s.admit(Route::Token, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = Shared::early(&fault) {
        return r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return validation_error(&["body"], "invalid JSON body");
    };
    if v["grant_type"] != "client_credentials" {
        return validation_error(&["body", "grant_type"], "unsupported grant_type");
    }
    if v["client_id"] != s.opts.client_id.as_str()
        || v["client_secret"] != s.opts.client_secret.as_str()
    {
        return error_response(401, "Wrong client_id or client_secret");
    }
    let tok = format!("mnt_{}", hex::encode(rand::rng().random::<[u8; 20]>()));
    s.lock()
        .tokens
        .insert(tok.clone(), Instant::now() + s.opts.token_ttl);
    let body = json!({
        "access_token": tok, "expires_in": s.opts.token_ttl.as_secs().max(1), "token_type": "Bearer",
    });
    s.finish(body, fault).await
}

async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let fault = match s.admit(Route::List, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = Shared::early(&fault) {
        return r;
    }
    let (size, (offset, _, _)) = match (s.page_size(&q), s.page_start(Route::List, &q)) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let items: Vec<Value> = s
        .lock()
        .subs
        .iter()
        .map(|(id, x)| sub_json(id, x))
        .collect();
    let body = s.paginate(Route::List, items, offset, size, None, false);
    s.finish(body, fault).await
}

async fn show(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match s.admit(Route::Get, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = Shared::early(&fault) {
        return r;
    }
    let body = s.lock().subs.get(&id).map(|x| sub_json(&id, x));
    match body {
        Some(b) => s.finish(b, fault).await,
        None => error_response(404, default_message(404)),
    }
}

async fn regenerate(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match s.admit(Route::Rotate, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = Shared::early(&fault) {
        return r;
    }
    let body = {
        let mut st = s.lock();
        let Some(sub) = st.subs.get_mut(&id) else {
            return error_response(404, default_message(404));
        };
        let mut v = sub_json(&id, sub);
        if !matches!(fault, Some(FaultKind::MissingSecret)) {
            // The old secret expires the moment this commits.
            sub.secret = new_secret();
            sub.rotations += 1;
            v[SECRET_FIELD] = Value::String(sub.secret.clone());
        }
        v
    };
    s.finish(body, fault).await
}

async fn deliveries(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let fault = match s.admit(Route::Deliveries, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = Shared::early(&fault) {
        return r;
    }
    match headers
        .get("x-monite-entity-id")
        .and_then(|v| v.to_str().ok())
    {
        None => return validation_error(&["header", "x-monite-entity-id"], "field required"),
        Some(e) if e != s.opts.entity_id => {
            return error_response(404, "Entity not found");
        }
        Some(_) => {}
    }
    let (size, (offset, gte, desc)) = match (s.page_size(&q), s.page_start(Route::Deliveries, &q)) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    // The log is kept oldest first; `order=desc` (with `sort=created_at`) turns it.
    let mut items: Vec<Value> = s
        .lock()
        .deliveries
        .iter()
        .filter(|d| gte.is_none_or(|g| d.created_at >= g))
        .map(delivery_json)
        .collect();
    if desc {
        items.reverse();
    }
    let body = s.paginate(Route::Deliveries, items, offset, size, gte, desc);
    s.finish(body, fault).await
}

impl MoniteSim {
    pub async fn start(opts: MoniteSimOptions) -> std::io::Result<MoniteSim> {
        let http = super::delivery_client(opts.delivery_timeout)?;
        let shared = Arc::new(Shared {
            opts,
            http,
            state: Mutex::new(SimState {
                subs: BTreeMap::new(),
                tokens: HashMap::new(),
                faults: VecDeque::new(),
                counts: HashMap::new(),
                window: None,
                deliveries: Vec::new(),
                expire_on: None,
                cursors: HashMap::new(),
            }),
        });
        let api = Router::new()
            .route("/auth/token", post(token))
            .route("/webhook_subscriptions", get(list))
            .route("/webhook_subscriptions/{id}", get(show))
            .route(
                "/webhook_subscriptions/{id}/regenerate_secret",
                post(regenerate),
            )
            .route("/webhook_deliveries", get(deliveries));
        let app = Router::new()
            .nest("/v1", api)
            .fallback(|| async { error_response(404, default_message(404)) })
            .layer(axum::middleware::map_response(super::add_request_id))
            .layer(axum::middleware::map_response_with_state(
                shared.opts.clock_skew,
                super::add_date,
            ))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = super::serve_until_dropped(listener, app, "monite sim");
        Ok(MoniteSim {
            handle: Arc::new(Handle {
                shared,
                addr,
                _server: server,
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// `http://127.0.0.1:PORT/v1`, the value for rekey's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.handle.addr)
    }

    pub fn options(&self) -> &MoniteSimOptions {
        &self.shared().opts
    }

    /// Creates an enabled subscription delivering to `url`; returns its id and the
    /// initial secret (what Monite's create returns once).
    pub fn add_subscription(&self, url: &str) -> (String, String) {
        let id = uuid::Uuid::new_v4().to_string();
        let secret = new_secret();
        self.shared().lock().subs.insert(
            id.clone(),
            Sub {
                url: url.to_string(),
                object_type: "receivable".into(),
                event_types: vec!["created".into(), "updated".into()],
                enabled: true,
                secret: secret.clone(),
                rotations: 0,
            },
        );
        (id, secret)
    }

    pub fn remove_subscription(&self, id: &str) -> bool {
        self.shared().lock().subs.remove(id).is_some()
    }

    /// Changes the delivery url (a PATCH in the real API); does not rotate.
    pub fn set_url(&self, id: &str, url: &str) -> bool {
        let mut st = self.shared().lock();
        st.subs.get_mut(id).is_some_and(|s| {
            s.url = url.to_string();
            true
        })
    }

    /// The secret Monite signs with right now (test oracle).
    pub fn secret_of(&self, id: &str) -> Option<String> {
        self.shared().lock().subs.get(id).map(|s| s.secret.clone())
    }

    pub fn rotation_count(&self, id: &str) -> u32 {
        self.shared().lock().subs.get(id).map_or(0, |s| s.rotations)
    }

    /// Makes every issued token invalid now, as if `expires_in` had passed.
    pub fn expire_tokens(&self) {
        let past = Instant::now();
        for exp in self.shared().lock().tokens.values_mut() {
            *exp = past;
        }
    }

    /// Expires every token just before the next request on `route` is checked: a
    /// token that runs out in the middle of a rekey run, at a chosen step.
    pub fn expire_tokens_at(&self, route: Route) {
        self.shared().lock().expire_on = Some(route);
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.shared().lock().tokens.len()
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

    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.shared().lock().deliveries.clone()
    }

    /// One signed delivery of an event now; recorded in the delivery log.
    pub async fn deliver(&self, id: &str, action: &str) -> Option<DeliveryRecord> {
        let s = self.shared();
        let (url, secret, object_type) = {
            let st = s.lock();
            let sub = st.subs.get(id).filter(|x| x.enabled)?;
            (sub.url.clone(), sub.secret.clone(), sub.object_type.clone())
        };
        let event_id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now() + s.opts.clock_skew;
        let body = json!({
            "id": event_id, "created_at": now.to_rfc3339_opts(SecondsFormat::Secs, true),
            "action": format!("{object_type}.{action}"), "api_version": "2024-01-31",
            "description": format!("{object_type} {action}"), "entity_id": s.opts.entity_id,
            "object": { "id": uuid::Uuid::new_v4().to_string() }, "object_type": object_type,
            "webhook_subscription_id": id,
        })
        .to_string();
        let sig = signing::monite_signature_header(&secret, now.timestamp(), body.as_bytes());
        let sent = s
            .http
            .post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Monite-Signature", sig)
            .body(body)
            .send()
            .await;
        let status = match sent {
            Ok(r) => {
                let st = r.status().as_u16();
                let _ = r.bytes().await;
                Some(st)
            }
            Err(_) => None,
        };
        let rec = DeliveryRecord {
            id: uuid::Uuid::new_v4().to_string(),
            event_id,
            subscription_id: id.to_string(),
            url,
            status,
            was_successful: status.is_some_and(|c| (200..300).contains(&c)),
            created_at: now,
            secret_fingerprint: Fingerprint::of_str(&secret),
        };
        s.lock().deliveries.push(rec.clone());
        Some(rec)
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

    async fn token_for(sim: &MoniteSim) -> String {
        let o = sim.options();
        let res = client()
            .post(format!("{}/auth/token", sim.base_url()))
            .header("x-monite-version", "2024-01-31")
            .json(&json!({"client_id": o.client_id, "client_secret": o.client_secret, "grant_type": "client_credentials"}))
            .send()
            .await
            .expect("token");
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.expect("json");
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 86400);
        v["access_token"].as_str().expect("token").to_string()
    }

    async fn get(sim: &MoniteSim, tok: &str, path: &str, entity: Option<&str>) -> (u16, Value) {
        let mut r = client()
            .get(format!("{}{path}", sim.base_url()))
            .bearer_auth(tok)
            .header("x-monite-version", "2024-01-31");
        if let Some(e) = entity {
            r = r.header("x-monite-entity-id", e);
        }
        let res = r.send().await.expect("send");
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn tokens_version_header_and_expiry() {
        let sim = MoniteSim::start(MoniteSimOptions::default())
            .await
            .expect("sim");
        let (id, _) = sim.add_subscription("http://127.0.0.1:9/x");
        let tok = token_for(&sim).await;
        let (code, v) = get(&sim, &tok, &format!("/webhook_subscriptions/{id}"), None).await;
        assert_eq!((code, v["status"].as_str()), (200, Some("enabled")));
        assert!(v.get("secret").is_none(), "reads never show the secret");
        // No version header: 422 with FastAPI's detail list.
        let res = client()
            .get(format!("{}/webhook_subscriptions", sim.base_url()))
            .bearer_auth(&tok)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 422);
        sim.expire_tokens();
        let (code, v) = get(&sim, &tok, "/webhook_subscriptions", None).await;
        assert_eq!(code, 401);
        assert!(v["error"]["message"].is_string());
        // Wrong credentials are refused.
        let res = client()
            .post(format!("{}/auth/token", sim.base_url()))
            .header("x-monite-version", "2024-01-31")
            .json(&json!({"client_id": "x", "client_secret": "y", "grant_type": "client_credentials"}))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 401);
    }

    #[tokio::test]
    async fn regenerate_invalidates_and_the_log_pages_by_cursor() {
        let sim = MoniteSim::start(MoniteSimOptions {
            default_page_size: 2,
            ..Default::default()
        })
        .await
        .expect("sim");
        let store = Arc::new(MemStore::default());
        let rx = Receiver::start(store.clone()).await.expect("rx");
        let url = rx.register("monite/a", "p");
        let (id, first) = sim.add_subscription(&url);
        store.publish("p", &first, None);
        assert!(sim.deliver(&id, "created").await.expect("d").was_successful);
        let tok = token_for(&sim).await;
        let res = client()
            .post(format!(
                "{}/webhook_subscriptions/{id}/regenerate_secret",
                sim.base_url()
            ))
            .bearer_auth(&tok)
            .header("x-monite-version", "2024-01-31")
            .send()
            .await
            .expect("rotate");
        let v: Value = res.json().await.expect("json");
        let new = v["secret"].as_str().expect("secret").to_string();
        assert_ne!(new, first);
        assert_eq!(sim.secret_of(&id).as_deref(), Some(new.as_str()));
        // Not yet published: the receiver rejects, the log says so.
        assert!(!sim.deliver(&id, "updated").await.expect("d").was_successful);
        store.publish("p", &new, Some(&first));
        for _ in 0..3 {
            assert!(sim.deliver(&id, "updated").await.expect("d").was_successful);
        }
        let entity = sim.options().entity_id.clone();
        let (code, _) = get(&sim, &tok, "/webhook_deliveries", None).await;
        assert_eq!(code, 422, "the entity header is required");
        let mut seen = vec![];
        let mut path = "/webhook_deliveries".to_string();
        loop {
            let (code, v) = get(&sim, &tok, &path, Some(&entity)).await;
            assert_eq!(code, 200, "{v}");
            let data = v["data"].as_array().expect("data").clone();
            assert!(data.len() <= 2);
            seen.extend(data);
            match v["next_pagination_token"].as_str() {
                Some(t) => path = format!("/webhook_deliveries?pagination_token={t}"),
                None => break,
            }
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(
            seen.iter().filter(|d| d["was_successful"] == true).count(),
            4
        );
        // created_at__gte in the future filters everything out.
        let later =
            (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
        let (_, v) = get(
            &sim,
            &tok,
            &format!("/webhook_deliveries?created_at__gte={later}"),
            Some(&entity),
        )
        .await;
        assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    }

    #[tokio::test]
    async fn a_skewed_clock_moves_the_date_header_and_the_log_times() {
        for skew in [5i64, -5] {
            let sim = MoniteSim::start(MoniteSimOptions {
                clock_skew: chrono::TimeDelta::seconds(skew),
                ..Default::default()
            })
            .await
            .expect("sim");
            let store = Arc::new(MemStore::default());
            let rx = Receiver::start(store.clone()).await.expect("rx");
            let (id, first) = sim.add_subscription(&rx.register("monite/a", "p"));
            store.publish("p", &first, None);
            let before = Utc::now();
            let res = client()
                .get(format!("{}/webhook_subscriptions", sim.base_url()))
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
            let d = sim.deliver(&id, "created").await.expect("d");
            assert!(
                d.was_successful,
                "signature timestamps are within tolerance"
            );
            let off = (d.created_at - before).num_milliseconds();
            assert!(within.contains(&off), "{skew}: created_at is {off} ms off");
            // `created_at__gte` compares with the simulator's clock.
            let tok = token_for(&sim).await;
            let entity = sim.options().entity_id.clone();
            let gte = (before + chrono::TimeDelta::seconds(skew) - chrono::TimeDelta::seconds(1))
                .to_rfc3339_opts(SecondsFormat::Micros, true);
            let path = format!("/webhook_deliveries?created_at__gte={gte}");
            let (_, v) = get(&sim, &tok, &path, Some(&entity)).await;
            assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{skew}");
        }
    }

    #[tokio::test]
    async fn rate_limit_answers_429_with_retry_after() {
        let sim = MoniteSim::start(MoniteSimOptions {
            rate_limit_per_second: 2,
            ..Default::default()
        })
        .await
        .expect("sim");
        let tok = token_for(&sim).await;
        let (a, _) = get(&sim, &tok, "/webhook_subscriptions", None).await;
        let res = client()
            .get(format!("{}/webhook_subscriptions", sim.base_url()))
            .bearer_auth(&tok)
            .header("x-monite-version", "2024-01-31")
            .send()
            .await
            .expect("send");
        assert_eq!((a, res.status().as_u16()), (200, 429));
        assert_eq!(res.headers()["retry-after"], "1");
    }
}
