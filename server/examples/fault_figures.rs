//! Fault figures: time to eject and time to readmit a backend, and the share of calls
//! that failed meanwhile, for a killed, a hung and an erroring backend under steady
//! open-loop load. Three simulated backends and one gateway with its default settings,
//! except the per-try timeout (500 ms), which a hang needs to be detected at all.
//!
//! ```text
//! cargo run --release -p infergate --example fault_figures
//! ```
//!
//! Each scenario: 2 s of load, the fault, a wait until the backend is out of rotation,
//! 3 s more, the fault healed, a wait until it is back, 1 s more. Bounded in time and
//! count; everything on 127.0.0.1.

use infergate::config::{BackendConfig, Config};
use infergate_client::bench::{self, BenchConfig};
use infergate_sim::{self as sim, SimConfig, SimHandle};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

const RATE: f64 = 300.0;

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Hang,
    Errors(f64),
}

fn sim_at(listen: SocketAddr, name: &str) -> SimHandle {
    sim::spawn(SimConfig {
        listen,
        name: name.into(),
        slots: 8,
        latency_ms: 5.0,
        ..SimConfig::default()
    })
    .expect("simulated backend")
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let began = Instant::now();
    while began.elapsed() < limit {
        if f() {
            return Some(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

async fn scenario(fault: Fault) -> String {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut sims: Vec<Option<SimHandle>> = (0..3)
        .map(|i| Some(sim_at(loopback, &format!("b{i}"))))
        .collect();
    let victim_addr = sims[0].as_ref().map(|s| s.addr()).expect("victim");
    let mut config = Config {
        listen: loopback,
        metrics_listen: loopback,
        admin_listen: loopback,
        backends: sims
            .iter()
            .flatten()
            .map(|s| BackendConfig::new(s.addr().to_string()))
            .collect(),
        ..Config::default()
    };
    config.retry.per_try_timeout_ms = Some(500);
    let gw = infergate::server::start(config, "bench")
        .await
        .expect("gateway");
    let mut load = BenchConfig::new(gw.addr().to_string(), "simple");
    load.rate = Some(RATE);
    load.duration = Some(Duration::from_secs(30));
    load.count = Some((RATE * 30.0) as u64);
    load.connections = 2;
    load.timeout = Duration::from_secs(5);
    let run = tokio::spawn(bench::run(load));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let endpoint = gw
        .pool()
        .endpoint(&victim_addr.to_string())
        .expect("victim endpoint");
    match fault {
        Fault::Kill => {
            if let Some(s) = sims[0].take() {
                s.kill();
            }
        }
        Fault::Hang => sims[0]
            .as_ref()
            .map(|s| s.control().set_hang(true))
            .unwrap_or(()),
        Fault::Errors(rate) => sims[0]
            .as_ref()
            .map(|s| s.control().set_error_rate(rate))
            .unwrap_or(()),
    }
    let eject = wait_until(Duration::from_secs(10), || !endpoint.is_eligible()).await;
    let why = match endpoint.availability("simple", Instant::now(), false) {
        Err(infergate::endpoint::Unavailable::Ejected) => format!(
            "outlier ejection: {}",
            gw.pool()
                .ejection_reason(&victim_addr.to_string())
                .unwrap_or_default()
        ),
        Err(other) => other.describe().to_owned(),
        Ok(()) => "not detected".to_owned(),
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    match fault {
        Fault::Kill => sims[0] = Some(sim_at(victim_addr, "b0")),
        Fault::Hang => sims[0]
            .as_ref()
            .map(|s| s.control().set_hang(false))
            .unwrap_or(()),
        Fault::Errors(_) => sims[0]
            .as_ref()
            .map(|s| s.control().set_error_rate(0.0))
            .unwrap_or(()),
    }
    let readmit = wait_until(Duration::from_secs(60), || endpoint.is_eligible()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.abort();
    let stats = gw
        .pool()
        .endpoints()
        .iter()
        .map(|e| (e.requests_total(), e.failures_total()))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    gw.shutdown(Duration::from_secs(1)).await;
    let ms = |d: Option<Duration>| {
        d.map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "not within the limit".into())
    };
    format!(
        "| {fault:?} | {} | {} | {} attempts, {} failed attempts ({:.2}%) | {} |",
        ms(eject),
        ms(readmit),
        stats.0,
        stats.1,
        100.0 * stats.1 as f64 / stats.0.max(1) as f64,
        why
    )
}

#[tokio::main]
async fn main() {
    println!("load: {RATE} calls/s open loop over 3 backends (8 slots, 5 ms); gateway defaults, per-try timeout 500 ms\n");
    println!("| fault | time to eject | time to readmit | backend attempts during the run | detected by |");
    println!("|---|---|---|---|---|");
    for fault in [
        Fault::Kill,
        Fault::Hang,
        Fault::Errors(1.0),
        Fault::Errors(0.3),
    ] {
        println!("{}", scenario(fault).await);
    }
}
