//! `outbox stats`: counts by status and op, the oldest pending job, attempts per job
//! and replies not yet confirmed: the outbox's health in one screen.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;

use super::fmt::{age, clean, rfc3339_s, table};
use super::{open_read, AuditError, OPS, STATES};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::outbox::operator;

/// Nearest-rank percentile over a histogram sorted by value.
fn percentile(hist: &[(i64, i64)], total: i64, p: f64) -> Option<i64> {
    if total <= 0 {
        return None;
    }
    let rank = ((p * total as f64).ceil() as i64).clamp(1, total);
    let mut seen = 0;
    for (value, count) in hist {
        seen += count;
        if seen >= rank {
            return Some(*value);
        }
    }
    hist.last().map(|(v, _)| *v)
}

/// The oldest pending job.
#[derive(Debug, Serialize)]
pub struct OldestPending {
    pub bill_no: String,
    pub op: String,
    pub received_at: String,
    pub age_seconds: i64,
    #[serde(skip)]
    pub(crate) received_at_ms: i64,
}

/// Attempts per final job.
#[derive(Debug, Serialize)]
pub struct AttemptsPerJob {
    pub p50: Option<i64>,
    pub p99: Option<i64>,
    /// Final jobs counted.
    pub jobs: i64,
}

/// `outbox stats`: the `--json` object, and what the report is rendered from.
#[derive(Debug, Serialize)]
pub struct StatsView {
    pub jobs: i64,
    pub by_status: BTreeMap<&'static str, i64>,
    pub by_op: BTreeMap<&'static str, i64>,
    pub oldest_pending: Option<OldestPending>,
    pub attempts_per_final_job: AttemptsPerJob,
    pub unknown: i64,
    pub replies_unconfirmed: i64,
    pub replies_awaiting_result: i64,
    pub replies_returned: i64,
    /// WeChat payment pushes by kind (absent when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pushes: Vec<super::pushes::PushCount>,
}

impl StatsView {
    pub(crate) fn new(st: operator::Stats, now: i64) -> StatsView {
        let get =
            |v: &[(String, i64)], k: &str| v.iter().find(|(n, _)| n == k).map_or(0, |(_, c)| *c);
        let hist = &st.attempts_hist;
        let finals: i64 = hist.iter().map(|(_, c)| c).sum();
        StatsView {
            jobs: st.by_state.iter().map(|(_, c)| c).sum(),
            by_status: STATES.iter().map(|s| (*s, get(&st.by_state, s))).collect(),
            by_op: OPS.iter().map(|s| (*s, get(&st.by_op, s))).collect(),
            oldest_pending: st.oldest_pending.map(|(bill_no, op, at)| OldestPending {
                bill_no,
                op,
                received_at: rfc3339_ms(at),
                age_seconds: (now - at).max(0) / 1000,
                received_at_ms: at,
            }),
            attempts_per_final_job: AttemptsPerJob {
                p50: percentile(hist, finals, 0.50),
                p99: percentile(hist, finals, 0.99),
                jobs: finals,
            },
            unknown: get(&st.by_state, "unknown"),
            replies_unconfirmed: st.replies_unconfirmed,
            replies_awaiting_result: st.replies_awaiting,
            replies_returned: st.replies_returned,
            pushes: Vec::new(),
        }
    }

    fn render_text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "jobs: {}", self.jobs)?;
        // in lifecycle order, not alphabetical
        let rows = |names: &[&str], counts: &BTreeMap<&str, i64>| -> Vec<Vec<String>> {
            names
                .iter()
                .map(|s| {
                    vec![
                        s.to_string(),
                        counts.get(s).copied().unwrap_or(0).to_string(),
                    ]
                })
                .collect()
        };
        table(
            out,
            "  ",
            &["status", "jobs"],
            &rows(&STATES, &self.by_status),
        )?;
        table(out, "  ", &["op", "jobs"], &rows(&OPS, &self.by_op))?;
        match &self.oldest_pending {
            Some(o) => writeln!(
                out,
                "oldest pending job:     {} ({}), received {} ({} ago)",
                clean(&o.bill_no),
                o.op,
                rfc3339_s(o.received_at_ms),
                age(o.age_seconds.saturating_mul(1000))
            )?,
            None => writeln!(out, "oldest pending job:     none")?,
        }
        let a = &self.attempts_per_final_job;
        match (a.p50, a.p99) {
            (Some(p50), Some(p99)) => writeln!(
                out,
                "attempts per job:       p50 {p50}, p99 {p99} (over {} final jobs)",
                a.jobs
            )?,
            _ => writeln!(out, "attempts per job:       - (no final jobs)")?,
        }
        writeln!(
            out,
            "unknown (to reconcile): {}{}",
            self.unknown,
            if self.unknown > 0 {
                "  (`outbox list --status unknown`)"
            } else {
                ""
            }
        )?;
        writeln!(
            out,
            "replies not confirmed:  {} of final jobs (the worker re-publishes them), {} waiting for their job",
            self.replies_unconfirmed, self.replies_awaiting_result
        )?;
        writeln!(
            out,
            "replies returned:       {} (published, but no such queue)",
            self.replies_returned
        )
    }
}

pub(super) fn stats(
    as_json: bool,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let store = open_read(settings)?;
    let mut view = StatsView::new(store.stats()?, now_ms());
    view.pushes = super::pushes::counts(store.push_counts()?);
    if as_json {
        serde_json::to_writer_pretty(&mut *out, &view).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        view.render_text(out)?;
        super::pushes::counts_text(&view.pushes, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let hist = [(1, 98), (2, 1), (9, 1)];
        assert_eq!(percentile(&hist, 100, 0.5), Some(1));
        assert_eq!(percentile(&hist, 100, 0.99), Some(2));
        assert_eq!(percentile(&hist, 100, 1.0), Some(9));
        assert_eq!(percentile(&[], 0, 0.5), None);
    }
}
