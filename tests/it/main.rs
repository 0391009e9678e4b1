//! The integration tests, as one test binary: every `tests/it/<name>.rs` is a module
//! here, so the shared harness (`tests/common`) and the crate are compiled and linked
//! once instead of once per file. Run one file's tests with
//! `cargo test --test it <name>::` (e.g. `cargo test --test it pipeline::`).
//!
//! The tests share this process: process-wide metrics counters only grow (assert
//! differences, or read per-worker state), and nothing here may change process
//! state (environment variables, working directory, rlimits). The deterministic
//! simulation (`tests/simulation.rs`) stays its own binary.

// the harness lives outside `it/` so that a new top-level test file can still use it
#[path = "../common/mod.rs"]
mod common;

mod audit_actions;
mod audit_cli;
mod audit_reads;
mod config_cli;
mod confirm_race;
mod console;
mod console_limit;
mod contract;
mod crash;
mod dead_letter;
mod decode_bounds;
mod decoder_props;
mod engine_e2e;
mod enqueue_cli;
mod hardening;
mod http_limits;
mod lease_rule;
mod log_secrets;
mod midas_http_hardening;
mod ops;
mod outbox_schema;
mod outbox_unwritable;
mod pg_batch;
mod pg_ops;
mod pg_plans;
mod pg_tls;
mod pipeline;
mod promises;
mod push_e2e;
mod push_receiver;
mod query_order;
mod reliability;
mod schema_examples;
mod session_race;
mod shared_pg;
mod shared_reads;
mod sim_http;
mod sim_v2;
mod v2_e2e;
mod verbs;
