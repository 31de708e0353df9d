//! `infergate demo`: the gateway on its default ports in front of three simulated GPU
//! backends on free loopback ports, with nothing to configure. This is the first thing a
//! new user runs.

use crate::config::{BackendConfig, Config};
use crate::server::{self, GatewayHandle, StartError};
use crate::sim::{self, SimConfig, SimHandle};
use std::net::SocketAddr;

/// A running demo: the simulated backends and the gateway in front of them.
pub struct Demo {
    /// The simulated backends (kept alive while the demo runs).
    pub sims: Vec<SimHandle>,
    /// The gateway.
    pub gateway: GatewayHandle,
}

/// Starts three simulated backends and a gateway over them, listening where `config`
/// says (its backends are replaced by the simulated ones).
pub async fn start(mut config: Config) -> Result<Demo, StartError> {
    let mut sims = Vec::new();
    for i in 0..3 {
        let cfg = SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            name: format!("gpu-{i}"),
            seed: 1 + i as u64,
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
    let gateway = server::start(config, "demo").await?;
    Ok(Demo { sims, gateway })
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
        out.push_str("models: simple, identity_fp32, tiny_llm (decoupled, streaming)\n");
        out.push_str(&format!(
            "try:  cargo run --release --bin infergate-cli -- --addr {} infer --model simple\n",
            self.gateway.addr()
        ));
        out.push_str("stop: Ctrl-C\n");
        out
    }
}
