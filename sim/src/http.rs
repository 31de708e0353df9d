//! The simulator's small HTTP/1.1 side door: `GET /metrics` (Prometheus text, Triton's
//! metric names) and `GET /control?...` (the same fault knobs as [`SimControl`]).
//!
//! Served with hyper (through [`infergate_base::http1`]), so scripts, curl, the demo and the
//! gateway's Prometheus fallback drive and scrape it with any HTTP/1.1 client.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::net::TcpListener;

use infergate_base::http1::{self, Reply};

use super::control::{clamp_fraction, FailReason, SimControl};
use super::models::{Model, VERSION};

/// What `exit=1` does: end the process (CLI) or stop this simulator (spawned).
pub(crate) type ExitHook = Arc<dyn Fn() + Send + Sync>;

/// Serves the HTTP side door until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, ctl: Arc<SimControl>, exit: ExitHook) {
    let handler: http1::Handler =
        Arc::new(move |method, path, query| answer(&ctl, &exit, method, path, query));
    // Never told to stop: the task is dropped with the simulator.
    let (_keep, forever) = tokio::sync::watch::channel(false);
    http1::serve(listener, handler, forever).await;
}

fn answer(ctl: &SimControl, exit: &ExitHook, method: &str, path: &str, query: &str) -> Reply {
    if method != "GET" {
        return Reply::text(405, "only GET is supported\n");
    }
    match path {
        "/metrics" => Reply::prometheus(render_metrics(ctl)),
        "/control" => match apply_control(ctl, query) {
            Ok(exit_requested) => {
                let reply = Reply::text(200, control_state(ctl)).with_type("application/json");
                if exit_requested {
                    let exit = Arc::clone(exit);
                    reply.then(Box::new(move || exit()))
                } else {
                    reply
                }
            }
            Err(msg) => Reply::text(400, format!("{msg}\n")),
        },
        _ => Reply::text(404, "not found: try /metrics or /control\n"),
    }
}

/// Decodes `%XX` escapes and `+` (a space in a query) in a query component.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("{key}: expected 1/0 or true/false, got '{v}'")),
    }
}

fn parse_fraction(key: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(clamp_fraction(f)),
        _ => Err(format!(
            "{key}: expected a number between 0 and 1, got '{v}'"
        )),
    }
}

/// Applies a `/control` query. Every parameter is validated before any is applied.
/// Returns whether `exit=1` was asked for.
pub(crate) fn apply_control(ctl: &SimControl, query: &str) -> Result<bool, String> {
    enum Action {
        ErrorRate(f64),
        ErrorCode(tonic::Code),
        Hang(bool),
        Refuse(bool),
        Ready(bool),
        ExtraLatency(u64),
        HiddenLoad(f64),
        Failing(String, bool),
        Exit(bool),
    }
    let mut actions = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        let action = match k.as_str() {
            "error_rate" => Action::ErrorRate(parse_fraction(&k, &v)?),
            "error_code" => Action::ErrorCode(
                infergate_base::codes::parse(&v).map_err(|e| format!("{k}: {e}"))?,
            ),
            "hidden_load" => Action::HiddenLoad(parse_fraction(&k, &v)?),
            "hang" => Action::Hang(parse_bool(&k, &v)?),
            "refuse" => Action::Refuse(parse_bool(&k, &v)?),
            "ready" => Action::Ready(parse_bool(&k, &v)?),
            "exit" => Action::Exit(parse_bool(&k, &v)?),
            "extra_latency_ms" => Action::ExtraLatency(
                v.parse()
                    .map_err(|_| format!("{k}: expected milliseconds, got '{v}'"))?,
            ),
            "fail_model" | "heal_model" => {
                if ctl.stats_by_name(&v).is_none() {
                    return Err(format!(
                        "{k}: model '{v}' is not served here (served: {})",
                        ctl.models().join(", ")
                    ));
                }
                Action::Failing(v, k == "fail_model")
            }
            _ => return Err(format!("unknown control parameter '{k}'")),
        };
        actions.push(action);
    }
    let mut exit = false;
    for action in actions {
        match action {
            Action::ErrorRate(v) => ctl.set_error_rate(v),
            Action::ErrorCode(c) => ctl.set_error_code(c),
            Action::HiddenLoad(v) => ctl.set_hidden_load(v),
            Action::Hang(v) => ctl.set_hang(v),
            Action::Refuse(v) => ctl.set_refuse(v),
            Action::Ready(v) => ctl.set_ready(v),
            Action::ExtraLatency(v) => ctl.set_extra_latency_ms(v),
            Action::Failing(m, f) => ctl.set_model_failing(&m, f),
            Action::Exit(v) => exit = v,
        }
    }
    Ok(exit)
}

fn control_state(ctl: &SimControl) -> String {
    let failing: Vec<serde_json::Value> = ctl
        .models()
        .into_iter()
        .filter(|m| ctl.model_failing(m))
        .map(|m| serde_json::Value::from(m.to_owned()))
        .collect();
    let v = serde_json::json!({
        "name": ctl.name(),
        "error_rate": ctl.error_rate(),
        "hidden_load": ctl.hidden_load(),
        "extra_latency_ms": ctl.extra_latency_ms(),
        "hang": ctl.hang(),
        "refuse": ctl.refuse(),
        "ready": ctl.ready(),
        "failing_models": failing,
        "started": ctl.started(),
        "completed": ctl.completed(),
        "failed": ctl.failed(),
        "cancelled": ctl.cancelled(),
        "in_flight": ctl.in_flight(),
        "queued": ctl.queued(),
        "prefix_hits": ctl.prefix_hits(),
        "prefix_misses": ctl.prefix_misses(),
        "kv_cache_utilization": ctl.kv_cache_utilization(),
    });
    format!("{v}\n")
}

/// Prometheus text exposition, with Triton's metric names and types.
pub(crate) fn render_metrics(ctl: &SimControl) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let gpu = escape(&format!("GPU-sim-{}", ctl.name()));
    let _ = writeln!(
        out,
        "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)"
    );
    let _ = writeln!(out, "# TYPE nv_gpu_utilization gauge");
    let _ = writeln!(
        out,
        "nv_gpu_utilization{{gpu_uuid=\"{gpu}\"}} {}",
        ctl.gpu_utilization()
    );

    type Getter = fn(&super::control::ModelStats) -> u64;
    let families: [(&str, &str, &str, Getter); 7] = [
        ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution per-model.", |s| s.pending.load(Relaxed)),
        ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes", |s| s.success.load(Relaxed)),
        ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)", |s| s.inference_count.load(Relaxed)),
        ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)", |s| s.exec_count.load(Relaxed)),
        ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds (includes cached requests)", |s| (s.success_ns.load(Relaxed) + s.fail_ns.load(Relaxed)) / 1000),
        ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds (includes cached requests)", |s| s.queue_ns.load(Relaxed) / 1000),
        ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds (does not include cached requests)", |s| s.compute_ns.load(Relaxed) / 1000),
    ];
    let served: Vec<(Model, &super::control::ModelStats)> = ctl.served().collect();
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (m, s) in &served {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",version=\"{VERSION}\"}} {}",
                m.name(),
                get(s)
            );
        }
    }
    let name = "nv_inference_request_failure";
    let _ = writeln!(
        out,
        "# HELP {name} Number of failed inference requests, all batch sizes"
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (m, s) in &served {
        for reason in FailReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",reason=\"{}\",version=\"{VERSION}\"}} {}",
                m.name(),
                reason.label(),
                s.failures(reason)
            );
        }
    }
    out
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl() -> SimControl {
        SimControl::new("t".into(), 4, &[Model::Simple], 0.0, 0.0, 1)
    }

    #[test]
    fn control_query_validates_before_applying() {
        let c = ctl();
        assert!(apply_control(&c, "error_rate=0.5&hang=maybe").is_err());
        assert_eq!(c.error_rate(), 0.0);
        assert_eq!(
            apply_control(&c, "error_rate=0.5&hang=1&extra_latency_ms=7"),
            Ok(false)
        );
        assert_eq!(
            (c.error_rate(), c.hang(), c.extra_latency_ms()),
            (0.5, true, 7)
        );
        assert!(apply_control(&c, "fail_model=nope").is_err());
        assert_eq!(apply_control(&c, "fail_model=simple&exit=1"), Ok(true));
        assert!(c.model_failing("simple"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%zz%"), "%zz%");
        assert_eq!(percent_decode("x%4"), "x%4");
    }

    #[test]
    fn metrics_have_triton_names() {
        let text = render_metrics(&ctl());
        assert!(text.contains("nv_gpu_utilization{gpu_uuid=\"GPU-sim-t\"} 0"));
        assert!(text.contains("# TYPE nv_inference_pending_request_count gauge"));
        assert!(text.contains("nv_inference_request_success{model=\"simple\",version=\"1\"} 0"));
        assert!(text.contains("reason=\"BACKEND\""));
    }
}
