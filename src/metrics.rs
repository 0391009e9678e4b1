//! Prometheus metrics, in one place: counters and histograms updated on the hot
//! path (a short mutex per update), gauges read from the outbox by a scrape at most
//! once per [`GAUGE_TTL`] ([`GaugeCache`]: a scrape storm is one query per period).
//! Label values are fixed vocabularies (ops, states, errcodes, classes): never a
//! bill_no, openid or secret.
//!
//! Counters and histograms are process-wide ([`METRICS`]); outbox gauge reads are
//! counted per HTTP server ([`GaugeCache`]), and readiness is per worker: each
//! worker owns a [`Health`] handle that its broker session sets, its reply relay
//! and `/readyz` read, and its `/metrics` reports, so two workers in one process
//! never see each other's broker link.
//!
//! This module imports nothing from the outbox (whose writers count commits here):
//! the HTTP layer reads the outbox ([`crate::outbox::Location::gauges`], the write
//! status) and hands the plain numbers in ([`OutboxGauges`], [`OutboxWrites`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::command::now_ms;

/// Upper bounds of the Midas latency histogram, seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the commit batch size histogram.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    commands: BTreeMap<(String, String), u64>,
    calls: BTreeMap<(String, String, String), u64>,
    latency: BTreeMap<String, Histogram>,
    retries: BTreeMap<String, u64>,
    batch: Histogram,
}

/// The process-wide metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    commits: AtomicU64,
    rows_committed: AtomicU64,
    replies_published: AtomicU64,
    midas_calls: AtomicU64,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// One worker's readiness state, shared by its broker session (writer), its reply
/// relay, `/readyz` and `/metrics` (readers). Cheap to clone; clones share the state.
#[derive(Clone, Default, Debug)]
pub struct Health {
    broker_connected: Arc<AtomicBool>,
}

impl Health {
    /// A new handle: broker not connected yet.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_broker_connected(&self, up: bool) {
        self.broker_connected.store(up, Ordering::Relaxed);
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
    }
}

/// Gauges read from the outbox at scrape time.
#[derive(Default, Clone)]
pub struct Snapshot {
    pub jobs_by_state: Vec<(String, i64)>,
    pub oldest_pending_age_seconds: f64,
    pub replies_pending: i64,
    /// Reads of the outbox for gauges by this server's cache so far (at most one
    /// per [`GAUGE_TTL`]); per server, so another worker's scrapes do not count.
    pub gauge_reads: u64,
}

/// How long outbox gauges read by one scrape serve the next ones.
pub const GAUGE_TTL: Duration = Duration::from_secs(5);

/// The outbox gauges of the last read, shared by scrapes. Scrapes queue on one
/// async lock, so concurrent scrapes of a stale cache cause one read, not one each.
#[derive(Default)]
pub struct GaugeCache {
    last: tokio::sync::Mutex<Option<(Instant, OutboxGauges)>>,
    reads: AtomicU64,
}

/// One read of the outbox, as plain numbers (the caller reads it; this module knows
/// no outbox): the oldest pending job as a time (its age is computed at each
/// scrape, so it keeps growing between reads).
#[derive(Clone, Default, Debug)]
pub struct OutboxGauges {
    pub jobs_by_state: Vec<(String, i64)>,
    pub oldest_pending_ms: Option<i64>,
    pub replies_pending: i64,
}

/// The outbox's write health as shown by `/metrics` (plain numbers from the
/// outbox's own status).
#[derive(Clone, Copy, Default, Debug)]
pub struct OutboxWrites {
    pub writable: bool,
    pub failed_commits: u64,
    pub episodes: u64,
}

impl GaugeCache {
    /// The gauges: `read` (a read of the outbox, `None` when it failed) is awaited
    /// only when the last read is older than [`GAUGE_TTL`]. An unreadable outbox
    /// gives zeros (and is read again next time).
    pub async fn snapshot(&self, read: impl Future<Output = Option<OutboxGauges>>) -> Snapshot {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < GAUGE_TTL)
            .map(|(_, r)| r.clone());
        let read = match fresh {
            Some(r) => r,
            None => {
                let r = read.await;
                self.reads.fetch_add(1, Ordering::Relaxed);
                *last = r.clone().map(|r| (Instant::now(), r));
                r.unwrap_or_default()
            }
        };
        Snapshot {
            jobs_by_state: read.jobs_by_state,
            oldest_pending_age_seconds: read
                .oldest_pending_ms
                .map_or(0.0, |t| ((now_ms() - t).max(0) as f64) / 1000.0),
            replies_pending: read.replies_pending,
            gauge_reads: self.reads.load(Ordering::Relaxed),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// A command arrived: `outcome` is accepted, joined, rejected, conflict, reopened or answered.
    pub fn command(&self, op: &str, outcome: &str) {
        self.with(|i| *i.commands.entry((op.into(), outcome.into())).or_default() += 1);
    }

    pub fn midas_call(&self, api: &str, errcode: Option<i64>, class: &str, seconds: f64) {
        let code = errcode.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.midas_calls.fetch_add(1, Ordering::Relaxed);
        self.with(|i| {
            *i.calls.entry((api.into(), code, class.into())).or_default() += 1;
            i.latency
                .entry(api.into())
                .or_default()
                .observe(&LATENCY_BUCKETS, seconds);
        });
    }

    /// Count one call to Midas and its latency.
    pub fn observe(&self, a: &crate::midas::Answer) {
        self.midas_call(
            a.api.name(),
            a.errcode,
            a.class.as_str(),
            a.latency.as_secs_f64(),
        );
    }

    pub fn retry(&self, op: &str) {
        self.with(|i| *i.retries.entry(op.into()).or_default() += 1);
    }

    pub fn outbox_commit(&self, rows: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.rows_committed
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.with(|i| i.batch.observe(&BATCH_BUCKETS, rows as f64));
    }

    pub fn reply_published(&self, n: u64) {
        self.replies_published.fetch_add(n, Ordering::Relaxed);
    }

    /// (commits, rows committed, Midas calls, replies published) so far, for `bench`.
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        (
            self.commits.load(Ordering::Relaxed),
            self.rows_committed.load(Ordering::Relaxed),
            self.midas_calls.load(Ordering::Relaxed),
            self.replies_published.load(Ordering::Relaxed),
        )
    }

    /// Seconds spent in Midas calls and how many calls were timed, over all APIs
    /// (the bench's mean call time as the worker saw it).
    pub fn call_time(&self) -> (f64, u64) {
        let mut t = (0.0, 0);
        self.with(|i| {
            for h in i.latency.values() {
                t.0 += h.sum;
                t.1 += h.count;
            }
        });
        t
    }

    /// The Prometheus text exposition; `health` is the scraped worker's readiness.
    pub fn render(&self, snap: &Snapshot, health: &Health, outbox: &OutboxWrites) -> String {
        let mut out = String::with_capacity(8192);
        let p = "midas_worker";
        self.with(|i| {
            family(&mut out, &format!("{p}_commands_received_total"), "counter", "Commands received, by op and outcome.");
            for ((op, outcome), v) in &i.commands {
                let _ = writeln!(out, "{p}_commands_received_total{{op=\"{op}\",outcome=\"{outcome}\"}} {v}");
            }
            family(&mut out, &format!("{p}_midas_calls_total"), "counter", "Calls to Midas by api, errcode and outcome class.");
            for ((api, code, class), v) in &i.calls {
                let _ = writeln!(out, "{p}_midas_calls_total{{api=\"{api}\",errcode=\"{code}\",class=\"{class}\"}} {v}");
            }
            family(&mut out, &format!("{p}_midas_call_duration_seconds"), "histogram", "Midas call latency.");
            for (api, h) in &i.latency {
                h.render(&mut out, &format!("{p}_midas_call_duration_seconds"), &format!("api=\"{api}\""), &LATENCY_BUCKETS);
            }
            family(&mut out, &format!("{p}_retries_total"), "counter", "Calls scheduled again with the same bill_no.");
            for (op, v) in &i.retries {
                let _ = writeln!(out, "{p}_retries_total{{op=\"{op}\"}} {v}");
            }
            family(&mut out, &format!("{p}_outbox_commit_batch_size"), "histogram", "Requests per outbox transaction.");
            i.batch.render(&mut out, &format!("{p}_outbox_commit_batch_size"), "", &BATCH_BUCKETS);
        });
        let commits = self.commits.load(Ordering::Relaxed);
        series(
            &mut out,
            &format!("{p}_outbox_commits_total"),
            "counter",
            "Outbox transactions committed.",
            commits,
        );
        let published = self.replies_published.load(Ordering::Relaxed);
        series(
            &mut out,
            &format!("{p}_replies_published_total"),
            "counter",
            "Replies confirmed by the broker.",
            published,
        );
        let broker = u8::from(health.broker_connected());
        series(
            &mut out,
            &format!("{p}_broker_connected"),
            "gauge",
            "1 when the broker connection is up.",
            broker,
        );
        let help = format!(
            "Outbox reads for the gauges below (at most one per {}s).",
            GAUGE_TTL.as_secs()
        );
        series(
            &mut out,
            &format!("{p}_gauge_reads_total"),
            "counter",
            &help,
            snap.gauge_reads,
        );
        family(
            &mut out,
            &format!("{p}_jobs"),
            "gauge",
            "Jobs in the outbox by state.",
        );
        for state in ["pending", "succeeded", "failed", "unknown"] {
            let v = snap
                .jobs_by_state
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, v)| *v);
            let _ = writeln!(out, "{p}_jobs{{state=\"{state}\"}} {v}");
        }
        let age = snap.oldest_pending_age_seconds;
        series(
            &mut out,
            &format!("{p}_oldest_pending_job_age_seconds"),
            "gauge",
            "Age of the oldest non-final job.",
            age,
        );
        let pending = snap.replies_pending;
        series(
            &mut out,
            &format!("{p}_replies_pending"),
            "gauge",
            "Reply targets not yet confirmed by the broker.",
            pending,
        );
        let writable = u8::from(outbox.writable);
        series(
            &mut out,
            &format!("{p}_outbox_writable"),
            "gauge",
            "1 when the outbox can write (commands are taken); 0 while it cannot.",
            writable,
        );
        series(&mut out, &format!("{p}_outbox_write_failures_total"), "counter", "Outbox commits that failed on a storage condition (disk full, read-only, database away).", outbox.failed_commits);
        series(
            &mut out,
            &format!("{p}_outbox_unwritable_episodes_total"),
            "counter",
            "Times the outbox stopped being able to write.",
            outbox.episodes,
        );
        out
    }
}

/// Write the `# HELP` and `# TYPE` lines of metric family `name` (`kind` is
/// `counter`, `gauge` or `histogram`); its samples follow.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Write one unlabelled series: its HELP and TYPE lines and its value.
pub fn series(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}
