//! Unit tests of `balance` and `query_order` commands recorded as rows of a
//! shared outbox: they wait their turn behind the player's earlier jobs, go
//! through the fenced pre-call mark, are decided like a balance answered from
//! memory ([`job::decide_read`]) and end with a fenced outcome write.

use super::tests::{ans, cfg, job};
use super::*;
use crate::midas::Body;

const GEN: i64 = 7;

fn shared() -> Engine {
    let mut c = cfg();
    c.fence_margin_ms = Some(2_000);
    Engine::new(c, 1)
}

fn pay_row(id: i64) -> Job {
    let mut j = job(id, "wx");
    j.lease_gen = GEN;
    j
}

/// A `balance` recorded as a row with a synthetic key, as intake on a shared
/// outbox records it.
fn balance_row(id: i64, received_at: i64) -> Job {
    let mut j = job(id, "wx");
    j.params.op = Op::Balance;
    j.params.bill_no = Some(format!("~{id:032x}"));
    j.params.amt = None;
    j.received_at = received_at;
    j.next_attempt_at = received_at;
    j.lease_gen = GEN;
    j
}

fn balance_answer(class: OutcomeClass, code: i64, balance: Option<i64>) -> Box<Answer> {
    let mut a = ans(class, code);
    a.api = Api::GetBalance;
    a.body = Body {
        balance,
        ..Body::default()
    };
    a
}

fn marks(out: &[Action]) -> Vec<(i64, i64)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Mark(m) => Some((m.id, m.gen)),
            _ => None,
        })
        .collect()
}

fn calls(out: &[Action]) -> Vec<(i64, Api)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Call { id, api, .. } => Some((*id, *api)),
            _ => None,
        })
        .collect()
}

fn record_of(out: &[Action], id: i64) -> Option<&Record> {
    out.iter().find_map(|a| match a {
        Action::Record(r) if r.job_id == id => Some(r),
        _ => None,
    })
}

fn reply_of(r: &Record) -> serde_json::Value {
    match &r.update {
        Update::Final { reply, .. } => serde_json::from_slice(reply).unwrap_or_default(),
        Update::Retry { .. } => serde_json::Value::Null,
    }
}

#[test]
fn a_balance_row_waits_for_the_players_pay_then_is_marked_called_and_recorded_under_the_lease() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(
        Event::Claimed(vec![pay_row(1), balance_row(2, 0)]),
        0,
        &mut out,
    );
    assert_eq!(marks(&out), vec![(1, GEN)], "only the pay starts");
    out.clear();
    e.handle(Event::Marked(1, Some(0)), 0, &mut out);
    assert_eq!(calls(&out), vec![(1, Api::Pay)]);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Success, 0)),
        5,
        &mut out,
    );
    assert!(record_of(&out, 1).is_some());
    assert!(
        marks(&out).is_empty() && calls(&out).is_empty(),
        "the balance waits for the pay's outcome to be recorded: {out:?}"
    );
    out.clear();
    e.handle(Event::Recorded(1), 6, &mut out);
    assert_eq!(marks(&out), vec![(2, GEN)], "a fenced pre-call mark");
    out.clear();
    e.handle(Event::Marked(2, Some(6)), 6, &mut out);
    assert_eq!(calls(&out), vec![(2, Api::GetBalance)]);
    out.clear();
    e.handle(
        Event::Answered(2, balance_answer(OutcomeClass::Success, 0, Some(42))),
        7,
        &mut out,
    );
    let r = record_of(&out, 2).expect("the outcome is recorded, not replied from memory");
    assert_eq!(r.lease_gen, GEN, "the outcome write is fenced");
    assert!(matches!(
        r.update,
        Update::Final {
            state: JobState::Succeeded,
            ..
        }
    ));
    let reply = reply_of(r);
    assert_eq!(reply["op"], "balance");
    assert_eq!(reply["status"], "succeeded");
    assert_eq!(reply["balance"], 42);
    assert!(
        reply.get("bill_no").is_none(),
        "the synthetic key is no bill_no of the client: {reply}"
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "published through its reply target, not directly"
    );
    e.handle(Event::Recorded(2), 8, &mut out);
    assert!(!e.holds(2));
}

#[test]
fn a_balance_row_retries_until_balance_give_up_after_then_ends_unknown() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Claimed(vec![balance_row(3, 1_000)]), 1_000, &mut out);
    e.handle(Event::Marked(3, Some(1_000)), 1_000, &mut out);
    out.clear();
    e.handle(
        Event::Answered(3, balance_answer(OutcomeClass::Transient, -1, None)),
        1_100,
        &mut out,
    );
    let r = record_of(&out, 3).expect("the retry is recorded");
    match r.update {
        Update::Retry { next_attempt_at } => {
            assert!(next_attempt_at > 1_100 && next_attempt_at <= 31_000)
        }
        Update::Final { .. } => panic!("a transient answer within the period is retried"),
    }
    let limit = 1_000 + 30_000;
    let mut j = balance_row(3, 1_000);
    j.attempts = 4;
    let d = job::decide_read(
        &j,
        &balance_answer(OutcomeClass::Transient, -1, None),
        limit - 1,
        &cfg().retry,
        job::Context::default(),
        0.9,
    );
    assert_eq!(
        d,
        job::ReadDecision::Retry { at: limit },
        "the last call at the give-up time, never one backoff early"
    );
    match job::decide_read(
        &j,
        &balance_answer(OutcomeClass::Transient, -1, None),
        limit,
        &cfg().retry,
        job::Context::default(),
        0.9,
    ) {
        job::ReadDecision::Final { state, reply } => {
            assert_eq!(state, JobState::Unknown);
            assert_eq!(reply.error.as_deref(), Some("retries_exhausted"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_read_has_no_bill_no_to_deduplicate_and_a_reopen_gives_it_a_new_period() {
    let j = balance_row(4, 0);
    match job::decide_read(
        &j,
        &balance_answer(OutcomeClass::Duplicate, 90012, None),
        1,
        &cfg().retry,
        job::Context::default(),
        0.0,
    ) {
        job::ReadDecision::Final { state, .. } => assert_eq!(state, JobState::Failed),
        other => panic!("{other:?}"),
    }
    let mut j = balance_row(4, 0);
    j.reopened_at = Some(100_000);
    assert_eq!(job::read_deadline(&j, &cfg().retry), 130_000);
}

#[test]
fn a_balance_row_of_a_lost_player_is_not_called() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Claimed(vec![balance_row(5, 0)]), 0, &mut out);
    assert_eq!(marks(&out), vec![(5, GEN)]);
    out.clear();
    e.handle(Event::LeaseLost(5), 1, &mut out);
    assert!(calls(&out).is_empty(), "{out:?}");
    assert!(!e.holds(5));
}
