//! Small helpers every scenario file uses.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::Value;

/// A JSON field as a string (empty when missing or not a string).
pub fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// How far above a provider's true clock offset rekey's upper bound on it can lie,
/// for a peer on this host: an HTTP `Date` is truncated to the second, and the
/// answer may have been formed anywhere in the round trip of the request that
/// measured it (on loopback, far less than the 200 ms allowed here).
const OFFSET_BOUND_SLACK: TimeDelta = TimeDelta::milliseconds(1_200);

/// Waits until a delivery made from now on surely counts as evidence for a secret
/// published at `published_at` (rekey's clock), at a provider whose clock runs
/// `skew` ahead of this host's and stamps deliveries to `resolution`, with
/// `longest_delivery` configured for it.
///
/// rekey counts only deliveries the provider stamps later than the publication plus
/// its measured upper bound on the provider's clock offset (plus `longest_delivery`
/// for completion times): a delivery made before that mark is rightly no evidence.
/// The mark is a point on the provider's clock that neither side announces, so the
/// only event to await is the clock passing it; the wait is computed from the
/// publication rekey recorded, the offset bound and the stamp resolution, and is no
/// longer than that (about 1.2 s, up to the next whole second where stamps have
/// whole seconds).
pub async fn until_evidence_counts(
    published_at: DateTime<Utc>,
    skew: TimeDelta,
    resolution: TimeDelta,
    longest_delivery: Duration,
) {
    // rekey never moves the mark earlier than the publication (a provider that
    // seems to run behind is not trusted to), so a negative skew is waited out.
    let offset_high = (skew + OFFSET_BOUND_SLACK).max(TimeDelta::zero());
    let longest = TimeDelta::from_std(longest_delivery).expect("a short allowance");
    let mark = published_at + offset_high + longest;
    let first_counted = mark.duration_trunc(resolution).expect("truncate") + resolution;
    let wait = (first_counted - skew - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
}

/// A panicked scenario task's message, for a table test's report.
pub fn panic_text(e: tokio::task::JoinError) -> String {
    let text = match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(non-text panic)".into()),
        Err(e) => e.to_string(),
    };
    format!("panicked: {}", text.chars().take(2000).collect::<String>())
}

/// Worlds of one table running at once.
const PARALLEL: usize = 3;

/// Runs a table's scenarios, [`PARALLEL`] at a time; each returns its problems (a
/// panic, e.g. from the leak check, counts as one). Prints one summary line.
pub type Scenario = Pin<Box<dyn Future<Output = Vec<String>> + Send>>;

pub async fn run_table(table: &str, cases: Vec<(String, Scenario)>) {
    let t0 = Instant::now();
    let n = cases.len();
    let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (what, scenario)) in cases.into_iter().enumerate() {
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            (i, what, tokio::spawn(scenario).await)
        });
    }
    let mut failures = vec![];
    while let Some(joined) = tasks.join_next().await {
        let (i, what, result) = joined.expect("table task");
        let problems = result.unwrap_or_else(|e| vec![panic_text(e)]);
        if !problems.is_empty() {
            failures.push((i, format!("{what}: {}", problems.join("; "))));
        }
    }
    failures.sort();
    println!(
        "{table}: {}/{n} cases as expected ({:.1} s)",
        n - failures.len(),
        t0.elapsed().as_secs_f64()
    );
    let lines: Vec<String> = failures.into_iter().map(|(_, f)| f).collect();
    assert!(lines.is_empty(), "{table}:\n{}", lines.join("\n"));
}
