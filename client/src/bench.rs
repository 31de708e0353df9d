//! The load generator behind `infergate-cli bench`: closed-loop or fixed-rate open-loop load
//! on one or more HTTP/2 connections, with latency percentiles from an HDR histogram.
//!
//! Why two modes: a closed loop (N workers, each sending its next call when the last one
//! answers) measures the most a server can do, but slows down when the server slows down and
//! so hides queueing ("coordinated omission"). The open loop sends on a fixed schedule
//! whatever happens, and measures each call from the time it *should* have been sent, so a
//! stall shows up in the tail as it would for real users. Outstanding calls are capped at
//! `max_in_flight`; an arrival that finds no free slot waits for one, and the wait counts
//! in its latency.
//!
//! Unary models are sent through [`crate::raw::RawCodec`]: the request is encoded once and
//! the same bytes are sent on every call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), infergate_client::ClientError> {
//! use infergate_client::bench::{run, BenchConfig};
//! let mut cfg = BenchConfig::new("127.0.0.1:8001", "simple");
//! cfg.concurrency = 16;
//! cfg.count = Some(10_000);
//! let report = run(cfg).await?;
//! println!("{}", report.summary());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use infergate_proto::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ModelInferRequest,
};
use prost::Message;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::tensor::{build_request, Tensor, TensorData};
use crate::{code_name, connect_channel, generate_request, parse_header, ClientError};

/// The response header or trailer in which the simulated backends name themselves.
pub const BACKEND_HEADER: &str = "sim-name";

/// The duration used when neither `duration` nor `count` is set.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Highest latency the histogram tracks (one hour, in microseconds); longer is clamped.
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// What to send, how hard, and for how long.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Gateway or backend address, `127.0.0.1:8001` or `http://host:port`.
    pub addr: String,
    /// Model to call. `simple` sends two INT32 [1,16] inputs; `tiny_llm` (or any model with
    /// `stream` set) opens a `ModelStreamInfer` per call and reads until the final response;
    /// any other model gets one FP32 `INPUT0` of `payload_bytes` bytes (as `identity_fp32`).
    pub model: String,
    /// Closed loop: the number of workers, each with one call in flight.
    pub concurrency: usize,
    /// Open loop: calls per second on a fixed schedule (overrides `concurrency`).
    pub rate: Option<f64>,
    /// Open loop: Poisson arrivals (exponential gaps drawn from `seed`) at `rate` on
    /// average, instead of one every `1 / rate` seconds.
    pub poisson: bool,
    /// Open loop at fixed intervals: the first call is due `phase / rate` seconds after
    /// the start (0 ≤ phase < 1), so generators at the same rate can take turns instead
    /// of sending at the same instants (three at phases 0, 1/3 and 2/3 make one evenly
    /// spaced stream).
    pub phase: f64,
    /// Open loop: the most calls outstanding at once.
    pub max_in_flight: usize,
    /// Stop sending after this long (whichever of `duration` and `count` comes first).
    pub duration: Option<Duration>,
    /// Stop after this many calls have been sent.
    pub count: Option<u64>,
    /// FP32 payload size in bytes for `identity_fp32`-like models (element count = bytes / 4).
    pub payload_bytes: usize,
    /// Tokens asked of a streaming model per call.
    pub max_tokens: u32,
    /// Number of HTTP/2 connections; calls go round-robin over them.
    pub connections: usize,
    /// Per-call deadline (sent as `grpc-timeout`, and enforced locally).
    pub timeout: Duration,
    /// Seed for the request contents, so runs are repeatable.
    pub seed: u64,
    /// Metadata headers added to every call.
    pub headers: Vec<(String, String)>,
    /// Use `ModelStreamInfer` even for a model other than `tiny_llm`.
    pub stream: bool,
    /// Send this request instead of the generated one (unary only; `model_name` is filled
    /// from `model` when empty).
    pub request: Option<ModelInferRequest>,
    /// Keep one [`TimelineEntry`] per finished call in [`BenchReport::timeline`] (a few
    /// dozen bytes per call, kept in memory until the end).
    pub timeline: bool,
}

impl BenchConfig {
    /// A closed-loop config with defaults: 1 worker, 1 connection, 10 s, 10 s timeout.
    pub fn new(addr: impl Into<String>, model: impl Into<String>) -> BenchConfig {
        BenchConfig {
            addr: addr.into(),
            model: model.into(),
            ..BenchConfig::default()
        }
    }

    fn is_stream(&self) -> bool {
        self.stream || self.model == "tiny_llm"
    }

    fn validate(&self) -> Result<(), ClientError> {
        let bad = |m: String| Err(ClientError::InvalidInput(m));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1".into());
        }
        if self.connections == 0 {
            return bad("connections must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1".into());
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return bad(format!("rate must be a positive number, not {rate}"));
            }
        }
        if !(0.0..1.0).contains(&self.phase) {
            return bad(format!(
                "phase must be at least 0 and below 1 (a fraction of one interval), not {}",
                self.phase
            ));
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return bad("duration must be positive".into());
        }
        if self.count == Some(0) {
            return bad("count must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.model.is_empty() {
            return bad("model must not be empty".into());
        }
        Ok(())
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            addr: "127.0.0.1:8001".into(),
            model: "simple".into(),
            concurrency: 1,
            rate: None,
            poisson: false,
            phase: 0.0,
            max_in_flight: 1024,
            duration: None,
            count: None,
            payload_bytes: 4096,
            max_tokens: 16,
            connections: 1,
            timeout: Duration::from_secs(10),
            seed: 1,
            headers: Vec::new(),
            stream: false,
            request: None,
            timeline: false,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of latencies recorded (successful calls).
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl LatencySummary {
    /// Reads the summary off a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Model called.
    pub model: String,
    /// `closed` (fixed concurrency) or `open` (fixed rate).
    pub mode: String,
    /// Closed-loop workers.
    pub concurrency: usize,
    /// Open-loop target rate, calls per second.
    pub rate: Option<f64>,
    /// HTTP/2 connections used.
    pub connections: usize,
    /// Calls sent.
    pub sent: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Failed calls by gRPC code name (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...).
    pub errors_by_code: BTreeMap<String, u64>,
    /// The first error message seen for each code.
    pub error_samples: BTreeMap<String, String>,
    /// Open loop: scheduled arrivals never sent because no slot freed up before the end.
    pub missed_arrivals: u64,
    /// Seconds from the first send to the last answer.
    pub elapsed_s: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency of successful calls, in microseconds.
    pub latency_us: LatencySummary,
    /// Calls per backend, from the `sim-name` response header or trailer.
    pub per_backend: BTreeMap<String, u64>,
    /// Tokens received (streaming models).
    pub tokens: u64,
    /// The latency histogram itself (microseconds), so runs can be merged, e.g. the
    /// clients of several gateway replicas.
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
    /// One entry per finished call, in the order calls finished (only with
    /// [`BenchConfig::timeline`]; empty otherwise).
    #[serde(skip)]
    pub timeline: Vec<TimelineEntry>,
}

/// One finished call, for [`BenchConfig::timeline`].
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEntry {
    /// When the call was due (open loop) or sent (closed loop), from the start of the run.
    pub send_offset: Duration,
    /// From `send_offset` to the answer (the same latency the histogram records).
    pub latency: Duration,
    /// `OK`, or the gRPC code name of the failure. A call the client gave up on is
    /// `DEADLINE_EXCEEDED` (bench's own timer) or `CANCELLED` (tonic's `grpc-timeout`
    /// timer, "Timeout expired").
    pub code: &'static str,
    /// The backend that answered (`sim-name` header or trailer), when it said.
    pub backend: Option<String>,
}

impl TimelineEntry {
    /// One line: `send_offset_ms latency_ms code backend` (backend `-` when unknown).
    pub fn line(&self) -> String {
        format!(
            "{:.3} {:.3} {} {}",
            self.send_offset.as_secs_f64() * 1000.0,
            self.latency.as_secs_f64() * 1000.0,
            self.code,
            self.backend.as_deref().unwrap_or("-")
        )
    }
}

/// Writes `entries` to `path`, one [`TimelineEntry::line`] each, in send order.
pub fn write_timeline(path: &std::path::Path, entries: &[TimelineEntry]) -> std::io::Result<()> {
    use std::io::Write;
    let mut sorted: Vec<&TimelineEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.send_offset);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "# send_offset_ms latency_ms code backend")?;
    for e in sorted {
        writeln!(out, "{}", e.line())?;
    }
    out.flush()
}

impl BenchReport {
    /// A few lines for people: throughput, latency in ms, errors, share per backend.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let ms = |us: u64| us as f64 / 1000.0;
        let mut s = String::new();
        let load = match self.rate {
            Some(r) => format!("open loop at {r} calls/s"),
            None => format!("closed loop, concurrency {}", self.concurrency),
        };
        let _ = writeln!(
            s,
            "model {} — {load}, {} connection(s), {:.2}s",
            self.model, self.connections, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "sent {}  ok {}  errors {}  throughput {:.1} ok/s",
            self.sent, self.ok, self.errors, self.throughput
        );
        if self.tokens > 0 {
            let _ = writeln!(
                s,
                "tokens {}  ({:.1} tokens/s)",
                self.tokens,
                self.tokens as f64 / self.elapsed_s.max(1e-9)
            );
        }
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.mean / 1000.0
        );
        if self.missed_arrivals > 0 {
            let _ = writeln!(
                s,
                "missed arrivals {} (max_in_flight was reached; the server could not keep up)",
                self.missed_arrivals
            );
        }
        for (code, n) in &self.errors_by_code {
            let sample = self
                .error_samples
                .get(code)
                .map(String::as_str)
                .unwrap_or("");
            let _ = writeln!(s, "error {code}: {n}  e.g. {sample:?}");
        }
        let total: u64 = self.per_backend.values().sum();
        for (name, n) in &self.per_backend {
            let share = 100.0 * *n as f64 / total.max(1) as f64;
            let _ = writeln!(s, "backend {name}: {n} ({share:.1}%)");
        }
        s
    }
}

/// A snapshot passed to the progress callback about once a second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Calls sent so far.
    pub sent: u64,
    /// Successful calls so far.
    pub ok: u64,
    /// Failed calls so far.
    pub errors: u64,
    /// Successful calls per second since the previous snapshot.
    pub rate: f64,
}

/// Runs the load described by `cfg` and reports what happened.
pub async fn run(cfg: BenchConfig) -> Result<BenchReport, ClientError> {
    run_with_progress(cfg, |_| {}).await
}

/// Like [`run`], calling `on_progress` about once a second while the load runs.
pub async fn run_with_progress<F>(
    cfg: BenchConfig,
    mut on_progress: F,
) -> Result<BenchReport, ClientError>
where
    F: FnMut(&Progress) + Send,
{
    cfg.validate()?;
    let duration = match (cfg.duration, cfg.count) {
        (None, None) => Some(DEFAULT_DURATION),
        (d, _) => d,
    };
    let target = Arc::new(Target::new(&cfg).await?);
    let counters = Arc::new(Counters::default());

    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let limits = Limits {
        count: cfg.count,
        deadline,
        start,
    };
    let mut load = match cfg.rate {
        None => {
            let workers = (0..cfg.concurrency)
                .map(|_| Stats::with_timeline(cfg.timeline))
                .collect::<Result<Vec<_>, _>>()?;
            let (target, counters) = (target.clone(), counters.clone());
            tokio::spawn(async move { closed_loop(target, counters, limits, workers).await })
        }
        Some(rate) => {
            let stats = Arc::new(Mutex::new(Stats::with_timeline(cfg.timeline)?));
            let (target, counters) = (target.clone(), counters.clone());
            let max_in_flight = cfg.max_in_flight;
            let schedule = Schedule::new(rate, cfg.phase, cfg.poisson.then_some(cfg.seed));
            tokio::spawn(async move {
                open_loop(target, counters, limits, schedule, max_in_flight, stats).await
            })
        }
    };

    let period = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(start + period, period);
    let mut last = (start, 0u64);
    let (stats, missed) = loop {
        tokio::select! {
            done = &mut load => {
                break done.map_err(|e| ClientError::Protocol(format!("load generator task failed: {e}")))??;
            }
            now = tick.tick() => {
                let ok = counters.ok.load(Ordering::Relaxed);
                let dt = now.saturating_duration_since(last.0).as_secs_f64();
                let rate = if dt > 0.0 { (ok - last.1) as f64 / dt } else { 0.0 };
                last = (now, ok);
                on_progress(&Progress {
                    elapsed_s: now.saturating_duration_since(start).as_secs_f64(),
                    sent: counters.sent.load(Ordering::Relaxed),
                    ok,
                    errors: counters.errors.load(Ordering::Relaxed),
                    rate,
                });
            }
        }
    };
    let elapsed_s = start.elapsed().as_secs_f64();

    Ok(BenchReport {
        model: cfg.model.clone(),
        mode: if cfg.rate.is_some() { "open" } else { "closed" }.into(),
        concurrency: cfg.concurrency,
        rate: cfg.rate,
        connections: cfg.connections,
        sent: counters.sent.load(Ordering::Relaxed),
        ok: stats.ok,
        errors: stats.errors,
        errors_by_code: stats.errors_by_code,
        error_samples: stats.error_samples,
        missed_arrivals: missed,
        elapsed_s,
        throughput: if elapsed_s > 0.0 {
            stats.ok as f64 / elapsed_s
        } else {
            0.0
        },
        latency_us: LatencySummary::from_histogram(&stats.hist),
        per_backend: stats.per_backend,
        tokens: stats.tokens,
        histogram: Some(stats.hist),
        timeline: stats.timeline.unwrap_or_default(),
    })
}

/// When to stop sending.
#[derive(Debug, Clone, Copy)]
struct Limits {
    count: Option<u64>,
    deadline: Option<Instant>,
    start: Instant,
}

/// Live counts read by the progress reporter.
#[derive(Debug, Default)]
struct Counters {
    /// Tickets handed out (closed loop); also the round-robin index.
    issued: AtomicU64,
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// The result of one call.
#[derive(Debug)]
struct Outcome {
    result: Result<(), Status>,
    backend: Option<String>,
    tokens: u64,
}

/// Results accumulated by one worker (or shared by the open loop).
#[derive(Debug)]
struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    error_samples: BTreeMap<String, String>,
    per_backend: BTreeMap<String, u64>,
    tokens: u64,
    /// Per-call entries, when the run keeps a timeline.
    timeline: Option<Vec<TimelineEntry>>,
}

impl Stats {
    fn with_timeline(timeline: bool) -> Result<Stats, ClientError> {
        let mut stats = Stats::new()?;
        if timeline {
            stats.timeline = Some(Vec::with_capacity(4096));
        }
        Ok(stats)
    }

    fn new() -> Result<Stats, ClientError> {
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
            .map_err(|e| ClientError::Protocol(format!("histogram: {e}")))?;
        Ok(Stats {
            hist,
            ok: 0,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            error_samples: BTreeMap::new(),
            per_backend: BTreeMap::new(),
            tokens: 0,
            timeline: None,
        })
    }

    /// Records a call that was due (or sent) `send_offset` after the start.
    fn record_at(&mut self, send_offset: Duration, outcome: Outcome, latency: Duration) {
        if let Some(timeline) = &mut self.timeline {
            timeline.push(TimelineEntry {
                send_offset,
                latency,
                code: match &outcome.result {
                    Ok(()) => "OK",
                    Err(status) => code_name(status.code()),
                },
                backend: outcome.backend.clone(),
            });
        }
        self.record(outcome, latency);
    }

    fn record(&mut self, outcome: Outcome, latency: Duration) {
        if let Some(b) = outcome.backend {
            *self.per_backend.entry(b).or_default() += 1;
        }
        self.tokens += outcome.tokens;
        match outcome.result {
            Ok(()) => {
                self.ok += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.hist.saturating_record(us.max(1));
            }
            Err(status) => {
                self.errors += 1;
                let code = code_name(status.code()).to_string();
                self.error_samples
                    .entry(code.clone())
                    .or_insert_with(|| status.message().to_string());
                *self.errors_by_code.entry(code).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Stats) {
        // Same bounds on both sides, so adding cannot go out of range; if it ever did, the
        // counts below still hold and only the percentiles would miss those samples.
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.errors += other.errors;
        self.tokens += other.tokens;
        for (k, v) in other.errors_by_code {
            *self.errors_by_code.entry(k).or_default() += v;
        }
        for (k, v) in other.error_samples {
            self.error_samples.entry(k).or_insert(v);
        }
        for (k, v) in other.per_backend {
            *self.per_backend.entry(k).or_default() += v;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.timeline, other.timeline) {
            mine.extend(theirs);
        }
    }
}

/// What each call sends.
#[derive(Debug)]
enum Workload {
    /// A pre-encoded `ModelInferRequest`.
    Unary { path: PathAndQuery, body: Bytes },
    /// One request on a fresh `ModelStreamInfer` per call, read to the final response.
    Stream { request: ModelInferRequest },
}

/// The connections and the prepared call.
#[derive(Debug)]
struct Target {
    channels: Vec<Channel>,
    workload: Workload,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    timeout: Duration,
}

impl Target {
    async fn new(cfg: &BenchConfig) -> Result<Target, ClientError> {
        let headers = cfg
            .headers
            .iter()
            .map(|(k, v)| parse_header(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        let workload = if cfg.is_stream() {
            let prompt = seeded_prompt(cfg.seed);
            Workload::Stream {
                request: generate_request(&cfg.model, &prompt, cfg.max_tokens)?,
            }
        } else {
            let mut request = match &cfg.request {
                Some(r) => r.clone(),
                None => default_request(&cfg.model, cfg.payload_bytes, cfg.seed)?,
            };
            if request.model_name.is_empty() {
                request.model_name = cfg.model.clone();
            }
            Workload::Unary {
                path: PathAndQuery::from_static(crate::raw::MODEL_INFER_PATH),
                body: Bytes::from(request.encode_to_vec()),
            }
        };
        let mut channels = Vec::with_capacity(cfg.connections);
        for _ in 0..cfg.connections {
            // Each `connect` opens its own TCP connection, so calls spread over N HTTP/2
            // connections, as N client processes would.
            channels.push(connect_channel(&cfg.addr).await?);
        }
        Ok(Target {
            channels,
            workload,
            headers,
            timeout: cfg.timeout,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        for (k, v) in &self.headers {
            req.metadata_mut().append(k.clone(), v.clone());
        }
        req.set_timeout(self.timeout);
        req
    }

    /// Makes call number `i` on connection `i mod connections`.
    async fn call(&self, i: u64) -> Outcome {
        let n = self.channels.len().max(1) as u64;
        let Some(channel) = self.channels.get((i % n) as usize).cloned() else {
            return Outcome {
                result: Err(Status::internal("no connection")),
                backend: None,
                tokens: 0,
            };
        };
        let call = async {
            match &self.workload {
                Workload::Unary { path, body } => {
                    let req = self.request(body.clone());
                    match crate::raw::unary_raw(channel, path.clone(), req).await {
                        Ok(resp) => Outcome {
                            result: Ok(()),
                            backend: backend_of(resp.metadata()),
                            tokens: 0,
                        },
                        Err(status) => Outcome {
                            backend: backend_of(status.metadata()),
                            result: Err(status),
                            tokens: 0,
                        },
                    }
                }
                Workload::Stream { request } => self.stream_call(channel, request.clone()).await,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome {
                result: Err(Status::deadline_exceeded(format!(
                    "no answer within {:?} (client-side timeout)",
                    self.timeout
                ))),
                backend: None,
                tokens: 0,
            },
        }
    }

    async fn stream_call(&self, channel: Channel, request: ModelInferRequest) -> Outcome {
        let mut outcome = Outcome {
            result: Ok(()),
            backend: None,
            tokens: 0,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        if tx.send(request).await.is_err() {
            outcome.result = Err(Status::internal("request stream closed"));
            return outcome;
        }
        let mut client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut stream = match client.model_stream_infer(self.request(outbound)).await {
            Ok(resp) => {
                outcome.backend = backend_of(resp.metadata());
                resp.into_inner()
            }
            Err(status) => {
                outcome.backend = backend_of(status.metadata());
                outcome.result = Err(status);
                return outcome;
            }
        };
        loop {
            match stream.next().await {
                None => break,
                Some(Err(status)) => {
                    outcome.result = Err(status);
                    break;
                }
                Some(Ok(msg)) => match crate::read_stream_response(&msg) {
                    Ok((token, last)) => {
                        outcome.tokens += u64::from(token.is_some());
                        if last {
                            break;
                        }
                    }
                    Err(e) => {
                        outcome.result = Err(Status::new(Code::Unknown, e.to_string()));
                        break;
                    }
                },
            }
        }
        drop(tx);
        outcome
    }
}

fn backend_of(md: &MetadataMap) -> Option<String> {
    md.get(BACKEND_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The request `bench` sends for a model when none is given.
pub fn default_request(
    model: &str,
    payload_bytes: usize,
    seed: u64,
) -> Result<ModelInferRequest, ClientError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    if model == "simple" {
        let a: Vec<i32> = (0..16).map(|_| rng.i32(-1000..1000)).collect();
        let b: Vec<i32> = (0..16).map(|_| rng.i32(-1000..1000)).collect();
        return build_request(
            model,
            &[
                Tensor::new("INPUT0", vec![1, 16], TensorData::Int32(a)),
                Tensor::new("INPUT1", vec![1, 16], TensorData::Int32(b)),
            ],
            &[],
        );
    }
    let n = (payload_bytes / 4).max(1);
    let values: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    build_request(
        model,
        &[Tensor::new(
            "INPUT0",
            vec![1, n as i64],
            TensorData::Fp32(values),
        )],
        &[],
    )
}

/// A short prompt picked by the seed, so streaming runs are repeatable.
pub fn seeded_prompt(seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "gateway", "routes", "every", "request", "to", "a", "ready", "backend", "quickly",
        "under", "load",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..8)
        .map(|_| WORDS[rng.usize(..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Closed loop: `workers.len()` workers, each sending its next call when the last answers.
async fn closed_loop(
    target: Arc<Target>,
    counters: Arc<Counters>,
    limits: Limits,
    workers: Vec<Stats>,
) -> Result<(Stats, u64), ClientError> {
    let keep_timeline = workers.iter().any(|w| w.timeline.is_some());
    let mut set = tokio::task::JoinSet::new();
    for mut stats in workers {
        let (target, counters) = (target.clone(), counters.clone());
        set.spawn(async move {
            loop {
                if limits.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = counters.issued.fetch_add(1, Ordering::Relaxed);
                if limits.count.is_some_and(|c| i >= c) {
                    break;
                }
                counters.sent.fetch_add(1, Ordering::Relaxed);
                let sent_at = Instant::now();
                let outcome = target.call(i).await;
                let counter = if outcome.result.is_ok() {
                    &counters.ok
                } else {
                    &counters.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let offset = sent_at.saturating_duration_since(limits.start);
                stats.record_at(offset, outcome, sent_at.elapsed());
            }
            stats
        });
    }
    let mut total = Stats::with_timeline(keep_timeline)?;
    while let Some(done) = set.join_next().await {
        let stats = done.map_err(|e| ClientError::Protocol(format!("bench worker failed: {e}")))?;
        total.merge(stats);
    }
    Ok((total, 0))
}

/// Open loop: call `i` is due at `start + i / rate`; its latency counts from then.
/// When open-loop calls are due, seconds after the start.
struct Schedule {
    rate: f64,
    /// Fixed intervals: the offset of every due time, in intervals.
    phase: f64,
    /// Poisson arrivals: the generator of the gaps and the time of the next call.
    random: Option<(fastrand::Rng, f64)>,
}

impl Schedule {
    fn new(rate: f64, phase: f64, poisson_seed: Option<u64>) -> Self {
        Schedule {
            rate,
            phase,
            random: poisson_seed.map(|seed| (fastrand::Rng::with_seed(seed), 0.0)),
        }
    }

    /// The due time of call `i` (called with i = 0, 1, 2, ... in order).
    fn due(&mut self, i: u64) -> f64 {
        match &mut self.random {
            None => (i as f64 + self.phase) / self.rate,
            Some((rng, next)) => {
                // Exponential gap with mean 1 / rate (1 − u is in (0, 1], so ln is finite).
                *next += -(1.0 - rng.f64()).ln() / self.rate;
                *next
            }
        }
    }
}

async fn open_loop(
    target: Arc<Target>,
    counters: Arc<Counters>,
    limits: Limits,
    mut schedule: Schedule,
    max_in_flight: usize,
    stats: Arc<Mutex<Stats>>,
) -> Result<(Stats, u64), ClientError> {
    let rate = schedule.rate;
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut i = 0u64;
    let mut missed = 0u64;
    loop {
        if limits.count.is_some_and(|c| i >= c) {
            break;
        }
        let due = limits.start + Duration::from_secs_f64(schedule.due(i));
        if limits.deadline.is_some_and(|d| due >= d) {
            break;
        }
        tokio::time::sleep_until(due).await;
        let permit = match limits.deadline {
            Some(d) => tokio::select! {
                p = slots.clone().acquire_owned() => p,
                _ = tokio::time::sleep_until(d) => {
                    missed = scheduled_before(limits, rate, d).saturating_sub(i);
                    break;
                }
            },
            None => slots.clone().acquire_owned().await,
        };
        let Ok(permit) = permit else { break };
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let (target, counters, stats) = (target.clone(), counters.clone(), stats.clone());
        let start = limits.start;
        tokio::spawn(async move {
            let outcome = target.call(i).await;
            let latency = due.elapsed();
            let counter = if outcome.result.is_ok() {
                &counters.ok
            } else {
                &counters.errors
            };
            counter.fetch_add(1, Ordering::Relaxed);
            stats
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .record_at(due.saturating_duration_since(start), outcome, latency);
            drop(permit);
        });
        i += 1;
    }
    // Every call holds a slot until it has recorded its outcome: taking them all back means
    // every call is done.
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    let mut guard = stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let empty = Stats::new()?;
    Ok((std::mem::replace(&mut *guard, empty), missed))
}

/// How many arrivals the schedule has before `end` (bounded by `count`).
fn scheduled_before(limits: Limits, rate: f64, end: Instant) -> u64 {
    let secs = end.saturating_duration_since(limits.start).as_secs_f64();
    let n = (secs * rate).ceil() as u64;
    limits.count.map_or(n, |c| n.min(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(actual: u64, expected: u64) -> bool {
        // 3 significant digits: within 0.1%, plus one unit for rounding.
        actual.abs_diff(expected) <= expected / 1000 + 1
    }

    #[test]
    fn percentiles_from_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, MAX_TRACKED_US, 3).expect("bounds");
        for v in 1..=10_000u64 {
            h.record(v).expect("in range");
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 10_000);
        assert_eq!(s.min, 1);
        assert!(near(s.p50, 5_000), "p50 {}", s.p50);
        assert!(near(s.p90, 9_000), "p90 {}", s.p90);
        assert!(near(s.p99, 9_900), "p99 {}", s.p99);
        assert!(near(s.p999, 9_990), "p99.9 {}", s.p999);
        assert!(near(s.max, 10_000), "max {}", s.max);
        assert!((s.mean - 5_000.5).abs() < 10.0, "mean {}", s.mean);
        assert_eq!(
            LatencySummary::from_histogram(&Histogram::<u64>::new(3).expect("sigfig")),
            LatencySummary::default()
        );
    }

    #[test]
    fn stats_record_and_merge() {
        let mut a = Stats::new().expect("stats");
        let mut b = Stats::new().expect("stats");
        a.record(
            Outcome {
                result: Ok(()),
                backend: Some("gpu-a".into()),
                tokens: 0,
            },
            Duration::from_millis(2),
        );
        b.record(
            Outcome {
                result: Err(Status::unavailable("down")),
                backend: Some("gpu-b".into()),
                tokens: 0,
            },
            Duration::from_millis(1),
        );
        b.record(
            Outcome {
                result: Ok(()),
                backend: Some("gpu-a".into()),
                tokens: 3,
            },
            Duration::from_millis(4),
        );
        a.merge(b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.errors, 1);
        assert_eq!(a.errors_by_code["UNAVAILABLE"], 1);
        assert_eq!(a.error_samples["UNAVAILABLE"], "down");
        assert_eq!(a.per_backend["gpu-a"], 2);
        assert_eq!(a.per_backend["gpu-b"], 1);
        assert_eq!(a.tokens, 3);
        let l = LatencySummary::from_histogram(&a.hist);
        assert_eq!(l.count, 2);
        assert!(near(l.max, 4_000));
    }

    #[test]
    fn timeline_keeps_one_line_per_call() {
        let mut a = Stats::with_timeline(true).expect("stats");
        let mut b = Stats::with_timeline(true).expect("stats");
        a.record_at(
            Duration::from_millis(30),
            Outcome {
                result: Err(Status::cancelled("Timeout expired")),
                backend: None,
                tokens: 0,
            },
            Duration::from_micros(2_000_500),
        );
        b.record_at(
            Duration::from_micros(1_250),
            Outcome {
                result: Ok(()),
                backend: Some("gpu-a".into()),
                tokens: 0,
            },
            Duration::from_millis(21),
        );
        a.merge(b);
        let timeline = a.timeline.expect("kept");
        assert_eq!(timeline.len(), 2);
        assert_eq!(timeline[0].line(), "30.000 2000.500 CANCELLED -");
        assert_eq!(timeline[1].line(), "1.250 21.000 OK gpu-a");
        let path = std::env::temp_dir().join(format!("bench-timeline-{}", std::process::id()));
        write_timeline(&path, &timeline).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with('#'));
        assert!(
            lines[1].starts_with("1.250 "),
            "sorted by send time: {text}"
        );
        let mut off = Stats::with_timeline(false).expect("stats");
        off.record_at(
            Duration::ZERO,
            Outcome {
                result: Ok(()),
                backend: None,
                tokens: 0,
            },
            Duration::from_millis(1),
        );
        assert!(off.timeline.is_none());
    }

    #[test]
    fn config_validation() {
        assert!(BenchConfig::new("x:1", "simple").validate().is_ok());
        let bad = [
            BenchConfig {
                concurrency: 0,
                ..BenchConfig::default()
            },
            BenchConfig {
                connections: 0,
                ..BenchConfig::default()
            },
            BenchConfig {
                rate: Some(0.0),
                ..BenchConfig::default()
            },
            BenchConfig {
                rate: Some(f64::NAN),
                ..BenchConfig::default()
            },
            BenchConfig {
                phase: 1.0,
                ..BenchConfig::default()
            },
            BenchConfig {
                count: Some(0),
                ..BenchConfig::default()
            },
            BenchConfig {
                duration: Some(Duration::ZERO),
                ..BenchConfig::default()
            },
            BenchConfig {
                timeout: Duration::ZERO,
                ..BenchConfig::default()
            },
            BenchConfig {
                max_in_flight: 0,
                ..BenchConfig::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn poisson_schedule_is_seeded_and_keeps_the_mean_rate() {
        let mut fixed = Schedule::new(100.0, 0.0, None);
        assert_eq!((fixed.due(0), fixed.due(3)), (0.0, 0.03));
        let mut shifted = Schedule::new(100.0, 0.5, None);
        assert_eq!((shifted.due(0), shifted.due(3)), (0.005, 0.035));
        let draw = |seed| {
            let mut s = Schedule::new(100.0, 0.0, Some(seed));
            (0..10_000).map(|i| s.due(i)).collect::<Vec<f64>>()
        };
        let a = draw(5);
        assert_eq!(a, draw(5), "same seed, same arrivals");
        assert_ne!(a, draw(6));
        assert!(a.windows(2).all(|w| w[0] <= w[1]), "in order");
        // 10,000 gaps of mean 10 ms: 100 s give or take a few percent.
        let last = a[a.len() - 1];
        assert!((95.0..105.0).contains(&last), "{last}");
        // Random gaps: some far shorter than the mean, some far longer.
        let gaps: Vec<f64> = a.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().any(|g| *g < 0.001) && gaps.iter().any(|g| *g > 0.03));
    }

    #[test]
    fn default_requests_are_seeded_and_sized() {
        let a = default_request("identity_fp32", 4096, 7).expect("request");
        let b = default_request("identity_fp32", 4096, 7).expect("request");
        let c = default_request("identity_fp32", 4096, 8).expect("request");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.inputs[0].shape, vec![1, 1024]);
        assert_eq!(a.raw_input_contents[0].len(), 4096);
        let s = default_request("simple", 0, 1).expect("request");
        assert_eq!(s.inputs.len(), 2);
        assert_eq!(s.raw_input_contents[1].len(), 64);
        assert_eq!(seeded_prompt(3), seeded_prompt(3));
    }

    #[test]
    fn schedule_counts_arrivals() {
        let start = Instant::now();
        let limits = Limits {
            count: None,
            deadline: None,
            start,
        };
        assert_eq!(
            scheduled_before(limits, 100.0, start + Duration::from_secs(2)),
            200
        );
        let limits = Limits {
            count: Some(50),
            ..limits
        };
        assert_eq!(
            scheduled_before(limits, 100.0, start + Duration::from_secs(2)),
            50
        );
    }

    #[test]
    fn summary_mentions_the_figures() {
        let mut report = BenchReport {
            model: "simple".into(),
            mode: "closed".into(),
            concurrency: 4,
            rate: None,
            connections: 1,
            sent: 10,
            ok: 9,
            errors: 1,
            errors_by_code: BTreeMap::from([("UNAVAILABLE".to_string(), 1)]),
            error_samples: BTreeMap::new(),
            missed_arrivals: 0,
            elapsed_s: 1.0,
            throughput: 9.0,
            latency_us: LatencySummary {
                p99: 2_500,
                ..LatencySummary::default()
            },
            per_backend: BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 1)]),
            histogram: None,
            tokens: 0,
            timeline: Vec::new(),
        };
        let s = report.summary();
        assert!(s.contains("p99 2.500"), "{s}");
        assert!(s.contains("UNAVAILABLE: 1"), "{s}");
        assert!(s.contains("backend a: 3 (75.0%)"), "{s}");
        report.rate = Some(100.0);
        assert!(report.summary().contains("open loop"));
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["latency_us"]["p99"], 2_500);
    }
}
