//! A re-sent command with a new session_key that arrives while the job's outcome
//! is being decided: when that outcome ends the job on a session problem (90010
//! with the old key), the job is not ended — it runs again with the new key, and
//! neither the original command nor the re-send gets the failure. Against the
//! real writers: SQLite and PostgreSQL.

use std::time::Duration;

use midas_worker::command::Op;
use midas_worker::engine::{AttemptRow, Record, SessionGuard, Update};
use midas_worker::job::JobState;
use midas_worker::midas::{Answer, Api, Body, OutcomeClass};
use midas_worker::outbox::{IntakeOutcome, Landed, OutboxError};
use midas_worker::secret::Secret;

use crate::common::pg::TestDb;
use crate::outbox_schema::intake;

const OLD: &str = "session-key-OLD-1";
const NEW: &str = "session-key-NEW-2";

fn answer(class: OutcomeClass, code: i64) -> Answer {
    Answer {
        api: Api::Pay,
        class,
        http_status: Some(200),
        errcode: Some(code),
        errmsg: None,
        body: Body::default(),
        latency: Duration::from_millis(5),
    }
}

/// The outcome the engine decides after 90010 on a call made with `used`.
fn session_failure(job_id: i64, gen: i64, used: &str) -> Record {
    Record {
        job_id,
        attempts_total: 1,
        first_attempt_at: Some(1_700_000_000_100),
        uncertain: false,
        rows: vec![AttemptRow {
            n: 1,
            started_at: 1_700_000_000_100,
            answer: answer(OutcomeClass::Definitive, 90010),
        }],
        update: Update::Final {
            state: JobState::Failed,
            reply: br#"{"status":"failed","errcode":90010}"#.to_vec(),
        },
        now: 1_700_000_000_200,
        lease_gen: gen,
        session_guard: Some(SessionGuard {
            used: Some(Secret::new(used)),
        }),
    }
}

fn success(job_id: i64, gen: i64) -> Record {
    Record {
        job_id,
        attempts_total: 2,
        first_attempt_at: Some(1_700_000_000_100),
        uncertain: false,
        rows: vec![AttemptRow {
            n: 2,
            started_at: 1_700_000_000_300,
            answer: answer(OutcomeClass::Success, 0),
        }],
        update: Update::Final {
            state: JobState::Succeeded,
            reply: br#"{"status":"succeeded"}"#.to_vec(),
        },
        now: 1_700_000_000_400,
        lease_gen: gen,
        session_guard: None,
    }
}

/// The steps both writers go through; `record` and `intake` are the writer's.
async fn race<I, R, IF, RF>(intake_fn: I, record_fn: R, bill: &str) -> Vec<Landed>
where
    I: Fn(midas_worker::outbox::Intake) -> IF,
    R: Fn(Record) -> RF,
    IF: std::future::Future<Output = Result<IntakeOutcome, OutboxError>>,
    RF: std::future::Future<Output = Result<Landed, OutboxError>>,
{
    let first = intake_fn(intake("wx1234567", Op::Pay, bill, Some(OLD), "c-1"))
        .await
        .expect("intake");
    let IntakeOutcome::New(job) = first else {
        panic!("expected a new job: {first:?}")
    };
    // the call with OLD is out; the re-send with NEW joins the pending job
    let again = intake_fn(intake("wx1234567", Op::Pay, bill, Some(NEW), "c-2"))
        .await
        .expect("intake");
    assert!(
        matches!(again, IntakeOutcome::Joined { .. }),
        "the re-send joins the pending job: {again:?}"
    );
    // the call's 90010 (decided with OLD) is written now
    let reopened = record_fn(session_failure(job.id, job.lease_gen, OLD))
        .await
        .expect("record");
    // the job ran again with NEW and succeeded
    let done = record_fn(success(job.id, job.lease_gen))
        .await
        .expect("record");
    // and a plain 90010 with the key the job holds ends it (no re-open loop)
    let third = format!("{bill}-b");
    let IntakeOutcome::New(other) =
        intake_fn(intake("wx1234567", Op::Pay, &third, Some(OLD), "c-3"))
            .await
            .expect("intake")
    else {
        panic!("expected a new job")
    };
    let ended = record_fn(session_failure(other.id, other.lease_gen, OLD))
        .await
        .expect("record");
    vec![reopened, done, ended]
}

fn check(landed: &[Landed]) {
    let [reopened, done, ended] = landed else {
        panic!("three outcomes")
    };
    assert_eq!(
        reopened.reopened_with.as_ref().map(Secret::expose),
        Some(NEW),
        "the 90010 of the old key re-opens the job with the new one"
    );
    assert!(reopened.replies.is_empty(), "nobody is told `failed`");
    let mut got: Vec<&str> = done
        .replies
        .iter()
        .map(|r| r.correlation_id.as_str())
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec!["c-1", "c-2"], "both commands get the success");
    assert!(done
        .replies
        .iter()
        .all(|r| &*r.payload == br#"{"status":"succeeded"}"#));
    assert!(ended.reopened_with.is_none());
    assert_eq!(
        ended.replies.len(),
        1,
        "without a newer key, 90010 is final"
    );
}

#[tokio::test]
async fn sqlite_a_new_session_key_during_a_session_failure_runs_the_job_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let (w, _join) = midas_worker::outbox::Writer::start(&path, None).expect("writer");
    let landed = race(|i| w.intake(i), |r| w.record(r), "B-SR-1").await;
    check(&landed);
    w.flush().await.expect("flush");
    let c = midas_worker::outbox::open_existing_rw(&path).expect("open");
    let (reopened_at, attempts): (Option<i64>, i64) = c
        .query_row(
            "SELECT reopened_at, attempts FROM jobs WHERE bill_no = 'B-SR-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("row");
    assert_eq!(reopened_at, Some(1_700_000_000_200), "a new retry period");
    assert_eq!(attempts, 2, "both calls are in the audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_new_session_key_during_a_session_failure_runs_the_job_again() {
    let db = TestDb::new("sessrace").await;
    let (w, task) = db.writer().await;
    let landed = race(|i| w.intake(i), |r| w.record(r), "B-SR-2").await;
    check(&landed);
    drop(w);
    task.await.expect("writer task");
    assert_eq!(
        db.count("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.bill_no = 'B-SR-2'")
            .await,
        2,
        "both calls are in the audit"
    );
}
