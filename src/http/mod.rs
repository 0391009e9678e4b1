//! The operational HTTP surface (axum): `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (broker connected and outbox writable).
//!
//! It is meant for a scraper and a kubelet on a private address (default
//! `127.0.0.1:9464`), but it must not be a way to hurt the worker when exposed: it
//! is served by [`serve::serve`] under [`Limits::OPS`] (a connection cap that makes
//! idle keep-alive connections give way to a newcomer, a request and lifetime cap
//! per connection, an idle/slow-loris timeout, a write stall limit), and a handler
//! gets [`REQUEST_TIMEOUT`]. `/metrics` reads the outbox gauges through a cache
//! refreshed at most every [`crate::metrics::GAUGE_TTL`], so a scrape storm costs
//! SQLite one query per period.

pub mod serve;

pub use serve::Limits;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{GaugeCache, Health, OutboxGauges, OutboxWrites, METRICS};
use crate::outbox::{Location, Outbox};

/// Connections served at once ([`Limits::OPS`]).
pub const MAX_CONNECTIONS: usize = Limits::OPS.max_connections;
/// A request must arrive whole within this long after the connection was accepted
/// or its previous response was written (slow-loris clients are dropped).
pub const HEADER_TIMEOUT: Duration = Limits::OPS.idle_timeout;
/// A handler that takes longer is answered 503 (below `HEADER_TIMEOUT`, so an
/// answer is always written before the connection's read deadline).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct AppState {
    writer: Outbox,
    db: Location,
    health: Health,
    gauges: Arc<GaugeCache>,
}

/// The routes for one worker: `health` is that worker's readiness, `db` its outbox.
pub fn router(writer: Outbox, db: Location, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn(request_timeout))
        .with_state(AppState {
            writer,
            db,
            health,
            gauges: Arc::new(GaugeCache::default()),
        })
}

/// Serve on `addr` until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    writer: Outbox,
    db: Location,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(writer, db, health);
    let h = tokio::spawn(serve::serve(listener, app, Limits::OPS, shutdown));
    Ok((bound, h))
}

/// Answer 503 when a handler takes longer than [`REQUEST_TIMEOUT`] (the ops
/// routes, and the operator console's).
pub(crate) async fn request_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed out\n").into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let broker = s.health.broker_connected();
    let w = s.writer.write_status();
    let outbox = w.writable;
    let body = match w.why.filter(|_| !outbox) {
        Some(why) => format!("broker: {}\noutbox: down ({})\n", up(broker), why.as_str()),
        None => format!("broker: {}\noutbox: {}\n", up(broker), up(outbox)),
    };
    if broker && outbox {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

fn up(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "down"
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let read = async {
        s.db.gauges().await.map(|g| OutboxGauges {
            jobs_by_state: g.by_state,
            oldest_pending_ms: g.oldest_pending_ms,
            replies_pending: g.replies_pending,
        })
    };
    let snap = s.gauges.snapshot(read).await;
    let w = s.writer.write_status();
    let writes = OutboxWrites {
        writable: w.writable,
        failed_commits: w.failed_commits,
        episodes: w.episodes,
    };
    let mut page = METRICS.render(&snap, &s.health, &writes);
    crate::push::metrics::render(&mut page);
    ([("content-type", "text/plain; version=0.0.4")], page)
}
