//! The Midas simulator the bench's worker talks to: a child process (its CPU and
//! memory not counted as the worker's) or in-process as a fallback.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use super::args::SimMode;
use super::SIM_BALANCE;
use crate::config::Settings;
use crate::sim::{Faults, LedgerDump, SimApp, SimHandle, Simulator};

pub(super) enum Sim {
    Inproc(SimHandle),
    Child {
        child: tokio::process::Child,
        url: String,
    },
}

impl Sim {
    pub(super) async fn start(
        mode: SimMode,
        settings: &Settings,
        latency: Duration,
    ) -> anyhow::Result<Sim> {
        let latency_ms = latency.as_millis() as u64;
        if mode == SimMode::Child {
            match Sim::start_child(settings, latency).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    eprintln!("bench: cannot start the simulator as a child process ({e:#}); running it in-process")
                }
            }
        }
        let mut cfg = settings.config.simulator.clone();
        cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.initial_balance = SIM_BALANCE;
        let h = Simulator::new(cfg, SimApp::from_settings(settings))
            .start()
            .await?;
        h.set_faults(Faults {
            latency_ms,
            ..Faults::default()
        });
        Ok(Sim::Inproc(h))
    }

    pub(super) async fn start_child(settings: &Settings, latency: Duration) -> anyhow::Result<Sim> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe()?;
        let config = PathBuf::from(&settings.source);
        if !config.is_file() {
            bail!("config source {:?} is not a file", settings.source);
        }
        let mut child = tokio::process::Command::new(exe)
            .arg("--config")
            .arg(&config)
            .arg("simulate")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--initial-balance")
            .arg(SIM_BALANCE.to_string())
            .arg("--latency")
            .arg(format!("{}ms", latency.as_millis()))
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    return Ok::<_, anyhow::Error>(url.to_string());
                }
            }
            bail!("the simulator exited before listening")
        })
        .await
        .context("waiting for the simulator")??;
        // keep draining its stdout so it never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Sim::Child { child, url })
    }

    pub(super) fn url(&self) -> String {
        match self {
            Sim::Inproc(h) => h.base_url(),
            Sim::Child { url, .. } => url.clone(),
        }
    }

    pub(super) fn where_(&self) -> &'static str {
        match self {
            Sim::Inproc(_) => "in-process",
            Sim::Child { .. } => "child process",
        }
    }

    pub(super) async fn ledger(&self) -> anyhow::Result<LedgerDump> {
        match self {
            Sim::Inproc(h) => Ok(h.ledger()),
            Sim::Child { url, .. } => Ok(reqwest::get(format!("{url}/sim/ledger"))
                .await?
                .error_for_status()?
                .json::<LedgerDump>()
                .await?),
        }
    }

    /// Replace the simulator's faults (an outage: `http_502_rate = 1.0`).
    pub(super) async fn set_faults(&self, f: Faults) -> anyhow::Result<()> {
        match self {
            Sim::Inproc(h) => h.set_faults(f),
            Sim::Child { url, .. } => {
                reqwest::Client::new()
                    .post(format!("{url}/sim/faults"))
                    .json(&f)
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }
        Ok(())
    }

    pub(super) async fn stop(self) {
        match self {
            Sim::Inproc(h) => h.shutdown().await,
            Sim::Child { mut child, .. } => {
                let _ = child.kill().await;
            }
        }
    }
}
