//! Waiting for the reply of a `balance` or `query_order` on the shared outbox.
//!
//! There such a command is recorded as a row and answered by whichever worker
//! holds its player's lease (in the player's order); the worker that received it
//! acks its delivery only once the reply to its reply target is confirmed by the
//! broker (`reply_targets.published_at`, set by the worker or relay that
//! published it). One task per worker watches every such target with one query
//! per [`POLL`] on a connection of its own, so waiting costs no writer round
//! trip and no statement per waiting command.
//!
//! A waiter learns `true` once the target is confirmed, and `false` (the
//! delivery is requeued: a fresh answer, which the contract allows) when the
//! row is final but its reply was not confirmed within [`FINAL_WAIT`], or the
//! row is gone. While the row is pending (its player's earlier jobs still run) it
//! waits, as a balance answered from memory waits for its turn.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use crate::outbox::OutboxError;
use crate::secret::SecretUrl;

/// How often the watched targets are read.
pub const POLL: Duration = Duration::from_millis(100);

/// How long a final row's reply may stay unconfirmed before its delivery is
/// requeued (the dispatcher publishes at once, the relay re-sends after 2 s).
pub const FINAL_WAIT: Duration = Duration::from_secs(30);

/// Targets read per statement.
const CHUNK: usize = 1_000;

/// A log line about an unreadable outbox at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

struct Waiter {
    job_id: i64,
    reply_to: String,
    correlation_id: String,
    /// When the row was first seen final with the target unconfirmed.
    final_since: Option<Instant>,
    done: oneshot::Sender<bool>,
}

/// Handle to a worker's watch task. Cheap to clone; the task ends with the last
/// handle.
#[derive(Clone)]
pub struct ReplyWatch {
    tx: mpsc::UnboundedSender<Waiter>,
    url: SecretUrl,
}

impl ReplyWatch {
    /// Start the watch task (it connects when it first has something to watch).
    pub fn start(url: SecretUrl) -> ReplyWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(url.clone(), rx));
        ReplyWatch { tx, url }
    }

    /// A redelivered `balance`/`query_order`: the newest row an earlier delivery
    /// of the same message recorded for this player — its key starts with
    /// `key_prefix` (a digest of the message) and it has this reply target —
    /// whose reply is not confirmed yet. Its answer is owed to this delivery too,
    /// so the command is not answered twice with different figures (a worker
    /// killed after recording the row, before its reply). Rare: a connection of
    /// its own per lookup.
    pub async fn earlier_read(
        &self,
        player: (&str, &str),
        key_prefix: &str,
        reply_to: &str,
        correlation_id: &str,
    ) -> Result<Option<i64>, OutboxError> {
        let c = super::reconnect(&self.url).await?;
        let pattern = format!("{key_prefix}%");
        super::trip();
        let row = c
            .query_opt(
                "SELECT j.id FROM jobs j JOIN reply_targets t ON t.job_id = j.id \
                 WHERE j.openid = $1 AND j.appid = $2 AND j.bill_no LIKE $3 \
                 AND t.reply_to = $4 AND t.correlation_id = $5 AND t.published_at IS NULL \
                 ORDER BY j.id DESC LIMIT 1",
                &[&player.1, &player.0, &pattern, &reply_to, &correlation_id],
            )
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Resolves `true` once the reply of job `job_id` to (`reply_to`,
    /// `correlation_id`) is confirmed; `false` when it will not be soon (see the
    /// module doc), or the task is gone.
    pub async fn confirmed(&self, job_id: i64, reply_to: &str, correlation_id: &str) -> bool {
        let (done, rx) = oneshot::channel();
        let w = Waiter {
            job_id,
            reply_to: reply_to.to_string(),
            correlation_id: correlation_id.to_string(),
            final_since: None,
            done,
        };
        if self.tx.send(w).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// What the outbox says of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    confirmed: bool,
    row_final: bool,
}

async fn run(url: SecretUrl, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut client: Option<Client> = None;
    let mut last_log: Option<Instant> = None;
    loop {
        if waiters.is_empty() {
            match rx.recv().await {
                Some(w) => waiters.push(w),
                None => return,
            }
        }
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        // a delivery no longer waiting (its channel closed)
        waiters.retain(|w| !w.done.is_closed());
        if !waiters.is_empty() {
            match look(&url, &mut client, &waiters).await {
                Ok(seen) => settle(&mut waiters, &seen, Instant::now()),
                Err(e) => {
                    client = None;
                    if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        last_log = Some(Instant::now());
                        tracing::warn!(error = %e, "cannot read whether balance replies were confirmed; their deliveries wait");
                    }
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Tell the waiters whose target is settled; keep the others.
fn settle(waiters: &mut Vec<Waiter>, seen: &HashMap<(i64, String, String), Seen>, now: Instant) {
    let mut keep = Vec::with_capacity(waiters.len());
    for mut w in waiters.drain(..) {
        let key = (w.job_id, w.reply_to.clone(), w.correlation_id.clone());
        let verdict = match seen.get(&key) {
            Some(s) if s.confirmed => Some(true),
            // pruned, or never there: answer it afresh
            None => Some(false),
            Some(s) if s.row_final => {
                let since = *w.final_since.get_or_insert(now);
                (now.duration_since(since) >= FINAL_WAIT).then_some(false)
            }
            Some(_) => None,
        };
        match verdict {
            Some(v) => {
                let _ = w.done.send(v);
            }
            None => keep.push(w),
        }
    }
    *waiters = keep;
}

async fn look(
    url: &SecretUrl,
    client: &mut Option<Client>,
    waiters: &[Waiter],
) -> Result<HashMap<(i64, String, String), Seen>, OutboxError> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(super::reconnect(url).await?);
    }
    let c = client
        .as_ref()
        .ok_or_else(|| OutboxError::Corrupt("no PostgreSQL connection".into()))?;
    let mut ids: Vec<i64> = waiters.iter().map(|w| w.job_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut seen = HashMap::with_capacity(waiters.len());
    for chunk in ids.chunks(CHUNK) {
        super::trip();
        let rows = c
            .query(
                "SELECT t.job_id, t.reply_to, t.correlation_id, t.published_at IS NOT NULL, \
                 j.state <> 'pending' FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
                 WHERE t.job_id = ANY($1)",
                &[&chunk],
            )
            .await?;
        for r in rows {
            seen.insert(
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?),
                Seen {
                    confirmed: r.try_get(3)?,
                    row_final: r.try_get(4)?,
                },
            );
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(job_id: i64) -> (Waiter, oneshot::Receiver<bool>) {
        let (done, rx) = oneshot::channel();
        (
            Waiter {
                job_id,
                reply_to: "q".into(),
                correlation_id: "c".into(),
                final_since: None,
                done,
            },
            rx,
        )
    }

    fn key(id: i64) -> (i64, String, String) {
        (id, "q".into(), "c".into())
    }

    #[test]
    fn a_waiter_is_told_on_confirm_waits_while_pending_and_gives_up_only_on_a_final_unconfirmed_row(
    ) {
        let (a, mut ra) = waiter(1);
        let (b, mut rb) = waiter(2);
        let (c, mut rc) = waiter(3);
        let (d, mut rd) = waiter(4);
        let mut ws = vec![a, b, c, d];
        let mut seen = HashMap::new();
        let s = |confirmed, row_final| Seen {
            confirmed,
            row_final,
        };
        seen.insert(key(1), s(true, true));
        seen.insert(key(2), s(false, false));
        seen.insert(key(3), s(false, true));
        // 4: no such target (pruned)
        let t0 = Instant::now();
        settle(&mut ws, &seen, t0);
        assert_eq!(ra.try_recv(), Ok(true));
        assert_eq!(rd.try_recv(), Ok(false));
        assert!(rb.try_recv().is_err() && rc.try_recv().is_err());
        assert_eq!(ws.len(), 2);
        // a pending row waits however long; a final one up to FINAL_WAIT
        settle(&mut ws, &seen, t0 + FINAL_WAIT * 100);
        assert!(
            rb.try_recv().is_err(),
            "the player's earlier jobs still run"
        );
        assert_eq!(rc.try_recv(), Ok(false));
        assert_eq!(ws.len(), 1);
    }
}
