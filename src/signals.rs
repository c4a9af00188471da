//! The Unix signals a process holding the state directory handles: SIGHUP, SIGUSR1,
//! SIGTERM, SIGINT. The daemon and one-shot runs each decide what they mean.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The signals rekey handles. Installed before the state directory is locked, so the
/// holder of the lock, daemon or not, is never killed by a SIGUSR1 or SIGHUP, and
/// SIGTERM/SIGINT always drain to a saved step.
pub struct Signals {
    pub hup: Signal,
    pub usr1: Signal,
    pub term: Signal,
    pub int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}
