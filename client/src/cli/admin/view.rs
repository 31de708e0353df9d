//! How `infergate-cli admin` shows the admin API's answers: tables and sentences for people,
//! and serde mirrors of the prost messages for `--json` (prost types do not derive
//! `Serialize`). Everything here is pure: text in, text out, so it is tested without a
//! gateway.

use std::collections::BTreeMap;

use infergate_proto::admin::{
    Backend, Bulkhead, CacheStatsResponse, DrainBackendResponse, Event, GetConfigResponse,
    ListSequencesResponse, Model, ReloadConfigResponse, RemoveBackendResponse,
};
use serde::Serialize;

use crate::cli::render_table;

/// `Backend`, for JSON.
#[derive(Debug, Serialize)]
pub struct BackendJson {
    pub address: String,
    pub models: Vec<String>,
    pub health: String,
    pub in_flight: u64,
    pub requests_total: u64,
    pub failures_total: u64,
    pub source: String,
    pub weight: u32,
    pub draining: bool,
    pub ejected: bool,
    pub ejection_reason: String,
    pub circuit: String,
    /// Sorted by model, so the output is stable.
    pub model_circuits: BTreeMap<String, String>,
    pub models_not_ready: Vec<String>,
    pub utilization: f64,
    pub queue_depth: f64,
    pub report_age_ms: i64,
    pub report_source: String,
    /// What one call takes of the backend (0..1); 0 = not known yet.
    pub per_call_share: f64,
    /// Configured capacity; 0 = learned from reports.
    pub capacity: u32,
    pub service_time_ms: f64,
    /// -1 when the backend's reports do not say.
    pub reported_running: f64,
    /// This gateway's share of the backend's calls; 0 = not known.
    pub own_share: f64,
}

impl From<&Backend> for BackendJson {
    fn from(b: &Backend) -> Self {
        BackendJson {
            address: b.address.clone(),
            models: b.models.clone(),
            health: b.health.clone(),
            in_flight: b.in_flight,
            requests_total: b.requests_total,
            failures_total: b.failures_total,
            source: b.source.clone(),
            weight: b.weight,
            draining: b.draining,
            ejected: b.ejected,
            ejection_reason: b.ejection_reason.clone(),
            circuit: b.circuit.clone(),
            model_circuits: b
                .model_circuits
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            models_not_ready: b.models_not_ready.clone(),
            utilization: finite(b.utilization),
            queue_depth: finite(b.queue_depth),
            report_age_ms: b.report_age_ms,
            report_source: b.report_source.clone(),
            per_call_share: finite(b.per_call_share),
            capacity: b.capacity,
            service_time_ms: finite(b.service_time_ms),
            reported_running: finite(b.reported_running),
            own_share: finite(b.own_share),
        }
    }
}

/// `ListBackendsResponse`, for JSON.
#[derive(Debug, Serialize)]
pub struct BackendsJson {
    pub backends: Vec<BackendJson>,
}

impl BackendsJson {
    pub fn new(backends: &[Backend]) -> Self {
        BackendsJson {
            backends: backends.iter().map(BackendJson::from).collect(),
        }
    }
}

/// `Bulkhead`, for JSON.
#[derive(Debug, Serialize)]
pub struct BulkheadJson {
    pub max_concurrent: u32,
    pub max_queue: u32,
    pub queue_timeout_ms: u64,
    pub active: u64,
    pub queued: u64,
    pub admitted_total: u64,
    pub rejected_full_total: u64,
    pub rejected_timeout_total: u64,
}

impl From<&Bulkhead> for BulkheadJson {
    fn from(b: &Bulkhead) -> Self {
        BulkheadJson {
            max_concurrent: b.max_concurrent,
            max_queue: b.max_queue,
            queue_timeout_ms: b.queue_timeout_ms,
            active: b.active,
            queued: b.queued,
            admitted_total: b.admitted_total,
            rejected_full_total: b.rejected_full_total,
            rejected_timeout_total: b.rejected_timeout_total,
        }
    }
}

/// `Model`, for JSON. `bulkhead` is null when the model has none.
#[derive(Debug, Serialize)]
pub struct ModelJson {
    pub name: String,
    pub backends: Vec<String>,
    pub decoupled: bool,
    pub policy: String,
    pub bulkhead: Option<BulkheadJson>,
    pub fallback: String,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub eligible_backends: u32,
    pub max_attempts: u32,
    pub deadline_default_ms: u64,
    pub deadline_max_ms: u64,
}

impl From<&Model> for ModelJson {
    fn from(m: &Model) -> Self {
        ModelJson {
            name: m.name.clone(),
            backends: m.backends.clone(),
            decoupled: m.decoupled,
            policy: m.policy.clone(),
            bulkhead: m.bulkhead.as_ref().map(BulkheadJson::from),
            fallback: m.fallback.clone(),
            latency_p50_ms: finite(m.latency_p50_ms),
            latency_p99_ms: finite(m.latency_p99_ms),
            eligible_backends: m.eligible_backends,
            max_attempts: m.max_attempts,
            deadline_default_ms: m.deadline_default_ms,
            deadline_max_ms: m.deadline_max_ms,
        }
    }
}

/// `ListModelsResponse`, for JSON.
#[derive(Debug, Serialize)]
pub struct ModelsJson {
    pub models: Vec<ModelJson>,
}

impl ModelsJson {
    pub fn new(models: &[Model]) -> Self {
        ModelsJson {
            models: models.iter().map(ModelJson::from).collect(),
        }
    }
}

/// `DrainBackendResponse`, for JSON, with the address and direction it was for.
#[derive(Debug, Serialize)]
pub struct DrainJson {
    pub address: String,
    pub undrain: bool,
    pub idle: bool,
    pub in_flight_left: u64,
    pub waited_ms: u64,
}

impl DrainJson {
    pub fn new(address: &str, undrain: bool, r: &DrainBackendResponse) -> Self {
        DrainJson {
            address: address.to_string(),
            undrain,
            idle: r.idle,
            in_flight_left: r.in_flight_left,
            waited_ms: r.waited_ms,
        }
    }
}

/// `RemoveBackendResponse`, for JSON, with the address removed.
#[derive(Debug, Serialize)]
pub struct RemoveJson {
    pub address: String,
    pub in_flight_left: u64,
}

impl RemoveJson {
    pub fn new(address: &str, r: &RemoveBackendResponse) -> Self {
        RemoveJson {
            address: address.to_string(),
            in_flight_left: r.in_flight_left,
        }
    }
}

/// `Event`, for JSON, with `time` (UTC, RFC 3339) beside `at_unix_ms`.
#[derive(Debug, Serialize)]
pub struct EventJson {
    pub at_unix_ms: u64,
    pub time: String,
    pub kind: String,
    pub backend: String,
    pub model: String,
    pub reason: String,
    pub missed: u64,
}

impl From<&Event> for EventJson {
    fn from(e: &Event) -> Self {
        EventJson {
            at_unix_ms: e.at_unix_ms,
            time: utc_time(e.at_unix_ms),
            kind: e.kind.clone(),
            backend: e.backend.clone(),
            model: e.model.clone(),
            reason: e.reason.clone(),
            missed: e.missed,
        }
    }
}

/// `GetConfigResponse`, for JSON; `path` is null when the configuration came from no file.
#[derive(Debug, Serialize)]
pub struct ConfigJson {
    pub toml: String,
    pub path: Option<String>,
}

impl From<&GetConfigResponse> for ConfigJson {
    fn from(r: &GetConfigResponse) -> Self {
        ConfigJson {
            toml: r.toml.clone(),
            path: Some(r.path.clone()).filter(|p| !p.is_empty()),
        }
    }
}

/// `ReloadConfigResponse`, for JSON.
#[derive(Debug, Serialize)]
pub struct ReloadJson {
    pub changes: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl From<&ReloadConfigResponse> for ReloadJson {
    fn from(r: &ReloadConfigResponse) -> Self {
        ReloadJson {
            changes: r.changes.clone(),
            needs_restart: r.needs_restart.clone(),
        }
    }
}

/// JSON has no NaN or infinity (serde_json would write `null`); 0 reads better.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// `-` for an empty cell.
fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Replaces control characters (a newline in a reason) so that one item stays on one line.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A number with at most one decimal, without a trailing `.0`.
fn short_number(x: f64) -> String {
    if !x.is_finite() {
        return "?".to_string();
    }
    let rounded = (x * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}")
    } else {
        format!("{rounded:.1}")
    }
}

/// A duration in milliseconds as people read it: `850ms`, `1.2s`, `3m05s`, `2h10m`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", short_number(ms as f64 / 1000.0))
    } else if ms < 3_600_000 {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// The STATE column: what keeps a backend from getting calls, or `active`.
pub fn backend_state(b: &Backend) -> String {
    let mut parts = Vec::new();
    if b.draining {
        parts.push("draining".to_string());
    }
    if b.ejected {
        if b.ejection_reason.is_empty() {
            parts.push("ejected".to_string());
        } else {
            parts.push(format!("ejected: {}", one_line(&b.ejection_reason)));
        }
    }
    if !b.circuit.is_empty() && b.circuit != "closed" {
        parts.push(format!("circuit {}", b.circuit.replace('_', " ")));
    }
    let per_model: BTreeMap<&String, &String> = b.model_circuits.iter().collect();
    for (model, state) in per_model {
        if state.as_str() != "closed" {
            parts.push(format!("{model}: circuit {}", state.replace('_', " ")));
        }
    }
    if !b.models_not_ready.is_empty() {
        parts.push(format!("not ready: {}", b.models_not_ready.join(",")));
    }
    if parts.is_empty() {
        "active".to_string()
    } else {
        parts.join("; ")
    }
}

/// The LOAD column: utilization, queue depth, and the report's age and source; `-` when the
/// gateway has no reading (the gateway sends age -1 and source `none`).
pub fn backend_load(b: &Backend) -> String {
    if b.report_age_ms < 0 || b.report_source.is_empty() || b.report_source == "none" {
        return "-".to_string();
    }
    let mut s = format!(
        "{}% q{}",
        short_number(b.utilization * 100.0),
        short_number(b.queue_depth)
    );
    if b.reported_running >= 0.0 {
        s.push_str(&format!(" r{}", short_number(b.reported_running)));
    }
    s.push_str(&format!(
        " ({} ago, {})",
        human_ms(b.report_age_ms.unsigned_abs()),
        b.report_source
    ));
    s
}

/// The PER-CALL column: the share of the backend one call takes and whether it is
/// configured (`cap N`) or learned, then the service time, then (when known and not
/// all) this gateway's share of the backend's calls; `-` for what is not known yet.
pub fn backend_per_call(b: &Backend) -> String {
    let share = if b.per_call_share > 0.0 {
        let how = if b.capacity > 0 {
            format!("cap {}", b.capacity)
        } else {
            "learned".to_string()
        };
        format!("{}% {how}", short_number(b.per_call_share * 100.0))
    } else {
        "-".to_string()
    };
    let service = if b.service_time_ms > 0.0 {
        format!("{}ms", short_number(b.service_time_ms))
    } else {
        "-".to_string()
    };
    let mut s = format!("{share}, {service}");
    if b.own_share > 0.0 && b.own_share < 0.995 {
        s.push_str(&format!(", ours {}%", short_number(b.own_share * 100.0)));
    }
    s
}

/// The `admin backends` table.
pub fn backends_table(backends: &[Backend]) -> String {
    if backends.is_empty() {
        return "no backends\n".to_string();
    }
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            vec![
                b.address.clone(),
                or_dash(&b.health),
                b.in_flight.to_string(),
                b.requests_total.to_string(),
                b.failures_total.to_string(),
                b.weight.to_string(),
                backend_state(b),
                backend_load(b),
                backend_per_call(b),
                or_dash(&b.models.join(",")),
            ]
        })
        .collect();
    render_table(
        &[
            "ADDRESS",
            "HEALTH",
            "IN-FLIGHT",
            "REQUESTS",
            "FAILURES",
            "WEIGHT",
            "STATE",
            "LOAD",
            "PER-CALL",
            "MODELS",
        ],
        &rows,
    )
}

/// The BULKHEAD column: `active/max, queued/max`, or `-` without one.
pub fn bulkhead_cell(b: Option<&Bulkhead>) -> String {
    match b {
        Some(b) if b.max_concurrent > 0 => format!(
            "{}/{}, {}/{} queued",
            b.active, b.max_concurrent, b.queued, b.max_queue
        ),
        _ => "-".to_string(),
    }
}

/// The `admin models` table.
pub fn models_table(models: &[Model]) -> String {
    if models.is_empty() {
        return "no models\n".to_string();
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            let latency = if m.latency_p50_ms == 0.0 && m.latency_p99_ms == 0.0 {
                "-".to_string()
            } else {
                format!(
                    "{}/{}",
                    short_number(m.latency_p50_ms),
                    short_number(m.latency_p99_ms)
                )
            };
            vec![
                m.name.clone(),
                or_dash(&m.policy),
                format!("{}/{}", m.eligible_backends, m.backends.len()),
                bulkhead_cell(m.bulkhead.as_ref()),
                latency,
                or_dash(&m.fallback),
                if m.decoupled { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "POLICY",
            "BACKENDS",
            "BULKHEAD",
            "P50/P99 MS",
            "FALLBACK",
            "DECOUPLED",
        ],
        &rows,
    )
}

/// `ListSequencesResponse`, for JSON: one object per pinned sequence.
#[derive(Debug, Serialize)]
pub struct SequencesJson {
    pub total: u64,
    pub sequences: Vec<SequenceJson>,
}

/// One pinned sequence, for JSON.
#[derive(Debug, Serialize)]
pub struct SequenceJson {
    pub backend: String,
    pub model: String,
    pub sequence_id: String,
    pub string_id: bool,
    pub idle_ms: u64,
    pub lost: Option<String>,
}

impl SequencesJson {
    pub fn new(r: &ListSequencesResponse) -> Self {
        let sequences = r
            .backends
            .iter()
            .flat_map(|b| {
                b.sequences.iter().map(|s| SequenceJson {
                    backend: b.address.clone(),
                    model: s.model.clone(),
                    sequence_id: s.sequence_id.clone(),
                    string_id: s.string_id,
                    idle_ms: s.idle_ms,
                    lost: (!s.lost.is_empty()).then(|| s.lost.clone()),
                })
            })
            .collect();
        SequencesJson {
            total: r.total,
            sequences,
        }
    }
}

/// The `admin sequences` table: one row per pinned sequence, grouped by backend.
pub fn sequences_table(r: &ListSequencesResponse) -> String {
    if r.total == 0 {
        return "no sequences pinned\n".to_string();
    }
    let rows: Vec<Vec<String>> = r
        .backends
        .iter()
        .flat_map(|b| {
            b.sequences.iter().map(|s| {
                let id = if s.string_id {
                    format!("\"{}\"", one_line(&s.sequence_id))
                } else {
                    s.sequence_id.clone()
                };
                vec![
                    b.address.clone(),
                    s.model.clone(),
                    id,
                    human_ms(s.idle_ms),
                    if s.lost.is_empty() {
                        "-".to_string()
                    } else {
                        one_line(&s.lost)
                    },
                ]
            })
        })
        .collect();
    render_table(&["BACKEND", "MODEL", "SEQUENCE", "IDLE", "LOST"], &rows)
}

/// `CacheStatsResponse`, for JSON: one object per model.
#[derive(Debug, Serialize)]
pub struct CacheJson {
    pub models: Vec<CacheModelJson>,
}

/// One model's cache, for JSON.
#[derive(Debug, Serialize)]
pub struct CacheModelJson {
    pub model: String,
    pub entries: u64,
    pub bytes: u64,
    pub hits_l1: u64,
    pub hits_l2: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub ttl_ms: u64,
    pub max_entries: u64,
    pub max_bytes: u64,
    pub max_entry_bytes: u64,
    pub shared: bool,
    pub coalesce: bool,
}

impl CacheJson {
    pub fn new(r: &CacheStatsResponse) -> Self {
        let models = r
            .models
            .iter()
            .map(|m| CacheModelJson {
                model: m.model.clone(),
                entries: m.entries,
                bytes: m.bytes,
                hits_l1: m.hits_l1,
                hits_l2: m.hits_l2,
                misses: m.misses,
                coalesced: m.coalesced,
                evictions: m.evictions,
                expirations: m.expirations,
                ttl_ms: m.ttl_ms,
                max_entries: m.max_entries,
                max_bytes: m.max_bytes,
                max_entry_bytes: m.max_entry_bytes,
                shared: m.shared,
                coalesce: m.coalesce,
            })
            .collect();
        CacheJson { models }
    }
}

/// What `admin cache purge --json` prints.
#[derive(Debug, Serialize)]
pub struct PurgedJson {
    pub model: String,
    pub l1_entries: u64,
    pub l2_keys: u64,
}

/// The `admin cache stats` table: one row per model with a cache.
pub fn cache_table(r: &CacheStatsResponse) -> String {
    if r.models.is_empty() {
        return "no model has a response cache ([models.NAME] cache)\n".to_string();
    }
    let rows: Vec<Vec<String>> = r
        .models
        .iter()
        .map(|m| {
            let lookups = m.hits_l1 + m.hits_l2 + m.misses + m.coalesced;
            let hit_rate = if lookups == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.1}%",
                    100.0 * (m.hits_l1 + m.hits_l2 + m.coalesced) as f64 / lookups as f64
                )
            };
            vec![
                m.model.clone(),
                format!("{}/{}", m.entries, m.max_entries),
                format!("{}/{}", m.bytes, m.max_bytes),
                m.hits_l1.to_string(),
                m.hits_l2.to_string(),
                m.misses.to_string(),
                m.coalesced.to_string(),
                hit_rate,
                format!("{}/{}", m.evictions, m.expirations),
                human_ms(m.ttl_ms),
                if m.shared { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "MODEL",
            "ENTRIES",
            "BYTES",
            "HITS L1",
            "HITS L2",
            "MISSES",
            "COALESCED",
            "SERVED",
            "EVICTED/EXPIRED",
            "TTL",
            "SHARED",
        ],
        &rows,
    )
}

/// One sentence on a backend an admin call returned: `VERB ADDRESS: weight N, STATE`.
pub fn backend_sentence(verb: &str, b: &Backend) -> String {
    let mut s = format!(
        "{verb} {}: weight {}, health {}, {}",
        b.address,
        b.weight,
        or_dash(&b.health),
        backend_state(b)
    );
    if !b.models.is_empty() {
        s.push_str(&format!(", models {}", b.models.join(",")));
    }
    s.push('\n');
    s
}

/// What `admin drain` prints.
pub fn drain_text(address: &str, undrain: bool, r: &DrainBackendResponse) -> String {
    if undrain {
        format!("undrained {address}: it takes new calls again\n")
    } else if r.idle {
        format!(
            "drained {address}: idle after {} (it takes no new calls; `admin drain {address} --undrain` sends it calls again)\n",
            human_ms(r.waited_ms)
        )
    } else {
        format!(
            "{address} is draining, but {} call(s) were still in flight after {}\n",
            r.in_flight_left,
            human_ms(r.waited_ms)
        )
    }
}

/// What `admin remove` prints.
pub fn remove_text(address: &str, r: &RemoveBackendResponse) -> String {
    if r.in_flight_left == 0 {
        format!("removed {address}\n")
    } else {
        format!(
            "removed {address} with {} call(s) still in flight (the drain timed out)\n",
            r.in_flight_left
        )
    }
}

/// What `admin config reload` prints.
pub fn reload_text(r: &ReloadConfigResponse) -> String {
    let mut s = String::new();
    if r.changes.is_empty() {
        s.push_str("configuration reloaded: no changes\n");
    } else {
        s.push_str(&format!(
            "configuration reloaded: {} change(s)\n",
            r.changes.len()
        ));
        for c in &r.changes {
            s.push_str(&format!("  {}\n", one_line(c)));
        }
    }
    if !r.needs_restart.is_empty() {
        s.push_str("these take effect only after a restart:\n");
        for c in &r.needs_restart {
            s.push_str(&format!("  {}\n", one_line(c)));
        }
    }
    s
}

/// One `admin watch` line: time, kind, backend, model, reason.
pub fn event_line(e: &Event) -> String {
    let time = utc_time(e.at_unix_ms);
    if e.kind == "events_missed" {
        return format!(
            "{time}  {:<20}  {} event(s) missed: this watcher fell behind\n",
            e.kind, e.missed
        );
    }
    let mut s = format!(
        "{time}  {:<20}  backend={}  model={}",
        one_line(&e.kind),
        or_dash(&one_line(&e.backend)),
        or_dash(&one_line(&e.model))
    );
    if !e.reason.is_empty() {
        s.push_str("  ");
        s.push_str(&one_line(&e.reason));
    }
    s.push('\n');
    s
}

/// Milliseconds since the Unix epoch as UTC RFC 3339: `2024-05-01T12:00:00.123Z`.
pub fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    // u64::MAX / 86_400_000 days fits an i64 comfortably.
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backend() -> Backend {
        Backend {
            address: "10.0.0.1:9000".into(),
            models: vec!["simple".into(), "tiny_llm".into()],
            health: "ready".into(),
            in_flight: 3,
            requests_total: 1200,
            failures_total: 4,
            source: "config".into(),
            weight: 2,
            utilization: 0.734,
            queue_depth: 2.0,
            report_age_ms: 1240,
            report_source: "orca".into(),
            reported_running: 3.0,
            per_call_share: 0.25,
            service_time_ms: 20.9,
            own_share: 0.334,
            circuit: "closed".into(),
            ..Default::default()
        }
    }

    fn troubled() -> Backend {
        Backend {
            address: "10.0.0.2:9000".into(),
            models: vec!["simple".into()],
            health: "not_ready".into(),
            weight: 1,
            draining: true,
            ejected: true,
            ejection_reason: "5 consecutive\nfailures".into(),
            circuit: "half_open".into(),
            model_circuits: HashMap::from([
                ("tiny_llm".to_string(), "open".to_string()),
                ("simple".to_string(), "forced_open".to_string()),
            ]),
            models_not_ready: vec!["tiny_llm".into()],
            report_age_ms: -1,
            reported_running: -1.0,
            capacity: 8,
            per_call_share: 0.125,
            ..Default::default()
        }
    }

    fn model() -> Model {
        Model {
            name: "simple".into(),
            backends: vec!["10.0.0.1:9000".into(), "10.0.0.2:9000".into()],
            policy: "gpu_aware".into(),
            bulkhead: Some(Bulkhead {
                max_concurrent: 64,
                max_queue: 128,
                queue_timeout_ms: 500,
                active: 12,
                queued: 3,
                ..Default::default()
            }),
            fallback: "simple_cpu".into(),
            latency_p50_ms: 1.24,
            latency_p99_ms: 8.0,
            eligible_backends: 1,
            ..Default::default()
        }
    }

    #[test]
    fn backends_table_shows_state_and_load() {
        let text = backends_table(&[backend(), troubled()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for col in [
            "ADDRESS",
            "HEALTH",
            "IN-FLIGHT",
            "REQUESTS",
            "FAILURES",
            "WEIGHT",
            "STATE",
            "LOAD",
            "PER-CALL",
            "MODELS",
        ] {
            assert!(lines[0].contains(col), "{col} missing: {}", lines[0]);
        }
        // Columns line up: each row's MODELS starts where the header's does.
        let at = lines[0].find("MODELS").expect("header");
        assert_eq!(&lines[1][at..], "simple,tiny_llm");
        assert!(lines[1].contains("active"));
        assert!(
            lines[1].contains("73.4% q2 r3 (1.2s ago, orca)"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("1200"));
        assert_eq!(
            backend_state(&troubled()),
            "draining; ejected: 5 consecutive failures; circuit half open; \
             simple: circuit forced open; tiny_llm: circuit open; not ready: tiny_llm"
        );
        assert_eq!(backend_load(&troubled()), "-");
        assert_eq!(
            backend_per_call(&backend()),
            "25% learned, 20.9ms, ours 33.4%"
        );
        assert_eq!(backend_per_call(&troubled()), "12.5% cap 8, -");
        assert_eq!(backend_per_call(&Backend::default()), "-, -");
        let none = Backend {
            report_age_ms: -1,
            report_source: "none".into(),
            ..Default::default()
        };
        assert_eq!(backend_load(&none), "-");
        assert_eq!(backends_table(&[]), "no backends\n");
    }

    #[test]
    fn sequences_table_groups_by_backend() {
        use infergate_proto::admin::{BackendSequences, PinnedSequence};
        let r = ListSequencesResponse {
            backends: vec![BackendSequences {
                address: "10.0.0.1:8001".into(),
                sequences: vec![
                    PinnedSequence {
                        model: "accumulate".into(),
                        sequence_id: "42".into(),
                        string_id: false,
                        idle_ms: 250,
                        lost: String::new(),
                    },
                    PinnedSequence {
                        model: "accumulate".into(),
                        sequence_id: "user-7".into(),
                        string_id: true,
                        idle_ms: 10,
                        lost: "was ejected".into(),
                    },
                ],
            }],
            total: 2,
        };
        let table = sequences_table(&r);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("BACKEND"), "{table}");
        assert!(
            lines[1].contains("42") && lines[1].ends_with('-'),
            "{table}"
        );
        assert!(lines[2].contains("\"user-7\"") && lines[2].contains("was ejected"));
        let json = serde_json::to_value(SequencesJson::new(&r)).unwrap_or_default();
        assert_eq!(json["sequences"][1]["lost"], "was ejected");
        assert_eq!(json["sequences"][0]["lost"], serde_json::Value::Null);
        assert_eq!(
            sequences_table(&ListSequencesResponse::default()),
            "no sequences pinned\n"
        );
    }

    #[test]
    fn models_table_shows_limits_and_latency() {
        let plain = Model {
            name: "tiny_llm".into(),
            decoupled: true,
            backends: vec!["a:1".into()],
            eligible_backends: 1,
            ..Default::default()
        };
        let text = models_table(&[model(), plain]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[0].contains("P50/P99 MS"));
        let cells: Vec<&str> = lines[1]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            [
                "simple",
                "gpu_aware",
                "1/2",
                "12/64, 3/128 queued",
                "1.2/8",
                "simple_cpu",
                "no"
            ]
        );
        let cells: Vec<&str> = lines[2]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(cells, ["tiny_llm", "-", "1/1", "-", "-", "-", "yes"]);
        assert_eq!(models_table(&[]), "no models\n");
    }

    #[test]
    fn json_mirrors_the_messages() {
        let doc = serde_json::to_value(BackendsJson::new(&[troubled()])).expect("json");
        let b = &doc["backends"][0];
        assert_eq!(b["address"], "10.0.0.2:9000");
        assert_eq!(b["draining"], true);
        assert_eq!(b["report_age_ms"], -1);
        assert_eq!(b["model_circuits"]["tiny_llm"], "open");
        assert_eq!(b["models_not_ready"][0], "tiny_llm");

        let doc =
            serde_json::to_value(ModelsJson::new(&[model(), Model::default()])).expect("json");
        assert_eq!(doc["models"][0]["bulkhead"]["max_concurrent"], 64);
        assert_eq!(doc["models"][0]["latency_p50_ms"], 1.24);
        assert!(doc["models"][1]["bulkhead"].is_null());

        let nan = Model {
            latency_p99_ms: f64::NAN,
            ..Default::default()
        };
        assert_eq!(ModelJson::from(&nan).latency_p99_ms, 0.0);

        let cfg = ConfigJson::from(&GetConfigResponse {
            toml: "listen = \"0.0.0.0:8001\"\n".into(),
            path: String::new(),
        });
        let doc = serde_json::to_value(&cfg).expect("json");
        assert!(doc["path"].is_null());
        assert_eq!(doc["toml"], "listen = \"0.0.0.0:8001\"\n");
    }

    #[test]
    fn events_are_one_line_each() {
        let e = Event {
            at_unix_ms: 1_714_564_800_123,
            kind: "backend_ejected".into(),
            backend: "10.0.0.1:9000".into(),
            model: String::new(),
            reason: "5 consecutive failures\nlast: UNAVAILABLE".into(),
            missed: 0,
        };
        assert_eq!(
            event_line(&e),
            "2024-05-01T12:00:00.123Z  backend_ejected       backend=10.0.0.1:9000  model=-  \
             5 consecutive failures last: UNAVAILABLE\n"
        );
        let missed = Event {
            at_unix_ms: 0,
            kind: "events_missed".into(),
            missed: 17,
            ..Default::default()
        };
        assert_eq!(
            event_line(&missed),
            "1970-01-01T00:00:00.000Z  events_missed         17 event(s) missed: this watcher fell behind\n"
        );
        let json = serde_json::to_string(&EventJson::from(&e)).expect("json");
        assert!(!json.contains('\n'));
        let doc: serde_json::Value = serde_json::from_str(&json).expect("valid");
        assert_eq!(doc["time"], "2024-05-01T12:00:00.123Z");
        assert_eq!(doc["kind"], "backend_ejected");
        assert_eq!(doc["at_unix_ms"], 1_714_564_800_123u64);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_time(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(utc_time(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        // Never panics, whatever the server sends.
        let _ = utc_time(u64::MAX);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(0), "0ms");
        assert_eq!(human_ms(999), "999ms");
        assert_eq!(human_ms(1000), "1s");
        assert_eq!(human_ms(1240), "1.2s");
        assert_eq!(human_ms(185_000), "3m05s");
        assert_eq!(human_ms(7_800_000), "2h10m");
    }

    #[test]
    fn sentences() {
        assert_eq!(
            backend_sentence("added", &backend()),
            "added 10.0.0.1:9000: weight 2, health ready, active, models simple,tiny_llm\n"
        );
        let idle = DrainBackendResponse {
            idle: true,
            in_flight_left: 0,
            waited_ms: 1500,
        };
        assert!(drain_text("a:1", false, &idle).starts_with("drained a:1: idle after 1.5s"));
        let busy = DrainBackendResponse {
            idle: false,
            in_flight_left: 2,
            waited_ms: 30_000,
        };
        assert_eq!(
            drain_text("a:1", false, &busy),
            "a:1 is draining, but 2 call(s) were still in flight after 30s\n"
        );
        assert!(drain_text("a:1", true, &idle).starts_with("undrained a:1"));
        assert_eq!(
            remove_text("a:1", &RemoveBackendResponse { in_flight_left: 0 }),
            "removed a:1\n"
        );
        let r = ReloadConfigResponse {
            changes: vec!["balancer.policy: gpu_aware -> least_request".into()],
            needs_restart: vec!["listen".into()],
        };
        assert_eq!(
            reload_text(&r),
            "configuration reloaded: 1 change(s)\n  balancer.policy: gpu_aware -> least_request\n\
             these take effect only after a restart:\n  listen\n"
        );
        assert_eq!(
            reload_text(&ReloadConfigResponse::default()),
            "configuration reloaded: no changes\n"
        );
    }
}
