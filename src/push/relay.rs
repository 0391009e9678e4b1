//! The events publisher: every stored push's event goes to the events queue
//! (`push.event_queue`, a durable quorum queue declared here at each connect),
//! persistent, with publisher confirms and `message_id` = `event_id`, and is
//! marked published in the outbox only on the broker's ack.
//!
//! A fresh event is handed over by the receiver right after its commit and
//! published at once. Anything not confirmed — a nack, a broker outage, a crash
//! between the commit and the confirm — stays unpublished in the outbox, and the
//! relay pass (every [`SCAN_EVERY`]) publishes it again; so an event reaches the
//! queue at least once, and a copy more after a crash is possible (consumers
//! de-duplicate on `event_id`). On a shared outbox each worker's relay publishes
//! what it finds; two may publish the same old event, never a different one.
//!
//! The receiver never waits for any of this: the answer to WeChat depends on the
//! outbox commit only, so pushes are answered while the broker is down.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, watch};

use super::metrics::PUSH_METRICS;
use crate::broker::BrokerError;
use crate::command::now_ms;
use crate::outbox::pushes::UnpublishedEvent;
use crate::outbox::Outbox;

/// How often the outbox is searched for unconfirmed events.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
/// The pass takes events stored at least this long ago (fresher ones are being
/// published by the receiver's hand-over).
const SCAN_MIN_AGE_MS: i64 = 2_000;
/// Events per pass.
const SCAN_LIMIT: i64 = 500;
/// An event published this long ago without its mark is published again.
const INFLIGHT_STALE: Duration = Duration::from_secs(15);
/// Fresh events waiting for the publisher; more are left to the pass.
const HANDOVER: usize = 4096;

/// The receiver's side: hands fresh events over.
#[derive(Clone)]
pub struct Handover(mpsc::Sender<UnpublishedEvent>);

impl Handover {
    /// Publish soon (never blocks: when the publisher is behind, the pass finds it).
    pub fn fresh(&self, e: UnpublishedEvent) {
        let _ = self.0.try_send(e);
    }
}

/// Start the publisher; it runs until `shutdown`.
pub fn start(
    broker_url: String,
    queue: String,
    outbox: Outbox,
    shutdown: watch::Receiver<bool>,
) -> (Handover, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(HANDOVER);
    let h = tokio::spawn(run(broker_url, queue, outbox, rx, shutdown));
    (Handover(tx), h)
}

/// Declare the events queue: durable, quorum (idempotent).
pub async fn declare(ch: &Channel, queue: &str) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    Ok(())
}

async fn run(
    url: String,
    queue: String,
    outbox: Outbox,
    mut rx: mpsc::Receiver<UnpublishedEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = format!("midas-worker events pid {}", std::process::id());
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    while !*shutdown.borrow() {
        match crate::broker::connect(&url, &name).await {
            Ok(conn) => {
                delays = backoff();
                let r = session(&conn, &queue, &outbox, &mut rx, &mut shutdown).await;
                if conn.status().connected() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into()))
                            .await;
                }
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "events publisher lost the broker; reconnecting")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "events publisher cannot connect to the broker; retrying")
            }
        }
        let d = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => {}
        }
    }
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = (i64, lapin::Result<Confirmation>)> + Send>>;

async fn session(
    conn: &lapin::Connection,
    queue: &str,
    outbox: &Outbox,
    rx: &mut mpsc::Receiver<UnpublishedEvent>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    declare(&ch, queue).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    tracing::info!(queue, "events publisher ready");
    // event row id → when it was published on this channel
    let mut inflight: HashMap<i64, Instant> = HashMap::new();
    let mut confirms: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    // wait (bounded) for what is in flight; the rest is relayed at the next start
                    let mut ids = Vec::new();
                    let drain = async {
                        while let Some((id, c)) = confirms.next().await {
                            if matches!(c, Ok(Confirmation::Ack(_))) {
                                ids.push(id);
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(3), drain).await;
                    mark(outbox, ids);
                    return Ok(());
                }
            }
            e = rx.recv() => {
                let Some(e) = e else { return Ok(()) };
                if !inflight.contains_key(&e.id) {
                    publish(&ch, queue, e, &mut inflight, &mut confirms).await?;
                }
            }
            _ = scan.tick() => {
                // a dead link does not always fail a publish: its confirm may just
                // never come, so the link is checked before each pass
                if !conn.status().connected() || !ch.status().connected() {
                    return Err(BrokerError::Closed);
                }
                inflight.retain(|_, at| at.elapsed() < INFLIGHT_STALE);
                match outbox.unpublished_events(SCAN_LIMIT, now_ms() - SCAN_MIN_AGE_MS).await {
                    Ok(found) => {
                        tracing::debug!(found = found.len(), inflight = inflight.len(), "events relay pass");
                        let mut n = 0;
                        for e in found {
                            if inflight.contains_key(&e.id) {
                                continue;
                            }
                            n += 1;
                            publish(&ch, queue, e, &mut inflight, &mut confirms).await?;
                        }
                        if n > 0 {
                            tracing::info!(events = n, "publishing unconfirmed push events from the outbox");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "events publisher cannot read the outbox"),
                }
            }
            Some((id, c)) = confirms.next(), if !confirms.is_empty() => {
                let mut ids = Vec::new();
                let mut failed = None;
                settle(id, c, &mut ids, &mut inflight, &mut failed);
                while let Some(Some((id, c))) = confirms.next().now_or_never() {
                    settle(id, c, &mut ids, &mut inflight, &mut failed);
                }
                mark(outbox, ids);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
    }
}

fn mark(outbox: &Outbox, ids: Vec<i64>) {
    if !ids.is_empty() {
        PUSH_METRICS.published(ids.len() as u64);
        outbox.push_published(ids, now_ms());
    }
}

fn settle(
    id: i64,
    c: lapin::Result<Confirmation>,
    ids: &mut Vec<i64>,
    inflight: &mut HashMap<i64, Instant>,
    failed: &mut Option<BrokerError>,
) {
    match c {
        // kept in `inflight` until its mark is committed (the pass skips it)
        Ok(Confirmation::Ack(_)) => ids.push(id),
        Ok(_) => {
            tracing::warn!("push event nacked by the broker; will publish again");
            inflight.remove(&id);
        }
        Err(e) => {
            inflight.remove(&id);
            *failed = Some(e.into());
        }
    }
}

async fn publish(
    ch: &Channel,
    queue: &str,
    e: UnpublishedEvent,
    inflight: &mut HashMap<i64, Instant>,
    confirms: &mut FuturesUnordered<Pending>,
) -> Result<(), BrokerError> {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(e.event_id.as_str().into());
    inflight.insert(e.id, Instant::now());
    tracing::debug!(event_id = %e.event_id, "publishing a push event");
    let confirm = match ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &e.message,
            props,
        )
        .await
    {
        Ok(c) => c,
        Err(err) => {
            inflight.remove(&e.id);
            return Err(err.into());
        }
    };
    let id = e.id;
    confirms.push(Box::pin(confirm.map(move |c| (id, c))));
    Ok(())
}
