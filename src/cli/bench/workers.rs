//! The workers of one case: in this process (`worker::start`, one per `--workers`),
//! or, with `--worker child`, one `midas-worker run` child process configured with
//! MIDAS_WORKER__* variables for the case's queues, outbox and simulator (as the
//! integration tests' `spawn_child` does), so its peak RSS and CPU are its own.
//! A child's counters come from its `/metrics`, its memory from `/proc/<pid>/status`;
//! it is stopped with SIGTERM and must exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::future::join_all;

use super::args::{BenchArgs, WorkerMode};
use crate::config::Settings;
use crate::metrics::METRICS;
use crate::worker::Running;

/// (outbox commits, rows committed, Midas calls, replies published).
pub(super) type Totals = (u64, u64, u64, u64);

pub(super) enum Workers {
    InProc(Vec<Running>),
    Child(Box<ChildWorker>),
}

pub(super) struct ChildWorker {
    child: tokio::process::Child,
    pid: u32,
    metrics_url: String,
    log: PathBuf,
}

impl ChildWorker {
    /// The child's Prometheus exposition.
    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(&self.metrics_url)
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

impl Workers {
    /// The counters before any worker of the case starts.
    pub(super) fn totals_before(mode: WorkerMode) -> Totals {
        match mode {
            WorkerMode::Inproc => METRICS.totals(),
            // a fresh process counts from zero
            WorkerMode::Child => (0, 0, 0, 0),
        }
    }

    /// Start the case's workers; `log` receives a child's stderr.
    pub(super) async fn start(
        a: &BenchArgs,
        settings: &Arc<Settings>,
        sim_url: String,
        workers: usize,
        log: &Path,
    ) -> anyhow::Result<Workers> {
        if a.worker == WorkerMode::Child {
            return Ok(Workers::Child(Box::new(ChildWorker::spawn(
                settings, &sim_url, log,
            )?)));
        }
        // every worker starts at once, each with its own HTTP port (http.listen is :0)
        let started_all = join_all(
            (0..workers.max(1))
                .map(|_| crate::worker::start(settings.clone(), Some(sim_url.clone()))),
        )
        .await;
        let mut running = Vec::with_capacity(started_all.len());
        let mut start_error = None;
        for r in started_all {
            match r {
                Ok(w) => running.push(w),
                Err(e) => start_error = Some(e),
            }
        }
        if let Some(e) = start_error {
            join_all(running.into_iter().map(|w| w.stop())).await;
            return Err(e.into());
        }
        Ok(Workers::InProc(running))
    }

    /// The child worker's pid (`None`: the workers run in this process).
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Workers::InProc(_) => None,
            Workers::Child(c) => Some(c.pid),
        }
    }

    /// Seconds spent in Midas calls and the calls timed, so far (in-process: the
    /// whole process's, so the case's are a difference of two readings).
    pub(super) async fn call_time(&self) -> anyhow::Result<(f64, u64)> {
        match self {
            Workers::InProc(_) => Ok(METRICS.call_time()),
            Workers::Child(c) => Ok(parse_call_time(&c.metrics().await?)),
        }
    }

    /// The counters now (a child's from its `/metrics`).
    pub(super) async fn totals(&self) -> anyhow::Result<Totals> {
        match self {
            Workers::InProc(_) => Ok(METRICS.totals()),
            Workers::Child(c) => Ok(parse_totals(&c.metrics().await?)),
        }
    }

    /// A child's (VmHWM, VmRSS) in kB; `None` for workers in this process.
    pub(super) fn child_rss_kb(&self) -> Option<(u64, u64)> {
        match self {
            Workers::InProc(_) => None,
            Workers::Child(c) => std::fs::read_to_string(format!("/proc/{}/status", c.pid))
                .ok()
                .map(|t| super::parse_rss(&t)),
        }
    }

    /// Stop every worker; for a child, whether it exited 0 after SIGTERM.
    pub(super) async fn stop(self) -> Option<bool> {
        match self {
            Workers::InProc(running) => {
                join_all(running.into_iter().map(|w| w.stop())).await;
                None
            }
            Workers::Child(c) => Some(c.terminate().await),
        }
    }
}

impl ChildWorker {
    fn spawn(settings: &Settings, sim_url: &str, log: &Path) -> anyhow::Result<ChildWorker> {
        let config = PathBuf::from(&settings.source);
        if !config.is_file() {
            bail!(
                "--worker child: the config source {:?} is not a file",
                settings.source
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("a free port for the child worker's /metrics")?
            .port();
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .envs(child_env(settings, sim_url, port))
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawning the child worker")?;
        let pid = child.id().context("the child worker has no pid")?;
        Ok(ChildWorker {
            child,
            pid,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            log: log.to_path_buf(),
        })
    }

    /// SIGTERM, then wait (30 s at most, then SIGKILL); true when it exited 0.
    async fn terminate(mut self) -> bool {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let ok = match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = self.child.kill().await;
                false
            }
        };
        if !ok {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            eprintln!(
                "bench: the child worker did not exit 0 after SIGTERM; last lines of {}:",
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
        ok
    }
}

/// The MIDAS_WORKER__* (and app secret) variables that give a `midas-worker run`
/// child the case's settings: its queues, outbox, limits, and Midas at `sim_url`
/// (environment `production`, so no embedded simulator; loopback http is allowed).
fn child_env(s: &Settings, sim_url: &str, port: u16) -> Vec<(String, String)> {
    let c = &s.config;
    let mut env = Vec::new();
    let mut set = |k: &str, v: String| env.push((format!("MIDAS_WORKER__{k}"), v));
    set("BROKER__URL", c.broker.url.expose().to_string());
    set("BROKER__COMMAND_QUEUE", c.broker.command_queue.clone());
    set("BROKER__REPLY_QUEUE", c.broker.reply_queue.clone());
    set(
        "BROKER__DEAD_LETTER_QUEUE",
        c.broker.dead_letter_queue.clone(),
    );
    set("BROKER__PREFETCH", c.broker.prefetch.to_string());
    set("OUTBOX__PATH", c.outbox.path.display().to_string());
    if let Some(url) = &c.outbox.url {
        set("OUTBOX__URL", url.expose().to_string());
    }
    set("HTTP__LISTEN", format!("127.0.0.1:{port}"));
    set("MIDAS__ENVIRONMENT", "production".into());
    set("MIDAS__BASE_URL", sim_url.to_string());
    set("MIDAS__MAX_IN_FLIGHT", c.midas.max_in_flight.to_string());
    set("MIDAS__MAX_RPS", c.midas.max_rps.to_string());
    for (i, app) in s.apps.iter().enumerate() {
        set(&format!("APPS__{i}__API"), app.api.to_string());
        if let Some(ip) = &app.default_user_ip {
            set(&format!("APPS__{i}__DEFAULT_USER_IP"), ip.clone());
        }
    }
    // the apps' keys as this process resolved them (the simulator knows the same)
    for (raw, app) in c.apps.iter().zip(&s.apps) {
        env.push((raw.app_key_env.clone(), app.app_key.expose().to_string()));
        env.push((
            raw.app_secret_env.clone(),
            app.app_secret.expose().to_string(),
        ));
    }
    env
}

/// Seconds in Midas calls and the calls timed, from a Prometheus text exposition.
fn parse_call_time(text: &str) -> (f64, u64) {
    let mut t = (0.0, 0u64);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        match series.split('{').next().unwrap_or_default() {
            "midas_worker_midas_call_duration_seconds_sum" => t.0 += v.max(0.0),
            "midas_worker_midas_call_duration_seconds_count" => t.1 += v.max(0.0) as u64,
            _ => {}
        }
    }
    t
}

/// The bench's totals from a Prometheus text exposition: outbox commits, rows
/// committed (the batch-size histogram's sum), Midas calls (every series), replies.
fn parse_totals(text: &str) -> Totals {
    let (mut commits, mut rows, mut calls, mut replies) = (0u64, 0u64, 0u64, 0u64);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let v = v.max(0.0) as u64;
        let name = series.split('{').next().unwrap_or_default();
        match name {
            "midas_worker_outbox_commits_total" => commits += v,
            "midas_worker_outbox_commit_batch_size_sum" => rows += v,
            "midas_worker_midas_calls_total" => calls += v,
            "midas_worker_replies_published_total" => replies += v,
            _ => {}
        }
    }
    (commits, rows, calls, replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_the_exposition() {
        let text = "# HELP x\n\
            midas_worker_midas_calls_total{api=\"pay\",errcode=\"0\",class=\"ok\"} 7\n\
            midas_worker_midas_calls_total{api=\"present\",errcode=\"0\",class=\"ok\"} 5\n\
            midas_worker_outbox_commit_batch_size_sum 40\n\
            midas_worker_outbox_commit_batch_size_count 4\n\
            midas_worker_outbox_commits_total 4\n\
            midas_worker_replies_published_total 12\n\
            garbage line\n";
        assert_eq!(parse_totals(text), (4, 40, 12, 12));
        let calls = "midas_worker_midas_call_duration_seconds_sum{api=\"pay\"} 1.5\n\
            midas_worker_midas_call_duration_seconds_count{api=\"pay\"} 3\n\
            midas_worker_midas_call_duration_seconds_sum{api=\"present\"} 0.5\n\
            midas_worker_midas_call_duration_seconds_count{api=\"present\"} 1\n";
        assert_eq!(parse_call_time(calls), (2.0, 4));
    }

    #[test]
    fn a_child_gets_the_case_settings_and_production_midas() {
        let s = crate::config::load_from(
            include_str!("../../../config.toml"),
            &Default::default(),
            "test",
        )
        .expect("shipped config");
        let env = child_env(&s, "http://127.0.0.1:9/", 4242);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MIDAS_WORKER__MIDAS__ENVIRONMENT"), Some("production"));
        assert_eq!(
            get("MIDAS_WORKER__MIDAS__BASE_URL"),
            Some("http://127.0.0.1:9/")
        );
        assert_eq!(get("MIDAS_WORKER__HTTP__LISTEN"), Some("127.0.0.1:4242"));
        assert!(get("MIDAS_APP_KEY").is_some_and(|k| !k.is_empty()));
        assert_eq!(get("MIDAS_WORKER__APPS__0__API"), Some("v1"));
    }
}
