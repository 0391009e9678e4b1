//! Deterministic simulation of the money path: the real engine, a model outbox
//! (only what was durable survives a crash), a model Midas with a ledger, and a
//! seeded scheduler of everything that can happen in between — answers, lost
//! answers after applying, busy answers, token revocation, session expiry, crashes
//! at any step, restarts, redeliveries, re-sends with a new session_key and
//! operator retries. After every step the invariants of the contract are checked.
//!
//! `SIM_SCENARIOS=N` runs N seeded scenarios (default 10 000); `SIM_SEED=S` replays
//! one scenario and prints its trace. A failure prints its seed and the command
//! that replays it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use midas_worker::command::{Op, Params, Reply, Status};
use midas_worker::config::{Dur, RetryConfig};
use midas_worker::engine::job::{Job, JobState};
use midas_worker::engine::{Action, BalanceCmd, Engine, EngineConfig, Event};
use midas_worker::engine::{HeldPlayer, PreCallMark, Record, Update};
use midas_worker::midas::{errcode, Answer, Api, Body, OutcomeClass};
use midas_worker::secret::Secret;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const HOUR: i64 = 3_600_000;
const WINDOW: i64 = 47 * HOUR;

/// A durable outbox row, as the real writer keeps it.
#[derive(Debug, Clone)]
struct Row {
    params: Params,
    key: Option<String>,
    state: JobState,
    calls: u32,
    attempts: u32,
    uncertain: bool,
    first_attempt_at: Option<i64>,
    next_attempt_at: i64,
    received_at: i64,
    reopened_at: Option<i64>,
    last_errcode: Option<i64>,
    result: Option<Reply>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// bill_no → (op, cancelled)
    applied: HashMap<String, (Op, bool)>,
    first_seen: HashMap<String, i64>,
    expired_keys: HashSet<String>,
    balance: HashMap<String, i64>,
}

// a call carries its job's parameters, as the engine's Action does
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Task {
    Mark(Vec<(i64, i64, i64)>),
    Call {
        id: i64,
        api: Api,
        params: Params,
        key: Option<String>,
        balance: bool,
    },
    Record(Record),
}

struct Sim {
    rng: SmallRng,
    now: i64,
    rows: BTreeMap<i64, Row>,
    ledger: Ledger,
    engine: Engine,
    cfg: EngineConfig,
    tasks: Vec<Task>,
    /// Jobs whose calls the model saw go unanswered (or cut off by a crash).
    unanswered: HashSet<i64>,
    /// Balance commands accepted and not yet answered (a crash loses them).
    balances: HashSet<String>,
    balance_seq: u32,
    bills: u32,
    trace: Vec<String>,
    verbose: bool,
    fault_rate: f64,
    outage: bool,
    /// Shared outbox: players whose lease this worker lost (another worker holds
    /// them; this worker's writes for them are fenced out until it takes them back).
    lost: HashSet<String>,
    /// Shared outbox: each player's lease generation (a loss to another worker
    /// and a take back each draw a new one); a write of another one is fenced.
    gens: HashMap<String, i64>,
    /// When this process's recent calls went out (the last second), for `max_rps`.
    calls_at: std::collections::VecDeque<i64>,
}

type Check = Result<(), String>;

fn params(op: Op, bill: &str, openid: &str, amt: i64) -> Params {
    Params {
        op,
        bill_no: (op != Op::Balance).then(|| bill.to_string()),
        openid: openid.into(),
        appid: "wx1".into(),
        zone_id: "1".into(),
        pf: "android".into(),
        user_ip: None,
        amt: (op == Op::Pay).then_some(amt),
        present_counts: (op == Op::Present).then_some(amt),
        pay_item: None,
        app_remark: None,
        query: None,
        pay_bill_no: None,
    }
}

fn answer(api: Api, class: OutcomeClass, code: Option<i64>, balance: Option<i64>) -> Answer {
    Answer {
        api,
        class,
        http_status: Some(200),
        errcode: code,
        errmsg: Some(format!("sim {code:?}")),
        body: Body {
            balance,
            ..Body::default()
        },
        latency: Duration::ZERO,
    }
}

fn to_job(id: i64, r: &Row) -> Job {
    let mut j = Job::new(
        id,
        r.params.clone(),
        r.key.clone().map(Secret::new),
        r.received_at,
    );
    j.attempts = r.attempts;
    j.calls = r.calls;
    j.uncertain = r.uncertain;
    j.first_attempt_at = r.first_attempt_at;
    j.next_attempt_at = r.next_attempt_at;
    j.reopened_at = r.reopened_at;
    j.last_errcode = r.last_errcode;
    j
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let cfg = EngineConfig {
            retry: RetryConfig {
                initial: Dur(Duration::from_millis(500)),
                max: Dur(Duration::from_secs(if rng.random_bool(0.5) {
                    300
                } else {
                    4 * 3600
                })),
                give_up_after: Dur(Duration::from_secs(
                    [60, 3600, 24 * 3600, 47 * 3600][rng.random_range(0..4)],
                )),
                balance_give_up_after: Dur(Duration::from_secs(30)),
            },
            max_in_flight: rng.random_range(1..4),
            max_rps: [1, 5, 500][rng.random_range(0..3)],
            apps: vec![("wx1".into(), errcode::MidasApi::V1)],
            simulated: false,
            mark_ahead: rng.random_range(0..3),
            fence_margin_ms: None,
        };
        let fault_rate = [0.0, 0.1, 0.3, 0.6][rng.random_range(0..4)];
        let engine = Engine::new(cfg.clone(), seed);
        Sim {
            rng,
            now: 1_000_000,
            rows: BTreeMap::new(),
            ledger: Ledger::default(),
            engine,
            cfg,
            tasks: Vec::new(),
            unanswered: HashSet::new(),
            balances: HashSet::new(),
            balance_seq: 0,
            bills: 0,
            trace: Vec::new(),
            verbose,
            fault_rate,
            outage: false,
            lost: HashSet::new(),
            gens: HashMap::new(),
            calls_at: Default::default(),
        }
    }

    fn gen_of(&self, openid: &str) -> i64 {
        self.gens.get(openid).copied().unwrap_or(0)
    }

    /// Trace lines are only built when replaying a seed (formatting is most of a
    /// scenario's cost); a failure re-runs its seed with tracing on.
    fn log(&mut self, s: impl FnOnce() -> String) {
        if self.verbose {
            let line = s();
            self.trace.push(format!("{:>12} {line}", self.now));
        }
    }

    fn feed(&mut self, ev: Event) -> Check {
        let mut out = Vec::new();
        self.engine.handle(ev, self.now, &mut out);
        self.take(out)
    }

    fn take(&mut self, out: Vec<Action>) -> Check {
        let mut marks = Vec::new();
        for a in out {
            match a {
                Action::Mark(PreCallMark {
                    id,
                    at,
                    gen,
                    refresh,
                }) => {
                    if refresh {
                        // only a shared outbox's fence is ever refreshed
                        return Err(format!("job {id}: a refresh mark without a lease fence"));
                    }
                    self.check_order(id)?;
                    marks.push((id, at, gen));
                }
                Action::Call {
                    id,
                    api,
                    params,
                    session_key,
                    balance_after_duplicate,
                } => {
                    // one call in flight per player
                    let busy = self.tasks.iter().any(
                        |t| matches!(t, Task::Call { params: p, .. } if p.openid == params.openid),
                    );
                    if busy {
                        return Err(format!("two calls in flight for {}", params.openid));
                    }
                    // max_rps: a token bucket of max_rps allows 2 × max_rps calls in
                    // a second; calls picked earlier and sent later (after their
                    // mark, or a wait for a slot) add at most the slots and the
                    // marks ahead
                    // (the getbalance after a duplicate answer is not paced: it
                    // follows a paced call of its job; docs/config.md says so)
                    if !balance_after_duplicate {
                        self.calls_at.push_back(self.now);
                    }
                    while self.calls_at.front().is_some_and(|&t| t <= self.now - 1000) {
                        self.calls_at.pop_front();
                    }
                    let bound = 2 * self.cfg.max_rps as usize
                        + self.cfg.max_in_flight
                        + self.cfg.mark_ahead;
                    if self.calls_at.len() > bound {
                        return Err(format!(
                            "{} calls within a second with max_rps {} (bound {bound})",
                            self.calls_at.len(),
                            self.cfg.max_rps
                        ));
                    }
                    // Midas never sees more than max_in_flight calls at once
                    let out = self
                        .tasks
                        .iter()
                        .filter(|t| matches!(t, Task::Call { .. }))
                        .count();
                    if out >= self.cfg.max_in_flight {
                        return Err(format!(
                            "call {} would be call {} at once with max_in_flight {}",
                            id,
                            out + 1,
                            self.cfg.max_in_flight
                        ));
                    }
                    self.tasks.push(Task::Call {
                        id,
                        api,
                        params,
                        key: session_key.map(|k| k.expose().to_string()),
                        balance: balance_after_duplicate,
                    });
                }
                Action::Record(r) => self.tasks.push(Task::Record(r)),
                // the model's lease holder is whoever `lost` says
                Action::GiveBack { .. } => {}
                Action::Reply {
                    correlation_id,
                    payload,
                    ..
                } => {
                    let reply: Reply =
                        serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    self.log(|| format!("balance reply {correlation_id} {:?}", reply.status));
                    if !self.balances.remove(&correlation_id) {
                        return Err(format!(
                            "a balance reply nobody asked for: {correlation_id}"
                        ));
                    }
                }
            }
        }
        if !marks.is_empty() {
            self.tasks.push(Task::Mark(marks));
        }
        Ok(())
    }

    /// Calls per player go out in arrival order: nothing earlier of that player waits.
    fn check_order(&self, id: i64) -> Check {
        let Some(row) = self.rows.get(&id) else {
            return Err(format!("mark of an unknown job {id}"));
        };
        for (&other, r) in self.rows.range(..id) {
            if r.params.openid == row.params.openid
                && r.state == JobState::Pending
                && self.engine.holds(other)
            {
                return Err(format!(
                    "job {id} of {} called while the earlier job {other} is pending",
                    row.params.openid
                ));
            }
        }
        Ok(())
    }

    fn new_command(&mut self) -> Check {
        let openid = format!("p{}", self.rng.random_range(0..3));
        let roll = self.rng.random_range(0..100);
        if roll < 10 {
            self.balance_seq += 1;
            let cid = format!("bal-{}", self.balance_seq);
            self.balances.insert(cid.clone());
            self.log(|| format!("balance {cid} {openid}"));
            let key = format!("k-{openid}-{}", self.rng.random::<u16>());
            return self.feed(Event::Balance(Box::new(BalanceCmd {
                params: params(Op::Balance, "", &openid, 0),
                session_key: Some(Secret::new(key)),
                reply_to: "r".into(),
                correlation_id: cid,
                received_at: self.now,
            })));
        }
        let (op, bill) = if roll < 30 {
            // cancel an earlier pay of this player (or an unknown bill)
            let pays: Vec<String> = self
                .rows
                .values()
                .filter(|r| r.params.op == Op::Pay && r.params.openid == openid)
                .filter_map(|r| r.params.bill_no.clone())
                .collect();
            if pays.is_empty() {
                return Ok(());
            }
            (
                Op::CancelPay,
                pays[self.rng.random_range(0..pays.len())].clone(),
            )
        } else {
            self.bills += 1;
            let op = if roll < 80 { Op::Pay } else { Op::Present };
            (op, format!("B{}", self.bills))
        };
        if self
            .rows
            .values()
            .any(|r| r.params.op == op && r.params.bill_no.as_deref() == Some(&bill))
        {
            return Ok(());
        }
        let amt = self.rng.random_range(1..400);
        let p = params(op, &bill, &openid, amt);
        let id = self.rows.keys().next_back().copied().unwrap_or(0) + 1;
        let key = format!("k-{openid}-{}", self.rng.random::<u16>());
        self.rows.insert(
            id,
            Row {
                params: p.clone(),
                key: Some(key.clone()),
                state: JobState::Pending,
                calls: 0,
                attempts: 0,
                uncertain: false,
                first_attempt_at: None,
                next_attempt_at: self.now,
                received_at: self.now,
                reopened_at: None,
                last_errcode: None,
                result: None,
            },
        );
        self.log(|| format!("accept {id} {op} {bill} {openid}"));
        if self.lost.contains(&openid) {
            // recorded for the worker holding the player
            return Ok(());
        }
        let mut job = Job::new(id, p, Some(Secret::new(key)), self.now);
        job.lease_gen = self.gen_of(&openid);
        self.feed(Event::Accepted(job))
    }

    /// A re-sent command: joins a pending job (maybe with a new key), gets the
    /// stored reply of a final one, or re-opens one that ended on a session problem.
    fn resend(&mut self) -> Check {
        if self.rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = self.rows.keys().copied().collect();
        let id = ids[self.rng.random_range(0..ids.len())];
        let new_key = format!("k2-{}", self.rng.random::<u32>());
        let now = self.now;
        let Some(r) = self.rows.get_mut(&id) else {
            return Ok(());
        };
        let elsewhere = self.lost.contains(&r.params.openid);
        match r.state {
            JobState::Pending => {
                if r.key.as_deref() != Some(new_key.as_str()) {
                    r.key = Some(new_key);
                }
                let mut job = to_job(id, r);
                job.lease_gen = self.gens.get(&job.params.openid).copied().unwrap_or(0);
                self.log(|| format!("resend joins {id}"));
                if elsewhere {
                    return Ok(());
                }
                self.feed(Event::Joined(job))
            }
            JobState::Failed | JobState::Unknown => {
                let session_problem = midas_worker::engine::job::reopens_with_new_session_key(
                    r.state,
                    r.last_errcode,
                    r.uncertain,
                );
                if !session_problem {
                    return Ok(());
                }
                r.state = JobState::Pending;
                r.key = Some(new_key);
                r.result = None;
                r.reopened_at = Some(now);
                r.next_attempt_at = now;
                let mut job = to_job(id, r);
                job.lease_gen = self.gens.get(&job.params.openid).copied().unwrap_or(0);
                self.log(|| format!("resend re-opens {id}"));
                if elsewhere {
                    return Ok(());
                }
                self.feed(Event::Reopened(job))
            }
            JobState::Succeeded => Ok(()),
        }
    }

    /// `outbox retry` of an unknown job inside the bill_no window.
    fn operator_retry(&mut self) -> Check {
        let now = self.now;
        let found = self.rows.iter().find(|(_, r)| {
            r.state == JobState::Unknown && r.first_attempt_at.is_none_or(|f| now < f + WINDOW)
        });
        let Some((&id, _)) = found else {
            return Ok(());
        };
        let Some(r) = self.rows.get_mut(&id) else {
            return Ok(());
        };
        r.state = JobState::Pending;
        r.result = None;
        r.reopened_at = Some(now);
        r.next_attempt_at = now;
        let mut job = to_job(id, r);
        let elsewhere = self.lost.contains(&r.params.openid);
        job.lease_gen = self.gens.get(&job.params.openid).copied().unwrap_or(0);
        self.log(|| format!("operator retry {id}"));
        if elsewhere {
            return Ok(());
        }
        self.feed(Event::Reopened(job))
    }

    /// A call reaches Midas: never later than 47 h after the first call of its bill_no.
    fn reach(&mut self, api: Api, p: &Params) -> Check {
        if api == Api::GetBalance {
            return Ok(());
        }
        let bill = p.bill_no.clone().unwrap_or_default();
        let first = *self
            .ledger
            .first_seen
            .entry(bill.clone())
            .or_insert(self.now);
        if self.now > first + WINDOW {
            return Err(format!(
                "{bill} sent {} ms after the first call",
                self.now - first
            ));
        }
        Ok(())
    }

    /// Midas answers a call (mutating the ledger); `lost` says the answer never came back.
    fn answer_call(&mut self, api: Api, p: &Params, key: Option<&str>) -> (Answer, bool) {
        let r: f64 = self.rng.random();
        let f = if self.outage { 1.0 } else { self.fault_rate };
        if key.is_some_and(|k| self.ledger.expired_keys.contains(k)) {
            return (
                answer(api, OutcomeClass::Definitive, Some(90010), None),
                false,
            );
        }
        if r < f * 0.25 {
            return (answer(api, OutcomeClass::Transient, Some(-1), None), false);
        }
        if r < f * 0.35 {
            return (
                answer(api, OutcomeClass::TokenInvalid, Some(40001), None),
                false,
            );
        }
        let lost = r < f * 0.75;
        let expire = lost && r > f * 0.65;
        let openid = p.openid.clone();
        let bal = *self.ledger.balance.entry(openid.clone()).or_insert(500);
        let bill = p.bill_no.clone().unwrap_or_default();
        let a = match api {
            // the simulation sends no query_order
            Api::GetBalance | Api::QueryOrder => {
                answer(api, OutcomeClass::Success, Some(0), Some(bal))
            }
            Api::Pay | Api::Present => match self.ledger.applied.get(&bill) {
                Some(_) => answer(api, OutcomeClass::Duplicate, Some(90012), None),
                None => {
                    let amt = p.amt.unwrap_or(0);
                    if api == Api::Pay && amt > bal {
                        answer(api, OutcomeClass::Definitive, Some(90013), Some(bal))
                    } else {
                        let nb = if api == Api::Pay {
                            bal - amt
                        } else {
                            bal + p.present_counts.unwrap_or(0)
                        };
                        self.ledger.balance.insert(openid, nb);
                        let op = if api == Api::Pay {
                            Op::Pay
                        } else {
                            Op::Present
                        };
                        self.ledger.applied.insert(bill, (op, false));
                        answer(api, OutcomeClass::Success, Some(0), Some(nb))
                    }
                }
            },
            Api::CancelPay => match self.ledger.applied.get(&bill).copied() {
                Some((Op::Pay, false)) => {
                    self.ledger.applied.insert(bill, (Op::Pay, true));
                    answer(api, OutcomeClass::Success, Some(0), None)
                }
                Some((Op::Pay, true)) => answer(api, OutcomeClass::Definitive, Some(90015), None),
                _ => answer(api, OutcomeClass::Definitive, Some(90000), None),
            },
        };
        if expire {
            if let Some(k) = key {
                self.ledger.expired_keys.insert(k.to_string());
            }
        }
        if lost {
            return (
                Answer {
                    class: OutcomeClass::Transient,
                    errcode: None,
                    errmsg: Some("timeout".into()),
                    ..a
                },
                true,
            );
        }
        (a, false)
    }

    fn complete(&mut self, i: usize) -> Check {
        let task = self.tasks.swap_remove(i);
        match task {
            Task::Mark(marks) => {
                let mut fenced = HashSet::new();
                for &(id, at, gen) in &marks {
                    if let Some(r) = self.rows.get_mut(&id) {
                        let current = self.gens.get(&r.params.openid).copied().unwrap_or(0);
                        if self.lost.contains(&r.params.openid) || gen != current {
                            fenced.insert(id);
                            continue;
                        }
                        r.calls += 1;
                        r.first_attempt_at.get_or_insert(at);
                    }
                }
                for (id, _, _) in marks {
                    if fenced.contains(&id) {
                        self.log(|| format!("mark of {id} fenced"));
                        self.feed(Event::LeaseLost(id))?;
                    } else {
                        self.feed(Event::Marked(id, None))?;
                    }
                }
                Ok(())
            }
            Task::Call {
                id,
                api,
                params,
                key,
                balance,
            } => {
                self.reach(api, &params)?;
                let (a, _lost) = self.answer_call(api, &params, key.as_deref());
                if a.class == OutcomeClass::Transient && !balance {
                    self.unanswered.insert(id);
                }
                self.log(|| format!("call {id} {api:?} -> {:?} {:?}", a.class, a.errcode));
                let ev = if balance {
                    Event::BalanceFetched(id, Box::new(a))
                } else {
                    Event::Answered(id, Box::new(a))
                };
                self.feed(ev)
            }
            Task::Record(r) => {
                let id = r.job_id;
                let fenced = self.rows.get(&id).is_some_and(|row| {
                    self.lost.contains(&row.params.openid)
                        || self.gens.get(&row.params.openid).copied().unwrap_or(0) != r.lease_gen
                });
                if fenced {
                    // the calls are real (kept for the audit); the job is not touched
                    self.log(|| format!("record of {id} fenced"));
                    for a in &r.rows {
                        if a.answer.class == OutcomeClass::Transient {
                            self.unanswered.insert(id);
                        }
                    }
                    return self.feed(Event::LeaseLost(id));
                }
                self.apply_record(&r)?;
                self.feed(Event::Recorded(id))
            }
        }
    }

    /// Shared outbox: lose a player's lease (another worker takes it), or take a
    /// lost one back with its pending jobs as the outbox holds them.
    fn lease_change(&mut self) -> Check {
        let back = !self.lost.is_empty() && self.rng.random_bool(0.5);
        if back {
            let lost: Vec<String> = self.lost.iter().cloned().collect();
            let openid = lost[self.rng.random_range(0..lost.len())].clone();
            self.reclaim(&openid)
        } else {
            let openid = format!("p{}", self.rng.random_range(0..3));
            if !self.lost.insert(openid.clone()) {
                return Ok(());
            }
            *self.gens.entry(openid.clone()).or_default() += 1;
            self.log(|| format!("lease of {openid} lost"));
            // lost at the generation the engine holds it under
            let gen = self.engine.generation("wx1", &openid).unwrap_or(0);
            self.feed(Event::PlayersLost(vec![HeldPlayer {
                appid: "wx1".into(),
                openid,
                gen,
            }]))
        }
    }

    fn reclaim(&mut self, openid: &str) -> Check {
        self.lost.remove(openid);
        let gen = {
            let g = self.gens.entry(openid.to_string()).or_default();
            *g += 1;
            *g
        };
        let jobs: Vec<Job> = self
            .rows
            .iter()
            .filter(|(_, r)| r.state == JobState::Pending && r.params.openid == openid)
            .map(|(&id, r)| {
                let mut j = to_job(id, r);
                j.lease_gen = gen;
                j
            })
            .collect();
        self.log(|| format!("lease of {openid} taken back: {} jobs", jobs.len()));
        self.feed(Event::Claimed(jobs))
    }

    fn apply_record(&mut self, r: &Record) -> Check {
        let now = self.now;
        let Some(row) = self.rows.get_mut(&r.job_id) else {
            return Err(format!("record of an unknown job {}", r.job_id));
        };
        row.attempts = r.attempts_total;
        if row.first_attempt_at.is_none() {
            row.first_attempt_at = r.first_attempt_at;
        }
        row.uncertain |= r.uncertain;
        if let Some(a) = r.rows.first() {
            row.last_errcode = a.answer.errcode;
        }
        match &r.update {
            Update::Retry { next_attempt_at } => row.next_attempt_at = *next_attempt_at,
            Update::Final { state, reply } => {
                let reply: Reply = serde_json::from_slice(reply).map_err(|e| e.to_string())?;
                row.state = *state;
                row.key = None;
                row.result = Some(reply.clone());
                let _ = now;
                let id = r.job_id;
                self.log(|| format!("final {id} {state:?} {:?} {:?}", reply.error, reply.errcode));
                self.check_reply(id, &reply)?;
            }
        }
        Ok(())
    }

    /// A final reply agrees with the ledger.
    fn check_reply(&self, id: i64, reply: &Reply) -> Check {
        let Some(row) = self.rows.get(&id) else {
            return Ok(());
        };
        let bill = row.params.bill_no.clone().unwrap_or_default();
        let applied = self.ledger.applied.get(&bill).copied();
        let status = reply.status.ok_or("reply without status")?;
        match (row.params.op, status) {
            (Op::Pay | Op::Present, Status::Succeeded) => {
                if applied.is_none() {
                    return Err(format!("job {id} {bill} succeeded but was never applied"));
                }
            }
            (Op::Pay | Op::Present, Status::Failed) => {
                if applied.is_some() {
                    return Err(format!("job {id} {bill} failed but the ledger applied it"));
                }
            }
            (Op::CancelPay, Status::Succeeded) => {
                if applied != Some((Op::Pay, true)) {
                    return Err(format!(
                        "cancel {id} of {bill} succeeded but the pay is {applied:?}"
                    ));
                }
            }
            (Op::CancelPay, Status::Failed) => {
                if applied == Some((Op::Pay, true)) {
                    return Err(format!(
                        "cancel {id} of {bill} failed but the pay was rolled back"
                    ));
                }
            }
            (_, Status::Unknown) => {
                let exhausted = reply.error.as_deref() == Some("retries_exhausted");
                if !exhausted && !self.unanswered.contains(&id) && !row.uncertain {
                    return Err(format!(
                        "job {id} unknown ({:?}) without an unanswered call",
                        reply.error
                    ));
                }
            }
            (op, s) => return Err(format!("job {id}: {op:?} ended {s:?}")),
        }
        Ok(())
    }

    /// SIGKILL: in-flight work may or may not have happened; memory is gone.
    fn crash(&mut self) -> Check {
        self.log(|| "crash".into());
        // a new process: its rate limiter starts afresh
        self.calls_at.clear();
        let tasks = std::mem::take(&mut self.tasks);
        for t in tasks {
            match t {
                Task::Mark(marks) => {
                    if self.rng.random_bool(0.5) {
                        for (id, at, gen) in marks {
                            if let Some(r) = self.rows.get_mut(&id) {
                                let current = self.gens.get(&r.params.openid).copied().unwrap_or(0);
                                if self.lost.contains(&r.params.openid) || gen != current {
                                    continue; // fenced
                                }
                                r.calls += 1;
                                r.first_attempt_at.get_or_insert(at);
                            }
                        }
                    }
                }
                Task::Call {
                    id,
                    api,
                    params,
                    key,
                    balance,
                } => {
                    if self.rng.random_bool(0.5) {
                        // the call reached Midas; its answer is lost with the process
                        self.reach(api, &params)?;
                        let _ = self.answer_call(api, &params, key.as_deref());
                        if !balance {
                            self.unanswered.insert(id);
                        }
                    }
                }
                Task::Record(r) => {
                    let fenced = self.rows.get(&r.job_id).is_some_and(|row| {
                        self.lost.contains(&row.params.openid)
                            || self.gens.get(&row.params.openid).copied().unwrap_or(0)
                                != r.lease_gen
                    });
                    if !fenced && self.rng.random_bool(0.5) {
                        self.apply_record(&r)?;
                    }
                }
            }
        }
        // acked at intake and answered from memory: lost with it
        self.balances.clear();
        self.engine = Engine::new(self.cfg.clone(), self.rng.random());
        let jobs: Vec<Job> = self
            .rows
            .iter()
            .filter(|(_, r)| r.state == JobState::Pending && !self.lost.contains(&r.params.openid))
            .map(|(&id, r)| {
                let mut j = to_job(id, r);
                j.lease_gen = self.gens.get(&r.params.openid).copied().unwrap_or(0);
                j
            })
            .collect();
        self.feed(Event::Loaded(jobs))
    }

    fn check(&self) -> Check {
        self.engine.check_wakeups()?;
        self.engine.check_slots()?;
        for (&id, r) in &self.rows {
            if r.state == JobState::Pending
                && !self.engine.holds(id)
                && !self.lost.contains(&r.params.openid)
            {
                return Err(format!("pending job {id} is not held by the engine"));
            }
        }
        Ok(())
    }

    fn advance(&mut self) -> Check {
        let target = if self.rng.random_bool(0.5) {
            self.engine.next_wake().unwrap_or(self.now)
        } else if self.rng.random_bool(0.05) {
            self.now + self.rng.random_range(0..6 * HOUR)
        } else {
            self.now + self.rng.random_range(0..2000)
        };
        self.now = self.now.max(target);
        let mut out = Vec::new();
        self.engine.poll(self.now, &mut out);
        self.take(out)
    }

    fn step(&mut self) -> Check {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=11 => self.new_command(),
            12..=14 => self.resend(),
            15 => self.operator_retry(),
            16 => {
                self.outage = !self.outage;
                Ok(())
            }
            17 => self.crash(),
            18 => self.lease_change(),
            19..=40 => self.advance(),
            _ if !self.tasks.is_empty() => {
                let i = self.rng.random_range(0..self.tasks.len());
                self.complete(i)
            }
            _ => self.advance(),
        }
    }

    /// No more faults: everything must end final.
    fn drain(&mut self) -> Check {
        self.outage = false;
        self.fault_rate = 0.0;
        let lost: Vec<String> = self.lost.iter().cloned().collect();
        for openid in lost {
            self.reclaim(&openid)?;
        }
        for _ in 0..100_000 {
            if self.tasks.is_empty() {
                if self.rows.values().all(|r| r.state != JobState::Pending)
                    && self.balances.is_empty()
                {
                    return Ok(());
                }
                let next = self
                    .engine
                    .next_wake()
                    .ok_or("pending jobs but no wake-up")?;
                self.now = self.now.max(next);
                let mut out = Vec::new();
                self.engine.poll(self.now, &mut out);
                self.take(out)?;
                if self.tasks.is_empty() && self.engine.next_wake().is_none_or(|w| w <= self.now) {
                    self.now += 1000;
                }
            } else {
                self.complete(0)?;
            }
            self.check()?;
        }
        Err("did not drain".into())
    }
}

fn run(seed: u64, verbose: bool) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::new(seed, verbose);
    let steps = sim.rng.random_range(50..250);
    for _ in 0..steps {
        if let Err(e) = sim.step().and_then(|()| sim.check()) {
            return Err((e, std::mem::take(&mut sim.trace)));
        }
    }
    sim.drain()
        .map_err(|e| (e, std::mem::take(&mut sim.trace)))?;
    for (&id, r) in &sim.rows {
        match &r.result {
            Some(reply) => sim.check_reply(id, reply).map_err(|e| (e, Vec::new()))?,
            None => return Err((format!("job {id} has no final reply"), Vec::new())),
        }
    }
    Ok(())
}

#[test]
fn simulation() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed: u64 = seed.parse().expect("SIM_SEED is a number");
        match run(seed, true) {
            Ok(()) => println!("simulation: seed {seed} passed"),
            Err((e, trace)) => {
                println!("{}", trace.join("\n"));
                panic!("seed {seed}: {e}")
            }
        }
        return;
    }
    let n: u64 = std::env::var("SIM_SCENARIOS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let base: u64 = 0x5eed_0000;
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for i in 0..n {
        let seed = base + i;
        if let Err((e, trace)) = run(seed, false) {
            if failures.is_empty() {
                let tail: Vec<_> = trace.iter().rev().take(30).rev().cloned().collect();
                eprintln!(
                    "seed {seed}: {e}\n  last steps:\n    {}",
                    tail.join("\n    ")
                );
            }
            failures.push((seed, e));
        }
    }
    println!(
        "simulation: {n} scenarios, {} invariant violations ({:.1}s)",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some((seed, e)) = failures.first() {
        panic!(
            "{} of {n} scenarios broke an invariant; first: seed {seed}: {e}\n\
             replay: SIM_SEED={seed} cargo test --test simulation -- --nocapture",
            failures.len()
        );
    }
}
