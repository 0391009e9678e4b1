//! `outbox retry BILL_NO`: re-open one job that ended `unknown` (inside the 48 h
//! bill_no window) or `failed` with a configuration error, so the worker calls Midas
//! again with the same bill_no; and [`retry_refusal`], why a job cannot be retried
//! (shared with the set form in [`super::bulk`]).

use std::io::Write;

use serde_json::json;

use super::fmt::clean;
use super::{
    actor_name, check_op, open_write, pick, record_action, refused, AuditError, Filters, Operator,
    RETRY_WINDOW,
};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::midas::errcode::{MP_SIG_WRONG, NO_PERMISSION, SESSION_EXPIRED, SIG_WRONG};
use crate::outbox::operator::JobRow;

/// Why retrying this job cannot help (or would be unsafe), if so.
pub(super) fn retry_refusal(j: &JobRow, now: i64) -> Option<String> {
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

pub(super) fn retry(
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
    let mut store = open_write(settings)?;
    let tx = store.write()?;
    let jobs = tx.jobs_by_bill_no(bill_no, appid)?;
    let j = pick(&jobs, bill_no, op, appid)?;
    let now = now_ms();
    if let Some(why) = retry_refusal(j, now) {
        return Err(AuditError::Refused(why));
    }
    if !tx.reopen(j.id, now)? {
        return Err(refused(
            "the job changed while retrying it; look again with `outbox show`",
        ));
    }
    let targets = tx.requeue_replies(j.id, false)?;
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
