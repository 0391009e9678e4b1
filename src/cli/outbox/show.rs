//! `outbox show BILL_NO`: everything about one bill_no (its jobs, every call to Midas,
//! every reply target and whether the broker confirmed it, operator actions) and one
//! sentence per job saying what its state means and what to do.

use std::io::{self, Write};

use serde_json::{json, Value as Json};

use super::fmt::{age, clean, dash, opt_time, redact, stored_json, stored_json_text, table};
use super::{select, AuditError, RETRY_WINDOW};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::midas::errcode::{MP_SIG_WRONG, NO_PERMISSION, SESSION_EXPIRED, SIG_WRONG};
use crate::outbox::open_ro;
use crate::outbox::operator::{self, ActionRow, JobRow, TargetRow};

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

pub(super) fn show(
    bill_no: &str,
    appid: Option<&str>,
    as_json: bool,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let conn = open_ro(&settings.config.outbox.path)?;
    let tx = conn.unchecked_transaction()?; // one consistent snapshot
    let jobs = operator::jobs_by_bill_no(&tx, bill_no, appid)?;
    select(&jobs, bill_no, None, appid)?;
    let now = now_ms();
    let mut details = Vec::with_capacity(jobs.len());
    for j in &jobs {
        details.push((
            operator::targets_of(&tx, j.id)?,
            operator::calls_of(&tx, j.id)?,
        ));
    }
    let actions = operator::actions_on(&tx, bill_no, appid)?;
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
