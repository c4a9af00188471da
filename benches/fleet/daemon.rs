//! The real `rekey run` as a child process: when it says READY (sd-notify), and what
//! the kernel says it costs (CPU time, resident memory, context switches).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary Cargo built alongside this benchmark, unless `--rekey` names another
/// (to compare a build from before a change in the same run conditions).
pub fn rekey() -> &'static Path {
    BIN.get_or_init(|| PathBuf::from(env!("CARGO_BIN_EXE_rekey")))
}

/// Set once, before the first daemon starts, by `--rekey`.
pub static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub struct Daemon {
    child: Child,
    pub started: Instant,
    ready: mpsc::Receiver<Instant>,
    socket: PathBuf,
}

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ; 100 on Linux).
const TICKS: f64 = 100.0;

impl Daemon {
    /// Starts `rekey run --config <config>`, its log in `<dir>/rekey-<n>.log`.
    pub fn start(config: &Path, dir: &Path, n: usize) -> Daemon {
        let socket = dir.join(format!("notify-{n}.sock"));
        let _ = std::fs::remove_file(&socket);
        let sock = UnixDatagram::bind(&socket).expect("bind the notify socket");
        let (tx, ready) = mpsc::channel();
        // Drains every datagram (a full socket would block the daemon's notify) and
        // reports each READY=1.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while let Ok(len) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..len]);
                if msg.lines().any(|l| l == "READY=1") && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
        let log = std::fs::File::create(dir.join(format!("rekey-{n}.log"))).expect("log file");
        let started = Instant::now();
        let child = Command::new(rekey())
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &socket)
            .env_remove("REKEY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rekey run");
        Daemon {
            child,
            started,
            ready,
            socket,
        }
    }

    /// Time from spawn to READY=1.
    pub fn wait_ready(&self, patience: Duration) -> Duration {
        let at = self
            .ready
            .recv_timeout(patience)
            .expect("rekey did not become READY in time; see its log");
        at - self.started
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the whole process so far (all threads).
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 =
            f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
        Duration::from_secs_f64(ticks / TICKS)
    }

    /// Resident set size, in MB.
    pub fn rss_mb(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb / 1024.0
    }

    /// Voluntary context switches of every thread: each is a thread going to sleep,
    /// so the count over an idle span is the number of wake-ups it had.
    pub fn wakeups(&self) -> u64 {
        let mut n = 0;
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("tasks");
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
                n += s
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        n
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let status = self.child.wait().expect("wait for rekey");
        let _ = std::fs::remove_file(&self.socket);
        assert!(status.success(), "rekey exited with {status}; see its log");
    }
}

/// Wall time of `rekey status --json` (output discarded), the median of `runs`.
pub fn status_json(config: &Path, runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            let out = Command::new(rekey())
                .args(["status", "--json", "--config"])
                .arg(config)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .output()
                .expect("rekey status");
            let took = t0.elapsed();
            assert!(!out.stdout.is_empty(), "rekey status printed nothing");
            took
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
