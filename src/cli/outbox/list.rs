//! `outbox list`: the newest jobs as a table (or one JSON array), so an operator sees
//! at a glance what is pending, what failed and whether its reply reached the broker.

use std::io::{self, Write};

use serde::Serialize;

use super::fmt::{clean, dash, redact, rfc3339_s, table};
use super::pushes::{self, Which};
use super::{job_filter, open_read, AuditError, ListArgs};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::outbox::operator::JobFilter;
use crate::outbox::operator::ListRow;
use crate::outbox::store::Store;

/// One job of `outbox list`: the `--json` array holds these, and the table is
/// rendered from them.
#[derive(Debug, Serialize)]
pub struct ListItem {
    pub id: i64,
    pub received_at: String,
    pub op: String,
    pub bill_no: String,
    pub appid: String,
    pub openid: String,
    pub status: String,
    pub attempts: i64,
    pub last_errcode: Option<i64>,
    /// Scrubbed of anything that looks like a token.
    pub last_error: Option<String>,
    pub finished_at: Option<String>,
    pub replies: i64,
    pub replies_confirmed: i64,
    pub replies_returned: i64,
    /// For the table's second-precision column.
    #[serde(skip)]
    pub(crate) received_at_ms: i64,
}

impl From<ListRow> for ListItem {
    fn from(r: ListRow) -> Self {
        ListItem {
            id: r.id,
            received_at: rfc3339_ms(r.received_at),
            received_at_ms: r.received_at,
            op: r.op,
            bill_no: r.bill_no,
            appid: r.appid,
            openid: r.openid,
            status: r.state,
            attempts: r.attempts,
            last_errcode: r.last_errcode,
            last_error: r.last_error.as_deref().map(|e| redact(e).into_owned()),
            finished_at: r.finished_at.map(rfc3339_ms),
            replies: r.replies,
            replies_confirmed: r.confirmed,
            replies_returned: r.returned,
        }
    }
}

pub(super) fn list(
    a: &ListArgs,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let which = pushes::which(a.kind.as_deref())?;
    let filter = job_filter(&a.filters, now_ms(), None)?;
    let store = open_read(settings)?;
    let limit = (a.limit != 0).then_some(a.limit);
    if let Which::Pushes(kind) = which {
        if pushes::job_only(&a.filters) {
            return Err(AuditError::Usage(
                "--status, --op, --bill-no-prefix and --errcode select jobs, not pushes".into(),
            ));
        }
        return pushes::list(
            &store,
            &pushes::push_filter(&filter, kind),
            limit,
            a.json,
            out,
        );
    }
    list_jobs(a, &filter, &store, out)?;
    // the table shows the pushes after the jobs; JSON stays the jobs array
    if which == Which::Default && !a.json && !pushes::job_only(&a.filters) {
        let items = store.pushes(&pushes::push_filter(&filter, None), limit, true)?;
        if !items.is_empty() {
            writeln!(out, "\npushes (--kind pushes for these alone):")?;
            pushes::list_table(&items, out)?;
        }
    }
    Ok(())
}

fn list_jobs(
    a: &ListArgs,
    filter: &JobFilter,
    store: &Store,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let filter = filter.clone();
    let items: Vec<ListItem> = store
        .list(&filter, (a.limit != 0).then_some(a.limit))?
        .into_iter()
        .map(ListItem::from)
        .collect();
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &items).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if items.is_empty() {
        writeln!(out, "no jobs match")?;
        return Ok(());
    }
    let cells: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let mut reply = if r.replies == 0 {
                "-".to_string()
            } else {
                format!("confirmed {}/{}", r.replies_confirmed, r.replies)
            };
            if r.replies_returned > 0 {
                reply.push_str(&format!(
                    " ({} returned: no such queue)",
                    r.replies_returned
                ));
            }
            vec![
                rfc3339_s(r.received_at_ms),
                r.op.clone(),
                clean(&r.bill_no),
                clean(&r.openid),
                r.status.clone(),
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
    if a.limit != 0 && items.len() == a.limit as usize {
        writeln!(
            out,
            "(first {} shown, newest first; --limit N for more, `outbox export` for all)",
            a.limit
        )?;
    }
    Ok(())
}
