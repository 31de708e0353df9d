//! Cost of one pick: the balancing policies over pools of 4, 64 and 1024 ready
//! backends, in nanoseconds per pick, with the full scan as the baseline measured in
//! the same run. Power of two choices stays flat as the pool grows; a scan does not.
//!
//! ```text
//! cargo run --release -p infergate --example pick_cost
//! ```

use infergate::balance::{Policy, PolicyParams};
use infergate::config::PolicyKind;
use infergate::endpoint::{Endpoint, Health};
use infergate::load::{Load, Source};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn pool(n: usize) -> Vec<Arc<Endpoint>> {
    let now = tokio::time::Instant::now();
    (0..n)
        .map(|i| {
            let e = Endpoint::new(
                &format!("10.0.{}.{}:8001", i / 250, i % 250),
                "bench",
                vec![],
                1,
            )
            .expect("endpoint");
            e.set_health(Health::Ready);
            // A service time and a learned per-call share, so gpu_aware computes its
            // full expected-latency score rather than falling back to least_request.
            for _ in 0..Endpoint::SERVICE_TIME_MIN_SAMPLES {
                e.observe_latency(std::time::Duration::from_millis(20 + (i % 7) as u64));
            }
            for own in (0..32).map(|n| n % 3) {
                let utilization = 0.25 * own as f64;
                let load = Load {
                    utilization,
                    queue_depth: 0.0,
                    running: None,
                };
                e.load()
                    .store_observed(load, Source::OrcaPerCall, now, Some(own));
            }
            assert!(e.per_call_utilization().is_some(), "per-call share learned");
            e.load().store(
                (i % 10) as f64 / 10.0,
                (i % 3) as f64,
                Source::OrcaPerCall,
                now,
            );
            e
        })
        .collect()
}

fn ns_per_pick(policy: &Policy, endpoints: &[Arc<Endpoint>], picks: u32) -> f64 {
    let mut rng = fastrand::Rng::with_seed(7);
    let eligible = |e: &Endpoint| e.is_eligible();
    let began = Instant::now();
    for _ in 0..picks {
        black_box(policy.pick_with(endpoints, &eligible, &mut rng));
    }
    began.elapsed().as_nanos() as f64 / f64::from(picks)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let scan = PolicyParams {
        choice_count: 0,
        ..PolicyParams::default()
    };
    println!("| backends | least_request P2C | gpu_aware P2C | round_robin | least_request full scan | gpu_aware full scan |");
    println!("|---|---|---|---|---|---|");
    for n in [4usize, 64, 1024] {
        let endpoints = pool(n);
        let picks = 200_000;
        let cell = |kind, params: &PolicyParams| {
            format!(
                "{:.0} ns",
                ns_per_pick(&Policy::new(kind, params.clone()), &endpoints, picks)
            )
        };
        let p2c = PolicyParams::default();
        println!(
            "| {n} | {} | {} | {} | {} | {} |",
            cell(PolicyKind::LeastRequest, &p2c),
            cell(PolicyKind::GpuAware, &p2c),
            cell(PolicyKind::RoundRobin, &p2c),
            cell(PolicyKind::LeastRequest, &scan),
            cell(PolicyKind::GpuAware, &scan),
        );
    }
}
