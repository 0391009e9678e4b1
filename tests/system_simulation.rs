//! The system simulation: 2–3 workers, each the real engine plus the lease
//! coordinator's decisions, on one shared model outbox whose leases expire on a
//! model clock. Workers pause, run with offset clocks, crash at any step, are cut
//! off from the outbox, see writes fail or confirm late, and lose their broker;
//! replies go through a publisher and a relay whose confirms are lost, late or
//! nacked; operators retry jobs and game servers re-send with new session keys,
//! on 1.0 and 2.0 apps. The model Midas (`system_sim/midas.rs`) is strict: full
//! errcode tables, sessions that expire on their own, deduplication for 48 h.
//!
//! Game servers also ask for balances: on a shared outbox each is a row of its
//! own (a synthetic key), run under its player's lease like any job.
//!
//! Invariants, checked after every step: at most one call in flight per player
//! across the workers (getbalance calls included); a player's calls in arrival
//! order (balances included); a balance's reply, when its outcome lands, shows
//! the player's balance as it is then (after every earlier job); every final reply
//! agrees with the ledger (so `failed` only when no call of the bill applied);
//! no call past the 47 h window; after the run every command is answered, a
//! repeated reply is identical, copies are bounded. A write of a lease
//! generation that is no longer current never lands: the model outbox fences by
//! generation as the real SQL does, and a stale write that landed shows as a
//! reply that disagrees with the ledger.
//!
//! `SIM_SCENARIOS=N` runs N scenarios (default 10 000); `SIM_SEED=S` replays one
//! with its trace.

#[path = "system_sim/midas.rs"]
mod midas;
#[path = "system_sim/outbox.rs"]
mod outbox;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Refresh marks made in the run (a marked job that waited for a call slot past
/// the fence's margin): printed with the summary, so a run shows the path is taken.
static REFRESHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

use midas_worker::command::{Op, Params, Reply};
use midas_worker::config::{Dur, RetryConfig};
use midas_worker::engine::job::{reopens_with_new_session_key, JobState};
use midas_worker::engine::{Action, BalanceCmd, Engine, EngineConfig, Event};
use midas_worker::engine::{PreCallMark, Record};
use midas_worker::midas::errcode::MidasApi;
use midas_worker::midas::{Answer, Api};
use midas_worker::secret::Secret;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use midas::{Midas, HOUR, WINDOW};
use outbox::{Fences, Outbox, Player, Row};

const LEASE: i64 = 7_000;
const TIMEOUT: i64 = 1_000;
const MARGIN: i64 = 2_000;
const LOOK: i64 = 500;

enum Task {
    Mark(Vec<PreCallMark>),
    /// A call out: its request is in `Sim::in_flight` until Midas handles it.
    Call {
        id: i64,
        api: Api,
        appid: String,
        balance: bool,
        seq: u64,
        deadline: i64,
    },
    Record(Record),
    GiveBack(Player, i64),
    Publish(String, Vec<u8>, u32, i64),
}

/// An event waiting to reach a worker (a slow write's confirmation, an answer
/// to a paused worker).
struct Pending {
    at: i64,
    ev: Event,
}

struct Worker {
    engine: Engine,
    me: u32,
    offset: i64,
    paused_until: i64,
    cut: bool,
    broker: bool,
    tasks: Vec<Task>,
    inbox: Vec<Pending>,
    next_look: i64,
    last_renew: i64,
}

/// A call Midas has not handled yet (it does before `deadline`, or never).
struct InFlight {
    openid: String,
    deadline: i64,
    worker: usize,
    seq: u64,
    api: Api,
    params: Params,
    key: Option<String>,
}

struct Sim {
    rng: SmallRng,
    now: i64,
    ob: Outbox,
    midas: Midas,
    workers: Vec<Worker>,
    cfg: EngineConfig,
    next_me: u32,
    in_flight: Vec<InFlight>,
    call_seq: u64,
    fault: f64,
    bills: u32,
    cids: u32,
    /// correlation id → (reply, epoch) delivered, in order.
    got: HashMap<String, Vec<(Vec<u8>, u32)>>,
    trace: Vec<String>,
    verbose: bool,
}

type Check = Result<(), String>;

fn params(op: Op, bill: &str, openid: &str, appid: &str, amt: i64) -> Params {
    Params {
        op,
        bill_no: Some(bill.to_string()),
        openid: openid.into(),
        appid: appid.into(),
        zone_id: "1".into(),
        pf: "android".into(),
        user_ip: None,
        amt: (op == Op::Pay).then_some(amt),
        present_counts: (op == Op::Present).then_some(amt),
        pay_item: None,
        app_remark: None,
        pay_bill_no: None,
        query: None,
    }
}

fn api_of(appid: &str) -> MidasApi {
    if appid == "wx2" {
        MidasApi::V2
    } else {
        MidasApi::V1
    }
}

impl Sim {
    fn new(seed: u64, verbose: bool, fences: Fences) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let cfg = EngineConfig {
            retry: RetryConfig {
                initial: Dur(Duration::from_millis(500)),
                max: Dur(Duration::from_secs(
                    [30, 300, 4 * 3600][rng.random_range(0..3)],
                )),
                give_up_after: Dur(Duration::from_secs(
                    [60, 3600, 24 * 3600, 47 * 3600][rng.random_range(0..4)],
                )),
                balance_give_up_after: Dur(Duration::from_secs(30)),
            },
            max_in_flight: rng.random_range(1..4),
            max_rps: 500,
            apps: vec![("wx1".into(), MidasApi::V1), ("wx2".into(), MidasApi::V2)],
            simulated: false,
            mark_ahead: rng.random_range(0..3),
            fence_margin_ms: Some(MARGIN),
        };
        let n = rng.random_range(2..4);
        let fault = [0.0, 0.1, 0.3, 0.6][rng.random_range(0..4)];
        let mut s = Sim {
            rng,
            now: 1_000_000,
            ob: Outbox::new(LEASE, TIMEOUT + MARGIN, fences),
            midas: Midas::default(),
            workers: Vec::new(),
            cfg,
            next_me: 1,
            in_flight: Vec::new(),
            call_seq: 0,
            fault,
            bills: 0,
            cids: 0,
            got: HashMap::new(),
            trace: Vec::new(),
            verbose,
        };
        for _ in 0..n {
            let w = s.worker();
            s.workers.push(w);
        }
        s
    }

    fn worker(&mut self) -> Worker {
        let me = self.next_me;
        self.next_me += 1;
        Worker {
            engine: Engine::new(self.cfg.clone(), self.rng.random()),
            me,
            offset: self.rng.random_range(-300..300),
            paused_until: 0,
            cut: false,
            broker: true,
            tasks: Vec::new(),
            inbox: Vec::new(),
            next_look: self.now,
            last_renew: i64::MIN / 2,
        }
    }

    fn log(&mut self, s: impl FnOnce() -> String) {
        if self.verbose {
            let line = s();
            self.trace.push(format!("{:>12} {line}", self.now));
        }
    }

    fn awake(&self, w: usize) -> bool {
        self.workers[w].paused_until <= self.now
    }

    /// Feed an event to worker `w` (at its clock) and take its actions.
    fn feed(&mut self, w: usize, ev: Event) -> Check {
        let mut out = Vec::new();
        let t = self.now + self.workers[w].offset;
        self.workers[w].engine.handle(ev, t, &mut out);
        self.take(w, out)
    }

    fn poll(&mut self, w: usize) -> Check {
        let mut out = Vec::new();
        let t = self.now + self.workers[w].offset;
        self.workers[w].engine.poll(t, &mut out);
        self.take(w, out)
    }

    fn take(&mut self, w: usize, out: Vec<Action>) -> Check {
        let mut marks = Vec::new();
        for a in out {
            match a {
                Action::Mark(m) => {
                    if m.refresh {
                        REFRESHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.log(|| format!("w{w} refreshes the mark of {}", m.id));
                    }
                    marks.push(m)
                }
                Action::Call {
                    id,
                    api,
                    params,
                    session_key,
                    balance_after_duplicate,
                } => {
                    self.check_call(w, id, &params, balance_after_duplicate)?;
                    self.call_seq += 1;
                    let (seq, deadline) = (self.call_seq, self.now + TIMEOUT);
                    self.log(|| format!("w{w} calls {id} {api:?}"));
                    self.workers[w].tasks.push(Task::Call {
                        id,
                        api,
                        appid: params.appid.clone(),
                        balance: balance_after_duplicate,
                        seq,
                        deadline,
                    });
                    self.in_flight.push(InFlight {
                        openid: params.openid.clone(),
                        deadline,
                        worker: w,
                        seq,
                        api,
                        params,
                        key: session_key.map(|k| k.expose().to_string()),
                    });
                }
                Action::Record(r) => self.workers[w].tasks.push(Task::Record(r)),
                Action::GiveBack { appid, openid, gen } => {
                    self.log(|| format!("w{w} gives {openid} back at gen {gen}"));
                    self.workers[w]
                        .tasks
                        .push(Task::GiveBack((appid, openid), gen))
                }
                Action::Reply { .. } => {}
            }
        }
        if !marks.is_empty() {
            self.workers[w].tasks.push(Task::Mark(marks));
        }
        Ok(())
    }

    /// A call is about to go out: no other call of its player is in flight on
    /// any worker, and no earlier job of the player that was pending before this
    /// one arrived is still pending.
    fn check_call(&self, w: usize, id: i64, p: &Params, balance: bool) -> Check {
        // a player is (appid, openid): each app is its own Midas account
        if let Some(o) = self
            .in_flight
            .iter()
            .find(|f| f.openid == p.openid && f.params.appid == p.appid)
        {
            return Err(format!(
                "worker {w} calls job {id} of {} while worker {}'s call is in flight",
                p.openid, o.worker
            ));
        }
        if balance || id < 0 {
            // a getbalance after a duplicate; a balance answered from memory
            return Ok(());
        }
        let Some(row) = self.ob.rows.get(&id) else {
            return Err(format!("call of an unknown job {id}"));
        };
        // never past the job's deadline (give_up_after, and at most 47 h after its
        // first call): judged on the worker's clock, off by at most 300 ms (a
        // balance moves nothing and has no bill_no window)
        let deadline = midas_worker::engine::job::deadline(&row.job(id, 0), &self.cfg.retry)
            .filter(|_| !p.op.is_read());
        if let Some(d) = deadline {
            if self.now > d + 300 {
                return Err(format!(
                    "job {id} called {} ms past its deadline",
                    self.now - d
                ));
            }
        }
        for (&o, r) in self.ob.rows.range(..id) {
            if r.params.openid == p.openid
                && r.params.appid == p.appid
                && r.state == JobState::Pending
                && (r.pending_since() < row.received_at
                    || (r.pending_since() == row.received_at && r.reopened_at.is_none()))
            {
                return Err(format!(
                    "job {id} of {} called while the earlier job {o} is pending",
                    p.openid
                ));
            }
        }
        Ok(())
    }

    fn can_write(&self, w: usize) -> bool {
        !self.workers[w].cut && self.awake(w)
    }

    fn pick_worker(&mut self) -> usize {
        self.rng.random_range(0..self.workers.len())
    }

    fn new_cid(&mut self) -> String {
        self.cids += 1;
        format!("c{}", self.cids)
    }

    /// A command reaches worker `w`'s intake.
    fn new_command(&mut self) -> Check {
        let w = self.pick_worker();
        if !self.can_write(w) || !self.workers[w].broker {
            return Ok(()); // stays in the broker
        }
        let openid = format!("p{}", self.rng.random_range(0..3));
        let appid = if self.rng.random_bool(0.3) {
            "wx2"
        } else {
            "wx1"
        };
        let roll = self.rng.random_range(0..100);
        let (op, bill) = if roll >= 92 {
            // a balance: a row with a key of its own (`~…`, never a client's)
            self.bills += 1;
            (Op::Balance, format!("~{}", self.bills))
        } else if roll < 20 && appid == "wx1" {
            let pays: Vec<String> = self
                .ob
                .rows
                .values()
                .filter(|r| {
                    r.params.op == Op::Pay && r.params.openid == openid && r.params.appid == appid
                })
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
            (
                if roll < 75 { Op::Pay } else { Op::Present },
                format!("B{}", self.bills),
            )
        };
        if self
            .ob
            .rows
            .values()
            .any(|r| r.params.op == op && r.params.bill_no.as_deref() == Some(&bill))
        {
            return Ok(());
        }
        let amt = self.rng.random_range(1..400);
        let p = params(op, &bill, &openid, appid, amt);
        if op.is_read() && !self.ob.fences.reads_as_rows {
            // reverted: answered from memory here, whoever holds the player
            let mut p = p;
            p.bill_no = None;
            let cmd = BalanceCmd {
                params: p,
                session_key: None,
                reply_to: "q".into(),
                correlation_id: self.new_cid(),
                received_at: self.now,
            };
            return self.feed(w, Event::Balance(Box::new(cmd)));
        }
        let id = self.ob.rows.keys().next_back().copied().unwrap_or(0) + 1;
        let key = format!("k-{}", self.rng.random::<u32>());
        let cid = self.new_cid();
        self.ob.rows.insert(
            id,
            Row {
                params: p,
                key: Some(key),
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
                claimed_by: None,
                epoch: 0,
                targets: BTreeMap::from([(cid.clone(), false)]),
                added: BTreeMap::from([(cid, 0)]),
            },
        );
        let me = self.workers[w].me;
        let gen = self.ob.take_player(me, id, self.now);
        self.log(|| format!("w{w} accepts {id} {op:?} {bill} {openid} {appid} gen {gen:?}"));
        if let Some(gen) = gen {
            let job = self.ob.rows[&id].job(id, gen);
            self.feed(w, Event::Accepted(job))?;
        }
        Ok(())
    }

    /// A game server re-sends a command (a new correlation id, a new session key).
    fn resend(&mut self) -> Check {
        let w = self.pick_worker();
        if self.ob.rows.is_empty() || !self.can_write(w) || !self.workers[w].broker {
            return Ok(());
        }
        // a balance sent again is a new delivery: a new row (new_command)
        let ids: Vec<i64> = self
            .ob
            .rows
            .iter()
            .filter(|(_, r)| !r.params.op.is_read())
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        let key = format!("k2-{}", self.rng.random::<u32>());
        let cid = self.new_cid();
        let me = self.workers[w].me;
        let now = self.now;
        let Some(r) = self.ob.rows.get_mut(&id) else {
            return Ok(());
        };
        match r.state {
            JobState::Pending => {
                r.added.entry(cid.clone()).or_insert(r.epoch);
                r.targets.insert(cid, false);
                r.key = Some(key);
                if r.claimed_by != Some(me) {
                    r.claimed_by = None;
                    return Ok(());
                }
                let p = r.player();
                let Some(gen) = self.ob.held_gen(me, &p) else {
                    return Ok(());
                };
                let job = self.ob.rows[&id].job(id, gen);
                self.log(|| format!("w{w} resend joins {id}"));
                self.feed(w, Event::Joined(job))
            }
            state if reopens_with_new_session_key(state, r.last_errcode, r.uncertain) => {
                r.state = JobState::Pending;
                r.key = Some(key);
                r.result = None;
                r.reopened_at = Some(now);
                r.next_attempt_at = now;
                r.claimed_by = None;
                r.epoch += 1;
                // the new final reply is owed to every target (guarantee 4)
                if self.ob.fences.reopen_targets {
                    for done in r.targets.values_mut() {
                        *done = false;
                    }
                }
                r.added.entry(cid.clone()).or_insert(r.epoch);
                r.targets.insert(cid, false);
                self.log(|| format!("w{w} resend re-opens {id}"));
                if let Some(gen) = self.ob.take_player(me, id, now) {
                    let job = self.ob.rows[&id].job(id, gen);
                    return self.feed(w, Event::Reopened(job));
                }
                Ok(())
            }
            _ => {
                let reply = r.result.clone().unwrap_or_default();
                let epoch = r.epoch;
                r.added.entry(cid.clone()).or_insert(epoch);
                r.targets.insert(cid.clone(), false);
                self.workers[w]
                    .tasks
                    .push(Task::Publish(cid, reply, epoch, id));
                Ok(())
            }
        }
    }

    /// `outbox retry` of an unknown job inside the window: re-opened, and its
    /// replies owed again.
    fn operator_retry(&mut self) -> Check {
        let now = self.now;
        let found = self.ob.rows.iter().find(|(_, r)| {
            r.state == JobState::Unknown
                && r.first_attempt_at.is_none_or(|f| now < f + WINDOW - HOUR)
        });
        let Some((&id, _)) = found else {
            return Ok(());
        };
        if let Some(r) = self.ob.rows.get_mut(&id) {
            r.state = JobState::Pending;
            r.result = None;
            r.reopened_at = Some(now);
            r.next_attempt_at = now;
            r.claimed_by = None;
            r.epoch += 1;
            for done in r.targets.values_mut() {
                *done = false;
            }
        }
        self.log(|| format!("operator retry {id}"));
        Ok(())
    }
}

#[path = "system_sim/run.rs"]
mod run;
