//! Shared test harness: real RabbitMQ (unique queues per test), a real SQLite outbox
//! in a temp dir, the project's Midas simulator as a real HTTP server, the worker in
//! process or as a child process, and a fault proxy for TCP links.
#![allow(dead_code)]

pub mod pg;
pub mod proxy;
pub mod push;
pub mod webdriver;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use midas_worker::client::{GameClient, Received};
use midas_worker::config::{self, Settings};
use midas_worker::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};

pub const APP_KEY: &str = "test-app-key-0123456789";
pub const APP_SECRET: &str = "test-app-secret-0123456789";
pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub struct TestEnv {
    pub tag: String,
    pub dir: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

impl TestEnv {
    /// Settings for a test: unique queues, outbox in a temp dir, fast retries,
    /// production paths pointed at a simulator (set with `midas_url`).
    pub fn new(name: &str) -> TestEnv {
        // RUST_LOG=midas_worker=info shows the worker's logs in test output
        midas_worker::telemetry::init(midas_worker::config::LogFormat::Human, "off");
        let tag = unique(name);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(format!("MIDAS_WORKER__{k}"), v);
        };
        set("BROKER__URL", BROKER.into());
        set("BROKER__COMMAND_QUEUE", format!("t-{tag}.commands"));
        set("BROKER__REPLY_QUEUE", format!("t-{tag}.results"));
        set("BROKER__DEAD_LETTER_QUEUE", format!("t-{tag}.dead"));
        set(
            "OUTBOX__PATH",
            dir.path().join("outbox.sqlite").display().to_string(),
        );
        set("HTTP__LISTEN", "127.0.0.1:0".into());
        set("RETRY__INITIAL", "50ms".into());
        set("RETRY__MAX", "300ms".into());
        set("MIDAS__REQUEST_TIMEOUT", "1s".into());
        set("MIDAS__ENVIRONMENT", "production".into());
        env.insert("MIDAS_APP_KEY".into(), APP_KEY.into());
        env.insert("WECHAT_APP_SECRET".into(), APP_SECRET.into());
        TestEnv { tag, dir, env }
    }

    /// The same test's settings with the broker URL pointing at the real broker
    /// (for the game-side client when the worker goes through a proxy).
    pub fn clone_settings_direct(&self) -> DirectEnv {
        let mut env = self.env.clone();
        env.insert("MIDAS_WORKER__BROKER__URL".into(), BROKER.into());
        DirectEnv { env }
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.env
            .insert(format!("MIDAS_WORKER__{key}"), value.into());
        self
    }

    pub fn settings(&self) -> Settings {
        config::load_from(include_str!("../../config.toml"), &self.env, "test")
            .expect("test config")
    }

    /// Use the shared PostgreSQL outbox `db` (with a 7 s lease, the shortest the
    /// config accepts for the tests' 1 s request timeout, so take-overs are
    /// quick) instead of the SQLite file.
    pub fn share_outbox(&mut self, db: &pg::TestDb) -> &mut Self {
        self.set("OUTBOX__URL", &db.url);
        self.set("OUTBOX__LEASE", "7s")
    }

    /// `outbox retry BILL` as an operator would run it, against this test's outbox.
    pub fn operator_retry(&self, bill: &str) {
        use midas_worker::audit::{run, Operator, OutboxCmd};
        let mut out = Vec::new();
        run(
            &OutboxCmd::Retry {
                bill_no: Some(bill.to_string()),
                filters: Default::default(),
                confirm: Default::default(),
                who: Operator {
                    actor: Some("test".into()),
                    reason: Some("midas recovered".into()),
                },
            },
            &self.settings(),
            &mut out,
        )
        .expect("retry accepted");
    }

    pub fn outbox_path(&self) -> PathBuf {
        self.dir.path().join("outbox.sqlite")
    }

    /// Start a simulator knowing the test app's keys.
    pub async fn simulator(&self, faults: Faults) -> SimHandle {
        let mut cfg = self.settings().config.simulator;
        cfg.initial_balance = 1_000_000;
        let sim = Simulator::new(
            cfg,
            vec![SimApp {
                appid: "wx1234567".into(),
                app_key: midas_worker::secret::Secret::new(APP_KEY),
                sandbox_key: midas_worker::secret::Secret::new("test-sandbox-key"),
                app_secret: midas_worker::secret::Secret::new(APP_SECRET),
            }],
        )
        .start()
        .await
        .expect("simulator");
        sim.set_faults(faults);
        sim
    }

    pub async fn worker(&self, midas_url: &str) -> midas_worker::worker::Running {
        midas_worker::worker::start(Arc::new(self.settings()), Some(midas_url.to_string()))
            .await
            .expect("worker starts")
    }

    pub async fn client(&self) -> GameClient {
        GameClient::connect(&self.settings().config.broker, true)
            .await
            .expect("client connects")
    }

    /// The worker binary as a child process, Midas at `midas_url`.
    pub fn spawn_child(&self, midas_url: &str) -> ChildWorker {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_midas-worker"));
        cmd.arg("run")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .envs(&self.env)
            .env("MIDAS_WORKER__MIDAS__BASE_URL", midas_url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        ChildWorker(cmd.spawn().expect("spawn worker"))
    }

    pub async fn cleanup(&self, client: &GameClient) {
        let b = self.settings().config.broker;
        client
            .delete_queues(&[&b.command_queue, &b.reply_queue, &b.dead_letter_queue])
            .await;
    }

    /// The dead-letter queue's messages (taken off it), waiting up to `timeout`
    /// for at least `n` of them: bodies only.
    pub async fn dead_letters_until(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        self.dead_letter_messages_until(n, timeout)
            .await
            .into_iter()
            .map(|m| m.body)
            .collect()
    }

    /// [`TestEnv::dead_letters_until`] with each message's properties.
    pub async fn dead_letter_messages_until(&self, n: usize, timeout: Duration) -> Vec<DeadLetter> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = self.dead_letter_messages().await;
        while out.len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            out.extend(self.dead_letter_messages().await);
        }
        out
    }

    /// How many messages sit in the dead-letter queue.
    pub async fn dead_letters(&self) -> Vec<Vec<u8>> {
        self.dead_letter_messages()
            .await
            .into_iter()
            .map(|m| m.body)
            .collect()
    }

    /// The messages in the dead-letter queue, taken off it.
    pub async fn dead_letter_messages(&self) -> Vec<DeadLetter> {
        use lapin::options::{BasicAckOptions, BasicGetOptions};
        let b = self.settings().config.broker;
        let conn = midas_worker::broker::connect(&b.url, "test dlq")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Ok(Some(m)) = ch
            .basic_get(
                b.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
        {
            let headers = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(DeadLetter {
                body: m.delivery.data.clone(),
                headers,
                expiration: m
                    .delivery
                    .properties
                    .expiration()
                    .as_ref()
                    .map(|e| e.to_string()),
            });
            let _ = m.delivery.acker.ack(BasicAckOptions::default()).await;
        }
        let _ = conn.close(200, "bye".into()).await;
        out
    }
}

/// A message of the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub expiration: Option<String>,
}

pub fn pay(bill: &str, openid: &str, amt: i64) -> String {
    format!(r#"{{"op":"pay","bill_no":"{bill}","openid":"{openid}","amt":{amt}}}"#)
}

pub fn present(bill: &str, openid: &str, n: i64) -> String {
    format!(r#"{{"op":"present","bill_no":"{bill}","openid":"{openid}","present_counts":{n}}}"#)
}

/// Collect `n` replies (any correlation), failing the test after `timeout`.
pub async fn replies(client: &mut GameClient, n: usize, timeout: Duration) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_reply(left).await {
            Ok(r) => out.push(r),
            Err(e) => panic!("only {} of {n} replies: {e}", out.len()),
        }
    }
    out
}

/// Orders in the ledger for `bill` (pay or present).
pub fn orders_for<'a>(ledger: &'a LedgerDump, bill: &str) -> Vec<&'a midas_worker::sim::Order> {
    ledger.orders.iter().filter(|o| o.bill_no == bill).collect()
}

/// Wait until `f` holds, polling.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

pub struct DirectEnv {
    pub env: BTreeMap<String, String>,
}

impl DirectEnv {
    pub async fn client(&mut self) -> GameClient {
        let s = config::load_from(include_str!("../../config.toml"), &self.env, "test")
            .expect("config");
        GameClient::connect(&s.config.broker, true)
            .await
            .expect("client connects")
    }
}

// ---------------------------------------------------------------- reliability helpers

/// Hold replies against the simulator's ledger (shared by the reliability suite):
/// - every sent key (correlation id) got a reply, and repeated replies agree;
/// - pay/present `succeeded` ⇒ exactly one order; `failed`/`rejected` ⇒ none;
///   `unknown` ⇒ at most one (a person reconciles);
/// - cancel_pay `succeeded` ⇒ the pay's order exists and is cancelled; `failed` ⇒
///   the pay's order is not cancelled (or does not exist);
/// - no order for a bill_no the game never sent.
///
/// `sent` maps correlation id → (op, bill_no).
pub fn check_ledger_ops(
    sent: &BTreeMap<String, (String, String)>,
    replies: &[Received],
    ledger: &LedgerDump,
) -> BTreeMap<String, midas_worker::command::Reply> {
    use midas_worker::command::Status;
    let mut last: BTreeMap<String, midas_worker::command::Reply> = BTreeMap::new();
    let mut raw: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for r in replies {
        let _ = r.reply.status.expect("status");
        // a repeated reply is identical, byte for byte (contract guarantee 4)
        if let Some(prev) = raw.get(r.correlation_id.as_str()) {
            assert!(
                *prev == r.raw.as_slice(),
                "a repeated reply differs ({}):\n{}\n{}",
                r.correlation_id,
                String::from_utf8_lossy(prev),
                String::from_utf8_lossy(&r.raw)
            );
        }
        raw.insert(r.correlation_id.as_str(), r.raw.as_slice());
        last.insert(r.correlation_id.clone(), r.reply.clone());
    }
    let mut bills = std::collections::HashSet::new();
    for (key, (op, bill)) in sent {
        bills.insert(bill.as_str());
        let r = last
            .get(key)
            .unwrap_or_else(|| panic!("no reply for {key} ({op} {bill})"));
        let s = r.status.expect("status");
        let orders: Vec<_> = ledger
            .orders
            .iter()
            .filter(|o| &o.bill_no == bill && (op == "cancel_pay" || &o.op == op))
            .collect();
        match op.as_str() {
            "cancel_pay" => {
                let pay = orders.iter().find(|o| o.op == "pay");
                match s {
                    Status::Succeeded => assert!(
                        pay.is_some_and(|o| o.cancelled),
                        "cancel {bill} succeeded but the ledger shows {pay:?} ({r:?})"
                    ),
                    Status::Failed | Status::Rejected => assert!(
                        !pay.is_some_and(|o| o.cancelled),
                        "cancel {bill} is {s:?} but the ledger shows the pay cancelled ({r:?})"
                    ),
                    Status::Unknown => {}
                }
            }
            _ => {
                let n = orders.len();
                match s {
                    Status::Succeeded => {
                        assert_eq!(n, 1, "{op} {bill} succeeded but applied {n} times")
                    }
                    Status::Failed | Status::Rejected => {
                        assert_eq!(n, 0, "{op} {bill} is {s:?} but applied")
                    }
                    Status::Unknown => assert!(n <= 1, "{op} {bill} applied {n} times"),
                }
            }
        }
    }
    for o in &ledger.orders {
        assert!(
            bills.contains(o.bill_no.as_str()),
            "charged a bill_no the game never sent: {}",
            o.bill_no
        );
    }
    let mut seen = std::collections::HashSet::new();
    for o in &ledger.orders {
        assert!(
            seen.insert((o.op.as_str(), o.bill_no.as_str())),
            "{} {} applied twice",
            o.op,
            o.bill_no
        );
    }
    last
}

/// Read replies until every key in `want` has one (or `timeout`).
pub async fn collect_replies(
    client: &mut GameClient,
    want: &BTreeMap<String, (String, String)>,
    timeout: Duration,
) -> Vec<Received> {
    let mut got = Vec::new();
    collect_more(client, want, &mut got, timeout).await;
    got
}

/// Add replies to `got` until every key in `want` has one there (or `timeout`).
pub async fn collect_more(
    client: &mut GameClient,
    want: &BTreeMap<String, (String, String)>,
    got: &mut Vec<Received>,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut have: std::collections::HashSet<String> = got
        .iter()
        .filter(|r| want.contains_key(&r.correlation_id))
        .map(|r| r.correlation_id.clone())
        .collect();
    while have.len() < want.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        if let Ok(r) = client.next_reply(left.min(Duration::from_secs(5))).await {
            if want.contains_key(&r.correlation_id) {
                have.insert(r.correlation_id.clone());
            }
            got.push(r);
        }
    }
}

/// Ready messages in `queue` (passive declare on a connection of its own).
pub async fn queue_depth(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = midas_worker::broker::connect(BROKER, "test depth")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let n = q.message_count();
    let _ = conn.close(200, "bye".into()).await;
    n
}

/// `GET http://{addr}{path}`: status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("http get");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// One value of a job in the outbox (read-only connection), e.g. `state`.
pub fn job_field(db: &std::path::Path, bill: &str, op: &str, field: &str) -> Option<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()?;
    c.query_row(
        &format!("SELECT CAST({field} AS TEXT) FROM jobs WHERE bill_no = ?1 AND op = ?2"),
        [bill, op],
        |r| r.get::<_, Option<String>>(0),
    )
    .ok()
    .flatten()
}

/// Attempt rows (calls to Midas, one row each) of the jobs of `bill` in the outbox.
pub fn count_attempts(db: &std::path::Path, bill: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open outbox");
    c.query_row(
        "SELECT COUNT(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.bill_no = ?1",
        [bill],
        |r| r.get(0),
    )
    .expect("count attempts")
}

/// Reply targets of job `job_id` the broker has not confirmed (`published_at` unset).
pub fn unpublished_targets(db: &std::path::Path, job_id: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open outbox");
    c.query_row(
        "SELECT COUNT(*) FROM reply_targets WHERE job_id = CAST(?1 AS INTEGER) AND published_at IS NULL",
        [job_id],
        |r| r.get(0),
    )
    .expect("count targets")
}

/// Rows of `SELECT COUNT(*) FROM jobs [WHERE ...]` in the outbox.
pub fn count_jobs(db: &std::path::Path, filter: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open outbox");
    c.query_row(&format!("SELECT COUNT(*) FROM jobs {filter}"), [], |r| {
        r.get(0)
    })
    .expect("count")
}

/// This process's resident set size in KiB (Linux `/proc/self/status`).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn cancel_pay(bill: &str, openid: &str) -> String {
    format!(r#"{{"op":"cancel_pay","bill_no":"{bill}","openid":"{openid}"}}"#)
}

impl TestEnv {
    /// Like [`TestEnv::spawn_child`], with the child's log (RUST_LOG=warn) written to
    /// `log` instead of the test's stderr.
    pub fn spawn_child_logged(&self, midas_url: &str, log: &std::path::Path) -> ChildWorker {
        self.spawn_child_logged_at(midas_url, log, "warn")
    }

    /// [`TestEnv::spawn_child_logged`] with the child's `RUST_LOG` given.
    pub fn spawn_child_logged_at(
        &self,
        midas_url: &str,
        log: &std::path::Path,
        rust_log: &str,
    ) -> ChildWorker {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("child log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_midas-worker"));
        cmd.arg("run")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .envs(&self.env)
            .env("MIDAS_WORKER__MIDAS__BASE_URL", midas_url)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(file);
        ChildWorker(cmd.spawn().expect("spawn worker"))
    }
}

/// A worker binary run as a child process, killed (and reaped) if it is still
/// running when dropped: a test that fails before it stops its workers leaves
/// none behind (a leftover worker keeps consuming its queue and holds the test
/// runner's stderr open). Derefs to the [`std::process::Child`].
pub struct ChildWorker(pub std::process::Child);

impl std::ops::Deref for ChildWorker {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildWorker {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A TCP port free at the time of the call (for a child worker's `http.listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// SIGTERM `child` and wait up to `grace` for it to exit; SIGKILL it after that.
/// Returns whether it exited on its own (and with status 0).
pub fn terminate(child: &mut std::process::Child, grace: Duration) -> bool {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            if !status.success() {
                eprintln!("terminate: pid {} ended with {status}", child.id());
            }
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "terminate: pid {} did not exit within {grace:?} of SIGTERM; killed",
        child.id()
    );
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
    false
}

/// SIGKILL a child process and reap it.
pub fn kill9(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
