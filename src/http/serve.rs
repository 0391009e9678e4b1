//! One way to serve an axum router on a listener without letting clients hold it:
//! the ops port uses it, and so can any other listener of the worker (the push
//! receiver and the operator console serve "with the same request limits as the
//! ops port": call [`serve`] with [`Limits::OPS`]).
//!
//! What a client cannot do, and how:
//!
//! - **Hold every connection slot** (idle keep-alive clients, or clients that keep
//!   asking every few seconds): at most [`Limits::max_connections`] connections are
//!   served at once; while a new one waits with all slots taken, every open
//!   connection that has been answered at least once is asked to close as soon as
//!   it is idle (an HTTP/1.1 graceful close: a request being answered is finished
//!   first), so the newcomer — a kubelet probe — gets a slot within moments, and a
//!   client that wants to keep asking reconnects and queues behind it like
//!   everyone else. Connections that never finish a request are dropped by the
//!   idle timeout below.
//! - **Keep one connection forever**: a connection serves at most
//!   [`Limits::max_requests`] requests (the last answer says `Connection: close`)
//!   and lives at most [`Limits::max_lifetime`] (then closes once idle).
//! - **Sit idle or drip a request** (slow loris): a connection that has not sent a
//!   whole request within [`Limits::idle_timeout`] of being accepted, or of its
//!   previous answer, is dropped.
//! - **Stall the answer**: a write that makes no progress for
//!   [`Limits::write_timeout`] drops the connection.
//!
//! Each request carries its client's address as axum's `ConnectInfo<SocketAddr>`
//! (the TCP peer). Handlers get their own deadline from the router (the ops router answers 503
//! after [`super::REQUEST_TIMEOUT`]); keep it below `idle_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::header::{HeaderValue, CONNECTION};
use axum::Router;
use hyper::body::Incoming;
use hyper::service::{service_fn, Service as _};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// While a newcomer waits for a slot, how often the open connections are asked
/// again to close once idle.
const SHED_EVERY: Duration = Duration::from_millis(50);

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// A whole request must arrive within this long after the connection was
    /// accepted or its previous answer was written.
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long drops the connection.
    pub write_timeout: Duration,
    /// Requests one connection may make; the last answer closes it.
    pub max_requests: u32,
    /// How long one connection may stay open; then it closes once idle.
    pub max_lifetime: Duration,
}

impl Limits {
    /// The ops port's limits (`/metrics`, `/healthz`, `/readyz`).
    pub const OPS: Limits = Limits {
        max_connections: 32,
        idle_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(10),
        max_requests: 100,
        max_lifetime: Duration::from_secs(60),
    };
}

/// Serve `app` on `listener` under `limits` until `shutdown` turns true; then stop
/// accepting, close every connection once its current answer is written, and
/// return (after at most `idle_timeout` more for stragglers).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // bumped to ask every open connection to close once idle
    let (close_tx, close_rx) = watch::channel(0u64);
    'accept: loop {
        if *shutdown.borrow() {
            break;
        }
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => continue,
            a = listener.accept() => match a {
                Ok(accepted) => accepted,
                // e.g. EMFILE: pause instead of spinning
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // full: ask the open connections to make room as soon as they are idle,
            // again and again (a fresh one is not asked before its first answer),
            // until a slot frees. Every connection ends within its limits anyway.
            Err(_) => loop {
                close_tx.send_modify(|g| *g += 1);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => break slot,
                        Err(_) => return, // never closed
                    },
                    _ = tokio::time::sleep(SHED_EVERY) => {}
                    _ = shutdown.changed() => continue 'accept,
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            slot,
            app.clone(),
            limits,
            close_rx.clone(),
        ));
    }
    close_tx.send_modify(|g| *g += 1);
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.idle_timeout, slots.acquire_many(all)).await;
}

/// Serve one connection under `limits`, holding `slot` until it is closed.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    app: Router,
    limits: Limits,
    mut close: watch::Receiver<u64>,
) {
    let io = Guarded::new(stream, slot, limits);
    let inner = TowerToHyperService::new(app);
    let served = Arc::new(AtomicU32::new(0));
    let count = served.clone();
    let svc = service_fn(move |mut req: axum::http::Request<Incoming>| {
        // the client's address, for handlers that count per client (the console's
        // failed sign-ins): axum's `ConnectInfo`
        req.extensions_mut().insert(ConnectInfo(peer));
        let last = count.fetch_add(1, Ordering::Relaxed) + 1 >= limits.max_requests;
        let answer = inner.call(req);
        async move {
            let mut resp = match answer.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if last {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(limits.max_lifetime);
    tokio::pin!(lifetime);
    close.mark_unchanged();
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended");
                }
                return;
            }
            _ = &mut lifetime, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            // a connection that has not had its first request yet is not idle: it
            // is a newcomer that was given a slot (its request may be on its way)
            _ = close.changed(), if !closing => {
                if served.load(Ordering::Relaxed) > 0 {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// An accepted connection holding its slot, with a read deadline (reset by each
/// write, i.e. each answer) and a stall limit on writes.
struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    write_timeout: Duration,
    read_deadline: Pin<Box<Sleep>>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: Limits) -> Guarded {
        Guarded {
            stream,
            _slot: slot,
            idle_timeout: limits.idle_timeout,
            write_timeout: limits.write_timeout,
            read_deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            write_stall: None,
        }
    }

    fn wrote(&mut self) {
        self.write_stall = None;
        let next = Instant::now() + self.idle_timeout;
        self.read_deadline.as_mut().reset(next);
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.write_timeout;
        let t = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
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
