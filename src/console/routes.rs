//! The console's routes: what each URL reads or does, on behalf of whom.
//!
//! Every handler but sign-in and the stylesheet takes a [`Who`] first (no session
//! or token: a redirect to the login form, or 401), every POST passes
//! [`Who::check_post`] (CSRF) before anything else, and every action checks the
//! operator role itself — the confirm step and export included.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, Extensions, HeaderMap, HeaderValue, StatusCode};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::{self, Who};
use super::form::SearchForm;
use super::{chart, find, open_store, pages, with_store, AppState, PageError};
use crate::cli::outbox::bulk::{self, BulkAction};
use crate::cli::outbox::export::write_rows;
use crate::cli::outbox::list::ListItem;
use crate::cli::outbox::pushes::{counts, PushView};
use crate::cli::outbox::stats::StatsView;
use crate::cli::outbox::{show, AuditError, ExportFormat};
use crate::command::{now_ms, rfc3339_ms};
use crate::outbox::operator::{JobFilter, ListRow, Stats};
use crate::outbox::pushes::PushCounts;

/// Jobs per search page.
pub const PAGE: u32 = 50;
/// How long the login form's CSRF cookie lives.
const LOGIN_FORM_TTL: Duration = Duration::from_secs(600);

const CSS: &str = include_str!("console.css");

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(overview))
        .route("/search", get(find::search))
        .route("/show", get(show_job))
        .route("/push", get(find::show_push))
        .route("/confirm", get(confirm))
        .route("/act", post(act))
        .route("/export", get(export))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/static/console.css", get(css))
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        CSS,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OverviewQuery {
    hours: String,
}

async fn overview(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<OverviewQuery>,
) -> Result<Html<String>, PageError> {
    let hours: u32 = match q.hours.as_str() {
        "1" => 1,
        "24" => 24,
        _ => 6,
    };
    let now = now_ms();
    let read = {
        // one read per OVERVIEW_TTL whatever the number of open tabs refreshing
        // (the others wait for it and share it)
        let mut cache = st.overview.lock().await;
        match cache.as_ref() {
            Some(r) if r.hours == hours && r.at.elapsed() < OVERVIEW_TTL => r.clone(),
            _ => {
                let r = read_overview(&st, hours, now).await?;
                *cache = Some(r.clone());
                r
            }
        }
    };
    let to_reconcile: Vec<ListItem> = read.unknown.into_iter().map(ListItem::from).collect();
    let mut stats = StatsView::new(read.stats, now);
    stats.pushes = counts(read.pushes);
    let slices = chart::slices(&read.rows);
    let (since, slice_ms) = (read.since, read.slice_ms);
    Ok(pages::overview(
        &who,
        &pages::Overview {
            stats: &stats,
            slices: &slices,
            since,
            slice_ms,
            hours,
            to_reconcile: &to_reconcile,
        },
    ))
}

/// The overview's numbers are read at most this often.
pub const OVERVIEW_TTL: Duration = Duration::from_secs(5);

/// What the overview read from the outbox, and when.
#[derive(Clone)]
pub(super) struct OverviewRead {
    at: Instant,
    hours: u32,
    since: i64,
    slice_ms: i64,
    stats: Stats,
    rows: Vec<(i64, String, i64)>,
    unknown: Vec<ListRow>,
    /// Push counts, as `outbox stats` reads them.
    pushes: PushCounts,
}

async fn read_overview(
    st: &Arc<AppState>,
    hours: u32,
    now: i64,
) -> Result<OverviewRead, PageError> {
    let window = i64::from(hours) * 3_600_000;
    let slice_ms = window / chart::SLICES;
    // slices on whole multiples of their length: the bars do not shift on refresh
    let end = (now / slice_ms + 1) * slice_ms;
    let since = end - window;
    let unknown = JobFilter {
        status: Some("unknown".into()),
        ..JobFilter::default()
    };
    let (stats, rows, unknown, pushes) = with_store(st, false, move |s, _| {
        Ok((
            s.stats()?,
            s.timeline(since, slice_ms)?,
            s.list(&unknown, Some(pages::RECONCILE_LISTED))?,
            s.push_counts()?,
        ))
    })
    .await?;
    Ok(OverviewRead {
        at: Instant::now(),
        hours,
        since,
        slice_ms,
        stats,
        rows,
        unknown,
        pushes,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ShowQuery {
    bill_no: String,
    appid: String,
}

async fn show_job(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<ShowQuery>,
) -> Result<Response, PageError> {
    let bill_no = q.bill_no.trim().to_string();
    if bill_no.is_empty() || bill_no.len() > 256 {
        return Ok(Redirect::to("/search").into_response());
    }
    let appid = Some(q.appid.trim().to_string()).filter(|a| !a.is_empty());
    let b = bill_no.clone();
    let r = with_store(&st, false, move |s, settings| {
        // of any app: the page names each push's app
        let pushes = s.pushes_by_key(&b, None)?;
        match show::view(s, &b, appid.as_deref(), settings, now_ms()) {
            Ok(mut v) => {
                v.pushes = pushes.into_iter().map(PushView::from).collect();
                Ok(Some(v))
            }
            // no job, but pushes under this number: their page
            Err(AuditError::UnknownBillNo { .. }) if !pushes.is_empty() => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await;
    match r {
        Ok(Some(v)) => Ok(pages::story::show(&who, &v).into_response()),
        Ok(None) => Ok(Redirect::to(&pages::push_href(&bill_no, None)).into_response()),
        // several apps use this bill_no: list its jobs, each linking to its own page
        Err(e) if e.status() == StatusCode::BAD_REQUEST => {
            let mut query = String::new();
            super::form::push_pair(&mut query, "bill_no", &bill_no);
            Ok(Redirect::to(&format!("/search?{query}")).into_response())
        }
        Err(e) => Err(e),
    }
}

fn action_of(s: &str) -> Result<BulkAction, PageError> {
    match s {
        "retry" => Ok(BulkAction::Retry),
        "republish" => Ok(BulkAction::Republish),
        _ => Err(PageError::new(
            StatusCode::BAD_REQUEST,
            "action must be retry or republish",
        )),
    }
}

/// What the CLI refuses for a set, refused here too.
fn check_set(action: BulkAction, form: &SearchForm) -> Result<(), PageError> {
    if !form.kind.trim().is_empty() || form.push_only() {
        return Err(PageError::new(
            StatusCode::BAD_REQUEST,
            "the actions act on jobs: drop kind and out_trade_no from the filter",
        ));
    }
    if form.is_empty() {
        return Err(PageError::new(
            StatusCode::BAD_REQUEST,
            "choose the jobs first: an action needs a filter (status, since, appid, bill_no, ...)",
        ));
    }
    if action == BulkAction::Republish && form.status.trim() == "pending" {
        return Err(AuditError::Refused(
            "pending jobs are not final; their replies will be published when they are".into(),
        )
        .into());
    }
    Ok(())
}

/// A digest of the job ids an action would act on: the confirm step's set,
/// compared with the set found again when the action runs.
pub fn digest(ids: &[i64]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_string().as_bytes());
        h.update(b",");
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConfirmQuery {
    action: String,
    #[serde(flatten)]
    form: SearchForm,
}

async fn confirm(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<ConfirmQuery>,
) -> Result<Html<String>, PageError> {
    who.operator()?;
    let action = action_of(&q.action)?;
    check_set(action, &q.form)?;
    let now = now_ms();
    let jf = q.form.job_filter(now)?;
    // "2h ago" would move between this page and the POST: carry the times it meant
    let mut frozen = q.form.clone();
    if let Some(s) = jf.since {
        frozen.since = rfc3339_ms(s);
    }
    if let Some(u) = jf.until {
        frozen.until = rfc3339_ms(u);
    }
    let desc = frozen.describe();
    let v = with_store(&st, false, move |s, _| {
        bulk::preview(s, action, &jf, desc, now)
    })
    .await?;
    let ids: Vec<i64> = v
        .jobs
        .iter()
        .filter(|j| j.reason.is_none())
        .map(|j| j.id)
        .collect();
    Ok(pages::story::confirm(
        &who,
        action,
        &frozen,
        &v,
        &digest(&ids),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ActForm {
    csrf: String,
    action: String,
    /// How many jobs the confirm step showed would be acted on.
    count: String,
    /// [`digest`] of their ids.
    digest: String,
    reason: String,
    #[serde(flatten)]
    form: SearchForm,
}

async fn act(
    who: Who,
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(f): Form<ActForm>,
) -> Result<Response, PageError> {
    who.check_post(&headers, Some(f.csrf.as_str()).filter(|c| !c.is_empty()))?;
    who.operator()?;
    let action = action_of(&f.action)?;
    check_set(action, &f.form)?;
    let expected: usize = f.count.trim().parse().map_err(|_| {
        PageError::new(
            StatusCode::BAD_REQUEST,
            "the form carries no count: start from the confirm step",
        )
    })?;
    let now = now_ms();
    let jf = f.form.job_filter(now)?;
    let desc = f.form.describe();
    let reason: Option<String> =
        Some(f.reason.trim().chars().take(200).collect::<String>()).filter(|r| !r.is_empty());
    let (actor, want) = (who.actor.clone(), f.digest.trim().to_string());
    let again = format!("/confirm?action={}&{}", action.name(), f.form.query());
    let v = with_store(&st, true, move |s, _| {
        bulk::apply(
            s,
            action,
            &jf,
            desc,
            &actor,
            reason.as_deref(),
            now,
            |_, ids| {
                if ids.len() == expected && digest(ids) == want {
                    Ok(())
                } else {
                    Err(AuditError::Refused(format!(
                        "the set changed since you confirmed it: {} job{} would be acted on now, you confirmed {expected}; nothing was changed — look again",
                        ids.len(),
                        if ids.len() == 1 { "" } else { "s" }
                    )))
                }
            },
        )
    })
    .await;
    let v = match v {
        Ok(v) => v,
        // refused (the set changed, or a job changed under the action): look again
        Err(e) if e.status() == StatusCode::CONFLICT => {
            return Ok((
                StatusCode::CONFLICT,
                pages::error_with(
                    StatusCode::CONFLICT,
                    e.message(),
                    Some((&again, "Look again")),
                ),
            )
                .into_response())
        }
        Err(e) => return Err(e),
    };
    tracing::info!(
        actor = %who.actor,
        action = action.name(),
        filter = %f.form.describe(),
        jobs = v.acting,
        "console: operator action"
    );
    Ok(pages::story::done(&who, &f.form, &v).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ExportQuery {
    format: String,
    #[serde(flatten)]
    form: SearchForm,
}

/// Chunks of the export, handed from the blocking writer to the response body (an
/// `Err` ends the body unfinished, so a client never takes a cut export for whole).
struct Chunks(tokio::sync::mpsc::Sender<io::Result<Bytes>>);

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader left"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn export(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, PageError> {
    who.operator()?;
    let (format, ext, mime) = match q.format.as_str() {
        "csv" => (ExportFormat::Csv, "csv", "text/csv; charset=utf-8"),
        "" | "jsonl" => (
            ExportFormat::Jsonl,
            "jsonl",
            "application/jsonl; charset=utf-8",
        ),
        _ => {
            return Err(PageError::new(
                StatusCode::BAD_REQUEST,
                "format must be csv or jsonl",
            ))
        }
    };
    let jf = q.form.job_filter(now_ms())?;
    // opened first, so a missing outbox is an error page, not an empty file
    let (store, slot) = open_store(&st, false).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    let filter = q.form.describe();
    tracing::info!(actor = %who.actor, filter = %filter, format = ext, "console: export");
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut out = Chunks(tx.clone());
        match write_rows(&store, &jf, format, &mut out) {
            Ok(()) => {}
            Err(AuditError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                tracing::warn!(error = %e, "console: export stopped");
                let _ = tx.blocking_send(Err(io::Error::other("the export stopped")));
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let name = format!("midas-jobs-{}.{ext}", now_ms() / 1000);
    Ok((
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LoginQuery {
    next: String,
}

/// The login form, with a CSRF token bound to a short-lived cookie.
fn login_page(
    headers: &HeaderMap,
    next: &str,
    problem: Option<&str>,
    status: StatusCode,
) -> Response {
    let csrf = auth::random_token();
    (
        status,
        AppendHeaders([(
            header::SET_COOKIE,
            auth::set_cookie(headers, auth::LOGIN_COOKIE, &csrf, "/login", LOGIN_FORM_TTL),
        )]),
        pages::login(&csrf, auth::safe_next(next), problem),
    )
        .into_response()
}

async fn login_form(headers: HeaderMap, Query(q): Query<LoginQuery>) -> Response {
    login_page(&headers, &q.next, None, StatusCode::OK)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LoginForm {
    csrf: String,
    name: String,
    token: String,
    next: String,
}

async fn login(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    ext: Extensions,
    Form(f): Form<LoginForm>,
) -> Result<Response, PageError> {
    auth::same_origin(&headers)?;
    let client = super::client_addr(&ext);
    if let Err(e) = st.may_sign_in(client) {
        // the form again, saying why and for how long; the token is not compared
        let mut r = login_page(&headers, &f.next, Some(e.message()), e.status());
        if let Some(wait) = e.retry_after() {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
        }
        return Ok(r);
    }
    let bound = auth::cookie(&headers, auth::LOGIN_COOKIE).unwrap_or("");
    if bound.is_empty() || f.csrf.is_empty() || bound != f.csrf {
        return Ok(login_page(
            &headers,
            &f.next,
            Some("The sign-in form expired; please sign in again."),
            StatusCode::FORBIDDEN,
        ));
    }
    let Some(role) = st.tokens.role_of(f.token.trim()) else {
        tracing::warn!("console: sign-in refused (token not accepted)");
        st.sign_in_failed(client);
        return Ok(login_page(
            &headers,
            &f.next,
            Some("That token is not accepted."),
            StatusCode::UNAUTHORIZED,
        ));
    };
    let actor = auth::actor(&f.name, role);
    let (id, _) = st.sessions.open(role, f.name.trim().to_string());
    tracing::info!(actor = %actor, role = role.name(), "console: signed in");
    Ok((
        AppendHeaders([
            (
                header::SET_COOKIE,
                auth::set_cookie(&headers, auth::SESSION_COOKIE, &id, "/", auth::SESSION_TTL),
            ),
            (
                header::SET_COOKIE,
                auth::set_cookie(&headers, auth::LOGIN_COOKIE, "", "/login", Duration::ZERO),
            ),
        ]),
        Redirect::to(auth::safe_next(&f.next)),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    who: Who,
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    who.check_post(&headers, Some(f.csrf.as_str()).filter(|c| !c.is_empty()))?;
    if let Some(id) = &who.session {
        st.sessions.close(id);
    }
    Ok((
        AppendHeaders([(
            header::SET_COOKIE,
            auth::set_cookie(&headers, auth::SESSION_COOKIE, "", "/", Duration::ZERO),
        )]),
        Redirect::to("/login"),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_depends_on_every_id_and_their_order() {
        assert_eq!(digest(&[1, 2, 3]), digest(&[1, 2, 3]));
        assert_ne!(digest(&[1, 2, 3]), digest(&[1, 2, 4]));
        assert_ne!(digest(&[1, 23]), digest(&[12, 3]));
        assert_eq!(digest(&[]).len(), 32);
    }
}
