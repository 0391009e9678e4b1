//! The one interface the worker writes through, whichever engine holds the
//! outbox: the embedded SQLite file (one worker) or a shared PostgreSQL database
//! (several workers). Intake, pre-call marks, outcomes and reply confirmations
//! all go through [`Outbox`]; the SQL behind each lives in the engine's module.

use std::path::PathBuf;

use super::health::WriteStatus;
use super::postgres::confirms::ReplyWatch;
use super::postgres::writer::PgWriter;
use super::pushes::{NewPush, PushStored, UnpublishedEvent};
use super::query::Gauges;
use super::writer::{Intake, IntakeOutcome, Landed, Writer};
use super::OutboxError;
use crate::config::OutboxConfig;
use crate::engine::{PreCallMark, Record};
use crate::secret::SecretUrl;

/// Where the outbox is, from `[outbox]`: `url` (PostgreSQL) wins over `path`.
#[derive(Debug, Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(SecretUrl),
}

impl Location {
    pub fn of(c: &OutboxConfig) -> Location {
        match &c.url {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::Sqlite(c.path.clone()),
        }
    }

    /// For logs: the path, or the URL with its password masked.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(u) => u.to_string(),
        }
    }

    /// The gauges `/metrics` shows (jobs by state, oldest pending job, replies
    /// pending), read on a connection of its own; `None` when the outbox cannot
    /// be read.
    pub async fn gauges(&self) -> Option<Gauges> {
        match self {
            Location::Sqlite(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    let c = super::open_ro(&db).ok()?;
                    super::query::gauges(&c).ok()
                })
                .await
                .ok()
                .flatten()
            }
            Location::Postgres(url) => super::postgres::coord::gauges_at(url).await.ok(),
        }
    }
}

/// What a batch of pre-call marks came to.
#[derive(Debug, Default)]
pub struct Marked {
    /// Jobs not marked: their calls must not be made.
    pub lost: Vec<i64>,
    /// Shared outbox: when the lease fence was checked (this worker's clock). The
    /// fence promised the lease outlives a call started within
    /// `LEASE_CALL_MARGIN` of this instant.
    pub checked_at: Option<std::time::Instant>,
}

/// A player to give back after a write of lease generation `gen` was fenced out
/// (the dispatcher sends it, the coordination loop releases the lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveBack {
    pub appid: String,
    pub openid: String,
    pub gen: i64,
}

/// A handle to the outbox writer. Cheap to clone.
#[derive(Clone)]
pub enum Outbox {
    Sqlite(Writer),
    /// The writer, and the watch on the replies of `balance`/`query_order` rows.
    Postgres(PgWriter, ReplyWatch),
}

impl Outbox {
    /// Whether several workers share this outbox (jobs run under player leases).
    pub fn is_shared(&self) -> bool {
        matches!(self, Outbox::Postgres(..))
    }

    /// Whether the last commit succeeded (for `/readyz`).
    pub fn healthy(&self) -> bool {
        match self {
            Outbox::Sqlite(w) => w.healthy(),
            Outbox::Postgres(w, _) => w.healthy(),
        }
    }

    /// Whether it can write now, and the episodes when it could not.
    pub fn write_status(&self) -> WriteStatus {
        match self {
            Outbox::Sqlite(w) => w.health().status(),
            Outbox::Postgres(w, _) => w.health().status(),
        }
    }

    /// Record a valid command (durable when this returns).
    pub async fn intake(&self, i: Intake) -> Result<IntakeOutcome, OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.intake(i).await,
            Outbox::Postgres(w, _) => w.intake(i).await,
        }
    }

    /// Record an outcome; answers the replies to publish. A shared outbox answers
    /// [`OutboxError::LeaseLost`] when another worker holds the job's player now
    /// (the attempts are kept, the job is left to that worker).
    pub async fn record(&self, r: Record) -> Result<Landed, OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.record(r).await,
            Outbox::Postgres(w, _) => w.record(r).await,
        }
    }

    /// Make durable that a call of each job may go out now. Answers the jobs NOT
    /// marked because this worker's lease on their player is gone or too short to
    /// cover a call (always none with SQLite): those calls must not be made.
    /// Each mark names the lease generation its call was decided under.
    pub async fn mark_calls(&self, marks: Vec<PreCallMark>) -> Result<Marked, OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.mark_calls(marks).await.map(|()| Marked::default()),
            Outbox::Postgres(w, _) => w.mark_calls(marks).await,
        }
    }

    /// Resolves once every request sent before it is committed.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.flush().await,
            Outbox::Postgres(w, _) => w.flush().await,
        }
    }

    /// Store a verified push once per (appid, kind, dedup key); durable when this
    /// returns. A repeat is counted and answered [`PushStored::Repeat`].
    pub async fn store_push(&self, p: NewPush) -> Result<PushStored, OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.store_push(p).await,
            Outbox::Postgres(w, _) => w.store_push(p).await,
        }
    }

    /// Push events the broker confirmed (fire and forget).
    pub fn push_published(&self, ids: Vec<i64>, now: i64) {
        match self {
            Outbox::Sqlite(w) => w.push_published(ids, now),
            Outbox::Postgres(w, _) => w.push_published(ids, now),
        }
    }

    /// Push events not confirmed yet (committed rows received before `before`),
    /// oldest first, at most `limit`.
    pub async fn unpublished_events(
        &self,
        limit: i64,
        before: i64,
    ) -> Result<Vec<UnpublishedEvent>, OutboxError> {
        match self {
            Outbox::Sqlite(w) => w.unpublished_events(limit, before).await,
            Outbox::Postgres(w, _) => w.unpublished_events(limit, before).await,
        }
    }

    /// Shared outbox: resolves `true` once the reply of row `job_id` (a `balance`
    /// or `query_order` recorded at intake) to (`reply_to`, `correlation_id`) is
    /// confirmed by the broker, whichever worker published it; `false` when it
    /// will not be soon (the row is final and its reply still unconfirmed after
    /// a while, or the row is gone): its delivery is then requeued for a fresh
    /// answer. A pending row is waited for as long as its player's earlier jobs
    /// run. Always `false` on SQLite, which records no such rows.
    /// Shared outbox: the unanswered row an earlier delivery of a redelivered
    /// `balance`/`query_order` recorded (see
    /// [`ReplyWatch::earlier_read`](super::postgres::confirms::ReplyWatch::earlier_read));
    /// always `None` on SQLite (no rows for these there).
    pub async fn earlier_read(
        &self,
        player: (&str, &str),
        key_prefix: &str,
        reply_to: &str,
        correlation_id: &str,
    ) -> Result<Option<i64>, OutboxError> {
        match self {
            Outbox::Sqlite(_) => Ok(None),
            Outbox::Postgres(_, watch) => {
                watch
                    .earlier_read(player, key_prefix, reply_to, correlation_id)
                    .await
            }
        }
    }

    pub async fn reply_confirmed(&self, job_id: i64, reply_to: &str, correlation_id: &str) -> bool {
        match self {
            Outbox::Sqlite(_) => false,
            Outbox::Postgres(_, watch) => watch.confirmed(job_id, reply_to, correlation_id).await,
        }
    }

    /// Mark reply targets confirmed by the broker (fire and forget).
    pub fn published(&self, targets: Vec<super::writer::Confirmed>, now: i64) {
        match self {
            Outbox::Sqlite(w) => w.published(targets, now),
            Outbox::Postgres(w, _) => w.published(targets, now),
        }
    }
}
