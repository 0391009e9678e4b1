//! midas-worker: game servers publish Midas commands to RabbitMQ; the worker records
//! each in a SQLite outbox, calls Midas with the same bill_no until a definitive
//! answer, and publishes the result. See README.md and docs/contract.md.
//!
//! Data flows one way: delivery → outbox → dispatcher → Midas → outbox → reply.

pub mod broker;
pub mod cli;
pub mod client;
pub mod command;
pub mod config;
pub mod console;
pub mod coordinate;
pub mod demo;
pub mod dispatch;
pub mod engine;
pub mod enqueue;
pub mod http;
pub mod metrics;
pub mod midas;
pub mod outbox;
pub mod push;
pub mod secret;
pub mod sim;
pub mod telemetry;
pub mod worker;

/// The `bench` verb under its former path (`midas_worker::bench::run`).
pub use cli::bench;
/// The `outbox` verbs under their former name (`midas_worker::audit::run`, ...).
pub use cli::outbox as audit;
/// The job state machine (lives in the engine; re-exported under its old path).
pub use engine::job;
