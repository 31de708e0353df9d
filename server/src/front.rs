//! The front door: `inference.GRPCInferenceService` as clients see it. The outermost
//! piece of the request path: it sends each call either down the forwarding path
//! ([`crate::path`]) or to the gateway's own answers ([`LocalInference`]).
//!
//! Forwarded RPCs never go through a codec: the raw HTTP/2 request is handed to
//! [`Gateway::unary`] / [`Gateway::stream`]. The RPCs about the gateway itself (liveness,
//! readiness, metadata, the repository index) are answered here from the pool's state
//! through the generated server.

use crate::path::{Forwarded, Gateway};
use infergate_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use infergate_proto::inference::repository_index_response::ModelIndex;
use infergate_proto::inference::*;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use tower::Service;

/// The inference port's one service: forwarded RPCs go straight down the path; the
/// rest (the gateway's own inference RPCs, health, reflection) through tonic's routes.
/// Forwarded calls skip the router, which per call matched the path, stored its
/// parameters and wrapped the response body three times over.
#[derive(Clone)]
pub struct InferenceFront {
    gateway: Arc<Gateway>,
    others: Routes,
}

impl InferenceFront {
    /// The front door over `gateway`; `others` are the port's other services, to which
    /// the gateway's own inference RPCs ([`LocalInference`]) are added.
    pub fn new(gateway: Arc<Gateway>, others: Routes) -> Self {
        let local = GrpcInferenceServiceServer::new(LocalInference {
            gateway: Arc::clone(&gateway),
        })
        .max_decoding_message_size(gateway.max_message_bytes);
        InferenceFront {
            gateway,
            others: others.add_service(local),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl Service<http::Request<Body>> for InferenceFront {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> BoxFuture {
        let gateway = Arc::clone(&self.gateway);
        match Forwarded::from_path(request.uri().path()) {
            Some(Forwarded::ModelStreamInfer) => {
                Box::pin(async move { Ok(gateway.stream(request).await) })
            }
            Some(rpc) => Box::pin(async move { Ok(gateway.unary(rpc, request).await) }),
            None => Box::pin(self.others.call(request)),
        }
    }
}

/// The RPCs the gateway answers itself.
pub struct LocalInference {
    gateway: Arc<Gateway>,
}

fn forwarded_elsewhere() -> Status {
    Status::internal("this RPC is forwarded by the gateway and never reaches the local handler")
}

#[tonic::async_trait]
impl GrpcInferenceService for LocalInference {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = !self.gateway.is_shutting_down() && self.gateway.pool.any_ready();
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "ModelReadyRequest.name is empty: name the model",
            ));
        }
        // A model not seen yet is looked for once; one nobody serves is simply not ready.
        let ready =
            self.gateway.pool.route(&name).await.is_ok() && self.gateway.pool.model_ready(&name);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "infergate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: [
                "model_configuration",
                "statistics",
                "parameters",
                "streaming",
            ]
            .map(String::from)
            .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        _: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Err(forwarded_elsewhere())
    }

    async fn model_infer(
        &self,
        _: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        Err(forwarded_elsewhere())
    }

    type ModelStreamInferStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

    async fn model_stream_infer(
        &self,
        _: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        Err(forwarded_elsewhere())
    }

    async fn model_config(
        &self,
        _: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        Err(forwarded_elsewhere())
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Err(forwarded_elsewhere())
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let only_ready = request.into_inner().ready;
        let models = self
            .gateway
            .pool
            .models()
            .into_iter()
            .filter_map(|route| {
                let ready = route.endpoints.iter().any(|e| e.is_eligible());
                (ready || !only_ready).then(|| ModelIndex {
                    name: route.model.clone(),
                    version: String::new(),
                    state: if ready { "READY" } else { "UNAVAILABLE" }.into(),
                    reason: if ready {
                        String::new()
                    } else {
                        format!(
                            "no backend can take calls ({} serve it)",
                            route.endpoints.len()
                        )
                    },
                })
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}
