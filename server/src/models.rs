//! Per-model admission and recovery settings, made live: the bulkhead, the retry policy
//! and its budget, hedging, deadlines and the fallback model. The request path looks a
//! model up here once per call (a read lock and an `Arc` clone).
//!
//! A model without a `[models.NAME]` table gets the pool-wide `[retry]` and `[hedge]`
//! and no bulkhead (unlimited concurrency). Settings can be replaced at run time
//! ([`Models::update`]); calls in flight keep the settings they started with.

use crate::bulkhead::{Bulkhead, BulkheadConfig};
use crate::config::{Config, ModelConfig};
use crate::retry::{parse_codes, HedgeConfig, LatencyTracker, RetryBudget, RetryConfig};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::Code;

/// Everything the request path needs to know about one model.
#[derive(Debug)]
pub struct ModelPolicy {
    /// The model.
    pub name: String,
    /// Its bulkhead, if it has limits.
    pub bulkhead: Option<Arc<Bulkhead>>,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Codes the retry settings name.
    pub retryable: Vec<Code>,
    /// Retry (and hedge) budget.
    pub budget: RetryBudget,
    /// Hedging settings.
    pub hedge: HedgeConfig,
    /// Recent latencies (for the hedge delay percentile).
    pub latencies: LatencyTracker,
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
}

impl ModelPolicy {
    fn new(name: &str, cfg: Option<&ModelConfig>, defaults: &Config) -> ModelPolicy {
        let retry = cfg
            .and_then(|c| c.retry.clone())
            .unwrap_or_else(|| defaults.retry.clone());
        let hedge = cfg
            .and_then(|c| c.hedge.clone())
            .unwrap_or_else(|| defaults.hedge.clone());
        ModelPolicy {
            name: name.to_owned(),
            bulkhead: cfg
                .and_then(|c| c.bulkhead.clone())
                .filter(|b| b.max_concurrent > 0)
                .map(|b: BulkheadConfig| Arc::new(Bulkhead::new(name.to_owned(), b))),
            retryable: parse_codes(&retry.retryable_codes)
                .unwrap_or_else(|_| vec![Code::Unavailable]),
            budget: RetryBudget::new(&retry),
            retry,
            hedge,
            latencies: LatencyTracker::default(),
            deadline_default: cfg
                .and_then(|c| c.deadline_default_ms)
                .map(Duration::from_millis),
            deadline_max: cfg
                .and_then(|c| c.deadline_max_ms)
                .map(Duration::from_millis),
            fallback: cfg.and_then(|c| c.fallback.clone()),
            fallback_when_full: cfg.is_some_and(|c| c.fallback_when_full),
            triton_timeout: cfg.is_some_and(|c| c.triton_timeout_parameter),
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
            b.validate()?;
        }
        let old = self.get(model);
        let mut policy = {
            let mut config = self
                .config
                .write()
                .map_err(|_| "settings lock poisoned".to_owned())?;
            config.models.insert(model.to_owned(), cfg.clone());
            ModelPolicy::new(model, Some(&cfg), &config)
        };
        if let (Some(live), Some(limits)) =
            (&old.bulkhead, cfg.bulkhead.filter(|b| b.max_concurrent > 0))
        {
            live.set_limits(limits)?;
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
