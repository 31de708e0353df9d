//! The client library and `infergate-cli` over TLS, against `infergate demo --tls`'s
//! set-up (a real gateway and three simulated backends, every hop over TLS, with the
//! CA the demo makes). Its own test binary: TLS is switched on for the whole process.

use std::net::SocketAddr;
use std::process::Command;

use infergate::config::Config;
use infergate::demo::{self, DemoTls};
use infergate_client::{build_request, decode_outputs, Client, Tensor, TensorData, TlsOptions};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_and_the_cli_call_a_tls_gateway() {
    let tls = DemoTls::make().expect("certificates");
    let config = Config {
        listen: loopback(),
        metrics_listen: loopback(),
        admin_listen: loopback(),
        ..Config::default()
    };
    let running = demo::start(config, Some(tls.clone()))
        .await
        .expect("demo starts");
    let addr = format!("localhost:{}", running.gateway.addr().port());

    infergate_client::use_tls(TlsOptions {
        ca: Some(tls.ca.clone()),
        ..TlsOptions::default()
    });
    let client = Client::connect(&addr).await.expect("TLS connect");
    let inputs = vec![
        Tensor::new("INPUT0", vec![1, 16], TensorData::Int32((0..16).collect())),
        Tensor::new("INPUT1", vec![1, 16], TensorData::Int32(vec![1; 16])),
    ];
    let response = client
        .infer(build_request("simple", &inputs, &[]).expect("request"))
        .await
        .expect("infer over TLS");
    let outputs = decode_outputs(&response).expect("outputs");
    assert_eq!(
        outputs[0].data,
        TensorData::Int32((1..=16).collect()),
        "OUTPUT0 = INPUT0 + INPUT1"
    );

    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_infergate-cli"))
            .args(args)
            .output()
            .expect("infergate-cli runs")
    };
    let ca = tls.ca.display().to_string();
    let served = cli(&[
        "--addr", &addr, "--tls-ca", &ca, "infer", "--model", "simple",
    ]);
    assert!(
        served.status.success(),
        "infergate-cli --tls-ca: {}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert!(String::from_utf8_lossy(&served.stdout).contains("OUTPUT0"));
    // A CA that did not sign the gateway's certificate: refused, and the error says why.
    let other = DemoTls::make_in(&tls.folder.join("other")).expect("another CA");
    let refused = cli(&[
        "--addr",
        &addr,
        "--tls-ca",
        &other.ca.display().to_string(),
        "health",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    let _ = std::fs::remove_dir_all(&tls.folder);
}
