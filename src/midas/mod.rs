//! Everything that speaks to Midas: signing, the errcode table, access tokens and
//! the HTTP client (one call per attempt, a typed outcome, no retries inside), for
//! Midas 1.0 and, in [`v2`], virtual payment 2.0.

pub mod answer;
pub mod client;
pub mod errcode;
pub mod sign;
pub mod token;
pub mod transport;
pub mod v2;

pub use answer::{Answer, Api, Body, OrderInfo};
pub use client::MidasClient;
pub use errcode::{MidasApi, OutcomeClass};
