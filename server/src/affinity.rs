//! Consistent hashing with bounded loads: the ring and the load bound behind the
//! `prefix_affinity` policy (`balance.rs`), which uses them at step 7 of the request
//! path (pick) for calls that carry a prompt prefix.
//!
//! Why: an LLM server answers a prompt whose prefix it computed recently much faster
//! (its KV cache still holds it), so the calls that share a system prompt should go to
//! the same backend. Plain consistent hashing does that, but a popular prompt then
//! overloads its backend. The fix is Mirrokni, Thorup and Zadimoghaddam's *consistent
//! hashing with bounded loads* (SODA 2018): every backend has a capacity of
//! `⌈(1 + ε) × m / n⌉` calls, where `m` is the number of calls in flight once this one
//! lands and `n` the number of backends; a call walks the ring from its key's point and
//! takes the first backend that is under its capacity. By construction no backend ever
//! holds more than `⌈(1 + ε) × mean⌉`, and the paper shows that the keys it moves when
//! backends or load come and go stay few (their number, and the length of the walk,
//! grow as ε shrinks, roughly as 1/ε²), so most calls of a prefix keep their backend.
//!
//! Why ε = 0.25 by default: the target is no backend above 1.3× the mean load,
//! and with a ceiling on small counts `⌈1.25 × mean⌉` stays within that for the
//! in-flight counts a busy pool has (at mean 8, 10 = 1.25×); a smaller ε pushes more
//! of a popular prefix off its backend, and so loses cache hits, for a tighter spread
//! than the target asks. Vimeo's HAProxy change (`hash-balance-factor 125`) made the
//! same choice for the same reason.
//!
//! The ring: each backend gets [`POINTS_PER_BACKEND`] points, the first 8 bytes of the
//! SHA-256 of `address#i`; keys are the first 8 bytes of the SHA-256 of the prefix.
//! SHA-256 because it is already a dependency and is the same in every build, so gateway
//! replicas with the same backends agree on every key without sharing any state (std's
//! hasher may change between Rust releases). Hand-written because the crates that offer
//! a ring (or jump hashing) do not offer the bounded walk, which is the point here.

use sha2::{Digest, Sha256};

/// Points each backend has on the ring: enough that each backend's share of the keys
/// is within a few percent of 1/n for the pool sizes a gateway has.
pub const POINTS_PER_BACKEND: usize = 160;

/// The stable 64-bit hash of `bytes` (first 8 bytes of its SHA-256).
pub fn key_hash(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A consistent-hash ring over named members (backend addresses), in the order given.
#[derive(Debug, Clone)]
pub struct Ring {
    members: Vec<String>,
    /// (point, member index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring over `members`, [`POINTS_PER_BACKEND`] points each.
    pub fn new<S: AsRef<str>>(members: &[S]) -> Ring {
        let mut points = Vec::with_capacity(members.len() * POINTS_PER_BACKEND);
        for (i, m) in members.iter().enumerate() {
            for p in 0..POINTS_PER_BACKEND {
                let point = key_hash(format!("{}#{p}", m.as_ref()).as_bytes());
                points.push((point, i as u32));
            }
        }
        points.sort_unstable();
        Ring {
            members: members.iter().map(|m| m.as_ref().to_owned()).collect(),
            points,
        }
    }

    /// The members, in the order the ring was built with.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Whether the ring was built over exactly `names`, in this order.
    pub fn is_over<'a>(&self, names: impl ExactSizeIterator<Item = &'a str>) -> bool {
        names.len() == self.members.len() && names.zip(&self.members).all(|(a, b)| a == b)
    }

    /// Every member once, in ring order from `key`'s point: the first is the key's own
    /// backend, the next ones where it goes when that one is full.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.points.len();
        let start = self.points.partition_point(|(p, _)| *p < key);
        let mut seen = vec![false; self.members.len()];
        let mut left = self.members.len();
        (0..n)
            .map(move |i| self.points[(start + i) % n].1 as usize)
            .filter(move |m| {
                if left == 0 || seen[*m] {
                    return false;
                }
                seen[*m] = true;
                left -= 1;
                true
            })
    }
}

/// The most calls one backend may hold once a new call lands: `⌈(1 + ε) × (in_flight +
/// 1) / backends⌉`, at least 1.
pub fn capacity(in_flight: usize, backends: usize, epsilon: f64) -> usize {
    if backends == 0 {
        return 0;
    }
    let mean = (in_flight as f64 + 1.0) / backends as f64;
    ((1.0 + epsilon.max(0.0)) * mean).ceil().max(1.0) as usize
}

/// The members under the load bound for `key`, in ring order from its point: those
/// holding fewer than [`capacity`] calls (from `load`). `total` is the number of calls
/// all members hold now. The first is the bounded-load choice.
pub fn under_bound<'a>(
    ring: &'a Ring,
    key: u64,
    epsilon: f64,
    total: usize,
    load: impl Fn(usize) -> usize + 'a,
) -> impl Iterator<Item = usize> + 'a {
    let cap = capacity(total, ring.members().len(), epsilon);
    ring.walk(key).filter(move |m| load(*m) < cap)
}

/// The bounded-load choice for `key`: the first member on the ring under the bound,
/// or None when the ring is empty. Some member always is: the loads sum to `total`,
/// below `n × capacity`.
pub fn choose(
    ring: &Ring,
    key: u64,
    epsilon: f64,
    total: usize,
    load: impl Fn(usize) -> usize,
) -> Option<usize> {
    let cap = capacity(total, ring.members().len(), epsilon);
    ring.walk(key).find(|m| load(*m) < cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8001")).collect()
    }

    #[test]
    fn the_same_key_lands_on_the_same_member_and_replicas_agree() {
        let a = Ring::new(&names(4));
        let b = Ring::new(&names(4));
        for k in 0..200u64 {
            let key = key_hash(&k.to_le_bytes());
            assert_eq!(a.walk(key).next(), b.walk(key).next());
            let walk: Vec<_> = a.walk(key).collect();
            let mut sorted = walk.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3], "every member once");
        }
    }

    #[test]
    fn a_member_joining_moves_only_the_keys_it_takes() {
        // Ring stability: with a fifth backend, about a fifth of the keys move, and
        // every key that moves moves to the new backend.
        let before = Ring::new(&names(4));
        let after = Ring::new(&names(5));
        let mut rng = fastrand::Rng::with_seed(19);
        let keys: Vec<u64> = (0..10_000).map(|_| rng.u64(..)).collect();
        let mut moved = 0;
        for key in &keys {
            let (b, a) = (before.walk(*key).next(), after.walk(*key).next());
            if b != a {
                moved += 1;
                assert_eq!(a, Some(4), "a moved key goes to the new member");
            }
        }
        assert!((1500..2500).contains(&moved), "{moved} of 10000 moved");
        // And each member's share is near a quarter.
        let mut share = [0usize; 4];
        for key in &keys {
            share[before.walk(*key).next().unwrap_or(0)] += 1;
        }
        assert!(share.iter().all(|s| (2000..3000).contains(s)), "{share:?}");
    }

    #[test]
    fn no_member_goes_above_the_bound_under_a_skewed_key_set() {
        // Zipf-like keys: a few prompts carry most of the calls. First calls only
        // arrive: after each, no member holds more than (1 + ε) × mean + 1. Then calls
        // also finish at random: a member that takes a call is never left above it.
        for (seed, epsilon, n) in [(1u64, 0.25, 4usize), (2, 0.1, 8), (3, 0.5, 3)] {
            let ring = Ring::new(&names(n));
            let mut rng = fastrand::Rng::with_seed(seed);
            let prompts: Vec<u64> = (0..20u64).map(|p| key_hash(&p.to_le_bytes())).collect();
            let weights: Vec<f64> = (1..=20).map(|r| 1.0 / r as f64).collect();
            let total_w: f64 = weights.iter().sum();
            let draw = |rng: &mut fastrand::Rng| {
                let mut x = rng.f64() * total_w;
                let p = weights.iter().position(|w| {
                    x -= w;
                    x < 0.0
                });
                prompts[p.unwrap_or(19)]
            };
            let mut loads = vec![0usize; n];
            let mut held: Vec<usize> = Vec::new();
            let mut off_home = 0;
            for step in 0..5000 {
                let churn = step >= 200;
                if churn && held.len() > 20 && (held.len() >= 60 || rng.bool()) {
                    let i = rng.usize(..held.len());
                    loads[held.swap_remove(i)] -= 1;
                    continue;
                }
                let key = draw(&mut rng);
                let total: usize = loads.iter().sum();
                let m = choose(&ring, key, epsilon, total, |m| loads[m]).expect("a member");
                off_home += usize::from(ring.walk(key).next() != Some(m));
                loads[m] += 1;
                held.push(m);
                let mean = held.len() as f64 / n as f64;
                let bound = (1.0 + epsilon) * mean + 1.0;
                assert!(
                    loads[m] as f64 <= bound,
                    "seed {seed}: {loads:?}, mean {mean}"
                );
                if !churn {
                    let max = *loads.iter().max().unwrap_or(&0);
                    assert!(max as f64 <= bound, "seed {seed}: {loads:?}, mean {mean}");
                }
            }
            // The skew is real: the top prompt alone is over a quarter of the calls,
            // more than its backend may take, so some calls left their home.
            assert!(off_home > 20, "seed {seed}: {off_home}");
        }
    }

    #[test]
    fn capacity_rounds_up_and_is_never_zero() {
        assert_eq!(capacity(0, 4, 0.25), 1);
        assert_eq!(capacity(7, 4, 0.25), 3); // mean 2 → 2.5 → 3
        assert_eq!(capacity(31, 4, 0.25), 10);
        assert_eq!(capacity(5, 0, 0.25), 0);
        let ring = Ring::new(&names(2));
        // Both full at capacity: the walk finds the one below it.
        let key = key_hash(b"k");
        let home = ring.walk(key).next().expect("home");
        let chosen = choose(&ring, key, 0.0, 3, |m| if m == home { 2 } else { 1 });
        assert_eq!(chosen, Some(1 - home));
        assert_eq!(choose(&Ring::new::<String>(&[]), key, 0.25, 0, |_| 0), None);
    }
}
