//! End to end: per-tenant stream token rates (`[rate_limit] per_tenant_tokens`), through
//! a real gateway in front of a real simulator streaming `tiny_llm` (one response per
//! token). A tenant past its rate has its stream ended and new streams refused, with a
//! RESOURCE_EXHAUSTED naming the tenant and the limit; other tenants stream on.

use crate::common::*;
use crate::gateway::{is_final, tiny_llm_request};
use futures_util::StreamExt;
use infergate::config::{RateLimitConfig, TokenRate};
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::*;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

fn tiny_llm(id: &str, max_tokens: i32) -> ModelInferRequest {
    tiny_llm_request(id, "hello", max_tokens)
}

async fn open(
    c: &mut GrpcInferenceServiceClient<Channel>,
    tenant: &str,
) -> (
    mpsc::Sender<ModelInferRequest>,
    Streaming<ModelStreamInferResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("x-infergate-tenant", tenant.parse().expect("ascii"));
    let responses = c
        .model_stream_infer(request)
        .await
        .expect("open stream")
        .into_inner();
    (tx, responses)
}

/// Reads one whole generation: its number of tokens.
async fn generation(responses: &mut Streaming<ModelStreamInferResponse>) -> usize {
    let mut tokens = 0;
    loop {
        let r = responses.next().await.expect("more").expect("ok");
        assert!(r.error_message.is_empty(), "{}", r.error_message);
        tokens += 1;
        if is_final(&r.infer_response.expect("response")) {
            return tokens;
        }
    }
}

#[tokio::test]
async fn a_tenant_past_its_token_rate_is_cut_off_and_refused_new_streams() {
    let s = sim("gpu-0", |_| {});
    let mut cfg = config(&[s.addr()]);
    // A refill too slow to matter during the test: the burst is what there is.
    cfg.rate_limit = RateLimitConfig {
        per_tenant_tokens: Some(TokenRate {
            tokens_per_second: 0.01,
            burst: 5,
        }),
        ..RateLimitConfig::default()
    };
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;

    // Within the burst: 4 of 5 tokens.
    let (tx, mut responses) = open(&mut c, "greedy").await;
    tx.send(tiny_llm("a", 4)).await.expect("send");
    assert_eq!(generation(&mut responses).await, 4);

    // 1 token left: a 50-token generation runs into debt and is ended once the debt
    // passes the burst (5), so after about 1 + 5 more responses, not 50.
    tx.send(tiny_llm("b", 50)).await.expect("send");
    let mut passed = 0;
    let status = loop {
        match responses.next().await.expect("a response or the end") {
            Ok(r) => {
                assert!(r.error_message.is_empty(), "{}", r.error_message);
                passed += 1;
            }
            Err(status) => break status,
        }
    };
    assert!((1..=7).contains(&passed), "{passed} responses passed");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with(
            "tenant greedy: stream token limit tokens_per_second 0.01 (burst 5) exceeded; retry in"
        ),
        "{}",
        status.message()
    );
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());

    // In debt, the tenant opens no new stream: its first message is answered in-stream.
    let (tx, mut responses) = open(&mut c, "greedy").await;
    tx.send(tiny_llm("c", 1)).await.expect("send");
    let refused = responses.next().await.expect("answer").expect("in-stream");
    assert!(
        refused
            .error_message
            .starts_with("tenant greedy: stream token limit tokens_per_second 0.01"),
        "{}",
        refused.error_message
    );

    // Another tenant has its own tokens.
    let (tx, mut responses) = open(&mut c, "modest").await;
    tx.send(tiny_llm("d", 3)).await.expect("send");
    assert_eq!(generation(&mut responses).await, 3);
}
