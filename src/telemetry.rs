//! Logging, in one place: `tracing` with a human format on a terminal and JSON
//! otherwise (or as `log.format` / `--log-format` says). `RUST_LOG` wins over
//! `log.level`. Secrets are `Secret`s and print as `***` whatever the format.
//!
//! One exception to "RUST_LOG wins": the AMQP client (lapin and the amq-protocol
//! crates) is capped at `warn` whatever either says, because at debug/trace it logs
//! frames, and frames carry command bodies (with session_keys) and broker
//! credentials. The cap is a second, global filter ([`CAPPED`]) that no `RUST_LOG`
//! directive can loosen.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Crates (target prefixes) that never log below `warn`: their debug/trace output
/// contains message bodies and credentials.
pub const CAPPED: [&str; 2] = ["lapin", "amq_protocol"];

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

/// The cap of [`CAPPED`] crates at `warn`; everything else passes.
pub fn cap() -> Targets {
    CAPPED.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::WARN),
    )
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
    }
}
