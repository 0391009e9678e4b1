//! The `midas-worker outbox ...` verbs against a real outbox.
//!
//! The outbox is built through the pipeline's own writer (`Writer::intake` /
//! `Writer::record`), so these tests read exactly what the worker writes. Each verb
//! is run through `audit::run` with the arguments parsed by clap, as the binary
//! parses them, and its output captured in memory.

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
use midas_worker::outbox::{query, Intake, IntakeOutcome, OutgoingReply, Writer};
use midas_worker::secret::Secret;

pub(crate) const SECRET: &str = "SK-SECRET-do-not-print";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

#[derive(Parser)]
struct Cli {
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

fn answer(
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

    fn count(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get(0))
            .expect("count query")
    }
}

/// Drives one job through the writer the way the dispatcher does.
struct Jobber<'a> {
    w: &'a Writer,
}

impl Jobber<'_> {
    async fn intake(&self, op: Op, bill_no: &str, openid: &str, corr: &str, now: i64) -> i64 {
        self.intake_as("wx1234567", op, bill_no, openid, corr, now)
            .await
    }

    async fn intake_as(
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
    async fn attempt(
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

fn reply(bill_no: &str, status: &str, errcode: i64, attempts: u32) -> Value {
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

const JOBS: usize = 11;

#[tokio::test]
async fn list_is_newest_first_filters_and_json_is_one_array() {
    let f = fixture().await;
    let s = &f.settings;
    let text = ok(s, &["list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("received") && lines[0].contains("last errcode"));
    assert_eq!(lines.len(), JOBS + 1, "{text}");
    // newest first: B-RET was received last
    assert!(lines[1].contains("B-RET"), "{text}");
    assert!(lines[1].contains("confirmed 1/1 (1 returned"), "{text}");
    // the columns line up
    let col = lines[0].find("status").expect("status column");
    assert!(lines
        .iter()
        .skip(1)
        .all(|l| l[col..].starts_with(|c: char| c.is_ascii_lowercase())));
    // RFC 3339, second precision
    assert!(lines[1][..20].ends_with('Z'), "{}", lines[1]);

    let text = ok(s, &["list", "--status", "unknown"]);
    assert_eq!(text.lines().count(), 1 + 3, "{text}");
    assert!(text.contains("B-UNK") && text.contains("B-CXL") && !text.contains("B-TRANS"));

    let text = ok(s, &["list", "--op", "cancel_pay"]);
    assert_eq!(text.lines().count(), 2, "{text}");
    let text = ok(s, &["list", "--openid", "o-fail", "--limit", "2"]);
    assert!(text.contains("first 2 shown"), "{text}");
    let text = ok(s, &["list", "--appid", "nope"]);
    assert_eq!(text.trim(), "no jobs match");

    let text = ok(s, &["list", "--since", "3h"]);
    assert!(text.contains("B-TRANS") && !text.contains("B-OLD") && !text.contains("B-UNK-OLD"));
    let text = ok(s, &["list", "--until", "2d"]);
    assert!(text.contains("B-OLD") && text.contains("B-PEND") && text.contains("B-UNK-OLD"));
    assert!(!text.contains("B-TRANS"));
    let text = ok(
        s,
        &[
            "list",
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2000-01-02",
        ],
    );
    assert_eq!(text.trim(), "no jobs match");

    let text = ok(s, &["list", "--json"]);
    let arr: Vec<Value> = serde_json::from_str(&text).expect("one JSON array");
    assert_eq!(arr.len(), JOBS);
    assert_eq!(arr[0]["bill_no"], "B-RET");
    assert_eq!(arr[0]["replies_returned"], 1);
    let trans = arr
        .iter()
        .find(|j| j["bill_no"] == "B-TRANS")
        .expect("B-TRANS");
    assert_eq!(trans["status"], "succeeded");
    assert_eq!(trans["attempts"], 3);
    assert_eq!(trans["last_errcode"], 90012);
}

#[tokio::test]
async fn bad_filters_unknown_bill_no_and_missing_db_exit_2() {
    let f = fixture().await;
    let s = &f.settings;
    for (args, needle) in [
        (&["list", "--status", "done"][..], "done"),
        (&["list", "--op", "refund"][..], "refund"),
        (&["list", "--since", "last tuesday"][..], "last tuesday"),
        (&["export", "--status", "bogus"][..], "bogus"),
        (&["retry", "B-CXL"][..], "--op"),
        (&["republish"][..], "BILL_NO"),
        (&["prune", "--older-than", "1h"][..], "48h"),
        (&["prune", "--older-than", "forever"][..], "forever"),
    ] {
        let e = err(s, args);
        assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        assert!(e.to_string().contains(needle), "{args:?}: {e}");
    }
    for args in [
        &["show", "NOPE"][..],
        &["retry", "NOPE"][..],
        &["republish", "NOPE"][..],
        &["retry", "B-TRANS", "--op", "cancel_pay"][..],
    ] {
        let e = err(s, args);
        assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        assert!(e.to_string().starts_with("no job with bill_no"), "{e}");
    }
    assert_eq!(
        err(s, &["show", "NOPE"]).to_string(),
        "no job with bill_no NOPE"
    );

    let gone = settings_for(&f.path.with_file_name("missing.sqlite"));
    for args in [
        &["list"][..],
        &["show", "B-TRANS"][..],
        &["stats"][..],
        &["export"][..],
        &["retry", "B-UNK"][..],
        &["republish", "B-TRANS"][..],
        &["prune"][..],
        &["prune", "--dry-run"][..],
    ] {
        let e = err(&gone, args);
        assert_eq!(e.exit_code(), 2, "{args:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("missing.sqlite")
                && msg.contains("does not exist (is outbox.path right?)"),
            "{msg}"
        );
    }
    assert!(
        !f.path.with_file_name("missing.sqlite").exists(),
        "a read must not create the db"
    );
}

#[tokio::test]
async fn show_prints_every_attempt_reply_target_and_action() {
    let f = fixture().await;
    let s = &f.settings;
    let text = ok(s, &["show", "B-TRANS"]);
    for needle in [
        "bill_no B-TRANS: 1 job",
        "pay (job 1): SUCCEEDED",
        "system error",
        "timeout",
        "order already exists",
        "transient",
        "duplicate",
        "90012",
        "midas.results",
        "c-trans",
        "\"amt\":10",
        "\"duplicate\":true",
        "Midas applied this bill_no",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let calls = text.split("calls to Midas:").nth(1).expect("calls section");
    let rows: Vec<&str> = calls
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with("    "))
        .collect();
    assert_eq!(rows.len(), 3, "{calls}");
    // the timeout has no HTTP status
    assert!(
        rows[1].contains("timeout") && rows[1].contains(" - "),
        "{}",
        rows[1]
    );
    assert!(rows[0].contains("200") && rows[0].contains("-1"));

    // both jobs of a bill_no
    let text = ok(s, &["show", "B-CXL"]);
    assert!(text.contains("bill_no B-CXL: 2 jobs"), "{text}");
    assert!(text.contains("pay (job") && text.contains("cancel_pay (job"));
    assert!(text.contains("NOT CONFIRMED"), "{text}");
    // returned reply
    let text = ok(s, &["show", "B-RET"]);
    assert!(text.contains("returned: no such queue"), "{text}");
    // pending job: next attempt, no result
    let text = ok(s, &["show", "B-PEND"]);
    assert!(
        text.contains("next attempt") && text.contains("not yet (job pending)"),
        "{text}"
    );
    // a multi-line errmsg stays on one line
    let text = ok(s, &["show", "B-BAL"]);
    assert!(
        text.contains("insufficient balance, \"really\"\\nsecond line"),
        "{text}"
    );

    let text = ok(s, &["show", "B-TRANS", "--json"]);
    let v: Value = serde_json::from_str(&text).expect("json");
    let job = &v["jobs"][0];
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["request"]["amt"], 10);
    assert!(job["request"].get("session_key").is_none());
    assert_eq!(job["result"]["duplicate"], true);
    let h = job["history"].as_array().expect("history");
    assert_eq!(h.len(), 3);
    assert_eq!(h[0]["errcode"], -1);
    assert_eq!(h[1]["http_status"], Value::Null);
    assert_eq!(h[1]["errmsg"], "timeout");
    assert_eq!(h[2]["outcome"], "duplicate");
    assert_eq!(job["reply_targets"][0]["confirmed"], true);
    assert_eq!(v["operator_actions"], json!([]));
}

#[tokio::test]
async fn stats_counts_states_ops_percentiles_and_replies() {
    let f = fixture().await;
    let s = &f.settings;
    let v: Value = serde_json::from_str(&ok(s, &["stats", "--json"])).expect("json");
    assert_eq!(v["jobs"], JOBS);
    assert_eq!(
        v["by_status"],
        json!({"pending": 1, "succeeded": 4, "failed": 3, "unknown": 3})
    );
    assert_eq!(v["by_op"], json!({"pay": 9, "present": 1, "cancel_pay": 1}));
    assert_eq!(v["oldest_pending"]["bill_no"], "B-PEND");
    assert!(v["oldest_pending"]["age_seconds"].as_i64().unwrap_or(0) > 199 * 86_400);
    assert_eq!(v["attempts_per_final_job"]["p50"], 1);
    assert_eq!(v["attempts_per_final_job"]["p99"], 3);
    assert_eq!(v["attempts_per_final_job"]["jobs"], 10);
    assert_eq!(v["unknown"], 3);
    // B-UNK, B-UNK-OLD, B-CXL cancel_pay were never confirmed
    assert_eq!(v["replies_unconfirmed"], 3);
    assert_eq!(v["replies_awaiting_result"], 1);
    assert_eq!(v["replies_returned"], 1);

    let text = ok(s, &["stats"]);
    for needle in [
        "jobs: 11",
        "B-PEND (present)",
        "p50 1, p99 3",
        "unknown (to reconcile): 3",
    ] {
        assert!(text.contains(needle), "missing {needle:?}:\n{text}");
    }
}

/// A minimal RFC 4180 reader: quoted fields, doubled quotes, CRLF records.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            c => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quote");
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[tokio::test]
async fn export_streams_jsonl_and_csv_that_parses_back() {
    let f = fixture().await;
    let s = &f.settings;
    let text = ok(s, &["export"]);
    assert!(
        text.starts_with("{\"id\":1,\"op\":\"pay\",\"bill_no\":\"B-TRANS\""),
        "{text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), JOBS);
    assert_eq!(lines[0]["bill_no"], "B-TRANS");
    assert_eq!(lines[0]["request"]["amt"], 10);
    assert!(lines[0]["received_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let keys: Vec<&String> = lines[0].as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 13);

    let text = ok(s, &["export", "--status", "failed"]);
    assert_eq!(text.lines().count(), 3);

    let text = ok(s, &["export", "--format", "csv"]);
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), JOBS + 1);
    assert_eq!(
        rows[0],
        [
            "id",
            "op",
            "bill_no",
            "appid",
            "openid",
            "state",
            "attempts",
            "last_errcode",
            "last_error",
            "received_at",
            "finished_at",
            "request",
            "result"
        ]
    );
    assert!(rows.iter().all(|r| r.len() == 13), "{rows:?}");
    let bal = rows.iter().find(|r| r[2] == "B-BAL").expect("B-BAL row");
    assert_eq!(bal[8], "insufficient balance, \"really\"\nsecond line");
    assert_eq!(bal[7], "90013");
    let req: Value = serde_json::from_str(&bal[11]).expect("request column is JSON");
    assert_eq!(req["bill_no"], "B-BAL");
    let res: Value = serde_json::from_str(&bal[12]).expect("result column is JSON");
    assert_eq!(res["status"], "failed");
    let pend = rows.iter().find(|r| r[2] == "B-PEND").expect("B-PEND row");
    assert_eq!(pend[10], "");
    assert_eq!(pend[12], "");
}

#[tokio::test]
async fn republish_requeues_final_replies_and_refuses_pending() {
    let f = fixture().await;
    let s = &f.settings;
    let unpublished = || {
        let c = midas_worker::outbox::open_ro(&f.path).expect("open");
        query::unpublished_replies(&c, 100, i64::MAX)
            .expect("query")
            .into_iter()
            .map(|r| r.correlation_id)
            .collect::<Vec<_>>()
    };
    assert!(!unpublished().contains(&"c-trans".to_string()));
    let text = ok(
        s,
        &[
            "republish",
            "B-TRANS",
            "--actor",
            "alice",
            "--reason",
            "player says nothing arrived",
        ],
    );
    assert!(
        text.contains("queued 1 reply target of 1 final job"),
        "{text}"
    );
    assert!(unpublished().contains(&"c-trans".to_string()));

    // returned targets are reset too
    ok(s, &["republish", "B-RET", "--actor", "alice"]);
    assert_eq!(
        f.count("SELECT returned FROM reply_targets WHERE correlation_id = 'c-ret'"),
        0
    );

    let e = err(s, &["republish", "B-PEND"]);
    assert_eq!(e.exit_code(), 1);
    assert!(
        e.to_string()
            .contains("job is not final; its reply will be published when it is"),
        "{e}"
    );
    let e = err(s, &["republish", "--status", "pending"]);
    assert_eq!(e.exit_code(), 1);

    // a set: shown first, done only with --yes
    let (r, text) = outbox(s, &["republish", "--status", "failed", "--actor", "bob"]);
    let e = r.expect_err("a set needs --yes");
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("add --yes"), "{e}");
    assert!(
        text.contains("republish: 3 jobs match --status failed")
            && text
                .contains("would re-publish the stored final replies of 3 jobs to 3 reply targets"),
        "{text}"
    );
    let text = ok(
        s,
        &[
            "republish",
            "--status",
            "failed",
            "--actor",
            "bob",
            "--yes",
            "--expect",
            "3",
        ],
    );
    assert!(
        text.contains("re-published the stored final replies of 3 jobs to 3 reply targets"),
        "{text}"
    );
    let text = ok(s, &["republish", "B-CXL", "--op", "pay", "--actor", "bob"]);
    assert!(
        text.contains("queued 1 reply target of 1 final job"),
        "{text}"
    );

    let text = ok(s, &["show", "B-TRANS"]);
    assert!(
        text.contains("alice")
            && text.contains("republish")
            && text.contains("player says nothing arrived"),
        "{text}"
    );
    // once per job
    assert_eq!(
        f.count("SELECT COUNT(*) FROM operator_actions WHERE action = 'republish'"),
        6
    );
}

#[tokio::test]
async fn retry_reopens_unknown_and_refuses_what_it_cannot_change() {
    let f = fixture().await;
    let s = &f.settings;
    let refuse = |args: &[&str], needle: &str| {
        let e = err(s, args);
        assert_eq!(e.exit_code(), 1, "{args:?}: {e}");
        assert!(e.to_string().contains(needle), "{args:?}: {e}");
    };
    refuse(
        &["retry", "B-TRANS"],
        "already succeeded; retrying cannot change it",
    );
    refuse(&["retry", "B-UNK-OLD"], "past the 48 h bill_no window");
    refuse(
        &["retry", "B-UNK-OLD"],
        "re-sending could charge twice; reconcile by hand",
    );
    refuse(&["retry", "B-PEND"], "pending");
    refuse(&["retry", "B-BAL"], "90013");
    refuse(&["retry", "B-SESS"], "session_key");
    refuse(&["retry", "B-CXL", "--op", "pay"], "already succeeded");
    assert_eq!(
        f.count("SELECT COUNT(*) FROM operator_actions"),
        0,
        "refusals record nothing"
    );

    let before = now_ms();
    let text = ok(
        s,
        &[
            "retry",
            "B-UNK",
            "--actor",
            "carol",
            "--reason",
            "Midas was down",
        ],
    );
    assert!(text.contains("re-opened pay B-UNK"), "{text}");
    let c = f.conn();
    let (state, next, result, finished, id): (String, i64, Option<String>, Option<i64>, i64) = c
        .query_row(
            "SELECT state, next_attempt_at, result, finished_at, id FROM jobs WHERE bill_no = 'B-UNK'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .expect("job");
    assert_eq!(state, "pending");
    assert!(next >= before);
    assert_eq!((result, finished), (None, None));
    assert_eq!(
        f.count("SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id WHERE j.bill_no = 'B-UNK' AND t.published_at IS NULL"),
        1
    );
    let (actor, target, detail): (String, String, String) = c
        .query_row(
            "SELECT actor, target, detail FROM operator_actions WHERE action = 'retry'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("action");
    assert_eq!((actor.as_str(), target.as_str()), ("carol", "B-UNK"));
    assert!(detail.contains("Midas was down"));
    // the worker's own detection finds the re-opened job
    let ro = midas_worker::outbox::open_ro(&f.path).expect("open");
    let reopened = query::reopened_jobs(&ro, 0).expect("reopened");
    assert_eq!(reopened.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);

    // now pending: a second retry is refused
    refuse(&["retry", "B-UNK"], "pending");
    // configuration errors may be retried; several jobs need --op
    ok(s, &["retry", "B-SIG", "--actor", "carol"]);
    ok(
        s,
        &["retry", "B-CXL", "--op", "cancel_pay", "--actor", "carol"],
    );
    assert_eq!(
        f.count("SELECT COUNT(*) FROM jobs WHERE state = 'pending'"),
        4
    );
}

fn state_of(f: &Fixture, bill_no: &str, op: &str) -> String {
    f.conn()
        .query_row(
            "SELECT state FROM jobs WHERE bill_no = ?1 AND op = ?2 AND appid = 'wx1234567'",
            [bill_no, op],
            |r| r.get(0),
        )
        .expect("job state")
}

#[tokio::test]
async fn retry_on_a_set_shows_the_plan_and_acts_only_with_yes() {
    let f = fixture().await;
    let s = &f.settings;
    let states = || {
        let c = f.conn();
        let mut stmt = c
            .prepare("SELECT id || ' ' || state FROM jobs ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows")
    };
    let before = states();
    let args = ["retry", "--status", "unknown", "--since", "2h"];

    // --dry-run: the count and the plan, nothing changed
    let text = ok(s, &[&args[..], &["--dry-run"]].concat());
    assert!(
        text.contains("retry: 2 jobs match --status unknown --since 2h"),
        "{text}"
    );
    assert!(text.contains("would re-open 2 jobs"), "{text}");
    assert!(text.contains("B-UNK") && text.contains("B-CXL"), "{text}");
    assert!(!text.contains("B-UNK-OLD"), "received 50 h ago: {text}");
    assert!(text.contains("dry run: nothing changed"), "{text}");
    assert_eq!(states(), before);
    assert_eq!(f.count("SELECT COUNT(*) FROM operator_actions"), 0);

    // the same plan as JSON
    let v: Value = serde_json::from_str(&ok(s, &[&args[..], &["--dry-run", "--json"]].concat()))
        .expect("json");
    assert_eq!(
        (v["matched"].as_u64(), v["acting"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(v["applied"], false);
    assert_eq!(v["jobs"][0]["action"], "reopen");

    // without --yes: the plan, exit 2, nothing changed
    let (r, text) = outbox(s, &args);
    let e = r.expect_err("needs --yes");
    assert_eq!(e.exit_code(), 2);
    assert_eq!(
        e.to_string(),
        "nothing changed: add --yes --expect 2 to re-open these 2 jobs"
    );
    assert!(text.contains("would re-open 2 jobs"), "{text}");
    assert_eq!(states(), before);

    // with --yes: exactly those two jobs re-opened, one action each
    let text = ok(
        s,
        &[
            &args[..],
            &[
                "--yes",
                "--expect",
                "2",
                "--actor",
                "carol",
                "--reason",
                "Midas was down",
            ],
        ]
        .concat(),
    );
    assert!(text.contains("re-opened 2 jobs"), "{text}");
    assert_eq!(state_of(&f, "B-UNK", "pay"), "pending");
    assert_eq!(state_of(&f, "B-CXL", "cancel_pay"), "pending");
    assert_eq!(state_of(&f, "B-UNK-OLD", "pay"), "unknown");
    assert_eq!(state_of(&f, "B-CXL", "pay"), "succeeded");
    let changed: Vec<String> = states()
        .into_iter()
        .filter(|row| !before.contains(row))
        .collect();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert_eq!(
        f.count("SELECT COUNT(*) FROM operator_actions WHERE action = 'retry' AND actor = 'carol' AND detail LIKE '%Midas was down%'"),
        2
    );
    let ro = midas_worker::outbox::open_ro(&f.path).expect("open");
    let reopened = query::reopened_jobs(&ro, 0).expect("reopened");
    assert_eq!(reopened.len(), 2, "the worker finds both");

    // a set with jobs retry cannot help: those are skipped, with the reason
    let text = ok(s, &["retry", "--status", "failed", "--dry-run"]);
    assert!(text.contains("would re-open 1 job:"), "{text}");
    assert!(text.contains("would skip 2 jobs"), "{text}");
    assert!(
        text.contains("skip: pay B-BAL failed with errcode 90013"),
        "{text}"
    );
    let text = ok(
        s,
        &[
            "retry", "--status", "failed", "--yes", "--expect", "3", "--actor", "carol",
        ],
    );
    assert!(text.contains("re-opened 1 job:"), "{text}");
    assert_eq!(state_of(&f, "B-SIG", "pay"), "pending");
    assert_eq!(state_of(&f, "B-BAL", "pay"), "failed");

    // nothing matching: nothing to confirm
    let text = ok(s, &["retry", "--bill-no-prefix", "NOPE-"]);
    assert!(text.contains("retry: 0 jobs match"), "{text}");
    // filters and a BILL_NO do not mix
    let e = err(s, &["retry", "B-UNK", "--status", "unknown"]);
    assert_eq!(e.exit_code(), 2);
    let e = err(s, &["retry"]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("filters"), "{e}");
}

#[tokio::test]
async fn list_and_export_filter_by_bill_no_prefix_and_errcode() {
    let f = fixture().await;
    let s = &f.settings;
    let text = ok(s, &["list", "--bill-no-prefix", "B-UNK"]);
    assert_eq!(text.lines().count(), 1 + 2, "{text}");
    assert!(text.contains("B-UNK-OLD"), "{text}");
    let text = ok(s, &["list", "--errcode", "-1", "--json"]);
    let arr: Vec<Value> = serde_json::from_str(&text).expect("array");
    let mut bills: Vec<&str> = arr.iter().filter_map(|j| j["bill_no"].as_str()).collect();
    bills.sort_unstable();
    assert_eq!(bills, ["B-CXL", "B-PEND", "B-UNK", "B-UNK-OLD"]);
    let text = ok(s, &["list", "--errcode", "90013", "--status", "failed"]);
    assert_eq!(text.lines().count(), 2, "{text}");
    let text = ok(s, &["export", "--bill-no-prefix", "B-C", "--format", "csv"]);
    assert_eq!(parse_csv(&text).len(), 1 + 2, "{text}");
    let text = ok(s, &["export", "--errcode", "90011"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("B-SIG"));
    // LIKE wildcards are not wildcards here
    let text = ok(s, &["list", "--bill-no-prefix", "B_"]);
    assert_eq!(text.trim(), "no jobs match");
}

#[tokio::test]
async fn a_bill_no_used_by_two_apps_is_shown_whole_and_acted_on_with_appid() {
    let f = fixture().await;
    let s = &f.settings;
    let (w, join) = Writer::start(&f.path, None).expect("writer");
    let j = Jobber { w: &w };
    let now = now_ms();
    let other = j
        .intake_as("wx7654321", Op::Pay, "B-UNK", "o-x", "c-x", now)
        .await;
    j.attempt(
        other,
        1,
        now,
        now,
        answer(
            Api::Pay,
            OutcomeClass::Transient,
            Some(200),
            Some(-1),
            "system error",
        ),
        Some(JobState::Unknown),
        reply("B-UNK", "unknown", -1, 1),
    )
    .await;
    w.flush().await.expect("flush");
    drop(w);
    join.join().expect("writer thread");
    assert_eq!(
        f.count("SELECT COUNT(*) FROM jobs WHERE bill_no = 'B-UNK'"),
        2
    );

    // read-only: both jobs, each under its appid
    let text = ok(s, &["show", "B-UNK"]);
    assert!(
        text.starts_with("bill_no B-UNK: 2 jobs of 2 apps (wx1234567, wx7654321)"),
        "{text}"
    );
    let first = text
        .find("== appid wx1234567 ==")
        .expect("first app's heading");
    let second = text
        .find("== appid wx7654321 ==")
        .expect("second app's heading");
    let (o_unk, o_x) = (
        text.find("o-unk").expect("first app's job"),
        text.find("o-x").expect("second app's job"),
    );
    assert!(first < o_unk && o_unk < second && second < o_x, "{text}");
    let doc: Value = serde_json::from_str(&ok(s, &["show", "B-UNK", "--json"])).expect("json");
    let apps: Vec<&str> = doc["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["appid"].as_str())
        .collect();
    assert_eq!(apps, ["wx1234567", "wx7654321"]);
    // acting verbs still need --appid
    for args in [
        &["retry", "B-UNK"][..],
        &["retry", "B-UNK", "--op", "pay"][..],
        &["republish", "B-UNK"][..],
    ] {
        let e = err(s, args);
        assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        assert_eq!(
            e.to_string(),
            "bill_no B-UNK is used by 2 apps (wx1234567, wx7654321): choose one with --appid",
            "{args:?}"
        );
    }
    let text = ok(s, &["show", "B-UNK", "--appid", "wx7654321"]);
    assert!(
        text.contains("bill_no B-UNK: 1 job") && text.contains("o-x"),
        "{text}"
    );
    assert!(!text.contains("o-unk"), "{text}");
    let e = err(s, &["show", "B-UNK", "--appid", "wxnope"]);
    assert_eq!(e.to_string(), "no job with bill_no B-UNK for appid wxnope");

    ok(
        s,
        &["retry", "B-UNK", "--appid", "wx7654321", "--actor", "carol"],
    );
    assert_eq!(
        f.count("SELECT COUNT(*) FROM jobs WHERE bill_no = 'B-UNK' AND state = 'pending' AND appid = 'wx7654321'"),
        1
    );
    assert_eq!(
        state_of(&f, "B-UNK", "pay"),
        "unknown",
        "the other app's order is untouched"
    );
    let ro = midas_worker::outbox::open_ro(&f.path).expect("open");
    let reopened = query::reopened_jobs(&ro, 0).expect("reopened");
    assert_eq!(
        reopened.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![other]
    );
    // show with --appid lists only that app's actions
    let text = ok(s, &["show", "B-UNK", "--appid", "wx1234567"]);
    assert!(text.contains("operator actions:\n  (none)"), "{text}");
}

#[tokio::test]
async fn csv_cells_that_look_like_formulas_are_not_run_by_a_spreadsheet() {
    let f = fixture().await;
    let s = &f.settings;
    let (w, join) = Writer::start(&f.path, None).expect("writer");
    let j = Jobber { w: &w };
    let now = now_ms();
    let id = j
        .intake(
            Op::Pay,
            "B-CSV",
            "=HYPERLINK(\"http://evil\",\"x\")",
            "c-csv",
            now,
        )
        .await;
    j.attempt(
        id,
        1,
        now,
        now,
        answer(
            Api::Pay,
            OutcomeClass::Definitive,
            Some(200),
            Some(90013),
            "@SUM(1+1)",
        ),
        Some(JobState::Failed),
        reply("B-CSV", "failed", 90013, 1),
    )
    .await;
    let id = j.intake(Op::Pay, "B-CSV2", "+1-555", "c-csv2", now).await;
    j.attempt(
        id,
        1,
        now,
        now,
        answer(
            Api::Pay,
            OutcomeClass::Definitive,
            Some(200),
            Some(90013),
            "-2+3\tx",
        ),
        Some(JobState::Failed),
        reply("B-CSV2", "failed", 90013, 1),
    )
    .await;
    w.flush().await.expect("flush");
    drop(w);
    join.join().expect("writer thread");

    let rows = parse_csv(&ok(s, &["export", "--format", "csv"]));
    let row = |bill: &str| rows.iter().find(|r| r[2] == bill).expect("row").clone();
    let csv = row("B-CSV");
    assert_eq!(csv[4], "'=HYPERLINK(\"http://evil\",\"x\")");
    assert_eq!(csv[8], "'@SUM(1+1)");
    let csv2 = row("B-CSV2");
    assert_eq!(csv2[4], "'+1-555");
    assert_eq!(csv2[8], "'-2+3\tx");
    // the worker's own numbers stay numbers
    assert_eq!(row("B-UNK")[7], "-1");
    // JSON lines are data, not cells: unchanged
    let text = ok(s, &["export", "--bill-no-prefix", "B-CSV"]);
    assert!(text.contains("\"openid\":\"=HYPERLINK"), "{text}");
}

#[tokio::test]
async fn prune_deletes_old_final_jobs_only() {
    let f = fixture().await;
    let s = &f.settings;
    let text = ok(s, &["prune", "--dry-run"]);
    assert!(text.contains("would delete 1 final job"), "{text}");
    assert_eq!(f.count("SELECT COUNT(*) FROM jobs"), JOBS as i64);

    let old_id = f.count("SELECT id FROM jobs WHERE bill_no = 'B-OLD'");
    let text = ok(s, &["prune", "--actor", "dave", "--reason", "retention"]);
    assert!(text.contains("deleted 1 final job"), "{text}");
    assert_eq!(f.count("SELECT COUNT(*) FROM jobs"), JOBS as i64 - 1);
    assert_eq!(
        f.count("SELECT COUNT(*) FROM jobs WHERE bill_no = 'B-PEND'"),
        1
    );
    assert_eq!(
        f.count(&format!(
            "SELECT COUNT(*) FROM attempts WHERE job_id = {old_id}"
        )),
        0
    );
    assert_eq!(
        f.count(&format!(
            "SELECT COUNT(*) FROM reply_targets WHERE job_id = {old_id}"
        )),
        0
    );
    let detail: String = f
        .conn()
        .query_row(
            "SELECT detail FROM operator_actions WHERE action = 'prune' AND actor = 'dave'",
            [],
            |r| r.get(0),
        )
        .expect("prune action");
    assert_eq!(
        serde_json::from_str::<Value>(&detail).expect("json")["deleted"],
        1
    );

    // a cutoff of 48 h takes B-UNK-OLD (finished 26 h ago? no: kept) but never B-PEND
    let text = ok(s, &["prune", "--older-than", "48h", "--actor", "dave"]);
    assert!(text.contains("deleted 0 final jobs"), "{text}");
    let text = ok(s, &["prune", "--older-than", "1000d", "--actor", "dave"]);
    assert!(text.contains("deleted 0"), "{text}");
    assert_eq!(
        f.count("SELECT COUNT(*) FROM jobs WHERE state = 'pending'"),
        1
    );
    let e = err(s, &["prune", "--older-than", "47h"]);
    assert_eq!(e.exit_code(), 2);
}

#[tokio::test]
async fn reads_work_while_the_worker_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let s = settings_for(&path);
    let (w, join) = Writer::start(&path, None).expect("writer");
    let j = Jobber { w: &w };
    let now = now_ms();
    for i in 0..50 {
        let id = j
            .intake(Op::Pay, &format!("L{i}"), "o", &format!("c{i}"), now)
            .await;
        if i % 2 == 0 {
            j.attempt(
                id,
                1,
                now,
                now,
                answer(Api::Pay, OutcomeClass::Success, Some(200), Some(0), "ok"),
                Some(JobState::Succeeded),
                reply(&format!("L{i}"), "succeeded", 0, 1),
            )
            .await;
        }
        if i % 10 == 0 {
            // the writer is still open: reads must not block or fail
            let text = ok(&s, &["list", "--limit", "0"]);
            assert_eq!(text.lines().count(), i + 2, "{text}");
            ok(&s, &["stats"]);
        }
    }
    let text = ok(&s, &["export", "--format", "csv"]);
    assert_eq!(parse_csv(&text).len(), 51);
    // an operator write while the writer holds its connection
    let plan = outbox(&s, &["republish", "--status", "succeeded", "--json"]).1;
    let matched = serde_json::from_str::<Value>(&plan).expect("plan")["matched"].to_string();
    ok(
        &s,
        &[
            "republish",
            "--status",
            "succeeded",
            "--actor",
            "eve",
            "--yes",
            "--expect",
            &matched,
        ],
    );
    w.flush().await.expect("flush");
    drop(w);
    join.join().expect("writer thread");
    let list = ok(&s, &["list", "--status", "pending", "--json"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&list)
            .expect("array")
            .len(),
        25
    );
}

#[test]
fn help_documents_the_verbs() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
    let mut cmd = Cli::command();
    let help = cmd
        .find_subcommand_mut("list")
        .expect("list")
        .render_long_help()
        .to_string();
    assert!(help.contains("ONE JSON array"), "{help}");
}

/// A bulk action cannot be made to hit everything by accident: an empty filter
/// value is refused (it would match every job), `--yes` needs `--expect N`, and a
/// count that differs from N changes nothing.
#[tokio::test]
async fn bulk_actions_refuse_empty_filters_and_an_unexpected_count() {
    let f = fixture().await;
    let s = &f.settings;
    let actions = || f.count("SELECT COUNT(*) FROM operator_actions");
    let pending = || f.count("SELECT COUNT(*) FROM jobs WHERE state = 'pending'");
    let before = pending();
    for flag in [
        "--bill-no-prefix",
        "--openid",
        "--appid",
        "--status",
        "--op",
        "--since",
        "--until",
    ] {
        for value in ["", "  "] {
            for verb in ["retry", "republish"] {
                let e = err(s, &[verb, flag, value, "--yes", "--expect", "1"]);
                assert_eq!(e.exit_code(), 2, "{verb} {flag} {value:?}: {e}");
                assert!(
                    e.to_string().contains(flag) && e.to_string().contains("every job"),
                    "{verb} {flag} {value:?}: {e}"
                );
            }
        }
    }
    // `--yes` alone is bad usage (clap: exit 2), before anything is read
    let parsed = Cli::try_parse_from(["outbox", "retry", "--status", "unknown", "--yes"]);
    let Err(e) = parsed else {
        panic!("--yes without --expect was accepted")
    };
    assert!(e.to_string().contains("--expect"), "{e}");
    // the plan says 3 failed jobs match; expecting another count changes nothing
    let plan = ok(s, &["retry", "--status", "failed", "--dry-run"]);
    assert!(plan.contains("retry: 3 jobs match"), "{plan}");
    for wrong in ["2", "4", "0"] {
        let e = err(
            s,
            &["retry", "--status", "failed", "--yes", "--expect", wrong],
        );
        assert_eq!(e.exit_code(), 1, "{e}");
        assert!(
            e.to_string().contains(&format!(
                "3 jobs match --status failed now, not the {wrong} expected"
            )),
            "{e}"
        );
    }
    assert_eq!((pending(), actions()), (before, 0), "nothing changed");
    let text = ok(
        s,
        &["retry", "--status", "failed", "--yes", "--expect", "3"],
    );
    assert!(text.contains("re-opened 1 job"), "{text}");
    assert_eq!(pending(), before + 1);
}

/// A value holding bidi or invisible characters (an outbox written before the
/// decoder refused them) is never printed raw by `outbox show`: the report escapes
/// each (`\u{202e}`), and the JSON writes it as a `\u202e` escape that decodes back
/// to the stored text.
#[tokio::test]
async fn show_escapes_bidi_and_invisible_characters() {
    let f = fixture().await;
    let s = &f.settings;
    let stored = "evil\u{202e}gpj.exe\u{200b}\u{2028}x\u{85}";
    f.conn()
        .execute(
            "UPDATE jobs SET openid = ?1 WHERE bill_no = 'B-UNK'",
            [stored],
        )
        .expect("update");
    let hidden = ['\u{202e}', '\u{200b}', '\u{2028}', '\u{85}'];
    let text = ok(s, &["show", "B-UNK"]);
    assert!(!text.contains(hidden), "raw in the report:\n{text}");
    assert!(
        text.contains("evil\\u{202e}gpj.exe\\u{200b}\\u{2028}x"),
        "{text}"
    );
    let doc = ok(s, &["show", "B-UNK", "--json"]);
    assert!(!doc.contains(hidden), "raw in the JSON:\n{doc}");
    assert!(doc.contains("\\u202e"), "{doc}");
    let v: Value = serde_json::from_str(&doc).expect("valid JSON");
    assert_eq!(
        v["jobs"][0]["openid"], stored,
        "the escape decodes to the stored text"
    );
}
