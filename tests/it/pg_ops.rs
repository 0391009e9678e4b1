//! The `outbox` verbs against a PostgreSQL outbox, and `outbox migrate`.
//!
//! Each test builds the SQLite outbox of `audit_cli` (through the pipeline's own
//! writer), migrates it into a fresh PostgreSQL database with `outbox migrate`, and
//! runs the same verbs against both configs: the outputs (text and `--json`) and
//! the recorded `operator_actions` must be the same, and PostgreSQL must also
//! hand a re-opened job back to the lease coordinator (`claimed_by = NULL`).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;
use serde_json::Value;

use super::audit_cli::{err, fixture, ok, outbox, settings_for, Fixture};
use crate::common::pg::TestDb;
use midas_worker::audit::AuditError;
use midas_worker::config::{load_from, Settings};

/// The URL the verbs get: this machine's server offers TLS with a certificate the
/// platform does not trust, so plain TCP (`sslmode=disable`) as in the harness.
fn plain(url: &str) -> String {
    format!("{url}?sslmode=disable")
}

/// A config whose outbox is the PostgreSQL database at `url`.
fn pg_settings(url: &str) -> Settings {
    let env: BTreeMap<String, String> =
        [("MIDAS_WORKER__OUTBOX__URL".to_string(), url.to_string())].into();
    load_from(include_str!("../../config.toml"), &env, "t").expect("shipped config loads")
}

/// A copy of a SQLite outbox file (`VACUUM INTO`), with its settings.
pub(crate) struct Copy {
    _dir: tempfile::TempDir,
    pub(crate) path: std::path::PathBuf,
    pub(crate) settings: Settings,
}

pub(crate) fn copy_of(path: &Path) -> Copy {
    let dir = tempfile::tempdir().expect("tempdir");
    let to = dir.path().join("source.sqlite");
    Connection::open(path)
        .expect("open")
        .execute("VACUUM INTO ?1", [to.display().to_string()])
        .expect("copy the outbox");
    let settings = settings_for(&to);
    Copy {
        _dir: dir,
        path: to,
        settings,
    }
}

/// The SQLite fixture, migrated into a fresh database: (fixture, db, PG settings,
/// the migrated source). `outbox migrate` marks its source and erases its
/// session_keys, so it migrates a copy and the fixture stays as it was, for the
/// verbs to be compared on both.
async fn migrated(tag: &str) -> (Fixture, TestDb, Settings, Copy) {
    let fx = fixture().await;
    let db = TestDb::new(tag).await;
    let source = copy_of(&fx.path);
    let text = ok(
        &source.settings,
        &[
            "migrate",
            "--to",
            &plain(&db.url),
            "--actor",
            "ops",
            "--reason",
            "move",
        ],
    );
    assert!(
        text.contains("11 jobs (1 pending)"),
        "migrate output: {text}"
    );
    let pg = pg_settings(&plain(&db.url));
    (fx, db, pg, source)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// Times derived from "now" (cutoffs, ages) differ between two runs: masked.
fn without_times(text: &str) -> String {
    text.split_whitespace()
        .map(|w| {
            if w.len() >= 20 && w.as_bytes().get(4) == Some(&b'-') && w.contains('T') {
                "<time>"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows of a table as text, SQLite side.
fn sqlite_rows(path: &Path, sql: &str) -> Vec<Vec<String>> {
    let c = Connection::open(path).expect("open sqlite");
    let mut stmt = c.prepare(sql).expect("prepare");
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                        rusqlite::types::Value::Null => "NULL".to_string(),
                        rusqlite::types::Value::Integer(v) => v.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        other => format!("{other:?}"),
                    })
                })
                .collect::<Result<Vec<String>, rusqlite::Error>>()
        })
        .expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

/// The same rows, PostgreSQL side (every column cast to text by the query).
async fn pg_rows(db: &TestDb, sql: &str) -> Vec<Vec<String>> {
    db.client()
        .await
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.get::<_, Option<String>>(i)
                        .unwrap_or_else(|| "NULL".into())
                })
                .collect()
        })
        .collect()
}

/// `SELECT` of these columns as text, in id order.
fn select(table: &str, cols: &str, pg: bool) -> String {
    let cols: Vec<String> = cols
        .split(',')
        .map(|c| {
            if pg {
                format!("{}::text", c.trim())
            } else {
                c.trim().to_string()
            }
        })
        .collect();
    // `{table}.id`: a bare `id` would sort by the output column (text)
    format!(
        "SELECT {} FROM {table} ORDER BY {table}.id",
        cols.join(", ")
    )
}

const JOB_COLS: &str =
    "id, op, bill_no, appid, openid, request, session_key, state, attempts, calls, \
     uncertain, next_attempt_at, first_attempt_at, reopened_at, last_errcode, last_error, result, \
     received_at, updated_at, finished_at";
const TARGET_COLS: &str = "id, job_id, reply_to, correlation_id, added_at, published_at, returned";
const ATTEMPT_COLS: &str =
    "id, job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome";

#[tokio::test]
async fn migrate_keeps_every_row_and_id_and_the_reads_are_the_same() {
    let (fx, db, pg, source) = migrated("ops_reads").await;

    // the source is marked: no worker (nor operator write) starts on it, the error
    // says where the jobs went; its session_keys are gone; it can still be read
    let keys = |p: &Path| -> i64 {
        Connection::open(p)
            .expect("open")
            .query_row(
                "SELECT count(*) FROM jobs WHERE session_key IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .expect("count")
    };
    assert!(keys(&fx.path) > 0, "the fixture has session_keys to erase");
    assert_eq!(keys(&source.path), 0, "session_keys erased from the source");
    match midas_worker::outbox::Writer::start(&source.path, None) {
        Ok(_) => panic!("a worker started on a migrated SQLite outbox"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("migrated to") && e.contains(&db.name), "{e}");
        }
    }
    let e = err(&source.settings, &["retry", "B-UNK", "--actor", "ops"]);
    assert!(e.to_string().contains("migrated to"), "{e}");
    assert!(ok(&source.settings, &["list"]).contains("B-UNK"));

    // every row, every column, every id
    for (table, cols) in [
        ("jobs", JOB_COLS),
        ("reply_targets", TARGET_COLS),
        ("attempts", ATTEMPT_COLS),
    ] {
        let lite = sqlite_rows(&fx.path, &select(table, cols, false));
        assert!(!lite.is_empty(), "{table} is empty in the fixture");
        assert_eq!(
            lite,
            pg_rows(&db, &select(table, cols, true)).await,
            "{table}"
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE claimed_by IS NOT NULL")
            .await,
        0
    );
    // the migration itself is recorded (the fixture has no actions of its own)
    let actions = pg_rows(&db, "SELECT actor, action, detail FROM operator_actions").await;
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0][..2], ["ops".to_string(), "migrate".to_string()]);
    let detail = json(&actions[0][2]);
    assert_eq!(detail["jobs"], 11);
    assert_eq!(detail["pending"], 1);
    assert_eq!(detail["reason"], "move");
    // sequences past the copied ids: a new row does not collide
    let max_id = db.count("SELECT max(id) FROM jobs").await;
    let next = db
        .count("SELECT nextval(pg_get_serial_sequence('jobs', 'id'))")
        .await;
    assert!(next > max_id, "jobs sequence at {next}, max id {max_id}");
    let next = db
        .count("SELECT nextval(pg_get_serial_sequence('attempts', 'id'))")
        .await;
    assert!(next > db.count("SELECT max(id) FROM attempts").await);

    // the read verbs print the same on both engines
    for args in [
        vec!["list", "--json", "--limit", "0"],
        vec!["list"],
        vec!["list", "--status", "unknown", "--json"],
        vec!["list", "--bill-no-prefix", "B-UNK", "--json"],
        vec!["list", "--errcode", "-1", "--op", "pay", "--json"],
        vec!["list", "--since", "3h", "--until", "5m", "--json"],
        vec!["show", "B-TRANS", "--json"],
        vec!["show", "B-CXL"],
        vec!["show", "B-BAL", "--appid", "wx1234567", "--json"],
        vec!["export"],
        vec!["export", "--format", "csv", "--status", "failed"],
        vec!["retry", "--status", "unknown", "--dry-run", "--json"],
        vec!["retry", "--status", "failed", "--dry-run"],
        vec!["republish", "--status", "succeeded", "--dry-run", "--json"],
    ] {
        let lite = ok(&fx.settings, &args);
        let post = ok(&pg, &args);
        assert!(!lite.trim().is_empty(), "{args:?} printed nothing");
        assert_eq!(
            lite, post,
            "outbox {args:?} differs between SQLite and PostgreSQL"
        );
    }
    // stats: the same numbers (the age of the oldest pending job moves with the clock)
    let strip = |text: String| {
        let mut v = json(&text);
        v["oldest_pending"]["age_seconds"] = Value::Null;
        v
    };
    let lite = strip(ok(&fx.settings, &["stats", "--json"]));
    assert_eq!(lite["jobs"], 11);
    assert_eq!(lite, strip(ok(&pg, &["stats", "--json"])));
    assert_eq!(
        without_times(&ok(
            &fx.settings,
            &["prune", "--dry-run", "--older-than", "90d"]
        )),
        without_times(&ok(&pg, &["prune", "--dry-run", "--older-than", "90d"]))
    );

    // the same one-line errors
    for args in [
        vec!["show", "NO-SUCH-BILL"],
        vec!["list", "--status", "bogus"],
        vec!["retry", "B-CXL"],
        vec!["retry", "B-TRANS"],
    ] {
        let (lite, post) = (err(&fx.settings, &args), err(&pg, &args));
        assert_eq!(lite.to_string(), post.to_string(), "{args:?}");
        assert_eq!(lite.exit_code(), post.exit_code(), "{args:?}");
    }
}

/// (actor, action, target, detail) of every action but the migration.
async fn pg_actions(db: &TestDb) -> Vec<(String, String, String, Value)> {
    pg_rows(
        db,
        "SELECT actor, action, target, detail FROM operator_actions WHERE action <> 'migrate' ORDER BY id",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), json(&r[3])))
    .collect()
}

fn sqlite_actions(path: &Path) -> Vec<(String, String, String, Value)> {
    sqlite_rows(
        path,
        "SELECT actor, action, target, detail FROM operator_actions ORDER BY id",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), json(&r[3])))
    .collect()
}

#[tokio::test]
async fn retry_republish_and_prune_act_the_same_and_hand_jobs_back_to_the_coordinator() {
    let (fx, db, pg, _source) = migrated("ops_writes").await;
    // a worker held every job (as a lease holder would have)
    db.client()
        .await
        .execute("UPDATE jobs SET claimed_by = 'worker-a'", &[])
        .await
        .expect("claim");
    let both = |args: &[&str]| {
        let lite = ok(&fx.settings, args);
        let post = ok(&pg, args);
        (lite, post)
    };

    // one job: re-opened, claimed by nobody, its reply target queued again
    let (lite, post) = both(&[
        "retry",
        "B-UNK",
        "--actor",
        "ops",
        "--reason",
        "midas said retry",
    ]);
    assert_eq!(without_times(&lite), without_times(&post));
    assert!(post.starts_with("re-opened pay B-UNK"), "{post}");
    let row = &pg_rows(
        &db,
        "SELECT state, claimed_by, result, finished_at::text, (reopened_at IS NOT NULL)::text \
         FROM jobs WHERE bill_no = 'B-UNK'",
    )
    .await[0];
    assert_eq!(row, &["pending", "NULL", "NULL", "NULL", "true"]);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.bill_no = 'B-UNK' AND t.published_at IS NULL"
        )
        .await,
        1
    );
    // the same state change as SQLite (times aside)
    let cols = "bill_no, op, state, result, finished_at, attempts, calls, last_errcode";
    let lite_jobs = sqlite_rows(&fx.path, &select("jobs", cols, false));
    assert_eq!(lite_jobs, pg_rows(&db, &select("jobs", cols, true)).await);

    // a set: the same plan, acted on the same way
    let (lite, post) = both(&[
        "retry", "--status", "failed", "--yes", "--expect", "3", "--json", "--actor", "ops",
    ]);
    assert_eq!(json(&lite), json(&post));
    assert_eq!(json(&post)["acting"], 1, "{post}");
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no = 'B-SIG' AND state = 'pending' AND claimed_by IS NULL")
            .await,
        1
    );
    // jobs the retry skipped keep their claim
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no = 'B-BAL' AND claimed_by = 'worker-a'")
            .await,
        1
    );

    // republish: returned replies are re-sent, and reset to not returned
    let (lite, post) = both(&["republish", "B-RET", "--actor", "ops"]);
    assert_eq!(lite, post);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.bill_no = 'B-RET' AND t.published_at IS NULL AND t.returned = 0"
        )
        .await,
        1
    );
    let plan = json(&outbox(&pg, &["republish", "--status", "succeeded", "--json"]).1);
    let matched = plan["matched"].to_string();
    let (lite, post) = both(&[
        "republish",
        "--status",
        "succeeded",
        "--yes",
        "--expect",
        &matched,
        "--json",
        "--actor",
        "ops",
    ]);
    assert_eq!(json(&lite), json(&post));
    // a pending job is refused the same way on both
    for args in [vec!["republish", "B-PEND"], vec!["retry", "B-UNK"]] {
        let (lite, post) = (err(&fx.settings, &args), err(&pg, &args));
        // (the next attempt of the re-opened job is "now" of each retry)
        assert_eq!(
            without_times(&lite.to_string()),
            without_times(&post.to_string())
        );
        assert!(matches!(post, AuditError::Refused(_)), "{post}");
    }

    // prune: the old final job goes with its attempts and reply targets
    let (lite, post) = both(&["prune", "--older-than", "90d", "--actor", "ops"]);
    assert_eq!(without_times(&lite), without_times(&post));
    assert!(post.starts_with("deleted 1 final job"), "{post}");
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no = 'B-OLD'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE bill_no = 'B-PEND'")
            .await,
        1
    );
    let orphans = db
        .count(
            "SELECT (SELECT count(*) FROM attempts a WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = a.job_id)) \
             + (SELECT count(*) FROM reply_targets t WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = t.job_id))",
        )
        .await;
    assert_eq!(orphans, 0);

    // every action recorded the same way (the prune's cutoff moves with the clock)
    let mask = |mut v: Vec<(String, String, String, Value)>| {
        for a in &mut v {
            if a.1 == "prune" {
                a.2 = "<cutoff>".into();
                a.3["finished_before"] = Value::Null;
            }
        }
        v
    };
    let lite = mask(sqlite_actions(&fx.path));
    assert_eq!(lite.len(), 1 + 1 + 1 + 4 + 1, "{lite:?}");
    assert_eq!(lite, mask(pg_actions(&db).await));

    // after all that, the reads still agree
    let args = ["list", "--json", "--limit", "0"];
    assert_eq!(ok(&fx.settings, &args), ok(&pg, &args));
    let args = ["export", "--format", "csv"];
    assert_eq!(ok(&fx.settings, &args), ok(&pg, &args));
}

#[tokio::test]
async fn migrate_refuses_a_target_with_rows_and_masks_the_password() {
    let fx = fixture().await;
    let db = TestDb::new("ops_refuse").await;
    // trust authentication ignores the password: it only has to stay unprinted
    let with_pw = plain(&db.url.replacen("postgres@", "postgres:pw-s3cret@", 1));
    assert_ne!(with_pw, db.url);
    let again = copy_of(&fx.path);
    let first = ok(&fx.settings, &["migrate", "--to", &with_pw]);
    assert!(!first.contains("pw-s3cret"), "{first}");
    assert!(first.contains("***"), "{first}");
    // the migrated file itself refuses a second migration (masked URL, too)
    let e = err(&fx.settings, &["migrate", "--to", &with_pw]);
    assert!(
        e.to_string().contains("migrated to") && !e.to_string().contains("pw-s3cret"),
        "{e}"
    );
    // an unmarked copy of it: the target is not empty
    let (r, text) = outbox(&again.settings, &["migrate", "--to", &with_pw]);
    let e = r.expect_err("a second migration must be refused");
    assert!(text.is_empty(), "{text}");
    let msg = e.to_string();
    assert!(msg.contains("not empty (11 jobs"), "{msg}");
    assert!(!msg.contains("pw-s3cret"), "{msg}");
    assert_eq!(e.exit_code(), 1);
    // nothing was added by the refused attempt
    assert_eq!(db.count("SELECT count(*) FROM jobs").await, 11);
    assert_eq!(db.count("SELECT count(*) FROM operator_actions").await, 1);

    // a URL that is not PostgreSQL is a usage error
    let e = err(
        &fx.settings,
        &["migrate", "--to", "mysql://x:pw-s3cret@h/db"],
    );
    assert_eq!(e.exit_code(), 2);
    assert!(!e.to_string().contains("pw-s3cret"), "{e}");
    // no SQLite outbox to migrate
    let missing = settings_for(&fx.path.with_file_name("nothing.sqlite"));
    let e = err(&missing, &["migrate", "--to", &plain(&db.url)]);
    assert!(matches!(e, AuditError::MissingDatabase { .. }), "{e}");
}

#[tokio::test]
async fn a_database_without_an_outbox_is_reported_like_a_missing_file() {
    let db = TestDb::new("ops_empty").await;
    let pg = pg_settings(&plain(&db.url.replacen(
        "postgres@",
        "postgres:pw-s3cret@",
        1,
    )));
    let e = err(&pg, &["list"]);
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(msg.contains("(is outbox.url right?)"), "{msg}");
    assert!(!msg.contains("pw-s3cret"), "{msg}");
    // a database that is not there: what the server said, on one line
    let gone = pg_settings(&plain(&db.url.replace(&db.name, "mw_no_such_database")));
    let e = err(&gone, &["stats"]);
    assert_eq!(e.exit_code(), 1);
    assert!(
        e.to_string()
            .contains("\"mw_no_such_database\" does not exist"),
        "{e}"
    );
    // a read did not create the schema
    assert_eq!(
        db.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'jobs'")
            .await,
        0
    );
}

/// `prune` deletes the stored pushes whose event the broker confirmed and that
/// WeChat last sent before the cutoff, the same on both engines: never one whose
/// event is still to be published, nor one WeChat repeated since the cutoff.
#[tokio::test]
async fn prune_deletes_old_confirmed_pushes_only_on_both_engines() {
    const DAY: i64 = 86_400_000;
    let fx = fixture().await;
    let now = midas_worker::command::now_ms();
    // (dedup key, received, last received, published)
    let pushes = [
        (
            "P-OLD",
            now - 100 * DAY,
            now - 100 * DAY,
            Some(now - 100 * DAY),
        ),
        (
            "P-OLD-2",
            now - 95 * DAY,
            now - 94 * DAY,
            Some(now - 94 * DAY),
        ),
        ("P-UNCONFIRMED", now - 100 * DAY, now - 100 * DAY, None),
        (
            "P-REPEATED",
            now - 100 * DAY,
            now - 3 * DAY,
            Some(now - 100 * DAY),
        ),
        ("P-NEW", now - 3 * DAY, now - 3 * DAY, Some(now - 3 * DAY)),
    ];
    {
        let c = fx.conn();
        for (key, received, last, published) in pushes {
            c.execute(
                "INSERT INTO pushes (appid, kind, dedup_key, event, event_id, openid, out_trade_no, env, \
                 message, received_at, last_received_at, published_at) \
                 VALUES ('wx1234567', 'goods_delivered', ?1, 'minigame_game_pay_goods_deliver_notify', \
                 'evt-' || ?1, 'o', ?1, 0, '{}', ?2, ?3, ?4)",
                rusqlite::params![key, received, last, published],
            )
            .expect("insert push");
        }
    }
    let db = TestDb::new("ops_prune_pushes").await;
    let source = copy_of(&fx.path);
    ok(
        &source.settings,
        &["migrate", "--to", &plain(&db.url), "--actor", "ops"],
    );
    let pg = pg_settings(&plain(&db.url));
    let keys_lite = || -> Vec<String> {
        sqlite_rows(&fx.path, "SELECT dedup_key FROM pushes ORDER BY id")
            .into_iter()
            .map(|r| r[0].clone())
            .collect()
    };
    let keys_pg = || async {
        pg_rows(&db, "SELECT dedup_key FROM pushes ORDER BY id")
            .await
            .into_iter()
            .map(|r| r[0].clone())
            .collect::<Vec<String>>()
    };
    let all: Vec<String> = pushes.iter().map(|p| p.0.to_string()).collect();
    assert_eq!(keys_lite(), all);
    assert_eq!(keys_pg().await, all);

    let args = ["prune", "--dry-run", "--older-than", "90d"];
    let (lite, post) = (ok(&fx.settings, &args), ok(&pg, &args));
    assert_eq!(without_times(&lite), without_times(&post));
    assert!(
        lite.contains("would delete 2 stored pushes last received before"),
        "{lite}"
    );
    assert_eq!(keys_lite(), all, "a dry run deletes nothing");
    assert_eq!(keys_pg().await, all, "a dry run deletes nothing");

    let args = ["prune", "--older-than", "90d", "--actor", "ops"];
    let (lite, post) = (ok(&fx.settings, &args), ok(&pg, &args));
    assert_eq!(without_times(&lite), without_times(&post));
    assert!(
        lite.contains("deleted 2 stored pushes last received before"),
        "{lite}"
    );
    let kept = ["P-UNCONFIRMED", "P-REPEATED", "P-NEW"];
    assert_eq!(keys_lite(), kept);
    assert_eq!(keys_pg().await, kept);
    // recorded with the count, the same on both
    let recorded = |v: Vec<(String, String, String, Value)>| {
        v.into_iter()
            .filter(|a| a.1 == "prune")
            .map(|a| a.3["pushes_deleted"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(recorded(sqlite_actions(&fx.path)), [Value::from(2)]);
    assert_eq!(recorded(pg_actions(&db).await), [Value::from(2)]);

    // however old, an unconfirmed push stays
    let args = ["prune", "--older-than", "48h", "--actor", "ops"];
    let (lite, post) = (ok(&fx.settings, &args), ok(&pg, &args));
    assert_eq!(without_times(&lite), without_times(&post));
    assert!(lite.contains("deleted 2 stored pushes"), "{lite}");
    assert_eq!(keys_lite(), ["P-UNCONFIRMED"]);
    assert_eq!(keys_pg().await, ["P-UNCONFIRMED"]);
}
