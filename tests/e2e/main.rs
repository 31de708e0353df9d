//! The end-to-end tests that can share a process, as modules of one test binary: one
//! link instead of eight, and one process whose tests run side by side. Real servers
//! on 127.0.0.1:0 (simulated backends, gateways, a redis-server), real clients.
//!
//! Kept apart, each in its own binary, because they read or set something that is the
//! whole process's: `metrics.rs` (exact counts on the process-wide metrics recorder),
//! `tracing.rs` (the process-wide tracer provider), `deadline.rs` (timing that other
//! tests' CPU would disturb) and `limits.rs` (the process's own memory).

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod backend_tls;
mod balancing;
mod cache;
mod dns;
mod front_tls;
mod gateway;
mod global_limits;
mod introspection;
mod prefix;
mod recovery;
mod resilience;
mod sequences;
mod stream_tokens;
