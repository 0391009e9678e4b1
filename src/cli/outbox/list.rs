//! `outbox list`: the newest jobs as a table (or one JSON array), so an operator sees
//! at a glance what is pending, what failed and whether its reply reached the broker.

use std::io::{self, Write};

use serde_json::{json, Value as Json};

use super::fmt::{clean, dash, opt_time, redact, rfc3339_s, table};
use super::{job_filter, AuditError, ListArgs};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::outbox::{open_ro, operator};

pub(super) fn list(
    a: &ListArgs,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let now = now_ms();
    let filter = job_filter(&a.filters, now, None)?;
    let conn = open_ro(&settings.config.outbox.path)?;
    let rows = operator::list(&conn, &filter, (a.limit != 0).then_some(a.limit))?;
    if a.json {
        let arr: Vec<Json> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "received_at": rfc3339_ms(r.received_at),
                    "op": r.op,
                    "bill_no": r.bill_no,
                    "appid": r.appid,
                    "openid": r.openid,
                    "status": r.state,
                    "attempts": r.attempts,
                    "last_errcode": r.last_errcode,
                    "last_error": r.last_error.as_deref().map(|e| redact(e).into_owned()),
                    "finished_at": opt_time(r.finished_at),
                    "replies": r.replies,
                    "replies_confirmed": r.confirmed,
                    "replies_returned": r.returned,
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &arr).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(out, "no jobs match")?;
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut reply = if r.replies == 0 {
                "-".to_string()
            } else {
                format!("confirmed {}/{}", r.confirmed, r.replies)
            };
            if r.returned > 0 {
                reply.push_str(&format!(" ({} returned: no such queue)", r.returned));
            }
            vec![
                rfc3339_s(r.received_at),
                r.op.clone(),
                clean(&r.bill_no),
                clean(&r.openid),
                r.state.clone(),
                r.attempts.to_string(),
                dash(r.last_errcode),
                reply,
            ]
        })
        .collect();
    table(
        out,
        "",
        &[
            "received",
            "op",
            "bill_no",
            "openid",
            "status",
            "attempts",
            "last errcode",
            "reply",
        ],
        &cells,
    )?;
    if a.limit != 0 && rows.len() == a.limit as usize {
        writeln!(
            out,
            "(first {} shown, newest first; --limit N for more, `outbox export` for all)",
            a.limit
        )?;
    }
    Ok(())
}
