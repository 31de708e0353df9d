//! The TLS pieces every infergate program shares: PEM certificates, keys and CAs read
//! through rustls-pki-types, the one crypto provider (ring; no aws-lc-rs, which needs
//! cmake), a client config with ALPN h2, and [`Connector`], which dials a TLS
//! connection for a tonic channel. The gateway dials backends with it, `infergate-cli`
//! dials the gateway, and the simulator serves with the same loaders.

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// The system's CA bundle, trusted when no CA file is named.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The one crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain, leaf first, or a set of CAs).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The CAs of a PEM file, as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A client config trusting the CAs in `ca` (TLS 1.2 and 1.3, ALPN h2), showing the
/// certificate chain and key in `identity` to servers that ask. Errors name the file.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = load_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| format!("{}: {e}", key.display()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Dials one server over TLS: TCP without Nagle, then the rustls handshake, checking
/// the server's certificate against `name`. It is a tonic channel's connector, so
/// every call on that channel uses the same handshake; each new connection starts from
/// the client config it was built with.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    shown_name: String,
    address: String,
}

impl Connector {
    /// `address` is `host:port`; `name` the DNS name or IP the certificate must carry.
    pub fn new(config: Arc<ClientConfig>, name: &str, address: &str) -> Result<Connector, String> {
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| format!("`{name}` is not a DNS name or IP address"))?;
        Ok(Connector {
            tls: tokio_rustls::TlsConnector::from(config),
            name: server_name,
            shown_name: name.to_owned(),
            address: address.to_owned(),
        })
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            let stream = this.tls.connect(this.name, tcp).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("TLS handshake as `{}` failed: {e}", this.shown_name),
                )
            })?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
