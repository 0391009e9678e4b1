//! The three signatures of a WeChat payment push, as pure functions:
//!
//! ```text
//! signature     = hex(SHA1(sort(Token, timestamp, nonce) concatenated))           URL check and every push
//! msg_signature = hex(SHA1(sort(Token, timestamp, nonce, Encrypt) concatenated))  safe mode
//! PayEventSig   = hex(HMAC_SHA256(AppKey of the payload's Env, Event + "&" + Payload))
//! ```
//!
//! `PayEventSig` is computed over the Payload string exactly as received (the JSON
//! string's value from the envelope): a payload parsed and serialised again differs
//! in whitespace or key order, and its signature would never match. Comparisons
//! are constant time.

use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};
use sha2::Sha256;

/// `signature` of the URL check and of every push: SHA-1 over the sorted parts.
pub fn url_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce])
}

/// `msg_signature` of a safe-mode push: SHA-1 over the sorted parts with `Encrypt`.
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce, encrypt])
}

/// `PayEventSig`: HMAC-SHA256 keyed with the AppKey of the payload's `Env`, over
/// `event + "&" + payload` (the received Payload bytes).
pub fn pay_event_sig(app_key: &str, event: &str, payload: &str) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(app_key.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(event.as_bytes());
    mac.update(b"&");
    mac.update(payload.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Whether `given` is the URL signature (case-insensitive hex, constant time).
pub fn url_signature_ok(token: &str, timestamp: &str, nonce: &str, given: &str) -> bool {
    same_hex(&url_signature(token, timestamp, nonce), given)
}

/// Whether `given` is the `msg_signature` of `encrypt`.
pub fn msg_signature_ok(
    token: &str,
    timestamp: &str,
    nonce: &str,
    encrypt: &str,
    given: &str,
) -> bool {
    same_hex(&msg_signature(token, timestamp, nonce, encrypt), given)
}

/// Whether `given` is the `PayEventSig` of `event` and `payload` under `app_key`.
pub fn pay_event_sig_ok(app_key: &str, event: &str, payload: &str, given: &str) -> bool {
    same_hex(&pay_event_sig(app_key, event, payload), given)
}

fn sorted_sha1(parts: &mut [&str]) -> String {
    parts.sort_unstable();
    let mut h = Sha1::new();
    for p in parts.iter() {
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// `expected` (lowercase hex) against `given` (either case), in time independent
/// of where they differ.
fn same_hex(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y.to_ascii_lowercase();
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOODS_PAYLOAD: &str = r#"{"OpenId":"o_test_openid","Env":0,"OutTradeNo":"T20240101001","GoodsInfo":{"ProductId":"id_100001","Quantity":1,"ZoneId":"1","OrigPrice":600,"ActualPrice":600,"Attach":"a"}}"#;
    const COIN_PAYLOAD: &str = r#"{"OpenId":"to_user_openid","OutTradeNo":"xxxxxxx","WeChatPayInfo":{"MchOrderNo":"xxxxxxx","TransactionId":"xxxxxxx"},"Env":0,"CoinInfo":{"ZoneId":"1","TotalPrice":100,"BuyQuantity":1,"OrigPrice":100}}"#;
    const REFUND_PAYLOAD: &str = r#"{"RefundId":"refund_id","RefundAmount":100,"RefundSource":1,"Env":0,"OutTradeNo":"T20240101001"}"#;

    #[test]
    fn the_url_check_values() {
        assert_eq!(
            url_signature("AAAAA", "1714036504", "1514711492"),
            "f464b24fc39322e44b38aa78f5edd27bd1441696"
        );
        assert_eq!(
            url_signature("AAAAA", "1714037059", "486452656"),
            "899cf89e464efb63f54ddac96b0a0a235f53aa78"
        );
        assert!(url_signature_ok(
            "AAAAA",
            "1714036504",
            "1514711492",
            "F464B24FC39322E44B38AA78F5EDD27BD1441696"
        ));
    }

    #[test]
    fn a_bad_url_signature_is_refused() {
        assert!(!url_signature_ok(
            "AAAAA",
            "1714036504",
            "1514711493",
            "f464b24fc39322e44b38aa78f5edd27bd1441696"
        ));
        assert!(!url_signature_ok(
            "AAAAB",
            "1714036504",
            "1514711492",
            "f464b24fc39322e44b38aa78f5edd27bd1441696"
        ));
        assert!(!url_signature_ok("AAAAA", "1714036504", "1514711492", ""));
    }

    #[test]
    fn the_msg_signature_value() {
        let enc = crate::push::decrypt::tests::ENCRYPT;
        assert_eq!(
            msg_signature("AAAAA", "1714112445", "415670741", enc),
            "046e02f8204d34f8ba5fa3b1db94908f3df2e9b3"
        );
        assert!(!msg_signature_ok(
            "AAAAA",
            "1714112445",
            "415670741",
            &enc.replace('+', "/"),
            "046e02f8204d34f8ba5fa3b1db94908f3df2e9b3"
        ));
    }

    #[test]
    fn the_pay_event_sig_values() {
        assert_eq!(
            pay_event_sig(
                "12345",
                "minigame_game_pay_goods_deliver_notify",
                GOODS_PAYLOAD
            ),
            "73ed4bdbe0509468c6e5ff769dcbd2efcdf1b72606c24f1f34b0ec065ed26cfe"
        );
        assert_eq!(
            pay_event_sig("12345", "minigame_coin_deliver_completed", COIN_PAYLOAD),
            "4624e9b832eca479457e668dd49b64133a0439101a6a0e89e648e0d3840e6e0f"
        );
        assert_eq!(
            pay_event_sig("12345", "minigame_pay_refund_succ_notify", REFUND_PAYLOAD),
            "abe1273230dc56841155ca674a3a4ba3feee4e49368c57a9dd859672ddcb837f"
        );
    }

    #[test]
    fn the_hmac_of_the_payload_alone_is_refused() {
        let alone = {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"12345").unwrap();
            mac.update(GOODS_PAYLOAD.as_bytes());
            hex(&mac.finalize().into_bytes())
        };
        assert!(alone.starts_with("785afb96") && alone.ends_with("ba8c2"));
        assert!(!pay_event_sig_ok(
            "12345",
            "minigame_game_pay_goods_deliver_notify",
            GOODS_PAYLOAD,
            &alone
        ));
    }
}
