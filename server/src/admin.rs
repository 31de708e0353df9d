//! The control plane's gRPC API, `infergate.admin.v1.Admin`, on the admin port. Nothing
//! here sits on the request path: reads come from the pool and the live model settings,
//! and every change goes through [`Control`], the one path for changes.
//!
//! Every call must carry `authorization: Bearer TOKEN` when a token is configured
//! (`[admin].token` or `INFERGATE_ADMIN_TOKEN`), or come over mTLS with a client
//! certificate whose identity is in `[admin] allowed_identities`; health and reflection
//! on the same port stay open for probes.

use crate::config::PolicyKind;
use crate::control::{Control, ControlError};
use crate::endpoint::Endpoint;
use crate::wire::SequenceId;
use infergate_proto::admin::admin_server::{Admin, AdminServer};
use infergate_proto::admin::*;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// The admin service.
pub struct AdminService {
    control: Arc<Control>,
}

/// Checks every admin call: it carries the bearer token, or comes over mTLS with a
/// client certificate whose identity is in `[admin] allowed_identities`.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Arc<str>>,
    identities: Arc<[String]>,
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.token.is_none() && self.identities.is_empty() {
            return Ok(request);
        }
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let identity = request
            .extensions()
            .get::<crate::tls::PeerIdentity>()
            .map(|id| id.0.as_str());
        let refused = |reason: &'static str, status: Status| {
            let peer = request
                .remote_addr()
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
            let identity = identity.map(infergate_base::text::shown);
            tracing::warn!(%peer, ?identity, reason, "admin call refused");
            metrics::counter!("infergate_admin_auth_failures_total", "reason" => reason)
                .increment(1);
            Err(status)
        };
        let token = self.token.as_deref();
        match (given, token) {
            (Some(given), Some(token))
                if crate::auth::secrets_equal(given.as_bytes(), token.as_bytes()) =>
            {
                return Ok(request)
            }
            (Some(_), Some(_)) => {
                return refused(
                    "wrong_token",
                    Status::unauthenticated("the admin token is wrong"),
                )
            }
            _ => {}
        }
        if let Some(identity) = identity {
            if self.identities.iter().any(|allowed| allowed == identity) {
                return Ok(request);
            }
            if !self.identities.is_empty() {
                return refused(
                    "identity_not_allowed",
                    Status::permission_denied(format!(
                        "the client certificate's identity `{}` is not in [admin].allowed_identities{}",
                        infergate_base::text::shown(identity),
                        if token.is_some() { " (or send the admin token)" } else { "" }
                    )),
                );
            }
        }
        let expected = match (token.is_some(), self.identities.is_empty()) {
            (true, true) => "`authorization: Bearer TOKEN` (the token set by [admin].token or INFERGATE_ADMIN_TOKEN)",
            (true, false) => "`authorization: Bearer TOKEN` (the token set by [admin].token or INFERGATE_ADMIN_TOKEN), or a client certificate whose identity is in [admin].allowed_identities",
            (false, _) => "a client certificate whose identity is in [admin].allowed_identities (no admin token is set)",
        };
        refused(
            "no_token",
            Status::unauthenticated(format!("the admin API needs {expected}")),
        )
    }
}

impl AdminService {
    /// The tonic server for the admin API, behind the token and identity check.
    pub fn server(
        control: Arc<Control>,
        token: Option<String>,
        allowed_identities: &[String],
    ) -> InterceptedService<AdminServer<AdminService>, AdminAuth> {
        AdminServer::with_interceptor(
            AdminService { control },
            AdminAuth {
                token: token.map(Arc::from),
                identities: allowed_identities.into(),
            },
        )
    }
}

fn status(err: ControlError) -> Status {
    match err {
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::Invalid(m) => Status::invalid_argument(m),
    }
}

fn or_default(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

fn backend(control: &Control, e: &Endpoint) -> Backend {
    let now = Instant::now();
    let reading = e.load().read(now);
    Backend {
        address: e.address().to_owned(),
        models: e.models(),
        health: if e.is_unreachable() {
            "unreachable".to_owned()
        } else {
            e.health().as_str().to_owned()
        },
        in_flight: e.in_flight(),
        requests_total: e.requests_total(),
        failures_total: e.failures_total(),
        source: e.source().to_owned(),
        weight: e.weight(),
        draining: e.is_draining(),
        ejected: e.is_ejected(now),
        ejection_reason: control
            .pool()
            .ejection_reason(e.address())
            .unwrap_or_default(),
        circuit: e.breaker().state().as_str().to_owned(),
        model_circuits: e
            .open_model_circuits()
            .into_iter()
            .map(|(m, s)| (m, s.as_str().to_owned()))
            .collect(),
        models_not_ready: e.models_not_ready(),
        utilization: reading.map(|r| r.utilization).unwrap_or(0.0),
        queue_depth: reading.map(|r| r.queue_depth).unwrap_or(0.0),
        report_age_ms: reading.map(|r| r.age.as_millis() as i64).unwrap_or(-1),
        report_source: reading
            .map(|r| r.source.as_str())
            .unwrap_or("none")
            .to_owned(),
        per_call_share: e.per_call_utilization().unwrap_or(0.0),
        capacity: e.capacity().unwrap_or(0),
        service_time_ms: e.latency_floor_ms().unwrap_or(0.0),
        reported_running: reading.and_then(|r| r.running).unwrap_or(-1.0),
        own_share: e.load().own_share().unwrap_or(0.0),
    }
}

fn endpoint_of(control: &Control, address: &str) -> Result<Arc<Endpoint>, Status> {
    control
        .pool()
        .endpoint(address)
        .ok_or_else(|| Status::not_found(format!("no backend `{address}` in the pool")))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_backends(
        &self,
        _: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        let backends = self
            .control
            .pool()
            .endpoints()
            .iter()
            .map(|e| backend(&self.control, e))
            .collect();
        Ok(Response::new(ListBackendsResponse { backends }))
    }

    async fn add_backend(
        &self,
        request: Request<AddBackendRequest>,
    ) -> Result<Response<Backend>, Status> {
        let r = request.into_inner();
        let config = crate::config::BackendConfig {
            models: r.models,
            weight: r.weight.max(1),
            metrics_address: (!r.metrics_address.is_empty()).then_some(r.metrics_address),
            ..crate::config::BackendConfig::new(r.address)
        };
        let e = self.control.add_backend(config, "admin").map_err(status)?;
        Ok(Response::new(backend(&self.control, &e)))
    }

    async fn remove_backend(
        &self,
        request: Request<RemoveBackendRequest>,
    ) -> Result<Response<RemoveBackendResponse>, Status> {
        let r = request.into_inner();
        let left = self
            .control
            .remove_backend(
                &r.address,
                or_default(r.drain_timeout_ms, Duration::from_secs(30)),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(RemoveBackendResponse {
            in_flight_left: left,
        }))
    }

    async fn drain_backend(
        &self,
        request: Request<DrainBackendRequest>,
    ) -> Result<Response<DrainBackendResponse>, Status> {
        let r = request.into_inner();
        if r.undrain {
            self.control.undrain(&r.address).await.map_err(status)?;
            return Ok(Response::new(DrainBackendResponse {
                idle: false,
                in_flight_left: endpoint_of(&self.control, &r.address)?.in_flight(),
                waited_ms: 0,
            }));
        }
        let (idle, left, waited) = self
            .control
            .drain(
                &r.address,
                or_default(r.timeout_ms, Duration::from_secs(30)),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(DrainBackendResponse {
            idle,
            in_flight_left: left,
            waited_ms: waited.as_millis() as u64,
        }))
    }

    async fn eject_backend(
        &self,
        request: Request<EjectBackendRequest>,
    ) -> Result<Response<Backend>, Status> {
        let r = request.into_inner();
        let e = self
            .control
            .eject(
                &r.address,
                &r.reason,
                or_default(r.duration_ms, Duration::from_secs(60)),
            )
            .map_err(status)?;
        Ok(Response::new(backend(&self.control, &e)))
    }

    async fn readmit_backend(
        &self,
        request: Request<ReadmitBackendRequest>,
    ) -> Result<Response<Backend>, Status> {
        let e = self
            .control
            .readmit(&request.into_inner().address)
            .map_err(status)?;
        Ok(Response::new(backend(&self.control, &e)))
    }

    async fn set_weight(
        &self,
        request: Request<SetWeightRequest>,
    ) -> Result<Response<Backend>, Status> {
        let r = request.into_inner();
        let e = self
            .control
            .set_weight(&r.address, r.weight)
            .map_err(status)?;
        Ok(Response::new(backend(&self.control, &e)))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .control
            .pool()
            .models()
            .iter()
            .map(|route| model(&self.control, &route.model))
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn update_model(
        &self,
        request: Request<UpdateModelRequest>,
    ) -> Result<Response<Model>, Status> {
        let r = request.into_inner();
        let policy = if r.policy.is_empty() {
            None
        } else {
            Some(
                r.policy
                    .parse::<PolicyKind>()
                    .map_err(|e| Status::invalid_argument(format!("policy: {e}")))?,
            )
        };
        self.control
            .update_model(&r.name, policy, |table| {
                if r.max_concurrent.is_some()
                    || r.max_queue.is_some()
                    || r.queue_timeout_ms.is_some()
                {
                    let mut b = table.bulkhead.clone().unwrap_or_default();
                    if let Some(n) = r.max_concurrent {
                        b.max_concurrent = n as usize;
                    }
                    if let Some(n) = r.max_queue {
                        b.max_queue = n as usize;
                    }
                    if let Some(ms) = r.queue_timeout_ms {
                        b.queue_timeout_ms = ms;
                    }
                    table.bulkhead = Some(b);
                }
                if let Some(f) = r.fallback {
                    table.fallback = (!f.is_empty()).then_some(f);
                }
            })
            .map_err(status)?;
        Ok(Response::new(model(&self.control, &r.name)))
    }

    type WatchEventsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let mut rx = self.control.pool().events().subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = match rx.recv().await {
                    Ok(e) => Event {
                        at_unix_ms: e.at_unix_ms,
                        kind: e.kind,
                        backend: e.backend,
                        model: e.model,
                        reason: e.reason,
                        missed: 0,
                    },
                    Err(RecvError::Lagged(n)) => Event {
                        kind: "events_missed".into(),
                        reason: format!("this watcher fell behind and missed {n} events"),
                        missed: n,
                        ..Event::default()
                    },
                    Err(RecvError::Closed) => return,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        let config = self.control.config().redacted();
        let toml = toml::to_string_pretty(&config)
            .map_err(|e| Status::internal(format!("cannot render the config: {e}")))?;
        Ok(Response::new(GetConfigResponse {
            toml,
            path: self
                .control
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn reload_config(
        &self,
        request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        let text = request.into_inner().toml;
        let text = (!text.trim().is_empty()).then_some(text);
        match self.control.reload(text).await {
            Ok((changes, needs_restart)) => Ok(Response::new(ReloadConfigResponse {
                changes,
                needs_restart,
            })),
            Err(e) => {
                self.control
                    .pool()
                    .events()
                    .publish("config_rejected", "", "", e.to_string());
                Err(Status::invalid_argument(format!(
                    "configuration refused, nothing changed: {e}"
                )))
            }
        }
    }

    async fn list_sequences(
        &self,
        request: Request<ListSequencesRequest>,
    ) -> Result<Response<ListSequencesResponse>, Status> {
        let model = request.into_inner().model;
        Ok(Response::new(sequences(&self.control, &model)))
    }

    async fn cache_stats(
        &self,
        _request: Request<CacheStatsRequest>,
    ) -> Result<Response<CacheStatsResponse>, Status> {
        let models = self
            .control
            .gateway()
            .cache
            .stats()
            .into_iter()
            .map(cache_stats)
            .collect();
        Ok(Response::new(CacheStatsResponse { models }))
    }

    async fn purge_cache(
        &self,
        request: Request<PurgeCacheRequest>,
    ) -> Result<Response<PurgeCacheResponse>, Status> {
        let model = request.into_inner().model;
        let cache = &self.control.gateway().cache;
        if !model.is_empty() && cache.model(&model).is_none() {
            return Err(Status::not_found(format!(
                "model '{}' has no response cache ([models.{}] cache)",
                infergate_base::text::shown(&model),
                infergate_base::text::shown(&model)
            )));
        }
        let purged = cache.purge(&model).await.map_err(Status::unavailable)?;
        Ok(Response::new(PurgeCacheResponse {
            l1_entries: purged.l1,
            l2_keys: purged.l2,
        }))
    }
}

fn cache_stats(s: crate::cache::ModelStats) -> ModelCacheStats {
    ModelCacheStats {
        model: s.model,
        entries: s.entries,
        bytes: s.bytes,
        hits_l1: s.hits_l1,
        hits_l2: s.hits_l2,
        misses: s.misses,
        coalesced: s.coalesced,
        evictions: s.evictions,
        expirations: s.expirations,
        ttl_ms: s.config.ttl_ms,
        max_entries: s.config.max_entries,
        max_bytes: s.config.max_bytes,
        max_entry_bytes: s.config.max_entry_bytes as u64,
        shared: s.config.shared,
        coalesce: s.config.coalesce,
    }
}

/// The pinned sequences, grouped by backend (by address, then model and id).
fn sequences(control: &Control, only_model: &str) -> ListSequencesResponse {
    let pins = control.gateway().sequences.active(Instant::now());
    let mut backends: Vec<BackendSequences> = Vec::new();
    let mut total = 0u64;
    for pin in pins
        .into_iter()
        .filter(|p| only_model.is_empty() || p.model == only_model)
    {
        if backends.last().is_none_or(|b| b.address != pin.backend) {
            backends.push(BackendSequences {
                address: pin.backend.clone(),
                sequences: Vec::new(),
            });
        }
        let (sequence_id, string_id) = match &pin.id {
            SequenceId::Int(v) => (v.to_string(), false),
            SequenceId::Text(t) => (t.clone(), true),
        };
        total += 1;
        if let Some(b) = backends.last_mut() {
            b.sequences.push(PinnedSequence {
                model: pin.model,
                sequence_id,
                string_id,
                idle_ms: u64::try_from(pin.idle_for.as_millis()).unwrap_or(u64::MAX),
                lost: pin.lost.unwrap_or_default(),
            });
        }
    }
    ListSequencesResponse { backends, total }
}

fn model(control: &Control, name: &str) -> Model {
    let route = control.pool().known_route(name);
    let policy = control.gateway().models.get(name);
    let bulkhead = policy.bulkhead.as_ref().map(|b| {
        let cfg = b.config();
        let stats = b.stats();
        Bulkhead {
            max_concurrent: cfg.max_concurrent as u32,
            max_queue: cfg.max_queue as u32,
            queue_timeout_ms: cfg.queue_timeout_ms,
            active: stats.active as u64,
            queued: stats.queued as u64,
            admitted_total: stats.admitted_total,
            rejected_full_total: stats.rejected_full_total,
            rejected_timeout_total: stats.rejected_timeout_total + stats.rejected_deadline_total,
        }
    });
    let ms = |p: f64| {
        policy
            .latencies
            .percentile(p)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let now = Instant::now();
    let panic = control.pool().in_panic();
    Model {
        name: name.to_owned(),
        backends: route
            .as_ref()
            .map(|r| r.endpoints.iter().map(|e| e.address().to_owned()).collect())
            .unwrap_or_default(),
        decoupled: route.as_ref().is_some_and(|r| r.decoupled),
        policy: route
            .as_ref()
            .map(|r| r.policy.kind().as_str().to_owned())
            .unwrap_or_default(),
        bulkhead,
        fallback: policy.fallback.clone().unwrap_or_default(),
        latency_p50_ms: ms(0.5),
        latency_p99_ms: ms(0.99),
        eligible_backends: route
            .as_ref()
            .map(|r| {
                r.endpoints
                    .iter()
                    .filter(|e| e.availability(name, now, panic).is_ok())
                    .count() as u32
            })
            .unwrap_or(0),
        max_attempts: policy.retry.max_attempts,
        deadline_default_ms: policy
            .deadline_default
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        deadline_max_ms: policy
            .deadline_max
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}
