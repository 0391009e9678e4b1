//! Pushes end to end: the project's simulator pushes paid items at real workers
//! (child processes) the way WeChat does — signed, repeated on failure on WeChat's
//! schedule (compressed), sometimes repeated after success, with mock pushes mixed
//! in — while a worker is SIGKILLed and restarted and its broker link is cut.
//! Every paid item must appear on the events queue under exactly one event_id, no
//! mock may appear, and no order the simulator saw answered success may be missing
//! (a success answer for a push that was not stored would show as a missing event:
//! WeChat stops pushing after a success). Once on a SQLite outbox with one worker,
//! once on a shared PostgreSQL outbox with two workers behind a "load balancer"
//! (the simulator picks one per try).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::proxy::Proxy;
use crate::common::push::*;
use crate::common::*;
use midas_worker::push::event::{event_id, Kind};
use midas_worker::secret::Secret;
use midas_worker::sim::push::{Purchase, PurchaseKind, PushSetup, Pusher};
use midas_worker::sim::{SimApp, SimHandle, Simulator};

async fn simulator(env: &TestEnv, urls: Vec<String>, safe: bool, seed: u64) -> SimHandle {
    let cfg = env.settings().config.simulator;
    Simulator::new(
        cfg,
        vec![SimApp {
            appid: APPID.into(),
            app_key: Secret::new(V2_KEY),
            sandbox_key: Secret::new(SANDBOX_KEY),
            app_secret: Secret::new("test-v2-secret"),
        }],
    )
    .with_pushes(PushSetup {
        urls,
        apps: vec![keys()],
        safe_mode: safe,
        time_factor: 100.0,
        repeat_after_success_rate: 0.2,
        mock_rate: 0.05,
        seed,
    })
    .start()
    .await
    .expect("simulator")
}

fn buy(p: &Arc<Pusher>, i: usize) -> String {
    p.purchase(Purchase {
        appid: APPID.into(),
        openid: format!("o-{}", i % 37),
        kind: PurchaseKind::Goods,
        out_trade_no: None,
        product_id: Some(format!("item_{}", i % 5)),
        quantity: Some(1),
        price: Some(600),
        env: None,
        attach: None,
    })
    .expect("purchase")
}

/// Wait until the simulator saw every order answered success; then read the
/// events queue until every order has its event; check and report.
async fn check(env: &TestEnv, p: &Arc<Pusher>, orders: &BTreeSet<String>, label: &str) {
    let done = eventually(Duration::from_secs(40), || {
        p.stats().delivered == orders.len()
    })
    .await;
    let stats = p.stats();
    assert!(done, "{label}: not every order delivered: {stats:?}");
    assert_eq!(stats.gave_up, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    loop {
        events.extend(drain_events(&event_queue(env), 0, Duration::ZERO).await);
        let ids: BTreeSet<&String> = events.iter().map(|(id, _)| id).collect();
        if ids.len() >= orders.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // the id → order map: one order per event_id, one event_id per order
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, m) in &events {
        let no = m["out_trade_no"].as_str().unwrap_or_default().to_string();
        assert_eq!(m["event_id"], id.as_str(), "message_id is the event_id");
        assert!(
            !no.starts_with("MOCK"),
            "{label}: a mock push was published: {m}"
        );
        let prev = by_id.insert(id.clone(), no.clone());
        assert!(prev.is_none() || prev.as_ref() == Some(&no));
        seen.entry(no).or_default().insert(id.clone());
    }
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    let missing: Vec<_> = orders.difference(&got).collect();
    let extra: Vec<_> = got.difference(orders).collect();
    assert!(
        missing.is_empty(),
        "{label}: paid items without an event: {missing:?}"
    );
    assert!(extra.is_empty(), "{label}: events for no order: {extra:?}");
    for (no, ids) in &seen {
        assert_eq!(ids.len(), 1, "{label}: {no} under several event_ids");
        let id = ids.iter().next().cloned().unwrap_or_default();
        assert_eq!(id, event_id(APPID, Kind::GoodsDelivered, no));
    }
    eprintln!(
        "{label}: {} orders, {} pushes sent ({} failed, {} answered success), {} mocks; \
         {} event messages for {} event_ids ({} duplicate copies)",
        stats.orders,
        stats.tries,
        stats.failures,
        stats.success_answers,
        stats.mocks_sent,
        events.len(),
        by_id.len(),
        events.len() - by_id.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_paid_item_is_one_event_while_the_worker_is_killed_and_the_broker_link_cut() {
    const N: usize = 500;
    let mut env = push_env("push-e2e");
    let port = free_port();
    env.set("PUSH__LISTEN", &format!("127.0.0.1:{port}"));
    env.set("HTTP__LISTEN", &format!("127.0.0.1:{}", free_port()));
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env.set("BROKER__URL", &proxy.url_amqp());
    let log = env.dir.path().join("worker.log");
    let sim = simulator(
        &env,
        vec![format!("http://127.0.0.1:{port}/wechat/push")],
        true,
        7,
    )
    .await;
    let p = sim.pusher().expect("pusher");
    let mut child = env.spawn_child_logged(&sim.base_url(), &log);
    let mut orders = BTreeSet::new();
    let start = Instant::now();
    for i in 0..N {
        orders.insert(buy(&p, i));
        // ~8 s of purchases: kills at 1/4 and 3/4, a broker cut in the middle
        tokio::time::sleep(Duration::from_millis(16)).await;
        if i == N / 4 || i == 3 * N / 4 {
            kill9(&mut child);
            tokio::time::sleep(Duration::from_millis(500)).await;
            child = env.spawn_child_logged(&sim.base_url(), &log);
        }
        if i == N / 2 {
            proxy.cut();
        }
    }
    check(&env, &p, &orders, "sqlite").await;
    eprintln!("sqlite: {:?} in all", start.elapsed());
    assert!(terminate(&mut child, Duration::from_secs(15)));
    delete_queues(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_a_shared_postgres_outbox_give_every_paid_item_one_event() {
    const N: usize = 200;
    let db = crate::common::pg::TestDb::new("push-e2e").await;
    let mut env = push_env("push-pg");
    env.share_outbox(&db);
    let ports = [free_port(), free_port()];
    let urls = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/wechat/push"))
        .collect();
    let sim = simulator(&env, urls, false, 11).await;
    let p = sim.pusher().expect("pusher");
    let spawn = |i: usize| {
        let mut e = TestEnv {
            tag: env.tag.clone(),
            dir: tempfile::tempdir().expect("dir"),
            env: env.env.clone(),
        };
        e.set("PUSH__LISTEN", &format!("127.0.0.1:{}", ports[i]));
        e.set("HTTP__LISTEN", &format!("127.0.0.1:{}", free_port()));
        e.spawn_child_logged(&sim.base_url(), &env.dir.path().join(format!("w{i}.log")))
    };
    let mut a = spawn(0);
    let mut b = spawn(1);
    let mut orders = BTreeSet::new();
    for i in 0..N {
        orders.insert(buy(&p, i));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i == N / 3 {
            kill9(&mut a);
        }
        if i == 2 * N / 3 {
            a = spawn(0);
        }
    }
    check(&env, &p, &orders, "postgres, two workers").await;
    assert!(terminate(&mut a, Duration::from_secs(15)));
    assert!(terminate(&mut b, Duration::from_secs(15)));
    delete_queues(&env).await;
}
