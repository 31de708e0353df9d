//! End-to-end: what operators and platforms see without knowing our protos: server
//! reflection (v1 and v1alpha) listing the services, every advertised service resolving
//! to its file and that file's dependencies as a generic reflection client walks them,
//! and grpc.health.v1 Check and Watch on the inference and admin ports, following the
//! pool's state.

use crate::common::*;
use futures_util::StreamExt;
use prost::Message as _;
use std::collections::{BTreeSet, HashMap};
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

/// What a generic reflection client (grpcurl, grpc-requests, buf curl) does before its
/// first call: list the services, ask for the file that defines each service and each
/// of its methods, then fetch every file those import by name. One macro body for both
/// versions, whose generated types differ only in their module. Returns the services
/// walked and the files fetched; panics on the first lookup that fails.
macro_rules! walk_reflection {
    ($r:ident, $addr:expr) => {{
        use $r::server_reflection_request::MessageRequest;
        use $r::server_reflection_response::MessageResponse;
        let mut client =
            $r::server_reflection_client::ServerReflectionClient::new(channel($addr).await);
        // One stream, one request at a time, as the stock clients do.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut answers = client
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("reflection stream")
            .into_inner();
        let mut ask = async |request: MessageRequest| -> MessageResponse {
            let what = format!("{request:?}");
            tx.send($r::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .await
            .expect("send");
            let answer = answers
                .next()
                .await
                .unwrap_or_else(|| panic!("{what}: stream ended"))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            match answer.message_response {
                Some(MessageResponse::ErrorResponse(e)) => {
                    panic!("{what}: error {} {}", e.error_code, e.error_message)
                }
                Some(other) => other,
                None => panic!("{what}: empty answer"),
            }
        };
        let decode =
            |answer: MessageResponse, what: &str| -> Vec<prost_types::FileDescriptorProto> {
                match answer {
                    MessageResponse::FileDescriptorResponse(f) => {
                        assert!(!f.file_descriptor_proto.is_empty(), "{what}: no file");
                        f.file_descriptor_proto
                            .iter()
                            .map(|b| {
                                prost_types::FileDescriptorProto::decode(b.as_slice())
                                    .expect("a file descriptor")
                            })
                            .collect()
                    }
                    other => panic!("{what}: unexpected answer {other:?}"),
                }
            };

        let services: Vec<String> = match ask(MessageRequest::ListServices(String::new())).await {
            MessageResponse::ListServicesResponse(list) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("ListServices: unexpected answer {other:?}"),
        };
        assert!(!services.is_empty());
        let mut files: HashMap<String, prost_types::FileDescriptorProto> = HashMap::new();
        for service in &services {
            let found = decode(
                ask(MessageRequest::FileContainingSymbol(service.clone())).await,
                service,
            );
            // The first file is the one that defines the symbol.
            let file = &found[0];
            let package = file.package.clone().unwrap_or_default();
            let defined = file
                .service
                .iter()
                .find(|s| format!("{package}.{}", s.name()) == *service)
                .unwrap_or_else(|| panic!("{service}: not defined in {}", file.name()));
            assert!(!defined.method.is_empty(), "{service}: no methods");
            for method in &defined.method {
                let symbol = format!("{service}.{}", method.name());
                let of_method = decode(
                    ask(MessageRequest::FileContainingSymbol(symbol.clone())).await,
                    &symbol,
                );
                assert_eq!(of_method[0].name(), file.name(), "{symbol}");
                // Its request and response types resolve as well.
                for ty in [method.input_type(), method.output_type()] {
                    let ty = ty.trim_start_matches('.').to_owned();
                    decode(
                        ask(MessageRequest::FileContainingSymbol(ty.clone())).await,
                        &ty,
                    );
                }
            }
            for f in found {
                files.insert(f.name().to_owned(), f);
            }
        }
        // Transitive dependencies, by file name.
        let mut pending: Vec<String> = files.values().flat_map(|f| f.dependency.clone()).collect();
        while let Some(name) = pending.pop() {
            if files.contains_key(&name) {
                continue;
            }
            for f in decode(
                ask(MessageRequest::FileByFilename(name.clone())).await,
                &name,
            ) {
                pending.extend(f.dependency.iter().cloned());
                files.insert(f.name().to_owned(), f);
            }
        }
        // And every file resolves by name, as the clients ask again for each.
        for name in files.keys() {
            decode(
                ask(MessageRequest::FileByFilename(name.clone())).await,
                name,
            );
        }
        let services: BTreeSet<String> = services.into_iter().collect();
        let files: BTreeSet<String> = files.into_keys().collect();
        (services, files)
    }};
}

#[tokio::test]
async fn every_advertised_service_resolves_through_both_versions_on_both_ports() {
    let s = sim("gpu-0", |_| {});
    let gw = gateway(config(&[s.addr()])).await;
    for (port, addr, own) in [
        ("front", gw.addr(), "inference.GRPCInferenceService"),
        ("admin", gw.admin_addr(), "infergate.admin.v1.Admin"),
    ] {
        let (v1_services, v1_files) = walk_reflection!(r1, addr);
        let (v1a_services, v1a_files) = walk_reflection!(r1a, addr);
        // Both versions tell the same story.
        assert_eq!(v1_services, v1a_services, "{port}");
        assert_eq!(v1_files, v1a_files, "{port}");
        for service in [
            own,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                v1_services.contains(service),
                "{port}: {service} not listed"
            );
        }
        for file in ["reflection_v1.proto", "reflection_v1alpha.proto"] {
            assert!(
                v1_files.contains(file),
                "{port}: {file} not fetched: {v1_files:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_learned_after_start_gets_its_health_entry() {
    // The gateway starts before its backend (a rollout where the gateway is up first):
    // the backend's port is reserved, then served once the gateway runs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut cfg = config(&[port]);
    cfg.discovery.refresh_interval_ms = 100;
    let gw = gateway(cfg).await;
    let mut health = HealthClient::new(channel(gw.addr()).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let before = health.check(check("simple")).await;
    assert!(
        before
            .as_ref()
            .map_or(true, |r| r.get_ref().status() != ServingStatus::Serving),
        "no backend yet, yet `simple` is SERVING: {before:?}"
    );
    let _backend = sim("late", |c| c.listen = port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = health.check(check("simple")).await;
        if now
            .as_ref()
            .is_ok_and(|r| r.get_ref().status() == ServingStatus::Serving)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`simple` never became SERVING once its backend came up: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
