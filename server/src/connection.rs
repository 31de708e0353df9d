//! The gateway's HTTP/2 connection to one backend: hyper's client connection, dialled
//! on first use and again once it has closed. Every call to the backend goes through
//! it: forwarded calls, health checks, model probes and the ORCA stream (tonic's
//! generated clients take it as their transport).
//!
//! Written here, on hyper's `client::conn::http2`, rather than taken from tonic's
//! `Channel`, because the channel puts a `tower::buffer` in front of the same hyper
//! connection: every call crossed a queue into the buffer's worker task before it
//! crossed hyper's own queue into the connection task, and the channel's layers
//! (origin, reconnect, a `grpc-timeout` timer the request path already keeps) ran on
//! every call. A `SendRequest` clones for each call and sends straight to the
//! connection task. What the channel did that is kept: dialling lazily, the connect
//! timeout, TCP without Nagle, HTTP/2 keepalive (also while idle), the flow-control
//! windows, TLS through [`infergate_base::tls::Connector`], and the origin
//! (`scheme://host:port`) on requests that carry only a path.
//!
//! One dial at a time: the calls that find the connection closed wait on the same
//! dial. A failed dial fails those calls (the request path tries another backend,
//! health checks see the backend unreachable); the next call dials again.

use crate::config::ConnectionConfig;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infergate_base::tls::Connector;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::body::Body;

/// A handle on one backend's connection (cheap to clone).
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port`, dialled as given.
    address: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// TLS backends: the connector that dials TCP and does the handshake.
    tls: Option<Connector>,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    state: Mutex<State>,
}

type Dial = Shared<BoxFuture<'static, Result<SendRequest<Body>, Error>>>;

enum State {
    /// Not dialled yet, or closed (by either side, or after a failed dial).
    Idle,
    Dialling(Dial),
    Open(SendRequest<Body>),
}

/// Why a call got no response from the backend: the dial failed, or the connection
/// failed under the call. Cloneable, because the calls waiting on one dial share its
/// error.
#[derive(Debug, Clone)]
pub struct Error {
    message: Arc<str>,
}

impl Error {
    fn new(message: String) -> Error {
        Error {
            message: message.into(),
        }
    }

    /// `what`, then the error with every cause under it (an I/O error says only "os
    /// error 111"; hyper's say "connection error", with the reason in their sources).
    fn with_causes(what: &str, err: &(dyn std::error::Error + 'static)) -> Error {
        Error::new(infergate_base::text::with_causes(
            format!("{what}: {err}"),
            err,
        ))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("address", &self.inner.address)
            .field("tls", &self.inner.tls.is_some())
            .finish()
    }
}

impl Connection {
    /// The connection to `address` (`host:port`), over TLS when `tls` is given; nothing
    /// is dialled until the first call.
    pub fn new(
        address: &str,
        tls: Option<Connector>,
        settings: &ConnectionConfig,
    ) -> Result<Connection, String> {
        let authority = http::uri::Authority::try_from(address)
            .map_err(|e| format!("`{address}` is no host:port: {e}"))?;
        let scheme = match tls {
            Some(_) => http::uri::Scheme::HTTPS,
            None => http::uri::Scheme::HTTP,
        };
        Ok(Connection {
            inner: Arc::new(Inner {
                address: address.to_owned(),
                scheme,
                authority,
                tls,
                connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
                keepalive_interval: Duration::from_millis(settings.keepalive_interval_ms),
                keepalive_timeout: Duration::from_millis(settings.keepalive_timeout_ms),
                state: Mutex::new(State::Idle),
            }),
        })
    }

    /// Sends `request` (its URI may be a bare path) and returns once the response's
    /// headers arrive. Dropping the future resets the stream.
    pub async fn send(
        &self,
        mut request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error> {
        self.set_origin(&mut request);
        let mut sender = self.sender().await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(response.map(Body::new)),
            Err(e) => {
                if sender.is_closed() {
                    self.closed();
                }
                Err(Error::with_causes("the connection failed", &e))
            }
        }
    }

    /// The URI's scheme and authority are the backend's, whatever the caller's were.
    fn set_origin(&self, request: &mut http::Request<Body>) {
        let uri = std::mem::take(request.uri_mut());
        let mut parts = uri.into_parts();
        parts.scheme = Some(self.inner.scheme.clone());
        parts.authority = Some(self.inner.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // Scheme, authority and path are all set, so the parts always make a URI.
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }

    /// A sender on the open connection, dialling first when there is none.
    async fn sender(&self) -> Result<SendRequest<Body>, Error> {
        let dial = {
            let mut state = self.lock();
            match &*state {
                State::Open(sender) if !sender.is_closed() => return Ok(sender.clone()),
                State::Dialling(dial) => dial.clone(),
                _ => {
                    let dial = dial(Arc::clone(&self.inner)).boxed().shared();
                    *state = State::Dialling(dial.clone());
                    dial
                }
            }
        };
        let result = dial.clone().await;
        let mut state = self.lock();
        // The first caller back from this dial records what it gave; a later dial is
        // never overwritten by an earlier one.
        if matches!(&*state, State::Dialling(current) if current.ptr_eq(&dial)) {
            *state = match &result {
                Ok(sender) => State::Open(sender.clone()),
                Err(_) => State::Idle,
            };
        }
        result
    }

    /// The connection has closed: the next call dials again.
    fn closed(&self) {
        let mut state = self.lock();
        if let State::Open(open) = &*state {
            if open.is_closed() {
                *state = State::Idle;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is one enum, written whole: a panic elsewhere cannot leave it torn.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Dials the backend and hands its HTTP/2 connection to a task of its own.
async fn dial(inner: Arc<Inner>) -> Result<SendRequest<Body>, Error> {
    let limit = inner.connect_timeout;
    let address = inner.address.clone();
    match tokio::time::timeout(limit, open(&inner)).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(format!(
            "connect to {address}: no connection within connect_timeout_ms ({} ms)",
            limit.as_millis()
        ))),
    }
}

async fn open(inner: &Inner) -> Result<SendRequest<Body>, Error> {
    let address = &inner.address;
    match &inner.tls {
        Some(connector) => {
            let mut connector = connector.clone();
            let io = tower::Service::call(&mut connector, http::Uri::default())
                .await
                .map_err(|e| Error::with_causes(&format!("connect to {address}"), &e))?;
            handshake(inner, io).await
        }
        None => {
            let tcp = TcpStream::connect(address)
                .await
                .map_err(|e| Error::with_causes(&format!("connect to {address}"), &e))?;
            tcp.set_nodelay(true)
                .map_err(|e| Error::with_causes(&format!("connect to {address}"), &e))?;
            handshake(inner, TokioIo::new(tcp)).await
        }
    }
}

async fn handshake<T>(inner: &Inner, io: T) -> Result<SendRequest<Body>, Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .keep_alive_interval(inner.keepalive_interval)
        .keep_alive_timeout(inner.keepalive_timeout)
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .map_err(|e| Error::with_causes(&format!("HTTP/2 with {}", inner.address), &e))?;
    let address = inner.address.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(backend = %address, "backend connection ended: {e}");
        }
    });
    Ok(sender)
}

/// tonic's generated clients (health checks, model probes, the ORCA stream) call the
/// backend through this.
impl tower::Service<http::Request<Body>> for Connection {
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(request).await })
    }
}
