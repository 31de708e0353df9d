//! End-to-end deadline: a 50 ms deadline against a backend that takes 1 s. Its own test
//! binary, so that the time it measures is not shared with other tests running beside it.

mod common;

use common::*;
use infergate_sim::SimConfig;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_against_a_slow_backend_returns_on_time_and_cancels_it() {
    let slow = sim("slow", |c: &mut SimConfig| c.latency_ms = 1000.0);
    let gw = gateway(config(&[slow.addr()])).await;
    let mut c = client(gw.addr()).await;
    let mut request = tonic::Request::new(simple_request("late", 1));
    // The deadline travels as `grpc-timeout`, but this client does not enforce it
    // itself, so what comes back is the gateway's answer, not the client's own timer.
    request
        .metadata_mut()
        .insert("grpc-timeout", "50m".parse().expect("ascii"));
    let began = Instant::now();
    let status = c.model_infer(request).await.expect_err("deadline");
    let took = began.elapsed();
    println!("50 ms deadline answered after {took:?}: {status:?}");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(took < Duration::from_millis(150), "{took:?}");
    eventually(
        "the backend saw the cancellation",
        Duration::from_secs(3),
        || slow.control().cancelled() == 1,
    )
    .await;
    let sent = slow
        .control()
        .last_request_metadata("grpc-timeout")
        .expect("deadline passed on");
    let passed = infergate::wire::parse_grpc_timeout(&sent).expect("valid grpc-timeout");
    assert!(
        passed <= Duration::from_millis(50),
        "remaining budget minus margin: {sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_the_request_is_read_is_the_gateways_answer() {
    use tower::ServiceExt;
    let sim = sim("s", |_| {});
    let gw = gateway(config(&[sim.addr()])).await;
    let channel = channel(gw.addr()).await;
    // A body that starts a message and never finishes it.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>(1);
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(&[
        0, 0, 0,
    ]))))
    .await
    .expect("first bytes");
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        gw.addr()
    )
    .parse()
    .expect("uri");
    let headers = request.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("te", http::HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", http::HeaderValue::from_static("100m"));
    let began = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), channel.oneshot(request))
        .await
        .expect("answered")
        .expect("a response");
    let status = tonic::Status::from_header_map(response.headers()).expect("trailers-only status");
    println!(
        "stalled body answered after {:?}: {status:?}",
        began.elapsed()
    );
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("ModelInfer"),
        "{}",
        status.message()
    );
    drop(tx);
}
