//! Read-side queries shared by the worker (start-up load, reply relay) and the
//! operator CLI. Each runs on its own connection; WAL keeps them off the writer's way.

use rusqlite::{params, Connection};
use std::sync::Arc;

use super::writer::{decode_params, OutgoingReply};
use super::OutboxError;
use crate::job::Job;
use crate::secret::Secret;

/// Every non-final job with id above `after`, in arrival order.
pub fn pending_jobs(c: &Connection, after: i64) -> Result<Vec<Job>, OutboxError> {
    load_jobs(c, "state = 'pending' AND id > ?1", after)
}

fn load_jobs(c: &Connection, filter: &str, arg: i64) -> Result<Vec<Job>, OutboxError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT id, request, session_key, attempts, first_attempt_at, next_attempt_at, received_at, \
         last_errcode, last_error, reopened_at, calls, uncertain FROM jobs WHERE {filter} ORDER BY id"
    ))?;
    let rows = stmt.query_map(params![arg], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, Option<i64>>(7)?,
            r.get::<_, Option<String>>(8)?,
            r.get::<_, Option<i64>>(9)?,
            r.get::<_, i64>(10)?,
            r.get::<_, i64>(11)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (
            id,
            request,
            sk,
            attempts,
            first,
            next,
            received,
            last_errcode,
            last_error,
            reopened_at,
            calls,
            uncertain,
        ) = row?;
        out.push(Job {
            id,
            params: decode_params(&request)?,
            session_key: sk.map(Secret::new),
            attempts: attempts.max(0) as u32,
            calls: calls.max(0) as u32,
            uncertain: uncertain != 0,
            token_retries: 0,
            first_attempt_at: first,
            next_attempt_at: next,
            received_at: received,
            last_errcode,
            last_error,
            reopened_at,
            lease_gen: 0,
        });
    }
    Ok(out)
}

/// Reply targets of final jobs whose reply is not confirmed yet, added and
/// finished before `before` (unix ms): a fresher one is still with its owner, which
/// publishes it right after the commit (relaying it too would send it twice).
pub fn unpublished_replies(
    c: &Connection,
    limit: usize,
    before: i64,
) -> Result<Vec<OutgoingReply>, OutboxError> {
    unpublished_replies_after(c, 0, limit, before)
}

/// [`unpublished_replies`] from reply target `after` on (see [`RelayCursor`]).
pub fn unpublished_replies_after(
    c: &Connection,
    after: i64,
    limit: usize,
    before: i64,
) -> Result<Vec<OutgoingReply>, OutboxError> {
    let mut stmt = c.prepare_cached(
        "SELECT t.id, t.reply_to, t.correlation_id, j.result FROM reply_targets t \
         JOIN jobs j ON j.id = t.job_id \
         WHERE t.published_at IS NULL AND j.result IS NOT NULL \
         AND t.added_at < ?2 AND COALESCE(j.finished_at, 0) < ?2 AND t.id > ?3 \
         ORDER BY t.id LIMIT ?1",
    )?;
    let rows = stmt.query_map(params![limit as i64, before, after], |r| {
        Ok(OutgoingReply {
            target_id: Some(r.get(0)?),
            reply_to: r.get(1)?,
            correlation_id: r.get(2)?,
            payload: Arc::from(r.get::<_, String>(3)?.into_bytes()),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Where the reply relay reads next. Each pass reads a bounded page of
/// unconfirmed replies after the last one it read, and starts again from the
/// first once a page comes back short: replies the broker refuses for ever (a
/// nacking queue) cannot hide the ones after them, however many there are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayCursor {
    pub after: i64,
}

impl RelayCursor {
    /// Move on past a page of `limit` asked for.
    pub fn advance(&mut self, page: &[OutgoingReply], limit: usize) {
        self.after = match page.last().and_then(|r| r.target_id) {
            Some(last) if page.len() >= limit => last,
            _ => 0,
        };
    }
}

/// The newest operator action id (the worker reloads pending jobs when it moves).
pub fn last_operator_action(c: &Connection) -> Result<i64, OutboxError> {
    Ok(c.query_row(
        "SELECT COALESCE(MAX(id), 0) FROM operator_actions",
        [],
        |r| r.get(0),
    )?)
}

/// Counts of jobs by state, the oldest pending job's received_at, and replies pending.
pub struct Gauges {
    pub by_state: Vec<(String, i64)>,
    pub oldest_pending_ms: Option<i64>,
    pub replies_pending: i64,
}

pub fn gauges(c: &Connection) -> Result<Gauges, OutboxError> {
    let mut stmt = c.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    let by_state = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let oldest_pending_ms = c.query_row(
        "SELECT MIN(received_at) FROM jobs WHERE state = 'pending'",
        [],
        |r| r.get::<_, Option<i64>>(0),
    )?;
    let replies_pending = c.query_row(
        "SELECT COUNT(*) FROM reply_targets WHERE published_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    Ok(Gauges {
        by_state,
        oldest_pending_ms,
        replies_pending,
    })
}

/// Pending jobs re-opened by an operator `retry` recorded after action `after`.
pub fn reopened_jobs(c: &Connection, after: i64) -> Result<Vec<Job>, OutboxError> {
    let ids: Vec<i64> = c
        .prepare_cached(
            "SELECT DISTINCT j.id FROM operator_actions a \
             JOIN jobs j ON j.id = json_extract(a.detail, '$.job_id') \
             WHERE a.id > ?1 AND a.action = 'retry' AND j.state = 'pending' ORDER BY j.id",
        )?
        .query_map(params![after], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for id in ids {
        out.extend(load_jobs(c, "state = 'pending' AND id = ?1", id)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(ids: std::ops::RangeInclusive<i64>) -> Vec<OutgoingReply> {
        ids.map(|id| OutgoingReply {
            target_id: Some(id),
            reply_to: "q".into(),
            correlation_id: id.to_string(),
            payload: Arc::from(&b"{}"[..]),
        })
        .collect()
    }

    /// Defect 5: a full page of replies the broker refuses for ever must not hide
    /// the ones after it: the next pass reads on from where this one stopped, and
    /// a short page starts again from the first.
    #[test]
    fn the_relay_reads_on_past_a_full_page_and_wraps_after_a_short_one() {
        let mut c = RelayCursor::default();
        c.advance(&page(1..=3), 3);
        assert_eq!(c.after, 3);
        c.advance(&page(4..=5), 3);
        assert_eq!(c.after, 0);
        c.advance(&[], 3);
        assert_eq!(c.after, 0);
    }
}
