//! The dispatcher: the async shell around the [`Engine`].
//!
//! It owns the engine, feeds it events (intake messages, operator re-opens, results
//! of the tasks it started) and performs the actions it returns: pre-call marks and
//! outcomes go to the outbox writer (retried until they land), calls go to Midas,
//! replies to the publisher. It decides nothing about a job itself.
//!
//! Every task reports back exactly once: a call task that ends without an answer
//! (a panic, a cancelled future) still reports a transient answer from its drop
//! guard, so a call slot or a player can never be leaked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::broker::publisher::Publisher;
use crate::command::now_ms;
use crate::config::{Environment, Settings};
use crate::engine::job::Job;
use crate::engine::{Action, BalanceCmd, Engine, EngineConfig, Event, HeldPlayer};
use crate::engine::{PreCallMark, Record};
use crate::metrics::METRICS;
use crate::midas::{Answer, Api, Body, MidasClient, OutcomeClass};
use crate::outbox::{query, GiveBack, Outbox, OutboxError, OutgoingReply};

/// Messages to the dispatcher.
#[derive(Debug)]
pub enum DispatchMsg {
    /// A new job, in arrival order.
    Job(Job),
    /// A final job re-opened (a re-send with a new session_key).
    Reopened(Job),
    /// A pending job a re-sent or redelivered command joined.
    Rejoin(Job),
    /// A command without an outbox row (`balance` on a SQLite outbox; a shared
    /// outbox records it as a job): answered from memory; the one-shot learns
    /// whether its reply was confirmed (its delivery is acked then).
    Direct(Box<BalanceCmd>, oneshot::Sender<bool>),
    /// An operator re-opened jobs: load pending jobs re-opened by actions after this id.
    Reload { after_action: i64 },
    /// Shared outbox: pending jobs of players this worker now holds.
    Claimed(Vec<Job>),
    /// Shared outbox: players whose lease this worker lost, at the generations lost.
    PlayersLost(Vec<HeldPlayer>),
    /// Shared outbox: the players the engine holds and how many more jobs it may take.
    Snapshot(oneshot::Sender<(Vec<HeldPlayer>, usize)>),
}

pub struct Dispatcher {
    settings: Arc<Settings>,
    writer: Outbox,
    /// Shared outbox: players to give back after a fenced write, with the lease
    /// generation the write was made under.
    release: Option<mpsc::UnboundedSender<GiveBack>>,
    /// Shared outbox: the longest a call (token fetch included) may take.
    call_budget: Option<Duration>,
    publisher: Publisher,
    midas: Arc<MidasClient>,
    db_path: std::path::PathBuf,
    held: Arc<AtomicUsize>,
    /// Turns true at shutdown: failing writes are then given up (the job resumes
    /// from the outbox at the next start) so the writer can stop.
    stop: watch::Receiver<bool>,
}

/// The engine's settings from the config.
pub fn engine_config(settings: &Settings) -> EngineConfig {
    let c = &settings.config;
    EngineConfig {
        retry: c.retry.clone(),
        max_in_flight: c.midas.max_in_flight.max(1),
        max_rps: c.midas.max_rps,
        apps: settings
            .apps
            .iter()
            .map(|a| {
                let api = match a.api {
                    crate::config::ApiVersion::V1 => crate::midas::errcode::MidasApi::V1,
                    crate::config::ApiVersion::V2 => crate::midas::errcode::MidasApi::V2,
                };
                (a.appid.clone(), api)
            })
            .collect(),
        simulated: c.midas.environment == Environment::Simulator,
        mark_ahead: mark_ahead(c.midas.max_in_flight.max(1), c.outbox.url.is_some()),
        fence_margin_ms: c
            .outbox
            .url
            .is_some()
            .then(|| crate::config::LEASE_CALL_MARGIN.as_millis() as i64),
    }
}

/// How many jobs the engine marks beyond the free call slots: a quarter of
/// `max_in_flight` on a SQLite outbox (enough to cover a group commit at the rates
/// those slots allow); as many as the slots on a shared outbox, whose writer
/// batches take tens of milliseconds to commit (a mark that waited past the
/// fence's margin is refreshed, see [`EngineConfig::mark_ahead`]).
fn mark_ahead(max_in_flight: usize, shared: bool) -> usize {
    if shared {
        max_in_flight
    } else {
        max_in_flight / 4
    }
}

/// Commands without an outbox row waiting for their reply, by (reply_to,
/// correlation_id).
type Waiting = HashMap<(String, String), VecDeque<oneshot::Sender<bool>>>;

/// How soon a failed load of operator re-opens is tried again.
const RELOAD_RETRY: Duration = Duration::from_secs(1);

/// Sends a transient answer if a call task ends without reporting.
struct CallGuard {
    tx: Option<mpsc::UnboundedSender<Event>>,
    id: i64,
    api: Api,
    balance: bool,
}

impl CallGuard {
    fn report(mut self, answer: Answer) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(event(self.id, self.balance, answer));
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let answer = unanswered(self.api, "the call ended without an answer");
            let _ = tx.send(event(self.id, self.balance, answer));
        }
    }
}

/// A call that got no answer: transient (it may have reached Midas).
fn unanswered(api: Api, why: &str) -> Answer {
    Answer {
        api,
        class: OutcomeClass::Transient,
        http_status: None,
        errcode: None,
        errmsg: Some(why.into()),
        body: Body::default(),
        latency: Duration::ZERO,
    }
}

fn event(id: i64, balance: bool, answer: Answer) -> Event {
    if balance {
        Event::BalanceFetched(id, Box::new(answer))
    } else {
        Event::Answered(id, Box::new(answer))
    }
}

impl Dispatcher {
    pub fn new(
        settings: Arc<Settings>,
        writer: Outbox,
        publisher: Publisher,
        midas: Arc<MidasClient>,
        stop: watch::Receiver<bool>,
        release: Option<mpsc::UnboundedSender<GiveBack>>,
    ) -> Dispatcher {
        let db_path = settings.config.outbox.path.clone();
        let call_budget = writer
            .is_shared()
            .then_some(settings.config.midas.request_timeout.0);
        Dispatcher {
            settings,
            writer,
            release,
            call_budget,
            publisher,
            midas,
            db_path,
            held: Arc::new(AtomicUsize::new(0)),
            stop,
        }
    }

    /// How many jobs the dispatcher holds (intake pauses above a bound, so a
    /// backlog waits in the broker rather than in memory).
    pub fn held(&self) -> Arc<AtomicUsize> {
        self.held.clone()
    }

    /// Run until `shutdown`; then let steps under way finish (bounded) and return.
    pub async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<DispatchMsg>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut engine = Engine::new(engine_config(&self.settings), rand::random());
        let (tx, mut events) = mpsc::unbounded_channel::<Event>();
        let mut actions = Vec::new();
        // a shared outbox: jobs come from the lease coordinator, player by player
        let startup = if self.writer.is_shared() {
            Ok(Vec::new())
        } else {
            self.load(None).await
        };
        match startup {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    tracing::info!(jobs = jobs.len(), "resuming non-final jobs from the outbox");
                }
                engine.handle(Event::Loaded(jobs), now_ms(), &mut actions);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load pending jobs; they resume at the next start")
            }
        }
        // An operator re-open whose reload failed: kept (the earliest action) and
        // tried again until it loads — the relay has already moved past it.
        let mut reload: Option<i64> = None;
        // commands without an outbox row, by reply target: told when their reply
        // is confirmed
        let mut waiting: Waiting = HashMap::new();
        let mut reload_next = tokio::time::Instant::now();
        loop {
            if reload.is_some() && tokio::time::Instant::now() >= reload_next {
                reload_next = tokio::time::Instant::now() + RELOAD_RETRY;
                self.reload(&mut reload, &mut engine, &mut actions).await;
            }
            self.perform(&mut actions, &tx, &mut waiting);
            self.held.store(engine.held(), Ordering::Relaxed);
            if *shutdown.borrow() {
                break;
            }
            let now = now_ms();
            let mut sleep_for = engine.next_wake().map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis((at - now).clamp(0, 3_600_000) as u64)
            });
            if reload.is_some() {
                sleep_for = sleep_for.min(RELOAD_RETRY);
            }
            tokio::select! {
                _ = shutdown.changed() => {}
                msg = rx.recv() => match msg {
                    Some(DispatchMsg::Reload { after_action }) => {
                        reload = Some(reload.map_or(after_action, |r| r.min(after_action)));
                        reload_next = tokio::time::Instant::now();
                    }
                    Some(DispatchMsg::Job(j)) => engine.handle(Event::Accepted(j), now_ms(), &mut actions),
                    Some(DispatchMsg::Reopened(j)) => engine.handle(Event::Reopened(j), now_ms(), &mut actions),
                    Some(DispatchMsg::Rejoin(j)) => engine.handle(Event::Joined(j), now_ms(), &mut actions),
                    Some(DispatchMsg::Direct(b, done)) => {
                        waiting
                            .entry((b.reply_to.clone(), b.correlation_id.clone()))
                            .or_default()
                            .push_back(done);
                        engine.handle(Event::Balance(b), now_ms(), &mut actions)
                    }
                    Some(DispatchMsg::Claimed(jobs)) => engine.handle(Event::Claimed(jobs), now_ms(), &mut actions),
                    Some(DispatchMsg::PlayersLost(p)) => engine.handle(Event::PlayersLost(p), now_ms(), &mut actions),
                    Some(DispatchMsg::Snapshot(tx)) => {
                        let room = max_held(&self.settings).saturating_sub(engine.held());
                        let _ = tx.send((engine.players(), room));
                    }
                    None => break,
                },
                Some(ev) = events.recv() => engine.handle(ev, now_ms(), &mut actions),
                _ = tokio::time::sleep(sleep_for) => engine.poll(now_ms(), &mut actions),
            }
        }
        // Shutdown: no new steps; let those under way finish and be recorded.
        let grace = self.settings.config.midas.request_timeout.0 + Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + grace;
        if engine.busy() > 0 {
            tracing::info!(under_way = engine.busy(), "waiting for steps under way");
        }
        engine.drain();
        while engine.busy() > 0 {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => {
                    engine.handle(ev, now_ms(), &mut actions);
                    self.perform(&mut actions, &tx, &mut waiting);
                }
                _ => {
                    tracing::warn!(under_way = engine.busy(), "steps did not finish in time; they resume at the next start with the same bill_no");
                    break;
                }
            }
        }
    }

    /// Load the jobs re-opened by operator actions after `pending` (cleared once
    /// they are loaded; kept for the next try when the outbox cannot be read).
    async fn reload(
        &self,
        pending: &mut Option<i64>,
        engine: &mut Engine,
        actions: &mut Vec<Action>,
    ) {
        let Some(after) = *pending else { return };
        match self.load(Some(after)).await {
            Ok(jobs) => {
                *pending = None;
                for j in jobs {
                    engine.handle(Event::Reopened(j), now_ms(), actions);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load re-opened jobs yet; trying again")
            }
        }
    }

    async fn load(&self, reopened_after: Option<i64>) -> Result<Vec<Job>, OutboxError> {
        let path = self.db_path.clone();
        tokio::task::spawn_blocking(move || {
            let c = crate::outbox::open_ro(&path)?;
            match reopened_after {
                None => query::pending_jobs(&c, 0),
                Some(after) => query::reopened_jobs(&c, after),
            }
        })
        .await
        .map_err(|e| OutboxError::Corrupt(e.to_string()))?
    }

    /// Perform the engine's actions; their results come back on `tx`.
    fn perform(
        &self,
        actions: &mut Vec<Action>,
        tx: &mpsc::UnboundedSender<Event>,
        waiting: &mut Waiting,
    ) {
        let mut marks = Vec::new();
        for a in actions.drain(..) {
            match a {
                Action::Mark(m) => marks.push(m),
                Action::GiveBack { appid, openid, gen } => {
                    if let Some(release) = &self.release {
                        tracing::warn!(%appid, %openid, "lease on the player lost; its jobs go to the worker holding it");
                        let _ = release.send(GiveBack { appid, openid, gen });
                    }
                }
                Action::Call {
                    id,
                    api,
                    params,
                    session_key,
                    balance_after_duplicate,
                } => {
                    let guard = CallGuard {
                        tx: Some(tx.clone()),
                        id,
                        api,
                        balance: balance_after_duplicate,
                    };
                    let midas = self.midas.clone();
                    let span = tracing::info_span!(
                        "call",
                        bill_no = params.bill_no.as_deref().unwrap_or(""),
                        op = params.op.as_str(),
                        openid = %params.openid,
                        api = api.name(),
                    );
                    let budget = self.call_budget;
                    tokio::spawn(
                        async move {
                            let call = midas.call(api, &params, session_key.as_ref());
                            let answer = match budget {
                                None => call.await,
                                // A shared outbox's lease covers request_timeout (+ a
                                // margin) from the pre-call mark: the whole call, token
                                // fetch included, must end within it. A call cut off
                                // here is an unanswered call, like a timeout.
                                Some(b) => match tokio::time::timeout(b, call).await {
                                    Ok(a) => a,
                                    Err(_) => {
                                        unanswered(api, "no answer within the lease's call budget")
                                    }
                                },
                            };
                            METRICS.observe(&answer);
                            log_answer(&answer);
                            guard.report(answer);
                        }
                        .instrument(span),
                    );
                }
                Action::Record(r) => self.spawn_record(r, tx.clone()),
                Action::Reply {
                    reply_to,
                    correlation_id,
                    payload,
                } => {
                    METRICS.command("balance", "answered");
                    let key = (reply_to, correlation_id);
                    let done = waiting.get_mut(&key).and_then(VecDeque::pop_front);
                    if waiting.get(&key).is_some_and(VecDeque::is_empty) {
                        waiting.remove(&key);
                    }
                    let reply = OutgoingReply {
                        target_id: None,
                        reply_to: key.0,
                        correlation_id: key.1,
                        payload: Arc::from(payload),
                    };
                    match done {
                        // acked once the broker confirms the reply; requeued if not
                        Some(done) => {
                            let publisher = self.publisher.clone();
                            tokio::spawn(async move {
                                let _ = done.send(publisher.send_confirmed(reply).await);
                            });
                        }
                        None => self.publisher.send(reply),
                    }
                }
            }
        }
        if !marks.is_empty() {
            self.spawn_marks(marks, tx.clone());
        }
    }

    fn spawn_marks(&self, marks: Vec<PreCallMark>, tx: mpsc::UnboundedSender<Event>) {
        let writer = self.writer.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let ids: Vec<i64> = marks.iter().map(|m| m.id).collect();
            if let WriteEnd::Done(marked) =
                write_until_done(|| writer.mark_calls(marks.clone()), stop).await
            {
                // A shared outbox checked, on its clock, that each lease outlives a
                // call started within LEASE_CALL_MARGIN of the check; the engine
                // judges whether the call still starts in time (on this worker's
                // clock: the instant of the check, in unix ms).
                let checked_at = marked.checked_at.map(|t| {
                    now_ms() - i64::try_from(t.elapsed().as_millis()).unwrap_or(i64::MAX / 2)
                });
                for id in ids {
                    let _ = tx.send(if marked.lost.contains(&id) {
                        Event::LeaseLost(id)
                    } else {
                        Event::Marked(id, checked_at)
                    });
                }
            }
        });
    }

    fn spawn_record(&self, record: Record, tx: mpsc::UnboundedSender<Event>) {
        let writer = self.writer.clone();
        let publisher = self.publisher.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let id = record.job_id;
            match write_until_done(|| writer.record(record.clone()), stop).await {
                WriteEnd::Done(landed) => {
                    for r in landed.replies {
                        publisher.send(r);
                    }
                    let _ = tx.send(match landed.reopened_with {
                        Some(key) => {
                            tracing::info!(job_id = id, "a re-sent command brought a new session_key while the outcome was decided: the job runs again with it");
                            Event::ReopenedWithKey(id, key)
                        }
                        None => Event::Recorded(id),
                    });
                }
                WriteEnd::Fenced => {
                    let _ = tx.send(Event::LeaseLost(id));
                }
                WriteEnd::Abandoned => {}
            }
        });
    }
}

fn log_answer(a: &Answer) {
    match a.class {
        OutcomeClass::Success => tracing::debug!(errcode = a.errcode, "Midas answered"),
        OutcomeClass::Duplicate => {
            tracing::info!("90012: the platform already processed this bill_no")
        }
        _ => tracing::info!(
            errcode = a.errcode,
            class = a.class.as_str(),
            "Midas answered without success"
        ),
    }
}

/// How a retried write ended.
enum WriteEnd<T> {
    Done(T),
    /// A shared outbox refused it: another worker holds the job's player now.
    Fenced,
    /// The writer is gone, or the write failed while stopping: the job resumes
    /// from the outbox (at the next start, or on whichever worker holds it).
    Abandoned,
}

/// Retry an outbox write until it lands. Given up when the writer is gone, or when
/// a write fails while the process is stopping: the job resumes from the outbox at
/// the next start (with the same bill_no), and the writer is free to stop.
async fn write_until_done<T, F, Fut>(mut f: F, mut stop: watch::Receiver<bool>) -> WriteEnd<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OutboxError>>,
{
    let mut pause = Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        match f().await {
            Ok(v) => return WriteEnd::Done(v),
            Err(OutboxError::LeaseLost) => return WriteEnd::Fenced,
            Err(OutboxError::WriterGone) => {
                tracing::error!("outbox writer gone; the job resumes at the next start");
                return WriteEnd::Abandoned;
            }
            Err(e) if *stop.borrow() => {
                tracing::error!(error = %e, "cannot write to the outbox while shutting down; the job resumes at the next start with the same bill_no");
                return WriteEnd::Abandoned;
            }
            Err(e) => {
                tries += 1;
                if e.trouble().is_some() {
                    // the writer logs the episode once (outbox::health)
                    tracing::debug!(error = %e, "the outbox cannot write; retrying the write");
                } else if tries == 1 || tries % 10 == 0 {
                    tracing::error!(error = %e, "cannot write to the outbox; retrying the write");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Intake pauses while the dispatcher holds this many non-final jobs: a backlog
/// waits in the broker (replicated, durable) instead of in the worker's memory.
pub fn max_held(settings: &Settings) -> usize {
    let c = &settings.config;
    (4 * c.midas.max_in_flight)
        .max(2 * c.broker.prefetch as usize)
        .max(1024)
}
