//! HTTP/2 plumbing for forwarded calls: which headers cross the gateway, how a request
//! body is read into messages, and the response body wrapper that watches a backend's
//! answer go by without touching it.
//!
//! Responses are passed through frame by frame: the gateway neither decodes nor copies
//! them. [`ObservedBody`] reads only the trailers (for `grpc-status`, and the backend's load
//! report, which it takes out: see [`load_report::observe`]) and owns the call's
//! [`Attempt`], so its accounting happens once, exactly when the body ends or is
//! dropped by a caller that went away.

use crate::attempt::{Attempt, Outcome};
use crate::config::LoadConfig;
use crate::load_report;
use crate::wire::{self, Deframer, FrameError, Message, RequestLimits};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::{Code, Status};

/// Headers that belong to one connection, not to the call, and never cross the gateway.
/// Parsed names, not strings: a lookup by `&str` parses the name again every time.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// `grpc-status`, read from every response.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `name` belongs to the connection (hop by hop) and never crosses the gateway.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The status to answer when a request body cannot be cut into messages.
pub fn frame_status(err: &FrameError) -> Status {
    match err {
        FrameError::TooLarge { .. } | FrameError::OverBudget { .. } => {
            Status::resource_exhausted(err.to_string())
        }
        _ => Status::invalid_argument(err.to_string()),
    }
}

/// How long a unary request body may take to arrive when the server set no
/// `request_read_timeout_ms` for the call ([`RequestLimits`]).
pub const DEFAULT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a unary request body: exactly one message, within the size limit, charged to
/// the process's and the connection's buffer budgets, and within the call's read
/// timeout (`request_read_timeout_ms`), whether or not the caller sent a deadline.
pub async fn read_unary(body: Body, limit: usize, method: &str) -> Result<Message, Status> {
    let limits = RequestLimits::current();
    let timeout = limits.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT);
    let deframer = Deframer::with_budgets(limit, wire::process_budget(), limits.connection);
    let received = AtomicUsize::new(0);
    match tokio::time::timeout(timeout, read_one(body, deframer, method, &received)).await {
        Ok(read) => read,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the {method} request did not arrive within request_read_timeout_ms ({} ms): {} bytes of it came",
            timeout.as_millis(),
            received.load(Ordering::Relaxed)
        ))),
    }
}

async fn read_one(
    mut body: Body,
    mut deframer: Deframer,
    method: &str,
    received: &AtomicUsize,
) -> Result<Message, Status> {
    let mut messages = Vec::with_capacity(1);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::cancelled(format!("request body failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            received.fetch_add(data.len(), Ordering::Relaxed);
            deframer
                .push(data, &mut messages)
                .map_err(|e| frame_status(&e))?;
            if messages.len() > 1 {
                return Err(Status::invalid_argument(format!(
                    "{method} is unary but the request carried more than one message"
                )));
            }
        }
    }
    deframer.finish().map_err(|e| frame_status(&e))?;
    messages
        .pop()
        .ok_or_else(|| Status::invalid_argument(format!("{method} request carried no message")))
}

/// Reads `grpc-status` from a header map, if present.
pub fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// A trailers frame carrying `status`.
pub fn status_trailers(status: &Status) -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert(GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
    Frame::trailers(trailers)
}

/// Trailers of a successful call.
pub fn ok_trailers() -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    Frame::trailers(trailers)
}

/// Called once when a forwarded call ends, with its gRPC code (None: the caller left
/// before the backend finished).
pub type OnEnd = Box<dyn FnOnce(Option<Code>) + Send + Sync>;

/// A backend's response body on its way to the caller, passed through unchanged. It
/// owns the call's [`Attempt`], which it ends with the code in the trailers, or as
/// cancelled when the caller goes away first.
pub struct ObservedBody {
    inner: Body,
    attempt: Option<Attempt>,
    on_end: Option<OnEnd>,
    code: Option<Code>,
    load: Arc<LoadConfig>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Response bytes seen so far (gRPC frames, headers excluded).
    bytes: u64,
}

impl ObservedBody {
    /// Wraps `inner`; `code` is the status already known from the response headers
    /// (a trailers-only answer), if any: then the call is over, and is recorded at
    /// once, whether or not the server ever polls this body.
    /// Load reports in the trailers are applied to the attempt's endpoint.
    pub fn new(
        inner: Body,
        attempt: Attempt,
        code: Option<Code>,
        load: Arc<LoadConfig>,
        on_end: OnEnd,
    ) -> Self {
        let mut body = ObservedBody {
            inner,
            attempt: Some(attempt),
            on_end: Some(on_end),
            code,
            load,
            deadline: None,
            bytes: 0,
        };
        if let Some(code) = code {
            body.finish(Outcome::Answered(code), Some(code));
        }
        body
    }

    /// Ends the response with DEADLINE_EXCEEDED if it is still streaming at `deadline`
    /// (the backend's stream is reset when the body drops).
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        if self.on_end.is_some() {
            self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        }
        self
    }

    fn finish(&mut self, outcome: Outcome, code: Option<Code>) {
        if self.on_end.is_some() {
            crate::telemetry::response_bytes(self.bytes);
        }
        if let Some(attempt) = self.attempt.take() {
            attempt.finish(outcome, None);
        }
        if let Some(on_end) = self.on_end.take() {
            on_end(code);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.on_end.is_none() {
            // Ended already (a trailers-only answer is recorded when it is wrapped, but
            // its headers still go out): pass on whatever is left.
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                this.finish(Outcome::Deadline, Some(Code::DeadlineExceeded));
                let status =
                    Status::deadline_exceeded("deadline exceeded while the backend was answering");
                return Poll::Ready(Some(Ok(status_trailers(&status))));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_mut() {
                    // Trailers are the last frame of a gRPC response: the call ends here,
                    // whether or not the server polls the body again before dropping it.
                    let code = grpc_code(trailers).unwrap_or(Code::Unknown);
                    this.code = Some(code);
                    if let Some(attempt) = &this.attempt {
                        load_report::observe(attempt.endpoint(), trailers, &this.load);
                    }
                    this.finish(Outcome::Answered(code), Some(code));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                // The backend's stream broke mid-answer (reset, connection lost).
                this.finish(Outcome::Transport, Some(status.code()));
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                let code = this.code.unwrap_or(Code::Unknown);
                this.finish(Outcome::Answered(code), Some(code));
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // Dropped before the end: the caller hung up (or its deadline passed). The
        // backend sees the stream reset when `inner` drops right after this.
        self.finish(Outcome::Cancelled, None);
    }
}

/// Counts the gRPC messages in a stream of DATA frames without copying them: it reads
/// each 5-byte message header as it goes by and skips the announced length, so a
/// message split over frames counts once and several messages in one frame count
/// each.
#[derive(Debug, Default)]
pub struct MessageCounter {
    /// Bytes of the current message's body still to come.
    remaining: u64,
    header: [u8; 5],
    have: usize,
}

impl MessageCounter {
    /// Feeds one DATA frame; returns how many messages ended in it.
    pub fn push(&mut self, mut data: &[u8]) -> u32 {
        let mut ended = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining as usize).min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
                if self.remaining == 0 {
                    ended += 1;
                }
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len == 0 {
                    ended += 1;
                } else {
                    self.remaining = u64::from(len);
                }
            }
        }
        ended
    }
}

/// A body of gateway-made frames fed from a channel (used for streams).
pub fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Status>>) -> Body {
    Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// A body of several ready-made chunks (a message with fields appended to it).
pub fn chunks_body(chunks: Vec<Bytes>) -> Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c)));
    Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
}

/// A body that is one ready-made message.
pub fn full_body(bytes: Bytes) -> Body {
    Body::new(http_body_util::Full::new(bytes))
}

/// A 200 response whose body is `body`, with gRPC's content type.
pub fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Turns a transport error into the status a caller sees, naming the backend.
pub fn transport_status(address: &str, err: &(dyn std::error::Error + 'static)) -> Status {
    Status::unavailable(infergate_base::text::with_causes(
        format!("backend {address} unreachable: {err}"),
        err,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_across_and_within_frames() {
        let message = |len: usize| {
            let mut m = vec![0u8];
            m.extend_from_slice(&(len as u32).to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len));
            m
        };
        let mut c = MessageCounter::default();
        // Two messages in one frame.
        let two: Vec<u8> = [message(3), message(0)].concat();
        assert_eq!(c.push(&two), 2);
        // One message split over three frames, the header itself split too.
        let big = message(10);
        assert_eq!(c.push(&big[..2]), 0);
        assert_eq!(c.push(&big[2..8]), 0);
        assert_eq!(c.push(&big[8..]), 1);
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        for name in [
            "connection",
            "keep-alive",
            "host",
            "content-length",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["te", "x-tenant", "grpc-timeout", "content-type"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn status_trailers_carry_code_and_message() {
        let frame = status_trailers(&Status::not_found("unknown model 'x'"));
        let trailers = frame.trailers_ref().expect("trailers");
        assert_eq!(grpc_code(trailers), Some(Code::NotFound));
        assert!(trailers.get("grpc-message").is_some());
    }

    fn stalled_body(
        first: &'static [u8],
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Status>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Ok(Frame::data(Bytes::from_static(first))))
            .expect("room");
        (tx, channel_body(rx))
    }

    #[tokio::test]
    async fn a_unary_body_that_never_ends_times_out_without_a_deadline() {
        let (_tx, body) = stalled_body(&[0, 0, 0, 0, 100, 1, 2]);
        let limits = RequestLimits {
            connection: None,
            read_timeout: Some(std::time::Duration::from_millis(50)),
        };
        let status = limits
            .scope(read_unary(body, 1 << 20, "ModelInfer"))
            .await
            .expect_err("never complete");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status
                .message()
                .contains("request_read_timeout_ms (50 ms): 7 bytes"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn a_spent_connection_budget_is_resource_exhausted_naming_it() {
        let (_tx, body) = stalled_body(&[0, 0, 0, 1, 0, 1, 2]);
        let limits = RequestLimits {
            connection: Some(Arc::new(wire::Budget::new(
                "max_buffered_request_bytes_per_connection",
                10,
            ))),
            read_timeout: None,
        };
        let status = limits
            .scope(read_unary(body, 1 << 20, "ModelInfer"))
            .await
            .expect_err("over budget");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("max_buffered_request_bytes_per_connection = 10 bytes"),
            "{}",
            status.message()
        );
    }
}
