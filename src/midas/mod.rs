//! Everything that speaks to Midas: signing, the errcode table, access tokens and
//! the HTTP client (one call per attempt, a typed outcome, no retries inside).

pub mod errcode;
pub mod sign;
