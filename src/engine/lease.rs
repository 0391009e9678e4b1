//! The engine's side of a shared outbox's player leases: which players it holds,
//! the lease generation (fencing token) each player's jobs were loaded under,
//! dropping the jobs of players whose lease ran out, and a step whose write was
//! fenced out. Kept apart because a SQLite outbox never takes these paths (its
//! jobs all carry generation 0).
//!
//! Generations: every take of a player's lease gives it a higher generation, and
//! every job the outbox hands over carries the generation it was loaded under.
//! A job of a newer generation than the engine knows for its player means this
//! worker took the player (back): every in-memory step of an older generation is
//! dropped (one under way ends when its write is fenced out) and the outbox's
//! copy of the jobs — calls, attempts, uncertain — is what runs. A job of an
//! older generation is a stale delivery and is ignored.

use std::collections::{HashMap, HashSet};

use super::job::Job;
use super::{Action, Engine, Entries, Phase};

/// A player whose jobs the engine holds, with the lease generation they run
/// under (the newest it knows; 0 on a SQLite outbox). The coordinator renews by
/// it: a lease found at another generation, or not at all, is reported lost
/// *at this generation*, so jobs a newer take brought in are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeldPlayer {
    pub appid: String,
    pub openid: String,
    pub gen: i64,
}

impl Engine {
    /// The players the engine holds jobs of (balance commands aside).
    pub fn players(&self) -> Vec<HeldPlayer> {
        let mut held: HashMap<(&str, &str), i64> = HashMap::new();
        for e in self.entries.values().filter(|e| e.target.is_none()) {
            let key = (e.job.params.appid.as_str(), e.job.params.openid.as_str());
            let g = held.entry(key).or_insert(e.job.lease_gen);
            *g = (*g).max(e.job.lease_gen);
        }
        held.into_iter()
            .map(|((appid, openid), gen)| {
                let known = self.gens.get(&(appid.to_string(), openid.to_string()));
                HeldPlayer {
                    appid: appid.to_string(),
                    openid: openid.to_string(),
                    gen: known.copied().unwrap_or(gen).max(gen),
                }
            })
            .collect()
    }

    /// The player (appid, openid) of a held job.
    pub fn player_of(&self, id: i64) -> Option<(String, String)> {
        self.entries
            .get(&id)
            .map(|e| (e.job.params.appid.clone(), e.job.params.openid.clone()))
    }

    /// The newest lease generation the engine knows for a player.
    pub fn generation(&self, appid: &str, openid: &str) -> Option<i64> {
        self.gens
            .get(&(appid.to_string(), openid.to_string()))
            .copied()
    }

    /// Whether a job handed over by the outbox may be held: `false` for a copy of
    /// an older generation than the newest known for its player. A newer one
    /// starts a new tenure: the older generation's in-memory steps are dropped.
    pub(super) fn admit(&mut self, job: &Job) -> bool {
        let key = (job.params.appid.clone(), job.params.openid.clone());
        if self.released.get(&key).is_some_and(|&g| job.lease_gen <= g) {
            // dropped at this generation: its jobs go to whoever takes the
            // player next (a new generation), in arrival order
            return false;
        }
        self.released.remove(&key);
        match self.gens.get(&key).copied() {
            Some(g) if job.lease_gen < g => false,
            Some(g) if job.lease_gen == g => true,
            known => {
                if known.is_some() {
                    self.new_tenure(&key, job.lease_gen);
                }
                self.gens.insert(key, job.lease_gen);
                true
            }
        }
    }

    /// `None` when an entry of an older generation (or of a lost player) holds the
    /// job's id with a step under way: the job waits as its successor. Otherwise
    /// the job back, to be added or joined.
    pub(super) fn supersede(&mut self, job: Job) -> Option<Job> {
        match self.entries.get_mut(&job.id) {
            Some(e) if e.target.is_none() && (e.job.lease_gen < job.lease_gen || e.lost) => {
                e.lost = true;
                e.reopen = None;
                e.successor = Some(job);
                None
            }
            _ => Some(job),
        }
    }

    /// This worker took `player` at generation `gen`: its jobs of older
    /// generations are dropped (waiting ones now, one under way when its step ends).
    fn new_tenure(&mut self, player: &(String, String), gen: i64) {
        let hit: Vec<i64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.target.is_none()
                    && e.job.lease_gen < gen
                    && e.job.params.appid == player.0
                    && e.job.params.openid == player.1
            })
            .map(|(id, _)| *id)
            .collect();
        for id in hit {
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            if e.phase == Phase::Waiting {
                let (order, openid) = (e.order, e.job.params.openid.clone());
                self.entries.remove(&id);
                self.sched.remove(order, &openid);
            } else {
                e.lost = true;
                e.reopen = None;
            }
        }
        self.sched.arm_head(&player.1, &Entries(&self.entries));
    }

    /// Forget the generations of players the engine holds nothing of (bounded
    /// memory; a stale delivery for such a player is fenced by the outbox).
    pub(super) fn prune_gens(&mut self) {
        let known = self.gens.len().max(self.released.len());
        if known <= 1024 || known <= 2 * self.entries.len() {
            return;
        }
        let held: HashSet<(String, String)> = self
            .players()
            .into_iter()
            .map(|p| (p.appid, p.openid))
            .collect();
        self.gens.retain(|k, _| held.contains(k));
        self.released.retain(|k, _| held.contains(k));
    }

    /// Drop the jobs these players' leases brought in, up to the generation each
    /// was lost at: waiting ones now, one under way when its step ends. Jobs of a
    /// newer generation (this worker took the player again meanwhile) are kept.
    pub(super) fn drop_players(&mut self, players: &[HeldPlayer]) {
        let mut lost: HashMap<(String, String), i64> = HashMap::new();
        for p in players {
            let g = lost
                .entry((p.appid.clone(), p.openid.clone()))
                .or_insert(p.gen);
            *g = (*g).max(p.gen);
        }
        for (p, &g) in &lost {
            let r = self.released.entry(p.clone()).or_insert(g);
            *r = (*r).max(g);
        }
        let hit: Vec<i64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.target.is_none()
                    && lost
                        .get(&(e.job.params.appid.clone(), e.job.params.openid.clone()))
                        .is_some_and(|&g| e.job.lease_gen <= g)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut openids = HashSet::new();
        for id in hit {
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            if e.phase == Phase::Waiting {
                let (order, openid) = (e.order, e.job.params.openid.clone());
                self.entries.remove(&id);
                self.sched.remove(order, &openid);
                openids.insert(openid);
            } else {
                e.lost = true;
                e.reopen = None;
                e.successor = None;
            }
        }
        for o in openids {
            self.sched.arm_head(&o, &Entries(&self.entries));
        }
    }

    /// The step of `id` ended for good here: the entry goes, and a successor (the
    /// copy of a newer generation) takes its place. The caller releases the player.
    pub(super) fn end_entry(&mut self, id: i64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        self.sched.remove(e.order, &e.job.params.openid);
        if let Some(next) = e.successor {
            self.add(next);
        }
    }

    /// A fenced pre-call mark or outcome (or a mark confirmed too late to call
    /// under its fence): the step of `id` ended without effect. A step of an
    /// older generation than the player's newest just ends. Otherwise the player
    /// is lost here: its jobs are dropped and it is given back (fenced by the
    /// step's generation, so a newer take of this worker is never given away).
    pub(super) fn lease_lost(&mut self, id: i64, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let player = (e.job.params.appid.clone(), e.job.params.openid.clone());
        let gen = e.job.lease_gen;
        let stale = self.gens.get(&player).is_some_and(|&g| g > gen);
        let held = HeldPlayer {
            appid: player.0.clone(),
            openid: player.1.clone(),
            gen,
        };
        match e.phase {
            // picked for a call that will not be made
            Phase::Marking | Phase::AwaitSlot => self.sched.no_call(),
            Phase::Recording(_) => {}
            // not the end of a step: handled like a lost player
            _ => {
                if !stale {
                    self.drop_players(&[held]);
                }
                return;
            }
        }
        let openid = player.1.clone();
        self.end_entry(id);
        if !stale {
            self.drop_players(&[held]);
            out.push(Action::GiveBack {
                appid: player.0,
                openid: player.1,
                gen,
            });
        }
        self.sched.release(&openid, &Entries(&self.entries));
    }
}
