//! Settings of the network: backend connections (`[backend_connection]`) and DNS
//! discovery (`[[dns]]`).

use super::FieldError;
use hickory_resolver::proto::rr::Name;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// `[backend_connection]`: how the gateway holds its HTTP/2 connection to each backend.
///
/// Why these defaults: a GPU server that hangs (a CUDA or NCCL hang, a paused VM, a
/// dropped network path) keeps its TCP connection open and stops answering. Nothing on
/// the connection fails by itself, so the gateway asks: an HTTP/2 PING every
/// `keepalive_interval_ms`, also while the connection is idle, which a live server's
/// HTTP/2 stack answers at once, whatever its model is doing. No answer within
/// `keepalive_timeout_ms` closes the connection: every call in flight on it fails as a
/// transport error (retried on another backend where the deadline allows), the health
/// Watch stream on it breaks (so the backend is checked again, and fails), and the next
/// call opens a new connection. One second each bounds the time to notice a hung
/// server to about two seconds, at the cost of one 17-byte frame a second each way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    /// Time between HTTP/2 PINGs on a backend connection. Default 1000 ms.
    pub keepalive_interval_ms: u64,
    /// Longest wait for a PING's answer before the connection is closed. Default 1000 ms.
    pub keepalive_timeout_ms: u64,
    /// Longest wait for a TCP connection to a backend. Default 1000 ms.
    pub connect_timeout_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            keepalive_interval_ms: 1000,
            keepalive_timeout_ms: 1000,
            connect_timeout_ms: 1000,
        }
    }
}

impl ConnectionConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (name, v) in [
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if v == 0 {
                return Err(FieldError::new(
                    name,
                    "must be above 0 (a hung backend would never be noticed)",
                ));
            }
        }
        Ok(())
    }
}

/// Shortest accepted `interval_ms`.
pub const MIN_INTERVAL_MS: u64 = 10;

/// Longest a single DNS query waits per attempt.
pub(crate) const MAX_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn default_interval_ms() -> u64 {
    5000
}

/// One DNS name that stands for a set of backends.
///
/// ```toml
/// name = "triton.models.svc.cluster.local"
/// port = 8001
/// interval_ms = 5000          # default
/// nameserver = "10.96.0.10:53" # default: the system's (/etc/resolv.conf)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Host name to resolve, without a port (`my-svc.ns.svc.cluster.local`). Required.
    pub name: String,
    /// Port of the backends' KServe v2 gRPC endpoint; DNS A/AAAA records carry none.
    /// Required.
    pub port: u16,
    /// How often the name is resolved again, in milliseconds. Default 5000; at least
    /// [`MIN_INTERVAL_MS`].
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Name server to ask (`ip:port`). Default: none, meaning the system resolver
    /// configuration (`/etc/resolv.conf` on Unix).
    #[serde(default)]
    pub nameserver: Option<SocketAddr>,
}

impl DnsConfig {
    /// `name:port` with every other field at its default.
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        DnsConfig {
            name: name.into(),
            port,
            interval_ms: default_interval_ms(),
            nameserver: None,
        }
    }

    /// The re-resolution interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Checks values serde cannot check. The error starts with the field's name
    /// (`port: must be above 0`), so the caller can prefix its section.
    pub fn validate(&self) -> Result<(), FieldError> {
        let name = self.name.trim_end_matches('.');
        if name.is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        if name.contains(':') || name.contains('/') {
            return Err(FieldError::new(
                "name",
                format!(
                    "`{}` must be a host name alone (the port goes in `port`)",
                    self.name
                ),
            ));
        }
        if self.name.parse::<IpAddr>().is_ok() {
            return Err(FieldError::new(
                "name",
                format!(
                    "`{}` is an IP address; list it as a static backend instead",
                    self.name
                ),
            ));
        }
        if let Err(e) = Name::from_utf8(&self.name) {
            return Err(FieldError::new(
                "name",
                format!("`{}` is not a valid DNS name: {e}", self.name),
            ));
        }
        if self.port == 0 {
            return Err(FieldError::new("port", "must be above 0"));
        }
        if self.interval_ms < MIN_INTERVAL_MS {
            return Err(FieldError::new(
                "interval_ms",
                format!(
                    "must be at least {MIN_INTERVAL_MS} (got {})",
                    self.interval_ms
                ),
            ));
        }
        if let Some(ns) = self.nameserver {
            if ns.port() == 0 || ns.ip().is_unspecified() {
                return Err(FieldError::new(
                    "nameserver",
                    format!("`{ns}` cannot be asked (needs a concrete IP and a port above 0)"),
                ));
            }
        }
        Ok(())
    }
}
