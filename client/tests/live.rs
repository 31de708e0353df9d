//! End-to-end tests of the client library and the `infergate-cli` binary against the real
//! parts: simulated GPU backends (`infergate_sim`) and a real gateway
//! (`infergate::server::start`), all in-process on 127.0.0.1:0. Nothing here sleeps to
//! synchronise: the gateway learns its pool before `start` returns, and anything else that
//! must be waited for is polled with a deadline.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use futures_util::StreamExt;
use infergate::config::{BackendConfig, Config};
use infergate::endpoint::Health;
use infergate::server::GatewayHandle;
use infergate_client::bench::{self, BenchConfig, BACKEND_HEADER};
use infergate_client::{
    build_request, decode_outputs, generate_request, read_stream_response, Client, ClientError,
    Tensor, TensorData,
};
use infergate_sim::{self as sim, SimConfig, SimHandle};

/// The models every simulator serves by default.
const MODELS: [&str; 4] = ["accumulate", "identity_fp32", "simple", "tiny_llm"];

/// An upper bound on anything a test waits for; never a synchronisation device.
const LIMIT: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A simulated backend named `name` with a fixed fault seed and a short service time.
fn sim(name: &str) -> SimHandle {
    sim::spawn(SimConfig {
        listen: loopback(),
        metrics_listen: None,
        name: name.to_owned(),
        latency_ms: 1.0,
        token_latency_ms: 1.0,
        seed: 7,
        ..SimConfig::default()
    })
    .expect("simulated backend starts")
}

/// Two simulators (`gpu-a`, `gpu-b`) behind a real gateway. Fields drop in order: the
/// gateway's handle first (its tasks end with the test runtime), then the sims.
struct Stack {
    gateway: GatewayHandle,
    sims: Vec<SimHandle>,
}

impl Stack {
    async fn start() -> Stack {
        let sims = vec![sim("gpu-a"), sim("gpu-b")];
        let mut config = Config {
            listen: loopback(),
            metrics_listen: loopback(),
            admin_listen: loopback(),
            ..Config::default()
        };
        config.health.interval_ms = 100;
        config.health.timeout_ms = 500;
        config.backends = sims
            .iter()
            .map(|s| BackendConfig::new(s.addr().to_string()))
            .collect();
        let gateway = infergate::server::start(config, "test")
            .await
            .expect("gateway starts");
        let stack = Stack { gateway, sims };
        // `start` runs one health round and one index read before it returns; make sure
        // that is what it did, with a deadline rather than a sleep.
        let pool = stack.gateway.pool().clone();
        eventually("both backends ready and every model routable", || {
            let endpoints = pool.endpoints();
            endpoints.len() == 2
                && endpoints.iter().all(|e| e.health() == Health::Ready)
                && MODELS.iter().all(|m| pool.model_ready(m))
        })
        .await;
        stack
    }

    fn addr(&self) -> String {
        self.gateway.addr().to_string()
    }

    fn sim_names(&self) -> BTreeSet<String> {
        self.sims
            .iter()
            .map(|s| s.control().name().to_string())
            .collect()
    }
}

/// Polls `check` every 10 ms until it holds, panicking after [`LIMIT`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs `infergate-cli` with `args` off the async runtime; INFERGATE_ADDR is cleared so
/// only `--addr` counts.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_infergate-cli"))
            .args(&args)
            .env_remove("INFERGATE_ADDR")
            .output()
            .expect("infergate-cli runs")
    });
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("infergate-cli finishes in time")
        .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The checks every KServe v2 server here must pass, gateway or simulator.
async fn common_calls(client: &Client) {
    assert!(client.live().await.expect("live"));
    assert!(client.ready().await.expect("ready"));
    for m in MODELS {
        assert!(client.model_ready(m).await.expect("model ready"), "{m}");
    }
    assert_eq!(client.health("").await.expect("health"), "SERVING");

    let index = client.repository_index().await.expect("index");
    let names: BTreeSet<&str> = index.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, MODELS.into_iter().collect(), "{index:?}");
    assert!(index.iter().all(|m| m.state == "READY"), "{index:?}");

    let meta = client
        .model_metadata("simple")
        .await
        .expect("model metadata");
    assert_eq!(meta.name, "simple");
    let inputs: Vec<&str> = meta.inputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(inputs, ["INPUT0", "INPUT1"]);
    assert!(meta.inputs.iter().all(|t| t.datatype == "INT32"));
    let outputs: Vec<&str> = meta.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(outputs, ["OUTPUT0", "OUTPUT1"]);

    // Sums and differences, with seeded values.
    let mut rng = fastrand::Rng::with_seed(42);
    let a: [i32; 16] = std::array::from_fn(|_| rng.i32(-10_000..10_000));
    let b: [i32; 16] = std::array::from_fn(|_| rng.i32(-10_000..10_000));
    let (sum, diff) = client.infer_simple(a, b).await.expect("simple");
    let want_sum: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let want_diff: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    assert_eq!(sum, want_sum);
    assert_eq!(diff, want_diff);

    // identity_fp32 returns what it is given.
    let values: Vec<f32> = (0..64).map(|_| rng.f32() * 100.0 - 50.0).collect();
    let req = build_request(
        "identity_fp32",
        &[Tensor::new(
            "INPUT0",
            vec![1, 64],
            TensorData::Fp32(values.clone()),
        )],
        &[],
    )
    .expect("request");
    let resp = client.infer(req).await.expect("identity");
    let out = decode_outputs(&resp).expect("decodes");
    assert_eq!(out[0].name, "OUTPUT0");
    assert_eq!(out[0].shape, vec![1, 64]);
    assert_eq!(out[0].data, TensorData::Fp32(values));

    // tiny_llm: as many tokens as asked for.
    let mut seen = 0;
    let tokens = client
        .generate_with("tiny_llm", "hello there", 5, |_| seen += 1)
        .await
        .expect("tokens");
    assert_eq!(tokens.len(), 5, "{tokens:?}");
    assert_eq!(seen, 5);
    assert!(tokens.iter().all(|t| !t.is_empty()), "{tokens:?}");
    assert_eq!(
        client.generate("x", 0).await.expect("no tokens"),
        Vec::<String>::new()
    );

    assert!(!client.model_ready("no_such_model").await.unwrap_or(false));
}

/// Reads a whole `tiny_llm` stream by hand: `n` tokens, only the last message flagged final,
/// and the stream ends once our side half-closes.
async fn stream_has_final_flag(client: &Client, n: u32) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(generate_request("tiny_llm", "count for me", n).expect("request"))
        .await
        .expect("queued");
    let mut stream = client
        .inference()
        .model_stream_infer(client.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect("stream opens")
        .into_inner();
    let mut flags = Vec::new();
    let mut tokens = 0;
    while let Some(msg) = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("a message in time")
    {
        let (token, last) = read_stream_response(&msg.expect("message")).expect("valid message");
        tokens += usize::from(token.is_some());
        flags.push(last);
        if last {
            break;
        }
    }
    assert_eq!(tokens, n as usize);
    assert_eq!(flags.iter().filter(|f| **f).count(), 1, "{flags:?}");
    assert_eq!(flags.last(), Some(&true), "{flags:?}");
    drop(tx);
    let end = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("the stream ends after the half-close");
    assert!(
        end.as_ref().is_none_or(|r| r.is_ok()),
        "stream ended with {end:?}"
    );
}

fn assert_not_found(result: Result<impl std::fmt::Debug, ClientError>) {
    match result {
        Err(e) => {
            assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
            assert!(e.to_string().starts_with("NOT_FOUND"), "{e}");
            assert!(e.hint().is_some_and(|h| h.contains("models")), "{e}");
        }
        Ok(r) => panic!("expected NOT_FOUND, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typed_calls_through_the_gateway() {
    let stack = Stack::start().await;
    let client = Client::connect(&stack.addr())
        .await
        .expect("connects")
        .with_header("x-tenant", "t1")
        .expect("header")
        .with_timeout(LIMIT);
    common_calls(&client).await;
    stream_has_final_flag(&client, 7).await;

    let meta = client.server_metadata().await.expect("server metadata");
    assert_eq!(meta.name, "infergate");
    assert!(!meta.version.is_empty());

    // The gateway says which backend answered.
    let req = build_request(
        "simple",
        &[
            Tensor::new("INPUT0", vec![1, 16], TensorData::Int32(vec![1; 16])),
            Tensor::new("INPUT1", vec![1, 16], TensorData::Int32(vec![2; 16])),
        ],
        &[],
    )
    .expect("request");
    let resp = client.infer_full(req).await.expect("infer");
    let backend = resp
        .metadata()
        .get(BACKEND_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("sim-name header");
    assert!(stack.sim_names().contains(&backend), "{backend}");

    let missing = build_request("no_such_model", &[], &[]).expect("request");
    assert_not_found(client.infer(missing).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_straight_to_a_simulator() {
    let sim = sim("solo");
    let client = Client::connect(&sim.addr().to_string())
        .await
        .expect("connects");
    common_calls(&client).await;
    stream_has_final_flag(&client, 3).await;
    assert_eq!(
        client.server_metadata().await.expect("metadata").name,
        "infergate-sim"
    );
    assert_not_found(client.model_metadata("no_such_model").await);
    let missing = build_request("no_such_model", &[], &[]).expect("request");
    assert_not_found(client.infer(missing).await);
}

#[tokio::test]
async fn connect_failure_is_an_error_with_a_hint() {
    match Client::connect(&format!("127.0.0.1:{}", closed_port())).await {
        Err(e @ ClientError::Connect { .. }) => {
            assert_eq!(e.code(), Some(tonic::Code::Unavailable));
            assert!(e.hint().is_some());
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_closed_loop_spreads_over_both_backends() {
    let stack = Stack::start().await;
    let cfg = BenchConfig {
        concurrency: 4,
        connections: 2,
        count: Some(200),
        seed: 11,
        timeout: LIMIT,
        ..BenchConfig::new(stack.addr(), "simple")
    };
    let report = bench::run(cfg).await.expect("runs");
    assert_eq!(report.mode, "closed");
    assert_eq!(report.sent, 200);
    assert_eq!(report.ok, report.sent, "{}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(report.errors_by_code.is_empty());
    assert_eq!(report.latency_us.count, 200);
    assert!(report.latency_us.p50 > 0 && report.latency_us.p50 <= report.latency_us.max);
    let names: BTreeSet<String> = report.per_backend.keys().cloned().collect();
    assert_eq!(names, stack.sim_names(), "{}", report.summary());
    assert_eq!(report.per_backend.values().sum::<u64>(), 200);
    assert!(report.per_backend.values().all(|n| *n > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_open_loop_bounded_by_count() {
    let stack = Stack::start().await;
    let cfg = BenchConfig {
        rate: Some(500.0),
        count: Some(60),
        payload_bytes: 16 * 1024,
        seed: 3,
        timeout: LIMIT,
        ..BenchConfig::new(stack.addr(), "identity_fp32")
    };
    let report = bench::run(cfg).await.expect("runs");
    assert_eq!(report.mode, "open");
    assert_eq!(report.sent, 60, "{}", report.summary());
    assert_eq!(report.ok, 60, "{}", report.summary());
    assert_eq!(report.errors, 0);
    assert_eq!(report.missed_arrivals, 0);
    assert_eq!(report.per_backend.values().sum::<u64>(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_streams_tokens_through_the_gateway() {
    let stack = Stack::start().await;
    let cfg = BenchConfig {
        count: Some(12),
        concurrency: 3,
        max_tokens: 4,
        seed: 5,
        timeout: LIMIT,
        ..BenchConfig::new(stack.addr(), "tiny_llm")
    };
    let report = bench::run(cfg).await.expect("runs");
    assert_eq!(report.ok, 12, "{}", report.summary());
    assert_eq!(report.errors, 0);
    assert_eq!(report.tokens, 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_counts_errors_by_code() {
    let stack = Stack::start().await;
    let cfg = BenchConfig {
        count: Some(5),
        timeout: LIMIT,
        ..BenchConfig::new(stack.addr(), "no_such_model")
    };
    let report = bench::run(cfg).await.expect("runs");
    assert_eq!(report.sent, 5);
    assert_eq!(report.ok, 0);
    assert_eq!(
        report.errors_by_code.get("NOT_FOUND"),
        Some(&5),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_against_the_gateway() {
    let stack = Stack::start().await;
    let addr = stack.addr();

    // `infer` with the `simple` defaults: INPUT0 = 0..16, INPUT1 = all ones.
    let out = cli(&["--addr", &addr, "infer", "--model", "simple"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let join = |v: Vec<i32>| v.iter().map(i32::to_string).collect::<Vec<_>>().join(", ");
    let sums = format!("[{}]", join((1..17).collect()));
    let diffs = format!("[{}]", join((-1..15).collect()));
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .to_string()
    };
    assert!(line("OUTPUT0").ends_with(&sums), "{stdout}");
    assert!(line("OUTPUT1").ends_with(&diffs), "{stdout}");
    assert!(
        stack
            .sim_names()
            .iter()
            .any(|n| stdout.contains(&format!("backend {n}"))),
        "{stdout}"
    );

    // `models --json`: a JSON array naming the three models.
    let out = cli(&["--addr", &addr, "models", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let names: BTreeSet<&str> = doc
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, MODELS.into_iter().collect(), "{doc}");

    // `health`: the gateway is ready.
    let out = cli(&["--addr", &addr, "health"]).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("SERVING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_a_dead_address_with_a_hint() {
    let addr = format!("127.0.0.1:{}", closed_port());
    for args in [
        vec!["models"],
        vec!["infer", "--model", "simple"],
        vec!["health"],
    ] {
        let mut all = vec!["--addr", addr.as_str()];
        all.extend(args.iter().copied());
        let out = cli(&all).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
        assert!(stderr.contains("UNAVAILABLE"), "{args:?}: {stderr}");
        assert!(stderr.contains(&addr), "{args:?}: {stderr}");
        assert!(stderr.contains("hint:"), "{args:?}: {stderr}");
    }
}
