//! The console's filter: the fields of its search form, named after the `outbox
//! list` flags (`bill_no_prefix`, `openid`, `appid`, `status`, `op`, `errcode`,
//! `since`, `until`), as they arrive in a URL's query or a POSTed form; turned into
//! the CLI's [`Filters`] so a search in the browser selects exactly the jobs the same
//! flags select on the command line, and back into a query string for links (the
//! next page, export, the confirm step), so the URL always holds the filter.
//!
//! Two fields select WeChat payment pushes: `kind` (as `outbox list --kind` takes
//! it) and `out_trade_no` (an OutTradeNo or RefundId, exactly, as `outbox show`
//! takes it); openid, appid, since and until select pushes too.

use serde::Deserialize;

use crate::cli::outbox::filter::job_filter;
use crate::cli::outbox::pushes::{push_filter, which, Which};
use crate::cli::outbox::{AuditError, Filters};
use crate::outbox::operator::JobFilter;
use crate::outbox::pushes::PushFilter;

/// A search as the browser sends it. Every field is text (an empty form field is
/// an empty string, meaning "any"); [`SearchForm::filters`] checks them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SearchForm {
    pub bill_no_prefix: String,
    pub openid: String,
    pub appid: String,
    pub status: String,
    pub op: String,
    pub errcode: String,
    pub since: String,
    pub until: String,
    /// Exactly this bill_no (the single-job actions of a job's page).
    pub bill_no: String,
    /// `jobs`, `pushes` or one push kind; empty: jobs, then pushes.
    pub kind: String,
    /// Pushes whose OutTradeNo or RefundId is exactly this.
    pub out_trade_no: String,
    /// The overview's quick find: jobs whose bill_no starts with it (unless
    /// `bill_no_prefix` is set) and pushes stored under it (unless `out_trade_no` is).
    pub find: String,
}

/// The longest value a filter field may have (a bill_no or openid is far shorter).
const MAX_FIELD: usize = 256;

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl SearchForm {
    /// The filters as the `outbox` verbs take them, and the exact bill_no if any.
    pub fn filters(&self) -> Result<(Filters, Option<String>), AuditError> {
        for (name, v) in self.all_fields() {
            if v.len() > MAX_FIELD {
                return Err(AuditError::Usage(format!(
                    "{name} is longer than {MAX_FIELD} bytes"
                )));
            }
        }
        let errcode = match opt(&self.errcode) {
            None => None,
            Some(e) => Some(e.parse::<i64>().map_err(|_| AuditError::BadFilter {
                flag: "errcode",
                value: e.clone(),
                expected: "a number such as -1 or 90013".into(),
            })?),
        };
        Ok((
            Filters {
                status: opt(&self.status),
                op: opt(&self.op),
                openid: opt(&self.openid),
                appid: opt(&self.appid),
                since: opt(&self.since),
                until: opt(&self.until),
                bill_no_prefix: opt(&self.bill_no_prefix).or_else(|| opt(&self.find)),
                errcode,
            },
            opt(&self.bill_no),
        ))
    }

    /// The outbox's filter, times resolved against `now` (checked as the CLI
    /// checks its flags).
    pub fn job_filter(&self, now: i64) -> Result<JobFilter, AuditError> {
        let (f, bill_no) = self.filters()?;
        job_filter(&f, now, bill_no.as_deref())
    }

    /// What `kind` selects (checked as `outbox list --kind` checks it), refused
    /// when the other fields contradict it.
    pub(crate) fn which(&self) -> Result<Which, AuditError> {
        let w = which(opt(&self.kind).as_deref())?;
        match w {
            Which::Pushes(_) if self.job_only() => Err(AuditError::Usage(
                "status, op, errcode, bill_no and bill_no_prefix select jobs, not pushes".into(),
            )),
            Which::Jobs if self.push_only() => Err(AuditError::Usage(
                "out_trade_no selects pushes, not jobs".into(),
            )),
            w => Ok(w),
        }
    }

    /// Whether a field only jobs have is set.
    pub fn job_only(&self) -> bool {
        [
            &self.bill_no,
            &self.bill_no_prefix,
            &self.status,
            &self.op,
            &self.errcode,
        ]
        .iter()
        .any(|v| !v.trim().is_empty())
    }

    /// Whether a field only pushes have is set.
    pub fn push_only(&self) -> bool {
        !self.out_trade_no.trim().is_empty()
    }

    /// Which tables the search shows: (jobs, pushes). Without `kind` each shows
    /// unless the filter names only the other's fields.
    pub fn shows(&self) -> Result<(bool, bool), AuditError> {
        Ok(match self.which()? {
            Which::Jobs => (true, false),
            Which::Pushes(_) => (false, true),
            Which::Default => (
                !self.push_only() || self.job_only(),
                !self.job_only() || self.push_only(),
            ),
        })
    }

    /// The push filter (the shared fields, `kind` and `out_trade_no`), times
    /// resolved against `now`.
    pub fn push_filter(&self, now: i64) -> Result<PushFilter, AuditError> {
        let kind = match self.which()? {
            Which::Pushes(k) => k,
            _ => None,
        };
        // the shared fields only: the job-only ones do not narrow pushes
        let shared = SearchForm {
            openid: self.openid.clone(),
            appid: self.appid.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            ..SearchForm::default()
        };
        let mut f = push_filter(&shared.job_filter(now)?, kind);
        f.key = opt(&self.out_trade_no).or_else(|| opt(&self.find));
        Ok(f)
    }

    /// Whether no job field is set (every job: the actions need one).
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.trim().is_empty())
    }

    /// The job fields and the push fields.
    fn all_fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.fields().into_iter().chain([
            ("kind", self.kind.as_str()),
            ("out_trade_no", self.out_trade_no.as_str()),
        ])
    }

    /// The job fields in form order, with their names.
    pub fn fields(&self) -> [(&'static str, &str); 10] {
        [
            ("find", &self.find),
            ("bill_no", &self.bill_no),
            ("bill_no_prefix", &self.bill_no_prefix),
            ("openid", &self.openid),
            ("appid", &self.appid),
            ("status", &self.status),
            ("op", &self.op),
            ("errcode", &self.errcode),
            ("since", &self.since),
            ("until", &self.until),
        ]
    }

    /// The set fields as a query string (`status=unknown&op=pay`), without `?`.
    pub fn query(&self) -> String {
        let mut q = String::new();
        for (k, v) in self.all_fields() {
            let v = v.trim();
            if !v.is_empty() {
                push_pair(&mut q, k, v);
            }
        }
        q
    }

    /// The filter in words, for headings and the recorded action (`status=unknown op=pay`).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .all_fields()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| format!("{k}={}", v.trim()))
            .collect();
        if parts.is_empty() {
            "every job".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// Append `k=v` (percent-encoded) to a query string.
pub fn push_pair(q: &mut String, k: &str, v: &str) {
    if !q.is_empty() {
        q.push('&');
    }
    encode_into(q, k);
    q.push('=');
    encode_into(q, v);
}

/// `s` percent-encoded for a query string.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(&mut out, s);
    out
}

/// Percent-encode everything but the unreserved characters (RFC 3986).
fn encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

const HEX: [u8; 16] = *b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_are_any_and_the_query_round_trips_through_encoding() {
        let f = SearchForm {
            bill_no_prefix: "B 1&2".into(),
            status: "unknown".into(),
            openid: "  ".into(),
            ..SearchForm::default()
        };
        let (filters, bill) = f.filters().expect("valid");
        assert_eq!(filters.bill_no_prefix.as_deref(), Some("B 1&2"));
        assert_eq!(filters.openid, None);
        assert_eq!(bill, None);
        assert_eq!(f.query(), "bill_no_prefix=B%201%262&status=unknown");
        assert_eq!(f.describe(), "bill_no_prefix=B 1&2 status=unknown");
        assert!(SearchForm::default().is_empty());
    }

    #[test]
    fn bad_values_are_refused_as_the_cli_refuses_them() {
        let bad = |f: SearchForm| f.job_filter(0).is_err();
        assert!(bad(SearchForm {
            status: "lost".into(),
            ..SearchForm::default()
        }));
        assert!(bad(SearchForm {
            errcode: "x".into(),
            ..SearchForm::default()
        }));
        assert!(bad(SearchForm {
            since: "soon".into(),
            ..SearchForm::default()
        }));
        assert!(bad(SearchForm {
            openid: "o".repeat(MAX_FIELD + 1),
            ..SearchForm::default()
        }));
        let ok = SearchForm {
            errcode: "-1".into(),
            since: "2h".into(),
            ..SearchForm::default()
        }
        .job_filter(10_000_000)
        .expect("valid");
        assert_eq!(ok.errcode, Some(-1));
        assert_eq!(ok.since, Some(10_000_000 - 7_200_000));
    }

    #[test]
    fn each_table_shows_unless_the_filter_names_only_the_other() {
        let f = |kind: &str, status: &str, otn: &str, find: &str| SearchForm {
            kind: kind.into(),
            status: status.into(),
            out_trade_no: otn.into(),
            find: find.into(),
            openid: "o".into(),
            ..SearchForm::default()
        };
        let shows = |s: SearchForm| s.shows().ok();
        assert_eq!(shows(f("", "", "", "")), Some((true, true)));
        assert_eq!(shows(f("", "unknown", "", "")), Some((true, false)));
        assert_eq!(shows(f("", "", "T1", "")), Some((false, true)));
        assert_eq!(shows(f("", "", "", "T1")), Some((true, true)));
        assert_eq!(shows(f("jobs", "", "", "")), Some((true, false)));
        assert_eq!(shows(f("refunded", "", "", "")), Some((false, true)));
        assert_eq!(shows(f("refunded", "unknown", "", "")), None, "job field");
        assert_eq!(shows(f("jobs", "", "T1", "")), None, "push field");
        assert_eq!(shows(f("sales", "", "", "")), None, "no such kind");
        let pf = f("refunded", "", "", "T1").push_filter(0).expect("valid");
        assert_eq!(pf.kind.as_deref(), Some("refunded"));
        assert_eq!(pf.key.as_deref(), Some("T1"), "find looks the key up");
        assert_eq!(pf.openid.as_deref(), Some("o"));
        let jf = f("", "", "", "T1").job_filter(0).expect("valid");
        assert_eq!(
            jf.bill_no_prefix.as_deref(),
            Some("T1"),
            "and bill_nos by prefix"
        );
        let only_push = SearchForm {
            out_trade_no: "T1".into(),
            ..SearchForm::default()
        };
        assert!(
            only_push.is_empty(),
            "no job field: the job actions refuse it"
        );
    }

    #[test]
    fn a_time_fixed_by_the_confirm_step_reads_back_to_the_same_millisecond() {
        let at = 1_796_529_737_698;
        let f = SearchForm {
            since: crate::command::rfc3339_ms(at),
            until: crate::command::rfc3339_ms(at + 1),
            ..SearchForm::default()
        }
        .job_filter(0)
        .expect("valid");
        assert_eq!((f.since, f.until), (Some(at), Some(at + 1)));
    }
}
