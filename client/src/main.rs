//! `infergate-cli`: call a KServe v2 gRPC server (the infergate gateway, Triton, or the
//! simulator) from the command line — infer, list models, check health, generate load.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(code) => code,
        Err(err) => {
            cli::report_error(&err);
            ExitCode::FAILURE
        }
    }
}
