//! The checks made when a marked job's call is about to start. On a shared
//! outbox the pre-call mark's fence covers only a call that starts within the
//! fence margin of its check, so a mark confirmed later makes no call; and the
//! job's deadline (the 47 h bill_no window included) is judged again, since a
//! mark retried through an outbox outage can land long after the job was picked.
//! Kept apart from the engine's event handling: these are the last decisions
//! before money can move.

use super::job::{self, JobState};
use super::{context, final_update, record, Action, Engine, Phase, FENCE_SLACK_MS};

impl Engine {
    pub(super) fn marked(
        &mut self,
        id: i64,
        checked_at: Option<i64>,
        now: i64,
        out: &mut Vec<Action>,
    ) {
        let Some(e) = self
            .entries
            .get_mut(&id)
            .filter(|e| e.phase == Phase::Marking)
        else {
            return;
        };
        e.fence_at = checked_at;
        if e.lost {
            // the player went to another worker (or a newer generation) meanwhile
            self.lease_lost(id, out);
            return;
        }
        if self.may_call(id, now, out) {
            self.begin_call(id, out);
        }
    }

    /// A marked job that waited for a call slot on a shared outbox, now about to
    /// take one: when its mark's fence no longer covers a call starting now (it
    /// waited longer than the fence's margin), the fence is checked again by a
    /// refresh mark — which does not count a call again, the first mark did — and
    /// the call waits for it. `true` when such a refresh was asked for.
    pub(super) fn refresh_if_stale(&mut self, id: i64, now: i64, out: &mut Vec<Action>) -> bool {
        let margin = self.cfg.fence_margin_ms;
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        let stale = match (e.fence_at, margin) {
            (Some(t), Some(m)) => e.target.is_none() && now + FENCE_SLACK_MS >= t + m,
            _ => false,
        };
        if !stale {
            return false;
        }
        e.phase = Phase::Marking;
        out.push(e.mark(id, now, true));
        true
    }

    /// Just before a marked job's call starts: `false` when it must not start
    /// after all (the step ended here). On a shared outbox the mark's fence covers
    /// a call that starts within the margin of its check: a mark confirmed later
    /// (a slow commit) is handled as a lost lease. And the bill_no window is
    /// judged again: a mark retried through an outbox outage can land hours after
    /// the job was picked, and no call may go out past the deadline.
    pub(super) fn may_call(&mut self, id: i64, now: i64, out: &mut Vec<Action>) -> bool {
        let Some(e) = self.entries.get(&id) else {
            return false;
        };
        if e.target.is_some() {
            return true;
        }
        let late = match (e.fence_at, self.cfg.fence_margin_ms) {
            (Some(t), Some(m)) => now + FENCE_SLACK_MS >= t + m,
            _ => false,
        };
        if late {
            self.lease_lost(id, out);
            return false;
        }
        let cfg = &self.cfg;
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        // (a `balance`/`query_order` row has no bill_no window: job::decide_read
        // ends it past its own deadline)
        let read = e.job.params.op.is_read();
        if !read && job::deadline(&e.job, &cfg.retry).is_some_and(|d| now >= d) {
            let ctx = context(cfg, &e.job.params.appid, false);
            let reply = job::exhausted(&e.job, None, now, ctx);
            self.sched.no_call();
            e.phase = Phase::Recording(None);
            out.push(Action::Record(record(
                &e.job,
                Vec::new(),
                final_update(JobState::Unknown, &reply),
                now,
            )));
            return false;
        }
        true
    }
}
