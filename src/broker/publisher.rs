//! The confirmed reply publisher.
//!
//! Replies are published persistent and `mandatory` to their `reply_to` queue with
//! the command's correlation_id, on a channel in confirm mode. Confirms are
//! pipelined: many publishes are outstanding at once and are awaited as they come.
//! A reply target is marked published in the outbox only on the broker's ack; a
//! reply whose queue does not exist comes back (basic.return) and is marked
//! `returned` so it is not retried forever. A stored reply target is checked
//! against `broker.reply_to_allow` again on its way out (relay and `outbox
//! republish` included); one outside it goes to the configured reply queue. Anything not confirmed — nack, broker
//! down, crash — stays unpublished and the relay ([`Publisher::relay_once`]) sends
//! it again from the outbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::BrokerError;
use crate::command::now_ms;
use crate::config::BrokerConfig;
use crate::metrics::METRICS;
use crate::outbox::writer::Confirmed;
use crate::outbox::{Outbox, OutgoingReply};

/// How often the reply relays (the single worker's, and the shared outbox's
/// relay-lease holder's) look for unconfirmed replies and operator actions.
pub const RELAY_INTERVAL: Duration = Duration::from_secs(2);

/// Most unconfirmed replies one relay pass reads.
pub const RELAY_PAGE: usize = 2000;

/// A reply published and awaiting its confirm (or its mark) longer than this is
/// sent again by the relay (a duplicate is harmless: replies are identical; a lost
/// one is not). A reply still queued is never sent again: however long the broker
/// is away, each unconfirmed reply has at most one copy waiting.
const INFLIGHT_STALE: Duration = Duration::from_secs(10);

/// Where an outbox reply target is on its way out.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// In the publisher queue, not yet handed to a channel.
    Queued,
    /// Published at this instant; awaiting the confirm, or confirmed and awaiting
    /// its mark in the outbox.
    Sent(Instant),
}

type Inflight = Arc<Mutex<HashMap<i64, Stage>>>;

struct Req {
    reply: OutgoingReply,
    done: Option<oneshot::Sender<bool>>,
    /// Properties other than a reply's (a dead-letter copy's headers, expiration).
    props: Option<BasicProperties>,
}

/// Handle used by intake and the dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Req>,
    /// Outbox reply targets queued or awaiting a confirm (so the relay skips them).
    inflight: Inflight,
}

/// The receiving end, owned by the broker session.
pub struct PublisherQueue {
    rx: mpsc::UnboundedReceiver<Req>,
    inflight: Inflight,
    /// `broker.reply_to_allow` and the reply queue: every stored reply target is
    /// checked against them again when it is published.
    broker: BrokerConfig,
}

/// The publisher of a worker whose broker config is `broker`.
pub fn channel(broker: &BrokerConfig) -> (Publisher, PublisherQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inflight = Arc::new(Mutex::new(HashMap::new()));
    (
        Publisher {
            tx,
            inflight: inflight.clone(),
        },
        PublisherQueue {
            rx,
            inflight,
            broker: broker.clone(),
        },
    )
}

/// A stored reply target outside `broker.reply_to_allow` (an allow-list tightened
/// since the command came, or a row written by hand) goes to the configured reply
/// queue instead: the worker never publishes into a queue the list does not name.
fn checked_target(mut req: Req, broker: &BrokerConfig) -> Req {
    if req.props.is_none()
        && req.reply.target_id.is_some()
        && !super::reply_to_allowed(broker, &req.reply.reply_to)
    {
        tracing::warn!(
            reply_to = %req.reply.reply_to,
            reply_queue = %broker.reply_queue,
            "stored reply target is outside broker.reply_to_allow; publishing to the configured reply queue instead"
        );
        req.reply.reply_to = broker.reply_queue.clone();
    }
    req
}

fn lock(s: &Mutex<HashMap<i64, Stage>>) -> std::sync::MutexGuard<'_, HashMap<i64, Stage>> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Publisher {
    /// Queue an outbox reply; it is confirmed (and marked) in the background.
    pub fn send(&self, reply: OutgoingReply) {
        // The owner of a fresh reply (a job just final, a command that joined a final
        // job) always sends: only the relay defers to what is already on its way.
        if let Some(id) = reply.target_id {
            lock(&self.inflight).insert(id, Stage::Queued);
        }
        let _ = self.tx.send(Req {
            reply,
            done: None,
            props: None,
        });
    }

    /// Publish a reply that has no outbox row and wait for the broker's confirm.
    pub async fn send_confirmed(&self, reply: OutgoingReply) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Req {
                reply,
                done: Some(tx),
                props: None,
            })
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Publish `body` to `queue` with `props` (a dead-letter copy) and wait for the
    /// broker's confirm.
    pub async fn send_to_confirmed(
        &self,
        queue: &str,
        body: Vec<u8>,
        props: BasicProperties,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let reply = OutgoingReply {
            target_id: None,
            reply_to: queue.to_string(),
            correlation_id: String::new(),
            payload: Arc::from(body),
        };
        if self
            .tx
            .send(Req {
                reply,
                done: Some(tx),
                props: Some(props),
            })
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Re-send every unconfirmed reply of a final job found in the outbox (the
    /// relay loops call this every [`RELAY_INTERVAL`] with at most [`RELAY_PAGE`]).
    /// Skips targets still queued, and targets published or confirmed moments ago
    /// (their mark may not be committed yet) unless that was longer than
    /// `INFLIGHT_STALE` ago.
    pub fn relay_once(&self, replies: Vec<OutgoingReply>) -> usize {
        let mut inflight = lock(&self.inflight);
        inflight.retain(|_, stage| match stage {
            Stage::Queued => true,
            Stage::Sent(at) => at.elapsed() < INFLIGHT_STALE,
        });
        let mut n = 0;
        for r in replies {
            let Some(id) = r.target_id else { continue };
            if inflight.contains_key(&id) {
                continue;
            }
            inflight.insert(id, Stage::Queued);
            let _ = self.tx.send(Req {
                reply: r,
                done: None,
                props: None,
            });
            n += 1;
        }
        n
    }

    /// Reply targets queued or awaiting a confirm (memory check in tests and metrics).
    pub fn inflight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Req, lapin::Result<Confirmation>)> + Send>>;

/// A publish whose frames are queued for the broker client's I/O loop, awaiting
/// their write.
type Sending = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Req, lapin::Result<PublisherConfirm>)> + Send>,
>;

/// Start publishing `req`: its frames are queued for lapin's I/O loop at once, in
/// the order requests come, and the write is awaited with the others in
/// `sending`. Awaiting each write before the next publish cost a round trip to
/// the I/O thread (and back) per reply; queued together, the I/O loop writes
/// every waiting reply in one wake-up. The confirm is awaited as before: nothing
/// is marked published until the broker acks it.
async fn publish(
    ch: &Channel,
    req: Req,
    sending: &mut FuturesUnordered<Sending>,
    confirms: &mut FuturesUnordered<Pending>,
    q: &PublisherQueue,
) -> Result<(), BrokerError> {
    let req = checked_target(req, &q.broker);
    let props = req.props.clone().unwrap_or_else(|| {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id(req.reply.correlation_id.as_str().into())
    });
    // Marked on its way out before the first await: if the session is dropped in
    // the middle of this publish, the mark is cleared with the session's other
    // unconfirmed publishes and the relay sends the reply again. (Left `Queued`, the
    // relay would skip it until the next restart.)
    if let Some(id) = req.reply.target_id {
        lock(&q.inflight).insert(id, Stage::Sent(Instant::now()));
    }
    let ch = ch.clone();
    let mut write: Sending = Box::pin(async move {
        let published = ch
            .basic_publish(
                "".into(),
                req.reply.reply_to.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &req.reply.payload,
                props,
            )
            .await;
        (req, published)
    });
    // the first poll queues the frames (and takes the confirm's delivery tag)
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready((req, published)) => written(req, published, confirms, q),
        std::task::Poll::Pending => {
            sending.push(write);
            Ok(())
        }
    }
}

/// A publish's frames were written (or not): await its confirm.
fn written(
    req: Req,
    published: lapin::Result<PublisherConfirm>,
    confirms: &mut FuturesUnordered<Pending>,
    q: &PublisherQueue,
) -> Result<(), BrokerError> {
    match published {
        Ok(confirm) => {
            confirms.push(Box::pin(confirm.map(move |c| (req, c))));
            Ok(())
        }
        Err(e) => {
            q.forget(req);
            Err(e.into())
        }
    }
}

impl PublisherQueue {
    /// Publish on `ch` until the channel fails, or `stop` turns true (then drain
    /// what is queued and wait, bounded, for its confirms).
    pub async fn run(
        &mut self,
        ch: &Channel,
        writer: &Outbox,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        // A session ends by being dropped when the consumer side fails first, so
        // nothing after an await is sure to run: forget the old session's publishes
        // here, at the start of the new one (the relay re-sends them from the outbox).
        // Replies still queued stay: this session publishes them.
        self.forget_sent();
        let mut sending = FuturesUnordered::new();
        let mut confirms = FuturesUnordered::new();
        let result = self
            .run_inner(ch, writer, stop, &mut sending, &mut confirms)
            .await;
        // Whatever is still unconfirmed on this channel will be relayed from the outbox.
        drop(sending);
        drop(confirms);
        self.forget_sent();
        result
    }

    async fn run_inner(
        &mut self,
        ch: &Channel,
        writer: &Outbox,
        stop: &mut watch::Receiver<bool>,
        sending: &mut FuturesUnordered<Sending>,
        confirms: &mut FuturesUnordered<Pending>,
    ) -> Result<(), BrokerError> {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        tracing::debug!("reply publisher ready");
        let mut stopping = *stop.borrow();
        loop {
            if stopping {
                while let Ok(req) = self.rx.try_recv() {
                    publish(ch, req, sending, confirms, self).await?;
                }
                while let Some((req, published)) = sending.next().await {
                    written(req, published, confirms, self)?;
                }
                let drain = async {
                    let mut marks = Vec::new();
                    let mut failed = None;
                    while let Some((req, c)) = confirms.next().await {
                        self.settle(req, c, &mut marks, &mut failed);
                    }
                    marks
                };
                if let Ok(marks) = tokio::time::timeout(Duration::from_secs(5), drain).await {
                    METRICS.reply_published(marks.len() as u64);
                    writer.published(marks, now_ms());
                }
                return Ok(());
            }
            tokio::select! {
                _ = stop.changed() => stopping = *stop.borrow(),
                req = self.rx.recv() => {
                    let Some(req) = req else { return Ok(()) };
                    publish(ch, req, sending, confirms, self).await?;
                    // and every other reply already queued, in one go
                    while let Ok(req) = self.rx.try_recv() {
                        publish(ch, req, sending, confirms, self).await?;
                    }
                }
                Some((req, published)) = sending.next(), if !sending.is_empty() => {
                    written(req, published, confirms, self)?;
                    while let Some(Some((req, published))) = sending.next().now_or_never() {
                        written(req, published, confirms, self)?;
                    }
                }
                Some((req, c)) = confirms.next(), if !confirms.is_empty() => {
                    let mut marks = Vec::new();
                    let mut failed = None;
                    self.settle(req, c, &mut marks, &mut failed);
                    while let Some(Some((req, c))) = confirms.next().now_or_never() {
                        self.settle(req, c, &mut marks, &mut failed);
                    }
                    if !marks.is_empty() {
                        METRICS.reply_published(marks.len() as u64);
                        writer.published(marks, now_ms());
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn settle(
        &self,
        req: Req,
        c: lapin::Result<Confirmation>,
        marks: &mut Vec<Confirmed>,
        failed: &mut Option<BrokerError>,
    ) {
        match c {
            Ok(Confirmation::Ack(returned)) => {
                let returned = returned.is_some();
                if returned {
                    tracing::warn!(reply_to = %req.reply.reply_to, "reply unroutable: no such queue (marked returned)");
                }
                if let Some(c) = Confirmed::of(&req.reply, returned) {
                    // keep it a while: the relay must not re-send it before the
                    // mark below is committed (stale entries are dropped by the relay)
                    lock(&self.inflight).insert(c.target, Stage::Sent(Instant::now()));
                    marks.push(c);
                }
                if let Some(d) = req.done {
                    let _ = d.send(true);
                }
            }
            Ok(Confirmation::NotRequested) | Ok(Confirmation::Nack(_)) => {
                tracing::warn!(reply_to = %req.reply.reply_to, "reply nacked by the broker; will retry");
                self.forget(req);
            }
            Err(e) => {
                tracing::debug!(error = %e, "publisher confirm failed");
                self.forget(req);
                *failed = Some(e.into());
            }
        }
    }

    fn forget_sent(&self) {
        lock(&self.inflight).retain(|_, stage| matches!(stage, Stage::Queued));
    }

    fn forget(&self, req: Req) {
        if let Some(id) = req.reply.target_id {
            lock(&self.inflight).remove(&id);
        }
        if let Some(d) = req.done {
            let _ = d.send(false);
        }
    }
}
