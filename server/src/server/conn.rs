//! Client connections on the inference port, and the limits that hold against hostile
//! ones: how many may be open at once (`max_client_connections`: one over the limit is
//! closed as soon as it is accepted), how long one may stay silent before its HTTP/2
//! preface and first SETTINGS frame (`client_handshake_timeout_ms`), how long one may
//! stay open with no call on it (`client_idle_timeout_ms`), and the per-connection
//! budget of buffered request bytes (`max_buffered_request_bytes_per_connection`).
//!
//! hyper (through tonic 0.14's `Server`) has no handshake or idle timeout for HTTP/2
//! connections, and tonic does not hand out the connection to shut it down gracefully;
//! so the accepted socket is wrapped ([`ClientIo`]) and ends its read side (EOF) when a
//! timeout passes, which ends hyper's connection and closes the socket (without a
//! GOAWAY). Which calls are open on a connection is counted by [`CallsLayer`], which
//! also sets each call's [`RequestLimits`] (the connection's budget, the read timeout).
//!
//! The RPCs the gateway answers itself (health, reflection, liveness, readiness,
//! metadata, the repository index) go through tonic's codec, which reserves a message's
//! announced length as soon as it reads the prefix; [`CallsLayer`] refuses their
//! messages over [`LOCAL_MESSAGE_LIMIT`] before tonic sees the prefix.

use crate::config::Config;
use crate::wire::{Budget, RequestLimits};
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The socket under a client connection: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! io_dispatch {
    ($self:expr, $io:ident => $e:expr) => {
        match $self {
            Io::Plain($io) => $e,
            Io::Tls($io) => $e,
        }
    };
}

/// The client's connection preface (24 bytes) and the header of its first frame, which
/// must be SETTINGS: what a connection must have sent within the handshake timeout.
const HANDSHAKE_BYTES: usize = 24 + 9;

/// Largest request message of an RPC the gateway answers itself (all of them carry a
/// name or two): tonic reserves the length a prefix announces before any of it
/// arrives, so a larger one is refused first, with RESOURCE_EXHAUSTED.
pub const LOCAL_MESSAGE_LIMIT: usize = 64 << 10;

/// Pause after an accept error that is not about one connection (out of file
/// descriptors, say), so the loop does not spin while nothing can be accepted.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The limits toward clients, from the config.
#[derive(Debug, Clone)]
pub(super) struct ClientLimits {
    max_connections: usize,
    handshake_timeout: Duration,
    /// None: connections may stay idle.
    idle_timeout: Option<Duration>,
    buffered_per_connection: usize,
    read_timeout: Duration,
}

impl ClientLimits {
    pub(super) fn new(config: &Config) -> Arc<Self> {
        let limits = ClientLimits {
            max_connections: config.max_client_connections,
            handshake_timeout: Duration::from_millis(config.client_handshake_timeout_ms),
            idle_timeout: (config.client_idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.client_idle_timeout_ms)),
            buffered_per_connection: config.max_buffered_request_bytes_per_connection,
            read_timeout: Duration::from_millis(config.request_read_timeout_ms),
        };
        if let Some(files) = open_files_limit() {
            if files < limits.max_connections as u64 + 256 {
                tracing::warn!(
                    max_client_connections = limits.max_connections,
                    open_files_limit = files,
                    "the process may open fewer files than max_client_connections allows \
                     (plus what backends and the other ports need): raise the limit \
                     (ulimit -n) or lower max_client_connections"
                );
            }
        }
        Arc::new(limits)
    }
}

/// The soft limit on open files (Linux: /proc/self/limits), if known.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What one connection shares with the calls on it.
#[derive(Debug)]
pub struct ConnState {
    /// Calls open now.
    open: AtomicUsize,
    /// When the last call ended, in ms since `born` (`u64::MAX`: a call is open).
    idle_since_ms: AtomicU64,
    born: Instant,
    /// Request bytes buffered for this connection's incomplete messages.
    budget: Arc<Budget>,
}

impl ConnState {
    fn open_call(self: &Arc<Self>) -> OpenCall {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenCall(Arc::clone(self))
    }

    /// When the connection became idle, or None while a call is open.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::Acquire);
        Some(self.born + Duration::from_millis(ms))
    }
}

/// One open call; counts down when dropped (with the response body, or the call's
/// future if it never answered).
struct OpenCall(Arc<ConnState>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let state = &self.0;
        let ms = state.born.elapsed().as_millis() as u64;
        // Stamp before counting down, so the connection is never seen idle since an
        // older time.
        state.idle_since_ms.store(ms, Ordering::Release);
        state.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection info tonic puts in each request's extensions.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The identity of the client's certificate (TLS with client certificates).
    identity: Option<crate::tls::PeerIdentity>,
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    state: Arc<ConnState>,
}

/// Accepted client connections within `max_client_connections`, with TCP_NODELAY.
pub(super) struct Incoming {
    listener: TcpListener,
    /// TLS: accepted sockets are handshaken on their own tasks and come back here.
    tls: Option<crate::tls::ServerTls>,
    handshaken: (
        tokio::sync::mpsc::UnboundedSender<ClientIo>,
        tokio::sync::mpsc::UnboundedReceiver<ClientIo>,
    ),
    permits: Arc<Semaphore>,
    limits: Arc<ClientLimits>,
    backoff: Option<Pin<Box<Sleep>>>,
    /// Connections closed for the limit since the last warning.
    refused: u64,
    warned: Option<Instant>,
}

impl Incoming {
    pub(super) fn new(
        listener: TcpListener,
        limits: Arc<ClientLimits>,
        tls: Option<crate::tls::ServerTls>,
    ) -> Self {
        Incoming {
            listener,
            tls,
            handshaken: tokio::sync::mpsc::unbounded_channel(),
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            backoff: None,
            refused: 0,
            warned: None,
        }
    }

    fn refuse(&mut self, peer: SocketAddr) {
        self.refused += 1;
        metrics::counter!("infergate_client_connections_refused_total").increment(1);
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            tracing::warn!(
                %peer,
                refused = self.refused,
                max_client_connections = self.limits.max_connections,
                "client connections over max_client_connections are closed at once"
            );
            self.warned = Some(now);
            self.refused = 0;
        }
    }
}

impl futures_util::Stream for Incoming {
    type Item = Result<ClientIo, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(Some(io)) = this.handshaken.1.poll_recv(cx) {
                return Poll::Ready(Some(Ok(io)));
            }
            if let Some(backoff) = this.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&this.permits).try_acquire_owned() else {
                        drop(stream);
                        this.refuse(peer);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let Some(tls) = this.tls.as_ref() else {
                        return Poll::Ready(Some(Ok(ClientIo::new(
                            Io::Plain(stream),
                            peer,
                            permit,
                            &this.limits,
                            None,
                        ))));
                    };
                    // The TLS handshake runs on its own task, within the handshake
                    // timeout; the HTTP/2 preface must then come by the same deadline.
                    let acceptor = tls.acceptor();
                    let limits = Arc::clone(&this.limits);
                    let done = this.handshaken.0.clone();
                    let due = Instant::now() + limits.handshake_timeout;
                    tokio::spawn(async move {
                        match tokio::time::timeout_at(due, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let identity = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(crate::tls::identity)
                                    .map(crate::tls::PeerIdentity);
                                let io = ClientIo::new(
                                    Io::Tls(Box::new(tls)),
                                    peer,
                                    permit,
                                    &limits,
                                    identity,
                                );
                                let _ = done.send(io);
                            }
                            Ok(Err(e)) => {
                                metrics::counter!("infergate_client_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!(%peer, "TLS handshake with a client failed: {e}");
                            }
                            Err(_) => {
                                metrics::counter!("infergate_client_connections_closed_total", "reason" => "handshake_timeout")
                                    .increment(1);
                            }
                        }
                    });
                }
                // The peer gave up before it was accepted: nothing to wait for.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::warn!("accepting a client connection failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// Why a connection was closed by the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Handshake,
    Idle,
}

/// An accepted client socket that closes itself when the handshake or idle timeout
/// passes, and holds its slot of `max_client_connections` while open.
pub struct ClientIo {
    io: Io,
    info: ClientConn,
    /// Bytes of the handshake still to come, and when they are due.
    handshake: Option<(usize, Pin<Box<Sleep>>)>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    closed: Option<Closed>,
    _permit: OwnedSemaphorePermit,
}

impl ClientIo {
    fn new(
        io: Io,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        limits: &ClientLimits,
        identity: Option<crate::tls::PeerIdentity>,
    ) -> Self {
        let local = io_dispatch!(&io, s => s.get_ref_tcp().local_addr().ok());
        let born = Instant::now();
        let state = Arc::new(ConnState {
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            born,
            budget: Arc::new(Budget::new(
                "max_buffered_request_bytes_per_connection",
                limits.buffered_per_connection,
            )),
        });
        ClientIo {
            info: ClientConn {
                identity,
                remote: Some(peer),
                local,
                state,
            },
            io,
            handshake: Some((
                HANDSHAKE_BYTES,
                Box::pin(tokio::time::sleep_until(born + limits.handshake_timeout)),
            )),
            idle: limits
                .idle_timeout
                .map(|t| (t, Box::pin(tokio::time::sleep_until(born + t)))),
            closed: None,
            _permit: permit,
        }
    }

    /// Whether a timeout has passed; registers the waker for the next one otherwise.
    fn poll_timeouts(&mut self, cx: &mut Context<'_>) -> Option<Closed> {
        if self.closed.is_some() {
            return self.closed;
        }
        if let Some((_, due)) = self.handshake.as_mut() {
            if due.as_mut().poll(cx).is_ready() {
                return self.close(Closed::Handshake);
            }
            // Idle time counts from the handshake's end at the earliest.
            return None;
        }
        let (timeout, due) = self.idle.as_mut()?;
        while due.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.info.state.idle_since() {
                None => due.as_mut().reset(now + *timeout),
                Some(since) if since + *timeout <= now => return self.close(Closed::Idle),
                Some(since) => due.as_mut().reset(since + *timeout),
            }
        }
        None
    }

    fn close(&mut self, why: Closed) -> Option<Closed> {
        let peer = self.info.remote;
        match why {
            Closed::Handshake => tracing::debug!(
                ?peer,
                "closing a client connection that sent no HTTP/2 preface and SETTINGS within client_handshake_timeout_ms"
            ),
            Closed::Idle => tracing::debug!(
                ?peer,
                "closing a client connection idle for client_idle_timeout_ms"
            ),
        }
        metrics::counter!("infergate_client_connections_closed_total", "reason" => match why {
            Closed::Handshake => "handshake_timeout",
            Closed::Idle => "idle_timeout",
        })
        .increment(1);
        self.closed = Some(why);
        self.closed
    }
}

impl Connected for ClientIo {
    type ConnectInfo = ClientConn;

    fn connect_info(&self) -> ClientConn {
        self.info.clone()
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed.is_some() {
            return Poll::Ready(Ok(())); // EOF
        }
        let before = buf.filled().len();
        match io_dispatch!(&mut this.io, s => Pin::new(s).poll_read(cx, buf)) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if let Some((left, _)) = this.handshake.as_mut() {
                    *left = left.saturating_sub(read);
                    if *left == 0 {
                        this.handshake = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_timeouts(cx) {
                Some(_) => Poll::Ready(Ok(())), // EOF: hyper ends the connection
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match io_dispatch!(&mut this.io, s => Pin::new(s).poll_write(cx, data)) {
            // A peer that reads nothing blocks writes, and hyper may then stop reading:
            // the timeouts are checked here too.
            Poll::Pending => match this.poll_timeouts(cx) {
                Some(_) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_dispatch!(&mut self.io, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_dispatch!(&mut self.io, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match io_dispatch!(&mut this.io, s => Pin::new(s).poll_write_vectored(cx, bufs)) {
            Poll::Pending => match this.poll_timeouts(cx) {
                Some(_) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        io_dispatch!(&self.io, s => s.is_write_vectored())
    }
}

/// Counts the calls open on each connection (for the idle timeout) and runs each call
/// with its [`RequestLimits`]; also puts tonic's own [`TcpConnectInfo`] in the request,
/// so `Request::remote_addr` works as it does on a plain TCP listener.
#[derive(Debug, Clone)]
pub(super) struct CallsLayer {
    read_timeout: Duration,
}

impl CallsLayer {
    pub(super) fn new(limits: &ClientLimits) -> Self {
        CallsLayer {
            read_timeout: limits.read_timeout,
        }
    }
}

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Calls<S> {
        Calls {
            inner,
            read_timeout: self.read_timeout,
        }
    }
}

/// See [`CallsLayer`].
#[derive(Debug, Clone)]
pub(super) struct Calls<S> {
    inner: S,
    read_timeout: Duration,
}

type CallFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<http::Response<CallBody<B>>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for Calls<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
{
    type Response = http::Response<CallBody<B>>;
    type Error = S::Error;
    type Future = CallFuture<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let conn = request.extensions().get::<ClientConn>().cloned();
        let mut limits = RequestLimits {
            connection: None,
            read_timeout: Some(self.read_timeout),
        };
        // The peer identity: in the extensions, and in a header only the connection
        // sets (a caller's own is removed first), which `auth` reads.
        request.headers_mut().remove(crate::auth::IDENTITY_HEADER);
        if let Some(id) = conn.as_ref().and_then(|c| c.identity.clone()) {
            if let Ok(v) = http::HeaderValue::from_str(&id.0) {
                request
                    .headers_mut()
                    .insert(crate::auth::IDENTITY_HEADER, v);
            }
            request.extensions_mut().insert(id);
        }
        let open = conn.map(|conn| {
            request.extensions_mut().insert(TcpConnectInfo {
                local_addr: conn.local,
                remote_addr: conn.remote,
            });
            limits.connection = Some(Arc::clone(&conn.state.budget));
            conn.state.open_call()
        });
        if crate::path::Forwarded::from_path(request.uri().path()).is_none() {
            request = request.map(|body| {
                tonic::body::Body::new(SmallMessages {
                    inner: body,
                    header: [0; 5],
                    have: 0,
                    skip: 0,
                })
            });
        }
        let call = limits.scope(self.inner.call(request));
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|inner| CallBody { inner, _open: open }))
        })
    }
}

/// A response body that keeps its call counted as open until it is dropped.
pub(super) struct CallBody<B> {
    inner: B,
    _open: Option<OpenCall>,
}

impl<B> http_body::Body for CallBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose gRPC messages may not announce more than
/// [`LOCAL_MESSAGE_LIMIT`] bytes: the chunk with a larger prefix is replaced by a
/// RESOURCE_EXHAUSTED error, so the codec behind never reserves that much.
struct SmallMessages {
    inner: tonic::body::Body,
    /// The prefix being read, and how much of it is in.
    header: [u8; 5],
    have: usize,
    /// Payload bytes of the current message still to pass.
    skip: usize,
}

impl SmallMessages {
    fn scan(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let h = self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len > LOCAL_MESSAGE_LIMIT {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "message of {len} bytes exceeds the gateway's limit of {LOCAL_MESSAGE_LIMIT} bytes for the RPCs it answers itself"
                    )));
                }
                self.skip = len;
            }
        }
        Ok(())
    }
}

impl http_body::Body for SmallMessages {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(|f| f.data_ref())) {
            if let Err(status) = data.map_or(Ok(()), |data| self.scan(data)) {
                return Poll::Ready(Some(Err(status)));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP socket under either kind of connection.
trait TcpRef {
    fn get_ref_tcp(&self) -> &TcpStream;
}

impl TcpRef for TcpStream {
    fn get_ref_tcp(&self) -> &TcpStream {
        self
    }
}

impl TcpRef for Box<tokio_rustls::server::TlsStream<TcpStream>> {
    fn get_ref_tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_messages_over_the_limit_are_refused_at_their_prefix() {
        let mut body = SmallMessages {
            inner: tonic::body::Body::empty(),
            header: [0; 5],
            have: 0,
            skip: 0,
        };
        // Small messages, cut anywhere, pass.
        let mut two = crate::wire::Message::encode(&[1u8; 100]).framed().to_vec();
        two.extend_from_slice(&crate::wire::Message::encode(&[2u8; 3]).framed());
        for cut in [1, 3, 5, 6, 104, 105, 107] {
            let mut b = SmallMessages {
                inner: tonic::body::Body::empty(),
                header: [0; 5],
                have: 0,
                skip: 0,
            };
            b.scan(&two[..cut]).expect("small");
            b.scan(&two[cut..]).expect("small");
        }
        // A prefix over the limit, even split, is refused.
        body.scan(&[0, 0, 1]).expect("not whole yet");
        let err = body.scan(&[0, 1]).expect_err("65537 bytes");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("65537 bytes"), "{}", err.message());
    }
}
