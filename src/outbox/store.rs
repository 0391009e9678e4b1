//! The outbox as the operator verbs see it, whichever engine holds it: [`Store`] is
//! a connection to the SQLite file or to the shared PostgreSQL database, and [`Tx`]
//! a transaction on it. Their methods are the operations the `outbox` verbs use;
//! the SQL behind each lives in [`super::operator`] (SQLite) and
//! [`super::postgres::ops`] (PostgreSQL), so a verb is written once and behaves the
//! same on both: same rows, same order, same re-checks inside write transactions.
//!
//! An enum, not a trait object: the two engines are known, the verbs need generic
//! callbacks (`export_each`), and a `match` per operation keeps each engine's
//! transaction type (`rusqlite::Transaction`, [`PgTx`]) concrete.

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::operator::{
    self, ActionRow, CallRow, ExportRow, JobFilter, JobRow, ListRow, Stats, TargetRow,
};
use super::postgres::ops::{PgStore, PgTx};
use super::pushes::{self, PushCounts, PushFilter, PushRow};
use super::{open_existing_rw, open_ro, Location, OutboxError};

/// An operator's connection to the outbox.
pub enum Store {
    Sqlite(Connection),
    Postgres(PgStore),
}

/// A transaction: a read snapshot ([`Store::read`]) or a write ([`Store::write`]).
pub enum Tx<'a> {
    Sqlite(Transaction<'a>),
    Postgres(PgTx<'a>),
}

impl Store {
    /// Open an existing outbox for reading (fails when it does not exist).
    pub fn open_ro(at: &Location) -> Result<Store, OutboxError> {
        Ok(match at {
            Location::Sqlite(p) => Store::Sqlite(open_ro(p)?),
            Location::Postgres(u) => Store::Postgres(PgStore::connect(u, false)?),
        })
    }

    /// Open an existing outbox for an operator's write.
    pub fn open_rw(at: &Location) -> Result<Store, OutboxError> {
        Ok(match at {
            Location::Sqlite(p) => Store::Sqlite(open_existing_rw(p)?),
            Location::Postgres(u) => Store::Postgres(PgStore::connect(u, true)?),
        })
    }

    /// One consistent snapshot for several reads.
    pub fn read(&mut self) -> Result<Tx<'_>, OutboxError> {
        Ok(match self {
            Store::Sqlite(c) => {
                Tx::Sqlite(c.transaction_with_behavior(TransactionBehavior::Deferred)?)
            }
            Store::Postgres(p) => Tx::Postgres(p.begin(false)?),
        })
    }

    /// A write transaction: SQLite `IMMEDIATE` (the writer lock taken at once);
    /// PostgreSQL locks the jobs it reads (`FOR UPDATE`).
    pub fn write(&mut self) -> Result<Tx<'_>, OutboxError> {
        Ok(match self {
            Store::Sqlite(c) => {
                Tx::Sqlite(c.transaction_with_behavior(TransactionBehavior::Immediate)?)
            }
            Store::Postgres(p) => Tx::Postgres(p.begin(true)?),
        })
    }

    /// The newest jobs first, at most `limit` (`None`: all).
    pub fn list(&self, f: &JobFilter, limit: Option<u32>) -> Result<Vec<ListRow>, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::list(c, f, limit),
            Store::Postgres(p) => p.list(f, limit),
        }
    }

    /// How many jobs the filter selects.
    pub fn count(&self, f: &JobFilter) -> Result<i64, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::count(c, f),
            Store::Postgres(p) => p.count(f),
        }
    }

    /// Jobs received since `since` per `bucket_ms` and state: (bucket, state, jobs).
    pub fn timeline(
        &self,
        since: i64,
        bucket_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::timeline(c, since, bucket_ms),
            Store::Postgres(p) => p.timeline(since, bucket_ms),
        }
    }

    /// Every job the filter selects, oldest first, streamed to `each`.
    pub fn export_each<E: From<OutboxError>>(
        &self,
        f: &JobFilter,
        each: impl FnMut(ExportRow) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Store::Sqlite(c) => operator::export_each(c, f, each),
            Store::Postgres(p) => p.export_each(f, each),
        }
    }

    /// The numbers of `outbox stats`, in one snapshot.
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::stats(c),
            Store::Postgres(p) => p.stats(),
        }
    }

    /// The pushes `f` selects, newest first (or oldest first), at most `limit`
    /// (`None`: all). An outbox written before pushes existed has none.
    pub fn pushes(
        &self,
        f: &PushFilter,
        limit: Option<u32>,
        newest_first: bool,
    ) -> Result<Vec<PushRow>, OutboxError> {
        match self {
            Store::Sqlite(c) => pushes::list(c, f, limit, newest_first),
            Store::Postgres(p) => p.pushes(f, limit, newest_first),
        }
    }

    /// The pushes of one OutTradeNo or RefundId (of one app when `appid` is
    /// given), oldest first.
    pub fn pushes_by_key(
        &self,
        key: &str,
        appid: Option<&str>,
    ) -> Result<Vec<PushRow>, OutboxError> {
        let f = PushFilter {
            key: Some(key.to_string()),
            appid: appid.map(str::to_string),
            ..PushFilter::default()
        };
        self.pushes(&f, None, false)
    }

    /// One push by its id.
    pub fn push(&self, id: i64) -> Result<Option<PushRow>, OutboxError> {
        match self {
            Store::Sqlite(c) => pushes::by_id(c, id),
            Store::Postgres(p) => p.push_by_id(id),
        }
    }

    /// Push counts by kind and whether the event is confirmed.
    pub fn push_counts(&self) -> Result<PushCounts, OutboxError> {
        match self {
            Store::Sqlite(c) => pushes::counts(c),
            Store::Postgres(p) => p.push_counts(),
        }
    }

    /// How many final jobs finished before `cutoff`.
    pub fn prunable(&self, cutoff: i64) -> Result<i64, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::prunable(c, cutoff),
            Store::Postgres(p) => p.prunable(cutoff),
        }
    }

    /// Whether deletes cascade to attempts and reply targets (PostgreSQL always
    /// enforces foreign keys).
    pub fn foreign_keys_on(&self) -> Result<bool, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::foreign_keys_on(c),
            Store::Postgres(_) => Ok(true),
        }
    }

    /// Delete at most `batch` prunable jobs in a transaction of their own.
    pub fn prune_batch(&mut self, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
        match self {
            Store::Sqlite(c) => operator::prune_batch(c, cutoff, batch),
            Store::Postgres(p) => p.prune_batch(cutoff, batch),
        }
    }

    /// How many stored pushes `prune` would delete at `cutoff`: confirmed, last
    /// received before it.
    pub fn prunable_pushes(&self, cutoff: i64) -> Result<i64, OutboxError> {
        match self {
            Store::Sqlite(c) => pushes::prunable(c, cutoff),
            Store::Postgres(p) => p.prunable_pushes(cutoff),
        }
    }

    /// Delete at most `batch` prunable pushes in a transaction of their own.
    pub fn prune_pushes_batch(&mut self, cutoff: i64, batch: i64) -> Result<i64, OutboxError> {
        match self {
            Store::Sqlite(c) => pushes::prune_batch(c, cutoff, batch),
            Store::Postgres(p) => p.prune_pushes_batch(cutoff, batch),
        }
    }

    /// Record an operator action on its own (outside any transaction).
    pub fn record_action(
        &self,
        at: i64,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OutboxError> {
        match self {
            Store::Sqlite(c) => operator::record_action(c, at, actor, action, target, detail),
            Store::Postgres(p) => p.record_action(at, actor, action, target, detail),
        }
    }
}

impl Tx<'_> {
    /// Every job the filter selects, oldest first.
    pub fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRow>, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::jobs(t, f),
            Tx::Postgres(t) => t.jobs(f),
        }
    }

    /// The jobs of `bill_no` (of one app when `appid` is given), in arrival order.
    pub fn jobs_by_bill_no(
        &self,
        bill_no: &str,
        appid: Option<&str>,
    ) -> Result<Vec<JobRow>, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::jobs_by_bill_no(t, bill_no, appid),
            Tx::Postgres(t) => t.jobs_by_bill_no(bill_no, appid),
        }
    }

    pub fn targets_of(&self, job_id: i64) -> Result<Vec<TargetRow>, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::targets_of(t, job_id),
            Tx::Postgres(t) => t.targets_of(job_id),
        }
    }

    pub fn count_targets(&self, job_id: i64) -> Result<i64, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::count_targets(t, job_id),
            Tx::Postgres(t) => t.count_targets(job_id),
        }
    }

    pub fn calls_of(&self, job_id: i64) -> Result<Vec<CallRow>, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::calls_of(t, job_id),
            Tx::Postgres(t) => t.calls_of(job_id),
        }
    }

    pub fn actions_on(
        &self,
        target: &str,
        appid: Option<&str>,
    ) -> Result<Vec<ActionRow>, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::actions_on(t, target, appid),
            Tx::Postgres(t) => t.actions_on(target, appid),
        }
    }

    /// Record an operator action (in this transaction).
    pub fn record_action(
        &self,
        at: i64,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::record_action(t, at, actor, action, target, detail),
            Tx::Postgres(t) => t.record_action(at, actor, action, target, detail),
        }
    }

    /// Mark a job's reply targets for re-publishing (`only_final`: if it is final).
    pub fn requeue_replies(&self, job_id: i64, only_final: bool) -> Result<usize, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::requeue_replies(t, job_id, only_final),
            Tx::Postgres(t) => t.requeue_replies(job_id, only_final),
        }
    }

    /// Re-open a job that ended `unknown` or `failed`; `false` when it no longer is.
    pub fn reopen(&self, job_id: i64, now: i64) -> Result<bool, OutboxError> {
        match self {
            Tx::Sqlite(t) => operator::reopen(t, job_id, now),
            Tx::Postgres(t) => t.reopen(job_id, now),
        }
    }

    pub fn commit(self) -> Result<(), OutboxError> {
        match self {
            Tx::Sqlite(t) => Ok(t.commit()?),
            Tx::Postgres(t) => t.commit(),
        }
    }
}
