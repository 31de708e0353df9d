//! Figures of the bulkhead's fair queue, on the real [`Bulkhead`] under a saturated
//! model, in paused (virtual) time: seconds of load run in well under a second and the
//! same seed gives the same figures.
//!
//! The model: 2 slots, each call holding its slot for an exponentially distributed time
//! of mean 10 ms (capacity about 200 calls/s), `max_queue` 1024, `queue_timeout_ms`
//! 1000. Tenants send Poisson arrivals of cost 1.
//! - isolation: a light tenant alone, then next to a heavy one sending 10× its rate
//!   (saturating the model): the light tenant's queue-wait p50 and p99, and the same
//!   load in one line by arrival (the queue before fair queuing) for comparison, and
//!   next to heavy again with `tenant_share` 0.5 (no tenant holds more than one of the
//!   two slots, so one is always there for the other);
//! - weights: tenants of weight 3 and 1, both at 600 calls/s, for 10 s: served shares;
//! - low priority: a busy high priority and a low one, both at 600 calls/s, with
//!   `min_share_low_priority` 0.1: the low priority's share of the calls served.
//!
//! ```text
//! cargo run -p infergate --example fair_queue
//! ```

use infergate::bulkhead::{Bulkhead, Claim};
use infergate::config::BulkheadConfig;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const MEAN_SERVICE_S: f64 = 0.010;

#[derive(Clone, Copy)]
struct Flow {
    tenant: &'static str,
    rate: f64,
    priority: i32,
    weight: f64,
}

#[derive(Default)]
struct Outcome {
    waits: Vec<Duration>,
    served: u64,
    refused: u64,
}

type Outcomes = Arc<Mutex<BTreeMap<&'static str, Outcome>>>;

fn exp(rng: &Mutex<fastrand::Rng>, mean_s: f64) -> Duration {
    let u = rng.lock().expect("rng").f64();
    Duration::from_secs_f64(-(1.0 - u).ln() * mean_s)
}

async fn run(
    flows: &[Flow],
    min_share_low_priority: f64,
    tenant_share: Option<f64>,
    secs: u64,
) -> Outcomes {
    let bulkhead = Arc::new(Bulkhead::new(
        "llm".into(),
        BulkheadConfig {
            max_concurrent: 2,
            max_queue: 1024,
            queue_timeout_ms: 1000,
            min_share_low_priority,
            tenant_share,
        },
    ));
    let outcomes = Outcomes::default();
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(19)));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut generators = Vec::new();
    for flow in flows.iter().copied() {
        let (bulkhead, outcomes, rng) = (bulkhead.clone(), outcomes.clone(), rng.clone());
        generators.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            loop {
                tokio::time::sleep(exp(&rng, 1.0 / flow.rate)).await;
                if Instant::now() >= end {
                    break;
                }
                let (bulkhead, outcomes, rng) = (bulkhead.clone(), outcomes.clone(), rng.clone());
                calls.push(tokio::spawn(async move {
                    let asked = Instant::now();
                    let claim = Claim {
                        tenant: flow.tenant,
                        priority: flow.priority,
                        cost: 1,
                        weight: flow.weight,
                    };
                    let slot = bulkhead.acquire_claim(claim, None).await;
                    let waited = asked.elapsed();
                    {
                        let mut all = outcomes.lock().expect("outcomes");
                        let o = all.entry(flow.tenant).or_default();
                        match &slot {
                            Ok(_) if Instant::now() < end => {
                                o.served += 1;
                                o.waits.push(waited);
                            }
                            Ok(_) => {}
                            Err(_) => o.refused += 1,
                        }
                    }
                    if let Ok(slot) = slot {
                        tokio::time::sleep(exp(&rng, MEAN_SERVICE_S)).await;
                        drop(slot);
                    }
                }));
            }
            for call in calls {
                let _ = call.await;
            }
        }));
    }
    for g in generators {
        let _ = g.await;
    }
    outcomes
}

fn percentile(waits: &[Duration], p: f64) -> f64 {
    let mut sorted = waits.to_vec();
    sorted.sort();
    let i = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn light_waits(outcomes: &Outcomes) -> (f64, f64, u64) {
    let all = outcomes.lock().expect("outcomes");
    let light = &all["light"];
    (
        percentile(&light.waits, 0.50),
        percentile(&light.waits, 0.99),
        light.refused,
    )
}

fn shares(outcomes: &Outcomes) -> Vec<(&'static str, u64, f64, u64)> {
    let all = outcomes.lock().expect("outcomes");
    let total: u64 = all.values().map(|o| o.served).sum();
    all.iter()
        .map(|(t, o)| {
            (
                *t,
                o.served,
                o.served as f64 / total.max(1) as f64,
                o.refused,
            )
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("isolation (20 s virtual; capacity ~200/s; heavy sends 10x the light rate)");
        println!(
            "  {:>10} {:>16} {:>22} {:>8} {:>26} {:>22} {:>8} {:>14}",
            "light /s",
            "alone p50/p99",
            "next to heavy p50/p99",
            "ratio",
            "one shared line p50/p99",
            "share 0.5 p50/p99",
            "ratio",
            "heavy served"
        );
        for rate in [10.0, 20.0, 60.0] {
            let light = Flow {
                tenant: "light",
                rate,
                priority: 0,
                weight: 1.0,
            };
            let heavy = Flow {
                tenant: "heavy",
                rate: 10.0 * rate,
                ..light
            };
            // The queue before fair queuing: one line by arrival, as if a single tenant.
            let heavy_in_line = Flow {
                tenant: "light",
                ..heavy
            };
            let (a50, a99, _) = light_waits(&run(&[light], 0.1, None, 20).await);
            let (m50, m99, _) = light_waits(&run(&[light, heavy], 0.1, None, 20).await);
            let (f50, f99, _) = light_waits(&run(&[light, heavy_in_line], 0.1, None, 20).await);
            let capped = run(&[light, heavy], 0.1, Some(0.5), 20).await;
            let (c50, c99, _) = light_waits(&capped);
            let heavy_served = capped.lock().expect("outcomes")["heavy"].served;
            println!(
                "  {rate:>10} {:>16} {:>22} {:>7.2}x {:>26} {:>22} {:>7.2}x {:>14}",
                format!("{a50:.0}/{a99:.0} ms"),
                format!("{m50:.0}/{m99:.0} ms"),
                m99 / a99.max(1.0),
                format!("{f50:.0}/{f99:.0} ms"),
                format!("{c50:.0}/{c99:.0} ms"),
                c99 / a99.max(1.0),
                heavy_served
            );
        }

        println!("weights (10 s virtual; both at 600/s)");
        let a = Flow {
            tenant: "w3",
            rate: 600.0,
            priority: 0,
            weight: 3.0,
        };
        let b = Flow {
            tenant: "w1",
            weight: 1.0,
            ..a
        };
        for (tenant, served, share, refused) in shares(&run(&[a, b], 0.1, None, 10).await) {
            println!("  {tenant}: served {served:5}  share {share:.3}  (refused {refused})");
        }

        println!("low priority (10 s virtual; both at 600/s, min_share_low_priority 0.1)");
        let high = Flow {
            tenant: "high",
            rate: 600.0,
            priority: 5,
            weight: 1.0,
        };
        let low = Flow {
            tenant: "low",
            priority: 0,
            ..high
        };
        for (tenant, served, share, refused) in shares(&run(&[high, low], 0.1, None, 10).await) {
            println!("  {tenant}: served {served:5}  share {share:.3}  (refused {refused})");
        }
    });
}
