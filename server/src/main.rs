//! The `infergate` binary: `serve` (the gateway), `demo` (gateway + simulated GPU pool,
//! nothing to configure) and `sim` (one simulated GPU backend).

use clap::{Args, Parser, Subcommand};
use infergate::config::{BackendConfig, Config, PolicyKind};
use infergate::{demo, server, sim, trace};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc: the request path allocates many small, short-lived objects (HTTP/2 frames,
/// headers); BENCHMARKS.md has the A/B against the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// infergate: a gRPC inference gateway for pools of GPU model servers (KServe v2 / Open
/// Inference Protocol, Triton-compatible).
#[derive(Parser, Debug)]
#[command(name = "infergate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` (default) or `json`. Filter with RUST_LOG (default `info`).
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway in front of the backends given by --config and/or --backend.
    Serve(ServeArgs),
    /// Run the gateway on its default ports in front of three simulated GPU backends.
    Demo(Ports),
    /// Run one simulated GPU inference backend (a KServe v2 gRPC server).
    Sim(sim::SimArgs),
}

#[derive(Args, Debug, Clone, Default)]
struct Ports {
    /// Inference gRPC address [default: 127.0.0.1:8001, or the config file's `listen`].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus metrics address [default: 127.0.0.1:8002].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Admin gRPC address [default: 127.0.0.1:8003].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Tokio worker threads [default: one per core].
    #[arg(long)]
    worker_threads: Option<usize>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML). Flags override what it says.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A backend's host:port; repeat for more. Added to the config file's backends.
    #[arg(long = "backend", value_name = "HOST:PORT")]
    backends: Vec<String>,
    /// Balancing policy for the whole pool: round_robin, weighted, least_request or
    /// gpu_aware (the default).
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Do not record metrics (nothing is served on --metrics-listen).
    #[arg(long)]
    no_metrics: bool,
    #[command(flatten)]
    ports: Ports,
}

impl Ports {
    fn apply(&self, config: &mut Config) {
        if let Some(a) = self.listen {
            config.listen = a;
        }
        if let Some(a) = self.metrics_listen {
            config.metrics_listen = a;
        }
        if let Some(a) = self.admin_listen {
            config.admin_listen = a;
        }
        if self.worker_threads.is_some() {
            config.worker_threads = self.worker_threads;
        }
    }
}

fn init_logs(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, never in files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        other => return Err(format!("--log-format: `{other}` is not text or json")),
    }
    Ok(())
}

fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.build()
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logs(&cli.log_format) {
        eprintln!("infergate: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo(ports) => run_demo(ports),
        Command::Sim(args) => runtime(None)
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(sim::run_cli(args)).map_err(|e| e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infergate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let (mut config, source) = match &args.config {
        Some(path) => (
            Config::load(path).map_err(|e| e.to_string())?,
            path.display().to_string(),
        ),
        None => (Config::default(), "command line".to_owned()),
    };
    args.ports.apply(&mut config);
    if let Some(policy) = args.policy {
        config.balancer.policy = policy;
    }
    if args.no_metrics {
        config.metrics = false;
    }
    for address in &args.backends {
        config.backends.push(BackendConfig::new(address.clone()));
    }
    config.validate(&source).map_err(|e| e.to_string())?;
    if config.backends.is_empty() && config.dns.is_empty() {
        return Err(
            "no backends: give --backend HOST:PORT or a --config file with [[backends]] \
                    or [[dns]] (or run `infergate demo` for a simulated pool)"
                .into(),
        );
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let tag = if args.config.is_some() {
        "config"
    } else {
        "flag"
    };
    let config_path = args.config.clone();
    runtime(config.worker_threads)
        .map_err(|e| e.to_string())?
        .block_on(async move {
            let traces = trace::init(trace::TraceConfig::from_env()?)?;
            let handle = server::start_with_file(config, tag, config_path)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "infergate listening on {} (admin {}, metrics http://{}/metrics)",
                handle.addr(),
                handle.admin_addr(),
                handle.metrics_addr()
            );
            stop_signal().await;
            tracing::info!("stopping: refusing new calls, finishing in-flight ones");
            handle.shutdown(grace).await;
            traces.shutdown().await?;
            Ok(())
        })
}

fn run_demo(ports: Ports) -> Result<(), String> {
    let mut config = Config::default();
    ports.apply(&mut config);
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    runtime(config.worker_threads)
        .map_err(|e| e.to_string())?
        .block_on(async move {
            let traces = trace::init(trace::TraceConfig::from_env()?)?;
            let demo = demo::start(config).await.map_err(|e| e.to_string())?;
            println!("{}", demo.banner());
            stop_signal().await;
            demo.gateway.shutdown(grace).await;
            drop(demo.sims);
            traces.shutdown().await?;
            Ok(())
        })
}
