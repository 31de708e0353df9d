//! `infergate-cli bench`: the load generator from the command line, with a progress line on
//! stderr each second and a summary (or the JSON report) at the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use infergate_client::bench::{run_with_progress, write_timeline, BenchConfig};
use infergate_client::input::parse_infer_json;
use infergate_client::ClientError;

use super::{emit, emitln, note, to_json, Cli};

/// Flags of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model: simple (INT32 [1,16] x2), identity_fp32 (FP32 of --payload-bytes), tiny_llm (streamed)
    #[arg(long, short = 'm', default_value = "simple")]
    pub model: String,

    /// Closed loop: number of workers, each keeping one call in flight
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,

    /// Open loop: calls per second on a fixed schedule, latency measured from each call's
    /// scheduled time (replaces --concurrency)
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,

    /// Open loop: arrivals at random (exponential gaps, seeded by --seed) at the same
    /// mean rate instead of at fixed intervals
    #[arg(long, requires = "rate")]
    pub poisson: bool,

    /// Open loop at fixed intervals: delay every call by this fraction of one interval
    /// (0 ≤ phase < 1), so that several generators at one rate take turns
    #[arg(long, default_value_t = 0.0, requires = "rate")]
    pub phase: f64,

    /// Open loop: the most calls outstanding at once
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,

    /// Stop sending after this many seconds (fractions allowed) [default: 10 unless --count is given]
    #[arg(long, short = 'd', value_name = "SECONDS")]
    pub duration: Option<f64>,

    /// Stop after this many calls (whichever of --duration and --count comes first)
    #[arg(long, short = 'n')]
    pub count: Option<u64>,

    /// identity_fp32 payload size in bytes (FP32 element count = bytes / 4)
    #[arg(long, default_value_t = 4096)]
    pub payload_bytes: usize,

    /// Tokens per call for streaming models (tiny_llm)
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,

    /// Use ModelStreamInfer for a model other than tiny_llm
    #[arg(long)]
    pub stream: bool,

    /// Number of HTTP/2 connections; calls go round-robin over them
    #[arg(long, default_value_t = 1)]
    pub connections: usize,

    /// Per-call timeout in milliseconds
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Seed for the request contents (runs with the same seed send the same bytes)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Send this request (KServe v2 JSON, as for `infer --input-file`) instead of the built-in one
    #[arg(long, value_name = "FILE.json")]
    pub input_file: Option<PathBuf>,

    /// Write one line per finished call to FILE, `send_offset_ms latency_ms code backend`
    /// (offset from the start to when the call was due; code OK or the gRPC code name;
    /// backend from the sim-name header, `-` if none), sorted by send time, at the end
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,

    /// Print the report as JSON (progress still goes to stderr)
    #[arg(long)]
    pub json: bool,

    /// Do not print the progress line
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl BenchArgs {
    /// The library config these flags describe.
    pub fn config(&self, cli: &Cli) -> Result<BenchConfig, ClientError> {
        let duration = match self.duration {
            None => None,
            Some(secs) => Some(Duration::try_from_secs_f64(secs).map_err(|_| {
                ClientError::InvalidInput(format!(
                    "--duration {secs} is not a valid number of seconds"
                ))
            })?),
        };
        let request = match &self.input_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                let spec = parse_infer_json(&text)
                    .map_err(|e| ClientError::InvalidInput(format!("{}: {e}", path.display())))?;
                Some(spec.into_request(&self.model)?)
            }
        };
        Ok(BenchConfig {
            addr: cli.address(),
            model: self.model.clone(),
            concurrency: self.concurrency,
            rate: self.rate,
            poisson: self.poisson,
            phase: self.phase,
            max_in_flight: self.max_in_flight,
            duration,
            count: self.count,
            payload_bytes: self.payload_bytes,
            max_tokens: self.max_tokens,
            connections: self.connections,
            timeout: Duration::from_millis(self.timeout_ms),
            seed: self.seed,
            headers: cli.headers.clone(),
            stream: self.stream,
            request,
            timeline: self.timeline.is_some(),
        })
    }
}

/// Runs `bench`; exits 1 if no call succeeded.
pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<ExitCode, ClientError> {
    let cfg = args.config(cli)?;
    let quiet = args.quiet;
    let report = run_with_progress(cfg, |p| {
        if !quiet {
            note(&format!(
                "[{:6.1}s] sent {}  ok {}  errors {}  rate {:.1}/s",
                p.elapsed_s, p.sent, p.ok, p.errors, p.rate
            ));
        }
    })
    .await?;
    if let Some(path) = &args.timeline {
        write_timeline(path, &report.timeline).map_err(|source| ClientError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    if args.json {
        emitln(&to_json(&report)?)?;
    } else {
        emit(&report.summary())?;
    }
    Ok(if report.ok > 0 || report.sent == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;
    use clap::Parser;

    #[test]
    fn flags_become_a_config() {
        let cli = Cli::try_parse_from([
            "infergate-cli",
            "--addr",
            "h:1",
            "--header",
            "x-tenant=a",
            "bench",
            "--model",
            "identity_fp32",
            "--rate",
            "250",
            "--duration",
            "2.5",
            "--count",
            "100",
            "--payload-bytes",
            "65536",
            "--connections",
            "4",
            "--timeout-ms",
            "1500",
            "--seed",
            "9",
            "--max-in-flight",
            "64",
        ])
        .expect("parses");
        let Command::Bench(args) = &cli.command else {
            panic!("not bench");
        };
        let cfg = args.config(&cli).expect("valid");
        assert_eq!(cfg.addr, "h:1");
        assert_eq!(cfg.model, "identity_fp32");
        assert_eq!(cfg.rate, Some(250.0));
        assert_eq!(cfg.duration, Some(Duration::from_millis(2500)));
        assert_eq!(cfg.count, Some(100));
        assert_eq!(cfg.payload_bytes, 65536);
        assert_eq!(cfg.connections, 4);
        assert_eq!(cfg.timeout, Duration::from_millis(1500));
        assert_eq!(cfg.seed, 9);
        assert_eq!(cfg.max_in_flight, 64);
        assert!(!cfg.timeline);
        assert_eq!(cfg.headers, vec![("x-tenant".to_string(), "a".to_string())]);
    }

    #[test]
    fn negative_duration_is_rejected() {
        let cli = Cli::try_parse_from(["infergate-cli", "bench", "--duration=-1"]).expect("parses");
        let Command::Bench(args) = &cli.command else {
            panic!("not bench");
        };
        assert!(args.config(&cli).is_err());
    }
}
