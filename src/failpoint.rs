//! Named crash points for the crash-matrix tests.
//!
//! Compiled in only with the `failpoints` feature, which only the test build turns on.
//! When `REKEY_FAILPOINT` names the point being passed, the process announces it on
//! stderr and freezes there, so the test can SIGKILL it at exactly that boundary — a real
//! kill of a real process, not a simulated error return (or, frozen in the scheduler
//! loop, let systemd's watchdog kill it).

/// The line a frozen process prints; tests wait for it.
pub const REACHED: &str = "rekey failpoint reached:";

/// Every crash point of one rotation, in the order a rotation passes them: after each
/// persisted transition (`after:<event>`), and around each external write whose result
/// is not yet persisted. The crash-matrix test kills rekey at each one.
pub const ROTATION_POINTS: &[&str] = &[
    "after:start",
    "after:preflight-passed",
    "after:rotate-sent",
    "before:rotate-call",
    "after:rotate-call",
    "after:rotate-succeeded",
    "after:publish-write",
    "after:published",
    "after:checked",
    "after:retire-write",
    "after:retired",
];

/// In the scheduler loop, on a wake (SIGUSR1): a frozen loop sends no more
/// `WATCHDOG=1`, so the real-systemd test can watch systemd's watchdog act.
pub const SCHEDULER_WOKEN: &str = "scheduler:woken";

/// Inside a fenced write's transaction on PostgreSQL, after the lease row is locked:
/// a process frozen here holds the lock, as one paused or cut off mid-write does.
pub const IN_FENCED_WRITE: &str = "state:in-fenced-write";

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var("REKEY_FAILPOINT").is_ok_and(|v| v == name) {
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{REACHED} {name}");
        let _ = err.flush();
        drop(err);
        loop {
            std::thread::park();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
