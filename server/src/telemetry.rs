//! Telemetry: the gateway's Prometheus metrics and the tiny HTTP endpoint that serves
//! them. Recording happens at the end of the request path (when a response body ends),
//! so every call is counted once, whatever way it ended.
//!
//! Label values come only from config and discovery (model names the pool knows, gRPC
//! code names); a model name sent by a client that the pool does not serve is counted
//! under `unknown`, so a client cannot blow up the series count.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle. None if
/// another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                60.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// The canonical name of a gRPC code, as used in the `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A call has started (in-flight gauge).
pub fn call_started(method: &'static str) {
    metrics::gauge!("infergate_requests_in_flight", "method" => method).increment(1.0);
}

/// A call has ended; `code` None means the caller went away first.
pub fn call_ended(method: &'static str, model: &str, code: Option<Code>, elapsed: Duration) {
    let code = code.map(code_name).unwrap_or("CANCELLED");
    metrics::gauge!("infergate_requests_in_flight", "method" => method).decrement(1.0);
    metrics::counter!(
        "infergate_requests_total",
        "model" => model.to_owned(),
        "method" => method,
        "code" => code
    )
    .increment(1);
    metrics::histogram!(
        "infergate_request_duration_seconds",
        "model" => model.to_owned(),
        "method" => method
    )
    .record(elapsed.as_secs_f64());
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut head)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&head[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                handle.run_upkeep();
                ("200 OK", handle.render())
            } else {
                ("404 Not Found", "only /metrics is served here\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Binds the metrics listener (kept separate so callers learn the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
