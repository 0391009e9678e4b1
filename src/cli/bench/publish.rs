//! The bench's command publisher: persistent messages with pipelined confirms, so
//! publishing the backlog never limits what the worker run measures.

use std::time::Duration;

use anyhow::bail;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use tokio::sync::mpsc;

use super::{now_us, PUBLISH_WINDOW};

/// A fast publisher: persistent messages, confirms pipelined (a bounded window
/// awaited in order by a helper task), never one-at-a-time.
pub(super) struct FastPublisher {
    ch: Channel,
    confirms: mpsc::Sender<PublisherConfirm>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl FastPublisher {
    pub(super) async fn new(conn: &Connection) -> anyhow::Result<FastPublisher> {
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

    pub(super) async fn send(
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
    pub(super) async fn finish(self) -> anyhow::Result<u64> {
        drop(self.confirms);
        let (acks, nacks) = self.task.await?;
        let _ = self.ch.close(200, "bye".into()).await;
        if nacks > 0 {
            bail!("{nacks} bench publishes were not confirmed by the broker");
        }
        Ok(acks)
    }
}

pub(super) fn command_body(bill_no: &str, seq: usize, users: usize, v2: bool) -> String {
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
pub(super) async fn publish_commands(
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
