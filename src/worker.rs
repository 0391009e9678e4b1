//! `midas-worker run`: wires the pieces together and shuts them down in order.
//!
//! Start: outbox writer → (embedded simulator) → Midas client → dispatcher (resumes
//! every non-final job) → broker session (consume + publish) → reply relay → HTTP.
//! Stop (SIGTERM/SIGINT or the handle): stop consuming and settle what was taken
//! in → let in-flight Midas calls finish and be recorded (bounded) → publish and
//! confirm the replies they produced (bounded) → flush the writer. A SIGKILL at any
//! instant loses nothing: whatever was acked is in the outbox, and everything the
//! outbox holds resumes at the next start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::broker::consumer::IntakeCtx;
use crate::broker::{publisher, session};
use crate::config::{Environment, Settings};
use crate::dispatch::{max_held, DispatchMsg, Dispatcher};
use crate::metrics::Health;
use crate::midas::MidasClient;
use crate::outbox::postgres::coord::Coordinator;
use crate::outbox::postgres::writer::{Fence, PgWriter};
use crate::outbox::{query, Location, Outbox, Writer};
use crate::sim::{SimApp, SimHandle, Simulator};

/// The relay re-sends only replies that have been final this long: the dispatcher
/// publishes a fresh final reply itself, right after its commit, and a relay pass
/// between the two would publish it twice (seen as duplicate replies under load).
const RELAY_MIN_AGE_MS: i64 = 2_000;

/// How long the broker side may take to publish the last replies at shutdown.
/// With the dispatcher's grace (`midas.request_timeout` + 2 s) a SIGTERM ends the
/// process within `midas.request_timeout` + 10 s whatever the broker does.
const BROKER_STOP: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("cannot start the embedded simulator: {0}")]
    Simulator(std::io::Error),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (push.listen): {source}")]
    Push {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Midas(#[from] crate::midas::client::NewClientError),
}

/// A running worker.
pub struct Running {
    pub http_addr: SocketAddr,
    /// The push listener's address (`[push] listen` set).
    pub push_addr: Option<SocketAddr>,
    pub midas_url: String,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    _sim: Option<SimHandle>,
}

impl Running {
    /// Stop in order and wait for it.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
    }

    /// Wait until stopped by `trigger` (e.g. a signal future).
    pub async fn run_until(self, trigger: impl std::future::Future<Output = ()>) {
        trigger.await;
        tracing::info!("shutting down: no new commands; finishing in-flight work");
        self.stop().await;
        tracing::info!("stopped");
    }
}

/// The embedded simulator for `environment = "simulator"`, keyed with the apps' keys.
pub async fn start_embedded_simulator(settings: &Settings) -> Result<SimHandle, WorkerError> {
    let sim = Simulator::new(
        settings.config.simulator.clone(),
        SimApp::from_settings(settings),
    )
    .start()
    .await
    .map_err(WorkerError::Simulator)?;
    tracing::warn!(
        url = %sim.base_url(),
        "SIMULATOR MODE: Midas calls go to the embedded simulator; NO REAL CURRENCY MOVES"
    );
    Ok(sim)
}

/// Start the worker. With `midas_url` set, Midas calls go there (tests); otherwise to
/// the embedded simulator or `midas.base_url` as `midas.environment` says.
pub async fn start(
    settings: Arc<Settings>,
    midas_url: Option<String>,
) -> Result<Running, WorkerError> {
    let location = Location::of(&settings.config.outbox);
    let (writer, closer, coord) = match &location {
        Location::Sqlite(path) => {
            let (w, thread) = Writer::start(path, settings.config.outbox.max_size_mb)?;
            (Outbox::Sqlite(w), Closer::Thread(thread), None)
        }
        Location::Postgres(url) => {
            let fence = Fence {
                me: crate::outbox::postgres::worker_name().into(),
                lease_ms: millis(settings.config.outbox.lease.0),
                call_ms: millis(
                    settings.config.midas.request_timeout.0 + crate::config::LEASE_CALL_MARGIN,
                ),
            };
            tracing::info!(worker = %fence.me, "shared PostgreSQL outbox: jobs run under player leases");
            let (w, task) = PgWriter::start(url.clone(), fence.clone()).await?;
            let coord = Coordinator::new(url.clone(), fence);
            let watch = crate::outbox::postgres::confirms::ReplyWatch::start(url.clone());
            (Outbox::Postgres(w, watch), Closer::Task(task), Some(coord))
        }
    };
    let mut sim = None;
    let midas_url = match midas_url {
        Some(u) => u,
        None if settings.config.midas.environment == Environment::Simulator => {
            let s = start_embedded_simulator(&settings).await?;
            let u = s.base_url();
            sim = Some(s);
            u
        }
        None => settings.config.midas.base_url.clone(),
    };
    let midas = Arc::new(MidasClient::new(&settings, &midas_url)?);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (stop_pub_tx, stop_pub) = watch::channel(false);
    let (pub_handle, pub_queue) = publisher::channel(&settings.config.broker);
    let (dtx, drx) = mpsc::unbounded_channel();
    // this worker's readiness (not the process's: tests run several workers)
    let health = Health::new();

    // Operator re-opens are noticed by the relay from this action on; reading it
    // before the dispatcher's start-up load means none falls between the two.
    let first_action = match &location {
        Location::Sqlite(path) => {
            let c = crate::outbox::open_ro(path)?;
            query::last_operator_action(&c)?
        }
        // a shared outbox: re-opened jobs are found by the lease coordinator
        Location::Postgres(_) => 0,
    };
    let (give_back_tx, give_back) = mpsc::unbounded_channel();
    let dispatcher = Dispatcher::new(
        settings.clone(),
        writer.clone(),
        pub_handle.clone(),
        midas.clone(),
        shutdown.clone(),
        coord.is_some().then_some(give_back_tx),
    );
    let held = dispatcher.held();
    let dispatcher = tokio::spawn(dispatcher.run(drx, shutdown.clone()));

    let ctx = IntakeCtx {
        settings: settings.clone(),
        writer: writer.clone(),
        dispatcher: dtx.clone(),
        publisher: pub_handle.clone(),
        midas,
        held,
        max_held: max_held(&settings),
        shutdown: shutdown.clone(),
    };
    let name = format!(
        "midas-worker {} pid {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let broker = tokio::spawn(session::run(
        ctx,
        pub_queue,
        shutdown.clone(),
        stop_pub,
        name,
        health.clone(),
    ));

    let (shutdown_rx_for_relay, relay_health) = (shutdown.clone(), health.clone());
    let lease = settings.config.outbox.lease.0;
    let relay_path = settings_path(&location);
    let relay = match coord {
        None => tokio::spawn(async move {
            relay_loop(
                relay_path,
                pub_handle,
                dtx,
                shutdown_rx_for_relay,
                first_action,
                relay_health,
            )
            .await;
            None
        }),
        Some(coord) => tokio::spawn(async move {
            Some(
                crate::coordinate::run(
                    coord,
                    lease,
                    dtx,
                    give_back,
                    pub_handle,
                    relay_health,
                    shutdown_rx_for_relay,
                )
                .await,
            )
        }),
    };

    let http_addr = settings.config.http.listen;
    let (http_addr, http) = crate::http::serve(
        http_addr,
        writer.clone(),
        location.clone(),
        health,
        shutdown.clone(),
    )
    .await
    .map_err(|source| WorkerError::Http {
        addr: http_addr,
        source,
    })?;
    let push = start_push(&settings, &writer, shutdown.clone()).await?;
    let push_addr = push.as_ref().map(|p| p.0);
    tracing::info!(http = %http_addr, outbox = %location.describe(), "worker started");

    let done = tokio::spawn(async move {
        let mut s = shutdown;
        while !*s.borrow() {
            if s.changed().await.is_err() {
                break;
            }
        }
        // 1. intake stops on `shutdown`; 2. the dispatcher finishes in-flight calls
        let _ = dispatcher.await;
        let coord = relay.await.ok().flatten();
        // 3. publish what those calls produced, then stop the broker side; a broker
        // that does not answer is not waited for (unconfirmed replies are relayed
        // from the outbox at the next start)
        let _ = stop_pub_tx.send(true);
        let abort = broker.abort_handle();
        if tokio::time::timeout(BROKER_STOP, broker).await.is_err() {
            abort.abort();
            tracing::warn!("broker session did not stop in time; closed it");
        }
        let _ = http.await;
        if let Some((_, listener, relay)) = push {
            let _ = listener.await;
            let _ = relay.await;
        }
        // 4. flush the writer: every earlier request is committed when this returns
        let _ = writer.flush().await;
        drop(writer);
        match closer {
            Closer::Thread(t) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            Closer::Task(t) => {
                let _ = t.await;
            }
        }
        // 5. a shared outbox: give the players back so other workers take them now
        if let Some(mut c) = coord {
            match tokio::time::timeout(Duration::from_secs(5), c.release_all()).await {
                Ok(Ok(())) => tracing::info!("player leases given back"),
                _ => tracing::warn!(
                    "could not give the player leases back; they run out after outbox.lease"
                ),
            }
        }
    });
    Ok(Running {
        http_addr,
        push_addr,
        midas_url,
        shutdown: shutdown_tx,
        done,
        _sim: sim,
    })
}

/// The push listener and the events publisher, when `[push] listen` is set.
async fn start_push(
    settings: &Settings,
    writer: &Outbox,
    shutdown: watch::Receiver<bool>,
) -> Result<
    Option<(
        SocketAddr,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    )>,
    WorkerError,
> {
    let c = &settings.config;
    let Some(addr) = c.push.listen else {
        return Ok(None);
    };
    let apps = crate::push::PushApp::from_settings(settings);
    if apps.is_empty() {
        tracing::warn!("push.listen is set but no app has push_token_env: every push is refused");
    }
    let (handover, relay) = crate::push::relay::start(
        c.broker.url.expose().to_string(),
        c.push.event_queue.clone(),
        writer.clone(),
        shutdown.clone(),
    );
    let service = crate::push::server::PushService {
        apps,
        outbox: writer.clone(),
        relay: handover,
        max_body_bytes: c.push.max_body_bytes,
        simulated: c.midas.environment == Environment::Simulator,
    };
    let (bound, listener) = crate::push::server::serve(addr, service, shutdown)
        .await
        .map_err(|source| WorkerError::Push { addr, source })?;
    tracing::info!(push = %bound, queue = %c.push.event_queue, "push listener started");
    Ok(Some((bound, listener, relay)))
}

/// How the outbox writer is stopped.
enum Closer {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn settings_path(l: &Location) -> std::path::PathBuf {
    match l {
        Location::Sqlite(p) => p.clone(),
        Location::Postgres(_) => std::path::PathBuf::new(),
    }
}

/// Re-publish unconfirmed replies from the outbox and notice operator re-opens.
async fn relay_loop(
    db: std::path::PathBuf,
    publisher: publisher::Publisher,
    dispatcher: mpsc::UnboundedSender<DispatchMsg>,
    mut shutdown: watch::Receiver<bool>,
    first_action: i64,
    health: Health,
) {
    let mut last_action: Option<i64> = Some(first_action);
    let mut cursor = query::RelayCursor::default();
    let page = publisher::RELAY_PAGE;
    loop {
        let path = db.clone();
        let after = cursor.after;
        let found = tokio::task::spawn_blocking(move || {
            let c = crate::outbox::open_ro(&path)?;
            Ok::<_, crate::outbox::OutboxError>((
                query::unpublished_replies_after(
                    &c,
                    after,
                    page,
                    crate::command::now_ms() - RELAY_MIN_AGE_MS,
                )?,
                query::last_operator_action(&c)?,
            ))
        })
        .await;
        match found {
            Ok(Ok((replies, action))) => {
                cursor.advance(&replies, page);
                // while the broker is away, replies wait in the outbox, not in memory
                let n = if health.broker_connected() {
                    publisher.relay_once(replies)
                } else {
                    0
                };
                if n > 0 {
                    tracing::info!(
                        replies = n,
                        "re-publishing unconfirmed replies from the outbox"
                    );
                }
                match last_action {
                    Some(prev) if action > prev => {
                        let _ = dispatcher.send(DispatchMsg::Reload { after_action: prev });
                    }
                    _ => {}
                }
                last_action = Some(action);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reply relay cannot read the outbox"),
            Err(_) => break, // the runtime is shutting down
        }
        tokio::select! {
            _ = tokio::time::sleep(publisher::RELAY_INTERVAL) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
}
