//! Virtual payment 2.0 (`docs/midas-v2.md`): the same four operations as Midas 1.0
//! under `/wxa/game/*`, with the body signed as raw bytes (`pay_sig` with the
//! environment's AppKey, `signature` with the player's session_key) and renamed
//! fields. Kept apart from the 1.0 client so that an app is dispatched to one or the
//! other by its configured API; both produce the same [`Answer`](super::Answer).

mod answer;
pub mod client;
pub mod sign;

pub use client::{
    build_request, call, parse_answer, path, BuildError, V2Env, V2Params, V2Request,
    MAX_ANSWER_BYTES,
};
