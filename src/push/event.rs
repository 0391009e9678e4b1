//! A push body, from bytes to the events-queue message: parse the envelope, route
//! on `Event`, pick the AppKey by the payload's `Env`, verify `PayEventSig` over the
//! received Payload string, and only then read the payload's fields.
//!
//! Pure: no clock, no I/O. The message built here is stored in the outbox verbatim
//! and published as is, so every copy of an event (the first publish, a relay
//! after a crash, an operator's republish) carries the same bytes and the same
//! [`event_id`], derived from (appid, kind, dedup key) alone.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::verify;

/// What a push means to the game (the `kind` of the events-queue message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    CoinsDelivered,
    GoodsDelivered,
    Refunded,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::CoinsDelivered, Kind::GoodsDelivered, Kind::Refunded];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CoinsDelivered => "coins_delivered",
            Kind::GoodsDelivered => "goods_delivered",
            Kind::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind of a WeChat `Event` name; `None` for events this receiver does
    /// not take.
    pub fn of_event(event: &str) -> Option<Kind> {
        Some(match event {
            "minigame_coin_deliver_completed"
            | "minigame_recharge_center_coin_deliver_completed" => Kind::CoinsDelivered,
            "minigame_game_pay_goods_deliver_notify"
            | "minigame_h5_goods_deliver_notify"
            | "minigame_deliver_h5_pay_products" => Kind::GoodsDelivered,
            "minigame_pay_refund_succ_notify" => Kind::Refunded,
            _ => return None,
        })
    }
}

/// The AppKeys a push of one app is verified with.
pub struct Keys<'a> {
    /// `Env` 0.
    pub production: &'a str,
    /// `Env` 1 (`sandbox_app_key_env`); pushes from the sandbox are refused without it.
    pub sandbox: Option<&'a str>,
}

/// Why a push was refused. Each has its own `ErrCode` and metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the body is not a push envelope: {0}")]
    BadBody(String),
    #[error("unknown event")]
    UnknownEvent,
    #[error("PayEventSig does not verify")]
    BadPayEventSig,
    #[error("a sandbox push (Env 1) and no sandbox_app_key_env for the app")]
    NoSandboxKey,
    #[error("the payload does not have the event's fields: {0}")]
    BadPayload(String),
}

impl Refusal {
    /// Metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::BadBody(_) => "bad_body",
            Refusal::UnknownEvent => "unknown_event",
            Refusal::BadPayEventSig => "bad_pay_event_sig",
            Refusal::NoSandboxKey => "no_sandbox_key",
            Refusal::BadPayload(_) => "bad_payload",
        }
    }
}

/// A verified push, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub appid: String,
    pub kind: Kind,
    pub event: String,
    /// `OutTradeNo`, or `RefundId` for refunds.
    pub dedup_key: String,
    pub event_id: String,
    pub openid: Option<String>,
    pub out_trade_no: Option<String>,
    pub env: i64,
    /// The events-queue message (JSON), published verbatim.
    pub message: String,
}

/// What to do with a push that passed the URL signature.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// `IsMock`: fields checked, answered success, stored and published nowhere.
    Mock(Kind),
    Event(Verified),
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Event")]
    event: Option<String>,
    #[serde(rename = "MiniGame")]
    mini_game: Option<MiniGame>,
}

#[derive(Deserialize)]
struct MiniGame {
    #[serde(rename = "Payload")]
    payload: String,
    #[serde(rename = "PayEventSig", default)]
    pay_event_sig: Option<String>,
    /// Missing means false.
    #[serde(rename = "IsMock", default)]
    is_mock: bool,
}

#[derive(Deserialize)]
struct EnvOnly {
    #[serde(rename = "Env")]
    env: i64,
}

#[derive(Deserialize)]
struct PayInfo {
    #[serde(rename = "MchOrderNo", default)]
    mch_order_no: Option<String>,
    #[serde(rename = "TransactionId", default)]
    transaction_id: Option<String>,
}

#[derive(Deserialize)]
struct CoinPayload {
    #[serde(rename = "OpenId")]
    openid: String,
    #[serde(rename = "OutTradeNo")]
    out_trade_no: String,
    #[serde(rename = "WeChatPayInfo", default)]
    pay: Option<PayInfo>,
    #[serde(rename = "CoinInfo")]
    coin: CoinInfo,
}

#[derive(Deserialize)]
struct CoinInfo {
    #[serde(rename = "ZoneId", default, deserialize_with = "opt_text")]
    zone_id: Option<String>,
    #[serde(rename = "ActualPrice", default)]
    actual_price: Option<i64>,
    /// What the examples call `ActualPrice`.
    #[serde(rename = "TotalPrice", default)]
    total_price: Option<i64>,
    #[serde(rename = "BuyQuantity")]
    buy_quantity: i64,
    #[serde(rename = "OrigPrice", default)]
    orig_price: Option<i64>,
}

#[derive(Deserialize)]
struct GoodsPayload {
    #[serde(rename = "OpenId")]
    openid: String,
    #[serde(rename = "OutTradeNo")]
    out_trade_no: String,
    #[serde(rename = "WeChatPayInfo", default)]
    pay: Option<PayInfo>,
    #[serde(rename = "GoodsInfo")]
    goods: GoodsInfo,
}

#[derive(Deserialize)]
struct GoodsInfo {
    #[serde(rename = "ProductId")]
    product_id: String,
    #[serde(rename = "Quantity")]
    quantity: i64,
    #[serde(rename = "ZoneId", default, deserialize_with = "opt_text")]
    zone_id: Option<String>,
    #[serde(rename = "OrigPrice", default)]
    orig_price: Option<i64>,
    #[serde(rename = "ActualPrice")]
    actual_price: i64,
    #[serde(rename = "Attach", default)]
    attach: Option<String>,
    #[serde(rename = "OrderSource", default)]
    order_source: Option<i64>,
}

#[derive(Deserialize)]
struct RefundPayload {
    #[serde(rename = "RefundId")]
    refund_id: String,
    #[serde(rename = "RefundAmount")]
    refund_amount: i64,
    #[serde(rename = "RefundSource", default)]
    refund_source: Option<i64>,
    #[serde(rename = "OutTradeNo", default)]
    out_trade_no: Option<String>,
    #[serde(rename = "WeChatPayInfo", default)]
    pay: Option<PayInfo>,
}

/// A string field that may come as a number (`"ZoneId":1`).
fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(serde::de::Error::custom("expected a string or a number")),
    })
}

/// The longest dedup key (OutTradeNo, RefundId) taken.
pub const MAX_KEY_LEN: usize = 128;

/// A stable id for the push of `(appid, kind, key)`: the same push always gets
/// the same id, whichever worker stores it and however often WeChat repeats it.
pub fn event_id(appid: &str, kind: Kind, key: &str) -> String {
    let mut h = Sha256::new();
    for part in [appid, kind.as_str(), key] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut out = String::with_capacity(36);
    out.push_str("evt_");
    for b in d.iter().take(16) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn key_ok(k: &str) -> bool {
    !k.is_empty() && k.len() <= MAX_KEY_LEN && k.chars().all(|c| c.is_ascii_graphic())
}

/// Verify and read a push body (already decrypted in safe mode) for `appid`.
/// `received_at` is RFC 3339; `simulated`: the worker runs against the simulator.
pub fn read(
    appid: &str,
    body: &[u8],
    keys: &Keys<'_>,
    received_at: &str,
    simulated: bool,
) -> Result<Verdict, Refusal> {
    let env: Envelope =
        serde_json::from_slice(body).map_err(|e| Refusal::BadBody(short(&e.to_string())))?;
    let event = env.event.ok_or(Refusal::BadBody("no Event".into()))?;
    let kind = Kind::of_event(&event).ok_or(Refusal::UnknownEvent)?;
    let mg = env
        .mini_game
        .ok_or(Refusal::BadBody("no MiniGame".into()))?;
    if mg.is_mock {
        // a mock's fields are random values: only their types are checked
        fields(appid, kind, &event, &mg.payload, 0, received_at, simulated)?;
        return Ok(Verdict::Mock(kind));
    }
    let which: EnvOnly = serde_json::from_str(&mg.payload)
        .map_err(|e| Refusal::BadPayload(short(&e.to_string())))?;
    let key = match which.env {
        0 => keys.production,
        1 => keys.sandbox.ok_or(Refusal::NoSandboxKey)?,
        _ => return Err(Refusal::BadPayload("Env is neither 0 nor 1".into())),
    };
    let sig = mg.pay_event_sig.as_deref().unwrap_or("");
    if !verify::pay_event_sig_ok(key, &event, &mg.payload, sig) {
        return Err(Refusal::BadPayEventSig);
    }
    let v = fields(
        appid,
        kind,
        &event,
        &mg.payload,
        which.env,
        received_at,
        simulated,
    )?;
    Ok(Verdict::Event(v))
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

fn bad(e: serde_json::Error) -> Refusal {
    Refusal::BadPayload(short(&e.to_string()))
}

fn pay_json(p: &Option<PayInfo>) -> Option<Value> {
    let p = p.as_ref()?;
    if p.mch_order_no.is_none() && p.transaction_id.is_none() {
        return None;
    }
    let mut m = serde_json::Map::new();
    if let Some(v) = &p.mch_order_no {
        m.insert("mch_order_no".into(), Value::from(v.as_str()));
    }
    if let Some(v) = &p.transaction_id {
        m.insert("transaction_id".into(), Value::from(v.as_str()));
    }
    Some(Value::Object(m))
}

#[derive(Serialize)]
struct Message<'a> {
    event_id: &'a str,
    appid: &'a str,
    event: &'a str,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    openid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    out_trade_no: Option<&'a str>,
    env: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    coins: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    goods: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refund: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wechat_pay: Option<Value>,
    payload: &'a str,
    received_at: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    simulated: bool,
}

/// The payload's fields for `kind`, and the message.
fn fields(
    appid: &str,
    kind: Kind,
    event: &str,
    payload: &str,
    env: i64,
    received_at: &str,
    simulated: bool,
) -> Result<Verified, Refusal> {
    let (openid, out_trade_no, dedup_key, detail, pay) = match kind {
        Kind::CoinsDelivered => {
            let p: CoinPayload = serde_json::from_str(payload).map_err(bad)?;
            let c = &p.coin;
            let actual = c.actual_price.or(c.total_price).ok_or_else(|| {
                Refusal::BadPayload("CoinInfo has neither ActualPrice nor TotalPrice".into())
            })?;
            let detail = serde_json::json!({
                "zone_id": c.zone_id, "actual_price": actual,
                "buy_quantity": c.buy_quantity, "orig_price": c.orig_price,
            });
            (
                Some(p.openid),
                Some(p.out_trade_no.clone()),
                p.out_trade_no,
                detail,
                pay_json(&p.pay),
            )
        }
        Kind::GoodsDelivered => {
            let p: GoodsPayload = serde_json::from_str(payload).map_err(bad)?;
            let g = &p.goods;
            let detail = serde_json::json!({
                "product_id": g.product_id, "quantity": g.quantity, "zone_id": g.zone_id,
                "orig_price": g.orig_price, "actual_price": g.actual_price,
                "attach": g.attach, "order_source": g.order_source,
            });
            (
                Some(p.openid),
                Some(p.out_trade_no.clone()),
                p.out_trade_no,
                detail,
                pay_json(&p.pay),
            )
        }
        Kind::Refunded => {
            let p: RefundPayload = serde_json::from_str(payload).map_err(bad)?;
            let detail = serde_json::json!({
                "refund_id": p.refund_id, "refund_amount": p.refund_amount,
                "refund_source": p.refund_source,
            });
            (None, p.out_trade_no, p.refund_id, detail, pay_json(&p.pay))
        }
    };
    if !key_ok(&dedup_key) {
        return Err(Refusal::BadPayload(format!(
            "{} must be 1 to {MAX_KEY_LEN} printable characters",
            if kind == Kind::Refunded {
                "RefundId"
            } else {
                "OutTradeNo"
            }
        )));
    }
    if openid
        .as_deref()
        .is_some_and(|o| o.is_empty() || o.len() > MAX_KEY_LEN)
    {
        return Err(Refusal::BadPayload("OpenId is empty or too long".into()));
    }
    let event_id = event_id(appid, kind, &dedup_key);
    let (mut coins, mut goods, mut refund) = (None, None, None);
    match kind {
        Kind::CoinsDelivered => coins = Some(detail),
        Kind::GoodsDelivered => goods = Some(detail),
        Kind::Refunded => refund = Some(detail),
    }
    let message = serde_json::to_string(&Message {
        event_id: &event_id,
        appid,
        event,
        kind: kind.as_str(),
        openid: openid.as_deref(),
        out_trade_no: out_trade_no.as_deref(),
        env,
        coins,
        goods,
        refund,
        wechat_pay: pay,
        payload,
        received_at,
        simulated,
    })
    .map_err(|e| Refusal::BadPayload(short(&e.to_string())))?;
    Ok(Verified {
        appid: appid.to_string(),
        kind,
        event: event.to_string(),
        dedup_key,
        event_id,
        openid,
        out_trade_no,
        env,
        message,
    })
}

#[cfg(test)]
pub(crate) mod tests;
