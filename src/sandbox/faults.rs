//! Fault injection shared by the provider simulators: what can go wrong with a
//! request, and the broken responses that reproduce it at the HTTP level. The
//! faults that matter most commit a rotation and then lose its response, which is
//! exactly what rekey's write-ahead state exists to survive.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;

/// What a queued fault does to the next matching request.
#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer with this status and the provider's JSON error body for it. Nothing is
    /// committed.
    Status(u16),
    /// 429 with the provider's body, with `Retry-After` only when given.
    TooManyRequests { retry_after: Option<u64> },
    /// Do the work (a rotate IS committed), then answer only after this delay: the
    /// client that times out has lost the response of a committed change.
    Delay(Duration),
    /// 200 with an HTML page instead of JSON, as a proxy in front would send. The
    /// request never reached the application, so nothing is committed.
    Garbage,
    /// Rotate: 200 with the subscription but no secret; NOT committed.
    MissingSecret,
    /// The change is committed, the status line, headers and part of the body go
    /// out, then the connection is cut: the client sees 200 and then a body error,
    /// never the secret.
    CommitThenDrop,
    /// The change is committed, then the connection is closed before any byte of the
    /// response: the client's send itself fails (incomplete message).
    CommitThenClose,
    /// The change is committed, the body is truncated JSON (well-framed, unparsable).
    CommitThenTruncate,
}

/// Where a partial body is cut: before the field `secret_field` (so no fragment of
/// the secret ever reaches the client) and at most half way.
pub(crate) fn cut_point(body: &str, secret_field: &str) -> usize {
    let half = body.len() / 2;
    body.find(&format!("\"{secret_field}\""))
        .map_or(half, |p| p.min(half))
}

/// A 200 that announces the full length but ends early; hyper then closes the
/// connection. Its body is ready at once, so hyper gives up before flushing
/// anything: the client's request fails before it sees a status. (The body reports
/// an unknown size, so hyper takes our `Content-Length`; routing it through a data
/// stream does that.)
pub(crate) fn closed_response(body: &str, secret_field: &str) -> Response {
    let partial = body[..cut_point(body, secret_field)].to_string();
    let stream = Body::from(partial).into_data_stream();
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    res
}

/// A 200 whose body stalls after a prefix and then fails, so hyper flushes the head
/// and the prefix before it aborts the connection: the client sees the status, then
/// a body error. The only pausable, failing body at hand (no `futures` dependency)
/// is a streamed upstream response, so a one-shot raw TCP peer plays upstream:
/// it sends the prefix, pauses, and hangs up short of its `Content-Length`.
pub(crate) async fn dropped_response(
    http: &reqwest::Client,
    body: &str,
    secret_field: &str,
) -> Response {
    let upstream = async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = listener.local_addr().ok()?;
        let partial = body.as_bytes()[..cut_point(body, secret_field)].to_vec();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            if let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&partial).await;
                let _ = sock.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        http.get(format!("http://{addr}/")).send().await.ok()
    };
    match upstream.await {
        Some(up) => {
            let mut res = Response::new(Body::new(reqwest::Body::from(up)));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        // Could not stage the stall: still cut the connection, just earlier.
        None => closed_response(body, secret_field),
    }
}

/// Sends a successful (already committed) answer the way `fault` says: late, cut off
/// mid-body, closed before any byte, truncated — or plainly. `secret_field` is where
/// a cut must fall so the secret never reaches the client.
pub(crate) async fn committed_response(
    http: &reqwest::Client,
    status: axum::http::StatusCode,
    body: String,
    fault: Option<FaultKind>,
    secret_field: &str,
) -> Response {
    use axum::response::IntoResponse;
    let json = [(header::CONTENT_TYPE, "application/json")];
    match fault {
        Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
        Some(FaultKind::CommitThenDrop) => {
            return dropped_response(http, &body, secret_field).await;
        }
        Some(FaultKind::CommitThenClose) => return closed_response(&body, secret_field),
        Some(FaultKind::CommitThenTruncate) => {
            let cut = body[..cut_point(&body, secret_field)].to_string();
            return (axum::http::StatusCode::OK, json, cut).into_response();
        }
        _ => {}
    }
    (status, json, body).into_response()
}
