//! `outbox export`: every matching job, streamed as JSON lines or CSV, for audits and
//! spreadsheets. Rows come from the cursor one by one (memory does not grow with the
//! outbox), and CSV cells that look like formulas are defused.

use std::io::{self, BufWriter, Write};

use serde_json::{json, Value as Json};

use super::fmt::{csv_field, csv_text, opt_time, redact, stored_json, stored_json_text};
use super::{job_filter, open_read, AuditError, ExportFormat, Filters};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::outbox::operator::{ExportRow, JobFilter};
use crate::outbox::store::Store;

const EXPORT_COLS: [&str; 13] = [
    "id",
    "op",
    "bill_no",
    "appid",
    "openid",
    "state",
    "attempts",
    "last_errcode",
    "last_error",
    "received_at",
    "finished_at",
    "request",
    "result",
];

/// Export columns written by the worker itself (id, attempts, last_errcode,
/// received_at, finished_at): never escaped, so `-1` stays a number.
const CSV_NUMERIC: [usize; 5] = [0, 6, 7, 9, 10];

pub(super) fn export(
    f: &Filters,
    kind: Option<&str>,
    format: ExportFormat,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let which = super::pushes::which(kind)?;
    let filter = job_filter(f, now_ms(), None)?;
    let store = open_read(settings)?;
    if let super::pushes::Which::Pushes(kind) = which {
        if super::pushes::job_only(f) {
            return Err(AuditError::Usage(
                "--status, --op, --bill-no-prefix and --errcode select jobs, not pushes".into(),
            ));
        }
        let mut w = BufWriter::with_capacity(64 * 1024, out);
        super::pushes::export(
            &store,
            &super::pushes::push_filter(&filter, kind),
            format,
            &mut w,
        )?;
        w.flush()?;
        return Ok(());
    }
    write_rows(&store, &filter, format, out)
}

/// Every job `filter` selects, oldest first, as JSON lines or CSV (with its header
/// row) to `out`: `outbox export`, and the console's export of a search.
pub(crate) fn write_rows(
    store: &Store,
    filter: &JobFilter,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let mut w = BufWriter::with_capacity(64 * 1024, out);
    if format == ExportFormat::Csv {
        writeln!(w, "{}", EXPORT_COLS.join(","))?;
    }
    store.export_each(filter, |row| -> Result<(), AuditError> {
        let ExportRow {
            id,
            op,
            bill_no,
            appid,
            openid,
            state,
            attempts,
            last_errcode,
            last_error,
            received_at,
            finished_at,
            request,
            result,
        } = row;
        match format {
            ExportFormat::Jsonl => {
                // Keys in column order (a serde_json map would sort them).
                let values: [Json; 13] = [
                    json!(id),
                    json!(op),
                    json!(bill_no),
                    json!(appid),
                    json!(openid),
                    json!(state),
                    json!(attempts),
                    json!(last_errcode),
                    json!(last_error.as_deref().map(|e| redact(e).into_owned())),
                    json!(rfc3339_ms(received_at)),
                    opt_time(finished_at),
                    stored_json(&request),
                    result.as_deref().map_or(Json::Null, stored_json),
                ];
                for (i, (key, value)) in EXPORT_COLS.iter().zip(&values).enumerate() {
                    w.write_all(if i == 0 { b"{\"" } else { b",\"" })?;
                    w.write_all(key.as_bytes())?;
                    w.write_all(b"\":")?;
                    serde_json::to_writer(&mut w, value).map_err(io::Error::from)?;
                }
                w.write_all(b"}\n")?;
            }
            ExportFormat::Csv => {
                let fields: [String; 13] = [
                    id.to_string(),
                    op,
                    bill_no,
                    appid,
                    openid,
                    state,
                    attempts.to_string(),
                    last_errcode.map(|c| c.to_string()).unwrap_or_default(),
                    last_error
                        .map(|e| redact(&e).into_owned())
                        .unwrap_or_default(),
                    rfc3339_ms(received_at),
                    finished_at.map(rfc3339_ms).unwrap_or_default(),
                    stored_json_text(&request),
                    result.as_deref().map(stored_json_text).unwrap_or_default(),
                ];
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        w.write_all(b",")?;
                    }
                    // numbers and times are the worker's own; the rest may come from outside
                    let cell = if CSV_NUMERIC.contains(&i) {
                        csv_field(field)
                    } else {
                        csv_text(field)
                    };
                    w.write_all(cell.as_bytes())?;
                }
                w.write_all(b"\r\n")?;
            }
        }
        Ok(())
    })?;
    w.flush()?;
    Ok(())
}
