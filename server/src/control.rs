//! The control path: every change to the running gateway — from the admin API, a config
//! reload (SIGHUP, the file changing on disk, or `ReloadConfig`), or DNS discovery —
//! goes through [`Control`], and every change is published as an event. Beside the
//! request path: calls in flight keep the state they started with; new calls see the
//! change.
//!
//! A reload is validated in full before anything is applied; a bad file changes
//! nothing. Backends that stay keep their connections, load reports, health history and
//! circuit state: only the differences (added, removed, re-weighted backends; changed
//! model tables) are applied.

use crate::config::LoadConfig;
use crate::config::{BackendConfig, Config, ConfigError, ModelConfig, PolicyKind};
use crate::endpoint::Endpoint;
use crate::health::{self, Publisher};
use crate::load_report;
use crate::path::Gateway;
use crate::pool::Pool;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a control operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// No backend or model by that name.
    NotFound(String),
    /// The request or configuration is not valid.
    Invalid(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::NotFound(m) | ControlError::Invalid(m) => f.write_str(m),
        }
    }
}

/// What background work a new backend needs, and where its health is published.
pub struct Tasks {
    /// Health check settings.
    pub health: crate::config::HealthConfig,
    /// Publishes the gateway's own health.
    pub publisher: Arc<Publisher>,
    /// Load report settings.
    pub load: Arc<LoadConfig>,
    /// Ends every task on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// The single path of changes to a running gateway.
pub struct Control {
    pool: Arc<Pool>,
    gateway: Arc<Gateway>,
    config: RwLock<Config>,
    path: Option<PathBuf>,
    tasks: Tasks,
}

fn not_found(address: &str) -> ControlError {
    ControlError::NotFound(format!("no backend `{address}` in the pool"))
}

impl Control {
    /// Control over a started gateway.
    pub fn new(
        pool: Arc<Pool>,
        gateway: Arc<Gateway>,
        config: Config,
        path: Option<PathBuf>,
        tasks: Tasks,
    ) -> Arc<Control> {
        Arc::new(Control {
            pool,
            gateway,
            config: RwLock::new(config),
            path,
            tasks,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// Its file, if any.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The gateway state.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Adds a backend (slow start) and starts its health and load-report tasks.
    pub fn add_backend(
        &self,
        backend: BackendConfig,
        source: &str,
    ) -> Result<Arc<Endpoint>, ControlError> {
        crate::config::parse_host_port(backend.host_port()).map_err(ControlError::Invalid)?;
        if self.pool.endpoint(backend.host_port()).is_some() {
            return Err(ControlError::Invalid(format!(
                "backend `{}` is already in the pool",
                backend.address
            )));
        }
        let endpoint = Endpoint::from_config(
            &backend,
            source,
            true,
            self.pool.breaker_config(),
            self.pool.connection_config(),
            self.pool.backend_tls_config(),
        )
        .map_err(ControlError::Invalid)?;
        self.pool.add(Arc::clone(&endpoint));
        health::spawn_for(
            &self.pool,
            &endpoint,
            &self.tasks.health,
            &self.tasks.publisher,
            &self.tasks.shutdown,
        );
        load_report::spawn_for(&endpoint, &self.tasks.load, &self.tasks.shutdown);
        // Learn its models and health now rather than an interval from now.
        let (pool, e, publisher, timeout) = (
            Arc::clone(&self.pool),
            Arc::clone(&endpoint),
            Arc::clone(&self.tasks.publisher),
            self.tasks.health.timeout(),
        );
        tokio::spawn(async move {
            if crate::health::check(&e, timeout).await.is_ok() {
                e.set_health(crate::endpoint::Health::Ready);
            }
            if let Ok(models) = crate::discovery::index(&e, timeout).await {
                pool.update_models(&e, models);
            }
            publisher.publish(&pool).await;
        });
        self.pool.events().publish(
            "backend_added",
            &backend.address,
            "",
            format!("added by {source} (slow start)"),
        );
        Ok(endpoint)
    }

    /// Stops new calls to a backend and waits (up to `timeout`) for its calls in flight
    /// to end. Returns whether it became idle, the calls left, and the time waited.
    pub async fn drain(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<(bool, u64, Duration), ControlError> {
        let endpoint = self
            .pool
            .endpoint(address)
            .ok_or_else(|| not_found(address))?;
        if !endpoint.is_draining() {
            endpoint.set_draining(true);
            self.pool.events().publish(
                "backend_draining",
                address,
                "",
                format!("draining: {} calls in flight", endpoint.in_flight()),
            );
            self.tasks.publisher.publish(&self.pool).await;
        }
        let began = Instant::now();
        let deadline = began + timeout;
        while endpoint.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = endpoint.in_flight();
        Ok((left == 0, left, began.elapsed()))
    }

    /// Sends calls to a drained backend again.
    pub async fn undrain(&self, address: &str) -> Result<(), ControlError> {
        let endpoint = self
            .pool
            .endpoint(address)
            .ok_or_else(|| not_found(address))?;
        endpoint.set_draining(false);
        self.pool
            .events()
            .publish("backend_undrained", address, "", "takes new calls again");
        self.tasks.publisher.publish(&self.pool).await;
        Ok(())
    }

    /// Drains a backend, then removes it. Returns the calls still in flight at removal.
    pub async fn remove_backend(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<u64, ControlError> {
        let (_, left, waited) = self.drain(address, timeout).await?;
        if self
            .pool
            .endpoint(address)
            .is_some_and(|e| !e.is_draining())
        {
            // Undrained meanwhile (re-added by discovery, or by an operator): it stays.
            return Ok(left);
        }
        self.pool.remove(address);
        self.pool.events().publish(
            "backend_removed",
            address,
            "",
            format!(
                "removed after draining for {} ms ({left} calls left)",
                waited.as_millis()
            ),
        );
        self.tasks.publisher.publish(&self.pool).await;
        Ok(left)
    }

    /// Ejects a backend by hand.
    pub fn eject(
        &self,
        address: &str,
        reason: &str,
        duration: Duration,
    ) -> Result<Arc<Endpoint>, ControlError> {
        let endpoint = self
            .pool
            .endpoint(address)
            .ok_or_else(|| not_found(address))?;
        let reason = if reason.is_empty() {
            "ejected by an operator"
        } else {
            reason
        };
        self.pool
            .eject(address, reason, duration)
            .map_err(ControlError::Invalid)?;
        Ok(endpoint)
    }

    /// Readmits a backend.
    pub fn readmit(&self, address: &str) -> Result<Arc<Endpoint>, ControlError> {
        let endpoint = self
            .pool
            .endpoint(address)
            .ok_or_else(|| not_found(address))?;
        self.pool.readmit(address);
        Ok(endpoint)
    }

    /// Sets a backend's weight.
    pub fn set_weight(&self, address: &str, weight: u32) -> Result<Arc<Endpoint>, ControlError> {
        if weight == 0 {
            return Err(ControlError::Invalid("weight must be at least 1".into()));
        }
        let endpoint = self
            .pool
            .endpoint(address)
            .ok_or_else(|| not_found(address))?;
        let old = endpoint.weight();
        endpoint.set_weight(weight);
        self.pool.events().publish(
            "weight_changed",
            address,
            "",
            format!("weight {old} -> {weight}"),
        );
        Ok(endpoint)
    }

    /// Changes a model's policy and limits; `change` edits its current table.
    pub fn update_model(
        &self,
        model: &str,
        policy: Option<PolicyKind>,
        change: impl FnOnce(&mut ModelConfig),
    ) -> Result<(), ControlError> {
        if self.pool.known_route(model).is_none() {
            return Err(ControlError::NotFound(format!(
                "no backend serves a model named `{model}`"
            )));
        }
        let mut table = self.config().models.get(model).cloned().unwrap_or_default();
        if let Some(kind) = policy {
            table.policy = Some(kind);
        }
        change(&mut table);
        let mut candidate = self.config();
        candidate.models.insert(model.to_owned(), table.clone());
        candidate
            .validate("UpdateModel")
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.gateway
            .models
            .update(model, table.clone())
            .map_err(ControlError::Invalid)?;
        if let Some(kind) = table.policy {
            self.pool.set_model_policy(model, kind);
        }
        if let Ok(mut config) = self.config.write() {
            config.models.insert(model.to_owned(), table);
        }
        self.pool.events().publish(
            "model_updated",
            "",
            model,
            "policy or limits changed at run time",
        );
        Ok(())
    }

    /// Validates `text` (or the file, re-read, when None) and applies the differences.
    /// Returns what changed and what needs a restart; on error nothing changed.
    pub async fn reload(
        &self,
        text: Option<String>,
    ) -> Result<(Vec<String>, Vec<String>), ControlError> {
        let (text, source) = match text {
            Some(t) => (t, "ReloadConfig".to_owned()),
            None => {
                let path = self.path.as_ref().ok_or_else(|| {
                    ControlError::Invalid(
                        "the gateway was started without --config: send the TOML to apply".into(),
                    )
                })?;
                let t =
                    Config::read_file(path).map_err(|e| ControlError::Invalid(e.to_string()))?;
                (t, path.display().to_string())
            }
        };
        let mut next =
            Config::parse(&text, &source).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let current = self.config();
        // Addresses come from the command line and stay as started.
        next.listen = current.listen;
        next.admin_listen = current.admin_listen;
        next.metrics_listen = current.metrics_listen;
        next.worker_threads = current.worker_threads;
        if next.admin.token.is_none() {
            next.admin.token.clone_from(&current.admin.token);
        }
        next.restore_secrets(&current).map_err(|e| {
            ControlError::Invalid(
                ConfigError {
                    source: source.clone(),
                    field: e.path,
                    reason: e.reason,
                }
                .to_string(),
            )
        })?;
        next.validate(&source)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;

        let mut changes = Vec::new();
        let mut needs_restart = Vec::new();
        for (what, differs) in [
            ("health", next.health != current.health),
            ("load", next.load != current.load),
            ("outlier", next.outlier != current.outlier),
            ("breaker", next.breaker != current.breaker),
            ("balancer", next.balancer != current.balancer),
            ("tenants", next.tenants != current.tenants),
            ("rate_limit", next.rate_limit != current.rate_limit),
            (
                "max_message_bytes",
                next.max_message_bytes != current.max_message_bytes,
            ),
            ("backend_connection", next.backend_connection != current.backend_connection),
            ("redis", next.redis != current.redis),
            (
                "admin.token, admin.allowed_identities",
                next.admin.token != current.admin.token
                    || next.admin.allowed_identities != current.admin.allowed_identities,
            ),
            (
                "sequences.max_pinned, sequences.hash_seed",
                next.sequences.max_pinned != current.sequences.max_pinned
                    || next.sequences.hash_seed != current.sequences.hash_seed,
            ),
            (
                "client limits (max_buffered_request_bytes, max_concurrent_streams, \
                 max_header_list_bytes, max_client_connections, client_*_ms, request_read_timeout_ms)",
                next.max_buffered_request_bytes != current.max_buffered_request_bytes
                    || next.max_buffered_request_bytes_per_connection
                        != current.max_buffered_request_bytes_per_connection
                    || next.request_read_timeout_ms != current.request_read_timeout_ms
                    || next.max_concurrent_streams != current.max_concurrent_streams
                    || next.max_header_list_bytes != current.max_header_list_bytes
                    || next.max_client_connections != current.max_client_connections
                    || next.client_handshake_timeout_ms != current.client_handshake_timeout_ms
                    || next.client_idle_timeout_ms != current.client_idle_timeout_ms
                    || next.client_keepalive_interval_ms != current.client_keepalive_interval_ms
                    || next.client_keepalive_timeout_ms != current.client_keepalive_timeout_ms,
            ),
        ] {
            if differs {
                needs_restart.push(what.to_owned());
            }
        }
        // Backends: add the new, re-weight the changed, drain and remove the gone.
        for backend in &next.backends {
            match current
                .backends
                .iter()
                .find(|b| b.address == backend.address)
            {
                None => {
                    self.add_backend(backend.clone(), "config")?;
                    changes.push(format!("added backend {}", backend.address));
                }
                Some(old) => {
                    if old.weight != backend.weight {
                        self.set_weight(&backend.address, backend.weight)?;
                        changes.push(format!(
                            "backend {} weight {} -> {}",
                            backend.address, old.weight, backend.weight
                        ));
                    }
                    if old.capacity != backend.capacity {
                        if let Some(e) = self.pool.endpoint(&backend.address) {
                            e.set_capacity(backend.capacity);
                        }
                        let show =
                            |c: Option<u32>| c.map_or("learned".to_owned(), |c| c.to_string());
                        changes.push(format!(
                            "backend {} capacity {} -> {}",
                            backend.address,
                            show(old.capacity),
                            show(backend.capacity)
                        ));
                    }
                }
            }
        }
        for old in &current.backends {
            if !next.backends.iter().any(|b| b.address == old.address) {
                changes.push(format!("removing backend {} (draining)", old.address));
                let address = old.address.clone();
                let control_pool = Arc::clone(&self.pool);
                if let Some(e) = control_pool.endpoint(&address) {
                    e.set_draining(true);
                }
                self.pool.events().publish(
                    "backend_draining",
                    &address,
                    "",
                    "removed from the config file",
                );
            }
        }
        // Models: every policy is made anew from the new file, as a fresh start would
        // make it (a table removed falls back to the defaults); new calls use it.
        let mut model_names: Vec<&String> =
            next.models.keys().chain(current.models.keys()).collect();
        model_names.sort();
        model_names.dedup();
        for name in model_names {
            match (current.models.get(name), next.models.get(name)) {
                (old, Some(table)) if old != Some(table) => {
                    if let Some(kind) = table.policy {
                        self.pool.set_model_policy(name, kind);
                    }
                    if old.map(|o| &o.prefix) != Some(&table.prefix) {
                        self.pool.set_model_prefix(name, table.prefix.clone());
                    }
                    changes.push(format!("model {name} settings updated"));
                }
                (Some(old), None) => {
                    if old.prefix.is_some() {
                        self.pool.set_model_prefix(name, None);
                    }
                    changes.push(format!("model {name} back to the default settings"));
                }
                _ => {}
            }
        }
        self.gateway
            .models
            .replace_config(&next)
            .map_err(ControlError::Invalid)?;
        self.gateway.cache.reconfigure(&next);
        if let Ok(mut config) = self.config.write() {
            *config = next.clone();
        }
        // Finish removals in the background: drained, then gone.
        for old in &current.backends {
            if !next.backends.iter().any(|b| b.address == old.address) {
                let pool = Arc::clone(&self.pool);
                let address = old.address.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while pool.endpoint(&address).is_some_and(|e| e.in_flight() > 0)
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    pool.remove(&address);
                    pool.events().publish(
                        "backend_removed",
                        &address,
                        "",
                        "removed from the config file",
                    );
                });
            }
        }
        let summary = if changes.is_empty() {
            "no change to apply".to_owned()
        } else {
            changes.join("; ")
        };
        self.pool
            .events()
            .publish("config_reloaded", "", "", format!("{source}: {summary}"));
        Ok((changes, needs_restart))
    }

    /// Reloads on SIGHUP and, when enabled, when the file's modification time changes.
    pub async fn watch_reloads(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let watch_file = self.config().admin.watch_config.unwrap_or(true);
        let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last = modified(&path);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            let reason = tokio::select! {
                _ = sighup => "SIGHUP",
                _ = tokio::time::sleep(Duration::from_secs(1)), if watch_file => "file changed",
                _ = shutdown.changed() => return,
            };
            if reason == "file changed" {
                let now = modified(&path);
                if now == last {
                    continue;
                }
                last = now;
            }
            match self.reload(None).await {
                Ok((changes, restart)) => {
                    tracing::info!(?changes, ?restart, "configuration reloaded ({reason})")
                }
                Err(e) => {
                    tracing::error!("configuration reload refused ({reason}); the running configuration stays: {e}");
                    self.pool
                        .events()
                        .publish("config_rejected", "", "", e.to_string());
                }
            }
        }
    }
}
