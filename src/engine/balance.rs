//! Balances: `balance` and `query_order` commands answered from memory (a
//! SQLite outbox: no row; retried until `retry.balance_give_up_after`, decided by
//! [`job::decide_read`], as the rows of a shared outbox are) and the getbalance
//! that follows a duplicate answer (the reply of a repeated bill_no carries the
//! current balance).

use super::job::{self, Job, JobState, ReadDecision};
use super::record::AttemptRow;
use super::scheduler::Order;
use super::{context, final_update, record, Action, BalanceCmd, Engine, Entries, Entry, Phase};
use crate::midas::Answer;

impl Engine {
    pub(super) fn add_balance(&mut self, b: BalanceCmd, now: i64) {
        let id = self.next_balance_id;
        self.next_balance_id -= 1;
        self.seq = self.seq.wrapping_add(1);
        let order = Order {
            row: self.last_row,
            seq: self.seq.max(1),
        };
        let mut job = Job::new(id, b.params, b.session_key, b.received_at);
        job.next_attempt_at = now;
        let openid = job.params.openid.clone();
        self.entries.insert(
            id,
            Entry::waiting(job, order, Some((b.reply_to, b.correlation_id))),
        );
        self.sched.insert(id, order, &openid, now);
    }

    pub(super) fn balance_answered(
        &mut self,
        id: i64,
        answer: Answer,
        now: i64,
        jitter: f64,
        out: &mut Vec<Action>,
    ) {
        let cfg = &self.cfg;
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let ctx = context(cfg, &e.job.params.appid, false);
        let openid = e.job.params.openid.clone();
        match job::decide_read(&e.job, &answer, now, &cfg.retry, ctx, jitter) {
            ReadDecision::Retry { at } => {
                e.job.next_attempt_at = at;
                e.phase = Phase::Waiting;
            }
            ReadDecision::Final { reply, .. } => {
                if let Some((reply_to, correlation_id)) = e.target.take() {
                    out.push(Action::Reply {
                        reply_to,
                        correlation_id,
                        payload: reply.to_bytes(),
                    });
                }
                let order = e.order;
                self.entries.remove(&id);
                self.sched.remove(order, &openid);
            }
        }
        self.sched.release(&openid, &Entries(&self.entries));
    }

    pub(super) fn balance_fetched(
        &mut self,
        id: i64,
        bal: Answer,
        now: i64,
        out: &mut Vec<Action>,
    ) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.phase != Phase::Fetching {
            return;
        }
        let ctx = context(&self.cfg, &e.job.params.appid, false);
        self.sched.call_returned();
        let Some(dup) = e.duplicate_of.take() else {
            return;
        };
        let reply = job::finish_duplicate(&e.job, &dup, Some(&bal), now, ctx);
        let rows = vec![
            AttemptRow {
                n: e.job.attempts,
                started_at: now - dup.latency.as_millis() as i64 - bal.latency.as_millis() as i64,
                answer: dup,
            },
            AttemptRow {
                n: e.job.attempts,
                started_at: now - bal.latency.as_millis() as i64,
                answer: bal,
            },
        ];
        e.phase = Phase::Recording(None);
        out.push(Action::Record(record(
            &e.job,
            rows,
            final_update(JobState::Succeeded, &reply),
            now,
        )));
    }
}
