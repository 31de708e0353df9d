//! Response cache figures, in one run: cache-hit rps against forwarded rps (the same
//! `simple` call, the same client, the same box), and the backend calls saved by
//! coalescing when 10 and 100 identical calls arrive at once.
//!
//! ```text
//! cargo run --release -p infergate --example cache_figures          # 3 s a run
//! cargo run --release -p infergate --example cache_figures -- 5     # 5 s a run
//! ```
//!
//! Throughput: one simulated backend with no service time (256 slots), two gateways in
//! front of it, one without a cache and one with `[models.simple] cache`; 32 calls in
//! flight on one HTTP/2 connection, for the run's seconds, first through the gateway
//! without a cache (forwarded), then through the one with it (every call after the
//! first a hit), twice each, alternating. Coalescing: a backend that takes 100 ms a
//! call; each round fires N identical calls at once (a new input each round), and the
//! backend counts the calls it received. Everything listens on 127.0.0.1; every run is
//! bounded in time and each call has a 10 s timeout.

use infergate::config::{BackendConfig, CacheConfig, Config, ModelConfig};
use infergate::server::{self, GatewayHandle};
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::ModelInferRequest;
use infergate_sim::{self as sim, SimConfig, SimHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

const IN_FLIGHT: usize = 32;
const ROUNDS: i32 = 5;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn backend(latency_ms: f64) -> SimHandle {
    sim::spawn(SimConfig {
        listen: loopback(),
        metrics_listen: None,
        name: "bench".into(),
        latency_ms,
        slots: 256,
        orca_per_call: false,
        orca_oob: false,
        ..SimConfig::default()
    })
    .expect("the simulated backend starts")
}

async fn gateway(backend: SocketAddr, cache: bool) -> GatewayHandle {
    let mut config = Config {
        listen: loopback(),
        metrics_listen: loopback(),
        admin_listen: loopback(),
        ..Config::default()
    };
    config.shutdown_drain_ms = 0;
    config.backends = vec![BackendConfig::new(backend.to_string())];
    if cache {
        config.models.insert(
            "simple".into(),
            ModelConfig {
                cache: Some(CacheConfig {
                    ttl_ms: 600_000,
                    ..CacheConfig::default()
                }),
                ..ModelConfig::default()
            },
        );
    }
    server::start(config, "bench")
        .await
        .expect("the gateway starts")
}

async fn client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    GrpcInferenceServiceClient::new(channel)
}

#[path = "../../tests/common/mod.rs"]
mod common;

fn request(id: String, b: i32) -> ModelInferRequest {
    common::simple_request(&id, b)
}

/// Calls per second through `addr` with [`IN_FLIGHT`] calls in flight for `seconds`.
async fn rps(addr: SocketAddr, seconds: u64) -> f64 {
    let c = client(addr).await;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let (mut c, done) = (c.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    let mut r = tonic::Request::new(request(format!("w{w}-{i}"), 1));
                    r.set_timeout(Duration::from_secs(10));
                    if c.model_infer(r).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Backend calls made for `callers` identical calls fired at once, over [`ROUNDS`].
async fn coalesced(gw: &GatewayHandle, sim: &SimHandle, callers: usize) -> (u64, u64) {
    let c = client(gw.addr()).await;
    let mut backend_calls = 0;
    let mut answered = 0;
    for round in 0..ROUNDS {
        let before = sim.control().started();
        let b = round + 1000 * callers as i32;
        let calls: Vec<_> = (0..callers)
            .map(|i| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    let mut r = tonic::Request::new(request(format!("c{i}"), b));
                    r.set_timeout(Duration::from_secs(10));
                    c.model_infer(r)
                        .await
                        .is_ok_and(|a| a.into_inner().id == format!("c{i}"))
                })
            })
            .collect();
        for call in calls {
            if call.await.unwrap_or(false) {
                answered += 1;
            }
        }
        backend_calls += sim.control().started() - before;
    }
    (backend_calls, answered)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let fast = backend(0.0);
    let plain = gateway(fast.addr(), false).await;
    let cached = gateway(fast.addr(), true).await;
    // Warm both: connections made, the cache holds the answer.
    rps(plain.addr(), 1).await;
    rps(cached.addr(), 1).await;
    println!("# cache-hit rps against forwarded rps ({IN_FLIGHT} in flight, {seconds} s a run)");
    let mut ratios = Vec::new();
    for run in 1..=2 {
        let forwarded = rps(plain.addr(), seconds).await;
        let hits = rps(cached.addr(), seconds).await;
        ratios.push(hits / forwarded);
        println!(
            "run {run}: forwarded {forwarded:.0} rps, cache hits {hits:.0} rps, {:.2}x",
            hits / forwarded
        );
    }
    let stats = cached.gateway().cache.stats();
    if let Some(s) = stats.first() {
        println!(
            "cache: {} hits, {} misses (the backend saw {} calls in all)",
            s.hits_l1,
            s.misses,
            fast.control().started()
        );
    }

    let slow = backend(100.0);
    let coalescing = gateway(slow.addr(), true).await;
    println!("# coalescing: identical calls fired at once, 100 ms backend, {ROUNDS} rounds");
    for callers in [10usize, 100] {
        let (backend_calls, answered) = coalesced(&coalescing, &slow, callers).await;
        let offered = callers as u64 * ROUNDS as u64;
        println!(
            "{callers} callers: {offered} calls, {answered} answered with their own id, {backend_calls} backend calls, {} saved ({:.1}%)",
            offered - backend_calls,
            100.0 * (offered - backend_calls) as f64 / offered as f64
        );
    }
    for gw in [plain, cached, coalescing] {
        gw.shutdown(Duration::ZERO).await;
    }
}
