//! The command-line surface of `infergate-cli`: global flags, the subcommand enum, and error
//! reporting. Each subcommand lives in its own module.

mod admin;
mod bench;
mod health;
mod infer;
mod models;

use std::io::Write;
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

    /// Talk TLS, trusting the CA certificates in this PEM file (an https:// address
    /// alone trusts the system's CAs)
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// Client certificate chain (PEM) to show a server that asks (mTLS; with --tls-key)
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --tls-cert
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Name the server's certificate must carry [default: the address's host]
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
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
    /// Operate the gateway through its admin API: backends, models, events, configuration
    Admin(admin::AdminArgs),
    /// Print a shell completion script: `source <(infergate-cli completions bash)`, or
    /// save it where the shell loads completions (zsh: a `_infergate-cli` file on
    /// $fpath; fish: ~/.config/fish/completions/infergate-cli.fish)
    Completions {
        /// The shell: bash, zsh or fish (also elvish, powershell)
        shell: clap_complete::Shell,
    },
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

    /// The TLS flags, when any is given.
    pub fn tls(&self) -> Option<infergate_client::TlsOptions> {
        (self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_server_name.is_some()).then(
            || infergate_client::TlsOptions {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                server_name: self.tls_server_name.clone(),
            },
        )
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

/// A failed command: the error, and a sentence on what to do about it.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong.
    pub error: ClientError,
    /// What to try next, when there is something to say.
    pub hint: Option<String>,
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        CliError {
            hint: error.hint().map(str::to_string),
            error,
        }
    }
}

/// Runs the chosen subcommand; the exit code says whether it found what it checks for.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match &cli.command {
        Command::Infer(args) => Ok(infer::run(&cli, args).await?),
        Command::Models(args) => Ok(models::run(&cli, args).await?),
        Command::Health(args) => Ok(health::run(&cli, args).await?),
        Command::Bench(args) => Ok(bench::run(&cli, args).await?),
        Command::Admin(args) => admin::run(&cli, args).await,
        Command::Completions { shell } => {
            emit(&completions(*shell))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The completion script for `shell`, generated from the command definition.
pub fn completions(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut command = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "infergate-cli", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Prints an error and a hint to stderr and returns the exit code. Output cut short by a
/// closed pipe (`infergate-cli ... | head`) is not an error: nothing is printed and the
/// exit code is 0.
pub fn report_error(err: &CliError) -> ExitCode {
    if is_broken_pipe(&err.error) {
        return ExitCode::SUCCESS;
    }
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "error: {}", err.error);
    if let Some(hint) = &err.hint {
        let _ = writeln!(stderr, "hint: {hint}");
    }
    ExitCode::FAILURE
}

/// Whether an error is stdout closed under us.
pub fn is_broken_pipe(err: &ClientError) -> bool {
    matches!(err, ClientError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Writes text to stdout as is. Every command prints through here (never `println!`, which
/// panics when stdout is a closed pipe); a write error comes back as `ClientError::Io`
/// for `report_error` to judge.
pub fn emit(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| ClientError::Io {
            path: "stdout".to_string(),
            source,
        })
}

/// Writes a note for people to stderr; a closed stderr is not worth failing over.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Writes one line to stdout (see [`emit`]).
pub fn emitln(text: &str) -> Result<(), ClientError> {
    emit(&format!("{text}\n"))
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

/// Renders rows as left-aligned columns, one line each (with a final newline).
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
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
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Prints rows as left-aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<(), ClientError> {
    emit(&render_table(header, rows))
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
    fn completions_cover_every_subcommand() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completions(shell);
            assert!(script.contains("infergate-cli"), "{shell}");
            for sub in ["infer", "models", "health", "bench", "admin", "completions"] {
                assert!(script.contains(sub), "{shell}: {sub} missing");
            }
            // Nested admin subcommands and flags too (fish writes `-l model`).
            for word in ["drain", "eject", "model", "addr", "max-concurrent"] {
                assert!(script.contains(word), "{shell}: {word} missing");
            }
        }
        let cli = Cli::try_parse_from(["infergate-cli", "completions", "zsh"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Completions { shell: Shell::Zsh }
        ));
        assert!(Cli::try_parse_from(["infergate-cli", "completions", "tcsh"]).is_err());
    }

    /// The shells that are installed accept the scripts (`bash -n`, `zsh -n`,
    /// `fish --no-execute`); the others are skipped.
    #[test]
    fn completion_scripts_parse_in_their_shells() {
        use clap_complete::Shell;
        let dir =
            std::env::temp_dir().join(format!("infergate-cli-completions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (shell, program, flag) in [
            (Shell::Bash, "bash", "-n"),
            (Shell::Zsh, "zsh", "-n"),
            (Shell::Fish, "fish", "--no-execute"),
        ] {
            let path = dir.join(program);
            std::fs::write(&path, completions(shell)).expect("write");
            match std::process::Command::new(program)
                .arg(flag)
                .arg(&path)
                .output()
            {
                Ok(out) => assert!(
                    out.status.success(),
                    "{program}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{program}: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
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

    #[test]
    fn tables_line_up() {
        let rows = vec![
            vec!["a".to_string(), "long cell".to_string(), "x".to_string()],
            vec!["bbbb".to_string(), "c".to_string(), "y".to_string()],
        ];
        assert_eq!(
            render_table(&["H1", "H2", "H3"], &rows),
            "H1    H2         H3\na     long cell  x\nbbbb  c          y\n"
        );
    }

    #[test]
    fn a_closed_pipe_is_quiet_success() {
        let pipe = CliError::from(ClientError::Io {
            path: "stdout".to_string(),
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        });
        assert!(is_broken_pipe(&pipe.error));
        assert_eq!(report_error(&pipe), ExitCode::SUCCESS);
        let other = CliError::from(ClientError::InvalidInput("x".to_string()));
        assert!(!is_broken_pipe(&other.error));
        assert_eq!(report_error(&other), ExitCode::FAILURE);
    }
}
