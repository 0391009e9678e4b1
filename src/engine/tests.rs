//! Unit tests of the engine's event handling (the simulation covers interleavings).

use std::time::Duration;

use super::*;
use crate::command::Params;
use crate::config::Dur;
use crate::midas::Body;

pub(super) fn cfg() -> EngineConfig {
    EngineConfig {
        retry: RetryConfig {
            initial: Dur(Duration::from_millis(100)),
            max: Dur(Duration::from_secs(1)),
            give_up_after: Dur(Duration::from_secs(3600)),
            balance_give_up_after: Dur(Duration::from_secs(30)),
        },
        max_in_flight: 4,
        max_rps: 100,
        apps: vec![("wx".into(), crate::midas::errcode::MidasApi::V1)],
        simulated: false,
        mark_ahead: 0,
        fence_margin_ms: None,
    }
}

pub(super) fn job(id: i64, appid: &str) -> Job {
    Job::new(
        id,
        Params {
            op: Op::Pay,
            bill_no: Some(format!("B{id}")),
            openid: "o".into(),
            appid: appid.into(),
            zone_id: "1".into(),
            pf: "android".into(),
            user_ip: None,
            amt: Some(1),
            present_counts: None,
            pay_item: None,
            app_remark: None,
            query: None,
            pay_bill_no: None,
        },
        Some(Secret::new("k1")),
        0,
    )
}

pub(super) fn ans(class: OutcomeClass, code: i64) -> Box<Answer> {
    Box::new(Answer {
        api: Api::Pay,
        class,
        http_status: Some(200),
        errcode: Some(code),
        errmsg: None,
        body: Body::default(),
        latency: Duration::ZERO,
    })
}

fn final_state(a: &Action) -> Option<JobState> {
    match a {
        Action::Record(Record {
            update: Update::Final { state, .. },
            ..
        }) => Some(*state),
        _ => None,
    }
}

#[test]
fn a_reopen_during_the_final_write_runs_the_job_again_with_the_new_key() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    e.handle(Event::Accepted(job(1, "wx")), 0, &mut out);
    assert!(matches!(
        out.as_slice(),
        [Action::Mark(PreCallMark { id: 1, .. })]
    ));
    out.clear();
    e.handle(Event::Marked(1, None), 0, &mut out);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        1,
        &mut out,
    );
    assert_eq!(out.first().and_then(final_state), Some(JobState::Failed));
    out.clear();
    // the re-send with a new key re-opens it before the final write is acknowledged
    let mut again = job(1, "wx");
    again.session_key = Some(Secret::new("k2"));
    again.reopened_at = Some(2);
    e.handle(Event::Reopened(again), 2, &mut out);
    assert!(
        out.is_empty(),
        "nothing starts while the write is under way"
    );
    e.handle(Event::Recorded(1), 3, &mut out);
    assert!(e.holds(1), "the job is pending again");
    match out.as_slice() {
        [Action::Mark(PreCallMark { id: 1, .. })] => {}
        other => panic!("{other:?}"),
    }
    out.clear();
    e.handle(Event::Marked(1, None), 3, &mut out);
    match out.as_slice() {
        [Action::Call { session_key, .. }] => {
            assert_eq!(session_key.as_ref().map(Secret::expose), Some("k2"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_job_of_a_removed_app_is_never_called() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    e.handle(Event::Loaded(vec![job(1, "wxgone")]), 0, &mut out);
    assert_eq!(out.first().and_then(final_state), Some(JobState::Failed));
    // one that may have been applied already is left to a person
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    let mut j = job(2, "wxgone");
    j.calls = 1;
    e.handle(Event::Loaded(vec![j]), 0, &mut out);
    assert_eq!(out.first().and_then(final_state), Some(JobState::Unknown));
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::Call { .. } | Action::Mark(_))));
}

#[test]
fn a_stale_accept_of_a_finished_job_is_ignored() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    e.handle(Event::Loaded(vec![job(1, "wx")]), 0, &mut out);
    e.handle(Event::Marked(1, None), 0, &mut out);
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Success, 0)),
        0,
        &mut out,
    );
    e.handle(Event::Recorded(1), 0, &mut out);
    assert!(!e.holds(1));
    out.clear();
    e.handle(Event::Accepted(job(1, "wx")), 0, &mut out);
    assert!(!e.holds(1) && out.is_empty(), "never called twice");
}

#[test]
fn a_call_cut_off_by_a_crash_makes_the_job_uncertain() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    let mut j = job(1, "wx");
    j.calls = 1; // counted durably, never answered
    j.first_attempt_at = Some(0);
    e.handle(Event::Loaded(vec![j]), 0, &mut out);
    e.handle(Event::Marked(1, None), 0, &mut out);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        0,
        &mut out,
    );
    assert_eq!(out.first().and_then(final_state), Some(JobState::Unknown));
}

fn marks(out: &[Action]) -> Vec<i64> {
    out.iter()
        .filter_map(|a| match a {
            Action::Mark(m) => Some(m.id),
            _ => None,
        })
        .collect()
}

pub(super) fn calls(out: &[Action]) -> Vec<i64> {
    out.iter()
        .filter_map(|a| match a {
            Action::Call { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_fenced_mark_drops_the_player_frees_the_slot_and_makes_no_call() {
    let mut c = cfg();
    c.max_in_flight = 1;
    let mut e = Engine::new(c, 1);
    let mut out = Vec::new();
    e.handle(Event::Accepted(job(1, "wx")), 0, &mut out);
    e.handle(Event::Accepted(job(2, "wx")), 0, &mut out);
    assert_eq!(marks(&out), vec![1]);
    out.clear();
    e.handle(Event::LeaseLost(1), 10, &mut out);
    assert!(calls(&out).is_empty() && marks(&out).is_empty(), "{out:?}");
    assert!(!e.holds(1) && !e.holds(2), "the player's jobs are dropped");
    assert_eq!(e.players(), Vec::new());
    // the slot is free: another player's job starts at once
    let mut other = job(3, "wx");
    other.params.openid = "p".into();
    e.handle(Event::Accepted(other), 20, &mut out);
    assert_eq!(marks(&out), vec![3]);
}

#[test]
fn a_player_lost_mid_call_finishes_that_step_then_drops_and_comes_back_when_claimed() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    e.handle(Event::Accepted(job(1, "wx")), 0, &mut out);
    e.handle(Event::Accepted(job(2, "wx")), 0, &mut out);
    e.handle(Event::Marked(1, None), 1, &mut out);
    assert_eq!(calls(&out), vec![1]);
    out.clear();
    e.handle(
        Event::PlayersLost(vec![HeldPlayer {
            appid: "wx".into(),
            openid: "o".into(),
            gen: 0,
        }]),
        2,
        &mut out,
    );
    assert!(
        e.holds(1),
        "the call under way is still answered and recorded"
    );
    assert!(
        !e.holds(2),
        "a waiting job of the lost player is dropped at once"
    );
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Transient, -1)),
        3,
        &mut out,
    );
    assert!(out.iter().any(|a| matches!(a, Action::Record(_))));
    out.clear();
    e.handle(Event::Recorded(1), 4, &mut out);
    assert!(!e.holds(1) && out.is_empty(), "no retry here: {out:?}");
    // taken back (a new lease generation): the outbox's view of both jobs is
    // loaded, in order
    let mut j1 = job(1, "wx");
    j1.calls = 1;
    j1.attempts = 1;
    j1.lease_gen = 1;
    let mut j2 = job(2, "wx");
    j2.lease_gen = 1;
    e.handle(Event::Claimed(vec![j1, j2]), 5, &mut out);
    assert!(e.holds(1) && e.holds(2));
    assert_eq!(marks(&out), vec![1], "the earlier job first");
}

#[test]
fn the_first_answer_after_an_outage_ends_the_backoff_of_waiting_jobs() {
    let mut c = cfg();
    c.max_in_flight = 64;
    c.retry.initial = Dur(Duration::from_secs(10));
    c.retry.max = Dur(Duration::from_secs(600));
    let mut e = Engine::new(c, 1);
    let mut out = Vec::new();
    let n = OUTAGE_STREAK as i64;
    for id in 1..=n + 1 {
        let mut j = job(id, "wx");
        j.params.openid = format!("o{id}");
        e.handle(Event::Accepted(j), 0, &mut out);
    }
    for id in 1..=n + 1 {
        e.handle(Event::Marked(id, None), 1, &mut out);
    }
    out.clear();
    // the outage: every call but the last answers -1, several times over, so the
    // backoffs grow
    let mut now = 10;
    for round in 0..4 {
        for id in 1..=n {
            e.handle(
                Event::Answered(id, ans(OutcomeClass::Transient, -1)),
                now,
                &mut out,
            );
            e.handle(Event::Recorded(id), now, &mut out);
        }
        out.clear();
        if round < 3 {
            now = e.next_wake().unwrap_or(now).max(now) + 1;
            e.poll(now, &mut out);
            for id in 1..=n {
                e.handle(Event::Marked(id, None), now, &mut out);
            }
            out.clear();
        }
    }
    let before = e.next_wake().expect("jobs wait");
    assert!(
        before > now,
        "the jobs wait out a backoff: wake at {before}, now {now}"
    );
    // Midas is back: the next answer ends the outage
    e.handle(
        Event::Answered(n + 1, ans(OutcomeClass::Success, 0)),
        now,
        &mut out,
    );
    assert_eq!(
        marks(&out).len() as i64,
        n,
        "every waiting job starts at once after the outage: {out:?}"
    );
}

#[test]
fn a_few_busy_answers_are_no_outage() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    for id in 1..=3 {
        let mut j = job(id, "wx");
        j.params.openid = format!("o{id}");
        e.handle(Event::Accepted(j), 0, &mut out);
        e.handle(Event::Marked(id, None), 0, &mut out);
    }
    for id in 1..=2 {
        e.handle(
            Event::Answered(id, ans(OutcomeClass::Transient, -1)),
            5,
            &mut out,
        );
        e.handle(Event::Recorded(id), 5, &mut out);
    }
    let wake = e.next_wake().expect("retry later");
    e.handle(
        Event::Answered(3, ans(OutcomeClass::Success, 0)),
        6,
        &mut out,
    );
    assert_eq!(e.next_wake(), Some(wake), "their backoff stands");
}

/// Transient answers until the deadline: retried up to it, `unknown` at it (not a
/// backoff earlier), and no call at or after it.
#[test]
fn a_job_answered_transient_retries_until_its_deadline_and_ends_there() {
    let mut c = cfg();
    c.retry.give_up_after = Dur(Duration::from_secs(10));
    let mut e = Engine::new(c, 7);
    let mut out = Vec::new();
    let mut now = 0;
    e.handle(Event::Accepted(job(1, "wx")), now, &mut out);
    let (mut calls, mut last_call) = (0, 0);
    for _ in 0..10_000 {
        let mut next = Vec::new();
        for a in out.drain(..) {
            match a {
                Action::Mark(m) => e.handle(Event::Marked(m.id, None), now, &mut next),
                Action::Call { id, .. } => {
                    calls += 1;
                    last_call = now;
                    now += 7;
                    e.handle(
                        Event::Answered(id, ans(OutcomeClass::Transient, -1)),
                        now,
                        &mut next,
                    );
                }
                Action::Record(r) => {
                    if let Update::Final { state, .. } = r.update {
                        assert_eq!(state, JobState::Unknown);
                        assert_eq!(now, 10_000, "ends at the deadline, not before");
                        assert!(
                            last_call < 10_000 && calls > 5,
                            "{calls} calls, last at {last_call}"
                        );
                        return;
                    }
                    e.handle(Event::Recorded(r.job_id), now, &mut next);
                }
                Action::Reply { .. } | Action::GiveBack { .. } => {}
            }
        }
        out = next;
        if out.is_empty() {
            now = e.next_wake().expect("a waiting job has a wake-up");
            e.poll(now, &mut out);
        }
    }
    panic!("never ended");
}

/// Jobs `ids` accepted at time 0, each of its own player `p{id}`.
fn accept_one_per_player(
    e: &mut Engine,
    ids: std::ops::RangeInclusive<i64>,
    out: &mut Vec<Action>,
) {
    for id in ids {
        let mut j = job(id, "wx");
        j.params.openid = format!("p{id}");
        e.handle(Event::Accepted(j), 0, out);
    }
}

#[test]
fn marks_run_ahead_and_a_freed_slot_goes_straight_to_a_marked_job() {
    let mut c = cfg();
    c.max_in_flight = 1;
    c.mark_ahead = 1;
    let mut e = Engine::new(c, 1);
    let mut out = Vec::new();
    accept_one_per_player(&mut e, 1..=3, &mut out);
    assert_eq!(marks(&out), vec![1, 2], "one slot + one ahead");
    out.clear();
    // job 2's mark lands first: the slot is free, it calls
    e.handle(Event::Marked(2, None), 1, &mut out);
    assert_eq!(calls(&out), vec![2]);
    out.clear();
    // job 1 is marked but the one slot is taken: it waits, and nothing new starts
    e.handle(Event::Marked(1, None), 2, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.check_slots().expect("counts agree");
    // job 2's answer frees the slot: job 1 calls in the same step, job 3 is marked
    e.handle(
        Event::Answered(2, ans(OutcomeClass::Definitive, 0)),
        3,
        &mut out,
    );
    assert_eq!(calls(&out), vec![1]);
    assert_eq!(marks(&out), vec![3]);
    e.check_slots().expect("counts agree");
}

#[test]
fn the_balance_fetch_after_a_duplicate_keeps_the_calls_slot() {
    let mut c = cfg();
    c.max_in_flight = 1;
    let mut e = Engine::new(c, 1);
    let mut out = Vec::new();
    accept_one_per_player(&mut e, 1..=2, &mut out);
    e.handle(Event::Marked(1, None), 1, &mut out);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Duplicate, 90012)),
        2,
        &mut out,
    );
    // the fetch is the only call Midas sees: job 2 is not started beside it
    assert_eq!(calls(&out), vec![1]);
    assert!(marks(&out).is_empty(), "{out:?}");
    out.clear();
    e.handle(
        Event::BalanceFetched(1, ans(OutcomeClass::Definitive, 0)),
        3,
        &mut out,
    );
    assert_eq!(marks(&out), vec![2]);
}

/// A final outcome on a session problem carries the key it was decided with
/// (the outbox re-opens the job instead when a re-send stored a newer one); the
/// engine then runs the job again at once with that key.
#[test]
fn a_session_failure_written_as_a_reopen_runs_again_with_the_outboxs_key() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    e.handle(Event::Accepted(job(1, "wx")), 0, &mut out);
    e.handle(Event::Marked(1, None), 1, &mut out);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        2,
        &mut out,
    );
    let guard = out.iter().find_map(|a| match a {
        Action::Record(r) => Some(r.session_guard.clone()),
        _ => None,
    });
    let used = guard.flatten().and_then(|g| g.used);
    assert_eq!(used.as_ref().map(Secret::expose), Some("k1"));
    out.clear();
    e.handle(Event::ReopenedWithKey(1, Secret::new("k2")), 3, &mut out);
    assert!(e.holds(1), "the job is not over");
    assert!(
        matches!(out.as_slice(), [Action::Mark(PreCallMark { id: 1, .. })]),
        "marked again at once: {out:?}"
    );
    out.clear();
    e.handle(Event::Marked(1, None), 4, &mut out);
    let key = out.iter().find_map(|a| match a {
        Action::Call { session_key, .. } => session_key.clone(),
        _ => None,
    });
    assert_eq!(key.as_ref().map(Secret::expose), Some("k2"));
    // an outcome that is not a session problem carries no guard
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Success, 0)),
        5,
        &mut out,
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Record(Record {
            session_guard: None,
            update: Update::Final { .. },
            ..
        })
    )));
}
