//! The pushes in the `outbox` verbs: `list` and `export` take `--kind` (`jobs`,
//! `pushes`, or one push kind: `coins_delivered`, `goods_delivered`, `refunded`),
//! `show` takes an OutTradeNo or RefundId, and `stats` counts pushes by kind.
//!
//! Without `--kind`, `list` shows the jobs and then the pushes the filters allow
//! (the job-only filters `--status`, `--op`, `--bill-no-prefix`, `--errcode`
//! select jobs only), and `list --json` / `export` keep printing jobs only, so
//! scripts written before pushes see what they always saw.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value as Json;

use super::fmt::{clean, csv_field, csv_text, dash, rfc3339_s, stored_json, table};
use super::{AuditError, ExportFormat, Filters};
use crate::command::rfc3339_ms;
use crate::outbox::operator::JobFilter;
use crate::outbox::pushes::{PushCounts, PushFilter, PushRow};
use crate::outbox::store::Store;

pub(crate) const PUSH_KINDS: [&str; 3] = ["coins_delivered", "goods_delivered", "refunded"];

/// What `--kind` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    /// No `--kind`: jobs first, then pushes (`list`); jobs only (`--json`, `export`).
    Default,
    Jobs,
    /// Pushes, of one kind or all.
    Pushes(Option<&'static str>),
}

pub(crate) fn which(kind: Option<&str>) -> Result<Which, AuditError> {
    Ok(match kind {
        None => Which::Default,
        Some("jobs") => Which::Jobs,
        Some("pushes") => Which::Pushes(None),
        Some(k) => match PUSH_KINDS.iter().find(|p| **p == k) {
            Some(p) => Which::Pushes(Some(p)),
            None => {
                return Err(AuditError::BadFilter {
                    flag: "--kind",
                    value: k.to_string(),
                    expected: "jobs, pushes, coins_delivered, goods_delivered or refunded".into(),
                })
            }
        },
    })
}

/// Whether `f` uses a filter only jobs have.
pub(super) fn job_only(f: &Filters) -> bool {
    f.status.is_some() || f.op.is_some() || f.bill_no_prefix.is_some() || f.errcode.is_some()
}

/// The push filter from the job filter's shared fields.
pub(crate) fn push_filter(jf: &JobFilter, kind: Option<&str>) -> PushFilter {
    PushFilter {
        appid: jf.appid.clone(),
        kind: kind.map(str::to_string),
        openid: jf.openid.clone(),
        key: None,
        since: jf.since,
        until: jf.until,
        unpublished: false,
        before_id: None,
    }
}

/// A push as the verbs print it (JSON).
#[derive(Debug, Serialize)]
pub struct PushView {
    pub id: i64,
    pub kind: String,
    pub event: String,
    pub appid: String,
    /// OutTradeNo, or RefundId for refunds.
    pub dedup_key: String,
    pub event_id: String,
    pub openid: Option<String>,
    pub out_trade_no: Option<String>,
    pub env: i64,
    pub received_at: String,
    pub last_received_at: String,
    /// Later receipts of the same push (answered success, no new event).
    pub repeats: i64,
    /// When the broker confirmed the event (null: not yet; the worker publishes it).
    pub published_at: Option<String>,
    /// The events-queue message.
    pub message: Json,
}

impl From<PushRow> for PushView {
    fn from(r: PushRow) -> Self {
        PushView {
            id: r.id,
            kind: r.kind,
            event: r.event,
            appid: r.appid,
            dedup_key: r.dedup_key,
            event_id: r.event_id,
            openid: r.openid,
            out_trade_no: r.out_trade_no,
            env: r.env,
            received_at: rfc3339_ms(r.received_at),
            last_received_at: rfc3339_ms(r.last_received_at),
            repeats: r.repeats,
            published_at: r.published_at.map(rfc3339_ms),
            message: stored_json(&r.message),
        }
    }
}

fn rows(items: &[PushRow]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|r| {
            vec![
                rfc3339_s(r.received_at),
                r.kind.clone(),
                clean(&r.dedup_key),
                clean(r.openid.as_deref().unwrap_or("-")),
                clean(&r.appid),
                r.repeats.to_string(),
                match r.published_at {
                    Some(_) => "confirmed".to_string(),
                    None => "NOT YET".to_string(),
                },
            ]
        })
        .collect()
}

/// The pushes table of `list`.
pub(super) fn list_table(items: &[PushRow], out: &mut dyn Write) -> io::Result<()> {
    if items.is_empty() {
        return writeln!(out, "no pushes match");
    }
    table(
        out,
        "",
        &[
            "received",
            "kind",
            "out_trade_no / refund_id",
            "openid",
            "appid",
            "repeats",
            "event",
        ],
        &rows(items),
    )
}

/// `list --kind pushes|KIND`.
pub(super) fn list(
    store: &Store,
    f: &PushFilter,
    limit: Option<u32>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let items = store.pushes(f, limit, true)?;
    if json {
        let views: Vec<PushView> = items.into_iter().map(PushView::from).collect();
        serde_json::to_writer_pretty(&mut *out, &views).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    list_table(&items, out)?;
    Ok(())
}

/// `export --kind pushes|KIND`: oldest first, JSON lines or CSV.
pub(super) fn export(
    store: &Store,
    f: &PushFilter,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let items = store.pushes(f, None, false)?;
    if format == ExportFormat::Csv {
        writeln!(
            out,
            "id,kind,event,appid,dedup_key,event_id,openid,out_trade_no,env,received_at,repeats,published_at,message"
        )?;
    }
    for r in items {
        match format {
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut *out, &PushView::from(r)).map_err(io::Error::from)?;
                writeln!(out)?;
            }
            ExportFormat::Csv => {
                let fields = [
                    r.id.to_string(),
                    r.kind,
                    r.event,
                    r.appid,
                    r.dedup_key,
                    r.event_id,
                    r.openid.unwrap_or_default(),
                    r.out_trade_no.unwrap_or_default(),
                    r.env.to_string(),
                    rfc3339_ms(r.received_at),
                    r.repeats.to_string(),
                    r.published_at.map(rfc3339_ms).unwrap_or_default(),
                ];
                let mut line: Vec<String> =
                    fields.iter().map(|s| csv_field(s).into_owned()).collect();
                line.push(csv_text(&r.message).into_owned());
                writeln!(out, "{}", line.join(","))?;
            }
        }
    }
    Ok(())
}

/// `show KEY` for pushes: the report of each push stored under the key.
pub(super) fn show_text(items: &[PushRow], out: &mut dyn Write) -> io::Result<()> {
    for r in items {
        writeln!(
            out,
            "\npush {} ({}, {}) of app {}",
            clean(&r.dedup_key),
            r.kind,
            clean(&r.event),
            clean(&r.appid)
        )?;
        let lines = [
            ("event_id", r.event_id.clone()),
            ("openid", dash(r.openid.as_deref().map(clean))),
            ("out_trade_no", dash(r.out_trade_no.as_deref().map(clean))),
            (
                "env",
                if r.env == 1 {
                    "1 (sandbox)".into()
                } else {
                    "0 (production)".into()
                },
            ),
            ("received", rfc3339_ms(r.received_at)),
            (
                "repeats",
                format!("{} (last {})", r.repeats, rfc3339_ms(r.last_received_at)),
            ),
            (
                "event",
                match r.published_at {
                    Some(at) => format!("confirmed by the broker at {}", rfc3339_ms(at)),
                    None => "NOT CONFIRMED yet: the worker publishes it until the broker confirms"
                        .into(),
                },
            ),
        ];
        for (k, v) in lines {
            writeln!(out, "  {k:<13} {v}")?;
        }
        writeln!(out, "  message       {}", clean(&r.message))?;
    }
    Ok(())
}

/// Push counts for `stats`.
#[derive(Debug, Serialize)]
pub struct PushCount {
    pub kind: String,
    pub events_confirmed: i64,
    pub events_unconfirmed: i64,
}

pub(crate) fn counts(c: PushCounts) -> Vec<PushCount> {
    let mut out: Vec<PushCount> = Vec::new();
    for (kind, published, n) in c {
        let i = match out.iter().position(|p| p.kind == kind) {
            Some(i) => i,
            None => {
                out.push(PushCount {
                    kind,
                    events_confirmed: 0,
                    events_unconfirmed: 0,
                });
                out.len() - 1
            }
        };
        if let Some(p) = out.get_mut(i) {
            if published {
                p.events_confirmed += n;
            } else {
                p.events_unconfirmed += n;
            }
        }
    }
    out
}

pub(super) fn counts_text(c: &[PushCount], out: &mut dyn Write) -> io::Result<()> {
    if c.is_empty() {
        return Ok(());
    }
    let total: i64 = c
        .iter()
        .map(|p| p.events_confirmed + p.events_unconfirmed)
        .sum();
    writeln!(out, "\npushes: {total}")?;
    let rows: Vec<Vec<String>> = c
        .iter()
        .map(|p| {
            vec![
                p.kind.clone(),
                (p.events_confirmed + p.events_unconfirmed).to_string(),
                p.events_unconfirmed.to_string(),
            ]
        })
        .collect();
    table(out, "", &["kind", "pushes", "event not confirmed"], &rows)
}
