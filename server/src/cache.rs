//! The response cache and the coalescing of identical calls, per model (`[models.X]
//! cache`), for unary `ModelInfer`. It sits in the request path after admission (rate
//! limits) and the deadline, before the bulkhead: a hit takes no slot, no backend call
//! and nothing from the retry budget.
//!
//! - **Key.** SHA-256 over the model name and version, then every top-level field of
//!   the request but the model, version and `id` (inputs with their names, datatypes,
//!   shapes, parameters and contents; the requested outputs; `raw_input_contents`),
//!   then the `parameters` entries sorted by name, without `timeout` (which the gateway
//!   itself adds, and which does not change an answer). Only the top-level fields and
//!   the parameter names are decoded; the tensors are hashed as the bytes they are. A
//!   request with `sequence_id`, `sequence_start`, `sequence_end` or `priority` is
//!   never cached: its answer depends on state, or it asked to be scheduled.
//!   The tenant is not in the key: the operator declared the model deterministic.
//! - **What is kept.** The response message of an OK answer without its `id` field
//!   (so one caller's request id is never shown to another), at most `max_entry_bytes`.
//!   A hit is answered with the caller's own `id` put first and the stored bytes after
//!   it (no copy of the stored message), `grpc-status: 0`, and the response header
//!   `infergate-cache: hit` (`miss` on a call that went to a backend, `coalesced` on one
//!   that shared another call's answer). Errors, compressed answers and streams are
//!   never kept.
//! - **L1**, in this process: a moka cache per model, bounded by `max_bytes` with a
//!   weigher that charges each entry at least `max_bytes / max_entries`, so it also
//!   never holds more than `max_entries` entries. Each entry carries its own time to
//!   live (an entry copied from L2 lives only what it has left there).
//! - **L2**, with `shared = true`: Redis, through the connection the global rate limits
//!   use (`global_limit::connect`). One GET on an L1 miss (by the flight's leader only),
//!   one SET with `PX ttl` after a backend answer. An error or no answer within
//!   `[redis] timeout_ms` is a miss; nothing waits longer.
//! - **Coalescing** (`coalesce = true`): a singleflight map per replica. The first
//!   caller of a key leads: it looks in L2 and calls the backend through the rest of
//!   the path; identical calls arriving meanwhile wait for its answer. Each waiter keeps
//!   its own deadline (DEADLINE_EXCEEDED naming the model when it passes, while the
//!   others still get the answer) and its own cancellation (a waiter that goes away
//!   just stops waiting). When the shared call fails, each waiter gets the same status
//!   and does not retry: the leader's call already went through the model's retries,
//!   and N waiters retrying would multiply the load the retry budget bounds. The
//!   exceptions are failures that belong to the leader alone, its deadline passing or
//!   its caller leaving (DEADLINE_EXCEEDED, CANCELLED, or the leader's future dropped):
//!   then a waiter leads in its turn, within its own deadline. Across replicas there is
//!   no lock: identical calls on two replicas at the same moment make two backend
//!   calls, and after the first answer the shared L2 serves every replica.

use crate::config::{CacheConfig, Config};
use crate::proxy;
use crate::wire;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::Frame;
use http_body_util::BodyExt;
use moka::notification::RemovalCause;
use redis::aio::ConnectionManager;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

/// The response header that says how a call was served: `hit`, `miss` or `coalesced`.
pub const HEADER: &str = "infergate-cache";

/// Parameters that keep a request out of the cache.
const NEVER_CACHED: [&[u8]; 4] = [
    b"sequence_id",
    b"sequence_start",
    b"sequence_end",
    b"priority",
];

/// Parameters left out of the key: the gateway adds `timeout` itself (Triton's
/// remaining deadline), and it does not change an answer.
const NOT_IN_KEY: [&[u8]; 1] = [b"timeout"];

/// A cache key: SHA-256 of the request as [`request_key`] reads it.
pub type Key = [u8; 32];

/// How a call was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// From this process's cache.
    L1,
    /// From Redis.
    L2,
    /// By an identical call in flight.
    Coalesced,
    /// By its own backend call.
    Miss,
}

impl Served {
    /// The value of the [`HEADER`] response header and of the span's cache attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::L1 | Served::L2 => "hit",
            Served::Coalesced => "coalesced",
            Served::Miss => "miss",
        }
    }
}

/// One stored answer: the response message without its `id`.
#[derive(Clone)]
struct Entry {
    payload: Bytes,
    ttl: Duration,
}

/// Each entry expires after its own time to live.
struct PerEntryTtl;

impl moka::Expiry<Key, Entry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &Key,
        entry: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// What one model's cache counted, for the admin API and the metrics.
struct Tally {
    hits_l1: AtomicU64,
    hits_l2: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    bytes: AtomicU64,
    meters: Meters,
}

/// Metric handles, resolved once per model.
struct Meters {
    hit_l1: metrics::Counter,
    hit_l2: metrics::Counter,
    miss_l1: metrics::Counter,
    miss_l2: metrics::Counter,
    coalesced: metrics::Counter,
    evicted_size: metrics::Counter,
    evicted_expired: metrics::Counter,
    bytes: metrics::Gauge,
}

impl Tally {
    fn new(model: &str) -> Tally {
        let m = || model.to_owned();
        let level = |name: &'static str, level: &'static str| metrics::counter!(name, "model" => m(), "level" => level);
        let evicted = |reason: &'static str| metrics::counter!("infergate_cache_evictions_total", "model" => m(), "level" => "l1", "reason" => reason);
        Tally {
            hits_l1: AtomicU64::new(0),
            hits_l2: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            meters: Meters {
                hit_l1: level("infergate_cache_hits_total", "l1"),
                hit_l2: level("infergate_cache_hits_total", "l2"),
                miss_l1: level("infergate_cache_misses_total", "l1"),
                miss_l2: level("infergate_cache_misses_total", "l2"),
                coalesced: level("infergate_cache_coalesced_total", "l1"),
                evicted_size: evicted("size"),
                evicted_expired: evicted("expired"),
                bytes: metrics::gauge!("infergate_cache_bytes", "model" => m(), "level" => "l1"),
            },
        }
    }

    fn stored(&self, len: usize) {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.meters.bytes.increment(len as f64);
    }

    fn removed(&self, len: usize, cause: RemovalCause) {
        self.bytes.fetch_sub(len as u64, Ordering::Relaxed);
        self.meters.bytes.decrement(len as f64);
        match cause {
            RemovalCause::Size => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                self.meters.evicted_size.increment(1);
            }
            RemovalCause::Expired => {
                self.expirations.fetch_add(1, Ordering::Relaxed);
                self.meters.evicted_expired.increment(1);
            }
            RemovalCause::Explicit | RemovalCause::Replaced => {}
        }
    }
}

/// The cache of one model.
pub struct ModelCache {
    model: String,
    config: CacheConfig,
    l1: moka::sync::Cache<Key, Entry>,
    tally: Arc<Tally>,
}

impl ModelCache {
    fn new(model: &str, config: &CacheConfig) -> ModelCache {
        let tally = Arc::new(Tally::new(model));
        let floor = config
            .max_bytes
            .div_ceil(config.max_entries)
            .clamp(1, u64::from(u32::MAX)) as u32;
        let listener = Arc::clone(&tally);
        let l1 = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(move |_: &Key, e: &Entry| {
                u32::try_from(e.payload.len())
                    .unwrap_or(u32::MAX)
                    .max(floor)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, e: Entry, cause| listener.removed(e.payload.len(), cause))
            .build();
        ModelCache {
            model: model.to_owned(),
            config: config.clone(),
            l1,
            tally,
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.config.ttl_ms)
    }

    /// Keeps `payload` in L1 for `ttl`, unless it is above `max_entry_bytes`.
    fn keep(&self, key: Key, payload: &Bytes, ttl: Duration) -> bool {
        if payload.len() > self.config.max_entry_bytes {
            return false;
        }
        self.tally.stored(payload.len());
        self.l1.insert(
            key,
            Entry {
                payload: payload.clone(),
                ttl,
            },
        );
        true
    }

    fn stats(&self) -> ModelStats {
        self.l1.run_pending_tasks();
        let t = &self.tally;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ModelStats {
            model: self.model.clone(),
            entries: self.l1.entry_count(),
            bytes: get(&t.bytes),
            hits_l1: get(&t.hits_l1),
            hits_l2: get(&t.hits_l2),
            misses: get(&t.misses),
            coalesced: get(&t.coalesced),
            evictions: get(&t.evictions),
            expirations: get(&t.expirations),
            config: self.config.clone(),
        }
    }
}

/// One model's cache as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStats {
    /// The model.
    pub model: String,
    /// Entries in L1 now.
    pub entries: u64,
    /// Bytes of answers in L1 now.
    pub bytes: u64,
    /// Calls answered from L1.
    pub hits_l1: u64,
    /// Calls answered from L2 (Redis).
    pub hits_l2: u64,
    /// Calls that missed every level and went to a backend (or shared a call that did).
    pub misses: u64,
    /// Calls answered by an identical call in flight.
    pub coalesced: u64,
    /// L1 entries evicted to stay within the bounds.
    pub evictions: u64,
    /// L1 entries that reached their time to live.
    pub expirations: u64,
    /// The settings.
    pub config: CacheConfig,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Entries dropped from L1.
    pub l1: u64,
    /// Keys deleted from Redis.
    pub l2: u64,
}

/// The outcome of a flight, as its waiters see it.
#[derive(Clone)]
enum Shared {
    /// The answer's message, without `id`.
    Answer(Bytes),
    /// The shared call failed.
    Failed(Status),
    /// An answer that cannot be handed to another caller (compressed, not one
    /// message): each waiter calls on its own.
    Unshareable,
}

type FlightOutcome = watch::Receiver<Option<Shared>>;

/// The calls in flight, by key (the singleflight map of this replica).
#[derive(Default)]
struct Flights {
    next: AtomicU64,
    map: Mutex<HashMap<Key, (u64, FlightOutcome)>>,
}

enum Joined<'a> {
    Lead(FlightGuard<'a>),
    Wait(FlightOutcome),
}

impl Flights {
    fn join(&self, key: Key) -> Joined<'_> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, rx)) = map.get(&key) {
            // `has_changed` errs once the leader is gone without an answer.
            if rx.has_changed().is_ok() {
                return Joined::Wait(rx.clone());
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key, (id, rx));
        Joined::Lead(FlightGuard {
            flights: self,
            key,
            id,
            tx: Some(tx),
        })
    }

    fn in_flight(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

/// The leader's hold on a flight: finishing publishes the outcome; dropping it
/// unfinished (the leader's caller went away) tells the waiters to go on without it.
struct FlightGuard<'a> {
    flights: &'a Flights,
    key: Key,
    id: u64,
    tx: Option<watch::Sender<Option<Shared>>>,
}

impl FlightGuard<'_> {
    fn finish(mut self, outcome: Shared) {
        self.leave();
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(outcome));
        }
    }

    fn leave(&self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Redis as the second level.
struct Store {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl Store {
    fn key(&self, model: &str, key: &Key) -> String {
        let mut out = format!("{}:cache:{model}:", self.prefix);
        for b in key {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The stored answer and the time it has left, or None (absent, expired, Redis
    /// slow or away).
    async fn get(&self, key: String) -> Option<(Bytes, Duration)> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("GET");
        command.arg(&key);
        let get = command.query_async::<Option<Vec<u8>>>(&mut connection);
        let value = match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(value)) => value?,
            Ok(Err(e)) => {
                tracing::debug!(%key, "cache GET failed: {e}");
                return None;
            }
            Err(_) => return None,
        };
        let (expires, payload) = value.split_at_checked(8)?;
        let expires = u64::from_be_bytes(expires.try_into().ok()?);
        let left = expires.checked_sub(unix_ms())?;
        (left > 0).then(|| (Bytes::copy_from_slice(payload), Duration::from_millis(left)))
    }

    /// Stores `payload` for `ttl` (best effort, within the timeout).
    async fn set(&self, key: String, payload: &[u8], ttl: Duration) {
        let mut value = Vec::with_capacity(payload.len() + 8);
        value.extend_from_slice(&(unix_ms() + ttl.as_millis() as u64).to_be_bytes());
        value.extend_from_slice(payload);
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("SET");
        command
            .arg(&key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let set = command.query_async::<()>(&mut connection);
        match tokio::time::timeout(self.timeout, set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%key, "cache SET failed: {e}"),
            Err(_) => tracing::debug!(%key, "cache SET did not answer in time"),
        }
    }

    /// Deletes every key of `model` (every model when empty). SCAN, not KEYS, so Redis
    /// keeps serving others meanwhile.
    async fn purge(&self, model: &str) -> Result<u64, String> {
        let pattern = if model.is_empty() {
            format!("{}:cache:*", glob_escape(&self.prefix))
        } else {
            format!(
                "{}:cache:{}:*",
                glob_escape(&self.prefix),
                glob_escape(model)
            )
        };
        let mut connection = self.connection.clone();
        let limit = self.timeout.max(Duration::from_secs(2));
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let mut command = redis::cmd("SCAN");
            command
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let scan = command.query_async::<(u64, Vec<String>)>(&mut connection);
            let (next, keys) = tokio::time::timeout(limit, scan)
                .await
                .map_err(|_| "Redis did not answer SCAN in time".to_owned())?
                .map_err(|e| format!("Redis SCAN: {e}"))?;
            if !keys.is_empty() {
                let mut command = redis::cmd("UNLINK");
                command.arg(&keys);
                let unlink = command.query_async::<u64>(&mut connection);
                deleted += tokio::time::timeout(limit, unlink)
                    .await
                    .map_err(|_| "Redis did not answer UNLINK in time".to_owned())?
                    .map_err(|e| format!("Redis UNLINK: {e}"))?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The response caches of every model that has one, and the flights in progress.
pub struct ResponseCache {
    models: RwLock<HashMap<String, Arc<ModelCache>>>,
    any: AtomicBool,
    store: Option<Store>,
    flights: Flights,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("models", &self.models.read().map(|m| m.len()).unwrap_or(0))
            .field("shared", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// The caches `config` asks for. `connection` is the Redis connection already
    /// made for global limits, if any; without one a shared cache makes its own.
    pub fn new(
        config: &Config,
        connection: Option<ConnectionManager>,
    ) -> Result<ResponseCache, String> {
        let shared = config
            .models
            .values()
            .any(|m| m.cache.as_ref().is_some_and(|c| c.shared));
        let store = match (config.redis.url.is_some() && shared, connection) {
            (false, _) => None,
            (true, Some(connection)) => Some(connection),
            (true, None) => Some(crate::global_limit::connect(&config.redis)?),
        }
        .map(|connection| Store {
            connection,
            prefix: config.redis.key_prefix.clone(),
            timeout: Duration::from_millis(config.redis.timeout_ms),
        });
        let cache = ResponseCache {
            models: RwLock::new(HashMap::new()),
            any: AtomicBool::new(false),
            store,
            flights: Flights::default(),
        };
        cache.reconfigure(config);
        Ok(cache)
    }

    /// Applies the cache settings of a (re)loaded config: a model whose settings did
    /// not change keeps its entries; a changed one starts empty; one without `cache`
    /// has none. (A shared cache added by a reload needs the Redis connection made at
    /// start: `redis` itself needs a restart.)
    pub fn reconfigure(&self, config: &Config) {
        let Ok(mut models) = self.models.write() else {
            return;
        };
        let mut next = HashMap::new();
        for (name, table) in &config.models {
            let Some(wanted) = &table.cache else { continue };
            let cache = match models.get(name) {
                Some(c) if &c.config == wanted => Arc::clone(c),
                _ => Arc::new(ModelCache::new(name, wanted)),
            };
            next.insert(name.clone(), cache);
        }
        self.any.store(!next.is_empty(), Ordering::Relaxed);
        *models = next;
    }

    /// The cache of `model`, if it has one.
    pub fn model(&self, model: &str) -> Option<Arc<ModelCache>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.models.read().ok()?.get(model).cloned()
    }

    /// A `ModelInferRequest` for `model` that the cache may answer, or None (the model
    /// has no cache, or the request must not be cached, or does not parse: then the
    /// backend says what is wrong with it).
    pub fn lookup(&self, model: &str, version: &str, payload: &[u8]) -> Option<Lookup<'_>> {
        let cache = self.model(model)?;
        let key = request_key(model, version, payload)?;
        Some(Lookup {
            parent: self,
            cache,
            key,
        })
    }

    /// Every model's cache.
    pub fn stats(&self) -> Vec<ModelStats> {
        let models: Vec<Arc<ModelCache>> = match self.models.read() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut stats: Vec<ModelStats> = models.iter().map(|m| m.stats()).collect();
        stats.sort_by(|a, b| a.model.cmp(&b.model));
        stats
    }

    /// Calls waiting on a flight or leading one, across models (for tests).
    pub fn flights(&self) -> usize {
        self.flights.in_flight()
    }

    /// Empties the cache of `model` (of every model when empty), in this process and,
    /// when it is shared, in Redis. Unknown model: an error naming it.
    pub async fn purge(&self, model: &str) -> Result<Purged, String> {
        let targets: Vec<Arc<ModelCache>> = match self.models.read() {
            Ok(m) if model.is_empty() => m.values().cloned().collect(),
            Ok(m) => m.get(model).cloned().into_iter().collect(),
            Err(_) => Vec::new(),
        };
        if targets.is_empty() && !model.is_empty() {
            return Err(format!(
                "model '{}' has no cache",
                infergate_base::text::shown(model)
            ));
        }
        let mut purged = Purged::default();
        for cache in &targets {
            cache.l1.run_pending_tasks();
            purged.l1 += cache.l1.entry_count();
            cache.l1.invalidate_all();
            cache.l1.run_pending_tasks();
        }
        let shared = targets.iter().any(|c| c.config.shared);
        if let (Some(store), true) = (&self.store, shared) {
            purged.l2 = store.purge(model).await?;
        }
        Ok(purged)
    }
}

/// Where a waiter stands with its own deadline.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    /// When the gateway answers DEADLINE_EXCEEDED for this caller.
    pub answer_by: Option<Instant>,
    /// The caller's deadline, for the message.
    pub deadline: Option<Duration>,
}

/// What a cached call produced.
pub enum Answer {
    /// Served from a cache level or by an identical call: the stored message.
    Stored {
        /// The message, without `id`.
        payload: Bytes,
        /// Where it came from.
        served: Served,
    },
    /// This call's own backend answer, read whole and handed back as it came.
    Forwarded(http::Response<Body>),
}

impl Answer {
    /// How the call was served.
    pub fn served(&self) -> Served {
        match self {
            Answer::Stored { served, .. } => *served,
            Answer::Forwarded(_) => Served::Miss,
        }
    }

    /// The response to hand back: a stored answer carries the caller's own `id`.
    pub fn into_response(self, id: &str) -> http::Response<Body> {
        match self {
            Answer::Forwarded(response) => response,
            Answer::Stored { payload, served } => stored_response(&payload, id, served),
        }
    }
}

/// A request the cache may answer.
pub struct Lookup<'a> {
    parent: &'a ResponseCache,
    cache: Arc<ModelCache>,
    key: Key,
}

impl Lookup<'_> {
    /// Serves the call: from L1, else as a waiter on an identical call in flight, else
    /// as the leader (L2, then `forward`, the rest of the request path, polled only
    /// here). A leader's OK answer is kept in L1 and L2 and handed to its waiters.
    pub async fn serve<F>(self, wait: Wait, forward: F) -> Result<Answer, Status>
    where
        F: Future<Output = Result<http::Response<Body>, Status>>,
    {
        let cache = &self.cache;
        let mut alone = !cache.config.coalesce;
        let mut counted = false;
        let guard = loop {
            if let Some(entry) = cache.l1.get(&self.key) {
                cache.tally.hits_l1.fetch_add(1, Ordering::Relaxed);
                cache.tally.meters.hit_l1.increment(1);
                return Ok(Answer::Stored {
                    payload: entry.payload,
                    served: Served::L1,
                });
            }
            if !std::mem::replace(&mut counted, true) {
                cache.tally.meters.miss_l1.increment(1);
            }
            if alone {
                break None;
            }
            let rx = match self.parent.flights.join(self.key) {
                Joined::Lead(guard) => break Some(guard),
                Joined::Wait(rx) => rx,
            };
            match self.await_flight(rx, wait).await? {
                Some(Shared::Answer(payload)) => {
                    cache.tally.coalesced.fetch_add(1, Ordering::Relaxed);
                    cache.tally.meters.coalesced.increment(1);
                    return Ok(Answer::Stored {
                        payload,
                        served: Served::Coalesced,
                    });
                }
                Some(Shared::Failed(status)) if !leaders_own(status.code()) => return Err(status),
                Some(Shared::Unshareable) => alone = true,
                // The leader left, or failed for a reason of its own: lead in turn.
                Some(Shared::Failed(_)) | None => {}
            }
        };
        self.lead(guard, forward).await
    }

    /// Waits for a flight's outcome within the caller's deadline; None when the leader
    /// left without one.
    async fn await_flight(
        &self,
        mut rx: FlightOutcome,
        wait: Wait,
    ) -> Result<Option<Shared>, Status> {
        let outcome = async move {
            rx.wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone())
        };
        match wait.answer_by {
            None => Ok(outcome.await),
            Some(at) => tokio::time::timeout_at(at, outcome).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "deadline of {} ms exceeded while waiting for an identical call in flight (model {})",
                    wait.deadline.unwrap_or_default().as_millis(),
                    infergate_base::text::shown(&self.cache.model)
                ))
            }),
        }
    }

    async fn lead<F>(&self, guard: Option<FlightGuard<'_>>, forward: F) -> Result<Answer, Status>
    where
        F: Future<Output = Result<http::Response<Body>, Status>>,
    {
        let cache = &self.cache;
        let store = self.parent.store.as_ref().filter(|_| cache.config.shared);
        if let Some(store) = store {
            if let Some((payload, left)) = store.get(store.key(&cache.model, &self.key)).await {
                cache.tally.hits_l2.fetch_add(1, Ordering::Relaxed);
                cache.tally.meters.hit_l2.increment(1);
                cache.keep(self.key, &payload, left.min(cache.ttl()));
                if let Some(guard) = guard {
                    guard.finish(Shared::Answer(payload.clone()));
                }
                return Ok(Answer::Stored {
                    payload,
                    served: Served::L2,
                });
            }
            cache.tally.meters.miss_l2.increment(1);
        }
        cache.tally.misses.fetch_add(1, Ordering::Relaxed);
        let (response, shared) = match read_whole(forward).await {
            Ok(done) => done,
            Err(status) => {
                if let Some(guard) = guard {
                    guard.finish(Shared::Failed(status.clone()));
                }
                return Err(status);
            }
        };
        let keep = match &shared {
            // An answer of the fallback model is handed on, not kept as this model's.
            Shared::Answer(payload) if answered_by(payload, &cache.model) => cache
                .keep(self.key, payload, cache.ttl())
                .then(|| payload.clone()),
            _ => None,
        };
        if let Some(guard) = guard {
            guard.finish(shared);
        }
        if let (Some(store), Some(payload)) = (store, keep) {
            store
                .set(store.key(&cache.model, &self.key), &payload, cache.ttl())
                .await;
        }
        Ok(Answer::Forwarded(response))
    }
}

/// Whether a `ModelInferResponse` names `model` (or no model) as the one that answered.
fn answered_by(mut payload: &[u8], model: &str) -> bool {
    let mut named: Option<&[u8]> = None;
    while !payload.is_empty() {
        match next_field(&mut payload) {
            Some((1, value)) => named = Some(value),
            Some(_) => {}
            None => return false,
        }
    }
    named.is_none_or(|n| n == model.as_bytes())
}

/// A leader's failure that says nothing about the request itself.
fn leaders_own(code: Code) -> bool {
    matches!(code, Code::DeadlineExceeded | Code::Cancelled)
}

/// Runs the rest of the path and reads its response whole: the response to hand back
/// (marked `miss`, frames as they came) and what its waiters get.
async fn read_whole<F>(forward: F) -> Result<(http::Response<Body>, Shared), Status>
where
    F: Future<Output = Result<http::Response<Body>, Status>>,
{
    let (mut head, mut body) = forward.await?.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    // Up to the trailers, which end a gRPC response (a body cut short at the
    // deadline sends its own trailers first).
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => data.push(chunk),
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                break;
            }
        }
    }
    let ended = trailers.as_ref().unwrap_or(&head.headers);
    let shared = match proxy::grpc_code(ended) {
        Some(Code::Ok) => one_message(&data)
            .and_then(without_id)
            .map_or(Shared::Unshareable, Shared::Answer),
        Some(code) => Shared::Failed(
            Status::from_header_map(ended)
                .unwrap_or_else(|| Status::new(code, "the backend failed the call")),
        ),
        None => Shared::Unshareable,
    };
    head.headers
        .insert(HEADER, HeaderValue::from_static(Served::Miss.as_str()));
    let mut frames: Vec<Frame<Bytes>> = data.into_iter().map(Frame::data).collect();
    frames.extend(trailers.map(Frame::trailers));
    Ok((
        http::Response::from_parts(head, frames_body(frames)),
        shared,
    ))
}

/// The payload of `data` when it is exactly one uncompressed gRPC message.
fn one_message(data: &[Bytes]) -> Option<Bytes> {
    let whole = match data {
        [one] => one.clone(),
        many => {
            let mut joined = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            for chunk in many {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        }
    };
    let header = whole.get(..wire::HEADER_LEN)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    (header[0] == 0 && whole.len() == wire::HEADER_LEN + len)
        .then(|| whole.slice(wire::HEADER_LEN..))
}

/// A `ModelInferResponse` without its `id` field (3); the same bytes when it has none.
fn without_id(payload: Bytes) -> Option<Bytes> {
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut rest: &[u8] = &payload;
    let mut has_id = false;
    while !rest.is_empty() {
        let start = payload.len() - rest.len();
        let (field, _) = next_field(&mut rest)?;
        let end = payload.len() - rest.len();
        if field == 3 {
            has_id = true;
        } else {
            kept.push((start, end));
        }
    }
    if !has_id {
        return Some(payload);
    }
    let mut out = BytesMut::with_capacity(payload.len());
    for (start, end) in kept {
        out.extend_from_slice(&payload[start..end]);
    }
    Some(out.freeze())
}

/// Reads one protobuf field off `rest`: its tag and its value's bytes (a varint's own
/// bytes, a fixed value, or a length-delimited value without its length).
fn next_field<'a>(rest: &mut &'a [u8]) -> Option<(u64, &'a [u8])> {
    let tag = prost::encoding::decode_varint(rest).ok()?;
    let value: &'a [u8] = match tag & 7 {
        0 => {
            let before: &'a [u8] = rest;
            prost::encoding::decode_varint(rest).ok()?;
            &before[..before.len() - rest.len()]
        }
        1 => take(rest, 8)?,
        5 => take(rest, 4)?,
        2 => {
            let len = usize::try_from(prost::encoding::decode_varint(rest).ok()?).ok()?;
            take(rest, len)?
        }
        _ => return None,
    };
    Some((tag >> 3, value))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (value, after) = rest.split_at_checked(n)?;
    *rest = after;
    Some(value)
}

/// The cache key of a `ModelInferRequest` for `model` and `version` (see the module
/// docs), or None when it must not be cached or does not parse.
pub fn request_key(model: &str, version: &str, payload: &[u8]) -> Option<Key> {
    let mut hash = Sha256::new();
    hash.update(b"infergate-cache-v1");
    let mut put = |tag: u64, bytes: &[u8]| {
        hash.update(tag.to_le_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    put(0, model.as_bytes());
    put(0, version.as_bytes());
    let mut parameters: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let mut peek = rest;
        let tag = prost::encoding::decode_varint(&mut peek).ok()?;
        let (field, value) = next_field(&mut rest)?;
        match field {
            // model, version (hashed above, as routed) and the request id
            1..=3 => {}
            4 if tag & 7 == 2 => {
                let name = map_key(value)?;
                if NEVER_CACHED.contains(&name) {
                    return None;
                }
                if !NOT_IN_KEY.contains(&name) {
                    // A map keeps the last entry of a key, and its order is no order.
                    parameters.insert(name, value);
                }
            }
            _ => put(tag, value),
        }
    }
    for entry in parameters.values() {
        put(4 << 3 | 2, entry);
    }
    Some(hash.finalize().into())
}

/// The key (field 1) of a protobuf map entry.
fn map_key(mut entry: &[u8]) -> Option<&[u8]> {
    let mut key: &[u8] = &[];
    while !entry.is_empty() {
        let (field, value) = next_field(&mut entry)?;
        if field == 1 {
            key = value;
        }
    }
    Some(key)
}

/// A stored answer as a response: the 5-byte header and the caller's `id` first, then
/// the stored bytes as they are (protobuf fields may come in any order).
fn stored_response(payload: &Bytes, id: &str, served: Served) -> http::Response<Body> {
    let mut id_field = Vec::with_capacity(id.len() + 6);
    if !id.is_empty() {
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut id_field);
        prost::encoding::encode_varint(id.len() as u64, &mut id_field);
        id_field.extend_from_slice(id.as_bytes());
    }
    let mut first = Vec::with_capacity(wire::HEADER_LEN + id_field.len());
    first.extend_from_slice(&wire::header(id_field.len() + payload.len()));
    first.extend_from_slice(&id_field);
    let frames = vec![
        Frame::data(Bytes::from(first)),
        Frame::data(payload.clone()),
        proxy::ok_trailers(),
    ];
    let mut response = proxy::grpc_response(frames_body(frames));
    response
        .headers_mut()
        .insert(HEADER, HeaderValue::from_static(served.as_str()));
    response
}

fn frames_body(frames: Vec<Frame<Bytes>>) -> Body {
    let frames = frames.into_iter().map(Ok::<_, Infallible>);
    Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::model_infer_request::InferInputTensor;
    use infergate_proto::inference::model_infer_response::InferOutputTensor;
    use infergate_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
    use prost::Message as _;

    fn request(id: &str, b: u8) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "simple".into(),
            id: id.into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "INT32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![b; 16]],
            ..Default::default()
        }
    }

    fn key(r: &ModelInferRequest) -> Option<Key> {
        request_key("simple", "", &r.encode_to_vec())
    }

    fn with_param(mut r: ModelInferRequest, name: &str, v: i64) -> ModelInferRequest {
        use infergate_proto::inference::infer_parameter::ParameterChoice;
        r.parameters.insert(
            name.into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(v)),
            },
        );
        r
    }

    #[test]
    fn the_key_ignores_the_id_and_the_gateways_parameters_only() {
        let base = key(&request("a", 1)).expect("cacheable");
        assert_eq!(
            key(&request("b", 1)),
            Some(base),
            "the id is not in the key"
        );
        assert_ne!(key(&request("a", 2)), Some(base), "the contents are");
        let mut shape = request("a", 1);
        shape.inputs[0].shape = vec![4, 1];
        assert_ne!(key(&shape), Some(base), "the shape is");
        let mut name = request("a", 1);
        name.inputs[0].name = "INPUT1".into();
        assert_ne!(key(&name), Some(base), "the input name is");
        let mut dtype = request("a", 1);
        dtype.inputs[0].datatype = "UINT32".into();
        assert_ne!(key(&dtype), Some(base), "the datatype is");
        assert_ne!(
            request_key("simple", "2", &request("a", 1).encode_to_vec()),
            Some(base),
            "the version is"
        );
        assert_ne!(
            request_key("other", "", &request("a", 1).encode_to_vec()),
            Some(base),
            "the model is"
        );
        assert_eq!(
            key(&with_param(request("a", 1), "timeout", 5000)),
            Some(base),
            "the timeout the gateway adds is not"
        );
        let flagged = key(&with_param(request("a", 1), "temperature", 1)).expect("cacheable");
        assert_ne!(flagged, base, "other parameters are");
        // The same map written in either order keys the same.
        let both = with_param(with_param(request("a", 1), "x", 1), "y", 2);
        let swapped = with_param(with_param(request("a", 1), "y", 2), "x", 1);
        assert_eq!(key(&both), key(&swapped));
    }

    #[test]
    fn sequences_and_priorities_are_never_cached() {
        for name in ["sequence_id", "sequence_start", "sequence_end", "priority"] {
            assert_eq!(key(&with_param(request("a", 1), name, 1)), None, "{name}");
        }
        assert_eq!(request_key("simple", "", &[0xff]), None, "bad bytes");
    }

    fn response(id: &str) -> ModelInferResponse {
        ModelInferResponse {
            model_name: "simple".into(),
            id: id.into(),
            outputs: vec![InferOutputTensor {
                name: "OUTPUT0".into(),
                datatype: "INT32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_output_contents: vec![vec![7; 16]],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_stored_answer_carries_the_callers_id() {
        let framed = wire::Message::encode(&response("leader").encode_to_vec()).framed();
        let payload = one_message(&[framed.slice(..3), framed.slice(3..)])
            .and_then(without_id)
            .expect("one message");
        let decoded = ModelInferResponse::decode(payload.clone()).expect("decodes");
        assert_eq!(decoded.id, "", "the leader's id is not kept");
        for id in ["caller-2", ""] {
            let reply = stored_response(&payload, id, Served::L1);
            assert_eq!(reply.headers()[HEADER], "hit");
            let body = reply.into_body().collect().await.expect("body");
            let trailers = body.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            let bytes = body.to_bytes();
            let message = one_message(&[bytes]).expect("one message");
            assert_eq!(
                ModelInferResponse::decode(message).expect("decodes"),
                response(id)
            );
        }
    }

    #[test]
    fn an_answer_is_kept_only_as_the_model_that_gave_it() {
        let payload = response("x").encode_to_vec();
        assert!(answered_by(&payload, "simple"));
        assert!(!answered_by(&payload, "primary"), "a fallback's answer");
        assert!(answered_by(&[], "simple"), "no model named");
    }

    #[test]
    fn only_one_uncompressed_whole_message_is_shareable() {
        let framed = wire::Message::encode(b"\x0a\x01x").framed();
        assert!(one_message(std::slice::from_ref(&framed)).is_some());
        assert!(one_message(&[framed.slice(..4)]).is_none(), "cut short");
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert!(one_message(&[Bytes::from(compressed)]).is_none());
        let two = [framed.clone(), framed].concat();
        assert!(one_message(&[Bytes::from(two)]).is_none(), "two messages");
    }

    fn config(max_entries: u64, max_bytes: u64, max_entry_bytes: usize) -> CacheConfig {
        CacheConfig {
            ttl_ms: 60_000,
            max_entries,
            max_bytes,
            max_entry_bytes,
            ..CacheConfig::default()
        }
    }

    #[test]
    fn l1_is_bounded_by_entries_bytes_and_entry_size() {
        let by_entries = ModelCache::new("m", &config(4, 1 << 20, 1024));
        for i in 0..64u8 {
            by_entries.keep([i; 32], &Bytes::from(vec![i; 10]), Duration::from_secs(60));
        }
        by_entries.l1.run_pending_tasks();
        assert!(
            by_entries.l1.entry_count() <= 4,
            "{}",
            by_entries.l1.entry_count()
        );
        let stats = by_entries.stats();
        assert!(stats.evictions >= 60, "{stats:?}");
        assert_eq!(stats.bytes, stats.entries * 10);

        let by_bytes = ModelCache::new("m", &config(1000, 4096, 1024));
        for i in 0..64u8 {
            by_bytes.keep(
                [i; 32],
                &Bytes::from(vec![i; 1000]),
                Duration::from_secs(60),
            );
        }
        let stats = by_bytes.stats();
        assert!(stats.bytes <= 4096, "{stats:?}");
        assert!(stats.entries <= 4, "{stats:?}");

        let big = ModelCache::new("m", &config(10, 1 << 20, 100));
        assert!(!big.keep([1; 32], &Bytes::from(vec![0; 101]), Duration::from_secs(60)));
        assert!(big.keep([1; 32], &Bytes::from(vec![0; 100]), Duration::from_secs(60)));
    }

    #[test]
    fn a_waiter_joins_the_flight_and_sees_a_leader_that_left() {
        let flights = Flights::default();
        let Joined::Lead(guard) = flights.join([1; 32]) else {
            panic!("the first caller leads");
        };
        let Joined::Wait(rx) = flights.join([1; 32]) else {
            panic!("the second waits");
        };
        assert!(
            matches!(flights.join([2; 32]), Joined::Lead(_)),
            "another key leads"
        );
        drop(guard);
        assert!(rx.has_changed().is_err(), "the waiter sees the leader gone");
        assert!(
            matches!(flights.join([1; 32]), Joined::Lead(_)),
            "and can lead"
        );
        assert_eq!(flights.in_flight(), 0);
    }
}
