//! Prompt-prefix affinity: many users sharing about 20 system prompts, streamed
//! through one gateway to four simulated LLM backends whose prefix caches hold fewer
//! prompts than there are; for each policy and load level: time to first token (p50,
//! p99), tokens per second, the share of prefix-cache hits, and how evenly the load
//! spread (time-averaged calls running per backend, the highest over the mean).
//!
//! ```text
//! cargo run --release -p infergate --example prefix_affinity            # 8 s a run
//! cargo run --release -p infergate --example prefix_affinity -- 15      # 15 s a run
//! POLICIES=prefix_affinity LOADS=0.9 cargo run --release -p infergate --example prefix_affinity
//! ```
//!
//! The workload (the same arrivals, prompts and users for every policy: seeded):
//! - Poisson arrivals at 70% and 90% (`LOADS`) of the pool's capacity *when every call
//!   misses the cache*: 4 backends × 4 slots, a call holding its slot for the prefill
//!   (40 ms, or 40 / 8 = 5 ms on a hit) and 16 tokens at 2 ms;
//! - each call's prompt is one of `PROMPTS` (20) system prompts of 300 bytes, drawn
//!   with Zipf weights 1/rank^`ZIPF` (1.0: the top prompt carries 28% of the calls,
//!   more than one backend's share), then the user's own question;
//! - each backend's prefix cache keeps `CACHE` (8) prompts for 30 s, keyed on the
//!   first 256 bytes (the system prompt), as the gateway's `prefix.bytes` is.
//!
//! `THRESHOLD` and `EPSILON` set the gateway's `prefix.utilization_threshold` and
//! `prefix.epsilon`; `POLICIES` and `LOADS` (comma separated) narrow the runs.
//!
//! Every run is bounded in time (arrivals stop after the run's seconds, each call has a
//! 10 s timeout) and count (rate × seconds calls); everything listens on 127.0.0.1.

use hdrhistogram::Histogram;
use infergate::config::{BackendConfig, Config, ModelConfig, PolicyKind, PrefixConfig};
use infergate::server::{self, GatewayHandle};
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_sim::{self as sim, PrefixCacheConfig, SimConfig, SimHandle};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

const BACKENDS: usize = 4;
const SLOTS: usize = 4;
const PREFILL_MS: f64 = 40.0;
const SPEEDUP: f64 = 8.0;
const TOKENS: u32 = 16;
const TOKEN_MS: f64 = 2.0;
const PROMPT_BYTES: usize = 300;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Calls per second the pool serves when every call misses the cache.
fn capacity() -> f64 {
    (BACKENDS * SLOTS) as f64 * 1000.0 / (PREFILL_MS + f64::from(TOKENS) * TOKEN_MS)
}

fn system_prompt(i: usize) -> String {
    let mut p = format!("SYSTEM PROMPT {i:02}: you are assistant number {i}. ");
    while p.len() < PROMPT_BYTES {
        p.push_str("Answer briefly, cite sources, refuse unsafe requests. ");
    }
    p.truncate(PROMPT_BYTES);
    p
}

/// One arrival: when (from the start) and which prompt.
struct Arrival {
    at: Duration,
    prompt: String,
}

fn arrivals(rate: f64, seconds: f64, seed: u64) -> Vec<Arrival> {
    let prompts: usize = env("PROMPTS", 20);
    let zipf: f64 = env("ZIPF", 1.0);
    let weights: Vec<f64> = (1..=prompts).map(|r| 1.0 / (r as f64).powf(zipf)).collect();
    let total: f64 = weights.iter().sum();
    let system: Vec<String> = (0..prompts).map(system_prompt).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    let count = (rate * seconds).ceil() as usize;
    while out.len() < count {
        t += -(1.0 - rng.f64()).ln() / rate;
        if t >= seconds {
            break;
        }
        let mut x = rng.f64() * total;
        let p = weights
            .iter()
            .position(|w| {
                x -= w;
                x < 0.0
            })
            .unwrap_or(prompts - 1);
        let user = rng.u32(..);
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            prompt: format!("{}User {user}: question {}?", system[p], rng.u32(..1000)),
        });
    }
    out
}

async fn start(policy: PolicyKind) -> (Vec<SimHandle>, GatewayHandle) {
    let sims: Vec<SimHandle> = (0..BACKENDS)
        .map(|i| {
            sim::spawn(SimConfig {
                listen: loopback(),
                metrics_listen: None,
                name: format!("llm{i}"),
                slots: SLOTS,
                latency_ms: PREFILL_MS,
                token_latency_ms: TOKEN_MS,
                seed: 1 + i as u64,
                models: vec!["tiny_llm".into()],
                prefix_cache: PrefixCacheConfig {
                    entries: env("CACHE", 8),
                    ttl: Duration::from_secs(30),
                    speedup: SPEEDUP,
                    bytes: 256,
                },
                ..SimConfig::default()
            })
            .expect("simulated backend")
        })
        .collect();
    let mut config = Config {
        listen: loopback(),
        metrics_listen: loopback(),
        admin_listen: loopback(),
        backends: sims
            .iter()
            .map(|x| BackendConfig::new(x.addr().to_string()))
            .collect(),
        ..Config::default()
    };
    config.balancer.policy = policy;
    config.models.insert(
        "tiny_llm".into(),
        ModelConfig {
            decoupled: Some(true),
            policy: Some(policy),
            prefix: Some(PrefixConfig {
                utilization_threshold: env(
                    "THRESHOLD",
                    PrefixConfig::default().utilization_threshold,
                ),
                epsilon: env("EPSILON", PrefixConfig::default().epsilon),
                ..PrefixConfig::default()
            }),
            ..ModelConfig::default()
        },
    );
    let gateway = server::start(config, "bench").await.expect("gateway");
    (sims, gateway)
}

#[derive(Default)]
struct Tally {
    ttft: Option<Histogram<u64>>,
    tokens: u64,
    ok: u64,
    errors: u64,
    last_end: Duration,
}

/// One call: opens a stream, reads to the final response. TTFT runs from the call's
/// scheduled arrival (open loop: a late send counts against the gateway).
async fn one_call(
    channel: Channel,
    prompt: String,
    due: Instant,
    origin: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let call = async {
        let request = infergate_client::generate_request("tiny_llm", &prompt, TOKENS)
            .map_err(|e| e.to_string())?;
        let mut client = GrpcInferenceServiceClient::new(channel);
        let mut stream = client
            .model_stream_infer(tokio_stream::iter(vec![request]))
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        let mut first = None;
        let mut tokens = 0u64;
        while let Some(msg) = stream.message().await.map_err(|s| s.to_string())? {
            let (token, last) =
                infergate_client::read_stream_response(&msg).map_err(|e| e.to_string())?;
            if token.is_some() {
                tokens += 1;
                first.get_or_insert_with(|| due.elapsed());
            }
            if last {
                break;
            }
        }
        Ok::<_, String>((first, tokens))
    };
    let result = tokio::time::timeout(Duration::from_secs(10), call).await;
    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
    t.last_end = t.last_end.max(origin.elapsed());
    match result {
        Ok(Ok((Some(ttft), tokens))) => {
            t.ok += 1;
            t.tokens += tokens;
            if let Some(h) = t.ttft.as_mut() {
                let _ = h.record(u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX));
            }
        }
        _ => t.errors += 1,
    }
}

struct Row {
    p50: f64,
    p99: f64,
    tokens_per_s: f64,
    hits: f64,
    max_over_mean: f64,
    per_backend: Vec<f64>,
    errors: u64,
}

async fn run(policy: PolicyKind, load: f64, seconds: f64) -> Row {
    let (sims, gateway) = start(policy).await;
    let rate = capacity() * load;
    let plan = arrivals(rate, seconds, 7 + (load * 100.0) as u64);
    let mut channels = Vec::new();
    for _ in 0..4 {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr()))
                .expect("uri");
        channels.push(endpoint.connect().await.expect("connect"));
    }
    let tally = Arc::new(Mutex::new(Tally {
        ttft: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
        ..Tally::default()
    }));
    // Time-averaged calls running on each backend, sampled every 5 ms.
    let controls: Vec<_> = sims.iter().map(|s| Arc::clone(s.control())).collect();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut sums = vec![0u64; controls.len()];
            let mut samples = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                for (s, c) in sums.iter_mut().zip(&controls) {
                    *s += c.in_flight();
                }
                samples += 1;
            }
            sums.into_iter()
                .map(|s| s as f64 / samples.max(1) as f64)
                .collect::<Vec<f64>>()
        })
    };
    let origin = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, a) in plan.into_iter().enumerate() {
        let due = origin + a.at;
        tokio::time::sleep_until(due).await;
        let channel = channels[i % channels.len()].clone();
        tasks.spawn(one_call(channel, a.prompt, due, origin, Arc::clone(&tally)));
    }
    while tasks.join_next().await.is_some() {}
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let per_backend = sampler.await.unwrap_or_default();
    let (hits, lookups) = sims.iter().fold((0u64, 0u64), |(h, l), s| {
        let c = s.control();
        (h + c.prefix_hits(), l + c.prefix_hits() + c.prefix_misses())
    });
    gateway.shutdown(Duration::from_secs(1)).await;
    drop(sims);
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |q: f64| {
        t.ttft
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let mean = per_backend.iter().sum::<f64>() / per_backend.len().max(1) as f64;
    let max = per_backend.iter().cloned().fold(0.0, f64::max);
    Row {
        p50: ms(0.5),
        p99: ms(0.99),
        tokens_per_s: t.tokens as f64 / t.last_end.as_secs_f64().max(1e-9),
        hits: hits as f64 / lookups.max(1) as f64,
        max_over_mean: max / mean.max(1e-9),
        per_backend,
        errors: t.errors,
    }
}

#[tokio::main]
async fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8.0);
    let policies: Vec<PolicyKind> = match std::env::var("POLICIES") {
        Ok(list) => list
            .split(',')
            .map(|p| {
                p.parse()
                    .expect("POLICIES: gpu_aware, least_request, prefix_affinity")
            })
            .collect(),
        Err(_) => vec![
            PolicyKind::GpuAware,
            PolicyKind::LeastRequest,
            PolicyKind::PrefixAffinity,
        ],
    };
    let loads: Vec<f64> = match std::env::var("LOADS") {
        Ok(list) => list
            .split(',')
            .map(|l| l.parse().expect("LOADS: fractions such as 0.7,0.9"))
            .collect(),
        Err(_) => vec![0.7, 0.9],
    };
    println!(
        "\nCapacity with every call missing the cache: {:.0} calls/s; {seconds} s a run\n",
        capacity()
    );
    println!("| load | policy | TTFT p50 ms | TTFT p99 ms | tokens/s | cache hits | busiest / mean | running per backend (time-averaged) | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &load in &loads {
        let mut p99 = std::collections::BTreeMap::new();
        for &policy in &policies {
            let row = run(policy, load, seconds).await;
            let spread: Vec<String> = row.per_backend.iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "| {:.0}% | {} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.2} | {} | {} |",
                load * 100.0,
                policy.as_str(),
                row.p50,
                row.p99,
                row.tokens_per_s,
                row.hits * 100.0,
                row.max_over_mean,
                spread.join(" / "),
                row.errors
            );
            p99.insert(policy.as_str(), row.p99);
        }
        if let (Some(a), Some(g)) = (p99.get("prefix_affinity"), p99.get("gpu_aware")) {
            println!(
                "|  | **prefix_affinity TTFT p99 / gpu_aware's** | | **{:.2}** | | | | | |",
                a / g
            );
        }
    }
}
