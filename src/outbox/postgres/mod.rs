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
//! per batch, as the SQLite writer does; a batch's statements in `commit.rs`); [`coord`] claims, renews and releases
//! leases and loads the jobs of claimed players; [`ops`] serves the operator verbs.
//! Here too: who a worker is ([`Fence`]), a pending job from its row, and the
//! writer's prepared-statement cache.

mod batch;
mod commit;
pub mod confirms;
pub mod coord;
mod intake;
pub mod ops;
mod pushes;
pub mod tls;
pub mod writer;
mod writes;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Row, Statement, Transaction};

use super::writer::decode_params;
use super::OutboxError;
use crate::engine::job::Job;
use crate::secret::{Secret, SecretUrl};

/// The schema, applied at every start (idempotent).
pub const SCHEMA: &str = include_str!("../../../schema-postgres.sql");

/// The schema version `schema-postgres.sql` brings an outbox to (older ones are
/// migrated in place when a worker starts: version 2 → 3 the lease generation,
/// 3 → 4 `balance` and `query_order` rows).
pub const SCHEMA_VERSION: &str = "4";

/// Round trips the PostgreSQL outbox's writers and coordinators of this process
/// have made (statements, prepares, BEGIN/COMMIT/SAVEPOINT): `bench` divides it
/// by jobs. Counted where each statement is sent, whether it succeeds or not.
static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count one round trip (see [`round_trips`]).
pub(crate) fn trip() {
    ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Round trips to PostgreSQL made by this process's outbox writers and
/// coordinators so far.
pub fn round_trips() -> u64 {
    ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// "Now" on the database's clock, unix milliseconds (leases are judged by it).
pub const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Key of the advisory lock that serialises schema set-up between workers.
const SCHEMA_LOCK: i64 = 0x6d69_6461_735f_7762; // "midas_wb"

/// The server ends a session left idle inside a transaction this long.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(3);
/// A statement waiting this long for a row lock fails (and is retried).
const LOCK_TIMEOUT: Duration = Duration::from_secs(3);
/// No statement runs longer than this.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A driver error in one line with what the server said (tokio-postgres's own
/// text is only "db error"). Never holds the URL or its password.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

/// Whether `url` names a PostgreSQL outbox.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Connect and drive the connection on its own task, TLS as the URL's `sslmode`
/// says, with libpq's meaning ([`tls`]; `prefer` when absent). Plain text — with
/// `disable`, or `prefer` against a server without TLS — is warned about every
/// time, loopback included. The password never appears in errors: tokio-postgres
/// does not echo the URL.
pub async fn connect(url: &SecretUrl) -> Result<Client, OutboxError> {
    connect_with(url, true, None)
        .await
        .map(|(client, _)| client)
}

/// [`connect`] again after a connection was lost: a plain-text connection is not
/// warned about again (the writer and the coordinator reconnect in a loop while
/// PostgreSQL restarts; the warning came with the first connection).
pub async fn reconnect(url: &SecretUrl) -> Result<Client, OutboxError> {
    connect_with(url, false, None)
        .await
        .map(|(client, _)| client)
}

/// The channel on which a writer that recorded a job for another worker's player
/// tells the lease holders to look now (see [`Coordinator`](coord::Coordinator)).
pub const JOBS_CHANNEL: &str = "midas_worker_jobs";

/// How a write that finds its jobs by id tests that a job is still pending
/// (`$alias` is the table's alias with its dot, or ""): the rows of
/// `state = 'pending'` (the table's CHECK allows four states), spelled so that it
/// does not imply the predicate of the partial indexes on pending jobs. With
/// `state = 'pending'` the planner may take `jobs_pending_player (appid, openid, id)`
/// for `id = ANY($1)` — an index it believes small while statistics say few jobs
/// are pending (a fresh outbox, or any outbox before an outage) — and scan it whole
/// once per id: 200–350 ms per batch statement with a backlog pending (bug S in
/// RELIABILITY.md). Spelled this way, only the primary key serves the lookup.
macro_rules! still_pending {
    ($alias:literal) => {
        concat!($alias, "state NOT IN ('succeeded', 'failed', 'unknown')")
    };
}
pub(super) use still_pending;

/// [`reconnect`], and listen on [`JOBS_CHANNEL`]: each notification wakes `wake`.
pub async fn reconnect_listening(
    url: &SecretUrl,
    wake: Arc<tokio::sync::Notify>,
) -> Result<Client, OutboxError> {
    let (client, _) = connect_with(url, false, Some(wake)).await?;
    trip();
    client
        .batch_execute(&format!("LISTEN {JOBS_CHANNEL}"))
        .await?;
    Ok(client)
}

/// [`connect`], also saying whether the connection is encrypted.
pub async fn connect_reporting(url: &SecretUrl) -> Result<(Client, bool), OutboxError> {
    connect_with(url, true, None).await
}

/// Drive a connection on its own task; a notification (LISTEN) wakes `wake`.
fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, wake: Option<Arc<tokio::sync::Notify>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::task::Poll;
    tokio::spawn(async move {
        let ended = std::future::poll_fn(|cx| loop {
            match conn.poll_message(cx) {
                Poll::Ready(Some(Ok(tokio_postgres::AsyncMessage::Notification(_)))) => {
                    if let Some(w) = &wake {
                        w.notify_one();
                    }
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
        if let Err(e) = ended {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
}

async fn connect_with(
    url: &SecretUrl,
    warn: bool,
    wake: Option<Arc<tokio::sync::Notify>>,
) -> Result<(Client, bool), OutboxError> {
    use tokio_postgres::config::SslMode;
    let (rest, params) = tls::split(url.expose())?;
    let mut cfg = tokio_postgres::Config::from_str(&rest)?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    // A worker cut off mid-transaction must not keep its row locks (the workers
    // taking over its players would wait on them): the server ends a session idle
    // inside a transaction, and a lock wait or statement never blocks a worker for
    // long. A connection whose peer vanished is noticed by TCP keepalives.
    cfg.options(format!(
        "-c idle_in_transaction_session_timeout={} -c lock_timeout={} -c statement_timeout={}",
        IDLE_IN_TRANSACTION.as_millis(),
        LOCK_TIMEOUT.as_millis(),
        STATEMENT_TIMEOUT.as_millis()
    ));
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(5));
    cfg.keepalives_interval(Duration::from_secs(2));
    cfg.keepalives_retries(3);
    #[cfg(target_os = "linux")]
    cfg.tcp_user_timeout(Duration::from_secs(10));
    if cfg.get_application_name().is_none() {
        cfg.application_name("midas-worker");
    }
    if params.mode == tls::SslMode::Disable {
        cfg.ssl_mode(SslMode::Disable);
        plain_text_warning("sslmode=disable", warn);
        return Ok((plain(&cfg, wake).await?, false));
    }
    cfg.ssl_mode(SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls::client_config(&params)?);
    match cfg.connect(tls).await {
        Ok((client, conn)) => {
            drive(conn, wake);
            Ok((client, true))
        }
        // libpq's prefer: when TLS fails (no TLS on the server), try plain text
        Err(e) if params.mode == tls::SslMode::Prefer && e.as_db_error().is_none() => {
            tracing::debug!(error = %describe(&e), "PostgreSQL TLS failed; sslmode=prefer tries plain text");
            cfg.ssl_mode(SslMode::Disable);
            let client = plain(&cfg, wake).await?;
            plain_text_warning("sslmode=prefer and the server offers no TLS", warn);
            Ok((client, false))
        }
        Err(e) => Err(e.into()),
    }
}

async fn plain(
    cfg: &tokio_postgres::Config,
    wake: Option<Arc<tokio::sync::Notify>>,
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = cfg.connect(NoTls).await?;
    drive(conn, wake);
    Ok(client)
}

fn plain_text_warning(why: &str, warn: bool) {
    if !warn {
        // said when the connection was first made; the setting has not changed
        tracing::debug!("PostgreSQL outbox connection is plain text ({why})");
        return;
    }
    tracing::warn!(
        "the PostgreSQL outbox connection is plain text ({why}): session_keys and the \
         password cross the network readable; use sslmode=verify-full (or require) in \
         outbox.url unless the database is on this host"
    );
}

/// Apply the schema (idempotent; one transaction under an advisory lock, so
/// workers starting together do not race) and check its version.
pub async fn prepare(client: &mut Client) -> Result<(), OutboxError> {
    let tx = client.transaction().await?;
    // The session's lock_timeout (a few seconds, so a stuck worker never holds rows
    // long) is too short here: a worker that died holding the schema lock keeps it
    // until the server ends its session (idle_in_transaction_session_timeout), and
    // the schema's statements wait for the running workers' batches. Start-up waits.
    tx.batch_execute("SET LOCAL lock_timeout = '60s'").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    // An outbox already at this version is left alone: the schema's `CREATE INDEX
    // IF NOT EXISTS` locks each table before it finds the index there, and taking
    // those locks one by one while other workers write can deadlock with them.
    if schema_version(&tx).await?.as_deref() != Some(SCHEMA_VERSION) {
        tx.batch_execute(SCHEMA).await?;
    }
    let version = schema_version(&tx).await?;
    tx.commit().await?;
    match version.as_deref() {
        Some(SCHEMA_VERSION) => Ok(()),
        other => Err(OutboxError::Schema(format!(
            "the PostgreSQL outbox has schema version {other:?}; this release knows version {SCHEMA_VERSION}"
        ))),
    }
}

/// The outbox's schema version; `None` when there is no outbox yet.
async fn schema_version(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<String>, OutboxError> {
    let exists: bool = tx
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    Ok(tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
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

/// The job columns [`job_from_row`] reads, in its order.
pub const JOB_COLS: &str =
    "id, request, session_key, attempts, first_attempt_at, next_attempt_at, \
     received_at, last_errcode, last_error, reopened_at, calls, uncertain";

/// A pending job from a row selected with [`JOB_COLS`].
pub fn job_from_row(r: &Row) -> Result<Job, OutboxError> {
    let id: i64 = r.try_get(0)?;
    let request: String = r.try_get(1)?;
    Ok(Job {
        id,
        params: decode_params(&request)?,
        session_key: r.try_get::<_, Option<String>>(2)?.map(Secret::new),
        attempts: clamp_u32(r.try_get(3)?),
        calls: clamp_u32(r.try_get(10)?),
        uncertain: r.try_get::<_, i64>(11)? != 0,
        token_retries: 0,
        first_attempt_at: r.try_get(4)?,
        next_attempt_at: r.try_get(5)?,
        received_at: r.try_get(6)?,
        last_errcode: r.try_get(7)?,
        last_error: r.try_get(8)?,
        reopened_at: r.try_get(9)?,
        lease_gen: 0,
    })
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Who this worker is and how its leases are judged.
#[derive(Debug, Clone)]
pub struct Fence {
    /// This worker's name (`player_leases.owner`, `jobs.claimed_by`).
    pub me: Arc<str>,
    /// `outbox.lease` in ms.
    pub lease_ms: i64,
    /// A call may start only while the lease outlives it by this much (ms):
    /// `midas.request_timeout` + a margin.
    pub call_ms: i64,
}

/// Prepared statements of the current connection. Behind a lock held only for a
/// lookup or an insert (never across an await), so the statements of one batch
/// that do not depend on each other can run at once, pipelined on the connection.
#[derive(Default)]
pub(super) struct Stmts(std::sync::Mutex<HashMap<&'static str, Statement>>);

impl Stmts {
    pub(super) async fn get(
        &self,
        tx: &Transaction<'_>,
        sql: &'static str,
    ) -> Result<Statement, OutboxError> {
        if let Some(s) = self.cached(sql) {
            return Ok(s);
        }
        trip();
        let s = tx.prepare(sql).await?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(sql, s.clone());
        }
        Ok(s)
    }

    fn cached(&self, sql: &'static str) -> Option<Statement> {
        self.0.lock().ok().and_then(|m| m.get(sql).cloned())
    }
}
