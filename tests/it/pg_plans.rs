//! The writes that find jobs by id use the primary key whatever the statistics say.
//! A shared outbox's statistics usually say few jobs are pending (a fresh outbox,
//! or any outbox between outages); an outage then leaves thousands pending. If a
//! pre-call mark or an outcome could pick the partial index on pending jobs for
//! `id = ANY(…)`, PostgreSQL would scan that whole index once per id — 200–350 ms
//! per writer batch, seen in `bench` draining a backlog (bug S in RELIABILITY.md).

use std::time::Duration;

use crate::common::pg::TestDb;
use midas_worker::command::Op;
use midas_worker::engine::{PreCallMark, Update};
use midas_worker::job::JobState;
use midas_worker::outbox::IntakeOutcome;

/// What PostgreSQL's statistics count on `jobs` so far: index scans of the partial
/// indexes on pending jobs, of the primary key, and rows updated. A backend
/// reports its counts at once when it exits (all of them in one go).
#[derive(Debug, Clone, Copy)]
struct Counts {
    partial: i64,
    pkey: i64,
    updated: i64,
}

async fn counts(db: &TestDb) -> Counts {
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT COALESCE((SELECT sum(idx_scan) FROM pg_stat_user_indexes WHERE relname = 'jobs' \
               AND indexrelname IN ('jobs_pending_player', 'jobs_unclaimed')), 0)::bigint, \
             COALESCE((SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'jobs_pkey'), 0)::bigint, \
             COALESCE((SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'jobs'), 0)::bigint",
            &[],
        )
        .await
        .expect("statistics");
    Counts {
        partial: row.get(0),
        pkey: row.get(1),
        updated: row.get(2),
    }
}

/// The counts once a writer that updated `rows` rows of `jobs` has reported them
/// (this test's own client updates none).
async fn reported(db: &TestDb, rows: i64) -> Counts {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = counts(db).await;
        if now.updated >= rows {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer's statistics never arrived: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn marks_and_outcomes_find_their_jobs_by_primary_key_when_statistics_say_few_are_pending() {
    let db = TestDb::new("pgplans").await;
    let (w, task) = db.writer().await;
    let c = db.client().await;
    // history: 20,000 finished jobs, and statistics taken then (none pending)
    c.batch_execute(
        "INSERT INTO jobs (op, bill_no, appid, openid, request, state, next_attempt_at, received_at, updated_at) \
         SELECT 'pay', 'OLD-' || n, 'wx1234567', 'old-' || (n % 5000), '{}', 'succeeded', 0, 0, 0 \
         FROM generate_series(1, 20000) n; ANALYZE jobs",
    )
    .await
    .expect("history");
    // 300 jobs this worker runs, and an outage's backlog of 20,000 others
    let mut jobs = Vec::new();
    for n in 0..300 {
        let bill = format!("B-PLAN-{n}");
        let mut i = crate::outbox_schema::intake("wx1234567", Op::Pay, &bill, None, &bill);
        i.command.params.openid = format!("plan-player-{n}");
        match w.intake(i).await {
            Ok(IntakeOutcome::New(j)) => jobs.push(j),
            other => panic!("intake {n}: {other:?}"),
        }
    }
    c.batch_execute(
        "INSERT INTO jobs (op, bill_no, appid, openid, request, state, next_attempt_at, received_at, updated_at) \
         SELECT 'pay', 'WAIT-' || n, 'wx1234567', 'wait-' || n, '{}', 'pending', 0, 0, 0 \
         FROM generate_series(1, 20000) n",
    )
    .await
    .expect("backlog");
    drop(w);
    task.await.expect("writer task");
    // the intake claimed each of its jobs (one update each)
    let before = reported(&db, jobs.len() as i64).await;

    // a writer of its own for the marks and the outcomes, each in one statement
    let (w, task) = db.writer().await;
    let marks: Vec<PreCallMark> = jobs
        .iter()
        .map(|j| PreCallMark {
            id: j.id,
            at: 1,
            gen: j.lease_gen,
            refresh: false,
        })
        .collect();
    let marked = w.mark_calls(marks).await.expect("marks");
    assert!(marked.lost.is_empty(), "{:?}", marked.lost);
    let done = |j: &midas_worker::engine::job::Job| {
        crate::pg_batch::outcome(
            j,
            j.lease_gen,
            Update::Final {
                state: JobState::Succeeded,
                reply: br#"{"status":"succeeded"}"#.to_vec(),
            },
        )
    };
    let landed = futures_util::future::join_all(jobs.iter().map(|j| w.record(done(j)))).await;
    assert!(landed.iter().all(|l| l.is_ok()), "every outcome landed");
    drop(w);
    task.await.expect("writer task");
    // each job marked once and finished once
    let after = reported(&db, before.updated + 2 * jobs.len() as i64).await;

    assert_eq!(
        after.partial - before.partial,
        0,
        "the marks and outcomes scanned a partial index on pending jobs"
    );
    assert!(after.pkey > before.pkey, "they used the primary key");
}
