//! `POST /wxa/game/queryorderinfo` (virtual payment 2.0): an order's state, answered
//! from the push ledger ([`super::push`]) — the orders the simulator sold and pushed.
//!
//! Checked like the other 2.0 calls: access token, `sig_method`, a body with exactly
//! `openid`, `offer_id`, `ts`, `zone_id`, `env`, `out_trade_no`, `biz_id` (90018),
//! `pay_sig` with the AppKey of `env` (90011), `signature` with the player's
//! registered session_key (90010); the same faults as a getbalance (-1, 502,
//! stalls). An order the ledger does not hold for that player and kind is 90019.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::faults::{run, Call};
use super::push::PurchaseKind;
use super::tokens::SessionCheck;
use super::verify::{param_error, required_int, required_str, Op, Reject};
use super::{err_json, respond, Outcome, QueryMap, Route, Shared};
use crate::midas::errcode;
use crate::midas::sign::sig_eq;
use crate::midas::v2::sign as v2sign;

const PATH: &str = "/wxa/game/queryorderinfo";
const FIELDS: [&str; 7] = [
    "openid",
    "offer_id",
    "ts",
    "zone_id",
    "env",
    "out_trade_no",
    "biz_id",
];

struct Asked {
    openid: String,
    env: i64,
    out_trade_no: String,
    biz_id: i64,
}

fn parse(body: &[u8]) -> Result<Asked, Reject> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| param_error("body is not valid JSON"))?;
    let Value::Object(m) = value else {
        return Err(param_error("body is not a JSON object"));
    };
    if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(param_error(format!("unexpected field {k}")));
    }
    let m: &Map<String, Value> = &m;
    let openid = required_str(m, "openid")?.to_string();
    required_str(m, "offer_id")?;
    required_int(m, "ts")?;
    required_str(m, "zone_id")?;
    let env = required_int(m, "env")?;
    if env != 0 && env != 1 {
        return Err(param_error("env must be 0 or 1"));
    }
    let out_trade_no = required_str(m, "out_trade_no")?.to_string();
    let biz_id = required_int(m, "biz_id")?;
    if biz_id != 1 && biz_id != 2 {
        return Err(param_error("biz_id must be 1 or 2"));
    }
    Ok(Asked {
        openid,
        env,
        out_trade_no,
        biz_id,
    })
}

pub(super) async fn query_order_info(
    State(shared): State<Arc<Shared>>,
    query: QueryMap,
    body: Bytes,
) -> Response {
    let outcome = answer(&shared, query.map(|q| q.0).unwrap_or_default(), &body);
    respond(outcome).await
}

fn answer(shared: &Shared, query: HashMap<String, String>, body: &[u8]) -> Outcome {
    let refuse = |r: Reject| Outcome::Answer(err_json(r.errcode, &r.errmsg));
    let pusher = shared.pusher();
    let mut st = shared.lock();
    *st.calls.entry("v2_queryorderinfo".into()).or_insert(0) += 1;
    let token = query.get("access_token").map(String::as_str);
    let appid = match st.tokens.check(token, Instant::now()) {
        Ok(a) => a.to_string(),
        Err((code, msg)) => return refuse(Reject::new(code, msg)),
    };
    if query.get("sig_method").map(String::as_str) != Some("hmac_sha256") {
        return refuse(param_error("sig_method must be hmac_sha256"));
    }
    let asked = match parse(body) {
        Ok(a) => a,
        Err(r) => return refuse(r),
    };
    let Some(app) = shared.apps.get(&appid) else {
        return refuse(param_error("unknown app"));
    };
    let key = if asked.env == 1 {
        &app.sandbox_key
    } else {
        &app.app_key
    };
    let pay_sig = query.get("pay_sig").map(String::as_str).unwrap_or("");
    if !sig_eq(&v2sign::pay_sig(key.expose(), PATH, body), pay_sig) {
        return refuse(Reject::new(errcode::SIG_WRONG, "pay_sig wrong"));
    }
    let signature = query.get("signature").map(String::as_str).unwrap_or("");
    let verifies = |k: &str| sig_eq(&v2sign::signature(k, body), signature);
    let session_key = match st.sessions.check(&asked.openid, verifies) {
        SessionCheck::Unknown => None,
        SessionCheck::Current => st.sessions.current(&asked.openid).map(str::to_string),
        SessionCheck::Expired | SessionCheck::Wrong => {
            return refuse(Reject::new(errcode::SESSION_EXPIRED, "signature wrong"))
        }
    };
    let order = pusher
        .as_ref()
        .and_then(|p| p.order(&appid, &asked.out_trade_no))
        .filter(|o| {
            let kind = if asked.biz_id == 1 {
                PurchaseKind::Coins
            } else {
                PurchaseKind::Goods
            };
            o.openid == asked.openid && o.kind == kind
        });
    let token = token.unwrap_or_default().to_string();
    let call = Call {
        route: Route::V2,
        // faults as for a getbalance: a read that moves nothing
        op: Op::GetBalance,
        token: &token,
        appid: &appid,
        openid: &asked.openid,
        bill_no: None,
        session_key,
    };
    run(&mut st, call, |_| match &order {
        None => err_json(errcode::OUT_TRADE_NO_NOT_FOUND, "out_trade_no not found"),
        Some(o) => json!({
            "errcode": 0, "errmsg": "ok",
            "out_trade_no": o.out_trade_no,
            "product_id": o.product_id,
            "pay_state": 2,
            "deliver_state": if o.delivered_at.is_some() { 2 } else { 1 },
            "pay_finish_time": o.pay_finish_time,
            "mch_order_no": o.mch_order_no,
            "transaction_id": o.transaction_id,
        }),
    })
}
