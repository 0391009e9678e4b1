//! The read side of the operator verbs on PostgreSQL: `list`, `show`, `export`,
//! `stats` and what `prune --dry-run` counts. Same rows, order and numbers as
//! [`crate::outbox::operator`] on SQLite; `export` reads through a server-side
//! cursor so memory does not grow with the outbox.

use tokio_postgres::Row;

use super::{filter_sql, refs, PgStore, PgTx};
use crate::outbox::operator::{
    ActionRow, CallRow, ExportRow, JobFilter, JobRow, ListRow, Stats, TargetRow,
};
use crate::outbox::OutboxError;

/// Final jobs finished before `$1` (what `prune` deletes).
pub(super) const PRUNABLE: &str =
    "state IN ('succeeded', 'failed', 'unknown') AND finished_at IS NOT NULL AND finished_at < $1";

/// Rows fetched per round trip by `export`.
const EXPORT_BATCH: i64 = 500;

fn collect<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Vec<T>, OutboxError> {
    Ok(rows.iter().map(f).collect::<Result<Vec<_>, _>>()?)
}

impl PgTx<'_> {
    /// The jobs of `bill_no` (of one app when `appid` is given), in arrival order.
    pub fn jobs_by_bill_no(
        &self,
        bill_no: &str,
        appid: Option<&str>,
    ) -> Result<Vec<JobRow>, OutboxError> {
        self.jobs(&JobFilter {
            bill_no: Some(bill_no.to_string()),
            appid: appid.map(str::to_string),
            ..JobFilter::default()
        })
    }

    pub fn targets_of(&self, job_id: i64) -> Result<Vec<TargetRow>, OutboxError> {
        let rows = self.s.query(
            "SELECT reply_to, correlation_id, added_at, published_at, returned FROM reply_targets \
             WHERE job_id = $1 ORDER BY id",
            &[&job_id],
        )?;
        collect(rows, |r| {
            Ok(TargetRow {
                reply_to: r.try_get(0)?,
                correlation_id: r.try_get(1)?,
                added_at: r.try_get(2)?,
                published_at: r.try_get(3)?,
                returned: r.try_get::<_, i64>(4)? != 0,
            })
        })
    }

    pub fn count_targets(&self, job_id: i64) -> Result<i64, OutboxError> {
        let rows = self.s.query(
            "SELECT COUNT(*) FROM reply_targets WHERE job_id = $1",
            &[&job_id],
        )?;
        Ok(collect(rows, |r| r.try_get::<_, i64>(0))?
            .first()
            .copied()
            .unwrap_or(0))
    }

    pub fn calls_of(&self, job_id: i64) -> Result<Vec<CallRow>, OutboxError> {
        let rows = self.s.query(
            "SELECT n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome \
             FROM attempts WHERE job_id = $1 ORDER BY id",
            &[&job_id],
        )?;
        collect(rows, |r| {
            Ok(CallRow {
                n: r.try_get(0)?,
                api: r.try_get(1)?,
                started_at: r.try_get(2)?,
                latency_ms: r.try_get(3)?,
                http_status: r.try_get(4)?,
                errcode: r.try_get(5)?,
                errmsg: r.try_get(6)?,
                outcome: r.try_get(7)?,
            })
        })
    }

    /// As [`crate::outbox::operator::actions_on`] (`detail` read as `jsonb`).
    pub fn actions_on(
        &self,
        target: &str,
        appid: Option<&str>,
    ) -> Result<Vec<ActionRow>, OutboxError> {
        let rows = self.s.query(
            "SELECT at, actor, action, target, detail FROM operator_actions WHERE target = $1 \
             AND ($2::text IS NULL OR detail::jsonb ->> 'appid' IS NULL OR detail::jsonb ->> 'appid' = $2) \
             ORDER BY id",
            &[&target, &appid],
        )?;
        collect(rows, |r| {
            Ok(ActionRow {
                at: r.try_get(0)?,
                actor: r.try_get(1)?,
                action: r.try_get(2)?,
                target: r.try_get(3)?,
                detail: r.try_get(4)?,
            })
        })
    }
}

impl PgStore {
    /// The newest jobs first, at most `limit` (`None`: all).
    pub fn list(&self, f: &JobFilter, limit: Option<u32>) -> Result<Vec<ListRow>, OutboxError> {
        let (filter, mut args) = filter_sql(f, 0);
        let n = args.len() + 1;
        args.push(Box::new(limit.map(i64::from)));
        let rows = self.query(
            &format!(
                "SELECT j.id, j.received_at, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, \
                 j.last_errcode, j.last_error, j.finished_at, \
                 (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id), \
                 (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.published_at IS NOT NULL), \
                 (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.returned = 1) \
                 FROM jobs j{filter} ORDER BY j.id DESC LIMIT ${n}"
            ),
            &refs(&args),
        )?;
        collect(rows, |r| {
            Ok(ListRow {
                id: r.try_get(0)?,
                received_at: r.try_get(1)?,
                op: r.try_get(2)?,
                bill_no: r.try_get(3)?,
                appid: r.try_get(4)?,
                openid: r.try_get(5)?,
                state: r.try_get(6)?,
                attempts: r.try_get(7)?,
                last_errcode: r.try_get(8)?,
                last_error: r.try_get(9)?,
                finished_at: r.try_get(10)?,
                replies: r.try_get(11)?,
                confirmed: r.try_get(12)?,
                returned: r.try_get(13)?,
            })
        })
    }

    /// As [`crate::outbox::operator::count`].
    pub fn count(&self, f: &JobFilter) -> Result<i64, OutboxError> {
        let (filter, args) = filter_sql(f, 0);
        let rows = self.query(
            &format!("SELECT COUNT(*) FROM jobs j{filter}"),
            &refs(&args),
        )?;
        Ok(collect(rows, |r| r.try_get::<_, i64>(0))?
            .first()
            .copied()
            .unwrap_or(0))
    }

    /// As [`crate::outbox::operator::timeline`].
    pub fn timeline(
        &self,
        since: i64,
        bucket_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>, OutboxError> {
        let rows = self.query(
            "SELECT (received_at - $1) / $2 AS b, state, COUNT(*) FROM jobs \
             WHERE received_at >= $1 GROUP BY b, state ORDER BY b",
            &[&since, &bucket_ms.max(1)],
        )?;
        collect(rows, |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    }

    /// Every job the filter selects, oldest first, handed to `each` row by row
    /// (fetched from a cursor [`EXPORT_BATCH`] at a time, in one snapshot).
    pub fn export_each<E: From<OutboxError>>(
        &self,
        f: &JobFilter,
        mut each: impl FnMut(ExportRow) -> Result<(), E>,
    ) -> Result<(), E> {
        let tx = self.begin(false)?;
        let (filter, args) = filter_sql(f, 0);
        self.execute(
            &format!(
                "DECLARE midas_export NO SCROLL CURSOR FOR \
                 SELECT j.id, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, j.last_errcode, \
                 j.last_error, j.received_at, j.finished_at, j.request, j.result FROM jobs j{filter} ORDER BY j.id"
            ),
            &refs(&args),
        )?;
        loop {
            let rows = self.query(&format!("FETCH {EXPORT_BATCH} FROM midas_export"), &[])?;
            let batch = collect(rows, |r| {
                Ok(ExportRow {
                    id: r.try_get(0)?,
                    op: r.try_get(1)?,
                    bill_no: r.try_get(2)?,
                    appid: r.try_get(3)?,
                    openid: r.try_get(4)?,
                    state: r.try_get(5)?,
                    attempts: r.try_get(6)?,
                    last_errcode: r.try_get(7)?,
                    last_error: r.try_get(8)?,
                    received_at: r.try_get(9)?,
                    finished_at: r.try_get(10)?,
                    request: r.try_get(11)?,
                    result: r.try_get(12)?,
                })
            })?;
            let done = (batch.len() as i64) < EXPORT_BATCH;
            for row in batch {
                each(row)?;
            }
            if done {
                break;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The numbers of `outbox stats`, read in one snapshot.
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        let tx = self.begin(false)?;
        let pairs = |sql: &str| -> Result<Vec<(String, i64)>, OutboxError> {
            collect(self.query(sql, &[])?, |r| {
                Ok((r.try_get(0)?, r.try_get(1)?))
            })
        };
        let one = |sql: &str| -> Result<i64, OutboxError> {
            Ok(collect(self.query(sql, &[])?, |r| r.try_get::<_, i64>(0))?
                .first()
                .copied()
                .unwrap_or(0))
        };
        let by_state = pairs("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let by_op = pairs("SELECT op, COUNT(*) FROM jobs GROUP BY op")?;
        let oldest_pending = collect(
            self.query(
                "SELECT bill_no, op, received_at FROM jobs WHERE state = 'pending' \
                 ORDER BY received_at, id LIMIT 1",
                &[],
            )?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        )?
        .into_iter()
        .next();
        let attempts_hist = collect(
            self.query(
                "SELECT attempts, COUNT(*) FROM jobs WHERE state <> 'pending' GROUP BY attempts ORDER BY attempts",
                &[],
            )?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )?;
        let replies_unconfirmed = one(
            "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE t.published_at IS NULL AND j.state <> 'pending'",
        )?;
        let replies_awaiting = one(
            "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE t.published_at IS NULL AND j.state = 'pending'",
        )?;
        let replies_returned = one("SELECT COUNT(*) FROM reply_targets WHERE returned = 1")?;
        tx.commit()?;
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

    /// How many final jobs finished before `cutoff` (what `prune` would delete).
    pub fn prunable(&self, cutoff: i64) -> Result<i64, OutboxError> {
        let rows = self.query(
            &format!("SELECT COUNT(*) FROM jobs WHERE {PRUNABLE}"),
            &[&cutoff],
        )?;
        Ok(collect(rows, |r| r.try_get::<_, i64>(0))?
            .first()
            .copied()
            .unwrap_or(0))
    }
}
