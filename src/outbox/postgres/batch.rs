//! A writer batch's intake and outcomes in a few statements (arrays), not a few
//! statements per job: the shared outbox's cost is its statements.
//!
//! [`intakes`]: every command of the batch whose key is new goes in with one
//! statement (its job and reply target), and the leases and claims of their
//! players in one more; a command whose key is already recorded (a redelivery, a
//! conflict, a re-open, a repeat within the batch) runs the one-command intake of
//! `intake.rs` afterwards, in batch order. [`records`]: the attempt rows of every
//! outcome in one statement, the retries in one, the final outcomes and their
//! reply targets in one. Every fence is judged per row in the statement exactly as
//! the one-request statements judge it (`state = 'pending'`, the player's lease
//! this worker's at the row's own generation); a row fenced out is answered alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::Transaction;

use super::intake::existing;
use super::writer::{Fence, Stmts};
use crate::engine::job::Job;
use crate::engine::{Record, Update};
use crate::outbox::writer::{Intake, IntakeOutcome, Landed, OutgoingReply};
use crate::outbox::OutboxError;
use crate::secret::Secret;

/// The new jobs and their reply targets, one statement; answers each inserted
/// row's place in the arrays (1-based) and its id. A key already recorded inserts
/// nothing (and is left to [`existing`]).
const INSERT_JOBS: &str = "WITH input AS ( \
       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::bigint[], $8::text[], $9::text[]) WITH ORDINALITY \
         AS u(op, bill_no, appid, openid, request, session_key, now, reply_to, correlation_id, ord)), \
     ins AS ( \
       INSERT INTO jobs (op, bill_no, appid, openid, request, session_key, state, \
         next_attempt_at, received_at, updated_at) \
       SELECT op, bill_no, appid, openid, request, session_key, 'pending', now, now, now \
       FROM input ORDER BY ord \
       ON CONFLICT (appid, op, bill_no) DO NOTHING RETURNING id, appid, op, bill_no), \
     tg AS ( \
       INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at) \
       SELECT ins.id, i.reply_to, i.correlation_id, i.now \
       FROM ins JOIN input i USING (appid, op, bill_no) ORDER BY ins.id \
       RETURNING job_id) \
     SELECT i.ord, ins.id FROM ins JOIN input i USING (appid, op, bill_no)";

/// Take (or extend) the lease of every player of the new jobs `$5` (players
/// distinct, in lock order), and claim the new jobs of each player taken unless it
/// has pending jobs this worker has not loaded — the batch's own new jobs aside,
/// as the one-job statements, run one job after the other, would find them claimed
/// or not yet there. Answers each player taken, its generation and its jobs claimed.
const TAKE_AND_CLAIM: &str = "WITH lease AS ( \
       INSERT INTO player_leases (appid, openid, owner, expires_at) \
       SELECT appid, openid, $3, (extract(epoch from clock_timestamp()) * 1000)::bigint + $4 \
       FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(appid, openid, ord) ORDER BY ord \
       ON CONFLICT (appid, openid) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, \
         generation = CASE WHEN player_leases.owner = EXCLUDED.owner \
           THEN player_leases.generation ELSE EXCLUDED.generation END \
       WHERE player_leases.owner = EXCLUDED.owner \
          OR player_leases.expires_at <= (extract(epoch from clock_timestamp()) * 1000)::bigint \
       RETURNING appid, openid, generation), \
     claimed AS ( \
       UPDATE jobs j SET claimed_by = $3 FROM lease l \
       WHERE j.id = ANY($5::bigint[]) AND j.appid = l.appid AND j.openid = l.openid \
       AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.appid = j.appid AND o.openid = j.openid \
         AND o.state = 'pending' AND o.id <> ALL($5::bigint[]) AND o.claimed_by IS DISTINCT FROM $3) \
       RETURNING j.id, j.appid, j.openid) \
     SELECT l.appid, l.openid, l.generation, \
       ARRAY(SELECT c.id FROM claimed c WHERE c.appid = l.appid AND c.openid = l.openid) \
     FROM lease l";

/// Players taken whose jobs could not be claimed: every pending job of theirs this
/// worker has not loaded is left for a load in arrival order (as `take_player`).
const UNCLAIM_PLAYERS: &str = "UPDATE jobs j SET claimed_by = NULL \
     FROM unnest($1::text[], $2::text[]) AS p(appid, openid) \
     WHERE j.appid = p.appid AND j.openid = p.openid AND j.state = 'pending' \
     AND j.claimed_by IS DISTINCT FROM $3";

/// The first command of each key among `reqs` (their places): only those may be
/// new; a repeat joins the first afterwards, as it would one command at a time.
pub(super) fn firsts(reqs: &[&Intake]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(reqs.len());
    reqs.iter()
        .enumerate()
        .filter(|(_, i)| {
            let p = &i.command.params;
            seen.insert((
                p.appid.as_str(),
                p.op.as_str(),
                p.bill_no.as_deref().unwrap_or_default(),
            ))
        })
        .map(|(k, _)| k)
        .collect()
}

/// The intake of every command of a writer batch (in the writer's order: by
/// player), once [`insert_jobs`] has recorded the new ones (`new`); answers in the
/// same order. The answers are exactly those of the one-command intake run over
/// the batch in order.
pub(super) async fn intakes(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    reqs: &[&Intake],
    new: &[(usize, i64)],
) -> Result<Vec<IntakeOutcome>, OutboxError> {
    let mut out: Vec<Option<IntakeOutcome>> = reqs.iter().map(|_| None).collect();
    if !new.is_empty() {
        let taken = take_and_claim(tx, stmts, fence, reqs, new).await?;
        for &(k, id) in new {
            let i = reqs
                .get(k)
                .ok_or_else(|| OutboxError::Corrupt(format!("intake {k} out of range")))?;
            let p = &i.command.params;
            let key = (p.appid.as_str(), p.openid.as_str());
            let answer = match taken.get(&key) {
                Some((gen, claimed)) if claimed.contains(&id) => {
                    let mut job = Job::new(id, p.clone(), i.command.session_key.clone(), i.now);
                    job.lease_gen = *gen;
                    IntakeOutcome::New(job)
                }
                _ => IntakeOutcome::Elsewhere { job_id: id },
            };
            if let Some(slot) = out.get_mut(k) {
                *slot = Some(answer);
            }
        }
    }
    // the keys already recorded, one command at a time, in order
    for (slot, i) in out.iter_mut().zip(reqs) {
        if slot.is_none() {
            *slot = Some(existing(tx, stmts, fence, i).await?);
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| OutboxError::Corrupt("an intake went unanswered".into())))
        .collect()
}

/// Insert the jobs of `reqs[firsts]` (keys distinct); answers (index in `reqs`, job
/// id) of those inserted, in that order.
pub(super) async fn insert_jobs(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    reqs: &[&Intake],
    firsts: &[usize],
) -> Result<Vec<(usize, i64)>, OutboxError> {
    if firsts.is_empty() {
        return Ok(Vec::new());
    }
    let n = firsts.len();
    let (mut ops, mut bills, mut apps, mut openids, mut requests, mut keys, mut nows) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut reply_tos, mut corrs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for &k in firsts {
        let i = reqs[k];
        let p = &i.command.params;
        ops.push(p.op.as_str());
        bills.push(p.bill_no.as_deref().unwrap_or_default());
        apps.push(p.appid.as_str());
        openids.push(p.openid.as_str());
        requests.push(p.canonical());
        keys.push(i.command.session_key.as_ref().map(Secret::expose));
        nows.push(i.now);
        reply_tos.push(i.reply_to.as_str());
        corrs.push(i.correlation_id.as_str());
    }
    let st = stmts.get(tx, INSERT_JOBS).await?;
    super::trip();
    let rows = tx
        .query(
            &st,
            &[
                &ops, &bills, &apps, &openids, &requests, &keys, &nows, &reply_tos, &corrs,
            ],
        )
        .await?;
    let mut new = Vec::with_capacity(rows.len());
    for r in rows {
        let ord: i64 = r.try_get(0)?;
        let k = usize::try_from(ord - 1)
            .ok()
            .and_then(|o| firsts.get(o))
            .ok_or_else(|| OutboxError::Corrupt(format!("intake row {ord} out of range")))?;
        new.push((*k, r.try_get::<_, i64>(1)?));
    }
    new.sort_unstable();
    Ok(new)
}

/// Players taken: their generation and the new jobs claimed.
type Taken<'a> = HashMap<(&'a str, &'a str), (i64, HashSet<i64>)>;

/// [`TAKE_AND_CLAIM`] for the new jobs `new` (index in `reqs`, id), then
/// [`UNCLAIM_PLAYERS`] for any player taken whose jobs were not claimed.
async fn take_and_claim<'a>(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    fence: &Fence,
    reqs: &[&'a Intake],
    new: &[(usize, i64)],
) -> Result<Taken<'a>, OutboxError> {
    // distinct players in lock order (appid, openid), as the writer sorts them
    let mut players: Vec<(&'a str, &'a str)> = new
        .iter()
        .map(|&(k, _)| {
            let p = &reqs[k].command.params;
            (p.appid.as_str(), p.openid.as_str())
        })
        .collect();
    players.sort_unstable();
    players.dedup();
    let apps: Vec<&str> = players.iter().map(|p| p.0).collect();
    let openids: Vec<&str> = players.iter().map(|p| p.1).collect();
    let ids: Vec<i64> = new.iter().map(|n| n.1).collect();
    let me: &str = &fence.me;
    let st = stmts.get(tx, TAKE_AND_CLAIM).await?;
    super::trip();
    let rows = tx
        .query(&st, &[&apps, &openids, &me, &fence.lease_ms, &ids])
        .await?;
    let mut taken: Taken<'a> = HashMap::with_capacity(rows.len());
    for r in rows {
        let app: String = r.try_get(0)?;
        let openid: String = r.try_get(1)?;
        let gen: i64 = r.try_get(2)?;
        let claimed: Vec<i64> = r.try_get(3)?;
        if let Some(&key) = players
            .iter()
            .find(|p| p.0 == app.as_str() && p.1 == openid.as_str())
        {
            taken.insert(key, (gen, claimed.into_iter().collect()));
        }
    }
    // players taken with a job left unclaimed: every pending job of theirs not
    // loaded here is loaded again, in order, by the lease holder's next look
    let (mut un_apps, mut un_openids) = (Vec::new(), Vec::new());
    for (&(app, openid), (_, claimed)) in &taken {
        let unclaimed = new.iter().any(|&(k, id)| {
            let p = &reqs[k].command.params;
            p.appid == app && p.openid == openid && !claimed.contains(&id)
        });
        if unclaimed {
            un_apps.push(app);
            un_openids.push(openid);
        }
    }
    if !un_apps.is_empty() {
        let st = stmts.get(tx, UNCLAIM_PLAYERS).await?;
        super::trip();
        tx.execute(&st, &[&un_apps, &un_openids, &me]).await?;
    }
    Ok(taken)
}

/// An outcome row's job is still pending (see [`super::still_pending`]).
const PENDING: &str = super::still_pending!("j.");

/// The lease condition of an outcome row (see `writes.rs`): the player's lease is
/// still this worker's (`$owner`) at the row's generation (`u.gen`).
const HELD: &str = "EXISTS (SELECT 1 FROM player_leases l WHERE l.appid = j.appid \
     AND l.openid = j.openid AND l.owner = $";

/// Whether an outcome can go with the others in [`records`]: all but a final on
/// a session problem, whose guard reads and locks the job first (`writes.rs`).
pub(super) fn batchable(r: &Record) -> bool {
    !(matches!(r.update, Update::Final { .. }) && r.session_guard.is_some())
}

/// The outcomes of several requests ([`batchable`], job ids distinct: the caller
/// checks) in
/// three statements at most, pipelined; answers in the same order, `None` for an outcome
/// fenced out (as `writes::record`).
pub(super) async fn records(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    recs: &[&Record],
    me: &str,
) -> Result<Vec<Option<Landed>>, OutboxError> {
    if !recs.iter().all(|r| batchable(r)) {
        return Err(OutboxError::Corrupt(
            "a session-guarded outcome among batched ones".into(),
        ));
    }
    // independent of each other: pipelined
    let (a, retried, finished) = tokio::join!(
        attempts(tx, stmts, recs),
        retries(tx, stmts, recs, me),
        finals(tx, stmts, recs, me),
    );
    a?;
    let (retried, mut finished) = (retried?, finished?);
    Ok(recs
        .iter()
        .map(|r| match r.update {
            Update::Retry { .. } => retried.contains(&r.job_id).then(Landed::default),
            Update::Final { .. } => finished.remove(&r.job_id).map(|replies| Landed {
                replies,
                reopened_with: None,
            }),
        })
        .collect())
}

/// Every attempt row of `recs`, in order (the calls happened whoever holds the
/// job now: they are kept for the audit, unfenced).
async fn attempts(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    recs: &[&Record],
) -> Result<(), OutboxError> {
    let n: usize = recs.iter().map(|r| r.rows.len()).sum();
    if n == 0 {
        return Ok(());
    }
    let (mut job, mut nth, mut api, mut started, mut latency) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut status, mut errcode, mut errmsg, mut outcome) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in recs {
        for a in &r.rows {
            job.push(r.job_id);
            nth.push(a.n as i64);
            api.push(a.answer.api.name());
            started.push(a.started_at);
            latency.push(a.answer.latency.as_millis().min(i64::MAX as u128) as i64);
            status.push(a.answer.http_status.map(i64::from));
            errcode.push(a.answer.errcode);
            errmsg.push(a.answer.errmsg.as_deref());
            outcome.push(a.answer.class.as_str());
        }
    }
    let st = stmts
        .get(
            tx,
            "INSERT INTO attempts (job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome) \
             SELECT job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome \
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], \
               $6::bigint[], $7::bigint[], $8::text[], $9::text[]) WITH ORDINALITY \
               AS u(job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome, ord) \
             ORDER BY ord",
        )
        .await?;
    super::trip();
    tx.execute(
        &st,
        &[
            &job, &nth, &api, &started, &latency, &status, &errcode, &errmsg, &outcome,
        ],
    )
    .await?;
    Ok(())
}

/// The retries of `recs` in one statement; answers the jobs whose retry landed.
async fn retries(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    recs: &[&Record],
    me: &str,
) -> Result<HashSet<i64>, OutboxError> {
    let (mut ids, mut attempts, mut firsts, mut nexts, mut codes, mut errors) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut nows, mut uncertain, mut gens) = (vec![], vec![], vec![]);
    for r in recs {
        if let Update::Retry { next_attempt_at } = &r.update {
            let (code, error) = r.last_error();
            ids.push(r.job_id);
            attempts.push(r.attempts_total as i64);
            firsts.push(r.first_attempt_at);
            nexts.push(*next_attempt_at);
            codes.push(code);
            errors.push(error);
            nows.push(r.now);
            uncertain.push(r.uncertain as i64);
            gens.push(r.lease_gen);
        }
    }
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "UPDATE jobs j SET attempts = u.attempts, \
             first_attempt_at = COALESCE(j.first_attempt_at, u.first_attempt_at), \
             next_attempt_at = u.next_attempt_at, last_errcode = u.errcode, last_error = u.error, \
             updated_at = u.now, uncertain = GREATEST(j.uncertain, u.uncertain) \
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
               $6::text[], $7::bigint[], $8::bigint[], $9::bigint[]) \
               AS u(id, attempts, first_attempt_at, next_attempt_at, errcode, error, now, uncertain, gen) \
             WHERE j.id = u.id AND j.id = ANY($1::bigint[]) AND {PENDING} \
             AND {HELD}10 AND l.generation = u.gen) RETURNING j.id"
        )
    });
    let st = stmts.get(tx, sql).await?;
    super::trip();
    let rows = tx
        .query(
            &st,
            &[
                &ids, &attempts, &firsts, &nexts, &codes, &errors, &nows, &uncertain, &gens, &me,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<Result<_, _>>()?)
}

/// The final outcomes of `recs` and the reply targets of those that landed, in
/// one statement; answers the replies owed of each job whose outcome landed.
async fn finals(
    tx: &Transaction<'_>,
    stmts: &Stmts,
    recs: &[&Record],
    me: &str,
) -> Result<HashMap<i64, Vec<OutgoingReply>>, OutboxError> {
    let (mut ids, mut states, mut attempts, mut firsts, mut codes, mut errors) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut results, mut nows, mut uncertain, mut gens) = (vec![], vec![], vec![], vec![]);
    for r in recs {
        if let Update::Final { state, reply } = &r.update {
            let (code, error) = r.last_error();
            ids.push(r.job_id);
            states.push(state.as_str());
            attempts.push(r.attempts_total as i64);
            firsts.push(r.first_attempt_at);
            codes.push(code);
            errors.push(error);
            results.push(String::from_utf8_lossy(reply).into_owned());
            nows.push(r.now);
            uncertain.push(r.uncertain as i64);
            gens.push(r.lease_gen);
        }
    }
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "WITH upd AS ( \
               UPDATE jobs j SET state = u.state, attempts = u.attempts, \
               first_attempt_at = COALESCE(j.first_attempt_at, u.first_attempt_at), \
               last_errcode = COALESCE(u.errcode, j.last_errcode), \
               last_error = COALESCE(u.error, j.last_error), result = u.result, \
               session_key = NULL, finished_at = u.now, updated_at = u.now, \
               uncertain = GREATEST(j.uncertain, u.uncertain) \
               FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
                 $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[]) \
                 AS u(id, state, attempts, first_attempt_at, errcode, error, result, now, uncertain, gen) \
               WHERE j.id = u.id AND j.id = ANY($1::bigint[]) AND {PENDING} \
               AND {HELD}11 AND l.generation = u.gen) RETURNING j.id) \
             SELECT upd.id, t.id, t.reply_to, t.correlation_id FROM upd \
             LEFT JOIN reply_targets t ON t.job_id = upd.id AND t.published_at IS NULL \
             ORDER BY upd.id, t.id"
        )
    });
    let st = stmts.get(tx, sql).await?;
    super::trip();
    let rows = tx
        .query(
            &st,
            &[
                &ids, &states, &attempts, &firsts, &codes, &errors, &results, &nows, &uncertain,
                &gens, &me,
            ],
        )
        .await?;
    let mut replies: HashMap<i64, Vec<OutgoingReply>> = HashMap::with_capacity(ids.len());
    let payloads: HashMap<i64, Arc<[u8]>> = recs
        .iter()
        .filter_map(|r| match &r.update {
            Update::Final { reply, .. } => Some((r.job_id, Arc::from(reply.clone()))),
            Update::Retry { .. } => None,
        })
        .collect();
    for row in rows {
        let id: i64 = row.try_get(0)?;
        let list = replies.entry(id).or_default();
        let Some(target) = row.try_get::<_, Option<i64>>(1)? else {
            continue;
        };
        let payload = payloads
            .get(&id)
            .cloned()
            .ok_or_else(|| OutboxError::Corrupt(format!("job {id} landed without a record")))?;
        list.push(OutgoingReply {
            target_id: Some(target),
            reply_to: row.try_get(2)?,
            correlation_id: row.try_get(3)?,
            payload,
        });
    }
    Ok(replies)
}
