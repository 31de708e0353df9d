//! The control plane's gRPC API, `infergate.admin.v1.Admin`, on the admin port. It reads
//! the same pool the request path reads; nothing here sits on the request path.

use crate::pool::Pool;
use infergate_proto::admin::admin_server::{Admin, AdminServer};
use infergate_proto::admin::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The admin service over a pool.
pub struct AdminService {
    pool: Arc<Pool>,
}

impl AdminService {
    /// The tonic server for the admin API.
    pub fn server(pool: Arc<Pool>) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { pool })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_backends(
        &self,
        _: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        let backends = self
            .pool
            .endpoints()
            .iter()
            .map(|e| Backend {
                address: e.address().to_owned(),
                models: e.models(),
                health: e.health().as_str().to_owned(),
                in_flight: e.in_flight(),
                requests_total: e.requests_total(),
                failures_total: e.failures_total(),
                source: e.source().to_owned(),
            })
            .collect();
        Ok(Response::new(ListBackendsResponse { backends }))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .pool
            .models()
            .iter()
            .map(|route| Model {
                name: route.model.clone(),
                backends: route
                    .endpoints
                    .iter()
                    .map(|e| e.address().to_owned())
                    .collect(),
                decoupled: route.decoupled,
                policy: route.policy.kind().as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}
