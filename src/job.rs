//! The job state machine, in one place.
//!
//! ```text
//!            intake                     answer
//!   command ───────▶ pending ──┬── success / 90012 ──────────▶ succeeded
//!                      ▲  │    ├── definitive error ─────────▶ failed
//!                      │  │    └── transient, deadline passed ▶ unknown
//!                      └──┘ transient (backoff) / token invalid (at once)
//!   failed(90010) + command with a new session_key ──▶ pending   (same bill_no)
//!   operator `outbox retry` (unknown/failed, inside the window) ──▶ pending
//! ```
//!
//! [`decide`] is pure: the dispatcher feeds it the job and Midas's answer and
//! writes what it says to the outbox.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::command::{rfc3339_ms, Params, Reply, Status};
use crate::config::RetryConfig;
use crate::midas::{Answer, OutcomeClass};
use crate::secret::Secret;

/// The states of a job, named as CONTRACT.md names reply statuses.
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

/// A non-final job as the dispatcher holds it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub params: Params,
    pub session_key: Option<Secret>,
    pub attempts: u32,
    /// Consecutive token-invalid answers (the first is retried at once).
    pub token_retries: u32,
    pub first_attempt_at: Option<i64>,
    pub next_attempt_at: i64,
    pub received_at: i64,
    /// Midas's last errcode and message for this job (for the `unknown` reply).
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    /// When the job was last re-opened (its retry period starts again from there).
    pub reopened_at: Option<i64>,
}

/// What to do after an answer.
// One per command, moved a few times: boxing would add an allocation per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Call again with the same bill_no at `at` (unix ms).
    Retry { at: i64 },
    /// 90012: the platform already processed the bill_no. The dispatcher fetches the
    /// balance (best effort), then finishes with [`finish_duplicate`].
    Duplicate,
    /// Final: store and publish this reply.
    Final { state: JobState, reply: Reply },
}

/// The retry schedule (capped exponential backoff with full jitter, from `backon`).
pub fn backoff_delay(retry: &RetryConfig, attempt: u32) -> Duration {
    let mut it = ExponentialBuilder::default()
        .with_min_delay(retry.initial.0)
        .with_max_delay(retry.max.0)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    it.nth(attempt.saturating_sub(1).min(64) as usize)
        .unwrap_or(retry.max.0)
        .min(retry.max.0)
}

/// The moment after which this job must not be sent again: `retry.give_up_after`
/// after the first attempt (or after a re-open), and never past 47 h from the first
/// attempt, since the bill_no deduplicates for 48 h only.
pub fn deadline(job: &Job, retry: &RetryConfig) -> Option<i64> {
    let first = job.first_attempt_at?;
    let start = job.reopened_at.map_or(first, |r| r.max(first));
    let window = first + crate::config::MAX_GIVE_UP_AFTER.as_millis() as i64;
    Some((start + retry.give_up_after.0.as_millis() as i64).min(window))
}

/// Decide from `answer` (the job's `attempts` already counts this call).
pub fn decide(job: &Job, answer: &Answer, now: i64, retry: &RetryConfig) -> Decision {
    match answer.class {
        OutcomeClass::Success => Decision::Final {
            state: JobState::Succeeded,
            reply: reply(job, Status::Succeeded, answer, now),
        },
        OutcomeClass::Duplicate => Decision::Duplicate,
        // A cancel sent before without a definitive answer, now "already rolled back":
        // the earlier call of this very cancel went through (as 90012 is for a pay).
        OutcomeClass::Definitive
            if job.params.op == crate::command::Op::CancelPay
                && answer.errcode == Some(crate::midas::errcode::ORDER_ROLLED_BACK)
                && job.attempts > 1 =>
        {
            Decision::Duplicate
        }
        OutcomeClass::Definitive => Decision::Final {
            state: JobState::Failed,
            reply: reply(job, Status::Failed, answer, now),
        },
        OutcomeClass::Transient | OutcomeClass::TokenInvalid => {
            let limit = deadline(job, retry).unwrap_or(i64::MAX);
            if now >= limit {
                return Decision::Final {
                    state: JobState::Unknown,
                    reply: exhausted(job, Some(answer), now),
                };
            }
            let at = if answer.class == OutcomeClass::TokenInvalid && job.token_retries <= 1 {
                now
            } else {
                now + backoff_delay(retry, job.attempts).as_millis() as i64
            };
            if at >= limit {
                // the next attempt would fall past the deadline: stop now
                return Decision::Final {
                    state: JobState::Unknown,
                    reply: exhausted(job, Some(answer), now),
                };
            }
            Decision::Retry { at }
        }
    }
}

/// The reply after a 90012, with the balance when getbalance answered.
pub fn finish_duplicate(job: &Job, answer: &Answer, balance: Option<&Answer>, now: i64) -> Reply {
    let mut r = reply(job, Status::Succeeded, answer, now);
    r.duplicate = Some(true);
    r.balance = balance
        .filter(|b| b.class == OutcomeClass::Success)
        .and_then(|b| b.body.balance);
    r
}

/// `unknown` / `retries_exhausted`: a person must reconcile.
pub fn exhausted(job: &Job, last: Option<&Answer>, now: i64) -> Reply {
    let mut r = base(job, Status::Unknown, now);
    r.errcode = match last {
        Some(a) => a.errcode,
        None => job.last_errcode,
    };
    r.error = Some("retries_exhausted".into());
    let last_msg = last
        .and_then(|a| a.errmsg.clone())
        .or_else(|| job.last_error.clone())
        .unwrap_or_else(|| "no answer".into());
    r.errmsg = Some(format!(
        "no definitive answer before retry.give_up_after (last: {last_msg}); reconcile this bill_no by hand"
    ));
    r
}

fn base(job: &Job, status: Status, now: i64) -> Reply {
    Reply {
        op: Some(job.params.op.as_str().to_string()),
        bill_no: job.params.bill_no.clone(),
        openid: Some(job.params.openid.clone()),
        appid: Some(job.params.appid.clone()),
        status: Some(status),
        attempts: job.attempts,
        received_at: Some(rfc3339_ms(job.received_at)),
        finished_at: Some(rfc3339_ms(now)),
        ..Reply::default()
    }
}

fn reply(job: &Job, status: Status, answer: &Answer, now: i64) -> Reply {
    let mut r = base(job, status, now);
    r.errcode = answer.errcode;
    r.errmsg = answer.errmsg.clone();
    r.balance = answer.body.balance;
    r.used_gen_amt = answer.body.used_gen_amt;
    if status == Status::Succeeded {
        r.duplicate = Some(false);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;
    use crate::config::Dur;
    use crate::midas::{Api, Body};

    fn retry() -> RetryConfig {
        RetryConfig {
            initial: Dur(Duration::from_millis(500)),
            max: Dur(Duration::from_secs(300)),
            give_up_after: Dur(Duration::from_secs(24 * 3600)),
            balance_give_up_after: Dur(Duration::from_secs(30)),
        }
    }

    fn job() -> Job {
        Job {
            id: 1,
            params: Params {
                op: Op::Pay,
                bill_no: Some("B1".into()),
                openid: "o".into(),
                appid: "wx".into(),
                zone_id: "1".into(),
                pf: "android".into(),
                user_ip: None,
                amt: Some(5),
                present_counts: None,
                pay_item: None,
                app_remark: None,
            },
            session_key: None,
            attempts: 1,
            token_retries: 0,
            first_attempt_at: Some(0),
            next_attempt_at: 0,
            received_at: 0,
            last_errcode: None,
            last_error: None,
            reopened_at: None,
        }
    }

    fn answer(class: OutcomeClass, code: Option<i64>) -> Answer {
        Answer {
            api: Api::Pay,
            class,
            http_status: Some(200),
            errcode: code,
            errmsg: None,
            body: Body::default(),
            latency: Duration::ZERO,
        }
    }

    #[test]
    fn transient_retries_with_capped_backoff_until_the_deadline() {
        let j = job();
        match decide(
            &j,
            &answer(OutcomeClass::Transient, Some(-1)),
            1000,
            &retry(),
        ) {
            Decision::Retry { at } => assert!((1000..=1000 + 1000).contains(&at), "{at}"),
            d => panic!("{d:?}"),
        }
        for n in 1..100 {
            assert!(backoff_delay(&retry(), n) <= Duration::from_secs(300));
        }
        let late = 24 * 3600 * 1000;
        match decide(
            &j,
            &answer(OutcomeClass::Transient, Some(-1)),
            late,
            &retry(),
        ) {
            Decision::Final { state, reply } => {
                assert_eq!(state, JobState::Unknown);
                assert_eq!(reply.error.as_deref(), Some("retries_exhausted"));
            }
            d => panic!("{d:?}"),
        }
        // never scheduled past the deadline: it ends now instead
        let near = late - 10;
        match decide(
            &j,
            &answer(OutcomeClass::Transient, Some(-1)),
            near,
            &retry(),
        ) {
            Decision::Final { state, reply } => {
                assert_eq!(state, JobState::Unknown);
                assert_eq!(reply.errcode, Some(-1));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_reopened_job_gets_a_new_retry_period_inside_the_bill_no_window() {
        let hour = 3_600_000;
        let mut j = job();
        j.first_attempt_at = Some(0);
        assert_eq!(deadline(&j, &retry()), Some(24 * hour));
        j.reopened_at = Some(30 * hour);
        assert_eq!(
            deadline(&j, &retry()),
            Some(47 * hour),
            "capped by the 48 h window"
        );
        j.reopened_at = Some(2 * hour);
        assert_eq!(deadline(&j, &retry()), Some(26 * hour));
    }

    #[test]
    fn token_invalid_retries_at_once_then_backs_off() {
        let mut j = job();
        j.token_retries = 1;
        assert_eq!(
            decide(
                &j,
                &answer(OutcomeClass::TokenInvalid, Some(40001)),
                7,
                &retry()
            ),
            Decision::Retry { at: 7 }
        );
        j.token_retries = 2;
        assert_ne!(
            decide(
                &j,
                &answer(OutcomeClass::TokenInvalid, Some(40001)),
                7,
                &retry()
            ),
            Decision::Retry { at: 7 }
        );
    }

    #[test]
    fn definitive_fails_and_success_succeeds() {
        let j = job();
        assert!(matches!(
            decide(
                &j,
                &answer(OutcomeClass::Definitive, Some(90013)),
                1,
                &retry()
            ),
            Decision::Final {
                state: JobState::Failed,
                ..
            }
        ));
        assert!(matches!(
            decide(&j, &answer(OutcomeClass::Success, Some(0)), 1, &retry()),
            Decision::Final {
                state: JobState::Succeeded,
                ..
            }
        ));
        assert_eq!(
            decide(
                &j,
                &answer(OutcomeClass::Duplicate, Some(90012)),
                1,
                &retry()
            ),
            Decision::Duplicate
        );
    }
}
