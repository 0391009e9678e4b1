//! Promises of the contract no other test would notice breaking: a command without
//! `reply_to` is answered on the configured reply queue, persistent, with the
//! bill_no as its correlation_id; a re-opened job's new reply reaches every reply
//! target; a final job's session_key is erased on PostgreSQL too.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::BasicProperties;
use midas_worker::command::{Reply, Status};
use midas_worker::sim::Faults;

use crate::common::pg::TestDb;
use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// A command published with no `reply_to` and no `correlation_id`, as a minimal
/// game server would.
async fn publish_bare(env: &TestEnv, body: &str) {
    let b = env.settings().config.broker;
    let conn = midas_worker::broker::connect(BROKER, "test bare")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        b.command_queue.as_str().into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_command_is_answered_on_the_reply_queue_persistent_keyed_by_bill_no() {
    let env = TestEnv::new("bare");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let c = env.client().await; // declares the topology
    let bill = unique("BARE");
    publish_bare(&env, &pay(&bill, "bare-player", 4)).await;
    let results = env.settings().config.broker.reply_queue;
    let conn = midas_worker::broker::connect(BROKER, "test results")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut got = None;
    for _ in 0..300 {
        if let Ok(Some(m)) = ch
            .basic_get(results.as_str().into(), BasicGetOptions { no_ack: true })
            .await
        {
            got = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = got.expect("a reply on the configured reply queue");
    let props = &m.delivery.properties;
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.as_str()),
        Some(bill.as_str()),
        "correlation_id defaults to the bill_no"
    );
    assert_eq!(props.delivery_mode(), &Some(2), "replies are persistent");
    let reply: Reply = serde_json::from_slice(&m.delivery.data).expect("reply JSON");
    assert_eq!(reply.status, Some(Status::Succeeded), "{reply:?}");
    assert_eq!(reply.bill_no.as_deref(), Some(bill.as_str()));
    let _ = conn.close(200, "bye".into()).await;
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_jobs_new_reply_reaches_every_reply_target() {
    let mut env = TestEnv::new("everytarget");
    env.set("RETRY__GIVE_UP_AFTER", "1s");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    // two game servers send the same command: one job, two reply targets
    let mut a = env.client().await;
    let mut b = env.client().await;
    let bill = unique("EVERY");
    let body = pay(&bill, "every-player", 6);
    a.publish(body.as_bytes(), "from-a").await.expect("publish");
    b.publish(body.as_bytes(), "from-b").await.expect("publish");
    for (c, id) in [(&mut a, "from-a"), (&mut b, "from-b")] {
        let r = c.reply_for(id, T).await.expect("first reply").reply;
        assert_eq!(r.status, Some(Status::Unknown), "{id}: {r:?}");
    }
    // Midas is back; an operator re-opens the job
    sim.set_faults(Faults::default());
    env.operator_retry(&bill);
    for (c, id) in [(&mut a, "from-a"), (&mut b, "from-b")] {
        let r = c.reply_for(id, T).await.expect("the new reply").reply;
        assert_eq!(r.status, Some(Status::Succeeded), "{id}: {r:?}");
    }
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    worker.stop().await;
    env.cleanup(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_jobs_session_key_is_erased_on_postgres() {
    let db = TestDb::new("pgerase").await;
    let mut env = TestEnv::new("pgerase");
    env.share_outbox(&db);
    let sim = env.simulator(Faults::default()).await;
    sim.register_session("erase-player", "SK-erase-0001");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("ERASE");
    let body = format!(
        r#"{{"op":"pay","bill_no":"{bill}","openid":"erase-player","amt":2,"session_key":"SK-erase-0001"}}"#
    );
    c.publish(body.as_bytes(), "erase").await.expect("publish");
    let r = c.reply_for("erase", T).await.expect("reply").reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    let q = |what: &str| format!("SELECT count(*) FROM jobs WHERE bill_no = '{bill}'{what}");
    assert_eq!(db.count(&q("")).await, 1, "the job is in PostgreSQL");
    let mut erased = false;
    for _ in 0..100 {
        if db.count(&q(" AND session_key IS NOT NULL")).await == 0 {
            erased = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(erased, "the final job's session_key is erased");
    worker.stop().await;
    env.cleanup(&c).await;
}

/// Backoff grows (doubling from `retry.initial` up to `retry.max`) and jitters (the
/// same attempt waits a different time for a different draw, within base..2×base).
#[test]
fn backoff_grows_and_jitters() {
    use midas_worker::job::backoff_delay;
    let settings = TestEnv::new("backoff").settings();
    let mut retry = settings.config.retry.clone();
    retry.initial = midas_worker::config::Dur(Duration::from_millis(500));
    retry.max = midas_worker::config::Dur(Duration::from_secs(300));
    let at = |n: u32, j: f64| backoff_delay(&retry, n, j);
    // grows: each attempt's shortest wait doubles until the cap
    let floors: Vec<Duration> = (1..=12).map(|n| at(n, 0.0)).collect();
    assert_eq!(floors[0], Duration::from_millis(500));
    for w in floors.windows(2) {
        assert!(
            w[1] == w[0] * 2 || w[1] == retry.max.0,
            "not doubling: {floors:?}"
        );
    }
    assert_eq!(at(40, 0.0), retry.max.0, "capped at retry.max");
    assert_eq!(at(40, 0.99), retry.max.0, "jitter never passes retry.max");
    // jitters: different draws, different waits, inside base..2×base
    for n in 1..=6 {
        let base = at(n, 0.0);
        let waits: std::collections::BTreeSet<Duration> =
            [0.1, 0.4, 0.7, 0.95].iter().map(|&j| at(n, j)).collect();
        assert_eq!(waits.len(), 4, "attempt {n}: {waits:?}");
        assert!(
            waits.iter().all(|w| *w > base && *w < base * 2),
            "attempt {n}: {waits:?} outside {base:?}..{:?}",
            base * 2
        );
    }
}
