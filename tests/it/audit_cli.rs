//! The `midas-worker outbox ...` verbs against a real outbox: the harness their
//! tests share, and the writer's handling of reply confirms that they read.
//!
//! The outbox is built through the pipeline's own writer (`Writer::intake` /
//! `Writer::record`), so these tests read exactly what the worker writes. Each verb
//! is run through `audit::run` with the arguments parsed by clap, as the binary
//! parses them, and its output captured in memory. The verbs' tests are in
//! `audit_reads.rs` (list, show, stats, export) and `audit_actions.rs` (retry,
//! republish, prune); `pg_ops.rs` runs them on PostgreSQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use rusqlite::Connection;
use serde_json::{json, Value};

use midas_worker::audit::{self, AuditError, OutboxCmd};
use midas_worker::command::{now_ms, Command, Op, Params};
use midas_worker::config::{load_from, Settings};
use midas_worker::engine::{AttemptRow, Record, Update};
use midas_worker::job::JobState;
use midas_worker::midas::{Answer, Api, Body, OutcomeClass};
use midas_worker::outbox::writer::Confirmed;
use midas_worker::outbox::{Intake, IntakeOutcome, OutgoingReply, Writer};
use midas_worker::secret::Secret;

pub(crate) const SECRET: &str = "SK-SECRET-do-not-print";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

#[derive(Parser)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: OutboxCmd,
}

pub(crate) fn settings_for(path: &Path) -> Settings {
    let env: BTreeMap<String, String> = [(
        "MIDAS_WORKER__OUTBOX__PATH".to_string(),
        path.display().to_string(),
    )]
    .into();
    load_from(include_str!("../../config.toml"), &env, "t").expect("shipped config loads")
}

/// Run `outbox <args>`; the output, and the error if any.
pub(crate) fn outbox(s: &Settings, args: &[&str]) -> (Result<(), AuditError>, String) {
    let cli = Cli::try_parse_from(std::iter::once("outbox").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("outbox {args:?}: {e}"));
    let mut out = Vec::new();
    let r = audit::run(&cli.cmd, s, &mut out);
    let text = String::from_utf8(out).expect("utf-8 output");
    assert!(
        !text.contains(SECRET),
        "session_key in output of {args:?}:\n{text}"
    );
    if let Err(e) = &r {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg}");
        assert!(!msg.contains(SECRET));
    }
    (r, text)
}

pub(crate) fn ok(s: &Settings, args: &[&str]) -> String {
    let (r, text) = outbox(s, args);
    if let Err(e) = r {
        panic!("outbox {args:?} failed: {e}\n{text}");
    }
    text
}

pub(crate) fn err(s: &Settings, args: &[&str]) -> AuditError {
    match outbox(s, args) {
        (Err(e), _) => e,
        (Ok(()), text) => panic!("outbox {args:?} should fail; printed:\n{text}"),
    }
}

pub(crate) fn answer(
    api: Api,
    class: OutcomeClass,
    http: Option<u16>,
    code: Option<i64>,
    msg: &str,
) -> Answer {
    Answer {
        api,
        class,
        http_status: http,
        errcode: code,
        errmsg: Some(msg.to_string()),
        body: Body::default(),
        latency: Duration::from_millis(42),
    }
}

fn params(op: Op, bill_no: &str, openid: &str) -> Params {
    Params {
        op,
        bill_no: Some(bill_no.into()),
        openid: openid.into(),
        appid: "wx1234567".into(),
        zone_id: "1".into(),
        pf: "android".into(),
        user_ip: None,
        amt: (op == Op::Pay).then_some(10),
        present_counts: (op == Op::Present).then_some(3),
        pay_item: None,
        app_remark: None,
        query: None,
        pay_bill_no: None,
    }
}

pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    pub(crate) settings: Settings,
}

impl Fixture {
    pub(crate) fn conn(&self) -> Connection {
        Connection::open(&self.path).expect("open outbox")
    }

    pub(crate) fn count(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get(0))
            .expect("count query")
    }
}

/// Drives one job through the writer the way the dispatcher does.
pub(crate) struct Jobber<'a> {
    pub(crate) w: &'a Writer,
}

impl Jobber<'_> {
    pub(crate) async fn intake(
        &self,
        op: Op,
        bill_no: &str,
        openid: &str,
        corr: &str,
        now: i64,
    ) -> i64 {
        self.intake_as("wx1234567", op, bill_no, openid, corr, now)
            .await
    }

    pub(crate) async fn intake_as(
        &self,
        appid: &str,
        op: Op,
        bill_no: &str,
        openid: &str,
        corr: &str,
        now: i64,
    ) -> i64 {
        let mut p = params(op, bill_no, openid);
        p.appid = appid.into();
        let out = self
            .w
            .intake(Intake {
                command: Command {
                    params: p,
                    session_key: Some(Secret::new(SECRET)),
                },
                reply_to: "midas.results".into(),
                correlation_id: corr.into(),
                now,
            })
            .await
            .expect("intake");
        match out {
            IntakeOutcome::New(job) => job.id,
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn attempt(
        &self,
        job_id: i64,
        n: u32,
        first: i64,
        at: i64,
        a: Answer,
        fin: Option<JobState>,
        reply: Value,
    ) -> Vec<OutgoingReply> {
        let update = match fin {
            None => Update::Retry {
                next_attempt_at: at + 500,
            },
            Some(state) => Update::Final {
                state,
                reply: serde_json::to_vec(&reply).expect("reply json"),
            },
        };
        self.w
            .record(Record {
                session_guard: None,
                job_id,
                attempts_total: n,
                first_attempt_at: Some(first),
                uncertain: false,
                rows: vec![AttemptRow {
                    n,
                    started_at: at,
                    answer: a,
                }],
                update,
                now: at + 42,
                lease_gen: 0,
            })
            .await
            .expect("record")
            .replies
    }

    fn confirm(&self, replies: &[OutgoingReply], returned: bool, now: i64) {
        let ids = replies
            .iter()
            .filter_map(|r| Confirmed::of(r, returned))
            .collect();
        self.w.published(ids, now);
    }
}

pub(crate) fn reply(bill_no: &str, status: &str, errcode: i64, attempts: u32) -> Value {
    json!({"op": "pay", "bill_no": bill_no, "openid": "o", "appid": "wx1234567",
           "status": status, "errcode": errcode, "attempts": attempts})
}

/// The outbox every test starts from:
///
/// | bill_no  | op         | story                                                 |
/// |----------|------------|-------------------------------------------------------|
/// | B-TRANS  | pay        | -1, timeout, 90012 → succeeded; reply confirmed       |
/// | B-UNK    | pay        | -1 (1 h ago) → unknown                                |
/// | B-UNK-OLD| pay        | first call 50 h ago, → unknown                        |
/// | B-BAL    | pay        | 90013 → failed (errmsg with comma, quote, newline)    |
/// | B-SESS   | pay        | 90010 → failed                                        |
/// | B-SIG    | pay        | 90011 → failed                                        |
/// | B-PEND   | present    | received 200 d ago, -1, still pending                 |
/// | B-OLD    | pay        | succeeded 100 d ago                                   |
/// | B-CXL    | pay        | succeeded                                             |
/// | B-CXL    | cancel_pay | -1 → unknown                                          |
/// | B-RET    | pay        | succeeded; reply returned (no such queue)             |
pub(crate) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data").join("outbox.sqlite");
    let settings = settings_for(&path);
    let (w, join) = Writer::start(&path, None).expect("writer starts");
    let j = Jobber { w: &w };
    let now = now_ms();
    let t0 = now - 2 * HOUR;
    use OutcomeClass::*;

    // B-TRANS: -1, timeout, 90012.
    let id = j.intake(Op::Pay, "B-TRANS", "o-trans", "c-trans", t0).await;
    j.attempt(
        id,
        1,
        t0,
        t0,
        answer(Api::Pay, Transient, Some(200), Some(-1), "system error"),
        None,
        Value::Null,
    )
    .await;
    j.attempt(
        id,
        2,
        t0,
        t0 + 1000,
        answer(Api::Pay, Transient, None, None, "timeout"),
        None,
        Value::Null,
    )
    .await;
    let mut ok_reply = reply("B-TRANS", "succeeded", 90012, 3);
    ok_reply["duplicate"] = json!(true);
    let out = j
        .attempt(
            id,
            3,
            t0,
            t0 + 3000,
            answer(
                Api::Pay,
                Duplicate,
                Some(200),
                Some(90012),
                "order already exists",
            ),
            Some(JobState::Succeeded),
            ok_reply,
        )
        .await;
    assert_eq!(out.len(), 1);
    j.confirm(&out, false, t0 + 3100);

    // B-UNK: recent unknown.
    let t = now - HOUR;
    let id = j.intake(Op::Pay, "B-UNK", "o-unk", "c-unk", t).await;
    j.attempt(
        id,
        1,
        t,
        t,
        answer(Api::Pay, Transient, Some(200), Some(-1), "system error"),
        Some(JobState::Unknown),
        reply("B-UNK", "unknown", -1, 1),
    )
    .await;

    // B-UNK-OLD: first call 50 h ago.
    let t = now - 50 * HOUR;
    let id = j
        .intake(Op::Pay, "B-UNK-OLD", "o-old", "c-unk-old", t)
        .await;
    j.attempt(
        id,
        1,
        t,
        t,
        answer(Api::Pay, Transient, Some(502), None, "HTTP 502"),
        None,
        Value::Null,
    )
    .await;
    j.attempt(
        id,
        2,
        t,
        now - 26 * HOUR,
        answer(Api::Pay, Transient, Some(200), Some(-1), "system error"),
        Some(JobState::Unknown),
        reply("B-UNK-OLD", "unknown", -1, 2),
    )
    .await;

    // Definitive failures.
    for (bill, code, msg) in [
        (
            "B-BAL",
            90013,
            "insufficient balance, \"really\"\nsecond line",
        ),
        ("B-SESS", 90010, "session expired"),
        ("B-SIG", 90011, "signature wrong"),
    ] {
        let t = now - 30 * 60_000;
        let id = j
            .intake(Op::Pay, bill, "o-fail", &format!("c-{bill}"), t)
            .await;
        let out = j
            .attempt(
                id,
                1,
                t,
                t,
                answer(Api::Pay, Definitive, Some(200), Some(code), msg),
                Some(JobState::Failed),
                reply(bill, "failed", code, 1),
            )
            .await;
        j.confirm(&out, false, t + 100);
    }

    // B-PEND: received long ago, still pending (must survive prune).
    let t = now - 200 * DAY;
    let id = j.intake(Op::Present, "B-PEND", "o-pend", "c-pend", t).await;
    j.attempt(
        id,
        1,
        now - HOUR,
        now - HOUR,
        answer(Api::Present, Transient, Some(200), Some(-1), "system error"),
        None,
        Value::Null,
    )
    .await;

    // B-OLD: finished 100 days ago.
    let t = now - 100 * DAY;
    let id = j.intake(Op::Pay, "B-OLD", "o-old", "c-old", t).await;
    let out = j
        .attempt(
            id,
            1,
            t,
            t,
            answer(Api::Pay, Success, Some(200), Some(0), "ok"),
            Some(JobState::Succeeded),
            reply("B-OLD", "succeeded", 0, 1),
        )
        .await;
    j.confirm(&out, false, t + 100);

    // B-CXL: pay succeeded, its cancel_pay ended unknown.
    let t = now - 20 * 60_000;
    let id = j.intake(Op::Pay, "B-CXL", "o-cxl", "c-cxl", t).await;
    let out = j
        .attempt(
            id,
            1,
            t,
            t,
            answer(Api::Pay, Success, Some(200), Some(0), "ok"),
            Some(JobState::Succeeded),
            reply("B-CXL", "succeeded", 0, 1),
        )
        .await;
    j.confirm(&out, false, t + 100);
    let t = t + 60_000;
    let id = j
        .intake(Op::CancelPay, "B-CXL", "o-cxl", "c-cxl-cancel", t)
        .await;
    j.attempt(
        id,
        1,
        t,
        t,
        answer(
            Api::CancelPay,
            Transient,
            Some(200),
            Some(-1),
            "system error",
        ),
        Some(JobState::Unknown),
        reply("B-CXL", "unknown", -1, 1),
    )
    .await;

    // B-RET: succeeded, reply returned (no such queue).
    let t = now - 10 * 60_000;
    let id = j.intake(Op::Pay, "B-RET", "o-ret", "c-ret", t).await;
    let out = j
        .attempt(
            id,
            1,
            t,
            t,
            answer(Api::Pay, Success, Some(200), Some(0), "ok"),
            Some(JobState::Succeeded),
            reply("B-RET", "succeeded", 0, 1),
        )
        .await;
    j.confirm(&out, true, t + 100);

    w.flush().await.expect("flush");
    drop(w);
    join.join().expect("writer thread");
    Fixture {
        _dir: dir,
        path,
        settings,
    }
}

/// A confirm that reaches the writer after the job was re-opened (the game
/// re-sent the command with a new session_key, same reply target) must not mark
/// the target published: the job's next final reply is then still owed to it.
#[tokio::test]
async fn a_late_confirm_of_a_reopened_jobs_old_reply_leaves_the_new_one_owed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let (w, join) = Writer::start(&path, None).expect("writer starts");
    let j = Jobber { w: &w };
    let t = now_ms();
    let id = j.intake(Op::Pay, "B-LATE", "o-late", "c-late", t).await;
    let old = j
        .attempt(
            id,
            1,
            t,
            t,
            answer(
                Api::Pay,
                OutcomeClass::Definitive,
                Some(200),
                Some(90010),
                "session",
            ),
            Some(JobState::Failed),
            reply("B-LATE", "failed", 90010, 1),
        )
        .await;
    assert_eq!(old.len(), 1, "the failed reply is owed to its target");
    // the re-send (new session_key, same target) re-opens the job first ...
    let again = w
        .intake(Intake {
            command: Command {
                params: params(Op::Pay, "B-LATE", "o-late"),
                session_key: Some(Secret::new("SK-NEW")),
            },
            reply_to: "midas.results".into(),
            correlation_id: "c-late".into(),
            now: t + 10,
        })
        .await
        .expect("intake");
    assert!(matches!(again, IntakeOutcome::Reopened(_)), "{again:?}");
    // ... then the broker's confirm of the old reply arrives
    j.confirm(&old, false, t + 20);
    w.flush().await.expect("flush");
    let new = j
        .attempt(
            id,
            2,
            t,
            t + 30,
            answer(Api::Pay, OutcomeClass::Success, Some(200), Some(0), "ok"),
            Some(JobState::Succeeded),
            reply("B-LATE", "succeeded", 0, 2),
        )
        .await;
    assert_eq!(
        new.iter()
            .map(|r| r.correlation_id.as_str())
            .collect::<Vec<_>>(),
        ["c-late"],
        "the new final reply is published to the target"
    );
    drop(w);
    join.join().expect("writer thread");
}

/// Published marks alone wait to share a commit with the next request (a commit and
/// an fsync fewer per job at low rates), but are never lost: a quiet writer commits
/// them at its next tick, and a stopping writer before it ends.
#[tokio::test]
async fn published_marks_held_for_a_shared_commit_land_when_quiet_and_at_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let (w, join) = Writer::start(&path, None).expect("writer starts");
    let j = Jobber { w: &w };
    let t = now_ms();
    let mut owed = Vec::new();
    for (i, bill) in ["B-Q1", "B-Q2"].into_iter().enumerate() {
        let id = j.intake(Op::Pay, bill, &format!("o-{i}"), bill, t).await;
        let ok = answer(Api::Pay, OutcomeClass::Success, Some(200), Some(0), "ok");
        owed.push(
            j.attempt(
                id,
                1,
                t,
                t,
                ok,
                Some(JobState::Succeeded),
                reply(bill, "succeeded", 0, 1),
            )
            .await,
        );
    }
    let unpublished = |bill: &str| -> i64 {
        Connection::open(&path)
            .expect("open")
            .query_row(
                "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
                 WHERE j.bill_no = ?1 AND t.published_at IS NULL",
                [bill],
                |r| r.get(0),
            )
            .expect("count")
    };
    // nothing else comes: the tick (1 s) commits the held mark
    j.confirm(&owed[0], false, t + 1);
    let landed =
        crate::common::eventually(Duration::from_secs(5), || unpublished("B-Q1") == 0).await;
    assert!(
        landed,
        "a held published mark of a quiet writer was never committed"
    );
    // the writer stops right after: the held mark is committed before it ends
    j.confirm(&owed[1], false, t + 2);
    drop(w);
    join.join().expect("writer thread");
    assert_eq!(
        unpublished("B-Q2"),
        0,
        "a held published mark was lost at stop"
    );
}

/// How many jobs [`fixture`] writes.
pub(crate) const JOBS: usize = 11;
