//! Hostile publishers against the real worker and broker: oversize bodies are refused
//! unread (the worker stays small and keeps paying), a poison message is
//! dead-lettered after the command queue's delivery limit, an older command queue
//! without that limit still declares, and `reply_to` cannot point the worker at a
//! queue outside `broker.reply_to_allow`.

use std::time::Duration;

use crate::common::*;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use midas_worker::broker::{connect, declare_topology, COMMAND_DELIVERY_LIMIT};
use midas_worker::client::GameClient;
use midas_worker::command::{Status, MAX_MESSAGE_CHARS};
use midas_worker::sim::Faults;

/// Peak resident set of process `pid` in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_are_rejected_unread_and_the_worker_stays_small_and_keeps_paying() {
    let env = TestEnv::new("big");
    let sim = env.simulator(Faults::default()).await;
    let mut c = env.client().await;
    let b = unique("BIG");
    let mut child = env.spawn_child(&sim.base_url());

    c.publish(pay(&format!("{b}-before"), "u1", 1).as_bytes(), "before")
        .await
        .expect("publish");
    // an 8 MB JSON array and a 16 MB JSON string: before the size check, parsing
    // them (and the salvage into a serde_json::Value) took hundreds of MB
    let mut array = Vec::with_capacity(8 << 20);
    array.push(b'[');
    while array.len() < (8 << 20) - 2 {
        array.extend_from_slice(b"1,");
    }
    array.extend_from_slice(b"1]");
    let mut string = Vec::with_capacity(16 << 20);
    string.push(b'"');
    string.resize((16 << 20) - 1, b'x');
    string.push(b'"');
    c.publish(&array, "big-array").await.expect("publish array");
    c.publish(&string, "big-string")
        .await
        .expect("publish string");
    c.publish(pay(&format!("{b}-after"), "u1", 1).as_bytes(), "after")
        .await
        .expect("publish");

    let got = replies(&mut c, 4, Duration::from_secs(60)).await;
    let by = |id: &str| {
        got.iter()
            .find(|r| r.correlation_id == id)
            .unwrap_or_else(|| panic!("no reply for {id}"))
    };
    for id in ["before", "after"] {
        assert_eq!(by(id).reply.status, Some(Status::Succeeded), "{id} pays");
    }
    for id in ["big-array", "big-string"] {
        let r = &by(id).reply;
        assert_eq!(r.status, Some(Status::Rejected), "{id}: {r:?}");
        assert_eq!(r.error.as_deref(), Some("invalid_command"));
        let msg = r.errmsg.as_deref().unwrap_or("");
        assert!(msg.contains("65536"), "{id} names the limit: {msg}");
        assert!(msg.chars().count() <= MAX_MESSAGE_CHARS);
        assert!(by(id).raw.len() < 2_000, "{id}: the reply is small");
    }
    let peak = peak_rss_mib(child.id());
    assert!(peak > 0, "VmHWM read");
    eprintln!("oversize: worker peak RSS (VmHWM) {peak} MiB");
    assert!(peak < 100, "worker peak RSS {peak} MiB");
    assert!(child.try_wait().expect("status").is_none(), "still running");

    let mut dead = env.dead_letters().await;
    for _ in 0..100 {
        if dead.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead.extend(env.dead_letters().await);
    }
    dead.sort_by_key(|d| d.len());
    assert!(
        dead == vec![array, string],
        "dead-lettered unchanged ({:?} bytes)",
        dead.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(sim.ledger().orders.len(), 2, "only the two ordinary pays");
    assert!(
        terminate(&mut child, Duration::from_secs(20)),
        "SIGTERM exits 0"
    );
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_the_delivery_limit() {
    let env = TestEnv::new("poison");
    let cfg = env.settings().config.broker;
    let conn = connect(BROKER, "test poison").await.expect("connect");
    declare_topology(&conn, &cfg).await.expect("declare");
    let c = env.client().await;
    c.publish(b"{\"op\":\"pay\"}", "poison")
        .await
        .expect("publish");
    // a worker that dies holding it returns it to the queue each time (a nack with
    // requeue counts the same way)
    let ch = conn.create_channel().await.expect("channel");
    let mut deliveries = 0;
    while let Some(m) = ch
        .basic_get(
            cfg.command_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("get")
    {
        deliveries += 1;
        assert!(deliveries <= 20, "never dead-lettered");
        m.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    assert_eq!(
        deliveries,
        COMMAND_DELIVERY_LIMIT + 1,
        "delivered limit+1 times"
    );
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead.extend(env.dead_letters().await);
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        dead,
        vec![b"{\"op\":\"pay\"}".to_vec()],
        "in the DLQ, unchanged"
    );
    let _ = conn.close(200, "bye".into()).await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queue_declared_without_the_limit_still_works() {
    let env = TestEnv::new("oldq");
    let cfg = env.settings().config.broker;
    let conn = connect(BROKER, "test old queue").await.expect("connect");
    // the topology of the previous version: no x-delivery-limit
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(cfg.dead_letter_queue.as_str().into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(cfg.command_queue.as_str().into(), durable, args)
        .await
        .expect("old declare");
    declare_topology(&conn, &cfg)
        .await
        .expect("an old queue is accepted (with a warning)");

    // the worker runs on it
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("OLD");
    c.publish(pay(&bill, "u", 1).as_bytes(), "old")
        .await
        .expect("publish");
    let r = replies(&mut c, 1, Duration::from_secs(30)).await;
    assert_eq!(r[0].reply.status, Some(Status::Succeeded));
    worker.stop().await;

    // any other difference is still an error (here: a classic queue)
    let other = TestEnv::new("classic");
    let ocfg = other.settings().config.broker;
    ch.queue_declare(
        ocfg.command_queue.as_str().into(),
        durable,
        FieldTable::default(),
    )
    .await
    .expect("classic declare");
    assert!(
        declare_topology(&conn, &ocfg).await.is_err(),
        "a classic queue is refused"
    );
    let ch = conn.create_channel().await.expect("channel");
    for q in [
        &ocfg.command_queue,
        &ocfg.reply_queue,
        &ocfg.dead_letter_queue,
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_outside_the_allow_list_is_rejected_to_the_reply_queue_and_never_executed() {
    let mut env = TestEnv::new("replyto");
    let game = format!("t-{}.game.", env.tag);
    env.set(
        "BROKER__REPLY_TO_ALLOW",
        &format!("t-{}.results, {game}*, amq.gen-*", env.tag),
    );
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let cfg = env.settings().config.broker;
    // a queue the attacker wants filled, one allowed by prefix, the configured one
    let victim = format!("t-{}.victim", env.tag);
    let allowed = format!("{game}eu-1");
    let conn = connect(BROKER, "test reply_to").await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    for q in [&victim, &allowed] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    }
    let mut own = env.client().await; // replies to amq.gen-*: allowed by the list
    let mut results = GameClient::connect(&cfg, false).await.expect("client");
    let b = unique("RT");
    let bad_pay = pay(&format!("{b}-1"), "u", 1);
    let bad_balance = r#"{"op":"balance","openid":"u"}"#.to_string();
    let bad_invalid = r#"{"op":"pay","bill_no":"RT-x"}"#.to_string();
    for (body, id) in [
        (&bad_pay, "p"),
        (&bad_balance, "bal"),
        (&bad_invalid, "inv"),
    ] {
        own.publish_to(body.as_bytes(), id, Some(&victim))
            .await
            .expect("publish");
    }
    own.publish_to(
        pay(&format!("{b}-2"), "u", 1).as_bytes(),
        "ok-prefix",
        Some(&allowed),
    )
    .await
    .expect("publish");
    own.publish(pay(&format!("{b}-3"), "u", 1).as_bytes(), "ok-own")
        .await
        .expect("publish");

    let refused = replies(&mut results, 3, Duration::from_secs(30)).await;
    for r in &refused {
        assert_eq!(r.reply.status, Some(Status::Rejected), "{:?}", r.reply);
    }
    let find = |id: &str| {
        refused
            .iter()
            .find(|r| r.correlation_id == id)
            .unwrap_or_else(|| panic!("no reply for {id} on the configured queue"))
    };
    for id in ["p", "bal"] {
        assert_eq!(
            find(id).reply.error.as_deref(),
            Some("reply_to_not_allowed")
        );
    }
    assert_eq!(
        find("p").reply.bill_no.as_deref(),
        Some(format!("{b}-1").as_str())
    );
    assert_eq!(find("inv").reply.error.as_deref(), Some("invalid_command"));
    let mine = replies(&mut own, 1, Duration::from_secs(30)).await;
    assert_eq!(mine[0].correlation_id, "ok-own");
    assert_eq!(mine[0].reply.status, Some(Status::Succeeded));
    let mut prefixed = None;
    for _ in 0..100 {
        if let Some(m) = ch
            .basic_get(allowed.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            prefixed = Some(m.delivery.data.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefixed = prefixed.expect("the reply reached the allowed queue");
    assert!(String::from_utf8_lossy(&prefixed).contains("succeeded"));

    // every refused reply was published (above) before this count: nothing reached the victim
    assert_eq!(
        queue_depth(&victim).await,
        0,
        "nothing published to the named queue"
    );
    let mut dead = env.dead_letters().await;
    for _ in 0..50 {
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead.extend(env.dead_letters().await);
    }
    dead.sort();
    let mut want = vec![
        bad_pay.into_bytes(),
        bad_balance.into_bytes(),
        bad_invalid.into_bytes(),
    ];
    want.sort();
    assert_eq!(
        dead, want,
        "the refused commands are dead-lettered unchanged"
    );
    let ledger = sim.ledger();
    assert!(
        ledger.orders.iter().all(|o| o.bill_no != format!("{b}-1")),
        "not charged"
    );
    assert_eq!(ledger.calls.get("getbalance").copied().unwrap_or(0), 0);
    assert_eq!(ledger.orders.len(), 2, "the two allowed pays only");
    worker.stop().await;
    for q in [&victim, &allowed] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    env.cleanup(&own).await;
}

/// A stored reply target is checked against `broker.reply_to_allow` again when it
/// is published: after the list was tightened, `outbox republish` (through the
/// relay) sends the reply to the configured reply queue, not to the stored target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_reply_targets_are_checked_against_the_allow_list_when_republished() {
    let mut env = TestEnv::new("restored");
    env.set(
        "BROKER__REPLY_TO_ALLOW",
        &format!("t-{}.results, amq.gen-*", env.tag),
    );
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("RT");
    c.publish(pay(&bill, "rt", 3).as_bytes(), "first")
        .await
        .expect("publish");
    let first = c
        .reply_for("first", Duration::from_secs(30))
        .await
        .expect("reply");
    assert_eq!(first.reply.status, Some(Status::Succeeded));
    worker.stop().await;

    // the client's server-named queue is no longer allowed
    env.set("BROKER__REPLY_TO_ALLOW", &format!("t-{}.results", env.tag));
    let results = env.settings().config.broker.reply_queue;
    let before = queue_depth(&results).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut out = Vec::new();
    midas_worker::audit::run(
        &midas_worker::audit::OutboxCmd::Republish {
            bill_no: Some(bill.clone()),
            filters: Default::default(),
            confirm: Default::default(),
            who: midas_worker::audit::Operator {
                actor: Some("test".into()),
                reason: None,
            },
        },
        &env.settings(),
        &mut out,
    )
    .expect("republish");
    // the relay publishes the re-queued target and marks it on the broker's confirm
    let published = || {
        job_field(&env.outbox_path(), &bill, "pay", "id")
            .is_some_and(|id| unpublished_targets(&env.outbox_path(), &id) == 0)
    };
    assert!(
        eventually(Duration::from_secs(30), published).await,
        "the re-published reply was never confirmed"
    );
    assert_eq!(
        queue_depth(&results).await,
        before + 1,
        "the reply went to the configured reply queue"
    );
    // One publish per target: it did not also reach the stored (disallowed) queue.
    // A marker is put into that queue now: anything the worker sent there for this
    // target went out before the target was marked (the mark waits for the
    // broker's confirm), so it is in the queue ahead of the marker, and the next
    // message read must be the marker.
    let conn = connect(BROKER, "test marker").await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let confirm = ch
        .basic_publish(
            "".into(),
            c.reply_queue.as_str().into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &first.raw,
            lapin::BasicProperties::default().with_correlation_id("marker".into()),
        )
        .await
        .expect("publish marker")
        .await
        .expect("marker confirmed");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "marker not queued"
    );
    let next = c
        .next_reply(Duration::from_secs(30))
        .await
        .expect("the marker");
    assert_eq!(
        next.correlation_id, "marker",
        "published to a queue outside broker.reply_to_allow: {:?}",
        next.reply
    );
    let _ = conn.close(200, "bye".into()).await;
    worker.stop().await;
    env.cleanup(&c).await;
}
