//! Global rate limits: token buckets that every gateway replica shares, kept in Redis.
//! Sits in the request path right after the local limits (`ratelimit`), for the limits
//! configured with `scope = "global"`.
//!
//! Why Redis and why this shape: replicas stay stateless (any one can die or scale out),
//! and one decision is one round trip: a Lua script ([`SCRIPT`]) checks the tenant's and
//! the model's buckets together and takes from both or from neither, atomically, with
//! Redis's own clock (`TIME`), so replicas whose clocks drift still agree.
//!
//! The buckets are GCRA (the generic cell rate algorithm): each key holds one number,
//! the theoretical arrival time of the next call (TAT, µs). A call at `now` is admitted
//! when `max(TAT, now) + interval - now <= burst × interval`, and then moves TAT by one
//! interval. That is a token bucket of `burst` tokens refilling at `rate`, stored in one
//! integer per key instead of two (tokens, last refill), so the script reads one value
//! per key, and a key expires by itself once its TAT is past (`PX`): an idle tenant
//! leaves nothing behind.
//!
//! When Redis does not answer within `[redis] timeout_ms` (or the connection is down),
//! the decision follows `on_redis_error`: `local` (the default) limits in this process at
//! `rate / replicas_hint`, `allow` lets the call through, `deny` refuses it. Entering and
//! leaving that fallback is published once each (an admin event, `infergate_events_total`)
//! and shown by the `infergate_rate_limit_store_up` gauge. The connection is re-made in
//! the background with backoff (redis' `ConnectionManager`); no call waits for it.

use crate::config::{Bucket, OnRedisError, RateLimitConfig, RedisConfig, Scope};
use crate::events::EventBus;
use crate::ratelimit::{Limited, LocalRateLimiter, RateKey, RateLimiter, RateScope};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;
use tokio::time::Instant;

/// The decision, atomic in Redis. KEYS: one or two bucket keys. ARGV: for each key its
/// interval and its capacity (interval × burst), in µs. Returns `{1, 0, 0}` when the
/// call is admitted (both keys moved), or `{0, retry_after_ms, i}` naming the key `i`
/// that takes longest to admit one more call (neither moved).
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next_tat = {}
local wait, which = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new = tat + interval
  local over = new - now - capacity
  if over > wait then wait, which = over, i end
  next_tat[i] = new
end
if which > 0 then
  return {0, math.ceil(wait / 1000), which}
end
for i = 1, #KEYS do
  local ttl = math.ceil((next_tat[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', next_tat[i]), 'PX', ttl)
end
return {1, 0, 0}
"#;

/// A managed connection to the Redis `redis` names: multiplexed, made on first use and
/// re-made in the background with backoff, so no caller waits for a reconnect.
pub fn connect(redis: &RedisConfig) -> Result<ConnectionManager, String> {
    let url = redis
        .url
        .as_deref()
        .ok_or("redis.url: global rate limits and shared caches need a Redis")?;
    let client = redis::Client::open(url).map_err(|e| format!("redis.url `{url}`: {e}"))?;
    let timeout = Duration::from_millis(redis.timeout_ms);
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(timeout.max(Duration::from_millis(50))))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("redis.url `{url}`: {e}"))
}

/// The shared limiter of one gateway.
pub struct GlobalLimiter {
    connection: ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    policy: OnRedisError,
    limits: RwLock<RateLimitConfig>,
    /// The local stand-in while Redis is away (`on_redis_error = "local"`).
    fallback: LocalRateLimiter,
    store_up: AtomicBool,
    /// Decisions made without Redis (by `on_redis_error`).
    without_store: AtomicU64,
    events: EventBus,
}

impl std::fmt::Debug for GlobalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimiter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A decision made by the store, or why there was none.
enum Decision {
    Admitted,
    Refused(Limited),
    NoAnswer(String),
}

impl GlobalLimiter {
    /// A limiter over the global limits of `limits`, in the store `redis` names. Does
    /// not connect yet: the first decision does, and until then the fallback applies.
    pub fn new(
        limits: &RateLimitConfig,
        redis: &RedisConfig,
        events: EventBus,
    ) -> Result<GlobalLimiter, String> {
        let connection = connect(redis)?;
        let timeout = Duration::from_millis(redis.timeout_ms);
        let fallback = LocalRateLimiter::new(limits.global_as_local(redis.replicas_hint))?;
        Ok(GlobalLimiter {
            connection,
            script: redis::Script::new(SCRIPT),
            prefix: redis.key_prefix.clone(),
            timeout,
            policy: redis.on_redis_error,
            limits: RwLock::new(limits.clone()),
            fallback,
            store_up: AtomicBool::new(true),
            without_store: AtomicU64::new(0),
            events,
        })
    }

    /// The managed connection (multiplexed, re-made in the background), for other
    /// users of the same Redis (the shared response cache).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Decisions made so far without an answer from Redis.
    pub fn decisions_without_store(&self) -> u64 {
        self.without_store.load(Ordering::Relaxed)
    }

    /// Whether the last decision reached Redis.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// Ok to let the call through, or which global limit refused it. Never waits longer
    /// than `[redis] timeout_ms`.
    pub async fn check(&self, key: &RateKey) -> Result<(), Limited> {
        let (tenant, model) = match self.limits.read() {
            Ok(l) => l.buckets(&key.tenant, Scope::Global),
            Err(_) => return Ok(()),
        };
        let mut buckets: Vec<(RateScope, &str, Bucket)> = Vec::with_capacity(2);
        if let Some(b) = tenant {
            buckets.push((RateScope::Tenant, &key.tenant, b));
        }
        if let Some(b) = model {
            buckets.push((RateScope::Model, &key.model, b));
        }
        if buckets.is_empty() {
            return Ok(());
        }
        match self.decide(&buckets).await {
            Decision::Admitted => {
                self.mark(true, "");
                Ok(())
            }
            Decision::Refused(limited) => {
                self.mark(true, "");
                Err(limited)
            }
            Decision::NoAnswer(why) => {
                self.mark(false, &why);
                self.without_store.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("infergate_rate_limit_store_fallbacks_total").increment(1);
                match self.policy {
                    OnRedisError::Allow => Ok(()),
                    OnRedisError::Local => self.fallback.check(key, Instant::now()),
                    OnRedisError::Deny => Err(Limited {
                        scope: buckets[0].0,
                        key: buckets[0].1.to_owned(),
                        rate: buckets[0].2.rate_per_second,
                        burst: buckets[0].2.burst,
                        retry_after: Duration::from_secs(1),
                    }),
                }
            }
        }
    }

    async fn decide(&self, buckets: &[(RateScope, &str, Bucket)]) -> Decision {
        let mut invocation = self.script.prepare_invoke();
        for (scope, name, bucket) in buckets {
            let interval_us = (1e6 / bucket.rate_per_second).round().max(1.0) as u64;
            let capacity_us = interval_us.saturating_mul(u64::from(bucket.burst));
            invocation
                .key(format!("{}:{}:{name}", self.prefix, scope.as_str()))
                .arg(interval_us)
                .arg(capacity_us);
        }
        let mut connection = self.connection.clone();
        let answer: Result<redis::RedisResult<(i64, i64, i64)>, _> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection)).await;
        match answer {
            Ok(Ok((1, _, _))) => Decision::Admitted,
            Ok(Ok((_, retry_ms, which))) => {
                let i = usize::try_from(which.max(1) - 1)
                    .unwrap_or(0)
                    .min(buckets.len() - 1);
                let (scope, name, bucket) = buckets[i];
                Decision::Refused(Limited {
                    scope,
                    key: name.to_owned(),
                    rate: bucket.rate_per_second,
                    burst: bucket.burst,
                    retry_after: Duration::from_millis(retry_ms.max(1) as u64),
                })
            }
            Ok(Err(e)) => Decision::NoAnswer(format!("redis error: {e}")),
            Err(_) => Decision::NoAnswer(format!(
                "redis did not answer within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    /// Publishes the store going away or coming back, once per change.
    fn mark(&self, up: bool, why: &str) {
        if self.store_up.swap(up, Ordering::Relaxed) == up {
            return;
        }
        metrics::gauge!("infergate_rate_limit_store_up").set(if up { 1.0 } else { 0.0 });
        let (kind, detail) = if up {
            (
                "rate_limit_store_up",
                "Redis answers again: global limits are shared".to_owned(),
            )
        } else {
            (
                "rate_limit_store_down",
                format!(
                    "{why}; global limits follow on_redis_error = {}",
                    match self.policy {
                        OnRedisError::Local => "local",
                        OnRedisError::Allow => "allow",
                        OnRedisError::Deny => "deny",
                    }
                ),
            )
        };
        self.events.publish(kind, "", "", detail);
    }
}
