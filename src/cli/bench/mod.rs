//! `midas-worker bench`: end-to-end throughput and latency, with the broker's own
//! ceiling measured in the same run (so the ratio means something on a noisy box).
//!
//! 1. **ceiling**: a bare lapin loop doing what the worker minimally must on quorum
//!    queues: N commands pre-published to a quorum queue; consume with manual ack
//!    (the worker's prefetch) → publish each to a quorum reply queue with pipelined
//!    confirms → ack in order, batched with `multiple`. A reply consumer (the game
//!    server's side) reads the replies, as in the worker runs.
//! 2. **worker**, for each (workers, Midas latency): a Midas simulator with that latency, the
//!    real worker in-process (outbox in a temp dir, `synchronous=FULL` as shipped),
//!    N pay/present commands pre-published (backlog), timed from the moment the
//!    worker's consumer is registered to the N-th reply; then a steady-rate phase
//!    (`--rate`, default half the backlog throughput) for latency percentiles.
//!    Every bill_no must be in the simulator's ledger exactly once.
//!
//! With `--outbox postgres://…` each case gets a fresh PostgreSQL database on that
//! server and `--workers N` workers in this process (each `worker::start`, its own
//! HTTP port) share it, the command queue and the simulator; one case per
//! (workers, latency). The simulator's count of overlapping calls for one player
//! must stay 0 (player leases), beside the ledger check.
//!
//! Queues are unique per run and deleted at the end; the outbox directory (and each
//! case's database) is removed unless `--keep`.

mod args;
mod ceiling;
mod cpu;
mod ledger;
mod outage;
mod pgdb;
mod phases;
mod publish;
mod report;
mod sim;
mod sink;
mod worker;
mod workers;

pub use args::{BenchArgs, SimMode, WorkerMode};

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::QueueDeleteOptions;
use lapin::Connection;

use crate::config::Settings;

/// Outstanding publisher confirms allowed by the bench's own publishers.
const PUBLISH_WINDOW: usize = 2048;
/// Balance of every simulated player: never the limit.
const SIM_BALANCE: i64 = 1_000_000_000;

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

fn at_us(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_micros() as u64
}

/// (VmHWM, VmRSS) of this process in kB.
pub fn rss_kb() -> (u64, u64) {
    parse_rss(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

/// (VmHWM, VmRSS) in kB from the text of a `/proc/<pid>/status` (0 when absent).
fn parse_rss(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn queues(tag: &str, case: &str) -> (String, String, String) {
    (
        format!("midas-bench-{tag}-{case}.commands"),
        format!("midas-bench-{tag}-{case}.results"),
        format!("midas-bench-{tag}-{case}.dead"),
    )
}

async fn delete_queues(conn: &Connection, names: &[&str]) {
    if let Ok(ch) = conn.create_channel().await {
        for n in names {
            let _ = ch
                .queue_delete((*n).into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch.close(200, "bye".into()).await;
    }
}

pub async fn run(a: BenchArgs, settings: Settings) -> anyhow::Result<()> {
    if a.jobs == 0 || a.users == 0 {
        bail!("--jobs and --users must be at least 1");
    }
    if a.midas_latency.is_empty() {
        bail!("--midas-latency needs at least one value");
    }
    if a.workers.is_empty() || a.workers.contains(&0) {
        bail!("--workers needs values of at least 1");
    }
    match &a.outbox {
        Some(url) if !crate::outbox::postgres::is_postgres_url(url) => {
            bail!("--outbox must be a postgres:// or postgresql:// URL")
        }
        None if a.workers.iter().any(|&w| w > 1) => {
            bail!("--workers above 1 needs a shared outbox: --outbox postgres://…")
        }
        _ => {}
    }
    if a.worker == WorkerMode::Child && a.workers.iter().any(|&w| w > 1) {
        bail!("--worker child runs one worker per case: --workers 1");
    }
    let _ = epoch();
    crate::demo::ensure_broker(&settings.config.broker.url)
        .await
        .map_err(anyhow::Error::msg)?;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        crate::command::now_ms() % 100_000_000
    );
    let dir = a
        .outbox_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("midas-worker-bench-{tag}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let progress = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    progress(format!(
        "bench: ceiling run ({} msgs, outbox dir {})",
        a.jobs,
        dir.display()
    ));
    let result = async {
        let (ceiling, ceil) = ceiling::Ceiling::start(
            &settings,
            a.jobs,
            a.users,
            &tag,
            a.stall_timeout,
            a.api == "v2",
        )
        .await?;
        progress(format!("bench: ceiling {:.0} msg/s", ceil.msgs_per_s));
        let cases = run_cases(&a, &settings, &ceiling, &tag, &dir, &progress).await;
        // the results are in: a broker that does not answer a close (seen once,
        // after the last case) must not keep the table from being printed
        if tokio::time::timeout(Duration::from_secs(15), ceiling.stop())
            .await
            .is_err()
        {
            progress(
                "bench: the ceiling's broker connections did not close within 15 s; left open"
                    .into(),
            );
        }
        Ok::<_, anyhow::Error>((ceil, cases?))
    }
    .await;
    if a.keep {
        progress(format!("bench: outbox kept in {}", dir.display()));
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (ceil, cases) = result?;
    if a.json {
        println!("{}", report::to_json(&a, &settings, &ceil, &cases));
    } else {
        report::print_table(&a, &settings, &ceil, &cases);
    }
    if cases
        .iter()
        .any(|c| !c.ledger_ok || c.not_succeeded > 0 || c.overlapping_calls > 0)
    {
        bail!("a bill was not applied exactly once (or a reply was not succeeded, or calls for one player overlapped): see the table");
    }
    if cases.iter().any(|c| c.worker_exit_ok == Some(false)) {
        bail!("the child worker did not exit 0 after SIGTERM: see the table");
    }
    Ok(())
}

/// Every (workers, latency) case, each followed by the broker-only steady phase at
/// that case's steady rate through the ceiling's bare loop.
async fn run_cases(
    a: &BenchArgs,
    settings: &Settings,
    ceiling: &ceiling::Ceiling,
    tag: &str,
    dir: &std::path::Path,
    progress: &dyn Fn(String),
) -> anyhow::Result<Vec<report::CaseResult>> {
    let mut cases = Vec::new();
    for &workers in &a.workers {
        for lat in &a.midas_latency {
            progress(format!(
                "bench: {workers} worker(s) on {}, Midas latency {}",
                if a.outbox.is_some() {
                    "PostgreSQL"
                } else {
                    "SQLite"
                },
                humantime::format_duration(*lat)
            ));
            let mut c = worker::worker_case(a, settings, *lat, workers, tag, dir).await?;
            // a failed broker-only phase leaves NaN (its target then fails), not the run
            let (p50, p99) = match ceiling.steady(c.steady_rate, c.steady_jobs).await {
                Ok(b) => {
                    c.broker_steady_cpu = Some(b.cpu);
                    (b.p50, b.p99)
                }
                Err(e) => {
                    eprintln!("bench: broker-only steady phase failed: {e:#}");
                    (f64::NAN, f64::NAN)
                }
            };
            c.broker_steady_p50_ms = p50;
            c.broker_steady_p99_ms = p99;
            progress(format!(
                "bench: {:.0} jobs/s, steady p99 {:.1} ms (broker-only {:.1} ms), {}; \
                 overlapping calls {}",
                c.jobs_per_s, c.steady_p99_ms, p99, c.ledger_note, c.overlapping_calls
            ));
            cases.push(c);
        }
    }
    Ok(cases)
}
