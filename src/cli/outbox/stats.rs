//! `outbox stats`: counts by status and op, the oldest pending job, attempts per job
//! and replies not yet confirmed: the outbox's health in one screen.

use std::io::{self, Write};

use serde_json::{json, Map, Value as Json};

use super::fmt::{age, clean, rfc3339_s, table};
use super::{AuditError, OPS, STATES};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::outbox::{open_ro, operator};

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

pub(super) fn stats(
    as_json: bool,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let conn = open_ro(&settings.config.outbox.path)?;
    let st = operator::stats(&conn)?;
    let now = now_ms();
    let (by_state, by_op, oldest, hist) = (
        &st.by_state,
        &st.by_op,
        &st.oldest_pending,
        &st.attempts_hist,
    );
    let get = |v: &[(String, i64)], k: &str| v.iter().find(|(n, _)| n == k).map_or(0, |(_, c)| *c);
    let total: i64 = by_state.iter().map(|(_, c)| c).sum();
    let finals: i64 = hist.iter().map(|(_, c)| c).sum();
    let (p50, p99) = (
        percentile(hist, finals, 0.50),
        percentile(hist, finals, 0.99),
    );
    let (unconfirmed, awaiting, returned) = (
        st.replies_unconfirmed,
        st.replies_awaiting,
        st.replies_returned,
    );
    let unknown = get(by_state, "unknown");

    if as_json {
        let states: Map<String, Json> = STATES
            .iter()
            .map(|s| (s.to_string(), json!(get(by_state, s))))
            .collect();
        let ops: Map<String, Json> = OPS
            .iter()
            .map(|s| (s.to_string(), json!(get(by_op, s))))
            .collect();
        let doc = json!({
            "jobs": total,
            "by_status": states,
            "by_op": ops,
            "oldest_pending": oldest.as_ref().map(|(b, o, at)| json!({
                "bill_no": b,
                "op": o,
                "received_at": rfc3339_ms(*at),
                "age_seconds": (now - at).max(0) / 1000,
            })),
            "attempts_per_final_job": { "p50": p50, "p99": p99, "jobs": finals },
            "unknown": unknown,
            "replies_unconfirmed": unconfirmed,
            "replies_awaiting_result": awaiting,
            "replies_returned": returned,
        });
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "jobs: {total}")?;
    let rows: Vec<Vec<String>> = STATES
        .iter()
        .map(|s| vec![s.to_string(), get(by_state, s).to_string()])
        .collect();
    table(out, "  ", &["status", "jobs"], &rows)?;
    let rows: Vec<Vec<String>> = OPS
        .iter()
        .map(|s| vec![s.to_string(), get(by_op, s).to_string()])
        .collect();
    table(out, "  ", &["op", "jobs"], &rows)?;
    match &oldest {
        Some((b, o, at)) => writeln!(
            out,
            "oldest pending job:     {} ({o}), received {} ({} ago)",
            clean(b),
            rfc3339_s(*at),
            age(now - at)
        )?,
        None => writeln!(out, "oldest pending job:     none")?,
    }
    match (p50, p99) {
        (Some(a), Some(b)) => writeln!(
            out,
            "attempts per job:       p50 {a}, p99 {b} (over {finals} final jobs)"
        )?,
        _ => writeln!(out, "attempts per job:       - (no final jobs)")?,
    }
    writeln!(
        out,
        "unknown (to reconcile): {unknown}{}",
        if unknown > 0 {
            "  (`outbox list --status unknown`)"
        } else {
            ""
        }
    )?;
    writeln!(out, "replies not confirmed:  {unconfirmed} of final jobs (the worker re-publishes them), {awaiting} waiting for their job")?;
    writeln!(
        out,
        "replies returned:       {returned} (published, but no such queue)"
    )?;
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
