//! The PostgreSQL writer's batched statements keep every fence per row: the
//! pre-call marks of a whole writer batch go to the database in one statement
//! (arrays), and a mark made under a lease generation this worker does not hold
//! must still be refused alone while the others of the same statement land; a
//! refresh mark in the same statement checks its fence without counting a call. The
//! same holds for a batch's intakes and outcomes, which go in a few statements
//! for the whole batch: each row is answered as the one-command statements would.

use crate::common::pg::TestDb;
use midas_worker::command::Op;
use midas_worker::engine::job::Job;
use midas_worker::engine::PreCallMark;
use midas_worker::outbox::IntakeOutcome;

/// A current-thread runtime: the marks sent together by `join!` are all queued
/// before the writer task runs, so they are one batch, one statement.
#[tokio::test(flavor = "current_thread")]
async fn a_stale_generation_mark_in_a_batched_statement_is_refused_while_the_others_land() {
    let db = TestDb::new("pgbatch").await;
    let (w, task) = db.writer().await;
    let mut jobs: Vec<Job> = Vec::new();
    for n in 0..6 {
        let bill = format!("B-PGMK-{n}");
        let mut i = crate::outbox_schema::intake("wx1234567", Op::Pay, &bill, None, &bill);
        i.command.params.openid = format!("mk-player-{n}");
        match w.intake(i).await {
            Ok(IntakeOutcome::New(j)) => jobs.push(j),
            other => panic!("intake {n}: {other:?}"),
        }
    }
    let now = 1_700_000_000_100;
    let mark = |j: &Job, at: i64, gen: i64, refresh: bool| PreCallMark {
        id: j.id,
        at,
        gen,
        refresh,
    };
    let good = |j: &Job| mark(j, now, j.lease_gen, false);
    // a generation this worker never held for the player (a take it has not seen)
    let stale = |j: &Job| mark(j, now, j.lease_gen + 1, false);

    // one request of three rows, the middle one stale
    let one = w
        .mark_calls(vec![good(&jobs[0]), stale(&jobs[1]), good(&jobs[2])])
        .await
        .expect("marks");
    assert_eq!(one.lost, vec![jobs[1].id]);

    // three requests in one writer batch: their rows share one statement
    let (a, b, c) = tokio::join!(
        w.mark_calls(vec![good(&jobs[3])]),
        w.mark_calls(vec![stale(&jobs[4])]),
        w.mark_calls(vec![good(&jobs[5])]),
    );
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert!(a.lost.is_empty(), "{:?}", a.lost);
    assert_eq!(b.lost, vec![jobs[4].id]);
    assert!(c.lost.is_empty(), "{:?}", c.lost);

    // one batch again: a refresh of job 0 (its call waited for a slot past the
    // fence's margin) beside a second mark of job 5, in one statement
    let later = now + 5_000;
    let (r, m) = tokio::join!(
        w.mark_calls(vec![mark(&jobs[0], later, jobs[0].lease_gen, true)]),
        w.mark_calls(vec![mark(&jobs[5], later, jobs[5].lease_gen, false)]),
    );
    assert!(r.expect("refresh").lost.is_empty());
    assert!(m.expect("mark").lost.is_empty());

    w.flush().await.expect("flush");
    drop(w);
    task.await.expect("writer task");
    // the refused rows were not marked (no call counted, no attempt time set); the
    // refresh counted no call
    let expected = [(1, later), (0, 0), (1, now), (1, now), (0, 0), (2, later)];
    for (j, (calls, at)) in jobs.iter().zip(expected) {
        let sql = if calls == 0 {
            format!(
                "SELECT count(*) FROM jobs WHERE id = {} AND calls = 0",
                j.id
            )
        } else {
            format!(
                "SELECT count(*) FROM jobs WHERE id = {} AND calls = {calls} AND updated_at = {at} \
                 AND first_attempt_at = {now}",
                j.id
            )
        };
        assert_eq!(db.count(&sql).await, 1, "job {}: {sql}", j.id);
    }
}

fn answer(code: i64, class: midas_worker::midas::OutcomeClass) -> midas_worker::midas::Answer {
    midas_worker::midas::Answer {
        api: midas_worker::midas::Api::Pay,
        class,
        http_status: Some(200),
        errcode: Some(code),
        errmsg: None,
        body: Default::default(),
        latency: std::time::Duration::ZERO,
    }
}

pub(crate) fn outcome(
    job: &Job,
    gen: i64,
    update: midas_worker::engine::Update,
) -> midas_worker::engine::Record {
    midas_worker::engine::Record {
        job_id: job.id,
        attempts_total: 1,
        first_attempt_at: Some(1),
        uncertain: false,
        rows: vec![midas_worker::engine::AttemptRow {
            n: 1,
            started_at: 1,
            answer: answer(0, midas_worker::midas::OutcomeClass::Success),
        }],
        update,
        now: 2,
        lease_gen: gen,
        session_guard: None,
    }
}

/// One writer batch of intakes mixing every kind of row — new jobs (two of one
/// player), a re-sent command of a pending job, a conflicting one, a repeat of a
/// new key within the batch, a re-open with a new session_key, a new job of a
/// player another worker holds and one of a player with a job this worker has not
/// loaded — then one batch of outcomes, one of them under a lease generation this
/// worker does not hold: every row gets the answer the one-command statements
/// give it, and the fenced outcome alone is refused.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_of_mixed_intakes_and_outcomes_answers_each_row_as_alone() {
    use midas_worker::engine::Update;
    use midas_worker::job::JobState;
    use midas_worker::midas::OutcomeClass;
    let db = TestDb::new("pgmix").await;
    let (w, task) = db.writer().await;
    let cmd = |bill: &str, player: &str, key: Option<&str>| {
        let mut i = crate::outbox_schema::intake("wx1234567", Op::Pay, bill, key, bill);
        i.command.params.openid = player.into();
        i
    };
    let new = |o: Result<IntakeOutcome, _>| match o {
        Ok(IntakeOutcome::New(j)) => j,
        other => panic!("not new: {other:?}"),
    };
    // before the batch: a pending job, two to finish, one failed on a session problem
    let pending = new(w.intake(cmd("B-MIX-P", "mix-p", None)).await);
    let f1 = new(w.intake(cmd("B-MIX-F1", "mix-f1", None)).await);
    let f2 = new(w.intake(cmd("B-MIX-F2", "mix-f2", None)).await);
    let sk = new(w.intake(cmd("B-MIX-R", "mix-r", Some("SK-1"))).await);
    let failed = w
        .record(midas_worker::engine::Record {
            rows: vec![midas_worker::engine::AttemptRow {
                n: 1,
                started_at: 1,
                answer: answer(90010, OutcomeClass::Definitive),
            }],
            ..outcome(
                &sk,
                sk.lease_gen,
                Update::Final {
                    state: JobState::Failed,
                    reply: br#"{"status":"failed"}"#.to_vec(),
                },
            )
        })
        .await
        .expect("90010");
    assert_eq!(failed.replies.len(), 1);
    // a player another worker holds, and one with a pending job nobody loaded here
    let admin = db.client().await;
    admin
        .batch_execute(
            "INSERT INTO player_leases (appid, openid, owner, expires_at) \
             VALUES ('wx1234567', 'mix-held', 'other-worker', 9000000000000); \
             INSERT INTO jobs (op, bill_no, appid, openid, request, state, next_attempt_at, \
               received_at, updated_at, claimed_by) \
             VALUES ('pay', 'B-MIX-GHOST', 'wx1234567', 'mix-u', '{}', 'pending', 1, 1, 1, 'gone-worker')",
        )
        .await
        .expect("set-up rows");

    let mut conflicting = cmd("B-MIX-P", "mix-p", None);
    conflicting.command.params.amt = Some(99);
    conflicting.correlation_id = "c-conflict".into();
    let mut again = cmd("B-MIX-P", "mix-p", None);
    again.correlation_id = "c-again".into();
    let mut repeat = cmd("B-MIX-N1", "mix-n", None);
    repeat.correlation_id = "c-repeat".into();
    let (n1, n2, joined, conflict, repeated, reopened, held, unloaded) = tokio::join!(
        w.intake(cmd("B-MIX-N1", "mix-n", None)),
        w.intake(cmd("B-MIX-N2", "mix-n", None)),
        w.intake(again),
        w.intake(conflicting),
        w.intake(repeat),
        w.intake(cmd("B-MIX-R", "mix-r", Some("SK-2"))),
        w.intake(cmd("B-MIX-H", "mix-held", None)),
        w.intake(cmd("B-MIX-U", "mix-u", None)),
    );
    let (n1, n2) = (new(n1), new(n2));
    assert!(n1.id < n2.id, "arrival order kept: {} {}", n1.id, n2.id);
    assert_eq!(n1.lease_gen, n2.lease_gen);
    match joined {
        Ok(IntakeOutcome::Joined {
            job_id,
            reply: None,
            pending: Some(j),
        }) => {
            assert_eq!(job_id, pending.id);
            assert_eq!(j.lease_gen, pending.lease_gen);
        }
        other => panic!("re-sent: {other:?}"),
    }
    assert!(
        matches!(conflict, Ok(IntakeOutcome::Conflict { job_id }) if job_id == pending.id),
        "{conflict:?}"
    );
    match repeated {
        Ok(IntakeOutcome::Joined {
            job_id,
            reply: None,
            pending: Some(j),
        }) => {
            assert_eq!(job_id, n1.id);
            assert_eq!(j.lease_gen, n1.lease_gen);
        }
        other => panic!("repeat within the batch: {other:?}"),
    }
    match reopened {
        Ok(IntakeOutcome::Reopened(j)) => assert_eq!(j.id, sk.id),
        other => panic!("re-open: {other:?}"),
    }
    assert!(
        matches!(held, Ok(IntakeOutcome::Elsewhere { .. })),
        "{held:?}"
    );
    assert!(
        matches!(unloaded, Ok(IntakeOutcome::Elsewhere { .. })),
        "{unloaded:?}"
    );
    // what the rows say: every command recorded once with its reply target, the
    // jobs claimed only where this worker runs them, the ghost job left to a load
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no LIKE 'B-MIX-%'")
            .await,
        9
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.bill_no IN ('B-MIX-P', 'B-MIX-N1')"
        )
        .await,
        4,
        "B-MIX-P: first and c-again (a conflict adds none); B-MIX-N1: first and c-repeat"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM jobs WHERE claimed_by = 'test-worker' \
             AND bill_no IN ('B-MIX-N1', 'B-MIX-N2', 'B-MIX-R')"
        )
        .await,
        3
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM jobs WHERE claimed_by IS NULL \
             AND bill_no IN ('B-MIX-H', 'B-MIX-U', 'B-MIX-GHOST')"
        )
        .await,
        3
    );

    // one batch of outcomes: a final under the current generation, one under a
    // generation this worker never held, and a retry
    let done = |state: JobState| Update::Final {
        state,
        reply: br#"{"status":"succeeded"}"#.to_vec(),
    };
    let (a, b, c) = tokio::join!(
        w.record(outcome(&f1, f1.lease_gen, done(JobState::Succeeded))),
        w.record(outcome(&f2, f2.lease_gen + 1, done(JobState::Succeeded))),
        w.record(outcome(
            &n1,
            n1.lease_gen,
            Update::Retry {
                next_attempt_at: 77
            }
        )),
    );
    let a = a.expect("current generation lands");
    assert_eq!(a.replies.len(), 1, "its reply is owed to its one target");
    assert_eq!(a.replies[0].correlation_id, "B-MIX-F1");
    assert!(
        matches!(b, Err(midas_worker::outbox::OutboxError::LeaseLost)),
        "{b:?}"
    );
    assert!(c.expect("retry lands").replies.is_empty());
    w.flush().await.expect("flush");
    drop(w);
    task.await.expect("writer task");
    let state = |bill: &str| {
        format!(
            "SELECT count(*) FROM jobs WHERE bill_no = '{bill}' AND state = 'succeeded' \
             AND result IS NOT NULL"
        )
    };
    assert_eq!(db.count(&state("B-MIX-F1")).await, 1);
    assert_eq!(db.count(&state("B-MIX-F2")).await, 0, "fenced out");
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no = 'B-MIX-N1' AND next_attempt_at = 77")
            .await,
        1
    );
    // the calls happened: every attempt is kept, the fenced one's too
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM attempts WHERE job_id IN ({}, {}, {})",
            f1.id, f2.id, n1.id
        ))
        .await,
        3
    );
}

/// A writer batch is sorted by player (leases are locked in one order), yet a
/// player's commands still get their job ids — the order its jobs run in — in the
/// order they came, whichever players' commands come between them.
#[tokio::test(flavor = "current_thread")]
async fn a_players_jobs_keep_their_arrival_order_through_a_sorted_batch() {
    let db = TestDb::new("pgorder").await;
    let (w, task) = db.writer().await;
    // 7 players × 40 commands, interleaved, sent before any is answered
    let sends = (0..40).flat_map(|n| {
        (0..7).map(move |p| {
            let bill = format!("B-ORDER-{p}-{n:02}");
            let mut i = crate::outbox_schema::intake("wx1234567", Op::Pay, &bill, None, &bill);
            i.command.params.openid = format!("order-player-{p}");
            i
        })
    });
    let answers = futures_util::future::join_all(sends.map(|i| w.intake(i))).await;
    for a in answers {
        assert!(
            matches!(
                a,
                Ok(IntakeOutcome::New(_)) | Ok(IntakeOutcome::Elsewhere { .. })
            ),
            "{a:?}"
        );
    }
    w.flush().await.expect("flush");
    drop(w);
    task.await.expect("writer task");
    let c = db.client().await;
    for p in 0..7 {
        let rows = c
            .query(
                "SELECT bill_no FROM jobs WHERE openid = $1 ORDER BY id",
                &[&format!("order-player-{p}")],
            )
            .await
            .expect("jobs");
        let bills: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let mut sorted = bills.clone();
        sorted.sort();
        assert_eq!(bills.len(), 40);
        assert_eq!(bills, sorted, "player {p}'s jobs in arrival order");
    }
}
