//! Who may use the console, and what they may do: two roles, each with a token
//! read from the environment variable the config names (`[console]
//! viewer_token_env`, `operator_token_env`). A person signs in on the login form
//! (token, and a name recorded with their actions) and gets a session cookie
//! (`HttpOnly`, `SameSite=Strict`); a script sends `Authorization: Bearer TOKEN`
//! with each request instead.
//!
//! Everything is decided here, on the server, for every request: [`Who`] (the
//! role and name, or a redirect to the login form) is extracted before any page
//! runs, and every POST of a signed-in browser must carry the session's CSRF token
//! ([`Who::check_post`]) — the login form's own POST included (a token bound to a
//! short-lived cookie). Roles are checked by each action ([`Who::operator`]), not by
//! hiding buttons. Sessions live in memory (a restart signs everyone out), at most
//! [`MAX_SESSIONS`], each for [`SESSION_TTL`]. A token is compared only while the
//! client's failed sign-ins are under their limit ([`super::limit`]); each one not
//! accepted counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{AppState, PageError};
use crate::cli::outbox::fmt::one_line;
use crate::config::ConsoleConfig;
use crate::secret::Secret;

/// A signed-in browser's session lasts this long.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; the oldest is signed out to make room.
pub const MAX_SESSIONS: usize = 1024;
/// A token shorter than this is refused at start-up (it could be guessed).
pub const MIN_TOKEN_LEN: usize = 16;
/// The session cookie.
pub const SESSION_COOKIE: &str = "midas_console";
/// The login form's CSRF cookie.
pub const LOGIN_COOKIE: &str = "midas_console_login";
/// The longest name a person may give at login.
const MAX_NAME: usize = 64;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read every page.
    Viewer,
    /// Read, and retry / republish / export.
    Operator,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// The console could not start: one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("config error: console.{key}: {message}")]
    Token { key: &'static str, message: String },
    #[error("config error: console.listen: not set (give `console --listen ADDR` or set [console] listen)")]
    NoListen,
}

/// The two roles' tokens (either may be absent: nobody can take that role).
#[derive(Clone)]
pub struct Tokens {
    viewer: Option<Secret>,
    operator: Option<Secret>,
}

impl Tokens {
    /// Read the tokens from the variables `[console]` names: at least one must be
    /// set, each at least [`MIN_TOKEN_LEN`] characters, and the two must differ.
    pub fn from_env(
        c: &ConsoleConfig,
        env: &BTreeMap<String, String>,
    ) -> Result<Tokens, ConsoleError> {
        let read = |key: &'static str, var: &str| -> Result<Option<Secret>, ConsoleError> {
            match env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) if v.chars().count() < MIN_TOKEN_LEN => Err(ConsoleError::Token {
                    key,
                    message: format!(
                        "the token in {var} is shorter than {MIN_TOKEN_LEN} characters (use a long random one, e.g. `openssl rand -hex 24`)"
                    ),
                }),
                Some(v) => Ok(Some(Secret::new(v))),
            }
        };
        let viewer = read("viewer_token_env", &c.viewer_token_env)?;
        let operator = read("operator_token_env", &c.operator_token_env)?;
        if viewer.is_none() && operator.is_none() {
            return Err(ConsoleError::Token {
                key: "operator_token_env",
                message: format!(
                    "neither {} nor {} is set: the console needs at least one token",
                    c.viewer_token_env, c.operator_token_env
                ),
            });
        }
        if let (Some(v), Some(o)) = (&viewer, &operator) {
            if v.expose() == o.expose() {
                return Err(ConsoleError::Token {
                    key: "viewer_token_env",
                    message: "the viewer and operator tokens are the same".into(),
                });
            }
        }
        Ok(Tokens { viewer, operator })
    }

    /// The role a presented token grants (compared in constant time).
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let p = Sha256::digest(presented.as_bytes());
        let is = |t: &Option<Secret>| {
            t.as_ref()
                .is_some_and(|t| same(&Sha256::digest(t.expose().as_bytes()), &p))
        };
        // both compared, whichever matches
        let (o, v) = (is(&self.operator), is(&self.viewer));
        if o {
            Some(Role::Operator)
        } else if v {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Equal without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes as hex (session ids and CSRF tokens).
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone)]
struct Session {
    role: Role,
    name: String,
    csrf: String,
    expires: Instant,
}

/// The signed-in browsers.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// A new session; returns its id and CSRF token.
    pub fn open(&self, role: Role, name: String) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Session {
                role,
                name,
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    fn get(&self, id: &str) -> Option<Session> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, `Secure` when the request came
/// through a TLS-terminating proxy (`X-Forwarded-Proto: https`).
pub fn set_cookie(
    headers: &HeaderMap,
    name: &str,
    value: &str,
    path: &str,
    max_age: Duration,
) -> String {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    format!(
        "{name}={value}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The name recorded for a user: what they typed at login (one line, at most
/// [`MAX_NAME`] characters), else the role's name; with `@console`.
pub fn actor(name: &str, role: Role) -> String {
    let n: String = one_line(name.trim()).chars().take(MAX_NAME).collect();
    let n = if n.trim().is_empty() {
        role.name().to_string()
    } else {
        n
    };
    format!("{n}@console")
}

/// The user of a request.
#[derive(Debug, Clone)]
pub struct Who {
    pub role: Role,
    /// Recorded with their actions (`alice@console`).
    pub actor: String,
    /// The session's CSRF token; `None` for a request with a bearer token.
    pub csrf: Option<String>,
    /// The session id (for logout).
    pub session: Option<String>,
}

impl Who {
    /// The check every POST passes before anything else: a browser session's POST
    /// carries the session's CSRF token; a bearer token needs none (a browser never
    /// adds an `Authorization` header on its own, so it cannot be forged
    /// cross-site). A cross-origin `Origin` header is refused as well.
    pub fn check_post(
        &self,
        headers: &HeaderMap,
        form_csrf: Option<&str>,
    ) -> Result<(), PageError> {
        same_origin(headers)?;
        match &self.csrf {
            None => Ok(()),
            Some(expected) => match form_csrf {
                Some(t) if same(t.as_bytes(), expected.as_bytes()) => Ok(()),
                Some(_) => Err(PageError::forbidden(
                    "the form's CSRF token is wrong; reload the page and try again",
                )),
                None => Err(PageError::forbidden(
                    "the form carries no CSRF token; reload the page and try again",
                )),
            },
        }
    }

    /// Refused unless the user has the operator role.
    pub fn operator(&self) -> Result<(), PageError> {
        match self.role {
            Role::Operator => Ok(()),
            Role::Viewer => Err(PageError::forbidden(
                "this needs the operator role: the viewer role may only read",
            )),
        }
    }
}

/// Refuse a request whose `Origin` names another host than its `Host` (or, behind
/// a reverse proxy that rewrites `Host`, its `X-Forwarded-Host`: a page on another
/// site cannot make a browser send either header with a value of its choosing).
pub fn same_origin(headers: &HeaderMap) -> Result<(), PageError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
    let matches = [header::HOST.as_str(), "x-forwarded-host"].iter().any(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|host| {
                !host.trim().is_empty() && origin_host.eq_ignore_ascii_case(host.trim())
            })
    });
    if matches {
        Ok(())
    } else {
        Err(PageError::forbidden("cross-origin request refused"))
    }
}

impl FromRequestParts<Arc<AppState>> for Who {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Who, PageError> {
        if let Some(auth) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            let token = auth
                .strip_prefix("Bearer ")
                .or_else(|| auth.strip_prefix("bearer "))
                .unwrap_or("");
            let client = super::client_addr(&parts.extensions);
            st.may_sign_in(client)?;
            return match st.tokens.role_of(token.trim()) {
                Some(role) => Ok(Who {
                    role,
                    actor: actor("", role),
                    csrf: None,
                    session: None,
                }),
                None => {
                    tracing::warn!("console: a bearer token was not accepted");
                    st.sign_in_failed(client);
                    Err(PageError::new(
                        StatusCode::UNAUTHORIZED,
                        "token not accepted",
                    ))
                }
            };
        }
        let id = cookie(&parts.headers, SESSION_COOKIE).unwrap_or("");
        match st.sessions.get(id) {
            Some(s) => Ok(Who {
                role: s.role,
                actor: actor(&s.name, s.role),
                csrf: Some(s.csrf),
                session: Some(id.to_string()),
            }),
            None => {
                // back to the page after signing in (a POST cannot be replayed)
                let next = match parts.method {
                    axum::http::Method::GET => parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "/".into()),
                    _ => "/".into(),
                };
                Err(PageError::login(&next))
            }
        }
    }
}

/// Where to go after signing in: a path on this site only (never `//host`).
pub fn safe_next(next: &str) -> &str {
    if next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && next.len() <= 2048
    {
        next
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConsoleConfig {
        ConsoleConfig::default()
    }

    fn env(v: &str, o: &str) -> BTreeMap<String, String> {
        [
            ("MIDAS_CONSOLE_VIEWER_TOKEN".to_string(), v.to_string()),
            ("MIDAS_CONSOLE_OPERATOR_TOKEN".to_string(), o.to_string()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect()
    }

    #[test]
    fn tokens_grant_their_role_and_weak_or_missing_tokens_are_refused() {
        let t = Tokens::from_env(
            &cfg(),
            &env("viewer-token-0123456789", "operator-token-0123456789"),
        )
        .expect("tokens");
        assert_eq!(t.role_of("viewer-token-0123456789"), Some(Role::Viewer));
        assert_eq!(t.role_of("operator-token-0123456789"), Some(Role::Operator));
        assert_eq!(t.role_of("operator-token-012345678"), None);
        assert_eq!(t.role_of(""), None);
        let only_viewer =
            Tokens::from_env(&cfg(), &env("viewer-token-0123456789", "")).expect("one is enough");
        assert_eq!(only_viewer.role_of("operator-token-0123456789"), None);
        let e = Tokens::from_env(&cfg(), &env("tiny9", ""))
            .err()
            .expect("short token refused");
        assert!(e.to_string().contains("console.viewer_token_env"), "{e}");
        assert!(
            !e.to_string().contains("tiny9"),
            "the token is not echoed: {e}"
        );
        assert!(Tokens::from_env(&cfg(), &env("", "")).is_err());
        assert!(Tokens::from_env(
            &cfg(),
            &env("same-token-0123456789", "same-token-0123456789")
        )
        .is_err());
    }

    #[test]
    fn cookies_are_found_and_set_strict() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; midas_console=abc ; b=2".parse().expect("header"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        let c = set_cookie(&h, SESSION_COOKIE, "x", "/", SESSION_TTL);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        h.insert("x-forwarded-proto", "https".parse().expect("header"));
        assert!(set_cookie(&h, SESSION_COOKIE, "x", "/", SESSION_TTL).ends_with("; Secure"));
    }

    #[test]
    fn sessions_are_bounded_and_names_are_one_short_line() {
        let s = Sessions::default();
        let first = s.open(Role::Viewer, "a".into()).0;
        for _ in 0..MAX_SESSIONS {
            s.open(Role::Viewer, "b".into());
        }
        assert!(s.get(&first).is_none(), "the oldest made room");
        assert_eq!(actor("", Role::Operator), "operator@console");
        assert_eq!(actor(" alice\n", Role::Viewer), "alice@console");
        assert_eq!(
            actor(&"x".repeat(500), Role::Viewer).len(),
            MAX_NAME + "@console".len()
        );
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(
            safe_next("/search?status=unknown"),
            "/search?status=unknown"
        );
    }

    #[test]
    fn a_cross_origin_post_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:9465".parse().expect("header"));
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            "http://127.0.0.1:9465".parse().expect("header"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            "http://evil.example".parse().expect("header"),
        );
        assert!(same_origin(&h).is_err());
        h.insert(header::ORIGIN, "null".parse().expect("header"));
        assert!(same_origin(&h).is_err());
        // behind a proxy that rewrites Host
        h.insert(
            header::ORIGIN,
            "https://console.example".parse().expect("header"),
        );
        assert!(same_origin(&h).is_err());
        h.insert(
            "x-forwarded-host",
            "console.example".parse().expect("header"),
        );
        assert!(same_origin(&h).is_ok());
    }
}
