//! End-to-end prompt-prefix affinity: four simulated LLM backends behind one gateway
//! whose `tiny_llm` uses `prefix_affinity`. A prompt prefix keeps its backend (and so
//! hits that backend's prefix cache) while the backend is under its load bound, and
//! moves to the next backend on the ring when it is not.

use crate::common::*;
use infergate::config::{ModelConfig, PolicyKind, PrefixConfig};
use infergate_client::generate_request;
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::ModelStreamInferResponse;
use infergate_sim::{SimConfig, SimHandle};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Streaming;

/// The prefix the gateway and the sims key on: the first 16 bytes.
const KEY_BYTES: usize = 16;

async fn setup() -> (Vec<SimHandle>, infergate::server::GatewayHandle) {
    let sims: Vec<SimHandle> = (0..4)
        .map(|i| {
            sim(&format!("llm-{i}"), |c: &mut SimConfig| {
                c.slots = 4;
                c.token_latency_ms = 1.0;
                c.prefix_cache.bytes = KEY_BYTES;
            })
        })
        .collect();
    let mut cfg = config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>());
    cfg.models.insert(
        "tiny_llm".into(),
        ModelConfig {
            decoupled: Some(true),
            policy: Some(PolicyKind::PrefixAffinity),
            prefix: Some(PrefixConfig {
                bytes: KEY_BYTES,
                ..PrefixConfig::default()
            }),
            ..ModelConfig::default()
        },
    );
    let gw = gateway(cfg).await;
    (sims, gw)
}

fn started(sims: &[SimHandle]) -> Vec<u64> {
    sims.iter()
        .map(|s| s.control().per_model_started("tiny_llm"))
        .collect()
}

/// Opens a stream with one request and returns its response stream (not yet read).
async fn open(
    c: &mut GrpcInferenceServiceClient<Channel>,
    prompt: &str,
    max_tokens: u32,
) -> Streaming<ModelStreamInferResponse> {
    let request = generate_request("tiny_llm", prompt, max_tokens).expect("request");
    c.model_stream_infer(tokio_stream::iter(vec![request]))
        .await
        .expect("stream opens")
        .into_inner()
}

/// One short generation to the end; returns the index of the sim that served it.
async fn call(
    c: &mut GrpcInferenceServiceClient<Channel>,
    sims: &[SimHandle],
    prompt: &str,
) -> usize {
    let before = started(sims);
    let mut stream = open(c, prompt, 2).await;
    while let Some(msg) = stream.message().await.expect("stream message") {
        assert!(msg.error_message.is_empty(), "{}", msg.error_message);
    }
    let after = started(sims);
    let served: Vec<usize> = (0..sims.len()).filter(|i| after[*i] > before[*i]).collect();
    assert_eq!(
        served.len(),
        1,
        "one backend served it: {before:?} -> {after:?}"
    );
    served[0]
}

async fn in_flight_total(sims: &[SimHandle], want: u64, what: &str) {
    eventually(what, Duration::from_secs(5), || {
        sims.iter().map(|s| s.control().in_flight()).sum::<u64>() == want
    })
    .await;
}

#[tokio::test]
async fn a_repeated_prefix_keeps_its_backend_and_hits_its_cache() {
    let (sims, gw) = setup().await;
    let mut c = client(gw.addr()).await;
    let home = call(&mut c, &sims, "SYSTEM-PROMPT-A: user 0 asks").await;
    for i in 1..10 {
        let prompt = format!("SYSTEM-PROMPT-A: user {i} asks something else");
        assert_eq!(call(&mut c, &sims, &prompt).await, home, "call {i}");
    }
    let ctl = sims[home].control();
    assert_eq!((ctl.prefix_misses(), ctl.prefix_hits()), (1, 9));
    // Other prefixes have homes of their own, each as steady; over a dozen of them
    // more than one backend is used.
    let mut homes = std::collections::BTreeSet::new();
    for p in 0..12 {
        let first = call(&mut c, &sims, &format!("SYSTEM-PROMPT-{p:02} one")).await;
        let again = call(&mut c, &sims, &format!("SYSTEM-PROMPT-{p:02} two")).await;
        assert_eq!(first, again, "prefix {p}");
        homes.insert(first);
    }
    assert!(homes.len() > 1, "{homes:?}");
}

#[tokio::test]
async fn a_prefix_moves_when_its_backend_is_at_the_bound_and_comes_back() {
    let (sims, gw) = setup().await;
    let mut c = client(gw.addr()).await;
    let prompt = "SYSTEM-PROMPT-B: hello";
    let home = call(&mut c, &sims, prompt).await;
    // A long generation of the same prefix holds a call on home (1 of 4 backends).
    let long = open(&mut c, prompt, 100_000).await;
    in_flight_total(&sims, 1, "the long call runs").await;
    assert_eq!(sims[home].control().in_flight(), 1, "it went home");
    // Now home holds 1 and the bound with this call is ⌈1.25 × 2 / 4⌉ = 1: the next
    // backend on the ring takes it, every time.
    let moved = call(&mut c, &sims, prompt).await;
    assert_ne!(moved, home);
    assert_eq!(
        call(&mut c, &sims, prompt).await,
        moved,
        "the ring's next is steady"
    );
    // The long call ends (the client goes away): the prefix goes home again.
    drop(long);
    in_flight_total(&sims, 0, "the long call is cancelled").await;
    assert_eq!(call(&mut c, &sims, prompt).await, home);
}

#[tokio::test]
async fn many_calls_of_one_prefix_stay_within_the_bound() {
    let (sims, gw) = setup().await;
    let mut c = client(gw.addr()).await;
    let prompt = "SYSTEM-PROMPT-C: the popular one";
    let home = call(&mut c, &sims, prompt).await;
    // Eight long calls of one prefix, opened one after another: each lands where the
    // bound allows, ⌈1.25 × n / 4⌉ for the n-th, so at most 3 on any backend.
    let mut held = Vec::new();
    for n in 1..=8u64 {
        held.push(open(&mut c, prompt, 100_000).await);
        in_flight_total(&sims, n, "the long call runs").await;
        let bound = (1.25 * n as f64 / 4.0).ceil() as u64;
        for (i, s) in sims.iter().enumerate() {
            let held_here = s.control().in_flight();
            assert!(
                held_here <= bound,
                "call {n}: sim {i} holds {held_here} > {bound}"
            );
        }
    }
    assert_eq!(
        sims[home].control().in_flight(),
        3,
        "home is filled to the bound"
    );
    drop(held);
    in_flight_total(&sims, 0, "the long calls are cancelled").await;
}
