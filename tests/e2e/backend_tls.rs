//! TLS toward backends: the gateway dials real simulators that serve TLS (with client
//! certificates where asked), with certificates made in the test; a CA that did not
//! sign the backend's certificate fails the call with UNAVAILABLE naming the backend
//! and the certificate.

use crate::common::*;
use infergate::config::BackendTlsConfig;
use infergate::tls::MadeCa;
use infergate_sim::{SimConfig, SimHandle, SimTls};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tonic::Code;

/// A fresh folder for one test's PEM files (shared with `front_tls`).
pub(crate) fn folder(test: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "infergate-tls-test-{}-{test}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp folder");
    dir
}

/// Writes `text` to `dir/name` through a rename, so that a reader (the certificate
/// watcher of a rotation test) never sees half a file.
pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let part = dir.join(format!("{name}.part"));
    std::fs::write(&part, text).expect("write PEM");
    std::fs::rename(&part, &path).expect("rename PEM");
    path
}

/// A CA (written as `NAME-ca.pem`) and a leaf it signed for `localhost`
/// (`NAME.pem`, `NAME.key`).
struct Made {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn made(dir: &Path, name: &str) -> Made {
    let ca = MadeCa::new(&format!("{name} CA")).expect("CA");
    let leaf = ca
        .leaf(&["localhost"], Some(&format!("spiffe://test/{name}")), name)
        .expect("leaf");
    Made {
        ca: write(dir, &format!("{name}-ca.pem"), &ca.cert_pem),
        cert: write(dir, &format!("{name}.pem"), &leaf.cert_pem),
        key: write(dir, &format!("{name}.key"), &leaf.key_pem),
    }
}

fn tls_sim(name: &str, server: &Made, client_ca: Option<&Path>) -> SimHandle {
    sim(name, |c: &mut SimConfig| {
        c.tls = Some(SimTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: client_ca.map(Path::to_path_buf),
        });
    })
}

fn backend_tls(ca: &Path) -> BackendTlsConfig {
    BackendTlsConfig {
        ca: Some(ca.to_path_buf()),
        server_name: Some("localhost".into()),
        ..BackendTlsConfig::default()
    }
}

/// Calls `simple` until it answers (the first health checks decide readiness).
async fn served(addr: std::net::SocketAddr) -> Vec<i32> {
    let mut c = client(addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.model_infer(simple_request("tls", 2)).await {
            Ok(r) => return decode_i32(&r.into_inner().raw_output_contents[0]),
            Err(s) => assert!(
                tokio::time::Instant::now() < deadline,
                "never served over TLS: {s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_dials_a_tls_backend_and_a_wrong_ca_names_the_certificate() {
    let dir = folder("ca");
    let server = made(&dir, "gpu");
    let sim = tls_sim("gpu-tls", &server, None);

    let mut cfg = config(&[sim.addr()]);
    cfg.backend_tls = Some(backend_tls(&server.ca));
    let gw = gateway(cfg).await;
    let sums = served(gw.addr()).await;
    assert_eq!(sums, (0..16).map(|i| i + 2).collect::<Vec<_>>());
    assert!(sim.control().per_model_started("simple") >= 1);

    // The same backend through a gateway that trusts another CA.
    let other = made(&dir, "other");
    let mut cfg = config(&[sim.addr()]);
    cfg.backend_tls = Some(backend_tls(&other.ca));
    let wrong = gateway(cfg).await;
    let mut c = client(wrong.addr()).await;
    let backend = sim.addr().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = c
            .model_infer(simple_request("wrong-ca", 1))
            .await
            .expect_err("a backend whose certificate the CA did not sign serves nothing");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // Before the first check the call itself meets the handshake; after it, the
        // pool says why the backend is not ready. Both name the backend and the cause.
        if status.message().contains(&backend) && status.message().contains("certificate") {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal never named the backend and the certificate: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("wrong CA: {}", status.message());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_reach_a_backend_that_asks_and_tls_false_stays_plain() {
    let dir = folder("mtls");
    let server = made(&dir, "gpu");
    let gateway_id = made(&dir, "gateway");
    // The backend only takes clients whose certificate the gateway's CA signed.
    let strict = tls_sim("gpu-mtls", &server, Some(&gateway_id.ca));
    let plain = sim("gpu-plain", |_| {});

    let mut cfg = config(&[strict.addr(), plain.addr()]);
    cfg.backend_tls = Some(BackendTlsConfig {
        cert: Some(gateway_id.cert.clone()),
        key: Some(gateway_id.key.clone()),
        ..backend_tls(&server.ca)
    });
    cfg.backends[1].tls = Some(false);
    let gw = gateway(cfg).await;
    served(gw.addr()).await;
    eventually("both backends ready", Duration::from_secs(10), || {
        gw.pool()
            .endpoints()
            .iter()
            .all(|e| e.health() == infergate::endpoint::Health::Ready)
    })
    .await;
    let mut c = client(gw.addr()).await;
    for i in 0..40 {
        c.model_infer(simple_request(&format!("m-{i}"), 1))
            .await
            .expect("served");
    }
    assert!(
        strict.control().per_model_started("simple") > 0,
        "the mTLS backend served"
    );
    assert!(
        plain.control().per_model_started("simple") > 0,
        "the plain backend served"
    );

    // Without the client certificate the strict backend refuses the handshake.
    let mut cfg = config(&[strict.addr()]);
    cfg.backend_tls = Some(backend_tls(&server.ca));
    let anonymous = gateway(cfg).await;
    let mut c = client(anonymous.addr()).await;
    let status = c
        .model_infer(simple_request("no-cert", 1))
        .await
        .expect_err("refused without a client certificate");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&strict.addr().to_string()),
        "{status:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
