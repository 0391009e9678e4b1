//! The engine's defects, each reproduced end to end through the real worker, a real
//! RabbitMQ and the Midas simulator over HTTP (the simulation in `simulation.rs`
//! covers the same ground through millions of interleavings; these show what a
//! player or an operator would see).

use std::collections::HashMap;
use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::*;
use midas_worker::command::Status;
use midas_worker::sim::Faults;

const T: Duration = Duration::from_secs(60);

fn pay_with_key(bill: &str, openid: &str, amt: i64, key: &str) -> String {
    format!(
        r#"{{"op":"pay","bill_no":"{bill}","openid":"{openid}","amt":{amt},"session_key":"{key}"}}"#
    )
}

fn attempts_of(db: &std::path::Path, bill: &str) -> i64 {
    job_field(db, bill, "pay", "attempts")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Defect 1: a job re-opened while a later job of the same player is retrying goes
/// to the front of that player's queue; both must still get their replies, in
/// order, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reopened_behind_a_retrying_one_does_not_stall_the_player() {
    let env = TestEnv::new("stall");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let (a, b) = (unique("A"), unique("B"));
    // the player's current session is k2: a command signed with k1 fails with 90010
    sim.register_session("pat", "k1");
    sim.register_session("pat", "k2");
    c.publish(pay_with_key(&a, "pat", 5, "k1").as_bytes(), "a1")
        .await
        .unwrap();
    let r = c.reply_for("a1", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Failed));
    assert_eq!(r.errcode, Some(90010));
    // a later pay of the same player keeps getting "busy", slowly: it is in the
    // middle of a call most of the time, so the re-open below lands while the
    // player is busy (the case that used to leave the player stuck)
    sim.set_faults(Faults {
        busy_rate: 1.0,
        latency_ms: 800,
        ..Faults::default()
    });
    c.publish(pay_with_key(&b, "pat", 7, "k2").as_bytes(), "b1")
        .await
        .unwrap();
    let db = env.outbox_path();
    assert!(eventually(T, || attempts_of(&db, &b) >= 2).await);
    // the first pay is re-sent with the new session_key: re-opened ahead of the second
    c.publish(pay_with_key(&a, "pat", 5, "k2").as_bytes(), "a2")
        .await
        .unwrap();
    assert!(
        eventually(T, || job_field(&db, &a, "pay", "state").as_deref()
            == Some("pending"))
        .await
    );
    sim.set_faults(Faults::default());
    let ra = c.reply_for("a2", T).await.unwrap().reply;
    let rb = c.reply_for("b1", T).await.unwrap().reply;
    assert_eq!(ra.status, Some(Status::Succeeded), "{ra:?}");
    assert_eq!(rb.status, Some(Status::Succeeded), "{rb:?}");
    let ledger = sim.ledger();
    assert_eq!(orders_for(&ledger, &a).len(), 1);
    assert_eq!(orders_for(&ledger, &b).len(), 1);
    worker.stop().await;
    env.cleanup(&c).await;
}

/// Defect 2: the first call applies but its answer is lost; the session expires
/// before the retry, which gets 90010. The reply must not say `failed` (the player
/// was charged): `unknown` / `outcome_uncertain`. Re-sending the command with the
/// new session_key finishes it: 90012 → `succeeded`, `duplicate: true`, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expired_after_a_lost_answer_is_never_failed() {
    let mut env = TestEnv::new("uncertain");
    env.set("MIDAS__REQUEST_TIMEOUT", "500ms");
    let sim = env
        .simulator(Faults {
            apply_then_stall_rate: 1.0,
            stall_ms: 3_000,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("U");
    sim.register_session("una", "k1");
    c.publish(pay_with_key(&bill, "una", 9, "k1").as_bytes(), "u1")
        .await
        .unwrap();
    // the pay went through, the answer did not come back
    assert!(eventually(T, || orders_for(&sim.ledger(), &bill).len() == 1).await);
    // the player logs in again: k1 is rotated out, and Midas answers again
    sim.register_session("una", "k2");
    sim.set_faults(Faults::default());
    let r = c.reply_for("u1", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Unknown), "{r:?}");
    assert_eq!(r.error.as_deref(), Some("outcome_uncertain"));
    assert_eq!(r.errcode, Some(90010));
    // the broker's confirm of that reply is recorded before the re-send (so the
    // re-open must owe it again, not merely find it still unconfirmed)
    let db = env.outbox_path();
    let filter = format!(
        "WHERE bill_no = '{bill}' AND EXISTS (SELECT 1 FROM reply_targets t \
         WHERE t.job_id = jobs.id AND t.correlation_id = 'u1' AND t.published_at IS NOT NULL)"
    );
    assert!(eventually(T, || count_jobs(&db, &filter) == 1).await);
    // re-sent with the new session_key: re-opened, same bill_no, finished
    c.publish(pay_with_key(&bill, "una", 9, "k2").as_bytes(), "u2")
        .await
        .unwrap();
    let r2 = c.reply_for("u2", T).await.unwrap().reply;
    assert_eq!(r2.status, Some(Status::Succeeded), "{r2:?}");
    assert_eq!(r2.duplicate, Some(true));
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    // the first command is owed the new final reply too (guarantee 4): it
    // supersedes the `unknown` it got (copies of that one may come first)
    let mut latest = None;
    for _ in 0..5 {
        let r = c
            .reply_for("u1", T)
            .await
            .expect("u1 gets the new reply")
            .reply;
        if r.status != Some(Status::Unknown) {
            latest = Some(r);
            break;
        }
    }
    let latest = latest.expect("u1 got the new final reply");
    assert_eq!(latest.status, Some(Status::Succeeded), "{latest:?}");
    assert_eq!(latest.finished_at, r2.finished_at, "the same final reply");
    worker.stop().await;
    env.cleanup(&c).await;
}

/// Defect 4: SIGKILL while a cancel_pay call is out (Midas applied it). After the
/// restart the retry answers 90015: the pay is rolled back, so the cancel
/// succeeded. The call left a durable trace before it went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_cut_off_by_sigkill_ends_succeeded_after_restart() {
    let mut env = TestEnv::new("cutoff");
    env.set("MIDAS__REQUEST_TIMEOUT", "30s");
    let sim = env.simulator(Faults::default()).await;
    let mut c = env.client().await;
    let bill = unique("C");
    let mut child = env.spawn_child(&sim.base_url());
    c.publish(pay(&bill, "cid", 3).as_bytes(), "p")
        .await
        .unwrap();
    assert_eq!(
        c.reply_for("p", T).await.unwrap().reply.status,
        Some(Status::Succeeded)
    );
    // the cancel applies, then its answer stalls; kill the worker mid-call
    sim.set_faults(Faults {
        apply_then_stall_rate: 1.0,
        stall_ms: 60_000,
        ..Faults::default()
    });
    c.publish(cancel_pay(&bill, "cid").as_bytes(), "x")
        .await
        .unwrap();
    assert!(
        eventually(T, || orders_for(&sim.ledger(), &bill)
            .first()
            .is_some_and(|o| o.cancelled))
        .await
    );
    kill9(&mut child);
    let db = env.outbox_path();
    assert_eq!(
        job_field(&db, &bill, "cancel_pay", "calls").as_deref(),
        Some("1"),
        "the call was counted before it went out"
    );
    assert!(
        job_field(&db, &bill, "cancel_pay", "first_attempt_at").is_some(),
        "the bill_no window started before the call"
    );
    sim.set_faults(Faults::default());
    let mut child = env.spawn_child(&sim.base_url());
    let x = c.reply_for("x", T).await.unwrap().reply;
    assert_eq!(x.status, Some(Status::Succeeded), "{x:?}");
    assert_eq!(x.errcode, Some(90015));
    assert!(orders_for(&sim.ledger(), &bill)[0].cancelled);
    assert!(terminate(&mut child, Duration::from_secs(20)));
    env.cleanup(&c).await;
}

/// Defect 5: `balance` takes its place in the player's order (it sees the pay sent
/// before it) and is retried through busy answers instead of giving up after 0.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_is_answered_in_the_players_order_and_retried() {
    let env = TestEnv::new("balance");
    let sim = env
        .simulator(Faults {
            busy_rate: 0.5,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    for i in 0..20 {
        let p = format!("bp{i}");
        c.publish(pay(&unique("BP"), &p, 10).as_bytes(), &format!("pay{i}"))
            .await
            .unwrap();
        c.publish(
            format!(r#"{{"op":"balance","openid":"{p}"}}"#).as_bytes(),
            &format!("bal{i}"),
        )
        .await
        .unwrap();
    }
    for i in 0..20 {
        let r = c.reply_for(&format!("bal{i}"), T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
        assert_eq!(r.balance, Some(1_000_000 - 10), "the pay before it is seen");
    }
    worker.stop().await;
    env.cleanup(&c).await;
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Defect 3: the broker is away for 60 s while 1,000 jobs finish. Memory stays
/// bounded and no reply is delivered more than 3 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_broker_outage_keeps_memory_and_reply_copies_bounded() {
    let mut env = TestEnv::new("outage");
    env.set("MIDAS__MAX_IN_FLIGHT", "64");
    env.set("MIDAS__REQUEST_TIMEOUT", "10s");
    env.set("HTTP__LISTEN", &format!("127.0.0.1:{}", free_port()));
    // ~1000 / 64 × 1.5 s ≈ 25 s of calls: they finish while the broker is away
    let sim = env
        .simulator(Faults {
            latency_ms: 1_500,
            ..Faults::default()
        })
        .await;
    let mut c = env.client().await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut env_w = TestEnv {
        tag: env.tag.clone(),
        dir: tempfile::tempdir().unwrap(),
        env: env.env.clone(),
    };
    env_w.set("BROKER__URL", &proxy.url_amqp());
    env_w.set("OUTBOX__PATH", &env.outbox_path().display().to_string());
    let mut child = env_w.spawn_child(&sim.base_url());
    let b = unique("O");
    for i in 0..1000 {
        c.publish(
            pay(&format!("{b}-{i}"), &format!("o{i}"), 1).as_bytes(),
            &format!("{b}-{i}"),
        )
        .await
        .unwrap();
    }
    let db = env.outbox_path();
    assert!(
        eventually(T, || count_jobs(&db, "") == 1000).await,
        "all accepted"
    );
    let before = vm_kib(child.id(), "VmRSS:");
    proxy.down();
    let mut peak = before;
    // at least 60 s, and until every job is final (a slow machine takes longer)
    let down_since = std::time::Instant::now();
    while down_since.elapsed() < Duration::from_secs(60)
        || (count_jobs(&db, "WHERE state = 'pending'") > 0
            && down_since.elapsed() < Duration::from_secs(240))
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(vm_kib(child.id(), "VmRSS:"));
    }
    assert_eq!(
        count_jobs(&db, "WHERE state = 'pending'"),
        0,
        "the jobs finished during the outage"
    );
    proxy.up();
    let mut copies: HashMap<String, usize> = HashMap::new();
    while copies.len() < 1000 {
        match c.next_reply(T).await {
            Ok(r) => *copies.entry(r.correlation_id).or_default() += 1,
            Err(e) => panic!("{} of 1000 replies: {e}", copies.len()),
        }
    }
    // a little longer: late copies would show up here
    while let Ok(r) = c.next_reply(Duration::from_secs(5)).await {
        *copies.entry(r.correlation_id).or_default() += 1;
    }
    let most = copies.values().copied().max().unwrap_or(0);
    println!("outage: RSS before {before} KiB, peak {peak} KiB; most copies of one reply {most}");
    assert!(most <= 3, "a reply was delivered {most} times");
    assert!(
        peak as f64 <= before as f64 * 1.5,
        "RSS grew from {before} KiB to {peak} KiB during the outage"
    );
    assert!(terminate(&mut child, Duration::from_secs(20)));
    env.cleanup(&c).await;
}

/// Defect 6: SIGTERM ends the process within `midas.request_timeout` + 10 s even
/// when the broker does not answer and a Midas call hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_worker_in_bounded_time_whatever_the_broker_does() {
    let mut env = TestEnv::new("term");
    env.set("MIDAS__REQUEST_TIMEOUT", "2s");
    env.set("HTTP__LISTEN", &format!("127.0.0.1:{}", free_port()));
    let sim = env
        .simulator(Faults {
            apply_then_stall_rate: 1.0,
            stall_ms: 60_000,
            ..Faults::default()
        })
        .await;
    let c = env.client().await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut env_w = TestEnv {
        tag: env.tag.clone(),
        dir: tempfile::tempdir().unwrap(),
        env: env.env.clone(),
    };
    env_w.set("BROKER__URL", &proxy.url_amqp());
    env_w.set("OUTBOX__PATH", &env.outbox_path().display().to_string());
    let mut child = env_w.spawn_child(&sim.base_url());
    let bill = unique("T");
    c.publish(pay(&bill, "t", 1).as_bytes(), "t").await.unwrap();
    assert!(eventually(T, || orders_for(&sim.ledger(), &bill).len() == 1).await);
    // the broker link now swallows everything
    proxy.stall();
    let started = std::time::Instant::now();
    let exited = terminate(&mut child, Duration::from_secs(2 + 10));
    assert!(
        exited,
        "SIGTERM did not end the worker within request_timeout + 10 s"
    );
    println!("stopped in {:?}", started.elapsed());
    proxy.unstall();
    env.cleanup(&c).await;
}
