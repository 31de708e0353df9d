//! Settings of the token-bucket rate limits (`[rate_limit]`), of the Redis store that
//! global ones are kept in (`[redis]`), and the tenants' weights in the bulkhead's fair
//! queue (`[tenants.weights]`).

use super::FieldError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One token bucket's limits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Bucket {
    /// Tokens added per second (calls per second sustained). Default 10.
    pub rate_per_second: f64,
    /// Most tokens the bucket holds (calls allowed back to back). Default 20.
    pub burst: u32,
    /// Where the bucket is kept: `local` (this gateway only, default) or `global`
    /// (shared by every replica that uses the same `[redis]` store and key prefix).
    pub scope: Scope,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            rate_per_second: 10.0,
            burst: 20,
            scope: Scope::Local,
        }
    }
}

/// Where a rate limit is enforced.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// In this process.
    #[default]
    Local,
    /// Across every replica sharing the `[redis]` store.
    Global,
}

/// What a decision on a global limit does when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Limit locally, at the global rate divided by `replicas_hint` (the default).
    #[default]
    Local,
    /// Let the call through.
    Allow,
    /// Refuse the call (UNAVAILABLE, naming the store).
    Deny,
}

/// `[redis]`: the store that global rate limits are kept in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`, `rediss://…` for TLS (rustls), or
    /// `redis+unix:///path`; absent = no global limits. Default absent.
    pub url: Option<String>,
    /// PEM file of the CA(s) to trust for a `rediss://` URL instead of the system's
    /// trust store. Default absent (the system's roots).
    pub ca: Option<String>,
    /// PEM file of a client certificate, for a `rediss://` Redis that asks for one
    /// (`tls-auth-clients`); needs `key`. Default absent.
    pub cert: Option<String>,
    /// PEM file of the key of `cert`. Default absent.
    pub key: Option<String>,
    /// Prefix of every key, so several fleets can share one Redis. Default `infergate`.
    pub key_prefix: String,
    /// Longest a decision waits for Redis before `on_redis_error` applies. Default 5 ms.
    pub timeout_ms: u64,
    /// What a decision does when Redis does not answer in time. Default `local`.
    pub on_redis_error: OnRedisError,
    /// How many replicas share the global limits, for the local fallback: each then
    /// allows `rate / replicas_hint`; also caps a lease at `burst / replicas_hint`.
    /// Default 1.
    pub replicas_hint: u32,
    /// Tokens one round trip takes from a global bucket: the call's own, and up to
    /// `lease - 1` more that this replica then spends without asking Redis (never more
    /// than `burst / replicas_hint`). 1 = every call asks Redis. Default 4.
    pub lease: u32,
    /// How long leased tokens, and a refusal Redis gave, are kept by a replica; leased
    /// tokens unspent by then are given back on the next ask for the same buckets.
    /// Default 50 ms.
    pub lease_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            ca: None,
            cert: None,
            key: None,
            key_prefix: "infergate".into(),
            timeout_ms: 5,
            on_redis_error: OnRedisError::Local,
            replicas_hint: 1,
            lease: 4,
            lease_ms: 50,
        }
    }
}

impl RedisConfig {
    /// Most tokens one round trip may lease.
    pub const MAX_LEASE: u32 = 1000;

    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        let tls = match &self.url {
            Some(url) if url.starts_with("rediss://") => {
                if url.contains('#') {
                    return Err(FieldError::new(
                        "url",
                        format!(
                            "`{url}`: a URL fragment such as #insecure is not supported \
                             (the server's certificate is always checked; name its CA in redis.ca)"
                        ),
                    ));
                }
                true
            }
            Some(url) if url.starts_with("redis://") || url.starts_with("redis+unix://") => false,
            Some(url) => {
                return Err(FieldError::new(
                    "url",
                    format!("`{url}` is not a redis://, rediss:// (TLS) or redis+unix:// URL"),
                ));
            }
            None => false,
        };
        for (field, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            match path {
                Some(path) if !tls => {
                    return Err(FieldError::new(
                        field,
                        format!("`{path}` is for TLS to Redis: give redis.url as rediss://"),
                    ));
                }
                Some(path) if path.is_empty() => {
                    return Err(FieldError::new(field, "must not be empty"));
                }
                _ => {}
            }
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(FieldError::new("key", "required with `cert`")),
            (None, Some(_)) => return Err(FieldError::new("cert", "required with `key`")),
            _ => {}
        }
        if self.timeout_ms == 0 || self.timeout_ms > 10_000 {
            return Err(FieldError::new(
                "timeout_ms",
                "must be between 1 and 10000 ms",
            ));
        }
        if self.replicas_hint == 0 {
            return Err(FieldError::new("replicas_hint", "must be at least 1"));
        }
        if self.lease == 0 || self.lease > Self::MAX_LEASE {
            return Err(FieldError::new(
                "lease",
                format!(
                    "must be between 1 (off: every call asks Redis) and {} tokens, got {}",
                    Self::MAX_LEASE,
                    self.lease
                ),
            ));
        }
        if self.lease_ms == 0 || self.lease_ms > 10_000 {
            return Err(FieldError::new(
                "lease_ms",
                format!("must be between 1 and 10000 ms, got {}", self.lease_ms),
            ));
        }
        if self.key_prefix.is_empty() {
            return Err(FieldError::new("key_prefix", "must not be empty"));
        }
        Ok(())
    }
}

impl Bucket {
    /// Checks the values; `field` names the bucket in the message.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if !(self.rate_per_second.is_finite() && self.rate_per_second > 0.0) {
            return Err(FieldError::new(
                format!("{field}.rate_per_second"),
                format!("must be a number > 0, got {}", self.rate_per_second),
            ));
        }
        if self.burst == 0 {
            return Err(FieldError::new(
                format!("{field}.burst"),
                "must be >= 1 (a bucket of 0 tokens admits nothing)",
            ));
        }
        Ok(())
    }
}

/// `[rate_limit]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// The bucket every tenant gets; absent = tenants are not limited (except those in
    /// `tenants`). Default absent.
    pub per_tenant: Option<Bucket>,
    /// The bucket every model gets, shared by all tenants calling it; absent = models
    /// are not limited. Default absent.
    pub per_model: Option<Bucket>,
    /// Buckets for named tenants, in place of `per_tenant`. Default empty.
    pub tenants: BTreeMap<String, Bucket>,
    /// Most buckets kept per scope (tenants, models); see the module docs. Default
    /// 10000.
    pub max_keys: usize,
    /// The token rate every tenant's streams get, counted in `ModelStreamInfer`
    /// responses sent (one per token for a decoupled LLM); always kept in this process.
    /// A tenant in debt opens no new stream; a stream that takes the debt past `burst`
    /// is ended. Absent = not limited (except tenants in `tenant_tokens`). Default
    /// absent.
    pub per_tenant_tokens: Option<TokenRate>,
    /// Token rates for named tenants, in place of `per_tenant_tokens`. Default empty.
    pub tenant_tokens: BTreeMap<String, TokenRate>,
}

/// A tenant's stream token rate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenRate {
    /// Stream responses per second sustained. Default 100.
    pub tokens_per_second: f64,
    /// Responses allowed back to back, and the most debt a running stream may take on
    /// before it is ended. Default 200.
    pub burst: u32,
}

impl Default for TokenRate {
    fn default() -> Self {
        TokenRate {
            tokens_per_second: 100.0,
            burst: 200,
        }
    }
}

impl TokenRate {
    /// As a local token bucket.
    pub(crate) fn bucket(&self) -> Bucket {
        Bucket {
            rate_per_second: self.tokens_per_second,
            burst: self.burst,
            scope: Scope::Local,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_tenant: None,
            per_model: None,
            tenants: BTreeMap::new(),
            max_keys: 10_000,
            per_tenant_tokens: None,
            tenant_tokens: BTreeMap::new(),
        }
    }
}

impl RateLimitConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(b) = &self.per_tenant {
            b.validate("per_tenant")?;
        }
        if let Some(b) = &self.per_model {
            b.validate("per_model")?;
        }
        for (tenant, b) in &self.tenants {
            b.validate(&format!("tenants.{tenant}"))?;
        }
        if self.max_keys == 0 {
            return Err(FieldError::new("max_keys", "must be >= 1"));
        }
        let tokens = |t: &TokenRate, field: &str| {
            t.bucket().validate(field).map_err(|mut e| {
                e.path = e.path.replace(".rate_per_second", ".tokens_per_second");
                e
            })
        };
        if let Some(t) = &self.per_tenant_tokens {
            tokens(t, "per_tenant_tokens")?;
        }
        for (tenant, t) in &self.tenant_tokens {
            tokens(t, &format!("tenant_tokens.{tenant}"))?;
        }
        Ok(())
    }

    /// Whether any limit is configured at all.
    pub fn is_enabled(&self) -> bool {
        self.per_tenant.is_some()
            || self.per_model.is_some()
            || !self.tenants.is_empty()
            || self.tenant_token_rate_enabled()
    }

    fn tenant_token_rate_enabled(&self) -> bool {
        self.per_tenant_tokens.is_some() || !self.tenant_tokens.is_empty()
    }

    /// The stream token rate of `tenant`, if limited.
    pub fn token_rate(&self, tenant: &str) -> Option<TokenRate> {
        self.tenant_tokens
            .get(tenant)
            .or(self.per_tenant_tokens.as_ref())
            .copied()
    }

    pub(crate) fn tenant_bucket(&self, tenant: &str) -> Option<Bucket> {
        self.tenants
            .get(tenant)
            .or(self.per_tenant.as_ref())
            .copied()
    }

    /// The tenant's and the model's buckets kept in `scope`.
    pub fn buckets(&self, tenant: &str, scope: Scope) -> (Option<Bucket>, Option<Bucket>) {
        let here = |b: &Bucket| b.scope == scope;
        (
            self.tenant_bucket(tenant).filter(here),
            self.per_model.filter(here),
        )
    }

    /// Whether any limit is global.
    pub fn has_global(&self) -> bool {
        self.per_tenant
            .iter()
            .chain(self.per_model.iter())
            .chain(self.tenants.values())
            .any(|b| b.scope == Scope::Global)
    }

    /// The global limits as local ones at `1 / replicas` of their rate and burst (the
    /// fallback while Redis is away); the local ones are left out (they are enforced
    /// anyway).
    pub fn global_as_local(&self, replicas: u32) -> RateLimitConfig {
        let share = |b: &Bucket| {
            (b.scope == Scope::Global).then(|| Bucket {
                rate_per_second: b.rate_per_second / f64::from(replicas.max(1)),
                burst: (b.burst / replicas.max(1)).max(1),
                scope: Scope::Local,
            })
        };
        RateLimitConfig {
            per_tenant: self.per_tenant.as_ref().and_then(share),
            per_model: self.per_model.as_ref().and_then(share),
            tenants: self
                .tenants
                .iter()
                .filter_map(|(t, b)| share(b).map(|b| (t.clone(), b)))
                .collect(),
            max_keys: self.max_keys,
            // Token rates are kept locally only: not part of the fallback.
            per_tenant_tokens: None,
            tenant_tokens: BTreeMap::new(),
        }
    }
}

/// `[tenants.weights]`: each tenant's weight in the bulkhead's fair queue (a tenant of
/// weight 3 is served three times the cost of a tenant of weight 1 while both wait).
/// Tenants not named weigh 1.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct TenantWeights(pub BTreeMap<String, f64>);

impl TenantWeights {
    /// Most a weight may be (and 1 / this is the least).
    pub const MAX: f64 = 1000.0;

    /// The weight of `tenant`.
    pub fn of(&self, tenant: &str) -> f64 {
        self.0.get(tenant).copied().unwrap_or(1.0)
    }

    /// Checks every weight; the message names the tenant.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (tenant, weight) in &self.0 {
            if !(weight.is_finite() && (1.0 / Self::MAX..=Self::MAX).contains(weight)) {
                return Err(FieldError::new(
                    tenant.clone(),
                    format!("must be a number from 0.001 to 1000, got {weight}"),
                ));
            }
        }
        Ok(())
    }
}
