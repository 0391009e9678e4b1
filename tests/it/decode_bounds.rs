//! Bounds of the command decoder (hardening): a body over `broker.max_command_bytes`
//! is refused unread, a body that does not decode is salvaged by a bounded typed
//! reader, message texts are cut to `MAX_MESSAGE_CHARS` so a `rejected` reply never
//! echoes a big value, and a JSON array is never read as a command. The same bounds
//! through the real worker are in `tests/it/hardening.rs`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use midas_worker::command::{check_size, clip, decode, Rejection, Reply, MAX_MESSAGE_CHARS};
use midas_worker::config::{self, Settings};

const CONFIG: &str = include_str!("../../config.toml");

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| config::load_from(CONFIG, &BTreeMap::new(), "t").expect("config"))
}

/// Two apps configured (appid required).
fn two_apps() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let text = format!(
            "{CONFIG}\n[[apps]]\nappid = \"wx7654321\"\noffer_id = \"87654321\"\napp_key_env = \"OTHER_APP_KEY\"\napp_secret_env = \"OTHER_APP_SECRET\"\n"
        );
        config::load_from(&text, &BTreeMap::new(), "t").expect("config")
    })
}

fn err(body: &[u8]) -> Rejection {
    *decode(body, settings()).expect_err("invalid")
}

fn check(body: &[u8], s: &Settings) -> Result<(), Box<Rejection>> {
    decode(body, s).map(|_| ())
}

#[test]
fn clip_cuts_on_a_char_boundary_with_an_ellipsis() {
    assert_eq!(clip("abc", 3), "abc");
    assert_eq!(clip("abcd", 3), "ab…");
    assert_eq!(clip("ééééé", 4), "ééé…");
    assert_eq!(clip("", 0), "");
    let long = "日".repeat(1000);
    let c = clip(&long, MAX_MESSAGE_CHARS);
    assert_eq!(c.chars().count(), MAX_MESSAGE_CHARS);
    assert!(c.ends_with('…'));
}

#[test]
fn an_offending_value_is_not_echoed_whole() {
    let huge = "x".repeat(100_000);
    let r =
        err(format!(r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":"{huge}"}}"#).as_bytes());
    assert!(
        r.message.chars().count() <= MAX_MESSAGE_CHARS,
        "{}",
        r.message.len()
    );
    assert_eq!(
        r.bill_no.as_deref(),
        Some("B-1"),
        "salvaged despite the big value"
    );
    let reply = Reply::rejected(&r, "t".into());
    assert!(reply.to_bytes().len() < 1_000);
    let r = err(format!(r#"{{"op":"pay","bill_no":"B-1","{huge}":1}}"#).as_bytes());
    assert!(r.message.chars().count() <= MAX_MESSAGE_CHARS);
}

#[test]
fn salvage_skips_other_fields_and_types() {
    let r = err(br#"{"x":[1,{"a":[2]}],"op":7,"bill_no":"B-9","openid":{"o":1},"amt":"no"}"#);
    assert_eq!(r.bill_no.as_deref(), Some("B-9"));
    assert_eq!(r.op, None);
    assert_eq!(r.openid, None);
    // an array is not read positionally (neither as a command nor salvaged)
    let r = err(br#"["pay","B-1","o1",null,null,null,null,null,10]"#);
    assert_eq!((r.op, r.bill_no), (None, None));
    assert!(r.message.contains("object"), "{}", r.message);
    assert!(decode(b" \n{\"op\":\"balance\",\"openid\":\"o\"}", settings()).is_ok());
    let r = err(format!(r#"{{"bill_no":"B-2","op":"{}"}}"#, "p".repeat(10_000)).as_bytes());
    assert_eq!(r.bill_no.as_deref(), Some("B-2"));
    assert_eq!(r.op.map(|o| o.chars().count()), Some(64));
}

#[test]
fn an_oversize_body_is_refused_unread() {
    let body = pay_body_of(70_000);
    let r = *check_size(&body, 65_536).unwrap_err();
    assert_eq!(r.code, "invalid_command");
    assert!(r.message.contains("65536"), "{}", r.message);
    assert_eq!(r.bill_no, None, "nothing read");
    assert!(check_size(&body, body.len()).is_ok());
}

fn pay_body_of(n: usize) -> Vec<u8> {
    let pad = n.saturating_sub(60);
    format!(
        r#"{{"op":"pay","bill_no":"B-1","openid":"{}","amt":1}}"#,
        "o".repeat(pad)
    )
    .into_bytes()
}

/// Whatever the body, the `rejected` reply stays small: no offending value, key or
/// string is echoed whole in `errmsg`, and an oversize body is refused unread.
#[test]
fn rejected_replies_never_echo_a_big_value() {
    let big = "v".repeat(1 << 20);
    let bodies = [
        format!(r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":"{big}"}}"#),
        format!(r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":1,"{big}":1}}"#),
        format!(r#"{{"op":"{big}","bill_no":"B-1","openid":"o"}}"#),
        format!(r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":1,"pay_item":"{big}"}}"#),
        format!(r#""{big}""#),
        format!("[{}1]", "1,".repeat(1 << 19)),
        format!(r#"{{"op":"pay","bill_no":"{big}","openid":"o","amt":1}}"#),
    ];
    for body in &bodies {
        for settings in [settings(), two_apps()] {
            let rej = check(body.as_bytes(), settings).expect_err("invalid");
            let reply = Reply::rejected(&rej, "2024-01-01T00:00:00.000Z".into());
            assert!(
                reply.to_bytes().len() < 1_500,
                "reply of {} bytes for a body of {}",
                reply.to_bytes().len(),
                body.len()
            );
            let oversize = check_size(body.as_bytes(), 65_536).expect_err("oversize");
            assert_eq!(oversize.code, "invalid_command");
            assert!(
                oversize.bill_no.is_none() && oversize.op.is_none(),
                "unread"
            );
        }
    }
}

/// A command is a JSON object: the same fields as an array (which a derived decoder
/// would read positionally) are refused.
#[test]
fn an_array_is_never_a_command() {
    for body in [
        r#"["pay","B-1","o1",null,null,null,null,null,10]"#,
        r#" ["balance",null,"o1"]"#,
        r#"[]"#,
    ] {
        let r = check(body.as_bytes(), settings()).expect_err("array");
        assert_eq!(r.code, "invalid_command");
        assert_eq!((r.op.as_deref(), r.bill_no.as_deref()), (None, None));
    }
    check(br#"{"op":"balance","openid":"o1"}"#, settings()).expect("object");
}
