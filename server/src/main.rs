//! The `infergate` binary: `serve` (the gateway), `demo` (gateway + simulated GPU pool,
//! nothing to configure), `sim` (one simulated GPU backend) and `config` (`check` a file,
//! print the `defaults`).

use clap::{Args, Parser, Subcommand};
use infergate::config::{
    BackendConfig, BackendTlsConfig, Bucket, BulkheadConfig, CacheConfig, Config, DnsConfig,
    ModelConfig, PolicyKind, PrefixConfig, TlsConfig,
};
use infergate::{demo, server};
use infergate_base::trace;
use infergate_sim as sim;
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
    Demo(DemoArgs),
    /// Run one simulated GPU inference backend (a KServe v2 gRPC server).
    Sim(sim::SimArgs),
    /// Check a config file, or print one with every default.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate FILE as `serve --config FILE` would: print the error (exit 1), or a
    /// summary of what it would run (exit 0).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print a complete config file with every default, generated from the code; the
    /// fields that have none, and example backends, DNS names and models, are commented
    /// out.
    Defaults,
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

#[derive(Args, Debug, Clone, Default)]
struct DemoArgs {
    /// Every hop over TLS, with a CA and a certificate for localhost made on the spot
    /// (the banner says where they are and how to call the gateway).
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    ports: Ports,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML). Flags override what it says.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A backend's host:port; repeat for more. Added to the config file's backends.
    #[arg(long = "backend", value_name = "HOST:PORT")]
    backends: Vec<String>,
    /// Redis for rate limits with scope = "global" (redis://host:port[/db], rediss:// for
    /// TLS); replaces the file's [redis] url.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Balancing policy for the whole pool: round_robin, weighted, least_request,
    /// gpu_aware (the default) or prefix_affinity.
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Do not record metrics (nothing is served on --metrics-listen).
    #[arg(long)]
    no_metrics: bool,
    /// Serve TLS with this certificate chain (PEM); replaces the file's [tls] cert.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Ask clients for certificates chained to this CA (PEM), and require one.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
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
        Command::Demo(args) => run_demo(args),
        Command::Sim(args) => runtime(None)
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(sim::run_cli(args)).map_err(|e| e.to_string())),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Config(ConfigCommand::Defaults) => defaults_toml().map(|text| print!("{text}")),
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
    if let Some(cert) = &args.tls_cert {
        config.tls.cert = Some(cert.clone());
        config.tls.key = args.tls_key.clone();
    }
    if let Some(ca) = &args.tls_client_ca {
        config.tls.client_ca = Some(ca.clone());
        config.tls.require_client_cert = true;
    }
    if let Some(url) = &args.redis {
        config.redis.url = Some(url.clone());
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

fn run_demo(args: DemoArgs) -> Result<(), String> {
    let mut config = Config::default();
    args.ports.apply(&mut config);
    let tls = args.tls.then(demo::DemoTls::make).transpose()?;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    runtime(config.worker_threads)
        .map_err(|e| e.to_string())?
        .block_on(async move {
            // Each simulated backend exports its spans as its own service (gpu-0, ...).
            let traces = demo::init_traces(trace::TraceConfig::from_env()?)?;
            let demo = demo::start(config, tls).await.map_err(|e| e.to_string())?;
            println!("{}", demo.banner());
            stop_signal().await;
            demo.gateway.shutdown(grace).await;
            drop(demo.sims);
            if let Some(t) = &demo.tls {
                let _ = std::fs::remove_dir_all(&t.folder);
            }
            traces.shutdown().await?;
            Ok(())
        })
}

// --- infergate config -------------------------------------------------------------------

/// What `config check` prints: the error (exit 1), or what `serve --config FILE` would run.
fn config_check(path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    // The one rule `serve` checks at start and not while loading (the environment can
    // supply the token).
    let env_token = std::env::var("INFERGATE_ADMIN_TOKEN").is_ok_and(|t| !t.is_empty());
    let token = config.admin.token.is_some() || env_token;
    if !config.admin_guarded(token) && !config.admin_listen.ip().is_loopback() {
        return Err(format!(
            "{}: field `admin_listen`: {} is not a loopback address and no token is set \
             ({})",
            path.display(),
            config.admin_listen,
            infergate::server::ADMIN_GUARDS,
        ));
    }
    print!(
        "{}",
        check_summary(&path.display().to_string(), &config, token)
    );
    Ok(())
}

/// How the admin port is guarded, for `config check`.
fn admin_guard(config: &Config, token: bool) -> String {
    let token = if token { "token set" } else { "no token" };
    match config.admin.allowed_identities.len() {
        0 => token.to_owned(),
        1 => format!("{token}, 1 client identity allowed"),
        n => format!("{token}, {n} client identities allowed"),
    }
}

fn check_summary(source: &str, config: &Config, token: bool) -> String {
    let mut out = format!("{source}: valid\n");
    let metrics = if config.metrics {
        format!("http://{}/metrics", config.metrics_listen)
    } else {
        "off".to_owned()
    };
    out.push_str(&format!(
        "  listen     {} (inference), {} (admin, {}), metrics {metrics}\n",
        config.listen,
        config.admin_listen,
        admin_guard(config, token),
    ));
    out.push_str(&format!(
        "  policy     {} for every model without its own\n",
        config.balancer.policy.as_str()
    ));
    out.push_str(&format!("  backends   {}\n", config.backends.len()));
    for b in &config.backends {
        let models = if b.models.is_empty() {
            "models discovered".to_owned()
        } else {
            format!("models {}", b.models.join(", "))
        };
        let metrics = b
            .metrics_address
            .as_ref()
            .map(|m| format!(", scraped at {m}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "    {} (weight {}, {models}{metrics})\n",
            b.address, b.weight
        ));
    }
    out.push_str(&format!("  dns        {}\n", config.dns.len()));
    for d in &config.dns {
        let server = d
            .nameserver
            .map(|n| format!(" via {n}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "    {}:{} (resolved every {} ms{server})\n",
            d.name, d.port, d.interval_ms
        ));
    }
    out.push_str(&format!("  models     {}\n", config.models.len()));
    for (name, m) in &config.models {
        let policy = m.policy.unwrap_or(config.balancer.policy);
        let mut parts = vec![format!(
            "policy {}{}",
            policy.as_str(),
            if m.policy.is_some() { "" } else { " (pool)" }
        )];
        if let Some(b) = &m.bulkhead {
            let concurrent = if b.max_concurrent == 0 {
                "unlimited".to_owned()
            } else {
                b.max_concurrent.to_string()
            };
            parts.push(format!(
                "bulkhead {concurrent} in flight + {} queued",
                b.max_queue
            ));
        }
        if m.retry.is_some() {
            parts.push("own retry".into());
        }
        if m.hedge.as_ref().is_some_and(|h| h.enabled) {
            parts.push("hedged".into());
        }
        if let Some(d) = m.deadline_default_ms {
            parts.push(format!("deadline {d} ms"));
        }
        if let Some(d) = m.deadline_max_ms {
            parts.push(format!("at most {d} ms"));
        }
        if let Some(f) = &m.fallback {
            parts.push(format!("fallback {f}"));
        }
        out.push_str(&format!("    {name}: {}\n", parts.join(", ")));
    }
    if config.backends.is_empty() && config.dns.is_empty() {
        out.push_str("  note: no [[backends]] and no [[dns]]: serve needs --backend HOST:PORT\n");
    }
    out
}

/// One line for each top-level section of `config defaults`, printed above it.
/// server/tests/config_cli.rs checks that every section has one.
const SECTIONS: &[(&str, &str)] = &[
    ("balancer", "Pool-wide balancing: the policy of every model without its own."),
    ("health", "Active health checks of backends (grpc.health.v1 and ModelReady)."),
    ("discovery", "Learning which backend serves which model (RepositoryIndex, ModelReady)."),
    ("load", "Load reports (ORCA per call or out of band, Prometheus scrapes) and how they are read."),
    ("outlier", "Passive outlier detection and ejection."),
    ("breaker", "Circuit breakers (one per backend and one per backend x model, all alike)."),
    ("backend_connection", "Backend connections: HTTP/2 PING keepalive, connect timeout."),
    ("no_response", "When an attempt that has received nothing counts as a backend's failure."),
    ("tenants", "Who a call belongs to: the tenant header, API keys, the priority header."),
    ("rate_limit", "Token-bucket rate limits per tenant and per model."),
    ("redis", "The Redis that holds rate limits with scope = \"global\" (shared by every replica)."),
    ("retry", "Retries for every model (a model's own [models.NAME.retry] replaces it)."),
    ("hedge", "Hedging for every model (off by default; [models.NAME.hedge] replaces it)."),
    ("sequences", "Stateful sequences (Triton's sequence_id): pinned to one backend by rendezvous hashing."),
    ("tls", "TLS on the inference port (and the admin port without [admin.tls]); plaintext without cert and key."),
    ("backend_tls", "TLS toward backends (example; a backend's own tls = false turns it off)."),
    ("admin", "The admin API (infergate.admin.v1.Admin on admin_listen)."),
    ("backends", "The backends, one [[backends]] table each (example)."),
    ("dns", "DNS names whose A/AAAA records are backends, e.g. a Kubernetes headless service (example)."),
    ("models", "Per-model settings, one [models.NAME] table each (example)."),
];

/// The defaults with every optional field set, and one example of each list, so that
/// `config defaults` can show them commented out. A field with no default that is
/// missing here is caught by server/tests/config_cli.rs.
fn example_config(defaults: &Config) -> Config {
    let mut c = defaults.clone();
    c.worker_threads = Some(8);
    c.admin.token = Some("change-me".into());
    c.admin.watch_config = Some(true);
    c.rate_limit.per_tenant = Some(Bucket::default());
    c.rate_limit.per_model = Some(Bucket::default());
    c.rate_limit
        .tenants
        .insert("team-a".into(), Bucket::default());
    c.tenants
        .api_keys
        .insert("key-of-team-a".into(), "team-a".into());
    c.tenants.weights.0.insert("team-a".into(), 3.0);
    c.rate_limit.per_tenant_tokens = Some(infergate::config::TokenRate::default());
    // rediss:// (TLS), so that its CA and client certificate are valid to show.
    c.redis.url = Some("rediss://redis.internal:6380/0".into());
    c.redis.ca = Some("/etc/infergate/redis-ca.crt".into());
    c.redis.cert = Some("/etc/infergate/redis-client.crt".into());
    c.redis.key = Some("/etc/infergate/redis-client.key".into());
    c.tls = TlsConfig {
        cert: Some("/etc/infergate/tls.crt".into()),
        key: Some("/etc/infergate/tls.key".into()),
        client_ca: Some("/etc/infergate/client-ca.crt".into()),
        ..defaults.tls.clone()
    };
    c.admin.tls = Some(c.tls.clone());
    c.admin
        .allowed_identities
        .push("spiffe://example.org/ops".into());
    c.tenants
        .identities
        .insert("spiffe://example.org/team-a".into(), "team-a".into());
    c.backend_tls = Some(BackendTlsConfig {
        ca: Some("/etc/infergate/backend-ca.crt".into()),
        cert: Some("/etc/infergate/client.crt".into()),
        key: Some("/etc/infergate/client.key".into()),
        server_name: Some("triton.internal".into()),
    });
    c.retry.per_try_timeout_ms = Some(1000);
    c.hedge.delay_ms = Some(20);
    c.hedge.delay_percentile = Some(0.95);
    let mut backend = BackendConfig::new("triton-0.triton:8001");
    backend.models = vec!["simple".into()];
    backend.metrics_address = Some("triton-0.triton:8002".into());
    backend.capacity = Some(8);
    backend.tls = Some(true);
    backend.server_name = Some("triton-0.triton".into());
    backend.scrape.utilization_metric = Some("nv_gpu_utilization".into());
    backend.scrape.queue_metric = Some("nv_inference_pending_request_count".into());
    backend.scrape.running_metric = Some("nv_inference_exec_count".into());
    c.backends = vec![backend];
    let mut dns = DnsConfig::new("triton.default.svc.cluster.local", 8001);
    dns.nameserver = "10.96.0.10:53".parse().ok();
    c.dns = vec![dns];
    let mut retry = defaults.retry.clone();
    retry.per_try_timeout_ms = Some(500);
    c.models.insert(
        "simple".into(),
        ModelConfig {
            decoupled: Some(false),
            policy: Some(defaults.balancer.policy),
            // Read only under policy = "prefix_affinity".
            prefix: Some(PrefixConfig::default()),
            bulkhead: Some(BulkheadConfig {
                max_concurrent: 32,
                tenant_share: Some(0.5),
                ..BulkheadConfig::default()
            }),
            retry: Some(retry),
            hedge: Some(c.hedge.clone()),
            deadline_default_ms: Some(1000),
            deadline_max_ms: Some(30_000),
            fallback: Some("simple_cpu".into()),
            fallback_when_full: false,
            triton_timeout_parameter: false,
            no_response: Some(defaults.no_response.clone()),
            sequence_idle_ms: Some(1000),
            cache: Some(CacheConfig::default()),
        },
    );
    c
}

/// `infergate config defaults`: [`Config::default`] as TOML, each section under its line
/// from [`SECTIONS`], then what [`example_config`] adds, commented out (`# key = value`,
/// `# [table]`; prose comments never start with a key or a bracket).
fn defaults_toml() -> Result<String, String> {
    let defaults = Config::default();
    let example = example_config(&defaults);
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => Ok(t),
        Ok(_) => Err("the config is not a table".to_owned()),
        Err(e) => Err(format!("serializing the defaults: {e}")),
    };
    let mut d = table(&defaults)?;
    let mut e = table(&example)?;
    // The serializer writes fields in declaration order; the table sorts them.
    let order = key_order(&toml::to_string(&example).map_err(|e| e.to_string())?);
    let mut lists = Vec::new();
    for key in ["backends", "dns", "models"] {
        d.remove(key);
        if let Some(v) = e.remove(key) {
            lists.push((key, v));
        }
    }
    let missing = missing_keys(&e, &d);
    let mut out = format!(
        "# infergate {} configuration: every field with its default, generated by\n\
         # `infergate config defaults`. Check a file with `infergate config check FILE`.\n\
         # Times are in milliseconds (`_ms`) unless the name says otherwise. Lines such as\n\
         # `# key = value` are fields that have no default (absent, they are off or follow\n\
         # another setting; docs/ARCHITECTURE.md#configuration says which) and examples:\n\
         # the values shown are examples, not defaults.\n",
        env!("CARGO_PKG_VERSION")
    );
    render_table(&mut out, &[], &d, &missing, false, false, &order)?;
    for (key, value) in lists {
        out.push('\n');
        describe(&mut out, key);
        match value {
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        render_table(
                            &mut out,
                            &[key],
                            &t,
                            &toml::Table::new(),
                            true,
                            true,
                            &order,
                        )?;
                    }
                }
            }
            toml::Value::Table(models) => {
                for (name, model) in models {
                    if let toml::Value::Table(t) = model {
                        render_table(
                            &mut out,
                            &[key, &name],
                            &t,
                            &toml::Table::new(),
                            true,
                            false,
                            &order,
                        )?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn describe(out: &mut String, section: &str) {
    if let Some((_, line)) = SECTIONS.iter().find(|(name, _)| *name == section) {
        out.push_str(&format!("# {line}\n"));
    }
}

/// Position of each dotted key in `text` (TOML as the serializer writes it).
fn key_order(text: &str) -> std::collections::HashMap<String, usize> {
    let mut order = std::collections::HashMap::new();
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            table = header.trim_matches(|c| c == '[' || c == ']').to_owned();
            order.entry(table.clone()).or_insert(i);
        } else if let Some((key, _)) = line.split_once(" = ") {
            let path = if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            };
            order.entry(path).or_insert(i);
        }
    }
    order
}

/// What `example` has and `defaults` lacks, as a table of the same shape.
fn missing_keys(example: &toml::Table, defaults: &toml::Table) -> toml::Table {
    let mut out = toml::Table::new();
    for (key, value) in example {
        match (value, defaults.get(key)) {
            (_, None) => {
                out.insert(key.clone(), value.clone());
            }
            (toml::Value::Table(e), Some(toml::Value::Table(d))) => {
                let inner = missing_keys(e, d);
                if !inner.is_empty() {
                    out.insert(key.clone(), toml::Value::Table(inner));
                }
            }
            _ => {}
        }
    }
    out
}

fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

/// Writes `table` at `path`: its header (with its section's line), its values, the
/// values `missing` adds commented out, then its sub-tables, then the sub-tables only
/// `missing` has, commented out. `array`: the header is `[[path]]`.
fn render_table(
    out: &mut String,
    path: &[&str],
    table: &toml::Table,
    missing: &toml::Table,
    commented: bool,
    array: bool,
    order: &std::collections::HashMap<String, usize>,
) -> Result<(), String> {
    let prefix = if commented { "# " } else { "" };
    let dotted = |key: &str| {
        path.iter()
            .copied()
            .chain([key])
            .map(toml_key)
            .collect::<Vec<_>>()
            .join(".")
    };
    let position = |key: &str| {
        let plain: Vec<&str> = path.iter().copied().chain([key]).collect();
        order.get(&plain.join(".")).copied().unwrap_or(usize::MAX)
    };
    let sorted = |t: &toml::Table| {
        let mut keys: Vec<(String, toml::Value)> =
            t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        keys.sort_by_key(|(k, _)| (position(k), k.clone()));
        keys
    };
    let is_table = |v: &toml::Value| matches!(v, toml::Value::Table(_));
    if !path.is_empty() {
        if path.len() == 1 && !array {
            out.push('\n');
            describe(out, path[0]);
        }
        let header = path
            .iter()
            .copied()
            .map(toml_key)
            .collect::<Vec<_>>()
            .join(".");
        if array {
            out.push_str(&format!("{prefix}[[{header}]]\n"));
        } else {
            out.push_str(&format!("{prefix}[{header}]\n"));
        }
    }
    let line = |key: &str, value: &toml::Value| -> Result<String, String> {
        let mut one = toml::Table::new();
        one.insert(key.to_owned(), value.clone());
        let text = toml::to_string(&one).map_err(|e| format!("{}: {e}", dotted(key)))?;
        Ok(text.trim_end().to_owned())
    };
    for (key, value) in sorted(table).iter().filter(|(_, v)| !is_table(v)) {
        out.push_str(&format!("{prefix}{}\n", line(key, value)?));
    }
    for (key, value) in sorted(missing).iter().filter(|(_, v)| !is_table(v)) {
        out.push_str(&format!("# {}\n", line(key, value)?));
    }
    let empty = toml::Table::new();
    for (key, value) in sorted(table) {
        if let toml::Value::Table(sub) = value {
            let sub_missing = match missing.get(&key) {
                Some(toml::Value::Table(m)) => m,
                _ => &empty,
            };
            let child: Vec<&str> = path.iter().copied().chain([key.as_str()]).collect();
            render_table(out, &child, &sub, sub_missing, commented, false, order)?;
        }
    }
    for (key, value) in sorted(missing) {
        if let (toml::Value::Table(sub), false) = (&value, table.contains_key(&key)) {
            let child: Vec<&str> = path.iter().copied().chain([key.as_str()]).collect();
            render_table(out, &child, sub, &empty, true, false, order)?;
        }
    }
    Ok(())
}
