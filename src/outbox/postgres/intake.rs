//! Intake on the shared outbox: record a command (new, joined, re-opened or a
//! conflict) and decide whether this worker runs it now.
//!
//! The unique key (appid, op, bill_no) is global, so deduplication and
//! `bill_no_conflict` hold across workers. A new or re-opened job runs here only
//! when this worker holds (or just took) its player's lease and has loaded every
//! other pending job of that player; otherwise it is left unclaimed for the lease
//! holder, which loads the player's jobs in arrival order.

use tokio_postgres::Transaction;

use super::writer::{job_from_row, Fence, Stmts};
use crate::engine::job::{Job, JobState};
use crate::outbox::writer::{Intake, IntakeOutcome};
use crate::outbox::OutboxError;
use crate::secret::Secret;

const SELECT_EXISTING: &str = "SELECT id, request, session_key, attempts, first_attempt_at, \
     next_attempt_at, received_at, last_errcode, last_error, reopened_at, calls, uncertain, \
     state, result, claimed_by FROM jobs WHERE appid = $1 AND op = $2 AND bill_no = $3 FOR UPDATE";

const INSERT_JOB: &str = "INSERT INTO jobs (op, bill_no, appid, openid, request, session_key, \
     state, next_attempt_at, received_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7) \
     ON CONFLICT (appid, op, bill_no) DO NOTHING RETURNING id";

pub(super) async fn intake(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    i: &Intake,
) -> Result<IntakeOutcome, OutboxError> {
    let p = &i.command.params;
    let bill_no = p.bill_no.as_deref().unwrap_or_default();
    let canonical = p.canonical();
    let session_key = i.command.session_key.as_ref().map(Secret::expose);
    let st = stmts.get(tx, INSERT_JOB).await?;
    super::trip();
    let inserted = tx
        .query_opt(
            &st,
            &[
                &p.op.as_str(),
                &bill_no,
                &p.appid,
                &p.openid,
                &canonical,
                &session_key,
                &i.now,
            ],
        )
        .await?;
    if let Some(row) = inserted {
        let id: i64 = row.try_get(0)?;
        add_target(tx, stmts, id, i, false).await?;
        let mut job = Job::new(id, p.clone(), i.command.session_key.clone(), i.now);
        return Ok(
            match take_player(tx, stmts, fence, &p.appid, &p.openid, id).await? {
                Some(gen) => {
                    job.lease_gen = gen;
                    IntakeOutcome::New(job)
                }
                None => IntakeOutcome::Elsewhere { job_id: id },
            },
        );
    }
    existing(tx, stmts, fence, i).await
}

/// Intake of a command whose key is already recorded (perhaps committed a moment
/// ago by another worker, or earlier in this batch): joined, re-opened or a
/// conflict.
pub(super) async fn existing(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    i: &Intake,
) -> Result<IntakeOutcome, OutboxError> {
    let p = &i.command.params;
    let bill_no = p.bill_no.as_deref().unwrap_or_default();
    let canonical = p.canonical();
    let session_key = i.command.session_key.as_ref().map(Secret::expose);
    let st = stmts.get(tx, SELECT_EXISTING).await?;
    super::trip();
    let row = tx
        .query_opt(&st, &[&p.appid, &p.op.as_str(), &bill_no])
        .await?
        .ok_or_else(|| OutboxError::Corrupt("a job vanished during intake".into()))?;
    let mut job = job_from_row(&row)?;
    let state: String = row.try_get(12)?;
    let result: Option<String> = row.try_get(13)?;
    let claimed_by: Option<String> = row.try_get(14)?;
    let request: String = row.try_get(1)?;
    let id = job.id;
    if request != canonical {
        return Ok(IntakeOutcome::Conflict { job_id: id });
    }
    let state = JobState::parse(&state)
        .ok_or_else(|| OutboxError::Corrupt(format!("job {id} has state {state:?}")))?;
    let session_problem =
        crate::engine::job::reopens_with_new_session_key(state, job.last_errcode, job.uncertain);
    if session_problem && session_key.is_some() {
        // re-opened; the lease holder of the player (perhaps this worker) loads it
        let st = stmts
            .get(
                tx,
                "UPDATE jobs SET state = 'pending', session_key = $2, next_attempt_at = $3, \
                 result = NULL, finished_at = NULL, reopened_at = $3, updated_at = $3, \
                 claimed_by = NULL WHERE id = $1",
            )
            .await?;
        super::trip();
        tx.execute(&st, &[&id, &session_key, &i.now]).await?;
        // the new final reply goes to every target of the job (contract, guarantee
        // 4): the earlier commands are owed it too
        let st = stmts
            .get(
                tx,
                "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = $1",
            )
            .await?;
        super::trip();
        tx.execute(&st, &[&id]).await?;
        add_target(tx, stmts, id, i, true).await?;
        if let Some(gen) = take_player(tx, stmts, fence, &p.appid, &p.openid, id).await? {
            job.lease_gen = gen;
            job.params = p.clone();
            job.session_key = i.command.session_key.clone();
            job.next_attempt_at = i.now;
            job.reopened_at = Some(i.now);
            job.last_error = None;
            return Ok(IntakeOutcome::Reopened(job));
        }
        return Ok(IntakeOutcome::Elsewhere { job_id: id });
    }
    let target = add_target(tx, stmts, id, i, state.is_final()).await?;
    let reply = result
        .filter(|_| state.is_final())
        .map(|payload| i.reply_owed(target, payload));
    let mut pending = None;
    if !state.is_final() {
        let mine = claimed_by.as_deref() == Some(&*fence.me);
        let newer =
            session_key.filter(|k| job.session_key.as_ref().map(Secret::expose) != Some(*k));
        if let Some(k) = newer {
            // the holder of the job picks the new key up when it loads it again
            let st = stmts
                .get(
                    tx,
                    "UPDATE jobs SET session_key = $2, \
                     claimed_by = CASE WHEN claimed_by = $3 THEN claimed_by ELSE NULL END \
                     WHERE id = $1",
                )
                .await?;
            super::trip();
            tx.execute(&st, &[&id, &k, &&*fence.me]).await?;
            job.session_key = Some(Secret::new(k));
        }
        if mine {
            // run under the generation this worker holds the player at now (none:
            // the player went elsewhere, and its holder loads the job)
            let st = stmts
                .get(
                    tx,
                    "SELECT generation FROM player_leases WHERE appid = $1 AND openid = $2 AND owner = $3",
                )
                .await?;
            super::trip();
            if let Some(row) = tx
                .query_opt(&st, &[&p.appid, &p.openid, &&*fence.me])
                .await?
            {
                job.lease_gen = row.try_get(0)?;
                pending = Some(job);
            }
        }
    }
    Ok(IntakeOutcome::Joined {
        job_id: id,
        reply,
        pending,
    })
}

/// Take (or extend) the lease of the player of job `id`, just recorded or
/// re-opened. `Some(generation)`: this worker runs the job now, under that lease
/// generation (it holds the lease and has loaded every other pending job of the
/// player), and the job is claimed. `None`: the lease holder — another worker,
/// or this one at its next look — loads it in arrival order.
async fn take_player(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    appid: &str,
    openid: &str,
    id: i64,
) -> Result<Option<i64>, OutboxError> {
    let st = stmts.get(tx, TAKE_LEASE).await?;
    super::trip();
    let Some(row) = tx
        .query_opt(&st, &[&appid, &openid, &&*fence.me, &fence.lease_ms])
        .await?
    else {
        return Ok(None);
    };
    let gen: i64 = row.try_get(0)?;
    // claim the job here unless the player has pending jobs this worker has not
    // loaded (one statement: the common case costs one round trip)
    let st = stmts
        .get(
            tx,
            "UPDATE jobs SET claimed_by = $4 WHERE id = $3 AND NOT EXISTS ( \
               SELECT 1 FROM jobs o WHERE o.appid = $1 AND o.openid = $2 \
               AND o.state = 'pending' AND o.id <> $3 AND o.claimed_by IS DISTINCT FROM $4)",
        )
        .await?;
    super::trip();
    if tx
        .execute(&st, &[&appid, &openid, &id, &&*fence.me])
        .await?
        == 1
    {
        return Ok(Some(gen));
    }
    // jobs of this player this worker has not loaded (it just took the lease over,
    // or another worker recorded them): load them all, in order
    let st = stmts
        .get(
            tx,
            "UPDATE jobs SET claimed_by = NULL WHERE appid = $1 AND openid = $2 \
             AND state = 'pending' AND claimed_by IS DISTINCT FROM $3",
        )
        .await?;
    super::trip();
    tx.execute(&st, &[&appid, &openid, &&*fence.me]).await?;
    Ok(None)
}

/// Insert the lease, or take it when it is this worker's or has run out; answers
/// its generation (a new one unless this worker already owned the row).
pub(super) const TAKE_LEASE: &str = "INSERT INTO player_leases (appid, openid, owner, expires_at) \
     VALUES ($1, $2, $3, (extract(epoch from clock_timestamp()) * 1000)::bigint + $4) \
     ON CONFLICT (appid, openid) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, \
       generation = CASE WHEN player_leases.owner = EXCLUDED.owner \
         THEN player_leases.generation ELSE EXCLUDED.generation END \
     WHERE player_leases.owner = EXCLUDED.owner \
        OR player_leases.expires_at <= (extract(epoch from clock_timestamp()) * 1000)::bigint \
     RETURNING generation";

async fn add_target(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    job_id: i64,
    i: &Intake,
    republish: bool,
) -> Result<i64, OutboxError> {
    let sql = if republish {
        "INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (job_id, reply_to, correlation_id) DO UPDATE SET published_at = NULL, returned = 0 \
         RETURNING id"
    } else {
        "INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (job_id, reply_to, correlation_id) DO UPDATE SET added_at = reply_targets.added_at \
         RETURNING id"
    };
    let st = stmts.get(tx, sql).await?;
    super::trip();
    Ok(tx
        .query_one(&st, &[&job_id, &i.reply_to, &i.correlation_id, &i.now])
        .await?
        .try_get(0)?)
}
