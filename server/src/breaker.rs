//! Circuit breaker, one per backend and one per backend × model (same type, two
//! instances). Sits at the pick and endpoint steps of the request path: the balancer asks
//! [`Breaker::admits`] while it filters candidates, the call takes a [`Permit`] just
//! before it is sent, and the call's end hands the permit back with its outcome.
//!
//! Why a breaker beside outlier detection: outlier detection compares a backend with its
//! peers and takes it out of the pool for a while; a breaker looks at one backend (or one
//! model on one backend) on its own and stops calls the moment its recent calls mostly
//! fail or crawl, then lets a few probe calls through to find out when it has recovered.
//! The per-model instance matters on GPU servers: one model can be broken (out of memory,
//! a bad version loaded) while the others on the same server are fine.
//!
//! States:
//! - **closed**: every call is admitted; outcomes go into a sliding window (the last N
//!   calls, or the last N seconds in one-second buckets). Once the window holds at least
//!   `minimum_calls`, a failure rate or a slow-call rate at or over its threshold opens
//!   the breaker.
//! - **open**: nothing is admitted until the wait passes. The wait starts at
//!   `open_wait_ms` and doubles with each consecutive opening, capped at
//!   `open_wait_max_ms`, so a backend that keeps failing its probes is asked ever less
//!   often.
//! - **half-open**: `half_open_permits` probe calls are let through. When all their
//!   results are in, rates under the thresholds close the breaker (and reset the wait);
//!   anything else opens it again with the longer wait.
//! - **forced open**: an operator's decision; it lasts until [`Breaker::reset`].
//!
//! A [`Permit`] is a plain value, not a guard: the breaker is a plain struct behind
//! `&mut self`, so a permit cannot reach back into it on drop. Every permit must go back
//! through [`Breaker::record`] (the call ended with a status) or [`Breaker::release`]
//! (the call was cancelled or never sent; its result says nothing about the backend, and
//! a half-open probe slot is returned). For call paths that can be dropped mid-flight,
//! [`SharedBreaker::acquire_guard`] gives a [`PermitGuard`] that releases on drop.
//!
//! Each permit carries the breaker's epoch, which changes with every transition, so a
//! result that arrives after the state changed (a slow call admitted while closed that
//! ends after the breaker opened) is ignored instead of polluting the new state.
//!
//! ```
//! use infergate::breaker::{Breaker, Outcome};
//! use infergate::config::BreakerConfig;
//! use std::time::Duration;
//! use tokio::time::Instant;
//!
//! let mut breaker = Breaker::new(&BreakerConfig::default()).expect("valid config");
//! let now = Instant::now();
//! if let Some(permit) = breaker.try_acquire(now) {
//!     // ... send the call ...
//!     let outcome = Outcome { code: tonic::Code::Ok, elapsed: Duration::from_millis(12) };
//!     if let Some(transition) = breaker.record(permit, outcome, now) {
//!         println!("breaker {transition}");
//!     }
//! }
//! ```
//!
//! Time is only ever read by the caller (`now` is an argument everywhere), so the logic
//! is deterministic and tests step time by hand.

use crate::config::{BreakerConfig, WindowKind};
use crate::ratio::{pct, ratio};
use infergate_base::codes::CodeSet;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// Width of one bucket of a time window.
const BUCKET: Duration = Duration::from_secs(1);

/// The config in the form the breaker uses.
#[derive(Debug, Clone)]
struct Settings {
    window: WindowKind,
    failure_rate: f64,
    slow_duration: Duration,
    /// None when slow-call tripping is off.
    slow_rate: Option<f64>,
    minimum_calls: u32,
    open_wait_ms: u64,
    open_wait_max_ms: u64,
    half_open_permits: u32,
    failure_codes: CodeSet,
}

impl Settings {
    fn new(config: &BreakerConfig) -> Result<Settings, String> {
        config.validate().map_err(|e| e.to_string())?;
        Ok(Settings {
            window: config.window,
            failure_rate: config.failure_rate_threshold,
            slow_duration: Duration::from_millis(config.slow_call_duration_ms),
            slow_rate: (config.slow_call_rate_threshold < 1.0)
                .then_some(config.slow_call_rate_threshold),
            minimum_calls: config.minimum_calls,
            open_wait_ms: config.open_wait_ms,
            open_wait_max_ms: config.open_wait_max_ms,
            half_open_permits: config.half_open_permits,
            failure_codes: config.failure_codes,
        })
    }
}

/// How a call ended, as the breaker judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The call's gRPC status (`Ok` for success). Transport failures map to
    /// `UNAVAILABLE`, as `proxy::transport_status` does.
    pub code: Code,
    /// Time from sending the call to its end.
    pub elapsed: Duration,
}

/// The breaker's state, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused until the wait passes.
    Open,
    /// A few probe calls are let through.
    HalfOpen,
    /// Opened by an operator; stays open until reset.
    ForcedOpen,
}

impl BreakerState {
    /// Lower-case name for logs, metrics labels and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of state, for logs, metrics and the admin event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why, in words: `failure rate 60% >= 50% over 20 calls; open for 5000 ms`.
    pub reason: String,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

/// Leave to send one call. Give it back with [`Breaker::record`] or
/// [`Breaker::release`]; see the module docs.
#[derive(Debug)]
#[must_use = "give a permit back with Breaker::record or Breaker::release"]
pub struct Permit {
    epoch: u64,
    probe: bool,
    transition: Option<Transition>,
}

impl Permit {
    /// Whether this is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The open → half-open transition that taking this permit caused, if any (only the
    /// first probe after a wait carries one).
    pub fn take_transition(&mut self) -> Option<Transition> {
        self.transition.take()
    }
}

/// Counts of calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Calls recorded.
    pub calls: u32,
    /// Of which failed (code in `failure_codes`).
    pub failures: u32,
    /// Of which slow (at least `slow_call_duration_ms`).
    pub slow: u32,
}

impl Tally {
    fn add(&mut self, sample: Sample) {
        self.calls = self.calls.saturating_add(1);
        self.failures = self.failures.saturating_add(u32::from(sample.failed));
        self.slow = self.slow.saturating_add(u32::from(sample.slow));
    }

    fn remove(&mut self, other: Tally) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }

    fn merge(&mut self, other: Tally) {
        self.calls = self.calls.saturating_add(other.calls);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }

    fn failure_rate(self) -> f64 {
        ratio(self.failures, self.calls)
    }

    fn slow_rate(self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    failed: bool,
    slow: bool,
}

impl Sample {
    fn tally(self) -> Tally {
        let mut t = Tally::default();
        t.add(self);
        t
    }
}

/// The closed state's sliding window, with running totals (O(1) per call).
#[derive(Debug)]
enum Window {
    Count {
        size: usize,
        samples: VecDeque<Sample>,
        total: Tally,
    },
    Time {
        span: Duration,
        /// (bucket start, counts), oldest first.
        buckets: VecDeque<(Instant, Tally)>,
        total: Tally,
    },
}

impl Window {
    fn new(kind: WindowKind) -> Window {
        match kind {
            WindowKind::Count { size } => Window::Count {
                size: size as usize,
                samples: VecDeque::new(),
                total: Tally::default(),
            },
            WindowKind::Time { seconds } => Window::Time {
                span: Duration::from_secs(seconds),
                buckets: VecDeque::new(),
                total: Tally::default(),
            },
        }
    }

    fn push(&mut self, sample: Sample, now: Instant) {
        self.prune(now);
        match self {
            Window::Count {
                size,
                samples,
                total,
            } => {
                samples.push_back(sample);
                total.add(sample);
                while samples.len() > *size {
                    if let Some(old) = samples.pop_front() {
                        total.remove(old.tally());
                    }
                }
            }
            Window::Time { buckets, total, .. } => {
                match buckets.back_mut() {
                    Some((start, counts)) if now < *start + BUCKET => counts.add(sample),
                    _ => buckets.push_back((now, sample.tally())),
                }
                total.add(sample);
            }
        }
    }

    /// Drops time buckets that have aged out.
    fn prune(&mut self, now: Instant) {
        if let Window::Time {
            span,
            buckets,
            total,
        } = self
        {
            while let Some(&(start, counts)) = buckets.front() {
                if start + *span > now {
                    break;
                }
                buckets.pop_front();
                total.remove(counts);
            }
        }
    }

    fn tally(&mut self, now: Instant) -> Tally {
        self.prune(now);
        self.peek(now)
    }

    /// The totals as of `now`, without pruning.
    fn peek(&self, now: Instant) -> Tally {
        match self {
            Window::Count { total, .. } => *total,
            Window::Time { span, buckets, .. } => {
                let mut t = Tally::default();
                for &(start, counts) in buckets {
                    if start + *span > now {
                        t.merge(counts);
                    }
                }
                t
            }
        }
    }

    fn clear(&mut self) {
        match self {
            Window::Count { samples, total, .. } => {
                samples.clear();
                *total = Tally::default();
            }
            Window::Time { buckets, total, .. } => {
                buckets.clear();
                *total = Tally::default();
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Probes that may still be handed out.
        permits_left: u32,
        /// Probe results in so far.
        results: Tally,
    },
    ForcedOpen,
}

impl State {
    fn public(self) -> BreakerState {
        match self {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
            State::ForcedOpen => BreakerState::ForcedOpen,
        }
    }
}

/// A snapshot for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerStats {
    /// Current state.
    pub state: BreakerState,
    /// Closed: the window's counts; half-open: the probe results so far.
    pub window: Tally,
    /// Openings in a row without a successful half-open trial.
    pub consecutive_opens: u32,
    /// When an open breaker will admit probes.
    pub open_until: Option<Instant>,
}

/// A circuit breaker; see the module docs. Not thread-safe by itself: wrap it in a
/// [`SharedBreaker`] to share it.
#[derive(Debug)]
pub struct Breaker {
    settings: Settings,
    state: State,
    window: Window,
    /// Changes with every transition; permits from an older epoch are stale.
    epoch: u64,
    consecutive_opens: u32,
}

impl Breaker {
    /// A closed breaker, or the config's validation error.
    pub fn new(config: &BreakerConfig) -> Result<Breaker, String> {
        let settings = Settings::new(config)?;
        Ok(Breaker {
            window: Window::new(settings.window),
            settings,
            state: State::Closed,
            epoch: 0,
            consecutive_opens: 0,
        })
    }

    /// Applies a new config (on reload), keeping the state. The window starts empty when
    /// its kind or size changed.
    pub fn reconfigure(&mut self, config: &BreakerConfig) -> Result<(), String> {
        let settings = Settings::new(config)?;
        if settings.window != self.settings.window {
            self.window = Window::new(settings.window);
        }
        self.settings = settings;
        Ok(())
    }

    /// The current state. An open breaker whose wait has passed still reads `Open` until
    /// [`Breaker::tick`] or [`Breaker::try_acquire`] moves it on.
    pub fn state(&self) -> BreakerState {
        self.state.public()
    }

    /// When an open breaker will let probes through.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Counts and state for the admin API and metrics.
    pub fn stats(&self, now: Instant) -> BreakerStats {
        let window = match self.state {
            State::HalfOpen { results, .. } => results,
            State::Closed => self.window.peek(now),
            State::Open { .. } | State::ForcedOpen => Tally::default(),
        };
        BreakerStats {
            state: self.state(),
            window,
            consecutive_opens: self.consecutive_opens,
            open_until: self.open_until(),
        }
    }

    /// Whether a call would be admitted now, without taking a permit: what the balancer
    /// asks while it filters candidates. Closed: yes; open: once the wait has passed;
    /// half-open: while probe permits remain; forced open: no.
    pub fn admits(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { permits_left, .. } => permits_left > 0,
            State::ForcedOpen => false,
        }
    }

    /// Moves an open breaker whose wait has passed to half-open. Called by
    /// [`Breaker::try_acquire`]; call it from a periodic task too if the state should
    /// show the move without traffic.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Open { until } if now >= until => {
                self.set_state(State::HalfOpen {
                    permits_left: self.settings.half_open_permits,
                    results: Tally::default(),
                });
                Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    reason: format!(
                        "open wait passed; letting {} probe call(s) through",
                        self.settings.half_open_permits
                    ),
                })
            }
            _ => None,
        }
    }

    /// Leave to send one call, or None when the breaker refuses it. Closed: always;
    /// open: None until the wait passes, then the breaker turns half-open (the permit
    /// carries that transition, see [`Permit::take_transition`]); half-open: while
    /// probe permits remain.
    pub fn try_acquire(&mut self, now: Instant) -> Option<Permit> {
        let transition = self.tick(now);
        let epoch = self.epoch;
        match &mut self.state {
            State::Closed => Some(Permit {
                epoch,
                probe: false,
                transition,
            }),
            State::HalfOpen { permits_left, .. } if *permits_left > 0 => {
                *permits_left -= 1;
                Some(Permit {
                    epoch,
                    probe: true,
                    transition,
                })
            }
            // A fresh half-open state always has a permit, so no transition is lost here.
            State::HalfOpen { .. } | State::Open { .. } | State::ForcedOpen => None,
        }
    }

    /// Records how the call that took `permit` ended. Returns the transition it caused.
    /// A permit from before the latest transition is ignored.
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        if permit.epoch != self.epoch {
            return None;
        }
        let sample = Sample {
            failed: self.settings.failure_codes.contains(outcome.code),
            slow: outcome.elapsed >= self.settings.slow_duration,
        };
        match &mut self.state {
            State::Closed => {
                self.window.push(sample, now);
                let tally = self.window.tally(now);
                if tally.calls < self.settings.minimum_calls {
                    return None;
                }
                let reason = self.verdict(tally)?;
                Some(self.open(now, BreakerState::Closed, reason))
            }
            State::HalfOpen { results, .. } if permit.probe => {
                results.add(sample);
                let results = *results;
                if results.calls < self.settings.half_open_permits {
                    return None;
                }
                match self.verdict(results) {
                    Some(reason) => Some(self.open(
                        now,
                        BreakerState::HalfOpen,
                        format!("half-open probes failed: {reason}"),
                    )),
                    None => {
                        self.consecutive_opens = 0;
                        self.window.clear();
                        self.set_state(State::Closed);
                        Some(Transition {
                            from: BreakerState::HalfOpen,
                            to: BreakerState::Closed,
                            reason: format!(
                                "half-open probes succeeded: {} of {} failed, {} slow",
                                results.failures, results.calls, results.slow
                            ),
                        })
                    }
                }
            }
            _ => None,
        }
    }

    /// Gives back a permit whose call never produced a result worth judging (cancelled
    /// by the caller, or never sent). A half-open probe slot becomes available again.
    pub fn release(&mut self, permit: Permit) {
        if permit.epoch != self.epoch || !permit.probe {
            return;
        }
        if let State::HalfOpen { permits_left, .. } = &mut self.state {
            *permits_left = permits_left
                .saturating_add(1)
                .min(self.settings.half_open_permits);
        }
    }

    /// Opens the breaker until [`Breaker::reset`] (admin). None if it already was.
    pub fn force_open(&mut self) -> Option<Transition> {
        let from = self.state();
        if from == BreakerState::ForcedOpen {
            return None;
        }
        self.window.clear();
        self.set_state(State::ForcedOpen);
        Some(Transition {
            from,
            to: BreakerState::ForcedOpen,
            reason: "forced open by an operator".into(),
        })
    }

    /// Closes the breaker with an empty window and the shortest wait (admin). None if it
    /// was closed already (the window is still emptied).
    pub fn reset(&mut self) -> Option<Transition> {
        let from = self.state();
        self.window.clear();
        self.consecutive_opens = 0;
        if from == BreakerState::Closed {
            return None;
        }
        self.set_state(State::Closed);
        Some(Transition {
            from,
            to: BreakerState::Closed,
            reason: "reset by an operator".into(),
        })
    }

    /// Why these counts should open the breaker, or None if they should not.
    fn verdict(&self, tally: Tally) -> Option<String> {
        let failure_rate = tally.failure_rate();
        if tally.calls > 0 && failure_rate >= self.settings.failure_rate {
            return Some(format!(
                "failure rate {} >= {} over {} calls",
                pct(failure_rate),
                pct(self.settings.failure_rate),
                tally.calls
            ));
        }
        let threshold = self.settings.slow_rate?;
        let slow_rate = tally.slow_rate();
        (tally.calls > 0 && slow_rate >= threshold).then(|| {
            format!(
                "slow-call rate {} >= {} over {} calls (slow = at least {} ms)",
                pct(slow_rate),
                pct(threshold),
                tally.calls,
                self.settings.slow_duration.as_millis()
            )
        })
    }

    fn open(&mut self, now: Instant, from: BreakerState, reason: String) -> Transition {
        self.consecutive_opens = self.consecutive_opens.saturating_add(1);
        let wait = self.open_wait();
        self.window.clear();
        self.set_state(State::Open { until: now + wait });
        Transition {
            from,
            to: BreakerState::Open,
            reason: format!("{reason}; open for {} ms", wait.as_millis()),
        }
    }

    /// `open_wait_ms × 2^(consecutive opens − 1)`, capped at `open_wait_max_ms`.
    fn open_wait(&self) -> Duration {
        let doublings = self.consecutive_opens.saturating_sub(1);
        let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
        let ms = self
            .settings
            .open_wait_ms
            .saturating_mul(factor)
            .min(self.settings.open_wait_max_ms);
        Duration::from_millis(ms)
    }

    fn set_state(&mut self, state: State) {
        self.state = state;
        self.epoch = self.epoch.wrapping_add(1);
    }
}

/// A [`Breaker`] shared between tasks: the same methods on `&self`, each one short
/// critical section on a `std::sync::Mutex` (never held across an await).
#[derive(Debug)]
pub struct SharedBreaker(Mutex<Breaker>);

impl SharedBreaker {
    /// A closed breaker, or the config's validation error.
    pub fn new(config: &BreakerConfig) -> Result<SharedBreaker, String> {
        Breaker::new(config).map(|b| SharedBreaker(Mutex::new(b)))
    }

    fn lock(&self) -> MutexGuard<'_, Breaker> {
        // No method leaves the breaker half-updated, so a poisoned lock is still sound.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Breaker::reconfigure`].
    pub fn reconfigure(&self, config: &BreakerConfig) -> Result<(), String> {
        self.lock().reconfigure(config)
    }

    /// See [`Breaker::state`].
    pub fn state(&self) -> BreakerState {
        self.lock().state()
    }

    /// See [`Breaker::stats`].
    pub fn stats(&self, now: Instant) -> BreakerStats {
        self.lock().stats(now)
    }

    /// See [`Breaker::admits`].
    pub fn admits(&self, now: Instant) -> bool {
        self.lock().admits(now)
    }

    /// See [`Breaker::tick`].
    pub fn tick(&self, now: Instant) -> Option<Transition> {
        self.lock().tick(now)
    }

    /// See [`Breaker::try_acquire`].
    pub fn try_acquire(&self, now: Instant) -> Option<Permit> {
        self.lock().try_acquire(now)
    }

    /// Like [`SharedBreaker::try_acquire`], but the permit is held by a guard that
    /// releases it when dropped unrecorded (the call future was dropped mid-flight).
    pub fn acquire_guard(self: &Arc<Self>, now: Instant) -> Option<PermitGuard> {
        let permit = self.try_acquire(now)?;
        Some(PermitGuard {
            breaker: Arc::clone(self),
            permit: Some(permit),
        })
    }

    /// See [`Breaker::record`].
    pub fn record(&self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        self.lock().record(permit, outcome, now)
    }

    /// See [`Breaker::release`].
    pub fn release(&self, permit: Permit) {
        self.lock().release(permit);
    }

    /// See [`Breaker::force_open`].
    pub fn force_open(&self) -> Option<Transition> {
        self.lock().force_open()
    }

    /// See [`Breaker::reset`].
    pub fn reset(&self) -> Option<Transition> {
        self.lock().reset()
    }
}

/// A permit on a [`SharedBreaker`] that is released if dropped without
/// [`PermitGuard::record`].
#[derive(Debug)]
#[must_use = "dropping the guard releases the permit at once"]
pub struct PermitGuard {
    breaker: Arc<SharedBreaker>,
    permit: Option<Permit>,
}

impl PermitGuard {
    /// Whether this is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.permit.as_ref().is_some_and(Permit::is_probe)
    }

    /// See [`Permit::take_transition`].
    pub fn take_transition(&mut self) -> Option<Transition> {
        self.permit.as_mut().and_then(Permit::take_transition)
    }

    /// Records the call's outcome, consuming the guard.
    pub fn record(mut self, outcome: Outcome, now: Instant) -> Option<Transition> {
        let permit = self.permit.take()?;
        self.breaker.record(permit, outcome, now)
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker.release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ok() -> Outcome {
        Outcome {
            code: Code::Ok,
            elapsed: 10 * MS,
        }
    }

    fn fail() -> Outcome {
        Outcome {
            code: Code::Unavailable,
            elapsed: 10 * MS,
        }
    }

    fn slow() -> Outcome {
        Outcome {
            code: Code::Ok,
            elapsed: 3000 * MS,
        }
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: WindowKind::Count { size: 10 },
            minimum_calls: 4,
            half_open_permits: 2,
            open_wait_ms: 1000,
            open_wait_max_ms: 3000,
            ..BreakerConfig::default()
        }
    }

    fn breaker(config: &BreakerConfig) -> Breaker {
        Breaker::new(config).expect("valid config")
    }

    /// Takes a permit and records `outcome` for it.
    fn call(b: &mut Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
        let permit = b.try_acquire(now).expect("admitted");
        b.record(permit, outcome, now)
    }

    /// Opens a breaker built from `config()` (4 failures at `now`).
    fn opened(now: Instant) -> Breaker {
        let mut b = breaker(&config());
        for _ in 0..3 {
            assert_eq!(call(&mut b, fail(), now), None);
        }
        let t = call(&mut b, fail(), now).expect("opens");
        assert_eq!(t.to, BreakerState::Open);
        b
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = BreakerConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.window, WindowKind::Count { size: 20 });
        let codes = c.failure_codes;
        assert_eq!(
            codes.names(),
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
        assert!(!codes.contains(Code::InvalidArgument));
        assert!(!codes.contains(Code::NotFound));
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_fields() {
        let c: BreakerConfig = toml::from_str(
            "window = { kind = \"time\", seconds = 30 }\nminimum_calls = 5\nfailure_codes = [\"unavailable\"]",
        )
        .expect("parses");
        assert_eq!(c.window, WindowKind::Time { seconds: 30 });
        assert_eq!(c.minimum_calls, 5);
        assert_eq!(c.open_wait_ms, 5000, "unset fields keep their defaults");
        assert_eq!(c.validate(), Ok(()));
        assert!(toml::from_str::<BreakerConfig>("minimum_call = 5").is_err());
        assert!(
            toml::from_str::<BreakerConfig>("window = { kind = \"count\", sise = 5 }").is_err()
        );
        assert!(toml::from_str::<BreakerConfig>("window = { kind = \"ring\" }").is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        let cases: Vec<(BreakerConfig, &str)> = vec![
            (
                BreakerConfig {
                    failure_rate_threshold: 1.5,
                    ..config()
                },
                "failure_rate_threshold:",
            ),
            (
                BreakerConfig {
                    failure_rate_threshold: f64::NAN,
                    ..config()
                },
                "failure_rate_threshold:",
            ),
            (
                BreakerConfig {
                    slow_call_rate_threshold: 0.0,
                    ..config()
                },
                "slow_call_rate_threshold:",
            ),
            (
                BreakerConfig {
                    window: WindowKind::Count { size: 0 },
                    ..config()
                },
                "window.size:",
            ),
            (
                BreakerConfig {
                    window: WindowKind::Time { seconds: 0 },
                    ..config()
                },
                "window.seconds:",
            ),
            (
                BreakerConfig {
                    minimum_calls: 11,
                    ..config()
                },
                "minimum_calls:",
            ),
            (
                BreakerConfig {
                    minimum_calls: 0,
                    ..config()
                },
                "minimum_calls:",
            ),
            (
                BreakerConfig {
                    open_wait_max_ms: 500,
                    ..config()
                },
                "open_wait_max_ms:",
            ),
            (
                BreakerConfig {
                    open_wait_ms: 0,
                    ..config()
                },
                "open_wait_ms:",
            ),
            (
                BreakerConfig {
                    half_open_permits: 0,
                    ..config()
                },
                "half_open_permits:",
            ),
            (
                BreakerConfig {
                    slow_call_duration_ms: 0,
                    ..config()
                },
                "slow_call_duration_ms:",
            ),
        ];
        for (c, prefix) in cases {
            let err = c.validate().expect_err(prefix).to_string();
            assert!(
                err.starts_with(prefix),
                "{err:?} should start with {prefix:?}"
            );
            assert!(Breaker::new(&c).is_err());
        }
    }

    #[test]
    fn failure_codes_are_parsed_while_the_config_loads() {
        let c: BreakerConfig =
            toml::from_str("failure_codes = [\" unavailable \", \"13\"]").expect("codes");
        assert_eq!(
            c.failure_codes,
            CodeSet::of(&[Code::Unavailable, Code::Internal])
        );
        for (text, want) in [
            (
                "failure_codes = [\"UNAVAILABLE\", \"UNAVALABLE\"]",
                "[1]: unknown gRPC code `UNAVALABLE`",
            ),
            ("failure_codes = [\"OK\"]", "[0]: OK"),
        ] {
            let err = toml::from_str::<BreakerConfig>(text).expect_err(text);
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn closed_opens_on_failure_rate() {
        let now = Instant::now();
        let mut b = breaker(&config());
        for _ in 0..4 {
            assert_eq!(call(&mut b, ok(), now), None);
        }
        for _ in 0..3 {
            assert_eq!(call(&mut b, fail(), now), None, "3 of 7 is under 50%");
        }
        let t = call(&mut b, fail(), now).expect("4 of 8 opens");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert_eq!(
            t.reason,
            "failure rate 50% >= 50% over 8 calls; open for 1000 ms"
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.state().as_str(), "open");
        assert_eq!(b.open_until(), Some(now + 1000 * MS));
        assert!(b.try_acquire(now).is_none());
        assert!(!b.admits(now + 999 * MS));
    }

    #[test]
    fn closed_opens_on_slow_call_rate() {
        let now = Instant::now();
        let mut b = breaker(&BreakerConfig {
            slow_call_rate_threshold: 0.75,
            ..config()
        });
        for _ in 0..2 {
            assert_eq!(call(&mut b, ok(), now), None);
        }
        for _ in 0..5 {
            assert_eq!(call(&mut b, slow(), now), None, "5 of 7 is under 75%");
        }
        let t = call(&mut b, slow(), now).expect("6 of 8 opens");
        assert_eq!(t.to, BreakerState::Open);
        assert!(
            t.reason
                .starts_with("slow-call rate 75% >= 75% over 8 calls"),
            "{}",
            t.reason
        );
    }

    #[test]
    fn slow_calls_do_not_trip_by_default() {
        let now = Instant::now();
        let mut b = breaker(&config());
        for _ in 0..30 {
            assert_eq!(call(&mut b, slow(), now), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.stats(now).window.slow, 10);
    }

    #[test]
    fn nothing_opens_before_minimum_calls() {
        let now = Instant::now();
        let mut b = breaker(&BreakerConfig {
            minimum_calls: 5,
            ..config()
        });
        for _ in 0..4 {
            assert_eq!(call(&mut b, fail(), now), None, "100% but too few calls");
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(
            call(&mut b, fail(), now).is_some(),
            "the fifth call decides"
        );
    }

    #[test]
    fn count_window_slides() {
        let now = Instant::now();
        let mut b = breaker(&config());
        // 3 failures among 10 calls, then 7 successes push them out.
        for outcome in [
            ok(),
            ok(),
            ok(),
            ok(),
            fail(),
            fail(),
            fail(),
            ok(),
            ok(),
            ok(),
        ] {
            assert_eq!(call(&mut b, outcome, now), None);
        }
        assert_eq!(b.stats(now).window.failures, 3);
        for _ in 0..4 {
            assert_eq!(call(&mut b, ok(), now), None);
        }
        assert_eq!(
            b.stats(now).window.failures,
            3,
            "the oldest calls went first"
        );
        for _ in 0..3 {
            assert_eq!(call(&mut b, ok(), now), None);
        }
        let stats = b.stats(now).window;
        assert_eq!(
            (stats.calls, stats.failures),
            (10, 0),
            "old failures fell out"
        );
        // Now 4 failures: 4 of 10 stays under 50%; the fifth reaches it.
        for _ in 0..4 {
            assert_eq!(call(&mut b, fail(), now), None);
        }
        assert!(call(&mut b, fail(), now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_slides() {
        let mut b = breaker(&BreakerConfig {
            window: WindowKind::Time { seconds: 10 },
            ..config()
        });
        for _ in 0..3 {
            assert_eq!(call(&mut b, fail(), Instant::now()), None);
        }
        assert_eq!(b.stats(Instant::now()).window.calls, 3);
        // Ten seconds later those failures have aged out: the fourth failure is alone.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.stats(Instant::now()).window.calls, 0);
        assert_eq!(call(&mut b, fail(), Instant::now()), None);
        assert_eq!(b.stats(Instant::now()).window.calls, 1);
        // Within the window they add up.
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..2 {
            assert_eq!(call(&mut b, fail(), Instant::now()), None);
        }
        assert_eq!(b.stats(Instant::now()).window.calls, 3);
        tokio::time::advance(Duration::from_secs(4)).await;
        let t = call(&mut b, fail(), Instant::now()).expect("opens");
        assert!(t.reason.contains("over 4 calls"), "{}", t.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn open_turns_half_open_after_the_wait() {
        let mut b = opened(Instant::now());
        tokio::time::advance(999 * MS).await;
        assert!(b.tick(Instant::now()).is_none());
        assert!(b.try_acquire(Instant::now()).is_none());
        assert!(!b.admits(Instant::now()));
        tokio::time::advance(MS).await;
        assert!(b.admits(Instant::now()));
        let mut permit = b.try_acquire(Instant::now()).expect("probe");
        assert!(permit.is_probe());
        let t = permit
            .take_transition()
            .expect("transition rides on the permit");
        assert_eq!((t.from, t.to), (BreakerState::Open, BreakerState::HalfOpen));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.state().as_str(), "half_open");
        b.release(permit);
    }

    #[test]
    fn tick_moves_open_to_half_open_without_traffic() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t = b.tick(t0 + 1000 * MS).expect("moves");
        assert_eq!(t.to, BreakerState::HalfOpen);
        let mut permit = b.try_acquire(t0 + 1000 * MS).expect("probe");
        assert!(permit.take_transition().is_none(), "reported once");
        b.release(permit);
    }

    #[test]
    fn half_open_hands_out_limited_permits() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let later = t0 + 1000 * MS;
        let p1 = b.try_acquire(later).expect("first probe");
        assert!(b.admits(later));
        let p2 = b.try_acquire(later).expect("second probe");
        assert!(!b.admits(later));
        assert!(b.try_acquire(later).is_none(), "only two probes");
        assert!(b.try_acquire(later + Duration::from_secs(60)).is_none());
        b.release(p1);
        b.release(p2);
    }

    #[test]
    fn half_open_closes_when_probes_succeed() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let later = t0 + 1000 * MS;
        let p1 = b.try_acquire(later).expect("probe");
        let p2 = b.try_acquire(later).expect("probe");
        assert_eq!(b.record(p1, ok(), later), None, "waits for every probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let t = b.record(p2, ok(), later).expect("closes");
        assert_eq!(
            (t.from, t.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(
            t.reason,
            "half-open probes succeeded: 0 of 2 failed, 0 slow"
        );
        assert_eq!(b.state().as_str(), "closed");
        assert_eq!(b.stats(later).window, Tally::default(), "fresh window");
        assert_eq!(b.stats(later).consecutive_opens, 0);
        // The wait starts over at its base after a close.
        for _ in 0..4 {
            let _ = call(&mut b, fail(), later);
        }
        assert_eq!(b.open_until(), Some(later + 1000 * MS));
    }

    #[test]
    fn half_open_reopens_with_doubled_wait_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let mut now = t0;
        let mut waits = vec![];
        for _ in 0..4 {
            let until = b.open_until().expect("open");
            waits.push((until - now).as_millis());
            now = until;
            let p1 = b.try_acquire(now).expect("probe");
            let p2 = b.try_acquire(now).expect("probe");
            assert_eq!(b.record(p1, ok(), now), None);
            let t = b.record(p2, fail(), now).expect("reopens");
            assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
            assert!(
                t.reason
                    .starts_with("half-open probes failed: failure rate 50% >= 50% over 2 calls"),
                "{}",
                t.reason
            );
        }
        waits.push((b.open_until().expect("open") - now).as_millis());
        assert_eq!(waits, [1000, 2000, 3000, 3000, 3000]);
        assert_eq!(b.stats(now).consecutive_opens, 5);
    }

    #[test]
    fn released_permit_returns_its_probe_slot() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let later = t0 + 1000 * MS;
        let p1 = b.try_acquire(later).expect("probe");
        let p2 = b.try_acquire(later).expect("probe");
        assert!(b.try_acquire(later).is_none());
        b.release(p1); // the caller hung up
        let p3 = b.try_acquire(later).expect("slot came back");
        assert!(b.try_acquire(later).is_none());
        assert_eq!(b.record(p2, ok(), later), None);
        assert!(b.record(p3, ok(), later).is_some(), "two results decide");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn dropped_guard_returns_its_probe_slot() {
        let t0 = Instant::now();
        let shared = Arc::new(SharedBreaker(Mutex::new(opened(t0))));
        let later = t0 + 1000 * MS;
        let mut g1 = shared.acquire_guard(later).expect("probe");
        assert!(g1.is_probe());
        assert_eq!(
            g1.take_transition().map(|t| t.to),
            Some(BreakerState::HalfOpen)
        );
        let g2 = shared.acquire_guard(later).expect("probe");
        assert!(shared.acquire_guard(later).is_none());
        drop(g1); // the call future was dropped
        assert!(shared.admits(later));
        let g3 = shared.acquire_guard(later).expect("slot came back");
        assert_eq!(g2.record(ok(), later), None);
        assert!(g3.record(ok(), later).is_some());
        assert_eq!(shared.state(), BreakerState::Closed);
    }

    #[test]
    fn stale_permits_are_ignored() {
        let t0 = Instant::now();
        let mut b = breaker(&config());
        let early = b.try_acquire(t0).expect("closed");
        for _ in 0..4 {
            let _ = call(&mut b, fail(), t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.record(early, fail(), t0), None, "admitted before opening");
        let later = t0 + 1000 * MS;
        let p1 = b.try_acquire(later).expect("probe");
        assert!(b.try_acquire(later).is_some());
        b.force_open();
        b.reset();
        assert_eq!(b.record(p1, fail(), later), None, "from another epoch");
        assert_eq!(b.stats(later).window.calls, 0);
    }

    #[test]
    fn failure_codes_decide_what_counts() {
        let now = Instant::now();
        let mut b = breaker(&config());
        for code in [Code::InvalidArgument, Code::NotFound, Code::Cancelled] {
            for _ in 0..4 {
                let out = Outcome { code, elapsed: MS };
                assert_eq!(call(&mut b, out, now), None, "{code:?} is not a failure");
            }
        }
        assert_eq!(b.stats(now).window.failures, 0);

        let mut b = breaker(&BreakerConfig {
            failure_codes: CodeSet::of(&[Code::InvalidArgument]),
            ..config()
        });
        for _ in 0..4 {
            let _ = call(&mut b, fail(), now);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "UNAVAILABLE no longer counts"
        );
        let out = Outcome {
            code: Code::InvalidArgument,
            elapsed: MS,
        };
        for _ in 0..3 {
            assert_eq!(call(&mut b, out, now), None);
        }
        assert!(call(&mut b, out, now).is_some());
    }

    #[test]
    fn force_open_and_reset() {
        let now = Instant::now();
        let mut b = breaker(&config());
        let t = b.force_open().expect("forced");
        assert_eq!(
            (t.from, t.to),
            (BreakerState::Closed, BreakerState::ForcedOpen)
        );
        assert!(b.force_open().is_none());
        assert!(!b.admits(now + Duration::from_secs(3600)));
        assert!(b.try_acquire(now + Duration::from_secs(3600)).is_none());
        let t = b.reset().expect("reset");
        assert_eq!(t.to, BreakerState::Closed);
        assert!(b.reset().is_none());
        assert!(b.admits(now));
    }

    #[test]
    fn reconfigure_keeps_state_and_validates() {
        let now = Instant::now();
        let mut b = opened(now);
        assert!(b
            .reconfigure(&BreakerConfig {
                half_open_permits: 0,
                ..config()
            })
            .is_err());
        b.reconfigure(&BreakerConfig {
            half_open_permits: 1,
            ..config()
        })
        .expect("valid");
        assert_eq!(b.state(), BreakerState::Open);
        let later = now + 1000 * MS;
        let p = b.try_acquire(later).expect("probe");
        assert!(b.try_acquire(later).is_none(), "one probe now");
        assert!(b.record(p, ok(), later).is_some());
    }
}
