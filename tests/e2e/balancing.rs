//! End-to-end load-aware balancing: three simulated backends, one of them busy with
//! work the gateway cannot see (hidden load), which it reports through exactly one of
//! the load-report paths per test. With gpu_aware the busy one must get visibly less
//! traffic; without any report the policy falls back to least-request.

use crate::common::*;
use infergate::config::{Config, PolicyKind};
use infergate::load::Source;
use infergate_sim::{SimConfig, SimHandle};
use std::time::Duration;

/// How each simulator reports load.
#[derive(Clone, Copy)]
enum Path {
    PerCall,
    OutOfBand,
    Prometheus,
    Nothing,
}

fn sims(path: Path) -> Vec<SimHandle> {
    (0..3)
        .map(|i| {
            sim(&format!("gpu-{i}"), |c: &mut SimConfig| {
                c.slots = 4;
                c.latency_ms = 12.0;
                c.seed = 1 + i as u64;
                // gpu-0 has 3 of its 4 slots taken by work nobody routes through us.
                c.hidden_load = if i == 0 { 0.75 } else { 0.0 };
                c.orca_per_call = matches!(path, Path::PerCall);
                c.orca_oob = matches!(path, Path::OutOfBand);
            })
        })
        .collect()
}

fn gateway_config(sims: &[SimHandle], path: Path, policy: PolicyKind) -> Config {
    let mut cfg = config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>());
    cfg.balancer.policy = policy;
    cfg.load.oob = matches!(path, Path::OutOfBand);
    cfg.load.oob_interval_ms = 20;
    cfg.load.scrape_interval_ms = 20;
    if matches!(path, Path::Prometheus) {
        for (backend, sim) in cfg.backends.iter_mut().zip(sims) {
            backend.metrics_address = sim.metrics_addr().map(|a| a.to_string());
        }
    }
    cfg
}

/// Runs `workers` closed-loop callers of `calls` each; returns calls per backend.
async fn drive(
    gw: &infergate::server::GatewayHandle,
    sims: &[SimHandle],
    workers: usize,
    calls: usize,
) -> Vec<u64> {
    let c = client(gw.addr()).await;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let mut c = c.clone();
            tokio::spawn(async move {
                for i in 0..calls {
                    c.model_infer(simple_request(&format!("{w}-{i}"), 1))
                        .await
                        .expect("infer");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    sims.iter()
        .map(|s| s.control().per_model_started("simple"))
        .collect()
}

async fn busy_backend_gets_less(path: Path) {
    let sims = sims(path);
    let gw = gateway(gateway_config(&sims, path, PolicyKind::GpuAware)).await;
    // Wait until every backend has a report from the path under test.
    let expected = match path {
        Path::OutOfBand => Source::OrcaOob,
        Path::Prometheus => Source::Prometheus,
        _ => Source::OrcaPerCall,
    };
    if !matches!(path, Path::PerCall) {
        eventually(
            "a report from every backend",
            Duration::from_secs(5),
            || {
                gw.pool().endpoints().iter().all(|e| {
                    e.load()
                        .read(tokio::time::Instant::now())
                        .is_some_and(|r| r.source == expected)
                })
            },
        )
        .await;
    }
    // A first round lets the gateway learn each backend's service time and per-call
    // share (until then every backend is compared by in-flight calls alone); the
    // second round is what the reports steer.
    let learned = drive(&gw, &sims, 6, 30).await;
    let total = drive(&gw, &sims, 6, 60).await;
    let counts: Vec<u64> = total.iter().zip(&learned).map(|(t, l)| t - l).collect();
    let others = (counts[1] + counts[2]) as f64 / 2.0;
    println!("calls per backend (gpu-0 busy), after {learned:?} to learn: {counts:?}");
    let now = tokio::time::Instant::now();
    for e in gw.pool().endpoints() {
        println!(
            "  {}: reading {:?}, per call {:?}, service time {:?} ms",
            e.address(),
            e.load().read(now),
            e.per_call_utilization(),
            e.service_time_ms(now, std::time::Duration::from_secs(3)),
        );
    }
    assert!(
        (counts[0] as f64) < others * 0.5,
        "the busy backend should get well under half of its peers' share: {counts:?}"
    );
    for e in gw.pool().endpoints() {
        let reading = e.load().read(tokio::time::Instant::now()).expect("reading");
        assert_eq!(reading.source, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_orca_trailers_steer_traffic() {
    busy_backend_gets_less(Path::PerCall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_band_orca_alone_steers_traffic() {
    busy_backend_gets_less(Path::OutOfBand).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrape_alone_steers_traffic() {
    busy_backend_gets_less(Path::Prometheus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reports_gpu_aware_is_least_request() {
    let sims = sims(Path::Nothing);
    let gw = gateway(gateway_config(&sims, Path::Nothing, PolicyKind::GpuAware)).await;
    let counts = drive(&gw, &sims, 6, 40).await;
    println!("calls per backend, no reports: {counts:?}");
    let params = infergate::balance::PolicyParams::default();
    let now = tokio::time::Instant::now();
    for e in gw.pool().endpoints() {
        assert!(e.load().read(now).is_none(), "no report arrived");
        // No expected latency: every comparison falls back to least_request's score.
        assert_eq!(
            infergate::balance::expected_latency_ms(&e, now, &params),
            None
        );
    }
    // Least request still shifts some load off the slower backend, by its in-flight count.
    assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_that_stop_go_stale() {
    let sims = sims(Path::PerCall);
    let mut cfg = gateway_config(&sims, Path::PerCall, PolicyKind::GpuAware);
    cfg.load.stale_after_ms = 150;
    let gw = gateway(cfg).await;
    drive(&gw, &sims, 3, 10).await;
    let busy = gw.pool().endpoints()[0].clone();
    let stale_after = Duration::from_millis(150);
    assert!(busy
        .load()
        .fresh(tokio::time::Instant::now(), stale_after)
        .is_some());
    // No more traffic, so no more trailers: the reading ages out and stops counting.
    eventually("the reading goes stale", Duration::from_secs(5), || {
        busy.load()
            .fresh(tokio::time::Instant::now(), stale_after)
            .is_none()
    })
    .await;
}

/// A backend's per-call load report is the gateway's to read: it steers the next pick,
/// and the caller, who would learn from it how busy other tenants keep its backend,
/// never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_load_reports_stay_at_the_gateway() {
    let sims = sims(Path::PerCall);
    let gw = gateway(gateway_config(&sims, Path::PerCall, PolicyKind::GpuAware)).await;
    // (whom to call, whether the answer carries the report): the sim itself sends one
    // on every answer; through the gateway, none arrives.
    let paths = [(sims[1].addr(), true), (gw.addr(), false)];
    for (addr, carries) in paths {
        let mut c = client(addr).await;
        for i in 0..3 {
            let request = simple_request(&format!("{addr}-{i}"), 1);
            let metadata = c.model_infer(request).await.expect("a call").into_parts().0;
            assert_eq!(
                metadata.get_bin("endpoint-load-metrics-bin").is_some(),
                carries,
                "calling {addr} (the gateway is {}): {metadata:?}",
                gw.addr()
            );
        }
    }
    let now = tokio::time::Instant::now();
    let read = gw
        .pool()
        .endpoints()
        .iter()
        .filter(|e| {
            e.load()
                .read(now)
                .is_some_and(|r| r.source == Source::OrcaPerCall)
        })
        .count();
    assert!(read > 0, "the gateway read no per-call report");
}
