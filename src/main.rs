//! The `midas-worker` command line (CONTRACT.md, "Command line"). Errors become one
//! line on stderr and an exit status: 0 success, 1 failure, 2 bad usage or config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use midas_worker::config::{self, LogFormat, Settings};
use midas_worker::{audit, bench, demo, enqueue, sim, telemetry, worker};

#[derive(Parser, Debug)]
#[command(
    name = "midas-worker",
    version,
    about = "RabbitMQ → SQLite outbox → WeChat Midas, with nothing lost and nothing charged twice"
)]
struct Cli {
    /// Config file (default: $MIDAS_WORKER_CONFIG, else ./config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format: auto (human on a terminal, JSON otherwise), human or json.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Run the worker.
    Run,
    /// Run a standalone Midas simulator (token, getbalance, pay, present, cancelpay).
    Simulate(sim::cli::SimulateArgs),
    /// Start the simulator and the worker, enqueue sample commands, print replies and the outbox.
    Demo(demo::DemoArgs),
    /// Publish one command (and optionally wait for its reply).
    Enqueue(enqueue::EnqueueArgs),
    /// Audit and operator actions on the outbox.
    #[command(subcommand)]
    Outbox(audit::OutboxCmd),
    /// End-to-end benchmark with the broker's own ceiling measured in the same run.
    Bench(bench::BenchArgs),
    /// Validate the config and environment; print the effective config (secrets masked).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref());
    let settings = match config::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let format = match cli.log_format.as_deref() {
        None => settings.config.log.format,
        Some("auto") => LogFormat::Auto,
        Some("human") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            eprintln!("error: --log-format must be auto, human or json (got {other:?})");
            return ExitCode::from(2);
        }
    };
    let quiet = matches!(
        cli.verb,
        Verb::Outbox(_) | Verb::CheckConfig | Verb::Enqueue(_) | Verb::Demo(_) | Verb::Bench(_)
    );
    // People-facing verbs log warnings only, unless RUST_LOG says otherwise.
    let level = match (&cli.verb, quiet) {
        // the demo prints what matters itself
        (Verb::Demo(_), _) => "error",
        (_, true) => "warn",
        _ => settings.config.log.level.as_str(),
    };
    telemetry::init(format, level);

    match cli.verb {
        Verb::CheckConfig => {
            print!("{}", config::render_effective(&settings));
            println!("# config OK");
            ExitCode::SUCCESS
        }
        Verb::Outbox(cmd) => {
            let mut out = std::io::stdout().lock();
            match audit::run(&cmd, &settings, &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code().clamp(0, 255) as u8)
                }
            }
        }
        verb => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async_main(verb, settings))
        }
    }
}

async fn async_main(verb: Verb, settings: Settings) -> ExitCode {
    let result: anyhow::Result<()> = match verb {
        Verb::Run => run(settings).await,
        Verb::Simulate(args) => sim::cli::simulate(args, &settings, shutdown_signal()).await,
        Verb::Demo(args) => demo::run(args, settings).await,
        // enqueue prints its own errors; its exit status tells the outcome (enqueue --help)
        Verb::Enqueue(args) => return ExitCode::from(enqueue::main(args, &settings).await),
        Verb::Bench(args) => bench::run(args, settings).await,
        Verb::CheckConfig | Verb::Outbox(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let running = worker::start(Arc::new(settings), None).await?;
    running.run_until(shutdown_signal()).await;
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    // a second signal during shutdown is handled by the default action
    let _ = Duration::ZERO;
}
