//! Reading a virtual payment 2.0 answer: the fields 2.0 sends (its own names) and
//! their classification with the 2.0 errcode table into the crate's [`Answer`].
//! Kept apart from building and sending the request (`client.rs`, which re-exports
//! [`parse_answer`]) because it is pure and tested on bytes alone.

use std::time::Instant;

use serde::Deserialize;

use crate::midas::answer::{Answer, Api, Body, OrderInfo};
use crate::midas::errcode::{self, MidasApi, OutcomeClass};

/// An answer's fields as 2.0 names them, each one optional.
#[derive(Deserialize)]
struct Wire {
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    balance: Option<i64>,
    #[serde(default)]
    present_balance: Option<i64>,
    #[serde(default)]
    sum_save: Option<i64>,
    #[serde(default)]
    sum_present: Option<i64>,
    #[serde(default)]
    sum_balance: Option<i64>,
    #[serde(default)]
    sum_cost: Option<i64>,
    #[serde(default)]
    first_save: Option<serde_json::Value>,
    #[serde(default)]
    used_present_amount: Option<i64>,
    #[serde(default)]
    bill_no: Option<String>,
    // queryorderinfo
    #[serde(default)]
    pay_state: Option<i64>,
    #[serde(default)]
    deliver_state: Option<i64>,
    #[serde(default)]
    pay_finish_time: Option<i64>,
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    out_trade_no: Option<String>,
    #[serde(default)]
    mch_order_no: Option<String>,
    #[serde(default)]
    transaction_id: Option<String>,
}

/// An answer whose outcome is unknown (transient), `why` in its errmsg: nothing
/// usable came back.
pub(super) fn unknown(api: Api, http_status: Option<u16>, why: String, started: Instant) -> Answer {
    Answer {
        api,
        class: OutcomeClass::Transient,
        http_status,
        errcode: None,
        errmsg: Some(why),
        body: Body::default(),
        latency: started.elapsed(),
    }
}

/// Classify an answer's bytes with the 2.0 table. Not JSON, or JSON without
/// `errcode`: the outcome is unknown (transient). A code outside the 2.0 table is
/// definitive and logged.
pub fn parse_answer(api: Api, status: u16, bytes: &[u8], started: Instant) -> Answer {
    let Ok(wire) = serde_json::from_slice::<Wire>(bytes) else {
        let mut a = unknown(
            api,
            Some(status),
            format!("HTTP {status}: not a Midas answer"),
            started,
        );
        a.class = errcode::classify_http(status);
        return a;
    };
    let Some(code) = wire.errcode else {
        return unknown(
            api,
            Some(status),
            format!("HTTP {status}: no errcode"),
            started,
        );
    };
    if !errcode::is_listed(MidasApi::V2, code) {
        tracing::warn!(
            api = api.name(),
            errcode = code,
            errmsg = wire.errmsg.as_deref().unwrap_or(""),
            "virtual payment 2.0 answered an errcode not in the table; treated as definitive"
        );
    }
    Answer {
        api,
        class: errcode::classify_for(MidasApi::V2, code),
        http_status: Some(status),
        errcode: Some(code),
        errmsg: wire.errmsg,
        body: Body {
            balance: wire.balance,
            first_save: wire.first_save.and_then(|v| match v {
                serde_json::Value::Bool(b) => Some(i64::from(b)),
                serde_json::Value::Number(n) => n.as_i64(),
                _ => None,
            }),
            present_balance: wire.present_balance,
            sum_save: wire.sum_save,
            sum_present: wire.sum_present,
            sum_balance: wire.sum_balance,
            sum_cost: wire.sum_cost,
            used_present_amount: wire.used_present_amount,
            bill_no: wire.bill_no,
            order: (api == Api::QueryOrder).then_some(OrderInfo {
                pay_state: wire.pay_state,
                deliver_state: wire.deliver_state,
                pay_finish_time: wire.pay_finish_time,
                product_id: wire.product_id,
                out_trade_no: wire.out_trade_no,
                mch_order_no: wire.mch_order_no,
                transaction_id: wire.transaction_id,
            }),
            ..Body::default()
        },
        latency: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_use_the_2_0_names_and_table() {
        let t = Instant::now();
        let a = parse_answer(
            Api::GetBalance,
            200,
            br#"{"errcode":0,"errmsg":"ok","balance":7,"present_balance":2,"sum_save":10,"sum_present":3,"sum_balance":11,"sum_cost":4,"first_save":true}"#,
            t,
        );
        assert_eq!(a.class, OutcomeClass::Success);
        let b = &a.body;
        assert_eq!(
            (b.balance, b.present_balance, b.sum_save, b.sum_present),
            (Some(7), Some(2), Some(10), Some(3))
        );
        assert_eq!(
            (b.sum_balance, b.sum_cost, b.first_save),
            (Some(11), Some(4), Some(1))
        );
        assert_eq!(b.gen_balance, None, "1.0 names stay empty");
        let a = parse_answer(
            Api::Pay,
            200,
            br#"{"errcode":0,"errmsg":"ok","bill_no":"B","balance":5,"used_present_amount":2}"#,
            t,
        );
        assert_eq!(
            (a.body.bill_no.as_deref(), a.body.used_present_amount),
            (Some("B"), Some(2))
        );
        let code = |s: &str| parse_answer(Api::Pay, 200, s.as_bytes(), t).class;
        assert_eq!(code(r#"{"errcode":90012}"#), OutcomeClass::Duplicate);
        assert_eq!(code(r#"{"errcode":-1}"#), OutcomeClass::Transient);
        assert_eq!(code(r#"{"errcode":90077}"#), OutcomeClass::Definitive);
        assert_eq!(code(r#"{"errcode":42001}"#), OutcomeClass::TokenInvalid);
        assert_eq!(code("<html>"), OutcomeClass::Transient);
        assert_eq!(code(r#"{"errmsg":"?"}"#), OutcomeClass::Transient);
    }
}
