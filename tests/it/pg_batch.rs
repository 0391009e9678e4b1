//! The PostgreSQL writer's batched statements keep every fence per row: the
//! pre-call marks of a whole writer batch go to the database in one statement
//! (arrays), and a mark made under a lease generation this worker does not hold
//! must still be refused alone while the others of the same statement land.

use crate::common::pg::TestDb;
use midas_worker::command::Op;
use midas_worker::engine::job::Job;
use midas_worker::outbox::postgres::writer::{Fence, PgWriter};
use midas_worker::outbox::IntakeOutcome;

/// A current-thread runtime: the marks sent together by `join!` are all queued
/// before the writer task runs, so they are one batch, one statement.
#[tokio::test(flavor = "current_thread")]
async fn a_stale_generation_mark_in_a_batched_statement_is_refused_while_the_others_land() {
    let db = TestDb::new("pgbatch").await;
    let fence = Fence {
        me: "test-worker".into(),
        lease_ms: 30_000,
        call_ms: 3_000,
    };
    let (w, task) = PgWriter::start(db.secret_url(), fence)
        .await
        .expect("writer");
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
    let good = |j: &Job| (j.id, now, j.lease_gen);
    // a generation this worker never held for the player (a take it has not seen)
    let stale = |j: &Job| (j.id, now, j.lease_gen + 1);

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

    w.flush().await.expect("flush");
    drop(w);
    task.await.expect("writer task");
    // the refused rows were not marked (no call counted, no attempt time set)
    let marked = |id: i64| {
        format!("SELECT count(*) FROM jobs WHERE id = {id} AND calls = 1 AND updated_at = {now}")
    };
    for (j, landed) in jobs.iter().zip([true, false, true, true, false, true]) {
        assert_eq!(
            db.count(&marked(j.id)).await,
            i64::from(landed),
            "job {}",
            j.id
        );
    }
}
