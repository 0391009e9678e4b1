//! `midas-worker enqueue`: publish one command from the shell, optionally waiting for
//! its reply — what a game server does, for trying things and for operators.

use std::time::Duration;

use crate::client::GameClient;
use crate::config::Settings;

#[derive(clap::Args, Debug)]
pub struct EnqueueArgs {
    /// pay, present, cancel_pay or balance.
    pub op: String,
    #[arg(long)]
    pub bill_no: Option<String>,
    #[arg(long)]
    pub openid: Option<String>,
    #[arg(long)]
    pub amt: Option<i64>,
    #[arg(long)]
    pub present_counts: Option<i64>,
    #[arg(long)]
    pub appid: Option<String>,
    #[arg(long)]
    pub zone_id: Option<String>,
    #[arg(long)]
    pub pf: Option<String>,
    #[arg(long)]
    pub user_ip: Option<String>,
    #[arg(long)]
    pub pay_item: Option<String>,
    #[arg(long)]
    pub app_remark: Option<String>,
    /// Read the session_key from this environment variable (never from the command line).
    #[arg(long, value_name = "VAR")]
    pub session_key_env: Option<String>,
    /// Publish this raw JSON body instead of building one from the flags.
    #[arg(long)]
    pub raw: Option<String>,
    /// correlation_id (default: bill_no, or a random id).
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Wait for the reply and print it.
    #[arg(long)]
    pub wait: bool,
    /// How long to wait with --wait.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The command body the flags describe.
pub fn body(a: &EnqueueArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(raw) = &a.raw {
        return Ok(raw.clone().into_bytes());
    }
    let mut m = serde_json::Map::new();
    m.insert("op".into(), a.op.clone().into());
    let strs = [
        ("bill_no", &a.bill_no),
        ("openid", &a.openid),
        ("appid", &a.appid),
        ("zone_id", &a.zone_id),
        ("pf", &a.pf),
        ("user_ip", &a.user_ip),
        ("pay_item", &a.pay_item),
        ("app_remark", &a.app_remark),
    ];
    for (k, v) in strs {
        if let Some(v) = v {
            m.insert(k.into(), v.clone().into());
        }
    }
    if let Some(v) = a.amt {
        m.insert("amt".into(), v.into());
    }
    if let Some(v) = a.present_counts {
        m.insert("present_counts".into(), v.into());
    }
    if let Some(var) = &a.session_key_env {
        let v = std::env::var(var).map_err(|_| {
            anyhow::anyhow!("environment variable {var} (--session-key-env) is not set")
        })?;
        m.insert("session_key".into(), v.into());
    }
    Ok(serde_json::to_vec(&serde_json::Value::Object(m))?)
}

pub async fn run(a: EnqueueArgs, settings: &Settings) -> anyhow::Result<()> {
    let body = body(&a)?;
    let cfg = &settings.config.broker;
    let mut client = GameClient::connect(cfg, a.wait).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the broker at {} (broker.url): {e}",
            crate::broker::display_url(&cfg.url)
        )
    })?;
    let corr = a
        .correlation_id
        .clone()
        .or_else(|| a.bill_no.clone())
        .unwrap_or_else(|| format!("enqueue-{}", rand::random::<u64>()));
    if a.wait {
        client.publish(&body, &corr).await?;
        eprintln!("published (correlation_id {corr}); waiting for the reply…");
        let r = client.reply_for(&corr, a.timeout).await?;
        println!("{}", String::from_utf8_lossy(&r.raw));
    } else {
        client.publish_to(&body, &corr, None).await?;
        println!(
            "published to {} (correlation_id {corr}); the reply goes to {}",
            cfg.command_queue, cfg.reply_queue
        );
    }
    client.close().await;
    Ok(())
}
