//! The system simulation's model of the shared PostgreSQL outbox: job rows, reply
//! targets, player leases with their generation (fencing token) judged on the
//! database's clock, and the statements the workers run against it — intake,
//! the coordinator's look (renew, give back, take over, claim), and the fenced
//! pre-call mark, outcome and give-back — written after the real SQL in
//! `src/outbox/postgres/`.

use std::collections::{BTreeMap, HashMap, HashSet};

use midas_worker::command::{Params, Reply};
use midas_worker::engine::job::{Job, JobState};
use midas_worker::engine::{HeldPlayer, PreCallMark, Record, Update};
use midas_worker::secret::Secret;

pub type Player = (String, String);

#[derive(Debug, Clone)]
pub struct Row {
    pub params: Params,
    pub key: Option<String>,
    pub state: JobState,
    pub calls: u32,
    pub attempts: u32,
    pub uncertain: bool,
    pub first_attempt_at: Option<i64>,
    pub next_attempt_at: i64,
    pub received_at: i64,
    pub reopened_at: Option<i64>,
    pub last_errcode: Option<i64>,
    pub result: Option<Vec<u8>>,
    pub claimed_by: Option<u32>,
    /// Re-opens so far: a reply may change only across one.
    pub epoch: u32,
    /// Reply targets (correlation ids) and whether each is confirmed.
    pub targets: BTreeMap<String, bool>,
    /// The epoch each target asked in: it is owed a reply of that epoch or later.
    pub added: BTreeMap<String, u32>,
}

impl Row {
    pub fn player(&self) -> Player {
        (self.params.appid.clone(), self.params.openid.clone())
    }

    /// Since when this row has been pending (arrival, or its last re-open).
    pub fn pending_since(&self) -> i64 {
        self.reopened_at.unwrap_or(self.received_at)
    }

    pub fn job(&self, id: i64, gen: i64) -> Job {
        let mut j = Job::new(
            id,
            self.params.clone(),
            self.key.clone().map(Secret::new),
            self.received_at,
        );
        j.attempts = self.attempts;
        j.calls = self.calls;
        j.uncertain = self.uncertain;
        j.first_attempt_at = self.first_attempt_at;
        j.next_attempt_at = self.next_attempt_at;
        j.reopened_at = self.reopened_at;
        j.last_errcode = self.last_errcode;
        j.lease_gen = gen;
        j
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub owner: u32,
    pub expires: i64,
    pub gen: i64,
}

/// What a fenced write is checked against. Reverting a fix in RELIABILITY.md
/// switches one of these off.
#[derive(Debug, Clone, Copy)]
pub struct Fences {
    /// Marks, outcomes and give-backs name the generation they were decided under.
    pub generation: bool,
    /// A balance is a row run under its player's lease (off: the worker that
    /// received it answers it from memory, as before issue #20's fix).
    pub reads_as_rows: bool,
    /// A re-send with a new session_key that re-opens a job owes the new final
    /// reply to every target of the job, not only its own.
    pub reopen_targets: bool,
}

#[derive(Debug)]
pub struct Outbox {
    pub rows: BTreeMap<i64, Row>,
    pub leases: HashMap<Player, Lease>,
    pub next_gen: i64,
    pub relay: Option<(u32, i64)>,
    pub lease_ms: i64,
    pub call_ms: i64,
    pub fences: Fences,
}

/// What a landed outcome asks the publisher to send.
pub struct Landed {
    pub replies: Vec<(String, Vec<u8>, u32)>,
    /// A guarded final outcome found a newer session_key: re-opened with it.
    pub reopened_with: Option<String>,
}

impl Outbox {
    pub fn new(lease_ms: i64, call_ms: i64, fences: Fences) -> Outbox {
        Outbox {
            rows: BTreeMap::new(),
            leases: HashMap::new(),
            next_gen: 1,
            relay: None,
            lease_ms,
            call_ms,
            fences,
        }
    }

    fn draw(&mut self) -> i64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn pending_of(&self, p: &Player) -> impl Iterator<Item = (&i64, &Row)> {
        let p = p.clone();
        self.rows
            .iter()
            .filter(move |(_, r)| r.state == JobState::Pending && r.player() == p)
    }

    /// Intake's TAKE_LEASE and the claim after it: `Some(gen)` when `me` runs job
    /// `id` now (it holds the lease and has every other pending job of the player).
    pub fn take_player(&mut self, me: u32, id: i64, now: i64) -> Option<i64> {
        let p = self.rows.get(&id)?.player();
        let gen = match self.leases.get(&p).copied() {
            Some(l) if l.owner == me => l.gen,
            Some(l) if l.expires > now => return None,
            _ => self.draw(),
        };
        self.leases.insert(
            p.clone(),
            Lease {
                owner: me,
                expires: now + self.lease_ms,
                gen,
            },
        );
        let others_mine = self
            .pending_of(&p)
            .all(|(&o, r)| o == id || r.claimed_by == Some(me));
        if others_mine {
            if let Some(r) = self.rows.get_mut(&id) {
                r.claimed_by = Some(me);
            }
            return Some(gen);
        }
        let ids: Vec<i64> = self
            .pending_of(&p)
            .filter(|(_, r)| r.claimed_by != Some(me))
            .map(|(&o, _)| o)
            .collect();
        for o in ids {
            if let Some(r) = self.rows.get_mut(&o) {
                r.claimed_by = None;
            }
        }
        None
    }

    /// The generation `me` holds `p` at now, if it does.
    pub fn held_gen(&self, me: u32, p: &Player) -> Option<i64> {
        self.leases.get(p).filter(|l| l.owner == me).map(|l| l.gen)
    }

    /// The coordinator's look: renew (when `renew`), lost players, give back idle
    /// ones, unclaim what the engine does not hold, take over expired players,
    /// claim their unclaimed jobs. Answers (lost, claimed jobs).
    pub fn tick(
        &mut self,
        me: u32,
        held: &[HeldPlayer],
        renew: bool,
        now: i64,
    ) -> (Vec<HeldPlayer>, Vec<Job>) {
        let mut lost: Vec<HeldPlayer> = Vec::new();
        if renew {
            let mut owned = HashMap::new();
            for (p, l) in self.leases.iter_mut() {
                if l.owner == me {
                    l.expires = now + self.lease_ms;
                    owned.insert(p.clone(), l.gen);
                }
            }
            // by generation, like the coordinator's renewal
            lost = held
                .iter()
                .filter(|h| owned.get(&(h.appid.clone(), h.openid.clone())) != Some(&h.gen))
                .cloned()
                .collect();
            let pending: HashSet<Player> = self
                .rows
                .values()
                .filter(|r| r.state == JobState::Pending)
                .map(Row::player)
                .collect();
            self.leases
                .retain(|p, l| l.owner != me || pending.contains(p));
            let held: HashSet<Player> = held
                .iter()
                .map(|h| (h.appid.clone(), h.openid.clone()))
                .collect();
            for r in self.rows.values_mut() {
                if r.claimed_by == Some(me)
                    && r.state == JobState::Pending
                    && !held.contains(&r.player())
                {
                    r.claimed_by = None;
                }
            }
        }
        for r in self.rows.values_mut() {
            if r.claimed_by == Some(me)
                && r.state == JobState::Pending
                && lost.iter().any(|h| {
                    (h.appid.as_str(), h.openid.as_str())
                        == (r.params.appid.as_str(), r.params.openid.as_str())
                })
            {
                r.claimed_by = None;
            }
        }
        if renew {
            let mut cands: Vec<(i64, Player)> = Vec::new();
            for (&id, r) in &self.rows {
                let p = r.player();
                if r.state == JobState::Pending
                    && self.leases.get(&p).is_none_or(|l| l.expires <= now)
                    && !cands.iter().any(|(_, q)| *q == p)
                {
                    cands.push((id, p));
                }
            }
            for (_, p) in cands {
                let gen = match self.leases.get(&p) {
                    Some(l) if l.owner == me => l.gen,
                    _ => self.draw(),
                };
                self.leases.insert(
                    p.clone(),
                    Lease {
                        owner: me,
                        expires: now + self.lease_ms,
                        gen,
                    },
                );
                for r in self.rows.values_mut() {
                    if r.state == JobState::Pending && r.player() == p {
                        r.claimed_by = None;
                    }
                }
            }
        }
        let mut jobs = Vec::new();
        let leases = &self.leases;
        for (&id, r) in self.rows.iter_mut() {
            if r.state != JobState::Pending || r.claimed_by.is_some() {
                continue;
            }
            // only under a lease that has not run out, like the coordinator's claim
            if let Some(l) = leases
                .get(&r.player())
                .filter(|l| l.owner == me && l.expires > now)
            {
                r.claimed_by = Some(me);
                jobs.push(r.job(id, l.gen));
            }
        }
        (lost, jobs)
    }

    /// The relay lease: taken or renewed when `can` (the broker is up), given up
    /// otherwise. `true`: `me` relays now.
    pub fn relay_lease(&mut self, me: u32, can: bool, now: i64) -> bool {
        match self.relay {
            Some((o, _)) if o == me && !can => {
                self.relay = None;
                false
            }
            _ if !can => false,
            Some((o, e)) if o != me && e > now => false,
            _ => {
                self.relay = Some((me, now + self.lease_ms));
                true
            }
        }
    }

    fn fenced(&self, me: u32, id: i64, gen: i64) -> bool {
        let Some(r) = self.rows.get(&id) else {
            return true;
        };
        match self.leases.get(&r.player()) {
            Some(l) => l.owner != me || (self.fences.generation && l.gen != gen),
            None => true,
        }
    }

    /// The pre-call mark (or its refresh, which counts no call): `true` when it
    /// landed.
    pub fn mark(&mut self, me: u32, m: &PreCallMark, now: i64) -> bool {
        let (id, at) = (m.id, m.at);
        if self.fenced(me, id, m.gen) {
            return false;
        }
        let Some(r) = self.rows.get(&id) else {
            return false;
        };
        let expires = self.leases.get(&r.player()).map_or(0, |l| l.expires);
        if r.state != JobState::Pending || expires <= now + self.call_ms {
            return false;
        }
        if let Some(r) = self.rows.get_mut(&id) {
            if !m.refresh {
                r.calls += 1;
            }
            r.first_attempt_at.get_or_insert(at);
        }
        true
    }

    /// An outcome: `None` when fenced out (the attempts are kept for the audit;
    /// the model keeps only their effect on `uncertain`, which the job's row does
    /// not take).
    pub fn record(&mut self, me: u32, r: &Record) -> Result<Option<Landed>, String> {
        if self.fenced(me, r.job_id, r.lease_gen) {
            return Ok(None);
        }
        let Some(row) = self.rows.get_mut(&r.job_id) else {
            return Ok(None);
        };
        if row.state != JobState::Pending {
            return Ok(None);
        }
        row.attempts = r.attempts_total;
        if row.first_attempt_at.is_none() {
            row.first_attempt_at = r.first_attempt_at;
        }
        row.uncertain |= r.uncertain;
        if let Some(a) = r.rows.first() {
            row.last_errcode = a.answer.errcode;
        }
        match &r.update {
            Update::Retry { next_attempt_at } => {
                row.next_attempt_at = *next_attempt_at;
                Ok(Some(Landed {
                    replies: Vec::new(),
                    reopened_with: None,
                }))
            }
            Update::Final { .. }
                if r.session_guard.as_ref().is_some_and(|g| {
                    row.key.is_some() && row.key.as_deref() != g.used.as_ref().map(Secret::expose)
                }) =>
            {
                // a re-send brought a new session_key meanwhile: re-opened with it
                row.next_attempt_at = r.now;
                row.reopened_at = Some(r.now);
                Ok(Some(Landed {
                    replies: Vec::new(),
                    reopened_with: row.key.clone(),
                }))
            }
            Update::Final { state, reply } => {
                let _: Reply = serde_json::from_slice(reply).map_err(|e| e.to_string())?;
                row.state = *state;
                row.key = None;
                row.result = Some(reply.clone());
                let replies = row
                    .targets
                    .iter()
                    .filter(|(_, done)| !**done)
                    .map(|(c, _)| (c.clone(), reply.clone(), row.epoch))
                    .collect();
                Ok(Some(Landed {
                    replies,
                    reopened_with: None,
                }))
            }
        }
    }

    /// A give-back after a fenced write of generation `gen`.
    pub fn release(&mut self, me: u32, p: &Player, gen: i64) {
        let other_gen = self
            .leases
            .get(p)
            .is_some_and(|l| l.owner == me && self.fences.generation && l.gen != gen);
        if !other_gen {
            for r in self.rows.values_mut() {
                if r.claimed_by == Some(me) && r.state == JobState::Pending && r.player() == *p {
                    r.claimed_by = None;
                }
            }
        }
        if self
            .leases
            .get(p)
            .is_some_and(|l| l.owner == me && (!self.fences.generation || l.gen == gen))
        {
            self.leases.remove(p);
        }
    }
}
