//! Virtual payment 2.0 end to end: a worker configured with a 1.0 app and a 2.0 app
//! (`api = "v2"`), a real RabbitMQ, a real SQLite outbox and the project's simulator
//! over HTTP (which checks `pay_sig` and `signature` over the raw body). Every op and
//! every outcome class on the 2.0 app, partial and over-refunds, per-player order,
//! both APIs side by side, and a SIGKILL mid-run — each held against the ledger.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::common::*;
use midas_worker::command::{FirstSave, Reply, Status};
use midas_worker::secret::Secret;
use midas_worker::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const V1_APPID: &str = "wx1234567";
const V2_APPID: &str = "wx7654321";
const V2_KEY: &str = "test-v2-app-key-0123456789";
const V2_SECRET: &str = "test-v2-app-secret-0123456789";
const INITIAL: i64 = 1_000_000;

/// The test settings plus a second app on virtual payment 2.0.
fn v2_env(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    env.set("APPS__1__APPID", V2_APPID)
        .set("APPS__1__OFFER_ID", "87654321")
        .set("APPS__1__APP_KEY_ENV", "MIDAS_APP_KEY_V2")
        .set("APPS__1__APP_SECRET_ENV", "WECHAT_APP_SECRET_V2")
        .set("APPS__1__API", "v2")
        .set("APPS__1__DEFAULT_USER_IP", "203.0.113.7");
    env.env.insert("MIDAS_APP_KEY_V2".into(), V2_KEY.into());
    env.env
        .insert("WECHAT_APP_SECRET_V2".into(), V2_SECRET.into());
    env
}

/// A simulator that knows both apps' keys.
async fn simulator(env: &TestEnv, faults: Faults) -> SimHandle {
    let mut cfg = env.settings().config.simulator;
    cfg.initial_balance = INITIAL;
    let app = |appid: &str, key: &str, secret: &str| SimApp {
        appid: appid.into(),
        app_key: Secret::new(key),
        sandbox_key: Secret::new("test-sandbox-key"),
        app_secret: Secret::new(secret),
    };
    let sim = Simulator::new(
        cfg,
        vec![
            app(V1_APPID, APP_KEY, APP_SECRET),
            app(V2_APPID, V2_KEY, V2_SECRET),
        ],
    )
    .start()
    .await
    .expect("simulator");
    sim.set_faults(faults);
    sim
}

/// A command for the 2.0 app: `fields` plus `appid`, `openid` and `session_key`.
fn v2(openid: &str, session_key: &str, fields: Value) -> Vec<u8> {
    let mut v = fields;
    v["appid"] = json!(V2_APPID);
    v["openid"] = json!(openid);
    v["session_key"] = json!(session_key);
    v.to_string().into_bytes()
}

fn v2_pay(bill: &str, openid: &str, amt: i64, key: &str) -> Vec<u8> {
    v2(
        openid,
        key,
        json!({"op": "pay", "bill_no": bill, "amt": amt}),
    )
}

fn v2_refund(bill: &str, pay_bill: &str, openid: &str, amt: i64, key: &str) -> Vec<u8> {
    v2(
        openid,
        key,
        json!({"op": "cancel_pay", "bill_no": bill, "pay_bill_no": pay_bill, "amt": amt}),
    )
}

fn account_balance(ledger: &LedgerDump, appid: &str, openid: &str) -> i64 {
    ledger
        .accounts
        .iter()
        .find(|a| a.appid == appid && a.openid == openid)
        .map_or(INITIAL, |a| a.balance)
}

fn attempts(db: &std::path::Path, bill: &str, op: &str) -> i64 {
    job_field(db, bill, op, "attempts")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The raw reply's keys (to check which API's names it carries).
fn keys(raw: &[u8]) -> HashSet<String> {
    let v: Value = serde_json::from_slice(raw).expect("reply is JSON");
    v.as_object()
        .expect("reply is an object")
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_on_a_v2_app_uses_the_2_0_api_and_names() {
    let env = v2_env("v2ops");
    let sim = simulator(&env, Faults::default()).await;
    sim.register_session("p1", "sk1");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let (pay, gift, refund) = (unique("P"), unique("G"), unique("R"));
    c.publish(&v2_pay(&pay, "p1", 10, "sk1"), "pay")
        .await
        .unwrap();
    c.publish(
        &v2(
            "p1",
            "sk1",
            json!({"op": "present", "bill_no": gift, "present_counts": 5}),
        ),
        "present",
    )
    .await
    .unwrap();
    c.publish(&v2_refund(&refund, &pay, "p1", 4, "sk1"), "refund")
        .await
        .unwrap();
    c.publish(&v2("p1", "sk1", json!({"op": "balance"})), "balance")
        .await
        .unwrap();

    let r = c.reply_for("pay", T).await.unwrap();
    assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
    assert_eq!(r.reply.balance, Some(INITIAL - 10));
    assert_eq!(r.reply.used_present_amount, Some(0));
    assert!(!keys(&r.raw).contains("used_gen_amt"), "2.0 names only");
    let r = c.reply_for("present", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(r.balance, Some(INITIAL - 10 + 5));
    let r = c.reply_for("refund", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(
        (r.op.as_deref(), r.bill_no.as_deref()),
        (Some("cancel_pay"), Some(refund.as_str()))
    );
    let b = c.reply_for("balance", T).await.unwrap();
    let want = INITIAL - 10 + 5 + 4;
    assert_eq!(b.reply.status, Some(Status::Succeeded), "{:?}", b.reply);
    assert_eq!(b.reply.balance, Some(want));
    assert_eq!(b.reply.present_balance, Some(5));
    assert_eq!(b.reply.first_save, Some(FirstSave::Flag(true)), "a boolean");
    assert!(b.reply.sum_save.is_some() && b.reply.sum_cost.is_some());
    let k = keys(&b.raw);
    for name in [
        "present_balance",
        "sum_save",
        "sum_present",
        "sum_balance",
        "sum_cost",
    ] {
        assert!(k.contains(name), "{name} missing: {k:?}");
    }
    for name in [
        "gen_balance",
        "save_amt",
        "save_sum",
        "cost_sum",
        "present_sum",
    ] {
        assert!(!k.contains(name), "1.0 name {name} in a 2.0 reply");
    }

    let ledger = sim.ledger();
    let ours: Vec<_> = ledger.orders.iter().filter(|o| o.openid == "p1").collect();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert!(ours.iter().all(|o| o.api == "v2" && o.appid == V2_APPID));
    let p = ours.iter().find(|o| o.bill_no == pay).expect("the pay");
    assert_eq!((p.refunded, p.cancelled), (4, false));
    assert_eq!(account_balance(&ledger, V2_APPID, "p1"), want);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_then_success_and_insufficient_balance() {
    let env = v2_env("v2busy");
    let sim = simulator(
        &env,
        Faults {
            busy_rate: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let db = env.outbox_path();
    let bill = unique("B");
    c.publish(&v2_pay(&bill, "b1", 7, "k"), "busy")
        .await
        .unwrap();
    assert!(eventually(T, || attempts(&db, &bill, "pay") >= 2).await);
    sim.set_faults(Faults::default());
    let r = c.reply_for("busy", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert!(r.attempts >= 3, "retried with the same bill_no: {r:?}");
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");

    let poor = unique("N");
    c.publish(&v2_pay(&poor, "b2", INITIAL + 1, "k"), "poor")
        .await
        .unwrap();
    let r = c.reply_for("poor", T).await.unwrap().reply;
    assert_eq!((r.status, r.errcode), (Some(Status::Failed), Some(90013)));
    assert!(orders_for(&sim.ledger(), &poor).is_empty());
    assert_eq!(account_balance(&sim.ledger(), V2_APPID, "b2"), INITIAL);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_then_90012_is_a_succeeded_duplicate() {
    let mut env = v2_env("v2lost");
    env.set("MIDAS__REQUEST_TIMEOUT", "500ms");
    let sim = simulator(
        &env,
        Faults {
            apply_then_stall_rate: 1.0,
            stall_ms: 3_000,
            ..Faults::default()
        },
    )
    .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("L");
    c.publish(&v2_pay(&bill, "l1", 9, "k"), "lost")
        .await
        .unwrap();
    assert!(eventually(T, || orders_for(&sim.ledger(), &bill).len() == 1).await);
    sim.set_faults(Faults::default());
    let r = c.reply_for("lost", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(r.duplicate, Some(true));
    assert_eq!(r.balance, Some(INITIAL - 9), "balance fetched after 90012");
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_and_the_pay_goes_through() {
    let env = v2_env("v2token");
    let sim = simulator(&env, Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let first = unique("T");
    c.publish(&v2_pay(&first, "t1", 1, "k"), "first")
        .await
        .unwrap();
    let r = c.reply_for("first", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    let fetched = sim.ledger().calls.get("stable_token").copied().unwrap_or(0);
    // the worker's cached token is now revoked
    sim.revoke_tokens();
    let second = unique("T");
    c.publish(&v2_pay(&second, "t1", 2, "k"), "second")
        .await
        .unwrap();
    let r = c.reply_for("second", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert!(r.attempts >= 2, "{r:?}");
    let ledger = sim.ledger();
    assert!(
        ledger.calls.get("stable_token").copied().unwrap_or(0) > fetched,
        "a new token was fetched: {:?}",
        ledger.calls
    );
    assert_eq!(orders_for(&ledger, &second).len(), 1, "charged once");
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expired_after_a_lost_answer_is_unknown_until_resent() {
    let mut env = v2_env("v2sess");
    env.set("MIDAS__REQUEST_TIMEOUT", "500ms");
    let sim = simulator(
        &env,
        Faults {
            session_expire_after_lost_rate: 1.0,
            stall_ms: 3_000,
            ..Faults::default()
        },
    )
    .await;
    sim.register_session("s1", "k1");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("S");
    c.publish(&v2_pay(&bill, "s1", 9, "k1"), "s-1")
        .await
        .unwrap();
    // applied, the answer lost, and k1 expired: the retry answers 90010
    assert!(eventually(T, || orders_for(&sim.ledger(), &bill).len() == 1).await);
    sim.set_faults(Faults::default());
    let r = c.reply_for("s-1", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Unknown), "never failed: {r:?}");
    assert_eq!(r.error.as_deref(), Some("outcome_uncertain"));
    assert_eq!(r.errcode, Some(90010));
    // the player logs in again: re-sent with the new session_key, same bill_no
    sim.register_session("s1", "k2");
    c.publish(&v2_pay(&bill, "s1", 9, "k2"), "s-2")
        .await
        .unwrap();
    let r = c.reply_for("s-2", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(r.duplicate, Some(true));
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1, "charged once");
    assert_eq!(account_balance(&sim.ledger(), V2_APPID, "s1"), INITIAL - 9);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_refunds_then_an_over_refund_fails_and_changes_nothing() {
    let env = v2_env("v2refund");
    let sim = simulator(&env, Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let pay = unique("P");
    let (r1, r2, r3) = (unique("R1"), unique("R2"), unique("R3"));
    c.publish(&v2_pay(&pay, "r1", 100, "k"), "pay")
        .await
        .unwrap();
    c.publish(&v2_refund(&r1, &pay, "r1", 30, "k"), "r1")
        .await
        .unwrap();
    c.publish(&v2_refund(&r2, &pay, "r1", 50, "k"), "r2")
        .await
        .unwrap();
    for k in ["pay", "r1", "r2"] {
        let r = c.reply_for(k, T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Succeeded), "{k}: {r:?}");
    }
    let before = sim.ledger();
    assert_eq!(account_balance(&before, V2_APPID, "r1"), INITIAL - 20);
    // 30 + 50 + 30 > 100
    c.publish(&v2_refund(&r3, &pay, "r1", 30, "k"), "r3")
        .await
        .unwrap();
    let r = c.reply_for("r3", T).await.unwrap().reply;
    assert_eq!((r.status, r.errcode), (Some(Status::Failed), Some(90018)));
    let after = sim.ledger();
    assert!(orders_for(&after, &r3).is_empty());
    assert_eq!(account_balance(&after, V2_APPID, "r1"), INITIAL - 20);
    let p = orders_for(&after, &pay)
        .into_iter()
        .find(|o| o.op == "pay")
        .expect("the pay");
    assert_eq!((p.refunded, p.cancelled), (80, false));
    // a repeated refund is answered from the outbox, not refunded again
    c.publish(&v2_refund(&r1, &pay, "r1", 30, "k"), "r1-again")
        .await
        .unwrap();
    let r = c.reply_for("r1-again", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded));
    assert_eq!(account_balance(&sim.ledger(), V2_APPID, "r1"), INITIAL - 20);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_waits_behind_its_pending_pay() {
    let env = v2_env("v2order");
    let sim = simulator(
        &env,
        Faults {
            busy_rate: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let db = env.outbox_path();
    let (pay, refund) = (unique("P"), unique("R"));
    c.publish(&v2_pay(&pay, "o1", 40, "k"), "pay")
        .await
        .unwrap();
    c.publish(&v2_refund(&refund, &pay, "o1", 40, "k"), "refund")
        .await
        .unwrap();
    let queued = || job_field(&db, &refund, "cancel_pay", "state").as_deref() == Some("pending");
    assert!(eventually(T, || attempts(&db, &pay, "pay") >= 2 && queued()).await);
    assert_eq!(
        attempts(&db, &refund, "cancel_pay"),
        0,
        "not sent while its pay is still retrying"
    );
    sim.set_faults(Faults::default());
    let rp = c.reply_for("pay", T).await.unwrap().reply;
    let rr = c.reply_for("refund", T).await.unwrap().reply;
    assert_eq!(rp.status, Some(Status::Succeeded), "{rp:?}");
    assert_eq!(rr.status, Some(Status::Succeeded), "{rr:?}");
    let ledger = sim.ledger();
    let p = orders_for(&ledger, &pay)
        .into_iter()
        .find(|o| o.op == "pay")
        .expect("the pay");
    assert!(p.cancelled, "refunded in full");
    assert_eq!(account_balance(&ledger, V2_APPID, "o1"), INITIAL);
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_v1_and_a_v2_app_with_the_same_bill_no_are_each_charged_once() {
    let env = v2_env("v2both");
    let sim = simulator(&env, Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("S");
    let v1 = json!({"op": "pay", "bill_no": bill, "openid": "same", "amt": 3, "appid": V1_APPID});
    c.publish(v1.to_string().as_bytes(), "v1").await.unwrap();
    c.publish(&v2_pay(&bill, "same", 3, "k"), "v2")
        .await
        .unwrap();
    let r1 = c.reply_for("v1", T).await.unwrap();
    let r2 = c.reply_for("v2", T).await.unwrap();
    assert_eq!(r1.reply.status, Some(Status::Succeeded), "{:?}", r1.reply);
    assert_eq!(r2.reply.status, Some(Status::Succeeded), "{:?}", r2.reply);
    assert!(
        keys(&r1.raw).contains("used_gen_amt"),
        "1.0 names for the 1.0 app"
    );
    assert!(keys(&r2.raw).contains("used_present_amount"));
    let ledger = sim.ledger();
    let orders = orders_for(&ledger, &bill);
    assert_eq!(orders.len(), 2, "{orders:?}");
    for (appid, api) in [(V1_APPID, "v1"), (V2_APPID, "v2")] {
        assert_eq!(
            orders
                .iter()
                .filter(|o| o.appid == appid && o.api == api)
                .count(),
            1
        );
        assert_eq!(account_balance(&ledger, appid, "same"), INITIAL - 3);
    }
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_with_a_v2_app_loses_nothing_and_charges_once() {
    let env = v2_env("v2kill");
    let sim = simulator(
        &env,
        Faults {
            latency_ms: 2,
            busy_rate: 0.05,
            ..Faults::default()
        },
    )
    .await;
    let mut c = env.client().await;
    let b = unique("K");
    let sent: Vec<String> = (0..150).map(|i| format!("{b}-{i}")).collect();
    for (i, bill) in sent.iter().enumerate() {
        c.publish(&v2_pay(bill, &format!("u{}", i % 15), 1, "k"), bill)
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for round in 0..2 {
        let mut child = env.spawn_child(&sim.base_url());
        let target = (round + 1) * 40;
        while got.len() < target {
            match c.next_reply(Duration::from_secs(30)).await {
                Ok(r) => got.push(r),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        kill9(&mut child);
    }
    let mut child = env.spawn_child(&sim.base_url());
    let want: BTreeMap<String, (String, String)> = sent
        .iter()
        .map(|b| (b.clone(), ("pay".to_string(), b.clone())))
        .collect();
    collect_more(&mut c, &want, &mut got, Duration::from_secs(90)).await;
    assert!(
        terminate(&mut child, Duration::from_secs(20)),
        "SIGTERM exits 0"
    );
    let ledger = sim.ledger();
    let last: BTreeMap<String, Reply> = check_ledger_ops(&want, &got, &ledger);
    assert!(last.values().all(|r| r.status == Some(Status::Succeeded)));
    assert!(ledger.orders.iter().all(|o| o.api == "v2"));
    let charged: i64 = (0..15)
        .map(|u| INITIAL - account_balance(&ledger, V2_APPID, &format!("u{u}")))
        .sum();
    assert_eq!(charged, sent.len() as i64, "each pay charged exactly once");
    env.cleanup(&c).await;
}

/// In sandbox the worker sends `env = 1`, signed with the configured (sandbox)
/// AppKey; the simulator checks `pay_sig` with its sandbox key for `env = 1`, so a
/// call with `env = 0` (or the wrong key) would answer 90011.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_sandbox_a_v2_app_calls_with_env_1_and_the_sandbox_key() {
    let mut env = v2_env("v2sandbox");
    env.set("MIDAS__ENVIRONMENT", "sandbox");
    env.env
        .insert("MIDAS_APP_KEY_V2".into(), "test-sandbox-key".into());
    let sim = simulator(&env, Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("SB");
    c.publish(&v2_pay(&bill, "sb1", 6, "k"), "sb")
        .await
        .unwrap();
    let r = c.reply_for("sb", T).await.unwrap().reply;
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(orders_for(&sim.ledger(), &bill).len(), 1);
    worker.stop().await;
    env.cleanup(&c).await;
}

/// The reliability scenario with a 1.0 and a 2.0 app in one worker: every simulator
/// fault at once (busy, answers lost after applying, stalls, 502s, 90016 on 1.0
/// cancels, tokens revoked mid-run) and the worker's broker link cut twice. Every
/// command of both apps ends `succeeded`, each charged once, each 1.0 cancel applied
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_0_and_a_2_0_app_survive_every_fault_and_a_broker_bounce_together() {
    let mut env = v2_env("mixchaos");
    env.set("MIDAS__REQUEST_TIMEOUT", "300ms");
    let proxy = crate::common::proxy::Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env.set("BROKER__URL", &proxy.url_amqp());
    let sim = simulator(
        &env,
        Faults {
            busy_rate: 0.08,
            latency_ms: 1,
            apply_then_stall_rate: 0.06,
            stall_then_drop_rate: 0.04,
            http_502_rate: 0.05,
            processing_rate: 0.25,
            token_revoke_rate: 0.0,
            session_expire_after_lost_rate: 0.0,
            stall_ms: 600,
        },
    )
    .await;
    let worker = env.worker(&sim.base_url()).await;
    // the game talks to the broker directly, not through the proxy
    let mut direct = env.clone_settings_direct();
    let mut c = direct.client().await;
    let b = unique("M");
    let mut sent: BTreeMap<String, (String, String)> = BTreeMap::new();
    for i in 0..120i64 {
        let u = format!("m{}", i % 20);
        let p1 = format!("{b}-a{i}");
        let v1_pay =
            json!({"op": "pay", "bill_no": p1, "openid": u, "amt": 1 + i % 5, "appid": V1_APPID});
        c.publish(v1_pay.to_string().as_bytes(), &p1).await.unwrap();
        sent.insert(p1.clone(), ("pay".into(), p1.clone()));
        if i % 3 == 0 {
            let x = json!({"op": "cancel_pay", "bill_no": p1, "openid": u, "appid": V1_APPID});
            let key = format!("x-{p1}");
            c.publish(x.to_string().as_bytes(), &key).await.unwrap();
            sent.insert(key, ("cancel_pay".into(), p1.clone()));
        }
        let p2 = format!("{b}-b{i}");
        c.publish(&v2_pay(&p2, &u, 1 + i % 5, "k-mixed"), &p2)
            .await
            .unwrap();
        sent.insert(p2.clone(), ("pay".into(), p2.clone()));
        if i == 40 || i == 80 {
            proxy.cut();
        }
        if i == 60 {
            sim.revoke_tokens();
        }
    }
    let got = collect_replies(&mut c, &sent, Duration::from_secs(120)).await;
    let ledger = sim.ledger();
    let last = check_ledger_ops(&sent, &got, &ledger);
    for (key, r) in &last {
        assert_eq!(r.status, Some(Status::Succeeded), "{key}: {r:?}");
    }
    let per_app = |appid: &str| {
        ledger
            .orders
            .iter()
            .filter(|o| o.appid == appid && o.op == "pay")
            .count()
    };
    assert_eq!(per_app(V1_APPID), 120, "every 1.0 pay charged once");
    assert_eq!(per_app(V2_APPID), 120, "every 2.0 pay charged once");
    let cancelled = ledger.orders.iter().filter(|o| o.cancelled).count();
    assert_eq!(cancelled, 40, "every 1.0 cancel applied once");
    worker.stop().await;
    env.cleanup(&c).await;
}
