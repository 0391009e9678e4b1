//! Every Midas answer mapped to one outcome class, for Midas 1.0 (`docs/midas-v1.md`)
//! and virtual payment 2.0 (`docs/midas-v2.md`). The dispatcher decides what to do
//! from the class alone; this is the only place that knows what an errcode means.

use serde::{Deserialize, Serialize};

/// What an answer (or the absence of one) means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeClass {
    /// errcode 0: done.
    Success,
    /// 90012: the platform already processed this bill_no; the pipeline decides.
    Duplicate,
    /// A definitive error: the bill_no was not applied and will not be by retrying.
    Definitive,
    /// Unknown result (-1, 90016, timeout, connect error, 5xx, garbage): retry the same bill_no.
    Transient,
    /// The access token was rejected: refresh it, then retry the same bill_no.
    TokenInvalid,
}

impl OutcomeClass {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Success => "success",
            OutcomeClass::Duplicate => "duplicate",
            OutcomeClass::Definitive => "definitive",
            OutcomeClass::Transient => "transient",
            OutcomeClass::TokenInvalid => "token_invalid",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OutcomeClass::Success | OutcomeClass::Duplicate | OutcomeClass::Definitive
        )
    }
}

pub const SYSTEM_BUSY: i64 = -1;
pub const ORDER_NOT_FOUND: i64 = 90000;
pub const MP_SIG_WRONG: i64 = 90009;
pub const SESSION_EXPIRED: i64 = 90010;
pub const SIG_WRONG: i64 = 90011;
pub const ORDER_EXISTS: i64 = 90012;
pub const INSUFFICIENT_BALANCE: i64 = 90013;
pub const ORDER_CONFIRMED: i64 = 90014;
pub const ORDER_ROLLED_BACK: i64 = 90015;
pub const ORDER_PROCESSING: i64 = 90016;
/// 2.0: the player's session_key expired (the player must log in again); the same
/// number as 1.0's [`ORDER_PROCESSING`].
pub const V2_SESSION_KEY_EXPIRED: i64 = 90016;
pub const NO_PERMISSION: i64 = 90017;
pub const PARAM_ERROR: i64 = 90018;
/// 2.0 `queryorderinfo`: no order with this `out_trade_no`.
pub const OUT_TRADE_NO_NOT_FOUND: i64 = 90019;
pub const TOKEN_INVALID: i64 = 40001;
pub const TOKEN_INVALID_2: i64 = 40014;
pub const TOKEN_EXPIRED: i64 = 42001;
pub const TOKEN_MISSING: i64 = 41001;

/// Which Midas API an app speaks: 1.0 (`/cgi-bin/midas/*`, `sig`/`mp_sig`) or
/// virtual payment 2.0 (`/wxa/game/*`, `pay_sig`/`signature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MidasApi {
    V1,
    V2,
}

impl MidasApi {
    pub fn as_str(self) -> &'static str {
        match self {
            MidasApi::V1 => "v1",
            MidasApi::V2 => "v2",
        }
    }
}

/// Class of a Midas JSON answer carrying `errcode`, for the API that answered.
pub fn classify_for(api: MidasApi, errcode: i64) -> OutcomeClass {
    match api {
        MidasApi::V1 => classify(errcode),
        MidasApi::V2 => classify_v2(errcode),
    }
}

/// Is `errcode` in the table of `api`? The caller logs answers whose code is not
/// (they keep their class, but a person should learn about the new code).
pub fn is_listed(api: MidasApi, errcode: i64) -> bool {
    match api {
        MidasApi::V1 => matches!(
            errcode,
            0 | SYSTEM_BUSY
                | ORDER_NOT_FOUND
                | MP_SIG_WRONG
                | SESSION_EXPIRED
                | SIG_WRONG
                | ORDER_EXISTS
                | INSUFFICIENT_BALANCE
                | ORDER_CONFIRMED
                | ORDER_ROLLED_BACK
                | ORDER_PROCESSING
                | NO_PERMISSION
                | PARAM_ERROR
                | TOKEN_INVALID
                | TOKEN_INVALID_2
                | TOKEN_EXPIRED
                | TOKEN_MISSING
        ),
        MidasApi::V2 => matches!(
            errcode,
            0 | SYSTEM_BUSY
                | ORDER_NOT_FOUND
                | SESSION_EXPIRED
                | SIG_WRONG
                | ORDER_EXISTS
                | INSUFFICIENT_BALANCE
                | V2_SESSION_KEY_EXPIRED
                | PARAM_ERROR
                | OUT_TRADE_NO_NOT_FOUND
                | TOKEN_INVALID
                | TOKEN_INVALID_2
                | TOKEN_EXPIRED
                | TOKEN_MISSING
        ),
    }
}

/// True for the codes that only report a signature, session or permission problem:
/// they say nothing about whether an earlier, unanswered call with the same bill_no
/// was applied (1.0: 90009, 90010, 90011, 90017; 2.0: 90010 `signature` wrong,
/// 90011 `pay_sig` wrong, 90016 session_key expired). After an unanswered call such
/// an answer must end a job `unknown` / `outcome_uncertain`, never `failed`.
///
/// On 2.0 a code not in the table counts too: it is final for the bill (the 2.0
/// pay page), but nothing says it is checked after the bill_no's idempotency, so
/// it cannot tell that an earlier unanswered call did not apply (found by a
/// black-box run: a refund applied, its answer lost, then 90016 — `failed` for a
/// refund that had moved coins).
pub fn says_nothing_about_bill(api: MidasApi, errcode: i64) -> bool {
    match api {
        MidasApi::V1 => matches!(
            errcode,
            MP_SIG_WRONG | SESSION_EXPIRED | SIG_WRONG | NO_PERMISSION
        ),
        MidasApi::V2 => {
            matches!(
                errcode,
                SESSION_EXPIRED | SIG_WRONG | V2_SESSION_KEY_EXPIRED
            ) || !is_listed(MidasApi::V2, errcode)
        }
    }
}

/// The 2.0 table. Unlike 1.0, a code not in the table is definitive for the bill
/// (the 2.0 pay page: only a timeout or -1 leaves the outcome unknown); the caller
/// logs it (see [`is_listed`]) and keeps it in the attempt history.
fn classify_v2(errcode: i64) -> OutcomeClass {
    match errcode {
        0 => OutcomeClass::Success,
        ORDER_EXISTS => OutcomeClass::Duplicate,
        SYSTEM_BUSY => OutcomeClass::Transient,
        TOKEN_INVALID | TOKEN_INVALID_2 | TOKEN_EXPIRED | TOKEN_MISSING => {
            OutcomeClass::TokenInvalid
        }
        _ => OutcomeClass::Definitive,
    }
}

/// Class of a Midas 1.0 JSON answer carrying `errcode` (same as
/// `classify_for(MidasApi::V1, errcode)`).
pub fn classify(errcode: i64) -> OutcomeClass {
    match errcode {
        0 => OutcomeClass::Success,
        ORDER_EXISTS => OutcomeClass::Duplicate,
        SYSTEM_BUSY | ORDER_PROCESSING => OutcomeClass::Transient,
        TOKEN_INVALID | TOKEN_INVALID_2 | TOKEN_EXPIRED | TOKEN_MISSING => {
            OutcomeClass::TokenInvalid
        }
        ORDER_NOT_FOUND | MP_SIG_WRONG | SESSION_EXPIRED | SIG_WRONG | INSUFFICIENT_BALANCE
        | ORDER_CONFIRMED | ORDER_ROLLED_BACK | NO_PERMISSION | PARAM_ERROR => {
            OutcomeClass::Definitive
        }
        // An errcode this table does not know: the answer is a definitive JSON answer from
        // Midas, but we cannot know whether it applied. Retrying with the same bill_no is
        // safe (it never deducts twice) and ends in a known code or `unknown` for a person.
        _ => OutcomeClass::Transient,
    }
}

/// Class of an HTTP status when the body is not a Midas answer.
pub fn classify_http(status: u16) -> OutcomeClass {
    // 5xx, 429, and anything else without a JSON body: the outcome is unknown.
    let _ = status;
    OutcomeClass::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_from_midas_md() {
        use OutcomeClass::*;
        let table: &[(i64, OutcomeClass)] = &[
            (0, Success),
            (-1, Transient),
            (90000, Definitive),
            (90009, Definitive),
            (90010, Definitive),
            (90011, Definitive),
            (90012, Duplicate),
            (90013, Definitive),
            (90014, Definitive),
            (90015, Definitive),
            (90016, Transient),
            (90017, Definitive),
            (90018, Definitive),
            (40001, TokenInvalid),
            (40014, TokenInvalid),
            (42001, TokenInvalid),
            (41001, TokenInvalid),
            (12345, Transient),
        ];
        for (code, class) in table {
            assert_eq!(classify(*code), *class, "errcode {code}");
            assert_eq!(classify_for(MidasApi::V1, *code), *class, "errcode {code}");
            assert_eq!(is_listed(MidasApi::V1, *code), *code != 12345, "{code}");
        }
    }

    #[test]
    fn table_from_midas_v2_md() {
        use OutcomeClass::*;
        let table: &[(i64, OutcomeClass)] = &[
            (0, Success),
            (-1, Transient),
            (90000, Definitive),
            (90010, Definitive),
            (90011, Definitive),
            (90012, Duplicate),
            (90013, Definitive),
            (90016, Definitive),
            (90018, Definitive),
            (40001, TokenInvalid),
            (40014, TokenInvalid),
            (42001, TokenInvalid),
            (41001, TokenInvalid),
        ];
        for (code, class) in table {
            assert_eq!(classify_for(MidasApi::V2, *code), *class, "errcode {code}");
            assert!(is_listed(MidasApi::V2, *code), "{code}");
        }
        // Not in the 2.0 table: definitive (1.0 would retry these), and not listed.
        for code in [90017, 90099, 12345] {
            assert_eq!(classify_for(MidasApi::V2, code), Definitive, "{code}");
            assert!(!is_listed(MidasApi::V2, code), "{code}");
        }
    }

    #[test]
    fn only_signature_session_permission_codes_say_nothing_about_the_bill() {
        for code in [90009, 90010, 90011, 90017] {
            assert!(says_nothing_about_bill(MidasApi::V1, code), "v1 {code}");
        }
        // 2.0: 90016 is the session_key expiring; a code not in the table cannot
        // tell either
        for code in [90010, 90011, 90016, 90017, 90099] {
            assert!(says_nothing_about_bill(MidasApi::V2, code), "v2 {code}");
        }
        for code in [0, -1, 90000, 90012, 90013, 90018, 40001] {
            assert!(!says_nothing_about_bill(MidasApi::V1, code), "v1 {code}");
            assert!(!says_nothing_about_bill(MidasApi::V2, code), "v2 {code}");
        }
        // 90009 and 90017 are not 2.0 codes at all: like any code the 2.0 table
        // does not list, they cannot say an earlier unanswered call did not apply
        assert!(says_nothing_about_bill(MidasApi::V2, 90009));
    }
}
