//! Checks on a parsed config: `validate` (ranges, formats, apps; run on every
//! load) and the refusals made before anything connects (`unavailable`,
//! `run_preflight`: the PostgreSQL outbox of a later release, `run`'s
//! explicit-environment rule, and the simulator fail-safe on a shared broker).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{
    invalid, Config, ConfigError, Environment, Settings, Source, ENV_ALLOW_SIMULATOR,
    MAX_COMMAND_BYTES_LIMIT, MAX_GIVE_UP_AFTER,
};

pub(super) fn validate(c: &Config) -> Result<(), ConfigError> {
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
    if c.push.event_queue.is_empty() || c.push.event_queue.len() > 255 {
        return Err(invalid("push.event_queue", "must be 1..=255 characters"));
    }
    if c.push.max_body_bytes < 1024 || c.push.max_body_bytes > MAX_COMMAND_BYTES_LIMIT {
        return Err(invalid(
            "push.max_body_bytes",
            format!("must be between 1024 and {MAX_COMMAND_BYTES_LIMIT}"),
        ));
    }
    if c.broker.prefetch == 0 {
        return Err(invalid("broker.prefetch", "must be at least 1"));
    }
    if c.broker.max_command_bytes == 0 || c.broker.max_command_bytes > MAX_COMMAND_BYTES_LIMIT {
        return Err(invalid(
            "broker.max_command_bytes",
            format!("must be between 1 and {MAX_COMMAND_BYTES_LIMIT}"),
        ));
    }
    if let Some(url) = &c.outbox.url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "outbox.url",
                "must be a postgres:// URL (or absent: the SQLite file at outbox.path)",
            ));
        }
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
    if c.retry.balance_give_up_after.0.is_zero() {
        return Err(invalid("retry.balance_give_up_after", "must be above 0"));
    }
    if c.retry.balance_give_up_after.0 > MAX_GIVE_UP_AFTER {
        return Err(invalid(
            "retry.balance_give_up_after",
            "must be at most 47h",
        ));
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
        if let Some(ip) = &a.default_user_ip {
            if ip.trim().parse::<IpAddr>().is_err() {
                return Err(invalid(
                    format!("apps[{i}].default_user_ip"),
                    "must be an IPv4 or IPv6 address",
                ));
            }
        }
        if c.apps.iter().take(i).any(|b| b.appid == a.appid) {
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
        (
            "simulator.session_expire_after_lost_rate",
            s.session_expire_after_lost_rate,
        ),
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

/// The margin a player's lease must still have beyond `midas.request_timeout`
/// when a call starts (shared outbox).
pub const LEASE_CALL_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How late a lease renewal may come after `outbox.lease / 3`: the coordinator
/// looks every 0.5 s ([`crate::coordinate::LOOK_EVERY`]) and one look may take
/// up to 1 s more before its renewal statement runs.
pub const LEASE_RENEW_DELAY: std::time::Duration = std::time::Duration::from_millis(1500);

/// The shortest `outbox.lease` that works with `request_timeout`: a pre-call mark
/// needs the lease to outlive `request_timeout` + [`LEASE_CALL_MARGIN`], and just
/// before the latest renewal (lease / 3 + [`LEASE_RENEW_DELAY`] after the last
/// one) two thirds of the lease minus that delay are left. So
/// lease × 2/3 ≥ request_timeout + 2 s + 1.5 s, i.e.
/// lease ≥ 1.5 × (request_timeout + 3.5 s): marks are then never refused while
/// renewals come on time.
pub fn min_lease(request_timeout: std::time::Duration) -> std::time::Duration {
    (request_timeout + LEASE_CALL_MARGIN + LEASE_RENEW_DELAY) * 3 / 2
}

/// Settings that cannot work together at run time: a shared outbox's lease
/// shorter than [`min_lease`].
pub fn unavailable(s: &Settings) -> Result<(), ConfigError> {
    let c = &s.config;
    if c.outbox.url.is_some() {
        let need = min_lease(c.midas.request_timeout.0);
        if c.outbox.lease.0 < need {
            return Err(invalid(
                "outbox.lease",
                format!(
                    "must be at least 1.5 × (midas.request_timeout + 3.5s) = {}ms, so the lease \
                     left before each renewal still covers a call and its margin",
                    need.as_millis()
                ),
            ));
        }
    }
    Ok(())
}

/// What `run` checks before it connects anywhere: features this release lacks,
/// `midas.environment` chosen explicitly (file or environment, never defaulted), and the simulator fail-safe (no
/// simulated answers on a broker that real game servers may share).
pub fn run_preflight(
    s: &Settings,
    allow_simulator_on_shared_broker: bool,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    unavailable(s)?;
    // Required for `run` whatever the environment says: a default would let an
    // install answer real game servers from the simulator by accident.
    // (`MIDAS_WORKER_REQUIRE_ENVIRONMENT`, which the image sets, is now implied.)
    if s.provenance.source_of("midas.environment") == Source::Default {
        return Err(invalid(
            "midas.environment",
            "not set; `run` requires it: set midas.environment = \"simulator\"|\"sandbox\"|\"production\" \
             in the config file (or MIDAS_WORKER__MIDAS__ENVIRONMENT)",
        ));
    }
    if s.config.midas.environment == Environment::Simulator
        && !broker_is_loopback(&s.config.broker.url)
        && !allow_simulator_on_shared_broker
        && !truthy(env.get(ENV_ALLOW_SIMULATOR))
    {
        return Err(invalid("midas.environment", shared_broker_message(s)));
    }
    Ok(())
}

fn shared_broker_message(s: &Settings) -> String {
    format!(
        "simulator mode refuses a broker that is not on this machine (broker.url host {:?}): \
         game servers there would get simulated answers and no real currency would move; \
         use sandbox/production, a loopback broker, or `run --allow-simulator-on-shared-broker` \
         ({ENV_ALLOW_SIMULATOR}=1)",
        crate::secret::url_host(&s.config.broker.url)
    )
}

fn truthy(v: Option<&String>) -> bool {
    v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// True when the broker URL's host is this machine (`localhost`, `127.0.0.0/8`,
/// `::1`), judged from the text alone, before any connection. Both this module's
/// reading and lapin's must agree; anything unclear counts as shared.
pub fn broker_is_loopback(url: &str) -> bool {
    fn loopback(host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
    let ours = crate::secret::url_host(url);
    let lapins = match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) => u.authority.host,
        Err(_) => return false,
    };
    (ours.is_empty() || loopback(ours)) && loopback(&lapins)
}
