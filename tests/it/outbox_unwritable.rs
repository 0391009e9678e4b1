//! Guarantee 10 against the real thing: an outbox that cannot write. A SQLite
//! worker whose disk (a small tmpfs) is filled to the last byte, and three
//! PostgreSQL workers whose database (a private cluster this test starts with
//! `initdb` on a port of its own) is restarted and then stopped for a while. In
//! both the workers must stay up, take no command they cannot store (no ack, so
//! nothing is lost), say so on `/readyz` (503) and `/metrics`, log the episode
//! once instead of once per failed write, and resume by themselves — every
//! command answered, every reply in agreement with the simulator's ledger.
//!
//! Both need root (mounting a tmpfs; running `initdb` as the `postgres` user) and
//! the PostgreSQL server binaries; CI runs as root with them installed. Where they
//! are missing the test fails with one line saying what is needed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use midas_worker::client::{GameClient, Received};
use midas_worker::sim::Faults;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A tmpfs of `size` mounted at a fresh directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        assert!(
            is_root(),
            "outbox_unwritable: this test mounts a tmpfs and needs root (CI runs as root); run the suite as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "outbox_unwritable: `mount -t tmpfs` failed at {} (needs root and a kernel that allows it)",
            dir.path().display()
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write zeros to `filler` until the disk says it is full; returns the bytes written.
    fn fill(&self) -> u64 {
        let mut f = std::fs::File::create(self.path().join("filler")).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        // bounded by the tmpfs size; a 1-byte loop after the big chunks takes the rest
        while f.write_all(&chunk).is_ok() {
            n += chunk.len() as u64;
        }
        while f.write_all(&[0]).is_ok() {
            n += 1;
        }
        let _ = f.sync_all();
        n
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let s = r.status().as_u16();
    Some((s, r.text().await.unwrap_or_default()))
}

async fn wait_ready(port: u16, want: u16, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if get(port, "/readyz").await.is_some_and(|(s, _)| s == want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn send(c: &GameClient, sent: &mut BTreeMap<String, (String, String)>, tag: &str, n: usize) {
    let base = sent.len();
    for i in base..base + n {
        let bill = format!("{tag}-{i}");
        c.publish(pay(&bill, &format!("u{}", i % 7), 1).as_bytes(), &bill)
            .await
            .expect("publish");
        sent.insert(bill.clone(), ("pay".into(), bill));
    }
}

fn lines_with(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn alive(c: &mut Child) -> bool {
    matches!(c.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_and_the_worker_resumes_by_itself_losing_nothing() {
    let disk = SmallDisk::mount("6m");
    let mut env = TestEnv::new("full");
    let port = free_port();
    env.set(
        "OUTBOX__PATH",
        &disk.path().join("outbox.sqlite").display().to_string(),
    );
    env.set("HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    let sim = env.simulator(Faults::default()).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("worker.log");
    let mut worker = env.spawn_child_logged(&sim.base_url(), &log);
    let mut c = env.client().await;
    let mut sent = BTreeMap::new();
    let mut got: Vec<Received> = Vec::new();

    send(&c, &mut sent, "F", 20).await;
    collect_more(&mut c, &sent, &mut got, Duration::from_secs(60)).await;
    assert!(
        wait_ready(port, 200, Duration::from_secs(10)).await,
        "ready before the disk fills"
    );

    let filled = disk.fill();
    assert!(filled > 0, "the filler took the free space");
    // Commands keep coming; the WAL may still have room for a few, then intake
    // fails with SQLITE_FULL and /readyz turns 503.
    let mut full = false;
    for _ in 0..20 {
        send(&c, &mut sent, "F", 25).await;
        if wait_ready(port, 503, Duration::from_secs(1)).await {
            full = true;
            break;
        }
    }
    assert!(full, "/readyz says 503 while the disk is full");
    let (_, m) = get(port, "/metrics").await.expect("metrics while full");
    assert_eq!(metric(&m, "midas_worker_outbox_writable"), Some(0.0), "{m}");
    assert!(metric(&m, "midas_worker_outbox_write_failures_total").unwrap_or(0.0) >= 1.0);
    let (_, r) = get(port, "/readyz").await.expect("readyz");
    assert!(
        r.contains("outbox: down (disk full)"),
        "readyz names the cause: {r}"
    );
    // a full disk for a while: the worker keeps failing quietly (more failed
    // commits, counted) and stays up through them
    let failures = |m: &str| metric(m, "midas_worker_outbox_write_failures_total").unwrap_or(0.0);
    let before = failures(&m);
    let mut more = false;
    for _ in 0..60 {
        send(&c, &mut sent, "F", 5).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (_, now) = get(port, "/metrics").await.expect("metrics while full");
        if failures(&now) >= before + 3.0 {
            more = true;
            break;
        }
    }
    assert!(more, "the worker went on trying (and failing) to write");
    assert!(
        alive(&mut worker),
        "the worker stays up while the disk is full"
    );

    disk.free();
    assert!(
        wait_ready(port, 200, Duration::from_secs(30)).await,
        "ready again once the disk has room"
    );
    collect_more(&mut c, &sent, &mut got, Duration::from_secs(90)).await;
    check_ledger_ops(&sent, &got, &sim.ledger());
    assert!(alive(&mut worker), "the worker never stopped");
    let (_, m) = get(port, "/metrics").await.expect("metrics after");
    assert_eq!(metric(&m, "midas_worker_outbox_writable"), Some(1.0));
    assert_eq!(
        metric(&m, "midas_worker_outbox_unwritable_episodes_total"),
        Some(1.0),
        "{m}"
    );
    assert!(
        terminate(&mut worker, Duration::from_secs(20)),
        "SIGTERM ends it cleanly"
    );

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        lines_with(&log, "the outbox cannot write"),
        1,
        "one line when the episode starts:\n{text}"
    );
    assert_eq!(
        lines_with(&log, "can write again"),
        1,
        "one when it ends:\n{text}"
    );
    assert_eq!(
        lines_with(&log, "corrupt"),
        0,
        "a full disk is not corruption:\n{text}"
    );
    assert!(
        text.lines().count() <= 12,
        "a full disk is a few lines of log, not hundreds:\n{text}"
    );
    env.cleanup(&c).await;
}

// ------------------------------------------------------------- a private PostgreSQL

/// A PostgreSQL cluster of this test's own: `initdb` in a temp dir, started on a
/// free port, trust auth on loopback. Stopped (immediately) on drop.
struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    port: u16,
    log: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|b| b.join("initdb").exists() && b.join("pg_ctl").exists());
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    match versions.pop() {
        Some(b) => b,
        None => panic!(
            "outbox_unwritable: needs PostgreSQL's server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin; apt-get install postgresql)"
        ),
    }
}

impl PrivatePg {
    fn start() -> PrivatePg {
        let bin = pg_bin();
        let root = is_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let log = dir.path().join("pg.log");
        if root {
            // initdb refuses to run as root: the cluster belongs to `postgres`
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "outbox_unwritable: cannot give {} to the postgres user (is PostgreSQL installed?)",
                dir.path().display()
            );
        }
        let pg = PrivatePg {
            bin,
            data,
            _dir: dir,
            port: free_port(),
            log,
        };
        let init = pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        assert!(
            init,
            "outbox_unwritable: initdb failed for the private cluster"
        );
        assert!(
            pg.ctl("start"),
            "outbox_unwritable: the private cluster did not start"
        );
        pg
    }

    /// Run one of the server binaries (as `postgres` when we are root).
    fn run(&self, tool: &str, args: &[&str]) -> bool {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn ctl(&self, verb: &str) -> bool {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c max_connections=60",
            self.port
        );
        let data = self.data.display().to_string();
        let log = self.log.display().to_string();
        let mut args = vec!["-D", &data, "-w", "-t", "60", "-m", "fast", "-l", &log];
        if verb != "stop" {
            args.extend(["-o", &opts]);
        }
        args.push(verb);
        self.run("pg_ctl", &args)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_ride_out_a_postgresql_restart_and_a_stop_losing_nothing() {
    let pg = PrivatePg::start();
    let mut env = TestEnv::new("pgdown");
    env.set("OUTBOX__URL", &pg.url());
    env.set("OUTBOX__LEASE", "7s");
    let sim = env.simulator(Faults::default()).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let mut workers: Vec<(crate::common::ChildWorker, u16, PathBuf)> = (0..3)
        .map(|i| {
            let port = free_port();
            let mut e = TestEnv {
                tag: env.tag.clone(),
                dir: tempfile::tempdir().expect("tempdir"),
                env: env.env.clone(),
            };
            e.set("HTTP__LISTEN", &format!("127.0.0.1:{port}"));
            let log = logs.path().join(format!("w{i}.log"));
            (e.spawn_child_logged(&sim.base_url(), &log), port, log)
        })
        .collect();
    let mut c = env.client().await;
    let mut sent = BTreeMap::new();
    let mut got: Vec<Received> = Vec::new();

    send(&c, &mut sent, "G", 30).await;
    collect_more(&mut c, &sent, &mut got, Duration::from_secs(60)).await;
    for (w, _, log) in workers.iter_mut() {
        assert!(
            alive(w),
            "a worker started on the private cluster: {}",
            std::fs::read_to_string(&*log).unwrap_or_default()
        );
    }
    assert_eq!(got.len(), 30, "answered before any trouble");

    // a restart while commands arrive
    send(&c, &mut sent, "G", 30).await;
    assert!(pg.ctl("restart"), "the private cluster restarts");
    collect_more(&mut c, &sent, &mut got, Duration::from_secs(90)).await;

    // stopped for a while: commands wait in the broker, the workers stay up
    assert!(pg.ctl("stop"), "the private cluster stops");
    send(&c, &mut sent, "G", 30).await;
    let mut unready = 0;
    for (_, port, _) in &workers {
        if wait_ready(*port, 503, Duration::from_secs(15)).await {
            unready += 1;
        }
    }
    assert!(
        unready >= 1,
        "a worker that cannot write says so on /readyz"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (w, _, log) in workers.iter_mut() {
        assert!(
            alive(w),
            "a worker stays up while PostgreSQL is away: {}",
            std::fs::read_to_string(&*log).unwrap_or_default()
        );
    }
    assert!(pg.ctl("start"), "the private cluster starts again");
    for (_, port, _) in &workers {
        assert!(
            wait_ready(*port, 200, Duration::from_secs(60)).await,
            "every worker is ready again by itself"
        );
    }
    collect_more(&mut c, &sent, &mut got, Duration::from_secs(120)).await;
    let ledger = sim.ledger();
    check_ledger_ops(&sent, &got, &ledger);
    assert_eq!(
        ledger.overlapping_calls, 0,
        "two calls for one player at once"
    );
    for (w, port, log) in workers.iter_mut() {
        let text = std::fs::read_to_string(&*log).unwrap_or_default();
        assert!(alive(w), "worker on :{port} never stopped:\n{text}");
        assert_eq!(
            lines_with(log, "corrupt"),
            0,
            "PostgreSQL away is not corruption:\n{text}"
        );
        assert!(
            lines_with(log, "the outbox cannot write") <= 2,
            "one line per episode (the restart, the stop):\n{text}"
        );
        assert!(terminate(w, Duration::from_secs(20)), "SIGTERM ends it");
    }
    env.cleanup(&c).await;
}
