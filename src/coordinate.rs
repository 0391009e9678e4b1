//! The shared outbox's coordination loop: the async shell around
//! [`outbox::postgres::coord::Coordinator`](crate::outbox::postgres::coord).
//!
//! Twice a second — and at once when another worker's commit says it recorded a
//! job for a player this one may hold — it asks the dispatcher which players its
//! engine holds and how much room it has, lets the coordinator renew, give back,
//! take over and load (see that module), and hands the result to the dispatcher:
//! jobs to run, players lost. Players the dispatcher gives back after a fenced write are released here,
//! fenced by the generation the write was made under. A worker whose broker
//! connection is down gives the relay lease up; the relay reads on from a cursor.
//! Whichever worker holds the `relay` lease re-publishes unconfirmed replies, so
//! N workers do not publish every stranded reply N times. At a clean stop every
//! lease is given back, so other workers take the players at once.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::publisher::{Publisher, RELAY_INTERVAL, RELAY_PAGE};
use crate::dispatch::DispatchMsg;
use crate::metrics::Health;
use crate::outbox::postgres::coord::Coordinator;
use crate::outbox::GiveBack;

/// A reply is relayed once it has waited this long unconfirmed (its own worker
/// publishes it at once; the relay is for the ones whose worker died or lost the
/// broker). The workers' clocks must agree to within this much.
const RELAY_AFTER_MS: i64 = 10_000;

/// How often a worker looks for players and jobs to take.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Woken by another worker's notification (a job recorded for a player held
/// here), a worker looks at once, but not within this long of its last look: a
/// burst of notifications costs one look.
pub const WOKEN_GAP: Duration = Duration::from_millis(25);

/// Run until `shutdown`; answers the coordinator so the caller can give the
/// leases back once the steps under way are recorded.
pub async fn run(
    mut coord: Coordinator,
    lease: Duration,
    dispatcher: mpsc::UnboundedSender<DispatchMsg>,
    mut give_back: mpsc::UnboundedReceiver<GiveBack>,
    publisher: Publisher,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
) -> Coordinator {
    let renew_every = lease / 3;
    let mut last_renew: Option<Instant> = None;
    let mut last_relay = Instant::now();
    let mut failing = 0u32;
    let mut back = Vec::new();
    let mut cursor = crate::outbox::query::RelayCursor::default();
    let wake = coord.wake();
    loop {
        while let Ok(p) = give_back.try_recv() {
            back.push(p);
        }
        if !back.is_empty() {
            match coord.release(&back).await {
                Ok(()) => back.clear(),
                // kept and tried again at the next look
                Err(e) => tracing::warn!(error = %e, "cannot give players back yet"),
            }
        }
        let (tx, rx) = oneshot::channel();
        if dispatcher.send(DispatchMsg::Snapshot(tx)).is_err() {
            break;
        }
        let Ok((held, room)) = rx.await else { break };
        let renew = last_renew.is_none_or(|t| t.elapsed() >= renew_every);
        // a worker without a broker connection cannot relay: it leaves the relay
        // lease to one that can
        let can_relay = health.broker_connected();
        // the next renewal is due lease / 3 after this one started, however long
        // this look takes (docs/config.md's rule counts on it)
        let started = Instant::now();
        match coord.tick(&held, room, renew, can_relay).await {
            Ok(t) => {
                failing = 0;
                if renew {
                    last_renew = Some(started);
                }
                if !t.lost.is_empty() {
                    tracing::warn!(
                        players = t.lost.len(),
                        "player leases lost to another worker; dropping their jobs here"
                    );
                    let _ = dispatcher.send(DispatchMsg::PlayersLost(t.lost));
                }
                if !t.jobs.is_empty() {
                    tracing::debug!(jobs = t.jobs.len(), "loaded jobs of held players");
                    let _ = dispatcher.send(DispatchMsg::Claimed(t.jobs));
                }
                if t.relay && health.broker_connected() && last_relay.elapsed() >= RELAY_INTERVAL {
                    last_relay = Instant::now();
                    let before = crate::command::now_ms() - RELAY_AFTER_MS;
                    match coord
                        .unpublished_replies(cursor.after, RELAY_PAGE, before)
                        .await
                    {
                        Ok(replies) => {
                            cursor.advance(&replies, RELAY_PAGE);
                            let n = publisher.relay_once(replies);
                            if n > 0 {
                                tracing::info!(
                                    replies = n,
                                    "re-publishing unconfirmed replies from the outbox"
                                );
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "reply relay cannot read the outbox"),
                    }
                }
            }
            Err(e) => {
                failing += 1;
                if failing == 1 || failing % 20 == 0 {
                    tracing::error!(error = %e, "cannot reach the shared outbox to renew leases; no new call starts once they run short");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = wake.notified() => {
                tokio::time::sleep(WOKEN_GAP.saturating_sub(started.elapsed())).await;
            }
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    coord
}
