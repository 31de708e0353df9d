//! `infergate demo`: the gateway on its default ports in front of three simulated GPU
//! backends on free loopback ports, with nothing to configure. This is the first thing a
//! new user runs.
//!
//! `infergate demo --tls` runs every hop over TLS instead: it makes a CA and one
//! certificate for `localhost` and 127.0.0.1 on the spot (rcgen), writes them to a
//! fresh folder, and serves the front door, the admin port and the simulated backends
//! with it; the gateway dials the backends checking their certificate against the CA.
//! The banner says where the CA is and how to call the gateway with it.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, [`init_traces`] exports the gateway's spans as
//! `service.name` `infergate` (or `OTEL_SERVICE_NAME`) and each simulated backend's as its
//! own name (`gpu-0`, `gpu-1`, ...), as if each ran in its own process: one exporter per
//! service, and a global tracer provider that hands out the tracer of the simulator whose
//! thread asks ([`sim::current_name`]).

use crate::config::{BackendConfig, BackendTlsConfig, Config, TlsConfig};
use crate::server::{self, GatewayHandle, StartError};
use infergate_base::trace::{self, TraceConfig, TraceGuard};
use infergate_sim::{self as sim, SimConfig, SimHandle};
use opentelemetry::global::{BoxedTracer, GlobalTracerProvider};
use opentelemetry::InstrumentationScope;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How many simulated backends the demo runs.
pub const SIMS: usize = 3;

/// The name of simulated backend `i`: its `sim-name`, `gpu_uuid` and `service.name`.
pub fn sim_name(i: usize) -> String {
    format!("gpu-{i}")
}

/// A running demo: the simulated backends and the gateway in front of them.
pub struct Demo {
    /// The simulated backends (kept alive while the demo runs).
    pub sims: Vec<SimHandle>,
    /// The gateway.
    pub gateway: GatewayHandle,
    /// With `--tls`: the folder of the certificates, and the CA file in it.
    pub tls: Option<DemoTls>,
}

/// The certificates `demo --tls` made.
#[derive(Debug, Clone)]
pub struct DemoTls {
    /// The folder they were written to.
    pub folder: PathBuf,
    /// The CA every certificate chains to (what a client trusts).
    pub ca: PathBuf,
    /// The certificate (for `localhost` and 127.0.0.1) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DemoTls {
    /// A CA and one leaf for `localhost` and 127.0.0.1, written to a new folder under
    /// the system's temporary folder.
    pub fn make() -> Result<DemoTls, String> {
        DemoTls::make_in(
            &std::env::temp_dir().join(format!("infergate-demo-tls-{}", std::process::id())),
        )
    }

    /// The same, written to `folder` (created if missing).
    pub fn make_in(folder: &std::path::Path) -> Result<DemoTls, String> {
        let folder = folder.to_path_buf();
        std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        let ca = crate::tls::MadeCa::new("infergate demo CA")?;
        let leaf = ca.leaf(&["localhost", "127.0.0.1"], None, "infergate demo")?;
        let write = |name: &str, text: &str| -> Result<PathBuf, String> {
            let path = folder.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        };
        Ok(DemoTls {
            ca: write("ca.pem", &ca.cert_pem)?,
            cert: write("demo.pem", &leaf.cert_pem)?,
            key: write("demo.key", &leaf.key_pem)?,
            folder,
        })
    }
}

/// Starts three simulated backends and a gateway over them, listening where `config`
/// says (its backends are replaced by the simulated ones); with `tls`, every hop runs
/// over TLS with the certificates it holds.
pub async fn start(mut config: Config, tls: Option<DemoTls>) -> Result<Demo, StartError> {
    let mut sims = Vec::new();
    for i in 0..SIMS {
        let cfg = SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            name: sim_name(i),
            seed: 1 + i as u64,
            tls: tls.as_ref().map(|t| sim::SimTls {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: None,
            }),
            ..SimConfig::default()
        };
        let sim =
            sim::spawn(cfg).map_err(|e| StartError(format!("simulated backend gpu-{i}: {e}")))?;
        sims.push(sim);
    }
    config.backends = sims
        .iter()
        .map(|s| BackendConfig {
            metrics_address: s.metrics_addr().map(|a| a.to_string()),
            ..BackendConfig::new(s.addr().to_string())
        })
        .collect();
    if let Some(t) = &tls {
        config.tls = TlsConfig {
            cert: Some(t.cert.clone()),
            key: Some(t.key.clone()),
            ..TlsConfig::default()
        };
        config.backend_tls = Some(BackendTlsConfig {
            ca: Some(t.ca.clone()),
            server_name: Some("localhost".into()),
            ..BackendTlsConfig::default()
        });
    }
    let gateway = server::start(config, "demo").await?;
    Ok(Demo { sims, gateway, tls })
}

impl Demo {
    /// What the demo prints at start: where everything listens and what to try.
    pub fn banner(&self) -> String {
        let mut out = String::new();
        out.push_str("infergate demo is running\n");
        out.push_str(&format!(
            "  inference (KServe v2 gRPC)  {}\n  admin API                   {}\n  metrics                     http://{}/metrics\n",
            self.gateway.addr(),
            self.gateway.admin_addr(),
            self.gateway.metrics_addr()
        ));
        for (i, sim) in self.sims.iter().enumerate() {
            let metrics = sim
                .metrics_addr()
                .map(|a| format!(" (metrics and fault control on http://{a}/metrics, /control)"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  simulated backend gpu-{i}    {}{metrics}\n",
                sim.addr()
            ));
        }
        out.push_str(
            "models: simple, identity_fp32, tiny_llm (decoupled, streaming), accumulate (stateful: sequence_id)\n",
        );
        match &self.tls {
            None => out.push_str(&format!(
                "try:  cargo run --release --bin infergate-cli -- --addr {} infer --model simple\n",
                self.gateway.addr()
            )),
            Some(t) => {
                let port = self.gateway.addr().port();
                out.push_str(&format!(
                    "TLS on every hop; the CA is {ca} (certificates in {folder})\n\
                     try:  cargo run --release --bin infergate-cli -- --addr localhost:{port} --tls-ca {ca} infer --model simple\n\
                     \x20     buf curl --protocol grpc --cacert {ca} https://localhost:{port}/inference.GRPCInferenceService/ServerLive\n\
                     \x20     python3 -c 'import tritonclient.grpc as g; print(g.InferenceServerClient(\"localhost:{port}\", ssl=True, root_certificates=\"{ca}\").is_server_live())'\n",
                    ca = t.ca.display(),
                    folder = t.folder.display(),
                ));
            }
        }
        out.push_str("stop: Ctrl-C\n");
        out
    }
}

/// The demo's trace exporters: the gateway's and one per simulated backend. Shut it down
/// after the gateway and the backends have stopped.
#[must_use = "dropping it shuts tracing down"]
pub struct DemoTraces {
    sims: Vec<TraceGuard>,
    gateway: TraceGuard,
}

impl DemoTraces {
    /// True when spans are exported.
    pub fn is_active(&self) -> bool {
        self.gateway.is_active()
    }

    /// Exports every ended span now, for each service.
    pub async fn flush(&self) -> Result<(), String> {
        for guard in self.sims.iter().chain([&self.gateway]) {
            guard.flush().await?;
        }
        Ok(())
    }

    /// Flushes and stops every exporter; tracing is off afterwards.
    pub async fn shutdown(self) -> Result<(), String> {
        for guard in self.sims {
            guard.shutdown().await?;
        }
        self.gateway.shutdown().await
    }
}

/// Starts tracing for the demo as [`trace::init`] does for one service (nothing when
/// `cfg` has no endpoint), with each simulated backend (`gpu-0`...) exported under its
/// own `service.name` and the gateway under `cfg.service_name`. Call it before [`start`],
/// inside a tokio runtime.
pub fn init_traces(cfg: TraceConfig) -> Result<DemoTraces, String> {
    if cfg.endpoint.is_none() {
        return Ok(DemoTraces {
            sims: Vec::new(),
            gateway: TraceGuard::inactive(),
        });
    }
    // Each init installs its provider globally; what `tracer_provider` returns keeps
    // that one working after the next replaces it. The gateway's goes last, so its
    // guard is the one that turns tracing off.
    let mut sims = Vec::new();
    let mut by_sim = HashMap::new();
    for i in 0..SIMS {
        let name = sim_name(i);
        sims.push(trace::init(TraceConfig {
            service_name: name.clone(),
            ..cfg.clone()
        })?);
        by_sim.insert(name, opentelemetry::global::tracer_provider());
    }
    let gateway = trace::init(cfg)?;
    opentelemetry::global::set_tracer_provider(PerSimulator {
        gateway: opentelemetry::global::tracer_provider(),
        by_sim,
    });
    Ok(DemoTraces { sims, gateway })
}

/// A tracer provider that hands a simulator's thread that simulator's tracer, and every
/// other thread the gateway's.
#[derive(Debug)]
struct PerSimulator {
    gateway: GlobalTracerProvider,
    by_sim: HashMap<String, GlobalTracerProvider>,
}

impl opentelemetry::trace::TracerProvider for PerSimulator {
    type Tracer = BoxedTracer;

    fn tracer_with_scope(&self, scope: InstrumentationScope) -> BoxedTracer {
        let provider = sim::current_name()
            .and_then(|name| self.by_sim.get(&name))
            .unwrap_or(&self.gateway);
        provider.tracer_with_scope(scope)
    }
}
