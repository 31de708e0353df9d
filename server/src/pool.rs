//! The pool: every backend, which models each serves, and the per-model routes the
//! request path reads. The router step of the request path ends here: a model name goes
//! in, a [`ModelRoute`] (candidates + policy) comes out, or a [`RouteError`] that says
//! exactly why there is none.
//!
//! Routes are immutable snapshots (`Arc<ModelRoute>`) rebuilt when membership changes,
//! so the hot path takes one short read lock and clones an `Arc`; it never holds a lock
//! across an await. Unknown models are probed once (`ModelReady` on every backend) and
//! the answer is cached: positively until discovery says otherwise, negatively for
//! `discovery.negative_cache_ms`.

use crate::balance::{Policy, PolicyParams};
use crate::breaker::PermitGuard;
use crate::config::{BackendTlsConfig, BreakerConfig, ConnectionConfig};
use crate::config::{Config, PolicyKind, PrefixConfig};
use crate::discovery;
use crate::endpoint::{Endpoint, Health, Unavailable};
use crate::events::EventBus;
use crate::outlier::{CallOutcome, EventKind, OutlierDetector};
use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// Candidates and policy for one model.
#[derive(Debug)]
pub struct ModelRoute {
    /// The model's name.
    pub model: String,
    /// Whether the model only answers on ModelStreamInfer.
    pub decoupled: bool,
    /// Every endpoint that serves it (eligibility is checked at pick time).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// How to choose among them.
    pub policy: Arc<Policy>,
}

/// Why a call has no backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The pool is empty.
    NoBackends,
    /// No backend serves the model.
    UnknownModel {
        /// The model asked for.
        model: String,
        /// How many backends were asked.
        backends: usize,
        /// Backends its health checks cannot reach, so that the answer may be wrong:
        /// how many, and the first one's address and reason.
        unreachable: Option<(usize, String)>,
    },
    /// Backends serve the model but none can take a call now.
    NoneEligible {
        /// The model asked for.
        model: String,
        /// Counts by reason, e.g. "3 backends, 2 not ready, 1 draining".
        summary: String,
    },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoBackends => f.write_str("no backends are registered with the gateway"),
            RouteError::UnknownModel {
                model,
                backends,
                unreachable,
            } => {
                write!(
                    f,
                    "unknown model '{}': none of the {backends} backends in the pool serves it",
                    infergate_base::text::shown(model)
                )?;
                match unreachable {
                    Some((n, first)) => write!(
                        f,
                        "; {n} of them could not be asked (last check of {first})"
                    ),
                    None => Ok(()),
                }
            }
            RouteError::NoneEligible { model, summary } => {
                write!(f, "model {model}: no backend can take the call ({summary})")
            }
        }
    }
}

/// The backends that health checks cannot reach (so they could not be asked either):
/// how many, and the first one's address and reason (None when there are none).
fn unreachable(endpoints: &[Arc<Endpoint>]) -> Option<(usize, String)> {
    let mut failed = endpoints
        .iter()
        .filter(|e| e.is_unreachable())
        .filter_map(|e| Some(format!("{}: {}", e.address(), e.check_failure()?)));
    let first = failed.next()?;
    Some((1 + failed.count(), first))
}

/// Settings the pool reads from [`Config`].
#[derive(Debug, Clone)]
struct PoolSettings {
    default_policy: PolicyKind,
    params: PolicyParams,
    model_policy: HashMap<String, PolicyKind>,
    model_prefix: HashMap<String, PrefixConfig>,
    model_decoupled: HashMap<String, bool>,
    negative_cache: Duration,
    probe_timeout: Duration,
}

/// The backends and the routes built from them.
#[derive(Debug)]
pub struct Pool {
    settings: PoolSettings,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    routes: RwLock<HashMap<String, Arc<ModelRoute>>>,
    policies: Mutex<HashMap<String, Arc<Policy>>>,
    decoupled: RwLock<HashMap<String, bool>>,
    negative: Mutex<HashMap<String, Instant>>,
    /// Probes of unknown models in progress, one per name: callers asking for the same
    /// name wait on its lock and then find the answer cached; different names never
    /// wait for each other.
    probes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped each time the routes are rebuilt (a model appears or goes, a backend
    /// joins or leaves), so the gateway's own health can follow models it learns.
    routes_changed: tokio::sync::watch::Sender<u64>,
    /// Bounds how many names are probed at once.
    probe_permits: tokio::sync::Semaphore,
    any_policy: Policy,
    breaker: BreakerConfig,
    connection: ConnectionConfig,
    backend_tls: Option<BackendTlsConfig>,
    outlier: Mutex<OutlierDetector>,
    rng: Mutex<fastrand::Rng>,
    panic: AtomicBool,
    events: EventBus,
    policy_overrides: RwLock<HashMap<String, PolicyKind>>,
    /// `[models.X] prefix` as reloads left it (None: back to the defaults).
    prefix_overrides: RwLock<HashMap<String, Option<PrefixConfig>>>,
}

/// Names of unknown models probed at once, at most (each probe asks every backend
/// `ModelReady`, bounded by `discovery.probe_timeout_ms`).
pub const MAX_CONCURRENT_PROBES: usize = 16;

/// Forgets a name's probe lock once its probe is over (the answer is cached by then);
/// callers still waiting on the old lock find the answer when they get it.
struct ProbeDone<'a> {
    probes: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    model: &'a str,
    lock: &'a Arc<tokio::sync::Mutex<()>>,
}

impl Drop for ProbeDone<'_> {
    fn drop(&mut self) {
        if let Ok(mut probes) = self.probes.lock() {
            if probes
                .get(self.model)
                .is_some_and(|l| Arc::ptr_eq(l, self.lock))
            {
                probes.remove(self.model);
            }
        }
    }
}

/// An endpoint chosen for one attempt, with the circuit permits it holds. Dropping the
/// permits without recording (the caller went away) returns them.
pub struct Picked {
    /// The backend.
    pub endpoint: Arc<Endpoint>,
    /// Permit of the backend's breaker.
    pub permit: Option<PermitGuard>,
    /// Permit of the backend × model breaker.
    pub model_permit: Option<PermitGuard>,
}

impl Pool {
    /// A pool with the backends of `config`, tagged with `source`.
    pub fn new(config: &Config, source: &str) -> Result<Arc<Pool>, String> {
        Pool::with_events(config, source, EventBus::default())
    }

    /// A pool that publishes its state changes on `events`.
    pub fn with_events(
        config: &Config,
        source: &str,
        events: EventBus,
    ) -> Result<Arc<Pool>, String> {
        let settings = PoolSettings {
            default_policy: config.balancer.policy,
            params: PolicyParams::new(&config.balancer, config.load.stale_after()),
            model_policy: config
                .models
                .iter()
                .filter_map(|(name, m)| m.policy.map(|p| (name.clone(), p)))
                .collect(),
            model_prefix: config
                .models
                .iter()
                .filter_map(|(name, m)| m.prefix.clone().map(|p| (name.clone(), p)))
                .collect(),
            model_decoupled: config
                .models
                .iter()
                .filter_map(|(name, m)| m.decoupled.map(|d| (name.clone(), d)))
                .collect(),
            negative_cache: Duration::from_millis(config.discovery.negative_cache_ms),
            probe_timeout: Duration::from_millis(config.discovery.probe_timeout_ms),
        };
        let pool = Arc::new(Pool {
            decoupled: RwLock::new(settings.model_decoupled.clone()),
            settings,
            endpoints: RwLock::new(Vec::new()),
            routes: RwLock::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            routes_changed: tokio::sync::watch::Sender::new(0),
            probe_permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_PROBES),
            any_policy: Policy::new(
                config.balancer.policy,
                PolicyParams::new(&config.balancer, config.load.stale_after()),
            ),
            breaker: config.breaker.clone(),
            connection: config.backend_connection.clone(),
            backend_tls: config.backend_tls.clone(),
            outlier: Mutex::new(
                OutlierDetector::new(&config.outlier).map_err(|e| format!("outlier.{e}"))?,
            ),
            rng: Mutex::new(fastrand::Rng::new()),
            panic: AtomicBool::new(false),
            events,
            policy_overrides: RwLock::new(HashMap::new()),
            prefix_overrides: RwLock::new(HashMap::new()),
        });
        for backend in &config.backends {
            pool.add(Endpoint::from_config(
                backend,
                source,
                false,
                &config.breaker,
                &config.backend_connection,
                config.backend_tls.as_ref(),
            )?);
        }
        Ok(pool)
    }

    /// Adds an endpoint and rebuilds the routes.
    pub fn add(&self, endpoint: Arc<Endpoint>) {
        if let Ok(mut outlier) = self.outlier.lock() {
            outlier.add_host(endpoint.address());
        }
        if let Ok(mut endpoints) = self.endpoints.write() {
            endpoints.push(endpoint);
        }
        self.rebuild();
    }

    /// Removes the endpoint at `address` (its background tasks end on their own).
    pub fn remove(&self, address: &str) -> Option<Arc<Endpoint>> {
        let removed = self.endpoints.write().ok().and_then(|mut endpoints| {
            let i = endpoints.iter().position(|e| e.address() == address)?;
            Some(endpoints.remove(i))
        });
        if removed.is_some() {
            if let Ok(mut outlier) = self.outlier.lock() {
                outlier.remove_host(address);
            }
            self.rebuild();
        }
        removed
    }

    /// Sets a model's balancing policy at run time.
    pub fn set_model_policy(&self, model: &str, kind: PolicyKind) {
        if let Ok(mut overrides) = self.policy_overrides.write() {
            overrides.insert(model.to_owned(), kind);
        }
        if let Ok(mut policies) = self.policies.lock() {
            policies.remove(model);
        }
        self.rebuild();
    }

    /// Sets a model's prefix_affinity settings at run time (a reload); None = defaults.
    pub fn set_model_prefix(&self, model: &str, prefix: Option<PrefixConfig>) {
        if let Ok(mut overrides) = self.prefix_overrides.write() {
            overrides.insert(model.to_owned(), prefix);
        }
        if let Ok(mut policies) = self.policies.lock() {
            policies.remove(model);
        }
        self.rebuild();
    }

    /// The circuit-breaker settings new endpoints get.
    pub fn breaker_config(&self) -> &BreakerConfig {
        &self.breaker
    }

    /// How connections to backends are held (PING keepalive).
    pub fn connection_config(&self) -> &ConnectionConfig {
        &self.connection
    }

    /// `[backend_tls]` as the pool was started with (backends added later dial with it).
    pub fn backend_tls_config(&self) -> Option<&BackendTlsConfig> {
        self.backend_tls.as_ref()
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Whether the pool is in panic mode (outlier ejections suspended).
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// The endpoint at `address`.
    pub fn endpoint(&self, address: &str) -> Option<Arc<Endpoint>> {
        self.endpoints()
            .into_iter()
            .find(|e| e.address() == address)
    }

    /// Why the outlier detector ejected `address`, if it is ejected.
    pub fn ejection_reason(&self, address: &str) -> Option<String> {
        let now = Instant::now();
        let outlier = self.outlier.lock().ok()?;
        outlier
            .is_ejected(address, now)
            .then(|| outlier.ejection(address).map(|e| e.reason))
            .flatten()
    }

    /// Feeds one attempt's result to outlier detection (`code` None: a failure without
    /// a status, which always counts). Called by [`crate::attempt::Attempt`] only.
    pub fn record_outlier(&self, endpoint: &Endpoint, code: Option<Code>, elapsed: Duration) {
        let now = Instant::now();
        let outcome = match code {
            Some(code) => CallOutcome::with_code(code, elapsed),
            None => CallOutcome::connect_failure(elapsed),
        };
        let events = match (self.outlier.lock(), self.rng.lock()) {
            (Ok(mut outlier), Ok(mut rng)) => {
                outlier.record(endpoint.address(), outcome, now, &mut rng)
            }
            _ => return,
        };
        if !events.is_empty() {
            self.apply_outlier_events(events);
            self.update_panic();
        }
    }

    /// Publishes a circuit transition.
    pub fn circuit_event(&self, endpoint: &Endpoint, model: &str, t: &crate::breaker::Transition) {
        let kind = format!("circuit_{}", t.to.as_str());
        metrics::counter!(
            "infergate_circuit_transitions_total",
            "backend" => endpoint.address().to_owned(),
            "model" => if model.is_empty() { "all".to_owned() } else { model.to_owned() },
            "to" => t.to.as_str()
        )
        .increment(1);
        self.events
            .publish(&kind, endpoint.address(), model, t.to_string());
    }

    /// Runs the window-based outlier detectors, readmits hosts whose time is up, moves
    /// open circuits whose wait passed to half-open, and updates panic mode. Called every
    /// `outlier.interval_ms`.
    pub fn evaluate(&self) {
        let now = Instant::now();
        let events = match (self.outlier.lock(), self.rng.lock()) {
            (Ok(mut outlier), Ok(mut rng)) => outlier.evaluate(now, &mut rng),
            _ => Vec::new(),
        };
        self.apply_outlier_events(events);
        for endpoint in self.endpoints() {
            for (model, breaker) in endpoint.all_breakers() {
                if let Some(t) = breaker.tick(now) {
                    self.circuit_event(&endpoint, &model, &t);
                }
            }
        }
        self.update_panic();
    }

    /// Ejects a backend by hand for `duration`.
    pub fn eject(&self, address: &str, reason: &str, duration: Duration) -> Result<(), String> {
        let event = self
            .outlier
            .lock()
            .map_err(|_| "outlier state unavailable".to_owned())?
            .eject_manually(address, reason, duration, Instant::now())?;
        self.apply_outlier_events(vec![event]);
        self.update_panic();
        Ok(())
    }

    /// Readmits a backend by hand; false if it was not ejected.
    pub fn readmit(&self, address: &str) -> bool {
        let event = self
            .outlier
            .lock()
            .ok()
            .and_then(|mut o| o.readmit_manually(address));
        let readmitted = event.is_some();
        self.apply_outlier_events(event.into_iter().collect());
        self.update_panic();
        readmitted
    }

    fn apply_outlier_events(&self, events: Vec<crate::outlier::Event>) {
        for event in events {
            let endpoint = self.endpoint(&event.host);
            match &event.kind {
                EventKind::Ejected { until, reason, .. } => {
                    if let Some(e) = &endpoint {
                        e.set_ejected(Some(*until));
                    }
                    metrics::counter!(
                        "infergate_backend_ejections_total",
                        "backend" => event.host.clone(),
                        "reason" => reason_class(reason)
                    )
                    .increment(1);
                    self.events
                        .publish("backend_ejected", &event.host, "", event.to_string());
                }
                EventKind::Readmitted => {
                    if let Some(e) = &endpoint {
                        e.set_ejected(None);
                    }
                    metrics::counter!("infergate_backend_readmissions_total", "backend" => event.host.clone())
                        .increment(1);
                    self.events
                        .publish("backend_readmitted", &event.host, "", event.to_string());
                }
                EventKind::PanicEntered { .. } | EventKind::PanicLeft { .. } => {
                    self.apply_panic(event);
                }
            }
        }
    }

    /// Recomputes panic mode from health and ejections. A backend not checked yet
    /// counts as usable here: panic mode is about backends lost to failures, and at
    /// start every backend is unchecked for a moment (the first ready one would
    /// otherwise put the pool in panic on every start).
    pub fn update_panic(&self) {
        let healthy: HashMap<String, bool> = self
            .endpoints()
            .iter()
            .map(|e| {
                (
                    e.address().to_owned(),
                    matches!(e.health(), Health::Ready | Health::Unknown) && !e.is_draining(),
                )
            })
            .collect();
        let event = self.outlier.lock().ok().and_then(|mut o| {
            o.update_panic(Instant::now(), |k| healthy.get(k).copied().unwrap_or(false))
        });
        if let Some(event) = event {
            self.apply_panic(event);
        }
    }

    fn apply_panic(&self, event: crate::outlier::Event) {
        let entered = matches!(event.kind, EventKind::PanicEntered { .. });
        self.panic.store(entered, Ordering::Relaxed);
        metrics::gauge!("infergate_pool_panic").set(if entered { 1.0 } else { 0.0 });
        if entered {
            tracing::warn!("{event}");
        }
        let kind = if entered {
            "panic_entered"
        } else {
            "panic_left"
        };
        self.events.publish(kind, "", "", event.to_string());
    }

    /// A snapshot of every endpoint.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Whether at least one backend is ready.
    pub fn any_ready(&self) -> bool {
        self.endpoints().iter().any(|e| e.health() == Health::Ready)
    }

    /// Every model some backend serves, sorted.
    pub fn models(&self) -> Vec<Arc<ModelRoute>> {
        let mut models: Vec<_> = self
            .routes
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        models.sort_by(|a: &Arc<ModelRoute>, b| a.model.cmp(&b.model));
        models
    }

    /// The route of a model the pool already knows, without probing.
    pub fn known_route(&self, model: &str) -> Option<Arc<ModelRoute>> {
        self.routes.read().ok()?.get(model).cloned()
    }

    /// Whether a ready backend serves `model` (for the gateway's own ModelReady).
    pub fn model_ready(&self, model: &str) -> bool {
        self.known_route(model)
            .is_some_and(|r| r.endpoints.iter().any(|e| e.health() == Health::Ready))
    }

    /// Re-reads every backend's `RepositoryIndex` once (discovery), and learns the
    /// decoupled flag of new models.
    pub async fn refresh_models(&self, timeout: Duration) {
        let endpoints = self.endpoints();
        let reads = endpoints
            .iter()
            .map(|endpoint| async move { (endpoint, discovery::index(endpoint, timeout).await) });
        for (endpoint, result) in futures_util::future::join_all(reads).await {
            match result {
                Ok(models) => {
                    for model in &models {
                        if !self.decoupled_known(model) {
                            if let Some(decoupled) =
                                discovery::learn_decoupled(endpoint, model, timeout).await
                            {
                                self.set_decoupled(model, decoupled);
                            }
                        }
                    }
                    self.update_models(endpoint, models);
                }
                Err(status) => tracing::debug!(
                    backend = endpoint.address(),
                    code = ?status.code(),
                    "repository index not available: {}",
                    status.message()
                ),
            }
        }
    }

    /// Refreshes the models every `interval` until `shutdown` turns true.
    pub async fn refresh_models_every(
        self: Arc<Self>,
        interval: Duration,
        timeout: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => self.refresh_models(timeout).await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The route for `model`: known already, or found by probing the backends.
    pub async fn route(&self, model: &str) -> Result<Arc<ModelRoute>, RouteError> {
        if let Some(route) = self.known_route(model) {
            return Ok(route);
        }
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err(RouteError::NoBackends);
        }
        let unknown = || RouteError::UnknownModel {
            model: model.to_owned(),
            backends: endpoints.len(),
            unreachable: unreachable(&endpoints),
        };
        if self.recently_missed(model) {
            return Err(unknown());
        }
        // One probe per name: callers asking for the same unknown model queue on its
        // lock and then find the answer cached; other names go on at the same time, up
        // to MAX_CONCURRENT_PROBES of them (more wait for a permit, never for a name).
        let lock = {
            let Ok(mut probes) = self.probes.lock() else {
                return Err(unknown());
            };
            Arc::clone(probes.entry(model.to_owned()).or_default())
        };
        let _probing = lock.lock().await;
        let _done = ProbeDone {
            probes: &self.probes,
            model,
            lock: &lock,
        };
        if let Some(route) = self.known_route(model) {
            return Ok(route);
        }
        if self.recently_missed(model) {
            return Err(unknown());
        }
        let Ok(_permit) = self.probe_permits.acquire().await else {
            return Err(unknown());
        };
        let found = discovery::probe_model(&endpoints, model, self.settings.probe_timeout).await;
        if found.is_empty() {
            if let Ok(mut negative) = self.negative.lock() {
                negative.insert(
                    model.to_owned(),
                    Instant::now() + self.settings.negative_cache,
                );
            }
            return Err(unknown());
        }
        if !self.decoupled_known(model) {
            if let Some(decoupled) =
                discovery::learn_decoupled(&found[0], model, self.settings.probe_timeout).await
            {
                self.set_decoupled(model, decoupled);
            }
        }
        for endpoint in &found {
            endpoint.add_model(model);
        }
        self.rebuild();
        self.known_route(model).ok_or_else(unknown)
    }

    /// Picks an endpoint for one attempt, avoiding `exclude` (backends earlier attempts
    /// of the same call used) where another exists, and takes its circuit permits.
    pub fn pick_for_attempt(
        &self,
        route: &ModelRoute,
        exclude: &[Arc<Endpoint>],
    ) -> Result<Picked, RouteError> {
        self.pick_for_attempt_keyed(route, exclude, None)
    }

    /// [`Pool::pick_for_attempt`] for a call with an affinity key
    /// ([`Policy::affinity_key`]).
    pub fn pick_for_attempt_keyed(
        &self,
        route: &ModelRoute,
        exclude: &[Arc<Endpoint>],
        key: Option<u64>,
    ) -> Result<Picked, RouteError> {
        let panic = self.in_panic();
        let model = route.model.as_str();
        let mut refused: Vec<Arc<Endpoint>> = Vec::new();
        for _ in 0..3 {
            let now = Instant::now();
            let usable = |e: &Endpoint| {
                e.availability(model, now, panic).is_ok()
                    && !refused.iter().any(|r| std::ptr::eq(r.as_ref(), e))
            };
            let fresh =
                |e: &Endpoint| usable(e) && !exclude.iter().any(|x| std::ptr::eq(x.as_ref(), e));
            let endpoint = route
                .policy
                .pick_now_keyed(&route.endpoints, &fresh, key)
                .or_else(|| route.policy.pick_now(&route.endpoints, &usable));
            let Some(endpoint) = endpoint else { break };
            match Pool::take_permits(&endpoint, model, now) {
                Some(picked) => return Ok(picked),
                None => refused.push(endpoint),
            }
        }
        Err(RouteError::NoneEligible {
            model: route.model.clone(),
            summary: self.summarize(&route.endpoints, model),
        })
    }

    /// `endpoint` for one attempt on `model`, with its circuit permits; None when a
    /// circuit refuses (a half-open circuit admits only its probes: the permit decides).
    /// Also the pick of a call whose backend is fixed already (a pinned sequence).
    pub fn take_permits(endpoint: &Arc<Endpoint>, model: &str, now: Instant) -> Option<Picked> {
        let permit = Some(endpoint.breaker().acquire_guard(now)?);
        let model_permit = match endpoint.model_breaker(model) {
            Some(b) => Some(b.acquire_guard(now)?),
            None => None,
        };
        Some(Picked {
            endpoint: Arc::clone(endpoint),
            permit,
            model_permit,
        })
    }

    /// "3 backends: 2 ejected (outlier: 5 consecutive failures), 1 circuit open".
    fn summarize(&self, endpoints: &[Arc<Endpoint>], model: &str) -> String {
        let now = Instant::now();
        let mut reasons: BTreeMap<Unavailable, usize> = BTreeMap::new();
        let mut ejection: Option<String> = None;
        let mut failed_check: Option<String> = None;
        for e in endpoints {
            if let Err(why) = e.availability(model, now, false) {
                *reasons.entry(why).or_default() += 1;
                if why == Unavailable::Ejected && ejection.is_none() {
                    ejection = self.ejection_reason(e.address());
                }
                if matches!(why, Unavailable::NotReady | Unavailable::Unreachable)
                    && failed_check.is_none()
                {
                    failed_check = e
                        .check_failure()
                        .map(|reason| format!("{}: {reason}", e.address()));
                }
            }
        }
        let mut parts = vec![format!(
            "{} backend{}",
            endpoints.len(),
            if endpoints.len() == 1 { "" } else { "s" }
        )];
        for (why, n) in reasons {
            let mut part = format!("{n} {}", why.describe());
            if why == Unavailable::Ejected {
                if let Some(reason) = &ejection {
                    part.push_str(&format!(" (outlier: {reason})"));
                }
            }
            if matches!(why, Unavailable::NotReady | Unavailable::Unreachable) {
                if let Some(reason) = &failed_check {
                    part.push_str(&format!(" (last check of {reason})"));
                }
            }
            parts.push(part);
        }
        if parts.len() == 1 {
            parts.push("all busy with permits taken".into());
        }
        parts.join(", ")
    }

    /// Picks any eligible endpoint, whatever it serves (for calls that name no model,
    /// such as `ModelStatistics` for all models).
    pub fn pick_any(&self) -> Result<Arc<Endpoint>, RouteError> {
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err(RouteError::NoBackends);
        }
        self.any_policy
            .pick_now(&endpoints, &|e| e.is_eligible())
            .ok_or_else(|| RouteError::NoneEligible {
                model: "(any)".into(),
                summary: self.summarize(&endpoints, ""),
            })
    }

    /// Records what a backend's index says it serves; rebuilds routes on change.
    pub fn update_models(&self, endpoint: &Endpoint, models: BTreeSet<String>) {
        if endpoint.set_indexed_models(models) {
            self.rebuild();
        }
    }

    /// Whether the decoupled flag of `model` is known (config or learned).
    pub fn decoupled_known(&self, model: &str) -> bool {
        self.decoupled.read().is_ok_and(|d| d.contains_key(model))
    }

    /// Records whether `model` is decoupled (config wins over what backends say).
    pub fn set_decoupled(&self, model: &str, decoupled: bool) {
        if self.settings.model_decoupled.contains_key(model) {
            return;
        }
        let changed = self
            .decoupled
            .write()
            .is_ok_and(|mut d| d.insert(model.to_owned(), decoupled) != Some(decoupled));
        if changed {
            self.rebuild();
        }
    }

    fn recently_missed(&self, model: &str) -> bool {
        let now = Instant::now();
        self.negative.lock().is_ok_and(|mut negative| {
            negative.retain(|_, until| *until > now);
            negative.contains_key(model)
        })
    }

    fn policy_for(&self, model: &str) -> Arc<Policy> {
        let kind = self
            .policy_overrides
            .read()
            .ok()
            .and_then(|o| o.get(model).copied())
            .or_else(|| self.settings.model_policy.get(model).copied())
            .unwrap_or(self.settings.default_policy);
        let mut params = self.settings.params.clone();
        let overridden = self
            .prefix_overrides
            .read()
            .ok()
            .and_then(|o| o.get(model).cloned());
        if let Some(prefix) =
            overridden.unwrap_or_else(|| self.settings.model_prefix.get(model).cloned())
        {
            params.prefix = prefix;
        }
        match self.policies.lock() {
            Ok(mut policies) => Arc::clone(
                policies
                    .entry(model.to_owned())
                    .or_insert_with(|| Arc::new(Policy::new(kind, params))),
            ),
            Err(_) => Arc::new(Policy::new(kind, params)),
        }
    }

    /// Rebuilds every route from the endpoints' model sets.
    fn rebuild(&self) {
        let endpoints = self.endpoints();
        let mut by_model: HashMap<String, Vec<Arc<Endpoint>>> = HashMap::new();
        for endpoint in &endpoints {
            for model in endpoint.models() {
                by_model
                    .entry(model)
                    .or_default()
                    .push(Arc::clone(endpoint));
            }
        }
        let decoupled = self.decoupled.read().map(|d| d.clone()).unwrap_or_default();
        let routes: HashMap<String, Arc<ModelRoute>> = by_model
            .into_iter()
            .map(|(model, endpoints)| {
                let route = ModelRoute {
                    decoupled: decoupled.get(&model).copied().unwrap_or(false),
                    policy: self.policy_for(&model),
                    model: model.clone(),
                    endpoints,
                };
                (model, Arc::new(route))
            })
            .collect();
        if let Ok(mut negative) = self.negative.lock() {
            negative.retain(|model, _| !routes.contains_key(model));
        }
        if let Ok(mut current) = self.routes.write() {
            *current = routes;
        }
        self.routes_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes each time the routes are rebuilt.
    pub fn routes_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }
}

/// A short, bounded label for an ejection reason (metrics).
fn reason_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("consecutive") {
        "consecutive_failures"
    } else if r.contains("success rate") {
        "success_rate"
    } else if r.contains("latency") {
        "latency"
    } else if r.contains("failure") {
        "failure_percentage"
    } else {
        "manual"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn config(backends: &[(&str, &[&str])]) -> Config {
        Config {
            backends: backends
                .iter()
                .map(|(address, models)| BackendConfig {
                    models: models.iter().map(|m| (*m).to_owned()).collect(),
                    ..BackendConfig::new(*address)
                })
                .collect(),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn routes_follow_configured_models_and_explain_unavailability() {
        let pool = Pool::new(
            &config(&[
                ("127.0.0.1:1", &["simple", "a"]),
                ("127.0.0.1:2", &["simple"]),
            ]),
            "test",
        )
        .expect("pool");
        let route = pool.known_route("simple").expect("route");
        assert_eq!(route.endpoints.len(), 2);
        let err = pool
            .pick_for_attempt(&route, &[])
            .err()
            .expect("nothing checked yet");
        assert_eq!(
            err.to_string(),
            "model simple: no backend can take the call (2 backends, 2 not checked yet)"
        );
        route.endpoints[0].set_health(Health::NotReady);
        route.endpoints[1].set_health(Health::Ready);
        route.endpoints[1].set_draining(true);
        let err = pool
            .pick_for_attempt(&route, &[])
            .err()
            .expect("none eligible");
        assert!(err.to_string().contains("1 not ready, 1 draining"), "{err}");
        route.endpoints[1].set_draining(false);
        assert_eq!(
            pool.pick_for_attempt(&route, &[])
                .expect("pick")
                .endpoint
                .address(),
            "127.0.0.1:2"
        );
    }

    #[tokio::test]
    async fn empty_pool_says_so() {
        let pool = Pool::new(&config(&[]), "test").expect("pool");
        assert_eq!(
            pool.route("simple").await.expect_err("empty"),
            RouteError::NoBackends
        );
    }
}
