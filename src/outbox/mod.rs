//! The SQLite outbox: the durable record of every job, every attempt and every reply.
//!
//! One writer thread owns the only write connection ([`writer`]) and commits many
//! requests per transaction (group commit), so `synchronous=FULL` costs one fsync per
//! batch, not per message. Readers ([`query`]) open their own connections; WAL lets
//! them read while the worker writes, including from another process (`outbox` CLI).
//! `schema.sql` is the single truth of the schema and is applied at every writable
//! open ([`schema`] migrates older files to it first).
//!
//! Session keys must not outlive their job on disk: every connection sets
//! `secure_delete` (freed cells are zeroed), the WAL is bounded (`journal_size_limit`)
//! and truncated by [`checkpoint`] (the writer calls it when idle and every
//! [`CHECKPOINT_EVERY`] commits), and the files are private (directory 0700, database,
//! WAL and shared-memory files 0600 on Unix).

pub mod handle;
pub mod health;
pub mod migrate;
pub mod operator;
pub mod postgres;
pub mod pushes;
pub mod query;
pub mod schema;
pub mod store;
pub mod writer;
mod writes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

pub use handle::{GiveBack, Location, Outbox};
pub use writer::{Intake, IntakeOutcome, Landed, OutgoingReply, Writer};

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
    #[error("outbox schema: {0}")]
    Schema(String),
    #[error("PostgreSQL outbox: {}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// `sslmode`/`sslrootcert` of `outbox.url` refused, or TLS could not be set up.
    #[error("{0}")]
    Tls(#[from] postgres::tls::TlsError),
    /// The SQLite file was moved to a PostgreSQL outbox by `outbox migrate`: no
    /// worker or operator may write to it again (its jobs would run twice).
    #[error("this SQLite outbox was migrated to {to} ({at}): its jobs are there now; set outbox.url to that outbox (outbox.path is only readable, for the audit verbs)")]
    Migrated { to: String, at: String },
    /// A write fenced out: another worker holds the job's player now.
    #[error("this worker no longer holds the player's lease")]
    LeaseLost,
    /// The outbox cannot write now (disk full, read-only, PostgreSQL away): a
    /// condition that clears by itself or by an operator, not a fault of the data.
    #[error("the outbox cannot write ({}): {detail}", .why.as_str())]
    Unwritable {
        why: health::WriteTrouble,
        detail: String,
    },
}

impl OutboxError {
    /// The storage condition behind this error, if it is one (guarantee 10: the
    /// worker waits it out instead of failing anything).
    pub fn trouble(&self) -> Option<health::WriteTrouble> {
        match self {
            OutboxError::Unwritable { why, .. } => Some(*why),
            OutboxError::Sqlite(e) => health::WriteTrouble::of_sqlite(e),
            OutboxError::Postgres(e) => health::WriteTrouble::of_postgres(e),
            _ => None,
        }
    }

    /// The error of a request whose batch did not commit: a storage condition
    /// keeps its class, anything else is a failed commit.
    pub fn batch_failed(trouble: Option<health::WriteTrouble>, detail: &str) -> OutboxError {
        match trouble {
            Some(why) => OutboxError::Unwritable {
                why,
                detail: detail.to_string(),
            },
            None => OutboxError::Corrupt(format!("commit failed: {detail}")),
        }
    }
}

/// The WAL is truncated back to this size after a checkpoint (bytes).
pub const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;
/// The writer checkpoints at least once per this many commits, even when never idle.
pub const CHECKPOINT_EVERY: u32 = 1000;
/// An idle writer checkpoints when its last checkpoint is at least this old.
pub const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

fn pragmas(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted and overwritten cells (an erased session_key) are zeroed, not left in
    // free space.
    conn.pragma_update(None, "secure_delete", "ON")?;
    // Savepoint journals only serve rollback inside an open transaction: keeping them
    // in memory costs no durability and saves a temp file per request (docs/bench-history.md).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
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
/// applied, and the `outbox.max_size_mb` budget (`max_size_mb`, if any) applied. The
/// budget is an argument, not process state, so two workers in one process each keep
/// their own.
pub fn open_rw(path: &Path, max_size_mb: Option<u64>) -> Result<Connection, OutboxError> {
    let conn = open_rw_unbudgeted(path)?;
    let budget = max_size_mb;
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
    create_private(path)?;
    let mut conn = Connection::open(path)?;
    pragmas(&conn)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "outbox journal mode is not WAL");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    schema::prepare(&mut conn)?;
    schema::check_not_migrated(&conn)?;
    restrict_files(path)?;
    Ok(conn)
}

/// Create the outbox directory (0700) and an empty database file (0600) if missing.
/// SQLite gives the WAL and shared-memory files the database file's mode.
fn create_private(path: &Path) -> Result<(), OutboxError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)?;
    Ok(())
}

/// The database, WAL and shared-memory files readable by their owner only (files an
/// older release created with the umask's mode included).
fn restrict_files(path: &Path) -> Result<(), OutboxError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut names = vec![path.to_path_buf()];
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            names.push(PathBuf::from(p));
        }
        for p in names {
            match std::fs::metadata(&p) {
                Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Copy the WAL into the database and truncate it to zero bytes, without waiting for
/// readers (a reader on an older snapshot makes it a partial checkpoint: `Ok(false)`;
/// the next one finishes the job). What the WAL held (an erased session_key's old
/// page) is then gone from every file.
pub fn checkpoint(conn: &Connection) -> Result<bool, OutboxError> {
    conn.busy_timeout(Duration::ZERO)?;
    let r = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    conn.busy_timeout(Duration::from_secs(5))?;
    match r {
        Ok(busy) => Ok(busy == 0),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DatabaseBusy =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// When the writer checkpoints: when idle and the last checkpoint is older than
/// [`CHECKPOINT_IDLE`], after [`CHECKPOINT_EVERY`] commits, and when it stops.
pub struct Checkpointer {
    commits: u32,
    last: Instant,
}

impl Default for Checkpointer {
    fn default() -> Self {
        Checkpointer {
            commits: 0,
            last: Instant::now(),
        }
    }
}

impl Checkpointer {
    /// After a commit; `idle`: no request is waiting.
    pub fn committed(&mut self, conn: &Connection, idle: bool) {
        self.commits = self.commits.saturating_add(1);
        if self.commits >= CHECKPOINT_EVERY || (idle && self.last.elapsed() >= CHECKPOINT_IDLE) {
            self.run(conn);
        }
    }

    /// The writer is idle: checkpoint what was committed since the last checkpoint
    /// once [`CHECKPOINT_IDLE`] has passed.
    pub fn idle(&mut self, conn: &Connection) {
        if self.commits > 0 && self.last.elapsed() >= CHECKPOINT_IDLE {
            self.run(conn);
        }
    }

    /// Checkpoint now if anything was committed since the last one.
    pub fn finish(&mut self, conn: &Connection) {
        if self.commits > 0 {
            self.run(conn);
        }
    }

    fn run(&mut self, conn: &Connection) {
        match checkpoint(conn) {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("outbox checkpoint partial: a reader holds an older snapshot")
            }
            Err(e) => tracing::warn!(error = %e, "outbox checkpoint failed"),
        }
        self.commits = 0;
        self.last = Instant::now();
    }
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
    schema::check_readable(&conn)?;
    Ok(conn)
}

/// Open an existing outbox for an operator's write (CLI `retry`, `republish`, `prune`).
pub fn open_existing_rw(path: &Path) -> Result<Connection, OutboxError> {
    if !path.exists() {
        return Err(OutboxError::Missing {
            path: path.display().to_string(),
        });
    }
    let mut conn = Connection::open(path)?;
    pragmas(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    schema::prepare(&mut conn)?;
    schema::check_not_migrated(&conn)?;
    schema::check_not_migrated(&conn)?;
    restrict_files(path)?;
    Ok(conn)
}
