//! The read-only `outbox` verbs against the outbox of [`fixture`]: `list`, `show`,
//! `stats` and `export` (filters, columns, JSON and CSV that parse back), their
//! usage errors, reads beside a running writer, and `--help`. Split from
//! `audit_cli.rs`, which holds the harness these tests share.

use serde_json::{json, Value};

use midas_worker::command::{now_ms, Op};
use midas_worker::job::JobState;
use midas_worker::midas::{Api, OutcomeClass};
use midas_worker::outbox::Writer;

use super::audit_cli::{answer, err, fixture, ok, outbox, reply, settings_for, Cli, Jobber, JOBS};

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
    assert_eq!(
        v["by_op"],
        json!({"pay": 9, "present": 1, "cancel_pay": 1, "balance": 0, "query_order": 0})
    );
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
async fn csv_cells_that_look_like_formulas_are_not_run_by_a_spreadsheet() {
    let f = fixture().await;
    let s = &f.settings;
    let (w, join) = Writer::start(&f.path, None).expect("writer");
    let j = Jobber { w: &w };
    let now = now_ms();
    // an openid and an errmsg that a spreadsheet would run as formulas
    for (bill, openid, corr, errmsg) in [
        (
            "B-CSV",
            "=HYPERLINK(\"http://evil\",\"x\")",
            "c-csv",
            "@SUM(1+1)",
        ),
        ("B-CSV2", "+1-555", "c-csv2", "-2+3\tx"),
    ] {
        let id = j.intake(Op::Pay, bill, openid, corr, now).await;
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
                errmsg,
            ),
            Some(JobState::Failed),
            reply(bill, "failed", 90013, 1),
        )
        .await;
    }
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
