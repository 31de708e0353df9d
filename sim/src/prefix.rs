//! The simulator's prompt-prefix cache: what makes `tiny_llm`'s first token faster when
//! the same prompt prefix was served here recently. Sits inside the simulated backend,
//! between taking a slot and the prefill.
//!
//! Why: an LLM server keeps the KV cache of prompts it has computed (vLLM's automatic
//! prefix caching, SGLang's radix cache), so a request whose prompt starts like a recent
//! one skips most of its prefill. A gateway that sends the same prefix to the same
//! backend (the `prefix_affinity` policy) wins that time back; a gateway that spreads
//! prefixes evenly loses it. The simulator models just enough of that to measure it:
//!
//! - the key is the first `bytes` bytes of the prompt (the whole prompt when shorter);
//! - a key served within the last `ttl` is a hit, and its prefill takes `1 / speedup`
//!   of the usual time; serving it again refreshes it;
//! - at most `entries` keys are kept (bounded memory, as a KV cache is bounded by GPU
//!   memory): a new key first drops the expired ones, then the least recently served.
//!
//! `entries = 0` turns the cache off (every call is a miss and counts nothing). The
//! eviction scan is O(entries) and runs only when a new key finds the table full; the
//! sim's tables hold hundreds of keys, not millions, so a plain map is enough.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How the cache behaves (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixCacheConfig {
    /// Keys kept at most; 0 turns the cache off.
    pub entries: usize,
    /// How long a served prefix stays a hit.
    pub ttl: Duration,
    /// How many times faster the prefill of a hit is (≥ 1).
    pub speedup: f64,
    /// Leading prompt bytes that make the key.
    pub bytes: usize,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        PrefixCacheConfig {
            entries: 256,
            ttl: Duration::from_secs(10),
            speedup: 4.0,
            bytes: 256,
        }
    }
}

/// The table of recently served prefixes.
#[derive(Debug)]
pub(crate) struct PrefixCache {
    cfg: PrefixCacheConfig,
    /// Key hash → when it was last served. The sim's own process only, so std's
    /// hasher (not stable across builds) is good enough.
    seen: Mutex<HashMap<u64, Instant>>,
}

impl PrefixCache {
    pub(crate) fn new(cfg: PrefixCacheConfig) -> Self {
        PrefixCache {
            cfg,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the cache is on.
    pub(crate) fn enabled(&self) -> bool {
        self.cfg.entries > 0
    }

    /// Serves `prompt` at `now`: true when its prefix was served within the TTL. The
    /// prefix is recorded (or refreshed) either way.
    pub(crate) fn serve(&self, prompt: &[u8], now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        let key = {
            let mut h = DefaultHasher::new();
            prompt[..prompt.len().min(self.cfg.bytes)].hash(&mut h);
            h.finish()
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let hit = seen
            .get(&key)
            .is_some_and(|at| now.saturating_duration_since(*at) <= self.cfg.ttl);
        if !seen.contains_key(&key) && seen.len() >= self.cfg.entries {
            let ttl = self.cfg.ttl;
            seen.retain(|_, at| now.saturating_duration_since(*at) <= ttl);
            if seen.len() >= self.cfg.entries {
                if let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                    seen.remove(&oldest);
                }
            }
        }
        seen.insert(key, now);
        hit
    }

    /// The prefill time of a call whose usual prefill is `base`.
    pub(crate) fn prefill(&self, base: Duration, hit: bool) -> Duration {
        if hit && self.cfg.speedup > 1.0 {
            base.div_f64(self.cfg.speedup)
        } else {
            base
        }
    }

    /// Keys held now (never more than `entries`).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: usize) -> PrefixCache {
        PrefixCache::new(PrefixCacheConfig {
            entries,
            ttl: Duration::from_secs(10),
            speedup: 4.0,
            bytes: 8,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefix_served_within_the_ttl_is_a_hit() {
        let c = cache(4);
        assert!(!c.serve(b"system: be brief. user: hi", Instant::now()));
        // Same first 8 bytes, another user's question.
        assert!(c.serve(b"system: be brief. user: bye", Instant::now()));
        assert!(!c.serve(b"other system prompt", Instant::now()));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!c.serve(b"system: again", Instant::now()), "expired");
        assert!(c.serve(b"system: again", Instant::now()), "refreshed");
        assert_eq!(
            c.prefill(Duration::from_millis(40), true),
            Duration::from_millis(10)
        );
        assert_eq!(
            c.prefill(Duration::from_millis(40), false),
            Duration::from_millis(40)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_the_least_recent_goes_first() {
        let c = cache(3);
        for p in [b"aaaaaaaa", b"bbbbbbbb", b"cccccccc"] {
            c.serve(p, Instant::now());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // `a` served again: `b` is now the least recent.
        assert!(c.serve(b"aaaaaaaa", Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        for i in 0..100u32 {
            c.serve(format!("key{i:05}").as_bytes(), Instant::now());
            assert!(c.len() <= 3);
        }
        let c = cache(3);
        for p in [b"aaaaaaaa", b"bbbbbbbb", b"cccccccc"] {
            c.serve(p, Instant::now());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(c.serve(b"aaaaaaaa", Instant::now()));
        c.serve(b"dddddddd", Instant::now());
        assert!(c.serve(b"aaaaaaaa", Instant::now()), "recent one kept");
        assert!(
            !c.serve(b"bbbbbbbb", Instant::now()),
            "least recent evicted"
        );
    }

    #[test]
    fn off_counts_nothing() {
        let c = cache(0);
        assert!(!c.serve(b"x", Instant::now()));
        assert!(!c.serve(b"x", Instant::now()));
        assert_eq!(c.len(), 0);
    }
}
