//! Request validation for the simulator's Midas endpoints, done over the generic JSON
//! map the client sent (not over the client's typed request), so the simulator is an
//! independent check of what goes on the wire: field presence and types, amounts,
//! bill_no syntax, and `sig` / `mp_sig` recomputed from exactly the fields received.

use serde_json::{Map, Value};

use crate::midas::errcode;
use crate::midas::sign::{self, Param};

/// The four Midas operations the simulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    GetBalance,
    Pay,
    Present,
    CancelPay,
}

impl Op {
    pub fn from_path(segment: &str) -> Option<Op> {
        match segment {
            "getbalance" => Some(Op::GetBalance),
            "pay" => Some(Op::Pay),
            "present" => Some(Op::Present),
            "cancelpay" => Some(Op::CancelPay),
            _ => None,
        }
    }

    /// The path kind used in call counters and logs.
    pub fn kind(self) -> &'static str {
        match self {
            Op::GetBalance => "getbalance",
            Op::Pay => "pay",
            Op::Present => "present",
            Op::CancelPay => "cancelpay",
        }
    }
}

/// A refusal: errcode and errmsg for the JSON answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub errcode: i64,
    pub errmsg: String,
}

impl Reject {
    pub fn new(errcode: i64, errmsg: impl Into<String>) -> Reject {
        Reject {
            errcode,
            errmsg: errmsg.into(),
        }
    }
}

pub(super) fn param_error(what: impl std::fmt::Display) -> Reject {
    Reject::new(errcode::PARAM_ERROR, format!("param error: {what}"))
}

/// A body that passed the syntactic checks.
#[derive(Clone, Debug)]
pub struct Request {
    pub op: Op,
    pub appid: String,
    pub openid: String,
    pub bill_no: Option<String>,
    /// `amt` for pay, `present_counts` for present.
    pub amount: Option<i64>,
    pub sig: String,
    pub mp_sig: Option<String>,
    /// Every body field except `sig` and `mp_sig`, rendered as signed
    /// (strings raw, integers as decimal digits).
    pub params: Vec<(String, String)>,
}

pub(super) fn required_str<'a>(m: &'a Map<String, Value>, key: &str) -> Result<&'a str, Reject> {
    match m.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(param_error(format!("{key} is empty"))),
        Some(_) => Err(param_error(format!("{key} must be a string"))),
        None => Err(param_error(format!("missing {key}"))),
    }
}

pub(super) fn required_int(m: &Map<String, Value>, key: &str) -> Result<i64, Reject> {
    match m.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| param_error(format!("{key} must be an integer in range"))),
        Some(_) => Err(param_error(format!("{key} must be a number"))),
        None => Err(param_error(format!("missing {key}"))),
    }
}

/// `[A-Za-z0-9_-]{1,63}`.
pub fn valid_bill_no(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// 2.0 adds: must not start with `_`.
pub fn valid_bill_no_v2(s: &str) -> bool {
    valid_bill_no(s) && !s.starts_with('_')
}

/// Parse and check a request body for `op`.
pub fn parse(op: Op, body: &[u8]) -> Result<Request, Reject> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| param_error("body is not valid JSON"))?;
    let Value::Object(m) = value else {
        return Err(param_error("body is not a JSON object"));
    };

    // Render every signed field first: a float, bool, null, array or object anywhere
    // in the body is a parameter error.
    let mut params = Vec::with_capacity(m.len());
    for (k, v) in &m {
        if k == "sig" || k == "mp_sig" {
            continue;
        }
        let rendered = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(param_error(format!("{k} must be a string or an integer"))),
        };
        params.push((k.clone(), rendered));
    }

    let openid = required_str(&m, "openid")?;
    let appid = required_str(&m, "appid")?;
    required_str(&m, "offer_id")?;
    let ts = required_int(&m, "ts")?;
    if ts < 0 {
        return Err(param_error("ts must not be negative"));
    }
    required_str(&m, "zone_id")?;
    required_str(&m, "pf")?;
    for optional in ["user_ip", "pay_item", "app_remark"] {
        if m.contains_key(optional) {
            required_str(&m, optional)?;
        }
    }

    let amount_key = match op {
        Op::Pay => Some("amt"),
        Op::Present => Some("present_counts"),
        Op::GetBalance | Op::CancelPay => None,
    };
    let amount = match amount_key {
        Some(key) => {
            let n = required_int(&m, key)?;
            if n < 1 {
                return Err(param_error(format!("{key} must be at least 1")));
            }
            Some(n)
        }
        None => None,
    };
    let bill_no = match op {
        Op::GetBalance => None,
        Op::Pay | Op::Present | Op::CancelPay => {
            let b = required_str(&m, "bill_no")?;
            if !valid_bill_no(b) {
                return Err(param_error("bill_no must match [A-Za-z0-9_-]{1,63}"));
            }
            Some(b.to_string())
        }
    };

    let sig = required_str(&m, "sig")?.to_string();
    let mp_sig = match m.get("mp_sig") {
        None => None,
        Some(_) => Some(required_str(&m, "mp_sig")?.to_string()),
    };

    Ok(Request {
        op,
        appid: appid.to_string(),
        openid: openid.to_string(),
        bill_no,
        amount,
        sig,
        mp_sig,
        params,
    })
}

fn as_params(params: &[(String, String)]) -> Vec<(&str, Param<'_>)> {
    params
        .iter()
        .map(|(k, v)| (k.as_str(), Param::Str(v.as_str())))
        .collect()
}

/// `sig` as it should be for these params, this uri and key.
pub fn expected_sig(req: &Request, uri: &str, app_key: &str) -> String {
    sign::sig(&as_params(&req.params), uri, app_key)
}

/// Does the request's `sig` verify with `app_key`?
pub fn sig_ok(req: &Request, uri: &str, app_key: &str) -> bool {
    sign::sig_eq(&expected_sig(req, uri, app_key), &req.sig)
}

/// Does `mp_sig` verify with `session_key` (over params + access_token + the sent sig)?
pub fn mp_sig_ok(req: &Request, uri: &str, access_token: &str, session_key: &str) -> bool {
    let Some(mp) = req.mp_sig.as_deref() else {
        return false;
    };
    let expected = sign::mp_sig(
        &as_params(&req.params),
        access_token,
        &req.sig,
        uri,
        session_key,
    );
    sign::sig_eq(&expected, mp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str = r#"{"openid":"odkx20ENSNa2w5y3g_qOkOvBNM1g","appid":"wx1234567","offer_id":"12345678","ts":1507530737,"zone_id":"1","pf":"android","sig":"1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b","mp_sig":"ff4c5bb39dea1002a8f03be0438724e1a8bcea5ebce8f221f9b9fea3bcf3bf76"}"#;

    #[test]
    fn official_vector_verifies() {
        let r = parse(Op::GetBalance, VECTOR.as_bytes()).unwrap();
        let uri = "/cgi-bin/midas/getbalance";
        assert!(sig_ok(&r, uri, "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u"));
        assert!(!sig_ok(
            &r,
            "/cgi-bin/midas/sandbox/getbalance",
            "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u"
        ));
        assert!(mp_sig_ok(
            &r,
            uri,
            "ACCESSTOKEN",
            "V7Q38/i2KXaqrQyl2Yx9Hg=="
        ));
        assert!(!mp_sig_ok(&r, uri, "OTHER", "V7Q38/i2KXaqrQyl2Yx9Hg=="));
    }

    #[test]
    fn rejects_bad_bodies() {
        let code = |op, body: &str| parse(op, body.as_bytes()).unwrap_err().errcode;
        assert_eq!(code(Op::GetBalance, "[1]"), errcode::PARAM_ERROR);
        assert_eq!(code(Op::GetBalance, "{"), errcode::PARAM_ERROR);
        let base = r#""openid":"o","appid":"a","offer_id":"1","ts":1,"zone_id":"1","pf":"android","sig":"x""#;
        assert!(parse(Op::GetBalance, format!("{{{base}}}").as_bytes()).is_ok());
        for extra in [
            r#","amt":1.5,"bill_no":"b""#,
            r#","amt":0,"bill_no":"b""#,
            r#","amt":"5","bill_no":"b""#,
            r#","amt":5,"bill_no":"b b""#,
            r#","amt":5"#,
            r#","amt":5,"bill_no":"b","flag":true"#,
        ] {
            assert_eq!(
                code(Op::Pay, &format!("{{{base}{extra}}}")),
                errcode::PARAM_ERROR,
                "{extra}"
            );
        }
        assert!(!valid_bill_no(&"a".repeat(64)));
        assert!(valid_bill_no(&"a-_Z9".repeat(12)));
        assert!(valid_bill_no("_x") && !valid_bill_no_v2("_x"));
        assert!(valid_bill_no_v2("x_") && !valid_bill_no_v2(""));
    }
}
