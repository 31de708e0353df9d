//! The simulator's live state: fault knobs that tests and the demo turn while it runs,
//! and the counters they read back.
//!
//! Everything is an atomic or a small mutex that is never held across an `.await`, so a
//! test can flip a fault from any thread (inside or outside a runtime) and the next call
//! sees it. Health (`grpc.health.v1`) is the one piece of state kept elsewhere, by
//! tonic-health; setters push it there at once and a background task repairs it if the
//! push met a concurrent reader.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use futures_util::FutureExt;
use infergate_proto::orca::OrcaLoadReport;
use tokio::time::Instant;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::models::{gpu_utilization, Model};

const RELAXED: Ordering = Ordering::Relaxed;

/// An `f64` stored in an `AtomicU64`.
#[derive(Debug)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn new(v: f64) -> Self {
        Self(AtomicU64::new(v.to_bits()))
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(RELAXED))
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), RELAXED);
    }
}

/// Why a call failed, as Triton labels `nv_inference_request_failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailReason {
    /// Injected faults and failing models: the "backend" failed.
    Backend,
    /// Bad requests.
    Other,
    /// The caller went away first.
    Canceled,
}

impl FailReason {
    pub(crate) const ALL: [FailReason; 3] =
        [FailReason::Backend, FailReason::Other, FailReason::Canceled];

    pub(crate) fn label(self) -> &'static str {
        match self {
            FailReason::Backend => "BACKEND",
            FailReason::Other => "OTHER",
            FailReason::Canceled => "CANCELED",
        }
    }
}

/// Per-model counters, Triton style. Durations are cumulative nanoseconds.
#[derive(Debug, Default)]
pub(crate) struct ModelStats {
    pub(crate) started: AtomicU64,
    pub(crate) success: AtomicU64,
    pub(crate) success_ns: AtomicU64,
    pub(crate) failures: [AtomicU64; 3],
    pub(crate) fail_ns: AtomicU64,
    pub(crate) pending: AtomicU64,
    pub(crate) inference_count: AtomicU64,
    pub(crate) exec_count: AtomicU64,
    pub(crate) queue_ns: AtomicU64,
    pub(crate) compute_ns: AtomicU64,
    pub(crate) last_inference_ms: AtomicU64,
    pub(crate) failing: AtomicBool,
}

impl ModelStats {
    pub(crate) fn failures(&self, reason: FailReason) -> u64 {
        self.failures[reason as usize].load(RELAXED)
    }
}

/// Completions per wall-clock second, for the ORCA `rps_fractional` field.
#[derive(Debug)]
struct RpsWindow {
    second: u64,
    current: u64,
    previous: u64,
}

/// Runtime-changeable faults and counters of one simulator, shared by its handlers,
/// its control HTTP endpoint and the test that spawned it.
#[derive(Debug)]
pub struct SimControl {
    name: String,
    slots: usize,
    models: Vec<(Model, ModelStats)>,
    error_rate: AtomicF64,
    /// The gRPC code injected faults answer with (UNAVAILABLE by default).
    error_code: AtomicU64,
    hidden_load: AtomicF64,
    extra_latency_ms: AtomicU64,
    hang: AtomicBool,
    refuse: AtomicBool,
    ready: AtomicBool,
    started: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
    waited: AtomicU64,
    busy: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_misses: AtomicU64,
    /// KV-cache tokens the running `tiny_llm` calls hold (see [`SimControl::hold_kv`]).
    kv_tokens: AtomicU64,
    last_metadata: Mutex<HashMap<String, String>>,
    rng: Mutex<fastrand::Rng>,
    rps: Mutex<RpsWindow>,
    epoch: Instant,
    changed: tokio::sync::watch::Sender<u64>,
    health: OnceLock<HealthReporter>,
    health_sync: Mutex<()>,
}

impl SimControl {
    pub(crate) fn new(
        name: String,
        slots: usize,
        models: &[Model],
        error_rate: f64,
        hidden_load: f64,
        seed: u64,
    ) -> Self {
        Self {
            name,
            slots,
            models: models.iter().map(|m| (*m, ModelStats::default())).collect(),
            error_rate: AtomicF64::new(error_rate),
            error_code: AtomicU64::new(tonic::Code::Unavailable as u64),
            hidden_load: AtomicF64::new(hidden_load),
            extra_latency_ms: AtomicU64::new(0),
            hang: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            ready: AtomicBool::new(true),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            prefix_misses: AtomicU64::new(0),
            kv_tokens: AtomicU64::new(0),
            last_metadata: Mutex::new(HashMap::new()),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            rps: Mutex::new(RpsWindow {
                second: 0,
                current: 0,
                previous: 0,
            }),
            epoch: Instant::now(),
            changed: tokio::sync::watch::channel(0).0,
            health: OnceLock::new(),
            health_sync: Mutex::new(()),
        }
    }

    /// The simulator's name (logs, metrics, statistics).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Concurrent execution slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Names of the served models.
    pub fn models(&self) -> Vec<&'static str> {
        self.models.iter().map(|(m, _)| m.name()).collect()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The code injected faults answer with, trailers-only (default UNAVAILABLE).
    pub fn set_error_code(&self, code: tonic::Code) {
        self.error_code.store(code as u64, RELAXED);
    }
    /// See [`SimControl::set_error_code`].
    pub fn error_code(&self) -> tonic::Code {
        tonic::Code::from_i32(self.error_code.load(RELAXED) as i32)
    }

    /// Share of calls answered with the error code ("injected fault"; UNAVAILABLE unless
    /// [`SimControl::set_error_code`] says otherwise), clamped to 0..=1.
    pub fn set_error_rate(&self, rate: f64) {
        self.error_rate.set(clamp_fraction(rate));
    }
    /// See [`SimControl::set_error_rate`].
    pub fn error_rate(&self) -> f64 {
        self.error_rate.get()
    }

    /// Extra service time added to every inference.
    pub fn set_extra_latency_ms(&self, ms: u64) {
        self.extra_latency_ms.store(ms, RELAXED);
    }
    /// See [`SimControl::set_extra_latency_ms`].
    pub fn extra_latency_ms(&self) -> u64 {
        self.extra_latency_ms.load(RELAXED)
    }

    /// When on, inference calls are accepted but never answered until the caller cancels.
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, RELAXED);
        self.bump();
    }
    /// See [`SimControl::set_hang`].
    pub fn hang(&self) -> bool {
        self.hang.load(RELAXED)
    }

    /// When on, new TCP connections are accepted and closed at once.
    pub fn set_refuse(&self, refuse: bool) {
        self.refuse.store(refuse, RELAXED);
    }
    /// See [`SimControl::set_refuse`].
    pub fn refuse(&self) -> bool {
        self.refuse.load(RELAXED)
    }

    /// Server readiness: `ServerReady` and the health entry "" follow it.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, RELAXED);
        self.sync_health();
        self.bump();
    }
    /// See [`SimControl::set_ready`].
    pub fn ready(&self) -> bool {
        self.ready.load(RELAXED)
    }

    /// Makes one model fail: its calls are answered UNAVAILABLE, `ModelReady` is false and
    /// its health entry is NOT_SERVING. Unknown or unserved names are ignored.
    pub fn set_model_failing(&self, model: &str, failing: bool) {
        if let Some(stats) = self.stats_by_name(model) {
            stats.failing.store(failing, RELAXED);
            self.sync_health();
            self.bump();
        }
    }
    /// Whether `model` is served and failing.
    pub fn model_failing(&self, model: &str) -> bool {
        self.stats_by_name(model)
            .is_some_and(|s| s.failing.load(RELAXED))
    }

    /// Share of the slots taken by work the gateway cannot see, clamped to 0..=1.
    pub fn set_hidden_load(&self, load: f64) {
        self.hidden_load.set(clamp_fraction(load));
        self.bump();
    }
    /// See [`SimControl::set_hidden_load`].
    pub fn hidden_load(&self) -> f64 {
        self.hidden_load.get()
    }

    /// Inference requests received (unary calls and stream requests).
    pub fn started(&self) -> u64 {
        self.started.load(RELAXED)
    }
    /// Inference requests answered successfully.
    pub fn completed(&self) -> u64 {
        self.completed.load(RELAXED)
    }
    /// Inference requests whose caller went away before they were answered.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(RELAXED)
    }
    /// Inference requests answered with an error.
    pub fn failed(&self) -> u64 {
        self.failed.load(RELAXED)
    }
    /// Inference requests received and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(RELAXED)
    }
    /// Inference requests waiting for a slot.
    pub fn queued(&self) -> u64 {
        self.queued.load(RELAXED)
    }
    /// Inference requests that found every slot taken and had to wait for one.
    pub fn waited(&self) -> u64 {
        self.waited.load(RELAXED)
    }
    pub(crate) fn note_waited(&self) {
        self.waited.fetch_add(1, RELAXED);
    }
    /// Slots executing visible work.
    pub fn busy(&self) -> u64 {
        self.busy.load(RELAXED)
    }
    /// `tiny_llm` calls whose prompt prefix was in the prefix cache.
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits.load(RELAXED)
    }
    /// `tiny_llm` calls whose prompt prefix was not in the prefix cache (0 while it is off).
    pub fn prefix_misses(&self) -> u64 {
        self.prefix_misses.load(RELAXED)
    }
    pub(crate) fn note_prefix(&self, hit: bool) {
        let counter = if hit {
            &self.prefix_hits
        } else {
            &self.prefix_misses
        };
        counter.fetch_add(1, RELAXED);
    }

    /// Reported KV-cache use, 0..=1: the tokens running `tiny_llm` calls hold (prompt
    /// and generation), over [`KV_TOKENS_PER_SLOT`] per slot. Cached prefixes are not
    /// counted: as in vLLM, their blocks are free to be evicted.
    pub fn kv_cache_utilization(&self) -> f64 {
        let capacity = (self.slots as f64) * KV_TOKENS_PER_SLOT as f64;
        (self.kv_tokens.load(RELAXED) as f64 / capacity).clamp(0.0, 1.0)
    }

    /// Counts the KV cache a `tiny_llm` call holds until the guard drops: a token per
    /// four prompt bytes (a rough tokenizer) plus the tokens it generates.
    pub(crate) fn hold_kv(&self, prompt_bytes: usize, max_tokens: u32) -> KvHold<'_> {
        let tokens = (prompt_bytes as u64).div_ceil(4) + u64::from(max_tokens);
        self.kv_tokens.fetch_add(tokens, RELAXED);
        KvHold {
            counter: &self.kv_tokens,
            tokens,
        }
    }

    /// Inference requests received for `model`.
    pub fn per_model_started(&self, model: &str) -> u64 {
        self.stats_by_name(model)
            .map_or(0, |s| s.started.load(RELAXED))
    }

    /// Value of the ASCII metadata `key` (lowercase) on the most recent `ModelInfer` or
    /// `ModelStreamInfer` call.
    pub fn last_request_metadata(&self, key: &str) -> Option<String> {
        let map = self.last_metadata.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key.to_ascii_lowercase()).cloned()
    }

    /// Current reported GPU utilization, 0..=1.
    pub fn gpu_utilization(&self) -> f64 {
        let busy = usize::try_from(self.busy()).unwrap_or(usize::MAX);
        gpu_utilization(busy, self.hidden_load(), self.slots)
    }

    /// Completions in the last full second (roughly the recent rate).
    pub fn recent_rps(&self) -> f64 {
        let now = self.epoch.elapsed().as_secs();
        let w = self.rps.lock().unwrap_or_else(|e| e.into_inner());
        if now == w.second {
            w.previous as f64
        } else if now == w.second + 1 {
            w.current as f64
        } else {
            0.0
        }
    }

    // ----- crate-internal hooks used by the handlers -----

    pub(crate) fn stats(&self, model: Model) -> Option<&ModelStats> {
        self.models
            .iter()
            .find(|(m, _)| *m == model)
            .map(|(_, s)| s)
    }

    pub(crate) fn stats_by_name(&self, name: &str) -> Option<&ModelStats> {
        Model::from_name(name).and_then(|m| self.stats(m))
    }

    pub(crate) fn served(&self) -> impl Iterator<Item = (Model, &ModelStats)> {
        self.models.iter().map(|(m, s)| (*m, s))
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn record_metadata(&self, md: &tonic::metadata::MetadataMap) {
        let mut fresh = HashMap::new();
        for kv in md.iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                if let Ok(v) = v.to_str() {
                    fresh.insert(k.as_str().to_owned(), v.to_owned());
                }
            }
        }
        *self.last_metadata.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// Draws whether this call gets an injected fault.
    pub(crate) fn roll_fault(&self) -> bool {
        let rate = self.error_rate();
        if rate <= 0.0 {
            return false;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        rng.f64() < rate
    }

    pub(crate) fn counter_started(&self) -> &AtomicU64 {
        &self.started
    }
    pub(crate) fn counter_in_flight(&self) -> &AtomicU64 {
        &self.in_flight
    }
    pub(crate) fn counter_queued(&self) -> &AtomicU64 {
        &self.queued
    }
    pub(crate) fn counter_busy(&self) -> &AtomicU64 {
        &self.busy
    }

    pub(crate) fn note_success(&self) {
        self.completed.fetch_add(1, RELAXED);
        let now = self.epoch.elapsed().as_secs();
        let mut w = self.rps.lock().unwrap_or_else(|e| e.into_inner());
        if now != w.second {
            w.previous = if now == w.second + 1 { w.current } else { 0 };
            w.current = 0;
            w.second = now;
        }
        w.current += 1;
    }

    pub(crate) fn note_failure(&self, reason: FailReason) {
        if reason == FailReason::Canceled {
            self.cancelled.fetch_add(1, RELAXED);
        } else {
            self.failed.fetch_add(1, RELAXED);
        }
    }

    /// The load report sent per call and out of band.
    pub(crate) fn load_report(&self) -> OrcaLoadReport {
        // One look at the busy slots for both figures, so that they agree.
        let busy = self.busy();
        let util = gpu_utilization(
            usize::try_from(busy).unwrap_or(usize::MAX),
            self.hidden_load(),
            self.slots,
        );
        OrcaLoadReport {
            application_utilization: util,
            utilization: HashMap::from([("gpu".to_owned(), util)]),
            named_metrics: HashMap::from([
                ("gpu_utilization".to_owned(), util),
                ("queue_depth".to_owned(), self.queued() as f64),
                ("running_requests".to_owned(), busy as f64),
                (
                    "kv_cache_utilization".to_owned(),
                    self.kv_cache_utilization(),
                ),
            ]),
            rps_fractional: self.recent_rps(),
            ..Default::default()
        }
    }

    /// Installs the health reporter and publishes the current statuses.
    pub(crate) fn attach_health(&self, reporter: HealthReporter) {
        let _ = self.health.set(reporter);
        self.sync_health();
    }

    /// Pushes readiness into the health reporter without waiting. Returns false when the
    /// reporter was busy (a concurrent health check); the caller retries later.
    pub(crate) fn sync_health(&self) -> bool {
        let Some(reporter) = self.health.get() else {
            return true;
        };
        let _order = self.health_sync.lock().unwrap_or_else(|e| e.into_inner());
        let ready = self.ready();
        let mut all_done = true;
        let mut set = |name: &str, serving: bool| {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if reporter
                .set_service_status(name, status)
                .now_or_never()
                .is_none()
            {
                all_done = false;
            }
        };
        set("", ready);
        for (model, stats) in self.served() {
            set(model.name(), ready && !stats.failing.load(RELAXED));
        }
        all_done
    }
}

/// KV-cache tokens per slot: a 2048-token context for each call a slot runs.
pub(crate) const KV_TOKENS_PER_SLOT: u64 = 2048;

/// The KV cache one call holds; released on drop, whatever ends the call.
pub(crate) struct KvHold<'a> {
    counter: &'a AtomicU64,
    tokens: u64,
}

impl Drop for KvHold<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.tokens, RELAXED);
    }
}

/// Clamps a fraction to 0..=1 (NaN becomes 0).
pub(crate) fn clamp_fraction(v: f64) -> f64 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 1.0)
    }
}

/// All known model names, for error messages.
pub(crate) fn known_model_names() -> String {
    super::models::KNOWN_MODELS
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}
