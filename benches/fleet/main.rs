//! The fleet benchmark: the real `rekey run` daemon rotating a whole fleet against a
//! Fintoro-like simulator with a fixed latency, each figure printed next to its floor
//! (or target) and the ratio. BENCHMARKS.md has the figures and how to read them.
//!
//!     cargo bench --bench fleet                       # default: 100 and 1,000; mix 10 × 100
//!     cargo bench --bench fleet -- --sizes 100,1000,10000 --mix 10x1000
//!
//! Flags: `--sizes N,N,…` (one account each), `--latency 50ms`, `--cap 16`
//! (`[daemon] max_concurrent`), `--mix AxN` (A accounts × N subscriptions with a rate
//! limit each; `--mix 0` skips it), `--rate 20` (the mix's requests per second per
//! account), `--tolerance 10ms` (how early a request may arrive at the provider's
//! token bucket), `--dir PATH` (where state lives; default: the system temp dir, a
//! real disk, since every step is an fsync), `--rekey PATH` (another rekey binary, to
//! compare builds in one sitting), `--give-up 300s` (stop a fleet that is not
//! confirming by then and report how far it got, for builds too slow to finish).
//!
//! Every subscription is new and due at once (`rotate_on_adopt = true`); a rotation
//! takes four provider calls to reach `confirming` (whoami and the subscription in the
//! preflight, the rotate call, the first confirmation check), so the floor of a
//! fleet of N is ⌈N / cap⌉ × 4 × latency. After the fleet is confirming the daemon is
//! stopped and started again on the same state: that start recovers N known
//! subscriptions, and the idle figures are taken on it.

mod daemon;
mod sim;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon::Daemon;
use sim::{Account, Sim};

/// Calls a rotation makes before it records `confirming`.
const CALLS: u32 = 4;
/// How long the idle daemon is watched for wake-ups.
const IDLE_SPAN: Duration = Duration::from_secs(5);

struct Args {
    sizes: Vec<usize>,
    latency: Duration,
    cap: usize,
    mix: Option<(usize, usize)>,
    rate: u32,
    tolerance: Duration,
    dir: Option<PathBuf>,
    give_up: Option<Duration>,
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![100, 1000],
        latency: Duration::from_millis(50),
        cap: 16,
        mix: Some((10, 100)),
        rate: 20,
        tolerance: Duration::from_millis(10),
        dir: None,
        give_up: None,
    };
    let mut it = std::env::args().skip(1);
    let duration = |v: String| humantime::parse_duration(&v).expect("a duration, e.g. 50ms");
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            // `cargo bench` passes this to every benchmark binary.
            "--bench" => {}
            "--sizes" => {
                a.sizes = value()
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse().expect("--sizes 100,1000"))
                    .collect()
            }
            "--latency" => a.latency = duration(value()),
            "--cap" => a.cap = value().parse().expect("--cap 16"),
            "--mix" => {
                let v = value();
                a.mix = (v != "0").then(|| {
                    let (x, n) = v.split_once('x').expect("--mix 10x1000");
                    (
                        x.parse().expect("accounts"),
                        n.parse().expect("per account"),
                    )
                })
            }
            "--rate" => a.rate = value().parse().expect("--rate 20"),
            "--tolerance" => a.tolerance = duration(value()),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--give-up" => a.give_up = Some(duration(value())),
            "--rekey" => {
                let _ = daemon::BIN.set(PathBuf::from(value()));
            }
            other => panic!("unknown flag {other}; see the top of benches/fleet/main.rs"),
        }
    }
    a
}

/// One account as the config and the simulator see it.
struct Spec {
    accounts: usize,
    per_account: usize,
    rate: Option<u32>,
}

impl Spec {
    fn total(&self) -> usize {
        self.accounts * self.per_account
    }
}

/// What one fleet run measured.
struct Figures {
    label: String,
    n: usize,
    /// Subscriptions confirming when the run ended (all of them unless it gave up).
    done: usize,
    floor: Duration,
    took: Duration,
    cpu: Duration,
    peak: usize,
    mean_in_flight: f64,
    requests: u64,
    over_limit: u64,
    adopt: Duration,
    recover: Duration,
    rss_mb: f64,
    wakeups: u64,
    status: Duration,
}

const FIRST_ID: u64 = 801;

fn write_config(dir: &Path, url: &str, spec: &Spec, cap: usize) -> PathBuf {
    let mut toml = format!(
        "version = 1\nstate_dir = \"state\"\n[file_store]\ndir = \"published\"\n\
         [log]\nlevel = \"warn\"\n[daemon]\nmax_concurrent = {cap}\n\
         [[policies]]\nname = \"p\"\nevery = \"30d\"\nrotate_on_adopt = true\n\
         confirm_poll = \"1h\"\nconfirm_timeout = \"24h\"\n"
    );
    for a in 0..spec.accounts {
        std::fs::write(dir.join(format!("token-{a}")), format!("bench-token-{a}")).expect("token");
        let rate = spec
            .rate
            .map_or("100000/s".to_string(), |r| format!("{r}/s"));
        toml.push_str(&format!(
            "[[providers]]\nname = \"f{a}\"\nkind = \"fintoro\"\nbase_url = \"{url}\"\n\
             token_file = \"token-{a}\"\nrate_limit = \"{rate}\"\n"
        ));
    }
    // Account by account, as an operator would list them.
    for a in 0..spec.accounts {
        for i in 0..spec.per_account {
            let id = FIRST_ID + (a * spec.per_account + i) as u64;
            toml.push_str(&format!(
                "[[subscriptions]]\nprovider = \"f{a}\"\nid = \"{id}\"\npolicy = \"p\"\n\
                 vault_path = \"webhooks/f{a}/{id}\"\n"
            ));
        }
    }
    let path = dir.join("rekey.toml");
    std::fs::write(&path, toml).expect("config");
    path
}

/// The provider-side floor: every round of `cap` rotations takes CALLS latencies;
/// with a rate limit, each account's calls beyond its burst at its rate.
fn floor(spec: &Spec, latency: Duration, cap: usize) -> Duration {
    let rounds = spec.total().div_ceil(cap) as u32;
    let by_latency = latency * CALLS * rounds;
    let by_rate = spec.rate.map_or(Duration::ZERO, |r| {
        let calls = (spec.per_account as u32 * CALLS).saturating_sub(r);
        Duration::from_secs_f64(f64::from(calls) / f64::from(r))
    });
    by_latency.max(by_rate)
}

fn run(rt: &tokio::runtime::Runtime, args: &Args, spec: &Spec) -> Figures {
    let n = spec.total();
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("rekey-fleet")
        .tempdir_in(base)
        .expect("temp dir");
    let accounts = (0..spec.accounts)
        .map(|a| Account {
            token: format!("bench-token-{a}"),
            ids: FIRST_ID + (a * spec.per_account) as u64
                ..FIRST_ID + ((a + 1) * spec.per_account) as u64,
            rate: spec.rate.map(f64::from),
        })
        .collect();
    let sim = rt.block_on(Sim::start(accounts, args.latency, args.tolerance));
    let config = write_config(dir.path(), &sim.base_url, spec, args.cap);
    let floor = floor(spec, args.latency, args.cap);

    sim.reset();
    let d = Daemon::start(&config, dir.path(), 0);
    let adopt = d.wait_ready(Duration::from_secs(120));
    let patience = args.give_up.unwrap_or(floor * 20 + Duration::from_secs(60));
    let (took, cpu, done) = loop {
        let seen = sim.seen();
        if seen.checked >= n {
            let at = seen.last_checked.expect("checked");
            break (at - d.started, d.cpu(), n);
        }
        if d.started.elapsed() >= patience {
            assert!(
                args.give_up.is_some(),
                "only {} of {n} confirming after {patience:?}; see {}",
                seen.checked,
                dir.path().display()
            );
            break (d.started.elapsed(), d.cpu(), seen.checked);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = sim.seen();
    let status = daemon::status_json(&config, 3);
    d.stop();
    if done == n {
        check_confirming(dir.path(), n);
    }
    assert_eq!(sim.rotated_twice(), 0, "a subscription was rotated twice");

    // Again on the same state: a start that recovers N known subscriptions, idle
    // (unless the fleet did not finish: then it carries on rotating).
    let d = Daemon::start(&config, dir.path(), 1);
    let recover = d.wait_ready(Duration::from_secs(120));
    let (mut rss_mb, mut wakeups) = (f64::NAN, 0);
    if done == n {
        std::thread::sleep(Duration::from_secs(2));
        let w0 = d.wakeups();
        std::thread::sleep(IDLE_SPAN);
        wakeups = d.wakeups() - w0;
        rss_mb = d.rss_mb();
    }
    d.stop();
    Figures {
        label: match spec.rate {
            None => format!("{n}"),
            Some(r) => format!("mix {} × {}, {r}/s each", spec.accounts, spec.per_account),
        },
        n,
        done,
        floor,
        took,
        cpu,
        peak: seen.peak_in_flight,
        mean_in_flight: seen.mean_in_flight,
        requests: seen.requests,
        over_limit: seen.over_limit,
        adopt,
        recover,
        rss_mb,
        wakeups,
        status,
    }
}

/// Every subscription's record says `confirming` (read after the daemon stopped).
fn check_confirming(dir: &Path, n: usize) {
    let db = rekey::state::StateDb::open_read_only(&dir.join("state"))
        .expect("state")
        .expect("a state database");
    let records = db.load_all().expect("records");
    let confirming = records
        .iter()
        .filter(|r| r.state.phase == rekey::rotation::Phase::Confirming)
        .count();
    assert_eq!(confirming, n, "subscriptions in confirming");
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn print(f: &Figures, cap: usize, spec: &Spec, args: &Args) {
    let per_rotation = f.cpu / f.done.max(1) as u32;
    if f.done < f.n {
        println!(
            "  GAVE UP: {} of {} confirming after {} (floor for all: {})",
            f.done,
            f.n,
            secs(f.took),
            secs(f.floor)
        );
    }
    println!(
        "  whole fleet to confirming (from spawn) {:>10}  floor {:>9}  {:.2} × (target ≤ 1.15 ×)",
        secs(f.took),
        secs(f.floor),
        ratio(f.took, f.floor)
    );
    println!(
        "  rekey CPU, whole run / per rotation    {:>10}  {:.2} ms",
        secs(f.cpu),
        per_rotation.as_secs_f64() * 1e3
    );
    println!(
        "  provider requests in flight            peak {} of cap {cap}; mean {:.1} ({:.2} of the cap)",
        f.peak,
        f.mean_in_flight,
        f.mean_in_flight / cap as f64
    );
    if let Some(r) = spec.rate {
        println!(
            "  rate limit {r}/s per account (tolerance {:?})  {} of {} requests over it (target 0)",
            args.tolerance, f.over_limit, f.requests
        );
    }
    println!(
        "  start to READY, adopting {:>6}       {:>10}  (target ≤ 1 s at 10,000)",
        f.n,
        secs(f.adopt)
    );
    println!(
        "  start to READY, recovering {:>6}     {:>10}  (target ≤ 0.3 s at 10,000)",
        f.n,
        secs(f.recover)
    );
    println!(
        "  idle RSS / wake-ups in {:?}             {:>7.1} MB  {} (target ≤ 30 MB)",
        IDLE_SPAN, f.rss_mb, f.wakeups
    );
    println!(
        "  status --json                          {:>10}  (target ≤ 0.2 s at 10,000)",
        secs(f.status)
    );
}

fn exponent(a: f64, b: f64, na: usize, nb: usize) -> f64 {
    (b / a).ln() / (nb as f64 / na as f64).ln()
}

fn summary(all: &[Figures], mix: Option<&Figures>, cap: usize) {
    println!(
        "\n| fleet | to confirming | floor | ratio | CPU/rotation | mean in flight | adopt | recover | idle RSS | wake-ups/5 s | status --json |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for f in all.iter().chain(mix) {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} × | {:.2} ms | {:.1} of {cap} | {:.3} s | {:.3} s | {:.1} MB | {} | {:.3} s |",
            if f.done < f.n {
                format!("{} (only {} done)", f.label, f.done)
            } else {
                f.label.clone()
            },
            f.took.as_secs_f64(),
            f.floor.as_secs_f64(),
            ratio(f.took, f.floor),
            (f.cpu / f.done.max(1) as u32).as_secs_f64() * 1e3,
            f.mean_in_flight,
            f.adopt.as_secs_f64(),
            f.recover.as_secs_f64(),
            f.rss_mb,
            f.wakeups,
            f.status.as_secs_f64()
        );
    }
    for w in all.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.done < a.n || b.done < b.n {
            continue;
        }
        println!(
            "growth {} → {}: whole-fleet CPU exponent {:.2} (target ≤ 1.1); wall {:.2}; status --json {:.2}; adopt {:.2}",
            a.n,
            b.n,
            exponent(a.cpu.as_secs_f64(), b.cpu.as_secs_f64(), a.n, b.n),
            exponent(a.took.as_secs_f64(), b.took.as_secs_f64(), a.n, b.n),
            exponent(a.status.as_secs_f64(), b.status.as_secs_f64(), a.n, b.n),
            exponent(a.adopt.as_secs_f64(), b.adopt.as_secs_f64(), a.n, b.n),
        );
    }
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let t0 = Instant::now();
    println!(
        "rekey fleet benchmark: {} at {:?} per provider call, max_concurrent = {}, file store\n",
        daemon::rekey().display(),
        args.latency,
        args.cap
    );
    let mut all = vec![];
    for &n in &args.sizes {
        let spec = Spec {
            accounts: 1,
            per_account: n,
            rate: None,
        };
        println!("fleet of {n}, one account");
        let f = run(&rt, &args, &spec);
        print(&f, args.cap, &spec, &args);
        all.push(f);
    }
    if let Some((accounts, per_account)) = args.mix {
        let spec = Spec {
            accounts,
            per_account,
            rate: Some(args.rate),
        };
        println!(
            "mix: {accounts} accounts × {per_account}, {}/s each (floor: the slower of latency and rate)",
            args.rate
        );
        let f = run(&rt, &args, &spec);
        print(&f, args.cap, &spec, &args);
        all.push(f);
    }
    let mut mix = None;
    if let Some(m) = all.last().filter(|m| m.label.starts_with("mix")) {
        println!(
            "{}: {} of {} requests over the rate limit",
            m.label, m.over_limit, m.requests
        );
        mix = all.pop();
    }
    summary(&all, mix.as_ref(), args.cap);
    println!("\n(benchmark took {:.0} s)", t0.elapsed().as_secs_f64());
}
