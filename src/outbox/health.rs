//! Whether the outbox can write, and the story of each time it could not.
//!
//! Guarantee 10: when the outbox cannot write (disk full, the `max_size_mb` budget
//! reached, a read-only file, PostgreSQL away) the worker stops taking commands,
//! keeps running and resumes by itself. While that lasts every stuck delivery and
//! every retried write fails again each second; logging each failure buried the
//! one line an operator needs under hundreds. So the writer (SQLite thread or
//! PostgreSQL task) reports each commit here, and this type logs **once per
//! episode** — when it starts, saying what it is, and when it clears, saying how
//! long it lasted — while `/readyz` and `/metrics` read its state. Everyone else
//! who meets an [`OutboxError::Unwritable`] logs it at debug level only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::OutboxError;

/// Why the outbox cannot write, as far as the database said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTrouble {
    /// SQLite: the disk, or the `outbox.max_size_mb` budget, is full (SQLITE_FULL).
    DiskFull,
    /// SQLite: the file or its directory cannot be written (permissions, a
    /// read-only mount).
    ReadOnly,
    /// SQLite: the operating system failed a read or write (SQLITE_IOERR).
    Io,
    /// PostgreSQL cannot be reached, or its connection broke.
    Unreachable,
    /// PostgreSQL is there but refuses writes (disk full on the server, a
    /// read-only standby, too many connections, shutting down).
    Refused,
}

impl WriteTrouble {
    /// Words for logs, `/readyz` and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteTrouble::DiskFull => "disk full",
            WriteTrouble::ReadOnly => "read-only",
            WriteTrouble::Io => "I/O error",
            WriteTrouble::Unreachable => "database unreachable",
            WriteTrouble::Refused => "database refuses writes",
        }
    }

    /// Classify a SQLite error: `None` when it is not a storage condition (a
    /// constraint, a bug), which then keeps its own error.
    pub fn of_sqlite(e: &rusqlite::Error) -> Option<WriteTrouble> {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code()? {
            C::DiskFull => Some(WriteTrouble::DiskFull),
            C::ReadOnly | C::CannotOpen | C::PermissionDenied => Some(WriteTrouble::ReadOnly),
            C::SystemIoFailure => Some(WriteTrouble::Io),
            _ => None,
        }
    }

    /// Classify a PostgreSQL error: a closed or failed connection is
    /// `Unreachable`; a server that answers but cannot write (SQLSTATE class 53
    /// insufficient resources, 57 operator intervention, 08 connection exception,
    /// 25006 read-only transaction) is `Refused`.
    pub fn of_postgres(e: &tokio_postgres::Error) -> Option<WriteTrouble> {
        match e.as_db_error() {
            None => Some(WriteTrouble::Unreachable),
            Some(db) => {
                let code = db.code().code();
                if code.starts_with("08") {
                    Some(WriteTrouble::Unreachable)
                } else if code.starts_with("53") || code.starts_with("57") || code == "25006" {
                    Some(WriteTrouble::Refused)
                } else {
                    None
                }
            }
        }
    }
}

#[derive(Debug)]
struct Episode {
    since: Instant,
    why: WriteTrouble,
    failed: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// `false` while an episode lasts (intake blocked, or the last commit failed).
    down: AtomicBool,
    /// Commits that failed with a storage condition, since start.
    failed_commits: AtomicU64,
    /// Episodes begun since start.
    episodes: AtomicU64,
    episode: Mutex<Option<Episode>>,
}

/// The outbox writer's health: shared by the writer, `/readyz` and `/metrics`.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WriteHealth(Arc<Inner>);

/// What `/readyz` and `/metrics` show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStatus {
    pub writable: bool,
    /// Why not, when known.
    pub why: Option<WriteTrouble>,
    pub failed_commits: u64,
    pub episodes: u64,
}

impl WriteHealth {
    /// Whether the outbox takes commands now.
    pub fn writable(&self) -> bool {
        !self.0.down.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> WriteStatus {
        let why = self
            .0
            .episode
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|e| e.why));
        WriteStatus {
            writable: self.writable(),
            why,
            failed_commits: self.0.failed_commits.load(Ordering::Relaxed),
            episodes: self.0.episodes.load(Ordering::Relaxed),
        }
    }

    /// A commit succeeded and intake works: ends an episode (logged once, with its
    /// length and the number of failed commits).
    pub fn ok(&self) {
        self.0.down.store(false, Ordering::Relaxed);
        let ended = self.0.episode.lock().ok().and_then(|mut e| e.take());
        if let Some(e) = ended {
            tracing::warn!(
                trouble = e.why.as_str(),
                after_secs = e.since.elapsed().as_secs(),
                failed_commits = e.failed,
                "the outbox can write again; taking commands"
            );
        }
    }

    /// A commit failed, or intake could not insert. A storage condition starts an
    /// episode (logged once) or extends it (not logged); any other error is
    /// logged as it comes, since it is not expected to repeat.
    pub fn failed(&self, e: &OutboxError, requests: usize) {
        self.0.down.store(true, Ordering::Relaxed);
        let Some(why) = e.trouble() else {
            tracing::error!(error = %e, requests, "outbox commit failed; nothing in this batch is acknowledged");
            return;
        };
        self.0.failed_commits.fetch_add(1, Ordering::Relaxed);
        let Ok(mut slot) = self.0.episode.lock() else {
            return;
        };
        match slot.as_mut() {
            Some(ep) => {
                ep.failed += 1;
                ep.why = why;
                tracing::debug!(error = %e, requests, "outbox still cannot write");
            }
            None => {
                self.0.episodes.fetch_add(1, Ordering::Relaxed);
                *slot = Some(Episode {
                    since: Instant::now(),
                    why,
                    failed: 1,
                });
                tracing::error!(
                    trouble = why.as_str(),
                    error = %e,
                    "the outbox cannot write: commands stay unacked in the broker and pushes are refused until it can; /readyz answers 503 meanwhile (logged once until it clears)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> OutboxError {
        OutboxError::Unwritable {
            why: WriteTrouble::DiskFull,
            detail: "database or disk is full".into(),
        }
    }

    #[test]
    fn an_episode_is_counted_once_and_ends_with_a_success() {
        let h = WriteHealth::default();
        assert!(h.writable());
        for _ in 0..50 {
            h.failed(&full(), 3);
        }
        let s = h.status();
        assert!(!s.writable);
        assert_eq!(s.why, Some(WriteTrouble::DiskFull));
        assert_eq!((s.failed_commits, s.episodes), (50, 1));
        h.ok();
        let s = h.status();
        assert!(s.writable && s.why.is_none());
        h.failed(&full(), 1);
        assert_eq!(h.status().episodes, 2);
    }

    #[test]
    fn other_errors_make_it_unready_without_an_episode() {
        let h = WriteHealth::default();
        h.failed(&OutboxError::Corrupt("bad row".into()), 1);
        let s = h.status();
        assert!(!s.writable);
        assert_eq!((s.failed_commits, s.episodes, s.why), (0, 0, None));
    }

    #[test]
    fn sqlite_full_and_readonly_are_storage_conditions() {
        let err = |code| {
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some("x".into()))
        };
        assert_eq!(
            WriteTrouble::of_sqlite(&err(rusqlite::ffi::SQLITE_FULL)),
            Some(WriteTrouble::DiskFull)
        );
        assert_eq!(
            WriteTrouble::of_sqlite(&err(rusqlite::ffi::SQLITE_READONLY)),
            Some(WriteTrouble::ReadOnly)
        );
        assert_eq!(
            WriteTrouble::of_sqlite(&err(rusqlite::ffi::SQLITE_CONSTRAINT)),
            None
        );
    }
}
