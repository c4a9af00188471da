//! Token lifetime contract tests: a fake Vault whose tokens expire on a test clock
//! that the store reads too, so months pass in a test without sleeping. The fake
//! records every request made with an expired token; none may be.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

use super::*;

/// tokio's monotonic time plus an offset the test moves forward by hand.
struct TestClock {
    offset_secs: AtomicU64,
}

impl TestClock {
    fn new() -> Arc<TestClock> {
        Arc::new(TestClock {
            offset_secs: AtomicU64::new(0),
        })
    }

    fn now(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.offset_secs.load(Ordering::SeqCst))
    }

    fn advance(&self, secs: u64) {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst);
    }
}

struct FakeToken {
    granted_at: Instant,
    ttl: Duration,
    renewable: bool,
    revoked: bool,
}

impl FakeToken {
    fn expired(&self, now: Instant) -> bool {
        !self.ttl.is_zero() && now >= self.granted_at + self.ttl
    }
}

struct Vault {
    clock: Arc<TestClock>,
    tokens: HashMap<String, FakeToken>,
    /// TTL and renewability of the tokens AppRole logins hand out.
    login_ttl: u64,
    login_renewable: bool,
    /// Logins hand out tokens that are refused at once.
    issue_revoked: bool,
    /// Paths the (valid) token has no policy for.
    forbidden: HashSet<String>,
    kv: HashMap<String, Value>,
    /// Every request, in order: `"POST auth/token/renew-self"`.
    log: Vec<String>,
    /// Requests made with a token that had expired: the invariant is none.
    with_expired_token: Vec<String>,
    /// Told of every renewal.
    renewed: Arc<tokio::sync::Notify>,
}

impl Vault {
    fn count(&self, what: &str) -> usize {
        self.log.iter().filter(|l| l.as_str() == what).count()
    }
}

type S = Arc<Mutex<Vault>>;

const RENEW: &str = "POST auth/token/renew-self";
const LOOKUP: &str = "GET auth/token/lookup-self";
const LOGIN: &str = "POST auth/approle/login";

fn answer(status: StatusCode, body: Value) -> (StatusCode, Json<Value>) {
    (status, Json(body))
}

fn denied() -> (StatusCode, Json<Value>) {
    answer(
        StatusCode::FORBIDDEN,
        json!({ "errors": ["permission denied"] }),
    )
}

async fn handle(
    State(s): State<S>,
    method: Method,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let mut v = s.lock().unwrap();
    let path = uri.path().trim_start_matches("/v1/").to_string();
    let line = format!("{method} {path}");
    v.log.push(line.clone());
    let now = v.clock.now();
    if path == "sys/seal-status" {
        return answer(StatusCode::OK, json!({ "sealed": false }));
    }
    if line == LOGIN {
        return login(&mut v, &body, now);
    }
    let token = h
        .get("x-vault-token")
        .and_then(|t| t.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Some(t) = v.tokens.get(&token) else {
        return denied();
    };
    if t.expired(now) {
        v.with_expired_token.push(line);
        return denied();
    }
    if t.revoked {
        return denied();
    }
    match line.as_str() {
        LOOKUP => {
            let left = (t.granted_at + t.ttl).saturating_duration_since(now);
            let ttl = if t.ttl.is_zero() { 0 } else { left.as_secs() };
            answer(
                StatusCode::OK,
                json!({ "data": { "ttl": ttl, "renewable": t.renewable } }),
            )
        }
        RENEW => renew(&mut v, &token, now),
        _ => kv(&mut v, &method, &path, &body),
    }
}

fn login(v: &mut Vault, body: &[u8], now: Instant) -> (StatusCode, Json<Value>) {
    let creds: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if creds["role_id"] != "role" || creds["secret_id"] != "sid" {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({ "errors": ["invalid role or secret ID"] }),
        );
    }
    let token = format!("approle-{}", v.count(LOGIN));
    v.tokens.insert(
        token.clone(),
        FakeToken {
            granted_at: now,
            ttl: Duration::from_secs(v.login_ttl),
            renewable: v.login_renewable,
            revoked: v.issue_revoked,
        },
    );
    answer(
        StatusCode::OK,
        json!({ "auth": { "client_token": token, "lease_duration": v.login_ttl,
                          "renewable": v.login_renewable } }),
    )
}

fn renew(v: &mut Vault, token: &str, now: Instant) -> (StatusCode, Json<Value>) {
    let Some(t) = v.tokens.get_mut(token) else {
        return denied();
    };
    if !t.renewable {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({ "errors": ["lease is not renewable"] }),
        );
    }
    t.granted_at = now;
    v.renewed.notify_one();
    answer(
        StatusCode::OK,
        json!({ "auth": { "client_token": token, "lease_duration": t.ttl.as_secs(),
                          "renewable": true } }),
    )
}

/// KV v1 at `secret/`.
fn kv(v: &mut Vault, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Json<Value>) {
    let Some(key) = path.strip_prefix("secret/") else {
        return answer(StatusCode::NOT_FOUND, json!({ "errors": [] }));
    };
    if v.forbidden.contains(key) {
        return denied();
    }
    match *method {
        Method::GET => match v.kv.get(key) {
            Some(d) => answer(StatusCode::OK, json!({ "data": d })),
            None => answer(StatusCode::NOT_FOUND, json!({ "errors": [] })),
        },
        _ => {
            let data = serde_json::from_slice(body).unwrap_or(Value::Null);
            v.kv.insert(key.to_string(), data);
            answer(StatusCode::NO_CONTENT, Value::Null)
        }
    }
}

async fn fake(clock: &Arc<TestClock>) -> (String, S) {
    let s: S = Arc::new(Mutex::new(Vault {
        clock: clock.clone(),
        tokens: HashMap::new(),
        login_ttl: 3600,
        login_renewable: false,
        issue_revoked: false,
        forbidden: HashSet::new(),
        kv: HashMap::new(),
        log: Vec::new(),
        with_expired_token: Vec::new(),
        renewed: Arc::default(),
    }));
    let app = axum::Router::new().fallback(handle).with_state(s.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, s)
}

fn static_token(s: &S, clock: &TestClock, ttl: u64, renewable: bool) {
    s.lock().unwrap().tokens.insert(
        "static".into(),
        FakeToken {
            granted_at: clock.now(),
            ttl: Duration::from_secs(ttl),
            renewable,
            revoked: false,
        },
    );
}

fn settings(addr: &str, auth: VaultAuth) -> VaultSettings {
    VaultSettings {
        address: addr.to_string(),
        auth,
        mount: "secret".into(),
        kv_version: KvVersion::V1,
        ca_cert: None,
        timeout: Duration::from_secs(5),
        namespace: None,
        destroy_old_versions: false,
        min_token_ttl: Duration::from_secs(60),
    }
}

fn approle() -> VaultAuth {
    VaultAuth::AppRole {
        mount: "approle".into(),
        role_id: "role".into(),
        secret_id: secret("sid".to_string()),
    }
}

async fn store(addr: &str, auth: VaultAuth, clock: &Arc<TestClock>) -> VaultStore {
    let c = clock.clone();
    VaultStore::connect_with_clock(&settings(addr, auth), Arc::new(move || c.now()))
        .await
        .unwrap()
}

fn entry() -> Entry {
    Entry {
        current: secret("new".to_string()),
        previous: Some(secret("old".to_string())),
        rotated_at: chrono::Utc::now(),
        rotation_id: "r".into(),
        provider: "fintoro".into(),
        subscription: "801".into(),
    }
}

/// The rotation's preflight, then a publish after long enough that the token would
/// have died on the cached lookup: the store renews first, every time.
#[tokio::test]
async fn publish_long_after_preflight_renews_the_token_first() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    static_token(&vault, &clock, 3600, true);
    let v = store(
        &addr,
        VaultAuth::Token(secret("static".to_string())),
        &clock,
    )
    .await;
    v.preflight("w/801").await.unwrap();
    assert_eq!(vault.lock().unwrap().count(RENEW), 0, "a fresh token");

    // Past two thirds of the TTL (a Vault outage after the mint, say): renewed
    // before the write, not after a 403.
    clock.advance(3000);
    v.write("w/801", &entry(), Expect::Absent).await.unwrap();
    {
        let k = vault.lock().unwrap();
        let tail: Vec<&str> = k.log.iter().rev().take(2).map(String::as_str).collect();
        assert_eq!(tail, ["POST secret/w/801", RENEW], "renew, then write");
    }
    // The original TTL is long gone by now; each renewal carried the token on.
    for _ in 0..3 {
        clock.advance(3000);
        v.read("w/801").await.unwrap().unwrap();
    }
    let k = vault.lock().unwrap();
    assert_eq!(k.count(RENEW), 4, "{:?}", k.log);
    assert!(
        k.with_expired_token.is_empty(),
        "{:?}",
        k.with_expired_token
    );
}

/// A Vault outage that outlasts an AppRole token's TTL: the store knows the token is
/// gone and logs in again before publishing, instead of sending it and failing.
#[tokio::test]
async fn an_approle_token_outlived_by_an_outage_is_replaced_before_the_publish() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    let v = store(&addr, approle(), &clock).await;
    v.preflight("w/801").await.unwrap();
    clock.advance(4000);
    v.write("w/801", &entry(), Expect::Absent).await.unwrap();
    let k = vault.lock().unwrap();
    assert_eq!(k.count(LOGIN), 2, "{:?}", k.log);
    assert!(
        k.with_expired_token.is_empty(),
        "{:?}",
        k.with_expired_token
    );
}

/// A role whose tokens live less than `min_token_ttl`: a rotation still starts (a
/// new login is always at hand), and tokens are replaced at their renewal point, not
/// minted anew for every call.
#[tokio::test]
async fn a_short_lived_approle_token_is_replaced_at_its_renewal_point_not_per_call() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    vault.lock().unwrap().login_ttl = 45;
    let v = store(&addr, approle(), &clock).await;
    v.preflight("w/801").await.unwrap();
    let after_preflight = vault.lock().unwrap().count(LOGIN);
    assert!(after_preflight <= 2, "{:?}", vault.lock().unwrap().log);
    for _ in 0..10 {
        v.read("w/801").await.unwrap();
    }
    assert_eq!(vault.lock().unwrap().count(LOGIN), after_preflight);
    clock.advance(31);
    v.read("w/801").await.unwrap();
    let k = vault.lock().unwrap();
    assert_eq!(k.count(LOGIN), after_preflight + 1, "{:?}", k.log);
    assert!(
        k.with_expired_token.is_empty(),
        "{:?}",
        k.with_expired_token
    );
}

/// The token died early (revoked, Vault's token store lost): Vault answers 403
/// "permission denied". The store logs in once more and the call succeeds; a 403
/// that is about the path costs no login.
#[tokio::test]
async fn a_refused_approle_token_is_replaced_once_and_the_call_succeeds() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    let v = store(&addr, approle(), &clock).await;
    v.write("w/801", &entry(), Expect::Absent).await.unwrap();
    for t in vault.lock().unwrap().tokens.values_mut() {
        t.revoked = true;
    }
    let read = v.read("w/801").await.unwrap().unwrap();
    assert_eq!(read.entry.current.expose_secret(), "new");
    assert_eq!(vault.lock().unwrap().count(LOGIN), 2);

    vault.lock().unwrap().forbidden.insert("w/802".into());
    let err = v.read("w/802").await.unwrap_err();
    assert!(matches!(err, StoreError::Forbidden { .. }), "{err}");
    assert!(err.to_string().contains("w/802"), "{err}");
    assert_eq!(vault.lock().unwrap().count(LOGIN), 2, "no login for a path");
}

/// A new login whose token is refused too ends the call: one login per call, never
/// a loop.
#[tokio::test]
async fn a_token_refused_again_after_a_new_login_fails_the_call_without_a_loop() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    let v = store(&addr, approle(), &clock).await;
    vault.lock().unwrap().issue_revoked = true;
    for t in vault.lock().unwrap().tokens.values_mut() {
        t.revoked = true;
    }
    for call in 1..=2 {
        let err = v.read("w/801").await.unwrap_err();
        assert!(matches!(err, StoreError::Forbidden { .. }), "{err}");
        assert_eq!(vault.lock().unwrap().count(LOGIN), 1 + call);
    }
}

/// A static token that cannot be renewed: refused before a rotation when close to
/// expiry, and once expired every call fails naming the problem, without sending it.
#[tokio::test]
async fn a_static_token_that_cannot_be_renewed_is_named_not_sent_expired() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    static_token(&vault, &clock, 600, false);
    let v = store(
        &addr,
        VaultAuth::Token(secret("static".to_string())),
        &clock,
    )
    .await;
    v.preflight("w/801").await.unwrap();
    clock.advance(570);
    let err = v.preflight("w/801").await.unwrap_err();
    assert!(matches!(err, StoreError::Auth { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("expires in") && text.contains("min_token_ttl"),
        "{text}"
    );
    assert!(text.contains("cannot be renewed"), "{text}");
    // Still valid for a single call: a minted secret can still be published.
    v.write("w/801", &entry(), Expect::Absent).await.unwrap();
    clock.advance(60);
    let err = v.read("w/801").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("token has expired"), "{text}");
    assert!(!text.contains("static"), "the token never appears: {text}");
    let k = vault.lock().unwrap();
    assert!(
        k.with_expired_token.is_empty(),
        "{:?}",
        k.with_expired_token
    );
    assert_eq!(k.count(RENEW), 0);
}

/// Nothing calls Vault for longer than the token's TTL (a daemon between monthly
/// rotations): the store renews the token on its own, so it still works afterwards.
/// Real time: the keeper sleeps on tokio's clock, a 2-second token keeps it short.
#[tokio::test]
async fn an_idle_store_keeps_a_renewable_token_alive_past_its_ttl() {
    let clock = TestClock::new();
    let (addr, vault) = fake(&clock).await;
    static_token(&vault, &clock, 2, true);
    let mut s = settings(&addr, VaultAuth::Token(secret("static".to_string())));
    s.timeout = Duration::from_millis(500);
    s.min_token_ttl = Duration::from_millis(500);
    let pacing = KeepAlivePacing {
        first_look: Duration::ZERO,
        cooldown: Duration::from_millis(50),
    };
    let c = clock.clone();
    let v = VaultStore::connect_paced(&s, Arc::new(move || c.now()), pacing)
        .await
        .unwrap();
    let renewed = vault.lock().unwrap().renewed.clone();
    let start = Instant::now();
    // Renewals, until well past the token's first 2 seconds.
    while start.elapsed() < Duration::from_millis(2500) {
        tokio::time::timeout(Duration::from_secs(10), renewed.notified())
            .await
            .expect("the idle store renews its token");
    }
    v.read("w/801").await.unwrap();
    {
        let k = vault.lock().unwrap();
        assert!(
            k.with_expired_token.is_empty(),
            "{:?}",
            k.with_expired_token
        );
        assert!(k.count(LOOKUP) <= 1, "{:?}", k.log);
    }
    // Dropped, the store stops renewing: a renewal already on its way at the drop
    // may still land (and one may be noted but not yet awaited), nothing after.
    drop(v);
    let before = vault.lock().unwrap().count(RENEW);
    let mut late = 0;
    while tokio::time::timeout(Duration::from_millis(1500), renewed.notified())
        .await
        .is_ok()
    {
        late += 1;
        assert!(late <= 2, "a dropped store keeps renewing");
    }
    assert!(vault.lock().unwrap().count(RENEW) <= before + 1);
}
