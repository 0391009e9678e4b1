//! Everything that speaks to Midas: signing, the errcode table, access tokens and
//! the HTTP client (one call per attempt, a typed outcome, no retries inside).

pub mod client;
pub mod errcode;
pub mod sign;
pub mod token;

pub use client::{Answer, Api, Body, MidasClient};
pub use errcode::OutcomeClass;
