//! A simulated GPU model server: a real KServe v2 gRPC server whose "GPU" is a pool of
//! execution slots and a clock.
//!
//! The gateway's tests, demo and benchmarks need backends that behave like Triton under
//! load and under failure, reproducibly and without a GPU. The simulator serves
//! `inference.GRPCInferenceService` (four models: Triton's classic `simple`,
//! `identity_fp32` for payload-size work, the decoupled `tiny_llm` for streams, with a
//! prompt-prefix cache that makes a recently seen prefix's first token faster and a
//! `kv_cache_utilization` ORCA metric (see `prefix.rs`), and the stateful `accumulate`
//! for sequences),
//! `grpc.health.v1`, ORCA load reports (per-call trailer and out of band) and a
//! Prometheus endpoint with Triton's metric names. Service time, queueing behind a FIFO
//! of slots, invisible load, injected faults, hangs, refused connections and abrupt
//! death can all be set at start and changed while it runs, through [`SimControl`] or
//! `GET /control` on the metrics port.
//!
//! Two ways to run it:
//! - [`spawn`] starts one on its own runtime and OS thread, so [`SimHandle::kill`] can
//!   drop every connection at once, as when a process dies;
//! - [`run_cli`] serves on the caller's runtime until Ctrl-C or SIGTERM (`infergate sim`).
//!
//! Tracing: `ModelInfer` and `ModelStreamInfer` continue the caller's W3C trace with a
//! SERVER span and `queue`/`execute` children, through the global tracer provider when
//! [`infergate_base::trace::init`] has installed one (a spawned simulator initialises nothing, so
//! it shares its process's exporter); [`run_cli`] initialises it from the `OTEL_*`
//! variables.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use infergate_sim::{spawn, SimConfig};
//! let sim = spawn(SimConfig { slots: 2, latency_ms: 20.0, ..SimConfig::default() })?;
//! let url = format!("http://{}", sim.addr());
//! sim.control().set_error_rate(0.1);
//! // ... point a client or the gateway at `url` ...
//! sim.kill();
//! # let _ = url; Ok(()) }
//! ```

mod control;
mod grpc;
mod http;
mod models;
mod prefix;
pub(crate) mod sequence;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use infergate_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use infergate_proto::orca::open_rca_service_server::OpenRcaServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

pub use control::SimControl;
pub use prefix::PrefixCacheConfig;
pub use tls::SimTls;

use grpc::{Engine, InferenceSvc, OrcaSvc, Timing, TrailerLayer};
use http::ExitHook;
use models::{Model, ALL_MODELS};

/// How long a graceful shutdown waits for open calls and streams before it cuts them.
const GRACE: Duration = Duration::from_secs(5);

/// Largest gRPC message the simulator accepts or sends.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Everything a simulator is started with. Faults can be changed later through
/// [`SimControl`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// gRPC address; port 0 picks a free one (see [`SimHandle::addr`]).
    pub listen: SocketAddr,
    /// Prometheus (`/metrics`) and control (`/control`) HTTP address; `None` turns it off.
    pub metrics_listen: Option<SocketAddr>,
    /// Shows in logs, in the `gpu_uuid` label (`GPU-sim-NAME`) and in `sim-name` metadata.
    pub name: String,
    /// Concurrent executions; further requests queue FIFO.
    pub slots: usize,
    /// Base service time per inference, in milliseconds.
    pub latency_ms: f64,
    /// Extra service time per KiB of request tensor data, in microseconds.
    pub per_kib_us: f64,
    /// `tiny_llm`: time per streamed token, in milliseconds.
    pub token_latency_ms: f64,
    /// Share (0..=1) of the slots taken by work the gateway cannot see.
    pub hidden_load: f64,
    /// Share (0..=1) of calls answered UNAVAILABLE ("injected fault").
    pub error_rate: f64,
    /// Seed of the fault dice, so runs repeat.
    pub seed: u64,
    /// Send the `endpoint-load-metrics-bin` trailer (ORCA) on inference calls.
    pub orca_per_call: bool,
    /// Serve `xds.service.orca.v3.OpenRcaService` (ORCA out of band).
    pub orca_oob: bool,
    /// Models to serve, out of `simple`, `identity_fp32`, `tiny_llm`, `accumulate`
    /// (and the opt-in `simple_small`); empty = the four defaults.
    pub models: Vec<String>,
    /// `accumulate`: a sequence's state is dropped after this long without a request
    /// (Triton's `max_sequence_idle_microseconds`; default 1000 ms).
    pub sequence_idle_ms: u64,
    /// `tiny_llm`'s prompt-prefix cache (see [`PrefixCacheConfig`]).
    pub prefix_cache: PrefixCacheConfig,
    /// TLS on the gRPC port (None: plaintext).
    pub tls: Option<SimTls>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            name: "sim".to_owned(),
            slots: 4,
            latency_ms: 5.0,
            per_kib_us: 0.0,
            token_latency_ms: 2.0,
            hidden_load: 0.0,
            error_rate: 0.0,
            seed: 1,
            orca_per_call: true,
            orca_oob: true,
            models: Vec::new(),
            sequence_idle_ms: 1000,
            prefix_cache: PrefixCacheConfig::default(),
            tls: None,
        }
    }
}

impl SimConfig {
    /// Checks ranges and model names; returns the models to serve.
    fn validate(&self) -> Result<Vec<Model>, String> {
        if self.slots == 0 {
            return Err("slots: must be at least 1".to_owned());
        }
        for (field, v) in [
            ("hidden_load", self.hidden_load),
            ("error_rate", self.error_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{field}: must be between 0 and 1, got {v}"));
            }
        }
        for (field, v) in [
            ("latency_ms", self.latency_ms),
            ("per_kib_us", self.per_kib_us),
            ("token_latency_ms", self.token_latency_ms),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{field}: must be a non-negative number, got {v}"));
            }
        }
        if self.sequence_idle_ms == 0 {
            return Err("sequence_idle_ms: must be at least 1".to_owned());
        }
        let speedup = self.prefix_cache.speedup;
        if !speedup.is_finite() || speedup < 1.0 {
            return Err(format!(
                "prefix_cache.speedup: must be a number of at least 1, got {speedup}"
            ));
        }
        if self.models.is_empty() {
            return Ok(ALL_MODELS.to_vec());
        }
        let mut out = Vec::new();
        for name in &self.models {
            let m = Model::from_name(name.trim()).ok_or_else(|| {
                format!(
                    "models: unknown model '{name}' (known: {})",
                    control::known_model_names()
                )
            })?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("must be between 0 and 1, got {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a non-negative number, got {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

fn parse_slots(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

fn parse_model(s: &str) -> Result<String, String> {
    let s = s.trim();
    Model::from_name(s)
        .map(|m| m.name().to_owned())
        .ok_or_else(|| {
            format!(
                "unknown model '{s}' (known: {})",
                control::known_model_names()
            )
        })
}

/// Command-line flags of the simulator (`infergate sim --help`).
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// gRPC address to listen on (KServe v2 inference, health, ORCA).
    #[arg(long, default_value = "127.0.0.1:8101")]
    pub listen: SocketAddr,
    /// Address for Prometheus metrics (GET /metrics) and fault control (GET /control?...);
    /// off when absent.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Name shown in logs, metrics (gpu_uuid="GPU-sim-NAME") and the sim-name header.
    #[arg(long, default_value = "sim")]
    pub name: String,
    /// Concurrent executions (GPU slots); more requests queue first-in first-out.
    #[arg(long, default_value = "4", value_parser = parse_slots)]
    pub slots: usize,
    /// Base service time of one inference, in milliseconds.
    #[arg(long, default_value = "5", value_parser = parse_non_negative)]
    pub latency_ms: f64,
    /// Extra service time per KiB of request tensor data, in microseconds.
    #[arg(long, default_value = "0", value_parser = parse_non_negative)]
    pub per_kib_us: f64,
    /// tiny_llm: time between streamed tokens, in milliseconds.
    #[arg(long, default_value = "2", value_parser = parse_non_negative)]
    pub token_latency_ms: f64,
    /// Share of the slots (0 to 1) taken by invisible work, making this GPU slower and busier.
    #[arg(long, default_value = "0", value_parser = parse_fraction)]
    pub hidden_load: f64,
    /// Share of calls (0 to 1) answered UNAVAILABLE as an injected fault.
    #[arg(long, default_value = "0", value_parser = parse_fraction)]
    pub error_rate: f64,
    /// Seed for the injected-fault dice, so runs repeat.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Do not send the ORCA load report trailer (endpoint-load-metrics-bin) on calls.
    #[arg(long)]
    pub no_orca_trailer: bool,
    /// Do not serve the ORCA out-of-band service (xds.service.orca.v3.OpenRcaService).
    #[arg(long)]
    pub no_orca_oob: bool,
    /// Models to serve, comma separated, out of simple, identity_fp32, tiny_llm,
    /// accumulate, simple_small (default: all but simple_small).
    #[arg(long, value_delimiter = ',', value_parser = parse_model)]
    pub models: Vec<String>,
    /// accumulate: drop a sequence's state after this many milliseconds without a request.
    #[arg(long, default_value = "1000")]
    pub sequence_idle_ms: u64,
    /// Start hung: inference calls are accepted but never answered.
    #[arg(long)]
    pub hang: bool,
    /// Start refusing: new connections are accepted and closed at once.
    #[arg(long)]
    pub refuse: bool,
    /// tiny_llm: prompt prefixes the prefix cache keeps (0 turns it off).
    #[arg(long, default_value = "256")]
    pub prefix_cache_entries: usize,
    /// tiny_llm: how long a served prompt prefix stays cached, in milliseconds.
    #[arg(long, default_value = "10000")]
    pub prefix_ttl_ms: u64,
    /// tiny_llm: how many times faster the prefill of a cached prefix is (at least 1).
    #[arg(long, default_value = "4")]
    pub prefix_speedup: f64,
    /// tiny_llm: leading prompt bytes that make a prefix.
    #[arg(long, default_value = "256")]
    pub prefix_bytes: usize,
    /// Serve gRPC over TLS with this certificate chain (PEM; with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Ask clients for a certificate that chains to this CA (PEM), and refuse those
    /// without one.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl SimArgs {
    /// The configuration these flags describe (`--hang` and `--refuse` are runtime
    /// controls, applied by [`run_cli`]).
    pub fn into_config(self) -> SimConfig {
        SimConfig {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            name: self.name,
            slots: self.slots,
            latency_ms: self.latency_ms,
            per_kib_us: self.per_kib_us,
            token_latency_ms: self.token_latency_ms,
            hidden_load: self.hidden_load,
            error_rate: self.error_rate,
            seed: self.seed,
            orca_per_call: !self.no_orca_trailer,
            orca_oob: !self.no_orca_oob,
            models: self.models,
            sequence_idle_ms: self.sequence_idle_ms,
            prefix_cache: PrefixCacheConfig {
                entries: self.prefix_cache_entries,
                ttl: Duration::from_millis(self.prefix_ttl_ms),
                speedup: self.prefix_speedup,
                bytes: self.prefix_bytes,
            },
            tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| SimTls {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
        }
    }
}

/// The shared state built from a validated configuration.
fn build(cfg: &SimConfig) -> Result<Arc<Engine>, String> {
    let models = cfg.validate()?;
    let ctl = Arc::new(SimControl::new(
        cfg.name.clone(),
        cfg.slots,
        &models,
        cfg.error_rate,
        cfg.hidden_load,
        cfg.seed,
    ));
    Ok(Arc::new(Engine {
        ctl,
        slots: Semaphore::new(cfg.slots),
        timing: Timing {
            latency_ms: cfg.latency_ms,
            per_kib_us: cfg.per_kib_us,
            token_latency_ms: cfg.token_latency_ms,
            orca_per_call: cfg.orca_per_call,
        },
        sequences: sequence::Store::new(
            Duration::from_millis(cfg.sequence_idle_ms),
            sequence::DEFAULT_CAPACITY,
        ),
        prefix: prefix::PrefixCache::new(cfg.prefix_cache.clone()),
    }))
}

/// Serves gRPC on `listener` (and HTTP on `metrics`) until `shutdown` completes, then
/// drains for at most [`GRACE`]. Background tasks end with it.
async fn serve<F>(
    engine: Arc<Engine>,
    orca_oob: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    exit: ExitHook,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = ()> + Send,
{
    let ctl = engine.ctl.clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    ctl.attach_health(reporter);

    let mut background = tokio::task::JoinSet::new();
    background.spawn(grpc::hold_hidden_load(engine.clone()));
    background.spawn(grpc::keep_health_in_sync(ctl.clone()));
    if let Some(metrics) = metrics {
        background.spawn(http::serve(metrics, ctl.clone(), exit));
    }

    // Accepted connections, minus the ones refused on purpose; TLS handshakes run in
    // tasks of their own.
    let (conns, incoming) = mpsc::channel::<std::io::Result<tls::Conn>>(64);
    background.spawn(accept(listener, ctl.clone(), tls, conns));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);

    let inference = GrpcInferenceServiceServer::from_arc(Arc::new(InferenceSvc {
        engine: engine.clone(),
    }))
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let orca = orca_oob.then(|| OpenRcaServiceServer::new(OrcaSvc { ctl: ctl.clone() }));

    let (begin_tx, begin_rx) = oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = begin_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .layer(TrailerLayer)
        .add_service(health)
        .add_service(inference)
        .add_optional_service(orca)
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = async move {
        if begin_rx.await.is_ok() {
            ctl.set_ready(false);
            tokio::time::sleep(GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        res = server => res,
        () = grace => Ok(()),
    }
}

/// Accepts connections until `conns` closes; `tls` makes each one a TLS stream first.
async fn accept(
    listener: TcpListener,
    ctl: Arc<SimControl>,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: mpsc::Sender<std::io::Result<tls::Conn>>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) if ctl.refuse() => {
                drop(sock);
                continue;
            }
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(sim = ctl.name(), error = %e, "sim accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        match &acceptor {
            None => {
                if conns.send(Ok(tls::Conn::Plain(sock))).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, conns, name) =
                    (acceptor.clone(), conns.clone(), ctl.name().to_owned());
                tokio::spawn(async move {
                    match tokio::time::timeout(tls::HANDSHAKE, acceptor.accept(sock)).await {
                        Ok(Ok(stream)) => {
                            let _ = conns.send(Ok(tls::Conn::Tls(Box::new(stream)))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(sim = %name, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(sim = %name, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// How a spawned simulator is asked to stop.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Kill,
    Graceful,
}

/// A running simulator started by [`spawn`]. Dropping it kills the simulator.
pub struct SimHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    control: Arc<SimControl>,
    stop: mpsc::UnboundedSender<Stop>,
    done: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("name", &self.control.name())
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The gRPC address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics/control HTTP address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Its live faults and counters.
    pub fn control(&self) -> &Arc<SimControl> {
        &self.control
    }

    /// Stops it abruptly: the listener and every connection close at once, in-flight
    /// calls get no answer, as when the process is killed.
    pub fn kill(self) {
        drop(self);
    }

    /// Stops it gracefully: no new connections, open calls may finish (for at most a
    /// few seconds), then everything closes.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(Stop::Graceful);
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(Stop::Kill);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

thread_local! {
    /// The name of the simulator [`spawn`] runs on this thread, if any.
    static CURRENT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The name of the simulator whose thread this is ([`spawn`] runs each on its own), so
/// that a process running several can tell their work apart: the demo gives each its
/// own OpenTelemetry `service.name`. `None` outside a spawned simulator.
pub fn current_name() -> Option<String> {
    CURRENT.with(|c| c.borrow().clone())
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Starts a simulator on its own single-threaded runtime in its own OS thread and returns
/// once its listeners are bound. Callable from async code: it blocks only for the bind.
pub fn spawn(cfg: SimConfig) -> std::io::Result<SimHandle> {
    let engine = build(&cfg).map_err(invalid)?;
    let tls = cfg
        .tls
        .as_ref()
        .map(SimTls::server_config)
        .transpose()
        .map_err(invalid)?;
    let control = engine.ctl.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let _ctx = rt.enter();
        TcpListener::from_std(l)
    };
    let listener = bind(cfg.listen)?;
    let addr = listener.local_addr()?;
    let metrics = cfg.metrics_listen.map(bind).transpose()?;
    let metrics_addr = metrics.as_ref().map(TcpListener::local_addr).transpose()?;

    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<Stop>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let exit_tx = stop_tx.clone();
    let exit: ExitHook = Arc::new(move || {
        let _ = exit_tx.send(Stop::Kill);
    });
    let name = cfg.name.clone();
    let orca_oob = cfg.orca_oob;

    let thread = std::thread::Builder::new()
        .name(format!("sim-{name}"))
        .spawn(move || {
            CURRENT.with(|c| *c.borrow_mut() = Some(name.clone()));
            rt.block_on(async move {
                let (grace_tx, grace_rx) = oneshot::channel::<()>();
                let shutdown = async move {
                    let _ = grace_rx.await;
                };
                let mut server = tokio::spawn(serve(
                    engine, orca_oob, tls, listener, metrics, exit, shutdown,
                ));
                tokio::select! {
                    stop = stop_rx.recv() => {
                        if let Some(Stop::Graceful) = stop {
                            let _ = grace_tx.send(());
                            let _ = server.await;
                        }
                    }
                    res = &mut server => {
                        if let Ok(Err(e)) = res {
                            tracing::error!(sim = %name, error = %e, "sim server failed");
                        }
                    }
                }
            });
            // Drops every task (and so every socket) without waiting for them.
            rt.shutdown_background();
            let _ = done_tx.send(());
        })?;

    tracing::debug!(sim = %cfg.name, %addr, "sim spawned");
    Ok(SimHandle {
        addr,
        metrics_addr,
        control,
        stop: stop_tx,
        done: Some(done_rx),
        thread: Some(thread),
    })
}

/// Waits for Ctrl-C or (on Unix) SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a simulator on the current runtime until Ctrl-C or SIGTERM (`infergate sim`).
/// `GET /control?exit=1` ends the process with status 1.
pub async fn run_cli(args: SimArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (hang, refuse) = (args.hang, args.refuse);
    let cfg = args.into_config();
    let engine = build(&cfg)?;
    let tls = cfg.tls.as_ref().map(SimTls::server_config).transpose()?;
    // A standalone simulator exports its own spans when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let traces = infergate_base::trace::TraceConfig::from_env_for("infergate-sim")
        .and_then(infergate_base::trace::init)?;
    engine.ctl.set_hang(hang);
    engine.ctl.set_refuse(refuse);

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let metrics = match cfg.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("--metrics-listen {a}: {e}"))?,
        ),
        None => None,
    };
    match metrics.as_ref().map(TcpListener::local_addr).transpose()? {
        Some(m) => println!("sim {} listening on {addr} (metrics on {m})", cfg.name),
        None => println!("sim {} listening on {addr}", cfg.name),
    }
    let exit: ExitHook = Arc::new(|| std::process::exit(1));
    let served = serve(
        engine,
        cfg.orca_oob,
        tls,
        listener,
        metrics,
        exit,
        termination(),
    )
    .await;
    if let Err(e) = traces.shutdown().await {
        tracing::warn!(error = %e, "trace export did not finish");
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let bad = SimConfig {
            hidden_load: 1.5,
            ..SimConfig::default()
        };
        assert!(bad
            .validate()
            .err()
            .unwrap_or_default()
            .contains("hidden_load"));
        let bad = SimConfig {
            slots: 0,
            ..SimConfig::default()
        };
        assert!(bad.validate().err().unwrap_or_default().contains("slots"));
        let bad = SimConfig {
            models: vec!["gpt".into()],
            ..SimConfig::default()
        };
        assert!(bad.validate().err().unwrap_or_default().contains("gpt"));
        assert_eq!(SimConfig::default().validate(), Ok(ALL_MODELS.to_vec()));
    }

    #[test]
    fn flags_parse_and_validate() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        let cli = Cli::try_parse_from(["x", "--models", "simple,tiny_llm", "--no-orca-oob"]);
        let cfg = cli.map(|c| c.sim.into_config()).ok();
        assert_eq!(
            cfg.as_ref().map(|c| c.models.clone()),
            Some(vec!["simple".to_owned(), "tiny_llm".to_owned()])
        );
        assert_eq!(
            cfg.map(|c| (c.orca_oob, c.orca_per_call)),
            Some((false, true))
        );
        let err = Cli::try_parse_from(["x", "--error-rate", "2"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--error-rate"), "{err}");
        assert!(Cli::try_parse_from(["x", "--slots", "0"]).is_err());
    }

    #[test]
    fn report_interval_bounds() {
        assert_eq!(grpc::report_interval(0, 0), Duration::from_secs(1));
        assert_eq!(grpc::report_interval(0, 1000), Duration::from_millis(10));
        assert_eq!(grpc::report_interval(2, 0), Duration::from_secs(2));
        assert_eq!(grpc::report_interval(-5, 0), Duration::from_secs(1));
    }
}
