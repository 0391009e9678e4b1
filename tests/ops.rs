//! The operational surface: `/metrics` is scraped and the named series are present
//! and move; `/healthz` and `/readyz` answer, and readiness follows the broker link.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use midas_worker::sim::Faults;

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("http get");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_move_and_readiness_follows_the_broker() {
    let mut env = TestEnv::new("ops");
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env.set("BROKER__URL", &proxy.url_amqp());
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let base = format!("http://{}", worker.http_addr);
    let mut direct = env.clone_settings_direct();
    let mut c = direct.client().await;

    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert!(eventually(Duration::from_secs(10), || true).await);
    let mut ready = 0;
    for _ in 0..100 {
        ready = get(&format!("{base}/readyz")).await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200, "ready once the broker is connected");

    let (_, before) = get(&format!("{base}/metrics")).await;
    let b = unique("M");
    for i in 0..5 {
        c.publish(
            pay(&format!("{b}-{i}"), "metrics-user", 1).as_bytes(),
            &format!("m{i}"),
        )
        .await
        .unwrap();
    }
    c.publish(br#"{"op":"nope"}"#, "bad").await.unwrap();
    let _ = replies(&mut c, 6, Duration::from_secs(30)).await;
    // the outbox gauges are read at most once per GAUGE_TTL: scrape until they show
    // this outbox's jobs (counters are live)
    let mut after = String::new();
    let deadline = tokio::time::Instant::now() + midas_worker::metrics::GAUGE_TTL * 4;
    while tokio::time::Instant::now() < deadline {
        let (status, body) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        after = body;
        if value(&after, r#"midas_worker_jobs{state="succeeded"}"#) >= 5.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for name in [
        "midas_worker_commands_received_total",
        "midas_worker_jobs",
        "midas_worker_midas_calls_total",
        "midas_worker_midas_call_duration_seconds_bucket",
        "midas_worker_retries_total",
        "midas_worker_oldest_pending_job_age_seconds",
        "midas_worker_replies_pending",
        "midas_worker_replies_published_total",
        "midas_worker_broker_connected",
        "midas_worker_outbox_commit_batch_size_bucket",
        "midas_worker_outbox_commits_total",
        "midas_worker_gauge_reads_total",
    ] {
        assert!(
            after.contains(name),
            "{name} missing from /metrics:\n{after}"
        );
    }
    // counters are process-wide (other tests in this binary share them): they only grow
    let accepted = r#"midas_worker_commands_received_total{op="pay",outcome="accepted"}"#;
    assert!(value(&after, accepted) >= value(&before, accepted) + 5.0);
    let calls = r#"midas_worker_midas_calls_total{api="pay",errcode="0",class="success"}"#;
    assert!(value(&after, calls) >= value(&before, calls) + 5.0);
    assert!(
        value(&after, "midas_worker_outbox_commits_total")
            > value(&before, "midas_worker_outbox_commits_total")
    );
    assert!(
        value(&after, r#"midas_worker_jobs{state="succeeded"}"#) >= 5.0,
        "gauge from this outbox"
    );
    assert_eq!(value(&after, "midas_worker_broker_connected"), 1.0);
    assert!(!after.contains("metrics-user"), "no openids in metrics");
    assert!(!after.contains(APP_KEY));

    // the broker link goes down: not ready (and not connected); back up: ready again
    proxy.down();
    let mut seen_down = false;
    for _ in 0..100 {
        if get(&format!("{base}/readyz")).await.0 == 503 {
            seen_down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_down, "/readyz reports the lost broker");
    proxy.up();
    let mut back = false;
    for _ in 0..200 {
        if get(&format!("{base}/readyz")).await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "ready again after reconnecting");
    worker.stop().await;
    env.cleanup(&c).await;
}
