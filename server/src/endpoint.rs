//! One backend as the gateway holds it: its connection, its counters and its state.
//! Sits at the bottom of the request path, after the balancer's pick.
//!
//! The in-flight count that least-request balancing reads is kept by [`InFlightGuard`]:
//! it is taken when a call is sent and released when the guard drops, which happens on
//! every path (answer, error, the caller hanging up mid-stream), because the guard lives
//! inside the response body that the server drops when the call ends.

use crate::breaker::{BreakerState, SharedBreaker};
use crate::clock;
use crate::config::BackendConfig;
use crate::config::{BackendTlsConfig, BreakerConfig, ConnectionConfig, ScrapeConfig};
use crate::connection::Connection;
use crate::load::{Load, LoadState, Source};
use std::collections::BTreeSet;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// What active health checks last concluded about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet.
    Unknown,
    /// Passed `healthy_threshold` checks in a row.
    Ready,
    /// Failed `unhealthy_threshold` checks in a row.
    NotReady,
}

impl Health {
    /// Lower-case name for logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Ready => "ready",
            Health::NotReady => "not_ready",
        }
    }
}

/// A backend in the pool.
#[derive(Debug)]
pub struct Endpoint {
    address: String,
    source: String,
    connection: Connection,
    /// Whose failures count against it (`blame`).
    blame: Mutex<crate::blame::Blame>,
    /// Why its last health check failed (None once one passes): the reason a caller
    /// is told when no backend can take a call.
    check_failure: Mutex<Option<String>>,
    /// The last check failed because the backend could not be reached.
    unreachable: AtomicBool,
    health: AtomicU8,
    draining: AtomicBool,
    weight: AtomicU32,
    /// Configured calls at once (0 = learn the per-call share from reports).
    capacity: AtomicU32,
    in_flight: AtomicU64,
    requests_total: AtomicU64,
    failures_total: AtomicU64,
    /// Models it serves (configured, indexed or probed).
    models: RwLock<BTreeSet<String>>,
    /// Whether `models` came from config (then discovery leaves it alone).
    models_pinned: bool,
    /// What the backend last reported about its load.
    load: LoadState,
    /// When it joined the pool.
    added_at: Instant,
    /// Whether it ramps up slowly (it joined a pool that was already serving).
    slow_start: bool,
    /// Prometheus endpoint to scrape when it sends no ORCA reports.
    metrics_address: Option<String>,
    scrape: ScrapeConfig,
    /// Circuit breaker of the whole backend.
    breaker: Arc<SharedBreaker>,
    /// Circuit breakers per model on this backend, made on first use.
    model_breakers: Mutex<HashMap<String, Arc<SharedBreaker>>>,
    breaker_config: BreakerConfig,
    /// Outlier ejection: until when (nanoseconds on the [`clock`]), 0 = not ejected.
    ejected_until: AtomicU64,
    /// Models whose `ModelReady` check failed on this backend.
    models_not_ready: RwLock<HashSet<String>>,
    /// `infergate_backend_attempts_total` handles by outcome (17 codes, then transport
    /// errors), made on first use so the hot path does no label allocation.
    attempt_counters: [std::sync::OnceLock<metrics::Counter>; 18],
    /// Peak-EWMA of successful calls' latency, microseconds (0 = no sample yet).
    latency_ewma_us: AtomicU64,
    /// A low quantile (about the 3rd percentile) of successful calls' latency,
    /// microseconds: what a call takes here when it does not queue (0 = no sample yet).
    latency_floor_us: AtomicU64,
    /// Successful calls folded into the floor (saturates).
    latency_samples: AtomicU32,
    /// When the last one ended ([`clock::nanos`]; 0 = never).
    latency_at_nanos: AtomicU64,
}

/// Why an endpoint cannot take a call for a model right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unavailable {
    /// Failed its health checks.
    NotReady,
    /// Failed its health checks because it could not be reached (refused, reset, a
    /// handshake that failed, or no answer in time).
    Unreachable,
    /// Not checked yet.
    Unchecked,
    /// Drained by an operator.
    Draining,
    /// Ejected by outlier detection (or by hand).
    Ejected,
    /// Its circuit (whole backend) is open.
    CircuitOpen,
    /// Its circuit for this model is open.
    ModelCircuitOpen,
    /// Its `ModelReady` check for this model failed.
    ModelNotReady,
}

impl Unavailable {
    /// Words for the message a caller sees.
    pub fn describe(self) -> &'static str {
        match self {
            Unavailable::NotReady => "not ready",
            Unavailable::Unreachable => "unreachable",
            Unavailable::Unchecked => "not checked yet",
            Unavailable::Draining => "draining",
            Unavailable::Ejected => "ejected",
            Unavailable::CircuitOpen => "circuit open",
            Unavailable::ModelCircuitOpen => "circuit open for the model",
            Unavailable::ModelNotReady => "model not ready there",
        }
    }
}

impl Endpoint {
    /// A backend at `address` (`host:port`); the connection is opened on first use and
    /// re-opened by the channel after failures.
    pub fn new(
        address: &str,
        source: &str,
        models: Vec<String>,
        weight: u32,
    ) -> Result<Arc<Endpoint>, String> {
        let config = BackendConfig {
            address: address.to_owned(),
            models,
            weight,
            metrics_address: None,
            scrape: ScrapeConfig::default(),
            capacity: None,
            tls: None,
            server_name: None,
        };
        Endpoint::from_config(
            &config,
            source,
            false,
            &BreakerConfig::default(),
            &ConnectionConfig::default(),
            None,
        )
    }

    /// A backend as `[[backends]]` describes it; `slow_start` when it joins a pool
    /// that already takes traffic; `backend_tls` the pool's `[backend_tls]`, which with
    /// the backend's own `tls` and `https://` decides whether its channel dials TLS.
    pub fn from_config(
        config: &BackendConfig,
        source: &str,
        slow_start: bool,
        breaker: &BreakerConfig,
        connection: &ConnectionConfig,
        backend_tls: Option<&BackendTlsConfig>,
    ) -> Result<Arc<Endpoint>, String> {
        let breaker_config = breaker.clone();
        let breaker = Arc::new(SharedBreaker::new(breaker).map_err(|e| format!("breaker.{e}"))?);
        let address = config.host_port();
        let models = config.models.clone();
        let weight = config.weight;
        let tls = config.uses_tls(backend_tls.is_some());
        let connector = if tls {
            let client = crate::tls::client_config(backend_tls)
                .map_err(|e| format!("backend `{address}`: {e}"))?;
            let (host, _) = crate::config::parse_host_port(address)
                .map_err(|e| format!("backend `{address}`: {e}"))?;
            let name = config
                .server_name
                .clone()
                .or_else(|| backend_tls.and_then(|t| t.server_name.clone()))
                .unwrap_or(host);
            Some(
                infergate_base::tls::Connector::new(client, &name, address)
                    .map_err(|e| format!("backend `{address}`: server_name: {e}"))?,
            )
        } else {
            None
        };
        let connection = Connection::new(address, connector, connection)
            .map_err(|e| format!("backend `{address}`: {e}"))?;
        let models_pinned = !models.is_empty();
        Ok(Arc::new(Endpoint {
            address: address.to_owned(),
            source: source.to_owned(),
            connection,
            health: AtomicU8::new(Health::Unknown as u8),
            check_failure: Mutex::new(None),
            unreachable: AtomicBool::new(false),
            blame: Mutex::new(crate::blame::Blame::default()),
            draining: AtomicBool::new(false),
            weight: AtomicU32::new(weight.max(1)),
            capacity: AtomicU32::new(config.capacity.unwrap_or(0)),
            in_flight: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            models: RwLock::new(models.into_iter().collect()),
            models_pinned,
            load: LoadState::default(),
            added_at: Instant::now(),
            slow_start,
            metrics_address: config.metrics_address.clone(),
            scrape: config.scrape.clone(),
            breaker,
            model_breakers: Mutex::new(HashMap::new()),
            breaker_config,
            ejected_until: AtomicU64::new(0),
            models_not_ready: RwLock::new(HashSet::new()),
            attempt_counters: Default::default(),
            latency_ewma_us: AtomicU64::new(0),
            latency_floor_us: AtomicU64::new(0),
            latency_samples: AtomicU32::new(0),
            latency_at_nanos: AtomicU64::new(0),
        }))
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Where the backend came from (`config`, `flag`, `demo`, ...).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `tenant`'s call succeeded here (see `blame`). A success that finds the state
    /// busy is not noted (the request path never waits for it); that only makes the
    /// rule blame the backend a little more readily.
    pub fn credit(&self, tenant: u64, now: Instant) {
        if let Ok(mut blame) = self.blame.try_lock() {
            blame.success(tenant, now);
        }
    }

    /// `tenant`'s call failed here in a way that would count against the backend: true
    /// if it does (false: the failure is that tenant's own, see `blame`).
    pub fn blamed(&self, tenant: u64, now: Instant) -> bool {
        self.blame
            .lock()
            .map_or(true, |mut blame| blame.failure(tenant, now))
    }

    /// Records why the last health check failed, or that it passed (None);
    /// `unreachable` when the backend could not be reached at all.
    pub fn set_check_failure(&self, reason: Option<&str>, unreachable: bool) {
        self.unreachable
            .store(reason.is_some() && unreachable, Ordering::Relaxed);
        if let Ok(mut last) = self.check_failure.lock() {
            if last.as_deref() != reason {
                *last = reason.map(str::to_owned);
            }
        }
    }

    /// Out of rotation because its checks cannot reach it (not ready, and the last
    /// check failed to connect, was refused or timed out).
    pub fn is_unreachable(&self) -> bool {
        self.health() == Health::NotReady && self.unreachable.load(Ordering::Relaxed)
    }

    /// Why the last health check failed; None when it passed or none ran yet.
    pub fn check_failure(&self) -> Option<String> {
        self.check_failure.lock().ok().and_then(|last| last.clone())
    }

    /// A handle on the connection (cheap to clone).
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }

    /// Whether it can take a call for `model` now, and if not, the first reason why.
    /// In panic mode outlier ejections are suspended: ejection is a guess from live
    /// traffic and must never send the whole pool away. Failed health checks, open
    /// circuits and drain still count, so a pool that is really down fails fast and
    /// says why.
    pub fn availability(&self, model: &str, now: Instant, panic: bool) -> Result<(), Unavailable> {
        if self.is_draining() {
            return Err(Unavailable::Draining);
        }
        match self.health() {
            Health::Ready => {}
            Health::NotReady if self.unreachable.load(Ordering::Relaxed) => {
                return Err(Unavailable::Unreachable)
            }
            Health::NotReady => return Err(Unavailable::NotReady),
            Health::Unknown => return Err(Unavailable::Unchecked),
        }
        if !panic && self.is_ejected(now) {
            return Err(Unavailable::Ejected);
        }
        if !self.breaker.admits(now) {
            return Err(Unavailable::CircuitOpen);
        }
        if self
            .models_not_ready
            .read()
            .is_ok_and(|m| !m.is_empty() && m.contains(model))
        {
            return Err(Unavailable::ModelNotReady);
        }
        if let Some(b) = self.model_breaker_if_any(model) {
            if !b.admits(now) {
                return Err(Unavailable::ModelCircuitOpen);
            }
        }
        Ok(())
    }

    /// The backend's circuit breaker.
    pub fn breaker(&self) -> &Arc<SharedBreaker> {
        &self.breaker
    }

    /// The circuit breaker for `model` on this backend (made on first use).
    pub fn model_breaker(&self, model: &str) -> Option<Arc<SharedBreaker>> {
        let mut breakers = self.model_breakers.lock().ok()?;
        if let Some(b) = breakers.get(model) {
            return Some(Arc::clone(b));
        }
        let b = Arc::new(SharedBreaker::new(&self.breaker_config).ok()?);
        breakers.insert(model.to_owned(), Arc::clone(&b));
        Some(b)
    }

    fn model_breaker_if_any(&self, model: &str) -> Option<Arc<SharedBreaker>> {
        self.model_breakers.lock().ok()?.get(model).cloned()
    }

    /// Every model breaker that is not closed, with its state.
    pub fn open_model_circuits(&self) -> Vec<(String, BreakerState)> {
        self.model_breakers
            .lock()
            .map(|b| {
                b.iter()
                    .map(|(m, b)| (m.clone(), b.state()))
                    .filter(|(_, s)| *s != BreakerState::Closed)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every breaker of this endpoint (whole backend first), for periodic ticks.
    pub fn all_breakers(&self) -> Vec<(String, Arc<SharedBreaker>)> {
        let mut all = vec![(String::new(), Arc::clone(&self.breaker))];
        if let Ok(b) = self.model_breakers.lock() {
            all.extend(b.iter().map(|(m, b)| (m.clone(), Arc::clone(b))));
        }
        all
    }

    /// Marks it ejected until `until` (None readmits).
    pub fn set_ejected(&self, until: Option<Instant>) {
        self.ejected_until
            .store(until.map(clock::nanos).unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether it is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && clock::nanos(now) < until
    }

    /// Records a `ModelReady` result; returns true if it changed.
    pub fn set_model_ready(&self, model: &str, ready: bool) -> bool {
        self.models_not_ready.write().is_ok_and(|mut m| {
            if ready {
                m.remove(model)
            } else {
                m.insert(model.to_owned())
            }
        })
    }

    /// Models whose readiness check fails here.
    pub fn models_not_ready(&self) -> Vec<String> {
        let mut m: Vec<_> = self
            .models_not_ready
            .read()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        m.sort();
        m
    }

    /// Sets the static weight.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Sets (or with None, clears) the configured capacity.
    pub fn set_capacity(&self, capacity: Option<u32>) {
        self.capacity
            .store(capacity.unwrap_or(0), Ordering::Relaxed);
    }

    /// Configured calls at once, if any.
    pub fn capacity(&self) -> Option<u32> {
        Some(self.capacity.load(Ordering::Relaxed)).filter(|c| *c > 0)
    }

    /// What one call adds to the backend's reported utilization: `1 / capacity` when
    /// configured, else as learned from its reports.
    pub fn per_call_utilization(&self) -> Option<f64> {
        match self.capacity() {
            Some(c) => Some(1.0 / f64::from(c)),
            None => self.load.per_call_utilization(),
        }
    }

    /// Folds a successful call's latency into the backend's peak-EWMA: a slower sample
    /// counts at once, faster ones pull it down gradually (a fifth at a time), so a
    /// backend that slows down is noticed before one that recovers is trusted again.
    pub fn observe_latency(&self, elapsed: Duration) {
        let sample = (elapsed.as_micros() as u64).max(1);
        let old = self.latency_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 || sample >= old {
            sample
        } else {
            old - (old - sample) / 5
        };
        self.latency_ewma_us.store(new, Ordering::Relaxed);
        // The floor moves down half the gap on a faster sample and up a 64th of it on a
        // slower one, so it settles near the 3rd percentile: calls that queued barely
        // move it, while a backend that really slows down raises it within ~100 calls.
        let floor = self.latency_floor_us.load(Ordering::Relaxed);
        let floor = if floor == 0 {
            sample
        } else if sample < floor {
            floor - (floor - sample) / 2
        } else {
            floor + (sample - floor).div_ceil(64)
        };
        self.latency_floor_us.store(floor, Ordering::Relaxed);
        let n = self.latency_samples.load(Ordering::Relaxed);
        self.latency_samples
            .store(n.saturating_add(1), Ordering::Relaxed);
        self.latency_at_nanos
            .store(clock::nanos(Instant::now()), Ordering::Relaxed);
    }

    /// Successful calls a service time needs before the balancer trusts it: the first
    /// calls to a backend are often its slowest (a new connection, a cold model), and a
    /// floor that starts high would keep the backend from the calls that correct it.
    pub const SERVICE_TIME_MIN_SAMPLES: u32 = 8;

    /// The service time the balancer may count on now, in milliseconds: the latency
    /// floor once [`Self::SERVICE_TIME_MIN_SAMPLES`] calls have shaped it, and as long
    /// as it is not older than `max_age` while nothing is in flight. A floor that has
    /// not been confirmed for `max_age` (a backend avoided as slower, or one that only
    /// failed since) is put to the test again: with nothing in flight it counts as
    /// unknown, so the next pick compares it by in-flight calls and most likely sends it
    /// one call, whose answer refreshes the floor. One probe at a time, so a GPU that
    /// really is slower costs one call per `max_age`, and one whose floor was only noise
    /// gets its share back.
    pub fn service_time_ms(&self, now: Instant, max_age: Duration) -> Option<f64> {
        let floor = self.latency_floor_ms()?;
        if self.latency_samples.load(Ordering::Relaxed) < Self::SERVICE_TIME_MIN_SAMPLES {
            return None;
        }
        let at = clock::instant(self.latency_at_nanos.load(Ordering::Relaxed));
        let stale = now.saturating_duration_since(at) > max_age;
        if stale && self.in_flight.load(Ordering::Relaxed) == 0 {
            return None;
        }
        Some(floor)
    }

    /// What a call takes here when it does not queue (a low quantile of successful
    /// calls' latency), in milliseconds, once there is a sample.
    pub fn latency_floor_ms(&self) -> Option<f64> {
        match self.latency_floor_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(us as f64 / 1000.0),
        }
    }

    /// Stores a load report. `per_call`: it came with one of this gateway's responses,
    /// whose call has finished on the backend though it still counts in flight here.
    pub fn report_load(&self, load: Load, source: Source, per_call: bool) {
        let own = self
            .in_flight
            .load(Ordering::Relaxed)
            .saturating_sub(u64::from(per_call));
        self.load
            .store_observed(load, source, Instant::now(), Some(own));
    }

    /// The latency estimate in milliseconds, once there is one.
    pub fn latency_ewma_ms(&self) -> Option<f64> {
        match self.latency_ewma_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(us as f64 / 1000.0),
        }
    }

    /// Counts one attempt's outcome (`None`: transport error).
    pub fn count_attempt(&self, code: Option<tonic::Code>) {
        let slot = code.map(|c| c as usize).unwrap_or(17).min(17);
        self.attempt_counters[slot]
            .get_or_init(|| {
                metrics::counter!(
                    "infergate_backend_attempts_total",
                    "backend" => self.address.clone(),
                    "code" => code.map(infergate_base::codes::name).unwrap_or("TRANSPORT_ERROR")
                )
            })
            .increment(1);
    }

    /// Its last load report.
    pub fn load(&self) -> &LoadState {
        &self.load
    }

    /// Share of full weight while slowly starting: from 0.1 up to 1 over `window`
    /// after it joined (always 1 for backends present at start).
    pub fn slow_start_factor(&self, now: Instant, window: Duration) -> f64 {
        if !self.slow_start || window.is_zero() {
            return 1.0;
        }
        let elapsed = now.saturating_duration_since(self.added_at).as_secs_f64();
        (elapsed / window.as_secs_f64()).clamp(0.1, 1.0)
    }

    /// Prometheus address (`host:port[/path]`) to scrape, if configured.
    pub fn metrics_address(&self) -> Option<&str> {
        self.metrics_address.as_deref()
    }

    /// Scrape settings.
    pub fn scrape(&self) -> &ScrapeConfig {
        &self.scrape
    }

    /// Current health.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Ready,
            2 => Health::NotReady,
            _ => Health::Unknown,
        }
    }

    /// Sets health; returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        let previous = self.health.swap(health as u8, Ordering::Relaxed);
        match previous {
            1 => Health::Ready,
            2 => Health::NotReady,
            _ => Health::Unknown,
        }
    }

    /// Whether the balancer may send it a new call. Health is one input; administrative
    /// drain is another, kept apart so a drained backend is never counted as failed.
    pub fn is_eligible(&self) -> bool {
        self.availability("", Instant::now(), false).is_ok()
    }

    /// Stops (or resumes) new calls to this backend; in-flight calls finish.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Whether it is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Static weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Calls sent and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls sent since it joined.
    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    /// Calls that ended in an error.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// Records the end of a call.
    pub fn record_outcome(&self, ok: bool) {
        if !ok {
            self.failures_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes an in-flight slot, released when the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            endpoint: Arc::clone(self),
        }
    }

    /// Whether it serves `model` (as far as the gateway knows).
    pub fn serves(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|m| m.contains(model))
    }

    /// The models it serves, sorted.
    pub fn models(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds a model learned by probing. Returns true if it was new.
    pub fn add_model(&self, model: &str) -> bool {
        self.models
            .write()
            .is_ok_and(|mut m| m.insert(model.to_owned()))
    }

    /// Replaces the model set with what the backend's index says, unless the set was
    /// fixed in config. Returns true if anything changed.
    pub fn set_indexed_models(&self, models: BTreeSet<String>) -> bool {
        if self.models_pinned {
            return false;
        }
        match self.models.write() {
            Ok(mut current) if *current != models => {
                *current = models;
                true
            }
            _ => false,
        }
    }
}

/// An in-flight slot on one endpoint; dropping it ends the call for accounting.
#[derive(Debug)]
pub struct InFlightGuard {
    endpoint: Arc<Endpoint>,
}

impl InFlightGuard {
    /// The endpoint this slot is on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guard_counts_and_releases() {
        let e = Endpoint::new("127.0.0.1:9", "test", vec![], 1).expect("endpoint");
        let a = e.begin();
        let b = e.begin();
        assert_eq!(e.in_flight(), 2);
        drop(a);
        assert_eq!(e.in_flight(), 1);
        drop(b);
        assert_eq!(e.in_flight(), 0);
        assert_eq!(e.requests_total(), 2);
    }

    #[tokio::test]
    async fn drain_is_separate_from_health() {
        let e = Endpoint::new("127.0.0.1:9", "test", vec!["simple".into()], 1).expect("endpoint");
        assert!(!e.is_eligible(), "unknown health is not eligible");
        e.set_health(Health::Ready);
        assert!(e.is_eligible());
        e.set_draining(true);
        assert!(!e.is_eligible());
        assert_eq!(e.health(), Health::Ready);
        assert!(
            !e.set_indexed_models(BTreeSet::new()),
            "configured models stay"
        );
        assert!(e.serves("simple"));
    }
}
