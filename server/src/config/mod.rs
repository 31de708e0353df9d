//! The gateway's configuration: one TOML file, every field with a documented default,
//! validated on load with errors that name the file, the field and the reason.
//!
//! Command-line flags are applied on top of the file by `main.rs`; [`Config::validate`]
//! runs after that, so a bad flag is reported the same way as a bad file.

mod affinity;
mod cache;
mod limits;
mod load;
mod net;
mod resilience;
mod sequence;

pub use affinity::{PrefixConfig, MAX_PREFIX_BYTES};
pub use cache::{CacheConfig, MAX_CACHE_ENTRY_BYTES, MAX_CACHE_TTL_MS};
pub use limits::{
    Bucket, OnRedisError, RateLimitConfig, RedisConfig, Scope, TenantWeights, TokenRate,
};
pub use load::{LoadConfig, ScrapeConfig, ScrapePreset};
pub(crate) use net::MAX_QUERY_TIMEOUT;
pub use net::{
    BackendTlsConfig, ConnectionConfig, DnsConfig, TlsConfig, TlsVersion, MIN_INTERVAL_MS,
};
#[cfg(test)]
pub(crate) use resilience::share_of;
pub(crate) use resilience::MAX_EJECTION_MS;
pub use resilience::{
    BreakerConfig, BulkheadConfig, HedgeConfig, NoResponseConfig, OutlierConfig, RetryConfig,
    WindowKind,
};
pub use sequence::SequenceConfig;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A configuration problem: where it is (file and field) and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or `command line` for flags.
    pub source: String,
    /// Dotted path of the field, e.g. `backends[1].address`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(
                f,
                "{}: field `{}`: {}",
                self.source, self.field, self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value that is out of range or inconsistent: which field (a dotted path inside its
/// section, e.g. `per_tenant.rate_per_second`) and why. Each section's `validate` says
/// what is wrong with its own fields; [`FieldError::under`] adds the section's name as
/// it goes up, so the full path is built from parts and never parsed from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, relative to where the error was made.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    /// `reason` about the field at `path`.
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The same error seen from the enclosing `section`.
    pub fn under(mut self, section: &str) -> Self {
        self.path = if self.path.is_empty() {
            section.to_owned()
        } else if self.path.starts_with('[') {
            format!("{section}{}", self.path)
        } else {
            format!("{section}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// Balancing policy names accepted in config and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Each candidate in turn.
    RoundRobin,
    /// At random, in proportion to static weights.
    Weighted,
    /// Fewest in-flight requests among `choice_count` random candidates (or all).
    LeastRequest,
    /// Lowest score from in-flight requests, reported utilization and queue depth.
    #[default]
    GpuAware,
    /// Calls that share a prompt prefix go to the same backend while its load allows
    /// (consistent hashing with bounded loads); gpu_aware otherwise.
    PrefixAffinity,
}

impl PolicyKind {
    /// The name used in config files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Weighted => "weighted",
            PolicyKind::LeastRequest => "least_request",
            PolicyKind::GpuAware => "gpu_aware",
            PolicyKind::PrefixAffinity => "prefix_affinity",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round_robin" => Ok(PolicyKind::RoundRobin),
            "weighted" => Ok(PolicyKind::Weighted),
            "least_request" => Ok(PolicyKind::LeastRequest),
            "gpu_aware" => Ok(PolicyKind::GpuAware),
            "prefix_affinity" => Ok(PolicyKind::PrefixAffinity),
            other => Err(format!(
                "unknown policy `{other}`; expected round_robin, weighted, least_request, gpu_aware or prefix_affinity"
            )),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Inference front door (KServe v2 gRPC). Default 127.0.0.1:8001.
    pub listen: SocketAddr,
    /// Prometheus metrics (`/metrics`). Default 127.0.0.1:8002.
    pub metrics_listen: SocketAddr,
    /// Record metrics at all. Default true (`--no-metrics` turns recording off; the
    /// overhead benchmark uses it as its baseline).
    pub metrics: bool,
    /// Admin gRPC API. Default 127.0.0.1:8003.
    pub admin_listen: SocketAddr,
    /// Tokio worker threads; absent = one per core.
    pub worker_threads: Option<usize>,
    /// Largest request message accepted, in bytes. Default 64 MiB.
    pub max_message_bytes: usize,
    /// How long in-flight calls may run on after SIGTERM/SIGINT. Default 10 s.
    pub shutdown_grace_ms: u64,
    /// After SIGTERM/SIGINT, health is NOT_SERVING at once, and calls are still served
    /// this long before new ones are refused, so that health checks and load balancers
    /// can move traffic away first. Default 1000 ms.
    pub shutdown_drain_ms: u64,
    /// Pool-wide balancing.
    pub balancer: BalancerConfig,
    /// Active health checks of backends.
    pub health: HealthConfig,
    /// Learning which backend serves which model.
    pub discovery: DiscoveryConfig,
    /// Load reports (ORCA, Prometheus) and how they are read.
    pub load: crate::config::LoadConfig,
    /// Passive outlier detection and ejection.
    pub outlier: crate::config::OutlierConfig,
    /// Circuit breakers (one per backend and one per backend × model, all alike).
    pub breaker: crate::config::BreakerConfig,
    /// Backend connections: HTTP/2 PING keepalive, connect timeout.
    pub backend_connection: crate::config::ConnectionConfig,
    /// When an attempt that has received nothing counts as a backend's failure.
    pub no_response: crate::config::NoResponseConfig,
    /// Who a call belongs to.
    pub tenants: TenantConfig,
    /// Token-bucket rate limits per tenant and per model.
    pub rate_limit: crate::config::RateLimitConfig,
    /// The Redis store of global rate limits (`scope = "global"`).
    pub redis: RedisConfig,
    /// Retries for every model (a model's own `retry` table replaces it).
    pub retry: crate::config::RetryConfig,
    /// Hedging for every model (off by default; a model's `hedge` table replaces it).
    pub hedge: crate::config::HedgeConfig,
    /// `[sequences]`: pinning Triton sequences to one backend.
    pub sequences: SequenceConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// TLS on the inference port (and the admin port, without `[admin.tls]`).
    pub tls: TlsConfig,
    /// TLS toward backends; present = on for every backend without `tls = false`.
    pub backend_tls: Option<BackendTlsConfig>,
    /// Time kept back from the caller's remaining deadline when it is passed on to the
    /// backend, for the way back. Default 5 ms.
    pub deadline_margin_ms: u64,
    /// The backends.
    pub backends: Vec<BackendConfig>,
    /// DNS names whose A/AAAA records are backends (a Kubernetes headless service),
    /// re-resolved on an interval: new addresses are added, vanished ones drained.
    pub dns: Vec<crate::config::DnsConfig>,
    /// Per-model settings, by model name.
    pub models: BTreeMap<String, ModelConfig>,
    /// Request bytes the whole process may hold in buffers for messages that have not
    /// fully arrived (a message split across DATA frames); a message that would go
    /// over is refused with RESOURCE_EXHAUSTED naming this field. Default 256 MiB.
    pub max_buffered_request_bytes: usize,
    /// The same budget for each client connection; at least `max_message_bytes` + 5
    /// and at most `max_buffered_request_bytes`. Default 128 MiB.
    pub max_buffered_request_bytes_per_connection: usize,
    /// Longest a unary request's body may take to arrive, whatever the caller's
    /// deadline (a shorter deadline ends the read first); past it the call gets
    /// DEADLINE_EXCEEDED naming this field. Default 30000 ms.
    pub request_read_timeout_ms: u64,
    /// HTTP/2 streams (calls) one client connection may have open at once, announced
    /// as SETTINGS_MAX_CONCURRENT_STREAMS; more are refused with REFUSED_STREAM.
    /// Default 256.
    pub max_concurrent_streams: u32,
    /// Largest header list (call metadata) a client may send, announced as
    /// SETTINGS_MAX_HEADER_LIST_SIZE; a larger one gets HTTP 431. Default 16384 bytes.
    pub max_header_list_bytes: u32,
    /// Client connections open at once on the inference port; one over the limit is
    /// closed as soon as it is accepted. Default 10000.
    pub max_client_connections: usize,
    /// A client connection that has not sent its HTTP/2 preface and first SETTINGS
    /// frame this long after it was accepted is closed. Default 10000 ms.
    pub client_handshake_timeout_ms: u64,
    /// A client connection with no call open for this long is closed (0 = never).
    /// Default 300000 ms.
    pub client_idle_timeout_ms: u64,
    /// HTTP/2 PING sent to a client connection that has been quiet this long, to find
    /// dead peers (0 = never). Default 30000 ms.
    pub client_keepalive_interval_ms: u64,
    /// A client that does not answer that PING within this long is disconnected.
    /// Default 10000 ms.
    pub client_keepalive_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8002)),
            metrics: true,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8003)),
            worker_threads: None,
            max_message_bytes: 64 << 20,
            shutdown_grace_ms: 10_000,
            shutdown_drain_ms: 1000,
            balancer: BalancerConfig::default(),
            health: HealthConfig::default(),
            discovery: DiscoveryConfig::default(),
            load: crate::config::LoadConfig::default(),
            outlier: crate::config::OutlierConfig::default(),
            breaker: crate::config::BreakerConfig::default(),
            backend_connection: crate::config::ConnectionConfig::default(),
            no_response: crate::config::NoResponseConfig::default(),
            tenants: TenantConfig::default(),
            rate_limit: crate::config::RateLimitConfig::default(),
            redis: RedisConfig::default(),
            retry: crate::config::RetryConfig::default(),
            hedge: crate::config::HedgeConfig::default(),
            sequences: SequenceConfig::default(),
            deadline_margin_ms: 5,
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            backend_tls: None,
            backends: Vec::new(),
            dns: Vec::new(),
            models: BTreeMap::new(),
            max_buffered_request_bytes: 256 << 20,
            max_buffered_request_bytes_per_connection: 128 << 20,
            request_read_timeout_ms: 30_000,
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 << 10,
            max_client_connections: 10_000,
            client_handshake_timeout_ms: 10_000,
            client_idle_timeout_ms: 300_000,
            client_keepalive_interval_ms: 30_000,
            client_keepalive_timeout_ms: 10_000,
        }
    }
}

/// `[balancer]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    /// Default policy for every model. Default `gpu_aware`.
    pub policy: PolicyKind,
    /// Candidates sampled by least_request and gpu_aware; 0 = scan all. Default 2.
    pub choice_count: usize,
    /// least_request with unequal weights: score = (in_flight + 1)^bias / weight.
    /// 0 ignores in-flight counts (pure weights), 1 is the default.
    pub active_request_bias: f64,
    /// gpu_aware: how much a reported queued request counts against a backend,
    /// relative to one of its own in-flight calls. Default 1.
    pub queue_weight: f64,
    /// gpu_aware: how much the projected load counts among backends that all have room
    /// for the call: 0 sends each call to the fastest of them, larger values spread
    /// calls more evenly. Default 0.25.
    pub spread: f64,
    /// A backend that joins a pool already serving ramps from 10% to full share over
    /// this long. 0 = off. Default 10000 ms.
    pub slow_start_ms: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            policy: PolicyKind::GpuAware,
            choice_count: 2,
            active_request_bias: 1.0,
            queue_weight: 1.0,
            spread: 0.25,
            slow_start_ms: 10_000,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between checks of one backend. Default 1000 ms.
    pub interval_ms: u64,
    /// Time a check may take. Default 500 ms.
    pub timeout_ms: u64,
    /// Consecutive failed checks that mark a ready backend not ready. Default 2.
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks that mark a not-ready backend ready. Default 1.
    pub healthy_threshold: u32,
    /// Interval while a backend is not ready, so it is readmitted fast. Default 500 ms.
    /// A backend that cannot be connected to backs off from this, doubling up to
    /// `interval_ms`.
    pub unhealthy_interval_ms: u64,
    /// Each interval is lengthened by a random 0..jitter, so checks of many gateways do
    /// not arrive together. Default 100 ms.
    pub interval_jitter_ms: u64,
    /// The first check of a backend waits a random 0..initial_jitter. Default 0.
    pub initial_jitter_ms: u64,
    /// Also check `ModelReady` for every model a backend serves, so one failing model
    /// removes the backend for that model only. Default true.
    pub model_checks: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1000,
            timeout_ms: 500,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            unhealthy_interval_ms: 500,
            interval_jitter_ms: 100,
            initial_jitter_ms: 0,
            model_checks: true,
        }
    }
}

impl HealthConfig {
    /// `interval_ms` as a Duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    /// `timeout_ms` as a Duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// `[discovery]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How often each backend's model list is re-read (`RepositoryIndex`). Default 10 s.
    pub refresh_interval_ms: u64,
    /// How long "no backend serves model X" is remembered before probing again.
    /// Default 2000 ms.
    pub negative_cache_ms: u64,
    /// Time one `ModelReady` probe may take. Default 500 ms.
    pub probe_timeout_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh_interval_ms: 10_000,
            negative_cache_ms: 2_000,
            probe_timeout_ms: 500,
        }
    }
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `host:port` of the backend's KServe v2 gRPC endpoint.
    pub address: String,
    /// Models it serves; when empty they are discovered (`RepositoryIndex`, `ModelReady`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Static weight (used by weighted policies). Default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Prometheus endpoint (`host:port`, optionally `/path`; default path `/metrics`)
    /// scraped for load when the backend sends no ORCA reports. Default: none.
    #[serde(default)]
    pub metrics_address: Option<String>,
    /// Which metric names the scrape reads (`preset = "triton"` or `"vllm"`, or
    /// `utilization_metric` / `queue_metric`).
    #[serde(default)]
    pub scrape: crate::config::ScrapeConfig,
    /// Calls the backend runs at once when nothing else shares it (e.g. a Triton
    /// model's instance count times its batch size). gpu_aware then counts one call as
    /// `1 / capacity` of the reported utilization instead of learning that share from
    /// the reports (which several gateway replicas in front of the same backends make
    /// noisy). Default: learned.
    #[serde(default)]
    pub capacity: Option<u32>,
    /// TLS to this backend: default on with `[backend_tls]` or an `https://` address.
    #[serde(default)]
    pub tls: Option<bool>,
    /// Name checked against this backend's certificate; replaces
    /// `[backend_tls].server_name`. Default: the host.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn one() -> u32 {
    1
}

impl BackendConfig {
    /// A backend at `address` with every other field at its default.
    pub fn new(address: impl Into<String>) -> Self {
        BackendConfig {
            address: address.into(),
            models: Vec::new(),
            weight: 1,
            metrics_address: None,
            scrape: crate::config::ScrapeConfig::default(),
            capacity: None,
            tls: None,
            server_name: None,
        }
    }

    /// The address without its `https://` scheme (what the pool keys the backend by).
    pub fn host_port(&self) -> &str {
        self.address
            .strip_prefix("https://")
            .unwrap_or(&self.address)
    }

    /// Whether the gateway talks TLS to it, given whether `[backend_tls]` is set.
    pub fn uses_tls(&self, pool_tls: bool) -> bool {
        self.tls
            .unwrap_or(pool_tls || self.address.starts_with("https://"))
    }
}

/// One `[models.NAME]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model only answers on ModelStreamInfer (learned from the backend's
    /// ModelConfig when not set here).
    pub decoupled: Option<bool>,
    /// Balancing policy for this model; absent = `[balancer].policy`.
    pub policy: Option<PolicyKind>,
    /// `prefix_affinity`: the prompt input, key length, load bound and fallback
    /// threshold; absent = their defaults.
    pub prefix: Option<crate::config::PrefixConfig>,
    /// Bounded concurrency and queue for this model. Default: unlimited.
    pub bulkhead: Option<crate::config::BulkheadConfig>,
    /// Retries for this model; absent = the top-level `[retry]`.
    pub retry: Option<crate::config::RetryConfig>,
    /// Hedging for this model; absent = the top-level `[hedge]`.
    pub hedge: Option<crate::config::HedgeConfig>,
    /// Deadline given to calls that carry none (`grpc-timeout`). Default: none.
    pub deadline_default_ms: Option<u64>,
    /// Longest deadline a call may have; longer ones are cut to this. Default: none.
    pub deadline_max_ms: Option<u64>,
    /// Model to call instead when no backend of this one can take the call.
    pub fallback: Option<String>,
    /// Also fall back when the bulkhead refuses the call. Default false.
    pub fallback_when_full: bool,
    /// Also pass the remaining deadline as Triton's `timeout` request parameter
    /// (microseconds), so the backend's own queue drops work nobody waits for.
    /// Default false.
    pub triton_timeout_parameter: bool,
    /// When an attempt that received nothing counts as its backend's failure;
    /// absent = `[no_response]`.
    pub no_response: Option<crate::config::NoResponseConfig>,
    /// A sequence of this model stays pinned to its backend this long without a
    /// request; absent = `[sequences] idle_ms`.
    pub sequence_idle_ms: Option<u64>,
    /// The response cache of this model (answers reused for identical requests,
    /// identical calls in flight coalesced); absent = off.
    pub cache: Option<crate::config::CacheConfig>,
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token every admin call must carry; the environment variable
    /// `INFERGATE_ADMIN_TOKEN` sets it too. Without one, the admin port must listen on
    /// a loopback address.
    pub token: Option<String>,
    /// Re-read the config file when it changes on disk (checked every second), besides
    /// on SIGHUP. Default true.
    pub watch_config: Option<bool>,
    /// TLS of the admin port; absent = `[tls]`.
    pub tls: Option<TlsConfig>,
    /// Client-certificate identities (SAN URI, SAN DNS or CN) allowed to call the
    /// admin API under mTLS, besides callers with the token. Default: none.
    pub allowed_identities: Vec<String>,
}

/// `[tenants]`: which tenant a call belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Metadata key naming the tenant. Default `x-infergate-tenant`.
    pub header: String,
    /// API keys (sent as `authorization: Bearer KEY` or `x-api-key: KEY`) and the
    /// tenant each belongs to. A key may be written as `sha256:HEX` (the SHA-256 of the
    /// key, in hex), so the file need hold no secret. Once any key is configured, an
    /// unknown key is refused (UNAUTHENTICATED) and the tenant header is ignored
    /// unless `trust_header`. Default: none.
    pub api_keys: BTreeMap<String, String>,
    /// Refuse calls that carry no API key (UNAUTHENTICATED). Default false: they run
    /// as tenant `anonymous`, with that tenant's limits.
    pub require_api_key: bool,
    /// With API keys configured, still take the tenant from the tenant header when the
    /// call carries no key (for deployments behind a proxy that sets it). Default false.
    pub trust_header: bool,
    /// Metadata key carrying a call's priority (an integer; higher first). Default
    /// `x-infergate-priority`. Triton's `priority` request parameter counts too.
    pub priority_header: String,
    /// Client-certificate identities (SAN URI such as a SPIFFE ID, else SAN DNS, else
    /// CN) and the tenant each stands for. A caller with a certificate whose identity
    /// is not listed is the tenant named by the identity itself. Default: none.
    pub identities: BTreeMap<String, String>,
    /// Each tenant's weight in the bulkhead's fair queue (`team-a = 3`); tenants not
    /// named weigh 1. Default: none.
    pub weights: TenantWeights,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            require_api_key: false,
            trust_header: false,
            header: "x-infergate-tenant".into(),
            api_keys: BTreeMap::new(),
            priority_header: "x-infergate-priority".into(),
            identities: BTreeMap::new(),
            weights: TenantWeights::default(),
        }
    }
}

/// What [`Config::redacted`] writes in place of the admin token.
pub const HIDDEN_TOKEN: &str = "(hidden)";
/// What [`Config::redacted`] writes in place of the API key numbered N (in key order).
const HIDDEN_KEY_PREFIX: &str = "(hidden key ";

impl Config {
    /// The config with its secrets replaced by placeholders (the admin token by
    /// [`HIDDEN_TOKEN`], each API key by `(hidden key N)`; tenants stay), for GetConfig.
    /// Its TOML reloads to the same config: [`Config::restore_secrets`] puts the
    /// current secrets back where the placeholders are.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        if config.admin.token.is_some() {
            config.admin.token = Some(HIDDEN_TOKEN.into());
        }
        config.tenants.api_keys = self
            .tenants
            .api_keys
            .values()
            .enumerate()
            .map(|(i, tenant)| (format!("{HIDDEN_KEY_PREFIX}{i})"), tenant.clone()))
            .collect();
        config
    }

    /// Replaces the placeholders of [`Config::redacted`] with the secrets of `current`,
    /// so a reloaded GetConfig keeps every key and the token. A placeholder that no
    /// longer matches a key is an error naming it.
    pub fn restore_secrets(&mut self, current: &Config) -> Result<(), FieldError> {
        if self.admin.token.as_deref() == Some(HIDDEN_TOKEN) {
            self.admin.token.clone_from(&current.admin.token);
        }
        let keys: Vec<&String> = current.tenants.api_keys.keys().collect();
        let mut restored = BTreeMap::new();
        for (key, tenant) in std::mem::take(&mut self.tenants.api_keys) {
            let index = key
                .strip_prefix(HIDDEN_KEY_PREFIX)
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|n| n.parse::<usize>().ok());
            let key = match index {
                None => key,
                Some(i) => match keys.get(i) {
                    Some(real) => (*real).clone(),
                    None => return Err(FieldError::new(
                        format!("tenants.api_keys.\"{key}\""),
                        "a placeholder for a key the gateway does not have; give the key itself",
                    )),
                },
            };
            restored.insert(key, tenant);
        }
        self.tenants.api_keys = restored;
        Ok(())
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = Config::read_file(path)?;
        let source = path.display().to_string();
        let config = Config::parse(&text, &source)?;
        config.validate(&source)?;
        Ok(config)
    }

    /// The text of the config file at `path`, read only up to [`MAX_CONFIG_BYTES`]: a
    /// longer file is refused, naming its size and the limit, after reading at most one
    /// byte past the limit.
    pub fn read_file(path: &Path) -> Result<String, ConfigError> {
        use std::io::Read;
        let error = |reason: String| ConfigError {
            source: path.display().to_string(),
            field: String::new(),
            reason,
        };
        let cannot = |e: std::io::Error| error(format!("cannot read the file: {e}"));
        let file = std::fs::File::open(path).map_err(cannot)?;
        let mut bytes = Vec::new();
        (&file)
            .take(MAX_CONFIG_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(cannot)?;
        if bytes.len() > MAX_CONFIG_BYTES {
            // The size on disk when there is one (not for a pipe, or a file still growing).
            let size = file
                .metadata()
                .map(|m| m.len())
                .ok()
                .filter(|&n| n > MAX_CONFIG_BYTES as u64)
                .map_or_else(
                    || format!("more than {MAX_CONFIG_BYTES}"),
                    |n| n.to_string(),
                );
            return Err(error(too_big("file", &size)));
        }
        String::from_utf8(bytes)
            .map_err(|e| error(format!("cannot read the file: it is not UTF-8 text ({e})")))
    }

    /// Parses TOML text; `source` names it in errors.
    ///
    /// A type or value error names the whole path of its field (`balancer.choice_count`,
    /// `backends[1].weight`), from the deserializer's own position, not from its
    /// message; an unknown field is named under its table (`balancer.polcy`).
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let located = |e: &toml::de::Error| {
            e.span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default()
        };
        let refused = |field: &str, reason: String| ConfigError {
            source: source.to_owned(),
            field: field.to_owned(),
            reason,
        };
        if text.len() > MAX_CONFIG_BYTES {
            return Err(refused("", too_big("text", &text.len().to_string())));
        }
        let document = toml::de::DeTable::parse(text)
            .map_err(|e| refused("", format!("{}{}", e.message(), located(&e))))?;
        // Counted on the parsed document, before a typed table is built for each entry.
        for (key, what, limit) in [
            ("models", "tables", MAX_MODELS),
            ("backends", "entries", MAX_BACKENDS),
        ] {
            let count = document
                .get_ref()
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == key)
                .map_or(0, |(_, v)| match v.get_ref() {
                    toml::de::DeValue::Table(t) => t.len(),
                    toml::de::DeValue::Array(a) => a.len(),
                    _ => 0,
                });
            if count > limit {
                return Err(refused(
                    key,
                    format!("{count} {what}, over the limit of {limit}"),
                ));
            }
        }
        let document = toml::Deserializer::from(document);
        serde_path_to_error::deserialize(document).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner();
            let reason = inner.message().to_owned();
            let mut field = if path == "." { String::new() } else { path };
            // An unknown or missing field is reported at its table: add its own name.
            if let Some(name) = field_from_message(&reason) {
                if !field.ends_with(&name) {
                    field = if field.is_empty() {
                        name
                    } else {
                        format!("{field}.{name}")
                    };
                }
            }
            ConfigError {
                source: source.to_owned(),
                field,
                reason: format!("{reason}{}", located(inner)),
            }
        })
    }

    /// Checks values serde cannot check. `source` names the file in errors.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| ConfigError {
            source: source.to_owned(),
            field,
            reason,
        };
        if self.max_message_bytes == 0 || self.max_message_bytes > (u32::MAX as usize) {
            return Err(err(
                "max_message_bytes".into(),
                format!("must be between 1 and {} bytes", u32::MAX),
            ));
        }
        self.validate_client_limits()
            .map_err(|e| err(e.path, e.reason))?;
        if self.worker_threads == Some(0) {
            return Err(err("worker_threads".into(), "must be at least 1".into()));
        }
        if self.health.interval_ms == 0 {
            return Err(err("health.interval_ms".into(), "must be above 0".into()));
        }
        if self.health.timeout_ms == 0 {
            return Err(err("health.timeout_ms".into(), "must be above 0".into()));
        }
        if self.health.healthy_threshold == 0 || self.health.unhealthy_threshold == 0 {
            return Err(err(
                "health.healthy_threshold".into(),
                "thresholds must be at least 1".into(),
            ));
        }
        let b = &self.balancer;
        if !(0.0..=4.0).contains(&b.active_request_bias) {
            return Err(err(
                "balancer.active_request_bias".into(),
                "must be between 0 and 4".into(),
            ));
        }
        if !(b.queue_weight >= 0.0 && b.queue_weight.is_finite()) {
            return Err(err(
                "balancer.queue_weight".into(),
                "must be 0 or more".into(),
            ));
        }
        if !(0.0..=10.0).contains(&b.spread) {
            return Err(err(
                "balancer.spread".into(),
                "must be between 0 and 10".into(),
            ));
        }
        if self.load.utilization_fields.is_empty() {
            return Err(err(
                "load.utilization_fields".into(),
                "name at least one field (e.g. application_utilization)".into(),
            ));
        }
        if self.load.stale_after_ms == 0 {
            return Err(err("load.stale_after_ms".into(), "must be above 0".into()));
        }
        if self.discovery.refresh_interval_ms == 0 {
            return Err(err(
                "discovery.refresh_interval_ms".into(),
                "must be above 0".into(),
            ));
        }
        let sub = |section: &str, result: Result<(), FieldError>| {
            result.map_err(|e| {
                let e = e.under(section);
                err(e.path, e.reason)
            })
        };
        sub("outlier", self.outlier.validate())?;
        sub("tenants.weights", self.tenants.weights.validate())?;
        sub("tls", self.tls.validate())?;
        if let Some(t) = &self.admin.tls {
            sub("admin.tls", t.validate())?;
        }
        sub("admin", self.validate_admin_identities())?;
        if let Some(t) = &self.backend_tls {
            sub("backend_tls", t.validate())?;
        }
        sub("breaker", self.breaker.validate())?;
        sub("rate_limit", self.rate_limit.validate())?;
        sub("redis", self.redis.validate())?;
        if self.rate_limit.has_global() && self.redis.url.is_none() {
            return Err(err(
                "redis.url".into(),
                "a rate limit has scope = \"global\": name the Redis that holds it (or --redis URL)"
                    .into(),
            ));
        }
        sub("retry", self.retry.validate())?;
        sub("hedge", self.hedge.validate())?;
        sub("sequences", self.sequences.validate())?;
        sub("no_response", self.no_response.validate())?;
        sub("backend_connection", self.backend_connection.validate())?;
        if self.health.unhealthy_interval_ms == 0 {
            return Err(err(
                "health.unhealthy_interval_ms".into(),
                "must be above 0".into(),
            ));
        }
        for (name, model) in &self.models {
            let section = format!("models.{name}");
            if let Some(b) = &model.bulkhead {
                sub(&format!("{section}.bulkhead"), b.validate())?;
            }
            if let Some(r) = &model.retry {
                sub(&format!("{section}.retry"), r.validate())?;
            }
            if let Some(h) = &model.hedge {
                sub(&format!("{section}.hedge"), h.validate())?;
            }
            if let Some(n) = &model.no_response {
                sub(&format!("{section}.no_response"), n.validate())?;
            }
            if let Some(ms) = model.sequence_idle_ms {
                sub(&section, sequence::validate_idle("sequence_idle_ms", ms))?;
            }
            if let Some(p) = &model.prefix {
                sub(&format!("{section}.prefix"), p.validate())?;
            }
            if let Some(c) = &model.cache {
                sub(&format!("{section}.cache"), c.validate())?;
                if c.shared && self.redis.url.is_none() {
                    return Err(err(
                        format!("{section}.cache.shared"),
                        "a shared cache is kept in Redis: set redis.url (or --redis URL)".into(),
                    ));
                }
            }
            for (field, value) in [
                ("deadline_default_ms", model.deadline_default_ms),
                ("deadline_max_ms", model.deadline_max_ms),
            ] {
                if value == Some(0) {
                    return Err(err(
                        format!("{section}.{field}"),
                        "must be above 0 (a zero deadline fails every call)".into(),
                    ));
                }
            }
            if let Some(fallback) = &model.fallback {
                if fallback == name {
                    return Err(err(
                        format!("{section}.fallback"),
                        "a model cannot fall back to itself".into(),
                    ));
                }
            }
            if let (Some(d), Some(m)) = (model.deadline_default_ms, model.deadline_max_ms) {
                if d > m {
                    return Err(err(
                        format!("{section}.deadline_default_ms"),
                        format!("{d} ms is above deadline_max_ms ({m} ms)"),
                    ));
                }
            }
        }
        for (i, d) in self.dns.iter().enumerate() {
            sub(&format!("dns[{i}]"), d.validate())?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, backend) in self.backends.iter().enumerate() {
            parse_host_port(backend.host_port())
                .map_err(|reason| err(format!("backends[{i}].address"), reason))?;
            if backend.tls == Some(false) && backend.address.starts_with("https://") {
                return Err(err(
                    format!("backends[{i}].tls"),
                    "is false, but the address says https://".into(),
                ));
            }
            sub(
                &format!("backends[{i}]"),
                net::check_server_name(backend.server_name.as_deref()),
            )?;
            if !seen.insert(backend.address.as_str()) {
                return Err(err(
                    format!("backends[{i}].address"),
                    format!("`{}` is listed twice", backend.address),
                ));
            }
            if let Some(metrics) = &backend.metrics_address {
                let host_port = metrics.split('/').next().unwrap_or_default();
                parse_host_port(host_port)
                    .map_err(|reason| err(format!("backends[{i}].metrics_address"), reason))?;
            }
            if backend.weight == 0 {
                return Err(err(
                    format!("backends[{i}].weight"),
                    "must be at least 1".into(),
                ));
            }
            if backend.capacity == Some(0) {
                return Err(err(
                    format!("backends[{i}].capacity"),
                    "must be at least 1 (leave it out to learn it from load reports)".into(),
                ));
            }
            for (j, model) in backend.models.iter().enumerate() {
                if model.is_empty() {
                    return Err(err(
                        format!("backends[{i}].models[{j}]"),
                        "model name is empty".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// The TLS of the admin port: `[admin.tls]` when it turns TLS on, else `[tls]`.
    pub fn admin_tls(&self) -> &TlsConfig {
        match &self.admin.tls {
            Some(t) if t.enabled() => t,
            _ => &self.tls,
        }
    }

    /// Whether admin calls need credentials: a token (`token`: set in the file or the
    /// environment) or a client certificate with an allowed identity. Off loopback the
    /// admin port must need them.
    pub fn admin_guarded(&self, token: bool) -> bool {
        token || !self.admin.allowed_identities.is_empty()
    }

    /// `allowed_identities` are read from client certificates, so the admin port must
    /// ask for them.
    fn validate_admin_identities(&self) -> Result<(), FieldError> {
        let identities = &self.admin.allowed_identities;
        if let Some(i) = identities.iter().position(String::is_empty) {
            return Err(FieldError::new(
                format!("allowed_identities[{i}]"),
                "is empty (an identity is a SAN URI, SAN DNS name or CN)",
            ));
        }
        let tls = self.admin_tls();
        let asks_for_certificates = tls.enabled() && tls.client_ca.is_some();
        if !identities.is_empty() && !asks_for_certificates {
            return Err(FieldError::new(
                "allowed_identities",
                "lists client-certificate identities, but the admin port takes no client \
                 certificates: set cert, key and client_ca in [admin.tls] (or in [tls], which \
                 the admin port uses without [admin.tls])",
            ));
        }
        Ok(())
    }

    /// The limits toward clients: buffers, timeouts, streams, headers, connections.
    fn validate_client_limits(&self) -> Result<(), FieldError> {
        let one_message = self.max_message_bytes.saturating_add(5);
        if self.max_buffered_request_bytes_per_connection < one_message {
            return Err(FieldError::new(
                "max_buffered_request_bytes_per_connection",
                format!(
                    "must be at least max_message_bytes + 5 ({one_message} bytes), so that a message of the largest size fits"
                ),
            ));
        }
        if self.max_buffered_request_bytes < self.max_buffered_request_bytes_per_connection {
            return Err(FieldError::new(
                "max_buffered_request_bytes",
                format!(
                    "must be at least max_buffered_request_bytes_per_connection ({} bytes)",
                    self.max_buffered_request_bytes_per_connection
                ),
            ));
        }
        for (field, value) in [
            ("request_read_timeout_ms", self.request_read_timeout_ms),
            (
                "client_handshake_timeout_ms",
                self.client_handshake_timeout_ms,
            ),
            (
                "client_keepalive_timeout_ms",
                self.client_keepalive_timeout_ms,
            ),
            (
                "max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            ("max_client_connections", self.max_client_connections as u64),
        ] {
            if value == 0 {
                return Err(FieldError::new(field, "must be above 0"));
            }
        }
        // Below a few hundred bytes no gRPC call fits (`:path`, `content-type`, `te`).
        if self.max_header_list_bytes < 1024 {
            return Err(FieldError::new(
                "max_header_list_bytes",
                "must be at least 1024 bytes (a gRPC call's own headers need a few hundred)",
            ));
        }
        Ok(())
    }
}

/// The largest config file the gateway reads, and the largest text ReloadConfig takes:
/// 4 MiB, some hundred times a large real config. Bounded so that a file cannot make the
/// gateway parse for seconds or hold gigabytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// The most `[models.NAME]` tables a config may have. Each configured model costs the
/// running gateway about 24 KB (its registry entry, policy and counters): 10,000 of them
/// about 240 MB.
pub const MAX_MODELS: usize = 10_000;
/// The most `[[backends]]` entries a config may have.
pub const MAX_BACKENDS: usize = 10_000;

/// The reason a config `what` (file or text) of `size` bytes is refused.
fn too_big(what: &str, size: &str) -> String {
    format!("the {what} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config file")
}

/// Checks a `host:port` string; returns the reason when it is not one.
pub fn parse_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not host:port (no port)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{address}` is not host:port (no host)"));
    }
    if host.contains('/') {
        return Err(format!(
            "`{address}` is not host:port (give it without a scheme or path)"
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{address}`: port `{port}` is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("`{address}`: port 0 cannot be dialled"));
    }
    Ok((host.to_owned(), port))
}

/// The key that an "unknown field `x`" or "missing field `y`" error is about: serde
/// reports those at the enclosing table, whose path the deserializer gave already.
fn field_from_message(message: &str) -> Option<String> {
    ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| {
            let rest = message.strip_prefix(prefix)?;
            Some(rest.split('`').next()?.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section, fed a wrong type, an out-of-range value or an unknown field:
    /// the message names the file, the whole field path and the reason.
    #[test]
    fn every_section_names_the_file_the_field_path_and_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("listen = \"nope\"", "listen", "invalid socket address"),
            (
                "max_message_bytes = -100",
                "max_message_bytes",
                "invalid value",
            ),
            (
                "[balancer]\nchoice_count = \"fast\"",
                "balancer.choice_count",
                "invalid type",
            ),
            (
                "[balancer]\npolicy = \"fastest\"",
                "balancer.policy",
                "unknown variant",
            ),
            (
                "[balancer]\npolcy = \"gpu_aware\"",
                "balancer.polcy",
                "unknown field",
            ),
            ("[health]\ninterval_ms = 0", "health.interval_ms", "above 0"),
            (
                "[load]\nstale_after_ms = 0",
                "load.stale_after_ms",
                "above 0",
            ),
            (
                "[outlier]\nconsecutive_failurs = 5",
                "outlier.consecutive_failurs",
                "unknown field",
            ),
            (
                "[outlier]\nmax_ejection_percent = 120",
                "outlier.max_ejection_percent",
                "0 to 100",
            ),
            (
                "[breaker]\nminimum_calls = 0",
                "breaker.minimum_calls",
                "at least 1",
            ),
            (
                "[breaker]\nfailure_codes = [\"UNAVALABLE\"]",
                "breaker.failure_codes",
                "UNAVALABLE",
            ),
            ("[retry]\nmax_attempts = 0", "retry.max_attempts", "1..=10"),
            ("[tls]\ncert = \"c.pem\"", "tls.key", "required with `cert`"),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\nrequire_client_cert = true",
                "tls.require_client_cert",
                "needs `client_ca`",
            ),
            (
                "[admin.tls]\nclient_ca = \"ca\"",
                "admin.tls.client_ca",
                "needs `cert`",
            ),
            (
                "[backend_tls]\ncert = \"c\"",
                "backend_tls.key",
                "required with `cert`",
            ),
            (
                "[[backends]]\naddress = \"https://b:1\"\ntls = false",
                "backends[0].tls",
                "https://",
            ),
            (
                "[[backends]]\naddress = \"b:1\"\nserver_name = \"not a name\"",
                "backends[0].server_name",
                "not a DNS name",
            ),
            (
                "[retry]\nretryable_codes = [\"BUSY\"]",
                "retry.retryable_codes",
                "`BUSY`",
            ),
            ("[hedge]\nmax_hedges = 9", "hedge.max_hedges", "1..=4"),
            (
                "[no_response]\nfactor = 0.5",
                "no_response.factor",
                "at least 1",
            ),
            (
                "[backend_connection]\nkeepalive_timeout_ms = 0",
                "backend_connection.keepalive_timeout_ms",
                "above 0",
            ),
            (
                "[rate_limit]\nper_tenant = { rate_per_second = -5 }",
                "rate_limit.per_tenant.rate_per_second",
                "> 0",
            ),
            (
                "[rate_limit.tenants.team-a]\nburst = 0",
                "rate_limit.tenants.team-a.burst",
                ">= 1",
            ),
            ("[tenants]\nheadr = \"x\"", "tenants.headr", "unknown field"),
            (
                "[tenants.weights]\nteam-a = 0",
                "tenants.weights.team-a",
                "from 0.001 to 1000",
            ),
            (
                "[models.m]\nbulkhead = { max_concurrent = 2, min_share_low_priority = 0.9 }",
                "models.m.bulkhead.min_share_low_priority",
                "[0, 0.5]",
            ),
            ("[admin]\ntokn = \"x\"", "admin.tokn", "unknown field"),
            (
                "[[backends]]\naddress = \"127.0.0.1:1\"\nweight = -1",
                "backends[0].weight",
                "invalid value",
            ),
            (
                "[[backends]]\naddress = \"127.0.0.1:1\"\nscrape = { presett = \"vllm\" }",
                "backends[0].scrape.presett",
                "unknown field",
            ),
            (
                "[[dns]]\nname = \"triton.svc\"\nport = 0",
                "dns[0].port",
                "above 0",
            ),
            (
                "[models.simple]\ndeadline_max_ms = 0",
                "models.simple.deadline_max_ms",
                "above 0",
            ),
            (
                "[models.simple]\nbulkhead = { max_concurrent = 4, tenant_share = 2.0 }",
                "models.simple.bulkhead.tenant_share",
                "(0, 1]",
            ),
            (
                "[models.simple.retry]\nmax_attempts = 11",
                "models.simple.retry.max_attempts",
                "1..=10",
            ),
            (
                "[models.simple.no_response]\nfloor_ms = 0",
                "models.simple.no_response.floor_ms",
                "above 0",
            ),
            (
                "max_buffered_request_bytes_per_connection = 1000",
                "max_buffered_request_bytes_per_connection",
                "max_message_bytes + 5 (67108869 bytes)",
            ),
            (
                "max_buffered_request_bytes = 100000000",
                "max_buffered_request_bytes",
                "at least max_buffered_request_bytes_per_connection",
            ),
            (
                "request_read_timeout_ms = 0",
                "request_read_timeout_ms",
                "above 0",
            ),
            (
                "max_concurrent_streams = 0",
                "max_concurrent_streams",
                "above 0",
            ),
            (
                "max_client_connections = 0",
                "max_client_connections",
                "above 0",
            ),
            (
                "client_handshake_timeout_ms = 0",
                "client_handshake_timeout_ms",
                "above 0",
            ),
            (
                "max_header_list_bytes = 100",
                "max_header_list_bytes",
                "at least 1024",
            ),
            (
                "[redis]\nurl = \"http://127.0.0.1:6379\"",
                "redis.url",
                "rediss:// (TLS)",
            ),
            (
                "[redis]\nurl = \"rediss://r:6380/#insecure\"",
                "redis.url",
                "#insecure",
            ),
            (
                "[redis]\nurl = \"redis://r:6379\"\nca = \"ca.pem\"",
                "redis.ca",
                "rediss://",
            ),
            ("[redis]\nca = \"ca.pem\"", "redis.ca", "rediss://"),
            (
                "[redis]\nurl = \"rediss://r:6380\"\nca = \"\"",
                "redis.ca",
                "empty",
            ),
            (
                "[redis]\nurl = \"redis://r:6379\"\ncert = \"c.pem\"\nkey = \"k.pem\"",
                "redis.cert",
                "rediss://",
            ),
            (
                "[redis]\nurl = \"rediss://r:6380\"\ncert = \"c.pem\"",
                "redis.key",
                "required with `cert`",
            ),
            (
                "[redis]\nurl = \"rediss://r:6380\"\nkey = \"k.pem\"",
                "redis.cert",
                "required with `key`",
            ),
            ("[redis]\nlease = 0", "redis.lease", "between 1"),
            ("[redis]\nlease = 1001", "redis.lease", "1000 tokens"),
            ("[redis]\nlease_ms = 0", "redis.lease_ms", "between 1"),
            ("[redis]\nlease_ms = 10001", "redis.lease_ms", "10000 ms"),
        ];
        for (text, field, reason) in cases {
            let err = Config::parse(text, "gw.toml")
                .and_then(|c| c.validate("gw.toml").map(|()| c))
                .expect_err(text);
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("gw.toml: field `{field}`: ")),
                "{text:?}: {message}"
            );
            assert!(message.contains(reason), "{text:?}: {message}");
        }
        // One parser of codes for every list: lower case is fine in [retry] too.
        let ok = Config::parse(
            "[retry]\nretryable_codes = [\"unavailable\"]\n[breaker]\nfailure_codes = [\"unavailable\"]",
            "gw.toml",
        )
        .expect("both lists parse");
        assert_eq!(ok.validate("gw.toml"), Ok(()));
    }

    #[test]
    fn defaults_and_a_full_file_parse() {
        let text = r#"
            listen = "127.0.0.1:9001"
            max_message_bytes = 1048576
            [balancer]
            policy = "round_robin"
            [[backends]]
            address = "127.0.0.1:8101"
            models = ["simple"]
            [models.tiny_llm]
            decoupled = true
        "#;
        let config = Config::parse(text, "gw.toml").expect("parses");
        config.validate("gw.toml").expect("valid");
        assert_eq!(config.balancer.policy, PolicyKind::RoundRobin);
        assert_eq!(config.backends[0].weight, 1);
        assert_eq!(config.models["tiny_llm"].decoupled, Some(true));
        assert_eq!(config.metrics_listen.port(), 8002);
    }

    #[test]
    fn the_documented_example_is_valid_and_shows_the_defaults() {
        // docs/ARCHITECTURE.md's example must parse, and what it sets must be the
        // defaults it claims to show.
        let doc = include_str!("../../../docs/ARCHITECTURE.md");
        let start = doc.find("```toml\n").expect("a toml block") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let config = Config::parse(&doc[start..end], "docs/ARCHITECTURE.md").expect("parses");
        config.validate("docs/ARCHITECTURE.md").expect("valid");
        let defaults = Config::default();
        assert_eq!(config.balancer, defaults.balancer);
        assert_eq!(config.health, defaults.health);
        assert_eq!(config.load, defaults.load);
        assert_eq!(config.outlier, defaults.outlier);
        assert_eq!(config.breaker, defaults.breaker);
        assert_eq!(config.retry, defaults.retry);
        assert_eq!(config.hedge, defaults.hedge);
        assert_eq!(config.tenants, defaults.tenants);
        assert_eq!(config.discovery, defaults.discovery);
    }

    #[test]
    fn redis_urls_tls_ca_and_lease_are_accepted() {
        // (The refusals, by field, are in every_section_names_the_file_the_field_path_and_the_reason.)
        for ok in [
            "url = \"redis://127.0.0.1:6379/0\"\nlease = 1",
            "url = \"redis+unix:///run/redis.sock\"",
            "url = \"rediss://redis.internal:6380\"\nlease = 1000\nlease_ms = 10000",
            "url = \"rediss://redis.internal:6380\"\nca = \"/etc/infergate/redis-ca.pem\"",
            "url = \"rediss://r:6380\"\ncert = \"/etc/infergate/c.pem\"\nkey = \"/etc/infergate/k.pem\"",
        ] {
            let cfg = Config::parse(&format!("[redis]\n{ok}\n"), "gw.toml").expect(ok);
            cfg.validate("gw.toml").expect(ok);
        }
        let defaults = RedisConfig::default();
        assert_eq!((defaults.lease, defaults.lease_ms), (4, 50));
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let err = Config::parse("[health]\ninterval = 5\n", "gw.toml").expect_err("unknown");
        assert_eq!(err.source, "gw.toml");
        assert_eq!(
            err.field, "health.interval",
            "a nested unknown field has its path"
        );
        assert!(err.to_string().contains("line 2"), "{err}");

        let config = Config::parse(
            "[[backends]]\naddress = \"http://x:1\"\n[[backends]]\naddress = \"b:99999\"\n",
            "gw.toml",
        )
        .expect("parses");
        let err = config.validate("gw.toml").expect_err("bad address");
        assert_eq!(err.field, "backends[0].address");
        assert!(err
            .to_string()
            .starts_with("gw.toml: field `backends[0].address`"));

        let err =
            Config::parse("[balancer]\npolicy = \"fastest\"\n", "gw.toml").expect_err("bad policy");
        assert!(err.reason.contains("fastest"), "{err}");
    }

    /// A file of `len` bytes: `[[backends]]` then comment lines padding it out.
    fn padded_file(name: &str, len: usize) -> std::path::PathBuf {
        let mut text = String::from("[[backends]]\naddress = \"127.0.0.1:9000\"\n");
        let line = format!("#{}\n", "x".repeat(1022));
        while text.len() + line.len() <= len {
            text.push_str(&line);
        }
        text.push_str(&"#".repeat(len - text.len()));
        assert_eq!(text.len(), len);
        let path = std::env::temp_dir().join(format!(
            "infergate-config-{name}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write the test file");
        path
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_naming_its_size_and_the_limit() {
        let over = padded_file("over", MAX_CONFIG_BYTES + 1);
        let err = Config::load(&over).expect_err("one byte over the limit");
        let _ = std::fs::remove_file(&over);
        assert_eq!(err.source, over.display().to_string());
        assert_eq!(
            err.reason,
            format!(
                "the file is {} bytes, over the 4194304-byte limit for a config file",
                MAX_CONFIG_BYTES + 1
            )
        );
        assert!(err.to_string().starts_with(&err.source), "{err}");

        let at = padded_file("at", MAX_CONFIG_BYTES);
        let loaded = Config::load(&at);
        let _ = std::fs::remove_file(&at);
        let config = loaded.expect("a file at the limit loads");
        assert_eq!(config.backends.len(), 1);

        // ReloadConfig sends text, not a file: the same limit.
        let text = " ".repeat(MAX_CONFIG_BYTES + 1);
        let err = Config::parse(&text, "ReloadConfig").expect_err("text over the limit");
        assert_eq!(
            err.to_string(),
            "ReloadConfig: the text is 4194305 bytes, over the 4194304-byte limit for a config file"
        );
    }

    #[test]
    fn too_many_models_or_backends_are_refused_with_the_count() {
        fn model(i: usize) -> String {
            format!("[models.m{i}]\n")
        }
        fn backend(i: usize) -> String {
            format!(
                "[[backends]]\naddress = \"10.0.{}.{}:8001\"\n",
                i / 250,
                i % 250
            )
        }
        type Entry = fn(usize) -> String;
        let cases: [(Entry, usize, &str); 2] = [
            (model, MAX_MODELS, "`models`: 10001 tables"),
            (backend, MAX_BACKENDS, "`backends`: 10001 entries"),
        ];
        for (entry, limit, found) in cases {
            let text = |n: usize| (0..n).map(entry).collect::<String>();
            let err = Config::parse(&text(limit + 1), "gw.toml").expect_err("over the limit");
            assert_eq!(
                err.to_string(),
                format!("gw.toml: field {found}, over the limit of 10000")
            );
            let config = Config::parse(&text(limit), "gw.toml").expect("at the limit");
            config.validate("gw.toml").expect("valid at the limit");
            assert_eq!(config.models.len() + config.backends.len(), limit);
        }
    }

    #[test]
    fn allowed_identities_need_client_certificates_on_the_admin_port() {
        let check = |text: &str| {
            Config::parse(text, "gw.toml")
                .expect("parses")
                .validate("gw.toml")
        };
        let admin = "[admin]\nallowed_identities = [\"spiffe://example.org/ops\"]\n";
        let err = check(admin).expect_err("no TLS at all");
        assert_eq!(err.field, "admin.allowed_identities");
        assert!(err.reason.contains("client_ca"), "{err}");
        let tls = "cert = \"c.pem\"\nkey = \"k.pem\"\n";
        let err = check(&format!("{admin}[tls]\n{tls}")).expect_err("TLS without client_ca");
        assert_eq!(err.field, "admin.allowed_identities");
        let mtls = format!("{tls}client_ca = \"ca.pem\"\n");
        check(&format!("{admin}[tls]\n{mtls}")).expect("[tls] with client_ca");
        check(&format!("{admin}[admin.tls]\n{mtls}")).expect("[admin.tls] with client_ca");
        // The admin port's own TLS without client_ca replaces [tls]'s.
        let err = check(&format!("{admin}[admin.tls]\n{tls}[tls]\n{mtls}")).expect_err("own TLS");
        assert_eq!(err.field, "admin.allowed_identities");
        let err = check("[admin]\nallowed_identities = [\"\"]\n").expect_err("empty");
        assert_eq!(err.field, "admin.allowed_identities[0]");
    }
}
