//! The PostgreSQL writer: one task, one connection, one transaction per batch of
//! requests (group commit) — the same contract as the SQLite writer (an answer is
//! sent only after the commit holding it). A batch runs first without savepoints;
//! if any request fails, it is rolled back and run again with each request in its
//! own savepoint, so one bad request cannot fail the others. Run without
//! savepoints, a batch's marks, confirms, outcomes and intakes go as a few
//! statements over arrays for all its requests (`batch.rs`, `writes::together`),
//! those that do not depend on each other pipelined on the connection. Here: the
//! requests, the [`PgWriter`] handle and the task loop; how one batch is committed
//! is in `commit.rs`.
//!
//! What differs is the lease fence. Intake runs a job here only when this worker
//! holds its player's lease and has loaded every earlier pending job of that
//! player; otherwise the job is recorded for the lease holder ([`IntakeOutcome::Elsewhere`]).
//! A pre-call mark lands only while this worker's lease, at the generation the
//! job was loaded under, outlives the call (`request_timeout` + a margin, on the
//! database's clock), and an outcome only while the lease is still this worker's
//! at that generation: a fenced write answers [`OutboxError::LeaseLost`] and the
//! engine drops the job (and gives the player back unless it holds a newer
//! generation of it).

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use super::commit::commit_batch;
use super::pushes;
pub(super) use super::Stmts;
pub use super::{job_from_row, Fence, JOB_COLS};
use crate::outbox::health::{WriteHealth, WriteTrouble};

use crate::engine::{PreCallMark, Record};
use crate::metrics::METRICS;
use crate::outbox::handle::Marked;
use crate::outbox::pushes::{NewPush, PushStored, UnpublishedEvent};
use crate::outbox::writer::{Confirmed, Intake, IntakeOutcome, Landed};
use crate::outbox::OutboxError;
use crate::secret::SecretUrl;

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;

/// After a failed connect, batches are failed with the same error for this long
/// (doubling to [`RECONNECT_MAX`]) before the next attempt: while PostgreSQL is
/// away every stuck delivery retries each second, and one attempt per pause tells
/// as much as one per delivery.
const RECONNECT_MIN: std::time::Duration = std::time::Duration::from_millis(250);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    Intake(Intake, oneshot::Sender<Result<IntakeOutcome, OutboxError>>),
    Record(Box<Record>, oneshot::Sender<Result<Landed, OutboxError>>),
    Mark(
        Vec<PreCallMark>,
        oneshot::Sender<Result<Marked, OutboxError>>,
    ),
    Published(Vec<Confirmed>, i64),
    Flush(oneshot::Sender<()>),
    Push(NewPush, oneshot::Sender<Result<PushStored, OutboxError>>),
    PushPublished(Vec<i64>, i64),
    Unpublished(
        i64,
        i64,
        oneshot::Sender<Result<Vec<UnpublishedEvent>, OutboxError>>,
    ),
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct PgWriter {
    tx: mpsc::UnboundedSender<Request>,
    health: WriteHealth,
}

impl PgWriter {
    /// Connect, apply the schema and start the writer task.
    pub async fn start(
        url: SecretUrl,
        fence: Fence,
    ) -> Result<(PgWriter, tokio::task::JoinHandle<()>), OutboxError> {
        let client = super::open(&url).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let health = WriteHealth::default();
        let task = tokio::spawn(run(url, Some(client), fence, rx, health.clone()));
        Ok((PgWriter { tx, health }, task))
    }

    pub fn healthy(&self) -> bool {
        self.health.writable()
    }

    /// Whether it can write, and the episodes when it could not (`/metrics`).
    pub fn health(&self) -> &WriteHealth {
        &self.health
    }

    pub async fn intake(&self, i: Intake) -> Result<IntakeOutcome, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Intake(i, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    pub async fn record(&self, r: Record) -> Result<Landed, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Record(Box::new(r), tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    /// Pre-call marks; answers the ids whose lease fence failed (not marked).
    pub async fn mark_calls(&self, marks: Vec<PreCallMark>) -> Result<Marked, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Mark(marks, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    pub async fn flush(&self) -> Result<(), OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Flush(tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)
    }

    pub fn published(&self, targets: Vec<Confirmed>, now: i64) {
        let _ = self.tx.send(Request::Published(targets, now));
    }

    pub async fn store_push(&self, p: NewPush) -> Result<PushStored, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Push(p, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    pub fn push_published(&self, ids: Vec<i64>, now: i64) {
        let _ = self.tx.send(Request::PushPublished(ids, now));
    }

    pub async fn unpublished_events(
        &self,
        limit: i64,
        before: i64,
    ) -> Result<Vec<UnpublishedEvent>, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Unpublished(limit, before, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }
}

async fn run(
    url: SecretUrl,
    mut client: Option<Client>,
    fence: Fence,
    mut rx: mpsc::UnboundedReceiver<Request>,
    health: WriteHealth,
) {
    let mut stmts = Stmts::default();
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    // the last failed connect: until when batches fail without a new attempt
    let mut refused: Option<(tokio::time::Instant, Option<WriteTrouble>, String)> = None;
    let mut pause = RECONNECT_MIN;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            if let Some((until, trouble, msg)) = &refused {
                if tokio::time::Instant::now() < *until {
                    fail_all(&mut batch, &OutboxError::batch_failed(*trouble, msg));
                    continue;
                }
            }
            stmts = Stmts::default();
            client = match super::reconnect(&url).await {
                Ok(c) => {
                    refused = None;
                    pause = RECONNECT_MIN;
                    Some(c)
                }
                Err(e) => {
                    health.failed(&e, batch.len());
                    refused = Some((
                        tokio::time::Instant::now() + pause,
                        e.trouble(),
                        e.to_string(),
                    ));
                    pause = (pause * 2).min(RECONNECT_MAX);
                    fail_all(&mut batch, &e);
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        // reads of committed rows: answered after the batch's commit
        let (reads, rest): (Vec<Request>, Vec<Request>) = batch
            .drain(..)
            .partition(|r| matches!(r, Request::Unpublished(..)));
        batch = rest;
        let n = batch.len();
        let committed = if batch.is_empty() {
            Ok(())
        } else {
            commit_batch(c, &mut stmts, &fence, &mut batch).await
        };
        for r in reads {
            if let Request::Unpublished(limit, before, resp) = r {
                let _ = resp.send(pushes::unpublished(c, limit, before).await);
            }
        }
        match committed {
            Ok(()) => {
                health.ok();
                METRICS.outbox_commit(n);
            }
            Err(e) => {
                health.failed(&e, n);
                fail_all(&mut batch, &e);
                // a broken connection is replaced at the next batch; statements
                // prepared on it are gone with it
                if c.is_closed() {
                    client = None;
                }
            }
        }
    }
    tracing::debug!("PostgreSQL outbox writer stopped");
}

pub(super) fn fail_all(batch: &mut Vec<Request>, e: &OutboxError) {
    let (trouble, msg) = (e.trouble(), e.to_string());
    let err = || OutboxError::batch_failed(trouble, &msg);
    for r in batch.drain(..) {
        match r {
            Request::Intake(_, s) => drop(s.send(Err(err()))),
            Request::Record(_, s) => drop(s.send(Err(err()))),
            Request::Mark(_, s) => drop(s.send(Err(err()))),
            Request::Push(_, s) => drop(s.send(Err(err()))),
            Request::Unpublished(_, _, s) => drop(s.send(Err(err()))),
            Request::Published(..) | Request::Flush(_) | Request::PushPublished(..) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lease_sql_judges_expiry_on_the_database_clock() {
        assert!(
            crate::outbox::postgres::intake::TAKE_LEASE.contains(crate::outbox::postgres::NOW_MS)
        );
    }
}
