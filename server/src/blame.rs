//! Whose failure is it: per-caller attribution of a backend's failures, so that one
//! tenant whose own requests fail on a backend cannot take that backend out while it
//! serves everyone else.
//!
//! Codes that name the request (INVALID_ARGUMENT, NOT_FOUND, ...) never count against a
//! backend (`attempt::verdict`), and a failure that a second backend repeats for the
//! same request is the request's. What is left is a tenant whose requests keep failing
//! with codes that look like the backend's (INTERNAL from a model that crashes on that
//! tenant's inputs, say): each costs the backend a failure, and enough of them eject
//! it or open its circuit for every tenant.
//!
//! The rule: each tenant's failures on a backend form a streak, which its own success
//! ends. The first [`Blame::ALLOWANCE`] failures of a streak count against the backend
//! as always. Past them, a failure counts only while no *other* tenant has had a
//! success on that backend since the streak began: a backend that fails everyone is
//! still blamed at once (nobody else succeeds), while one that keeps serving other
//! tenants is not blamed for the one whose calls alone fail. With one tenant (every
//! caller `anonymous`, the default without keys), nothing changes.
//!
//! State per backend: streaks for the last [`Blame::TENANTS`] tenants that failed there
//! (the oldest streak is forgotten first) and the last two tenants that succeeded. A
//! tenant is kept as a 64-bit hash of its name. Fed `now`, like the other machines.

use tokio::time::Instant;

/// One tenant's current streak of failures on the backend.
#[derive(Debug, Clone, Copy)]
struct Streak {
    tenant: u64,
    failures: u32,
    began: Instant,
}

/// The attribution state of one backend.
#[derive(Debug, Default)]
pub struct Blame {
    streaks: Vec<Streak>,
    /// The last success on the backend and the last one by a different tenant.
    succeeded: [Option<(u64, Instant)>; 2],
}

impl Blame {
    /// Failures of a streak that always count against the backend.
    pub const ALLOWANCE: u32 = 2;
    /// Tenants whose streaks are remembered per backend.
    pub const TENANTS: usize = 16;

    /// The hash a tenant is kept as.
    pub fn key(tenant: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(tenant.as_bytes())
    }

    /// `tenant`'s call succeeded on the backend.
    pub fn success(&mut self, tenant: u64, now: Instant) {
        self.streaks.retain(|s| s.tenant != tenant);
        match self.succeeded[0] {
            Some((last, _)) if last == tenant => self.succeeded[0] = Some((tenant, now)),
            previous => {
                self.succeeded = [Some((tenant, now)), previous];
            }
        }
    }

    /// `tenant`'s call failed in a way that would count against the backend: true if it
    /// should (see the module notes).
    pub fn failure(&mut self, tenant: u64, now: Instant) -> bool {
        let streak = match self.streaks.iter().position(|s| s.tenant == tenant) {
            Some(i) => &mut self.streaks[i],
            None => {
                if self.streaks.len() >= Self::TENANTS {
                    // The oldest streak goes: its tenant starts again with an allowance.
                    if let Some(oldest) =
                        (0..self.streaks.len()).min_by_key(|i| self.streaks[*i].began)
                    {
                        self.streaks.swap_remove(oldest);
                    }
                }
                self.streaks.push(Streak {
                    tenant,
                    failures: 0,
                    began: now,
                });
                let last = self.streaks.len() - 1;
                &mut self.streaks[last]
            }
        };
        streak.failures = streak.failures.saturating_add(1);
        if streak.failures <= Self::ALLOWANCE {
            return true;
        }
        let since = streak.began;
        let others_served = self
            .succeeded
            .iter()
            .flatten()
            .any(|(who, at)| *who != tenant && *at >= since);
        !others_served
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_tenants_failures_stop_counting_while_others_are_served() {
        let (noisy, good) = (Blame::key("noisy"), Blame::key("good"));
        let mut b = Blame::default();
        let mut counted = 0;
        for _ in 0..50 {
            tokio::time::advance(Duration::from_millis(1)).await;
            counted += u32::from(b.failure(noisy, Instant::now()));
            tokio::time::advance(Duration::from_millis(1)).await;
            b.success(good, Instant::now());
        }
        assert_eq!(counted, Blame::ALLOWANCE, "only the allowance counts");
        // Its own success ends the streak: a new one starts with an allowance.
        b.success(noisy, Instant::now());
        assert!(b.failure(noisy, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_fails_everyone_is_blamed_for_every_failure() {
        let tenants: Vec<u64> = ["a", "b", "c"].iter().map(|t| Blame::key(t)).collect();
        let mut b = Blame::default();
        // Served everyone once, then fails everyone.
        for t in &tenants {
            b.success(*t, Instant::now());
        }
        tokio::time::advance(Duration::from_millis(5)).await;
        for _ in 0..20 {
            for t in &tenants {
                tokio::time::advance(Duration::from_millis(1)).await;
                assert!(b.failure(*t, Instant::now()));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_one_tenant_every_failure_counts() {
        let only = Blame::key("anonymous");
        let mut b = Blame::default();
        for i in 0..30 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if i % 3 == 0 {
                b.success(only, Instant::now());
            } else {
                assert!(b.failure(only, Instant::now()));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn streaks_are_bounded_and_the_oldest_goes_first() {
        let mut b = Blame::default();
        for i in 0..(Blame::TENANTS as u64 * 4) {
            tokio::time::advance(Duration::from_millis(1)).await;
            b.failure(i, Instant::now());
        }
        assert_eq!(b.streaks.len(), Blame::TENANTS);
        assert!(b
            .streaks
            .iter()
            .all(|s| s.tenant >= Blame::TENANTS as u64 * 3));
    }
}
