//! Settings of the response cache (`[models.X] cache = { ... }`): how long an answer
//! stays, how many answers and bytes one model keeps, whether replicas share answers
//! through Redis, and whether identical calls in flight share one backend call. Off
//! unless a model's table has it: only the operator knows a model is deterministic.

use super::FieldError;
use serde::{Deserialize, Serialize};

/// Longest time to live accepted, in milliseconds (a day).
pub const MAX_CACHE_TTL_MS: u64 = 86_400_000;

/// Largest single entry accepted (the moka weigher counts in `u32`), in bytes.
pub const MAX_CACHE_ENTRY_BYTES: usize = 1 << 30;

/// `[models.X] cache`: the response cache of one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long an answer is served from the cache, in ms. Default 60000.
    pub ttl_ms: u64,
    /// Answers kept in this process at most. Default 10000.
    pub max_entries: u64,
    /// Bytes of answers kept in this process at most. Default 64 MiB.
    pub max_bytes: u64,
    /// Answers larger than this (the response message, in bytes) are not stored.
    /// Default 1 MiB.
    pub max_entry_bytes: usize,
    /// Also keep answers in Redis (`[redis] url`), shared by every replica with the
    /// same `[redis] key_prefix`. Default false.
    pub shared: bool,
    /// Identical calls in flight at the same moment share the first one's backend
    /// call (within one replica). Default true.
    pub coalesce: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_ms: 60_000,
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            shared: false,
            coalesce: true,
        }
    }
}

impl CacheConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.ttl_ms == 0 || self.ttl_ms > MAX_CACHE_TTL_MS {
            return Err(FieldError::new(
                "ttl_ms",
                format!(
                    "must be between 1 and {MAX_CACHE_TTL_MS} ms, got {}",
                    self.ttl_ms
                ),
            ));
        }
        if self.max_entries == 0 {
            return Err(FieldError::new("max_entries", "must be at least 1"));
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > MAX_CACHE_ENTRY_BYTES {
            return Err(FieldError::new(
                "max_entry_bytes",
                format!(
                    "must be between 1 and {MAX_CACHE_ENTRY_BYTES} bytes, got {}",
                    self.max_entry_bytes
                ),
            ));
        }
        if self.max_bytes < self.max_entry_bytes as u64 {
            return Err(FieldError::new(
                "max_bytes",
                format!(
                    "{} bytes is below max_entry_bytes ({}): no entry of that size could be kept",
                    self.max_bytes, self.max_entry_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(c: CacheConfig) -> Option<String> {
        c.validate().err().map(|e| e.path)
    }

    #[test]
    fn bad_values_name_the_field() {
        assert_eq!(CacheConfig::default().validate(), Ok(()));
        let d = CacheConfig::default;
        assert_eq!(
            path(CacheConfig { ttl_ms: 0, ..d() }),
            Some("ttl_ms".into())
        );
        assert_eq!(
            path(CacheConfig {
                max_entries: 0,
                ..d()
            }),
            Some("max_entries".into())
        );
        assert_eq!(
            path(CacheConfig {
                max_entry_bytes: 0,
                ..d()
            }),
            Some("max_entry_bytes".into())
        );
        assert_eq!(
            path(CacheConfig {
                max_bytes: 10,
                ..d()
            }),
            Some("max_bytes".into())
        );
    }
}
