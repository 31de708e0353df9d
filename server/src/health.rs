//! Active health checking of backends. Runs beside the request path; its only effect on
//! calls is the [`Health`] it sets on each endpoint, which the balancer reads.
//!
//! A backend that offers `grpc.health.v1.Health/Watch` is followed on a Watch stream: its
//! pushes flip health at once. Otherwise (UNIMPLEMENTED) a check is `Check` for the
//! whole server (service ""), and a backend without the health service is asked
//! `ServerReady` instead. A backend
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
use infergate_proto::inference::{ModelReadyRequest, ServerReadyRequest};
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
        HealthClient::new(endpoint.connection()).check(request),
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
                GrpcInferenceServiceClient::new(endpoint.connection())
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
        Ok(Err(status)) => Err(failed("health check", &status)),
    }
}

/// The reason a health call (`what`: a Check or the Watch) that ended in `status`
/// gives, for Check and Watch alike: UNAVAILABLE, UNKNOWN and CANCELLED are the
/// transport's (the backend could not be reached; tonic reports a connection that dies
/// under a call, a TLS handshake refused after it seemed done, as CANCELLED, and the
/// gateway never cancels its own checks: a timeout is reported as such), with the
/// causes under the status.
fn failed(what: &str, status: &tonic::Status) -> String {
    if matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) {
        format!("backend unreachable: {}", with_causes(status))
    } else {
        format!("{what} failed: {:?} {}", status.code(), status.message())
    }
}

/// A failed check's status message with the errors under it.
fn with_causes(status: &tonic::Status) -> String {
    infergate_base::text::with_causes(status.message().to_owned(), status)
}

/// Keeps the gateway's own `grpc.health.v1` entries in step with the pool; an entry is
/// set only when it changes, so Watch streams see transitions, not repeats.
pub struct Publisher {
    reporter: HealthReporter,
    published: tokio::sync::Mutex<HashMap<String, bool>>,
}

impl Publisher {
    /// A publisher over the health service's reporter.
    pub fn new(reporter: HealthReporter) -> Arc<Publisher> {
        Arc::new(Publisher {
            reporter,
            published: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Sets "" (any backend ready) and one entry per model (an eligible backend serves it).
    pub async fn publish(&self, pool: &Pool) {
        let mut states = vec![(String::new(), pool.any_ready())];
        for route in pool.models() {
            let up = route.endpoints.iter().any(|e| e.is_eligible());
            states.push((route.model.clone(), up));
        }
        let mut published = self.published.lock().await;
        for (service, up) in states {
            if published.insert(service.clone(), up) != Some(up) {
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                self.reporter.set_service_status(&service, status).await;
            }
        }
    }
}

/// The health checker of a pool.
pub struct Checker {
    pool: Arc<Pool>,
    cfg: HealthConfig,
    publisher: Arc<Publisher>,
}

impl Checker {
    /// A checker that also keeps the gateway's own health service up to date.
    pub fn new(pool: Arc<Pool>, cfg: HealthConfig, reporter: HealthReporter) -> Self {
        Checker {
            pool,
            cfg,
            publisher: Publisher::new(reporter),
        }
    }

    /// Checks every backend once, at once (used before the gateway takes traffic).
    pub async fn round(&mut self) {
        let endpoints = self.pool.endpoints();
        let jobs = endpoints.iter().map(|e| {
            let mut state = EndpointCheck::default();
            let pool = Arc::clone(&self.pool);
            let cfg = self.cfg.clone();
            async move { state.check_once(&pool, e, &cfg).await }
        });
        futures_util::future::join_all(jobs).await;
        self.publish().await;
    }

    /// Publishes the gateway's health from the pool.
    pub async fn publish(&mut self) {
        self.publisher.publish(&self.pool).await;
    }

    /// Starts one checking loop per backend; they end on shutdown or when the backend
    /// leaves the pool. Also republishes whenever the pool's routes change, so a model
    /// learned after start (a backend that came up after the gateway, a model a
    /// backend loaded) has its health entry as soon as it has a route.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let (pool, publisher, mut stop) = (
            Arc::clone(&self.pool),
            Arc::clone(&self.publisher),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut routes = pool.routes_changed();
            loop {
                tokio::select! {
                    changed = routes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        publisher.publish(&pool).await;
                    }
                    _ = stop.changed() => return,
                }
            }
        });
        for endpoint in self.pool.endpoints() {
            spawn_for(&self.pool, &endpoint, &self.cfg, &self.publisher, &shutdown);
        }
    }

    /// The publisher (to start loops for backends added later).
    pub fn publisher(&self) -> Arc<Publisher> {
        Arc::clone(&self.publisher)
    }
}

/// Starts the checking loop of one backend.
pub fn spawn_for(
    pool: &Arc<Pool>,
    endpoint: &Arc<Endpoint>,
    cfg: &HealthConfig,
    publisher: &Arc<Publisher>,
    shutdown: &watch::Receiver<bool>,
) {
    let (pool, endpoint, cfg, publisher, mut shutdown) = (
        Arc::clone(pool),
        Arc::downgrade(endpoint),
        cfg.clone(),
        Arc::clone(publisher),
        shutdown.clone(),
    );
    tokio::spawn(async move {
        let mut state = EndpointCheck::default();
        let mut rng = fastrand::Rng::new();
        // Start at once (after the jitter): a Watch stream should be open from the start.
        let mut wait = Duration::from_millis(rng.u64(0..=cfg.initial_jitter_ms));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            let Some(e) = endpoint.upgrade() else { return };
            if !pool.endpoints().iter().any(|x| Arc::ptr_eq(x, &e)) {
                return;
            }
            if state.watch_supported {
                match state
                    .watch(&pool, &e, &cfg, &publisher, &mut shutdown)
                    .await
                {
                    WatchEnd::Shutdown => return,
                    WatchEnd::Unsupported => state.watch_supported = false,
                    WatchEnd::Broken => {
                        wait = state.next_wait(&e, &cfg, &mut rng);
                        continue;
                    }
                }
            }
            let changed = state.check_once(&pool, &e, &cfg).await;
            if changed {
                publisher.publish(&pool).await;
            }
            wait = state.next_wait(&e, &cfg, &mut rng);
        }
    });
}

/// How a Watch stream ended.
enum WatchEnd {
    /// The gateway is stopping.
    Shutdown,
    /// The backend does not offer Watch: poll with Check from now on.
    Unsupported,
    /// The stream could not be opened or broke: counted as a failed check.
    Broken,
}

/// One backend's checking state: threshold counters and connection backoff.
struct EndpointCheck {
    thresholds: Thresholds,
    unreachable_streak: u32,
    /// Whether to try `grpc.health.v1.Health/Watch` (until the backend says UNIMPLEMENTED).
    watch_supported: bool,
}

impl Default for EndpointCheck {
    fn default() -> Self {
        EndpointCheck {
            thresholds: Thresholds::default(),
            unreachable_streak: 0,
            watch_supported: true,
        }
    }
}

impl EndpointCheck {
    /// Follows the backend's `Watch` stream: each push is authoritative and flips health
    /// at once; `ModelReady` is still checked every interval. Returns when the stream
    /// ends, breaks, is not offered, or the gateway stops.
    async fn watch(
        &mut self,
        pool: &Pool,
        e: &Endpoint,
        cfg: &HealthConfig,
        publisher: &Publisher,
        shutdown: &mut watch::Receiver<bool>,
    ) -> WatchEnd {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let opened = tokio::time::timeout(
            cfg.timeout(),
            HealthClient::new(e.connection()).watch(request),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                return WatchEnd::Unsupported
            }
            Ok(Err(status)) => {
                if self.apply(pool, e, cfg, Err(failed("health watch", &status))) {
                    publisher.publish(pool).await;
                }
                return WatchEnd::Broken;
            }
            Err(_) => {
                if self.apply(pool, e, cfg, Err("health watch timed out".into())) {
                    publisher.publish(pool).await;
                }
                return WatchEnd::Broken;
            }
        };
        let mut ticker = tokio::time::interval(cfg.interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.message() => {
                    let changed = match message {
                        Ok(Some(update)) => {
                            let serving = update.status() == ServingStatus::Serving;
                            self.unreachable_streak = 0;
                            self.thresholds = Thresholds::default();
                            let next = if serving { Health::Ready } else { Health::NotReady };
                            let reason = format!("grpc.health.v1 Watch says {}", update.status().as_str_name());
                            self.flip(pool, e, next, &reason)
                        }
                        Ok(None) | Err(_) => {
                            let changed = self.apply(pool, e, cfg, Err("health watch stream ended".into()));
                            if changed {
                                publisher.publish(pool).await;
                            }
                            return WatchEnd::Broken;
                        }
                    };
                    if changed {
                        publisher.publish(pool).await;
                    }
                }
                _ = ticker.tick() => {
                    if !pool.endpoints().iter().any(|x| std::ptr::eq(x.as_ref(), e)) {
                        return WatchEnd::Shutdown;
                    }
                    if e.health() == Health::Ready && cfg.model_checks && self.check_models(pool, e, cfg).await {
                        publisher.publish(pool).await;
                    }
                }
                _ = shutdown.changed() => return WatchEnd::Shutdown,
            }
        }
    }

    /// Sets health to `next` if it differs, with the event and metric; true if changed.
    fn flip(&self, pool: &Pool, e: &Endpoint, next: Health, reason: &str) -> bool {
        if e.health() == next {
            return false;
        }
        let previous = e.set_health(next);
        pool.events().publish(
            "health_changed",
            e.address(),
            "",
            format!(
                "backend is {} (was {}): {reason}",
                next.as_str(),
                previous.as_str()
            ),
        );
        pool.update_panic();
        true
    }

    /// Feeds one check result through the thresholds; true if health flipped.
    fn apply(
        &mut self,
        pool: &Pool,
        e: &Endpoint,
        cfg: &HealthConfig,
        result: Result<(), String>,
    ) -> bool {
        let unreachable = result
            .as_ref()
            .err()
            .is_some_and(|reason| reason.contains("unreachable") || reason.contains("timed out"));
        e.set_check_failure(result.as_ref().err().map(String::as_str), unreachable);
        self.unreachable_streak = if unreachable {
            self.unreachable_streak + 1
        } else {
            0
        };
        match self.thresholds.observe(e.health(), result.is_ok(), cfg) {
            Some(next) => {
                let reason = match &result {
                    Ok(()) => "checks pass".to_owned(),
                    Err(reason) => reason.clone(),
                };
                self.flip(pool, e, next, &reason)
            }
            None => false,
        }
    }

    /// `ModelReady` for every model the backend serves; true if any changed.
    async fn check_models(&self, pool: &Pool, e: &Endpoint, cfg: &HealthConfig) -> bool {
        let mut changed = false;
        for model in e.models() {
            let request = ModelReadyRequest {
                name: model.clone(),
                version: String::new(),
            };
            let ready = tokio::time::timeout(
                cfg.timeout(),
                GrpcInferenceServiceClient::new(e.connection()).model_ready(request),
            )
            .await;
            let ready = match ready {
                Ok(Ok(r)) => r.into_inner().ready,
                // A backend without ModelReady is judged by its server health alone.
                Ok(Err(s)) if s.code() == Code::Unimplemented => true,
                _ => continue,
            };
            if e.set_model_ready(&model, ready) {
                changed = true;
                let what = if ready {
                    "ready again"
                } else {
                    "not ready (ModelReady false)"
                };
                pool.events().publish(
                    "model_health_changed",
                    e.address(),
                    &model,
                    format!("model {model} is {what} on this backend"),
                );
            }
        }
        changed
    }

    /// Checks the backend (and its models); returns true if anything visible changed.
    async fn check_once(&mut self, pool: &Pool, e: &Endpoint, cfg: &HealthConfig) -> bool {
        let result = check(e, cfg.timeout()).await;
        let passed = result.is_ok();
        let mut changed = self.apply(pool, e, cfg, result);
        if passed && cfg.model_checks {
            changed |= self.check_models(pool, e, cfg).await;
        }
        changed
    }

    /// Time to the next check: the interval (plus jitter) while ready; the faster
    /// unhealthy interval while not, backing off (doubling up to the interval) while
    /// the backend cannot be reached at all.
    fn next_wait(&self, e: &Endpoint, cfg: &HealthConfig, rng: &mut fastrand::Rng) -> Duration {
        let jitter = Duration::from_millis(rng.u64(0..=cfg.interval_jitter_ms));
        if e.health() == Health::Ready {
            return cfg.interval() + jitter;
        }
        let base = Duration::from_millis(cfg.unhealthy_interval_ms);
        let backoff = base.saturating_mul(1 << self.unreachable_streak.saturating_sub(1).min(6));
        backoff.min(cfg.interval().max(base)) + jitter
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
