//! The simulator pushes like WeChat: after a simulated item purchase or coin top-up
//! (`POST /sim/purchase`, or [`Pusher::purchase`]) it POSTs a signed push (plain or
//! safe mode) to the worker's push URL, repeats it on failure on WeChat's schedule
//! (15 s, 15 s, 30 s, 3 min, … 6 h; coins without the two 6 h steps) divided by
//! `time_factor`, repeats some pushes after a success (as WeChat does), and sends
//! mock pushes (`IsMock`, random values) now and then. Every order stays in its
//! push ledger (`GET /sim/pushes`): how often it was pushed, failed, answered
//! success, and when the first success came; `/wxa/game/queryorderinfo` answers
//! from it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::push::decrypt::{encrypt, AesKey};
use crate::push::verify;
use crate::secret::Secret;

/// WeChat's repeats of an item push after a failure, seconds.
pub const ITEM_SCHEDULE: [u64; 15] = [
    15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600,
];
/// Coin and refund pushes: 13 repeats (the item schedule without the two 6 h steps).
pub const EVENT_SCHEDULE: usize = 13;

/// A repeat after a success comes this long after it (s), like the first repeat.
const REPEAT_AFTER_SUCCESS: u64 = 15;

/// How long the simulator waits for an answer (WeChat: 3 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// An app's push secrets, as configured in its admin console.
#[derive(Clone, Debug)]
pub struct PushKeys {
    pub appid: String,
    pub token: Secret,
    /// The decoded EncodingAESKey: safe mode when set and `safe_mode` is on.
    pub aes_key: Option<AesKey>,
    pub app_key: Secret,
    pub sandbox_key: Option<Secret>,
}

/// Where and how the simulator pushes.
#[derive(Clone, Debug)]
pub struct PushSetup {
    /// The worker's push URL without the appid, e.g. `http://127.0.0.1:9480/wechat/push`.
    /// Several: each try goes to one of them at random (a load balancer in front
    /// of several workers).
    pub urls: Vec<String>,
    pub apps: Vec<PushKeys>,
    pub safe_mode: bool,
    /// WeChat's schedule is divided by this (100: the 15 s repeat comes after 150 ms).
    pub time_factor: f64,
    /// Probability that a delivered push is pushed again once more.
    pub repeat_after_success_rate: f64,
    /// Probability that a purchase is followed by a mock push.
    pub mock_rate: f64,
    pub seed: u64,
}

/// What was bought.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurchaseKind {
    /// An item bought directly (`minigame_game_pay_goods_deliver_notify`).
    Goods,
    /// A coin top-up (`minigame_coin_deliver_completed`).
    Coins,
}

/// A simulated purchase (`POST /sim/purchase`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    pub appid: String,
    pub openid: String,
    pub kind: PurchaseKind,
    /// Default: a fresh `SIM…` number.
    #[serde(default)]
    pub out_trade_no: Option<String>,
    /// Items: the product (default `item_1`).
    #[serde(default)]
    pub product_id: Option<String>,
    /// Items bought, or coins topped up (default 1).
    #[serde(default)]
    pub quantity: Option<i64>,
    /// Price paid, in fen (default 100).
    #[serde(default)]
    pub price: Option<i64>,
    /// 0 production (default), 1 sandbox.
    #[serde(default)]
    pub env: Option<i64>,
    #[serde(default)]
    pub attach: Option<String>,
}

/// An order in the push ledger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushedOrder {
    pub appid: String,
    pub openid: String,
    pub out_trade_no: String,
    pub kind: PurchaseKind,
    pub product_id: String,
    pub quantity: i64,
    pub price: i64,
    pub env: i64,
    /// Unix seconds.
    pub pay_finish_time: i64,
    pub mch_order_no: String,
    pub transaction_id: String,
    /// Pushes sent (first, repeats after failures, repeats after success).
    pub tries: u32,
    /// Answers that were not success (or no answer).
    pub failures: u32,
    pub success_answers: u32,
    /// Unix ms of the first success answer: WeChat then considers it delivered.
    pub delivered_at: Option<i64>,
    /// Every repeat failed.
    pub gave_up: bool,
}

/// Totals of the push ledger.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushStats {
    pub orders: usize,
    pub delivered: usize,
    pub gave_up: usize,
    pub tries: u64,
    pub failures: u64,
    pub success_answers: u64,
    pub mocks_sent: u64,
    pub mock_success_answers: u64,
}

struct State {
    orders: BTreeMap<(String, String), PushedOrder>,
    rng: SmallRng,
    next_no: u64,
    mocks_sent: u64,
    mock_success_answers: u64,
}

/// The pushing half of the simulator.
pub struct Pusher {
    setup: PushSetup,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// A push as sent: the query string (without `?`) and the body.
pub struct SignedPush {
    pub query: String,
    pub body: Vec<u8>,
}

/// Sign (and in safe mode encrypt) a push of `event` with `payload` for `keys`,
/// as WeChat does. `mock`: `IsMock` true and a random PayEventSig.
pub fn sign_push(
    keys: &PushKeys,
    event: &str,
    payload: &str,
    mock: bool,
    safe: bool,
    rng: &mut impl Rng,
) -> SignedPush {
    let env: i64 = serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("Env").and_then(|e| e.as_i64()))
        .unwrap_or(0);
    let key = if env == 1 {
        keys.sandbox_key.as_ref().unwrap_or(&keys.app_key)
    } else {
        &keys.app_key
    };
    let sig = if mock {
        format!("{:064x}", rng.random::<u128>())
    } else {
        verify::pay_event_sig(key.expose(), event, payload)
    };
    let envelope = json!({
        "ToUserName": "gh_simulator", "FromUserName": "o_wechat_pay",
        "CreateTime": crate::command::now_ms() / 1000, "MsgType": "event", "Event": event,
        "MiniGame": { "Payload": payload, "PayEventSig": sig, "IsMock": mock },
    })
    .to_string();
    let ts = (crate::command::now_ms() / 1000).to_string();
    let nonce = rng.random_range(100_000_000u64..1_000_000_000).to_string();
    let signature = verify::url_signature(keys.token.expose(), &ts, &nonce);
    match (safe, keys.aes_key.as_ref()) {
        (true, Some(aes)) => {
            let enc = encrypt(aes, envelope.as_bytes(), &keys.appid, rng.random());
            let msg_sig = verify::msg_signature(keys.token.expose(), &ts, &nonce, &enc);
            SignedPush {
                query: format!(
                    "signature={signature}&timestamp={ts}&nonce={nonce}&encrypt_type=aes&msg_signature={msg_sig}"
                ),
                body: json!({"ToUserName": "gh_simulator", "Encrypt": enc})
                    .to_string()
                    .into_bytes(),
            }
        }
        _ => SignedPush {
            query: format!("signature={signature}&timestamp={ts}&nonce={nonce}"),
            body: envelope.into_bytes(),
        },
    }
}

/// The Payload WeChat sends for `o`.
pub fn payload_of(o: &PushedOrder, attach: &str) -> (String, &'static str) {
    let pay = json!({"MchOrderNo": o.mch_order_no, "TransactionId": o.transaction_id});
    match o.kind {
        PurchaseKind::Goods => (
            json!({
                "OpenId": o.openid, "Env": o.env, "OutTradeNo": o.out_trade_no, "WeChatPayInfo": pay,
                "GoodsInfo": {"ProductId": o.product_id, "Quantity": o.quantity, "ZoneId": "1",
                    "OrigPrice": o.price, "ActualPrice": o.price, "Attach": attach, "OrderSource": 1},
            })
            .to_string(),
            "minigame_game_pay_goods_deliver_notify",
        ),
        PurchaseKind::Coins => (
            json!({
                "OpenId": o.openid, "OutTradeNo": o.out_trade_no, "WeChatPayInfo": pay, "Env": o.env,
                "CoinInfo": {"ZoneId": "1", "ActualPrice": o.price, "BuyQuantity": o.quantity,
                    "OrigPrice": o.price},
            })
            .to_string(),
            "minigame_coin_deliver_completed",
        ),
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "ErrCode")]
    errcode: i64,
}

impl Pusher {
    pub fn new(setup: PushSetup) -> Arc<Pusher> {
        let rng = SmallRng::seed_from_u64(setup.seed ^ 0x7075_7368);
        Arc::new(Pusher {
            http: reqwest::Client::builder()
                .timeout(ANSWER_TIMEOUT)
                .build()
                .unwrap_or_default(),
            setup,
            state: Mutex::new(State {
                orders: BTreeMap::new(),
                rng,
                next_no: 0,
                mocks_sent: 0,
                mock_success_answers: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keys(&self, appid: &str) -> Option<&PushKeys> {
        self.setup.apps.iter().find(|k| k.appid == appid)
    }

    /// Record a paid order and start pushing it; its OutTradeNo.
    pub fn purchase(self: &Arc<Self>, p: Purchase) -> Result<String, String> {
        if self.keys(&p.appid).is_none() {
            return Err(format!("no push keys for app {}", p.appid));
        }
        let (order, mock) = {
            let mut st = self.lock();
            st.next_no += 1;
            let no = p
                .out_trade_no
                .clone()
                .unwrap_or_else(|| format!("SIM{}{:08}", crate::command::now_ms(), st.next_no));
            let key = (p.appid.clone(), no.clone());
            if st.orders.contains_key(&key) {
                return Err(format!("out_trade_no {no} exists"));
            }
            let tx: u64 = st.rng.random();
            let o = PushedOrder {
                appid: p.appid.clone(),
                openid: p.openid.clone(),
                out_trade_no: no.clone(),
                kind: p.kind,
                product_id: p.product_id.clone().unwrap_or_else(|| "item_1".into()),
                quantity: p.quantity.unwrap_or(1),
                price: p.price.unwrap_or(100),
                env: p.env.unwrap_or(0),
                pay_finish_time: crate::command::now_ms() / 1000,
                mch_order_no: format!("MCH{tx:016x}"),
                transaction_id: format!("420000{tx:016}"),
                tries: 0,
                failures: 0,
                success_answers: 0,
                delivered_at: None,
                gave_up: false,
            };
            st.orders.insert(key, o.clone());
            let mock = st.rng.random_bool(self.setup.mock_rate.clamp(0.0, 1.0));
            (o, mock)
        };
        let no = order.out_trade_no.clone();
        let me = self.clone();
        let attach = p.attach.unwrap_or_default();
        tokio::spawn(async move { me.deliver(order, attach).await });
        if mock {
            let me = self.clone();
            let appid = p.appid;
            tokio::spawn(async move { me.mock(&appid, p.kind).await });
        }
        Ok(no)
    }

    fn scaled(&self, secs: u64) -> Duration {
        Duration::from_secs_f64(secs as f64 / self.setup.time_factor.max(1e-3))
    }

    /// One POST; whether the answer was success.
    async fn post(&self, appid: &str, p: &SignedPush) -> bool {
        let base = {
            let mut st = self.lock();
            let n = self.setup.urls.len();
            if n == 0 {
                return false;
            }
            let i = st.rng.random_range(0..n);
            self.setup.urls.get(i).cloned().unwrap_or_default()
        };
        let url = format!("{base}/{appid}?{}", p.query);
        let Ok(r) = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(p.body.clone())
            .send()
            .await
        else {
            return false;
        };
        if !r.status().is_success() {
            return false;
        }
        matches!(r.json::<Answer>().await, Ok(a) if a.errcode == 0)
    }

    fn sign(&self, o: &PushedOrder, attach: &str, mock: bool) -> Option<SignedPush> {
        let keys = self.keys(&o.appid)?;
        let (payload, event) = payload_of(o, attach);
        let mut st = self.lock();
        Some(sign_push(
            keys,
            event,
            &payload,
            mock,
            self.setup.safe_mode,
            &mut st.rng,
        ))
    }

    fn update(&self, o: &PushedOrder, f: impl FnOnce(&mut PushedOrder)) {
        let mut st = self.lock();
        if let Some(e) = st
            .orders
            .get_mut(&(o.appid.clone(), o.out_trade_no.clone()))
        {
            f(e);
        }
    }

    async fn deliver(self: Arc<Self>, o: PushedOrder, attach: String) {
        let repeats = match o.kind {
            PurchaseKind::Goods => ITEM_SCHEDULE.len(),
            PurchaseKind::Coins => EVENT_SCHEDULE,
        };
        // the first try at once, then one after each step of the schedule
        let steps = std::iter::once(0).chain(ITEM_SCHEDULE.iter().copied().take(repeats));
        for wait in steps {
            if wait > 0 {
                tokio::time::sleep(self.scaled(wait)).await;
            }
            // signed afresh each time (new timestamp and nonce), as WeChat does
            let Some(p) = self.sign(&o, &attach, false) else {
                return;
            };
            let ok = self.post(&o.appid, &p).await;
            self.update(&o, |e| {
                e.tries += 1;
                if ok {
                    e.success_answers += 1;
                    e.delivered_at.get_or_insert(crate::command::now_ms());
                } else {
                    e.failures += 1;
                }
            });
            if ok {
                let again = {
                    let mut st = self.lock();
                    let r = self.setup.repeat_after_success_rate.clamp(0.0, 1.0);
                    st.rng.random_bool(r)
                };
                if again {
                    tokio::time::sleep(self.scaled(REPEAT_AFTER_SUCCESS)).await;
                    if let Some(p) = self.sign(&o, &attach, false) {
                        let ok = self.post(&o.appid, &p).await;
                        self.update(&o, |e| {
                            e.tries += 1;
                            if ok {
                                e.success_answers += 1;
                            } else {
                                e.failures += 1;
                            }
                        });
                    }
                }
                return;
            }
        }
        self.update(&o, |e| e.gave_up = true);
    }

    /// A mock push as the admin console sends it: random values, `IsMock` true.
    async fn mock(self: Arc<Self>, appid: &str, kind: PurchaseKind) {
        let o = {
            let mut st = self.lock();
            st.mocks_sent += 1;
            let r: u64 = st.rng.random();
            PushedOrder {
                appid: appid.to_string(),
                openid: format!("o_mock_{r:x}"),
                out_trade_no: format!("MOCK{r:016x}"),
                kind,
                product_id: "mock_item".into(),
                quantity: 1,
                price: 1,
                env: 0,
                pay_finish_time: 0,
                mch_order_no: String::new(),
                transaction_id: String::new(),
                tries: 0,
                failures: 0,
                success_answers: 0,
                delivered_at: None,
                gave_up: false,
            }
        };
        if let Some(p) = self.sign(&o, "", true) {
            if self.post(appid, &p).await {
                self.lock().mock_success_answers += 1;
            }
        }
    }

    /// Every order, in (appid, out_trade_no) order.
    pub fn orders(&self) -> Vec<PushedOrder> {
        self.lock().orders.values().cloned().collect()
    }

    /// One order (for `queryorderinfo`).
    pub fn order(&self, appid: &str, out_trade_no: &str) -> Option<PushedOrder> {
        self.lock()
            .orders
            .get(&(appid.to_string(), out_trade_no.to_string()))
            .cloned()
    }

    pub fn stats(&self) -> PushStats {
        let st = self.lock();
        let mut s = PushStats {
            orders: st.orders.len(),
            mocks_sent: st.mocks_sent,
            mock_success_answers: st.mock_success_answers,
            ..PushStats::default()
        };
        for o in st.orders.values() {
            s.delivered += usize::from(o.delivered_at.is_some());
            s.gave_up += usize::from(o.gave_up);
            s.tries += u64::from(o.tries);
            s.failures += u64::from(o.failures);
            s.success_answers += u64::from(o.success_answers);
        }
        s
    }
}
