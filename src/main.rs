//! The `midas-worker` command line (docs/contract.md, "Command line"). Errors become one
//! line on stderr and an exit status: 0 success, 1 failure, 2 bad usage or config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use midas_worker::config::{self, LogFormat, Settings};
use midas_worker::{audit, bench, console, demo, enqueue, sim, telemetry, worker};

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
    Run(RunArgs),
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
    /// Validate the config and environment; print each effective value and where it
    /// came from (default, file or environment variable), secrets masked.
    CheckConfig(CheckConfigArgs),
    /// The operator console (web) on its own, over the outbox the `outbox` verbs read.
    Console(ConsoleArgs),
}

#[derive(clap::Args, Debug)]
struct ConsoleArgs {
    /// Where to listen, e.g. 127.0.0.1:9465 (default: `[console] listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Allow `midas.environment = "simulator"` with a broker that is not on this
    /// machine (refused by default: game servers sharing that broker would get
    /// simulated answers). Same as MIDAS_WORKER_ALLOW_SIMULATOR=1.
    #[arg(long)]
    allow_simulator_on_shared_broker: bool,
}

#[derive(clap::Args, Debug)]
struct CheckConfigArgs {
    /// Machine-readable output: {"config_file", "ok", "keys": [{key, value, source}], "notes", "problems"}.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref());
    // `demo` needs nothing: without a config file it uses the shipped defaults
    let built_in = matches!(cli.verb, Verb::Demo(_))
        && cli.config.is_none()
        && std::env::var_os(config::ENV_CONFIG_PATH).is_none()
        && !path.exists();
    let loaded = if built_in {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        config::load_from(include_str!("../config.toml"), &env, "built-in defaults")
    } else {
        config::load(&path)
    };
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Refusals before anything connects (check-config reports them instead).
    let preflight = match &cli.verb {
        Verb::CheckConfig(_) => Ok(()),
        Verb::Run(args) => {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            config::run_preflight(&settings, args.allow_simulator_on_shared_broker, &env)
        }
        _ => config::unavailable(&settings),
    };
    if let Err(e) = preflight {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    // The console's address and tokens, checked before anything starts.
    let console_listen = match &cli.verb {
        Verb::Console(args) => args.listen.or(settings.config.console.listen),
        Verb::Run(_) => settings.config.console.listen,
        _ => None,
    };
    let console = match (&cli.verb, console_listen) {
        (Verb::Console(_), None) => {
            eprintln!("{}", console::ConsoleError::NoListen);
            return ExitCode::from(2);
        }
        (_, Some(addr)) => {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            match console::Tokens::from_env(&settings.config.console, &env) {
                Ok(tokens) => Some((addr, tokens)),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            }
        }
        (_, None) => None,
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
        Verb::Outbox(_) | Verb::CheckConfig(_) | Verb::Enqueue(_) | Verb::Demo(_) | Verb::Bench(_)
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
        Verb::CheckConfig(args) => {
            let problems: Vec<String> = config::unavailable(&settings)
                .err()
                .map(|e| e.to_string())
                .into_iter()
                .collect();
            let out = if args.json {
                config::show::render_json(&settings, &problems) + "\n"
            } else {
                config::show::render_table(&settings, &problems)
            };
            // a closed pipe (`| head`) is not an error worth a panic
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
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
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            // The worker (`run`) gets one runtime thread unless TOKIO_WORKER_THREADS
            // says otherwise (tokio reads it when no count is set): the outbox
            // writer and the broker client's I/O have threads of their own, and the
            // rest of a job's path is hand-offs between tasks, which cost less on
            // one thread than across two (docs/bench-history.md, "One runtime thread").
            // The other verbs keep one thread per core (`bench` runs its load
            // generator and an in-process worker on it).
            if matches!(verb, Verb::Run(_)) && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
                builder.worker_threads(1);
            }
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async_main(verb, settings, console))
        }
    }
}

/// Where the console listens, and its tokens (`None`: no console).
type ConsoleOn = Option<(std::net::SocketAddr, console::Tokens)>;

async fn async_main(verb: Verb, settings: Settings, console: ConsoleOn) -> ExitCode {
    let result: anyhow::Result<()> = match verb {
        Verb::Run(_) => run(settings, console).await,
        Verb::Console(_) => serve_console(settings, console).await,
        Verb::Simulate(args) => sim::cli::simulate(args, &settings, shutdown_signal()).await,
        Verb::Demo(args) => demo::run(args, settings).await,
        // enqueue prints its own errors; its exit status tells the outcome (enqueue --help)
        Verb::Enqueue(args) => return ExitCode::from(enqueue::main(args, &settings).await),
        Verb::Bench(args) => bench::run(args, settings).await,
        Verb::CheckConfig(_) | Verb::Outbox(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `midas-worker console`: the console alone, until SIGTERM/SIGINT.
async fn serve_console(settings: Settings, console: ConsoleOn) -> anyhow::Result<()> {
    let Some((addr, tokens)) = console else {
        anyhow::bail!("{}", console::ConsoleError::NoListen);
    };
    let stop = shutdown_signal();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (bound, server) = console::serve(addr, Arc::new(settings), tokens, rx)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (console): {e}"))?;
    eprintln!("operator console on http://{bound}/ (Ctrl-C stops it)");
    stop.await;
    let _ = tx.send(true);
    let _ = server.await;
    Ok(())
}

async fn run(settings: Settings, console: ConsoleOn) -> anyhow::Result<()> {
    if settings.config.midas.environment == config::Environment::Simulator
        && !config::broker_is_loopback(&settings.config.broker.url)
    {
        // allowed by the flag or MIDAS_WORKER_ALLOW_SIMULATOR (run_preflight)
        tracing::warn!(
            broker = %settings.config.broker.url,
            "SIMULATOR MODE ON A SHARED BROKER (allowed explicitly): every command on this \
             broker's queues gets a simulated answer; no real currency moves"
        );
    }
    // listening from before the start: a SIGTERM during start-up stops it cleanly
    let stop = shutdown_signal();
    let settings = Arc::new(settings);
    // the console's port is bound first (a taken port stops start-up before the
    // worker runs) and served once the worker has opened the outbox
    let console = match console {
        Some((addr, tokens)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (console.listen): {e}"))?;
            Some((listener, tokens))
        }
        None => None,
    };
    let running = worker::start(settings.clone(), None).await?;
    let (console_stop, console_rx) = tokio::sync::watch::channel(false);
    let console = match console {
        Some((listener, tokens)) => Some(
            console::serve_on(listener, settings, tokens, console_rx)
                .map_err(|e| anyhow::anyhow!("cannot serve the console: {e}"))?,
        ),
        None => None,
    };
    running.run_until(stop).await;
    let _ = console_stop.send(true);
    if let Some((_, server)) = console {
        let _ = server.await;
    }
    Ok(())
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives while the worker is still starting
/// is kept (the worker stops cleanly once started) instead of killing the process
/// with the default action. A second signal during shutdown is handled the same
/// way as the first (ignored; the shutdown is bounded).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut t), Some(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                (Some(mut t), None) => {
                    t.recv().await;
                }
                (None, Some(mut i)) => {
                    i.recv().await;
                }
                (None, None) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
