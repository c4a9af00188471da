//! A real, unsealed RustyVault (`rusty_vault` 0.2.1, binary `rvault`) server for
//! integration tests.
//!
//! ```ignore
//! let vault = RustyVault::start().await;
//! vault.kv1_write("rekey/github", json!({"current": "s1"})).await;
//! assert_eq!(vault.kv1_read("rekey/github").await.unwrap()["current"], "s1");
//! ```
//!
//! Every server gets its own temporary directory (file storage, config, logs) and
//! its own loopback port, so tests can run in parallel. It is initialised with
//! 3 key shares and a threshold of 2, unsealed, and killed when dropped.
//!
//! What RustyVault 0.2.1 does differently from HashiCorp Vault (and so what the
//! helpers here do and do not offer):
//! * there is no policy endpoint (`/v1/sys/policy/*` and `/v1/sys/policies/acl/*`
//!   answer 404) and no ACL enforcement at all: any valid token may read and write
//!   anything, so there is no `write_policy` helper;
//! * error bodies are `{"error": "..."}` (not `{"errors": [...]}`);
//! * a read of a missing key answers 404 with an empty body;
//! * while sealed every logical request answers 503 `{"error":"RustyVault is sealed."}`.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// The `rusty_vault` version installed when no `rvault` binary is found.
const RVAULT_VERSION: &str = "0.2.1";
/// How long a freshly spawned server may take to listen and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Key shares and threshold used for `PUT /v1/sys/init`.
const KEY_SHARES: usize = 3;
const KEY_THRESHOLD: usize = 2;
/// RustyVault logs this (at info level) right after it has bound its listener.
const LISTENING_LINE: &str = "rusty_vault server starts, waiting for request";

/// Path to the `rvault` binary, installing it if needed.
///
/// Looks, in this order, at `$REKEY_TEST_RVAULT`, `rvault` on `PATH`, and
/// `<target dir>/rvault/bin/rvault` (target dir: `$CARGO_TARGET_DIR`, else
/// `<workspace>/target`). If none exists it runs
/// `cargo install rusty_vault --version 0.2.1 --locked --root <target dir>/rvault`
/// once, under an exclusive file lock shared by all test threads and processes.
pub async fn rvault_binary() -> PathBuf {
    // The outcome, failure included, is kept for the whole test process: a failed
    // install is not retried by every test.
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = match BINARY.get() {
        Some(found) => found.clone(),
        None => tokio::task::spawn_blocking(|| BINARY.get_or_init(locate_or_install).clone())
            .await
            .unwrap_or_else(|e| Err(format!("looking for the rvault binary failed: {e}"))),
    };
    found.unwrap_or_else(|message| panic!("{message}"))
}

fn locate_or_install() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("REKEY_TEST_RVAULT") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "REKEY_TEST_RVAULT={} is not an executable file",
                path.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("rvault"))
            .find(|candidate| is_executable(candidate))
    });
    if let Some(found) = on_path {
        return Ok(found);
    }
    let root = target_dir().join("rvault");
    let binary = root.join("bin").join("rvault");
    if !is_executable(&binary) {
        install(&root, &binary)?;
    }
    Ok(binary)
}

fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    }
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

fn install(root: &Path, binary: &Path) -> Result<(), String> {
    fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let lock_path = root.join("install.lock");
    let lock = File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    // Held until `lock` is dropped at the end of this function.
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    // Another thread or process may have installed it while we waited.
    if is_executable(binary) {
        return Ok(());
    }

    let log_path = root.join("install.log");
    let build_dir = root.join("build");
    // Bypass libtest's output capture: this has to be seen while tests seem stuck.
    let _ = writeln!(
        std::io::stderr(),
        "\n[rvault] no `rvault` binary found (set REKEY_TEST_RVAULT or put it on PATH to skip this).\n\
         [rvault] installing rusty_vault {RVAULT_VERSION} into {} -- this takes about 5-10 minutes;\n\
         [rvault] follow it with: tail -f {}\n",
        root.display(),
        log_path.display(),
    );
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot clone the install log handle: {e}"))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-rvault");
    let started = Instant::now();
    let status = StdCommand::new("bash")
        .arg(&script)
        .arg(root)
        // A target dir of its own: the outer `cargo test` holds the lock on ours.
        .env("RVAULT_BUILD_DIR", &build_dir)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() || !is_executable(binary) {
        let output = fs::read_to_string(&log_path).unwrap_or_default();
        return Err(format!(
            "`scripts/install-rvault {}` (rusty_vault {RVAULT_VERSION}) failed ({status}); \
             output (full log: {}):\n{}",
            root.display(),
            log_path.display(),
            tail(&output, 80)
        ));
    }
    let _ = writeln!(
        std::io::stderr(),
        "[rvault] installed {} in {:.0?}",
        binary.display(),
        started.elapsed()
    );
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Why a spawned server did not come up.
enum SpawnError {
    /// The port was taken between choosing it and binding it.
    AddrInUse,
}

/// A running (or stopped, see [`RustyVault::stop`]) RustyVault server.
pub struct RustyVault {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Number of servers spawned so far: each gets its own log file.
    launches: u32,
    root_token: String,
    unseal_keys: Vec<String>,
    http: reqwest::Client,
}

impl RustyVault {
    /// Starts a new server on a free loopback port, initialises and unseals it.
    pub async fn start() -> RustyVault {
        let binary = rvault_binary().await;
        let dir = tempfile::Builder::new()
            .prefix("rekey-rvault-")
            .tempdir()
            .expect("cannot create a temporary directory for RustyVault");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("cannot build the reqwest client");
        let mut vault = RustyVault {
            binary,
            dir,
            port: 0,
            child: None,
            launches: 0,
            root_token: String::new(),
            unseal_keys: Vec::new(),
            http,
        };

        let mut attempts = 0;
        loop {
            attempts += 1;
            vault.port = free_port();
            match vault.spawn().await {
                Ok(()) => break,
                Err(SpawnError::AddrInUse) if attempts < 10 => continue,
                Err(SpawnError::AddrInUse) => {
                    panic!("RustyVault could not bind a free port after {attempts} attempts")
                }
            }
        }
        vault.init().await;
        vault.unseal().await;
        vault
    }

    /// `http://127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    pub fn unseal_keys(&self) -> &[String] {
        &self.unseal_keys
    }

    /// The temporary directory holding config, storage (`data/`) and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's output (all launches so far), for debugging.
    pub fn logs(&self) -> String {
        (1..=self.launches)
            .map(|n| fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Seals the server: afterwards every logical request answers 503.
    pub async fn seal(&self) {
        let (status, body) = self.call(Method::PUT, "sys/seal", None, None).await;
        assert!(
            status.is_success(),
            "PUT /v1/sys/seal answered {status}: {body}"
        );
        assert_eq!(
            self.seal_status().await["sealed"],
            true,
            "RustyVault is still unsealed after PUT /v1/sys/seal"
        );
    }

    /// Unseals the server with the stored unseal keys (a no-op if unsealed).
    pub async fn unseal(&self) {
        if self.seal_status().await["sealed"] == false {
            return;
        }
        for key in &self.unseal_keys {
            let (status, body) = self
                .call(Method::PUT, "sys/unseal", None, Some(json!({ "key": key })))
                .await;
            assert!(
                status == StatusCode::OK,
                "PUT /v1/sys/unseal answered {status}: {body}"
            );
            if body["sealed"] == false {
                return;
            }
        }
        panic!(
            "RustyVault is still sealed after all {} unseal keys: {}",
            self.unseal_keys.len(),
            self.seal_status().await
        );
    }

    /// `GET /v1/sys/seal-status`: `{"sealed":bool,"t":u8,"n":u8,"progress":usize}`.
    pub async fn seal_status(&self) -> Value {
        let (status, body) = self.call(Method::GET, "sys/seal-status", None, None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET /v1/sys/seal-status answered {status}: {body}"
        );
        body
    }

    /// Kills the server process; its storage is kept for [`RustyVault::restart`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port with the same storage, and unseals it.
    pub async fn restart(&mut self) {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn().await {
                Ok(()) => break,
                Err(SpawnError::AddrInUse) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(SpawnError::AddrInUse) => panic!(
                    "RustyVault could not bind port {} again on restart: it is in use",
                    self.port
                ),
            }
        }
        self.unseal().await;
    }

    /// Reads `secret/<path>` (KV v1) with the root token: its `data`, or `None` on 404.
    pub async fn kv1_read(&self, path: &str) -> Option<Value> {
        let path = format!("secret/{}", path.trim_start_matches('/'));
        let (status, body) = self
            .call(Method::GET, &path, Some(&self.root_token), None)
            .await;
        match status {
            StatusCode::NOT_FOUND => None,
            StatusCode::OK => Some(body["data"].clone()),
            _ => panic!("GET /v1/{path} answered {status}: {body}"),
        }
    }

    /// Writes `data` (a JSON object) to `secret/<path>` (KV v1) with the root token.
    pub async fn kv1_write(&self, path: &str, data: Value) {
        assert!(
            data.is_object(),
            "KV v1 data must be a JSON object, got {data}"
        );
        let path = format!("secret/{}", path.trim_start_matches('/'));
        let (status, body) = self
            .call(Method::PUT, &path, Some(&self.root_token), Some(data))
            .await;
        assert!(
            status.is_success(),
            "PUT /v1/{path} answered {status}: {body}"
        );
    }

    /// Deletes `secret/<path>` (KV v1) with the root token (deleting a missing key succeeds).
    pub async fn kv1_delete(&self, path: &str) {
        let path = format!("secret/{}", path.trim_start_matches('/'));
        let (status, body) = self
            .call(Method::DELETE, &path, Some(&self.root_token), None)
            .await;
        assert!(
            status.is_success(),
            "DELETE /v1/{path} answered {status}: {body}"
        );
    }

    /// Creates a child token of the root token (`POST /v1/auth/token/create`).
    ///
    /// `ttl` is a duration string such as `"1h"` or `"30s"`; the token stops working
    /// (403) once it has passed. RustyVault enforces no policies: the names are
    /// echoed in the create response but the token can do anything. An empty list
    /// becomes `["default"]`, since RustyVault refuses to create root tokens.
    pub async fn create_token(&self, policies: &[&str], ttl: &str) -> String {
        let policies: Vec<&str> = if policies.is_empty() {
            vec!["default"]
        } else {
            policies.to_vec()
        };
        let request = json!({ "policies": policies, "ttl": ttl });
        let (status, body) = self
            .call(
                Method::POST,
                "auth/token/create",
                Some(&self.root_token),
                Some(request),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "POST /v1/auth/token/create answered {status}: {body}"
        );
        body["auth"]["client_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no auth.client_token in the token create answer: {body}"))
            .to_string()
    }

    /// Revokes `token` and its children (`POST /v1/auth/token/revoke/<token>`).
    pub async fn revoke_token(&self, token: &str) {
        let path = format!("auth/token/revoke/{token}");
        let (status, body) = self
            .call(Method::POST, &path, Some(&self.root_token), None)
            .await;
        assert!(
            status.is_success(),
            "POST /v1/auth/token/revoke/<token> answered {status}: {body}"
        );
    }

    /// `GET /v1/auth/token/lookup-self` with `token`: its `data`, or `None` if the
    /// token is unknown, revoked or expired (403).
    pub async fn lookup_self(&self, token: &str) -> Option<Value> {
        let (status, body) = self
            .call(Method::GET, "auth/token/lookup-self", Some(token), None)
            .await;
        match status {
            StatusCode::OK => Some(body["data"].clone()),
            StatusCode::FORBIDDEN => None,
            _ => panic!("GET /v1/auth/token/lookup-self answered {status}: {body}"),
        }
    }

    /// Enables AppRole at `auth/approle` (if not yet), creates or updates `role`
    /// and returns a fresh `(role_id, secret_id)` for `POST /v1/auth/approle/login`.
    pub async fn approle(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: &str,
    ) -> (String, String) {
        let root = Some(self.root_token.as_str());
        let (status, body) = self
            .call(
                Method::POST,
                "sys/auth/approle",
                root,
                Some(json!({ "type": "approle" })),
            )
            .await;
        assert!(
            status.is_success() || status == StatusCode::CONFLICT,
            "POST /v1/sys/auth/approle answered {status}: {body}"
        );
        let role_path = format!("auth/approle/role/{role}");
        let request = json!({ "token_policies": policies, "token_ttl": token_ttl });
        let (status, body) = self
            .call(Method::POST, &role_path, root, Some(request))
            .await;
        assert!(
            status.is_success(),
            "POST /v1/{role_path} answered {status}: {body}"
        );

        let path = format!("{role_path}/role-id");
        let (status, body) = self.call(Method::GET, &path, root, None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET /v1/{path} answered {status}: {body}"
        );
        let role_id = body["data"]["role_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no data.role_id in {body}"))
            .to_string();

        let path = format!("{role_path}/secret-id");
        let (status, body) = self.call(Method::POST, &path, root, None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "POST /v1/{path} answered {status}: {body}"
        );
        let secret_id = body["data"]["secret_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no data.secret_id in {body}"))
            .to_string();
        (role_id, secret_id)
    }

    /// Sends `method /v1/<path>` with an optional token and JSON body; returns the
    /// status and the body as JSON (`Value::Null` if empty, a string if not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}/v1/{}", self.addr(), path.trim_start_matches('/'));
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| {
            panic!(
                "{method} {url} failed: {e}\n--- RustyVault log tail ---\n{}",
                tail(&self.logs(), 30)
            )
        });
        let status = response.status();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: cannot read the answer: {e}"));
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    fn log_path(&self, launch: u32) -> PathBuf {
        self.dir.path().join(format!("rvault-{launch}.log"))
    }

    fn write_config(&self) -> PathBuf {
        // JSON string literals are valid HCL string literals.
        let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
        let config = format!(
            "storage \"file\" {{\n  path = {data}\n}}\n\n\
             listener \"tcp\" {{\n  address     = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n\n\
             api_addr  = \"{addr}\"\n\
             log_level = \"info\"\n\
             work_dir  = {work}\n",
            data = quote(&self.dir.path().join("data")),
            work = quote(&self.dir.path().join("work")),
            port = self.port,
            addr = self.addr(),
        );
        let path = self.dir.path().join("config.hcl");
        fs::write(&path, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Spawns `rvault server` on `self.port` and waits until it answers HTTP.
    async fn spawn(&mut self) -> Result<(), SpawnError> {
        let config = self.write_config();
        self.launches += 1;
        let log_path = self.log_path(self.launches);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cannot clone the log file handle");
        let mut child = Command::new(&self.binary)
            .arg("server")
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.binary.display()));

        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("cannot poll the rvault process") {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                if log.contains("Address already in use") || log.contains("AddrInUse") {
                    return Err(SpawnError::AddrInUse);
                }
                panic!(
                    "rvault server exited during startup ({status}); log {}:\n{}",
                    log_path.display(),
                    tail(&log, 40)
                );
            }
            // Only trust the port once *our* process says it bound it.
            let bound = fs::read_to_string(&log_path)
                .map(|log| log.contains(LISTENING_LINE))
                .unwrap_or(false);
            if bound && self.answers().await {
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill().await;
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!(
                    "rvault server did not answer on {} within {START_TIMEOUT:?}; log {}:\n{}",
                    self.addr(),
                    log_path.display(),
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn answers(&self) -> bool {
        let url = format!("{}/v1/sys/init", self.addr());
        matches!(
            self.http.get(&url).timeout(Duration::from_secs(2)).send().await,
            Ok(response) if response.status() == StatusCode::OK
        )
    }

    async fn init(&mut self) {
        let request = json!({ "secret_shares": KEY_SHARES, "secret_threshold": KEY_THRESHOLD });
        let (status, body) = self
            .call(Method::PUT, "sys/init", None, Some(request))
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "PUT /v1/sys/init answered {status}: {body}"
        );
        self.root_token = body["root_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no root_token in the init answer: {body}"))
            .to_string();
        self.unseal_keys = body["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("no keys in the init answer: {body}"))
            .iter()
            .map(|key| key.as_str().expect("unseal keys are strings").to_string())
            .collect();
        assert_eq!(
            self.unseal_keys.len(),
            KEY_SHARES,
            "unexpected number of unseal keys: {body}"
        );
    }
}

impl Drop for RustyVault {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// A loopback port that was free a moment ago (bind port 0, then release it).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}
