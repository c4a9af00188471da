//! Telling systemd how rekey is doing (sd-notify): READY, RELOADING, STOPPING,
//! WATCHDOG and STATUS. The daemon shell and the scheduler loop both send them; without
//! `NOTIFY_SOCKET` every notification is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// The notifications rekey sends.
#[derive(Debug, Clone, Copy)]
pub enum Notify<'a> {
    Ready,
    /// Sent with MONOTONIC_USEC, as systemd 253+ expects for `Type=notify-reload`.
    Reloading,
    Stopping,
    Watchdog,
    /// Sent only by the scheduler ([`crate::scheduler`]): it re-sends its summary only
    /// when the text changed, so a STATUS= from anywhere else would stick.
    Status(&'a str),
}

/// Tells systemd (when it listens) how rekey is doing. Failures are logged, not fatal:
/// a daemon started by hand has no socket to talk to.
pub fn notify(states: &[Notify<'_>]) {
    let mut out: Vec<NotifyState<'_>> = Vec::with_capacity(states.len() + 1);
    for s in states {
        match s {
            Notify::Ready => out.push(NotifyState::Ready),
            Notify::Reloading => {
                out.push(NotifyState::Reloading);
                if let Ok(m) = NotifyState::monotonic_usec_now() {
                    out.push(m);
                }
            }
            Notify::Stopping => out.push(NotifyState::Stopping),
            Notify::Watchdog => out.push(NotifyState::Watchdog),
            Notify::Status(s) => out.push(NotifyState::Status(s)),
        }
    }
    if let Err(e) = sd_notify::notify(&out) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The watchdog interval systemd expects pings within, when it set one
/// (`WatchdogSec=`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
