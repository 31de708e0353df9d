//! `infergate demo` with an OTLP collector: each simulated backend exports its spans
//! under its own `service.name` (`gpu-0`, `gpu-1`, `gpu-2`) and the gateway under its
//! own, so a trace viewer shows four services, and one call's trace spans the gateway's
//! service and the backend's that served it.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/otlp/mod.rs"]
mod otlp;

use common::{client, loopback, simple_request};
use infergate::config::Config;
use infergate::demo;
use infergate_base::trace::{self, SamplerKind, TraceConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_simulated_backend_is_its_own_service() {
    let receiver = otlp::Receiver::start().await;
    let traces = demo::init_traces(TraceConfig {
        endpoint: Some(receiver.endpoint()),
        service_name: "infergate-demo-test".into(),
        sampler: SamplerKind::AlwaysOn,
        ratio: 1.0,
    })
    .expect("tracing starts");
    assert!(traces.is_active());
    let config = Config {
        listen: loopback(),
        metrics_listen: loopback(),
        admin_listen: loopback(),
        shutdown_drain_ms: 0,
        ..Config::default()
    };
    let running = demo::start(config, None).await.expect("demo starts");

    // Calls until every backend has served one (the pick spreads them).
    let mut calls = client(running.gateway.addr()).await;
    let mut served = BTreeSet::new();
    for i in 0..300 {
        let response = calls
            .model_infer(simple_request(&format!("demo-{i}"), 1))
            .await
            .expect("inference answers");
        if let Some(name) = response.metadata().get("sim-name") {
            served.insert(name.to_str().expect("ascii").to_owned());
        }
        if served.len() == demo::SIMS {
            break;
        }
    }
    let names: BTreeSet<String> = (0..demo::SIMS).map(demo::sim_name).collect();
    assert_eq!(served, names, "every backend served a call");

    // Every simulator span carries its simulator's service; the gateway's its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let by_service = loop {
        traces.flush().await.expect("flush");
        let mut by_service: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for span in receiver.spans() {
            let who = match (span.scope == trace::SIM_SCOPE, span.attr("infergate.sim")) {
                // A simulator's SERVER span records which simulator made it.
                (true, Some(sim)) => sim.to_owned(),
                // Its queue and execute children are checked against their parent below.
                (true, None) => continue,
                (false, _) => span.scope.clone(),
            };
            by_service
                .entry(span.service.clone())
                .or_default()
                .insert(who);
        }
        if names.iter().all(|n| by_service.contains_key(n)) {
            break by_service;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; services so far: {by_service:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for name in &names {
        let makers: BTreeSet<String> = [name.clone()].into();
        assert_eq!(by_service[name], makers, "{name}: {by_service:?}");
    }
    assert_eq!(
        by_service["infergate-demo-test"],
        [trace::GATEWAY_SCOPE.to_owned()].into(),
        "{by_service:?}"
    );
    assert_eq!(by_service.len(), demo::SIMS + 1, "{by_service:?}");

    // A simulator's child spans (queue, execute) are in their parent's service.
    let spans = receiver.spans();
    let service_of: BTreeMap<&str, &str> = spans
        .iter()
        .map(|s| (s.span_id.as_str(), s.service.as_str()))
        .collect();
    let mut children = 0;
    for span in spans.iter().filter(|s| s.scope == trace::SIM_SCOPE) {
        if span.attr("infergate.sim").is_none() {
            if let Some(parent) = service_of.get(span.parent_span_id.as_str()) {
                assert_eq!(*parent, span.service, "{span:?}");
                children += 1;
            }
        }
    }
    assert!(children >= demo::SIMS, "{children} child spans checked");

    // One call's trace crosses from the gateway's service into a backend's.
    let sim_span = spans
        .iter()
        .find(|s| s.scope == trace::SIM_SCOPE)
        .expect("a simulator span");
    let services: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == sim_span.trace_id)
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(
        services,
        ["infergate-demo-test", sim_span.service.as_str()].into(),
    );

    running.gateway.shutdown(Duration::from_secs(1)).await;
    drop(running.sims);
    traces.shutdown().await.expect("tracing stops");
    assert!(!trace::enabled());
}
