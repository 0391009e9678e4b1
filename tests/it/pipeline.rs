//! The durable pipeline against real components: RabbitMQ at 127.0.0.1:5672, a
//! SQLite outbox file, and the Midas simulator over HTTP. Each test uses its own
//! queues, so they run in parallel. Every test holds replies against the ledger.

use std::time::Duration;

use crate::common::*;
use midas_worker::command::Status;
use midas_worker::sim::Faults;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_present_cancel_balance_end_to_end() {
    let env = TestEnv::new("e2e");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let b = unique("B");
    c.publish(pay(&format!("{b}-1"), "alice", 100).as_bytes(), "p1")
        .await
        .unwrap();
    c.publish(present(&format!("{b}-2"), "alice", 7).as_bytes(), "g1")
        .await
        .unwrap();
    c.publish(
        format!(r#"{{"op":"cancel_pay","bill_no":"{b}-1","openid":"alice"}}"#).as_bytes(),
        "x1",
    )
    .await
    .unwrap();
    let p = c.reply_for("p1", T).await.unwrap().reply;
    assert_eq!(p.status, Some(Status::Succeeded));
    assert_eq!(p.duplicate, Some(false));
    assert_eq!(p.balance, Some(1_000_000 - 100));
    assert_eq!(p.attempts, 1);
    assert_eq!(p.bill_no.as_deref(), Some(format!("{b}-1").as_str()));
    let g = c.reply_for("g1", T).await.unwrap().reply;
    assert_eq!(g.status, Some(Status::Succeeded));
    assert_eq!(g.balance, Some(1_000_000 - 100 + 7));
    let x = c.reply_for("x1", T).await.unwrap().reply;
    assert_eq!(x.status, Some(Status::Succeeded), "{x:?}");
    c.publish(br#"{"op":"balance","openid":"alice"}"#, "bal")
        .await
        .unwrap();
    let bal = c.reply_for("bal", T).await.unwrap().reply;
    assert_eq!(bal.status, Some(Status::Succeeded));
    assert_eq!(bal.balance, Some(1_000_000 + 7), "cancel refunded the pay");
    let ledger = sim.ledger();
    assert_eq!(orders_for(&ledger, &format!("{b}-1")).len(), 1);
    assert!(orders_for(&ledger, &format!("{b}-1"))[0].cancelled);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_command_gets_the_same_reply_and_conflict_is_rejected() {
    let env = TestEnv::new("resend");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("R");
    c.publish(pay(&bill, "bob", 10).as_bytes(), "first")
        .await
        .unwrap();
    let first = c.reply_for("first", T).await.unwrap();
    // same parameters again, final already: the stored reply, byte for byte
    c.publish(pay(&bill, "bob", 10).as_bytes(), "again")
        .await
        .unwrap();
    let again = c.reply_for("again", T).await.unwrap();
    assert_eq!(first.raw, again.raw, "a repeated reply is identical");
    // same bill_no, other amount: rejected, original untouched, dead-lettered unchanged
    let conflicting = pay(&bill, "bob", 11);
    c.publish(conflicting.as_bytes(), "conflict").await.unwrap();
    let r = c.reply_for("conflict", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Rejected));
    assert_eq!(r.error.as_deref(), Some("bill_no_conflict"));
    let ledger = sim.ledger();
    let orders = orders_for(&ledger, &bill);
    assert_eq!(orders.len(), 1, "charged once");
    assert_eq!(orders[0].amount, 10, "the original job is untouched");
    // the copy is confirmed after the reply: wait for it (the test fails when
    // nothing comes, or when anything but the conflicting command does)
    let dead = env.dead_letters_until(1, T).await;
    assert_eq!(dead, vec![conflicting.into_bytes()]);
    assert_eq!(ledger.calls.get("pay").copied().unwrap_or(0), 1);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_are_rejected_dead_lettered_and_never_reach_midas() {
    let env = TestEnv::new("invalid");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bad: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"\xff\xfe\x00".to_vec(),
        br#"{"op":"refund","bill_no":"X1","openid":"o"}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X2","openid":"o"}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X 3","openid":"o","amt":1}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X4","openid":"o","amt":0}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X5","openid":"o","amt":2147483648}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X6","openid":"o","amt":1,"appid":"wxother"}"#.to_vec(),
        br#"{"op":"pay","bill_no":"X7","openid":"o","amt":1,"amount":1}"#.to_vec(),
        format!(
            r#"{{"op":"pay","bill_no":"X8","openid":"{}","amt":1}}"#,
            "o".repeat(100_000)
        )
        .into_bytes(),
        format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
    ];
    for (i, body) in bad.iter().enumerate() {
        c.publish(body, &format!("bad{i}")).await.unwrap();
    }
    // a valid command after them still works: the worker keeps going
    c.publish(pay(&unique("OK"), "o", 1).as_bytes(), "good")
        .await
        .unwrap();
    let good = c.reply_for("good", T).await.unwrap().reply;
    assert_eq!(good.status, Some(Status::Succeeded));
    for i in 0..bad.len() {
        let r = c.reply_for(&format!("bad{i}"), T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Rejected), "bad{i}");
        assert_eq!(r.attempts, 0);
        assert!(r.errmsg.is_some());
    }
    // One reply per command. Intake settles deliveries in delivery order and hands
    // a new job to the dispatcher only once every earlier delivery is settled, i.e.
    // once each refusal before it was confirmed by the broker and its command acked.
    // So a valid command sent after all of them (answered after a call to Midas)
    // is answered after every refusal, a second copy of one included; and a
    // second one sent after that answer is behind any bad command the broker
    // delivered again (requeued before the first marker was settled). Every reply
    // up to the second marker's is read: none but the two markers' may come.
    for marker in ["end", "end2"] {
        c.publish(pay(&unique("END"), "o", 1).as_bytes(), marker)
            .await
            .unwrap();
        // (replies that arrived while waiting for another are held by the client
        // and returned first)
        let r = c.next_reply(T).await.unwrap();
        assert_eq!(
            r.correlation_id, marker,
            "a second reply: {} {:?}",
            r.correlation_id, r.reply
        );
        assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
    }
    let mut dead = env.dead_letters_until(bad.len(), T).await;
    dead.sort();
    let mut want = bad.clone();
    want.sort();
    assert_eq!(dead, want, "dead-lettered unchanged");
    assert_eq!(
        sim.ledger().calls.get("pay").copied().unwrap_or(0),
        3,
        "only the three valid pays reached Midas"
    );
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_answers_retry_the_same_bill_no_until_success() {
    let env = TestEnv::new("transient");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("T");
    c.publish(pay(&bill, "carol", 5).as_bytes(), "t")
        .await
        .unwrap();
    assert!(
        eventually(T, || sim.ledger().calls.get("pay").copied().unwrap_or(0)
            >= 3)
        .await
    );
    sim.set_faults(Faults {
        http_502_rate: 1.0,
        ..Faults::default()
    });
    let before = sim.ledger().calls.get("pay").copied().unwrap_or(0);
    assert!(
        eventually(T, || sim.ledger().calls.get("pay").copied().unwrap_or(0)
            >= before + 2)
        .await
    );
    sim.set_faults(Faults::default());
    let r = c.reply_for("t", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded));
    assert!(r.attempts >= 5, "attempts {}", r.attempts);
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_then_stall_ends_succeeded_duplicate_and_charged_once() {
    let mut env = TestEnv::new("stall");
    env.set("MIDAS__REQUEST_TIMEOUT", "400ms");
    let sim = env
        .simulator(Faults {
            apply_then_stall_rate: 1.0,
            stall_ms: 1500,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("S");
    c.publish(pay(&bill, "dave", 9).as_bytes(), "s")
        .await
        .unwrap();
    assert!(eventually(T, || !orders_for(&sim.ledger(), &bill).is_empty()).await);
    sim.set_faults(Faults::default());
    let r = c.reply_for("s", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(r.duplicate, Some(true));
    assert_eq!(r.errcode, Some(90012));
    assert_eq!(
        r.balance,
        Some(1_000_000 - 9),
        "balance fetched with getbalance"
    );
    assert!(r.attempts >= 2);
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_give_up_after_with_unknown() {
    let mut env = TestEnv::new("giveup");
    env.set("RETRY__GIVE_UP_AFTER", "1500ms");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("U");
    c.publish(pay(&bill, "erin", 1).as_bytes(), "u")
        .await
        .unwrap();
    let r = c.reply_for("u", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Unknown));
    assert_eq!(r.error.as_deref(), Some("retries_exhausted"));
    assert_eq!(r.errcode, Some(-1));
    // final in the outbox, every call recorded as an attempt
    assert_eq!(
        job_field(&env.outbox_path(), &bill, "pay", "state").as_deref(),
        Some("unknown")
    );
    let calls = sim.ledger().calls.get("pay").copied().unwrap_or(0);
    assert_eq!(
        count_attempts(&env.outbox_path(), &bill),
        calls as i64,
        "every call is an attempt row"
    );
    // Midas answers now, and a marker for the same player follows. Only the head of
    // a player's queue may call, so the marker is called only once the given-up job
    // has left the queue for good: had it still been retried, that retry would have
    // gone out first, succeeded and charged it.
    sim.set_faults(Faults::default());
    let marker = unique("UM");
    c.publish(pay(&marker, "erin", 1).as_bytes(), "marker")
        .await
        .unwrap();
    let m = c.reply_for("marker", T).await.unwrap().reply;
    assert_eq!(m.status, Some(Status::Succeeded), "{m:?}");
    let ledger = sim.ledger();
    assert!(
        orders_for(&ledger, &bill).is_empty(),
        "the given-up bill_no was sent again and charged"
    );
    assert_eq!(
        ledger.calls.get("pay").copied().unwrap_or(0),
        calls + 1,
        "one call after the give-up: the marker's"
    );
    worker.stop().await;
    // and in the outbox, after the stop: still unknown, no attempt since the reply
    assert_eq!(
        job_field(&env.outbox_path(), &bill, "pay", "state").as_deref(),
        Some("unknown")
    );
    assert_eq!(count_attempts(&env.outbox_path(), &bill), calls as i64);
    assert_eq!(
        sim.ledger().calls.get("pay").copied().unwrap_or(0),
        calls + 1,
        "never sent again"
    );
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_per_openid_in_arrival_order() {
    let env = TestEnv::new("order");
    // some answers are -1 so jobs retry: later jobs of the same player must wait
    let sim = env
        .simulator(Faults {
            busy_rate: 0.3,
            latency_ms: 5,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let b = unique("O");
    let players = ["p1", "p2", "p3"];
    let mut sent = Vec::new();
    for i in 0..10 {
        for p in players {
            let bill = format!("{b}-{p}-{i}");
            c.publish(pay(&bill, p, 1).as_bytes(), &bill).await.unwrap();
            sent.push((p, bill.clone()));
            if i == 0 {
                // a cancel right behind the first pay must not overtake it
                let body = format!(r#"{{"op":"cancel_pay","bill_no":"{bill}","openid":"{p}"}}"#);
                c.publish(body.as_bytes(), &format!("cancel-{bill}"))
                    .await
                    .unwrap();
            }
        }
    }
    let got = replies(&mut c, 33, Duration::from_secs(60)).await;
    assert!(
        got.iter()
            .all(|r| r.reply.status == Some(Status::Succeeded)),
        "{:?}",
        got.iter().map(|r| &r.reply).collect::<Vec<_>>()
    );
    let ledger = sim.ledger();
    for p in players {
        let applied: Vec<&str> = ledger
            .orders
            .iter()
            .filter(|o| o.openid == p)
            .map(|o| o.bill_no.as_str())
            .collect();
        let want: Vec<&str> = sent
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, b)| b.as_str())
            .collect();
        assert_eq!(applied, want, "player {p} in arrival order");
        assert!(ledger
            .orders
            .iter()
            .find(|o| o.bill_no == want[0])
            .is_some_and(|o| o.cancelled));
    }
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revocation_is_survived() {
    let env = TestEnv::new("token");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let b = unique("K");
    c.publish(pay(&format!("{b}-0"), "tok", 1).as_bytes(), "k0")
        .await
        .unwrap();
    assert_eq!(
        c.reply_for("k0", T).await.unwrap().reply.status,
        Some(Status::Succeeded)
    );
    sim.revoke_tokens();
    c.publish(pay(&format!("{b}-1"), "tok", 1).as_bytes(), "k1")
        .await
        .unwrap();
    let r = c.reply_for("k1", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded));
    assert_eq!(r.attempts, 2, "one 40001, then a refreshed token");
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_key_is_erased_when_final_and_never_echoed() {
    let env = TestEnv::new("secret");
    let sim = env.simulator(Faults::default()).await;
    sim.register_session("sess-user", "SESSIONKEY-abc123");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("Z");
    let body = format!(
        r#"{{"op":"pay","bill_no":"{bill}","openid":"sess-user","amt":3,"session_key":"SESSIONKEY-abc123"}}"#
    );
    c.publish(body.as_bytes(), "z").await.unwrap();
    let r = c.reply_for("z", T).await.unwrap();
    assert_eq!(r.reply.status, Some(Status::Succeeded), "mp_sig accepted");
    assert!(!String::from_utf8_lossy(&r.raw).contains("SESSIONKEY"));
    // a wrong session key: 90009, failed, definitive
    let bill2 = unique("Z");
    let body = format!(
        r#"{{"op":"pay","bill_no":"{bill2}","openid":"sess-user","amt":3,"session_key":"WRONG"}}"#
    );
    c.publish(body.as_bytes(), "z2").await.unwrap();
    let r2 = c.reply_for("z2", T).await.unwrap().reply;
    assert_eq!(r2.status, Some(Status::Failed));
    assert_eq!(r2.errcode, Some(90009));
    worker.stop().await;
    let db = rusqlite::Connection::open(env.outbox_path()).unwrap();
    let keys: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM jobs WHERE session_key IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(keys, 0, "session_key erased from final jobs");
    let dump: String = db
        .query_row(
            "SELECT group_concat(request || coalesce(result,''), '') FROM jobs",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!dump.contains("SESSIONKEY") && !dump.contains("WRONG"));
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expired_reopens_with_a_new_session_key_and_charges_once() {
    let env = TestEnv::new("s90010");
    let sim = env.simulator(Faults::default()).await;
    sim.register_session("sess-old", "OLD-KEY");
    sim.register_session("sess-old", "NEW-KEY"); // OLD-KEY is now expired
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("E");
    let with_key = |k: &str| {
        format!(
            r#"{{"op":"pay","bill_no":"{bill}","openid":"sess-old","amt":4,"session_key":"{k}"}}"#
        )
    };
    c.publish(with_key("OLD-KEY").as_bytes(), "old")
        .await
        .unwrap();
    let r = c.reply_for("old", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Failed));
    assert_eq!(r.errcode, Some(90010));
    assert!(orders_for(&sim.ledger(), &bill).is_empty());
    // the game re-sends the same command with the player's new session_key
    c.publish(with_key("NEW-KEY").as_bytes(), "new")
        .await
        .unwrap();
    let r = c.reply_for("new", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(r.attempts, 2, "same job, same bill_no");
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_retry_of_an_unknown_job_is_picked_up_by_the_running_worker() {
    let mut env = TestEnv::new("opretry");
    // long enough for the worker to notice the operator's action (it looks every 2 s)
    env.set("RETRY__GIVE_UP_AFTER", "4s");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("P");
    c.publish(pay(&bill, "op-user", 6).as_bytes(), "p")
        .await
        .unwrap();
    let r = c.reply_for("p", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Unknown));
    // Midas is healthy again; an operator decides to re-send the same bill_no
    sim.set_faults(Faults::default());
    env.operator_retry(&bill);
    let r = c.reply_for("p", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    worker.stop().await;
    env.cleanup(&c).await;
}

/// Orders are keyed per app: two apps using the same bill_no for different orders
/// both succeed, each charged once, and a re-send of each joins its own job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_with_the_same_bill_no_are_two_orders() {
    let mut env = TestEnv::new("twoapps");
    env.set("APPS__1__APPID", "wx7654321");
    env.set("APPS__1__OFFER_ID", "87654321");
    env.set("APPS__1__APP_KEY_ENV", "MIDAS_APP_KEY_2");
    env.set("APPS__1__APP_SECRET_ENV", "WECHAT_APP_SECRET_2");
    env.env
        .insert("MIDAS_APP_KEY_2".into(), "second-app-key-0123456789".into());
    env.env.insert(
        "WECHAT_APP_SECRET_2".into(),
        "second-app-secret-0123456789".into(),
    );
    let mut cfg = env.settings().config.simulator;
    cfg.initial_balance = 1_000_000;
    let sim = midas_worker::sim::Simulator::new(
        cfg,
        midas_worker::sim::SimApp::from_settings(&env.settings()),
    )
    .start()
    .await
    .expect("simulator");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("SAME");
    let body = |appid: &str, amt: i64| {
        format!(r#"{{"op":"pay","bill_no":"{bill}","openid":"o1","amt":{amt},"appid":"{appid}"}}"#)
    };
    c.publish(body("wx1234567", 10).as_bytes(), "a")
        .await
        .unwrap();
    c.publish(body("wx7654321", 20).as_bytes(), "b")
        .await
        .unwrap();
    let a = c.reply_for("a", T).await.unwrap().reply;
    let b = c.reply_for("b", T).await.unwrap().reply;
    assert_eq!(a.status, Some(Status::Succeeded), "{a:?}");
    assert_eq!(b.status, Some(Status::Succeeded), "{b:?}");
    assert_eq!(a.appid.as_deref(), Some("wx1234567"));
    assert_eq!(b.appid.as_deref(), Some("wx7654321"));
    // a re-send of each joins its own job: same reply, no new charge
    c.publish(body("wx7654321", 20).as_bytes(), "b2")
        .await
        .unwrap();
    let b2 = c.reply_for("b2", T).await.unwrap();
    assert_eq!(b2.reply.appid.as_deref(), Some("wx7654321"));
    assert_eq!(b2.reply.balance, b.balance);
    let ledger = sim.ledger();
    let orders = orders_for(&ledger, &bill);
    assert_eq!(orders.len(), 2, "one order per app: {orders:?}");
    let mut by_app: Vec<(&str, i64)> = orders
        .iter()
        .map(|o| (o.appid.as_str(), o.amount))
        .collect();
    by_app.sort();
    assert_eq!(by_app, vec![("wx1234567", 10), ("wx7654321", 20)]);
    worker.stop().await;
    env.cleanup(&c).await;
}

/// The worker keeps its HTTP connections to Midas open and reuses them: 300 pays
/// with at most 8 calls at once open a handful of connections, not one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_midas_reuse_connections() {
    let mut env = TestEnv::new("reuse");
    env.set("MIDAS__MAX_IN_FLIGHT", "8");
    let sim = env
        .simulator(Faults {
            latency_ms: 2,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let b = unique("R");
    let sent: Vec<String> = (0..300).map(|i| format!("{b}-{i}")).collect();
    for (i, bill) in sent.iter().enumerate() {
        c.publish(pay(bill, &format!("r{i}"), 1).as_bytes(), bill)
            .await
            .unwrap();
    }
    let got = replies(&mut c, sent.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent.len());
    let ledger = sim.ledger();
    let calls: u64 = ledger.calls.values().sum();
    assert!(calls >= 300, "{:?}", ledger.calls);
    assert!(
        ledger.connections <= 8 + 4,
        "{} connections for {calls} requests",
        ledger.connections
    );
    worker.stop().await;
    env.cleanup(&c).await;
}
