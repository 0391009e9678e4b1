//! The SQLite outbox: the durable record of every job, every attempt and every reply.
//!
//! One writer thread owns the only write connection ([`writer`]) and commits many
//! requests per transaction (group commit), so `synchronous=FULL` costs one fsync per
//! batch, not per message. Readers ([`query`]) open their own connections; WAL lets
//! them read while the worker writes, including from another process (`outbox` CLI).
//! `schema.sql` is the single truth of the schema and is applied at every open.

pub mod query;
pub mod writer;

use std::path::Path;
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
    Ok(())
}

/// Open (creating if needed) the outbox for writing: WAL, `synchronous=FULL`, schema applied.
pub fn open_rw(path: &Path) -> Result<Connection, OutboxError> {
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
