//! Where log lines go: stderr, as text or JSON per the config. Set up once per process
//! by whichever command runs (`rekey run`, `rekey sandbox`, …), not by the modules that log.

use crate::config::{Config, LogFormat};

/// Logs to stderr, as text or JSON per the config; `REKEY_LOG` overrides the level.
/// Colours only on a terminal; under systemd, lines suited to the journal
/// ([`crate::journal`]).
pub fn init(config: &Config) {
    use std::io::IsTerminal;
    let filter = std::env::var("REKEY_LOG").unwrap_or_else(|_| config.log.level.clone());
    let mut filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The PostgreSQL driver logs statement parameters at debug level, and a minted
    // secret is one: never below info, whatever the level asked for.
    if let Ok(quiet) = "tokio_postgres=info".parse() {
        filter = filter.add_directive(quiet);
    }
    let journal = crate::journal::connected();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal())
        .with_target(false);
    let format = tracing_subscriber::fmt::format()
        .with_target(false)
        .with_ansi(false);
    let _ = match (config.log.format, journal) {
        (LogFormat::Json, false) => builder.json().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Json, true) => builder
            .event_format(crate::journal::Prioritized(format.json()))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .try_init(),
        (LogFormat::Text, true) => builder
            .event_format(crate::journal::Prioritized(format.without_time()))
            .try_init(),
    };
}
