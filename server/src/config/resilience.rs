//! Settings of the request path's recovery state machines: circuit breakers, outlier
//! detection, retries and hedging, bulkheads, and the no-response bound.

use super::FieldError;
use infergate_base::codes::CodeSet;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tonic::Code;

/// Longest wait or window the config accepts (one day); keeps `Instant` arithmetic far
/// from overflow.
pub(crate) const MAX_DURATION_MS: u64 = 86_400_000;

/// Largest count window accepted.
pub(crate) const MAX_WINDOW_SIZE: u32 = 100_000;

/// How the closed state's sliding window is measured.
///
/// In TOML: `window = { kind = "count", size = 20 }` or
/// `window = { kind = "time", seconds = 30 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowKind {
    /// The last `size` calls (1 to 100000).
    Count {
        /// Calls in the window.
        size: u32,
    },
    /// The calls of the last `seconds` seconds (1 to 86400), kept in one-second buckets:
    /// a result stays counted between `seconds - 1` and `seconds` seconds.
    Time {
        /// Length of the window.
        seconds: u64,
    },
}

impl Default for WindowKind {
    fn default() -> Self {
        WindowKind::Count { size: 20 }
    }
}

/// `[breaker]`: settings of one circuit breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// The closed state's sliding window. Default the last 20 calls.
    pub window: WindowKind,
    /// Share of failed calls in the window (0 < x ≤ 1) that opens the breaker.
    /// Default 0.5.
    pub failure_rate_threshold: f64,
    /// A call that takes at least this long is slow (whatever its status). Default 2000.
    pub slow_call_duration_ms: u64,
    /// Share of slow calls in the window (0 < x ≤ 1) that opens the breaker; 1.0 turns
    /// slow-call tripping off (use 0.99 to trip only when every call is slow).
    /// Default 1.0 (off).
    pub slow_call_rate_threshold: f64,
    /// Calls the window must hold before rates are judged (at most the count window's
    /// size). Default 10.
    pub minimum_calls: u32,
    /// How long the breaker stays open the first time. Default 5000 ms.
    pub open_wait_ms: u64,
    /// Cap on the open wait, which doubles with each consecutive opening (a half-open
    /// trial that fails counts as one). Default 60000 ms.
    pub open_wait_max_ms: u64,
    /// Probe calls let through while half-open; all their results decide. Default 3.
    pub half_open_permits: u32,
    /// gRPC codes that count as failures, by name. Default `UNAVAILABLE`, `INTERNAL`,
    /// `UNKNOWN`, `DEADLINE_EXCEEDED`, `DATA_LOSS`. Client errors (`INVALID_ARGUMENT`,
    /// `NOT_FOUND`, ...) say nothing about the backend's health and should not be here;
    /// `OK` is refused.
    pub failure_codes: CodeSet,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: WindowKind::default(),
            failure_rate_threshold: 0.5,
            slow_call_duration_ms: 2000,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 10,
            open_wait_ms: 5000,
            open_wait_max_ms: 60_000,
            half_open_permits: 3,
            failure_codes: CodeSet::of(&[
                Code::Unavailable,
                Code::Internal,
                Code::Unknown,
                Code::DeadlineExceeded,
                Code::DataLoss,
            ]),
        }
    }
}

impl BreakerConfig {
    /// Checks values serde cannot check. The error starts with the field's name
    /// (`failure_rate_threshold: must be ...`), so the caller can prefix its section.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self.window {
            WindowKind::Count { size } => {
                if size == 0 || size > MAX_WINDOW_SIZE {
                    return Err(FieldError::new(
                        "window.size",
                        format!("must be between 1 and {MAX_WINDOW_SIZE} (got {size})"),
                    ));
                }
                if self.minimum_calls > size {
                    return Err(FieldError::new(
                        "minimum_calls",
                        format!(
                            "{} is more than window.size {size}, so the breaker could never open",
                            self.minimum_calls
                        ),
                    ));
                }
            }
            WindowKind::Time { seconds } => {
                if seconds == 0 || seconds > MAX_DURATION_MS / 1000 {
                    return Err(FieldError::new(
                        "window.seconds",
                        format!(
                            "must be between 1 and {} (got {seconds})",
                            MAX_DURATION_MS / 1000
                        ),
                    ));
                }
            }
        }
        check_rate("failure_rate_threshold", self.failure_rate_threshold)?;
        check_rate("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        check_ms("slow_call_duration_ms", self.slow_call_duration_ms)?;
        if self.minimum_calls == 0 {
            return Err(FieldError::new("minimum_calls", "must be at least 1"));
        }
        check_ms("open_wait_ms", self.open_wait_ms)?;
        check_ms("open_wait_max_ms", self.open_wait_max_ms)?;
        if self.open_wait_max_ms < self.open_wait_ms {
            return Err(FieldError::new(
                "open_wait_max_ms",
                format!(
                    "{} is less than open_wait_ms {}",
                    self.open_wait_max_ms, self.open_wait_ms
                ),
            ));
        }
        if self.half_open_permits == 0 || self.half_open_permits > 1000 {
            return Err(FieldError::new(
                "half_open_permits",
                format!(
                    "must be between 1 and 1000 (got {})",
                    self.half_open_permits
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn check_rate(field: &str, value: f64) -> Result<(), FieldError> {
    if value.is_finite() && value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be a fraction above 0 and at most 1 (got {value})"),
        ))
    }
}

pub(crate) fn check_ms(field: &str, value: u64) -> Result<(), FieldError> {
    if value == 0 || value > MAX_DURATION_MS {
        Err(FieldError::new(
            field,
            format!("must be between 1 and {MAX_DURATION_MS} ms (got {value})"),
        ))
    } else {
        Ok(())
    }
}

/// Longest ejection the config accepts (one day); keeps `Instant` arithmetic far from
/// overflow.
pub(crate) const MAX_EJECTION_MS: u64 = 86_400_000;

/// `[outlier]`: passive outlier detection for one pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failed calls in a row that eject a host at once; 0 = off. Default 5.
    pub consecutive_failures: u32,
    /// Share of failed calls in one interval (a fraction, 0.5 = 50%) that ejects a host;
    /// 0 = off. Default 0.5.
    pub failure_percentage_threshold: f64,
    /// Calls a host needs in the interval before its failure share is judged. Default 20.
    pub failure_percentage_minimum_volume: u32,
    /// Ejects hosts whose success rate is under `mean − factor × stdev` of the pool's;
    /// 0 = off. Default 1.9.
    pub success_rate_stdev_factor: f64,
    /// Hosts with enough volume needed before success rates are compared (at least 2).
    /// Default 3.
    pub success_rate_minimum_hosts: u32,
    /// Calls a host needs in the interval to take part in the success-rate comparison.
    /// Default 20.
    pub success_rate_request_volume: u32,
    /// Ejects a host whose mean latency (successful calls, one interval) exceeds this
    /// factor times the median of the other hosts' means; 0 = off, otherwise above 1.
    /// Default 10.0: far enough above the pool that a legitimately slower GPU in a
    /// mixed pool (often 2-4x) is balanced around, not ejected.
    pub latency_factor: f64,
    /// Successful calls a host needs in the interval to take part in the latency
    /// comparison. Default 20.
    pub latency_minimum_volume: u32,
    /// Hosts with enough volume needed before latencies are compared (the host itself
    /// included; at least 2). Default 3.
    pub latency_minimum_hosts: u32,
    /// How often the window-based detectors run. Default 1000 ms.
    pub interval_ms: u64,
    /// Ejection time for a first ejection; multiplied by the times ejected. Default 5000.
    pub base_ejection_time_ms: u64,
    /// Cap on the ejection time (before jitter). Default 300000 ms.
    pub max_ejection_time_ms: u64,
    /// Random extra ejection time in `[0, jitter)`. Default 500 ms.
    pub ejection_jitter_ms: u64,
    /// Most hosts that automatic ejection may take out, in percent of the pool (0 to
    /// 100); one host may always go in a pool of two or more; 0 = no automatic
    /// ejection. Default 50.
    pub max_ejection_percent: f64,
    /// Panic when the share of hosts that are healthy and not ejected falls under this
    /// percentage (0 to 100; 0 = never). Default 50.
    pub panic_threshold_percent: f64,
    /// gRPC codes that count as failures, by name; connection failures always count.
    /// Default `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`. `OK` is refused.
    pub failure_codes: CodeSet,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            failure_percentage_threshold: 0.5,
            failure_percentage_minimum_volume: 20,
            success_rate_stdev_factor: 1.9,
            success_rate_minimum_hosts: 3,
            success_rate_request_volume: 20,
            latency_factor: 10.0,
            latency_minimum_volume: 20,
            latency_minimum_hosts: 3,
            interval_ms: 1000,
            base_ejection_time_ms: 5000,
            max_ejection_time_ms: 300_000,
            ejection_jitter_ms: 500,
            max_ejection_percent: 50.0,
            panic_threshold_percent: 50.0,
            failure_codes: CodeSet::of(&[
                Code::Unavailable,
                Code::Internal,
                Code::Unknown,
                Code::DataLoss,
            ]),
        }
    }
}

impl OutlierConfig {
    /// `interval_ms` as a Duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Checks values serde cannot check. The error starts with the field's name
    /// (`latency_factor: must be ...`), so the caller can prefix its section.
    pub fn validate(&self) -> Result<(), FieldError> {
        let t = self.failure_percentage_threshold;
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            return Err(FieldError::new(
                "failure_percentage_threshold",
                format!("must be a fraction from 0 to 1 (got {t})"),
            ));
        }
        let f = self.success_rate_stdev_factor;
        if !(f.is_finite() && f >= 0.0) {
            return Err(FieldError::new(
                "success_rate_stdev_factor",
                format!("must be 0 (off) or above (got {f})"),
            ));
        }
        let l = self.latency_factor;
        if !(l.is_finite() && (l == 0.0 || l > 1.0)) {
            return Err(FieldError::new(
                "latency_factor",
                format!("must be 0 (off) or above 1 (got {l})"),
            ));
        }
        for (field, value, min) in [
            (
                "failure_percentage_minimum_volume",
                self.failure_percentage_minimum_volume,
                1,
            ),
            (
                "success_rate_minimum_hosts",
                self.success_rate_minimum_hosts,
                2,
            ),
            (
                "success_rate_request_volume",
                self.success_rate_request_volume,
                1,
            ),
            ("latency_minimum_volume", self.latency_minimum_volume, 1),
            ("latency_minimum_hosts", self.latency_minimum_hosts, 2),
        ] {
            if value < min {
                return Err(FieldError::new(
                    field,
                    format!("must be at least {min} (got {value})"),
                ));
            }
        }
        for (field, value) in [
            ("interval_ms", self.interval_ms),
            ("base_ejection_time_ms", self.base_ejection_time_ms),
            ("max_ejection_time_ms", self.max_ejection_time_ms),
        ] {
            if value == 0 || value > MAX_EJECTION_MS {
                return Err(FieldError::new(
                    field,
                    format!("must be between 1 and {MAX_EJECTION_MS} ms (got {value})"),
                ));
            }
        }
        if self.max_ejection_time_ms < self.base_ejection_time_ms {
            return Err(FieldError::new(
                "max_ejection_time_ms",
                format!(
                    "{} is less than base_ejection_time_ms {}",
                    self.max_ejection_time_ms, self.base_ejection_time_ms
                ),
            ));
        }
        if self.ejection_jitter_ms > MAX_EJECTION_MS {
            return Err(FieldError::new(
                "ejection_jitter_ms",
                format!(
                    "must be at most {MAX_EJECTION_MS} ms (got {})",
                    self.ejection_jitter_ms
                ),
            ));
        }
        for (field, value) in [
            ("max_ejection_percent", self.max_ejection_percent),
            ("panic_threshold_percent", self.panic_threshold_percent),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return Err(FieldError::new(
                    field,
                    format!("must be from 0 to 100 (got {value})"),
                ));
            }
        }
        Ok(())
    }
}

/// `[models.<name>.retry]`: when and how often a failed call is tried again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries in all, the first included; 1 = never retry. Default 2 (one retry).
    pub max_attempts: u32,
    /// gRPC status codes that are retried, by canonical name (`UNAVAILABLE`,
    /// `RESOURCE_EXHAUSTED`, ...). Default `["UNAVAILABLE"]`.
    pub retryable_codes: CodeSet,
    /// Backoff cap of the first retry, in ms; doubles with each retry. Default 25.
    pub backoff_base_ms: u64,
    /// Largest backoff cap, in ms. Default 250.
    pub backoff_max_ms: u64,
    /// Time one try may take, in ms; absent = only the caller's deadline. Default
    /// absent.
    pub per_try_timeout_ms: Option<u64>,
    /// Retries (and hedges) may add at most this fraction to the calls of the last
    /// `budget_window_seconds`. Default 0.2.
    pub budget_ratio: f64,
    /// Retries allowed per second whatever the traffic, so a quiet model can retry.
    /// Default 10.
    pub budget_min_per_second: f64,
    /// The budget's sliding window, in seconds. Default 10.
    pub budget_window_seconds: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 2,
            retryable_codes: CodeSet::of(&[Code::Unavailable]),
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            per_try_timeout_ms: None,
            budget_ratio: 0.2,
            budget_min_per_second: 10.0,
            budget_window_seconds: 10,
        }
    }
}

impl RetryConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !(1..=10).contains(&self.max_attempts) {
            return Err(FieldError::new(
                "max_attempts",
                format!(
                    "must be in 1..=10 (1 = no retry), got {}",
                    self.max_attempts
                ),
            ));
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return Err(FieldError::new(
                "backoff_base_ms",
                format!(
                    "({}) must be <= retry.backoff_max_ms ({})",
                    self.backoff_base_ms, self.backoff_max_ms
                ),
            ));
        }
        if self.per_try_timeout_ms == Some(0) {
            return Err(FieldError::new(
                "per_try_timeout_ms",
                "must be > 0 (leave it out for none)",
            ));
        }
        if !(self.budget_ratio.is_finite() && (0.0..=1.0).contains(&self.budget_ratio)) {
            return Err(FieldError::new(
                "budget_ratio",
                format!("must be in [0, 1], got {}", self.budget_ratio),
            ));
        }
        if !(self.budget_min_per_second.is_finite() && self.budget_min_per_second >= 0.0) {
            return Err(FieldError::new(
                "budget_min_per_second",
                format!("must be a number >= 0, got {}", self.budget_min_per_second),
            ));
        }
        if !(1..=3600).contains(&self.budget_window_seconds) {
            return Err(FieldError::new(
                "budget_window_seconds",
                format!("must be in 1..=3600, got {}", self.budget_window_seconds),
            ));
        }
        Ok(())
    }

    /// `per_try_timeout_ms` as a Duration.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout_ms.map(Duration::from_millis)
    }
}

/// `[models.<name>.hedge]`: sending a second copy of a slow call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// Whether calls are hedged. Default false.
    pub enabled: bool,
    /// Fixed delay before a hedge, in ms; with `delay_percentile`, the delay used
    /// until enough latencies are known. Default absent.
    pub delay_ms: Option<u64>,
    /// Hedge after this quantile of recent latencies, in (0, 1] (0.95 = p95). Default
    /// absent.
    pub delay_percentile: Option<f64>,
    /// Most hedges per call, on top of the first try. Default 1.
    pub max_hedges: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            enabled: false,
            delay_ms: None,
            delay_percentile: None,
            max_hedges: 1,
        }
    }
}

impl HedgeConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(p) = self.delay_percentile {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(FieldError::new(
                    "delay_percentile",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        if self.delay_ms == Some(0) {
            return Err(FieldError::new(
                "delay_ms",
                "must be > 0 (a hedge at once doubles the load)",
            ));
        }
        if !(1..=4).contains(&self.max_hedges) {
            return Err(FieldError::new(
                "max_hedges",
                format!("must be in 1..=4, got {}", self.max_hedges),
            ));
        }
        if self.enabled && self.delay_ms.is_none() && self.delay_percentile.is_none() {
            return Err(FieldError::new(
                "delay_ms",
                "delay_ms or delay_percentile must be set when enabled",
            ));
        }
        Ok(())
    }
}

/// `[models.<name>.bulkhead]`: limits of one model's bulkhead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadConfig {
    /// Calls of the model in flight at once; 0 = unlimited. Default 0.
    pub max_concurrent: usize,
    /// Calls that may wait for a slot; 0 = refuse at once when full. Default 64.
    pub max_queue: usize,
    /// Longest wait for a slot, in ms. Default 1000.
    pub queue_timeout_ms: u64,
    /// Largest part of the bulkhead one tenant may hold, in (0, 1]: at most
    /// `ceil(share × max_concurrent)` slots and `ceil(share × max_queue)` queue places.
    /// Absent = no per-tenant limit. Default absent.
    pub tenant_share: Option<f64>,
    /// Least share of grants, in [0, 0.5], that waiters below the highest waiting
    /// priority get while higher ones wait too, so a busy high priority cannot starve
    /// the rest; 0 = strict priority. Default 0.1.
    pub min_share_low_priority: f64,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        BulkheadConfig {
            max_concurrent: 0,
            max_queue: 64,
            queue_timeout_ms: 1000,
            tenant_share: None,
            min_share_low_priority: 0.1,
        }
    }
}

impl BulkheadConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.max_queue > 0 && self.queue_timeout_ms == 0 {
            return Err(FieldError::new(
                "queue_timeout_ms",
                "must be > 0 when max_queue > 0 (a queue nobody may wait in)",
            ));
        }
        let low = self.min_share_low_priority;
        if !(low.is_finite() && (0.0..=0.5).contains(&low)) {
            return Err(FieldError::new(
                "min_share_low_priority",
                format!("must be in [0, 0.5], got {low}"),
            ));
        }
        if let Some(share) = self.tenant_share {
            if !(share.is_finite() && share > 0.0 && share <= 1.0) {
                return Err(FieldError::new(
                    "tenant_share",
                    format!("must be in (0, 1], got {share}"),
                ));
            }
            if self.max_concurrent == 0 {
                return Err(FieldError::new(
                    "tenant_share",
                    "needs max_concurrent > 0 (a share of unlimited is unlimited)",
                ));
            }
        }
        Ok(())
    }

    /// `queue_timeout_ms` as a Duration.
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    /// `min_share_low_priority` in millionths of a grant.
    pub(crate) fn min_share_millionths(&self) -> u64 {
        (self.min_share_low_priority.clamp(0.0, 0.5) * 1e6).round() as u64
    }

    /// Slots one tenant may hold, when a share is set.
    pub(crate) fn tenant_limit(&self) -> Option<usize> {
        share_of(self.tenant_share?, self.max_concurrent)
    }

    /// Queue places one tenant may hold, when a share is set.
    pub(crate) fn tenant_queue_limit(&self) -> Option<usize> {
        share_of(self.tenant_share?, self.max_queue)
    }
}

/// `[no_response]` (and `[models.X] no_response`): when an attempt that has received
/// nothing counts as the backend's failure, and is re-sent elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NoResponseConfig {
    /// Detect silent backends at all. Default true.
    pub enabled: bool,
    /// The bound never goes below this. Default 200 ms.
    pub floor_ms: u64,
    /// The bound is this many times the model's p99 time to response headers.
    /// Default 5.
    pub factor: f64,
    /// Successful attempts needed before the p99 is trusted. Default 20.
    pub min_samples: u64,
    /// The bound while the model has fewer samples than that. Default 3000 ms.
    pub cold_ms: u64,
}

impl Default for NoResponseConfig {
    fn default() -> Self {
        NoResponseConfig {
            enabled: true,
            floor_ms: 200,
            factor: 5.0,
            min_samples: 20,
            cold_ms: 3000,
        }
    }
}

impl NoResponseConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.floor_ms == 0 {
            return Err(FieldError::new("floor_ms", "must be above 0"));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(FieldError::new("factor", format!(
                "must be at least 1 (a bound below the model's own p99 would cut off healthy backends), got {}",
                self.factor
            )));
        }
        if self.cold_ms == 0 {
            return Err(FieldError::new("cold_ms", "must be above 0"));
        }
        Ok(())
    }
}

/// `ceil(share × total)`, at least 1; None when `total` is 0 (unlimited or no queue).
pub(crate) fn share_of(share: f64, total: usize) -> Option<usize> {
    if total == 0 {
        return None;
    }
    // Clamp so that an unvalidated share cannot make the limit 0 or NaN.
    let share = if share.is_nan() {
        1.0
    } else {
        share.clamp(0.0, 1.0)
    };
    Some(((share * total as f64).ceil() as usize).clamp(1, total))
}
