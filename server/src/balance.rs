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
//!   itself reports: the expected latency of a new call (see [`expected_latency_ms`]
//!   and docs/ARCHITECTURE.md for the reasoning). When the better of the two draws
//!   would take its last free slot or queue, it draws as many again (still O(1)).
//! - `prefix_affinity`: calls whose prompt starts alike (the first `prefix.bytes` of
//!   the BYTES input `prefix.input`, peeked by [`crate::wire::peek_bytes_input_prefix`])
//!   go to the same backend, so its KV cache serves them: consistent hashing with
//!   bounded loads ([`crate::affinity`]: the ring, the bound, where it comes from and
//!   why ε = 0.25), over this gateway's in-flight counts. The call goes to gpu_aware
//!   instead when it carries no prefix, when the backend the walk stops at cannot take
//!   it (unhealthy, ejected, draining, circuit open, or already tried by this call) or
//!   when every backend under the bound is above `prefix.utilization_threshold` once
//!   the call lands (gpu_aware's projected load: its report corrected for this
//!   gateway's calls since; a backend above it is passed over like one over the
//!   bound, so a spilled prefix still meets the same next cache).
//!
//! Only when every sample is ineligible does a pick fall back to a scan.

use crate::affinity::{self, Ring};
use crate::config::{BalancerConfig, PolicyKind, PrefixConfig};
use crate::endpoint::Endpoint;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
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
    /// gpu_aware: weight of projected load among backends with room.
    pub spread: f64,
    /// Ramp-up window of backends that join a serving pool.
    pub slow_start: Duration,
    /// Reports older than this are ignored.
    pub stale_after: Duration,
    /// prefix_affinity: the prompt input, key length, bound and threshold (per model).
    pub prefix: PrefixConfig,
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
            spread: cfg.spread,
            slow_start: Duration::from_millis(cfg.slow_start_ms),
            stale_after,
            prefix: PrefixConfig::default(),
        }
    }
}

/// A model's balancing policy, with its state.
#[derive(Debug)]
pub struct Policy {
    kind: PolicyKind,
    params: PolicyParams,
    next: AtomicUsize,
    /// gpu_aware: a running average of the per-call shares of the candidates that have
    /// one (f64 bits; 0 = none yet), lent to candidates that do not have one yet.
    typical_per_call: AtomicU64,
    /// prefix_affinity: the ring over the route's backends, rebuilt when they change.
    ring: RwLock<Option<Arc<Ring>>>,
}

impl Policy {
    /// A policy of `kind`.
    pub fn new(kind: PolicyKind, params: PolicyParams) -> Self {
        Policy {
            kind,
            params,
            next: AtomicUsize::new(0),
            typical_per_call: AtomicU64::new(0f64.to_bits()),
            ring: RwLock::new(None),
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
        self.pick_keyed(endpoints, eligible, None, rng)
    }

    /// [`Policy::pick_with`] for a call with an affinity key ([`Policy::affinity_key`]);
    /// only prefix_affinity reads it.
    pub fn pick_keyed(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
        key: Option<u64>,
        rng: &mut fastrand::Rng,
    ) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let p = &self.params;
        if self.kind == PolicyKind::PrefixAffinity {
            if let Some(e) = key.and_then(|k| self.affine(endpoints, eligible, k, now)) {
                return Some(e);
            }
        }
        match self.kind {
            PolicyKind::RoundRobin => self.round_robin(endpoints, eligible),
            PolicyKind::Weighted => weighted(endpoints, eligible, now, p, rng),
            PolicyKind::LeastRequest => {
                sampled(endpoints, eligible, p.choice_count, rng, |e| Score {
                    least_request: least_request_score(e, now, p),
                    expected: None,
                })
            }
            PolicyKind::GpuAware | PolicyKind::PrefixAffinity => {
                sampled(endpoints, eligible, p.choice_count, rng, |e| Score {
                    least_request: least_request_score(e, now, p),
                    expected: expected_cost(e, now, p, self.per_call(e)),
                })
            }
        }
        .cloned()
    }

    /// prefix_affinity's key of a request (`payload`: the `ModelInferRequest` bytes):
    /// the hash of the first `prefix.bytes` of its `prefix.input`; None for other
    /// policies and for requests without that input.
    pub fn affinity_key(&self, payload: &[u8]) -> Option<u64> {
        if self.kind != PolicyKind::PrefixAffinity {
            return None;
        }
        let prefix = &self.params.prefix;
        crate::wire::peek_bytes_input_prefix(payload, &prefix.input, prefix.bytes)
            .map(affinity::key_hash)
    }

    /// The bounded-load choice for `key` among `endpoints`, or None when gpu_aware
    /// should decide (see the module doc). Loads are this gateway's in-flight calls.
    fn affine(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
        key: u64,
        now: Instant,
    ) -> Option<Arc<Endpoint>> {
        let ring = self.ring_over(endpoints)?;
        let load = |e: &Endpoint| usize::try_from(e.in_flight()).unwrap_or(usize::MAX);
        let total: usize = endpoints.iter().map(|e| load(e)).sum();
        let prefix = &self.params.prefix;
        let under = affinity::under_bound(&ring, key, prefix.epsilon, total, |i| {
            endpoints.get(i).map_or(usize::MAX, |e| load(e))
        });
        for i in under {
            let e = endpoints.get(i)?;
            if !eligible(e) {
                return None;
            }
            if self.occupancy(e, now) <= prefix.utilization_threshold {
                return Some(Arc::clone(e));
            }
            // Full by its own report: the next backend under the bound on the ring, so
            // the prefix still meets one warm cache rather than a random one.
        }
        None
    }

    /// How full `e` would be with this call (0 without a fresh report): gpu_aware's
    /// projected load when the per-call share is known, else the reported utilization.
    fn occupancy(&self, e: &Endpoint, now: Instant) -> f64 {
        let p = &self.params;
        let Some(reading) = e.load().fresh(now, p.stale_after) else {
            return 0.0;
        };
        match self.per_call(e) {
            Some(per_call) => projected_load(e, &reading, p, per_call),
            None => reading.utilization,
        }
    }

    /// The ring over `endpoints` (by address, in their order): the cached one while
    /// they stay the same, else a new one.
    fn ring_over(&self, endpoints: &[Arc<Endpoint>]) -> Option<Arc<Ring>> {
        if endpoints.is_empty() {
            return None;
        }
        let same = |r: &Ring| r.is_over(endpoints.iter().map(|e| e.address()));
        if let Ok(cached) = self.ring.read() {
            if let Some(ring) = cached.as_ref().filter(|r| same(r)) {
                return Some(Arc::clone(ring));
            }
        }
        let addresses: Vec<&str> = endpoints.iter().map(|e| e.address()).collect();
        let ring = Arc::new(Ring::new(&addresses));
        if let Ok(mut cached) = self.ring.write() {
            *cached = Some(Arc::clone(&ring));
        }
        Some(ring)
    }

    /// [`Policy::pick_with`] with the calling thread's random generator.
    pub fn pick_now(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        THREAD_RNG.with(|rng| self.pick_with(endpoints, eligible, &mut rng.borrow_mut()))
    }

    /// [`Policy::pick_keyed`] with the calling thread's random generator.
    pub fn pick_now_keyed(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &dyn Fn(&Endpoint) -> bool,
        key: Option<u64>,
    ) -> Option<Arc<Endpoint>> {
        THREAD_RNG.with(|rng| self.pick_keyed(endpoints, eligible, key, &mut rng.borrow_mut()))
    }

    /// The score this policy gives `e` now (lower is better), for traces: gpu_aware's
    /// expected latency in milliseconds when it has one, else least_request's score.
    pub fn score(&self, e: &Endpoint) -> f64 {
        let now = Instant::now();
        let lr = least_request_score(e, now, &self.params);
        match self.kind {
            PolicyKind::GpuAware | PolicyKind::PrefixAffinity => {
                expected_cost(e, now, &self.params, self.per_call(e)).map_or(lr, |x| x.ms())
            }
            _ => lr,
        }
    }

    /// The per-call share `e` counts with: its own, or else the typical one of the
    /// model's backends. Until a backend's own readings tell (see [`crate::capacity`])
    /// it borrows its peers' figure, which is right for the usual pool of one kind of
    /// GPU; its reports still count in full, so hidden work shows either way.
    /// Lock-free: one atomic read, and a store when `e` has its own figure.
    fn per_call(&self, e: &Endpoint) -> Option<f64> {
        let typical = f64::from_bits(self.typical_per_call.load(Ordering::Relaxed));
        match e.per_call_utilization() {
            Some(own) => {
                let next = if typical > 0.0 {
                    typical + (own - typical) / 8.0
                } else {
                    own
                };
                self.typical_per_call
                    .store(next.to_bits(), Ordering::Relaxed);
                Some(own)
            }
            None => (typical > 0.0).then_some(typical),
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

/// gpu_aware's score (lower wins): the latency a new call can expect on `e`, in
/// milliseconds, or None when the backend has no fresh report, no learned per-call
/// utilization or no service time to count on (fewer than
/// [`Endpoint::SERVICE_TIME_MIN_SAMPLES`] successful calls, or none for `stale_after`
/// while it is idle: see [`Endpoint::service_time_ms`]); then it is compared by
/// least_request's score.
///
/// ```text
/// others   = max(0, utilization + (queue_weight × reported_queue − own_at_report) × per_call
///                   + (in_flight − own_at_report) × (min(1 / own_share, 4) − 1) × per_call)
/// load     = others + (in_flight + 1) × per_call
/// hidden   = utilization − reported_running × per_call   (0 without a running count)
/// expected = floor_latency × (1 + max(0, load − 1) / (1 − hidden) + spread × load)
///            / (weight × slow_start_factor)
/// ```
///
/// `load` is the backend's projected occupancy once this call lands, in units of its
/// capacity. The last report tells what the backend was doing (utilization counts work
/// the gateway cannot see and every replica's calls; the queue counts what waits);
/// taking out this gateway's own calls that the report counted leaves `others`, the
/// part the gateway cannot see. Its own calls it counts exactly and at once: every
/// call in flight now, plus this one. What the other clients did since the report it
/// cannot know; where the reports say how many calls the backend runs, it knows its
/// share of them (`own_share`: a third for one of three replicas), and takes the others
/// to have sent (or ended) calls in the same proportion as it has since the report.
/// Replicas deciding on the same report tend to pick the same emptiest backend; this
/// is what keeps them from filling it together (without it, 10% of the calls of three
/// replicas at 70% load waited for a slot; with it, under 1% on the full backends).
/// `per_call` is how much one call moves the reported utilization:
/// `1 / backends[].capacity` when configured, else learned from the reports themselves
/// ([`crate::capacity`]), so no capacity figure is required (the policy lends a
/// backend without a figure yet its peers' typical one). Below 1 the call finds room
/// and takes about `floor_latency` (a low quantile of the backend's successful calls:
/// its service time); above 1 it waits `load − 1` service times, or more where part of
/// the backend is held by work that is not calls (`hidden`): that part frees no slot,
/// so the queue drains more slowly. So a GPU three times slower is only used when a
/// fast one would make the call wait more than two service times, and a GPU half
/// taken by hidden work fills up after half as many calls. Among backends with room, `spread × load` prefers the
/// emptier one, so equal backends share calls instead of one filling up first.
pub fn expected_latency_ms(e: &Endpoint, now: Instant, p: &PolicyParams) -> Option<f64> {
    Some(expected_cost(e, now, p, e.per_call_utilization())?.ms())
}

/// The expected latency in two factors: the backend's service time and the load
/// factor `(max(1, load) + spread × load) / (weight × slow_start_factor)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Expected {
    floor_ms: f64,
    factor: f64,
    /// After this call the backend would still have room for one more (projected load
    /// plus one call's share at most 1), as far as the reports tell.
    spare: bool,
}

impl Expected {
    fn ms(&self) -> f64 {
        self.floor_ms * self.factor
    }

    /// Lower expected latency wins; but service times within 10% (or 1 ms) of each
    /// other count as equal and the emptier backend wins, so that measurement noise in the floors
    /// does not send every call of a lightly loaded pool to the marginally faster
    /// backend (starving the others of the traffic that keeps their estimates and
    /// outlier detection current).
    fn better_than(&self, other: &Expected) -> bool {
        let (a, b) = (self.floor_ms, other.floor_ms);
        // A millisecond at least: timers round short service times by about that much.
        let tolerance = (a.min(b) * 0.1).max(1.0);
        if (a - b).abs() <= tolerance {
            self.factor < other.factor
        } else {
            self.ms() < other.ms()
        }
    }
}

/// Most that one of this gateway's calls since the last report stands for (itself and
/// the other clients' calls assumed to have come with it): a gateway with a small
/// share of a backend's traffic must not count a backend full after one call.
const MAX_MIRROR: f64 = 4.0;

fn expected_cost(
    e: &Endpoint,
    now: Instant,
    p: &PolicyParams,
    per_call: Option<f64>,
) -> Option<Expected> {
    let reading = e.load().fresh(now, p.stale_after)?;
    let per_call = per_call?;
    let floor = e.service_time_ms(now, p.stale_after)?;
    let projected = projected_load(e, &reading, p, per_call);
    // Past full, calls wait for slots that calls free; work that holds a backend
    // without being calls (what the report's utilization shows beyond its running
    // calls) frees none, so a backend half taken by it drains its queue at half speed.
    let hidden = reading
        .running
        .map_or(0.0, |r| {
            reading.utilization.max(0.0) - r.max(0.0) * per_call
        })
        .clamp(0.0, (1.0 - per_call).max(0.0));
    let wait = (projected - 1.0).max(0.0) / (1.0 - hidden);
    let factor = (1.0 + wait + p.spread * projected)
        / (f64::from(e.weight()) * e.slow_start_factor(now, p.slow_start));
    Some(Expected {
        floor_ms: floor,
        factor,
        spare: projected + per_call <= 1.0 + 1e-9,
    })
}

/// The backend's occupancy once this call lands, in units of its capacity: `load` of
/// [`expected_latency_ms`]'s formula (the report, less this gateway's calls it counted,
/// plus every call of this gateway in flight now and this one).
fn projected_load(
    e: &Endpoint,
    reading: &crate::load::Reading,
    p: &PolicyParams,
    per_call: f64,
) -> f64 {
    let queue = reading.queue_depth.max(0.0) * p.queue_weight;
    let in_flight = e.in_flight() as f64;
    let mut others =
        (reading.utilization.max(0.0) + (queue - reading.own_calls as f64) * per_call).max(0.0);
    // Other clients (gateway replicas above all) act on the same report without telling
    // this one: assume they have added or ended calls since, in proportion to their
    // share, as this gateway has (see `MAX_MIRROR`).
    if let Some(share) = e.load().own_share() {
        let mirror = (1.0 / share).min(MAX_MIRROR) - 1.0;
        let own_since = in_flight - reading.own_calls as f64;
        others = (others + own_since * mirror * per_call).max(0.0);
    }
    others + (in_flight + 1.0) * per_call
}

/// A candidate's score. Two candidates that both have an expected latency are compared
/// by it; otherwise by least_request's score, so a backend without reports is neither
/// favoured nor punished against one with them.
#[derive(Debug, Clone, Copy)]
struct Score {
    least_request: f64,
    expected: Option<Expected>,
}

impl Score {
    fn better_than(&self, other: &Score) -> bool {
        match (&self.expected, &other.expected) {
            (Some(a), Some(b)) => a.better_than(b),
            _ => self.least_request < other.least_request,
        }
    }

    /// The call would take the backend's last free slot or queue (as far as the
    /// reports tell): with other replicas sending at the same moment on the same
    /// report, a last slot is where calls collide.
    fn is_tight(&self) -> bool {
        self.expected.is_some_and(|e| !e.spare)
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
    let mut picked = [usize::MAX; 16];
    let draws = choice_count.min(picked.len() / 2);
    let mut taken = 0;
    // When the best of the first draws would take its last free slot or make the call
    // wait, draw as many again: two random candidates that are both (nearly) full is
    // power of two choices' weak spot on a busy pool, and with several gateway replicas
    // a last slot is where their calls collide. A second look costs the same constant:
    // still O(1) in the pool size.
    for round in 0..2 {
        if round == 1 && !best.is_some_and(|(_, b)| b.is_tight()) {
            break;
        }
        for _ in 0..draws.min(n - taken) {
            let mut i = rng.usize(..n);
            while picked[..taken].contains(&i) {
                i = (i + 1) % n;
            }
            picked[taken] = i;
            taken += 1;
            let candidate = &endpoints[i];
            if eligible(candidate) {
                let s = score(candidate);
                if best.is_none_or(|(_, b)| s.better_than(&b)) {
                    best = Some((candidate, s));
                }
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

    /// Gives `e` a service time of `ms` and a capacity of `1 / per_call` calls (so one
    /// call adds `per_call` to its utilization), then stores a report of `utilization`
    /// and `queue` that counts none of this gateway's calls.
    fn report(e: &Endpoint, ms: u64, per_call: f64, utilization: f64, queue: f64) {
        use crate::load::Source;
        for _ in 0..Endpoint::SERVICE_TIME_MIN_SAMPLES {
            e.observe_latency(Duration::from_millis(ms));
        }
        e.set_capacity(Some((1.0 / per_call).round() as u32));
        e.load()
            .store(utilization, queue, Source::OrcaPerCall, Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_avoids_a_backend_that_reports_high_utilization() {
        let endpoints = pool(3);
        report(&endpoints[0], 20, 0.25, 0.9, 0.0);
        report(&endpoints[1], 20, 0.25, 0.1, 0.0);
        report(&endpoints[2], 20, 0.25, 0.1, 0.0);
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let counts = share(&policy, &endpoints, 11, 300);
        // One more call would put the busy one past full (0.9 + 0.25): with two choices
        // it only wins when sampled against itself, which never happens.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 100 && counts[2] > 100, "{counts:?}");
        // Least request ignores the reports and spreads evenly.
        let lr = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let counts = share(&lr, &endpoints, 11, 300);
        assert!(counts.iter().all(|c| *c > 60), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_counts_reported_queue_and_falls_back_when_stale() {
        let endpoints = pool(2);
        report(&endpoints[0], 20, 0.25, 0.5, 8.0);
        report(&endpoints[1], 20, 0.25, 0.5, 0.0);
        // Local in-flight says the opposite: 3 calls sent to endpoint 1 since its report.
        let _local: Vec<_> = (0..3).map(|_| endpoints[1].begin()).collect();
        let p = PolicyParams::default();
        let now = Instant::now();
        let expected = |e: &Endpoint, at| expected_latency_ms(e, at, &p).expect("expected");
        // 0: 0.5 + (8 + 0 + 1) x 0.25 = 2.75 capacities; 1: 0.5 + (3 + 1) x 0.25 = 1.5.
        assert_eq!(expected(&endpoints[0], now), 20.0 * (2.75 + 0.25 * 2.75));
        assert_eq!(expected(&endpoints[1], now), 20.0 * (1.5 + 0.25 * 1.5));
        let policy = Policy::new(PolicyKind::GpuAware, p.clone());
        let mut rng = fastrand::Rng::with_seed(3);
        let picked = policy.pick(&endpoints, &mut rng).expect("pick");
        assert!(Arc::ptr_eq(&picked, &endpoints[1]));
        tokio::time::advance(p.stale_after + Duration::from_millis(1)).await;
        // Stale: the reports drop out and least_request decides (endpoint 0 is idle).
        assert_eq!(expected_latency_ms(&endpoints[0], Instant::now(), &p), None);
        let picked = policy.pick(&endpoints, &mut rng).expect("pick");
        assert!(Arc::ptr_eq(&picked, &endpoints[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_uses_a_slow_backend_only_when_a_fast_one_would_queue() {
        let endpoints = pool(2);
        // Both idle, room for four calls each; endpoint 0 takes 60 ms a call, 1 takes 20.
        report(&endpoints[0], 60, 0.25, 0.0, 0.0);
        report(&endpoints[1], 20, 0.25, 0.0, 0.0);
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(4);
        let mut held = Vec::new();
        for _ in 0..11 {
            let e = policy.pick(&endpoints, &mut rng).expect("pick");
            held.push(e.begin());
        }
        // The tenth call on the fast one waits 1.5 of its service times (load 2.5 →
        // 20 x 3.125 = 62.5 ms) against 60 x 1.0625 = 63.75 ms on the idle slow one; the
        // eleventh would wait longer, so it goes to the slow one.
        assert_eq!(
            (endpoints[0].in_flight(), endpoints[1].in_flight()),
            (1, 10)
        );
        // Least request ignores speed.
        drop(held);
        let lr = Policy::new(PolicyKind::LeastRequest, PolicyParams::default());
        let held: Vec<_> = (0..4)
            .map(|_| lr.pick(&endpoints, &mut rng).expect("pick").begin())
            .collect();
        assert_eq!((endpoints[0].in_flight(), endpoints[1].in_flight()), (2, 2));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_looks_again_when_both_samples_would_queue() {
        // Six of eight backends full, two idle. Two random draws are both full 54% of
        // the time; drawing two more when they are leaves 21%.
        let endpoints = pool(8);
        for (i, e) in endpoints.iter().enumerate() {
            report(e, 20, 0.25, if i < 6 { 1.0 } else { 0.0 }, 0.0);
        }
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let counts = share(&policy, &endpoints, 5, 1000);
        let on_full: usize = counts[..6].iter().sum();
        assert!((150..=280).contains(&on_full), "{counts:?}");
        // With a full scan none lands on a full one.
        let scan = PolicyParams {
            choice_count: 0,
            ..PolicyParams::default()
        };
        let counts = share(
            &Policy::new(PolicyKind::GpuAware, scan),
            &endpoints,
            5,
            1000,
        );
        assert_eq!(counts[..6].iter().sum::<usize>(), 0, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_aware_treats_service_times_within_ten_percent_as_equal() {
        let endpoints = pool(2);
        // 20 and 21 ms: noise, not a faster GPU; the emptier one wins, so calls alternate.
        report(&endpoints[0], 20, 0.25, 0.0, 0.0);
        report(&endpoints[1], 21, 0.25, 0.0, 0.0);
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(8);
        let held: Vec<_> = (0..4)
            .map(|_| policy.pick(&endpoints, &mut rng).expect("pick").begin())
            .collect();
        assert_eq!((endpoints[0].in_flight(), endpoints[1].in_flight()), (2, 2));
        drop(held);
    }

    /// Stores a report that says how many calls the backend runs, `own` of them this
    /// gateway's.
    fn report_running(e: &Endpoint, utilization: f64, queue: f64, running: f64, own: u64) {
        use crate::load::{Load, Source};
        let load = Load {
            utilization,
            queue_depth: queue,
            running: Some(running),
        };
        e.load()
            .store_observed(load, Source::OrcaPerCall, Instant::now(), Some(own));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_sent_since_a_report_count_for_the_other_replicas_too() {
        let running = |e: &Endpoint, total: f64, own: u64| {
            report_running(e, total / 4.0, 0.0, total, own);
        };
        let endpoints = pool(2);
        let p = PolicyParams::default();
        for e in &endpoints {
            report(e, 20, 0.25, 0.0, 0.0);
            // One of three replicas: a third of the calls running there are ours.
            for _ in 0..200 {
                running(e, 3.0, 1);
            }
            // The last report: one call running, not ours.
            running(e, 1.0, 0);
        }
        let ours = endpoints[0].load().own_share().expect("share");
        assert!((ours - 1.0 / 3.0).abs() < 0.02, "{ours}");
        let now = Instant::now();
        let quiet = expected_latency_ms(&endpoints[1], now, &p).expect("expected");
        // 20 ms × (1 + 0.25 × 0.5): one call running, ours would be the second.
        assert!((quiet - 22.5).abs() < 1e-9, "{quiet}");
        // This replica has sent one call to endpoint 0 since its report: the other two
        // replicas, working from the same report, are taken to have sent two. Counted
        // alone it would be 20 × (1 + 0.25 × 0.75) = 23.75; mirrored the backend is
        // past full: 0.25 + 2 × 0.25 others, 2 × 0.25 ours.
        let _sent = endpoints[0].begin();
        let busy = expected_latency_ms(&endpoints[0], now, &p).expect("expected");
        assert!((busy - 20.0 * 1.25 * 1.25).abs() < 0.5, "{busy}");
        let policy = Policy::new(PolicyKind::GpuAware, p);
        assert_eq!(share(&policy, &endpoints, 5, 100), [0, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_behind_hidden_work_counts_as_slower_to_drain() {
        let endpoints = pool(2);
        let p = PolicyParams::default();
        let reported = |e: &Endpoint, running: f64, queue: f64| {
            report(e, 20, 0.25, 0.0, 0.0);
            report_running(e, 1.0, queue, running, 0);
        };
        // Both full with one call waiting: four calls running on one, two on the other
        // (whose other half is work that frees no slot).
        reported(&endpoints[0], 4.0, 1.0);
        reported(&endpoints[1], 2.0, 1.0);
        let now = Instant::now();
        let calls = expected_latency_ms(&endpoints[0], now, &p).expect("expected");
        let hidden = expected_latency_ms(&endpoints[1], now, &p).expect("expected");
        // Load 1.5 once ours lands: half a service time's wait, plus 0.25 × 1.5.
        assert!((calls - 20.0 * 1.875).abs() < 1e-9, "{calls}");
        // The same load drains at half speed behind the hidden half.
        assert!((hidden - 20.0 * 2.375).abs() < 1e-9, "{hidden}");
        let policy = Policy::new(PolicyKind::GpuAware, p);
        assert_eq!(share(&policy, &endpoints, 9, 100), [100, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_time_counts_after_enough_calls_and_is_probed_when_old() {
        let e = &pool(1)[0];
        let max_age = Duration::from_secs(3);
        for _ in 1..Endpoint::SERVICE_TIME_MIN_SAMPLES {
            e.observe_latency(Duration::from_millis(20));
        }
        assert_eq!(
            e.service_time_ms(Instant::now(), max_age),
            None,
            "too few calls"
        );
        e.observe_latency(Duration::from_millis(20));
        assert_eq!(e.service_time_ms(Instant::now(), max_age), Some(20.0));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            e.service_time_ms(Instant::now(), max_age),
            None,
            "old and idle"
        );
        let probe = e.begin();
        assert_eq!(
            e.service_time_ms(Instant::now(), max_age),
            Some(20.0),
            "one probe at a time"
        );
        drop(probe);
        e.observe_latency(Duration::from_millis(20));
        assert_eq!(e.service_time_ms(Instant::now(), max_age), Some(20.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_avoided_for_its_slow_calls_gets_a_probe_when_that_is_old() {
        use crate::load::Source;
        let endpoints = pool(2);
        // Its first calls came out slow (a cold start, say); the other is fast.
        report(&endpoints[0], 20, 0.25, 0.0, 0.0);
        report(&endpoints[1], 60, 0.25, 0.0, 0.0);
        let policy = Policy::new(PolicyKind::GpuAware, PolicyParams::default());
        assert_eq!(share(&policy, &endpoints, 3, 200)[1], 0, "slower: avoided");
        // Four seconds on: the fast one kept serving, the slow one's figure is old.
        tokio::time::advance(Duration::from_secs(4)).await;
        endpoints[0].observe_latency(Duration::from_millis(20));
        for e in &endpoints {
            e.load()
                .store(0.0, 0.0, Source::OrcaPerCall, Instant::now());
        }
        let probed = share(&policy, &endpoints, 3, 200)[1];
        assert!(
            probed > 50,
            "idle with an old figure: compared by in-flight ({probed})"
        );
        // While its probe runs, its figure counts again, so it gets no second call.
        let probe = endpoints[1].begin();
        assert_eq!(share(&policy, &endpoints, 3, 200)[1], 0);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_estimates_track_slowdowns_and_ignore_queued_calls() {
        let e = &pool(1)[0];
        e.observe_latency(Duration::from_millis(60));
        // Peak-EWMA: a faster sample lowers it by a fifth of the gap; a slower one counts at once.
        e.observe_latency(Duration::from_millis(10));
        assert_eq!(e.latency_ewma_ms(), Some(50.0));
        e.observe_latency(Duration::from_millis(80));
        assert_eq!(e.latency_ewma_ms(), Some(80.0));
        // The floor halves the gap to a faster sample...
        let e = &pool(1)[0];
        e.observe_latency(Duration::from_millis(40));
        e.observe_latency(Duration::from_millis(20));
        assert_eq!(e.latency_floor_ms(), Some(30.0));
        e.observe_latency(Duration::from_millis(20));
        e.observe_latency(Duration::from_millis(20));
        assert_eq!(e.latency_floor_ms(), Some(22.5));
        // ...barely moves for a few calls that queued...
        for _ in 0..10 {
            e.observe_latency(Duration::from_millis(40));
        }
        let floor = e.latency_floor_ms().expect("floor");
        assert!((22.5..26.0).contains(&floor), "{floor}");
        // ...and follows a backend that really got slower.
        for _ in 0..300 {
            e.observe_latency(Duration::from_millis(40));
        }
        let floor = e.latency_floor_ms().expect("floor");
        assert!((39.0..=40.0).contains(&floor), "{floor}");
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
        let new = Endpoint::from_config(
            &cfg,
            "admin",
            true,
            &Default::default(),
            &Default::default(),
            None,
        )
        .expect("endpoint");
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

    #[tokio::test(start_paused = true)]
    async fn prefix_affinity_keeps_a_prefix_home_until_its_bound_then_falls_back() {
        let endpoints = pool(4);
        let policy = Policy::new(PolicyKind::PrefixAffinity, PolicyParams::default());
        let mut rng = fastrand::Rng::with_seed(5);
        let key = affinity::key_hash(b"You are a helpful assistant.");
        let pick = |rng: &mut fastrand::Rng| {
            policy
                .pick_keyed(&endpoints, &|e| e.is_eligible(), Some(key), rng)
                .expect("pick")
        };
        let home = pick(&mut rng);
        for _ in 0..20 {
            assert!(
                Arc::ptr_eq(&pick(&mut rng), &home),
                "idle pool: always home"
            );
        }
        // Hold calls on it: with 1 elsewhere and ε = 0.25, home may hold
        // ⌈1.25 × (n + 1) / 4⌉; past that the next backend on the ring takes the call.
        let mut held = vec![home.begin(), home.begin()];
        let other = endpoints
            .iter()
            .find(|e| !Arc::ptr_eq(e, &home))
            .expect("other");
        held.push(other.begin());
        // 3 in flight, + this one: cap ⌈1.25 × 1⌉ = 2, home holds 2 → moves on.
        let next = pick(&mut rng);
        assert!(!Arc::ptr_eq(&next, &home));
        drop(held);
        // One call on each: 5 with this one, cap ⌈1.25 × 5 / 4⌉ = 2, home holds 1.
        let held: Vec<_> = endpoints.iter().map(|e| e.begin()).collect();
        assert!(Arc::ptr_eq(&pick(&mut rng), &home), "back home once under");
        drop(held);
        // Home reports itself full with 4 calls waiting: this one would make it 2.25
        // capacities, above the threshold (2): the next backend on the ring takes it,
        // every time.
        for e in &endpoints {
            report(e, 20, 0.25, 0.0, 0.0);
        }
        report(&home, 20, 0.25, 1.0, 4.0);
        let spill = pick(&mut rng);
        assert!(!Arc::ptr_eq(&spill, &home), "hot: passed over");
        for _ in 0..20 {
            assert!(Arc::ptr_eq(&pick(&mut rng), &spill), "the same next one");
        }
        // Every backend full: gpu_aware decides.
        for e in &endpoints {
            report(e, 20, 0.25, 1.0, 4.0);
        }
        let keyed: Vec<_> = (0..40).map(|_| pick(&mut rng)).collect();
        assert!(
            keyed.iter().any(|e| !Arc::ptr_eq(e, &keyed[0])),
            "all hot: spread by gpu_aware"
        );
        for e in &endpoints {
            report(e, 20, 0.25, 0.0, 0.0);
        }
        assert!(Arc::ptr_eq(&pick(&mut rng), &home));
        // Home unhealthy: gpu_aware over the others.
        home.set_health(Health::NotReady);
        for _ in 0..20 {
            assert!(!Arc::ptr_eq(&pick(&mut rng), &home));
        }
        home.set_health(Health::Ready);
        // No key (no prompt input): gpu_aware, which spreads an idle pool.
        let keyless = share(&policy, &endpoints, 6, 200);
        assert!(keyless.iter().all(|c| *c > 20), "{keyless:?}");
    }

    #[test]
    fn the_affinity_key_is_the_prompt_prefix_and_only_prefix_affinity_reads_it() {
        use infergate_proto::inference::{
            model_infer_request::InferInputTensor, ModelInferRequest,
        };
        use prost::Message as _;
        let request = |text: &[u8]| {
            let mut raw = (text.len() as u32).to_le_bytes().to_vec();
            raw.extend_from_slice(text);
            ModelInferRequest {
                model_name: "tiny_llm".into(),
                inputs: vec![InferInputTensor {
                    name: "text_input".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                }],
                raw_input_contents: vec![raw],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let mut params = PolicyParams::default();
        params.prefix.bytes = 10;
        let policy = Policy::new(PolicyKind::PrefixAffinity, params.clone());
        let a = policy.affinity_key(&request(b"0123456789 user one"));
        assert!(a.is_some());
        assert_eq!(a, policy.affinity_key(&request(b"0123456789 user two")));
        assert_ne!(a, policy.affinity_key(&request(b"x123456789 user one")));
        let gpu = Policy::new(PolicyKind::GpuAware, params);
        assert_eq!(gpu.affinity_key(&request(b"0123456789")), None);
    }
}
