//! An OTLP/gRPC trace receiver for tests: a real tonic server for
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` on 127.0.0.1:0 that keeps
//! every span it is sent, flattened, for assertions.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_stream::wrappers::TcpListenerStream;

/// One received span, with ids as lowercase hex (an empty parent means a root span).
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: SpanKind,
    /// Instrumentation scope (the tracer's name).
    pub scope: String,
    /// The resource's `service.name`.
    pub service: String,
    /// Attributes as text (ints and bools printed).
    pub attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> Option<(String, String)> {
    let v = match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    };
    Some((kv.key.clone(), v))
}

#[derive(Debug, Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(text)
                .map(|(_, v)| v)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                let scope = ss
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                for s in ss.spans {
                    got.push(Span {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                        name: s.name,
                        scope: scope.clone(),
                        service: service.clone(),
                        attributes: s.attributes.iter().filter_map(text).collect(),
                        status_code: s.status.map_or(0, |st| st.code),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; it serves until its runtime ends.
#[derive(Debug, Clone)]
pub struct Receiver {
    addr: SocketAddr,
    collector: Collector,
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves on the current runtime.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("receiver binds");
        let addr = listener.local_addr().expect("receiver address");
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Receiver { addr, collector }
    }

    /// The OTLP endpoint to export to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
