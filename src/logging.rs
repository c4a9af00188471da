//! Where log lines go: journald's native protocol under systemd, else stderr as text
//! or JSON, per `[log] format`. Set up once per process by whichever command runs
//! (`rekey run`, `rekey sandbox`, …), not by the modules that log.

mod journald;

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};
use crate::journal::{Line, Prioritized};
use journald::Journald;

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// journald's native protocol, with every event's fields ([`journald`]).
    Journald,
    Text,
    Json,
    /// stderr is the journal stream: lines prefixed with their priority.
    JournalText,
    JournalJson,
}

/// The sink for `format` when stderr is (`journal`) or is not the journal stream;
/// `auto` is journald's protocol under systemd and text elsewhere.
fn sink(format: LogFormat, journal: bool) -> Sink {
    match (format, journal) {
        (LogFormat::Journald, _) | (LogFormat::Auto, true) => Sink::Journald,
        (LogFormat::Json, true) => Sink::JournalJson,
        (LogFormat::Json, false) => Sink::Json,
        (LogFormat::Text, true) => Sink::JournalText,
        (LogFormat::Text | LogFormat::Auto, false) => Sink::Text,
    }
}

/// Sets up logging per the config; `REKEY_LOG` overrides the level. When the journal's
/// socket is not usable, logs to stderr instead (said in the log when `journald` was
/// asked for explicitly).
pub fn init(config: &Config) {
    let journal = crate::journal::connected();
    let mut sink = sink(config.log.format, journal);
    let mut unusable = None;
    if sink == Sink::Journald {
        match Journald::open(Path::new(journald::SOCKET)) {
            Ok(j) => {
                let _ = tracing_subscriber::registry()
                    .with(filter(config))
                    .with(j)
                    .try_init();
                return;
            }
            Err(e) => {
                unusable = Some(e);
                sink = if journal {
                    Sink::JournalText
                } else {
                    Sink::Text
                };
            }
        }
    }
    init_stderr(filter(config), sink, journal);
    if let Some(e) = unusable
        && config.log.format == LogFormat::Journald
    {
        tracing::warn!(
            socket = journald::SOCKET,
            error = %e,
            "[log] format = \"journald\", but the journal's socket is not usable; logging to stderr"
        );
    }
}

fn filter(config: &Config) -> EnvFilter {
    let filter = std::env::var("REKEY_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // The PostgreSQL driver logs statement parameters at debug level, and a minted
    // secret is one: never below info, whatever the level asked for.
    match "tokio_postgres=info".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// Colours only on a terminal; to the journal stream, lines suited to the journal
/// ([`crate::journal`]).
fn init_stderr(filter: EnvFilter, sink: Sink, journal: bool) {
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal())
        .with_target(false);
    let format = tracing_subscriber::fmt::format()
        .with_target(false)
        .with_ansi(false);
    let _ = match sink {
        Sink::Json => builder.json().try_init(),
        Sink::Text | Sink::Journald => builder.try_init(),
        Sink::JournalJson => builder
            .event_format(Prioritized(format.json()))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .try_init(),
        Sink::JournalText => builder.event_format(Line).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_journald_under_systemd_and_text_elsewhere() {
        use LogFormat::*;
        assert_eq!(sink(Auto, true), Sink::Journald);
        assert_eq!(sink(Auto, false), Sink::Text);
        assert_eq!(sink(Journald, false), Sink::Journald);
        assert_eq!(sink(Text, true), Sink::JournalText);
        assert_eq!(sink(Text, false), Sink::Text);
        assert_eq!(sink(Json, true), Sink::JournalJson);
        assert_eq!(sink(Json, false), Sink::Json);
    }
}
