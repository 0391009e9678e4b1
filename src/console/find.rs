//! The console's read routes that find things: the search (a table of jobs and one
//! of WeChat payment pushes, the filter in the URL) and a push's page. They read
//! through the operator store's list, count and push reads, as `outbox list`,
//! `outbox list --kind` and `outbox show` do.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::Who;
use super::form::SearchForm;
use super::routes::PAGE;
use super::{pages, with_store, AppState, PageError};
use crate::cli::outbox::list::ListItem;
use crate::cli::outbox::pushes::PushView;
use crate::command::now_ms;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SearchQuery {
    #[serde(flatten)]
    form: SearchForm,
    /// The page cursor: jobs older than this id.
    before: String,
    /// The pushes' page cursor: pushes stored before this id.
    pushes_before: String,
}

fn cursor(s: &str, what: &str) -> Result<Option<i64>, PageError> {
    match s.trim() {
        "" => Ok(None),
        b => b
            .parse::<i64>()
            .map(Some)
            .map_err(|_| PageError::new(StatusCode::BAD_REQUEST, format!("{what} must be an id"))),
    }
}

pub(super) async fn search(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<SearchQuery>,
) -> Result<Html<String>, PageError> {
    let now = now_ms();
    let (show_jobs, show_pushes) = q.form.shows()?;
    let all = q.form.job_filter(now)?;
    let mut page = all.clone();
    page.before_id = cursor(&q.before, "before")?;
    let mut pf = q.form.push_filter(now)?;
    pf.before_id = cursor(&q.pushes_before, "pushes_before")?;
    let paged = page.before_id.is_some() || pf.before_id.is_some();
    let (mut rows, total, mut pushes) = with_store(&st, false, move |s, _| {
        let (rows, total) = if show_jobs {
            (s.list(&page, Some(PAGE + 1))?, s.count(&all)?)
        } else {
            (Vec::new(), 0)
        };
        let pushes = if show_pushes {
            s.pushes(&pf, Some(PAGE + 1), true)?
        } else {
            Vec::new()
        };
        Ok((rows, total, pushes))
    })
    .await?;
    let more = rows.len() > PAGE as usize;
    rows.truncate(PAGE as usize);
    let older = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    let more_pushes = pushes.len() > PAGE as usize;
    pushes.truncate(PAGE as usize);
    let older_pushes = if more_pushes {
        pushes.last().map(|r| r.id)
    } else {
        None
    };
    let items: Vec<ListItem> = rows.into_iter().map(ListItem::from).collect();
    let pushes: Vec<PushView> = pushes.into_iter().map(PushView::from).collect();
    Ok(pages::search(
        &who,
        &pages::Results {
            form: &q.form,
            jobs: show_jobs,
            items: &items,
            total,
            older,
            paged,
            pushes: show_pushes.then_some(pushes.as_slice()),
            older_pushes,
        },
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PushQuery {
    /// An OutTradeNo or RefundId.
    key: String,
    appid: String,
}

/// The pushes stored under an OutTradeNo or RefundId (what `outbox show KEY`
/// prints of them), and whether jobs use it as their bill_no.
pub(super) async fn show_push(
    who: Who,
    State(st): State<Arc<AppState>>,
    Query(q): Query<PushQuery>,
) -> Result<Response, PageError> {
    let key = q.key.trim().to_string();
    if key.is_empty() || key.len() > 256 {
        return Ok(Redirect::to("/search?kind=pushes").into_response());
    }
    let appid = Some(q.appid.trim().to_string()).filter(|a| !a.is_empty());
    let k = key.clone();
    let (pushes, jobs) = with_store(&st, false, move |s, _| {
        let pushes = s.pushes_by_key(&k, appid.as_deref())?;
        // jobs of any app with this bill_no (the job page names their apps)
        let jobs = s.read()?.jobs_by_bill_no(&k, None)?.len();
        Ok((pushes, jobs))
    })
    .await?;
    if pushes.is_empty() {
        return Err(PageError::new(
            StatusCode::NOT_FOUND,
            format!("no WeChat payment push has OutTradeNo or RefundId {key}"),
        ));
    }
    let pushes: Vec<PushView> = pushes.into_iter().map(PushView::from).collect();
    Ok(pages::push::show(&who, &key, &pushes, jobs).into_response())
}
