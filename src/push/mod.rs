//! WeChat payment pushes (virtual payment 2.0): the worker as the game's push
//! receiver. A push is verified (URL signature; in safe mode `msg_signature` and
//! decryption; `PayEventSig` with the AppKey of the payload's `Env`), stored once
//! per (appid, kind, dedup key) in the outbox, answered success only after that
//! commit, and published to the events queue with confirms until confirmed.
//!
//! - [`verify`]: the signatures; [`decrypt`]: safe mode; [`event`]: the body to
//!   the events-queue message. Pure, tested with WeChat's check values.
//! - [`receive`] (this file): one push through all checks, still pure.
//! - [`server`]: the HTTP listener (`[push] listen`); [`limits`]: its connection
//!   limits; [`relay`]: the events publisher; [`metrics`]: counters.

pub mod decrypt;
pub mod event;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod verify;

use crate::secret::Secret;
use decrypt::{AesKey, DecryptError};
pub use event::{Kind, Refusal, Verdict, Verified};

/// One app's push secrets. Never printed.
#[derive(Clone)]
pub struct PushApp {
    pub appid: String,
    pub token: Secret,
    /// Safe mode: the decoded EncodingAESKey.
    pub aes: Option<AesKey>,
    /// `Env` 0.
    pub app_key: Secret,
    /// `Env` 1.
    pub sandbox_key: Option<Secret>,
}

impl std::fmt::Debug for PushApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushApp")
            .field("appid", &self.appid)
            .finish_non_exhaustive()
    }
}

impl PushApp {
    /// The apps of `settings` that take pushes (a push Token configured).
    pub fn from_settings(settings: &crate::config::Settings) -> Vec<PushApp> {
        settings
            .apps
            .iter()
            .filter_map(|a| {
                let token = a.push_token.clone()?;
                Some(PushApp {
                    appid: a.appid.clone(),
                    token,
                    aes: a.push_aes_key.clone(),
                    app_key: a.app_key.clone(),
                    sandbox_key: a.sandbox_app_key.clone(),
                })
            })
            .collect()
    }
}

/// The query string of a push (or of the URL check).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Query {
    #[serde(default)]
    pub signature: String,
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub nonce: String,
    #[serde(default)]
    pub echostr: Option<String>,
    #[serde(default)]
    pub encrypt_type: Option<String>,
    #[serde(default)]
    pub msg_signature: Option<String>,
}

/// Why a push (or a URL check) was not taken; each answer carries its `ErrCode`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("unknown app, or the app takes no pushes")]
    UnknownApp,
    #[error("the URL signature does not verify")]
    BadSignature,
    #[error("msg_signature does not verify")]
    BadMsgSignature,
    #[error("a safe-mode push and no push_aes_key_env for the app")]
    NoAesKey,
    #[error("cannot decrypt: {0}")]
    Decrypt(DecryptError),
    #[error("the body is larger than push.max_body_bytes")]
    TooLarge,
    #[error("{0}")]
    Event(Refusal),
    #[error("the outbox cannot store the push now")]
    NotStored,
}

impl Reason {
    /// The non-zero `ErrCode` answered (WeChat pushes again on any of them).
    pub fn errcode(&self) -> i64 {
        match self {
            Reason::UnknownApp => 40004,
            Reason::BadSignature => 40001,
            Reason::BadMsgSignature => 40002,
            Reason::NoAesKey | Reason::Decrypt(_) => 40003,
            Reason::TooLarge => 41300,
            Reason::Event(Refusal::UnknownEvent) => 40005,
            Reason::Event(Refusal::BadPayEventSig) | Reason::Event(Refusal::NoSandboxKey) => 40006,
            Reason::Event(Refusal::BadBody(_)) | Reason::Event(Refusal::BadPayload(_)) => 40007,
            Reason::NotStored => 99999,
        }
    }

    /// Metrics label (the `outcome` of a refused push).
    pub fn label(&self) -> &'static str {
        match self {
            Reason::UnknownApp => "unknown_app",
            Reason::BadSignature => "bad_signature",
            Reason::BadMsgSignature => "bad_msg_signature",
            Reason::NoAesKey => "no_aes_key",
            Reason::Decrypt(DecryptError::WrongAppid) => "appid_mismatch",
            Reason::Decrypt(_) => "decrypt_failed",
            Reason::TooLarge => "too_large",
            Reason::Event(r) => r.label(),
            Reason::NotStored => "not_stored",
        }
    }
}

/// The URL check (`GET`): the `echostr` to answer when the signature verifies.
pub fn url_check(app: &PushApp, q: &Query) -> Result<String, Reason> {
    if !verify::url_signature_ok(app.token.expose(), &q.timestamp, &q.nonce, &q.signature) {
        return Err(Reason::BadSignature);
    }
    Ok(q.echostr.clone().unwrap_or_default())
}

#[derive(serde::Deserialize)]
struct Encrypted {
    #[serde(rename = "Encrypt")]
    encrypt: String,
}

/// A push (`POST`) through every check, to what must be done with it.
pub fn receive(
    app: &PushApp,
    q: &Query,
    body: &[u8],
    received_at: &str,
    simulated: bool,
) -> Result<Verdict, Reason> {
    if !verify::url_signature_ok(app.token.expose(), &q.timestamp, &q.nonce, &q.signature) {
        return Err(Reason::BadSignature);
    }
    let safe = q.encrypt_type.as_deref() == Some("aes");
    let plain;
    let body = if safe {
        let aes = app.aes.as_ref().ok_or(Reason::NoAesKey)?;
        let e: Encrypted = serde_json::from_slice(body).map_err(|e| {
            Reason::Event(Refusal::BadBody(e.to_string().chars().take(120).collect()))
        })?;
        let given = q.msg_signature.as_deref().unwrap_or("");
        if !verify::msg_signature_ok(
            app.token.expose(),
            &q.timestamp,
            &q.nonce,
            &e.encrypt,
            given,
        ) {
            return Err(Reason::BadMsgSignature);
        }
        plain = decrypt::decrypt(aes, &e.encrypt, &app.appid).map_err(Reason::Decrypt)?;
        plain.as_slice()
    } else {
        body
    };
    let keys = event::Keys {
        production: app.app_key.expose(),
        sandbox: app.sandbox_key.as_ref().map(|k| k.expose()),
    };
    event::read(&app.appid, body, &keys, received_at, simulated).map_err(Reason::Event)
}

#[cfg(test)]
mod tests;
