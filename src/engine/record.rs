//! What the engine asks the outbox to record after a call: the attempt rows and
//! the job's next state ([`Record`]). These are the engine's words — it decides
//! them in pure code (`Action::Record`) — and the outbox writers (SQLite and
//! PostgreSQL) only store them, so they live here rather than beside a writer.

use crate::engine::job::JobState;
use crate::midas::Answer;
use crate::secret::Secret;

/// A pre-call mark to make durable: a call of job `id` may go out from `at` on
/// (the call count raised by one, the bill_no window started); on a shared
/// outbox only while the player's lease is still this worker's at generation
/// `gen` and outlives the call. A `refresh` mark is the same check made again
/// for a job already marked whose call could not start within the fence's
/// margin (it waited for a call slot): its call was counted by the first mark,
/// so the count is not raised again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreCallMark {
    pub id: i64,
    pub at: i64,
    pub gen: i64,
    pub refresh: bool,
}

impl PreCallMark {
    /// How much the mark raises the job's durable call count.
    pub fn counts(&self) -> i64 {
        if self.refresh {
            0
        } else {
            1
        }
    }
}

/// One Midas call to record.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub n: u32,
    pub started_at: i64,
    pub answer: Answer,
}

/// The job's state after an answer.
#[derive(Debug, Clone)]
pub enum Update {
    Retry { next_attempt_at: i64 },
    Final { state: JobState, reply: Vec<u8> },
}

#[derive(Debug, Clone)]
pub struct Record {
    pub job_id: i64,
    pub attempts_total: u32,
    pub first_attempt_at: Option<i64>,
    /// A call of this job went unanswered (kept for the re-open rule and audits).
    pub uncertain: bool,
    pub rows: Vec<AttemptRow>,
    pub update: Update,
    pub now: i64,
    /// Shared outbox: the generation of the player's lease the outcome was
    /// decided under; it lands only while the lease is still this worker's at
    /// that generation (ignored by SQLite).
    pub lease_gen: i64,
    /// Set on a final outcome that ended on a session problem (one a new
    /// session_key re-opens, [`crate::engine::job::reopens_with_new_session_key`]).
    /// When the outbox holds another session_key than this one by the time the
    /// outcome is written — a re-sent command brought it while the outcome was
    /// decided — the job is not final: it is re-opened with the newer key
    /// (pending, due now, a new retry period, nothing published), as a re-send
    /// arriving a moment later would have done.
    pub session_guard: Option<SessionGuard>,
}

/// The session_key a final outcome on a session problem was decided with.
#[derive(Debug, Clone)]
pub struct SessionGuard {
    pub used: Option<Secret>,
}

impl Record {
    /// The errcode and errmsg of the latest answer recorded (the job's last error).
    pub fn last_error(&self) -> (Option<i64>, Option<&str>) {
        let last = self.rows.first().map(|a| &a.answer);
        (
            last.and_then(|a| a.errcode),
            last.and_then(|a| a.errmsg.as_deref()),
        )
    }
}
