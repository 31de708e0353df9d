//! The gauges rendered at scrape time from the live state, beside the request path:
//! one family per backend state (ready, in flight, ejected, draining, circuit, ...) and
//! per bulkhead. Rendering from the pool and the models as they are at that moment means
//! a removed backend or model leaves no stale series. The metrics server
//! (`telemetry::serve_with_hook`) calls [`gateway_scrape_hook`] on every scrape.

use crate::breaker::BreakerState;
use crate::endpoint::Health;
use crate::models::Models;
use crate::path::Gateway;
use crate::pool::Pool;
use crate::sequence::Sequences;
use crate::telemetry::ScrapeHook;
use std::sync::Arc;

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

/// A metric family assembled at scrape time.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, value));
    }

    /// Appends the family in text format 0.0.4; nothing when it has no samples.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        if self.samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, value) in &self.samples {
            out.push_str(self.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (key, value)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(key);
                    out.push_str("=\"");
                    for c in value.chars() {
                        match c {
                            '\\' => out.push_str("\\\\"),
                            '"' => out.push_str("\\\""),
                            '\n' => out.push_str("\\n"),
                            c => out.push(c),
                        }
                    }
                    out.push('"');
                }
                out.push('}');
            }
            let _ = if value.is_nan() {
                writeln!(out, " NaN")
            } else if value.is_infinite() {
                writeln!(out, " {}Inf", if *value > 0.0 { "+" } else { "-" })
            } else {
                writeln!(out, " {value}")
            };
        }
        out.push('\n');
    }
}

/// Appends the per-backend state of `pool` as it is now: in flight, load report
/// (utilization, queue depth, age), ejected, draining, weight, circuit states and the
/// attempt counters the endpoints keep. Rendered as text rather than recorded, so a
/// backend removed from the pool leaves no stale series behind (readiness included).
/// Also sets `infergate_pool_panic` (a recorded gauge, normally set on transitions) so
/// it exists even for transitions that happened before the recorder was installed.
pub fn render_pool(pool: &Pool, out: &mut String) {
    let now = tokio::time::Instant::now();
    let mut in_flight = Family::new(
        "infergate_backend_in_flight",
        "gauge",
        "Attempts the gateway has sent to the backend and that have not ended.",
    );
    let mut utilization = Family::new(
        "infergate_backend_utilization",
        "gauge",
        "The backend's last reported utilization, as a ratio (0..1, may exceed 1); absent until the first report.",
    );
    let mut queue_depth = Family::new(
        "infergate_backend_queue_depth",
        "gauge",
        "Requests waiting at the backend according to its last load report.",
    );
    let mut report_age = Family::new(
        "infergate_backend_load_report_age_seconds",
        "gauge",
        "Age of the backend's last load report, in seconds.",
    );
    let mut ready = Family::new(
        "infergate_backend_ready",
        "gauge",
        "1 when the backend's health checks say it is ready, else 0 (unknown or not ready).",
    );
    let mut ejected = Family::new(
        "infergate_backend_ejected",
        "gauge",
        "1 while outlier detection (or an operator) has ejected the backend, else 0.",
    );
    let mut draining = Family::new(
        "infergate_backend_draining",
        "gauge",
        "1 while the backend is draining (administrative; takes no new calls), else 0.",
    );
    let mut weight = Family::new(
        "infergate_backend_weight",
        "gauge",
        "The backend's balancing weight.",
    );
    let mut circuit = Family::new(
        "infergate_backend_circuit_state",
        "gauge",
        "State of the backend-wide circuit breaker: 0 closed, 1 half open, 2 open, 3 forced open.",
    );
    let mut model_circuit = Family::new(
        "infergate_backend_model_circuit_state",
        "gauge",
        "State of a per-model circuit breaker of the backend (values as infergate_backend_circuit_state); only breakers that exist.",
    );
    let mut requests = Family::new(
        "infergate_backend_requests_total",
        "counter",
        "Attempts sent to the backend since it joined the pool (retries and hedges included).",
    );
    let mut failures = Family::new(
        "infergate_backend_failures_total",
        "counter",
        "Attempts on the backend that ended in an error.",
    );
    for endpoint in pool.endpoints() {
        let backend = endpoint.address().to_owned();
        let b = || vec![("backend", backend.clone())];
        ready.add(b(), flag(endpoint.health() == Health::Ready));
        in_flight.add(b(), endpoint.in_flight() as f64);
        if let Some(reading) = endpoint.load().read(now) {
            utilization.add(b(), reading.utilization);
            queue_depth.add(b(), reading.queue_depth);
            report_age.add(b(), reading.age.as_secs_f64());
        }
        ejected.add(b(), flag(endpoint.is_ejected(now)));
        draining.add(b(), flag(endpoint.is_draining()));
        weight.add(b(), f64::from(endpoint.weight()));
        circuit.add(b(), circuit_state_value(endpoint.breaker().state()));
        for (model, breaker) in endpoint.all_breakers() {
            if !model.is_empty() {
                model_circuit.add(
                    vec![("backend", backend.clone()), ("model", model)],
                    circuit_state_value(breaker.state()),
                );
            }
        }
        requests.add(b(), endpoint.requests_total() as f64);
        failures.add(b(), endpoint.failures_total() as f64);
    }
    metrics::gauge!("infergate_pool_panic").set(flag(pool.in_panic()));
    // Per model: backends that could take its call now (the test the pick makes).
    let mut ready_backends = Family::new(
        "infergate_model_ready_backends",
        "gauge",
        "Backends that can take a call for the model now: ready, not ejected or draining, circuits closed, the model ready there.",
    );
    let panic = pool.in_panic();
    for route in pool.models() {
        let usable = route
            .endpoints
            .iter()
            .filter(|e| e.availability(&route.model, now, panic).is_ok())
            .count();
        ready_backends.add(vec![("model", route.model.clone())], usable as f64);
    }
    ready_backends.render(out);
    for family in [
        ready,
        in_flight,
        utilization,
        queue_depth,
        report_age,
        ejected,
        draining,
        weight,
        circuit,
        model_circuit,
        requests,
        failures,
    ] {
        family.render(out);
    }
}

/// Appends the bulkhead state of every model with live settings and a bulkhead: slots
/// held, calls queued, the limits, and calls admitted and cancelled. Model names come
/// from the pool's routes, so the label stays bounded.
pub fn render_models(models: &Models, out: &mut String) {
    let mut active = Family::new(
        "infergate_bulkhead_active",
        "gauge",
        "Bulkhead slots held now.",
    );
    let mut queued = Family::new(
        "infergate_bulkhead_queued",
        "gauge",
        "Calls waiting for a bulkhead slot now.",
    );
    let mut max_concurrent = Family::new(
        "infergate_bulkhead_max_concurrent",
        "gauge",
        "The bulkhead's configured max_concurrent.",
    );
    let mut max_queue = Family::new(
        "infergate_bulkhead_max_queue",
        "gauge",
        "The bulkhead's configured max_queue.",
    );
    let mut admitted = Family::new(
        "infergate_bulkhead_admitted_total",
        "counter",
        "Calls given a bulkhead slot, at once or after waiting.",
    );
    let mut cancelled = Family::new(
        "infergate_bulkhead_cancelled_total",
        "counter",
        "Calls that went away while waiting for a bulkhead slot.",
    );
    for policy in models.all() {
        let Some(bulkhead) = &policy.bulkhead else {
            continue;
        };
        let stats = bulkhead.stats();
        let cfg = bulkhead.config();
        let m = || vec![("model", policy.name.clone())];
        active.add(m(), stats.active as f64);
        queued.add(m(), stats.queued as f64);
        max_concurrent.add(m(), cfg.max_concurrent as f64);
        max_queue.add(m(), cfg.max_queue as f64);
        admitted.add(m(), stats.admitted_total as f64);
        cancelled.add(m(), stats.cancelled_total as f64);
    }
    for family in [
        active,
        queued,
        max_concurrent,
        max_queue,
        admitted,
        cancelled,
    ] {
        family.render(out);
    }
}

/// `infergate_sequences_pinned`: the sequences pinned now, per model and backend.
pub fn render_sequences(sequences: &Sequences, out: &mut String) {
    let mut pinned = Family::new(
        "infergate_sequences_pinned",
        "gauge",
        "Stateful sequences pinned to a backend now (lost ones included until they end).",
    );
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for pin in sequences.active(tokio::time::Instant::now()) {
        *counts.entry((pin.model, pin.backend)).or_default() += 1;
    }
    for ((model, backend), n) in counts {
        pinned.add(vec![("model", model), ("backend", backend)], n as f64);
    }
    pinned.render(out);
}

/// The scrape hook of a gateway: [`render_pool`], [`render_models`] and
/// [`render_sequences`].
pub fn gateway_scrape_hook(gateway: &Arc<Gateway>) -> ScrapeHook {
    let gateway = Arc::clone(gateway);
    Arc::new(move |out: &mut String| {
        render_pool(&gateway.pool, out);
        render_models(&gateway.models, out);
        render_sequences(&gateway.sequences, out);
    })
}
