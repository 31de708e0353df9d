//! TLS for every hop: the certificates, keys and CAs read from PEM files, the rustls
//! server config of the inference and admin ports (ALPN h2, a minimum version, client
//! certificates checked against a CA), the client config toward backends, and the
//! identity a client certificate carries. Beside the request path: the ports' accept
//! loops and the backend connector use what it builds.
//!
//! Why a resolver ([`RotatingCert`]) rather than a fixed certificate: certificates are
//! short-lived in a mesh and are re-issued while the gateway runs. Each handshake asks
//! the resolver for the pair it holds now, so [`ServerTls::reload`] swaps in a new pair
//! for new handshakes while existing connections go on with theirs; a new pair that
//! does not load (a missing file, a key that does not match the certificate) leaves the
//! old one in place and says which file and why.
//!
//! Only the `ring` provider is built in (no aws-lc-rs, which needs cmake), and PEM is
//! read by rustls-pki-types. The identity of a client certificate is its first SAN URI
//! (a SPIFFE ID), else its first SAN DNS name, else its subject CN (x509-parser reads
//! the certificate).

use crate::config::{BackendTlsConfig, TlsConfig, TlsVersion};
use infergate_base::tls::{load_certs, load_key, load_roots, provider, SYSTEM_CA_BUNDLE};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

static FROM_1_2: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];
static FROM_1_3: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::V1_2 => &FROM_1_2,
        TlsVersion::V1_3 => &FROM_1_3,
    }
}

/// A certificate chain and its key, checked to belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| {
        format!(
            "{}: the key does not match the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(pair))
}

/// The pair a port presents now; swapped by [`ServerTls::reload`].
#[derive(Debug)]
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|pair| Arc::clone(&pair))
    }
}

/// The files a port's pair is read from, and how they last looked on disk.
#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    stamp: std::sync::Mutex<Option<Stamp>>,
}

type Stamp = [(Option<std::time::SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.modified().ok(), m.len()))
            .unwrap_or((None, 0))
    };
    [one(cert), one(key)]
}

/// Server TLS of one port: the rustls config and its rotating pair.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    cert: Arc<RotatingCert>,
    files: Arc<Files>,
    require_client_cert: bool,
}

impl ServerTls {
    /// Reads `[tls]` (or `[admin.tls]`) and builds the server config; the error names
    /// the file and the reason.
    pub fn new(cfg: &TlsConfig) -> Result<ServerTls, String> {
        let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
            return Err("TLS needs both `cert` and `key`".into());
        };
        let pair = load_pair(cert, key)?;
        let rotating = Arc::new(RotatingCert {
            current: RwLock::new(pair),
        });
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(cfg.min_version))
            .map_err(|e| format!("min_version: {e}"))?;
        let builder = match &cfg.client_ca {
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
                let verifier = if cfg.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&rotating) as _);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            cert: rotating,
            files: Arc::new(Files {
                cert: cert.clone(),
                key: key.clone(),
                stamp: std::sync::Mutex::new(Some(stamp(cert, key))),
            }),
            require_client_cert: cfg.require_client_cert,
        })
    }

    /// The acceptor for new connections (each handshake asks for the current pair).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Whether a client certificate is required (then the tenant always comes from it).
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }

    /// The pair presented now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.cert.current.read().ok().map(|p| Arc::clone(&p))
    }

    /// Re-reads the pair if its files changed (`force`: even if they look the same,
    /// as on SIGHUP). Ok(true): a new pair is in place; Ok(false): nothing changed;
    /// Err: the old pair stays, and the message names the file and the reason.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let now = stamp(&self.files.cert, &self.files.key);
        {
            let mut last = self
                .files
                .stamp
                .lock()
                .map_err(|_| "TLS reload state poisoned".to_owned())?;
            if !force && last.as_ref() == Some(&now) {
                return Ok(false);
            }
            // Remember it even if it fails, so a bad pair is reported once, not every tick.
            *last = Some(now);
        }
        let pair = load_pair(&self.files.cert, &self.files.key)?;
        if let Ok(mut current) = self.cert.current.write() {
            *current = pair;
        }
        Ok(true)
    }

    /// Re-reads the pair every `every` and on SIGHUP until `shutdown`; each outcome is
    /// logged and published on the event bus (`tls_reloaded`, `tls_reload_failed`).
    pub async fn watch(
        self,
        port: &'static str,
        every: std::time::Duration,
        events: crate::events::EventBus,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<Option<()>>();
            let force = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = signalled => true,
                _ = shutdown.changed() => return,
            };
            match self.reload(force) {
                Ok(false) => {}
                Ok(true) => events.publish(
                    "tls_reloaded",
                    "",
                    "",
                    format!(
                        "{port}: new certificate from {} in use for new connections",
                        self.files.cert.display()
                    ),
                ),
                Err(reason) => {
                    tracing::error!(
                        port,
                        "TLS certificate not reloaded, the old one stays: {reason}"
                    );
                    events.publish(
                        "tls_reload_failed",
                        "",
                        "",
                        format!("{port}: the old certificate stays: {reason}"),
                    );
                }
            }
        }
    }
}

/// The rustls client config toward backends, from `[backend_tls]` (None: the system
/// CA bundle, no client certificate); errors name the field.
pub fn client_config(cfg: Option<&BackendTlsConfig>) -> Result<Arc<ClientConfig>, String> {
    let ca = cfg
        .and_then(|c| c.ca.clone())
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
    let identity = cfg.and_then(|c| c.cert.as_deref().zip(c.key.as_deref()));
    infergate_base::tls::client_config(&ca, identity).map_err(|e| format!("backend_tls: {e}"))
}

/// Who a client certificate names: its first SAN URI (a SPIFFE ID), else its first
/// SAN DNS name, else its subject CN; None when it names nobody or does not parse.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    };
    let cn = || {
        parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    uri.or_else(dns).or_else(cn).filter(|s| !s.is_empty())
}

/// The identity a TLS connection's client presented, put in each call's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// DER as PEM text (`label`: `CERTIFICATE`, `PRIVATE KEY`).
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Certificates made on the spot (rcgen), for `infergate demo --tls` and the tests:
/// one CA, and leaves it signs.
pub struct MadeCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

/// A leaf certificate and its key, PEM.
pub struct MadeLeaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The key (PKCS#8), PEM.
    pub key_pem: String,
}

impl MadeCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<MadeCa, String> {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(MadeCa {
            cert_pem: pem("CERTIFICATE", cert.der()),
            params,
            key,
        })
    }

    /// A leaf for `dns_names` (server or client), with `uri` as a SAN URI if given and
    /// `cn` as its subject CN.
    pub fn leaf(
        &self,
        dns_names: &[&str],
        uri: Option<&str>,
        cn: &str,
    ) -> Result<MadeLeaf, String> {
        let mut params = rcgen::CertificateParams::new(
            dns_names
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(uri) = uri {
            let uri = rcgen::string::Ia5String::try_from(uri).map_err(|e| e.to_string())?;
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok(MadeLeaf {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: pem("PRIVATE KEY", &key.serialize_der()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("infergate-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }

    fn write(d: &Dir, name: &str, text: &str) -> PathBuf {
        let p = d.0.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn identities_prefer_san_uri_then_dns_then_cn() {
        let ca = MadeCa::new("test ca").expect("ca");
        let der = |leaf: &MadeLeaf| {
            CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("pem")
        };
        let spiffe = ca
            .leaf(&["a.example"], Some("spiffe://example.org/team-a"), "cn-a")
            .expect("leaf");
        assert_eq!(
            identity(&der(&spiffe)).as_deref(),
            Some("spiffe://example.org/team-a")
        );
        let dns = ca.leaf(&["b.example"], None, "cn-b").expect("leaf");
        assert_eq!(identity(&der(&dns)).as_deref(), Some("b.example"));
        let cn = ca.leaf(&[], None, "cn-c").expect("leaf");
        assert_eq!(identity(&der(&cn)).as_deref(), Some("cn-c"));
    }

    #[test]
    fn bad_files_are_named_with_the_reason() {
        let d = dir("bad");
        let ca = MadeCa::new("ca").expect("ca");
        let one = ca.leaf(&["localhost"], None, "one").expect("leaf");
        let two = ca.leaf(&["localhost"], None, "two").expect("leaf");
        let cert = write(&d, "cert.pem", &one.cert_pem);
        let key = write(&d, "key.pem", &two.key_pem);
        let err = load_pair(&cert, &key).expect_err("mismatch");
        assert!(
            err.contains("key.pem") && err.contains("does not match"),
            "{err}"
        );
        let missing = d.0.join("nope.pem");
        let err = load_certs(&missing).expect_err("missing");
        assert!(err.contains("nope.pem"), "{err}");
        let empty = write(&d, "empty.pem", "not pem at all\n");
        assert!(load_certs(&empty)
            .expect_err("empty")
            .contains("no PEM certificate"));
        let cfg = TlsConfig {
            cert: Some(cert),
            key: Some(empty),
            ..TlsConfig::default()
        };
        assert!(ServerTls::new(&cfg)
            .expect_err("no key")
            .contains("empty.pem"));
    }

    /// A real handshake over loopback: mTLS with a known client, the server sees the
    /// client's SAN URI; a rotated pair is presented to the next connection; a bad new
    /// pair changes nothing.
    #[tokio::test]
    async fn mtls_handshake_identity_and_rotation() {
        let d = dir("rotate");
        let ca = MadeCa::new("ca").expect("ca");
        let server_one = ca.leaf(&["localhost"], None, "server-one").expect("leaf");
        let client = ca
            .leaf(&[], Some("spiffe://example.org/team-a"), "client")
            .expect("leaf");
        let cert = write(&d, "cert.pem", &server_one.cert_pem);
        let key = write(&d, "key.pem", &server_one.key_pem);
        let ca_file = write(&d, "ca.pem", &ca.cert_pem);
        let client_cert = write(&d, "client.pem", &client.cert_pem);
        let client_key = write(&d, "client.key", &client.key_pem);
        let server = ServerTls::new(&TlsConfig {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            client_ca: Some(ca_file.clone()),
            require_client_cert: true,
            min_version: TlsVersion::V1_2,
        })
        .expect("server tls");
        let client_cfg = client_config(Some(&BackendTlsConfig {
            ca: Some(ca_file),
            cert: Some(client_cert),
            key: Some(client_key),
            server_name: None,
        }))
        .expect("client tls");
        let no_cert = client_config(Some(&BackendTlsConfig {
            ca: Some(d.0.join("ca.pem")),
            ..BackendTlsConfig::default()
        }))
        .expect("client tls");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor_of = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor_of.acceptor();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let who = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(identity)
                            .unwrap_or_default();
                        let _ = tls.write_all(format!("{who}\n").as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let call = |cfg: Arc<ClientConfig>| async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(identity);
            let mut got = String::new();
            tls.read_to_string(&mut got)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((presented, got))
        };
        let (presented, got) = call(Arc::clone(&client_cfg)).await.expect("mtls");
        assert_eq!(got.trim(), "spiffe://example.org/team-a");
        assert_eq!(presented.as_deref(), Some("localhost"));
        // Without a client certificate the server ends the handshake (TLS 1.3 reports
        // it on the first read).
        assert!(
            call(no_cert).await.is_err(),
            "no client cert must be refused"
        );

        // A bad new pair: the old one stays.
        std::fs::write(&key, ca.leaf(&["x"], None, "x").expect("leaf").key_pem).expect("write");
        let err = server.reload(true).expect_err("mismatch");
        assert!(err.contains("key.pem"), "{err}");
        assert!(call(Arc::clone(&client_cfg)).await.is_ok());
        // A good new pair (SAN DNS `localhost`, CN server-two) is used for new connections.
        let two = ca.leaf(&["localhost"], None, "server-two").expect("leaf");
        std::fs::write(&cert, &two.cert_pem).expect("write");
        std::fs::write(&key, &two.key_pem).expect("write");
        assert!(server.reload(true).expect("reload"));
        let leaf = server.current().expect("pair");
        let now = CertificateDer::from_pem_slice(two.cert_pem.as_bytes()).expect("pem");
        assert_eq!(leaf.cert[0], now);
        assert!(call(client_cfg).await.is_ok());
        assert!(
            !server.reload(false).expect("unchanged"),
            "same files: nothing to do"
        );
    }
}
