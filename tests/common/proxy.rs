//! A fault proxy for tests: a TCP relay between the worker and RabbitMQ or the Midas
//! simulator that can cut every live connection, refuse new ones (link down), or
//! stall traffic — without touching the shared broker other tests use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let generation = Arc::new(AtomicU64::new(0));
        let (d, s) = (down.clone(), stalled.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                if d.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    drop(inbound);
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                // only cuts after this connection was accepted count
                cut_rx.borrow_and_update();
                let stalled = s.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut ri, mut wi) = inbound.split();
                    let (mut ro, mut wo) = outbound.split();
                    let up = pump(&mut ri, &mut wo, &stalled);
                    let downstream = pump(&mut ro, &mut wi, &stalled);
                    tokio::select! {
                        _ = up => {}
                        _ = downstream => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            down,
            stalled,
            cut,
            generation,
            task,
        }
    }

    /// Drop every live connection (the peer sees a reset/EOF).
    pub fn cut(&self) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.cut.send(g);
    }

    /// Refuse new connections (and cut live ones) until `up()`.
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Hold all bytes in flight (connections stay open) until `unstall()`.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn unstall(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    pub fn url_amqp(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub fn url_http(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn pump(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
    stalled: &AtomicBool,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
