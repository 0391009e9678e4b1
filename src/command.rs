//! The wire contract with game servers (`docs/contract.md`, "Messages"):
//! decoding and validating commands, and the reply they get.
//!
//! Decoding never panics and never trusts the input: any byte string yields either
//! a [`Command`] or a [`Rejection`] that carries whatever could still be read
//! (op, bill_no, openid) so the game server gets a `rejected` reply. Memory stays
//! bounded by the body: a body over `broker.max_command_bytes` is refused unread
//! ([`check_size`]), a body that does not decode is salvaged by a typed reader that
//! skips everything but three capped strings (never a `serde_json::Value`), and
//! every message text is cut to [`MAX_MESSAGE_CHARS`].

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::{ApiVersion, App, Settings};
use crate::secret::Secret;

/// The largest amount Midas accepts.
pub const MAX_AMOUNT: i64 = 2_147_483_647;
/// Upper bound for free-text fields (openid, pay_item, ...): larger is certainly not a
/// real value and would only bloat the outbox.
pub const MAX_TEXT: usize = 512;
/// Longest message text (`errmsg` of a `rejected` reply, log reasons), in characters:
/// a hostile value quoted by the JSON parser is cut here, never echoed whole.
pub const MAX_MESSAGE_CHARS: usize = 200;
/// Salvaged op/openid/appid are cut to this many characters.
const SALVAGE_CHARS: usize = 64;

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

/// The command as published, before validation. Unknown fields are an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    op: String,
    #[serde(default)]
    bill_no: Option<String>,
    #[serde(default)]
    pay_bill_no: Option<String>,
    #[serde(default)]
    openid: Option<String>,
    #[serde(default)]
    session_key: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    zone_id: Option<String>,
    #[serde(default)]
    pf: Option<String>,
    #[serde(default)]
    user_ip: Option<String>,
    #[serde(default)]
    amt: Option<i64>,
    #[serde(default)]
    present_counts: Option<i64>,
    #[serde(default)]
    pay_item: Option<String>,
    #[serde(default)]
    app_remark: Option<String>,
    #[serde(default)]
    out_trade_no: Option<String>,
    #[serde(default)]
    biz_id: Option<i64>,
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

/// Refuse a body longer than `max` bytes before anything parses it: it is
/// `invalid_command` and nothing of it is read (not even the bill_no).
pub fn check_size(body: &[u8], max: usize) -> Result<(), Box<Rejection>> {
    if body.len() > max {
        return Err(Box::new(Rejection::new(
            "invalid_command",
            format!(
                "command is {} bytes; the limit is {max} (broker.max_command_bytes)",
                body.len()
            ),
        )));
    }
    Ok(())
}

/// A bill_no is 1–63 chars of `[A-Za-z0-9_-]`.
pub fn valid_bill_no(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decode and validate one message body.
pub fn decode(body: &[u8], settings: &Settings) -> Result<Command, Box<Rejection>> {
    // A derived struct would also read a JSON array positionally: a command is an object.
    if !is_object(body) {
        return Err(Box::new(Rejection::new(
            "invalid_command",
            "bad command: expected a JSON object",
        )));
    }
    let wire: Wire = match serde_json::from_slice(body) {
        Ok(w) => w,
        Err(e) => {
            let mut r = Rejection::new("invalid_command", format!("bad command: {e}"));
            salvage(body, &mut r);
            return Err(Box::new(r));
        }
    };
    let mut r = Rejection::new("invalid_command", "");
    r.op = Some(truncate(&wire.op));
    r.bill_no = wire.bill_no.clone().filter(|b| valid_bill_no(b));
    r.openid = wire.openid.as_deref().map(truncate);
    r.appid = wire.appid.as_deref().map(truncate);
    validate(wire, settings).map_err(|(code, message)| {
        r.code = code;
        r.message = clip(&message, MAX_MESSAGE_CHARS);
        Box::new(r)
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(SALVAGE_CHARS).collect()
}

/// Whether the first byte after JSON whitespace opens an object.
fn is_object(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        == Some(&b'{')
}

/// What [`salvage`] reads of a body that did not decode: four strings, each cut to
/// [`SALVAGE_CHARS`]; any other field, and a field of another type, is skipped
/// without being kept (`IgnoredAny`).
#[derive(Deserialize)]
struct Salvaged {
    #[serde(default, deserialize_with = "capped")]
    op: Option<String>,
    #[serde(default, deserialize_with = "capped")]
    bill_no: Option<String>,
    #[serde(default, deserialize_with = "capped")]
    openid: Option<String>,
    #[serde(default, deserialize_with = "capped")]
    appid: Option<String>,
}

/// A string (cut to [`SALVAGE_CHARS`]) or, for any other JSON value, `None`.
fn capped<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Capped;
    impl<'de> Visitor<'de> for Capped {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(truncate(v)))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(Capped)
}

/// Read what can be read from a body that did not decode, for the rejected reply.
/// Memory: the four capped strings and serde_json's scratch buffer for the string
/// being read (never more than the body).
fn salvage(body: &[u8], r: &mut Rejection) {
    let Ok(s) = serde_json::from_slice::<Salvaged>(body) else {
        return;
    };
    r.op = s.op;
    r.bill_no = s.bill_no.filter(|b| valid_bill_no(b));
    r.openid = s.openid;
    r.appid = s.appid;
}

/// Characters no text field may hold: control characters (C0, DEL, C1), and the
/// invisible and bidirectional formatting characters that make a value print as
/// something else (U+200B–U+200F, U+202A–U+202E, U+2066–U+2069, the line and
/// paragraph separators U+2028/U+2029, U+FEFF, U+061C, U+180E).
pub fn is_hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{FEFF}'
                | '\u{061C}'
                | '\u{180E}'
        )
}

fn text_field(
    name: &str,
    v: Option<String>,
    required: bool,
) -> Result<Option<String>, (&'static str, String)> {
    match v {
        None if required => Err(("invalid_command", format!("missing field `{name}`"))),
        None => Ok(None),
        Some(s) if s.is_empty() => Err(("invalid_command", format!("`{name}` is empty"))),
        Some(s) if s.len() > MAX_TEXT => Err((
            "invalid_command",
            format!("`{name}` is longer than {MAX_TEXT} bytes"),
        )),
        Some(s) if s.chars().any(is_hidden_char) => Err((
            "invalid_command",
            format!("`{name}` contains control, invisible or bidirectional characters"),
        )),
        Some(s) => Ok(Some(s)),
    }
}

fn amount(name: &str, v: Option<i64>, needed: bool) -> Result<Option<i64>, (&'static str, String)> {
    match (v, needed) {
        (None, true) => Err(("invalid_command", format!("missing field `{name}`"))),
        (Some(_), false) => Err((
            "invalid_command",
            format!("`{name}` is not allowed for this op"),
        )),
        (Some(n), true) if !(1..=MAX_AMOUNT).contains(&n) => Err((
            "invalid_command",
            format!("`{name}` must be an integer in 1..=2147483647"),
        )),
        (v, _) => Ok(v),
    }
}

fn validate(w: Wire, settings: &Settings) -> Result<Command, (&'static str, String)> {
    let op = Op::parse(&w.op).ok_or((
        "invalid_command",
        "unknown op: expected pay, present, cancel_pay, balance or query_order".to_string(),
    ))?;
    let bill_no = match (op, w.bill_no) {
        (o, Some(_)) if o.is_read() => {
            return Err((
                "invalid_command",
                format!("`bill_no` is not allowed for {o}"),
            ))
        }
        (o, None) if o.is_read() => None,
        (_, None) => return Err(("invalid_command", "missing field `bill_no`".into())),
        (_, Some(b)) if !valid_bill_no(&b) => {
            return Err((
                "invalid_command",
                "`bill_no` must be 1-63 characters of [A-Za-z0-9_-]".into(),
            ))
        }
        (_, Some(b)) => Some(b),
    };
    let openid = text_field("openid", w.openid, true)?.unwrap_or_default();
    let session_key = text_field("session_key", w.session_key, false)?.map(Secret::new);
    let app = match w.appid {
        Some(id) => settings
            .app(&id)
            .ok_or(("unknown_app", "`appid` names no configured app".to_string()))?,
        None if settings.apps.len() == 1 => &settings.apps[0],
        None => {
            return Err((
                "invalid_command",
                "`appid` is required when several apps are configured".into(),
            ))
        }
    };
    let v2 = app.api == ApiVersion::V2;
    let query = order_query(op, v2, w.out_trade_no, w.biz_id)?;
    let zone_id = text_field("zone_id", w.zone_id, false)?.unwrap_or_else(|| app.zone_id.clone());
    let pf = text_field("pf", w.pf, false)?.unwrap_or_else(|| app.pf.clone());
    let user_ip = text_field("user_ip", w.user_ip, false)?;
    if user_ip
        .as_deref()
        .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_err())
    {
        return Err((
            "invalid_command",
            "`user_ip` must be an IPv4 or IPv6 address".into(),
        ));
    }
    let no_ip = Some(String::new());
    let pay_bill_no = if v2 {
        check_v2(
            op,
            bill_no.as_deref(),
            w.pay_bill_no,
            &session_key,
            // queryorderinfo takes no user_ip
            if op == Op::QueryOrder {
                &no_ip
            } else {
                &user_ip
            },
            app,
        )?
    } else if w.pay_bill_no.is_some() {
        return Err((
            "invalid_command",
            "`pay_bill_no` is only allowed for cancel_pay on apps with api = \"v2\"".into(),
        ));
    } else {
        None
    };
    let refund = v2 && op == Op::CancelPay;
    let amt = amount("amt", w.amt, op == Op::Pay || refund)?;
    let present_counts = amount("present_counts", w.present_counts, op == Op::Present)?;
    let pay_item = text_field("pay_item", w.pay_item, false)?;
    let app_remark = text_field("app_remark", w.app_remark, false)?;
    // pay_item is also a cancelpay field in Midas 1.0 (docs/midas-v1.md); app_remark is pay-only.
    if pay_item.is_some() && !matches!(op, Op::Pay | Op::CancelPay) {
        return Err((
            "invalid_command",
            "`pay_item` is only allowed for pay and cancel_pay".into(),
        ));
    }
    if pay_item.is_some() && refund {
        return Err((
            "invalid_command",
            "`pay_item` is not allowed for cancel_pay on apps with api = \"v2\"".into(),
        ));
    }
    if app_remark.is_some() && op != Op::Pay {
        return Err((
            "invalid_command",
            "`app_remark` is only allowed for pay".into(),
        ));
    }
    Ok(Command {
        params: Params {
            op,
            bill_no,
            pay_bill_no,
            openid,
            appid: app.appid.clone(),
            zone_id,
            pf,
            user_ip,
            amt,
            present_counts,
            pay_item,
            app_remark,
            query,
        },
        session_key,
    })
}

/// The rules only virtual payment 2.0 apps have (`docs/contract.md`, "Commands"):
/// a session_key on every command (2.0 signs every call with it), a `user_ip` from
/// the command or the app's `default_user_ip`, no bill_no starting with `_`, and a
/// cancel_pay is a refund naming its pay (`pay_bill_no`). Returns the `pay_bill_no`.
/// `out_trade_no` and `biz_id`: required for `query_order` (on 2.0 apps only),
/// refused on every other op.
fn order_query(
    op: Op,
    v2: bool,
    out_trade_no: Option<String>,
    biz_id: Option<i64>,
) -> Result<Option<Box<OrderQuery>>, (&'static str, String)> {
    let bad = |m: &str| Err(("invalid_command", m.to_string()));
    if op != Op::QueryOrder {
        if out_trade_no.is_some() || biz_id.is_some() {
            return bad("`out_trade_no` and `biz_id` are only allowed for query_order");
        }
        return Ok(None);
    }
    if !v2 {
        return bad("query_order is for apps with api = \"v2\"");
    }
    let Some(no) = text_field("out_trade_no", out_trade_no, true)? else {
        return bad("missing field `out_trade_no`");
    };
    if no.len() > 64 {
        return bad("`out_trade_no` is longer than 64 bytes");
    }
    match biz_id {
        None => bad("missing field `biz_id`: 1 (coins) or 2 (items)"),
        Some(b @ (1 | 2)) => Ok(Some(Box::new(OrderQuery {
            out_trade_no: no,
            biz_id: b,
        }))),
        Some(_) => bad("`biz_id` must be 1 (coins) or 2 (items)"),
    }
}

fn check_v2(
    op: Op,
    bill_no: Option<&str>,
    pay_bill_no: Option<String>,
    session_key: &Option<Secret>,
    user_ip: &Option<String>,
    app: &App,
) -> Result<Option<String>, (&'static str, String)> {
    let bad = |m: &str| Err(("invalid_command", m.to_string()));
    if session_key.is_none() {
        return bad("missing field `session_key`: apps with api = \"v2\" sign every call with it");
    }
    if user_ip.is_none() && app.default_user_ip.is_none() {
        return bad("missing field `user_ip`: required for apps with api = \"v2\" unless the app sets default_user_ip");
    }
    if bill_no.is_some_and(|b| b.starts_with('_')) {
        return bad("`bill_no` must not start with `_` for apps with api = \"v2\"");
    }
    match (op, pay_bill_no) {
        (Op::CancelPay, None) => {
            bad("missing field `pay_bill_no`: a cancel_pay on an app with api = \"v2\" is a refund of that pay")
        }
        (Op::CancelPay, Some(p)) if !valid_bill_no(&p) || p.starts_with('_') => {
            bad("`pay_bill_no` must be 1-63 characters of [A-Za-z0-9_-], not starting with `_`")
        }
        (Op::CancelPay, Some(p)) if Some(p.as_str()) == bill_no => {
            bad("`pay_bill_no` names the refund itself: a refund needs its own `bill_no`")
        }
        (Op::CancelPay, Some(p)) => Ok(Some(p)),
        (_, Some(_)) => bad("`pay_bill_no` is only allowed for cancel_pay"),
        (_, None) => Ok(None),
    }
}

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
