//! The console's pages, as `maud` templates (checked when the crate compiles, every
//! value HTML-escaped): the frame every page shares, sign-in, errors, the overview
//! and the search. A job's story and the action pages are in [`story`], a push's
//! page in [`push`].
//!
//! No page carries a script, an inline style or anything from another origin; each
//! reads on a phone (one column, tables scroll sideways inside their box).

pub(super) mod push;
pub(super) mod story;

use axum::http::StatusCode;
use axum::response::Html;
use maud::{html, Markup, DOCTYPE};

use super::auth::{Role, Who};
use super::chart::{self, Slice};
use super::form::SearchForm;
use crate::cli::outbox::fmt::{age, clean, dash, rfc3339_s};
use crate::cli::outbox::list::ListItem;
use crate::cli::outbox::pushes::{PushView, PUSH_KINDS};
use crate::cli::outbox::stats::StatsView;
use crate::cli::outbox::{OPS, STATES};
use crate::command::now_ms;

/// The newest `unknown` jobs listed on the overview.
pub const RECONCILE_LISTED: u32 = 10;

/// The overview reloads itself this often (seconds).
pub const REFRESH_SECS: u32 = 30;

/// Every page: the header (what the console is, where to go, who is signed in)
/// and `body`.
pub(super) fn layout(
    title: &str,
    who: Option<&Who>,
    refresh: Option<u32>,
    body: Markup,
) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    @if let Some(s) = refresh {
                        meta http-equiv="refresh" content=(s);
                    }
                    title { (title) " · midas-worker console" }
                    link rel="stylesheet" href=(concat!("/static/console.css?v=", env!("CARGO_PKG_VERSION")));
                }
                body {
                    header.top {
                        a.brand href="/" { "midas-worker" }
                        @if let Some(w) = who {
                            nav {
                                a href="/" { "Overview" }
                                a href="/search" { "Search" }
                            }
                            span.who {
                                (w.actor) " · " (w.role.name())
                                @if let Some(csrf) = &w.csrf {
                                    form.inline method="post" action="/logout" {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button.link type="submit" { "Sign out" }
                                    }
                                }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

/// A status as a coloured label.
pub(super) fn badge(state: &str) -> Markup {
    let known = STATES.contains(&state);
    html! {
        span class=(format!("badge s-{}", if known { state } else { "other" })) { (state) }
    }
}

/// A link to a search (`query` without `?`).
pub(super) fn search_href(query: &str) -> String {
    if query.is_empty() {
        "/search".into()
    } else {
        format!("/search?{query}")
    }
}

/// The link to a job's story.
pub(super) fn show_href(bill_no: &str, appid: Option<&str>) -> String {
    let mut q = String::new();
    super::form::push_pair(&mut q, "bill_no", bill_no);
    if let Some(a) = appid {
        super::form::push_pair(&mut q, "appid", a);
    }
    format!("/show?{q}")
}

/// The link to the pushes of an OutTradeNo or RefundId.
pub(super) fn push_href(key: &str, appid: Option<&str>) -> String {
    let mut q = String::new();
    super::form::push_pair(&mut q, "key", key);
    if let Some(a) = appid {
        super::form::push_pair(&mut q, "appid", a);
    }
    format!("/push?{q}")
}

pub(super) fn error(status: StatusCode, message: &str) -> Html<String> {
    error_with(status, message, None)
}

/// An error page, with a link to try again (`(href, label)`) when there is one.
pub(super) fn error_with(
    status: StatusCode,
    message: &str,
    again: Option<(&str, &str)>,
) -> Html<String> {
    let auth = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    layout(
        status.canonical_reason().unwrap_or("Error"),
        None,
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
            p.message { (clean(message)) }
            @if let Some((href, label)) = again {
                p { a.button href=(href) { (label) } }
            }
            p {
                a href="/" { "Overview" }
                @if auth { " · " a href="/login" { "Sign in" } }
            }
        },
    )
}

pub(super) fn login(csrf: &str, next: &str, problem: Option<&str>) -> Html<String> {
    layout(
        "Sign in",
        None,
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(p) = problem {
                p.message { (p) }
            }
            form.card.login method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="name" { "Your name " small { "(recorded with what you do)" } }
                input #name type="text" name="name" maxlength="64" autocomplete="username";
                label for="token" { "Token" }
                input #token type="password" name="token" required autocomplete="current-password";
                button type="submit" { "Sign in" }
            }
            p.hint { "The viewer token reads; the operator token may also retry, republish and export." }
        },
    )
}

/// A quick search for one bill_no or OutTradeNo: the jobs whose bill_no starts
/// with it, and the pushes stored under it (the search's `find` field).
fn find_bill_no() -> Markup {
    html! {
        form.find method="get" action="/search" {
            label for="find" { "Find a bill_no or OutTradeNo" }
            div.row {
                input #find type="search" name="find" placeholder="bill_no (or its start), OutTradeNo, RefundId" required;
                button type="submit" { "Find" }
            }
        }
    }
}

/// The WeChat payment pushes (the numbers `outbox stats` prints): how many of
/// each kind, and how many events the broker has not confirmed yet.
fn pushes_overview(s: &StatsView) -> Markup {
    let of = |k: &str| s.pushes.iter().find(|p| p.kind == k);
    let unconfirmed: i64 = s.pushes.iter().map(|p| p.events_unconfirmed).sum();
    let total: i64 = s
        .pushes
        .iter()
        .map(|p| p.events_confirmed + p.events_unconfirmed)
        .sum();
    html! {
        section.card.pushes {
            h2 { "WeChat payment pushes" }
            dl {
                dt { a href="/search?kind=pushes" { "all pushes" } } dd { (total) }
                @for k in PUSH_KINDS {
                    dt { a href=(search_href(&format!("kind={k}"))) { (k) } }
                    dd { (of(k).map_or(0, |p| p.events_confirmed + p.events_unconfirmed)) }
                }
                dt { "events not confirmed by the broker" }
                dd { (unconfirmed) " " small { "(the worker publishes them until the broker confirms)" } }
            }
        }
    }
}

pub(super) struct Overview<'a> {
    pub stats: &'a StatsView,
    pub slices: &'a [Slice],
    pub since: i64,
    pub slice_ms: i64,
    pub hours: u32,
    /// The newest `unknown` jobs (at most [`RECONCILE_LISTED`]).
    pub to_reconcile: &'a [ListItem],
}

pub(super) fn overview(who: &Who, o: &Overview<'_>) -> Html<String> {
    let s = o.stats;
    let count =
        |m: &std::collections::BTreeMap<&'static str, i64>, k: &str| m.get(k).copied().unwrap_or(0);
    let body = html! {
        h1 { "Overview" }
        (find_bill_no())
        section.cards {
            a.card.stat href="/search" { span.n { (s.jobs) } span.l { "jobs in the outbox" } }
            @for st in STATES {
                a class=(format!("card stat s-{st}")) href=(search_href(&format!("status={st}"))) {
                    span.n { (count(&s.by_status, st)) } span.l { (st) }
                }
            }
        }
        section.card.attention {
            h2 { "To reconcile" }
            @if s.unknown == 0 {
                p { "No job ended " (badge("unknown")) ": nothing to reconcile." }
            } @else {
                p {
                    strong { (s.unknown) } " job" @if s.unknown != 1 { "s" } " ended " (badge("unknown"))
                    ": Midas never answered definitively. Check them with Midas, or retry them with the same bill_no inside the 48 h window."
                }
                div.scroll {
                    table.jobs {
                        thead { tr { th { "received (UTC)" } th { "op" } th { "bill_no" } th { "openid" } th { "attempts" } th { "last errcode" } } }
                        tbody {
                            @for j in o.to_reconcile {
                                tr {
                                    td.nowrap { (rfc3339_s(j.received_at_ms)) }
                                    td { (j.op) }
                                    td { a href=(show_href(&j.bill_no, Some(&j.appid))) { (clean(&j.bill_no)) } }
                                    td { (clean(&j.openid)) }
                                    td.num { (j.attempts) }
                                    td.num { (dash(j.last_errcode)) }
                                }
                            }
                        }
                    }
                }
                @if s.unknown > o.to_reconcile.len() as i64 {
                    p.hint { "The newest " (o.to_reconcile.len()) " of " (s.unknown) "." }
                }
                p.actions {
                    a.button href="/search?status=unknown" { "List them" }
                    @if who.role == Role::Operator {
                        a.button.warn href="/confirm?action=retry&status=unknown" { "Retry all unknown…" }
                    }
                }
            }
        }
        section.grid2 {
            div.card {
                h2 { "Oldest pending job" }
                @match &s.oldest_pending {
                    Some(p) => p {
                        a href=(show_href(&p.bill_no, None)) { (clean(&p.bill_no)) } " (" (p.op) "), received "
                        (rfc3339_s(p.received_at_ms)) " UTC, " strong { (age(p.age_seconds.saturating_mul(1000))) " ago" }
                    },
                    None => p { "None: every job is final." },
                }
            }
            div.card {
                h2 { "Replies" }
                dl {
                    dt { "not confirmed by the broker" } dd { (s.replies_unconfirmed) " " small { "(of final jobs; the worker re-publishes them)" } }
                    dt { "waiting for their job" } dd { (s.replies_awaiting_result) }
                    dt { "returned (no such queue)" } dd { (s.replies_returned) }
                }
            }
            div.card {
                h2 { "Jobs by op" }
                dl {
                    @for op in OPS {
                        dt { a href=(search_href(&format!("op={op}"))) { (op) } } dd { (count(&s.by_op, op)) }
                    }
                }
            }
            div.card {
                h2 { "Attempts per final job" }
                @match (s.attempts_per_final_job.p50, s.attempts_per_final_job.p99) {
                    (Some(p50), Some(p99)) => p { "p50 " strong { (p50) } ", p99 " strong { (p99) } " over " (s.attempts_per_final_job.jobs) " final jobs" },
                    _ => p { "No final jobs yet." },
                }
            }
        }
        (pushes_overview(s))
        section.card {
            h2 { "Jobs received, last " (o.hours) " h" }
            p.windows {
                @for h in [1u32, 6, 24] {
                    @if h == o.hours { strong { (h) " h" } } @else { a href=(format!("/?hours={h}")) { (h) " h" } }
                    " "
                }
            }
            (chart::render(o.slices, o.since, o.slice_ms))
            p.legend {
                span.key.s-succeeded { "succeeded" } span.key.s-pending { "pending" }
                span.key.s-failed { "failed" } span.key.s-unknown { "unknown" }
                span.key.rate { "share failed or unknown (right axis)" }
            }
        }
        p.hint { "As of " (rfc3339_s(now_ms())) " UTC; this page refreshes every " (REFRESH_SECS) " s." }
    };
    layout("Overview", Some(who), Some(REFRESH_SECS), body)
}

pub(super) struct Results<'a> {
    pub form: &'a SearchForm,
    /// Whether the filter selects jobs (`items`, `total`, `older` are theirs).
    pub jobs: bool,
    pub items: &'a [ListItem],
    pub total: i64,
    /// The cursor of the next (older) page, if there is one.
    pub older: Option<i64>,
    /// Whether this is a later page.
    pub paged: bool,
    /// The pushes' page, when the filter selects pushes.
    pub pushes: Option<&'a [PushView]>,
    /// The cursor of the pushes' next (older) page.
    pub older_pushes: Option<i64>,
}

fn select(name: &str, label: &str, options: &[&str], current: &str) -> Markup {
    html! {
        label for=(name) { (label) }
        select id=(name) name=(name) {
            option value="" selected[current.is_empty()] { "any" }
            @for o in options {
                option value=(o) selected[current == *o] { (o) }
            }
        }
    }
}

fn text_field(name: &str, label: &str, value: &str, hint: &str) -> Markup {
    html! {
        label for=(name) { (label) }
        input id=(name) type="text" name=(name) value=(value) placeholder=(hint) maxlength="256";
    }
}

/// The `kind` choices (`outbox list --kind`).
const KINDS: [&str; 5] = [
    "jobs",
    "pushes",
    "coins_delivered",
    "goods_delivered",
    "refunded",
];

/// The search form (GET: the filter goes in the URL).
fn filter_form(f: &SearchForm) -> Markup {
    html! {
        form.card.filters method="get" action="/search" {
            div.fields {
                div { (text_field("bill_no_prefix", "bill_no starts with", &f.bill_no_prefix, "")) }
                div { (text_field("openid", "openid", &f.openid, "")) }
                div { (text_field("appid", "appid", &f.appid, "")) }
                div { (select("status", "status", &STATES, &f.status)) }
                div { (select("op", "op", &OPS, &f.op)) }
                div { (select("kind", "jobs or pushes", &KINDS, &f.kind)) }
                div { (text_field("out_trade_no", "OutTradeNo (pushes)", &f.out_trade_no, "or RefundId, exactly")) }
                div { (text_field("errcode", "last errcode", &f.errcode, "-1, 90013")) }
                div { (text_field("since", "received since", &f.since, "2h, 2026-05-01T10:00:00Z")) }
                div { (text_field("until", "received before", &f.until, "30m, 2026-05-01")) }
            }
            @if !f.bill_no.trim().is_empty() {
                input type="hidden" name="bill_no" value=(f.bill_no);
            }
            @if !f.find.trim().is_empty() {
                input type="hidden" name="find" value=(f.find);
            }
            div.row {
                button type="submit" { "Search" }
                a.button.plain href="/search" { "Clear" }
            }
        }
    }
}

pub(super) fn search(who: &Who, r: &Results<'_>) -> Html<String> {
    let q = r.form.query();
    let with = |extra: &str| {
        if q.is_empty() {
            extra.to_string()
        } else {
            format!("{extra}&{q}")
        }
    };
    let body = html! {
        h1 { "Search" }
        (filter_form(r.form))
        @if r.jobs {
            p.summary {
                strong { (r.total) } @if r.total == 1 { " job matches " } @else { " jobs match " } em { (clean(&r.form.describe())) }
                @if r.paged { " · older page" }
            }
            @if who.role == Role::Operator && r.total > 0 && r.form.kind.trim().is_empty() && !r.form.push_only() {
                p.actions {
                    // an action needs a filter (as `outbox retry` does): not on "every job"
                    @if !r.form.is_empty() {
                        a.button href=(format!("/confirm?{}", with("action=retry"))) { "Retry these…" }
                        a.button href=(format!("/confirm?{}", with("action=republish"))) { "Republish these…" }
                    }
                    a.button.plain href=(format!("/export?{}", with("format=csv"))) { "Export CSV" }
                    a.button.plain href=(format!("/export?{}", with("format=jsonl"))) { "Export JSON lines" }
                }
            }
            @if !r.items.is_empty() {
                div.scroll {
                    table.jobs {
                        thead { tr {
                            th { "received (UTC)" } th { "op" } th { "bill_no" } th { "openid" } th { "appid" }
                            th { "status" } th { "attempts" } th { "last errcode" } th { "reply" }
                        } }
                        tbody {
                            @for j in r.items {
                                tr {
                                    td.nowrap { (rfc3339_s(j.received_at_ms)) }
                                    td { (j.op) }
                                    td { a href=(show_href(&j.bill_no, Some(&j.appid))) { (clean(&j.bill_no)) } }
                                    td { (clean(&j.openid)) }
                                    td { (clean(&j.appid)) }
                                    td { (badge(&j.status)) }
                                    td.num { (j.attempts) }
                                    td.num { (dash(j.last_errcode)) }
                                    td {
                                        @if j.replies == 0 { "-" } @else {
                                            "confirmed " (j.replies_confirmed) "/" (j.replies)
                                            @if j.replies_returned > 0 { " (" (j.replies_returned) " returned: no such queue)" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p.pager {
                @if r.paged { a.button.plain href=(search_href(&q)) { "← Newest" } }
                @if let Some(before) = r.older { a.button.plain href=(search_href(&with(&format!("before={before}")))) { "Older jobs →" } }
            }
        }
        @if let Some(pushes) = r.pushes {
            (pushes_table(&q, pushes, r.older_pushes, r.paged))
        }
    };
    layout("Search", Some(who), None, body)
}

/// The pushes a search found (newest first), with their own pager.
fn pushes_table(q: &str, pushes: &[PushView], older: Option<i64>, paged: bool) -> Markup {
    let with = |extra: &str| {
        if q.is_empty() {
            extra.to_string()
        } else {
            format!("{extra}&{q}")
        }
    };
    html! {
        h2 { "WeChat payment pushes" }
        p.summary {
            @if pushes.is_empty() { "No push matches." } @else {
                strong { (pushes.len()) } @if older.is_some() { " newest" } " push" @if pushes.len() != 1 { "es" }
                @if older.is_some() { " listed; older ones on the next page" }
            }
        }
        @if !pushes.is_empty() {
            div.scroll {
                table.pushes {
                    thead { tr {
                        th { "received (UTC)" } th { "kind" } th { "OutTradeNo / RefundId" } th { "openid" } th { "appid" }
                        th { "repeats" } th { "event" }
                    } }
                    tbody {
                        @for p in pushes {
                            tr {
                                td.nowrap { (p.received_at) }
                                td { (clean(&p.kind)) }
                                td { a href=(push_href(&p.dedup_key, Some(&p.appid))) { (clean(&p.dedup_key)) } }
                                td { (p.openid.as_deref().map_or("-".into(), clean)) }
                                td { (clean(&p.appid)) }
                                td.num { (p.repeats) }
                                td class=(if p.published_at.is_some() { "ok" } else { "warn" }) {
                                    @if p.published_at.is_some() { "confirmed" } @else { "NOT YET confirmed" }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.pager {
            @if paged { a.button.plain href=(search_href(q)) { "← Newest" } }
            @if let Some(before) = older { a.button.plain href=(search_href(&with(&format!("pushes_before={before}")))) { "Older pushes →" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_outside_are_escaped() {
        let html = error(StatusCode::BAD_REQUEST, "<script>alert(1)</script>").0;
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        let b = badge("\"><img src=x onerror=alert(1)>").into_string();
        assert!(!b.contains("<img"), "{b}");
        assert!(show_href("a&b=<c>", None).ends_with("bill_no=a%26b%3D%3Cc%3E"));
    }
}
