//! What each backend last said about its load, kept per endpoint with its age: the
//! state the `gpu_aware` policy reads, and the reduced [`Load`] that every source
//! (ORCA per call and out of band, Prometheus scrapes; decoded in `load_report`) turns
//! into. Values are kept in atomics (f64 bits), so the picker reads them without a lock.
//! Sits below `endpoint`, which holds one [`LoadState`].

use crate::capacity::PerCallLearning;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Where a report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// Nothing received yet.
    None = 0,
    /// `endpoint-load-metrics-bin` on a response.
    OrcaPerCall = 1,
    /// `endpoint-load-metrics` (TEXT or JSON) on a response.
    OrcaText = 2,
    /// `OpenRcaService/StreamCoreMetrics`.
    OrcaOob = 3,
    /// A Prometheus scrape.
    Prometheus = 4,
}

impl Source {
    /// Name for the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::OrcaPerCall => "orca_per_call",
            Source::OrcaText => "orca_text",
            Source::OrcaOob => "orca_oob",
            Source::Prometheus => "prometheus",
        }
    }

    fn from_u8(v: u8) -> Source {
        match v {
            1 => Source::OrcaPerCall,
            2 => Source::OrcaText,
            3 => Source::OrcaOob,
            4 => Source::Prometheus,
            _ => Source::None,
        }
    }
}

/// A backend's last report, stored lock-free.
#[derive(Debug)]
pub struct LoadState {
    utilization: AtomicU64,
    queue_depth: AtomicU64,
    /// Reported running calls (f64 bits; NaN = the report did not say).
    running: AtomicU64,
    /// Nanoseconds since [`epoch`] when the last report arrived; 0 = never.
    at_nanos: AtomicU64,
    source: AtomicU8,
    /// This gateway's calls running on the backend when the last report was taken (0
    /// when the report came without that count).
    own_at_report: AtomicU64,
    /// How much one of this gateway's calls adds to the reported utilization, learned
    /// from reports (f64 bits; 0 = not learned yet), as `fit` last answered.
    per_call: AtomicU64,
    /// The learning behind `per_call` (see [`crate::capacity`]).
    fit: Mutex<PerCallLearning>,
    /// This gateway's share of the calls the backend runs or queues, as `fit` last
    /// answered (f64 bits; 0 = not known).
    own_share: AtomicU64,
}

impl Default for LoadState {
    fn default() -> Self {
        LoadState {
            utilization: AtomicU64::new(0f64.to_bits()),
            queue_depth: AtomicU64::new(0f64.to_bits()),
            running: AtomicU64::new(f64::NAN.to_bits()),
            at_nanos: AtomicU64::new(0),
            source: AtomicU8::new(Source::None as u8),
            own_at_report: AtomicU64::new(0),
            per_call: AtomicU64::new(0f64.to_bits()),
            fit: Mutex::new(PerCallLearning::default()),
            own_share: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// One reading, as the picker sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// 0..1 (values above 1 are kept; the policy clamps).
    pub utilization: f64,
    /// Requests waiting at the backend.
    pub queue_depth: f64,
    /// How old the reading is.
    pub age: Duration,
    /// Where it came from.
    pub source: Source,
    /// This gateway's calls that were running on the backend when it was taken, as far
    /// as the gateway knows (0 when unknown): they are in `utilization` and `queue_depth`.
    pub own_calls: u64,
    /// Calls the backend said it was running, every client's (None when it did not say).
    pub running: Option<f64>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1))
}

impl LoadState {
    /// Stores a reading taken now, without learning from it (see
    /// [`LoadState::store_observed`]).
    pub fn store(&self, utilization: f64, queue_depth: f64, source: Source, now: Instant) {
        let load = Load {
            utilization,
            queue_depth,
            running: None,
        };
        self.store_observed(load, source, now, None);
    }

    /// Stores a reading taken now, when `own_in_flight` of this gateway's calls were
    /// running on the backend, and learns from it how much one call adds to the
    /// utilization ([`crate::capacity::PerCallLearning`]). Concurrent readings never
    /// wait for each other: one that finds the fit in use is stored without teaching it.
    pub fn store_observed(
        &self,
        load: Load,
        source: Source,
        now: Instant,
        own_in_flight: Option<u64>,
    ) {
        let Load {
            utilization,
            queue_depth,
            running,
        } = load;
        if own_in_flight.is_some() || running.is_some() {
            if let Ok(mut fit) = self.fit.try_lock() {
                fit.observe(utilization, queue_depth, running, own_in_flight);
                let learned = fit.per_call().unwrap_or(0.0);
                self.per_call.store(learned.to_bits(), Ordering::Relaxed);
                let share = fit.own_share().unwrap_or(0.0);
                self.own_share.store(share.to_bits(), Ordering::Relaxed);
            }
        }
        self.own_at_report
            .store(own_in_flight.unwrap_or(0), Ordering::Relaxed);
        self.utilization
            .store(utilization.to_bits(), Ordering::Relaxed);
        self.queue_depth
            .store(queue_depth.to_bits(), Ordering::Relaxed);
        self.running
            .store(running.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
        self.source.store(source as u8, Ordering::Relaxed);
        let nanos = now.saturating_duration_since(epoch()).as_nanos() as u64;
        self.at_nanos.store(nanos.max(1), Ordering::Release);
    }

    /// This gateway's share (0..1) of the calls the backend runs or queues, once
    /// reports with a running count have told it (see
    /// [`PerCallLearning::own_share`]). Lock-free: one atomic read.
    pub fn own_share(&self) -> Option<f64> {
        let share = f64::from_bits(self.own_share.load(Ordering::Relaxed));
        (share > 0.0).then_some(share)
    }

    /// The last reading, if any.
    pub fn read(&self, now: Instant) -> Option<Reading> {
        let at = self.at_nanos.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let at = epoch() + Duration::from_nanos(at);
        Some(Reading {
            utilization: f64::from_bits(self.utilization.load(Ordering::Relaxed)),
            queue_depth: f64::from_bits(self.queue_depth.load(Ordering::Relaxed)),
            age: now.saturating_duration_since(at),
            source: Source::from_u8(self.source.load(Ordering::Relaxed)),
            own_calls: self.own_at_report.load(Ordering::Relaxed),
            running: Some(f64::from_bits(self.running.load(Ordering::Relaxed)))
                .filter(|r| !r.is_nan()),
        })
    }

    /// The last reading if it is younger than `stale_after`.
    pub fn fresh(&self, now: Instant, stale_after: Duration) -> Option<Reading> {
        self.read(now).filter(|r| r.age <= stale_after)
    }

    /// Utilization one call adds, once learned.
    pub fn per_call_utilization(&self) -> Option<f64> {
        Some(f64::from_bits(self.per_call.load(Ordering::Relaxed))).filter(|c| *c > 0.0)
    }
}

/// A report reduced to the numbers the policy uses.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Maximum of the configured utilization fields present.
    pub utilization: f64,
    /// The queue-depth metric, 0 when absent.
    pub queue_depth: f64,
    /// The running-calls metric, when the report has it.
    pub running: Option<f64>,
}
