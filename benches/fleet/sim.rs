//! A Fintoro-like provider for the fleet benchmark: only the four calls a rotation
//! makes (`GET /whoami`, `GET` and `POST …/rotate-secret` on a subscription, and the
//! list), each answered after a fixed latency, with one token per account.
//!
//! It measures what the provider sees: requests in flight (now, the peak, and the
//! time-weighted mean while a fleet rotates), requests per account that its token
//! bucket (the same parameters as rekey's limit, allowing for arrival jitter) would
//! have refused, and when each subscription was first checked after its rotation —
//! the call after which rekey records `confirming`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

/// One provider account: its subscriptions' ids and its rate limit.
pub struct Account {
    pub token: String,
    pub ids: std::ops::Range<u64>,
    /// Requests per second the provider allows (a token bucket of this size), if any.
    pub rate: Option<f64>,
}

#[derive(Default)]
struct Sub {
    rotations: u32,
    /// Set by the first `GET` after a rotation: the confirmation check.
    checked: bool,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
}

#[derive(Default)]
struct Stats {
    in_flight: usize,
    peak: usize,
    /// ∫ in_flight dt since `since`, in request-seconds.
    area: f64,
    changed: Option<Instant>,
    /// The first request since the reset: the mean counts from here.
    since: Option<Instant>,
    requests: u64,
    over_limit: u64,
    checked: usize,
    last_checked: Option<Instant>,
}

struct Shared {
    latency: Duration,
    tolerance: Duration,
    accounts: HashMap<String, usize>,
    buckets: Mutex<Vec<Option<Bucket>>>,
    subs: Mutex<HashMap<u64, Sub>>,
    stats: Mutex<Stats>,
}

#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
    pub base_url: String,
    _server: Arc<tokio::task::JoinHandle<()>>,
}

/// What the provider saw between two [`Sim::reset`]s.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub peak_in_flight: usize,
    pub mean_in_flight: f64,
    pub requests: u64,
    pub over_limit: u64,
    pub checked: usize,
    pub last_checked: Option<Instant>,
}

impl Sim {
    /// `tolerance`: how early a request may arrive and still find its token (requests
    /// leave rekey spaced by its limiter and arrive a little bunched).
    pub async fn start(accounts: Vec<Account>, latency: Duration, tolerance: Duration) -> Sim {
        let mut by_token = HashMap::new();
        let mut subs = HashMap::new();
        let mut buckets = vec![];
        for (i, a) in accounts.iter().enumerate() {
            by_token.insert(a.token.clone(), i);
            for id in a.ids.clone() {
                subs.insert(id, Sub::default());
            }
            buckets.push(a.rate.map(|rate| Bucket {
                tokens: rate,
                at: Instant::now(),
                rate,
            }));
        }
        let shared = Arc::new(Shared {
            latency,
            tolerance,
            accounts: by_token,
            buckets: Mutex::new(buckets),
            subs: Mutex::new(subs),
            stats: Mutex::new(Stats::default()),
        });
        let app = Router::new()
            .route("/whoami", get(whoami))
            .route("/webhook-subscriptions", get(list))
            .route("/webhook-subscriptions/{id}", get(one))
            .route("/webhook-subscriptions/{id}/rotate-secret", post(rotate))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the simulator");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sim {
            shared,
            base_url: format!("http://{addr}"),
            _server: Arc::new(server),
        }
    }

    /// Starts measuring afresh (the time-weighted mean counts from the next request).
    pub fn reset(&self) {
        let mut s = self.shared.stats.lock().expect("stats");
        let now = Instant::now();
        *s = Stats {
            in_flight: s.in_flight,
            changed: Some(now),
            ..Stats::default()
        };
    }

    pub fn seen(&self) -> Seen {
        let s = self.shared.stats.lock().expect("stats");
        let now = Instant::now();
        let end = s.last_checked.unwrap_or(now);
        let area = s.area
            + s.changed
                .map_or(0.0, |c| end.saturating_duration_since(c).as_secs_f64())
                * s.in_flight as f64;
        let span = s
            .since
            .map_or(0.0, |t| end.saturating_duration_since(t).as_secs_f64());
        Seen {
            peak_in_flight: s.peak,
            mean_in_flight: if span > 0.0 { area / span } else { 0.0 },
            requests: s.requests,
            over_limit: s.over_limit,
            checked: s.checked,
            last_checked: s.last_checked,
        }
    }

    /// Subscriptions rotated more than once (there should be none).
    pub fn rotated_twice(&self) -> usize {
        let subs = self.shared.subs.lock().expect("subs");
        subs.values().filter(|s| s.rotations > 1).count()
    }
}

/// Why a request was refused before it was served.
enum Refused {
    Token,
    /// Over the account's rate limit; retry after this many seconds.
    RateLimit(u64),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Token => StatusCode::UNAUTHORIZED.into_response(),
            Refused::RateLimit(after) => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, after.to_string())],
            )
                .into_response(),
        }
    }
}

impl Shared {
    /// Counts the request in; refuses it when the token is unknown or the account's
    /// bucket is empty.
    fn enter(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let Some(&account) = self.accounts.get(token) else {
            return Err(Refused::Token);
        };
        let now = Instant::now();
        {
            let mut s = self.stats.lock().expect("stats");
            if let Some(c) = s.changed {
                s.area += now.saturating_duration_since(c).as_secs_f64() * s.in_flight as f64;
            }
            s.changed = Some(now);
            s.since.get_or_insert(now);
            s.in_flight += 1;
            s.peak = s.peak.max(s.in_flight);
            s.requests += 1;
        }
        let mut buckets = self.buckets.lock().expect("buckets");
        if let Some(b) = buckets[account].as_mut() {
            let later = now + self.tolerance;
            let refill = later.saturating_duration_since(b.at).as_secs_f64() * b.rate;
            b.tokens = (b.tokens + refill).min(b.rate);
            b.at = later.max(b.at);
            if b.tokens < 1.0 {
                let wait = (1.0 - b.tokens) / b.rate;
                drop(buckets);
                self.stats.lock().expect("stats").over_limit += 1;
                self.leave();
                return Err(Refused::RateLimit(wait.ceil().max(1.0) as u64));
            }
            b.tokens -= 1.0;
        }
        Ok(())
    }

    fn leave(&self) {
        let now = Instant::now();
        let mut s = self.stats.lock().expect("stats");
        if let Some(c) = s.changed {
            s.area += now.saturating_duration_since(c).as_secs_f64() * s.in_flight as f64;
        }
        s.changed = Some(now);
        s.in_flight -= 1;
    }
}

fn sub_json(id: u64) -> serde_json::Value {
    json!({
        "id": id, "companyId": 15, "name": format!("bench {id}"),
        "url": "http://127.0.0.1:9/unused", "isActive": true,
        "subscribedEvents": ["invoice.created"], "lastSuccessAt": null, "lastFailureAt": null,
        "disabledAt": null, "disabledReason": null,
        "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z",
    })
}

fn json(body: serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn whoami(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = s.enter(&headers) {
        return r.into_response();
    }
    tokio::time::sleep(s.latency).await;
    s.leave();
    json(json!({"companyId": 15, "companyName": "Bench s.r.o.", "scopes": ["write"]}))
}

async fn list(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = s.enter(&headers) {
        return r.into_response();
    }
    tokio::time::sleep(s.latency).await;
    let data: Vec<_> = {
        let subs = s.subs.lock().expect("subs");
        let mut ids: Vec<u64> = subs.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter().map(sub_json).collect()
    };
    s.leave();
    json(json!({ "data": data }))
}

async fn one(State(s): State<Arc<Shared>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    if let Err(r) = s.enter(&headers) {
        return r.into_response();
    }
    tokio::time::sleep(s.latency).await;
    let known = {
        let mut subs = s.subs.lock().expect("subs");
        match subs.get_mut(&id) {
            Some(sub) if sub.rotations > 0 && !sub.checked => {
                sub.checked = true;
                let mut st = s.stats.lock().expect("stats");
                st.checked += 1;
                st.last_checked = Some(Instant::now());
                true
            }
            Some(_) => true,
            None => false,
        }
    };
    s.leave();
    if known {
        json(sub_json(id))
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn rotate(State(s): State<Arc<Shared>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    if let Err(r) = s.enter(&headers) {
        return r.into_response();
    }
    tokio::time::sleep(s.latency).await;
    let known = {
        let mut subs = s.subs.lock().expect("subs");
        subs.get_mut(&id).map(|sub| {
            sub.rotations += 1;
            sub.checked = false;
        })
    };
    s.leave();
    match known {
        Some(()) => {
            let mut body = sub_json(id);
            body["plainTextSecret"] =
                json!(format!("whsec_fintoro_{}", uuid::Uuid::new_v4().simple()));
            json(body)
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
