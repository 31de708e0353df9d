//! End-to-end recovery features that a model opts into: hedging (a second copy to
//! another backend after a delay; the first answer wins and the other is cancelled) and
//! degradation to a fallback model, marked in a response header.

use crate::common::*;
use infergate::config::ModelConfig;
use infergate_sim::SimConfig;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_to_another_backend_wins_over_a_slow_one_and_the_loser_is_cancelled() {
    let slow = sim("slow", |c: &mut SimConfig| c.latency_ms = 2000.0);
    let fast = sim("fast", |c: &mut SimConfig| c.latency_ms = 1.0);
    let mut cfg = config(&[slow.addr(), fast.addr()]);
    cfg.balancer.policy = infergate::config::PolicyKind::RoundRobin;
    cfg.models.insert(
        "simple".into(),
        ModelConfig {
            hedge: Some(infergate::config::HedgeConfig {
                enabled: true,
                delay_ms: Some(50),
                delay_percentile: None,
                max_hedges: 1,
            }),
            ..ModelConfig::default()
        },
    );
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let mut hedged = 0;
    for i in 0..6 {
        let began = Instant::now();
        let response = c
            .model_infer(simple_request(&format!("h{i}"), 1))
            .await
            .expect("answered");
        let took = began.elapsed();
        assert!(
            took < Duration::from_millis(1000),
            "never waits for the slow backend: {took:?}"
        );
        let by = response
            .metadata()
            .get("sim-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(
            by.as_deref(),
            Some("fast"),
            "the fast backend answers every call"
        );
        if took >= Duration::from_millis(50) {
            hedged += 1;
        }
    }
    assert!(
        hedged >= 2,
        "calls first sent to the slow backend were hedged: {hedged}"
    );
    eventually(
        "the losing attempts were cancelled on the slow backend",
        Duration::from_secs(5),
        || slow.control().cancelled() >= hedged,
    )
    .await;
    assert_eq!(slow.control().completed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_no_backend_left_degrades_to_its_fallback_and_says_so() {
    // `simple` on one backend; its fallback `simple_small` (the simulator's stand-in
    // smaller model) on another.
    let main = sim("main", |c: &mut SimConfig| c.models = vec!["simple".into()]);
    let small = sim("small", |c: &mut SimConfig| {
        c.models = vec!["simple_small".into()]
    });
    let mut cfg = config(&[main.addr(), small.addr()]);
    cfg.models.insert(
        "simple".into(),
        ModelConfig {
            fallback: Some("simple_small".into()),
            ..ModelConfig::default()
        },
    );
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let normal = c.model_infer(simple_request("n", 1)).await.expect("normal");
    assert!(normal.metadata().get("infergate-fallback").is_none());
    assert_eq!(main.control().per_model_started("simple"), 1);

    main.control().set_ready(false);
    let e = gw
        .pool()
        .endpoint(&main.addr().to_string())
        .expect("endpoint");
    eventually("the main backend is out", Duration::from_secs(5), || {
        !e.is_eligible()
    })
    .await;
    let degraded = c
        .model_infer(simple_request("d", 1))
        .await
        .expect("served by the fallback")
        .into_parts();
    assert_eq!(
        degraded
            .0
            .get("infergate-fallback")
            .and_then(|v| v.to_str().ok()),
        Some("simple_small"),
        "the caller is told"
    );
    assert_eq!(
        degraded.1.model_name, "simple_small",
        "the request was renamed on its way"
    );
    assert_eq!(small.control().per_model_started("simple_small"), 1);
    assert_eq!(
        main.control().per_model_started("simple"),
        1,
        "nothing more reached the main backend"
    );

    // Without a fallback the same situation fails fast and says why.
    small.control().set_ready(false);
    let es = gw
        .pool()
        .endpoint(&small.addr().to_string())
        .expect("endpoint");
    eventually(
        "the fallback backend is out too",
        Duration::from_secs(5),
        || !es.is_eligible(),
    )
    .await;
    let status = c
        .model_infer(simple_request("x", 1))
        .await
        .expect_err("nothing left");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("fallback model 'simple_small'"),
        "{}",
        status.message()
    );
}
