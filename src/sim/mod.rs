//! A Midas simulator served over real HTTP (axum), so the worker and its tests can be
//! run end to end without touching real currency, and so that every failure mode a
//! client must survive can be produced on demand and repeatably (seeded RNG).
//!
//! Routes:
//! - `POST /cgi-bin/stable_token`, `GET /cgi-bin/token`: access tokens.
//! - `POST /cgi-bin/midas/{getbalance,pay,present,cancelpay}` and the same under
//!   `/cgi-bin/midas/sandbox/`: checked in this order — access token (41001, 40001,
//!   42001), JSON object body and fields (90018), appid known (90018) and owning the
//!   token (90017), `sig` (90011, sandbox key on sandbox paths, AppKey otherwise),
//!   `mp_sig` (90009/90010), then faults, then the ledger.
//! - `POST /wxa/game/{getbalance,pay,present,cancelpay}`: virtual payment 2.0
//!   (see [`v2`]): access token, `sig_method` and body (90018), `pay_sig` over the raw
//!   body with the AppKey of `env` (90011), `signature` (90010), then the same faults,
//!   then the ledger with 2.0 rules (idempotency per openid + zone, partial refunds).
//! - `GET /sim/ledger`, `POST /sim/faults`, `POST /sim/revoke`, `POST /sim/sessions`,
//!   `GET /healthz`: inspection and control for tests and operators.
//!
//! Session keys: the simulator cannot know a user's session_key, so it must be told
//! (`POST /sim/sessions` or [`SimHandle::register_session`]). Trust on first use is
//! off; register to enforce: for an openid with no registered key, `mp_sig` is not
//! checked at all; once a key is registered, `mp_sig` must verify with it (90009 if
//! it does not, 90010 if it verifies only with a rotated-out key). A call without
//! `mp_sig` is accepted either way (current documentation lists only `sig`). 2.0
//! `signature` is checked the same way (90010 for a wrong or old key). The
//! `session_expire_after_lost` fault expires the registered key a call verified with:
//! calls signed with it then answer 90010; calls with any other key go unchecked
//! until a new key is registered.
//!
//! Sandbox and official paths (and 2.0 `env` 0/1) share one ledger, keyed by
//! (appid, openid).
//! Tokens, keys and session keys are never logged.

pub mod cli;
pub mod faults;
pub mod ledger;
mod order;
pub mod push;
mod routes;
pub mod tokens;
pub mod v2;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::SimulatorConfig;
use crate::midas::errcode;
use crate::secret::Secret;

use faults::{run, Call};
pub use faults::{Fault, Faults};
use ledger::Ledger;
pub use ledger::{Account, LedgerDump, Order};
use routes::{
    check_token, err_json, log_refused, midas_official, midas_sandbox, midas_v2, now_ms, respond,
    sim_faults, sim_ledger, sim_purchase, sim_pushes, sim_revoke, sim_sessions, Outcome, QueryMap,
    Route,
};
use tokens::{SessionCheck, Sessions, Tokens};
use verify::{Op, Reject, Request};

/// An app the simulator knows, with its three secrets.
#[derive(Clone, Debug)]
pub struct SimApp {
    pub appid: String,
    /// AppKey for the official paths.
    pub app_key: Secret,
    /// AppKey for the sandbox paths.
    pub sandbox_key: Secret,
    /// App secret for `stable_token` / `token`.
    pub app_secret: Secret,
}

impl SimApp {
    /// The configured apps, each with its AppKey for both official and sandbox paths
    /// (what the embedded simulator and `bench` use).
    pub fn from_settings(settings: &crate::config::Settings) -> Vec<SimApp> {
        settings
            .apps
            .iter()
            .map(|a| SimApp {
                appid: a.appid.clone(),
                app_key: a.app_key.clone(),
                sandbox_key: a.app_key.clone(),
                app_secret: a.app_secret.clone(),
            })
            .collect()
    }
}

/// Mutable state; one lock, never held across an await.
struct Inner {
    ledger: Ledger,
    tokens: Tokens,
    sessions: Sessions,
    faults: Faults,
    fault_rng: SmallRng,
    /// Draws for `session_expire_after_lost` (kept apart so older seeds repeat).
    session_rng: SmallRng,
    calls: BTreeMap<String, u64>,
    /// Calls being answered now, per openid (every money and balance path).
    in_flight: HashMap<String, u32>,
    overlapping_calls: u64,
    /// Calls being answered now, over all openids (every money and balance path).
    calls_now: u64,
    /// The most calls ever answered at the same time (`calls_now`'s high-water mark).
    peak_in_flight: u64,
    /// TCP connections accepted (a client that reuses its connections opens few).
    connections: u64,
}

/// The simulator's listener: counts the connections it accepts.
struct Counting {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for Counting {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (tokio::net::TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.shared.lock().connections += 1;
                    return (stream, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Counts a call in flight (in total and for its openid) while alive (a request
/// cancelled by a closed connection still ends it).
struct InFlight<'a> {
    shared: &'a Shared,
    openid: Option<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.calls_now = st.calls_now.saturating_sub(1);
        if let Some(o) = self.openid.take() {
            if let Some(n) = st.in_flight.get_mut(&o) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.in_flight.remove(&o);
                }
            }
        }
    }
}

/// The openid a Midas request is about (both APIs send it in the JSON body).
fn openid_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Who {
        openid: Option<String>,
    }
    serde_json::from_slice::<Who>(body).ok()?.openid
}

struct Shared {
    apps: HashMap<String, SimApp>,
    state: Mutex<Inner>,
    /// WeChat's pushes to the game server ([`push`]), when set up.
    pusher: Mutex<Option<Arc<push::Pusher>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pusher(&self) -> Option<Arc<push::Pusher>> {
        self.pusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, kind: &str) {
        *self.lock().calls.entry(kind.to_string()).or_insert(0) += 1;
    }

    fn dump(&self) -> LedgerDump {
        let st = self.lock();
        let mut d = st.ledger.dump(st.calls.clone());
        d.overlapping_calls = st.overlapping_calls;
        d.peak_in_flight = st.peak_in_flight;
        d.connections = st.connections;
        d
    }
}

/// The simulator, before it is bound to a port.
#[derive(Clone)]
pub struct Simulator {
    listen: SocketAddr,
    shared: Arc<Shared>,
}

/// Token RNG seed derived from the configured seed, so that fetching tokens does not
/// shift the sequence of fault decisions.
const TOKEN_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
/// Seed salt for the session-expiry fault draws.
const SESSION_SEED_SALT: u64 = 0x5e55_1011_e4b1_7e01;

impl Simulator {
    pub fn new(cfg: SimulatorConfig, apps: Vec<SimApp>) -> Simulator {
        let faults = Faults::from(&cfg);
        let state = Inner {
            ledger: Ledger::new(cfg.initial_balance),
            tokens: Tokens::new(
                SmallRng::seed_from_u64(cfg.seed ^ TOKEN_SEED_SALT),
                cfg.token_ttl.0,
            ),
            sessions: Sessions::default(),
            faults,
            fault_rng: SmallRng::seed_from_u64(cfg.seed),
            session_rng: SmallRng::seed_from_u64(cfg.seed ^ SESSION_SEED_SALT),
            calls: BTreeMap::new(),
            in_flight: HashMap::new(),
            overlapping_calls: 0,
            calls_now: 0,
            peak_in_flight: 0,
            connections: 0,
        };
        Simulator {
            listen: cfg.listen,
            shared: Arc::new(Shared {
                apps: apps.into_iter().map(|a| (a.appid.clone(), a)).collect(),
                state: Mutex::new(state),
                pusher: Mutex::new(None),
            }),
        }
    }

    /// Push purchases to a worker's push URL as WeChat does ([`push`]).
    pub fn with_pushes(self, setup: push::PushSetup) -> Simulator {
        *self.shared.pusher.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(push::Pusher::new(setup));
        self
    }

    /// Bind `cfg.listen` (port 0 = any free port) and serve in a spawned task until the
    /// handle is dropped or [`SimHandle::shutdown`] is called.
    pub async fn start(self) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(self.listen).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let router = self.router();
        let listener = Counting {
            inner: listener,
            shared: self.shared.clone(),
        };
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "midas simulator stopped");
            }
        });
        tracing::info!(%addr, "midas simulator listening");
        Ok(SimHandle {
            addr,
            shared: self.shared,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/cgi-bin/stable_token", post(tokens::stable_token))
            .route("/cgi-bin/token", get(tokens::legacy_token))
            .route("/cgi-bin/midas/{op}", post(midas_official))
            .route("/cgi-bin/midas/sandbox/{op}", post(midas_sandbox))
            .route("/wxa/game/queryorderinfo", post(order::query_order_info))
            .route("/wxa/game/{op}", post(midas_v2))
            .route("/sim/ledger", get(sim_ledger))
            .route("/sim/faults", post(sim_faults))
            .route("/sim/revoke", post(sim_revoke))
            .route("/sim/sessions", post(sim_sessions))
            .route("/sim/purchase", post(sim_purchase))
            .route("/sim/pushes", get(sim_pushes))
            .with_state(self.shared.clone())
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimHandle {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://IP:PORT`, with a loopback address when bound to an unspecified one.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Same data as `GET /sim/ledger`.
    pub fn ledger(&self) -> LedgerDump {
        self.shared.dump()
    }

    /// Replace the fault rates.
    pub fn set_faults(&self, f: Faults) {
        self.shared.lock().faults = f;
    }

    /// Every access token issued so far and not yet forgotten (tests check that
    /// none of them leaks into a worker's output).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().tokens.issued()
    }

    /// Revoke every token issued so far.
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens.revoke_all();
    }

    /// The pusher, when set up with [`Simulator::with_pushes`].
    pub fn pusher(&self) -> Option<Arc<push::Pusher>> {
        self.shared.pusher()
    }

    /// Register (or rotate) the session key of an openid.
    pub fn register_session(&self, openid: &str, session_key: &str) {
        self.shared.lock().sessions.register(openid, session_key);
    }

    /// Stop accepting, let in-flight requests finish for up to a second, then abort.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
