//! Abuse of the metrics/health server of a real worker: a slow-loris client that
//! never finishes its headers is disconnected; connections beyond the cap wait
//! until a slot frees instead of all being served at once; a scrape storm reads
//! the outbox gauges once per cache period, and `/metrics` still has every series.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use midas_worker::http::{Limits, HEADER_TIMEOUT, MAX_CONNECTIONS};
use midas_worker::metrics::GAUGE_TTL;
use midas_worker::sim::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Read until the server closes the connection (EOF or reset); the instant it did.
async fn closed(mut s: TcpStream) -> Instant {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_client_is_disconnected_and_others_are_served() {
    let env = TestEnv::new("loris");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let addr = worker.http_addr;

    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let started = Instant::now();
    // headers that never end: one byte every 200 ms
    let drip = tokio::spawn(async move {
        let _ = wr
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 256];
    let mut answered = Vec::new();
    let eof = tokio::time::timeout(HEADER_TIMEOUT * 4, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answered.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "still connected after {:?}", started.elapsed());
    assert!(
        !String::from_utf8_lossy(&answered).contains("200 OK"),
        "never served"
    );
    drip.abort();
    // the server is fine
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    worker.stop().await;
    env.cleanup(&env.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let env = TestEnv::new("cap");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let addr = worker.http_addr;

    // fill every slot with a client that sends half a request and waits
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(tokio::spawn(closed(s)));
    }
    // one more, with a whole request
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(HEADER_TIMEOUT * 6, extra.read_to_end(&mut resp))
        .await
        .expect("served once a slot is free")
        .expect("read");
    let served_at = Instant::now();
    assert!(
        String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    // it was served only after the server dropped a held connection (their read
    // deadline, HEADER_TIMEOUT after accept), not alongside them. The readers of the
    // held connections may run a moment after the extra's read: 1 s of slack
    // (uncapped, the extra would be served HEADER_TIMEOUT before the first drop).
    let mut first_drop = None::<Instant>;
    for h in held {
        let t = tokio::time::timeout(HEADER_TIMEOUT * 6, h)
            .await
            .expect("held connections are dropped")
            .expect("task");
        first_drop = Some(first_drop.map_or(t, |f| f.min(t)));
    }
    let first_drop = first_drop.expect("some held");
    assert!(
        served_at + Duration::from_secs(1) >= first_drop,
        "served {:?} before any slot was freed",
        first_drop - served_at
    );
    worker.stop().await;
    env.cleanup(&env.client().await).await;
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_storm_reads_the_outbox_once_per_period() {
    let env = TestEnv::new("storm");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let addr = worker.http_addr;
    let mut c = env.client().await;
    let b = unique("S");
    c.publish(pay(&b, "u", 1).as_bytes(), "s")
        .await
        .expect("publish");
    let got = replies(&mut c, 1, Duration::from_secs(30)).await;
    assert_eq!(
        got[0].reply.status,
        Some(midas_worker::command::Status::Succeeded),
        "{:?}",
        got[0].reply
    );

    let (_, first) = http_get(addr, "/metrics").await;
    let reads = "midas_worker_gauge_reads_total";
    let before = value(&first, reads);
    assert!(before >= 1.0, "{first}");
    let started = Instant::now();
    let n = MAX_CONNECTIONS - 2;
    let mut storm = Vec::new();
    for _ in 0..5 {
        for _ in 0..n {
            storm.push(tokio::spawn(http_get(addr, "/metrics")));
        }
    }
    let mut last = String::new();
    for t in storm {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200);
        last = body;
    }
    let (_, after) = http_get(addr, "/metrics").await;
    let periods = (started.elapsed().as_secs_f64() / GAUGE_TTL.as_secs_f64()).ceil();
    let reads_done = value(&after, reads) - before;
    assert!(
        reads_done <= periods + 1.0,
        "{} scrapes read the outbox {reads_done} times in {:?}",
        5 * n,
        started.elapsed()
    );
    for name in [
        "midas_worker_commands_received_total",
        "midas_worker_jobs{state=\"pending\"}",
        "midas_worker_oldest_pending_job_age_seconds",
        "midas_worker_replies_pending",
        "midas_worker_broker_connected",
    ] {
        assert!(last.contains(name), "{name} missing");
    }
    worker.stop().await;
    env.cleanup(&c).await;
}

/// One keep-alive client asking `GET /healthz` every `every` on the same
/// connection (reconnecting when the server closes it) until `stop`; counts its
/// answers, and adds one to `answered` at its first.
async fn keep_alive_client(
    addr: std::net::SocketAddr,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    answered: Arc<AtomicUsize>,
) -> usize {
    let mut answers = 0;
    while !*stop.borrow() {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut buf = vec![0u8; 4096];
        loop {
            if *stop.borrow() {
                return answers;
            }
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    answers += 1;
                    if answers == 1 {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                }
                _ => break,
            }
            tokio::time::sleep(every).await;
        }
    }
    answers
}

/// 64 clients keep a keep-alive connection each and ask `/healthz` every 2 s (twice
/// the slots, each slot always busy by the old rules); a separate probe, as a
/// kubelet sends it, must still be answered, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_clients_do_not_shut_out_a_probe() {
    const CLIENTS: usize = 2 * MAX_CONNECTIONS;
    let env = TestEnv::new("keepalive");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let addr = worker.http_addr;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(keep_alive_client(
                addr,
                Duration::from_secs(2),
                stop_rx.clone(),
                answered.clone(),
            ))
        })
        .collect();
    // every client has been answered once: each holds a keep-alive connection
    // (the first MAX_CONNECTIONS took every slot; the others got theirs only
    // because answered connections gave way), and all keep asking. (Bounded well
    // below a connection's 60 s lifetime, which would also free slots.)
    let all = eventually(Duration::from_secs(30), || {
        answered.load(Ordering::SeqCst) == CLIENTS
    })
    .await;
    assert!(
        all,
        "only {} of {CLIENTS} keep-alive clients were ever answered ({MAX_CONNECTIONS} slots)",
        answered.load(Ordering::SeqCst)
    );
    for i in 0..3 {
        // a kubelet probe: a fresh connection, `Connection: close`, a deadline
        // (the kubelet's default is 1 s; 5 s leaves a slow machine room and still
        // fails when the slots are held, as they were for as long as the clients ran)
        let probe = async {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp).await;
            String::from_utf8_lossy(&resp).into_owned()
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .unwrap_or_else(|_| {
                panic!("probe {i} got no answer beside {CLIENTS} keep-alive clients")
            });
        assert!(resp.starts_with("HTTP/1.1 200"), "probe {i}: {resp}");
        assert!(resp.ends_with("ok\n"), "probe {i}: {resp}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop_tx.send(true);
    for c in clients {
        c.await.expect("client task");
    }
    worker.stop().await;
    env.cleanup(&env.client().await).await;
}

/// A connection answers at most `max_requests` requests: the last answer says
/// `Connection: close` and the server closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_after_its_request_cap() {
    let env = TestEnv::new("reqcap");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut s = TcpStream::connect(worker.http_addr).await.expect("connect");
    let mut buf = vec![0u8; 4096];
    let cap = Limits::OPS.max_requests;
    for i in 1..=cap {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut head = String::new();
        while !head.ends_with("ok\n") {
            let n = tokio::time::timeout(HEADER_TIMEOUT, s.read(&mut buf))
                .await
                .expect("answered")
                .expect("read");
            assert!(n > 0, "closed early, after {i} of {cap} requests");
            head.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let closing = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closing, i == cap, "request {i}: {head}");
    }
    let n = tokio::time::timeout(HEADER_TIMEOUT, s.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection is closed after its last answer");
    worker.stop().await;
    env.cleanup(&env.client().await).await;
}
