//! How the PostgreSQL writer commits one batch (kept apart from the writer's
//! handle and task loop in `writer.rs`): first the whole batch in one transaction
//! without savepoints ([`commit_without_savepoints`]: marks, confirms, outcomes and
//! intakes as a few statements over arrays, those that do not depend on each other
//! pipelined on the connection); if any request fails, everything is rolled back and
//! the batch runs again with each request in its own savepoint (`in_savepoint!`), so
//! one bad request cannot fail the others. Either way every request is answered, and
//! only after the commit holding it.

use tokio::sync::oneshot;
use tokio_postgres::{Client, Transaction};

use super::batch;
use super::intake::intake;
use super::pushes;
use super::writer::{fail_all, Request};
use super::writes::{distinct_ids, mark, published, record, together, Together};
use super::{Fence, Stmts};
use crate::engine::{PreCallMark, Record};
use crate::outbox::handle::Marked;
use crate::outbox::health::WriteTrouble;
use crate::outbox::pushes::PushStored;
use crate::outbox::writer::{Confirmed, Intake, IntakeOutcome, Landed};
use crate::outbox::OutboxError;

/// A request's result from the savepoint path, answered once the commit is known.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Intake(
        oneshot::Sender<Result<IntakeOutcome, OutboxError>>,
        Result<IntakeOutcome, OutboxError>,
    ),
    Record(
        oneshot::Sender<Result<Landed, OutboxError>>,
        Result<Option<Landed>, OutboxError>,
    ),
    Mark(
        oneshot::Sender<Result<Marked, OutboxError>>,
        Result<Marked, OutboxError>,
    ),
    Flush(oneshot::Sender<()>),
    Push(
        oneshot::Sender<Result<PushStored, OutboxError>>,
        Result<PushStored, OutboxError>,
    ),
}

/// Run one request under the batch's savepoint `r`: an error rolls back that
/// request only (`ROLLBACK TO r` keeps the savepoint for the next request); a
/// success releases it and sets the next one in a single round trip.
macro_rules! in_savepoint {
    ($tx:expr, $body:expr) => {{
        match $body.await {
            Ok(v) => {
                super::trip();
                $tx.batch_execute("RELEASE SAVEPOINT r; SAVEPOINT r")
                    .await
                    .map(|_| v)
                    .map_err(OutboxError::from)
            }
            Err(e) => {
                super::trip();
                let _ = $tx.batch_execute("ROLLBACK TO SAVEPOINT r").await;
                Err(e)
            }
        }
    }};
}

/// A request's result from the batch run without savepoints, in batch order.
// One per request, moved once: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Done {
    Intake(IntakeOutcome),
    Record(Option<Landed>),
    Mark(Marked),
    Push(PushStored),
    Nothing,
}

/// The common case first: the whole batch in one transaction without a savepoint
/// per request. A savepoint costs a round trip and a subtransaction, and more than
/// 64 subtransactions in one transaction make every backend's snapshot checks
/// slower. `Some` when it committed; `None` when any request failed (or the
/// commit did): nothing was kept and the batch is run again request by request.
async fn commit_without_savepoints(
    c: &mut Client,
    stmts: &mut Stmts,
    fence: &Fence,
    batch: &[Request],
) -> Option<Vec<Done>> {
    super::trip();
    let tx = c.transaction().await.ok()?;
    let mut done = Vec::with_capacity(batch.len());
    let ids: Vec<i64> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Record(r, _) => Some(r.job_id),
            _ => None,
        })
        .collect();
    // the outcomes together when no job repeats, a session-guarded final aside
    let together_ok = distinct_ids(&ids);
    let recs: Vec<&Record> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Record(r, _) if together_ok && batch::batchable(r) => Some(&**r),
            _ => None,
        })
        .collect();
    let all_records = !recs.is_empty();
    let intakes: Vec<&Intake> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Intake(i, _) => Some(i),
            _ => None,
        })
        .collect();
    let firsts = batch::firsts(&intakes);
    // Independent of each other, pipelined on the connection (sent together, then
    // answered): the pre-call marks and the reply confirms of every request in one
    // statement each (`None` when an id repeats: then each request runs its own),
    // the outcomes of every request in a few (when no job repeats), and the new
    // jobs of the batch's commands. A new job is none of the others' rows.
    let shared: &Stmts = stmts;
    let (together, recorded, new) = tokio::join!(
        together_of(&tx, shared, fence, batch),
        async {
            if all_records {
                batch::records(&tx, shared, &recs, &fence.me)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        },
        batch::insert_jobs(&tx, shared, &intakes, &firsts),
    );
    let (together, recorded, new) = match (together, recorded, new) {
        (Ok(t), Ok(r), Ok(n)) => (t, r, n),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::debug!(error = %e, requests = batch.len(), "batch failed without savepoints; running it request by request");
            return None;
        }
    };
    let (mut marked, confirmed) = together;
    let mut recorded = recorded.map(Vec::into_iter);
    let mut seen_intake = false;
    for req in batch {
        // the intakes come last in the writer's order (they are answered last)
        if seen_intake && !matches!(req, Request::Intake(..)) {
            return None;
        }
        let d = match req {
            Request::Intake(..) => {
                seen_intake = true;
                continue;
            }
            Request::Record(r, _) => match recorded.as_mut().filter(|_| batch::batchable(r)) {
                Some(out) => out
                    .next()
                    .ok_or_else(|| OutboxError::Corrupt("an outcome went unanswered".into()))
                    .map(Done::Record),
                None => record(&tx, stmts, r, &fence.me).await.map(Done::Record),
            },
            Request::Mark(marks, _) => match marked.as_mut() {
                Some((lost, checked_at)) => Ok(Done::Mark(Marked {
                    lost: marks
                        .iter()
                        .map(|m| m.id)
                        .filter(|id| lost.remove(id))
                        .collect(),
                    checked_at: *checked_at,
                })),
                None => mark(&tx, stmts, fence, marks).await.map(Done::Mark),
            },
            Request::Published(..) if confirmed => Ok(Done::Nothing),
            Request::Published(targets, now) => published(&tx, stmts, targets, *now)
                .await
                .map(|_| Done::Nothing),
            Request::Push(p, _) => pushes::store(&tx, stmts, p).await.map(Done::Push),
            Request::PushPublished(ids, now) => pushes::mark_published(&tx, stmts, ids, *now)
                .await
                .map(|_| Done::Nothing),
            Request::Flush(_) | Request::Unpublished(..) => Ok(Done::Nothing),
        };
        match d {
            Ok(d) => done.push(d),
            // dropping the transaction rolls it back
            Err(e) => {
                tracing::debug!(error = %e, requests = batch.len(), "batch failed without savepoints; running it request by request");
                return None;
            }
        }
    }
    if !intakes.is_empty() {
        match batch::intakes(&tx, stmts, fence, &intakes, &new).await {
            Ok(outs) => done.extend(outs.into_iter().map(Done::Intake)),
            Err(e) => {
                tracing::debug!(error = %e, requests = batch.len(), "batch failed without savepoints; running it request by request");
                return None;
            }
        }
    }
    if done
        .iter()
        .any(|d| matches!(d, Done::Intake(IntakeOutcome::Elsewhere { .. })))
    {
        notify_holders(&tx).await.ok()?;
    }
    super::trip();
    tx.commit().await.ok()?;
    Some(done)
}

/// Jobs were recorded for players another worker holds: wake the lease holders
/// (delivered at this transaction's commit; see
/// [`Coordinator`](super::coord::Coordinator)) so they load them at once rather
/// than at their next look.
async fn notify_holders(tx: &tokio_postgres::Transaction<'_>) -> Result<(), OutboxError> {
    super::trip();
    tx.batch_execute(&format!("NOTIFY {}", super::JOBS_CHANNEL))
        .await
        .map_err(OutboxError::from)
}

/// The batch's marks and confirms for [`together`].
async fn together_of(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    batch: &[Request],
) -> Result<Together, OutboxError> {
    let marks: Vec<&[PreCallMark]> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Mark(m, _) => Some(m.as_slice()),
            _ => None,
        })
        .collect();
    let confirms: Vec<(&[Confirmed], i64)> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Published(t, now) => Some((t.as_slice(), *now)),
            _ => None,
        })
        .collect();
    together(tx, stmts, fence, &marks, &confirms).await
}

/// Commit `batch` (sorted by player first) and answer every request in it: without
/// savepoints when that works, else request by request. `Err` when the batch could
/// not be committed; its requests have then been told of the failure.
pub(super) async fn commit_batch(
    c: &mut Client,
    stmts: &mut Stmts,
    fence: &Fence,
    batch: &mut Vec<Request>,
) -> Result<(), OutboxError> {
    // Workers lock player leases in one order (appid, openid), so two intake
    // batches rarely wait on each other in a cycle. A stable sort: a player's
    // commands keep their arrival order, and so their job ids.
    batch.sort_by(|a, b| player_key(a).cmp(&player_key(b)));
    if let Some(done) = commit_without_savepoints(c, stmts, fence, batch).await {
        for (req, d) in batch.drain(..).zip(done) {
            match (req, d) {
                (Request::Intake(_, s), Done::Intake(o)) => drop(s.send(Ok(o))),
                (Request::Record(_, s), Done::Record(o)) => {
                    drop(s.send(o.ok_or(OutboxError::LeaseLost)))
                }
                (Request::Mark(_, s), Done::Mark(m)) => drop(s.send(Ok(m))),
                (Request::Push(_, s), Done::Push(p)) => drop(s.send(Ok(p))),
                (Request::Flush(s), _) => drop(s.send(())),
                _ => {}
            }
        }
        return Ok(());
    }
    if c.is_closed() {
        let e = OutboxError::Unwritable {
            why: WriteTrouble::Unreachable,
            detail: "the connection to PostgreSQL closed".into(),
        };
        fail_all(batch, &e);
        return Err(e);
    }
    super::trip();
    // Every request is answered whatever happens: a dropped answer would read as
    // "the writer is gone".
    let tx = match c.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            let e = e.into();
            fail_all(batch, &e);
            return Err(e);
        }
    };
    super::trip();
    if let Err(e) = tx.batch_execute("SAVEPOINT r").await {
        let e = e.into();
        fail_all(batch, &e);
        return Err(e);
    }
    // A request that loses a deadlock is run again at once (its savepoint rolled
    // back, its locks freed); one that fails is undone alone.
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
            Request::Push(p, s) => {
                let mut r = in_savepoint!(tx, pushes::store(&tx, stmts, &p));
                for _ in 0..RETRIES {
                    if !is_transient(&r) {
                        break;
                    }
                    r = in_savepoint!(tx, pushes::store(&tx, stmts, &p));
                }
                answers.push(Pending::Push(s, r));
            }
            Request::PushPublished(ids, now) => {
                let r = in_savepoint!(tx, pushes::mark_published(&tx, stmts, &ids, now));
                if let Err(e) = r {
                    tracing::debug!(error = %e, "cannot mark push events confirmed; they may be published again");
                }
            }
            Request::Unpublished(_, _, s) => drop(s.send(Ok(Vec::new()))),
        }
    }
    if answers
        .iter()
        .any(|a| matches!(a, Pending::Intake(_, Ok(IntakeOutcome::Elsewhere { .. }))))
    {
        // only a wake-up (the holders look twice a second anyway): a failure
        // rolls back to the savepoint and the batch commits without it
        let _ = in_savepoint!(tx, notify_holders(&tx));
    }
    super::trip();
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
                    Pending::Push(s, r) => drop(s.send(r)),
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
                    Pending::Push(s, _) => drop(s.send(Err(err()))),
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
