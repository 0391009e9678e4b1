//! The configured apps with their secrets: each `[[apps]]` entry names the
//! environment variables holding its AppKey, app secret and (v2) push keys, read
//! here into [`Secret`]s, with deterministic stand-ins under the simulator. Kept
//! apart from the schema because this is the one step that reads secrets.

use std::collections::BTreeMap;

use super::{invalid, ApiVersion, Config, ConfigError, Environment, Provenance, Source};
use crate::secret::Secret;

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

pub(super) fn resolve_apps(
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
