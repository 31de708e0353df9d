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
//! Memory is bounded: at most `max_keys` buckets per scope (tenant, model). When a new
//! key arrives at the cap, the buckets that have refilled to full are dropped first
//! (a full bucket and no bucket mean the same thing); if none is full, the least
//! recently used bucket is dropped, which forgives that key its debt when it comes
//! back (lenient, never stricter than configured).
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
use std::sync::{Mutex, MutexGuard, PoisonError};
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
}

/// Which bucket ran dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The caller's tenant bucket.
    Tenant,
    /// The model's bucket, shared by all tenants.
    Model,
}

impl RateScope {
    /// `tenant` or `model`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateScope::Tenant => "tenant",
            RateScope::Model => "model",
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
        write!(
            f,
            "{} {}: rate limit {}/s (burst {}) exceeded; retry in {} ms",
            self.scope.as_str(),
            crate::wire::shown(&self.key),
            self.rate,
            self.burst,
            self.retry_after.as_nanos().div_ceil(1_000_000)
        )
    }
}

impl std::error::Error for Limited {}

/// Token buckets in this process.
#[derive(Debug)]
pub struct LocalRateLimiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    cfg: RateLimitConfig,
    tenants: Buckets,
    models: Buckets,
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
        self.tokens -= 1.0;
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

    /// Drops full buckets; if that frees nothing, the least recently used ones.
    fn evict(&mut self, now: Instant, cap: usize) {
        self.map.retain(|_, b| b.full_at > now);
        while self.map.len() >= cap {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.map.remove(&oldest);
        }
    }
}

impl LocalRateLimiter {
    /// A limiter with `cfg`, which is validated.
    pub fn new(cfg: RateLimitConfig) -> Result<Self, String> {
        cfg.validate()
            .map_err(|e| e.under("rate_limit").to_string())?;
        Ok(LocalRateLimiter {
            state: Mutex::new(State {
                cfg,
                tenants: Buckets::default(),
                models: Buckets::default(),
            }),
        })
    }

    /// Replaces the limits at run time. Buckets keep their tokens (cut to a smaller
    /// burst on their next check) and refill at the new rates from now on.
    pub fn set_config(&self, cfg: RateLimitConfig) -> Result<(), String> {
        cfg.validate()
            .map_err(|e| e.under("rate_limit").to_string())?;
        self.lock().cfg = cfg;
        Ok(())
    }

    /// The limits in force.
    pub fn config(&self) -> RateLimitConfig {
        self.lock().cfg.clone()
    }

    /// Buckets held now: (tenants, models).
    pub fn bucket_counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.tenants.map.len(), st.models.map.len())
    }

    // Every update under the lock is a few plain writes; a poisoned lock is still
    // consistent enough to go on limiting.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RateLimiter for LocalRateLimiter {
    fn check(&self, key: &RateKey, now: Instant) -> Result<(), Limited> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let cap = st.cfg.max_keys.max(1);
        // Global limits are the shared limiter's (`global_limit`); this one keeps the rest.
        let (tenant_limit, model_limit) = st.cfg.buckets(&key.tenant, Scope::Local);

        let mut refused: Option<Limited> = None;
        let mut refuse = |scope: RateScope, name: &str, limit: &Bucket, bucket: &TokenBucket| {
            if bucket.tokens >= 1.0 {
                return;
            }
            let retry_after = bucket.retry_after(limit);
            // Both must have a token: report the one that takes longer to refill.
            if refused.as_ref().is_none_or(|r| retry_after > r.retry_after) {
                refused = Some(Limited {
                    scope,
                    key: name.to_owned(),
                    rate: limit.rate_per_second,
                    burst: limit.burst,
                    retry_after,
                });
            }
        };
        if let Some(limit) = &tenant_limit {
            if let Some(bucket) = st.tenants.refilled(&key.tenant, limit, now, cap) {
                refuse(RateScope::Tenant, &key.tenant, limit, bucket);
            }
        }
        if let Some(limit) = &model_limit {
            if let Some(bucket) = st.models.refilled(&key.model, limit, now, cap) {
                refuse(RateScope::Model, &key.model, limit, bucket);
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        if let Some(limit) = &tenant_limit {
            if let Some(b) = st.tenants.map.get_mut(&key.tenant) {
                b.take(limit);
            }
        }
        if let Some(limit) = &model_limit {
            if let Some(b) = st.models.map.get_mut(&key.model) {
                b.take(limit);
            }
        }
        Ok(())
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
