//! Cost of one local rate-limit decision, in nanoseconds, with 10 tenants and with
//! 50,000 tenants rotating through a limiter that keeps at most `max_keys` (10,000)
//! buckets: the case of a client that sends a new tenant header value on every call.
//! The buckets refill slowly (1 token/s), so none is full when the cap is reached and
//! eviction has to choose; the bucket counts printed at the end show the memory bound.
//!
//! ```text
//! CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
//!   cargo run --release -p infergate --example ratelimit_cost
//! ```

use infergate::config::{Bucket, RateLimitConfig, Scope};
use infergate::ratelimit::{LocalRateLimiter, RateKey, RateLimiter};
use std::hint::black_box;
use std::time::Instant;

const DECISIONS: usize = 400_000;

fn limiter() -> LocalRateLimiter {
    LocalRateLimiter::new(RateLimitConfig {
        per_tenant: Some(Bucket {
            rate_per_second: 1.0,
            burst: 1_000,
            scope: Scope::Local,
        }),
        per_model: Some(Bucket {
            rate_per_second: 1e9,
            burst: u32::MAX,
            scope: Scope::Local,
        }),
        ..RateLimitConfig::default()
    })
    .expect("valid config")
}

/// Nanoseconds per decision over `DECISIONS` calls cycling through `keys`.
fn ns_per_decision(l: &LocalRateLimiter, keys: &[RateKey]) -> f64 {
    let now = tokio::time::Instant::now();
    // Warm up: every key seen once (and the cap reached where there are more keys).
    for key in keys.iter().take(DECISIONS) {
        let _ = black_box(l.check(key, now));
    }
    let start = Instant::now();
    for key in keys.iter().cycle().take(DECISIONS) {
        let _ = black_box(l.check(key, now));
    }
    start.elapsed().as_nanos() as f64 / DECISIONS as f64
}

fn keys(tenants: usize) -> Vec<RateKey> {
    (0..tenants)
        .map(|i| RateKey::new(format!("tenant-{i}"), "llm"))
        .collect()
}

fn main() {
    println!("local rate limiter, one thread, {DECISIONS} decisions per row");
    println!(
        "{:>10} {:>14} {:>16}",
        "tenants", "ns/decision", "buckets (t, m)"
    );
    for tenants in [10, 50_000] {
        let l = limiter();
        let ns = ns_per_decision(&l, &keys(tenants));
        let (t, m) = l.bucket_counts();
        println!("{tenants:>10} {ns:>14.0} {:>16}", format!("({t}, {m})"));
    }
}
