//! The configuration file: TOML, versioned, strict.
//!
//! Loading has two stages. [`RawConfig`] is exactly what the file (plus the
//! `REKEY__SECTION__KEY` environment overlay) says, deserialized with unknown keys
//! refused. [`Config::load`] then validates it into [`Config`], in which every value has
//! been checked, every duration parsed, every token file read and every reference
//! resolved. Every problem found is reported at once, each naming the file, the key and
//! what is wrong, so an operator fixes a config in one round.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::Env;
use serde::Deserialize;

use crate::policy_timing::{CatchUp, Schedule, StartRules, Window};
use crate::rotation::{OnTimeout, Timing};
use crate::secret::{ExposeSecret, SecretString, secret};

/// The config file format version this rekey reads.
pub const CONFIG_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------
// Raw, as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub version: Option<u32>,
    pub state_dir: Option<PathBuf>,
    pub vault: Option<RawVault>,
    pub file_store: Option<RawFileStore>,
    #[serde(default)]
    pub providers: Vec<RawProvider>,
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
    pub log: Option<RawLog>,
    pub daemon: Option<RawDaemon>,
    pub metrics: Option<RawMetrics>,
    pub state: Option<RawState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub history_retention: Option<String>,
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub cluster: Option<String>,
    pub lease: Option<String>,
    pub renew_every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub max_concurrent: Option<usize>,
    pub drain_timeout: Option<String>,
    pub drift_check: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub address: Option<String>,
    pub token_file: Option<PathBuf>,
    pub approle: Option<RawAppRole>,
    pub mount: Option<String>,
    pub kv_version: Option<u8>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Option<String>,
    pub namespace: Option<String>,
    pub destroy_old_versions: Option<bool>,
    pub min_token_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    pub role_id: String,
    pub secret_id_file: PathBuf,
    pub mount: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileStore {
    pub dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub base_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub rate_limit: Option<String>,
    pub timeout: Option<String>,
    /// The longest a delivery can take at this provider (evidence rules).
    pub longest_delivery: Option<String>,
    /// Daemon: subscriptions of this account advanced at the same time.
    pub max_concurrent: Option<usize>,
    // Monite only.
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub entity_id: Option<String>,
    pub api_version: Option<String>,
    // Storno only.
    pub company: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub name: Option<String>,
    pub schedule: Option<String>,
    pub every: Option<String>,
    pub timezone: Option<String>,
    pub confirm_timeout: Option<String>,
    pub confirm_poll: Option<String>,
    pub on_timeout: Option<String>,
    pub fail_after: Option<String>,
    pub fail_after_failures: Option<u32>,
    pub rotate_on_adopt: Option<bool>,
    pub retry_base: Option<String>,
    pub retry_max: Option<String>,
    pub window: Option<String>,
    pub jitter: Option<String>,
    pub catch_up: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    pub provider: Option<String>,
    pub id: Option<String>,
    pub policy: Option<String>,
    pub vault_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

// ---------------------------------------------------------------------------------
// Validated.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from.
    pub source: PathBuf,
    pub state_dir: PathBuf,
    pub store: StoreSettings,
    pub providers: Vec<ProviderSettings>,
    pub policies: Vec<Policy>,
    pub subscriptions: Vec<Subscription>,
    /// `[[subscriptions]]` entries with `id = "*"`: every subscription the provider
    /// lists, discovered on each pass.
    pub discoveries: Vec<Discovery>,
    pub log: LogSettings,
    pub daemon: DaemonSettings,
    /// Where the daemon serves `/metrics` and `/healthz`; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub state: StateSettings,
}

/// The state database's own settings (`[state]`).
#[derive(Debug, Clone)]
pub struct StateSettings {
    /// History rows older than this are pruned (never those of a rotation under way).
    pub history_retention: Duration,
    /// The shared PostgreSQL database (`url`); SQLite in `state_dir` when `None`.
    pub postgres: Option<PostgresSettings>,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            history_retention: Duration::from_secs(400 * 86_400),
            postgres: None,
        }
    }
}

/// `[state] url = "postgres://…"`: the state in PostgreSQL, shared by a cluster of
/// rekey instances of which one leads at a time.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The URL as written, less its TLS parameters; it holds no password.
    pub url: String,
    /// The URL parsed, without password or TLS settings.
    pub connect: tokio_postgres::Config,
    /// `sslmode=disable` (loopback hosts only): no TLS at all.
    pub tls: bool,
    /// `sslrootcert=<file>`: a CA for the server's certificate besides the system's.
    pub root_cert: Option<PathBuf>,
    /// From `password_file`, else `$PGPASSWORD`.
    pub password: Option<SecretString>,
    /// The lease's name: instances sharing one cluster name take turns leading.
    pub cluster: String,
    /// How long a lease lasts unrenewed, on the database's clock.
    pub lease: Duration,
    pub renew_every: Duration,
}

/// The long-running mode's own settings (`[daemon]`).
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// Subscriptions advanced at the same time, across all providers.
    pub max_concurrent: usize,
    /// How long SIGTERM waits for in-flight steps to reach a saved state.
    pub drain_timeout: Duration,
    /// How often an idle or drifted subscription is checked for a rotation made
    /// outside rekey (providers that show part of their secret), at the most.
    pub drift_check: Duration,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            max_concurrent: 4,
            drain_timeout: Duration::from_secs(30),
            drift_check: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone)]
pub enum StoreSettings {
    Vault(VaultSettings),
    File { dir: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvVersion {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct VaultSettings {
    pub address: String,
    pub auth: VaultAuth,
    pub mount: String,
    pub kv_version: KvVersion,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Duration,
    pub namespace: Option<String>,
    pub destroy_old_versions: bool,
    pub min_token_ttl: Duration,
}

#[derive(Debug, Clone)]
pub enum VaultAuth {
    Token(SecretString),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: SecretString,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Fintoro,
    Monite,
    Storno,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Fintoro => "fintoro",
            ProviderKind::Monite => "monite",
            ProviderKind::Storno => "storno",
        }
    }

    /// The documented (or, for Storno, conservatively chosen) request budget of one
    /// account, used when the config gives no `rate_limit`.
    pub fn default_rate_limit(self) -> RateLimit {
        match self {
            // 120 requests per minute per company, shared by all its tokens.
            ProviderKind::Fintoro => RateLimit {
                count: 120,
                per: Duration::from_secs(60),
            },
            // "About 30 requests per second."
            ProviderKind::Monite => RateLimit {
                count: 30,
                per: Duration::from_secs(1),
            },
            // Storno documents no number; one per second keeps rekey far below any
            // plausible limit (a rotation needs a handful of calls).
            ProviderKind::Storno => RateLimit {
                count: 60,
                per: Duration::from_secs(60),
            },
        }
    }

    /// The longest one delivery attempt can take, from its signing to its completion:
    /// the provider's delivery timeout. Evidence resting on a *completion* time counts
    /// only completions later than publication + this (see `docs/providers.md`).
    pub fn default_longest_delivery(self) -> Duration {
        match self {
            // "success = 2xx within 10 s"; Storno's delivery timeout is 10 s too.
            ProviderKind::Fintoro | ProviderKind::Storno => Duration::from_secs(10),
            // Undocumented; unused by Monite's rule (it reads creation times).
            ProviderKind::Monite => Duration::from_secs(30),
        }
    }

    fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Fintoro => Some("https://app.fintoro.sk/api/public/v1"),
            // Sandbox, EU and NA differ: the operator must say which.
            ProviderKind::Monite => None,
            ProviderKind::Storno => Some("https://api.storno.ro/api/v1"),
        }
    }
}

/// The Monite API version rekey was written against (`x-monite-version`).
pub const MONITE_DEFAULT_API_VERSION: &str = "2024-01-31";

/// What only one provider kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KindSettings {
    Fintoro,
    Monite {
        client_id: String,
        /// Required by the delivery log (`x-monite-entity-id`).
        entity_id: String,
        api_version: String,
    },
    Storno {
        /// The company uuid, sent as `X-Company`.
        company: String,
    },
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `count` requests per `per`, with bursts of up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    pub fn parse(s: &str) -> Result<RateLimit, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a rate; write e.g. \"120/min\" or \"30/s\""))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("`{n}` in `{s}` is not a positive whole number"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => {
                return Err(format!(
                    "unit `{other}` in `{s}` is not one of s, min, hour"
                ));
            }
        };
        Ok(RateLimit { count, per })
    }
}

#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    /// The account's secret credential: Fintoro's and Storno's `token_file`, Monite's
    /// `client_secret_file`.
    pub token: SecretString,
    pub rate_limit: RateLimit,
    pub timeout: Duration,
    /// The longest a delivery can take at this provider (its delivery timeout).
    pub longest_delivery: Duration,
    /// Subscriptions of this provider advanced at the same time (daemon); none: only
    /// the global `[daemon] max_concurrent` applies.
    pub max_concurrent: Option<usize>,
    pub settings: KindSettings,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub schedule: Schedule,
    pub timing: Timing,
    pub rotate_on_adopt: bool,
    /// When a due rotation may start: window, jitter, catch-up (the daemon's scheduler).
    pub start: StartRules,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    /// `<provider>/<id>`: the name used everywhere (CLI, logs, status, state).
    pub name: String,
    pub provider: String,
    pub id: String,
    pub policy: String,
    pub vault_path: String,
}

/// Manage every subscription a provider account lists (`id = "*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub provider: String,
    /// The provider's kind, for the `{kind}` placeholder.
    pub kind: ProviderKind,
    pub policy: String,
    /// `vault_path` with `{id}` (required), `{provider}` and `{kind}` placeholders.
    pub vault_path_template: String,
}

impl Discovery {
    /// The subscription a listed id becomes.
    pub fn subscription(&self, id: &str) -> Subscription {
        Subscription {
            name: format!("{}/{id}", self.provider),
            provider: self.provider.clone(),
            id: id.to_string(),
            policy: self.policy.clone(),
            vault_path: self
                .vault_path_template
                .replace("{provider}", &self.provider)
                .replace("{kind}", self.kind.as_str())
                .replace("{id}", id),
        }
    }

    /// A path this entry and `other` could both produce (for their two accounts'
    /// subscriptions), if there is one: then two subscriptions would share an entry.
    fn shared_path(&self, other: &Discovery) -> Option<String> {
        common_string(&self.pattern(), &other.pattern())
    }

    /// The template with the account filled in, as what a path may hold at each place.
    fn pattern(&self) -> Vec<Piece> {
        let filled = self
            .vault_path_template
            .replace("{provider}", &self.provider)
            .replace("{kind}", self.kind.as_str());
        let mut out = vec![];
        for (i, literal) in filled.split("{id}").enumerate() {
            if i > 0 {
                // An id is at least one character, and never a `/`.
                out.extend([Piece::AnyChar, Piece::AnyRun]);
            }
            out.extend(literal.chars().map(Piece::Char));
        }
        out
    }
}

/// One place in a [`Discovery::pattern`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Char(char),
    /// Exactly one character of an id.
    AnyChar,
    /// Any number of characters of an id (none too).
    AnyRun,
}

/// A string both patterns match, if any: a search over pairs of positions, one in
/// each pattern, that keeps the character it took to reach each pair. It treats
/// every `{id}` on its own (an id used twice in one template may match two
/// different texts here), so it may find a collision where none can happen, never
/// the reverse.
fn common_string(a: &[Piece], b: &[Piece]) -> Option<String> {
    use std::collections::VecDeque;
    // What one character `c` (None: any id character) does at a position: where the
    // pattern goes next, or None if it cannot take it.
    fn take(p: &[Piece], i: usize, c: Option<char>) -> Option<usize> {
        match (p.get(i)?, c) {
            (Piece::Char(x), Some(c)) => (*x == c).then_some(i + 1),
            (Piece::Char(_), None) => None,
            (_, Some('/')) => None,
            (Piece::AnyChar, _) => Some(i + 1),
            (Piece::AnyRun, _) => Some(i),
        }
    }
    let width = b.len() + 1;
    let mut came_from: Vec<Option<(usize, Option<char>)>> = vec![None; (a.len() + 1) * width];
    let mut queue = VecDeque::from([(0, 0)]);
    let start = 0;
    came_from[start] = Some((start, None));
    while let Some((i, j)) = queue.pop_front() {
        if (i, j) == (a.len(), b.len()) {
            let mut path = vec![];
            let mut at = i * width + j;
            while at != start {
                let (prev, c) = came_from[at]?;
                path.extend(c);
                at = prev;
            }
            return Some(path.into_iter().rev().collect());
        }
        // A run may end (without a character); otherwise both take one character:
        // a literal one if either pattern has one there, else any id character.
        let mut next = vec![];
        if a.get(i) == Some(&Piece::AnyRun) {
            next.push((i + 1, j, None));
        }
        if b.get(j) == Some(&Piece::AnyRun) {
            next.push((i, j + 1, None));
        }
        let c = match (a.get(i), b.get(j)) {
            (Some(Piece::Char(c)), _) | (_, Some(Piece::Char(c))) => Some(*c),
            _ => None,
        };
        if let (Some(i2), Some(j2)) = (take(a, i, c), take(b, j, c)) {
            next.push((i2, j2, Some(c.unwrap_or('x'))));
        }
        for (i2, j2, c) in next {
            let at = i2 * width + j2;
            if came_from[at].is_none() {
                came_from[at] = Some((i * width + j, c));
                queue.push_back((i2, j2));
            }
        }
    }
    None
}

/// Checks a `vault_path` template: `{id}` must appear (else every subscription
/// would share one entry) and no other placeholder than `{provider}` and `{kind}`.
fn check_template(t: &str) -> Result<(), String> {
    if !t.contains("{id}") {
        return Err(format!(
            "`{t}` must contain `{{id}}` when id = \"*\" (e.g. \"webhooks/{{provider}}/{{id}}\"), \
             or every discovered subscription would share one entry"
        ));
    }
    let rest = t
        .replace("{id}", "")
        .replace("{provider}", "")
        .replace("{kind}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{t}` has a placeholder other than {{id}}, {{provider}}, {{kind}}"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald's native protocol under systemd, text elsewhere (the default).
    Auto,
    Text,
    Json,
    /// journald's native protocol, every event with its fields.
    Journald,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    pub fn provider(&self, name: &str) -> Option<&ProviderSettings> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    pub fn subscription(&self, name: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.name == name)
    }

    /// The discovery entry that could produce `name` (`<provider>/<id>`), if any.
    pub fn discovery_for(&self, name: &str) -> Option<&Discovery> {
        let (provider, id) = name.split_once('/')?;
        (!id.is_empty())
            .then(|| self.discoveries.iter().find(|d| d.provider == provider))
            .flatten()
    }
}

// ---------------------------------------------------------------------------------
// Errors.

/// One problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match self.problems.as_slice() {
            [one] if one.key.is_empty() => write!(f, "{file}: {}", one.message),
            [one] => write!(f, "{file}: {}: {}", one.key, one.message),
            many => {
                write!(f, "{file}: {} problems:", many.len())?;
                for p in many {
                    if p.key.is_empty() {
                        write!(f, "\n  {}", p.message)?;
                    } else {
                        write!(f, "\n  {}: {}", p.key, p.message)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The process environment the config may fall back on (`VAULT_ADDR`, …), passed in
/// so validation is testable without touching the real environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

const ENV_PREFIX: &str = "REKEY__";

impl Config {
    /// Loads, overlays `REKEY__…` environment variables, and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, &ProcessEnv, true)
    }

    /// As [`Config::load`], but reads no secret file: for the commands that only show
    /// the state or hand a request to the rekey holding it ([`WithoutSecrets`]).
    pub fn load_without_secrets(path: &Path) -> Result<WithoutSecrets, ConfigError> {
        let (config, files) = load_checked(path, &ProcessEnv, true, Secrets::Defer)?;
        Ok(WithoutSecrets { config, files })
    }

    /// As [`Config::load`], with an explicit environment; `overlay` turns the
    /// `REKEY__…` overlay on (tests turn it off to stay hermetic).
    pub fn load_with(
        path: &Path,
        env: &dyn Environment,
        overlay: bool,
    ) -> Result<Config, ConfigError> {
        load_checked(path, env, overlay, Secrets::Read).map(|(config, _)| config)
    }
}

/// Whether loading reads the secret files or only notes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    Read,
    Defer,
}

/// A secret file the config names, and where its secret goes.
#[derive(Debug, Clone)]
struct SecretFile {
    key: String,
    path: PathBuf,
    slot: Slot,
}

#[derive(Debug, Clone)]
enum Slot {
    /// The named provider's `token`.
    Provider(String),
    /// `[vault] token_file`.
    VaultToken,
    /// `[vault.approle] secret_id_file`.
    VaultSecretId,
}

/// A config validated in everything but its secret files, which are not read: its
/// secrets are empty. Under systemd those files are credentials only the service
/// can read, and `rekey status` must work for an operator without them. Only
/// [`WithoutSecrets::with_secrets`] gives a [`Config`] to act with.
#[derive(Debug, Clone)]
pub struct WithoutSecrets {
    config: Config,
    files: Vec<SecretFile>,
}

impl std::ops::Deref for WithoutSecrets {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

impl WithoutSecrets {
    /// Reads the secret files now, with the errors [`Config::load`] gives for them.
    pub fn with_secrets(&self) -> Result<Config, ConfigError> {
        let mut c = Checker::new(self.config.source.parent(), Secrets::Read);
        let mut config = self.config.clone();
        for f in &self.files {
            let Some(secret) = c.secret_file(&f.key, &f.path, f.slot.clone()) else {
                continue;
            };
            config.put_secret(&f.slot, secret);
        }
        if !c.problems.is_empty() {
            return Err(ConfigError {
                file: config.source.clone(),
                problems: c.problems,
            });
        }
        Ok(config)
    }
}

impl Config {
    fn put_secret(&mut self, slot: &Slot, secret: SecretString) {
        let auth = match &mut self.store {
            StoreSettings::Vault(v) => Some(&mut v.auth),
            StoreSettings::File { .. } => None,
        };
        match (slot, auth) {
            (Slot::Provider(name), _) => {
                if let Some(p) = self.providers.iter_mut().find(|p| &p.name == name) {
                    p.token = secret;
                }
            }
            (Slot::VaultToken, Some(auth @ VaultAuth::Token(_))) => {
                *auth = VaultAuth::Token(secret)
            }
            (Slot::VaultSecretId, Some(VaultAuth::AppRole { secret_id, .. })) => {
                *secret_id = secret
            }
            _ => {}
        }
    }
}

/// Loads and validates `path`; with [`Secrets::Defer`], the secret files it names
/// instead of their secrets.
fn load_checked(
    path: &Path,
    env: &dyn Environment,
    overlay: bool,
    secrets: Secrets,
) -> Result<(Config, Vec<SecretFile>), ConfigError> {
    let fail = |key: &str, message: String| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            key: key.to_string(),
            message,
        }],
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail("", format!("cannot read config file: {e}")))?;
    let mut fig = Figment::from(TomlText(&text));
    if overlay {
        fig = fig.merge(Env::prefixed(ENV_PREFIX).split("__"));
    }
    let raw: RawConfig = fig.extract().map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: e.into_iter().map(figment_problem).collect(),
    })?;
    validate(raw, path, Checker::new(path.parent(), secrets), env)
}

/// The config file's text as a figment source. Parsed by `toml`'s streaming parser
/// straight into figment's values: figment's own TOML source builds a full
/// `toml_edit` document first (about 2.3 KB per `[[subscriptions]]` table).
struct TomlText<'a>(&'a str);

impl figment::Provider for TomlText<'_> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOML source string")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let dict: figment::value::Dict =
            toml::from_str(self.0).map_err(|e| figment::Error::from(e.to_string()))?;
        Ok(figment::Profile::Default.collect(dict))
    }
}

fn figment_problem(e: figment::Error) -> Problem {
    use figment::error::Kind;
    let mut path: Vec<String> = e.path.clone();
    let message = match &e.kind {
        Kind::UnknownField(field, expected) => {
            path.push(field.clone());
            if expected.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key; expected one of: {}", expected.join(", "))
            }
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "is required".to_string()
        }
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    };
    let origin = e
        .metadata
        .as_ref()
        .filter(|m| m.name.contains("environment"))
        .map(|_| " (from the environment)")
        .unwrap_or("");
    Problem {
        key: key_path(&path),
        message: format!("{message}{origin}"),
    }
}

/// `["providers", "0", "kind"]` → `providers[0].kind`.
fn key_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Validation.

struct Checker {
    problems: Vec<Problem>,
    base: PathBuf,
    secrets: Secrets,
    /// With [`Secrets::Defer`], the secret files seen.
    secret_files: Vec<SecretFile>,
}

impl Checker {
    /// `base`: the config file's folder, which relative paths start from.
    fn new(base: Option<&Path>, secrets: Secrets) -> Checker {
        Checker {
            problems: vec![],
            base: base.unwrap_or(Path::new(".")).to_path_buf(),
            secrets,
            secret_files: vec![],
        }
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d > Duration::ZERO => d,
                Ok(_) => {
                    self.problem(key, "must be longer than zero");
                    default
                }
                Err(e) => {
                    self.problem(
                        key,
                        format!("`{s}` is not a duration ({e}); write e.g. \"90s\", \"5m\", \"24h\", \"30d\""),
                    );
                    default
                }
            },
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Reads a secret from a file: must exist, be readable, non-empty. A trailing
    /// newline is dropped (files written with `echo` have one). With
    /// [`Secrets::Defer`], notes the file for `slot` and gives an empty secret.
    fn secret_file(&mut self, key: &str, p: &Path, slot: Slot) -> Option<SecretString> {
        if self.secrets == Secrets::Defer {
            self.secret_files.push(SecretFile {
                key: key.to_string(),
                path: p.to_path_buf(),
                slot,
            });
            return Some(secret(String::new()));
        }
        self.read_secret_file(key, p)
    }

    /// Reads a secret file now, whatever the mode: the state database's password,
    /// which every command needs, `rekey status` included.
    fn read_secret_file(&mut self, key: &str, p: &Path) -> Option<SecretString> {
        let path = self.resolve(p);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let s = secret(s.trim_end_matches(['\n', '\r']).to_string());
                if s.expose_secret().trim().is_empty() {
                    self.problem(key, format!("{} is empty", path.display()));
                    None
                } else {
                    Some(s)
                }
            }
            Err(e) => {
                self.problem(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn url(&mut self, key: &str, url: &str) -> Option<String> {
        match check_url(url) {
            Ok(u) => Some(u),
            Err(m) => {
                self.problem(key, m);
                None
            }
        }
    }

    /// A required, non-empty identifier that is sent in a header or path (no
    /// whitespace or control characters, which would corrupt the request).
    fn plain(&mut self, key: &str, v: Option<&str>) -> Option<String> {
        match v.map(str::trim) {
            None => {
                self.problem(key, "is required");
                None
            }
            Some("") => {
                self.problem(key, "must not be empty");
                None
            }
            Some(s)
                if s.chars().any(|c| c.is_whitespace() || c.is_control()) || s.contains('/') =>
            {
                self.problem(
                    key,
                    format!("`{s}` must not contain spaces, control characters or `/`"),
                );
                None
            }
            Some(s) => Some(s.to_string()),
        }
    }

    fn name(&mut self, key: &str, v: Option<&String>) -> Option<String> {
        match v.map(|s| s.trim()) {
            None => {
                self.problem(key, "is required");
                None
            }
            Some("") => {
                self.problem(key, "must not be empty");
                None
            }
            Some(s) if s.contains(char::is_whitespace) || s.contains('/') => {
                self.problem(key, format!("`{s}` must not contain spaces or `/`"));
                None
            }
            Some(s) => Some(s.to_string()),
        }
    }
}

/// HTTPS is required, except to loopback hosts (the sandbox, local test servers, a
/// Vault agent on the same host).
pub fn check_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if is_loopback(host) => {}
        "http" => {
            return Err(format!(
                "`{url}` uses http to a non-loopback host; secrets must travel over https"
            ));
        }
        other => return Err(format!("`{url}`: scheme `{other}` is not http(s)")),
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// A provider key given for a kind that does not use it is refused rather than
/// ignored: a `client_id` on a Storno account is a mix-up the operator must see.
fn reject_foreign_keys(c: &mut Checker, k: &str, kind: ProviderKind, p: &RawProvider) {
    let given: [(&str, bool, &[ProviderKind]); 6] = [
        (
            "token_file",
            p.token_file.is_some(),
            &[ProviderKind::Fintoro, ProviderKind::Storno],
        ),
        ("client_id", p.client_id.is_some(), &[ProviderKind::Monite]),
        (
            "client_secret_file",
            p.client_secret_file.is_some(),
            &[ProviderKind::Monite],
        ),
        ("entity_id", p.entity_id.is_some(), &[ProviderKind::Monite]),
        (
            "api_version",
            p.api_version.is_some(),
            &[ProviderKind::Monite],
        ),
        ("company", p.company.is_some(), &[ProviderKind::Storno]),
    ];
    for (key, present, kinds) in given {
        if present && !kinds.contains(&kind) {
            let owners: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            c.problem(
                format!("{k}.{key}"),
                format!(
                    "is not a {kind} setting (only for {}); remove it",
                    owners.join(", ")
                ),
            );
        }
    }
}

/// The secret of the provider named `name`, from the file `key` names.
fn required_secret(
    c: &mut Checker,
    key: &str,
    file: Option<&Path>,
    name: &str,
) -> Option<SecretString> {
    match file {
        Some(f) => c.secret_file(key, f, Slot::Provider(name.to_string())),
        None => {
            c.problem(key, "is required");
            None
        }
    }
}

/// Monite versions are dates (`2024-01-31`).
fn is_api_version(v: &str) -> bool {
    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").is_ok()
}

/// Validates every section in file order, collecting all problems in one [`Checker`]
/// so an operator sees everything wrong at once, in the order the file reads.
fn validate(
    raw: RawConfig,
    file: &Path,
    mut c: Checker,
    env: &dyn Environment,
) -> Result<(Config, Vec<SecretFile>), ConfigError> {
    validate_version(&mut c, raw.version);
    let state_dir = validate_state_dir(&mut c, raw.state_dir);
    let store = validate_store(&mut c, raw.vault, raw.file_store, env);
    let providers = validate_providers(&mut c, raw.providers);
    let policies = validate_policies(&mut c, raw.policies);
    let (subscriptions, discoveries) =
        validate_subscriptions(&mut c, raw.subscriptions, &providers, &policies);
    let log = validate_log(&mut c, raw.log);
    let daemon = validate_daemon(&mut c, raw.daemon);
    let metrics_listen = validate_metrics(&mut c, raw.metrics);
    let lease_given = raw.state.as_ref().is_some_and(|s| s.lease.is_some());
    let mut state = validate_state(&mut c, raw.state, env);
    if let Some(pg) = &mut state.postgres {
        if !lease_given {
            pg.lease = pg.lease.max(lease_covering(&providers.valid));
        }
        lease_covers_rotate_calls(&mut c, pg, &providers.valid);
    }

    if !c.problems.is_empty() {
        return Err(ConfigError {
            file: file.to_path_buf(),
            problems: c.problems,
        });
    }
    let Some(store) = store else {
        return Err(ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                key: "vault".into(),
                message: "no usable secret store".into(),
            }],
        });
    };
    let config = Config {
        source: file.to_path_buf(),
        state_dir,
        store,
        providers: providers.valid,
        policies: policies.valid,
        subscriptions,
        discoveries,
        log,
        daemon,
        metrics_listen,
        state,
    };
    Ok((config, c.secret_files))
}

fn validate_version(c: &mut Checker, version: Option<u32>) {
    match version {
        Some(CONFIG_VERSION) => {}
        Some(v) => c.problem(
            "version",
            format!("version {v} is not supported; this rekey reads version {CONFIG_VERSION}"),
        ),
        None => c.problem(
            "version",
            format!("is required (write `version = {CONFIG_VERSION}`)"),
        ),
    }
}

fn validate_state_dir(c: &mut Checker, state_dir: Option<PathBuf>) -> PathBuf {
    match state_dir {
        Some(p) if !p.as_os_str().is_empty() => c.resolve(&p),
        _ => {
            c.problem("state_dir", "is required (e.g. \"/var/lib/rekey\")");
            PathBuf::new()
        }
    }
}

fn validate_store(
    c: &mut Checker,
    vault: Option<RawVault>,
    file_store: Option<RawFileStore>,
    env: &dyn Environment,
) -> Option<StoreSettings> {
    match (vault, file_store) {
        (Some(_), Some(_)) => {
            c.problem(
                "file_store",
                "give either [vault] or [file_store], not both",
            );
            None
        }
        (None, None) => {
            c.problem("vault", "a [vault] section (or [file_store]) is required");
            None
        }
        (None, Some(f)) => Some(StoreSettings::File {
            dir: c.resolve(&f.dir),
        }),
        (Some(v), None) => validate_vault(c, v, env).map(StoreSettings::Vault),
    }
}

/// The `[[providers]]` or `[[policies]]` entries that validated, and the name of every
/// entry given, valid or not: a subscription naming a defined but invalid entry is not
/// reported again (that entry's own problems already are).
struct Entries<T> {
    valid: Vec<T>,
    given: HashSet<String>,
}

impl<T> Entries<T> {
    fn new() -> Self {
        Entries {
            valid: vec![],
            given: HashSet::new(),
        }
    }

    /// The entry's name if it is usable and not already given; `what` names the
    /// section's kind of entry ("provider", "policy") in the message.
    fn name(&mut self, c: &mut Checker, k: &str, what: &str, v: Option<&String>) -> Option<String> {
        let name = c.name(&format!("{k}.name"), v)?;
        if !self.given.insert(name.clone()) {
            c.problem(
                format!("{k}.name"),
                format!("{what} `{name}` is defined twice"),
            );
            return None;
        }
        Some(name)
    }

    /// A subscription's reference to one of these entries, by name; `section` is the
    /// table it is looked up in ("providers", "policies").
    fn reference(
        &self,
        c: &mut Checker,
        key: String,
        v: Option<&str>,
        section: &str,
        name_of: fn(&T) -> &str,
    ) -> Option<String> {
        match v {
            None => {
                c.problem(key, "is required");
                None
            }
            Some(n) if self.valid.iter().any(|x| name_of(x) == n) => Some(n.to_string()),
            // Defined but invalid: its own problems are already reported.
            Some(n) if self.given.contains(n) => None,
            Some(n) => {
                c.problem(key, format!("no [[{section}]] entry is named `{n}`"));
                None
            }
        }
    }
}

fn validate_providers(c: &mut Checker, raw: Vec<RawProvider>) -> Entries<ProviderSettings> {
    let mut out = Entries::new();
    for (i, p) in raw.into_iter().enumerate() {
        let k = format!("providers[{i}]");
        let Some(name) = out.name(c, &k, "provider", p.name.as_ref()) else {
            continue;
        };
        if let Some(settings) = validate_provider(c, &k, name, &p) {
            out.valid.push(settings);
        }
    }
    out
}

/// One `[[providers]]` entry (`k` is its key, `providers[i]`), its name already
/// checked. Every key is checked even when an earlier one is wrong.
fn validate_provider(
    c: &mut Checker,
    k: &str,
    name: String,
    p: &RawProvider,
) -> Option<ProviderSettings> {
    let kind = provider_kind(c, k, p.kind.as_deref());
    if let Some(kind) = kind {
        reject_foreign_keys(c, k, kind, p);
    }
    let base_url = provider_base_url(c, k, kind, p.base_url.as_deref());
    let (token, settings) = match kind {
        None => (None, None),
        Some(ProviderKind::Fintoro) => (
            required_secret(
                c,
                &format!("{k}.token_file"),
                p.token_file.as_deref(),
                &name,
            ),
            Some(KindSettings::Fintoro),
        ),
        Some(ProviderKind::Monite) => monite_settings(c, k, &name, p),
        Some(ProviderKind::Storno) => storno_settings(c, k, &name, p),
    };
    let rate_limit = match p.rate_limit.as_deref() {
        None => kind.map(ProviderKind::default_rate_limit),
        Some(s) => match RateLimit::parse(s) {
            Ok(r) => Some(r),
            Err(m) => {
                c.problem(format!("{k}.rate_limit"), m);
                None
            }
        },
    };
    let timeout = c.duration(
        &format!("{k}.timeout"),
        p.timeout.as_deref(),
        Duration::from_secs(30),
    );
    if p.max_concurrent == Some(0) {
        c.problem(
            format!("{k}.max_concurrent"),
            "must be at least 1 (omit it for no per-provider limit)",
        );
    }
    let longest_delivery = p
        .longest_delivery
        .as_deref()
        .map(|d| c.duration(&format!("{k}.longest_delivery"), Some(d), Duration::ZERO));
    let (Some(kind), Some(base_url), Some(token), Some(rate_limit), Some(settings)) =
        (kind, base_url, token, rate_limit, settings)
    else {
        return None;
    };
    Some(ProviderSettings {
        name,
        kind,
        base_url,
        token,
        rate_limit,
        timeout,
        longest_delivery: longest_delivery.unwrap_or_else(|| kind.default_longest_delivery()),
        max_concurrent: p.max_concurrent,
        settings,
    })
}

fn provider_kind(c: &mut Checker, k: &str, kind: Option<&str>) -> Option<ProviderKind> {
    match kind {
        Some("fintoro") => Some(ProviderKind::Fintoro),
        Some("monite") => Some(ProviderKind::Monite),
        Some("storno") => Some(ProviderKind::Storno),
        Some(other) => {
            c.problem(
                format!("{k}.kind"),
                format!("`{other}` is not a provider kind; expected fintoro, monite or storno"),
            );
            None
        }
        None => {
            c.problem(format!("{k}.kind"), "is required");
            None
        }
    }
}

/// The given `base_url`, else the kind's default. With no kind there is nothing to
/// say about a missing one: the kind's own problem is reported.
fn provider_base_url(
    c: &mut Checker,
    k: &str,
    kind: Option<ProviderKind>,
    base_url: Option<&str>,
) -> Option<String> {
    match (base_url, kind.and_then(|k| k.default_base_url())) {
        (Some(u), _) | (None, Some(u)) => c.url(&format!("{k}.base_url"), u),
        (None, None) => {
            if kind.is_some() {
                c.problem(
                    format!("{k}.base_url"),
                    "is required for monite (sandbox https://api.sandbox.monite.com/v1, \
                     EU https://api.monite.com/v1, NA https://us.api.monite.com/v1)",
                );
            }
            None
        }
    }
}

/// A Monite account's client secret and settings.
fn monite_settings(
    c: &mut Checker,
    k: &str,
    name: &str,
    p: &RawProvider,
) -> (Option<SecretString>, Option<KindSettings>) {
    let secret = required_secret(
        c,
        &format!("{k}.client_secret_file"),
        p.client_secret_file.as_deref(),
        name,
    );
    let client_id = c.plain(&format!("{k}.client_id"), p.client_id.as_deref());
    let entity_id = c.plain(&format!("{k}.entity_id"), p.entity_id.as_deref());
    let api_version = match p.api_version.as_deref().map(str::trim) {
        None => Some(MONITE_DEFAULT_API_VERSION.to_string()),
        Some(v) if is_api_version(v) => Some(v.to_string()),
        Some(v) => {
            c.problem(
                format!("{k}.api_version"),
                format!("`{v}` is not a Monite API version (a date, e.g. \"{MONITE_DEFAULT_API_VERSION}\")"),
            );
            None
        }
    };
    let settings = match (client_id, entity_id, api_version) {
        (Some(client_id), Some(entity_id), Some(api_version)) => Some(KindSettings::Monite {
            client_id,
            entity_id,
            api_version,
        }),
        _ => None,
    };
    (secret, settings)
}

/// A Storno account's token and company.
fn storno_settings(
    c: &mut Checker,
    k: &str,
    name: &str,
    p: &RawProvider,
) -> (Option<SecretString>, Option<KindSettings>) {
    let token = required_secret(c, &format!("{k}.token_file"), p.token_file.as_deref(), name);
    let company = c
        .plain(&format!("{k}.company"), p.company.as_deref())
        .map(|company| KindSettings::Storno { company });
    (token, company)
}

fn validate_policies(c: &mut Checker, raw: Vec<RawPolicy>) -> Entries<Policy> {
    let mut out = Entries::new();
    for (i, p) in raw.into_iter().enumerate() {
        let k = format!("policies[{i}]");
        let Some(name) = out.name(c, &k, "policy", p.name.as_ref()) else {
            continue;
        };
        if let Some(policy) = validate_policy(c, &k, name, &p) {
            out.valid.push(policy);
        }
    }
    out
}

/// One `[[policies]]` entry (`k` is its key, `policies[i]`), its name already checked.
fn validate_policy(c: &mut Checker, k: &str, name: String, p: &RawPolicy) -> Option<Policy> {
    let (tz, schedule) = policy_schedule(c, k, p);
    let timing = policy_timing(c, k, p);
    let start = policy_start_rules(c, k, p, tz.unwrap_or(chrono_tz::UTC));
    Some(Policy {
        name,
        schedule: schedule?,
        timing,
        rotate_on_adopt: p.rotate_on_adopt.unwrap_or(false),
        start,
    })
}

/// The policy's time zone and its schedule: a cron expression in that zone, or an
/// interval (which has none).
fn policy_schedule(
    c: &mut Checker,
    k: &str,
    p: &RawPolicy,
) -> (Option<chrono_tz::Tz>, Option<Schedule>) {
    let tz = match p.timezone.as_deref() {
        None => Some(chrono_tz::UTC),
        Some(z) => match Schedule::parse_zone(z) {
            Ok(tz) => Some(tz),
            Err(m) => {
                c.problem(format!("{k}.timezone"), m);
                None
            }
        },
    };
    let schedule = match (p.schedule.as_deref(), p.every.as_deref()) {
        (Some(_), Some(_)) => {
            c.problem(
                format!("{k}.every"),
                "give either `schedule` or `every`, not both",
            );
            None
        }
        (None, None) => {
            c.problem(
                format!("{k}.schedule"),
                "a policy needs `schedule` (cron) or `every` (interval)",
            );
            None
        }
        (Some(expr), None) => tz.and_then(|tz| match Schedule::cron(expr, tz) {
            Ok(s) => Some(s),
            Err(m) => {
                c.problem(format!("{k}.schedule"), m);
                None
            }
        }),
        (None, Some(every)) => {
            if p.timezone.is_some() && p.window.is_none() {
                c.problem(
                    format!("{k}.timezone"),
                    "only applies to `schedule` and `window`; an `every` interval has no time zone",
                );
            }
            let before = c.problems.len();
            let d = c.duration(&format!("{k}.every"), Some(every), Duration::ZERO);
            (c.problems.len() == before).then_some(Schedule::Every(d))
        }
    };
    (tz, schedule)
}

/// How a rotation under this policy waits, confirms, fails and retries.
fn policy_timing(c: &mut Checker, k: &str, p: &RawPolicy) -> Timing {
    let confirm_timeout = c.duration(
        &format!("{k}.confirm_timeout"),
        p.confirm_timeout.as_deref(),
        Duration::from_secs(24 * 3600),
    );
    let confirm_poll = c.duration(
        &format!("{k}.confirm_poll"),
        p.confirm_poll.as_deref(),
        Duration::from_secs(300),
    );
    if confirm_poll > confirm_timeout {
        c.problem(
            format!("{k}.confirm_poll"),
            "is longer than confirm_timeout: the deadline would pass between two checks",
        );
    }
    let on_timeout = match p.on_timeout.as_deref() {
        None | Some("hold") => OnTimeout::Hold,
        Some("retire") => OnTimeout::Retire,
        Some(other) => {
            c.problem(
                format!("{k}.on_timeout"),
                format!("`{other}` is not one of \"hold\", \"retire\""),
            );
            OnTimeout::Hold
        }
    };
    let fail_after = c.duration(
        &format!("{k}.fail_after"),
        p.fail_after.as_deref(),
        Duration::from_secs(600),
    );
    if p.fail_after_failures == Some(0) {
        c.problem(
            format!("{k}.fail_after_failures"),
            "must be at least 1 (omit it to hold on `fail_after` alone)",
        );
    }
    let retry_base = c.duration(
        &format!("{k}.retry_base"),
        p.retry_base.as_deref(),
        Duration::from_secs(30),
    );
    let retry_max = c.duration(
        &format!("{k}.retry_max"),
        p.retry_max.as_deref(),
        Duration::from_secs(3600),
    );
    Timing {
        confirm_timeout,
        confirm_poll,
        on_timeout,
        retry_base,
        retry_max: retry_max.max(retry_base),
        fail_after,
        fail_after_failures: p.fail_after_failures,
    }
}

/// When a due rotation may start: its window (in `tz`), jitter and catch-up.
fn policy_start_rules(c: &mut Checker, k: &str, p: &RawPolicy, tz: chrono_tz::Tz) -> StartRules {
    let window = p.window.as_deref().and_then(|w| match Window::parse(w) {
        Ok(w) => Some(w),
        Err(m) => {
            c.problem(format!("{k}.window"), m);
            None
        }
    });
    let jitter = match p.jitter.as_deref() {
        // Zero is a valid jitter ("none"), unlike the other durations.
        Some("0" | "0s") | None => Duration::ZERO,
        Some(j) => c.duration(&format!("{k}.jitter"), Some(j), Duration::ZERO),
    };
    if let Some(w) = &window
        && jitter >= w.length()
    {
        c.problem(
            format!("{k}.jitter"),
            format!(
                "`{}` is not shorter than the window ({}): the offset could push a start out of it",
                humantime::format_duration(jitter),
                humantime::format_duration(w.length())
            ),
        );
    }
    let catch_up = match p.catch_up.as_deref() {
        None | Some("run") => CatchUp::Run,
        Some("skip") => CatchUp::Skip,
        Some(other) => {
            c.problem(
                format!("{k}.catch_up"),
                format!("`{other}` is not one of \"run\", \"skip\""),
            );
            CatchUp::Run
        }
    };
    StartRules {
        window,
        tz,
        jitter,
        catch_up,
    }
}

/// The subscriptions and discovery entries accepted so far, and what later entries
/// are checked against.
struct Subscriptions {
    listed: Vec<Subscription>,
    discoveries: Vec<Discovery>,
    /// The `subscriptions[i]` of each discovery entry, for errors naming two of them.
    discovery_keys: Vec<String>,
    /// Each listed subscription's `vault_path`, to the subscription's name.
    paths: BTreeMap<String, String>,
    /// The listed subscriptions' names: a fleet of ten thousand is not compared
    /// pairwise.
    names: HashSet<String>,
}

fn validate_subscriptions(
    c: &mut Checker,
    raw: Vec<RawSubscription>,
    providers: &Entries<ProviderSettings>,
    policies: &Entries<Policy>,
) -> (Vec<Subscription>, Vec<Discovery>) {
    let mut out = Subscriptions {
        listed: vec![],
        discoveries: vec![],
        discovery_keys: vec![],
        paths: BTreeMap::new(),
        names: HashSet::new(),
    };
    for (i, s) in raw.into_iter().enumerate() {
        let k = format!("subscriptions[{i}]");
        let provider = providers.reference(
            c,
            format!("{k}.provider"),
            s.provider.as_deref(),
            "providers",
            |p| &p.name,
        );
        let id = subscription_id(c, &k, s.id.as_deref());
        let policy = policies.reference(
            c,
            format!("{k}.policy"),
            s.policy.as_deref(),
            "policies",
            |p| &p.name,
        );
        let vault_path = subscription_vault_path(c, &k, s.vault_path.as_deref());
        if let (Some(provider), Some("*"), Some(policy), Some(template)) =
            (&provider, id.as_deref(), &policy, &vault_path)
        {
            out.discover(c, &k, provider, policy, template, &providers.valid);
            continue;
        }
        if let (Some(_), Some(v)) = (&id, &vault_path)
            && id.as_deref() != Some("*")
            && (v.contains('{') || v.contains('}'))
        {
            c.problem(
                format!("{k}.vault_path"),
                format!("`{v}` has a placeholder; placeholders only apply with id = \"*\""),
            );
            continue;
        }
        if let (Some(provider), Some(id), Some(policy), Some(vault_path)) =
            (provider, id, policy, vault_path)
        {
            out.list(c, &k, provider, id, policy, vault_path);
        }
    }
    (out.listed, out.discoveries)
}

fn subscription_id(c: &mut Checker, k: &str, id: Option<&str>) -> Option<String> {
    match id.map(str::trim) {
        None => {
            c.problem(format!("{k}.id"), "is required");
            None
        }
        Some("") => {
            c.problem(format!("{k}.id"), "must not be empty");
            None
        }
        Some(id) if id.contains('/') || id.contains(char::is_whitespace) => {
            c.problem(
                format!("{k}.id"),
                format!("`{id}` must not contain `/` or spaces"),
            );
            None
        }
        Some(id) => Some(id.to_string()),
    }
}

fn subscription_vault_path(c: &mut Checker, k: &str, path: Option<&str>) -> Option<String> {
    match path.map(|p| p.trim_matches('/')) {
        None => {
            c.problem(format!("{k}.vault_path"), "is required");
            None
        }
        Some("") => {
            c.problem(format!("{k}.vault_path"), "must not be empty");
            None
        }
        Some(p)
            if p.split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..") =>
        {
            c.problem(
                format!("{k}.vault_path"),
                format!("`{p}` has an empty, `.` or `..` segment"),
            );
            None
        }
        Some(p) => Some(p.to_string()),
    }
}

impl Subscriptions {
    /// An `id = "*"` entry: one per provider, and no two entries' templates may
    /// produce one path.
    fn discover(
        &mut self,
        c: &mut Checker,
        k: &str,
        provider: &str,
        policy: &str,
        template: &str,
        providers: &[ProviderSettings],
    ) {
        if let Err(m) = check_template(template) {
            c.problem(format!("{k}.vault_path"), m);
            return;
        }
        if self.discoveries.iter().any(|d| d.provider == provider) {
            c.problem(
                format!("{k}.id"),
                format!("provider `{provider}` already has an id = \"*\" entry"),
            );
            return;
        }
        let kind = providers
            .iter()
            .find(|p| p.name == provider)
            .map(|p| p.kind)
            .unwrap_or(ProviderKind::Fintoro);
        let d = Discovery {
            provider: provider.to_string(),
            kind,
            policy: policy.to_string(),
            vault_path_template: template.to_string(),
        };
        if let Some((other, o, path)) = self
            .discovery_keys
            .iter()
            .zip(&self.discoveries)
            .find_map(|(key, o)| o.shared_path(&d).map(|path| (key, o, path)))
        {
            c.problem(
                format!("{k}.vault_path"),
                format!(
                    "`{template}` (provider `{provider}`) and `{}` of {other} (provider \
                     `{}`) can both produce one path (e.g. `{path}`): two accounts' \
                     subscriptions would share that entry; make the templates differ outside `{{id}}`, \
                     e.g. with `{{provider}}`",
                    o.vault_path_template, o.provider
                ),
            );
            return;
        }
        self.discoveries.push(d);
        self.discovery_keys.push(k.to_string());
    }

    /// A listed subscription: listed once, with a `vault_path` of its own.
    fn list(
        &mut self,
        c: &mut Checker,
        k: &str,
        provider: String,
        id: String,
        policy: String,
        vault_path: String,
    ) {
        let name = format!("{provider}/{id}");
        if self.names.contains(&name) {
            c.problem(
                format!("{k}.id"),
                format!("subscription `{name}` is listed twice"),
            );
            return;
        }
        if let Some(other) = self.paths.insert(vault_path.clone(), name.clone()) {
            c.problem(
                format!("{k}.vault_path"),
                format!(
                    "`{vault_path}` is also the path of `{other}`; each subscription needs its own"
                ),
            );
            return;
        }
        self.names.insert(name.clone());
        self.listed.push(Subscription {
            name,
            provider,
            id,
            policy,
            vault_path,
        });
    }
}

fn validate_log(c: &mut Checker, log: Option<RawLog>) -> LogSettings {
    let Some(l) = log else {
        return LogSettings {
            format: LogFormat::Auto,
            level: "info".into(),
        };
    };
    let format = match l.format.as_deref() {
        None | Some("auto") => LogFormat::Auto,
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some("journald") => LogFormat::Journald,
        Some(other) => {
            c.problem(
                "log.format",
                format!("`{other}` is not one of \"auto\", \"text\", \"json\", \"journald\""),
            );
            LogFormat::Auto
        }
    };
    let level = l.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        c.problem(
            "log.level",
            format!("`{level}` is not a log level or filter"),
        );
    }
    LogSettings { format, level }
}

fn validate_daemon(c: &mut Checker, raw: Option<RawDaemon>) -> DaemonSettings {
    let mut daemon = DaemonSettings::default();
    let Some(d) = raw else {
        return daemon;
    };
    match d.max_concurrent {
        Some(0) => c.problem("daemon.max_concurrent", "must be at least 1"),
        Some(n) => daemon.max_concurrent = n,
        None => {}
    }
    daemon.drain_timeout = c.duration(
        "daemon.drain_timeout",
        d.drain_timeout.as_deref(),
        daemon.drain_timeout,
    );
    daemon.drift_check = c.duration(
        "daemon.drift_check",
        d.drift_check.as_deref(),
        daemon.drift_check,
    );
    if daemon.drift_check < Duration::from_secs(60) {
        c.problem(
            "daemon.drift_check",
            "must be at least 1m: each check is a provider request per subscription",
        );
    }
    daemon
}

fn validate_metrics(c: &mut Checker, raw: Option<RawMetrics>) -> Option<std::net::SocketAddr> {
    let l = raw.and_then(|m| m.listen)?;
    match l.parse::<std::net::SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.problem(
                "metrics.listen",
                format!("`{l}` is not an address and port, e.g. \"127.0.0.1:9464\""),
            );
            None
        }
    }
}

fn validate_state(c: &mut Checker, raw: Option<RawState>, env: &dyn Environment) -> StateSettings {
    let mut state = StateSettings::default();
    let Some(raw) = raw else { return state };
    state.postgres = validate_postgres(c, &raw, env);
    state.history_retention = c.duration(
        "state.history_retention",
        raw.history_retention.as_deref(),
        state.history_retention,
    );
    // A typo such as "400s" would erase the audit trail at the next start.
    if state.history_retention < Duration::from_secs(86_400) {
        c.problem(
            "state.history_retention",
            "must be at least 1d: older history rows are deleted (e.g. \"400d\")",
        );
    }
    state
}

/// The `[state]` keys of a PostgreSQL state: the URL (never with a password in it),
/// the password from a file or `$PGPASSWORD`, and the lease timing.
fn validate_postgres(
    c: &mut Checker,
    raw: &RawState,
    env: &dyn Environment,
) -> Option<PostgresSettings> {
    let Some(url) = raw.url.as_deref() else {
        for (key, given) in [
            ("password_file", raw.password_file.is_some()),
            ("cluster", raw.cluster.is_some()),
            ("lease", raw.lease.is_some()),
            ("renew_every", raw.renew_every.is_some()),
        ] {
            if given {
                c.problem(
                    format!("state.{key}"),
                    "applies only to a PostgreSQL state: set state.url too, or remove it",
                );
            }
        }
        return None;
    };
    let (connect, tls, root_cert) = match parse_postgres_url(url) {
        Ok(parts) => parts,
        Err(why) => {
            c.problem("state.url", why);
            return None;
        }
    };
    let root_cert = root_cert.map(|p| c.resolve(&p));
    let password = match &raw.password_file {
        Some(f) => c.read_secret_file("state.password_file", f),
        None => env.var("PGPASSWORD").map(secret),
    };
    let lease = c.duration("state.lease", raw.lease.as_deref(), Duration::from_secs(15));
    let renew_every = c.duration(
        "state.renew_every",
        raw.renew_every.as_deref(),
        Duration::from_secs(5),
    );
    // Two renewals must fit in a lease, so that one slow round trip never costs it.
    if renew_every.saturating_mul(2) > lease || lease < Duration::from_secs(2) {
        c.problem(
            "state.renew_every",
            "must be at most half of state.lease, and the lease at least 2s (e.g. lease = \"15s\", renew_every = \"5s\")",
        );
    }
    let cluster = raw.cluster.clone().unwrap_or_else(|| "default".into());
    if cluster.is_empty() || cluster.len() > 200 {
        c.problem("state.cluster", "must be a name of 1 to 200 characters");
    }
    Some(PostgresSettings {
        url: strip_query(url),
        connect,
        tls,
        root_cert,
        password,
        cluster,
        lease,
        renew_every,
    })
}

/// The shortest lease, in whole seconds, that covers every provider's rotate call
/// ([`lease_covers_rotate_calls`]): the default lease grows to it, so that `[state]
/// url` alone is a working setup (35s for the default 30s timeout). A lease the
/// operator sets is taken as given, and refused if too short.
fn lease_covering(providers: &[ProviderSettings]) -> Duration {
    let longest = providers
        .iter()
        .map(|p| p.timeout)
        .max()
        .unwrap_or_default();
    let mut lease = Duration::from_secs(longest.as_secs() + 2);
    while lease - lease / 10 < longest + Duration::from_secs(1) {
        lease += Duration::from_secs(1);
    }
    lease
}

/// A rotate call starts only while the cluster lease outlasts its timeout (it cannot
/// be fenced like a write), so every provider's timeout must fit in a lease.
fn lease_covers_rotate_calls(
    c: &mut Checker,
    pg: &PostgresSettings,
    providers: &[ProviderSettings],
) {
    let usable = pg.lease - pg.lease / 10;
    for p in providers {
        if p.timeout + Duration::from_secs(1) > usable {
            c.problem(
                "state.lease",
                format!(
                    "{} leaves too little for provider `{}`'s timeout of {}: a rotate call starts only while the lease outlasts it (a tenth of the lease and 1s kept back); raise state.lease or lower that provider's timeout",
                    humantime::format_duration(pg.lease),
                    p.name,
                    humantime::format_duration(p.timeout)
                ),
            );
        }
    }
}

/// `url` without its query string (where the TLS parameters are).
fn strip_query(url: &str) -> String {
    url.split_once('?')
        .map_or(url, |(base, _)| base)
        .to_string()
}

/// Splits a `postgres://` URL into what the driver reads and the TLS settings rekey
/// handles itself (`sslmode`: `verify-full`, the default, or `disable` on loopback;
/// `sslrootcert`). Refuses a password in the URL: config files get copied and shown.
fn parse_postgres_url(
    url: &str,
) -> Result<(tokio_postgres::Config, bool, Option<PathBuf>), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL, e.g. \"postgres://rekey@db.example:5432/rekey?sslmode=verify-full\"".into());
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut tls = true;
    let mut root_cert = None;
    let mut rest = vec![];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", "verify-full")) => tls = true,
            Some(("sslmode", "disable")) => tls = false,
            Some(("sslmode", other)) => {
                return Err(format!(
                    "sslmode={other} is not supported: rekey verifies the server's certificate and name (sslmode=verify-full, the default), or uses no TLS on a loopback host (sslmode=disable)"
                ));
            }
            Some(("sslrootcert", path)) => root_cert = Some(PathBuf::from(path)),
            Some(("password", _)) => return Err(password_in_url()),
            _ => rest.push(pair),
        }
    }
    let driver_url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let connect: tokio_postgres::Config = driver_url
        .parse()
        .map_err(|e| format!("is not a valid PostgreSQL URL: {e}"))?;
    if connect.get_password().is_some() {
        return Err(password_in_url());
    }
    if connect.get_user().is_none() {
        return Err("names no user: write postgres://<user>@<host>/<database>".into());
    }
    let hosts = connect.get_hosts();
    if hosts.is_empty() {
        return Err("names no host: write postgres://<user>@<host>/<database>".into());
    }
    let loopback = hosts.iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => is_loopback(name),
        tokio_postgres::config::Host::Unix(_) => true,
    });
    if !tls && !loopback {
        return Err(
            "sslmode=disable is allowed only for a loopback host or a unix socket: anything else goes over TLS with verification (sslmode=verify-full)".into(),
        );
    }
    Ok((connect, tls, root_cert))
}

fn password_in_url() -> String {
    "holds a password: config files get copied and shown; put the password in state.password_file or $PGPASSWORD instead".into()
}

fn validate_vault(c: &mut Checker, v: RawVault, env: &dyn Environment) -> Option<VaultSettings> {
    let address = match v.address.or_else(|| env.var("VAULT_ADDR")) {
        Some(a) => c.url("vault.address", &a),
        None => {
            c.problem("vault.address", "is not set and $VAULT_ADDR is empty");
            None
        }
    };
    let auth = vault_auth(c, v.token_file, v.approle, env);
    let kv_version = match v.kv_version {
        None | Some(2) => KvVersion::V2,
        Some(1) => KvVersion::V1,
        Some(n) => {
            c.problem("vault.kv_version", format!("`{n}` is not 1 or 2"));
            KvVersion::V2
        }
    };
    let mount = v.mount.unwrap_or_else(|| "secret".into());
    let mount = mount.trim_matches('/').to_string();
    if mount.is_empty() {
        c.problem("vault.mount", "must not be empty");
    }
    let ca_cert = v
        .ca_cert
        .map(|p| c.resolve(&p))
        .or_else(|| env.var("VAULT_CACERT").map(PathBuf::from));
    if let Some(ca) = &ca_cert
        && let Err(e) = std::fs::metadata(ca)
    {
        c.problem(
            "vault.ca_cert",
            format!("cannot read {}: {e}", ca.display()),
        );
    }
    let timeout = c.duration(
        "vault.timeout",
        v.timeout.as_deref(),
        Duration::from_secs(10),
    );
    let min_token_ttl = c.duration(
        "vault.min_token_ttl",
        v.min_token_ttl.as_deref(),
        Duration::from_secs(600),
    );
    let namespace = v.namespace.or_else(|| env.var("VAULT_NAMESPACE"));
    let destroy_old_versions = v.destroy_old_versions.unwrap_or(false);
    if destroy_old_versions && kv_version == KvVersion::V1 {
        c.problem(
            "vault.destroy_old_versions",
            "needs kv_version = 2 (KV v1 keeps no versions)",
        );
    }
    Some(VaultSettings {
        address: address?,
        auth: auth?,
        mount,
        kv_version,
        ca_cert,
        timeout,
        namespace,
        destroy_old_versions,
        min_token_ttl,
    })
}

/// A token file, an AppRole login, or $VAULT_TOKEN: exactly one way in.
fn vault_auth(
    c: &mut Checker,
    token_file: Option<PathBuf>,
    approle: Option<RawAppRole>,
    env: &dyn Environment,
) -> Option<VaultAuth> {
    match (token_file, approle) {
        (Some(_), Some(_)) => {
            c.problem(
                "vault.approle",
                "give either token_file or [vault.approle], not both",
            );
            None
        }
        (Some(f), None) => c
            .secret_file("vault.token_file", &f, Slot::VaultToken)
            .map(VaultAuth::Token),
        (None, Some(a)) => {
            if a.role_id.trim().is_empty() {
                c.problem("vault.approle.role_id", "must not be empty");
            }
            c.secret_file(
                "vault.approle.secret_id_file",
                &a.secret_id_file,
                Slot::VaultSecretId,
            )
            .map(|secret_id| VaultAuth::AppRole {
                mount: a.mount.unwrap_or_else(|| "approle".into()),
                role_id: a.role_id,
                secret_id,
            })
        }
        (None, None) => match env.var("VAULT_TOKEN") {
            Some(t) => Some(VaultAuth::Token(secret(t))),
            None => {
                c.problem(
                    "vault.token_file",
                    "no Vault credentials: set token_file, [vault.approle], or $VAULT_TOKEN",
                );
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fintoro.token"), "tok\n").unwrap();
        std::fs::write(dir.path().join("vault.token"), "hvs.x").unwrap();
        let p = dir.path().join("rekey.toml");
        std::fs::write(&p, toml).unwrap();
        Config::load_with(&p, &BTreeMap::new(), false)
    }

    const GOOD: &str = r#"
version = 1
state_dir = "state"

[vault]
address = "https://vault.example:8200"
token_file = "vault.token"
mount = "secret"
kv_version = 2

[[providers]]
name = "acme-fintoro"
kind = "fintoro"
base_url = "https://app.fintoro.sk/api/public/v1"
token_file = "fintoro.token"

[[policies]]
name = "monthly"
schedule = "0 3 1 * *"
timezone = "Europe/Bratislava"
confirm_timeout = "24h"
confirm_poll = "5m"
on_timeout = "hold"

[[subscriptions]]
provider = "acme-fintoro"
id = "801"
policy = "monthly"
vault_path = "webhooks/fintoro/801"
"#;

    #[test]
    fn the_documented_example_loads() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.subscriptions[0].name, "acme-fintoro/801");
        assert_eq!(c.providers[0].token.expose_secret(), "tok");
        assert_eq!(c.providers[0].rate_limit.count, 120);
        let StoreSettings::Vault(v) = &c.store else {
            panic!("vault expected")
        };
        assert_eq!(v.kv_version, KvVersion::V2);
        assert!(c.state_dir.ends_with("state") && c.state_dir.is_absolute());
        assert_eq!(c.policies[0].timing.confirm_poll, Duration::from_secs(300));
    }

    /// Loads `toml` from a fresh folder without its secret files, as the read-only
    /// commands do, and returns the folder to put them in.
    fn load_without_secrets(
        toml: &str,
    ) -> (tempfile::TempDir, Result<WithoutSecrets, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rekey.toml");
        std::fs::write(&p, toml).unwrap();
        let loaded = load_checked(&p, &BTreeMap::new(), false, Secrets::Defer)
            .map(|(config, files)| WithoutSecrets { config, files });
        (dir, loaded)
    }

    fn keys(e: &ConfigError) -> Vec<&str> {
        e.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn without_secrets_everything_else_is_checked_and_the_files_read_only_when_asked() {
        let (dir, loaded) = load_without_secrets(GOOD);
        let w = loaded.unwrap();
        assert_eq!(w.subscriptions[0].name, "acme-fintoro/801");
        assert_eq!(w.providers[0].token.expose_secret(), "");

        let err = w.with_secrets().unwrap_err();
        let full = Config::load_with(&w.source, &BTreeMap::new(), false).unwrap_err();
        assert_eq!(err.problems, full.problems, "the errors Config::load gives");
        assert_eq!(keys(&err), ["vault.token_file", "providers[0].token_file"]);
        assert!(err.problems[1].message.contains("cannot read"), "{err}");

        std::fs::write(dir.path().join("fintoro.token"), "tok\n").unwrap();
        std::fs::write(dir.path().join("vault.token"), "hvs.x").unwrap();
        let c = w.with_secrets().unwrap();
        assert_eq!(c.providers[0].token.expose_secret(), "tok");
        assert!(matches!(&c.store, StoreSettings::Vault(v)
            if matches!(&v.auth, VaultAuth::Token(t) if t.expose_secret() == "hvs.x")));

        let (_dir, loaded) =
            load_without_secrets(&GOOD.replace("kv_version = 2", "kv_version = 3"));
        assert_eq!(keys(&loaded.unwrap_err()), ["vault.kv_version"]);
    }

    #[test]
    fn an_approle_secret_id_and_a_monite_client_secret_are_read_when_asked() {
        let toml = GOOD
            .replace("token_file = \"vault.token\"\n", "")
            .replace(
                "kv_version = 2\n",
                "kv_version = 2\n[vault.approle]\nrole_id = \"r\"\nsecret_id_file = \"secret-id\"\n",
            )
            .replace(
                "[[policies]]",
                "[[providers]]\nname = \"m\"\nkind = \"monite\"\nbase_url = \"https://api.monite.com/v1\"\n\
                 client_id = \"c\"\nclient_secret_file = \"monite.secret\"\nentity_id = \"e\"\n\n[[policies]]",
            );
        let (dir, loaded) = load_without_secrets(&toml);
        let w = loaded.unwrap();
        for (f, v) in [
            ("fintoro.token", "tok"),
            ("secret-id", "sid"),
            ("monite.secret", "ms"),
        ] {
            std::fs::write(dir.path().join(f), v).unwrap();
        }
        let c = w.with_secrets().unwrap();
        assert_eq!(c.providers[1].token.expose_secret(), "ms");
        let StoreSettings::Vault(v) = &c.store else {
            panic!("vault expected")
        };
        assert!(
            matches!(&v.auth, VaultAuth::AppRole { secret_id, .. } if secret_id.expose_secret() == "sid")
        );
    }

    #[test]
    fn all_problems_are_reported_at_once_with_keys() {
        let bad = GOOD
            .replace("kv_version = 2", "kv_version = 3")
            .replace("confirm_poll = \"5m\"", "confirm_poll = \"soon\"")
            .replace("policy = \"monthly\"", "policy = \"weekly\"");
        let err = load(&bad).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "vault.kv_version",
                "policies[0].confirm_poll",
                "subscriptions[0].policy"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("rekey.toml"), "{err}");
    }

    #[test]
    fn environment_fallbacks_for_vault() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fintoro.token"), "tok").unwrap();
        let p = dir.path().join("rekey.toml");
        let toml = GOOD
            .replace("address = \"https://vault.example:8200\"\n", "")
            .replace("token_file = \"vault.token\"\n", "");
        std::fs::write(&p, toml).unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            "VAULT_ADDR".to_string(),
            "http://127.0.0.1:8200".to_string(),
        );
        env.insert("VAULT_TOKEN".to_string(), "root".to_string());
        let c = Config::load_with(&p, &env, false).unwrap();
        let StoreSettings::Vault(v) = &c.store else {
            panic!()
        };
        assert_eq!(v.address, "http://127.0.0.1:8200");
        assert!(matches!(&v.auth, VaultAuth::Token(t) if t.expose_secret() == "root"));
    }

    #[test]
    fn urls_need_https_except_to_loopback() {
        assert!(check_url("https://x.example/v1").is_ok());
        assert!(check_url("http://127.0.0.1:9/v1").is_ok());
        assert!(check_url("http://[::1]:9/v1").is_ok());
        assert!(check_url("http://localhost:9").is_ok());
        assert!(
            check_url("http://vault.internal:8200")
                .unwrap_err()
                .contains("https")
        );
        assert!(check_url("ftp://x").unwrap_err().contains("scheme"));
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn rate_limits_parse() {
        assert_eq!(
            RateLimit::parse("120/min").unwrap(),
            RateLimit {
                count: 120,
                per: Duration::from_secs(60)
            }
        );
        assert!(RateLimit::parse("0/s").is_err());
        assert!(RateLimit::parse("12").is_err());
        assert!(RateLimit::parse("5/fortnight").is_err());
    }

    #[test]
    fn daemon_and_start_rule_keys_are_validated_with_their_keys() {
        let good = GOOD.replace(
            "on_timeout = \"hold\"",
            "on_timeout = \"hold\"\nwindow = \"22:00-04:00\"\njitter = \"10m\"\ncatch_up = \"skip\"",
        ) + "\n[daemon]\nmax_concurrent = 2\ndrain_timeout = \"5s\"\n";
        let c = load(&good).unwrap();
        let p = &c.policies[0];
        assert_eq!(p.start.jitter, Duration::from_secs(600));
        assert_eq!(p.start.catch_up, CatchUp::Skip);
        assert_eq!(p.start.tz.name(), "Europe/Bratislava");
        assert!(p.start.window.is_some());
        assert_eq!(c.daemon.max_concurrent, 2);
        assert_eq!(c.daemon.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.providers[0].max_concurrent, None);
        assert_eq!(c.metrics_listen, None, "metrics are off by default");
        let c = load(&(GOOD.to_string() + "\n[metrics]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
        assert_eq!(c.metrics_listen.unwrap().port(), 9464);
        let err = load(&(GOOD.to_string() + "\n[metrics]\nlisten = \"localhost\"\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "metrics.listen", "{err}");

        let bad = GOOD
            .replace(
                "on_timeout = \"hold\"",
                "on_timeout = \"hold\"\nwindow = \"02:00-03:00\"\njitter = \"2h\"\ncatch_up = \"later\"",
            )
            .replace(
                "token_file = \"fintoro.token\"",
                "token_file = \"fintoro.token\"\nmax_concurrent = 0",
            )
            + "\n[daemon]\nmax_concurrent = 0\ndrain_timeout = \"soon\"\n";
        let err = load(&bad).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "providers[0].max_concurrent",
                "policies[0].jitter",
                "policies[0].catch_up",
                "daemon.max_concurrent",
                "daemon.drain_timeout"
            ],
            "{err}"
        );
        let err = load(&GOOD.replace(
            "on_timeout = \"hold\"",
            "on_timeout = \"hold\"\nwindow = \"2-5\"",
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].key, "policies[0].window", "{err}");
    }

    #[test]
    fn an_interval_policy_takes_a_timezone_only_for_its_window() {
        let every = GOOD.replace("schedule = \"0 3 1 * *\"", "every = \"30d\"");
        let err = load(&every).unwrap_err();
        assert_eq!(err.problems[0].key, "policies[0].timezone", "{err}");
        let c = load(&every.replace(
            "on_timeout = \"hold\"",
            "on_timeout = \"hold\"\nwindow = \"02:00-05:00\"",
        ))
        .unwrap();
        assert_eq!(c.policies[0].start.tz.name(), "Europe/Bratislava");
    }

    #[test]
    fn key_paths_read_like_toml() {
        let p: Vec<String> = ["providers", "0", "kind"].map(String::from).to_vec();
        assert_eq!(key_path(&p), "providers[0].kind");
    }

    const MIXED: &str = r#"
[[providers]]
name = "acme-monite"
kind = "monite"
base_url = "https://api.sandbox.monite.com/v1"
client_id = "5b4daced-6b9a-4707-83c6-dc1d6ad6ae08"
client_secret_file = "fintoro.token"
entity_id = "9d2b4c8f-2dfd-4a2e-b3d9-07c3b1c6a8a1"

[[providers]]
name = "acme-storno"
kind = "storno"
token_file = "fintoro.token"
company = "550e8400-e29b-41d4-a716-446655440000"
"#;

    #[test]
    fn fintoro_monite_and_storno_accounts_side_by_side() {
        let c = load(&format!("{GOOD}{MIXED}")).unwrap();
        let m = c.provider("acme-monite").unwrap();
        assert_eq!(m.kind, ProviderKind::Monite);
        assert_eq!(m.rate_limit, ProviderKind::Monite.default_rate_limit());
        assert_eq!(m.rate_limit.count, 30);
        assert_eq!(
            m.settings,
            KindSettings::Monite {
                client_id: "5b4daced-6b9a-4707-83c6-dc1d6ad6ae08".into(),
                entity_id: "9d2b4c8f-2dfd-4a2e-b3d9-07c3b1c6a8a1".into(),
                api_version: MONITE_DEFAULT_API_VERSION.into(),
            }
        );
        let st = c.provider("acme-storno").unwrap();
        assert_eq!(st.base_url, "https://api.storno.ro/api/v1");
        assert_eq!(
            st.settings,
            KindSettings::Storno {
                company: "550e8400-e29b-41d4-a716-446655440000".into()
            }
        );
        assert_eq!(st.rate_limit, ProviderKind::Storno.default_rate_limit());
    }

    #[test]
    fn keys_of_another_kind_are_refused_by_name() {
        let bad = MIXED
            .replace(
                "company = \"550e8400",
                "client_id = \"x\"\ncompany = \"550e8400",
            )
            .replace("entity_id = ", "company = \"c\"\nentity_id = ");
        let err = load(&format!("{GOOD}{bad}")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["providers[1].company", "providers[2].client_id"],
            "{err}"
        );
        assert!(err.to_string().contains("not a storno setting"), "{err}");
        let fintoro_with_company = GOOD.replace(
            "token_file = \"fintoro.token\"",
            "token_file = \"fintoro.token\"\ncompany = \"c\"",
        );
        let err = load(&fintoro_with_company).unwrap_err();
        assert_eq!(err.problems[0].key, "providers[0].company", "{err}");
    }

    #[test]
    fn monite_needs_its_base_url_credentials_and_entity() {
        let bare = "\n[[providers]]\nname = \"m\"\nkind = \"monite\"\napi_version = \"latest\"\n";
        let err = load(&format!("{GOOD}{bare}")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "providers[1].base_url",
                "providers[1].client_secret_file",
                "providers[1].client_id",
                "providers[1].entity_id",
                "providers[1].api_version",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("api.sandbox.monite.com"), "{err}");
        let storno = "\n[[providers]]\nname = \"s\"\nkind = \"storno\"\ntoken_file = \"fintoro.token\"\ncompany = \"a b\"\n";
        let err = load(&format!("{GOOD}{storno}")).unwrap_err();
        assert_eq!(err.problems[0].key, "providers[1].company", "{err}");
    }

    #[test]
    fn a_star_id_discovers_with_a_vault_path_template() {
        let star = GOOD.replace("id = \"801\"", "id = \"*\"").replace(
            "vault_path = \"webhooks/fintoro/801\"",
            "vault_path = \"webhooks/{kind}/{provider}/{id}\"",
        );
        let c = load(&star).unwrap();
        assert!(c.subscriptions.is_empty());
        let d = &c.discoveries[0];
        assert_eq!(
            d.subscription("9").vault_path,
            "webhooks/fintoro/acme-fintoro/9"
        );
        assert_eq!(d.subscription("9").name, "acme-fintoro/9");
        assert!(c.discovery_for("acme-fintoro/12").is_some());
        assert!(c.discovery_for("other/12").is_none());

        for (path, words) in [
            ("webhooks/all", "must contain `{id}`"),
            ("webhooks/{name}/{id}", "placeholder other than"),
        ] {
            let bad = star.replace("webhooks/{kind}/{provider}/{id}", path);
            let err = load(&bad).unwrap_err();
            assert_eq!(err.problems[0].key, "subscriptions[0].vault_path", "{err}");
            assert!(err.to_string().contains(words), "{err}");
        }
        let placeholder_without_star =
            GOOD.replace("webhooks/fintoro/801", "webhooks/fintoro/{id}");
        let err = load(&placeholder_without_star).unwrap_err();
        assert!(err.to_string().contains("only apply with id"), "{err}");
    }

    /// Two accounts found by discovery, each with its own template.
    fn two_discoveries(a: &str, b: &str) -> String {
        let second = "\n[[providers]]\nname = \"acme-eu\"\nkind = \"fintoro\"\n\
                      base_url = \"https://api.fintoro.example/api/public/v1\"\n\
                      token_file = \"fintoro.token\"\n";
        let star = |provider: &str, t: &str| {
            format!(
                "\n[[subscriptions]]\nprovider = \"{provider}\"\nid = \"*\"\n\
                 policy = \"monthly\"\nvault_path = \"{t}\"\n"
            )
        };
        format!(
            "{GOOD}{second}{}{}",
            star("acme-fintoro", a),
            star("acme-eu", b)
        )
    }

    #[test]
    fn two_discovery_templates_that_can_produce_one_path_are_refused() {
        for (a, b, path) in [
            ("webhooks/{id}", "webhooks/{id}", "webhooks/x"),
            (
                "webhooks/{kind}/{id}",
                "webhooks/{kind}/{id}",
                "webhooks/fintoro/x",
            ),
            // Every `acme-fintoro-…` path is also an `acme-…` one.
            ("w/{provider}-{id}", "w/acme-{id}", "w/acme-fintoro-x"),
            ("w/{id}.json", "w/{id}", "w/x.json"),
            ("w/a{id}", "w/{id}b", "w/ab"),
        ] {
            let err = load(&two_discoveries(a, b)).unwrap_err();
            let p = &err.problems[0];
            assert_eq!(p.key, "subscriptions[2].vault_path", "{err}");
            assert!(p.message.contains("subscriptions[1]"), "{err}");
            assert!(p.message.contains(&format!("`{path}`")), "{a} / {b}: {err}");
        }
        for (a, b) in [
            ("webhooks/{provider}/{id}", "webhooks/{provider}/{id}"),
            ("webhooks/{id}", "webhooks/eu/{id}"),
            ("w/{id}/a", "w/{id}/b"),
            ("w/eu/{id}", "w/{provider}/{id}"),
        ] {
            let c = load(&two_discoveries(a, b)).unwrap_or_else(|e| panic!("{a} / {b}: {e}"));
            assert_eq!(c.discoveries.len(), 2);
        }
    }

    #[test]
    fn a_postgres_state_takes_its_password_from_a_file_or_the_environment_never_the_url() {
        let with = |v: &str| GOOD.to_string() + &format!("\n[state]\n{v}\n");
        // The default lease (15s) grows to cover the default provider timeout (30s);
        // a lease the operator sets too short is refused.
        let c = load(&with("url = \"postgres://rekey@db.example:5432/rekey\"")).unwrap();
        assert_eq!(c.state.postgres.unwrap().lease, Duration::from_secs(35));
        let err = load(&with(
            "url = \"postgres://rekey@db.example:5432/rekey\"\nlease = \"15s\"",
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].key, "state.lease", "{err}");
        assert!(err.to_string().contains("timeout of 30s"), "{err}");
        let c = load(&with(
            "url = \"postgres://rekey@db.example:5432/rekey?sslmode=verify-full\"\nlease = \"40s\"",
        ))
        .unwrap();
        let pg = c.state.postgres.unwrap();
        assert_eq!(pg.url, "postgres://rekey@db.example:5432/rekey");
        assert!(pg.tls && pg.password.is_none());
        assert_eq!(
            (pg.cluster.as_str(), pg.lease, pg.renew_every),
            ("default", Duration::from_secs(40), Duration::from_secs(5))
        );
        let env = BTreeMap::from([("PGPASSWORD".to_string(), "from-env".to_string())]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fintoro.token"), "tok\n").unwrap();
        std::fs::write(dir.path().join("vault.token"), "hvs.x").unwrap();
        let p = dir.path().join("rekey.toml");
        std::fs::write(
            &p,
            with("url = \"postgres://rekey@127.0.0.1/rekey?sslmode=disable\"\nlease = \"1m\""),
        )
        .unwrap();
        let pg = Config::load_with(&p, &env, false)
            .unwrap()
            .state
            .postgres
            .unwrap();
        assert!(!pg.tls);
        assert_eq!(pg.password.unwrap().expose_secret(), "from-env");
        for (bad, key, says) in [
            (
                "url = \"postgres://rekey:hunter2@db.example/rekey\"",
                "state.url",
                "password_file",
            ),
            (
                "url = \"postgres://rekey@db.example/rekey?password=hunter2\"",
                "state.url",
                "password_file",
            ),
            (
                "url = \"postgres://rekey@db.example/rekey?sslmode=disable\"",
                "state.url",
                "loopback",
            ),
            (
                "url = \"postgres://rekey@db.example/rekey?sslmode=prefer\"",
                "state.url",
                "verify-full",
            ),
            (
                "url = \"mysql://rekey@db.example/rekey\"",
                "state.url",
                "postgres://",
            ),
            (
                "url = \"postgres://db.example/rekey\"",
                "state.url",
                "no user",
            ),
            ("cluster = \"a\"", "state.cluster", "state.url"),
            (
                "url = \"postgres://rekey@db.example/rekey\"\nlease = \"10s\"\nrenew_every = \"6s\"",
                "state.renew_every",
                "half",
            ),
            (
                "url = \"postgres://rekey@db.example/rekey\"\npassword_file = \"missing\"",
                "state.password_file",
                "cannot read",
            ),
        ] {
            let err = load(&with(bad)).unwrap_err();
            assert_eq!(err.problems[0].key, key, "{bad}: {err}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn history_retention_defaults_to_400_days_and_refuses_what_would_erase_the_audit_trail() {
        let c = load(GOOD).unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(c.state.history_retention, 400 * day);
        let with =
            |v: &str| GOOD.to_string() + &format!("\n[state]\nhistory_retention = \"{v}\"\n");
        assert_eq!(
            load(&with("30d")).unwrap().state.history_retention,
            30 * day
        );
        for bad in ["12h", "soon", "0d"] {
            let err = load(&with(bad)).unwrap_err();
            assert_eq!(
                err.problems[0].key, "state.history_retention",
                "{bad}: {err}"
            );
        }
        let err = load(&(GOOD.to_string() + "\n[state]\nretention = \"30d\"\n")).unwrap_err();
        assert!(err.to_string().contains("retention"), "{err}");
    }
}
