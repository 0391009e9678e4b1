//! Connection limits of the push listener, which faces the internet: at most
//! `max_connections` served at once (more wait in the kernel's accept queue), a
//! request must arrive whole within `read_timeout` of the accept (or of the
//! previous response), and a reader that stalls a write for `write_timeout` is
//! dropped. The same protections as the ops port (`src/http.rs`), kept
//! self-contained here so either can move to a shared listener without the other.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

/// A listener that accepts only while fewer than `max_connections` are open.
pub struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
}

impl Limited {
    pub fn new(inner: TcpListener, limits: Limits) -> Limited {
        Limited {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Guarded::new(stream, permit, self.limits), addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "push listener accept failed");
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
/// response written) and a stall limit on writes.
pub struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    limits: Limits,
    read_deadline: Pin<Box<Sleep>>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: Limits) -> Guarded {
        Guarded {
            stream,
            _slot: slot,
            limits,
            read_deadline: Box::pin(tokio::time::sleep(limits.read_timeout)),
            write_stall: None,
        }
    }

    fn wrote(&mut self) {
        self.write_stall = None;
        let next = Instant::now() + self.limits.read_timeout;
        self.read_deadline.as_mut().reset(next);
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limits.write_timeout;
        let t = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        t.as_mut().poll(cx).is_ready()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("push {what} timed out"))
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending if this.read_deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(timed_out("request read")))
            }
            other => other,
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
