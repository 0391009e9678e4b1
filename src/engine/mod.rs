//! The engine: every decision about what happens next to a job, with no I/O.
//!
//! The async shell ([`crate::dispatch`]) feeds it [`Event`]s (a job accepted,
//! joined or re-opened, jobs loaded after a restart, a pre-call mark made durable,
//! an answer from Midas, an outcome recorded) and performs the [`Action`]s it
//! returns (make a pre-call mark durable, call Midas, record an outcome, publish a
//! balance reply). Time is passed in. Nothing here knows tokio, SQLite or HTTP, so
//! `tests/simulation.rs` drives it through thousands of seeded interleavings, crash
//! points and Midas behaviours per second and checks the money-path invariants
//! after every step.
//!
//! One job's life: wait until due and head of its player's queue → `Mark` (the
//! call count and the bill_no window start are durable before anything can reach
//! Midas) → a free call slot (at once, or after waiting for one when marks run
//! ahead of the slots, [`EngineConfig::mark_ahead`]) → `Call` → decide
//! ([`job::decide`]) → `Record` (retry time or final reply, durable) → the player
//! is free for its next job.

mod balance;
mod call_start;
mod event;
pub mod job;
mod lease;
mod outcome;
pub mod record;
pub mod scheduler;

pub use event::{Action, BalanceCmd, Event};
pub use lease::HeldPlayer;
pub use record::{AttemptRow, PreCallMark, Record, SessionGuard, Update};

use std::collections::{HashMap, HashSet, VecDeque};

use crate::command::Op;
use crate::config::RetryConfig;
use crate::midas::errcode::MidasApi;
use crate::midas::{Answer, Api, OutcomeClass};
use crate::secret::Secret;
use job::{Context, Job, JobState};
use scheduler::{Limits, Order, Scheduler, View};

/// The settings the engine decides with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub retry: RetryConfig,
    pub max_in_flight: usize,
    pub max_rps: u32,
    /// Apps configured now and the API each speaks (a job of an app removed from
    /// the config is not called).
    pub apps: Vec<(String, MidasApi)>,
    pub simulated: bool,
    /// How many jobs may be marked beyond the free call slots. A slot that frees
    /// then goes to a job already marked instead of idling through a mark's
    /// commit. On a shared outbox the lease fence covers a call that starts
    /// within `fence_margin_ms` of the mark's check: a marked job that waited
    /// longer for its slot is marked again (a refresh, no new call count) before
    /// it calls.
    pub mark_ahead: usize,
    /// Shared outbox: `LEASE_CALL_MARGIN` in ms. A pre-call mark's fence promised
    /// the lease outlives a call whose timeout starts within this much of the
    /// check; a call (or the getbalance after a duplicate) that would start later
    /// is not made. `None`: a SQLite outbox (no lease).
    pub fence_margin_ms: Option<i64>,
}

/// A call is judged to start this long after the engine decides it (the shell
/// spawns it at once; this covers a busy runtime), so a fence is never used up to
/// its last millisecond.
pub const FENCE_SLACK_MS: i64 = 250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `job.next_attempt_at`.
    Waiting,
    /// The pre-call mark is being written.
    Marking,
    /// Marked; waiting for a free call slot.
    AwaitSlot,
    /// A call is out.
    Calling,
    /// Fetching the balance after a duplicate answer.
    Fetching,
    /// The outcome is being written; `Some(at)`: retry then; `None`: final.
    Recording(Option<i64>),
}

struct Entry {
    job: Job,
    order: Order,
    phase: Phase,
    /// Bumped when a re-sent command brings a newer session_key.
    key_gen: u32,
    /// `key_gen` when the call in flight went out.
    call_gen: u32,
    /// A re-open that arrived while a step was under way: applied when it ends.
    reopen: Option<Job>,
    /// The answer that led to a balance fetch.
    duplicate_of: Option<Answer>,
    /// Balance commands answered from memory (SQLite): where the reply goes. A
    /// balance recorded as a row (shared outbox) has none: its outcome is
    /// recorded and replied through its reply target like any job's.
    target: Option<(String, String)>,
    /// The player's lease is gone: dropped when the step under way ends.
    lost: bool,
    /// Shared outbox: the copy of this job loaded under a newer lease generation
    /// while a step of an older one was under way; it takes this entry's place
    /// when that step ends (its writes are fenced out).
    successor: Option<Job>,
    /// Shared outbox: when the fence of the current pre-call mark was checked.
    fence_at: Option<i64>,
}

impl Entry {
    /// The pre-call mark of this entry's job `id` (a refresh counts no call); its
    /// fence is unchecked until the mark lands.
    fn mark(&mut self, id: i64, now: i64, refresh: bool) -> Action {
        self.fence_at = None;
        Action::Mark(PreCallMark {
            id,
            at: now,
            gen: self.job.lease_gen,
            refresh,
        })
    }

    fn waiting(job: Job, order: Order, target: Option<(String, String)>) -> Entry {
        Entry {
            job,
            order,
            phase: Phase::Waiting,
            key_gen: 0,
            call_gen: 0,
            reopen: None,
            duplicate_of: None,
            target,
            lost: false,
            successor: None,
            fence_at: None,
        }
    }
}

/// The engine. See the module doc.
pub struct Engine {
    cfg: EngineConfig,
    entries: HashMap<i64, Entry>,
    sched: Scheduler,
    /// Marked jobs waiting for a call slot, first come first served.
    awaiting: VecDeque<i64>,
    /// Highest outbox id seen (orders balance commands among rows).
    last_row: i64,
    seq: u32,
    next_balance_id: i64,
    rng: u64,
    /// Shutting down: steps under way finish, no new one starts.
    draining: bool,
    /// Recently finished job ids: a stale `Accepted`/`Joined` for one is ignored.
    finished: HashSet<i64>,
    finished_order: VecDeque<i64>,
    /// Per app: transient answers in a row (an outage when it reaches
    /// [`OUTAGE_STREAK`]).
    transient_streak: HashMap<String, u32>,
    /// Shared outbox: the newest lease generation seen per player (appid, openid).
    gens: HashMap<(String, String), i64>,
    /// Shared outbox: players dropped here (lease lost or given back) and the
    /// generation they were dropped at: a job of that generation or an older
    /// one that arrives later (intake racing the give-back) is not run here.
    released: HashMap<(String, String), i64>,
}

/// This many transient answers in a row from one app's Midas calls is an outage:
/// the first real answer after it ends the backoff of that app's waiting jobs, so
/// a backlog left by an outage drains as fast as a fresh one instead of each job
/// first sitting out a backoff grown during the outage. Retrying sooner is safe
/// (same bill_no); `max_rps` and `max_in_flight` still pace the calls.
pub const OUTAGE_STREAK: u32 = 8;

/// How many recently finished job ids are remembered.
const FINISHED_MEMORY: usize = 65_536;

struct Entries<'a>(&'a HashMap<i64, Entry>);

impl View for Entries<'_> {
    fn openid(&self, id: i64) -> Option<&str> {
        self.0.get(&id).map(|e| e.job.params.openid.as_str())
    }
    fn appid(&self, id: i64) -> Option<&str> {
        self.0.get(&id).map(|e| e.job.params.appid.as_str())
    }
    fn waiting_until(&self, id: i64) -> Option<i64> {
        self.0
            .get(&id)
            .filter(|e| e.phase == Phase::Waiting)
            .map(|e| e.job.next_attempt_at)
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig, seed: u64) -> Engine {
        Engine {
            cfg,
            entries: HashMap::new(),
            sched: Scheduler::default(),
            awaiting: VecDeque::new(),
            last_row: 0,
            seq: 0,
            next_balance_id: -1,
            rng: seed | 1,
            finished: HashSet::new(),
            finished_order: VecDeque::new(),
            transient_streak: HashMap::new(),
            gens: HashMap::new(),
            released: HashMap::new(),
            draining: false,
        }
    }

    /// Jobs held (waiting or under way), balance commands included.
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// Steps under way (the shell waits for them at shutdown).
    pub fn busy(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.phase != Phase::Waiting)
            .count()
    }

    /// Whether the engine holds job `id`.
    pub fn holds(&self, id: i64) -> bool {
        self.entries.contains_key(&id)
    }

    /// When the shell should call [`Engine::poll`] next at the latest.
    pub fn next_wake(&self) -> Option<i64> {
        self.sched.next_wake()
    }

    /// Every idle player whose next job waits has a wake-up (simulation check).
    pub fn check_wakeups(&self) -> Result<(), String> {
        self.sched.check_wakeups(&Entries(&self.entries))
    }

    /// The scheduler's slot counts agree with the jobs' phases, and no more than
    /// `max_in_flight` calls are out (simulation check).
    pub fn check_slots(&self) -> Result<(), String> {
        let count = |f: fn(Phase) -> bool| self.entries.values().filter(|e| f(e.phase)).count();
        let calling = count(|p| matches!(p, Phase::Calling | Phase::Fetching));
        let pending = count(|p| matches!(p, Phase::Marking | Phase::AwaitSlot));
        let (calls, picked) = (self.sched.calls(), self.sched.pending());
        if (calls, picked) != (calling, pending) {
            return Err(format!(
                "scheduler counts {calls} calls and {picked} pending; jobs: {calling} calling, {pending} marking or waiting for a slot"
            ));
        }
        if calls > self.cfg.max_in_flight
            || calls + picked > self.cfg.max_in_flight + self.cfg.mark_ahead
        {
            return Err(format!(
                "{calls} calls and {picked} pending with max_in_flight {} and mark_ahead {}",
                self.cfg.max_in_flight, self.cfg.mark_ahead
            ));
        }
        Ok(())
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64*: replayable from the seed, no global RNG
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Feed one event; actions to perform are appended to `out`.
    pub fn handle(&mut self, ev: Event, now: i64, out: &mut Vec<Action>) {
        match ev {
            Event::Loaded(jobs) => {
                for j in jobs {
                    self.add(resumed(j));
                }
            }
            Event::Accepted(j) => {
                if !self.finished.contains(&j.id) && self.admit(&j) {
                    if let Some(j) = self.supersede(j) {
                        self.add(j)
                    }
                }
            }
            Event::Joined(j) => {
                if !self.finished.contains(&j.id) && self.admit(&j) {
                    if let Some(j) = self.supersede(resumed(j)) {
                        self.join(j)
                    }
                }
            }
            Event::Reopened(j) => {
                if self.admit(&j) {
                    self.finished.remove(&j.id);
                    if let Some(j) = self.supersede(resumed(j)) {
                        self.reopen(j)
                    }
                }
            }
            Event::Balance(b) => self.add_balance(*b, now),
            Event::Marked(id, checked_at) => self.marked(id, checked_at, now, out),
            Event::Answered(id, a) => self.answered(id, *a, now, out),
            Event::BalanceFetched(id, a) => self.balance_fetched(id, *a, now, out),
            Event::Recorded(id) => self.recorded(id),
            Event::ReopenedWithKey(id, key) => self.reopened_with_key(id, key, now),
            Event::Claimed(jobs) => {
                for j in jobs {
                    if !self.admit(&j) {
                        continue;
                    }
                    self.finished.remove(&j.id);
                    if let Some(j) = self.supersede(resumed(j)) {
                        self.join(j);
                    }
                }
            }
            Event::PlayersLost(players) => self.drop_players(&players),
            Event::LeaseLost(id) => self.lease_lost(id, out),
        }
        self.prune_gens();
        self.poll(now, out);
    }

    /// Midas answers again after an outage: the app's jobs waiting out a retry
    /// backoff are due now (in their players' order, paced by the scheduler).
    fn end_backoffs(&mut self, appid: &str, now: i64) {
        let mut openids = HashSet::new();
        for e in self.entries.values_mut() {
            if e.target.is_none()
                && e.phase == Phase::Waiting
                && e.job.params.appid == appid
                && e.job.attempts > 0
                && e.job.next_attempt_at > now
            {
                e.job.next_attempt_at = now;
                openids.insert(e.job.params.openid.clone());
            }
        }
        for o in openids {
            self.sched.arm_head(&o, &Entries(&self.entries));
        }
    }

    /// Stop starting steps (shutdown); those under way still finish.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Start every step that may start now: first the calls of marked jobs that
    /// waited for a slot (also while draining: their steps are under way), then
    /// new picks.
    pub fn poll(&mut self, now: i64, out: &mut Vec<Action>) {
        while let Some(&id) = self.awaiting.front() {
            let Some(e) = self
                .entries
                .get(&id)
                .filter(|e| e.phase == Phase::AwaitSlot)
            else {
                // stale (the job's step ended another way)
                self.awaiting.pop_front();
                continue;
            };
            if e.lost {
                // the player's lease is gone: no call (whoever holds it now runs it)
                self.awaiting.pop_front();
                self.lease_lost(id, out);
                continue;
            }
            if self.sched.calls() >= self.cfg.max_in_flight {
                break;
            }
            self.awaiting.pop_front();
            if self.refresh_if_stale(id, now, out) {
                // its slot goes to the next marked job; this one waits for the
                // refreshed fence and then for a slot again
                continue;
            }
            if self.may_call(id, now, out) && self.sched.try_call(&limits(&self.cfg)) {
                self.call_now(id, out);
            }
        }
        while !self.draining {
            let view = Entries(&self.entries);
            let Some(id) = self.sched.next(now, &limits(&self.cfg), &view) else {
                break;
            };
            self.start(id, now, out);
        }
    }

    fn add(&mut self, job: Job) {
        if job.id > 0 {
            self.last_row = self.last_row.max(job.id);
        }
        if self.entries.contains_key(&job.id) {
            return;
        }
        let (id, order, at) = (job.id, Order::row(job.id), job.next_attempt_at);
        let openid = job.params.openid.clone();
        self.entries.insert(id, Entry::waiting(job, order, None));
        self.sched.insert(id, order, &openid, at);
    }

    fn join(&mut self, job: Job) {
        match self.entries.get_mut(&job.id) {
            None => self.add(job),
            Some(e) => {
                let newer = job.session_key.is_some()
                    && job.session_key.as_ref().map(Secret::expose)
                        != e.job.session_key.as_ref().map(Secret::expose);
                if newer {
                    e.job.session_key = job.session_key;
                    e.key_gen += 1;
                }
            }
        }
    }

    fn reopen(&mut self, job: Job) {
        match self.entries.get_mut(&job.id) {
            None => self.add(job),
            Some(e) if e.phase == Phase::Waiting => {
                // already pending here: take the newer key and the new retry period
                e.job.session_key = job.session_key;
                e.job.reopened_at = job.reopened_at;
                e.key_gen += 1;
            }
            Some(e) => e.reopen = Some(job),
        }
    }

    /// The job was picked: the player is busy and the job is pending (it marks, or
    /// ends here without a call).
    fn start(&mut self, id: i64, now: i64, out: &mut Vec<Action>) {
        let cfg = &self.cfg;
        let Some(e) = self.entries.get_mut(&id) else {
            self.sched.no_call();
            return;
        };
        let known = api_of(cfg, &e.job.params.appid).is_some();
        let ctx = context(cfg, &e.job.params.appid, false);
        let past = job::deadline(&e.job, &cfg.retry).is_some_and(|d| now >= d);
        if e.target.is_some() {
            // balance: no outbox row, no mark
            self.begin_call(id, out);
            return;
        }
        // a `balance`/`query_order` row moves nothing and has no bill_no window:
        // it is called, and job::decide_read ends it past its own deadline
        let read = e.job.params.op.is_read();
        let end = if !known {
            Some(job::unknown_app(&e.job, now, ctx))
        } else if past && !read {
            // the bill_no window is closing: never send it again
            Some((JobState::Unknown, job::exhausted(&e.job, None, now, ctx)))
        } else {
            None
        };
        if let Some((state, mut reply)) = end {
            if read {
                // its key is the outbox's, not the client's
                reply.bill_no = None;
            }
            self.sched.no_call();
            e.phase = Phase::Recording(None);
            out.push(Action::Record(record(
                &e.job,
                Vec::new(),
                final_update(state, &reply),
                now,
            )));
            return;
        }
        e.phase = Phase::Marking;
        e.job.calls += 1;
        e.job.first_attempt_at.get_or_insert(now);
        out.push(e.mark(id, now, false));
    }

    /// A picked job (marked, or a balance) calls now if a call slot is free, or
    /// waits for one.
    fn begin_call(&mut self, id: i64, out: &mut Vec<Action>) {
        if self.sched.try_call(&limits(&self.cfg)) {
            self.call_now(id, out);
        } else if let Some(e) = self.entries.get_mut(&id) {
            e.phase = Phase::AwaitSlot;
            self.awaiting.push_back(id);
        } else {
            self.sched.no_call();
        }
    }

    /// Job `id` has taken a call slot: call.
    fn call_now(&mut self, id: i64, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get_mut(&id) else {
            self.sched.call_returned();
            return;
        };
        e.phase = Phase::Calling;
        e.call_gen = e.key_gen;
        let api = match e.target {
            // balance (getbalance) or query_order (queryorderinfo)
            Some(_) => Api::for_op(e.job.params.op),
            None => Api::for_op(e.job.params.op),
        };
        out.push(call(e, api, false));
    }
}

/// A job read back from the outbox: a call counted durably but never answered
/// was cut off (a crash, or a worker that lost the player): it may have reached
/// Midas.
fn resumed(mut j: Job) -> Job {
    if j.calls > j.attempts {
        j.uncertain = true;
    }
    j
}

/// The scheduler's limits from the config.
fn limits(cfg: &EngineConfig) -> Limits {
    Limits {
        max_in_flight: cfg.max_in_flight,
        ahead: cfg.mark_ahead,
        max_rps: cfg.max_rps,
    }
}

/// What `job::decide` needs to know beyond the job (an app removed from the
/// config is judged as 1.0; such a job is never called).
fn context(cfg: &EngineConfig, appid: &str, newer_session_key: bool) -> Context {
    Context {
        newer_session_key,
        simulated: cfg.simulated,
        api: api_of(cfg, appid).unwrap_or(MidasApi::V1),
    }
}

/// The API of a configured app (`None`: the app is not configured any more).
fn api_of(cfg: &EngineConfig, appid: &str) -> Option<MidasApi> {
    cfg.apps
        .iter()
        .find(|(a, _)| a == appid)
        .map(|(_, api)| *api)
}

fn call(e: &Entry, api: Api, balance_after_duplicate: bool) -> Action {
    Action::Call {
        id: e.job.id,
        api,
        params: e.job.params.clone(),
        session_key: e.job.session_key.clone(),
        balance_after_duplicate,
    }
}

fn final_update(state: JobState, reply: &crate::command::Reply) -> Update {
    Update::Final {
        state,
        reply: reply.to_bytes(),
    }
}

fn record(job: &Job, rows: Vec<AttemptRow>, update: Update, now: i64) -> Record {
    let last_errcode = rows
        .first()
        .and_then(|a| a.answer.errcode)
        .or(job.last_errcode);
    let session_guard = match &update {
        Update::Final { state, .. }
            if job::reopens_with_new_session_key(*state, last_errcode, job.uncertain) =>
        {
            Some(SessionGuard {
                used: job.session_key.clone(),
            })
        }
        _ => None,
    };
    Record {
        session_guard,
        job_id: job.id,
        attempts_total: job.attempts,
        first_attempt_at: job.first_attempt_at,
        uncertain: job.uncertain,
        rows,
        update,
        now,
        lease_gen: job.lease_gen,
    }
}

/// Whether `op` is answered without an outbox row.
pub fn is_direct(op: Op) -> bool {
    op.is_read()
}

#[cfg(test)]
mod fence_tests;
#[cfg(test)]
mod read_tests;
#[cfg(test)]
mod tests;
