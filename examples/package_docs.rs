//! Man pages and shell completions for the package, generated from the clap
//! definitions in `src/cli.rs` so they never drift from `--help`:
//!
//! ```sh
//! cargo run --example package_docs -- OUT_DIR
//! ```
//!
//! writes `OUT_DIR/man/rekey.1` and one `rekey-<subcommand>.1` per subcommand, and
//! `OUT_DIR/completions/` with `rekey.bash`, `_rekey` (zsh) and `rekey.fish`.
//! `scripts/build-deb` runs it. It is an example rather than part of the binary so
//! the daemon carries no generators.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use rekey::cli::Cli;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: package_docs OUT_DIR");
        return ExitCode::from(rekey::exit::USAGE);
    };
    match generate(Path::new(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("package_docs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> anyhow::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    // Built as a whole first, so each subcommand knows its display name
    // (`rekey-run`); without its own help subcommand, which needs no page.
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let footer = format!("rekey {}", env!("CARGO_PKG_VERSION"));
    man_pages(cli, &man, &footer, &page_date()?)
        .with_context(|| format!("cannot write the man pages to {}", man.display()))?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "rekey", &completions)
            .with_context(|| format!("cannot write the {shell} completions"))?;
    }
    Ok(())
}

/// `rekey.1` and one `rekey-<subcommand>.1` per visible subcommand, each footed with
/// the package's name and version (clap_mangen's own would name only the subcommand).
fn man_pages(cmd: clap::Command, dir: &Path, footer: &str, date: &str) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub.clone(), dir, footer, date)?;
    }
    clap_mangen::Man::new(cmd)
        .date(date)
        .source(footer)
        .manual("rekey manual")
        .generate_to(dir)
        .map(drop)
}

/// The pages' date: `$SOURCE_DATE_EPOCH`'s day when set (reproducible builds;
/// scripts/build-deb sets it to the commit's time), else today. (Without one, roff
/// reads the version as the date and the manual's name as the version.)
fn page_date() -> anyhow::Result<String> {
    let when = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(secs) => secs
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .with_context(|| format!("SOURCE_DATE_EPOCH `{secs}` is not a time in seconds"))?,
        Err(_) => chrono::Utc::now(),
    };
    Ok(when.format("%Y-%m-%d").to_string())
}
