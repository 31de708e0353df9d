//! Distributed tracing: beside the request path, opened by `path.rs` around each
//! forwarded call and by the simulator around each inference.
//!
//! One inference shows as one trace across three processes: `infergate-cli` (or any
//! OpenTelemetry client) starts it and sends W3C `traceparent`/`tracestate` in the gRPC
//! metadata; the gateway continues it with a SERVER span, INTERNAL spans for the
//! bulkhead wait and the pick, and one CLIENT span per backend attempt whose context is
//! injected into that attempt's request; a backend (our simulator, Triton, ...) continues
//! it from there. Spans follow the OpenTelemetry RPC conventions (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address`, `server.port`)
//! plus `infergate.*` attributes (see [`attr`]).
//!
//! Why a flag and not only a no-op tracer: the gateway forwards raw HTTP requests and
//! must cost almost nothing when nobody collects traces. Until [`init`] installs an
//! exporter, [`enabled`] is false and every [`CallSpan`] is an empty `Option`: no
//! context is extracted, nothing is allocated, and the caller's `traceparent` passes
//! through to the backend untouched with the other headers.
//!
//! Export is OTLP over gRPC (tonic, sharing the gateway's tonic), configured by the
//! standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) or a [`TraceConfig`].
//!
//! ```no_run
//! # async fn demo(request: http::Request<()>, mut backend: http::HeaderMap) {
//! use infergate_base::trace::{self, attr, TraceConfig};
//! let cfg = TraceConfig::from_env().unwrap_or_default();
//! let guard = trace::init(cfg).expect("tracing starts"); // inside a tokio runtime
//!
//! let span = trace::request_span(&request); // SERVER, child of the caller's traceparent
//! span.set_attr(attr::MODEL, "simple");
//! let pick = span.child("pick");
//! pick.set_attr(attr::BACKEND, "10.0.0.7:8001");
//! pick.end(tonic::Code::Ok);
//! let attempt = span.client_attempt("10.0.0.7:8001", 1); // CLIENT
//! attempt.inject(&mut backend); // the backend call carries the attempt's traceparent
//! attempt.end(tonic::Code::Ok);
//! span.end(tonic::Code::Ok);
//!
//! guard.shutdown().await.ok(); // flushes what is still queued
//! # }
//! ```

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanKind, Status as SpanStatus, TraceContextExt, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tonic::metadata::MetadataMap;
use tonic::Code;

/// Attribute keys, so call sites cannot misspell them.
pub mod attr {
    /// `grpc`, on every RPC span.
    pub const RPC_SYSTEM: &str = "rpc.system";
    /// Full service name, e.g. `inference.GRPCInferenceService`.
    pub const RPC_SERVICE: &str = "rpc.service";
    /// Method name, e.g. `ModelInfer`.
    pub const RPC_METHOD: &str = "rpc.method";
    /// The numeric gRPC status code the call ended with.
    pub const RPC_GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
    /// Host the call was addressed to (the backend, on CLIENT spans).
    pub const SERVER_ADDRESS: &str = "server.address";
    /// Port the call was addressed to.
    pub const SERVER_PORT: &str = "server.port";
    /// Model name from the request.
    pub const MODEL: &str = "infergate.model";
    /// Tenant the caller was admitted as.
    pub const TENANT: &str = "infergate.tenant";
    /// Balancing policy of the route.
    pub const POLICY: &str = "infergate.policy";
    /// How many endpoints were eligible at the pick.
    pub const CANDIDATES: &str = "infergate.candidates";
    /// The backend picked / called (host:port).
    pub const BACKEND: &str = "infergate.backend";
    /// The picked backend's score under the policy.
    pub const SCORE: &str = "infergate.score";
    /// Time spent waiting for a bulkhead slot.
    pub const QUEUE_WAIT_MS: &str = "infergate.queue_wait_ms";
    /// Attempt number of a backend call, from 1.
    pub const ATTEMPT: &str = "infergate.attempt";
    /// True on a hedged (speculative) attempt.
    pub const HEDGE: &str = "infergate.hedge";
    /// The simulator's name, on the simulator's spans.
    pub const SIM: &str = "infergate.sim";
    /// How the response cache served the call: `hit`, `miss` or `coalesced`.
    pub const CACHE: &str = "infergate.cache";
}

/// Instrumentation scope of the gateway's spans.
pub const GATEWAY_SCOPE: &str = "infergate";
/// Instrumentation scope of the simulator's spans.
pub const SIM_SCOPE: &str = "infergate-sim";

/// The service every forwarded RPC belongs to, used when a method comes without one.
const DEFAULT_SERVICE: &str = "inference.GRPCInferenceService";

static ENABLED: AtomicBool = AtomicBool::new(false);
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// True once [`init`] has installed an exporter (and until its guard shuts down).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// Configuration

/// Which traces to keep: the values of `OTEL_TRACES_SAMPLER`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// A share (`ratio`) of traces, chosen by trace id.
    #[serde(rename = "traceidratio")]
    TraceIdRatio,
    /// Follow the caller's decision; keep every trace that starts here (the default).
    #[default]
    ParentbasedAlwaysOn,
    /// Follow the caller's decision; keep no trace that starts here.
    ParentbasedAlwaysOff,
    /// Follow the caller's decision; keep `ratio` of the traces that start here.
    ParentbasedTraceidratio,
}

impl SamplerKind {
    /// Parses an `OTEL_TRACES_SAMPLER` value.
    pub fn parse(s: &str) -> Option<SamplerKind> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "always_on" => SamplerKind::AlwaysOn,
            "always_off" => SamplerKind::AlwaysOff,
            "traceidratio" => SamplerKind::TraceIdRatio,
            "parentbased_always_on" => SamplerKind::ParentbasedAlwaysOn,
            "parentbased_always_off" => SamplerKind::ParentbasedAlwaysOff,
            "parentbased_traceidratio" => SamplerKind::ParentbasedTraceidratio,
            _ => return None,
        })
    }

    fn sampler(self, ratio: f64) -> Sampler {
        let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
        match self {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::TraceIdRatio => Sampler::TraceIdRatioBased(ratio),
            SamplerKind::ParentbasedAlwaysOn => parent(Sampler::AlwaysOn),
            SamplerKind::ParentbasedAlwaysOff => parent(Sampler::AlwaysOff),
            SamplerKind::ParentbasedTraceidratio => parent(Sampler::TraceIdRatioBased(ratio)),
        }
    }
}

/// Where and how to export spans. With no `endpoint`, tracing stays off.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; `None` turns tracing off.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Sampling decision for traces.
    pub sampler: SamplerKind,
    /// Share of traces kept by the ratio samplers, 0 to 1.
    pub ratio: f64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            endpoint: None,
            service_name: GATEWAY_SCOPE.to_owned(),
            sampler: SamplerKind::default(),
            ratio: 1.0,
        }
    }
}

impl TraceConfig {
    /// The configuration the standard `OTEL_*` variables describe, with `service.name`
    /// `infergate` unless `OTEL_SERVICE_NAME` says otherwise.
    pub fn from_env() -> Result<TraceConfig, String> {
        TraceConfig::default().with_env(|k| std::env::var(k).ok())
    }

    /// Like [`TraceConfig::from_env`] with another default service name (`infergate-sim`).
    pub fn from_env_for(service_name: &str) -> Result<TraceConfig, String> {
        TraceConfig {
            service_name: service_name.to_owned(),
            ..TraceConfig::default()
        }
        .with_env(|k| std::env::var(k).ok())
    }

    /// This configuration overridden by whichever variables `var` knows:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (before `OTEL_EXPORTER_OTLP_ENDPOINT`),
    /// `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`;
    /// `OTEL_SDK_DISABLED=true` turns tracing off. Errors name the variable.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<TraceConfig, String> {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if let Some(e) =
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            self.endpoint = Some(e.trim().to_owned());
        }
        if let Some(name) = set("OTEL_SERVICE_NAME") {
            self.service_name = name.trim().to_owned();
        }
        if let Some(s) = set("OTEL_TRACES_SAMPLER") {
            self.sampler = SamplerKind::parse(&s).ok_or_else(|| {
                format!(
                    "OTEL_TRACES_SAMPLER: unknown sampler {s:?} (known: always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio)"
                )
            })?;
        }
        if let Some(arg) = set("OTEL_TRACES_SAMPLER_ARG") {
            self.ratio = match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(format!(
                        "OTEL_TRACES_SAMPLER_ARG: {arg:?} is not a number between 0 and 1"
                    ))
                }
            };
        }
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            self.endpoint = None;
        }
        Ok(self)
    }

    /// Checks the fields; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(format!(
                "ratio: must be between 0 and 1, got {}",
                self.ratio
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("service_name: must not be empty".to_owned());
        }
        if let Some(e) = &self.endpoint {
            let uri = endpoint_uri(e);
            let parsed: Result<http::Uri, _> = uri.parse();
            if parsed.map(|u| u.host().is_none()).unwrap_or(true) {
                return Err(format!(
                    "endpoint: {e:?} is not an address (give host:port or http://host:port)"
                ));
            }
        }
        Ok(())
    }
}

fn endpoint_uri(e: &str) -> String {
    let e = e.trim();
    if e.contains("://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    }
}

// ---------------------------------------------------------------------------------------
// Start and stop

/// Installs the global tracer provider when `cfg.endpoint` is set and returns the guard
/// that flushes it; with no endpoint it installs nothing and the guard does nothing.
///
/// Call it inside a tokio runtime (the exporter's channel lives on it) and keep that
/// runtime running until the guard has shut down.
pub fn init(cfg: TraceConfig) -> Result<TraceGuard, String> {
    cfg.validate()?;
    let Some(endpoint) = &cfg.endpoint else {
        return Ok(TraceGuard::inactive());
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("tracing: init must run inside a tokio runtime".to_owned());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint_uri(endpoint))
        .build()
        .map_err(|e| format!("tracing: OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(cfg.sampler.sampler(cfg.ratio))
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    ENABLED.store(true, Ordering::SeqCst);
    tracing::info!(
        endpoint = %endpoint,
        service = %cfg.service_name,
        sampler = ?cfg.sampler,
        ratio = cfg.ratio,
        "exporting traces (OTLP/gRPC)"
    );
    Ok(TraceGuard {
        provider: Some(provider),
        generation,
    })
}

/// Owns the installed tracer provider. [`TraceGuard::shutdown`] (or dropping it) exports
/// what is still queued and turns tracing off.
#[must_use = "dropping the guard shuts tracing down"]
#[derive(Debug)]
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
    generation: u64,
}

impl TraceGuard {
    /// A guard for "tracing off".
    pub fn inactive() -> TraceGuard {
        TraceGuard {
            provider: None,
            generation: 0,
        }
    }

    /// True when it holds an exporter.
    pub fn is_active(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every ended span now and waits for the collector's answer.
    pub async fn flush(&self) -> Result<(), String> {
        let Some(provider) = self.provider.clone() else {
            return Ok(());
        };
        // The export runs on the runtime's tasks; block a pool thread, not this one.
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .map_err(|e| format!("tracing: flush task failed: {e}"))?
            .map_err(|e| format!("tracing: flush: {e}"))
    }

    /// Flushes, stops the exporter and turns tracing off.
    pub async fn shutdown(mut self) -> Result<(), String> {
        let Some(provider) = self.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .map_err(|e| format!("tracing: shutdown task failed: {e}"))?
            .map_err(|e| format!("tracing: shutdown: {e}"))
    }

    /// Turns tracing off and hands back the provider, once.
    fn take(&mut self) -> Option<SdkTracerProvider> {
        let provider = self.provider.take()?;
        if GENERATION.load(Ordering::SeqCst) == self.generation {
            ENABLED.store(false, Ordering::SeqCst);
            opentelemetry::global::set_tracer_provider(
                opentelemetry::trace::noop::NoopTracerProvider::new(),
            );
        }
        Some(provider)
    }
}

impl Drop for TraceGuard {
    /// Best effort: prefer `shutdown().await`. On a current-thread runtime the export
    /// cannot progress while this thread blocks, so it waits at most a moment there.
    fn drop(&mut self) {
        let Some(provider) = self.take() else {
            return;
        };
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => {
                let _ = tokio::task::block_in_place(|| provider.shutdown());
            }
            Ok(_) => {
                let _ = provider.shutdown_with_timeout(Duration::from_millis(200));
            }
            Err(_) => {
                let _ = provider.shutdown();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Propagation

/// Reads W3C `traceparent`/`tracestate` from HTTP headers (gRPC metadata).
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes W3C trace headers into HTTP headers, replacing any already there.
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's trace context from `traceparent`/`tracestate` (empty when absent or
/// malformed).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// Writes `cx`'s span as `traceparent`/`tracestate` into `headers`, replacing what was
/// there; does nothing when `cx` holds no valid span.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// The trace id (32 hex digits) of `cx`'s span, for log lines; `None` without one.
pub fn current_trace_id(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

// ---------------------------------------------------------------------------------------
// Spans

/// A value an attribute can take; converted only when tracing is on.
pub trait AttrValue {
    /// The OpenTelemetry value.
    fn into_value(self) -> Value;
}

macro_rules! attr_value {
    ($($t:ty => $conv:expr),* $(,)?) => {$(
        impl AttrValue for $t {
            fn into_value(self) -> Value {
                #[allow(clippy::redundant_closure_call)]
                ($conv)(self)
            }
        }
    )*};
}

attr_value! {
    &str => |v: &str| Value::from(v.to_owned()),
    String => Value::from,
    &String => |v: &String| Value::from(v.clone()),
    Arc<str> => Value::from,
    bool => Value::from,
    i64 => Value::from,
    u32 => |v: u32| Value::from(i64::from(v)),
    u64 => |v: u64| Value::from(i64::try_from(v).unwrap_or(i64::MAX)),
    usize => |v: usize| Value::from(i64::try_from(v).unwrap_or(i64::MAX)),
    f64 => Value::from,
}

/// The RPC a span belongs to.
#[derive(Debug)]
struct Rpc {
    service: String,
    method: String,
}

impl Rpc {
    /// From `/pkg.Service/Method`, `pkg.Service/Method` or `Method` (then the KServe
    /// inference service).
    fn parse(method: &str) -> Rpc {
        let m = method.trim_start_matches('/');
        match m.rsplit_once('/') {
            Some((service, method)) => Rpc {
                service: service.to_owned(),
                method: method.to_owned(),
            },
            None => Rpc {
                service: DEFAULT_SERVICE.to_owned(),
                method: m.to_owned(),
            },
        }
    }

    fn span_name(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }

    fn attributes(&self) -> [KeyValue; 3] {
        [
            KeyValue::new(attr::RPC_SYSTEM, "grpc"),
            KeyValue::new(attr::RPC_SERVICE, self.service.clone()),
            KeyValue::new(attr::RPC_METHOD, self.method.clone()),
        ]
    }
}

#[derive(Debug)]
struct Inner {
    /// Holds the span itself; also the parent of children and what is injected.
    cx: Context,
    scope: &'static str,
    kind: SpanKind,
    rpc: Option<Arc<Rpc>>,
    ended: bool,
}

/// One span of a call. With tracing off it is empty and every method does nothing.
///
/// `Send + 'static`: it can live in a response body or a spawned task. Ends on drop if
/// [`CallSpan::end`] was not called (e.g. the caller went away).
#[derive(Debug, Default)]
#[must_use = "a span ends when dropped"]
pub struct CallSpan(Option<Box<Inner>>);

/// A SERVER span for an incoming call to `method` (`/pkg.Service/Method` or just
/// `ModelInfer`), child of the caller's `traceparent` in `headers`.
pub fn server_span(method: &str, headers: &HeaderMap) -> CallSpan {
    if !enabled() {
        return CallSpan::disabled();
    }
    CallSpan::server(GATEWAY_SCOPE, method, &extract(headers), None)
}

/// A SERVER span for an incoming HTTP/2 gRPC request: the method from its path,
/// `server.address`/`server.port` from its authority, the parent from its headers.
pub fn request_span<B>(request: &http::Request<B>) -> CallSpan {
    if !enabled() {
        return CallSpan::disabled();
    }
    let uri = request.uri();
    CallSpan::server(
        GATEWAY_SCOPE,
        uri.path(),
        &extract(request.headers()),
        uri.authority().map(|a| a.as_str()),
    )
}

/// A SERVER span in `scope` for a tonic handler, child of the trace in its metadata.
/// Used by the simulator.
pub fn grpc_server_span(scope: &'static str, method: &str, metadata: &MetadataMap) -> CallSpan {
    if !enabled() {
        return CallSpan::disabled();
    }
    let parent = TraceContextPropagator::new().extract_with_context(
        &Context::new(),
        &infergate_proto::propagation::MetadataExtractor(metadata),
    );
    CallSpan::server(scope, method, &parent, None)
}

fn split_host_port(authority: &str) -> (&str, Option<i64>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => (
            host.trim_start_matches('[').trim_end_matches(']'),
            port.parse().ok(),
        ),
        _ => (authority, None),
    }
}

fn address_attributes(authority: &str, out: &mut Vec<KeyValue>) {
    let (host, port) = split_host_port(authority);
    out.push(KeyValue::new(attr::SERVER_ADDRESS, host.to_owned()));
    if let Some(port) = port {
        out.push(KeyValue::new(attr::SERVER_PORT, port));
    }
}

impl CallSpan {
    /// The empty span of "tracing off".
    pub const fn disabled() -> CallSpan {
        CallSpan(None)
    }

    fn server(
        scope: &'static str,
        method: &str,
        parent: &Context,
        authority: Option<&str>,
    ) -> CallSpan {
        let rpc = Arc::new(Rpc::parse(method));
        let mut attributes = Vec::with_capacity(6);
        attributes.extend(rpc.attributes());
        if let Some(a) = authority {
            address_attributes(a, &mut attributes);
        }
        CallSpan::start(
            scope,
            parent,
            Cow::Owned(rpc.span_name()),
            SpanKind::Server,
            attributes,
            Some(rpc),
        )
    }

    fn start(
        scope: &'static str,
        parent: &Context,
        name: Cow<'static, str>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        rpc: Option<Arc<Rpc>>,
    ) -> CallSpan {
        let tracer = opentelemetry::global::tracer_provider().tracer(scope);
        let span = tracer
            .span_builder(name)
            .with_kind(kind.clone())
            .with_attributes(attributes)
            .start_with_context(&tracer, parent);
        CallSpan(Some(Box::new(Inner {
            cx: parent.with_span(span),
            scope,
            kind,
            rpc,
            ended: false,
        })))
    }

    /// True when the span records (tracing on and the trace sampled): worth computing an
    /// expensive attribute for.
    pub fn is_recording(&self) -> bool {
        self.0.as_ref().is_some_and(|i| i.cx.span().is_recording())
    }

    /// Sets an attribute (see [`attr`] for the keys).
    pub fn set_attr(&self, key: &'static str, value: impl AttrValue) {
        if let Some(inner) = &self.0 {
            inner
                .cx
                .span()
                .set_attribute(KeyValue::new(key, value.into_value()));
        }
    }

    /// Records a named event at this moment (e.g. `retry`, `hedge`, `first_byte`).
    pub fn add_event(&self, name: &'static str) {
        if let Some(inner) = &self.0 {
            inner.cx.span().add_event(name, Vec::new());
        }
    }

    /// An INTERNAL child span (`pick`, `bulkhead`, `queue`, `execute`).
    pub fn child(&self, name: &'static str) -> CallSpan {
        match &self.0 {
            None => CallSpan::disabled(),
            Some(inner) => CallSpan::start(
                inner.scope,
                &inner.cx,
                Cow::Borrowed(name),
                SpanKind::Internal,
                Vec::new(),
                None,
            ),
        }
    }

    /// A CLIENT child span for attempt `attempt` (from 1) of this call on `backend`
    /// (host:port). Inject it into that attempt's request with [`CallSpan::inject`].
    pub fn client_attempt(&self, backend: &str, attempt: u32) -> CallSpan {
        let Some(inner) = &self.0 else {
            return CallSpan::disabled();
        };
        let rpc = inner
            .rpc
            .clone()
            .unwrap_or_else(|| Arc::new(Rpc::parse("unknown")));
        let mut attributes = Vec::with_capacity(8);
        attributes.extend(rpc.attributes());
        address_attributes(backend, &mut attributes);
        attributes.push(KeyValue::new(attr::BACKEND, backend.to_owned()));
        attributes.push(KeyValue::new(attr::ATTEMPT, i64::from(attempt)));
        CallSpan::start(
            inner.scope,
            &inner.cx,
            Cow::Owned(rpc.span_name()),
            SpanKind::Client,
            attributes,
            Some(rpc),
        )
    }

    /// Writes this span as `traceparent`/`tracestate` into `headers` (a backend request),
    /// replacing the caller's; with tracing off the headers stay as they are.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(inner) = &self.0 {
            inject(&inner.cx, headers);
        }
    }

    /// The context holding this span (parent for spans made elsewhere), if tracing is on.
    pub fn context(&self) -> Option<&Context> {
        self.0.as_ref().map(|i| &i.cx)
    }

    /// This span's trace id, for log lines.
    pub fn trace_id(&self) -> Option<String> {
        self.context().and_then(current_trace_id)
    }

    /// Ends the span with gRPC status `code` (`rpc.grpc.status_code`; an error status
    /// when the code counts as an error for this kind of span).
    pub fn end(mut self, code: Code) {
        if let Some(inner) = self.0.as_mut() {
            inner.finish(code, None);
        }
    }

    /// Ends the span with `status`: its code, and its message as the error description.
    pub fn end_with_status(mut self, status: &tonic::Status) {
        if let Some(inner) = self.0.as_mut() {
            inner.finish(status.code(), Some(status.message()));
        }
    }
}

impl Inner {
    fn finish(&mut self, code: Code, message: Option<&str>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let span = self.cx.span();
        if self.rpc.is_some() {
            span.set_attribute(KeyValue::new(attr::RPC_GRPC_STATUS_CODE, code as i64));
        }
        if is_error(&self.kind, code) {
            let description = match message {
                Some(m) if !m.is_empty() => format!("{}: {m}", code.description()),
                _ => code.description().to_owned(),
            };
            span.set_status(SpanStatus::error(description));
        }
        span.end();
    }
}

/// The RPC conventions: any non-OK code fails a CLIENT (or INTERNAL) span; a SERVER span
/// fails only on codes that mean the server is at fault.
fn is_error(kind: &SpanKind, code: Code) -> bool {
    match kind {
        SpanKind::Server => matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ),
        _ => code != Code::Ok,
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if let Some(inner) = self.0.as_mut() {
            if !inner.ended {
                inner.ended = true;
                inner.cx.span().end();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn config_reads_the_standard_variables() {
        let cfg = TraceConfig::default()
            .with_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_SERVICE_NAME", "gw-1"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ]))
            .expect("valid");
        assert_eq!(cfg.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(cfg.service_name, "gw-1");
        assert_eq!(cfg.sampler, SamplerKind::ParentbasedTraceidratio);
        assert_eq!(cfg.ratio, 0.25);
        assert_eq!(cfg.validate(), Ok(()));

        let traces_first = TraceConfig::default()
            .with_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
            ]))
            .expect("valid");
        assert_eq!(traces_first.endpoint.as_deref(), Some("http://b:4317"));

        let off = TraceConfig::default()
            .with_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_SDK_DISABLED", "true"),
            ]))
            .expect("valid");
        assert_eq!(off.endpoint, None);
        assert_eq!(
            TraceConfig::default().with_env(env(&[])),
            Ok(TraceConfig::default())
        );
    }

    #[test]
    fn config_errors_name_the_variable() {
        let bad = TraceConfig::default().with_env(env(&[("OTEL_TRACES_SAMPLER", "sometimes")]));
        assert!(bad
            .err()
            .unwrap_or_default()
            .contains("OTEL_TRACES_SAMPLER"));
        let bad = TraceConfig::default().with_env(env(&[("OTEL_TRACES_SAMPLER_ARG", "2")]));
        assert!(bad
            .err()
            .unwrap_or_default()
            .contains("OTEL_TRACES_SAMPLER_ARG"));
        let bad = TraceConfig {
            endpoint: Some("http://".into()),
            ..TraceConfig::default()
        };
        assert!(bad
            .validate()
            .err()
            .unwrap_or_default()
            .contains("endpoint"));
    }

    #[test]
    fn no_endpoint_installs_nothing() {
        let guard = init(TraceConfig::default()).expect("off is fine");
        assert!(!guard.is_active());
        assert!(!enabled());
        let span = server_span("ModelInfer", &HeaderMap::new());
        assert!(span.context().is_none());
        let attempt = span.client_attempt("10.0.0.1:8001", 1);
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        attempt.inject(&mut headers);
        assert_eq!(
            headers.get("traceparent").map(HeaderValue::as_bytes),
            Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])
        );
        attempt.end(Code::Ok);
        span.end(Code::Ok);
        fn send_static<T: Send + Sync + 'static>() {}
        send_static::<CallSpan>();
        assert_eq!(
            std::mem::size_of::<CallSpan>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn headers_round_trip_the_trace_context() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        headers.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let cx = extract(&headers);
        assert_eq!(
            current_trace_id(&cx).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let mut out = HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
        assert_eq!(out.get("tracestate"), headers.get("tracestate"));
        assert_eq!(current_trace_id(&extract(&HeaderMap::new())), None);
    }

    #[test]
    fn rpc_names_and_addresses_parse() {
        let rpc = Rpc::parse("/inference.GRPCInferenceService/ModelInfer");
        assert_eq!(
            (rpc.service.as_str(), rpc.method.as_str()),
            ("inference.GRPCInferenceService", "ModelInfer")
        );
        assert_eq!(
            Rpc::parse("ModelStreamInfer").span_name(),
            "inference.GRPCInferenceService/ModelStreamInfer"
        );
        assert_eq!(split_host_port("10.0.0.1:8001"), ("10.0.0.1", Some(8001)));
        assert_eq!(split_host_port("[::1]:8001"), ("::1", Some(8001)));
        assert_eq!(split_host_port("backend"), ("backend", None));
        assert!(is_error(&SpanKind::Client, Code::NotFound));
        assert!(!is_error(&SpanKind::Server, Code::NotFound));
        assert!(is_error(&SpanKind::Server, Code::Unavailable));
    }
}
