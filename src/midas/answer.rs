//! What a Midas call produces, for 1.0 and 2.0 alike: the endpoint called ([`Api`]),
//! the answer's fields ([`Body`], [`OrderInfo`]) and the typed outcome ([`Answer`]).
//! A leaf both clients and the dispatcher build on, so neither client imports the
//! other for its vocabulary.

use std::time::{Duration, Instant};

use super::errcode::OutcomeClass;

/// A Midas endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    GetBalance,
    Pay,
    Present,
    CancelPay,
    /// 2.0 only: `/wxa/game/queryorderinfo` (`query_order`).
    QueryOrder,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::GetBalance => "getbalance",
            Api::Pay => "pay",
            Api::Present => "present",
            Api::CancelPay => "cancelpay",
            Api::QueryOrder => "queryorderinfo",
        }
    }

    /// The path called, which is also the `org_loc` signed.
    pub fn path(self, sandbox: bool) -> &'static str {
        match (self, sandbox) {
            (Api::GetBalance, false) => "/cgi-bin/midas/getbalance",
            (Api::Pay, false) => "/cgi-bin/midas/pay",
            (Api::Present, false) => "/cgi-bin/midas/present",
            (Api::CancelPay, false) => "/cgi-bin/midas/cancelpay",
            (Api::GetBalance, true) => "/cgi-bin/midas/sandbox/getbalance",
            (Api::Pay, true) => "/cgi-bin/midas/sandbox/pay",
            (Api::Present, true) => "/cgi-bin/midas/sandbox/present",
            (Api::CancelPay, true) => "/cgi-bin/midas/sandbox/cancelpay",
            // no 1.0 counterpart: commands refuse query_order on 1.0 apps
            (Api::QueryOrder, _) => "/wxa/game/queryorderinfo",
        }
    }

    pub fn for_op(op: crate::command::Op) -> Api {
        use crate::command::Op;
        match op {
            Op::Pay => Api::Pay,
            Op::Present => Api::Present,
            Op::CancelPay => Api::CancelPay,
            Op::Balance => Api::GetBalance,
            Op::QueryOrder => Api::QueryOrder,
        }
    }
}

/// The fields of a Midas answer beyond errcode/errmsg.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body {
    pub balance: Option<i64>,
    pub used_gen_amt: Option<i64>,
    pub gen_balance: Option<i64>,
    pub first_save: Option<i64>,
    pub save_amt: Option<i64>,
    pub save_sum: Option<i64>,
    pub cost_sum: Option<i64>,
    pub present_sum: Option<i64>,
    // Virtual payment 2.0 names (`midas::v2`); 1.0 answers leave them empty and
    // 2.0 answers leave the 1.0-only names empty (`first_save` is shared: 0/1).
    pub present_balance: Option<i64>,
    pub sum_save: Option<i64>,
    pub sum_present: Option<i64>,
    pub sum_balance: Option<i64>,
    pub sum_cost: Option<i64>,
    pub used_present_amount: Option<i64>,
    pub bill_no: Option<String>,
    /// `queryorderinfo` (2.0): the order's state.
    pub order: Option<OrderInfo>,
}

/// What `/wxa/game/queryorderinfo` says about an order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderInfo {
    /// 1 unpaid, 2 paid.
    pub pay_state: Option<i64>,
    /// 1 not delivered, 2 delivered.
    pub deliver_state: Option<i64>,
    /// Unix seconds.
    pub pay_finish_time: Option<i64>,
    pub product_id: Option<String>,
    pub out_trade_no: Option<String>,
    pub mch_order_no: Option<String>,
    pub transaction_id: Option<String>,
}

/// What one call produced.
#[derive(Debug, Clone)]
pub struct Answer {
    pub api: Api,
    pub class: OutcomeClass,
    pub http_status: Option<u16>,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub body: Body,
    pub latency: Duration,
}

impl Answer {
    pub(crate) fn transient(
        api: Api,
        http_status: Option<u16>,
        why: String,
        started: Instant,
    ) -> Answer {
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
}
