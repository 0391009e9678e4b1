//! The worker's two phases: a pre-published backlog timed from the moment the
//! (first) worker consumes to the last reply, then a steady paced rate for latency.
//! With a shared outbox, `workers` workers run in this process for the case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::args::{BenchArgs, WorkerMode};
use super::publish::publish_commands;
use super::report::CaseResult;
use super::sim::Sim;
use super::sink::Sink;
use super::workers::Workers;
use super::{cpu, mb, outage, rss_kb};
use crate::config::Settings;

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_case(
    a: &BenchArgs,
    settings: &Arc<Settings>,
    client: &Connection,
    ch: &Channel,
    sim: &Sim,
    lat_ms: u64,
    workers: usize,
    tag: &str,
    case: &str,
    dir: &std::path::Path,
) -> anyhow::Result<CaseResult> {
    let b = &settings.config.broker;
    let n = a.jobs;
    let bill_prefix = format!("BENCH-{tag}-{case}-");
    let (sink, sink_task) = Sink::start(ch, &b.reply_queue, true).await?;
    sink.expect('b', n);
    publish_commands(
        client,
        &b.command_queue,
        &b.reply_queue,
        'b',
        &bill_prefix,
        n,
        a.users,
        None,
        a.api == "v2",
    )
    .await?;

    // t0: the first worker's consumer is registered on the command queue; then the
    // time until all `workers` are consuming
    let watch_ch = client.create_channel().await?;
    let cmd_q = b.command_queue.clone();
    let want = workers.max(1) as u32;
    let watcher = tokio::spawn(async move {
        let mut first = None;
        loop {
            let q = watch_ch
                .queue_declare(
                    cmd_q.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match q {
                Ok(q) if q.consumer_count() >= want => {
                    let _ = watch_ch.close(200, "bye".into()).await;
                    let all = Instant::now();
                    return Some((first.unwrap_or(all), all));
                }
                Ok(q) => {
                    if q.consumer_count() > 0 && first.is_none() {
                        first = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err(_) => return None,
            }
        }
    });
    let (hwm_before, _) = rss_kb();
    let m0 = Workers::totals_before(a.worker);
    let calls0 = match a.worker {
        WorkerMode::Inproc => crate::metrics::METRICS.call_time(),
        WorkerMode::Child => (0.0, 0),
    };
    let broker = cpu::find_broker();
    // in-process, the workers' start-up counts; a child's CPU is read from its spawn
    let before = cpu::snapshot(cpu::Pids {
        broker,
        worker: None,
    });
    let started = Instant::now();
    let log = dir.join(format!("{case}-worker.log"));
    let running = match Workers::start(a, settings, sim.url(), workers, &log).await {
        Ok(w) => w,
        Err(e) => {
            watcher.abort();
            return Err(e);
        }
    };
    let pids = cpu::Pids {
        broker,
        worker: running.pid(),
    };
    let cpu0 = match pids.worker {
        Some(_) => cpu::snapshot(pids),
        None => before,
    };
    let (t0, t_all) = match tokio::time::timeout(Duration::from_secs(30), watcher).await {
        Ok(Ok(Some(t))) => t,
        _ => {
            running.stop().await;
            bail!("the workers did not all start consuming within 30s");
        }
    };
    let outcome = async {
        let end = sink.wait('b', n, a.stall_timeout).await?;
        let cpu1 = cpu::snapshot(pids);
        let m1 = running.totals().await?;
        let calls1 = running.call_time().await?;
        let elapsed = end.saturating_duration_since(t0);
        let secs = elapsed.as_secs_f64();
        let jobs_per_s = n as f64 / secs;

        // steady-rate phase
        let rate = a.rate.unwrap_or(jobs_per_s / 2.0).max(1.0);
        let m = ((rate * a.steady.as_secs_f64()).round() as usize).max(10);
        sink.expect('s', m);
        publish_commands(
            client,
            &b.command_queue,
            &b.reply_queue,
            's',
            &bill_prefix,
            m,
            a.users,
            Some(rate),
            a.api == "v2",
        )
        .await?;
        sink.wait('s', m, a.stall_timeout).await?;
        let cpu2 = cpu::snapshot(pids);
        let m2 = running.totals().await?;
        let cpu_backlog = cpu::per_job(&cpu0, &cpu1, n);
        let cpu_steady = cpu::per_job(&cpu1, &cpu2, m);
        let outage = if a.outage.is_zero() {
            None
        } else {
            let r = outage::run(a, settings, client, sim, &sink, &bill_prefix, lat_ms, pids).await;
            if r.is_err() {
                // leave Midas up for the ledger read
                let _ = sim
                    .set_faults(crate::sim::Faults {
                        latency_ms: lat_ms,
                        ..Default::default()
                    })
                    .await;
            }
            Some(r?)
        };
        Ok::<_, anyhow::Error>((
            elapsed,
            jobs_per_s,
            m0,
            m1,
            m2,
            calls1,
            rate,
            m,
            cpu_backlog,
            cpu_steady,
            outage,
        ))
    }
    .await;
    // a child's memory is read before it stops (its /proc entry goes with it)
    let child_rss = running.child_rss_kb();
    let worker_exit_ok = running.stop().await;
    let (hwm, rss) = child_rss.unwrap_or_else(rss_kb);
    sink_task.abort();
    let (elapsed, jobs_per_s, m0, m1, m2, calls1, rate, m, cpu_backlog, cpu_steady, outage) =
        outcome?;
    let timed = calls1.1.saturating_sub(calls0.1);
    let mean_call_ms = if timed > 0 {
        (calls1.0 - calls0.0).max(0.0) * 1000.0 / timed as f64
    } else {
        f64::NAN
    };
    let secs = elapsed.as_secs_f64();
    let d = |i: usize| {
        let a = [m0.0, m0.1, m0.2, m0.3];
        let b = [m1.0, m1.1, m1.2, m1.3];
        b[i].saturating_sub(a[i]) as f64
    };
    let steady_commits = m2.0.saturating_sub(m1.0) as f64;
    let steady_rows = m2.1.saturating_sub(m1.1) as f64;
    let (b50, b99, bdup, bbad) = sink.summary('b');
    let (s50, s99, sdup, sbad) = sink.summary('s');

    // exactly once: every bill of this case in the ledger once, nothing else
    let ledger = sim.ledger().await?;
    let verdict = super::ledger::check(
        ledger.orders.iter().map(|o| o.bill_no.as_str()),
        &bill_prefix,
        &[('b', n), ('s', m), ('o', outage.map_or(0, |o| o.jobs))],
    );
    Ok(CaseResult {
        midas_latency_ms: lat_ms,
        workers,
        outbox: if settings.config.outbox.url.is_some() {
            "postgres"
        } else {
            "sqlite"
        },
        all_consuming_ms: t_all.saturating_duration_since(t0).as_secs_f64() * 1000.0,
        overlapping_calls: ledger.overlapping_calls,
        total_jobs: n + m + outage.map_or(0, |o| o.jobs),
        pg_xacts_per_job: None,
        pg_round_trips_per_job: None,
        max_in_flight: 0,
        jobs: n,
        startup_ms: t0.saturating_duration_since(started).as_secs_f64() * 1000.0,
        elapsed_s: secs,
        jobs_per_s,
        backlog_p50_ms: b50,
        backlog_p99_ms: b99,
        steady_rate: rate,
        steady_jobs: m,
        steady_p50_ms: s50,
        steady_p99_ms: s99,
        midas_calls_per_s: d(2) / secs,
        commits_per_s: d(0) / secs,
        rows_per_commit: if d(0) > 0.0 { d(1) / d(0) } else { 0.0 },
        replies_published_per_s: d(3) / secs,
        peak_rss_mb: mb(hwm),
        peak_rss_before_worker_mb: match a.worker {
            WorkerMode::Inproc => mb(hwm_before),
            WorkerMode::Child => 0.0,
        },
        worker_process: match a.worker {
            WorkerMode::Inproc => "in-process",
            WorkerMode::Child => "child process",
        },
        worker_exit_ok,
        broker_steady_p50_ms: f64::NAN,
        broker_steady_p99_ms: f64::NAN,
        broker_steady_cpu: None,
        mean_call_ms,
        steady_commits_per_job: steady_commits / m.max(1) as f64,
        steady_rows_per_commit: if steady_commits > 0.0 {
            steady_rows / steady_commits
        } else {
            0.0
        },
        rss_at_end_mb: mb(rss),
        duplicate_replies: bdup + sdup,
        not_succeeded: bbad + sbad,
        ledger_ok: verdict.ok,
        ledger_note: verdict.note,
        simulator: sim.where_(),
        cpu_backlog,
        cpu_steady,
        outage,
    })
}
