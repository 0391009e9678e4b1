//! Layered configuration: built-in defaults, then `config.toml` (or `--config PATH` /
//! `MIDAS_WORKER_CONFIG`), then `MIDAS_WORKER__SECTION__KEY` environment overrides,
//! then validation.
//!
//! Every key but `[[apps]]` and `midas.environment` has a default (`simulator`
//! stands in for the environment in every verb but `run`, which refuses it
//! unset), so a file holding the environment and `[[apps]]` is a complete config. Unknown keys are errors (a misspelt key must not silently
//! become a default). Secrets are never in the file: each app names the environment
//! variables that hold its AppKey and app secret, and they are read into [`Secret`]s
//! here; URLs that may carry a password are [`SecretUrl`]s. Every error is one line
//! naming the key; the binary exits 2 on it. `check-config` shows each effective
//! value and where it came from ([`show`]).

mod checks;
mod dur;
mod overrides;
pub mod show;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::secret::{Secret, SecretUrl};

pub use checks::{
    broker_is_loopback, min_lease, run_preflight, unavailable, LEASE_CALL_MARGIN, LEASE_RENEW_DELAY,
};
pub use dur::{fmt_duration, Dur};
pub use overrides::{Provenance, Source, MAX_ENV_INDEX};

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "MIDAS_WORKER__";
/// Environment variable naming the config file.
pub const ENV_CONFIG_PATH: &str = "MIDAS_WORKER_CONFIG";
/// `1`: `run` may use the simulator with a broker that is not on this machine (the
/// same as `run --allow-simulator-on-shared-broker`).
pub const ENV_ALLOW_SIMULATOR: &str = "MIDAS_WORKER_ALLOW_SIMULATOR";
/// Set in the container image. Implied now: `run` always refuses to start unless
/// `midas.environment` was chosen explicitly (file or environment), not defaulted.
pub const ENV_REQUIRE_ENVIRONMENT: &str = "MIDAS_WORKER_REQUIRE_ENVIRONMENT";
/// The bill_no window is 48 h; retries must stop well before it.
pub const MAX_GIVE_UP_AFTER: Duration = Duration::from_secs(47 * 3600);
/// Upper bound for `broker.max_command_bytes`.
pub const MAX_COMMAND_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// The sections every config has (filled from defaults when the file omits them).
const SECTIONS: [&str; 8] = [
    "broker",
    "outbox",
    "midas",
    "retry",
    "http",
    "log",
    "simulator",
    "push",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config error: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config error: {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config error: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

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

/// An app with its secrets read from the environment.
#[derive(Debug, Clone)]
pub struct App {
    pub appid: String,
    pub offer_id: String,
    pub zone_id: String,
    pub pf: String,
    /// `api = "v1" | "v2"`.
    pub api: ApiVersion,
    /// v2: the `user_ip` sent when a command has none.
    pub default_user_ip: Option<String>,
    /// AppKey (the sandbox key in sandbox).
    pub app_key: Secret,
    /// App secret, for `stable_token`.
    pub app_secret: Secret,
    /// v2: the sandbox AppKey (`sandbox_app_key_env`).
    pub sandbox_app_key: Option<Secret>,
    /// v2: the push Token (`push_token_env`); `None`: the app takes no pushes.
    pub push_token: Option<Secret>,
    /// v2: the decoded EncodingAESKey (`push_aes_key_env`).
    pub push_aes_key: Option<crate::push::decrypt::AesKey>,
}

impl App {
    /// Deterministic stand-in secrets used with the simulator when the env vars are unset.
    pub fn simulator_key(appid: &str) -> Secret {
        Secret::new(format!("simulator-appkey-{appid}"))
    }
    pub fn simulator_secret(appid: &str) -> Secret {
        Secret::new(format!("simulator-secret-{appid}"))
    }
    /// Stand-in push Token with the simulator.
    pub fn simulator_push_token(appid: &str) -> Secret {
        Secret::new(format!("simulator-push-token-{appid}"))
    }
    /// Stand-in EncodingAESKey with the simulator: 43 characters of base64.
    pub fn simulator_aes_key(appid: &str) -> Secret {
        use base64::Engine;
        use sha2::Digest;
        let d = sha2::Sha256::digest(format!("simulator-aes-{appid}").as_bytes());
        let mut k = base64::engine::general_purpose::STANDARD.encode(d);
        k.truncate(43);
        Secret::new(k)
    }
}

/// The validated configuration plus resolved secrets.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub apps: Vec<App>,
    /// The config file this came from.
    pub source: String,
    /// Where each value came from (default, file, environment variable).
    pub provenance: Provenance,
}

impl Settings {
    pub fn app(&self, appid: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.appid == appid)
    }
}

/// Where the config file is: `--config`, else `MIDAS_WORKER_CONFIG`, else `config.toml`.
pub fn config_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    if let Ok(p) = std::env::var(ENV_CONFIG_PATH) {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("config.toml")
}

/// Load, override from the process environment, validate, resolve secrets.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    load_from(&text, &env, &path.display().to_string())
}

/// Pure core of [`load`]: file text and environment in, settings out.
pub fn load_from(
    text: &str,
    env: &BTreeMap<String, String>,
    source: &str,
) -> Result<Settings, ConfigError> {
    let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: source.to_string(),
        message: one_line(e.message()),
    })?;
    let mut provenance = Provenance::from_file(&value);
    overrides::apply(&mut value, env, &mut provenance)?;
    // a section the file and the environment leave out is all defaults
    for section in SECTIONS {
        value
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Invalid {
                key: if path == "." { "config".into() } else { path },
                message: one_line(&e.into_inner().to_string()),
            }
        })?;
    checks::validate(&config)?;
    let apps = resolve_apps(&config, env, &mut provenance)?;
    Ok(Settings {
        config,
        apps,
        source: source.to_string(),
        provenance,
    })
}

/// An error message on one line, with the password of any URL it quotes masked (a
/// URL put under the wrong key is echoed by serde's "invalid value" messages).
fn one_line(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.contains("://") {
        crate::secret::mask_url(&line)
    } else {
        line
    }
}

fn resolve_apps(
    c: &Config,
    env: &BTreeMap<String, String>,
    provenance: &mut Provenance,
) -> Result<Vec<App>, ConfigError> {
    let simulator = c.midas.environment == Environment::Simulator;
    let mut out = Vec::with_capacity(c.apps.len());
    for (i, a) in c.apps.iter().enumerate() {
        let mut read = |var: &str, field: &str, fallback: fn(&str) -> Secret| match env
            .get(var)
            .filter(|v| !v.is_empty())
        {
            Some(v) => {
                provenance.set_secret(format!("apps[{i}].{field}"), Source::Env(var.into()));
                Ok(Secret::new(v.clone()))
            }
            None if simulator => {
                provenance.set_secret(format!("apps[{i}].{field}"), Source::Default);
                Ok(fallback(&a.appid))
            }
            None => Err(invalid(
                format!("apps[{i}].{field}_env"),
                format!("environment variable {var} is not set"),
            )),
        };
        let app_key = read(&a.app_key_env, "app_key", App::simulator_key)?;
        let app_secret = read(&a.app_secret_env, "app_secret", App::simulator_secret)?;
        let mut optional = |var: &Option<String>, field: &str, fallback: fn(&str) -> Secret| {
            var.as_ref()
                .map(|v| {
                    if a.api != ApiVersion::V2 {
                        return Err(invalid(
                            format!("apps[{i}].{field}_env"),
                            "pushes and the sandbox push key are for v2 apps (api = \"v2\")",
                        ));
                    }
                    read(v, field, fallback)
                })
                .transpose()
        };
        let sandbox_app_key = optional(
            &a.sandbox_app_key_env,
            "sandbox_app_key",
            App::simulator_key,
        )?;
        let push_token = optional(&a.push_token_env, "push_token", App::simulator_push_token)?;
        let push_aes_key = optional(&a.push_aes_key_env, "push_aes_key", App::simulator_aes_key)?
            .map(|k| {
                crate::push::decrypt::AesKey::from_encoding_key(k.expose())
                    .map_err(|e| invalid(format!("apps[{i}].push_aes_key_env"), e.to_string()))
            })
            .transpose()?;
        out.push(App {
            appid: a.appid.clone(),
            offer_id: a.offer_id.clone(),
            zone_id: a.zone_id.clone(),
            pf: a.pf.clone(),
            api: a.api,
            default_user_ip: a.default_user_ip.as_ref().map(|ip| ip.trim().to_string()),
            app_key,
            app_secret,
            sandbox_app_key,
            push_token,
            push_aes_key,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
