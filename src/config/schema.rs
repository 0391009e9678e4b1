//! The config's shape: [`Config`] and one struct per section, as `config.toml`
//! and the `MIDAS_WORKER__…` overrides spell them, with the default of every key
//! (one function each, since serde's `default = "…"` wants a path). Kept apart
//! from loading (the parent module) so the schema reads in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::Dur;
use crate::secret::SecretUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// The embedded simulator: no real currency moves.
    Simulator,
    /// `/cgi-bin/midas/sandbox/*` with the sandbox AppKey.
    Sandbox,
    /// `/cgi-bin/midas/*` with the production AppKey.
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Human,
    Json,
}

/// The whole config. Every section has defaults; `apps` must have an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    pub outbox: OutboxConfig,
    pub midas: MidasConfig,
    pub retry: RetryConfig,
    pub http: HttpConfig,
    /// The operator console (`[console]`); off unless `listen` is set.
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    #[serde(default)]
    pub simulator: SimulatorConfig,
    /// WeChat payment pushes (`src/push/`): off unless `listen` is set.
    #[serde(default)]
    pub push: PushConfig,
}

/// `[push]`: the receiver of WeChat payment pushes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Where `GET`/`POST /wechat/push/{appid}` is served; absent: no receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The durable quorum queue verified pushes are published to.
    #[serde(default = "d_event_queue")]
    pub event_queue: String,
    /// Larger push bodies are refused unread.
    #[serde(default = "d_max_body_bytes")]
    pub max_body_bytes: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            listen: None,
            event_queue: d_event_queue(),
            max_body_bytes: d_max_body_bytes(),
        }
    }
}

fn d_event_queue() -> String {
    "midas.events".into()
}
fn d_max_body_bytes() -> usize {
    65536
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Masked (password `***`) whenever printed; derefs to the full URL to connect.
    #[serde(default = "d_broker_url")]
    pub url: SecretUrl,
    #[serde(default = "d_command_queue")]
    pub command_queue: String,
    #[serde(default = "d_reply_queue")]
    pub reply_queue: String,
    #[serde(default = "d_dead_letter_queue")]
    pub dead_letter_queue: String,
    /// How long a dead-lettered command stays in the dead-letter queue (the
    /// queue's `x-message-ttl`, and each copy's expiration). 1s ..= 49d.
    #[serde(default = "d_dead_letter_ttl")]
    pub dead_letter_ttl: Dur,
    #[serde(default = "d_prefetch")]
    pub prefetch: u16,
    /// Larger command bodies are rejected (`invalid_command`) without being parsed.
    #[serde(default = "d_max_command_bytes")]
    pub max_command_bytes: usize,
    /// Queues a command may name in `reply_to`: exact names, or prefixes written
    /// `prefix*` (a list, or one comma-separated string for an env override).
    /// Absent: the reply queue and `amq.gen-*`. See `broker::reply_to_allowed`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::broker::allow_list"
    )]
    pub reply_to_allow: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    #[serde(default = "d_outbox_path")]
    pub path: PathBuf,
    /// `postgres://…` (instead of `path`): a shared outbox for several workers.
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// Shared outbox: how long a worker holds a player without renewing. A worker
    /// that dies or is cut off from PostgreSQL loses its players after this long.
    #[serde(default = "d_lease")]
    pub lease: Dur,
    #[serde(default = "d_retention")]
    pub retention: Dur,
    /// Disk budget for the outbox database file, in MiB (`PRAGMA max_page_count`).
    /// When it is reached, new commands are not acknowledged (they stay in the
    /// broker queue) until space is made or the budget is raised. None: unlimited.
    #[serde(default)]
    pub max_size_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MidasConfig {
    #[serde(default = "d_environment")]
    pub environment: Environment,
    #[serde(default = "d_base_url")]
    pub base_url: String,
    #[serde(default = "d_request_timeout")]
    pub request_timeout: Dur,
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "d_max_rps")]
    pub max_rps: u32,
    #[serde(default = "d_true")]
    pub mp_sig: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "d_retry_initial")]
    pub initial: Dur,
    #[serde(default = "d_retry_max")]
    pub max: Dur,
    #[serde(default = "d_give_up_after")]
    pub give_up_after: Dur,
    /// How long a `balance` command is retried (from receipt) before `unknown`.
    #[serde(default = "d_balance_give_up_after")]
    pub balance_give_up_after: Dur,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "d_http_listen")]
    pub listen: SocketAddr,
}

/// `[console]`: the operator console (`crate::console`). The tokens are read from
/// the named environment variables when the console starts, never from the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where the console listens; `None`: `run` serves no console.
    pub listen: Option<SocketAddr>,
    /// The environment variable holding the read-only (viewer) token.
    pub viewer_token_env: String,
    /// The environment variable holding the operator token (may also retry / republish).
    pub operator_token_env: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: None,
            viewer_token_env: "MIDAS_CONSOLE_VIEWER_TOKEN".into(),
            operator_token_env: "MIDAS_CONSOLE_OPERATOR_TOKEN".into(),
        }
    }
}

// The defaults of CONTRACT-level keys, one function each (serde wants a path).
fn d_broker_url() -> SecretUrl {
    SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f")
}
fn d_command_queue() -> String {
    "midas.commands".into()
}
fn d_reply_queue() -> String {
    "midas.results".into()
}
fn d_dead_letter_queue() -> String {
    "midas.commands.dead".into()
}
fn d_dead_letter_ttl() -> Dur {
    Dur(Duration::from_secs(7 * 86_400))
}
fn d_prefetch() -> u16 {
    256
}
fn d_max_command_bytes() -> usize {
    65536
}
fn d_outbox_path() -> PathBuf {
    PathBuf::from("data/outbox.sqlite")
}
fn d_lease() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_retention() -> Dur {
    Dur(Duration::from_secs(90 * 86_400))
}
fn d_environment() -> Environment {
    Environment::Simulator
}
fn d_base_url() -> String {
    "https://api.weixin.qq.com".into()
}
fn d_request_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_max_in_flight() -> usize {
    128
}
fn d_max_rps() -> u32 {
    500
}
fn d_true() -> bool {
    true
}
fn d_retry_initial() -> Dur {
    Dur(Duration::from_millis(500))
}
fn d_retry_max() -> Dur {
    Dur(Duration::from_secs(300))
}
fn d_give_up_after() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn d_balance_give_up_after() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_format() -> LogFormat {
    LogFormat::Auto
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    #[serde(deserialize_with = "text")]
    pub appid: String,
    #[serde(deserialize_with = "text")]
    pub offer_id: String,
    #[serde(deserialize_with = "text")]
    pub app_key_env: String,
    #[serde(deserialize_with = "text")]
    pub app_secret_env: String,
    #[serde(default = "default_zone", deserialize_with = "text")]
    pub zone_id: String,
    #[serde(default = "default_pf", deserialize_with = "text")]
    pub pf: String,
    /// Which Midas API the app speaks.
    #[serde(default)]
    pub api: ApiVersion,
    /// v2: the `user_ip` sent when a command has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user_ip: Option<String>,
    /// v2: env var holding the sandbox AppKey (pushes whose `Env` is 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_app_key_env: Option<String>,
    /// v2: env var holding the push Token; the app takes pushes when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_token_env: Option<String>,
    /// v2: env var holding the EncodingAESKey (safe mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_aes_key_env: Option<String>,
}

/// The Midas API an app speaks: `"v1"` (Midas 1.0, `/cgi-bin/midas/*`) or `"v2"`
/// (virtual payment 2.0, `/wxa/game/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    #[default]
    V1,
    V2,
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2 => "v2",
        })
    }
}

/// A string field that also takes a bare number: `MIDAS_WORKER__APPS__1__OFFER_ID=87654321`
/// (a key the file does not have) reads as an integer but means the text.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        S(String),
        I(i64),
    }
    Ok(match Text::deserialize(d)? {
        Text::S(s) => s,
        Text::I(i) => i.to_string(),
    })
}

fn default_zone() -> String {
    "1".into()
}
fn default_pf() -> String {
    "android".into()
}

/// The embedded/standalone simulator (read with `environment = "simulator"` and by
/// `midas-worker simulate`). Rates are probabilities in `0.0..=1.0` per call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    pub listen: SocketAddr,
    pub initial_balance: i64,
    pub seed: u64,
    pub token_ttl: Dur,
    /// Answer `-1` without applying.
    pub busy_rate: f64,
    /// Added to every answer.
    pub latency: Dur,
    /// Apply the operation, then stall for `stall` (the client times out; the charge happened).
    pub apply_then_stall_rate: f64,
    /// Stall for `stall` without applying, then drop the connection.
    pub stall_then_drop_rate: f64,
    /// Answer HTTP 502 without applying.
    pub http_502_rate: f64,
    /// cancelpay answers 90016 (still processing) without applying.
    pub processing_rate: f64,
    /// Revoke the current access token with this probability per call (the call gets 40001).
    pub token_revoke_rate: f64,
    /// Apply, lose the answer (like `apply_then_stall`) and expire the session_key the
    /// call was signed with: later calls signed with it answer 90010.
    pub session_expire_after_lost_rate: f64,
    pub stall: Dur,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            initial_balance: 1000,
            seed: 42,
            token_ttl: Dur(Duration::from_secs(7200)),
            busy_rate: 0.0,
            latency: Dur(Duration::ZERO),
            apply_then_stall_rate: 0.0,
            stall_then_drop_rate: 0.0,
            http_502_rate: 0.0,
            processing_rate: 0.0,
            token_revoke_rate: 0.0,
            session_expire_after_lost_rate: 0.0,
            stall: Dur(Duration::from_secs(10)),
        }
    }
}
