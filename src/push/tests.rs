//! One push through every check: URL signature, safe mode, PayEventSig.

use super::decrypt::{encrypt, AesKey};
use super::*;

const TOKEN: &str = "AAAAA";
const APPID: &str = "wxba5fad812f8e6fb9";
const GOODS_EVENT: &str = "minigame_game_pay_goods_deliver_notify";
const GOODS: &str = r#"{"OpenId":"o_test_openid","Env":0,"OutTradeNo":"T20240101001","GoodsInfo":{"ProductId":"id_100001","Quantity":1,"ZoneId":"1","OrigPrice":600,"ActualPrice":600,"Attach":"a"}}"#;
const GOODS_SIG: &str = "73ed4bdbe0509468c6e5ff769dcbd2efcdf1b72606c24f1f34b0ec065ed26cfe";

fn app(aes: bool) -> PushApp {
    PushApp {
        appid: APPID.into(),
        token: Secret::new(TOKEN),
        aes: aes.then(|| AesKey::from_encoding_key(&"A".repeat(43)).unwrap()),
        app_key: Secret::new("12345"),
        sandbox_key: None,
    }
}

fn q(ts: &str, nonce: &str, sig: &str) -> Query {
    Query {
        signature: sig.into(),
        timestamp: ts.into(),
        nonce: nonce.into(),
        ..Query::default()
    }
}

fn plain_body() -> Vec<u8> {
    event::tests::envelope(GOODS_EVENT, GOODS, Some(GOODS_SIG), None)
}

#[test]
fn the_url_check_answers_echostr_only_with_the_right_signature() {
    let mut good = q(
        "1714036504",
        "1514711492",
        "f464b24fc39322e44b38aa78f5edd27bd1441696",
    );
    good.echostr = Some("echo-123".into());
    assert_eq!(url_check(&app(false), &good).unwrap(), "echo-123");
    let mut bad = good.clone();
    bad.nonce = "1".into();
    assert_eq!(url_check(&app(false), &bad), Err(Reason::BadSignature));
}

#[test]
fn a_plain_push_with_the_check_signature_is_taken() {
    let q = q(
        "1714037059",
        "486452656",
        "899cf89e464efb63f54ddac96b0a0a235f53aa78",
    );
    match receive(&app(false), &q, &plain_body(), "t", false) {
        Ok(Verdict::Event(v)) => assert_eq!(v.dedup_key, "T20240101001"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_bad_url_signature_refuses_the_push_before_anything_else() {
    let q = q(
        "1714037059",
        "486452656",
        "899cf89e464efb63f54ddac96b0a0a235f53aa79",
    );
    let r = receive(&app(false), &q, &plain_body(), "t", false);
    assert_eq!(r, Err(Reason::BadSignature));
    assert_eq!(r.unwrap_err().errcode(), 40001);
}

fn safe_query(encrypt: &str, ts: &str, nonce: &str) -> Query {
    Query {
        signature: verify::url_signature(TOKEN, ts, nonce),
        timestamp: ts.into(),
        nonce: nonce.into(),
        encrypt_type: Some("aes".into()),
        msg_signature: Some(verify::msg_signature(TOKEN, ts, nonce, encrypt)),
        ..Query::default()
    }
}

fn safe_body(encrypt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"ToUserName": "gh_97417a04a28d", "Encrypt": encrypt}))
        .unwrap()
}

#[test]
fn the_safe_mode_check_value_decrypts_to_an_event_this_receiver_does_not_take() {
    let enc = decrypt::tests::ENCRYPT;
    let mut q = safe_query(enc, "1714112445", "415670741");
    assert_eq!(
        q.msg_signature.as_deref(),
        Some("046e02f8204d34f8ba5fa3b1db94908f3df2e9b3")
    );
    // decrypted and verified: the debug_demo event is then unknown
    assert_eq!(
        receive(&app(true), &q, &safe_body(enc), "t", false),
        Err(Reason::Event(Refusal::UnknownEvent))
    );
    q.msg_signature = Some("046e02f8204d34f8ba5fa3b1db94908f3df2e9b4".into());
    assert_eq!(
        receive(&app(true), &q, &safe_body(enc), "t", false),
        Err(Reason::BadMsgSignature)
    );
    // a safe-mode push for an app without an EncodingAESKey
    assert_eq!(
        receive(
            &app(false),
            &safe_query(enc, "1", "2"),
            &safe_body(enc),
            "t",
            false
        ),
        Err(Reason::NoAesKey)
    );
}

#[test]
fn a_safe_mode_item_push_is_taken_and_one_for_another_app_is_refused() {
    let key = AesKey::from_encoding_key(&"A".repeat(43)).unwrap();
    let enc = encrypt(&key, &plain_body(), APPID, [3; 16]);
    match receive(
        &app(true),
        &safe_query(&enc, "10", "20"),
        &safe_body(&enc),
        "t",
        false,
    ) {
        Ok(Verdict::Event(v)) => assert_eq!(v.kind, Kind::GoodsDelivered),
        other => panic!("{other:?}"),
    }
    let other = encrypt(&key, &plain_body(), "wx0000000000000000", [3; 16]);
    let r = receive(
        &app(true),
        &safe_query(&other, "10", "20"),
        &safe_body(&other),
        "t",
        false,
    );
    assert_eq!(r, Err(Reason::Decrypt(DecryptError::WrongAppid)));
    assert_eq!(r.unwrap_err().label(), "appid_mismatch");
}

fn settings(api: &str, aes: &str) -> Result<crate::config::Settings, crate::config::ConfigError> {
    let text = format!(
        "[midas]\nenvironment = \"production\"\n[[apps]]\nappid = \"wx1\"\noffer_id = \"1\"\n\
         app_key_env = \"K\"\napp_secret_env = \"S\"\napi = \"{api}\"\ndefault_user_ip = \"1.2.3.4\"\n\
         push_token_env = \"T\"\npush_aes_key_env = \"A\"\n"
    );
    let env = [("K", "key"), ("S", "secret"), ("T", "token"), ("A", aes)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::config::load_from(&text, &env, "t")
}

#[test]
fn the_push_keys_are_read_for_v2_apps_and_refused_elsewhere() {
    let s = settings("v2", &"A".repeat(43)).unwrap();
    let apps = PushApp::from_settings(&s);
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].token.expose(), "token");
    assert!(apps[0].aes.is_some() && apps[0].sandbox_key.is_none());
    assert!(!format!("{apps:?}").contains("token"), "no secret in Debug");
    let e = settings("v1", &"A".repeat(43)).unwrap_err().to_string();
    assert!(e.contains("apps[0].push_token_env"), "{e}");
    let e = settings("v2", "short").unwrap_err().to_string();
    assert!(
        e.contains("apps[0].push_aes_key_env") && !e.contains("short"),
        "{e}"
    );
}
