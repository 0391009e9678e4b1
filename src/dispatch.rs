//! The dispatcher: due jobs → Midas → outcome → outbox → reply.
//!
//! It holds every non-final job in memory (loaded from the outbox at start, then fed
//! by intake in arrival order) and enforces, in one loop:
//! - one call in flight per openid, in arrival order: a player's later jobs wait
//!   until the head job is final (a cancel_pay never overtakes its pay);
//! - at most `midas.max_in_flight` calls at once;
//! - at most `midas.max_rps` calls per second per appid (token bucket);
//! - retry times from [`job::decide`] (same bill_no, capped backoff with jitter).
//!
//! Each call runs in its own task that also records the outcome durably (retrying
//! the write until it lands) and hands final replies to the publisher before it
//! tells the loop the openid is free.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::broker::publisher::Publisher;
use crate::command::now_ms;
use crate::config::Settings;
use crate::job::{self, Decision, Job, JobState};
use crate::metrics::METRICS;
use crate::midas::{Api, MidasClient, OutcomeClass};
use crate::outbox::writer::{AttemptRow, Record, Update};
use crate::outbox::{query, Writer};

/// Messages to the dispatcher.
#[derive(Debug)]
pub enum DispatchMsg {
    /// A new (or re-opened) job, in arrival order.
    Job(Job),
    /// A pending job a re-sent or redelivered command joined: scheduled unless this
    /// dispatcher already holds it or has just finished it.
    Rejoin(Job),
    /// An operator re-opened jobs: load pending jobs re-opened by actions after this id.
    Reload { after_action: i64 },
}

struct Done {
    job: Job,
    next: Option<i64>,
}

/// What a call task tells the loop.
// One `Done` per attempt; boxing it would add an allocation per call.
#[allow(clippy::large_enum_variant)]
enum TaskMsg {
    /// Midas answered (or the call was skipped): the `max_in_flight` slot is free.
    /// The player stays busy until `Done`, so ordering is unchanged.
    Returned,
    /// The outcome is recorded durably.
    Done(Done),
}

/// Frees a call's `max_in_flight` slot exactly once.
struct Slot(Option<mpsc::UnboundedSender<TaskMsg>>);

impl Slot {
    fn release(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(TaskMsg::Returned);
        }
    }
}

/// A per-appid token bucket.
struct Bucket {
    tokens: f64,
    rate: f64,
    last: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            tokens: rate as f64,
            rate: rate as f64,
            last: tokio::time::Instant::now(),
        }
    }

    /// Take a token, or say how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

pub struct Dispatcher {
    settings: Arc<Settings>,
    writer: Writer,
    publisher: Publisher,
    midas: Arc<MidasClient>,
    db_path: std::path::PathBuf,
    held: Arc<AtomicUsize>,
}

/// How many recently finished job ids are remembered (to ignore stale rejoins).
const FINISHED_MEMORY: usize = 65_536;

#[derive(Default)]
struct State {
    jobs: HashMap<i64, Job>,
    finished: std::collections::HashSet<i64>,
    finished_order: VecDeque<i64>,
    queues: HashMap<String, VecDeque<i64>>,
    busy: std::collections::HashSet<String>,
    timers: BinaryHeap<Reverse<(i64, i64)>>,
    ready: VecDeque<i64>,
    /// Call tasks not yet `Done` (shutdown waits for them).
    inflight: usize,
    /// Calls to Midas in progress (bounded by `midas.max_in_flight`).
    calls: usize,
}

impl State {
    fn add(&mut self, job: Job) {
        if self.jobs.contains_key(&job.id) {
            return;
        }
        let q = self.queues.entry(job.params.openid.clone()).or_default();
        // ids are arrival order; keep each player's queue sorted by them
        let pos = q.iter().rposition(|&i| i < job.id).map_or(0, |p| p + 1);
        q.insert(pos, job.id);
        let head = pos == 0 && !self.busy.contains(&job.params.openid);
        let (id, at) = (job.id, job.next_attempt_at);
        self.jobs.insert(id, job);
        if head {
            self.timers.push(Reverse((at, id)));
        }
    }

    fn rejoin(&mut self, job: Job) {
        if !self.finished.contains(&job.id) {
            self.add(job);
        }
    }

    fn reopen(&mut self, job: Job) {
        self.finished.remove(&job.id);
        self.add(job);
    }

    fn mark_finished(&mut self, id: i64) {
        if self.finished.insert(id) {
            self.finished_order.push_back(id);
            if self.finished_order.len() > FINISHED_MEMORY {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    fn is_head(&self, id: i64) -> bool {
        self.jobs
            .get(&id)
            .and_then(|j| self.queues.get(&j.params.openid))
            .and_then(|q| q.front())
            == Some(&id)
    }
}

impl Dispatcher {
    pub fn new(
        settings: Arc<Settings>,
        writer: Writer,
        publisher: Publisher,
        midas: Arc<MidasClient>,
    ) -> Dispatcher {
        let db_path = settings.config.outbox.path.clone();
        Dispatcher {
            settings,
            writer,
            publisher,
            midas,
            db_path,
            held: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many non-final jobs the dispatcher holds (intake pauses above a bound,
    /// so a backlog waits in the broker rather than in memory).
    pub fn held(&self) -> Arc<AtomicUsize> {
        self.held.clone()
    }

    /// Run until `shutdown`; then let in-flight calls finish (bounded) and return.
    pub async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<DispatchMsg>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut st = State::default();
        match self.load(None).await {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    tracing::info!(jobs = jobs.len(), "resuming non-final jobs from the outbox");
                }
                for j in jobs {
                    st.add(j);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load pending jobs; they resume at the next start")
            }
        }
        let max_in_flight = self.settings.config.midas.max_in_flight;
        let max_rps = self.settings.config.midas.max_rps;
        let mut buckets: HashMap<String, Bucket> = HashMap::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<TaskMsg>();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = now_ms();
            while let Some(Reverse((at, id))) = st.timers.peek().copied() {
                if at > now {
                    break;
                }
                st.timers.pop();
                if st.is_head(id) {
                    st.ready.push_back(id);
                }
            }
            let mut wake: Option<Duration> = None;
            while st.calls < max_in_flight {
                let Some(&id) = st.ready.front() else { break };
                let Some(job) = st.jobs.get(&id) else {
                    st.ready.pop_front();
                    continue;
                };
                if st.busy.contains(&job.params.openid) {
                    st.ready.pop_front();
                    continue;
                }
                let bucket = buckets
                    .entry(job.params.appid.clone())
                    .or_insert_with(|| Bucket::new(max_rps));
                if let Err(wait) = bucket.take() {
                    wake = Some(wait);
                    break;
                }
                st.ready.pop_front();
                st.busy.insert(job.params.openid.clone());
                st.inflight += 1;
                st.calls += 1;
                self.spawn_call(job.clone(), done_tx.clone(), shutdown.clone());
            }
            let timer_wait = st
                .timers
                .peek()
                .map(|Reverse((at, _))| Duration::from_millis((at - now).max(0) as u64));
            let sleep_for = match (wake, timer_wait) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = shutdown.changed() => {}
                msg = rx.recv() => match msg {
                    Some(DispatchMsg::Job(j)) => st.reopen(j),
                    Some(DispatchMsg::Rejoin(j)) => st.rejoin(j),
                    Some(DispatchMsg::Reload { after_action }) => match self.load(Some(after_action)).await {
                        Ok(jobs) => for j in jobs { st.reopen(j) },
                        Err(e) => tracing::error!(error = %e, "cannot load re-opened jobs"),
                    },
                    None => break,
                },
                Some(msg) = done_rx.recv() => self.task_msg(&mut st, msg),
                _ = tokio::time::sleep(sleep_for) => {}
            }
            self.held.store(st.jobs.len(), Ordering::Relaxed);
        }
        // Shutdown: no new calls; let in-flight ones finish and be recorded.
        let grace = self.settings.config.midas.request_timeout.0 + Duration::from_secs(5);
        if st.inflight > 0 {
            tracing::info!(in_flight = st.inflight, "waiting for in-flight Midas calls");
        }
        let deadline = tokio::time::Instant::now() + grace;
        while st.inflight > 0 {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(msg)) => self.task_msg(&mut st, msg),
                _ => {
                    tracing::warn!(in_flight = st.inflight, "in-flight calls did not finish in time; they resume at the next start with the same bill_no");
                    break;
                }
            }
        }
    }

    async fn load(
        &self,
        reopened_after: Option<i64>,
    ) -> Result<Vec<Job>, crate::outbox::OutboxError> {
        let path = self.db_path.clone();
        tokio::task::spawn_blocking(move || {
            let c = crate::outbox::open_ro(&path)?;
            match reopened_after {
                None => query::pending_jobs(&c, 0),
                Some(after) => query::reopened_jobs(&c, after),
            }
        })
        .await
        .map_err(|e| crate::outbox::OutboxError::Corrupt(e.to_string()))?
    }

    fn task_msg(&self, st: &mut State, msg: TaskMsg) {
        match msg {
            TaskMsg::Returned => st.calls -= 1,
            TaskMsg::Done(done) => self.complete(st, done),
        }
    }

    fn complete(&self, st: &mut State, done: Done) {
        st.inflight -= 1;
        let openid = done.job.params.openid.clone();
        st.busy.remove(&openid);
        let id = done.job.id;
        match done.next {
            Some(at) => {
                st.jobs.insert(id, done.job);
                st.timers.push(Reverse((at, id)));
            }
            None => {
                st.jobs.remove(&id);
                st.mark_finished(id);
                if let Some(q) = st.queues.get_mut(&openid) {
                    q.retain(|&i| i != id);
                    match q.front().copied() {
                        Some(next) => {
                            let at = st.jobs.get(&next).map_or(0, |j| j.next_attempt_at);
                            st.timers.push(Reverse((at, next)));
                        }
                        None => {
                            st.queues.remove(&openid);
                        }
                    }
                }
            }
        }
    }

    fn spawn_call(
        &self,
        job: Job,
        done: mpsc::UnboundedSender<TaskMsg>,
        shutdown: watch::Receiver<bool>,
    ) {
        let midas = self.midas.clone();
        let writer = self.writer.clone();
        let publisher = self.publisher.clone();
        let settings = self.settings.clone();
        let span = tracing::info_span!(
            "job",
            bill_no = job.params.bill_no.as_deref().unwrap_or(""),
            op = job.params.op.as_str(),
            openid = %job.params.openid,
            attempt = job.attempts + 1,
        );
        tokio::spawn(
            async move {
                let mut slot = Slot(Some(done.clone()));
                let (job, next) = attempt(
                    job, &midas, &writer, &publisher, &settings, &mut slot, shutdown,
                )
                .await;
                slot.release();
                let _ = done.send(TaskMsg::Done(Done { job, next }));
            }
            .instrument(span),
        );
    }
}

/// One attempt: call (unless past the window), decide, record durably, publish.
/// Returns the updated job and its next attempt time (`None` when final).
async fn attempt(
    mut job: Job,
    midas: &MidasClient,
    writer: &Writer,
    publisher: &Publisher,
    settings: &Settings,
    slot: &mut Slot,
    shutdown: watch::Receiver<bool>,
) -> (Job, Option<i64>) {
    let retry = &settings.config.retry;
    let started = now_ms();
    let mut rows = Vec::new();
    let decision = if job::deadline(&job, retry).is_some_and(|d| started >= d) {
        // The bill_no window is closing: never send it again.
        tracing::warn!("retry deadline passed before this attempt; ending unknown without a call");
        Decision::Final {
            state: JobState::Unknown,
            reply: job::exhausted(&job, None, started),
        }
    } else {
        let answer = midas
            .call(
                Api::for_op(job.params.op),
                &job.params,
                job.session_key.as_ref(),
            )
            .await;
        METRICS.observe(&answer);
        job.attempts += 1;
        job.first_attempt_at.get_or_insert(started);
        if answer.class == OutcomeClass::TokenInvalid {
            job.token_retries += 1;
        } else {
            job.token_retries = 0;
        }
        job.last_errcode = answer.errcode;
        job.last_error = answer.errmsg.clone();
        let now = now_ms();
        rows.push(AttemptRow {
            n: job.attempts,
            started_at: started,
            answer: answer.clone(),
        });
        match job::decide(&job, &answer, now, retry) {
            Decision::Duplicate => {
                if job.attempts == 1 {
                    tracing::warn!("90012 on the first send of this bill_no: the platform already processed it; reporting succeeded/duplicate");
                } else {
                    tracing::info!(
                        "90012 after an earlier unanswered send: the earlier call succeeded"
                    );
                }
                let b_started = now_ms();
                let bal = midas
                    .call(Api::GetBalance, &job.params, job.session_key.as_ref())
                    .await;
                METRICS.observe(&bal);
                rows.push(AttemptRow {
                    n: job.attempts,
                    started_at: b_started,
                    answer: bal.clone(),
                });
                Decision::Final {
                    state: JobState::Succeeded,
                    reply: job::finish_duplicate(&job, &answer, Some(&bal), now_ms()),
                }
            }
            d => d,
        }
    };
    // Midas is done with this job: free the call slot before the outbox write, so
    // `max_in_flight` bounds calls, not calls plus commits.
    slot.release();
    let now = now_ms();
    let (update, next) = match &decision {
        Decision::Retry { at } => {
            METRICS.retry(job.params.op.as_str());
            tracing::info!(
                errcode = rows.first().and_then(|r| r.answer.errcode),
                retry_in_ms = at - now,
                "no definitive answer; retrying with the same bill_no"
            );
            (
                Update::Retry {
                    next_attempt_at: *at,
                },
                Some(*at),
            )
        }
        Decision::Final { state, reply } => {
            tracing::info!(state = state.as_str(), attempts = job.attempts, "job final");
            (
                Update::Final {
                    state: *state,
                    reply: reply.to_bytes(),
                },
                None,
            )
        }
        Decision::Duplicate => (
            Update::Retry {
                next_attempt_at: now,
            },
            Some(now),
        ),
    };
    if next.is_some() {
        job.next_attempt_at = next.unwrap_or(now);
    }
    let record = Record {
        job_id: job.id,
        attempts_total: job.attempts,
        first_attempt_at: job.first_attempt_at,
        rows,
        update,
        now,
    };
    let mut pause = Duration::from_millis(200);
    loop {
        match writer.record(clone_record(&record)).await {
            Ok(replies) => {
                for r in replies {
                    publisher.send(r);
                }
                break;
            }
            Err(crate::outbox::OutboxError::WriterGone) => {
                tracing::error!("outbox writer gone; the job resumes at the next start");
                break;
            }
            Err(e) if *shutdown.borrow() => {
                tracing::error!(error = %e, "cannot record the outcome and shutting down; the job resumes at the next start with the same bill_no");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the outcome; retrying the write");
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
    (job, next)
}

fn clone_record(r: &Record) -> Record {
    Record {
        job_id: r.job_id,
        attempts_total: r.attempts_total,
        first_attempt_at: r.first_attempt_at,
        rows: r.rows.clone(),
        update: r.update.clone(),
        now: r.now,
    }
}
