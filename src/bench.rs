//! `midas-worker bench`: end-to-end throughput and latency, with the broker's own
//! ceiling measured in the same run (so the ratio means something on a noisy box).
//!
//! 1. **ceiling**: a bare lapin loop doing what the worker minimally must on quorum
//!    queues: N commands pre-published to a quorum queue; consume with manual ack
//!    (the worker's prefetch) → publish each to a quorum reply queue with pipelined
//!    confirms → ack in order, batched with `multiple`. A reply consumer (the game
//!    server's side) reads the replies, as in the worker runs.
//! 2. **worker**, for each Midas latency: a Midas simulator with that latency, the
//!    real worker in-process (outbox in a temp dir, `synchronous=FULL` as shipped),
//!    N pay/present commands pre-published (backlog), timed from the moment the
//!    worker's consumer is registered to the N-th reply; then a steady-rate phase
//!    (`--rate`, default half the backlog throughput) for latency percentiles.
//!    Every bill_no must be in the simulator's ledger exactly once.
//!
//! Queues are unique per run and deleted at the end; the outbox directory is removed
//! unless `--keep`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use serde_json::json;
use tokio::sync::mpsc;

use crate::broker::{connect, declare_topology};
use crate::config::{BrokerConfig, Environment, Settings};
use crate::metrics::METRICS;
use crate::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};

/// How the Midas simulator runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// A `midas-worker simulate` child process: its ledger (one entry per bill) and
    /// its CPU time are not counted in this process's peak RSS.
    Child,
    /// In this process (SimHandle), sharing the runtime with the worker.
    Inproc,
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
    /// Give up when no reply arrives for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}

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
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
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

// ---------------------------------------------------------------- reply sink

#[derive(Default)]
struct Phase {
    seen: Vec<bool>,
    distinct: usize,
    duplicates: usize,
    not_succeeded: usize,
    latencies_us: Vec<u64>,
    last: Option<Instant>,
}

#[derive(Default)]
struct SinkState {
    phases: HashMap<char, Phase>,
    unparsable: usize,
}

/// Consumes a reply queue (no_ack, as cheap as a game server can be) and records,
/// per phase, which sequence numbers answered and the publish → reply latency
/// (the publish time travels in the correlation_id: `{phase}{seq}.{micros}`).
#[derive(Clone)]
struct Sink {
    state: Arc<Mutex<SinkState>>,
    total: Arc<AtomicU64>,
}

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect(&self, phase: char, n: usize) {
        let mut st = self.lock();
        let p = st.phases.entry(phase).or_default();
        p.seen = vec![false; n];
        p.latencies_us = Vec::with_capacity(n);
    }

    async fn start(
        ch: &Channel,
        queue: &str,
        check_status: bool,
    ) -> anyhow::Result<(Sink, tokio::task::JoinHandle<()>)> {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "midas-worker-bench-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consuming the reply queue")?;
        let sink = Sink {
            state: Arc::default(),
            total: Arc::default(),
        };
        let s = sink.clone();
        let task = tokio::spawn(async move {
            #[derive(serde::Deserialize)]
            struct Status {
                status: Option<String>,
            }
            while let Some(Ok(d)) = consumer.next().await {
                let now = Instant::now();
                let corr = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str().to_string())
                    .unwrap_or_default();
                let ok = !check_status
                    || serde_json::from_slice::<Status>(&d.data)
                        .ok()
                        .and_then(|r| r.status)
                        .as_deref()
                        == Some("succeeded");
                s.record(&corr, now, ok);
            }
        });
        Ok((sink, task))
    }

    fn record(&self, corr: &str, now: Instant, ok: bool) {
        let mut st = self.lock();
        let parsed = (|| {
            let phase = corr.chars().next()?;
            let (seq, ts) = corr.get(1..)?.split_once('.')?;
            Some((phase, seq.parse::<usize>().ok()?, ts.parse::<u64>().ok()?))
        })();
        let Some((phase, seq, ts)) = parsed else {
            st.unparsable += 1;
            return;
        };
        let Some(p) = st.phases.get_mut(&phase) else {
            st.unparsable += 1;
            return;
        };
        match p.seen.get_mut(seq) {
            Some(s) if !*s => {
                *s = true;
                p.distinct += 1;
                p.latencies_us.push(at_us(now).saturating_sub(ts));
                p.last = Some(now);
                if !ok {
                    p.not_succeeded += 1;
                }
            }
            Some(_) => p.duplicates += 1,
            None => {
                st.unparsable += 1;
                return;
            }
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn distinct(&self, phase: char) -> usize {
        self.lock().phases.get(&phase).map_or(0, |p| p.distinct)
    }

    /// Wait for `n` distinct replies of `phase`; fails after `stall` without progress.
    async fn wait(&self, phase: char, n: usize, stall: Duration) -> anyhow::Result<Instant> {
        let mut last_total = self.total.load(Ordering::Relaxed);
        let mut last_progress = Instant::now();
        loop {
            {
                let st = self.lock();
                if let Some(p) = st.phases.get(&phase) {
                    if p.distinct >= n {
                        return Ok(p.last.unwrap_or_else(Instant::now));
                    }
                }
            }
            let total = self.total.load(Ordering::Relaxed);
            if total != last_total {
                last_total = total;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > stall {
                bail!(
                    "no reply for {stall:?}: only {} of {n} replies in phase {phase}",
                    self.distinct(phase)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// (p50 ms, p99 ms, duplicates, not succeeded).
    fn summary(&self, phase: char) -> (f64, f64, usize, usize) {
        let mut st = self.lock();
        let Some(p) = st.phases.get_mut(&phase) else {
            return (f64::NAN, f64::NAN, 0, 0);
        };
        p.latencies_us.sort_unstable();
        (
            percentile(&p.latencies_us, 0.50),
            percentile(&p.latencies_us, 0.99),
            p.duplicates,
            p.not_succeeded,
        )
    }
}

// ---------------------------------------------------------------- publisher

/// A fast publisher: persistent messages, confirms pipelined (a bounded window
/// awaited in order by a helper task), never one-at-a-time.
struct FastPublisher {
    ch: Channel,
    confirms: mpsc::Sender<PublisherConfirm>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl FastPublisher {
    async fn new(conn: &Connection) -> anyhow::Result<FastPublisher> {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (tx, mut rx) = mpsc::channel::<PublisherConfirm>(PUBLISH_WINDOW);
        let task = tokio::spawn(async move {
            let (mut acks, mut nacks) = (0u64, 0u64);
            while let Some(c) = rx.recv().await {
                match c.await {
                    Ok(c) if c.is_ack() => acks += 1,
                    _ => nacks += 1,
                }
            }
            (acks, nacks)
        });
        Ok(FastPublisher {
            ch,
            confirms: tx,
            task,
        })
    }

    async fn send(
        &self,
        queue: &str,
        body: &[u8],
        correlation_id: &str,
        reply_to: &str,
    ) -> anyhow::Result<()> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.into())
            .with_reply_to(reply_to.into());
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?;
        self.confirms
            .send(confirm)
            .await
            .map_err(|_| anyhow::anyhow!("confirm task stopped"))?;
        Ok(())
    }

    /// Wait for every confirm; an error if any was not an ack.
    async fn finish(self) -> anyhow::Result<u64> {
        drop(self.confirms);
        let (acks, nacks) = self.task.await?;
        let _ = self.ch.close(200, "bye".into()).await;
        if nacks > 0 {
            bail!("{nacks} bench publishes were not confirmed by the broker");
        }
        Ok(acks)
    }
}

fn command_body(bill_no: &str, seq: usize, users: usize, v2: bool) -> String {
    let openid = format!("bench-u{}", seq % users.max(1));
    // 2.0 signs every call with the player's session_key
    let key = if v2 {
        r#","session_key":"bench-session-key""#
    } else {
        ""
    };
    if seq % 2 == 0 {
        format!(r#"{{"op":"pay","bill_no":"{bill_no}","openid":"{openid}","amt":1{key}}}"#)
    } else {
        format!(
            r#"{{"op":"present","bill_no":"{bill_no}","openid":"{openid}","present_counts":1{key}}}"#
        )
    }
}

/// Publish `n` commands of `phase`, optionally paced at `rate` per second.
#[allow(clippy::too_many_arguments)]
async fn publish_commands(
    conn: &Connection,
    queue: &str,
    reply_to: &str,
    phase: char,
    bill_prefix: &str,
    n: usize,
    users: usize,
    rate: Option<f64>,
    v2: bool,
) -> anyhow::Result<Duration> {
    let p = FastPublisher::new(conn).await?;
    let started = tokio::time::Instant::now();
    for seq in 0..n {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(seq as f64 / r);
            if tokio::time::Instant::now() < due {
                tokio::time::sleep_until(due).await;
            }
        }
        let bill = format!("{bill_prefix}{phase}{seq}");
        let body = command_body(&bill, seq, users, v2);
        let corr = format!("{phase}{seq}.{}", now_us());
        p.send(queue, body.as_bytes(), &corr, reply_to).await?;
    }
    let acks = p.finish().await?;
    if acks as usize != n {
        bail!("only {acks} of {n} commands confirmed");
    }
    Ok(started.elapsed())
}

// ---------------------------------------------------------------- simulator

enum Sim {
    Inproc(SimHandle),
    Child {
        child: tokio::process::Child,
        url: String,
    },
}

impl Sim {
    async fn start(mode: SimMode, settings: &Settings, latency: Duration) -> anyhow::Result<Sim> {
        let latency_ms = latency.as_millis() as u64;
        if mode == SimMode::Child {
            match Sim::start_child(settings, latency).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    eprintln!("bench: cannot start the simulator as a child process ({e:#}); running it in-process")
                }
            }
        }
        let mut cfg = settings.config.simulator.clone();
        cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.initial_balance = SIM_BALANCE;
        let h = Simulator::new(cfg, SimApp::from_settings(settings))
            .start()
            .await?;
        h.set_faults(Faults {
            latency_ms,
            ..Faults::default()
        });
        Ok(Sim::Inproc(h))
    }

    async fn start_child(settings: &Settings, latency: Duration) -> anyhow::Result<Sim> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe()?;
        let config = PathBuf::from(&settings.source);
        if !config.is_file() {
            bail!("config source {:?} is not a file", settings.source);
        }
        let mut child = tokio::process::Command::new(exe)
            .arg("--config")
            .arg(&config)
            .arg("simulate")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--initial-balance")
            .arg(SIM_BALANCE.to_string())
            .arg("--latency")
            .arg(format!("{}ms", latency.as_millis()))
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    return Ok::<_, anyhow::Error>(url.to_string());
                }
            }
            bail!("the simulator exited before listening")
        })
        .await
        .context("waiting for the simulator")??;
        // keep draining its stdout so it never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Sim::Child { child, url })
    }

    fn url(&self) -> String {
        match self {
            Sim::Inproc(h) => h.base_url(),
            Sim::Child { url, .. } => url.clone(),
        }
    }

    fn where_(&self) -> &'static str {
        match self {
            Sim::Inproc(_) => "in-process",
            Sim::Child { .. } => "child process",
        }
    }

    async fn ledger(&self) -> anyhow::Result<LedgerDump> {
        match self {
            Sim::Inproc(h) => Ok(h.ledger()),
            Sim::Child { url, .. } => Ok(reqwest::get(format!("{url}/sim/ledger"))
                .await?
                .error_for_status()?
                .json::<LedgerDump>()
                .await?),
        }
    }

    async fn stop(self) {
        match self {
            Sim::Inproc(h) => h.shutdown().await,
            Sim::Child { mut child, .. } => {
                let _ = child.kill().await;
            }
        }
    }
}

// ---------------------------------------------------------------- phases

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

struct CeilingResult {
    msgs_per_s: f64,
    elapsed: Duration,
    prepublish_per_s: f64,
}

/// The bare lapin loop: consume (manual ack, the worker's prefetch) → publish the
/// reply with a pipelined confirm → ack in order with `multiple`.
async fn ceiling(
    settings: &Settings,
    n: usize,
    users: usize,
    tag: &str,
    stall: Duration,
) -> anyhow::Result<CeilingResult> {
    let b = &settings.config.broker;
    let (cmd_q, reply_q, dead_q) = queues(tag, "ceiling");
    let cfg = BrokerConfig {
        command_queue: cmd_q.clone(),
        reply_queue: reply_q.clone(),
        dead_letter_queue: dead_q.clone(),
        ..b.clone()
    };
    let client = connect(&b.url, "midas-worker bench client").await?;
    let ch = client.create_channel().await?;
    declare_topology(&client, &cfg).await?;
    let result = async {
        let (sink, sink_task) = Sink::start(&ch, &reply_q, false).await?;
        sink.expect('c', n);
        let pre = publish_commands(
            &client, &cmd_q, &reply_q, 'c', "CEIL-", n, users, None, false,
        )
        .await?;

        let conn = connect(&b.url, "midas-worker bench ceiling").await?;
        let cons = conn.create_channel().await?;
        let publ = conn.create_channel().await?;
        publ.confirm_select(ConfirmSelectOptions::default()).await?;
        cons.basic_qos(b.prefetch, BasicQosOptions::default())
            .await?;
        let t0 = Instant::now();
        let mut consumer = cons
            .basic_consume(
                cmd_q.as_str().into(),
                "ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut pending = FuturesOrdered::new();
        let (mut taken, mut acked) = (0usize, 0usize);
        while acked < n {
            tokio::select! {
                biased;
                Some((tag, c)) = pending.next(), if !pending.is_empty() => {
                    let mut last: u64 = tag;
                    let mut k = 1usize;
                    if !matches!(c, Ok(Confirmation::Ack(_))) {
                        bail!("ceiling reply not confirmed: {c:?}");
                    }
                    while let Some(Some((tag, c))) = pending.next().now_or_never() {
                        if !matches!(c, Ok(Confirmation::Ack(_))) {
                            bail!("ceiling reply not confirmed: {c:?}");
                        }
                        last = tag;
                        k += 1;
                    }
                    cons.basic_ack(last, BasicAckOptions { multiple: k > 1 }).await?;
                    acked += k;
                }
                d = consumer.next(), if taken < n => {
                    let d = match d {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("ceiling consumer closed"),
                    };
                    taken += 1;
                    let mut props = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into());
                    if let Some(c) = d.properties.correlation_id() {
                        props = props.with_correlation_id(c.clone());
                    }
                    let to = d
                        .properties
                        .reply_to()
                        .as_ref()
                        .map(|r| r.as_str().to_string())
                        .unwrap_or_else(|| reply_q.clone());
                    let confirm = publ
                        .basic_publish(
                            "".into(),
                            to.as_str().into(),
                            BasicPublishOptions { mandatory: true, immediate: false },
                            &d.data,
                            props,
                        )
                        .await?;
                    let tag = d.delivery_tag;
                    pending.push_back(async move { (tag, confirm.await) });
                }
            }
        }
        let end = sink.wait('c', n, stall).await?;
        let _ = conn.close(200, "bye".into()).await;
        sink_task.abort();
        let elapsed = end.saturating_duration_since(t0);
        Ok(CeilingResult {
            msgs_per_s: n as f64 / elapsed.as_secs_f64(),
            elapsed,
            prepublish_per_s: n as f64 / pre.as_secs_f64(),
        })
    }
    .await;
    delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
    let _ = client.close(200, "bye".into()).await;
    result
}

#[derive(Debug, Clone, serde::Serialize)]
struct CaseResult {
    midas_latency_ms: u64,
    max_in_flight: usize,
    jobs: usize,
    startup_ms: f64,
    elapsed_s: f64,
    jobs_per_s: f64,
    backlog_p50_ms: f64,
    backlog_p99_ms: f64,
    steady_rate: f64,
    steady_jobs: usize,
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    midas_calls_per_s: f64,
    commits_per_s: f64,
    rows_per_commit: f64,
    replies_published_per_s: f64,
    peak_rss_mb: f64,
    peak_rss_before_worker_mb: f64,
    rss_at_end_mb: f64,
    duplicate_replies: usize,
    not_succeeded: usize,
    ledger_ok: bool,
    ledger_note: String,
    simulator: &'static str,
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

async fn worker_case(
    a: &BenchArgs,
    base: &Settings,
    latency: Duration,
    tag: &str,
    dir: &std::path::Path,
) -> anyhow::Result<CaseResult> {
    let lat_ms = latency.as_millis() as u64;
    let case = format!("{lat_ms}ms");
    let (cmd_q, reply_q, dead_q) = queues(tag, &case);
    let mut settings = base.clone();
    {
        let c = &mut settings.config;
        c.broker.command_queue = cmd_q.clone();
        c.broker.reply_queue = reply_q.clone();
        c.broker.dead_letter_queue = dead_q.clone();
        c.outbox.path = dir.join(&case).join("outbox.sqlite");
        c.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.midas.environment = Environment::Simulator;
        if let Some(m) = a.max_in_flight {
            c.midas.max_in_flight = m;
        }
        c.midas.max_rps = a.max_rps;
    }
    if a.api == "v2" {
        for app in &mut settings.apps {
            app.api = crate::config::ApiVersion::V2;
            app.default_user_ip
                .get_or_insert_with(|| "127.0.0.1".into());
        }
    }
    let max_in_flight = settings.config.midas.max_in_flight;
    let settings = Arc::new(settings);
    let url = settings.config.broker.url.clone();
    let client = connect(&url, "midas-worker bench client").await?;
    let ch = client.create_channel().await?;
    declare_topology(&client, &settings.config.broker).await?;
    let sim = Sim::start(a.sim, &settings, latency).await?;
    let result = run_case(a, &settings, &client, &ch, &sim, lat_ms, tag, &case)
        .await
        .map(|r| CaseResult { max_in_flight, ..r });
    sim.stop().await;
    delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
    let _ = client.close(200, "bye".into()).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_case(
    a: &BenchArgs,
    settings: &Arc<Settings>,
    client: &Connection,
    ch: &Channel,
    sim: &Sim,
    lat_ms: u64,
    tag: &str,
    case: &str,
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

    // t0: the worker's consumer is registered on the command queue
    let watch_ch = client.create_channel().await?;
    let cmd_q = b.command_queue.clone();
    let watcher = tokio::spawn(async move {
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
                Ok(q) if q.consumer_count() > 0 => {
                    let _ = watch_ch.close(200, "bye".into()).await;
                    return Some(Instant::now());
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(_) => return None,
            }
        }
    });
    let (hwm_before, _) = rss_kb();
    let m0 = METRICS.totals();
    let started = Instant::now();
    let running = crate::worker::start(settings.clone(), Some(sim.url())).await?;
    let t0 = match tokio::time::timeout(Duration::from_secs(30), watcher).await {
        Ok(Ok(Some(t))) => t,
        _ => {
            running.stop().await;
            bail!("the worker did not start consuming within 30s");
        }
    };
    let outcome = async {
        let end = sink.wait('b', n, a.stall_timeout).await?;
        let m1 = METRICS.totals();
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
        Ok::<_, anyhow::Error>((elapsed, jobs_per_s, m0, m1, rate, m))
    }
    .await;
    running.stop().await;
    let (hwm, rss) = rss_kb();
    sink_task.abort();
    let (elapsed, jobs_per_s, m0, m1, rate, m) = outcome?;
    let secs = elapsed.as_secs_f64();
    let d = |i: usize| {
        let a = [m0.0, m0.1, m0.2, m0.3];
        let b = [m1.0, m1.1, m1.2, m1.3];
        b[i].saturating_sub(a[i]) as f64
    };
    let (b50, b99, bdup, bbad) = sink.summary('b');
    let (s50, s99, sdup, sbad) = sink.summary('s');

    // exactly once: every bill of this case in the ledger once, nothing else
    let ledger = sim.ledger().await?;
    let mut counts: HashMap<&str, u32> = HashMap::with_capacity(n + m);
    for o in &ledger.orders {
        if o.bill_no.starts_with(&bill_prefix) {
            *counts.entry(o.bill_no.as_str()).or_default() += 1;
        }
    }
    let mut missing = 0usize;
    let mut twice = 0usize;
    for (phase, k) in [('b', n), ('s', m)] {
        for seq in 0..k {
            match counts.get(format!("{bill_prefix}{phase}{seq}").as_str()) {
                None => missing += 1,
                Some(1) => {}
                Some(_) => twice += 1,
            }
        }
    }
    let extra = counts.len().saturating_sub(n + m - missing);
    let ledger_ok = missing == 0 && twice == 0 && extra == 0;
    let ledger_note = format!(
        "{} bills applied once, {missing} missing, {twice} more than once, {extra} unexpected",
        counts.values().filter(|&&c| c == 1).count()
    );
    Ok(CaseResult {
        midas_latency_ms: lat_ms,
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
        peak_rss_before_worker_mb: mb(hwm_before),
        rss_at_end_mb: mb(rss),
        duplicate_replies: bdup + sdup,
        not_succeeded: bbad + sbad,
        ledger_ok,
        ledger_note,
        simulator: sim.where_(),
    })
}

// ---------------------------------------------------------------- report

struct Targets {
    throughput_min: f64,
    throughput_ok: bool,
    throughput_rule: String,
    steady_max_ms: f64,
    steady_ok: bool,
    rss_ok: Option<bool>,
}

fn targets(c: &CaseResult, ceiling: f64) -> Targets {
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
        steady_ok: c.steady_p99_ms <= steady_max_ms,
        rss_ok: (c.jobs >= 100_000).then_some(c.peak_rss_mb <= 64.0),
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

fn print_table(a: &BenchArgs, settings: &Settings, ceil: &CeilingResult, cases: &[CaseResult]) {
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
    println!();
    let w = 44;
    let mut header = format!("{:<w$}", "");
    for c in cases {
        header.push_str(&format!(
            "{:>26}",
            format!("{}ms / mif {}", c.midas_latency_ms, c.max_in_flight)
        ));
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
    row("steady e2e p50 / p99 ms", &|c| {
        format!("{:.1} / {:.1}", c.steady_p50_ms, c.steady_p99_ms)
    });
    row("steady p99 target", &|c| {
        let t = targets(c, ce);
        format!("≤ {:.0} ms {}", t.steady_max_ms, mark(t.steady_ok))
    });
    row("Midas calls/s", &|c| format!("{:.0}", c.midas_calls_per_s));
    row("outbox commits/s", &|c| format!("{:.0}", c.commits_per_s));
    row("rows per commit", &|c| format!("{:.1}", c.rows_per_commit));
    row("replies published/s", &|c| {
        format!("{:.0}", c.replies_published_per_s)
    });
    row("peak RSS MB (VmHWM, cumulative)", &|c| {
        format!("{:.1}", c.peak_rss_mb)
    });
    row("peak RSS MB before the worker started", &|c| {
        format!("{:.1}", c.peak_rss_before_worker_mb)
    });
    row(
        "RSS target ≤ 64 MB (100k backlog)",
        &|c| match targets(c, ce).rss_ok {
            Some(ok) => mark(ok).to_string(),
            None => "n/a (jobs < 100000)".to_string(),
        },
    );
    row("worker startup → consuming ms", &|c| {
        format!("{:.0}", c.startup_ms)
    });
    row("exactly once (ledger)", &|c| {
        mark(c.ledger_ok && c.not_succeeded == 0).to_string()
    });
    println!();
    for c in cases {
        let t = targets(c, ce);
        println!(
            "{}ms: throughput {}; ledger: {}; replies not succeeded: {}; duplicate replies: {}",
            c.midas_latency_ms,
            t.throughput_rule,
            c.ledger_note,
            c.not_succeeded,
            c.duplicate_replies
        );
    }
}

fn to_json(
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
                o.insert(
                    "targets".into(),
                    json!({
                        "throughput": {"rule": t.throughput_rule, "min_jobs_per_s": t.throughput_min, "ok": t.throughput_ok},
                        "steady_p99": {"max_ms": t.steady_max_ms, "ok": t.steady_ok},
                        "peak_rss_64mb_at_100k": t.rss_ok,
                        "exactly_once": c.ledger_ok && c.not_succeeded == 0,
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
        "cases": cases,
    })
}

pub async fn run(a: BenchArgs, settings: Settings) -> anyhow::Result<()> {
    if a.jobs == 0 || a.users == 0 {
        bail!("--jobs and --users must be at least 1");
    }
    if a.midas_latency.is_empty() {
        bail!("--midas-latency needs at least one value");
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
        let ceil = ceiling(&settings, a.jobs, a.users, &tag, a.stall_timeout).await?;
        progress(format!("bench: ceiling {:.0} msg/s", ceil.msgs_per_s));
        let mut cases = Vec::new();
        for lat in &a.midas_latency {
            progress(format!(
                "bench: worker run, Midas latency {}",
                humantime::format_duration(*lat)
            ));
            let c = worker_case(&a, &settings, *lat, &tag, &dir).await?;
            progress(format!(
                "bench: {:.0} jobs/s, steady p99 {:.1} ms, {}",
                c.jobs_per_s, c.steady_p99_ms, c.ledger_note
            ));
            cases.push(c);
        }
        Ok::<_, anyhow::Error>((ceil, cases))
    }
    .await;
    if a.keep {
        progress(format!("bench: outbox kept in {}", dir.display()));
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (ceil, cases) = result?;
    if a.json {
        println!("{}", to_json(&a, &settings, &ceil, &cases));
    } else {
        print_table(&a, &settings, &ceil, &cases);
    }
    if cases.iter().any(|c| !c.ledger_ok || c.not_succeeded > 0) {
        bail!("a bill was not applied exactly once (or a reply was not succeeded): see the table");
    }
    Ok(())
}
