//! Access tokens, one cache per app.
//!
//! Tokens come from `POST /cgi-bin/stable_token` (normal mode: every caller gets the
//! same token until it expires, so several workers do not invalidate each other).
//! A token is refreshed 5 minutes before it expires, and after Midas rejects it
//! (40001/40014/42001/41001). When the platform hands back the very token it just
//! rejected, one `force_refresh=true` fetch is made (the platform limits those to
//! about one per 30 s). One fetch is in flight per app however many calls wait:
//! callers queue on the app's lock and find the fresh token when they get it.
//! The token is a [`Secret`]: it never reaches logs or errors.
//!
//! The token request carries the app secret, so it goes through the shared HTTP
//! client of [`super::transport`] (redirects never followed, answers capped at 64 KiB), and whatever
//! `expires_in` says is clamped to [`MAX_TOKEN_TTL`] before any clock arithmetic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::transport::{describe, read_capped, MAX_ANSWER_BYTES};
use crate::config::App;
use crate::secret::Secret;

/// Refresh this long before `expires_in` runs out.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The longest lifetime believed from `expires_in` (the platform issues 7200 s tokens).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7200);
/// The platform allows a forced refresh about every 30 s.
pub const FORCE_REFRESH_SPACING: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("access token fetch failed: {0}")]
    Transport(String),
    #[error("access token fetch answered errcode {errcode}: {errmsg}")]
    Platform { errcode: i64, errmsg: String },
    #[error("access token rejected again; a forced refresh is allowed only every 30s")]
    ForceRefreshLimited,
    #[error("no configured app {0}")]
    UnknownApp(String),
}

#[derive(Default)]
struct Slot {
    token: Option<(Secret, Instant)>,
    /// The last token Midas rejected (so a re-issue of it triggers force_refresh).
    rejected: Option<Secret>,
    last_forced: Option<Instant>,
    fetches: u64,
}

/// Per-app access token cache.
pub struct TokenCache {
    http: reqwest::Client,
    base_url: String,
    apps: HashMap<String, (Secret, Arc<tokio::sync::Mutex<Slot>>)>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    access_token: Option<String>,
    /// Any JSON number (or nothing): clamped by [`token_ttl`], never trusted as is.
    #[serde(default)]
    expires_in: Option<serde_json::Number>,
    #[serde(default)]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
}

/// How long to believe a token: `expires_in` seconds, at most [`MAX_TOKEN_TTL`];
/// absent means the platform's 7200 s; negative, fractional or absurd values are
/// clamped (negative: zero, so the token is fetched again soon).
pub fn token_ttl(expires_in: Option<&serde_json::Number>) -> Duration {
    let Some(n) = expires_in else {
        return MAX_TOKEN_TTL;
    };
    let secs = if let Some(u) = n.as_u64() {
        u
    } else if n.as_i64().is_some() {
        0 // negative
    } else {
        match n.as_f64() {
            Some(f) if f > 0.0 => f.min(MAX_TOKEN_TTL.as_secs_f64()) as u64,
            _ => 0,
        }
    };
    Duration::from_secs(secs).min(MAX_TOKEN_TTL)
}

/// When to refresh a token fetched at `now` living `ttl`: [`REFRESH_MARGIN`] early but
/// at least 1 s on; never panics, whatever `ttl` is.
pub fn refresh_deadline(now: Instant, ttl: Duration) -> Instant {
    let after = ttl
        .min(MAX_TOKEN_TTL)
        .saturating_sub(REFRESH_MARGIN)
        .max(Duration::from_secs(1));
    now.checked_add(after).unwrap_or(now)
}

impl TokenCache {
    /// `http` must come from the Midas client (no redirects: the body holds the secret).
    pub fn new(http: reqwest::Client, base_url: &str, apps: &[App]) -> Self {
        let apps = apps
            .iter()
            .map(|a| {
                (
                    a.appid.clone(),
                    (
                        a.app_secret.clone(),
                        Arc::new(tokio::sync::Mutex::new(Slot::default())),
                    ),
                )
            })
            .collect();
        TokenCache {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            apps,
        }
    }

    /// A valid token for `appid`, fetching one if needed (one fetch in flight per app).
    pub async fn get(&self, appid: &str) -> Result<Secret, TokenError> {
        let (secret, slot) = self
            .apps
            .get(appid)
            .ok_or_else(|| TokenError::UnknownApp(appid.to_string()))?;
        let mut slot = slot.lock().await;
        if let Some((tok, refresh_at)) = &slot.token {
            if Instant::now() < *refresh_at {
                return Ok(tok.clone());
            }
        }
        let (mut tok, mut ttl) = self.fetch(appid, secret, false).await?;
        slot.fetches += 1;
        if slot.rejected.as_ref() == Some(&tok) {
            if slot
                .last_forced
                .is_some_and(|t| t.elapsed() < FORCE_REFRESH_SPACING)
            {
                return Err(TokenError::ForceRefreshLimited);
            }
            slot.last_forced = Some(Instant::now());
            (tok, ttl) = self.fetch(appid, secret, true).await?;
            slot.fetches += 1;
        }
        let refresh_at = refresh_deadline(Instant::now(), ttl);
        slot.token = Some((tok.clone(), refresh_at));
        Ok(tok)
    }

    /// Midas rejected `token`: forget it so the next [`get`](Self::get) fetches anew.
    pub async fn invalidate(&self, appid: &str, token: &Secret) {
        if let Some((_, slot)) = self.apps.get(appid) {
            let mut slot = slot.lock().await;
            if slot.token.as_ref().is_some_and(|(t, _)| t == token) {
                slot.token = None;
            }
            slot.rejected = Some(token.clone());
        }
    }

    /// How many token fetches were made for `appid` (for tests and metrics).
    pub async fn fetches(&self, appid: &str) -> u64 {
        match self.apps.get(appid) {
            Some((_, slot)) => slot.lock().await.fetches,
            None => 0,
        }
    }

    async fn fetch(
        &self,
        appid: &str,
        secret: &Secret,
        force_refresh: bool,
    ) -> Result<(Secret, Duration), TokenError> {
        let url = format!("{}/cgi-bin/stable_token", self.base_url);
        let body = serde_json::json!({
            "grant_type": "client_credential",
            "appid": appid,
            "secret": secret.expose(),
            "force_refresh": force_refresh,
        });
        // reqwest errors can carry the URL; ours has no secret in it, but keep only the kind.
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| TokenError::Transport(describe(&e)))?;
        let status = resp.status();
        let bytes = read_capped(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| TokenError::Transport(format!("HTTP {status}: {e}")))?;
        let ans: TokenAnswer = serde_json::from_slice(&bytes)
            .map_err(|_| TokenError::Transport(format!("HTTP {status}: unparseable body")))?;
        match ans {
            TokenAnswer {
                access_token: Some(t),
                expires_in,
                ..
            } if !t.is_empty() => {
                tracing::debug!(appid, force_refresh, "fetched access token");
                Ok((Secret::new(t), token_ttl(expires_in.as_ref())))
            }
            other => Err(TokenError::Platform {
                errcode: other.errcode.unwrap_or(-1),
                errmsg: other.errmsg.unwrap_or_default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl_of(json: &str) -> Duration {
        let a: TokenAnswer = serde_json::from_str(json).unwrap();
        token_ttl(a.expires_in.as_ref())
    }

    #[test]
    fn expires_in_is_clamped_whatever_it_says() {
        assert_eq!(ttl_of(r#"{"expires_in":7200}"#), Duration::from_secs(7200));
        assert_eq!(ttl_of(r#"{"expires_in":600}"#), Duration::from_secs(600));
        assert_eq!(ttl_of(r#"{}"#), MAX_TOKEN_TTL);
        let max_i64 = format!(r#"{{"expires_in":{}}}"#, i64::MAX);
        let max_u64 = format!(r#"{{"expires_in":{}}}"#, u64::MAX);
        assert_eq!(ttl_of(&max_i64), MAX_TOKEN_TTL);
        assert_eq!(ttl_of(&max_u64), MAX_TOKEN_TTL);
        assert_eq!(ttl_of(r#"{"expires_in":1e300}"#), MAX_TOKEN_TTL);
        assert_eq!(ttl_of(r#"{"expires_in":-5}"#), Duration::ZERO);
        let min_i64 = format!(r#"{{"expires_in":{}}}"#, i64::MIN);
        assert_eq!(ttl_of(&min_i64), Duration::ZERO);
    }

    #[test]
    fn refresh_deadline_never_overflows() {
        let now = Instant::now();
        let far = refresh_deadline(now, Duration::MAX);
        assert_eq!(far, now + MAX_TOKEN_TTL - REFRESH_MARGIN);
        assert_eq!(
            refresh_deadline(now, Duration::ZERO),
            now + Duration::from_secs(1)
        );
    }
}
