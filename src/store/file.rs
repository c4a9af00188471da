//! A secret store of plain files: `<dir>/<vault_path>.json`, mode 0600, written
//! atomically (a temp file under an unguessable name that only this write can have
//! created, fsync, rename, fsync of the directory). For the sandbox and for
//! single-host setups where receivers read a local file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{Entry, Expect, SecretStore, StoreError, Versioned};

/// A name that no other write or preflight (in this process or another) uses at the
/// same time, and that no one can guess ahead to plant a symlink or file at: the pid,
/// a per-process counter, and 64 random bits.
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{:016x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u64>()
    )
}

/// Creates a new owner-only file under a [`unique_name`] in `dir`.
fn create_unique(dir: &Path, prefix: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    let path = dir.join(unique_name(prefix));
    let file = create_private(&path)?;
    Ok((path, file))
}

/// Opens `path` only if this call creates it: `O_EXCL` means whatever already sits
/// there (a file, or a symlink to one, dangling or not) is never opened, and
/// `O_NOFOLLOW` refuses a symlink on its own too.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    fn err(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Other {
            store: self.describe(),
            detail: detail.into(),
        }
    }

    /// Maps a store path to a file, refusing anything that could escape `dir`.
    fn file_for(&self, path: &str) -> Result<PathBuf, StoreError> {
        let rel = Path::new(path);
        let ok = !path.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(self.err(format!("`{path}` is not a relative path inside the store")));
        }
        Ok(self.dir.join(format!("{path}.json")))
    }

    fn read_sync(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        let file = self.file_for(path)?;
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(format!("reading {}: {e}", file.display()))),
        };
        let malformed = |detail: String| StoreError::Malformed {
            store: self.describe(),
            path: path.to_string(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| malformed(format!("not JSON: {e}")))?;
        let entry = Entry::from_json(&value).map_err(malformed)?;
        Ok(Some(Versioned {
            entry,
            version: None,
        }))
    }

    fn write_sync(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        let file = self.file_for(path)?;
        if expect == Expect::Absent && file.exists() {
            return Err(StoreError::Conflict {
                store: self.describe(),
                path: path.to_string(),
            });
        }
        let parent = file.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent)
            .map_err(|e| self.err(format!("creating {}: {e}", parent.display())))?;
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
        let body = serde_json::to_vec_pretty(&entry.to_map())
            .map_err(|e| self.err(format!("encoding entry: {e}")))?;
        let (tmp, mut f) = create_unique(&parent, &format!(".{name}.tmp"))
            .map_err(|e| self.err(format!("creating a temp file in {}: {e}", parent.display())))?;
        let mut write = || -> std::io::Result<()> {
            // Exactly 0600 whatever the umask: the owner must be able to read it back.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            std::fs::File::open(&parent)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.err(format!("writing {}: {e}", file.display()))
        })
    }
}

#[async_trait]
impl SecretStore for FileStore {
    fn describe(&self) -> String {
        format!("file store {}", self.dir.display())
    }

    async fn preflight(&self, path: &str) -> Result<(), StoreError> {
        let file = self.file_for(path)?;
        let parent = file.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent)
            .map_err(|e| self.err(format!("creating {}: {e}", parent.display())))?;
        // Readable (and well-formed, if present) and the directory is writable.
        self.read_sync(path)?;
        // Each probe has its own name: preflights of entries in one directory overlap.
        create_unique(&parent, ".rekey-preflight")
            .and_then(|(probe, _)| std::fs::remove_file(probe))
            .map_err(|e| self.err(format!("{} is not writable: {e}", parent.display())))
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, StoreError> {
        self.read_sync(path)
    }

    async fn write(&self, path: &str, entry: &Entry, expect: Expect) -> Result<(), StoreError> {
        self.write_sync(path, entry, expect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{ExposeSecret, secret};

    fn entry(cur: &str, prev: Option<&str>) -> Entry {
        Entry {
            current: secret(cur),
            previous: prev.map(secret),
            rotated_at: chrono::Utc::now(),
            rotation_id: "r".into(),
            provider: "fintoro".into(),
            subscription: "1".into(),
        }
    }

    #[tokio::test]
    async fn writes_atomically_with_owner_only_mode_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.preflight("webhooks/fintoro/801").await.unwrap();
        assert!(store.read("webhooks/fintoro/801").await.unwrap().is_none());
        store
            .write(
                "webhooks/fintoro/801",
                &entry("a", Some("b")),
                Expect::Absent,
            )
            .await
            .unwrap();
        let f = dir.path().join("webhooks/fintoro/801.json");
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let got = store.read("webhooks/fintoro/801").await.unwrap().unwrap();
        assert_eq!(got.entry.current.expose_secret(), "a");
        assert_eq!(got.entry.previous.unwrap().expose_secret(), "b");
        // A second "must be absent" write is a conflict, not an overwrite.
        let err = store
            .write("webhooks/fintoro/801", &entry("c", None), Expect::Absent)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
    }

    #[tokio::test]
    async fn refuses_paths_that_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("inner"));
        for bad in ["../x", "/etc/passwd", "", "a/../../b"] {
            assert!(store.read(bad).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn malformed_file_is_reported_not_overwritten_silently() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        std::fs::write(dir.path().join("p.json"), "{not json").unwrap();
        let err = store.read("p").await.unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Every subscription's preflight runs at once in the daemon; entries in one
    /// directory share it, and no preflight may trip over another's probe.
    #[test]
    fn concurrent_preflights_of_one_directory_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let start = std::sync::Barrier::new(8);
        let errors: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (store, start) = (&store, &start);
                    s.spawn(move || {
                        start.wait();
                        (0..200)
                            .filter_map(|_| {
                                block_on(store.preflight(&format!("webhooks/fintoro/{i}")))
                                    .err()
                                    .map(|e| e.to_string())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        assert!(
            errors.is_empty(),
            "{} failed: {:?}",
            errors.len(),
            errors.first()
        );
        let left: Vec<_> = std::fs::read_dir(dir.path().join("webhooks/fintoro"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "probes left behind: {left:?}");
    }

    /// Whoever can predict the temp file's name can plant a symlink there; the write
    /// must neither follow it nor clobber a file already in its place.
    #[test]
    fn a_planted_symlink_or_file_at_a_predictable_temp_path_is_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store"));
        let entries = dir.path().join("store/webhooks");
        std::fs::create_dir_all(&entries).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let pid = std::process::id();
        for n in 0..64 {
            for name in [format!(".801.json.tmp-{pid}"), format!(".801.json.tmp-{n}")] {
                let _ = std::os::unix::fs::symlink(&victim, entries.join(name));
            }
        }
        let decoy = entries.join(".801.json.tmp");
        std::fs::write(&decoy, "someone else's").unwrap();
        block_on(store.write("webhooks/801", &entry("whsec_new", None), Expect::Absent)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(std::fs::read_to_string(&decoy).unwrap(), "someone else's");
        let written = entries.join("801.json");
        assert!(written.symlink_metadata().unwrap().file_type().is_file());
        assert!(
            std::fs::read_to_string(&written)
                .unwrap()
                .contains("whsec_new")
        );
    }

    #[test]
    fn a_temp_file_is_opened_only_when_new_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        for planted in [&link, &dangling, &victim] {
            assert!(create_private(planted).is_err(), "{}", planted.display());
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(!dir.path().join("nowhere").exists());
        let fresh = dir.path().join("fresh");
        create_private(&fresh).unwrap();
        assert_eq!(
            fresh.metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
