//! Load reports: what each backend says about its own load, kept per endpoint with its
//! age. Fed beside the request path (out-of-band ORCA streams, Prometheus scrapes) and
//! at its very end (the ORCA trailer of every response, read by `proxy::ObservedBody`);
//! read by the `gpu_aware` balancing policy.
//!
//! Four sources, freshest wins: every update stamps the time it was received, and the
//! policy ignores a report older than `load.stale_after_ms`, falling back to
//! least-request for that backend. Prometheus is scraped only for backends that have
//! not reported by ORCA within that bound, so a backend that speaks ORCA is never
//! polled.
//!
//! Values are kept in atomics (f64 bits), so the picker reads them without a lock.

use crate::config::{LoadConfig, ScrapeConfig};
use crate::endpoint::Endpoint;
use crate::load::{Load, Source};
use http::HeaderMap;
use infergate_proto::orca::OrcaLoadReport;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Reduces an ORCA report with the configured field names.
pub fn reduce(report: &OrcaLoadReport, cfg: &LoadConfig) -> Load {
    let field = |name: &str| -> Option<f64> {
        match name {
            "application_utilization" => Some(report.application_utilization),
            "cpu_utilization" => Some(report.cpu_utilization),
            "mem_utilization" => Some(report.mem_utilization),
            other => report
                .utilization
                .get(other)
                .or_else(|| report.named_metrics.get(other))
                .copied(),
        }
    };
    let utilization = cfg
        .utilization_fields
        .iter()
        .filter_map(|name| field(name))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let queue_depth = report
        .named_metrics
        .get(&cfg.queue_field)
        .copied()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(0.0);
    let running = (!cfg.running_field.is_empty())
        .then(|| report.named_metrics.get(&cfg.running_field))
        .flatten()
        .copied()
        .filter(|v| v.is_finite() && *v >= 0.0);
    Load {
        utilization,
        queue_depth,
        running,
    }
}

/// [`reduce`] straight from an encoded `OrcaLoadReport`, without decoding it into a
/// message. None when the bytes are not a well-formed report.
pub fn reduce_bytes(mut bytes: &[u8], cfg: &LoadConfig) -> Option<Load> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        prost::encoding::decode_varint(buf).ok()
    }
    fn double(buf: &mut &[u8]) -> Option<f64> {
        let raw: [u8; 8] = buf.get(..8)?.try_into().ok()?;
        *buf = &buf[8..];
        Some(f64::from_le_bytes(raw))
    }
    /// A map<string, double> entry: (key, value).
    fn entry(mut e: &[u8]) -> Option<(&[u8], f64)> {
        let (mut key, mut value) = (&[][..], 0.0);
        while !e.is_empty() {
            let tag = varint(&mut e)?;
            match (tag >> 3, tag & 7) {
                (1, 2) => {
                    let len = varint(&mut e)? as usize;
                    key = e.get(..len)?;
                    e = &e[len..];
                }
                (2, 1) => value = double(&mut e)?,
                _ => return None,
            }
        }
        Some((key, value))
    }
    let wanted = |name: &[u8]| cfg.utilization_fields.iter().any(|f| f.as_bytes() == name);
    let mut utilization = 0.0f64;
    let mut queue_depth = 0.0f64;
    let mut running = None;
    let running_key = (!cfg.running_field.is_empty()).then_some(cfg.running_field.as_bytes());
    let take = |v: f64, utilization: &mut f64| {
        if v.is_finite() {
            *utilization = utilization.max(v);
        }
    };
    while !bytes.is_empty() {
        let tag = varint(&mut bytes)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                varint(&mut bytes)?;
            }
            1 => {
                let v = double(&mut bytes)?;
                let name: &[u8] = match field {
                    1 => b"cpu_utilization",
                    2 => b"mem_utilization",
                    9 => b"application_utilization",
                    _ => b"",
                };
                if !name.is_empty() && wanted(name) {
                    take(v, &mut utilization);
                }
            }
            2 => {
                let len = varint(&mut bytes)? as usize;
                let body = bytes.get(..len)?;
                bytes = &bytes[len..];
                if field == 5 || field == 8 {
                    let (key, v) = entry(body)?;
                    if wanted(key) {
                        take(v, &mut utilization);
                    }
                    if field == 8 && key == cfg.queue_field.as_bytes() && v.is_finite() && v >= 0.0
                    {
                        queue_depth = v;
                    }
                    if field == 8 && Some(key) == running_key && v.is_finite() && v >= 0.0 {
                        running = Some(v);
                    }
                }
            }
            5 => bytes = bytes.get(4..)?,
            _ => return None,
        }
    }
    Some(Load {
        utilization,
        queue_depth,
        running,
    })
}

/// The per-call ORCA report's header (base64 protobuf), and its text and JSON form.
const ORCA_BIN: http::HeaderName = http::HeaderName::from_static("endpoint-load-metrics-bin");
const ORCA_TEXT: http::HeaderName = http::HeaderName::from_static("endpoint-load-metrics");

/// Reads an ORCA report from response headers or trailers, in any of the forms backends
/// send: `endpoint-load-metrics-bin` (base64 protobuf) or `endpoint-load-metrics` with a
/// `TEXT ` (`key=value` or `key:value`, comma separated) or `JSON ` body.
pub fn from_headers(headers: &HeaderMap) -> Option<(OrcaLoadReport, Source)> {
    if let Some(value) = headers.get(ORCA_BIN) {
        let bytes = decode_base64(value.as_bytes())?;
        let report = <OrcaLoadReport as prost::Message>::decode(bytes.as_slice()).ok()?;
        return Some((report, Source::OrcaPerCall));
    }
    let text = headers.get(ORCA_TEXT)?.to_str().ok()?.trim();
    if let Some(body) = text.strip_prefix("TEXT") {
        return Some((parse_text(body), Source::OrcaText));
    }
    if let Some(body) = text.strip_prefix("JSON") {
        return parse_json(body).map(|r| (r, Source::OrcaText));
    }
    None
}

/// Applies the report found in `headers`, if any, to `endpoint`, and takes it out of
/// the headers: a backend's load report is the gateway's to read. The caller would learn
/// from it how loaded its backend is by other tenants' calls, and an ORCA-aware client
/// would mistake it for the gateway's own load.
pub fn observe(endpoint: &Endpoint, headers: &mut HeaderMap, cfg: &LoadConfig) {
    // The per-call binary report is read without building the message (no maps, no
    // strings): it arrives on every response, so this is on the request path.
    if let Some(value) = headers.remove(ORCA_BIN) {
        if let Some(load) = decode_base64(value.as_bytes()).and_then(|b| reduce_bytes(&b, cfg)) {
            endpoint.report_load(load, Source::OrcaPerCall, true);
        }
        return;
    }
    if !headers.contains_key(ORCA_TEXT) {
        return;
    }
    if let Some((report, source)) = from_headers(headers) {
        let load = reduce(&report, cfg);
        endpoint.report_load(load, source, true);
    }
    headers.remove(ORCA_TEXT);
}

fn set_field(report: &mut OrcaLoadReport, key: &str, value: f64) {
    match key {
        "cpu_utilization" => report.cpu_utilization = value,
        "mem_utilization" => report.mem_utilization = value,
        "application_utilization" => report.application_utilization = value,
        "rps_fractional" => report.rps_fractional = value,
        "eps" => report.eps = value,
        other => {
            if let Some(name) = other.strip_prefix("named_metrics.") {
                report.named_metrics.insert(name.to_owned(), value);
            } else if let Some(name) = other.strip_prefix("utilization.") {
                report.utilization.insert(name.to_owned(), value);
            } else if let Some(name) = other.strip_prefix("request_cost.") {
                report.request_cost.insert(name.to_owned(), value);
            } else {
                report.named_metrics.insert(other.to_owned(), value);
            }
        }
    }
}

fn parse_text(body: &str) -> OrcaLoadReport {
    let mut report = OrcaLoadReport::default();
    for pair in body.split(',') {
        let Some((key, value)) = pair.split_once('=').or_else(|| pair.split_once(':')) else {
            continue;
        };
        if let Ok(value) = value.trim().parse::<f64>() {
            set_field(&mut report, key.trim(), value);
        }
    }
    report
}

fn parse_json(body: &str) -> Option<OrcaLoadReport> {
    let value: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let mut report = OrcaLoadReport::default();
    for (key, v) in value.as_object()? {
        match v {
            serde_json::Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    set_field(&mut report, key, x);
                }
            }
            serde_json::Value::Object(map) => {
                for (name, inner) in map {
                    if let Some(x) = inner.as_f64() {
                        set_field(&mut report, &format!("{key}.{name}"), x);
                    }
                }
            }
            _ => {}
        }
    }
    Some(report)
}

/// Standard base64 (gRPC `-bin` metadata), padding optional.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine;
    // gRPC's `-bin` metadata is base64 with or without padding; some stacks send the
    // URL-safe alphabet.
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    STANDARD
        .decode(input)
        .or_else(|_| URL_SAFE.decode(input))
        .ok()
}

/// Starts the background load-report tasks of one endpoint: the ORCA out-of-band
/// stream (when `load.oob`) and the Prometheus scrape (when it has a `metrics_address`).
/// Both end on shutdown or when the endpoint leaves the pool.
pub fn spawn_for(
    endpoint: &Arc<Endpoint>,
    cfg: &Arc<LoadConfig>,
    shutdown: &watch::Receiver<bool>,
) {
    if cfg.oob {
        tokio::spawn(run_oob(
            Arc::downgrade(endpoint),
            Arc::clone(cfg),
            shutdown.clone(),
        ));
    }
    if let Some(address) = endpoint.metrics_address() {
        tokio::spawn(run_scrape(
            Arc::downgrade(endpoint),
            address.to_owned(),
            endpoint.scrape().clone(),
            Arc::clone(cfg),
            shutdown.clone(),
        ));
    }
}

/// Keeps an ORCA out-of-band stream open to `endpoint` while it is in the pool. A backend
/// that answers UNIMPLEMENTED does not offer the service: the loop stops and nothing
/// else changes (it is not marked unhealthy).
pub async fn run_oob(
    endpoint: Weak<Endpoint>,
    cfg: Arc<LoadConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    use infergate_proto::orca::open_rca_service_client::OpenRcaServiceClient;
    use infergate_proto::orca::OrcaLoadReportRequest;
    let interval = Duration::from_millis(cfg.oob_interval_ms.max(10));
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(e) = endpoint.upgrade() else { return };
        let request = OrcaLoadReportRequest {
            report_interval: Some(prost_types::Duration {
                seconds: interval.as_secs() as i64,
                nanos: interval.subsec_nanos() as i32,
            }),
            request_cost_names: Vec::new(),
        };
        let mut client = OpenRcaServiceClient::new(e.connection());
        let address = e.address().to_owned();
        drop(e);
        let opened = tokio::select! {
            r = client.stream_core_metrics(request) => r,
            _ = shutdown.changed() => return,
        };
        match opened {
            Ok(response) => {
                let mut stream = response.into_inner();
                backoff = Duration::from_millis(200);
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        _ = shutdown.changed() => return,
                    };
                    match (next, endpoint.upgrade()) {
                        (Ok(Some(report)), Some(e)) => {
                            let load = reduce(&report, &cfg);
                            e.report_load(load, Source::OrcaOob, false);
                        }
                        (_, None) => return,
                        (Ok(None), _) | (Err(_), _) => break,
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!(backend = %address, "no ORCA out-of-band service; using per-call reports");
                return;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Scrapes `metrics_address` every interval while ORCA reports are absent or stale.
pub async fn run_scrape(
    endpoint: Weak<Endpoint>,
    metrics_address: String,
    scrape: ScrapeConfig,
    cfg: Arc<LoadConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (util_name, queue_name, running_name) = scrape.names();
    let interval = Duration::from_millis(cfg.scrape_interval_ms.max(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let Some(e) = endpoint.upgrade() else { return };
        let orca_fresh = e
            .load()
            .fresh(Instant::now(), cfg.stale_after())
            .is_some_and(|r| r.source != Source::Prometheus);
        if orca_fresh {
            continue;
        }
        drop(e);
        match fetch_metrics(&metrics_address, interval).await {
            Ok(text) => {
                let mut names = vec![util_name.as_str(), queue_name.as_str()];
                names.extend(running_name.as_deref());
                let values = parse_prometheus(&text, &names);
                let utilization = values.get(util_name.as_str()).map(|v| v.max).unwrap_or(0.0);
                let queue = values
                    .get(queue_name.as_str())
                    .map(|v| v.sum)
                    .unwrap_or(0.0);
                if let Some(e) = endpoint.upgrade() {
                    e.report_load(
                        Load {
                            utilization,
                            queue_depth: queue,
                            running: running_name
                                .as_deref()
                                .and_then(|name| values.get(name))
                                .map(|v| v.sum),
                        },
                        Source::Prometheus,
                        false,
                    );
                }
            }
            Err(err) => tracing::debug!(%metrics_address, "scrape failed: {err}"),
        }
    }
}

/// Largest metrics page read; a bigger one is an error, never silently cut.
const MAX_METRICS_BYTES: usize = 8 << 20;

async fn fetch_metrics(address: &str, timeout: Duration) -> Result<String, String> {
    let (host, path) = match address.split_once('/') {
        Some((host, path)) => (host, format!("/{path}")),
        None => (address, "/metrics".to_owned()),
    };
    infergate_base::http1::get(host, &path, MAX_METRICS_BYTES, timeout).await
}

/// Where the label set `{...}` at the start of `text` ends (the byte after its `}`),
/// reading quoted values with their escapes, so a `}` or `,` inside a value such as
/// `{path="/a}b"}` does not end it.
fn labels_end(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// Sum and maximum of a metric over its label sets.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Aggregate {
    /// Sum over label sets.
    pub sum: f64,
    /// Maximum over label sets.
    pub max: f64,
}

/// Reads the named metrics from Prometheus text exposition format.
pub fn parse_prometheus<'a>(text: &str, names: &[&'a str]) -> HashMap<&'a str, Aggregate> {
    let mut out: HashMap<&'a str, Aggregate> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(wanted) = names.iter().find(|n| **n == name) else {
            continue;
        };
        let rest = &line[name_end..];
        let after_labels = if rest.starts_with('{') {
            match labels_end(rest) {
                Some(end) => &rest[end..],
                None => continue, // an unterminated label set: not a sample
            }
        } else {
            rest
        };
        let Some(value) = after_labels
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let entry = out.entry(*wanted).or_insert(Aggregate {
            sum: 0.0,
            max: f64::MIN,
        });
        entry.sum += value;
        entry.max = entry.max.max(value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadState;
    use http::HeaderValue;

    fn encode_base64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn binary_trailer_is_decoded_and_reduced() {
        let report = OrcaLoadReport {
            application_utilization: 0.4,
            named_metrics: [
                ("gpu_utilization".to_owned(), 0.7),
                ("queue_depth".to_owned(), 3.0),
            ]
            .into(),
            cpu_utilization: 0.9,
            ..Default::default()
        };
        let mut headers = HeaderMap::new();
        let encoded = encode_base64(&prost::Message::encode_to_vec(&report));
        headers.insert(
            "endpoint-load-metrics-bin",
            HeaderValue::from_str(&encoded).expect("ascii"),
        );
        let (parsed, source) = from_headers(&headers).expect("report");
        assert_eq!(source, Source::OrcaPerCall);
        let load = reduce(&parsed, &LoadConfig::default());
        let raw = prost::Message::encode_to_vec(&report);
        assert_eq!(
            reduce_bytes(&raw, &LoadConfig::default()),
            Some(load),
            "the fast path agrees"
        );
        assert_eq!(
            reduce_bytes(&raw[..raw.len() - 3], &LoadConfig::default()),
            None,
            "truncated"
        );
        assert_eq!(
            load,
            Load {
                utilization: 0.7,
                queue_depth: 3.0,
                running: None,
            },
            "cpu not counted by default"
        );
        let cpu = LoadConfig {
            utilization_fields: vec!["cpu_utilization".into(), "application_utilization".into()],
            ..LoadConfig::default()
        };
        assert_eq!(reduce(&parsed, &cpu).utilization, 0.9);
    }

    #[test]
    fn text_and_json_forms_are_accepted() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "endpoint-load-metrics",
            HeaderValue::from_static("TEXT application_utilization=0.25, named_metrics.queue_depth:4, utilization.gpu_utilization=0.5, named_metrics.running_requests=3"),
        );
        let (report, source) = from_headers(&headers).expect("text");
        assert_eq!(source, Source::OrcaText);
        assert_eq!(
            reduce(&report, &LoadConfig::default()),
            Load {
                utilization: 0.5,
                queue_depth: 4.0,
                running: Some(3.0),
            }
        );

        headers.insert(
            "endpoint-load-metrics",
            HeaderValue::from_static(
                r#"JSON {"cpu_utilization": 0.3, "named_metrics": {"kv_cache_utilization": 0.8}}"#,
            ),
        );
        let (report, _) = from_headers(&headers).expect("json");
        assert_eq!(report.cpu_utilization, 0.3);
        assert_eq!(reduce(&report, &LoadConfig::default()).utilization, 0.8);

        headers.insert(
            "endpoint-load-metrics",
            HeaderValue::from_static("JSON {not json"),
        );
        assert!(from_headers(&headers).is_none());
    }

    #[test]
    fn base64_round_trips_with_and_without_padding() {
        for len in 0..20 {
            let bytes: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let encoded = encode_base64(&bytes);
            assert_eq!(decode_base64(encoded.as_bytes()).expect("decodes"), bytes);
            let padded = format!("{encoded}{}", "=".repeat((4 - encoded.len() % 4) % 4));
            assert_eq!(decode_base64(padded.as_bytes()).expect("decodes"), bytes);
        }
        assert!(decode_base64(b"a*b=").is_none());
    }

    #[test]
    fn prometheus_text_is_aggregated_over_labels() {
        let text = "# HELP nv_gpu_utilization GPU utilization\n# TYPE nv_gpu_utilization gauge\n\
            nv_gpu_utilization{gpu_uuid=\"GPU-a\"} 0.25\nnv_gpu_utilization{gpu_uuid=\"GPU-b\"} 0.75\n\
            nv_inference_pending_request_count{model=\"simple\",version=\"1\"} 3\n\
            nv_inference_pending_request_count{model=\"tiny_llm\",version=\"1\"} 2\n\
            vllm:num_requests_waiting 7\nother_metric 1\n";
        let values = parse_prometheus(
            text,
            &[
                "nv_gpu_utilization",
                "nv_inference_pending_request_count",
                "vllm:num_requests_waiting",
            ],
        );
        assert_eq!(values["nv_gpu_utilization"].max, 0.75);
        assert_eq!(values["nv_inference_pending_request_count"].sum, 5.0);
        assert_eq!(values["vllm:num_requests_waiting"].sum, 7.0);
        assert!(!values.contains_key("other_metric"));
    }

    #[test]
    fn quoted_label_values_may_hold_braces_commas_and_escapes() {
        let text = "queue{path=\"/a}b\",note=\"x, \\\"y\\\" }\"} 4\n\
            queue{path=\"ok\"} 1 1700000000000\n\
            queue{path=\"never closed} 9\n";
        let values = parse_prometheus(text, &["queue"]);
        // The third line has no end to its label set: not a sample.
        assert_eq!(values["queue"].sum, 5.0);
        assert_eq!(values["queue"].max, 4.0);
    }

    #[tokio::test(start_paused = true)]
    async fn readings_age_and_go_stale() {
        let state = LoadState::default();
        let now = Instant::now();
        assert!(state.read(now).is_none());
        state.store(0.5, 2.0, Source::OrcaOob, now);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let reading = state.read(Instant::now()).expect("reading");
        assert_eq!(reading.age, Duration::from_millis(1500));
        assert_eq!(reading.source, Source::OrcaOob);
        assert!(state
            .fresh(Instant::now(), Duration::from_secs(2))
            .is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(state
            .fresh(Instant::now(), Duration::from_secs(2))
            .is_none());
    }

    fn observed(utilization: f64, running: Option<f64>) -> Load {
        Load {
            utilization,
            queue_depth: 0.0,
            running,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn learns_from_the_running_count_when_reported() {
        let state = LoadState::default();
        let now = Instant::now();
        // Own calls never vary (another replica sends the rest), so only the backend's
        // running count can teach.
        for running in (0..40).map(|i| (i % 3) as f64) {
            let u = 0.5 + 0.25 * running;
            state.store_observed(
                observed(u, Some(running)),
                Source::OrcaPerCall,
                now,
                Some(0),
            );
        }
        let learned = state.per_call_utilization().expect("learned");
        assert!((learned - 0.25).abs() < 1e-9, "{learned}");
    }

    #[test]
    fn running_count_is_read_from_named_metrics_in_both_decoders() {
        let report = OrcaLoadReport {
            named_metrics: [
                ("gpu_utilization".to_owned(), 0.5),
                ("running_requests".to_owned(), 2.0),
            ]
            .into(),
            ..Default::default()
        };
        let raw = prost::Message::encode_to_vec(&report);
        let cfg = LoadConfig::default();
        assert_eq!(reduce(&report, &cfg).running, Some(2.0));
        assert_eq!(reduce_bytes(&raw, &cfg).and_then(|l| l.running), Some(2.0));
        let off = LoadConfig {
            running_field: String::new(),
            ..LoadConfig::default()
        };
        assert_eq!(reduce(&report, &off).running, None);
        assert_eq!(reduce_bytes(&raw, &off).and_then(|l| l.running), None);
    }

    #[tokio::test(start_paused = true)]
    async fn learns_what_one_call_adds_and_keeps_the_calls_a_reading_counts() {
        let state = LoadState::default();
        let now = Instant::now();
        assert_eq!(state.per_call_utilization(), None);
        // Nothing to learn from without calls running, nor from readings without `own`.
        state.store_observed(observed(0.5, None), Source::OrcaPerCall, now, Some(0));
        state.store(0.9, 0.0, Source::OrcaOob, now);
        assert_eq!(state.per_call_utilization(), None);
        // Hidden work holds half the backend; each of the gateway's calls a quarter.
        for own in (0..40).map(|i| i % 2) {
            let u = 0.5 + 0.25 * own as f64;
            state.store_observed(observed(u, None), Source::OrcaPerCall, now, Some(own));
        }
        let learned = state.per_call_utilization().expect("learned");
        assert!((learned - 0.25).abs() < 1e-9, "{learned}");
        // Each reading keeps how many of the gateway's own calls it counts.
        assert_eq!(state.read(now).map(|r| r.own_calls), Some(1));
        state.store(0.9, 0.0, Source::OrcaOob, now);
        assert_eq!(state.read(now).map(|r| r.own_calls), Some(0));
    }
}
