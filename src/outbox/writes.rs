//! The statements of one request on the SQLite outbox, run by the writer thread
//! ([`super::writer`]) inside its batch transaction: intake (insert, join, re-open
//! or conflict), recording an attempt and its outcome, and the pre-call marks. Each
//! request runs in a savepoint of its own so one bad request cannot fail its batch.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::writer::{Intake, IntakeOutcome, Landed, OutgoingReply};
use super::OutboxError;
use crate::engine::job::{Job, JobState};
use crate::engine::{PreCallMark, Record, Update};
use crate::secret::Secret;

/// Run one request in its own savepoint: an error rolls back that request only.
/// The savepoint statements are prepared once and cached (rusqlite's `savepoint()`
/// parses them on every call: a measurable share of the writer's CPU per job).
pub(super) fn in_savepoint<T>(
    tx: &mut rusqlite::Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T, OutboxError>,
) -> Result<T, OutboxError> {
    let c: &Connection = tx;
    c.prepare_cached("SAVEPOINT req")?.execute([])?;
    match f(c) {
        Ok(v) => {
            c.prepare_cached("RELEASE req")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            // roll back this request only; the transaction goes on. When SQLite
            // already rolled the whole transaction back (disk full), these fail
            // too: the request's own error is the one to report.
            for sql in ["ROLLBACK TO req", "RELEASE req"] {
                let _ = c.prepare_cached(sql).and_then(|mut st| st.execute([]));
            }
            Err(e)
        }
    }
}

pub(super) fn intake(c: &Connection, i: &Intake) -> Result<IntakeOutcome, OutboxError> {
    let p = &i.command.params;
    let bill_no = p.bill_no.as_deref().unwrap_or_default();
    let canonical = p.canonical();
    let existing = c
        .prepare_cached(
            "SELECT id, request, state, last_errcode, result, attempts, first_attempt_at, received_at, \
             session_key, next_attempt_at, last_error, reopened_at, calls, uncertain FROM jobs \
             WHERE appid = ?1 AND op = ?2 AND bill_no = ?3",
        )?
        .query_row(params![p.appid, p.op.as_str(), bill_no], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, Option<String>>(10)?,
                r.get::<_, Option<i64>>(11)?,
                r.get::<_, i64>(12)?,
                r.get::<_, i64>(13)?,
            ))
        })
        .optional()?;
    let session_key = i.command.session_key.as_ref().map(Secret::expose);
    let Some((
        id,
        request,
        state,
        last_errcode,
        result,
        attempts,
        first_attempt_at,
        received_at,
        stored_key,
        next_attempt_at,
        last_error,
        reopened_at,
        calls,
        uncertain,
    )) = existing
    else {
        c.prepare_cached(
            "INSERT INTO jobs (op, bill_no, appid, openid, request, session_key, state, next_attempt_at, received_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?7)",
        )?
        .execute(params![p.op.as_str(), bill_no, p.appid, p.openid, canonical, session_key, i.now])?;
        let id = c.last_insert_rowid();
        add_target(c, id, i, false)?;
        return Ok(IntakeOutcome::New(Job::new(
            id,
            p.clone(),
            i.command.session_key.clone(),
            i.now,
        )));
    };
    if request != canonical {
        return Ok(IntakeOutcome::Conflict { job_id: id });
    }
    let state = JobState::parse(&state)
        .ok_or_else(|| OutboxError::Corrupt(format!("job {id} has state {state:?}")))?;
    let (calls, uncertain) = (calls.max(0) as u32, uncertain != 0);
    // A job that ended on a session problem is re-opened by a re-send with a new
    // session_key: failed with 90010, or unknown because such an answer came after
    // an unanswered call (outcome_uncertain).
    let session_problem =
        crate::engine::job::reopens_with_new_session_key(state, last_errcode, uncertain);
    if session_problem && session_key.is_some() {
        c.prepare_cached(
            "UPDATE jobs SET state = 'pending', session_key = ?2, next_attempt_at = ?3, result = NULL, \
             finished_at = NULL, reopened_at = ?3, updated_at = ?3 WHERE id = ?1",
        )?
        .execute(params![id, session_key, i.now])?;
        // the new final reply goes to every target of the job (contract, guarantee
        // 4): the earlier commands are owed it too
        c.prepare_cached(
            "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = ?1",
        )?
        .execute(params![id])?;
        add_target(c, id, i, true)?;
        return Ok(IntakeOutcome::Reopened(Job {
            id,
            params: p.clone(),
            session_key: i.command.session_key.clone(),
            attempts: attempts.max(0) as u32,
            calls,
            uncertain,
            token_retries: 0,
            first_attempt_at,
            next_attempt_at: i.now,
            received_at,
            last_errcode,
            last_error: None,
            reopened_at: Some(i.now),
            lease_gen: 0,
        }));
    }
    let target = add_target(c, id, i, state.is_final())?;
    let reply = result
        .filter(|_| state.is_final())
        .map(|payload| i.reply_owed(target, payload));
    // A re-sent command with a newer session_key: a pending job uses it from now on.
    let mut stored_key = stored_key;
    if !state.is_final() {
        if let Some(k) = session_key.filter(|k| stored_key.as_deref() != Some(*k)) {
            c.prepare_cached("UPDATE jobs SET session_key = ?2 WHERE id = ?1")?
                .execute(params![id, k])?;
            stored_key = Some(k.to_string());
        }
    }
    let pending = (!state.is_final()).then(|| Job {
        id,
        params: p.clone(),
        session_key: stored_key.map(Secret::new),
        attempts: attempts.max(0) as u32,
        calls,
        uncertain,
        token_retries: 0,
        first_attempt_at,
        next_attempt_at,
        received_at,
        last_errcode,
        last_error,
        reopened_at,
        lease_gen: 0,
    });
    Ok(IntakeOutcome::Joined {
        job_id: id,
        reply,
        pending,
    })
}

/// Add a reply target; when `republish`, an existing identical target is marked for
/// publishing again (a re-sent command gets the stored final reply again).
pub(super) fn add_target(
    c: &Connection,
    job_id: i64,
    i: &Intake,
    republish: bool,
) -> Result<i64, OutboxError> {
    let sql = if republish {
        "INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (job_id, reply_to, correlation_id) DO UPDATE SET published_at = NULL, returned = 0 \
         RETURNING id"
    } else {
        "INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (job_id, reply_to, correlation_id) DO UPDATE SET added_at = added_at \
         RETURNING id"
    };
    Ok(c.prepare_cached(sql)?
        .query_row(params![job_id, i.reply_to, i.correlation_id, i.now], |r| {
            r.get(0)
        })?)
}

pub(super) fn record(c: &Connection, r: &Record) -> Result<Landed, OutboxError> {
    {
        let mut ins = c.prepare_cached(
            "INSERT INTO attempts (job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for a in &r.rows {
            ins.execute(params![
                r.job_id,
                a.n,
                a.answer.api.name(),
                a.started_at,
                a.answer.latency.as_millis() as i64,
                a.answer.http_status,
                a.answer.errcode,
                a.answer.errmsg,
                a.answer.class.as_str(),
            ])?;
        }
    }
    let (errcode, error) = r.last_error();
    match &r.update {
        Update::Retry { next_attempt_at } => {
            c.prepare_cached(
                "UPDATE jobs SET attempts = ?2, first_attempt_at = COALESCE(first_attempt_at, ?3), \
                 next_attempt_at = ?4, last_errcode = ?5, last_error = ?6, updated_at = ?7, \
                 uncertain = MAX(uncertain, ?8) WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![
                r.job_id,
                r.attempts_total,
                r.first_attempt_at,
                next_attempt_at,
                errcode,
                error,
                r.now,
                r.uncertain as i64
            ])?;
            Ok(Landed::default())
        }
        Update::Final { state, reply } => {
            if let Some(key) = newer_session_key(c, r)? {
                // a re-send brought a new session_key while this was decided: the
                // job runs again with it instead of ending on the old one's problem
                c.prepare_cached(
                    "UPDATE jobs SET attempts = ?2, first_attempt_at = COALESCE(first_attempt_at, ?3), \
                     next_attempt_at = ?4, last_errcode = ?5, last_error = ?6, updated_at = ?4, \
                     reopened_at = ?4, uncertain = MAX(uncertain, ?7) WHERE id = ?1 AND state = 'pending'",
                )?
                .execute(params![
                    r.job_id,
                    r.attempts_total,
                    r.first_attempt_at,
                    r.now,
                    errcode,
                    error,
                    r.uncertain as i64
                ])?;
                return Ok(Landed {
                    replies: Vec::new(),
                    reopened_with: Some(Secret::new(key)),
                });
            }
            let payload = String::from_utf8_lossy(reply).into_owned();
            let n = c.prepare_cached(
                "UPDATE jobs SET state = ?2, attempts = ?3, first_attempt_at = COALESCE(first_attempt_at, ?4), \
                 last_errcode = COALESCE(?5, last_errcode), last_error = COALESCE(?6, last_error), result = ?7, \
                 session_key = NULL, finished_at = ?8, updated_at = ?8, uncertain = MAX(uncertain, ?9) \
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![
                r.job_id,
                state.as_str(),
                r.attempts_total,
                r.first_attempt_at,
                errcode,
                error,
                payload,
                r.now,
                r.uncertain as i64
            ])?;
            if n == 0 {
                // the job is final already (a stale re-run of a job the engine
                // forgot): its stored reply stands, nothing is published again
                return Ok(Landed::default());
            }
            let payload: Arc<[u8]> = Arc::from(reply.clone());
            let mut q = c.prepare_cached(
                "SELECT id, reply_to, correlation_id FROM reply_targets WHERE job_id = ?1 AND published_at IS NULL",
            )?;
            let rows = q.query_map(params![r.job_id], |row| {
                Ok(OutgoingReply {
                    target_id: Some(row.get(0)?),
                    reply_to: row.get(1)?,
                    correlation_id: row.get(2)?,
                    payload: payload.clone(),
                })
            })?;
            Ok(Landed {
                replies: rows.collect::<Result<Vec<_>, _>>()?,
                reopened_with: None,
            })
        }
    }
}

/// A guarded final outcome ([`crate::engine::SessionGuard`]): the session_key the
/// pending job holds now, when it is another than the one the outcome was
/// decided with.
fn newer_session_key(c: &Connection, r: &Record) -> Result<Option<String>, OutboxError> {
    let Some(guard) = &r.session_guard else {
        return Ok(None);
    };
    let stored: Option<Option<String>> = c
        .prepare_cached("SELECT session_key FROM jobs WHERE id = ?1 AND state = 'pending'")?
        .query_row(params![r.job_id], |row| row.get(0))
        .optional()?;
    let used = guard.used.as_ref().map(Secret::expose);
    Ok(stored.flatten().filter(|k| Some(k.as_str()) != used))
}

pub(super) fn mark(c: &Connection, marks: &[PreCallMark]) -> Result<(), OutboxError> {
    let mut stmt = c.prepare_cached(
        "UPDATE jobs SET calls = calls + ?3, first_attempt_at = COALESCE(first_attempt_at, ?2), \
         updated_at = ?2 WHERE id = ?1 AND state = 'pending'",
    )?;
    for m in marks {
        stmt.execute(params![m.id, m.at, m.counts()])?;
    }
    Ok(())
}
