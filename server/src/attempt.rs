//! One attempt on one backend, from the pick to its outcome: the request path's step 9,
//! and the one place where what an attempt did is recorded.
//!
//! An [`Attempt`] owns everything an attempt holds: the endpoint's in-flight guard, the
//! circuit permits taken at pick time and the attempt's CLIENT span. It ends exactly
//! once, through [`Attempt::finish`] (or its drop, which means the caller went away),
//! and that one call updates the endpoint's counters and its attempts metric, outlier
//! detection, both circuit breakers, the latency figures and the span. Unary calls,
//! hedges and streams all end their attempts this way, so no outcome is counted twice
//! or labelled by whoever happened to see it last.
//!
//! Which outcomes count against the backend is decided here too ([`Verdict`]):
//! - the backend answered OK: a success;
//! - it answered with a code the *request* causes (INVALID_ARGUMENT, NOT_FOUND,
//!   FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED, CANCELLED):
//!   nothing, so one caller's stream of bad requests cannot open a circuit or eject a
//!   backend;
//! - the caller's deadline passed, or the caller went away, before the backend sent
//!   anything: nothing if the attempt had not yet run past the model's no-response
//!   bound (a caller that asks for less time than the model needs made its own choice),
//!   a failure if it had (the backend was silent for longer than any healthy backend
//!   takes);
//! - a DEADLINE_EXCEEDED from the backend itself follows the same rule;
//! - anything else (transport failure, a server error, silence past the bound): a
//!   failure, which outlier detection and the breakers weigh by their own code lists.
//!
//! The no-response bound is `max(floor, factor × p99)` of the model's recent
//! successful attempts' time to response headers ([`NoResponseConfig`]): adaptive, so a
//! GPU three times slower than its peers is not cut off, while a hung one is noticed
//! within a fraction of a second for a model that answers in tens of milliseconds.

use crate::breaker::{Outcome as BreakerOutcome, PermitGuard};
use crate::endpoint::{Endpoint, InFlightGuard};
use crate::pool::{Picked, Pool};
use infergate_base::trace::CallSpan;

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Status};

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status (in trailers, or trailers-only).
    Answered(Code),
    /// The backend could not be reached, or the connection broke (reset, PING timeout)
    /// before it answered.
    Transport,
    /// The backend sent nothing within the no-response bound or the per-try timeout;
    /// the gateway gave up on it.
    NoResponse,
    /// The caller's deadline passed first.
    Deadline,
    /// The caller went away.
    Cancelled,
}

/// What an outcome means for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It served the call.
    Success,
    /// It failed: outlier detection sees `outlier` (None: a failure without a status,
    /// which always counts), the breakers `breaker`.
    Failure {
        /// The code outlier detection weighs.
        outlier: Option<Code>,
        /// The code the breakers weigh.
        breaker: Code,
    },
    /// Nothing the backend did: the request's or the caller's doing.
    Neutral,
}

/// Codes that a request, not the server, causes.
pub fn caused_by_request(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Cancelled
            | Code::AlreadyExists
    )
}

/// The verdict on an outcome, given how long the attempt ran, whether the backend had
/// sent response headers, and the model's no-response bound.
pub fn verdict(
    outcome: Outcome,
    elapsed: Duration,
    answered: bool,
    bound: Option<Duration>,
) -> Verdict {
    let past_bound = bound.is_some_and(|b| elapsed >= b);
    let silent_too_long = Verdict::Failure {
        outlier: None,
        breaker: Code::DeadlineExceeded,
    };
    match outcome {
        Outcome::Answered(Code::Ok) => Verdict::Success,
        Outcome::Answered(code) if caused_by_request(code) => Verdict::Neutral,
        Outcome::Answered(Code::DeadlineExceeded) => {
            if past_bound {
                silent_too_long
            } else {
                Verdict::Neutral
            }
        }
        Outcome::Answered(code) => Verdict::Failure {
            outlier: Some(code),
            breaker: code,
        },
        Outcome::Transport => Verdict::Failure {
            outlier: None,
            breaker: Code::Unavailable,
        },
        Outcome::NoResponse => silent_too_long,
        Outcome::Deadline | Outcome::Cancelled => {
            if !answered && past_bound {
                silent_too_long
            } else {
                Verdict::Neutral
            }
        }
    }
}

/// Where a successful attempt's latency is learned, beside the endpoint's own figures.
pub type Latencies = Option<Arc<crate::models::ModelPolicy>>;

/// One attempt in flight.
pub struct Attempt {
    pool: Arc<Pool>,
    endpoint: Arc<Endpoint>,
    model: String,
    permits: [Option<PermitGuard>; 2],
    guard: Option<InFlightGuard>,
    began: Instant,
    /// Time to response headers, once they arrived.
    answered: Option<Duration>,
    span: Option<CallSpan>,
    policy: Latencies,
    bound: Option<Duration>,
    /// The failure this call already got from another backend, if any: the same answer
    /// twice is the request's doing, not this backend's.
    repeat_of: Option<Code>,
    /// The caller's tenant (`blame::Blame::key`), when known: a tenant whose calls alone
    /// fail on a backend that serves the others is not the backend's failure.
    tenant: Option<u64>,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("backend", &self.endpoint.address())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Attempt {
    /// Starts an attempt on the picked endpoint: takes its in-flight slot now.
    /// `policy` learns the latency of a success (None: nothing to learn, e.g. a call
    /// that is not for one model); `bound` is the model's no-response bound now.
    pub fn begin(
        pool: Arc<Pool>,
        picked: Picked,
        model: &str,
        span: CallSpan,
        policy: Latencies,
        bound: Option<Duration>,
    ) -> Attempt {
        let Picked {
            endpoint,
            permit,
            model_permit,
        } = picked;
        let guard = endpoint.begin();
        Attempt {
            pool,
            endpoint,
            model: model.to_owned(),
            permits: [permit, model_permit],
            guard: Some(guard),
            began: Instant::now(),
            answered: None,
            span: Some(span),
            policy,
            bound,
            repeat_of: None,
            tenant: None,
        }
    }

    /// The call is `tenant`'s (see `blame`).
    pub fn for_tenant(&mut self, tenant: &str) {
        self.tenant = Some(crate::blame::Blame::key(tenant));
    }

    /// Another backend already answered this same request with `code` (a failure): if
    /// this one answers the same, the request caused it and neither backend is blamed
    /// for the repeat.
    pub fn repeats(&mut self, code: Option<Code>) {
        self.repeat_of = code.filter(|c| *c != Code::Ok);
    }

    /// The backend.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// When the attempt began.
    pub fn began(&self) -> Instant {
        self.began
    }

    /// The model's no-response bound when the attempt began.
    pub fn bound(&self) -> Option<Duration> {
        self.bound
    }

    /// The attempt's span (to inject its context into the request).
    pub fn span(&self) -> Option<&CallSpan> {
        self.span.as_ref()
    }

    /// The backend's response headers arrived.
    pub fn answered(&mut self) {
        if self.answered.is_none() {
            self.answered = Some(self.began.elapsed());
        }
    }

    /// Ends the attempt with `outcome`; `status` (when the gateway made one) goes on the
    /// span. Records everywhere it counts, once.
    pub fn finish(mut self, outcome: Outcome, status: Option<&Status>) {
        self.record(outcome, status);
    }

    fn record(&mut self, outcome: Outcome, status: Option<&Status>) {
        let Some(span) = self.span.take() else {
            return; // recorded already
        };
        let elapsed = self.began.elapsed();
        // Time to the answer's headers where there was one: that is what the bound and
        // the latency figures measure (a stream's life is not its backend's latency).
        let measured = self.answered.unwrap_or(elapsed);
        let endpoint = &self.endpoint;
        endpoint.count_attempt(match outcome {
            Outcome::Answered(code) => Some(code),
            Outcome::Transport => None,
            Outcome::NoResponse | Outcome::Deadline => Some(Code::DeadlineExceeded),
            Outcome::Cancelled => Some(Code::Cancelled),
        });
        let verdict = match outcome {
            Outcome::Answered(code) if self.repeat_of == Some(code) => Verdict::Neutral,
            _ => verdict(outcome, elapsed, self.answered.is_some(), self.bound),
        };
        let now = Instant::now();
        let verdict = match (verdict, self.tenant) {
            (Verdict::Failure { .. }, Some(tenant)) if !endpoint.blamed(tenant, now) => {
                Verdict::Neutral
            }
            (Verdict::Success, Some(tenant)) => {
                endpoint.credit(tenant, now);
                verdict
            }
            _ => verdict,
        };
        let breaker_code = match verdict {
            Verdict::Success => Some(Code::Ok),
            Verdict::Failure { outlier, breaker } => {
                self.pool.record_outlier(endpoint, outlier, measured);
                Some(breaker)
            }
            Verdict::Neutral => None,
        };
        if verdict == Verdict::Success {
            self.pool.record_outlier(endpoint, Some(Code::Ok), measured);
            endpoint.observe_latency(elapsed);
            if let Some(policy) = &self.policy {
                policy.latencies.record(measured);
                policy.no_response.record(measured);
            }
        }
        endpoint.record_outcome(!matches!(verdict, Verdict::Failure { .. }));
        // The backend's permit (its transitions are the whole backend's: model ""), then
        // the backend × model one.
        for (i, slot) in self.permits.iter_mut().enumerate() {
            let Some(permit) = slot.take() else { continue };
            // A neutral outcome returns the permit unrecorded (as a cancelled call does).
            if let Some(code) = breaker_code {
                let outcome = BreakerOutcome {
                    code,
                    elapsed: measured,
                };
                if let Some(t) = permit.record(outcome, Instant::now()) {
                    let model = if i == 0 { "" } else { self.model.as_str() };
                    self.pool.circuit_event(endpoint, model, &t);
                }
            }
        }
        match (status, outcome) {
            (Some(status), _) => span.end_with_status(status),
            (None, Outcome::Answered(code)) => span.end(code),
            (None, Outcome::Transport) => span.end(Code::Unavailable),
            (None, Outcome::NoResponse | Outcome::Deadline) => span.end(Code::DeadlineExceeded),
            (None, Outcome::Cancelled) => span.end(Code::Cancelled),
        }
        self.guard.take();
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // Dropped unfinished: the caller went away (or its deadline passed and the
        // call's future was dropped).
        self.record(Outcome::Cancelled, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NoResponseConfig;
    use crate::retry::{NoResponseBound, REFRESH};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn callers_mistakes_never_count_against_the_backend() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Cancelled,
        ] {
            assert_eq!(
                verdict(Outcome::Answered(code), ms(5), true, Some(ms(200))),
                Verdict::Neutral,
                "{code:?}"
            );
        }
        assert_eq!(
            verdict(Outcome::Answered(Code::Internal), ms(5), true, None),
            Verdict::Failure {
                outlier: Some(Code::Internal),
                breaker: Code::Internal
            }
        );
    }

    #[test]
    fn a_short_deadline_is_the_callers_choice_until_the_bound_passes() {
        let bound = Some(ms(200));
        // 7 ms deadline on a 20 ms model: not the backend's fault.
        assert_eq!(
            verdict(Outcome::Deadline, ms(7), false, bound),
            Verdict::Neutral
        );
        assert_eq!(
            verdict(
                Outcome::Answered(Code::DeadlineExceeded),
                ms(7),
                true,
                bound
            ),
            Verdict::Neutral
        );
        assert_eq!(
            verdict(Outcome::Cancelled, ms(150), false, bound),
            Verdict::Neutral
        );
        // Silent past the bound: the backend's failure, however the call ended.
        let silent = Verdict::Failure {
            outlier: None,
            breaker: Code::DeadlineExceeded,
        };
        assert_eq!(verdict(Outcome::Deadline, ms(250), false, bound), silent);
        assert_eq!(verdict(Outcome::Cancelled, ms(250), false, bound), silent);
        assert_eq!(verdict(Outcome::NoResponse, ms(200), false, bound), silent);
        // A caller leaving a stream that is answering says nothing about the backend.
        assert_eq!(
            verdict(Outcome::Cancelled, ms(5000), true, bound),
            Verdict::Neutral
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_follows_the_models_p99_above_its_floor() {
        let bound = NoResponseBound::new(NoResponseConfig::default());
        // Cold: the conservative bound.
        assert_eq!(bound.get(Instant::now()), Some(ms(3000)));
        for _ in 0..100 {
            bound.record(ms(20));
        }
        tokio::time::advance(REFRESH).await;
        // 5 × 20 ms is under the 200 ms floor.
        assert_eq!(bound.get(Instant::now()), Some(ms(200)));
        // A model that takes about a second: 5 × p99.
        for _ in 0..2000 {
            bound.record(ms(1000));
        }
        // Cached for REFRESH.
        assert_eq!(bound.get(Instant::now()), Some(ms(200)));
        tokio::time::advance(REFRESH).await;
        let b = bound.get(Instant::now()).expect("bound");
        assert!(b >= ms(4900) && b <= ms(5100), "{b:?}");
    }

    #[test]
    fn the_bound_is_off_when_disabled() {
        let bound = NoResponseBound::new(NoResponseConfig {
            enabled: false,
            ..NoResponseConfig::default()
        });
        assert_eq!(bound.get(Instant::now()), None);
    }

    #[test]
    fn settings_are_checked() {
        let bad = NoResponseConfig {
            factor: 0.5,
            ..NoResponseConfig::default()
        };
        assert_eq!(bad.validate().expect_err("factor").path, "factor");
    }
}
