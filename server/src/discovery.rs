//! Discovery: which backend serves which model, asked of the endpoints it is given (the
//! pool's refresh loop, [`crate::pool::Pool::refresh_models`], and its on-demand probe
//! when a call names a model the pool has not seen). Sits below the pool.
//!
//! Sources, in order of authority: the config file (`backends[].models`, never
//! overridden), the backend's own `RepositoryIndex` (re-read every
//! `discovery.refresh_interval_ms`), and `ModelReady` probes for a model nobody has
//! listed (servers without `RepositoryIndex`, such as some KServe runtimes, are covered
//! by this). Whether a model is decoupled comes from config or from its `ModelConfig`.

use crate::endpoint::Endpoint;
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::{ModelConfigRequest, ModelReadyRequest, RepositoryIndexRequest};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

fn client(endpoint: &Endpoint) -> GrpcInferenceServiceClient<crate::connection::Connection> {
    GrpcInferenceServiceClient::new(endpoint.connection())
}

/// Asks every endpoint `ModelReady(model)` at once; returns those that said yes.
pub async fn probe_model(
    endpoints: &[Arc<Endpoint>],
    model: &str,
    timeout: Duration,
) -> Vec<Arc<Endpoint>> {
    let probes = endpoints.iter().map(|endpoint| async move {
        let request = ModelReadyRequest {
            name: model.to_owned(),
            version: String::new(),
        };
        let ready = tokio::time::timeout(timeout, client(endpoint).model_ready(request))
            .await
            .ok()
            .and_then(|r| r.ok())
            .is_some_and(|r| r.into_inner().ready);
        ready.then(|| Arc::clone(endpoint))
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Reads `model_transaction_policy.decoupled` from the backend's `ModelConfig`.
pub async fn learn_decoupled(endpoint: &Endpoint, model: &str, timeout: Duration) -> Option<bool> {
    let request = ModelConfigRequest {
        name: model.to_owned(),
        version: String::new(),
    };
    let response = tokio::time::timeout(timeout, client(endpoint).model_config(request))
        .await
        .ok()?
        .ok()?;
    Some(
        response
            .into_inner()
            .config
            .and_then(|c| c.model_transaction_policy)
            .is_some_and(|p| p.decoupled),
    )
}

/// The models a backend's `RepositoryIndex` lists as ready. `Err` when the backend
/// cannot say (unreachable, or no such RPC).
pub async fn index(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<BTreeSet<String>, tonic::Status> {
    let request = RepositoryIndexRequest {
        repository_name: String::new(),
        ready: true,
    };
    let response = tokio::time::timeout(timeout, client(endpoint).repository_index(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("RepositoryIndex timed out"))??;
    Ok(response
        .into_inner()
        .models
        .into_iter()
        // Triton says `READY`; MLServer says `State.READY` (its enum's Python name).
        .filter(|m| {
            let state = m.state.rsplit('.').next().unwrap_or_default();
            m.state.is_empty() || state.eq_ignore_ascii_case("READY")
        })
        .map(|m| m.name)
        .collect())
}
