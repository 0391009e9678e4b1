//! What the worker puts in the dead-letter queue for a command it refuses: a copy
//! without the session_key, saying why in a header, that expires after
//! `broker.dead_letter_ttl`.
//!
//! The dead-letter queue is read by people and kept for days; a session_key there
//! would outlive the job it signed (the outbox erases it once a job is final). So
//! the worker no longer rejects the delivery for the broker to dead-letter it
//! unchanged: it publishes a copy ([`scrub`]bed) with confirms, then acks the
//! original. Messages the broker itself dead-letters (the command queue's delivery
//! limit) are unchanged and are bounded by the queue's TTL only.

use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;

/// Header naming the refusal (`invalid_command`, `bill_no_conflict`, ...).
pub const REASON_HEADER: &str = "x-midas-dead-letter-reason";
/// Header present when the copy differs from the command: `removed` (the
/// session_key field was taken out of the JSON object) or `body-dropped` (the body
/// could not be read as JSON but holds the text `session_key`; it is left out).
pub const SESSION_KEY_HEADER: &str = "x-midas-session-key";

/// What [`scrub`] did to a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scrubbed {
    Unchanged,
    Removed,
    BodyDropped,
}

impl Scrubbed {
    fn header(self) -> Option<&'static str> {
        match self {
            Scrubbed::Unchanged => None,
            Scrubbed::Removed => Some("removed"),
            Scrubbed::BodyDropped => Some("body-dropped"),
        }
    }
}

/// The body of the copy: a JSON object (no larger than `max`, the command limit)
/// without its `session_key` field; anything else that mentions `session_key` is
/// left out; the rest unchanged, byte for byte.
pub fn scrub(body: &[u8], max: usize) -> (Vec<u8>, Scrubbed) {
    if !may_hold_session_key(body) {
        return (body.to_vec(), Scrubbed::Unchanged);
    }
    if body.len() <= max {
        if let Ok(mut obj) =
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
        {
            if obj.remove("session_key").is_none() && !mentions(body) {
                return (body.to_vec(), Scrubbed::Unchanged);
            }
            if let Ok(copy) = serde_json::to_vec(&obj) {
                if !mentions(&copy) {
                    return (copy, Scrubbed::Removed);
                }
            }
        }
    }
    (Vec::new(), Scrubbed::BodyDropped)
}

fn mentions(b: &[u8]) -> bool {
    b.windows(11).any(|w| w == b"session_key")
}

/// Whether `body` may carry a session_key: it says `session_key`, or has a JSON
/// escape that could spell it (`session\u005fkey`). Reads the bytes, allocates nothing.
pub fn may_hold_session_key(body: &[u8]) -> bool {
    mentions(body) || body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u005f"))
}

/// Whether the broker should dead-letter `body` itself, unchanged: a command over
/// the limit (`max`) that cannot hold a session_key is not copied (megabytes
/// copied per refused command would let a flood of them grow the worker).
pub fn broker_may_keep(body: &[u8], max: usize) -> bool {
    body.len() > max && !may_hold_session_key(body)
}

/// The copy's properties: the command's (correlation_id, reply_to, content type,
/// message id, headers...), persistent, with the reason and the scrubbing in
/// headers and an expiration of `ttl_ms`.
pub fn properties(
    original: &BasicProperties,
    reason: &str,
    scrubbed: Scrubbed,
    ttl_ms: u128,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(REASON_HEADER),
        AMQPValue::LongString(reason.into()),
    );
    if let Some(v) = scrubbed.header() {
        headers.insert(
            ShortString::from(SESSION_KEY_HEADER),
            AMQPValue::LongString(v.into()),
        );
    }
    let mut p = original
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_expiration(ttl_ms.to_string().into());
    if original.content_type().is_none() {
        p = p.with_content_type("application/json".into());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_key_never_reaches_the_copy() {
        let max = 65_536;
        let plain = br#"{"op":"pay","bill_no":"B1","openid":"o","amt":0}"#;
        assert_eq!(scrub(plain, max), (plain.to_vec(), Scrubbed::Unchanged));
        for body in [
            &br#"{"op":"pay","bill_no":"B1","openid":"o","amt":0,"session_key":"SK1"}"#[..],
            br#"{"session_key":"SK1","session_key":"SK1","op":"pay"}"#,
            br#"{"op":"pay","session\u005fkey":"SK1"}"#,
            br#"{"op":"pay","nested":{"session_key":"SK1"}}"#,
            br#"{"op":"pay","session_key":"SK1""#,
            b"session_key=SK1 not json",
            br#"["session_key","SK1"]"#,
        ] {
            let (copy, how) = scrub(body, max);
            assert_ne!(
                how,
                Scrubbed::Unchanged,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(
                !copy.windows(3).any(|w| w == b"SK1"),
                "{} -> {}",
                String::from_utf8_lossy(body),
                String::from_utf8_lossy(&copy)
            );
        }
        let (copy, how) = scrub(
            br#"{"op":"pay","bill_no":"B1","session_key":"SK1","amt":0}"#,
            max,
        );
        assert_eq!(how, Scrubbed::Removed);
        let v: serde_json::Value = serde_json::from_slice(&copy).unwrap();
        assert_eq!(v["bill_no"], "B1");
        assert!(v.get("session_key").is_none());
        // over the command limit: not parsed, dropped when it mentions the key
        let big = format!(r#"{{"session_key":"SK1","pad":"{}"}}"#, "x".repeat(100));
        assert_eq!(scrub(big.as_bytes(), 50).1, Scrubbed::BodyDropped);
    }

    #[test]
    fn the_copy_says_why_and_expires() {
        let original = BasicProperties::default().with_correlation_id("c1".into());
        let p = properties(&original, "bill_no_conflict", Scrubbed::Removed, 1000);
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c1"));
        assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("1000"));
        assert_eq!(p.delivery_mode(), &Some(2));
        let h = p.headers().clone().unwrap_or_default();
        assert_eq!(
            h.inner().get(REASON_HEADER),
            Some(&AMQPValue::LongString("bill_no_conflict".into()))
        );
        assert_eq!(
            h.inner().get(SESSION_KEY_HEADER),
            Some(&AMQPValue::LongString("removed".into()))
        );
    }
}
