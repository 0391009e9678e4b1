//! The wire contract with game servers (`docs/contract.md`, "Messages"):
//! decoding and validating commands, and the reply they get.
//!
//! Decoding never panics and never trusts the input: any byte string yields either
//! a [`Command`] or a [`Rejection`] that carries whatever could still be read
//! (op, bill_no, openid, appid) so the game server gets a `rejected` reply. Memory stays
//! bounded by the body: a body over `broker.max_command_bytes` is refused unread
//! ([`check_size`]), a body that does not decode is salvaged by a typed reader that
//! skips everything but four capped strings (never a `serde_json::Value`), and
//! every message text is cut to [`MAX_MESSAGE_CHARS`].
//!
//! Split by seam: this file holds the command's types ([`Op`], [`Params`],
//! [`Command`], [`Rejection`]), the shared bounds and the clock helpers; `decode`
//! turns a body into a command or a rejection; `reply` is what goes back.

mod decode;
mod reply;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

pub use decode::{check_size, decode, is_hidden_char, valid_bill_no};
pub use reply::{FirstSave, Reply, Status};

/// The largest amount Midas accepts.
pub const MAX_AMOUNT: i64 = 2_147_483_647;
/// Upper bound for free-text fields (openid, pay_item, ...): larger is certainly not a
/// real value and would only bloat the outbox.
pub const MAX_TEXT: usize = 512;
/// Longest message text (`errmsg` of a `rejected` reply, log reasons), in characters:
/// a hostile value quoted by the JSON parser is cut here, never echoed whole.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// `s` cut to at most `max` characters on a char boundary, with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => {
            let keep = s
                .char_indices()
                .nth(max.saturating_sub(1))
                .map_or(end, |(i, _)| i);
            let mut out = String::with_capacity(keep + 3);
            out.push_str(&s[..keep]);
            out.push('…');
            out
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Pay,
    Present,
    CancelPay,
    Balance,
    /// 2.0 apps: an order's state from `/wxa/game/queryorderinfo`, answered like `balance`.
    QueryOrder,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Pay => "pay",
            Op::Present => "present",
            Op::CancelPay => "cancel_pay",
            Op::Balance => "balance",
            Op::QueryOrder => "query_order",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "pay" => Some(Op::Pay),
            "present" => Some(Op::Present),
            "cancel_pay" => Some(Op::CancelPay),
            "balance" => Some(Op::Balance),
            "query_order" => Some(Op::QueryOrder),
            _ => None,
        }
    }

    pub const ALL: [Op; 5] = [
        Op::Pay,
        Op::Present,
        Op::CancelPay,
        Op::Balance,
        Op::QueryOrder,
    ];

    /// Answered from Midas without an outbox row (`balance`, `query_order`).
    pub fn is_read(self) -> bool {
        matches!(self, Op::Balance | Op::QueryOrder)
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parameters that identify what a job does: everything but the session_key.
/// Two commands with the same key (op, bill_no) must have equal `Params` to join.
/// Field order is fixed, so the JSON form is canonical and stored in the outbox.
/// Optional fields are left out when empty, so a field added later (`pay_bill_no`)
/// leaves the stored form of older jobs unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub op: Op,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bill_no: Option<String>,
    /// A v2 cancel_pay (a refund): the bill_no of the pay being refunded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pay_bill_no: Option<String>,
    pub openid: String,
    pub appid: String,
    pub zone_id: String,
    pub pf: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub amt: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub present_counts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pay_item: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_remark: Option<String>,
    /// `query_order` (2.0 apps): the order asked about.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub query: Option<Box<OrderQuery>>,
}

/// The order a `query_order` command asks about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderQuery {
    /// The order number the client used (`OutTradeNo` in the pushes).
    pub out_trade_no: String,
    /// 1: a coin top-up, 2: an item purchase.
    pub biz_id: i64,
}

impl Params {
    /// Canonical JSON (what the outbox stores and compares).
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A valid command.
#[derive(Debug, Clone)]
pub struct Command {
    pub params: Params,
    pub session_key: Option<Secret>,
}

/// Why a command was refused, and what of it could still be read for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable machine code: `invalid_command`, `unknown_app`, `bill_no_conflict`.
    pub code: &'static str,
    pub message: String,
    pub op: Option<String>,
    pub bill_no: Option<String>,
    pub openid: Option<String>,
    pub appid: Option<String>,
}

impl Rejection {
    fn new(code: &'static str, message: impl AsRef<str>) -> Self {
        Rejection {
            code,
            message: clip(message.as_ref(), MAX_MESSAGE_CHARS),
            op: None,
            bill_no: None,
            openid: None,
            appid: None,
        }
    }

    /// A refusal of a command that decoded (e.g. `reply_to_not_allowed`): the reply
    /// still names its op, bill_no, openid and appid.
    pub fn of_command(code: &'static str, message: impl AsRef<str>, cmd: &Command) -> Self {
        let p = &cmd.params;
        Rejection {
            op: Some(p.op.as_str().to_string()),
            bill_no: p.bill_no.clone(),
            openid: Some(p.openid.clone()),
            appid: Some(p.appid.clone()),
            ..Rejection::new(code, message)
        }
    }
}

/// RFC 3339 UTC with millisecond precision, from unix milliseconds.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Current unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
