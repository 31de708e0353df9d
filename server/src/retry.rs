//! Retries and hedges: which failures may be tried again, when, and how many the pool
//! can afford. Sits in the request path after admission, the rate limit and the
//! bulkhead, around the per-try timeout, the balancer and the endpoint (each try is a
//! fresh pick, so a retry goes to another backend).
//!
//! Why each rule:
//! - only failures where the backend did not process the call are always retried
//!   (connect error, refused stream, reset before headers); a status is retried only
//!   when its code is listed (default UNAVAILABLE), and a call whose response already
//!   started is never retried, because the caller has seen part of it;
//! - retries are budgeted: across recent calls they may add at most `budget_ratio` to
//!   the load (plus a small floor per second so that a quiet model can still retry).
//!   Without a budget, a pool that fails because it is overloaded gets more load from
//!   the retries themselves and cannot recover. Hedges spend from the same budget;
//! - backoff is exponential with full jitter (a uniform draw in `[0, cap]`), so that
//!   callers who failed together do not come back together;
//! - a retry is only started when the caller's deadline leaves room for the backoff
//!   and a whole try; a try that cannot finish in time only adds load;
//! - hedging sends a second copy of a call that is slower than usual (the
//!   `delay_percentile` of recent latencies, or a fixed delay), taking whichever
//!   answer comes first.
//!
//! Everything here is a decision, not a loop: the request path calls these functions
//! between tries, with `tokio::time::Instant`s and a seeded `fastrand::Rng`, so tests
//! step time and draw the same jitter every run.
//!
//! ```ignore
//! budget.record_request(now);
//! // ... a try failed with `failure` ...
//! let wait = backoff(attempt, &cfg, &mut rng);
//! if is_retryable(&failure, cfg.retryable_codes)
//!     && attempt < cfg.max_attempts
//!     && may_retry(Instant::now(), deadline, cfg.per_try_timeout(), wait)
//!     && budget.try_withdraw(Instant::now())
//! {
//!     tokio::time::sleep(wait).await; // then pick again
//! }
//! ```

use crate::config::NoResponseConfig;
use crate::config::{HedgeConfig, RetryConfig};
use infergate_base::codes::CodeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// How a try failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend was not reached, or the connection broke before it answered.
    Connect,
    /// The backend sent nothing within the no-response bound or the per-try timeout.
    NoResponse,
    /// The backend answered with this status, and no response message.
    Status(Code),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect => f.write_str("connect error"),
            Failure::NoResponse => f.write_str("no response"),
            Failure::Status(code) => write!(f, "status {}", infergate_base::codes::name(*code)),
        }
    }
}

/// Whether a try that failed this way may be tried again (budget and deadline aside).
/// Failures where the backend cannot have answered always may; a status may when its
/// code is in `retryable_codes`.
pub fn is_retryable(failure: &Failure, retryable: CodeSet) -> bool {
    match failure {
        Failure::Connect | Failure::NoResponse => true,
        Failure::Status(code) => *code != Code::Ok && retryable.contains(*code),
    }
}

/// The wait before retry number `attempt` (1 = the first retry): a uniform draw in
/// `[0, min(backoff_max, backoff_base × 2^(attempt-1))]` (full jitter), to the µs.
pub fn backoff(attempt: u32, cfg: &RetryConfig, rng: &mut fastrand::Rng) -> Duration {
    let doublings = attempt.saturating_sub(1);
    let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
    let cap_ms = cfg
        .backoff_base_ms
        .saturating_mul(factor)
        .min(cfg.backoff_max_ms);
    Duration::from_micros(rng.u64(0..=cap_ms.saturating_mul(1000)))
}

/// The least time worth starting a try with, when there is no per-try timeout.
pub const MIN_TRY_TIME: Duration = Duration::from_millis(1);

/// Whether the caller's deadline leaves room for `backoff` and then a whole try (the
/// per-try timeout, or [`MIN_TRY_TIME`] without one). No deadline: always.
pub fn may_retry(
    now: Instant,
    deadline: Option<Instant>,
    per_try_timeout: Option<Duration>,
    backoff: Duration,
) -> bool {
    let Some(deadline) = deadline else {
        return true;
    };
    let needed = backoff.saturating_add(per_try_timeout.unwrap_or(MIN_TRY_TIME));
    deadline.saturating_duration_since(now) >= needed
}

/// How many retries (and hedges) the recent traffic allows: over a sliding window of
/// one-second buckets, `budget_min_per_second × window + budget_ratio × requests`,
/// less the retries already spent in the window. Shared by all calls of a model; the
/// lock is held for a few additions, never across an await.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    window: u64,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// The first instant seen: second 0.
    base: Option<Instant>,
    /// The newest second seen; older instants count in it.
    latest: u64,
    /// One per second of the window, ring-indexed by `second % window`.
    seconds: Vec<Second>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Second {
    second: u64,
    requests: u64,
    retries: u64,
}

impl Window {
    /// The ring entry for `now`, reset when it last held an older second.
    fn current(&mut self, now: Instant) -> (u64, &mut Second) {
        let base = *self.base.get_or_insert(now);
        let second = now
            .saturating_duration_since(base)
            .as_secs()
            .max(self.latest);
        self.latest = second;
        let len = self.seconds.len().max(1) as u64;
        let index = usize::try_from(second % len).unwrap_or(0);
        if self.seconds.is_empty() {
            self.seconds.push(Second::default());
        }
        let entry = &mut self.seconds[index];
        if entry.second != second {
            *entry = Second {
                second,
                requests: 0,
                retries: 0,
            };
        }
        (second, entry)
    }

    /// (requests, retries) in the window ending at `second`.
    fn totals(&self, second: u64) -> (u64, u64) {
        let len = self.seconds.len() as u64;
        self.seconds
            .iter()
            .filter(|s| s.second <= second && s.second + len > second)
            .fold((0, 0), |(q, r), s| (q + s.requests, r + s.retries))
    }
}

impl RetryBudget {
    /// A budget with `cfg`'s ratio, floor and window.
    pub fn new(cfg: &RetryConfig) -> Self {
        let window = cfg.budget_window_seconds.clamp(1, 3600);
        RetryBudget {
            ratio: cfg.budget_ratio,
            min_per_second: cfg.budget_min_per_second,
            window,
            state: Mutex::new(Window {
                base: None,
                latest: 0,
                seconds: vec![Second::default(); usize::try_from(window).unwrap_or(1)],
            }),
        }
    }

    /// Counts one original call (not a retry or a hedge).
    pub fn record_request(&self, now: Instant) {
        self.lock().current(now).1.requests += 1;
    }

    /// Takes one retry (or hedge) from the budget; false when it is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut st = self.lock();
        let (second, _) = st.current(now);
        let (requests, retries) = st.totals(second);
        if retries as f64 + 1.0 > self.allowed(requests) {
            return false;
        }
        st.current(now).1.retries += 1;
        true
    }

    /// Retries left in the window at `now` (may be fractional).
    pub fn available(&self, now: Instant) -> f64 {
        let mut st = self.lock();
        let (second, _) = st.current(now);
        let (requests, retries) = st.totals(second);
        (self.allowed(requests) - retries as f64).max(0.0)
    }

    fn allowed(&self, requests: u64) -> f64 {
        self.min_per_second * self.window as f64 + self.ratio * requests as f64
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Recent latencies of a model's calls (for the hedge delay and the no-response
/// bound): an HDR histogram of the current window and one of the window before, each
/// `capacity` samples. Recording is one bucket increment; a quantile is read from the
/// fuller of the two windows without copying any sample, so memory is fixed (about
/// 20 KB a window) and a quantile costs a walk over buckets, never a sort.
#[derive(Debug)]
pub struct LatencyTracker {
    capacity: u64,
    state: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    current: hdrhistogram::Histogram<u32>,
    previous: hdrhistogram::Histogram<u32>,
}

/// Longest latency told apart, µs (a minute); longer ones count as a minute.
const LATENCY_MAX_US: u64 = 60_000_000;

fn latency_histogram() -> hdrhistogram::Histogram<u32> {
    // 2 significant digits: quantiles within 1%, in about 20 KB.
    hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MAX_US, 2)
        .expect("constant histogram bounds are valid")
}

impl Default for LatencyTracker {
    fn default() -> Self {
        LatencyTracker::new(LatencyTracker::DEFAULT_CAPACITY)
    }
}

impl LatencyTracker {
    /// Samples in one window by default.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A tracker whose windows hold `capacity` samples each (at least 1).
    pub fn new(capacity: usize) -> Self {
        LatencyTracker {
            capacity: capacity.max(1) as u64,
            state: Mutex::new(Windows {
                current: latency_histogram(),
                previous: latency_histogram(),
            }),
        }
    }

    /// Adds the latency of one successful call.
    pub fn record(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_MAX_US);
        let mut w = self.lock();
        w.current.saturating_record(us);
        if w.current.len() >= self.capacity {
            let Windows { current, previous } = &mut *w;
            std::mem::swap(current, previous);
            current.reset();
        }
    }

    /// Samples in the window quantiles are read from.
    pub fn len(&self) -> usize {
        let w = self.lock();
        w.current.len().max(w.previous.len()) as usize
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `p` quantile (0.95 = p95) of the fuller window, within 1%; None when there
    /// are no samples or `p` is not a number.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if p.is_nan() {
            return None;
        }
        let w = self.lock();
        let window = if w.current.len() >= w.previous.len() {
            &w.current
        } else {
            &w.previous
        };
        if window.is_empty() {
            return None;
        }
        let us = window.value_at_quantile(p.clamp(0.0, 1.0));
        Some(Duration::from_micros(
            window.highest_equivalent(us).min(LATENCY_MAX_US),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Windows> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The model's no-response bound, learned from its successful attempts.
#[derive(Debug)]
pub struct NoResponseBound {
    cfg: NoResponseConfig,
    /// Time to response headers of successful attempts.
    times: LatencyTracker,
    /// The bound last computed, µs (0 = not yet), and when (µs on the endpoint clock).
    cached_us: AtomicU64,
    cached_at_us: AtomicU64,
}

/// How often the bound is recomputed from the histogram.
pub(crate) const REFRESH: Duration = Duration::from_millis(100);

impl NoResponseBound {
    /// A bound with no samples yet.
    pub fn new(cfg: NoResponseConfig) -> Self {
        NoResponseBound {
            cfg,
            times: LatencyTracker::default(),
            cached_us: AtomicU64::new(0),
            cached_at_us: AtomicU64::new(0),
        }
    }

    /// Adds the time to response headers of one successful attempt.
    pub fn record(&self, elapsed: Duration) {
        self.times.record(elapsed);
    }

    /// The settings.
    pub fn config(&self) -> &NoResponseConfig {
        &self.cfg
    }

    /// The bound now (None: detection is off).
    pub fn get(&self, now: Instant) -> Option<Duration> {
        if !self.cfg.enabled {
            return None;
        }
        let now_us = crate::clock::nanos(now) / 1000;
        let at = self.cached_at_us.load(Ordering::Relaxed);
        let cached = self.cached_us.load(Ordering::Relaxed);
        if cached > 0 && now_us.saturating_sub(at) < REFRESH.as_micros() as u64 {
            return Some(Duration::from_micros(cached));
        }
        let bound = self.compute();
        self.cached_us
            .store((bound.as_micros() as u64).max(1), Ordering::Relaxed);
        self.cached_at_us.store(now_us, Ordering::Relaxed);
        Some(bound)
    }

    fn compute(&self) -> Duration {
        let floor = Duration::from_millis(self.cfg.floor_ms);
        if (self.times.len() as u64) < self.cfg.min_samples {
            return Duration::from_millis(self.cfg.cold_ms).max(floor);
        }
        match self.times.percentile(0.99) {
            Some(p99) => p99.mul_f64(self.cfg.factor).max(floor),
            None => Duration::from_millis(self.cfg.cold_ms).max(floor),
        }
    }
}

/// Samples needed before `delay_percentile` is trusted over `delay_ms`.
pub const HEDGE_MIN_SAMPLES: usize = 20;

/// How long to wait before hedging a call, or None for no hedge: the
/// `delay_percentile` of recent latencies once [`HEDGE_MIN_SAMPLES`] are known,
/// otherwise `delay_ms`.
pub fn hedge_delay(cfg: &HedgeConfig, tracker: &LatencyTracker) -> Option<Duration> {
    if !cfg.enabled {
        return None;
    }
    if let Some(p) = cfg.delay_percentile {
        if tracker.len() >= HEDGE_MIN_SAMPLES {
            if let Some(delay) = tracker.percentile(p) {
                return Some(delay.max(MIN_TRY_TIME));
            }
        }
    }
    cfg.delay_ms.map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_stays_within_the_doubling_cap() {
        let cfg = RetryConfig::default(); // base 25 ms, max 250 ms
        let mut rng = fastrand::Rng::with_seed(11);
        let caps = [25, 50, 100, 200, 250, 250];
        for (attempt, cap) in (1..=6).zip(caps) {
            let draws: Vec<Duration> = (0..2000)
                .map(|_| backoff(attempt, &cfg, &mut rng))
                .collect();
            let max = draws.iter().max().copied().unwrap_or_default();
            let min = draws.iter().min().copied().unwrap_or_default();
            assert!(max <= ms(cap), "attempt {attempt}: {max:?} > {cap} ms");
            // Full jitter: the draws cover the range.
            assert!(max > ms(cap) * 9 / 10, "attempt {attempt}: max {max:?}");
            assert!(min < ms(cap) / 10, "attempt {attempt}: min {min:?}");
        }
        assert!(backoff(0, &cfg, &mut rng) <= ms(25));
        assert!(backoff(200, &cfg, &mut rng) <= ms(250));
        // Same seed, same draws.
        let a: Vec<_> = (1..=6)
            .map(|i| backoff(i, &cfg, &mut fastrand::Rng::with_seed(5)))
            .collect();
        let b: Vec<_> = (1..=6)
            .map(|i| backoff(i, &cfg, &mut fastrand::Rng::with_seed(5)))
            .collect();
        assert_eq!(a, b);
        let none = RetryConfig {
            backoff_base_ms: 0,
            ..RetryConfig::default()
        };
        assert_eq!(backoff(3, &none, &mut rng), Duration::ZERO);
    }

    #[test]
    fn budget_follows_the_ratio_and_slides() {
        let budget = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_second: 0.0,
            budget_window_seconds: 10,
            ..RetryConfig::default()
        });
        let t0 = Instant::now();
        assert!(!budget.try_withdraw(t0), "no traffic, no floor: no retries");
        for _ in 0..50 {
            budget.record_request(t0);
        }
        assert!((0..10).all(|_| budget.try_withdraw(t0)));
        assert!(!budget.try_withdraw(t0), "20% of 50 spent");
        // Hedges and retries share it; more traffic earns more.
        for _ in 0..5 {
            budget.record_request(t0 + secs(3));
        }
        assert!(budget.try_withdraw(t0 + secs(3)));
        assert!(!budget.try_withdraw(t0 + secs(3)));
        // Second 0 leaves the window at second 10: its 50 requests and 10 retries go.
        assert!((budget.available(t0 + secs(9)) - 0.0).abs() < 1e-9);
        assert!((budget.available(t0 + secs(10)) - 0.0).abs() < 1e-9);
        for _ in 0..10 {
            budget.record_request(t0 + secs(10));
        }
        // Window (1..=10]: 15 requests, 1 retry spent → 3 - 1 = 2 left.
        assert!((budget.available(t0 + secs(10)) - 2.0).abs() < 1e-9);
        assert!(budget.try_withdraw(t0 + secs(10)));
        assert!(budget.try_withdraw(t0 + secs(10)));
        assert!(!budget.try_withdraw(t0 + secs(10)));
        // Long after, all is forgotten.
        assert!((budget.available(t0 + secs(100)) - 0.0).abs() < 1e-9);
        // An instant older than the newest seen counts as the newest second.
        budget.record_request(t0);
        for _ in 0..4 {
            budget.record_request(t0 + secs(100));
        }
        assert!((budget.available(t0 + secs(100)) - 1.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_floor_allows_retries_without_traffic() {
        let budget = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_second: 1.0,
            budget_window_seconds: 5,
            ..RetryConfig::default()
        });
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| budget.try_withdraw(t0)).count(), 5);
        tokio::time::advance(secs(4)).await;
        assert!(!budget.try_withdraw(Instant::now()));
        // At second 5 the retries of second 0 leave the window.
        tokio::time::advance(secs(1)).await;
        let now = Instant::now();
        assert_eq!((0..20).filter(|_| budget.try_withdraw(now)).count(), 5);
        // Default config: 10/s × 10 s floor.
        let budget = RetryBudget::new(&RetryConfig::default());
        assert_eq!((0..500).filter(|_| budget.try_withdraw(now)).count(), 100);
    }

    #[test]
    fn classifies_failures() {
        let cfg = RetryConfig::default().retryable_codes;
        assert!(is_retryable(&Failure::Connect, cfg));
        assert!(is_retryable(&Failure::NoResponse, cfg));
        assert!(is_retryable(&Failure::Status(Code::Unavailable), cfg));
        assert!(!is_retryable(&Failure::Status(Code::Internal), cfg));
        assert!(!is_retryable(&Failure::Status(Code::Ok), cfg));
        let cfg = CodeSet::of(&[Code::ResourceExhausted, Code::Aborted]);
        assert!(is_retryable(&Failure::Status(Code::ResourceExhausted), cfg));
        assert!(is_retryable(&Failure::Status(Code::Aborted), cfg));
        assert!(!is_retryable(&Failure::Status(Code::Unavailable), cfg));
        assert!(is_retryable(&Failure::Connect, cfg));
        assert_eq!(
            Failure::Status(Code::DeadlineExceeded).to_string(),
            "status DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn may_retry_only_within_the_deadline() {
        let now = Instant::now();
        let deadline = Some(now + ms(100));
        assert!(may_retry(now, None, Some(secs(60)), secs(60)));
        assert!(may_retry(now, deadline, Some(ms(50)), ms(50)));
        assert!(!may_retry(now, deadline, Some(ms(50)), ms(51)));
        assert!(!may_retry(now, deadline, Some(ms(200)), Duration::ZERO));
        // Without a per-try timeout, a millisecond after the backoff is enough.
        assert!(may_retry(now, deadline, None, ms(99)));
        assert!(!may_retry(now, deadline, None, ms(100)));
        // Past the deadline: never.
        assert!(!may_retry(now + ms(150), deadline, None, Duration::ZERO));
    }

    #[test]
    fn latency_percentiles_and_hedge_delay() {
        let tracker = LatencyTracker::new(100);
        assert!(tracker.is_empty());
        assert_eq!(tracker.percentile(0.5), None);
        for i in 1..=100 {
            tracker.record(ms(i));
        }
        let near = |p: f64, want: u64| {
            let got = tracker.percentile(p).expect("samples").as_secs_f64() * 1000.0;
            let want = want as f64;
            assert!(
                (got - want).abs() <= want * 0.01 + 0.01,
                "p{p}: {got} ms, want {want}"
            );
        };
        near(0.5, 50);
        near(0.95, 95);
        near(1.0, 100);
        near(0.0, 1);
        assert_eq!(tracker.percentile(f64::NAN), None);
        // Windows of 100: 101..=150 go into a new window; quantiles still come from the
        // full one until the new one fills, then from the new one alone.
        for i in 101..=150 {
            tracker.record(ms(i));
        }
        assert_eq!(tracker.len(), 100);
        near(1.0, 100);
        for i in 151..=200 {
            tracker.record(ms(i));
        }
        near(0.0, 101);
        near(1.0, 200);

        let cfg = HedgeConfig {
            enabled: true,
            delay_ms: Some(30),
            delay_percentile: Some(0.9),
            max_hedges: 1,
        };
        let within = |got: Option<Duration>, want: u64| {
            let got = got.expect("a delay").as_secs_f64() * 1000.0;
            assert!(
                (got - want as f64).abs() <= want as f64 * 0.01,
                "{got} ms, want {want}"
            );
        };
        // p90 of the window 101..=200.
        within(hedge_delay(&cfg, &tracker), 190);
        let few = LatencyTracker::default();
        for _ in 0..HEDGE_MIN_SAMPLES - 1 {
            few.record(ms(500));
        }
        assert_eq!(hedge_delay(&cfg, &few), Some(ms(30)), "too few samples");
        few.record(ms(500));
        within(hedge_delay(&cfg, &few), 500);
        let fixed = HedgeConfig {
            delay_percentile: None,
            ..cfg.clone()
        };
        assert_eq!(hedge_delay(&fixed, &tracker), Some(ms(30)));
        let off = HedgeConfig {
            enabled: false,
            ..cfg
        };
        assert_eq!(hedge_delay(&off, &tracker), None);
    }

    #[test]
    fn retryable_codes_follow_the_one_parser() {
        // The same rules as every other code list: `unavailable` is accepted here too.
        let cfg: RetryConfig =
            toml::from_str("retryable_codes = [\"unavailable\", \"RESOURCE_EXHAUSTED\"]")
                .expect("codes");
        assert_eq!(
            cfg.retryable_codes,
            CodeSet::of(&[Code::Unavailable, Code::ResourceExhausted])
        );
        let err =
            toml::from_str::<RetryConfig>("retryable_codes = [\"BUSY\"]").expect_err("unknown");
        assert!(err.to_string().contains("`BUSY`"), "{err}");
    }

    #[test]
    fn config_validation_names_the_field() {
        let cfg: RetryConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(cfg, RetryConfig::default());
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.per_try_timeout(), None);
        let hedge: HedgeConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(hedge, HedgeConfig::default());
        assert!(hedge.validate().is_ok());
        assert!(serde_json::from_str::<RetryConfig>(r#"{"attempts": 3}"#).is_err());
        assert!(serde_json::from_str::<HedgeConfig>(r#"{"delay": 3}"#).is_err());

        let bad = |cfg: RetryConfig, field: &str| {
            let err = cfg
                .validate()
                .expect_err("invalid")
                .under("retry")
                .to_string();
            assert!(err.contains(field), "{err}");
        };
        let d = RetryConfig::default;
        bad(
            RetryConfig {
                max_attempts: 0,
                ..d()
            },
            "retry.max_attempts",
        );
        bad(
            RetryConfig {
                backoff_base_ms: 500,
                ..d()
            },
            "retry.backoff_base_ms",
        );
        bad(
            RetryConfig {
                per_try_timeout_ms: Some(0),
                ..d()
            },
            "retry.per_try_timeout_ms",
        );
        bad(
            RetryConfig {
                budget_ratio: 1.5,
                ..d()
            },
            "retry.budget_ratio",
        );
        bad(
            RetryConfig {
                budget_ratio: f64::NAN,
                ..d()
            },
            "retry.budget_ratio",
        );
        bad(
            RetryConfig {
                budget_min_per_second: -1.0,
                ..d()
            },
            "retry.budget_min_per_second",
        );
        bad(
            RetryConfig {
                budget_window_seconds: 0,
                ..d()
            },
            "retry.budget_window_seconds",
        );

        let bad = |cfg: HedgeConfig, field: &str| {
            let err = cfg
                .validate()
                .expect_err("invalid")
                .under("hedge")
                .to_string();
            assert!(err.contains(field), "{err}");
        };
        let on = HedgeConfig {
            enabled: true,
            delay_ms: Some(20),
            ..HedgeConfig::default()
        };
        assert!(on.validate().is_ok());
        bad(
            HedgeConfig {
                delay_ms: None,
                ..on.clone()
            },
            "hedge.delay_ms: delay_ms or delay_percentile",
        );
        bad(
            HedgeConfig {
                delay_percentile: Some(1.5),
                ..on.clone()
            },
            "hedge.delay_percentile",
        );
        bad(
            HedgeConfig {
                delay_ms: Some(0),
                ..on.clone()
            },
            "hedge.delay_ms",
        );
        bad(
            HedgeConfig {
                max_hedges: 0,
                ..on
            },
            "hedge.max_hedges",
        );
    }
}
