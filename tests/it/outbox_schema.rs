//! The outbox file itself: a version-1 outbox (written by the previous release's
//! schema, kept in `tests/fixtures/schema-v1.sql`) is migrated in place without losing
//! a row; a file from a future release is refused untouched; and a session_key erased
//! when its job ends is found in none of the database, WAL or shared-memory files.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

use midas_worker::command::{Command, Op, Params};
use midas_worker::engine::{AttemptRow, Record, Update};
use midas_worker::job::JobState;
use midas_worker::midas::{Answer, Api, Body, OutcomeClass};
use midas_worker::outbox::{self, Intake, IntakeOutcome, OutboxError, Writer};
use midas_worker::secret::Secret;

const V1_SCHEMA: &str = include_str!("../fixtures/schema-v1.sql");

fn params(appid: &str, op: Op, bill_no: &str) -> Params {
    Params {
        op,
        bill_no: Some(bill_no.into()),
        openid: "o-1".into(),
        appid: appid.into(),
        zone_id: "1".into(),
        pf: "android".into(),
        user_ip: None,
        amt: (op != Op::Present).then_some(10),
        present_counts: (op == Op::Present).then_some(3),
        pay_item: None,
        app_remark: None,
        query: None,
        pay_bill_no: None,
    }
}

pub(crate) fn intake(appid: &str, op: Op, bill_no: &str, key: Option<&str>, corr: &str) -> Intake {
    Intake {
        command: Command {
            params: params(appid, op, bill_no),
            session_key: key.map(Secret::new),
        },
        reply_to: "midas.results".into(),
        correlation_id: corr.into(),
        now: 1_700_000_000_000,
    }
}

/// One job row of a version-1 file, the way the previous release wrote it.
#[allow(clippy::too_many_arguments)]
fn v1_job(
    c: &Connection,
    id: i64,
    op: &str,
    bill_no: &str,
    state: &str,
    attempts: i64,
    key: Option<&str>,
) {
    let p = params(
        "wx1234567",
        match op {
            "cancel_pay" => Op::CancelPay,
            "present" => Op::Present,
            _ => Op::Pay,
        },
        bill_no,
    );
    let fin = (state != "pending").then_some(1_700_000_100_000i64);
    c.execute(
        "INSERT INTO jobs (id, op, bill_no, appid, openid, request, session_key, state, attempts, \
         next_attempt_at, first_attempt_at, last_errcode, last_error, result, received_at, updated_at, finished_at) \
         VALUES (?1, ?2, ?3, 'wx1234567', 'o-1', ?4, ?5, ?6, ?7, 1700000000000, 1700000000000, -1, 'system error', \
         ?8, 1700000000000, 1700000000000, ?9)",
        params![
            id,
            op,
            bill_no,
            p.canonical(),
            key,
            state,
            attempts,
            fin.map(|_| format!("{{\"bill_no\":\"{bill_no}\",\"status\":\"{state}\"}}")),
            fin
        ],
    )
    .expect("v1 job");
    c.execute(
        "INSERT INTO reply_targets (job_id, reply_to, correlation_id, added_at, published_at) \
         VALUES (?1, 'midas.results', ?2, 1700000000000, ?3)",
        params![id, format!("c-{id}"), fin],
    )
    .expect("v1 target");
}

fn v1_attempt(c: &Connection, job_id: i64, n: i64, outcome: &str) {
    c.execute(
        "INSERT INTO attempts (job_id, n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome) \
         VALUES (?1, ?2, 'pay', 1700000000000, 42, 200, -1, 'system error', ?3)",
        params![job_id, n, outcome],
    )
    .expect("v1 attempt");
}

/// A version-1 outbox: jobs in every state, with reply targets, attempts (some
/// transient) and an operator action. Ids have gaps, as after a prune.
fn write_v1(path: &Path) {
    let c = Connection::open(path).expect("open");
    c.execute_batch(V1_SCHEMA).expect("v1 schema");
    v1_job(&c, 3, "pay", "B-PEND", "pending", 1, Some("SK-PEND"));
    v1_attempt(&c, 3, 1, "transient");
    v1_job(&c, 5, "pay", "B-OK", "succeeded", 2, None);
    v1_attempt(&c, 5, 1, "transient");
    v1_attempt(&c, 5, 2, "success");
    v1_job(&c, 6, "cancel_pay", "B-OK", "unknown", 1, None);
    v1_attempt(&c, 6, 1, "transient");
    v1_job(&c, 9, "present", "B-FAIL", "failed", 1, None);
    v1_attempt(&c, 9, 1, "definitive");
    v1_job(&c, 10, "pay", "B-NEW", "pending", 0, Some("SK-NEW"));
    c.execute(
        "INSERT INTO operator_actions (at, actor, action, target, detail) \
         VALUES (1700000200000, 'carol', 'retry', 'B-OK', '{\"job_id\":6}')",
        [],
    )
    .expect("action");
}

type JobDump = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    Option<String>,
);

fn dump_jobs(c: &Connection) -> Vec<JobDump> {
    c.prepare(
        "SELECT id, op, bill_no, request, session_key, state, attempts, result FROM jobs ORDER BY id",
    )
    .expect("prepare")
    .query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

fn dump(c: &Connection, sql: &str) -> Vec<String> {
    c.prepare(sql)
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

const TARGETS: &str = "SELECT job_id || ' ' || correlation_id || ' ' || IFNULL(published_at, '-') FROM reply_targets ORDER BY id";
const ATTEMPTS: &str =
    "SELECT id || ' ' || job_id || ' ' || n || ' ' || outcome FROM attempts ORDER BY id";
const ACTIONS: &str = "SELECT actor || ' ' || action || ' ' || target || ' ' || detail FROM operator_actions ORDER BY id";

/// The `CREATE` statements of the tables and indexes, as SQLite stored them.
fn schema_of(c: &Connection) -> Vec<String> {
    dump(
        c,
        "SELECT type || ' ' || name || ': ' || sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name",
    )
}

#[tokio::test]
async fn a_version_1_outbox_is_migrated_in_place_keeping_every_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    write_v1(&path);
    let (jobs, targets, attempts, actions) = {
        let c = Connection::open(&path).expect("open");
        (
            dump_jobs(&c),
            dump(&c, TARGETS),
            dump(&c, ATTEMPTS),
            dump(&c, ACTIONS),
        )
    };
    assert_eq!(jobs.len(), 5);

    // Read-only opens never migrate: they say what to do.
    let e = outbox::open_ro(&path).expect_err("v1 refused read-only");
    assert!(e.to_string().contains("schema version 1"), "{e}");

    // The worker's writer opens it: migrated.
    let (w, join) = Writer::start(&path, None).expect("writer opens a v1 outbox");
    w.flush().await.expect("flush");

    let c = Connection::open(&path).expect("open");
    assert_eq!(
        dump_jobs(&c),
        jobs,
        "every job, every id, every column kept"
    );
    assert_eq!(dump(&c, TARGETS), targets);
    assert_eq!(dump(&c, ATTEMPTS), attempts);
    assert_eq!(dump(&c, ACTIONS), actions);
    assert_eq!(
        dump(&c, "SELECT value FROM meta WHERE key = 'schema_version'"),
        ["2"]
    );
    assert!(dump(
        &c,
        "SELECT CAST(\"table\" AS TEXT) FROM pragma_foreign_key_check"
    )
    .is_empty());
    // calls = attempts; uncertain once any attempt was transient
    assert_eq!(
        dump(
            &c,
            "SELECT id || ':' || calls || ':' || uncertain FROM jobs ORDER BY id"
        ),
        ["3:1:1", "5:2:1", "6:1:1", "9:1:0", "10:0:0"]
    );
    // the migrated file has exactly the schema of a new one
    let fresh = dir.path().join("fresh.sqlite");
    drop(outbox::open_rw(&fresh, None).expect("fresh outbox"));
    assert_eq!(
        schema_of(&c),
        schema_of(&Connection::open(&fresh).expect("open fresh"))
    );
    // The same bill_no under a second app is a separate job now; under the first
    // app it is still the same job.
    let other = w
        .intake(intake(
            "wx7654321",
            Op::Pay,
            "B-OK",
            Some("SK-X"),
            "c-other",
        ))
        .await
        .expect("intake");
    assert!(
        matches!(&other, IntakeOutcome::New(job) if job.id > 10),
        "{other:?}"
    );
    let same = w
        .intake(intake("wx1234567", Op::Pay, "B-OK", None, "c-again"))
        .await
        .expect("intake");
    assert!(
        matches!(
            same,
            IntakeOutcome::Joined {
                job_id: 5,
                reply: Some(_),
                ..
            }
        ),
        "{same:?}"
    );
    drop(w);
    join.join().expect("writer thread");

    // A second start finds version 2 and changes nothing.
    let before = dump_jobs(&Connection::open(&path).expect("open"));
    let (w, join) = Writer::start(&path, None).expect("writer reopens");
    drop(w);
    join.join().expect("writer thread");
    assert_eq!(dump_jobs(&Connection::open(&path).expect("open")), before);
    outbox::open_ro(&path).expect("a v2 outbox opens read-only");
}

#[test]
fn an_outbox_from_a_future_release_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    write_v1(&path);
    let c = Connection::open(&path).expect("open");
    c.execute(
        "UPDATE meta SET value = '7' WHERE key = 'schema_version'",
        [],
    )
    .expect("update");
    let before = dump_jobs(&c);
    for e in [
        outbox::open_rw(&path, None).err(),
        outbox::open_existing_rw(&path).err(),
        outbox::open_ro(&path).err(),
    ] {
        let e = e.expect("refused");
        assert!(matches!(e, OutboxError::Schema(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("schema version 7") && msg.contains("newer than this release"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
    assert_eq!(dump_jobs(&c), before);
    assert_eq!(
        dump(&c, "SELECT value FROM meta WHERE key = 'schema_version'"),
        ["7"]
    );
}

fn answer(class: OutcomeClass, code: i64) -> Answer {
    Answer {
        api: Api::Pay,
        class,
        http_status: Some(200),
        errcode: Some(code),
        errmsg: Some("ok".into()),
        body: Body::default(),
        latency: Duration::from_millis(5),
    }
}

/// Whether `needle` occurs in the file (absent file: no).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    match std::fs::read(path) {
        Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle),
        Err(_) => false,
    }
}

fn sidecars(path: &Path) -> [std::path::PathBuf; 3] {
    let with = |s: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(s);
        std::path::PathBuf::from(p)
    };
    [path.to_path_buf(), with("-wal"), with("-shm")]
}

#[tokio::test]
async fn an_erased_session_key_survives_in_no_file_and_the_files_are_private() {
    const KEY: &str = "SKzq9-DISTINCTIVE-session-key-4711";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data").join("outbox.sqlite");
    let (w, join) = Writer::start(&path, None).expect("writer");
    let mut ids = Vec::new();
    for i in 0..20 {
        match w
            .intake(intake(
                "wx1234567",
                Op::Pay,
                &format!("B-SD-{i}"),
                Some(KEY),
                &format!("c-{i}"),
            ))
            .await
            .expect("intake")
        {
            IntakeOutcome::New(job) => ids.push(job.id),
            other => panic!("expected a new job: {other:?}"),
        }
    }
    w.flush().await.expect("flush");
    let files = sidecars(&path);
    assert!(
        files.iter().any(|f| file_contains(f, KEY.as_bytes())),
        "the key is on disk while its jobs are pending (else this test proves nothing)"
    );

    for (n, id) in ids.iter().enumerate() {
        let out = w
            .record(Record {
                session_guard: None,
                job_id: *id,
                attempts_total: 1,
                first_attempt_at: Some(1_700_000_000_000),
                uncertain: false,
                rows: vec![AttemptRow {
                    n: 1,
                    started_at: 1_700_000_000_000,
                    answer: answer(OutcomeClass::Success, 0),
                }],
                update: Update::Final {
                    state: JobState::Succeeded,
                    reply: format!("{{\"bill_no\":\"B-SD-{n}\",\"status\":\"succeeded\"}}")
                        .into_bytes(),
                },
                now: 1_700_000_001_000,
                lease_gen: 0,
            })
            .await
            .expect("record");
        assert_eq!(out.replies.len(), 1);
    }
    w.flush().await.expect("flush");

    // While the worker still holds the file open: one checkpoint, and the key is gone
    // from the database, the WAL and the shared memory.
    let c = outbox::open_existing_rw(&path).expect("open");
    assert!(
        outbox::checkpoint(&c).expect("checkpoint"),
        "complete checkpoint"
    );
    assert_eq!(
        c.query_row(
            "SELECT COUNT(*) FROM jobs WHERE session_key IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0)
        )
        .expect("count"),
        0
    );
    for f in &files {
        assert!(
            !file_contains(f, KEY.as_bytes()),
            "session_key bytes found in {}",
            f.display()
        );
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        for f in &files {
            if f.exists() {
                assert_eq!(mode(f), 0o600, "{}", f.display());
            }
        }
    }
    drop(c);
    drop(w);
    join.join().expect("writer thread");
}

/// Nobody checkpoints by hand: an idle writer truncates the WAL by itself within a
/// few seconds of its last commit, so an erased session_key does not wait in the WAL
/// for the next command.
#[tokio::test]
async fn an_idle_writer_clears_erased_session_keys_from_the_wal_by_itself() {
    const KEY: &str = "SKzq9-IDLE-session-key-0815";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let (w, join) = Writer::start(&path, None).expect("writer");
    let id = match w
        .intake(intake("wx1234567", Op::Pay, "B-IDLE", Some(KEY), "c-idle"))
        .await
        .expect("intake")
    {
        IntakeOutcome::New(job) => job.id,
        other => panic!("expected a new job: {other:?}"),
    };
    let files = sidecars(&path);
    w.record(Record {
        session_guard: None,
        job_id: id,
        attempts_total: 1,
        first_attempt_at: Some(1_700_000_000_000),
        uncertain: false,
        rows: Vec::new(),
        update: Update::Final {
            state: JobState::Succeeded,
            reply: b"{\"status\":\"succeeded\"}".to_vec(),
        },
        now: 1_700_000_001_000,
        lease_gen: 0,
    })
    .await
    .expect("record");
    assert!(
        files.iter().any(|f| file_contains(f, KEY.as_bytes())),
        "the erased key is still in the WAL right after the commit (else this test proves nothing)"
    );
    let gone = crate::common::eventually(std::time::Duration::from_secs(20), || {
        files.iter().all(|f| !file_contains(f, KEY.as_bytes()))
    })
    .await;
    assert!(gone, "the idle writer left the erased session_key on disk");
    drop(w);
    join.join().expect("writer thread");
}

/// `schema.sql` and `schema-postgres.sql` are each the single truth for their
/// engine: applied by the code, they describe the same tables, columns, nullability
/// and indexes, apart from the coordination only a shared outbox has
/// (`jobs.claimed_by`, `player_leases`, `leases`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_and_postgres_schemas_describe_the_same_tables() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let lite = outbox::open_rw(&dir.path().join("o.sqlite"), None).unwrap();
    let db = crate::common::pg::TestDb::new("schema").await;
    midas_worker::outbox::postgres::open(&db.secret_url())
        .await
        .expect("the PostgreSQL schema applies");
    // applying it again is harmless (every worker does at start)
    midas_worker::outbox::postgres::open(&db.secret_url())
        .await
        .expect("and again");

    type Tables = BTreeMap<String, Vec<(String, bool)>>;
    let mut sqlite: Tables = BTreeMap::new();
    let names: Vec<String> = lite
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for t in names {
        let cols: Vec<(String, bool)> = lite
            .prepare(&format!("PRAGMA table_info({t})"))
            .unwrap()
            .query_map([], |r| {
                let pk: i64 = r.get(5)?;
                let notnull: i64 = r.get(3)?;
                // an INTEGER PRIMARY KEY is never NULL in SQLite either
                Ok((r.get::<_, String>(1)?, notnull != 0 || pk != 0))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        sqlite.insert(t, cols);
    }
    let pg = db.client().await;
    let mut postgres: Tables = BTreeMap::new();
    for r in pg
        .query(
            "SELECT table_name::text, column_name::text, is_nullable = 'NO' FROM information_schema.columns \
             WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap()
    {
        let (t, c, nn): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        postgres.entry(t).or_default().push((c, nn));
    }
    // only a shared outbox coordinates workers
    assert!(postgres.remove("player_leases").is_some());
    assert!(postgres.remove("leases").is_some());
    let jobs = postgres.get_mut("jobs").unwrap();
    let before = jobs.len();
    jobs.retain(|(c, _)| c != "claimed_by");
    assert_eq!(jobs.len(), before - 1);
    assert_eq!(sqlite, postgres);

    let lite_idx: std::collections::BTreeSet<String> = lite
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let pg_idx: std::collections::BTreeSet<String> = pg
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' \
             AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key' \
             AND indexname NOT IN ('jobs_pending_player', 'jobs_unclaimed', 'player_leases_owner')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(lite_idx, pg_idx);
}

/// A request that fails inside a group commit (an attempt row for a job that does
/// not exist) is answered with its error alone: the intakes committed in the same
/// batches stand and are acknowledged.
#[tokio::test]
async fn a_failing_request_is_undone_alone_and_its_batch_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    let (w, join) = Writer::start(&path, None).expect("writer");
    let bad = Record {
        session_guard: None,
        job_id: 999_999,
        attempts_total: 1,
        first_attempt_at: Some(1),
        uncertain: false,
        rows: vec![midas_worker::engine::AttemptRow {
            n: 1,
            started_at: 1,
            answer: midas_worker::midas::Answer {
                api: midas_worker::midas::Api::Pay,
                class: midas_worker::midas::OutcomeClass::Success,
                http_status: Some(200),
                errcode: Some(0),
                errmsg: None,
                body: Default::default(),
                latency: std::time::Duration::ZERO,
            },
        }],
        update: Update::Retry { next_attempt_at: 2 },
        now: 2,
        lease_gen: 0,
    };
    for round in 0..20 {
        let bill = format!("B-SP-{round}");
        let (r, i) = tokio::join!(
            w.record(bad.clone()),
            w.intake(intake("wx1234567", Op::Pay, &bill, None, &bill))
        );
        assert!(r.is_err(), "an attempt of a missing job is refused");
        assert!(matches!(i, Ok(IntakeOutcome::New(_))), "{i:?}");
    }
    w.flush().await.expect("flush");
    drop(w);
    join.join().expect("writer thread");
    let c = rusqlite::Connection::open(&path).unwrap();
    let jobs: i64 = c
        .query_row(
            "SELECT count(*) FROM jobs WHERE bill_no LIKE 'B-SP-%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let attempts: i64 = c
        .query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
        .unwrap();
    assert_eq!((jobs, attempts), (20, 0));
}
