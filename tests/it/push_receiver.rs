//! The push receiver of a real worker (in process), over real HTTP, with a real
//! SQLite outbox and RabbitMQ: a verified push is answered success and appears once
//! on the events queue however often it is repeated; every refusal gets a non-zero
//! ErrCode and is stored nowhere; a mock is answered and published nowhere; and a
//! push is answered while the broker is away, its event published when it returns.

use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::push::*;
use crate::common::*;
use midas_worker::audit::{ExportFormat, ListArgs, OutboxCmd};

const T: Duration = Duration::from_secs(20);

fn pushes_in(db: &std::path::Path) -> Vec<(String, i64, Option<i64>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT dedup_key, repeats, published_at FROM pushes ORDER BY id")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_stored_once_answered_and_published_once_and_refusals_store_nothing() {
    let env = push_env("push-once");
    let w = env.worker("http://127.0.0.1:9").await;
    let base = format!("http://{}", w.push_addr.expect("push listener"));
    let no = format!("T{}", rand::random::<u32>());

    // the first receipt and three repeats, plain and safe mode: success every time
    for safe in [false, true, false, true] {
        let p = signed(GOODS_EVENT, &goods_payload(&no, "o-buyer"), false, safe);
        assert_eq!(post(&base, APPID, &p.query, p.body).await, (200, 0));
    }
    // a mock: success, delivers nothing
    let m = signed(GOODS_EVENT, &goods_payload("MOCK1", "o-mock"), true, false);
    assert_eq!(post(&base, APPID, &m.query, m.body).await, (200, 0));

    // refusals
    let good = signed(
        GOODS_EVENT,
        &goods_payload("T-refused", "o-x"),
        false,
        false,
    );
    let tampered = String::from_utf8(good.body.clone())
        .unwrap()
        .replace("600", "6");
    assert_eq!(
        post(&base, APPID, &good.query, tampered.into_bytes()).await,
        (200, 40006),
        "tampered payload"
    );
    let bad_sig = good.query.replacen("signature=", "signature=0", 1);
    assert_eq!(
        post(&base, APPID, &bad_sig, good.body.clone()).await,
        (200, 40001),
        "bad URL signature"
    );
    assert_eq!(
        post(&base, "wx0000000", &good.query, good.body.clone()).await,
        (200, 40004),
        "unknown app"
    );
    let unknown = signed(
        "minigame_something_else",
        &goods_payload("T-u", "o"),
        false,
        false,
    );
    assert_eq!(
        post(&base, APPID, &unknown.query, unknown.body).await,
        (200, 40005),
        "unknown event"
    );
    let safe = signed(GOODS_EVENT, &goods_payload("T-s", "o"), false, true);
    let bad_msg = safe.query.replacen("msg_signature=", "msg_signature=0", 1);
    assert_eq!(
        post(&base, APPID, &bad_msg, safe.body).await,
        (200, 40002),
        "bad msg_signature"
    );
    let big = vec![b' '; 70_000];
    assert_eq!(
        post(&base, APPID, &good.query, big).await,
        (200, 41300),
        "oversize"
    );

    let events = drain_events(&event_queue(&env), 1, T).await;
    // nothing more comes: the repeats made no second event. Once the one row is
    // marked confirmed, every copy the worker published is in the queue already.
    assert!(
        eventually(T, || pushes_in(&env.outbox_path())
            .first()
            .is_some_and(|r| r.2.is_some()))
        .await
    );
    let more = drain_events(&event_queue(&env), 0, Duration::ZERO).await;
    assert_eq!(events.len() + more.len(), 1, "{events:?} {more:?}");
    let (id, msg) = &events[0];
    assert_eq!(msg["event_id"], id.as_str(), "message_id is the event_id");
    assert_eq!(msg["out_trade_no"], no.as_str());
    assert_eq!(msg["kind"], "goods_delivered");
    assert_eq!(msg["openid"], "o-buyer");
    assert_eq!(msg["goods"]["product_id"], "sword");

    let rows = pushes_in(&env.outbox_path());
    assert_eq!(rows.len(), 1, "refusals and mocks stored nowhere: {rows:?}");
    assert_eq!(rows[0].0, no);
    assert_eq!(rows[0].1, 3, "three repeats counted");
    assert!(eventually(T, || pushes_in(&env.outbox_path())[0].2.is_some()).await);

    let (_, metrics) = http_get(w.http_addr, "/metrics").await;
    for line in [
        "kind=\"goods_delivered\",outcome=\"stored\"",
        "kind=\"goods_delivered\",outcome=\"repeat\"",
        "kind=\"goods_delivered\",outcome=\"mock\"",
        "outcome=\"bad_pay_event_sig\"",
        "outcome=\"unknown_app\"",
        "outcome=\"too_large\"",
    ] {
        assert!(metrics.contains(line), "{line} in /metrics");
    }
    assert!(!metrics.contains(TOKEN) && !metrics.contains(AES_KEY));

    // the audit verbs
    let list = audit(&env, list_cmd(Some("pushes"), false));
    assert!(
        list.contains(&no) && list.contains("goods_delivered"),
        "{list}"
    );
    assert!(audit(&env, list_cmd(Some("refunded"), false)).contains("no pushes match"));
    let both = audit(&env, list_cmd(None, false));
    assert!(
        both.contains("no jobs match") && both.contains(&no),
        "{both}"
    );
    let show = audit(
        &env,
        OutboxCmd::Show {
            bill_no: no.clone(),
            appid: None,
            json: false,
        },
    );
    assert!(
        show.contains(&msg["event_id"].as_str().unwrap().to_string()),
        "{show}"
    );
    assert!(show.contains("repeats       3"), "{show}");
    let stats: serde_json::Value =
        serde_json::from_str(&audit(&env, OutboxCmd::Stats { json: true })).unwrap();
    assert_eq!(stats["pushes"][0]["kind"], "goods_delivered");
    assert_eq!(stats["pushes"][0]["events_confirmed"], 1);
    let export = audit(
        &env,
        OutboxCmd::Export {
            filters: Default::default(),
            kind: Some("goods_delivered".into()),
            format: ExportFormat::Jsonl,
        },
    );
    let line: serde_json::Value = serde_json::from_str(export.trim()).unwrap();
    assert_eq!(line["dedup_key"], no.as_str());
    assert_eq!(line["message"]["event_id"], msg["event_id"]);
    w.stop().await;

    // `outbox migrate` carries the push to a PostgreSQL outbox, id and all
    let db = crate::common::pg::TestDb::new("push-migrate").await;
    let out = audit(
        &env,
        OutboxCmd::Migrate {
            to: db.secret_url(),
            who: Default::default(),
        },
    );
    assert!(out.contains("1 pushes"), "{out}");
    let pg = midas_worker::outbox::store::Store::open_ro(
        &midas_worker::outbox::Location::Postgres(db.secret_url()),
    )
    .unwrap();
    let moved = pg.pushes_by_key(&no, None).unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].event_id, msg["event_id"].as_str().unwrap());
    assert_eq!(moved[0].repeats, 3);
    delete_queues(&env).await;
}

fn list_cmd(kind: Option<&str>, json: bool) -> OutboxCmd {
    OutboxCmd::List(ListArgs {
        filters: Default::default(),
        limit: 50,
        json,
        kind: kind.map(str::to_string),
    })
}

fn audit(env: &TestEnv, cmd: OutboxCmd) -> String {
    let mut out = Vec::new();
    midas_worker::audit::run(&cmd, &env.settings(), &mut out).expect("the verb runs");
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_answered_while_the_broker_is_away_and_published_when_it_returns() {
    let mut env = push_env("push-outage");
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    env.set("BROKER__URL", &proxy.url_amqp());
    let w = env.worker("http://127.0.0.1:9").await;
    let base = format!("http://{}", w.push_addr.expect("push listener"));
    proxy.down();
    let mut nos = Vec::new();
    for i in 0..5 {
        let no = format!("OUT{i}-{}", rand::random::<u32>());
        let p = signed(GOODS_EVENT, &goods_payload(&no, "o-1"), false, false);
        let t = std::time::Instant::now();
        assert_eq!(post(&base, APPID, &p.query, p.body).await, (200, 0));
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "answered within WeChat's 3 s"
        );
        nos.push(no);
    }
    assert_eq!(
        pushes_in(&env.outbox_path()).len(),
        5,
        "stored before answered"
    );
    proxy.up();
    let events = drain_events(&event_queue(&env), 5, Duration::from_secs(30)).await;
    let mut got: Vec<String> = events
        .iter()
        .map(|(_, m)| m["out_trade_no"].as_str().unwrap_or("").to_string())
        .collect();
    got.sort();
    got.dedup();
    nos.sort();
    assert_eq!(got, nos);
    w.stop().await;
    delete_queues(&env).await;
}

/// An outbox written before pushes existed (schema.sql without the `pushes`
/// table) gains the table at its next writable open, keeping its rows; read-only
/// verbs on such a file see no pushes instead of failing.
#[test]
fn an_outbox_from_before_pushes_gets_the_table_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite");
    let schema = midas_worker::outbox::SCHEMA;
    let start = schema.find("-- Verified WeChat payment pushes").unwrap();
    let end = schema.find("CREATE TABLE IF NOT EXISTS meta").unwrap();
    let old = format!("{}{}", &schema[..start], &schema[end..]);
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&old).unwrap();
        c.execute(
            "INSERT INTO operator_actions (at, actor, action, target, detail) VALUES (1, 'a', 'b', 'c', 'd')",
            [],
        )
        .unwrap();
    }
    let ro = midas_worker::outbox::store::Store::open_ro(&midas_worker::outbox::Location::Sqlite(
        path.clone(),
    ))
    .unwrap();
    assert!(ro
        .pushes(&Default::default(), None, true)
        .unwrap()
        .is_empty());
    assert!(ro.push_counts().unwrap().is_empty());
    drop(ro);
    let c = midas_worker::outbox::open_rw(&path, None).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM pushes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    let kept: i64 = c
        .query_row("SELECT COUNT(*) FROM operator_actions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, 1);
}

/// Guarantee 10 for pushes: with the shared outbox out of reach, a push is
/// answered `99999` (within WeChat's 3 s) and `/readyz` says the outbox is down;
/// once PostgreSQL is back, WeChat's next try is stored and answered success, and
/// its event published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_the_outbox_cannot_store_is_answered_failure_then_success_when_it_can() {
    let db = crate::common::pg::TestDb::new("push-down").await;
    let mut env = push_env("push-pgdown");
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let via_proxy = db.url.replacen(
        "127.0.0.1:5432",
        &proxy.url_http().replace("http://", ""),
        1,
    );
    env.share_outbox(&db);
    env.set("OUTBOX__URL", &via_proxy);
    let w = env.worker("http://127.0.0.1:9").await;
    let base = format!("http://{}", w.push_addr.expect("push listener"));
    let no = format!("PGDOWN{}", rand::random::<u32>());
    proxy.down();
    let p = signed(GOODS_EVENT, &goods_payload(&no, "o-1"), false, false);
    // answered (non-zero, so WeChat pushes again) by the store's deadline at the
    // latest, src/push/server.rs ANSWER_WITHIN; the guard only stops a hang
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        post(&base, APPID, &p.query, p.body),
    )
    .await
    .expect("answered while the outbox cannot write");
    assert_eq!(answer, (200, 99999));
    let (status, body) = http_get(w.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(db.count("SELECT COUNT(*) FROM pushes").await, 0);
    proxy.up();
    // WeChat pushes again: stored now (the writer reconnects on its own)
    let mut answered = (0, -1);
    for _ in 0..20 {
        let p = signed(GOODS_EVENT, &goods_payload(&no, "o-1"), false, false);
        answered = post(&base, APPID, &p.query, p.body).await;
        if answered == (200, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(answered, (200, 0));
    assert_eq!(db.count("SELECT COUNT(*) FROM pushes").await, 1);
    let events = drain_events(&event_queue(&env), 1, T).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["out_trade_no"], no.as_str());
    w.stop().await;
    delete_queues(&env).await;
}
