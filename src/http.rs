//! The operational HTTP surface (axum): `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (broker connected and outbox writable).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::command::now_ms;
use crate::metrics::{Snapshot, METRICS};
use crate::outbox::{query, Writer};

#[derive(Clone)]
struct AppState {
    writer: Writer,
    db: PathBuf,
}

pub fn router(writer: Writer, db: PathBuf) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { writer, db })
}

/// Serve on `addr` until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    writer: Writer,
    db: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(writer, db);
    let h = tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((bound, h))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let broker = METRICS.broker_connected();
    let outbox = s.writer.healthy();
    let body = format!("broker: {}\noutbox: {}\n", up(broker), up(outbox));
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
    let db = s.db.clone();
    let snap = tokio::task::spawn_blocking(move || -> Snapshot {
        let Ok(c) = crate::outbox::open_ro(&db) else {
            return Snapshot::default();
        };
        match query::gauges(&c) {
            Ok(g) => Snapshot {
                jobs_by_state: g.by_state,
                oldest_pending_age_seconds: g
                    .oldest_pending_ms
                    .map_or(0.0, |t| ((now_ms() - t).max(0) as f64) / 1000.0),
                replies_pending: g.replies_pending,
            },
            Err(_) => Snapshot::default(),
        }
    })
    .await
    .unwrap_or_default();
    (
        [("content-type", "text/plain; version=0.0.4")],
        METRICS.render(&snap),
    )
}
