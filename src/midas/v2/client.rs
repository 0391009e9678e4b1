//! One virtual payment 2.0 call: build the body once, sign those bytes, post them,
//! and turn whatever comes back (or does not) into the crate's [`Answer`].
//!
//! Split into pure [`build_request`] and [`parse_answer`] (tested without a network;
//! the answer side in `answer.rs`, re-exported here) and [`call`], which the per-app
//! dispatch of `MidasClient` can use with its own HTTP client, base URL, token and
//! keys. Token invalidation on a `TokenInvalid` answer is the caller's job (it owns
//! the token cache).

use std::time::Instant;

use serde::Serialize;

pub use super::answer::parse_answer;
use super::answer::unknown;
use super::sign;
use crate::command::{Op, Params};
use crate::midas::answer::{Answer, Api, Body};
use crate::midas::errcode::OutcomeClass;
use crate::midas::transport::describe;
use crate::secret::Secret;

/// Answers larger than this are not read (a Midas answer is a few hundred bytes).
pub use crate::midas::transport::MAX_ANSWER_BYTES;

/// The 2.0 path of an operation (also the `uri` signed in `pay_sig`).
pub fn path(api: Api) -> &'static str {
    match api {
        Api::GetBalance => "/wxa/game/getbalance",
        Api::Pay => "/wxa/game/pay",
        Api::Present => "/wxa/game/present",
        Api::CancelPay => "/wxa/game/cancelpay",
        Api::QueryOrder => "/wxa/game/queryorderinfo",
    }
}

/// The `env` body field: which environment (and so which AppKey) the call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V2Env {
    Production,
    Sandbox,
}

impl V2Env {
    /// The number sent: 0 production, 1 sandbox.
    pub fn code(self) -> u8 {
        match self {
            V2Env::Production => 0,
            V2Env::Sandbox => 1,
        }
    }
}

/// A job's parameters as 2.0 names them. Which fields are sent depends on the API:
/// getbalance sends none of the optional ones; pay sends `amount`, `bill_no`,
/// `payitem`, `remark`; present `amount`, `bill_no`; cancelpay `amount`, `bill_no`
/// (the refund's own) and `pay_bill_no`. Mapping from a command: `amt` /
/// `present_counts` → `amount`, `pay_item` → `payitem`, `app_remark` → `remark`;
/// `appid` and `pf` are never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Params {
    pub openid: String,
    /// The app's offer_id.
    pub offer_id: String,
    pub zone_id: String,
    /// The player's public IP (required by 2.0; the app's default when the command has none).
    pub user_ip: String,
    pub env: V2Env,
    /// Unix seconds.
    pub ts: i64,
    pub amount: Option<i64>,
    pub bill_no: Option<String>,
    pub payitem: Option<String>,
    pub remark: Option<String>,
    pub pay_bill_no: Option<String>,
    /// queryorderinfo: the order asked about.
    pub query: Option<Box<crate::command::OrderQuery>>,
}

impl V2Params {
    /// A command's parameters in 2.0 terms: `amt` (pay, and the refund amount of a
    /// cancel_pay) or `present_counts` → `amount`, `pay_item` → `payitem`,
    /// `app_remark` → `remark`, the command's `user_ip` or else `default_user_ip`,
    /// and (a cancel_pay) the refunded pay's `pay_bill_no`.
    pub fn from_command(
        p: &Params,
        offer_id: &str,
        default_user_ip: Option<&str>,
        env: V2Env,
        ts: i64,
    ) -> V2Params {
        let amount = match p.op {
            Op::Pay | Op::CancelPay => p.amt,
            Op::Present => p.present_counts,
            Op::Balance | Op::QueryOrder => None,
        };
        V2Params {
            openid: p.openid.clone(),
            offer_id: offer_id.to_string(),
            zone_id: p.zone_id.clone(),
            user_ip: p
                .user_ip
                .as_deref()
                .or(default_user_ip)
                .unwrap_or_default()
                .to_string(),
            env,
            ts,
            amount,
            bill_no: p.bill_no.clone(),
            payitem: p.pay_item.clone(),
            remark: p.app_remark.clone(),
            pay_bill_no: p.pay_bill_no.clone(),
            query: p.query.clone(),
        }
    }
}

/// Why a request was not built (nothing was sent).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("{api} needs {field}")]
    Missing {
        api: &'static str,
        field: &'static str,
    },
    #[error("could not serialize the body")]
    Serialize,
}

/// A signed request, ready to send: post exactly `body` to `path` with
/// [`V2Request::query`].
#[derive(Debug, Clone)]
pub struct V2Request {
    pub api: Api,
    pub path: &'static str,
    pub body: Vec<u8>,
    pub pay_sig: String,
    pub signature: String,
}

impl V2Request {
    /// The query string pairs, in the documented order. The token is not signed.
    pub fn query<'a>(&'a self, access_token: &'a str) -> [(&'static str, &'a str); 4] {
        [
            ("access_token", access_token),
            ("signature", self.signature.as_str()),
            ("sig_method", "hmac_sha256"),
            ("pay_sig", self.pay_sig.as_str()),
        ]
    }
}

/// The body on the wire, in the order of the documented example.
#[derive(Serialize)]
struct WireBody<'a> {
    openid: &'a str,
    offer_id: &'a str,
    ts: i64,
    zone_id: &'a str,
    env: u8,
    /// Not sent to queryorderinfo.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    out_trade_no: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    biz_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bill_no: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pay_bill_no: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payitem: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remark: Option<&'a str>,
}

fn need<'a, T: ?Sized>(
    api: Api,
    field: &'static str,
    v: Option<&'a T>,
) -> Result<&'a T, BuildError> {
    v.ok_or(BuildError::Missing {
        api: api.name(),
        field,
    })
}

/// Serialize the body once and sign those bytes. `app_key` is the AppKey of
/// `p.env` (production and sandbox have their own).
pub fn build_request(
    api: Api,
    p: &V2Params,
    app_key: &Secret,
    session_key: &Secret,
) -> Result<V2Request, BuildError> {
    for (field, empty) in [
        ("user_ip", p.user_ip.is_empty() && api != Api::QueryOrder),
        ("session_key", session_key.is_empty()),
    ] {
        if empty {
            return Err(BuildError::Missing {
                api: api.name(),
                field,
            });
        }
    }
    let mut wire = WireBody {
        openid: &p.openid,
        offer_id: &p.offer_id,
        ts: p.ts,
        zone_id: &p.zone_id,
        env: p.env.code(),
        user_ip: (api != Api::QueryOrder).then_some(p.user_ip.as_str()),
        out_trade_no: None,
        biz_id: None,
        amount: None,
        bill_no: None,
        pay_bill_no: None,
        payitem: None,
        remark: None,
    };
    match api {
        Api::GetBalance => {}
        Api::Pay => {
            wire.amount = Some(*need(api, "amount", p.amount.as_ref())?);
            wire.bill_no = Some(need(api, "bill_no", p.bill_no.as_deref())?);
            wire.payitem = p.payitem.as_deref();
            wire.remark = p.remark.as_deref();
        }
        Api::Present => {
            wire.amount = Some(*need(api, "amount", p.amount.as_ref())?);
            wire.bill_no = Some(need(api, "bill_no", p.bill_no.as_deref())?);
        }
        Api::CancelPay => {
            wire.amount = Some(*need(api, "amount", p.amount.as_ref())?);
            wire.bill_no = Some(need(api, "bill_no", p.bill_no.as_deref())?);
            wire.pay_bill_no = Some(need(api, "pay_bill_no", p.pay_bill_no.as_deref())?);
        }
        Api::QueryOrder => {
            let q = need(api, "out_trade_no", p.query.as_ref())?;
            wire.out_trade_no = Some(&q.out_trade_no);
            wire.biz_id = Some(q.biz_id);
        }
    }
    let body = serde_json::to_vec(&wire).map_err(|_| BuildError::Serialize)?;
    let path = path(api);
    Ok(V2Request {
        api,
        path,
        pay_sig: sign::pay_sig(app_key.expose(), path, &body),
        signature: sign::signature(session_key.expose(), &body),
        body,
    })
}

/// Read at most [`MAX_ANSWER_BYTES`]; `Err` with a secret-free reason otherwise.
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(describe(&e)),
        }
    }
}

/// One 2.0 call. `http` must not follow redirects (`redirect::Policy::none()`, as
/// `MidasClient` builds it); a 3xx answer is an unknown outcome. `app_key` is the
/// AppKey of `p.env`. Never retries; the access token goes in the query string only
/// and never into an error message.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    http: &reqwest::Client,
    base_url: &str,
    token: &Secret,
    app_key: &Secret,
    session_key: &Secret,
    api: Api,
    p: &V2Params,
) -> Answer {
    let started = Instant::now();
    let req = match build_request(api, p, app_key, session_key) {
        Ok(r) => r,
        Err(e) => {
            return Answer {
                api,
                class: OutcomeClass::Definitive,
                http_status: None,
                errcode: None,
                errmsg: Some(format!("not sent: {e}")),
                body: Body::default(),
                latency: started.elapsed(),
            }
        }
    };
    let url = format!("{}{}", base_url.trim_end_matches('/'), req.path);
    let resp = match http
        .post(&url)
        .query(&req.query(token.expose()))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(req.body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return unknown(api, None, describe(&e), started),
    };
    let status = resp.status().as_u16();
    if resp.status().is_redirection() {
        return unknown(
            api,
            Some(status),
            format!("HTTP {status}: redirect not followed"),
            started,
        );
    }
    match read_capped(resp).await {
        Ok(bytes) => parse_answer(api, status, &bytes, started),
        Err(why) => unknown(api, Some(status), why, started),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK_BODY: &str = r#"{"openid":"odkx20ENSNa2w5y3g_qOkOvBNM1g","offer_id":"12345678","ts":1668136271,"zone_id":"1","env":0,"user_ip":"127.0.0.1","amount":10,"bill_no":"BillNo_123","payitem":"gem_pack","remark":"r"}"#;

    fn check_params() -> V2Params {
        V2Params {
            openid: "odkx20ENSNa2w5y3g_qOkOvBNM1g".into(),
            offer_id: "12345678".into(),
            zone_id: "1".into(),
            user_ip: "127.0.0.1".into(),
            env: V2Env::Production,
            ts: 1668136271,
            amount: Some(10),
            bill_no: Some("BillNo_123".into()),
            payitem: Some("gem_pack".into()),
            remark: Some("r".into()),
            pay_bill_no: None,
            query: None,
        }
    }

    fn keys() -> (Secret, Secret) {
        (
            Secret::new("12345"),
            Secret::new("9hAb/NEYUlkaMBEsmFgzig=="),
        )
    }

    #[test]
    fn pay_body_and_signatures_match_the_check_values() {
        let (k, s) = keys();
        let r = build_request(Api::Pay, &check_params(), &k, &s).unwrap();
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), CHECK_BODY);
        assert_eq!(r.path, "/wxa/game/pay");
        assert_eq!(
            r.pay_sig,
            "ebae4e0ef9310020982fa4db21a4b17005e3642a37d168187007c28676c0a8b9"
        );
        assert_eq!(
            r.signature,
            "2ff14d850f09e3caa1a6ae1478674a4bbce3cb96ce4ccb92af432b81da787d71"
        );
        let q = r.query("TOKEN");
        assert_eq!(q[0], ("access_token", "TOKEN"));
        assert_eq!(q[2], ("sig_method", "hmac_sha256"));
        assert_eq!(q[3].1, r.pay_sig);
    }

    #[test]
    fn fields_per_api() {
        let (k, s) = keys();
        let mut p = check_params();
        p.pay_bill_no = Some("PAY_1".into());
        p.env = V2Env::Sandbox;
        let v = |api| -> serde_json::Value {
            serde_json::from_slice(&build_request(api, &p, &k, &s).unwrap().body).unwrap()
        };
        let keys_of = |v: serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let common = ["env", "offer_id", "openid", "ts", "user_ip", "zone_id"];
        let with = |extra: &[&str]| -> Vec<String> {
            let mut all: Vec<String> = common.iter().chain(extra).map(|s| s.to_string()).collect();
            all.sort();
            all
        };
        assert_eq!(keys_of(v(Api::GetBalance)), with(&[]));
        assert_eq!(keys_of(v(Api::Present)), with(&["amount", "bill_no"]));
        assert_eq!(
            keys_of(v(Api::CancelPay)),
            with(&["amount", "bill_no", "pay_bill_no"])
        );
        assert_eq!(v(Api::Pay)["env"], 1);
        assert_eq!(v(Api::CancelPay)["pay_bill_no"], "PAY_1");
    }

    #[test]
    fn missing_fields_are_not_sent() {
        let (k, s) = keys();
        let mut p = check_params();
        p.amount = None;
        assert_eq!(
            build_request(Api::Present, &p, &k, &s).unwrap_err(),
            BuildError::Missing {
                api: "present",
                field: "amount"
            }
        );
        let p = check_params();
        assert_eq!(
            build_request(Api::CancelPay, &p, &k, &s).unwrap_err(),
            BuildError::Missing {
                api: "cancelpay",
                field: "pay_bill_no"
            }
        );
        let mut p = check_params();
        p.user_ip.clear();
        assert!(build_request(Api::GetBalance, &p, &k, &s).is_err());
        let empty = Secret::new("");
        assert_eq!(
            build_request(Api::GetBalance, &check_params(), &k, &empty).unwrap_err(),
            BuildError::Missing {
                api: "getbalance",
                field: "session_key"
            }
        );
    }

    #[test]
    fn a_command_maps_onto_2_0_names() {
        // From JSON, so that optional fields added to `Params` later keep this compiling.
        let cmd: Params = serde_json::from_value(serde_json::json!({
            "op": "pay", "bill_no": "B", "openid": "o", "appid": "wx", "zone_id": "2",
            "pf": "android", "amt": 7, "pay_item": "item", "app_remark": "rem"
        }))
        .unwrap();
        let v = V2Params::from_command(&cmd, "offer", Some("198.51.100.1"), V2Env::Sandbox, 5);
        assert_eq!(
            (v.amount, v.payitem.as_deref(), v.remark.as_deref()),
            (Some(7), Some("item"), Some("rem"))
        );
        assert_eq!(
            (v.user_ip.as_str(), v.zone_id.as_str(), v.offer_id.as_str()),
            ("198.51.100.1", "2", "offer")
        );
        let body = build_request(Api::Pay, &v, &Secret::new("k"), &Secret::new("s"))
            .unwrap()
            .body;
        let text = String::from_utf8(body).unwrap();
        for absent in ["appid", "\"pf\"", "amt", "pay_item", "app_remark"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
        let present: Params = serde_json::from_value(serde_json::json!({
            "op": "present", "bill_no": "G", "openid": "o", "appid": "wx", "zone_id": "2",
            "pf": "android", "present_counts": 3, "user_ip": "203.0.113.9"
        }))
        .unwrap();
        let v = V2Params::from_command(
            &present,
            "offer",
            Some("198.51.100.1"),
            V2Env::Production,
            5,
        );
        assert_eq!((v.amount, v.user_ip.as_str()), (Some(3), "203.0.113.9"));
    }
}
