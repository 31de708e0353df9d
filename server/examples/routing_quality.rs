//! Routing quality: simulated backends and gateways started in-process, an open-loop
//! arrival rate from `infergate-client`'s load generator, and for each scenario, policy
//! and load level: p50, p99, p99.9 latency, goodput and the share of calls per backend.
//!
//! ```text
//! cargo run --release -p infergate --example routing_quality            # all scenarios, 6 s a run
//! cargo run --release -p infergate --example routing_quality -- 3 10    # scenario 3 only, 10 s a run
//! CHOICES=0 OOB_MS=10 cargo run --release -p infergate --example routing_quality -- 3
//! ```
//!
//! `CHOICES` sets `balancer.choice_count` (0 compares every backend instead of two at
//! random); `SPREAD` sets `balancer.spread`; `OOB_MS` sets the ORCA out-of-band report
//! interval the gateways ask for; `POLICIES` (comma separated) runs only those
//! policies; `POISSON=1` sends calls at random (Poisson, seeded) instead of at fixed
//! intervals; `LOADS` (comma separated fractions of capacity) replaces the default
//! 0.7,0.9; `CAPACITY=1` configures each backend's slot count (`backends[].capacity`)
//! instead of letting the gateways learn the per-call share; `RUNNING=0` makes the
//! gateways ignore the running-calls count the simulators report
//! (`load.running_field = ""`), so they learn the per-call share from their own calls
//! alone; `DETAIL=1` prints what each gateway learned of each backend (service-time
//! floor / per-call share / its own share of the backend's calls) and how many calls each backend made wait for a slot;
//! `SERVICE_MS` changes the 20 ms service time (rates follow).
//!
//! Scenarios (backends: 4 slots, 20 ms a call = 200 calls/s each):
//! 1. heterogeneous: four backends, one three times slower (60 ms);
//! 2. hidden load: four equal backends, one with half its slots taken by work the
//!    gateway cannot see (it reports the utilization, and is slower);
//! 3. several gateways: three gateway replicas, each with a third of the clients, in
//!    front of four backends of which one carries hidden load, so that each replica's
//!    own in-flight count sees only part of what every backend is doing.
//!
//! Load levels are 70% and 90% of the pool's real capacity. Every run is bounded in time
//! and count; everything listens on 127.0.0.1.

use hdrhistogram::Histogram;
use infergate::config::{BackendConfig, Config, PolicyKind};
use infergate::server::{self, GatewayHandle};
use infergate_client::bench::{self, BenchConfig, BenchReport};
use infergate_sim::{self as sim, SimConfig, SimHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

const SLOTS: usize = 4;
/// Service time of a call on the fast backends (`SERVICE_MS` overrides the default 20).
fn base_ms() -> f64 {
    std::env::var("SERVICE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(20.0)
}

struct Scenario {
    id: u32,
    name: &'static str,
    /// (latency_ms, hidden_load) per backend.
    backends: Vec<(f64, f64)>,
    gateways: usize,
}

impl Scenario {
    fn capacity(&self) -> f64 {
        self.backends
            .iter()
            .map(|(ms, hidden)| {
                let usable = ((SLOTS as f64) * (1.0 - hidden)).round().max(1.0);
                usable * 1000.0 / ms
            })
            .sum()
    }
}

fn scenarios() -> Vec<Scenario> {
    let base = base_ms();
    vec![
        Scenario {
            id: 1,
            name: "heterogeneous (one backend 3x slower)",
            backends: vec![(base, 0.0), (base, 0.0), (base, 0.0), (base * 3.0, 0.0)],
            gateways: 1,
        },
        Scenario {
            id: 2,
            name: "hidden load (one backend half taken by invisible work)",
            backends: vec![(base, 0.0), (base, 0.0), (base, 0.0), (base, 0.5)],
            gateways: 1,
        },
        Scenario {
            id: 3,
            name: "three gateway replicas, one backend with hidden load",
            backends: vec![(base, 0.0), (base, 0.0), (base, 0.0), (base, 0.5)],
            gateways: 3,
        },
    ]
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn start(s: &Scenario, policy: PolicyKind) -> (Vec<SimHandle>, Vec<GatewayHandle>) {
    let sims: Vec<SimHandle> = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, (ms, hidden))| {
            sim::spawn(SimConfig {
                listen: loopback(),
                metrics_listen: None,
                name: format!("b{i}"),
                slots: SLOTS,
                latency_ms: *ms,
                hidden_load: *hidden,
                seed: 1 + i as u64,
                ..SimConfig::default()
            })
            .expect("simulated backend")
        })
        .collect();
    let mut gateways = Vec::new();
    for _ in 0..s.gateways {
        let config = Config {
            listen: loopback(),
            metrics_listen: loopback(),
            admin_listen: loopback(),
            backends: sims
                .iter()
                .map(|x| BackendConfig {
                    // CAPACITY=1 tells the gateways each backend's slot count instead
                    // of letting them learn the per-call share from the reports.
                    capacity: std::env::var_os("CAPACITY").map(|_| SLOTS as u32),
                    ..BackendConfig::new(x.addr().to_string())
                })
                .collect(),
            balancer: infergate::config::BalancerConfig {
                policy,
                // CHOICES=0 compares every backend instead of two random ones.
                choice_count: std::env::var("CHOICES")
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(2),
                spread: std::env::var("SPREAD")
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(infergate::config::BalancerConfig::default().spread),
                ..Default::default()
            },
            ..Config::default()
        };
        let mut config = config;
        if let Some(ms) = std::env::var("OOB_MS").ok().and_then(|v| v.parse().ok()) {
            config.load.oob_interval_ms = ms;
        }
        if std::env::var("RUNNING").is_ok_and(|v| v == "0") {
            config.load.running_field.clear();
        }
        gateways.push(server::start(config, "bench").await.expect("gateway"));
    }
    (sims, gateways)
}

struct Row {
    p50: f64,
    p99: f64,
    p999: f64,
    goodput: f64,
    errors: u64,
    share: BTreeMap<String, u64>,
}

async fn run(s: &Scenario, policy: PolicyKind, rate: f64, seconds: f64) -> Row {
    let (sims, gateways) = start(s, policy).await;
    let per_gateway = rate / gateways.len() as f64;
    let runs = gateways.iter().enumerate().map(|(i, g)| {
        let mut cfg = BenchConfig::new(g.addr().to_string(), "simple");
        cfg.rate = Some(per_gateway);
        cfg.duration = Some(Duration::from_secs_f64(seconds));
        cfg.count = Some((per_gateway * seconds).ceil() as u64);
        cfg.max_in_flight = 4096;
        cfg.connections = 4;
        cfg.timeout = Duration::from_secs(5);
        cfg.seed = 100 + i as u64;
        cfg.poisson = std::env::var_os("POISSON").is_some();
        // Replicas take turns (phases 0, 1/3, 2/3 of an interval): together they send
        // one evenly spaced stream at the pool's rate, as the clients of a real pool do
        // not all call at the same instants (and as scripts/routing_bound.py models).
        cfg.phase = i as f64 / gateways.len() as f64;
        bench::run(cfg)
    });
    let reports: Vec<BenchReport> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("bench run"))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut share = BTreeMap::new();
    let (mut ok, mut errors, mut elapsed) = (0u64, 0u64, 0f64);
    for r in &reports {
        if let Some(h) = &r.histogram {
            hist.add(h).expect("same bounds");
        }
        for (backend, n) in &r.per_backend {
            *share.entry(backend.clone()).or_insert(0) += n;
        }
        ok += r.ok;
        errors += r.errors;
        elapsed = elapsed.max(r.elapsed_s);
    }
    if std::env::var_os("DETAIL").is_some() {
        // What each gateway learned of each backend: service-time floor, per-call share
        // and its own share of the backend's calls.
        for (i, g) in gateways.iter().enumerate() {
            let learned: Vec<String> = g
                .pool()
                .endpoints()
                .iter()
                .map(|e| {
                    format!(
                        "{:.1}ms/{:.3}/{:.2}",
                        e.latency_floor_ms().unwrap_or(0.0),
                        e.per_call_utilization().unwrap_or(0.0),
                        e.load().own_share().unwrap_or(0.0)
                    )
                })
                .collect();
            println!("<!-- gateway {i}: {} -->", learned.join(" "));
        }
        let waited: Vec<String> = sims
            .iter()
            .map(|x| {
                let c = x.control();
                format!("{}/{}", c.waited(), c.started())
            })
            .collect();
        println!(
            "<!-- calls that waited for a slot, per backend: {} -->",
            waited.join(" ")
        );
    }
    for g in gateways {
        g.shutdown(Duration::from_secs(1)).await;
    }
    drop(sims);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Row {
        p50: ms(0.5),
        p99: ms(0.99),
        p999: ms(0.999),
        goodput: ok as f64 / elapsed.max(1e-9),
        errors,
        share,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only: Option<u32> = args.first().and_then(|a| a.parse().ok());
    let seconds: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(6.0);
    let policies = [
        PolicyKind::RoundRobin,
        PolicyKind::LeastRequest,
        PolicyKind::GpuAware,
    ];
    let policies: Vec<PolicyKind> = match std::env::var("POLICIES") {
        Ok(list) => list
            .split(',')
            .map(|p| {
                p.parse()
                    .expect("POLICIES: round_robin, least_request, gpu_aware")
            })
            .collect(),
        Err(_) => policies.to_vec(),
    };
    // LOADS (comma separated fractions of capacity) replaces the default 70% and 90%.
    let loads: Vec<f64> = match std::env::var("LOADS") {
        Ok(list) => list
            .split(',')
            .map(|l| l.parse().expect("LOADS: fractions such as 0.7,0.9"))
            .collect(),
        Err(_) => vec![0.7, 0.9],
    };
    for s in scenarios()
        .into_iter()
        .filter(|s| only.is_none_or(|o| o == s.id))
    {
        println!(
            "\n### Scenario {}: {} — capacity {:.0} calls/s\n",
            s.id,
            s.name,
            s.capacity()
        );
        println!("| load | policy | p50 ms | p99 ms | p99.9 ms | goodput/s | errors | calls per backend |");
        println!("|---|---|---|---|---|---|---|---|");
        for &load in &loads {
            let mut p99 = BTreeMap::new();
            for &policy in &policies {
                let row = run(&s, policy, s.capacity() * load, seconds).await;
                let total: u64 = row.share.values().sum();
                let share: Vec<String> = row
                    .share
                    .iter()
                    .map(|(b, n)| format!("{b} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
                    .collect();
                println!(
                    "| {:.0}% | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} |",
                    load * 100.0,
                    policy.as_str(),
                    row.p50,
                    row.p99,
                    row.p999,
                    row.goodput,
                    row.errors,
                    share.join(", ")
                );
                p99.insert(policy.as_str(), row.p99);
            }
            if let (Some(g), Some(l)) = (p99.get("gpu_aware"), p99.get("least_request")) {
                println!(
                    "|  | **gpu_aware p99 / least_request p99** | **{:.2}** | | | | | |",
                    g / l
                );
            }
        }
    }
}
