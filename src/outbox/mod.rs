//! The SQLite outbox: the durable record of every job, every attempt and every reply.
//!
//! One writer thread owns the only write connection ([`writer`]) and commits many
//! requests per transaction (group commit), so `synchronous=FULL` costs one fsync per
//! batch, not per message. Readers ([`query`]) open their own connections; WAL lets
//! them read while the worker writes, including from another process (`outbox` CLI).
//! `schema.sql` is the single truth of the schema and is applied at every open.

pub mod query;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use writer::{Intake, IntakeOutcome, OutgoingReply, Writer};

/// The schema, applied at every start (idempotent).
pub const SCHEMA: &str = include_str!("../../schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox database {path} does not exist")]
    Missing { path: String },
    #[error("outbox writer has stopped")]
    WriterGone,
    #[error("outbox data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot create the outbox directory: {0}")]
    Io(#[from] std::io::Error),
}

fn pragmas(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals only serve rollback inside an open transaction: keeping them
    // in memory costs no durability and saves a temp file per request (docs/bench.md).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// `outbox.max_size_mb` per outbox path, set when the config is loaded
/// ([`crate::config::load_from`]) and read by [`open_rw`], which the writer calls with
/// the path only.
static SIZE_BUDGETS: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

/// Record the disk budget (MiB) for the outbox at `path`; `None` removes it.
pub fn set_size_budget(path: &Path, max_size_mb: Option<u64>) {
    let mut g = SIZE_BUDGETS.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    match max_size_mb {
        Some(mb) => {
            map.insert(path.to_path_buf(), mb);
        }
        None => {
            map.remove(path);
        }
    }
}

fn size_budget(path: &Path) -> Option<u64> {
    let g = SIZE_BUDGETS.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().and_then(|m| m.get(path).copied())
}

/// Apply a disk budget to a write connection: `PRAGMA max_page_count` from the page
/// size. Past it, a write that needs a new page fails with SQLITE_FULL ("database or
/// disk is full"), which intake turns into "not acknowledged, stays in the queue".
/// SQLite never sets the limit below the current size, so an over-budget file stays
/// readable and writable in the pages it has (updates that fit still work).
/// `None` lifts any limit (SQLite's default maximum). Returns the page limit in force.
pub fn apply_size_budget(conn: &Connection, max_size_mb: Option<u64>) -> Result<u64, OutboxError> {
    let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages = match max_size_mb {
        Some(mb) => (mb.saturating_mul(1024 * 1024) / page_size.max(512)).max(1),
        // SQLite's own ceiling (SQLITE_MAX_PAGE_COUNT)
        None => 0xffff_fffe,
    };
    let set: u64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
        r.get(0)
    })?;
    Ok(set)
}

/// Open (creating if needed) the outbox for writing: WAL, `synchronous=FULL`, schema
/// applied, and the `outbox.max_size_mb` budget (if any) applied.
pub fn open_rw(path: &Path) -> Result<Connection, OutboxError> {
    let conn = open_rw_unbudgeted(path)?;
    let budget = size_budget(path);
    if budget.is_some() {
        let pages = apply_size_budget(&conn, budget)?;
        tracing::info!(
            max_size_mb = budget,
            max_pages = pages,
            "outbox disk budget applied"
        );
    }
    Ok(conn)
}

fn open_rw_unbudgeted(path: &Path) -> Result<Connection, OutboxError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let conn = Connection::open(path)?;
    pragmas(&conn)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "outbox journal mode is not WAL");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Open an existing outbox for reading (the CLI, the relay). Fails if it does not exist.
pub fn open_ro(path: &Path) -> Result<Connection, OutboxError> {
    if !path.exists() {
        return Err(OutboxError::Missing {
            path: path.display().to_string(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    pragmas(&conn)?;
    Ok(conn)
}

/// Open an existing outbox for an operator's write (CLI `retry`, `republish`, `prune`).
pub fn open_existing_rw(path: &Path) -> Result<Connection, OutboxError> {
    if !path.exists() {
        return Err(OutboxError::Missing {
            path: path.display().to_string(),
        });
    }
    let conn = Connection::open(path)?;
    pragmas(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}
