//! Tracing for calls the client makes: each [`crate::Client`] call starts a CLIENT span
//! (the root of the trace, or a child of the caller's current OpenTelemetry context) and
//! sends it as W3C `traceparent`/`tracestate` metadata, so the gateway and the backend
//! continue the same trace.
//!
//! Spans go to the global tracer provider. Nothing is exported until one is installed,
//! by the application or by [`init_from_env`] (what `infergate-cli` does); until then
//! each call costs a look at the global provider and no metadata is added.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_SERVICE_NAME=my-app
//! let traces = infergate_client::trace::init_from_env("my-app")?;
//! let client = infergate_client::Client::connect("127.0.0.1:8001").await?;
//! client.infer_simple([1; 16], [2; 16]).await?;
//! traces.shutdown().await?; // exports what is still queued
//! # Ok(()) }
//! ```

use std::sync::Arc;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status as SpanStatus, TraceContextExt, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tonic::metadata::MetadataMap;

/// Instrumentation scope of the client's spans.
pub const SCOPE: &str = "infergate-client";

/// The service of every KServe v2 call.
pub(crate) const KSERVE: &str = "inference.GRPCInferenceService";
/// The gRPC health service.
pub(crate) const HEALTH: &str = "grpc.health.v1.Health";

/// Owns a tracer provider installed by [`init_from_env`]; [`TraceGuard::shutdown`] exports
/// what is still queued. Inactive when no endpoint was configured.
#[derive(Debug)]
#[must_use = "dropping the guard stops exporting"]
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
}

impl TraceGuard {
    /// True when it holds an exporter.
    pub fn is_active(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued, stops the exporter and uninstalls the provider.
    pub async fn shutdown(mut self) -> Result<(), String> {
        let Some(provider) = self.provider.take() else {
            return Ok(());
        };
        opentelemetry::global::set_tracer_provider(
            opentelemetry::trace::noop::NoopTracerProvider::new(),
        );
        // The export runs on the runtime's tasks; block a pool thread, not this one.
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .map_err(|e| format!("tracing: shutdown task failed: {e}"))?
            .map_err(|e| format!("tracing: shutdown: {e}"))
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(std::time::Duration::from_millis(200));
        }
    }
}

/// Installs an OTLP/gRPC exporter as the global tracer provider when
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and
/// `OTEL_SDK_DISABLED` is not `true`), with `service.name` from `OTEL_SERVICE_NAME`
/// (else `default_service`) and the sampler from `OTEL_TRACES_SAMPLER` /
/// `OTEL_TRACES_SAMPLER_ARG` (default: parent-based, always on). Call it inside a tokio
/// runtime. Errors name the variable.
pub fn init_from_env(default_service: &str) -> Result<TraceGuard, String> {
    init_with(default_service, |k| std::env::var(k).ok())
}

fn init_with(
    default_service: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<TraceGuard, String> {
    let set = |k: &str| {
        var(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let endpoint =
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let sampler = sampler(set("OTEL_TRACES_SAMPLER"), set("OTEL_TRACES_SAMPLER_ARG"))?;
    let (Some(endpoint), false) = (endpoint, disabled) else {
        return Ok(TraceGuard { provider: None });
    };
    let service = set("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned());
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("tracing: init must run inside a tokio runtime".to_owned());
    }
    let uri = if endpoint.contains("://") {
        endpoint.clone()
    } else {
        format!("http://{endpoint}")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(uri)
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(TraceGuard {
        provider: Some(provider),
    })
}

/// The sampler `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` name.
fn sampler(name: Option<String>, arg: Option<String>) -> Result<Sampler, String> {
    let ratio = match arg {
        None => 1.0,
        Some(a) => match a.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG: {a:?} is not a number between 0 and 1"
                ))
            }
        },
    };
    let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
    let name = name.unwrap_or_else(|| "parentbased_always_on".to_owned());
    Ok(match name.to_ascii_lowercase().as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_on" => parent(Sampler::AlwaysOn),
        "parentbased_always_off" => parent(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent(Sampler::TraceIdRatioBased(ratio)),
        other => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER: unknown sampler {other:?} (known: always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off, \
                 parentbased_traceidratio)"
            ))
        }
    })
}

/// Where a client sends its calls, for `server.address` / `server.port`.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    host: Arc<str>,
    port: Option<u16>,
}

impl Peer {
    pub(crate) fn from_uri(uri: &tonic::codegen::http::Uri) -> Option<Peer> {
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        Some(Peer {
            host: Arc::from(host),
            port: uri.port_u16(),
        })
    }
}

/// The CLIENT span of one call; empty when no tracer provider records it.
#[derive(Debug)]
pub(crate) struct ClientSpan(Option<Context>);

impl ClientSpan {
    /// Starts a span for `service/method`, child of the current OpenTelemetry context or,
    /// without one, of a `traceparent` already in the call's `metadata`.
    pub(crate) fn start(
        service: &'static str,
        method: &'static str,
        peer: Option<&Peer>,
        metadata: &MetadataMap,
    ) -> ClientSpan {
        let tracer = opentelemetry::global::tracer_provider().tracer(SCOPE);
        let current = Context::current();
        let parent = if current.has_active_span() || metadata.get("traceparent").is_none() {
            current
        } else {
            TraceContextPropagator::new().extract_with_context(
                &current,
                &infergate_proto::propagation::MetadataExtractor(metadata),
            )
        };
        let span = tracer
            .span_builder(format!("{service}/{method}"))
            .with_kind(SpanKind::Client)
            .start_with_context(&tracer, &parent);
        if !span.span_context().is_valid() {
            // The no-op provider: nothing records, nothing to propagate.
            return ClientSpan(None);
        }
        let cx = parent.with_span(span);
        let span = cx.span();
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service),
                KeyValue::new("rpc.method", method),
            ]);
            if let Some(peer) = peer {
                span.set_attribute(KeyValue::new("server.address", peer.host.clone()));
                if let Some(port) = peer.port {
                    span.set_attribute(KeyValue::new("server.port", i64::from(port)));
                }
            }
        }
        ClientSpan(Some(cx))
    }

    /// Sends this span as the call's `traceparent`/`tracestate`.
    pub(crate) fn inject(&self, metadata: &mut MetadataMap) {
        if let Some(cx) = &self.0 {
            TraceContextPropagator::new().inject_context(
                cx,
                &mut infergate_proto::propagation::MetadataInjector(metadata),
            );
        }
    }

    /// Ends the span with the call's outcome.
    pub(crate) fn end(mut self, code: tonic::Code, message: &str) {
        if let Some(cx) = self.0.take() {
            let span = cx.span();
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            if code != tonic::Code::Ok {
                span.set_status(SpanStatus::error(if message.is_empty() {
                    code.description().to_owned()
                } else {
                    format!("{}: {message}", code.description())
                }));
            }
            span.end();
        }
    }

    /// Ends the span with the outcome of a call that returned `result`.
    pub(crate) fn end_with<T>(self, result: &Result<T, tonic::Status>) {
        match result {
            Ok(_) => self.end(tonic::Code::Ok, ""),
            Err(s) => self.end(s.code(), s.message()),
        }
    }
}

impl Drop for ClientSpan {
    fn drop(&mut self) {
        if let Some(cx) = self.0.take() {
            cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_and_errors_name_the_variable() {
        assert!(sampler(None, None).is_ok());
        assert!(sampler(Some("traceidratio".into()), Some("0.5".into())).is_ok());
        let err = sampler(Some("often".into()), None)
            .err()
            .unwrap_or_default();
        assert!(err.contains("OTEL_TRACES_SAMPLER"), "{err}");
        let err = sampler(None, Some("1.5".into())).err().unwrap_or_default();
        assert!(err.contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
    }

    #[test]
    fn no_endpoint_means_no_exporter_and_no_metadata() {
        let guard = init_with("x", |_| None).expect("off is fine");
        assert!(!guard.is_active());
        let mut md = MetadataMap::new();
        let span = ClientSpan::start(KSERVE, "ModelInfer", None, &md);
        span.inject(&mut md);
        assert!(md.get("traceparent").is_none());
        span.end(tonic::Code::Ok, "");
    }
}
