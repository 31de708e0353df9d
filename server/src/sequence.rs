//! Stateful sequences, at the pick step of the request path: every request of one
//! Triton sequence (`sequence_id`, peeked by `wire::peek_route`) goes to the one backend
//! that holds the sequence's state.
//!
//! Why: a stateful model (Triton's sequence batcher) keeps state per sequence in one
//! instance. Balanced call by call, a sequence spread over three backends silently
//! computes garbage.
//!
//! How the backend is chosen: rendezvous (highest-random-weight) hashing of the model,
//! the sequence id and each backend's address, with XXH3 and a configured seed
//! (`[sequences] hash_seed`). The backend with the highest hash wins. Two gateway
//! replicas that see the same backends therefore choose the same one without sharing
//! anything, and when a backend joins only the sequences it now wins move (about 1/n of
//! them), against nearly all with `hash mod n`. A sequence's first request
//! (`sequence_start`) takes the first backend in that order that can take a call now;
//! a request of a sequence this gateway has no pin for (another replica saw its start,
//! or this one restarted) goes to the first in the order, whatever its state, so that
//! it reaches the backend that replicas agree on.
//!
//! Why a table as well: a backend that joins wins some running sequences' hashes, and
//! their state is not there. The table keeps each running sequence on the backend it
//! started on; it is bounded (`max_pinned`; past it a new sequence goes by the hash
//! alone) and a pin ends at `sequence_end` or after the model's idle time
//! (`sequence_idle_ms`, 1 s by default as Triton's `max_sequence_idle_microseconds`).
//!
//! What happens on loss: a pinned backend that is ejected, draining, not ready or gone
//! from the pool, or that an attempt could not reach, has lost the sequence (or may
//! have). Its next request fails with FAILED_PRECONDITION naming the sequence, the
//! backend and what happened, and so does every later request of the sequence until a
//! `sequence_start` re-pins it (anywhere) or the idle time passes: a sequence is never
//! moved silently. Retries and hedges never move a sequence either: the request path
//! sends a sequenced call once.
//!
//! Hand-written, since it is one hash per backend and a map; the hash is the
//! `xxhash-rust` crate's XXH3.

use crate::config::SequenceConfig;
use crate::endpoint::{Endpoint, Unavailable};
use crate::wire::{SequenceId, SequenceKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The rendezvous score of `address` for sequence `id` of `model`.
pub fn score(seed: u64, model: &str, id: &SequenceId, address: &str) -> u64 {
    let mut key = Vec::with_capacity(model.len() + address.len() + 24);
    key.extend_from_slice(model.as_bytes());
    key.push(0xff);
    match id {
        SequenceId::Int(v) => {
            key.push(b'i');
            key.extend_from_slice(&v.to_le_bytes());
        }
        SequenceId::Text(s) => {
            key.push(b's');
            key.extend_from_slice(&(s.len() as u64).to_le_bytes());
            key.extend_from_slice(s.as_bytes());
        }
    }
    key.push(0xff);
    key.extend_from_slice(address.as_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(&key, seed)
}

/// `endpoints` in rendezvous order for the sequence: highest score first (ties, which
/// need equal hashes of different addresses, by address).
pub fn rendezvous_order(
    seed: u64,
    model: &str,
    id: &SequenceId,
    endpoints: &[Arc<Endpoint>],
) -> Vec<Arc<Endpoint>> {
    let mut scored: Vec<(u64, &Arc<Endpoint>)> = endpoints
        .iter()
        .map(|e| (score(seed, model, id, e.address()), e))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.address().cmp(b.1.address())));
    scored.into_iter().map(|(_, e)| Arc::clone(e)).collect()
}

/// Why a sequenced request is not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The backend holding the sequence lost it (or may have): FAILED_PRECONDITION.
    Lost {
        /// The sequence.
        id: SequenceId,
        /// The model.
        model: String,
        /// The backend it was pinned to.
        backend: String,
        /// What happened to it.
        why: String,
    },
    /// The sequence's backend cannot take a call for a moment (its circuit is open, it
    /// is not checked yet), but keeps the sequence: UNAVAILABLE, try again.
    Busy {
        /// The sequence.
        id: SequenceId,
        /// The model.
        model: String,
        /// Its backend.
        backend: String,
        /// Why it cannot take the call.
        why: &'static str,
    },
    /// A stream open on one backend carries a request of a sequence pinned to
    /// another: FAILED_PRECONDITION.
    OtherStream {
        /// The sequence.
        id: SequenceId,
        /// The model.
        model: String,
        /// The backend it is pinned to.
        pinned: String,
        /// The backend the stream is open on.
        stream: String,
    },
    /// No backend of the model can take a sequence's first request.
    NoneEligible,
}

impl Refused {
    /// The status the caller gets (NoneEligible is the pool's to word).
    pub fn status(&self) -> tonic::Status {
        match self {
            Refused::Lost {
                id,
                model,
                backend,
                why,
            } => tonic::Status::failed_precondition(format!(
                "sequence {id} of model '{}' was pinned to backend {backend}, which {why}: \
                 the sequence's state is lost and it is not moved to another backend; \
                 start it again with sequence_start",
                infergate_base::text::shown(model)
            )),
            Refused::Busy {
                id,
                model,
                backend,
                why,
            } => tonic::Status::unavailable(format!(
                "sequence {id} of model '{}' is pinned to backend {backend}, which cannot \
                 take a call now ({why}); the sequence stays there: try again",
                infergate_base::text::shown(model)
            )),
            Refused::OtherStream {
                id,
                model,
                pinned,
                stream,
            } => tonic::Status::failed_precondition(format!(
                "sequence {id} of model '{}' is pinned to backend {pinned}, but this stream \
                 is open on backend {stream}: send it on a stream of its own",
                infergate_base::text::shown(model)
            )),
            Refused::NoneEligible => {
                tonic::Status::unavailable("no backend can take the sequence's first request")
            }
        }
    }
}

/// Words for an unavailable pinned backend, and whether the sequence is lost with it.
fn loss(why: Unavailable) -> Option<&'static str> {
    match why {
        Unavailable::Draining => Some("is draining"),
        Unavailable::Ejected => Some("was ejected"),
        Unavailable::NotReady => Some("is not ready (failed its health checks)"),
        Unavailable::Unreachable => Some("is unreachable (its health checks cannot reach it)"),
        Unavailable::ModelNotReady => Some("no longer has the model ready"),
        Unavailable::Unchecked | Unavailable::CircuitOpen | Unavailable::ModelCircuitOpen => None,
    }
}

#[derive(Debug)]
struct Pin {
    endpoint: Arc<Endpoint>,
    last: Instant,
    idle: Duration,
    /// Set once the backend lost the sequence: what happened.
    lost: Option<String>,
}

impl Pin {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) >= self.idle
    }
}

type Key = (String, SequenceId);

/// One active pin, as the admin API and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinView {
    /// The model.
    pub model: String,
    /// The sequence.
    pub id: SequenceId,
    /// The backend it is pinned to.
    pub backend: String,
    /// Time since its last request.
    pub idle_for: Duration,
    /// What happened, when its backend lost it.
    pub lost: Option<String>,
}

/// The pins of one gateway.
#[derive(Debug)]
pub struct Sequences {
    seed: u64,
    capacity: usize,
    table: Mutex<HashMap<Key, Pin>>,
}

impl Sequences {
    /// An empty table with the settings of `config`.
    pub fn new(config: &SequenceConfig) -> Self {
        Sequences {
            seed: config.hash_seed,
            capacity: config.max_pinned.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The backend for a request of sequence `seq` of `model`, among the route's
    /// `endpoints`; `usable` is the pool's eligibility check. Pins, refreshes or ends
    /// the pin as the request says. The table's lock is held for map operations only:
    /// the rendezvous hashes (one per backend) are computed outside it.
    pub fn choose(
        &self,
        model: &str,
        seq: &SequenceKey,
        endpoints: &[Arc<Endpoint>],
        usable: &dyn Fn(&Endpoint) -> Result<(), Unavailable>,
        idle: Duration,
        now: Instant,
    ) -> Result<Arc<Endpoint>, Refused> {
        let key = (model.to_owned(), seq.id.clone());
        if let Some(pinned) = self.pinned(&key, seq, endpoints, usable, idle, now) {
            return pinned;
        }
        let order = rendezvous_order(self.seed, model, &seq.id, endpoints);
        let chosen = if seq.start {
            order
                .into_iter()
                .find(|e| usable(e).is_ok())
                .ok_or(Refused::NoneEligible)?
        } else {
            // Unpinned here: the backend every replica agrees on, or a clear refusal.
            let first = order.into_iter().next().ok_or(Refused::NoneEligible)?;
            if let Err(why) = usable(&first) {
                return Err(match loss(why) {
                    Some(words) => Refused::Lost {
                        id: seq.id.clone(),
                        model: model.to_owned(),
                        backend: first.address().to_owned(),
                        why: format!("{words} (chosen by rendezvous: not pinned here)"),
                    },
                    None => Refused::Busy {
                        id: seq.id.clone(),
                        model: model.to_owned(),
                        backend: first.address().to_owned(),
                        why: why.describe(),
                    },
                });
            }
            first
        };
        let Ok(mut table) = self.table.lock() else {
            return Ok(chosen);
        };
        if seq.end {
            table.remove(&key);
        } else {
            self.insert(&mut table, key, &chosen, idle, now);
        }
        Ok(chosen)
    }

    /// A request that is not a start, of a sequence pinned here: its backend, refreshed
    /// (or ended), or the refusal. None when the sequence has no live pin.
    fn pinned(
        &self,
        key: &Key,
        seq: &SequenceKey,
        endpoints: &[Arc<Endpoint>],
        usable: &dyn Fn(&Endpoint) -> Result<(), Unavailable>,
        idle: Duration,
        now: Instant,
    ) -> Option<Result<Arc<Endpoint>, Refused>> {
        let model = key.0.as_str();
        let Ok(mut table) = self.table.lock() else {
            return Some(Err(Refused::NoneEligible));
        };
        if table.get(key).is_some_and(|p| p.expired(now)) {
            table.remove(key);
        }
        if seq.start {
            return None;
        }
        let pin = table.get_mut(key)?;
        if let Some(why) = &pin.lost {
            let refused = Refused::Lost {
                id: seq.id.clone(),
                model: model.to_owned(),
                backend: pin.endpoint.address().to_owned(),
                why: why.clone(),
            };
            if seq.end {
                table.remove(key);
            }
            return Some(Err(refused));
        }
        if !endpoints.iter().any(|e| Arc::ptr_eq(e, &pin.endpoint)) {
            let why = "was removed from the pool (or no longer serves the model)";
            return Some(Err(self.lose(
                &mut table,
                key.clone(),
                seq,
                why.to_owned(),
                model,
            )));
        }
        if let Err(why) = usable(&pin.endpoint) {
            return Some(Err(match loss(why) {
                Some(words) => self.lose(&mut table, key.clone(), seq, words.to_owned(), model),
                None => Refused::Busy {
                    id: seq.id.clone(),
                    model: model.to_owned(),
                    backend: pin.endpoint.address().to_owned(),
                    why: why.describe(),
                },
            }));
        }
        pin.last = now;
        pin.idle = idle;
        let endpoint = Arc::clone(&pin.endpoint);
        if seq.end {
            table.remove(key);
        }
        Some(Ok(endpoint))
    }

    /// A request of sequence `seq` on a stream already open on `endpoint` (a stream
    /// stays on its backend): a start, or a sequence not pinned yet, is pinned there; a
    /// sequence pinned elsewhere, or lost, is refused.
    pub fn on_stream(
        &self,
        model: &str,
        seq: &SequenceKey,
        endpoint: &Arc<Endpoint>,
        idle: Duration,
        now: Instant,
    ) -> Result<(), Refused> {
        let key = (model.to_owned(), seq.id.clone());
        let Ok(mut table) = self.table.lock() else {
            return Ok(());
        };
        if table.get(&key).is_some_and(|p| p.expired(now)) {
            table.remove(&key);
        }
        if let (false, Some(pin)) = (seq.start, table.get_mut(&key)) {
            let refused = if let Some(why) = &pin.lost {
                Some(Refused::Lost {
                    id: seq.id.clone(),
                    model: model.to_owned(),
                    backend: pin.endpoint.address().to_owned(),
                    why: why.clone(),
                })
            } else if !Arc::ptr_eq(&pin.endpoint, endpoint) {
                Some(Refused::OtherStream {
                    id: seq.id.clone(),
                    model: model.to_owned(),
                    pinned: pin.endpoint.address().to_owned(),
                    stream: endpoint.address().to_owned(),
                })
            } else {
                pin.last = now;
                pin.idle = idle;
                None
            };
            if seq.end {
                table.remove(&key);
            }
            return refused.map_or(Ok(()), Err);
        }
        if seq.end {
            table.remove(&key);
        } else {
            self.insert(&mut table, key, endpoint, idle, now);
        }
        Ok(())
    }

    /// Marks the sequence lost on `backend` after an attempt there failed in a way that
    /// leaves its state unknown (not reached, no answer); returns the refusal to send.
    pub fn lost_on(
        &self,
        model: &str,
        seq: &SequenceKey,
        backend: &Arc<Endpoint>,
        why: String,
        now: Instant,
        idle: Duration,
    ) -> Refused {
        let key = (model.to_owned(), seq.id.clone());
        let Ok(mut table) = self.table.lock() else {
            return Refused::NoneEligible;
        };
        if !seq.end {
            self.insert(&mut table, key.clone(), backend, idle, now);
        }
        match table.get_mut(&key) {
            Some(pin) => self.lose_pin(pin, model, seq, why),
            None => {
                count_lost(model, backend.address());
                Refused::Lost {
                    id: seq.id.clone(),
                    model: model.to_owned(),
                    backend: backend.address().to_owned(),
                    why,
                }
            }
        }
    }

    fn lose(
        &self,
        table: &mut HashMap<Key, Pin>,
        key: Key,
        seq: &SequenceKey,
        why: String,
        model: &str,
    ) -> Refused {
        let Some(pin) = table.get_mut(&key) else {
            return Refused::NoneEligible;
        };
        let refused = self.lose_pin(pin, model, seq, why);
        if seq.end {
            table.remove(&key);
        }
        refused
    }

    fn lose_pin(&self, pin: &mut Pin, model: &str, seq: &SequenceKey, why: String) -> Refused {
        if pin.lost.is_none() {
            count_lost(model, pin.endpoint.address());
        }
        pin.lost = Some(why.clone());
        Refused::Lost {
            id: seq.id.clone(),
            model: model.to_owned(),
            backend: pin.endpoint.address().to_owned(),
            why,
        }
    }

    fn insert(
        &self,
        table: &mut HashMap<Key, Pin>,
        key: Key,
        endpoint: &Arc<Endpoint>,
        idle: Duration,
        now: Instant,
    ) {
        if !table.contains_key(&key) && table.len() >= self.capacity {
            table.retain(|_, p| !p.expired(now));
            if table.len() >= self.capacity {
                metrics::counter!("infergate_sequences_unpinned_total", "model" => key.0)
                    .increment(1);
                return;
            }
        }
        table.insert(
            key,
            Pin {
                endpoint: Arc::clone(endpoint),
                last: now,
                idle,
                lost: None,
            },
        );
    }

    /// The active pins at `now` (expired ones are dropped on the way), by model,
    /// backend and sequence.
    pub fn active(&self, now: Instant) -> Vec<PinView> {
        let Ok(mut table) = self.table.lock() else {
            return Vec::new();
        };
        table.retain(|_, p| !p.expired(now));
        let mut out: Vec<PinView> = table
            .iter()
            .map(|((model, id), p)| PinView {
                model: model.clone(),
                id: id.clone(),
                backend: p.endpoint.address().to_owned(),
                idle_for: now.saturating_duration_since(p.last),
                lost: p.lost.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.model, &a.backend, &a.id).cmp(&(&b.model, &b.backend, &b.id)));
        out
    }

    /// Pins held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Whether no pin is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn count_lost(model: &str, backend: &str) {
    metrics::counter!("infergate_sequences_lost_total", "model" => model.to_owned(), "backend" => backend.to_owned())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .filter_map(|i| {
                let address = format!("10.0.0.{}:8001", i + 1);
                Endpoint::new(&address, "test", vec!["accumulate".into(), "m".into()], 1).ok()
            })
            .collect()
    }

    fn ids(n: usize, rng: &mut fastrand::Rng) -> Vec<SequenceId> {
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    SequenceId::Int(rng.u64(1..))
                } else {
                    SequenceId::Text(format!("user-{}", rng.u64(..)))
                }
            })
            .collect()
    }

    fn top(seed: u64, id: &SequenceId, eps: &[Arc<Endpoint>]) -> String {
        rendezvous_order(seed, "accumulate", id, eps)[0]
            .address()
            .to_owned()
    }

    #[tokio::test]
    async fn rendezvous_spreads_and_moves_about_one_in_n_when_a_backend_joins() {
        let mut rng = fastrand::Rng::with_seed(19);
        let ids = ids(6000, &mut rng);
        let four = endpoints(5)[..4].to_vec();
        let five = endpoints(5);
        // The same seed and set always agree (two replicas); the order is by score.
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut moved = 0;
        for id in &ids {
            let before = top(7, id, &four);
            assert_eq!(before, top(7, id, &four));
            *counts.entry(before.clone()).or_default() += 1;
            let after = top(7, id, &five);
            if after != before {
                // Only to the newcomer.
                assert_eq!(after, five[4].address());
                moved += 1;
            }
        }
        // Spread: each of 4 backends within 10% of a quarter.
        for (backend, n) in &counts {
            let share = *n as f64 / ids.len() as f64;
            assert!((0.225..0.275).contains(&share), "{backend}: {share}");
        }
        // Joining: about 1/5 move (binomial, 6000 draws: ±3 sigma is ±0.016).
        let share = moved as f64 / ids.len() as f64;
        assert!((0.17..0.23).contains(&share), "{share}");
        // Another seed gives another, equally valid, placement.
        let differ = ids
            .iter()
            .filter(|id| top(7, id, &four) != top(8, id, &four));
        assert!(differ.count() > ids.len() / 2);
    }

    fn key(id: u64, start: bool, end: bool) -> SequenceKey {
        SequenceKey {
            id: SequenceId::Int(id),
            start,
            end,
        }
    }

    fn table(max_pinned: usize) -> Sequences {
        Sequences::new(&SequenceConfig {
            max_pinned,
            ..SequenceConfig::default()
        })
    }

    const IDLE: Duration = Duration::from_millis(1000);

    #[tokio::test(start_paused = true)]
    async fn a_pin_holds_when_a_backend_joins_and_ends_at_end_or_idle() {
        let seqs = table(100);
        let ok = |_: &Endpoint| Ok(());
        let five = endpoints(5);
        let four = five[..4].to_vec();
        // A sequence whose winner changes when the fifth backend joins.
        let id = (1..)
            .find(|i| top(0, &SequenceId::Int(*i), &five) == five[4].address())
            .unwrap_or(1);
        let now = Instant::now();
        let first = seqs.choose("accumulate", &key(id, true, false), &four, &ok, IDLE, now);
        let first = first.map(|e| e.address().to_owned());
        let next = seqs.choose("accumulate", &key(id, false, false), &five, &ok, IDLE, now);
        assert_eq!(next.map(|e| e.address().to_owned()), first);
        assert_eq!(seqs.active(now).len(), 1);
        // Idle for the idle time: the pin is gone, the next request goes by the hash.
        tokio::time::advance(IDLE).await;
        let later = Instant::now();
        assert!(seqs.active(later).is_empty());
        let again = seqs.choose(
            "accumulate",
            &key(id, false, false),
            &five,
            &ok,
            IDLE,
            later,
        );
        assert_eq!(
            again.map(|e| e.address().to_owned()).ok().as_deref(),
            Some(five[4].address())
        );
        // sequence_end ends the pin.
        let end = seqs.choose("accumulate", &key(id, false, true), &five, &ok, IDLE, later);
        assert!(end.is_ok());
        assert!(seqs.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_expired_pins_make_room() {
        let seqs = table(2);
        let ok = |_: &Endpoint| Ok(());
        let eps = endpoints(3);
        let now = Instant::now();
        for id in 1..=3 {
            let short = Duration::from_millis(100 * id);
            assert!(seqs
                .choose("m", &key(id, true, false), &eps, &ok, short, now)
                .is_ok());
        }
        // The third found the table full: routed, not pinned.
        assert_eq!(seqs.len(), 2);
        tokio::time::advance(Duration::from_millis(100)).await;
        // Sequence 1 expired: a new one takes its room.
        let now = Instant::now();
        assert!(seqs
            .choose("m", &key(4, true, false), &eps, &ok, IDLE, now)
            .is_ok());
        let mut pinned: Vec<SequenceId> = seqs.active(now).into_iter().map(|p| p.id).collect();
        pinned.sort();
        assert_eq!(pinned, [SequenceId::Int(2), SequenceId::Int(4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_keeps_its_sequences_and_refuses_ones_pinned_elsewhere() {
        let seqs = table(100);
        let eps = endpoints(2);
        let ok = |_: &Endpoint| Ok(());
        let now = Instant::now();
        // Sequence 1 pinned by a unary start; the stream is open on the other backend.
        let home = seqs.choose("m", &key(1, true, false), &eps, &ok, IDLE, now);
        let home = home.map(|e| e.address().to_owned()).unwrap_or_default();
        let stream = eps.iter().find(|e| e.address() != home).cloned();
        let Some(stream) = stream else {
            panic!("two backends");
        };
        let refused = seqs.on_stream("m", &key(1, false, false), &stream, IDLE, now);
        let status = refused.err().map(|r| r.status());
        assert_eq!(
            status.as_ref().map(|s| s.code()),
            Some(tonic::Code::FailedPrecondition)
        );
        let message = status.map(|s| s.message().to_owned()).unwrap_or_default();
        assert!(
            message.contains(&home) && message.contains(stream.address()),
            "{message}"
        );
        // A new sequence on the stream is pinned to the stream's backend and ends there.
        assert!(seqs
            .on_stream("m", &key(2, true, false), &stream, IDLE, now)
            .is_ok());
        let pinned = seqs.active(now);
        assert!(pinned
            .iter()
            .any(|p| p.id == SequenceId::Int(2) && p.backend == stream.address()));
        assert!(seqs
            .on_stream("m", &key(2, false, true), &stream, IDLE, now)
            .is_ok());
        assert_eq!(seqs.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_backend_refuses_the_sequence_until_it_starts_again() {
        let seqs = table(100);
        let eps = endpoints(3);
        let ok = |_: &Endpoint| Ok(());
        let now = Instant::now();
        let pinned = seqs
            .choose("m", &key(9, true, false), &eps, &ok, IDLE, now)
            .map(|e| e.address().to_owned())
            .unwrap_or_default();
        let draining = |e: &Endpoint| {
            if e.address() == pinned {
                Err(Unavailable::Draining)
            } else {
                Ok(())
            }
        };
        let refused = seqs.choose("m", &key(9, false, false), &eps, &draining, IDLE, now);
        let message = refused.as_ref().err().map(|r| r.status());
        assert_eq!(
            message.as_ref().map(|s| s.code()),
            Some(tonic::Code::FailedPrecondition)
        );
        let message = message.map(|s| s.message().to_owned()).unwrap_or_default();
        assert!(message.contains("sequence 9"), "{message}");
        assert!(message.contains(&pinned), "{message}");
        assert!(message.contains("draining"), "{message}");
        // Still refused once the backend is back: the state is gone.
        let again = seqs.choose("m", &key(9, false, false), &eps, &ok, IDLE, now);
        assert!(matches!(again, Err(Refused::Lost { .. })));
        // A start may go anywhere: here, away from the draining one.
        let restarted = seqs.choose("m", &key(9, true, false), &eps, &draining, IDLE, now);
        let restarted = restarted
            .map(|e| e.address().to_owned())
            .unwrap_or_default();
        assert!(!restarted.is_empty() && restarted != pinned);
        // A circuit that is open keeps the pin: UNAVAILABLE, not lost.
        let open = |_: &Endpoint| Err(Unavailable::CircuitOpen);
        let busy = seqs.choose("m", &key(9, false, false), &eps, &open, IDLE, now);
        assert!(matches!(busy, Err(Refused::Busy { .. })));
        let fine = seqs.choose("m", &key(9, false, false), &eps, &ok, IDLE, now);
        assert_eq!(fine.map(|e| e.address().to_owned()).ok(), Some(restarted));
        // A backend removed from the route loses its sequences too.
        let fewer: Vec<Arc<Endpoint>> = eps
            .iter()
            .filter(|e| e.address() != pinned)
            .cloned()
            .collect();
        let _ = seqs.choose("m", &key(10, true, false), &eps, &ok, IDLE, now);
        let gone = seqs.choose("m", &key(10, false, false), &fewer, &ok, IDLE, now);
        if let Err(Refused::Lost { why, .. }) = &gone {
            assert!(why.contains("removed"), "{why}");
        } else {
            // Sequence 10 landed on a backend still in the route.
            assert!(gone.is_ok());
        }
    }
}
