//! The operator console: the outbox in a browser, for support people and operators
//! (docs/console.md). `midas-worker console --listen ADDR` serves it on its own; `run`
//! serves it beside the worker when `[console] listen` is set.
//!
//! It reads and acts on the outbox only through the operator store
//! ([`crate::outbox::store::Store`], SQLite or PostgreSQL alike) and through the
//! same code as the `outbox` verbs (`crate::cli::outbox`): the job page is the view
//! `outbox show` prints, the confirm step is the plan `retry`/`republish` print
//! before `--yes`, an action is the same transaction, recorded in
//! `operator_actions` with the user's name, and export writes what `outbox export`
//! writes. Nothing here holds SQL, and nothing here reads a secret: the store never
//! selects `session_key`, and free text is scrubbed as the verbs scrub it.
//!
//! Pages are HTML rendered on the server with `maud` (checked at compile time,
//! escaped by default), a small stylesheet compiled into the binary, no script at
//! all, and a Content-Security-Policy that allows nothing else. Requests get the
//! ops port's limits (`crate::http`: connection limit, read and write deadlines,
//! handler timeout) and a small body cap. Who may do what is [`auth`]; how many
//! failed sign-ins a client address (and everyone together) may make is [`limit`].

pub mod auth;
pub mod chart;
mod find;
pub mod form;
pub mod limit;
mod pages;
mod routes;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::cli::outbox::AuditError;
use crate::config::Settings;
use crate::outbox::store::Store;
use crate::outbox::Location;
pub use auth::{ConsoleError, Role, Tokens};

/// The largest request body accepted (a form of filters, a token, a name).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Outbox reads or writes running at once; more wait (each is a blocking call on
/// a connection of its own).
pub const MAX_DB_WORK: usize = 4;

/// The Content-Security-Policy of every response: nothing but this site's own
/// stylesheet and forms; no script, no frame, no other origin.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

/// What every handler shares.
pub struct AppState {
    pub settings: Arc<Settings>,
    location: Location,
    tokens: Tokens,
    sessions: auth::Sessions,
    db_slots: Arc<Semaphore>,
    /// The overview's last read ([`routes::OVERVIEW_TTL`]).
    overview: tokio::sync::Mutex<Option<routes::OverviewRead>>,
    /// Failed sign-ins of the last minute ([`limit`]).
    failed_logins: Mutex<limit::FailedLogins>,
}

impl AppState {
    fn failed_logins(&self) -> std::sync::MutexGuard<'_, limit::FailedLogins> {
        self.failed_logins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refused (429) while `client`'s failed sign-ins, or everyone's, are at their
    /// limit: the token is then not even compared.
    fn may_sign_in(&self, client: IpAddr) -> Result<(), PageError> {
        match self.failed_logins().check(client, Instant::now()) {
            limit::Verdict::Allow => Ok(()),
            limit::Verdict::Refuse { scope, retry_after } => {
                Err(PageError::too_many(scope, retry_after))
            }
        }
    }

    /// A sign-in from `client` presented a token that is not accepted.
    fn sign_in_failed(&self, client: IpAddr) {
        let v = self.failed_logins().failed(client, Instant::now());
        if let limit::Verdict::Refuse { scope, retry_after } = v {
            tracing::warn!(
                client = %client,
                everyone = scope == limit::Scope::Everyone,
                seconds = retry_after.as_secs(),
                "console: too many failed sign-ins; refusing sign-ins for a while"
            );
        }
    }
}

/// The client address of a request: the TCP peer, which [`crate::http::serve`]
/// puts in every request's extensions (behind a reverse proxy, the proxy's
/// address); `0.0.0.0` when it is not there.
pub(crate) fn client_addr(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// A page that could not be served: its status and a message for the user.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
    /// Sign in first, then go back to this path.
    login_next: Option<String>,
    /// 429: the `Retry-After` header.
    retry_after: Option<Duration>,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> PageError {
        PageError {
            status,
            message: message.into(),
            login_next: None,
            retry_after: None,
        }
    }

    /// 429: too many failed sign-ins (`scope`'s) for `retry_after` more.
    pub fn too_many(scope: limit::Scope, retry_after: Duration) -> PageError {
        // whole seconds, rounded up: never "0 s"
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let secs = secs.max(1);
        let whose = match scope {
            limit::Scope::Client => "from your address",
            limit::Scope::Everyone => "to this console",
        };
        PageError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "Too many failed sign-ins {whose}: sign-in is refused for {secs} more second{}. Try again then, with the right token.",
                if secs == 1 { "" } else { "s" }
            ),
            login_next: None,
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    /// The `Retry-After` of a 429, in seconds.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn forbidden(message: impl Into<String>) -> PageError {
        PageError::new(StatusCode::FORBIDDEN, message)
    }

    fn login(next: &str) -> PageError {
        PageError {
            status: StatusCode::SEE_OTHER,
            message: String::new(),
            login_next: Some(next.to_string()),
            retry_after: None,
        }
    }
}

impl From<AuditError> for PageError {
    fn from(e: AuditError) -> PageError {
        let status = match &e {
            AuditError::UnknownBillNo { .. } => StatusCode::NOT_FOUND,
            AuditError::BadFilter { .. } | AuditError::Usage(_) => StatusCode::BAD_REQUEST,
            AuditError::Refused(_) => StatusCode::CONFLICT,
            AuditError::MissingDatabase { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => {
                tracing::warn!(error = %e, "console: outbox error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        PageError::new(status, e.to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if let Some(next) = self.login_next {
            let mut q = String::new();
            form::push_pair(&mut q, "next", auth::safe_next(&next));
            return Redirect::to(&format!("/login?{q}")).into_response();
        }
        let mut r = (self.status, pages::error(self.status, &self.message)).into_response();
        if let Some(wait) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"midas-worker console\""),
            );
        }
        r
    }
}

/// A connection to the outbox (`write`: for an operator's write), opened off the
/// async threads, with one of the [`MAX_DB_WORK`] slots (held until dropped).
async fn open_store(
    st: &Arc<AppState>,
    write: bool,
) -> Result<(Store, OwnedSemaphorePermit), PageError> {
    let slot = st
        .db_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| PageError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let location = st.location.clone();
    let store = tokio::task::spawn_blocking(move || {
        if write {
            Store::open_rw(&location)
        } else {
            Store::open_ro(&location)
        }
    })
    .await
    .map_err(|_| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, "the outbox did not open"))?
    .map_err(|e| PageError::from(AuditError::from(e)))?;
    Ok((store, slot))
}

/// Run `f` on a connection to the outbox (`write`: one for an operator's write),
/// off the async threads, at most [`MAX_DB_WORK`] at once.
async fn with_store<T, F>(st: &Arc<AppState>, write: bool, f: F) -> Result<T, PageError>
where
    T: Send + 'static,
    F: FnOnce(&mut Store, &Settings) -> Result<T, AuditError> + Send + 'static,
{
    let (mut store, slot) = open_store(st, write).await?;
    let settings = st.settings.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f(&mut store, &settings)
    })
    .await
    .map_err(|_| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, "the outbox read failed"))?
    .map_err(PageError::from)
}

/// The console's routes over `settings`' outbox.
pub fn router(settings: Arc<Settings>, tokens: Tokens) -> Router {
    let state = Arc::new(AppState {
        location: Location::of(&settings.config.outbox),
        settings,
        tokens,
        sessions: auth::Sessions::default(),
        db_slots: Arc::new(Semaphore::new(MAX_DB_WORK)),
        overview: tokio::sync::Mutex::new(None),
        failed_logins: Mutex::new(limit::FailedLogins::new(limit::Limits::CONSOLE)),
    });
    routes::routes()
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(crate::http::request_timeout))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Headers on every response: the CSP, no sniffing, no framing, no referrer to
/// other sites (URLs hold bill_nos and openids; `same-origin`, not `no-referrer`,
/// so browsers still send this site's `Origin` on its own forms), and no caching
/// of pages.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_asset = req.uri().path().starts_with("/static/");
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// Serve the console on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    settings: Arc<Settings>,
    tokens: Tokens,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_on(TcpListener::bind(addr).await?, settings, tokens, shutdown)
}

/// Serve the console on a bound listener (`run` binds the console's port before
/// the worker starts, so a taken port stops start-up early, and serves once the
/// outbox is open); returns the bound address.
pub fn serve_on(
    listener: TcpListener,
    settings: Arc<Settings>,
    tokens: Tokens,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let bound = listener.local_addr()?;
    let app = router(settings, tokens);
    // the ops port's limits: no client can hold the console's connections
    let h = tokio::spawn(crate::http::serve::serve(
        listener,
        app,
        crate::http::serve::Limits::OPS,
        shutdown,
    ));
    tracing::info!(console = %bound, "operator console listening");
    Ok((bound, h))
}
