//! Layered configuration: `config.toml` (or `--config PATH` / `MIDAS_WORKER_CONFIG`),
//! then `MIDAS_WORKER__SECTION__KEY` environment overrides, then validation.
//!
//! Unknown keys are errors (a misspelt key must not silently become a default).
//! Secrets are never in the file: each app names the environment variables that
//! hold its AppKey and app secret, and they are read into [`Secret`]s here.
//! Every error is one line naming the key; the binary exits 2 on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::Secret;

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "MIDAS_WORKER__";
/// Environment variable naming the config file.
pub const ENV_CONFIG_PATH: &str = "MIDAS_WORKER_CONFIG";
/// The bill_no window is 48 h; retries must stop well before it.
pub const MAX_GIVE_UP_AFTER: Duration = Duration::from_secs(47 * 3600);

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

/// A duration written as `"250ms"`, `"5s"`, `"24h"`, `"90d"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl std::fmt::Debug for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?}: {e}")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    pub outbox: OutboxConfig,
    pub midas: MidasConfig,
    pub retry: RetryConfig,
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub apps: Vec<AppConfig>,
    #[serde(default)]
    pub simulator: SimulatorConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    pub command_queue: String,
    pub reply_queue: String,
    pub dead_letter_queue: String,
    pub prefetch: u16,
    /// Largest command body read, in bytes; a larger one is rejected unread.
    #[serde(default = "default_max_command_bytes")]
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

fn default_max_command_bytes() -> usize {
    65_536
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    pub path: PathBuf,
    pub retention: Dur,
    /// Disk budget for the outbox database file, in MiB (`PRAGMA max_page_count`).
    /// When it is reached, new commands are not acknowledged (they stay in the
    /// broker queue) until space is made or the budget is raised. None: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MidasConfig {
    pub environment: Environment,
    pub base_url: String,
    pub request_timeout: Dur,
    pub max_in_flight: usize,
    pub max_rps: u32,
    pub mp_sig: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub initial: Dur,
    pub max: Dur,
    pub give_up_after: Dur,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
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
    /// AppKey (the sandbox key in sandbox).
    pub app_key: Secret,
    /// App secret, for `stable_token`.
    pub app_secret: Secret,
}

impl App {
    /// Deterministic stand-in secrets used with the simulator when the env vars are unset.
    pub fn simulator_key(appid: &str) -> Secret {
        Secret::new(format!("simulator-appkey-{appid}"))
    }
    pub fn simulator_secret(appid: &str) -> Secret {
        Secret::new(format!("simulator-secret-{appid}"))
    }
}

/// The validated configuration plus resolved secrets.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub apps: Vec<App>,
    pub source: String,
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
    apply_env_overrides(&mut value, env)?;
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Invalid {
                key: if path == "." { "config".into() } else { path },
                message: one_line(&e.into_inner().to_string()),
            }
        })?;
    validate(&config)?;
    let apps = resolve_apps(&config, env)?;
    // the writer opens the outbox by path only: hand it the budget for that path
    crate::outbox::set_size_budget(&config.outbox.path, config.outbox.max_size_mb);
    Ok(Settings {
        config,
        apps,
        source: source.to_string(),
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `MIDAS_WORKER__BROKER__URL=...` sets `broker.url`; `MIDAS_WORKER__APPS__0__OFFER_ID`
/// sets `apps[0].offer_id`. A value keeps the type of the key it replaces; a new key
/// is read as an integer, float or boolean when it looks like one, else a string.
fn apply_env_overrides(
    root: &mut toml::Table,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(name.clone(), "malformed override name"));
        }
        set_path(root, &parts, raw).map_err(|m| invalid(name.clone(), m))?;
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, parts: &[String], raw: &str) -> Result<(), String> {
    let (head, tail) = match parts.split_first() {
        Some(x) => x,
        None => return Err("empty key".into()),
    };
    if tail.is_empty() {
        let new = coerce(table.get(head), raw);
        table.insert(head.clone(), new);
        return Ok(());
    }
    let entry = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => set_path(t, tail, raw),
        toml::Value::Array(items) => {
            let idx: usize = tail[0]
                .parse()
                .map_err(|_| format!("`{head}` is a list: expected an index, got `{}`", tail[0]))?;
            while items.len() <= idx {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            match &mut items[idx] {
                toml::Value::Table(t) if tail.len() > 1 => set_path(t, &tail[1..], raw),
                _ => Err(format!("cannot set `{head}[{idx}]` as a whole")),
            }
        }
        _ => Err(format!("`{head}` is not a section")),
    }
}

fn coerce(existing: Option<&toml::Value>, raw: &str) -> toml::Value {
    match existing {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.to_string())),
        Some(toml::Value::Float(_)) => raw
            .parse::<f64>()
            .map(toml::Value::Float)
            .unwrap_or_else(|_| toml::Value::String(raw.to_string())),
        Some(toml::Value::Boolean(_)) => match raw {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => toml::Value::String(raw.to_string()),
        },
        _ => {
            if let Ok(i) = raw.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(f) = raw.parse::<f64>() {
                toml::Value::Float(f)
            } else if raw == "true" || raw == "false" {
                toml::Value::Boolean(raw == "true")
            } else {
                toml::Value::String(raw.to_string())
            }
        }
    }
}

fn validate(c: &Config) -> Result<(), ConfigError> {
    if !(c.broker.url.starts_with("amqp://") || c.broker.url.starts_with("amqps://")) {
        return Err(invalid("broker.url", "must start with amqp:// or amqps://"));
    }
    for (key, q) in [
        ("broker.command_queue", &c.broker.command_queue),
        ("broker.reply_queue", &c.broker.reply_queue),
        ("broker.dead_letter_queue", &c.broker.dead_letter_queue),
    ] {
        if q.is_empty() || q.len() > 255 {
            return Err(invalid(key, "must be 1..=255 characters"));
        }
    }
    if c.outbox.max_size_mb == Some(0) {
        return Err(invalid(
            "outbox.max_size_mb",
            "must be at least 1 (or absent: unlimited)",
        ));
    }
    if c.broker.prefetch == 0 {
        return Err(invalid("broker.prefetch", "must be at least 1"));
    }
    if c.midas.max_in_flight == 0 {
        return Err(invalid("midas.max_in_flight", "must be at least 1"));
    }
    if c.midas.max_rps == 0 {
        return Err(invalid("midas.max_rps", "must be at least 1"));
    }
    if c.midas.request_timeout.0.is_zero() {
        return Err(invalid("midas.request_timeout", "must be above 0"));
    }
    if c.midas.environment != Environment::Simulator
        && !(c.midas.base_url.starts_with("http://") || c.midas.base_url.starts_with("https://"))
    {
        return Err(invalid("midas.base_url", "must be an http(s) URL"));
    }
    if c.retry.initial.0.is_zero() {
        return Err(invalid("retry.initial", "must be above 0"));
    }
    if c.retry.max < c.retry.initial {
        return Err(invalid("retry.max", "must be at least retry.initial"));
    }
    if c.retry.give_up_after.0 > MAX_GIVE_UP_AFTER {
        return Err(invalid(
            "retry.give_up_after",
            "must be at most 47h (a bill_no deduplicates for 48h only)",
        ));
    }
    if c.retry.give_up_after.0.is_zero() {
        return Err(invalid("retry.give_up_after", "must be above 0"));
    }
    if c.apps.is_empty() {
        return Err(invalid("apps", "at least one [[apps]] entry is required"));
    }
    for (i, a) in c.apps.iter().enumerate() {
        if a.appid.is_empty() {
            return Err(invalid(format!("apps[{i}].appid"), "must not be empty"));
        }
        if a.offer_id.is_empty() {
            return Err(invalid(format!("apps[{i}].offer_id"), "must not be empty"));
        }
        if c.apps[..i].iter().any(|b| b.appid == a.appid) {
            return Err(invalid(
                format!("apps[{i}].appid"),
                format!("duplicate appid {}", a.appid),
            ));
        }
    }
    let s = &c.simulator;
    for (key, rate) in [
        ("simulator.busy_rate", s.busy_rate),
        ("simulator.apply_then_stall_rate", s.apply_then_stall_rate),
        ("simulator.stall_then_drop_rate", s.stall_then_drop_rate),
        ("simulator.http_502_rate", s.http_502_rate),
        ("simulator.processing_rate", s.processing_rate),
        ("simulator.token_revoke_rate", s.token_revoke_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(invalid(key, "must be between 0.0 and 1.0"));
        }
    }
    if c.log.level.trim().is_empty() {
        return Err(invalid("log.level", "must not be empty"));
    }
    Ok(())
}

fn resolve_apps(c: &Config, env: &BTreeMap<String, String>) -> Result<Vec<App>, ConfigError> {
    let simulator = c.midas.environment == Environment::Simulator;
    let mut out = Vec::with_capacity(c.apps.len());
    for (i, a) in c.apps.iter().enumerate() {
        let read = |var: &str, field: &str, fallback: fn(&str) -> Secret| match env
            .get(var)
            .filter(|v| !v.is_empty())
        {
            Some(v) => Ok(Secret::new(v.clone())),
            None if simulator => Ok(fallback(&a.appid)),
            None => Err(invalid(
                format!("apps[{i}].{field}"),
                format!("environment variable {var} is not set"),
            )),
        };
        out.push(App {
            appid: a.appid.clone(),
            offer_id: a.offer_id.clone(),
            zone_id: a.zone_id.clone(),
            pf: a.pf.clone(),
            app_key: read(&a.app_key_env, "app_key_env", App::simulator_key)?,
            app_secret: read(&a.app_secret_env, "app_secret_env", App::simulator_secret)?,
        });
    }
    Ok(out)
}

/// The effective configuration as TOML, secrets masked (for `check-config`).
pub fn render_effective(s: &Settings) -> String {
    let mut out = String::new();
    out.push_str(&format!("# source: {}\n", s.source));
    match toml::to_string_pretty(&s.config) {
        Ok(t) => out.push_str(&t),
        Err(e) => out.push_str(&format!("# cannot render: {e}\n")),
    }
    out.push_str("\n# resolved secrets\n");
    for a in &s.apps {
        out.push_str(&format!(
            "# {}: app_key = {} ({} chars), app_secret = {} ({} chars)\n",
            a.appid,
            a.app_key,
            a.app_key.expose().len(),
            a.app_secret,
            a.app_secret.expose().len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config.toml");

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_loads_without_secrets() {
        let s = load_from(SHIPPED, &env(&[]), "config.toml").unwrap();
        assert_eq!(s.config.midas.environment, Environment::Simulator);
        assert_eq!(s.config.retry.initial.0, Duration::from_millis(500));
        assert_eq!(s.apps.len(), 1);
    }

    #[test]
    fn env_overrides_keep_types() {
        let s = load_from(
            SHIPPED,
            &env(&[
                ("MIDAS_WORKER__BROKER__URL", "amqp://u:p@h:1/%2f"),
                ("MIDAS_WORKER__BROKER__PREFETCH", "10"),
                ("MIDAS_WORKER__APPS__0__OFFER_ID", "999"),
                ("MIDAS_WORKER__RETRY__MAX", "10s"),
                ("MIDAS_WORKER__MIDAS__MP_SIG", "false"),
            ]),
            "t",
        )
        .unwrap();
        assert_eq!(s.config.broker.url, "amqp://u:p@h:1/%2f");
        assert_eq!(s.config.broker.prefetch, 10);
        assert_eq!(s.config.apps[0].offer_id, "999");
        assert_eq!(s.config.retry.max.0, Duration::from_secs(10));
        assert!(!s.config.midas.mp_sig);
        // a second app entirely from the environment, numeric-looking ids stay text
        let s = load_from(
            SHIPPED,
            &env(&[
                ("MIDAS_WORKER__APPS__1__APPID", "wx7654321"),
                ("MIDAS_WORKER__APPS__1__OFFER_ID", "87654321"),
                ("MIDAS_WORKER__APPS__1__APP_KEY_ENV", "KEY2"),
                ("MIDAS_WORKER__APPS__1__APP_SECRET_ENV", "SECRET2"),
                ("MIDAS_WORKER__APPS__1__ZONE_ID", "2"),
            ]),
            "t",
        )
        .unwrap();
        assert_eq!(s.apps[1].offer_id, "87654321");
        assert_eq!(s.apps[1].zone_id, "2");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_from(SHIPPED, &env(&[("MIDAS_WORKER__BROKER__URLL", "x")]), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker") && e.contains("urll"), "{e}");
        let e = load_from(SHIPPED, &env(&[("MIDAS_WORKER__RETRY__MAX", "soon")]), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retry.max"), "{e}");
        let e = load_from(
            SHIPPED,
            &env(&[("MIDAS_WORKER__RETRY__GIVE_UP_AFTER", "48h")]),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("retry.give_up_after"), "{e}");
        let e = load_from(
            SHIPPED,
            &env(&[("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production")]),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("apps[0].app_key_env") && e.contains("MIDAS_APP_KEY"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn secrets_are_masked_in_debug_and_render() {
        let s = load_from(
            SHIPPED,
            &env(&[
                ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "sandbox"),
                ("MIDAS_APP_KEY", "very-secret-app-key"),
                ("WECHAT_APP_SECRET", "very-secret-app-secret"),
            ]),
            "t",
        )
        .unwrap();
        let dbg = format!("{s:?}");
        let rendered = render_effective(&s);
        for out in [dbg, rendered] {
            assert!(!out.contains("very-secret"), "{out}");
        }
        assert_eq!(s.apps[0].app_key.expose(), "very-secret-app-key");
    }
}
