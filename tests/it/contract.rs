//! Promises of the outside contract (docs/contract.md, docs/config.md) that no other
//! test held the worker to, each checked end to end the way a game server or an
//! operator would notice it: a real RabbitMQ, a real SQLite outbox, the project's
//! Midas simulator over HTTP, the worker in process or as the real binary.
//!
//! - Guarantees 2 and 4: a re-sent command gets its final reply again, byte for
//!   byte, under its own correlation_id (succeeded, failed and unknown jobs, before
//!   and after a restart), without a new call to Midas.
//! - Guarantee 6: `balance` is retried on transient answers until
//!   `retry.balance_give_up_after` from its arrival, then `unknown` (never before).
//! - `midas.max_rps` and `midas.max_in_flight` limit what Midas sees (the
//!   simulator's order times and its peak of concurrent calls).
//! - Guarantee 7: with the most verbose logging, no AppKey, app secret, access
//!   token, session_key or broker password reaches the logs, replies, `/metrics`,
//!   `check-config` or the `outbox` verbs.
//! - `simulated: true` only in simulator mode.
//!
//! Time checks assert lower bounds (a limiter or a retry window can only make things
//! slower) and upper bounds with a wide margin; commands are queued before the worker
//! starts where the pace of publishing could otherwise hide a missing limit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use midas_worker::client::GameClient;
use midas_worker::command::Status;
use midas_worker::secret::Secret;
use midas_worker::sim::{Faults, SimApp, SimHandle, Simulator};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_midas-worker");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
const V1_APPID: &str = "wx1234567";
const V2_APPID: &str = "wx7654321";
const V2_KEY: &str = "contract-v2-app-key-0123456789";
const V2_SECRET: &str = "contract-v2-app-secret-0123456789";

/// Read replies until every id in `want` has one; every reply read (any id) is
/// returned, so repeats are seen too.
async fn replies_for(c: &mut GameClient, want: &[&str]) -> BTreeMap<String, Vec<Vec<u8>>> {
    let deadline = tokio::time::Instant::now() + T;
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    while !want.iter().all(|w| got.contains_key(*w)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_reply(left).await {
            Ok(r) => got.entry(r.correlation_id).or_default().push(r.raw),
            Err(e) => panic!("replies for {want:?}: got only {:?}: {e}", got.keys()),
        }
    }
    got
}

fn json_of(raw: &[u8]) -> Value {
    serde_json::from_slice(raw).expect("the reply is JSON")
}

fn unix_ms(rfc3339: &str) -> i64 {
    let t = humantime::parse_rfc3339(rfc3339).expect("RFC 3339 time in the reply");
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch");
    i64::try_from(d.as_millis()).expect("fits")
}

fn pay_calls(sim: &SimHandle) -> u64 {
    sim.ledger().calls.get("pay").copied().unwrap_or(0)
}

// ------------------------------------------------------------- repeated replies

/// Guarantees 2 and 4: "Sending the same command again (same bill_no, same
/// parameters) joins the existing order and, once it is final, gets the same final
/// reply again", and "when a reply is sent again it is identical". Checked for a
/// `succeeded`, a `failed` and an `unknown` job, by the same worker and by a
/// restarted one (the reply then comes from the outbox), each re-send answered under
/// its own correlation_id and none of them calling Midas again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_command_gets_the_same_final_reply_byte_for_byte() {
    let mut env = TestEnv::new("c-same");
    env.set("RETRY__GIVE_UP_AFTER", "1500ms");
    let sim = env.simulator(Faults::default()).await;
    let mut worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let b = unique("SAME");
    let cmds = [
        ("ok", pay(&format!("{b}-ok"), "same-a", 10)),
        // more than the 1,000,000 the simulator's players start with: 90013
        ("no", pay(&format!("{b}-no"), "same-b", 2_000_000)),
        ("unk", pay(&format!("{b}-unk"), "same-c", 5)),
    ];
    c.publish(cmds[0].1.as_bytes(), "ok-1")
        .await
        .expect("publish");
    c.publish(cmds[1].1.as_bytes(), "no-1")
        .await
        .expect("publish");
    let ok = c.reply_for("ok-1", T).await.expect("reply ok-1");
    let no = c.reply_for("no-1", T).await.expect("reply no-1");
    assert_eq!(ok.reply.status, Some(Status::Succeeded), "{:?}", ok.reply);
    assert_eq!(no.reply.status, Some(Status::Failed), "{:?}", no.reply);
    assert_eq!(no.reply.errcode, Some(90013));
    // Midas busy until the retry deadline: unknown / retries_exhausted
    sim.set_faults(Faults {
        busy_rate: 1.0,
        ..Faults::default()
    });
    c.publish(cmds[2].1.as_bytes(), "unk-1")
        .await
        .expect("publish");
    let unk = c.reply_for("unk-1", T).await.expect("reply unk-1");
    assert_eq!(unk.reply.status, Some(Status::Unknown), "{:?}", unk.reply);
    assert_eq!(unk.reply.error.as_deref(), Some("retries_exhausted"));
    // Midas is fine again: a re-send must still not call it (the job is final)
    sim.set_faults(Faults::default());
    let first: BTreeMap<&str, Vec<u8>> = [("ok", ok.raw), ("no", no.raw), ("unk", unk.raw)].into();
    let calls = pay_calls(&sim);
    let orders = sim.ledger().orders.len();

    for round in 2..=3 {
        if round == 3 {
            // a restarted worker answers from the outbox
            worker.stop().await;
            worker = env.worker(&sim.base_url()).await;
        }
        for (name, body) in &cmds {
            c.publish(body.as_bytes(), &format!("{name}-{round}"))
                .await
                .expect("publish");
        }
        let ids: Vec<String> = cmds.iter().map(|(n, _)| format!("{n}-{round}")).collect();
        let want: Vec<&str> = ids.iter().map(String::as_str).collect();
        let got = replies_for(&mut c, &want).await;
        for (id, raws) in &got {
            // "ok-2" → the reply of "ok"; a repeat of an earlier id must agree too
            let name = id.split('-').next().expect("id");
            let expected = first.get(name).unwrap_or_else(|| panic!("unexpected {id}"));
            for raw in raws {
                assert_eq!(
                    String::from_utf8_lossy(raw),
                    String::from_utf8_lossy(expected),
                    "the reply to {id} differs from the first reply"
                );
            }
        }
    }
    assert_eq!(
        pay_calls(&sim),
        calls,
        "a re-sent final command called Midas"
    );
    assert_eq!(sim.ledger().orders.len(), orders, "a re-send moved money");
    worker.stop().await;
    env.cleanup(&c).await;
}

// ------------------------------------------------------------- balance give-up

/// Guarantee 6: `balance` commands "are retried like any transient answer until
/// `retry.balance_give_up_after` (default 30 s) after they arrived; only then the
/// reply is `unknown`". Midas answers every getbalance with -1 or HTTP 502; with a
/// 2 s window the reply is `unknown` / `retries_exhausted`, after several calls,
/// each counted in `attempts`, and never before the window has passed (the worker
/// once gave up when its next retry would fall past the window: up to one backoff,
/// `retry.max`, early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_under_transient_answers_is_retried_until_the_window_then_unknown() {
    let mut env = TestEnv::new("c-bal");
    env.set("RETRY__BALANCE_GIVE_UP_AFTER", "2s");
    let window = Duration::from_secs(2);
    let sim = env
        .simulator(Faults {
            // half -1 (busy), the rest HTTP 502: both transient
            busy_rate: 0.5,
            http_502_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let sent = Instant::now();
    c.publish(br#"{"op":"balance","openid":"bal-busy"}"#, "bal")
        .await
        .expect("publish");
    let r = c.reply_for("bal", T).await.expect("a balance reply");
    let elapsed = sent.elapsed();
    let reply = &r.reply;
    assert_eq!(reply.status, Some(Status::Unknown), "{reply:?}");
    assert_eq!(
        reply.error.as_deref(),
        Some("retries_exhausted"),
        "{reply:?}"
    );
    assert_eq!(reply.balance, None, "no balance without an answer");
    assert!(reply.attempts > 1, "retried: {} call(s)", reply.attempts);
    assert_eq!(
        sim.ledger().calls.get("getbalance").copied().unwrap_or(0),
        u64::from(reply.attempts),
        "every call is counted in attempts"
    );
    let received = unix_ms(reply.received_at.as_deref().expect("received_at"));
    let finished = unix_ms(reply.finished_at.as_deref().expect("finished_at"));
    let ms = |d: Duration| i64::try_from(d.as_millis()).expect("ms");
    assert!(
        finished - received >= ms(window),
        "unknown {} ms after receipt, with retry.balance_give_up_after = {window:?} \
         ({} calls)",
        finished - received,
        reply.attempts
    );
    assert!(
        elapsed >= window,
        "the reply came {elapsed:?} after the publish"
    );
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    worker.stop().await;
    env.cleanup(&c).await;
}

// ------------------------------------------------------------- call limits

/// `midas.max_rps = 20` (per appid): 60 pays for 60 players, all queued before the
/// worker starts, reach Midas over at least (60 − 20) / 20 = 2 s, since the
/// limiter's bucket holds at most `max_rps` tokens (src/engine/scheduler.rs). The
/// bound is checked at 90 % (the first calls also wait for the access token, which
/// can only narrow the span seen at the simulator by that fetch's time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rps_paces_the_calls_to_midas() {
    let mut env = TestEnv::new("c-rps");
    env.set("MIDAS__MAX_RPS", "20");
    let sim = env.simulator(Faults::default()).await;
    let mut c = env.client().await;
    let b = unique("RPS");
    let n = 60;
    for i in 0..n {
        c.publish(
            pay(&format!("{b}-{i}"), &format!("rps{i}"), 1).as_bytes(),
            &format!("{b}-{i}"),
        )
        .await
        .expect("publish");
    }
    let worker = env.worker(&sim.base_url()).await;
    let got = replies(&mut c, n, T).await;
    assert!(got
        .iter()
        .all(|r| r.reply.status == Some(Status::Succeeded)));
    let ledger = sim.ledger();
    let at: Vec<i64> = ledger
        .orders
        .iter()
        .filter(|o| o.bill_no.starts_with(&b))
        .map(|o| o.at_ms)
        .collect();
    assert_eq!(at.len(), n, "every pay reached Midas once");
    let first = at.iter().min().copied().expect("calls");
    let last = at.iter().max().copied().expect("calls");
    let span = last - first;
    // (60 − burst 20) / 20 per s = 2000 ms
    assert!(
        span >= 1_800,
        "60 calls at max_rps = 20 took only {span} ms from first to last"
    );
    assert!(span < 30_000, "{span} ms for 60 calls");
    worker.stop().await;
    env.cleanup(&c).await;
}

/// `midas.max_in_flight = 2`: with every answer taking 300 ms and 10 players' pays
/// queued before the worker starts, the simulator never sees more than 2 calls at
/// once, and the 10 calls (5 rounds of 2) span at least 4 × 300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_caps_the_calls_midas_sees_at_once() {
    let mut env = TestEnv::new("c-inflight");
    env.set("MIDAS__MAX_IN_FLIGHT", "2");
    // a 300 ms answer must never look like a timeout, even on a loaded machine
    env.set("MIDAS__REQUEST_TIMEOUT", "10s");
    let sim = env
        .simulator(Faults {
            latency_ms: 300,
            ..Faults::default()
        })
        .await;
    let mut c = env.client().await;
    let b = unique("INF");
    let n = 10;
    for i in 0..n {
        c.publish(
            pay(&format!("{b}-{i}"), &format!("inf{i}"), 1).as_bytes(),
            &format!("{b}-{i}"),
        )
        .await
        .expect("publish");
    }
    let worker = env.worker(&sim.base_url()).await;
    let got = replies(&mut c, n, T).await;
    assert!(got
        .iter()
        .all(|r| r.reply.status == Some(Status::Succeeded)));
    let ledger = sim.ledger();
    assert!(
        ledger.peak_in_flight <= 2,
        "{} calls at once at Midas with max_in_flight = 2",
        ledger.peak_in_flight
    );
    // 10 players ready at once: the cap, not a lack of work, is what held it at 2
    // (without the cap it would reach 10, and 1 would mean no concurrency at all)
    assert_eq!(
        ledger.peak_in_flight, 2,
        "max_in_flight = 2 with 10 players waiting: exactly 2 calls at once"
    );
    let at: Vec<i64> = ledger
        .orders
        .iter()
        .filter(|o| o.bill_no.starts_with(&b))
        .map(|o| o.at_ms)
        .collect();
    assert_eq!(at.len(), n, "every pay reached Midas once");
    let span = at.iter().max().expect("calls") - at.iter().min().expect("calls");
    assert!(
        span >= 4 * 300 - 50,
        "10 calls of 300 ms, 2 at a time, within {span} ms"
    );
    assert!(span < 30_000, "{span} ms");
    worker.stop().await;
    env.cleanup(&c).await;
}

// ------------------------------------------------------------- secrets

/// The test settings plus a second app on virtual payment 2.0, with its own secrets.
fn two_app_env(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    env.set("APPS__1__APPID", V2_APPID)
        .set("APPS__1__OFFER_ID", "87654321")
        .set("APPS__1__APP_KEY_ENV", "MIDAS_APP_KEY_V2")
        .set("APPS__1__APP_SECRET_ENV", "WECHAT_APP_SECRET_V2")
        .set("APPS__1__API", "v2")
        .set("APPS__1__DEFAULT_USER_IP", "203.0.113.7");
    env.env.insert("MIDAS_APP_KEY_V2".into(), V2_KEY.into());
    env.env
        .insert("WECHAT_APP_SECRET_V2".into(), V2_SECRET.into());
    env
}

async fn two_app_simulator(env: &TestEnv) -> SimHandle {
    let mut cfg = env.settings().config.simulator;
    cfg.initial_balance = 1_000_000;
    let app = |appid: &str, key: &str, secret: &str| SimApp {
        appid: appid.into(),
        app_key: Secret::new(key),
        sandbox_key: Secret::new("contract-sandbox-key"),
        app_secret: Secret::new(secret),
    };
    Simulator::new(
        cfg,
        vec![
            app(V1_APPID, APP_KEY, APP_SECRET),
            app(V2_APPID, V2_KEY, V2_SECRET),
        ],
    )
    .start()
    .await
    .expect("simulator")
}

/// `midas-worker [--log-format FORMAT] run` with `RUST_LOG=trace`, stdout and stderr
/// both written to `log`.
fn spawn_traced(env: &TestEnv, midas_url: &str, log: &Path, format: &str) -> std::process::Child {
    let file = std::fs::File::create(log).expect("log file");
    let err = file.try_clone().expect("log file");
    std::process::Command::new(BIN)
        .args(["--config", CONFIG, "--log-format", format, "run"])
        .envs(&env.env)
        .env("MIDAS_WORKER__MIDAS__BASE_URL", midas_url)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn worker")
}

/// A verb of the binary with the test's environment and `RUST_LOG=trace`: its exit
/// status and everything it printed (stdout, then stderr).
async fn verb(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["--config", CONFIG])
        .args(args)
        .envs(&env.env)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Guarantee 7: "AppKeys, app secrets, access tokens, session_keys and the broker
/// and database passwords never appear in logs, replies, metrics, `check-config` or
/// audit output." The worker runs as the real binary with `RUST_LOG=trace` (in JSON
/// and in human format) through every path that handles a secret: 1.0 calls with
/// `mp_sig` (session_key), a wrong session_key, 2.0 calls (`pay_sig` and
/// `signature`), balance on both APIs, access tokens fetched, revoked and fetched
/// again, and a job pending with its session_key still stored while the `outbox`
/// verbs read it. No output may hold any of those values, nor `guest:guest@`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_trace_logs_replies_metrics_or_cli_output() {
    for format in ["json", "human"] {
        secrets_stay_out_of_every_output(format).await;
    }
}

async fn secrets_stay_out_of_every_output(format: &str) {
    const SK_V1: &str = "SKv1secretAbC123xyz";
    const SK_V2: &str = "SKv2secretDeF456uvw";
    const SK_RIGHT: &str = "SKregisteredGhI789rst";
    const SK_WRONG: &str = "SKwrongsecretJkL012opq";
    const SK_PENDING: &str = "SKpendingsecretMnO345lmn";
    let mut env = two_app_env(&format!("c-secret-{format}"));
    let port = free_port();
    env.set("HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    let sim = two_app_simulator(&env).await;
    sim.register_session("sec-v1", SK_V1);
    sim.register_session("sec-v2", SK_V2);
    sim.register_session("sec-wrong", SK_RIGHT);
    let mut c = env.client().await;
    let log = env.dir.path().join("worker.log");
    let mut child = spawn_traced(&env, &sim.base_url(), &log, format);
    let b = unique("SEC");
    let bill = |s: &str| format!("{b}-{s}");
    let cmd = |appid: &str, fields: Value, openid: &str, key: &str| {
        let mut v = fields;
        v["appid"] = json!(appid);
        v["openid"] = json!(openid);
        v["session_key"] = json!(key);
        v.to_string().into_bytes()
    };
    let mut raws: Vec<Vec<u8>> = Vec::new();
    let first = [
        (
            "p1",
            cmd(
                V1_APPID,
                json!({"op": "pay", "bill_no": bill("p1"), "amt": 3}),
                "sec-v1",
                SK_V1,
            ),
        ),
        (
            "bal1",
            cmd(V1_APPID, json!({"op": "balance"}), "sec-v1", SK_V1),
        ),
        (
            "w",
            cmd(
                V1_APPID,
                json!({"op": "pay", "bill_no": bill("w"), "amt": 3}),
                "sec-wrong",
                SK_WRONG,
            ),
        ),
        (
            "p2",
            cmd(
                V2_APPID,
                json!({"op": "pay", "bill_no": bill("p2"), "amt": 4}),
                "sec-v2",
                SK_V2,
            ),
        ),
        (
            "bal2",
            cmd(V2_APPID, json!({"op": "balance"}), "sec-v2", SK_V2),
        ),
    ];
    for (id, body) in &first {
        c.publish(body, id).await.expect("publish");
    }
    let mut status = BTreeMap::new();
    for (id, _) in &first {
        let r = c.reply_for(id, T).await.expect("reply");
        status.insert(*id, (r.reply.status, r.reply.errcode));
        raws.push(r.raw);
    }
    assert_eq!(status["p1"].0, Some(Status::Succeeded), "{status:?}");
    assert_eq!(status["bal1"].0, Some(Status::Succeeded), "{status:?}");
    assert_eq!(
        status["w"],
        (Some(Status::Failed), Some(90009)),
        "mp_sig wrong"
    );
    assert_eq!(status["p2"].0, Some(Status::Succeeded), "{status:?}");
    assert_eq!(status["bal2"].0, Some(Status::Succeeded), "{status:?}");

    // every token revoked: both apps get 40001 and fetch new ones
    sim.revoke_tokens();
    let again = [
        (
            "p3",
            cmd(
                V1_APPID,
                json!({"op": "pay", "bill_no": bill("p3"), "amt": 5}),
                "sec-v1",
                SK_V1,
            ),
        ),
        (
            "p4",
            cmd(
                V2_APPID,
                json!({"op": "pay", "bill_no": bill("p4"), "amt": 6}),
                "sec-v2",
                SK_V2,
            ),
        ),
    ];
    for (id, body) in &again {
        c.publish(body, id).await.expect("publish");
    }
    for (id, _) in &again {
        let r = c.reply_for(id, T).await.expect("reply");
        assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
        raws.push(r.raw);
    }

    // a job that keeps its session_key in the outbox while it waits on a busy Midas
    sim.set_faults(Faults {
        busy_rate: 1.0,
        ..Faults::default()
    });
    c.publish(
        &cmd(
            V1_APPID,
            json!({"op": "pay", "bill_no": bill("pend"), "amt": 7}),
            "sec-pend",
            SK_PENDING,
        ),
        "pend",
    )
    .await
    .expect("publish");
    let db = env.outbox_path();
    let pend = bill("pend");
    assert!(
        eventually(T, || job_field(&db, &pend, "pay", "attempts")
            .is_some_and(|a| a != "0"))
        .await,
        "the pending job called Midas"
    );
    assert!(
        job_field(&db, &pend, "pay", "session_key").is_some(),
        "the pending job holds its session_key (what the audit verbs must not show)"
    );
    let mut outputs: Vec<(String, String)> = Vec::new();
    for args in [
        vec!["outbox", "show", pend.as_str()],
        vec!["outbox", "show", pend.as_str(), "--json"],
        vec!["outbox", "export"],
        vec!["outbox", "export", "--format", "csv"],
        vec!["outbox", "list", "--json"],
    ] {
        let (ok, text) = verb(&env, &args).await;
        assert!(ok, "{args:?} failed: {text}");
        assert!(
            text.contains(&pend),
            "{args:?} shows the pending job: {text}"
        );
        outputs.push((format!("{args:?} (pending)"), text));
    }
    sim.set_faults(Faults::default());
    let r = c.reply_for("pend", T).await.expect("reply");
    assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
    raws.push(r.raw);

    let (code, metrics) = http_get(([127, 0, 0, 1], port).into(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("midas_worker_"), "{metrics}");
    outputs.push(("/metrics".into(), metrics));
    for args in [vec!["check-config"], vec!["check-config", "--json"]] {
        let (ok, text) = verb(&env, &args).await;
        assert!(ok, "{args:?} failed: {text}");
        assert!(text.contains("app_key"), "{args:?} lists the keys: {text}");
        outputs.push((format!("{args:?}"), text));
    }
    for s in ["p1", "w", "p2", "p3", "p4", "pend"] {
        let id = bill(s);
        for json in [false, true] {
            let mut args = vec!["outbox", "show", id.as_str()];
            if json {
                args.push("--json");
            }
            let (ok, text) = verb(&env, &args).await;
            assert!(ok, "{args:?} failed: {text}");
            assert!(text.contains(&id), "{args:?}: {text}");
            outputs.push((format!("{args:?}"), text));
        }
    }
    for args in [
        vec!["outbox", "export"],
        vec!["outbox", "export", "--format", "csv"],
        vec!["outbox", "list", "--json"],
        vec!["outbox", "stats", "--json"],
    ] {
        let (ok, text) = verb(&env, &args).await;
        assert!(ok, "{args:?} failed: {text}");
        outputs.push((format!("{args:?}"), text));
    }
    assert!(
        terminate(&mut child, Duration::from_secs(30)),
        "the worker stops on SIGTERM"
    );
    let logs = std::fs::read_to_string(&log).expect("worker log");
    // RUST_LOG=trace is in force: the worker's own debug lines are there (only the
    // dependencies are capped at warn, SECURITY.md "Log leaks")
    assert!(
        logs.contains("DEBUG") && logs.contains("midas_worker"),
        "the worker logged below info"
    );
    assert!(
        logs.contains("fetched access token"),
        "the token fetches were logged"
    );
    outputs.push((format!("worker log ({format})"), logs));
    for (i, raw) in raws.iter().enumerate() {
        outputs.push((format!("reply {i}"), String::from_utf8_lossy(raw).into()));
    }

    let tokens = sim.issued_tokens();
    assert!(
        tokens.len() >= 4,
        "two apps, each with a token before and after the revocation: {}",
        tokens.len()
    );
    let mut secrets: Vec<(String, String)> = vec![
        ("AppKey (1.0)".into(), APP_KEY.into()),
        ("app secret (1.0)".into(), APP_SECRET.into()),
        ("AppKey (2.0)".into(), V2_KEY.into()),
        ("app secret (2.0)".into(), V2_SECRET.into()),
        ("session_key (1.0)".into(), SK_V1.into()),
        ("session_key (2.0)".into(), SK_V2.into()),
        ("wrong session_key".into(), SK_WRONG.into()),
        ("pending job's session_key".into(), SK_PENDING.into()),
        ("broker password".into(), "guest:guest@".into()),
    ];
    secrets.extend(
        tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("access token {i}"), t)),
    );
    let mut leaks = BTreeSet::new();
    for (source, text) in &outputs {
        for (what, secret) in &secrets {
            if text.contains(secret.as_str()) {
                leaks.insert(format!("{what} in {source}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets leaked ({format} logs): {leaks:#?}"
    );
    env.cleanup(&c).await;
}

// ------------------------------------------------------------- simulated

/// `simulated`: "`true` when the answer came from the simulator
/// (`midas.environment = "simulator"`)". The real binary in simulator mode answers a
/// pay and a balance from its embedded simulator (a fresh player's 1000 coins, and
/// not the HTTP simulator its `base_url` names) with `"simulated": true`; in
/// production mode, pointed at the simulator's HTTP server, the replies carry no
/// `simulated` at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_simulator_mode_replies_say_simulated() {
    for simulator_mode in [false, true] {
        let mut env = TestEnv::new(if simulator_mode {
            "c-simmode"
        } else {
            "c-prod"
        });
        if simulator_mode {
            env.set("MIDAS__ENVIRONMENT", "simulator");
        }
        let http_sim = env.simulator(Faults::default()).await;
        let mut c = env.client().await;
        let mut child =
            env.spawn_child_logged(&http_sim.base_url(), &env.dir.path().join("worker.log"));
        let bill = unique("SIMF");
        c.publish(pay(&bill, "simflag", 10).as_bytes(), "pay")
            .await
            .expect("publish");
        c.publish(br#"{"op":"balance","openid":"simflag"}"#, "bal")
            .await
            .expect("publish");
        let p = c.reply_for("pay", T).await.expect("pay reply");
        let bal = c.reply_for("bal", T).await.expect("balance reply");
        let stopped = terminate(&mut child, Duration::from_secs(30));
        for r in [&p, &bal] {
            assert_eq!(r.reply.status, Some(Status::Succeeded), "{:?}", r.reply);
            let v = json_of(&r.raw);
            if simulator_mode {
                assert_eq!(v["simulated"], json!(true), "simulator mode: {v}");
            } else {
                assert!(v.get("simulated").is_none(), "production mode: {v}");
            }
        }
        let ledger = http_sim.ledger();
        if simulator_mode {
            // the embedded simulator's players start with config.toml's 1000
            assert_eq!(p.reply.balance, Some(1000 - 10));
            assert_eq!(bal.reply.balance, Some(1000 - 10));
            assert!(
                ledger.calls.values().all(|&n| n == 0) && ledger.orders.is_empty(),
                "simulator mode called the HTTP simulator: {:?}",
                ledger.calls
            );
        } else {
            assert_eq!(p.reply.balance, Some(1_000_000 - 10));
            assert_eq!(orders_for(&ledger, &bill).len(), 1, "charged at base_url");
        }
        assert!(stopped, "the worker stops on SIGTERM");
        env.cleanup(&c).await;
    }
}
