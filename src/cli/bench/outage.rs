//! The "backlog after an outage" phase: Midas answers HTTP 502 to every call while
//! N commands are published, for `--outage`; then Midas comes back and the phase
//! times the drain (Midas back → N-th reply), to set beside a fresh backlog's rate.
//! What it shows: jobs the worker already tried wait out their backoff (doubling
//! from `retry.initial`), the rest wait in the broker behind the intake pause.

use std::time::Instant;

use lapin::Connection;

use super::args::BenchArgs;
use super::cpu;
use super::publish::publish_commands;
use super::sim::Sim;
use super::sink::Sink;
use crate::config::Settings;
use crate::sim::Faults;

/// What the outage phase measured.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(super) struct OutageResult {
    /// Commands published while Midas was down.
    pub jobs: usize,
    /// How long Midas answered 502.
    pub outage_s: f64,
    /// Calls Midas refused during the outage (pay + present).
    pub refused_calls: u64,
    /// Midas back → the N-th reply.
    pub drain_s: f64,
    pub drain_jobs_per_s: f64,
    /// CPU per job from Midas back to the N-th reply.
    pub cpu_drain: cpu::PerJob,
}

async fn calls(sim: &Sim) -> anyhow::Result<u64> {
    let l = sim.ledger().await?;
    Ok(["pay", "present"]
        .iter()
        .map(|k| l.calls.get(*k).copied().unwrap_or(0))
        .sum())
}

/// Run the phase on a worker that is running and idle; `phase` letters the bills.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    a: &BenchArgs,
    settings: &Settings,
    client: &Connection,
    sim: &Sim,
    sink: &Sink,
    bill_prefix: &str,
    lat_ms: u64,
    pids: cpu::Pids,
) -> anyhow::Result<OutageResult> {
    let b = &settings.config.broker;
    let n = a.jobs;
    let up = Faults {
        latency_ms: lat_ms,
        ..Faults::default()
    };
    let calls0 = calls(sim).await?;
    sim.set_faults(Faults {
        http_502_rate: 1.0,
        ..up.clone()
    })
    .await?;
    let down_at = Instant::now();
    sink.expect('o', n);
    publish_commands(
        client,
        &b.command_queue,
        &b.reply_queue,
        'o',
        bill_prefix,
        n,
        a.users,
        None,
        a.api == "v2",
    )
    .await?;
    // the outage lasts --outage from the first command (a bench, not a test: a timer is the point)
    tokio::time::sleep_until((down_at + a.outage).into()).await;
    let refused_calls = calls(sim).await?.saturating_sub(calls0);
    let cpu0 = cpu::snapshot(pids);
    sim.set_faults(up).await?;
    let up_at = Instant::now();
    let end = sink.wait('o', n, a.stall_timeout + a.outage).await?;
    let cpu1 = cpu::snapshot(pids);
    let drain = end.saturating_duration_since(up_at).as_secs_f64();
    Ok(OutageResult {
        jobs: n,
        outage_s: up_at.saturating_duration_since(down_at).as_secs_f64(),
        refused_calls,
        drain_s: drain,
        drain_jobs_per_s: n as f64 / drain.max(1e-9),
        cpu_drain: cpu::per_job(&cpu0, &cpu1, n),
    })
}
