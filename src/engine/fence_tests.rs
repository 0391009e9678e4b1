//! Unit tests of the engine's lease generations (fencing tokens) and the checks
//! made when a call is about to start, driven event by event without a runtime.

use super::tests::{ans, calls, cfg, job};
use super::*;

const MARGIN: i64 = 2_000;

fn shared() -> Engine {
    let mut c = cfg();
    c.fence_margin_ms = Some(MARGIN);
    Engine::new(c, 1)
}

fn at_gen(id: i64, gen: i64) -> Job {
    let mut j = job(id, "wx");
    j.lease_gen = gen;
    j
}

fn records(out: &[Action]) -> Vec<&Record> {
    out.iter()
        .filter_map(|a| match a {
            Action::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn final_of(r: &Record) -> Option<JobState> {
    match &r.update {
        Update::Final { state, .. } => Some(*state),
        Update::Retry { .. } => None,
    }
}

fn gave_back(out: &[Action]) -> Vec<i64> {
    out.iter()
        .filter_map(|a| match a {
            Action::GiveBack { gen, .. } => Some(*gen),
            _ => None,
        })
        .collect()
}

/// The marks among `out`: (job id, generation, refresh).
fn mark_list(out: &[Action]) -> Vec<(i64, i64, bool)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Mark(m) => Some((m.id, m.gen, m.refresh)),
            _ => None,
        })
        .collect()
}

fn mark_gens(out: &[Action]) -> Vec<(i64, i64)> {
    mark_list(out)
        .into_iter()
        .map(|(id, g, _)| (id, g))
        .collect()
}

fn has_call(out: &[Action]) -> bool {
    out.iter().any(|a| matches!(a, Action::Call { .. }))
}

/// Defect 1: A gets 90013 and starts writing `failed` under generation 1; A is
/// cut off, B takes the player, charges the pay (its answer lost) and dies; A
/// takes the player back (generation 3). A's write of generation 1 is fenced
/// out, and A runs the outbox's copy: the call B made makes it uncertain, so a
/// later session answer ends it `unknown`, never `failed`.
#[test]
fn a_stale_outcome_is_fenced_and_the_retaken_job_runs_the_outbox_copy() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
    assert_eq!(mark_gens(&out), vec![(1, 1)]);
    out.clear();
    e.handle(Event::Marked(1, Some(0)), 0, &mut out);
    assert!(has_call(&out));
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90013)),
        100,
        &mut out,
    );
    let r = records(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (final_of(r[0]), r[0].lease_gen),
        (Some(JobState::Failed), 1)
    );
    out.clear();
    // A takes the player back at generation 3: the outbox says B marked a call
    // that was never answered
    let mut copy = at_gen(1, 3);
    copy.calls = 2;
    copy.attempts = 1;
    copy.first_attempt_at = Some(0);
    e.handle(Event::Claimed(vec![copy]), 50_000, &mut out);
    assert!(
        out.is_empty(),
        "nothing starts while the old step is under way"
    );
    // the generation-1 write was fenced out: no give-back (A holds generation 3)
    e.handle(Event::LeaseLost(1), 50_001, &mut out);
    assert!(gave_back(&out).is_empty(), "{out:?}");
    assert!(e.holds(1), "the outbox's copy runs");
    assert_eq!(mark_gens(&out), vec![(1, 3)]);
    out.clear();
    e.handle(Event::Marked(1, Some(50_001)), 50_001, &mut out);
    assert!(has_call(&out));
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        50_100,
        &mut out,
    );
    let r = records(&out);
    assert_eq!(
        (final_of(r[0]), r[0].lease_gen),
        (Some(JobState::Unknown), 3),
        "a call may have applied: never failed"
    );
}

/// Defect 1's variant: A's step was at the mark when A took the player back.
#[test]
fn a_step_at_the_mark_gives_way_to_the_newer_generation() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
    out.clear();
    let mut copy = at_gen(1, 4);
    copy.calls = 3;
    copy.attempts = 1;
    copy.first_attempt_at = Some(0);
    e.handle(Event::Claimed(vec![copy]), 10, &mut out);
    // the old mark lands anyway (it was decided first): no call under it
    e.handle(Event::Marked(1, Some(10)), 11, &mut out);
    assert!(!has_call(&out), "{out:?}");
    assert!(gave_back(&out).is_empty());
    assert_eq!(mark_gens(&out), vec![(1, 4)]);
    out.clear();
    e.handle(Event::Marked(1, Some(12)), 12, &mut out);
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        13,
        &mut out,
    );
    assert_eq!(
        records(&out).first().and_then(|r| final_of(r)),
        Some(JobState::Unknown)
    );
}

#[test]
fn a_delivery_of_an_older_generation_is_ignored() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Claimed(vec![at_gen(1, 5)]), 0, &mut out);
    out.clear();
    e.handle(Event::Accepted(at_gen(2, 4)), 1, &mut out);
    assert!(!e.holds(2) && out.is_empty());
    e.handle(Event::Joined(at_gen(3, 4)), 1, &mut out);
    assert!(!e.holds(3));
    assert_eq!(e.generation("wx", "o"), Some(5));
}

#[test]
fn a_fenced_write_of_the_current_generation_gives_the_player_back_with_it() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 7)), 0, &mut out);
    e.handle(Event::Accepted(at_gen(2, 7)), 0, &mut out);
    out.clear();
    e.handle(Event::LeaseLost(1), 1, &mut out);
    assert_eq!(gave_back(&out), vec![7]);
    assert!(!e.holds(1) && !e.holds(2));
}

#[test]
fn a_mark_confirmed_after_the_fence_margin_makes_no_call() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
    out.clear();
    e.handle(Event::Marked(1, Some(0)), MARGIN - 100, &mut out);
    assert!(!has_call(&out), "{out:?}");
    assert_eq!(gave_back(&out), vec![1]);
    // in time: called
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
    e.handle(Event::Marked(1, Some(0)), 500, &mut out);
    assert!(has_call(&out));
}

/// Defect 3: a mark retried through an outbox outage lands after the deadline.
#[test]
fn the_deadline_is_judged_again_when_the_call_would_start() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    let mut j = job(1, "wx");
    j.first_attempt_at = Some(0);
    j.calls = 1;
    j.attempts = 1;
    e.handle(Event::Loaded(vec![j]), 1_000, &mut out);
    assert_eq!(marks_of(&out), 1);
    out.clear();
    let hour = 3_600_000;
    e.handle(Event::Marked(1, None), 2 * hour, &mut out);
    assert!(!has_call(&out), "{out:?}");
    assert_eq!(
        records(&out).first().and_then(|r| final_of(r)),
        Some(JobState::Unknown)
    );
}

fn marks_of(out: &[Action]) -> usize {
    mark_gens(out).len()
}

#[test]
fn the_balance_after_a_duplicate_is_fetched_only_inside_the_fence() {
    for (answered_at, fetched) in [(300, true), (5_000, false)] {
        let mut e = shared();
        let mut out = Vec::new();
        e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
        e.handle(Event::Marked(1, Some(0)), 0, &mut out);
        out.clear();
        e.handle(
            Event::Answered(1, ans(OutcomeClass::Duplicate, 90012)),
            answered_at,
            &mut out,
        );
        assert_eq!(has_call(&out), fetched, "{out:?}");
        if !fetched {
            assert_eq!(
                records(&out).first().and_then(|r| final_of(r)),
                Some(JobState::Succeeded)
            );
        }
    }
}

/// A pending job joined by a re-send, read from the outbox with a call counted
/// but never answered, is uncertain (as when loaded at start).
#[test]
fn a_joined_job_with_an_unanswered_call_is_uncertain() {
    let mut e = Engine::new(cfg(), 1);
    let mut out = Vec::new();
    let mut j = job(1, "wx");
    j.calls = 2;
    j.attempts = 1;
    j.first_attempt_at = Some(0);
    e.handle(Event::Joined(j), 0, &mut out);
    e.handle(Event::Marked(1, None), 0, &mut out);
    out.clear();
    e.handle(
        Event::Answered(1, ans(OutcomeClass::Definitive, 90010)),
        1,
        &mut out,
    );
    assert_eq!(
        records(&out).first().and_then(|r| final_of(r)),
        Some(JobState::Unknown)
    );
}

/// Defect 2's race: a refused mark drops the player; a cancel taken in by this
/// worker's intake under the same generation, before the give-back lands, must
/// not run ahead of its pay (both are loaded in order under the next take).
#[test]
fn a_job_of_a_generation_given_back_is_not_run_here() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Accepted(at_gen(1, 2)), 0, &mut out);
    out.clear();
    e.handle(Event::LeaseLost(1), 1, &mut out);
    assert_eq!(gave_back(&out), vec![2]);
    out.clear();
    e.handle(Event::Accepted(at_gen(2, 2)), 2, &mut out);
    assert!(!e.holds(2) && out.is_empty(), "{out:?}");
    // the next take loads both, in order
    e.handle(
        Event::Claimed(vec![at_gen(1, 6), at_gen(2, 6)]),
        3,
        &mut out,
    );
    assert_eq!(mark_gens(&out), vec![(1, 6)]);
}

/// Renewals report a lost lease with the generation the engine named: jobs a
/// newer take of the same player brought in meanwhile are kept and run.
#[test]
fn a_lease_lost_at_an_older_generation_keeps_the_jobs_of_a_newer_take() {
    let mut e = shared();
    let mut out = Vec::new();
    e.handle(Event::Claimed(vec![at_gen(1, 1)]), 0, &mut out);
    assert_eq!(mark_gens(&out), vec![(1, 1)]);
    // the mark is fenced out: this worker no longer holds generation 1
    e.handle(Event::LeaseLost(1), 5, &mut out);
    out.clear();
    // it takes the player back at generation 3 before the coordinator's renewal
    e.handle(
        Event::Claimed(vec![at_gen(1, 3), at_gen(2, 3)]),
        10,
        &mut out,
    );
    assert_eq!(mark_gens(&out), vec![(1, 3)]);
    let held = e.players();
    assert_eq!(held.len(), 1);
    assert_eq!(held.first().map(|p| p.gen), Some(3));
    out.clear();
    // a renewal that still reports the generation-1 tenure as lost
    let lost = HeldPlayer {
        appid: "wx".into(),
        openid: "o".into(),
        gen: 1,
    };
    e.handle(Event::PlayersLost(vec![lost]), 20, &mut out);
    assert!(e.holds(1) && e.holds(2), "the generation-3 jobs stay");
    e.handle(Event::Marked(1, Some(20)), 21, &mut out);
    assert!(has_call(&out), "and job 1 is called under generation 3");
    out.clear();
    // lost at generation 3: job 1 finishes its call then drops; job 2 goes now
    let lost = HeldPlayer {
        appid: "wx".into(),
        openid: "o".into(),
        gen: 3,
    };
    e.handle(Event::PlayersLost(vec![lost]), 30, &mut out);
    assert!(e.holds(1) && !e.holds(2));
}

/// Marks run ahead of the call slots on a shared outbox too: a job marked while
/// every slot was busy calls as soon as one frees while its fence still covers
/// the call; one that waited past the fence's margin is marked again first (a
/// refresh, which counts no second call) and calls once that lands — its
/// attempt is still number 1.
#[test]
fn a_mark_that_waited_past_the_fence_margin_for_a_slot_is_refreshed_before_its_call() {
    for (freed_at, refreshed) in [(MARGIN - FENCE_SLACK_MS - 1, false), (MARGIN, true)] {
        let mut c = cfg();
        c.fence_margin_ms = Some(MARGIN);
        c.max_in_flight = 1;
        c.mark_ahead = 1;
        let mut e = Engine::new(c, 1);
        let mut out = Vec::new();
        let mut second = at_gen(2, 1);
        second.params.openid = "other".into();
        e.handle(Event::Accepted(at_gen(1, 1)), 0, &mut out);
        e.handle(Event::Accepted(second), 0, &mut out);
        assert_eq!(
            mark_list(&out),
            vec![(1, 1, false), (2, 1, false)],
            "one slot + one ahead"
        );
        out.clear();
        e.handle(Event::Marked(1, Some(0)), 0, &mut out);
        e.handle(Event::Marked(2, Some(0)), 0, &mut out);
        assert_eq!(calls(&out), vec![1], "job 2 waits for the slot");
        out.clear();
        e.handle(
            Event::Answered(1, ans(OutcomeClass::Success, 0)),
            freed_at,
            &mut out,
        );
        if !refreshed {
            assert_eq!(calls(&out), vec![2], "the fence still covers it");
            assert!(mark_list(&out).is_empty());
        } else {
            assert!(calls(&out).is_empty(), "no call on a stale fence: {out:?}");
            assert_eq!(mark_list(&out), vec![(2, 1, true)]);
            out.clear();
            e.handle(Event::Marked(2, Some(freed_at)), freed_at, &mut out);
            assert_eq!(calls(&out), vec![2]);
        }
        out.clear();
        e.handle(
            Event::Answered(2, ans(OutcomeClass::Success, 0)),
            freed_at + 10,
            &mut out,
        );
        let r = records(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].attempts_total, r[0].rows.first().map(|a| a.n)),
            (1, Some(1)),
            "one call, attempt 1 (refreshed: {refreshed})"
        );
    }
}
