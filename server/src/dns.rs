//! DNS discovery: which addresses a backend *name* stands for. Runs beside the request
//! path, like [`crate::health`] and [`crate::discovery`]; no call ever waits on DNS.
//!
//! Why: in Kubernetes a headless service (`my-svc.ns.svc.cluster.local`) answers with
//! one A/AAAA record per ready pod, and that set changes as pods come and go. Resolving
//! the name once at start-up would pin the gateway to the pods of that moment, and
//! handing the name to the HTTP/2 connector would pin each backend connection to one
//! pod. So a [`DnsWatcher`] re-resolves the name every `interval_ms` and reports the
//! difference ([`Change`]); the caller adds a backend for each new address and drains
//! and removes the ones that went away.
//!
//! Rules:
//! - A and AAAA are asked separately, and both must *answer*. An answer may be empty
//!   (NXDOMAIN, or the name exists without records of that type): an empty set is a
//!   real result ("the service has no ready pods") and drains everything.
//! - Any other failure (timeout, refused, SERVFAIL, unreachable name server) is an
//!   error, and an error changes nothing: the previous set stays, so a DNS hiccup never
//!   drains the pool. It is counted in [`DnsStatus`] and logged.
//! - Fixed interval, no caching: the resolver's cache is clamped to zero TTL so that
//!   every round asks the name server, and record TTLs are ignored. In a cluster, the
//!   name server (CoreDNS) caches for its own TTL, so changes show up within
//!   `interval_ms` plus that TTL.
//! - The name server is either given (`nameserver = "10.96.0.10:53"`: UDP, with TCP on
//!   truncation; `/etc/hosts` is not read) or taken from the system (`/etc/resolv.conf`:
//!   its servers, `search` domains and `ndots`, and `/etc/hosts`). A name ending in
//!   `.` is absolute and skips the search list.
//! - Each query waits at most `min(interval_ms, 5 s)` per attempt, two attempts, so a
//!   round normally ends before the next is due; rounds never overlap.

use crate::config::{DnsConfig, MAX_QUERY_TIMEOUT};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::TokioResolver;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::watch;

/// What changed between two successful resolutions. Both lists are sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Addresses to add a backend for.
    pub added: Vec<SocketAddr>,
    /// Addresses whose backend should be drained and removed.
    pub removed: Vec<SocketAddr>,
}

impl Change {
    /// The difference from `old` to `new`.
    pub fn between(old: &BTreeSet<SocketAddr>, new: &BTreeSet<SocketAddr>) -> Change {
        Change {
            added: new.difference(old).copied().collect(),
            removed: old.difference(new).copied().collect(),
        }
    }

    /// Nothing added, nothing removed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// How a watcher is doing, for the admin API and for tests ([`DnsWatcher::status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsStatus {
    /// Resolutions attempted so far.
    pub rounds: u64,
    /// Of those, how many failed (and left the set as it was).
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// The last failure's message; cleared by a success.
    pub last_error: Option<String>,
    /// The set last reported to `apply`; `None` until the first success.
    pub addresses: Option<BTreeSet<SocketAddr>>,
}

/// Re-resolves one [`DnsConfig`] name; see the module documentation.
pub struct DnsWatcher {
    config: DnsConfig,
    resolver: TokioResolver,
    status: watch::Sender<DnsStatus>,
}

impl DnsWatcher {
    /// Validates `config` and builds its resolver (reading `/etc/resolv.conf` when no
    /// `nameserver` is given). Errors name the DNS name.
    pub fn new(config: DnsConfig) -> Result<DnsWatcher, String> {
        config
            .validate()
            .map_err(|e| format!("dns `{}`: {e}", config.name))?;
        let provider = TokioRuntimeProvider::default();
        let mut builder = match config.nameserver {
            Some(ns) => {
                let mut server = NameServerConfig::udp_and_tcp(ns.ip());
                for connection in &mut server.connections {
                    connection.port = ns.port();
                }
                let resolver_config = ResolverConfig::from_name_servers(vec![server]);
                let mut builder = TokioResolver::builder_with_config(resolver_config, provider);
                builder.options_mut().use_hosts_file = ResolveHosts::Never;
                builder
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                format!(
                    "dns `{}`: cannot read the system resolver configuration: {e}",
                    config.name
                )
            })?,
        };
        tune(builder.options_mut(), config.interval());
        let resolver = builder
            .build()
            .map_err(|e| format!("dns `{}`: cannot build a resolver: {e}", config.name))?;
        Ok(DnsWatcher {
            config,
            resolver,
            status: watch::Sender::new(DnsStatus::default()),
        })
    }

    /// The configuration it watches.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// Follows the watcher's progress; take it before [`DnsWatcher::run`].
    pub fn status(&self) -> watch::Receiver<DnsStatus> {
        self.status.subscribe()
    }

    /// Resolves the name once: every A and AAAA address, with the configured port.
    ///
    /// `Ok` with an empty set means the name server answered that there is nothing
    /// (NXDOMAIN, or no A/AAAA records). `Err` means no trustworthy answer (timeout,
    /// refusal, server failure, no reachable name server): keep the previous set.
    pub async fn resolve_once(&self) -> Result<BTreeSet<SocketAddr>, String> {
        let name = self.config.name.as_str();
        let (v4, v6) = tokio::join!(self.lookup(RecordType::A), self.lookup(RecordType::AAAA));
        let mut addresses = BTreeSet::new();
        for (record_type, result) in [(RecordType::A, v4), (RecordType::AAAA, v6)] {
            let ips = result
                .map_err(|e| format!("DNS lookup of `{name}` ({record_type}) failed: {e}"))?;
            addresses.extend(
                ips.into_iter()
                    .map(|ip| SocketAddr::new(ip, self.config.port)),
            );
        }
        Ok(addresses)
    }

    /// One record type; an empty answer (NXDOMAIN or NODATA) is an empty list.
    async fn lookup(&self, record_type: RecordType) -> Result<Vec<IpAddr>, NetError> {
        match self
            .resolver
            .lookup(self.config.name.as_str(), record_type)
            .await
        {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter(|record| record.record_type() == record_type)
                .filter_map(|record| record.data.ip_addr())
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Resolves at once and then every `interval_ms` until `shutdown` turns true (or
    /// its sender goes away). Calls `apply` only when the set changed; the first
    /// successful resolution reports every address as added (nothing, if it is empty).
    /// A failed resolution calls nothing and keeps the previous set.
    pub async fn run(
        self,
        apply: impl Fn(Change) + Send + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let name = self.config.name.clone();
        let mut current: Option<BTreeSet<SocketAddr>> = None;
        let mut ticker = tokio::time::interval(self.config.interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = ticker.tick() => {}
            }
            let result = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                result = self.resolve_once() => result,
            };
            match result {
                Ok(new) => {
                    let old = current.take().unwrap_or_default();
                    let change = Change::between(&old, &new);
                    self.status.send_modify(|s| {
                        s.rounds += 1;
                        s.consecutive_failures = 0;
                        s.last_error = None;
                        s.addresses = Some(new.clone());
                    });
                    if !change.is_empty() {
                        tracing::info!(
                            dns = %name,
                            added = ?change.added,
                            removed = ?change.removed,
                            "DNS backend set changed"
                        );
                        apply(change);
                    }
                    current = Some(new);
                }
                Err(e) => {
                    let mut first = false;
                    self.status.send_modify(|s| {
                        s.rounds += 1;
                        s.failures += 1;
                        s.consecutive_failures += 1;
                        first = s.consecutive_failures == 1;
                        s.last_error = Some(e.clone());
                    });
                    if first {
                        tracing::warn!(dns = %name, error = %e, "DNS resolution failed; keeping the previous backend set");
                    } else {
                        tracing::debug!(dns = %name, error = %e, "DNS resolution still failing");
                    }
                }
            }
        }
    }
}

/// No caching (every round asks the name server), and queries bounded by the interval.
fn tune(options: &mut ResolverOpts, interval: Duration) {
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
    options.timeout = interval.min(MAX_QUERY_TIMEOUT);
    options.attempts = 2;
}

/// Resolves when `shutdown` is true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn change_between_sets() {
        let old: BTreeSet<_> = [addr("10.0.0.1:80"), addr("10.0.0.2:80")].into();
        let new: BTreeSet<_> = [addr("10.0.0.1:80"), addr("10.0.0.3:80")].into();
        let change = Change::between(&old, &new);
        assert_eq!(change.added, vec![addr("10.0.0.3:80")]);
        assert_eq!(change.removed, vec![addr("10.0.0.2:80")]);
        assert!(Change::between(&new, &new).is_empty());
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: DnsConfig =
            toml::from_str("name = \"svc.ns.svc.cluster.local\"\nport = 8001").expect("parses");
        assert_eq!(cfg, DnsConfig::new("svc.ns.svc.cluster.local", 8001));
        assert_eq!(cfg.interval_ms, 5000);
        assert_eq!(cfg.nameserver, None);
        assert!(cfg.validate().is_ok());
        assert!(toml::from_str::<DnsConfig>("name = \"a\"\nport = 1\nbogus = 1").is_err());

        let field = |cfg: DnsConfig| {
            cfg.validate()
                .expect_err("invalid")
                .to_string()
                .split(':')
                .next()
                .map(str::to_owned)
        };
        assert_eq!(field(DnsConfig::new("", 1)).as_deref(), Some("name"));
        assert_eq!(
            field(DnsConfig::new("svc:8001", 1)).as_deref(),
            Some("name")
        );
        assert_eq!(
            field(DnsConfig::new("10.0.0.1", 1)).as_deref(),
            Some("name")
        );
        assert_eq!(field(DnsConfig::new("svc", 0)).as_deref(), Some("port"));
        let mut fast = DnsConfig::new("svc", 1);
        fast.interval_ms = 1;
        assert_eq!(field(fast).as_deref(), Some("interval_ms"));
        let mut ns = DnsConfig::new("svc", 1);
        ns.nameserver = Some(addr("0.0.0.0:53"));
        assert_eq!(field(ns).as_deref(), Some("nameserver"));
    }
}
