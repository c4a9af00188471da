//! What a seed chooses: the fleet, the policies, and the year's events (faults,
//! outages, crashes, reloads, drift, operator requests), all in advance, so the same
//! seed always plays the same year.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey::config::ProviderKind;

use super::world::{Faults, StoreMode};

#[derive(Debug, Clone)]
pub struct AccountPlan {
    /// The world's name for the account (stable across renames in rekey's config).
    pub world: String,
    /// The name rekey's config gives it now.
    pub name: String,
    pub kind: ProviderKind,
    pub discovery: bool,
    pub limit: (u32, Duration),
    pub latency: (u64, u64),
    pub skew_ms: i64,
}

#[derive(Debug, Clone)]
pub struct SubPlan {
    pub account: String,
    pub id: String,
    pub policy: String,
    /// Where rekey's config says to publish (receivers read the world's path).
    pub vault_path: String,
    pub interval: Duration,
    pub slow: bool,
    pub lag: Duration,
    /// In rekey's config now (explicit entries; discovery lists the rest).
    pub configured: bool,
}

#[derive(Debug, Clone)]
pub struct PolicyPlan {
    pub name: String,
    pub toml: String,
}

#[derive(Debug, Clone)]
pub enum Event {
    ProviderFaults {
        account: String,
        faults: Faults,
    },
    Store(StoreMode),
    Skew {
        account: String,
        ms: i64,
    },
    /// rekey's process dies here and starts again after the downtime.
    Crash {
        downtime: Duration,
    },
    /// Someone rotates a Storno subscription outside rekey.
    Drift {
        account: String,
        id: String,
    },
    /// An operator asks for a rotation (`rekey rotate`).
    Request {
        sub: usize,
    },
    /// The provider sends a delivery now, signed with the live secret, that takes
    /// `took` to complete: placed just before a rotation, it completes after the
    /// publication while signed with the old secret.
    SlowDelivery {
        sub: usize,
        took: Duration,
    },
    /// The config changes and rekey reloads it.
    Reload(Change),
}

#[derive(Debug, Clone)]
pub enum Change {
    RemoveSub(usize),
    AddSub(usize),
    RenameAccount(usize),
    /// A new `vault_path` (drawn only by the regression scenario: receivers would
    /// have to move with it, which is the operator's migration).
    MovePath(usize),
    SwitchPolicy(usize),
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub start: DateTime<Utc>,
    pub days: u32,
    pub accounts: Vec<AccountPlan>,
    pub policies: Vec<PolicyPlan>,
    pub subs: Vec<SubPlan>,
    pub events: Vec<(DateTime<Utc>, Event)>,
    pub max_concurrent: usize,
    /// `[daemon] drift_check`.
    pub drift_check: &'static str,
}

/// The largest provider clock skew the scenarios draw (`REKEY_SIM_SKEW_MS`, default
/// ±5 s: evidence must neither count a delivery from before the publication that a
/// provider clock running ahead stamps later, nor miss one a clock running behind
/// stamps earlier).
pub fn max_skew_ms() -> i64 {
    std::env::var("REKEY_SIM_SKEW_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(5_000)
}

const ZONES: [&str; 4] = [
    "Europe/Bratislava",
    "America/New_York",
    "Australia/Sydney",
    "UTC",
];

fn policy(rng: &mut StdRng, i: usize) -> PolicyPlan {
    let zone = ZONES[rng.random_range(0..ZONES.len())];
    let schedule = match rng.random_range(0..4) {
        // Cron times that fall into DST gaps and overlaps in some zones.
        0 => format!(
            "schedule = \"30 2 * * {}\"\ntimezone = \"{zone}\"",
            rng.random_range(0..7)
        ),
        1 => format!(
            "schedule = \"0 3 {} * *\"\ntimezone = \"{zone}\"",
            rng.random_range(1..29)
        ),
        2 => format!("every = \"{}d\"", rng.random_range(3..40)),
        _ => format!("every = \"{}h\"", rng.random_range(36..400)),
    };
    let mut extra = String::new();
    if rng.random_bool(0.3) {
        extra.push_str("window = \"01:00-05:00\"\n");
        if !schedule.contains("timezone") {
            extra.push_str(&format!("timezone = \"{zone}\"\n"));
        }
    }
    if rng.random_bool(0.4) {
        extra.push_str(&format!("jitter = \"{}m\"\n", rng.random_range(1..120)));
    }
    if rng.random_bool(0.3) {
        extra.push_str("catch_up = \"skip\"\n");
    }
    let on_timeout = if rng.random_bool(0.2) {
        "retire"
    } else {
        "hold"
    };
    if rng.random_bool(0.5) {
        extra.push_str(&format!("fail_after = \"{}m\"\n", rng.random_range(5..40)));
    }
    if rng.random_bool(0.2) {
        extra.push_str(&format!(
            "fail_after_failures = {}\n",
            rng.random_range(3..20)
        ));
    }
    let toml = format!(
        "[[policies]]\nname = \"p{i}\"\n{schedule}\n{extra}confirm_timeout = \"{}h\"\nconfirm_poll = \"{}m\"\n\
         on_timeout = \"{on_timeout}\"\nrotate_on_adopt = {}\nretry_base = \"30s\"\nretry_max = \"{}m\"\n",
        rng.random_range(6..49),
        rng.random_range(2..30),
        rng.random_bool(0.3),
        rng.random_range(5..61),
    );
    PolicyPlan {
        name: format!("p{i}"),
        toml,
    }
}

fn sub_id(rng: &mut StdRng, kind: ProviderKind, n: usize) -> String {
    match kind {
        ProviderKind::Fintoro => (800 + n).to_string(),
        _ => uuid::Uuid::from_u64_pair(rng.random(), rng.random()).to_string(),
    }
}

impl Scenario {
    pub fn generate(seed: u64, days: u32) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5ce7_a210);
        // Years that start before a spring DST change and cross both.
        let start = DateTime::parse_from_rfc3339("2027-01-05T09:00:00Z")
            .expect("valid")
            .with_timezone(&Utc)
            + chrono::Duration::hours(rng.random_range(0..24 * 60));
        let kinds = [
            ProviderKind::Fintoro,
            ProviderKind::Monite,
            ProviderKind::Storno,
        ];
        let n_accounts = rng.random_range(1..=4);
        let mut accounts = Vec::new();
        for a in 0..n_accounts {
            let kind = kinds[if a < 3 {
                (a + seed as usize) % 3
            } else {
                rng.random_range(0..3)
            }];
            let name = format!("{}-{a}", kind.as_str());
            let per_min = [20u32, 60, 120][rng.random_range(0..3)];
            accounts.push(AccountPlan {
                world: name.clone(),
                name,
                kind,
                discovery: rng.random_bool(0.3),
                limit: (per_min, Duration::from_secs(60)),
                latency: (rng.random_range(5..60), rng.random_range(60..800)),
                skew_ms: 0,
            });
        }
        let policies: Vec<PolicyPlan> = (0..rng.random_range(1..=3))
            .map(|i| policy(&mut rng, i))
            .collect();
        let mut subs = Vec::new();
        for acct in &accounts {
            for n in 0..rng.random_range(2..=10) {
                let id = sub_id(&mut rng, acct.kind, n);
                subs.push(SubPlan {
                    account: acct.world.clone(),
                    vault_path: format!("webhooks/{}/{id}", acct.name),
                    id,
                    policy: policies[rng.random_range(0..policies.len())].name.clone(),
                    // A few busy subscriptions, whose deliveries are in flight whenever
                    // a rotation happens; the rest between two minutes and six hours.
                    interval: if rng.random_bool(0.15) {
                        Duration::from_secs(rng.random_range(20..120))
                    } else {
                        Duration::from_secs(rng.random_range(120..6 * 3600))
                    },
                    slow: rng.random_bool(0.3),
                    lag: Duration::from_secs(rng.random_range(0..600)),
                    configured: true,
                });
            }
        }
        // Discovery accounts: every listed subscription takes the first policy.
        for s in &mut subs {
            if accounts.iter().any(|a| a.world == s.account && a.discovery) {
                s.policy = policies[0].name.clone();
            }
        }
        let quiet = Duration::from_secs(40 * 86_400);
        let active = chrono::Duration::days(i64::from(days))
            - chrono::Duration::from_std(quiet).expect("small");
        let mut events = Vec::new();
        let at = |rng: &mut StdRng| {
            start + chrono::Duration::seconds(rng.random_range(0..active.num_seconds().max(1)))
        };
        for _ in 0..rng.random_range(0..12) {
            let t = at(&mut rng);
            let a = &accounts[rng.random_range(0..accounts.len())];
            let faults = Faults {
                rate: [0.05, 0.2, 0.5, 1.0][rng.random_range(0..4)],
                throttle: rng.random_bool(0.5),
                lose_answers: rng.random_bool(0.5),
            };
            let hours = rng.random_range(1..72);
            events.push((
                t,
                Event::ProviderFaults {
                    account: a.world.clone(),
                    faults,
                },
            ));
            events.push((
                t + chrono::Duration::hours(hours),
                Event::ProviderFaults {
                    account: a.world.clone(),
                    faults: Faults::default(),
                },
            ));
        }
        for _ in 0..rng.random_range(0..6) {
            let t = at(&mut rng);
            let mode =
                [StoreMode::Down, StoreMode::Sealed, StoreMode::Forbidden][rng.random_range(0..3)];
            events.push((t, Event::Store(mode)));
            events.push((
                t + chrono::Duration::minutes(rng.random_range(1..48 * 60)),
                Event::Store(StoreMode::Up),
            ));
        }
        for _ in 0..rng.random_range(0..10) {
            events.push((
                at(&mut rng),
                Event::Crash {
                    downtime: Duration::from_secs(rng.random_range(0..4 * 3600)),
                },
            ));
        }
        for a in accounts.iter().filter(|a| a.kind == ProviderKind::Storno) {
            for _ in 0..rng.random_range(0..3) {
                let candidates: Vec<&SubPlan> =
                    subs.iter().filter(|s| s.account == a.world).collect();
                let s = candidates[rng.random_range(0..candidates.len())];
                events.push((
                    at(&mut rng),
                    Event::Drift {
                        account: a.world.clone(),
                        id: s.id.clone(),
                    },
                ));
            }
        }
        // Provider clocks off by up to `max_skew_ms` (each account's offset, and a step).
        let max_skew = max_skew_ms();
        if max_skew > 0 {
            for a in &accounts {
                let ms = rng.random_range(-max_skew..=max_skew);
                events.push((
                    start,
                    Event::Skew {
                        account: a.world.clone(),
                        ms,
                    },
                ));
                if rng.random_bool(0.5) {
                    let step = rng.random_range(-max_skew..=max_skew);
                    events.push((
                        at(&mut rng),
                        Event::Skew {
                            account: a.world.clone(),
                            ms: step,
                        },
                    ));
                }
            }
        }
        for _ in 0..rng.random_range(0..6) {
            let t = at(&mut rng);
            let sub = rng.random_range(0..subs.len());
            // Half of the requested rotations race a slow delivery signed just before.
            if rng.random_bool(0.5) {
                events.push((
                    t - chrono::Duration::milliseconds(rng.random_range(50..2_000)),
                    Event::SlowDelivery {
                        sub,
                        took: Duration::from_millis(rng.random_range(2_000..10_000)),
                    },
                ));
            }
            events.push((t, Event::Request { sub }));
        }
        for _ in 0..rng.random_range(0..5) {
            // (A moved `vault_path` is not drawn: receivers would have to move with it,
            // which is the operator's migration, not rekey's; a regression scenario
            // covers the rotation in flight when it moves.)
            let change = match rng.random_range(0..4) {
                0 => Change::RemoveSub(rng.random_range(0..subs.len())),
                1 => Change::AddSub(rng.random_range(0..subs.len())),
                2 => Change::RenameAccount(rng.random_range(0..accounts.len())),
                _ => Change::SwitchPolicy(rng.random_range(0..subs.len())),
            };
            events.push((at(&mut rng), Event::Reload(change)));
        }
        events.sort_by_key(|(t, _)| *t);
        Scenario {
            seed,
            start,
            days,
            accounts,
            policies,
            subs,
            events,
            max_concurrent: rng.random_range(1..=8),
            drift_check: ["15m", "1h", "6h"][rng.random_range(0..3)],
        }
    }

    /// rekey's config for the scenario as it stands.
    pub fn config_toml(&self, state_dir: &str, secrets_dir: &str) -> String {
        let mut out = format!(
            "version = 1\nstate_dir = \"{state_dir}\"\n\n[file_store]\ndir = \"{secrets_dir}/published\"\n\n\
             [log]\nlevel = \"warn\"\n\n[daemon]\nmax_concurrent = {}\ndrift_check = \"{}\"\n\n",
            self.max_concurrent, self.drift_check
        );
        for (i, a) in self.accounts.iter().enumerate() {
            let creds = match a.kind {
                ProviderKind::Monite => format!(
                    "client_id = \"cid\"\nclient_secret_file = \"{secrets_dir}/token\"\nentity_id = \"{}\"\n",
                    uuid::Uuid::from_u64_pair(7, i as u64)
                ),
                ProviderKind::Storno => {
                    format!("token_file = \"{secrets_dir}/token\"\ncompany = \"c{i}\"\n")
                }
                ProviderKind::Fintoro => format!("token_file = \"{secrets_dir}/token\"\n"),
            };
            out.push_str(&format!(
                "[[providers]]\nname = \"{}\"\nkind = \"{}\"\nbase_url = \"http://127.0.0.1:{}\"\n{creds}\
                 rate_limit = \"{}/min\"\ntimeout = \"10s\"\n\n",
                a.name,
                a.kind.as_str(),
                9000 + i,
                a.limit.0
            ));
        }
        for p in &self.policies {
            out.push_str(&p.toml);
            out.push('\n');
        }
        for a in self.accounts.iter().filter(|a| a.discovery) {
            out.push_str(&format!(
                "[[subscriptions]]\nprovider = \"{}\"\nid = \"*\"\npolicy = \"{}\"\nvault_path = \"webhooks/{{provider}}/{{id}}\"\n\n",
                a.name, self.policies[0].name
            ));
        }
        for s in self.subs.iter().filter(|s| s.configured) {
            let a = self.account(&s.account);
            if a.discovery {
                continue;
            }
            out.push_str(&format!(
                "[[subscriptions]]\nprovider = \"{}\"\nid = \"{}\"\npolicy = \"{}\"\nvault_path = \"{}\"\n\n",
                a.name, s.id, s.policy, s.vault_path
            ));
        }
        out
    }

    pub fn account(&self, world: &str) -> &AccountPlan {
        self.accounts
            .iter()
            .find(|a| a.world == world)
            .expect("account in scenario")
    }

    /// rekey's name for a subscription now.
    pub fn name_of(&self, s: &SubPlan) -> String {
        format!("{}/{}", self.account(&s.account).name, s.id)
    }

    /// Applies a config change; returns what it did, for the log.
    pub fn apply(&mut self, change: &Change) -> String {
        match *change {
            Change::RemoveSub(i) => {
                self.subs[i].configured = false;
                format!("removed {} from the config", self.name_of(&self.subs[i]))
            }
            Change::AddSub(i) => {
                self.subs[i].configured = true;
                format!("(re)added {}", self.name_of(&self.subs[i]))
            }
            Change::RenameAccount(i) => {
                let old = self.accounts[i].name.clone();
                self.accounts[i].name = format!("{old}x");
                format!("renamed provider {old} to {}", self.accounts[i].name)
            }
            Change::MovePath(i) => {
                self.subs[i].vault_path = format!("{}-moved", self.subs[i].vault_path);
                format!(
                    "moved {} to {}",
                    self.name_of(&self.subs[i]),
                    self.subs[i].vault_path
                )
            }
            Change::SwitchPolicy(i) => {
                let n = self.policies.len();
                let cur = self
                    .policies
                    .iter()
                    .position(|p| p.name == self.subs[i].policy)
                    .unwrap_or(0);
                self.subs[i].policy = self.policies[(cur + 1) % n].name.clone();
                format!(
                    "{} now follows {}",
                    self.name_of(&self.subs[i]),
                    self.subs[i].policy
                )
            }
        }
    }
}
