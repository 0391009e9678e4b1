//! The bench report: per-case results, the targets they are judged against, the
//! table and the `--json` object.

use std::time::SystemTime;

use serde_json::json;

use super::args::{BenchArgs, WorkerMode};
use super::ceiling::CeilingResult;
use super::cpu;
use super::outage::OutageResult;
use crate::config::Settings;

#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct CaseResult {
    pub(super) midas_latency_ms: u64,
    /// Workers in this process for this case (sharing the outbox and the queue).
    pub(super) workers: usize,
    /// `sqlite` or `postgres`.
    pub(super) outbox: &'static str,
    /// From the first worker consuming to all of them consuming.
    pub(super) all_consuming_ms: f64,
    /// The simulator's count of calls made for a player while another call for the
    /// same player was in flight (must be 0).
    pub(super) overlapping_calls: u64,
    /// Commands of the case, all phases.
    pub(super) total_jobs: usize,
    /// PostgreSQL transactions committed in the case's database per command, over
    /// the whole case (`pg_stat_database.xact_commit`; start-up included).
    pub(super) pg_xacts_per_job: Option<f64>,
    /// Round trips to PostgreSQL per command made by the workers' outbox writers
    /// and coordinators over the whole case (start-up included); in-process
    /// workers only (`crate::outbox::postgres::round_trips`).
    pub(super) pg_round_trips_per_job: Option<f64>,
    pub(super) max_in_flight: usize,
    pub(super) jobs: usize,
    pub(super) startup_ms: f64,
    pub(super) elapsed_s: f64,
    pub(super) jobs_per_s: f64,
    pub(super) backlog_p50_ms: f64,
    pub(super) backlog_p99_ms: f64,
    pub(super) steady_rate: f64,
    pub(super) steady_jobs: usize,
    pub(super) steady_p50_ms: f64,
    pub(super) steady_p99_ms: f64,
    /// The broker-only steady phase at the same rate, through the ceiling's bare
    /// loop, the same paced publisher and reply consumer (NaN until measured).
    pub(super) broker_steady_p50_ms: f64,
    pub(super) broker_steady_p99_ms: f64,
    /// CPU per message of the broker-only steady phase (broker, whole machine).
    pub(super) broker_steady_cpu: Option<cpu::PerJob>,
    /// The mean time of a Midas call as the worker timed it, in the backlog phase
    /// (the simulator's latency plus HTTP, the simulator's own work and waits for
    /// a CPU).
    pub(super) mean_call_ms: f64,
    /// Outbox commits per job, and requests per commit, in the steady phase.
    pub(super) steady_commits_per_job: f64,
    pub(super) steady_rows_per_commit: f64,
    /// `in-process` or `child process` (`--worker`).
    pub(super) worker_process: &'static str,
    /// A child worker: exited 0 after SIGTERM (`None` in-process).
    pub(super) worker_exit_ok: Option<bool>,
    pub(super) midas_calls_per_s: f64,
    pub(super) commits_per_s: f64,
    pub(super) rows_per_commit: f64,
    pub(super) replies_published_per_s: f64,
    pub(super) peak_rss_mb: f64,
    pub(super) peak_rss_before_worker_mb: f64,
    pub(super) rss_at_end_mb: f64,
    pub(super) duplicate_replies: usize,
    pub(super) not_succeeded: usize,
    pub(super) ledger_ok: bool,
    pub(super) ledger_note: String,
    pub(super) simulator: &'static str,
    /// CPU per job from the worker's start to the last backlog reply.
    pub(super) cpu_backlog: cpu::PerJob,
    /// CPU per job in the steady phase (the bench's paced publisher included).
    pub(super) cpu_steady: cpu::PerJob,
    /// The backlog-after-an-outage phase (`--outage 0s`: none).
    pub(super) outage: Option<OutageResult>,
}

impl CaseResult {
    /// The latency the worker adds in the steady phase: its end-to-end (p50, p99)
    /// minus the broker-only round trip's, measured the same way in the same run.
    pub(super) fn worker_added_ms(&self) -> (f64, f64) {
        (
            self.steady_p50_ms - self.broker_steady_p50_ms,
            self.steady_p99_ms - self.broker_steady_p99_ms,
        )
    }

    /// CPU per job of the processes doing the work: the bench process (worker
    /// in it), or the child worker plus the bench (reply consumer, publisher).
    fn all_process_us(p: &cpu::PerJob) -> f64 {
        p.process_us + p.bench_us.unwrap_or(0.0)
    }
}

// ---------------------------------------------------------------- report

pub(super) struct Targets {
    throughput_min: f64,
    throughput_ok: bool,
    throughput_rule: String,
    /// The worker-added steady p99 (worker e2e − broker-only) must stay under this.
    steady_max_ms: f64,
    steady_ok: bool,
    rss_ok: Option<bool>,
}

pub(super) fn targets(c: &CaseResult, ceiling: f64) -> Targets {
    let (throughput_min, rule) = if c.midas_latency_ms == 0 {
        (0.75 * ceiling, "≥ 75% of ceiling".to_string())
    } else {
        let bound = c.max_in_flight as f64 / (c.midas_latency_ms as f64 / 1000.0);
        (
            0.9 * ceiling.min(bound),
            format!(
                "≥ 90% of min(ceiling, {}/{}ms = {:.0})",
                c.max_in_flight, c.midas_latency_ms, bound
            ),
        )
    };
    let steady_max_ms = c.midas_latency_ms as f64 + 10.0;
    Targets {
        throughput_min,
        throughput_ok: c.jobs_per_s >= throughput_min,
        throughput_rule: rule,
        steady_max_ms,
        // NaN (no broker-only figure) fails
        steady_ok: c.worker_added_ms().1 <= steady_max_ms,
        rss_ok: (c.jobs >= 100_000).then_some(c.peak_rss_mb <= 64.0),
    }
}

/// Cores kept busy during the backlog: (this process, broker, PostgreSQL, the
/// whole machine).
fn cores(c: &CaseResult) -> (f64, Option<f64>, Option<f64>, Option<f64>) {
    let per_s = |us: f64| us * c.jobs_per_s / 1e6;
    let p = &c.cpu_backlog;
    (
        per_s(CaseResult::all_process_us(p)),
        p.broker_us.map(per_s),
        p.postgres_us.filter(|_| c.outbox == "postgres").map(per_s),
        p.machine_us.map(per_s),
    )
}

/// What bounds the backlog rate, judged from the figures of the run: the Midas
/// latency × the in-flight limit when the rate is near it, else the broker when
/// near its ceiling, else the CPU when the machine's cores are nearly all busy
/// (naming the largest of this process, the broker and PostgreSQL), else waiting
/// (commit round trips, lease hand-overs: the cores are not full).
pub(super) fn bound(c: &CaseResult, ceiling: f64) -> String {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if c.midas_latency_ms > 0 {
        let lat_bound = (c.workers * c.max_in_flight) as f64 / (c.midas_latency_ms as f64 / 1000.0);
        if c.jobs_per_s >= 0.8 * lat_bound {
            return format!("Midas latency ({lat_bound:.0}/s)");
        }
    }
    if c.jobs_per_s >= 0.8 * ceiling {
        return "the broker (ceiling)".into();
    }
    let (proc_, broker, pg, machine) = cores(c);
    let busy = machine.unwrap_or(proc_ + broker.unwrap_or(0.0) + pg.unwrap_or(0.0));
    let mut users = [
        ("process", proc_),
        ("broker", broker.unwrap_or(0.0)),
        ("pg", pg.unwrap_or(0.0)),
    ];
    users.sort_by(|x, y| y.1.total_cmp(&x.1));
    if busy >= 0.85 * ncpu {
        format!(
            "CPU {busy:.1}/{ncpu:.0}, most {}",
            users.first().map_or("?", |u| u.0)
        )
    } else {
        format!("waits ({busy:.1}/{ncpu:.0} cores)")
    }
}

/// The broker's CPU per message, or `n/a` when no local `beam.smp` was found.
pub(super) fn broker_us(p: &cpu::PerJob) -> String {
    p.broker_us
        .map_or("n/a".to_string(), |us| format!("{us:.0}"))
}

pub(super) fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

pub(super) fn print_table(
    a: &BenchArgs,
    settings: &Settings,
    ceil: &CeilingResult,
    cases: &[CaseResult],
) {
    println!(
        "midas-worker bench  {}  api={} jobs={} users={} prefetch={} max_rps={} steady={:?} simulator={}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        a.api,
        a.jobs,
        a.users,
        settings.config.broker.prefetch,
        a.max_rps,
        a.steady,
        cases.first().map_or("-", |c| c.simulator),
    );
    println!(
        "ceiling (bare lapin, quorum→quorum, confirms, multiple acks): {:.0} msg/s ({} msgs in {:.2}s; pre-publish {:.0} msg/s)",
        ceil.msgs_per_s,
        a.jobs,
        ceil.elapsed.as_secs_f64(),
        ceil.prepublish_per_s
    );
    println!(
        "ceiling CPU per msg: bench process {:.1} µs (lapin loop + reply consumer), broker {}",
        ceil.cpu.process_us,
        broker_us(&ceil.cpu)
    );
    println!();
    let w = 44;
    let mut header = format!("{:<w$}", "");
    let pg = cases.iter().any(|c| c.outbox == "postgres");
    for c in cases {
        let name = if c.outbox == "postgres" {
            format!(
                "pg {}w {}ms / mif {}",
                c.workers, c.midas_latency_ms, c.max_in_flight
            )
        } else {
            format!("{}ms / mif {}", c.midas_latency_ms, c.max_in_flight)
        };
        header.push_str(&format!("{name:>26}"));
    }
    println!("{header}");
    let row = |name: &str, f: &dyn Fn(&CaseResult) -> String| {
        let mut line = format!("{name:<w$}");
        for c in cases {
            line.push_str(&format!("{:>26}", f(c)));
        }
        println!("{line}");
    };
    let ce = ceil.msgs_per_s;
    if pg {
        row("outbox / workers in this process", &|c| {
            format!("{} / {}", c.outbox, c.workers)
        });
    }
    row("ceiling msg/s", &|_| format!("{ce:.0}"));
    row("worker jobs/s (backlog)", &|c| {
        format!("{:.0}", c.jobs_per_s)
    });
    row("ratio worker/ceiling", &|c| {
        format!("{:.2}", c.jobs_per_s / ce)
    });
    row("throughput target", &|c| {
        let t = targets(c, ce);
        format!("≥ {:.0} {}", t.throughput_min, mark(t.throughput_ok))
    });
    row("backlog e2e p50 / p99 ms", &|c| {
        format!("{:.0} / {:.0}", c.backlog_p50_ms, c.backlog_p99_ms)
    });
    row("steady rate msg/s (jobs)", &|c| {
        format!("{:.0} ({})", c.steady_rate, c.steady_jobs)
    });
    row("steady broker-only p50 / p99 ms", &|c| {
        format!(
            "{:.1} / {:.1}",
            c.broker_steady_p50_ms, c.broker_steady_p99_ms
        )
    });
    row("steady worker e2e p50 / p99 ms", &|c| {
        format!("{:.1} / {:.1}", c.steady_p50_ms, c.steady_p99_ms)
    });
    row("worker-added p50 / p99 ms (e2e − broker)", &|c| {
        let (p50, p99) = c.worker_added_ms();
        format!("{p50:.1} / {p99:.1}")
    });
    row("worker-added p99 target", &|c| {
        let t = targets(c, ce);
        format!("≤ {:.0} ms {}", t.steady_max_ms, mark(t.steady_ok))
    });
    row("Midas calls/s", &|c| format!("{:.0}", c.midas_calls_per_s));
    // With every call slot busy, each slot turns over once per (pre-call mark +
    // call + hand-offs): the cycle against the call the worker timed shows where
    // the time of a slot goes.
    row("Midas call ms (worker-timed mean) / slot cycle ms", &|c| {
        let slots = (c.workers * c.max_in_flight) as f64;
        let cycle = if c.jobs_per_s > 0.0 {
            slots / c.jobs_per_s * 1000.0
        } else {
            f64::NAN
        };
        format!("{:.1} / {cycle:.1}", c.mean_call_ms)
    });
    row("outbox commits/s", &|c| format!("{:.0}", c.commits_per_s));
    row("rows per commit", &|c| format!("{:.1}", c.rows_per_commit));
    row("replies published/s", &|c| {
        format!("{:.0}", c.replies_published_per_s)
    });
    let child = cases.iter().any(|c| c.worker_exit_ok.is_some());
    row("worker runs", &|c| c.worker_process.to_string());
    row("peak RSS MB (VmHWM; in-process: cumulative)", &|c| {
        format!("{:.1}", c.peak_rss_mb)
    });
    row(
        "peak RSS MB before the worker started",
        &|c| match c.worker_exit_ok {
            Some(_) => "- (child)".into(),
            None => format!("{:.1}", c.peak_rss_before_worker_mb),
        },
    );
    row(
        "RSS target ≤ 64 MB (100k backlog)",
        &|c| match targets(c, ce).rss_ok {
            Some(ok) => mark(ok).to_string(),
            None => "n/a (jobs < 100000)".to_string(),
        },
    );
    row("CPU µs/job backlog: process, all workers (writer)", &|c| {
        format!(
            "{:.0} ({:.0} writer)",
            c.cpu_backlog.process_us, c.cpu_backlog.writer_us
        )
    });
    row("CPU µs/job backlog: runtime / lapin io / rest", &|c| {
        format!(
            "{:.0} / {:.0} / {:.0}",
            c.cpu_backlog.runtime_us, c.cpu_backlog.broker_io_us, c.cpu_backlog.other_us
        )
    });
    row("ctx switches/job backlog: voluntary / involuntary", &|c| {
        let s = &c.cpu_backlog.switches;
        format!("{:.2} / {:.2}", s.voluntary, s.involuntary)
    });
    row(
        "ctx switches/job backlog, voluntary: runtime / writer / lapin io",
        &|c| {
            let s = &c.cpu_backlog.switches;
            format!(
                "{:.2} / {:.2} / {:.2}",
                s.runtime_voluntary, s.writer_voluntary, s.broker_io_voluntary
            )
        },
    );
    row("ctx switches/job steady: voluntary / involuntary", &|c| {
        let s = &c.cpu_steady.switches;
        format!("{:.2} / {:.2}", s.voluntary, s.involuntary)
    });
    if child {
        row("CPU µs/job backlog / steady: bench process", &|c| {
            let f = |p: &cpu::PerJob| p.bench_us.map_or("-".into(), |us| format!("{us:.0}"));
            format!("{} / {}", f(&c.cpu_backlog), f(&c.cpu_steady))
        });
    }
    let ceil_cpu = ceil.cpu.process_us;
    row("CPU µs/job backlog above the ceiling's", &|c| {
        format!(
            "{:.0}",
            CaseResult::all_process_us(&c.cpu_backlog) - ceil_cpu
        )
    });
    row("CPU µs/job steady: process (writer)", &|c| {
        format!(
            "{:.0} ({:.0} writer)",
            c.cpu_steady.process_us, c.cpu_steady.writer_us
        )
    });
    row("broker CPU µs/msg backlog / steady", &|c| {
        format!(
            "{} / {}",
            broker_us(&c.cpu_backlog),
            broker_us(&c.cpu_steady)
        )
    });
    row("steady: commits per job (rows per commit)", &|c| {
        format!(
            "{:.2} ({:.1})",
            c.steady_commits_per_job, c.steady_rows_per_commit
        )
    });
    // The same paced rate through the bare loop: what the broker (and the whole
    // machine) spends per message when the worker is not in the path.
    row("steady broker CPU µs/msg: worker / broker-only", &|c| {
        let bo = c.broker_steady_cpu.as_ref().map_or("-".into(), broker_us);
        format!("{} / {bo}", broker_us(&c.cpu_steady))
    });
    row("steady cores busy (machine): worker / broker-only", &|c| {
        let cores = |p: Option<&cpu::PerJob>| {
            p.and_then(|p| p.machine_us)
                .map_or("-".into(), |us| format!("{:.2}", us * c.steady_rate / 1e6))
        };
        format!(
            "{} / {}",
            cores(Some(&c.cpu_steady)),
            cores(c.broker_steady_cpu.as_ref())
        )
    });
    if pg {
        row("PostgreSQL CPU µs/job backlog / steady", &|c| {
            let f = |p: &cpu::PerJob| p.postgres_us.map_or("n/a".into(), |us| format!("{us:.0}"));
            format!("{} / {}", f(&c.cpu_backlog), f(&c.cpu_steady))
        });
        row("PostgreSQL transactions per job", &|c| {
            c.pg_xacts_per_job
                .map_or("n/a".into(), |x| format!("{x:.2}"))
        });
        row("PostgreSQL round trips per job", &|c| {
            c.pg_round_trips_per_job
                .map_or("n/a".into(), |x| format!("{x:.2}"))
        });
    }
    row("cores busy backlog: process/broker/pg/all", &|c| {
        let (p, b, g, m) = cores(c);
        let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        format!("{p:.2}/{}/{}/{}", f(b), f(g), f(m))
    });
    row("bounded by", &|c| bound(c, ce));
    row(
        "outage: Midas down s / calls refused",
        &|c| match c.outage {
            Some(o) => format!("{:.1} / {}", o.outage_s, o.refused_calls),
            None => "-".into(),
        },
    );
    row(
        "outage: drain jobs/s (× fresh backlog)",
        &|c| match c.outage {
            Some(o) => format!(
                "{:.0} (× {:.2})",
                o.drain_jobs_per_s,
                o.drain_jobs_per_s / c.jobs_per_s
            ),
            None => "-".into(),
        },
    );
    row("outage: drain s / CPU µs/job", &|c| match c.outage {
        Some(o) => format!("{:.2} / {:.0}", o.drain_s, o.cpu_drain.process_us),
        None => "-".into(),
    });
    row("worker startup → consuming ms", &|c| {
        format!("{:.0}", c.startup_ms)
    });
    if pg {
        row("first → all workers consuming ms", &|c| {
            format!("{:.0}", c.all_consuming_ms)
        });
    }
    if child {
        row(
            "child worker exit 0 after SIGTERM",
            &|c| match c.worker_exit_ok {
                Some(ok) => mark(ok).to_string(),
                None => "-".into(),
            },
        );
    }
    row("overlapping calls for a player", &|c| {
        format!("{} {}", c.overlapping_calls, mark(c.overlapping_calls == 0))
    });
    row("exactly once (ledger)", &|c| {
        mark(c.ledger_ok && c.not_succeeded == 0).to_string()
    });
    println!();
    for c in cases {
        let t = targets(c, ce);
        let who = if c.outbox == "postgres" {
            format!("pg {}w {}ms", c.workers, c.midas_latency_ms)
        } else {
            format!("{}ms", c.midas_latency_ms)
        };
        println!(
            "{who}: throughput {}; ledger: {}; replies not succeeded: {}; duplicate replies: {}",
            t.throughput_rule, c.ledger_note, c.not_succeeded, c.duplicate_replies
        );
    }
}

pub(super) fn to_json(
    a: &BenchArgs,
    settings: &Settings,
    ceil: &CeilingResult,
    cases: &[CaseResult],
) -> serde_json::Value {
    let ce = ceil.msgs_per_s;
    let cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            let t = targets(c, ce);
            let mut v = serde_json::to_value(c).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("ratio_to_ceiling".into(), json!(c.jobs_per_s / ce));
                o.insert("bounded_by".into(), json!(bound(c, ce)));
                o.insert(
                    "cpu_backlog_above_ceiling_us".into(),
                    json!(CaseResult::all_process_us(&c.cpu_backlog) - ceil.cpu.process_us),
                );
                let (added50, added99) = c.worker_added_ms();
                o.insert("worker_added_p50_ms".into(), json!(added50));
                o.insert("worker_added_p99_ms".into(), json!(added99));
                o.insert(
                    "targets".into(),
                    json!({
                        "throughput": {"rule": t.throughput_rule, "min_jobs_per_s": t.throughput_min, "ok": t.throughput_ok},
                        "worker_added_p99": {"rule": "steady e2e p99 − broker-only steady p99 ≤ Midas latency + 10 ms", "max_ms": t.steady_max_ms, "ok": t.steady_ok},
                        "peak_rss_64mb_at_100k": t.rss_ok,
                        "exactly_once": c.ledger_ok && c.not_succeeded == 0,
                        "no_overlapping_calls": c.overlapping_calls == 0,
                    }),
                );
            }
            v
        })
        .collect();
    json!({
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "jobs": a.jobs,
        "users": a.users,
        "api": a.api,
        "prefetch": settings.config.broker.prefetch,
        "max_rps": a.max_rps,
        "steady_secs": a.steady.as_secs_f64(),
        "ceiling_msgs_per_s": ce,
        "ceiling_elapsed_s": ceil.elapsed.as_secs_f64(),
        "ceiling_cpu_per_msg": ceil.cpu,
        "outbox": if a.outbox.is_some() { "postgres" } else { "sqlite" },
        "workers": a.workers,
        "worker": if a.worker == WorkerMode::Child { "child" } else { "inproc" },
        "cpu_note": "µs of user+sys per job; process = every worker of the case (the sum, with several in-process workers) + the bench's reply consumer (and its publisher in the steady phase), simulator excluded when a child process; with --worker child, process = the child worker alone and bench = this process (reply consumer, publisher); broker = the whole local beam.smp; postgres = every local postgres process (the whole server); switches = context switches per job of the worker's process (all its threads, from /proc/<pid>/task/*/status)",
        "cases": cases,
    })
}
