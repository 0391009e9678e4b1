//! Access tokens and session keys as the simulator tracks them, reproducing the
//! platform behaviours a client must handle: `stable_token` keeps returning the same
//! token (even a revoked one) until `force_refresh`; `/cgi-bin/token` replaces the
//! previous token with five minutes of overlap; session keys rotate and expire. Also
//! the token endpoints themselves (`/cgi-bin/stable_token`, `/cgi-bin/token`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use rand::distr::Alphanumeric;
use rand::rngs::SmallRng;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{err_json, Shared};
use crate::midas::{errcode, sign};

/// How long a replaced token stays valid.
pub const OVERLAP: Duration = Duration::from_secs(300);
/// Length of generated tokens.
const TOKEN_LEN: usize = 96;
/// Expired tokens are forgotten (and answer 40001 instead of 42001) after this.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
struct TokenInfo {
    appid: String,
    expires_at: Instant,
    revoked: bool,
}

/// Issued tokens per app.
#[derive(Debug)]
pub struct Tokens {
    rng: SmallRng,
    ttl: Duration,
    by_value: HashMap<String, TokenInfo>,
    /// appid → current `stable_token` token.
    stable: HashMap<String, String>,
    /// appid → current `/cgi-bin/token` token.
    legacy: HashMap<String, String>,
}

impl Tokens {
    pub fn new(rng: SmallRng, ttl: Duration) -> Tokens {
        Tokens {
            rng,
            ttl: ttl.max(Duration::from_secs(1)),
            by_value: HashMap::new(),
            stable: HashMap::new(),
            legacy: HashMap::new(),
        }
    }

    fn issue(&mut self, appid: &str, now: Instant) -> String {
        self.by_value
            .retain(|_, t| t.expires_at + FORGET_AFTER > now);
        let token: String = (&mut self.rng)
            .sample_iter(Alphanumeric)
            .take(TOKEN_LEN)
            .map(char::from)
            .collect();
        self.by_value.insert(
            token.clone(),
            TokenInfo {
                appid: appid.to_string(),
                expires_at: now + self.ttl,
                revoked: false,
            },
        );
        token
    }

    fn shorten(&mut self, token: Option<String>, now: Instant) {
        if let Some(info) = token.and_then(|t| self.by_value.get_mut(&t)) {
            info.expires_at = info.expires_at.min(now + OVERLAP);
        }
    }

    fn remaining(&self, token: &str, now: Instant) -> Option<u64> {
        let info = self.by_value.get(token)?;
        let left = info.expires_at.checked_duration_since(now)?;
        (!left.is_zero()).then(|| left.as_secs().max(1))
    }

    /// `stable_token`: the current token until it expires (revoked or not); a new one
    /// with `force_refresh` (the previous one then lives at most five more minutes).
    pub fn stable(&mut self, appid: &str, force_refresh: bool, now: Instant) -> (String, u64) {
        if !force_refresh {
            if let Some(cur) = self.stable.get(appid) {
                if let Some(left) = self.remaining(cur, now) {
                    return (cur.clone(), left);
                }
            }
        }
        let token = self.issue(appid, now);
        let old = self.stable.insert(appid.to_string(), token.clone());
        self.shorten(old, now);
        (token, self.ttl.as_secs())
    }

    /// `/cgi-bin/token`: always a new token; the previous one lives five more minutes.
    pub fn legacy(&mut self, appid: &str, now: Instant) -> (String, u64) {
        let token = self.issue(appid, now);
        let old = self.legacy.insert(appid.to_string(), token.clone());
        self.shorten(old, now);
        (token, self.ttl.as_secs())
    }

    /// The appid a token belongs to, or the platform's refusal
    /// (41001 missing, 40001 unknown or revoked, 42001 expired).
    pub fn check(&self, token: Option<&str>, now: Instant) -> Result<&str, (i64, &'static str)> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err((errcode::TOKEN_MISSING, "access_token missing"));
        };
        let Some(info) = self.by_value.get(token) else {
            return Err((
                errcode::TOKEN_INVALID,
                "invalid credential, access_token is invalid or not latest",
            ));
        };
        if info.revoked {
            return Err((
                errcode::TOKEN_INVALID,
                "invalid credential, access_token is invalid or not latest",
            ));
        }
        if info.expires_at <= now {
            return Err((errcode::TOKEN_EXPIRED, "access_token expired"));
        }
        Ok(&info.appid)
    }

    /// Revoke one token and the app's current tokens (the `token_revoke` fault).
    pub fn revoke_for(&mut self, token: &str, appid: &str) {
        let mut victims = vec![token.to_string()];
        victims.extend(self.stable.get(appid).cloned());
        victims.extend(self.legacy.get(appid).cloned());
        for v in victims {
            if let Some(info) = self.by_value.get_mut(&v) {
                info.revoked = true;
            }
        }
    }

    /// Every token issued and not yet forgotten, in no particular order.
    pub fn issued(&self) -> Vec<String> {
        self.by_value.keys().cloned().collect()
    }

    /// Revoke every token issued so far.
    pub fn revoke_all(&mut self) {
        for info in self.by_value.values_mut() {
            info.revoked = true;
        }
    }
}

/// Session keys per openid: the current one (if any) and those rotated out or expired.
#[derive(Debug, Default)]
pub struct Sessions {
    keys: HashMap<String, SessionKeys>,
}

#[derive(Debug)]
struct SessionKeys {
    /// `None` after the current key expired and before another one is registered.
    current: Option<String>,
    previous: Vec<String>,
}

/// How a signature made with a session_key relates to the registered keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionCheck {
    /// No current key for the openid and no old key matches: not checked.
    Unknown,
    /// Verifies with the current key.
    Current,
    /// Verifies only with a rotated-out or expired key (90010).
    Expired,
    /// Verifies with none while a current key is registered (1.0: 90009, 2.0: 90010).
    Wrong,
}

/// At most this many rotated-out keys are remembered per openid.
const MAX_PREVIOUS: usize = 16;

impl SessionKeys {
    fn retire(&mut self, key: String) {
        self.previous.retain(|p| *p != key);
        self.previous.push(key);
        if self.previous.len() > MAX_PREVIOUS {
            self.previous.remove(0);
        }
    }
}

impl Sessions {
    /// Register or rotate the session key of an openid.
    pub fn register(&mut self, openid: &str, session_key: &str) {
        let k = self
            .keys
            .entry(openid.to_string())
            .or_insert_with(|| SessionKeys {
                current: None,
                previous: Vec::new(),
            });
        if k.current.as_deref() == Some(session_key) {
            return;
        }
        k.previous.retain(|p| p != session_key);
        if let Some(old) = k.current.replace(session_key.to_string()) {
            k.retire(old);
        }
    }

    /// The current key of an openid.
    pub fn current(&self, openid: &str) -> Option<&str> {
        self.keys.get(openid).and_then(|k| k.current.as_deref())
    }

    /// Expire `session_key` if it is the openid's current key: calls signed with it
    /// are refused from now on; calls signed with any other key are not checked until
    /// a new key is registered.
    pub fn expire(&mut self, openid: &str, session_key: &str) {
        if let Some(k) = self.keys.get_mut(openid) {
            if k.current.as_deref() == Some(session_key) {
                if let Some(old) = k.current.take() {
                    k.retire(old);
                }
            }
        }
    }

    /// Classify with `verifies(key)` telling whether the signature verifies with `key`.
    pub fn check(&self, openid: &str, verifies: impl Fn(&str) -> bool) -> SessionCheck {
        let Some(k) = self.keys.get(openid) else {
            return SessionCheck::Unknown;
        };
        if k.current.as_deref().is_some_and(&verifies) {
            SessionCheck::Current
        } else if k.previous.iter().any(|p| verifies(p)) {
            SessionCheck::Expired
        } else if k.current.is_none() {
            SessionCheck::Unknown
        } else {
            SessionCheck::Wrong
        }
    }
}

// ---------------------------------------------------------------- token endpoints

#[derive(Deserialize)]
struct TokenBody {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
    force_refresh: Option<bool>,
}

/// Check grant_type, appid and secret; `Ok(appid)` or the platform's error answer.
fn check_credentials(shared: &Shared, body: &TokenBody) -> Result<String, Value> {
    if body.grant_type.as_deref() != Some("client_credential") {
        return Err(err_json(40002, "invalid grant_type"));
    }
    let Some(appid) = body.appid.as_deref().filter(|a| !a.is_empty()) else {
        return Err(err_json(41002, "appid missing"));
    };
    let Some(app) = shared.apps.get(appid) else {
        return Err(err_json(40013, "invalid appid"));
    };
    let Some(secret) = body.secret.as_deref().filter(|s| !s.is_empty()) else {
        return Err(err_json(41004, "appsecret missing"));
    };
    if !sign::sig_eq(secret, app.app_secret.expose()) {
        return Err(err_json(40125, "invalid appsecret"));
    }
    Ok(appid.to_string())
}

pub(super) async fn stable_token(State(shared): State<Arc<Shared>>, body: Bytes) -> Json<Value> {
    shared.count("stable_token");
    let Ok(body) = serde_json::from_slice::<TokenBody>(&body) else {
        return Json(err_json(errcode::PARAM_ERROR, "invalid request body"));
    };
    let appid = match check_credentials(&shared, &body) {
        Ok(a) => a,
        Err(answer) => {
            tracing::debug!(kind = "stable_token", answer = %answer, "sim call refused");
            return Json(answer);
        }
    };
    let force = body.force_refresh.unwrap_or(false);
    let (token, expires_in) = shared.lock().tokens.stable(&appid, force, Instant::now());
    tracing::debug!(kind = "stable_token", %appid, force_refresh = force, "sim token");
    Json(json!({"access_token": token, "expires_in": expires_in}))
}

pub(super) async fn legacy_token(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Json<Value> {
    shared.count("token");
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let body = TokenBody {
        grant_type: q.get("grant_type").cloned(),
        appid: q.get("appid").cloned(),
        secret: q.get("secret").cloned(),
        force_refresh: None,
    };
    let appid = match check_credentials(&shared, &body) {
        Ok(a) => a,
        Err(answer) => {
            tracing::debug!(kind = "token", answer = %answer, "sim call refused");
            return Json(answer);
        }
    };
    let (token, expires_in) = shared.lock().tokens.legacy(&appid, Instant::now());
    tracing::debug!(kind = "token", %appid, "sim token");
    Json(json!({"access_token": token, "expires_in": expires_in}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn stable_token_survives_revocation_until_forced() {
        let mut t = Tokens::new(SmallRng::seed_from_u64(1), Duration::from_secs(7200));
        let now = Instant::now();
        let (a, ttl) = t.stable("app", false, now);
        assert!(a.len() >= 64);
        assert_eq!(ttl, 7200);
        assert_eq!(t.check(Some(&a), now), Ok("app"));
        t.revoke_all();
        assert_eq!(
            t.check(Some(&a), now).unwrap_err().0,
            errcode::TOKEN_INVALID
        );
        assert_eq!(t.stable("app", false, now).0, a);
        let (b, _) = t.stable("app", true, now);
        assert_ne!(a, b);
        assert_eq!(t.check(Some(&b), now), Ok("app"));
        assert_eq!(t.check(None, now).unwrap_err().0, errcode::TOKEN_MISSING);
        let later = now + Duration::from_secs(7201);
        assert_eq!(
            t.check(Some(&b), later).unwrap_err().0,
            errcode::TOKEN_EXPIRED
        );
    }

    #[test]
    fn legacy_token_overlap() {
        let mut t = Tokens::new(SmallRng::seed_from_u64(1), Duration::from_secs(7200));
        let now = Instant::now();
        let (a, _) = t.legacy("app", now);
        let (b, _) = t.legacy("app", now);
        assert_eq!(t.check(Some(&a), now + Duration::from_secs(299)), Ok("app"));
        assert!(t.check(Some(&a), now + Duration::from_secs(301)).is_err());
        assert_eq!(t.check(Some(&b), now + Duration::from_secs(301)), Ok("app"));
    }

    #[test]
    fn session_rotation() {
        let mut s = Sessions::default();
        assert_eq!(s.check("o", |_| false), SessionCheck::Unknown);
        s.register("o", "k1");
        s.register("o", "k2");
        assert_eq!(s.check("o", |k| k == "k2"), SessionCheck::Current);
        assert_eq!(s.check("o", |k| k == "k1"), SessionCheck::Expired);
        assert_eq!(s.check("o", |_| false), SessionCheck::Wrong);
        // Expiry: the key is refused, other keys go unchecked until one is registered.
        s.expire("o", "k1");
        assert_eq!(s.current("o"), Some("k2"), "only the current key expires");
        s.expire("o", "k2");
        assert_eq!(s.current("o"), None);
        assert_eq!(s.check("o", |k| k == "k2"), SessionCheck::Expired);
        assert_eq!(s.check("o", |k| k == "k3"), SessionCheck::Unknown);
        s.register("o", "k3");
        assert_eq!(s.check("o", |k| k == "k3"), SessionCheck::Current);
        assert_eq!(s.check("o", |k| k == "k2"), SessionCheck::Expired);
        assert_eq!(s.check("o", |_| false), SessionCheck::Wrong);
    }
}
