//! End-to-end: stateful sequences (Triton's `sequence_id`) through real gateways in front
//! of real simulated backends serving the stateful `accumulate` model. The running sum
//! a backend answers is right only if every earlier request of the sequence reached it,
//! so these tests prove correctness, not routing alone.

use crate::common::*;
use futures_util::StreamExt;
use infergate_proto::admin::admin_client::AdminClient;
use infergate_proto::admin::{DrainBackendRequest, ListSequencesRequest};
use infergate_proto::inference::infer_parameter::ParameterChoice;
use infergate_proto::inference::model_infer_request::InferInputTensor;
use infergate_proto::inference::*;
use infergate_sim::SimHandle;
use std::time::Duration;
use tonic::Code;

/// A sequence id as a test sends it.
#[derive(Clone, Debug)]
enum Id {
    Int(i64),
    Text(String),
}

/// One `accumulate` request of sequence `id`, adding `value`.
fn acc(id: &Id, value: i32, start: bool, end: bool) -> ModelInferRequest {
    let mut req = ModelInferRequest {
        model_name: "accumulate".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "INT32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![value.to_le_bytes().to_vec()],
        ..Default::default()
    };
    let mut param = |name: &str, c: ParameterChoice| {
        req.parameters.insert(
            name.into(),
            InferParameter {
                parameter_choice: Some(c),
            },
        );
    };
    param(
        "sequence_id",
        match id {
            Id::Int(v) => ParameterChoice::Int64Param(*v),
            Id::Text(t) => ParameterChoice::StringParam(t.clone()),
        },
    );
    if start {
        param("sequence_start", ParameterChoice::BoolParam(true));
    }
    if end {
        param("sequence_end", ParameterChoice::BoolParam(true));
    }
    req
}

/// The running sum and the simulator that answered.
fn answer(resp: tonic::Response<ModelInferResponse>) -> (i32, String) {
    let name = resp
        .metadata()
        .get("sim-name")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let out = resp.into_inner();
    let sum = out
        .raw_output_contents
        .first()
        .map(|b| decode_i32(b))
        .and_then(|v| v.first().copied())
        .unwrap_or(i32::MIN);
    (sum, name)
}

/// The gateway's Prometheus text (`GET /metrics`, HTTP/1.0, read to the end).
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: gw\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .expect("metrics in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn sims(n: usize, idle_ms: u64) -> Vec<SimHandle> {
    (0..n)
        .map(|i| sim(&format!("gpu-{i}"), |c| c.sequence_idle_ms = idle_ms))
        .collect()
}

fn addrs(sims: &[SimHandle]) -> Vec<std::net::SocketAddr> {
    sims.iter().map(|s| s.addr()).collect()
}

#[tokio::test]
async fn interleaved_sequences_through_two_replicas_sum_right_on_one_backend_each() {
    let sims = sims(3, 5000);
    // Two replicas with the same backends and the same (default) hash seed.
    let a = gateway(config(&addrs(&sims))).await;
    let b = gateway(config(&addrs(&sims))).await;
    let mut clients = [client(a.addr()).await, client(b.addr()).await];
    let ids: Vec<Id> = (0..12)
        .map(|i| {
            if i % 2 == 0 {
                Id::Int(1000 + i)
            } else {
                Id::Text(format!("user-{i}"))
            }
        })
        .collect();
    let steps = 6;
    let mut sums = vec![0i32; ids.len()];
    let mut homes: Vec<Option<String>> = vec![None; ids.len()];
    // Round-robin over sequences and steps, each request through the other replica
    // than the one before it: every sequence is spread over both gateways.
    let mut turn = 0usize;
    for step in 0..steps {
        for (i, id) in ids.iter().enumerate() {
            let value = (i as i32 + 1) * 10 + step;
            let start = step == 0;
            let end = step + 1 == steps;
            turn += 1;
            let c = &mut clients[(turn + i) % 2];
            let resp = c
                .model_infer(acc(id, value, start, end))
                .await
                .unwrap_or_else(|e| panic!("sequence {id:?} step {step}: {e}"));
            let (sum, backend) = answer(resp);
            sums[i] += value;
            assert_eq!(sum, sums[i], "sequence {id:?} step {step}");
            match &homes[i] {
                None => homes[i] = Some(backend),
                Some(home) => assert_eq!(home, &backend, "sequence {id:?} moved"),
            }
        }
    }
    // The sequences used more than one backend (the hash spreads them).
    let mut used: Vec<&String> = homes.iter().flatten().collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 2, "{used:?}");
    // Every sequence ended: no pin is left on either replica.
    for gw in [&a, &b] {
        let mut adm = AdminClient::new(channel(gw.admin_addr()).await);
        let listed = adm
            .list_sequences(ListSequencesRequest::default())
            .await
            .expect("list sequences")
            .into_inner();
        assert_eq!(listed.total, 0, "{listed:?}");
    }
    // A stream carrying a sequence stays on the sequence's backend too, and a unary
    // request of the same sequence through the other replica finds the state there.
    let id = Id::Text("streamed".into());
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = clients[0]
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let mut sum = 0;
    for (k, v) in [5, 6, 7].into_iter().enumerate() {
        tx.send(acc(&id, v, k == 0, false)).await.expect("send");
        let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a response in time")
            .expect("a response")
            .expect("no stream error");
        assert_eq!(got.error_message, "");
        let out = got.infer_response.expect("a response");
        sum += v;
        assert_eq!(decode_i32(&out.raw_output_contents[0]), [sum]);
    }
    // A second sequence started later on the same stream is pinned to the stream's
    // backend (a stream stays on its backend), so a unary request of it through the
    // same gateway follows it there.
    let other = Id::Int(4_000_000_000);
    tx.send(acc(&other, 2, true, false)).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a response in time")
        .expect("a response")
        .expect("no stream error");
    assert_eq!(got.error_message, "");
    drop(tx);
    let resp = clients[0]
        .model_infer(acc(&other, 3, false, true))
        .await
        .expect("pinned to the stream's backend");
    assert_eq!(answer(resp).0, 5);
    let resp = clients[1]
        .model_infer(acc(&id, 100, false, true))
        .await
        .expect("the other replica finds the sequence's backend");
    assert_eq!(answer(resp).0, sum + 100);
}

#[tokio::test]
async fn a_killed_pinned_backend_fails_the_sequence_clearly_and_a_start_moves_it() {
    let mut sims: Vec<Option<SimHandle>> = sims(3, 5000).into_iter().map(Some).collect();
    let backends: Vec<_> = sims.iter().flatten().map(|s| s.addr()).collect();
    let gw = gateway(config(&backends)).await;
    let mut c = client(gw.addr()).await;
    let id = Id::Int(77);
    let (sum, home) = answer(
        c.model_infer(acc(&id, 3, true, false))
            .await
            .expect("start"),
    );
    assert_eq!(sum, 3);
    let (sum, again) = answer(
        c.model_infer(acc(&id, 4, false, false))
            .await
            .expect("next"),
    );
    assert_eq!((sum, &again), (7, &home));
    // Kill the backend holding the sequence, mid-sequence.
    let index = sims
        .iter()
        .position(|s| s.as_ref().is_some_and(|s| s.control().name() == home))
        .expect("the home backend is one of ours");
    let address = backends[index].to_string();
    if let Some(s) = sims[index].take() {
        s.kill();
    }
    for _ in 0..2 {
        let err = c
            .model_infer(acc(&id, 5, false, false))
            .await
            .expect_err("the sequence's state is gone");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let message = err.message();
        assert!(message.contains("sequence 77"), "{message}");
        assert!(message.contains(&address), "{message}");
        assert!(message.contains("start it again"), "{message}");
    }
    // A start may go anywhere: it re-pins to a live backend and sums from scratch.
    let (sum, moved) = answer(
        c.model_infer(acc(&id, 10, true, false))
            .await
            .expect("restart"),
    );
    assert_eq!(sum, 10);
    assert_ne!(moved, home);
    let (sum, last) = answer(c.model_infer(acc(&id, 1, false, true)).await.expect("end"));
    assert_eq!((sum, last), (11, moved));
}

#[tokio::test]
async fn the_idle_timeout_frees_the_pin() {
    let sims = sims(3, 300);
    let mut cfg = config(&addrs(&sims));
    cfg.models
        .entry("accumulate".into())
        .or_default()
        .sequence_idle_ms = Some(300);
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    let mut adm = AdminClient::new(channel(gw.admin_addr()).await);
    let id = Id::Text("idle".into());
    let (_, home) = answer(
        c.model_infer(acc(&id, 1, true, false))
            .await
            .expect("start"),
    );
    let listed = adm
        .list_sequences(ListSequencesRequest {
            model: "accumulate".into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.total, 1, "{listed:?}");
    let pinned = &listed.backends[0];
    assert_eq!(pinned.sequences[0].sequence_id, "idle");
    assert!(pinned.sequences[0].string_id);
    let home_addr = sims
        .iter()
        .find(|s| s.control().name() == home)
        .map(|s| s.addr().to_string());
    assert_eq!(Some(pinned.address.clone()), home_addr);
    let gauge = format!(
        "infergate_sequences_pinned{{model=\"accumulate\",backend=\"{}\"}} 1",
        pinned.address
    );
    let metrics = scrape(gw.metrics_addr()).await;
    assert!(metrics.contains(&gauge), "{gauge} not in:\n{metrics}");
    // Polled with a deadline: the pin ends once the sequence is idle for 300 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = adm
            .list_sequences(ListSequencesRequest::default())
            .await
            .expect("list")
            .into_inner();
        if listed.total == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pin outlived its idle time: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = scrape(gw.metrics_addr()).await;
    assert!(
        !metrics.contains("infergate_sequences_pinned{"),
        "{metrics}"
    );
    // The backend dropped the state too: a request without a start is refused, naming
    // the sequence; a start begins again.
    let err = c
        .model_infer(acc(&id, 1, false, false))
        .await
        .expect_err("no state left");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("'idle'"), "{}", err.message());
    let (sum, _) = answer(c.model_infer(acc(&id, 2, true, true)).await.expect("start"));
    assert_eq!(sum, 2);
}

#[tokio::test]
async fn a_drained_pinned_backend_fails_the_sequence_until_it_starts_again() {
    let sims = sims(3, 5000);
    let gw = gateway(config(&addrs(&sims))).await;
    let mut c = client(gw.addr()).await;
    let mut adm = AdminClient::new(channel(gw.admin_addr()).await);
    let id = Id::Text("drained".into());
    let (_, home) = answer(
        c.model_infer(acc(&id, 1, true, false))
            .await
            .expect("start"),
    );
    let address = sims
        .iter()
        .find(|s| s.control().name() == home)
        .map(|s| s.addr().to_string())
        .unwrap_or_default();
    adm.drain_backend(DrainBackendRequest {
        address: address.clone(),
        timeout_ms: 1000,
        undrain: false,
    })
    .await
    .expect("drain");
    let err = c
        .model_infer(acc(&id, 1, false, false))
        .await
        .expect_err("drained mid-sequence");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let message = err.message();
    assert!(message.contains("'drained'"), "{message}");
    assert!(
        message.contains(&address) && message.contains("draining"),
        "{message}"
    );
    // Back in rotation, the backend still holds the state, but the sequence stays
    // refused: its requests in between were not served, so its sum would be wrong.
    adm.drain_backend(DrainBackendRequest {
        address: address.clone(),
        timeout_ms: 0,
        undrain: true,
    })
    .await
    .expect("undrain");
    let listed = adm
        .list_sequences(ListSequencesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.total, 1);
    assert!(listed.backends[0].sequences[0].lost.contains("draining"));
    let again = c.model_infer(acc(&id, 1, false, false)).await;
    assert_eq!(
        again.err().map(|e| e.code()),
        Some(Code::FailedPrecondition)
    );
    let (sum, _) = answer(
        c.model_infer(acc(&id, 7, true, true))
            .await
            .expect("restart"),
    );
    assert_eq!(sum, 7);
}
