//! Bringing an outbox file to the schema of `schema.sql`, whatever release wrote it.
//!
//! `schema.sql` is the single truth and describes the current version only
//! ([`SCHEMA_VERSION`]). A fresh file gets it as is; a file of the current version gets
//! it again (idempotent); a version-1 file (jobs keyed by `(op, bill_no)`) is rebuilt in
//! place, in one transaction, keeping every row and every `id` so `reply_targets` and
//! `attempts` still point at their jobs; a file of an unknown (future) version is
//! refused, never touched. Nothing here knows the v2 table layout: the new table is
//! created by `schema.sql` itself, and this module only moves the rows into it.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{OutboxError, SCHEMA};

/// The version `schema.sql` describes (its `meta.schema_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// The file's `meta.schema_version`; `None` for a file without a `meta` table (new).
pub fn stored_version(c: &Connection) -> Result<Option<i64>, OutboxError> {
    let has_meta: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    let raw: Option<String> = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match raw {
        None => Ok(None),
        Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
            OutboxError::Corrupt(format!(
                "meta.schema_version is {:?}, not a number",
                v.chars().take(40).collect::<String>()
            ))
        }),
    }
}

/// Refuse a file this release cannot read (for read-only opens, which never migrate).
pub fn check_readable(c: &Connection) -> Result<(), OutboxError> {
    match stored_version(c)? {
        None => Ok(()),
        Some(SCHEMA_VERSION) => Ok(()),
        Some(v) if v > SCHEMA_VERSION => Err(future(v)),
        Some(v) => Err(OutboxError::Schema(format!(
            "the outbox has schema version {v}, this release reads version {SCHEMA_VERSION}: \
             start `midas-worker run` (or any writing `outbox` verb) once to migrate it"
        ))),
    }
}

fn future(v: i64) -> OutboxError {
    OutboxError::Schema(format!(
        "the outbox has schema version {v}, newer than this release understands \
         ({SCHEMA_VERSION}): use the midas-worker release that wrote it, or a newer one"
    ))
}

/// `meta` key set by `outbox migrate` on its source: where the jobs went.
pub const MIGRATED_TO: &str = "migrated_to";
/// `meta` key set with [`MIGRATED_TO`]: when (RFC 3339 UTC).
pub const MIGRATED_AT: &str = "migrated_at";

/// Refuse a file `outbox migrate` has moved to PostgreSQL.
pub fn check_not_migrated(c: &Connection) -> Result<(), OutboxError> {
    let get = |key: &str| -> Result<Option<String>, OutboxError> {
        Ok(
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?,
        )
    };
    match get(MIGRATED_TO)? {
        Some(to) => Err(OutboxError::Migrated {
            to,
            at: get(MIGRATED_AT)?.unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

/// Apply `schema.sql`, migrating a version-1 file first. Called on every writable open.
pub fn prepare(conn: &mut Connection) -> Result<(), OutboxError> {
    match stored_version(conn)? {
        None => {
            let has_jobs: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs')",
                [],
                |r| r.get(0),
            )?;
            if has_jobs {
                return Err(OutboxError::Corrupt(
                    "the file has a jobs table but no meta.schema_version: not an outbox this release wrote".into(),
                ));
            }
        }
        Some(SCHEMA_VERSION) => {}
        Some(1) => migrate_v1(conn)?,
        Some(v) if v > SCHEMA_VERSION => return Err(future(v)),
        Some(v) => {
            return Err(OutboxError::Schema(format!(
                "the outbox has schema version {v}, which no release of midas-worker wrote"
            )))
        }
    }
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

/// Version 1 → 2: jobs keyed by `(appid, op, bill_no)`, new columns `calls` and
/// `uncertain`. SQLite cannot alter a UNIQUE constraint, so the table is rebuilt.
fn migrate_v1(conn: &mut Connection) -> Result<(), OutboxError> {
    // Both only take effect outside a transaction. With foreign keys off, dropping
    // the old table does not cascade to attempts and reply targets; with the legacy
    // rename, their `REFERENCES jobs` are not rewritten to the old table's new name.
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "legacy_alter_table", "ON")?;
    let result = migrate_v1_tx(conn);
    let restored = conn
        .pragma_update(None, "legacy_alter_table", "OFF")
        .and_then(|()| conn.pragma_update(None, "foreign_keys", "ON"));
    let moved = result?;
    restored?;
    if let Some(jobs) = moved {
        tracing::info!(
            jobs,
            from = 1,
            to = SCHEMA_VERSION,
            "outbox schema migrated"
        );
    }
    Ok(())
}

fn counts(c: &Connection) -> Result<[i64; 4], OutboxError> {
    let mut out = [0i64; 4];
    for (slot, table) in
        out.iter_mut()
            .zip(["jobs", "reply_targets", "attempts", "operator_actions"])
    {
        *slot = c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
    }
    Ok(out)
}

/// The rebuild, in one transaction: any error rolls everything back. Returns the
/// number of jobs moved, or `None` when another process migrated the file first.
fn migrate_v1_tx(conn: &mut Connection) -> Result<Option<i64>, OutboxError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if stored_version(&tx)? != Some(1) {
        return Ok(None);
    }
    let before = counts(&tx)?;
    let indexes: Vec<String> = tx
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tx.execute_batch("ALTER TABLE jobs RENAME TO jobs_v1")?;
    for name in indexes {
        // the v2 indexes have the same names: they are created by schema.sql below
        tx.execute_batch(&format!("DROP INDEX \"{}\"", name.replace('"', "\"\"")))?;
    }
    tx.execute_batch(SCHEMA)?;
    let moved = tx.execute(
        "INSERT INTO jobs (id, op, bill_no, appid, openid, request, session_key, state, attempts, \
         calls, uncertain, next_attempt_at, first_attempt_at, reopened_at, last_errcode, last_error, \
         result, received_at, updated_at, finished_at) \
         SELECT v.id, v.op, v.bill_no, v.appid, v.openid, v.request, v.session_key, v.state, v.attempts, \
         v.attempts, EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = v.id AND a.outcome = 'transient'), \
         v.next_attempt_at, v.first_attempt_at, v.reopened_at, v.last_errcode, v.last_error, \
         v.result, v.received_at, v.updated_at, v.finished_at FROM jobs_v1 v ORDER BY v.id",
        [],
    )?;
    let moved = i64::try_from(moved).unwrap_or(i64::MAX);
    if moved != before[0] {
        return Err(OutboxError::Schema(format!(
            "migration to version {SCHEMA_VERSION} moved {moved} of {} jobs; nothing was changed",
            before[0]
        )));
    }
    tx.execute_batch("DROP TABLE jobs_v1")?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
        [SCHEMA_VERSION.to_string()],
    )?;
    let dangling: i64 = tx.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
        r.get(0)
    })?;
    let after = counts(&tx)?;
    if dangling != 0 || after != before {
        return Err(OutboxError::Schema(format!(
            "migration to version {SCHEMA_VERSION} would leave {dangling} rows without their job \
             (rows before {before:?}, after {after:?}); nothing was changed"
        )));
    }
    tx.commit()?;
    Ok(Some(moved))
}
