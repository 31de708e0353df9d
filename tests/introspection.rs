//! End-to-end: what operators and platforms see without knowing our protos: server
//! reflection (v1 and v1alpha) listing the services, and grpc.health.v1 Check and Watch
//! on the inference and admin ports, following the pool's state.

mod common;

use common::*;
use futures_util::StreamExt;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1 as r1;
use tonic_reflection::pb::v1alpha as r1a;

async fn list_services_v1(addr: std::net::SocketAddr) -> Vec<String> {
    let mut client = r1::server_reflection_client::ServerReflectionClient::new(channel(addr).await);
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses.next().await.expect("one answer").expect("ok");
    match response.message_response {
        Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_every_service_on_both_ports() {
    let s = sim("gpu-0", |_| {});
    let gw = gateway(config(&[s.addr()])).await;
    let services = list_services_v1(gw.addr()).await;
    // Each port advertises what it serves, and only that.
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "inference.GRPCInferenceService"
        ]
    );
    assert_eq!(
        list_services_v1(gw.admin_addr()).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "infergate.admin.v1.Admin"
        ]
    );

    // v1alpha answers too, and can return the file that defines a symbol.
    let mut client =
        r1a::server_reflection_client::ServerReflectionClient::new(channel(gw.addr()).await);
    let request = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
                "inference.ModelInferRequest".into(),
            ),
        ),
    };
    let response = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1alpha")
        .into_inner()
        .next()
        .await
        .expect("answer")
        .expect("ok");
    assert!(matches!(
        response.message_response,
        Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
            if !f.file_descriptor_proto.is_empty()
    ));
}

#[tokio::test]
async fn health_follows_the_pool_with_check_and_watch() {
    let s = sim("gpu-0", |_| {});
    let gw = gateway(config(&[s.addr()])).await;
    let mut health = HealthClient::new(channel(gw.addr()).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let status = health
        .check(check(""))
        .await
        .expect("check")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    let status = health
        .check(check("simple"))
        .await
        .expect("check model")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    let missing = health
        .check(check("no_such_model"))
        .await
        .expect_err("unknown service");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let mut admin_health = HealthClient::new(channel(gw.admin_addr()).await);
    assert_eq!(
        admin_health
            .check(check(""))
            .await
            .expect("admin check")
            .into_inner()
            .status(),
        ServingStatus::Serving
    );

    // Watch sees the backend going away and coming back.
    let mut watch = health
        .watch(check("simple"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first").expect("ok").status();
    assert_eq!(first, ServingStatus::Serving);
    s.control().set_ready(false);
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a change within 5 s")
        .expect("item")
        .expect("ok")
        .status();
    assert_eq!(next, ServingStatus::NotServing);
    s.control().set_ready(true);
    let back = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a change within 5 s")
        .expect("item")
        .expect("ok")
        .status();
    assert_eq!(back, ServingStatus::Serving);
}
