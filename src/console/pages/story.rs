//! A job's story — what `outbox show` prints: the plain-words "what it means", the
//! request (secrets masked), every call to Midas, every reply target and whether the
//! broker confirmed it, operator actions — and the operator's action pages: the
//! confirm step (the exact set, carried back by the POST) and the result.

use axum::response::Html;
use maud::{html, Markup};

use super::{badge, layout, push_href, search_href};
use crate::cli::outbox::bulk::{BulkAction, BulkView};
use crate::cli::outbox::fmt::{clean, dash};
use crate::cli::outbox::show::{JobView, ShowView};
use crate::console::auth::{Role, Who};
use crate::console::form::{push_pair, SearchForm};

/// Jobs listed on the confirm and result pages (the count always covers all).
const LISTED: usize = 100;

fn kv(k: &str, v: Markup) -> Markup {
    html! { dt { (k) } dd { (v) } }
}

/// The confirm link of an action on one job.
fn act_href(action: &str, j: &JobView) -> String {
    let mut q = String::new();
    push_pair(&mut q, "action", action);
    push_pair(&mut q, "bill_no", &j.bill_no);
    push_pair(&mut q, "op", &j.op);
    push_pair(&mut q, "appid", &j.appid);
    format!("/confirm?{q}")
}

fn job(who: &Who, j: &JobView) -> Markup {
    html! {
        section.card.job {
            h2 { (j.op) " " small { "job " (j.id) } " " (badge(&j.state)) }
            p.meaning { strong { "What it means: " } (clean(&j.hint)) }
            @if who.role == Role::Operator {
                p.actions {
                    @if j.retryable {
                        a.button.warn href=(act_href("retry", j)) { "Retry…" }
                    }
                    @if j.state != "pending" {
                        a.button href=(act_href("republish", j)) { "Republish reply…" }
                    }
                }
            }
            dl.kv {
                (kv("appid", html! { (clean(&j.appid)) }))
                (kv("openid", html! { (clean(&j.openid)) }))
                (kv("received", html! { (j.received_at) }))
                (kv("attempts", html! { (j.attempts) }))
                (kv("first attempt", html! { (dash(j.first_attempt_at.as_ref())) }))
                @if let (Some(at), Some(rel)) = (&j.next_attempt_at, &j.next_in) {
                    (kv("next attempt", html! { (at) " (" (rel) ")" }))
                }
                (kv("last errcode", html! { (dash(j.last_errcode)) }))
                (kv("last error", html! { (j.last_error.as_deref().map_or("-".into(), clean)) }))
                (kv("finished", html! { (dash(j.finished_at.as_ref())) }))
            }
            details open {
                summary { "Request " small { "(session_key and tokens masked)" } }
                pre { (j.request_text) }
            }
            details open[j.result_text.is_some()] {
                summary { "Result (the reply)" }
                pre { (j.result_text.as_deref().unwrap_or("- (not final)")) }
            }
            h3 { "Calls to Midas" }
            @if j.history.is_empty() {
                p { "(none yet)" }
            } @else {
                div.scroll { table {
                    thead { tr { th { "#" } th { "time (UTC)" } th { "latency ms" } th { "api" } th { "http" } th { "errcode" } th { "errmsg" } th { "outcome" } } }
                    tbody {
                        @for c in &j.history {
                            tr {
                                td.num { (c.n) } td.nowrap { (c.at) } td.num { (c.latency_ms) } td { (clean(&c.api)) }
                                td.num { (dash(c.http_status)) } td.num { (dash(c.errcode)) }
                                td { (c.errmsg.as_deref().map_or("-".into(), clean)) }
                                td { span class=(format!("outcome o-{}", clean(&c.outcome))) { (clean(&c.outcome)) } }
                            }
                        }
                    }
                } }
            }
            h3 { "Reply targets" }
            @if j.reply_targets.is_empty() {
                p { "(none)" }
            } @else {
                div.scroll { table {
                    thead { tr { th { "reply_to" } th { "correlation_id" } th { "added (UTC)" } th { "confirmed at" } } }
                    tbody {
                        @for t in &j.reply_targets {
                            tr {
                                td { (clean(&t.reply_to)) } td { (clean(&t.correlation_id)) } td.nowrap { (t.added_at) }
                                td class=(if t.confirmed && !t.returned { "ok" } else { "warn" }) { (t.status) }
                            }
                        }
                    }
                } }
            }
        }
    }
}

pub(in crate::console) fn show(who: &Who, v: &ShowView) -> Html<String> {
    let body = html! {
        p.crumbs { a href=(search_href(&format!("bill_no={}", crate::console::form::encode(&v.bill_no)))) { "← all jobs of this bill_no" } }
        h1 { "bill_no " code { (clean(&v.bill_no)) } }
        p.summary { (v.jobs.len()) " job" @if v.jobs.len() != 1 { "s" } }
        @if !v.pushes.is_empty() {
            section.card.attention {
                h2 { "WeChat payment pushes under this number" }
                p {
                    @for p in &v.pushes {
                        a href=(push_href(&p.dedup_key, Some(&p.appid))) { (clean(&p.kind)) " push of app " (clean(&p.appid)) }
                        " "
                    }
                }
            }
        }
        @for j in &v.jobs { (job(who, j)) }
        section.card {
            h2 { "Operator actions" }
            @if v.operator_actions.is_empty() {
                p { "(none)" }
            } @else {
                div.scroll { table {
                    thead { tr { th { "at (UTC)" } th { "who" } th { "action" } th { "detail" } } }
                    tbody {
                        @for a in &v.operator_actions {
                            tr { td.nowrap { (a.at) } td { (clean(&a.actor)) } td { (clean(&a.action)) } td { code { (clean(&a.detail_text)) } } }
                        }
                    }
                } }
            }
        }
    };
    layout(
        &format!("bill_no {}", clean(&v.bill_no)),
        Some(who),
        None,
        body,
    )
}

fn verb(a: BulkAction) -> (&'static str, &'static str) {
    match a {
        BulkAction::Retry => ("Retry", "re-open"),
        BulkAction::Republish => ("Republish", "re-publish the replies of"),
    }
}

fn plan_table(v: &BulkView) -> Markup {
    html! {
        div.scroll { table {
            thead { tr { th { "job" } th { "op" } th { "bill_no" } th { "appid" } th { "status" } th { "errcode" } th { "action" } } }
            tbody {
                @for j in v.jobs.iter().take(LISTED) {
                    tr {
                        td.num { (j.id) } td { (j.op) }
                        td { a href=(super::show_href(&j.bill_no, Some(&j.appid))) { (clean(&j.bill_no)) } }
                        td { (clean(&j.appid)) } td { (badge(&j.status)) } td.num { (dash(j.last_errcode)) }
                        td { @match &j.reason { Some(why) => { "skip: " (clean(why)) }, None => strong { (j.action) } } }
                    }
                }
            }
        } }
        @if v.jobs.len() > LISTED { p { "… and " (v.jobs.len() - LISTED) " more." } }
    }
}

/// The confirm step: the exact set, and a form that carries its count and digest
/// back (the server refuses the action when either changed).
pub(in crate::console) fn confirm(
    who: &Who,
    action: BulkAction,
    form: &SearchForm,
    v: &BulkView,
    digest: &str,
) -> Html<String> {
    let (title, what) = verb(action);
    let effect = match action {
        BulkAction::Retry => "pending again: the worker calls Midas again with the same bill_no, and the new final reply goes to",
        BulkAction::Republish => "their stored final replies are published again to",
    };
    let body = html! {
        h1 { (title) ": confirm" }
        p.summary { strong { (v.matched) } @if v.matched == 1 { " job matches " } @else { " jobs match " } em { (clean(&form.describe())) } "." }
        @if v.acting == 0 {
            p.message { "Nothing to do: no matching job can be " (if action == BulkAction::Retry { "retried" } else { "republished" }) " (reasons below)." }
        } @else {
            p.big {
                "This will " (what) " " strong.count { (v.acting) } " job" @if v.acting != 1 { "s" } ": "
                (effect) " " (v.reply_targets) " reply target" @if v.reply_targets != 1 { "s" } "."
                @if v.skipped > 0 { " " (v.skipped) " matching job" @if v.skipped != 1 { "s are" } @else { " is" } " skipped (reasons below)." }
            }
            form.card.confirm method="post" action="/act" {
                @if let Some(csrf) = &who.csrf { input type="hidden" name="csrf" value=(csrf); }
                input type="hidden" name="action" value=(action.name());
                input type="hidden" name="count" value=(v.acting);
                input type="hidden" name="digest" value=(digest);
                @for (k, val) in form.fields() {
                    @if !val.trim().is_empty() { input type="hidden" name=(k) value=(val.trim()); }
                }
                label for="reason" { "Why " small { "(recorded with the action)" } }
                input #reason type="text" name="reason" maxlength="200";
                div.row {
                    button.warn type="submit" {
                        @if v.acting == 1 { (title) " this job" } @else { (title) " these " (v.acting) " jobs" }
                    }
                    a.button.plain href=(search_href(&form.query())) { "Cancel" }
                }
            }
        }
        (plan_table(v))
    };
    layout(&format!("{title}: confirm"), Some(who), None, body)
}

/// What an action did.
pub(in crate::console) fn done(who: &Who, form: &SearchForm, v: &BulkView) -> Html<String> {
    let (title, _) = verb(v.action);
    let did = match v.action {
        BulkAction::Retry => "re-opened",
        BulkAction::Republish => "queued the replies of",
    };
    let body = html! {
        h1 { (title) ": done" }
        p.big.ok {
            "You " (did) " " strong { (v.acting) } " job" @if v.acting != 1 { "s" } " (" (v.reply_targets) " reply target" @if v.reply_targets != 1 { "s" } ")"
            @if v.skipped > 0 { "; " (v.skipped) " skipped" } ". "
            "Recorded as " code { (who.actor) } "; the running worker picks the change up within a few seconds."
        }
        p.actions {
            @if !form.bill_no.trim().is_empty() {
                a.button href=(super::show_href(form.bill_no.trim(), (!form.appid.trim().is_empty()).then_some(form.appid.trim()))) { "Back to the job" }
            }
            a.button.plain href=(search_href(&form.query())) { "Back to the search" }
        }
        (plan_table(v))
    };
    layout(&format!("{title}: done"), Some(who), None, body)
}
