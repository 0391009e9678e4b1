//! `outbox migrate`: copy a SQLite outbox into a new PostgreSQL outbox, every row
//! of `jobs`, `reply_targets`, `attempts`, `operator_actions` and `pushes` with its
//! id, in one PostgreSQL transaction.
//!
//! The source is held under SQLite's write lock for the whole copy (a writer that
//! is still running waits or fails; the worker must be stopped anyway, or what it
//! writes afterwards stays behind in the file). The target must be empty: its
//! tables are locked and counted inside the transaction, so two migrations (or a
//! worker starting on the target) cannot interleave. After the copy each identity
//! sequence is set past the largest id copied, and the migration is recorded as an
//! operator action `migrate` in the target. Pending jobs arrive with `claimed_by`
//! NULL: the lease coordinator of whichever worker takes the player loads them.
//!
//! Unlike the operator queries, this copies `session_key` (a pending job needs it
//! for its next call); it is never printed. Once PostgreSQL has committed, the
//! SQLite source is marked migrated (`meta.migrated_to`, the target URL masked:
//! every writable open refuses it, saying where the jobs went) and its session_keys
//! are erased.

use rusqlite::types::Value;
use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::json;

use super::postgres::ops::{Arg, PgStore};
use super::{open_existing_rw, OutboxError};
use crate::secret::SecretUrl;

/// Rows per `INSERT … SELECT FROM unnest(…)`.
const CHUNK: i64 = 1000;

/// A column copied: its name and whether it is a number (else text).
type Col = (&'static str, bool);

/// The tables in foreign-key order, with the columns both schemas share.
const TABLES: [(&str, &[Col]); 4] = [
    (
        "jobs",
        &[
            ("id", true),
            ("op", false),
            ("bill_no", false),
            ("appid", false),
            ("openid", false),
            ("request", false),
            ("session_key", false),
            ("state", false),
            ("attempts", true),
            ("calls", true),
            ("uncertain", true),
            ("next_attempt_at", true),
            ("first_attempt_at", true),
            ("reopened_at", true),
            ("last_errcode", true),
            ("last_error", false),
            ("result", false),
            ("received_at", true),
            ("updated_at", true),
            ("finished_at", true),
        ],
    ),
    (
        "reply_targets",
        &[
            ("id", true),
            ("job_id", true),
            ("reply_to", false),
            ("correlation_id", false),
            ("added_at", true),
            ("published_at", true),
            ("returned", true),
        ],
    ),
    (
        "attempts",
        &[
            ("id", true),
            ("job_id", true),
            ("n", true),
            ("api", false),
            ("started_at", true),
            ("latency_ms", true),
            ("http_status", true),
            ("errcode", true),
            ("errmsg", false),
            ("outcome", false),
        ],
    ),
    (
        "operator_actions",
        &[
            ("id", true),
            ("at", true),
            ("actor", false),
            ("action", false),
            ("target", false),
            ("detail", false),
        ],
    ),
];

/// The pushes table (copied after [`TABLES`], which have no foreign key to it).
const PUSHES: (&str, &[Col]) = (
    "pushes",
    &[
        ("id", true),
        ("appid", false),
        ("kind", false),
        ("dedup_key", false),
        ("event", false),
        ("event_id", false),
        ("openid", false),
        ("out_trade_no", false),
        ("env", true),
        ("message", false),
        ("received_at", true),
        ("last_received_at", true),
        ("repeats", true),
        ("published_at", true),
    ],
);

/// Rows per table (in [`TABLES`] order: jobs, reply targets, attempts, actions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub jobs: i64,
    pub reply_targets: i64,
    pub attempts: i64,
    pub operator_actions: i64,
}

impl Counts {
    fn from_array(n: [i64; 4]) -> Counts {
        Counts {
            jobs: n[0],
            reply_targets: n[1],
            attempts: n[2],
            operator_actions: n[3],
        }
    }
}

/// What a migration copied.
#[derive(Debug, Clone, Copy)]
pub struct Migrated {
    pub copied: Counts,
    /// Of the jobs copied, those still pending.
    pub pending: i64,
    /// WeChat payment pushes copied (unconfirmed events are published by the
    /// workers of the new outbox).
    pub pushes: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the target outbox is not empty")]
    NotEmpty(Counts),
    #[error("{0}")]
    Outbox(#[from] OutboxError),
}

/// Who runs the migration, for the recorded action.
pub struct Actor<'a> {
    pub at: i64,
    pub name: &'a str,
    pub reason: Option<&'a str>,
}

/// Copy the SQLite outbox at `from` into the PostgreSQL outbox at `to` (schema
/// applied first), refusing a target that holds any row.
pub fn sqlite_to_postgres(
    from: &std::path::Path,
    to: &SecretUrl,
    who: &Actor<'_>,
) -> Result<Migrated, MigrateError> {
    let mut src = open_existing_rw(from)?;
    // the writer lock for the whole copy: nothing changes under it
    let src_tx = src
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(OutboxError::from)?;
    let pg = PgStore::open(to)?;
    let tx = pg.begin(true)?;
    pg.execute(
        "LOCK TABLE jobs, reply_targets, attempts, operator_actions, pushes IN EXCLUSIVE MODE",
        &[],
    )?;
    if pg_count(&pg, "SELECT COUNT(*) FROM pushes")? > 0 {
        return Err(MigrateError::NotEmpty(Counts::default()));
    }
    let mut present = [0i64; 4];
    for (i, (table, _)) in TABLES.iter().enumerate() {
        present[i] = pg_count(&pg, &format!("SELECT COUNT(*) FROM {table}"))?;
    }
    if present.iter().any(|n| *n > 0) {
        return Err(MigrateError::NotEmpty(Counts::from_array(present)));
    }
    let mut copied = [0i64; 4];
    for (i, (table, cols)) in TABLES.iter().enumerate() {
        copied[i] = copy_table(&src_tx, &pg, table, cols)?;
        let expected: i64 = src_tx
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .map_err(OutboxError::from)?;
        if copied[i] != expected {
            return Err(OutboxError::Corrupt(format!(
                "{table}: copied {} rows of {expected}",
                copied[i]
            ))
            .into());
        }
        pg.query(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            ),
            &[],
        )?;
    }
    // a file from before pushes has no pushes table until a writable open adds it;
    // `open_existing_rw` above applied the schema, so it is there now
    let pushes = copy_table(&src_tx, &pg, PUSHES.0, PUSHES.1)?;
    let expected: i64 = src_tx
        .query_row("SELECT COUNT(*) FROM pushes", [], |r| r.get(0))
        .map_err(OutboxError::from)?;
    if pushes != expected {
        return Err(
            OutboxError::Corrupt(format!("pushes: copied {pushes} rows of {expected}")).into(),
        );
    }
    pg.query(
        "SELECT setval(pg_get_serial_sequence('pushes', 'id'), max(id)) FROM pushes",
        &[],
    )?;
    let pending = pg_count(&pg, "SELECT COUNT(*) FROM jobs WHERE state = 'pending'")?;
    let copied = Counts::from_array(copied);
    let detail = json!({
        "from": from.display().to_string(),
        "to": to.masked(),
        "jobs": copied.jobs,
        "pending": pending,
        "reply_targets": copied.reply_targets,
        "attempts": copied.attempts,
        "operator_actions": copied.operator_actions,
        "pushes": pushes,
        "reason": who.reason,
    });
    tx.record_action(
        who.at,
        who.name,
        "migrate",
        &format!("sqlite:{}", from.display()),
        &detail.to_string(),
    )?;
    tx.commit()?;
    // The source is marked (no worker or operator writes to it again: its pending
    // jobs would run twice) and loses its session_keys (they live in PostgreSQL
    // now); secure_delete zeroes the old cells, the checkpoint empties the WAL.
    let at = crate::command::rfc3339_ms(who.at);
    let mark = |key: &str, value: &str| {
        src_tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )
    };
    mark(super::schema::MIGRATED_TO, &to.masked()).map_err(OutboxError::from)?;
    mark(super::schema::MIGRATED_AT, &at).map_err(OutboxError::from)?;
    src_tx
        .execute(
            "UPDATE jobs SET session_key = NULL WHERE session_key IS NOT NULL",
            [],
        )
        .map_err(OutboxError::from)?;
    src_tx.commit().map_err(OutboxError::from)?;
    let _ = super::checkpoint(&src);
    Ok(Migrated {
        copied,
        pending,
        pushes,
    })
}

fn pg_count(pg: &PgStore, sql: &str) -> Result<i64, OutboxError> {
    let rows = pg.query(sql, &[])?;
    match rows.first() {
        Some(r) => Ok(r.try_get(0)?),
        None => Ok(0),
    }
}

/// Copy one table in chunks of [`CHUNK`] rows by id; rows copied.
fn copy_table(
    src: &Connection,
    pg: &PgStore,
    table: &str,
    cols: &[Col],
) -> Result<i64, OutboxError> {
    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let select = format!(
        "SELECT {} FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2",
        names.join(", ")
    );
    let unnest: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, num))| format!("${}::{}[]", i + 1, if *num { "bigint" } else { "text" }))
        .collect();
    let insert = format!(
        "INSERT INTO {table} ({}) SELECT * FROM unnest({})",
        names.join(", "),
        unnest.join(", ")
    );
    let mut stmt = src.prepare(&select)?;
    let (mut after, mut total) = (i64::MIN, 0i64);
    loop {
        let mut numbers: Vec<Vec<Option<i64>>> = vec![Vec::new(); cols.len()];
        let mut texts: Vec<Vec<Option<String>>> = vec![Vec::new(); cols.len()];
        let mut rows = stmt.query(params![after, CHUNK])?;
        let mut n = 0i64;
        while let Some(r) = rows.next()? {
            for (i, (name, num)) in cols.iter().enumerate() {
                let v: Value = r.get(i)?;
                match (v, num) {
                    (Value::Null, true) => numbers[i].push(None),
                    (Value::Null, false) => texts[i].push(None),
                    (Value::Integer(x), true) => numbers[i].push(Some(x)),
                    (Value::Text(s), false) => texts[i].push(Some(s)),
                    (other, _) => {
                        return Err(OutboxError::Corrupt(format!(
                            "{table}.{name}: unexpected value of type {}",
                            other.data_type()
                        )))
                    }
                }
            }
            n += 1;
        }
        if n == 0 {
            return Ok(total);
        }
        if let Some(Some(last)) = numbers.first().and_then(|ids| ids.last()) {
            after = *last;
        }
        let args: Vec<Arg> = cols
            .iter()
            .enumerate()
            .map(|(i, (_, num))| -> Arg {
                if *num {
                    Box::new(std::mem::take(&mut numbers[i]))
                } else {
                    Box::new(std::mem::take(&mut texts[i]))
                }
            })
            .collect();
        let inserted = pg.execute(&insert, &super::postgres::ops::refs(&args))?;
        total += i64::try_from(inserted).unwrap_or(i64::MAX);
        if n < CHUNK {
            return Ok(total);
        }
    }
}
