//! Limits that hold against hostile clients, end to end: buffers that grow only with the
//! bytes that arrive and their budgets, the unary read timeout, streams per connection,
//! the header list size, the connection limit, the handshake and idle timeouts, and
//! rapid reset. Attacks are written as raw HTTP/2 frames over TCP (no client library
//! would send them); normal calls use the tonic client.
//!
//! The tests run one at a time ([`serial`]): some read the process's memory, and the
//! process-wide buffer budget takes the limit of the gateway started last.

mod common;

use bytes::Bytes;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tonic::Code;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the tests of this file one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// One sim and a gateway in front of it with `tweak` applied to the test config, run
/// alone (these tests read the process's memory and sockets).
async fn limited(
    tweak: impl FnOnce(&mut infergate::config::Config),
) -> (
    tokio::sync::MutexGuard<'static, ()>,
    infergate_sim::SimHandle,
    infergate::server::GatewayHandle,
) {
    let serial = serial().await;
    let sim = sim("s", |_| {});
    let mut cfg = config(&[sim.addr()]);
    tweak(&mut cfg);
    let gw = gateway(cfg).await;
    (serial, sim, gw)
}

// --- raw HTTP/2 ------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;
const CANCEL: u32 = 8;
const REFUSED_STREAM: u32 = 7;
const ENHANCE_YOUR_CALM: u32 = 11;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 6;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix under `first`'s high bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The header block of a gRPC call to `path` (no Huffman coding, nothing indexed).
fn request_block(path: &str) -> Vec<u8> {
    let mut out = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    hpack_int(&mut out, 0, 4, 4); // :path, literal without indexing, name index 4
    hpack_str(&mut out, path);
    hpack_int(&mut out, 0, 4, 1); // :authority
    hpack_str(&mut out, "localhost");
    hpack_int(&mut out, 0, 4, 31); // content-type
    hpack_str(&mut out, "application/grpc");
    out.push(0); // te: a new name
    hpack_str(&mut out, "te");
    hpack_str(&mut out, "trailers");
    out
}

const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn setting(&self, id: u16) -> Option<u32> {
        if self.kind != SETTINGS || self.flags & ACK != 0 {
            return None;
        }
        self.payload.chunks_exact(6).find_map(|s| {
            (u16::from_be_bytes([s[0], s[1]]) == id)
                .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
        })
    }
}

/// Reads one frame; None at the end of the connection (EOF or reset).
async fn read_frame(r: &mut OwnedReadHalf) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// An HTTP/2 connection driven by hand: the client preface and an empty SETTINGS
/// frame are sent; the server's frames are read by the test.
struct Raw {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (r, mut w) = stream.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        w.write_all(&hello).await.expect("preface");
        Raw { r, w }
    }

    /// Reads until the server's SETTINGS frame, acknowledges it, and returns it; then
    /// waits for the WINDOW_UPDATE that opens the connection's window past 64 KiB (the
    /// gateway sends one at once), so that what the test sends next is within it.
    async fn server_settings(&mut self) -> Frame {
        let settings = loop {
            let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut self.r))
                .await
                .expect("server settings in time")
                .expect("connection open");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                break f;
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, read_frame(&mut self.r)).await {
            if f.kind == WINDOW_UPDATE && f.stream == 0 {
                break;
            }
        }
        settings
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
    }

    /// Frames until `limit` passes or the connection ends (then `.1` is true).
    async fn frames_for(&mut self, limit: Duration) -> (Vec<Frame>, bool) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, read_frame(&mut self.r)).await {
                Err(_) => return (frames, false),
                Ok(None) => return (frames, true),
                Ok(Some(f)) => frames.push(f),
            }
        }
    }
}

/// HEADERS (and no END_STREAM) for a ModelInfer call on `stream`.
fn open_call(stream: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS, stream, &request_block(MODEL_INFER))
}

// --- process memory --------------------------------------------------------------------

/// A field of /proc/self/status in KiB (VmRSS, VmData...); 0 where there is none.
fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The soft limit on open files, if known.
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn normal_call(addr: std::net::SocketAddr) -> Duration {
    let began = Instant::now();
    let mut client = client(addr).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.model_infer(simple_request("normal", 1)),
    )
    .await
    .expect("a normal call answers in time")
    .expect("a normal call succeeds");
    assert_eq!(reply.into_inner().model_name, "simple");
    began.elapsed()
}

/// The probe, as one connection sends it: `streams` calls, each HEADERS and one
/// DATA frame with a 64 MiB length prefix and 190 bytes, never ended. Returns the
/// connection and the frames the server answered with meanwhile.
async fn huge_prefix_flood(addr: std::net::SocketAddr, streams: u32) -> (Raw, Vec<Frame>) {
    huge_prefix_flood_on(addr, streams, MODEL_INFER, 64 << 20).await
}

async fn huge_prefix_flood_on(
    addr: std::net::SocketAddr,
    streams: u32,
    path: &str,
    announced: usize,
) -> (Raw, Vec<Frame>) {
    let mut raw = Raw::connect(addr).await;
    raw.server_settings().await;
    let mut body = infergate::wire::header(announced).to_vec();
    body.extend_from_slice(&[0x0a; 190]);
    let headers = request_block(path);
    let mut batch = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        batch.extend(frame(HEADERS, END_HEADERS, id, &headers));
        batch.extend(frame(DATA, 0, id, &body));
    }
    raw.send(&batch).await;
    let (frames, closed) = raw.frames_for(Duration::from_millis(300)).await;
    assert!(!closed, "the gateway keeps the connection: {frames:?}");
    (raw, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_length_prefixes_costs_what_was_sent_not_what_was_announced() {
    let _serial = serial().await;
    let sim = sim("s", |_| {});
    let mut cfg = config(&[sim.addr()]);
    // Every stream accepted: the worst case for buffers.
    cfg.max_concurrent_streams = 1000;
    let gw = gateway(cfg).await;
    normal_call(gw.addr()).await;
    let budget = infergate::wire::process_budget();
    let (rss0, data0) = (status_kib("VmRSS"), status_kib("VmData"));

    const STREAMS: u32 = 500;
    let (raw, frames) = huge_prefix_flood(gw.addr(), STREAMS).await;
    let refused = frames.iter().filter(|f| f.kind == RST_STREAM).count();
    assert_eq!(refused, 0, "all {STREAMS} streams are taken: {frames:?}");
    // Wait until the gateway holds every stream's 195 bytes.
    eventually(
        "every stream's bytes are buffered",
        Duration::from_secs(10),
        || budget.used() >= STREAMS as usize * 195,
    )
    .await;
    let held = budget.used();
    let (rss1, data1) = (status_kib("VmRSS"), status_kib("VmData"));
    let answered = normal_call(gw.addr()).await;
    println!(
        "{STREAMS} streams x 64 MiB announced: buffers {held} bytes; VmRSS {rss0} -> {rss1} KiB (+{} KiB), \
         VmData {data0} -> {data1} KiB (+{} KiB); a normal call on another connection took {answered:?}",
        rss1.saturating_sub(rss0),
        data1.saturating_sub(data0),
    );
    assert!(
        held <= STREAMS as usize * 256,
        "at most 256 bytes of buffer per stream, not 64 MiB: {held}"
    );
    // 32 GiB were announced; what the gateway holds for 500 open calls stays small
    // (the process's address space too: nothing is reserved for bytes not sent).
    assert!(
        rss1.saturating_sub(rss0) < 64 * 1024,
        "VmRSS grew {} KiB",
        rss1 - rss0
    );
    assert!(
        data1.saturating_sub(data0) < 512 * 1024,
        "VmData grew {} KiB",
        data1 - data0
    );
    assert!(answered < Duration::from_secs(2), "{answered:?}");
    drop(raw);
    eventually(
        "the buffers are given back when the connection closes",
        Duration::from_secs(5),
        || budget.used() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_the_gateway_answers_itself_refuse_huge_prefixes_before_tonic_reserves_them() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.max_concurrent_streams = 1000;
    })
    .await;
    let ch = channel(gw.addr()).await;
    const STREAMS: u32 = 500;
    for path in [
        "/inference.GRPCInferenceService/ModelReady",
        "/grpc.health.v1.Health/Check",
        "/inference.GRPCInferenceService/ServerLive",
    ] {
        let (_tx, call) = stalled_call_to(&ch, gw.addr(), path, 64 << 20, 190, None).await;
        let status = answered(call).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
        assert!(status.message().contains("67108864 bytes"), "{status:?}");

        let (rss0, data0) = (status_kib("VmRSS"), status_kib("VmData"));
        let (mut raw, mut frames) = huge_prefix_flood_on(gw.addr(), STREAMS, path, 64 << 20).await;
        let ended = |frames: &[Frame]| {
            frames
                .iter()
                .filter(|f| f.kind == HEADERS && f.flags & 1 != 0)
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while ended(&frames) < STREAMS as usize && Instant::now() < deadline {
            let (more, closed) = raw.frames_for(Duration::from_millis(200)).await;
            assert!(!closed);
            frames.extend(more);
        }
        let (rss1, data1) = (status_kib("VmRSS"), status_kib("VmData"));
        println!(
            "{path}: {} of {STREAMS} answered; VmRSS +{} KiB, VmData +{} KiB",
            ended(&frames),
            rss1.saturating_sub(rss0),
            data1.saturating_sub(data0)
        );
        assert_eq!(ended(&frames), STREAMS as usize, "{path}");
        assert!(
            data1.saturating_sub(data0) < 512 * 1024,
            "{path}: VmData +{} KiB",
            data1 - data0
        );
    }
    normal_call(gw.addr()).await;
}

/// The status a stalled call ends with, within 5 s.
async fn answered(call: tokio::task::JoinHandle<Option<tonic::Status>>) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("answered in time")
        .expect("task")
        .expect("a status")
}

/// A ModelInfer body that starts a message of `announced` bytes, sends `sent` of them,
/// and then stalls; answered as soon as the gateway refuses it.
async fn stalled_call(
    channel: &tonic::transport::Channel,
    addr: std::net::SocketAddr,
    announced: usize,
    sent: usize,
    grpc_timeout: Option<&'static str>,
) -> (
    tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, tonic::Status>>,
    tokio::task::JoinHandle<Option<tonic::Status>>,
) {
    stalled_call_to(channel, addr, MODEL_INFER, announced, sent, grpc_timeout).await
}

async fn stalled_call_to(
    channel: &tonic::transport::Channel,
    addr: std::net::SocketAddr,
    path: &str,
    announced: usize,
    sent: usize,
    grpc_timeout: Option<&'static str>,
) -> (
    tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, tonic::Status>>,
    tokio::task::JoinHandle<Option<tonic::Status>>,
) {
    use tower::ServiceExt;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut first = infergate::wire::header(announced).to_vec();
    first.extend(std::iter::repeat_n(0x0a, sent));
    tx.send(Ok(http_body::Frame::data(Bytes::from(first))))
        .await
        .expect("queued");
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("http://{addr}{path}").parse().expect("uri");
    let headers = request.headers_mut();
    headers.insert("content-type", "application/grpc".parse().expect("value"));
    headers.insert("te", "trailers".parse().expect("value"));
    if let Some(t) = grpc_timeout {
        headers.insert("grpc-timeout", t.parse().expect("value"));
    }
    let channel = channel.clone();
    let task = tokio::spawn(async move {
        let response = channel.oneshot(request).await.ok()?;
        tonic::Status::from_header_map(response.headers())
    });
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bytes_over_a_budget_are_refused_with_resource_exhausted_naming_it() {
    let _serial = serial().await;
    let sim = sim("s", |_| {});
    let mut cfg = config(&[sim.addr()]);
    const MIB: usize = 1 << 20;
    cfg.max_message_bytes = MIB;
    cfg.max_buffered_request_bytes_per_connection = 5 * MIB / 2;
    cfg.max_buffered_request_bytes = 7 * MIB / 2;
    let gw = gateway(cfg).await;
    let budget = infergate::wire::process_budget();
    let a = channel(gw.addr()).await;
    let b = channel(gw.addr()).await;
    let mut held = Vec::new();
    // Each call holds a 1 MiB buffer: two fit in a connection's 2.5 MiB, the third not.
    for i in 1..=2 {
        held.push(stalled_call(&a, gw.addr(), MIB, MIB - 1000, None).await);
        eventually("the message is buffered", Duration::from_secs(5), || {
            budget.used() >= i * (MIB - 1000)
        })
        .await;
    }
    let (_tx, refused) = stalled_call(&a, gw.addr(), MIB, MIB - 1000, None).await;
    let status = answered(refused).await;
    println!("third call on one connection: {status:?}");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("max_buffered_request_bytes_per_connection"),
        "{}",
        status.message()
    );
    // Another connection: one more fits the process's 3.5 MiB, the next does not.
    held.push(stalled_call(&b, gw.addr(), MIB, MIB - 1000, None).await);
    eventually("the message is buffered", Duration::from_secs(5), || {
        budget.used() >= 3 * (MIB - 1000)
    })
    .await;
    let (_tx, refused) = stalled_call(&b, gw.addr(), MIB, MIB - 1000, None).await;
    let status = answered(refused).await;
    println!("over the process's budget: {status:?}");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_buffered_request_bytes ="),
        "{}",
        status.message()
    );
    // Calls that need no buffer still pass, and the budget is given back.
    normal_call(gw.addr()).await;
    drop(held);
    drop((a, b));
    eventually("budgets given back", Duration::from_secs(5), || {
        budget.used() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_body_that_never_ends_is_cut_by_the_read_timeout_without_a_deadline() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.request_read_timeout_ms = 300;
    })
    .await;
    let ch = channel(gw.addr()).await;
    let began = Instant::now();
    let (_tx, call) = stalled_call(&ch, gw.addr(), 1000, 10, None).await;
    let status = answered(call).await;
    let took = began.elapsed();
    println!("stalled body without a deadline: {status:?} after {took:?}");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("request_read_timeout_ms (300 ms)"),
        "{}",
        status.message()
    );
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3));
    // A caller's longer deadline does not lift it.
    let (_tx, call) = stalled_call(&ch, gw.addr(), 1000, 10, Some("60S")).await;
    let status = answered(call).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_is_announced_and_streams_over_it_are_refused() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.max_concurrent_streams = 8;
        cfg.max_header_list_bytes = 4096;
    })
    .await;
    let mut raw = Raw::connect(gw.addr()).await;
    let settings = raw.server_settings().await;
    assert_eq!(settings.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(8));
    assert_eq!(settings.setting(SETTINGS_MAX_HEADER_LIST_SIZE), Some(4096));
    let mut batch = Vec::new();
    for i in 0..12 {
        batch.extend(open_call(2 * i + 1));
    }
    raw.send(&batch).await;
    let (frames, closed) = raw.frames_for(Duration::from_millis(500)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && f.code() == Some(REFUSED_STREAM))
        .map(|f| f.stream)
        .collect();
    println!("streams refused: {refused:?}");
    assert!(!closed);
    assert_eq!(refused, vec![17, 19, 21, 23], "{frames:?}");
    // The calls it took are still open, and other clients are served.
    normal_call(gw.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_list_over_the_limit_is_refused_and_the_gateway_serves_on() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.max_header_list_bytes = 8192;
    })
    .await;
    let mut client = client(gw.addr()).await;
    let mut request = tonic::Request::new(simple_request("big-headers", 1));
    let big: tonic::metadata::MetadataValue<_> = "v".repeat(12_000).parse().expect("value");
    request.metadata_mut().insert("x-big", big);
    let status = tokio::time::timeout(Duration::from_secs(5), client.model_infer(request))
        .await
        .expect("answered in time")
        .expect_err("refused");
    println!("12 KB of metadata: {status:?}");
    assert!(
        status.message().contains("431") || status.code() == Code::ResourceExhausted,
        "{status:?}"
    );
    // Within the limit: served, on the same client.
    let mut request = tonic::Request::new(simple_request("small-headers", 1));
    let small: tonic::metadata::MetadataValue<_> = "v".repeat(4000).parse().expect("value");
    request.metadata_mut().insert("x-big", small);
    client.model_infer(request).await.expect("served");
}

/// Reads from `stream` until EOF or reset; returns how long that took, or None if the
/// connection was still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let began = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| began.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_preface_only_sockets_are_closed_by_the_handshake_timeout() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.client_handshake_timeout_ms = 300;
    })
    .await;
    let began = Instant::now();
    let mut silent = TcpStream::connect(gw.addr()).await.expect("connect");
    let mut preface_only = TcpStream::connect(gw.addr()).await.expect("connect");
    preface_only.write_all(PREFACE).await.expect("preface");
    for (what, socket) in [("silent", &mut silent), ("preface only", &mut preface_only)] {
        closed_within(socket, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("a {what} socket is still open after 5 s"));
        let took = began.elapsed();
        println!("{what} socket closed {took:?} after it connected");
        assert!(took < Duration::from_secs(2), "{what}: {took:?}");
    }
    normal_call(gw.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_call_open_is_closed_by_the_idle_timeout() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.client_idle_timeout_ms = 500;
    })
    .await;
    // A handshake and then nothing: closed once idle for 500 ms.
    let mut idle = Raw::connect(gw.addr()).await;
    idle.server_settings().await;
    let began = Instant::now();
    let (_, closed) = idle.frames_for(Duration::from_secs(5)).await;
    println!("an idle connection was closed after {:?}", began.elapsed());
    assert!(closed && began.elapsed() < Duration::from_secs(3));
    // A connection with a call open stays, PINGs answered, however long the call.
    let mut busy = Raw::connect(gw.addr()).await;
    busy.server_settings().await;
    busy.send(&open_call(1)).await;
    let (_, closed) = busy.frames_for(Duration::from_millis(1200)).await;
    assert!(!closed, "a connection with an open call is not idle");
    busy.send(&frame(PING, 0, 0, &[7; 8])).await;
    let (frames, closed) = busy.frames_for(Duration::from_millis(300)).await;
    assert!(!closed);
    assert!(
        frames.iter().any(|f| f.kind == PING && f.flags & ACK != 0),
        "{frames:?}"
    );
    // Once its call ends, the idle clock starts.
    busy.send(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()))
        .await;
    let began = Instant::now();
    let (_, closed) = busy.frames_for(Duration::from_secs(5)).await;
    println!("closed {:?} after its last call ended", began.elapsed());
    assert!(closed && began.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_leave_a_normal_call_prompt() {
    let _serial = serial().await;
    let sim = sim("s", |_| {});
    let gw = gateway(config(&[sim.addr()])).await;
    // Each connection costs two descriptors in this process (client and gateway side).
    let files = open_files_limit().unwrap_or(4096);
    let count = 1000.min(files.saturating_sub(400) / 2);
    if count < 1000 {
        println!("open files limited to {files}: {count} idle connections instead of 1000");
    }
    let mut idle = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
        if i % 2 == 0 {
            // Half of them get as far as the preface and SETTINGS.
            let mut hello = PREFACE.to_vec();
            hello.extend(frame(SETTINGS, 0, 0, &[]));
            s.write_all(&hello).await.expect("preface");
        }
        idle.push(s);
    }
    let took = normal_call(gw.addr()).await;
    println!("{count} idle connections open: a normal call took {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once() {
    let (_serial, _sim, gw) = limited(|cfg| {
        cfg.max_client_connections = 20;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::connect(gw.addr()).await;
        raw.server_settings().await;
        held.push(raw);
    }
    let mut over = TcpStream::connect(gw.addr())
        .await
        .expect("the kernel accepts");
    let took = closed_within(&mut over, Duration::from_secs(2))
        .await
        .expect("closed at once");
    println!("connection 21 of 20 closed after {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A slot that frees up is usable again.
    held.truncate(19);
    tokio::time::sleep(Duration::from_millis(100)).await;
    normal_call(gw.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_does_not_stop_other_clients() {
    let _serial = serial().await;
    let sim = sim("s", |_| {});
    let gw = gateway(config(&[sim.addr()])).await;
    let addr = gw.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The attacker: batches of HEADERS + RST_STREAM(CANCEL), reconnecting whenever the
    // gateway closes the connection.
    let attacker = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut streams, mut connections, mut calm) = (0u64, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                connections += 1;
                let mut raw = Raw::connect(addr).await;
                raw.server_settings().await;
                let (mut r, mut w) = (raw.r, raw.w);
                let reader = tokio::spawn(async move {
                    let mut goaway = None;
                    while let Some(f) = read_frame(&mut r).await {
                        if f.kind == GOAWAY {
                            goaway = f.code();
                        }
                    }
                    goaway
                });
                let mut id = 1u32;
                'conn: while !stop.load(std::sync::atomic::Ordering::Relaxed) && id < 1 << 30 {
                    let mut batch = Vec::new();
                    for _ in 0..100 {
                        batch.extend(open_call(id));
                        batch.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                        id += 2;
                    }
                    if w.write_all(&batch).await.is_err() {
                        break 'conn;
                    }
                    streams += 100;
                    tokio::task::yield_now().await;
                }
                drop(w);
                if let Ok(Ok(Some(code))) =
                    tokio::time::timeout(Duration::from_secs(2), reader).await
                {
                    if code == ENHANCE_YOUR_CALM {
                        calm += 1;
                    }
                }
            }
            (streams, connections, calm)
        })
    };
    let mut client = client(addr).await;
    let (mut calls, mut slowest) = (0, Duration::ZERO);
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            client.model_infer(simple_request("victim", 1)),
        )
        .await
        .expect("answered in time during the attack")
        .expect("served during the attack");
        slowest = slowest.max(t.elapsed());
        calls += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (streams, connections, calm) = attacker.await.expect("attacker");
    println!(
        "rapid reset: {streams} streams opened and reset on {connections} connections \
         ({calm} closed with ENHANCE_YOUR_CALM); another client made {calls} calls, the slowest {slowest:?}"
    );
    assert!(calls >= 10, "{calls} calls in 3 s");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
}

/// The memory probe against a gateway running elsewhere (for before/after figures
/// with the release binary and its allocator):
/// `INFERGATE_PROBE_ADDR=127.0.0.1:8001 INFERGATE_PROBE_PID=1234 cargo test --test limits -- --ignored probe --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn probe_a_running_gateway_with_huge_prefixes() {
    let Ok(addr) = std::env::var("INFERGATE_PROBE_ADDR") else {
        println!("set INFERGATE_PROBE_ADDR (and INFERGATE_PROBE_PID to read its memory)");
        return;
    };
    let addr = addr.parse().expect("host:port");
    let streams = std::env::var("INFERGATE_PROBE_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let rss = || {
        let pid = std::env::var("INFERGATE_PROBE_PID").ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .map(|v| v.trim().to_owned())
    };
    // Another path (a health check, say) and prefix can be probed too.
    let path = std::env::var("INFERGATE_PROBE_PATH").unwrap_or_else(|_| MODEL_INFER.into());
    let announced = std::env::var("INFERGATE_PROBE_PREFIX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64 << 20);
    println!("before: VmRSS {:?}", rss());
    let (raw, frames) = huge_prefix_flood_on(addr, streams, &path, announced).await;
    let refused = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && f.code() == Some(REFUSED_STREAM))
        .count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "{streams} streams sent ({refused} refused): VmRSS {:?}",
        rss()
    );
    let t = Instant::now();
    let ok = client(addr)
        .await
        .model_infer(simple_request("probe", 1))
        .await
        .is_ok();
    println!("a normal call meanwhile: ok={ok} in {:?}", t.elapsed());
    drop(raw);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("after the connection closed: VmRSS {:?}", rss());
}
