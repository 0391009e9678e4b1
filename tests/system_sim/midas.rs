//! The system simulation's model Midas: a ledger, and the errcode tables of both
//! APIs (1.0 and 2.0) answered the way the real platform answers them —
//! session keys that expire on their own, signature and permission codes that
//! say nothing about the bill, token and busy answers, 1.0 cancel codes, and a
//! bill_no deduplication window that ends 48 h after the first call Midas saw
//! (a call after it charges again).

use std::collections::HashMap;
use std::time::Duration;

use midas_worker::command::{Op, Params};
use midas_worker::midas::errcode::{self, MidasApi};
use midas_worker::midas::{Answer, Api, Body, OutcomeClass};
use rand::rngs::SmallRng;
use rand::Rng;

pub const HOUR: i64 = 3_600_000;
/// Midas deduplicates a bill_no this long after the first call it saw.
pub const DEDUP: i64 = 48 * HOUR;
/// The worker must never send a bill_no later than this after its first call.
pub const WINDOW: i64 = 47 * HOUR;

#[derive(Debug, Default, Clone)]
pub struct Bill {
    /// Times the bill was applied (more than one: charged twice).
    pub applied: u32,
    pub cancelled: bool,
    /// A 1.0 pay that can no longer be cancelled (90014).
    pub confirmed: bool,
}

#[derive(Debug, Default)]
pub struct Midas {
    pub bills: HashMap<String, Bill>,
    /// Per player (appid, openid): each app is its own Midas account.
    pub balance: HashMap<(String, String), i64>,
    /// session_key → when it expires (set at its first use).
    pub sessions: HashMap<String, i64>,
    /// (api, bill_no) → the first call Midas saw (a 1.0 cancel names its pay's
    /// bill_no but is a request of its own).
    pub first_seen: HashMap<(&'static str, String), i64>,
}

pub fn answer(api: Api, v: MidasApi, code: Option<i64>, balance: Option<i64>) -> Answer {
    let class = match code {
        Some(c) => errcode::classify_for(v, c),
        None => OutcomeClass::Transient,
    };
    Answer {
        api,
        class,
        http_status: code.map(|_| 200),
        errcode: code,
        errmsg: Some(format!("model {code:?}")),
        body: Body {
            balance,
            ..Body::default()
        },
        latency: Duration::ZERO,
    }
}

impl Midas {
    /// Midas handles a request at `now`. `fault` in 0..1 is the scenario's fault
    /// rate. Returns the answer and whether it reaches the worker.
    // the request's parts as the client sends them; a struct would only rename them
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        rng: &mut SmallRng,
        now: i64,
        api: Api,
        v: MidasApi,
        p: &Params,
        key: Option<&str>,
        fault: f64,
    ) -> Result<(Answer, bool), String> {
        let r: f64 = rng.random();
        if r < fault * 0.15 {
            return Ok((answer(api, v, Some(errcode::SYSTEM_BUSY), None), true));
        }
        if r < fault * 0.25 {
            let code = [
                errcode::TOKEN_INVALID,
                errcode::TOKEN_EXPIRED,
                errcode::TOKEN_INVALID_2,
            ][rng.random_range(0..3)];
            return Ok((answer(api, v, Some(code), None), true));
        }
        if r < fault * 0.30 {
            // no JSON answer at all (a 5xx, a reset): transient, nothing applied
            return Ok((answer(api, v, None, None), true));
        }
        // sessions expire on their own
        if let Some(k) = key {
            let ends = *self
                .sessions
                .entry(k.to_string())
                .or_insert_with(|| now + rng.random_range(HOUR / 2..6 * HOUR));
            if now >= ends && api != Api::GetBalance {
                return Ok((answer(api, v, Some(errcode::SESSION_EXPIRED), None), true));
            }
        }
        if api != Api::GetBalance && r < fault * 0.36 {
            // signature / permission problems that say nothing about the bill
            let code = match v {
                MidasApi::V1 => [
                    errcode::MP_SIG_WRONG,
                    errcode::SIG_WRONG,
                    errcode::NO_PERMISSION,
                ][rng.random_range(0..3)],
                MidasApi::V2 => errcode::SIG_WRONG,
            };
            return Ok((answer(api, v, Some(code), None), true));
        }
        let lost = r > 1.0 - fault * 0.35;
        let first = if api == Api::GetBalance {
            now
        } else {
            *self
                .first_seen
                .entry((api.name(), p.bill_no.clone().unwrap_or_default()))
                .or_insert(now)
        };
        let player = (p.appid.clone(), p.openid.clone());
        let bal = *self.balance.entry(player.clone()).or_insert(500);
        let bill_no = p.bill_no.clone().unwrap_or_default();
        let a = match api {
            Api::GetBalance => answer(api, v, Some(0), Some(bal)),
            // the system simulation sends no query_order
            Api::QueryOrder => return Err("query_order is not modelled here".into()),
            Api::Pay | Api::Present => {
                let b = self.bills.entry(bill_no.clone()).or_default();
                let dedup = now < first + DEDUP;
                if b.applied > 0 && dedup {
                    answer(api, v, Some(errcode::ORDER_EXISTS), None)
                } else {
                    let amt = p.amt.unwrap_or(0);
                    if api == Api::Pay && amt > bal {
                        answer(api, v, Some(errcode::INSUFFICIENT_BALANCE), Some(bal))
                    } else {
                        let nb = if api == Api::Pay {
                            bal - amt
                        } else {
                            bal + p.present_counts.unwrap_or(0)
                        };
                        self.balance.insert(player, nb);
                        b.applied += 1;
                        if b.applied > 1 {
                            return Err(format!(
                                "{bill_no} charged twice (after the dedup window)"
                            ));
                        }
                        if v == MidasApi::V1 && rng.random_bool(0.05) {
                            b.confirmed = true;
                        }
                        answer(api, v, Some(0), Some(nb))
                    }
                }
            }
            Api::CancelPay => {
                let b = self.bills.entry(bill_no.clone()).or_default();
                if fault > 0.0 && rng.random_bool(0.05) {
                    answer(api, v, Some(errcode::ORDER_PROCESSING), None)
                } else if b.applied == 0 {
                    answer(api, v, Some(errcode::ORDER_NOT_FOUND), None)
                } else if b.cancelled {
                    answer(api, v, Some(errcode::ORDER_ROLLED_BACK), None)
                } else if b.confirmed {
                    answer(api, v, Some(errcode::ORDER_CONFIRMED), None)
                } else {
                    b.cancelled = true;
                    answer(api, v, Some(0), None)
                }
            }
        };
        if lost {
            return Ok((answer(api, v, None, None), false));
        }
        Ok((a, true))
    }

    /// A final reply agrees with the ledger (`op`, `bill`, the reply's status).
    pub fn agrees(
        &self,
        op: Op,
        bill: &str,
        status: midas_worker::command::Status,
    ) -> Result<(), String> {
        use midas_worker::command::Status;
        let b = self.bills.get(bill);
        let applied = b.is_some_and(|b| b.applied > 0);
        let cancelled = b.is_some_and(|b| b.cancelled);
        match (op, status) {
            (Op::Pay | Op::Present, Status::Succeeded) if !applied => {
                Err(format!("{bill} succeeded but was never applied"))
            }
            (Op::Pay | Op::Present, Status::Failed) if applied => {
                Err(format!("{bill} failed but the ledger applied it"))
            }
            (Op::CancelPay, Status::Succeeded) if !cancelled => Err(format!(
                "cancel of {bill} succeeded but the pay is not rolled back"
            )),
            (Op::CancelPay, Status::Failed) if cancelled => Err(format!(
                "cancel of {bill} failed but the pay was rolled back"
            )),
            _ => Ok(()),
        }
    }
}
