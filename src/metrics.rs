//! Prometheus metrics and a health check for the daemon (`[metrics] listen = …`, off
//! by default), served with axum on `/metrics` and `/healthz`.
//!
//! Nothing in the rotation path calls into this module. The scheduler feeds it the
//! history rows the engine appended (so every transition is counted exactly once,
//! whichever task made it), and for the gauges each subscription's record as it
//! changes and the counts by state it keeps. Labels are provider, outcome, state and subscription names: never a secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::rotation::Phase;
use crate::state::HistoryRow;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    provider: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabels {
    subscription: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OffsetLabels {
    peer: String,
    bound: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

pub struct Metrics {
    registry: Registry,
    rotations: Family<RotationLabels, Counter>,
    subscriptions: Family<StateLabels, Gauge>,
    exposure: Histogram,
    confirmation: Histogram,
    next_rotation: Family<SubscriptionLabels, Gauge>,
    last_success: Family<SubscriptionLabels, Gauge>,
    clock_offset: Family<OffsetLabels, FloatGauge>,
    heartbeat_gauge: Gauge,
    leader: Gauge,
    lease_epoch: Gauge,
    /// A PostgreSQL cluster's standby: healthy while it waits for the lease.
    standby: std::sync::atomic::AtomicBool,
    /// rotation id → when its secret was minted / published, until the next step of
    /// the same rotation is seen.
    minted_at: Mutex<HashMap<String, DateTime<Utc>>>,
    published_at: Mutex<HashMap<String, DateTime<Utc>>>,
    /// Unix time of the scheduler loop's last iteration, for `/healthz`.
    heartbeat: AtomicI64,
}

/// `/healthz` fails once the scheduler loop has not run for this long: it wakes at
/// least every 15 minutes even with nothing to do.
const HEALTHY_WITHIN_SECS: i64 = 20 * 60;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rekey");
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "rotations",
            "Rotation outcomes by provider: retired (old secret removed), held (no evidence by the deadline), failed (nothing changed, will retry), response_lost (rotated again)",
            rotations.clone(),
        );
        let subscriptions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "subscriptions",
            "Managed subscriptions (configured and discovered) by rotation state",
            subscriptions.clone(),
        );
        // 10 ms … ~5 min: the exposure window should sit in the first buckets.
        let exposure = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        registry.register(
            "exposure_window_seconds",
            "Time from the provider returning a new secret to the secret store acknowledging it",
            exposure.clone(),
        );
        // 1 s … ~6 days.
        let confirmation = Histogram::new(exponential_buckets(1.0, 2.0, 20));
        registry.register(
            "confirmation_latency_seconds",
            "Time from publishing a new secret to evidence that a delivery signed with it succeeded",
            confirmation.clone(),
        );
        let next_rotation = Family::<SubscriptionLabels, Gauge>::default();
        registry.register(
            "next_rotation_timestamp_seconds",
            "When each subscription is next due (Unix time)",
            next_rotation.clone(),
        );
        let last_success = Family::<SubscriptionLabels, Gauge>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When each subscription last completed a rotation (Unix time)",
            last_success.clone(),
        );
        let clock_offset = Family::<OffsetLabels, FloatGauge>::default();
        registry.register(
            "clock_offset_seconds",
            "Bounds (bound=\"low\"|\"high\") on each peer's clock minus this host's, measured from the Date header of its answers; evidence comparisons allow for them",
            clock_offset.clone(),
        );
        let heartbeat_gauge = Gauge::default();
        heartbeat_gauge.set(Utc::now().timestamp());
        registry.register(
            "heartbeat_timestamp_seconds",
            "When the daemon's scheduler loop last turned (Unix time); it turns at least every 15 minutes",
            heartbeat_gauge.clone(),
        );
        let leader = Gauge::default();
        leader.set(1);
        registry.register(
            "leader",
            "1 while this instance acts (it leads its cluster, or has the state to itself), 0 while it stands by",
            leader.clone(),
        );
        let lease_epoch = Gauge::default();
        registry.register(
            "lease_epoch",
            "The epoch of the cluster lease this instance leads at (0 without a shared state or while standing by)",
            lease_epoch.clone(),
        );
        Metrics {
            registry,
            leader,
            lease_epoch,
            standby: std::sync::atomic::AtomicBool::new(false),
            clock_offset,
            heartbeat_gauge,
            rotations,
            subscriptions,
            exposure,
            confirmation,
            next_rotation,
            last_success,
            minted_at: Mutex::default(),
            published_at: Mutex::default(),
            heartbeat: AtomicI64::new(Utc::now().timestamp()),
        }
    }

    pub fn beat(&self, now: DateTime<Utc>) {
        self.heartbeat.store(now.timestamp(), Ordering::Relaxed);
        self.heartbeat_gauge.set(now.timestamp());
    }

    pub fn healthy(&self, now: DateTime<Utc>) -> bool {
        self.is_standby()
            || now.timestamp() - self.heartbeat.load(Ordering::Relaxed) < HEALTHY_WITHIN_SECS
    }

    /// Leading at `epoch` (`Some`), or standing by while another instance leads.
    pub fn set_leadership(&self, epoch: Option<i64>) {
        self.standby.store(epoch.is_none(), Ordering::Relaxed);
        self.leader.set(i64::from(epoch.is_some()));
        self.lease_epoch.set(epoch.unwrap_or(0));
        if epoch.is_some() {
            // A standby's scheduler loop did not turn: start its clock afresh.
            self.beat(Utc::now());
        }
    }

    pub fn is_standby(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    fn outcome(&self, row: &HistoryRow, outcome: &str) {
        // Subscriptions are named `<provider>/<id>`.
        let provider = row
            .subscription
            .split_once('/')
            .map_or(row.subscription.as_str(), |(p, _)| p);
        self.rotations
            .get_or_create(&RotationLabels {
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts new history rows (oldest first).
    pub fn observe(&self, rows: &[HistoryRow]) {
        // The maps are caches of start times: still usable after a poisoning panic.
        for row in rows {
            let id = row.rotation_id.clone().unwrap_or_default();
            match (row.event.as_str(), row.to.as_str()) {
                ("rotate-succeeded", _) => {
                    self.minted_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, row.at);
                }
                ("published", _) => {
                    if let Some(t) = self
                        .minted_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                    {
                        self.exposure.observe(seconds(row.at - t));
                    }
                    self.published_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, row.at);
                }
                ("checked", "retiring") if row.detail.starts_with("evidence") => {
                    if let Some(t) = self
                        .published_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                    {
                        self.confirmation.observe(seconds(row.at - t));
                    }
                }
                ("retired", "idle") => self.outcome(row, "retired"),
                ("rotate-outcome-unknown", _) => self.outcome(row, "response_lost"),
                (_, "held") if row.from != "held" => self.outcome(row, "held"),
                (_, "failed") => self.outcome(row, "failed"),
                _ => {}
            }
        }
    }

    /// Sets one managed subscription's gauges (a `None` removes that gauge).
    pub fn set_subscription(
        &self,
        name: &str,
        next_due: Option<DateTime<Utc>>,
        last_success: Option<DateTime<Utc>>,
    ) {
        let labels = SubscriptionLabels {
            subscription: name.to_string(),
        };
        for (family, t) in [
            (&self.next_rotation, next_due),
            (&self.last_success, last_success),
        ] {
            match t {
                Some(t) => {
                    family.get_or_create(&labels).set(t.timestamp());
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
    }

    /// Drops the gauges of a subscription no longer managed.
    pub fn forget_subscription(&self, name: &str) {
        self.set_subscription(name, None, None);
    }

    /// Sets how many managed subscriptions are in each state.
    pub fn set_state_counts(&self, counts: impl IntoIterator<Item = (Phase, usize)>) {
        for (phase, n) in counts {
            self.subscriptions
                .get_or_create(&StateLabels {
                    state: phase.as_str().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Sets each measured peer's clock offset bounds.
    pub fn set_clock_offsets(&self, offsets: &[(String, crate::skew::Offset)]) {
        for (peer, o) in offsets {
            for (bound, d) in [("low", o.low), ("high", o.high)] {
                self.clock_offset
                    .get_or_create(&OffsetLabels {
                        peer: peer.clone(),
                        bound,
                    })
                    .set(d.num_milliseconds() as f64 / 1000.0);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn seconds(d: chrono::Duration) -> f64 {
    d.num_microseconds()
        .map_or(f64::MAX, |us| us as f64 / 1e6)
        .max(0.0)
}

/// Serves `/metrics` and `/healthz` on an already bound listener until the process
/// ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let m = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    match m.encode() {
                        Ok(body) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let m = metrics.clone();
                async move {
                    if m.is_standby() {
                        (StatusCode::OK, "ok, standby: another instance leads\n")
                    } else if m.healthy(Utc::now()) {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the scheduler loop has not run recently\n",
                        )
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics server stopped");
    }
}

/// Binds the metrics listener (before READY, so a taken port is reported at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, at: &str, from: &str, to: &str, event: &str, detail: &str) -> HistoryRow {
        HistoryRow {
            seq,
            subscription: "acme/801".into(),
            at: DateTime::parse_from_rfc3339(at)
                .unwrap()
                .with_timezone(&Utc),
            rotation_id: Some("r1".into()),
            evidence: None,
            from: from.into(),
            to: to.into(),
            event: event.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn clock_offsets_are_exported_as_bounds_per_peer() {
        let m = Metrics::new();
        m.set_clock_offsets(&[(
            "acme-fintoro".into(),
            crate::skew::Offset {
                low: chrono::TimeDelta::milliseconds(4_950),
                high: chrono::TimeDelta::milliseconds(5_020),
            },
        )]);
        let text = m.encode().unwrap();
        assert!(
            text.contains(r#"rekey_clock_offset_seconds{peer="acme-fintoro",bound="low"} 4.95"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rekey_clock_offset_seconds{peer="acme-fintoro",bound="high"} 5.02"#),
            "{text}"
        );
    }

    #[test]
    fn a_rotation_s_history_becomes_outcomes_and_latencies() {
        let m = Metrics::new();
        m.observe(&[
            row(
                1,
                "2026-11-23T10:00:00Z",
                "idle",
                "rotating",
                "preflight-passed",
                "",
            ),
            row(
                2,
                "2026-11-23T10:00:01Z",
                "rotating",
                "minted",
                "rotate-succeeded",
                "",
            ),
            row(
                3,
                "2026-11-23T10:00:01.250Z",
                "minted",
                "published",
                "published",
                "",
            ),
            row(
                4,
                "2026-11-23T10:00:02Z",
                "published",
                "confirming",
                "checked",
                "no evidence yet",
            ),
            row(
                5,
                "2026-11-23T10:05:01.250Z",
                "confirming",
                "retiring",
                "checked",
                "evidence: lastSuccessAt",
            ),
            row(6, "2026-11-23T10:05:02Z", "retiring", "idle", "retired", ""),
            row(
                7,
                "2026-11-24T10:00:00Z",
                "idle",
                "failed",
                "preflight-failed",
                "vault sealed",
            ),
        ]);
        let text = m.encode().unwrap();
        assert!(
            text.contains(r#"rekey_rotations_total{provider="acme",outcome="retired"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rekey_rotations_total{provider="acme",outcome="failed"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("rekey_exposure_window_seconds_sum 0.25"),
            "{text}"
        );
        assert!(
            text.contains("rekey_exposure_window_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("rekey_confirmation_latency_seconds_sum 300.0"),
            "{text}"
        );
    }
}
