//! The `outbox` verbs that change the outbox, against the outbox of [`fixture`]:
//! `retry` and `republish` (one job, a set shown as a plan and done only with
//! `--yes --expect N`, a bill_no two apps use) and `prune`. Split from
//! `audit_cli.rs`, which holds the harness these tests share.

use clap::Parser;
use serde_json::Value;

use midas_worker::command::{now_ms, Op};
use midas_worker::job::JobState;
use midas_worker::midas::{Api, OutcomeClass};
use midas_worker::outbox::{query, Writer};

use super::audit_cli::{answer, err, fixture, ok, outbox, reply, Cli, Fixture, Jobber, JOBS};

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
