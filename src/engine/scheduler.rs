//! Which job may call Midas next: per-player order, call slots and per-app rate.
//!
//! Pure bookkeeping with the time passed in, so the engine's simulation drives it
//! through any interleaving without a runtime or a clock:
//! - each openid has a queue ordered by arrival ([`Order`]); only its head may run,
//!   and only one step of that openid is under way at a time ("busy");
//! - a job waits for its `next_attempt_at`: a wake-up is kept for the head of every
//!   idle queue, and re-armed whenever a queue's head or busy flag changes, so a job
//!   that joins at the front of a busy player's queue is never left without one;
//! - at most `max_in_flight` calls at once, at most `max_rps` calls a second per app;
//! - a picked job first makes its pre-call mark durable and only then calls. With
//!   `ahead` > 0, up to that many jobs may be picked beyond the free call slots, so
//!   marks are written while other calls are out and a slot that frees goes
//!   straight to a marked job ([`Scheduler::try_call`]) instead of first waiting
//!   for a mark's commit. With `ahead` = 0 a pick always finds its slot free.
//!
//! The limits come with each call ([`Limits`], from the engine's config); the
//! scheduler keeps only what it counts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};

/// Arrival order within a player's queue. Outbox jobs are ordered by their row id;
/// a `balance` command (no row) sorts after the last row accepted before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order {
    pub row: i64,
    pub seq: u32,
}

impl Order {
    pub fn row(id: i64) -> Order {
        Order { row: id, seq: 0 }
    }
}

/// A per-appid token bucket on the engine's clock (unix ms).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: i64,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    /// openid → (arrival order → job id)
    queues: HashMap<String, BTreeMap<Order, i64>>,
    busy: HashSet<String>,
    timers: BinaryHeap<Reverse<(i64, i64)>>,
    /// Jobs whose time has come, waiting for a call slot or a rate token.
    ready: VecDeque<i64>,
    /// Call slots taken (calls out, and the balance fetch after a duplicate).
    calls: usize,
    /// Picked jobs not calling yet: marking, or marked and waiting for a slot.
    pending: usize,
    buckets: HashMap<String, Bucket>,
}

/// The limits the scheduler applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls out at once.
    pub max_in_flight: usize,
    /// Picks allowed beyond the free call slots (their marks written ahead).
    pub ahead: usize,
    /// Calls a second per appid.
    pub max_rps: u32,
}

/// What the scheduler needs to know about a job it holds.
pub trait View {
    fn openid(&self, id: i64) -> Option<&str>;
    fn appid(&self, id: i64) -> Option<&str>;
    /// `Some(next_attempt_at)` when the job waits for a call; `None` while a step of
    /// it is under way or it is gone.
    fn waiting_until(&self, id: i64) -> Option<i64>;
}

impl Scheduler {
    /// Add a job to its player's queue and arm a wake-up if it is now the head.
    pub fn insert(&mut self, id: i64, order: Order, openid: &str, at: i64) {
        let q = self.queues.entry(openid.to_string()).or_default();
        q.insert(order, id);
        if !self.busy.contains(openid) && q.values().next() == Some(&id) {
            self.timers.push(Reverse((at, id)));
        }
    }

    /// Remove a finished job from its player's queue.
    pub fn remove(&mut self, order: Order, openid: &str) {
        if let Some(q) = self.queues.get_mut(openid) {
            q.remove(&order);
            if q.is_empty() {
                self.queues.remove(openid);
            }
        }
    }

    /// The step of a job of `openid` ended: the player is free; wake its head.
    pub fn release(&mut self, openid: &str, view: &impl View) {
        self.busy.remove(openid);
        self.arm_head(openid, view);
    }

    /// A call returned: its slot is free.
    pub fn call_returned(&mut self) {
        self.calls = self.calls.saturating_sub(1);
    }

    /// A picked job is ready to call: it takes a call slot if one is free (`false`:
    /// it waits for [`Scheduler::call_returned`]).
    pub fn try_call(&mut self, limits: &Limits) -> bool {
        if self.calls >= limits.max_in_flight {
            return false;
        }
        self.pending = self.pending.saturating_sub(1);
        self.calls += 1;
        true
    }

    /// Re-arm the wake-up of `openid`'s head (after its head or its time changed).
    pub fn arm_head(&mut self, openid: &str, view: &impl View) {
        if self.busy.contains(openid) {
            return;
        }
        if let Some(&head) = self.queues.get(openid).and_then(|q| q.values().next()) {
            if let Some(at) = view.waiting_until(head) {
                self.timers.push(Reverse((at, head)));
            }
        }
    }

    pub fn is_busy(&self, openid: &str) -> bool {
        self.busy.contains(openid)
    }

    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Picked jobs not calling yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn is_head(&self, id: i64, openid: &str) -> bool {
        self.queues
            .get(openid)
            .and_then(|q| q.values().next())
            .is_some_and(|&h| h == id)
    }

    /// Pick the next job allowed to start now, if any: it is the head of an idle
    /// player, due, a rate token is free, and a call slot is free or (with `ahead`)
    /// will be soon. The player is busy from here until [`Scheduler::release`]; the
    /// job is pending until [`Scheduler::try_call`] gives it a slot or
    /// [`Scheduler::no_call`] says it makes no call.
    pub fn next(&mut self, now: i64, limits: &Limits, view: &impl View) -> Option<i64> {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if view.waiting_until(id) == Some(at) {
                self.ready.push_back(id);
            }
        }
        while self.calls + self.pending < limits.max_in_flight + limits.ahead {
            let &id = self.ready.front()?;
            let (Some(openid), Some(appid)) = (view.openid(id), view.appid(id)) else {
                self.ready.pop_front();
                continue;
            };
            let due = view.waiting_until(id).is_some_and(|at| at <= now);
            if !due || self.busy.contains(openid) || !self.is_head(id, openid) {
                // stale: its head gets (or got) a wake-up of its own
                self.ready.pop_front();
                continue;
            }
            let rate = f64::from(limits.max_rps.max(1));
            let b = self.buckets.entry(appid.to_string()).or_insert(Bucket {
                tokens: rate,
                last: now,
            });
            let dt = (now - b.last).max(0) as f64 / 1000.0;
            b.last = now;
            b.tokens = (b.tokens + dt * rate).min(rate);
            if b.tokens < 1.0 {
                // try again when a token is there
                let wait = ((1.0 - b.tokens) / rate * 1000.0).ceil() as i64;
                self.timers.push(Reverse((now + wait.max(1), i64::MIN)));
                return None;
            }
            b.tokens -= 1.0;
            self.ready.pop_front();
            self.busy.insert(openid.to_string());
            self.pending += 1;
            return Some(id);
        }
        None
    }

    /// A picked job makes no call after all (it ended at its deadline, or its mark
    /// was fenced out): it is no longer pending.
    pub fn no_call(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// The earliest wake-up, if any (stale ones included: waking early is harmless).
    pub fn next_wake(&self) -> Option<i64> {
        if !self.ready.is_empty() {
            // ready jobs wait for a slot: a returning call wakes the engine
            return self.timers.peek().map(|Reverse((at, _))| *at);
        }
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Every idle player whose head waits has a wake-up at or before its time
    /// (the simulation checks this after every step).
    pub fn check_wakeups(&self, view: &impl View) -> Result<(), String> {
        let armed: HashMap<i64, i64> = self.timers.iter().map(|Reverse((at, id))| (*id, *at)).fold(
            HashMap::new(),
            |mut m, (id, at)| {
                let e = m.entry(id).or_insert(at);
                *e = (*e).min(at);
                m
            },
        );
        for (openid, q) in &self.queues {
            if self.busy.contains(openid) {
                continue;
            }
            let Some(&head) = q.values().next() else {
                continue;
            };
            let Some(at) = view.waiting_until(head) else {
                continue;
            };
            let ok = self.ready.contains(&head) || armed.get(&head).is_some_and(|&t| t <= at);
            if !ok {
                return Err(format!(
                    "job {head} heads the queue of {openid} with no wake-up (due {at})"
                ));
            }
        }
        Ok(())
    }

    /// The lowest-order job id of `openid`'s queue.
    pub fn head(&self, openid: &str) -> Option<i64> {
        self.queues
            .get(openid)
            .and_then(|q| q.values().next().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(max_in_flight: usize, ahead: usize, max_rps: u32) -> Limits {
        Limits {
            max_in_flight,
            ahead,
            max_rps,
        }
    }

    #[derive(Default)]
    struct V(HashMap<i64, (String, Option<i64>)>);

    impl View for V {
        fn openid(&self, id: i64) -> Option<&str> {
            self.0.get(&id).map(|(o, _)| o.as_str())
        }
        fn appid(&self, id: i64) -> Option<&str> {
            self.0.get(&id).map(|_| "wx")
        }
        fn waiting_until(&self, id: i64) -> Option<i64> {
            self.0.get(&id).and_then(|(_, w)| *w)
        }
    }

    #[test]
    fn an_earlier_job_joining_a_busy_player_runs_next_and_the_later_one_after() {
        let mut s = Scheduler::default();
        let mut v = V::default();
        v.0.insert(5, ("p".into(), Some(0)));
        s.insert(5, Order::row(5), "p", 0);
        assert_eq!(s.next(0, &lim(8, 0, 100), &v), Some(5));
        assert!(s.try_call(&lim(8, 0, 100)));
        // job 5 is calling; job 3 (re-opened) joins at the front
        v.0.insert(5, ("p".into(), None));
        v.0.insert(3, ("p".into(), Some(0)));
        s.insert(3, Order::row(3), "p", 0);
        assert_eq!(s.next(0, &lim(8, 0, 100), &v), None, "the player is busy");
        // job 5's call ends with a retry in 100 ms
        s.call_returned();
        v.0.insert(5, ("p".into(), Some(100)));
        s.release("p", &v);
        s.check_wakeups(&v).expect("the head has a wake-up");
        assert_eq!(
            s.next(1, &lim(8, 0, 100), &v),
            Some(3),
            "the earlier job goes first"
        );
        assert!(s.try_call(&lim(8, 0, 100)));
        v.0.insert(3, ("p".into(), None));
        s.call_returned();
        s.remove(Order::row(3), "p");
        v.0.remove(&3);
        s.release("p", &v);
        s.check_wakeups(&v).expect("job 5 has a wake-up again");
        assert_eq!(s.next(100, &lim(8, 0, 100), &v), Some(5));
    }

    #[test]
    fn slots_and_rate_bound_calls() {
        let mut s = Scheduler::default();
        let mut v = V::default();
        for id in 1..=5 {
            let o = format!("p{id}");
            v.0.insert(id, (o.clone(), Some(0)));
            s.insert(id, Order::row(id), &o, 0);
        }
        assert!(s.next(0, &lim(2, 0, 100), &v).is_some());
        assert!(s.next(0, &lim(2, 0, 100), &v).is_some());
        assert_eq!(s.next(0, &lim(2, 0, 100), &v), None, "two slots");
        assert!(s.try_call(&lim(2, 0, 100)) && s.try_call(&lim(2, 0, 100)));
        s.call_returned();
        assert!(s.next(0, &lim(2, 0, 1), &v).is_none() || s.calls() <= 2);
    }

    #[test]
    fn picks_run_ahead_of_the_slots_by_at_most_ahead_and_calls_never_exceed_the_slots() {
        let mut s = Scheduler::default();
        let l = lim(3, 2, 100);
        let mut v = V::default();
        for id in 1..=10 {
            let o = format!("p{id}");
            v.0.insert(id, (o.clone(), Some(0)));
            s.insert(id, Order::row(id), &o, 0);
        }
        let picked: Vec<i64> = std::iter::from_fn(|| s.next(0, &l, &v)).collect();
        assert_eq!(picked.len(), 5, "3 slots + 2 ahead");
        // all five marked: three call, two wait for a slot
        let calling = (0..5).filter(|_| s.try_call(&l)).count();
        assert_eq!((calling, s.calls(), s.pending()), (3, 3, 2));
        assert_eq!(s.next(0, &l, &v), None, "nothing more is picked");
        // a call returns: its slot goes to a marked job, not to a new pick
        s.call_returned();
        assert!(s.try_call(&l));
        assert_eq!((s.calls(), s.pending()), (3, 1));
        assert!(s.next(0, &l, &v).is_some(), "room ahead again");
        assert!(!s.try_call(&l), "no slot for it yet");
    }
}
