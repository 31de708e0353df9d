//! Events: every state change in the pool (backend added, removed, drained, health
//! flips, ejections, circuit transitions, panic mode, config reloads), published once
//! and seen three ways: a log line, a metric, and the admin API's event stream.
//! Beside the request path; publishing never blocks it.
//!
//! The bus is a bounded broadcast channel: a watcher that falls behind does not slow
//! the gateway; it is told how many events it missed instead.

use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// One state change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What happened, e.g. `backend_ejected`, `circuit_opened`, `health_changed`.
    pub kind: String,
    /// The backend concerned, empty for pool-wide events.
    pub backend: String,
    /// The model concerned, empty when none.
    pub model: String,
    /// Why, in words.
    pub reason: String,
}

/// The event bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(1024)
    }
}

impl EventBus {
    /// A bus that keeps up to `capacity` events for slow watchers.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// Publishes an event: logs it, counts it, and sends it to watchers.
    pub fn publish(&self, kind: &str, backend: &str, model: &str, reason: impl Into<String>) {
        let reason = reason.into();
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        tracing::info!(event = kind, backend, model, "{reason}");
        metrics::counter!("infergate_events_total", "kind" => kind.to_owned()).increment(1);
        let _ = self.tx.send(Event {
            at_unix_ms,
            kind: kind.to_owned(),
            backend: backend.to_owned(),
            model: model.to_owned(),
            reason,
        });
    }

    /// A new watcher, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slow_watchers_are_told_what_they_missed() {
        let bus = EventBus::new(2);
        let mut rx = bus.subscribe();
        for i in 0..5 {
            bus.publish("health_changed", "b", "", format!("change {i}"));
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 3),
            other => panic!("expected a lag notice, got {other:?}"),
        }
        assert_eq!(rx.recv().await.expect("event").reason, "change 3");
    }
}
