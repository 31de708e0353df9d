//! TLS on the front door, from the outside: mTLS refusals (no client certificate, one
//! from a CA the gateway does not trust), the identity in a trusted certificate as the
//! tenant the backend is told, and certificate rotation while calls flow (no call
//! fails, new connections see the new certificate).

use crate::backend_tls::{folder, write};
use crate::common::*;
use infergate::config::{BackendTlsConfig, TlsConfig};
use infergate::tls::MadeCa;
use infergate_base::tls::Connector;
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// A leaf of `ca` for `localhost` with SAN URI `uri`, written as NAME.pem / NAME.key.
fn leaf(dir: &Path, ca: &MadeCa, name: &str, uri: &str) -> (PathBuf, PathBuf, String) {
    let made = ca.leaf(&["localhost"], Some(uri), name).expect("leaf");
    let key = write(dir, &format!("{name}.key"), &made.key_pem);
    let cert = write(dir, &format!("{name}.pem"), &made.cert_pem);
    (cert, key, made.cert_pem)
}

/// A client of the front door at `addr` over TLS trusting `ca`, showing `identity`
/// (certificate and key files) when given.
async fn tls_client(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<GrpcInferenceServiceClient<Channel>, String> {
    let config = BackendTlsConfig {
        ca: Some(ca.to_path_buf()),
        cert: identity.map(|(c, _)| c.to_path_buf()),
        key: identity.map(|(_, k)| k.to_path_buf()),
        server_name: None,
    };
    let client = infergate::tls::client_config(Some(&config))?;
    let connector = Connector::new(client, "localhost", &addr.to_string())?;
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// One `simple` call through a fresh TLS connection: the error as text, if any.
async fn one_call(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<(), String> {
    let mut c = tls_client(addr, ca, identity).await?;
    c.model_infer(simple_request("tls", 1))
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_strangers_and_names_the_tenant_from_the_certificate() {
    let dir = folder("mtls");
    let server_ca = MadeCa::new("front CA").expect("CA");
    let client_ca = MadeCa::new("clients CA").expect("CA");
    let rogue_ca = MadeCa::new("rogue CA").expect("CA");
    let server_ca_file = write(&dir, "server-ca.pem", &server_ca.cert_pem);
    let client_ca_file = write(&dir, "clients-ca.pem", &client_ca.cert_pem);
    let (cert, key, _) = leaf(&dir, &server_ca, "gateway", "spiffe://test/gateway");
    let (alice, alice_key, _) = leaf(&dir, &client_ca, "alice", "spiffe://test/alice");
    let (mallory, mallory_key, _) = leaf(&dir, &rogue_ca, "mallory", "spiffe://test/alice");

    let backend = sim("mtls-backend", |_| {});
    let mut cfg = config(&[backend.addr()]);
    cfg.tls = TlsConfig {
        cert: Some(cert),
        key: Some(key),
        client_ca: Some(client_ca_file),
        require_client_cert: true,
        ..TlsConfig::default()
    };
    cfg.tenants
        .identities
        .insert("spiffe://test/alice".into(), "team-a".into());
    let gw = gateway(cfg).await;

    let anonymous = one_call(gw.addr(), &server_ca_file, None).await;
    assert!(anonymous.is_err(), "served without a client certificate");
    let stranger = one_call(gw.addr(), &server_ca_file, Some((&mallory, &mallory_key))).await;
    assert!(stranger.is_err(), "served a certificate from an unknown CA");
    assert_eq!(backend.control().per_model_started("simple"), 0);

    one_call(gw.addr(), &server_ca_file, Some((&alice, &alice_key)))
        .await
        .expect("a trusted client certificate is served");
    assert_eq!(
        backend
            .control()
            .last_request_metadata("infergate-tenant")
            .as_deref(),
        Some("team-a"),
        "the backend is told the tenant the certificate names"
    );
    println!("no certificate: {anonymous:?}\nunknown CA: {stranger:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The certificate the front door presents to a new connection now.
async fn presented(addr: SocketAddr, ca: &Path) -> Option<CertificateDer<'static>> {
    let config = BackendTlsConfig {
        ca: Some(ca.to_path_buf()),
        ..BackendTlsConfig::default()
    };
    let client = infergate::tls::client_config(Some(&config)).ok()?;
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from("localhost").ok()?;
    let stream = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .ok()?;
    stream.get_ref().1.peer_certificates()?.first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_no_call_fails() {
    let dir = folder("rotate");
    let ca = MadeCa::new("rotation CA").expect("CA");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let (cert, key, first_pem) = leaf(&dir, &ca, "front", "spiffe://test/first");
    let backend = sim("rotate-backend", |_| {});
    let mut cfg = config(&[backend.addr()]);
    cfg.tls = TlsConfig {
        cert: Some(cert),
        key: Some(key),
        ..TlsConfig::default()
    };
    let gw = gateway(cfg).await;
    let first = CertificateDer::from_pem_slice(first_pem.as_bytes()).expect("PEM");
    assert_eq!(presented(gw.addr(), &ca_file).await, Some(first.clone()));

    // Callers on their own connections, each bounded in count.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut callers = Vec::new();
    for w in 0..4 {
        let mut c = tls_client(gw.addr(), &ca_file, None)
            .await
            .expect("TLS client");
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.model_infer(simple_request(&format!("{w}-{i}"), 1)).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    eventually("calls flow", Duration::from_secs(5), || {
        served.load(Ordering::Relaxed) > 20
    })
    .await;

    // The same files, a new pair: the key first, then the certificate, each through a
    // rename.
    let (_, _, second_pem) = leaf(&dir, &ca, "front", "spiffe://test/second");
    let second = CertificateDer::from_pem_slice(second_pem.as_bytes()).expect("PEM");
    assert_ne!(first, second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while presented(gw.addr(), &ca_file).await.as_ref() != Some(&second) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_rotation = served.load(Ordering::Relaxed);
    eventually(
        "calls go on after the rotation",
        Duration::from_secs(5),
        || served.load(Ordering::Relaxed) > at_rotation + 20,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.expect("caller");
    }
    println!(
        "rotation under load: {} calls served, {} failed",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call fails across a rotation"
    );
    let _ = std::fs::remove_dir_all(dir);
}
