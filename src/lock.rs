//! One rekey per state directory: an exclusive `flock` on `state_dir/rekey.lock`, held
//! for the life of the process, so two daemons (or a daemon and a `--once` run) never
//! rotate the same subscription at once. The kernel drops the lock when the process
//! dies, however it dies, so a crash never leaves a stale lock behind.
//!
//! The file says what holds it (`<pid> <role>`), because `rekey rotate|resume|retire`
//! finding it held must know whether to wake a daemon (SIGUSR1) or leave the request
//! to a one-shot run that takes it before exiting: a signal to anything but a daemon
//! would at best be ignored.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "rekey.lock";

/// What the process holding the state directory does with operator requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `rekey run`: takes requests when woken with SIGUSR1.
    Daemon,
    /// A one-shot run (`rekey run --once`, or `rekey rotate|resume|retire` working
    /// here): takes the requests recorded before it exits; never signalled.
    Once,
    /// Leaving: takes no more requests; the next `rekey run` does.
    Exiting,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => "daemon",
            Role::Once => "once",
            Role::Exiting => "exiting",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [Role::Daemon, Role::Once, Role::Exiting]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// Who holds the lock, as its file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `None` when the file names no role (a rekey from before roles were written).
    pub role: Option<Role>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            Some(r) => write!(f, "{}, pid {}", r.as_str(), self.pid),
            None => write!(f, "pid {}", self.pid),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another rekey{} holds {}; only one may use a state directory at a time", described(.holder), .path.display())]
    Held {
        path: PathBuf,
        holder: Option<Holder>,
    },
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn described(holder: &Option<Holder>) -> String {
    holder.map(|h| format!(" ({h})")).unwrap_or_default()
}

/// Held while alive; the lock is released on drop or process exit.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock without waiting and records this process as `role`; fails with
    /// [`LockError::Held`] naming the holder.
    pub fn acquire(state_dir: &Path, role: Role) -> Result<StateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    holder: holder(state_dir),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let lock = StateLock { file, path };
        lock.set_role(role)?;
        Ok(lock)
    }

    /// Records what this process now does with requests. The new line is written
    /// over the old one and the rest cut off, so a reader never sees an empty file.
    pub fn set_role(&self, role: Role) -> Result<(), LockError> {
        let line = format!("{} {}\n", std::process::id(), role.as_str());
        self.file
            .write_all_at(line.as_bytes(), 0)
            .and_then(|()| self.file.set_len(line.len() as u64))
            .map_err(|source| LockError::Io {
                path: self.path.clone(),
                source,
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    /// Leaves no pid behind on a clean exit, so a later reader never takes a dead
    /// process (or whoever reuses its pid) for the holder.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// The holder of the lock of `state_dir` as its file says, if it names one.
pub fn holder(state_dir: &Path) -> Option<Holder> {
    let mut s = String::new();
    File::open(state_dir.join(LOCK_FILE))
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    parse(&s)
}

fn parse(text: &str) -> Option<Holder> {
    let mut words = text.lines().next()?.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let role = match words.next() {
        Some(r) => Some(Role::parse(r)?),
        None => None,
    };
    Some(Holder { pid, role })
}

/// Whether some process holds the lock of `state_dir` right now.
pub fn is_held(state_dir: &Path) -> bool {
    let path = state_dir.join(LOCK_FILE);
    let Ok(file) = File::open(&path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}

/// Tells `rekey rotate|resume|retire` that this process takes no more requests, so
/// they say the next start does instead of waking it.
pub fn leaving(lock: &StateLock) {
    if let Err(e) = lock.set_role(Role::Exiting) {
        tracing::warn!(error = %e, "cannot mark the lock file as exiting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_pid_and_role_and_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateLock::acquire(dir.path(), Role::Daemon).unwrap();
        assert!(is_held(dir.path()));
        let me = std::process::id();
        match StateLock::acquire(dir.path(), Role::Once) {
            Err(LockError::Held { holder, .. }) => assert_eq!(
                holder,
                Some(Holder {
                    pid: me,
                    role: Some(Role::Daemon)
                })
            ),
            other => panic!("expected Held, got {other:?}"),
        }
        a.set_role(Role::Exiting).unwrap();
        assert_eq!(holder(dir.path()).unwrap().role, Some(Role::Exiting));
        drop(a);
        assert!(!is_held(dir.path()));
        assert_eq!(holder(dir.path()), None, "no stale pid after a clean exit");
        StateLock::acquire(dir.path(), Role::Once).unwrap();
    }

    #[test]
    fn a_bare_pid_is_a_holder_of_unknown_role_and_garbage_is_none() {
        assert_eq!(
            parse("4242\n"),
            Some(Holder {
                pid: 4242,
                role: None
            })
        );
        assert_eq!(
            parse("4242 once\n"),
            Some(Holder {
                pid: 4242,
                role: Some(Role::Once)
            })
        );
        assert_eq!(parse("4242 emperor\n"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("x daemon"), None);
    }
}
