//! Intake: delivery → validate → outbox commit → ack.
//!
//! Deliveries are handled concurrently but settled in delivery order
//! (`FuturesOrdered`), which lets consecutive acks go out as one `multiple` ack and
//! hands new jobs to the dispatcher in arrival order. Nothing is acked before the
//! outbox has committed it. Invalid and conflicting commands get a confirmed
//! `rejected` reply; then a copy without the session_key, saying why, goes to the
//! dead-letter queue ([`super::deadletter`]) and, once confirmed, the command is
//! acked. Storage trouble requeues the delivery after a pause.
//!
//! A `balance` or `query_order` is acked only once its reply is confirmed by the
//! broker (a crash, a broker outage or a nacked reply leaves it unacked, so the
//! broker delivers it again, for a fresh answer). On a SQLite outbox it has no
//! row: it is handed to the dispatcher with a one-shot that reports the confirm.
//! On a shared outbox it is recorded as a row with a key of its own
//! ([`read_key_prefix`] and 64 random bits) and its reply target, so that the worker holding the player's
//! lease answers it in the player's order, fenced like any job; this worker
//! waits for that target's confirm ([`Outbox::reply_confirmed`]). While such a
//! delivery is outstanding, later acks are sent one by one: a `multiple` ack
//! would cover it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot, watch};

use super::publisher::Publisher;
use super::BrokerError;
use crate::command::{self, now_ms, rfc3339_ms, Command, Op, Rejection, Reply};
use crate::config::Settings;
use crate::dispatch::DispatchMsg;
use crate::engine::BalanceCmd;
use crate::metrics::METRICS;
use crate::midas::MidasClient;
use crate::outbox::{Intake, IntakeOutcome, Outbox, OutgoingReply};

/// How often a paused intake looks whether the dispatcher caught up.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(20);

/// At shutdown, how long deliveries waiting for their reply's confirm may still
/// be acked (the dispatcher finishes its calls meanwhile, within its own grace).
pub(super) const DEFERRED_GRACE: Duration = Duration::from_secs(3);

/// Pause before requeueing a delivery the outbox could not take.
const STORAGE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What intake needs.
#[derive(Clone)]
pub struct IntakeCtx {
    pub settings: Arc<Settings>,
    pub writer: Outbox,
    pub dispatcher: mpsc::UnboundedSender<DispatchMsg>,
    pub publisher: Publisher,
    pub midas: Arc<MidasClient>,
    /// Non-final jobs the dispatcher holds; intake pauses while it is above `max_held`.
    pub held: Arc<AtomicUsize>,
    pub max_held: usize,
    /// Turns true at shutdown (stops retrying storage trouble).
    pub shutdown: watch::Receiver<bool>,
}

// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Disposition {
    Ack(Option<DispatchMsg>),
    /// Rejected without requeue: the broker dead-letters it unchanged.
    Reject,
    /// Hand the message (if any) over now; ack (or requeue) when the future
    /// reports whether the command's reply was confirmed.
    Defer(Option<DispatchMsg>, BoxFuture<'static, bool>),
    Requeue,
}

/// Deliveries handed over and not settled yet, each waiting for its reply's confirm.
type Deferred = FuturesUnordered<BoxFuture<'static, (u64, bool)>>;

/// Consume commands on `ch` until it fails or `shutdown` turns true.
pub async fn run(
    ch: &Channel,
    ctx: &IntakeCtx,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let cfg = &ctx.settings.config.broker;
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            cfg.command_queue.as_str().into(),
            "midas-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut pending = FuturesOrdered::new();
    let mut deferred: Deferred = FuturesUnordered::new();
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {}
            Some(first) = pending.next(), if !pending.is_empty() => {
                let mut batch = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    batch.push(more);
                }
                if let Err(e) = settle(ch, ctx, batch, &mut deferred, &mut outstanding).await {
                    break Err(e);
                }
            }
            Some((tag, confirmed)) = deferred.next(), if !deferred.is_empty() => {
                outstanding.remove(&tag);
                let r = if confirmed {
                    ch.basic_ack(tag, BasicAckOptions { multiple: false }).await
                } else {
                    ch.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await
                };
                if let Err(e) = r {
                    break Err(e.into());
                }
            }
            _ = tokio::time::sleep(BACKPRESSURE_POLL), if ctx.held.load(Ordering::Relaxed) >= ctx.max_held => {}
            d = consumer.next(), if ctx.held.load(Ordering::Relaxed) < ctx.max_held => match d {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    let tag = delivery.delivery_tag;
                    pending.push_back(async move {
                        (tag, handle(&ctx, delivery.data, delivery.properties, delivery.redelivered).await)
                    });
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(BrokerError::Closed),
            }
        }
    };
    // Settle what was already taken in (shutdown or not, the outbox decides).
    if result.is_ok() {
        let mut batch = Vec::new();
        while let Some(r) = pending.next().await {
            batch.push(r);
        }
        settle(ch, ctx, batch, &mut deferred, &mut outstanding).await?;
        // deferred deliveries whose reply is being confirmed (or is, and is being
        // seen) get a short grace, so a stop does not turn an answered balance
        // into a redelivery and a second answer; those still waiting after it are
        // left unacked: the broker gives them to another worker (or this one,
        // restarted) when the channel closes
        let grace = tokio::time::sleep(DEFERRED_GRACE);
        tokio::pin!(grace);
        while !deferred.is_empty() {
            tokio::select! {
                _ = &mut grace => break,
                Some((tag, confirmed)) = deferred.next() => {
                    if confirmed {
                        ch.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
                    } else {
                        ch.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await?;
                    }
                }
            }
        }
    }
    result
}

async fn settle(
    ch: &Channel,
    ctx: &IntakeCtx,
    batch: Vec<(u64, Disposition)>,
    deferred: &mut Deferred,
    outstanding: &mut BTreeSet<u64>,
) -> Result<(), BrokerError> {
    let mut run: Vec<u64> = Vec::new();
    for (tag, d) in batch {
        match d {
            Disposition::Ack(msg) => {
                if let Some(m) = msg {
                    let _ = ctx.dispatcher.send(m);
                }
                run.push(tag);
            }
            other => {
                ack_run(ch, &mut run, outstanding).await?;
                match other {
                    Disposition::Defer(msg, confirmed) => {
                        if let Some(m) = msg {
                            let _ = ctx.dispatcher.send(m);
                        }
                        outstanding.insert(tag);
                        deferred.push(Box::pin(async move { (tag, confirmed.await) }));
                    }
                    other => {
                        let requeue = matches!(other, Disposition::Requeue);
                        ch.basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue,
                            },
                        )
                        .await?
                    }
                }
            }
        }
    }
    ack_run(ch, &mut run, outstanding).await
}

/// Ack a run of consecutive deliveries: one `multiple` ack, unless a deferred
/// delivery below them is outstanding (it would be acked with them): then one by one.
async fn ack_run(
    ch: &Channel,
    run: &mut Vec<u64>,
    outstanding: &BTreeSet<u64>,
) -> Result<(), BrokerError> {
    let Some(&last) = run.last() else {
        return Ok(());
    };
    if outstanding.range(..last).next().is_none() {
        ch.basic_ack(
            last,
            BasicAckOptions {
                multiple: run.len() > 1,
            },
        )
        .await?;
    } else {
        for &t in run.iter() {
            ch.basic_ack(t, BasicAckOptions { multiple: false }).await?;
        }
    }
    run.clear();
    Ok(())
}

fn target(props: &BasicProperties, ctx: &IntakeCtx, bill_no: Option<&str>) -> (String, String) {
    let reply_to = props
        .reply_to()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .filter(|s| !s.is_empty())
        // never publish into a queue outside broker.reply_to_allow
        .filter(|s| super::reply_to_allowed(&ctx.settings.config.broker, s))
        .unwrap_or_else(|| ctx.settings.config.broker.reply_queue.clone());
    let correlation_id = props
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| bill_no.map(str::to_string))
        .unwrap_or_default();
    (reply_to, correlation_id)
}

async fn handle(
    ctx: &IntakeCtx,
    body: Vec<u8>,
    props: BasicProperties,
    redelivered: bool,
) -> Disposition {
    let now = now_ms();
    let max = ctx.settings.config.broker.max_command_bytes;
    let decoded =
        command::check_size(&body, max).and_then(|()| command::decode(&body, &ctx.settings));
    let cmd = match decoded {
        Ok(c) => c,
        Err(rej) => {
            let op = rej
                .op
                .clone()
                .filter(|o| Op::parse(o).is_some())
                .unwrap_or_else(|| "invalid".into());
            METRICS.command(&op, "rejected");
            tracing::warn!(code = rej.code, reason = %rej.message, bill_no = rej.bill_no.as_deref().unwrap_or(""), "command rejected; dead-lettering it");
            let named_target = props
                .reply_to()
                .as_ref()
                .is_some_and(|s| !s.as_str().is_empty());
            if named_target || rej.bill_no.is_some() {
                return reject(ctx, &rej, &body, &props, now).await;
            }
            return dead_letter(ctx, rej.code, &body, &props).await;
        }
    };
    let op = cmd.params.op;
    if let Some(rej) = super::reply_to_refusal(&ctx.settings.config.broker, &props, &cmd) {
        METRICS.command(op.as_str(), "rejected");
        tracing::warn!(
            code = rej.code,
            bill_no = rej.bill_no.as_deref().unwrap_or(""),
            "reply_to outside broker.reply_to_allow; dead-lettering the command"
        );
        return reject(ctx, &rej, &body, &props, now).await;
    }
    let read = op.is_read();
    if read && !ctx.writer.is_shared() {
        return balance(ctx, cmd, &props, now);
    }
    let mut cmd = cmd;
    if read {
        // a shared outbox: recorded as a row of its own, run where the player's
        // lease is held (module doc)
        let (reply_to, correlation_id) = target(&props, ctx, None);
        let prefix = read_key_prefix(&body, &reply_to, &correlation_id);
        if redelivered {
            // an earlier delivery of this message may have recorded its row and
            // died before the reply: that row's answer is this delivery's
            let player = (cmd.params.appid.as_str(), cmd.params.openid.as_str());
            if let Ok(Some(job_id)) = ctx
                .writer
                .earlier_read(player, &prefix, &reply_to, &correlation_id)
                .await
            {
                tracing::info!(
                    job_id,
                    "a redelivered {op} waits for the row its earlier delivery recorded"
                );
                let writer = ctx.writer.clone();
                let confirmed = async move {
                    writer
                        .reply_confirmed(job_id, &reply_to, &correlation_id)
                        .await
                }
                .boxed();
                return Disposition::Defer(None, confirmed);
            }
        }
        cmd.params.bill_no = Some(format!("{prefix}{:016x}", rand::random::<u64>()));
    }
    let (reply_to, correlation_id) =
        target(&props, ctx, cmd.params.bill_no.as_deref().filter(|_| !read));
    let bill_no = cmd.params.bill_no.clone();
    let intake = Intake {
        command: cmd,
        reply_to,
        correlation_id,
        now,
    };
    // Storage trouble (disk full, size budget, read-only file): keep the delivery
    // unacked and try again, so the broker keeps it and the prefetch window stops
    // intake. Requeueing instead would count as a redelivery (a quorum queue's
    // delivery limit could dead-letter a valid command).
    let outcome = loop {
        match ctx.writer.intake(intake.clone()).await {
            Err(e) if !*ctx.shutdown.borrow() => {
                storage_trouble(&e);
                tokio::time::sleep(STORAGE_RETRY_PAUSE).await;
            }
            other => break other,
        }
    };
    if read {
        return read_recorded(ctx, outcome, op, intake.reply_to, intake.correlation_id);
    }
    match outcome {
        Ok(IntakeOutcome::New(job)) => {
            METRICS.command(op.as_str(), "accepted");
            Disposition::Ack(Some(DispatchMsg::Job(job)))
        }
        Ok(IntakeOutcome::Reopened(job)) => {
            METRICS.command(op.as_str(), "reopened");
            tracing::info!(bill_no = bill_no.as_deref().unwrap_or(""), op = %op, "job re-opened with a new session_key");
            Disposition::Ack(Some(DispatchMsg::Reopened(job)))
        }
        Ok(IntakeOutcome::Joined { reply, pending, .. }) => {
            METRICS.command(op.as_str(), "joined");
            if let Some(r) = reply {
                ctx.publisher.send(r);
            }
            Disposition::Ack(pending.map(DispatchMsg::Rejoin))
        }
        Ok(IntakeOutcome::Elsewhere { .. }) => {
            // durable; the worker holding this player runs it
            METRICS.command(op.as_str(), "accepted");
            Disposition::Ack(None)
        }
        Ok(IntakeOutcome::Conflict { .. }) => {
            METRICS.command(op.as_str(), "conflict");
            let rej = Rejection {
                code: "bill_no_conflict",
                message: "a command with this appid, op and bill_no but different parameters was already accepted; the original is untouched".into(),
                op: Some(op.as_str().into()),
                bill_no: bill_no.clone(),
                openid: None,
                appid: None,
            };
            tracing::warn!(bill_no = bill_no.as_deref().unwrap_or(""), op = %op, "bill_no conflict; dead-lettering the command");
            reject(ctx, &rej, &body, &props, now).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "shutting down with the outbox unavailable; the command stays in the queue");
            Disposition::Requeue
        }
    }
}

/// Log outbox trouble at most every 10 s (every stuck delivery retries each second);
/// a storage condition (disk full, PostgreSQL away) not at all: the writer logs each
/// episode once when it starts and once when it ends (`outbox::health`).
fn storage_trouble(e: &crate::outbox::OutboxError) {
    use std::sync::atomic::AtomicI64;
    if e.trouble().is_some() {
        tracing::debug!(error = %e, "outbox cannot take this command yet");
        return;
    }
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now - last >= 10_000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::error!(error = %e, "outbox cannot take commands; they stay unacked in the broker until it can (see /readyz)");
    }
}

/// Publish a confirmed `rejected` reply, then dead-letter a copy of the message.
async fn reject(
    ctx: &IntakeCtx,
    rej: &Rejection,
    body: &[u8],
    props: &BasicProperties,
    now: i64,
) -> Disposition {
    let reply = Reply::rejected(rej, rfc3339_ms(now));
    if reply_confirmed(ctx, props, rej.bill_no.as_deref(), &reply).await {
        dead_letter(ctx, rej.code, body, props).await
    } else {
        Disposition::Requeue
    }
}

/// Publish a reply that has no outbox row; whether the broker confirmed it.
async fn reply_confirmed(
    ctx: &IntakeCtx,
    props: &BasicProperties,
    bill_no: Option<&str>,
    reply: &Reply,
) -> bool {
    let (reply_to, correlation_id) = target(props, ctx, bill_no);
    ctx.publisher
        .send_confirmed(OutgoingReply {
            target_id: None,
            reply_to,
            correlation_id,
            payload: Arc::from(reply.to_bytes()),
        })
        .await
}

/// Put a copy of a refused command, without its session_key and saying `reason`,
/// in the dead-letter queue; ack the command once the broker confirmed the copy
/// (requeue it to try again when it did not).
async fn dead_letter(
    ctx: &IntakeCtx,
    reason: &str,
    body: &[u8],
    props: &BasicProperties,
) -> Disposition {
    let b = &ctx.settings.config.broker;
    if super::deadletter::broker_may_keep(body, b.max_command_bytes) {
        return Disposition::Reject;
    }
    let (copy, scrubbed) = super::deadletter::scrub(body, b.max_command_bytes);
    let props =
        super::deadletter::properties(props, reason, scrubbed, b.dead_letter_ttl.0.as_millis());
    if ctx
        .publisher
        .send_to_confirmed(&b.dead_letter_queue, copy, props)
        .await
    {
        Disposition::Ack(None)
    } else {
        Disposition::Requeue
    }
}

/// On a SQLite outbox, `balance` (and `query_order`, answered the same way from
/// `queryorderinfo`) moves nothing: it has no outbox row and is handed to the dispatcher,
/// which answers it in the player's order, under the same limits as any call.
/// Its delivery is acked once the reply is confirmed ([`Disposition::Defer`]).
fn balance(ctx: &IntakeCtx, cmd: Command, props: &BasicProperties, now: i64) -> Disposition {
    let (reply_to, correlation_id) = target(props, ctx, None);
    METRICS.command(cmd.params.op.as_str(), "accepted");
    let (tx, rx) = oneshot::channel::<bool>();
    let msg = DispatchMsg::Direct(
        Box::new(BalanceCmd {
            params: cmd.params,
            session_key: cmd.session_key,
            reply_to,
            correlation_id,
            received_at: now,
        }),
        tx,
    );
    // a dropped one-shot (the dispatcher stopped): requeued
    Disposition::Defer(Some(msg), rx.map(|r| r.unwrap_or(false)).boxed())
}

/// The first half of a `balance`/`query_order` row's key on a shared outbox: `~`
/// and a digest of the message (64 bits of SHA-1 over its body and reply
/// target, the same for every delivery of it), so a redelivery finds the row an
/// earlier delivery recorded ([`Outbox::earlier_read`]). The second half is 64
/// random bits: the same message published again is a new command, with a row of
/// its own. No client bill_no can equal such a key (those are `[A-Za-z0-9_-]`).
pub fn read_key_prefix(body: &[u8], reply_to: &str, correlation_id: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    for part in [body, reply_to.as_bytes(), correlation_id.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let d = h.finalize();
    let mut s = String::with_capacity(17);
    s.push('~');
    for b in d.iter().take(8) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A `balance` or `query_order` recorded on a shared outbox: handed to the
/// dispatcher when this worker holds the player (otherwise its lease holder
/// loads it, in the player's order), and acked once its reply is confirmed,
/// whichever worker published it ([`Outbox::reply_confirmed`]).
fn read_recorded(
    ctx: &IntakeCtx,
    outcome: Result<IntakeOutcome, crate::outbox::OutboxError>,
    op: Op,
    reply_to: String,
    correlation_id: String,
) -> Disposition {
    let (job_id, msg) = match outcome {
        Ok(IntakeOutcome::New(job)) => (job.id, Some(DispatchMsg::Job(job))),
        Ok(IntakeOutcome::Elsewhere { job_id }) => (job_id, None),
        Ok(_) => {
            // a fresh random key met an existing row: answer it on redelivery
            tracing::warn!("the key drawn for a balance's row was taken; requeueing it");
            return Disposition::Requeue;
        }
        Err(e) => {
            tracing::warn!(error = %e, "shutting down with the outbox unavailable; the command stays in the queue");
            return Disposition::Requeue;
        }
    };
    METRICS.command(op.as_str(), "accepted");
    let writer = ctx.writer.clone();
    let confirmed = async move {
        writer
            .reply_confirmed(job_id, &reply_to, &correlation_id)
            .await
    }
    .boxed();
    Disposition::Defer(msg, confirmed)
}
