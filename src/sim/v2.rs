//! The simulator's virtual payment 2.0 endpoints (`/wxa/game/*`), next to the 1.0
//! ones and sharing their tokens, sessions, faults and ledger.
//!
//! Checks in this order: access token (41001/40001/42001); `sig_method` and the body
//! (90018: a JSON object with exactly the 2.0 fields of the operation, `user_ip`
//! required, `env` 0 or 1, bill_no a JSON string of `[0-9A-Za-z_-]{1,63}` not
//! starting with `_`); `pay_sig` over `uri + "&" + the received bytes` with the AppKey
//! of `env` (90011); `signature` over the received bytes with the openid's registered
//! session_key (90010; not checked while none is registered). Verification is over
//! the raw bytes received, never over a re-serialization, so a client that signs one
//! serialization and sends another is refused.
//!
//! An over-refund (refunds of a pay summing above it) answers 90018 with an errmsg
//! saying so: the 2.0 pages document no code for it, and 90018 is definitive in 2.0.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::ledger::{Ledger, Who};
use super::tokens::SessionCheck;
use super::verify::{self, param_error, required_int, required_str, Op, Reject};
use super::{check_token, err_json, log_refused, now_ms, run, Call, Outcome, Route, Shared};
use crate::midas::errcode;
use crate::midas::sign::sig_eq;
use crate::midas::v2::sign as v2sign;

/// A 2.0 body that passed the syntactic checks.
#[derive(Clone, Debug)]
struct Request {
    op: Op,
    openid: String,
    zone_id: String,
    /// 0 production, 1 sandbox.
    env: i64,
    bill_no: Option<String>,
    pay_bill_no: Option<String>,
    amount: Option<i64>,
}

const COMMON: &[&str] = &["openid", "offer_id", "ts", "zone_id", "env", "user_ip"];
/// 1.0 names a 2.0 body must not carry (a client mapping bug).
const V1_ONLY: &[&str] = &[
    "appid",
    "pf",
    "amt",
    "present_counts",
    "pay_item",
    "app_remark",
    "sig",
    "mp_sig",
];

fn extra_fields(op: Op) -> &'static [&'static str] {
    match op {
        Op::GetBalance => &[],
        Op::Pay => &["amount", "bill_no", "payitem", "remark"],
        Op::Present => &["amount", "bill_no"],
        Op::CancelPay => &["amount", "bill_no", "pay_bill_no"],
    }
}

fn bill_no_field(m: &Map<String, Value>, key: &str) -> Result<String, Reject> {
    let b = required_str(m, key)?;
    if !verify::valid_bill_no_v2(b) {
        return Err(param_error(format!(
            "{key} must match [0-9A-Za-z_-]{{1,63}} and not start with _"
        )));
    }
    Ok(b.to_string())
}

/// Parse and check a 2.0 body for `op`.
fn parse(op: Op, body: &[u8]) -> Result<Request, Reject> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| param_error("body is not valid JSON"))?;
    let Value::Object(m) = value else {
        return Err(param_error("body is not a JSON object"));
    };
    let extra = extra_fields(op);
    for k in m.keys() {
        if V1_ONLY.contains(&k.as_str()) {
            return Err(param_error(format!("{k} is a Midas 1.0 field")));
        }
        if !COMMON.contains(&k.as_str()) && !extra.contains(&k.as_str()) {
            return Err(param_error(format!("unexpected field {k}")));
        }
    }
    let openid = required_str(&m, "openid")?;
    required_str(&m, "offer_id")?;
    if required_int(&m, "ts")? < 0 {
        return Err(param_error("ts must not be negative"));
    }
    let zone_id = required_str(&m, "zone_id")?;
    let env = required_int(&m, "env")?;
    if env != 0 && env != 1 {
        return Err(param_error("env must be 0 or 1"));
    }
    required_str(&m, "user_ip")?;
    for optional in ["payitem", "remark"] {
        if m.contains_key(optional) {
            required_str(&m, optional)?;
        }
    }
    let (mut amount, mut bill_no, mut pay_bill_no) = (None, None, None);
    if op != Op::GetBalance {
        let n = required_int(&m, "amount")?;
        if n < 1 {
            return Err(param_error("amount must be at least 1"));
        }
        amount = Some(n);
        bill_no = Some(bill_no_field(&m, "bill_no")?);
    }
    if op == Op::CancelPay {
        pay_bill_no = Some(bill_no_field(&m, "pay_bill_no")?);
    }
    Ok(Request {
        op,
        openid: openid.to_string(),
        zone_id: zone_id.to_string(),
        env,
        bill_no,
        pay_bill_no,
        amount,
    })
}

/// Body, `pay_sig`, `signature`; the request and the session_key it verified with
/// (when registered).
fn authenticate(
    shared: &Shared,
    st_sessions: &super::tokens::Sessions,
    op: Op,
    uri: &str,
    token_appid: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<(Request, Option<String>), Reject> {
    if query.get("sig_method").map(String::as_str) != Some("hmac_sha256") {
        return Err(param_error("sig_method must be hmac_sha256"));
    }
    let req = parse(op, body)?;
    let Some(app) = shared.apps.get(token_appid) else {
        return Err(param_error("unknown app"));
    };
    let key = if req.env == 1 {
        &app.sandbox_key
    } else {
        &app.app_key
    };
    let Some(pay_sig) = query.get("pay_sig").filter(|s| !s.is_empty()) else {
        return Err(Reject::new(errcode::SIG_WRONG, "pay_sig missing"));
    };
    if !sig_eq(&v2sign::pay_sig(key.expose(), uri, body), pay_sig) {
        return Err(Reject::new(errcode::SIG_WRONG, "pay_sig wrong"));
    }
    let Some(signature) = query.get("signature").filter(|s| !s.is_empty()) else {
        return Err(Reject::new(errcode::SESSION_EXPIRED, "signature missing"));
    };
    let verifies = |k: &str| sig_eq(&v2sign::signature(k, body), signature);
    let session_key = match st_sessions.check(&req.openid, verifies) {
        SessionCheck::Unknown => None,
        SessionCheck::Current => st_sessions.current(&req.openid).map(str::to_string),
        SessionCheck::Expired | SessionCheck::Wrong => {
            return Err(Reject::new(errcode::SESSION_EXPIRED, "signature wrong"))
        }
    };
    Ok((req, session_key))
}

/// A 2.0 call: everything between the request and the answer that needs the lock.
pub(super) fn process(
    shared: &Shared,
    op: Op,
    uri: &str,
    token: Option<&str>,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Outcome {
    let route = Route::V2;
    let mut st = shared.lock();
    let token_appid = match check_token(&st, route, op, token) {
        Ok(a) => a,
        Err(o) => return o,
    };
    let (req, session_key) =
        match authenticate(shared, &st.sessions, op, uri, &token_appid, query, body) {
            Ok(r) => r,
            Err(r) => {
                log_refused(route, op, &r, &token_appid);
                return Outcome::Answer(err_json(r.errcode, &r.errmsg));
            }
        };
    let call = Call {
        route,
        op,
        token: token.unwrap_or_default(),
        appid: &token_appid,
        openid: &req.openid,
        bill_no: req.bill_no.as_deref(),
        session_key,
    };
    run(&mut st, call, |ledger| apply(ledger, &token_appid, &req))
}

/// Apply a checked 2.0 request; the JSON answer with the 2.0 field names.
fn apply(ledger: &mut Ledger, appid: &str, req: &Request) -> Value {
    let who = Who {
        appid,
        openid: &req.openid,
        zone_id: &req.zone_id,
    };
    let bill_no = req.bill_no.clone().unwrap_or_default();
    let amount = req.amount.unwrap_or(0);
    let result = match req.op {
        Op::GetBalance => {
            let a = ledger.balance(appid, &req.openid);
            Ok(json!({
                "errcode": 0, "errmsg": "ok",
                "balance": a.balance, "present_balance": a.gen_balance,
                "sum_save": a.save_amt, "sum_present": a.present_sum,
                "sum_balance": a.save_sum, "sum_cost": a.cost_sum,
                "first_save": a.first_save,
            }))
        }
        Op::Pay => ledger.pay_v2(&who, &bill_no, amount, now_ms()).map(|p| {
            json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no,
                   "balance": p.balance, "used_present_amount": p.used_gen_amt})
        }),
        Op::Present => ledger
            .present_v2(&who, &bill_no, amount, now_ms())
            .map(|b| json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no, "balance": b})),
        Op::CancelPay => {
            let pay_bill_no = req.pay_bill_no.as_deref().unwrap_or_default();
            ledger
                .refund_v2(&who, &bill_no, pay_bill_no, amount, now_ms())
                .map(|()| json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no}))
        }
    };
    result.unwrap_or_else(|e| err_json(e.errcode(), e.errmsg()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(op: Op, body: &str) -> i64 {
        parse(op, body.as_bytes()).map_or_else(|r| r.errcode, |_| 0)
    }

    #[test]
    fn bodies() {
        let base =
            r#""openid":"o","offer_id":"1","ts":1,"zone_id":"1","env":0,"user_ip":"1.2.3.4""#;
        assert_eq!(code(Op::GetBalance, &format!("{{{base}}}")), 0);
        assert_eq!(
            code(
                Op::Pay,
                &format!(r#"{{{base},"amount":5,"bill_no":"b","payitem":"x"}}"#)
            ),
            0
        );
        assert_eq!(
            code(
                Op::CancelPay,
                &format!(r#"{{{base},"amount":5,"bill_no":"r","pay_bill_no":"b"}}"#)
            ),
            0
        );
        for bad in [
            r#","amount":5,"bill_no":"_b""#,
            r#","amount":5,"bill_no":12"#,
            r#","amount":0,"bill_no":"b""#,
            r#","amount":5"#,
            r#","amount":5,"bill_no":"b","appid":"wx""#,
            r#","amount":5,"bill_no":"b","pay_bill_no":"c""#,
            r#","amt":5,"bill_no":"b""#,
        ] {
            assert_eq!(code(Op::Pay, &format!("{{{base}{bad}}}")), 90018, "{bad}");
        }
        let no_ip = r#"{"openid":"o","offer_id":"1","ts":1,"zone_id":"1","env":0}"#;
        assert_eq!(code(Op::GetBalance, no_ip), 90018);
        let env2 = base.replace(r#""env":0"#, r#""env":2"#);
        assert_eq!(code(Op::GetBalance, &format!("{{{env2}}}")), 90018);
    }
}
