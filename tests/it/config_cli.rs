//! The config as a new user meets it, through the real binary: a file holding only
//! `[[apps]]` runs the worker (real broker, embedded simulator) and answers
//! `/readyz`; `check-config` shows where values came from without printing a
//! password; bad configs and unsafe setups stop with one line and exit status 2
//! before anything connects.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, terminate, unique};
use midas_worker::client::GameClient;

const BIN: &str = env!("CARGO_BIN_EXE_midas-worker");
const MINIMAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/minimal.toml");

/// The binary with a clean environment (nothing from the test runner leaks in).
fn worker(args: &[&str], env: &BTreeMap<String, String>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .env("RUST_LOG", "warn,lapin=off")
        .stdin(Stdio::null());
    cmd
}

/// Run to completion; a verb that should refuse at once must not hang (it would
/// if it tried to connect to a black-holed address).
fn finish(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn readyz(port: u16) -> Option<u16> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .ok()?;
    Some(r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_of_only_apps_runs_answers_readyz_and_stops_on_sigterm() {
    let tag = unique("minimal");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let outbox = dir.path().join("outbox.sqlite");
    let env = env(&[
        ("MIDAS_WORKER__OUTBOX__PATH", &outbox.display().to_string()),
        (
            "MIDAS_WORKER__BROKER__COMMAND_QUEUE",
            &format!("t-{tag}.commands"),
        ),
        (
            "MIDAS_WORKER__BROKER__REPLY_QUEUE",
            &format!("t-{tag}.results"),
        ),
        (
            "MIDAS_WORKER__BROKER__DEAD_LETTER_QUEUE",
            &format!("t-{tag}.dead"),
        ),
        ("MIDAS_WORKER__HTTP__LISTEN", &format!("127.0.0.1:{port}")),
        // the one key `run` needs besides the apps
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "simulator"),
    ]);
    let mut child = worker(&["run", "--config", MINIMAL], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker");
    // ready = broker connected (the default amqp://guest:guest@127.0.0.1) and the
    // outbox writable; wait for that event, bounded
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("the worker exited early: {exit}");
        }
        status = readyz(port).await;
        if status == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = terminate(&mut child, Duration::from_secs(30));
    let settings =
        midas_worker::config::load_from(&std::fs::read_to_string(MINIMAL).unwrap(), &env, "t")
            .expect("settings");
    if let Ok(c) = GameClient::connect(&settings.config.broker, false).await {
        let b = &settings.config.broker;
        c.delete_queues(&[&b.command_queue, &b.reply_queue, &b.dead_letter_queue])
            .await;
    }
    assert_eq!(status, Some(200), "/readyz never answered 200");
    assert!(stopped, "SIGTERM stops the worker with exit status 0");
    assert!(
        outbox.exists(),
        "the outbox was created at the overridden path"
    );
}

#[test]
fn check_config_never_prints_the_broker_or_postgres_password() {
    let secrets = env(&[
        (
            "MIDAS_WORKER__BROKER__URL",
            "amqp://worker:brokerpw-s3cret@127.0.0.1:5672/%2f",
        ),
        (
            "MIDAS_WORKER__OUTBOX__URL",
            "postgres://midas:pgpw-s3cret@db.internal:5432/midas",
        ),
        // too short for the 5 s request timeout: a problem to report too
        ("MIDAS_WORKER__OUTBOX__LEASE", "5s"),
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production"),
        ("MIDAS_APP_KEY", "appkey-s3cret"),
        ("WECHAT_APP_SECRET", "appsecret-s3cret"),
    ]);
    for json in [false, true] {
        let mut args = vec!["check-config", "--config", MINIMAL];
        if json {
            args.push("--json");
        }
        let out = finish(worker(&args, &secrets), Duration::from_secs(30));
        let (stdout, stderr) = text(&out);
        for secret in [
            "brokerpw-s3cret",
            "pgpw-s3cret",
            "appkey-s3cret",
            "appsecret-s3cret",
        ] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{secret} printed: {stdout}{stderr}"
            );
        }
        // the lease problem is reported, exit 2
        assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
        assert!(stdout.contains("outbox.lease"), "{stdout}");
        assert!(
            stdout.contains("amqp://worker:***@127.0.0.1:5672/%2f"),
            "{stdout}"
        );
        assert!(
            stdout.contains("postgres://midas:***@db.internal:5432/midas"),
            "{stdout}"
        );
        if json {
            let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
            assert_eq!(doc["ok"], false);
            let keys = doc["keys"].as_array().expect("keys");
            let url = keys
                .iter()
                .find(|k| k["key"] == "broker.url")
                .expect("broker.url");
            assert_eq!(url["source"], "MIDAS_WORKER__BROKER__URL");
            let key = keys
                .iter()
                .find(|k| k["key"] == "apps[0].app_key")
                .expect("app_key");
            assert_eq!(key["value"], "***");
            assert_eq!(key["source"], "MIDAS_APP_KEY");
        }
    }
    // without the outbox URL the same config is fine
    let mut ok = secrets.clone();
    ok.remove("MIDAS_WORKER__OUTBOX__URL");
    let out = finish(
        worker(&["check-config", "--config", MINIMAL], &ok),
        Duration::from_secs(30),
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("config OK"), "{stdout}");
}

#[test]
fn simulator_mode_refuses_a_shared_broker_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox.sqlite");
    let base = env(&[
        // 10.255.255.1 black-holes: a connection attempt would hang, not fail
        (
            "MIDAS_WORKER__BROKER__URL",
            "amqp://u:p4ss-s3cret@10.255.255.1:5672/%2f",
        ),
        ("MIDAS_WORKER__OUTBOX__PATH", &outbox.display().to_string()),
        ("MIDAS_WORKER__HTTP__LISTEN", "127.0.0.1:0"),
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "simulator"),
    ]);
    let out = finish(
        worker(&["run", "--config", MINIMAL], &base),
        Duration::from_secs(30),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("simulator") && stderr.contains("--allow-simulator-on-shared-broker"),
        "{stderr}"
    );
    assert!(!stderr.contains("p4ss-s3cret"), "{stderr}");
    assert!(!outbox.exists(), "nothing started: no outbox was created");
}

#[test]
fn bad_configs_stop_with_one_line_and_status_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    let minimal = std::fs::read_to_string(MINIMAL).expect("minimal.toml");
    std::fs::write(&file, format!("{minimal}\n[broker]\nprefech = 10\n")).expect("write");
    let path = file.display().to_string();
    let cases: [(&Path, BTreeMap<String, String>, &str); 3] = [
        (Path::new(&path), env(&[]), "prefech"),
        (
            Path::new(MINIMAL),
            env(&[("MIDAS_WORKER__APPS__99999999999__APPID", "wx9")]),
            "out of range",
        ),
        (
            Path::new(MINIMAL),
            // `run` needs midas.environment (no other variable required)
            env(&[]),
            "midas.environment",
        ),
    ];
    for (config, env, needle) in cases {
        let config = config.display().to_string();
        let out = finish(
            worker(&["run", "--config", &config], &env),
            Duration::from_secs(30),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{needle}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// A 2.0 app taking pushes: `check-config` lists the push Token, the
/// EncodingAESKey and the sandbox AppKey with the variable each was read from,
/// masked, never their values; a variable the app names but the environment lacks
/// stops it with one line naming the key.
#[test]
fn check_config_lists_the_push_secrets_masked_with_their_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "[[apps]]\nappid = \"wx2222222\"\noffer_id = \"87654321\"\napi = \"v2\"\n\
         app_key_env = \"MIDAS_APP_KEY_2\"\napp_secret_env = \"WECHAT_APP_SECRET_2\"\n\
         sandbox_app_key_env = \"MIDAS_SANDBOX_APP_KEY_2\"\n\
         push_token_env = \"WECHAT_PUSH_TOKEN_2\"\npush_aes_key_env = \"WECHAT_PUSH_AES_KEY_2\"\n",
    )
    .expect("write");
    let config = file.display().to_string();
    let aes = "pushaeskeys3cretpushaeskeys3cretpushaeskey0";
    let secrets = env(&[
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production"),
        ("MIDAS_APP_KEY_2", "appkey-s3cret"),
        ("WECHAT_APP_SECRET_2", "appsecret-s3cret"),
        ("MIDAS_SANDBOX_APP_KEY_2", "sandboxkey-s3cret"),
        ("WECHAT_PUSH_TOKEN_2", "pushtokens3cret"),
        ("WECHAT_PUSH_AES_KEY_2", aes),
    ]);
    for json in [false, true] {
        let mut args = vec!["check-config", "--config", &config];
        if json {
            args.push("--json");
        }
        let out = finish(worker(&args, &secrets), Duration::from_secs(30));
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        for secret in [
            "appkey-s3cret",
            "appsecret-s3cret",
            "sandboxkey-s3cret",
            "pushtokens3cret",
            aes,
        ] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{secret} printed: {stdout}{stderr}"
            );
        }
        let listed = [
            ("apps[0].sandbox_app_key", "MIDAS_SANDBOX_APP_KEY_2"),
            ("apps[0].push_token", "WECHAT_PUSH_TOKEN_2"),
            ("apps[0].push_aes_key", "WECHAT_PUSH_AES_KEY_2"),
        ];
        if json {
            let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
            let keys = doc["keys"].as_array().expect("keys");
            for (key, var) in listed {
                let k = keys
                    .iter()
                    .find(|k| k["key"] == key)
                    .unwrap_or_else(|| panic!("{key} not listed: {stdout}"));
                assert_eq!(k["value"], "***", "{key}");
                assert_eq!(k["source"], var, "{key}");
            }
            let notes = doc["notes"].to_string();
            assert!(
                notes.contains("wx2222222 has push_token_env but push.listen is not set"),
                "{notes}"
            );
        } else {
            for (key, var) in listed {
                let line = stdout
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(key))
                    .unwrap_or_else(|| panic!("{key} not listed: {stdout}"));
                assert_eq!(
                    line.split_whitespace().collect::<Vec<_>>(),
                    [key, "***", var]
                );
            }
        }
    }
    // each push variable is checked: named but unset stops check-config with its key
    for (var, key) in [
        ("WECHAT_PUSH_TOKEN_2", "apps[0].push_token_env"),
        ("WECHAT_PUSH_AES_KEY_2", "apps[0].push_aes_key_env"),
    ] {
        let mut without = secrets.clone();
        without.remove(var);
        let out = finish(
            worker(&["check-config", "--config", &config], &without),
            Duration::from_secs(30),
        );
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
        let said = format!("{stdout}{stderr}");
        assert!(said.contains(key) && said.contains(var), "{said}");
        assert!(
            !said.contains("pushtokens3cret") && !said.contains(aes),
            "{said}"
        );
    }
    // a malformed EncodingAESKey is refused without being echoed
    let mut bad = secrets.clone();
    bad.insert("WECHAT_PUSH_AES_KEY_2".into(), "short-s3cret-key".into());
    let out = finish(
        worker(&["check-config", "--config", &config], &bad),
        Duration::from_secs(30),
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("apps[0].push_aes_key_env"), "{stderr}");
    assert!(!stderr.contains("short-s3cret-key") && !stdout.contains("short-s3cret-key"));
}
