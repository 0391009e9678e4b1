//! Logging, in one place: `tracing` with a human format on a terminal and JSON
//! otherwise (or as `log.format` / `--log-format` says). `RUST_LOG` wins over
//! `log.level`. Secrets are `Secret`s and print as `***` whatever the format.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber (once; later calls are no-ops). Logs go to stderr.
pub fn init(format: LogFormat, level: &str) {
    // lapin logs every broken socket at ERROR; the worker reports (and survives)
    // those itself, so lapin is quiet unless RUST_LOG asks for it.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},lapin=off")))
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.compact().try_init()
    };
}
