//! The bench's reply consumer (the game server's side): which sequence numbers
//! answered, duplicates, non-successes and publish → reply latency per phase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;

use super::{at_us, percentile};

#[derive(Default)]
pub(super) struct Phase {
    seen: Vec<bool>,
    distinct: usize,
    duplicates: usize,
    not_succeeded: usize,
    latencies_us: Vec<u64>,
    last: Option<Instant>,
}

#[derive(Default)]
pub(super) struct SinkState {
    phases: HashMap<char, Phase>,
    unparsable: usize,
}

/// Consumes a reply queue (no_ack, as cheap as a game server can be) and records,
/// per phase, which sequence numbers answered and the publish → reply latency
/// (the publish time travels in the correlation_id: `{phase}{seq}.{micros}`).
#[derive(Clone)]
pub(super) struct Sink {
    state: Arc<Mutex<SinkState>>,
    total: Arc<AtomicU64>,
}

impl Sink {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn expect(&self, phase: char, n: usize) {
        let mut st = self.lock();
        let p = st.phases.entry(phase).or_default();
        p.seen = vec![false; n];
        p.latencies_us = Vec::with_capacity(n);
    }

    pub(super) async fn start(
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

    pub(super) fn record(&self, corr: &str, now: Instant, ok: bool) {
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

    pub(super) fn distinct(&self, phase: char) -> usize {
        self.lock().phases.get(&phase).map_or(0, |p| p.distinct)
    }

    /// Wait for `n` distinct replies of `phase`; fails after `stall` without progress.
    pub(super) async fn wait(
        &self,
        phase: char,
        n: usize,
        stall: Duration,
    ) -> anyhow::Result<Instant> {
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
    pub(super) fn summary(&self, phase: char) -> (f64, f64, usize, usize) {
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
