//! The Midas simulator over real HTTP: requests are signed by an independent
//! implementation of the docs/midas-v1.md algorithm written here (hmac + sha2, not
//! `midas_worker::midas::sign`), so a mistake shared by the crate's signer and the
//! simulator's verifier cannot hide.

use std::time::Duration;

use hmac::{Hmac, Mac};
use midas_worker::config::{Dur, SimulatorConfig};
use midas_worker::secret::Secret;
use midas_worker::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};
use serde_json::{json, Map, Value};
use sha2::Sha256;

const APPID: &str = "wx1234567";
const APP_KEY: &str = "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u";
const SANDBOX_KEY: &str = "sandbox-key-for-tests-0123456789";
const APP_SECRET: &str = "app-secret-for-tests";
const OPENID: &str = "odkx20ENSNa2w5y3g_qOkOvBNM1g";
const SESSION_KEY: &str = "V7Q38/i2KXaqrQyl2Yx9Hg==";

// ------------------------------------------------------------ independent signer

fn hmac_hex(key: &str, msg: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(msg.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sign(params: &Map<String, Value>, uri: &str, key_name: &str, key: &str) -> String {
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let a = keys
        .iter()
        .map(|k| {
            let v = match &params[k.as_str()] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("unsignable {other}"),
            };
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&");
    let msg = format!("{a}&org_loc={uri}&method=POST&{key_name}={key}");
    hmac_hex(key, &msg)
}

/// Add `sig` (and `mp_sig` when a session key is given) to `body`.
fn signed(body: Value, uri: &str, key: &str, mp: Option<(&str, &str)>) -> Value {
    let Value::Object(mut m) = body else {
        panic!("body must be an object")
    };
    let sig = sign(&m, uri, "secret", key);
    if let Some((token, session_key)) = mp {
        let mut all = m.clone();
        all.insert("access_token".into(), json!(token));
        all.insert("sig".into(), json!(sig));
        m.insert(
            "mp_sig".into(),
            json!(sign(&all, uri, "session_key", session_key)),
        );
    }
    m.insert("sig".into(), json!(sig));
    Value::Object(m)
}

// ------------------------------------------------------------ harness

fn cfg(seed: u64) -> SimulatorConfig {
    SimulatorConfig {
        seed,
        initial_balance: 1000,
        ..SimulatorConfig::default()
    }
}

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

async fn start(c: SimulatorConfig) -> Env {
    let sim = Simulator::new(c, apps()).start().await.unwrap();
    let http = reqwest::Client::new();
    let mut env = Env {
        sim,
        http,
        token: String::new(),
    };
    env.token = env.stable_token(false).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    env
}

fn common(openid: &str) -> Value {
    json!({"openid": openid, "appid": APPID, "offer_id": "12345678",
           "ts": 1507530737, "zone_id": "1", "pf": "android"})
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.sim.base_url(), path)
    }

    async fn stable_token(&self, force: bool) -> Value {
        self.http
            .post(self.url("/cgi-bin/stable_token"))
            .json(&json!({"grant_type": "client_credential", "appid": APPID,
                          "secret": APP_SECRET, "force_refresh": force}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST a raw body; (status, parsed JSON or Null).
    async fn post_raw(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .query(&[("access_token", token)])
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sign with `key` for `path` and POST with the current token.
    async fn call(&self, path: &str, body: Value, key: &str) -> Value {
        let (status, v) = self
            .post_raw(path, &self.token, &signed(body, path, key, None))
            .await;
        assert_eq!(status, 200, "{path}: {v}");
        v
    }

    async fn call_mp(&self, path: &str, body: Value, session_key: &str) -> Value {
        let b = signed(body, path, APP_KEY, Some((&self.token, session_key)));
        self.post_raw(path, &self.token, &b).await.1
    }

    async fn ledger_http(&self) -> LedgerDump {
        self.http
            .get(self.url("/sim/ledger"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn code(v: &Value) -> i64 {
    v["errcode"]
        .as_i64()
        .unwrap_or_else(|| panic!("no errcode in {v}"))
}

const PAY: &str = "/cgi-bin/midas/pay";
const PRESENT: &str = "/cgi-bin/midas/present";
const CANCEL: &str = "/cgi-bin/midas/cancelpay";
const BALANCE: &str = "/cgi-bin/midas/getbalance";

// ------------------------------------------------------------ tests

#[tokio::test]
async fn official_vector_is_accepted_with_the_real_token() {
    let env = start(cfg(1)).await;
    env.sim.register_session(OPENID, SESSION_KEY);
    // The independent signer reproduces the documented sig.
    let Value::Object(m) = common(OPENID) else {
        unreachable!()
    };
    assert_eq!(
        sign(&m, BALANCE, "secret", APP_KEY),
        "1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b"
    );
    let mut with_token = m.clone();
    with_token.insert("access_token".into(), json!("ACCESSTOKEN"));
    with_token.insert(
        "sig".into(),
        json!("1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b"),
    );
    assert_eq!(
        sign(&with_token, BALANCE, "session_key", SESSION_KEY),
        "ff4c5bb39dea1002a8f03be0438724e1a8bcea5ebce8f221f9b9fea3bcf3bf76"
    );
    assert!(env.token.len() >= 64);
    let v = env.call_mp(BALANCE, common(OPENID), SESSION_KEY).await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(v["balance"], 1000);
    assert_eq!(v["first_save"], 1);
    assert_eq!(v["save_amt"], 1000);
    // The literal sample mp_sig (made with "ACCESSTOKEN") does not verify with our token.
    let mut sample = with(
        common(OPENID),
        json!({"sig": "1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b",
               "mp_sig": "ff4c5bb39dea1002a8f03be0438724e1a8bcea5ebce8f221f9b9fea3bcf3bf76"}),
    );
    assert_eq!(
        code(&env.post_raw(BALANCE, &env.token, &sample).await.1),
        90009
    );
    sample["sig"] = json!("0".repeat(64));
    assert_eq!(
        code(&env.post_raw(BALANCE, &env.token, &sample).await.1),
        90011
    );
    env.sim.shutdown().await;
}

#[tokio::test]
async fn sig_and_environment_keys() {
    let env = start(cfg(1)).await;
    let mut bad = signed(common("u1"), BALANCE, APP_KEY, None);
    bad["sig"] = json!("ab".repeat(32));
    assert_eq!(
        code(&env.post_raw(BALANCE, &env.token, &bad).await.1),
        90011
    );
    // A field changed after signing.
    let mut tampered = signed(common("u1"), BALANCE, APP_KEY, None);
    tampered["zone_id"] = json!("2");
    assert_eq!(
        code(&env.post_raw(BALANCE, &env.token, &tampered).await.1),
        90011
    );

    let sb = "/cgi-bin/midas/sandbox/getbalance";
    assert_eq!(code(&env.call(sb, common("u1"), SANDBOX_KEY).await), 0);
    assert_eq!(code(&env.call(sb, common("u1"), APP_KEY).await), 90011);
    assert_eq!(
        code(&env.call(BALANCE, common("u1"), SANDBOX_KEY).await),
        90011
    );
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 0);
    // Signed for the official uri but sent to the sandbox path.
    let b = signed(common("u1"), BALANCE, SANDBOX_KEY, None);
    assert_eq!(code(&env.post_raw(sb, &env.token, &b).await.1), 90011);
    // Optional fields are signed when sent.
    let v = env
        .call(
            BALANCE,
            with(common("u1"), json!({"user_ip": "1.2.3.4"})),
            APP_KEY,
        )
        .await;
    assert_eq!(code(&v), 0);
}

#[tokio::test]
async fn parameter_errors() {
    let env = start(cfg(1)).await;
    let (_, v) = env.post_raw(PAY, &env.token, &json!([1, 2])).await;
    assert_eq!(code(&v), 90018);
    for extra in [
        json!({"amt": 1.5, "bill_no": "b1"}),
        json!({"amt": 0, "bill_no": "b1"}),
        json!({"amt": "10", "bill_no": "b1"}),
        json!({"amt": 10, "bill_no": "has space"}),
        json!({"amt": 10, "bill_no": "x".repeat(64)}),
        json!({"amt": 10}),
    ] {
        let v = env
            .call(PAY, with(common("u1"), extra.clone()), APP_KEY)
            .await;
        assert_eq!(code(&v), 90018, "{extra}: {v}");
    }
    let mut unknown = common("u1");
    unknown["appid"] = json!("wxunknown");
    assert_eq!(code(&env.call(BALANCE, unknown, APP_KEY).await), 90018);
    assert_eq!(env.sim.ledger().applied, 0);
}

#[tokio::test]
async fn pay_present_cancel_and_dedup() {
    let env = start(cfg(1)).await;
    let pay = |bill: &str, amt: i64| with(common("u1"), json!({"amt": amt, "bill_no": bill}));

    let v = env.call(PAY, pay("B-1", 100), APP_KEY).await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(
        (v["balance"].as_i64(), v["bill_no"].as_str()),
        (Some(900), Some("B-1"))
    );
    assert_eq!(v["used_gen_amt"], 0);
    let v = env.call(PAY, pay("B-1", 100), APP_KEY).await;
    assert_eq!(code(&v), 90012);
    assert_eq!(v["errmsg"], "order already exists");
    let v = env.call(PAY, pay("B-2", 100_000), APP_KEY).await;
    assert_eq!(code(&v), 90013);

    let v = env
        .call(
            PRESENT,
            with(
                common("u1"),
                json!({"present_counts": 50, "bill_no": "G-1"}),
            ),
            APP_KEY,
        )
        .await;
    assert_eq!((code(&v), v["balance"].as_i64()), (0, Some(950)));
    let v = env
        .call(
            PRESENT,
            with(
                common("u1"),
                json!({"present_counts": 50, "bill_no": "G-1"}),
            ),
            APP_KEY,
        )
        .await;
    assert_eq!(code(&v), 90012);
    let v = env.call(PAY, pay("B-3", 30), APP_KEY).await;
    assert_eq!(
        (v["balance"].as_i64(), v["used_gen_amt"].as_i64()),
        (Some(920), Some(30))
    );

    let cancel = |bill: &str| with(common("u1"), json!({"bill_no": bill}));
    let v = env.call(CANCEL, cancel("B-1"), APP_KEY).await;
    assert_eq!((code(&v), v["bill_no"].as_str()), (0, Some("B-1")));
    assert_eq!(code(&env.call(CANCEL, cancel("B-1"), APP_KEY).await), 90015);
    assert_eq!(
        code(&env.call(CANCEL, cancel("NOPE"), APP_KEY).await),
        90000
    );

    let v = env.call(BALANCE, common("u1"), APP_KEY).await;
    assert_eq!(v["balance"], 1020);
    assert_eq!(v["gen_balance"], 20);
    assert_eq!(v["cost_sum"], 30);
    assert_eq!(v["present_sum"], 50);

    let l = env.ledger_http().await;
    let pays: Vec<_> = l.orders.iter().filter(|o| o.bill_no == "B-1").collect();
    assert_eq!(pays.len(), 1, "charged once");
    assert!(pays[0].cancelled);
    assert_eq!(l.applied, 4);
    assert_eq!(l.calls["pay"], 4);
    assert_eq!(l.calls["stable_token"], 1);
    assert_eq!(l.accounts.len(), 1);
    assert_eq!(l.accounts[0].balance, 1020);
}

#[tokio::test]
async fn mp_sig_session_keys() {
    let env = start(cfg(1)).await;
    // No key registered: mp_sig is not checked.
    assert_eq!(
        code(&env.call_mp(BALANCE, common("u2"), "anything").await),
        0
    );
    env.sim.register_session("u2", "key-one");
    assert_eq!(
        code(&env.call_mp(BALANCE, common("u2"), "key-one").await),
        0
    );
    assert_eq!(
        code(&env.call_mp(BALANCE, common("u2"), "wrong").await),
        90009
    );
    // Rotate over HTTP.
    let r = env
        .http
        .post(env.url("/sim/sessions"))
        .json(&json!({"openid": "u2", "session_key": "key-two"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        code(&env.call_mp(BALANCE, common("u2"), "key-one").await),
        90010
    );
    assert_eq!(
        code(&env.call_mp(BALANCE, common("u2"), "key-two").await),
        0
    );
    // Without mp_sig the call is still accepted.
    assert_eq!(code(&env.call(BALANCE, common("u2"), APP_KEY).await), 0);
}

#[tokio::test]
async fn tokens_revocation_and_refresh() {
    let mut env = start(cfg(1)).await;
    // Credentials.
    let v: Value = env
        .http
        .post(env.url("/cgi-bin/stable_token"))
        .json(&json!({"grant_type": "client_credential", "appid": APPID, "secret": "nope"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(code(&v), 40125);
    let v: Value = env
        .http
        .post(env.url("/cgi-bin/stable_token"))
        .json(&json!({"grant_type": "client_credential", "appid": "wxnone", "secret": APP_SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(code(&v), 40013);
    let b = signed(common("u1"), BALANCE, APP_KEY, None);
    assert_eq!(code(&env.post_raw(BALANCE, "", &b).await.1), 41001);
    assert_eq!(code(&env.post_raw(BALANCE, "bogus", &b).await.1), 40001);

    // Normal mode: same token, expires_in = ttl.
    let v = env.stable_token(false).await;
    assert_eq!(v["access_token"].as_str(), Some(env.token.as_str()));
    assert!(v["expires_in"].as_u64().unwrap() > 7000);

    let r = env.http.post(env.url("/sim/revoke")).send().await.unwrap();
    assert!(r.status().is_success());
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 40001);
    let v = env.stable_token(false).await;
    assert_eq!(
        v["access_token"].as_str(),
        Some(env.token.as_str()),
        "still the revoked one"
    );
    let v = env.stable_token(true).await;
    let fresh = v["access_token"].as_str().unwrap().to_string();
    assert_ne!(fresh, env.token);
    env.token = fresh;
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 0);

    // Legacy /cgi-bin/token: a new token each time, the previous still valid for now.
    let get = |env: &Env| {
        env.http
            .get(env.url("/cgi-bin/token"))
            .query(&[
                ("grant_type", "client_credential"),
                ("appid", APPID),
                ("secret", APP_SECRET),
            ])
            .send()
    };
    let t1: Value = get(&env).await.unwrap().json().await.unwrap();
    let t2: Value = get(&env).await.unwrap().json().await.unwrap();
    let (t1, t2) = (
        t1["access_token"].as_str().unwrap(),
        t2["access_token"].as_str().unwrap(),
    );
    assert_ne!(t1, t2);
    for t in [t1, t2] {
        assert_eq!(code(&env.post_raw(BALANCE, t, &b).await.1), 0);
    }

    // Handle-level revocation too.
    env.sim.revoke_tokens();
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 40001);
}

#[tokio::test]
async fn expired_token_is_42001() {
    let env = start(SimulatorConfig {
        token_ttl: Dur(Duration::from_secs(1)),
        ..cfg(1)
    })
    .await;
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 42001);
}

#[tokio::test]
async fn busy_and_502_do_not_apply() {
    let env = start(cfg(1)).await;
    let before = env.sim.ledger();
    let r = env
        .http
        .post(env.url("/sim/faults"))
        .json(&json!({"busy_rate": 1.0}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let pay = with(common("u1"), json!({"amt": 10, "bill_no": "F1"}));
    let v = env.call(PAY, pay.clone(), APP_KEY).await;
    assert_eq!((code(&v), v["errmsg"].as_str()), (-1, Some("system error")));
    let after = env.sim.ledger();
    assert_eq!(after.applied, before.applied);
    assert!(after.orders.is_empty() && after.accounts.is_empty());

    env.sim.set_faults(Faults {
        http_502_rate: 1.0,
        ..Faults::default()
    });
    let signed_pay = signed(pay.clone(), PAY, APP_KEY, None);
    let (status, v) = env.post_raw(PAY, &env.token, &signed_pay).await;
    assert_eq!((status, v), (502, Value::Null));
    assert!(env.sim.ledger().orders.is_empty());

    // stall_then_drop: not applied, non-JSON 504 after the stall.
    env.sim.set_faults(Faults {
        stall_then_drop_rate: 1.0,
        stall_ms: 100,
        ..Faults::default()
    });
    let (status, v) = env.post_raw(PAY, &env.token, &signed_pay).await;
    assert_eq!((status, v), (504, Value::Null));
    assert!(env.sim.ledger().orders.is_empty());

    // processing: cancelpay only.
    env.sim.set_faults(Faults::default());
    assert_eq!(code(&env.call(PAY, pay, APP_KEY).await), 0);
    env.sim.set_faults(Faults {
        processing_rate: 1.0,
        ..Faults::default()
    });
    let cancel = with(common("u1"), json!({"bill_no": "F1"}));
    assert_eq!(
        code(&env.call(CANCEL, cancel.clone(), APP_KEY).await),
        90016
    );
    assert!(!env.sim.ledger().orders[0].cancelled);
    env.sim.set_faults(Faults::default());
    assert_eq!(code(&env.call(CANCEL, cancel, APP_KEY).await), 0);

    // token_revoke: 40001 and the token stays dead.
    env.sim.set_faults(Faults {
        token_revoke_rate: 1.0,
        ..Faults::default()
    });
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 40001);
    env.sim.set_faults(Faults::default());
    assert_eq!(code(&env.call(BALANCE, common("u1"), APP_KEY).await), 40001);
}

#[tokio::test]
async fn apply_then_stall_charges_but_the_answer_is_lost() {
    let env = start(SimulatorConfig {
        apply_then_stall_rate: 1.0,
        stall: Dur(Duration::from_secs(2)),
        ..cfg(1)
    })
    .await;
    let body = signed(
        with(common("u1"), json!({"amt": 10, "bill_no": "S1"})),
        PAY,
        APP_KEY,
        None,
    );
    let started = std::time::Instant::now();
    let err = env
        .http
        .post(env.url(PAY))
        .query(&[("access_token", env.token.as_str())])
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let l = env.sim.ledger();
    assert_eq!(l.orders.len(), 1);
    assert_eq!(l.orders[0].bill_no, "S1");
    assert_eq!(l.accounts[0].balance, 990);
    // The retry with the same bill_no is deduplicated.
    env.sim.set_faults(Faults::default());
    assert_eq!(
        code(
            &env.call(
                PAY,
                with(common("u1"), json!({"amt": 10, "bill_no": "S1"})),
                APP_KEY
            )
            .await
        ),
        90012
    );
    assert_eq!(env.sim.ledger().accounts[0].balance, 990);
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_fixed_seed_repeats_the_fault_sequence() {
    async fn run(seed: u64) -> Vec<i64> {
        let env = start(SimulatorConfig {
            busy_rate: 0.5,
            ..cfg(seed)
        })
        .await;
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(code(&env.call(BALANCE, common("u1"), APP_KEY).await));
        }
        env.sim.shutdown().await;
        out
    }
    let a = run(1234).await;
    assert_eq!(a, run(1234).await);
    assert!(a.contains(&0) && a.contains(&-1), "{a:?}");
    assert_ne!(a, run(4321).await);
}

#[tokio::test]
async fn healthz_and_base_url() {
    let env = start(cfg(1)).await;
    assert!(env.sim.base_url().starts_with("http://127.0.0.1:"));
    let body = env
        .http
        .get(env.url("/healthz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "ok");
    let addr = env.sim.addr;
    env.sim.shutdown().await;
    assert!(reqwest::get(format!("http://{addr}/healthz"))
        .await
        .is_err());
}
