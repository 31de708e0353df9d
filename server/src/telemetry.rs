//! Telemetry: the gateway's Prometheus metrics and the tiny HTTP endpoint that serves
//! them. Recording happens at the end of the request path (when a response body ends),
//! so every call is counted once, whatever way it ended.
//!
//! Label values come only from config and discovery (model names the pool knows, gRPC
//! code names); a model name sent by a client that the pool does not serve is counted
//! under `unknown`, so a client cannot blow up the series count.
//!
//! Every metric name the gateway records is described in [`describe`] (HELP text and
//! unit), run once when the recorder is installed; `docs/METRICS.md` lists them. State
//! that is not kept on the request path (per-backend in flight, load, ejection, circuit;
//! bulkhead occupancy) is read at scrape time from the pool and the model policies and
//! rendered as text ([`render_pool`], [`render_models`]) by the [`ScrapeHook`] given to
//! [`serve_with_hook`], so backends that leave the pool leave no stale series.

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    describe_histogram!(
        "infergate_request_bytes",
        Unit::Bytes,
        "Size of forwarded unary request messages on the wire (gRPC frame included), by method."
    );
    describe_histogram!(
        "infergate_response_bytes",
        Unit::Bytes,
        "Size of forwarded unary responses passed back to callers (gRPC frames, headers excluded)."
    );
    describe_histogram!(
        "infergate_stream_first_response_seconds",
        Unit::Seconds,
        "Time from a ModelStreamInfer stream's start to its first response from the backend (time to first token), by model and backend."
    );
    describe_histogram!(
        "infergate_stream_inter_response_seconds",
        Unit::Seconds,
        "ModelStreamInfer: time between consecutive responses of a stream (inter-token latency of a decoupled model), by model and backend."
    );
    describe_counter!(
        "infergate_stream_responses_total",
        Unit::Count,
        "ModelStreamInfer: responses passed back from backends, by model and backend (rate() is responses per second)."
    );
    describe_gauge!(
        "infergate_streams_in_flight",
        "ModelStreamInfer streams pinned to a backend and open, by model and backend."
    );
    describe_counter!(
        "infergate_backend_attempts_total",
        Unit::Count,
        "Attempts sent to a backend, by backend and the gRPC code it ended with \
         (TRANSPORT_ERROR: never reached, reset, or per-try timeout)."
    );
    describe_counter!(
        "infergate_backend_readmissions_total",
        Unit::Count,
        "Backends readmitted after an outlier (or manual) ejection, by backend."
    );
    describe_counter!(
        "infergate_hedge_wins_total",
        Unit::Count,
        "Hedged calls whose hedge answered first, by model."
    );
    describe_counter!(
        "infergate_hedge_budget_exhausted_total",
        Unit::Count,
        "Hedges not sent because the retry budget was spent, by model."
    );
    describe_gauge!(
        "infergate_requests_in_flight",
        Unit::Count,
        "Forwarded calls started and not yet ended, by method."
    );

    // Backends: their state is rendered at scrape time by `gauges::render_pool` (with
    // its own HELP lines); the counters below are recorded as events happen.
    describe_counter!(
        "infergate_client_connections_refused_total",
        Unit::Count,
        "Client connections closed at once because max_client_connections were open."
    );
    describe_counter!(
        "infergate_client_connections_closed_total",
        Unit::Count,
        "Client connections the gateway closed, by reason (handshake timeout, idle)."
    );
    describe_counter!(
        "infergate_admin_auth_failures_total",
        Unit::Count,
        "Admin calls refused for a missing or wrong token, by reason (no_token, wrong_token)."
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

    // Admission (path.rs); bulkhead state is rendered by `render_models`.
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
        "Calls refused by a rate limit, by model and the bucket that ran dry (tenant, model; \
         tenant_tokens: a stream refused or ended by its tenant's tokens_per_second)."
    );
    // Response cache (cache.rs).
    describe_counter!(
        "infergate_cache_hits_total",
        Unit::Count,
        "ModelInfer calls answered from the response cache, by model and level (l1: this process, l2: Redis)."
    );
    describe_counter!(
        "infergate_cache_misses_total",
        Unit::Count,
        "Response cache lookups that found nothing, by model and level (l1, l2)."
    );
    describe_counter!(
        "infergate_cache_evictions_total",
        Unit::Count,
        "Entries removed from the in-process cache, by model, level and reason (size: to stay within max_entries/max_bytes; expired: ttl_ms passed)."
    );
    describe_gauge!(
        "infergate_cache_bytes",
        Unit::Bytes,
        "Bytes of answers held by the in-process response cache, by model and level."
    );
    describe_counter!(
        "infergate_cache_coalesced_total",
        Unit::Count,
        "ModelInfer calls answered by an identical call in flight (no backend call of their own), by model and level."
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
    describe_counter!(
        "infergate_sequences_lost_total",
        Unit::Count,
        "Stateful sequences refused because the backend they were pinned to lost them, by model and backend."
    );
    describe_counter!(
        "infergate_sequences_unpinned_total",
        Unit::Count,
        "Stateful sequences routed by the rendezvous hash alone because the pin table was full, by model."
    );
}

/// A call has started (in-flight gauge).
pub fn call_started(method: &'static str) {
    match handles() {
        Some(h) => h.in_flight(method).increment(1.0),
        None => metrics::gauge!("infergate_requests_in_flight", "method" => method).increment(1.0),
    }
}

/// A call has ended; `code` None means the caller went away first.
pub fn call_ended(method: &'static str, model: &str, code: Option<Code>, elapsed: Duration) {
    let code = code.unwrap_or(Code::Cancelled);
    let Some(h) = handles() else {
        let name = infergate_base::codes::name(code);
        metrics::gauge!("infergate_requests_in_flight", "method" => method).decrement(1.0);
        metrics::counter!("infergate_requests_total", "model" => model.to_owned(), "method" => method, "code" => name)
            .increment(1);
        metrics::histogram!("infergate_request_duration_seconds", "model" => model.to_owned(), "method" => method)
            .record(elapsed.as_secs_f64());
        return;
    };
    h.in_flight(method).decrement(1.0);
    let call = h.call(method, model);
    call.total(code).increment(1);
    call.duration.record(elapsed.as_secs_f64());
}

/// The size of a request message, by method.
pub fn request_bytes(method: &'static str, bytes: usize) {
    match handles() {
        Some(h) => h.request_bytes(method).record(bytes as f64),
        None => {
            metrics::histogram!("infergate_request_bytes", "method" => method).record(bytes as f64)
        }
    }
}

/// The size of a forwarded response, as it streamed to the caller.
pub fn response_bytes(bytes: u64) {
    match handles() {
        Some(h) => h.response_bytes.record(bytes as f64),
        None => metrics::histogram!("infergate_response_bytes").record(bytes as f64),
    }
}

/// How long a call of `model` waited for its bulkhead slot (admitted or not).
pub fn bulkhead_waited(model: &str, waited: Duration) {
    let secs = waited.as_secs_f64();
    let Some(h) = handles() else {
        metrics::histogram!("infergate_bulkhead_queue_wait_seconds", "model" => model.to_owned())
            .record(secs);
        return;
    };
    if let Some(histogram) = h.queue_wait.get(model) {
        return histogram.record(secs);
    }
    h.queue_wait
        .entry(model.to_owned())
        .or_insert_with(|| {
            metrics::histogram!("infergate_bulkhead_queue_wait_seconds", "model" => model.to_owned())
        })
        .record(secs);
}

/// Metric handles of the per-call series, resolved once and then reused: a `metrics`
/// macro builds its key (label strings included) and looks it up in the registry on
/// every use, which on the request path cost more than the counting itself. Only kept
/// once this module's recorder is installed, so a handle is never a no-op left over from
/// before. The series stay bounded as the labels do (models the pool knows, or `unknown`).
struct Handles {
    by_method: dashmap::DashMap<&'static str, MethodHandles>,
    calls: dashmap::DashMap<String, Vec<(&'static str, Arc<CallHandles>)>>,
    queue_wait: dashmap::DashMap<String, metrics::Histogram>,
    response_bytes: metrics::Histogram,
}

#[derive(Clone)]
struct MethodHandles {
    in_flight: metrics::Gauge,
    request_bytes: metrics::Histogram,
}

/// One (model, method) pair's handles; a code's counter is made on its first use.
struct CallHandles {
    model: String,
    method: &'static str,
    duration: metrics::Histogram,
    totals: [OnceLock<metrics::Counter>; 17],
}

impl CallHandles {
    fn total(&self, code: Code) -> &metrics::Counter {
        let i = (code as usize).min(self.totals.len() - 1);
        self.totals[i].get_or_init(|| {
            metrics::counter!(
                "infergate_requests_total",
                "model" => self.model.clone(),
                "method" => self.method,
                "code" => infergate_base::codes::name(code)
            )
        })
    }
}

fn handles() -> Option<&'static Handles> {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLE.get()?.as_ref()?;
    Some(HANDLES.get_or_init(|| Handles {
        by_method: dashmap::DashMap::new(),
        calls: dashmap::DashMap::new(),
        queue_wait: dashmap::DashMap::new(),
        response_bytes: metrics::histogram!("infergate_response_bytes"),
    }))
}

impl Handles {
    fn method(&self, method: &'static str) -> MethodHandles {
        if let Some(h) = self.by_method.get(method) {
            return h.clone();
        }
        self.by_method
            .entry(method)
            .or_insert_with(|| MethodHandles {
                in_flight: metrics::gauge!("infergate_requests_in_flight", "method" => method),
                request_bytes: metrics::histogram!("infergate_request_bytes", "method" => method),
            })
            .clone()
    }

    fn in_flight(&self, method: &'static str) -> metrics::Gauge {
        self.method(method).in_flight
    }

    fn request_bytes(&self, method: &'static str) -> metrics::Histogram {
        self.method(method).request_bytes
    }

    fn call(&self, method: &'static str, model: &str) -> Arc<CallHandles> {
        let found = |list: &Vec<(&'static str, Arc<CallHandles>)>| {
            list.iter()
                .find(|(m, _)| *m == method)
                .map(|(_, h)| Arc::clone(h))
        };
        if let Some(h) = self.calls.get(model).and_then(|list| found(&list)) {
            return h;
        }
        let mut list = self.calls.entry(model.to_owned()).or_default();
        if let Some(h) = found(&list) {
            return h;
        }
        let h = Arc::new(CallHandles {
            model: model.to_owned(),
            method,
            duration: metrics::histogram!(
                "infergate_request_duration_seconds",
                "model" => model.to_owned(),
                "method" => method
            ),
            totals: Default::default(),
        });
        list.push((method, Arc::clone(&h)));
        h
    }
}

/// Work run on every scrape: it appends Prometheus text (whole metric families, with
/// HELP and TYPE lines) to what the recorder renders. Families rendered by a hook must
/// not share a name with a metric recorded through the `metrics` macros.
pub type ScrapeHook = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Serves `GET /metrics` in Prometheus text format on `listener` until `shutdown`;
/// `hook` (if any) appends scrape-time families to each answer.
pub async fn serve_with_hook(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
    hook: Option<ScrapeHook>,
) {
    // The recorder keeps every histogram sample until an upkeep folds it into the
    // buckets; a scrape runs one, but a gateway nobody scrapes must too, or its memory
    // grows with every call (the 30-minute soak caught 1.6 MB a minute at 300 calls/s).
    let upkeep = handle.clone();
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = every.tick() => upkeep.run_upkeep(),
                _ = stop.changed() => return,
            }
        }
    });
    let handler: infergate_base::http1::Handler = Arc::new(move |method, path, _query| {
        if path != "/metrics" {
            return infergate_base::http1::Reply::text(404, "only /metrics is served here\n");
        }
        if method != "GET" && method != "HEAD" {
            return infergate_base::http1::Reply::text(405, "GET /metrics\n");
        }
        // The hook runs first: gauges it sets through the recorder show in this
        // render; the text it writes goes after.
        let mut extra = String::new();
        if let Some(hook) = &hook {
            hook(&mut extra);
        }
        handle.run_upkeep();
        let mut body = handle.render();
        body.push_str(&extra);
        infergate_base::http1::Reply::prometheus(body)
    });
    infergate_base::http1::serve(listener, handler, shutdown).await;
}

/// Binds the metrics listener (kept separate so callers learn the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
