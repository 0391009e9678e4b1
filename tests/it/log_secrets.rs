//! Secrets stay out of the log at every level (SECURITY.md, contract guarantee 7):
//! a worker on a PostgreSQL outbox, run as a child process at `RUST_LOG=trace`
//! with every dependency named at trace too, handles a pay (signed with a sentinel
//! session_key) and a balance; its whole log is then searched for the session_key,
//! the AppKey, the app secret, every access token the simulator issued, the broker
//! password and the database password.

use std::process::Command;
use std::time::Duration;

use midas_worker::command::Status;
use midas_worker::sim::Faults;

use crate::common::pg::TestDb;
use crate::common::{terminate, unique, TestEnv, APP_KEY, APP_SECRET};

const T: Duration = Duration::from_secs(30);

/// Everything at trace, the crates that log values named explicitly.
const TRACE_ALL: &str = "trace,tokio_postgres=trace,postgres_protocol=trace,rustls=trace,\
hyper=trace,hyper_util=trace,reqwest=trace,h2=trace,lapin=trace,amq_protocol=trace";

/// A RabbitMQ user of its own with a sentinel password (`rabbitmqctl`, as the test
/// runner may); deleted on drop. `None` where rabbitmqctl cannot add one.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(password: &str) -> Option<BrokerUser> {
        let name = unique("mw-log-test");
        let ok = |args: &[&str]| {
            Command::new("rabbitmqctl")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ok(&["add_user", &name, password]) {
            return None;
        }
        let user = BrokerUser { name };
        ok(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]).then_some(user)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// `url` with `password` put in for the user's (`scheme://user@…` or `user:pw@`).
fn with_password(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_a_trace_log_of_a_postgres_worker() {
    let session_key = format!("SENTINELsk{}", rand::random::<u64>());
    let broker_pw = format!("SENTINELamqp{}", rand::random::<u64>());
    let db_pw = format!("SENTINELpg{}", rand::random::<u64>());

    let db = TestDb::new("logsecrets").await;
    let mut env = TestEnv::new("logsecrets");
    // a password the trusted test login does not need: it is in the URL all the same
    let db_user = db
        .url
        .split_once("://")
        .and_then(|(_, r)| r.split(['@', ':']).next())
        .unwrap_or("postgres")
        .to_string();
    let db_url = with_password(&db.url, &db_user, &db_pw);
    env.set("OUTBOX__URL", &db_url);
    let broker_user = BrokerUser::create(&broker_pw);
    let worker_broker = match &broker_user {
        Some(u) => with_password(crate::common::BROKER, &u.name, &broker_pw),
        None => {
            eprintln!("rabbitmqctl cannot add a user here: the broker password is not checked");
            crate::common::BROKER.to_string()
        }
    };
    let sim = env.simulator(Faults::default()).await;
    sim.register_session("logsecrets-player", &session_key);
    let mut c = env.client().await;
    // the game client connects as guest; only the worker uses the sentinel password
    let mut worker_env = env.env.clone();
    worker_env.insert("MIDAS_WORKER__BROKER__URL".into(), worker_broker);
    let log = env.dir.path().join("worker.log");
    let child_env = TestEnv {
        tag: env.tag.clone(),
        dir: tempfile::tempdir().expect("tempdir"),
        env: worker_env,
    };
    let mut child = child_env.spawn_child_logged_at(&sim.base_url(), &log, TRACE_ALL);

    let bill = unique("LOG").replace('-', "_");
    let pay = format!(
        r#"{{"op":"pay","bill_no":"{bill}","openid":"logsecrets-player","amt":7,"session_key":"{session_key}"}}"#
    );
    c.publish(pay.as_bytes(), "pay").await.expect("publish pay");
    let bal =
        format!(r#"{{"op":"balance","openid":"logsecrets-player","session_key":"{session_key}"}}"#);
    c.publish(bal.as_bytes(), "bal")
        .await
        .expect("publish balance");
    let p = c.reply_for("pay", T).await.expect("pay reply");
    let b = c.reply_for("bal", T).await.expect("balance reply");
    let stopped = terminate(&mut child, Duration::from_secs(30));
    assert_eq!(p.reply.status, Some(Status::Succeeded), "{:?}", p.reply);
    assert_eq!(b.reply.status, Some(Status::Succeeded), "{:?}", b.reply);
    assert!(stopped, "the worker stops on SIGTERM");

    let text = std::fs::read_to_string(&log).expect("worker log");
    // trace was in force: the worker's own trace/debug lines are there, and the
    // job went through PostgreSQL
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "the log is not at trace level:\n{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(
        db.count(&format!(
            "SELECT count(*) FROM jobs WHERE bill_no = '{bill}'"
        ))
        .await
            == 1,
        "the pay went through the PostgreSQL outbox"
    );
    let tokens = sim.issued_tokens();
    assert!(!tokens.is_empty(), "the worker fetched an access token");
    let mut secrets = vec![
        ("session_key", session_key.clone()),
        ("AppKey", APP_KEY.to_string()),
        ("app secret", APP_SECRET.to_string()),
        ("database password", db_pw.clone()),
    ];
    if broker_user.is_some() {
        secrets.push(("broker password", broker_pw.clone()));
    }
    secrets.extend(tokens.into_iter().map(|t| ("access token", t)));
    for (what, secret) in &secrets {
        if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
            panic!("the {what} is in the worker's trace log: {line}");
        }
    }
    env.cleanup(&c).await;
}

/// `outbox migrate` copies every pending job's session_key into PostgreSQL; at
/// `RUST_LOG=trace` (tokio-postgres would log each INSERT's parameters) none of
/// them reaches its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_migrate_at_trace_logs_no_session_key() {
    let fx = crate::audit_cli::fixture().await;
    let db = TestDb::new("migratelog").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_midas-worker"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
            "outbox",
            "migrate",
            "--to",
            &format!("{}?sslmode=disable", db.url),
        ])
        .env("MIDAS_WORKER__OUTBOX__PATH", &fx.path)
        .env("RUST_LOG", TRACE_ALL)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run outbox migrate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        db.count("SELECT count(*) FROM jobs WHERE session_key IS NOT NULL")
            .await
            > 0,
        "session_keys were copied"
    );
    if let Some(line) = text.lines().find(|l| l.contains(crate::audit_cli::SECRET)) {
        panic!("a session_key in migrate's output: {line}");
    }
}
