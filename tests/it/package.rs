//! The Debian package that `scripts/build-deb` makes: each file in its place with its
//! mode, the control data and conffile, man pages and completions for every subcommand
//! of the clap definitions, maintainer scripts that are valid sh, and install, remove
//! and purge in a throwaway dpkg root. (Installing it under a real systemd is the
//! nspawn test's part.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use clap::CommandFactory;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

struct Built {
    deb: PathBuf,
    /// `dpkg-deb -R`: the files, and the control files under `DEBIAN/`.
    tree: PathBuf,
}

/// The package of the test build's binary (`--binary`: no release build), made once
/// per run under target/tmp, uncompressed to keep it quick.
fn package() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package");
        let _ = std::fs::remove_dir_all(&dir);
        let out = run(Command::new("bash")
            .arg(root().join("scripts/build-deb"))
            .args([
                "--profile",
                "debug",
                "--binary",
                env!("CARGO_BIN_EXE_rekey"),
            ])
            .args(["--compress", "none", "--out"])
            .arg(&dir)
            .env("CARGO", env!("CARGO")));
        let deb = PathBuf::from(out.lines().last().expect("build-deb prints the package"));
        let name = format!("rekey_{}_amd64.deb", env!("CARGO_PKG_VERSION"));
        assert_eq!(deb, dir.join(name), "build-deb's output");
        let tree = dir.join("tree");
        run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(&tree));
        Built { deb, tree }
    })
}

/// `dpkg-deb --contents`: each path (without the leading `.`) with its mode string
/// and owner.
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    listing
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').trim_end_matches('/');
            (path.to_string(), (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_package_holds_each_file_in_its_place_with_its_mode() {
    let built = package();
    let listed = contents(&built.deb);
    let src = root();
    let mut expected: BTreeMap<String, &str> = [
        ("/usr/bin/rekey", "-rwxr-xr-x"),
        ("/lib/systemd/system/rekey.service", "-rw-r--r--"),
        ("/lib/systemd/system/rekey-once.service", "-rw-r--r--"),
        ("/lib/systemd/system/rekey-once.timer", "-rw-r--r--"),
        ("/etc/rekey/rekey.toml", "-rw-r--r--"),
        ("/usr/share/doc/rekey/README.md", "-rw-r--r--"),
        ("/usr/share/doc/rekey/copyright", "-rw-r--r--"),
        ("/usr/share/doc/rekey/changelog.gz", "-rw-r--r--"),
        ("/usr/share/bash-completion/completions/rekey", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_rekey", "-rw-r--r--"),
        (
            "/usr/share/fish/vendor_completions.d/rekey.fish",
            "-rw-r--r--",
        ),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m))
    .collect();
    for doc in files_under(&src.join("docs")) {
        if doc.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let name = doc.file_name().unwrap().to_string_lossy();
        expected.insert(format!("/usr/share/doc/rekey/{name}"), "-rw-r--r--");
    }
    for file in files_under(&src.join("contrib")) {
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        expected.insert(format!("/usr/share/rekey/{rel}"), "-rw-r--r--");
    }
    for (path, mode) in &expected {
        let (got, _) = listed
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the package"));
        assert_eq!(got, mode, "{path}'s mode");
    }
    for (path, (mode, owner)) in &listed {
        assert_eq!(owner, "root/root", "{path}'s owner");
        let group_or_other_write = mode.as_bytes()[5] == b'w' || mode.as_bytes()[8] == b'w';
        assert!(
            !group_or_other_write,
            "{path} is writable by others: {mode}"
        );
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{path}'s mode");
        }
    }
    // Shipped as the repository has them: the units unchanged (another change may
    // edit them, never this script), the docs, and the dashboard and rules.
    let same = |shipped: &str, source: &Path| {
        let a = std::fs::read(built.tree.join(shipped.trim_start_matches('/'))).unwrap();
        assert!(
            a == std::fs::read(source).unwrap(),
            "{shipped} differs from {}",
            source.display()
        );
    };
    for unit in ["rekey.service", "rekey-once.service", "rekey-once.timer"] {
        same(
            &format!("/lib/systemd/system/{unit}"),
            &src.join("systemd").join(unit),
        );
    }
    same("/usr/share/doc/rekey/README.md", &src.join("README.md"));
    same(
        "/usr/share/rekey/contrib/prometheus/rekey.rules.yml",
        &src.join("contrib/prometheus/rekey.rules.yml"),
    );
}

#[test]
fn the_control_data_names_the_version_the_dependencies_and_the_conffile() {
    let built = package();
    let field = |name: &str| run(Command::new("dpkg-deb").arg("-f").arg(&built.deb).arg(name));
    assert_eq!(field("Package").trim(), "rekey");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture").trim(), "amd64");
    let depends = field("Depends");
    for needed in ["adduser", "libc6 (>= "] {
        assert!(
            depends.contains(needed),
            "Depends lacks {needed}: {depends}"
        );
    }
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&built.deb)
        .arg("conffiles"));
    assert_eq!(conffiles, "/etc/rekey/rekey.toml\n");
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&built.deb));
    for script in ["postinst", "prerm", "postrm"] {
        assert!(
            info.contains(&format!("*  {script} ")),
            "{script} missing or not executable:\n{info}"
        );
    }
    let changelog = run(Command::new("gzip")
        .arg("-dc")
        .arg(built.tree.join("usr/share/doc/rekey/changelog.gz")));
    let top = format!("rekey ({}) ", env!("CARGO_PKG_VERSION"));
    assert!(
        changelog.starts_with(&top),
        "changelog.gz starts with {:?}",
        changelog.lines().next()
    );
}

/// The shipped config parses and validates, and has nothing to rotate: every
/// provider, policy and subscription is commented out.
#[test]
fn the_shipped_config_is_valid_and_names_no_subscription() {
    let built = package();
    let shipped = std::fs::read_to_string(built.tree.join("etc/rekey/rekey.toml")).unwrap();
    for table in ["providers", "policies", "subscriptions"] {
        assert!(
            shipped.contains(&format!("# [[{table}]]")),
            "the example's [[{table}]] is gone"
        );
    }
    let live: Vec<&str> = shipped
        .lines()
        .filter(|l| l.trim_start().starts_with("[["))
        .collect();
    assert!(
        live.is_empty(),
        "uncommented entries in the shipped config: {live:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("vault-token");
    std::fs::write(&token, "t").unwrap();
    let here = shipped
        .replace(
            "\"/var/lib/rekey\"",
            &format!("{:?}", dir.path().join("state")),
        )
        .replace("\"/etc/rekey/vault-token\"", &format!("{token:?}"));
    let config = dir.path().join("rekey.toml");
    std::fs::write(&config, here).unwrap();
    let out = run(Command::new(built.tree.join("usr/bin/rekey"))
        .args(["check-config", "--config"])
        .arg(&config));
    assert!(out.contains(": ok"), "{out}");
}

/// `rekey` and each subcommand (recursively, as clap_mangen names its pages), from
/// the clap definitions: what the man pages and completions must cover.
fn commands() -> BTreeMap<String, String> {
    fn walk(cmd: &clap::Command, page: &str, out: &mut BTreeMap<String, String>) {
        out.insert(page.to_string(), cmd.get_name().to_string());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() != "help" {
                walk(sub, &format!("{page}-{}", sub.get_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&rekey::cli::Cli::command(), "rekey", &mut out);
    out
}

/// `word` in `text` with no name character either side.
fn mentions(text: &str, word: &str) -> bool {
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(name_char) && !after.is_some_and(name_char)
    })
}

#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let built = package();
    let commands = commands();
    assert!(
        commands.len() > 5,
        "the clap definitions lost their subcommands: {commands:?}"
    );
    let man1 = built.tree.join("usr/share/man/man1");
    let pages: BTreeSet<String> = std::fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = commands.keys().map(|p| format!("{p}.1.gz")).collect();
    assert_eq!(pages, expected, "one man page per command");
    let version = env!("CARGO_PKG_VERSION");
    for page in commands.keys() {
        let text = run(Command::new("gzip")
            .arg("-dc")
            .arg(man1.join(format!("{page}.1.gz"))));
        let title = format!(".TH {page} 1 ");
        assert!(text.contains(&title), "{page}.1 has no {title:?}");
        assert!(
            text.contains(&format!("\"rekey {version}\"")),
            "{page}.1 names no version"
        );
    }
    for file in [
        "usr/share/bash-completion/completions/rekey",
        "usr/share/zsh/vendor-completions/_rekey",
        "usr/share/fish/vendor_completions.d/rekey.fish",
    ] {
        let text = std::fs::read_to_string(built.tree.join(file)).unwrap();
        for name in commands.values() {
            assert!(mentions(&text, name), "{file} does not complete `{name}`");
        }
    }
}

#[test]
fn the_maintainer_scripts_are_valid_sh_and_shellcheck_clean() {
    let built = package();
    let scripts: Vec<PathBuf> = ["postinst", "prerm", "postrm"]
        .iter()
        .map(|s| built.tree.join("DEBIAN").join(s))
        .collect();
    for script in &scripts {
        run(Command::new("sh").arg("-n").arg(script));
    }
    run(Command::new("bash").arg(root().join("scripts/install-shellcheck")));
    run(Command::new("shellcheck")
        .args(&scripts)
        .arg(root().join("scripts/build-deb")));
}

/// dpkg acting on a throwaway root. Maintainer scripts run on the host with
/// DPKG_ROOT set (`--force-script-chrootless`); they honour it, as deb-systemd-helper
/// does. The root has no libc6 or adduser package, hence `--force-depends`.
fn dpkg(root: &Path, args: &[&str]) -> String {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
        ])
        .arg("--log=/dev/null")
        .args(args))
}

#[test]
fn it_installs_upgrades_removes_and_purges_in_a_throwaway_root() {
    let built = package();
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    let deb = built.deb.to_str().unwrap();
    let wants = r.join("etc/systemd/system/multi-user.target.wants/rekey.service");

    dpkg(r, &["--install", deb]);
    let status = dpkg(r, &["--status", "rekey"]);
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("Conffiles:\n /etc/rekey/rekey.toml "),
        "{status}"
    );
    assert!(r.join("usr/bin/rekey").is_file());
    // rekey.service is enabled on first install; the timer (its alternative) is not.
    let link = std::fs::read_link(&wants).expect("rekey.service enabled");
    assert_eq!(link, Path::new("/lib/systemd/system/rekey.service"));
    assert!(
        !r.join("etc/systemd/system/timers.target.wants/rekey-once.timer")
            .exists()
    );

    // The operator configures rekey, disables the daemon, runs it a while.
    let config = r.join("etc/rekey/rekey.toml");
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("# edited by the operator\n");
    std::fs::write(&config, &edited).unwrap();
    std::fs::write(r.join("etc/rekey/vault-token"), "t").unwrap();
    std::fs::remove_file(&wants).unwrap(); // what `systemctl disable rekey` does
    std::fs::create_dir_all(r.join("var/lib/rekey")).unwrap();
    std::fs::write(r.join("var/lib/rekey/state.db"), "state").unwrap();

    // An upgrade (here: the same version again) keeps the edit and the choice.
    dpkg(r, &["--install", deb]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(
        !wants.exists(),
        "the upgrade enabled the disabled rekey.service again"
    );

    // remove: program and units go; config, tokens and state stay.
    dpkg(r, &["--remove", "rekey"]);
    assert!(!r.join("usr/bin/rekey").exists());
    assert!(!r.join("lib/systemd/system/rekey.service").exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(r.join("etc/rekey/vault-token").exists());
    assert!(r.join("var/lib/rekey/state.db").exists());
    let status = dpkg(r, &["--status", "rekey"]);
    assert!(
        status.contains("Status: deinstall ok config-files"),
        "{status}"
    );

    // purge: nothing of rekey is left.
    dpkg(r, &["--purge", "rekey"]);
    for gone in [
        "etc/rekey",
        "var/lib/rekey",
        "var/lib/systemd/deb-systemd-helper-enabled/rekey.service.dsh-also",
    ] {
        assert!(!r.join(gone).exists(), "{gone} survived the purge");
    }
    let left: Vec<PathBuf> = files_under(&r.join("etc"))
        .into_iter()
        .chain(files_under(&r.join("var/lib/systemd")))
        .filter(|p| p.to_string_lossy().contains("rekey"))
        .collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
    let listed = Command::new("dpkg")
        .arg(format!("--root={}", r.display()))
        .args(["--status", "rekey"])
        .output()
        .unwrap();
    assert!(
        !listed.status.success(),
        "dpkg still knows rekey after the purge"
    );
}
