//! Output helpers shared by the `outbox` verbs: one-line, secret-free text, aligned
//! tables, times and durations for people, CSV cells a spreadsheet will not run.

use std::borrow::Cow;
use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value as Json;

use crate::command::{is_hidden_char, rfc3339_ms};

/// One line, no control, invisible or bidirectional characters (values come from
/// clients and Midas, and older outboxes took them): each is escaped (`\n`,
/// `\u{202e}`), so a value is printed as what it is.
pub(crate) fn one_line(s: &str) -> Cow<'_, str> {
    if s.chars().any(is_hidden_char) {
        let mut out = String::with_capacity(s.len() + 8);
        for c in s.chars() {
            if c.is_control() {
                out.extend(c.escape_debug());
            } else if is_hidden_char(c) {
                out.extend(c.escape_unicode());
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(s)
    }
}

/// A JSON document with every hidden character of its strings written as a
/// `\uXXXX` escape (serde_json writes them raw; they can only occur inside
/// strings, and the escape decodes to the same text).
pub(crate) fn json_escaped(doc: String) -> String {
    if !doc.chars().any(is_hidden_char) {
        return doc;
    }
    let mut out = String::with_capacity(doc.len() + 16);
    for c in doc.chars() {
        if is_hidden_char(c) && c != '\n' {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Mask anything that looks like a secret in free text (defence in depth: the
/// worker already keeps tokens out of error messages).
pub(crate) fn redact(s: &str) -> Cow<'_, str> {
    const KEYS: [&str; 3] = ["access_token=", "session_key=", "\"session_key\":"];
    if !KEYS.iter().any(|k| s.contains(k)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some((pos, key)) = KEYS
        .iter()
        .filter_map(|k| rest.find(k).map(|p| (p, *k)))
        .min_by_key(|(p, _)| *p)
    {
        out.push_str(&rest[..pos + key.len()]);
        out.push_str("***");
        let after = &rest[pos + key.len()..];
        let after = after.trim_start_matches([' ', '"']);
        let end = after
            .find(|c: char| {
                c == '&' || c == ',' || c == '"' || c == ')' || c == '}' || c.is_whitespace()
            })
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

pub(crate) fn clean(s: &str) -> String {
    one_line(&redact(s)).into_owned()
}

pub(crate) fn scrub(v: &mut Json) {
    match v {
        Json::Object(m) => {
            m.remove("session_key");
            m.values_mut().for_each(scrub);
        }
        Json::Array(a) => a.iter_mut().for_each(scrub),
        Json::String(s) => {
            if let Cow::Owned(r) = redact(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

/// A stored JSON column as a JSON value (scrubbed); unparseable text stays a string.
pub(crate) fn stored_json(s: &str) -> Json {
    match serde_json::from_str::<Json>(s) {
        Ok(mut v) => {
            scrub(&mut v);
            v
        }
        Err(_) => Json::String(redact(s).into_owned()),
    }
}

/// A stored JSON column as text: verbatim unless it needs scrubbing.
pub(crate) fn stored_json_text(s: &str) -> String {
    if s.contains("session_key") || s.contains("access_token") {
        stored_json(s).to_string()
    } else {
        s.to_string()
    }
}

pub(crate) fn rfc3339_s(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn opt_time(ms: Option<i64>) -> Json {
    ms.map_or(Json::Null, |m| Json::String(rfc3339_ms(m)))
}

pub(crate) fn age(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `90d`, `48h`, `90m`: whole days or hours as such (humantime would say "2months 29days ...").
pub(crate) fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && d.subsec_nanos() == 0 {
        for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if s % n == 0 {
                return format!("{}{unit}", s / n);
            }
        }
    }
    humantime::format_duration(d).to_string()
}

pub(crate) fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |x| x.to_string())
}

/// An aligned table: two spaces between columns, no trailing blanks.
pub(crate) fn table(
    out: &mut dyn Write,
    indent: &str,
    headers: &[&str],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut s = String::from(indent);
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            s.extend(std::iter::repeat_n(' ', pad));
        }
        s.truncate(s.trim_end().len());
        s
    };
    writeln!(out, "{}", line(&mut headers.iter().copied()))?;
    for row in rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

/// A CSV cell of text from outside (bill_no, openid, Midas's errmsg, ...): one that
/// starts like a formula (`=`, `+`, `-`, `@`, tab, CR) gets a leading `'`, so a
/// spreadsheet shows it instead of running it; then quoted as [`csv_field`] says.
pub(crate) fn csv_text(s: &str) -> Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(csv_field(&format!("'{s}")).into_owned())
    } else {
        csv_field(s)
    }
}

/// Quote a CSV field when it needs it (RFC 4180).
pub(crate) fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redaction_masks_tokens() {
        let s = redact("error for url (https://x/pay?access_token=ABC123&x=1): timeout");
        assert!(!s.contains("ABC123"), "{s}");
        assert!(s.contains("x=1"));
        let s = redact(r#"{"session_key": "SK1", "a": 1}"#);
        assert!(!s.contains("SK1"), "{s}");
        let mut v = json!({"session_key": "x", "n": {"session_key": "y"}});
        scrub(&mut v);
        assert_eq!(v, json!({"n": {}}));
    }

    #[test]
    fn durations_print_in_whole_units() {
        assert_eq!(fmt_dur(Duration::from_secs(90 * 86_400)), "90d");
        assert_eq!(fmt_dur(Duration::from_secs(47 * 3_600)), "47h");
        assert_eq!(fmt_dur(Duration::from_millis(1500)), "1s 500ms");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\"\n"), "\"say \"\"hi\"\"\n\"");
    }

    #[test]
    fn csv_text_defuses_formulas() {
        assert_eq!(csv_text("=1+1"), "'=1+1");
        assert_eq!(csv_text("+1"), "'+1");
        assert_eq!(csv_text("-1"), "'-1");
        assert_eq!(csv_text("@x"), "'@x");
        assert_eq!(csv_text("\tx"), "'\tx");
        assert_eq!(csv_text("\rx"), "\"'\rx\"");
        assert_eq!(csv_text("=a,b"), "\"'=a,b\"");
        assert_eq!(csv_text("ok=1"), "ok=1");
    }
}
