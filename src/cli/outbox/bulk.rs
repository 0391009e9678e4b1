//! `outbox retry` / `outbox republish` on a set of jobs chosen by filters.
//!
//! An operator who re-opens a hundred jobs must see first what will happen, so the
//! set forms never act on their own: they print how many jobs match and what each
//! would get (re-opened, re-published, or skipped and why); `--dry-run` stops there,
//! and without `--yes` they stop there too, with exit status 2. `--yes` needs
//! `--expect N`, the count the operator saw: the plan is made again inside the
//! write transaction (so it is exactly what is done), refused unless N jobs match,
//! acted on, and recorded once per job in `operator_actions`. A filter with an empty
//! value (which would match everything) is refused. Text and `--json` are two
//! renderings of the same [`BulkView`].

use std::io::{self, Write};

use serde::Serialize;
use serde_json::json;

use super::fmt::{clean, table};
use super::retry::retry_refusal;
use super::{
    actor_name, job_filter, open_read, open_write, record_action, AuditError, Confirm, Filters,
    Operator,
};
use crate::command::now_ms;
use crate::config::Settings;
use crate::outbox::operator::{JobFilter, JobRow};
use crate::outbox::store::{Store, Tx};

/// Jobs listed one by one in the text rendering; `--json` lists them all.
const TEXT_ROWS: usize = 20;

/// Which set operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    Retry,
    Republish,
}

impl BulkAction {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BulkAction::Retry => "retry",
            BulkAction::Republish => "republish",
        }
    }
}

/// What happens to one matching job.
#[derive(Debug, Serialize)]
pub struct BulkJob {
    pub id: i64,
    pub op: String,
    pub bill_no: String,
    pub appid: String,
    pub status: String,
    pub last_errcode: Option<i64>,
    /// `reopen`, `republish` or `skip`.
    pub action: &'static str,
    /// Why it is skipped.
    pub reason: Option<String>,
}

/// The plan (dry run, no `--yes`) or the result (`--yes`) of a set operation.
#[derive(Debug, Serialize)]
pub struct BulkView {
    pub action: BulkAction,
    /// The filters, as given on the command line.
    pub filter: String,
    pub matched: usize,
    /// Jobs re-opened or re-published (or that would be).
    pub acting: usize,
    pub skipped: usize,
    /// Reply targets marked for re-publishing (or that would be).
    pub reply_targets: usize,
    pub dry_run: bool,
    /// Whether anything was changed.
    pub applied: bool,
    pub jobs: Vec<BulkJob>,
}

/// The filters as flags, for the summary and the recorded action.
pub(crate) fn describe(f: &Filters, bill_no: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(b) = bill_no {
        parts.push(clean(b));
    }
    let mut push = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            parts.push(format!("--{flag} {}", clean(&v)));
        }
    };
    push("status", f.status.clone());
    push("op", f.op.clone());
    push("appid", f.appid.clone());
    push("openid", f.openid.clone());
    push("bill-no-prefix", f.bill_no_prefix.clone());
    push("errcode", f.errcode.map(|c| c.to_string()));
    push("since", f.since.clone());
    push("until", f.until.clone());
    parts.join(" ")
}

fn plan(action: BulkAction, jobs: Vec<JobRow>, now: i64) -> Vec<(JobRow, Option<String>)> {
    jobs.into_iter()
        .map(|j| {
            let why = match action {
                BulkAction::Retry => retry_refusal(&j, now),
                BulkAction::Republish => (!j.is_final())
                    .then(|| "pending: its reply is published when it ends".to_string()),
            };
            (j, why)
        })
        .collect()
}

fn count_targets(c: &Tx<'_>, planned: &[(JobRow, Option<String>)]) -> Result<usize, AuditError> {
    let mut n = 0usize;
    for (j, why) in planned {
        if why.is_none() {
            n += usize::try_from(c.count_targets(j.id)?).unwrap_or(0);
        }
    }
    Ok(n)
}

fn view(
    action: BulkAction,
    filter: String,
    planned: Vec<(JobRow, Option<String>)>,
    reply_targets: usize,
    dry_run: bool,
    applied: bool,
) -> BulkView {
    let acting = planned.iter().filter(|(_, why)| why.is_none()).count();
    let jobs: Vec<BulkJob> = planned
        .into_iter()
        .map(|(j, why)| BulkJob {
            id: j.id,
            action: match (&why, action) {
                (Some(_), _) => "skip",
                (None, BulkAction::Retry) => "reopen",
                (None, BulkAction::Republish) => "republish",
            },
            reason: why,
            op: j.op,
            bill_no: j.bill_no,
            appid: j.appid,
            status: j.state,
            last_errcode: j.last_errcode,
        })
        .collect();
    BulkView {
        action,
        filter,
        matched: jobs.len(),
        acting,
        skipped: jobs.len() - acting,
        reply_targets,
        dry_run,
        applied,
        jobs,
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text rendering of a [`BulkView`].
pub fn render_text(v: &BulkView, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} match {}",
        v.action.name(),
        plural(v.matched, "job", "jobs"),
        v.filter
    )?;
    if v.matched == 0 {
        return Ok(());
    }
    let (done, would) = match v.action {
        BulkAction::Retry => ("re-opened", "would re-open"),
        BulkAction::Republish => ("re-published", "would re-publish"),
    };
    let what = match v.action {
        BulkAction::Retry => format!(
            "{}: pending again, Midas called again with the same bill_no; the new final reply goes to {}",
            plural(v.acting, "job", "jobs"),
            plural(v.reply_targets, "reply target", "reply targets")
        ),
        BulkAction::Republish => format!(
            "the stored final replies of {} to {}",
            plural(v.acting, "job", "jobs"),
            plural(v.reply_targets, "reply target", "reply targets")
        ),
    };
    writeln!(out, "  {} {what}", if v.applied { done } else { would })?;
    if v.skipped > 0 {
        writeln!(
            out,
            "  {} {}",
            if v.applied { "skipped" } else { "would skip" },
            plural(v.skipped, "job (reason below)", "jobs (reasons below)")
        )?;
    }
    let rows: Vec<Vec<String>> = v
        .jobs
        .iter()
        .take(TEXT_ROWS)
        .map(|j| {
            vec![
                j.id.to_string(),
                j.op.clone(),
                clean(&j.bill_no),
                clean(&j.appid),
                j.status.clone(),
                j.last_errcode.map_or("-".into(), |c| c.to_string()),
                match &j.reason {
                    Some(why) => format!("skip: {}", clean(why)),
                    None => j.action.to_string(),
                },
            ]
        })
        .collect();
    table(
        out,
        "  ",
        &[
            "job", "op", "bill_no", "appid", "status", "errcode", "action",
        ],
        &rows,
    )?;
    if v.jobs.len() > TEXT_ROWS {
        writeln!(
            out,
            "  ... and {} more (--json lists every job)",
            v.jobs.len() - TEXT_ROWS
        )?;
    }
    if v.dry_run {
        writeln!(out, "dry run: nothing changed")?;
    } else if v.applied {
        writeln!(
            out,
            "recorded in operator_actions; the running worker picks the changes up within a few seconds"
        )?;
    }
    Ok(())
}

fn render(v: &BulkView, as_json: bool, out: &mut dyn Write) -> Result<(), AuditError> {
    if as_json {
        serde_json::to_writer_pretty(&mut *out, v).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        render_text(v, out)?;
    }
    Ok(())
}

/// `outbox retry|republish` with filters (or `--dry-run`/`--json` with a BILL_NO).
pub fn run(
    action: BulkAction,
    bill_no: Option<&str>,
    f: &Filters,
    confirm: &Confirm,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let now = now_ms();
    // empty values refused before anything else: `--bill-no-prefix ""` is a filter
    // on paper and every job in fact
    job_filter(f, now, bill_no)?;
    if bill_no.is_none() && describe(f, None).is_empty() {
        return Err(AuditError::Usage(format!(
            "{} needs a BILL_NO or filters (--status, --since, --appid, --bill-no-prefix, --errcode, ...)",
            action.name()
        )));
    }
    if action == BulkAction::Republish && f.status.as_deref() == Some("pending") {
        return Err(AuditError::Refused(
            "pending jobs are not final; their replies will be published when they are".into(),
        ));
    }
    let filter = describe(f, bill_no);
    if confirm.yes && confirm.expect.is_none() {
        return Err(AuditError::Usage(
            "--yes needs --expect N: the number of jobs the plan (printed without --yes) showed matching".into(),
        ));
    }
    let now = now_ms();
    let jf = job_filter(f, now, bill_no)?;
    if confirm.dry_run || !(confirm.yes || bill_no.is_some()) {
        let mut store = open_read(settings)?;
        let mut v = preview(&mut store, action, &jf, filter, now)?;
        v.dry_run = confirm.dry_run;
        render(&v, confirm.json, out)?;
        if confirm.dry_run || v.acting == 0 {
            return Ok(());
        }
        let verb = match action {
            BulkAction::Retry => "re-open",
            BulkAction::Republish => "re-publish the replies of",
        };
        let these = match v.acting {
            1 => "this job".to_string(),
            n => format!("these {n} jobs"),
        };
        return Err(AuditError::Usage(format!(
            "nothing changed: add --yes --expect {} to {verb} {these}",
            v.matched
        )));
    }
    let mut store = open_write(settings)?;
    let expect = confirm.expect;
    let v = apply(
        &mut store,
        action,
        &jf,
        filter.clone(),
        &actor_name(who),
        who.reason.as_deref(),
        now,
        |matched, _| {
            match expect {
            Some(expected) if matched != expected => Err(AuditError::Refused(format!(
                "nothing changed: {} match {filter} now, not the {expected} expected (--expect); look again without --yes",
                plural(matched, "job", "jobs")
            ))),
            _ => Ok(()),
        }
        },
    )?;
    render(&v, confirm.json, out)
}

/// The plan of a set operation on the jobs `f` selects, read in one snapshot: what
/// `retry`/`republish` print before `--yes`, and the console's confirm step.
pub(crate) fn preview(
    store: &mut Store,
    action: BulkAction,
    f: &JobFilter,
    filter: String,
    now: i64,
) -> Result<BulkView, AuditError> {
    let tx = store.read()?; // one snapshot for the jobs and their targets
    let planned = plan(action, tx.jobs(f)?, now);
    let targets = count_targets(&tx, &planned)?;
    drop(tx);
    Ok(view(action, filter, planned, targets, false, false))
}

/// Act on the jobs `f` selects: the plan is made again inside the write
/// transaction (so it is exactly what is done) and handed to `check` with the
/// number of jobs matching and the ids of those it would act on (the console refuses a set that changed since its
/// confirm step); then each job is acted on and recorded in `operator_actions`
/// under `actor`, all in that one transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    store: &mut Store,
    action: BulkAction,
    f: &JobFilter,
    filter: String,
    actor: &str,
    reason: Option<&str>,
    now: i64,
    check: impl FnOnce(usize, &[i64]) -> Result<(), AuditError>,
) -> Result<BulkView, AuditError> {
    let tx = store.write()?;
    let planned = plan(action, tx.jobs(f)?, now);
    let acting: Vec<i64> = planned
        .iter()
        .filter(|(_, why)| why.is_none())
        .map(|(j, _)| j.id)
        .collect();
    check(planned.len(), &acting)?;
    let mut targets = 0usize;
    for (j, why) in &planned {
        if why.is_some() {
            continue;
        }
        if action == BulkAction::Retry && !tx.reopen(j.id, now)? {
            return Err(AuditError::Refused(format!(
                "job {} changed while re-opening it; nothing was changed, look again with `outbox list`",
                j.id
            )));
        }
        let n = tx.requeue_replies(j.id, false)?;
        targets += n;
        let detail = json!({
            "job_id": j.id,
            "op": j.op,
            "appid": j.appid,
            "previous_state": j.state,
            "last_errcode": j.last_errcode,
            "targets": n,
            "filter": filter,
            "reason": reason,
        });
        record_action(&tx, now, actor, action.name(), &j.bill_no, &detail)?;
    }
    tx.commit()?;
    Ok(view(action, filter, planned, targets, false, true))
}
