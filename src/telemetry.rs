//! Logging, in one place: `tracing` with a human format on a terminal and JSON
//! otherwise (or as `log.format` / `--log-format` says). `RUST_LOG` wins over
//! `log.level`. Secrets are `Secret`s and print as `***` whatever the format.
//!
//! One exception to "RUST_LOG wins": every dependency is capped at `warn` whatever
//! either says; only the worker's own code ([`OWN`]) logs at debug/trace. At
//! debug/trace the dependencies log values: tokio-postgres every statement's
//! parameters (session_keys), lapin and amq-protocol frames (command bodies and
//! broker credentials), rustls, hyper, h2 and reqwest handshakes, headers and
//! bodies (access tokens, signed query strings). The cap is a second, global filter
//! ([`cap`]) that no `RUST_LOG` directive can loosen; [`CAPPED`] lists the crates
//! known to log such values (the cap covers every other crate too, so a new
//! dependency cannot start leaking by being added).

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The targets that may log below `warn`: the worker's own modules.
pub const OWN: &str = "midas_worker";

/// Crates (target prefixes) known to log message bodies, SQL parameters or
/// credentials at debug/trace. They never log below `warn` (nor does any other
/// crate but [`OWN`]); the list is what the tests check by name.
pub const CAPPED: [&str; 16] = [
    "lapin",
    "amq_protocol",
    "tokio_postgres",
    "postgres_protocol",
    "postgres_types",
    "tokio_postgres_rustls",
    "rustls",
    "rustls_platform_verifier",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "tower",
    "tower_http",
    "axum",
    "rusqlite",
];

/// Install the global subscriber (once; later calls are no-ops). Logs go to stderr.
pub fn init(format: LogFormat, level: &str) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let _ = subscriber(json, level, rust_log.as_deref(), std::io::stderr).try_init();
}

/// The filter from `RUST_LOG` (when set and valid) or else `log.level`. lapin also
/// logs every broken socket at ERROR; the worker reports (and survives) those
/// itself, so lapin is off unless `RUST_LOG` names it (and then at most `warn`).
pub fn env_filter(level: &str, rust_log: Option<&str>) -> EnvFilter {
    rust_log
        .and_then(|r| EnvFilter::try_new(r).ok())
        .or_else(|| EnvFilter::try_new(format!("{level},lapin=off")).ok())
        .unwrap_or_else(|| EnvFilter::new("info,lapin=off"))
}

/// The cap: every target at `warn` (the [`CAPPED`] crates named, every other
/// crate by default), except the worker's own ([`OWN`]), which passes.
pub fn cap() -> Targets {
    CAPPED
        .iter()
        .fold(
            Targets::new().with_default(LevelFilter::WARN),
            |t, target| t.with_target(*target, LevelFilter::WARN),
        )
        .with_target(OWN, LevelFilter::TRACE)
}

/// The subscriber `init` installs, writing to `writer` (tests pass a buffer).
pub fn subscriber<W>(
    json: bool,
    level: &str,
    rust_log: Option<&str>,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter(level, rust_log))
        .with_writer(writer);
    if json {
        Box::new(builder.json().with_current_span(true).finish().with(cap()))
    } else {
        Box::new(builder.compact().finish().with(cap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the subscriber built from (`level`, `RUST_LOG`) prints for one event per
    /// target and level.
    fn logged(json: bool, level: &str, rust_log: Option<&str>) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = subscriber(json, level, rust_log, move || out.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::trace!(target: "lapin::channel", "lapin-trace frame session_key=SK");
            tracing::debug!(target: "lapin::io_loop", "lapin-debug frame");
            tracing::info!(target: "lapin", "lapin-info");
            tracing::warn!(target: "lapin::connection", "lapin-warn");
            tracing::trace!(target: "amq_protocol_types::parsing", "amq-trace");
            tracing::trace!(target: "amq_protocol::frame", "amq2-trace");
            tracing::trace!(target: "midas_worker::dispatch", "worker-trace");
            // (targets must be literals) the capped crates as their modules log
            macro_rules! deps {
                ($($t:literal),*) => {$(
                    tracing::trace!(target: $t, "dep-trace");
                    tracing::debug!(target: $t, "dep-debug");
                    tracing::info!(target: $t, "dep-info");
                )*};
            }
            deps!(
                "tokio_postgres::query",
                "tokio_postgres::prepare",
                "postgres_protocol::message",
                "tokio_postgres_rustls",
                "rustls::client::hs",
                "rustls_platform_verifier::verification",
                "hyper::proto::h1::io",
                "hyper_util::client::legacy::pool",
                "reqwest::connect",
                "h2::codec::framed_write",
                "tower::buffer",
                "axum::serve",
                "rusqlite",
                "postgres_types"
            );
            tracing::debug!(target: "tokio_postgres::query", "executing statement s0 with parameters: [\"SK\"]");
            tracing::trace!(target: "some_future_crate", "future-trace");
        });
        let v = buf.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&v).into_owned()
    }

    #[test]
    fn rust_log_trace_still_caps_lapin_at_warn() {
        for rust_log in [
            "trace",
            "lapin=trace,amq_protocol_types=trace,amq_protocol=trace,trace",
            "lapin::channel=trace,lapin::io_loop=debug,trace",
            "tokio_postgres=trace,postgres_protocol=trace,rustls=trace,hyper=trace,h2=trace,reqwest=trace,trace",
            "tokio_postgres::query=debug,hyper_util::client=trace,trace",
        ] {
            for json in [false, true] {
                let out = logged(json, "info", Some(rust_log));
                assert!(
                    out.contains("worker-trace"),
                    "RUST_LOG={rust_log} is in force"
                );
                assert!(out.contains("lapin-warn"), "warnings still shown");
                for hidden in [
                    "lapin-trace",
                    "SK",
                    "lapin-debug",
                    "lapin-info",
                    "amq-trace",
                    "amq2-trace",
                    "dep-trace",
                    "dep-debug",
                    "dep-info",
                    "future-trace",
                ] {
                    assert!(
                        !out.contains(hidden),
                        "RUST_LOG={rust_log}: {hidden} leaked:\n{out}"
                    );
                }
            }
        }
    }

    #[test]
    fn log_level_trace_without_rust_log_keeps_lapin_off() {
        let out = logged(false, "trace", None);
        assert!(out.contains("worker-trace"));
        assert!(!out.contains("lapin"), "{out}");
        assert!(!out.contains("amq-trace"), "{out}");
        assert!(!out.contains("dep-"), "{out}");
        assert!(!out.contains("SK"), "{out}");
    }
}
