//! Settings of the `prefix_affinity` policy (`[models.NAME] prefix = { ... }`), read by
//! `balance.rs` at the pick.

use super::FieldError;
use serde::{Deserialize, Serialize};

/// `[models.NAME] prefix`: what the prompt prefix is and how far affinity bends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixConfig {
    /// The BYTES input whose first element holds the prompt. Default `text_input`.
    pub input: String,
    /// Leading bytes of the prompt that make its key (the system prompt). Default 256.
    pub bytes: usize,
    /// Load bound: a backend takes a prefix's call only while it holds fewer than
    /// `⌈(1 + epsilon) × mean⌉` calls; beyond that the next backend on the ring does.
    /// Default 0.25 (see `affinity.rs` for why).
    pub epsilon: f64,
    /// A backend whose utilization once this call lands would be above this is
    /// passed over, as one over the load bound is: the next backend on the ring takes
    /// the call, and gpu_aware when none can. The utilization is the one gpu_aware
    /// projects (its last fresh report, corrected for this gateway's calls since),
    /// made of the maximum of `[load].utilization_fields`, which by default include
    /// `kv_cache_utilization` and `gpu_utilization`: a backend whose KV cache or GPU
    /// is full loses the call. In units of the backend's capacity: 1 = every slot
    /// taken, 2 = as many calls again waiting. Default 2.0; 1.0 was measured to undo
    /// the affinity under load: while caches are cold every backend looks full, calls
    /// spread, and caches keep missing (90% load, equally popular prompts: 40% hits against 87%, BENCHMARKS.md).
    pub utilization_threshold: f64,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            input: "text_input".into(),
            bytes: 256,
            epsilon: 0.25,
            utilization_threshold: 2.0,
        }
    }
}

/// Longest prefix a key may be made of.
pub const MAX_PREFIX_BYTES: usize = 64 * 1024;

impl PrefixConfig {
    /// Checks each field; paths are relative to the `prefix` table.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.input.is_empty() {
            return Err(FieldError::new(
                "input",
                "name the BYTES input that holds the prompt",
            ));
        }
        if self.bytes == 0 || self.bytes > MAX_PREFIX_BYTES {
            return Err(FieldError::new(
                "bytes",
                format!(
                    "must be between 1 and {MAX_PREFIX_BYTES}, got {}",
                    self.bytes
                ),
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 10.0) {
            return Err(FieldError::new(
                "epsilon",
                format!(
                    "must be above 0 and at most 10 (0.25 lets a backend hold 1.25x the mean), got {}",
                    self.epsilon
                ),
            ));
        }
        if !(self.utilization_threshold.is_finite() && self.utilization_threshold > 0.0) {
            return Err(FieldError::new(
                "utilization_threshold",
                format!("must be above 0, got {}", self.utilization_threshold),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, PolicyKind, PrefixConfig};

    #[test]
    fn a_prefix_table_parses_and_bad_fields_are_named() {
        let text = "[models.tiny_llm]\npolicy = \"prefix_affinity\"\n\
                    prefix = { input = \"prompt\", bytes = 128, epsilon = 0.5 }";
        let cfg = Config::parse(text, "gw.toml").expect("valid");
        let model = &cfg.models["tiny_llm"];
        assert_eq!(model.policy, Some(PolicyKind::PrefixAffinity));
        assert_eq!(
            model.prefix,
            Some(PrefixConfig {
                input: "prompt".into(),
                bytes: 128,
                epsilon: 0.5,
                ..PrefixConfig::default()
            })
        );
        for (table, field, reason) in [
            ("{ epsilon = 0.0 }", "epsilon", "above 0"),
            ("{ bytes = 0 }", "bytes", "between 1 and 65536"),
            ("{ input = \"\" }", "input", "BYTES input"),
            (
                "{ utilization_threshold = -1.0 }",
                "utilization_threshold",
                "above 0",
            ),
            ("{ epsilom = 0.2 }", "epsilom", "unknown field"),
        ] {
            let text = format!("[models.tiny_llm]\nprefix = {table}");
            let err = Config::parse(&text, "gw.toml")
                .and_then(|c| c.validate("gw.toml"))
                .expect_err(table);
            assert_eq!(err.source, "gw.toml");
            assert!(
                err.field.starts_with("models.tiny_llm.prefix"),
                "{table}: {}",
                err.field
            );
            assert!(err.field.ends_with(field), "{table}: {}", err.field);
            assert!(err.reason.contains(reason), "{table}: {}", err.reason);
        }
    }
}
