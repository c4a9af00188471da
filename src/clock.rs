//! Where rekey reads the time. The engine and the scheduler take a [`Clock`] instead of
//! calling `Utc::now()`, so the whole daemon can run on another clock: the
//! deterministic simulation (`tests/it/sim`) runs a year of operation on tokio's
//! paused clock, with each party's wall clock skewed on purpose.
//!
//! Two kinds of time, as in any daemon: *wall* time, which is what schedules, deadlines
//! and the persisted state speak (and which can jump: NTP steps, suspend), and
//! *monotonic* time, which is what timeouts and cooldowns measure. Monotonic time is
//! always tokio's [`tokio::time::Instant`], which tokio's paused clock already
//! virtualises; only wall time needs an injected source.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A source of wall time (and, through tokio, monotonic time).
pub trait Clock: Send + Sync + 'static {
    /// Wall time now.
    fn now(&self) -> DateTime<Utc>;

    /// Monotonic time now: tokio's, so that a paused runtime controls it.
    fn monotonic(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

/// The operating system's clock: what production uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock as a shared handle.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// Wall time that advances with tokio's (possibly paused) monotonic clock from a chosen
/// start, plus an offset that can be changed at any moment (clock skew, an NTP step).
/// Used by the simulation and by tests that need a daemon to live through months.
#[derive(Debug)]
pub struct VirtualClock {
    start_wall: DateTime<Utc>,
    start_mono: tokio::time::Instant,
    /// Milliseconds added to the virtual wall time (skew; steps).
    offset_ms: std::sync::atomic::AtomicI64,
}

impl VirtualClock {
    /// A clock that reads `start` now and advances with tokio time. Must be created
    /// inside a tokio runtime.
    pub fn starting_at(start: DateTime<Utc>) -> VirtualClock {
        VirtualClock {
            start_wall: start,
            start_mono: tokio::time::Instant::now(),
            offset_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Sets the clock's offset from the virtual time (positive: this clock runs ahead).
    pub fn set_offset(&self, offset: chrono::Duration) {
        self.offset_ms.store(
            offset.num_milliseconds(),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    pub fn offset(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(self.offset_ms.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The virtual time without this clock's offset: the simulation's "true" time.
    pub fn true_now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.start_mono;
        self.start_wall + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> DateTime<Utc> {
        self.true_now() + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn virtual_clock_follows_tokio_time_and_its_offset() {
        let start = DateTime::parse_from_rfc3339("2026-03-29T00:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = VirtualClock::starting_at(start);
        assert_eq!(c.now(), start);
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert_eq!(c.now(), start + chrono::Duration::hours(1));
        c.set_offset(chrono::Duration::seconds(-5));
        assert_eq!(c.now(), start + chrono::Duration::seconds(3595));
        assert_eq!(c.true_now(), start + chrono::Duration::hours(1));
    }
}
