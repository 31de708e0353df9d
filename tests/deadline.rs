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
    // The deadline travels as `grpc-timeout` from a client that does not enforce it
    // itself, so what comes back is the gateway's answer, not the client's own timer.
    let message = prost::Message::encode_to_vec(&simple_request("late", 1));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let body = http_body_util::Full::new(bytes::Bytes::from(framed));
    let began = Instant::now();
    let status = raw_unary(gw.addr(), body, "50m").await;
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

/// Sends `body` as a ModelInfer call with `grpc-timeout: timeout` over a plain HTTP/2
/// connection (tonic's channel would enforce the deadline with a timer of its own,
/// which races the gateway's answer on a loaded machine); the gRPC status it ends with.
async fn raw_unary<B>(addr: std::net::SocketAddr, body: B, timeout: &'static str) -> tonic::Status
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("http://{addr}/inference.GRPCInferenceService/ModelInfer")
        .parse()
        .expect("uri");
    let headers = request.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("te", http::HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", http::HeaderValue::from_static(timeout));
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("answered")
        .expect("a response");
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("the body ends")
        .expect("a body");
    collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .expect("a gRPC status in the trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_the_request_is_read_is_the_gateways_answer() {
    let sim = sim("s", |_| {});
    let gw = gateway(config(&[sim.addr()])).await;
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
    let began = Instant::now();
    let status = raw_unary(gw.addr(), body, "100m").await;
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
