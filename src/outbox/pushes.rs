//! Pushes in the SQLite outbox: the statements behind storing a verified push
//! once per (appid, kind, dedup key), finding events the broker has not
//! confirmed, marking them confirmed, the operator's reads, and `prune`. The row types are
//! shared with the PostgreSQL outbox ([`super::postgres::pushes`]).
//!
//! Reads tolerate a file whose `pushes` table does not exist yet (a file written
//! by a release before pushes, opened read-only before any worker upgraded it):
//! it simply has no pushes.

use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::OutboxError;

/// A verified push to store.
#[derive(Debug, Clone)]
pub struct NewPush {
    pub appid: String,
    /// `coins_delivered`, `goods_delivered` or `refunded`.
    pub kind: &'static str,
    pub dedup_key: String,
    pub event: String,
    pub event_id: String,
    pub openid: Option<String>,
    pub out_trade_no: Option<String>,
    pub env: i64,
    /// The events-queue message.
    pub message: String,
    pub now: i64,
}

/// What storing a push came to (durable when answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushStored {
    /// First receipt: a new row, its event to publish.
    New { id: i64 },
    /// A repeat of a stored push: counted, no new event. `published`: the broker
    /// has confirmed its event already.
    Repeat { id: i64, published: bool },
}

/// An event the broker has not confirmed yet.
#[derive(Debug, Clone)]
pub struct UnpublishedEvent {
    pub id: i64,
    pub event_id: String,
    pub message: Arc<[u8]>,
}

/// A push as the operator verbs show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushRow {
    pub id: i64,
    pub appid: String,
    pub kind: String,
    pub dedup_key: String,
    pub event: String,
    pub event_id: String,
    pub openid: Option<String>,
    pub out_trade_no: Option<String>,
    pub env: i64,
    pub received_at: i64,
    pub last_received_at: i64,
    pub repeats: i64,
    pub published_at: Option<i64>,
    pub message: String,
}

/// Which pushes: every field set narrows the set.
#[derive(Debug, Clone, Default)]
pub struct PushFilter {
    pub appid: Option<String>,
    pub kind: Option<String>,
    pub openid: Option<String>,
    /// OutTradeNo or RefundId.
    pub key: Option<String>,
    /// Received at or after (unix ms).
    pub since: Option<i64>,
    /// Received before (unix ms).
    pub until: Option<i64>,
    /// Only pushes whose event is not confirmed yet.
    pub unpublished: bool,
    /// Only pushes stored before this one (by id): the console's page cursor.
    pub before_id: Option<i64>,
}

/// Push counts for `outbox stats`: (kind, published, count).
pub type PushCounts = Vec<(String, bool, i64)>;

pub(crate) const PUSH_COLS: &str = "id, appid, kind, dedup_key, event, event_id, openid, \
     out_trade_no, env, received_at, last_received_at, repeats, published_at, message";

impl PushFilter {
    /// `WHERE` clause with `?` placeholders, and its arguments (as text or integers).
    pub(crate) fn clauses(&self) -> (Vec<&'static str>, Vec<Value>) {
        let mut c = Vec::new();
        let mut a = Vec::new();
        for (clause, v) in [
            ("appid = ?", &self.appid),
            ("kind = ?", &self.kind),
            ("openid = ?", &self.openid),
        ] {
            if let Some(v) = v {
                c.push(clause);
                a.push(Value::Text(v.clone()));
            }
        }
        if let Some(k) = &self.key {
            c.push("(dedup_key = ? OR out_trade_no = ?)");
            a.push(Value::Text(k.clone()));
            a.push(Value::Text(k.clone()));
        }
        for (clause, v) in [
            ("received_at >= ?", self.since),
            ("received_at < ?", self.until),
            ("id < ?", self.before_id),
        ] {
            if let Some(v) = v {
                c.push(clause);
                a.push(Value::Integer(v));
            }
        }
        if self.unpublished {
            c.push("published_at IS NULL");
        }
        (c, a)
    }
}

/// Store `p` (in the writer's savepoint).
pub(super) fn store(c: &Connection, p: &NewPush) -> Result<PushStored, OutboxError> {
    let inserted = c
        .prepare_cached(
            "INSERT INTO pushes (appid, kind, dedup_key, event, event_id, openid, out_trade_no, env, \
             message, received_at, last_received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10) \
             ON CONFLICT (appid, kind, dedup_key) DO NOTHING",
        )?
        .execute(params![
            p.appid,
            p.kind,
            p.dedup_key,
            p.event,
            p.event_id,
            p.openid,
            p.out_trade_no,
            p.env,
            p.message,
            p.now
        ])?;
    if inserted == 1 {
        return Ok(PushStored::New {
            id: c.last_insert_rowid(),
        });
    }
    let (id, published): (i64, Option<i64>) = c
        .prepare_cached(
            "UPDATE pushes SET repeats = repeats + 1, last_received_at = ?4 \
             WHERE appid = ?1 AND kind = ?2 AND dedup_key = ?3 RETURNING id, published_at",
        )?
        .query_row(params![p.appid, p.kind, p.dedup_key, p.now], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok(PushStored::Repeat {
        id,
        published: published.is_some(),
    })
}

/// Mark events confirmed by the broker.
pub(super) fn mark_published(c: &Connection, ids: &[i64], now: i64) -> Result<(), OutboxError> {
    let mut st = c.prepare_cached(
        "UPDATE pushes SET published_at = ?1 WHERE id = ?2 AND published_at IS NULL",
    )?;
    for id in ids {
        st.execute(params![now, id])?;
    }
    Ok(())
}

fn has_pushes(c: &Connection) -> Result<bool, OutboxError> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pushes')",
        [],
        |r| r.get(0),
    )?)
}

/// Events not confirmed yet, oldest first, at most `limit`, of pushes received
/// before `before` (unix ms).
pub(super) fn unpublished(
    c: &Connection,
    limit: i64,
    before: i64,
) -> Result<Vec<UnpublishedEvent>, OutboxError> {
    let mut st = c.prepare_cached(
        "SELECT id, event_id, message FROM pushes WHERE published_at IS NULL AND received_at < ?1 \
         ORDER BY id LIMIT ?2",
    )?;
    let rows = st.query_map(params![before, limit], |r| {
        Ok(UnpublishedEvent {
            id: r.get(0)?,
            event_id: r.get(1)?,
            message: Arc::from(r.get::<_, String>(2)?.into_bytes()),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn push_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PushRow> {
    Ok(PushRow {
        id: r.get(0)?,
        appid: r.get(1)?,
        kind: r.get(2)?,
        dedup_key: r.get(3)?,
        event: r.get(4)?,
        event_id: r.get(5)?,
        openid: r.get(6)?,
        out_trade_no: r.get(7)?,
        env: r.get(8)?,
        received_at: r.get(9)?,
        last_received_at: r.get(10)?,
        repeats: r.get(11)?,
        published_at: r.get(12)?,
        message: r.get(13)?,
    })
}

/// The pushes `f` selects, newest first (`newest_first`) or oldest first, at most
/// `limit` (`None`: all).
pub fn list(
    c: &Connection,
    f: &PushFilter,
    limit: Option<u32>,
    newest_first: bool,
) -> Result<Vec<PushRow>, OutboxError> {
    if !has_pushes(c)? {
        return Ok(Vec::new());
    }
    let (clauses, mut args) = f.clauses();
    let mut sql = format!("SELECT {PUSH_COLS} FROM pushes");
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    sql.push_str(if newest_first {
        " ORDER BY id DESC"
    } else {
        " ORDER BY id"
    });
    if let Some(l) = limit {
        sql.push_str(" LIMIT ?");
        args.push(Value::Integer(i64::from(l)));
    }
    let mut st = c.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), push_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One push by id.
pub fn by_id(c: &Connection, id: i64) -> Result<Option<PushRow>, OutboxError> {
    if !has_pushes(c)? {
        return Ok(None);
    }
    Ok(c.query_row(
        &format!("SELECT {PUSH_COLS} FROM pushes WHERE id = ?1"),
        [id],
        push_row,
    )
    .optional()?)
}

/// Counts by kind and whether the event is confirmed.
pub fn counts(c: &Connection) -> Result<PushCounts, OutboxError> {
    if !has_pushes(c)? {
        return Ok(Vec::new());
    }
    let mut st = c.prepare(
        "SELECT kind, published_at IS NOT NULL, COUNT(*) FROM pushes GROUP BY 1, 2 ORDER BY 1, 2",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Pushes `outbox prune` deletes (`?1`: the cutoff): the broker confirmed their
/// event, and WeChat last sent them before the cutoff. An unconfirmed event is
/// never pruned, however old: it is still to be published.
pub(crate) const PRUNABLE: &str = "published_at IS NOT NULL AND last_received_at < ?1";

/// How many pushes `prune` would delete at `cutoff`.
pub fn prunable(c: &Connection, cutoff: i64) -> Result<i64, OutboxError> {
    if !has_pushes(c)? {
        return Ok(0);
    }
    Ok(c.query_row(
        &format!("SELECT COUNT(*) FROM pushes WHERE {PRUNABLE}"),
        params![cutoff],
        |r| r.get(0),
    )?)
}

/// Delete at most `batch` prunable pushes, in a transaction of its own. Returns
/// how many.
pub fn prune_batch(c: &mut Connection, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
    if !has_pushes(c)? {
        return Ok(0);
    }
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        &format!(
            "DELETE FROM pushes WHERE id IN (SELECT id FROM pushes WHERE {PRUNABLE} ORDER BY id LIMIT ?2)"
        ),
        params![cutoff, batch],
    )?;
    tx.commit()?;
    Ok(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cursor_lists_the_pushes_stored_before_it() {
        let mut c = Connection::open_in_memory().expect("memory");
        super::super::schema::prepare(&mut c).expect("schema");
        for i in 0..5 {
            let p = NewPush {
                appid: "wx1".into(),
                kind: "goods_delivered",
                dedup_key: format!("T{i}"),
                event: "minigame_game_pay_goods_deliver_notify".into(),
                event_id: format!("evt_{i}"),
                openid: Some("o".into()),
                out_trade_no: Some(format!("T{i}")),
                env: 0,
                message: "{}".into(),
                now: 1000 + i,
            };
            store(&c, &p).expect("stored");
        }
        let keys = |f: &PushFilter| -> Vec<String> {
            list(&c, f, Some(2), true)
                .expect("list")
                .into_iter()
                .map(|r| r.dedup_key)
                .collect()
        };
        let mut f = PushFilter::default();
        assert_eq!(keys(&f), ["T4", "T3"]);
        f.before_id = list(&c, &f, Some(2), true)
            .expect("list")
            .last()
            .map(|r| r.id);
        assert_eq!(keys(&f), ["T2", "T1"], "the next page");
    }
}
