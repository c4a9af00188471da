//! Small helpers every scenario file uses.

use std::time::Duration;

use serde_json::Value;

/// A JSON field as a string (empty when missing or not a string).
pub fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// Waits for the next whole second. Provider timestamps such as Fintoro's
/// `lastSuccessAt` have whole-second precision, so only a delivery in a later second
/// than the publication can prove anything.
pub async fn next_second() {
    let into = chrono::Utc::now().timestamp_subsec_nanos() as u64;
    tokio::time::sleep(Duration::from_nanos(1_000_000_000 - into)).await;
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
