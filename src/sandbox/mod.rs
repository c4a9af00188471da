//! The sandbox: in-process simulators of the providers rekey rotates for, and a
//! receiver that verifies their deliveries against the published secrets.
//!
//! Used by the tests and by `rekey sandbox`, the one-command demo. The simulators
//! are stateful and sign real deliveries (see [`signing`]), so a rotation that
//! would break a real customer's receiver shows up here as rejected deliveries in
//! [`receiver::Receiver`]'s counters; fault injection reproduces the provider and
//! network failures rekey must survive (above all: a rotation committed at the
//! provider whose response never arrives).

pub mod demo;
pub mod faults;
pub mod fintoro;
pub mod monite;
pub mod receiver;
pub mod signing;
pub mod storno;

use tokio::sync::oneshot;

/// Keeps a simulator's or receiver's HTTP server running; dropping it shuts the
/// server down.
pub(crate) struct ServerGuard(Option<oneshot::Sender<()>>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            // The server may already be gone; nothing to do then.
            let _ = tx.send(());
        }
    }
}

/// Serves `app` on `listener` until the returned guard is dropped. A graceful
/// shutdown rather than aborting the accept loop: aborting would leave open
/// keep-alive connections served by a "stopped" simulator.
pub(crate) fn serve_until_dropped(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    what: &'static str,
) -> ServerGuard {
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let stop = async {
            let _ = rx.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, server = what, "sandbox server failed");
        }
    });
    ServerGuard(Some(tx))
}

/// Axum middleware: every simulated provider answers with an `X-Request-Id`, as the
/// real ones do (rekey logs it).
pub(crate) async fn add_request_id(mut res: axum::response::Response) -> axum::response::Response {
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Axum middleware (with the simulator's clock skew as state): every answer carries
/// a `Date` read from the simulator's clock, so a simulator whose clock is off shows
/// it the way a real provider would. hyper adds its own `Date` only to a response
/// that has none, so this one is what goes out.
pub(crate) async fn add_date(
    axum::extract::State(skew): axum::extract::State<chrono::TimeDelta>,
    mut res: axum::response::Response,
) -> axum::response::Response {
    let now = chrono::Utc::now() + skew;
    let date = now.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(v) = axum::http::HeaderValue::from_str(&date) {
        res.headers_mut().insert(axum::http::header::DATE, v);
    }
    res
}

/// The client a simulator delivers webhooks with: the provider's delivery timeout, no
/// redirects followed, no proxy (receivers are on loopback).
pub(crate) fn delivery_client(timeout: std::time::Duration) -> std::io::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(std::io::Error::other)
}
