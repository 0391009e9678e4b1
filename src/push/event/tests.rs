//! Every PayEventSig check value, and each way a push body is refused.

use super::*;

const GOODS_EVENT: &str = "minigame_game_pay_goods_deliver_notify";
const GOODS: &str = r#"{"OpenId":"o_test_openid","Env":0,"OutTradeNo":"T20240101001","GoodsInfo":{"ProductId":"id_100001","Quantity":1,"ZoneId":"1","OrigPrice":600,"ActualPrice":600,"Attach":"a"}}"#;
const GOODS_SIG: &str = "73ed4bdbe0509468c6e5ff769dcbd2efcdf1b72606c24f1f34b0ec065ed26cfe";
const COIN_EVENT: &str = "minigame_coin_deliver_completed";
const COIN: &str = r#"{"OpenId":"to_user_openid","OutTradeNo":"xxxxxxx","WeChatPayInfo":{"MchOrderNo":"xxxxxxx","TransactionId":"xxxxxxx"},"Env":0,"CoinInfo":{"ZoneId":"1","TotalPrice":100,"BuyQuantity":1,"OrigPrice":100}}"#;
const COIN_SIG: &str = "4624e9b832eca479457e668dd49b64133a0439101a6a0e89e648e0d3840e6e0f";
const REFUND_EVENT: &str = "minigame_pay_refund_succ_notify";
const REFUND: &str = r#"{"RefundId":"refund_id","RefundAmount":100,"RefundSource":1,"Env":0,"OutTradeNo":"T20240101001"}"#;
const REFUND_SIG: &str = "abe1273230dc56841155ca674a3a4ba3feee4e49368c57a9dd859672ddcb837f";

const KEYS: Keys<'static> = Keys {
    production: "12345",
    sandbox: None,
};

pub(crate) fn envelope(
    event: &str,
    payload: &str,
    sig: Option<&str>,
    mock: Option<bool>,
) -> Vec<u8> {
    let mut mg = serde_json::json!({ "Payload": payload });
    if let Some(s) = sig {
        mg["PayEventSig"] = s.into();
    }
    if let Some(m) = mock {
        mg["IsMock"] = m.into();
    }
    serde_json::to_vec(&serde_json::json!({
        "ToUserName": "gh_97417a04a28d", "FromUserName": "o_wechat", "CreateTime": 1583202606,
        "MsgType": "event", "Event": event, "MiniGame": mg,
    }))
    .unwrap()
}

fn read_ok(event: &str, payload: &str, sig: &str) -> Verified {
    match read(
        "wx1",
        &envelope(event, payload, Some(sig), None),
        &KEYS,
        "t",
        false,
    ) {
        Ok(Verdict::Event(v)) => v,
        other => panic!("{other:?}"),
    }
}

fn msg(v: &Verified) -> Value {
    serde_json::from_str(&v.message).unwrap()
}

#[test]
fn the_item_purchase_check_value_is_accepted_and_read() {
    let v = read_ok(GOODS_EVENT, GOODS, GOODS_SIG);
    assert_eq!(v.kind, Kind::GoodsDelivered);
    assert_eq!(v.dedup_key, "T20240101001");
    assert_eq!(v.openid.as_deref(), Some("o_test_openid"));
    let m = msg(&v);
    assert_eq!(m["kind"], "goods_delivered");
    assert_eq!(m["event"], GOODS_EVENT);
    assert_eq!(m["goods"]["product_id"], "id_100001");
    assert_eq!(m["goods"]["actual_price"], 600);
    assert_eq!(m["goods"]["attach"], "a");
    assert_eq!(m["payload"], GOODS, "the verified payload, unchanged");
    assert_eq!(m["event_id"], v.event_id.as_str());
    assert!(m.get("wechat_pay").is_none() && m.get("simulated").is_none());
}

#[test]
fn the_coin_check_value_is_accepted_with_total_price_as_actual_price() {
    let v = read_ok(COIN_EVENT, COIN, COIN_SIG);
    let m = msg(&v);
    assert_eq!(m["kind"], "coins_delivered");
    assert_eq!(m["coins"]["actual_price"], 100);
    assert_eq!(m["coins"]["buy_quantity"], 1);
    assert_eq!(m["wechat_pay"]["transaction_id"], "xxxxxxx");
    assert_eq!(v.dedup_key, "xxxxxxx");
}

#[test]
fn the_refund_check_value_is_accepted_keyed_by_refund_id_without_openid() {
    let v = read_ok(REFUND_EVENT, REFUND, REFUND_SIG);
    assert_eq!(v.kind, Kind::Refunded);
    assert_eq!(v.dedup_key, "refund_id");
    assert_eq!(v.openid, None);
    let m = msg(&v);
    assert!(m.get("openid").is_none());
    assert_eq!(m["out_trade_no"], "T20240101001");
    assert_eq!(m["refund"]["refund_amount"], 100);
}

#[test]
fn a_tampered_payload_is_refused() {
    let tampered = GOODS.replace("\"ActualPrice\":600", "\"ActualPrice\":6");
    let r = read(
        "wx1",
        &envelope(GOODS_EVENT, &tampered, Some(GOODS_SIG), None),
        &KEYS,
        "t",
        false,
    );
    assert_eq!(r, Err(Refusal::BadPayEventSig));
    let other_event = read(
        "wx1",
        &envelope(
            "minigame_h5_goods_deliver_notify",
            GOODS,
            Some(GOODS_SIG),
            None,
        ),
        &KEYS,
        "t",
        false,
    );
    assert_eq!(other_event, Err(Refusal::BadPayEventSig));
}

#[test]
fn a_re_serialized_payload_is_refused() {
    let v: Value = serde_json::from_str(GOODS).unwrap();
    let again = serde_json::to_string(&v).unwrap();
    assert_ne!(again, GOODS, "same data, other bytes");
    let r = read(
        "wx1",
        &envelope(GOODS_EVENT, &again, Some(GOODS_SIG), None),
        &KEYS,
        "t",
        false,
    );
    assert_eq!(r, Err(Refusal::BadPayEventSig));
}

#[test]
fn the_key_of_the_other_env_is_refused() {
    let wrong = Keys {
        production: "54321",
        sandbox: Some("12345"),
    };
    let body = envelope(GOODS_EVENT, GOODS, Some(GOODS_SIG), None);
    assert_eq!(
        read("wx1", &body, &wrong, "t", false),
        Err(Refusal::BadPayEventSig)
    );
    // a sandbox payload: verified with the sandbox key only
    let sandbox = GOODS.replace("\"Env\":0", "\"Env\":1");
    let signed_prod = verify::pay_event_sig("12345", GOODS_EVENT, &sandbox);
    let signed_sbx = verify::pay_event_sig("sbx", GOODS_EVENT, &sandbox);
    let both = Keys {
        production: "12345",
        sandbox: Some("sbx"),
    };
    assert_eq!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, &sandbox, Some(&signed_prod), None),
            &both,
            "t",
            false
        ),
        Err(Refusal::BadPayEventSig)
    );
    assert_eq!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, &sandbox, Some(&signed_sbx), None),
            &KEYS,
            "t",
            false
        ),
        Err(Refusal::NoSandboxKey)
    );
    match read(
        "wx1",
        &envelope(GOODS_EVENT, &sandbox, Some(&signed_sbx), None),
        &both,
        "t",
        false,
    ) {
        Ok(Verdict::Event(v)) => assert_eq!(v.env, 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_signature_or_an_unknown_event_or_a_bad_body_is_refused() {
    assert_eq!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, GOODS, None, None),
            &KEYS,
            "t",
            false
        ),
        Err(Refusal::BadPayEventSig)
    );
    assert_eq!(
        read(
            "wx1",
            &envelope("debug_demo", GOODS, Some(GOODS_SIG), None),
            &KEYS,
            "t",
            false
        ),
        Err(Refusal::UnknownEvent)
    );
    assert!(matches!(
        read("wx1", b"<xml/>", &KEYS, "t", false),
        Err(Refusal::BadBody(_))
    ));
    assert!(matches!(
        read("wx1", b"{}", &KEYS, "t", false),
        Err(Refusal::BadBody(_))
    ));
    // verified, but the fields are not the event's
    let no_goods = r#"{"OpenId":"o","Env":0,"OutTradeNo":"T1"}"#;
    let sig = verify::pay_event_sig("12345", GOODS_EVENT, no_goods);
    assert!(matches!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, no_goods, Some(&sig), None),
            &KEYS,
            "t",
            false
        ),
        Err(Refusal::BadPayload(_))
    ));
}

#[test]
fn a_mock_is_checked_for_types_only_and_delivers_nothing() {
    assert_eq!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, GOODS, Some("random"), Some(true)),
            &KEYS,
            "t",
            false
        ),
        Ok(Verdict::Mock(Kind::GoodsDelivered))
    );
    let bad_types = GOODS.replace("\"Quantity\":1", "\"Quantity\":\"one\"");
    assert!(matches!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, &bad_types, None, Some(true)),
            &KEYS,
            "t",
            false
        ),
        Err(Refusal::BadPayload(_))
    ));
    // IsMock missing or false: a real push
    assert!(matches!(
        read(
            "wx1",
            &envelope(GOODS_EVENT, GOODS, Some(GOODS_SIG), Some(false)),
            &KEYS,
            "t",
            false
        ),
        Ok(Verdict::Event(_))
    ));
}

#[test]
fn event_ids_are_stable_per_app_kind_and_key() {
    let a = read_ok(GOODS_EVENT, GOODS, GOODS_SIG);
    let b = read_ok(GOODS_EVENT, GOODS, GOODS_SIG);
    assert_eq!(a.event_id, b.event_id);
    assert_eq!(
        a.event_id,
        event_id("wx1", Kind::GoodsDelivered, "T20240101001")
    );
    assert_ne!(
        a.event_id,
        event_id("wx2", Kind::GoodsDelivered, "T20240101001")
    );
    assert_ne!(a.event_id, event_id("wx1", Kind::Refunded, "T20240101001"));
    assert_eq!(a.event_id.len(), 36);
}
