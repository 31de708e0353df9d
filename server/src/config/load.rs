//! Settings of load reports: which ORCA fields count and how Prometheus scrapes read
//! (`[load]`, `[backends.scrape]`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[load]`: which report fields count and for how long.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// Fields that make up "utilization"; the maximum of those present counts.
    /// `application_utilization`, `cpu_utilization` and `mem_utilization` are the ORCA
    /// top-level fields; any other name is looked up in `utilization` and then in
    /// `named_metrics`. Default: application_utilization, gpu_utilization,
    /// kv_cache_utilization.
    pub utilization_fields: Vec<String>,
    /// `named_metrics` entry that holds the queue depth. Default `queue_depth`.
    pub queue_field: String,
    /// `named_metrics` entry that holds the number of calls the backend is running (all
    /// clients', not only this gateway's). Optional in reports; where present, the
    /// per-call share is learned from it (see `capacity`). Default `running_requests`;
    /// empty = never read it.
    pub running_field: String,
    /// A report older than this stops counting. Default 3000 ms.
    pub stale_after_ms: u64,
    /// Open ORCA out-of-band streams (`OpenRcaService/StreamCoreMetrics`). Default true.
    pub oob: bool,
    /// Interval asked of out-of-band streams. Default 500 ms.
    pub oob_interval_ms: u64,
    /// Scrape interval for backends with a `metrics_address`. Default 1000 ms.
    pub scrape_interval_ms: u64,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            utilization_fields: [
                "application_utilization",
                "gpu_utilization",
                "kv_cache_utilization",
            ]
            .map(String::from)
            .to_vec(),
            queue_field: "queue_depth".into(),
            running_field: "running_requests".into(),
            stale_after_ms: 3000,
            oob: true,
            oob_interval_ms: 500,
            scrape_interval_ms: 1000,
        }
    }
}

impl LoadConfig {
    /// `stale_after_ms` as a Duration.
    pub fn stale_after(&self) -> Duration {
        Duration::from_millis(self.stale_after_ms)
    }
}

/// Named sets of Prometheus metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScrapePreset {
    /// Triton: `nv_gpu_utilization` (max over GPUs), `nv_inference_pending_request_count`
    /// (sum over models).
    #[default]
    Triton,
    /// vLLM: `vllm:kv_cache_usage_perc`, `vllm:num_requests_waiting` and
    /// `vllm:num_requests_running` (each summed or maxed over labels as fits).
    Vllm,
}

/// Prometheus scrape settings of one backend (`[backends.scrape]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// Metric-name preset.
    pub preset: ScrapePreset,
    /// Overrides the preset's utilization metric.
    pub utilization_metric: Option<String>,
    /// Overrides the preset's queue-depth metric.
    pub queue_metric: Option<String>,
    /// Overrides the preset's running-calls metric (Triton's preset has none).
    pub running_metric: Option<String>,
}

impl ScrapeConfig {
    /// Utilization, queue and running-calls metric names (running: None = none).
    pub(crate) fn names(&self) -> (String, String, Option<String>) {
        let (util, queue, running) = match self.preset {
            ScrapePreset::Triton => (
                "nv_gpu_utilization",
                "nv_inference_pending_request_count",
                None,
            ),
            ScrapePreset::Vllm => (
                "vllm:kv_cache_usage_perc",
                "vllm:num_requests_waiting",
                Some("vllm:num_requests_running"),
            ),
        };
        (
            self.utilization_metric
                .clone()
                .unwrap_or_else(|| util.into()),
            self.queue_metric.clone().unwrap_or_else(|| queue.into()),
            self.running_metric
                .clone()
                .or_else(|| running.map(String::from)),
        )
    }
}
