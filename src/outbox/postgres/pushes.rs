//! Pushes in the PostgreSQL outbox: the same operations as
//! [`crate::outbox::pushes`] on SQLite, for the writer (store once, mark
//! confirmed, find unconfirmed) and for the operator verbs (list, one push,
//! counts, prune). Two workers storing the same push at once: `ON CONFLICT DO NOTHING`
//! waits for the first to commit, and the second counts a repeat.

use std::sync::Arc;

use tokio_postgres::{Client, Row, Transaction};

use super::ops::{refs, Arg, PgStore};
use super::writer::Stmts;

/// Pushes `outbox prune` deletes (`$1`: the cutoff), as on SQLite
/// ([`crate::outbox::pushes::PRUNABLE`]).
const PRUNABLE: &str = "published_at IS NOT NULL AND last_received_at < $1";
use crate::outbox::pushes::{
    NewPush, PushCounts, PushFilter, PushRow, PushStored, UnpublishedEvent, PUSH_COLS,
};
use crate::outbox::OutboxError;

pub(super) async fn store(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    p: &NewPush,
) -> Result<PushStored, OutboxError> {
    let ins = stmts
        .get(
            tx,
            "INSERT INTO pushes (appid, kind, dedup_key, event, event_id, openid, out_trade_no, env, \
             message, received_at, last_received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
             ON CONFLICT (appid, kind, dedup_key) DO NOTHING RETURNING id",
        )
        .await?;
    let kind: &str = p.kind;
    super::trip();
    let rows = tx
        .query(
            &ins,
            &[
                &p.appid,
                &kind,
                &p.dedup_key,
                &p.event,
                &p.event_id,
                &p.openid,
                &p.out_trade_no,
                &p.env,
                &p.message,
                &p.now,
            ],
        )
        .await?;
    if let Some(r) = rows.first() {
        return Ok(PushStored::New { id: r.try_get(0)? });
    }
    let upd = stmts
        .get(
            tx,
            "UPDATE pushes SET repeats = repeats + 1, last_received_at = $4 \
             WHERE appid = $1 AND kind = $2 AND dedup_key = $3 RETURNING id, published_at",
        )
        .await?;
    super::trip();
    let r = tx
        .query_one(&upd, &[&p.appid, &kind, &p.dedup_key, &p.now])
        .await?;
    Ok(PushStored::Repeat {
        id: r.try_get(0)?,
        published: r.try_get::<_, Option<i64>>(1)?.is_some(),
    })
}

pub(super) async fn mark_published(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    ids: &[i64],
    now: i64,
) -> Result<(), OutboxError> {
    let st = stmts
        .get(
            tx,
            "UPDATE pushes SET published_at = $1 WHERE id = ANY($2::bigint[]) AND published_at IS NULL",
        )
        .await?;
    super::trip();
    tx.execute(&st, &[&now, &ids]).await?;
    Ok(())
}

/// Unconfirmed events of pushes received before `before`, oldest first (committed
/// rows only: run outside the writer's batch transaction).
pub(super) async fn unpublished(
    c: &Client,
    limit: i64,
    before: i64,
) -> Result<Vec<UnpublishedEvent>, OutboxError> {
    super::trip();
    let rows = c
        .query(
            "SELECT id, event_id, message FROM pushes WHERE published_at IS NULL AND received_at < $1 \
             ORDER BY id LIMIT $2",
            &[&before, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(UnpublishedEvent {
                id: r.try_get(0)?,
                event_id: r.try_get(1)?,
                message: Arc::from(r.try_get::<_, String>(2)?.into_bytes()),
            })
        })
        .collect()
}

fn push_row(r: &Row) -> Result<PushRow, OutboxError> {
    Ok(PushRow {
        id: r.try_get(0)?,
        appid: r.try_get(1)?,
        kind: r.try_get(2)?,
        dedup_key: r.try_get(3)?,
        event: r.try_get(4)?,
        event_id: r.try_get(5)?,
        openid: r.try_get(6)?,
        out_trade_no: r.try_get(7)?,
        env: r.try_get(8)?,
        received_at: r.try_get(9)?,
        last_received_at: r.try_get(10)?,
        repeats: r.try_get(11)?,
        published_at: r.try_get(12)?,
        message: r.try_get(13)?,
    })
}

impl PgStore {
    fn has_pushes(&self) -> Result<bool, OutboxError> {
        let rows = self.query("SELECT to_regclass('pushes') IS NOT NULL", &[])?;
        Ok(match rows.first() {
            Some(r) => r.try_get(0)?,
            None => false,
        })
    }

    /// As [`crate::outbox::pushes::list`].
    pub fn pushes(
        &self,
        f: &PushFilter,
        limit: Option<u32>,
        newest_first: bool,
    ) -> Result<Vec<PushRow>, OutboxError> {
        if !self.has_pushes()? {
            return Ok(Vec::new());
        }
        let (clauses, values) = f.clauses();
        let mut args: Vec<Arg> = Vec::new();
        for v in values {
            match v {
                rusqlite::types::Value::Integer(i) => args.push(Box::new(i)),
                rusqlite::types::Value::Text(t) => args.push(Box::new(t)),
                _ => {}
            }
        }
        // `?` placeholders to `$n`
        let mut n = 0;
        let mut sql = format!("SELECT {PUSH_COLS} FROM pushes");
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            let joined = clauses.join(" AND ");
            for ch in joined.chars() {
                if ch == '?' {
                    n += 1;
                    sql.push_str(&format!("${n}"));
                } else {
                    sql.push(ch);
                }
            }
        }
        sql.push_str(if newest_first {
            " ORDER BY id DESC"
        } else {
            " ORDER BY id"
        });
        if let Some(l) = limit {
            n += 1;
            sql.push_str(&format!(" LIMIT ${n}"));
            args.push(Box::new(i64::from(l)));
        }
        self.query(&sql, &refs(&args))?
            .iter()
            .map(push_row)
            .collect()
    }

    /// One push by id.
    pub fn push_by_id(&self, id: i64) -> Result<Option<PushRow>, OutboxError> {
        if !self.has_pushes()? {
            return Ok(None);
        }
        let rows = self.query(
            &format!("SELECT {PUSH_COLS} FROM pushes WHERE id = $1"),
            &[&id],
        )?;
        rows.first().map(push_row).transpose()
    }

    /// As [`crate::outbox::pushes::prunable`].
    pub fn prunable_pushes(&self, cutoff: i64) -> Result<i64, OutboxError> {
        if !self.has_pushes()? {
            return Ok(0);
        }
        let rows = self.query(
            &format!("SELECT COUNT(*) FROM pushes WHERE {PRUNABLE}"),
            &[&cutoff],
        )?;
        Ok(match rows.first() {
            Some(r) => r.try_get(0)?,
            None => 0,
        })
    }

    /// As [`crate::outbox::pushes::prune_batch`]. The condition is checked again
    /// on the row being deleted: a repeat stored meanwhile (a newer
    /// `last_received_at`) keeps its row.
    pub fn prune_pushes_batch(&self, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
        if !self.has_pushes()? {
            return Ok(0);
        }
        let n = self.execute(
            &format!(
                "DELETE FROM pushes WHERE id IN (SELECT id FROM pushes WHERE {PRUNABLE} ORDER BY id LIMIT $2) \
                 AND {PRUNABLE}"
            ),
            &[&cutoff, &batch],
        )?;
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    }

    /// Counts by kind and whether the event is confirmed.
    pub fn push_counts(&self) -> Result<PushCounts, OutboxError> {
        if !self.has_pushes()? {
            return Ok(Vec::new());
        }
        self.query(
            "SELECT kind, published_at IS NOT NULL, COUNT(*) FROM pushes GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
    }
}
