//! A secret store of plain files: `<dir>/<vault_path>.json`, mode 0600, written
//! atomically (temp file, fsync, rename, fsync of the directory). For the sandbox
//! and for single-host setups where receivers read a local file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;

use super::{Entry, Expect, SecretStore, StoreError, Versioned};

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
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            file.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id()
        ));
        let body = serde_json::to_vec_pretty(&entry.to_map())
            .map_err(|e| self.err(format!("encoding entry: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
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
        let probe = parent.join(format!(".rekey-preflight-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
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
}
