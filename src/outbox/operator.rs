//! The operator's statements on the SQLite outbox: every statement the `outbox` CLI
//! verbs run on `jobs`, `reply_targets`, `attempts` and `operator_actions`, and the
//! row types both engines answer with.
//!
//! The verbs (`crate::cli::outbox`) hold no SQL: they call [`super::store::Store`],
//! which runs these functions on a SQLite connection (read-only, or an `IMMEDIATE`
//! transaction for writes) or their PostgreSQL counterparts
//! ([`super::postgres::ops`]) on the shared outbox. Nothing here selects
//! `session_key`.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::OutboxError;

/// Which jobs: every field set narrows the set (all `None`: every job).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub bill_no: Option<String>,
    pub bill_no_prefix: Option<String>,
    pub status: Option<String>,
    pub op: Option<String>,
    pub openid: Option<String>,
    pub appid: Option<String>,
    pub errcode: Option<i64>,
    /// Received at or after (unix ms).
    pub since: Option<i64>,
    /// Received before (unix ms).
    pub until: Option<i64>,
    /// Only jobs with an id below this one: the next page of a newest-first list.
    pub before_id: Option<i64>,
}

impl JobFilter {
    /// The `WHERE` clause (on `jobs j`) and its arguments.
    fn sql(&self) -> (String, Vec<Value>) {
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        let text = |v: &String| Value::Text(v.clone());
        if let Some(b) = &self.bill_no {
            clauses.push("j.bill_no = ?");
            args.push(text(b));
        }
        if let Some(p) = &self.bill_no_prefix {
            // substr, not LIKE: `_` and `%` in a prefix are plain characters
            clauses.push("substr(j.bill_no, 1, ?) = ?");
            args.push(Value::Integer(
                i64::try_from(p.chars().count()).unwrap_or(i64::MAX),
            ));
            args.push(text(p));
        }
        for (clause, v) in [
            ("j.state = ?", &self.status),
            ("j.op = ?", &self.op),
            ("j.openid = ?", &self.openid),
            ("j.appid = ?", &self.appid),
        ] {
            if let Some(v) = v {
                clauses.push(clause);
                args.push(text(v));
            }
        }
        for (clause, v) in [
            ("j.last_errcode = ?", self.errcode),
            ("j.received_at >= ?", self.since),
            ("j.received_at < ?", self.until),
            ("j.id < ?", self.before_id),
        ] {
            if let Some(v) = v {
                clauses.push(clause);
                args.push(Value::Integer(v));
            }
        }
        let sql = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        (sql, args)
    }
}

pub(crate) const JOB_COLS: &str =
    "j.id, j.op, j.bill_no, j.appid, j.openid, j.request, j.state, j.attempts, \
     j.next_attempt_at, j.first_attempt_at, j.last_errcode, j.last_error, j.result, \
     j.received_at, j.updated_at, j.finished_at";

/// A job as the CLI sees it: every column but `session_key`.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: i64,
    pub op: String,
    pub bill_no: String,
    pub appid: String,
    pub openid: String,
    pub request: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub first_attempt_at: Option<i64>,
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub received_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

impl JobRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: r.get(0)?,
            op: r.get(1)?,
            bill_no: r.get(2)?,
            appid: r.get(3)?,
            openid: r.get(4)?,
            request: r.get(5)?,
            state: r.get(6)?,
            attempts: r.get(7)?,
            next_attempt_at: r.get(8)?,
            first_attempt_at: r.get(9)?,
            last_errcode: r.get(10)?,
            last_error: r.get(11)?,
            result: r.get(12)?,
            received_at: r.get(13)?,
            updated_at: r.get(14)?,
            finished_at: r.get(15)?,
        })
    }

    pub fn is_final(&self) -> bool {
        self.state != "pending"
    }
}

/// Every job the filter selects, oldest first.
pub fn jobs(c: &Connection, f: &JobFilter) -> Result<Vec<JobRow>, OutboxError> {
    let (filter, args) = f.sql();
    let mut stmt = c.prepare(&format!(
        "SELECT {JOB_COLS} FROM jobs j{filter} ORDER BY j.id"
    ))?;
    let rows = stmt.query_map(params_from_iter(args.iter()), JobRow::from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A line of `outbox list`: the job and how many of its replies the broker confirmed.
#[derive(Debug, Clone)]
pub struct ListRow {
    pub id: i64,
    pub received_at: i64,
    pub op: String,
    pub bill_no: String,
    pub appid: String,
    pub openid: String,
    pub state: String,
    pub attempts: i64,
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    pub finished_at: Option<i64>,
    pub replies: i64,
    pub confirmed: i64,
    pub returned: i64,
}

/// The newest jobs first, at most `limit` (`None`: all).
pub fn list(
    c: &Connection,
    f: &JobFilter,
    limit: Option<u32>,
) -> Result<Vec<ListRow>, OutboxError> {
    let (filter, mut args) = f.sql();
    args.push(Value::Integer(limit.map_or(-1, i64::from)));
    let mut stmt = c.prepare(&format!(
        "SELECT j.id, j.received_at, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, \
         j.last_errcode, j.last_error, j.finished_at, \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id), \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.published_at IS NOT NULL), \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.returned = 1) \
         FROM jobs j{filter} ORDER BY j.id DESC LIMIT ?"
    ))?;
    let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
        Ok(ListRow {
            id: r.get(0)?,
            received_at: r.get(1)?,
            op: r.get(2)?,
            bill_no: r.get(3)?,
            appid: r.get(4)?,
            openid: r.get(5)?,
            state: r.get(6)?,
            attempts: r.get(7)?,
            last_errcode: r.get(8)?,
            last_error: r.get(9)?,
            finished_at: r.get(10)?,
            replies: r.get(11)?,
            confirmed: r.get(12)?,
            returned: r.get(13)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// How many jobs the filter selects.
pub fn count(c: &Connection, f: &JobFilter) -> Result<i64, OutboxError> {
    let (filter, args) = f.sql();
    Ok(c.query_row(
        &format!("SELECT COUNT(*) FROM jobs j{filter}"),
        params_from_iter(args.iter()),
        |r| r.get(0),
    )?)
}

/// Jobs received at or after `since`, counted per `bucket_ms` of their receipt
/// and per state: (bucket index from `since`, state, jobs), by bucket.
pub fn timeline(
    c: &Connection,
    since: i64,
    bucket_ms: i64,
) -> Result<Vec<(i64, String, i64)>, OutboxError> {
    let mut stmt = c.prepare_cached(
        "SELECT (received_at - ?1) / ?2 AS b, state, COUNT(*) FROM jobs \
         WHERE received_at >= ?1 GROUP BY b, state ORDER BY b",
    )?;
    let rows = stmt.query_map(params![since, bucket_ms.max(1)], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A row of `outbox export`.
#[derive(Debug, Clone)]
pub struct ExportRow {
    pub id: i64,
    pub op: String,
    pub bill_no: String,
    pub appid: String,
    pub openid: String,
    pub state: String,
    pub attempts: i64,
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    pub received_at: i64,
    pub finished_at: Option<i64>,
    pub request: String,
    pub result: Option<String>,
}

/// Every job the filter selects, oldest first, handed to `each` row by row from the
/// cursor: memory does not grow with the outbox.
pub fn export_each<E: From<OutboxError>>(
    c: &Connection,
    f: &JobFilter,
    mut each: impl FnMut(ExportRow) -> Result<(), E>,
) -> Result<(), E> {
    let (filter, args) = f.sql();
    let mut stmt = c
        .prepare(&format!(
            "SELECT j.id, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, j.last_errcode, \
             j.last_error, j.received_at, j.finished_at, j.request, j.result FROM jobs j{filter} ORDER BY j.id"
        ))
        .map_err(OutboxError::from)?;
    let mut rows = stmt
        .query(params_from_iter(args.iter()))
        .map_err(OutboxError::from)?;
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<ExportRow> {
        Ok(ExportRow {
            id: r.get(0)?,
            op: r.get(1)?,
            bill_no: r.get(2)?,
            appid: r.get(3)?,
            openid: r.get(4)?,
            state: r.get(5)?,
            attempts: r.get(6)?,
            last_errcode: r.get(7)?,
            last_error: r.get(8)?,
            received_at: r.get(9)?,
            finished_at: r.get(10)?,
            request: r.get(11)?,
            result: r.get(12)?,
        })
    };
    while let Some(r) = rows.next().map_err(OutboxError::from)? {
        each(read(r).map_err(OutboxError::from)?)?;
    }
    Ok(())
}

/// The jobs of `bill_no` (of one app when `appid` is given), in arrival order.
pub fn jobs_by_bill_no(
    c: &Connection,
    bill_no: &str,
    appid: Option<&str>,
) -> Result<Vec<JobRow>, OutboxError> {
    jobs(
        c,
        &JobFilter {
            bill_no: Some(bill_no.to_string()),
            appid: appid.map(str::to_string),
            ..JobFilter::default()
        },
    )
}

#[derive(Debug, Clone)]
pub struct TargetRow {
    pub reply_to: String,
    pub correlation_id: String,
    pub added_at: i64,
    pub published_at: Option<i64>,
    pub returned: bool,
}

pub fn targets_of(c: &Connection, job_id: i64) -> Result<Vec<TargetRow>, OutboxError> {
    let mut stmt = c.prepare_cached(
        "SELECT reply_to, correlation_id, added_at, published_at, returned FROM reply_targets \
         WHERE job_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        Ok(TargetRow {
            reply_to: r.get(0)?,
            correlation_id: r.get(1)?,
            added_at: r.get(2)?,
            published_at: r.get(3)?,
            returned: r.get::<_, i64>(4)? != 0,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// How many reply targets a job has.
pub fn count_targets(c: &Connection, job_id: i64) -> Result<i64, OutboxError> {
    Ok(
        c.prepare_cached("SELECT COUNT(*) FROM reply_targets WHERE job_id = ?1")?
            .query_row(params![job_id], |r| r.get(0))?,
    )
}

/// One call to Midas (a row of `attempts`).
#[derive(Debug, Clone)]
pub struct CallRow {
    pub n: i64,
    pub api: String,
    pub started_at: i64,
    pub latency_ms: i64,
    pub http_status: Option<i64>,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub outcome: String,
}

pub fn calls_of(c: &Connection, job_id: i64) -> Result<Vec<CallRow>, OutboxError> {
    let mut stmt = c.prepare_cached(
        "SELECT n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome \
         FROM attempts WHERE job_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        Ok(CallRow {
            n: r.get(0)?,
            api: r.get(1)?,
            started_at: r.get(2)?,
            latency_ms: r.get(3)?,
            http_status: r.get(4)?,
            errcode: r.get(5)?,
            errmsg: r.get(6)?,
            outcome: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

#[derive(Debug, Clone)]
pub struct ActionRow {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// Operator actions on `target` (a bill_no); with `appid`, those on that app's jobs
/// (actions recorded before jobs were keyed per app name no appid: kept).
pub fn actions_on(
    c: &Connection,
    target: &str,
    appid: Option<&str>,
) -> Result<Vec<ActionRow>, OutboxError> {
    let mut stmt = c.prepare(
        "SELECT at, actor, action, target, detail FROM operator_actions WHERE target = ?1 \
         AND (?2 IS NULL OR json_extract(detail, '$.appid') IS NULL OR json_extract(detail, '$.appid') = ?2) \
         ORDER BY id",
    )?;
    let rows = stmt.query_map(params![target, appid], |r| {
        Ok(ActionRow {
            at: r.get(0)?,
            actor: r.get(1)?,
            action: r.get(2)?,
            target: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Record an operator action (`detail`: a JSON object).
pub fn record_action(
    c: &Connection,
    at: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), OutboxError> {
    c.prepare_cached(
        "INSERT INTO operator_actions (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![at, actor, action, target, detail])?;
    Ok(())
}

/// Mark a job's reply targets for re-publishing; with `only_final`, only if the job
/// is final. Returns how many targets.
pub fn requeue_replies(
    c: &Connection,
    job_id: i64,
    only_final: bool,
) -> Result<usize, OutboxError> {
    let sql = if only_final {
        "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = ?1 \
         AND EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND state != 'pending')"
    } else {
        "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = ?1"
    };
    Ok(c.prepare_cached(sql)?.execute(params![job_id])?)
}

/// Re-open a job that ended `unknown` or `failed`: pending, next attempt `now`.
/// `false` when the job is no longer in such a state.
pub fn reopen(c: &Connection, job_id: i64, now: i64) -> Result<bool, OutboxError> {
    let n = c
        .prepare_cached(
            "UPDATE jobs SET state = 'pending', next_attempt_at = ?2, result = NULL, finished_at = NULL, \
             reopened_at = ?2, updated_at = ?2 WHERE id = ?1 AND state IN ('unknown', 'failed')",
        )?
        .execute(params![job_id, now])?;
    Ok(n == 1)
}

/// The numbers of `outbox stats`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub by_state: Vec<(String, i64)>,
    pub by_op: Vec<(String, i64)>,
    /// The oldest pending job: bill_no, op, received_at.
    pub oldest_pending: Option<(String, String, i64)>,
    /// Final jobs per attempt count, by attempt count.
    pub attempts_hist: Vec<(i64, i64)>,
    pub replies_unconfirmed: i64,
    pub replies_awaiting: i64,
    pub replies_returned: i64,
}

/// Read in one snapshot.
pub fn stats(c: &Connection) -> Result<Stats, OutboxError> {
    let tx = c.unchecked_transaction()?;
    let counts = |sql: &str| -> Result<Vec<(String, i64)>, rusqlite::Error> {
        let mut stmt = tx.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.collect()
    };
    let by_state = counts("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    let by_op = counts("SELECT op, COUNT(*) FROM jobs GROUP BY op")?;
    let oldest_pending = tx
        .query_row(
            "SELECT bill_no, op, received_at FROM jobs WHERE state = 'pending' \
             ORDER BY received_at, id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let attempts_hist = {
        let mut stmt = tx.prepare(
            "SELECT attempts, COUNT(*) FROM jobs WHERE state != 'pending' GROUP BY attempts ORDER BY attempts",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let one = |sql: &str| tx.query_row(sql, [], |r| r.get::<_, i64>(0));
    let replies_unconfirmed = one(
        "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
         WHERE t.published_at IS NULL AND j.state != 'pending'",
    )?;
    let replies_awaiting = one(
        "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
         WHERE t.published_at IS NULL AND j.state = 'pending'",
    )?;
    let replies_returned = one("SELECT COUNT(*) FROM reply_targets WHERE returned = 1")?;
    Ok(Stats {
        by_state,
        by_op,
        oldest_pending,
        attempts_hist,
        replies_unconfirmed,
        replies_awaiting,
        replies_returned,
    })
}

const PRUNABLE: &str =
    "state IN ('succeeded', 'failed', 'unknown') AND finished_at IS NOT NULL AND finished_at < ?1";

/// How many final jobs finished before `cutoff` (what `prune` would delete).
pub fn prunable(c: &Connection, cutoff: i64) -> Result<i64, OutboxError> {
    Ok(c.query_row(
        &format!("SELECT COUNT(*) FROM jobs WHERE {PRUNABLE}"),
        params![cutoff],
        |r| r.get(0),
    )?)
}

/// Whether this connection enforces foreign keys (prune relies on the cascades).
pub fn foreign_keys_on(c: &Connection) -> Result<bool, OutboxError> {
    Ok(c.query_row("PRAGMA foreign_keys", [], |r| r.get::<_, i64>(0))? == 1)
}

/// Delete at most `batch` final jobs finished before `cutoff` (their attempts and
/// reply targets go with them), in its own transaction. Returns how many.
pub fn prune_batch(c: &mut Connection, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        &format!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {PRUNABLE} ORDER BY id LIMIT ?2)"
        ),
        params![cutoff, batch],
    )?;
    tx.commit()?;
    Ok(i64::try_from(n).unwrap_or(i64::MAX))
}
