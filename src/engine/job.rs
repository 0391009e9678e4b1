//! The job state machine: what one answer from Midas means for one job.
//!
//! ```text
//!            intake                        answer
//!   command ───────▶ pending ──┬── success / 90012 after a send ───────▶ succeeded
//!                      ▲  │    ├── definitive error ────────────────────▶ failed
//!                      │  │    ├── session/signature problem after an
//!                      │  │    │   unanswered call ─────────────────────▶ unknown (outcome_uncertain)
//!                      │  │    └── transient, deadline passed ──────────▶ unknown (retries_exhausted)
//!                      └──┘ transient (backoff) / token invalid (at once)
//!   failed(90010) or unknown(outcome_uncertain) + command with a new session_key ──▶ pending
//!   operator `outbox retry` (unknown/failed, inside the window) ─────────────────▶ pending
//! ```
//!
//! Everything here is pure: [`decide`] takes the job, the answer and the time and
//! returns what to do. The engine ([`crate::engine`]) feeds it; nothing here does I/O.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::command::{rfc3339_ms, FirstSave, Op, Params, Reply, Status};
use crate::config::RetryConfig;
use crate::midas::errcode::{self, MidasApi};
use crate::midas::{Answer, OutcomeClass};
use crate::secret::Secret;

/// The states of a job, named as the contract names reply statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Succeeded,
    Failed,
    Unknown,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        match s {
            "pending" => Some(JobState::Pending),
            "succeeded" => Some(JobState::Succeeded),
            "failed" => Some(JobState::Failed),
            "unknown" => Some(JobState::Unknown),
            _ => None,
        }
    }

    pub fn is_final(self) -> bool {
        self != JobState::Pending
    }

    pub const ALL: [JobState; 4] = [
        JobState::Pending,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Unknown,
    ];
}

/// A non-final job as the engine holds it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Outbox row id (arrival order). `balance` jobs have no row: negative ids.
    pub id: i64,
    pub params: Params,
    pub session_key: Option<Secret>,
    /// Answers recorded (the reply's `attempts`: calls made, cut-off ones included).
    pub attempts: u32,
    /// Calls that may have reached Midas: counted durably before each call.
    pub calls: u32,
    /// Once a call went unanswered (timeout, -1, 5xx, crash mid-call) the bill_no may
    /// have been applied: a later answer that only reports a session or signature
    /// problem must not end the job `failed`.
    pub uncertain: bool,
    /// Consecutive token-invalid answers (the first is retried at once).
    pub token_retries: u32,
    /// The first call Midas may have seen (durable before that call went out).
    pub first_attempt_at: Option<i64>,
    pub next_attempt_at: i64,
    pub received_at: i64,
    /// Midas's last errcode and message for this job (for the `unknown` reply).
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    /// When the job was last re-opened (its retry period starts again from there).
    pub reopened_at: Option<i64>,
    /// Shared outbox: the generation of its player's lease this copy of the job
    /// was loaded under (its fencing token); 0 on a SQLite outbox.
    pub lease_gen: i64,
}

impl Job {
    /// A job that was just accepted: nothing sent yet.
    pub fn new(id: i64, params: Params, session_key: Option<Secret>, now: i64) -> Job {
        Job {
            id,
            params,
            session_key,
            attempts: 0,
            calls: 0,
            uncertain: false,
            token_retries: 0,
            first_attempt_at: None,
            next_attempt_at: now,
            received_at: now,
            last_errcode: None,
            last_error: None,
            reopened_at: None,
            lease_gen: 0,
        }
    }
}

/// What to do after an answer.
// One per answer, moved once: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Call again with the same bill_no at `at` (unix ms).
    Retry { at: i64 },
    /// The platform already processed the bill_no (90012; 90015 on a cancel): fetch
    /// the balance (best effort), then finish with [`finish_duplicate`].
    Duplicate,
    /// Final: store and publish this reply.
    Final { state: JobState, reply: Reply },
}

/// What the engine knows beside the job and the answer.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// A newer session_key arrived (a re-sent command) after this call went out.
    pub newer_session_key: bool,
    /// Replies carry `simulated: true`.
    pub simulated: bool,
    /// The API the job's app speaks (what an errcode means depends on it).
    pub api: MidasApi,
}

impl Default for Context {
    fn default() -> Context {
        Context {
            newer_session_key: false,
            simulated: false,
            api: MidasApi::V1,
        }
    }
}

/// Whether a re-sent command carrying a new session_key re-opens a final job: one
/// that ended on a session problem — `failed` with 90010, or `unknown` because such
/// an answer came after an unanswered call (`outcome_uncertain`). The 1.0 set of
/// session/signature codes holds the 2.0 one, and a job only ends uncertain on its
/// own API's codes, so the rule needs no API.
pub fn reopens_with_new_session_key(
    state: JobState,
    last_errcode: Option<i64>,
    uncertain: bool,
) -> bool {
    match state {
        JobState::Failed => matches!(
            last_errcode,
            Some(errcode::SESSION_EXPIRED | errcode::V2_SESSION_KEY_EXPIRED)
        ),
        // either API's set: a 1.0 job that ran out of retries on a code only 2.0
        // lists there (90016) is re-opened too — harmless, the same bill_no inside
        // its window
        JobState::Unknown => {
            uncertain
                && last_errcode.is_some_and(|c| {
                    errcode::says_nothing_about_bill(MidasApi::V1, c)
                        || errcode::says_nothing_about_bill(MidasApi::V2, c)
                })
        }
        JobState::Pending | JobState::Succeeded => false,
    }
}

/// The retry schedule (capped exponential backoff with full jitter, from `backon`).
/// `jitter` in `0.0..1.0` picks the point inside the jittered range, so the
/// schedule is replayable from a seed.
pub fn backoff_delay(retry: &RetryConfig, attempt: u32, jitter: f64) -> Duration {
    let mut it = ExponentialBuilder::default()
        .with_min_delay(retry.initial.0)
        .with_max_delay(retry.max.0)
        .with_factor(2.0)
        .without_max_times()
        .build();
    let base = it
        .nth(attempt.saturating_sub(1).min(64) as usize)
        .unwrap_or(retry.max.0)
        .min(retry.max.0);
    // full jitter between base and 2×base, capped at `max`
    let j = jitter.clamp(0.0, 1.0);
    base.mul_f64(1.0 + j).min(retry.max.0)
}

/// The moment after which this job must not be sent again: `retry.give_up_after`
/// after the first call (or after a re-open), and never past 47 h from the first
/// call Midas may have seen, since the bill_no deduplicates for 48 h only.
pub fn deadline(job: &Job, retry: &RetryConfig) -> Option<i64> {
    let first = job.first_attempt_at?;
    let start = job.reopened_at.map_or(first, |r| r.max(first));
    let window = first + crate::config::MAX_GIVE_UP_AFTER.as_millis() as i64;
    Some((start + retry.give_up_after.0.as_millis() as i64).min(window))
}

/// Decide from `answer` (the job's `attempts` and `uncertain` already count this call).
pub fn decide(
    job: &Job,
    answer: &Answer,
    now: i64,
    retry: &RetryConfig,
    ctx: Context,
    jitter: f64,
) -> Decision {
    let code = answer.errcode;
    match answer.class {
        OutcomeClass::Success => Decision::Final {
            state: JobState::Succeeded,
            reply: reply(job, Status::Succeeded, answer, now, ctx),
        },
        OutcomeClass::Duplicate => Decision::Duplicate,
        // 1.0 "already rolled back": whoever sent it, the pay this cancel undoes is
        // undone. (A 2.0 refund has its own bill_no: a repeat answers 90012.)
        OutcomeClass::Definitive
            if job.params.op == Op::CancelPay
                && code == Some(errcode::ORDER_ROLLED_BACK)
                && ctx.api == MidasApi::V1 =>
        {
            Decision::Duplicate
        }
        OutcomeClass::Definitive
            if code.is_some_and(|c| errcode::says_nothing_about_bill(ctx.api, c)) =>
        {
            if ctx.newer_session_key {
                // the command was re-sent with a new session_key meanwhile: use it
                Decision::Retry { at: now }
            } else if job.uncertain {
                Decision::Final {
                    state: JobState::Unknown,
                    reply: uncertain(job, answer, now, ctx),
                }
            } else {
                Decision::Final {
                    state: JobState::Failed,
                    reply: reply(job, Status::Failed, answer, now, ctx),
                }
            }
        }
        OutcomeClass::Definitive => Decision::Final {
            state: JobState::Failed,
            reply: reply(job, Status::Failed, answer, now, ctx),
        },
        OutcomeClass::Transient | OutcomeClass::TokenInvalid => {
            let limit = deadline(job, retry).unwrap_or(i64::MAX);
            let at = if answer.class == OutcomeClass::TokenInvalid && job.token_retries <= 1 {
                now
            } else {
                now.saturating_add(backoff_delay(retry, job.attempts, jitter).as_millis() as i64)
            };
            if now >= limit {
                return Decision::Final {
                    state: JobState::Unknown,
                    reply: exhausted(job, Some(answer), now, ctx),
                };
            }
            // Never scheduled past the deadline: a backoff that would end later
            // wakes the job at the deadline, where it ends `unknown` without a
            // call (the engine's start) — not earlier, while retries may still run.
            Decision::Retry { at: at.min(limit) }
        }
    }
}

/// The reply after a 90012 (or 90015 on a cancel), with the balance when getbalance answered.
pub fn finish_duplicate(
    job: &Job,
    answer: &Answer,
    balance: Option<&Answer>,
    now: i64,
    ctx: Context,
) -> Reply {
    let mut r = reply(job, Status::Succeeded, answer, now, ctx);
    r.duplicate = Some(true);
    r.balance = balance
        .filter(|b| b.class == OutcomeClass::Success)
        .and_then(|b| b.body.balance);
    r
}

/// `unknown` / `retries_exhausted`: a person must reconcile.
pub fn exhausted(job: &Job, last: Option<&Answer>, now: i64, ctx: Context) -> Reply {
    let mut r = base(job, Status::Unknown, now, ctx);
    r.errcode = match last {
        Some(a) => a.errcode,
        None => job.last_errcode,
    };
    r.error = Some("retries_exhausted".into());
    let last_msg = last
        .and_then(|a| a.errmsg.as_deref())
        .or(job.last_error.as_deref())
        .map_or_else(|| "no answer".into(), clip_message);
    r.errmsg = Some(format!(
        "no definitive answer before retry.give_up_after (last: {last_msg}); reconcile this bill_no by hand"
    ));
    r
}

/// `unknown` / `outcome_uncertain`: an earlier call went unanswered and the last
/// answer only reports a session or signature problem.
fn uncertain(job: &Job, answer: &Answer, now: i64, ctx: Context) -> Reply {
    let mut r = base(job, Status::Unknown, now, ctx);
    r.errcode = answer.errcode;
    r.error = Some("outcome_uncertain".into());
    r.errmsg = Some(format!(
        "an earlier call went unanswered and Midas now answers {} ({}), which says nothing about the bill_no; \
         re-send the command with a new session_key to finish it, or reconcile by hand",
        answer.errcode.unwrap_or_default(),
        answer.errmsg.as_deref().map_or_else(|| "no message".into(), clip_message),
    ));
    r
}

/// `unknown` for a job whose app is no longer configured.
pub fn unknown_app(job: &Job, now: i64, ctx: Context) -> (JobState, Reply) {
    let state = if job.calls == 0 && !job.uncertain {
        JobState::Failed
    } else {
        JobState::Unknown
    };
    let status = if state == JobState::Failed {
        Status::Failed
    } else {
        Status::Unknown
    };
    let mut r = base(job, status, now, ctx);
    r.error = Some("unknown_app".into());
    r.errmsg = Some(format!(
        "app {} is no longer configured; {}",
        job.params.appid,
        if state == JobState::Failed {
            "Midas was never called for this bill_no"
        } else {
            "Midas may have applied this bill_no: reconcile it by hand"
        }
    ));
    (state, r)
}

/// Midas's message, cut so that no answer can make a reply (or the outbox) large.
fn clip_message(m: &str) -> String {
    crate::command::clip(m, crate::command::MAX_MESSAGE_CHARS)
}

fn base(job: &Job, status: Status, now: i64, ctx: Context) -> Reply {
    Reply {
        op: Some(job.params.op.as_str().to_string()),
        bill_no: job.params.bill_no.clone(),
        openid: Some(job.params.openid.clone()),
        appid: Some(job.params.appid.clone()),
        status: Some(status),
        attempts: job.attempts,
        simulated: ctx.simulated.then_some(true),
        received_at: Some(rfc3339_ms(job.received_at)),
        finished_at: Some(rfc3339_ms(now)),
        ..Reply::default()
    }
}

fn reply(job: &Job, status: Status, answer: &Answer, now: i64, ctx: Context) -> Reply {
    let mut r = base(job, status, now, ctx);
    r.errcode = answer.errcode;
    r.errmsg = answer.errmsg.as_deref().map(clip_message);
    r.balance = answer.body.balance;
    match ctx.api {
        MidasApi::V1 => r.used_gen_amt = answer.body.used_gen_amt,
        MidasApi::V2 => r.used_present_amount = answer.body.used_present_amount,
    }
    if status == Status::Succeeded {
        r.duplicate = Some(false);
    }
    r
}

/// When a `balance` or `query_order` is given up: `retry.balance_give_up_after`
/// from its receipt (or from its re-open, for a row an operator re-opened).
pub fn read_deadline(job: &Job, retry: &RetryConfig) -> i64 {
    let start = job
        .reopened_at
        .map_or(job.received_at, |r| r.max(job.received_at));
    start.saturating_add(retry.balance_give_up_after.0.as_millis() as i64)
}

/// Decide a `balance` or `query_order` from `answer` (the job's `attempts` already
/// count this call), whether it is answered from memory (SQLite) or runs as a row
/// of a shared outbox: transient answers are retried until [`read_deadline`], the
/// last call at the latest then (`unknown` only after it, never one backoff
/// early); any other answer is final, in the shape of [`balance_reply`]. A read
/// has no bill_no to deduplicate: a 90012 is a definitive answer like any other.
pub fn decide_read(
    job: &Job,
    answer: &Answer,
    now: i64,
    retry: &RetryConfig,
    ctx: Context,
    jitter: f64,
) -> ReadDecision {
    let limit = read_deadline(job, retry);
    if matches!(
        answer.class,
        OutcomeClass::Transient | OutcomeClass::TokenInvalid
    ) && now < limit
    {
        let at = if answer.class == OutcomeClass::TokenInvalid && job.token_retries <= 1 {
            now
        } else {
            now.saturating_add(backoff_delay(retry, job.attempts, jitter).as_millis() as i64)
        };
        return ReadDecision::Retry { at: at.min(limit) };
    }
    let reply = balance_reply(job, answer, now, ctx);
    let state = match reply.status {
        Some(Status::Succeeded) => JobState::Succeeded,
        Some(Status::Failed) => JobState::Failed,
        _ => JobState::Unknown,
    };
    ReadDecision::Final { state, reply }
}

/// What to do after an answer to a `balance` or `query_order` ([`decide_read`]).
// One per answer, moved once: boxing would add an allocation per answer (as
// [`Decision`]).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ReadDecision {
    /// Call again at `at` (unix ms).
    Retry { at: i64 },
    /// Final: this reply.
    Final { state: JobState, reply: Reply },
}

impl From<ReadDecision> for Decision {
    fn from(d: ReadDecision) -> Decision {
        match d {
            ReadDecision::Retry { at } => Decision::Retry { at },
            ReadDecision::Final { state, reply } => Decision::Final { state, reply },
        }
    }
}

/// The reply to a `balance` command (no outbox row): the getbalance fields, or
/// `unknown` when no definitive answer came before `retry.balance_give_up_after`.
pub fn balance_reply(job: &Job, answer: &Answer, now: i64, ctx: Context) -> Reply {
    let status = match answer.class {
        OutcomeClass::Success => Status::Succeeded,
        OutcomeClass::Definitive | OutcomeClass::Duplicate => Status::Failed,
        OutcomeClass::Transient | OutcomeClass::TokenInvalid => Status::Unknown,
    };
    let b = &answer.body;
    let mut r = base(job, status, now, ctx);
    r.bill_no = None;
    r.errcode = answer.errcode;
    r.errmsg = answer.errmsg.as_deref().map(clip_message);
    if status == Status::Unknown {
        r.error = Some("retries_exhausted".into());
    }
    r.balance = b.balance;
    // each API's own names (docs/contract.md, "Replies")
    match ctx.api {
        MidasApi::V1 => {
            r.gen_balance = b.gen_balance;
            r.first_save = b.first_save.map(FirstSave::Number);
            r.save_amt = b.save_amt;
            r.save_sum = b.save_sum;
            r.cost_sum = b.cost_sum;
            r.present_sum = b.present_sum;
        }
        MidasApi::V2 => {
            r.present_balance = b.present_balance;
            r.first_save = b.first_save.map(|n| FirstSave::Flag(n != 0));
            r.sum_save = b.sum_save;
            r.sum_present = b.sum_present;
            r.sum_balance = b.sum_balance;
            r.sum_cost = b.sum_cost;
        }
    }
    if job.params.op == crate::command::Op::QueryOrder {
        // the order's state instead of the balance fields
        r.balance = None;
        r.present_balance = None;
        r.first_save = None;
        r.out_trade_no = job.params.query.as_ref().map(|q| q.out_trade_no.clone());
        if let Some(o) = &b.order {
            r.pay_state = o.pay_state;
            r.deliver_state = o.deliver_state;
            r.pay_finish_time = o.pay_finish_time;
            r.product_id = o.product_id.clone();
            r.mch_order_no = o.mch_order_no.clone();
            r.transaction_id = o.transaction_id.clone();
        }
    }
    r
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
