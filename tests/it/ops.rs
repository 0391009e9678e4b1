//! The operational surface: `/metrics` is scraped and the named series are present
//! and move; `/healthz` and `/readyz` answer, and readiness follows the broker link.

use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::*;
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
    let got = replies(&mut c, 6, Duration::from_secs(30)).await;
    let status_of = |id: &str| {
        got.iter()
            .find(|r| r.correlation_id == id)
            .and_then(|r| r.reply.status)
    };
    for i in 0..5 {
        assert_eq!(
            status_of(&format!("m{i}")),
            Some(midas_worker::command::Status::Succeeded),
            "m{i}"
        );
    }
    assert_eq!(
        status_of("bad"),
        Some(midas_worker::command::Status::Rejected)
    );
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

/// Poll `url` until it answers `status` (at most `tries` × 50 ms); true if it did.
async fn until_status(url: &str, status: u16, tries: u32) -> bool {
    for _ in 0..tries {
        if get(url).await.0 == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Readiness belongs to a worker, not to the process: two workers in one process,
/// one loses its broker link, and only that one stops being ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_process_have_their_own_readiness() {
    let mut env_a = TestEnv::new("ops-a");
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env_a.set("BROKER__URL", &proxy.url_amqp());
    let env_b = TestEnv::new("ops-b");
    let sim = env_a.simulator(Faults::default()).await;
    let a = env_a.worker(&sim.base_url()).await;
    let b = env_b.worker(&sim.base_url()).await;
    let (ready_a, ready_b) = (
        format!("http://{}/readyz", a.http_addr),
        format!("http://{}/readyz", b.http_addr),
    );
    let metrics_a = format!("http://{}/metrics", a.http_addr);
    let metrics_b = format!("http://{}/metrics", b.http_addr);
    assert!(until_status(&ready_a, 200, 200).await, "A ready");
    assert!(until_status(&ready_b, 200, 200).await, "B ready");

    // A's broker link goes down (new connections refused): A is not ready, B is
    proxy.down();
    assert!(
        until_status(&ready_a, 503, 200).await,
        "A reports its lost broker"
    );
    let (status, body) = get(&ready_a).await;
    assert_eq!((status, body.as_str()), (503, "broker: down\noutbox: ok\n"));
    let (status, body) = get(&ready_b).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "broker: ok\noutbox: ok\n"),
        "B's broker link is untouched"
    );
    assert_eq!(
        value(&get(&metrics_a).await.1, "midas_worker_broker_connected"),
        0.0
    );
    assert_eq!(
        value(&get(&metrics_b).await.1, "midas_worker_broker_connected"),
        1.0
    );

    // B still works while A is cut off
    let mut c = env_b.client().await;
    let bill = unique("R");
    c.publish(pay(&bill, "ready-user", 1).as_bytes(), "r1")
        .await
        .unwrap();
    let got = replies(&mut c, 1, Duration::from_secs(30)).await;
    assert_eq!(
        got.first().map(|r| r.correlation_id.as_str()),
        Some("r1"),
        "B answers while A is cut off"
    );

    // A's link comes back: A ready again, B never stopped
    proxy.up();
    assert!(until_status(&ready_a, 200, 400).await, "A ready again");
    assert_eq!(get(&ready_b).await.0, 200);

    a.stop().await;
    b.stop().await;
    let mut direct = env_a.clone_settings_direct();
    let ca = direct.client().await;
    env_a.cleanup(&ca).await;
    env_b.cleanup(&c).await;
}
