//! `infergate-cli admin`: the gateway's control plane (`infergate.admin.v1.Admin` on the
//! admin port): list backends and models, drain / eject / readmit / add / remove backends,
//! set weights, change a model's policy and limits, watch events, read and reload the
//! configuration.

mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use infergate_client::{connect_channel, parse_header, ClientError};
use infergate_proto::admin::admin_client::AdminClient;
use infergate_proto::admin::{
    AddBackendRequest, CacheStatsRequest, DrainBackendRequest, EjectBackendRequest,
    GetConfigRequest, ListBackendsRequest, ListModelsRequest, ListSequencesRequest,
    PurgeCacheRequest, ReadmitBackendRequest, ReloadConfigRequest, RemoveBackendRequest,
    SetWeightRequest, UpdateModelRequest, WatchEventsRequest,
};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;
use tonic::Code;

use super::{emit, note, to_json, Cli, CliError};

/// The admin address used when neither --admin-addr nor INFERGATE_ADMIN_ADDR is set.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8003";

/// Flags of `admin`. The flags here may also be given after the subcommand.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The gateway's admin port, host:port or http://host:port [default: $INFERGATE_ADMIN_ADDR, else 127.0.0.1:8003]
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin_addr: Option<String>,

    /// Bearer token for the admin API [default: $INFERGATE_ADMIN_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,

    /// Print the response as JSON (`watch`: one JSON object per line)
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The `admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the backends in the pool: health, load, state, counters
    Backends,
    /// List the models: policy, eligible backends, bulkhead, latency, fallback
    Models,
    /// List the stateful sequences pinned to each backend (sequence_id, idle time, lost)
    Sequences {
        /// Only this model's sequences
        #[arg(long)]
        model: Option<String>,
    },
    /// Stop sending new calls to a backend and wait for its calls in flight (exit 1 if they
    /// did not end in time)
    Drain(DrainArgs),
    /// Take a backend out of rotation for a while
    Eject(EjectArgs),
    /// End a backend's ejection (by hand or by outlier detection)
    Readmit(AddressArg),
    /// Add a backend to the pool (it ramps up over balancer.slow_start_ms)
    Add(AddArgs),
    /// Drain a backend, then remove it from the pool
    Remove(RemoveArgs),
    /// Set a backend's static weight
    Weight(WeightArgs),
    /// Change a model's balancing policy, bulkhead limits or fallback
    Model(ModelArgs),
    /// Print the gateway's events as they happen, until Ctrl-C
    Watch,
    /// Read or reload the gateway's configuration
    Config {
        /// What to do.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show or empty the response caches ([models.NAME] cache)
    Cache {
        /// What to do.
        #[command(subcommand)]
        command: CacheCommand,
    },
}

/// `admin cache` subcommands.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes, hits by level, misses, coalesced calls and evictions per model
    Stats,
    /// Empty a model's cache, in the gateway and (for a shared cache) in Redis
    Purge {
        /// The model whose cache to empty
        model: String,
    },
}

/// `admin config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration in force, as TOML
    Get,
    /// Validate and apply a configuration; without --file the gateway re-reads its own file
    Reload {
        /// TOML file to send and apply
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// A backend address.
#[derive(Debug, Args)]
pub struct AddressArg {
    /// Backend address (host:port), as `admin backends` lists it
    pub address: String,
}

/// Flags of `admin drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Backend address (host:port), as `admin backends` lists it
    pub address: String,
    /// How long to wait for calls in flight to end, in seconds [default: the gateway's, 30]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, conflicts_with = "undrain")]
    pub timeout: Option<u64>,
    /// Send the backend calls again instead
    #[arg(long)]
    pub undrain: bool,
}

/// Flags of `admin eject`.
#[derive(Debug, Args)]
pub struct EjectArgs {
    /// Backend address (host:port), as `admin backends` lists it
    pub address: String,
    /// How long, in seconds [default: the gateway's, 60]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<u64>,
    /// Why (shown by `admin backends` and in events)
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
}

/// Flags of `admin add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Backend address (host:port)
    pub address: String,
    /// A model it serves (repeatable) [default: discovered from the backend]
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
    /// Static weight [default: the gateway's]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: Option<u32>,
    /// Prometheus endpoint to scrape for load when the backend sends no ORCA reports
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_address: Option<String>,
}

/// Flags of `admin remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Backend address (host:port), as `admin backends` lists it
    pub address: String,
    /// How long to let calls in flight finish before removing it anyway, in seconds
    /// [default: the gateway's, 30]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub drain_timeout: Option<u64>,
}

/// Flags of `admin weight`.
#[derive(Debug, Args)]
pub struct WeightArgs {
    /// Backend address (host:port), as `admin backends` lists it
    pub address: String,
    /// The new static weight (at least 1)
    #[arg(value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: u32,
}

/// Flags of `admin model`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model name, as `admin models` lists it
    pub name: String,
    /// Balancing policy: round_robin, weighted, least_request, gpu_aware or prefix_affinity
    #[arg(long, value_name = "POLICY")]
    pub policy: Option<String>,
    /// Bulkhead: calls running at once (0 removes the bulkhead)
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u32>,
    /// Bulkhead: calls waiting for a slot
    #[arg(long, value_name = "N")]
    pub max_queue: Option<u32>,
    /// Bulkhead: how long a call may wait for a slot, in milliseconds
    #[arg(long, value_name = "N")]
    pub queue_timeout_ms: Option<u64>,
    /// Model called instead when this one has no backend ("" = none)
    #[arg(long, value_name = "MODEL", conflicts_with = "no_fallback")]
    pub fallback: Option<String>,
    /// Remove the fallback model
    #[arg(long)]
    pub no_fallback: bool,
}

impl ModelArgs {
    /// The UpdateModel request these flags describe; an error when they change nothing.
    pub fn request(&self) -> Result<UpdateModelRequest, ClientError> {
        let fallback = if self.no_fallback {
            Some(String::new())
        } else {
            self.fallback.clone()
        };
        let req = UpdateModelRequest {
            name: self.name.clone(),
            policy: self.policy.clone().unwrap_or_default(),
            max_concurrent: self.max_concurrent,
            max_queue: self.max_queue,
            queue_timeout_ms: self.queue_timeout_ms,
            fallback,
        };
        if req.policy.is_empty()
            && req.max_concurrent.is_none()
            && req.max_queue.is_none()
            && req.queue_timeout_ms.is_none()
            && req.fallback.is_none()
        {
            return Err(ClientError::InvalidInput(format!(
                "nothing to change for model {}: pass --policy, --max-concurrent, --max-queue, \
                 --queue-timeout-ms, --fallback or --no-fallback",
                self.name
            )));
        }
        Ok(req)
    }
}

/// Parses a number of seconds (fractions allowed) into whole milliseconds, rounding up so
/// that a positive value never becomes 0 (which means "the gateway's default").
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a number of seconds"));
    }
    let ms = (secs * 1000.0).ceil();
    if ms > u64::MAX as f64 / 2.0 {
        return Err(format!("{s} seconds is too long"));
    }
    Ok(ms as u64)
}

impl AdminArgs {
    /// The admin address: --admin-addr, else $INFERGATE_ADMIN_ADDR, else the default.
    pub fn address(&self) -> String {
        self.admin_addr
            .clone()
            .or_else(|| non_empty_env("INFERGATE_ADMIN_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.to_string())
    }

    /// The token: --token, else $INFERGATE_ADMIN_TOKEN.
    pub fn token(&self) -> Option<String> {
        self.token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| non_empty_env("INFERGATE_ADMIN_TOKEN"))
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The `authorization` header for a token; a token given as `Bearer X` is taken as `X`.
pub fn bearer(token: &str) -> Result<(AsciiMetadataKey, AsciiMetadataValue), ClientError> {
    let token = token.trim();
    let token = token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token)
        .trim();
    if !token.is_ascii() {
        return Err(ClientError::InvalidInput(
            "the admin token must be printable ASCII without line breaks".to_string(),
        ));
    }
    parse_header("authorization", &format!("Bearer {token}")).map_err(|_| {
        ClientError::InvalidInput(
            "the admin token must be printable ASCII without line breaks".to_string(),
        )
    })
}

/// A connection to the admin API and what every call carries.
struct Admin {
    client: AdminClient<Channel>,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

impl Admin {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        for (k, v) in &self.headers {
            req.metadata_mut().append(k.clone(), v.clone());
        }
        req
    }
}

/// Which list to point at when something is not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Backend,
    Model,
    Other,
}

impl AdminCommand {
    fn subject(&self) -> Subject {
        match self {
            AdminCommand::Model(_) => Subject::Model,
            AdminCommand::Drain(_)
            | AdminCommand::Eject(_)
            | AdminCommand::Readmit(_)
            | AdminCommand::Add(_)
            | AdminCommand::Remove(_)
            | AdminCommand::Weight(_) => Subject::Backend,
            _ => Subject::Other,
        }
    }
}

/// The hint for an admin call's error: what was wrong and how to fix it.
fn hint(err: &ClientError, addr: &str, had_token: bool, subject: Subject) -> Option<String> {
    let connect = || {
        format!(
            "is the gateway running with its admin port on {addr}? point --admin-addr or \
             INFERGATE_ADMIN_ADDR at it"
        )
    };
    match err {
        ClientError::Connect { .. } => Some(connect()),
        ClientError::InvalidAddress { .. } => {
            Some("give an address like 127.0.0.1:8003 or http://host:8003".to_string())
        }
        ClientError::Rpc(status) => match status.code() {
            Code::Unauthenticated | Code::PermissionDenied if had_token => Some(
                "the gateway refused the token: check --token / INFERGATE_ADMIN_TOKEN against \
                 the gateway's [admin] token"
                    .to_string(),
            ),
            Code::Unauthenticated | Code::PermissionDenied => Some(
                "the admin API needs a token: pass --token or set INFERGATE_ADMIN_TOKEN"
                    .to_string(),
            ),
            Code::NotFound => Some(match subject {
                Subject::Model => "list models with `infergate-cli admin models`".to_string(),
                _ => "list backends with `infergate-cli admin backends`".to_string(),
            }),
            Code::Unavailable => Some(connect()),
            Code::Unimplemented => Some(format!(
                "{addr} does not serve this admin call: is it the admin port (default 8003), \
                 not the inference port, of a gateway this version?"
            )),
            // The server's message says what was wrong; nothing to add.
            _ => None,
        },
        // The message says what was wrong with the input; the library's hint is about
        // inference inputs.
        ClientError::InvalidInput(_) => None,
        other => other.hint().map(str::to_string),
    }
}

/// Runs `admin`.
pub async fn run(cli: &Cli, args: &AdminArgs) -> Result<ExitCode, CliError> {
    let addr = args.address();
    let token = args.token();
    let subject = args.command.subject();
    let with_hint = |error: ClientError| {
        let hint = hint(&error, &addr, token.is_some(), subject);
        CliError { error, hint }
    };
    // Input checks come before dialling, so a typo is reported as such.
    let mut headers = Vec::new();
    for (k, v) in &cli.headers {
        headers.push(parse_header(k, v).map_err(with_hint)?);
    }
    if let Some(t) = &token {
        headers.push(bearer(t).map_err(with_hint)?);
    }
    let reload_toml = match &args.command {
        AdminCommand::Config {
            command: ConfigCommand::Reload { file: Some(path) },
        } => Some(read_config_file(path).map_err(with_hint)?),
        _ => None,
    };
    if let AdminCommand::Model(m) = &args.command {
        m.request().map_err(with_hint)?;
    }
    let channel = connect_channel(&addr).await.map_err(with_hint)?;
    let admin = Admin {
        client: AdminClient::new(channel),
        headers,
    };
    execute(admin, args, reload_toml)
        .await
        .map_err(|e| match e {
            // Output errors (a closed pipe) carry no admin hint.
            ClientError::Io { .. } => CliError::from(e),
            e => with_hint(e),
        })
}

/// Reads a configuration file to send; an empty one is refused, because an empty `toml`
/// asks the gateway to re-read its own file instead.
fn read_config_file(path: &PathBuf) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(ClientError::InvalidInput(format!(
            "{} is empty; to make the gateway re-read its own configuration file, leave out --file",
            path.display()
        )));
    }
    Ok(text)
}

/// Makes the call and prints the answer.
async fn execute(
    mut admin: Admin,
    args: &AdminArgs,
    reload_toml: Option<String>,
) -> Result<ExitCode, ClientError> {
    let json = args.json;
    match &args.command {
        AdminCommand::Backends => {
            let req = admin.request(ListBackendsRequest {});
            let resp = admin.client.list_backends(req).await?.into_inner();
            if json {
                emit_json(&view::BackendsJson::new(&resp.backends))?;
            } else {
                emit(&view::backends_table(&resp.backends))?;
            }
        }
        AdminCommand::Models => {
            let req = admin.request(ListModelsRequest {});
            let resp = admin.client.list_models(req).await?.into_inner();
            if json {
                emit_json(&view::ModelsJson::new(&resp.models))?;
            } else {
                emit(&view::models_table(&resp.models))?;
            }
        }
        AdminCommand::Sequences { model } => {
            let req = admin.request(ListSequencesRequest {
                model: model.clone().unwrap_or_default(),
            });
            let resp = admin.client.list_sequences(req).await?.into_inner();
            if json {
                emit_json(&view::SequencesJson::new(&resp))?;
            } else {
                emit(&view::sequences_table(&resp))?;
            }
        }
        AdminCommand::Cache {
            command: CacheCommand::Stats,
        } => {
            let req = admin.request(CacheStatsRequest {});
            let resp = admin.client.cache_stats(req).await?.into_inner();
            if json {
                emit_json(&view::CacheJson::new(&resp))?;
            } else {
                emit(&view::cache_table(&resp))?;
            }
        }
        AdminCommand::Cache {
            command: CacheCommand::Purge { model },
        } => {
            let req = admin.request(PurgeCacheRequest {
                model: model.clone(),
            });
            let resp = admin.client.purge_cache(req).await?.into_inner();
            if json {
                emit_json(&view::PurgedJson {
                    model: model.clone(),
                    l1_entries: resp.l1_entries,
                    l2_keys: resp.l2_keys,
                })?;
            } else {
                emit(&format!(
                    "purged the cache of {model}: {} entries here, {} keys in Redis\n",
                    resp.l1_entries, resp.l2_keys
                ))?;
            }
        }
        AdminCommand::Drain(d) => {
            let req = admin.request(DrainBackendRequest {
                address: d.address.clone(),
                timeout_ms: d.timeout.unwrap_or(0),
                undrain: d.undrain,
            });
            let resp = admin.client.drain_backend(req).await?.into_inner();
            if json {
                emit_json(&view::DrainJson::new(&d.address, d.undrain, &resp))?;
            } else {
                emit(&view::drain_text(&d.address, d.undrain, &resp))?;
            }
            if !d.undrain && !resp.idle {
                return Ok(ExitCode::FAILURE);
            }
        }
        AdminCommand::Eject(e) => {
            let req = admin.request(EjectBackendRequest {
                address: e.address.clone(),
                duration_ms: e.duration.unwrap_or(0),
                reason: e.reason.clone(),
            });
            let b = admin.client.eject_backend(req).await?.into_inner();
            emit_backend(json, "ejected", &b)?;
        }
        AdminCommand::Readmit(a) => {
            let req = admin.request(ReadmitBackendRequest {
                address: a.address.clone(),
            });
            let b = admin.client.readmit_backend(req).await?.into_inner();
            emit_backend(json, "readmitted", &b)?;
        }
        AdminCommand::Add(a) => {
            let req = admin.request(AddBackendRequest {
                address: a.address.clone(),
                models: a.models.clone(),
                weight: a.weight.unwrap_or(0),
                metrics_address: a.metrics_address.clone().unwrap_or_default(),
            });
            let b = admin.client.add_backend(req).await?.into_inner();
            emit_backend(json, "added", &b)?;
        }
        AdminCommand::Remove(r) => {
            let req = admin.request(RemoveBackendRequest {
                address: r.address.clone(),
                drain_timeout_ms: r.drain_timeout.unwrap_or(0),
            });
            let resp = admin.client.remove_backend(req).await?.into_inner();
            if json {
                emit_json(&view::RemoveJson::new(&r.address, &resp))?;
            } else {
                emit(&view::remove_text(&r.address, &resp))?;
            }
        }
        AdminCommand::Weight(w) => {
            let req = admin.request(SetWeightRequest {
                address: w.address.clone(),
                weight: w.weight,
            });
            let b = admin.client.set_weight(req).await?.into_inner();
            emit_backend(json, "set weight of", &b)?;
        }
        AdminCommand::Model(m) => {
            let req = admin.request(m.request()?);
            let model = admin.client.update_model(req).await?.into_inner();
            if json {
                emit_json(&view::ModelJson::from(&model))?;
            } else {
                emit(&format!("updated model {}\n", model.name))?;
                emit(&view::models_table(std::slice::from_ref(&model)))?;
            }
        }
        AdminCommand::Watch => return watch(admin, json).await,
        AdminCommand::Config {
            command: ConfigCommand::Get,
        } => {
            let req = admin.request(GetConfigRequest {});
            let resp = admin.client.get_config(req).await?.into_inner();
            if json {
                emit_json(&view::ConfigJson::from(&resp))?;
            } else {
                if !resp.path.is_empty() {
                    // On stderr, so that stdout stays the file's TOML.
                    note(&format!("# from {}", resp.path));
                }
                emit(&resp.toml)?;
                if !resp.toml.is_empty() && !resp.toml.ends_with('\n') {
                    emit("\n")?;
                }
            }
        }
        AdminCommand::Config {
            command: ConfigCommand::Reload { .. },
        } => {
            let req = admin.request(ReloadConfigRequest {
                toml: reload_toml.unwrap_or_default(),
            });
            let resp = admin.client.reload_config(req).await?.into_inner();
            if json {
                emit_json(&view::ReloadJson::from(&resp))?;
            } else {
                emit(&view::reload_text(&resp))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `admin watch`: one line (or JSON object) per event until Ctrl-C or the stream ends.
async fn watch(mut admin: Admin, json: bool) -> Result<ExitCode, ClientError> {
    let req = admin.request(WatchEventsRequest {});
    let mut stream = admin.client.watch_events(req).await?.into_inner();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let event = tokio::select! {
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            event = stream.next() => event,
        };
        let event = match event {
            None => return Ok(ExitCode::SUCCESS),
            Some(Err(status)) => return Err(ClientError::Rpc(status)),
            Some(Ok(mut event)) => {
                // `events_missed` comes without a time; it is news as of now.
                if event.at_unix_ms == 0 {
                    event.at_unix_ms = now_unix_ms();
                }
                event
            }
        };
        if json {
            let line = serde_json::to_string(&view::EventJson::from(&event))
                .map_err(|e| ClientError::Protocol(format!("cannot render JSON: {e}")))?;
            emit(&format!("{line}\n"))?;
        } else {
            emit(&view::event_line(&event))?;
        }
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn emit_json<T: serde::Serialize>(value: &T) -> Result<(), ClientError> {
    emit(&format!("{}\n", to_json(value)?))
}

fn emit_backend(
    json: bool,
    verb: &str,
    b: &infergate_proto::admin::Backend,
) -> Result<(), ClientError> {
    if json {
        emit_json(&view::BackendJson::from(b))
    } else {
        emit(&view::backend_sentence(verb, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;
    use clap::Parser;

    fn admin(args: &[&str]) -> AdminArgs {
        let mut argv = vec!["infergate-cli", "admin"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Admin(a) => a,
            other => panic!("not admin: {other:?}"),
        }
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let a = admin(&[
            "--admin-addr",
            "10.0.0.1:9003",
            "--token",
            "s3cret",
            "backends",
        ]);
        assert_eq!(a.address(), "10.0.0.1:9003");
        assert_eq!(a.token().as_deref(), Some("s3cret"));
        assert!(!a.json);
        assert!(matches!(a.command, AdminCommand::Backends));
        let a = admin(&["models", "--json", "--admin-addr", "h:1"]);
        assert!(a.json);
        assert_eq!(a.address(), "h:1");
        assert!(matches!(a.command, AdminCommand::Models));
        assert!(matches!(
            admin(&["cache", "stats"]).command,
            AdminCommand::Cache {
                command: CacheCommand::Stats
            }
        ));
        let p = admin(&["cache", "purge", "simple"]);
        assert!(
            matches!(&p.command, AdminCommand::Cache { command: CacheCommand::Purge { model } } if model == "simple")
        );
        let s = admin(&["sequences", "--model", "accumulate"]);
        assert!(
            matches!(&s.command, AdminCommand::Sequences { model } if model.as_deref() == Some("accumulate"))
        );
    }

    #[test]
    fn backend_commands_parse() {
        let a = admin(&["drain", "10.0.0.1:9000", "--timeout", "2.5"]);
        let AdminCommand::Drain(d) = a.command else {
            panic!("not drain")
        };
        assert_eq!(
            (d.address.as_str(), d.timeout, d.undrain),
            ("10.0.0.1:9000", Some(2500), false)
        );
        let AdminCommand::Drain(d) = admin(&["drain", "a:1", "--undrain"]).command else {
            panic!("not drain")
        };
        assert!(d.undrain && d.timeout.is_none());
        let AdminCommand::Eject(e) =
            admin(&["eject", "a:1", "--duration", "90", "--reason", "bad GPU"]).command
        else {
            panic!("not eject")
        };
        assert_eq!((e.duration, e.reason.as_str()), (Some(90_000), "bad GPU"));
        let AdminCommand::Readmit(r) = admin(&["readmit", "a:1"]).command else {
            panic!("not readmit")
        };
        assert_eq!(r.address, "a:1");
        let AdminCommand::Add(add) = admin(&[
            "add",
            "a:1",
            "--model",
            "simple",
            "--model",
            "tiny_llm",
            "--weight",
            "3",
            "--metrics-address",
            "a:9400",
        ])
        .command
        else {
            panic!("not add")
        };
        assert_eq!(add.models, ["simple", "tiny_llm"]);
        assert_eq!(add.weight, Some(3));
        assert_eq!(add.metrics_address.as_deref(), Some("a:9400"));
        let AdminCommand::Remove(r) = admin(&["remove", "a:1", "--drain-timeout", "0"]).command
        else {
            panic!("not remove")
        };
        assert_eq!(r.drain_timeout, Some(0));
        let AdminCommand::Weight(w) = admin(&["weight", "a:1", "7"]).command else {
            panic!("not weight")
        };
        assert_eq!((w.address.as_str(), w.weight), ("a:1", 7));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            vec!["drain"],
            vec!["drain", "a:1", "--timeout", "soon"],
            vec!["drain", "a:1", "--timeout", "-1"],
            vec!["drain", "a:1", "--timeout", "5", "--undrain"],
            vec!["weight", "a:1"],
            vec!["weight", "a:1", "-2"],
            vec!["weight", "a:1", "0"],
            vec!["add", "a:1", "--weight", "0"],
            vec!["model", "m", "--fallback", "x", "--no-fallback"],
            vec!["config"],
            vec!["frobnicate"],
        ] {
            let mut argv = vec!["infergate-cli", "admin"];
            argv.extend(bad.iter().copied());
            assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?} parsed");
        }
    }

    #[test]
    fn model_flags_become_an_update() {
        let AdminCommand::Model(m) = admin(&[
            "model",
            "simple",
            "--policy",
            "least_request",
            "--max-concurrent",
            "0",
            "--queue-timeout-ms",
            "250",
        ])
        .command
        else {
            panic!("not model")
        };
        let req = m.request().expect("changes something");
        assert_eq!(req.name, "simple");
        assert_eq!(req.policy, "least_request");
        assert_eq!(req.max_concurrent, Some(0));
        assert_eq!(req.max_queue, None);
        assert_eq!(req.queue_timeout_ms, Some(250));
        assert_eq!(req.fallback, None);

        let AdminCommand::Model(m) = admin(&["model", "simple", "--no-fallback"]).command else {
            panic!("not model")
        };
        assert_eq!(m.request().expect("valid").fallback.as_deref(), Some(""));
        let AdminCommand::Model(m) = admin(&["model", "simple", "--fallback", "cpu"]).command
        else {
            panic!("not model")
        };
        assert_eq!(m.request().expect("valid").fallback.as_deref(), Some("cpu"));
        let AdminCommand::Model(m) = admin(&["model", "simple"]).command else {
            panic!("not model")
        };
        assert!(m.request().is_err());
    }

    #[test]
    fn config_and_watch_parse() {
        assert!(matches!(admin(&["watch"]).command, AdminCommand::Watch));
        assert!(matches!(
            admin(&["config", "get"]).command,
            AdminCommand::Config {
                command: ConfigCommand::Get
            }
        ));
        let AdminCommand::Config {
            command: ConfigCommand::Reload { file },
        } = admin(&["config", "reload", "--file", "gw.toml"]).command
        else {
            panic!("not reload")
        };
        assert_eq!(file, Some(PathBuf::from("gw.toml")));
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0"), Ok(0));
        assert_eq!(parse_seconds("1.5"), Ok(1500));
        assert_eq!(parse_seconds("0.0001"), Ok(1));
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("inf").is_err());
        assert!(parse_seconds("-0.5").is_err());
        assert!(parse_seconds("1e300").is_err());
    }

    #[test]
    fn tokens_become_bearer_headers() {
        for t in ["abc", "Bearer abc", "  abc\n"] {
            let (k, v) = bearer(t).expect("valid");
            assert_eq!(k.as_str(), "authorization");
            assert_eq!(v.to_str().expect("ascii"), "Bearer abc");
        }
        assert!(bearer("a\u{1}b").is_err());
        assert!(bearer("naïve").is_err());
    }

    #[test]
    fn errors_say_how_to_fix_them() {
        let rpc = |code, msg: &str| ClientError::Rpc(tonic::Status::new(code, msg));
        let h = |e: &ClientError, token, subject| hint(e, "127.0.0.1:8003", token, subject);
        assert_eq!(
            h(
                &rpc(Code::Unauthenticated, "missing token"),
                false,
                Subject::Other
            )
            .as_deref(),
            Some("the admin API needs a token: pass --token or set INFERGATE_ADMIN_TOKEN")
        );
        assert!(h(
            &rpc(Code::Unauthenticated, "bad token"),
            true,
            Subject::Other
        )
        .expect("hint")
        .contains("refused the token"));
        assert_eq!(
            h(
                &rpc(Code::NotFound, "no backend a:1"),
                false,
                Subject::Backend
            )
            .as_deref(),
            Some("list backends with `infergate-cli admin backends`")
        );
        assert_eq!(
            h(&rpc(Code::NotFound, "no model m"), false, Subject::Model).as_deref(),
            Some("list models with `infergate-cli admin models`")
        );
        assert!(h(&rpc(Code::Unavailable, "down"), false, Subject::Other)
            .expect("hint")
            .contains("admin port on 127.0.0.1:8003"));
        assert_eq!(
            h(
                &rpc(Code::InvalidArgument, "weight 0"),
                false,
                Subject::Backend
            ),
            None
        );
        // The error line itself carries the server's message.
        assert_eq!(
            rpc(Code::InvalidArgument, "unknown policy `fast`").to_string(),
            "INVALID_ARGUMENT: unknown policy `fast`"
        );
    }

    #[test]
    fn empty_config_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("infergate-cli-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.toml");
        std::fs::write(&empty, " \n").expect("write");
        assert!(matches!(
            read_config_file(&empty),
            Err(ClientError::InvalidInput(_))
        ));
        let full = dir.join("full.toml");
        std::fs::write(&full, "listen = \"0.0.0.0:8001\"\n").expect("write");
        assert_eq!(
            read_config_file(&full).expect("reads"),
            "listen = \"0.0.0.0:8001\"\n"
        );
        assert!(matches!(
            read_config_file(&dir.join("missing.toml")),
            Err(ClientError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
