//! The PostgreSQL writer: one task, one connection, one transaction per batch of
//! requests (group commit), each request in its own savepoint — the same contract
//! as the SQLite writer (an answer is sent only after the commit holding it).
//!
//! What differs is the lease fence. Intake runs a job here only when this worker
//! holds its player's lease and has loaded every earlier pending job of that
//! player; otherwise the job is recorded for the lease holder ([`IntakeOutcome::Elsewhere`]).
//! A pre-call mark lands only while this worker's lease outlives the call
//! (`request_timeout` + a margin, on the database's clock), and an outcome only
//! while the lease is still this worker's: a fenced write answers
//! [`OutboxError::LeaseLost`] and the caller drops the player.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Row, Statement, Transaction};

use super::intake::intake;

use crate::engine::job::Job;
use crate::metrics::METRICS;
use crate::outbox::handle::Marked;
use crate::outbox::writer::{decode_params, Intake, IntakeOutcome, OutgoingReply, Record, Update};
use crate::outbox::OutboxError;
use crate::secret::{Secret, SecretUrl};

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;

/// The job columns [`job_from_row`] reads, in its order.
pub const JOB_COLS: &str =
    "id, request, session_key, attempts, first_attempt_at, next_attempt_at, \
     received_at, last_errcode, last_error, reopened_at, calls, uncertain";

/// A pending job from a row selected with [`JOB_COLS`].
pub fn job_from_row(r: &Row) -> Result<Job, OutboxError> {
    let id: i64 = r.try_get(0)?;
    let request: String = r.try_get(1)?;
    Ok(Job {
        id,
        params: decode_params(&request)?,
        session_key: r.try_get::<_, Option<String>>(2)?.map(Secret::new),
        attempts: clamp_u32(r.try_get(3)?),
        calls: clamp_u32(r.try_get(10)?),
        uncertain: r.try_get::<_, i64>(11)? != 0,
        token_retries: 0,
        first_attempt_at: r.try_get(4)?,
        next_attempt_at: r.try_get(5)?,
        received_at: r.try_get(6)?,
        last_errcode: r.try_get(7)?,
        last_error: r.try_get(8)?,
        reopened_at: r.try_get(9)?,
    })
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Who this worker is and how its leases are judged.
#[derive(Debug, Clone)]
pub struct Fence {
    /// This worker's name (`player_leases.owner`, `jobs.claimed_by`).
    pub me: Arc<str>,
    /// `outbox.lease` in ms.
    pub lease_ms: i64,
    /// A call may start only while the lease outlives it by this much (ms):
    /// `midas.request_timeout` + a margin.
    pub call_ms: i64,
}

// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Request {
    Intake(Intake, oneshot::Sender<Result<IntakeOutcome, OutboxError>>),
    Record(
        Box<Record>,
        oneshot::Sender<Result<Vec<OutgoingReply>, OutboxError>>,
    ),
    Mark(
        Vec<(i64, i64)>,
        oneshot::Sender<Result<Marked, OutboxError>>,
    ),
    Published(Vec<(i64, bool)>, i64),
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct PgWriter {
    tx: mpsc::UnboundedSender<Request>,
    healthy: Arc<AtomicBool>,
}

impl PgWriter {
    /// Connect, apply the schema and start the writer task.
    pub async fn start(
        url: SecretUrl,
        fence: Fence,
    ) -> Result<(PgWriter, tokio::task::JoinHandle<()>), OutboxError> {
        let client = super::open(&url).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(run(url, Some(client), fence, rx, healthy.clone()));
        Ok((PgWriter { tx, healthy }, task))
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub async fn intake(&self, i: Intake) -> Result<IntakeOutcome, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Intake(i, tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    pub async fn record(&self, r: Record) -> Result<Vec<OutgoingReply>, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Record(Box::new(r), tx))
            .map_err(|_| OutboxError::WriterGone)?;
        rx.await.map_err(|_| OutboxError::WriterGone)?
    }

    /// Pre-call marks; answers the ids whose lease fence failed (not marked).
    pub async fn mark_calls(&self, marks: Vec<(i64, i64)>) -> Result<Marked, OutboxError> {
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

    pub fn published(&self, targets: Vec<(i64, bool)>, now: i64) {
        let _ = self.tx.send(Request::Published(targets, now));
    }
}

/// Prepared statements of the current connection.
#[derive(Default)]
pub(super) struct Stmts(HashMap<&'static str, Statement>);

impl Stmts {
    pub(super) async fn get(
        &mut self,
        tx: &Transaction<'_>,
        sql: &'static str,
    ) -> Result<Statement, OutboxError> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = tx.prepare(sql).await?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

async fn run(
    url: SecretUrl,
    mut client: Option<Client>,
    fence: Fence,
    mut rx: mpsc::UnboundedReceiver<Request>,
    healthy: Arc<AtomicBool>,
) {
    let mut stmts = Stmts::default();
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            stmts = Stmts::default();
            client = match super::connect(&url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reach the PostgreSQL outbox; nothing in this batch is acknowledged");
                    healthy.store(false, Ordering::Relaxed);
                    fail_all(&mut batch, &e.to_string());
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let n = batch.len();
        match commit_batch(c, &mut stmts, &fence, &mut batch).await {
            Ok(()) => {
                healthy.store(true, Ordering::Relaxed);
                METRICS.outbox_commit(n);
            }
            Err(e) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, requests = n, "outbox commit failed; nothing in this batch is acknowledged");
                fail_all(&mut batch, &e.to_string());
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

fn fail_all(batch: &mut Vec<Request>, msg: &str) {
    let err = || OutboxError::Corrupt(format!("commit failed: {msg}"));
    for r in batch.drain(..) {
        match r {
            Request::Intake(_, s) => drop(s.send(Err(err()))),
            Request::Record(_, s) => drop(s.send(Err(err()))),
            Request::Mark(_, s) => drop(s.send(Err(err()))),
            Request::Published(..) | Request::Flush(_) => {}
        }
    }
}

#[allow(clippy::large_enum_variant)]
enum Pending {
    Intake(
        oneshot::Sender<Result<IntakeOutcome, OutboxError>>,
        Result<IntakeOutcome, OutboxError>,
    ),
    Record(
        oneshot::Sender<Result<Vec<OutgoingReply>, OutboxError>>,
        Result<Option<Vec<OutgoingReply>>, OutboxError>,
    ),
    Mark(
        oneshot::Sender<Result<Marked, OutboxError>>,
        Result<Marked, OutboxError>,
    ),
    Flush(oneshot::Sender<()>),
}

/// Run one request under the batch's savepoint `r`: an error rolls back that
/// request only (`ROLLBACK TO r` keeps the savepoint for the next request); a
/// success releases it and sets the next one in a single round trip.
macro_rules! in_savepoint {
    ($tx:expr, $body:expr) => {{
        match $body.await {
            Ok(v) => $tx
                .batch_execute("RELEASE SAVEPOINT r; SAVEPOINT r")
                .await
                .map(|_| v)
                .map_err(OutboxError::from),
            Err(e) => {
                let _ = $tx.batch_execute("ROLLBACK TO SAVEPOINT r").await;
                Err(e)
            }
        }
    }};
}

async fn commit_batch(
    c: &mut Client,
    stmts: &mut Stmts,
    fence: &Fence,
    batch: &mut Vec<Request>,
) -> Result<(), OutboxError> {
    // Every request is answered whatever happens: a dropped answer would read as
    // "the writer is gone".
    let tx = match c.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            fail_all(batch, &e.to_string());
            return Err(e.into());
        }
    };
    if let Err(e) = tx.batch_execute("SAVEPOINT r").await {
        fail_all(batch, &e.to_string());
        return Err(e.into());
    }
    // Workers lock player leases in one order (appid, openid), so two intake
    // batches rarely wait on each other in a cycle; a request that still loses a
    // deadlock is run again at once (its savepoint rolled back, its locks freed).
    batch.sort_by(|a, b| player_key(a).cmp(&player_key(b)));
    let mut answers = Vec::with_capacity(batch.len());
    for req in batch.drain(..) {
        match req {
            Request::Intake(i, s) => {
                let mut r = in_savepoint!(tx, intake(&tx, stmts, fence, &i));
                for _ in 0..RETRIES {
                    if !is_transient(&r) {
                        break;
                    }
                    r = in_savepoint!(tx, intake(&tx, stmts, fence, &i));
                }
                answers.push(Pending::Intake(s, r));
            }
            Request::Record(r, s) => {
                let mut out = in_savepoint!(tx, record(&tx, stmts, &r, &fence.me));
                for _ in 0..RETRIES {
                    if !is_transient(&out) {
                        break;
                    }
                    out = in_savepoint!(tx, record(&tx, stmts, &r, &fence.me));
                }
                answers.push(Pending::Record(s, out));
            }
            Request::Mark(marks, s) => {
                let mut out = in_savepoint!(tx, mark(&tx, stmts, fence, &marks));
                for _ in 0..RETRIES {
                    if !is_transient(&out) {
                        break;
                    }
                    out = in_savepoint!(tx, mark(&tx, stmts, fence, &marks));
                }
                answers.push(Pending::Mark(s, out));
            }
            Request::Published(targets, now) => {
                let r = in_savepoint!(tx, published(&tx, stmts, &targets, now));
                if let Err(e) = r {
                    tracing::debug!(error = %e, "cannot mark replies confirmed; they may be re-published");
                }
            }
            Request::Flush(s) => answers.push(Pending::Flush(s)),
        }
    }
    match tx.commit().await {
        Ok(()) => {
            for a in answers {
                match a {
                    Pending::Intake(s, r) => drop(s.send(r)),
                    Pending::Record(s, r) => {
                        drop(s.send(r.and_then(|o| o.ok_or(OutboxError::LeaseLost))))
                    }
                    Pending::Mark(s, r) => drop(s.send(r)),
                    Pending::Flush(s) => drop(s.send(())),
                }
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            let err = || OutboxError::Corrupt(format!("commit failed: {msg}"));
            for a in answers {
                match a {
                    Pending::Intake(s, _) => drop(s.send(Err(err()))),
                    Pending::Record(s, _) => drop(s.send(Err(err()))),
                    Pending::Mark(s, _) => drop(s.send(Err(err()))),
                    Pending::Flush(_) => {}
                }
            }
            Err(e.into())
        }
    }
}

/// How often a request that lost a deadlock is run again within its batch.
const RETRIES: usize = 3;

/// A deadlock or serialization failure: running the request again may succeed.
fn is_transient<T>(r: &Result<T, OutboxError>) -> bool {
    match r {
        Err(OutboxError::Postgres(e)) => e.code().is_some_and(|c| {
            *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
        }),
        _ => false,
    }
}

/// Intake requests sort by player; the others keep their place before them.
fn player_key(r: &Request) -> Option<(&str, &str)> {
    match r {
        Request::Intake(i, _) => Some((
            i.command.params.appid.as_str(),
            i.command.params.openid.as_str(),
        )),
        _ => None,
    }
}

async fn published(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    targets: &[(i64, bool)],
    now: i64,
) -> Result<(), OutboxError> {
    let st = stmts
        .get(
            tx,
            "UPDATE reply_targets SET published_at = $1, returned = $2 \
             WHERE id = $3 AND published_at IS NULL",
        )
        .await?;
    for (id, returned) in targets {
        tx.execute(&st, &[&now, &(*returned as i64), id]).await?;
    }
    Ok(())
}

/// The lease condition every fenced write adds (`$L` = this worker).
macro_rules! held_by {
    ($owner:literal, $extra:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM player_leases l WHERE l.appid = j.appid AND l.openid = j.openid AND l.owner = ",
            $owner,
            $extra,
            ")"
        )
    };
}

/// `None`: fenced (this worker no longer holds the player; nothing but the
/// attempts was written).
async fn record(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    r: &Record,
    me: &str,
) -> Result<Option<Vec<OutgoingReply>>, OutboxError> {
    // the calls happened whoever holds the job now: they are kept for the audit
    let ins = stmts
        .get(
            tx,
            "INSERT INTO attempts (job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    for a in &r.rows {
        tx.execute(
            &ins,
            &[
                &r.job_id,
                &(a.n as i64),
                &a.answer.api.name(),
                &a.started_at,
                &(a.answer.latency.as_millis().min(i64::MAX as u128) as i64),
                &a.answer.http_status.map(i64::from),
                &a.answer.errcode,
                &a.answer.errmsg,
                &a.answer.class.as_str(),
            ],
        )
        .await?;
    }
    let last = r.rows.first().map(|a| &a.answer);
    let (errcode, error) = (
        last.and_then(|a| a.errcode),
        last.and_then(|a| a.errmsg.clone()),
    );
    match &r.update {
        Update::Retry { next_attempt_at } => {
            let st = stmts
                .get(
                    tx,
                    concat!(
                        "UPDATE jobs j SET attempts = $2, first_attempt_at = COALESCE(first_attempt_at, $3), \
                         next_attempt_at = $4, last_errcode = $5, last_error = $6, updated_at = $7, \
                         uncertain = GREATEST(uncertain, $8) WHERE j.id = $1 AND j.state = 'pending' AND ",
                        held_by!("$9", "")
                    ),
                )
                .await?;
            let n = tx
                .execute(
                    &st,
                    &[
                        &r.job_id,
                        &(r.attempts_total as i64),
                        &r.first_attempt_at,
                        next_attempt_at,
                        &errcode,
                        &error,
                        &r.now,
                        &(r.uncertain as i64),
                        &me,
                    ],
                )
                .await?;
            Ok((n == 1).then(Vec::new))
        }
        Update::Final { state, reply } => {
            let payload = String::from_utf8_lossy(reply).into_owned();
            let st = stmts
                .get(
                    tx,
                    concat!(
                        "UPDATE jobs j SET state = $2, attempts = $3, first_attempt_at = COALESCE(first_attempt_at, $4), \
                         last_errcode = COALESCE($5, last_errcode), last_error = COALESCE($6, last_error), result = $7, \
                         session_key = NULL, finished_at = $8, updated_at = $8, uncertain = GREATEST(uncertain, $9) \
                         WHERE j.id = $1 AND j.state = 'pending' AND ",
                        held_by!("$10", "")
                    ),
                )
                .await?;
            let n = tx
                .execute(
                    &st,
                    &[
                        &r.job_id,
                        &state.as_str(),
                        &(r.attempts_total as i64),
                        &r.first_attempt_at,
                        &errcode,
                        &error,
                        &payload,
                        &r.now,
                        &(r.uncertain as i64),
                        &me,
                    ],
                )
                .await?;
            if n != 1 {
                return Ok(None);
            }
            let payload: Arc<[u8]> = Arc::from(reply.clone());
            let q = stmts
                .get(
                    tx,
                    "SELECT id, reply_to, correlation_id FROM reply_targets \
                     WHERE job_id = $1 AND published_at IS NULL ORDER BY id",
                )
                .await?;
            let rows = tx.query(&q, &[&r.job_id]).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(OutgoingReply {
                    target_id: Some(row.try_get(0)?),
                    reply_to: row.try_get(1)?,
                    correlation_id: row.try_get(2)?,
                    payload: payload.clone(),
                });
            }
            Ok(Some(out))
        }
    }
}

/// Answers the ids whose fence failed, and when the fence was checked (this
/// worker's clock, just before the first statement).
async fn mark(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    fence: &Fence,
    marks: &[(i64, i64)],
) -> Result<Marked, OutboxError> {
    let st = stmts
        .get(
            tx,
            concat!(
                "UPDATE jobs j SET calls = calls + 1, first_attempt_at = COALESCE(first_attempt_at, $2), \
                 updated_at = $2 WHERE j.id = $1 AND j.state = 'pending' AND ",
                held_by!(
                    "$3",
                    " AND l.expires_at > (extract(epoch from clock_timestamp()) * 1000)::bigint + $4"
                )
            ),
        )
        .await?;
    let me: &str = &fence.me;
    let checked_at = std::time::Instant::now();
    let mut lost = Vec::new();
    for (id, at) in marks {
        let n = tx.execute(&st, &[id, at, &me, &fence.call_ms]).await?;
        if n != 1 {
            lost.push(*id);
        }
    }
    Ok(Marked {
        lost,
        checked_at: Some(checked_at),
    })
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
