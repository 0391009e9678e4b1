//! The broker's own ceiling, measured in the same run as the worker: a bare lapin
//! loop doing the least the worker must do per message, so `worker/ceiling` means
//! something on a noisy machine.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};

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

/// The bare lapin loop: consume (manual ack, the worker's prefetch) → publish the
/// reply with a pipelined confirm → ack in order with `multiple`.
pub(super) async fn ceiling(
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
        let broker_pid = cpu::find_broker();
        let cpu0 = cpu::snapshot(broker_pid);
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
        let cpu = cpu::per_job(&cpu0, &cpu::snapshot(broker_pid), n);
        let _ = conn.close(200, "bye".into()).await;
        sink_task.abort();
        let elapsed = end.saturating_duration_since(t0);
        Ok(CeilingResult {
            msgs_per_s: n as f64 / elapsed.as_secs_f64(),
            elapsed,
            prepublish_per_s: n as f64 / pre.as_secs_f64(),
            cpu,
        })
    }
    .await;
    delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
    let _ = client.close(200, "bye".into()).await;
    result
}
