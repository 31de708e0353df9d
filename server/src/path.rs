//! The request path of forwarded calls, written once, outermost layer first. A newcomer
//! looking for where a call is admitted, routed, retried, balanced, sent and recorded
//! starts here; each step is one call into its own module.
//!
//! Unary (`ModelInfer`, `ModelMetadata`, `ModelConfig`, `ModelStatistics`):
//! 1. admission: refuse while shutting down; find the tenant (API key or metadata) and
//!    the priority; the tenant's and the model's token buckets (`ratelimit`);
//! 2. read: exactly one gRPC message, within `max_message_bytes`, never decoded (`wire`);
//! 3. route: peek model, version and id from the bytes; find the model's route (`pool`);
//! 4. deadline: the caller's `grpc-timeout`, else the model's default, cut to its maximum;
//!    then, for `ModelInfer` of a model with a cache, the response cache (`cache`): a
//!    hit or an identical call's answer ends the call here; a miss leads steps 5-9;
//! 5. bulkhead: a slot in the model's bounded concurrency, or a bounded wait (`bulkhead`);
//! 6. retry: attempts within the retry budget, each on a different backend where one
//!    exists, with backoff, while the deadline leaves room for a whole try (`retry`);
//!    hedging races a second attempt after a delay when the model asks for it;
//! 7. pick: the model's policy over eligible endpoints, taking circuit permits
//!    (`balance`, `breaker`); no backend → the model's fallback, or UNAVAILABLE naming why;
//!    a call of a stateful sequence goes to the backend its sequence is pinned to
//!    (`sequence`), once: no retry elsewhere, no hedge, no fallback;
//! 8. per-try timeout around the attempt;
//!    An attempt that has received nothing within the model's no-response bound is
//!    given up and re-sent elsewhere when a retry may follow (`attempt`);
//! 9. endpoint: an [`Attempt`] (in-flight guard, circuit permits, span), metadata passed
//!    on with the remaining deadline, the original bytes sent; the backend's response
//!    body handed back unchanged inside an [`ObservedBody`] that ends the attempt once
//!    (breaker, outlier detection, metrics, span) and releases the bulkhead slot.
//!
//! `ModelStreamInfer` goes through the same admission, rate limit, bulkhead (one slot
//! for the stream's whole life), route and pick for its first routable message, and the
//! same retry policy and budget while opening the backend stream (only before the
//! backend answered), then stays pinned to that backend; both directions flow
//! concurrently and a message for an unknown model before pinning is answered
//! in-stream, leaving the stream usable.

use crate::attempt::{Attempt, Outcome};
use crate::auth::ApiKeys;
use crate::bulkhead::Slot;
use crate::cache::{self, ResponseCache};
use crate::config::LoadConfig;
use crate::config::TenantConfig;
use crate::endpoint::Endpoint;
use crate::global_limit::GlobalLimiter;
use crate::load_report;
use crate::models::{ModelPolicy, Models};
use crate::pool::{ModelRoute, Picked};
use crate::pool::{Pool, RouteError};
use crate::proxy::{self, ObservedBody};
use crate::ratelimit::{RateKey, RateLimiter};
use crate::retry::{self, Failure};
use crate::sequence::Sequences;
use crate::telemetry;
use crate::wire::{self, Deframer, Message, RouteKey};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use infergate_base::trace::{self, attr, CallSpan};
use infergate_proto::inference::{ModelInferResponse, ModelStreamInferResponse};
use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

/// The RPCs the gateway forwards as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// `ModelInfer`
    ModelInfer,
    /// `ModelMetadata`
    ModelMetadata,
    /// `ModelConfig`
    ModelConfig,
    /// `ModelStatistics`
    ModelStatistics,
    /// `ModelStreamInfer`
    ModelStreamInfer,
}

impl Forwarded {
    /// The forwarded RPC for a request path, if it is one.
    pub fn from_path(path: &str) -> Option<Forwarded> {
        Some(
            match path.strip_prefix("/inference.GRPCInferenceService/")? {
                "ModelInfer" => Forwarded::ModelInfer,
                "ModelMetadata" => Forwarded::ModelMetadata,
                "ModelConfig" => Forwarded::ModelConfig,
                "ModelStatistics" => Forwarded::ModelStatistics,
                "ModelStreamInfer" => Forwarded::ModelStreamInfer,
                _ => return None,
            },
        )
    }

    /// The method name.
    pub fn name(self) -> &'static str {
        match self {
            Forwarded::ModelInfer => "ModelInfer",
            Forwarded::ModelMetadata => "ModelMetadata",
            Forwarded::ModelConfig => "ModelConfig",
            Forwarded::ModelStatistics => "ModelStatistics",
            Forwarded::ModelStreamInfer => "ModelStreamInfer",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Forwarded::ModelInfer => "/inference.GRPCInferenceService/ModelInfer",
            Forwarded::ModelMetadata => "/inference.GRPCInferenceService/ModelMetadata",
            Forwarded::ModelConfig => "/inference.GRPCInferenceService/ModelConfig",
            Forwarded::ModelStatistics => "/inference.GRPCInferenceService/ModelStatistics",
            Forwarded::ModelStreamInfer => "/inference.GRPCInferenceService/ModelStreamInfer",
        }
    }

    /// The request message and its model-name field, for error messages.
    fn request_field(self) -> (&'static str, &'static str) {
        match self {
            Forwarded::ModelInfer | Forwarded::ModelStreamInfer => {
                ("ModelInferRequest", "model_name")
            }
            Forwarded::ModelMetadata => ("ModelMetadataRequest", "name"),
            Forwarded::ModelConfig => ("ModelConfigRequest", "name"),
            Forwarded::ModelStatistics => ("ModelStatisticsRequest", "name"),
        }
    }
}

/// State shared by every call on the front door.
pub struct Gateway {
    /// The backends and routes.
    pub pool: Arc<Pool>,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// How load reports on responses are read.
    pub load: Arc<LoadConfig>,
    /// Per-model admission and recovery settings.
    pub models: Models,
    /// Tenant and priority extraction.
    pub tenants: TenantConfig,
    /// `tenants.priority_header`, parsed once (`None`: not a valid header name, so
    /// never sent).
    priority_header: Option<HeaderName>,
    /// API keys, compared as digests; what credentials stay at the gateway.
    pub keys: ApiKeys,
    /// Rate limits kept in this process (a trait object, so another can replace it).
    pub limiter: Option<Arc<dyn RateLimiter>>,
    /// Rate limits shared by every replica, kept in Redis (`scope = "global"`).
    pub global: Option<Arc<GlobalLimiter>>,
    /// Kept back from the remaining deadline passed to backends.
    pub deadline_margin: Duration,
    /// Stateful sequences pinned to their backends.
    pub sequences: Sequences,
    /// Response caches of the models that have one, and identical calls in flight.
    pub cache: ResponseCache,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// What a call is labelled with in metrics: a model the pool knows, or `unknown`.
const UNKNOWN_MODEL: &str = "unknown";

/// Who a call is for, and how urgent it is.
#[derive(Debug, Clone)]
struct Caller {
    tenant: String,
    priority: i32,
}

/// How one attempt ended when it did not produce a response to hand back.
struct AttemptFailed {
    failure: Failure,
    status: Status,
}

impl Gateway {
    /// Gateway state over `pool`, with the settings of `config`.
    pub fn new(
        pool: Arc<Pool>,
        config: &crate::config::Config,
        load: Arc<LoadConfig>,
    ) -> Result<Arc<Gateway>, String> {
        let limiter: Option<Arc<dyn RateLimiter>> = if config.rate_limit.is_enabled() {
            Some(Arc::new(crate::ratelimit::LocalRateLimiter::new(
                config.rate_limit.clone(),
            )?))
        } else {
            None
        };
        let global = if config.rate_limit.has_global() {
            Some(Arc::new(GlobalLimiter::new(
                &config.rate_limit,
                &config.redis,
                pool.events().clone(),
            )?))
        } else {
            None
        };
        let cache = ResponseCache::new(config, global.as_ref().map(|g| g.connection()))?;
        Ok(Arc::new(Gateway {
            keys: ApiKeys::new(&config.tenants)?,
            cache,
            global,
            pool,
            max_message_bytes: config.max_message_bytes,
            load,
            models: Models::new(config),
            tenants: config.tenants.clone(),
            priority_header: HeaderName::try_from(config.tenants.priority_header.as_str()).ok(),
            limiter,
            deadline_margin: Duration::from_millis(config.deadline_margin_ms),
            sequences: Sequences::new(&config.sequences),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// From now on new calls are refused (graceful shutdown).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn admit(&self) -> Result<(), Status> {
        if self.is_shutting_down() {
            return Err(Status::unavailable(
                "the gateway is shutting down; retry on another replica",
            ));
        }
        Ok(())
    }

    /// The tenant (`auth`: from the API key; the tenant header only where no keys are
    /// configured or `trust_header` says so; else `anonymous`), or UNAUTHENTICATED; and
    /// the priority (header, or Triton's `priority` parameter: 1 is its highest level,
    /// so it maps to a high priority here; 0, its default, stays 0).
    fn caller(&self, headers: &HeaderMap, payload: Option<&[u8]>) -> Result<Caller, Status> {
        let tenant = self.keys.tenant(headers)?;
        let priority = (self.priority_header.as_ref())
            .and_then(|name| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.trim().parse::<i32>().ok())
            .or_else(|| {
                payload
                    .and_then(|p| wire::peek_int_parameter(p, "priority"))
                    .filter(|p| *p > 0)
                    .map(|p| 1_000_000 - p.min(1_000_000) as i32)
            })
            .unwrap_or(0);
        Ok(Caller { tenant, priority })
    }

    /// The metadata a call sends its backend: the caller's, without its connection's
    /// headers and the credentials that stay here, with the resolved tenant (none for
    /// a `ModelStatistics` of every model, which is not admitted per tenant).
    fn outgoing(&self, src: &HeaderMap, tenant: Option<&str>) -> HeaderMap {
        self.keys.outgoing(src, tenant, proxy::is_hop_by_hop)
    }

    /// Local limits first, then the global ones (one Redis round trip at most).
    async fn rate_limit(&self, caller: &Caller, model: &str) -> Result<(), Status> {
        if self.limiter.is_none() && self.global.is_none() {
            return Ok(());
        }
        let key = RateKey::new(caller.tenant.clone(), model.to_owned());
        let mut decision = match &self.limiter {
            Some(limiter) => limiter.check(&key, Instant::now()),
            None => Ok(()),
        };
        if let (Ok(()), Some(global)) = (&decision, &self.global) {
            decision = global.check(&key).await;
        }
        decision.map_err(|limited| limited_status(model, &limited))
    }

    /// A stream's tokens: `responses` more sent to its tenant; the status that ends the
    /// stream once the tenant's debt is past its burst.
    fn stream_sent(&self, up: &Upstream, responses: u32, model: &str) -> Result<(), Status> {
        match &self.limiter {
            Some(limiter) if responses > 0 => limiter
                .stream_sent(&up.tenant, responses, Instant::now())
                .map_err(|limited| limited_status(model, &limited)),
            _ => Ok(()),
        }
    }

    /// A forwarded unary call, start to end.
    pub async fn unary(
        self: Arc<Self>,
        rpc: Forwarded,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let started = Instant::now();
        let mut record = CallRecord::start(rpc, started);
        let mut span = trace::request_span(&request);
        match self
            .forward_unary(rpc, request, started, &mut record.label, &mut span)
            .await
        {
            Ok(response) => {
                // The response body's end records the call from here on.
                record.handed_over();
                response
            }
            Err(status) => {
                record.end(Some(status.code()));
                let label = &record.label;
                tracing::debug!(
                    method = rpc.name(),
                    model = %label,
                    code = ?status.code(),
                    trace_id = span.trace_id().unwrap_or_default(),
                    "call refused: {}",
                    status.message()
                );
                span.end_with_status(&status);
                status.into_http()
            }
        }
    }

    async fn forward_unary(
        &self,
        rpc: Forwarded,
        request: http::Request<Body>,
        started: Instant,
        label: &mut String,
        span: &mut CallSpan,
    ) -> Result<http::Response<Body>, Status> {
        // 1. admission (shutdown; tenant and rate limit follow once the model is known)
        self.admit()?;
        // The caller's own deadline bounds reading and routing too: its answer must be
        // the gateway's DEADLINE_EXCEEDED, before the server's own timer cancels it.
        let (parts, body) = request.into_parts();
        let asked = caller_deadline(&parts.headers, started);
        let read_and_route = async {
            // 2. read
            let message = proxy::read_unary(body, self.max_message_bytes, rpc.name()).await?;
            // 3. route
            let key = self.peek(rpc, &message)?;
            telemetry::request_bytes(rpc.name(), message.wire_len());
            if key.model.is_empty() && rpc == Forwarded::ModelStatistics {
                return Ok((message, key, None));
            }
            let route = self.pool.route(&key.model).await.map_err(route_status)?;
            Ok::<_, Status>((message, key, Some(route)))
        };
        let (message, key, route) = match asked {
            Some(d) => tokio::time::timeout_at(self.answer_by(d), read_and_route)
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "deadline of {} ms passed before the {} request was read and routed",
                        d.saturating_duration_since(started).as_millis(),
                        rpc.name()
                    ))
                })??,
            None => read_and_route.await?,
        };
        let Some(route) = route else {
            return self
                .forward_any(rpc, &parts.headers, message, started)
                .await;
        };
        label.clone_from(&route.model);
        if rpc == Forwarded::ModelInfer && route.decoupled {
            return Err(Status::invalid_argument(format!(
                "model '{}' is decoupled (it may answer a request with many responses or none): \
                 ModelInfer cannot carry that; use ModelStreamInfer",
                infergate_base::text::shown(&key.model)
            )));
        }
        let policy = self.models.get(&route.model);
        policy.fit_bulkhead(&route.endpoints);
        let payload = message.payload();
        let caller = self.caller(
            &parts.headers,
            (rpc == Forwarded::ModelInfer).then_some(payload.as_ref()),
        )?;
        span.set_attr(attr::MODEL, route.model.as_str());
        span.set_attr(attr::TENANT, caller.tenant.as_str());
        span.set_attr(attr::POLICY, route.policy.kind().as_str());
        self.rate_limit(&caller, &route.model).await?;
        // 4. deadline
        let deadline = deadline(&parts.headers, &policy, started);
        // 4b. response cache (cache.rs): a hit, or the answer of an identical call in
        // flight, costs no bulkhead slot, no backend call and no retry budget.
        let lookup = (rpc == Forwarded::ModelInfer)
            .then(|| self.cache.lookup(&route.model, &key.version, &payload))
            .flatten();
        let cached = lookup.is_some();
        let forward = async {
            if cached {
                span.set_attr(attr::CACHE, cache::Served::Miss.as_str());
            }
            // 5. bulkhead
            let wait = span.child("bulkhead");
            let cost = crate::bulkhead::cost_of(&payload);
            let admitted = self.bulkhead(&policy, &caller, cost, deadline).await;
            wait.set_attr(
                attr::QUEUE_WAIT_MS,
                started.elapsed().as_secs_f64() * 1000.0,
            );
            wait.end(if admitted.is_ok() {
                Code::Ok
            } else {
                Code::ResourceExhausted
            });
            let (slot, route, policy, fallback) = match admitted {
                Ok(slot) => (slot, route, policy, None),
                // A sequence's state is on its model's backend: it never falls back.
                Err(rejected)
                    if policy.fallback_when_full
                        && policy.fallback.is_some()
                        && key.sequence.is_none() =>
                {
                    let (route, policy) =
                        Box::pin(self.fallback_route(&policy, &rejected.message())).await?;
                    let slot = self
                        .bulkhead(&policy, &caller, cost, deadline)
                        .await
                        .map_err(rejected_status)?;
                    let name = route.model.clone();
                    (slot, route, policy, Some(name))
                }
                Err(rejected) => return Err(rejected_status(rejected)),
            };
            // 6.-9. retries, pick, per-try timeout, endpoint
            let call = Call {
                rpc,
                headers: &parts.headers,
                message: &message,
                deadline,
                span,
                tenant: &caller.tenant,
                failed_with: AtomicI32::new(-1),
                sequence: key.sequence.as_ref(),
            };
            let result = match deadline {
                Some(d) => {
                    match tokio::time::timeout_at(
                        self.answer_by(d),
                        self.attempts(&call, route, policy, fallback),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "deadline of {} ms exceeded before a backend answered (model {})",
                            d.saturating_duration_since(started).as_millis(),
                            infergate_base::text::shown(&key.model)
                        ))),
                    }
                }
                None => self.attempts(&call, route, policy, fallback).await,
            };
            let (response, attempt) = result?;
            Ok(wrap_response(
                response,
                attempt,
                &self.load,
                deadline,
                call_end(rpc, started, label.clone(), slot, std::mem::take(span)),
            ))
        };
        let Some(lookup) = lookup else {
            return forward.await;
        };
        let wait = cache::Wait {
            answer_by: deadline.map(|d| self.answer_by(d)),
            deadline: deadline.map(|d| d.saturating_duration_since(started)),
        };
        // Boxed, as are the other rare branches below (hedging, fallback): a future is as
        // large as its largest state and is moved whole at every level that awaits it,
        // so an inline cache lookup made every call copy kilobytes (BENCHMARKS.md).
        let answer = Box::pin(lookup.serve(wait, forward)).await?;
        let served = answer.served();
        if served != cache::Served::Miss {
            span.set_attr(attr::CACHE, served.as_str());
            call_end(rpc, started, label.clone(), None, std::mem::take(span))(Some(Code::Ok));
        }
        Ok(answer.into_response(&key.id))
    }

    /// When the gateway answers a call whose deadline is `d`: a margin before it, since
    /// the caller's gRPC stack (and this server's own) give up at the deadline itself,
    /// so the DEADLINE_EXCEEDED that names the model must be on its way by then.
    fn answer_by(&self, d: Instant) -> Instant {
        d.checked_sub(self.deadline_margin).unwrap_or(d)
    }

    /// Step 6 for every kind of call: whether an attempt that failed this way is tried
    /// again, and after which backoff. Spends from the model's retry budget.
    fn retry_after(
        &self,
        policy: &ModelPolicy,
        failure: &Failure,
        attempt: u32,
        deadline: Option<Instant>,
    ) -> Option<Duration> {
        if !retry::is_retryable(failure, policy.retryable) || attempt >= policy.retry.max_attempts {
            return None;
        }
        let backoff = RNG.with(|rng| retry::backoff(attempt, &policy.retry, &mut rng.borrow_mut()));
        if !retry::may_retry(
            Instant::now(),
            deadline,
            policy.retry.per_try_timeout(),
            backoff,
        ) {
            return None;
        }
        if !policy.budget.try_withdraw(Instant::now()) {
            metrics::counter!("infergate_retry_budget_exhausted_total", "model" => policy.name.clone()).increment(1);
            return None;
        }
        metrics::counter!("infergate_retries_total", "model" => policy.name.clone()).increment(1);
        Some(backoff)
    }

    /// When attempt number `attempt`, begun at `began`, is given up if the backend has
    /// sent nothing: at the per-try timeout, and at the model's no-response bound when
    /// a retry could still follow (the last try waits for as long as the caller does).
    fn give_up_at(
        &self,
        policy: &ModelPolicy,
        attempt: u32,
        began: Instant,
        bound: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Option<(Instant, GiveUp)> {
        let per_try = policy
            .retry
            .per_try_timeout()
            .map(|t| (began + t, GiveUp::PerTry(t)));
        let silent = bound
            .filter(|b| {
                attempt < policy.retry.max_attempts
                    && retry::may_retry(
                        began + *b,
                        deadline,
                        policy.retry.per_try_timeout(),
                        Duration::ZERO,
                    )
                    && policy.budget.available(began) >= 1.0
            })
            .map(|b| (began + b, GiveUp::Silent(b)));
        match (per_try, silent) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    async fn bulkhead(
        &self,
        policy: &ModelPolicy,
        caller: &Caller,
        cost: u64,
        deadline: Option<Instant>,
    ) -> Result<Option<Slot>, crate::bulkhead::Rejected> {
        let Some(bulkhead) = &policy.bulkhead else {
            return Ok(None);
        };
        let waited = Instant::now();
        let claim = crate::bulkhead::Claim {
            tenant: &caller.tenant,
            priority: caller.priority,
            cost,
            weight: self.tenants.weights.of(&caller.tenant),
        };
        let slot = bulkhead.acquire_claim(claim, deadline).await;
        telemetry::bulkhead_waited(&policy.name, waited.elapsed());
        if let Err(rejected) = &slot {
            metrics::counter!("infergate_bulkhead_rejected_total", "model" => policy.name.clone(), "reason" => rejected.reason())
                .increment(1);
        }
        slot.map(Some)
    }

    async fn fallback_route(
        &self,
        policy: &ModelPolicy,
        why: &str,
    ) -> Result<(Arc<ModelRoute>, Arc<ModelPolicy>), Status> {
        let Some(fallback) = &policy.fallback else {
            return Err(Status::unavailable(why.to_owned()));
        };
        let route = self.pool.route(fallback).await.map_err(|e| {
            Status::unavailable(format!(
                "{why}; fallback model '{fallback}' unavailable too: {e}"
            ))
        })?;
        metrics::counter!("infergate_fallbacks_total", "model" => policy.name.clone(), "fallback" => route.model.clone()).increment(1);
        let fallback_policy = self.models.get(&route.model);
        fallback_policy.fit_bulkhead(&route.endpoints);
        Ok((route, fallback_policy))
    }

    /// Steps 6 to 9: attempts until one produces a response to hand back.
    async fn attempts(
        &self,
        call: &Call<'_>,
        mut route: Arc<ModelRoute>,
        mut policy: Arc<ModelPolicy>,
        mut fallback: Option<String>,
    ) -> Result<(http::Response<Body>, Attempt), Status> {
        if let Some(seq) = call.sequence {
            return Box::pin(self.sequenced(call, &route, &policy, seq)).await;
        }
        let original = policy.clone();
        original.budget.record_request(Instant::now());
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut attempt = 0u32;
        let mut primary_failure: Option<String> = None;
        loop {
            attempt += 1;
            // 7. pick (or fall back)
            let pick = call.span.child("pick");
            pick.set_attr(attr::CANDIDATES, route.endpoints.len() as i64);
            let key = route.policy.affinity_key(&call.message.payload());
            let picked = self.pool.pick_for_attempt_keyed(&route, &tried, key);
            if let Ok(p) = &picked {
                pick.set_attr(attr::BACKEND, p.endpoint.address());
                pick.set_attr(attr::SCORE, route.policy.score(&p.endpoint));
            }
            pick.end(if picked.is_ok() {
                Code::Ok
            } else {
                Code::Unavailable
            });
            let picked = match picked {
                Ok(p) => p,
                Err(e) if fallback.is_none() && policy.fallback.is_some() => {
                    let why = e.to_string();
                    let (r, p) = Box::pin(self.fallback_route(&policy, &why)).await?;
                    fallback = Some(r.model.clone());
                    primary_failure = Some(why);
                    route = r;
                    policy = p;
                    attempt -= 1;
                    continue;
                }
                Err(e) => {
                    return Err(match (&primary_failure, &fallback) {
                        (Some(why), Some(model)) => Status::unavailable(format!(
                            "{why}; fallback model '{model}' cannot take it either: {e}"
                        )),
                        _ => route_status(e),
                    })
                }
            };
            tried.push(Arc::clone(&picked.endpoint));
            let hedge_delay = if attempt == 1 && policy.hedge.enabled {
                retry::hedge_delay(&policy.hedge, &policy.latencies)
            } else {
                None
            };
            let outcome = match hedge_delay {
                Some(delay) => {
                    Box::pin(self.hedged(
                        call,
                        &route,
                        &policy,
                        picked,
                        delay,
                        fallback.as_deref(),
                        &mut tried,
                    ))
                    .await
                }
                None => {
                    self.attempt(call, &route, &policy, picked, attempt, fallback.as_deref())
                        .await
                }
            };
            let failed = match outcome {
                Ok(ok) => return Ok(ok),
                Err(failed) => failed,
            };
            // 6. retry?
            match self.retry_after(&original, &failed.failure, attempt, call.deadline) {
                Some(backoff) => tokio::time::sleep(backoff).await,
                None => return Err(failed.status),
            }
        }
    }

    /// A call of a stateful sequence: on the backend `sequence` pins it to, never hedged
    /// and never retried elsewhere, except a first request (`sequence_start`), which
    /// holds no state yet. An attempt that did not reach the backend or got no answer
    /// leaves the sequence's state unknown, so the sequence is lost.
    async fn sequenced(
        &self,
        call: &Call<'_>,
        route: &ModelRoute,
        policy: &Arc<ModelPolicy>,
        seq: &wire::SequenceKey,
    ) -> Result<(http::Response<Body>, Attempt), Status> {
        policy.budget.record_request(Instant::now());
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        loop {
            let picked = self.pick_sequenced(route, policy, seq, &tried)?;
            call.span.add_event("sequence pinned");
            let endpoint = Arc::clone(&picked.endpoint);
            tried.push(Arc::clone(&endpoint));
            let attempt_no = tried.len() as u32;
            let AttemptFailed { failure, status } = match self
                .attempt(call, route, policy, picked, attempt_no, None)
                .await
            {
                Ok(ok) => return Ok(ok),
                Err(failed) => failed,
            };
            if !seq.start {
                return Err(self.sequence_failed(route, policy, seq, &endpoint, &failure, status));
            }
            // A first request holds no state yet: like any call, it may be retried on
            // the next backend in the sequence's rendezvous order, which it re-pins to.
            match self.retry_after(policy, &failure, attempt_no, call.deadline) {
                Some(backoff) => tokio::time::sleep(backoff).await,
                None => return Err(status),
            }
        }
    }

    /// The pick of a sequenced call: the sequence's backend, with its circuit permits.
    fn pick_sequenced(
        &self,
        route: &ModelRoute,
        policy: &ModelPolicy,
        seq: &wire::SequenceKey,
        tried: &[Arc<Endpoint>],
    ) -> Result<Picked, Status> {
        let (now, panic, model) = (Instant::now(), self.pool.in_panic(), route.model.as_str());
        // Backends a first request failed on already count as not ready for it.
        let usable = |e: &Endpoint| match tried.iter().any(|t| std::ptr::eq(t.as_ref(), e)) {
            true => Err(crate::endpoint::Unavailable::NotReady),
            false => e.availability(model, now, panic),
        };
        let chosen = self.sequences.choose(
            model,
            seq,
            &route.endpoints,
            &usable,
            policy.sequence_idle,
            now,
        );
        let endpoint = chosen.map_err(|refused| match refused {
            crate::sequence::Refused::NoneEligible => route_status(RouteError::NoneEligible {
                model: route.model.clone(),
                summary: format!("the first request of sequence {}", seq.id),
            }),
            refused => refused.status(),
        })?;
        Pool::take_permits(&endpoint, model, now).ok_or_else(|| {
            Status::unavailable(format!(
                "sequence {} is pinned to backend {}, whose circuit admits no call now; try again",
                seq.id,
                endpoint.address()
            ))
        })
    }

    /// The status of a sequenced attempt that failed: one that did not reach the
    /// backend or got no answer leaves the sequence's state unknown, so it is lost.
    fn sequence_failed(
        &self,
        route: &ModelRoute,
        policy: &ModelPolicy,
        seq: &wire::SequenceKey,
        endpoint: &Arc<Endpoint>,
        failure: &Failure,
        status: Status,
    ) -> Status {
        if !matches!(failure, Failure::Connect | Failure::NoResponse) {
            return status;
        }
        let why = format!("failed the call ({})", status.message());
        let (now, idle) = (Instant::now(), policy.sequence_idle);
        self.sequences
            .lost_on(&route.model, seq, endpoint, why, now, idle)
            .status()
    }

    /// A first attempt raced by a hedge sent `delay` later to another backend; the
    /// first response wins and the other attempt is dropped (its stream reset).
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        &self,
        call: &Call<'_>,
        route: &Arc<ModelRoute>,
        policy: &Arc<ModelPolicy>,
        picked: Picked,
        delay: Duration,
        fallback: Option<&str>,
        tried: &mut Vec<Arc<Endpoint>>,
    ) -> Result<(http::Response<Body>, Attempt), AttemptFailed> {
        let first = self.attempt(call, route, policy, picked, 1, fallback);
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return r,
            _ = tokio::time::sleep(delay) => {}
        }
        if !policy.budget.try_withdraw(Instant::now()) {
            metrics::counter!("infergate_hedge_budget_exhausted_total", "model" => policy.name.clone()).increment(1);
            return first.await;
        }
        let Ok(second) = self.pool.pick_for_attempt(route, tried) else {
            return first.await;
        };
        tried.push(Arc::clone(&second.endpoint));
        metrics::counter!("infergate_hedges_total", "model" => policy.name.clone()).increment(1);
        call.span.add_event("hedge sent");
        let hedge = self.attempt(call, route, policy, second, 2, fallback);
        tokio::pin!(hedge);
        tokio::select! {
            r = &mut first => match r {
                Ok(ok) => Ok(ok),
                Err(_) => hedge.await,
            },
            r = &mut hedge => match r {
                Ok(ok) => {
                    metrics::counter!("infergate_hedge_wins_total", "model" => policy.name.clone()).increment(1);
                    Ok(ok)
                }
                Err(_) => first.await,
            },
        }
    }

    /// Steps 8 and 9: one attempt on one backend.
    async fn attempt(
        &self,
        call: &Call<'_>,
        route: &ModelRoute,
        policy: &Arc<ModelPolicy>,
        picked: Picked,
        attempt_no: u32,
        fallback: Option<&str>,
    ) -> Result<(http::Response<Body>, Attempt), AttemptFailed> {
        let span = call
            .span
            .client_attempt(picked.endpoint.address(), attempt_no);
        let bound = policy.no_response.get(Instant::now());
        let mut attempt = Attempt::begin(
            Arc::clone(&self.pool),
            picked,
            &route.model,
            span,
            Some(Arc::clone(policy)),
            bound,
        );
        attempt.repeats(call.failed_with());
        attempt.for_tenant(call.tenant);
        let endpoint = Arc::clone(attempt.endpoint());
        let began = attempt.began();
        let mut headers = self.outgoing(call.headers, Some(call.tenant));
        if let Some(span) = attempt.span() {
            span.inject(&mut headers);
        }
        if let Some(d) = call.deadline {
            let remaining = d
                .saturating_duration_since(began)
                .saturating_sub(self.deadline_margin);
            if let Ok(v) = HeaderValue::from_str(&wire::format_grpc_timeout(remaining)) {
                headers.insert(GRPC_TIMEOUT, v);
            }
        }
        if attempt_no > 1 {
            headers.insert(
                HeaderName::from_static("grpc-previous-rpc-attempts"),
                HeaderValue::from(attempt_no - 1),
            );
        }
        let mut extra = Vec::new();
        if let Some(model) = fallback {
            extra.extend_from_slice(&wire::append_model_name(model));
        }
        if policy.triton_timeout && call.rpc == Forwarded::ModelInfer {
            if let Some(d) = call.deadline {
                let micros = d
                    .saturating_duration_since(began)
                    .saturating_sub(self.deadline_margin)
                    .as_micros();
                extra.extend_from_slice(&wire::append_int_parameter("timeout", micros as i64));
            }
        }
        let body = if extra.is_empty() {
            proxy::full_body(call.message.framed())
        } else {
            let payload = call.message.payload();
            let header = wire::header(payload.len() + extra.len());
            proxy::chunks_body(vec![
                Bytes::copy_from_slice(&header),
                payload,
                Bytes::from(extra),
            ])
        };
        // 8. per-try timeout, and the no-response bound (a sequenced call is sent once)
        let sent = send(&endpoint, call.rpc, headers, body);
        let cut = bound.filter(|_| call.sequence.is_none());
        let response = match self.give_up_at(policy, attempt_no, began, cut, call.deadline) {
            Some((at, why)) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r,
                Err(_) => {
                    let status = why.status(endpoint.address(), &route.model);
                    attempt.finish(Outcome::NoResponse, Some(&status));
                    return Err(AttemptFailed {
                        failure: Failure::NoResponse,
                        status,
                    });
                }
            },
            None => sent.await,
        };
        // 9. endpoint
        let mut response = match response {
            Ok(r) => r,
            // The connection failed (the request path's timers are the only ones).
            Err(status) => {
                attempt.finish(Outcome::Transport, Some(&status));
                return Err(AttemptFailed {
                    failure: Failure::Connect,
                    status,
                });
            }
        };
        attempt.answered();
        load_report::observe(&endpoint, response.headers_mut(), &self.load);
        if let Some(status) =
            Status::from_header_map(response.headers()).filter(|s| s.code() != Code::Ok)
        {
            // A trailers-only answer: the backend refused the call without data, so
            // another backend may still be tried. One that is not retried is handed
            // back as it came, and its attempt ends as the response is wrapped.
            let code = status.code();
            // A retryable answer that a second backend repeats is handed back as it
            // came: the request caused it, so it goes to no third backend and counts
            // against neither (the attempt is neutral, see `Attempt::repeats`).
            if policy.retryable.contains(code) && call.failed_with() != Some(code) {
                call.failed_with.store(code as i32, Ordering::Relaxed);
                attempt.finish(Outcome::Answered(code), Some(&status));
                return Err(AttemptFailed {
                    failure: Failure::Status(code),
                    status,
                });
            }
        }
        if let Some(model) = fallback {
            if let Ok(v) = HeaderValue::from_str(model) {
                response.headers_mut().insert("infergate-fallback", v);
            }
        }
        Ok((response, attempt))
    }

    /// `ModelStatistics` for every model: any eligible backend answers.
    async fn forward_any(
        &self,
        rpc: Forwarded,
        headers: &HeaderMap,
        message: Message,
        started: Instant,
    ) -> Result<http::Response<Body>, Status> {
        let endpoint = self.pool.pick_any().map_err(route_status)?;
        let picked = Picked {
            endpoint: Arc::clone(&endpoint),
            permit: None,
            model_permit: None,
        };
        let mut attempt = Attempt::begin(
            Arc::clone(&self.pool),
            picked,
            "",
            CallSpan::default(),
            None,
            None,
        );
        let response = match send(
            &endpoint,
            rpc,
            self.outgoing(headers, None),
            proxy::full_body(message.framed()),
        )
        .await
        {
            Ok(r) => r,
            Err(status) => {
                attempt.finish(Outcome::Transport, Some(&status));
                return Err(status);
            }
        };
        attempt.answered();
        let on_end = call_end(
            rpc,
            started,
            UNKNOWN_MODEL.to_owned(),
            None,
            CallSpan::default(),
        );
        Ok(wrap_response(response, attempt, &self.load, None, on_end))
    }

    fn peek(&self, rpc: Forwarded, message: &Message) -> Result<RouteKey, Status> {
        let (message_name, field) = rpc.request_field();
        if message.compressed() {
            return Err(Status::unimplemented(format!(
                "compressed {message_name} (grpc-encoding) is not supported by the gateway; send it uncompressed"
            )));
        }
        let with_id = matches!(rpc, Forwarded::ModelInfer | Forwarded::ModelStreamInfer);
        let key = wire::peek_route(&message.payload(), with_id)
            .map_err(|e| Status::invalid_argument(format!("{message_name} does not parse: {e}")))?;
        if key.model.is_empty() && rpc != Forwarded::ModelStatistics {
            return Err(Status::invalid_argument(format!(
                "{message_name}.{field} is empty: name the model to call"
            )));
        }
        Ok(key)
    }

    /// A forwarded `ModelStreamInfer`: the response starts at once and a task pumps both
    /// directions until either side ends.
    pub async fn stream(self: Arc<Self>, request: http::Request<Body>) -> http::Response<Body> {
        if let Err(status) = self.admit() {
            return status.into_http();
        }
        let span = trace::request_span(&request);
        let (parts, body) = request.into_parts();
        let (tx, rx) = mpsc::channel(64);
        // The pump runs on its own task: it takes the connection's request budget along.
        let limits = wire::RequestLimits::current();
        tokio::spawn(limits.scope(async move {
            let started = Instant::now();
            let mut record = CallRecord::start(Forwarded::ModelStreamInfer, started);
            let code = self
                .pump(&parts.headers, body, &tx, &mut record.label, started, &span)
                .await;
            span.set_attr(attr::MODEL, record.label.as_str());
            span.end(code.unwrap_or(Code::Cancelled));
            record.end(code);
        }));
        proxy::grpc_response(proxy::channel_body(rx))
    }

    /// Moves a stream's frames both ways. Returns the code the stream ended with, or None
    /// when the caller went away.
    async fn pump(
        &self,
        headers: &HeaderMap,
        mut body: Body,
        tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>,
        label: &mut String,
        started: Instant,
        span: &CallSpan,
    ) -> Option<Code> {
        let mut first_response = true;
        let mut deframer = Deframer::new(self.max_message_bytes);
        let mut messages = Vec::new();
        let mut upstream: Option<Upstream> = None;
        let mut client_open = true;
        loop {
            tokio::select! {
                _ = tx.closed() => return None,
                frame = body.frame(), if client_open => match frame {
                    None => {
                        client_open = false;
                        if let Err(e) = deframer.finish() {
                            return finish(tx, proxy::frame_status(&e)).await;
                        }
                        match upstream.as_mut() {
                            // Half-close towards the backend; its answers keep flowing.
                            Some(up) => up.tx = None,
                            None => {
                                tx.send(Ok(proxy::ok_trailers())).await.ok()?;
                                return Some(Code::Ok);
                            }
                        }
                    }
                    Some(Err(_)) => return None,
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        if let Err(e) = deframer.push(data, &mut messages) {
                            return finish(tx, proxy::frame_status(&e)).await;
                        }
                        for message in messages.drain(..) {
                            if let Some(up) = upstream.as_mut() {
                                if let Some(refused) = self.stream_sequence(up, &message) {
                                    tx.send(Ok(refused)).await.ok()?;
                                    continue;
                                }
                                if let Some(up_tx) = &up.tx {
                                    // A closed channel means the backend ended; its
                                    // trailers arrive on the other branch.
                                    let _ = up_tx.send(Ok(Frame::data(message.framed()))).await;
                                }
                                continue;
                            }
                            match self.open_stream(headers, message, label, span).await {
                                Ok(up) => upstream = Some(up),
                                Err((key, status)) => {
                                    let frame = in_stream_error(&key, &status);
                                    tx.send(Ok(frame)).await.ok()?;
                                }
                            }
                        }
                    }
                },
                frame = next_frame(&mut upstream) => match frame {
                    Some(Ok(mut frame)) => {
                        if let Some(trailers) = frame.trailers_mut() {
                            let code = proxy::grpc_code(trailers).unwrap_or(Code::Unknown);
                            if let Some(up) = upstream.take() {
                                load_report::observe(up.attempt.endpoint(), trailers, &self.load);
                                up.attempt.finish(Outcome::Answered(code), None);
                            }
                            tx.send(Ok(frame)).await.ok()?;
                            return Some(code);
                        }
                        let Some(up) = upstream.as_mut() else { continue };
                        if first_response && frame.is_data() {
                            first_response = false;
                            up.metrics.first_response(started.elapsed());
                        }
                        let data = match frame.into_data() {
                            Ok(data) => data,
                            Err(other) => {
                                tx.send(Ok(other)).await.ok()?;
                                continue;
                            }
                        };
                        let sent = up.metrics.data(&data);
                        if let Err(status) = self.stream_sent(up, sent, label) {
                            return finish(tx, status).await;
                        }
                        let shaped = match up.shape.pass(data, self.max_message_bytes) {
                            Ok(shaped) => shaped,
                            Err(e) => return finish(tx, proxy::frame_status(&e)).await,
                        };
                        for bytes in shaped {
                            tx.send(Ok(Frame::data(bytes))).await.ok()?;
                        }
                    }
                    Some(Err(status)) => {
                        if let Some(up) = upstream.take() {
                            up.attempt.finish(Outcome::Transport, Some(&status));
                        }
                        return finish(tx, status).await;
                    }
                    None => {
                        let status = Status::internal("the backend ended the stream without a status");
                        if let Some(up) = upstream.take() {
                            up.attempt.finish(Outcome::Answered(Code::Internal), Some(&status));
                        }
                        return finish(tx, status).await;
                    }
                },
            }
        }
    }

    /// Routes a stream on its first routable message and opens the backend stream.
    async fn open_stream(
        &self,
        headers: &HeaderMap,
        message: Message,
        label: &mut String,
        span: &CallSpan,
    ) -> Result<Upstream, (RouteKey, Status)> {
        let key = self
            .peek(Forwarded::ModelStreamInfer, &message)
            .map_err(|s| (RouteKey::default(), s))?;
        let fail = |status: Status| (key.clone(), status);
        let route = self
            .pool
            .route(&key.model)
            .await
            .map_err(|e| fail(route_status(e)))?;
        label.clone_from(&route.model);
        // Admission: the same rate limit and bulkhead as unary calls; the slot is held
        // for the stream's whole life.
        let caller = self.caller(headers, None).map_err(fail)?;
        self.rate_limit(&caller, &route.model).await.map_err(fail)?;
        if let Some(limiter) = &self.limiter {
            // A tenant in token debt opens no new stream.
            limiter
                .stream_open(&caller.tenant, Instant::now())
                .map_err(|l| fail(limited_status(&route.model, &l)))?;
        }
        let policy = self.models.get(&route.model);
        policy.fit_bulkhead(&route.endpoints);
        let deadline = deadline(headers, &policy, Instant::now());
        let cost = crate::bulkhead::cost_of(&message.payload());
        let slot = self
            .bulkhead(&policy, &caller, cost, deadline)
            .await
            .map_err(|r| fail(rejected_status(r)))?;
        // The same retry policy and budget as unary calls, while the backend has not
        // answered: the stream could not be opened, or nothing came back in time.
        policy.budget.record_request(Instant::now());
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut attempt_no = 0u32;
        loop {
            attempt_no += 1;
            let picked = match &key.sequence {
                Some(seq) => self
                    .pick_sequenced(&route, &policy, seq, &tried)
                    .map_err(fail)?,
                None => {
                    let affinity = route.policy.affinity_key(&message.payload());
                    self.pool
                        .pick_for_attempt_keyed(&route, &tried, affinity)
                        .map_err(|e| fail(route_status(e)))?
                }
            };
            tried.push(Arc::clone(&picked.endpoint));
            let bound = policy.no_response.get(Instant::now());
            let attempt_span = span.client_attempt(picked.endpoint.address(), attempt_no);
            let mut attempt = Attempt::begin(
                Arc::clone(&self.pool),
                picked,
                &route.model,
                attempt_span,
                Some(Arc::clone(&policy)),
                bound,
            );
            attempt.for_tenant(&caller.tenant);
            let endpoint = Arc::clone(attempt.endpoint());
            let mut headers = self.outgoing(headers, Some(&caller.tenant));
            if let Some(s) = attempt.span() {
                s.inject(&mut headers);
            }
            let (up_tx, up_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
            // The channel is empty, so this cannot wait.
            let _ = up_tx.send(Ok(Frame::data(message.framed()))).await;
            let body = Body::new(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(up_rx),
            ));
            let sent = send(&endpoint, Forwarded::ModelStreamInfer, headers, body);
            let began = attempt.began();
            let cut = bound.filter(|_| key.sequence.is_none());
            let response = match self.give_up_at(&policy, attempt_no, began, cut, deadline) {
                Some((at, why)) => match tokio::time::timeout_at(at, sent).await {
                    Ok(r) => r.map_err(|s| (Outcome::Transport, Failure::Connect, s)),
                    Err(_) => Err((
                        Outcome::NoResponse,
                        Failure::NoResponse,
                        why.status(endpoint.address(), &route.model),
                    )),
                },
                None => sent
                    .await
                    .map_err(|s| (Outcome::Transport, Failure::Connect, s)),
            };
            let failed = match response {
                Ok(response) => {
                    attempt.answered();
                    match Status::from_header_map(response.headers())
                        .filter(|s| s.code() != Code::Ok)
                    {
                        None => {
                            return Ok(Upstream {
                                tx: Some(up_tx),
                                body: response.into_body(),
                                metrics: StreamMetrics::new(&route.model, endpoint.address()),
                                tenant: caller.tenant.clone(),
                                shape: Shape::Deciding(Vec::new()),
                                attempt,
                                sequenced: key
                                    .sequence
                                    .as_ref()
                                    .map(|_| (route.model.clone(), policy.sequence_idle)),
                                _slot: slot,
                            })
                        }
                        Some(status) => {
                            let code = status.code();
                            (Outcome::Answered(code), Failure::Status(code), status)
                        }
                    }
                }
                Err(failed) => failed,
            };
            let (outcome, failure, status) = failed;
            attempt.finish(outcome, Some(&status));
            if let Some(seq) = key.sequence.as_ref().filter(|s| !s.start) {
                let status =
                    self.sequence_failed(&route, &policy, seq, &endpoint, &failure, status);
                return Err(fail(status));
            }
            match self.retry_after(&policy, &failure, attempt_no, deadline) {
                Some(backoff) => tokio::time::sleep(backoff).await,
                None => return Err(fail(status)),
            }
        }
    }
}

impl Gateway {
    /// A later message on a stream opened by a sequenced one: its sequence must be (or
    /// becomes) pinned to the stream's backend; else the in-stream error to answer.
    fn stream_sequence(&self, up: &Upstream, message: &Message) -> Option<Frame<Bytes>> {
        let (model, idle) = up.sequenced.as_ref()?;
        let key = wire::peek_route(&message.payload(), true).ok()?;
        let seq = key.sequence.as_ref()?;
        let endpoint = up.attempt.endpoint();
        let refused = self
            .sequences
            .on_stream(model, seq, endpoint, *idle, Instant::now())
            .err()?;
        Some(in_stream_error(&key, &refused.status()))
    }
}

/// What every attempt of one unary call shares.
struct Call<'a> {
    rpc: Forwarded,
    headers: &'a HeaderMap,
    message: &'a Message,
    deadline: Option<Instant>,
    span: &'a CallSpan,
    /// The tenant the gateway resolved (sent on in `infergate-tenant`).
    tenant: &'a str,
    /// The code a backend answered an earlier attempt with, when that was a failure
    /// (-1: none yet). The same failure from a second backend is the request's.
    failed_with: AtomicI32,
    /// The stateful sequence the call belongs to: sent once, to its pinned backend.
    sequence: Option<&'a wire::SequenceKey>,
}

impl Call<'_> {
    fn failed_with(&self) -> Option<Code> {
        match self.failed_with.load(Ordering::Relaxed) {
            -1 => None,
            n => Some(Code::from_i32(n)),
        }
    }
}

/// Hands a backend's response back inside an [`ObservedBody`], which ends the attempt
/// and then runs `on_end` (the call's own record) when the body ends.
fn wrap_response(
    response: http::Response<Body>,
    attempt: Attempt,
    load: &Arc<LoadConfig>,
    deadline: Option<Instant>,
    on_end: proxy::OnEnd,
) -> http::Response<Body> {
    let code = proxy::grpc_code(response.headers());
    let (head, body) = response.into_parts();
    let body =
        ObservedBody::new(body, attempt, code, Arc::clone(load), on_end).with_deadline(deadline);
    http::Response::from_parts(head, Body::new(body))
}

/// What a unary call does when its response ends: metrics, its SERVER span, and the
/// release of its bulkhead slot.
fn call_end(
    rpc: Forwarded,
    started: Instant,
    label: String,
    slot: Option<Slot>,
    server_span: CallSpan,
) -> proxy::OnEnd {
    Box::new(move |code| {
        let _slot = slot;
        telemetry::call_ended(rpc.name(), &label, code, started.elapsed());
        server_span.end(code.unwrap_or(Code::Cancelled));
    })
}

/// A call's in-flight gauge and its count, kept right on every path: until the call
/// either ends here or hands its record to a response body, dropping it (the caller
/// went away while the call waited, read or was routed) counts it as cancelled.
struct CallRecord {
    rpc: Forwarded,
    started: Instant,
    label: String,
    open: bool,
}

impl CallRecord {
    fn start(rpc: Forwarded, started: Instant) -> CallRecord {
        telemetry::call_started(rpc.name());
        CallRecord {
            rpc,
            started,
            label: UNKNOWN_MODEL.to_owned(),
            open: true,
        }
    }

    /// The response body records the call's end from now on.
    fn handed_over(&mut self) {
        self.open = false;
    }

    fn end(&mut self, code: Option<Code>) {
        if std::mem::take(&mut self.open) {
            telemetry::call_ended(self.rpc.name(), &self.label, code, self.started.elapsed());
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.end(None);
    }
}

/// Why an attempt was given up before the backend answered.
#[derive(Debug, Clone, Copy)]
enum GiveUp {
    PerTry(Duration),
    Silent(Duration),
}

impl GiveUp {
    fn status(self, backend: &str, model: &str) -> Status {
        match self {
            GiveUp::PerTry(t) => Status::deadline_exceeded(format!(
                "backend {backend} did not answer within the per-try timeout of {} ms",
                t.as_millis()
            )),
            GiveUp::Silent(b) => Status::unavailable(format!(
                "backend {backend} sent nothing for {} ms, past model {model}'s no-response bound",
                b.as_millis()
            )),
        }
    }
}

thread_local! {
    static RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::new());
}

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The time the caller asked for (`grpc-timeout`), if any.
fn asked_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(wire::parse_grpc_timeout)
}

/// The deadline the caller asked for, if any.
fn caller_deadline(headers: &HeaderMap, started: Instant) -> Option<Instant> {
    asked_timeout(headers).map(|d| started + d)
}

/// The call's deadline: the caller's `grpc-timeout`, else the model's default, never
/// beyond the model's maximum.
fn deadline(headers: &HeaderMap, policy: &ModelPolicy, started: Instant) -> Option<Instant> {
    let asked = asked_timeout(headers).or(policy.deadline_default);
    let limit = match (asked, policy.deadline_max) {
        (Some(a), Some(m)) => Some(a.min(m)),
        (a, m) => a.or(m),
    };
    limit.map(|d| started + d)
}

/// Adds the `grpc-retry-pushback-ms` trailer that tells well-behaved clients when to
/// try again.
fn with_pushback(mut status: Status, pushback: Duration) -> Status {
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(pushback.as_millis().to_string()) {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

/// RESOURCE_EXHAUSTED naming the limit, with its pushback; counted by model and bucket.
fn limited_status(model: &str, limited: &crate::ratelimit::Limited) -> Status {
    metrics::counter!("infergate_rate_limited_total", "model" => model.to_owned(), "scope" => limited.scope.as_str())
        .increment(1);
    with_pushback(
        Status::new(limited.code(), limited.message()),
        limited.pushback(),
    )
}

fn rejected_status(rejected: crate::bulkhead::Rejected) -> Status {
    with_pushback(
        Status::new(rejected.code(), rejected.message()),
        rejected.pushback(),
    )
}

/// The backend half of a pinned stream.
struct Upstream {
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    body: Body,
    attempt: Attempt,
    metrics: StreamMetrics,
    shape: Shape,
    /// The tenant whose stream tokens its responses are counted against.
    tenant: String,
    /// A stream opened by a sequenced message: its model and idle time, so that later
    /// messages keep their sequences pinned here (`sequence::Sequences::on_stream`).
    sequenced: Option<(String, Duration)>,
    _slot: Option<Slot>,
}

/// What the backend streams back. Triton sends `ModelStreamInferResponse` messages,
/// passed through frame by frame untouched. MLServer (and other KServe servers) send
/// bare `ModelInferResponse` messages on `ModelStreamInfer`, which stock clients cannot
/// decode; those are wrapped as `ModelStreamInferResponse.infer_response` (field 2).
/// The first message decides: a `ModelStreamInferResponse` has only fields 1 and 2 at
/// its top level, a `ModelInferResponse` answer nearly always has `id` (3) or
/// `outputs` (5) and the rest.
enum Shape {
    /// Frames held until the first message is whole.
    Deciding(Vec<Bytes>),
    /// Stream responses: frames pass untouched.
    Stream,
    /// Bare responses: cut into messages and wrapped.
    Bare(Deframer),
}

impl Shape {
    /// The bytes to send on for one DATA frame from the backend.
    fn pass(&mut self, data: Bytes, limit: usize) -> Result<Vec<Bytes>, wire::FrameError> {
        match self {
            Shape::Stream => Ok(vec![data]),
            Shape::Bare(deframer) => {
                let mut messages = Vec::new();
                deframer.push(data, &mut messages)?;
                Ok(messages.iter().map(wrap_bare_response).collect())
            }
            Shape::Deciding(held) => {
                held.push(data);
                let Some(first) = first_message(held) else {
                    return Ok(Vec::new());
                };
                if first.compressed || !is_bare_infer_response(&first.payload) {
                    let held = std::mem::take(held);
                    *self = Shape::Stream;
                    return Ok(held);
                }
                let mut deframer = Deframer::new(limit);
                let mut messages = Vec::new();
                for chunk in std::mem::take(held) {
                    deframer.push(chunk, &mut messages)?;
                }
                *self = Shape::Bare(deframer);
                Ok(messages.iter().map(wrap_bare_response).collect())
            }
        }
    }
}

/// The first whole message of `held`, if it has arrived (its payload copied: one
/// response, once per stream).
struct FirstMessage {
    compressed: bool,
    payload: Vec<u8>,
}

fn first_message(held: &[Bytes]) -> Option<FirstMessage> {
    let total: usize = held.iter().map(Bytes::len).sum();
    if total < wire::HEADER_LEN {
        return None;
    }
    let joined: Vec<u8> = held.iter().flat_map(|c| c.iter().copied()).collect();
    let len = u32::from_be_bytes([joined[1], joined[2], joined[3], joined[4]]) as usize;
    let body = joined.get(wire::HEADER_LEN..wire::HEADER_LEN + len)?;
    Some(FirstMessage {
        compressed: joined[0] != 0,
        payload: body.to_vec(),
    })
}

/// Whether `payload` is a bare `ModelInferResponse`: a top-level field other than 1
/// and 2 (which a `ModelStreamInferResponse` alone has).
fn is_bare_infer_response(mut payload: &[u8]) -> bool {
    while !payload.is_empty() {
        let Ok(tag) = prost::encoding::decode_varint(&mut payload) else {
            return false;
        };
        let field = tag >> 3;
        if field != 1 && field != 2 {
            return true;
        }
        let skipped = match tag & 7 {
            0 => prost::encoding::decode_varint(&mut payload).is_ok(),
            2 => match prost::encoding::decode_varint(&mut payload) {
                Ok(len) if (len as usize) <= payload.len() => {
                    payload = &payload[len as usize..];
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if !skipped {
            return false;
        }
    }
    false
}

/// A bare `ModelInferResponse` as `ModelStreamInferResponse { infer_response }`.
fn wrap_bare_response(message: &Message) -> Bytes {
    let payload = message.payload();
    let mut wrapped = Vec::with_capacity(payload.len() + 11);
    wrapped.push(0x12); // field 2, length-delimited
    prost::encoding::encode_varint(payload.len() as u64, &mut wrapped);
    wrapped.extend_from_slice(&payload);
    Message::encode(&wrapped).framed()
}

/// What LLM operators read off a pinned stream, per model and backend: responses
/// (so responses per second), the gap between consecutive responses (inter-token
/// latency for a decoupled model) and streams in flight. Handles are resolved once
/// when the stream is pinned, so a response costs a few atomic updates.
struct StreamMetrics {
    responses: metrics::Counter,
    gaps: metrics::Histogram,
    first: metrics::Histogram,
    in_flight: metrics::Gauge,
    counter: proxy::MessageCounter,
    last: Option<Instant>,
}

impl StreamMetrics {
    fn new(model: &str, backend: &str) -> StreamMetrics {
        let labels = [("model", model.to_owned()), ("backend", backend.to_owned())];
        let in_flight = metrics::gauge!("infergate_streams_in_flight", &labels);
        in_flight.increment(1.0);
        StreamMetrics {
            responses: metrics::counter!("infergate_stream_responses_total", &labels),
            gaps: metrics::histogram!("infergate_stream_inter_response_seconds", &labels),
            first: metrics::histogram!("infergate_stream_first_response_seconds", &labels),
            in_flight,
            counter: proxy::MessageCounter::default(),
            last: None,
        }
    }

    /// The stream's first response came `after` its start.
    fn first_response(&self, after: Duration) {
        self.first.record(after.as_secs_f64());
    }

    /// One DATA frame from the backend; returns the responses it ended.
    fn data(&mut self, data: &[u8]) -> u32 {
        let ended = self.counter.push(data);
        if ended == 0 {
            return 0;
        }
        let now = Instant::now();
        if let Some(last) = self.last {
            self.gaps
                .record(now.saturating_duration_since(last).as_secs_f64());
        }
        // Several responses in one frame came together: no gap between them counts.
        self.last = Some(now);
        self.responses.increment(u64::from(ended));
        ended
    }
}

impl Drop for StreamMetrics {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

async fn next_frame(upstream: &mut Option<Upstream>) -> Option<Result<Frame<Bytes>, Status>> {
    match upstream {
        Some(up) => up.body.frame().await,
        None => std::future::pending().await,
    }
}

async fn finish(tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>, status: Status) -> Option<Code> {
    let code = status.code();
    tx.send(Ok(proxy::status_trailers(&status))).await.ok()?;
    Some(code)
}

fn in_stream_error(key: &RouteKey, status: &Status) -> Frame<Bytes> {
    let response = ModelStreamInferResponse {
        error_message: status.message().to_owned(),
        infer_response: Some(ModelInferResponse {
            model_name: key.model.clone(),
            model_version: key.version.clone(),
            id: key.id.clone(),
            ..Default::default()
        }),
    };
    Frame::data(Message::encode(&prost::Message::encode_to_vec(&response)).framed())
}

/// Maps a routing failure to the status a caller sees.
pub fn route_status(err: RouteError) -> Status {
    match err {
        // When no backend could be asked, nobody said the model does not exist: a
        // retry may find it.
        RouteError::UnknownModel {
            backends,
            unreachable: Some((n, _)),
            ..
        } if n >= backends => Status::unavailable(err.to_string()),
        RouteError::UnknownModel { .. } => Status::not_found(err.to_string()),
        RouteError::NoBackends | RouteError::NoneEligible { .. } => {
            Status::unavailable(err.to_string())
        }
    }
}

/// Sends one call to `endpoint`; returns once the backend's response headers arrive.
async fn send(
    endpoint: &Endpoint,
    rpc: Forwarded,
    headers: HeaderMap,
    body: Body,
) -> Result<http::Response<Body>, Status> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(rpc.path());
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    endpoint
        .connection()
        .send(request)
        .await
        .map_err(|e| proxy::transport_status(endpoint.address(), &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::model_infer_response::InferOutputTensor;

    fn framed(payload: &[u8]) -> Bytes {
        Message::encode(payload).framed()
    }

    #[test]
    fn bare_infer_responses_are_wrapped_and_stream_responses_pass() {
        let bare = ModelInferResponse {
            model_name: "iris".into(),
            id: "r-1".into(),
            outputs: vec![InferOutputTensor {
                name: "predict".into(),
                datatype: "INT64".into(),
                shape: vec![1],
                ..Default::default()
            }],
            ..Default::default()
        };
        let bare_bytes = prost::Message::encode_to_vec(&bare);
        let stream = ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(bare.clone()),
        };
        let stream_bytes = prost::Message::encode_to_vec(&stream);
        assert!(is_bare_infer_response(&bare_bytes));
        assert!(!is_bare_infer_response(&stream_bytes));

        // Triton-shaped: the frames come back as they went, even split mid-header.
        let whole = framed(&stream_bytes);
        let mut shape = Shape::Deciding(Vec::new());
        assert!(shape
            .pass(whole.slice(..3), 1 << 20)
            .expect("ok")
            .is_empty());
        let out = shape.pass(whole.slice(3..), 1 << 20).expect("ok");
        assert_eq!(out.concat(), whole.to_vec());
        assert!(matches!(shape, Shape::Stream));

        // MLServer-shaped: each message becomes a ModelStreamInferResponse.
        let mut shape = Shape::Deciding(Vec::new());
        let two = [framed(&bare_bytes), framed(&bare_bytes)].concat();
        let out = shape.pass(Bytes::from(two), 1 << 20).expect("ok");
        assert_eq!(out.len(), 2);
        for message in out {
            let decoded =
                <ModelStreamInferResponse as prost::Message>::decode(&message[wire::HEADER_LEN..])
                    .expect("a stream response");
            assert_eq!(decoded, stream);
        }
    }
}
