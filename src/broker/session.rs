//! Keeps the broker side alive: connect, declare the topology, consume commands and
//! publish replies; when the connection drops or the broker restarts, reconnect with
//! capped exponential backoff (`backon`) and resume. Unacked deliveries of a dead
//! connection are redelivered by the broker (they were never acked, so nothing is
//! lost; what the outbox already holds joins its job). Replies queued meanwhile wait
//! in the publisher queue, and unconfirmed ones are relayed from the outbox.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

use super::consumer::{self, IntakeCtx};
use super::publisher::PublisherQueue;
use super::{connect, declare_topology, display_url, BrokerError};
use crate::metrics::Health;

/// How long a close may take before the connection is given up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Run until `stop_publishing` turns true (intake stops earlier, on `shutdown`).
/// `health` is this worker's readiness: up while a connection is open.
pub async fn run(
    ctx: IntakeCtx,
    mut pq: PublisherQueue,
    shutdown: watch::Receiver<bool>,
    stop_publishing: watch::Receiver<bool>,
    connection_name: String,
    health: Health,
) {
    let url = ctx.settings.config.broker.url.clone();
    let shown = display_url(&url);
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        if *stop_publishing.borrow() {
            break;
        }
        match connect(&url, &connection_name).await {
            Ok(conn) => {
                tracing::info!(broker = %shown, "connected to the broker");
                health.set_broker_connected(true);
                delays = backoff();
                let r = session(
                    &conn,
                    &ctx,
                    &mut pq,
                    shutdown.clone(),
                    stop_publishing.clone(),
                )
                .await;
                health.set_broker_connected(false);
                // a dead connection may never answer close-ok: bound it
                if conn.status().connected() {
                    let _ =
                        tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bye".into())).await;
                }
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(broker = %shown, error = %e, "broker connection lost; reconnecting")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(broker = %shown, error = %e, "cannot connect to the broker; retrying")
            }
        }
        let d = delays.next().unwrap_or(Duration::from_secs(10));
        let mut stop = stop_publishing.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn session(
    conn: &lapin::Connection,
    ctx: &IntakeCtx,
    pq: &mut PublisherQueue,
    mut shutdown: watch::Receiver<bool>,
    mut stop_publishing: watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let pub_ch = conn.create_channel().await?;
    declare_topology(conn, &ctx.settings.config.broker).await?;
    let cons_ch = conn.create_channel().await?;
    let writer = ctx.writer.clone();
    let intake = async {
        if !*shutdown.borrow() {
            consumer::run(&cons_ch, ctx, &mut shutdown).await?;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, cons_ch.close(200, "shutdown".into())).await;
        Ok::<(), BrokerError>(())
    };
    let publishing = pq.run(&pub_ch, &writer, &mut stop_publishing);
    tokio::pin!(intake, publishing);
    let mut intake_done = false;
    let r = loop {
        tokio::select! {
            r = &mut intake, if !intake_done => match r {
                // stopped on `shutdown`: keep publishing until told to stop
                Ok(()) => intake_done = true,
                Err(e) => break ("intake", Err(e)),
            },
            r = &mut publishing => {
                // told to stop: intake may still be acking deliveries whose reply
                // was just confirmed (its bounded grace at shutdown)
                if r.is_ok() && !intake_done {
                    let grace = consumer::DEFERRED_GRACE + CLOSE_TIMEOUT;
                    let _ = tokio::time::timeout(grace, &mut intake).await;
                }
                break ("publisher", r);
            }
        }
    };
    tracing::debug!(side = r.0, ok = r.1.is_ok(), "broker session ended");
    r.1
}
