//! A `rekey run` daemon process under test: its log lines and its sd-notify datagrams
//! as streams the test waits on (never fixed sleeps), and real signals.
//!
//! A failpoint freezes a runtime worker thread, which can stall tokio's I/O driver and
//! with it signal delivery: with a daemon, use failpoints only to SIGKILL it, and a
//! simulator delay to catch it mid-step for SIGTERM.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::Child;
use tokio::sync::mpsc;

use super::rekey::Rekey;

pub struct Daemon {
    child: Child,
    pub pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<String>>,
    notify: UnixDatagram,
    _socket: PathBuf,
}

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

impl Daemon {
    /// Starts `rekey run` with `extra` arguments and `NOTIFY_SOCKET` pointing at a
    /// socket this test reads (`--once` in `extra` gives a one-shot pass to watch).
    pub async fn start(rekey: &Rekey, extra: &[&str]) -> Daemon {
        Self::start_with_env(rekey, extra, &[]).await
    }

    /// As [`Daemon::start`], with extra environment variables.
    pub async fn start_with_env(rekey: &Rekey, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = rekey
            .path()
            .join(format!("notify-{}.sock", uuid::Uuid::new_v4()));
        let notify = UnixDatagram::bind(&socket).expect("bind the notify socket");
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let mut cmd = rekey.command(&args);
        cmd.env("NOTIFY_SOCKET", &socket);
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn rekey run");
        let pid = child.id().expect("pid");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let mut l = sink.lock().expect("log");
                l.push_str(&line);
                l.push('\n');
                drop(l);
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            pid,
            lines,
            log,
            notify,
            _socket: socket,
        }
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub async fn log_line(&mut self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.recv().await {
                if needles.iter().all(|n| line.contains(n)) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        found.unwrap_or_else(|| {
            panic!(
                "no log line with {needles:?}; the daemon printed:\n{}",
                self.log()
            )
        })
    }

    /// Waits for an sd-notify datagram containing `needle`; returns it.
    pub async fn notified(&mut self, needle: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let mut seen = vec![];
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let n = self.notify.recv(&mut buf).await.ok()?;
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                    return Some(msg);
                }
                seen.push(msg);
            }
        })
        .await
        .ok()
        .flatten();
        found.unwrap_or_else(|| {
            panic!(
                "no notification {needle:?} (got {seen:?}); the daemon printed:\n{}",
                self.log()
            )
        })
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid as i32).expect("pid");
        kill_process(pid, sig).expect("send signal");
    }

    /// Waits for the process to exit within `within`.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "the daemon did not exit within {within:?}; it printed:\n{}",
                self.log()
            ),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Adds everything the daemon printed to `rekey`'s transcript for the leak check.
    pub fn record(&self, rekey: &Rekey) {
        rekey
            .transcript
            .lock()
            .expect("transcript")
            .push_str(&self.log());
    }
}

/// Polls `rekey status --json` (each poll is a short process run) until `sub` is in
/// `state`; a bounded wait on a state change, not a sleep.
pub async fn until_state(rekey: &Rekey, sub: &str, state: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = rekey.state_of(sub).await;
        if st["state"] == state {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sub} never reached {state}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
