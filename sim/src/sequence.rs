//! The simulator's sequence state, behind the stateful `accumulate` model: one running
//! sum per sequence, as Triton's sequence batcher keeps state per correlation id.
//!
//! Why it exists: a gateway that spreads one sequence over several backends computes
//! garbage silently; with a model whose answer depends on every earlier request of the
//! sequence, the tests prove that each request reached the instance holding its state.
//!
//! The rules follow Triton's: the request parameters `sequence_id` (int64, uint64 or
//! string; 0 and "" are not ids), `sequence_start` and `sequence_end` (bools). A start
//! (re)sets the state; a request without a start for a sequence this simulator holds no
//! state for is refused with FAILED_PRECONDITION naming the sequence (Triton says
//! INVALID_ARGUMENT; FAILED_PRECONDITION because the request is well formed and only the
//! server's state is missing, the same code the gateway answers when it lost the
//! backend a sequence was pinned to, so a client handles one code: start again). State
//! is dropped at `sequence_end`, after `idle` without a request, and there are at most
//! `capacity` sequences at once (a start beyond that is RESOURCE_EXHAUSTED).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use infergate_proto::inference::infer_parameter::ParameterChoice;
use infergate_proto::inference::{ModelInferRequest, ModelInferResponse};
use tokio::time::Instant;
use tonic::Status;

use super::models;

/// Idle time after which a sequence's state is dropped: Triton's default
/// `max_sequence_idle_microseconds` (1 s).
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(1);

/// Sequences held at once by default.
pub(crate) const DEFAULT_CAPACITY: usize = 4096;

/// A sequence id as Triton takes it: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum SeqId {
    Int(u64),
    Text(String),
}

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeqId::Int(v) => write!(f, "{v}"),
            SeqId::Text(s) => write!(f, "'{}'", infergate_base::text::shown(s)),
        }
    }
}

/// The sequence parameters of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeqParams {
    pub(crate) id: SeqId,
    pub(crate) start: bool,
    pub(crate) end: bool,
}

/// Reads `sequence_id`, `sequence_start` and `sequence_end`; an error names the bad one.
pub(crate) fn params(req: &ModelInferRequest) -> Result<SeqParams, Status> {
    let model = &req.model_name;
    let id = match req
        .parameters
        .get("sequence_id")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(v)) if *v != 0 => SeqId::Int(*v as u64),
        Some(ParameterChoice::Uint64Param(v)) if *v != 0 => SeqId::Int(*v),
        Some(ParameterChoice::StringParam(s)) if !s.is_empty() => SeqId::Text(s.clone()),
        Some(_) => {
            return Err(Status::invalid_argument(format!(
                "model '{model}' is stateful: parameter 'sequence_id' must be a non-zero \
                 int64 or a non-empty string"
            )))
        }
        None => {
            return Err(Status::invalid_argument(format!(
                "model '{model}' is stateful: the request must carry the parameter \
                 'sequence_id' (int64 or string)"
            )))
        }
    };
    let flag = |name: &str| match req
        .parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(_) => Err(Status::invalid_argument(format!(
            "parameter '{name}' of model '{model}' must be a bool"
        ))),
    };
    Ok(SeqParams {
        id,
        start: flag("sequence_start")?,
        end: flag("sequence_end")?,
    })
}

#[derive(Debug)]
struct State {
    sum: i32,
    last: Instant,
}

/// Running sums per sequence, bounded in count and idle time.
#[derive(Debug)]
pub(crate) struct Store {
    idle: Duration,
    capacity: usize,
    states: Mutex<HashMap<SeqId, State>>,
}

impl Store {
    pub(crate) fn new(idle: Duration, capacity: usize) -> Self {
        Self {
            idle,
            capacity: capacity.max(1),
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Sequences held now (expired ones included until the next sweep).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.states.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Runs `accumulate` on `req` at `now`: validates it, moves the sequence's state.
    pub(crate) fn run(
        &self,
        req: &ModelInferRequest,
        now: Instant,
    ) -> Result<ModelInferResponse, Status> {
        let seq = params(req)?;
        let value =
            models::accumulate_input(req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sum = self.step(&seq, value, now)?;
        models::accumulate_response(req, sum).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Adds `value` to the sequence's sum and returns the new sum.
    pub(crate) fn step(&self, seq: &SeqParams, value: i32, now: Instant) -> Result<i32, Status> {
        let mut states = self
            .states
            .lock()
            .map_err(|_| Status::internal("sequence state is poisoned"))?;
        let idle = self.idle;
        if states
            .get(&seq.id)
            .is_some_and(|s| now.saturating_duration_since(s.last) >= idle)
        {
            states.remove(&seq.id);
        }
        let sum = if seq.start {
            if !states.contains_key(&seq.id) && states.len() >= self.capacity {
                states.retain(|_, s| now.saturating_duration_since(s.last) < idle);
                if states.len() >= self.capacity {
                    return Err(Status::resource_exhausted(format!(
                        "sequence {} cannot start: this server holds {} sequences, its limit",
                        seq.id, self.capacity
                    )));
                }
            }
            value
        } else {
            match states.get(&seq.id) {
                Some(s) => s.sum.wrapping_add(value),
                None => {
                    return Err(Status::failed_precondition(format!(
                        "sequence {} is not active on this server (never started here, ended, \
                         or idle for over {} ms): send its first request with sequence_start",
                        seq.id,
                        idle.as_millis()
                    )))
                }
            }
        };
        if seq.end {
            states.remove(&seq.id);
        } else {
            states.insert(seq.id.clone(), State { sum, last: now });
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::model_infer_request::InferInputTensor;
    use infergate_proto::inference::InferParameter;

    fn request(id: ParameterChoice, start: bool, end: bool, value: i32) -> ModelInferRequest {
        let mut req = ModelInferRequest {
            model_name: "accumulate".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT".into(),
                datatype: "INT32".into(),
                shape: vec![1, 1],
                ..Default::default()
            }],
            raw_input_contents: vec![models::encode_i32_le(&[value])],
            ..Default::default()
        };
        let param = |c| InferParameter {
            parameter_choice: Some(c),
        };
        req.parameters.insert("sequence_id".into(), param(id));
        if start {
            req.parameters.insert(
                "sequence_start".into(),
                param(ParameterChoice::BoolParam(true)),
            );
        }
        if end {
            req.parameters.insert(
                "sequence_end".into(),
                param(ParameterChoice::BoolParam(true)),
            );
        }
        req
    }

    fn output(resp: &ModelInferResponse) -> Option<i32> {
        models::decode_i32_le(resp.raw_output_contents.first()?)?
            .first()
            .copied()
    }

    #[test]
    fn sums_per_sequence_and_refuses_without_start() {
        let store = Store::new(DEFAULT_IDLE, 8);
        let now = Instant::now();
        let int = |v| ParameterChoice::Int64Param(v);
        let text = |s: &str| ParameterChoice::StringParam(s.into());
        let run = |r| store.run(&r, now).map(|r| output(&r));
        assert_eq!(run(request(int(7), true, false, 3)).ok(), Some(Some(3)));
        assert_eq!(
            run(request(text("a"), true, false, 10)).ok(),
            Some(Some(10))
        );
        assert_eq!(run(request(int(7), false, false, 4)).ok(), Some(Some(7)));
        assert_eq!(run(request(text("a"), false, true, 1)).ok(), Some(Some(11)));
        // Ended: the next request without a start is refused, naming the sequence.
        let err = run(request(text("a"), false, false, 1)).err();
        let err = err.map(|e| (e.code(), e.message().to_owned()));
        assert_eq!(
            err.as_ref().map(|e| e.0),
            Some(tonic::Code::FailedPrecondition)
        );
        assert!(err.is_some_and(|e| e.1.contains("'a'")));
        // A start resets the sum.
        assert_eq!(run(request(int(7), true, false, 1)).ok(), Some(Some(1)));
        // No id, a zero id: INVALID_ARGUMENT naming the parameter.
        let mut bare = request(int(1), true, false, 1);
        bare.parameters.clear();
        let e = store.run(&bare, now).err();
        assert!(e.is_some_and(|e| e.message().contains("sequence_id")));
        let e = run(request(int(0), true, false, 1)).err();
        assert_eq!(e.map(|e| e.code()), Some(tonic::Code::InvalidArgument));
    }

    #[test]
    fn idle_state_expires_and_the_count_is_bounded() {
        let store = Store::new(Duration::from_millis(100), 2);
        let t0 = Instant::now();
        let seq = |id, start| SeqParams {
            id: SeqId::Int(id),
            start,
            end: false,
        };
        assert_eq!(store.step(&seq(1, true), 5, t0).ok(), Some(5));
        assert_eq!(store.step(&seq(2, true), 5, t0).ok(), Some(5));
        let full = store.step(&seq(3, true), 5, t0).err();
        assert_eq!(full.map(|e| e.code()), Some(tonic::Code::ResourceExhausted));
        let later = t0 + Duration::from_millis(100);
        // The idle ones are swept to make room.
        assert_eq!(store.step(&seq(3, true), 9, later).ok(), Some(9));
        assert_eq!(store.len(), 1);
        let gone = store.step(&seq(1, false), 1, later).err();
        assert_eq!(
            gone.map(|e| e.code()),
            Some(tonic::Code::FailedPrecondition)
        );
    }
}
