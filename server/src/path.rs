//! The request path of forwarded calls, written once, outermost layer first. A newcomer
//! looking for where a call is admitted, routed, balanced, sent and recorded starts here.
//!
//! Unary (`ModelInfer`, `ModelMetadata`, `ModelConfig`, `ModelStatistics`):
//! 1. admission: refuse while shutting down (later layers: auth, tenant rate limit,
//!    per-model bulkhead);
//! 2. read: exactly one gRPC message, within `max_message_bytes`, never decoded;
//! 3. route: peek model, version and id from the bytes; find the model's route
//!    (probing the pool for a model not seen yet);
//! 4. pick: the model's balancing policy over its eligible endpoints;
//! 5. endpoint: take the in-flight guard, forward metadata and the original bytes,
//!    hand the backend's response body back unchanged inside an [`ObservedBody`] that
//!    records the outcome when it ends.
//!
//! `ModelStreamInfer` goes through the same admission, route and pick for its first
//! routable message, then stays pinned to that backend for its whole life; both
//! directions flow concurrently and a message for an unknown model before pinning is
//! answered in-stream, leaving the stream usable.

use crate::endpoint::{Endpoint, InFlightGuard};
use crate::load_report::{self, LoadConfig};
use crate::pool::{Pool, RouteError};
use crate::proxy::{self, ObservedBody};
use crate::telemetry;
use crate::wire::{self, Deframer, Message, RouteKey};
use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use infergate_proto::inference::{ModelInferResponse, ModelStreamInferResponse};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Service, ServiceExt};

/// The RPCs the gateway forwards as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// `ModelInfer`
    ModelInfer,
    /// `ModelMetadata`
    ModelMetadata,
    /// `ModelConfig`
    ModelConfig,
    /// `ModelStatistics`
    ModelStatistics,
    /// `ModelStreamInfer`
    ModelStreamInfer,
}

impl Forwarded {
    /// The forwarded RPC for a request path, if it is one.
    pub fn from_path(path: &str) -> Option<Forwarded> {
        Some(
            match path.strip_prefix("/inference.GRPCInferenceService/")? {
                "ModelInfer" => Forwarded::ModelInfer,
                "ModelMetadata" => Forwarded::ModelMetadata,
                "ModelConfig" => Forwarded::ModelConfig,
                "ModelStatistics" => Forwarded::ModelStatistics,
                "ModelStreamInfer" => Forwarded::ModelStreamInfer,
                _ => return None,
            },
        )
    }

    /// The method name.
    pub fn name(self) -> &'static str {
        match self {
            Forwarded::ModelInfer => "ModelInfer",
            Forwarded::ModelMetadata => "ModelMetadata",
            Forwarded::ModelConfig => "ModelConfig",
            Forwarded::ModelStatistics => "ModelStatistics",
            Forwarded::ModelStreamInfer => "ModelStreamInfer",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Forwarded::ModelInfer => "/inference.GRPCInferenceService/ModelInfer",
            Forwarded::ModelMetadata => "/inference.GRPCInferenceService/ModelMetadata",
            Forwarded::ModelConfig => "/inference.GRPCInferenceService/ModelConfig",
            Forwarded::ModelStatistics => "/inference.GRPCInferenceService/ModelStatistics",
            Forwarded::ModelStreamInfer => "/inference.GRPCInferenceService/ModelStreamInfer",
        }
    }

    /// The request message and its model-name field, for error messages.
    fn request_field(self) -> (&'static str, &'static str) {
        match self {
            Forwarded::ModelInfer | Forwarded::ModelStreamInfer => {
                ("ModelInferRequest", "model_name")
            }
            Forwarded::ModelMetadata => ("ModelMetadataRequest", "name"),
            Forwarded::ModelConfig => ("ModelConfigRequest", "name"),
            Forwarded::ModelStatistics => ("ModelStatisticsRequest", "name"),
        }
    }
}

/// State shared by every call on the front door.
#[derive(Debug)]
pub struct Gateway {
    /// The backends and routes.
    pub pool: Arc<Pool>,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// How load reports on responses are read.
    pub load: Arc<LoadConfig>,
    shutting_down: AtomicBool,
}

/// What a call is labelled with in metrics: a model the pool knows, or `unknown`.
const UNKNOWN_MODEL: &str = "unknown";

impl Gateway {
    /// Gateway state over `pool`.
    pub fn new(pool: Arc<Pool>, max_message_bytes: usize, load: Arc<LoadConfig>) -> Arc<Gateway> {
        Arc::new(Gateway {
            pool,
            max_message_bytes,
            load,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// From now on new calls are refused (graceful shutdown).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn admit(&self) -> Result<(), Status> {
        if self.is_shutting_down() {
            return Err(Status::unavailable(
                "the gateway is shutting down; retry on another replica",
            ));
        }
        Ok(())
    }

    /// A forwarded unary call, start to end.
    pub async fn unary(
        self: Arc<Self>,
        rpc: Forwarded,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let started = Instant::now();
        telemetry::call_started(rpc.name());
        let mut label = UNKNOWN_MODEL.to_owned();
        match self.forward_unary(rpc, request, started, &mut label).await {
            Ok(response) => response,
            Err(status) => {
                telemetry::call_ended(rpc.name(), &label, Some(status.code()), started.elapsed());
                status.into_http()
            }
        }
    }

    async fn forward_unary(
        &self,
        rpc: Forwarded,
        request: http::Request<Body>,
        started: Instant,
        label: &mut String,
    ) -> Result<http::Response<Body>, Status> {
        // 1. admission
        self.admit()?;
        // 2. read
        let (parts, body) = request.into_parts();
        let message = proxy::read_unary(body, self.max_message_bytes, rpc.name()).await?;
        // 3. route
        let key = self.peek(rpc, &message)?;
        let endpoint = if key.model.is_empty() && rpc == Forwarded::ModelStatistics {
            self.pool.pick_any().map_err(route_status)?
        } else {
            let route = self.pool.route(&key.model).await.map_err(route_status)?;
            label.clone_from(&route.model);
            if rpc == Forwarded::ModelInfer && route.decoupled {
                return Err(Status::invalid_argument(format!(
                    "model '{}' is decoupled (it may answer a request with many responses or none): \
                     ModelInfer cannot carry that; use ModelStreamInfer",
                    key.model
                )));
            }
            // 4. pick
            self.pool.pick(&route).map_err(route_status)?
        };
        // 5. endpoint
        let guard = endpoint.begin();
        let response = send(
            &endpoint,
            rpc,
            &parts.headers,
            proxy::full_body(message.framed()),
        )
        .await;
        let response = match response {
            Ok(response) => response,
            Err(status) => {
                endpoint.record_outcome(false);
                return Err(status);
            }
        };
        let code = proxy::grpc_code(response.headers());
        load_report::observe(&endpoint, response.headers(), &self.load);
        let model = label.clone();
        let on_end: proxy::OnEnd = Box::new(move |code| {
            telemetry::call_ended(rpc.name(), &model, code, started.elapsed());
        });
        let (head, body) = response.into_parts();
        Ok(http::Response::from_parts(
            head,
            Body::new(ObservedBody::new(
                body,
                guard,
                code,
                Arc::clone(&self.load),
                on_end,
            )),
        ))
    }

    fn peek(&self, rpc: Forwarded, message: &Message) -> Result<RouteKey, Status> {
        let (message_name, field) = rpc.request_field();
        if message.compressed() {
            return Err(Status::unimplemented(format!(
                "compressed {message_name} (grpc-encoding) is not supported by the gateway; send it uncompressed"
            )));
        }
        let with_id = matches!(rpc, Forwarded::ModelInfer | Forwarded::ModelStreamInfer);
        let key = wire::peek_route(&message.payload(), with_id)
            .map_err(|e| Status::invalid_argument(format!("{message_name} does not parse: {e}")))?;
        if key.model.is_empty() && rpc != Forwarded::ModelStatistics {
            return Err(Status::invalid_argument(format!(
                "{message_name}.{field} is empty: name the model to call"
            )));
        }
        Ok(key)
    }

    /// A forwarded `ModelStreamInfer`: the response starts at once and a task pumps both
    /// directions until either side ends.
    pub async fn stream(self: Arc<Self>, request: http::Request<Body>) -> http::Response<Body> {
        if let Err(status) = self.admit() {
            return status.into_http();
        }
        let (parts, body) = request.into_parts();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let started = Instant::now();
            telemetry::call_started(Forwarded::ModelStreamInfer.name());
            let mut label = UNKNOWN_MODEL.to_owned();
            let code = self.pump(&parts.headers, body, &tx, &mut label).await;
            telemetry::call_ended(
                Forwarded::ModelStreamInfer.name(),
                &label,
                code,
                started.elapsed(),
            );
        });
        proxy::grpc_response(proxy::channel_body(rx))
    }

    /// Moves a stream's frames both ways. Returns the code the stream ended with, or None
    /// when the caller went away.
    async fn pump(
        &self,
        headers: &HeaderMap,
        mut body: Body,
        tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>,
        label: &mut String,
    ) -> Option<Code> {
        let mut deframer = Deframer::new(self.max_message_bytes);
        let mut messages = Vec::new();
        let mut upstream: Option<Upstream> = None;
        let mut client_open = true;
        loop {
            tokio::select! {
                _ = tx.closed() => return None,
                frame = body.frame(), if client_open => match frame {
                    None => {
                        client_open = false;
                        if let Err(e) = deframer.finish() {
                            return finish(tx, proxy::frame_status(&e)).await;
                        }
                        match upstream.as_mut() {
                            // Half-close towards the backend; its answers keep flowing.
                            Some(up) => up.tx = None,
                            None => {
                                tx.send(Ok(proxy::ok_trailers())).await.ok()?;
                                return Some(Code::Ok);
                            }
                        }
                    }
                    Some(Err(_)) => return None,
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        if let Err(e) = deframer.push(data, &mut messages) {
                            return finish(tx, proxy::frame_status(&e)).await;
                        }
                        for message in messages.drain(..) {
                            if let Some(up) = upstream.as_mut() {
                                if let Some(up_tx) = &up.tx {
                                    // A closed channel means the backend ended; its
                                    // trailers arrive on the other branch.
                                    let _ = up_tx.send(Ok(Frame::data(message.framed()))).await;
                                }
                                continue;
                            }
                            match self.open_stream(headers, message, label).await {
                                Ok(up) => upstream = Some(up),
                                Err((key, status)) => {
                                    let frame = in_stream_error(&key, &status);
                                    tx.send(Ok(frame)).await.ok()?;
                                }
                            }
                        }
                    }
                },
                frame = next_frame(&mut upstream) => match frame {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            let code = proxy::grpc_code(trailers).unwrap_or(Code::Unknown);
                            if let Some(up) = &upstream {
                                up.guard.endpoint().record_outcome(code == Code::Ok);
                                load_report::observe(up.guard.endpoint(), trailers, &self.load);
                            }
                            tx.send(Ok(frame)).await.ok()?;
                            return Some(code);
                        }
                        tx.send(Ok(frame)).await.ok()?;
                    }
                    Some(Err(status)) => return finish(tx, status).await,
                    None => {
                        return finish(tx, Status::internal("the backend ended the stream without a status")).await;
                    }
                },
            }
        }
    }

    /// Routes a stream on its first routable message and opens the backend stream.
    async fn open_stream(
        &self,
        headers: &HeaderMap,
        message: Message,
        label: &mut String,
    ) -> Result<Upstream, (RouteKey, Status)> {
        let key = self
            .peek(Forwarded::ModelStreamInfer, &message)
            .map_err(|s| (RouteKey::default(), s))?;
        let fail = |status: Status| (key.clone(), status);
        let route = self
            .pool
            .route(&key.model)
            .await
            .map_err(|e| fail(route_status(e)))?;
        let endpoint = self.pool.pick(&route).map_err(|e| fail(route_status(e)))?;
        label.clone_from(&route.model);
        let guard = endpoint.begin();
        let (up_tx, up_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        // The channel is empty, so this cannot wait.
        let _ = up_tx.send(Ok(Frame::data(message.framed()))).await;
        let body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(up_rx),
        ));
        let response = send(&endpoint, Forwarded::ModelStreamInfer, headers, body)
            .await
            .inspect_err(|_| endpoint.record_outcome(false))
            .map_err(fail)?;
        if let Some(status) = Status::from_header_map(response.headers()) {
            if status.code() != Code::Ok {
                endpoint.record_outcome(false);
                return Err(fail(status));
            }
        }
        Ok(Upstream {
            tx: Some(up_tx),
            body: response.into_body(),
            guard,
        })
    }
}

/// The backend half of a pinned stream.
struct Upstream {
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    body: Body,
    guard: InFlightGuard,
}

async fn next_frame(upstream: &mut Option<Upstream>) -> Option<Result<Frame<Bytes>, Status>> {
    match upstream {
        Some(up) => up.body.frame().await,
        None => std::future::pending().await,
    }
}

async fn finish(tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>, status: Status) -> Option<Code> {
    let code = status.code();
    tx.send(Ok(proxy::status_trailers(&status))).await.ok()?;
    Some(code)
}

fn in_stream_error(key: &RouteKey, status: &Status) -> Frame<Bytes> {
    let response = ModelStreamInferResponse {
        error_message: status.message().to_owned(),
        infer_response: Some(ModelInferResponse {
            model_name: key.model.clone(),
            model_version: key.version.clone(),
            id: key.id.clone(),
            ..Default::default()
        }),
    };
    Frame::data(Message::encode(&prost::Message::encode_to_vec(&response)).framed())
}

/// Maps a routing failure to the status a caller sees.
pub fn route_status(err: RouteError) -> Status {
    match err {
        RouteError::UnknownModel { .. } => Status::not_found(err.to_string()),
        RouteError::NoBackends | RouteError::NoneEligible { .. } => {
            Status::unavailable(err.to_string())
        }
    }
}

/// Sends one call to `endpoint`; returns once the backend's response headers arrive.
async fn send(
    endpoint: &Endpoint,
    rpc: Forwarded,
    headers: &HeaderMap,
    body: Body,
) -> Result<http::Response<Body>, Status> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(rpc.path());
    *request.version_mut() = http::Version::HTTP_2;
    proxy::forward_headers(headers, request.headers_mut());
    let mut channel = endpoint.channel();
    let ready = channel
        .ready()
        .await
        .map_err(|e| proxy::transport_status(endpoint.address(), &e))?;
    ready
        .call(request)
        .await
        .map_err(|e| proxy::transport_status(endpoint.address(), &e))
}
