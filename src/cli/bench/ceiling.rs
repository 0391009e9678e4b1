//! The broker's own ceiling, measured in the same run as the worker: a bare lapin
//! loop doing the least the worker must do per message, so `worker/ceiling` means
//! something on a noisy machine.
//!
//! The loop stays up for the whole run: after the backlog it serves a steady phase
//! per worker case ([`Ceiling::steady`]) at that case's rate, with the same paced
//! publisher and the same reply consumer, so the worker's added latency is its
//! end-to-end latency minus this broker-only round trip measured the same way.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::publish::publish_commands;
use super::sink::Sink;
use super::{cpu, delete_queues, queues};
use crate::broker::{connect, declare_topology};
use crate::config::{BrokerConfig, Settings};

pub(super) struct CeilingResult {
    pub(super) msgs_per_s: f64,
    pub(super) elapsed: Duration,
    pub(super) prepublish_per_s: f64,
    /// The bare loop's CPU per message (process: lapin loop + reply consumer).
    pub(super) cpu: cpu::PerJob,
}

/// The bare loop, running until [`Ceiling::stop`], with its queues and reply consumer.
pub(super) struct Ceiling {
    client: Connection,
    conn: Connection,
    sink: Sink,
    sink_task: JoinHandle<()>,
    loop_task: JoinHandle<anyhow::Result<()>>,
    stop: watch::Sender<bool>,
    queues: (String, String, String),
    users: usize,
    v2: bool,
    stall: Duration,
}

impl Ceiling {
    /// Declare the ceiling's queues, pre-publish `n` commands, start the bare loop
    /// and time it to the `n`-th reply.
    pub(super) async fn start(
        settings: &Settings,
        n: usize,
        users: usize,
        tag: &str,
        stall: Duration,
        v2: bool,
    ) -> anyhow::Result<(Ceiling, CeilingResult)> {
        let b = &settings.config.broker;
        let (cmd_q, reply_q, dead_q) = queues(tag, "ceiling");
        let cfg = BrokerConfig {
            command_queue: cmd_q.clone(),
            reply_queue: reply_q.clone(),
            dead_letter_queue: dead_q.clone(),
            ..b.clone()
        };
        let client = connect(&b.url, "midas-worker bench client").await?;
        let setup = async {
            let ch = client.create_channel().await?;
            declare_topology(&client, &cfg).await?;
            let (sink, sink_task) = Sink::start(&ch, &reply_q, false).await?;
            let conn = connect(&b.url, "midas-worker bench ceiling").await?;
            Ok::<_, anyhow::Error>((sink, sink_task, conn))
        }
        .await;
        let (sink, sink_task, conn) = match setup {
            Ok(s) => s,
            Err(e) => {
                delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
                let _ = client.close(200, "bye".into()).await;
                return Err(e);
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut ceiling = Ceiling {
            client,
            conn,
            sink,
            sink_task,
            loop_task: tokio::spawn(async { Ok(()) }),
            stop,
            queues: (cmd_q, reply_q, dead_q),
            users,
            v2,
            stall,
        };
        match ceiling.backlog(n, b.prefetch, stop_rx).await {
            Ok(r) => Ok((ceiling, r)),
            Err(e) => {
                ceiling.stop().await;
                Err(e)
            }
        }
    }

    async fn backlog(
        &mut self,
        n: usize,
        prefetch: u16,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<CeilingResult> {
        let (cmd_q, reply_q, _) = self.queues.clone();
        self.sink.expect('c', n);
        let pre = publish_commands(
            &self.client,
            &cmd_q,
            &reply_q,
            'c',
            "CEIL-",
            n,
            self.users,
            None,
            self.v2,
        )
        .await?;
        let cons = self.conn.create_channel().await?;
        let publ = self.conn.create_channel().await?;
        publ.confirm_select(ConfirmSelectOptions::default()).await?;
        cons.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let pids = cpu::Pids::broker_only();
        let cpu0 = cpu::snapshot(pids);
        let t0 = Instant::now();
        let consumer = cons
            .basic_consume(
                cmd_q.as_str().into(),
                "ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.loop_task = tokio::spawn(bare_loop(cons, publ, consumer, reply_q, stop));
        let end = self.sink.wait('c', n, self.stall).await?;
        let cpu = cpu::per_job(&cpu0, &cpu::snapshot(pids), n);
        let elapsed = end.saturating_duration_since(t0);
        Ok(CeilingResult {
            msgs_per_s: n as f64 / elapsed.as_secs_f64(),
            elapsed,
            prepublish_per_s: n as f64 / pre.as_secs_f64(),
            cpu,
        })
    }

    /// The broker-only steady phase: `m` commands paced at `rate` through the bare
    /// loop; (p50 ms, p99 ms) publish → reply, and the CPU per message it cost the
    /// broker and the whole machine.
    pub(super) async fn steady(&self, rate: f64, m: usize) -> anyhow::Result<BrokerSteady> {
        if self.loop_task.is_finished() {
            bail!("the ceiling loop has stopped");
        }
        let (cmd_q, reply_q, _) = &self.queues;
        self.sink.expect('t', m);
        let cpu0 = cpu::snapshot(cpu::Pids::broker_only());
        publish_commands(
            &self.client,
            cmd_q,
            reply_q,
            't',
            "CEIL-",
            m,
            self.users,
            Some(rate),
            self.v2,
        )
        .await?;
        self.sink.wait('t', m, self.stall).await?;
        let cpu = cpu::per_job(&cpu0, &cpu::snapshot(cpu::Pids::broker_only()), m);
        let (p50, p99, _, _) = self.sink.summary('t');
        Ok(BrokerSteady { p50, p99, cpu })
    }

    /// Stop the loop, delete the queues, close the connections.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.loop_task.await;
        let _ = self.conn.close(200, "bye".into()).await;
        self.sink_task.abort();
        let (cmd_q, reply_q, dead_q) = &self.queues;
        delete_queues(&self.client, &[cmd_q, reply_q, dead_q]).await;
        let _ = self.client.close(200, "bye".into()).await;
    }
}

/// The broker-only steady phase's figures.
#[derive(Debug, Clone, Copy)]
pub(super) struct BrokerSteady {
    pub p50: f64,
    pub p99: f64,
    /// CPU per message: the broker's (`beam.smp`) and the whole machine's.
    pub cpu: cpu::PerJob,
}

/// consume (manual ack, the worker's prefetch) → publish the reply with a pipelined
/// confirm → ack in order with `multiple`; until `stop`.
async fn bare_loop(
    cons: Channel,
    publ: Channel,
    mut consumer: Consumer,
    reply_q: String,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut pending = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
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
            }
            d = consumer.next() => {
                let d = match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("ceiling consumer closed"),
                };
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
}
