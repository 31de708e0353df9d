//! End-to-end control plane: the Admin API against a running gateway under load. Drain,
//! eject and readmit, add a backend, change a model's limits, a refused reload, the
//! event stream reporting each change, and the token check.

use crate::common::*;
use futures_util::StreamExt;
use infergate_proto::admin::admin_client::AdminClient;
use infergate_proto::admin::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const TOKEN: &str = "test-admin-token";

type Admin = AdminClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn with_token(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    Ok(r)
}

/// `address` as `ListBackends` shows it.
async fn listed_backend(adm: &mut Admin, address: &str) -> Backend {
    adm.list_backends(ListBackendsRequest {})
        .await
        .expect("list")
        .into_inner()
        .backends
        .into_iter()
        .find(|b| b.address == address)
        .expect("listed")
}

async fn admin(gw: &infergate::server::GatewayHandle) -> Admin {
    AdminClient::with_interceptor(channel(gw.admin_addr()).await, with_token as fn(_) -> _)
}

async fn setup(
    n: usize,
) -> (
    Vec<infergate_sim::SimHandle>,
    infergate::server::GatewayHandle,
) {
    let sims: Vec<_> = (0..n).map(|i| sim(&format!("gpu-{i}"), |_| {})).collect();
    let mut cfg = config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>());
    cfg.admin.token = Some(TOKEN.into());
    cfg.balancer.slow_start_ms = 0;
    (sims, gateway(cfg).await)
}

/// Events seen by a watcher, collected in the background.
fn watch(mut stream: tonic::Streaming<Event>) -> Arc<std::sync::Mutex<Vec<Event>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            if let Ok(mut v) = out.lock() {
                v.push(event);
            }
        }
    });
    seen
}

fn kinds(seen: &std::sync::Mutex<Vec<Event>>) -> BTreeSet<String> {
    seen.lock()
        .map(|v| v.iter().map(|e| e.kind.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_refuses_calls_without_the_token() {
    let (_sims, gw) = setup(1).await;
    let mut anonymous = AdminClient::new(channel(gw.admin_addr()).await);
    let status = anonymous
        .list_backends(ListBackendsRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{}", status.message());
    let mut wrong = AdminClient::with_interceptor(
        channel(gw.admin_addr()).await,
        |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer nope".parse().expect("ascii"));
            Ok(r)
        },
    );
    assert_eq!(
        wrong
            .list_backends(ListBackendsRequest {})
            .await
            .expect_err("wrong")
            .code(),
        Code::Unauthenticated
    );
    let listed = admin(&gw)
        .await
        .list_backends(ListBackendsRequest {})
        .await
        .expect("with token");
    assert_eq!(listed.into_inner().backends.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_no_call_and_returns_when_idle() {
    let (sims, gw) = setup(3).await;
    let mut adm = admin(&gw).await;
    let events = watch(
        adm.watch_events(WatchEventsRequest {})
            .await
            .expect("watch")
            .into_inner(),
    );
    let c = client(gw.addr()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (mut c, stop, failed) = (c.clone(), stop.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 50_000 {
                    i += 1;
                    if c.model_infer(simple_request(&format!("{w}-{i}"), 1))
                        .await
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    eventually("traffic on every backend", Duration::from_secs(5), || {
        sims.iter().all(|s| s.control().completed() > 10)
    })
    .await;
    let target = sims[0].addr().to_string();
    let drained = adm
        .drain_backend(DrainBackendRequest {
            address: target.clone(),
            timeout_ms: 5000,
            undrain: false,
        })
        .await
        .expect("drain")
        .into_inner();
    assert!(
        drained.idle,
        "drain returns once in-flight calls ended: {drained:?}"
    );
    let after_drain = sims[0].control().started();
    let others_before: u64 = sims[1..].iter().map(|s| s.control().started()).sum();
    eventually("the others keep serving", Duration::from_secs(5), || {
        sims[1..].iter().map(|s| s.control().started()).sum::<u64>() > others_before + 100
    })
    .await;
    assert_eq!(
        sims[0].control().started(),
        after_drain,
        "a drained backend gets no new calls"
    );
    let b = listed_backend(&mut adm, &target).await;
    assert!(b.draining);
    assert_eq!(b.health, "ready", "drain is not a failure");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed during the drain"
    );
    eventually("the drain was reported", Duration::from_secs(2), || {
        kinds(&events).contains("backend_draining")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eject_readmit_add_weight_and_model_limits_at_run_time() {
    let (sims, gw) = setup(2).await;
    let mut adm = admin(&gw).await;
    let events = watch(
        adm.watch_events(WatchEventsRequest {})
            .await
            .expect("watch")
            .into_inner(),
    );
    let mut c = client(gw.addr()).await;
    let a = sims[0].addr().to_string();

    // Eject by hand: no calls; readmit: calls again.
    let b = adm
        .eject_backend(EjectBackendRequest {
            address: a.clone(),
            duration_ms: 60_000,
            reason: "maintenance".into(),
        })
        .await
        .expect("eject")
        .into_inner();
    assert!(b.ejected);
    assert!(
        b.ejection_reason.contains("maintenance"),
        "{}",
        b.ejection_reason
    );
    let before = sims[0].control().started();
    for i in 0..20 {
        c.model_infer(simple_request(&format!("e{i}"), 1))
            .await
            .expect("served by the other");
    }
    assert_eq!(sims[0].control().started(), before);
    let b = adm
        .readmit_backend(ReadmitBackendRequest { address: a.clone() })
        .await
        .expect("readmit")
        .into_inner();
    assert!(!b.ejected);
    for i in 0..40 {
        c.model_infer(simple_request(&format!("r{i}"), 1))
            .await
            .expect("infer");
    }
    assert!(
        sims[0].control().started() > before,
        "readmitted backend takes calls again"
    );

    // Add a backend at run time: it takes traffic.
    let newcomer = sim("gpu-new", |_| {});
    let added = adm
        .add_backend(AddBackendRequest {
            address: newcomer.addr().to_string(),
            ..Default::default()
        })
        .await
        .expect("add")
        .into_inner();
    assert_eq!(added.source, "admin");
    let newcomer_endpoint = gw
        .pool()
        .endpoint(&newcomer.addr().to_string())
        .expect("in the pool");
    eventually(
        "the new backend is ready and indexed",
        Duration::from_secs(5),
        || newcomer_endpoint.is_eligible() && newcomer_endpoint.serves("simple"),
    )
    .await;
    for i in 0..60 {
        c.model_infer(simple_request(&format!("n{i}"), 1))
            .await
            .expect("infer");
    }
    assert!(
        newcomer.control().started() > 0,
        "the added backend takes traffic"
    );
    let weighted = adm
        .set_weight(SetWeightRequest {
            address: a.clone(),
            weight: 5,
        })
        .await
        .expect("weight")
        .into_inner();
    assert_eq!(weighted.weight, 5);
    let missing = adm
        .set_weight(SetWeightRequest {
            address: "10.9.9.9:1".into(),
            weight: 2,
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);

    // Change a model's bulkhead at run time and see it enforced.
    for s in &sims {
        s.control().set_extra_latency_ms(300);
    }
    newcomer.control().set_extra_latency_ms(300);
    let m = adm
        .update_model(UpdateModelRequest {
            name: "simple".into(),
            policy: "least_request".into(),
            max_concurrent: Some(1),
            max_queue: Some(0),
            queue_timeout_ms: Some(50),
            fallback: None,
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(m.policy, "least_request");
    assert_eq!(m.bulkhead.as_ref().map(|b| b.max_concurrent), Some(1));
    let slow = tokio::spawn({
        let mut c = c.clone();
        async move { c.model_infer(simple_request("holder", 1)).await }
    });
    let policy = gw.control().gateway().models.get("simple");
    eventually(
        "one call holds the only slot",
        Duration::from_secs(5),
        || {
            policy
                .bulkhead
                .as_ref()
                .is_some_and(|b| b.stats().active == 1)
        },
    )
    .await;
    let refused = c
        .model_infer(simple_request("second", 1))
        .await
        .expect_err("bulkhead full");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("simple"),
        "{}",
        refused.message()
    );
    assert!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "pushback trailer"
    );
    slow.await.expect("join").expect("the holder finishes");

    let listed = adm
        .list_models(ListModelsRequest {})
        .await
        .expect("models")
        .into_inner();
    let simple = listed
        .models
        .iter()
        .find(|m| m.name == "simple")
        .expect("simple listed");
    assert_eq!(
        simple.bulkhead.as_ref().map(|b| b.rejected_full_total),
        Some(1)
    );
    eventually("every change was reported", Duration::from_secs(3), || {
        let k = kinds(&events);
        [
            "backend_ejected",
            "backend_readmitted",
            "backend_added",
            "weight_changed",
            "model_updated",
        ]
        .iter()
        .all(|x| k.contains(*x))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_is_refused_and_nothing_changes() {
    let (sims, gw) = setup(2).await;
    let mut adm = admin(&gw).await;
    let events = watch(
        adm.watch_events(WatchEventsRequest {})
            .await
            .expect("watch")
            .into_inner(),
    );
    let before = adm
        .get_config(GetConfigRequest {})
        .await
        .expect("config")
        .into_inner()
        .toml;
    assert!(before.contains(&sims[0].addr().to_string()));
    assert!(!before.contains(TOKEN), "the token is never shown");
    let bad = format!(
        "[[backends]]\naddress = \"{}\"\n[balancer]\npolicy = \"fastest\"\n",
        sims[0].addr()
    );
    let refused = adm
        .reload_config(ReloadConfigRequest { toml: bad })
        .await
        .expect_err("bad config");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("fastest"),
        "{}",
        refused.message()
    );
    let after = adm
        .get_config(GetConfigRequest {})
        .await
        .expect("config")
        .into_inner()
        .toml;
    assert_eq!(after, before, "nothing changed");
    assert_eq!(gw.pool().endpoints().len(), 2);

    // A good reload that drops one backend drains and removes it.
    let good = format!("[[backends]]\naddress = \"{}\"\n", sims[1].addr());
    let applied = adm
        .reload_config(ReloadConfigRequest { toml: good })
        .await
        .expect("good config")
        .into_inner();
    assert!(
        applied
            .changes
            .iter()
            .any(|c| c.contains("removing backend")),
        "{:?}",
        applied.changes
    );
    eventually(
        "the dropped backend leaves the pool",
        Duration::from_secs(5),
        || gw.pool().endpoints().len() == 1,
    )
    .await;
    eventually("reload events", Duration::from_secs(2), || {
        let k = kinds(&events);
        k.contains("config_rejected")
            && k.contains("config_reloaded")
            && k.contains("backend_removed")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_show_what_one_call_takes_and_the_service_time() {
    let sims: Vec<_> = (0..2).map(|i| sim(&format!("gpu-{i}"), |_| {})).collect();
    let mut cfg = config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>());
    cfg.admin.token = Some(TOKEN.into());
    cfg.backends[0].capacity = Some(4);
    let gw = gateway(cfg).await;
    let mut c = client(gw.addr()).await;
    for i in 0..20 {
        c.model_infer(simple_request(&format!("call-{i}"), 1))
            .await
            .expect("call");
    }
    let mut adm = admin(&gw).await;
    let configured = listed_backend(&mut adm, &sims[0].addr().to_string()).await;
    let learned = listed_backend(&mut adm, &sims[1].addr().to_string()).await;
    assert_eq!(configured.capacity, 4);
    assert_eq!(configured.per_call_share, 0.25);
    assert_eq!(learned.capacity, 0);
    for b in [&configured, &learned] {
        // Both served calls (20 calls, two backends: each got some) and reported
        // their running calls with each answer (the simulator always does).
        assert!(b.service_time_ms > 0.0, "{b:?}");
        assert!(b.reported_running >= 0.0, "{b:?}");
        assert!(b.reported_running <= 4.0, "{b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_config_reloads_to_itself_and_reload_drops_a_removed_fallback() {
    let sims: Vec<_> = (0..2).map(|i| sim(&format!("r-{i}"), |_| {})).collect();
    let mut cfg = config(&sims.iter().map(|s| s.addr()).collect::<Vec<_>>());
    cfg.admin.token = Some(TOKEN.into());
    cfg.tenants
        .api_keys
        .insert("secret-key-a".into(), "team-a".into());
    cfg.models.insert(
        "simple".into(),
        infergate::config::ModelConfig {
            fallback: Some("fb_model".into()),
            ..Default::default()
        },
    );
    let gw = gateway(cfg).await;
    let mut adm = admin(&gw).await;
    let get = |adm: &mut Admin| {
        let mut adm = adm.clone();
        async move {
            adm.get_config(GetConfigRequest {})
                .await
                .expect("config")
                .into_inner()
                .toml
        }
    };
    let first = get(&mut adm).await;
    assert!(
        !first.contains("secret-key-a"),
        "keys are never shown\n{first}"
    );
    assert!(!first.contains(TOKEN), "the token is never shown");
    // GetConfig's output reloads to the same config: placeholders keep the secrets.
    adm.reload_config(ReloadConfigRequest {
        toml: first.clone(),
    })
    .await
    .expect("GetConfig's own output reloads");
    let second = get(&mut adm).await;
    assert_eq!(second, first, "the round trip changes nothing");
    let keys = &gw.control().config().tenants.api_keys;
    assert_eq!(keys.get("secret-key-a").map(String::as_str), Some("team-a"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(
        gw.control().config().admin.token.as_deref(),
        Some(TOKEN),
        "the token stays"
    );

    // The fallback removed from the file is gone from ListModels too.
    let listed = |adm: &mut Admin| {
        let mut adm = adm.clone();
        async move {
            adm.list_models(ListModelsRequest {})
                .await
                .expect("models")
                .into_inner()
                .models
                .into_iter()
                .find(|m| m.name == "simple")
                .map(|m| m.fallback)
        }
    };
    assert_eq!(listed(&mut adm).await.as_deref(), Some("fb_model"));
    let without = first.replace("fallback = \"fb_model\"\n", "");
    assert_ne!(
        without, first,
        "the fallback line was in the TOML:\n{first}"
    );
    adm.reload_config(ReloadConfigRequest { toml: without })
        .await
        .expect("reload without the fallback");
    assert_eq!(
        listed(&mut adm).await.as_deref(),
        Some(""),
        "the same policy as a fresh start"
    );
}

/// Certificates for the admin mTLS test, written to a scratch folder removed on drop.
struct Certs {
    dir: std::path::PathBuf,
    ca: infergate::tls::MadeCa,
}

impl Certs {
    fn new(name: &str) -> Certs {
        let dir =
            std::env::temp_dir().join(format!("infergate-admin-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let ca = infergate::tls::MadeCa::new("admin ca").expect("ca");
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write ca");
        Certs { dir, ca }
    }

    /// Writes a leaf (SAN DNS `dns`, SAN URI `uri`) as NAME.pem and NAME.key.
    fn leaf(&self, name: &str, dns: &[&str], uri: Option<&str>) -> (PathBuf, PathBuf) {
        let leaf = self.ca.leaf(dns, uri, name).expect("leaf");
        let (cert, key) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, leaf.cert_pem).expect("write cert");
        std::fs::write(&key, leaf.key_pem).expect("write key");
        (cert, key)
    }

    /// The admin port's TLS: the gateway's pair, client certificates asked for (not
    /// required, so that a caller with only the token can still connect).
    fn server(&self) -> infergate::config::TlsConfig {
        let (cert, key) = self.leaf("gateway", &["localhost"], None);
        infergate::config::TlsConfig {
            cert: Some(cert),
            key: Some(key),
            client_ca: Some(self.dir.join("ca.pem")),
            ..infergate::config::TlsConfig::default()
        }
    }

    /// A TLS channel to `addr` presenting `pair` (none: no client certificate).
    async fn channel(&self, addr: SocketAddr, pair: Option<(PathBuf, PathBuf)>) -> Channel {
        let (cert, key) = pair.unzip();
        let tls = infergate::tls::client_config(Some(&infergate::config::BackendTlsConfig {
            ca: Some(self.dir.join("ca.pem")),
            cert,
            key,
            server_name: None,
        }))
        .expect("client tls");
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = Arc::clone(&tls);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .expect("tls connect")
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The refusal `result` must be: its code, and what its message names; the message.
fn refused(result: Result<usize, tonic::Status>, code: Code, names: &[&str]) -> String {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for name in names {
        assert!(status.message().contains(name), "{name}: {status:?}");
    }
    status.message().to_owned()
}

/// `[admin] allowed_identities` under mTLS: an allowed client certificate is served
/// without the token, another identity is PERMISSION_DENIED by name, the token still
/// works, and nothing at all is UNAUTHENTICATED saying what is expected. Off loopback,
/// identities and mTLS stand in for the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mtls_identities_are_served_without_the_token() {
    const OPS: &str = "spiffe://example.org/ops";
    const INTRUDER: &str = "spiffe://example.org/intruder";
    let certs = Certs::new("mtls");
    let ops = certs.leaf("ops", &[], Some(OPS));
    let intruder = certs.leaf("intruder", &[], Some(INTRUDER));
    let sims = [sim("gpu-0", |_| {})];
    let mut cfg = config(&[sims[0].addr()]);
    cfg.admin.token = Some(TOKEN.into());
    cfg.admin.allowed_identities = vec![OPS.into()];
    cfg.admin.tls = Some(certs.server());
    let gw = gateway(cfg.clone()).await;
    // ListBackends over TLS to `addr`, with the certificate `pair` and maybe the token.
    let list = |addr: SocketAddr, pair: Option<(PathBuf, PathBuf)>, token: bool| {
        let channel = certs.channel(addr, pair);
        async move {
            let interceptor =
                move |r: tonic::Request<()>| if token { with_token(r) } else { Ok(r) };
            AdminClient::with_interceptor(channel.await, interceptor)
                .list_backends(ListBackendsRequest {})
                .await
                .map(|r| r.into_inner().backends.len())
        }
    };
    let at = gw.admin_addr();

    let served = list(at, Some(ops.clone()), false).await;
    assert_eq!(served.expect("an allowed identity, no token"), 1);
    let denied = list(at, Some(intruder.clone()), false).await;
    refused(
        denied,
        Code::PermissionDenied,
        &[INTRUDER, "allowed_identities"],
    );
    let served = list(at, Some(intruder), true).await;
    assert_eq!(served.expect("the token, whatever the certificate"), 1);
    let served = list(at, None, true).await;
    assert_eq!(served.expect("the token without a certificate"), 1);
    let neither = list(at, None, false).await;
    let message = refused(
        neither,
        Code::Unauthenticated,
        &["Bearer", "allowed_identities"],
    );
    assert!(!message.contains(TOKEN), "the token is never shown");
    gw.shutdown(Duration::from_secs(1)).await;

    // Off loopback without a token: identities under mTLS are enough to start...
    cfg.admin.token = None;
    cfg.admin_listen = "0.0.0.0:0".parse().expect("address");
    let gw = gateway(cfg.clone()).await;
    let at = SocketAddr::from(([127, 0, 0, 1], gw.admin_addr().port()));
    let served = list(at, Some(ops), false).await;
    assert_eq!(served.expect("an allowed identity"), 1);
    let anonymous = list(at, None, false).await;
    refused(anonymous, Code::Unauthenticated, &["client certificate"]);
    gw.shutdown(Duration::from_secs(1)).await;
    // ...and without them it does not.
    cfg.admin.allowed_identities.clear();
    let Err(refused) = infergate::server::start(cfg, "test").await else {
        panic!("no token, no identities, off loopback: the gateway must not start");
    };
    assert!(
        refused.to_string().contains("allowed_identities"),
        "{refused}"
    );
}
