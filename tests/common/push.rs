//! Push test helpers: a test env with a 2.0 app taking pushes, WeChat's signed
//! pushes (built by the simulator's own signer), and a reader of the events queue.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions};
use midas_worker::secret::Secret;
use midas_worker::sim::push::{sign_push, PushKeys, SignedPush};
use rand::SeedableRng;

use super::{TestEnv, BROKER};

pub const APPID: &str = "wx7654321";
pub const V2_KEY: &str = "test-v2-app-key-0123456789";
pub const SANDBOX_KEY: &str = "test-v2-sandbox-key-0123456789";
pub const TOKEN: &str = "test-push-token-0123";
pub const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub const GOODS_EVENT: &str = "minigame_game_pay_goods_deliver_notify";

/// A test env whose second app is a 2.0 app taking pushes (plain and safe mode),
/// with the push listener on a free port and an events queue of its own.
pub fn push_env(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    let events = format!("t-{}.events", env.tag);
    env.set("APPS__1__APPID", APPID)
        .set("APPS__1__OFFER_ID", "87654321")
        .set("APPS__1__APP_KEY_ENV", "MIDAS_APP_KEY_V2")
        .set("APPS__1__APP_SECRET_ENV", "WECHAT_APP_SECRET_V2")
        .set("APPS__1__API", "v2")
        .set("APPS__1__DEFAULT_USER_IP", "203.0.113.7")
        .set("APPS__1__PUSH_TOKEN_ENV", "WECHAT_PUSH_TOKEN")
        .set("APPS__1__PUSH_AES_KEY_ENV", "WECHAT_PUSH_AES_KEY")
        .set("APPS__1__SANDBOX_APP_KEY_ENV", "MIDAS_SANDBOX_KEY_V2")
        .set("PUSH__LISTEN", "127.0.0.1:0")
        .set("PUSH__EVENT_QUEUE", &events);
    for (k, v) in [
        ("MIDAS_APP_KEY_V2", V2_KEY),
        ("WECHAT_APP_SECRET_V2", "test-v2-secret"),
        ("WECHAT_PUSH_TOKEN", TOKEN),
        ("WECHAT_PUSH_AES_KEY", AES_KEY),
        ("MIDAS_SANDBOX_KEY_V2", SANDBOX_KEY),
    ] {
        env.env.insert(k.into(), v.into());
    }
    env
}

pub fn event_queue(env: &TestEnv) -> String {
    format!("t-{}.events", env.tag)
}

pub fn keys() -> PushKeys {
    PushKeys {
        appid: APPID.into(),
        token: Secret::new(TOKEN),
        aes_key: Some(
            midas_worker::push::decrypt::AesKey::from_encoding_key(AES_KEY).expect("key"),
        ),
        app_key: Secret::new(V2_KEY),
        sandbox_key: Some(Secret::new(SANDBOX_KEY)),
    }
}

pub fn goods_payload(out_trade_no: &str, openid: &str) -> String {
    format!(
        r#"{{"OpenId":"{openid}","Env":0,"OutTradeNo":"{out_trade_no}","GoodsInfo":{{"ProductId":"sword","Quantity":1,"ZoneId":"1","OrigPrice":600,"ActualPrice":600,"Attach":"a"}}}}"#
    )
}

/// A push signed as WeChat signs it.
pub fn signed(event: &str, payload: &str, mock: bool, safe: bool) -> SignedPush {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(rand::random());
    sign_push(&keys(), event, payload, mock, safe, &mut rng)
}

/// POST a push; (HTTP status, ErrCode).
pub async fn post(base: &str, appid: &str, query: &str, body: Vec<u8>) -> (u16, i64) {
    let r = reqwest::Client::new()
        .post(format!("{base}/wechat/push/{appid}?{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("push answered");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (status, v["ErrCode"].as_i64().unwrap_or(-1))
}

/// Every message on `queue` (acked), waiting until `at_least` arrived or `timeout`:
/// (message_id, parsed body).
pub async fn drain_events(
    queue: &str,
    at_least: usize,
    timeout: Duration,
) -> Vec<(String, serde_json::Value)> {
    let conn = lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    // the worker may not have declared it yet
    midas_worker::push::relay::declare(&ch, queue)
        .await
        .expect("events queue");
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        match ch.basic_get(queue.into(), BasicGetOptions::default()).await {
            Ok(Some(m)) => {
                let id = m
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let v: serde_json::Value =
                    serde_json::from_slice(&m.delivery.data).unwrap_or_default();
                let _ = m.delivery.ack(BasicAckOptions::default()).await;
                out.push((id, v));
                continue;
            }
            Ok(None) => {}
            Err(_) => {}
        }
        if out.len() >= at_least || std::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Events by event_id: how many copies of each.
pub fn copies(events: &[(String, serde_json::Value)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (id, _) in events {
        *m.entry(id.clone()).or_insert(0) += 1;
    }
    m
}

/// Delete a test's queues (events, commands, replies, dead letters) from the broker.
pub async fn delete_queues(env: &TestEnv) {
    let Ok(conn) = lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let b = env.settings().config.broker;
        for q in [
            event_queue(env),
            b.command_queue,
            b.reply_queue,
            b.dead_letter_queue,
        ] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}
