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
use crate::config::{Config, PolicyKind};
use crate::discovery;
use crate::endpoint::{Endpoint, Health};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

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
            RouteError::UnknownModel { model, backends } => write!(
                f,
                "unknown model '{model}': none of the {backends} backends in the pool serves it"
            ),
            RouteError::NoneEligible { model, summary } => {
                write!(f, "model {model}: no backend can take the call ({summary})")
            }
        }
    }
}

/// Settings the pool reads from [`Config`].
#[derive(Debug, Clone)]
struct PoolSettings {
    default_policy: PolicyKind,
    params: PolicyParams,
    model_policy: HashMap<String, PolicyKind>,
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
    probe_lock: tokio::sync::Mutex<()>,
    any_policy: Policy,
}

impl Pool {
    /// A pool with the backends of `config`, tagged with `source`.
    pub fn new(config: &Config, source: &str) -> Result<Arc<Pool>, String> {
        let settings = PoolSettings {
            default_policy: config.balancer.policy,
            params: PolicyParams::new(&config.balancer, config.load.stale_after()),
            model_policy: config
                .models
                .iter()
                .filter_map(|(name, m)| m.policy.map(|p| (name.clone(), p)))
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
            probe_lock: tokio::sync::Mutex::new(()),
            any_policy: Policy::new(
                config.balancer.policy,
                PolicyParams::new(&config.balancer, config.load.stale_after()),
            ),
        });
        for backend in &config.backends {
            pool.add(Endpoint::from_config(backend, source, false)?);
        }
        Ok(pool)
    }

    /// Adds an endpoint and rebuilds the routes.
    pub fn add(&self, endpoint: Arc<Endpoint>) {
        if let Ok(mut endpoints) = self.endpoints.write() {
            endpoints.push(endpoint);
        }
        self.rebuild();
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
        };
        if self.recently_missed(model) {
            return Err(unknown());
        }
        // One probe at a time: callers asking for the same unknown model queue here and
        // then find the answer cached.
        let _probing = self.probe_lock.lock().await;
        if let Some(route) = self.known_route(model) {
            return Ok(route);
        }
        if self.recently_missed(model) {
            return Err(unknown());
        }
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

    /// Picks an endpoint for a call on `route`, or says why none can take it.
    pub fn pick(&self, route: &ModelRoute) -> Result<Arc<Endpoint>, RouteError> {
        route
            .policy
            .pick_now(&route.endpoints)
            .ok_or_else(|| RouteError::NoneEligible {
                model: route.model.clone(),
                summary: summarize(&route.endpoints),
            })
    }

    /// Picks any eligible endpoint, whatever it serves (for calls that name no model,
    /// such as `ModelStatistics` for all models).
    pub fn pick_any(&self) -> Result<Arc<Endpoint>, RouteError> {
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err(RouteError::NoBackends);
        }
        self.any_policy
            .pick_now(&endpoints)
            .ok_or_else(|| RouteError::NoneEligible {
                model: "(any)".into(),
                summary: summarize(&endpoints),
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
            .settings
            .model_policy
            .get(model)
            .copied()
            .unwrap_or(self.settings.default_policy);
        match self.policies.lock() {
            Ok(mut policies) => Arc::clone(
                policies
                    .entry(model.to_owned())
                    .or_insert_with(|| Arc::new(Policy::new(kind, self.settings.params.clone()))),
            ),
            Err(_) => Arc::new(Policy::new(kind, self.settings.params.clone())),
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
    }
}

/// "3 backends: 1 not ready, 1 draining, 1 not checked yet".
fn summarize(endpoints: &[Arc<Endpoint>]) -> String {
    let count = |f: &dyn Fn(&Endpoint) -> bool| endpoints.iter().filter(|e| f(e)).count();
    let not_ready = count(&|e| e.health() == Health::NotReady);
    let unknown = count(&|e| e.health() == Health::Unknown);
    let draining = count(&|e| e.health() == Health::Ready && e.is_draining());
    let mut parts = vec![format!(
        "{} backend{}",
        endpoints.len(),
        if endpoints.len() == 1 { "" } else { "s" }
    )];
    for (n, what) in [
        (not_ready, "not ready"),
        (unknown, "not checked yet"),
        (draining, "draining"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    parts.join(", ")
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
        let err = pool.pick(&route).expect_err("nothing checked yet");
        assert_eq!(
            err.to_string(),
            "model simple: no backend can take the call (2 backends, 2 not checked yet)"
        );
        route.endpoints[0].set_health(Health::NotReady);
        route.endpoints[1].set_health(Health::Ready);
        route.endpoints[1].set_draining(true);
        let err = pool.pick(&route).expect_err("none eligible");
        assert!(err.to_string().contains("1 not ready, 1 draining"), "{err}");
        route.endpoints[1].set_draining(false);
        assert_eq!(pool.pick(&route).expect("pick").address(), "127.0.0.1:2");
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
