//! Rate limits: token buckets per tenant and per model. Sits in the request path after
//! admission (auth has named the tenant) and before the bulkhead, retry, the per-try
//! timeout, the balancer and the endpoint.
//!
//! Why: the bulkhead bounds how many calls run at once, which protects the backends
//! from a burst; a rate limit bounds how many calls a tenant (or all tenants together,
//! for one model) may start per second, which keeps one tenant's steady flood from
//! taking the capacity that others paid for. A call must find a token in both its
//! tenant's bucket and its model's bucket; if either is empty it takes from neither and
//! is refused with RESOURCE_EXHAUSTED and the time until a token is back.
//!
//! A bucket holds up to `burst` tokens and refills at `rate_per_second`, lazily: a
//! check adds the tokens earned since the bucket was last touched, so there is no timer
//! per bucket. Time comes in as an argument (`tokio::time::Instant`), so tests step it.
//!
//! The buckets live in up to 64 shards, each behind its own lock; a tenant's and a
//! model's bucket are found by hashing their names (with a per-process random key, so a
//! client cannot aim every name at one shard). A call whose two buckets sit in two
//! shards locks both, lower index first, so the all-or-nothing decision stays atomic.
//!
//! Memory is bounded: each shard keeps at most `ceil(max_keys / shards)` buckets per
//! scope (tenant, model), so fewer than `max_keys + 64` in all. When a new key arrives
//! at a full shard, that shard is cut in bulk to 3/4 of its cap: the buckets that have
//! refilled to full go first (a full bucket and no bucket mean the same thing), then
//! the least recently used, which forgives those keys their debt when they come back
//! (lenient, never stricter than configured). Cutting a quarter at a time makes the
//! O(cap) pass O(1) amortised per new key: a client rotating tenant header values pays
//! a few hash operations per call, not a scan of every bucket.
//!
//! Streams have a token rate too (`per_tenant_tokens`, `tenant_tokens`): each
//! `ModelStreamInfer` response sent to a tenant takes one token from its stream token
//! bucket, which may go into debt, since a generation already running should not be
//! cut at the first token over. A tenant in debt (less than one token) opens no new
//! stream; a stream that takes the debt past `burst` is ended. Both answer
//! RESOURCE_EXHAUSTED naming the tenant, `tokens_per_second` and the burst, with the
//! time until a token is back. These buckets are kept in this process only.
//!
//! The [`RateLimiter`] trait is the seam for a limiter shared between gateway
//! replicas; [`LocalRateLimiter`] limits per process.
//!
//! ```ignore
//! let limiter = LocalRateLimiter::new(cfg)?;
//! limiter.check(&RateKey::new("blue", "simple"), Instant::now())?; // Err: RESOURCE_EXHAUSTED
//! ```

use crate::config::{Bucket, RateLimitConfig, Scope};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// What a call is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateKey {
    /// The tenant (from auth; empty for anonymous callers).
    pub tenant: String,
    /// The model called.
    pub model: String,
}

impl RateKey {
    /// A key for `tenant` calling `model`.
    pub fn new(tenant: impl Into<String>, model: impl Into<String>) -> Self {
        RateKey {
            tenant: tenant.into(),
            model: model.into(),
        }
    }
}

/// Decides whether a call may start now. Implementations must be cheap: this runs on
/// every call, before any I/O.
pub trait RateLimiter: Send + Sync {
    /// Ok to let the call through (the tokens are taken), or which limit refused it.
    fn check(&self, key: &RateKey, now: Instant) -> Result<(), Limited>;

    /// Whether `tenant` may open a stream now: refused while its stream token bucket
    /// holds less than one token (it is in debt). No token limit: always.
    fn stream_open(&self, _tenant: &str, _now: Instant) -> Result<(), Limited> {
        Ok(())
    }

    /// Counts `responses` stream responses sent to `tenant` (one token each; the bucket
    /// may go into debt). Err once the debt is past the burst: the stream is ended.
    fn stream_sent(&self, _tenant: &str, _responses: u32, _now: Instant) -> Result<(), Limited> {
        Ok(())
    }
}

/// Which bucket ran dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The caller's tenant bucket.
    Tenant,
    /// The model's bucket, shared by all tenants.
    Model,
    /// The tenant's stream token bucket (`tokens_per_second`).
    TenantTokens,
}

impl RateScope {
    /// `tenant` or `model`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateScope::Tenant => "tenant",
            RateScope::Model => "model",
            RateScope::TenantTokens => "tenant_tokens",
        }
    }
}

/// A call refused by a rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// Which bucket ran dry.
    pub scope: RateScope,
    /// The tenant or model name.
    pub key: String,
    /// The bucket's rate, tokens per second.
    pub rate: f64,
    /// The bucket's burst.
    pub burst: u32,
    /// When the bucket will have a token again.
    pub retry_after: Duration,
}

impl Limited {
    /// The gRPC status code to answer with.
    pub fn code(&self) -> tonic::Code {
        tonic::Code::ResourceExhausted
    }

    /// The suggested back-off (same as `retry_after`).
    pub fn pushback(&self) -> Duration {
        self.retry_after
    }

    /// The message for the caller, naming the limit and the back-off.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scope == RateScope::TenantTokens {
            return write!(
                f,
                "tenant {}: stream token limit tokens_per_second {} (burst {}) exceeded; retry in {} ms",
                infergate_base::text::shown(&self.key),
                self.rate,
                self.burst,
                self.retry_after.as_nanos().div_ceil(1_000_000)
            );
        }
        write!(
            f,
            "{} {}: rate limit {}/s (burst {}) exceeded; retry in {} ms",
            self.scope.as_str(),
            infergate_base::text::shown(&self.key),
            self.rate,
            self.burst,
            self.retry_after.as_nanos().div_ceil(1_000_000)
        )
    }
}

impl std::error::Error for Limited {}

/// Token buckets in this process, in shards: each tenant and each model hashes to one
/// shard, locked on its own, so calls of different tenants rarely wait on each other.
#[derive(Debug)]
pub struct LocalRateLimiter {
    cfg: RwLock<Arc<RateLimitConfig>>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

/// Most shards a limiter has (fewer when `max_keys` is small, so that each shard's cap
/// is not rounded up to far more buckets than configured).
const MAX_SHARDS: usize = 64;

#[derive(Debug, Default)]
struct Shard {
    tenants: Buckets,
    models: Buckets,
    /// Stream token buckets, by tenant.
    tokens: Buckets,
}

#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<String, TokenBucket>,
}

#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
    /// When the bucket will be full again if untouched (for eviction).
    full_at: Instant,
}

impl TokenBucket {
    fn full(limit: &Bucket, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(limit.burst),
            last: now,
            full_at: now,
        }
    }

    /// Adds the tokens earned since the last touch. Time never runs backwards here:
    /// an instant taken before the last touch (another thread's) earns nothing.
    fn refill(&mut self, limit: &Bucket, now: Instant) {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * limit.rate_per_second;
        let burst = f64::from(limit.burst);
        if earned.is_finite() {
            self.tokens = (self.tokens + earned).min(burst);
        }
        self.tokens = self.tokens.min(burst);
        self.last = self.last.max(now);
    }

    fn take(&mut self, limit: &Bucket) {
        self.take_n(limit, 1);
    }

    /// Takes `n` tokens, into debt if need be.
    fn take_n(&mut self, limit: &Bucket, n: u32) {
        self.tokens -= f64::from(n);
        let missing = f64::from(limit.burst) - self.tokens;
        self.full_at = self.last + secs(missing / limit.rate_per_second);
    }

    fn retry_after(&self, limit: &Bucket) -> Duration {
        secs((1.0 - self.tokens) / limit.rate_per_second)
    }
}

/// Seconds as a Duration; anything not representable (rate 0, NaN) is "very long".
fn secs(s: f64) -> Duration {
    if s <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

impl Buckets {
    /// The bucket of `key`, refilled to `now`; created full when new, making room
    /// under `cap` first.
    fn refilled(
        &mut self,
        key: &str,
        limit: &Bucket,
        now: Instant,
        cap: usize,
    ) -> Option<&mut TokenBucket> {
        if !self.map.contains_key(key) {
            if self.map.len() >= cap {
                self.evict(now, cap);
            }
            self.map
                .insert(key.to_owned(), TokenBucket::full(limit, now));
        }
        let bucket = self.map.get_mut(key)?;
        bucket.refill(limit, now);
        Some(bucket)
    }

    /// Makes room in bulk, down to 3/4 of `cap`, so that the O(cap) work here is paid
    /// once per `cap / 4` new keys (O(1) amortised per call): full buckets first (a full
    /// bucket and no bucket mean the same thing), then the least recently used.
    fn evict(&mut self, now: Instant, cap: usize) {
        let keep = cap - cap.div_ceil(4);
        self.map.retain(|_, b| b.full_at > now);
        let excess = self.map.len().saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut lasts: Vec<Instant> = self.map.values().map(|b| b.last).collect();
        let (_, cutoff, _) = lasts.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        let mut dropped = 0;
        self.map.retain(|_, b| {
            let drop = dropped < excess && b.last <= cutoff;
            dropped += usize::from(drop);
            !drop
        });
    }
}

/// A bucket to check: where it is kept, its name and its limits.
struct Check<'a> {
    scope: RateScope,
    buckets: &'a mut Buckets,
    name: &'a str,
    limit: Bucket,
}

impl Check<'_> {
    /// The refusal of this bucket, when it has no whole token now.
    fn refusal(&mut self, now: Instant, cap: usize) -> Option<Limited> {
        let bucket = self.buckets.refilled(self.name, &self.limit, now, cap)?;
        (bucket.tokens < 1.0).then(|| Limited {
            scope: self.scope,
            key: self.name.to_owned(),
            rate: self.limit.rate_per_second,
            burst: self.limit.burst,
            retry_after: bucket.retry_after(&self.limit),
        })
    }

    fn take(&mut self) {
        if let Some(b) = self.buckets.map.get_mut(self.name) {
            b.take(&self.limit);
        }
    }
}

/// Both buckets must have a token, or neither is spent; a refusal names the bucket that
/// takes longer to refill.
fn decide(mut checks: [Option<Check<'_>>; 2], now: Instant, cap: usize) -> Result<(), Limited> {
    let mut refused: Option<Limited> = None;
    for check in checks.iter_mut().flatten() {
        if let Some(r) = check.refusal(now, cap) {
            if refused
                .as_ref()
                .is_none_or(|old| r.retry_after > old.retry_after)
            {
                refused = Some(r);
            }
        }
    }
    if let Some(limited) = refused {
        return Err(limited);
    }
    for check in checks.iter_mut().flatten() {
        check.take();
    }
    Ok(())
}

impl LocalRateLimiter {
    /// A limiter with `cfg`, which is validated.
    pub fn new(cfg: RateLimitConfig) -> Result<Self, String> {
        cfg.validate()
            .map_err(|e| e.under("rate_limit").to_string())?;
        let shards = (cfg.max_keys / MAX_SHARDS)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        Ok(LocalRateLimiter {
            cfg: RwLock::new(Arc::new(cfg)),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        })
    }

    /// Replaces the limits at run time. Buckets keep their tokens (cut to a smaller
    /// burst on their next check) and refill at the new rates from now on.
    pub fn set_config(&self, cfg: RateLimitConfig) -> Result<(), String> {
        cfg.validate()
            .map_err(|e| e.under("rate_limit").to_string())?;
        *self.cfg.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(cfg);
        Ok(())
    }

    /// The limits in force.
    pub fn config(&self) -> RateLimitConfig {
        RateLimitConfig::clone(&self.current())
    }

    /// Buckets held now: (tenants, models). At most `max_keys` rounded up to a whole
    /// number per shard, so under `max_keys + 64` for each.
    pub fn bucket_counts(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(t, m), shard| {
            let shard = lock(shard);
            (t + shard.tenants.map.len(), m + shard.models.map.len())
        })
    }

    fn current(&self) -> Arc<RateLimitConfig> {
        Arc::clone(&self.cfg.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn shard_of(&self, name: &str) -> usize {
        // The shard count is a power of two; the high bits are the best mixed.
        let hash = self.hasher.hash_one(name);
        (hash >> 32) as usize & (self.shards.len() - 1)
    }
}

// Every update under a shard's lock is a few plain writes; a poisoned lock is still
// consistent enough to go on limiting.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RateLimiter for LocalRateLimiter {
    fn check(&self, key: &RateKey, now: Instant) -> Result<(), Limited> {
        let cfg = self.current();
        // Global limits are the shared limiter's (`global_limit`); this one keeps the rest.
        let (tenant_limit, model_limit) = cfg.buckets(&key.tenant, Scope::Local);
        let cap = cfg.max_keys.max(1).div_ceil(self.shards.len());
        let tenant = tenant_limit.map(|l| (self.shard_of(&key.tenant), l));
        let model = model_limit.map(|l| (self.shard_of(&key.model), l));
        let check = |scope, buckets, name, limit| {
            Some(Check {
                scope,
                buckets,
                name,
                limit,
            })
        };
        match (tenant, model) {
            (None, None) => Ok(()),
            (Some((i, tl)), None) => {
                let mut s = lock(&self.shards[i]);
                let t = check(RateScope::Tenant, &mut s.tenants, &key.tenant, tl);
                decide([t, None], now, cap)
            }
            (None, Some((j, ml))) => {
                let mut s = lock(&self.shards[j]);
                let m = check(RateScope::Model, &mut s.models, &key.model, ml);
                decide([None, m], now, cap)
            }
            (Some((i, tl)), Some((j, ml))) if i == j => {
                let mut guard = lock(&self.shards[i]);
                let s = &mut *guard;
                let t = check(RateScope::Tenant, &mut s.tenants, &key.tenant, tl);
                let m = check(RateScope::Model, &mut s.models, &key.model, ml);
                decide([t, m], now, cap)
            }
            (Some((i, tl)), Some((j, ml))) => {
                // Two shards, always locked lower index first: no deadlock.
                let (mut first, mut second) =
                    (lock(&self.shards[i.min(j)]), lock(&self.shards[i.max(j)]));
                let (ts, ms) = if i < j {
                    (&mut *first, &mut *second)
                } else {
                    (&mut *second, &mut *first)
                };
                let t = check(RateScope::Tenant, &mut ts.tenants, &key.tenant, tl);
                let m = check(RateScope::Model, &mut ms.models, &key.model, ml);
                decide([t, m], now, cap)
            }
        }
    }

    fn stream_open(&self, tenant: &str, now: Instant) -> Result<(), Limited> {
        self.with_tokens(tenant, now, |bucket, limit| {
            (bucket.tokens < 1.0).then(|| bucket.retry_after(limit))
        })
    }

    fn stream_sent(&self, tenant: &str, responses: u32, now: Instant) -> Result<(), Limited> {
        self.with_tokens(tenant, now, |bucket, limit| {
            bucket.take_n(limit, responses);
            (bucket.tokens < -f64::from(limit.burst)).then(|| bucket.retry_after(limit))
        })
    }
}

impl LocalRateLimiter {
    /// Runs `refuse` on the tenant's stream token bucket (refilled to `now`): Some(retry
    /// after) refuses. Nothing to do for a tenant without a token rate.
    fn with_tokens(
        &self,
        tenant: &str,
        now: Instant,
        refuse: impl FnOnce(&mut TokenBucket, &Bucket) -> Option<Duration>,
    ) -> Result<(), Limited> {
        let cfg = self.current();
        let Some(rate) = cfg.token_rate(tenant) else {
            return Ok(());
        };
        let limit = rate.bucket();
        let cap = cfg.max_keys.max(1).div_ceil(self.shards.len());
        let mut shard = lock(&self.shards[self.shard_of(tenant)]);
        let Some(bucket) = shard.tokens.refilled(tenant, &limit, now, cap) else {
            return Ok(());
        };
        match refuse(bucket, &limit) {
            None => Ok(()),
            Some(retry_after) => Err(Limited {
                scope: RateScope::TenantTokens,
                key: tenant.to_owned(),
                rate: rate.tokens_per_second,
                burst: rate.burst,
                retry_after,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limiter(cfg: RateLimitConfig) -> LocalRateLimiter {
        LocalRateLimiter::new(cfg).expect("valid config")
    }

    fn bucket(rate_per_second: f64, burst: u32) -> Bucket {
        Bucket {
            rate_per_second,
            burst,
            scope: crate::config::Scope::Local,
        }
    }

    fn admitted(l: &LocalRateLimiter, key: &RateKey, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| l.check(key, now).is_ok()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(5.0, 10)),
            ..Default::default()
        });
        let key = RateKey::new("blue", "simple");
        let t0 = Instant::now();
        assert_eq!(admitted(&l, &key, t0, 20), 10);
        let err = l.check(&key, Instant::now()).expect_err("empty");
        assert_eq!(err.scope, RateScope::Tenant);
        assert_eq!(err.retry_after, ms(200));
        assert_eq!(
            err.message(),
            "tenant blue: rate limit 5/s (burst 10) exceeded; retry in 200 ms"
        );
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // 100 ms earns half a token: still refused, 100 ms to go.
        tokio::time::advance(ms(100)).await;
        let err = l.check(&key, Instant::now()).expect_err("half a token");
        assert_eq!(err.retry_after, ms(100));
        tokio::time::advance(ms(100)).await;
        assert_eq!(admitted(&l, &key, Instant::now(), 5), 1);
        // A long pause refills to the burst, no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(admitted(&l, &key, Instant::now(), 20), 10);
        // An instant from before the last check earns nothing.
        assert!(l.check(&key, t0).is_err());
    }

    #[test]
    fn per_model_limit_is_shared_by_tenants() {
        let l = limiter(RateLimitConfig {
            per_model: Some(bucket(1.0, 2)),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert!(l.check(&RateKey::new("a", "simple"), t0).is_ok());
        assert!(l.check(&RateKey::new("b", "simple"), t0).is_ok());
        let err = l
            .check(&RateKey::new("c", "simple"), t0)
            .expect_err("model empty");
        assert_eq!((err.scope, err.key.as_str()), (RateScope::Model, "simple"));
        assert_eq!(err.retry_after, Duration::from_secs(1));
        assert!(err
            .message()
            .starts_with("model simple: rate limit 1/s (burst 2)"));
        // Another model has its own bucket.
        assert!(l.check(&RateKey::new("c", "other"), t0).is_ok());
        assert!(l.check(&RateKey::new("c", "simple"), t0 + ms(1000)).is_ok());
    }

    #[test]
    fn tenant_override_replaces_the_default() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 2)),
            tenants: BTreeMap::from([
                ("gold".to_owned(), bucket(100.0, 50)),
                ("free".to_owned(), bucket(0.5, 1)),
            ]),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(admitted(&l, &RateKey::new("gold", "m"), t0, 100), 50);
        assert_eq!(admitted(&l, &RateKey::new("blue", "m"), t0, 100), 2);
        assert_eq!(admitted(&l, &RateKey::new("free", "m"), t0, 100), 1);
        let err = l.check(&RateKey::new("free", "m"), t0).expect_err("free");
        assert_eq!(err.retry_after, Duration::from_secs(2));
        assert_eq!(
            err.message(),
            "tenant free: rate limit 0.5/s (burst 1) exceeded; retry in 2000 ms"
        );
        // Only overrides configured: other tenants are not limited.
        let l = limiter(RateLimitConfig {
            tenants: BTreeMap::from([("free".to_owned(), bucket(1.0, 1))]),
            ..Default::default()
        });
        assert!(l.config().is_enabled());
        assert_eq!(admitted(&l, &RateKey::new("blue", "m"), t0, 100), 100);
        assert_eq!(admitted(&l, &RateKey::new("free", "m"), t0, 100), 1);
    }

    #[test]
    fn both_buckets_need_a_token_and_neither_is_spent_alone() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 5)),
            per_model: Some(bucket(1.0, 1)),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert!(l.check(&RateKey::new("a", "m1"), t0).is_ok());
        for _ in 0..10 {
            let err = l.check(&RateKey::new("a", "m1"), t0).expect_err("model");
            assert_eq!(err.scope, RateScope::Model);
        }
        // The refusals took nothing from tenant a: 4 tokens left for other models.
        for m in ["m2", "m3", "m4", "m5"] {
            assert!(l.check(&RateKey::new("a", m), t0).is_ok(), "{m}");
        }
        let err = l.check(&RateKey::new("a", "m6"), t0).expect_err("tenant");
        assert_eq!(err.scope, RateScope::Tenant);
    }

    #[test]
    fn retry_after_names_the_slower_bucket() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(4.0, 1)),
            per_model: Some(bucket(2.0, 1)),
            ..Default::default()
        });
        let t0 = Instant::now();
        let key = RateKey::new("a", "m");
        assert!(l.check(&key, t0).is_ok());
        let err = l.check(&key, t0).expect_err("both empty");
        assert_eq!((err.scope, err.retry_after), (RateScope::Model, ms(500)));
        let err = l.check(&key, t0 + ms(300)).expect_err("model still empty");
        assert_eq!((err.scope, err.retry_after), (RateScope::Model, ms(200)));
        assert!(l.check(&key, t0 + ms(500)).is_ok());
    }

    #[test]
    fn buckets_stay_bounded() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 2)),
            max_keys: 3,
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(l.check(&RateKey::new(format!("t{i}"), "m"), t0).is_ok());
            assert!(l.bucket_counts().0 <= 3);
        }
        // Full buckets go first: t7..t9 are not full, but after 2 s all are.
        let later = t0 + Duration::from_secs(2);
        assert!(l.check(&RateKey::new("new", "m"), later).is_ok());
        assert_eq!(l.bucket_counts(), (1, 0));
    }

    #[test]
    fn fifty_thousand_rotating_tenants_stay_under_the_bound() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 5)),
            per_model: Some(bucket(1e6, 1_000_000)),
            ..Default::default()
        });
        let max_keys = l.config().max_keys;
        let t0 = Instant::now();
        let mut most = 0;
        for i in 0..50_000u64 {
            // Slow refill: no bucket is full again when its shard reaches its cap.
            let now = t0 + Duration::from_micros(i);
            let key = RateKey::new(format!("rotating-{i}"), "m");
            assert!(l.check(&key, now).is_ok(), "a new tenant starts full");
            most = most.max(l.bucket_counts().0);
        }
        // Each of the 64 shards holds at most ceil(10000 / 64) = 157 tenants.
        assert!(most <= 64 * max_keys.div_ceil(64), "{most} buckets");
        assert!(most < max_keys + 64);
        assert_eq!(l.bucket_counts().1, 1);
        // The most recent tenants keep their buckets (and their spent token).
        let recent = RateKey::new("rotating-49999", "m");
        let later = t0 + Duration::from_micros(50_000);
        assert_eq!(admitted(&l, &recent, later, 10), 4);
    }

    #[test]
    fn all_or_nothing_holds_across_shards() {
        // 40 tenants and 40 models: some pairs share a shard, most do not.
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 1)),
            per_model: Some(bucket(1.0, 1)),
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..40 {
            let (tenant, model) = (format!("t{i}"), format!("m{i}"));
            assert!(l.check(&RateKey::new(&*tenant, &*model), t0).is_ok());
            // The model is spent: a fresh tenant is refused and keeps its token...
            let fresh = format!("fresh{i}");
            let err = l
                .check(&RateKey::new(&*fresh, &*model), t0)
                .expect_err("model spent");
            assert_eq!(err.scope, RateScope::Model);
            // ...which it can spend on a fresh model.
            assert!(l.check(&RateKey::new(&*fresh, format!("n{i}")), t0).is_ok());
        }
        assert_eq!(l.bucket_counts(), (80, 80));
    }

    #[test]
    fn eviction_cuts_a_full_shard_to_three_quarters() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 2)),
            max_keys: 8,
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..8u64 {
            let now = t0 + Duration::from_millis(i);
            assert!(l.check(&RateKey::new(format!("t{i}"), "m"), now).is_ok());
        }
        assert_eq!(l.bucket_counts().0, 8);
        // The ninth key makes room for 2 more before the next cut: the 2 oldest go.
        let now = t0 + Duration::from_millis(8);
        assert!(l.check(&RateKey::new("t8", "m"), now).is_ok());
        assert_eq!(l.bucket_counts().0, 7);
        // t2 kept its spent token; t0 was forgiven (a fresh, full bucket).
        assert_eq!(admitted(&l, &RateKey::new("t2", "m"), now, 5), 1);
        assert_eq!(admitted(&l, &RateKey::new("t0", "m"), now, 5), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn stream_tokens_go_into_debt_then_refuse_and_end() {
        let l = limiter(RateLimitConfig {
            per_tenant_tokens: Some(crate::config::TokenRate {
                tokens_per_second: 2.0,
                burst: 4,
            }),
            tenant_tokens: BTreeMap::from([(
                "free".to_owned(),
                crate::config::TokenRate {
                    tokens_per_second: 1.0,
                    burst: 1,
                },
            )]),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert!(l.config().is_enabled());
        assert!(l.stream_open("a", t0).is_ok());
        // 4 in the bucket, then 4 more of debt are allowed; the 9th response ends it.
        assert!(l.stream_sent("a", 3, t0).is_ok());
        assert!(l.stream_open("a", t0).is_ok(), "one token left");
        assert!(l.stream_sent("a", 5, t0).is_ok(), "debt of 4 = burst");
        let refused = l.stream_open("a", t0).expect_err("in debt");
        assert_eq!(refused.scope, RateScope::TenantTokens);
        assert_eq!(refused.retry_after, Duration::from_millis(2500));
        assert_eq!(
            refused.message(),
            "tenant a: stream token limit tokens_per_second 2 (burst 4) exceeded; retry in 2500 ms"
        );
        let ended = l.stream_sent("a", 1, t0).expect_err("past the burst");
        assert_eq!(ended.scope, RateScope::TenantTokens);
        // The debt is paid back at the rate: 3 s later, one token again.
        let later = t0 + Duration::from_secs(3);
        assert!(l.stream_open("a", later).is_ok());
        // Other tenants, and named overrides, have their own buckets; calls are not
        // limited by token rates.
        assert!(l.stream_open("b", t0).is_ok());
        assert!(l.stream_sent("free", 2, t0).is_ok());
        assert!(l.stream_open("free", t0).is_err());
        assert!(l.check(&RateKey::new("a", "m"), t0).is_ok());
        let bad = RateLimitConfig {
            per_tenant_tokens: Some(crate::config::TokenRate {
                tokens_per_second: 0.0,
                burst: 1,
            }),
            ..Default::default()
        };
        let err = bad
            .validate()
            .expect_err("rate 0")
            .under("rate_limit")
            .to_string();
        assert!(
            err.contains("rate_limit.per_tenant_tokens.tokens_per_second"),
            "{err}"
        );
    }

    #[test]
    fn set_config_applies_new_rates() {
        let l = limiter(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 10)),
            ..Default::default()
        });
        let key = RateKey::new("a", "m");
        let t0 = Instant::now();
        assert!(l.check(&key, t0).is_ok());
        l.set_config(RateLimitConfig {
            per_tenant: Some(bucket(1.0, 2)),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(admitted(&l, &key, t0, 10), 2);
        assert!(l
            .set_config(RateLimitConfig {
                max_keys: 0,
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        let cfg: RateLimitConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(cfg, RateLimitConfig::default());
        assert!(!cfg.is_enabled());
        let cfg: RateLimitConfig =
            serde_json::from_str(r#"{"per_tenant": {"rate_per_second": 5}}"#).expect("partial");
        assert_eq!(cfg.per_tenant, Some(bucket(5.0, 20)));
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"per_tenant": {"rate": 5}}"#).is_err());
        let bad = |cfg: RateLimitConfig, field: &str| {
            let err = cfg
                .validate()
                .expect_err("invalid")
                .under("rate_limit")
                .to_string();
            assert!(err.contains(field), "{err}");
            assert!(LocalRateLimiter::new(cfg).is_err());
        };
        bad(
            RateLimitConfig {
                per_tenant: Some(bucket(0.0, 1)),
                ..Default::default()
            },
            "rate_limit.per_tenant.rate_per_second",
        );
        bad(
            RateLimitConfig {
                per_model: Some(bucket(f64::INFINITY, 1)),
                ..Default::default()
            },
            "rate_limit.per_model.rate_per_second",
        );
        bad(
            RateLimitConfig {
                tenants: BTreeMap::from([("blue".to_owned(), bucket(1.0, 0))]),
                ..Default::default()
            },
            "rate_limit.tenants.blue.burst",
        );
        bad(
            RateLimitConfig {
                max_keys: 0,
                ..Default::default()
            },
            "rate_limit.max_keys",
        );
    }
}
