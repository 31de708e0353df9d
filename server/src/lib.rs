//! infergate: a gRPC inference gateway for pools of GPU model servers.
//!
//! It speaks the KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`,
//! with Triton's streaming extension) on both sides, so stock clients and servers work
//! with it unchanged, and decides call by call which backend serves each inference.
//!
//! Where things are, following a call from the outside in:
//! - [`front`]: the front door, which splits forwarded RPCs from the ones the gateway
//!   answers itself;
//! - [`path`]: the request path of forwarded calls, the layer order written once;
//!   [`attempt`]: one attempt on one backend, recorded once;
//! - [`wire`]: reading routing fields from raw bytes; [`proxy`]: HTTP/2 plumbing;
//! - [`pool`]: backends and per-model routes; [`balance`]: the pick;
//!   [`endpoint`]: one backend, its in-flight accounting; [`connection`]: its HTTP/2
//!   connection;
//! - beside the path: [`health`] (active checks), [`discovery`] (who serves what),
//!   [`telemetry`] (metrics), [`admin`] (control plane), [`config`];
//! - [`server`]: starting and stopping it all (the simulated GPU backend is the
//!   `infergate-sim` crate, the leaves both share are `infergate-base`);
//!   [`demo`]: gateway + three simulated backends with nothing to configure.
#![forbid(unsafe_code)]

pub mod admin;
pub mod affinity;
pub mod attempt;
pub mod auth;
pub mod balance;
pub mod blame;
pub mod breaker;
pub mod bulkhead;
pub mod cache;
pub mod capacity;
pub mod clock;
pub mod config;
pub mod connection;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod dns;
pub mod endpoint;
pub mod events;
pub mod front;
pub mod gauges;
pub mod global_limit;
pub mod health;
pub mod load;
pub mod load_report;
pub mod models;
pub mod outlier;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod ratio;
pub mod retry;
pub mod sequence;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod wire;
