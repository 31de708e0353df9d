//! infergate-base: the leaves that both the gateway (`infergate`) and the simulated
//! GPU backend (`infergate-sim`) stand on. Nothing here knows of either.
//!
//! - [`codes`]: gRPC status codes by name, one parser, and `CodeSet`;
//! - [`http1`]: the plain HTTP/1.1 endpoints (`/metrics`, the simulator's control
//!   port, Prometheus scrapes), on hyper;
//! - [`trace`]: distributed tracing (OpenTelemetry over OTLP), off until initialised;
//! - [`tls`]: PEM loading, the client config and the TLS connector for tonic channels;
//! - [`text`]: names echoed in messages, cut short.
#![forbid(unsafe_code)]

pub mod codes;
pub mod http1;
pub mod text;
pub mod tls;
pub mod trace;
