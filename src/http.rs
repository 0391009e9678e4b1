//! The operational HTTP surface (axum): `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (broker connected and outbox writable).
//!
//! It is meant for a scraper and a kubelet on a private address (default
//! `127.0.0.1:9464`), but it must not be a way to hurt the worker when exposed:
//! at most [`MAX_CONNECTIONS`] connections are served at once (more wait in the
//! kernel's accept queue), a connection that does not send a complete request
//! within [`HEADER_TIMEOUT`] of being accepted (or of its previous response) is
//! dropped, a handler gets [`REQUEST_TIMEOUT`], and a stalled reader is dropped
//! after [`WRITE_TIMEOUT`]. `/metrics` reads the outbox gauges through a cache
//! refreshed at most every [`crate::metrics::GAUGE_TTL`], so a scrape storm costs
//! SQLite one query per period.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::{GaugeCache, Health, METRICS};
use crate::outbox::{Location, Outbox};

/// Connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A request must arrive whole within this long after the connection was accepted
/// or its previous response was written (slow-loris clients are dropped).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A handler that takes longer is answered 503 (below `HEADER_TIMEOUT`, so an
/// answer is always written before the connection's read deadline).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A write that makes no progress for this long drops the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(writer, db, health);
    let listener = Limited {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
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

/// A listener with this port's connection limit and read/write deadlines, for the
/// other HTTP surfaces that must not be a way to hurt the worker (the operator
/// console, `crate::console`).
pub(crate) fn limited(inner: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    Limited {
        inner,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    }
}

/// Answer 503 when a handler takes longer than [`REQUEST_TIMEOUT`].
pub(crate) async fn request_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed out\n").into_response(),
    }
}

/// A listener that accepts only while fewer than [`MAX_CONNECTIONS`] are open.
struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            // the semaphore is never closed; without a permit, stop accepting
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Guarded::new(stream, permit), addr);
                }
                // e.g. EMFILE: pause instead of spinning
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its slot, with a read deadline (reset by each
/// write, i.e. each response) and a stall limit on writes.
struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    read_deadline: Pin<Box<Sleep>>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit) -> Guarded {
        Guarded {
            stream,
            _slot: slot,
            read_deadline: Box::pin(tokio::time::sleep(HEADER_TIMEOUT)),
            write_stall: None,
        }
    }

    fn wrote(&mut self) {
        self.write_stall = None;
        self.read_deadline
            .as_mut()
            .reset(Instant::now() + HEADER_TIMEOUT);
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let t = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        t.as_mut().poll(cx).is_ready()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("http {what} timed out"))
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {
                if this.read_deadline.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(timed_out("request read")))
                } else {
                    Poll::Pending
                }
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.wrote();
                Poll::Ready(r)
            }
            Poll::Pending if this.stalled(cx) => Poll::Ready(Err(timed_out("write"))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.wrote();
                Poll::Ready(r)
            }
            Poll::Pending if this.stalled(cx) => Poll::Ready(Err(timed_out("write"))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let broker = s.health.broker_connected();
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
    let snap = s.gauges.snapshot(&s.db).await;
    (
        [("content-type", "text/plain; version=0.0.4")],
        METRICS.render(&snap, &s.health),
    )
}
