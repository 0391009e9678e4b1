//! The Midas signature algorithm (see `docs/midas-v1.md`), as pure functions.
//!
//! ```text
//! A      = "&".join(k + "=" + v for k in sorted(params))
//! msg    = A + "&org_loc=" + uri + "&method=POST&" + key_name + "=" + key
//! sig    = hex(HMAC_SHA256(key, msg))            key_name = "secret",      key = AppKey
//! mp_sig = same over params + access_token + sig key_name = "session_key", key = session_key
//! ```
//!
//! Parameters are the body fields actually sent (optional fields that are absent are
//! not signed). Strings are used raw, numbers as plain decimal digits.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One body value as it is signed: strings raw, integers as decimal digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param<'a> {
    Str(&'a str),
    Int(i64),
}

impl Param<'_> {
    fn write_to(&self, out: &mut String) {
        match self {
            Param::Str(s) => out.push_str(s),
            Param::Int(n) => {
                use std::fmt::Write;
                let _ = write!(out, "{n}");
            }
        }
    }
}

/// `sign(params, uri, key_name, key)` from docs/midas-v1.md. `params` may come in any order.
pub fn sign(params: &[(&str, Param<'_>)], uri: &str, key_name: &str, key: &str) -> String {
    let mut sorted: Vec<&(&str, Param<'_>)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut msg = String::with_capacity(256);
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            msg.push('&');
        }
        msg.push_str(k);
        msg.push('=');
        v.write_to(&mut msg);
    }
    msg.push_str("&org_loc=");
    msg.push_str(uri);
    msg.push_str("&method=POST&");
    msg.push_str(key_name);
    msg.push('=');
    msg.push_str(key);
    hmac_hex(key.as_bytes(), msg.as_bytes())
}

/// `sig`: signed with the AppKey (the sandbox key for sandbox paths).
pub fn sig(params: &[(&str, Param<'_>)], uri: &str, app_key: &str) -> String {
    sign(params, uri, "secret", app_key)
}

/// `mp_sig`: the body params plus `access_token` and the `sig` just computed,
/// signed with the user's session_key.
pub fn mp_sig(
    params: &[(&str, Param<'_>)],
    access_token: &str,
    sig: &str,
    uri: &str,
    session_key: &str,
) -> String {
    let mut all: Vec<(&str, Param<'_>)> = Vec::with_capacity(params.len() + 2);
    all.extend(params.iter().cloned());
    all.push(("access_token", Param::Str(access_token)));
    all.push(("sig", Param::Str(sig)));
    sign(&all, uri, "session_key", session_key)
}

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for HMAC.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(msg);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(64);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

/// Compare two signatures in constant time (the simulator checks what clients send).
pub fn sig_eq(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u";
    const SESSION: &str = "V7Q38/i2KXaqrQyl2Yx9Hg==";
    const URI: &str = "/cgi-bin/midas/getbalance";

    fn vector() -> Vec<(&'static str, Param<'static>)> {
        vec![
            ("openid", Param::Str("odkx20ENSNa2w5y3g_qOkOvBNM1g")),
            ("appid", Param::Str("wx1234567")),
            ("offer_id", Param::Str("12345678")),
            ("ts", Param::Int(1507530737)),
            ("zone_id", Param::Str("1")),
            ("pf", Param::Str("android")),
        ]
    }

    #[test]
    fn reproduces_the_official_vector() {
        let s = sig(&vector(), URI, KEY);
        assert_eq!(
            s,
            "1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b"
        );
        let m = mp_sig(&vector(), "ACCESSTOKEN", &s, URI, SESSION);
        assert_eq!(
            m,
            "ff4c5bb39dea1002a8f03be0438724e1a8bcea5ebce8f221f9b9fea3bcf3bf76"
        );
    }

    #[test]
    fn uri_and_key_change_the_signature() {
        let base = sig(&vector(), URI, KEY);
        assert_ne!(
            base,
            sig(&vector(), "/cgi-bin/midas/sandbox/getbalance", KEY)
        );
        assert_ne!(base, sig(&vector(), URI, "another-key"));
    }

    #[test]
    fn numbers_are_unquoted_digits() {
        let mut quoted = vector();
        quoted[3] = ("ts", Param::Str("\"1507530737\""));
        assert_ne!(sig(&vector(), URI, KEY), sig(&quoted, URI, KEY));
        let mut as_text = vector();
        as_text[3] = ("ts", Param::Str("1507530737"));
        assert_eq!(sig(&vector(), URI, KEY), sig(&as_text, URI, KEY));
    }

    proptest! {
        #[test]
        fn key_order_does_not_matter(seed in any::<u64>()) {
            let mut v = vector();
            // a deterministic shuffle from the seed
            let n = v.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (s >> 33) as usize % (i + 1);
                v.swap(i, j);
            }
            prop_assert_eq!(sig(&v, URI, KEY), sig(&vector(), URI, KEY));
        }

        #[test]
        fn an_absent_optional_field_is_not_signed(ip in "[0-9.]{1,15}") {
            let mut with_ip = vector();
            with_ip.push(("user_ip", Param::Str(&ip)));
            // present field changes the signature; absent field is simply not in the list
            prop_assert_ne!(sig(&with_ip, URI, KEY), sig(&vector(), URI, KEY));
        }

        #[test]
        fn any_value_change_changes_sig(amt in 1i64..=2147483647, other in 1i64..=2147483647) {
            prop_assume!(amt != other);
            let mut a = vector(); a.push(("amt", Param::Int(amt)));
            let mut b = vector(); b.push(("amt", Param::Int(other)));
            prop_assert_ne!(sig(&a, URI, KEY), sig(&b, URI, KEY));
        }
    }
}
