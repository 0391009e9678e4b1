//! `midas-worker simulate`: the simulator as a standalone server. Flags override the
//! `[simulator]` section of the config; apps and their keys come from `[[apps]]`
//! (the env vars they name, or the simulator's stand-in keys when unset). The same
//! key serves official and sandbox paths unless `--sandbox-key-env` names another.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Dur, Settings};
use crate::secret::Secret;

use super::push::{PushKeys, PushSetup};
use super::{SimApp, Simulator};

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9470")]
    pub listen: SocketAddr,
    /// RNG seed: the same seed and calls give the same faults.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Balance of a new openid.
    #[arg(long)]
    pub initial_balance: Option<i64>,
    /// Rate of `-1` answers (not applied).
    #[arg(long)]
    pub busy_rate: Option<f64>,
    /// Added to every answer, e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
    /// Rate of "apply, then stall past the client timeout".
    #[arg(long)]
    pub apply_then_stall_rate: Option<f64>,
    /// Rate of "stall, then drop without applying".
    #[arg(long)]
    pub stall_then_drop_rate: Option<f64>,
    /// Rate of HTTP 502 answers (not applied).
    #[arg(long)]
    pub http_502_rate: Option<f64>,
    /// Rate of 90016 for cancelpay (not applied).
    #[arg(long)]
    pub processing_rate: Option<f64>,
    /// Rate of token revocation (the call gets 40001).
    #[arg(long)]
    pub token_revoke_rate: Option<f64>,
    /// Rate of "apply, lose the answer, expire the call's session_key" (then 90010).
    #[arg(long)]
    pub session_expire_after_lost_rate: Option<f64>,
    /// How long stalls last, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stall: Option<Duration>,
    /// Env var holding a distinct sandbox key for every app.
    #[arg(long)]
    pub sandbox_key_env: Option<String>,
    /// Push purchases (`POST /sim/purchase`) to this worker push URL, e.g.
    /// `http://127.0.0.1:9480/wechat/push` (repeat the flag for several workers),
    /// signed with each app's push_token_env / push_aes_key_env.
    #[arg(long, value_name = "URL")]
    pub push_url: Vec<String>,
    /// Push in safe (encrypted) mode (apps with push_aes_key_env).
    #[arg(long)]
    pub push_safe_mode: bool,
    /// Divide WeChat's repeat schedule (15 s, 15 s, 30 s, 3 min, …) by this.
    #[arg(long, default_value_t = 1.0)]
    pub push_time_factor: f64,
    /// Probability that a delivered push is pushed once more.
    #[arg(long, default_value_t = 0.1)]
    pub push_repeat_after_success_rate: f64,
    /// Probability that a purchase is followed by a mock push.
    #[arg(long, default_value_t = 0.0)]
    pub push_mock_rate: f64,
}

/// Build the simulator config from settings + flags.
pub fn sim_config(args: &SimulateArgs, settings: &Settings) -> crate::config::SimulatorConfig {
    let mut c = settings.config.simulator.clone();
    c.listen = args.listen;
    if let Some(v) = args.seed {
        c.seed = v;
    }
    if let Some(v) = args.initial_balance {
        c.initial_balance = v;
    }
    let rates = [
        (args.busy_rate, &mut c.busy_rate),
        (args.apply_then_stall_rate, &mut c.apply_then_stall_rate),
        (args.stall_then_drop_rate, &mut c.stall_then_drop_rate),
        (args.http_502_rate, &mut c.http_502_rate),
        (args.processing_rate, &mut c.processing_rate),
        (args.token_revoke_rate, &mut c.token_revoke_rate),
        (
            args.session_expire_after_lost_rate,
            &mut c.session_expire_after_lost_rate,
        ),
    ];
    for (v, slot) in rates {
        if let Some(v) = v {
            *slot = v.clamp(0.0, 1.0);
        }
    }
    if let Some(v) = args.latency {
        c.latency = Dur(v);
    }
    if let Some(v) = args.stall {
        c.stall = Dur(v);
    }
    c
}

/// Serve until `stop` resolves.
pub async fn simulate(
    args: SimulateArgs,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = sim_config(&args, settings);
    let sandbox = args
        .sandbox_key_env
        .as_deref()
        .and_then(|v| std::env::var(v).ok())
        .map(Secret::new);
    let mut apps = SimApp::from_settings(settings);
    if let Some(key) = sandbox {
        for a in &mut apps {
            a.sandbox_key = key.clone();
        }
    }
    let ids: Vec<String> = apps.iter().map(|a| a.appid.clone()).collect();
    let seed = cfg.seed;
    let mut sim = Simulator::new(cfg, apps);
    if !args.push_url.is_empty() {
        let keys: Vec<PushKeys> = settings
            .apps
            .iter()
            .filter_map(|a| {
                Some(PushKeys {
                    appid: a.appid.clone(),
                    token: a.push_token.clone()?,
                    aes_key: a.push_aes_key.clone(),
                    app_key: a.app_key.clone(),
                    sandbox_key: a.sandbox_app_key.clone(),
                })
            })
            .collect();
        println!(
            "pushing purchases to {} (apps: {})",
            args.push_url.join(", "),
            keys.iter()
                .map(|k| k.appid.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        sim = sim.with_pushes(PushSetup {
            urls: args.push_url.clone(),
            apps: keys,
            safe_mode: args.push_safe_mode,
            time_factor: args.push_time_factor,
            repeat_after_success_rate: args.push_repeat_after_success_rate,
            mock_rate: args.push_mock_rate,
            seed,
        });
    }
    let handle = sim.start().await?;
    println!(
        "Midas simulator listening on {} (apps: {}); NO REAL CURRENCY MOVES. Ledger: GET {}/sim/ledger. Ctrl-C stops.",
        handle.base_url(),
        ids.join(", "),
        handle.base_url()
    );
    stop.await;
    handle.shutdown().await;
    Ok(())
}
