//! What the engine is told ([`Event`]) and what it asks the shell to do
//! ([`Action`]): the whole interface between the pure engine and the async shell.

use super::record::Record;
use crate::command::Params;
use crate::midas::{Answer, Api};
use crate::secret::Secret;

use super::job::Job;

/// What the engine is told.
#[derive(Debug)]
pub enum Event {
    /// Pending jobs read from the outbox at start (in arrival order).
    Loaded(Vec<Job>),
    /// A new job is durable in the outbox.
    Accepted(Job),
    /// A command joined a pending job (a redelivery, or a re-send that may carry a
    /// newer session_key): scheduled unless already held.
    Joined(Job),
    /// A final job was re-opened (a re-send with a new session_key, `outbox retry`).
    Reopened(Job),
    /// A `balance` command: no outbox row; answered from memory.
    Balance(Box<BalanceCmd>),
    /// The pre-call mark of job `id` is durable. Shared outbox: `Some(t)`, when
    /// the lease fence was checked (the engine's clock): the lease outlives a call
    /// whose timeout starts within `fence_margin_ms` of `t`.
    Marked(i64, Option<i64>),
    /// Midas answered a call of job `id` (or the call failed: a transient answer).
    Answered(i64, Box<Answer>),
    /// The getbalance after a duplicate answer.
    BalanceFetched(i64, Box<Answer>),
    /// The outcome of job `id` is durable (and its replies handed to the publisher).
    Recorded(i64),
    /// A final outcome on a session problem of job `id` found a newer
    /// session_key in the outbox and was written as a re-open with it instead
    /// ([`crate::engine::SessionGuard`]): the job runs again with that key.
    ReopenedWithKey(i64, crate::secret::Secret),
    /// Shared outbox: pending jobs of players this worker holds the lease of, read
    /// from the outbox (taken over from another worker, recorded by another
    /// worker, or re-opened), each with the lease generation it was claimed
    /// under. The outbox says they are pending: each is held (or, if already held
    /// under that generation, takes a newer session_key). A newer generation
    /// replaces the older one's copy once its step under way ends; an older one
    /// is ignored (see `engine::lease`).
    Claimed(Vec<Job>),
    /// Shared outbox: this worker's lease on these players, at these
    /// generations, ran out and another worker may hold them: their jobs of that
    /// generation or older are dropped (a step under way finishes first; its
    /// outcome write is fenced by the outbox).
    PlayersLost(Vec<super::HeldPlayer>),
    /// Shared outbox: the pre-call mark or the outcome of job `id` was fenced out
    /// (its player's lease is gone, of a newer generation, or too short for a
    /// call). No call is made. When the job's generation is still the newest the
    /// engine knows, the job and its player's other jobs are dropped and the
    /// player is given back ([`Action::GiveBack`]); a step of an older generation
    /// just ends (the newer generation's copy of the job takes its place).
    LeaseLost(i64),
}

/// A `balance` command as intake hands it over.
#[derive(Debug)]
pub struct BalanceCmd {
    pub params: Params,
    pub session_key: Option<Secret>,
    pub reply_to: String,
    pub correlation_id: String,
    pub received_at: i64,
}

/// What the shell must do.
// A call carries its job's parameters; boxing them would add an allocation per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    /// Make durable that a call of the mark's job may go out now (calls + 1,
    /// window start); on a shared outbox only while the player's lease is still
    /// at the mark's generation and outlives the call (see
    /// [`crate::engine::PreCallMark`], a refresh included).
    Mark(crate::engine::PreCallMark),
    /// Call Midas; answer with [`Event::Answered`] (or [`Event::BalanceFetched`] when
    /// `then_finish` is set).
    Call {
        id: i64,
        api: Api,
        params: Params,
        session_key: Option<Secret>,
        balance_after_duplicate: bool,
    },
    /// Write this outcome; answer with [`Event::Recorded`] once durable.
    Record(Record),
    /// Shared outbox: give the player (appid, openid) back, but only while its
    /// lease is still this worker's at generation `gen` (a write of that
    /// generation was fenced out).
    GiveBack {
        appid: String,
        openid: String,
        gen: i64,
    },
    /// Publish a reply that has no outbox row (balance).
    Reply {
        reply_to: String,
        correlation_id: String,
        payload: Vec<u8>,
    },
}
