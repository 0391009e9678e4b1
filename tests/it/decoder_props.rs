//! Hostile input: the command decoder against arbitrary bytes, arbitrary JSON, deep
//! nesting, huge strings, duplicate keys, numbers at and past every bound,
//! non-UTF-8 and unknown fields. `decode` never panics; a valid command round-trips
//! through its canonical form; an invalid one is a `Rejection` with a non-empty
//! message and a code in {invalid_command, unknown_app}. The last test sends a batch
//! of generated hostile bodies through the real worker: each is dead-lettered
//! unchanged, answered `rejected`, and never reaches Midas.
//!
//! (`fuzz/` holds a cargo-fuzz target for the same function: `cargo +nightly fuzz run
//! decode`; CI runs these proptests instead.)

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use midas_worker::command::{
    decode, valid_bill_no, Command, Op, Rejection, Status, MAX_AMOUNT, MAX_MESSAGE_CHARS,
};
use midas_worker::config::{self, Settings};
use midas_worker::sim::Faults;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::{json, Map, Value};

const CONFIG: &str = include_str!("../../config.toml");

/// One app configured (appid optional), as shipped.
fn one_app() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| config::load_from(CONFIG, &BTreeMap::new(), "t").expect("config"))
}

/// Two apps configured (appid required).
fn two_apps() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        // a second [[apps]] entry (offer_id in TOML: an env override of a new key
        // that looks like a number would be read as an integer)
        let text = format!(
            "{}\n[[apps]]\nappid = \"wx7654321\"\noffer_id = \"87654321\"\napp_key_env = \"OTHER_APP_KEY\"\napp_secret_env = \"OTHER_APP_SECRET\"\n",
            CONFIG
        );
        config::load_from(&text, &BTreeMap::new(), "t").expect("config")
    })
}

const FIELDS: [&str; 12] = [
    "op",
    "bill_no",
    "openid",
    "session_key",
    "appid",
    "zone_id",
    "pf",
    "user_ip",
    "amt",
    "present_counts",
    "pay_item",
    "app_remark",
];

/// Number literals at and past every bound, as JSON text.
const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "2147483647",
    "2147483648",
    "-1",
    "-2147483648",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "1e20",
    "1.0",
    "1.5",
    "-0",
    "1E2",
];

/// The invariants every outcome must hold. Returns the outcome for further checks.
fn check(body: &[u8], settings: &Settings) -> Result<Command, Box<Rejection>> {
    match decode(body, settings) {
        Ok(cmd) => {
            let p = &cmd.params;
            // what was accepted is within the contract
            match p.op {
                Op::Balance => assert!(p.bill_no.is_none()),
                _ => assert!(p.bill_no.as_deref().is_some_and(valid_bill_no), "{p:?}"),
            }
            assert_eq!(p.amt.is_some(), p.op == Op::Pay, "{p:?}");
            assert_eq!(p.present_counts.is_some(), p.op == Op::Present, "{p:?}");
            for n in [p.amt, p.present_counts].into_iter().flatten() {
                assert!((1..=MAX_AMOUNT).contains(&n), "{p:?}");
            }
            assert!(!p.openid.is_empty());
            assert!(settings.app(&p.appid).is_some());
            // the canonical form is itself a valid command with the same parameters
            let again = decode(p.canonical().as_bytes(), settings).expect("canonical decodes");
            assert_eq!(&again.params, p);
            assert_eq!(again.params.canonical(), p.canonical());
            Ok(cmd)
        }
        Err(rej) => {
            assert!(!rej.message.trim().is_empty(), "empty message");
            assert!(
                matches!(rej.code, "invalid_command" | "unknown_app"),
                "code {}",
                rej.code
            );
            if let Some(b) = &rej.bill_no {
                assert!(valid_bill_no(b), "salvaged bill_no {b:?}");
            }
            for s in [&rej.op, &rej.openid, &rej.appid].into_iter().flatten() {
                assert!(s.chars().count() <= 64, "salvaged text is truncated");
            }
            assert!(
                rej.message.chars().count() <= MAX_MESSAGE_CHARS,
                "message of {} chars",
                rej.message.chars().count()
            );
            Err(rej)
        }
    }
}

fn check_both(body: &[u8]) {
    check(body, one_app()).ok();
    check(body, two_apps()).ok();
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(NUMBERS.to_vec()).prop_map(|n| serde_json::from_str(n).unwrap()),
        ".{0,40}".prop_map(Value::String),
        "[A-Za-z0-9_-]{1,70}".prop_map(Value::String),
        prop::sample::select(vec![
            "pay",
            "present",
            "cancel_pay",
            "balance",
            "wx1234567",
            "wxnope",
            ""
        ])
        .prop_map(|s| Value::String(s.into())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
                    ".{0,12}"
                ],
                inner,
                0..10
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A JSON object of real field names (and sometimes unknown ones) with hostile values.
fn command_like() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        prop_oneof![
            8 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
            1 => prop::sample::select(vec!["amount", "Amt", "bill", "op ", "extra"]).prop_map(String::from),
        ],
        leaf(),
        0..12,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A valid command (any op) with the JSON that says it.
fn valid_command() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["pay", "present", "cancel_pay", "balance"]),
        "[A-Za-z0-9_-]{1,63}",
        "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,40}",
        1..=MAX_AMOUNT,
        prop::option::of("[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,20}"),
        prop::option::of(Just("wx1234567")),
        prop::option::of("[0-9]{1,3}"),
    )
        .prop_map(|(op, bill, openid, n, text, appid, zone)| {
            let mut m = Map::new();
            m.insert("op".into(), json!(op));
            m.insert("openid".into(), json!(openid));
            if op != "balance" {
                m.insert("bill_no".into(), json!(bill));
            }
            match op {
                "pay" => {
                    m.insert("amt".into(), json!(n));
                    if let Some(t) = &text {
                        m.insert("app_remark".into(), json!(t));
                    }
                }
                "present" => {
                    m.insert("present_counts".into(), json!(n));
                }
                _ => {}
            }
            if let Some(a) = appid {
                m.insert("appid".into(), json!(a));
            }
            if let Some(z) = zone {
                m.insert("zone_id".into(), json!(z));
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(PropConfig { cases: 512, ..PropConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..600)) {
        check_both(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        check_both(v.to_string().as_bytes());
    }

    #[test]
    fn command_shaped_json_never_panics(v in command_like()) {
        check_both(v.to_string().as_bytes());
    }

    #[test]
    fn valid_commands_decode_and_round_trip(v in valid_command()) {
        let body = v.to_string();
        let cmd = check(body.as_bytes(), one_app()).expect("valid command accepted");
        let p = &cmd.params;
        prop_assert_eq!(p.op.as_str(), v["op"].as_str().unwrap());
        prop_assert_eq!(p.openid.as_str(), v["openid"].as_str().unwrap());
        prop_assert_eq!(p.bill_no.as_deref(), v.get("bill_no").and_then(Value::as_str));
        prop_assert_eq!(p.amt, v.get("amt").and_then(Value::as_i64));
        prop_assert_eq!(p.present_counts, v.get("present_counts").and_then(Value::as_i64));
        prop_assert_eq!(p.zone_id.as_str(), v.get("zone_id").and_then(Value::as_str).unwrap_or("1"));
        // with two apps configured, the same command needs its appid
        let two = check(body.as_bytes(), two_apps());
        prop_assert_eq!(two.is_ok(), v.get("appid").is_some());
    }

    #[test]
    fn a_valid_command_with_one_unknown_field_is_rejected(
        v in valid_command(),
        name in "[a-z_]{1,12}",
        extra in leaf(),
    ) {
        prop_assume!(!FIELDS.contains(&name.as_str()));
        let mut v = v;
        v.as_object_mut().unwrap().insert(name.clone(), extra);
        let rej = check(v.to_string().as_bytes(), one_app()).expect_err("unknown field");
        prop_assert!(rej.message.contains(&name), "{}", rej.message);
    }

    #[test]
    fn a_valid_command_with_a_duplicated_key_is_rejected(v in valid_command(), pick in any::<prop::sample::Index>()) {
        let obj = v.as_object().unwrap();
        let keys: Vec<&String> = obj.keys().collect();
        let k = keys[pick.index(keys.len())];
        let body = v.to_string();
        // append the same key again: {"a":1,...,"a":1}
        let dup = format!("{},{}:{}}}", &body[..body.len() - 1], json!(k), obj[k]);
        let rej = check(dup.as_bytes(), one_app()).expect_err("duplicate key");
        prop_assert!(rej.message.contains("duplicate"), "{}", rej.message);
    }

    #[test]
    fn non_utf8_inside_a_valid_command_is_rejected(v in valid_command(), bad in prop::sample::select(vec![vec![0xffu8], vec![0xc3, 0x28], vec![0xed, 0xa0, 0x80], vec![0xf8, 0x88, 0x80, 0x80, 0x80], vec![0x80]])) {
        let body = v.to_string().into_bytes();
        // inside the openid string: after its opening quote
        let at = find(&body, b"\"openid\":\"").unwrap() + 10;
        let mut hostile = body[..at].to_vec();
        hostile.extend_from_slice(&bad);
        hostile.extend_from_slice(&body[at..]);
        check(&hostile, one_app()).expect_err("non-UTF-8");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn amounts_at_and_past_every_bound() {
    for lit in NUMBERS {
        let want_ok = matches!(lit, "1" | "2147483647");
        for (op, field) in [("pay", "amt"), ("present", "present_counts")] {
            let body = format!(r#"{{"op":"{op}","bill_no":"B-1","openid":"o","{field}":{lit}}}"#);
            let r = check(body.as_bytes(), one_app());
            assert_eq!(r.is_ok(), want_ok, "{body}: {r:?}");
            if let Err(rej) = r {
                assert_eq!(rej.code, "invalid_command");
                assert_eq!(
                    rej.bill_no.as_deref(),
                    Some("B-1"),
                    "bill_no salvaged: {body}"
                );
            }
            // the other op's amount field is never allowed
            let other = if op == "pay" { "present_counts" } else { "amt" };
            let body = format!(
                r#"{{"op":"{op}","bill_no":"B-1","openid":"o","{field}":1,"{other}":{lit}}}"#
            );
            assert!(check(body.as_bytes(), one_app()).is_err(), "{body}");
        }
        // amounts as strings are not numbers
        let body = format!(r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":"{lit}"}}"#);
        assert!(check(body.as_bytes(), one_app()).is_err(), "{body}");
    }
}

#[test]
fn bill_no_and_text_bounds() {
    let with = |bill: &str, openid: &str| {
        format!(
            r#"{{"op":"pay","bill_no":{},"openid":{},"amt":1}}"#,
            json!(bill),
            json!(openid)
        )
    };
    assert!(check(with(&"a".repeat(63), "o").as_bytes(), one_app()).is_ok());
    for bad in [
        "",
        "a b",
        "é",
        "a/b",
        "a.b",
        "\u{0}",
        &"a".repeat(64),
        &"a".repeat(100_000),
    ] {
        let r = check(with(bad, "o").as_bytes(), one_app()).expect_err(bad);
        assert!(r.bill_no.is_none());
    }
    assert!(check(with("B", &"o".repeat(512)).as_bytes(), one_app()).is_ok());
    for bad in [
        String::new(),
        "o".repeat(513),
        "o".repeat(1_000_000),
        "a\nb".into(),
        "\u{7f}".into(),
    ] {
        let r = check(with("B", &bad).as_bytes(), one_app()).expect_err("bad openid");
        assert_eq!(r.bill_no.as_deref(), Some("B"));
    }
}

#[test]
fn deep_nesting_and_huge_inputs_do_not_overflow() {
    for depth in [1, 127, 128, 129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let body = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            check_both(body.as_bytes());
            let inner = format!(
                r#"{{"op":"pay","bill_no":"B-1","openid":"o","amt":{}1{}}}"#,
                open.repeat(depth),
                close.repeat(depth)
            );
            check(inner.as_bytes(), one_app()).expect_err("nested amt");
        }
    }
    // unclosed nesting, a huge key, a huge number, a 10 MB string
    check_both("[".repeat(1_000_000).as_bytes());
    check_both(format!("{{\"{}\":1}}", "k".repeat(1_000_000)).as_bytes());
    check_both(
        format!(
            r#"{{"op":"pay","bill_no":"B","openid":"o","amt":{}}}"#,
            "9".repeat(100_000)
        )
        .as_bytes(),
    );
    check_both(
        format!(
            r#"{{"op":"pay","bill_no":"B","openid":"{}","amt":1}}"#,
            "x".repeat(10 << 20)
        )
        .as_bytes(),
    );
}

#[test]
fn wrong_types_unknown_apps_and_ops() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"op":"pay","bill_no":"B","openid":"o","amt":1,"appid":"wxnope"}"#,
            "unknown_app",
        ),
        (
            r#"{"op":"pay","bill_no":"B","openid":"o","amt":1,"appid":""}"#,
            "unknown_app",
        ),
        (
            r#"{"op":"PAY","bill_no":"B","openid":"o","amt":1}"#,
            "invalid_command",
        ),
        (
            r#"{"op":null,"bill_no":"B","openid":"o","amt":1}"#,
            "invalid_command",
        ),
        (
            r#"{"op":"pay","bill_no":7,"openid":"o","amt":1}"#,
            "invalid_command",
        ),
        (
            r#"{"op":"pay","bill_no":"B","openid":["o"],"amt":1}"#,
            "invalid_command",
        ),
        (
            r#"{"op":"balance","bill_no":"B","openid":"o"}"#,
            "invalid_command",
        ),
        (
            r#"{"op":"cancel_pay","bill_no":"B","openid":"o","amt":1}"#,
            "invalid_command",
        ),
        (
            r#"{"op":"present","bill_no":"B","openid":"o","present_counts":1,"app_remark":"x"}"#,
            "invalid_command",
        ),
        (
            r#"[{"op":"pay","bill_no":"B","openid":"o","amt":1}]"#,
            "invalid_command",
        ),
        (
            r#"{"op":"pay","bill_no":"B","openid":"o","amt":1} trailing"#,
            "invalid_command",
        ),
        ("", "invalid_command"),
        ("null", "invalid_command"),
        ("\u{feff}{}", "invalid_command"),
    ];
    for (body, code) in cases {
        let r = check(body.as_bytes(), one_app()).expect_err(body);
        assert_eq!(r.code, *code, "{body}: {r:?}");
    }
    // with two apps, a missing appid is invalid_command (the contract: "no appid
    // while several apps are configured"), an unknown one unknown_app, a known one fine
    let body = r#"{"op":"pay","bill_no":"B","openid":"o","amt":1}"#;
    assert_eq!(
        check(body.as_bytes(), two_apps()).unwrap_err().code,
        "invalid_command"
    );
    let body = r#"{"op":"pay","bill_no":"B","openid":"o","amt":1,"appid":"wxnope"}"#;
    assert_eq!(
        check(body.as_bytes(), two_apps()).unwrap_err().code,
        "unknown_app"
    );
    let body = r#"{"op":"pay","bill_no":"B","openid":"o","amt":1,"appid":"wx7654321"}"#;
    assert_eq!(
        check(body.as_bytes(), two_apps()).unwrap().params.appid,
        "wx7654321"
    );
}

/// Hostile bodies for the end-to-end test: every one invalid for `settings`.
fn hostile_batch(settings: &Settings, n: usize) -> Vec<Vec<u8>> {
    let mut runner = TestRunner::deterministic();
    let mut out: Vec<Vec<u8>> = Vec::new();
    let bytes = prop::collection::vec(any::<u8>(), 0..300);
    let fixed: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\xff\xfe\xfd".to_vec(),
        "[".repeat(10_000).into_bytes(),
        format!("{}1{}", "{\"a\":".repeat(500), "}".repeat(500)).into_bytes(),
        br#"{"op":"pay","op":"pay","bill_no":"D1","openid":"o","amt":1}"#.to_vec(),
        br#"{"op":"pay","bill_no":"D2","openid":"o","amt":1.0}"#.to_vec(),
        br#"{"op":"pay","bill_no":"D3","openid":"o","amt":1e20}"#.to_vec(),
        br#"{"op":"pay","bill_no":"D4","openid":"o","amt":9223372036854775807}"#.to_vec(),
        br#"{"op":"present","bill_no":"D5","openid":"o","present_counts":0}"#.to_vec(),
        br#"{"op":"pay","bill_no":"D6","openid":"o","amt":1,"surprise":true}"#.to_vec(),
        b"{\"op\":\"pay\",\"bill_no\":\"D7\",\"openid\":\"\xc3\x28\",\"amt\":1}".to_vec(),
        format!(
            r#"{{"op":"pay","bill_no":"D8","openid":"{}","amt":1}}"#,
            "o".repeat(200_000)
        )
        .into_bytes(),
    ];
    out.extend(fixed);
    let mut k = 0;
    while out.len() < n {
        k += 1;
        let body = match k % 3 {
            0 => bytes.new_tree(&mut runner).unwrap().current(),
            1 => json_value()
                .new_tree(&mut runner)
                .unwrap()
                .current()
                .to_string()
                .into_bytes(),
            _ => command_like()
                .new_tree(&mut runner)
                .unwrap()
                .current()
                .to_string()
                .into_bytes(),
        };
        if decode(&body, settings).is_err() {
            out.push(body);
        }
    }
    out
}

/// Generated hostile bodies through the real worker: each dead-lettered unchanged (the
/// DLQ holds exactly the sent bytes, as a multiset), each answered `rejected` (the test
/// client always names a reply queue), and Midas never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_end_to_end_are_dead_lettered_rejected_and_never_sent() {
    let env = crate::common::TestEnv::new("hostile");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bodies = hostile_batch(&env.settings(), 150);
    for (i, body) in bodies.iter().enumerate() {
        c.publish(body, &format!("h{i}")).await.expect("publish");
    }
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < bodies.len() && tokio::time::Instant::now() < deadline {
        if let Ok(r) = c.next_reply(Duration::from_secs(5)).await {
            assert!(
                seen.insert(r.correlation_id.clone(), r.reply.clone())
                    .is_none(),
                "one reply each"
            );
        }
    }
    for i in 0..bodies.len() {
        let r = seen
            .get(&format!("h{i}"))
            .unwrap_or_else(|| panic!("no reply for h{i}"));
        assert_eq!(r.status, Some(Status::Rejected), "h{i}: {r:?}");
        assert!(
            matches!(r.error.as_deref(), Some("invalid_command" | "unknown_app")),
            "{r:?}"
        );
        assert!(r.errmsg.as_deref().is_some_and(|m| !m.is_empty()));
        assert_eq!(r.attempts, 0);
    }
    let mut dead = env
        .dead_letters_until(bodies.len(), Duration::from_secs(30))
        .await;
    // dead-lettered unchanged but for the session_key (generated commands carry one)
    let max = env.settings().config.broker.max_command_bytes;
    let mut want: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| midas_worker::broker::deadletter::scrub(b, max).0)
        .collect();
    want.sort();
    dead.sort();
    for d in &dead {
        let text = String::from_utf8_lossy(d);
        assert!(
            !text.contains("session_key"),
            "a session_key dead-lettered: {text}"
        );
    }
    assert_eq!(
        dead.len(),
        want.len(),
        "every hostile body dead-lettered once"
    );
    assert!(dead == want, "dead-lettered unchanged");
    let calls = sim.ledger().calls;
    for api in ["pay", "present", "cancelpay", "getbalance"] {
        assert_eq!(
            calls.get(api).copied().unwrap_or(0),
            0,
            "{api} called: {calls:?}"
        );
    }
    worker.stop().await;
    env.cleanup(&c).await;
}
