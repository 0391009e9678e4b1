//! `query_order` (2.0 apps) end to end: the simulator sells an item and pushes it to
//! an in-process worker; the game asks for the order with `query_order` and the
//! reply carries `/wxa/game/queryorderinfo`'s fields, retried through `-1` answers;
//! an order WeChat does not know is `failed` 90019; the command is refused on a 1.0
//! app and without its fields; and it leaves no outbox row.

use std::time::Duration;

use crate::common::push::*;
use crate::common::*;
use midas_worker::command::Status;
use midas_worker::secret::Secret;
use midas_worker::sim::push::{Purchase, PurchaseKind, PushSetup};
use midas_worker::sim::{Faults, SimApp, Simulator};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn query(openid: &str, no: &str, biz_id: i64) -> Vec<u8> {
    json!({"op": "query_order", "appid": APPID, "openid": openid, "session_key": "sk-q",
           "out_trade_no": no, "biz_id": biz_id})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_order_answers_from_queryorderinfo_with_retries_and_refusals() {
    let mut env = push_env("query-order");
    let port = free_port();
    env.set("PUSH__LISTEN", &format!("127.0.0.1:{port}"));
    let sim = Simulator::new(
        env.settings().config.simulator,
        vec![SimApp {
            appid: APPID.into(),
            app_key: Secret::new(V2_KEY),
            sandbox_key: Secret::new(SANDBOX_KEY),
            app_secret: Secret::new("test-v2-secret"),
        }],
    )
    .with_pushes(PushSetup {
        urls: vec![format!("http://127.0.0.1:{port}/wechat/push")],
        apps: vec![keys()],
        safe_mode: false,
        time_factor: 100.0,
        repeat_after_success_rate: 0.0,
        mock_rate: 0.0,
        seed: 3,
    })
    .start()
    .await
    .expect("simulator");
    sim.register_session("o-q", "sk-q");
    let w = env.worker(&sim.base_url()).await;
    let p = sim.pusher().expect("pusher");
    let no = p
        .purchase(Purchase {
            appid: APPID.into(),
            openid: "o-q".into(),
            kind: PurchaseKind::Goods,
            out_trade_no: None,
            product_id: Some("crown".into()),
            quantity: Some(1),
            price: Some(900),
            env: None,
            attach: None,
        })
        .unwrap();
    assert!(eventually(T, || p.stats().delivered == 1).await);
    let order = p.order(APPID, &no).unwrap();

    // every other answer -1 at first: retried until the order's state comes
    sim.set_faults(Faults {
        busy_rate: 0.5,
        ..Faults::default()
    });
    let mut c = env.client().await;
    c.publish(&query("o-q", &no, 2), "q1").await.unwrap();
    c.publish(&query("o-q", "NO-SUCH-ORDER", 2), "q2")
        .await
        .unwrap();
    c.publish(&query("o-q", &no, 1), "q3").await.unwrap();
    let r = c.reply_for("q1", T).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.raw).unwrap();
    assert_eq!(r.reply.status, Some(Status::Succeeded), "{v}");
    assert_eq!(v["op"], "query_order");
    assert_eq!(v["out_trade_no"], no.as_str());
    assert_eq!(v["pay_state"], 2);
    assert_eq!(v["deliver_state"], 2, "pushed and answered success");
    assert_eq!(v["product_id"], "crown");
    assert_eq!(v["pay_finish_time"], order.pay_finish_time);
    assert_eq!(v["mch_order_no"], order.mch_order_no.as_str());
    assert_eq!(v["transaction_id"], order.transaction_id.as_str());
    assert!(
        v.get("balance").is_none() && v.get("bill_no").is_none(),
        "{v}"
    );
    for (corr, why) in [
        ("q2", "unknown order"),
        ("q3", "an item order asked as coins"),
    ] {
        let r = c.reply_for(corr, T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Failed), "{why}: {r:?}");
        assert_eq!(r.errcode, Some(90019), "{why}");
    }
    sim.set_faults(Faults::default());

    // refused: on a 1.0 app, without biz_id, with a bill_no
    let bad = [
        json!({"op": "query_order", "appid": "wx1234567", "openid": "o", "out_trade_no": "X", "biz_id": 2}),
        json!({"op": "query_order", "appid": APPID, "openid": "o", "session_key": "k", "out_trade_no": "X"}),
        json!({"op": "query_order", "appid": APPID, "openid": "o", "session_key": "k", "out_trade_no": "X", "biz_id": 2, "bill_no": "B"}),
    ];
    for (i, b) in bad.iter().enumerate() {
        let corr = format!("bad{i}");
        c.publish(b.to_string().as_bytes(), &corr).await.unwrap();
        let r = c.reply_for(&corr, T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Rejected), "{b}");
        assert_eq!(r.error.as_deref(), Some("invalid_command"), "{b}");
    }
    assert_eq!(count_jobs(&env.outbox_path(), ""), 0, "no outbox row");
    assert!(
        sim.ledger()
            .calls
            .get("v2_queryorderinfo")
            .copied()
            .unwrap_or(0)
            >= 3
    );
    env.cleanup(&c).await;
    w.stop().await;
    delete_queues(&env).await;
}
