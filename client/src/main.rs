//! `infergate-cli`: call a KServe v2 gRPC server (the infergate gateway, Triton, or the
//! simulator) from the command line — infer, list models, check health, generate load — and
//! operate the gateway through its admin API.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Some(tls) = args.tls() {
        infergate_client::use_tls(tls);
    }
    // Each call starts a trace when OTEL_EXPORTER_OTLP_ENDPOINT names a collector.
    let traces = match infergate_client::trace::init_from_env("infergate-cli") {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli::run(args).await {
        Ok(code) => code,
        Err(err) => cli::report_error(&err),
    };
    if let Err(e) = traces.shutdown().await {
        eprintln!("warning: {e}");
    }
    code
}
