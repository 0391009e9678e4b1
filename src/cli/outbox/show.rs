//! `outbox show BILL_NO`: everything about one bill_no (its jobs, every call to Midas,
//! every reply target and whether the broker confirmed it, operator actions) and one
//! sentence per job saying what its state means and what to do.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value as Json;

use super::fmt::{age, clean, dash, redact, stored_json, stored_json_text, table};
use super::{open_read, select, AuditError, RETRY_WINDOW};
use crate::command::{now_ms, rfc3339_ms};
use crate::config::Settings;
use crate::midas::errcode::{MP_SIG_WRONG, NO_PERMISSION, SESSION_EXPIRED, SIG_WRONG};
use crate::outbox::operator::{ActionRow, CallRow, JobRow, TargetRow};
use crate::outbox::store::Store;

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

/// One reply target of a job.
#[derive(Debug, Serialize)]
pub struct TargetView {
    pub reply_to: String,
    pub correlation_id: String,
    pub added_at: String,
    pub published_at: Option<String>,
    pub confirmed: bool,
    pub returned: bool,
    /// The "confirmed at" cell of the report.
    #[serde(skip)]
    pub(crate) status: String,
}

/// One call to Midas.
#[derive(Debug, Serialize)]
pub struct CallView {
    pub n: i64,
    pub at: String,
    pub latency_ms: i64,
    pub api: String,
    pub http_status: Option<i64>,
    pub errcode: Option<i64>,
    /// Scrubbed of anything that looks like a token.
    pub errmsg: Option<String>,
    pub outcome: String,
}

/// One job of the bill_no, with its reply targets and calls.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: i64,
    pub op: String,
    pub bill_no: String,
    pub state: String,
    pub appid: String,
    pub openid: String,
    /// The stored parameters (scrubbed).
    pub request: Json,
    pub attempts: i64,
    pub first_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    /// The final reply (scrubbed), `null` while pending.
    pub result: Json,
    pub received_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// What the state means and what to do.
    pub hint: String,
    pub reply_targets: Vec<TargetView>,
    pub history: Vec<CallView>,
    /// The stored JSON as text, for the report (verbatim unless scrubbed).
    #[serde(skip)]
    pub(crate) request_text: String,
    #[serde(skip)]
    pub(crate) result_text: Option<String>,
    /// "in 3s" / "due 2s ago" for the next attempt.
    #[serde(skip)]
    pub(crate) next_in: Option<String>,
    /// Whether `outbox retry` would re-open it (the console offers "Retry…" then).
    #[serde(skip)]
    pub(crate) retryable: bool,
}

/// One operator action on the bill_no.
#[derive(Debug, Serialize)]
pub struct ActionView {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Json,
    #[serde(skip)]
    pub(crate) detail_text: String,
}

/// `outbox show`: the `--json` document, and what the report is rendered from.
#[derive(Debug, Serialize)]
pub struct ShowView {
    pub bill_no: String,
    pub jobs: Vec<JobView>,
    pub operator_actions: Vec<ActionView>,
    /// WeChat payment pushes stored under this key (an OutTradeNo or RefundId).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pushes: Vec<super::pushes::PushView>,
}

fn job_view(
    j: JobRow,
    targets: Vec<TargetRow>,
    calls: Vec<CallRow>,
    settings: &Settings,
    now: i64,
) -> JobView {
    let hint = hint(&j, &targets, settings, now);
    let retryable = super::retry::retry_refusal(&j, now).is_none();
    let is_final = j.is_final();
    let next_in = (!is_final).then(|| {
        let when = j.next_attempt_at - now;
        if when >= 0 {
            format!("in {}", age(when))
        } else {
            format!("due {} ago", age(-when))
        }
    });
    JobView {
        id: j.id,
        request: stored_json(&j.request),
        request_text: stored_json_text(&j.request),
        result: j.result.as_deref().map_or(Json::Null, stored_json),
        result_text: j.result.as_deref().map(stored_json_text),
        op: j.op,
        bill_no: j.bill_no,
        state: j.state,
        appid: j.appid,
        openid: j.openid,
        attempts: j.attempts,
        first_attempt_at: j.first_attempt_at.map(rfc3339_ms),
        next_attempt_at: (!is_final).then(|| rfc3339_ms(j.next_attempt_at)),
        next_in,
        retryable,
        last_errcode: j.last_errcode,
        last_error: j.last_error.as_deref().map(|e| redact(e).into_owned()),
        received_at: rfc3339_ms(j.received_at),
        updated_at: rfc3339_ms(j.updated_at),
        finished_at: j.finished_at.map(rfc3339_ms),
        hint,
        reply_targets: targets
            .into_iter()
            .map(|t| TargetView {
                status: target_status(&t, is_final),
                added_at: rfc3339_ms(t.added_at),
                published_at: t.published_at.map(rfc3339_ms),
                confirmed: t.published_at.is_some(),
                returned: t.returned,
                reply_to: t.reply_to,
                correlation_id: t.correlation_id,
            })
            .collect(),
        history: calls
            .into_iter()
            .map(|a| CallView {
                n: a.n,
                at: rfc3339_ms(a.started_at),
                latency_ms: a.latency_ms,
                errmsg: a.errmsg.as_deref().map(|e| redact(e).into_owned()),
                api: a.api,
                http_status: a.http_status,
                errcode: a.errcode,
                outcome: a.outcome,
            })
            .collect(),
    }
}

pub(super) fn show(
    bill_no: &str,
    appid: Option<&str>,
    as_json: bool,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let mut store = open_read(settings)?;
    let pushes = store.pushes_by_key(bill_no, appid)?;
    if !pushes.is_empty() && store.read()?.jobs_by_bill_no(bill_no, appid)?.is_empty() {
        if as_json {
            let view = ShowView {
                bill_no: bill_no.to_string(),
                jobs: Vec::new(),
                operator_actions: Vec::new(),
                pushes: pushes.into_iter().map(Into::into).collect(),
            };
            serde_json::to_writer_pretty(&mut *out, &view).map_err(io::Error::from)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{}: no job; {} WeChat payment push{}",
                clean(bill_no),
                pushes.len(),
                if pushes.len() == 1 { "" } else { "es" }
            )?;
            super::pushes::show_text(&pushes, out)?;
        }
        return Ok(());
    }
    let view = view(&mut store, bill_no, appid, settings, now_ms())?;
    if as_json {
        let mut view = view;
        view.pushes = pushes.into_iter().map(Into::into).collect();
        serde_json::to_writer_pretty(&mut *out, &view).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    render_text(&view, out)?;
    super::pushes::show_text(&pushes, out)?;
    Ok(())
}

/// What `outbox show` reports on `bill_no` (of one app when `appid` is given), read
/// in one snapshot; the console's job page shows the same view.
pub(crate) fn view(
    store: &mut Store,
    bill_no: &str,
    appid: Option<&str>,
    settings: &Settings,
    now: i64,
) -> Result<ShowView, AuditError> {
    let tx = store.read()?; // one consistent snapshot
    let jobs = tx.jobs_by_bill_no(bill_no, appid)?;
    select(&jobs, bill_no, None, appid)?;
    let mut views = Vec::with_capacity(jobs.len());
    for j in jobs {
        let (targets, calls) = (tx.targets_of(j.id)?, tx.calls_of(j.id)?);
        views.push(job_view(j, targets, calls, settings, now));
    }
    let actions = tx.actions_on(bill_no, appid)?;
    drop(tx);
    Ok(ShowView {
        bill_no: bill_no.to_string(),
        jobs: views,
        operator_actions: actions.into_iter().map(action_view).collect(),
        pushes: Vec::new(),
    })
}

fn render_text(v: &ShowView, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "bill_no {}: {} job{}",
        clean(&v.bill_no),
        v.jobs.len(),
        if v.jobs.len() == 1 { "" } else { "s" }
    )?;
    for j in &v.jobs {
        writeln!(out)?;
        writeln!(out, "{} (job {}): {}", j.op, j.id, j.state.to_uppercase())?;
        let mut kv: Vec<(&str, String)> = vec![
            ("appid", clean(&j.appid)),
            ("openid", clean(&j.openid)),
            ("request", clean(&j.request_text)),
            ("attempts", j.attempts.to_string()),
            ("first attempt", dash(j.first_attempt_at.as_ref())),
        ];
        if let (Some(at), Some(rel)) = (&j.next_attempt_at, &j.next_in) {
            kv.push(("next attempt", format!("{at} ({rel})")));
        }
        kv.push(("last errcode", dash(j.last_errcode)));
        kv.push((
            "last error",
            j.last_error.as_deref().map_or("-".into(), clean),
        ));
        kv.push((
            "result",
            j.result_text
                .as_deref()
                .map_or("- (not final)".into(), clean),
        ));
        kv.push(("received", j.received_at.clone()));
        kv.push(("finished", dash(j.finished_at.as_ref())));
        for (k, val) in &kv {
            writeln!(out, "  {k:<14} {val}")?;
        }
        writeln!(out, "  {:<14} {}", "what it means", j.hint)?;

        writeln!(out, "  reply targets:")?;
        if j.reply_targets.is_empty() {
            writeln!(out, "    (none)")?;
        } else {
            let rows: Vec<Vec<String>> = j
                .reply_targets
                .iter()
                .map(|t| {
                    vec![
                        clean(&t.reply_to),
                        clean(&t.correlation_id),
                        t.added_at.clone(),
                        t.status.clone(),
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
        if j.history.is_empty() {
            writeln!(out, "    (none yet)")?;
        } else {
            let rows: Vec<Vec<String>> = j
                .history
                .iter()
                .map(|a| {
                    vec![
                        a.n.to_string(),
                        a.at.clone(),
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
    if v.operator_actions.is_empty() {
        writeln!(out, "  (none)")?;
    } else {
        let rows: Vec<Vec<String>> = v
            .operator_actions
            .iter()
            .map(|a| {
                vec![
                    a.at.clone(),
                    clean(&a.actor),
                    clean(&a.action),
                    clean(&a.detail_text),
                ]
            })
            .collect();
        table(out, "  ", &["at", "actor", "action", "detail"], &rows)?;
    }
    Ok(())
}

fn action_view(a: ActionRow) -> ActionView {
    ActionView {
        at: rfc3339_ms(a.at),
        detail: stored_json(&a.detail),
        detail_text: a.detail,
        actor: a.actor,
        action: a.action,
        target: a.target,
    }
}
