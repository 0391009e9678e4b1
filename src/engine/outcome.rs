//! What happens after a call: the answer decided ([`job::decide`]: retry,
//! final, or a duplicate whose balance is fetched), and the outcome's write
//! landing — the player is then free for its next job, or the job runs again
//! (re-opened meanwhile, or written as a re-open with a newer session_key).

use super::job::{self, Decision, JobState};
use super::record::AttemptRow;
use super::*;

impl Engine {
    pub(super) fn answered(&mut self, id: i64, answer: Answer, now: i64, out: &mut Vec<Action>) {
        let jitter = self.jitter();
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.phase != Phase::Calling {
            return;
        }
        let appid = e.job.params.appid.as_str();
        let streak = self.transient_streak.get_mut(appid);
        let recovered = match (answer.class, streak) {
            (OutcomeClass::Transient | OutcomeClass::TokenInvalid, Some(n)) => {
                *n += 1;
                false
            }
            (OutcomeClass::Transient | OutcomeClass::TokenInvalid, None) => {
                self.transient_streak.insert(appid.to_string(), 1);
                false
            }
            (_, Some(n)) => std::mem::take(n) >= OUTAGE_STREAK,
            (_, None) => false,
        };
        if recovered {
            let appid = appid.to_string();
            self.end_backoffs(&appid, now);
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let j = &mut e.job;
        j.attempts = j.calls.max(j.attempts + 1);
        if answer.class == OutcomeClass::TokenInvalid {
            j.token_retries += 1;
        } else {
            j.token_retries = 0;
        }
        if answer.class == OutcomeClass::Transient {
            j.uncertain = true;
        }
        j.last_errcode = answer.errcode;
        j.last_error = answer.errmsg.clone();
        let ctx = context(&self.cfg, &e.job.params.appid, e.key_gen > e.call_gen);
        if e.target.is_some() {
            self.sched.call_returned();
            self.balance_answered(id, answer, now, jitter, out);
            return;
        }
        let row = AttemptRow {
            n: e.job.attempts,
            started_at: now - answer.latency.as_millis() as i64,
            answer: answer.clone(),
        };
        let decision = if e.job.params.op.is_read() {
            // a `balance` or `query_order` recorded on a shared outbox: decided as
            // one answered from memory, its outcome recorded under the lease
            job::decide_read(&e.job, &answer, now, &self.cfg.retry, ctx, jitter).into()
        } else {
            job::decide(&e.job, &answer, now, &self.cfg.retry, ctx, jitter)
        };
        match decision {
            Decision::Retry { at } => {
                self.sched.call_returned();
                e.job.next_attempt_at = at;
                e.phase = Phase::Recording(Some(at));
                out.push(Action::Record(record(
                    &e.job,
                    vec![row],
                    Update::Retry {
                        next_attempt_at: at,
                    },
                    now,
                )));
            }
            Decision::Final { state, reply } => {
                self.sched.call_returned();
                e.phase = Phase::Recording(None);
                out.push(Action::Record(record(
                    &e.job,
                    vec![row],
                    final_update(state, &reply),
                    now,
                )));
            }
            Decision::Duplicate => {
                // The getbalance is a call for the player too: on a shared outbox
                // it goes out only while the mark's fence still covers a whole
                // call, and never once the player is lost; otherwise the reply
                // goes without the balance (best effort).
                let covered = match (e.fence_at, self.cfg.fence_margin_ms) {
                    (Some(t), Some(m)) => now + FENCE_SLACK_MS < t + m,
                    (None, Some(_)) => false,
                    (_, None) => true,
                };
                if covered && !e.lost {
                    e.phase = Phase::Fetching;
                    e.duplicate_of = Some(answer);
                    // a read: no mark; it keeps the call's slot (Midas sees at most
                    // max_in_flight calls) and the player stays busy
                    out.push(call(e, Api::GetBalance, true));
                } else {
                    self.sched.call_returned();
                    let reply = job::finish_duplicate(&e.job, &answer, None, now, ctx);
                    e.phase = Phase::Recording(None);
                    out.push(Action::Record(record(
                        &e.job,
                        vec![row],
                        final_update(JobState::Succeeded, &reply),
                        now,
                    )));
                }
            }
        }
    }

    /// A final outcome on a session problem was written as a re-open instead: a
    /// re-sent command brought `key` meanwhile. The job runs again with it, due
    /// now, in a new retry period (as if re-opened by that command).
    pub(super) fn reopened_with_key(&mut self, id: i64, key: Secret, now: i64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.phase != Phase::Recording(None) {
            return;
        }
        e.job.session_key = Some(key);
        e.job.reopened_at = Some(now);
        e.key_gen += 1;
        e.phase = Phase::Recording(Some(now));
        self.recorded(id);
    }

    pub(super) fn recorded(&mut self, id: i64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let Phase::Recording(next) = e.phase else {
            return;
        };
        let openid = e.job.params.openid.clone();
        if e.lost {
            // the player's lease is gone: whoever holds it now runs its jobs (a
            // newer generation's copy of this job, if any, takes its place)
            self.end_entry(id);
            self.sched.release(&openid, &Entries(&self.entries));
            return;
        }
        match (next, e.reopen.take()) {
            (_, Some(mut reopened)) => {
                // re-opened while this step was under way: it runs again as re-opened
                reopened.calls = reopened.calls.max(e.job.calls);
                reopened.attempts = reopened.attempts.max(e.job.attempts);
                reopened.uncertain |= e.job.uncertain;
                e.job = reopened;
                e.key_gen += 1;
                e.phase = Phase::Waiting;
            }
            (Some(at), None) => {
                e.job.next_attempt_at = at;
                e.phase = Phase::Waiting;
            }
            (None, None) => {
                let order = e.order;
                self.entries.remove(&id);
                self.sched.remove(order, &openid);
                if self.finished.insert(id) {
                    self.finished_order.push_back(id);
                    if self.finished_order.len() > FINISHED_MEMORY {
                        if let Some(old) = self.finished_order.pop_front() {
                            self.finished.remove(&old);
                        }
                    }
                }
            }
        }
        self.sched.release(&openid, &Entries(&self.entries));
    }
}
