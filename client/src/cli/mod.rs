//! The command-line surface of `infergate-cli`: global flags, the subcommand enum, and error
//! reporting. Each subcommand lives in its own module.

mod bench;
mod health;
mod infer;
mod models;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use infergate_client::{Client, ClientError};

/// The address used when neither --addr nor INFERGATE_ADDR is set.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8001";

/// Talk to an infergate gateway (or any KServe v2 / Triton gRPC server).
#[derive(Debug, Parser)]
#[command(name = "infergate-cli", version, about, long_about = None)]
pub struct Cli {
    /// Server address, host:port or http://host:port [default: $INFERGATE_ADDR, else 127.0.0.1:8001]
    #[arg(long, global = true, value_name = "ADDR")]
    pub addr: Option<String>,

    /// Metadata header added to every call, as KEY=VALUE (repeatable), e.g. --header x-tenant=blue
    #[arg(long = "header", global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub headers: Vec<(String, String)>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. (The control-plane work adds `admin` here, with its module in cli/.)
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one inference (ModelInfer), or stream tokens from a decoupled model (ModelStreamInfer)
    Infer(infer::InferArgs),
    /// List the models the server knows (RepositoryIndex)
    Models(models::ModelsArgs),
    /// Check liveness, readiness and grpc.health.v1 status, for the server and each model
    Health(health::HealthArgs),
    /// Generate load and report throughput, latency percentiles, errors and per-backend share
    Bench(bench::BenchArgs),
}

impl Cli {
    /// The address to dial: --addr, else $INFERGATE_ADDR, else the default.
    pub fn address(&self) -> String {
        self.addr
            .clone()
            .or_else(|| {
                std::env::var("INFERGATE_ADDR")
                    .ok()
                    .filter(|a| !a.trim().is_empty())
            })
            .unwrap_or_else(|| DEFAULT_ADDR.to_string())
    }

    /// Connects and applies the --header flags.
    pub async fn client(&self) -> Result<Client, ClientError> {
        let mut client = Client::connect(&self.address()).await?;
        for (k, v) in &self.headers {
            client = client.with_header(k, v)?;
        }
        Ok(client)
    }
}

/// Runs the chosen subcommand; the exit code says whether it found what it checks for.
pub async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    match &cli.command {
        Command::Infer(args) => infer::run(&cli, args).await,
        Command::Models(args) => models::run(&cli, args).await,
        Command::Health(args) => health::run(&cli, args).await,
        Command::Bench(args) => bench::run(&cli, args).await,
    }
}

/// Prints an error, its gRPC code and a hint to stderr.
pub fn report_error(err: &ClientError) {
    eprintln!("error: {err}");
    if let Some(hint) = err.hint() {
        eprintln!("hint: {hint}");
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Serializes to pretty JSON; serde_json cannot fail on the plain values used here, but if
/// it ever did the error is reported rather than panicking.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String, ClientError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| ClientError::Protocol(format!("cannot render JSON: {e}")))
}

/// Prints rows as left-aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(cell.chars().count());
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{out}");
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_value_flags() {
        assert_eq!(
            parse_key_value("x-tenant=blue"),
            Ok(("x-tenant".to_string(), "blue".to_string()))
        );
        assert_eq!(
            parse_key_value("authorization=Bearer a=b"),
            Ok(("authorization".to_string(), "Bearer a=b".to_string()))
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=v").is_err());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "infergate-cli",
            "--addr",
            "10.0.0.1:9000",
            "infer",
            "--model",
            "simple",
            "--input",
            "INPUT0:INT32:1,2:1,2",
            "--header",
            "k=v",
        ])
        .expect("parses");
        assert_eq!(cli.address(), "10.0.0.1:9000");
        assert_eq!(cli.headers, vec![("k".to_string(), "v".to_string())]);
        let cli = Cli::try_parse_from([
            "infergate-cli",
            "bench",
            "--rate",
            "100",
            "--duration",
            "1.5",
            "--connections",
            "2",
            "--json",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Bench(_)));
        assert!(Cli::try_parse_from(["infergate-cli", "bench", "--rate", "fast"]).is_err());
    }
}
