//! Unit tests of command decoding and validation (1.0 and 2.0 apps) and of the
//! reply's serialized form.

use super::*;
use crate::config::Settings;
use std::collections::BTreeMap;

pub(crate) fn settings() -> Settings {
    crate::config::load_from(include_str!("../../config.toml"), &BTreeMap::new(), "t").unwrap()
}

fn ok(s: &str) -> Command {
    decode(s.as_bytes(), &settings()).unwrap()
}
fn err(s: &[u8]) -> Rejection {
    *decode(s, &settings()).unwrap_err()
}

#[test]
fn a_pay_gets_app_defaults() {
    let c = ok(r#"{"op":"pay","bill_no":"B-1","openid":"o1","amt":10}"#);
    assert_eq!(c.params.appid, "wx1234567");
    assert_eq!(c.params.zone_id, "1");
    assert_eq!(c.params.pf, "android");
    assert_eq!(c.params.amt, Some(10));
    assert!(!c.params.canonical().contains("session_key"));
}

#[test]
fn rejections_are_clear_and_salvage_the_bill_no() {
    let r = err(br#"{"op":"pay","bill_no":"B-1","openid":"o1","amount":10}"#);
    assert_eq!(r.code, "invalid_command");
    assert!(r.message.contains("amount"), "{}", r.message);
    assert_eq!(r.bill_no.as_deref(), Some("B-1"));
    let r = err(br#"{"op":"pay","bill_no":"B-1","openid":"o1","amt":0}"#);
    assert!(r.message.contains("amt"));
    let r = err(br#"{"op":"pay","bill_no":"B-1","openid":"o1","amt":2147483648}"#);
    assert!(r.message.contains("amt"));
    let r = err(br#"{"op":"pay","bill_no":"B 1","openid":"o1","amt":1}"#);
    assert!(r.message.contains("bill_no") && r.bill_no.is_none());
    let r = err(br#"{"op":"pay","bill_no":"B-1","openid":"o1","amt":1,"appid":"wxnope"}"#);
    assert_eq!(r.code, "unknown_app");
    let r = err(b"\xff\xfe not json");
    assert_eq!(r.code, "invalid_command");
    let r = err(br#"{"op":"refund","bill_no":"B-2","openid":"o1"}"#);
    assert!(r.message.contains("op"));
    assert_eq!(r.bill_no.as_deref(), Some("B-2"));
    let r = err(br#"{"op":"pay","op":"pay","bill_no":"B-1","openid":"o1","amt":1}"#);
    assert!(r.message.contains("duplicate"), "{}", r.message);
    let r = err(br#"{"op":"pay","bill_no":"B-1","openid":"o1","amt":1.5}"#);
    assert!(
        r.message.contains("amt") || r.message.contains("float"),
        "{}",
        r.message
    );
}

/// A v1 app (`wx1`) and two v2 apps (`wx2` with a default user_ip, `wx3` without).
fn two_apis() -> Settings {
    let text = r#"
[[apps]]
appid = "wx1"
offer_id = "1"
app_key_env = "K"
app_secret_env = "S"
[[apps]]
appid = "wx2"
offer_id = "2"
app_key_env = "K"
app_secret_env = "S"
api = "v2"
default_user_ip = "203.0.113.7"
[[apps]]
appid = "wx3"
offer_id = "3"
app_key_env = "K"
app_secret_env = "S"
api = "v2"
"#;
    crate::config::load_from(text, &BTreeMap::new(), "t").unwrap()
}

fn v2(s: &str) -> Result<Command, Box<Rejection>> {
    decode(s.as_bytes(), &two_apis())
}

fn v2_err(s: &str, field: &str) {
    let r = v2(s).expect_err(s);
    assert_eq!(r.code, "invalid_command", "{s}");
    assert!(r.message.contains(field), "{s}: {}", r.message);
}

#[test]
fn a_v2_refund_names_its_pay_and_amount() {
    let c = v2(r#"{"op":"cancel_pay","appid":"wx2","bill_no":"R-1","pay_bill_no":"P-1","amt":3,"openid":"o","session_key":"k"}"#).unwrap();
    assert_eq!(c.params.pay_bill_no.as_deref(), Some("P-1"));
    assert_eq!(
        (c.params.bill_no.as_deref(), c.params.amt),
        (Some("R-1"), Some(3))
    );
    assert!(c.params.canonical().contains(r#""pay_bill_no":"P-1""#));
    // user_ip stays out of the job: the app's default is used when calling
    let c =
        v2(r#"{"op":"pay","appid":"wx2","bill_no":"P-1","amt":3,"openid":"o","session_key":"k"}"#)
            .unwrap();
    assert_eq!(c.params.user_ip, None);
    let c = v2(
        r#"{"op":"balance","appid":"wx3","openid":"o","session_key":"k","user_ip":"198.51.100.2"}"#,
    )
    .unwrap();
    assert_eq!(c.params.user_ip.as_deref(), Some("198.51.100.2"));
}

#[test]
fn v1_jobs_keep_their_canonical_form() {
    let c = v2(r#"{"op":"cancel_pay","appid":"wx1","bill_no":"P-1","openid":"o"}"#).unwrap();
    assert_eq!(
        c.params.canonical(),
        r#"{"op":"cancel_pay","bill_no":"P-1","openid":"o","appid":"wx1","zone_id":"1","pf":"android"}"#
    );
}

#[test]
fn invalid_v2_commands_name_the_field() {
    let sk = r#""openid":"o","session_key":"k""#;
    // v2 rules
    v2_err(
        r#"{"op":"pay","appid":"wx2","bill_no":"P","amt":1,"openid":"o"}"#,
        "session_key",
    );
    v2_err(
        &format!(r#"{{"op":"pay","appid":"wx3","bill_no":"P","amt":1,{sk}}}"#),
        "user_ip",
    );
    v2_err(
        &format!(r#"{{"op":"balance","appid":"wx3",{sk}}}"#),
        "user_ip",
    );
    v2_err(
        &format!(r#"{{"op":"pay","appid":"wx2","bill_no":"_P","amt":1,{sk}}}"#),
        "bill_no",
    );
    v2_err(
        &format!(r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"R","amt":1,{sk}}}"#),
        "pay_bill_no",
    );
    v2_err(
        &format!(r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"R","pay_bill_no":"P",{sk}}}"#),
        "amt",
    );
    v2_err(
        &format!(
            r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"R","pay_bill_no":"_P","amt":1,{sk}}}"#
        ),
        "pay_bill_no",
    );
    v2_err(
        &format!(
            r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"P","pay_bill_no":"P","amt":1,{sk}}}"#
        ),
        "pay_bill_no",
    );
    v2_err(
        &format!(
            r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"R","pay_bill_no":"P","amt":0,{sk}}}"#
        ),
        "amt",
    );
    v2_err(
        &format!(r#"{{"op":"pay","appid":"wx2","bill_no":"P","pay_bill_no":"Q","amt":1,{sk}}}"#),
        "pay_bill_no",
    );
    v2_err(
        &format!(
            r#"{{"op":"cancel_pay","appid":"wx2","bill_no":"R","pay_bill_no":"P","amt":1,"pay_item":"x",{sk}}}"#
        ),
        "pay_item",
    );
    // 2.0-only fields on a v1 app
    v2_err(
        r#"{"op":"cancel_pay","appid":"wx1","bill_no":"P","pay_bill_no":"P0","openid":"o"}"#,
        "pay_bill_no",
    );
    v2_err(
        r#"{"op":"cancel_pay","appid":"wx1","bill_no":"P","amt":1,"openid":"o"}"#,
        "amt",
    );
    // `_` is fine on v1, and no session_key is needed there
    assert!(v2(r#"{"op":"pay","appid":"wx1","bill_no":"_P","amt":1,"openid":"o"}"#).is_ok());
}

#[test]
fn first_save_keeps_each_apis_type() {
    let r = |f| Reply {
        first_save: Some(f),
        ..Reply::default()
    };
    let text = |f| String::from_utf8(r(f).to_bytes()).unwrap();
    assert!(text(FirstSave::Flag(true)).contains(r#""first_save":true"#));
    assert!(text(FirstSave::Number(1)).contains(r#""first_save":1"#));
    let back: Reply = serde_json::from_slice(&r(FirstSave::Flag(false)).to_bytes()).unwrap();
    assert_eq!(back.first_save, Some(FirstSave::Flag(false)));
}

#[test]
fn bill_no_bounds() {
    assert!(valid_bill_no(&"a".repeat(63)));
    assert!(!valid_bill_no(&"a".repeat(64)));
    assert!(!valid_bill_no(""));
    assert!(!valid_bill_no("é"));
}

#[test]
fn text_fields_refuse_control_invisible_and_bidi_characters() {
    let hidden = [
        '\u{0}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}', '\u{200b}', '\u{200d}', '\u{200f}',
        '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{2028}', '\u{2029}', '\u{feff}',
        '\u{61c}',
    ];
    for c in hidden {
        assert!(is_hidden_char(c), "{:?}", c);
        for field in [
            "openid",
            "zone_id",
            "pf",
            "user_ip",
            "pay_item",
            "app_remark",
            "session_key",
        ] {
            let value = format!("ab{c}cd");
            let body = serde_json::json!({
                "op": "pay", "bill_no": "B-1", "openid": "o1", "amt": 1, field: value,
            });
            let r = err(body.to_string().as_bytes());
            assert_eq!(r.code, "invalid_command", "{field} {c:?}");
            assert!(r.message.contains(field), "{field}: {}", r.message);
        }
    }
    // ordinary text outside ASCII is fine
    for ok_char in ['é', '中', '\u{1F600}', '\u{2030}', '\u{2065}'] {
        assert!(!is_hidden_char(ok_char), "{ok_char:?}");
    }
    let c = ok(r#"{"op":"pay","bill_no":"B-1","openid":"玩家é","amt":1}"#);
    assert_eq!(c.params.openid, "玩家é");
}

#[test]
fn user_ip_must_be_an_ip_address() {
    for ip in ["203.0.113.7", "2001:db8::1", "::1"] {
        let c = ok(&format!(
            r#"{{"op":"pay","bill_no":"B-1","openid":"o1","amt":1,"user_ip":"{ip}"}}"#
        ));
        assert_eq!(c.params.user_ip.as_deref(), Some(ip));
    }
    for bad in ["localhost", "1.2.3", "203.0.113.7:80", "203.0.113.7 ", "x"] {
        let body = serde_json::json!({
            "op": "pay", "bill_no": "B-1", "openid": "o1", "amt": 1, "user_ip": bad,
        });
        let r = err(body.to_string().as_bytes());
        assert_eq!(r.code, "invalid_command", "{bad:?}");
        assert!(r.message.contains("user_ip"), "{bad:?}: {}", r.message);
    }
}
