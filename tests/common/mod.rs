//! Shared set-up for the end-to-end tests: simulated backends and gateways on
//! 127.0.0.1:0, clients, and polling with a deadline (never sleeps as synchronisation).
#![allow(dead_code)]

use infergate::config::{BackendConfig, Config};
use infergate::server::{self, GatewayHandle};
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::model_infer_request::InferInputTensor;
use infergate_proto::inference::{InferTensorContents, ModelInferRequest};
use infergate_sim::{SimConfig, SimHandle};
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::Channel;

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A simulated backend named `name`, adjusted by `tweak`.
pub fn sim(name: &str, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = SimConfig {
        listen: loopback(),
        metrics_listen: Some(loopback()),
        name: name.to_owned(),
        latency_ms: 1.0,
        ..SimConfig::default()
    };
    tweak(&mut cfg);
    infergate_sim::spawn(cfg).expect("simulated backend starts")
}

/// A gateway config over `backends` with every port on 127.0.0.1:0 and fast checks.
pub fn config(backends: &[SocketAddr]) -> Config {
    let mut config = Config {
        listen: loopback(),
        metrics_listen: loopback(),
        admin_listen: loopback(),
        ..Config::default()
    };
    config.health.interval_ms = 100;
    config.health.timeout_ms = 200;
    // Tests stop gateways at once; the drain before refusing is for real deployments.
    config.shutdown_drain_ms = 0;
    config.backends = backends
        .iter()
        .map(|a| BackendConfig::new(a.to_string()))
        .collect();
    config
}

pub async fn gateway(config: Config) -> GatewayHandle {
    server::start(config, "test").await.expect("gateway starts")
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

pub async fn client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(channel(addr).await).max_decoding_message_size(256 << 20)
}

/// Triton's classic `simple` request: INPUT0 = 0..16, INPUT1 = `b`, as raw contents.
pub fn simple_request(id: &str, b: i32) -> ModelInferRequest {
    let input0: Vec<i32> = (0..16).collect();
    let input1 = vec![b; 16];
    let raw = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    ModelInferRequest {
        model_name: "simple".into(),
        id: id.into(),
        inputs: ["INPUT0", "INPUT1"]
            .iter()
            .map(|name| InferInputTensor {
                name: (*name).into(),
                datatype: "INT32".into(),
                shape: vec![1, 16],
                ..Default::default()
            })
            .collect(),
        raw_input_contents: vec![raw(&input0), raw(&input1)],
        ..Default::default()
    }
}

/// The same request with typed contents instead of raw bytes.
pub fn simple_request_typed(b: i32) -> ModelInferRequest {
    let mut request = simple_request("typed", b);
    request.raw_input_contents.clear();
    request.inputs[0].contents = Some(InferTensorContents {
        int_contents: (0..16).collect(),
        ..Default::default()
    });
    request.inputs[1].contents = Some(InferTensorContents {
        int_contents: vec![b; 16],
        ..Default::default()
    });
    request
}

pub fn decode_i32(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Polls `check` every 10 ms until it holds or `limit` passes; panics with `what`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP proxy in front of `upstream` that can be frozen: frozen, it stops reading and
/// writing on every connection (new ones are accepted and then held too), as a process
/// stopped with SIGSTOP or a dropped network path looks from outside: the sockets stay
/// open and nothing comes back, not even an HTTP/2 PING's answer.
pub struct FreezableProxy {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    pub async fn start(upstream: SocketAddr) -> FreezableProxy {
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (frozen, _) = tokio::sync::watch::channel(false);
        let watch = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, watch.subscribe()));
                tokio::spawn(pipe(sr, cw, watch.subscribe()));
            }
        });
        FreezableProxy { addr, frozen, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Frozen: neither read nor write until thawed (bytes read just before stay here).
        while *frozen.borrow_and_update() {
            if frozen.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *frozen.borrow_and_update() {
            if frozen.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
