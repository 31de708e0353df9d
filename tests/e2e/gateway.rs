//! End-to-end: real gateways in front of real simulated backends on loopback, called
//! with generated gRPC clients. Every RPC of the front door, unary and streaming, the
//! pass-through of metadata, and every error a caller can provoke.

use crate::common::*;
use futures_util::StreamExt;
use infergate_proto::inference::*;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

async fn pool_of_three() -> (
    Vec<infergate_sim::SimHandle>,
    infergate::server::GatewayHandle,
) {
    let sims: Vec<_> = (0..3).map(|i| sim(&format!("gpu-{i}"), |_| {})).collect();
    let gw = gateway(config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>())).await;
    (sims, gw)
}

#[tokio::test]
async fn every_unary_rpc_answers_through_the_gateway() {
    let (_sims, gw) = pool_of_three().await;
    let mut c = client(gw.addr()).await;

    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .expect("live")
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .expect("ready")
            .into_inner()
            .ready
    );
    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        c.model_ready(ready("simple"))
            .await
            .expect("model ready")
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("nobody_serves_this"))
            .await
            .expect("model ready")
            .into_inner()
            .ready
    );

    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(meta.name, "infergate");
    assert!(!meta.version.is_empty());

    let model = c
        .model_metadata(ModelMetadataRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await
        .expect("model metadata")
        .into_inner();
    assert_eq!(model.name, "simple");
    assert_eq!(model.inputs.len(), 2);
    assert_eq!(model.inputs[0].shape, vec![-1, 16]);

    let config = c
        .model_config(ModelConfigRequest {
            name: "tiny_llm".into(),
            version: String::new(),
        })
        .await
        .expect("model config")
        .into_inner()
        .config
        .expect("config");
    assert!(config.model_transaction_policy.expect("policy").decoupled);

    let stats = c
        .model_statistics(ModelStatisticsRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    assert_eq!(stats.model_stats[0].name, "simple");
    let all = c
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .expect("statistics of all models")
        .into_inner();
    assert!(all.model_stats.len() >= 3);

    let index = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .expect("index")
        .into_inner();
    let mut names: Vec<_> = index.models.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["accumulate", "identity_fp32", "simple", "tiny_llm"]);
}

#[tokio::test]
async fn model_infer_computes_through_the_gateway_raw_and_typed() {
    let (_sims, gw) = pool_of_three().await;
    let mut c = client(gw.addr()).await;
    for request in [simple_request("req-1", 1), simple_request_typed(1)] {
        let id = request.id.clone();
        let response = c.model_infer(request).await.expect("infer").into_inner();
        assert_eq!(response.id, id);
        assert_eq!(response.outputs[0].name, "OUTPUT0");
        let sum = decode_i32(&response.raw_output_contents[0]);
        let diff = decode_i32(&response.raw_output_contents[1]);
        assert_eq!(sum, (1..17).collect::<Vec<_>>());
        assert_eq!(diff, (-1..15).collect::<Vec<_>>());
    }

    // A large identity payload comes back bit for bit.
    let values: Vec<f32> = (0..(1 << 18)).map(|i| i as f32 * 0.5).collect();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let request = ModelInferRequest {
        model_name: "identity_fp32".into(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.clone()],
        ..Default::default()
    };
    let response = c.model_infer(request).await.expect("identity").into_inner();
    assert_eq!(response.raw_output_contents[0], raw);
}

#[tokio::test]
async fn calls_spread_over_the_pool_and_in_flight_returns_to_zero() {
    let (sims, gw) = pool_of_three().await;
    let c = client(gw.addr()).await;
    let calls = (0..60).map(|i| {
        let mut c = c.clone();
        async move { c.model_infer(simple_request(&format!("r{i}"), 2)).await }
    });
    for result in futures_util::future::join_all(calls).await {
        result.expect("infer");
    }
    for s in &sims {
        assert!(
            s.control().per_model_started("simple") > 0,
            "every backend got calls"
        );
    }
    eventually("in-flight back to zero", Duration::from_secs(5), || {
        gw.pool().endpoints().iter().all(|e| e.in_flight() == 0)
    })
    .await;
    let total: u64 = gw
        .pool()
        .endpoints()
        .iter()
        .map(|e| e.requests_total())
        .sum();
    assert_eq!(total, 60);
}

#[tokio::test]
async fn metadata_and_trailers_pass_through() {
    let (sims, gw) = pool_of_three().await;
    let mut c = client(gw.addr()).await;
    let mut request = tonic::Request::new(simple_request("hdr", 1));
    request
        .metadata_mut()
        .insert("x-request-tag", "abc-123".parse().expect("value"));
    let response = c.model_infer(request).await.expect("infer");
    assert!(
        response.metadata().get("sim-name").is_some(),
        "backend header reached the caller"
    );
    let seen: Vec<_> = sims
        .iter()
        .filter_map(|s| s.control().last_request_metadata("x-request-tag"))
        .collect();
    assert_eq!(seen, ["abc-123"]);

    // Trailers: read them with a raw streaming call so they are visible.
    let mut c2 = client(gw.addr()).await;
    let request = ModelInferRequest {
        model_name: "tiny_llm".into(),
        id: "t".into(),
        ..tiny_llm_request("t", "hello", 1)
    };
    let mut stream = c2
        .model_stream_infer(tokio_stream::iter(vec![request]))
        .await
        .expect("stream")
        .into_inner();
    while let Some(item) = stream.next().await {
        item.expect("response");
    }
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert!(
        trailers.get("sim-name").is_some(),
        "backend trailer reached the caller"
    );
}

pub(crate) fn tiny_llm_request(id: &str, prompt: &str, max_tokens: i32) -> ModelInferRequest {
    let mut text = (prompt.len() as u32).to_le_bytes().to_vec();
    text.extend_from_slice(prompt.as_bytes());
    ModelInferRequest {
        model_name: "tiny_llm".into(),
        id: id.into(),
        inputs: vec![
            model_infer_request::InferInputTensor {
                name: "text_input".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                ..Default::default()
            },
            model_infer_request::InferInputTensor {
                name: "max_tokens".into(),
                datatype: "INT32".into(),
                shape: vec![1],
                ..Default::default()
            },
        ],
        raw_input_contents: vec![text, max_tokens.to_le_bytes().to_vec()],
        ..Default::default()
    }
}

pub(crate) fn is_final(r: &ModelInferResponse) -> bool {
    matches!(
        r.parameters
            .get("triton_final_response")
            .and_then(|p| p.parameter_choice.clone()),
        Some(infer_parameter::ParameterChoice::BoolParam(true))
    )
}

#[tokio::test]
async fn stream_infer_carries_concurrent_decoupled_requests_and_survives_unknown_models() {
    let (_sims, gw) = pool_of_three().await;
    let mut c = client(gw.addr()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses = c
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("open stream")
        .into_inner();

    // An unknown model first: an in-stream error, and the stream stays usable.
    let mut unknown = tiny_llm_request("u-1", "x", 1);
    unknown.model_name = "no_such_model".into();
    tx.send(unknown).await.expect("send");
    let first = responses
        .next()
        .await
        .expect("a response")
        .expect("in-stream, not a status");
    assert!(
        first.error_message.contains("no_such_model"),
        "{}",
        first.error_message
    );
    assert_eq!(first.infer_response.expect("id echoed").id, "u-1");

    // Two generations in flight at once on the same stream.
    tx.send(tiny_llm_request("a", "hello", 4))
        .await
        .expect("send");
    tx.send(tiny_llm_request("b", "world", 3))
        .await
        .expect("send");
    let mut tokens = std::collections::BTreeMap::<String, (usize, bool)>::new();
    while tokens.values().filter(|(_, done)| *done).count() < 2 {
        let r = responses.next().await.expect("more").expect("ok");
        assert!(r.error_message.is_empty(), "{}", r.error_message);
        let r = r.infer_response.expect("response");
        let entry = tokens.entry(r.id.clone()).or_default();
        assert!(!entry.1, "nothing after the final response of {}", r.id);
        entry.0 += 1;
        entry.1 = is_final(&r);
    }
    assert_eq!(tokens["a"], (4, true));
    assert_eq!(tokens["b"], (3, true));
    drop(tx);
    assert!(
        responses.next().await.is_none(),
        "stream ends after the client half-closes"
    );
}

#[tokio::test]
async fn bad_input_gets_precise_statuses() {
    let (sims, gw) = pool_of_three().await;
    let mut c = client(gw.addr()).await;

    let mut request = simple_request("x", 1);
    request.model_name = "resnet_nobody_has".into();
    let status = c.model_infer(request).await.expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("resnet_nobody_has"),
        "{}",
        status.message()
    );

    let status = c
        .model_infer(tiny_llm_request("d", "x", 2))
        .await
        .expect_err("decoupled");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ModelStreamInfer"),
        "{}",
        status.message()
    );

    let mut request = simple_request("x", 1);
    request.model_name.clear();
    let status = c.model_infer(request).await.expect_err("no model name");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("model_name"),
        "{}",
        status.message()
    );

    // Bytes that are not a ModelInferRequest.
    let garbage = bytes::Bytes::from_static(&[0x0a, 0x50, b's', b'i']);
    let status = infergate_client::raw::unary_raw(
        channel(gw.addr()).await,
        http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer"),
        tonic::Request::new(garbage),
    )
    .await
    .expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("does not parse"),
        "{}",
        status.message()
    );
    assert!(
        sims.iter().all(|s| s.control().started() == 0),
        "nothing bad reached a backend"
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_with_the_limit_named() {
    let s = sim("gpu-0", |_| {});
    let mut cfg = config(&[s.addr()]);
    cfg.max_message_bytes = 64 * 1024;
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let request = ModelInferRequest {
        model_name: "identity_fp32".into(),
        raw_input_contents: vec![vec![0u8; 100 * 1024]],
        ..Default::default()
    };
    let status = c.model_infer(request).await.expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("65536"), "{}", status.message());
    assert_eq!(s.control().started(), 0);
}

#[tokio::test]
async fn no_backend_available_says_why() {
    // Nothing listens on the configured backend.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = dead.local_addr().expect("addr");
    drop(dead);
    let mut cfg = config(&[addr]);
    cfg.backends[0].models = vec!["simple".into()];
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let status = c
        .model_infer(simple_request("x", 1))
        .await
        .expect_err("no backend");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("model simple"),
        "{}",
        status.message()
    );
    // Nothing listens there: out of rotation as unreachable, with the check's reason.
    assert!(
        status.message().contains("1 unreachable (last check of"),
        "{}",
        status.message()
    );
    assert!(
        !c.server_ready(ServerReadyRequest {})
            .await
            .expect("ready")
            .into_inner()
            .ready
    );

    // And a gateway with no backends at all.
    let gw = gateway(config(&[])).await;
    let mut c = client(gw.addr()).await;
    let status = c
        .model_infer(simple_request("x", 1))
        .await
        .expect_err("empty pool");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no backends"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_cancelled_call_releases_its_in_flight_slot_and_the_backend_sees_it() {
    let s = sim("slow", |c| c.latency_ms = 30_000.0);
    let gw = gateway(config(&[s.addr()])).await;
    let c = client(gw.addr()).await;
    let call = tokio::spawn({
        let mut c = c.clone();
        async move { c.model_infer(simple_request("slow", 1)).await }
    });
    let endpoint = gw.pool().endpoints()[0].clone();
    eventually("call in flight", Duration::from_secs(5), || {
        endpoint.in_flight() == 1 && s.control().in_flight() == 1
    })
    .await;
    call.abort();
    eventually("in-flight released", Duration::from_secs(5), || {
        endpoint.in_flight() == 0
    })
    .await;
    eventually(
        "backend saw the cancellation",
        Duration::from_secs(5),
        || s.control().cancelled() == 1,
    )
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls_and_refuses_new_ones() {
    let s = sim("slow", |c| c.latency_ms = 400.0);
    let gw = gateway(config(&[s.addr()])).await;
    let addr = gw.addr();
    let c = client(addr).await;
    let call = tokio::spawn({
        let mut c = c.clone();
        async move { c.model_infer(simple_request("inflight", 3)).await }
    });
    let endpoint = gw.pool().endpoints()[0].clone();
    eventually("call in flight", Duration::from_secs(5), || {
        endpoint.in_flight() == 1
    })
    .await;
    let stopping = tokio::spawn(gw.shutdown(Duration::from_secs(10)));
    let response = call
        .await
        .expect("join")
        .expect("the in-flight call finished");
    assert_eq!(response.into_inner().id, "inflight");
    stopping.await.expect("shutdown completes");
    let mut late = c.clone();
    let status = late
        .model_infer(simple_request("late", 1))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_model_name_gets_not_found_with_the_name_cut_short() {
    let backend = sim("long-name", |_| {});
    let gw = gateway(config(&[backend.addr()])).await;
    let mut c = client(gw.addr()).await;
    let mut request = simple_request("long", 1);
    request.model_name = "m".repeat(100_000);
    let status = c.model_infer(request).await.expect_err("unknown model");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().len() < 1_000,
        "{} bytes",
        status.message().len()
    );
    assert!(
        status.message().contains("(100000 bytes)"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_api_keys_decide_the_tenant_and_stay_at_the_gateway() {
    let backend = sim("keys", |_| {});
    let mut cfg = config(&[backend.addr()]);
    cfg.tenants.api_keys.insert("key-a".into(), "team-a".into());
    cfg.rate_limit.per_tenant = Some(infergate::config::Bucket {
        rate_per_second: 0.1,
        burst: 5,
        scope: infergate::config::Scope::Local,
    });
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let call = |key: Option<&str>, tenant: Option<&str>, id: &str| {
        let mut request = tonic::Request::new(simple_request(id, 1));
        if let Some(k) = key {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}").parse().expect("ascii"),
            );
        }
        if let Some(t) = tenant {
            request
                .metadata_mut()
                .insert("x-infergate-tenant", t.parse().expect("ascii"));
        }
        request
    };
    // An unknown key is refused, and not echoed.
    let refused = c
        .model_infer(call(Some("nope"), None, "unknown"))
        .await
        .expect_err("unknown key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(!refused.message().contains("nope"));
    // Six calls that only claim team-a in the header spend anonymous's budget.
    let mut limited = 0;
    for i in 0..6 {
        if let Err(s) = c
            .model_infer(call(None, Some("team-a"), &format!("spoof-{i}")))
            .await
        {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
            limited += 1;
        }
    }
    assert_eq!(limited, 1, "anonymous has its own burst of 5");
    // The real key-a caller still has all of team-a's.
    for i in 0..5 {
        c.model_infer(call(Some("key-a"), None, &format!("real-{i}")))
            .await
            .expect("team-a's budget is untouched");
    }
    // What the backend saw: no credentials, the tenant the gateway resolved.
    let seen = |k: &str| backend.control().last_request_metadata(k);
    assert_eq!(
        seen("authorization"),
        None,
        "credentials stay at the gateway"
    );
    assert_eq!(seen("infergate-tenant").as_deref(), Some("team-a"));
    assert_eq!(seen("x-infergate-tenant"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_of_different_unknown_models_do_not_wait_for_each_other() {
    // One real backend and one that accepts connections and never answers, so every
    // probe of an unknown name waits out probe_timeout_ms (500 ms) on it.
    let real = sim("probe-real", |_| {});
    let silent_target = sim("probe-silent", |_| {});
    let silent = FreezableProxy::start(silent_target.addr()).await;
    silent.freeze(true);
    let mut cfg = config(&[real.addr(), silent.addr()]);
    cfg.backends[0].models = vec!["simple".into()];
    cfg.backends[1].models = vec!["simple".into()];
    cfg.discovery.probe_timeout_ms = 500;
    let gw = gateway(cfg).await;
    let c = client(gw.addr()).await;
    let began = Instant::now();
    let lookups: Vec<_> = (0..20)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut request = simple_request(&format!("u-{i}"), 1);
                request.model_name = format!("no_such_model_{i}");
                let t = Instant::now();
                let status = c.model_infer(request).await.expect_err("unknown model");
                assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
                t.elapsed()
            })
        })
        .collect();
    // A call for a known model during the burst is not held up by the probes.
    let t = Instant::now();
    c.clone()
        .model_metadata(ModelMetadataRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await
        .expect("metadata of a known model");
    let known = t.elapsed();
    let mut slowest = Duration::ZERO;
    for lookup in lookups {
        slowest = slowest.max(lookup.await.expect("lookup"));
    }
    println!(
        "20 unknown names: slowest {slowest:?}, all within {:?}; known model meanwhile {known:?}",
        began.elapsed()
    );
    // One after another they would take 20 × 500 ms; 16 at once, two rounds.
    assert!(slowest < Duration::from_millis(2500), "{slowest:?}");
    assert!(known < Duration::from_millis(400), "{known:?}");
}
