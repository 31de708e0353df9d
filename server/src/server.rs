//! Starting and stopping a gateway: binds the three ports (inference, admin, metrics),
//! runs the first health and discovery round before taking traffic, starts the
//! background loops, and shuts down gracefully.
//!
//! Used by the `infergate` binary and, in-process, by the end-to-end tests.

use crate::admin::AdminService;
use crate::config::Config;
use crate::control::{Control, Tasks};
use crate::front::InferenceFront;
use crate::health::Checker;
use crate::load_report;
use crate::path::Gateway;
use crate::pool::Pool;
use crate::telemetry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

mod conn;

/// Why a gateway could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running gateway.
pub struct GatewayHandle {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    gateway: Arc<Gateway>,
    control: Arc<Control>,
    reporter: HealthReporter,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    /// How long calls are still served after health turns NOT_SERVING.
    drain: Duration,
}

async fn bind(addr: SocketAddr, what: &str, flag: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| {
        StartError(format!(
            "cannot listen on {addr} for {what} (--{flag}): {e}"
        ))
    })
}

/// What guards an admin port off loopback, for the messages that ask for it.
pub const ADMIN_GUARDS: &str = "set [admin].token or INFERGATE_ADMIN_TOKEN, or [admin] \
    allowed_identities with client certificates ([admin.tls] or [tls] client_ca)";

/// Starts a gateway with `config`; `source` tags its backends (`config`, `flag`, `demo`).
pub async fn start(config: Config, source: &str) -> Result<GatewayHandle, StartError> {
    start_with_file(config, source, None).await
}

/// Starts a gateway whose config came from `path` (reloaded on SIGHUP and on change).
pub async fn start_with_file(
    mut config: Config,
    source: &str,
    path: Option<std::path::PathBuf>,
) -> Result<GatewayHandle, StartError> {
    if let Ok(token) = std::env::var("INFERGATE_ADMIN_TOKEN") {
        if !token.is_empty() {
            config.admin.token = Some(token);
        }
    }
    if !config.admin_guarded(config.admin.token.is_some())
        && !config.admin_listen.ip().is_loopback()
    {
        return Err(StartError(format!(
            "the admin API would listen on {} without a token: {ADMIN_GUARDS}, \
             or keep --admin-listen on a loopback address",
            config.admin_listen
        )));
    }
    // The recorder first, so the first health round's metrics are kept.
    let metrics_handle = if config.metrics {
        telemetry::install()
    } else {
        None
    };
    let pool = Pool::new(&config, source).map_err(StartError)?;
    let load = Arc::new(config.load.clone());
    let gateway =
        Gateway::new(Arc::clone(&pool), &config, Arc::clone(&load)).map_err(StartError)?;
    let (reporter, health_service) = tonic_health::server::health_reporter();

    // Learn the pool before taking traffic: one health round and one index read.
    let mut checker = Checker::new(Arc::clone(&pool), config.health.clone(), reporter.clone());
    let probe_timeout = Duration::from_millis(config.discovery.probe_timeout_ms);
    tokio::join!(checker.round(), pool.refresh_models(probe_timeout));
    checker.publish().await;

    let listener = bind(config.listen, "inference gRPC", "listen").await?;
    let admin_listener = bind(config.admin_listen, "the admin API", "admin-listen").await?;
    let metrics_listener = bind(config.metrics_listen, "metrics", "metrics-listen").await?;
    let local = |l: &TcpListener| l.local_addr().map_err(|e| StartError(e.to_string()));
    let (addr, admin_addr, metrics_addr) = (
        local(&listener)?,
        local(&admin_listener)?,
        local(&metrics_listener)?,
    );

    let (shutdown, shutdown_rx) = watch::channel(false);
    let control = Control::new(
        Arc::clone(&pool),
        Arc::clone(&gateway),
        config.clone(),
        path,
        Tasks {
            health: config.health.clone(),
            publisher: checker.publisher(),
            load: Arc::clone(&load),
            shutdown: shutdown_rx.clone(),
        },
    );
    tokio::spawn(Arc::clone(&control).watch_reloads(shutdown_rx.clone()));
    for (i, dns) in config.dns.iter().enumerate() {
        let watcher = crate::dns::DnsWatcher::new(dns.clone())
            .map_err(|e| StartError(format!("dns[{i}]: {e}")))?;
        let control = Arc::clone(&control);
        let apply = move |change: crate::dns::Change| {
            for address in change.added {
                let key = address.to_string();
                if let Some(existing) = control.pool().endpoint(&key) {
                    // Back before its drain finished: keep it.
                    if existing.is_draining() && existing.source() == "dns" {
                        let control = Arc::clone(&control);
                        tokio::spawn(async move {
                            let _ = control.undrain(&key).await;
                        });
                    }
                    continue;
                }
                let backend = crate::config::BackendConfig::new(key);
                if let Err(e) = control.add_backend(backend, "dns") {
                    tracing::warn!(%address, "DNS discovery could not add the backend: {e}");
                }
            }
            for address in change.removed {
                // Only backends DNS added are DNS's to remove.
                let from_dns = control
                    .pool()
                    .endpoint(&address.to_string())
                    .is_some_and(|e| e.source() == "dns");
                if !from_dns {
                    continue;
                }
                let control = Arc::clone(&control);
                tokio::spawn(async move {
                    let _ = control
                        .remove_backend(&address.to_string(), Duration::from_secs(30))
                        .await;
                });
            }
        };
        tokio::spawn(watcher.run(apply, shutdown_rx.clone()));
    }
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Reflection advertises only what each port serves, and every service it advertises
    // resolves through both versions: tonic-reflection's v1 service knows only its own
    // descriptor (and v1alpha only its own), so each is given both, and health's.
    let reflection = |services: &[&str]| {
        let builder = || {
            services.iter().chain(REFLECTION).fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(infergate_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |b, name| b.with_service_name(*name),
            )
        };
        let v1 = builder()
            .build_v1()
            .map_err(|e| StartError(format!("reflection: {e}")))?;
        let v1alpha = builder()
            .build_v1alpha()
            .map_err(|e| StartError(format!("reflection: {e}")))?;
        Ok::<_, StartError>((v1, v1alpha))
    };
    const HEALTH: &str = "grpc.health.v1.Health";
    const REFLECTION: &[&str] = &[
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut servers = Vec::new();
    let (v1, v1alpha) = reflection(&["inference.GRPCInferenceService", HEALTH])?;
    // Limits toward clients: streams per connection, header list size and PING
    // keepalive are hyper's; connections, handshake and idle timeouts, and each call's
    // buffer budget and read timeout are `conn`'s.
    crate::wire::process_budget().set_limit(config.max_buffered_request_bytes);
    let client_limits = conn::ClientLimits::new(&config);
    let front_tls = config
        .tls
        .enabled()
        .then(|| crate::tls::ServerTls::new(&config.tls))
        .transpose()
        .map_err(|e| StartError(format!("tls: {e}")))?;
    let admin_tls = match &config.admin.tls {
        Some(t) if t.enabled() => {
            Some(crate::tls::ServerTls::new(t).map_err(|e| StartError(format!("admin.tls: {e}")))?)
        }
        _ => front_tls.clone(),
    };
    for (port, tls) in [("inference", &front_tls), ("admin", &admin_tls)] {
        if let Some(tls) = tls {
            tokio::spawn(tls.clone().watch(
                port,
                Duration::from_secs(1),
                pool.events().clone(),
                shutdown_rx.clone(),
            ));
        }
    }
    if front_tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "the inference port listens beyond loopback without TLS: set [tls] cert and key (or --tls-cert/--tls-key)");
    }
    let keepalive = (config.client_keepalive_interval_ms > 0)
        .then(|| Duration::from_millis(config.client_keepalive_interval_ms));
    let front = Server::builder()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(config.max_header_list_bytes)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_millis(
            config.client_keepalive_timeout_ms,
        )))
        .layer(conn::CallsLayer::new(&client_limits))
        .serve_with_incoming_shutdown(
            InferenceFront::new(
                Arc::clone(&gateway),
                Routes::new(health_service.clone())
                    .add_service(v1)
                    .add_service(v1alpha),
            ),
            conn::Incoming::new(listener, Arc::clone(&client_limits), front_tls.clone()),
            signal(shutdown_rx.clone()),
        );
    servers.push(tokio::spawn(async move {
        if let Err(e) = front.await {
            tracing::error!("inference server failed: {e}");
        }
    }));

    let (v1, v1alpha) = reflection(&["infergate.admin.v1.Admin", HEALTH])?;
    let admin = Server::builder()
        .layer(conn::CallsLayer::new(&client_limits))
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(AdminService::server(
            Arc::clone(&control),
            config.admin.token.clone(),
            &config.admin.allowed_identities,
        ))
        .serve_with_incoming_shutdown(
            conn::Incoming::new(admin_listener, Arc::clone(&client_limits), admin_tls),
            signal(shutdown_rx.clone()),
        );
    servers.push(tokio::spawn(async move {
        if let Err(e) = admin.await {
            tracing::error!("admin server failed: {e}");
        }
    }));

    if let Some(handle) = metrics_handle {
        tokio::spawn(telemetry::serve_with_hook(
            metrics_listener,
            handle,
            shutdown_rx.clone(),
            Some(crate::gauges::gateway_scrape_hook(&gateway)),
        ));
    } else if config.metrics {
        tracing::warn!("metrics recorder unavailable; /metrics is not served");
    }
    tokio::spawn(checker.run(shutdown_rx.clone()));
    tokio::spawn(run_outlier(
        Arc::clone(&pool),
        config.outlier.interval(),
        shutdown_rx.clone(),
    ));
    for endpoint in pool.endpoints() {
        load_report::spawn_for(&endpoint, &load, &shutdown_rx);
    }
    tokio::spawn(Arc::clone(&pool).refresh_models_every(
        Duration::from_millis(config.discovery.refresh_interval_ms),
        probe_timeout,
        shutdown_rx,
    ));

    tracing::info!(%addr, %admin_addr, %metrics_addr, backends = pool.endpoints().len(), "gateway listening");
    Ok(GatewayHandle {
        addr,
        admin_addr,
        metrics_addr,
        gateway,
        control,
        reporter,
        shutdown,
        servers,
        drain: Duration::from_millis(config.shutdown_drain_ms),
    })
}

/// Runs the pool's periodic outlier evaluation (and circuit ticks) until shutdown.
async fn run_outlier(pool: Arc<Pool>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => pool.evaluate(),
            _ = shutdown.changed() => return,
        }
    }
}

impl GatewayHandle {
    /// Inference gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Admin gRPC address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Metrics HTTP address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The control path (admin operations, reloads).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The request path's shared state (limits, models, pool).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The backends and routes.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.gateway.pool
    }

    /// Graceful shutdown: health turns NOT_SERVING first, and calls are still served
    /// for `shutdown_drain_ms` (so health checks and load balancers move traffic away
    /// before anything is refused); then new calls are refused (UNAVAILABLE, then
    /// GOAWAY), in-flight calls get up to `grace` to finish, and whatever is left is cut.
    pub async fn shutdown(self, grace: Duration) {
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for route in self.gateway.pool.models() {
            self.reporter
                .set_service_status(&route.model, ServingStatus::NotServing)
                .await;
        }
        if !self.drain.is_zero() {
            tracing::info!(drain = ?self.drain, "health is NOT_SERVING; still serving while traffic moves away");
            tokio::time::sleep(self.drain).await;
        }
        self.gateway.begin_shutdown();
        let _ = self.shutdown.send(true);
        let mut servers = self.servers;
        let all = futures_util::future::join_all(servers.iter_mut());
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "grace period over; cutting the calls still in flight"
            );
            for server in &servers {
                server.abort();
            }
        }
    }
}
