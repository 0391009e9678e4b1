//! Layered configuration: built-in defaults, then `config.toml` (or `--config PATH` /
//! `MIDAS_WORKER_CONFIG`), then `MIDAS_WORKER__SECTION__KEY` environment overrides,
//! then validation.
//!
//! Every key but `[[apps]]` and `midas.environment` has a default (`simulator`
//! stands in for the environment in every verb but `run`, which refuses it
//! unset), so a file holding the environment and `[[apps]]` is a complete config. Unknown keys are errors (a misspelt key must not silently
//! become a default). Secrets are never in the file: each app names the environment
//! variables that hold its AppKey and app secret, and they are read into
//! [`Secret`](crate::secret::Secret)s on load (`apps`); URLs that may carry a password
//! are [`SecretUrl`](crate::secret::SecretUrl)s. Every error is one line
//! naming the key; the binary exits 2 on it. `check-config` shows each effective
//! value and where it came from ([`show`]).
//!
//! Layout: [`Config`] and its sections with their defaults are in `schema`, the
//! apps with their secrets resolved in `apps`, durations in `dur`, overrides and provenance in
//! `overrides`, the checks in `checks`; this file loads and layers them.

mod apps;
mod checks;
mod dur;
mod overrides;
mod schema;
pub mod show;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use apps::App;
pub use checks::{
    broker_is_loopback, min_lease, run_preflight, unavailable, LEASE_CALL_MARGIN, LEASE_RENEW_DELAY,
};
pub use dur::{fmt_duration, Dur};
pub use overrides::{Provenance, Source, MAX_ENV_INDEX};
pub use schema::{
    ApiVersion, AppConfig, BrokerConfig, Config, ConsoleConfig, Environment, HttpConfig, LogConfig,
    LogFormat, MidasConfig, OutboxConfig, PushConfig, RetryConfig, SimulatorConfig,
};

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
/// Upper bound for `broker.dead_letter_ttl` (RabbitMQ's TTLs are 32-bit milliseconds).
pub const MAX_DEAD_LETTER_TTL: Duration = Duration::from_secs(49 * 86_400);
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
    let apps = apps::resolve_apps(&config, env, &mut provenance)?;
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
#[cfg(test)]
mod tests;
