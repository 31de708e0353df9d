//! How much of a backend one call takes, learned from the backend's own load reports,
//! so that gpu_aware needs no capacity figure per backend (see `balance`).
//!
//! A report says how busy the backend is; the gateway knows how many of its own calls
//! were on the backend when the report was taken. Counting a reported queue as demand
//! past full,
//!
//! ```text
//! utilization + queue × per_call = others + per_call × own_calls
//! ```
//!
//! where `others` is everything the gateway cannot see: work from other gateway
//! replicas, other clients, whatever else shares the GPU. `others` can be large, so
//! `utilization / own_calls` overstates `per_call` exactly where it matters (a backend
//! half taken by hidden work looked three times as full per call as it was).
//! [`PerCallFit`] instead regresses demand on own calls over the recent readings: the
//! slope is `per_call`, and `others`, as long as it does not move with this gateway's
//! own calls, only shifts the intercept. The fit is exponentially weighted (about the
//! last [`PerCallFit::MEMORY`] readings) so it follows a backend whose model or batch
//! size changes.
//!
//! Every reading counts, full ones included: keeping only readings with room would keep
//! exactly those where fewer calls ran than the gateway counted (one still on its way,
//! say) and bias the slope low.
//!
//! With several gateway replicas, own calls are a poor regressor: every replica's calls
//! pile up on a backend at the same moments (a burst of arrivals, a slow spell), so
//! `others` moves with this gateway's own calls and the slope takes it in (three
//! replicas learned anywhere from 0.04 to 0.9 for a true 0.25). A backend that reports
//! how many calls it is running (the `running_requests` named metric, vLLM's
//! `vllm:num_requests_running`) gives the regressor that counts every replica's calls:
//! [`PerCallLearning`] then regresses utilization on that count, where only hidden work
//! is left in the intercept, and falls back to own calls for backends that do not
//! report it.
//!
//! The same readings tell the gateway its share of the backend's calls (own calls
//! against running plus queued ones, [`PerCallLearning::own_share`]), which gpu_aware
//! uses to count what other replicas are likely to have sent since a report.
//!
//! Until the readings tell (enough of them, with own calls that vary), there is no
//! estimate and the policy compares that backend by least_request's score. A guess here
//! would feed on itself: a backend guessed too full gets no calls, so no readings that
//! could correct the guess (three gateway replicas each ended up with a backend of its
//! own and left the rest idle).

/// The running fit. Cheap to update (a few multiplications); kept behind a `try_lock`
/// by its owner, so concurrent reports never wait for each other (one that finds the
/// fit busy just does not teach).
#[derive(Debug, Clone, Default)]
pub struct PerCallFit {
    /// Readings taken (saturates; only "enough or not" matters).
    n: u32,
    /// Exponentially weighted means of own calls and of demand, and the weighted
    /// (co)variances around them.
    mean_own: f64,
    mean_demand: f64,
    var_own: f64,
    cov: f64,
    /// The fit has once had the readings it needs: from then on it keeps answering
    /// through spells when the calls barely vary (a backend that sits full).
    trusted: bool,
}

impl PerCallFit {
    /// Readings the fit roughly remembers.
    pub const MEMORY: f64 = 128.0;
    /// Readings, and variance of own calls among them, before the fit is trusted over
    /// the bootstrap.
    const READY_N: u32 = 16;
    const READY_VAR: f64 = 0.05;
    /// A slope below this says the reported utilization does not move with this
    /// gateway's calls (a metric of something else, or calls too small to show): then
    /// there is no estimate, and the policy compares the backend by least_request's
    /// score rather than trust it to hold fifty calls or more.
    const MIN: f64 = 0.02;

    /// Takes a reading: `utilization` and `queue_depth` as reported, `own` of this
    /// gateway's calls running or queued on the backend when it was taken.
    ///
    /// Every reading counts, full ones too: leaving them out would keep exactly the
    /// readings where fewer calls ran than the gateway counted (one still on its way,
    /// say) and bias the slope low. Past full, utilization stops moving, so the fit
    /// regresses *demand* instead: utilization plus the reported queue at the current
    /// estimate per call.
    pub fn observe(&mut self, utilization: f64, queue_depth: f64, own: u64) {
        self.observe_calls(utilization, queue_depth, own as f64);
    }

    /// [`PerCallFit::observe`] with the calls counted as a real number (a reported
    /// running count, say, which may be an average over several models).
    pub fn observe_calls(&mut self, utilization: f64, queue_depth: f64, calls: f64) {
        let own_f = calls;
        let queued = queue_depth.max(0.0) * self.per_call().unwrap_or(0.0);
        let demand = utilization.max(0.0) + queued;
        if self.n == 0 {
            self.mean_own = own_f;
            self.mean_demand = demand;
        } else {
            let a = 1.0 / Self::MEMORY;
            let dx = own_f - self.mean_own;
            let dy = demand - self.mean_demand;
            self.mean_own += a * dx;
            self.mean_demand += a * dy;
            self.var_own = (1.0 - a) * (self.var_own + a * dx * dx);
            self.cov = (1.0 - a) * (self.cov + a * dx * dy);
        }
        self.n = self.n.saturating_add(1);
        if self.n >= Self::READY_N && self.var_own >= Self::READY_VAR {
            self.trusted = true;
        }
    }

    /// What one call adds to the utilization, once the readings tell.
    pub fn per_call(&self) -> Option<f64> {
        // Once trusted, a far smaller spread still gives the slope: a backend that
        // sits full reports the same count for seconds, the variance of the
        // exponentially weighted fit decays, and falling back to the fit on own calls
        // (biased when the backend queues) then under-read a busy backend's share by
        // a third and sent it more calls than it could take.
        let min_var = if self.trusted {
            Self::READY_VAR / 50.0
        } else {
            Self::READY_VAR
        };
        if self.n < Self::READY_N || self.var_own < min_var {
            return None;
        }
        let slope = self.cov / self.var_own;
        (slope >= Self::MIN).then(|| slope.min(1.0))
    }
}

/// Both fits of a backend: on the calls it reports running, when it reports them, and
/// on this gateway's own calls. The first, once ready, is the better one (see the
/// module notes); the second serves backends that report no running count.
#[derive(Debug, Clone, Default)]
pub struct PerCallLearning {
    by_running: PerCallFit,
    by_own: PerCallFit,
    /// Running averages of this gateway's calls and of all the backend's calls (running
    /// or queued), over readings that give both; their ratio is [`Self::own_share`].
    own_avg: f64,
    all_avg: f64,
}

impl PerCallLearning {
    /// Readings the share roughly remembers.
    const SHARE_MEMORY: f64 = 64.0;

    /// Takes a reading: `running` as the backend reported it (None when it does not),
    /// `own` of this gateway's calls on the backend when it was taken (None when
    /// unknown).
    ///
    /// Against the running count the fit regresses plain utilization: running calls
    /// are what fills the backend, queued ones wait outside it, so `utilization =
    /// hidden + per_call × running` holds full or not.
    pub fn observe(
        &mut self,
        utilization: f64,
        queue_depth: f64,
        running: Option<f64>,
        own: Option<u64>,
    ) {
        if let Some(running) = running.filter(|r| r.is_finite() && *r >= 0.0) {
            self.by_running.observe_calls(utilization, 0.0, running);
        }
        if let Some(own) = own {
            self.by_own.observe(utilization, queue_depth, own);
        }
        if let (Some(running), Some(own)) = (running, own) {
            self.observe_share(running + queue_depth.max(0.0), own as f64);
        }
    }

    /// Folds `own` of the backend's `all` calls into the share. The share is the ratio
    /// of the two averages, not an average of ratios: a reading holds a handful of
    /// calls, and `own / all` of small counts is biased (often 0 of 2).
    fn observe_share(&mut self, all: f64, own: f64) {
        // More own calls than the backend counts: some are still on their way.
        let all = all.max(own);
        if !all.is_finite() || all < 1.0 {
            return; // an idle backend tells nothing
        }
        if self.all_avg <= 0.0 {
            (self.own_avg, self.all_avg) = (own, all);
        } else {
            let a = 1.0 / Self::SHARE_MEMORY;
            self.own_avg += a * (own - self.own_avg);
            self.all_avg += a * (all - self.all_avg);
        }
    }

    /// This gateway's share (0..1) of the calls the backend runs or queues, once
    /// readings with a running count have told it: 1 when the gateway is the backend's
    /// only client, about a third for one of three replicas that split the traffic.
    pub fn own_share(&self) -> Option<f64> {
        let share = self.own_avg / self.all_avg;
        (share > 0.0).then(|| share.min(1.0))
    }

    /// What one call adds to the utilization, from the running count when that fit is
    /// ready, else from own calls.
    pub fn per_call(&self) -> Option<f64> {
        self.by_running
            .per_call()
            .or_else(|| self.by_own.per_call())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `own` counts with `others` calls from elsewhere, a quarter of the backend
    /// per call, the way a 4-slot backend reports (full at 1, the rest queued).
    fn feed(fit: &mut PerCallFit, hidden: f64, samples: &[(u64, u64)]) {
        for &(own, others) in samples {
            let demand = hidden + 0.25 * (own + others) as f64;
            let utilization = demand.min(1.0);
            let queue = ((demand - 1.0) / 0.25).max(0.0).round();
            fit.observe(utilization, queue, own);
        }
    }

    fn near(got: Option<f64>, want: f64, tolerance: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() <= tolerance)
    }

    #[test]
    fn nothing_to_go_by_until_own_calls_vary() {
        let mut fit = PerCallFit::default();
        assert_eq!(fit.per_call(), None);
        // Many readings, always the same own count: the slope is unknowable.
        feed(&mut fit, 0.0, &[(1, 0); 40]);
        assert_eq!(fit.per_call(), None);
        // Too few readings yet.
        let mut fit = PerCallFit::default();
        feed(&mut fit, 0.0, &[(0, 0), (1, 0), (2, 0), (1, 0)]);
        assert_eq!(fit.per_call(), None);
    }

    #[test]
    fn hidden_work_does_not_count_per_call() {
        // Half the backend taken by work the gateway cannot see; a quarter per call.
        // utilization / own would say 0.75 per call at one call running.
        let mut fit = PerCallFit::default();
        let samples: Vec<(u64, u64)> = (0..64).map(|i| (i % 3, 0)).collect();
        feed(&mut fit, 0.5, &samples);
        assert!(near(fit.per_call(), 0.25, 0.01), "{:?}", fit.per_call());
    }

    #[test]
    fn other_replicas_calls_average_out_and_full_readings_count() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut fit = PerCallFit::default();
        // Other replicas' calls come and go independently of this gateway's; the
        // backend is often full (own + others up to 6 on 4 slots).
        let samples: Vec<(u64, u64)> = (0..4000)
            .map(|_| (rng.u64(0..=3), rng.u64(0..=3)))
            .collect();
        feed(&mut fit, 0.0, &samples);
        let got = fit.per_call();
        assert!(near(got, 0.25, 0.04), "{got:?}");
    }

    #[test]
    fn utilization_that_does_not_move_with_calls_gives_no_estimate() {
        let mut fit = PerCallFit::default();
        for i in 0..64 {
            fit.observe(0.1, 0.0, i % 4);
        }
        assert_eq!(fit.per_call(), None);
    }

    #[test]
    fn running_counts_learn_through_calls_that_move_together() {
        // Three replicas whose calls rise and fall together on a 4-slot backend half
        // taken by hidden work: own calls alone credit this gateway with the others'
        // share; the backend's running count does not.
        let mut rng = fastrand::Rng::with_seed(11);
        let mut learning = PerCallLearning::default();
        let mut own_only = PerCallFit::default();
        for _ in 0..2000 {
            let wave = rng.u64(0..=2);
            let own = wave.min(2);
            let running = (3 * wave).min(2) as f64;
            let queue = (3 * wave).saturating_sub(2) as f64;
            let utilization = 0.5 + 0.25 * running;
            learning.observe(utilization, queue, Some(running), Some(own));
            own_only.observe(utilization, queue, own);
        }
        let got = learning.per_call();
        assert!(near(got, 0.25, 0.01), "{got:?}");
        assert!(
            !near(own_only.per_call(), 0.25, 0.05),
            "{:?}",
            own_only.per_call()
        );
    }

    #[test]
    fn a_backend_that_sits_full_keeps_its_learned_share() {
        // Half taken by hidden work, a quarter per call: 2 calls fill it.
        let mut learning = PerCallLearning::default();
        for i in 0..64u64 {
            let running = (i % 3) as f64;
            learning.observe(0.5 + 0.25 * running, 0.0, Some(running), Some(i % 3));
        }
        assert!(near(learning.per_call(), 0.25, 0.01));
        // Then it sits full for a long spell, now and then one call short, with a queue
        // that own calls alone would misread.
        for i in 0..600u64 {
            let running = if i % 40 == 0 { 1.0 } else { 2.0 };
            learning.observe(0.5 + 0.25 * running, 2.0, Some(running), Some(3));
        }
        let got = learning.per_call();
        assert!(near(got, 0.25, 0.01), "{got:?}");
    }

    #[test]
    fn own_share_is_the_ratio_of_average_counts() {
        let reading = |learning: &mut PerCallLearning, all: f64, own: u64| {
            learning.observe(all / 4.0, 0.0, Some(all), Some(own));
        };
        let mut learning = PerCallLearning::default();
        assert_eq!(learning.own_share(), None);
        reading(&mut learning, 0.0, 0);
        assert_eq!(learning.own_share(), None, "an idle backend tells nothing");
        // One of three replicas: 0 of 2 calls, then 2 of 4. Averaging the ratios would
        // say a quarter; a third of the calls are ours.
        for i in 0..400 {
            let (all, own) = if i % 2 == 0 { (2.0, 0) } else { (4.0, 2) };
            reading(&mut learning, all, own);
        }
        let share = learning.own_share().expect("share");
        assert!((share - 1.0 / 3.0).abs() < 0.02, "{share}");
        // The backend's only client.
        let mut learning = PerCallLearning::default();
        for own in [1u64, 3, 2, 0, 4] {
            reading(&mut learning, own as f64, own);
        }
        assert_eq!(learning.own_share(), Some(1.0));
        // Without a running count there is nothing to go by.
        let mut learning = PerCallLearning::default();
        learning.observe(0.5, 0.0, None, Some(1));
        assert_eq!(learning.own_share(), None);
    }

    #[test]
    fn without_a_running_count_own_calls_teach() {
        let mut learning = PerCallLearning::default();
        for i in 0..64u64 {
            let own = i % 3;
            learning.observe(0.25 * own as f64, 0.0, None, Some(own));
        }
        assert!(near(learning.per_call(), 0.25, 0.01));
    }

    #[test]
    fn follows_a_backend_that_changes() {
        let mut fit = PerCallFit::default();
        let samples: Vec<(u64, u64)> = (0..64).map(|i| (i % 3, 0)).collect();
        feed(&mut fit, 0.0, &samples);
        assert!(near(fit.per_call(), 0.25, 0.01));
        // The backend now takes half of itself per call (a bigger batch, say).
        for i in 0..1000 {
            let own = i % 2;
            fit.observe(0.5 * own as f64, 0.0, own);
        }
        assert!(near(fit.per_call(), 0.5, 0.01), "{:?}", fit.per_call());
    }
}
