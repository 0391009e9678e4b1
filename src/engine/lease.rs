//! The engine's side of a shared outbox's player leases: which players it holds,
//! dropping the jobs of players whose lease ran out, and a step whose write was
//! fenced out. Kept apart because a SQLite outbox never takes these paths.

use std::collections::HashSet;

use super::{Engine, Entries, Phase};

impl Engine {
    /// The players (appid, openid) the engine holds jobs of (balance commands aside).
    pub fn players(&self) -> Vec<(String, String)> {
        let set: HashSet<(&str, &str)> = self
            .entries
            .values()
            .filter(|e| e.target.is_none())
            .map(|e| (e.job.params.appid.as_str(), e.job.params.openid.as_str()))
            .collect();
        set.into_iter()
            .map(|(a, o)| (a.to_string(), o.to_string()))
            .collect()
    }

    /// The player (appid, openid) of a held job.
    pub fn player_of(&self, id: i64) -> Option<(String, String)> {
        self.entries
            .get(&id)
            .map(|e| (e.job.params.appid.clone(), e.job.params.openid.clone()))
    }

    /// Drop the jobs of these players: waiting ones now, one under way when its
    /// step ends.
    pub(super) fn drop_players(&mut self, players: &HashSet<(String, String)>) {
        let hit: Vec<i64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.target.is_none()
                    && players.contains(&(e.job.params.appid.clone(), e.job.params.openid.clone()))
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
            }
        }
        for o in openids {
            self.sched.arm_head(&o, &Entries(&self.entries));
        }
    }

    /// A fenced pre-call mark or outcome: the step of `id` ended without effect.
    pub(super) fn lease_lost(&mut self, id: i64) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let player = (e.job.params.appid.clone(), e.job.params.openid.clone());
        match e.phase {
            // picked for a call that will not be made
            Phase::Marking | Phase::AwaitSlot => self.sched.no_call(),
            Phase::Recording(_) => {}
            // not the end of a step: handled like a lost player
            _ => {
                self.drop_players(&HashSet::from([player]));
                return;
            }
        }
        let (order, openid) = (e.order, player.1.clone());
        self.entries.remove(&id);
        self.sched.remove(order, &openid);
        self.drop_players(&HashSet::from([player]));
        self.sched.release(&openid, &Entries(&self.entries));
    }
}
