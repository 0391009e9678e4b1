//! A reply confirm racing a re-open of its job on the shared outbox. A job ended on a
//! session problem and its reply was published; before the broker's confirm is
//! written, a re-sent command with a new session_key re-opens the job in another
//! transaction (another worker, or this worker's other writer connection): the
//! job's result is cleared and every reply target is owed the next final reply
//! again (`published_at = NULL`). The confirm must not mark that target published
//! with the old reply: the target would never get the new one. The confirm reads
//! the job's reply under a row lock, so it waits for the re-open and then sees it.

use std::time::Duration;

use crate::common::pg::TestDb;
use midas_worker::command::Op;
use midas_worker::engine::{PreCallMark, Update};
use midas_worker::job::JobState;
use midas_worker::outbox::writer::Confirmed;
use midas_worker::outbox::IntakeOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_waiting_on_a_reopen_leaves_the_target_owed_the_next_reply() {
    let db = TestDb::new("confirmrace").await;
    let (w, task) = db.writer().await;
    let bill = "B-CONFIRM-RACE";
    let i = crate::outbox_schema::intake("wx1234567", Op::Pay, bill, Some("key-1"), "c1");
    let job = match w.intake(i).await {
        Ok(IntakeOutcome::New(j)) => j,
        other => panic!("intake: {other:?}"),
    };
    let marked = w
        .mark_calls(vec![PreCallMark {
            id: job.id,
            at: 1,
            gen: job.lease_gen,
            refresh: false,
        }])
        .await
        .expect("mark");
    assert!(marked.lost.is_empty());
    let reply = br#"{"status":"failed","errcode":90010}"#.to_vec();
    let landed = w
        .record(crate::pg_batch::outcome(
            &job,
            job.lease_gen,
            Update::Final {
                state: JobState::Failed,
                reply,
            },
        ))
        .await
        .expect("final outcome");
    let published = landed.replies.first().expect("the reply to publish");
    let target = published.target_id.expect("an outbox reply");
    let confirm = Confirmed::of(published, false).expect("a confirm");

    // the re-open, in a transaction of its own that holds its row locks
    let mut other = db.client().await;
    let reopen = other.transaction().await.expect("begin");
    reopen
        .execute(
            "UPDATE jobs SET state = 'pending', session_key = 'key-2', result = NULL, \
             finished_at = NULL, reopened_at = 3, updated_at = 3, claimed_by = NULL WHERE id = $1",
            &[&job.id],
        )
        .await
        .expect("re-open the job");
    reopen
        .execute(
            "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = $1",
            &[&job.id],
        )
        .await
        .expect("owe every target the next reply");

    // the broker's confirm of the old reply reaches the writer meanwhile
    w.published(vec![confirm], 4);
    let flushed = tokio::spawn({
        let w = w.clone();
        async move { w.flush().await }
    });
    // it waits for the re-open's row locks (with or without the fix: the target
    // row is locked too); the re-open commits only once it is seen waiting
    let watch = db.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            !flushed.is_finished(),
            "the confirm landed without waiting for the re-open"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the confirm never reached the re-open's locks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reopen.commit().await.expect("commit the re-open");
    flushed
        .await
        .expect("flush task")
        .expect("the confirm's batch");

    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM reply_targets WHERE id = {target} AND published_at IS NULL"
        ))
        .await,
        1,
        "the re-opened job's target is owed its next final reply"
    );
    drop(w);
    task.await.expect("writer task");
}
