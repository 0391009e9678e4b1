//! Fault injection for the simulator: the failure modes a Midas client must survive
//! (busy, 502, lost answers after a charge, stalls, "processing", revoked tokens, a
//! session that expires after a lost answer), drawn from seeded RNGs so that a run
//! can be repeated exactly. The same faults apply to the 1.0 and 2.0 endpoints.

use rand::rngs::SmallRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use std::time::Duration;

use serde_json::Value;

use super::ledger::Ledger;
use super::verify::Op;
use super::{err_json, Inner, Outcome, Route};
use crate::config::SimulatorConfig;
use crate::midas::errcode;

/// Fault rates (0.0..=1.0 each) and timings; replaceable at runtime.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Answer `{"errcode":-1}` without applying.
    pub busy_rate: f64,
    /// Added to every answer of the four Midas endpoints.
    pub latency_ms: u64,
    /// Apply, then stall `stall_ms` before answering (charge happened, answer lost).
    pub apply_then_stall_rate: f64,
    /// Stall `stall_ms` without applying, then answer 504 with a non-JSON body.
    pub stall_then_drop_rate: f64,
    /// Answer HTTP 502 with an HTML body, not applied.
    pub http_502_rate: f64,
    /// cancelpay only: answer 90016 (still processing), not applied.
    pub processing_rate: f64,
    /// Revoke the app's current token and answer 40001.
    pub token_revoke_rate: f64,
    /// Apply, stall `stall_ms` before answering (like `apply_then_stall`), and expire
    /// the session_key the call was verified with: later calls signed with it answer
    /// 90010 until the client uses another key. Only when the call's session_key is
    /// known (registered and verified); otherwise the same as `apply_then_stall`.
    pub session_expire_after_lost_rate: f64,
    pub stall_ms: u64,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&SimulatorConfig> for Faults {
    fn from(c: &SimulatorConfig) -> Faults {
        Faults {
            busy_rate: c.busy_rate,
            latency_ms: millis(c.latency.0),
            apply_then_stall_rate: c.apply_then_stall_rate,
            stall_then_drop_rate: c.stall_then_drop_rate,
            http_502_rate: c.http_502_rate,
            processing_rate: c.processing_rate,
            token_revoke_rate: c.token_revoke_rate,
            session_expire_after_lost_rate: c.session_expire_after_lost_rate,
            stall_ms: millis(c.stall.0),
        }
    }
}

impl From<SimulatorConfig> for Faults {
    fn from(c: SimulatorConfig) -> Faults {
        Faults::from(&c)
    }
}

/// What happens to one call that passed the auth checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    None,
    TokenRevoke,
    Busy,
    Http502,
    StallThenDrop,
    ApplyThenStall,
    Processing,
    SessionExpireAfterLost,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::TokenRevoke => "token_revoke",
            Fault::Busy => "busy",
            Fault::Http502 => "http_502",
            Fault::StallThenDrop => "stall_then_drop",
            Fault::ApplyThenStall => "apply_then_stall",
            Fault::Processing => "processing",
            Fault::SessionExpireAfterLost => "session_expire_after_lost",
        }
    }
}

/// Decide the fault for one call. Always draws the same number of values (one per
/// kind, in a fixed order) whatever the rates and the operation, so the sequence of
/// draws depends only on the seed and the number of calls; the first kind whose draw
/// falls under its rate wins. `processing` only applies when `is_cancelpay`.
///
/// `session_expire_after_lost` is drawn last, from its own `session_rng` (one draw
/// per call), so adding it did not change the sequence of the older kinds for a seed.
pub fn decide(
    rng: &mut SmallRng,
    session_rng: &mut SmallRng,
    f: &Faults,
    is_cancelpay: bool,
) -> Fault {
    let order = [
        (Fault::TokenRevoke, f.token_revoke_rate),
        (Fault::Busy, f.busy_rate),
        (Fault::Http502, f.http_502_rate),
        (Fault::StallThenDrop, f.stall_then_drop_rate),
        (Fault::ApplyThenStall, f.apply_then_stall_rate),
        (
            Fault::Processing,
            if is_cancelpay { f.processing_rate } else { 0.0 },
        ),
    ];
    let mut chosen = Fault::None;
    for (fault, rate) in order {
        let draw: f64 = rng.random();
        if chosen == Fault::None && draw < rate {
            chosen = fault;
        }
    }
    let draw: f64 = session_rng.random();
    if chosen == Fault::None && draw < f.session_expire_after_lost_rate {
        chosen = Fault::SessionExpireAfterLost;
    }
    chosen
}

// ---------------------------------------------------------------- applying faults

/// A call that passed the token and signature checks, as the fault layer sees it.
pub(super) struct Call<'a> {
    pub(super) route: Route,
    pub(super) op: Op,
    pub(super) token: &'a str,
    pub(super) appid: &'a str,
    pub(super) openid: &'a str,
    pub(super) bill_no: Option<&'a str>,
    /// The session_key the call was verified with, when the simulator knows it.
    pub(super) session_key: Option<String>,
}

/// Decide the fault for an authenticated call, apply it to the ledger (via `apply`)
/// when the fault lets the operation through, and say how to answer.
pub(super) fn run(
    st: &mut Inner,
    call: Call<'_>,
    apply: impl FnOnce(&mut Ledger) -> Value,
) -> Outcome {
    let faults = st.faults.clone();
    let fault = decide(
        &mut st.fault_rng,
        &mut st.session_rng,
        &faults,
        call.op == Op::CancelPay,
    );
    let stall = Duration::from_millis(faults.stall_ms);
    let answer = match fault {
        Fault::TokenRevoke => {
            st.tokens.revoke_for(call.token, call.appid);
            Some(err_json(
                errcode::TOKEN_INVALID,
                "invalid credential, access_token is invalid or not latest",
            ))
        }
        Fault::Busy => Some(err_json(errcode::SYSTEM_BUSY, "system error")),
        Fault::Processing => Some(err_json(errcode::ORDER_PROCESSING, "order processing")),
        Fault::Http502 | Fault::StallThenDrop => None,
        Fault::None | Fault::ApplyThenStall => Some(apply(&mut st.ledger)),
        Fault::SessionExpireAfterLost => {
            let a = apply(&mut st.ledger);
            if let Some(key) = &call.session_key {
                st.sessions.expire(call.openid, key);
            }
            Some(a)
        }
    };
    let code = answer
        .as_ref()
        .and_then(|a| a.get("errcode"))
        .and_then(Value::as_i64);
    tracing::debug!(
        kind = call.op.kind(),
        route = ?call.route,
        appid = %call.appid,
        openid = %call.openid,
        bill_no = call.bill_no.unwrap_or(""),
        fault = fault.as_str(),
        session_expired = fault == Fault::SessionExpireAfterLost && call.session_key.is_some(),
        errcode = code,
        "sim call"
    );
    match (fault, answer) {
        (Fault::Http502, _) => Outcome::Http502,
        (Fault::StallThenDrop, _) => Outcome::StallThenDrop(stall),
        (Fault::ApplyThenStall | Fault::SessionExpireAfterLost, Some(a)) => {
            Outcome::StallThenAnswer(a, stall)
        }
        (_, Some(a)) => Outcome::Answer(a),
        (_, None) => Outcome::Answer(err_json(errcode::SYSTEM_BUSY, "system error")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn same_seed_same_decisions_and_certain_rates() {
        let f = Faults {
            busy_rate: 0.3,
            http_502_rate: 0.3,
            ..Faults::default()
        };
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut srng = SmallRng::seed_from_u64(seed);
            (0..200)
                .map(|_| decide(&mut rng, &mut srng, &f, false))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut rng = SmallRng::seed_from_u64(1);
        let mut s = SmallRng::seed_from_u64(2);
        let all = Faults {
            busy_rate: 1.0,
            ..Faults::default()
        };
        assert!((0..100).all(|_| decide(&mut rng, &mut s, &all, false) == Fault::Busy));
        assert!((0..100).all(|_| decide(&mut rng, &mut s, &Faults::default(), true) == Fault::None));
        let proc_only = Faults {
            processing_rate: 1.0,
            ..Faults::default()
        };
        assert_eq!(decide(&mut rng, &mut s, &proc_only, false), Fault::None);
        assert_eq!(
            decide(&mut rng, &mut s, &proc_only, true),
            Fault::Processing
        );
        let expire = Faults {
            session_expire_after_lost_rate: 1.0,
            ..Faults::default()
        };
        assert_eq!(
            decide(&mut rng, &mut s, &expire, false),
            Fault::SessionExpireAfterLost
        );
        // Another kind that fires takes precedence.
        let both = Faults {
            busy_rate: 1.0,
            ..expire
        };
        assert_eq!(decide(&mut rng, &mut s, &both, false), Fault::Busy);
    }

    #[test]
    fn the_session_fault_does_not_shift_the_older_sequence() {
        let f = Faults {
            busy_rate: 0.5,
            ..Faults::default()
        };
        let g = Faults {
            session_expire_after_lost_rate: 0.5,
            ..f.clone()
        };
        let run = |faults: &Faults| {
            let mut rng = SmallRng::seed_from_u64(9);
            let mut srng = SmallRng::seed_from_u64(10);
            (0..100)
                .map(|_| decide(&mut rng, &mut srng, faults, false) == Fault::Busy)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&f), run(&g));
    }
}
