//! The `--status`, `--op`, `--since`, ... filters of `list`, `export`, `retry` and
//! `republish`: checked, and turned into the outbox's [`JobFilter`]. Times are a
//! duration ago (`2h`) or an RFC 3339 time, with or without an offset.

use std::time::UNIX_EPOCH;

use super::{AuditError, Filters, OPS, STATES};
use crate::outbox::operator::JobFilter;

pub(super) fn check_state(flag: &'static str, v: &str) -> Result<(), AuditError> {
    if STATES.contains(&v) {
        Ok(())
    } else {
        Err(AuditError::BadFilter {
            flag,
            value: v.to_string(),
            expected: "one of pending, succeeded, failed, unknown".into(),
        })
    }
}

pub(super) fn check_op(v: &str) -> Result<(), AuditError> {
    if OPS.contains(&v) {
        Ok(())
    } else {
        Err(AuditError::BadFilter {
            flag: "--op",
            value: v.to_string(),
            expected: "one of pay, present, cancel_pay, balance, query_order".into(),
        })
    }
}

/// `2h` (that long ago), `2024-05-01T10:00:00Z`, `2024-05-01T18:00:00+08:00`,
/// `2024-05-01 10:00:00` (UTC) or `2024-05-01` (midnight UTC), to unix ms.
fn parse_when(flag: &'static str, raw: &str, now: i64) -> Result<i64, AuditError> {
    let s = raw.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    parse_time(s).ok_or_else(|| AuditError::BadFilter {
        flag,
        value: raw.to_string(),
        expected: "a duration ago like 2h or 3d, or an RFC 3339 time like 2024-05-01T10:00:00Z"
            .into(),
    })
}

fn parse_time(s: &str) -> Option<i64> {
    let owned;
    let s = if s.len() == 10 {
        owned = format!("{s}T00:00:00Z");
        owned.as_str()
    } else {
        s
    };
    let (base, offset_ms) = split_offset(s)?;
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let ms = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(ms - offset_ms)
}

/// Split a trailing `Z` or `±HH:MM` from an RFC 3339 time.
fn split_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(base) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return Some((base, 0));
    }
    let n = s.len();
    if n > 6 && s.is_char_boundary(n - 6) {
        let tail = &s.as_bytes()[n - 6..];
        if (tail[0] == b'+' || tail[0] == b'-')
            && tail[3] == b':'
            && tail[1..3].iter().chain(&tail[4..6]).all(u8::is_ascii_digit)
        {
            let h = i64::from(tail[1] - b'0') * 10 + i64::from(tail[2] - b'0');
            let m = i64::from(tail[4] - b'0') * 10 + i64::from(tail[5] - b'0');
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if tail[0] == b'-' { -1 } else { 1 };
            return Some((&s[..n - 6], sign * (h * 60 + m) * 60_000));
        }
    }
    Some((s, 0))
}

/// The filters as the outbox's [`JobFilter`] (checked; times resolved against `now`);
/// `bill_no`: exactly this one.
pub(crate) fn job_filter(
    f: &Filters,
    now: i64,
    bill_no: Option<&str>,
) -> Result<JobFilter, AuditError> {
    // an empty value would match everything (`--bill-no-prefix ""` is every job)
    for (flag, v) in [
        ("--status", &f.status),
        ("--op", &f.op),
        ("--openid", &f.openid),
        ("--appid", &f.appid),
        ("--since", &f.since),
        ("--until", &f.until),
        ("--bill-no-prefix", &f.bill_no_prefix),
    ] {
        if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(AuditError::BadFilter {
                flag,
                value: String::new(),
                expected:
                    "a value (an empty one would match every job; leave the flag out instead)"
                        .into(),
            });
        }
    }
    if bill_no.is_some_and(|b| b.trim().is_empty()) {
        return Err(AuditError::BadFilter {
            flag: "BILL_NO",
            value: String::new(),
            expected: "a bill_no".into(),
        });
    }
    if let Some(s) = &f.status {
        check_state("--status", s)?;
    }
    if let Some(op) = &f.op {
        check_op(op)?;
    }
    Ok(JobFilter {
        bill_no: bill_no.map(str::to_string),
        bill_no_prefix: f.bill_no_prefix.clone(),
        status: f.status.clone(),
        op: f.op.clone(),
        openid: f.openid.clone(),
        appid: f.appid.clone(),
        errcode: f.errcode,
        since: f
            .since
            .as_deref()
            .map(|s| parse_when("--since", s, now))
            .transpose()?,
        until: f
            .until
            .as_deref()
            .map(|u| parse_when("--until", u, now))
            .transpose()?,
        before_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_with_offsets() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_time("1970-01-01T08:00:01+08:00"), Some(1000));
        assert_eq!(parse_time("1970-01-01 00:00:01"), Some(1000));
        assert_eq!(parse_time("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(
            parse_when("--since", "2h", 10_000_000).ok(),
            Some(10_000_000 - 7_200_000)
        );
        assert!(parse_when("--since", "soon", 0).is_err());
    }
}
