//! The gateway's Prometheus metrics, end to end: a known sequence of calls through a
//! real gateway, then `/metrics` scraped over plain HTTP/1.1 and parsed sample by
//! sample (label order in the text is not fixed), and `promtool check metrics` run on
//! the text when promtool is installed.
//!
//! The metrics recorder is process-global: every gateway in this test binary records
//! into it. So this binary holds exactly one test; add scenarios to it rather than
//! adding tests beside it.

mod common;

use common::*;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format: `name{label="value",...} value [timestamp]`,
/// skipping comments and blank lines. Panics on a line it cannot read.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| parse_line(line).unwrap_or_else(|e| panic!("bad sample line {line:?}: {e}")))
        .collect()
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_owned();
    if name.is_empty() {
        return Err("empty metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            // Skip separators, then read `key="value"` or the closing brace.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let (start, c) = chars.next().ok_or("unterminated label set")?;
            if c == '}' {
                break start + 1;
            }
            let mut key = String::from(c);
            loop {
                match chars.next().ok_or("unterminated label name")? {
                    (_, '=') => break,
                    (_, c) => key.push(c),
                }
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key}: value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")? {
                    (_, '"') => break,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            }
            if labels.insert(key.trim().to_owned(), value).is_some() {
                return Err("repeated label".into());
            }
        };
        rest = &after[end..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Samples named `name` whose labels include every pair of `with`.
fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    with: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name
            && with
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

/// The sum of the matching samples (0 when none match).
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    matching(samples, name, with).map(|s| s.value).sum()
}

/// The one matching sample's value; panics when there is none or more than one.
fn one(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = matching(samples, name, with).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one sample {name} with {with:?}, found {found:?}"
    );
    found[0].value
}

/// `GET /metrics` over a plain TCP connection; returns the body of a 200 answer.
async fn scrape(addr: SocketAddr) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut raw))
        .await
        .expect("metrics answered in time")
        .expect("read response");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head.lines().next().unwrap_or_default();
    assert!(status.contains(" 200 "), "status line {status:?}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// Scrapes until `done` holds for the parsed samples or `limit` passes; returns the
/// last scrape (text and samples) either way, so the caller's asserts explain a miss.
async fn scrape_until(
    addr: SocketAddr,
    limit: Duration,
    done: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let text = scrape(addr).await;
        let samples = parse(&text);
        if done(&samples) || tokio::time::Instant::now() >= deadline {
            return (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts a non-empty `# HELP` line and the `# TYPE` line of each (name, type).
fn assert_described(text: &str, metrics: &[(&str, &str)]) {
    for (name, kind) in metrics {
        let help = format!("# HELP {name} ");
        assert!(
            text.lines()
                .any(|l| l.strip_prefix(&help).is_some_and(|h| !h.trim().is_empty())),
            "HELP for {name}\n{text}"
        );
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "TYPE {kind} for {name}\n{text}"
        );
    }
}

/// `promtool check metrics` on `text` when promtool is on PATH; asserts it passes.
fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "promtool not found on PATH: `promtool check metrics` skipped (CI installs it)"
            );
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool finishes");
    println!(
        "promtool check metrics: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_parser_reads_labels_in_any_order_and_escapes() {
    let samples = parse(
        "# HELP x_total A counter.\n# TYPE x_total counter\n\
         x_total{b=\"2\",a=\"q\\\"uote\\\\d\"} 3\n\
         x_total{a=\"1\" , b=\"2\",} 4 1700000000\n\
         y +Inf\n",
    );
    assert_eq!(samples.len(), 3, "{samples:?}");
    assert_eq!(sum(&samples, "x_total", &[("b", "2")]), 7.0);
    assert_eq!(one(&samples, "x_total", &[("a", "q\"uote\\d")]), 3.0);
    assert_eq!(one(&samples, "y", &[]), f64::INFINITY);
}

#[tokio::test]
async fn metrics_count_a_known_sequence_of_calls() {
    let sims: Vec<_> = (0..2).map(|i| sim(&format!("m-{i}"), |_| {})).collect();
    let backends: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    let gw = gateway(config(&backends)).await;
    let mut c = client(gw.addr()).await;

    // 5 successful unary calls.
    for i in 0..5 {
        c.model_infer(simple_request(&format!("ok-{i}"), i))
            .await
            .expect("simple answers");
    }
    // 2 calls to a model nobody serves: NOT_FOUND, counted under `unknown`.
    for i in 0..2 {
        let mut request = simple_request(&format!("nf-{i}"), 1);
        request.model_name = "no_such_model_for_metrics".into();
        let status = c.model_infer(request).await.expect_err("unknown model");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // 1 malformed message and 1 without a model name: INVALID_ARGUMENT, `unknown`.
    let status = infergate_client::raw::unary_raw(
        channel(gw.addr()).await,
        http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer"),
        tonic::Request::new(bytes::Bytes::from_static(&[0x0a, 0x50, b's', b'i'])),
    )
    .await
    .expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut request = simple_request("no-name", 1);
    request.model_name.clear();
    let status = c.model_infer(request).await.expect_err("no model name");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // 1 stream with one request, read to its end.
    let mut stream = c
        .model_stream_infer(tokio_stream::iter(vec![simple_request("s-1", 3)]))
        .await
        .expect("stream opens")
        .into_inner();
    let mut responses = 0;
    while let Some(item) = stream.next().await {
        let item = item.expect("stream response");
        assert!(item.error_message.is_empty(), "{}", item.error_message);
        responses += 1;
    }
    assert_eq!(responses, 1);

    // Calls are recorded when their response ends, which may be just after the client
    // saw it: scrape until everything is in (or the deadline), then assert exactly.
    let requests = "infergate_requests_total";
    let expected: &[(&[(&str, &str)], f64)] = &[
        (
            &[
                ("model", "simple"),
                ("method", "ModelInfer"),
                ("code", "OK"),
            ],
            5.0,
        ),
        (
            &[
                ("model", "unknown"),
                ("method", "ModelInfer"),
                ("code", "NOT_FOUND"),
            ],
            2.0,
        ),
        (
            &[
                ("model", "unknown"),
                ("method", "ModelInfer"),
                ("code", "INVALID_ARGUMENT"),
            ],
            2.0,
        ),
        (
            &[
                ("model", "simple"),
                ("method", "ModelStreamInfer"),
                ("code", "OK"),
            ],
            1.0,
        ),
    ];
    let (text, samples) = scrape_until(gw.metrics_addr(), Duration::from_secs(10), |s| {
        expected
            .iter()
            .all(|(labels, want)| sum(s, requests, labels) >= *want)
            && sum(s, "infergate_requests_in_flight", &[]) == 0.0
    })
    .await;
    for (labels, want) in expected {
        assert_eq!(
            one(&samples, requests, labels),
            *want,
            "{requests} with {labels:?}\n{text}"
        );
    }
    assert_eq!(
        sum(&samples, requests, &[]),
        10.0,
        "no other call was counted\n{text}"
    );
    // The stream: one response passed back, no gap to measure, none left open.
    let on_simple = [("model", "simple")];
    assert_eq!(
        sum(&samples, "infergate_stream_responses_total", &on_simple),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &samples,
            "infergate_stream_inter_response_seconds_count",
            &on_simple
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        sum(&samples, "infergate_streams_in_flight", &on_simple),
        0.0,
        "{text}"
    );
    assert!(
        !text.contains("no_such_model_for_metrics"),
        "a client-chosen model name became a label value\n{text}"
    );
    for method in ["ModelInfer", "ModelStreamInfer"] {
        assert_eq!(
            one(
                &samples,
                "infergate_requests_in_flight",
                &[("method", method)]
            ),
            0.0,
            "{text}"
        );
    }

    // The latency histogram: 5 observations for simple/ModelInfer, in buckets from 1 ms
    // to 60 s, cumulative, with +Inf equal to the count.
    let simple = [("model", "simple"), ("method", "ModelInfer")];
    let duration = "infergate_request_duration_seconds";
    assert_eq!(one(&samples, &format!("{duration}_count"), &simple), 5.0);
    assert!(one(&samples, &format!("{duration}_sum"), &simple) > 0.0);
    let buckets: Vec<(f64, f64)> = matching(
        &samples,
        "infergate_request_duration_seconds_bucket",
        &simple,
    )
    .map(|s| {
        let le = &s.labels["le"];
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("numeric le")
        };
        (le, s.value)
    })
    .collect();
    let les: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
    for bound in [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, f64::INFINITY] {
        assert!(les.contains(&bound), "bucket le={bound} missing: {les:?}");
    }
    let mut sorted = buckets.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        sorted.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets are cumulative: {sorted:?}"
    );
    assert_eq!(sorted.last().map(|b| b.1), Some(5.0));

    // HELP and TYPE lines for what was recorded.
    assert_described(
        &text,
        &[
            ("infergate_requests_total", "counter"),
            ("infergate_request_duration_seconds", "histogram"),
            ("infergate_requests_in_flight", "gauge"),
        ],
    );
    assert_eq!(
        one(&samples, "infergate_build_info", &[]),
        1.0,
        "build info\n{text}"
    );

    // A metrics server with a scrape hook, which appends families read at scrape time:
    // the gateway's backends, and the bulkheads of a model policy set built from config.
    let mut cfg = config(&backends);
    cfg.models.insert(
        "simple".into(),
        infergate::config::ModelConfig {
            bulkhead: Some(infergate::config::BulkheadConfig {
                max_concurrent: 3,
                max_queue: 7,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let models = std::sync::Arc::new(infergate::models::Models::new(&cfg));
    let held = models
        .get("simple")
        .bulkhead
        .clone()
        .expect("simple has a bulkhead")
        .acquire("tenant", 0, None)
        .await
        .expect("a free slot");
    let hook: infergate::telemetry::ScrapeHook = {
        let models = std::sync::Arc::clone(&models);
        let pool = std::sync::Arc::clone(gw.pool());
        std::sync::Arc::new(move |out: &mut String| {
            infergate::gauges::render_pool(&pool, out);
            infergate::gauges::render_models(&models, out);
        })
    };
    let listener = infergate::telemetry::bind(loopback())
        .await
        .expect("bind a metrics port");
    let hooked = listener.local_addr().expect("its address");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(infergate::telemetry::serve_with_hook(
        listener,
        infergate::telemetry::install().expect("the recorder is installed"),
        stopped,
        Some(hook),
    ));
    let text = scrape(hooked).await;
    let samples = parse(&text);
    for backend in &backends {
        let b = backend.to_string();
        let on = [("backend", b.as_str())];
        for (name, want) in [
            ("infergate_backend_ready", 1.0),
            ("infergate_backend_in_flight", 0.0),
            ("infergate_backend_ejected", 0.0),
            ("infergate_backend_draining", 0.0),
            ("infergate_backend_circuit_state", 0.0),
        ] {
            assert_eq!(one(&samples, name, &on), want, "{name} of {b}\n{text}");
        }
        assert!(
            one(&samples, "infergate_backend_failures_total", &on) == 0.0,
            "{text}"
        );
    }
    let attempts: f64 = backends
        .iter()
        .map(|b| {
            sum(
                &samples,
                "infergate_backend_requests_total",
                &[("backend", &b.to_string())],
            )
        })
        .sum();
    assert!(
        attempts >= 6.0,
        "5 unary and 1 stream reached the backends: {attempts}\n{text}"
    );
    assert_eq!(one(&samples, "infergate_pool_panic", &[]), 0.0, "{text}");
    assert_described(
        &text,
        &[
            ("infergate_backend_ready", "gauge"),
            ("infergate_backend_in_flight", "gauge"),
            ("infergate_backend_circuit_state", "gauge"),
            ("infergate_backend_requests_total", "counter"),
            ("infergate_bulkhead_active", "gauge"),
        ],
    );

    let on = [("model", "simple")];
    for (name, want) in [
        ("infergate_bulkhead_active", 1.0),
        ("infergate_bulkhead_queued", 0.0),
        ("infergate_bulkhead_max_concurrent", 3.0),
        ("infergate_bulkhead_max_queue", 7.0),
        ("infergate_bulkhead_admitted_total", 1.0),
    ] {
        assert_eq!(one(&samples, name, &on), want, "{name}\n{text}");
    }
    drop(held);
    let text = scrape(hooked).await;
    let samples = parse(&text);
    assert_eq!(
        one(&samples, "infergate_bulkhead_active", &on),
        0.0,
        "slot released\n{text}"
    );
    let _ = stop.send(true);
    server.await.expect("metrics server stops");

    promtool_check(&text);

    // A non-retryable trailers-only INTERNAL from a backend: the caller sees INTERNAL,
    // and the attempt is counted once, as INTERNAL, by metrics and by the breaker.
    let failing = sim("m-internal", |_| {});
    failing.control().set_error_rate(1.0);
    failing.control().set_error_code(Code::Internal);
    let gw2 = gateway(config(&[failing.addr()])).await;
    let mut c2 = client(gw2.addr()).await;
    let status = c2
        .model_infer(simple_request("internal", 1))
        .await
        .expect_err("injected INTERNAL");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let addr = failing.addr().to_string();
    let on = [("backend", addr.as_str()), ("code", "INTERNAL")];
    let (text, samples) = scrape_until(gw2.metrics_addr(), Duration::from_secs(10), |s| {
        sum(s, "infergate_backend_attempts_total", &on) >= 1.0
    })
    .await;
    assert_eq!(
        one(&samples, "infergate_backend_attempts_total", &on),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &samples,
            "infergate_backend_attempts_total",
            &[("backend", addr.as_str())]
        ),
        1.0,
        "one attempt, one label\n{text}"
    );
    let endpoint = gw2.pool().endpoint(&addr).expect("endpoint");
    assert_eq!(endpoint.failures_total(), 1, "counted once");
    let breaker = endpoint.breaker().stats(tokio::time::Instant::now()).window;
    assert_eq!(breaker.calls, 1, "the breaker saw one call: {breaker:?}");
    assert_eq!(breaker.failures, 1, "{breaker:?}");

    // Calls the client cancels right after sending them leave no in-flight call
    // behind and are counted as CANCELLED.
    let slow = sim("m-slow", |c| c.latency_ms = 500.0);
    let gw3 = gateway(config(&[slow.addr()])).await;
    let c3 = client(gw3.addr()).await;
    let cancelled = [("method", "ModelInfer"), ("code", "CANCELLED")];
    let before = sum(
        &parse(&scrape(gw3.metrics_addr()).await),
        "infergate_requests_total",
        &cancelled,
    );
    for i in 0..10 {
        let mut c = c3.clone();
        let call = c.model_infer(simple_request(&format!("cancel-{i}"), 1));
        assert!(
            tokio::time::timeout(Duration::from_millis(2), call)
                .await
                .is_err(),
            "a 500 ms call cannot answer in 2 ms"
        );
    }
    let (text, samples) = scrape_until(gw3.metrics_addr(), Duration::from_secs(10), |s| {
        sum(
            s,
            "infergate_requests_in_flight",
            &[("method", "ModelInfer")],
        ) == 0.0
            && sum(s, "infergate_requests_total", &cancelled) >= before + 10.0
    })
    .await;
    assert_eq!(
        one(
            &samples,
            "infergate_requests_in_flight",
            &[("method", "ModelInfer")]
        ),
        0.0,
        "no call left in flight\n{text}"
    );
    assert_eq!(
        sum(&samples, "infergate_requests_total", &cancelled),
        before + 10.0,
        "{text}"
    );
}
