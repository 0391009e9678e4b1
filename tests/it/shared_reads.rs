//! `balance` on a shared PostgreSQL outbox: answered by the worker that holds the
//! player's lease, in order with that player's jobs, whichever worker received it
//! (CONTRACT guarantees 1 and 6). Real workers, the real RabbitMQ and PostgreSQL,
//! the simulator over HTTP as Midas; the simulator counts calls for one player
//! that overlapped (must be none).

use std::time::Duration;

use crate::common::pg::TestDb;
use crate::common::*;
use midas_worker::client::Received;
use midas_worker::command::Status;
use midas_worker::sim::Faults;

fn balance(openid: &str) -> String {
    format!(r#"{{"op":"balance","openid":"{openid}"}}"#)
}

/// Wait until `sql` counts at least `n` (bounded: the caller's assertions tell
/// what was missing).
async fn until_count(db: &TestDb, sql: &str, n: i64, limit: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let got = db.count(sql).await;
        if got >= n || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the replies of `n` balance rows are confirmed (the receiving
/// worker acks on that, or within its stop's grace).
async fn until_balance_replies_confirmed(db: &TestDb, n: i64) {
    until_count(
        db,
        "SELECT count(*) FROM jobs j WHERE j.op = 'balance' AND NOT EXISTS \
         (SELECT 1 FROM reply_targets t WHERE t.job_id = j.id AND t.published_at IS NULL)",
        n,
        Duration::from_secs(20),
    )
    .await;
}

fn balance_of(r: &Received) -> Option<i64> {
    r.reply.balance
}

/// Worker A holds the player: its pay is held up (Midas answers busy). A balance
/// for that player lands on worker B (its own command queue) and another on A;
/// then a second pay. Both balances are answered after the first pay's outcome
/// and before the second pay applies (they show the balance after the first
/// pay), by the lease holder, and the simulator never saw two calls for the
/// player at once. On a worker that answered balances from memory, B's
/// getbalance would overlap A's pay calls and no balance row would exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_received_by_another_worker_is_answered_by_the_lease_holder_after_the_pay() {
    let db = TestDb::new("reads").await;
    let mut env_a = TestEnv::new("rda");
    env_a.share_outbox(&db);
    let mut env_b = TestEnv::new("rdb"); // its own command and reply queues
    env_b.share_outbox(&db);
    // every call takes a while (so calls that overlap are seen), and the pay is
    // held up by busy answers until the test lets it through
    let sim = env_a
        .simulator(Faults {
            latency_ms: 150,
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let wa = env_a.worker(&sim.base_url()).await;
    let mut ca = env_a.client().await;
    let mut cb = env_b.client().await;
    let player = unique("rp");
    let (pay1, pay2) = (unique("RP1"), unique("RP2"));
    ca.publish(pay(&pay1, &player, 100).as_bytes(), &pay1)
        .await
        .unwrap();
    // A holds the player and its pay is being retried
    assert!(
        eventually(Duration::from_secs(20), || {
            sim.ledger().calls.get("pay").copied().unwrap_or(0) >= 2
        })
        .await,
        "the pay reached Midas"
    );
    let wb = env_b.worker(&sim.base_url()).await;
    cb.publish(balance(&player).as_bytes(), "bal-b")
        .await
        .unwrap();
    ca.publish(balance(&player).as_bytes(), "bal-a")
        .await
        .unwrap();
    // both balances are recorded (as rows of their own) before the second pay
    let rows = until_count(
        &db,
        "SELECT count(*) FROM jobs WHERE op = 'balance'",
        2,
        Duration::from_secs(10),
    )
    .await;
    ca.publish(pay(&pay2, &player, 10).as_bytes(), &pay2)
        .await
        .unwrap();
    until_count(
        &db,
        &format!("SELECT count(*) FROM jobs WHERE bill_no = '{pay2}'"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        sim.ledger().calls.get("getbalance").copied().unwrap_or(0),
        0,
        "no getbalance while the player's pay is still retrying"
    );
    assert_eq!(
        rows, 2,
        "each balance is recorded as a row on a shared outbox"
    );
    // let the pay through
    sim.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let r1 = ca.reply_for(&pay1, Duration::from_secs(30)).await.unwrap();
    let rb = cb
        .reply_for("bal-b", Duration::from_secs(30))
        .await
        .unwrap();
    let ra = ca
        .reply_for("bal-a", Duration::from_secs(30))
        .await
        .unwrap();
    let r2 = ca.reply_for(&pay2, Duration::from_secs(30)).await.unwrap();
    for r in [&r1, &rb, &ra, &r2] {
        assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
    }
    let after_pay1 = balance_of(&r1).expect("the pay's reply has the balance");
    let after_pay2 = balance_of(&r2).expect("the pay's reply has the balance");
    assert_eq!(after_pay2, after_pay1 - 10);
    assert_eq!(
        balance_of(&rb),
        Some(after_pay1),
        "the balance sent to B is answered after the first pay and before the second"
    );
    assert_eq!(balance_of(&ra), Some(after_pay1));
    assert_eq!(rb.reply.op.as_deref(), Some("balance"));
    assert_eq!(
        rb.reply.bill_no, None,
        "the row's key is not the client's business"
    );
    let ledger = sim.ledger();
    assert_eq!(
        ledger.overlapping_calls, 0,
        "two calls for one player at once"
    );
    // the lease holder answered both: one row each, final, one getbalance
    // attempt each, the reply confirmed
    assert_eq!(
        db.count(
            "SELECT count(*) FROM jobs j WHERE op = 'balance' AND state = 'succeeded' \
             AND bill_no LIKE '~%' AND attempts = 1 \
             AND EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id AND a.api = 'getbalance') \
             AND NOT EXISTS (SELECT 1 FROM reply_targets t WHERE t.job_id = j.id AND t.published_at IS NULL)"
        )
        .await,
        2
    );
    assert!(
        db.count("SELECT count(DISTINCT claimed_by) FROM jobs WHERE claimed_by IS NOT NULL")
            .await
            <= 1,
        "every job of the player ran on the worker holding it"
    );
    // B acks its delivery once the reply is confirmed: nothing comes back to
    // its queue when it stops
    until_balance_replies_confirmed(&db, 2).await;
    wb.stop().await;
    wa.stop().await;
    let b = env_b.settings().config.broker;
    assert_eq!(
        queue_depth(&b.command_queue).await,
        0,
        "B acked the balance"
    );
    // durable, not a quiet window: each delivery has one reply target, on one row
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.op = 'balance'"
        )
        .await,
        db.count("SELECT count(*) FROM jobs WHERE op = 'balance'")
            .await,
        "one reply per delivery"
    );
    env_a.cleanup(&ca).await;
    env_b.cleanup(&cb).await;
}

/// The worker holding the player is SIGKILLed while a balance received by
/// another worker waits behind the player's pay. The survivor takes the player
/// when the lease runs out, runs the pay, then the balance, and answers it
/// exactly once (one delivery, one reply), showing the balance after the pay;
/// no two calls for the player ever overlapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_waiting_on_a_killed_lease_holder_is_answered_once_by_the_next_holder() {
    let db = TestDb::new("readkill").await;
    let mut env_a = TestEnv::new("rka");
    env_a.share_outbox(&db);
    let mut env_b = TestEnv::new("rkb");
    env_b.share_outbox(&db);
    let sim = env_a
        .simulator(Faults {
            latency_ms: 150,
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let mut ca = env_a.client().await;
    let mut cb = env_b.client().await;
    let mut holder = env_a.spawn_child(&sim.base_url());
    let player = unique("kp");
    let pay1 = unique("KP1");
    ca.publish(pay(&pay1, &player, 100).as_bytes(), &pay1)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            sim.ledger().calls.get("pay").copied().unwrap_or(0) >= 2
        })
        .await,
        "the holder's pay reached Midas"
    );
    let wb = env_b.worker(&sim.base_url()).await;
    cb.publish(balance(&player).as_bytes(), "bal-k")
        .await
        .unwrap();
    let rows = until_count(
        &db,
        "SELECT count(*) FROM jobs WHERE op = 'balance'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(rows, 1, "the balance is recorded, for the holder to run");
    kill9(&mut holder);
    sim.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    // the survivor takes the player once the lease runs out (7 s)
    let r1 = ca.reply_for(&pay1, Duration::from_secs(40)).await.unwrap();
    let rb = cb
        .reply_for("bal-k", Duration::from_secs(40))
        .await
        .unwrap();
    assert_eq!(r1.reply.status, Some(Status::Succeeded), "{:?}", r1.reply);
    assert_eq!(rb.reply.status, Some(Status::Succeeded), "{:?}", rb.reply);
    assert_eq!(
        balance_of(&rb),
        balance_of(&r1),
        "answered after the pay, with the balance it left"
    );
    assert_eq!(
        sim.ledger().overlapping_calls,
        0,
        "two calls for one player at once"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE op = 'balance'")
            .await,
        1,
        "the delivery was never requeued: one row, one answer"
    );
    until_balance_replies_confirmed(&db, 1).await;
    wb.stop().await;
    let b = env_b.settings().config.broker;
    assert_eq!(
        queue_depth(&b.command_queue).await,
        0,
        "B acked the balance"
    );
    // durable, not a quiet window: each delivery has one reply target, on one row
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.op = 'balance'"
        )
        .await,
        db.count("SELECT count(*) FROM jobs WHERE op = 'balance'")
            .await,
        "one reply for the one delivery"
    );
    env_a.cleanup(&ca).await;
    env_b.cleanup(&cb).await;
}

/// The worker that received a balance recorded its row and was SIGKILLed before
/// the reply: the broker gives the message to another worker, flagged
/// redelivered. That worker answers it from the row already recorded (one row,
/// one answer), not from a second row of its own — two rows would both be
/// answered, with two different balances, to the one command (found by the
/// black-box run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_balance_is_answered_from_the_row_its_first_delivery_recorded() {
    let db = TestDb::new("readredeliver").await;
    let mut env = TestEnv::new("rrd");
    env.share_outbox(&db);
    let sim = env
        .simulator(Faults {
            latency_ms: 20,
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let mut c = env.client().await;
    let mut first = env.spawn_child(&sim.base_url());
    // the child applies the schema as it starts
    until_count(
        &db,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'player_leases'",
        1,
        Duration::from_secs(30),
    )
    .await;
    let player = unique("rp");
    c.publish(balance(&player).as_bytes(), "bal-r")
        .await
        .unwrap();
    let rows = until_count(
        &db,
        "SELECT count(*) FROM jobs WHERE op = 'balance' AND attempts >= 1",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        rows, 1,
        "the first worker recorded the balance and is calling"
    );
    kill9(&mut first);
    sim.set_faults(Faults {
        latency_ms: 20,
        ..Faults::default()
    });
    // the redelivery goes to the next worker; the player's lease runs out (7 s)
    let w = env.worker(&sim.base_url()).await;
    let r = c.reply_for("bal-r", Duration::from_secs(40)).await.unwrap();
    assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
    until_balance_replies_confirmed(&db, 1).await;
    w.stop().await;
    let b = env.settings().config.broker;
    assert_eq!(
        queue_depth(&b.command_queue).await,
        0,
        "the redelivery was acked"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE op = 'balance'")
            .await,
        1,
        "the redelivery joined the row of the first delivery"
    );
    // durable, not a quiet window: each delivery has one reply target, on one row
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
             WHERE j.op = 'balance'"
        )
        .await,
        db.count("SELECT count(*) FROM jobs WHERE op = 'balance'")
            .await,
        "one reply for the one command"
    );
    env.cleanup(&c).await;
}

/// A balance row is audited like any job: `outbox list --op balance`, `show`
/// and `stats` see it; one that ended `unknown` (Midas busy past
/// `retry.balance_give_up_after`) is re-opened by `outbox retry` and answered
/// again, to the same reply target, and `outbox republish` re-sends that reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_row_is_listed_shown_retried_and_republished_by_the_outbox_verbs() {
    use super::audit_cli::ok;
    let db = TestDb::new("readaudit").await;
    let mut env = TestEnv::new("rdv");
    env.share_outbox(&db);
    env.set("OUTBOX__URL", &format!("{}?sslmode=disable", db.url));
    env.set("RETRY__BALANCE_GIVE_UP_AFTER", "1s");
    let sim = env
        .simulator(Faults {
            busy_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let w = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let player = unique("ap");
    c.publish(balance(&player).as_bytes(), "bal-v")
        .await
        .unwrap();
    let r = c.reply_for("bal-v", Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.reply.status, Some(midas_worker::command::Status::Unknown));
    assert_eq!(r.reply.error.as_deref(), Some("retries_exhausted"));
    let key: String = db
        .client()
        .await
        .query_one("SELECT bill_no FROM jobs WHERE op = 'balance'", &[])
        .await
        .expect("the balance row")
        .get(0);
    let s = env.settings();
    let list = ok(&s, &["list", "--op", "balance"]);
    assert!(list.contains(&key) && list.contains("unknown"), "{list}");
    let show = ok(&s, &["show", &key]);
    assert!(show.contains("getbalance"), "{show}");
    let stats = ok(&s, &["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stats).expect("stats json");
    assert_eq!(v["by_op"]["balance"], 1, "{stats}");
    // Midas answers again: the operator re-opens it, the lease holder asks again
    sim.set_faults(Faults::default());
    env.operator_retry(&key);
    let again = c.reply_for("bal-v", Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        again.reply.status,
        Some(Status::Succeeded),
        "{:?}",
        again.reply
    );
    assert!(again.reply.balance.is_some());
    ok(
        &s,
        &[
            "republish",
            &key,
            "--actor",
            "ops",
            "--reason",
            "lost reply",
        ],
    );
    let copy = c.reply_for("bal-v", Duration::from_secs(30)).await.unwrap();
    assert_eq!(copy.raw, again.raw, "the same reply, byte for byte");
    w.stop().await;
    env.cleanup(&c).await;
}
