//! The per-model bulkhead: how many calls of one model may run at once, and who waits.
//! Sits after admission and the rate limit in the request path, before retry, the
//! per-try timeout, the balancer and the endpoint.
//!
//! Why: a model whose backends slow down would otherwise soak up every connection,
//! task and byte of memory the gateway has, and the other models would starve with it.
//! The bulkhead caps the calls of one model in flight (`max_concurrent`); beyond the cap
//! a call waits in a short, bounded queue (`max_queue`, `queue_timeout_ms`) and is
//! otherwise refused at once with a pushback that tells the client when to come back.
//! Failing fast under overload keeps latency bounded for the calls that are admitted.
//!
//! Inside the bulkhead:
//! - waiters are served by priority (higher first); inside one priority level the queue
//!   is weighted-fair across tenants (below). The levels below the best waiting one get
//!   at least `min_share_low_priority` of the grants while it stays busy (default one
//!   in ten), so no priority starves; 0 makes priority strict;
//! - with `tenant_share`, one tenant may hold at most `ceil(share × max_concurrent)`
//!   slots and `ceil(share × max_queue)` queue places. A tenant at its slot share still
//!   queues (up to its queue share) but is passed over, whatever its priority, until one
//!   of its own calls ends, so other tenants keep getting slots; a tenant whose queue
//!   share is used up is refused at once ([`Rejected::TenantQueueFull`]);
//! - a waiter gives up at `min(deadline, now + queue_timeout)`: a call whose deadline
//!   comes first is refused with [`Rejected::DeadlineTooClose`] (a call past its
//!   deadline is refused at once), one that ran out of queue time with
//!   [`Rejected::QueueTimeout`].
//!
//! Fairness inside a level is start-time fair queuing (SFQ). Each tenant has its own
//! first-come-first-served line in the level; the first waiter of each line is filed
//! under a start tag `max(level's virtual time, tenant's finish tag)`, and the level
//! serves the smallest start tag (oldest on a tie). Serving a waiter sets the level's
//! virtual time to its start tag and its tenant's finish tag to start + `cost / weight`.
//! Cost is the request's `max_tokens` parameter when it has one (LLM calls), else its
//! bytes ([`cost_of`]); weights come from `[tenants.weights]` (default 1). So a tenant
//! with a deep backlog waits its turn by cost, and a light tenant's call starts at the
//! virtual time: it is served at the next free slot, not behind the backlog.
//!
//! Why SFQ rather than deficit round robin or a virtual token counter (VTC): the tag
//! comes from a cost known up front (bytes, or the token budget asked for), so the
//! queue is one ordered map of line heads (O(log n) per call); DRR needs a quantum tuned
//! to the cost unit and serves a light tenant's call only when the round reaches it;
//! VTC counts service as it is delivered (tokens generated), which the bulkhead, a slot
//! per call, does not see. Tags are filed lazily, for line heads only, so a waiter that
//! is cancelled or times out, anywhere in its line, charges its tenant nothing. The
//! state stays bounded by the waiters: a tenant's line and finish tag are forgotten
//! once it has no waiter in the level (coming back it starts at the virtual time, as
//! SFQ gives an idle tenant anyway), a level once it is empty.
//!
//! A [`Slot`] is an RAII guard, the permit of a tower service: dropping it (the call
//! ended, failed, was cancelled, or its task panicked) frees the slot and hands it
//! straight to the best waiter. A waiter that is cancelled leaves the queue; if a slot
//! was granted to it at the same moment, its drop gives the slot back.
//!
//! ```ignore
//! let bulkhead = Bulkhead::new("simple".into(), BulkheadConfig::default());
//! let slot = bulkhead.acquire("tenant-a", 0, deadline).await?; // Err: RESOURCE_EXHAUSTED
//! let claim = Claim { tenant: "team-a", priority: 0, cost: cost_of(&payload), weight: 3.0 };
//! let slot = bulkhead.acquire_claim(claim, deadline).await?;
//! let response = call_backend().await;
//! drop(slot); // or keep it inside the response body until the stream ends
//! ```

use crate::config::BulkheadConfig;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Why a call got no slot. Each says which limit was hit and how long to back off.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejected {
    /// Every slot taken and the queue full (or no queue).
    QueueFull {
        /// The model.
        model: String,
        /// Its `max_concurrent`.
        max_concurrent: usize,
        /// Its `max_queue`.
        max_queue: usize,
        /// How long the caller should wait before trying again.
        pushback: Duration,
    },
    /// The tenant already holds its share of the queue.
    TenantQueueFull {
        /// The model.
        model: String,
        /// The tenant.
        tenant: String,
        /// The configured `tenant_share`.
        share: f64,
        /// Queue places the tenant holds (its limit).
        waiting: usize,
        /// Its `max_queue`.
        max_queue: usize,
        /// How long the caller should wait before trying again.
        pushback: Duration,
    },
    /// Waited `queue_timeout` without getting a slot.
    QueueTimeout {
        /// The model.
        model: String,
        /// Its `max_concurrent`.
        max_concurrent: usize,
        /// Its `queue_timeout`.
        queue_timeout: Duration,
        /// How long the caller should wait before trying again.
        pushback: Duration,
    },
    /// The caller's deadline came (or had passed) before a slot freed.
    DeadlineTooClose {
        /// The model.
        model: String,
        /// Its `max_concurrent`.
        max_concurrent: usize,
        /// How long the call waited in the queue (0 when refused at once).
        waited: Duration,
        /// How long the caller should wait before trying again.
        pushback: Duration,
    },
}

impl Rejected {
    /// The model whose bulkhead refused the call.
    pub fn model(&self) -> &str {
        match self {
            Rejected::QueueFull { model, .. }
            | Rejected::TenantQueueFull { model, .. }
            | Rejected::QueueTimeout { model, .. }
            | Rejected::DeadlineTooClose { model, .. } => model,
        }
    }

    /// The suggested back-off (for `grpc-retry-pushback-ms` or a `RetryInfo`).
    pub fn pushback(&self) -> Duration {
        match self {
            Rejected::QueueFull { pushback, .. }
            | Rejected::TenantQueueFull { pushback, .. }
            | Rejected::QueueTimeout { pushback, .. }
            | Rejected::DeadlineTooClose { pushback, .. } => *pushback,
        }
    }

    /// The limit that was hit, by config name, and its value.
    pub fn limit(&self) -> (&'static str, u64) {
        match self {
            Rejected::QueueFull { max_queue, .. } => ("max_queue", *max_queue as u64),
            Rejected::TenantQueueFull { waiting, .. } => ("tenant_share", *waiting as u64),
            Rejected::QueueTimeout { queue_timeout, .. } => {
                ("queue_timeout_ms", queue_timeout.as_millis() as u64)
            }
            Rejected::DeadlineTooClose { max_concurrent, .. } => {
                ("max_concurrent", *max_concurrent as u64)
            }
        }
    }

    /// Short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::QueueFull { .. } => "queue_full",
            Rejected::TenantQueueFull { .. } => "tenant_queue_full",
            Rejected::QueueTimeout { .. } => "queue_timeout",
            Rejected::DeadlineTooClose { .. } => "deadline_too_close",
        }
    }

    /// The gRPC status code to answer with: RESOURCE_EXHAUSTED, except a call whose own
    /// deadline ran out, which gets DEADLINE_EXCEEDED.
    pub fn code(&self) -> tonic::Code {
        match self {
            Rejected::DeadlineTooClose { .. } => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::ResourceExhausted,
        }
    }

    /// The message for the caller, naming the model, the limit and the pushback.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejected::QueueFull {
                model,
                max_concurrent,
                max_queue,
                pushback,
            } => write!(
                f,
                "model {model}: bulkhead full (max_concurrent {max_concurrent}, max_queue {max_queue} waiting); retry in {} ms",
                ceil_ms(*pushback)
            ),
            Rejected::TenantQueueFull {
                model,
                tenant,
                share,
                waiting,
                max_queue,
                pushback,
            } => write!(
                f,
                "model {model}: tenant {} holds its bulkhead queue share ({waiting} waiting, tenant_share {share} of max_queue {max_queue}); retry in {} ms",
                infergate_base::text::shown(tenant),
                ceil_ms(*pushback)
            ),
            Rejected::QueueTimeout {
                model,
                max_concurrent,
                queue_timeout,
                pushback,
            } => write!(
                f,
                "model {model}: no bulkhead slot within queue_timeout {} ms (max_concurrent {max_concurrent}); retry in {} ms",
                queue_timeout.as_millis(),
                ceil_ms(*pushback)
            ),
            Rejected::DeadlineTooClose {
                model,
                max_concurrent,
                waited,
                pushback,
            } => write!(
                f,
                "model {model}: deadline reached before a bulkhead slot freed (max_concurrent {max_concurrent}, waited {} ms); retry in {} ms",
                waited.as_millis(),
                ceil_ms(*pushback)
            ),
        }
    }
}

impl std::error::Error for Rejected {}

fn ceil_ms(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

/// Counters of one bulkhead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BulkheadStats {
    /// Slots held now.
    pub active: usize,
    /// Calls waiting now.
    pub queued: usize,
    /// Calls given a slot, at once or after waiting.
    pub admitted_total: u64,
    /// Calls refused because the queue (or the tenant's share of it) was full.
    pub rejected_full_total: u64,
    /// Calls refused after `queue_timeout`.
    pub rejected_timeout_total: u64,
    /// Calls refused because their deadline came first.
    pub rejected_deadline_total: u64,
    /// Waiters that went away (cancelled) before getting a slot.
    pub cancelled_total: u64,
}

/// One model's bulkhead. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Bulkhead {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    model: String,
    state: Mutex<State>,
}

/// Where a waiter stands: its priority level, its tenant and its arrival number.
#[derive(Debug, Clone)]
struct WaiterKey {
    level: Reverse<i32>,
    tenant: Arc<str>,
    seq: u64,
}

#[derive(Debug)]
struct Waiter {
    /// What serving it moves its tenant's finish tag on by (cost / weight).
    charge: u64,
    grant: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct TenantCount {
    active: usize,
    queued: usize,
}

/// One priority level's fair queue (start-time fair queuing; see the module docs).
#[derive(Debug, Default)]
struct Level {
    /// Virtual time: the start tag of the waiter served last from this level.
    now: u64,
    /// Tenants with waiters here, each with its own first-come-first-served line.
    backlogs: HashMap<Arc<str>, Backlog>,
    /// The first waiter of each backlog, by start tag (then arrival): best first.
    heads: BTreeMap<(u64, u64), Arc<str>>,
}

#[derive(Debug, Default)]
struct Backlog {
    /// The finish tag of the tenant's call served last from this level.
    finish: u64,
    /// The start tag and arrival number of the first waiter, as filed in `heads`.
    head: (u64, u64),
    waiters: BTreeMap<u64, Waiter>,
}

impl Level {
    /// Files the backlog's first waiter (if any) in `heads`, tagged now.
    fn file_head(&mut self, tenant: &Arc<str>) {
        let now = self.now;
        let Some(backlog) = self.backlogs.get_mut(tenant) else {
            return;
        };
        match backlog.waiters.keys().next() {
            Some(&seq) => {
                backlog.head = (now.max(backlog.finish), seq);
                self.heads.insert(backlog.head, tenant.clone());
            }
            None => {
                self.backlogs.remove(tenant);
            }
        }
    }
}

/// One tenant's call as the bulkhead weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// Higher is served first.
    pub priority: i32,
    /// What the call costs while it waits its turn: request bytes, or `max_tokens`
    /// ([`cost_of`]). 0 counts as 1.
    pub cost: u64,
    /// The tenant's weight (`[tenants.weights]`, default 1).
    pub weight: f64,
}

impl<'a> Claim<'a> {
    /// A claim of cost 1 and weight 1.
    pub fn new(tenant: &'a str, priority: i32) -> Self {
        Claim {
            tenant,
            priority,
            cost: 1,
            weight: 1.0,
        }
    }

    /// The virtual time this claim moves its tenant on by.
    fn charge(&self) -> u64 {
        let weight = if self.weight.is_finite() {
            self.weight.clamp(MIN_WEIGHT, MAX_WEIGHT)
        } else {
            1.0
        };
        let units = self.cost.max(1) as f64 * TAG_SCALE / weight;
        // `as` saturates: a huge cost is the most the tag can carry.
        units as u64
    }
}

/// Virtual-time units per unit of cost at weight 1 (so weights down to 1/1000 still
/// move the tag).
const TAG_SCALE: f64 = 1024.0;
const MIN_WEIGHT: f64 = 1e-3;
const MAX_WEIGHT: f64 = 1e6;

/// What a call costs in the fair queue: the `max_tokens` request parameter when the
/// request carries one (an LLM call: the work it may cause), else its size in bytes.
/// Reads only the top-level fields of the message, never the tensors.
pub fn cost_of(payload: &[u8]) -> u64 {
    crate::wire::peek_int_parameter(payload, "max_tokens")
        .filter(|t| *t > 0)
        .map_or(payload.len() as u64, |t| t as u64)
}

#[derive(Debug)]
struct State {
    cfg: BulkheadConfig,
    active: usize,
    tenants: HashMap<Arc<str>, TenantCount>,
    /// Levels with waiters, best (highest priority) first.
    levels: BTreeMap<Reverse<i32>, Level>,
    queued: usize,
    next_seq: u64,
    /// Grants owed to the levels below the best waiting one, in millionths of a grant.
    low_credit: u64,
    /// Moving average of how long a slot is held, for the pushback estimate.
    mean_hold: Option<Duration>,
    stats: BulkheadStats,
}

impl Inner {
    // A panic elsewhere while the lock was held leaves counters that are still
    // consistent (every update is a few plain writes), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn has_free_slot(&self) -> bool {
        self.cfg.max_concurrent == 0 || self.active < self.cfg.max_concurrent
    }

    fn under_share(&self, tenant: &str) -> bool {
        under_share(&self.cfg, &self.tenants, tenant)
    }

    /// The tenant's key, sharing the allocation already in the map when there is one.
    fn tenant_key(&self, tenant: &str) -> Arc<str> {
        self.tenants
            .get_key_value(tenant)
            .map_or_else(|| Arc::from(tenant), |(k, _)| k.clone())
    }

    fn admit(&mut self, tenant: &Arc<str>) {
        self.active += 1;
        self.tenants.entry(tenant.clone()).or_default().active += 1;
        self.stats.admitted_total += 1;
    }

    fn unadmit(&mut self, tenant: &str) {
        self.active = self.active.saturating_sub(1);
        self.stats.admitted_total = self.stats.admitted_total.saturating_sub(1);
        self.tenant_dec(tenant, true);
    }

    fn tenant_dec(&mut self, tenant: &str, active: bool) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            if active {
                t.active = t.active.saturating_sub(1);
            } else {
                t.queued = t.queued.saturating_sub(1);
            }
            if t.active == 0 && t.queued == 0 {
                self.tenants.remove(tenant);
            }
        }
    }

    /// Frees one slot of `tenant` and hands free slots to waiters.
    fn release(&mut self, tenant: &str, held: Option<Duration>) {
        self.active = self.active.saturating_sub(1);
        self.tenant_dec(tenant, true);
        if let Some(held) = held {
            self.mean_hold = Some(match self.mean_hold {
                None => held,
                // EWMA with weight 1/8 on the newest sample.
                Some(mean) => (mean * 7 + held) / 8,
            });
        }
        self.dispatch();
    }

    /// Grants free slots to the best waiters that may take one. Sending on a oneshot
    /// only wakes the waiter's task, so this is safe under the lock.
    fn dispatch(&mut self) {
        while self.has_free_slot() {
            let Some(key) = self.next_grant() else {
                break;
            };
            let Some(waiter) = self.take(&key, true) else {
                break;
            };
            self.tenant_dec(&key.tenant, false);
            self.admit(&key.tenant);
            if waiter.grant.send(()).is_err() {
                // The waiter is gone (it withdraws under this lock before its receiver
                // drops, so this does not happen; kept so a slot can never leak).
                self.unadmit(&key.tenant);
            }
        }
    }

    /// The waiter to serve next: the best of the best waiting level, except that the
    /// levels below it get one grant in `1 / min_share_low_priority` while both wait.
    fn next_grant(&mut self) -> Option<WaiterKey> {
        let (cfg, tenants) = (&self.cfg, &self.tenants);
        let mut eligible = self.levels.iter().filter_map(|(level, l)| {
            l.heads
                .iter()
                .find(|(_, tenant)| under_share(cfg, tenants, tenant))
                .map(|(&(_, seq), tenant)| WaiterKey {
                    level: *level,
                    tenant: tenant.clone(),
                    seq,
                })
        });
        let top = eligible.next()?;
        let Some(lower) = eligible.next() else {
            self.low_credit = 0;
            return Some(top);
        };
        self.low_credit += cfg.min_share_millionths();
        if self.low_credit >= 1_000_000 {
            self.low_credit -= 1_000_000;
            return Some(lower);
        }
        Some(top)
    }

    /// Queues a waiter for `claim` at the end of its tenant's line in its level.
    fn enqueue(
        &mut self,
        claim: &Claim<'_>,
        tenant: Arc<str>,
        grant: oneshot::Sender<()>,
    ) -> WaiterKey {
        let level_key = Reverse(claim.priority);
        let seq = self.next_seq;
        self.next_seq += 1;
        let level = self.levels.entry(level_key).or_default();
        let backlog = level.backlogs.entry(tenant.clone()).or_default();
        let first = backlog.waiters.is_empty();
        backlog.waiters.insert(
            seq,
            Waiter {
                charge: claim.charge(),
                grant,
            },
        );
        if first {
            level.file_head(&tenant);
        }
        self.queued += 1;
        self.tenants.entry(tenant.clone()).or_default().queued += 1;
        WaiterKey {
            level: level_key,
            tenant,
            seq,
        }
    }

    /// Takes a waiter out of its level. Served, it moves the level's virtual time to
    /// its start tag and its tenant's finish tag on by its charge; withdrawn, it
    /// charges nothing. A backlog or level left empty is forgotten (the state stays
    /// bounded by the waiters).
    fn take(&mut self, key: &WaiterKey, served: bool) -> Option<Waiter> {
        let level = self.levels.get_mut(&key.level)?;
        let backlog = level.backlogs.get_mut(&key.tenant)?;
        let waiter = backlog.waiters.remove(&key.seq)?;
        self.queued = self.queued.saturating_sub(1);
        if backlog.head.1 == key.seq {
            let start = backlog.head.0;
            level.heads.remove(&backlog.head);
            if served {
                backlog.finish = start.saturating_add(waiter.charge);
                level.now = level.now.max(start);
            }
            level.file_head(&key.tenant);
        }
        if level.heads.is_empty() {
            self.levels.remove(&key.level);
        }
        Some(waiter)
    }

    /// Removes a waiter still in the queue; false when it was granted a slot already.
    fn withdraw(&mut self, key: &WaiterKey) -> bool {
        match self.take(key, false) {
            Some(_) => {
                self.tenant_dec(&key.tenant, false);
                true
            }
            None => false,
        }
    }

    /// A guess at how long a caller at queue position `position` would wait.
    fn estimate_wait(&self, position: usize) -> Duration {
        const FLOOR: Duration = Duration::from_millis(10);
        let ceiling = self.cfg.queue_timeout().max(FLOOR);
        match self.mean_hold {
            // Slots free at about max_concurrent / mean_hold per second.
            Some(mean) if self.cfg.max_concurrent > 0 => {
                let ahead = u32::try_from(position.saturating_add(1)).unwrap_or(u32::MAX);
                let per_slot = mean / u32::try_from(self.cfg.max_concurrent).unwrap_or(u32::MAX);
                per_slot.saturating_mul(ahead).clamp(FLOOR, ceiling)
            }
            _ => ceiling,
        }
    }
}

/// Whether `tenant` holds fewer slots than its share (always, without a share).
fn under_share(
    cfg: &BulkheadConfig,
    tenants: &HashMap<Arc<str>, TenantCount>,
    tenant: &str,
) -> bool {
    match cfg.tenant_limit() {
        None => true,
        Some(limit) => tenants.get(tenant).map_or(0, |t| t.active) < limit,
    }
}

impl Bulkhead {
    /// A bulkhead for `model`. `cfg` should have passed [`BulkheadConfig::validate`];
    /// out-of-range values are clamped rather than trusted.
    pub fn new(model: String, cfg: BulkheadConfig) -> Self {
        Bulkhead {
            inner: Arc::new(Inner {
                model,
                state: Mutex::new(State {
                    cfg,
                    active: 0,
                    tenants: HashMap::new(),
                    levels: BTreeMap::new(),
                    queued: 0,
                    next_seq: 0,
                    low_credit: 0,
                    mean_hold: None,
                    stats: BulkheadStats::default(),
                }),
            }),
        }
    }

    /// The model this bulkhead guards.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// The limits in force.
    pub fn config(&self) -> BulkheadConfig {
        self.inner.lock().cfg.clone()
    }

    /// Takes a slot for a call of `tenant` with `priority` (higher is served first),
    /// at cost 1 and weight 1; see [`Bulkhead::acquire_claim`].
    pub async fn acquire(
        &self,
        tenant: &str,
        priority: i32,
        deadline: Option<Instant>,
    ) -> Result<Slot, Rejected> {
        self.acquire_claim(Claim::new(tenant, priority), deadline)
            .await
    }

    /// Takes a slot for `claim`, waiting in the queue when none is free; see the module
    /// docs for the rules. Cancel-safe: dropping the returned future leaves the queue,
    /// charges the tenant nothing and leaks nothing.
    pub async fn acquire_claim(
        &self,
        claim: Claim<'_>,
        deadline: Option<Instant>,
    ) -> Result<Slot, Rejected> {
        let start = Instant::now();
        let (key, tenant, rx, queue_end) = {
            let mut st = self.inner.lock();
            if deadline.is_some_and(|d| d <= start) {
                st.stats.rejected_deadline_total += 1;
                return Err(Rejected::DeadlineTooClose {
                    model: self.inner.model.clone(),
                    max_concurrent: st.cfg.max_concurrent,
                    waited: Duration::ZERO,
                    pushback: st.estimate_wait(st.queued),
                });
            }
            let tenant = st.tenant_key(claim.tenant);
            // After every change the best waiters that can run hold the free slots, so
            // a free slot now is one no waiter can use: no queue jumping.
            if st.has_free_slot() && st.under_share(&tenant) {
                st.admit(&tenant);
                return Ok(Slot::new(self.inner.clone(), tenant));
            }
            if st.queued >= st.cfg.max_queue {
                st.stats.rejected_full_total += 1;
                return Err(Rejected::QueueFull {
                    model: self.inner.model.clone(),
                    max_concurrent: st.cfg.max_concurrent,
                    max_queue: st.cfg.max_queue,
                    pushback: st.estimate_wait(st.queued),
                });
            }
            if let Some(limit) = st.cfg.tenant_queue_limit() {
                let waiting = st.tenants.get(&*tenant).map_or(0, |t| t.queued);
                if waiting >= limit {
                    st.stats.rejected_full_total += 1;
                    return Err(Rejected::TenantQueueFull {
                        model: self.inner.model.clone(),
                        tenant: tenant.to_string(),
                        share: st.cfg.tenant_share.unwrap_or(1.0),
                        waiting,
                        max_queue: st.cfg.max_queue,
                        pushback: st.estimate_wait(st.queued),
                    });
                }
            }
            let (tx, rx) = oneshot::channel();
            let key = st.enqueue(&claim, tenant.clone(), tx);
            let queue_end = start + st.cfg.queue_timeout();
            (key, tenant, rx, queue_end)
        };

        let until = deadline.map_or(queue_end, |d| d.min(queue_end));
        let mut pending = Pending {
            inner: &self.inner,
            key,
            tenant,
            rx,
            armed: true,
        };
        let granted = tokio::time::timeout_at(until, &mut pending.rx).await;
        pending.armed = false;
        if let Ok(Ok(())) = granted {
            return Ok(Slot::new(self.inner.clone(), pending.tenant.clone()));
        }
        let mut st = self.inner.lock();
        if !st.withdraw(&pending.key) {
            // A slot was granted at the same moment the wait ran out: it is ours.
            return Ok(Slot::new(self.inner.clone(), pending.tenant.clone()));
        }
        let pushback = st.estimate_wait(st.queued);
        if deadline.is_some_and(|d| d < queue_end) {
            st.stats.rejected_deadline_total += 1;
            Err(Rejected::DeadlineTooClose {
                model: self.inner.model.clone(),
                max_concurrent: st.cfg.max_concurrent,
                waited: start.elapsed(),
                pushback,
            })
        } else {
            st.stats.rejected_timeout_total += 1;
            Err(Rejected::QueueTimeout {
                model: self.inner.model.clone(),
                max_concurrent: st.cfg.max_concurrent,
                queue_timeout: st.cfg.queue_timeout(),
                pushback,
            })
        }
    }

    /// Counters now.
    pub fn stats(&self) -> BulkheadStats {
        let st = self.inner.lock();
        BulkheadStats {
            active: st.active,
            queued: st.queued,
            ..st.stats
        }
    }

    /// Changes the limits at run time. They apply to new acquisitions and to the
    /// queue's next grants: raising `max_concurrent` admits waiters at once; lowering it
    /// lets calls in flight finish and admits no one until they are below the new limit.
    /// Waiters already queued stay even if `max_queue` shrinks below their number.
    pub fn set_limits(&self, cfg: BulkheadConfig) -> Result<(), String> {
        cfg.validate()
            .map_err(|e| e.under("bulkhead").to_string())?;
        let mut st = self.inner.lock();
        st.cfg = cfg;
        st.dispatch();
        Ok(())
    }
}

/// A waiter's stake in the queue while `acquire` awaits. Dropped while armed (the
/// acquire future was cancelled), it leaves the queue, or gives back the slot that was
/// granted at the same moment. It owns the receiver so that the receiver outlives the
/// check: a grant is either still in the queue or was delivered.
struct Pending<'a> {
    inner: &'a Inner,
    key: WaiterKey,
    tenant: Arc<str>,
    rx: oneshot::Receiver<()>,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.inner.lock();
        if st.withdraw(&self.key) {
            st.stats.cancelled_total += 1;
        } else {
            st.release(&self.tenant, None);
        }
    }
}

/// One slot of a bulkhead, held for the life of a call (or of a stream). Dropping it
/// frees the slot and hands it to the best waiter.
#[must_use = "the slot is freed as soon as it is dropped"]
pub struct Slot {
    inner: Arc<Inner>,
    tenant: Arc<str>,
    since: Instant,
}

impl Slot {
    fn new(inner: Arc<Inner>, tenant: Arc<str>) -> Self {
        Slot {
            inner,
            tenant,
            since: Instant::now(),
        }
    }

    /// The model of the bulkhead the slot belongs to.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// The tenant holding it.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("model", &self.inner.model)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        self.inner.lock().release(&self.tenant, Some(held));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::share_of;
    use std::future::Future;
    use std::task::Poll;

    fn bulkhead(max_concurrent: usize, max_queue: usize) -> Arc<Bulkhead> {
        Arc::new(Bulkhead::new(
            "simple".into(),
            BulkheadConfig {
                max_concurrent,
                max_queue,
                queue_timeout_ms: 1000,
                tenant_share: None,
                ..BulkheadConfig::default()
            },
        ))
    }

    /// Lets spawned tasks run until `cond` holds (yields, not sleeps: time stays put).
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    /// Spawns a waiter that records `id` once admitted and then frees its slot.
    fn waiter(
        bh: &Arc<Bulkhead>,
        tenant: &'static str,
        priority: i32,
        id: usize,
        order: &Arc<Mutex<Vec<usize>>>,
    ) -> tokio::task::JoinHandle<()> {
        let bh = bh.clone();
        let order = order.clone();
        tokio::spawn(async move {
            let slot = bh.acquire(tenant, priority, None).await.expect("slot");
            order.lock().expect("order").push(id);
            drop(slot);
        })
    }

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// Queues a claim (waits until it is in the queue) that logs its tenant once
    /// admitted and then frees its slot.
    async fn claimant(
        bh: &Arc<Bulkhead>,
        tenant: &'static str,
        priority: i32,
        cost: u64,
        weight: f64,
        log: &Log,
    ) -> tokio::task::JoinHandle<()> {
        let queued = bh.stats().queued;
        let (bh2, log) = (bh.clone(), log.clone());
        let task = tokio::spawn(async move {
            let claim = Claim {
                tenant,
                priority,
                cost,
                weight,
            };
            let slot = bh2.acquire_claim(claim, None).await.expect("slot");
            log.lock().expect("log").push(tenant);
            drop(slot);
        });
        until(|| bh.stats().queued == queued + 1).await;
        task
    }

    async fn served(
        holder: Slot,
        tasks: Vec<tokio::task::JoinHandle<()>>,
        log: &Log,
    ) -> Vec<&'static str> {
        drop(holder);
        for t in tasks {
            t.await.expect("task");
        }
        log.lock().expect("log").clone()
    }

    fn queue_is_forgotten(bh: &Bulkhead) {
        let st = bh.inner.lock();
        assert!(st.levels.is_empty() && st.tenants.is_empty() && st.queued == 0);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_grants_between_waiting_tenants() {
        let bh = bulkhead(1, 64);
        let holder = bh.acquire("x", 0, None).await.expect("holder");
        let log = Log::default();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(claimant(&bh, "a", 0, 1, 3.0, &log).await);
        }
        for _ in 0..8 {
            tasks.push(claimant(&bh, "b", 0, 1, 1.0, &log).await);
        }
        let order = served(holder, tasks, &log).await;
        // Weight 3 against 1: three grants in four go to a while both wait, although
        // all of a's calls arrived first.
        assert_eq!(order[..8], ["a", "b", "a", "a", "a", "b", "a", "a"]);
        assert_eq!(order[..12].iter().filter(|t| **t == "a").count(), 8);
        queue_is_forgotten(&bh);
    }

    #[tokio::test(start_paused = true)]
    async fn costs_are_charged_to_their_tenant() {
        let bh = bulkhead(1, 64);
        let holder = bh.acquire("x", 0, None).await.expect("holder");
        let log = Log::default();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            tasks.push(claimant(&bh, "big", 0, 4096, 1.0, &log).await);
        }
        for _ in 0..6 {
            tasks.push(claimant(&bh, "small", 0, 1024, 1.0, &log).await);
        }
        let order = served(holder, tasks, &log).await;
        // A call of 4 KiB costs as much as four of 1 KiB.
        assert_eq!(
            order[..7],
            ["big", "small", "small", "small", "small", "big", "small"]
        );
        assert_eq!(cost_of(b""), 0);
        assert_eq!(cost_of(&[0x0a, 0x01, b'm']), 3, "no max_tokens: bytes");
        queue_is_forgotten(&bh);
    }

    #[tokio::test(start_paused = true)]
    async fn lower_priorities_get_their_minimum_share() {
        let cfg = |min_share_low_priority| BulkheadConfig {
            max_concurrent: 1,
            max_queue: 64,
            min_share_low_priority,
            ..BulkheadConfig::default()
        };
        let bh = Arc::new(Bulkhead::new("simple".into(), cfg(0.25)));
        let holder = bh.acquire("x", 0, None).await.expect("holder");
        let log = Log::default();
        let mut tasks = Vec::new();
        for _ in 0..12 {
            tasks.push(claimant(&bh, "high", 5, 1, 1.0, &log).await);
        }
        for _ in 0..4 {
            tasks.push(claimant(&bh, "low", -1, 1, 1.0, &log).await);
        }
        let order = served(holder, tasks, &log).await;
        // One grant in four goes below the busy high priority.
        let expect: Vec<&str> = ["high", "high", "high", "low"].repeat(4);
        assert_eq!(order, expect);

        // 0 is strict priority.
        let bh = Arc::new(Bulkhead::new("simple".into(), cfg(0.0)));
        let holder = bh.acquire("x", 0, None).await.expect("holder");
        let log = Log::default();
        let mut tasks = Vec::new();
        tasks.push(claimant(&bh, "low", -1, 1, 1.0, &log).await);
        for _ in 0..6 {
            tasks.push(claimant(&bh, "high", 5, 1, 1.0, &log).await);
        }
        let order = served(holder, tasks, &log).await;
        assert_eq!(order.last(), Some(&"low"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_frees_its_place_and_charges_nothing() {
        let bh = bulkhead(1, 5);
        let holder = bh.acquire("x", 0, None).await.expect("holder");
        let log = Log::default();
        let mut tasks = vec![claimant(&bh, "a", 0, 1, 1.0, &log).await];
        // Tenant a queues a costly call behind its first one and gives up on it.
        let costly = claimant(&bh, "a", 0, 1 << 20, 1.0, &log).await;
        costly.abort();
        assert!(costly.await.expect_err("aborted").is_cancelled());
        let stats = bh.stats();
        assert_eq!((stats.queued, stats.cancelled_total), (1, 1));
        for tenant in ["c", "c", "a", "c"] {
            tasks.push(claimant(&bh, tenant, 0, 1, 1.0, &log).await);
        }
        // Its place was freed: the queue of 5 is full only now.
        let late = bh.acquire("b", 0, None).await.expect_err("full");
        assert!(matches!(late, Rejected::QueueFull { .. }), "{late:?}");
        // And a was not charged for it: its third call takes its turn with c's second
        // (behind it, by arrival), not a million bytes later.
        let order = served(holder, tasks, &log).await;
        assert_eq!(order, ["a", "c", "c", "a", "c"]);
        queue_is_forgotten(&bh);
    }

    #[tokio::test(start_paused = true)]
    async fn admits_at_once_while_slots_are_free() {
        let bh = bulkhead(2, 4);
        let a = bh.acquire("t", 0, None).await.expect("first");
        let b = bh.acquire("t", 0, None).await.expect("second");
        assert_eq!(a.model(), "simple");
        assert_eq!(b.tenant(), "t");
        assert_eq!(bh.stats().active, 2);
        drop((a, b));
        assert_eq!(bh.stats().active, 0);
        let unlimited = bulkhead(0, 0);
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(unlimited.acquire("t", 0, None).await.expect("unlimited"));
        }
        assert_eq!(unlimited.stats().active, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_fifo_within_a_priority() {
        let bh = bulkhead(1, 8);
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for id in 0..4 {
            tasks.push(waiter(&bh, "t", 0, id, &order));
            until(|| bh.stats().queued == id + 1).await;
        }
        drop(holder);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2, 3]);
        assert_eq!(bh.stats().active, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_waiters_go_first() {
        let bh = bulkhead(1, 8);
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (id, priority) in [0, 5, -1, 5, 0].into_iter().enumerate() {
            tasks.push(waiter(&bh, "t", priority, id, &order));
            until(|| bh.stats().queued == id + 1).await;
        }
        drop(holder);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("order"), vec![1, 3, 0, 4, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_rejects_at_once_with_pushback() {
        let bh = bulkhead(1, 1);
        let _holder = bh.acquire("t", 0, None).await.expect("holder");
        let order = Arc::new(Mutex::new(Vec::new()));
        let _queued = waiter(&bh, "t", 0, 0, &order);
        until(|| bh.stats().queued == 1).await;
        let err = bh.acquire("t", 9, None).await.expect_err("full");
        assert!(matches!(err, Rejected::QueueFull { .. }), "{err:?}");
        assert_eq!(err.model(), "simple");
        assert_eq!(err.limit(), ("max_queue", 1));
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // No hold time measured yet: the pushback is the queue timeout.
        assert_eq!(err.pushback(), Duration::from_millis(1000));
        assert_eq!(
            err.message(),
            "model simple: bulkhead full (max_concurrent 1, max_queue 1 waiting); retry in 1000 ms"
        );
        assert_eq!(bh.stats().rejected_full_total, 1);

        let no_queue = bulkhead(1, 0);
        let _h = no_queue.acquire("t", 0, None).await.expect("holder");
        assert!(matches!(
            no_queue.acquire("t", 0, None).await,
            Err(Rejected::QueueFull { max_queue: 0, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_timeout_rejects() {
        let bh = Bulkhead::new(
            "simple".into(),
            BulkheadConfig {
                max_concurrent: 1,
                max_queue: 4,
                queue_timeout_ms: 20,
                tenant_share: None,
                ..BulkheadConfig::default()
            },
        );
        let _holder = bh.acquire("t", 0, None).await.expect("holder");
        let start = Instant::now();
        let err = bh.acquire("t", 0, None).await.expect_err("timeout");
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert!(matches!(err, Rejected::QueueTimeout { .. }), "{err:?}");
        assert_eq!(err.limit(), ("queue_timeout_ms", 20));
        assert!(err.message().starts_with(
            "model simple: no bulkhead slot within queue_timeout 20 ms (max_concurrent 1)"
        ));
        let stats = bh.stats();
        assert_eq!((stats.queued, stats.rejected_timeout_total), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_before_queue_timeout_rejects_early() {
        let bh = bulkhead(1, 4); // queue_timeout 1000 ms
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        let start = Instant::now();
        let err = bh
            .acquire("t", 0, Some(start + Duration::from_millis(20)))
            .await
            .expect_err("deadline");
        let waited = start.elapsed();
        assert_eq!(
            waited,
            Duration::from_millis(20),
            "the deadline, not queue_timeout"
        );
        assert!(matches!(err, Rejected::DeadlineTooClose { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            err.message(),
            "model simple: deadline reached before a bulkhead slot freed (max_concurrent 1, waited 20 ms); retry in 1000 ms"
        );

        // A slot that frees before the deadline is taken.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(holder);
        });
        let start = Instant::now();
        let slot = bh
            .acquire("t", 0, Some(start + Duration::from_millis(20)))
            .await
            .expect("slot freed in time");
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        release.await.expect("release");
        let holder = slot;

        // A deadline already passed is refused at once, even with a slot free.
        drop(holder);
        let err = bh
            .acquire("t", 0, Some(Instant::now()))
            .await
            .expect_err("past deadline");
        assert!(matches!(
            err,
            Rejected::DeadlineTooClose {
                waited: Duration::ZERO,
                ..
            }
        ));
        // A far deadline does not stop an admission.
        let _slot = bh
            .acquire("t", 0, Some(Instant::now() + Duration::from_secs(5)))
            .await
            .expect("slot");
        let stats = bh.stats();
        assert_eq!(
            (
                stats.rejected_deadline_total,
                stats.active,
                stats.admitted_total
            ),
            (2, 1, 3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slot_is_freed_on_drop_abort_and_panic() {
        let bh = bulkhead(1, 4);
        drop(bh.acquire("t", 0, None).await.expect("slot"));
        assert_eq!(bh.stats().active, 0);

        let held = bh.clone();
        let task = tokio::spawn(async move {
            let _slot = held.acquire("t", 0, None).await.expect("slot");
            std::future::pending::<()>().await;
        });
        until(|| bh.stats().active == 1).await;
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        assert_eq!(bh.stats().active, 0);

        let held = bh.clone();
        let task = tokio::spawn(async move {
            let _slot = held.acquire("t", 0, None).await.expect("slot");
            panic!("task holding a slot panics");
        });
        assert!(task.await.expect_err("panicked").is_panic());
        assert_eq!(bh.stats().active, 0);
        // And the bulkhead still works.
        let _slot = bh.acquire("t", 0, None).await.expect("slot after panic");
    }

    #[tokio::test(start_paused = true)]
    async fn freed_slot_goes_to_a_waiter_whose_holder_was_aborted() {
        let bh = bulkhead(1, 4);
        let held = bh.clone();
        let holder = tokio::spawn(async move {
            let _slot = held.acquire("t", 0, None).await.expect("slot");
            std::future::pending::<()>().await;
        });
        until(|| bh.stats().active == 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let w = waiter(&bh, "t", 0, 7, &order);
        until(|| bh.stats().queued == 1).await;
        holder.abort();
        w.await.expect("waiter");
        assert_eq!(*order.lock().expect("order"), vec![7]);
        assert_eq!(bh.stats().active, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_leaves_the_queue() {
        let bh = bulkhead(1, 4);
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        let queued = bh.clone();
        let task = tokio::spawn(async move { queued.acquire("t", 0, None).await.map(drop) });
        until(|| bh.stats().queued == 1).await;
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        let stats = bh.stats();
        assert_eq!(
            (stats.queued, stats.active, stats.cancelled_total),
            (0, 1, 1)
        );
        drop(holder);
        assert_eq!(bh.stats().active, 0);
        let _slot = bh.acquire("t", 0, None).await.expect("slot");
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_cancelled_as_its_grant_arrives_gives_the_slot_back() {
        let bh = bulkhead(1, 4);
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        let mut fut = Box::pin(bh.acquire("t", 0, None));
        std::future::poll_fn(|cx| {
            assert!(fut.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(bh.stats().queued, 1);
        // The holder's drop grants the slot to the queued future...
        drop(holder);
        let stats = bh.stats();
        assert_eq!((stats.queued, stats.active), (0, 1));
        // ...which is cancelled before it could see the grant.
        drop(fut);
        assert_eq!(bh.stats().active, 0);
        let _slot = bh.acquire("t", 0, None).await.expect("slot");
    }

    #[tokio::test(start_paused = true)]
    async fn tenant_share_is_enforced_while_others_get_slots() {
        let bh = Arc::new(Bulkhead::new(
            "simple".into(),
            BulkheadConfig {
                max_concurrent: 4,
                max_queue: 2,
                queue_timeout_ms: 1000,
                tenant_share: Some(0.5),
                ..BulkheadConfig::default()
            },
        ));
        let a1 = bh.acquire("a", 0, None).await.expect("a1");
        let _a2 = bh.acquire("a", 0, None).await.expect("a2");
        // Tenant a is at its share (2 of 4): it queues although slots are free...
        let order = Arc::new(Mutex::new(Vec::new()));
        let a3 = waiter(&bh, "a", 10, 3, &order);
        until(|| bh.stats().queued == 1).await;
        // ...and may hold only ceil(0.5 × 2) = 1 queue place.
        let err = bh.acquire("a", 0, None).await.expect_err("a's queue share");
        assert!(matches!(err, Rejected::TenantQueueFull { waiting: 1, .. }));
        assert_eq!(
            err.message(),
            "model simple: tenant a holds its bulkhead queue share (1 waiting, tenant_share 0.5 of max_queue 2); retry in 1000 ms"
        );
        // Tenant b still gets slots at once, passing a's higher-priority waiter.
        let b1 = bh.acquire("b", 0, None).await.expect("b1");
        let _b2 = bh.acquire("b", 0, None).await.expect("b2");
        assert_eq!(bh.stats().active, 4);
        // A slot freed by b cannot go to a (still at its share).
        drop(b1);
        tokio::task::yield_now().await;
        assert_eq!((bh.stats().active, bh.stats().queued), (3, 1));
        assert!(order.lock().expect("order").is_empty());
        // One of a's own calls ending lets a's waiter in.
        drop(a1);
        a3.await.expect("a3");
        assert_eq!(*order.lock().expect("order"), vec![3]);
        assert_eq!(bh.stats().active, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_every_outcome() {
        let bh = Arc::new(Bulkhead::new(
            "simple".into(),
            BulkheadConfig {
                max_concurrent: 1,
                max_queue: 1,
                queue_timeout_ms: 10,
                tenant_share: None,
                ..BulkheadConfig::default()
            },
        ));
        let holder = bh.acquire("t", 0, None).await.expect("holder");
        assert!(bh.acquire("t", 0, None).await.is_err()); // timeout
        let order = Arc::new(Mutex::new(Vec::new()));
        let w = {
            let bh = bh.clone();
            tokio::spawn(async move {
                let r = bh.acquire("t", 0, None).await;
                order.lock().expect("order").push(r.is_ok());
            })
        };
        until(|| bh.stats().queued == 1).await;
        assert!(bh.acquire("t", 0, None).await.is_err()); // full
        assert!(bh.acquire("t", 0, Some(Instant::now())).await.is_err()); // deadline
        drop(holder);
        w.await.expect("waiter");
        assert_eq!(
            bh.stats(),
            BulkheadStats {
                active: 0,
                queued: 0,
                admitted_total: 2,
                rejected_full_total: 1,
                rejected_timeout_total: 1,
                rejected_deadline_total: 1,
                cancelled_total: 0,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_admits_waiters() {
        let bh = bulkhead(1, 8);
        let _holder = bh.acquire("t", 0, None).await.expect("holder");
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..2)
            .map(|id| {
                let bh = bh.clone();
                let order = order.clone();
                tokio::spawn(async move {
                    let slot = bh.acquire("t", 0, None).await.expect("slot");
                    order.lock().expect("order").push(id);
                    slot
                })
            })
            .collect();
        until(|| bh.stats().queued == 2).await;
        let mut cfg = bh.config();
        cfg.max_concurrent = 3;
        bh.set_limits(cfg).expect("valid");
        let mut slots = Vec::new();
        for t in tasks {
            slots.push(t.await.expect("task"));
        }
        let stats = bh.stats();
        assert_eq!((stats.active, stats.queued), (3, 0));
        // Lowering it admits no one new until calls in flight drop below it.
        let mut cfg = bh.config();
        cfg.max_concurrent = 1;
        bh.set_limits(cfg).expect("valid");
        assert!(matches!(
            bh.acquire("t", 0, Some(Instant::now() + Duration::from_millis(5)))
                .await,
            Err(Rejected::DeadlineTooClose { .. })
        ));
        assert!(bh
            .set_limits(BulkheadConfig {
                tenant_share: Some(1.5),
                ..BulkheadConfig::default()
            })
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_follows_measured_hold_times() {
        let bh = bulkhead(2, 8);
        let slot = bh.acquire("t", 0, None).await.expect("slot");
        tokio::time::advance(Duration::from_millis(40)).await;
        drop(slot);
        let _a = bh.acquire("t", 0, None).await.expect("a");
        let _b = bh.acquire("t", 0, None).await.expect("b");
        let err = bh
            .acquire("t", 0, Some(Instant::now()))
            .await
            .expect_err("deadline");
        // One slot of two frees about every 20 ms; never more than queue_timeout.
        let pushback = err.pushback();
        assert_eq!(pushback, Duration::from_millis(20));
        assert!(err.message().ends_with("retry in 20 ms"), "{err}");
    }

    #[test]
    fn config_defaults_parse_and_validate() {
        let cfg: BulkheadConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(cfg, BulkheadConfig::default());
        assert_eq!(cfg.max_queue, 64);
        assert!(cfg.validate().is_ok());
        let err = serde_json::from_str::<BulkheadConfig>(r#"{"max_concurent": 3}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("max_concurent"), "{err}");
        let bad = |cfg: BulkheadConfig, field: &str| {
            let err = cfg
                .validate()
                .expect_err("invalid")
                .under("bulkhead")
                .to_string();
            assert!(err.contains(field), "{err}");
        };
        bad(
            BulkheadConfig {
                max_concurrent: 4,
                tenant_share: Some(0.0),
                ..Default::default()
            },
            "tenant_share",
        );
        bad(
            BulkheadConfig {
                max_concurrent: 4,
                tenant_share: Some(f64::NAN),
                ..Default::default()
            },
            "tenant_share",
        );
        bad(
            BulkheadConfig {
                tenant_share: Some(0.5),
                ..Default::default()
            },
            "max_concurrent",
        );
        bad(
            BulkheadConfig {
                queue_timeout_ms: 0,
                ..Default::default()
            },
            "queue_timeout_ms",
        );
        assert_eq!(share_of(0.5, 3), Some(2));
        assert_eq!(share_of(0.01, 8), Some(1));
        assert_eq!(share_of(1.0, 8), Some(8));
        assert_eq!(share_of(0.5, 0), None);
    }
}
