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
pub const NO_PERMISSION: i64 = 90017;
pub const PARAM_ERROR: i64 = 90018;
pub const TOKEN_INVALID: i64 = 40001;
pub const TOKEN_INVALID_2: i64 = 40014;
pub const TOKEN_EXPIRED: i64 = 42001;
pub const TOKEN_MISSING: i64 = 41001;

/// Codes that only report a signature, session or permission problem: they say
/// nothing about whether an earlier call of the same bill_no went through.
pub fn says_nothing_about_bill(errcode: i64) -> bool {
    matches!(
        errcode,
        MP_SIG_WRONG | SESSION_EXPIRED | SIG_WRONG | NO_PERMISSION
    )
}

/// Class of a Midas JSON answer carrying `errcode`.
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
        }
    }
}
