//! Crashes and outages: SIGKILL of a worker child process mid-run, a cut broker
//! link, Midas down then back, SIGTERM. Each ends by holding every reply against
//! the simulator's ledger: nothing lost, nothing charged twice.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::*;
use midas_worker::command::Status;
use midas_worker::sim::Faults;

/// Hold the replies of the `sent` bills (all of kind `op`) against the ledger (see `check_ledger_ops`);
/// with `db`, a missing reply is reported with its outbox row for diagnosis.
fn check_with_db(
    sent: &[String],
    op: &str,
    replies: &[midas_worker::client::Received],
    ledger: &midas_worker::sim::LedgerDump,
    db: Option<&std::path::Path>,
) {
    let answered: HashSet<&str> = replies.iter().map(|r| r.correlation_id.as_str()).collect();
    if let (Some(p), Some(b)) = (db, sent.iter().find(|b| !answered.contains(b.as_str()))) {
        let c = rusqlite::Connection::open(p).expect("db");
        let job: String = c
            .query_row(
                "SELECT id || ' ' || state || ' attempts=' || attempts FROM jobs WHERE bill_no = ?1",
                [b],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| format!("no job: {e}"));
        let targets: String = c
            .query_row(
                "SELECT group_concat(reply_to || ' pub=' || coalesce(published_at, 'NULL'), '; ') \
                 FROM reply_targets t JOIN jobs j ON j.id = t.job_id WHERE j.bill_no = ?1",
                [b],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok()
            .flatten()
            .unwrap_or_default();
        panic!("no reply for {b}: job {job}; targets {targets}");
    }
    let ops: BTreeMap<String, (String, String)> = sent
        .iter()
        .map(|b| (b.clone(), (op.to_string(), b.clone())))
        .collect();
    check_ledger_ops(&ops, replies, ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing_and_charges_once() {
    let env = TestEnv::new("kill");
    let sim = env
        .simulator(Faults {
            latency_ms: 2,
            busy_rate: 0.05,
            ..Faults::default()
        })
        .await;
    let mut c = env.client().await;
    let b = unique("K");
    let sent: Vec<String> = (0..400).map(|i| format!("{b}-{i}")).collect();
    for (i, bill) in sent.iter().enumerate() {
        c.publish(pay(bill, &format!("u{}", i % 40), 1).as_bytes(), bill)
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for round in 0..3 {
        let mut child = env.spawn_child(&sim.base_url());
        // let it take some work, then kill it at an arbitrary instant
        let target = (round + 1) * 60;
        while got.len() < target {
            match c.next_reply(Duration::from_secs(30)).await {
                Ok(r) => got.push(r),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 40)).await;
        kill9(&mut child);
    }
    let mut child = env.spawn_child(&sim.base_url());
    let distinct = |g: &Vec<midas_worker::client::Received>| {
        g.iter()
            .map(|r| r.correlation_id.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while distinct(&got) < sent.len() && tokio::time::Instant::now() < deadline {
        if let Ok(r) = c.next_reply(Duration::from_secs(5)).await {
            got.push(r);
        }
    }
    // bounded: a worker that hangs on SIGTERM fails the test instead of stalling it
    assert!(
        terminate(&mut child, Duration::from_secs(60)),
        "SIGTERM exits 0 (within 60 s)"
    );
    check_with_db(&sent, "pay", &got, &sim.ledger(), Some(&env.outbox_path()));
    assert!(got
        .iter()
        .all(|r| r.reply.status == Some(Status::Succeeded)));
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_cut_during_intake_and_publishing() {
    let mut env = TestEnv::new("cut");
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env.set("BROKER__URL", &proxy.url_amqp());
    let sim = env
        .simulator(Faults {
            latency_ms: 3,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    // the game talks to the broker directly, not through the proxy
    let mut direct = env.clone_settings_direct();
    let mut c = direct.client().await;
    let b = unique("C");
    let sent: Vec<String> = (0..300).map(|i| format!("{b}-{i}")).collect();
    for (i, bill) in sent.iter().enumerate() {
        c.publish(pay(bill, &format!("v{}", i % 30), 1).as_bytes(), bill)
            .await
            .unwrap();
        if i == 100 || i == 200 {
            proxy.cut();
        }
    }
    let mut got = Vec::new();
    let cut_again_at = 150;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let distinct = |g: &Vec<midas_worker::client::Received>| {
        g.iter()
            .map(|r| r.correlation_id.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    let mut cut_done = false;
    while distinct(&got) < sent.len() && tokio::time::Instant::now() < deadline {
        if let Ok(r) = c.next_reply(Duration::from_secs(3)).await {
            got.push(r);
        }
        if !cut_done && got.len() >= cut_again_at {
            proxy.down();
            tokio::time::sleep(Duration::from_secs(2)).await;
            proxy.up();
            cut_done = true;
        }
    }
    check_with_db(&sent, "pay", &got, &sim.ledger(), Some(&env.outbox_path()));
    worker.stop().await;
    direct.env.clear();
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midas_down_then_back_drains_the_backlog() {
    let env = TestEnv::new("midasdown");
    let sim = env.simulator(Faults::default()).await;
    let link = Proxy::start(sim.addr).await;
    link.down();
    let worker = env.worker(&link.url_http()).await;
    let mut c = env.client().await;
    let b = unique("D");
    let sent: Vec<String> = (0..100).map(|i| format!("{b}-{i}")).collect();
    for (i, bill) in sent.iter().enumerate() {
        c.publish(present(bill, &format!("w{}", i % 10), 2).as_bytes(), bill)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        sim.ledger().orders.is_empty(),
        "nothing applied while Midas is down"
    );
    assert!(
        c.next_reply(Duration::from_millis(200)).await.is_err(),
        "no reply while Midas is down"
    );
    link.up();
    let got = replies(&mut c, sent.len(), Duration::from_secs(60)).await;
    check_with_db(
        &sent,
        "present",
        &got,
        &sim.ledger(),
        Some(&env.outbox_path()),
    );
    assert!(got
        .iter()
        .all(|r| r.reply.status == Some(Status::Succeeded)));
    worker.stop().await;
    env.cleanup(&c).await;
}

/// A `balance` (no outbox row) is acked only once its reply is confirmed: a worker
/// killed while Midas answers busy leaves the commands unacked, and the restarted
/// worker answers every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_waiting_on_midas_survives_sigkill() {
    let env = TestEnv::new("balkill");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let mut c = env.client().await;
    let mut child = env.spawn_child(&sim.base_url());
    let n = 10;
    for i in 0..n {
        c.publish(
            format!(r#"{{"op":"balance","openid":"bk{i}"}}"#).as_bytes(),
            &format!("bk{i}"),
        )
        .await
        .unwrap();
    }
    // every balance was taken in and called (busy: it is being retried)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sim.ledger().calls.get("getbalance").copied().unwrap_or(0) < n
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let called = sim.ledger().calls.get("getbalance").copied().unwrap_or(0);
    assert!(
        called >= n,
        "only {called} of {n} balances reached Midas before the kill"
    );
    kill9(&mut child);
    sim.set_faults(Faults::default());
    let mut child = env.spawn_child(&sim.base_url());
    for i in 0..n {
        let r = c
            .reply_for(&format!("bk{i}"), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("bk{i} never answered: {e}"))
            .reply;
        assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    env.cleanup(&c).await;
}
