//! Virtual payment 2.0 through the simulator as a real HTTP server. Requests are
//! signed here by an independent HMAC implementation (hmac + sha2 directly, not
//! `midas_worker::midas::v2::sign`), so a mistake shared by the crate's signer and the
//! simulator's verifier cannot hide; the crate's own 2.0 client (`midas::v2::call`)
//! is then exercised against the same simulator.

use std::time::Duration;

use hmac::{Hmac, Mac};
use midas_worker::config::SimulatorConfig;
use midas_worker::midas::errcode::{says_nothing_about_bill, MidasApi};
use midas_worker::midas::v2::{self, V2Env, V2Params};
use midas_worker::midas::{Api, OutcomeClass};
use midas_worker::secret::Secret;
use midas_worker::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};
use serde_json::{json, Map, Value};
use sha2::Sha256;

const APPID: &str = "wx-v2-app";
const APP_KEY: &str = "prod-app-key-for-v2-tests-000001";
const SANDBOX_KEY: &str = "sandbox-app-key-for-v2-tests-002";
const APP_SECRET: &str = "app-secret-for-v2-tests";
const SESSION_KEY: &str = "9hAb/NEYUlkaMBEsmFgzig==";
const OTHER_SESSION: &str = "Zm9yZWlnbi1zZXNzaW9uLWtleQ==";

const CHECK_BODY: &str = r#"{"openid":"odkx20ENSNa2w5y3g_qOkOvBNM1g","offer_id":"12345678","ts":1668136271,"zone_id":"1","env":0,"user_ip":"127.0.0.1","amount":10,"bill_no":"BillNo_123","payitem":"gem_pack","remark":"r"}"#;
const CHECK_PAY_SIG: &str = "ebae4e0ef9310020982fa4db21a4b17005e3642a37d168187007c28676c0a8b9";
const CHECK_SIGNATURE: &str = "2ff14d850f09e3caa1a6ae1478674a4bbce3cb96ce4ccb92af432b81da787d71";

const PAY: &str = "/wxa/game/pay";
const PRESENT: &str = "/wxa/game/present";
const CANCEL: &str = "/wxa/game/cancelpay";
const BALANCE: &str = "/wxa/game/getbalance";

// ------------------------------------------------------------ independent signer

fn hmac_hex(key: &str, msg: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(msg);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pay_sig(app_key: &str, uri: &str, body: &[u8]) -> String {
    let mut msg = format!("{uri}&").into_bytes();
    msg.extend_from_slice(body);
    hmac_hex(app_key, &msg)
}

fn signature(session_key: &str, body: &[u8]) -> String {
    hmac_hex(session_key, body)
}

/// The 1.0 algorithm (for the 1.0 session-expiry test): sorted k=v, org_loc, method.
fn v1_sign(params: &Map<String, Value>, uri: &str, key_name: &str, key: &str) -> String {
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    let a = keys
        .iter()
        .map(|k| match &params[k.as_str()] {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join("&");
    let msg = format!("{a}&org_loc={uri}&method=POST&{key_name}={key}");
    hmac_hex(key, msg.as_bytes())
}

// ------------------------------------------------------------ harness

fn apps() -> Vec<SimApp> {
    vec![SimApp {
        appid: APPID.into(),
        app_key: Secret::new(APP_KEY),
        sandbox_key: Secret::new(SANDBOX_KEY),
        app_secret: Secret::new(APP_SECRET),
    }]
}

struct Env {
    sim: SimHandle,
    http: reqwest::Client,
    token: String,
}

async fn start() -> Env {
    let cfg = SimulatorConfig {
        seed: 7,
        initial_balance: 1000,
        ..SimulatorConfig::default()
    };
    let sim = Simulator::new(cfg, apps()).start().await.unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let v: Value = http
        .post(format!("{}/cgi-bin/stable_token", sim.base_url()))
        .json(&json!({"grant_type": "client_credential", "appid": APPID, "secret": APP_SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["access_token"].as_str().unwrap().to_string();
    Env { sim, http, token }
}

/// A 2.0 body: the common fields plus `extra` (production env, a user_ip).
fn body(openid: &str, extra: Value) -> Value {
    let mut b = json!({"openid": openid, "offer_id": "12345678", "ts": 1668136271,
                       "zone_id": "1", "env": 0, "user_ip": "203.0.113.7"});
    if let (Value::Object(b), Value::Object(e)) = (&mut b, extra) {
        b.extend(e);
    }
    b
}

fn code(v: &Value) -> i64 {
    v["errcode"]
        .as_i64()
        .unwrap_or_else(|| panic!("no errcode in {v}"))
}

impl Env {
    /// POST exactly `bytes` with the given query signatures.
    async fn post(&self, path: &str, bytes: &[u8], pay_sig: &str, signature: &str) -> Value {
        self.post_query(
            path,
            bytes,
            &[
                ("access_token", self.token.as_str()),
                ("signature", signature),
                ("sig_method", "hmac_sha256"),
                ("pay_sig", pay_sig),
            ],
        )
        .await
    }

    async fn post_query(&self, path: &str, bytes: &[u8], query: &[(&str, &str)]) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.sim.base_url()))
            .query(query)
            .header("content-type", "application/json")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        resp.json().await.unwrap()
    }

    /// Serialize once, sign those bytes with `app_key` and `session_key`, send them.
    async fn call(&self, path: &str, b: &Value, app_key: &str, session_key: &str) -> Value {
        let bytes = serde_json::to_vec(b).unwrap();
        let (p, s) = (
            pay_sig(app_key, path, &bytes),
            signature(session_key, &bytes),
        );
        self.post(path, &bytes, &p, &s).await
    }

    async fn ok(&self, path: &str, b: &Value) -> Value {
        self.call(path, b, APP_KEY, SESSION_KEY).await
    }

    fn ledger(&self) -> LedgerDump {
        self.sim.ledger()
    }

    fn balance_of(&self, openid: &str) -> i64 {
        self.ledger()
            .accounts
            .iter()
            .find(|a| a.openid == openid)
            .map_or(-1, |a| a.balance)
    }

    /// Wait (bounded) until the ledger holds an order with this bill_no.
    async fn wait_for_order(&self, bill_no: &str) {
        for _ in 0..500 {
            if self.ledger().orders.iter().any(|o| o.bill_no == bill_no) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("order {bill_no} never applied");
    }

    /// Send a request whose answer the simulator will stall; give up on it.
    async fn send_and_lose(&self, path: &str, bytes: Vec<u8>, query: Vec<(String, String)>) {
        let r = self
            .http
            .post(format!("{}{path}", self.sim.base_url()))
            .query(&query)
            .header("content-type", "application/json")
            .body(bytes)
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        assert!(r.is_err_and(|e| e.is_timeout()), "the answer must be lost");
    }
}

// ------------------------------------------------------------ signatures

#[tokio::test]
async fn check_values_are_reproduced_by_both_signers() {
    let b = CHECK_BODY.as_bytes();
    assert_eq!(pay_sig("12345", PAY, b), CHECK_PAY_SIG);
    assert_eq!(signature(SESSION_KEY, b), CHECK_SIGNATURE);
    assert_eq!(v2::sign::pay_sig("12345", PAY, b), CHECK_PAY_SIG);
    assert_eq!(v2::sign::signature(SESSION_KEY, b), CHECK_SIGNATURE);
    // The crate's request builder produces exactly the documented body.
    let p = V2Params {
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
    };
    let r = v2::build_request(
        Api::Pay,
        &p,
        &Secret::new("12345"),
        &Secret::new(SESSION_KEY),
    )
    .unwrap();
    assert_eq!(r.body, b);
    assert_eq!(
        (r.pay_sig.as_str(), r.signature.as_str()),
        (CHECK_PAY_SIG, CHECK_SIGNATURE)
    );
}

#[tokio::test]
async fn independent_signature_is_accepted_and_a_changed_byte_is_not() {
    let env = start().await;
    env.sim.register_session("u1", SESSION_KEY);
    let b = body("u1", json!({"amount": 10, "bill_no": "S-1"}));
    let bytes = serde_json::to_vec(&b).unwrap();
    let (p, s) = (
        pay_sig(APP_KEY, PAY, &bytes),
        signature(SESSION_KEY, &bytes),
    );

    // One byte changed after signing: the amount 10 becomes 19.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let changed = text.replace(r#""amount":10"#, r#""amount":19"#);
    assert_eq!(changed.len(), text.len());
    assert_ne!(changed, text);
    let v = env.post(PAY, changed.as_bytes(), &p, &s).await;
    assert_eq!(
        (code(&v), v["errmsg"].as_str()),
        (90011, Some("pay_sig wrong"))
    );
    // The same JSON value serialized differently (whitespace) is other bytes: refused.
    let pretty = serde_json::to_vec_pretty(&b).unwrap();
    assert_eq!(code(&env.post(PAY, &pretty, &p, &s).await), 90011);
    // Uppercase hex is not the signature.
    assert_eq!(
        code(&env.post(PAY, &bytes, &p.to_uppercase(), &s).await),
        90011
    );
    // pay_sig right (AppKey known), signature made with another session_key.
    let v = env
        .post(PAY, &bytes, &p, &signature(OTHER_SESSION, &bytes))
        .await;
    assert_eq!(
        (code(&v), v["errmsg"].as_str()),
        (90010, Some("signature wrong"))
    );
    // sig_method is required.
    let v = env
        .post_query(
            PAY,
            &bytes,
            &[
                ("access_token", env.token.as_str()),
                ("signature", &s),
                ("pay_sig", &p),
            ],
        )
        .await;
    assert_eq!(code(&v), 90018);
    assert_eq!(env.ledger().applied, 0, "nothing refused was applied");

    // The exact bytes signed: accepted, once.
    let v = env.post(PAY, &bytes, &p, &s).await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(
        (v["bill_no"].as_str(), v["balance"].as_i64()),
        (Some("S-1"), Some(990))
    );
    assert_eq!(env.balance_of("u1"), 990);

    // Each env has its own AppKey.
    let sandbox = body("u1", json!({"env": 1}));
    assert_eq!(
        code(&env.call(BALANCE, &sandbox, SANDBOX_KEY, SESSION_KEY).await),
        0
    );
    assert_eq!(
        code(&env.call(BALANCE, &sandbox, APP_KEY, SESSION_KEY).await),
        90011
    );
    let prod = body("u1", json!({}));
    assert_eq!(
        code(&env.call(BALANCE, &prod, SANDBOX_KEY, SESSION_KEY).await),
        90011
    );
    // Signed for another uri.
    let bytes = serde_json::to_vec(&prod).unwrap();
    let v = env
        .post(
            BALANCE,
            &bytes,
            &pay_sig(APP_KEY, PAY, &bytes),
            &signature(SESSION_KEY, &bytes),
        )
        .await;
    assert_eq!(code(&v), 90011);
}

// ------------------------------------------------------------ the books

#[tokio::test]
async fn pay_present_balance_and_partial_refunds() {
    let env = start().await;
    let v = env
        .ok(
            PRESENT,
            &body("u1", json!({"amount": 50, "bill_no": "G-1"})),
        )
        .await;
    assert_eq!(
        (code(&v), v["balance"].as_i64(), v["bill_no"].as_str()),
        (0, Some(1050), Some("G-1"))
    );
    let v = env
        .ok(
            PAY,
            &body(
                "u1",
                json!({"amount": 100, "bill_no": "P-1", "payitem": "gem", "remark": "r"}),
            ),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(
        (v["balance"].as_i64(), v["used_present_amount"].as_i64()),
        (Some(950), Some(50))
    );
    assert!(v.get("used_gen_amt").is_none(), "2.0 names only: {v}");

    let v = env.ok(BALANCE, &body("u1", json!({}))).await;
    assert_eq!(code(&v), 0);
    assert_eq!(v["balance"], 950);
    assert_eq!(v["present_balance"], 0);
    assert_eq!(v["sum_present"], 50);
    assert_eq!(v["sum_cost"], 100);
    assert_eq!(v["sum_save"], 1000);
    assert_eq!(v["sum_balance"], 1000);
    assert_eq!(v["first_save"], json!(true), "a boolean in 2.0");
    assert!(v.get("gen_balance").is_none());

    let refund = |bill: &str, amount: i64| {
        body(
            "u1",
            json!({"bill_no": bill, "pay_bill_no": "P-1", "amount": amount}),
        )
    };
    let v = env.ok(CANCEL, &refund("R-1", 30)).await;
    assert_eq!((code(&v), v["bill_no"].as_str()), (0, Some("R-1")));
    assert_eq!(env.balance_of("u1"), 980);
    let v = env.ok(CANCEL, &refund("R-2", 60)).await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(env.balance_of("u1"), 1040);
    // 90 of 100 refunded: 20 more is an over-refund, refused and not applied.
    let v = env.ok(CANCEL, &refund("R-3", 20)).await;
    assert_eq!(code(&v), 90018, "{v}");
    assert!(v["errmsg"].as_str().unwrap().contains("refund"), "{v}");
    assert_eq!(env.balance_of("u1"), 1040);
    // A repeated refund bill_no is idempotent.
    assert_eq!(code(&env.ok(CANCEL, &refund("R-1", 30)).await), 90012);
    assert_eq!(env.balance_of("u1"), 1040);
    // A refund of a pay that does not exist.
    let v = env
        .ok(
            CANCEL,
            &body(
                "u1",
                json!({"bill_no": "R-9", "pay_bill_no": "NOPE", "amount": 1}),
            ),
        )
        .await;
    assert_eq!(code(&v), 90000);
    // The rest, exactly.
    assert_eq!(code(&env.ok(CANCEL, &refund("R-4", 10)).await), 0);
    assert_eq!(env.balance_of("u1"), 1050);

    let l = env.ledger();
    assert!(l.orders.iter().all(|o| o.api == "v2"));
    let pay = l.orders.iter().find(|o| o.bill_no == "P-1").unwrap();
    assert_eq!(
        (pay.op.as_str(), pay.refunded, pay.cancelled),
        ("pay", 100, true)
    );
    let refunds: Vec<_> = l.orders.iter().filter(|o| o.op == "refund").collect();
    assert_eq!(refunds.len(), 3);
    assert!(refunds
        .iter()
        .all(|o| o.pay_bill_no.as_deref() == Some("P-1")));
    assert_eq!(refunds.iter().map(|o| o.amount).sum::<i64>(), 100);
    assert_eq!(l.calls["v2_cancelpay"], 6);
    assert_eq!(l.calls.get("cancelpay"), None, "1.0 counters untouched");
}

#[tokio::test]
async fn repeated_bill_no_is_90012_per_openid_and_zone() {
    let env = start().await;
    let pay = |openid: &str, zone: &str| {
        body(
            openid,
            json!({"amount": 10, "bill_no": "B-1", "zone_id": zone}),
        )
    };
    assert_eq!(code(&env.ok(PAY, &pay("u1", "1")).await), 0);
    let v = env.ok(PAY, &pay("u1", "1")).await;
    assert_eq!(
        (code(&v), v["errmsg"].as_str()),
        (90012, Some("order already exists"))
    );
    assert_eq!(env.balance_of("u1"), 990, "charged once");
    // Another openid or another zone is another order.
    assert_eq!(code(&env.ok(PAY, &pay("u2", "1")).await), 0);
    assert_eq!(code(&env.ok(PAY, &pay("u1", "2")).await), 0);
    assert_eq!(env.balance_of("u1"), 980);
    assert_eq!(env.ledger().orders.len(), 3);
}

#[tokio::test]
async fn parameter_errors() {
    let env = start().await;
    let mut no_ip = body("u1", json!({"amount": 10, "bill_no": "B-1"}));
    no_ip.as_object_mut().unwrap().remove("user_ip");
    let v = env.ok(PAY, &no_ip).await;
    assert_eq!(code(&v), 90018);
    assert!(v["errmsg"].as_str().unwrap().contains("user_ip"), "{v}");
    for extra in [
        json!({"amount": 10, "bill_no": "_B-1"}),
        json!({"amount": 10, "bill_no": 12345}),
        json!({"amount": 10, "bill_no": "x".repeat(64)}),
        json!({"amount": 10, "bill_no": "has space"}),
        json!({"amount": 0, "bill_no": "B-1"}),
        json!({"amt": 10, "bill_no": "B-1"}),
        json!({"amount": 10, "bill_no": "B-1", "appid": APPID}),
        json!({"amount": 10, "bill_no": "B-1", "pf": "android"}),
        json!({"amount": 10, "bill_no": "B-1", "env": 2}),
    ] {
        let v = env.ok(PAY, &body("u1", extra.clone())).await;
        assert_eq!(code(&v), 90018, "{extra}: {v}");
    }
    let v = env
        .ok(PAY, &body("u1", json!({"amount": 10, "bill_no": "_B-1"})))
        .await;
    assert!(
        v["errmsg"].as_str().unwrap().contains("start with _"),
        "{v}"
    );
    assert_eq!(env.ledger().applied, 0);
    // A 63-character bill_no with every allowed character class is fine.
    let long = format!("a-_Z9{}", "x".repeat(58));
    assert_eq!(long.len(), 63);
    assert_eq!(
        code(
            &env.ok(PAY, &body("u1", json!({"amount": 1, "bill_no": long})))
                .await
        ),
        0
    );
}

// ------------------------------------------------------------ session expiry fault

fn expiring() -> Faults {
    Faults {
        session_expire_after_lost_rate: 1.0,
        stall_ms: 60_000,
        ..Faults::default()
    }
}

#[tokio::test]
async fn v2_session_expires_after_a_lost_answer() {
    let env = start().await;
    env.sim.register_session("u1", SESSION_KEY);
    let b = body("u1", json!({"amount": 10, "bill_no": "L-1"}));
    let bytes = serde_json::to_vec(&b).unwrap();
    let query = vec![
        ("access_token".to_string(), env.token.clone()),
        ("signature".to_string(), signature(SESSION_KEY, &bytes)),
        ("sig_method".to_string(), "hmac_sha256".to_string()),
        ("pay_sig".to_string(), pay_sig(APP_KEY, PAY, &bytes)),
    ];
    env.sim.set_faults(expiring());
    env.send_and_lose(PAY, bytes, query).await;
    env.wait_for_order("L-1").await;
    env.sim.set_faults(Faults::default());
    assert_eq!(
        env.balance_of("u1"),
        990,
        "applied although the answer was lost"
    );

    // The retry with the same key: 90010, again and again; nothing more charged.
    for _ in 0..2 {
        let v = env.call(PAY, &b, APP_KEY, SESSION_KEY).await;
        assert_eq!(
            (code(&v), v["errmsg"].as_str()),
            (90010, Some("signature wrong"))
        );
        assert!(says_nothing_about_bill(MidasApi::V2, code(&v)));
    }
    // A different session_key: the retry goes through and finds the order.
    assert_eq!(
        code(&env.call(PAY, &b, APP_KEY, OTHER_SESSION).await),
        90012
    );
    // The expired key stays expired.
    assert_eq!(
        code(
            &env.call(BALANCE, &body("u1", json!({})), APP_KEY, SESSION_KEY)
                .await
        ),
        90010
    );
    assert_eq!(env.balance_of("u1"), 990, "charged once");
    assert_eq!(env.ledger().orders.len(), 1);
}

#[tokio::test]
async fn v1_session_expires_after_a_lost_answer() {
    let env = start().await;
    env.sim.register_session("u1", SESSION_KEY);
    let uri = "/cgi-bin/midas/pay";
    let signed = |session_key: &str| -> Value {
        let Value::Object(mut m) = json!({"openid": "u1", "appid": APPID, "offer_id": "12345678",
            "ts": 1507530737, "zone_id": "1", "pf": "android", "amt": 10, "bill_no": "L-1"})
        else {
            unreachable!()
        };
        let sig = v1_sign(&m, uri, "secret", APP_KEY);
        let mut all = m.clone();
        all.insert("access_token".into(), json!(env.token));
        all.insert("sig".into(), json!(sig));
        m.insert(
            "mp_sig".into(),
            json!(v1_sign(&all, uri, "session_key", session_key)),
        );
        m.insert("sig".into(), json!(sig));
        Value::Object(m)
    };
    let post = |b: Value| {
        let req = env
            .http
            .post(format!("{}{uri}", env.sim.base_url()))
            .query(&[("access_token", env.token.as_str())])
            .json(&b);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    env.sim.set_faults(expiring());
    let bytes = serde_json::to_vec(&signed(SESSION_KEY)).unwrap();
    env.send_and_lose(uri, bytes, vec![("access_token".into(), env.token.clone())])
        .await;
    env.wait_for_order("L-1").await;
    env.sim.set_faults(Faults::default());
    assert_eq!(env.balance_of("u1"), 990);

    let v = post(signed(SESSION_KEY)).await;
    assert_eq!(
        (code(&v), v["errmsg"].as_str()),
        (90010, Some("session expired"))
    );
    assert!(says_nothing_about_bill(MidasApi::V1, 90010));
    assert_eq!(code(&post(signed(SESSION_KEY)).await), 90010);
    assert_eq!(code(&post(signed(OTHER_SESSION)).await), 90012);
    assert_eq!(env.balance_of("u1"), 990, "charged once");
}

#[tokio::test]
async fn without_a_known_session_the_fault_only_loses_the_answer() {
    let env = start().await;
    let b = body("u9", json!({"amount": 10, "bill_no": "L-2"}));
    let bytes = serde_json::to_vec(&b).unwrap();
    let query = vec![
        ("access_token".to_string(), env.token.clone()),
        ("signature".to_string(), signature(SESSION_KEY, &bytes)),
        ("sig_method".to_string(), "hmac_sha256".to_string()),
        ("pay_sig".to_string(), pay_sig(APP_KEY, PAY, &bytes)),
    ];
    env.sim.set_faults(expiring());
    env.send_and_lose(PAY, bytes, query).await;
    env.wait_for_order("L-2").await;
    env.sim.set_faults(Faults::default());
    assert_eq!(code(&env.call(PAY, &b, APP_KEY, SESSION_KEY).await), 90012);
}

// ------------------------------------------------------------ the crate's 2.0 client

fn params(openid: &str) -> V2Params {
    V2Params {
        openid: openid.into(),
        offer_id: "12345678".into(),
        zone_id: "1".into(),
        user_ip: "203.0.113.7".into(),
        env: V2Env::Production,
        ts: 1668136271,
        amount: None,
        bill_no: None,
        payitem: None,
        remark: None,
        pay_bill_no: None,
        query: None,
    }
}

#[tokio::test]
async fn the_v2_client_against_the_simulator() {
    let env = start().await;
    env.sim.register_session("u1", SESSION_KEY);
    let base = env.sim.base_url();
    let (token, key, session) = (
        Secret::new(env.token.clone()),
        Secret::new(APP_KEY),
        Secret::new(SESSION_KEY),
    );
    let call = |api: Api, p: V2Params, session: Secret| {
        let (http, base, token, key) = (env.http.clone(), base.clone(), token.clone(), key.clone());
        async move { v2::call(&http, &base, &token, &key, &session, api, &p).await }
    };

    let pay = V2Params {
        amount: Some(25),
        bill_no: Some("C-1".into()),
        payitem: Some("gem".into()),
        ..params("u1")
    };
    let a = call(Api::Pay, pay.clone(), session.clone()).await;
    assert_eq!(a.class, OutcomeClass::Success, "{a:?}");
    assert_eq!((a.errcode, a.body.balance), (Some(0), Some(975)));
    assert_eq!(
        (a.body.used_present_amount, a.body.bill_no.as_deref()),
        (Some(0), Some("C-1"))
    );
    let a = call(Api::Pay, pay, session.clone()).await;
    assert_eq!((a.class, a.errcode), (OutcomeClass::Duplicate, Some(90012)));

    let a = call(Api::GetBalance, params("u1"), session.clone()).await;
    assert_eq!(a.class, OutcomeClass::Success);
    let b = &a.body;
    assert_eq!(
        (b.balance, b.sum_cost, b.sum_save, b.first_save),
        (Some(975), Some(25), Some(1000), Some(1))
    );
    assert_eq!(
        (b.present_balance, b.sum_present, b.sum_balance),
        (Some(0), Some(0), Some(1000))
    );

    let refund = |bill: &str, amount| V2Params {
        amount: Some(amount),
        bill_no: Some(bill.into()),
        pay_bill_no: Some("C-1".into()),
        query: None,
        ..params("u1")
    };
    let a = call(Api::CancelPay, refund("CR-1", 20), session.clone()).await;
    assert_eq!(a.class, OutcomeClass::Success, "{a:?}");
    let a = call(Api::CancelPay, refund("CR-2", 6), session.clone()).await;
    assert_eq!(
        (a.class, a.errcode),
        (OutcomeClass::Definitive, Some(90018))
    );
    assert_eq!(env.balance_of("u1"), 995);

    // A wrong session key: 90010, definitive but says nothing about the bill.
    let a = call(Api::GetBalance, params("u1"), Secret::new(OTHER_SESSION)).await;
    assert_eq!(
        (a.class, a.errcode),
        (OutcomeClass::Definitive, Some(90010))
    );
    assert!(says_nothing_about_bill(MidasApi::V2, 90010));

    // Missing amount: nothing is sent.
    let before = env.ledger().calls.get("v2_present").copied();
    let a = call(
        Api::Present,
        V2Params {
            bill_no: Some("G-9".into()),
            ..params("u1")
        },
        session.clone(),
    )
    .await;
    assert_eq!(
        (a.class, a.errcode, a.http_status),
        (OutcomeClass::Definitive, None, None)
    );
    assert_eq!(env.ledger().calls.get("v2_present").copied(), before);

    // A revoked token: refresh and retry.
    env.sim.revoke_tokens();
    let a = call(Api::GetBalance, params("u1"), session).await;
    assert_eq!(
        (a.class, a.errcode),
        (OutcomeClass::TokenInvalid, Some(40001))
    );
}

/// A tiny server for answers the simulator never gives: oversized and redirects.
async fn odd_server() -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::post;
    let big = "x".repeat(v2::MAX_ANSWER_BYTES + 1);
    let app = axum::Router::new()
        .route(
            "/wxa/game/getbalance",
            post(move || {
                let big = big.clone();
                async move { format!(r#"{{"errcode":0,"balance":1,"pad":"{big}"}}"#) }
            }),
        )
        .route(
            "/wxa/game/pay",
            post(|| async {
                (
                    axum::http::StatusCode::FOUND,
                    [("location", "/wxa/game/present")],
                    "",
                )
            }),
        )
        .route(
            "/wxa/game/present",
            post(|| async { r#"{"errcode":0,"balance":1}"# }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn oversized_answers_and_redirects_are_unknown_outcomes() {
    let (base, task) = odd_server().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (t, k, s) = (
        Secret::new("tok-secret-1"),
        Secret::new("K"),
        Secret::new("S"),
    );
    let a = v2::call(&http, &base, &t, &k, &s, Api::GetBalance, &params("u1")).await;
    assert_eq!(a.class, OutcomeClass::Transient, "{a:?}");
    assert!(
        a.errmsg.as_deref().unwrap_or("").contains("larger"),
        "{a:?}"
    );
    assert!(a.body.balance.is_none());
    let pay = V2Params {
        amount: Some(1),
        bill_no: Some("B".into()),
        ..params("u1")
    };
    let a = v2::call(&http, &base, &t, &k, &s, Api::Pay, &pay).await;
    assert_eq!(
        (a.class, a.http_status),
        (OutcomeClass::Transient, Some(302)),
        "{a:?}"
    );
    assert!(a.errmsg.as_deref().unwrap_or("").contains("redirect"));
    assert!(
        !a.errmsg.unwrap_or_default().contains("tok-secret"),
        "no token in errors"
    );
    task.abort();
}
