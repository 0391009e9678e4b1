//! midas-worker: game servers publish Midas commands to RabbitMQ; the worker records
//! each in a SQLite outbox, calls Midas with the same bill_no until a definitive
//! answer, and publishes the result. See README.md and shared/CONTRACT.md.
//!
//! Data flows one way: delivery → outbox → dispatcher → Midas → outbox → reply.

pub mod command;
pub mod config;
pub mod midas;
pub mod secret;
