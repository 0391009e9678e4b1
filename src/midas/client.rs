//! The Midas HTTP client: one call per attempt, a typed [`Answer`], no retries inside.
//!
//! It builds the body from a job's [`Params`], signs it (`sig` always, `mp_sig` when the
//! command carries a session_key and `midas.mp_sig` is on), puts the access token in
//! the query string only, and classifies whatever comes back (or does not) with
//! [`errcode::classify`]. Retrying is the dispatcher's decision.
//!
//! Hardening: redirects are never followed (a 307/308 would re-post a signed body, or
//! the token request's app secret, to wherever it points), answers are read with a
//! [`MAX_ANSWER_BYTES`] cap (a bigger one is an unparseable, transient answer, never an
//! allocation of its size), and a plain `http://` `midas.base_url` is refused outside
//! simulator mode unless it names a loopback address.
//!
//! Each app is called through the API it is configured for (`[[apps]] api`): 1.0
//! here, virtual payment 2.0 through [`crate::midas::v2::call`] with the same HTTP
//! client and token cache.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::answer::{Answer, Api, Body};
use super::errcode::{self, OutcomeClass};
use super::sign::{self, Param};
use super::token::TokenCache;
use super::transport::{describe, http_client, read_capped, MAX_ANSWER_BYTES};
use crate::command::Params;
use crate::config::{ApiVersion, App, Environment, Settings};
use crate::midas::v2::{V2Env, V2Params};
use crate::secret::Secret;

#[derive(Deserialize)]
struct Wire {
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    balance: Option<i64>,
    #[serde(default)]
    used_gen_amt: Option<i64>,
    #[serde(default)]
    gen_balance: Option<i64>,
    #[serde(default)]
    first_save: Option<serde_json::Value>,
    #[serde(default)]
    save_amt: Option<i64>,
    #[serde(default)]
    save_sum: Option<i64>,
    #[serde(default)]
    cost_sum: Option<i64>,
    #[serde(default)]
    present_sum: Option<i64>,
}

/// Why [`MidasClient::new`] could not build a client.
#[derive(Debug, thiserror::Error)]
pub enum NewClientError {
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("midas.base_url {0:?} is refused: {1}")]
    BaseUrl(String, &'static str),
}

/// Refuse a base URL that would send AppKey-signed bodies, tokens and the app secret
/// in clear text: outside simulator mode only `https://`, or `http://` to a loopback
/// address (a local stand-in or proxy), is accepted.
pub fn check_base_url(environment: Environment, base_url: &str) -> Result<(), NewClientError> {
    if environment == Environment::Simulator {
        return Ok(());
    }
    let refuse = |why| Err(NewClientError::BaseUrl(base_url.to_string(), why));
    let Ok(url) = reqwest::Url::parse(base_url) else {
        return refuse("not a URL");
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                refuse("plain http:// is allowed in sandbox and production only to a loopback address; use https://")
            }
        }
        _ => refuse("must be an https:// URL"),
    }
}

/// The Midas client for every configured app.
pub struct MidasClient {
    http: reqwest::Client,
    base_url: String,
    sandbox: bool,
    mp_sig: bool,
    apps: HashMap<String, App>,
    tokens: TokenCache,
}

impl MidasClient {
    /// A client for `base_url` (the simulator's address in simulator mode).
    /// Refuses a clear-text non-loopback `base_url` outside simulator mode.
    pub fn new(settings: &Settings, base_url: &str) -> Result<MidasClient, NewClientError> {
        let cfg = &settings.config.midas;
        check_base_url(cfg.environment, base_url)?;
        let http = http_client(settings)?;
        let tokens = TokenCache::new(http.clone(), base_url, &settings.apps);
        Ok(MidasClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            sandbox: cfg.environment == Environment::Sandbox,
            mp_sig: cfg.mp_sig,
            apps: settings
                .apps
                .iter()
                .map(|a| (a.appid.clone(), a.clone()))
                .collect(),
            tokens,
        })
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    /// One call to Midas for `params` (the job's parameters). `api` is usually
    /// `Api::for_op(params.op)`; getbalance after a 90012 passes `Api::GetBalance`.
    pub async fn call(&self, api: Api, params: &Params, session_key: Option<&Secret>) -> Answer {
        let started = Instant::now();
        let Some(app) = self.apps.get(&params.appid) else {
            return Answer {
                api,
                class: OutcomeClass::Definitive,
                http_status: None,
                errcode: None,
                errmsg: Some(format!("no configured app {}", params.appid)),
                body: Body::default(),
                latency: started.elapsed(),
            };
        };
        let token = match self.tokens.get(&app.appid).await {
            Ok(t) => t,
            Err(e) => return Answer::transient(api, None, e.to_string(), started),
        };
        let ts = crate::command::now_ms() / 1000;
        if app.api == ApiVersion::V2 {
            return self
                .call_v2(api, params, app, &token, session_key, ts)
                .await;
        }
        let path = api.path(self.sandbox);
        let body = build_body(
            api,
            params,
            app,
            ts,
            path,
            &token,
            session_key.filter(|_| self.mp_sig),
        );
        let url = format!("{}{}", self.base_url, path);
        let resp = match self
            .http
            .post(&url)
            .query(&[("access_token", token.expose())])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Answer::transient(api, None, describe(&e), started),
        };
        let status = resp.status().as_u16();
        let bytes = match read_capped(resp, MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                let why = format!("HTTP {status}: not a Midas answer: {e}");
                return Answer::transient(api, Some(status), why, started);
            }
        };
        let wire: Wire = match serde_json::from_slice(&bytes) {
            Ok(w) => w,
            Err(_) => {
                let why = format!("HTTP {status}: not a Midas answer");
                let mut a = Answer::transient(api, Some(status), why, started);
                a.class = errcode::classify_http(status);
                return a;
            }
        };
        let Some(code) = wire.errcode else {
            return Answer::transient(
                api,
                Some(status),
                format!("HTTP {status}: no errcode"),
                started,
            );
        };
        let class = errcode::classify(code);
        if class == OutcomeClass::TokenInvalid {
            self.tokens.invalidate(&app.appid, &token).await;
        }
        Answer {
            api,
            class,
            http_status: Some(status),
            errcode: Some(code),
            errmsg: wire.errmsg,
            body: Body {
                balance: wire.balance,
                used_gen_amt: wire.used_gen_amt,
                gen_balance: wire.gen_balance,
                first_save: wire.first_save.and_then(|v| match v {
                    serde_json::Value::Bool(b) => Some(b as i64),
                    serde_json::Value::Number(n) => n.as_i64(),
                    _ => None,
                }),
                save_amt: wire.save_amt,
                save_sum: wire.save_sum,
                cost_sum: wire.cost_sum,
                present_sum: wire.present_sum,
                ..Body::default()
            },
            latency: started.elapsed(),
        }
    }
}

impl MidasClient {
    /// One virtual payment 2.0 call (`midas::v2`) for a `api = "v2"` app: `env` 1 with
    /// the (sandbox) AppKey in sandbox, `env` 0 with the AppKey otherwise; the
    /// session_key is required (a job without one is not sent: definitive). A
    /// token-invalid answer drops the cached token, as for 1.0.
    async fn call_v2(
        &self,
        api: Api,
        params: &Params,
        app: &App,
        token: &Secret,
        session_key: Option<&Secret>,
        ts: i64,
    ) -> Answer {
        let env = if self.sandbox {
            V2Env::Sandbox
        } else {
            V2Env::Production
        };
        let p = V2Params::from_command(
            params,
            &app.offer_id,
            app.default_user_ip.as_deref(),
            env,
            ts,
        );
        let none = Secret::new("");
        let answer = crate::midas::v2::call(
            &self.http,
            &self.base_url,
            token,
            &app.app_key,
            session_key.unwrap_or(&none),
            api,
            &p,
        )
        .await;
        if answer.class == OutcomeClass::TokenInvalid {
            self.tokens.invalidate(&app.appid, token).await;
        }
        answer
    }
}

/// The signed JSON body for one call (pure apart from its inputs; tested below).
pub fn build_body(
    api: Api,
    p: &Params,
    app: &App,
    ts: i64,
    path: &str,
    token: &Secret,
    session_key: Option<&Secret>,
) -> Vec<u8> {
    let mut params: Vec<(&str, Param<'_>)> = Vec::with_capacity(13);
    params.push(("openid", Param::Str(&p.openid)));
    params.push(("appid", Param::Str(&app.appid)));
    params.push(("offer_id", Param::Str(&app.offer_id)));
    params.push(("ts", Param::Int(ts)));
    params.push(("zone_id", Param::Str(&p.zone_id)));
    params.push(("pf", Param::Str(&p.pf)));
    if let Some(ip) = &p.user_ip {
        params.push(("user_ip", Param::Str(ip)));
    }
    match api {
        // no 1.0 queryorderinfo: commands refuse query_order on 1.0 apps
        Api::GetBalance | Api::QueryOrder => {}
        Api::Pay | Api::Present | Api::CancelPay => {
            if let Some(b) = &p.bill_no {
                params.push(("bill_no", Param::Str(b)));
            }
        }
    }
    match api {
        Api::Pay => {
            if let Some(a) = p.amt {
                params.push(("amt", Param::Int(a)));
            }
            if let Some(i) = &p.pay_item {
                params.push(("pay_item", Param::Str(i)));
            }
            if let Some(r) = &p.app_remark {
                params.push(("app_remark", Param::Str(r)));
            }
        }
        Api::Present => {
            if let Some(c) = p.present_counts {
                params.push(("present_counts", Param::Int(c)));
            }
        }
        Api::CancelPay => {
            if let Some(i) = &p.pay_item {
                params.push(("pay_item", Param::Str(i)));
            }
        }
        Api::GetBalance | Api::QueryOrder => {}
    }
    let sig = sign::sig(&params, path, app.app_key.expose());
    let mp_sig = session_key.map(|k| sign::mp_sig(&params, token.expose(), &sig, path, k.expose()));
    let mut map = serde_json::Map::with_capacity(params.len() + 2);
    for (k, v) in &params {
        let v = match v {
            Param::Str(s) => serde_json::Value::String((*s).to_string()),
            Param::Int(n) => serde_json::Value::from(*n),
        };
        map.insert((*k).to_string(), v);
    }
    map.insert("sig".into(), serde_json::Value::String(sig));
    if let Some(m) = mp_sig {
        map.insert("mp_sig".into(), serde_json::Value::String(m));
    }
    serde_json::to_vec(&map).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;

    fn app() -> App {
        App {
            appid: "wx1234567".into(),
            offer_id: "12345678".into(),
            zone_id: "1".into(),
            pf: "android".into(),
            api: crate::config::ApiVersion::V1,
            default_user_ip: None,
            app_key: Secret::new("zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u"),
            app_secret: Secret::new("s"),
            sandbox_app_key: None,
            push_token: None,
            push_aes_key: None,
        }
    }

    #[test]
    fn getbalance_body_matches_the_vector() {
        let p = Params {
            op: Op::Balance,
            bill_no: None,
            openid: "odkx20ENSNa2w5y3g_qOkOvBNM1g".into(),
            appid: "wx1234567".into(),
            zone_id: "1".into(),
            pf: "android".into(),
            user_ip: None,
            amt: None,
            present_counts: None,
            pay_item: None,
            app_remark: None,
            query: None,
            pay_bill_no: None,
        };
        let body = build_body(
            Api::GetBalance,
            &p,
            &app(),
            1507530737,
            Api::GetBalance.path(false),
            &Secret::new("ACCESSTOKEN"),
            Some(&Secret::new("V7Q38/i2KXaqrQyl2Yx9Hg==")),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["sig"],
            "1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b"
        );
        assert_eq!(
            v["mp_sig"],
            "ff4c5bb39dea1002a8f03be0438724e1a8bcea5ebce8f221f9b9fea3bcf3bf76"
        );
        assert_eq!(v["ts"], 1507530737);
        assert!(
            v.get("access_token").is_none(),
            "token only in the query string"
        );
        assert!(v.get("user_ip").is_none());
    }
}
