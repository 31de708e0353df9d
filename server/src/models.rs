//! Per-model admission and recovery settings, made live: the bulkhead, the retry policy
//! and its budget, hedging, deadlines and the fallback model. The request path looks a
//! model up here once per call (a read lock and an `Arc` clone).
//!
//! A model without a `[models.NAME]` table gets the pool-wide `[retry]` and `[hedge]`
//! and a default bulkhead sized from its pool ([`ModelPolicy::fit_bulkhead`]), so a
//! stuck model cannot pile up unbounded calls and memory. Settings can be replaced at
//! run time ([`Models::update`]); calls in flight keep the settings they started with.

use crate::bulkhead::Bulkhead;
use crate::clock;
use crate::config::{BulkheadConfig, HedgeConfig, RetryConfig};
use crate::config::{Config, ModelConfig};
use crate::endpoint::Endpoint;
use crate::retry::{LatencyTracker, NoResponseBound, RetryBudget};
use infergate_base::codes::CodeSet;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Everything the request path needs to know about one model.
#[derive(Debug)]
pub struct ModelPolicy {
    /// The model.
    pub name: String,
    /// Its bulkhead, if it has limits.
    pub bulkhead: Option<Arc<Bulkhead>>,
    /// Whether the bulkhead is the default one, sized from the pool (None: configured,
    /// or none at all).
    auto_bulkhead: Option<AutoSize>,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Codes the retry settings name.
    pub retryable: CodeSet,
    /// Retry (and hedge) budget.
    pub budget: RetryBudget,
    /// Hedging settings.
    pub hedge: HedgeConfig,
    /// Recent latencies (for the hedge delay percentile).
    pub latencies: LatencyTracker,
    /// When an attempt that received nothing counts as its backend's failure.
    pub no_response: NoResponseBound,
    /// Deadline of calls that carry none.
    pub deadline_default: Option<Duration>,
    /// Longest deadline allowed.
    pub deadline_max: Option<Duration>,
    /// Model to call instead when this one has no backend.
    pub fallback: Option<String>,
    /// Also fall back when the bulkhead is full.
    pub fallback_when_full: bool,
    /// Pass the deadline as Triton's `timeout` parameter too.
    pub triton_timeout: bool,
    /// How long a sequence stays pinned without a request (`sequence`).
    pub sequence_idle: Duration,
}

impl ModelPolicy {
    fn new(name: &str, cfg: Option<&ModelConfig>, defaults: &Config) -> ModelPolicy {
        let retry = cfg
            .and_then(|c| c.retry.clone())
            .unwrap_or_else(|| defaults.retry.clone());
        let hedge = cfg
            .and_then(|c| c.hedge.clone())
            .unwrap_or_else(|| defaults.hedge.clone());
        let configured = cfg.and_then(|c| c.bulkhead.clone());
        let auto = configured.is_none();
        let bulkhead = match configured {
            Some(b) => Some(b).filter(|b| b.max_concurrent > 0),
            None => Some(auto_bulkhead(AUTO_PER_BACKEND)),
        };
        ModelPolicy {
            name: name.to_owned(),
            bulkhead: bulkhead.map(|b: BulkheadConfig| Arc::new(Bulkhead::new(name.to_owned(), b))),
            auto_bulkhead: auto.then(AutoSize::default),
            retryable: retry.retryable_codes,
            budget: RetryBudget::new(&retry),
            retry,
            hedge,
            latencies: LatencyTracker::default(),
            no_response: NoResponseBound::new(
                cfg.and_then(|c| c.no_response.clone())
                    .unwrap_or_else(|| defaults.no_response.clone()),
            ),
            deadline_default: cfg
                .and_then(|c| c.deadline_default_ms)
                .map(Duration::from_millis),
            deadline_max: cfg
                .and_then(|c| c.deadline_max_ms)
                .map(Duration::from_millis),
            fallback: cfg.and_then(|c| c.fallback.clone()),
            fallback_when_full: cfg.is_some_and(|c| c.fallback_when_full),
            triton_timeout: cfg.is_some_and(|c| c.triton_timeout_parameter),
            sequence_idle: Duration::from_millis(
                cfg.and_then(|c| c.sequence_idle_ms)
                    .unwrap_or(defaults.sequences.idle_ms),
            ),
        }
    }
}

/// Calls at once per backend in a default bulkhead when the backend's capacity is not
/// known (configured or learned).
pub const AUTO_PER_BACKEND: usize = 64;
/// A default bulkhead admits this many calls per unit of a backend's known capacity:
/// room for a backend's own queue, so the bulkhead bounds a stuck model without
/// queueing calls a healthy pool would have taken.
pub const AUTO_PER_CAPACITY: usize = 4;
/// How often a default bulkhead is re-sized while its route stays the same (learned
/// capacities move).
const AUTO_REFRESH: Duration = Duration::from_secs(1);

/// The limits of a default bulkhead of `size` calls: as many may wait, for up to 1 s.
fn auto_bulkhead(size: usize) -> BulkheadConfig {
    BulkheadConfig {
        max_concurrent: size,
        max_queue: size,
        queue_timeout_ms: 1000,
        ..BulkheadConfig::default()
    }
}

/// The size of a default bulkhead over `endpoints`: [`AUTO_PER_CAPACITY`] calls per
/// call of capacity (configured, or learned from load reports), [`AUTO_PER_BACKEND`]
/// for a backend whose capacity is not known.
pub fn auto_bulkhead_size(endpoints: &[Arc<Endpoint>]) -> usize {
    endpoints
        .iter()
        .map(|e| match e.per_call_utilization() {
            Some(share) if share > 0.0 && share.is_finite() => {
                ((1.0 / share).round() as usize).max(1) * AUTO_PER_CAPACITY
            }
            _ => AUTO_PER_BACKEND,
        })
        .sum::<usize>()
        .clamp(16, 1 << 20)
}

/// When a default bulkhead was last sized, and for which route.
#[derive(Debug, Default)]
struct AutoSize {
    route: AtomicUsize,
    at_nanos: AtomicU64,
}

impl ModelPolicy {
    /// Sizes a default bulkhead to the model's backends (a configured one is left as it
    /// is). Cheap on the hot path: two atomic loads unless the route changed or a
    /// second passed.
    pub fn fit_bulkhead(&self, endpoints: &[Arc<Endpoint>]) {
        let (Some(auto), Some(bulkhead)) = (&self.auto_bulkhead, &self.bulkhead) else {
            return;
        };
        let route = endpoints.as_ptr() as usize ^ endpoints.len();
        let now = clock::nanos(Instant::now());
        let at = auto.at_nanos.load(Ordering::Relaxed);
        if auto.route.load(Ordering::Relaxed) == route
            && now.saturating_sub(at) < AUTO_REFRESH.as_nanos() as u64
        {
            return;
        }
        auto.route.store(route, Ordering::Relaxed);
        auto.at_nanos.store(now, Ordering::Relaxed);
        let size = auto_bulkhead_size(endpoints);
        if bulkhead.config().max_concurrent != size {
            let _ = bulkhead.set_limits(auto_bulkhead(size));
        }
    }
}

/// The live per-model settings.
#[derive(Debug)]
pub struct Models {
    config: RwLock<Config>,
    live: RwLock<HashMap<String, Arc<ModelPolicy>>>,
}

impl Models {
    /// Settings from `config` (only its model tables and defaults are read).
    pub fn new(config: &Config) -> Models {
        Models {
            config: RwLock::new(config.clone()),
            live: RwLock::new(HashMap::new()),
        }
    }

    /// The policy of `model` (made on first use).
    pub fn get(&self, model: &str) -> Arc<ModelPolicy> {
        if let Some(p) = self.live.read().ok().and_then(|l| l.get(model).cloned()) {
            return p;
        }
        let policy = match self.config.read() {
            Ok(cfg) => Arc::new(ModelPolicy::new(model, cfg.models.get(model), &cfg)),
            Err(_) => Arc::new(ModelPolicy::new(model, None, &Config::default())),
        };
        match self.live.write() {
            Ok(mut live) => Arc::clone(live.entry(model.to_owned()).or_insert(policy)),
            Err(_) => policy,
        }
    }

    /// Replaces a model's settings at run time. A bulkhead that stays keeps its slots
    /// and queue (its limits change in place); everything else starts fresh.
    pub fn update(&self, model: &str, cfg: ModelConfig) -> Result<(), String> {
        if let Some(b) = &cfg.bulkhead {
            b.validate().map_err(|e| e.under("bulkhead").to_string())?;
        }
        self.config
            .write()
            .map_err(|_| "settings lock poisoned".to_owned())?
            .models
            .insert(model.to_owned(), cfg);
        self.rebuild(model)
    }

    /// Takes every model setting and default from `next` (a reloaded config), and
    /// rebuilds every live policy from it: a model is left exactly as a fresh start on
    /// `next` would make it (a table removed from the file falls back to the defaults),
    /// except that bulkheads that stay keep their slots and queue.
    pub fn replace_config(&self, next: &Config) -> Result<(), String> {
        let mut names: Vec<String> = self
            .live
            .read()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default();
        names.extend(next.models.keys().cloned());
        names.sort();
        names.dedup();
        *self
            .config
            .write()
            .map_err(|_| "settings lock poisoned".to_owned())? = next.clone();
        for name in names {
            self.rebuild(&name)?;
        }
        Ok(())
    }

    /// The policy of `model` made anew from the current settings.
    fn rebuild(&self, model: &str) -> Result<(), String> {
        let old = self.get(model);
        let mut policy = {
            let config = self
                .config
                .read()
                .map_err(|_| "settings lock poisoned".to_owned())?;
            ModelPolicy::new(model, config.models.get(model), &config)
        };
        if let (Some(live), Some(fresh)) = (&old.bulkhead, &policy.bulkhead) {
            live.set_limits(fresh.config())?;
            policy.bulkhead = Some(Arc::clone(live));
        }
        if let Ok(mut live) = self.live.write() {
            live.insert(model.to_owned(), Arc::new(policy));
        }
        Ok(())
    }

    /// Every model with live settings, sorted by name.
    pub fn all(&self) -> Vec<Arc<ModelPolicy>> {
        let mut all: Vec<_> = self
            .live
            .read()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}
