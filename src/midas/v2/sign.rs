//! The 2.0 signatures, as pure functions over the exact body bytes sent:
//!
//! ```text
//! pay_sig   = lowercase_hex(HMAC_SHA256(AppKey of the env, uri + "&" + body))
//! signature = lowercase_hex(HMAC_SHA256(session_key,      body))
//! ```
//!
//! No sorting, no key=value string: whoever signs must sign the very bytes it sends.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `pay_sig` for a body posted to `uri` (the path without the query string).
pub fn pay_sig(app_key: &str, uri: &str, body: &[u8]) -> String {
    hmac_hex(app_key.as_bytes(), &[uri.as_bytes(), b"&", body])
}

/// `signature`: the body signed with the player's session_key.
pub fn signature(session_key: &str, body: &[u8]) -> String {
    hmac_hex(session_key.as_bytes(), &[body])
}

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(p);
    }
    let bytes = mac.finalize().into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check values of `docs/midas-v2.md`.
    const BODY: &str = r#"{"openid":"odkx20ENSNa2w5y3g_qOkOvBNM1g","offer_id":"12345678","ts":1668136271,"zone_id":"1","env":0,"user_ip":"127.0.0.1","amount":10,"bill_no":"BillNo_123","payitem":"gem_pack","remark":"r"}"#;

    #[test]
    fn reproduces_the_check_values() {
        assert_eq!(
            pay_sig("12345", "/wxa/game/pay", BODY.as_bytes()),
            "ebae4e0ef9310020982fa4db21a4b17005e3642a37d168187007c28676c0a8b9"
        );
        assert_eq!(
            signature("9hAb/NEYUlkaMBEsmFgzig==", BODY.as_bytes()),
            "2ff14d850f09e3caa1a6ae1478674a4bbce3cb96ce4ccb92af432b81da787d71"
        );
    }

    #[test]
    fn uri_key_and_every_byte_are_signed() {
        let base = pay_sig("12345", "/wxa/game/pay", BODY.as_bytes());
        assert_ne!(base, pay_sig("12345", "/wxa/game/present", BODY.as_bytes()));
        assert_ne!(base, pay_sig("12346", "/wxa/game/pay", BODY.as_bytes()));
        let spaced = BODY.replace(',', ", ");
        assert_ne!(base, pay_sig("12345", "/wxa/game/pay", spaced.as_bytes()));
        let sig = signature("k", BODY.as_bytes());
        assert_eq!(sig, sig.to_lowercase());
        assert_eq!(sig.len(), 64);
    }
}
