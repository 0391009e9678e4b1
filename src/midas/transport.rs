//! The HTTP plumbing every Midas and token request shares: the client builder (no
//! redirects, bounded times), the capped body read ([`MAX_ANSWER_BYTES`]) and the
//! secret-free description of a transport error. A leaf: it knows nothing of Midas
//! answers, tokens or API versions.

use std::time::Duration;

use crate::config::Settings;

/// The largest Midas or token answer read; anything bigger is not a Midas answer.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Reading an answer body failed or it was too big.
#[derive(Debug)]
pub(crate) enum ReadError {
    Transport(String),
    TooLarge,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Transport(s) => f.write_str(s),
            ReadError::TooLarge => write!(f, "answer larger than {} KiB", MAX_ANSWER_BYTES / 1024),
        }
    }
}

/// Read `resp`'s body, at most `limit` bytes: a larger answer (announced or actual)
/// is refused after reading no more than `limit` bytes of it.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Transport(describe(&e)))?
    {
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The HTTP client every Midas and token request uses: no redirects, bounded times.
pub(crate) fn http_client(settings: &Settings) -> Result<reqwest::Client, reqwest::Error> {
    let cfg = &settings.config.midas;
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.request_timeout.0)
        .connect_timeout(cfg.request_timeout.0.min(Duration::from_secs(3)))
        .pool_max_idle_per_host(cfg.max_in_flight.max(16))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}

/// A short, secret-free description of a transport error.
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else if e.is_request() {
        "request error"
    } else {
        "transport error"
    };
    // Never include the URL: it carries the access token.
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() || detail.contains("access_token") {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}
