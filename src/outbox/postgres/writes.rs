//! The PostgreSQL writer's statements for what happens to a job after intake: its
//! pre-call marks, its outcomes and its confirmed replies. The marks and outcomes
//! are fenced by the player's lease (see the writer's module doc); intake's own
//! statements are in `intake.rs`. The marks and confirms of a whole writer batch go
//! in one statement each ([`together`]), every row fenced on its own.

use std::sync::Arc;

use tokio_postgres::Transaction;

use super::writer::{Fence, Stmts};
use crate::engine::{PreCallMark, Record, Update};
use crate::outbox::handle::Marked;
use crate::outbox::writer::{Confirmed, Landed, OutgoingReply};
use crate::outbox::OutboxError;
use crate::secret::Secret;

/// One statement for every confirm of the request (arrays, not a round trip each).
pub(super) async fn published(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    targets: &[Confirmed],
    now: i64,
) -> Result<(), OutboxError> {
    published_many(tx, stmts, &[(targets, now)]).await
}

/// One statement for every confirm of several requests (each with its own time):
/// the writer's batch sends all its confirms at once. A target confirmed twice in
/// the list is judged by its first entry, so the caller passes only lists without
/// repeats (see [`distinct_ids`]).
pub(super) async fn published_many(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    requests: &[(&[Confirmed], i64)],
) -> Result<(), OutboxError> {
    // Only while the published bytes are still the job's reply (see [`Confirmed`]),
    // judged on the job's row under a share lock: a re-open of the job in another
    // transaction (a re-sent command with a new session_key taken in by another
    // worker, or an operator's retry) clears the reply and owes every target the
    // next one. Without the lock the confirm, waiting on the re-opened target row, would
    // re-check it against the job row of its own snapshot — the old reply — and
    // mark that target published for good (bug R, tests/it/confirm_race.rs). The
    // lock waits for the re-open and reads the row it left. Locked in id order.
    let st = stmts
        .get(
            tx,
            // `id = ANY` keeps the primary-key lookups whatever the planner thinks
            // of the arrays; each row finds its own values by its place in them
            "WITH locked AS (SELECT j.id, j.result FROM jobs j \
             WHERE j.id IN (SELECT job_id FROM reply_targets WHERE id = ANY($2::bigint[])) \
             ORDER BY j.id FOR SHARE OF j) \
             UPDATE reply_targets t \
             SET published_at = ($1::bigint[])[array_position($2::bigint[], t.id)], \
             returned = ($3::bigint[])[array_position($2::bigint[], t.id)] \
             FROM locked WHERE t.id = ANY($2::bigint[]) AND t.published_at IS NULL \
             AND locked.id = t.job_id \
             AND locked.result = ($4::text[])[array_position($2::bigint[], t.id)]",
        )
        .await?;
    let (mut ats, mut ids, mut returned, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (targets, now) in requests {
        for c in targets.iter() {
            // a reply is JSON text; anything else is no reply of the outbox
            let Ok(payload) = std::str::from_utf8(&c.payload) else {
                continue;
            };
            ats.push(*now);
            ids.push(c.target);
            returned.push(c.returned as i64);
            payloads.push(payload);
        }
    }
    if !ids.is_empty() {
        super::trip();
        tx.execute(&st, &[&ats, &ids, &returned, &payloads]).await?;
    }
    Ok(())
}

/// The lease condition every fenced write adds: the player's lease is still
/// this worker's (`$owner`) at the generation the write was decided under (`$gen`).
macro_rules! held_by {
    ($owner:literal, $gen:literal, $extra:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM player_leases l WHERE l.appid = j.appid AND l.openid = j.openid AND l.owner = ",
            $owner,
            " AND l.generation = ",
            $gen,
            $extra,
            ")"
        )
    };
}

/// `None`: fenced (this worker no longer holds the player at the record's lease
/// generation; nothing but the attempts was written).
pub(super) async fn record(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    r: &Record,
    me: &str,
) -> Result<Option<Landed>, OutboxError> {
    // the calls happened whoever holds the job now: they are kept for the audit
    let ins = stmts
        .get(
            tx,
            "INSERT INTO attempts (job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    for a in &r.rows {
        super::trip();
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
    let (errcode, error) = r.last_error();
    match &r.update {
        Update::Retry { next_attempt_at } => {
            let st = stmts
                .get(
                    tx,
                    concat!(
                        "UPDATE jobs j SET attempts = $2, first_attempt_at = COALESCE(first_attempt_at, $3), \
                         next_attempt_at = $4, last_errcode = $5, last_error = $6, updated_at = $7, \
                         uncertain = GREATEST(uncertain, $8) WHERE j.id = $1 AND ",
                        super::still_pending!("j."),
                        " AND ",
                        held_by!("$9", "$10", "")
                    ),
                )
                .await?;
            super::trip();
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
                        &r.lease_gen,
                    ],
                )
                .await?;
            Ok((n == 1).then(Landed::default))
        }
        Update::Final { .. } if r.session_guard.is_some() => guarded_final(tx, stmts, r, me).await,
        Update::Final { state, reply } => {
            let payload = String::from_utf8_lossy(reply).into_owned();
            let st = stmts
                .get(
                    tx,
                    concat!(
                        "UPDATE jobs j SET state = $2, attempts = $3, first_attempt_at = COALESCE(first_attempt_at, $4), \
                         last_errcode = COALESCE($5, last_errcode), last_error = COALESCE($6, last_error), result = $7, \
                         session_key = NULL, finished_at = $8, updated_at = $8, uncertain = GREATEST(uncertain, $9) \
                         WHERE j.id = $1 AND ",
                        super::still_pending!("j."),
                        " AND ",
                        held_by!("$10", "$11", "")
                    ),
                )
                .await?;
            super::trip();
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
                        &r.lease_gen,
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
            super::trip();
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
            Ok(Some(Landed {
                replies: out,
                reopened_with: None,
            }))
        }
    }
}

/// A final outcome on a session problem ([`crate::engine::SessionGuard`]): when a
/// re-sent command (on any worker) stored a newer session_key meanwhile, the job
/// is re-opened with it instead. The row is locked first, so an intake of that
/// re-send either committed before (its key is seen here) or waits and then
/// finds the job final (and re-opens it itself).
async fn guarded_final(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    r: &Record,
    me: &str,
) -> Result<Option<Landed>, OutboxError> {
    let used = r
        .session_guard
        .as_ref()
        .and_then(|g| g.used.as_ref())
        .map(Secret::expose);
    let st = stmts
        .get(
            tx,
            concat!(
                "SELECT session_key FROM jobs WHERE id = $1 AND ",
                super::still_pending!(""),
                " FOR UPDATE"
            ),
        )
        .await?;
    super::trip();
    let stored: Option<String> = match tx.query_opt(&st, &[&r.job_id]).await? {
        Some(row) => row.try_get(0)?,
        None => None,
    };
    let Some(key) = stored.filter(|k| Some(k.as_str()) != used) else {
        let plain = Record {
            session_guard: None,
            ..r.clone()
        };
        return Box::pin(record(tx, stmts, &plain, me)).await;
    };
    let (errcode, error) = r.last_error();
    let st = stmts
        .get(
            tx,
            concat!(
                "UPDATE jobs j SET attempts = $2, first_attempt_at = COALESCE(first_attempt_at, $3), \
                 next_attempt_at = $4, last_errcode = $5, last_error = $6, updated_at = $4, reopened_at = $4, \
                 uncertain = GREATEST(uncertain, $7) WHERE j.id = $1 AND ",
                 super::still_pending!("j."),
                 " AND ",
                held_by!("$8", "$9", "")
            ),
        )
        .await?;
    super::trip();
    let n = tx
        .execute(
            &st,
            &[
                &r.job_id,
                &(r.attempts_total as i64),
                &r.first_attempt_at,
                &r.now,
                &errcode,
                &error,
                &(r.uncertain as i64),
                &me,
                &r.lease_gen,
            ],
        )
        .await?;
    Ok((n == 1).then(|| Landed {
        replies: Vec::new(),
        reopened_with: Some(Secret::new(key)),
    }))
}

/// Whether no id appears twice in `ids` (a batch's statement over all of
/// them finds each row's values by the id's first place in the arrays, so it is
/// exact only then; otherwise the writer runs them one request at a time).
pub(super) fn distinct_ids(ids: &[i64]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().all(|id| seen.insert(*id))
}

/// Answers the ids whose fence failed, and when the fence was checked (this
/// worker's clock, just before the statement). One statement for every mark of the
/// request — or of a whole batch of requests (the writer concatenates them; the
/// ids must be distinct, [`distinct_ids`]): each row keeps its own time and lease
/// generation, so the fence is the same per row as with one statement per request.
pub(super) async fn mark(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    marks: &[PreCallMark],
) -> Result<Marked, OutboxError> {
    let st = stmts
        .get(
            tx,
            concat!(
                // `id = ANY` and `still_pending!` keep the primary-key lookups;
                // each row finds its time by its place in the arrays
                "UPDATE jobs j SET calls = calls + ($6::bigint[])[array_position($1::bigint[], j.id)], \
                 first_attempt_at = COALESCE(first_attempt_at, ($2::bigint[])[array_position($1::bigint[], j.id)]), \
                 updated_at = ($2::bigint[])[array_position($1::bigint[], j.id)] \
                 WHERE j.id = ANY($1::bigint[]) AND ",
                super::still_pending!("j."),
                " AND ",
                held_by!(
                    "$3",
                    "($5::bigint[])[array_position($1::bigint[], j.id)]",
                    " AND l.expires_at > (extract(epoch from clock_timestamp()) * 1000)::bigint + $4"
                ),
                " RETURNING j.id"
            ),
        )
        .await?;
    let me: &str = &fence.me;
    let ids: Vec<i64> = marks.iter().map(|m| m.id).collect();
    let ats: Vec<i64> = marks.iter().map(|m| m.at).collect();
    let gens: Vec<i64> = marks.iter().map(|m| m.gen).collect();
    let counts: Vec<i64> = marks.iter().map(PreCallMark::counts).collect();
    let checked_at = std::time::Instant::now();
    super::trip();
    let rows = tx
        .query(&st, &[&ids, &ats, &me, &fence.call_ms, &gens, &counts])
        .await?;
    let mut landed = std::collections::HashSet::with_capacity(rows.len());
    for r in rows {
        landed.insert(r.try_get::<_, i64>(0)?);
    }
    Ok(Marked {
        lost: ids.into_iter().filter(|id| !landed.contains(id)).collect(),
        checked_at: Some(checked_at),
    })
}

/// What [`together`] did: the ids whose marks were fenced and when the fence was
/// checked (`None`: the marks are left to their requests), and whether every
/// confirm of the batch landed.
pub(super) type Together = (
    Option<(std::collections::HashSet<i64>, Option<std::time::Instant>)>,
    bool,
);

/// The pre-call marks of every `Mark` request of a writer batch in one statement, and
/// the confirms of every `Published` request in another (each list one request's) — each row keeping its own
/// time and lease generation, so every fence (owner, generation, lease outliving
/// the call, `state = 'pending'`) is judged per row exactly as one statement per
/// request would. When an id appears in two requests, that kind is left to the
/// requests one by one (a statement over arrays judges a row by its id's first
/// place in them).
pub(super) async fn together(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    marks: &[&[PreCallMark]],
    confirms: &[(&[Confirmed], i64)],
) -> Result<Together, OutboxError> {
    let mark_ids: Vec<i64> = marks.iter().flat_map(|m| m.iter().map(|x| x.id)).collect();
    let all_marks = marks.len() > 1 && distinct_ids(&mark_ids);
    let confirm_ids: Vec<i64> = confirms
        .iter()
        .flat_map(|(t, _)| t.iter().map(|c| c.target))
        .collect();
    let confirmed = confirms.len() > 1 && distinct_ids(&confirm_ids);
    // independent of each other: pipelined on the connection
    let (m, c) = tokio::join!(
        async {
            if !all_marks {
                return Ok(None);
            }
            let all: Vec<PreCallMark> = marks.iter().flat_map(|m| m.iter().copied()).collect();
            mark(tx, stmts, fence, &all).await.map(Some)
        },
        async {
            if confirmed {
                published_many(tx, stmts, confirms).await
            } else {
                Ok(())
            }
        },
    );
    c?;
    let marked = m?.map(|m| (m.lost.into_iter().collect(), m.checked_at));
    Ok((marked, confirmed))
}
