//! Active health checking of backends. Runs beside the request path; its only effect on
//! calls is the [`Health`] it sets on each endpoint, which the balancer reads.
//!
//! A check is `grpc.health.v1.Health/Check` for the whole server (service ""); a backend
//! without the health service (UNIMPLEMENTED) is asked `ServerReady` instead. A backend
//! that cannot be reached fails the check. Health flips only after
//! `healthy_threshold` / `unhealthy_threshold` results in a row, so one lost probe does
//! not eject a backend and one lucky probe does not readmit it.
//!
//! The gateway's own `grpc.health.v1` answers follow from the pool: "" is SERVING while
//! at least one backend is ready, and each model's entry while a ready backend serves it.

use crate::config::HealthConfig;
use crate::endpoint::{Endpoint, Health};
use crate::pool::Pool;
use infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate_proto::inference::ServerReadyRequest;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;

/// Consecutive-result counter that decides when health flips.
#[derive(Debug, Default, Clone)]
pub struct Thresholds {
    passes: u32,
    failures: u32,
}

impl Thresholds {
    /// Feeds one check result; returns the new health if it flips.
    pub fn observe(&mut self, current: Health, passed: bool, cfg: &HealthConfig) -> Option<Health> {
        if passed {
            self.passes += 1;
            self.failures = 0;
            (current != Health::Ready && self.passes >= cfg.healthy_threshold)
                .then_some(Health::Ready)
        } else {
            self.failures += 1;
            self.passes = 0;
            // A backend never seen healthy goes straight to not ready: there is nothing
            // to protect by waiting.
            let limit = if current == Health::Unknown {
                1
            } else {
                cfg.unhealthy_threshold
            };
            (current != Health::NotReady && self.failures >= limit).then_some(Health::NotReady)
        }
    }
}

/// One check of one backend: true if it can take calls.
pub async fn check(endpoint: &Endpoint, timeout: Duration) -> Result<(), String> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let health = tokio::time::timeout(
        timeout,
        HealthClient::new(endpoint.channel()).check(request),
    )
    .await;
    match health {
        Err(_) => Err(format!("health check timed out after {timeout:?}")),
        Ok(Ok(response)) => {
            let status = response.into_inner().status();
            if status == ServingStatus::Serving {
                Ok(())
            } else {
                Err(format!("grpc.health.v1 says {}", status.as_str_name()))
            }
        }
        Ok(Err(status)) if status.code() == Code::Unimplemented => {
            let ready = tokio::time::timeout(
                timeout,
                GrpcInferenceServiceClient::new(endpoint.channel())
                    .server_ready(ServerReadyRequest {}),
            )
            .await
            .map_err(|_| format!("ServerReady timed out after {timeout:?}"))?
            .map_err(|s| format!("ServerReady failed: {:?} {}", s.code(), s.message()))?;
            if ready.into_inner().ready {
                Ok(())
            } else {
                Err("ServerReady says not ready".into())
            }
        }
        Ok(Err(status)) => Err(format!(
            "health check failed: {:?} {}",
            status.code(),
            status.message()
        )),
    }
}

/// The health checker of a pool: checks every backend each interval.
pub struct Checker {
    pool: Arc<Pool>,
    cfg: HealthConfig,
    reporter: HealthReporter,
    counters: HashMap<String, Thresholds>,
    /// What was last published per health service name, so Watch streams see changes
    /// only.
    published: HashMap<String, bool>,
}

impl Checker {
    /// A checker that also keeps the gateway's own health service up to date.
    pub fn new(pool: Arc<Pool>, cfg: HealthConfig, reporter: HealthReporter) -> Self {
        Checker {
            pool,
            cfg,
            reporter,
            counters: HashMap::new(),
            published: HashMap::new(),
        }
    }

    /// Checks every backend once, applies thresholds and publishes the gateway's health.
    pub async fn round(&mut self) {
        let endpoints = self.pool.endpoints();
        let timeout = self.cfg.timeout();
        let results = futures_util::future::join_all(
            endpoints
                .iter()
                .map(|e| async move { (e, check(e, timeout).await) }),
        )
        .await;
        for (endpoint, result) in results {
            let counter = self
                .counters
                .entry(endpoint.address().to_owned())
                .or_default();
            if let Some(next) = counter.observe(endpoint.health(), result.is_ok(), &self.cfg) {
                let previous = endpoint.set_health(next);
                match &result {
                    Ok(()) => tracing::info!(
                        backend = endpoint.address(),
                        from = previous.as_str(),
                        "backend is ready"
                    ),
                    Err(reason) => tracing::warn!(
                        backend = endpoint.address(),
                        from = previous.as_str(),
                        "backend is not ready: {reason}"
                    ),
                }
            }
        }
        self.publish().await;
    }

    /// Sets the gateway's grpc.health.v1 entries from the pool.
    pub async fn publish(&mut self) {
        let status = |up: bool| {
            if up {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            }
        };
        let mut states = vec![(String::new(), self.pool.any_ready())];
        for route in self.pool.models() {
            let up = route.endpoints.iter().any(|e| e.is_eligible());
            states.push((route.model.clone(), up));
        }
        for (service, up) in states {
            if self.published.insert(service.clone(), up) != Some(up) {
                self.reporter.set_service_status(&service, status(up)).await;
            }
        }
    }

    /// Checks every interval until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval()) => self.round().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_consecutive_results() {
        let cfg = HealthConfig {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthConfig::default()
        };
        let mut t = Thresholds::default();
        assert_eq!(t.observe(Health::Unknown, true, &cfg), None);
        assert_eq!(t.observe(Health::Unknown, true, &cfg), Some(Health::Ready));
        assert_eq!(t.observe(Health::Ready, false, &cfg), None);
        assert_eq!(t.observe(Health::Ready, false, &cfg), None);
        assert_eq!(t.observe(Health::Ready, true, &cfg), None, "streak broken");
        for _ in 0..2 {
            assert_eq!(t.observe(Health::Ready, false, &cfg), None);
        }
        assert_eq!(
            t.observe(Health::Ready, false, &cfg),
            Some(Health::NotReady)
        );
        assert_eq!(
            t.observe(Health::NotReady, false, &cfg),
            None,
            "no repeat flip"
        );
    }

    #[test]
    fn unknown_backend_failing_is_not_ready_at_once() {
        let cfg = HealthConfig::default();
        let mut t = Thresholds::default();
        assert_eq!(
            t.observe(Health::Unknown, false, &cfg),
            Some(Health::NotReady)
        );
    }
}
