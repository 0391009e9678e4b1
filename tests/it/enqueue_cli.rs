//! `midas-worker enqueue` as a script sees it, through the real broker: a wrong queue
//! name is an immediate one-line error and creates no queue, and the exit status tells
//! the outcome (0 succeeded, 4 rejected, 6 no reply in time, 1 broker trouble, 2 bad
//! usage), with what the broker said quoted rather than "cannot reach".

use std::process::Output;

use crate::common::TestEnv;
use midas_worker::sim::Faults;

/// Run the binary with the test's environment (plus `extra`) and wait for it to exit.
async fn enqueue(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_midas-worker"));
    cmd.arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .arg("enqueue")
        .args(args)
        .envs(&env.env);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run midas-worker enqueue")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Whether a queue of that name exists (a passive declare succeeds).
async fn queue_exists(name: &str) -> bool {
    let conn = midas_worker::broker::connect(crate::common::BROKER, "test probe")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let exists = ch
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    exists
}

#[tokio::test]
async fn a_wrong_queue_is_an_immediate_error_and_creates_nothing() {
    let env = TestEnv::new("enq-wrong");
    let wrong = format!("t-{}.comands", env.tag);
    for wait in [false, true] {
        let mut args = vec![
            "pay",
            "--bill-no",
            "B-WRONG-Q",
            "--openid",
            "player-A",
            "--amt",
            "10",
            "--queue",
            &wrong,
            "--timeout",
            "10m",
        ];
        if wait {
            args.push("--wait");
        }
        let out = enqueue(&env, &args, &[]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "wait={wait}: {err}");
        assert!(
            err.contains(&format!("no queue named {wrong}")),
            "wait={wait}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!queue_exists(&wrong).await, "enqueue created {wrong}");
    }
}

#[tokio::test]
async fn exit_status_tells_succeeded_and_rejected() {
    let env = TestEnv::new("enq-status");
    // the queues exist before enqueue runs (the worker declares them in the background;
    // a deployment has them long before a game server publishes)
    let c = env.client().await;
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let bill = crate::common::unique("ENQ");

    let ok = enqueue(
        &env,
        &[
            "pay",
            "--bill-no",
            &bill,
            "--openid",
            "player-A",
            "--amt",
            "10",
            "--wait",
        ],
        &[],
    )
    .await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let reply: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("reply on stdout");
    assert_eq!(reply["status"], "succeeded", "{reply}");

    // same bill_no, other amount: rejected (bill_no_conflict)
    let conflict = enqueue(
        &env,
        &[
            "pay",
            "--bill-no",
            &bill,
            "--openid",
            "player-A",
            "--amt",
            "99",
            "--wait",
        ],
        &[],
    )
    .await;
    assert_eq!(conflict.status.code(), Some(4), "{}", stderr(&conflict));
    let reply: serde_json::Value = serde_json::from_slice(&conflict.stdout).expect("reply");
    assert_eq!(reply["status"], "rejected", "{reply}");

    // without --wait: published is success
    let fire = enqueue(&env, &["balance", "--openid", "player-A"], &[]).await;
    assert_eq!(fire.status.code(), Some(0), "{}", stderr(&fire));

    worker.stop().await;
    env.cleanup(&c).await;
    c.close().await;
}

#[tokio::test]
async fn no_reply_in_time_is_its_own_status_with_the_timeout_as_written() {
    let env = TestEnv::new("enq-timeout");
    // the queues exist (declared as the worker would) but no worker consumes them
    let c = env.client().await;
    let out = enqueue(
        &env,
        &[
            "pay",
            "--bill-no",
            "B-TO",
            "--openid",
            "player-A",
            "--amt",
            "1",
            "--wait",
            "--timeout",
            "1s",
        ],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("no reply within 1s\n"), "{err}");
    env.cleanup(&c).await;
    c.close().await;
}

#[tokio::test]
async fn broker_refusals_are_quoted_not_called_unreachable() {
    let env = TestEnv::new("enq-refused");
    let args = [
        "pay",
        "--bill-no",
        "B-R",
        "--openid",
        "player-A",
        "--amt",
        "1",
    ];
    let refused = enqueue(
        &env,
        &args,
        &[(
            "MIDAS_WORKER__BROKER__URL",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
        )],
    )
    .await;
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("ACCESS_REFUSED"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    assert!(!err.contains("not-the-password"), "password leaked: {err}");

    // nothing listening: that one is "cannot reach"
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let down = enqueue(&env, &args, &[("MIDAS_WORKER__BROKER__URL", &url)]).await;
    let err = stderr(&down);
    assert_eq!(down.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the broker"), "{err}");
}

#[tokio::test]
async fn bad_usage_is_status_2() {
    let env = TestEnv::new("enq-usage");
    let out = enqueue(
        &env,
        &[
            "pay",
            "--bill-no",
            "B-U",
            "--openid",
            "player-A",
            "--amt",
            "1",
            "--session-key-env",
            "MIDAS_TEST_NO_SUCH_VARIABLE",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = enqueue(&env, &["pay", "--timeout", "soon"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test]
async fn an_amqps_url_fails_cleanly_with_the_one_crypto_provider() {
    // a TCP listener that hangs up at once: the TLS client is built (crypto provider
    // selected) and the handshake fails — an error, not a panic
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let env = TestEnv::new("enq-tls");
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let out = enqueue(
        &env,
        &["balance", "--openid", "player-A"],
        &[("MIDAS_WORKER__BROKER__URL", &url)],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the broker"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Counts the client's "nacked; publishing it again" events (the test's own
/// subscriber, on the test's thread), so the test waits on nacks, not on time.
struct Nacks(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Nacks {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let m = event.metadata();
        if m.target() == "midas_worker::client" && m.fields().field("attempt").is_some() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A command the broker nacks (here a full queue that rejects publishes; in
/// production a quorum queue electing its leader) is published again, as
/// docs/clients.md tells game servers to do, and lands once the broker takes it;
/// a broker that keeps nacking ends in `NotConfirmed`, never a silent success.
#[tokio::test]
async fn a_nacked_command_is_published_again_until_the_broker_takes_it() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use midas_worker::client::{ClientError, GameClient, NACK_ATTEMPTS};
    use tracing_subscriber::layer::SubscriberExt;

    let env = TestEnv::new("enq-nack");
    // a current-thread runtime: every poll of this test, the spawned task
    // included, runs on this thread under this subscriber
    let nacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _sub =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(Nacks(nacks.clone())));
    let mut broker = env.settings().config.broker;
    broker.command_queue = format!("t-{}.full", env.tag);
    let conn = midas_worker::broker::connect(crate::common::BROKER, "test full queue")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        broker.command_queue.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .expect("declare the one-message queue");
    let client = GameClient::attach(&broker, false).await.expect("attach");
    client
        .publish(b"filler", "filler")
        .await
        .expect("room for one");
    assert_eq!(nacks.load(Ordering::SeqCst), 0);

    // full and nobody drains it: every attempt is nacked, then NotConfirmed
    let e = client.publish(b"first", "first").await;
    assert!(matches!(e, Err(ClientError::NotConfirmed)), "{e:?}");
    assert_eq!(
        nacks.load(Ordering::SeqCst),
        NACK_ATTEMPTS - 1,
        "published again after every nack but the last"
    );

    // room appears only once the next command has been nacked: it then lands, once
    let base = nacks.load(Ordering::SeqCst);
    let drain = {
        let ch = conn.create_channel().await.expect("channel");
        let q = broker.command_queue.clone();
        let nacks = nacks.clone();
        tokio::spawn(async move {
            let waited = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                while nacks.load(Ordering::SeqCst) == base {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "the second command was never nacked");
            let m = ch
                .basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get")
                .expect("the filler");
            m.ack(BasicAckOptions::default()).await.expect("ack");
            m.data.clone()
        })
    };
    client
        .publish(b"second", "second")
        .await
        .expect("lands after a nack");
    assert_eq!(drain.await.expect("drain"), b"filler");
    let m = ch
        .basic_get(
            broker.command_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("get")
        .expect("the command");
    assert_eq!(m.data, b"second");
    assert!(ch
        .basic_get(
            broker.command_queue.as_str().into(),
            BasicGetOptions::default()
        )
        .await
        .expect("get")
        .is_none());
    let _ = ch
        .queue_delete(broker.command_queue.as_str().into(), Default::default())
        .await;
}
