//! chime: a distributed timer. Clients register cron-like jobs over REST; chime fires each
//! one on time and delivers the fire as an HTTP callback, retrying until it is delivered.
//!
//! How a request flows, one module per step:
//! - [`api`]: REST handlers; validate input ([`job`]) and order every write.
//! - [`store`]: jobs and executions in SQLite or MySQL; the executions key is the
//!   exactly-once fence and pending rows are the durable delivery queue.
//! - [`scheduler`]: the fire path, in stages: records fires ahead of their time in large
//!   batches fenced by slot leases, then hands each to delivery at its instant.
//! - [`delivery`]: sends callbacks, persists attempt numbers and outcomes, retries.
//! - [`node`]: starts and stops all of it in order; [`config`] resolves its settings.

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod delivery;
pub(crate) mod faults;
pub mod job;
pub mod metrics;
pub mod node;
/// The gRPC callback contract, generated from `proto/chime/v1/callback.proto` at build time.
/// The server half is public so receivers (and chime's own tests) can implement it.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("chime.v1");
}
pub mod schedule;
pub mod scheduler;
pub mod store;

pub use node::serve;
