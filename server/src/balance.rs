//! The balancer: picks one endpoint for a call among a model's candidates. Sits after
//! admission and retry in the request path, before the endpoint call.
//!
//! A candidate is an endpoint that serves the model and that [`Endpoint::is_eligible`]
//! admits (ready, not draining; later also not ejected and breaker closed). Eligibility
//! is read at pick time, so a state change acts on the very next call without rebuilding
//! any list.
//!
//! Policies:
//! - `round_robin`: each eligible candidate in turn.
//! - `weighted`: at random in proportion to static weight (× slow-start factor); O(n).
//! - `least_request`: power of two choices by default — two random candidates, the
//!   lower score wins, score = (in_flight + 1)^active_request_bias / weight. That is
//!   O(1) in the pool size and avoids the herd a full scan causes when several gateways
//!   see the same "least loaded" backend. `choice_count` 0 (or ≥ pool) scans all.
//! - `gpu_aware` (default): the same sampling, with a score that adds what the backend
//!   itself reports (see [`gpu_score`] and docs/ARCHITECTURE.md for the reasoning).
//!
//! Only when every sample is ineligible does a pick fall back to a scan.

use crate::config::{BalancerConfig, PolicyKind};
use crate::endpoint::Endpoint;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The numbers a policy needs besides its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyParams {
    /// Candidates sampled (0 = all).
    pub choice_count: usize,
    /// least_request exponent on in-flight counts.
    pub active_request_bias: f64,
    /// gpu_aware: weight of one reported queued request.
    pub queue_weight: f64,
    /// gpu_aware: utilization clamp.
    pub max_utilization: f64,
    /// Ramp-up window of backends that join a serving pool.
    pub slow_start: Duration,
    /// Reports older than this are ignored.
    pub stale_after: Duration,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams::new(&BalancerConfig::default(), Duration::from_secs(3))
    }
}

impl PolicyParams {
    /// From the `[balancer]` section and the report staleness bound.
    pub fn new(cfg: &BalancerConfig, stale_after: Duration) -> Self {
        PolicyParams {
            choice_count: cfg.choice_count,
            active_request_bias: cfg.active_request_bias,
            queue_weight: cfg.queue_weight,
            max_utilization: cfg.max_utilization,
            slow_start: Duration::from_millis(cfg.slow_start_ms),
            stale_after,
        }
    }
}

/// A model's balancing policy, with its state.
#[derive(Debug)]
pub struct Policy {
    kind: PolicyKind,
    params: PolicyParams,
    next: AtomicUsize,
}

impl Policy {
    /// A policy of `kind`.
    pub fn new(kind: PolicyKind, params: PolicyParams) -> Self {
        Policy {
            kind,
            params,
            next: AtomicUsize::new(0),
        }
    }

    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Picks an eligible endpoint from `endpoints` (eligible: ready and not draining),
    /// or None when none is eligible.
    pub fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        rng: &mut fastrand::Rng,
    ) -> Option<Arc<Endpoint>> {
        self.pick_with(endpoints, &|e| e.is_eligible(), rng)
    }

    /// Picks among the endpoints for which `eligible` holds. The request path passes a
    /// test that covers health, drain, ejection, circuits, per-model readiness and the
    /// backends a retry must avoid.
    pub fn pick_with(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
        rng: &mut fastrand::Rng,
    ) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let p = &self.params;
        match self.kind {
            PolicyKind::RoundRobin => self.round_robin(endpoints, eligible),
            PolicyKind::Weighted => weighted(endpoints, eligible, now, p, rng),
            PolicyKind::LeastRequest => {
                sampled(endpoints, eligible, p.choice_count, rng, |e| Score {
                    base: least_request_score(e, now, p),
                    latency: None,
                })
            }
            PolicyKind::GpuAware => sampled(endpoints, eligible, p.choice_count, rng, |e| Score {
                base: gpu_score(e, now, p),
                latency: e.latency_ewma_ms(),
            }),
        }
        .cloned()
    }

    /// [`Policy::pick_with`] with the calling thread's random generator.
    pub fn pick_now(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        THREAD_RNG.with(|rng| self.pick_with(endpoints, eligible, &mut rng.borrow_mut()))
    }

    /// The score this policy gives `e` now (lower is better), for traces and the admin API.
    pub fn score(&self, e: &Endpoint) -> f64 {
        let now = Instant::now();
        match self.kind {
            PolicyKind::GpuAware => gpu_score(e, now, &self.params),
            _ => least_request_score(e, now, &self.params),
        }
    }

    fn round_robin<'a>(
        &self,
        endpoints: &'a [Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&'a Arc<Endpoint>> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        // Each skip takes the next turn from the shared counter, so the share of an
        // ineligible backend spreads over all the others instead of going to its
        // neighbour in the list.
        (0..n)
            .map(|_| &endpoints[self.next.fetch_add(1, Ordering::Relaxed) % n])
            .find(|e| eligible(e))
    }
}

thread_local! {
    static THREAD_RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::new());
}

/// least_request's score (lower wins): (in_flight + 1)^bias / (weight × slow start).
pub fn least_request_score(e: &Endpoint, now: Instant, p: &PolicyParams) -> f64 {
    let load = (e.in_flight() as f64 + 1.0).powf(p.active_request_bias);
    load / (f64::from(e.weight()) * e.slow_start_factor(now, p.slow_start))
}

/// gpu_aware's score (lower wins):
///
/// ```text
/// score = (in_flight + 1 + queue_weight × reported_queue) / (1 − min(utilization, max_utilization))
///         / (weight × slow_start_factor)
/// ```
///
/// The numerator is the work the call would wait behind; the denominator the share of
/// the accelerator still free, so a GPU that reports 50% busy with work the gateway
/// cannot see counts twice as loaded, and one at 95% twenty times. Reported queue depth
/// covers calls from every gateway replica, which a replica's own in-flight count
/// cannot. Without a fresh report (older than `load.stale_after_ms`, or none), both
/// reported terms drop out and the score is least_request's.
pub fn gpu_score(e: &Endpoint, now: Instant, p: &PolicyParams) -> f64 {
    let (utilization, queue) = match e.load().fresh(now, p.stale_after) {
        Some(r) => (
            r.utilization.clamp(0.0, p.max_utilization),
            r.queue_depth.max(0.0) * p.queue_weight,
        ),
        None => (0.0, 0.0),
    };
    let work = e.in_flight() as f64 + 1.0 + queue;
    work / (1.0 - utilization) / (f64::from(e.weight()) * e.slow_start_factor(now, p.slow_start))
}

/// Samples `choice_count` distinct candidates (O(choice_count), not O(n)) and keeps the
/// eligible one with the lowest score; scans when sampling finds none eligible.
/// A candidate's score, with the backend's recent latency when it is known. Two
/// candidates whose latencies are both known are compared by score × latency (the
/// expected time to be served: work ahead of the call times how fast the backend
/// works); otherwise by score alone, so a backend without samples is neither favoured
/// nor punished.
#[derive(Debug, Clone, Copy)]
struct Score {
    base: f64,
    latency: Option<f64>,
}

impl Score {
    fn better_than(&self, other: &Score) -> bool {
        match (self.latency, other.latency) {
            (Some(a), Some(b)) => self.base * a < other.base * b,
            _ => self.base < other.base,
        }
    }
}

fn sampled<'a>(
    endpoints: &'a [Arc<Endpoint>],
    eligible: &dyn Fn(&Endpoint) -> bool,
    choice_count: usize,
    rng: &mut fastrand::Rng,
    score: impl Fn(&Endpoint) -> Score,
) -> Option<&'a Arc<Endpoint>> {
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    if choice_count == 0 || choice_count >= n {
        return scan_lowest(endpoints, eligible, rng, &score);
    }
    let mut best: Option<(&Arc<Endpoint>, Score)> = None;
    let mut picked = [usize::MAX; 8];
    let draws = choice_count.min(picked.len());
    for slot in 0..draws {
        let mut i = rng.usize(..n);
        while picked[..slot].contains(&i) {
            i = (i + 1) % n;
        }
        picked[slot] = i;
        let candidate = &endpoints[i];
        if eligible(candidate) {
            let s = score(candidate);
            if best.is_none_or(|(_, b)| s.better_than(&b)) {
                best = Some((candidate, s));
            }
        }
    }
    best.map(|(e, _)| e)
        .or_else(|| scan_lowest(endpoints, eligible, rng, &score))
}

fn scan_lowest<'a>(
    endpoints: &'a [Arc<Endpoint>],
    eligible: &dyn Fn(&Endpoint) -> bool,
    rng: &mut fastrand::Rng,
    score: &impl Fn(&Endpoint) -> Score,
) -> Option<&'a Arc<Endpoint>> {
    // Start at a random offset so ties do not always go to the first endpoint.
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    let offset = rng.usize(..n);
    (0..n)
        .map(|i| &endpoints[(offset + i) % n])
        .filter(|e| eligible(e))
        .map(|e| (e, score(e)))
        .fold(
            None,
            |best: Option<(&Arc<Endpoint>, Score)>, c| match best {
                Some(b) if !c.1.better_than(&b.1) => Some(b),
                _ => Some(c),
            },
        )
        .map(|(e, _)| e)
}

fn weighted<'a>(
    endpoints: &'a [Arc<Endpoint>],
    eligible: &dyn Fn(&Endpoint) -> bool,
    now: Instant,
    p: &PolicyParams,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Endpoint>> {
    let weight = |e: &Endpoint| f64::from(e.weight()) * e.slow_start_factor(now, p.slow_start);
    let total: f64 = endpoints
        .iter()
        .filter(|e| eligible(e))
        .map(|e| weight(e))
        .sum();
    if total <= 0.0 {
        return None;
    }
    let mut target = rng.f64() * total;
    let mut last = None;
    for e in endpoints.iter().filter(|e| eligible(e)) {
        last = Some(e);
        target -= weight(e);
        if target < 0.0 {
            return Some(e);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Health;

    fn pool(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let e = Endpoint::new(&format!("127.0.0.1:{}", 9000 + i), "test", vec![], 1)
                    .expect("endpoint");
                e.set_health(Health::Ready);
                e
            })
            .collect()
    }

    #[tokio::test]
    async fn least_request_prefers_the_idle_endpoint() {
        let endpoints = pool(2);
        let _busy = (0..5).map(|_| endpoints[0].begin()).collect::<Vec<_>>();
        let policy = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20 {
            let e = policy.pick(&endpoints, &mut rng).expect("pick");
            assert_eq!(e.address(), endpoints[1].address());
        }
    }

    #[tokio::test]
    async fn p2c_spreads_ties_and_skips_ineligible() {
        let endpoints = pool(4);
        endpoints[2].set_health(Health::NotReady);
        let policy = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(42);
        let mut counts = [0usize; 4];
        for _ in 0..400 {
            let e = policy.pick(&endpoints, &mut rng).expect("pick");
            let i = endpoints
                .iter()
                .position(|x| Arc::ptr_eq(x, &e))
                .expect("member");
            counts[i] += 1;
        }
        assert_eq!(counts[2], 0, "not-ready endpoint never picked");
        assert!(
            counts.iter().enumerate().all(|(i, c)| i == 2 || *c > 50),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn round_robin_cycles_and_none_when_nothing_eligible() {
        let endpoints = pool(3);
        let policy = Policy::new(PolicyKind::RoundRobin, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(1);
        let picks: Vec<_> = (0..6)
            .map(|_| {
                policy
                    .pick(&endpoints, &mut rng)
                    .expect("pick")
                    .address()
                    .to_owned()
            })
            .collect();
        assert_eq!(picks[0], picks[3]);
        assert_ne!(picks[0], picks[1]);
        for e in &endpoints {
            e.set_draining(true);
        }
        assert!(policy.pick(&endpoints, &mut rng).is_none());
        assert!(
            Policy::new(PolicyKind::LeastRequest, PolicyParams::default())
                .pick(&[], &mut rng)
                .is_none()
        );
    }

    fn share(policy: &Policy, endpoints: &[Arc<Endpoint>], seed: u64, picks: usize) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0; endpoints.len()];
        for _ in 0..picks {
            let e = policy.pick(endpoints, &mut rng).expect("pick");
            counts[endpoints
                .iter()
                .position(|x| Arc::ptr_eq(x, &e))
                .expect("member")] += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_avoids_a_backend_that_reports_high_utilization() {
        use crate::load_report::Source;
        let endpoints = pool(3);
        let now = Instant::now();
        endpoints[0]
            .load()
            .store(0.9, 0.0, Source::OrcaPerCall, now);
        endpoints[1]
            .load()
            .store(0.1, 0.0, Source::OrcaPerCall, now);
        endpoints[2]
            .load()
            .store(0.1, 0.0, Source::OrcaPerCall, now);
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let counts = share(&policy, &endpoints, 11, 300);
        // With two choices the busy backend only wins when sampled against itself: never.
        assert_eq!(counts[0], 0, "{counts:?}");
        // Least request ignores the reports and spreads evenly.
        let lr = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let counts = share(&lr, &endpoints, 11, 300);
        assert!(counts.iter().all(|c| *c > 60), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_counts_reported_queue_and_falls_back_when_stale() {
        use crate::load_report::Source;
        let endpoints = pool(2);
        let now = Instant::now();
        endpoints[0].load().store(0.5, 8.0, Source::OrcaOob, now);
        endpoints[1].load().store(0.5, 0.0, Source::OrcaOob, now);
        // Local in-flight says the opposite: 3 calls on endpoint 1.
        let _local: Vec<_> = (0..3).map(|_| endpoints[1].begin()).collect();
        let p = PolicyParams::default();
        assert!(gpu_score(&endpoints[0], now, &p) > gpu_score(&endpoints[1], now, &p));
        tokio::time::advance(p.stale_after + Duration::from_millis(1)).await;
        let later = Instant::now();
        // Stale: both reports drop out and the score is least_request's.
        assert_eq!(
            gpu_score(&endpoints[0], later, &p),
            least_request_score(&endpoints[0], later, &p)
        );
        assert!(gpu_score(&endpoints[0], later, &p) < gpu_score(&endpoints[1], later, &p));
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_weighs_work_by_how_fast_each_backend_serves() {
        let endpoints = pool(2);
        // Same load; endpoint 0 takes 60 ms a call, endpoint 1 takes 20 ms.
        endpoints[0].observe_latency(Duration::from_millis(60));
        endpoints[1].observe_latency(Duration::from_millis(20));
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(4);
        let mut held = Vec::new();
        for _ in 0..4 {
            let e = policy.pick(&endpoints, &mut rng).expect("pick");
            held.push(e.begin());
        }
        // (in_flight + 1) x latency: 1 x 60 ties with 3 x 20, so the fast one takes the
        // first three calls and the slow one only the fourth.
        assert_eq!((endpoints[0].in_flight(), endpoints[1].in_flight()), (1, 3));
        // Least request ignores latency.
        drop(held);
        let lr = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let held: Vec<_> = (0..4)
            .map(|_| lr.pick(&endpoints, &mut rng).expect("pick").begin())
            .collect();
        assert_eq!((endpoints[0].in_flight(), endpoints[1].in_flight()), (2, 2));
        drop(held);
        // A faster sample lowers the estimate by a fifth of the gap; a slower one counts at once.
        endpoints[0].observe_latency(Duration::from_millis(10));
        assert_eq!(endpoints[0].latency_ewma_ms(), Some(50.0));
        endpoints[0].observe_latency(Duration::from_millis(80));
        assert_eq!(endpoints[0].latency_ewma_ms(), Some(80.0));
    }

    #[tokio::test(start_paused = true)]
    async fn weights_shape_weighted_and_least_request() {
        let endpoints: Vec<_> = [1u32, 3]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let e = Endpoint::new(&format!("127.0.0.1:{}", 9100 + i), "test", vec![], *w)
                    .expect("endpoint");
                e.set_health(Health::Ready);
                e
            })
            .collect();
        let weighted = Policy::new(PolicyKind::Weighted, PolicyParams::default());
        let counts = share(&weighted, &endpoints, 5, 4000);
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((2.5..3.5).contains(&ratio), "{counts:?}");
        // least_request with bias 1: endpoint 1 (weight 3) is preferred until it has
        // about three times the in-flight calls of endpoint 0.
        let lr = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(9);
        let mut held = Vec::new();
        for _ in 0..8 {
            let e = lr.pick(&endpoints, &mut rng).expect("pick");
            held.push(e.begin());
        }
        assert_eq!((endpoints[0].in_flight(), endpoints[1].in_flight()), (2, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_new_backend() {
        let old = pool(1).remove(0);
        let mut cfg = crate::config::BackendConfig::new("127.0.0.1:9200");
        cfg.weight = 1;
        let new =
            Endpoint::from_config(&cfg, "admin", true, &Default::default()).expect("endpoint");
        new.set_health(Health::Ready);
        let endpoints = vec![old, new];
        let params = PolicyParams::default();
        let policy = Policy::new(PolicyKind::Weighted, params.clone());
        let early = share(&policy, &endpoints, 3, 2000);
        assert!(
            early[1] < early[0] / 5,
            "new backend starts at a tenth: {early:?}"
        );
        tokio::time::advance(params.slow_start).await;
        let later = share(&policy, &endpoints, 3, 2000);
        assert!(
            later[1] > later[0] * 4 / 5,
            "full share after the window: {later:?}"
        );
    }

    #[tokio::test]
    async fn one_candidate_is_always_picked() {
        let endpoints = pool(1);
        let mut rng = fastrand::Rng::with_seed(3);
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::Weighted,
            PolicyKind::LeastRequest,
            PolicyKind::GpuAware,
        ] {
            let policy = Policy::new(kind, PolicyParams::default());
            assert!(policy.pick(&endpoints, &mut rng).is_some(), "{kind:?}");
            assert!(
                policy.pick(&[], &mut rng).is_none(),
                "{kind:?}: no candidate"
            );
        }
    }
}
