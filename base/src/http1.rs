//! The gateway's few plain-HTTP/1.1 endpoints, on hyper: the `/metrics` server, the
//! simulator's control and metrics port, and the client that scrapes a backend's
//! Prometheus endpoint. A leaf: it knows nothing of the rest of the crate.
//!
//! hyper does the protocol (request parsing, keep-alive, chunked bodies both ways);
//! this module only adapts it: [`serve`] runs a plain function from a request's path
//! and query to a [`Reply`] on every connection of a listener until shutdown, and
//! [`get`] fetches one body with a size limit that fails loudly instead of cutting.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Run once the reply has been written out (the simulator's `exit=1`).
pub type After = Box<dyn FnOnce() + Send>;

/// What a handler answers.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// What to do once the body is written.
    pub after: Option<After>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl Reply {
    /// 200 with a Prometheus text body.
    pub fn prometheus(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: PROMETHEUS_TEXT,
            body,
            after: None,
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            after: None,
        }
    }

    /// The same reply with a content type.
    pub fn with_type(mut self, content_type: &'static str) -> Reply {
        self.content_type = content_type;
        self
    }

    /// The same reply, then `after` once it is written.
    pub fn then(mut self, after: After) -> Reply {
        self.after = Some(after);
        self
    }
}

/// A reply's body, which runs the reply's `after` when hyper is done with it.
struct Body {
    inner: Full<Bytes>,
    after: Option<After>,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(after) = self.after.take() {
            after();
        }
    }
}

/// The Prometheus text exposition format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A handler: `(method, path, query)` to a reply.
pub type Handler = Arc<dyn Fn(&str, &str, &str) -> Reply + Send + Sync>;

/// Longest a connection may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `handler` on every connection of `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let Ok((socket, _)) = accepted else {
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let uri = request.uri();
                let reply = handler(
                    request.method().as_str(),
                    uri.path(),
                    uri.query().unwrap_or(""),
                );
                let body = Body {
                    inner: Full::new(Bytes::from(reply.body)),
                    after: reply.after,
                };
                let mut response = hyper::Response::new(body);
                *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
                    .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(reply.content_type),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// `GET http://{address}{path}`: the body of a 200 answer, at most `limit` bytes
/// (chunked or not), within `timeout`. Errors say what went wrong: connect, status,
/// a body over the limit, time.
pub async fn get(
    address: &str,
    path: &str,
    limit: usize,
    timeout: Duration,
) -> Result<String, String> {
    tokio::time::timeout(timeout, get_inner(address, path, limit))
        .await
        .map_err(|_| format!("http://{address}{path}: no answer within {timeout:?}"))?
}

async fn get_inner(address: &str, path: &str, limit: usize) -> Result<String, String> {
    let url = format!("http://{address}{path}");
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, address)
        .header(hyper::header::ACCEPT, "text/plain")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("{url}: the body is over the {limit}-byte limit")
            } else {
                format!("{url}: {e}")
            }
        })?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| format!("{url}: the body is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_and_fetches_with_limits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop, stopped) = watch::channel(false);
        let handler: Handler = Arc::new(|method, path, query| match (method, path) {
            ("GET", "/metrics") => Reply::prometheus(format!("up 1\n# {query}\n")),
            ("GET", "/big") => Reply::text(200, "x".repeat(10_000)),
            _ => Reply::text(404, "no"),
        });
        let server = tokio::spawn(serve(listener, handler, stopped));
        let second = Duration::from_secs(5);
        let body = get(&addr, "/metrics?a=1", 1000, second)
            .await
            .expect("body");
        assert_eq!(body, "up 1\n# a=1\n");
        let err = get(&addr, "/nope", 1000, second).await.expect_err("404");
        assert!(err.contains("404"), "{err}");
        let err = get(&addr, "/big", 1000, second).await.expect_err("limit");
        assert!(err.contains("1000-byte limit"), "{err}");
        assert_eq!(
            get(&addr, "/big", 20_000, second)
                .await
                .expect("fits")
                .len(),
            10_000
        );
        let _ = stop.send(true);
        server.await.expect("server stops");
    }
}
