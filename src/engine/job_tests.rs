//! Unit tests of the job decisions in `job.rs` (answers, retries, deadlines,
//! replies), driven without a runtime, a clock or a database.

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
    let mut j = Job::new(
        1,
        Params {
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
            query: None,
            pay_bill_no: None,
        },
        None,
        0,
    );
    j.attempts = 1;
    j.calls = 1;
    j.first_attempt_at = Some(0);
    j
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

fn d(j: &Job, class: OutcomeClass, code: Option<i64>, now: i64) -> Decision {
    decide(
        j,
        &answer(class, code),
        now,
        &retry(),
        Context::default(),
        0.5,
    )
}

#[test]
fn transient_retries_with_capped_backoff_until_the_deadline() {
    let j = job();
    match d(&j, OutcomeClass::Transient, Some(-1), 1000) {
        Decision::Retry { at } => assert!((1500..=2000).contains(&at), "{at}"),
        other => panic!("{other:?}"),
    }
    for n in 1..100 {
        assert!(backoff_delay(&retry(), n, 0.99) <= Duration::from_secs(300));
    }
    let late = 24 * 3600 * 1000;
    match d(&j, OutcomeClass::Transient, Some(-1), late) {
        Decision::Final { state, reply } => {
            assert_eq!(state, JobState::Unknown);
            assert_eq!(reply.error.as_deref(), Some("retries_exhausted"));
        }
        other => panic!("{other:?}"),
    }
    // never scheduled past the deadline, and not given up before it either:
    // the job wakes at the deadline (where the engine ends it without a call)
    match d(&j, OutcomeClass::Transient, Some(-1), late - 10) {
        Decision::Retry { at } => assert_eq!(at, late),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reopened_job_gets_a_new_retry_period_inside_the_bill_no_window() {
    let hour = 3_600_000;
    let mut j = job();
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
        d(&j, OutcomeClass::TokenInvalid, Some(40001), 7),
        Decision::Retry { at: 7 }
    );
    j.token_retries = 2;
    assert_ne!(
        d(&j, OutcomeClass::TokenInvalid, Some(40001), 7),
        Decision::Retry { at: 7 }
    );
}

#[test]
fn definitive_fails_and_success_succeeds() {
    let j = job();
    assert!(matches!(
        d(&j, OutcomeClass::Definitive, Some(90013), 1),
        Decision::Final {
            state: JobState::Failed,
            ..
        }
    ));
    assert!(matches!(
        d(&j, OutcomeClass::Success, Some(0), 1),
        Decision::Final {
            state: JobState::Succeeded,
            ..
        }
    ));
    assert_eq!(
        d(&j, OutcomeClass::Duplicate, Some(90012), 1),
        Decision::Duplicate
    );
}

#[test]
fn a_session_problem_after_an_unanswered_call_is_never_failed() {
    for code in [90009, 90010, 90011, 90017] {
        let mut j = job();
        assert!(
            matches!(
                d(&j, OutcomeClass::Definitive, Some(code), 1),
                Decision::Final {
                    state: JobState::Failed,
                    ..
                }
            ),
            "{code} on a first, answered call is failed"
        );
        j.uncertain = true;
        match d(&j, OutcomeClass::Definitive, Some(code), 1) {
            Decision::Final { state, reply } => {
                assert_eq!(state, JobState::Unknown, "{code}");
                assert_eq!(reply.error.as_deref(), Some("outcome_uncertain"));
                assert_eq!(reply.status, Some(Status::Unknown));
            }
            other => panic!("{code}: {other:?}"),
        }
    }
    // a definitive answer about the bill itself stays failed
    let mut j = job();
    j.uncertain = true;
    assert!(matches!(
        d(&j, OutcomeClass::Definitive, Some(90013), 1),
        Decision::Final {
            state: JobState::Failed,
            ..
        }
    ));
}

#[test]
fn a_newer_session_key_retries_at_once() {
    let j = job();
    let ctx = Context {
        newer_session_key: true,
        ..Context::default()
    };
    assert_eq!(
        decide(
            &j,
            &answer(OutcomeClass::Definitive, Some(90010)),
            9,
            &retry(),
            ctx,
            0.0
        ),
        Decision::Retry { at: 9 }
    );
}

#[test]
fn rolled_back_means_the_cancel_is_done_even_on_its_first_call() {
    let mut j = job();
    j.params.op = Op::CancelPay;
    j.params.amt = None;
    assert_eq!(
        d(&j, OutcomeClass::Definitive, Some(90015), 1),
        Decision::Duplicate
    );
}

#[test]
fn simulated_replies_say_so() {
    let j = job();
    let ctx = Context {
        simulated: true,
        ..Context::default()
    };
    match decide(
        &j,
        &answer(OutcomeClass::Success, Some(0)),
        1,
        &retry(),
        ctx,
        0.0,
    ) {
        Decision::Final { reply, .. } => assert_eq!(reply.simulated, Some(true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_huge_midas_message_is_not_echoed_whole() {
    let j = job();
    let mut a = answer(OutcomeClass::Definitive, Some(90013));
    a.errmsg = Some("x".repeat(10_000));
    match decide(&j, &a, 1, &retry(), Context::default(), 0.0) {
        Decision::Final { reply, .. } => {
            let m = reply.errmsg.unwrap_or_default();
            assert!(m.chars().count() <= 201, "{} chars", m.chars().count());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rolled_back_is_a_1_0_rule_only() {
    let mut j = job();
    j.params.op = Op::CancelPay;
    let ctx = Context {
        api: MidasApi::V2,
        ..Context::default()
    };
    assert!(matches!(
        decide(
            &j,
            &answer(OutcomeClass::Definitive, Some(90015)),
            1,
            &retry(),
            ctx,
            0.0
        ),
        Decision::Final {
            state: JobState::Failed,
            ..
        }
    ));
}

#[test]
fn a_new_session_key_reopens_only_jobs_that_ended_on_a_session_problem() {
    use JobState::*;
    assert!(reopens_with_new_session_key(Failed, Some(90010), false));
    assert!(!reopens_with_new_session_key(Failed, Some(90013), true));
    assert!(!reopens_with_new_session_key(Failed, Some(90011), false));
    assert!(reopens_with_new_session_key(Unknown, Some(90011), true));
    assert!(!reopens_with_new_session_key(Unknown, Some(-1), true));
    assert!(!reopens_with_new_session_key(Unknown, Some(90010), false));
    assert!(!reopens_with_new_session_key(Succeeded, Some(90010), true));
}

/// Found by a black-box run: a 2.0 refund applied, its answer lost, then (after
/// a re-send re-opened it) 90016 — the session_key expired — ended `failed`
/// while the coins had moved. On 2.0, 90016 and any code the table does not list
/// cannot tell that an earlier unanswered call did not apply.
#[test]
fn a_v2_session_expiry_or_unlisted_code_after_an_unanswered_call_is_never_failed() {
    let v2 = Context {
        api: MidasApi::V2,
        ..Context::default()
    };
    for code in [90016, 90099] {
        let mut j = job();
        j.params.op = Op::CancelPay;
        let first = decide(
            &j,
            &answer(OutcomeClass::Definitive, Some(code)),
            1,
            &retry(),
            v2,
            0.5,
        );
        assert!(
            matches!(
                first,
                Decision::Final {
                    state: JobState::Failed,
                    ..
                }
            ),
            "{code} on a first, answered call is failed: {first:?}"
        );
        j.uncertain = true;
        match decide(
            &j,
            &answer(OutcomeClass::Definitive, Some(code)),
            1,
            &retry(),
            v2,
            0.5,
        ) {
            Decision::Final { state, reply } => {
                assert_eq!(state, JobState::Unknown, "{code}");
                assert_eq!(reply.error.as_deref(), Some("outcome_uncertain"));
            }
            other => panic!("{code}: {other:?}"),
        }
    }
    // and a new session_key re-opens such a job (failed with 90016, or uncertain)
    assert!(reopens_with_new_session_key(
        JobState::Failed,
        Some(90016),
        false
    ));
    assert!(reopens_with_new_session_key(
        JobState::Unknown,
        Some(90016),
        true
    ));
    // a 2.0 answer about the bill itself stays failed after an unanswered call
    let mut j = job();
    j.uncertain = true;
    assert!(matches!(
        decide(
            &j,
            &answer(OutcomeClass::Definitive, Some(90013)),
            1,
            &retry(),
            v2,
            0.5
        ),
        Decision::Final {
            state: JobState::Failed,
            ..
        }
    ));
}
