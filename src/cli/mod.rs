//! Command-line verbs that have grown beyond one file: `outbox` (one file per verb).
//! The binary's entry point and the other verbs stay in `main.rs` and their modules.

pub mod outbox;
