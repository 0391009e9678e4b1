//! The one writer: a thread that owns the write connection and commits requests in
//! batches (group commit). Callers send a request and await its answer, which comes
//! only after the transaction holding it has committed (`synchronous=FULL`): an
//! answer is a durability promise. Each request runs in its own savepoint, so one bad
//! request cannot fail its batch; a failed commit fails every request of the batch.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::health::{WriteHealth, WriteTrouble};
use super::pushes::{self, NewPush, PushStored, UnpublishedEvent};
use super::writes::{in_savepoint, intake, mark, record};
use super::OutboxError;
use crate::command::{Command, Params};
use crate::engine::job::Job;
use crate::engine::record::{PreCallMark, Record};
use crate::metrics::METRICS;

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 1024;

/// A reply to publish for one reply target.
#[derive(Debug, Clone)]
pub struct OutgoingReply {
    /// `None` for replies that have no outbox row (rejections, balance).
    pub target_id: Option<i64>,
    pub reply_to: String,
    pub correlation_id: String,
    pub payload: Arc<[u8]>,
}

/// What an outcome write did.
#[derive(Debug, Default)]
pub struct Landed {
    /// Replies to publish: a final outcome's, to its targets not published yet.
    pub replies: Vec<OutgoingReply>,
    /// A final outcome on a session problem found this newer session_key in the
    /// outbox (see [`crate::engine::SessionGuard`]) and re-opened the job with it
    /// instead; nothing is published.
    pub reopened_with: Option<crate::secret::Secret>,
}

/// A reply the broker confirmed, to mark published. It carries the bytes that
/// were published: the mark lands only while they are still the job's reply, so a
/// late mark cannot stand for a newer reply of a re-opened job.
#[derive(Debug, Clone)]
pub struct Confirmed {
    pub target: i64,
    /// Confirmed but unroutable (no such queue).
    pub returned: bool,
    pub payload: Arc<[u8]>,
}

impl Confirmed {
    /// The broker confirmed `reply` (`returned`: unroutable); `None` for a reply
    /// with no outbox row.
    pub fn of(reply: &OutgoingReply, returned: bool) -> Option<Confirmed> {
        reply.target_id.map(|target| Confirmed {
            target,
            returned,
            payload: reply.payload.clone(),
        })
    }
}

/// A valid command to record.
#[derive(Clone)]
pub struct Intake {
    pub command: Command,
    pub reply_to: String,
    pub correlation_id: String,
    pub now: i64,
}

impl Intake {
    /// The job's stored final reply, owed again to this command's sender (reply
    /// target `target`): a re-sent command of a finished job gets it at once.
    pub fn reply_owed(&self, target: i64, payload: String) -> OutgoingReply {
        OutgoingReply {
            target_id: Some(target),
            reply_to: self.reply_to.clone(),
            correlation_id: self.correlation_id.clone(),
            payload: Arc::from(payload.into_bytes()),
        }
    }
}

/// What the outbox did with a command.
#[derive(Debug)]
pub enum IntakeOutcome {
    /// A new job: the dispatcher must schedule it.
    New(Job),
    /// Same key, same parameters: the command joined the existing job. When the job
    /// is already final, its stored reply is to be published to the new target; when
    /// it is still pending, `pending` carries it (a redelivery after a broker outage
    /// may be the only news of it the dispatcher gets).
    Joined {
        job_id: i64,
        reply: Option<OutgoingReply>,
        pending: Option<Job>,
    },
    /// A job that ended on a session problem (failed with 90010, or unknown /
    /// outcome_uncertain) re-opened with the command's new session_key.
    Reopened(Job),
    /// Same key, different parameters: the original job is untouched.
    Conflict { job_id: i64 },
    /// Recorded (new, or re-opened) for the worker that holds the job's player:
    /// that worker runs it (shared PostgreSQL outbox only).
    Elsewhere { job_id: i64 },
}

// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Request {
    Intake(Intake, oneshot::Sender<Result<IntakeOutcome, OutboxError>>),
    Record(Record, oneshot::Sender<Result<Landed, OutboxError>>),
    Published(Vec<Confirmed>, i64),
    /// Pre-call marks. Durable before any of those calls goes out.
    Mark(Vec<PreCallMark>, oneshot::Sender<Result<(), OutboxError>>),
    Flush(oneshot::Sender<()>),
    /// A verified push to store once per key.
    Push(NewPush, oneshot::Sender<Result<PushStored, OutboxError>>),
    /// Push events the broker confirmed: (ids, time).
    PushPublished(Vec<i64>, i64),
    /// Unconfirmed push events: (limit, received before, answer).
    Unpublished(
        i64,
        i64,
        oneshot::Sender<Result<Vec<UnpublishedEvent>, OutboxError>>,
    ),
    /// Once a second from the ticker: an idle writer checkpoints what it committed,
    /// so erased session_keys leave the WAL even when no other request comes.
    Tick,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Request>,
    health: WriteHealth,
}

impl Writer {
    /// Open the outbox at `path` and start the writer thread. `max_size_mb` is the
    /// `outbox.max_size_mb` disk budget (`None`: no limit beyond SQLite's own).
    pub fn start(
        path: &Path,
        max_size_mb: Option<u64>,
    ) -> Result<(Writer, std::thread::JoinHandle<()>), OutboxError> {
        let conn = super::open_rw(path, max_size_mb)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let health = WriteHealth::default();
        let h = health.clone();
        let join = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || run(conn, rx, h))?;
        // The ticker holds only a weak sender: it never keeps the writer alive.
        let weak = tx.downgrade();
        std::thread::Builder::new()
            .name("outbox-ticker".into())
            .spawn(move || loop {
                std::thread::sleep(super::CHECKPOINT_IDLE);
                match weak.upgrade() {
                    Some(tx) if tx.send(Request::Tick).is_ok() => {}
                    _ => break,
                }
            })?;
        Ok((Writer { tx, health }, join))
    }

    /// Whether the last commit succeeded (for `/readyz`).
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
            .send(Request::Record(r, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    /// Make durable that a call of each job may go out now: `calls + 1` and the
    /// start of the bill_no window (`first_attempt_at`, kept if already set). Only
    /// after this returns may the calls be made, so a crash mid-call leaves a trace.
    pub async fn mark_calls(&self, marks: Vec<PreCallMark>) -> Result<(), OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Mark(marks, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    /// Resolves once every request sent before it is committed.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Flush(tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)
    }

    /// Store a verified push (durable when this returns).
    pub async fn store_push(&self, p: NewPush) -> Result<PushStored, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Push(p, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    /// Push events the broker confirmed (fire and forget: an unmarked event is
    /// published again, which its event_id makes harmless).
    pub fn push_published(&self, ids: Vec<i64>, now: i64) {
        let _ = self.tx.send(Request::PushPublished(ids, now));
    }

    /// Push events not confirmed yet, received before `before`, oldest first.
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

    /// Mark reply targets confirmed by the broker (`returned`: confirmed but unroutable).
    /// Fire and forget: an unmarked target is re-published later, which is harmless.
    pub fn published(&self, targets: Vec<Confirmed>, now: i64) {
        let _ = self.tx.send(Request::Published(targets, now));
    }
}

fn run(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Request>, health: WriteHealth) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    // Published marks waiting to share the next commit (see `defers`)
    let mut deferred: Vec<Request> = Vec::new();
    let mut checkpoints = super::Checkpointer::default();
    let mut intake_blocked = false;
    while let Some(first) = rx.blocking_recv() {
        if matches!(first, Request::Tick) {
            if !deferred.is_empty() {
                // a quiet writer: the marks held back wait no longer
                std::mem::swap(&mut batch, &mut deferred);
                commit(&mut conn, &mut batch, &mut intake_blocked, &health);
                checkpoints.committed(&conn, rx.is_empty());
            } else if rx.is_empty() {
                checkpoints.idle(&conn);
            }
            continue;
        }
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if defers(&batch, deferred.len()) {
            deferred.append(&mut batch);
            continue;
        }
        batch.append(&mut deferred);
        if commit(&mut conn, &mut batch, &mut intake_blocked, &health) {
            checkpoints.committed(&conn, rx.is_empty());
        }
    }
    if !deferred.is_empty() {
        commit(&mut conn, &mut deferred, &mut intake_blocked, &health);
    }
    checkpoints.finish(&conn);
    tracing::debug!("outbox writer stopped");
}

/// Whether `batch` may wait for the next commit instead of committing alone: it
/// holds only published marks (nobody waits for them, and until they land the
/// publisher keeps the relay from sending those replies again), and fewer than
/// [`MAX_BATCH`] are held already. At low rates this saves a commit and its fsync
/// per job; held marks commit with the next request, or at the next tick
/// ([`super::CHECKPOINT_IDLE`]), or when the writer stops.
fn defers(batch: &[Request], held: usize) -> bool {
    held + batch.len() < MAX_BATCH
        && batch
            .iter()
            .all(|r| matches!(r, Request::Published(..) | Request::Tick))
}

/// Commit `batch` (drained) and report to `health`; `true` when it committed.
/// Ready means commands can be taken: a full size budget can fail the inserts of
/// intake and still let the rest of the batch commit; then the outbox stays down
/// until an intake succeeds again, whatever else commits.
fn commit(
    conn: &mut Connection,
    batch: &mut Vec<Request>,
    intake_blocked: &mut bool,
    health: &WriteHealth,
) -> bool {
    // only reads of unconfirmed push events: no transaction, nothing to commit
    if batch.iter().all(|r| matches!(r, Request::Unpublished(..))) {
        for r in batch.drain(..) {
            if let Request::Unpublished(limit, before, resp) = r {
                let _ = resp.send(super::pushes::unpublished(conn, limit, before));
            }
        }
        return false;
    }
    let n = batch.len();
    let has_intake = batch
        .iter()
        .any(|r| matches!(r, Request::Intake(..) | Request::Push(..)));
    let result = commit_batch(conn, batch);
    batch.clear();
    match result {
        Err(e) => {
            *intake_blocked = has_intake;
            health.failed(&e, n);
            false
        }
        Ok(intakes) => {
            METRICS.outbox_commit(n);
            match intakes {
                Some(Err(e)) => {
                    *intake_blocked = true;
                    health.failed(&e, n);
                }
                Some(Ok(())) => {
                    *intake_blocked = false;
                    health.ok();
                }
                None if !*intake_blocked => health.ok(),
                None => {}
            }
            true
        }
    }
}

/// Answers held until the commit decides them.
// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Intake(
        oneshot::Sender<Result<IntakeOutcome, OutboxError>>,
        Result<IntakeOutcome, OutboxError>,
    ),
    Record(
        oneshot::Sender<Result<Landed, OutboxError>>,
        Result<Landed, OutboxError>,
    ),
    Mark(
        oneshot::Sender<Result<(), OutboxError>>,
        Result<(), OutboxError>,
    ),
    Flush(oneshot::Sender<()>),
    Push(
        oneshot::Sender<Result<PushStored, OutboxError>>,
        Result<PushStored, OutboxError>,
    ),
}

/// Committed: `Some(Ok)` when every intake of the batch succeeded, `Some(Err)`
/// with the first intake's error otherwise, `None` when it held none.
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Request>,
) -> Result<Option<Result<(), OutboxError>>, OutboxError> {
    let mut answers: Vec<Pending> = Vec::with_capacity(batch.len());
    let mut intakes: Option<Result<(), OutboxError>> = None;
    // The first request error: when SQLite rolls the whole transaction back (disk or
    // size budget full), later statements only say "no transaction is active".
    let mut first_err: Option<(String, Option<WriteTrouble>)> = None;
    let mut reads = Vec::new();
    let outcome = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for req in batch.drain(..) {
            match req {
                Request::Intake(i, resp) => {
                    let r = in_savepoint(&mut tx, |sp| intake(sp, &i));
                    taken(&mut intakes, r.as_ref().err());
                    if let (Err(e), None) = (&r, &first_err) {
                        first_err = Some((e.to_string(), e.trouble()));
                    }
                    answers.push(Pending::Intake(resp, r));
                }
                Request::Record(r, resp) => {
                    let out = in_savepoint(&mut tx, |sp| record(sp, &r));
                    if let (Err(e), None) = (&out, &first_err) {
                        first_err = Some((e.to_string(), e.trouble()));
                    }
                    answers.push(Pending::Record(resp, out));
                }
                Request::Flush(resp) => answers.push(Pending::Flush(resp)),
                Request::Push(p, resp) => {
                    let r = in_savepoint(&mut tx, |sp| pushes::store(sp, &p));
                    taken(&mut intakes, r.as_ref().err());
                    if let (Err(e), None) = (&r, &first_err) {
                        first_err = Some((e.to_string(), e.trouble()));
                    }
                    answers.push(Pending::Push(resp, r));
                }
                Request::PushPublished(ids, now) => {
                    if let Err(e) =
                        in_savepoint(&mut tx, |sp| pushes::mark_published(sp, &ids, now))
                    {
                        tracing::debug!(error = %e, "cannot mark push events confirmed; they may be published again");
                    }
                }
                // a read: answered after the commit, from committed rows only
                Request::Unpublished(limit, before, resp) => reads.push((limit, before, resp)),
                // a tick that arrived with real requests: the commit follows anyway
                Request::Tick => {}
                Request::Mark(marks, resp) => {
                    let out = in_savepoint(&mut tx, |sp| mark(sp, &marks));
                    if let (Err(e), None) = (&out, &first_err) {
                        first_err = Some((e.to_string(), e.trouble()));
                    }
                    answers.push(Pending::Mark(resp, out));
                }
                Request::Published(targets, now) => {
                    let mut stmt = tx.prepare_cached(
                        "UPDATE reply_targets SET published_at = ?1, returned = ?2 \
                         WHERE id = ?3 AND published_at IS NULL \
                         AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = reply_targets.job_id AND j.result = ?4)",
                    )?;
                    for c in targets {
                        // a reply is JSON text; anything else is no reply of the outbox
                        let Ok(payload) = std::str::from_utf8(&c.payload) else {
                            continue;
                        };
                        stmt.execute(params![now, c.returned as i64, c.target, payload])?;
                    }
                }
            }
        }
        tx.commit()
    })();
    for (limit, before, resp) in reads {
        let _ = resp.send(pushes::unpublished(conn, limit, before));
    }
    match outcome {
        Ok(()) => {
            for a in answers {
                match a {
                    Pending::Intake(s, r) => {
                        let _ = s.send(r);
                    }
                    Pending::Record(s, r) => {
                        let _ = s.send(r);
                    }
                    Pending::Mark(s, r) => {
                        let _ = s.send(r);
                    }
                    Pending::Flush(s) => {
                        let _ = s.send(());
                    }
                    Pending::Push(s, r) => {
                        let _ = s.send(r);
                    }
                }
            }
            Ok(intakes)
        }
        Err(e) => {
            let (msg, trouble) = match &first_err {
                Some((first, t)) => (
                    format!("{first} (then: {e})"),
                    t.or(WriteTrouble::of_sqlite(&e)),
                ),
                None => (e.to_string(), WriteTrouble::of_sqlite(&e)),
            };
            for a in answers {
                let err = || OutboxError::batch_failed(trouble, &msg);
                match a {
                    Pending::Intake(s, _) => {
                        let _ = s.send(Err(err()));
                    }
                    Pending::Record(s, _) => {
                        let _ = s.send(Err(err()));
                    }
                    Pending::Mark(s, _) => {
                        let _ = s.send(Err(err()));
                    }
                    Pending::Push(s, _) => {
                        let _ = s.send(Err(err()));
                    }
                    Pending::Flush(_) => {}
                }
            }
            Err(OutboxError::batch_failed(trouble, &msg))
        }
    }
}

/// Count one intake (a command or a push) of a batch: the first failure is kept.
fn taken(intakes: &mut Option<Result<(), OutboxError>>, err: Option<&OutboxError>) {
    match (err, &*intakes) {
        (Some(e), None | Some(Ok(()))) => {
            *intakes = Some(Err(OutboxError::batch_failed(e.trouble(), &e.to_string())));
        }
        (None, None) => *intakes = Some(Ok(())),
        _ => {}
    }
}

/// Parameters stored for a job, decoded (used when loading pending jobs).
pub fn decode_params(request: &str) -> Result<Params, OutboxError> {
    serde_json::from_str(request).map_err(|e| OutboxError::Corrupt(format!("request JSON: {e}")))
}
