//! The operator verbs against the PostgreSQL outbox: the same operations, rows and
//! re-checks as [`crate::outbox::operator`] does on SQLite, in PostgreSQL's dialect.
//!
//! The verbs are synchronous, so [`PgStore`] owns a current-thread tokio runtime
//! and drives tokio-postgres on it. Not the `postgres` crate (the blocking wrapper):
//! that would be a second dependency with its own connect path, while a runtime
//! here reuses [`super::connect`] (TLS per `sslmode`, connect timeout, application
//! name) exactly as the worker connects. Called from inside another runtime (the
//! tests are `#[tokio::test]`), each blocking step runs on a scoped thread of its
//! own, since a runtime cannot be entered from inside another.
//!
//! Transactions are plain `BEGIN`/`COMMIT` on the one connection ([`PgTx`]; rolled
//! back when dropped uncommitted). Reads run in one `REPEATABLE READ READ ONLY`
//! snapshot; writes run `READ COMMITTED` and lock the jobs they act on with
//! `SELECT … FOR UPDATE` before re-checking their state, as the SQLite verbs
//! re-check inside an `IMMEDIATE` transaction. A re-opened job also gets
//! `claimed_by = NULL`: that is how the worker holding the player's lease notices
//! it (its coordinator loads pending jobs of its players that nobody claims).

mod read;

use std::future::Future;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::outbox::operator::{JobFilter, JobRow};
use crate::outbox::OutboxError;
use crate::secret::SecretUrl;

/// A parameter of a built query.
pub(crate) type Arg = Box<dyn ToSql + Sync + Send>;

/// A current-thread runtime that may be dropped anywhere: inside another runtime
/// (the tests) a plain drop would panic, so it is shut down in the background.
struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    fn new() -> Result<Rt, OutboxError> {
        Ok(Rt(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        )))
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One operator connection to a PostgreSQL outbox.
pub struct PgStore {
    rt: Rt,
    client: Client,
    url: SecretUrl,
}

impl PgStore {
    /// Connect to an existing outbox: fails with [`OutboxError::Missing`] (naming
    /// the URL, password masked) when the database has no outbox schema. With
    /// `write`, the schema is also brought up to date (idempotent), as the SQLite
    /// write path does.
    pub fn connect(url: &SecretUrl, write: bool) -> Result<PgStore, OutboxError> {
        let rt = Rt::new()?;
        let client = block(&rt, super::connect(url))?;
        let mut s = PgStore {
            rt,
            client,
            url: url.clone(),
        };
        let present: bool = s
            .block(s.client.query_one(
                "SELECT to_regclass('jobs') IS NOT NULL AND to_regclass('operator_actions') IS NOT NULL",
                &[],
            ))?
            .try_get(0)?;
        if !present {
            return Err(OutboxError::Missing { path: url.masked() });
        }
        if write {
            let PgStore { rt, client, .. } = &mut s;
            block(rt, super::prepare(client))?;
        }
        Ok(s)
    }

    /// Connect and apply the schema (creating the tables in an empty database):
    /// the target of `outbox migrate`.
    pub fn open(url: &SecretUrl) -> Result<PgStore, OutboxError> {
        let rt = Rt::new()?;
        let client = block(&rt, super::open(url))?;
        Ok(PgStore {
            rt,
            client,
            url: url.clone(),
        })
    }

    /// The URL, for messages (its `Display` masks the password).
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// Run `f` to completion on this store's runtime.
    pub(crate) fn block<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        block(&self.rt, f)
    }

    /// Begin a read snapshot (`write == false`) or a write transaction.
    pub fn begin(&self, write: bool) -> Result<PgTx<'_>, OutboxError> {
        let sql = if write {
            "BEGIN ISOLATION LEVEL READ COMMITTED"
        } else {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        };
        self.block(self.client.batch_execute(sql))?;
        Ok(PgTx {
            s: self,
            write,
            open: true,
        })
    }

    /// Run one statement in its own transaction; rows affected.
    pub(crate) fn execute(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, OutboxError> {
        Ok(self.block(self.client.execute(sql, args))?)
    }

    pub(crate) fn query(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, OutboxError> {
        Ok(self.block(self.client.query(sql, args))?)
    }

    /// Record an operator action in a transaction of its own (`prune`).
    pub fn record_action(
        &self,
        at: i64,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OutboxError> {
        self.execute(
            "INSERT INTO operator_actions (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
            &[&at, &actor, &action, &target, &detail],
        )?;
        Ok(())
    }

    /// As [`crate::outbox::operator::prune_batch`]: at most `batch` final jobs
    /// finished before `cutoff`, with their attempts and reply targets (the
    /// foreign keys cascade; PostgreSQL always enforces them).
    pub fn prune_batch(&self, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
        let n = self.execute(
            &format!(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {} ORDER BY id LIMIT $2)",
                read::PRUNABLE
            ),
            &[&cutoff, &batch],
        )?;
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// `rt.block_on(f)`, from a thread of its own when this thread is inside a runtime.
fn block<F>(rt: &Rt, f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let Some(rt) = rt.0.as_ref() else {
        unreachable!("the runtime is only taken when the store is dropped")
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// An open transaction on a [`PgStore`]; rolled back unless committed.
pub struct PgTx<'a> {
    s: &'a PgStore,
    write: bool,
    open: bool,
}

impl<'a> PgTx<'a> {
    pub fn commit(mut self) -> Result<(), OutboxError> {
        self.open = false;
        self.s.block(self.s.client.batch_execute("COMMIT"))?;
        Ok(())
    }

    /// ` FOR UPDATE` in a write transaction: the rows read are the rows changed.
    fn lock(&self) -> &'static str {
        if self.write {
            " FOR UPDATE"
        } else {
            ""
        }
    }

    /// Every job the filter selects, oldest first (locked in a write transaction).
    pub fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRow>, OutboxError> {
        let (filter, args) = filter_sql(f, 0);
        let sql = format!(
            "SELECT {} FROM jobs j{filter} ORDER BY j.id{}",
            crate::outbox::operator::JOB_COLS,
            self.lock()
        );
        self.s
            .query(&sql, &refs(&args))?
            .iter()
            .map(job_row)
            .collect()
    }

    /// Record an operator action (in this transaction).
    pub fn record_action(
        &self,
        at: i64,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OutboxError> {
        self.s.record_action(at, actor, action, target, detail)
    }

    /// As [`crate::outbox::operator::requeue_replies`].
    pub fn requeue_replies(&self, job_id: i64, only_final: bool) -> Result<usize, OutboxError> {
        let sql = if only_final {
            "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = $1 \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state <> 'pending')"
        } else {
            "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = $1"
        };
        let n = self.s.execute(sql, &[&job_id])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// As [`crate::outbox::operator::reopen`], and `claimed_by = NULL`: no worker
    /// holds the re-opened job, so the holder of the player's lease loads it.
    pub fn reopen(&self, job_id: i64, now: i64) -> Result<bool, OutboxError> {
        let n = self.s.execute(
            "UPDATE jobs SET state = 'pending', next_attempt_at = $2, result = NULL, finished_at = NULL, \
             reopened_at = $2, updated_at = $2, claimed_by = NULL \
             WHERE id = $1 AND state IN ('unknown', 'failed')",
            &[&job_id, &now],
        )?;
        Ok(n == 1)
    }
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // Best effort: a connection that cannot roll back is closed with the
            // store, and the server rolls the transaction back then.
            if let Err(e) = self.s.block(self.s.client.batch_execute("ROLLBACK")) {
                tracing::debug!(error = %e, "PostgreSQL operator rollback failed");
            }
        }
    }
}

/// The `WHERE` clause (on `jobs j`) of a filter, numbering parameters after `first`.
pub(crate) fn filter_sql(f: &JobFilter, first: usize) -> (String, Vec<Arg>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Arg> = Vec::new();
    let mut push = |clause: &str, arg: Arg| {
        args.push(arg);
        clauses.push(clause.replace('?', &format!("${}", first + args.len())));
    };
    if let Some(b) = &f.bill_no {
        push("j.bill_no = ?", Box::new(b.clone()));
    }
    if let Some(p) = &f.bill_no_prefix {
        // starts_with, not LIKE: `_` and `%` in a prefix are plain characters
        push("starts_with(j.bill_no, ?)", Box::new(p.clone()));
    }
    for (clause, v) in [
        ("j.state = ?", &f.status),
        ("j.op = ?", &f.op),
        ("j.openid = ?", &f.openid),
        ("j.appid = ?", &f.appid),
    ] {
        if let Some(v) = v {
            push(clause, Box::new(v.clone()));
        }
    }
    for (clause, v) in [
        ("j.last_errcode = ?", f.errcode),
        ("j.received_at >= ?", f.since),
        ("j.received_at < ?", f.until),
        ("j.id < ?", f.before_id),
    ] {
        if let Some(v) = v {
            push(clause, Box::new(v));
        }
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    (sql, args)
}

pub(crate) fn refs(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// A row of [`crate::outbox::operator::JOB_COLS`].
pub(crate) fn job_row(r: &Row) -> Result<JobRow, OutboxError> {
    Ok(JobRow {
        id: r.try_get(0)?,
        op: r.try_get(1)?,
        bill_no: r.try_get(2)?,
        appid: r.try_get(3)?,
        openid: r.try_get(4)?,
        request: r.try_get(5)?,
        state: r.try_get(6)?,
        attempts: r.try_get(7)?,
        next_attempt_at: r.try_get(8)?,
        first_attempt_at: r.try_get(9)?,
        last_errcode: r.try_get(10)?,
        last_error: r.try_get(11)?,
        result: r.try_get(12)?,
        received_at: r.try_get(13)?,
        updated_at: r.try_get(14)?,
        finished_at: r.try_get(15)?,
    })
}
