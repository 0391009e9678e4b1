//! `midas-worker outbox ...`: the operator's window into the outbox.
//!
//! It exists so that a person answering "I paid and got nothing" can, in a minute,
//! see what happened to a bill_no (every call to Midas, every reply and whether the
//! broker confirmed it), and act on it: re-send a stored reply (`republish`),
//! re-open a job that ended `unknown` or with a fixable `failed` (`retry`), or drop
//! old final jobs (`prune`). Every action is recorded in `operator_actions`.
//!
//! One file per verb; this one holds the arguments, the errors and what the verbs
//! share. The verbs hold no SQL: they call [`crate::outbox::store::Store`], which
//! runs them on the SQLite file (`outbox.path`) or on the shared PostgreSQL outbox
//! (`outbox.url`) alike. Reads use their own read-only connection (WAL: safe while
//! the worker writes). Writes are short transactions (SQLite `IMMEDIATE`,
//! PostgreSQL `SELECT … FOR UPDATE`) that re-check the state they change, so they
//! cannot race the worker's writer. `migrate` copies a SQLite outbox into a new
//! PostgreSQL one. Nothing here reads `session_key`, and free text is
//! scrubbed of anything that looks like a token before it is printed.
//!
//! Orders are keyed by (appid, op, bill_no): a verb given a bill_no that several apps
//! use stops and asks for `--appid`. `retry` and `republish` also act on a set chosen
//! by filters ([`bulk`]), only after showing what they would do.

pub(crate) mod bulk;
mod error;
pub(crate) mod export;
pub(crate) mod filter;
pub(crate) mod fmt;
pub(crate) mod list;
mod migrate;
mod prune;
pub(crate) mod pushes;
mod republish;
mod retry;
pub(crate) mod show;
pub(crate) mod stats;

use std::io::{self, Write};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value as Json;

use crate::config::Settings;
use crate::outbox::operator::JobRow;
use crate::outbox::store::{Store, Tx};
use crate::outbox::Location;
use crate::secret::SecretUrl;
pub use error::AuditError;
use filter::{check_op, job_filter};
use fmt::{clean, one_line};

/// A bill_no deduplicates at Midas for 48 h; `retry` keeps an hour of margin.
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(47 * 3600);
/// `prune` never deletes jobs younger than the bill_no window.
pub(crate) const MIN_PRUNE_AGE: Duration = Duration::from_secs(48 * 3600);
/// Jobs deleted per `prune` transaction (keeps the worker's writer from waiting long).
pub(crate) const PRUNE_BATCH: i64 = 2000;

pub(crate) const STATES: [&str; 4] = ["pending", "succeeded", "failed", "unknown"];
pub(crate) const OPS: [&str; 3] = ["pay", "present", "cancel_pay"];

/// Audit and operator actions on the outbox (`outbox.path` in the config).
#[derive(Subcommand, Debug, Clone)]
pub enum OutboxCmd {
    /// Recent jobs, newest first, as a table (`--json`: one JSON array).
    List(ListArgs),
    /// Everything about one bill_no: its jobs (pay and cancel_pay), every call to
    /// Midas, every reply target and whether the broker confirmed it, operator actions.
    /// Given an OutTradeNo (or RefundId), the WeChat payment pushes stored under it.
    Show {
        /// The bill_no (or OutTradeNo, RefundId) to look up.
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
        /// `pushes` (or one kind: coins_delivered, goods_delivered, refunded) to
        /// export WeChat payment pushes instead of jobs.
        #[arg(long)]
        kind: Option<String>,
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
    /// the cutoff, and stored WeChat pushes whose event the broker confirmed, last
    /// received before it. Pending jobs and unconfirmed pushes are never deleted.
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
    /// Copy the SQLite outbox (`outbox.path`) into a new, empty PostgreSQL outbox,
    /// keeping every job, reply target, attempt and operator action with its id.
    ///
    /// STOP THE WORKER FIRST: what it writes to the SQLite file after the copy is
    /// not carried over. The copy is one transaction (all or nothing); a target
    /// that already holds rows is refused. Pending jobs are picked up by the first
    /// worker started with `outbox.url` set to the new outbox. The SQLite file is
    /// left as it was.
    Migrate {
        /// The PostgreSQL outbox, `postgres://user:password@host/db` (schema applied
        /// if missing). Printed with its password masked; prefer the environment
        /// variable to keep the password out of the process list.
        #[arg(
            long,
            value_name = "URL",
            env = "MIDAS_WORKER_MIGRATE_TO",
            hide_env_values = true
        )]
        to: SecretUrl,
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
    /// Needs `--expect N`.
    #[arg(long, requires = "expect")]
    pub yes: bool,
    /// With `--yes`: how many jobs the operator saw match (in the plan printed
    /// without `--yes`); anything else changes nothing (exit 2).
    #[arg(long, value_name = "N")]
    pub expect: Option<usize>,
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
    /// `jobs`, `pushes`, or one push kind (coins_delivered, goods_delivered,
    /// refunded). Default: jobs, then the pushes (the table only).
    #[arg(long)]
    pub kind: Option<String>,
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

/// Where the verbs find the outbox: `outbox.url` (PostgreSQL) or `outbox.path`.
fn location(settings: &Settings) -> Location {
    Location::of(&settings.config.outbox)
}

/// Open the outbox for reading.
fn open_read(settings: &Settings) -> Result<Store, AuditError> {
    Ok(Store::open_ro(&location(settings))?)
}

/// Open the outbox for an operator's write.
fn open_write(settings: &Settings) -> Result<Store, AuditError> {
    Ok(Store::open_rw(&location(settings))?)
}

/// Run one `outbox` verb against the configured outbox, writing to `out`.
pub fn run(cmd: &OutboxCmd, settings: &Settings, out: &mut dyn Write) -> Result<(), AuditError> {
    let r = match cmd {
        OutboxCmd::List(a) => list::list(a, settings, out),
        OutboxCmd::Show {
            bill_no,
            appid,
            json,
        } => show::show(bill_no, appid.as_deref(), *json, settings, out),
        OutboxCmd::Stats { json } => stats::stats(*json, settings, out),
        OutboxCmd::Export {
            filters,
            kind,
            format,
        } => export::export(filters, kind.as_deref(), *format, settings, out),
        OutboxCmd::Republish {
            bill_no,
            filters,
            confirm,
            who,
        } => match single(bill_no.as_deref(), filters, confirm)? {
            Some(b) => republish::republish(b, filters, who, settings, out),
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
            Some(b) => retry::retry(b, filters, who, settings, out),
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
        } => prune::prune(older_than.as_deref(), *dry_run, who, settings, out),
        OutboxCmd::Migrate { to, who } => migrate::migrate(to, who, settings, out),
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
// Jobs of one bill_no, operator actions

pub(super) fn unknown_bill_no(bill_no: &str, op: Option<&str>, appid: Option<&str>) -> AuditError {
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

fn actor_name(who: &Operator) -> String {
    let name = who
        .actor
        .clone()
        .filter(|a| !a.trim().is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| "unknown".to_string());
    one_line(name.trim()).into_owned()
}

/// Record an operator action (in the caller's transaction).
fn record_action(
    tx: &Tx<'_>,
    at: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &Json,
) -> Result<(), AuditError> {
    Ok(tx.record_action(at, actor, action, target, &detail.to_string())?)
}

fn refused(msg: impl Into<String>) -> AuditError {
    AuditError::Refused(msg.into())
}
