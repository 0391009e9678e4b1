//! Secrets (AppKey, app secret, access token, session_key) wrapped so they cannot
//! leak by accident: `Debug` and `Display` print `***`, `Serialize` writes `"***"`.
//! The only way to read the value is [`Secret::expose`], which makes every use
//! greppable.
//!
//! URLs that may carry a password (the broker URL, a database URL) are
//! [`SecretUrl`]s: they print with the password replaced by `***` and stay usable
//! as a `&str` where a connection is opened.

use std::fmt;

/// A string that must never reach logs, replies, metrics or audit output.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for signing and for the wire to Midas only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A URL whose userinfo password (and any `password=` query parameter) must never be
/// printed. `Debug`, `Display` and `Serialize` show [`mask_url`] of it; it derefs to
/// the full `str` only to hand it to a connector.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        SecretUrl(value.into())
    }

    /// The full URL, password included: for opening a connection only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The same as [`SecretUrl::expose`], for code written against a `String` field.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked, fit for logs and output.
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SecretUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        SecretUrl(s)
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        SecretUrl(s.to_string())
    }
}

impl PartialEq<str> for SecretUrl {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SecretUrl {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl serde::Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

impl<'de> serde::Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

/// The parts of `scheme://user:password@host:port/path?query` this module needs.
struct Authority<'a> {
    /// Byte range of the password within the URL (after `user:`, before `@`).
    password: Option<std::ops::Range<usize>>,
    /// The host, brackets of an IPv6 literal removed.
    host: &'a str,
}

fn authority(url: &str) -> Authority<'_> {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[start..];
    // The last '@' ends the userinfo even when a password holds a raw '/', '?' or
    // '@': masking too much is harmless, too little is a leak.
    let (password, hostpart) = match rest.rfind('@') {
        Some(at) => {
            let pw = rest[..at]
                .find(':')
                .map(|colon| start + colon + 1..start + at);
            (pw, &rest[at + 1..])
        }
        None => (None, rest),
    };
    let end = hostpart.find(['/', '?', '#']).unwrap_or(hostpart.len());
    let hostport = &hostpart[..end];
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    Authority { password, host }
}

/// `amqp://user:pass@host/vhost` → `amqp://user:***@host/vhost`; a `password=`
/// query parameter is masked the same way. Anything else is left as it is.
pub fn mask_url(url: &str) -> String {
    let mut out = match authority(url).password {
        Some(r) => format!("{}***{}", &url[..r.start], &url[r.end..]),
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

/// The host part of a URL (`10.0.0.5`, `rabbitmq`, `::1`), without connecting.
pub fn url_host(url: &str) -> &str {
    authority(url).host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_their_password() {
        let u = SecretUrl::new("amqp://worker:s3cr3t-pw@rabbit.internal:5672/%2f");
        for shown in [
            format!("{u}"),
            format!("{u:?}"),
            serde_json::to_string(&u).unwrap(),
        ] {
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
            assert!(
                shown.contains("amqp://worker:***@rabbit.internal:5672/%2f"),
                "{shown}"
            );
        }
        assert_eq!(&*u, "amqp://worker:s3cr3t-pw@rabbit.internal:5672/%2f");
        assert_eq!(
            mask_url("postgres://u:p%40ss@db:5432/x?sslmode=require&password=other"),
            "postgres://u:***@db:5432/x?sslmode=require&password=***"
        );
        // a password containing '@' or '/' stays masked whole
        assert_eq!(mask_url("amqp://u:a@b@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(mask_url("amqp://u:a/b?c@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(mask_url("amqp://guest@h:5672"), "amqp://guest@h:5672");
        assert_eq!(mask_url("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(url_host("amqp://u:p@10.255.255.1:5672/%2f"), "10.255.255.1");
        assert_eq!(url_host("amqp://[::1]:5672"), "::1");
        assert_eq!(url_host("amqps://rabbit"), "rabbit");
    }

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u");
    }
}
