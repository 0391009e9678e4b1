//! The shared outbox on PostgreSQL: several workers, one database.
//!
//! Same tables as the SQLite outbox (`schema-postgres.sql`, the single truth for
//! this engine, applied at every start), plus the coordination a shared outbox
//! needs: a per-player lease (`player_leases`) so only one worker at a time calls
//! Midas for a player, `jobs.claimed_by` so the lease holder knows which pending
//! jobs it has loaded, and named leases (`leases`) for work one worker does for all
//! (the reply relay). Expiry is always judged on the database's clock, so the
//! workers' clocks never have to agree.
//!
//! [`writer`] group-commits intake, pre-call marks and outcomes (one transaction
//! per batch, as the SQLite writer does); [`coord`] claims, renews and releases
//! leases and loads the jobs of claimed players; [`ops`] serves the operator verbs.

pub mod coord;
pub mod ops;
pub mod writer;

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::OutboxError;
use crate::secret::SecretUrl;

/// The schema, applied at every start (idempotent).
pub const SCHEMA: &str = include_str!("../../../schema-postgres.sql");

/// "Now" on the database's clock, unix milliseconds (leases are judged by it).
pub const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Key of the advisory lock that serialises schema set-up between workers.
const SCHEMA_LOCK: i64 = 0x6d69_6461_735f_7762; // "midas_wb"

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `url` names a PostgreSQL outbox.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Connect (TLS as the URL's `sslmode` says, via rustls with the platform's
/// roots) and drive the connection on its own task. The password never appears
/// in errors: tokio-postgres does not echo the URL.
pub async fn connect(url: &SecretUrl) -> Result<Client, OutboxError> {
    let mut cfg = tokio_postgres::Config::from_str(url.expose())?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    if cfg.get_application_name().is_none() {
        cfg.application_name("midas-worker");
    }
    let client = if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        client
    } else {
        let tls = tls_config()?;
        let (client, conn) = cfg
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        client
    };
    Ok(client)
}

fn tls_config() -> Result<rustls::ClientConfig, OutboxError> {
    use rustls_platform_verifier::ConfigVerifierExt;
    rustls::ClientConfig::with_platform_verifier()
        .map_err(|e| OutboxError::Schema(format!("TLS set-up for PostgreSQL: {e}")))
}

/// Apply the schema (idempotent; one transaction under an advisory lock, so
/// workers starting together do not race) and check its version.
pub async fn prepare(client: &mut Client) -> Result<(), OutboxError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    let version: Option<String> = tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    tx.commit().await?;
    match version.as_deref() {
        Some("2") => Ok(()),
        other => Err(OutboxError::Schema(format!(
            "the PostgreSQL outbox has schema version {other:?}; this release knows version 2"
        ))),
    }
}

/// Connect and apply the schema.
pub async fn open(url: &SecretUrl) -> Result<Client, OutboxError> {
    let mut c = connect(url).await?;
    prepare(&mut c).await?;
    Ok(c)
}

/// A name for this worker process, unique among the workers sharing the outbox:
/// host, pid and a random part (a restarted process is a new worker).
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().chars().take(64).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}
