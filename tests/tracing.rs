//! End-to-end tracing: one `ModelInfer` made with the client library shows as one trace,
//! exported over OTLP/gRPC to a receiver inside the test, with the client's span as the
//! root, the gateway's spans under it and the simulator's spans under those.
//!
//! The tracer provider is process-wide, so this file is its own test binary and every
//! test shares one exporter and one receiver. They live on a runtime of their own (each
//! `#[tokio::test]` has its runtime, which ends with the test) and each test finds its
//! own trace by the name of the simulator that served it, so the tests may run in
//! parallel without seeing each other's spans.

mod common;
mod otlp;

use std::sync::OnceLock;
use std::time::Duration;

use common::{config, gateway, sim, simple_request};
use infergate_base::trace::{self, SamplerKind, TraceConfig, TraceGuard};
use infergate_client::Client;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otlp::{Receiver, Span};

const INFER: &str = "inference.GRPCInferenceService/ModelInfer";

struct Shared {
    receiver: Receiver,
    guard: TraceGuard,
}

/// The receiver and the installed exporter, started once on a runtime that outlives
/// every test.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("receiver runtime");
                rt.block_on(async move {
                    let receiver = Receiver::start().await;
                    let guard = trace::init(TraceConfig {
                        endpoint: Some(receiver.endpoint()),
                        service_name: "infergate-test".into(),
                        sampler: SamplerKind::ParentbasedAlwaysOn,
                        ratio: 1.0,
                    })
                    .expect("tracing starts");
                    assert!(trace::enabled());
                    if tx.send(Shared { receiver, guard }).is_err() {
                        return;
                    }
                    std::future::pending::<()>().await;
                });
            })
            .expect("receiver thread");
        rx.recv().expect("receiver started")
    })
}

/// Flushes and polls (with a deadline) until `done` holds for the spans of the trace
/// that the simulator named `sim_name` served; returns that trace's spans.
async fn trace_served_by(sim_name: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let shared = shared();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        shared.guard.flush().await.expect("flush");
        let all = shared.receiver.spans();
        let trace_id = all
            .iter()
            .find(|s| s.scope == trace::SIM_SCOPE && s.attr("infergate.sim") == Some(sim_name))
            .map(|s| s.trace_id.clone());
        let spans: Vec<Span> = match trace_id {
            Some(id) => all.into_iter().filter(|s| s.trace_id == id).collect(),
            None => Vec::new(),
        };
        if !spans.is_empty() && done(&spans) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the spans of the call served by {sim_name}; have: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn one<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what} span, found {found:#?} in {spans:#?}"
    );
    found[0]
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.span_id == id)
}

/// True when `span`'s parent chain reaches `ancestor`.
fn descends_from(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut at = span;
    for _ in 0..spans.len() {
        if at.parent_span_id == ancestor.span_id {
            return true;
        }
        match by_id(spans, &at.parent_span_id) {
            Some(parent) => at = parent,
            None => return false,
        }
    }
    false
}

fn is_client_span(s: &Span) -> bool {
    s.scope == infergate_client::trace::SCOPE && s.kind == SpanKind::Client
}

fn is_sim_server(s: &Span) -> bool {
    s.scope == trace::SIM_SCOPE && s.kind == SpanKind::Server
}

/// The simulator's span and its `queue` and `execute` children, checked.
fn assert_sim_spans(spans: &[Span], sim_name: &str) -> Span {
    let server = one(spans, "simulator SERVER", is_sim_server).clone();
    assert_eq!(server.name, INFER);
    assert_eq!(server.attr("rpc.system"), Some("grpc"));
    assert_eq!(
        server.attr("rpc.service"),
        Some("inference.GRPCInferenceService")
    );
    assert_eq!(server.attr("rpc.method"), Some("ModelInfer"));
    assert_eq!(server.attr("rpc.grpc.status_code"), Some("0"));
    assert_eq!(server.attr("infergate.model"), Some("simple"));
    assert_eq!(server.attr("infergate.sim"), Some(sim_name));
    for name in ["queue", "execute"] {
        let child = one(spans, name, |s| {
            s.scope == trace::SIM_SCOPE && s.name == name
        });
        assert_eq!(child.kind, SpanKind::Internal);
        assert_eq!(
            child.parent_span_id, server.span_id,
            "{name} is under the server span"
        );
    }
    server
}

/// The client library calling a simulator directly: client span → simulator span →
/// queue, execute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_is_one_trace_from_client_to_simulator() {
    let _ = shared();
    let backend = sim("direct-sim", |_| {});
    let client = Client::connect(&backend.addr().to_string())
        .await
        .expect("client connects");
    client
        .infer(simple_request("direct", 1))
        .await
        .expect("inference answers");

    let spans = trace_served_by("direct-sim", |spans| {
        spans.iter().any(is_client_span)
            && spans.iter().filter(|s| s.scope == trace::SIM_SCOPE).count() >= 3
    })
    .await;

    let root = one(&spans, "client", is_client_span);
    assert_eq!(root.parent_span_id, "", "the client starts the trace");
    assert_eq!(root.name, INFER);
    assert_eq!(root.attr("rpc.system"), Some("grpc"));
    assert_eq!(root.attr("rpc.method"), Some("ModelInfer"));
    assert_eq!(root.attr("rpc.grpc.status_code"), Some("0"));
    assert_eq!(root.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(
        root.attr("server.port"),
        Some(backend.addr().port().to_string().as_str())
    );
    assert_eq!(root.service, "infergate-test");

    let server = assert_sim_spans(&spans, "direct-sim");
    assert_eq!(
        server.parent_span_id, root.span_id,
        "the simulator continues the client's span"
    );
    assert!(spans.iter().all(|s| s.trace_id == root.trace_id));
}

/// Client → gateway → simulator: the gateway's SERVER span is a child of the client's
/// span, its pick and attempt spans are its children, and the simulator's span descends
/// from the gateway's through the attempt (CLIENT) span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_call_is_one_trace_across_three_processes() {
    let _ = shared();
    let backends = [sim("gw-sim-a", |_| {}), sim("gw-sim-b", |_| {})];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let gw = gateway(config(&addrs)).await;
    let client = Client::connect(&gw.addr().to_string())
        .await
        .expect("client connects");
    let response = client
        .infer_full(simple_request("via-gateway", 1))
        .await
        .expect("inference answers through the gateway");
    let served_by = response
        .metadata()
        .get("sim-name")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("the simulator names itself");

    let gateway_server = |s: &Span| s.scope == trace::GATEWAY_SCOPE && s.kind == SpanKind::Server;
    let spans = trace_served_by(&served_by, |spans| {
        spans.iter().any(is_client_span)
            && spans.iter().any(gateway_server)
            && spans.iter().filter(|s| s.scope == trace::SIM_SCOPE).count() >= 3
    })
    .await;

    let root = one(&spans, "client", is_client_span);
    assert_eq!(root.parent_span_id, "", "the client starts the trace");
    assert_eq!(
        root.attr("server.port"),
        Some(gw.addr().port().to_string().as_str())
    );

    let gw_span = one(&spans, "gateway SERVER", gateway_server);
    assert_eq!(
        gw_span.parent_span_id, root.span_id,
        "the gateway continues the client's span"
    );
    assert_eq!(gw_span.name, INFER);
    assert_eq!(gw_span.attr("rpc.system"), Some("grpc"));
    assert_eq!(
        gw_span.attr("rpc.service"),
        Some("inference.GRPCInferenceService")
    );
    assert_eq!(gw_span.attr("rpc.method"), Some("ModelInfer"));
    assert_eq!(gw_span.attr("rpc.grpc.status_code"), Some("0"));
    assert_eq!(gw_span.attr("infergate.model"), Some("simple"));

    let pick = one(&spans, "pick", |s| {
        s.scope == trace::GATEWAY_SCOPE && s.name == "pick"
    });
    assert_eq!(pick.kind, SpanKind::Internal);
    assert!(
        descends_from(&spans, pick, gw_span),
        "pick is under the gateway span"
    );

    let attempt = one(&spans, "backend attempt", |s| {
        s.scope == trace::GATEWAY_SCOPE && s.kind == SpanKind::Client
    });
    assert!(
        descends_from(&spans, attempt, gw_span),
        "the attempt is under the gateway span"
    );
    assert_eq!(attempt.name, INFER);
    assert_eq!(attempt.attr("infergate.attempt"), Some("1"));
    assert_eq!(attempt.attr("rpc.grpc.status_code"), Some("0"));
    let backend = attempt
        .attr("infergate.backend")
        .expect("the attempt names its backend");
    let served = backends
        .iter()
        .find(|b| b.control().name() == served_by)
        .expect("one of ours answered");
    assert_eq!(backend, served.addr().to_string());
    assert_eq!(
        attempt.attr("server.port"),
        Some(served.addr().port().to_string().as_str())
    );

    let sim_server = assert_sim_spans(&spans, &served_by);
    assert_eq!(
        sim_server.parent_span_id, attempt.span_id,
        "the backend call carries the attempt's traceparent"
    );
    assert!(descends_from(&spans, &sim_server, gw_span));
    assert!(descends_from(&spans, &sim_server, root));
    assert!(spans.iter().all(|s| s.trace_id == root.trace_id));
    gw.shutdown(Duration::from_secs(1)).await;
}

/// A call whose first attempt fails on one backend and is retried on another: both
/// attempts are CLIENT spans under the one gateway span, numbered, each naming its
/// backend and its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_shows_both_attempts_in_one_trace() {
    let _ = shared();
    let bad = sim("retry-sim-bad", |c| c.error_rate = 1.0);
    let good = sim("retry-sim-good", |_| {});
    let mut cfg = config(&[bad.addr(), good.addr()]);
    // Round robin starts at the first backend: the first attempt goes to the bad one.
    cfg.balancer.policy = infergate::config::PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = Client::connect(&gw.addr().to_string())
        .await
        .expect("client connects");
    client
        .infer_full(simple_request("retried", 1))
        .await
        .expect("the retry on the good backend answers");

    let attempts = |spans: &[Span]| {
        spans
            .iter()
            .filter(|s| s.scope == trace::GATEWAY_SCOPE && s.kind == SpanKind::Client)
            .count()
    };
    let spans = trace_served_by("retry-sim-good", |spans| attempts(spans) >= 2).await;
    let gw_span = one(&spans, "gateway SERVER", |s| {
        s.scope == trace::GATEWAY_SCOPE && s.kind == SpanKind::Server
    });
    assert_eq!(gw_span.attr("rpc.grpc.status_code"), Some("0"));
    let first = one(&spans, "first attempt", |s| {
        s.kind == SpanKind::Client && s.attr("infergate.attempt") == Some("1")
    });
    let second = one(&spans, "second attempt", |s| {
        s.kind == SpanKind::Client && s.attr("infergate.attempt") == Some("2")
    });
    assert_eq!(
        first.attr("infergate.backend"),
        Some(bad.addr().to_string().as_str())
    );
    assert_eq!(
        first.attr("rpc.grpc.status_code"),
        Some("14"),
        "UNAVAILABLE"
    );
    assert_eq!(
        second.attr("infergate.backend"),
        Some(good.addr().to_string().as_str())
    );
    assert_eq!(second.attr("rpc.grpc.status_code"), Some("0"));
    for attempt in [first, second] {
        assert!(descends_from(&spans, attempt, gw_span));
    }
    let good_server = spans
        .iter()
        .find(|s| s.attr("infergate.sim") == Some("retry-sim-good") && s.kind == SpanKind::Server)
        .expect("the good backend's span");
    assert_eq!(good_server.parent_span_id, second.span_id);
    assert!(spans.iter().all(|s| s.trace_id == gw_span.trace_id));
    gw.shutdown(Duration::from_secs(1)).await;
}
