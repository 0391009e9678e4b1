//! The lease rule (docs/config.md): at the shortest lease the config accepts for
//! its request timeout, steady per-player traffic on two workers sharing one
//! PostgreSQL outbox never loses a lease — no mark refused near the end of a
//! renewal period, no player given back or taken over — while every command is
//! answered once and Midas never sees two calls for one player at once.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::pg::TestDb;
use crate::common::*;
use midas_worker::command::Status;
use midas_worker::sim::Faults;

/// What a worker logs (at warn) when a player's lease slips away from it: a
/// fenced mark or outcome, or a renewal that found the lease gone.
const LOST: [&str; 2] = [
    "lease on the player lost",
    "player leases lost to another worker",
];

/// It found a race no late renewal explains: the idle give-back (the renewal's
/// `DELETE` of leases whose player has no pending job) did not see a job an intake
/// was committing under the same lease, so that job's pre-call mark found no lease
/// (one in ~2,000, about one run in two). `LEASE_RULE_KEEP_LOGS=DIR` keeps the
/// workers' logs. The suite runs it alone (test.sh): a worker starved of CPU by
/// tests beside it renews late, which no lease rule can cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_at_the_minimum_lease_never_loses_a_lease() {
    let db = TestDb::new("lrule").await;
    let mut env = TestEnv::new("lrule");
    env.share_outbox(&db);
    // 1.5 × (1 s + 3.5 s): the shortest lease `run` accepts for a 1 s timeout
    env.set("MIDAS__REQUEST_TIMEOUT", "1s");
    env.set("OUTBOX__LEASE", "6750ms");
    let sim = env
        .simulator(Faults {
            latency_ms: 5,
            ..Faults::default()
        })
        .await;
    let logs: Vec<_> = (0..2)
        .map(|i| env.dir.path().join(format!("worker-{i}.log")))
        .collect();
    let mut children: Vec<_> = logs
        .iter()
        .map(|log| env.spawn_child_logged_at(&sim.base_url(), log, "info"))
        .collect();
    let mut c = env.client().await;
    let b = unique("LR");
    // ~25 s of traffic (about 11 renewal periods): one pay every 25 ms, round
    // robin over 12 players, so every player has a job every 300 ms
    let sent: Vec<String> = (0..1000).map(|i| format!("{b}-{i}")).collect();
    let mut got = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    for (i, bill) in sent.iter().enumerate() {
        tick.tick().await;
        c.publish(pay(bill, &format!("lr{}", i % 12), 1).as_bytes(), bill)
            .await
            .expect("publish");
        while let Ok(r) = c.next_reply(Duration::from_millis(1)).await {
            got.push(r);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen: HashSet<String> = got.iter().map(|r| r.correlation_id.clone()).collect();
    while seen.len() < sent.len() && tokio::time::Instant::now() < deadline {
        if let Ok(r) = c.next_reply(Duration::from_millis(200)).await {
            seen.insert(r.correlation_id.clone());
            got.push(r);
        }
    }
    for ch in children.iter_mut() {
        assert!(
            terminate(ch, Duration::from_secs(20)),
            "SIGTERM ends a worker"
        );
    }
    let text: String = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    assert!(
        !text.is_empty(),
        "the workers logged (else the check below proves nothing)"
    );
    if let Ok(dir) = std::env::var("LEASE_RULE_KEEP_LOGS") {
        for (i, l) in logs.iter().enumerate() {
            let _ = std::fs::copy(l, format!("{dir}/worker-{i}.log"));
        }
    }
    let lost: Vec<&str> = text
        .lines()
        .filter(|l| LOST.iter().any(|w| l.contains(w)))
        .collect();
    assert!(
        lost.is_empty(),
        "leases lost at the minimum lease: {lost:#?}"
    );
    assert_eq!(seen.len(), sent.len(), "every command answered");
    assert!(got
        .iter()
        .all(|r| r.reply.status == Some(Status::Succeeded)));
    let ledger = sim.ledger();
    assert_eq!(
        ledger.overlapping_calls, 0,
        "two calls for one player at once"
    );
    env.cleanup(&c).await;
}
