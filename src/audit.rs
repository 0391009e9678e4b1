//! `midas-worker outbox ...`: the operator's window into the outbox.
//!
//! It exists so that a person answering "I paid and got nothing" can, in a minute,
//! see what happened to a bill_no (every call to Midas, every reply and whether the
//! broker confirmed it), and act on it: re-send a stored reply (`republish`),
//! re-open a job that ended `unknown` or with a fixable `failed` (`retry`), or drop
//! old final jobs (`prune`). Every action is recorded in `operator_actions`.
//!
//! Reads use their own read-only connection (WAL: safe while the worker writes).
//! Writes are short `IMMEDIATE` transactions that re-check the state they change, so
//! they cannot race the worker's writer. Nothing here selects `session_key`, and
//! free text is scrubbed of anything that looks like a token before it is printed.
//!
//! Orders are keyed by (appid, op, bill_no): a verb given a bill_no that several apps
//! use stops and asks for `--appid`. `retry` and `republish` also act on a set chosen
//! by filters ([`bulk`]), only after showing what they would do.

mod bulk;

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, TransactionBehavior};
use serde_json::{json, Map, Value as Json};

use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::midas::errcode::{MP_SIG_WRONG, NO_PERMISSION, SESSION_EXPIRED, SIG_WRONG};
use crate::outbox::{open_existing_rw, open_ro, OutboxError};

/// A bill_no deduplicates at Midas for 48 h; `retry` keeps an hour of margin.
const RETRY_WINDOW: Duration = Duration::from_secs(47 * 3600);
/// `prune` never deletes jobs younger than the bill_no window.
const MIN_PRUNE_AGE: Duration = Duration::from_secs(48 * 3600);
/// Jobs deleted per `prune` transaction (keeps the worker's writer from waiting long).
const PRUNE_BATCH: i64 = 2000;

const STATES: [&str; 4] = ["pending", "succeeded", "failed", "unknown"];
const OPS: [&str; 3] = ["pay", "present", "cancel_pay"];

/// Audit and operator actions on the outbox (`outbox.path` in the config).
#[derive(Subcommand, Debug, Clone)]
pub enum OutboxCmd {
    /// Recent jobs, newest first, as a table (`--json`: one JSON array).
    List(ListArgs),
    /// Everything about one bill_no: its jobs (pay and cancel_pay), every call to
    /// Midas, every reply target and whether the broker confirmed it, operator actions.
    Show {
        /// The bill_no to look up.
        bill_no: String,
        /// Only this app's jobs (required when several apps use the bill_no).
        #[arg(long)]
        appid: Option<String>,
        /// Print one JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Counts by status and op, the oldest pending job, attempts per job, unconfirmed replies.
    Stats {
        /// Print one JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Every matching job (no limit), streamed: JSON lines (default) or CSV.
    ///
    /// Columns: id, op, bill_no, appid, openid, state, attempts, last_errcode,
    /// last_error, received_at, finished_at (RFC 3339 UTC), request, result.
    Export {
        #[command(flatten)]
        filters: Filters,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Re-send stored final replies: marks the reply targets of final jobs unpublished;
    /// the running worker publishes them again within seconds.
    ///
    /// Give a BILL_NO (with `--op`/`--appid` to choose among its jobs), or filters as
    /// for `list` (`--status failed --since 2h`, ...): a set is first shown (how many
    /// jobs, what happens to each) and acted on only with `--yes`.
    Republish {
        /// The bill_no whose final replies to re-send.
        bill_no: Option<String>,
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        confirm: Confirm,
        #[command(flatten)]
        who: Operator,
    },
    /// Re-open a job that ended `unknown` (inside the 48 h bill_no window) or `failed`
    /// with a configuration error (90009, 90011, 90017): the worker calls Midas again
    /// with the same bill_no, and the new final reply goes to the job's reply targets.
    ///
    /// Give a BILL_NO (with `--op`/`--appid` to choose among its jobs), or filters as
    /// for `list` (`--status unknown --since 2h`, ...): a set is first shown (how many
    /// jobs, which are re-opened, which skipped and why) and acted on only with `--yes`.
    Retry {
        /// The bill_no to retry.
        bill_no: Option<String>,
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        confirm: Confirm,
        #[command(flatten)]
        who: Operator,
    },
    /// Delete final jobs (with their attempts and reply targets) that finished before
    /// the cutoff. Pending jobs are never deleted.
    Prune {
        /// Age cutoff, e.g. `90d` (default: `outbox.retention`; at least 48h).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        who: Operator,
    },
}

/// Filters shared by `list` and `export`.
#[derive(Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only jobs in this state: pending, succeeded, failed or unknown.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this op: pay, present or cancel_pay.
    #[arg(long)]
    pub op: Option<String>,
    /// Only this player.
    #[arg(long)]
    pub openid: Option<String>,
    /// Only this app.
    #[arg(long)]
    pub appid: Option<String>,
    /// Received at or after: a duration ago (`2h`, `3d`) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Received before: a duration ago (`30m`) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Only bill_nos starting with this prefix.
    #[arg(long, value_name = "PREFIX")]
    pub bill_no_prefix: Option<String>,
    /// Only jobs whose last Midas errcode is this (e.g. -1, 90013).
    #[arg(long, allow_negative_numbers = true)]
    pub errcode: Option<i64>,
}

/// How a set operation (`retry`/`republish` with filters) is confirmed.
#[derive(Args, Debug, Clone, Default)]
pub struct Confirm {
    /// Print how many jobs match and what would happen to each; change nothing.
    #[arg(long, conflicts_with = "yes")]
    pub dry_run: bool,
    /// Act on the jobs the filters select (without it, a set is only shown, exit 2).
    #[arg(long)]
    pub yes: bool,
    /// Print the plan or the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `outbox list`.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// At most this many jobs (0: no limit).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print ONE JSON array of job objects (not JSON lines; see `export` for those).
    #[arg(long)]
    pub json: bool,
}

/// Who does an operator action, and why (recorded in `operator_actions`).
#[derive(Args, Debug, Clone, Default)]
pub struct Operator {
    /// Who is acting (default: $USER).
    #[arg(long)]
    pub actor: Option<String>,
    /// Why (recorded with the action).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("outbox database {path} does not exist (is outbox.path right?)")]
    MissingDatabase { path: String },
    #[error("no job with bill_no {bill_no}{}{}", op_suffix(.op), appid_suffix(.appid))]
    UnknownBillNo {
        bill_no: String,
        op: Option<String>,
        appid: Option<String>,
    },
    #[error("bad {flag} {value:?}: expected {expected}")]
    BadFilter {
        flag: &'static str,
        value: String,
        expected: String,
    },
    /// Bad usage of a verb (missing or conflicting arguments).
    #[error("{0}")]
    Usage(String),
    /// The action was refused; the message says why and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error("outbox database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("{0}")]
    Outbox(OutboxError),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

fn appid_suffix(appid: &Option<String>) -> String {
    appid
        .as_ref()
        .map(|a| format!(" for appid {a}"))
        .unwrap_or_default()
}

fn op_suffix(op: &Option<String>) -> String {
    op.as_ref()
        .map(|o| format!(" and op {o}"))
        .unwrap_or_default()
}

impl AuditError {
    /// 2: unknown bill_no, bad filter or usage, missing database. 1: anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            AuditError::MissingDatabase { .. }
            | AuditError::UnknownBillNo { .. }
            | AuditError::BadFilter { .. }
            | AuditError::Usage(_) => 2,
            AuditError::Refused(_)
            | AuditError::Database(_)
            | AuditError::Outbox(_)
            | AuditError::Output(_) => 1,
        }
    }
}

impl From<OutboxError> for AuditError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Missing { path } => AuditError::MissingDatabase { path },
            OutboxError::Sqlite(e) => AuditError::Database(e),
            other => AuditError::Outbox(other),
        }
    }
}

/// Run one `outbox` verb against `settings.config.outbox.path`, writing to `out`.
pub fn run(cmd: &OutboxCmd, settings: &Settings, out: &mut dyn Write) -> Result<(), AuditError> {
    let r = match cmd {
        OutboxCmd::List(a) => list(a, settings, out),
        OutboxCmd::Show {
            bill_no,
            appid,
            json,
        } => show(bill_no, appid.as_deref(), *json, settings, out),
        OutboxCmd::Stats { json } => stats(*json, settings, out),
        OutboxCmd::Export { filters, format } => export(filters, *format, settings, out),
        OutboxCmd::Republish {
            bill_no,
            filters,
            confirm,
            who,
        } => match single(bill_no.as_deref(), filters, confirm)? {
            Some(b) => republish(b, filters, who, settings, out),
            None => bulk::run(
                bulk::BulkAction::Republish,
                bill_no.as_deref(),
                filters,
                confirm,
                who,
                settings,
                out,
            ),
        },
        OutboxCmd::Retry {
            bill_no,
            filters,
            confirm,
            who,
        } => match single(bill_no.as_deref(), filters, confirm)? {
            Some(b) => retry(b, filters, who, settings, out),
            None => bulk::run(
                bulk::BulkAction::Retry,
                bill_no.as_deref(),
                filters,
                confirm,
                who,
                settings,
                out,
            ),
        },
        OutboxCmd::Prune {
            older_than,
            dry_run,
            who,
        } => prune(older_than.as_deref(), *dry_run, who, settings, out),
    };
    match r {
        // `outbox export | head`: the reader left; that is not a failure.
        Err(AuditError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// The bill_no of the single-job form of `retry`/`republish` (a BILL_NO, at most
/// `--op` and `--appid`, acting at once); `None` for the set form.
fn single<'a>(
    bill_no: Option<&'a str>,
    f: &Filters,
    confirm: &Confirm,
) -> Result<Option<&'a str>, AuditError> {
    let Some(b) = bill_no else { return Ok(None) };
    let Filters {
        status,
        op: _,
        openid,
        appid: _,
        since,
        until,
        bill_no_prefix,
        errcode,
    } = f;
    if status.is_some()
        || openid.is_some()
        || since.is_some()
        || until.is_some()
        || bill_no_prefix.is_some()
        || errcode.is_some()
    {
        return Err(AuditError::Usage(
            "with a BILL_NO only --op and --appid apply; filters (--status, --since, ...) select a set without a BILL_NO".into(),
        ));
    }
    if confirm.dry_run || confirm.json {
        return Ok(None);
    }
    Ok(Some(b))
}

// ---------------------------------------------------------------------------------
// Filters

fn check_state(flag: &'static str, v: &str) -> Result<(), AuditError> {
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

fn check_op(v: &str) -> Result<(), AuditError> {
    if OPS.contains(&v) {
        Ok(())
    } else {
        Err(AuditError::BadFilter {
            flag: "--op",
            value: v.to_string(),
            expected: "one of pay, present, cancel_pay".into(),
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

/// The `WHERE` clause (on `jobs j`) and its arguments; `bill_no`: exactly this one.
fn filter_sql(
    f: &Filters,
    now: i64,
    bill_no: Option<&str>,
) -> Result<(String, Vec<Value>), AuditError> {
    let mut clauses: Vec<&str> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(b) = bill_no {
        clauses.push("j.bill_no = ?");
        args.push(Value::Text(b.to_string()));
    }
    if let Some(p) = &f.bill_no_prefix {
        clauses.push("substr(j.bill_no, 1, ?) = ?");
        args.push(Value::Integer(
            i64::try_from(p.chars().count()).unwrap_or(i64::MAX),
        ));
        args.push(Value::Text(p.clone()));
    }
    if let Some(code) = f.errcode {
        clauses.push("j.last_errcode = ?");
        args.push(Value::Integer(code));
    }
    if let Some(s) = &f.status {
        check_state("--status", s)?;
        clauses.push("j.state = ?");
        args.push(Value::Text(s.clone()));
    }
    if let Some(op) = &f.op {
        check_op(op)?;
        clauses.push("j.op = ?");
        args.push(Value::Text(op.clone()));
    }
    if let Some(o) = &f.openid {
        clauses.push("j.openid = ?");
        args.push(Value::Text(o.clone()));
    }
    if let Some(a) = &f.appid {
        clauses.push("j.appid = ?");
        args.push(Value::Text(a.clone()));
    }
    if let Some(s) = &f.since {
        clauses.push("j.received_at >= ?");
        args.push(Value::Integer(parse_when("--since", s, now)?));
    }
    if let Some(u) = &f.until {
        clauses.push("j.received_at < ?");
        args.push(Value::Integer(parse_when("--until", u, now)?));
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    Ok((sql, args))
}

// ---------------------------------------------------------------------------------
// Output helpers

/// One line, no control characters (values come from clients and Midas).
fn one_line(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(s.chars().flat_map(char::escape_debug).collect())
    } else {
        Cow::Borrowed(s)
    }
}

/// Mask anything that looks like a secret in free text (defence in depth: the
/// worker already keeps tokens out of error messages).
fn redact(s: &str) -> Cow<'_, str> {
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

fn clean(s: &str) -> String {
    one_line(&redact(s)).into_owned()
}

fn scrub(v: &mut Json) {
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
fn stored_json(s: &str) -> Json {
    match serde_json::from_str::<Json>(s) {
        Ok(mut v) => {
            scrub(&mut v);
            v
        }
        Err(_) => Json::String(redact(s).into_owned()),
    }
}

/// A stored JSON column as text: verbatim unless it needs scrubbing.
fn stored_json_text(s: &str) -> String {
    if s.contains("session_key") || s.contains("access_token") {
        stored_json(s).to_string()
    } else {
        s.to_string()
    }
}

fn rfc3339_s(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn opt_time(ms: Option<i64>) -> Json {
    ms.map_or(Json::Null, |m| Json::String(rfc3339_ms(m)))
}

fn age(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `90d`, `48h`, `90m`: whole days or hours as such (humantime would say "2months 29days ...").
fn fmt_dur(d: Duration) -> String {
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

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |x| x.to_string())
}

/// An aligned table: two spaces between columns, no trailing blanks.
fn table(
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
fn csv_text(s: &str) -> Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(csv_field(&format!("'{s}")).into_owned())
    } else {
        csv_field(s)
    }
}

/// Quote a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

fn refused(msg: impl Into<String>) -> AuditError {
    AuditError::Refused(msg.into())
}

// ---------------------------------------------------------------------------------
// Rows

const JOB_COLS: &str = "j.id, j.op, j.bill_no, j.appid, j.openid, j.request, j.state, j.attempts, \
     j.next_attempt_at, j.first_attempt_at, j.last_errcode, j.last_error, j.result, \
     j.received_at, j.updated_at, j.finished_at";

/// A job as the CLI sees it: every column but `session_key`.
struct JobRow {
    id: i64,
    op: String,
    bill_no: String,
    appid: String,
    openid: String,
    request: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    first_attempt_at: Option<i64>,
    last_errcode: Option<i64>,
    last_error: Option<String>,
    result: Option<String>,
    received_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

impl JobRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: r.get(0)?,
            op: r.get(1)?,
            bill_no: r.get(2)?,
            appid: r.get(3)?,
            openid: r.get(4)?,
            request: r.get(5)?,
            state: r.get(6)?,
            attempts: r.get(7)?,
            next_attempt_at: r.get(8)?,
            first_attempt_at: r.get(9)?,
            last_errcode: r.get(10)?,
            last_error: r.get(11)?,
            result: r.get(12)?,
            received_at: r.get(13)?,
            updated_at: r.get(14)?,
            finished_at: r.get(15)?,
        })
    }

    fn is_final(&self) -> bool {
        self.state != "pending"
    }
}

/// The jobs of `bill_no` (of one app when `appid` is given), in arrival order.
fn jobs_by_bill_no(
    c: &Connection,
    bill_no: &str,
    appid: Option<&str>,
) -> Result<Vec<JobRow>, AuditError> {
    let mut stmt = c.prepare(&format!(
        "SELECT {JOB_COLS} FROM jobs j WHERE j.bill_no = ?1 AND (?2 IS NULL OR j.appid = ?2) ORDER BY j.id"
    ))?;
    let rows = stmt.query_map(params![bill_no, appid], JobRow::from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn unknown_bill_no(bill_no: &str, op: Option<&str>, appid: Option<&str>) -> AuditError {
    AuditError::UnknownBillNo {
        bill_no: one_line(bill_no).into_owned(),
        op: op.map(str::to_string),
        appid: appid.map(|a| one_line(a).into_owned()),
    }
}

/// Two apps may use the same bill_no for different orders: without `--appid`, a
/// bill_no (and op) whose jobs belong to several apps is ambiguous.
fn one_app(jobs: &[&JobRow], bill_no: &str) -> Result<(), AuditError> {
    let mut apps: Vec<&str> = jobs.iter().map(|j| j.appid.as_str()).collect();
    apps.sort_unstable();
    apps.dedup();
    if apps.len() > 1 {
        return Err(AuditError::Usage(format!(
            "bill_no {} is used by {} apps ({}): choose one with --appid",
            one_line(bill_no),
            apps.len(),
            clean(&apps.join(", "))
        )));
    }
    Ok(())
}

/// The jobs of `bill_no` an action applies to: those of `op` when given; an error
/// when there are none or they belong to several apps.
fn select<'a>(
    jobs: &'a [JobRow],
    bill_no: &str,
    op: Option<&str>,
    appid: Option<&str>,
) -> Result<Vec<&'a JobRow>, AuditError> {
    if let Some(op) = op {
        check_op(op)?;
    }
    let matching: Vec<&JobRow> = jobs
        .iter()
        .filter(|j| op.is_none_or(|o| j.op == o))
        .collect();
    if matching.is_empty() {
        return Err(unknown_bill_no(bill_no, op, appid));
    }
    one_app(&matching, bill_no)?;
    Ok(matching)
}

/// The one job of `bill_no` an action applies to (`--op` when there are several).
fn pick<'a>(
    jobs: &'a [JobRow],
    bill_no: &str,
    op: Option<&str>,
    appid: Option<&str>,
) -> Result<&'a JobRow, AuditError> {
    match select(jobs, bill_no, op, appid)?.as_slice() {
        [one] => Ok(one),
        many => Err(AuditError::Usage(format!(
            "bill_no {} has {} jobs ({}): choose one with --op",
            one_line(bill_no),
            many.len(),
            many.iter()
                .map(|j| j.op.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

struct TargetRow {
    reply_to: String,
    correlation_id: String,
    added_at: i64,
    published_at: Option<i64>,
    returned: bool,
}

fn targets_of(c: &Connection, job_id: i64) -> Result<Vec<TargetRow>, AuditError> {
    let mut stmt = c.prepare_cached(
        "SELECT reply_to, correlation_id, added_at, published_at, returned FROM reply_targets \
         WHERE job_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        Ok(TargetRow {
            reply_to: r.get(0)?,
            correlation_id: r.get(1)?,
            added_at: r.get(2)?,
            published_at: r.get(3)?,
            returned: r.get::<_, i64>(4)? != 0,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

struct AttemptRow {
    n: i64,
    api: String,
    started_at: i64,
    latency_ms: i64,
    http_status: Option<i64>,
    errcode: Option<i64>,
    errmsg: Option<String>,
    outcome: String,
}

fn attempts_of(c: &Connection, job_id: i64) -> Result<Vec<AttemptRow>, AuditError> {
    let mut stmt = c.prepare_cached(
        "SELECT n, api, started_at, latency_ms, http_status, errcode, errmsg, outcome \
         FROM attempts WHERE job_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        Ok(AttemptRow {
            n: r.get(0)?,
            api: r.get(1)?,
            started_at: r.get(2)?,
            latency_ms: r.get(3)?,
            http_status: r.get(4)?,
            errcode: r.get(5)?,
            errmsg: r.get(6)?,
            outcome: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

struct ActionRow {
    at: i64,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

/// Operator actions on `target` (a bill_no); with `appid`, those on that app's jobs
/// (actions recorded before jobs were keyed per app name no appid: kept).
fn actions_on(
    c: &Connection,
    target: &str,
    appid: Option<&str>,
) -> Result<Vec<ActionRow>, AuditError> {
    let mut stmt = c.prepare(
        "SELECT at, actor, action, target, detail FROM operator_actions WHERE target = ?1 \
         AND (?2 IS NULL OR json_extract(detail, '$.appid') IS NULL OR json_extract(detail, '$.appid') = ?2) \
         ORDER BY id",
    )?;
    let rows = stmt.query_map(params![target, appid], |r| {
        Ok(ActionRow {
            at: r.get(0)?,
            actor: r.get(1)?,
            action: r.get(2)?,
            target: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn actor_name(who: &Operator) -> String {
    let name = who
        .actor
        .clone()
        .filter(|a| !a.trim().is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| "unknown".to_string());
    one_line(name.trim()).into_owned()
}

fn record_action(
    c: &Connection,
    at: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &Json,
) -> Result<(), AuditError> {
    c.execute(
        "INSERT INTO operator_actions (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at, actor, action, target, detail.to_string()],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// list

fn list(a: &ListArgs, settings: &Settings, out: &mut dyn Write) -> Result<(), AuditError> {
    let now = now_ms();
    let (filter, mut args) = filter_sql(&a.filters, now, None)?;
    let conn = open_ro(&settings.config.outbox.path)?;
    let limit = if a.limit == 0 { -1 } else { i64::from(a.limit) };
    args.push(Value::Integer(limit));
    let mut stmt = conn.prepare(&format!(
        "SELECT j.id, j.received_at, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, \
         j.last_errcode, j.last_error, j.finished_at, \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id), \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.published_at IS NOT NULL), \
         (SELECT COUNT(*) FROM reply_targets t WHERE t.job_id = j.id AND t.returned = 1) \
         FROM jobs j{filter} ORDER BY j.id DESC LIMIT ?"
    ))?;
    struct Row {
        id: i64,
        received_at: i64,
        op: String,
        bill_no: String,
        appid: String,
        openid: String,
        state: String,
        attempts: i64,
        last_errcode: Option<i64>,
        last_error: Option<String>,
        finished_at: Option<i64>,
        total: i64,
        confirmed: i64,
        returned: i64,
    }
    let rows = stmt
        .query_map(params_from_iter(args.iter()), |r| {
            Ok(Row {
                id: r.get(0)?,
                received_at: r.get(1)?,
                op: r.get(2)?,
                bill_no: r.get(3)?,
                appid: r.get(4)?,
                openid: r.get(5)?,
                state: r.get(6)?,
                attempts: r.get(7)?,
                last_errcode: r.get(8)?,
                last_error: r.get(9)?,
                finished_at: r.get(10)?,
                total: r.get(11)?,
                confirmed: r.get(12)?,
                returned: r.get(13)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
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
                    "replies": r.total,
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
            let mut reply = if r.total == 0 {
                "-".to_string()
            } else {
                format!("confirmed {}/{}", r.confirmed, r.total)
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

// ---------------------------------------------------------------------------------
// show

fn target_status(t: &TargetRow, job_final: bool) -> String {
    match (t.published_at, t.returned) {
        (Some(at), true) => format!("returned: no such queue ({})", rfc3339_ms(at)),
        (Some(at), false) => rfc3339_ms(at),
        (None, _) if job_final => "NOT CONFIRMED".to_string(),
        (None, _) => "not yet (job pending)".to_string(),
    }
}

/// One sentence for the operator: what this job's state means and what to do.
fn hint(j: &JobRow, targets: &[TargetRow], settings: &Settings, now: i64) -> String {
    let unconfirmed = targets.iter().filter(|t| t.published_at.is_none()).count();
    let returned: Vec<&str> = targets
        .iter()
        .filter(|t| t.returned)
        .map(|t| t.reply_to.as_str())
        .collect();
    let bill = clean(&j.bill_no);
    let reply_note = if !j.is_final() {
        String::new()
    } else if !returned.is_empty() {
        format!(
            " The reply was published but no queue {} exists: the game server's reply queue is missing.",
            clean(&returned.join(", "))
        )
    } else if unconfirmed > 0 {
        format!(
            " {unconfirmed} reply not confirmed by the broker yet: the worker re-publishes it (`outbox republish {bill}` forces it)."
        )
    } else if targets.is_empty() {
        String::new()
    } else {
        " Its reply was confirmed by the broker.".to_string()
    };
    let window_end = j
        .first_attempt_at
        .map(|f| f + RETRY_WINDOW.as_millis() as i64);
    let base = match j.state.as_str() {
        "pending" => {
            let give_up = j
                .first_attempt_at
                .map(|f| {
                    format!(
                        "; it ends `unknown` at {} if Midas never answers definitively",
                        rfc3339_ms(f + settings.config.retry.give_up_after.0.as_millis() as i64)
                    )
                })
                .unwrap_or_default();
            format!(
                "Not finished: the worker calls Midas again at {}{give_up}. The reply goes out when it ends.",
                rfc3339_ms(j.next_attempt_at)
            )
        }
        "succeeded" => "Midas applied this bill_no.".to_string(),
        "unknown" => match window_end {
            Some(end) if now < end => format!(
                "Midas never answered definitively: check the bill with Midas, or `outbox retry {bill}` (same bill_no, safe until {}).",
                rfc3339_ms(end)
            ),
            _ => "Midas never answered definitively and the 48 h bill_no window has passed: reconcile by hand (re-sending could charge twice).".to_string(),
        },
        "failed" => match j.last_errcode {
            Some(SESSION_EXPIRED) => "Failed 90010 (session expired): nothing was applied; re-send the command with a fresh session_key and the same bill_no to re-open it.".to_string(),
            Some(MP_SIG_WRONG) | Some(SIG_WRONG) | Some(NO_PERMISSION) => format!(
                "Failed with a configuration error (signature/permission): nothing was applied; fix the configuration, then `outbox retry {bill}`."
            ),
            Some(90013) => "Failed 90013 (insufficient balance): definitive, nothing was applied.".to_string(),
            _ => "Failed with a definitive Midas error: this bill_no was not applied.".to_string(),
        },
        other => format!("Unexpected state {other:?}."),
    };
    format!("{base}{reply_note}")
}

fn show(
    bill_no: &str,
    appid: Option<&str>,
    as_json: bool,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let conn = open_ro(&settings.config.outbox.path)?;
    let tx = conn.unchecked_transaction()?; // one consistent snapshot
    let jobs = jobs_by_bill_no(&tx, bill_no, appid)?;
    select(&jobs, bill_no, None, appid)?;
    let now = now_ms();
    let mut details = Vec::with_capacity(jobs.len());
    for j in &jobs {
        details.push((targets_of(&tx, j.id)?, attempts_of(&tx, j.id)?));
    }
    let actions = actions_on(&tx, bill_no, appid)?;
    drop(tx);

    if as_json {
        let jobs_json: Vec<Json> = jobs
            .iter()
            .zip(&details)
            .map(|(j, (targets, history))| {
                json!({
                    "id": j.id,
                    "op": j.op,
                    "bill_no": j.bill_no,
                    "state": j.state,
                    "appid": j.appid,
                    "openid": j.openid,
                    "request": stored_json(&j.request),
                    "attempts": j.attempts,
                    "first_attempt_at": opt_time(j.first_attempt_at),
                    "next_attempt_at": if j.is_final() { Json::Null } else { Json::String(rfc3339_ms(j.next_attempt_at)) },
                    "last_errcode": j.last_errcode,
                    "last_error": j.last_error.as_deref().map(|e| redact(e).into_owned()),
                    "result": j.result.as_deref().map_or(Json::Null, stored_json),
                    "received_at": rfc3339_ms(j.received_at),
                    "updated_at": rfc3339_ms(j.updated_at),
                    "finished_at": opt_time(j.finished_at),
                    "hint": hint(j, targets, settings, now),
                    "reply_targets": targets.iter().map(|t| json!({
                        "reply_to": t.reply_to,
                        "correlation_id": t.correlation_id,
                        "added_at": rfc3339_ms(t.added_at),
                        "published_at": opt_time(t.published_at),
                        "confirmed": t.published_at.is_some(),
                        "returned": t.returned,
                    })).collect::<Vec<_>>(),
                    "history": history.iter().map(|a| json!({
                        "n": a.n,
                        "at": rfc3339_ms(a.started_at),
                        "latency_ms": a.latency_ms,
                        "api": a.api,
                        "http_status": a.http_status,
                        "errcode": a.errcode,
                        "errmsg": a.errmsg.as_deref().map(|e| redact(e).into_owned()),
                        "outcome": a.outcome,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({
            "bill_no": bill_no,
            "jobs": jobs_json,
            "operator_actions": actions.iter().map(action_json).collect::<Vec<_>>(),
        });
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }

    writeln!(
        out,
        "bill_no {}: {} job{}",
        clean(bill_no),
        jobs.len(),
        if jobs.len() == 1 { "" } else { "s" }
    )?;
    for (j, (targets, history)) in jobs.iter().zip(&details) {
        writeln!(out)?;
        writeln!(out, "{} (job {}): {}", j.op, j.id, j.state.to_uppercase())?;
        let mut kv: Vec<(&str, String)> = vec![
            ("appid", clean(&j.appid)),
            ("openid", clean(&j.openid)),
            ("request", clean(&stored_json_text(&j.request))),
            ("attempts", j.attempts.to_string()),
            (
                "first attempt",
                j.first_attempt_at.map_or("-".into(), rfc3339_ms),
            ),
        ];
        if !j.is_final() {
            let when = j.next_attempt_at - now;
            let rel = if when >= 0 {
                format!("in {}", age(when))
            } else {
                format!("due {} ago", age(-when))
            };
            kv.push((
                "next attempt",
                format!("{} ({rel})", rfc3339_ms(j.next_attempt_at)),
            ));
        }
        kv.push(("last errcode", dash(j.last_errcode)));
        kv.push((
            "last error",
            j.last_error.as_deref().map_or("-".into(), clean),
        ));
        kv.push((
            "result",
            j.result
                .as_deref()
                .map_or("- (not final)".into(), |r| clean(&stored_json_text(r))),
        ));
        kv.push(("received", rfc3339_ms(j.received_at)));
        kv.push(("finished", j.finished_at.map_or("-".into(), rfc3339_ms)));
        for (k, v) in &kv {
            writeln!(out, "  {k:<14} {v}")?;
        }
        writeln!(
            out,
            "  {:<14} {}",
            "what it means",
            hint(j, targets, settings, now)
        )?;

        writeln!(out, "  reply targets:")?;
        if targets.is_empty() {
            writeln!(out, "    (none)")?;
        } else {
            let rows: Vec<Vec<String>> = targets
                .iter()
                .map(|t| {
                    vec![
                        clean(&t.reply_to),
                        clean(&t.correlation_id),
                        rfc3339_ms(t.added_at),
                        target_status(t, j.is_final()),
                    ]
                })
                .collect();
            table(
                out,
                "    ",
                &["reply_to", "correlation_id", "added", "confirmed at"],
                &rows,
            )?;
        }

        writeln!(out, "  calls to Midas:")?;
        if history.is_empty() {
            writeln!(out, "    (none yet)")?;
        } else {
            let rows: Vec<Vec<String>> = history
                .iter()
                .map(|a| {
                    vec![
                        a.n.to_string(),
                        rfc3339_ms(a.started_at),
                        a.latency_ms.to_string(),
                        clean(&a.api),
                        dash(a.http_status),
                        dash(a.errcode),
                        a.errmsg.as_deref().map_or("-".into(), clean),
                        clean(&a.outcome),
                    ]
                })
                .collect();
            table(
                out,
                "    ",
                &[
                    "#",
                    "time",
                    "latency_ms",
                    "api",
                    "http",
                    "errcode",
                    "errmsg",
                    "outcome",
                ],
                &rows,
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "operator actions:")?;
    if actions.is_empty() {
        writeln!(out, "  (none)")?;
    } else {
        let rows: Vec<Vec<String>> = actions
            .iter()
            .map(|a| {
                vec![
                    rfc3339_ms(a.at),
                    clean(&a.actor),
                    clean(&a.action),
                    clean(&a.detail),
                ]
            })
            .collect();
        table(out, "  ", &["at", "actor", "action", "detail"], &rows)?;
    }
    Ok(())
}

fn action_json(a: &ActionRow) -> Json {
    json!({
        "at": rfc3339_ms(a.at),
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "detail": stored_json(&a.detail),
    })
}

// ---------------------------------------------------------------------------------
// stats

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

fn stats(as_json: bool, settings: &Settings, out: &mut dyn Write) -> Result<(), AuditError> {
    let conn = open_ro(&settings.config.outbox.path)?;
    let tx = conn.unchecked_transaction()?;
    let now = now_ms();
    let counts = |sql: &str| -> Result<Vec<(String, i64)>, rusqlite::Error> {
        let mut stmt = tx.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.collect()
    };
    let by_state = counts("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    let by_op = counts("SELECT op, COUNT(*) FROM jobs GROUP BY op")?;
    let get = |v: &[(String, i64)], k: &str| v.iter().find(|(n, _)| n == k).map_or(0, |(_, c)| *c);
    let total: i64 = by_state.iter().map(|(_, c)| c).sum();
    let oldest: Option<(String, String, i64)> = {
        let mut stmt = tx.prepare(
            "SELECT bill_no, op, received_at FROM jobs WHERE state = 'pending' \
             ORDER BY received_at, id LIMIT 1",
        )?;
        let mut rows = stmt.query([])?;
        match rows.next()? {
            Some(r) => Some((r.get(0)?, r.get(1)?, r.get(2)?)),
            None => None,
        }
    };
    let hist: Vec<(i64, i64)> = {
        let mut stmt = tx.prepare(
            "SELECT attempts, COUNT(*) FROM jobs WHERE state != 'pending' GROUP BY attempts ORDER BY attempts",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let finals: i64 = hist.iter().map(|(_, c)| c).sum();
    let (p50, p99) = (
        percentile(&hist, finals, 0.50),
        percentile(&hist, finals, 0.99),
    );
    let unconfirmed: i64 = tx.query_row(
        "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
         WHERE t.published_at IS NULL AND j.state != 'pending'",
        [],
        |r| r.get(0),
    )?;
    let awaiting: i64 = tx.query_row(
        "SELECT COUNT(*) FROM reply_targets t JOIN jobs j ON j.id = t.job_id \
         WHERE t.published_at IS NULL AND j.state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let returned: i64 = tx.query_row(
        "SELECT COUNT(*) FROM reply_targets WHERE returned = 1",
        [],
        |r| r.get(0),
    )?;
    drop(tx);
    let unknown = get(&by_state, "unknown");

    if as_json {
        let states: Map<String, Json> = STATES
            .iter()
            .map(|s| (s.to_string(), json!(get(&by_state, s))))
            .collect();
        let ops: Map<String, Json> = OPS
            .iter()
            .map(|s| (s.to_string(), json!(get(&by_op, s))))
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
        .map(|s| vec![s.to_string(), get(&by_state, s).to_string()])
        .collect();
    table(out, "  ", &["status", "jobs"], &rows)?;
    let rows: Vec<Vec<String>> = OPS
        .iter()
        .map(|s| vec![s.to_string(), get(&by_op, s).to_string()])
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

// ---------------------------------------------------------------------------------
// export

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

fn export(
    f: &Filters,
    format: ExportFormat,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let (filter, args) = filter_sql(f, now_ms(), None)?;
    let conn = open_ro(&settings.config.outbox.path)?;
    let mut stmt = conn.prepare(&format!(
        "SELECT j.id, j.op, j.bill_no, j.appid, j.openid, j.state, j.attempts, j.last_errcode, \
         j.last_error, j.received_at, j.finished_at, j.request, j.result FROM jobs j{filter} ORDER BY j.id"
    ))?;
    let mut rows = stmt.query(params_from_iter(args.iter()))?;
    let mut w = BufWriter::with_capacity(64 * 1024, out);
    if format == ExportFormat::Csv {
        writeln!(w, "{}", EXPORT_COLS.join(","))?;
    }
    // Row by row from the cursor: memory does not grow with the outbox.
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let op: String = r.get(1)?;
        let bill_no: String = r.get(2)?;
        let appid: String = r.get(3)?;
        let openid: String = r.get(4)?;
        let state: String = r.get(5)?;
        let attempts: i64 = r.get(6)?;
        let last_errcode: Option<i64> = r.get(7)?;
        let last_error: Option<String> = r.get(8)?;
        let received_at: i64 = r.get(9)?;
        let finished_at: Option<i64> = r.get(10)?;
        let request: String = r.get(11)?;
        let result: Option<String> = r.get(12)?;
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
    }
    w.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// republish

fn republish(
    bill_no: &str,
    f: &Filters,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let (op, appid) = (f.op.as_deref(), f.appid.as_deref());
    if let Some(op) = op {
        check_op(op)?;
    }
    let mut conn = open_existing_rw(&settings.config.outbox.path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let all = jobs_by_bill_no(&tx, bill_no, appid)?;
    let matching = select(&all, bill_no, op, appid)?;
    let finals: Vec<&JobRow> = matching.iter().copied().filter(|j| j.is_final()).collect();
    if finals.is_empty() {
        return Err(refused(
            "job is not final; its reply will be published when it is",
        ));
    }
    let skipped_pending = matching.len() - finals.len();
    let actor = actor_name(who);
    let mut queued = 0usize;
    {
        let mut upd = tx.prepare(
            "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = ?1 \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND state != 'pending')",
        )?;
        for j in &finals {
            let n = upd.execute(params![j.id])?;
            queued += n;
            let detail = json!({
                "job_id": j.id,
                "op": j.op,
                "appid": j.appid,
                "targets": n,
                "reason": who.reason,
            });
            record_action(&tx, now, &actor, "republish", bill_no, &detail)?;
        }
    }
    tx.commit()?;
    writeln!(
        out,
        "queued {queued} reply target{} of {} final job{} for re-publishing; the running worker publishes them within a few seconds",
        if queued == 1 { "" } else { "s" },
        finals.len(),
        if finals.len() == 1 { "" } else { "s" },
    )?;
    if skipped_pending > 0 {
        writeln!(
            out,
            "skipped {skipped_pending} pending job{}: not final; its reply will be published when it is",
            if skipped_pending == 1 { "" } else { "s" }
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// retry

/// Why retrying this job cannot help (or would be unsafe), if so.
fn retry_refusal(j: &JobRow, now: i64) -> Option<String> {
    let bill = clean(&j.bill_no);
    match j.state.as_str() {
        "succeeded" => return Some(format!("{} {bill} already succeeded; retrying cannot change it", j.op)),
        "pending" => {
            return Some(format!(
                "{} {bill} is pending: the worker is still calling Midas (next attempt {})",
                j.op,
                rfc3339_ms(j.next_attempt_at)
            ))
        }
        "failed" => match j.last_errcode {
            Some(MP_SIG_WRONG) | Some(SIG_WRONG) | Some(NO_PERMISSION) => {}
            Some(SESSION_EXPIRED) => {
                return Some(format!(
                    "{} {bill} failed with 90010 (session expired): a new session_key is needed; re-send the command with a fresh session_key and the same bill_no, which re-opens the job",
                    j.op
                ))
            }
            code => {
                return Some(format!(
                    "{} {bill} failed with {} (definitive): retrying cannot change it",
                    j.op,
                    code.map_or("no errcode".to_string(), |c| format!("errcode {c}"))
                ))
            }
        },
        "unknown" => {}
        other => return Some(format!("{} {bill} has unexpected state {other:?}", j.op)),
    }
    let first = j.first_attempt_at.unwrap_or(j.received_at);
    if now - first >= RETRY_WINDOW.as_millis() as i64 {
        return Some(format!(
            "{} {bill} is past the 48 h bill_no window (first call {}): re-sending could charge twice; reconcile by hand",
            j.op,
            rfc3339_ms(first)
        ));
    }
    None
}

fn retry(
    bill_no: &str,
    f: &Filters,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let (op, appid) = (f.op.as_deref(), f.appid.as_deref());
    if let Some(op) = op {
        check_op(op)?;
    }
    let mut conn = open_existing_rw(&settings.config.outbox.path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let jobs = jobs_by_bill_no(&tx, bill_no, appid)?;
    let j = pick(&jobs, bill_no, op, appid)?;
    let now = now_ms();
    if let Some(why) = retry_refusal(j, now) {
        return Err(AuditError::Refused(why));
    }
    let changed = tx.execute(
        "UPDATE jobs SET state = 'pending', next_attempt_at = ?2, result = NULL, finished_at = NULL, \
         reopened_at = ?2, updated_at = ?2 WHERE id = ?1 AND state IN ('unknown', 'failed')",
        params![j.id, now],
    )?;
    if changed != 1 {
        return Err(refused(
            "the job changed while retrying it; look again with `outbox show`",
        ));
    }
    let targets = tx.execute(
        "UPDATE reply_targets SET published_at = NULL, returned = 0 WHERE job_id = ?1",
        params![j.id],
    )?;
    let detail = json!({
        "op": j.op,
        "job_id": j.id,
        "appid": j.appid,
        "previous_state": j.state,
        "last_errcode": j.last_errcode,
        "reason": who.reason,
    });
    record_action(&tx, now, &actor_name(who), "retry", bill_no, &detail)?;
    tx.commit()?;
    writeln!(
        out,
        "re-opened {} {} (job {}, was {}): pending, next attempt now; the running worker picks it up within a few seconds (or at its next start)",
        j.op,
        clean(bill_no),
        j.id,
        j.state
    )?;
    writeln!(
        out,
        "its new final reply goes to {targets} reply target{}",
        if targets == 1 { "" } else { "s" }
    )?;
    if let Some(first) = j.first_attempt_at {
        let window = first + crate::config::MAX_GIVE_UP_AFTER.as_millis() as i64;
        let deadline = (now + settings.config.retry.give_up_after.0.as_millis() as i64).min(window);
        writeln!(
            out,
            "retries with the same bill_no until {} (retry.give_up_after from now, within the 48 h bill_no window), then unknown again",
            rfc3339_ms(deadline)
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// prune

fn prune(
    older_than: Option<&str>,
    dry_run: bool,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let age_limit = match older_than {
        Some(raw) => humantime::parse_duration(raw.trim()).map_err(|_| AuditError::BadFilter {
            flag: "--older-than",
            value: raw.to_string(),
            expected: "a duration like 90d".into(),
        })?,
        None => settings.config.outbox.retention.0,
    };
    if age_limit < MIN_PRUNE_AGE {
        return Err(AuditError::Usage(format!(
            "refusing to prune jobs younger than 48h (the bill_no window); --older-than {} is too short",
            fmt_dur(age_limit)
        )));
    }
    let now = now_ms();
    let cutoff = now.saturating_sub(i64::try_from(age_limit.as_millis()).unwrap_or(i64::MAX));
    let older = fmt_dur(age_limit);
    const WHERE: &str =
        "state IN ('succeeded', 'failed', 'unknown') AND finished_at IS NOT NULL AND finished_at < ?1";

    if dry_run {
        let conn = open_ro(&settings.config.outbox.path)?;
        let n: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM jobs WHERE {WHERE}"),
            params![cutoff],
            |r| r.get(0),
        )?;
        writeln!(
            out,
            "dry run: would delete {n} final job{} finished before {} (older than {older}), with their attempts and reply targets; pending jobs are never pruned",
            if n == 1 { "" } else { "s" },
            rfc3339_s(cutoff)
        )?;
        return Ok(());
    }

    let mut conn = open_existing_rw(&settings.config.outbox.path)?;
    let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    if fk != 1 {
        return Err(refused("foreign keys are off on this connection; refusing to prune (attempts and reply targets would be left behind)"));
    }
    let mut deleted: i64 = 0;
    let outcome = (|| -> Result<(), AuditError> {
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                &format!("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {WHERE} ORDER BY id LIMIT {PRUNE_BATCH})"),
                params![cutoff],
            )?;
            tx.commit()?;
            deleted += n as i64;
            if (n as i64) < PRUNE_BATCH {
                return Ok(());
            }
        }
    })();
    let detail = json!({
        "deleted": deleted,
        "older_than": older,
        "finished_before": rfc3339_ms(cutoff),
        "reason": who.reason,
        "error": outcome.as_ref().err().map(|e| e.to_string()),
    });
    // Recorded even after a partial failure: the rows already deleted are gone.
    record_action(
        &conn,
        now,
        &actor_name(who),
        "prune",
        &format!("finished_before:{}", rfc3339_ms(cutoff)),
        &detail,
    )?;
    outcome?;
    writeln!(
        out,
        "deleted {deleted} final job{} finished before {} (older than {older}), with their attempts and reply targets",
        if deleted == 1 { "" } else { "s" },
        rfc3339_s(cutoff)
    )?;
    Ok(())
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
    fn percentiles_are_nearest_rank() {
        let hist = [(1, 98), (2, 1), (9, 1)];
        assert_eq!(percentile(&hist, 100, 0.5), Some(1));
        assert_eq!(percentile(&hist, 100, 0.99), Some(2));
        assert_eq!(percentile(&hist, 100, 1.0), Some(9));
        assert_eq!(percentile(&[], 0, 0.5), None);
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
