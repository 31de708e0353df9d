//! Settings of stateful sequences (`[sequences]`, and `[models.X] sequence_idle_ms`):
//! how long a sequence stays pinned to its backend without a request, how many pins a
//! gateway keeps, and the seed of the rendezvous hash that chooses the backend.

use super::FieldError;
use serde::{Deserialize, Serialize};

/// Longest idle time accepted, in milliseconds (a day): a pin that outlives that holds
/// a table slot for a client that is gone.
pub const MAX_SEQUENCE_IDLE_MS: u64 = 86_400_000;

/// `[sequences]`: pinning the requests of one Triton sequence (`sequence_id`) to one
/// backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SequenceConfig {
    /// A pin ends after this long without a request of its sequence; `[models.X]
    /// sequence_idle_ms` overrides it. Default 1000 ms, Triton's default
    /// `max_sequence_idle_microseconds`.
    pub idle_ms: u64,
    /// Pins kept at once; past it, a new sequence is routed by the rendezvous hash
    /// alone, unpinned (counted in `infergate_sequences_unpinned_total`). Default 65536.
    pub max_pinned: usize,
    /// Seed of the rendezvous hash. Gateway replicas must share it (and their backend
    /// set) to choose the same backend for a sequence. Default 0.
    pub hash_seed: u64,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            idle_ms: 1000,
            max_pinned: 65_536,
            hash_seed: 0,
        }
    }
}

impl SequenceConfig {
    /// Checks values serde cannot check; the message names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_idle("idle_ms", self.idle_ms)?;
        if self.max_pinned == 0 {
            return Err(FieldError::new(
                "max_pinned",
                "must be at least 1 (sequences need a pin to stay on their backend)",
            ));
        }
        Ok(())
    }
}

/// An idle time: above 0, at most [`MAX_SEQUENCE_IDLE_MS`].
pub fn validate_idle(field: &str, ms: u64) -> Result<(), FieldError> {
    if ms == 0 || ms > MAX_SEQUENCE_IDLE_MS {
        return Err(FieldError::new(
            field,
            format!("must be between 1 and {MAX_SEQUENCE_IDLE_MS} ms, got {ms}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_the_field() {
        assert_eq!(SequenceConfig::default().validate(), Ok(()));
        let zero = SequenceConfig {
            idle_ms: 0,
            ..SequenceConfig::default()
        };
        assert_eq!(zero.validate().map_err(|e| e.path), Err("idle_ms".into()));
        let none = SequenceConfig {
            max_pinned: 0,
            ..SequenceConfig::default()
        };
        assert_eq!(
            none.validate().map_err(|e| e.path),
            Err("max_pinned".into())
        );
    }
}
