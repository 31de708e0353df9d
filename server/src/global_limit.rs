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
//! The lease (`[redis] lease`, `lease_ms`): one script call takes a batch of tokens (up
//! to `lease`, cut to `burst / replicas_hint` of each bucket) and the replica spends the
//! rest of it on the next calls for the same buckets with no round trip ([`Leases`]).
//! A refusal is kept the same way, until the batch would fit (at most `lease_ms`).
//! Tokens unspent after `lease_ms` are given back in the next ask's script call, and a
//! batch whose answer comes after `timeout_ms` is kept in the lease, not lost. See
//! docs/ARCHITECTURE.md for why this stays within the limit.
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
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// The decision, atomic in Redis. KEYS: one or two bucket keys. ARGV: the tokens wanted
/// (the call's own plus those to lease), the leased tokens given back (unspent, their
/// lease run out), then for each key its interval and its capacity (interval × burst),
/// in µs. Given-back tokens move each key's TAT back first (never before `now`: a
/// bucket holds `burst` at most). Returns `{1, taken, wait_us, i}` when the call is
/// admitted (every key moved by `taken` intervals, 1 ≤ taken ≤ wanted: as many as
/// every key has room for; `wait_us` > 0 when another batch would not fit now: how long
/// until it does, limited by key `i`, which is the refusal the replica gives once its
/// batch is spent), or `{0, wait_us, i}` when some key has no room for one: the wait until
/// every key has room for all the tokens wanted, naming the key `i` that takes longest
/// (no key moved but by what was given back). Waiting for a whole batch, not one token,
/// is what makes a replica under overload ask once per batch instead of once per call.
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want = tonumber(ARGV[1])
local take = want
local back = tonumber(ARGV[2])
local tat, interval = {}, {}
local wait, which = 0, 0
for i = 1, #KEYS do
  interval[i] = tonumber(ARGV[2 * i + 1])
  local capacity = tonumber(ARGV[2 * i + 2])
  local v = (tonumber(redis.call('GET', KEYS[i])) or now) - back * interval[i]
  if v < now then v = now end
  tat[i] = v
  local room = math.floor((capacity - (v - now)) / interval[i])
  if room < take then take = room end
  local over = v + want * interval[i] - now - capacity
  if over > wait then wait, which = over, i end
end
if take < 1 then
  if back > 0 then
    for i = 1, #KEYS do
      local ttl = math.ceil((tat[i] - now) / 1000) + 1
      redis.call('SET', KEYS[i], string.format('%.0f', tat[i]), 'PX', ttl)
    end
  end
  return {0, math.ceil(wait), which}
end
wait, which = 0, 0
for i = 1, #KEYS do
  local new = tat[i] + take * interval[i]
  local ttl = math.ceil((new - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
  local over = new + want * interval[i] - now - tonumber(ARGV[2 * i + 2])
  if over > wait then wait, which = over, i end
end
return {1, take, math.ceil(wait), which}
"#;

/// A managed connection to the Redis `redis` names: multiplexed, made on first use and
/// re-made in the background with backoff, so no caller waits for a reconnect.
pub fn connect(redis: &RedisConfig) -> Result<ConnectionManager, String> {
    let url = redis
        .url
        .as_deref()
        .ok_or("redis.url: global rate limits and shared caches need a Redis")?;
    let client = if url.starts_with("rediss://") {
        // TLS through rustls (ring); the system's roots unless redis.ca names a CA, and
        // a client certificate when redis.cert and redis.key name one.
        let read = |field: &str, path: &Option<String>| match path {
            Some(path) => std::fs::read(path)
                .map(Some)
                .map_err(|e| format!("redis.{field} `{path}`: {e}")),
            None => Ok(None),
        };
        let root_cert = read("ca", &redis.ca)?;
        let client_tls = match (read("cert", &redis.cert)?, read("key", &redis.key)?) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            _ => None,
        };
        let certs = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        redis::Client::build_with_tls(url, certs).map_err(|e| {
            format!("redis.url `{url}` (TLS, with redis.ca / redis.cert / redis.key): {e}")
        })?
    } else {
        redis::Client::open(url).map_err(|e| format!("redis.url `{url}`: {e}"))?
    };
    let timeout = Duration::from_millis(redis.timeout_ms);
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        // A decision waits `timeout_ms` only; the connection waits longer, so that an
        // answer that comes late is still read (its leased tokens are kept).
        .set_response_timeout(Some((timeout * 10).max(Duration::from_secs(1))))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("redis.url `{url}`: {e}"))
}

/// The shared limiter of one gateway.
pub struct GlobalLimiter {
    connection: ConnectionManager,
    script: Arc<redis::Script>,
    prefix: String,
    timeout: Duration,
    policy: OnRedisError,
    limits: RwLock<RateLimitConfig>,
    /// Tokens a round trip takes at most (`[redis] lease`), and `replicas_hint`.
    lease: u32,
    replicas: u32,
    /// Leased tokens and refusals kept here (used when `lease > 1`).
    leases: Arc<Leases>,
    /// The local stand-in while Redis is away (`on_redis_error = "local"`).
    fallback: LocalRateLimiter,
    store_up: AtomicBool,
    /// Decisions made without Redis (by `on_redis_error`).
    without_store: AtomicU64,
    /// Script calls made, and decisions answered from a lease: admitted, refused.
    round_trips: AtomicU64,
    lease_admitted: AtomicU64,
    lease_refused: AtomicU64,
    events: EventBus,
}

impl std::fmt::Debug for GlobalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimiter")
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// A decision made by the store, or why there was none.
enum Decision {
    /// Admitted; this many tokens were taken (the call's own included), and the
    /// refusal that holds once they are spent, while another batch would not fit.
    Admitted(u32, Option<(Limited, Duration)>),
    /// Refused, and how long until one more call fits (µs-exact, for the lease).
    Refused(Limited, Duration),
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
            script: Arc::new(redis::Script::new(SCRIPT)),
            prefix: redis.key_prefix.clone(),
            timeout,
            policy: redis.on_redis_error,
            limits: RwLock::new(limits.clone()),
            lease: redis.lease.max(1),
            replicas: redis.replicas_hint.max(1),
            leases: Arc::new(Leases::new(
                Duration::from_millis(redis.lease_ms),
                limits.max_keys,
            )),
            fallback,
            store_up: AtomicBool::new(true),
            without_store: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            lease_admitted: AtomicU64::new(0),
            lease_refused: AtomicU64::new(0),
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

    /// Script calls (round trips to Redis) made so far, answered or not.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Decisions answered from this replica's lease so far, with no round trip: calls
    /// admitted on a leased token, and calls refused while a refusal Redis gave holds.
    pub fn leased_decisions(&self) -> u64 {
        self.leased_admissions() + self.lease_refused.load(Ordering::Relaxed)
    }

    /// Calls admitted on a leased token so far (no round trip).
    pub fn leased_admissions(&self) -> u64 {
        self.lease_admitted.load(Ordering::Relaxed)
    }

    /// Tokens this replica holds in live leases now (taken from Redis, not yet spent).
    pub fn leased_tokens(&self) -> u64 {
        self.leases.tokens(Instant::now())
    }

    /// Whether the last decision reached Redis.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// Ok to let the call through, or which global limit refused it. Never waits longer
    /// than `[redis] timeout_ms`, and makes one round trip at most; none when the
    /// replica's lease holds a token for these buckets (or a refusal still holds).
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
        let want = batch(self.lease, self.replicas, &buckets);
        let lease_key = (want > 1).then(|| Leases::key(&buckets));
        let mut back = 0;
        if let Some(k) = &lease_key {
            match self.leases.take(k, Instant::now()) {
                Local::Admitted => {
                    self.lease_admitted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Local::Refused(limited) => {
                    self.lease_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(limited);
                }
                Local::Ask { give_back } => back = give_back,
            }
        }
        match self
            .decide(&buckets, want, back, lease_key.as_deref())
            .await
        {
            Decision::Admitted(taken, then) => {
                self.mark(true, "");
                if let Some(k) = &lease_key {
                    self.leases.keep(k, taken - 1, then, Instant::now());
                }
                Ok(())
            }
            Decision::Refused(limited, wait) => {
                self.mark(true, "");
                if let Some(k) = &lease_key {
                    self.leases.refuse(k, &limited, wait, Instant::now());
                }
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

    /// One script call, in its own task: when it answers after `timeout_ms` (the call
    /// was decided by `on_redis_error` meanwhile), the tokens it took are not lost but
    /// kept in the lease of `lease_key`, for the next calls.
    async fn decide(
        &self,
        buckets: &[(RateScope, &str, Bucket)],
        want: u32,
        back: u32,
        lease_key: Option<&str>,
    ) -> Decision {
        let mut keys = Vec::with_capacity(buckets.len());
        let mut args = Vec::with_capacity(2 + 2 * buckets.len());
        args.extend([u64::from(want), u64::from(back)]);
        for (scope, name, bucket) in buckets {
            let interval_us = interval_us(bucket);
            keys.push(format!("{}:{}:{name}", self.prefix, scope.as_str()));
            args.extend([
                interval_us,
                interval_us.saturating_mul(u64::from(bucket.burst)),
            ]);
        }
        let (script, mut connection) = (Arc::clone(&self.script), self.connection.clone());
        let mut call = tokio::spawn(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            invocation.invoke_async::<Vec<i64>>(&mut connection).await
        });
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let answer = match tokio::time::timeout(self.timeout, &mut call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => return Decision::NoAnswer(format!("the limit script's task: {e}")),
            Err(elapsed) => {
                if let Some(key) = lease_key {
                    let (leases, key) = (Arc::clone(&self.leases), key.to_owned());
                    tokio::spawn(async move {
                        if let Ok(Ok(v)) = call.await {
                            if let [1, taken, ..] = v.as_slice() {
                                let taken = u32::try_from(*taken).unwrap_or(0).min(want);
                                leases.keep(&key, taken, None, Instant::now());
                            }
                        }
                    });
                }
                Err(elapsed)
            }
        };
        // The refusal of key `which` (1-based) for `wait_us`.
        let refusal = |wait_us: i64, which: i64| {
            let i = usize::try_from(which.max(1) - 1)
                .unwrap_or(0)
                .min(buckets.len() - 1);
            let (scope, name, bucket) = buckets[i];
            let wait = Duration::from_micros(u64::try_from(wait_us.max(1)).unwrap_or(1));
            let limited = Limited {
                scope,
                key: name.to_owned(),
                rate: bucket.rate_per_second,
                burst: bucket.burst,
                retry_after: whole_ms(wait),
            };
            (limited, wait)
        };
        match answer {
            Ok(Ok(v)) => match v.as_slice() {
                [1, taken, wait_us, which] => Decision::Admitted(
                    u32::try_from(*taken).unwrap_or(1).clamp(1, want),
                    (*wait_us > 0).then(|| refusal(*wait_us, *which)),
                ),
                [0, wait_us, which] => {
                    let (limited, wait) = refusal(*wait_us, *which);
                    Decision::Refused(limited, wait)
                }
                other => Decision::NoAnswer(format!("the limit script answered {other:?}")),
            },
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

/// A bucket's interval between calls, µs (at least 1).
fn interval_us(bucket: &Bucket) -> u64 {
    (1e6 / bucket.rate_per_second).round().max(1.0) as u64
}

/// `d` rounded up to whole milliseconds, at least 1 (what `grpc-retry-pushback-ms` and
/// the message show).
fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(
        u64::try_from(d.as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1),
    )
}

/// Tokens one round trip asks for: `lease`, but no more than any of the buckets'
/// `burst / replicas` (so that one replica cannot take the whole burst that all of them
/// share), and at least 1 (the call's own).
fn batch(lease: u32, replicas: u32, buckets: &[(RateScope, &str, Bucket)]) -> u32 {
    buckets
        .iter()
        .map(|(_, _, b)| b.burst / replicas.max(1))
        .fold(lease, u32::min)
        .max(1)
}

/// What this replica's lease says about a call.
#[derive(Debug, PartialEq)]
enum Local {
    /// A leased token was spent on it.
    Admitted,
    /// Redis refused these buckets a moment ago and no call fits yet.
    Refused(Limited),
    /// Ask Redis, giving back this many leased tokens whose lease ran out.
    Ask { give_back: u32 },
}

/// Tokens taken from Redis ahead of the calls that spend them, and refusals Redis gave,
/// per set of buckets (a tenant's and a model's), each kept for `life` at most. In
/// shards, each behind its own lock; bounded like the local buckets (`max_keys`).
struct Leases {
    shards: Box<[Mutex<HashMap<String, Lease>>]>,
    hasher: RandomState,
    life: Duration,
    cap: usize,
}

#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    /// When the leased tokens lapse (they are then given back on the next ask).
    expires: Option<Instant>,
    /// Refused until then, with what to tell callers.
    refused: Option<(Instant, Limited)>,
}

impl Lease {
    fn live(&self, now: Instant) -> bool {
        (self.tokens > 0 && self.expires.is_some_and(|e| e > now))
            || self.refused.as_ref().is_some_and(|(until, _)| *until > now)
    }
}

const LEASE_SHARDS: usize = 16;

impl Leases {
    fn new(life: Duration, max_keys: usize) -> Leases {
        Leases {
            shards: (0..LEASE_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            life,
            cap: max_keys.div_ceil(LEASE_SHARDS).max(1),
        }
    }

    /// The name of a set of buckets (unambiguous: the tenant's name is length-prefixed).
    fn key(buckets: &[(RateScope, &str, Bucket)]) -> String {
        let mut k = String::new();
        for (scope, name, _) in buckets {
            k.push_str(scope.as_str());
            k.push_str(&name.len().to_string());
            k.push(':');
            k.push_str(name);
        }
        k
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, Lease>> {
        let i = (self.hasher.hash_one(key) >> 32) as usize % self.shards.len();
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Spends a leased token on a call, or refuses it while Redis's refusal holds, or
    /// says to ask Redis (handing over the lapsed tokens to give back).
    fn take(&self, key: &str, now: Instant) -> Local {
        let mut shard = self.shard(key);
        let Some(lease) = shard.get_mut(key) else {
            return Local::Ask { give_back: 0 };
        };
        if lease.tokens > 0 {
            if lease.expires.is_some_and(|e| e > now) {
                lease.tokens -= 1;
                return Local::Admitted;
            }
            let give_back = std::mem::take(&mut lease.tokens);
            return Local::Ask { give_back };
        }
        match &lease.refused {
            Some((until, limited)) if *until > now => Local::Refused(Limited {
                retry_after: whole_ms(*until - now),
                ..limited.clone()
            }),
            _ => Local::Ask { give_back: 0 },
        }
    }

    /// Keeps `tokens` leased for `life` from `now`, and `then`, the refusal Redis
    /// would give once they are spent (another batch would not fit yet), for as long as
    /// it said (`life` at most).
    fn keep(&self, key: &str, tokens: u32, then: Option<(Limited, Duration)>, now: Instant) {
        if tokens == 0 && then.is_none() {
            return;
        }
        let expires = now + self.life;
        let refused = then.map(|(limited, wait)| (now + wait.min(self.life), limited));
        self.update(key, now, |lease| {
            lease.tokens = lease.tokens.saturating_add(tokens);
            lease.expires = Some(expires);
            lease.refused = refused;
        });
    }

    /// Refuses these buckets here until one more call fits (`wait`, as Redis said), for
    /// `life` at most.
    fn refuse(&self, key: &str, limited: &Limited, wait: Duration, now: Instant) {
        let until = now + wait.min(self.life);
        self.update(key, now, |lease| {
            lease.refused = Some((until, limited.clone()));
        });
    }

    fn update(&self, key: &str, now: Instant, change: impl FnOnce(&mut Lease)) {
        let mut shard = self.shard(key);
        if let Some(lease) = shard.get_mut(key) {
            change(lease);
            return;
        }
        if shard.len() >= self.cap {
            // Lapsed leases go (their tokens are lost, not given back: they were taken
            // from Redis, so this can only admit less); if live ones alone fill the
            // shard, all go.
            shard.retain(|_, lease| lease.live(now));
            if shard.len() >= self.cap {
                shard.clear();
            }
        }
        let mut lease = Lease::default();
        change(&mut lease);
        shard.insert(key.to_owned(), lease);
    }

    /// Tokens held in leases that have not lapsed at `now`.
    fn tokens(&self, now: Instant) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap_or_else(PoisonError::into_inner);
                shard
                    .values()
                    .filter(|l| l.expires.is_some_and(|e| e > now))
                    .map(|l| u64::from(l.tokens))
                    .sum::<u64>()
            })
            .sum()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate_per_second: f64, burst: u32) -> Bucket {
        Bucket {
            rate_per_second,
            burst,
            scope: Scope::Global,
        }
    }

    fn refusal() -> Limited {
        Limited {
            scope: RateScope::Tenant,
            key: "team-a".into(),
            rate: 100.0,
            burst: 10,
            retry_after: Duration::from_millis(8),
        }
    }

    #[test]
    fn a_batch_is_the_lease_cut_to_each_bursts_share() {
        let tenant = (RateScope::Tenant, "a", bucket(100.0, 10));
        let model = (RateScope::Model, "m", bucket(1000.0, 100));
        assert_eq!(batch(4, 1, &[tenant]), 4);
        assert_eq!(batch(4, 3, &[tenant]), 3, "10 / 3 replicas");
        assert_eq!(batch(50, 3, &[tenant, model]), 3, "the smaller share");
        assert_eq!(batch(50, 1, &[model]), 50);
        assert_eq!(batch(4, 20, &[tenant]), 1, "a share under 1: no lease");
        assert_eq!(batch(1, 1, &[model]), 1, "lease = 1 is off");
    }

    #[test]
    fn lease_keys_are_unambiguous() {
        let b = bucket(1.0, 1);
        let one = Leases::key(&[(RateScope::Tenant, "a", b), (RateScope::Model, "bm", b)]);
        let two = Leases::key(&[(RateScope::Tenant, "abm", b)]);
        let three = Leases::key(&[(RateScope::Tenant, "a", b)]);
        let four = Leases::key(&[(RateScope::Model, "a", b)]);
        let all = [&one, &two, &three, &four];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leased_tokens_are_spent_then_lapse_and_are_given_back() {
        let leases = Leases::new(Duration::from_millis(50), 10_000);
        let t0 = Instant::now();
        assert_eq!(leases.take("k", t0), Local::Ask { give_back: 0 });
        leases.keep("k", 3, None, t0);
        for _ in 0..3 {
            assert_eq!(
                leases.take("k", t0 + Duration::from_millis(10)),
                Local::Admitted
            );
        }
        assert_eq!(
            leases.take("k", t0 + Duration::from_millis(10)),
            Local::Ask { give_back: 0 },
            "spent: ask Redis"
        );
        // Two left when the lease lapses: the next ask gives them back, once.
        leases.keep("k", 2, None, t0 + Duration::from_millis(20));
        let lapsed = t0 + Duration::from_millis(70);
        assert_eq!(leases.take("k", lapsed), Local::Ask { give_back: 2 });
        assert_eq!(leases.take("k", lapsed), Local::Ask { give_back: 0 });
        // Another set of buckets has its own lease.
        leases.keep("other", 1, None, lapsed);
        assert_eq!(leases.take("k", lapsed), Local::Ask { give_back: 0 });
        assert_eq!(leases.take("other", lapsed), Local::Admitted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_holds_until_a_call_fits_with_its_pushback() {
        let leases = Leases::new(Duration::from_millis(50), 10_000);
        let t0 = Instant::now();
        leases.refuse("k", &refusal(), Duration::from_micros(7_300), t0);
        match leases.take("k", t0 + Duration::from_millis(2)) {
            Local::Refused(l) => {
                assert_eq!(
                    l.retry_after,
                    Duration::from_millis(6),
                    "5.3 ms, rounded up"
                );
                assert_eq!(l.key, "team-a");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            leases.take("k", t0 + Duration::from_micros(7_300)),
            Local::Ask { give_back: 0 },
            "the wait is over"
        );
        // A long wait is kept for the lease's life only (then Redis is asked again).
        leases.refuse("k", &refusal(), Duration::from_secs(5), t0);
        assert!(matches!(
            leases.take("k", t0 + Duration::from_millis(49)),
            Local::Refused(_)
        ));
        assert_eq!(
            leases.take("k", t0 + Duration::from_millis(50)),
            Local::Ask { give_back: 0 }
        );
        // Tokens leased later clear the refusal.
        leases.refuse("k", &refusal(), Duration::from_millis(30), t0);
        leases.keep("k", 1, None, t0);
        assert_eq!(leases.take("k", t0), Local::Admitted);
        assert_eq!(leases.take("k", t0), Local::Ask { give_back: 0 });
        // A batch taken when no other would fit: once it is spent, the replica refuses
        // until one would (as Redis said), without asking.
        let wait = Duration::from_millis(20);
        leases.keep("k", 2, Some((refusal(), wait)), t0);
        assert_eq!(leases.take("k", t0), Local::Admitted);
        assert_eq!(leases.take("k", t0), Local::Admitted);
        let later = t0 + Duration::from_millis(5);
        match leases.take("k", later) {
            Local::Refused(l) => assert_eq!(l.retry_after, Duration::from_millis(15)),
            other => panic!("{other:?}"),
        }
        assert_eq!(leases.take("k", t0 + wait), Local::Ask { give_back: 0 });
    }

    #[test]
    fn leases_stay_bounded() {
        let leases = Leases::new(Duration::from_secs(60), 64);
        let t0 = Instant::now();
        for i in 0..10_000 {
            leases.keep(&format!("tenant{i}"), 1, None, t0);
            assert!(leases.len() <= 64, "{} leases", leases.len());
        }
        assert_eq!(leases.take("tenant9999", t0), Local::Admitted);
    }

    #[test]
    fn whole_ms_rounds_up_and_is_never_zero() {
        assert_eq!(whole_ms(Duration::from_micros(1)), Duration::from_millis(1));
        assert_eq!(whole_ms(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            whole_ms(Duration::from_micros(10_001)),
            Duration::from_millis(11)
        );
        assert_eq!(
            whole_ms(Duration::from_millis(10)),
            Duration::from_millis(10)
        );
    }
}
