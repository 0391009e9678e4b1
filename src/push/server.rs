//! The push listener (`[push] listen`): `GET /wechat/push/{appid}` answers the URL
//! check, `POST /wechat/push/{appid}` takes a push. It faces the internet, so it
//! is a listener of its own (the ops port stays private) with connection limits
//! ([`super::limits`]), a body cap (`push.max_body_bytes`, refused unread past
//! it) and a deadline: a push is answered within [`ANSWER_WITHIN`] — WeChat
//! gives 3 s — whatever the outbox does.
//!
//! Success (`{"ErrCode":0,"ErrMsg":"Success"}`) is answered only after the push is
//! verified and its row committed (a repeat: after the existing row is found);
//! any failure is a non-zero `ErrCode` (WeChat pushes again), counted in
//! `/metrics`, with nothing stored. Publishing is the relay's business: the answer
//! never waits for the broker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query as QueryExt, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::PUSH_METRICS;
use super::relay::Handover;
use super::{Kind, PushApp, Query, Reason, Verdict};
use crate::command::{now_ms, rfc3339_ms};
use crate::http::serve::Limits;
use crate::outbox::pushes::{NewPush, PushStored, UnpublishedEvent};
use crate::outbox::Outbox;

/// Pushes answered within this long (the store's deadline; WeChat waits 3 s).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(2500);

/// The listener's connection limits: the ops port's, with more connections (WeChat
/// pushes from many addresses at once).
pub const LIMITS: Limits = Limits {
    max_connections: 256,
    ..Limits::OPS
};

#[derive(Clone)]
struct St {
    apps: Arc<HashMap<String, PushApp>>,
    outbox: Outbox,
    relay: Handover,
    max_body: usize,
    simulated: bool,
}

/// What the listener needs.
pub struct PushService {
    pub apps: Vec<PushApp>,
    pub outbox: Outbox,
    pub relay: Handover,
    pub max_body_bytes: usize,
    /// The worker runs against the simulator: events say `simulated: true`.
    pub simulated: bool,
}

pub fn router(s: PushService) -> Router {
    let st = St {
        apps: Arc::new(s.apps.into_iter().map(|a| (a.appid.clone(), a)).collect()),
        outbox: s.outbox,
        relay: s.relay,
        max_body: s.max_body_bytes,
        simulated: s.simulated,
    };
    Router::new()
        .route("/wechat/push/{appid}", get(url_check).post(push))
        .with_state(st)
}

/// Serve on `addr` until `shutdown`; the bound address.
pub async fn serve(
    addr: SocketAddr,
    s: PushService,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(s);
    let h = tokio::spawn(crate::http::serve::serve(listener, app, LIMITS, shutdown));
    Ok((bound, h))
}

fn answer(code: i64, msg: &str) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "ErrCode": code, "ErrMsg": msg }).to_string(),
    )
        .into_response()
}

fn success() -> Response {
    answer(0, "Success")
}

/// A refusal: counted, logged without secrets, answered with its ErrCode.
fn refuse(appid: &str, kind: Option<Kind>, r: Reason) -> Response {
    let label = r.label();
    PUSH_METRICS.push(kind.map_or("unknown", Kind::as_str), label);
    let shown: String = appid.chars().take(64).collect();
    tracing::warn!(appid = %shown, reason = label, "push refused");
    let code = r.errcode();
    let msg = match r {
        Reason::NotStored => "internal error".to_string(),
        other => other.to_string(),
    };
    answer(code, &msg)
}

async fn url_check(
    State(st): State<St>,
    Path(appid): Path<String>,
    q: Result<QueryExt<Query>, QueryRejection>,
) -> Response {
    let Some(app) = st.apps.get(&appid) else {
        return refuse(&appid, None, Reason::UnknownApp);
    };
    let q = q.map(|q| q.0).unwrap_or_default();
    match super::url_check(app, &q) {
        Ok(echo) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], echo).into_response(),
        Err(r) => refuse(&appid, None, r),
    }
}

async fn push(
    State(st): State<St>,
    Path(appid): Path<String>,
    q: Result<QueryExt<Query>, QueryRejection>,
    req: Request,
) -> Response {
    let Some(app) = st.apps.get(&appid) else {
        return refuse(&appid, None, Reason::UnknownApp);
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_body as u64) {
        return refuse(&appid, None, Reason::TooLarge);
    }
    let body = match axum::body::to_bytes(req.into_body(), st.max_body).await {
        Ok(b) => b,
        Err(_) => return refuse(&appid, None, Reason::TooLarge),
    };
    let q = q.map(|q| q.0).unwrap_or_default();
    let now = now_ms();
    let verdict = match super::receive(app, &q, &body, &rfc3339_ms(now), st.simulated) {
        Ok(v) => v,
        Err(r) => return refuse(&appid, None, r),
    };
    let v = match verdict {
        Verdict::Mock(kind) => {
            PUSH_METRICS.push(kind.as_str(), "mock");
            tracing::info!(appid = %appid, kind = kind.as_str(), "mock push answered; nothing delivered");
            return success();
        }
        Verdict::Event(v) => v,
    };
    let kind = v.kind;
    let row = NewPush {
        appid: v.appid,
        kind: kind.as_str(),
        dedup_key: v.dedup_key,
        event: v.event,
        event_id: v.event_id.clone(),
        openid: v.openid,
        out_trade_no: v.out_trade_no,
        env: v.env,
        message: v.message.clone(),
        now,
    };
    match tokio::time::timeout(ANSWER_WITHIN, st.outbox.store_push(row)).await {
        Ok(Ok(PushStored::New { id })) => {
            PUSH_METRICS.push(kind.as_str(), "stored");
            st.relay.fresh(UnpublishedEvent {
                id,
                event_id: v.event_id,
                message: Arc::from(v.message.into_bytes()),
            });
            success()
        }
        Ok(Ok(PushStored::Repeat { .. })) => {
            PUSH_METRICS.push(kind.as_str(), "repeat");
            success()
        }
        Ok(Err(e)) if e.trouble().is_some() => {
            // the writer logs the episode once (outbox::health)
            tracing::debug!(error = %e, "the outbox cannot write; push answered failure (WeChat pushes again)");
            refuse(&appid, Some(kind), Reason::NotStored)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot store a push; answered failure (WeChat pushes again)");
            refuse(&appid, Some(kind), Reason::NotStored)
        }
        Err(_) => {
            tracing::error!("storing a push took too long; answered failure (WeChat pushes again)");
            refuse(&appid, Some(kind), Reason::NotStored)
        }
    }
}
