//! Passive outlier detection and ejection, pool-wide. Sits beside the request path: the
//! endpoint step feeds it every call's outcome ([`OutlierDetector::record`]) and the
//! balancer skips hosts it reports ejected ([`OutlierDetector::is_ejected`]) unless the
//! pool is in panic mode.
//!
//! Why, beside active health checks and the circuit breaker: a health check asks "are
//! you up?" every second or so and a backend can answer yes while failing or crawling on
//! real work (a GPU thermally throttled, a model half-loaded, a noisy neighbour). Real
//! traffic is the better witness, and comparing a backend with its peers catches the
//! one that is much worse than the rest even when no fixed threshold would.
//!
//! Detectors (each can be turned off with 0):
//! - **consecutive failures**: `consecutive_failures` failed calls in a row eject at
//!   once, from `record`. Any answered call that is not a failure resets the streak.
//! - **failure percentage**: over one interval, a host with at least
//!   `failure_percentage_minimum_volume` calls and a failure share at or over
//!   `failure_percentage_threshold`.
//! - **success rate**: over one interval, among hosts with at least
//!   `success_rate_request_volume` calls (and at least `success_rate_minimum_hosts` of
//!   them), a host whose success rate is under `mean − success_rate_stdev_factor × stdev`.
//! - **latency**: over one interval, among hosts with at least `latency_minimum_volume`
//!   successful calls (and at least `latency_minimum_hosts` of them), a host whose mean
//!   latency of successful calls exceeds `latency_factor ×` the median of the other
//!   hosts' means. Failed calls are left out: a host failing fast must not look fast.
//!
//! The window-based detectors run in [`OutlierDetector::evaluate`], which the owner
//! calls every `interval_ms`; it also readmits hosts whose time is up and clears the
//! interval's counters.
//!
//! Ejection time is `base_ejection_time_ms × times ejected`, capped at
//! `max_ejection_time_ms`, plus a seeded jitter in `[0, ejection_jitter_ms)` so hosts
//! ejected together do not return together. "Times ejected" drops by one for every
//! interval that a host spent wholly in the pool, serving calls with none failed, so a host that
//! misbehaves once is soon forgiven and one that keeps misbehaving stays out longer.
//! Envoy forgives for every interval spent in the pool, calls or not; here an interval
//! must show health: a readmitted host that gets few calls (slow start, a busy
//! balancer elsewhere) and fails again is not forgiven for the quiet in between.
//!
//! Caps and panic:
//! - `max_ejection_percent` bounds automatic ejections: a host is ejected only if the
//!   ejected share, it included, stays at or under the cap. In a pool of two or more one
//!   host may always be ejected, even where the percentage rounds to zero hosts; a pool
//!   of one is never ejected (there would be nowhere else to go); 0 turns automatic
//!   ejection off. Manual ejections ignore the cap and count towards it.
//! - panic mode: health lives in `endpoint.rs`, not here, so
//!   [`OutlierDetector::update_panic`] takes a health predicate, counts hosts that are
//!   healthy and not ejected, and enters panic when their share falls under
//!   `panic_threshold_percent` (0 = never). In panic the balancer should route to every
//!   host: a degraded pool serving slowly beats one refusing everything. The detector
//!   reports entering and leaving as events; [`OutlierDetector::in_panic`] reads it.
//!
//! Calls that land on an ejected host (sent before the ejection, or routed there in
//! panic mode) are not counted: the host is already out and its readmission starts it
//! with a clean slate.
//!
//! Everything is sync and takes `now` from the caller; the owner keeps the detector
//! behind a short `std::sync::Mutex` and never holds it across an await.

use crate::config::{OutlierConfig, MAX_EJECTION_MS};
use crate::ratio::{pct, ratio};
use infergate_base::codes::CodeSet;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// How one call to a host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOutcome {
    /// The gRPC status, or None when the call never got one (connection refused or
    /// reset, stream reset): those always count as failures.
    pub code: Option<Code>,
    /// Time from sending to the end.
    pub elapsed: Duration,
}

impl CallOutcome {
    /// A call that ended with `code`.
    pub fn with_code(code: Code, elapsed: Duration) -> CallOutcome {
        CallOutcome {
            code: Some(code),
            elapsed,
        }
    }

    /// A successful call.
    pub fn ok(elapsed: Duration) -> CallOutcome {
        CallOutcome::with_code(Code::Ok, elapsed)
    }

    /// A call that failed before any status (connect failure, reset).
    pub fn connect_failure(elapsed: Duration) -> CallOutcome {
        CallOutcome {
            code: None,
            elapsed,
        }
    }
}

/// Why and until when a host is out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjectionInfo {
    /// In words: `5 consecutive failures`.
    pub reason: String,
    /// When it comes back (readmission happens at the first `evaluate` or `record`
    /// after this; [`OutlierDetector::is_ejected`] already says false from then on).
    pub until: Instant,
    /// Times ejected, the multiplier of the ejection time (decays while the host serves
    /// without failures).
    pub count: u32,
    /// Ejected by an operator.
    pub manual: bool,
}

/// What happened, for logs, metrics and the admin event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The host was taken out.
    Ejected {
        /// In words.
        reason: String,
        /// When it comes back.
        until: Instant,
        /// For how long (jitter included).
        duration: Duration,
    },
    /// The host is back in the pool.
    Readmitted,
    /// Too few hosts are usable: the balancer should route to all of them.
    PanicEntered {
        /// Hosts healthy and not ejected.
        usable: usize,
        /// Hosts in the pool.
        total: usize,
    },
    /// Enough hosts are usable again.
    PanicLeft {
        /// Hosts healthy and not ejected.
        usable: usize,
        /// Hosts in the pool.
        total: usize,
    },
}

/// An event about one host (`host` is empty for pool-wide events: panic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The host's key (its address), or empty.
    pub host: String,
    /// What happened.
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EventKind::Ejected {
                reason, duration, ..
            } => write!(
                f,
                "backend {} ejected for {} ms: {reason}",
                self.host,
                duration.as_millis()
            ),
            EventKind::Readmitted => write!(f, "backend {} readmitted", self.host),
            EventKind::PanicEntered { usable, total } => write!(
                f,
                "pool entered panic mode: {usable} of {total} backends usable; routing to all"
            ),
            EventKind::PanicLeft { usable, total } => write!(
                f,
                "pool left panic mode: {usable} of {total} backends usable"
            ),
        }
    }
}

/// One host's counters and state.
#[derive(Debug, Default)]
struct Host {
    /// Failures in a row.
    consecutive: u32,
    /// This interval: calls, failed calls, successful calls and their total latency.
    calls: u32,
    failures: u32,
    ok_calls: u32,
    ok_latency: Duration,
    ejection: Option<EjectionInfo>,
    /// Multiplier of the ejection time.
    times_ejected: u32,
    /// When its last ejection ended: an interval it spent only partly in the pool does
    /// not forgive.
    back_since: Option<Instant>,
}

impl Host {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejection.as_ref().is_some_and(|e| now < e.until)
    }

    fn clear_window(&mut self) {
        self.calls = 0;
        self.failures = 0;
        self.ok_calls = 0;
        self.ok_latency = Duration::ZERO;
    }

    /// Ends an ejection whose time is up. Returns true if it did.
    fn readmit_if_due(&mut self, now: Instant) -> bool {
        if self.ejection.as_ref().is_some_and(|e| now >= e.until) {
            self.ejection = None;
            self.back_since = Some(now);
            self.consecutive = 0;
            self.clear_window();
            true
        } else {
            false
        }
    }

    /// Whether the interval that ends `now` (`interval` long) showed the host healthy:
    /// in the pool all along, with calls served and none failed.
    fn served_cleanly(&self, now: Instant, interval: Duration) -> bool {
        self.ejection.is_none()
            && self.ok_calls > 0
            && self.failures == 0
            && self
                .back_since
                .is_none_or(|t| now.saturating_duration_since(t) >= interval)
    }

    fn mean_latency(&self) -> Duration {
        self.ok_latency
            .checked_div(self.ok_calls)
            .unwrap_or(Duration::ZERO)
    }
}

/// The config in the form the detector uses.
#[derive(Debug, Clone)]
struct Settings {
    config: OutlierConfig,
    failure_codes: CodeSet,
}

/// Passive outlier detection over one pool's hosts, keyed by address. See the module
/// docs.
#[derive(Debug)]
pub struct OutlierDetector {
    settings: Settings,
    hosts: BTreeMap<String, Host>,
    panic: bool,
}

impl OutlierDetector {
    /// A detector with no hosts, or the config's validation error.
    pub fn new(config: &OutlierConfig) -> Result<OutlierDetector, String> {
        Ok(OutlierDetector {
            settings: Self::settings(config)?,
            hosts: BTreeMap::new(),
            panic: false,
        })
    }

    fn settings(config: &OutlierConfig) -> Result<Settings, String> {
        config.validate().map_err(|e| e.to_string())?;
        Ok(Settings {
            failure_codes: config.failure_codes,
            config: config.clone(),
        })
    }

    /// Applies a new config (on reload), keeping hosts, counters and ejections.
    pub fn reconfigure(&mut self, config: &OutlierConfig) -> Result<(), String> {
        self.settings = Self::settings(config)?;
        Ok(())
    }

    /// The config in use.
    pub fn config(&self) -> &OutlierConfig {
        &self.settings.config
    }

    /// Starts tracking `key`. Returns false if it was tracked already.
    pub fn add_host(&mut self, key: &str) -> bool {
        if self.hosts.contains_key(key) {
            return false;
        }
        self.hosts.insert(key.to_owned(), Host::default());
        true
    }

    /// Stops tracking `key` (its ejection, if any, goes with it). Returns false if it
    /// was not tracked.
    pub fn remove_host(&mut self, key: &str) -> bool {
        self.hosts.remove(key).is_some()
    }

    /// The tracked hosts, sorted.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    /// Hosts tracked.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host is tracked.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether `key` is ejected at `now` (false for unknown hosts).
    pub fn is_ejected(&self, key: &str, now: Instant) -> bool {
        self.hosts.get(key).is_some_and(|h| h.is_ejected(now))
    }

    /// The current (or expired but not yet readmitted) ejection of `key`.
    pub fn ejection(&self, key: &str) -> Option<EjectionInfo> {
        self.hosts.get(key).and_then(|h| h.ejection.clone())
    }

    /// Hosts ejected at `now`, sorted, for the admin API.
    pub fn ejected_hosts(&self, now: Instant) -> Vec<(String, EjectionInfo)> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.is_ejected(now))
            .filter_map(|(k, h)| h.ejection.clone().map(|e| (k.clone(), e)))
            .collect()
    }

    /// Hosts ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.hosts.values().filter(|h| h.is_ejected(now)).count()
    }

    /// Whether the pool is in panic mode (as of the last [`OutlierDetector::update_panic`]).
    pub fn in_panic(&self) -> bool {
        self.panic
    }

    /// Records one call's outcome on `key`. A host reaching `consecutive_failures` is
    /// ejected here, at once (subject to `max_ejection_percent`). Unknown hosts and
    /// hosts that are ejected are ignored. A host whose ejection has run out is
    /// readmitted first (a `Readmitted` event).
    pub fn record(
        &mut self,
        key: &str,
        outcome: CallOutcome,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let failure_codes = self.settings.failure_codes;
        let threshold = self.settings.config.consecutive_failures;
        let Some(host) = self.hosts.get_mut(key) else {
            return events;
        };
        if host.readmit_if_due(now) {
            events.push(Event {
                host: key.to_owned(),
                kind: EventKind::Readmitted,
            });
        }
        if host.is_ejected(now) {
            return events;
        }
        let failed = outcome.code.is_none_or(|c| failure_codes.contains(c));
        host.calls = host.calls.saturating_add(1);
        if failed {
            host.failures = host.failures.saturating_add(1);
            host.consecutive = host.consecutive.saturating_add(1);
        } else {
            host.consecutive = 0;
            host.ok_calls = host.ok_calls.saturating_add(1);
            host.ok_latency = host.ok_latency.saturating_add(outcome.elapsed);
        }
        let streak = host.consecutive;
        if failed && threshold > 0 && streak >= threshold && self.may_eject(now) {
            let reason = format!("{streak} consecutive failures");
            events.extend(self.eject(key, reason, now, rng));
        }
        events
    }

    /// The periodic pass, every `interval_ms`: readmits hosts whose time is up, lets
    /// "times ejected" decay for hosts in the pool, runs the failure-percentage,
    /// success-rate and latency detectors over the interval's counters, then clears
    /// them.
    pub fn evaluate(&mut self, now: Instant, rng: &mut fastrand::Rng) -> Vec<Event> {
        let mut events = Vec::new();
        let interval = Duration::from_millis(self.settings.config.interval_ms);
        for (key, host) in &mut self.hosts {
            if host.readmit_if_due(now) {
                events.push(Event {
                    host: key.clone(),
                    kind: EventKind::Readmitted,
                });
            } else if host.served_cleanly(now, interval) {
                host.times_ejected = host.times_ejected.saturating_sub(1);
            }
        }

        let mut candidates = self.failure_percentage_outliers(now);
        candidates.extend(self.success_rate_outliers(now));
        candidates.extend(self.latency_outliers(now));
        for (key, reason) in candidates {
            if self.is_ejected(&key, now) || !self.may_eject(now) {
                continue;
            }
            events.extend(self.eject(&key, reason, now, rng));
        }

        for host in self.hosts.values_mut() {
            host.clear_window();
        }
        events
    }

    /// Hosts over the failure-percentage threshold, worst first.
    fn failure_percentage_outliers(&self, now: Instant) -> Vec<(String, String)> {
        let c = &self.settings.config;
        if c.failure_percentage_threshold <= 0.0 {
            return Vec::new();
        }
        let mut found: Vec<(f64, &str, &Host)> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.is_ejected(now) && h.calls >= c.failure_percentage_minimum_volume)
            .map(|(k, h)| (ratio(h.failures, h.calls), k.as_str(), h))
            .filter(|(share, _, _)| *share >= c.failure_percentage_threshold)
            .collect();
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found
            .into_iter()
            .map(|(share, key, h)| {
                (
                    key.to_owned(),
                    format!(
                        "failure rate {} >= {} over {} calls",
                        pct(share),
                        pct(c.failure_percentage_threshold),
                        h.calls
                    ),
                )
            })
            .collect()
    }

    /// Hosts whose success rate is under `mean − factor × stdev`, worst first.
    fn success_rate_outliers(&self, now: Instant) -> Vec<(String, String)> {
        let c = &self.settings.config;
        if c.success_rate_stdev_factor <= 0.0 {
            return Vec::new();
        }
        let rates: Vec<(&str, f64)> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.is_ejected(now) && h.calls >= c.success_rate_request_volume)
            .map(|(k, h)| (k.as_str(), 1.0 - ratio(h.failures, h.calls)))
            .collect();
        if rates.len() < c.success_rate_minimum_hosts as usize {
            return Vec::new();
        }
        let n = rates.len() as f64;
        let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
        let variance = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let limit = mean - c.success_rate_stdev_factor * variance.sqrt();
        let mut found: Vec<(&str, f64)> = rates.into_iter().filter(|(_, r)| *r < limit).collect();
        found.sort_by(|a, b| a.1.total_cmp(&b.1));
        found
            .into_iter()
            .map(|(key, rate)| {
                (
                    key.to_owned(),
                    format!(
                        "success rate {} < {} (pool mean {} − {} stdev)",
                        pct(rate),
                        pct(limit),
                        pct(mean),
                        c.success_rate_stdev_factor
                    ),
                )
            })
            .collect()
    }

    /// Hosts whose mean latency exceeds `latency_factor ×` the median of the other
    /// hosts' means, slowest first.
    fn latency_outliers(&self, now: Instant) -> Vec<(String, String)> {
        let c = &self.settings.config;
        if c.latency_factor <= 0.0 {
            return Vec::new();
        }
        let means: Vec<(&str, Duration)> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.is_ejected(now) && h.ok_calls >= c.latency_minimum_volume)
            .map(|(k, h)| (k.as_str(), h.mean_latency()))
            .collect();
        if means.len() < c.latency_minimum_hosts as usize {
            return Vec::new();
        }
        let mut found: Vec<(f64, String, String)> = Vec::new();
        for (i, &(key, mean)) in means.iter().enumerate() {
            let mut others: Vec<f64> = means
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, (_, d))| d.as_secs_f64())
                .collect();
            let Some(median) = median(&mut others) else {
                continue;
            };
            let mine = mean.as_secs_f64();
            if median > 0.0 && mine > c.latency_factor * median {
                let factor = mine / median;
                found.push((
                    factor,
                    key.to_owned(),
                    format!(
                        "mean latency {:.1} ms is {factor:.1}x the other backends' median {:.1} ms (limit {}x)",
                        mine * 1e3,
                        median * 1e3,
                        c.latency_factor
                    ),
                ));
            }
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.into_iter().map(|(_, k, r)| (k, r)).collect()
    }

    /// Whether one more automatic ejection stays within `max_ejection_percent`.
    fn may_eject(&self, now: Instant) -> bool {
        let max = self.settings.config.max_ejection_percent;
        let total = self.hosts.len();
        if max <= 0.0 || total < 2 {
            return false;
        }
        let ejected = self.ejected_count(now);
        ejected == 0 || (ejected + 1) as f64 * 100.0 <= max * total as f64
    }

    /// Ejects `key` for `base × times ejected` (capped) plus jitter.
    fn eject(
        &mut self,
        key: &str,
        reason: String,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<Event> {
        let c = &self.settings.config;
        let (base, max, jitter) = (
            c.base_ejection_time_ms,
            c.max_ejection_time_ms,
            c.ejection_jitter_ms,
        );
        let host = self.hosts.get_mut(key)?;
        host.times_ejected = host.times_ejected.saturating_add(1);
        let mut ms = base.saturating_mul(u64::from(host.times_ejected)).min(max);
        if jitter > 0 {
            ms += rng.u64(0..jitter);
        }
        let duration = Duration::from_millis(ms);
        let until = now + duration;
        host.ejection = Some(EjectionInfo {
            reason: reason.clone(),
            until,
            count: host.times_ejected,
            manual: false,
        });
        host.consecutive = 0;
        host.clear_window();
        Some(Event {
            host: key.to_owned(),
            kind: EventKind::Ejected {
                reason,
                until,
                duration,
            },
        })
    }

    /// Ejects `key` for `duration` on an operator's word: ignores
    /// `max_ejection_percent` and leaves "times ejected" alone. Errors name the problem
    /// (unknown host, a duration over a day).
    pub fn eject_manually(
        &mut self,
        key: &str,
        reason: &str,
        duration: Duration,
        now: Instant,
    ) -> Result<Event, String> {
        if duration > Duration::from_millis(MAX_EJECTION_MS) {
            return Err(format!(
                "ejection of {} ms is longer than the limit of {MAX_EJECTION_MS} ms",
                duration.as_millis()
            ));
        }
        let host = self
            .hosts
            .get_mut(key)
            .ok_or_else(|| format!("backend `{key}` is not in the pool"))?;
        let until = now + duration;
        let reason = format!("ejected by an operator: {reason}");
        host.ejection = Some(EjectionInfo {
            reason: reason.clone(),
            until,
            count: host.times_ejected,
            manual: true,
        });
        host.consecutive = 0;
        host.clear_window();
        Ok(Event {
            host: key.to_owned(),
            kind: EventKind::Ejected {
                reason,
                until,
                duration,
            },
        })
    }

    /// Ends `key`'s ejection now, whatever its cause. None if it was not ejected.
    pub fn readmit_manually(&mut self, key: &str) -> Option<Event> {
        let host = self.hosts.get_mut(key)?;
        host.ejection.take()?;
        host.consecutive = 0;
        host.clear_window();
        Some(Event {
            host: key.to_owned(),
            kind: EventKind::Readmitted,
        })
    }

    /// Whether `usable` of `total` hosts is under `panic_threshold_percent`.
    pub fn panic_for(&self, usable: usize, total: usize) -> bool {
        total > 0
            && (usable as f64) * 100.0 < self.settings.config.panic_threshold_percent * total as f64
    }

    /// Counts hosts that are healthy (by `is_healthy`, from active health and drain)
    /// and not ejected, and enters or leaves panic mode accordingly. Call it after
    /// `evaluate`, after an ejection and after health changes.
    pub fn update_panic(
        &mut self,
        now: Instant,
        is_healthy: impl Fn(&str) -> bool,
    ) -> Option<Event> {
        let total = self.hosts.len();
        let usable = self
            .hosts
            .iter()
            .filter(|(k, h)| !h.is_ejected(now) && is_healthy(k))
            .count();
        let panic = self.panic_for(usable, total);
        if panic == self.panic {
            return None;
        }
        self.panic = panic;
        let kind = if panic {
            EventKind::PanicEntered { usable, total }
        } else {
            EventKind::PanicLeft { usable, total }
        };
        Some(Event {
            host: String::new(),
            kind,
        })
    }
}

/// The median (mean of the middle two for an even count); None when empty.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> OutlierConfig {
        OutlierConfig {
            ejection_jitter_ms: 0,
            ..OutlierConfig::default()
        }
    }

    fn detector(config: &OutlierConfig, hosts: &[&str]) -> OutlierDetector {
        let mut d = OutlierDetector::new(config).expect("valid config");
        for h in hosts {
            assert!(d.add_host(h));
        }
        d
    }

    fn rng() -> fastrand::Rng {
        fastrand::Rng::with_seed(7)
    }

    fn ok() -> CallOutcome {
        CallOutcome::ok(10 * MS)
    }

    fn unavailable() -> CallOutcome {
        CallOutcome::with_code(Code::Unavailable, 10 * MS)
    }

    /// Records `n` outcomes on `key`, returning every event.
    fn feed(
        d: &mut OutlierDetector,
        key: &str,
        outcome: CallOutcome,
        n: u32,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Vec<Event> {
        (0..n)
            .flat_map(|_| d.record(key, outcome, now, rng))
            .collect()
    }

    fn ejected(events: &[Event]) -> Vec<&str> {
        events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Ejected { .. }))
            .map(|e| e.host.as_str())
            .collect()
    }

    const FIVE: [&str; 5] = ["a:1", "b:1", "c:1", "d:1", "e:1"];

    #[test]
    fn defaults_are_valid() {
        let c = OutlierConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.interval(), Duration::from_secs(1));
        let codes = c.failure_codes;
        assert_eq!(
            codes.names(),
            ["UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"]
        );
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_fields() {
        let c: OutlierConfig =
            toml::from_str("consecutive_failures = 3\nlatency_factor = 0").expect("parses");
        assert_eq!(c.consecutive_failures, 3);
        assert_eq!(c.latency_factor, 0.0);
        assert_eq!(c.max_ejection_percent, 50.0, "unset fields keep defaults");
        assert!(toml::from_str::<OutlierConfig>("consecutive_failure = 3").is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        let cases: Vec<(OutlierConfig, &str)> = vec![
            (
                OutlierConfig {
                    failure_percentage_threshold: 1.2,
                    ..config()
                },
                "failure_percentage_threshold:",
            ),
            (
                OutlierConfig {
                    success_rate_stdev_factor: -1.0,
                    ..config()
                },
                "success_rate_stdev_factor:",
            ),
            (
                OutlierConfig {
                    latency_factor: 0.8,
                    ..config()
                },
                "latency_factor:",
            ),
            (
                OutlierConfig {
                    latency_factor: f64::INFINITY,
                    ..config()
                },
                "latency_factor:",
            ),
            (
                OutlierConfig {
                    success_rate_minimum_hosts: 1,
                    ..config()
                },
                "success_rate_minimum_hosts:",
            ),
            (
                OutlierConfig {
                    failure_percentage_minimum_volume: 0,
                    ..config()
                },
                "failure_percentage_minimum_volume:",
            ),
            (
                OutlierConfig {
                    interval_ms: 0,
                    ..config()
                },
                "interval_ms:",
            ),
            (
                OutlierConfig {
                    max_ejection_time_ms: 1000,
                    ..config()
                },
                "max_ejection_time_ms:",
            ),
            (
                OutlierConfig {
                    max_ejection_percent: 101.0,
                    ..config()
                },
                "max_ejection_percent:",
            ),
            (
                OutlierConfig {
                    panic_threshold_percent: -1.0,
                    ..config()
                },
                "panic_threshold_percent:",
            ),
        ];
        for (c, prefix) in cases {
            let err = c.validate().expect_err(prefix).to_string();
            assert!(
                err.starts_with(prefix),
                "{err:?} should start with {prefix:?}"
            );
            assert!(OutlierDetector::new(&c).is_err());
        }
    }

    #[test]
    fn consecutive_failures_eject_at_exactly_n() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        assert!(feed(&mut d, "a:1", unavailable(), 4, now, &mut rng).is_empty());
        assert!(!d.is_ejected("a:1", now));
        let events = d.record("a:1", unavailable(), now, &mut rng);
        assert_eq!(ejected(&events), ["a:1"]);
        assert_eq!(
            events[0].to_string(),
            "backend a:1 ejected for 5000 ms: 5 consecutive failures"
        );
        assert!(d.is_ejected("a:1", now));
        let info = d.ejection("a:1").expect("ejected");
        assert_eq!(info.reason, "5 consecutive failures");
        assert_eq!(info.until, now + 5000 * MS);
        assert_eq!((info.count, info.manual), (1, false));
    }

    #[test]
    fn a_success_resets_the_streak() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        assert!(feed(&mut d, "a:1", unavailable(), 4, now, &mut rng).is_empty());
        assert!(d.record("a:1", ok(), now, &mut rng).is_empty());
        assert!(feed(&mut d, "a:1", unavailable(), 4, now, &mut rng).is_empty());
        assert!(!d.is_ejected("a:1", now));
        let connect = CallOutcome::connect_failure(MS);
        assert_eq!(ejected(&d.record("a:1", connect, now, &mut rng)), ["a:1"]);
    }

    #[test]
    fn client_errors_do_not_count() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::ResourceExhausted,
        ] {
            let out = CallOutcome::with_code(code, MS);
            assert!(feed(&mut d, "a:1", out, 30, now, &mut rng).is_empty());
        }
        assert!(d.evaluate(now, &mut rng).is_empty());
        assert!(!d.is_ejected("a:1", now));
    }

    #[test]
    fn failure_percentage_needs_minimum_volume() {
        let t0 = Instant::now();
        let mut rng = rng();
        let c = OutlierConfig {
            consecutive_failures: 0,
            success_rate_stdev_factor: 0.0,
            ..config()
        };
        let mut d = detector(&c, &FIVE);
        // 19 calls, all failed: too few to judge.
        feed(&mut d, "a:1", unavailable(), 19, t0, &mut rng);
        assert!(d.evaluate(t0, &mut rng).is_empty());
        // Counters were cleared: 10 ok + 10 failed = 50% over 20 calls.
        let t1 = t0 + 1000 * MS;
        feed(&mut d, "a:1", ok(), 10, t1, &mut rng);
        feed(&mut d, "a:1", unavailable(), 10, t1, &mut rng);
        feed(&mut d, "b:1", ok(), 11, t1, &mut rng);
        feed(&mut d, "b:1", unavailable(), 9, t1, &mut rng);
        let events = d.evaluate(t1, &mut rng);
        assert_eq!(ejected(&events), ["a:1"], "b at 45% stays");
        assert_eq!(
            d.ejection("a:1").expect("ejected").reason,
            "failure rate 50% >= 50% over 20 calls"
        );
    }

    #[test]
    fn success_rate_outlier_among_five_hosts() {
        let now = Instant::now();
        let mut rng = rng();
        let c = OutlierConfig {
            consecutive_failures: 0,
            failure_percentage_threshold: 0.0,
            ..config()
        };
        let mut d = detector(&c, &FIVE);
        for host in &FIVE[..4] {
            feed(&mut d, host, ok(), 20, now, &mut rng);
        }
        // e: 50% success; the rest 100%: mean 90%, stdev 20%, limit 52%.
        feed(&mut d, "e:1", ok(), 10, now, &mut rng);
        feed(&mut d, "e:1", unavailable(), 10, now, &mut rng);
        let events = d.evaluate(now, &mut rng);
        assert_eq!(ejected(&events), ["e:1"]);
        let reason = d.ejection("e:1").expect("ejected").reason;
        assert!(reason.starts_with("success rate 50% < 52%"), "{reason}");

        // All alike: nobody is an outlier.
        let mut d = detector(&c, &FIVE);
        for host in FIVE {
            feed(&mut d, host, ok(), 18, now, &mut rng);
            feed(&mut d, host, unavailable(), 2, now, &mut rng);
        }
        assert!(d.evaluate(now, &mut rng).is_empty());
    }

    #[test]
    fn success_rate_needs_enough_hosts_with_volume() {
        let now = Instant::now();
        let mut rng = rng();
        let c = OutlierConfig {
            consecutive_failures: 0,
            failure_percentage_threshold: 0.0,
            success_rate_stdev_factor: 0.5,
            ..config()
        };
        let mut d = detector(&c, &FIVE);
        // Two hosts with volume (b is one call short): fewer than the minimum of 3.
        feed(&mut d, "a:1", ok(), 20, now, &mut rng);
        feed(&mut d, "b:1", ok(), 19, now, &mut rng);
        feed(&mut d, "e:1", unavailable(), 20, now, &mut rng);
        assert!(d.evaluate(now, &mut rng).is_empty());
        // With b at volume, e (0% against 100%, 100%) stands out.
        feed(&mut d, "a:1", ok(), 20, now, &mut rng);
        feed(&mut d, "b:1", ok(), 20, now, &mut rng);
        feed(&mut d, "e:1", unavailable(), 20, now, &mut rng);
        assert_eq!(ejected(&d.evaluate(now, &mut rng)), ["e:1"]);
    }

    #[test]
    fn latency_outlier_is_ejected() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        for (host, ms) in [("a:1", 10), ("b:1", 12), ("c:1", 9), ("d:1", 11)] {
            feed(&mut d, host, CallOutcome::ok(ms * MS), 20, now, &mut rng);
        }
        feed(&mut d, "e:1", CallOutcome::ok(120 * MS), 20, now, &mut rng);
        let events = d.evaluate(now, &mut rng);
        assert_eq!(ejected(&events), ["e:1"]);
        let reason = d.ejection("e:1").expect("ejected").reason;
        assert_eq!(
            reason,
            "mean latency 120.0 ms is 11.4x the other backends' median 10.5 ms (limit 10x)"
        );
    }

    #[test]
    fn no_latency_outlier_when_all_are_similar() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        for (host, ms) in [
            ("a:1", 10),
            ("b:1", 25),
            ("c:1", 9),
            ("d:1", 11),
            ("e:1", 20),
        ] {
            feed(&mut d, host, CallOutcome::ok(ms * MS), 20, now, &mut rng);
        }
        assert!(d.evaluate(now, &mut rng).is_empty());
        // Too few successful calls: not judged however slow.
        for host in &FIVE[..4] {
            feed(&mut d, host, ok(), 20, now, &mut rng);
        }
        feed(
            &mut d,
            "e:1",
            CallOutcome::ok(Duration::from_secs(5)),
            19,
            now,
            &mut rng,
        );
        assert!(d.evaluate(now, &mut rng).is_empty());
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = OutlierConfig {
            base_ejection_time_ms: 1000,
            max_ejection_time_ms: 2500,
            ..config()
        };
        let mut rng = rng();
        let mut d = detector(&c, &FIVE);
        let mut now = Instant::now();
        let mut durations = vec![];
        for _ in 0..4 {
            let events = feed(&mut d, "a:1", unavailable(), 5, now, &mut rng);
            match events.last().map(|e| &e.kind) {
                Some(EventKind::Ejected {
                    duration, until, ..
                }) => {
                    durations.push(duration.as_millis());
                    now = *until;
                }
                other => panic!("expected an ejection, got {other:?}"),
            }
            // Readmitted at once when the time is up: no healthy interval for decay.
            let events = d.evaluate(now, &mut rng);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, EventKind::Readmitted);
            assert_eq!(events[0].to_string(), "backend a:1 readmitted");
        }
        assert_eq!(durations, [1000, 2000, 2500, 2500]);
    }

    #[test]
    fn times_ejected_decays_while_healthy() {
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        let mut now = Instant::now();
        for _ in 0..3 {
            feed(&mut d, "a:1", unavailable(), 5, now, &mut rng);
            now = d.ejection("a:1").expect("ejected").until;
            d.evaluate(now, &mut rng);
        }
        // An interval spent only partly in the pool, one without calls and one with a
        // failure forgive nothing; two intervals of successful calls take the
        // multiplier from 3 to 1: the next ejection is x2.
        feed(&mut d, "a:1", ok(), 3, now, &mut rng);
        now += 500 * MS;
        d.evaluate(now, &mut rng);
        assert_eq!(d.hosts["a:1"].times_ejected, 3);
        now += 1000 * MS;
        d.evaluate(now, &mut rng);
        feed(&mut d, "a:1", ok(), 3, now, &mut rng);
        feed(&mut d, "a:1", unavailable(), 1, now, &mut rng);
        now += 1000 * MS;
        d.evaluate(now, &mut rng);
        assert_eq!(d.hosts["a:1"].times_ejected, 3);
        for _ in 0..2 {
            feed(&mut d, "a:1", ok(), 3, now, &mut rng);
            now += 1000 * MS;
            d.evaluate(now, &mut rng);
        }
        feed(&mut d, "a:1", unavailable(), 5, now, &mut rng);
        let info = d.ejection("a:1").expect("ejected");
        assert_eq!(info.count, 2);
        assert_eq!(info.until - now, 10_000 * MS);
    }

    #[test]
    fn jitter_is_seeded_and_bounded() {
        let c = OutlierConfig {
            ejection_jitter_ms: 500,
            ..config()
        };
        let now = Instant::now();
        let run = |seed: u64| -> Vec<Duration> {
            let mut rng = fastrand::Rng::with_seed(seed);
            let hosts: Vec<String> = (0..20).map(|i| format!("h:{i}")).collect();
            let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let mut d = detector(&c, &names);
            names
                .iter()
                .take(10)
                .map(|h| {
                    feed(&mut d, h, unavailable(), 5, now, &mut rng);
                    d.ejection(h).expect("ejected").until - now
                })
                .collect()
        };
        let a = run(1);
        assert_eq!(a, run(1), "same seed, same jitter");
        assert_ne!(a, run(2));
        for d in &a {
            assert!(*d >= 5000 * MS && *d < 5500 * MS, "{d:?}");
        }
        assert!(a.iter().any(|d| *d != a[0]), "jitter varies");
    }

    #[tokio::test(start_paused = true)]
    async fn readmission_after_the_time_passes() {
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        feed(&mut d, "a:1", unavailable(), 5, Instant::now(), &mut rng);
        tokio::time::advance(4999 * MS).await;
        assert!(d.is_ejected("a:1", Instant::now()));
        assert!(d.evaluate(Instant::now(), &mut rng).is_empty());
        tokio::time::advance(MS).await;
        assert!(
            !d.is_ejected("a:1", Instant::now()),
            "back as soon as the time is up"
        );
        let events = d.evaluate(Instant::now(), &mut rng);
        assert_eq!(
            events,
            [Event {
                host: "a:1".into(),
                kind: EventKind::Readmitted
            }]
        );
        assert!(d.ejection("a:1").is_none());
    }

    #[test]
    fn calls_readmit_lazily_and_ejected_hosts_are_not_counted() {
        let t0 = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE);
        feed(&mut d, "a:1", unavailable(), 5, t0, &mut rng);
        // In-flight calls ending after the ejection are ignored.
        assert!(feed(&mut d, "a:1", unavailable(), 20, t0, &mut rng).is_empty());
        let until = t0 + 5000 * MS;
        // The first call after the time is up readmits, then counts from zero.
        let events = feed(&mut d, "a:1", unavailable(), 5, until, &mut rng);
        let kinds: Vec<_> = events.iter().map(|e| &e.kind).collect();
        assert!(matches!(
            kinds[..],
            [EventKind::Readmitted, EventKind::Ejected { .. }]
        ));
        assert_eq!(d.ejection("a:1").expect("ejected").count, 2);
    }

    #[test]
    fn max_ejection_percent_blocks_a_second_ejection() {
        let now = Instant::now();
        let mut rng = rng();
        for pool in [&FIVE[..2], &FIVE[..3]] {
            let mut d = detector(&config(), pool);
            assert_eq!(
                ejected(&feed(&mut d, pool[0], unavailable(), 5, now, &mut rng)),
                [pool[0]]
            );
            assert!(feed(&mut d, pool[1], unavailable(), 10, now, &mut rng).is_empty());
            assert!(!d.is_ejected(pool[1], now), "pool of {}", pool.len());
            assert_eq!(d.ejected_count(now), 1);
            // Once the first is back, the second (still failing) goes on its next failure.
            let later = now + 5000 * MS;
            assert_eq!(
                ejected(&d.record(pool[1], unavailable(), later, &mut rng)),
                [pool[1]]
            );
        }
        // A single host is never ejected; 0% means no automatic ejection at all.
        let mut d = detector(&config(), &FIVE[..1]);
        assert!(feed(&mut d, "a:1", unavailable(), 10, now, &mut rng).is_empty());
        let c = OutlierConfig {
            max_ejection_percent: 0.0,
            ..config()
        };
        let mut d = detector(&c, &FIVE);
        assert!(feed(&mut d, "a:1", unavailable(), 10, now, &mut rng).is_empty());
        // A low percentage still allows one host in a pool of two or more.
        let c = OutlierConfig {
            max_ejection_percent: 10.0,
            ..config()
        };
        let mut d = detector(&c, &FIVE);
        assert_eq!(
            ejected(&feed(&mut d, "a:1", unavailable(), 5, now, &mut rng)),
            ["a:1"]
        );
        assert!(feed(&mut d, "b:1", unavailable(), 5, now, &mut rng).is_empty());
    }

    #[test]
    fn evaluate_respects_the_cap_worst_first() {
        let now = Instant::now();
        let mut rng = rng();
        let c = OutlierConfig {
            consecutive_failures: 0,
            ..config()
        };
        let mut d = detector(&c, &FIVE[..3]);
        feed(&mut d, "a:1", ok(), 5, now, &mut rng);
        feed(&mut d, "a:1", unavailable(), 15, now, &mut rng);
        feed(&mut d, "b:1", unavailable(), 20, now, &mut rng);
        feed(&mut d, "c:1", ok(), 20, now, &mut rng);
        let events = d.evaluate(now, &mut rng);
        assert_eq!(
            ejected(&events),
            ["b:1"],
            "the worst goes, the cap stops the next"
        );
    }

    #[test]
    fn manual_ejection_and_readmission() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE[..2]);
        let e = d
            .eject_manually("a:1", "maintenance", Duration::from_secs(60), now)
            .expect("ejected");
        assert_eq!(
            e.to_string(),
            "backend a:1 ejected for 60000 ms: ejected by an operator: maintenance"
        );
        assert!(d.ejection("a:1").expect("info").manual);
        // Manual ejections ignore the cap (and count towards it).
        assert!(d
            .eject_manually("b:1", "too", Duration::from_secs(60), now)
            .is_ok());
        assert!(d
            .eject_manually("z:1", "x", Duration::from_secs(1), now)
            .is_err());
        assert!(d
            .eject_manually("a:1", "x", Duration::from_secs(86_401), now)
            .is_err());
        assert_eq!(d.ejected_hosts(now).len(), 2);
        assert_eq!(
            d.readmit_manually("a:1").map(|e| e.kind),
            Some(EventKind::Readmitted)
        );
        assert!(d.readmit_manually("a:1").is_none());
        assert!(!d.is_ejected("a:1", now));
        assert!(d.record("nobody", unavailable(), now, &mut rng).is_empty());
    }

    #[test]
    fn panic_mode_entered_and_left() {
        let now = Instant::now();
        let mut rng = rng();
        let c = OutlierConfig {
            max_ejection_percent: 100.0,
            ..config()
        };
        let mut d = detector(&c, &FIVE[..4]);
        let healthy = |_: &str| true;
        assert!(d.update_panic(now, healthy).is_none());
        assert!(!d.in_panic());
        feed(&mut d, "a:1", unavailable(), 5, now, &mut rng);
        feed(&mut d, "b:1", unavailable(), 5, now, &mut rng);
        assert!(
            d.update_panic(now, healthy).is_none(),
            "2 of 4 is not under 50%"
        );
        feed(&mut d, "c:1", unavailable(), 5, now, &mut rng);
        let e = d.update_panic(now, healthy).expect("panic");
        assert_eq!(
            e.kind,
            EventKind::PanicEntered {
                usable: 1,
                total: 4
            }
        );
        assert_eq!(
            e.to_string(),
            "pool entered panic mode: 1 of 4 backends usable; routing to all"
        );
        assert!(d.in_panic());
        assert!(d.update_panic(now, healthy).is_none(), "reported once");
        // Unhealthy hosts count against the pool too.
        d.readmit_manually("a:1");
        assert!(d.update_panic(now, |h: &str| h != "a:1").is_none());
        let e = d.update_panic(now, healthy).expect("left");
        assert_eq!(
            e.kind,
            EventKind::PanicLeft {
                usable: 2,
                total: 4
            }
        );
        assert!(!d.in_panic());
        assert!(!d.panic_for(0, 0), "an empty pool is not in panic");
    }

    #[test]
    fn hosts_come_and_go() {
        let now = Instant::now();
        let mut rng = rng();
        let mut d = detector(&config(), &FIVE[..2]);
        assert!(!d.add_host("a:1"));
        assert_eq!(d.len(), 2);
        feed(&mut d, "a:1", unavailable(), 5, now, &mut rng);
        assert!(d.remove_host("a:1"));
        assert!(!d.remove_host("a:1"));
        assert!(!d.is_ejected("a:1", now));
        assert_eq!(d.hosts().collect::<Vec<_>>(), ["b:1"]);
        assert!(!d.is_empty());
        d.reconfigure(&OutlierConfig {
            consecutive_failures: 2,
            ..config()
        })
        .expect("valid");
        assert!(d.add_host("a:1"));
        assert_eq!(
            ejected(&feed(&mut d, "a:1", unavailable(), 2, now, &mut rng)),
            ["a:1"]
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
