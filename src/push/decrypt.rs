//! Safe (encrypted) mode: the body's `Encrypt` field, decrypted as WeChat encrypts it.
//!
//! ```text
//! key       = base64(EncodingAESKey + "=")           32 bytes
//! cipher    = AES-256-CBC, IV = key[0..16]
//! padding   = PKCS#7 with a block size of 32 (not AES's 16)
//! plaintext = 16 random bytes ‖ message length (4 bytes, big-endian) ‖ message ‖ appid
//! ```
//!
//! The appid after the message must be the app the push was addressed to: a body
//! encrypted for another app (same key reused, or a body replayed across apps) is
//! refused. AES and CBC come from the RustCrypto crates `aes` and `cbc`; nothing
//! here is hand-rolled but the framing and the padding check.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

type Dec = cbc::Decryptor<aes::Aes256>;
type Enc = cbc::Encryptor<aes::Aes256>;

/// WeChat pads to multiples of 32 bytes.
const PAD_BLOCK: usize = 32;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("the EncodingAESKey is not 43 characters of base64 for 32 bytes")]
    BadKey,
    #[error("Encrypt is not base64")]
    NotBase64,
    #[error("Encrypt is not a whole number of AES blocks")]
    BadLength,
    #[error("the padding is not PKCS#7")]
    BadPadding,
    #[error("the plaintext is not framed as 16 bytes, a length, the message and the appid")]
    BadFrame,
    #[error("the body was encrypted for another app")]
    WrongAppid,
}

/// A decoded EncodingAESKey. Never printed.
#[derive(Clone)]
pub struct AesKey([u8; 32]);

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(***)")
    }
}

impl AesKey {
    /// From the admin console's EncodingAESKey (43 characters).
    pub fn from_encoding_key(k: &str) -> Result<AesKey, DecryptError> {
        let k = k.trim();
        if k.len() != 43 {
            return Err(DecryptError::BadKey);
        }
        // the console makes 43 random characters: the last one may carry bits past
        // the 32 bytes, which WeChat's own decoders ignore, so this one does too
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let raw = lenient
            .decode(format!("{k}="))
            .map_err(|_| DecryptError::BadKey)?;
        let key: [u8; 32] = raw.try_into().map_err(|_| DecryptError::BadKey)?;
        Ok(AesKey(key))
    }

    fn iv(&self) -> &[u8] {
        &self.0[..16]
    }
}

/// The message inside `encrypt` (base64), checked to be for `appid`.
pub fn decrypt(key: &AesKey, encrypt: &str, appid: &str) -> Result<Vec<u8>, DecryptError> {
    let mut buf = STANDARD
        .decode(encrypt.trim())
        .map_err(|_| DecryptError::NotBase64)?;
    if buf.is_empty() || buf.len() % PAD_BLOCK != 0 {
        return Err(DecryptError::BadLength);
    }
    let dec = Dec::new_from_slices(&key.0, key.iv()).map_err(|_| DecryptError::BadKey)?;
    let plain = dec
        .decrypt_padded_mut::<NoPadding>(&mut buf)
        .map_err(|_| DecryptError::BadLength)?;
    let plain = unpad(plain)?;
    let len_bytes: [u8; 4] = plain
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecryptError::BadFrame)?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| DecryptError::BadFrame)?;
    let end = 20usize.checked_add(len).ok_or(DecryptError::BadFrame)?;
    let message = plain.get(20..end).ok_or(DecryptError::BadFrame)?;
    let tail = plain.get(end..).ok_or(DecryptError::BadFrame)?;
    if tail != appid.as_bytes() {
        return Err(DecryptError::WrongAppid);
    }
    Ok(message.to_vec())
}

/// PKCS#7 with a 32-byte block: the last byte n (1..=32) and n bytes of n.
fn unpad(p: &[u8]) -> Result<&[u8], DecryptError> {
    let n = usize::from(*p.last().ok_or(DecryptError::BadPadding)?);
    if n == 0 || n > PAD_BLOCK || n > p.len() {
        return Err(DecryptError::BadPadding);
    }
    let (body, pad) = p.split_at(p.len() - n);
    if pad.iter().any(|b| usize::from(*b) != n) {
        return Err(DecryptError::BadPadding);
    }
    Ok(body)
}

/// Encrypt `message` for `appid` as WeChat does (the simulator and tests push
/// with it); `random` is the 16-byte prefix.
pub fn encrypt(key: &AesKey, message: &[u8], appid: &str, random: [u8; 16]) -> String {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut plain = Vec::with_capacity(message.len() + appid.len() + 20 + PAD_BLOCK);
    plain.extend_from_slice(&random);
    plain.extend_from_slice(&len.to_be_bytes());
    plain.extend_from_slice(message);
    plain.extend_from_slice(appid.as_bytes());
    let n = PAD_BLOCK - plain.len() % PAD_BLOCK;
    // n is 1..=32
    plain.resize(plain.len() + n, n as u8);
    let total = plain.len();
    let enc = match Enc::new_from_slices(&key.0, key.iv()) {
        Ok(e) => e,
        Err(_) => unreachable!("the key is 32 bytes and the IV 16"),
    };
    match enc.encrypt_padded_mut::<NoPadding>(&mut plain, total) {
        Ok(c) => STANDARD.encode(c),
        Err(_) => unreachable!("the buffer is a whole number of blocks"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ENCRYPT: &str = "+qdx1OKCy+5JPCBFWw70tm0fJGb2Jmeia4FCB7kao+/Q5c/ohsOzQHi8khUOb05JCpj0JB4RvQMkUyus8TPxLKJGQqcvZqzDpVzazhZv6JsXUnnR8XGT740XgXZUXQ7vJVnAG+tE8NUd4yFyjPy7GgiaviNrlCTj+l5kdfMuFUPpRSrfMZuMcp3Fn2Pede2IuQrKEYwKSqFIZoNqJ4M8EajAsjLY2km32IIjdf8YL/P50F7mStwntrA2cPDrM1kb6mOcfBgRtWygb3VIYnSeOBrebufAlr7F9mFUPAJGj04=";
    const APPID: &str = "wxba5fad812f8e6fb9";

    fn key() -> AesKey {
        AesKey::from_encoding_key(&"A".repeat(43)).unwrap()
    }

    #[test]
    fn the_safe_mode_check_value_decrypts() {
        let m = decrypt(&key(), ENCRYPT, APPID).unwrap();
        assert_eq!(m.len(), 167);
        let s = String::from_utf8(m).unwrap();
        assert!(s.starts_with(r#"{"ToUserName":"gh_97417a04a28d","#), "{s}");
        assert!(
            s.ends_with(r#""Event":"debug_demo","debug_str":"hello world"}"#),
            "{s}"
        );
    }

    #[test]
    fn an_appid_mismatch_after_decryption_is_refused() {
        assert_eq!(
            decrypt(&key(), ENCRYPT, "wxba5fad812f8e6fb8"),
            Err(DecryptError::WrongAppid)
        );
        assert_eq!(decrypt(&key(), ENCRYPT, ""), Err(DecryptError::WrongAppid));
    }

    #[test]
    fn a_wrong_key_or_a_tampered_body_is_refused() {
        let other = AesKey::from_encoding_key(&"B".repeat(43)).unwrap();
        assert!(decrypt(&other, ENCRYPT, APPID).is_err());
        let mut raw = STANDARD.decode(ENCRYPT).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(decrypt(&key(), &STANDARD.encode(&raw), APPID).is_err());
        assert_eq!(
            decrypt(&key(), "not base64!", APPID),
            Err(DecryptError::NotBase64)
        );
        assert_eq!(decrypt(&key(), "AAAA", APPID), Err(DecryptError::BadLength));
        assert_eq!(
            AesKey::from_encoding_key("short").unwrap_err(),
            DecryptError::BadKey
        );
        assert_eq!(
            AesKey::from_encoding_key(&"!".repeat(43)).unwrap_err(),
            DecryptError::BadKey
        );
    }

    #[test]
    fn encrypt_and_decrypt_round_trip_at_every_padding_length() {
        for n in 0..70 {
            let msg = vec![b'x'; n];
            let enc = encrypt(&key(), &msg, APPID, [7; 16]);
            assert_eq!(decrypt(&key(), &enc, APPID).unwrap(), msg);
        }
    }
}
