//! The dead-letter queue holds no session_key and nothing forever: each refused
//! command (invalid, unknown reply target, bill_no conflict, not even JSON) is
//! dead-lettered as a copy without its session_key, with the refusal's code in a
//! header, and expires after `broker.dead_letter_ttl`.

use std::time::Duration;

use midas_worker::command::Status;
use midas_worker::sim::Faults;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commands_are_dead_lettered_without_their_session_key_and_expire() {
    let mut env = TestEnv::new("dlqcopy");
    // long enough that a loaded machine still sees the copies before they expire
    env.set("BROKER__DEAD_LETTER_TTL", "10s");
    let sim = env.simulator(Faults::default()).await;
    sim.register_session("dlq-player", "SK-valid-0001");
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bill = unique("DLQ").replace('-', "_");
    let pay = |amt: i64, sk: &str| {
        format!(
            r#"{{"op":"pay","bill_no":"{bill}","openid":"dlq-player","amt":{amt},"session_key":"{sk}"}}"#
        )
    };
    c.publish(pay(10, "SK-valid-0001").as_bytes(), "ok")
        .await
        .expect("publish");
    let ok = c.reply_for("ok", T).await.expect("reply").reply;
    assert_eq!(ok.status, Some(Status::Succeeded), "{ok:?}");

    // (correlation_id, body, reply_to, the refusal's code)
    let conflict = pay(11, "SENTINEL-conflict");
    let invalid =
        r#"{"op":"pay","bill_no":"X1","openid":"o","amt":0,"session_key":"SENTINEL-invalid"}"#;
    let elsewhere =
        r#"{"op":"pay","bill_no":"X2","openid":"o","amt":1,"session_key":"SENTINEL-elsewhere"}"#;
    let raw = "not json, session_key=SENTINEL-raw";
    c.publish(conflict.as_bytes(), "conflict")
        .await
        .expect("publish");
    c.publish(invalid.as_bytes(), "invalid")
        .await
        .expect("publish");
    c.publish_to(
        elsewhere.as_bytes(),
        "elsewhere",
        Some("not-an-allowed-queue"),
    )
    .await
    .expect("publish");
    c.publish(raw.as_bytes(), "raw").await.expect("publish");
    for (id, code) in [
        ("conflict", "bill_no_conflict"),
        ("invalid", "invalid_command"),
        ("raw", "invalid_command"),
    ] {
        let r = c.reply_for(id, T).await.expect("reply").reply;
        assert_eq!(r.status, Some(Status::Rejected), "{id}");
        assert_eq!(r.error.as_deref(), Some(code), "{id}");
    }
    let dead = env.dead_letter_messages_until(4, T).await;
    assert_eq!(dead.len(), 4, "{dead:?}");
    let mut reasons: Vec<(String, String)> = Vec::new();
    for d in &dead {
        let text = String::from_utf8_lossy(&d.body);
        assert!(
            !text.contains("SENTINEL"),
            "a session_key in the DLQ: {text}"
        );
        assert_eq!(d.expiration.as_deref(), Some("10000"), "{d:?}");
        let reason = d
            .headers
            .get("x-midas-dead-letter-reason")
            .cloned()
            .unwrap_or_default();
        let scrubbed = d
            .headers
            .get("x-midas-session-key")
            .cloned()
            .unwrap_or_default();
        reasons.push((reason, scrubbed));
        if !d.body.is_empty() {
            // the rest of the command is kept for whoever reads the queue
            let v: serde_json::Value = serde_json::from_slice(&d.body).expect("JSON copy");
            assert!(
                v.get("session_key").is_none() && v.get("bill_no").is_some(),
                "{v}"
            );
        }
    }
    reasons.sort();
    let want = |r: &str, s: &str| (r.to_string(), s.to_string());
    assert_eq!(
        reasons,
        vec![
            want("bill_no_conflict", "removed"),
            want("invalid_command", "body-dropped"),
            want("invalid_command", "removed"),
            want("reply_to_not_allowed", "removed"),
        ]
    );
    // and nothing stays there longer than broker.dead_letter_ttl
    let dlq = env.settings().config.broker.dead_letter_queue;
    c.publish(invalid.as_bytes(), "invalid2")
        .await
        .expect("publish");
    c.reply_for("invalid2", T).await.expect("reply");
    let mut seen = false;
    for _ in 0..200 {
        if queue_depth(&dlq).await >= 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "dead-lettered");
    let mut gone = false;
    for _ in 0..200 {
        if queue_depth(&dlq).await == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the copy expired from the dead-letter queue");
    worker.stop().await;
    env.cleanup(&c).await;
}

/// A dead-letter queue declared before the TTL existed (no `x-message-ttl`) cannot
/// be re-declared with it: the worker still starts, uses it as it is, and its copies
/// carry the TTL as their own expiration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_dead_letter_queue_without_the_ttl_still_works() {
    use lapin::options::QueueDeclareOptions;
    let env = TestEnv::new("dlqold");
    let dlq = env.settings().config.broker.dead_letter_queue;
    let conn = midas_worker::broker::connect(BROKER, "test old dlq")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        dlq.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("old-style DLQ");
    let _ = conn.close(200, "bye".into()).await;
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let bad = r#"{"op":"pay","bill_no":"OLD1","openid":"o","amt":0}"#;
    c.publish(bad.as_bytes(), "bad").await.expect("publish");
    let r = c.reply_for("bad", T).await.expect("reply").reply;
    assert_eq!(r.status, Some(Status::Rejected));
    let dead = env.dead_letter_messages_until(1, T).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].body, bad.as_bytes(), "no session_key: unchanged");
    assert_eq!(
        dead[0].expiration.as_deref(),
        Some((7 * 86_400_000u64).to_string().as_str()),
        "the default TTL, on the copy"
    );
    worker.stop().await;
    env.cleanup(&c).await;
}
