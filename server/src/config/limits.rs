//! Settings of the token-bucket rate limits (`[rate_limit]`).

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
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            rate_per_second: 10.0,
            burst: 20,
        }
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
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_tenant: None,
            per_model: None,
            tenants: BTreeMap::new(),
            max_keys: 10_000,
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
        Ok(())
    }

    /// Whether any limit is configured at all.
    pub fn is_enabled(&self) -> bool {
        self.per_tenant.is_some() || self.per_model.is_some() || !self.tenants.is_empty()
    }

    pub(crate) fn tenant_bucket(&self, tenant: &str) -> Option<Bucket> {
        self.tenants
            .get(tenant)
            .or(self.per_tenant.as_ref())
            .copied()
    }
}
