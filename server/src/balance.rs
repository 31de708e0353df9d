//! The balancer: picks one endpoint for a call among a model's candidates. Sits after
//! admission and retry in the request path, before the endpoint call.
//!
//! A candidate is an endpoint that serves the model and that [`Endpoint::is_eligible`]
//! admits (ready, not draining; later also not ejected and breaker closed). Eligibility
//! is read at pick time, so a state change acts on the very next call without rebuilding
//! any list.
//!
//! `least_request` uses power of two choices by default: two random candidates, the one
//! with fewer calls in flight wins. That is O(1) in the pool size and avoids the herd
//! that a full scan causes when several gateways see the same "least loaded" backend.
//! Only when both samples are ineligible does it fall back to a scan.

use crate::config::PolicyKind;
use crate::endpoint::Endpoint;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A model's balancing policy, with its state.
#[derive(Debug)]
pub struct Policy {
    kind: PolicyKind,
    choice_count: usize,
    next: AtomicUsize,
}

impl Policy {
    /// A policy of `kind`; `choice_count` is used by least_request (0 = scan all).
    pub fn new(kind: PolicyKind, choice_count: usize) -> Self {
        Policy {
            kind,
            choice_count,
            next: AtomicUsize::new(0),
        }
    }

    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Picks an eligible endpoint from `endpoints`, or None when none is eligible.
    pub fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        rng: &mut fastrand::Rng,
    ) -> Option<Arc<Endpoint>> {
        match self.kind {
            PolicyKind::RoundRobin => self.round_robin(endpoints),
            PolicyKind::LeastRequest => least_request(endpoints, self.choice_count, rng),
        }
        .cloned()
    }

    /// Picks with the calling thread's random generator.
    pub fn pick_now(&self, endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        THREAD_RNG.with(|rng| self.pick(endpoints, &mut rng.borrow_mut()))
    }

    fn round_robin<'a>(&self, endpoints: &'a [Arc<Endpoint>]) -> Option<&'a Arc<Endpoint>> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &endpoints[(start + i) % n])
            .find(|e| e.is_eligible())
    }
}

thread_local! {
    static THREAD_RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::new());
}

fn least_request<'a>(
    endpoints: &'a [Arc<Endpoint>],
    choice_count: usize,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Endpoint>> {
    let n = endpoints.len();
    if choice_count == 0 || choice_count >= n {
        return scan_least(endpoints, rng);
    }
    // Sample `choice_count` distinct indices (O(choice_count), not O(n)).
    let mut best: Option<&Arc<Endpoint>> = None;
    let mut picked = [usize::MAX; 8];
    let draws = choice_count.min(picked.len());
    for slot in 0..draws {
        let mut i = rng.usize(..n);
        while picked[..slot].contains(&i) {
            i = (i + 1) % n;
        }
        picked[slot] = i;
        let candidate = &endpoints[i];
        if candidate.is_eligible() && best.is_none_or(|b| candidate.in_flight() < b.in_flight()) {
            best = Some(candidate);
        }
    }
    best.or_else(|| scan_least(endpoints, rng))
}

fn scan_least<'a>(
    endpoints: &'a [Arc<Endpoint>],
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Endpoint>> {
    // Start at a random offset so ties do not always go to the first endpoint.
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    let offset = rng.usize(..n);
    (0..n)
        .map(|i| &endpoints[(offset + i) % n])
        .filter(|e| e.is_eligible())
        .min_by_key(|e| e.in_flight())
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
        let policy = Policy::new(PolicyKind::LeastRequest, 2);
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
        let policy = Policy::new(PolicyKind::LeastRequest, 2);
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
        let policy = Policy::new(PolicyKind::RoundRobin, 0);
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
        assert!(Policy::new(PolicyKind::LeastRequest, 2)
            .pick(&[], &mut rng)
            .is_none());
    }

    #[tokio::test]
    async fn one_candidate_is_always_picked() {
        let endpoints = pool(1);
        let mut rng = fastrand::Rng::with_seed(3);
        let policy = Policy::new(PolicyKind::LeastRequest, 2);
        assert!(policy.pick(&endpoints, &mut rng).is_some());
    }
}
