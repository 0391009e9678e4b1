//! `midas-worker enqueue`: publish one command from the shell, optionally waiting for
//! its reply — what a game server does, for trying things and for operators.
//!
//! It behaves like a game server, not like the worker: it declares no queue, publishes
//! `mandatory` with publisher confirms (a mistyped queue name is an immediate error, not
//! a new queue holding the command), and tells scripts the outcome in its exit status
//! ([`EXIT_STATUS_HELP`]).

use std::time::Duration;

use crate::client::{ClientError, GameClient};
use crate::command::Status;
use crate::config::Settings;

/// Exit statuses, as `enqueue --help` prints them.
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_FAILED: u8 = 3;
pub const EXIT_REJECTED: u8 = 4;
pub const EXIT_UNKNOWN: u8 = 5;
pub const EXIT_NO_REPLY: u8 = 6;

pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  published (without --wait), or the reply says succeeded
  1  any other error: broker unreachable or refusing, no queue of that name, ...
  2  bad usage or bad config
  3  failed    (with --wait: Midas gave a definitive error)
  4  rejected  (with --wait: the worker refused the command; Midas was never called)
  5  unknown   (with --wait: retries ran out; a person must reconcile)
  6  no reply within --timeout (the command was queued; look it up with `outbox show`)";

#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct EnqueueArgs {
    /// pay, present, cancel_pay, balance or query_order (v2 apps).
    pub op: String,
    #[arg(long)]
    pub bill_no: Option<String>,
    /// cancel_pay on a v2 app (a refund): the bill_no of the pay being refunded
    /// (with --amt, the coins to refund; --bill-no is the refund's own).
    #[arg(long)]
    pub pay_bill_no: Option<String>,
    #[arg(long)]
    pub openid: Option<String>,
    /// pay: the amount; cancel_pay on a v2 app: the coins to refund.
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
    /// query_order: the order number the client used.
    #[arg(long)]
    pub out_trade_no: Option<String>,
    /// query_order: 1 (a coin top-up) or 2 (an item purchase).
    #[arg(long)]
    pub biz_id: Option<i64>,
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
    /// Publish to this queue instead of broker.command_queue (it must exist: enqueue
    /// never creates queues).
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
}

/// Why `enqueue` stopped without an outcome; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the broker at {at} (broker.url): {why}")]
    Unreachable { at: String, why: String },
    #[error("the broker at {at} answered: {said}")]
    BrokerSaid { at: String, said: String },
    #[error("{0}")]
    Client(ClientError),
}

impl EnqueueError {
    pub fn exit_code(&self) -> u8 {
        match self {
            EnqueueError::Usage(_) => EXIT_USAGE,
            EnqueueError::Client(ClientError::Timeout(_)) => EXIT_NO_REPLY,
            _ => EXIT_ERROR,
        }
    }

    /// Classify a client error: what the broker said, an unreachable broker, or other.
    fn from_client(e: ClientError, at: &str, connecting: bool) -> EnqueueError {
        if let Some(said) = e.broker_said() {
            return EnqueueError::BrokerSaid {
                at: at.to_string(),
                said,
            };
        }
        match e {
            ClientError::Broker(crate::broker::BrokerError::Url(why)) => {
                EnqueueError::Usage(format!("broker.url is invalid: {why}"))
            }
            e if connecting => EnqueueError::Unreachable {
                at: at.to_string(),
                why: e.to_string(),
            },
            e => EnqueueError::Client(e),
        }
    }
}

/// The exit status for a reply's status.
pub fn exit_code_for(status: Option<Status>) -> u8 {
    match status {
        Some(Status::Succeeded) => EXIT_OK,
        Some(Status::Failed) => EXIT_FAILED,
        Some(Status::Rejected) => EXIT_REJECTED,
        Some(Status::Unknown) => EXIT_UNKNOWN,
        None => EXIT_ERROR,
    }
}

/// The command body the flags describe.
pub fn body(a: &EnqueueArgs) -> Result<Vec<u8>, EnqueueError> {
    if let Some(raw) = &a.raw {
        return Ok(raw.clone().into_bytes());
    }
    let mut m = serde_json::Map::new();
    m.insert("op".into(), a.op.clone().into());
    let strs = [
        ("bill_no", &a.bill_no),
        ("pay_bill_no", &a.pay_bill_no),
        ("openid", &a.openid),
        ("appid", &a.appid),
        ("zone_id", &a.zone_id),
        ("pf", &a.pf),
        ("user_ip", &a.user_ip),
        ("pay_item", &a.pay_item),
        ("app_remark", &a.app_remark),
        ("out_trade_no", &a.out_trade_no),
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
    if let Some(v) = a.biz_id {
        m.insert("biz_id".into(), v.into());
    }
    if let Some(var) = &a.session_key_env {
        let v = std::env::var(var).map_err(|_| {
            EnqueueError::Usage(format!(
                "environment variable {var} (--session-key-env) is not set"
            ))
        })?;
        m.insert("session_key".into(), v.into());
    }
    serde_json::to_vec(&serde_json::Value::Object(m))
        .map_err(|e| EnqueueError::Usage(format!("cannot build the command: {e}")))
}

/// Run `enqueue`: print the outcome (errors as one line on stderr) and return the
/// exit status.
pub async fn main(a: EnqueueArgs, settings: &Settings) -> u8 {
    match run(a, settings).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Publish (and with `--wait` await the reply); `Ok` holds the exit status.
pub async fn run(a: EnqueueArgs, settings: &Settings) -> Result<u8, EnqueueError> {
    let body = body(&a)?;
    let mut cfg = settings.config.broker.clone();
    if let Some(q) = &a.queue {
        cfg.command_queue = q.clone();
    }
    let at = crate::broker::display_url(&cfg.url);
    let mut client = GameClient::attach(&cfg, a.wait)
        .await
        .map_err(|e| EnqueueError::from_client(e, &at, true))?;
    let corr = a
        .correlation_id
        .clone()
        .or_else(|| a.bill_no.clone())
        .unwrap_or_else(|| format!("enqueue-{}", rand::random::<u64>()));
    let outcome = if a.wait {
        publish_and_wait(&mut client, &body, &corr, a.timeout).await
    } else {
        client.publish_to(&body, &corr, None).await.map(|()| {
            println!(
                "published to {} (correlation_id {corr}); the reply goes to {}",
                cfg.command_queue, cfg.reply_queue
            );
            EXIT_OK
        })
    };
    client.close().await;
    outcome.map_err(|e| EnqueueError::from_client(e, &at, false))
}

async fn publish_and_wait(
    client: &mut GameClient,
    body: &[u8],
    corr: &str,
    timeout: Duration,
) -> Result<u8, ClientError> {
    client.publish(body, corr).await?;
    eprintln!(
        "published (correlation_id {corr}); waiting up to {} for the reply…",
        humantime::format_duration(timeout)
    );
    let r = client.reply_for(corr, timeout).await?;
    println!("{}", String::from_utf8_lossy(&r.raw));
    Ok(exit_code_for(r.reply.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EnqueueArgs,
    }

    #[test]
    fn a_v2_refund_from_flags() {
        let cli = Cli::try_parse_from([
            "enqueue",
            "cancel_pay",
            "--appid",
            "wx7654321",
            "--bill-no",
            "R-1",
            "--pay-bill-no",
            "P-1",
            "--amt",
            "3",
            "--openid",
            "o",
        ])
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body(&cli.args).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op": "cancel_pay", "appid": "wx7654321", "bill_no": "R-1",
                               "pay_bill_no": "P-1", "amt": 3, "openid": "o"})
        );
    }
}
