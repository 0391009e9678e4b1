//! The reply a command gets ([`Reply`], its [`Status`]) and its wire form. Kept
//! apart from decoding because replies are built and read well past it (the
//! engine, the outbox, the broker's publisher, the console), not only on refusal.

use serde::{Deserialize, Serialize};

use super::{clip, Rejection, MAX_MESSAGE_CHARS};

/// Reply statuses (docs/contract.md). `succeeded`, `failed` and `unknown` are also the
/// final states of a job; `rejected` never has a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Rejected,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Unknown => "unknown",
        }
    }
}

/// A balance reply's `first_save`: an integer (0/1) from Midas 1.0, a boolean from 2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FirstSave {
    Flag(bool),
    Number(i64),
}

/// The reply published for a command. Stored verbatim in the outbox once final, so a
/// repeated reply is byte-identical.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bill_no: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errcode: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errmsg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_gen_amt: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gen_balance: Option<i64>,
    /// 1.0: `0`/`1`; 2.0: a boolean (as each API names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_save: Option<FirstSave>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_amt: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_sum: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_sum: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub present_sum: Option<i64>,
    // Virtual payment 2.0 names (apps with api = "v2"), instead of the 1.0 ones above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_present_amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub present_balance: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum_save: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum_present: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum_balance: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum_cost: Option<i64>,
    // query_order (2.0): the order's state, as `/wxa/game/queryorderinfo` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_trade_no: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pay_state: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_state: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pay_finish_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mch_order_no: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    /// True when the reply came from the simulator: no real currency moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated: Option<bool>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl Reply {
    /// The `rejected` reply for an invalid or conflicting command.
    pub fn rejected(r: &Rejection, received_at: String) -> Reply {
        Reply {
            op: r.op.clone(),
            bill_no: r.bill_no.clone(),
            openid: r.openid.clone(),
            appid: r.appid.clone(),
            status: Some(Status::Rejected),
            error: Some(r.code.to_string()),
            errmsg: Some(clip(&r.message, MAX_MESSAGE_CHARS)),
            attempts: 0,
            finished_at: Some(received_at.clone()),
            received_at: Some(received_at),
            ..Reply::default()
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
