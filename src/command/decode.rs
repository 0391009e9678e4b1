//! Decoding and validating one command body: the typed reader ([`decode`]), the
//! salvage of what a body that does not decode still names (for its `rejected`
//! reply), and the per-field and per-op rules, including those only virtual
//! payment 2.0 apps have. Kept apart from the command's types (the parent module)
//! because it is the one place that reads untrusted input.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{
    clip, Command, Op, OrderQuery, Params, Rejection, MAX_AMOUNT, MAX_MESSAGE_CHARS, MAX_TEXT,
};
use crate::config::{ApiVersion, App, Settings};
use crate::secret::Secret;

/// Salvaged op/openid/appid are cut to this many characters.
const SALVAGE_CHARS: usize = 64;

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

/// The rules only virtual payment 2.0 apps have (`docs/contract.md`, "Commands"):
/// a session_key on every command (2.0 signs every call with it), a `user_ip` from
/// the command or the app's `default_user_ip`, no bill_no starting with `_`, and a
/// cancel_pay is a refund naming its pay (`pay_bill_no`). Returns the `pay_bill_no`.
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
