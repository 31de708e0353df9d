//! Settings of the network: backend connections (`[backend_connection]`), DNS
//! discovery (`[[dns]]`), and TLS (`[tls]`, `[admin.tls]`, `[backend_tls]`).

use super::FieldError;
use hickory_resolver::proto::rr::Name;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// `[tls]` (the inference port) and `[admin.tls]` (the admin port; without one it uses
/// `[tls]`): server TLS, with client certificates (mTLS) when `client_ca` is given.
///
/// ```toml
/// [tls]
/// cert = "/etc/infergate/tls.crt"      # PEM chain, leaf first
/// key = "/etc/infergate/tls.key"       # PEM key (PKCS#8, PKCS#1 or SEC1)
/// client_ca = "/etc/infergate/ca.crt"  # PEM CA(s) client certificates must chain to
/// require_client_cert = true           # refuse handshakes without one
/// min_version = "1.2"                  # or "1.3"
/// ```
///
/// The cert and key files are re-read when they change and on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain (PEM). With `key`, turns TLS on. Default: none (plaintext).
    pub cert: Option<PathBuf>,
    /// Private key (PEM). Required with `cert`.
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to. Default: none
    /// (no client certificates asked for).
    pub client_ca: Option<PathBuf>,
    /// Refuse a handshake without a client certificate (needs `client_ca`); the
    /// tenant then always comes from the certificate. Default false.
    pub require_client_cert: bool,
    /// Oldest TLS version accepted: `"1.2"` or `"1.3"`. Default `"1.2"`.
    pub min_version: TlsVersion,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

impl TlsConfig {
    /// Whether the port serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }

    /// Checks what serde cannot: the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(FieldError::new("key", "is required with `cert`")),
            (None, Some(_)) => return Err(FieldError::new("cert", "is required with `key`")),
            _ => {}
        }
        if self.client_ca.is_some() && !self.enabled() {
            return Err(FieldError::new(
                "client_ca",
                "needs `cert` and `key` (client certificates are asked for in a TLS handshake)",
            ));
        }
        if self.require_client_cert && self.client_ca.is_none() {
            return Err(FieldError::new(
                "require_client_cert",
                "needs `client_ca` (the CA client certificates must chain to)",
            ));
        }
        Ok(())
    }
}

/// `[backend_tls]`: TLS toward backends. Its presence turns TLS on for every backend
/// (a backend's `tls = false` turns it off for that one); `https://` in a backend's
/// address turns it on for that one. Health checks, load-report streams and
/// discovery probes use the same connection.
///
/// ```toml
/// [backend_tls]
/// ca = "/etc/infergate/backend-ca.crt"  # default: /etc/ssl/certs/ca-certificates.crt
/// cert = "/etc/infergate/client.crt"    # client certificate for backends that ask
/// key = "/etc/infergate/client.key"
/// server_name = "triton.internal"       # default: the backend's host
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTlsConfig {
    /// CA certificates (PEM) backend certificates must chain to. Default: the
    /// system's bundle, `/etc/ssl/certs/ca-certificates.crt`.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) shown to backends. Default: none.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM). Required with `cert`.
    pub key: Option<PathBuf>,
    /// Name checked against backend certificates (and sent as SNI). Default: each
    /// backend's host.
    pub server_name: Option<String>,
}

impl BackendTlsConfig {
    /// Checks what serde cannot: the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(FieldError::new("key", "is required with `cert`")),
            (None, Some(_)) => Err(FieldError::new("cert", "is required with `key`")),
            _ => check_server_name(self.server_name.as_deref()),
        }
    }
}

/// A server name must be a DNS name or an IP address.
pub(crate) fn check_server_name(name: Option<&str>) -> Result<(), FieldError> {
    match name {
        Some(name) if rustls_pki_types::ServerName::try_from(name).is_err() => {
            Err(FieldError::new(
                "server_name",
                format!("`{name}` is not a DNS name or IP address"),
            ))
        }
        _ => Ok(()),
    }
}

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
