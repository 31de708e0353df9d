//! Telemetry: the gateway's Prometheus metrics and the tiny HTTP endpoint that serves
//! them. Recording happens at the end of the request path (when a response body ends),
//! so every call is counted once, whatever way it ended.
//!
//! Label values come only from config and discovery (model names the pool knows, gRPC
//! code names); a model name sent by a client that the pool does not serve is counted
//! under `unknown`, so a client cannot blow up the series count.
//!
//! Every metric name the gateway records is described in [`describe`] (HELP text and
//! unit), run once when the recorder is installed; `docs/METRICS.md` lists them. Some
//! gauges are not kept up to date on the request path but computed at scrape time from
//! the pool and the model policies ([`export_pool_gauges`], [`export_model_gauges`]),
//! run by the [`ScrapeHook`] given to [`serve_with_hook`].

use crate::breaker::BreakerState;
use crate::endpoint::Health;
use crate::models::Models;
use crate::pool::Pool;
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
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
            // 64 B to 64 MiB, for the `_bytes` histograms (message sizes).
            let size_buckets = [
                64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                16777216.0, 67108864.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &size_buckets)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            metrics::gauge!("infergate_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            Some(handle)
        })
        .clone()
}

/// Gives every metric the gateway records its HELP text and unit. Run by [`install`];
/// calling it again does nothing (the first description of a name wins). A metric that
/// has not been recorded yet is not rendered, description or not.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};

    describe_gauge!(
        "infergate_build_info",
        "Always 1; the version label is the gateway's version."
    );

    // Requests (telemetry.rs, recorded by path.rs).
    describe_counter!(
        "infergate_requests_total",
        Unit::Count,
        "Forwarded calls that ended, by model (`unknown` for a model the pool does not serve \
         or a call that failed before routing), method and final gRPC code (CANCELLED when \
         the caller went away)."
    );
    describe_histogram!(
        "infergate_request_duration_seconds",
        Unit::Seconds,
        "Time from a forwarded call's arrival to the end of its response (streams: the \
         stream's whole life), by model and method."
    );
    describe_gauge!(
        "infergate_requests_in_flight",
        Unit::Count,
        "Forwarded calls started and not yet ended, by method."
    );

    // Backends, kept on transitions (health.rs, pool.rs) and at scrape time (below).
    describe_gauge!(
        "infergate_backend_ready",
        "1 when the backend's health checks say it is ready, else 0 (unknown or not ready)."
    );
    describe_gauge!(
        "infergate_backend_in_flight",
        Unit::Count,
        "Attempts the gateway has sent to the backend and that have not ended (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_utilization",
        Unit::Percent,
        "The backend's last reported utilization, as a ratio (0..1, may exceed 1); absent \
         until the first report (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_queue_depth",
        Unit::Count,
        "Requests waiting at the backend according to its last load report (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_load_report_age_seconds",
        Unit::Seconds,
        "Age of the backend's last load report (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_ejected",
        "1 while outlier detection (or an operator) has ejected the backend, else 0 \
         (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_draining",
        "1 while the backend is draining (administrative; takes no new calls), else 0 \
         (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_weight",
        "The backend's balancing weight (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_circuit_state",
        "State of the backend-wide circuit breaker: 0 closed, 1 half open, 2 open, 3 forced \
         open by an operator (scrape time)."
    );
    describe_gauge!(
        "infergate_backend_model_circuit_state",
        "State of the per-model circuit breaker of a backend, same values as \
         infergate_backend_circuit_state; only breakers that exist (scrape time)."
    );
    describe_counter!(
        "infergate_backend_requests_total",
        Unit::Count,
        "Attempts sent to the backend since it joined the pool (retries and hedges \
         included; scrape time)."
    );
    describe_counter!(
        "infergate_backend_failures_total",
        Unit::Count,
        "Attempts on the backend that ended in an error (scrape time)."
    );
    describe_counter!(
        "infergate_backend_ejections_total",
        Unit::Count,
        "Ejections of a backend, by reason (consecutive_failures, success_rate, \
         failure_percentage, latency, manual)."
    );
    describe_counter!(
        "infergate_circuit_transitions_total",
        Unit::Count,
        "Circuit breaker transitions on a backend (backend-wide and per-model breakers), by \
         the state entered."
    );
    describe_gauge!(
        "infergate_pool_panic",
        "1 while the pool is in panic mode (too few healthy backends; routes to all), else 0."
    );
    describe_counter!(
        "infergate_events_total",
        Unit::Count,
        "Events published on the admin event bus, by kind."
    );

    // Admission (path.rs) and bulkhead state (scrape time).
    describe_gauge!(
        "infergate_bulkhead_active",
        Unit::Count,
        "Bulkhead slots held now, by model (models with a bulkhead; scrape time)."
    );
    describe_gauge!(
        "infergate_bulkhead_queued",
        Unit::Count,
        "Calls waiting for a bulkhead slot now, by model (scrape time)."
    );
    describe_gauge!(
        "infergate_bulkhead_max_concurrent",
        Unit::Count,
        "The bulkhead's configured max_concurrent, by model (scrape time)."
    );
    describe_gauge!(
        "infergate_bulkhead_max_queue",
        Unit::Count,
        "The bulkhead's configured max_queue, by model (scrape time)."
    );
    describe_counter!(
        "infergate_bulkhead_admitted_total",
        Unit::Count,
        "Calls given a bulkhead slot, at once or after waiting, by model (scrape time)."
    );
    describe_counter!(
        "infergate_bulkhead_cancelled_total",
        Unit::Count,
        "Calls that went away while waiting for a bulkhead slot, by model (scrape time)."
    );
    describe_counter!(
        "infergate_bulkhead_rejected_total",
        Unit::Count,
        "Calls refused by a bulkhead, by model and reason (queue_full, tenant_queue_full, \
         queue_timeout, deadline_too_close)."
    );
    describe_histogram!(
        "infergate_bulkhead_queue_wait_seconds",
        Unit::Seconds,
        "Time a call spent getting (or failing to get) a bulkhead slot, by model."
    );
    describe_counter!(
        "infergate_rate_limited_total",
        Unit::Count,
        "Calls refused by a rate limit, by model and the bucket that ran dry (tenant, model)."
    );
    describe_counter!(
        "infergate_retries_total",
        Unit::Count,
        "Retry attempts made (after the first attempt), by the model called."
    );
    describe_counter!(
        "infergate_hedges_total",
        Unit::Count,
        "Hedged attempts sent, by model."
    );
    describe_counter!(
        "infergate_retry_budget_exhausted_total",
        Unit::Count,
        "Retries not made because the model's retry budget was spent, by model."
    );
    describe_counter!(
        "infergate_fallbacks_total",
        Unit::Count,
        "Calls sent to a fallback model, by the model called and the fallback used."
    );
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

/// Work run on every scrape before rendering, e.g. setting gauges computed from the pool.
pub type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// The gauge value of a circuit breaker state.
pub fn circuit_state_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
        BreakerState::ForcedOpen => 3.0,
    }
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// Sets the per-backend gauges (and the counters the endpoints keep themselves) from
/// the pool as it is now. Backends never leave the pool, so no series goes stale.
pub fn export_pool_gauges(pool: &Pool) {
    let now = tokio::time::Instant::now();
    for endpoint in pool.endpoints() {
        let backend = endpoint.address().to_owned();
        let label = || ("backend", backend.clone());
        let gauge = |name: &'static str, value: f64| {
            metrics::gauge!(name, &[label()]).set(value);
        };
        gauge("infergate_backend_in_flight", endpoint.in_flight() as f64);
        gauge(
            "infergate_backend_ready",
            flag(endpoint.health() == Health::Ready),
        );
        gauge("infergate_backend_ejected", flag(endpoint.is_ejected(now)));
        gauge("infergate_backend_draining", flag(endpoint.is_draining()));
        gauge("infergate_backend_weight", f64::from(endpoint.weight()));
        gauge(
            "infergate_backend_circuit_state",
            circuit_state_value(endpoint.breaker().state()),
        );
        if let Some(reading) = endpoint.load().read(now) {
            gauge("infergate_backend_utilization", reading.utilization);
            gauge("infergate_backend_queue_depth", reading.queue_depth);
            gauge(
                "infergate_backend_load_report_age_seconds",
                reading.age.as_secs_f64(),
            );
        }
        metrics::counter!("infergate_backend_requests_total", &[label()])
            .absolute(endpoint.requests_total());
        metrics::counter!("infergate_backend_failures_total", &[label()])
            .absolute(endpoint.failures_total());
        for (model, breaker) in endpoint.all_breakers() {
            if model.is_empty() {
                continue; // the backend-wide breaker, exported above
            }
            metrics::gauge!(
                "infergate_backend_model_circuit_state",
                "backend" => backend.clone(),
                "model" => model
            )
            .set(circuit_state_value(breaker.state()));
        }
    }
    metrics::gauge!("infergate_pool_panic").set(flag(pool.in_panic()));
}

/// Sets the per-model bulkhead gauges (and its admitted/cancelled counters) for every
/// model with live settings and a bulkhead. Model names come from the pool's routes, so
/// the label stays bounded.
pub fn export_model_gauges(models: &Models) {
    for policy in models.all() {
        let Some(bulkhead) = &policy.bulkhead else {
            continue;
        };
        let stats = bulkhead.stats();
        let cfg = bulkhead.config();
        let label = || ("model", policy.name.clone());
        metrics::gauge!("infergate_bulkhead_active", &[label()]).set(stats.active as f64);
        metrics::gauge!("infergate_bulkhead_queued", &[label()]).set(stats.queued as f64);
        metrics::gauge!("infergate_bulkhead_max_concurrent", &[label()])
            .set(cfg.max_concurrent as f64);
        metrics::gauge!("infergate_bulkhead_max_queue", &[label()]).set(cfg.max_queue as f64);
        metrics::counter!("infergate_bulkhead_admitted_total", &[label()])
            .absolute(stats.admitted_total);
        metrics::counter!("infergate_bulkhead_cancelled_total", &[label()])
            .absolute(stats.cancelled_total);
    }
}

/// The scrape hook of a gateway: pool gauges and model (bulkhead) gauges.
pub fn gateway_scrape_hook(gateway: &Arc<crate::path::Gateway>) -> ScrapeHook {
    let gateway = Arc::clone(gateway);
    Arc::new(move || {
        export_pool_gauges(&gateway.pool);
        export_model_gauges(&gateway.models);
    })
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until `shutdown`.
/// Same as [`serve_with_hook`] with no hook.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
) {
    serve_with_hook(listener, handle, shutdown, None).await
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until `shutdown`,
/// running `hook` (if any) before each render.
pub async fn serve_with_hook(
    listener: TcpListener,
    handle: PrometheusHandle,
    mut shutdown: watch::Receiver<bool>,
    hook: Option<ScrapeHook>,
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
        let hook = hook.clone();
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
                if let Some(hook) = &hook {
                    hook();
                }
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
