//! The verbs people run first, run at all, from a clean environment: `demo` with no
//! config anywhere, `simulate`, a small `bench`, and `MIDAS_WORKER_CONFIG` naming
//! the config file.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_midas-worker");
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
const MINIMAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/minimal.toml");

/// The binary in `dir` with nothing from the test runner's environment.
fn worker(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied().collect::<BTreeMap<_, _>>())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    cmd
}

/// Run to completion within `limit` (the output goes to files: no pipe to fill).
fn finish(mut cmd: Command, dir: &std::path::Path, limit: Duration) -> Output {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?}: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn demo_runs_with_no_config_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = finish(
        worker(dir.path(), &["demo"], &[]),
        dir.path(),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(
        stdout.contains("succeeded") && stdout.contains("DEMO-"),
        "{stdout}"
    );
}

#[test]
fn midas_worker_config_names_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("elsewhere.toml");
    let minimal = std::fs::read_to_string(MINIMAL).expect("minimal.toml");
    std::fs::write(
        &file,
        format!("{minimal}\n[retry]\ngive_up_after = \"36h\"\n"),
    )
    .expect("write");
    let path = file.display().to_string();
    // no config.toml in the working directory, no --config: only the variable
    let out = finish(
        worker(
            dir.path(),
            &["check-config", "--json"],
            &[("MIDAS_WORKER_CONFIG", &path)],
        ),
        dir.path(),
        Duration::from_secs(30),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["config_file"], path.as_str(), "{stdout}");
    let give_up = v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["key"] == "retry.give_up_after")
        .expect("retry.give_up_after");
    assert_eq!(give_up["value"], "36h");
    assert_eq!(give_up["source"], "file");
    // and without it, the missing config.toml is named
    let out = finish(
        worker(dir.path(), &["check-config"], &[]),
        dir.path(),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("config.toml"), "{}", text(&out).1);
}

#[test]
fn simulate_serves_midas_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = worker(
        dir.path(),
        &["--config", SHIPPED, "simulate", "--listen", &listen],
        &[],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn");
    // the token endpoint answers (an error for a request without credentials)
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = loop {
        let got = std::net::TcpStream::connect(&listen)
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                s.write_all(
                    b"GET /cgi-bin/token?grant_type=client_credential HTTP/1.0\r\nHost: x\r\n\r\n",
                )
                .ok()?;
                let mut resp = String::new();
                s.read_to_string(&mut resp).ok()?;
                Some(resp)
            });
        match got {
            Some(resp) if resp.starts_with("HTTP/1.") => break Some(resp),
            _ if Instant::now() > deadline => break None,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    crate::common::kill9(&mut child);
    let resp = answered.expect("the simulator answers HTTP");
    let status = resp
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(status.starts_with('2') || status.starts_with('4'), "{resp}");
    assert!(resp.contains("errcode"), "a Midas answer: {resp}");
}

#[test]
fn bench_runs_a_small_ledger_checked_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = finish(
        worker(
            dir.path(),
            &[
                "--config",
                SHIPPED,
                "bench",
                "--jobs",
                "20",
                "--users",
                "5",
                "--midas-latency",
                "0ms",
                "--steady",
                "1s",
                "--rate",
                "20",
                "--outage",
                "0s",
            ],
            &[],
        ),
        dir.path(),
        Duration::from_secs(180),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(stdout.contains("exactly once (ledger)"), "{stdout}");
    assert!(stdout.contains("0 more than once"), "{stdout}");
}
