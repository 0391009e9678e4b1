//! Shared test harness: real RabbitMQ (unique queues per test), a real SQLite outbox
//! in a temp dir, the project's Midas simulator as a real HTTP server, the worker in
//! process or as a child process, and a fault proxy for TCP links.
#![allow(dead_code)]

pub mod proxy;

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
    pub fn spawn_child(&self, midas_url: &str) -> std::process::Child {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_midas-worker"));
        cmd.arg("run")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .envs(&self.env)
            .env("MIDAS_WORKER__MIDAS__BASE_URL", midas_url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        cmd.spawn().expect("spawn worker")
    }

    pub async fn cleanup(&self, client: &GameClient) {
        let b = self.settings().config.broker;
        client
            .delete_queues(&[&b.command_queue, &b.reply_queue, &b.dead_letter_queue])
            .await;
    }

    /// How many messages sit in the dead-letter queue.
    pub async fn dead_letters(&self) -> Vec<Vec<u8>> {
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
            out.push(m.delivery.data.clone());
            let _ = m.delivery.acker.ack(BasicAckOptions::default()).await;
        }
        let _ = conn.close(200, "bye".into()).await;
        out
    }
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
