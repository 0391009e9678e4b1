//! Command-line verbs that have grown beyond one file: `outbox` (one file per verb)
//! and `bench` (one file per section of the run).
//! The binary's entry point and the other verbs stay in `main.rs` and their modules.

pub mod bench;
pub mod outbox;
