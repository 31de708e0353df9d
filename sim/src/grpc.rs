//! The simulator's gRPC surface: `inference.GRPCInferenceService`, the ORCA out-of-band
//! service, the FIFO slot pool that makes it behave like a busy GPU, and the layer that
//! adds per-call trailers to unary responses.
//!
//! Why a layer: tonic answers a successful unary call with trailers holding only
//! `grpc-status`, but real model servers (and the gateway's load-aware balancer) put a
//! load report in the trailers of every call. The handler leaves the extra trailers in
//! the response's extensions; [`TrailerLayer`] moves them into the trailer frame.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body::Frame;
use infergate_proto::inference::{
    grpc_inference_service_server::GrpcInferenceService, repository_index_response::ModelIndex,
    InferStatistics, ModelConfigRequest, ModelConfigResponse, ModelInferRequest,
    ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest,
    ModelReadyResponse, ModelStatistics, ModelStatisticsRequest, ModelStatisticsResponse,
    ModelStreamInferResponse, RepositoryIndexRequest, RepositoryIndexResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, StatisticDuration,
};
use infergate_proto::orca::open_rca_service_server::OpenRcaService;
use infergate_proto::orca::{OrcaLoadReport, OrcaLoadReportRequest};
use prost::Message;
use tokio::sync::{mpsc, Semaphore, SemaphorePermit};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use super::control::{FailReason, ModelStats, SimControl};
use super::models::{self, InvalidInput, Model};
use infergate_base::trace::{self, attr, CallSpan};

const RELAXED: Ordering = Ordering::Relaxed;

/// Trailer carrying the ORCA load report of a call.
pub(crate) const ORCA_TRAILER: &str = "endpoint-load-metrics-bin";
/// Header and trailer naming the simulator that answered.
pub(crate) const NAME_KEY: &str = "sim-name";

/// Static timing and behaviour of a simulator (the parts of `SimConfig` handlers need).
#[derive(Clone, Debug)]
pub(crate) struct Timing {
    pub(crate) latency_ms: f64,
    pub(crate) per_kib_us: f64,
    pub(crate) token_latency_ms: f64,
    pub(crate) orca_per_call: bool,
}

/// What every handler shares: the slot pool, the controls and the timing.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) ctl: Arc<SimControl>,
    pub(crate) slots: Semaphore,
    pub(crate) timing: Timing,
    /// `accumulate`'s state, one running sum per sequence.
    pub(crate) sequences: super::sequence::Store,
    /// `tiny_llm`'s prompt-prefix cache.
    pub(crate) prefix: super::prefix::PrefixCache,
}

fn ms(v: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_secs_f64(v / 1000.0)
    } else {
        Duration::ZERO
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, RELAXED);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, RELAXED);
    }
}

/// A held execution slot; it counts as busy until dropped.
struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    _busy: Gauge<'a>,
}

/// Accounting of one inference request from arrival to answer. Dropped without an
/// outcome (the caller went away), it counts the request as cancelled.
struct CallGuard {
    engine: Arc<Engine>,
    model: Option<Model>,
    start: Instant,
    outcome: Option<Result<(), FailReason>>,
}

impl CallGuard {
    fn new(engine: &Arc<Engine>, model: Option<Model>) -> Self {
        let ctl = &engine.ctl;
        ctl.counter_started().fetch_add(1, RELAXED);
        ctl.counter_in_flight().fetch_add(1, RELAXED);
        if let Some(stats) = model.and_then(|m| ctl.stats(m)) {
            stats.started.fetch_add(1, RELAXED);
        }
        Self {
            engine: engine.clone(),
            model,
            start: Instant::now(),
            outcome: None,
        }
    }

    fn stats(&self) -> Option<&ModelStats> {
        self.model.and_then(|m| self.engine.ctl.stats(m))
    }

    fn finish(&mut self, outcome: Result<(), FailReason>) {
        self.outcome = Some(outcome);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Err(FailReason::Canceled));
        let elapsed = nanos(self.start.elapsed());
        let ctl = &self.engine.ctl;
        ctl.counter_in_flight().fetch_sub(1, RELAXED);
        match outcome {
            Ok(()) => ctl.note_success(),
            Err(reason) => ctl.note_failure(reason),
        }
        if let Some(stats) = self.stats() {
            match outcome {
                Ok(()) => {
                    stats.success.fetch_add(1, RELAXED);
                    stats.success_ns.fetch_add(elapsed, RELAXED);
                }
                Err(reason) => {
                    stats.failures[reason as usize].fetch_add(1, RELAXED);
                    stats.fail_ns.fetch_add(elapsed, RELAXED);
                }
            }
        }
    }
}

/// Why a request was not answered normally.
enum Failure {
    Status(Status, FailReason),
}

impl From<InvalidInput> for Failure {
    fn from(e: InvalidInput) -> Self {
        Failure::Status(Status::invalid_argument(e.0), FailReason::Other)
    }
}

impl Engine {
    /// Waits (FIFO) for a slot, counting the wait as queue depth.
    async fn acquire(&self, stats: &ModelStats) -> Result<(Slot<'_>, Duration), Failure> {
        let start = Instant::now();
        let permit = {
            let _queued = Gauge::up(self.ctl.counter_queued());
            let _pending = Gauge::up(&stats.pending);
            if self.slots.available_permits() == 0 {
                self.ctl.note_waited();
            }
            self.slots.acquire().await.map_err(|_| {
                Failure::Status(
                    Status::unavailable("simulator is shutting down"),
                    FailReason::Backend,
                )
            })?
        };
        let waited = start.elapsed();
        stats.queue_ns.fetch_add(nanos(waited), RELAXED);
        Ok((
            Slot {
                _permit: permit,
                _busy: Gauge::up(self.ctl.counter_busy()),
            },
            waited,
        ))
    }

    fn service_time(&self, req: &ModelInferRequest) -> Duration {
        let kib = models::request_tensor_bytes(req) as f64 / 1024.0;
        ms(self.timing.latency_ms)
            + Duration::from_secs_f64((self.timing.per_kib_us.max(0.0) * kib / 1e6).min(1e6))
            + Duration::from_millis(self.ctl.extra_latency_ms())
    }

    /// Checks shared by unary and stream calls, in the order a real server meets them:
    /// hang, unknown model, failing model, injected fault.
    async fn admit(&self, req: &ModelInferRequest) -> Result<Model, Failure> {
        if self.ctl.hang() {
            std::future::pending::<()>().await;
        }
        let model = self.resolve(&req.model_name, &req.model_version)?;
        if self.ctl.model_failing(model.name()) {
            return Err(Failure::Status(
                Status::unavailable(format!("model '{}' is failing (injected)", model.name())),
                FailReason::Backend,
            ));
        }
        if self.ctl.roll_fault() {
            return Err(Failure::Status(
                Status::new(self.ctl.error_code(), "injected fault"),
                FailReason::Backend,
            ));
        }
        if let Some(code) = asked_failure(req) {
            return Err(Failure::Status(
                Status::new(
                    code,
                    "failure asked for by the request's sim_fail parameter",
                ),
                FailReason::Backend,
            ));
        }
        Ok(model)
    }

    fn resolve(&self, name: &str, version: &str) -> Result<Model, Failure> {
        let model = Model::from_name(name)
            .filter(|m| self.ctl.stats(*m).is_some())
            .ok_or_else(|| {
                Failure::Status(
                    Status::not_found(format!("unknown model '{name}'")),
                    FailReason::Other,
                )
            })?;
        if !version.is_empty() && version != models::VERSION {
            return Err(Failure::Status(
                Status::not_found(format!("unknown version '{version}' of model '{name}'")),
                FailReason::Other,
            ));
        }
        Ok(model)
    }

    /// Runs a non-decoupled model on a slot, under `queue` and `execute` spans that are
    /// children of the call's `span`.
    async fn execute(
        &self,
        model: Model,
        req: &ModelInferRequest,
        span: &CallSpan,
    ) -> Result<ModelInferResponse, Failure> {
        let run = match model {
            Model::Simple | Model::SimpleSmall => models::run_simple,
            Model::IdentityFp32 => models::run_identity,
            Model::Accumulate => return self.execute_stateful(model, req, span).await,
            Model::TinyLlm => {
                return Err(Failure::Status(
                    Status::invalid_argument(format!(
                        "model '{}' is decoupled: use ModelStreamInfer",
                        model.name()
                    )),
                    FailReason::Other,
                ))
            }
        };
        let stats = self.stats(model)?;
        // Validate before queueing, as a real server does.
        let resp = run(req)?;
        let queue = span.child("queue");
        let (slot, _) = self.acquire(stats).await?;
        queue.end(Code::Ok);
        let execute = span.child("execute");
        execute.set_attr(attr::MODEL, model.name());
        let compute = self.service_time(req);
        // A zero service time must not cost a timer tick (1 ms): benchmarks of the
        // gateway's own overhead run the simulator at zero.
        if !compute.is_zero() {
            tokio::time::sleep(compute).await;
        }
        drop(slot);
        execute.end(Code::Ok);
        self.note_exec(stats, compute);
        Ok(resp)
    }

    /// `accumulate`: the state moves in arrival order, before the slot is taken, so a
    /// sequence's answers follow its requests whatever the queue does.
    async fn execute_stateful(
        &self,
        model: Model,
        req: &ModelInferRequest,
        span: &CallSpan,
    ) -> Result<ModelInferResponse, Failure> {
        let stats = self.stats(model)?;
        let resp = self
            .sequences
            .run(req, Instant::now())
            .map_err(|s| Failure::Status(s, FailReason::Other))?;
        let (slot, _) = self.acquire(stats).await?;
        let execute = span.child("execute");
        execute.set_attr(attr::MODEL, model.name());
        let compute = self.service_time(req);
        if !compute.is_zero() {
            tokio::time::sleep(compute).await;
        }
        drop(slot);
        execute.end(Code::Ok);
        self.note_exec(stats, compute);
        Ok(resp)
    }

    fn stats(&self, model: Model) -> Result<&ModelStats, Failure> {
        self.ctl.stats(model).ok_or_else(|| {
            Failure::Status(
                Status::not_found(format!("unknown model '{}'", model.name())),
                FailReason::Other,
            )
        })
    }

    fn note_exec(&self, stats: &ModelStats, compute: Duration) {
        stats.exec_count.fetch_add(1, RELAXED);
        stats.inference_count.fetch_add(1, RELAXED);
        stats.compute_ns.fetch_add(nanos(compute), RELAXED);
        stats.last_inference_ms.store(wall_ms(), RELAXED);
    }

    /// Metadata every inference answer carries: the simulator's name and, when enabled,
    /// the ORCA load report.
    fn answer_metadata(&self) -> MetadataMap {
        let mut md = MetadataMap::new();
        if let Ok(v) = self.ctl.name().parse() {
            md.insert(NAME_KEY, v);
        }
        if self.timing.orca_per_call {
            let report = self.ctl.load_report().encode_to_vec();
            md.insert_bin(ORCA_TRAILER, MetadataValue::from_bytes(&report));
        }
        md
    }
}

/// The `inference.GRPCInferenceService` implementation.
#[derive(Clone, Debug)]
pub(crate) struct InferenceSvc {
    pub(crate) engine: Arc<Engine>,
}

/// Extra trailers a handler wants on its (successful) response; see [`TrailerLayer`].
#[derive(Clone, Debug)]
pub(crate) struct ExtraTrailers(pub(crate) http::HeaderMap);

type StreamOut = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceSvc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.engine.ctl.ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let ready = self.engine.resolve(&req.name, &req.version).is_ok()
            && !self.engine.ctl.model_failing(&req.name);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "infergate-sim".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: ["classification", "model_configuration", "statistics"]
                .map(str::to_owned)
                .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let model = self.lookup(&req.name, &req.version)?;
        Ok(Response::new(model.metadata()))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let engine = &self.engine;
        engine.ctl.record_metadata(req.metadata());
        let span = trace::grpc_server_span(trace::SIM_SCOPE, "ModelInfer", req.metadata());
        let req = req.into_inner();
        if span.is_recording() {
            span.set_attr(attr::SIM, engine.ctl.name());
            span.set_attr(attr::MODEL, req.model_name.as_str());
        }
        let mut guard = CallGuard::new(engine, Model::from_name(&req.model_name));
        let result = match engine.admit(&req).await {
            Ok(model) => engine.execute(model, &req, &span).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(resp) => {
                span.end(Code::Ok);
                guard.finish(Ok(()));
                drop(guard);
                let md = engine.answer_metadata();
                let mut resp = Response::new(resp);
                if let Ok(v) = engine.ctl.name().parse() {
                    resp.metadata_mut().insert(NAME_KEY, v);
                }
                resp.extensions_mut()
                    .insert(ExtraTrailers(md.into_headers()));
                Ok(resp)
            }
            Err(Failure::Status(status, reason)) => {
                span.end_with_status(&status);
                guard.finish(Err(reason));
                drop(guard);
                let md = engine.answer_metadata();
                Err(Status::with_metadata(
                    status.code(),
                    status.message().to_owned(),
                    md,
                ))
            }
        }
    }

    type ModelStreamInferStream = StreamOut;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<StreamOut>, Status> {
        self.engine.ctl.record_metadata(req.metadata());
        // One span for the whole stream, ended once every request on it is answered.
        let span = trace::grpc_server_span(trace::SIM_SCOPE, "ModelStreamInfer", req.metadata());
        span.set_attr(attr::SIM, self.engine.ctl.name());
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let reader = tokio::spawn(read_stream(
            self.engine.clone(),
            inbound,
            tx,
            Arc::new(span),
        ));
        let out = StreamBody {
            rx,
            _reader: AbortOnDrop(reader),
            engine: self.engine.clone(),
            ended: false,
        };
        let mut resp = Response::new(Box::pin(out) as StreamOut);
        if let Ok(v) = self.engine.ctl.name().parse() {
            resp.metadata_mut().insert(NAME_KEY, v);
        }
        Ok(resp)
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let req = req.into_inner();
        let model = self.lookup(&req.name, &req.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(model.config()),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let req = req.into_inner();
        let only = if req.name.is_empty() {
            None
        } else {
            Some(self.lookup(&req.name, &req.version)?)
        };
        let model_stats = self
            .engine
            .ctl
            .served()
            .filter(|(m, _)| only.is_none_or(|o| o == *m))
            .map(|(m, s)| statistics(m, s))
            .collect();
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let only_ready = req.into_inner().ready;
        let models = self
            .engine
            .ctl
            .served()
            .filter_map(|(m, s)| {
                let failing = s.failing.load(RELAXED);
                if only_ready && failing {
                    return None;
                }
                Some(ModelIndex {
                    name: m.name().to_owned(),
                    version: models::VERSION.to_owned(),
                    state: if failing { "UNAVAILABLE" } else { "READY" }.to_owned(),
                    reason: if failing { "injected failure" } else { "" }.to_owned(),
                })
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}

impl InferenceSvc {
    fn lookup(&self, name: &str, version: &str) -> Result<Model, Status> {
        self.engine.resolve(name, version).map_err(|e| match e {
            Failure::Status(s, _) => s,
        })
    }
}

fn duration(count: u64, ns: &AtomicU64) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count,
        ns: ns.load(RELAXED),
    })
}

fn statistics(model: Model, s: &ModelStats) -> ModelStatistics {
    let success = s.success.load(RELAXED);
    let fails: u64 = FailReason::ALL.iter().map(|r| s.failures(*r)).sum();
    let execs = s.exec_count.load(RELAXED);
    ModelStatistics {
        name: model.name().to_owned(),
        version: models::VERSION.to_owned(),
        last_inference: s.last_inference_ms.load(RELAXED),
        inference_count: s.inference_count.load(RELAXED),
        execution_count: execs,
        inference_stats: Some(InferStatistics {
            success: duration(success, &s.success_ns),
            fail: duration(fails, &s.fail_ns),
            queue: duration(execs, &s.queue_ns),
            compute_infer: duration(execs, &s.compute_ns),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The response side of `ModelStreamInfer`. Dropping it (the client went away) aborts
/// the reader, which aborts every request still running on the stream. When all
/// responses are out it ends with trailers carrying the load report.
struct StreamBody {
    rx: mpsc::Receiver<ModelStreamInferResponse>,
    _reader: AbortOnDrop,
    engine: Arc<Engine>,
    ended: bool,
}

impl Stream for StreamBody {
    type Item = Result<ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                self.ended = true;
                // An `Ok` status as the last item becomes the trailers: grpc-status 0
                // plus our metadata.
                let md = self.engine.answer_metadata();
                Poll::Ready(Some(Err(Status::with_metadata(Code::Ok, "", md))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Reads requests off a stream and runs each in its own task, so many can be in flight
/// at once. Ends (closing the response stream) once the client has stopped sending and
/// every request is answered. `span` is the stream's server span: each request's spans
/// are its children; it ends here, or when the reader is aborted (the client left).
async fn read_stream(
    engine: Arc<Engine>,
    mut inbound: Streaming<ModelInferRequest>,
    tx: mpsc::Sender<ModelStreamInferResponse>,
    span: Arc<CallSpan>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    tasks.spawn(stream_request(engine.clone(), req, tx.clone(), span.clone()));
                }
                Ok(None) => break,
                // The client reset the stream: nobody is listening any more.
                Err(_) => {
                    span.add_event("client reset");
                    return;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Ok(span) = Arc::try_unwrap(span) {
        span.end(Code::Ok);
    }
}

fn stream_error(req: &ModelInferRequest, message: String) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: message,
        infer_response: Some(models::base_response(req)),
    }
}

fn stream_ok(resp: ModelInferResponse) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(resp),
    }
}

/// One request on a stream: answered with one response, a series of tokens, or an
/// in-stream error.
async fn stream_request(
    engine: Arc<Engine>,
    req: ModelInferRequest,
    tx: mpsc::Sender<ModelStreamInferResponse>,
    span: Arc<CallSpan>,
) {
    let mut guard = CallGuard::new(&engine, Model::from_name(&req.model_name));
    let result = match engine.admit(&req).await {
        Ok(Model::TinyLlm) => generate(&engine, &req, &tx, &span).await,
        Ok(model) => match engine.execute(model, &req, &span).await {
            Ok(resp) => {
                let _ = tx.send(stream_ok(resp)).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => guard.finish(Ok(())),
        Err(Failure::Status(status, reason)) => {
            span.add_event("request failed");
            guard.finish(Err(reason));
            drop(guard);
            let _ = tx
                .send(stream_error(&req, status.message().to_owned()))
                .await;
        }
    }
}

/// `tiny_llm`: holds one slot for the whole generation; a prefill of the usual service
/// time, then one token every `token_latency_ms`.
async fn generate(
    engine: &Engine,
    req: &ModelInferRequest,
    tx: &mpsc::Sender<ModelStreamInferResponse>,
    span: &CallSpan,
) -> Result<(), Failure> {
    let llm = models::parse_llm(req)?;
    let stats = engine.stats(Model::TinyLlm)?;
    let queue = span.child("queue");
    let (slot, _) = engine.acquire(stats).await?;
    queue.end(Code::Ok);
    let execute = span.child("execute");
    execute.set_attr(attr::MODEL, Model::TinyLlm.name());
    let start = Instant::now();
    // The prefill: faster when the prompt's prefix was served here lately.
    let hit = engine.prefix.serve(&llm.prompt, start);
    if engine.prefix.enabled() {
        engine.ctl.note_prefix(hit);
    }
    let _kv = engine.ctl.hold_kv(llm.prompt.len(), llm.max_tokens);
    tokio::time::sleep(engine.prefix.prefill(engine.service_time(req), hit)).await;
    if llm.max_tokens == 0 {
        let _ = tx
            .send(stream_ok(models::llm_response(req, None, true)))
            .await;
    }
    let per_token = ms(engine.timing.token_latency_ms);
    for i in 0..llm.max_tokens {
        tokio::time::sleep(per_token).await;
        let token = models::token_text(i);
        let last = i + 1 == llm.max_tokens;
        if tx
            .send(stream_ok(models::llm_response(req, Some(&token), last)))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(slot);
    execute.end(Code::Ok);
    engine.note_exec(stats, start.elapsed());
    Ok(())
}

/// `xds.service.orca.v3.OpenRcaService`: load reports pushed on an interval.
#[derive(Clone, Debug)]
pub(crate) struct OrcaSvc {
    pub(crate) ctl: Arc<SimControl>,
}

/// The interval a client asked for: 1 s when absent or zero, never below 10 ms.
pub(crate) fn report_interval(seconds: i64, nanos: i32) -> Duration {
    let secs = u64::try_from(seconds).unwrap_or(0);
    let nanos = u32::try_from(nanos).unwrap_or(0).min(999_999_999);
    let d = Duration::new(secs, nanos);
    if d.is_zero() {
        Duration::from_secs(1)
    } else {
        d.max(Duration::from_millis(10))
    }
}

type OrcaStream = Pin<Box<dyn Stream<Item = Result<OrcaLoadReport, Status>> + Send>>;

#[tonic::async_trait]
impl OpenRcaService for OrcaSvc {
    type StreamCoreMetricsStream = OrcaStream;

    async fn stream_core_metrics(
        &self,
        req: Request<OrcaLoadReportRequest>,
    ) -> Result<Response<OrcaStream>, Status> {
        let every = req
            .into_inner()
            .report_interval
            .map_or(Duration::from_secs(1), |d| {
                report_interval(d.seconds, d.nanos)
            });
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stream = futures_util::stream::unfold(
            (self.ctl.clone(), ticker),
            |(ctl, mut ticker)| async move {
                ticker.tick().await;
                let report = ctl.load_report();
                Some((Ok(report), (ctl, ticker)))
            },
        );
        Ok(Response::new(Box::pin(stream) as OrcaStream))
    }
}

/// Keeps the invisible work's share of the slots in step with `hidden_load`: holds
/// `round(h * slots)` permits (leaving at least one), re-balancing on every change.
pub(crate) async fn hold_hidden_load(engine: Arc<Engine>) {
    let mut changes = engine.ctl.subscribe();
    let mut held: Vec<SemaphorePermit<'_>> = Vec::new();
    loop {
        let want = models::hidden_permits(engine.ctl.hidden_load(), engine.ctl.slots());
        held.truncate(want);
        if held.len() < want {
            tokio::select! {
                permit = engine.slots.acquire() => match permit {
                    Ok(p) => held.push(p),
                    Err(_) => return,
                },
                changed = changes.changed() => if changed.is_err() { return },
            }
        } else if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Re-publishes health whenever the controls change, retrying while the reporter is
/// busy, so the statuses always end up matching the controls.
pub(crate) async fn keep_health_in_sync(ctl: Arc<SimControl>) {
    let mut changes = ctl.subscribe();
    loop {
        while !ctl.sync_health() {
            tokio::task::yield_now().await;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// A request that does not decode is the caller's mistake: tonic's codec says INTERNAL
/// `failed to decode Protobuf message`; the simulator answers INVALID_ARGUMENT with the
/// same message instead, as Triton does.
fn undecodable_is_invalid_argument(map: &mut http::HeaderMap) {
    let internal = map
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    let undecodable = map.get("grpc-message").is_some_and(|v| {
        let m = v.as_bytes();
        m.starts_with(b"failed%20to%20decode") || m.starts_with(b"failed to decode")
    });
    if internal && undecodable {
        map.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// Tower layer that appends [`ExtraTrailers`] to the trailer frame of a response, and
/// turns a codec's decode failure into INVALID_ARGUMENT.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TrailerLayer;

/// The request's `sim_fail` string parameter, a gRPC code name: the simulator answers
/// that request with it, as a model that crashes on some inputs (and only those) does.
fn asked_failure(req: &ModelInferRequest) -> Option<tonic::Code> {
    use infergate_proto::inference::infer_parameter::ParameterChoice;
    match req.parameters.get("sim_fail")?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(name) => infergate_base::codes::parse(name).ok(),
        _ => None,
    }
}

impl<S> tower::Layer<S> for TrailerLayer {
    type Service = TrailerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TrailerService { inner }
    }
}

/// See [`TrailerLayer`].
#[derive(Clone, Debug)]
pub(crate) struct TrailerService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, Req, B> tower::Service<Req> for TrailerService<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<WithTrailers<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (mut parts, body) = resp.into_parts();
            undecodable_is_invalid_argument(&mut parts.headers);
            let extra = parts.extensions.remove::<ExtraTrailers>().map(|e| e.0);
            Ok(http::Response::from_parts(
                parts,
                WithTrailers { inner: body, extra },
            ))
        })
    }
}

/// A response body whose trailer frame gets extra entries.
#[derive(Debug)]
pub(crate) struct WithTrailers<B> {
    inner: B,
    extra: Option<http::HeaderMap>,
}

impl<B> http_body::Body for WithTrailers<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let frame = match frame {
            Some(Ok(frame)) if frame.is_trailers() => {
                let mut trailers = match frame.into_trailers() {
                    Ok(t) => t,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                };
                undecodable_is_invalid_argument(&mut trailers);
                if let Some(extra) = self.extra.take() {
                    for (k, v) in extra.iter() {
                        if !trailers.contains_key(k) {
                            trailers.insert(k.clone(), v.clone());
                        }
                    }
                }
                Some(Ok(Frame::trailers(trailers)))
            }
            other => other,
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
