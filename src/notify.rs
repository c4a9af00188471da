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
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut msg = String::new();
    for s in &out {
        msg.push_str(&s.to_string());
        msg.push('\n');
    }
    match send(&socket, &msg) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            tracing::warn!(
                "systemd is not reading its notification socket; a notification was dropped"
            )
        }
        Err(e) => tracing::debug!(error = %e, "cannot notify systemd"),
    }
}

/// How often, and how far apart, a notification is tried again while the socket's
/// queue is full: at most a tenth of a second on the thread that sends it.
const FULL_RETRIES: u32 = 10;
const FULL_PAUSE: Duration = Duration::from_millis(10);

/// Sends `msg` to the notification socket without ever blocking on it: a socket
/// whose reader stalls (its queue full) gets a few tries, then the message is
/// dropped ([`std::io::ErrorKind::WouldBlock`]). A blocking send would hold the
/// caller, the scheduler loop or an async worker, for as long as systemd stalls.
pub fn send(socket: &std::ffi::OsStr, msg: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let to = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(name)?
        }
        None => std::os::unix::net::SocketAddr::from_pathname(socket)?,
    };
    let mut tries = 0;
    loop {
        match sock.send_to_addr(msg.as_bytes(), &to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < FULL_RETRIES => {
                tries += 1;
                std::thread::sleep(FULL_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The watchdog interval systemd expects pings within, when it set one
/// (`WatchdogSec=`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_nobody_reads_costs_a_bounded_wait_then_the_message_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let mut dropped = 0;
        // Far more than a datagram queue holds (about a dozen on Linux by default).
        for i in 0..500 {
            match send(path.as_os_str(), &format!("STATUS=message {i}\n")) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    dropped += 1;
                }
            }
            if dropped == 3 {
                break;
            }
        }
        assert_eq!(dropped, 3, "the queue never filled");
        // Three drops of ten 10 ms tries each, not a hang.
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=message 0\n");
    }
}
