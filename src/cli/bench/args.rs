//! `bench` command-line flags: what the run measures (jobs, latencies, in-flight
//! limit, simulator placement, outbox engine, workers) so the report can echo them.

use std::path::PathBuf;
use std::time::Duration;

/// How the Midas simulator runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// A `midas-worker simulate` child process: its ledger (one entry per bill) and
    /// its CPU time are not counted in this process's peak RSS.
    Child,
    /// In this process (SimHandle), sharing the runtime with the worker.
    Inproc,
}

/// Where the worker runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerMode {
    /// In this process (`worker::start`): peak RSS and CPU include the bench's own.
    Inproc,
    /// A `midas-worker run` child process: its peak RSS (VmHWM) and CPU are the
    /// worker's alone, read from `/proc/<pid>`; SIGTERM at the end, exit 0 checked.
    Child,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Commands in the backlog (and in the ceiling run).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Simulated Midas latencies, one worker run each (list or repeated).
    #[arg(long = "midas-latency", value_delimiter = ',', default_value = "0ms,50ms",
          value_parser = humantime::parse_duration)]
    pub midas_latency: Vec<Duration>,
    /// midas.max_in_flight for the worker (default: the config's).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// midas.max_rps per appid for the worker. The default does not bind, so the run
    /// measures the pipeline, not the configured rate limit (the shipped 500/s would).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_rps: u32,
    /// Distinct openids (one openid = one Midas call at a time).
    #[arg(long, default_value_t = 5_000)]
    pub users: usize,
    /// Steady-rate phase, messages/s (default: half the backlog throughput measured).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Length of the steady-rate phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub steady: Duration,
    /// After the steady phase: Midas answers 502 this long while `--jobs` more
    /// commands arrive, then comes back; the drain is timed. `0s` skips the phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the temporary outbox directory.
    #[arg(long)]
    pub keep: bool,
    /// Where the simulator runs.
    #[arg(long, value_enum, default_value_t = SimMode::Child)]
    pub sim: SimMode,
    /// Directory for the temporary outbox (default: the system temp dir).
    #[arg(long)]
    pub outbox_dir: Option<PathBuf>,
    /// The Midas API the worker speaks to the simulator: v1 (Midas 1.0) or v2 (virtual
    /// payment 2.0: every configured app is switched to `api = "v2"`, and the commands
    /// carry a session_key; the ceiling run is the same for both).
    #[arg(long, default_value = "v1", value_parser = ["v1", "v2"])]
    pub api: String,
    /// A shared PostgreSQL outbox instead of SQLite: the URL of a server database
    /// (`postgres://user@host:port/postgres`) from which each case creates a fresh
    /// database `midas_bench_<tag>_<case>` (dropped at the end unless `--keep`).
    #[arg(long, value_name = "URL")]
    pub outbox: Option<String>,
    /// Workers started in this process per case, sharing the command queue, the
    /// outbox and the simulator (list or repeated; more than 1 needs `--outbox`).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub workers: Vec<usize>,
    /// Where the worker runs: in this process, or as a child process (one worker per
    /// case) whose own peak RSS and CPU are reported.
    #[arg(long = "worker", value_enum, default_value_t = WorkerMode::Inproc)]
    pub worker: WorkerMode,
    /// Give up when no reply arrives for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}
