//! `outbox prune`: delete final jobs (with their attempts and reply targets) that
//! finished before a cutoff, never younger than the 48 h bill_no window and never a
//! pending job, and stored WeChat pushes whose event the broker confirmed and that
//! WeChat last sent before the same cutoff (never one whose event is still to be
//! published), in small transactions so the worker's writer never waits long.

use std::io::Write;

use serde_json::json;

use super::fmt::{fmt_dur, rfc3339_s};
use super::{
    actor_name, open_read, open_write, refused, AuditError, Operator, MIN_PRUNE_AGE, PRUNE_BATCH,
};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;

pub(super) fn prune(
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

    if dry_run {
        let store = open_read(settings)?;
        let n = store.prunable(cutoff)?;
        let p = store.prunable_pushes(cutoff)?;
        writeln!(
            out,
            "dry run: would delete {n} final job{} finished before {} (older than {older}), with their attempts and reply targets; pending jobs are never pruned",
            if n == 1 { "" } else { "s" },
            rfc3339_s(cutoff)
        )?;
        writeln!(
            out,
            "dry run: would delete {p} stored push{} last received before {} whose events the broker confirmed; a push whose event is not confirmed is never pruned",
            if p == 1 { "" } else { "es" },
            rfc3339_s(cutoff)
        )?;
        return Ok(());
    }

    let mut store = open_write(settings)?;
    if !store.foreign_keys_on()? {
        return Err(refused("foreign keys are off on this connection; refusing to prune (attempts and reply targets would be left behind)"));
    }
    let mut deleted: i64 = 0;
    let mut pushes: i64 = 0;
    let outcome = (|| -> Result<(), AuditError> {
        loop {
            let n = store.prune_batch(cutoff, PRUNE_BATCH)?;
            deleted += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        loop {
            let n = store.prune_pushes_batch(cutoff, PRUNE_BATCH)?;
            pushes += n;
            if n < PRUNE_BATCH {
                return Ok(());
            }
        }
    })();
    let detail = json!({
        "deleted": deleted,
        "pushes_deleted": pushes,
        "older_than": older,
        "finished_before": rfc3339_ms(cutoff),
        "reason": who.reason,
        "error": outcome.as_ref().err().map(|e| e.to_string()),
    });
    // Recorded even after a partial failure: the rows already deleted are gone.
    store.record_action(
        now,
        &actor_name(who),
        "prune",
        &format!("finished_before:{}", rfc3339_ms(cutoff)),
        &detail.to_string(),
    )?;
    outcome?;
    writeln!(
        out,
        "deleted {deleted} final job{} finished before {} (older than {older}), with their attempts and reply targets",
        if deleted == 1 { "" } else { "s" },
        rfc3339_s(cutoff)
    )?;
    writeln!(
        out,
        "deleted {pushes} stored push{} last received before {} whose events the broker confirmed",
        if pushes == 1 { "" } else { "es" },
        rfc3339_s(cutoff)
    )?;
    Ok(())
}
