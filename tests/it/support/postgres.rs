//! A real PostgreSQL server for the tests of the PostgreSQL state backend.
//!
//! One throwaway server per test binary run: `initdb` into a temporary directory (as
//! the `postgres` system user, or `nobody`, when the tests run as root: the server
//! refuses root), listening on a free loopback port with its unix socket in that
//! directory, fsync on, password authentication over TCP. Each test gets a database
//! of its own ([`database`]). The server is installed on first use
//! (`scripts/install-postgres`) and stops when the test process ends, however it
//! ends: it runs under a shell that waits on a pipe from this process.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rekey::state::PgSettings;

/// The superuser the tests connect as, and its password.
pub const USER: &str = "rekey";
const PASSWORD: &str = "pg-test-password-4e1c";

struct Server {
    /// Owned by the server's user; removed by hand at the end (see [`Server::start`]).
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// The write end of the pipe the server's shell waits on: dropped with the process.
    _lifeline: std::process::ChildStdin,
}

/// A database of one's own on the shared server.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    /// Where clients connect (the server, or a proxy in front of it).
    pub port: u16,
    /// The server's own port and programs, for the tests' own SQL.
    server_port: u16,
    bindir: PathBuf,
    /// The CA that signed the server's certificate (for `localhost` and 127.0.0.1).
    pub ca_file: PathBuf,
    /// A file holding the password (mode 0600), for `[state] password_file`.
    pub password_file: PathBuf,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(Server::start) {
        Ok(s) => s,
        Err(e) => panic!("cannot start the test PostgreSQL server: {e}"),
    }
}

/// A fresh, empty database for one test.
pub async fn database() -> TestDb {
    tokio::task::spawn_blocking(|| {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let s = server();
        let name = format!(
            "t{}_{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        s.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("{e}"));
        s.database(name)
    })
    .await
    .unwrap()
}

/// A server of one's own, for a test that restarts it.
pub struct Dedicated(Server);

impl Dedicated {
    pub async fn start() -> Dedicated {
        let s = tokio::task::spawn_blocking(Server::start).await.unwrap();
        Dedicated(s.unwrap_or_else(|e| panic!("cannot start a PostgreSQL server: {e}")))
    }

    pub fn database(&self) -> TestDb {
        self.0
            .psql("postgres", "CREATE DATABASE restarted")
            .unwrap_or_else(|e| panic!("{e}"));
        self.0.database("restarted".into())
    }

    /// Restarts the server (a fast shutdown: every session is cut), waiting until it
    /// answers again.
    pub async fn restart(&self) {
        let s = &self.0;
        let out = as_server_user(&server_user(), &s.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(s.dir.join("data"))
            .arg("-l")
            .arg(s.dir.join("server.log"))
            .args(["-m", "fast", "-w", "restart"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl TestDb {
    /// The URL for `[state] url` (no TLS: loopback).
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}@127.0.0.1:{}/{}?sslmode=disable",
            self.port, self.name
        )
    }

    /// The `[state]` section of a config using this database.
    pub fn state_section(&self) -> String {
        format!(
            "[state]\nurl = \"{}\"\npassword_file = \"{}\"\n",
            self.url(),
            self.password_file.display()
        )
    }

    pub fn settings(&self) -> PgSettings {
        self.settings_for("default", Duration::from_secs(15))
    }

    pub fn settings_for(&self, cluster: &str, lease: Duration) -> PgSettings {
        let connect = format!("postgres://{USER}@127.0.0.1:{}/{}", self.port, self.name);
        PgSettings {
            url: connect.clone(),
            connect: connect.parse().unwrap(),
            tls: false,
            root_cert: None,
            password: Some(PASSWORD.to_string().into()),
            cluster: cluster.to_string(),
            lease,
            renew_every: lease / 3,
        }
    }

    /// Runs SQL in this database as the superuser; the output, unaligned.
    pub fn psql(&self, sql: &str) -> String {
        psql(&self.bindir, self.server_port, &self.name, sql).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The directory of `initdb` and `postgres`, installing them if needed.
fn bindir() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-postgres");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// A CA and a server certificate it signed (for `localhost` and 127.0.0.1), with
/// the openssl command line: the server offers TLS, which a test verifies.
fn make_certificates(dir: &Path, user: &Option<String>) -> Result<(), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "3",
        "-subj",
        "/CN=rekey test CA",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3",
        "-extfile",
        "leaf.ext",
    ])?;
    let key = dir.join("server.key");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    if let Some(u) = user {
        std::os::unix::fs::chown(&key, Some(id_of(u, "-u")), Some(id_of(u, "-g")))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The user to run the server as: this one, or when root, `postgres` or `nobody`.
fn server_user() -> Option<String> {
    if !rustix::process::getuid().is_root() {
        return None;
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    Some(
        if exists("postgres") {
            "postgres"
        } else {
            "nobody"
        }
        .to_string(),
    )
}

fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id").arg(flag).arg(user).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `program args…` as the server's user.
fn as_server_user(user: &Option<String>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Server {
    fn start() -> Result<Server, String> {
        let bindir = bindir()?;
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix("rekey-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        if let Some(u) = &user {
            std::os::unix::fs::chown(&dir, Some(id_of(u, "-u")), Some(id_of(u, "-g")))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let pwfile = dir.join("password");
        std::fs::write(&pwfile, PASSWORD).map_err(|e| e.to_string())?;
        if let Some(u) = &user {
            std::os::unix::fs::chown(&pwfile, Some(id_of(u, "-u")), None)
                .map_err(|e| e.to_string())?;
        }
        make_certificates(&dir, &user)?;
        let data = dir.join("data");
        let out = as_server_user(&user, &bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-E", "UTF8", "--locale=C", "--auth-local=trust"])
            .args(["--auth-host=scram-sha-256", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = crate::support::util::free_port();
        let log = dir.join("server.log");
        // The shell starts the server, then waits for its stdin to close (this
        // process ending), then stops it and removes the directory. (A background
        // job of a shell ignores SIGINT, hence pg_ctl; nothing needs to survive.)
        let script = format!(
            "\"$0\" -D \"$1\" -p {port} -k \"$2\" -c listen_addresses=127.0.0.1 \
             -c fsync=on -c max_connections=300 -c shared_buffers=16MB \
             -c ssl=on -c ssl_cert_file=\"$2/server.crt\" -c ssl_key_file=\"$2/server.key\" \
             >>\"$3\" 2>&1 & pid=$!; \
             cat >/dev/null; \"$4\" -D \"$1\" -m immediate -w stop >/dev/null 2>&1 || kill -KILL $pid; \
             wait $pid; rm -rf \"$2\""
        );
        let mut shell = as_server_user(&user, Path::new("/bin/sh"));
        let mut child = shell
            .arg("-c")
            .arg(script)
            .arg(bindir.join("postgres"))
            .arg(&data)
            .arg(&dir)
            .arg(&log)
            .arg(bindir.join("pg_ctl"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let lifeline = child
            .stdin
            .take()
            .ok_or("no stdin for the server's shell")?;
        let server = Server {
            dir,
            bindir,
            port,
            _lifeline: lifeline,
        };
        server.await_ready(&log)?;
        let _ = writeln!(
            std::io::stderr(),
            "[postgres] test server on 127.0.0.1:{port}, data in {}",
            server.dir.display()
        );
        Ok(server)
    }

    fn await_ready(&self, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(20);
        loop {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after 30s; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        psql(&self.bindir, self.port, db, sql)
    }

    fn database(&self, name: String) -> TestDb {
        TestDb {
            name,
            port: self.port,
            server_port: self.port,
            bindir: self.bindir.clone(),
            ca_file: self.dir.join("ca.pem"),
            password_file: self.dir.join("password"),
        }
    }
}

/// Runs SQL over TCP with the password, as the tests' clients do.
fn psql(bindir: &Path, port: u16, db: &str, sql: &str) -> Result<String, String> {
    {
        let out = Command::new(bindir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", USER, "-d", db])
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql `{sql}`: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// A TCP proxy on loopback in front of the test server, to cut one instance off the
/// database while others still reach it.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(link.abort_handle());
            }
        });
        Proxy {
            port,
            cut,
            links,
            _accept: accept,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

impl TestDb {
    /// The same database reached through `proxy`.
    pub fn through(&self, proxy: &Proxy) -> TestDb {
        TestDb {
            port: proxy.port,
            ..self.clone()
        }
    }
}
