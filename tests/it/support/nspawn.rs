//! A real systemd (the host's, 252 on Debian 12) as PID 1 of a throwaway
//! systemd-nspawn container over this host's own root, booted and removed by
//! `scripts/real-systemd` (read its warning: a systemd manager started outside those
//! private namespaces takes over every process on the machine).
//!
//! ```ignore
//! let Some(c) = Container::boot_or_skip("what", &[Bind::ro(host_dir, "/etc/rekey")]) else {
//!     return;
//! };
//! c.ok(&["systemctl", "start", "rekey"]).await;
//! let mark = c.cursor().await;
//! c.until_logged(&mark, "rekey.service", &["config reloaded"]).await;
//! ```
//!
//! The guest has only loopback (`--private-network`): [`Container::in_network`] runs a
//! test's async part on a thread that joined the guest's network namespace, so the
//! simulators, the receiver and RustyVault (a child process, which inherits it) the test
//! starts there listen where the guest's services can reach them, while the test keeps
//! them in hand. Commands run in the guest through `nsenter` with a clean environment.
//! Dropping the container powers it off and removes it, on every exit path.

use std::future::Future;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long any single awaited event in the guest may take.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `scripts/real-systemd`'s exit code where the machine cannot boot a container.
const CANNOT: i32 = 77;

/// Set (CI sets it) to fail instead of skipping where no container can be booted.
const REQUIRE: &str = "REKEY_REQUIRE_REAL_SYSTEMD";

/// A read-only bind mount of a host path into the guest.
pub struct Bind {
    host: PathBuf,
    guest: String,
}

impl Bind {
    pub fn ro(host: impl Into<PathBuf>, guest: &str) -> Bind {
        Bind {
            host: host.into(),
            guest: guest.to_string(),
        }
    }
}

/// A booted guest; powered off and removed when dropped.
pub struct Container {
    name: String,
    /// The guest's PID 1, as a host pid (what `nsenter -t` takes).
    leader: u32,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/real-systemd")
}

impl Container {
    /// Boots a container for the test `what`, or says loudly why this machine cannot
    /// and returns `None` (unless `REKEY_REQUIRE_REAL_SYSTEMD` is set: then it fails).
    pub fn boot_or_skip(what: &str, binds: &[Bind]) -> Option<Container> {
        match Self::boot(binds) {
            Ok(c) => Some(c),
            Err(why) if std::env::var_os(REQUIRE).is_some() => {
                panic!("{what}: cannot run under a real systemd ({REQUIRE} is set): {why}")
            }
            Err(why) => {
                // Past libtest's capture: a skip must be seen in a passing run.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!! SKIPPED {what}: this machine cannot boot a systemd container: {why}\n\
                     !!! (run the tests as root on Linux with cgroup2; set {REQUIRE}=1 to fail instead)\n"
                );
                None
            }
        }
    }

    /// Boots one; `Err` (the reason) only where the machine cannot, a panic on any
    /// other failure.
    fn boot(binds: &[Bind]) -> Result<Container, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root (namespaces, cgroups and bind mounts need it)".into());
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rekey-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut cmd = StdCommand::new(script());
        cmd.args(["up", &name]);
        for b in binds {
            cmd.arg(format!("--bind-ro={}:{}", b.host.display(), b.guest));
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => {}
            Some(CANNOT) => return Err(stderr.trim().to_string()),
            _ => panic!(
                "scripts/real-systemd up {name} failed ({}):\n{stderr}",
                out.status
            ),
        }
        let leader = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("`real-systemd up` printed no pid:\n{stderr}"));
        Ok(Container { name, leader })
    }

    /// `args` as a command in the guest (all its namespaces), environment cleared.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.leader.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-C",
            "--",
        ])
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        c
    }

    /// Runs `args` in the guest to completion (bounded by [`PATIENCE`]).
    pub async fn run(&self, args: &[&str]) -> Output {
        tokio::time::timeout(PATIENCE, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("`{}` did not finish within {PATIENCE:?}", args.join(" ")))
            .expect("spawn nsenter")
    }

    /// Runs `args` in the guest, which must succeed; returns its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "`{}` in the guest failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `text` to `path` in the guest (its root is a writable overlay) with
    /// `mode`, creating the parent directories.
    pub async fn write(&self, path: &str, text: &str, mode: u32) {
        let script =
            r#"mkdir -p "$(dirname "$1")" && (umask 077 && cat > "$1") && chmod "$2" "$1""#;
        let mode = format!("{mode:o}");
        let mut child = self
            .command(&["sh", "-c", script, "sh", path, &mode])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn nsenter");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).await.expect("write");
        drop(stdin);
        let out = child.wait_with_output().await.expect("wait");
        assert!(
            out.status.success(),
            "cannot write {path} in the guest: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One property of `unit` (`systemctl show -P`).
    pub async fn show(&self, unit: &str, property: &str) -> String {
        let out = self.ok(&["systemctl", "show", "-P", property, unit]).await;
        out.trim_end_matches('\n').to_string()
    }

    /// Polls `property` of `unit` until `want` accepts it; returns it.
    pub async fn until_show(
        &self,
        unit: &str,
        property: &str,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.show(unit, property).await;
            if want(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{unit}'s {property} stayed {v:?}; its journal:\n{}",
                    self.journal(None, unit).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The journal's newest entry's cursor: a mark to read what comes after it.
    pub async fn cursor(&self) -> String {
        let out = self
            .ok(&["journalctl", "-q", "-n", "1", "--show-cursor", "-o", "cat"])
            .await;
        out.lines()
            .rev()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .unwrap_or_else(|| panic!("journalctl printed no cursor: {out}"))
            .to_string()
    }

    /// `unit`'s journal (systemd's lines about it included), after `since` if given.
    pub async fn journal(&self, since: Option<&str>, unit: &str) -> String {
        let after = since.map(|c| format!("--after-cursor={c}"));
        let mut args = vec![
            "journalctl",
            "-q",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ];
        args.extend(after.as_deref());
        self.ok(&args).await
    }

    /// Waits until `unit`'s journal after `since` has a line containing every one of
    /// `needles`; returns that line.
    pub async fn until_logged(&self, since: &str, unit: &str, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = self.journal(Some(since), unit).await;
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{unit} never logged {needles:?}; its journal since the mark:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the future `make` builds on a new thread that joined the guest's network
    /// namespace, with a runtime of its own (its threads and child processes join too).
    pub fn in_network<T, F>(&self, make: impl FnOnce() -> F + Send) -> T
    where
        T: Send,
        F: Future<Output = T>,
    {
        let netns = std::fs::File::open(format!("/proc/{}/ns/net", self.leader))
            .expect("the guest's network namespace");
        std::thread::scope(|s| {
            let joined = s
                .spawn(move || {
                    rustix::thread::move_into_link_name_space(
                        netns.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .expect("join the guest's network namespace");
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(make())
                })
                .join();
            joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let status = StdCommand::new(script())
            .args(["down", &self.name])
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "could not remove container {} ({status:?}): run `scripts/real-systemd down {}`",
                self.name, self.name
            );
        }
    }
}
