//! CPU accounting for the bench: user+sys time of this process (the worker runs in
//! it), split by thread name (`outbox-writer`, the tokio runtime threads, lapin's
//! I/O threads, the rest: the bench's main thread), and of the local RabbitMQ
//! (`beam.smp`), read from `/proc`. Divided by jobs it gives the CPU a job costs.
//!
//! With a PostgreSQL outbox, the local server's CPU is read too: every process
//! named `postgres` (its user+sys, plus the time of children it has reaped, so
//! backends that exited between two readings still count).
//!
//! With `--worker child` the worker is a child process: the "process" figures (and
//! the per-thread split) are the child's, and this process's own CPU (reply
//! consumer, publisher) is reported apart as `bench_us`.
//!
//! Context switches are read beside the CPU: voluntary (a thread blocked: waiting
//! for a channel, a lock, the socket, fsync) and involuntary (preempted), summed
//! over the worker's threads (`/proc/<pid>/task/*/status`; threads that exited
//! between two readings are not counted). Each hand-off between the worker's
//! threads that finds the other one asleep costs a voluntary switch on each side.
//!
//! The simulator runs as a child process by default, so its CPU is not counted.
//! The bench's reply consumer (and, in the steady phase, its publisher) share this
//! process: the ceiling run carries the same reply consumer, so
//! `worker − ceiling` per message is the worker's cost above the bare minimum.

use std::collections::HashMap;
use std::path::Path;

/// `/proc` times are in USER_HZ ticks, 100 per second on Linux.
const TICK_US: u64 = 10_000;

/// The processes read besides this one.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pids {
    /// The local RabbitMQ (`beam.smp`), if found.
    pub broker: Option<u32>,
    /// The worker when it runs as a child process (`--worker child`).
    pub worker: Option<u32>,
}

impl Pids {
    /// The broker (looked up in `/proc`), the worker in this process.
    pub(super) fn broker_only() -> Pids {
        Pids {
            broker: find_broker(),
            worker: None,
        }
    }
}

/// Cumulative CPU at one instant, in µs.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    /// The worker's process: this one, or the child worker.
    process_us: u64,
    /// This process, when the worker is a child.
    bench_us: Option<u64>,
    /// tid → (thread name, µs)
    threads: HashMap<u32, (String, u64)>,
    /// tid → (voluntary, involuntary) context switches
    switches: HashMap<u32, (u64, u64)>,
    broker_us: Option<u64>,
    postgres_us: Option<u64>,
    machine_us: Option<u64>,
}

/// CPU per job (or per message) between two snapshots, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub(super) struct PerJob {
    /// The worker's process: the whole bench process (worker + the bench's reply
    /// consumer), or the child worker alone with `--worker child`.
    pub process_us: f64,
    /// With `--worker child`: this (bench) process, the reply consumer and publisher.
    pub bench_us: Option<f64>,
    /// The tokio runtime threads (`tokio-rt-worker` / `tokio-runtime-w`: dispatcher,
    /// intake, HTTP client, reply publishing, and the bench's reply consumer).
    pub runtime_us: f64,
    /// The `outbox-writer` thread (SQLite, group commits).
    pub writer_us: f64,
    /// The broker client's I/O threads (`lapin-io-loop`: the worker's and the bench's).
    pub broker_io_us: f64,
    /// Everything else in the process (the bench's main thread, exited threads).
    pub other_us: f64,
    /// The local `beam.smp`, if found (the whole broker, other clients included).
    pub broker_us: Option<f64>,
    /// Every local `postgres` process, if any (the whole server: other databases'
    /// clients included).
    pub postgres_us: Option<f64>,
    /// The whole machine's busy time (`/proc/stat`, all cores: every process,
    /// the simulator and other users of the machine included).
    pub machine_us: Option<f64>,
    /// Context switches of the worker's process per job (all its threads).
    pub switches: Switches,
}

/// Context switches per job of the worker's process (the bench process with an
/// in-process worker, its own threads included).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub(super) struct Switches {
    /// Voluntary (the thread blocked), all threads.
    pub voluntary: f64,
    /// Involuntary (the thread was preempted), all threads.
    pub involuntary: f64,
    /// Voluntary, of the tokio runtime threads.
    pub runtime_voluntary: f64,
    /// Voluntary, of the `outbox-writer` thread.
    pub writer_voluntary: f64,
    /// Voluntary, of lapin's I/O threads.
    pub broker_io_voluntary: f64,
}

/// (thread name, user+sys µs) from the text of a `/proc/.../stat` file.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let mut fields = text.get(close + 1..)?.split_whitespace();
    // after ")": state is field 3; utime and stime are fields 14 and 15
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((name, (utime + stime) * TICK_US))
}

/// (user+sys, reaped children's user+sys) in µs from the text of a `/proc/<pid>/stat`.
fn parse_stat_with_children(text: &str) -> Option<(u64, u64)> {
    let close = text.rfind(')')?;
    let mut fields = text.get(close + 1..)?.split_whitespace();
    let mut next = |skip: usize| -> Option<u64> { fields.nth(skip)?.parse().ok() };
    let utime = next(11)?;
    let stime = next(0)?;
    let cutime = next(0)?;
    let cstime = next(0)?;
    Some(((utime + stime) * TICK_US, (cutime + cstime) * TICK_US))
}

/// The CPU of every local `postgres` process, children reaped included; `None`
/// when there is none.
fn postgres_cpu() -> Option<u64> {
    let mut total = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if e.file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let is_pg = text
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .is_some_and(|(name, _)| name == "postgres");
        if let Some((own, children)) = is_pg.then(|| parse_stat_with_children(&text)).flatten() {
            *total.get_or_insert(0) += own + children;
        }
    }
    total
}

/// Busy time of all cores (user, nice, system, irq, softirq, steal) in µs from
/// the text of `/proc/stat`.
fn parse_machine(text: &str) -> Option<u64> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).unwrap_or(&0);
    Some(busy * TICK_US)
}

/// (voluntary, involuntary) context switches from the text of a `/proc/.../status`.
fn parse_switches(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

fn read_stat(path: &Path) -> Option<(String, u64)> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// The pid of a local RabbitMQ (`beam.smp`), if one is visible in `/proc`.
pub(super) fn find_broker() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// Read the worker process's CPU (total and per thread: this process, or the
/// child worker), the bench's own when the worker is a child, and the broker's.
pub(super) fn snapshot(pids: Pids) -> Snapshot {
    let proc_dir = match pids.worker {
        Some(pid) => Path::new("/proc").join(pid.to_string()),
        None => Path::new("/proc/self").to_path_buf(),
    };
    let process_us = read_stat(&proc_dir.join("stat")).map_or(0, |(_, us)| us);
    let bench_us = pids
        .worker
        .and_then(|_| read_stat(Path::new("/proc/self/stat")))
        .map(|(_, us)| us);
    let broker = pids.broker;
    let mut threads = HashMap::new();
    let mut switches = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(proc_dir.join("task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(t) = read_stat(&e.path().join("stat")) {
                threads.insert(tid, t);
            }
            let status = std::fs::read_to_string(e.path().join("status")).ok();
            if let Some(s) = status.as_deref().and_then(parse_switches) {
                switches.insert(tid, s);
            }
        }
    }
    let broker_us = broker
        .and_then(|pid| read_stat(&Path::new("/proc").join(pid.to_string()).join("stat")))
        .map(|(_, us)| us);
    Snapshot {
        process_us,
        bench_us,
        threads,
        switches,
        broker_us,
        postgres_us: postgres_cpu(),
        machine_us: std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_machine(&t)),
    }
}

/// CPU used between `a` and `b`, divided by `jobs`.
pub(super) fn per_job(a: &Snapshot, b: &Snapshot, jobs: usize) -> PerJob {
    let n = jobs.max(1) as f64;
    let (mut runtime, mut writer, mut io) = (0u64, 0u64, 0u64);
    let (mut vol, mut invol) = (0u64, 0u64);
    let (mut runtime_vol, mut writer_vol, mut io_vol) = (0u64, 0u64, 0u64);
    for (tid, (name, us)) in &b.threads {
        let before = a.threads.get(tid).map_or(0, |(_, us)| *us);
        let d = us.saturating_sub(before);
        let (v1, i1) = b.switches.get(tid).copied().unwrap_or_default();
        let (v0, i0) = a.switches.get(tid).copied().unwrap_or_default();
        let dv = v1.saturating_sub(v0);
        vol += dv;
        invol += i1.saturating_sub(i0);
        if name == "outbox-writer" {
            writer += d;
            writer_vol += dv;
        } else if name.starts_with("tokio-r") {
            runtime += d;
            runtime_vol += dv;
        } else if name.starts_with("lapin") {
            io += d;
            io_vol += dv;
        }
    }
    let process = b.process_us.saturating_sub(a.process_us);
    PerJob {
        process_us: process as f64 / n,
        runtime_us: runtime as f64 / n,
        writer_us: writer as f64 / n,
        broker_io_us: io as f64 / n,
        other_us: process.saturating_sub(runtime + writer + io) as f64 / n,
        bench_us: match (a.bench_us, b.bench_us) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / n),
            _ => None,
        },
        broker_us: match (a.broker_us, b.broker_us) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / n),
            _ => None,
        },
        postgres_us: match (a.postgres_us, b.postgres_us) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / n),
            _ => None,
        },
        machine_us: match (a.machine_us, b.machine_us) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / n),
            _ => None,
        },
        switches: Switches {
            voluntary: vol as f64 / n,
            involuntary: invol as f64 / n,
            runtime_voluntary: runtime_vol as f64 / n,
            writer_voluntary: writer_vol as f64 / n,
            broker_io_voluntary: io_vol as f64 / n,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_thread_names_parse() {
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(("a (b) c".into(), 175 * TICK_US)));
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_stat_with_children(line), Some((175 * TICK_US, 0)));
        let stat = "cpu  10 1 5 100 7 2 3 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine(stat), Some(21 * TICK_US));
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), Some((120, 7)));
        assert_eq!(parse_switches("Name:\tx\n"), None);
        let reaped = "7 (postgres) S 1 2 3 4 5 6 7 8 9 10 3 2 40 60 20 0 1 0";
        assert_eq!(
            parse_stat_with_children(reaped),
            Some((5 * TICK_US, 100 * TICK_US))
        );
    }

    #[test]
    fn cpu_burnt_by_a_plain_thread_counts_for_the_process_not_the_writer() {
        let a = snapshot(Pids::default());
        let mut x = 0u64;
        // burn CPU until /proc shows at least 30 ms more (bounded, never a timer)
        for _ in 0..10_000 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            if snapshot(Pids::default()).process_us >= a.process_us + 30_000 {
                break;
            }
        }
        let p = per_job(&a, &snapshot(Pids::default()), 10);
        assert!(p.process_us >= 3_000.0, "{p:?}");
        assert_eq!(p.writer_us, 0.0, "{p:?}");
        assert!(p.other_us > 0.0, "{p:?}");
        assert!(p.broker_us.is_none());
    }

    #[test]
    fn a_thread_that_blocks_counts_voluntary_switches() {
        let a = snapshot(Pids::default());
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let p = per_job(&a, &snapshot(Pids::default()), 1);
        // this thread slept 200 times: each sleep is a voluntary switch
        assert!(p.switches.voluntary >= 200.0, "{p:?}");
    }
}
