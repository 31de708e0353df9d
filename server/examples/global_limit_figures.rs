//! Global rate limit figures, in one run, against a real `redis-server` that this
//! example starts on a free loopback port (`--save ''`) and stops when it ends:
//!
//! (a) cost of one decision, one thread (a runtime with `worker_threads = 1`): no
//!     limit, a local limit (`LocalRateLimiter`), and a global one (`GlobalLimiter`,
//!     one Redis round trip a decision) with `[redis] lease` 1 (off), 4 (the default)
//!     and 16. The limits are high enough that every call is admitted, so each row is
//!     the cost of an admitted call. µs per decision and decisions/s one at a time,
//!     then decisions/s with 32 decisions in flight on the one thread (the Redis
//!     connection is multiplexed).
//! (b) accuracy: three limiters (three replicas' `GlobalLimiter`s, each its own
//!     connection) sharing one global limit of 100/s for one tenant in that Redis, each
//!     offered 100 calls/s (300/s in all) for 5 s: the admitted rate, round trips per
//!     admitted call, and decisions the lease answered; lease 1 and 4 at burst 10 (the
//!     lease is then cut to burst / 3 = 3), lease 1 and 16 at burst 100. The burst is
//!     admitted once on top of the rate, so the rate less the burst is shown too.
//!
//! ```text
//! cargo run -p infergate --example global_limit_figures              # debug
//! cargo run --release -p infergate --example global_limit_figures    # if built
//! ```
//!
//! `timeout_ms` is 50 in both parts, as in `tests/e2e/global_limits.rs`: on a shared
//! 2-core box the default 5 ms lets some decisions fall back, which is not what is
//! measured here (the fallbacks are printed anyway).

use infergate::config::{Bucket, RateLimitConfig, RedisConfig, Scope};
use infergate::global_limit::GlobalLimiter;
use infergate::ratelimit::{LocalRateLimiter, RateKey, RateLimiter};
use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A `redis-server` child on 127.0.0.1, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Result<Redis, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
        let redis = Redis { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!("redis-server did not listen on {port} in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bucket(rate_per_second: f64, burst: u32, scope: Scope) -> Bucket {
    Bucket {
        rate_per_second,
        burst,
        scope,
    }
}

fn store(redis: &Redis, prefix: &str, lease: u32) -> RedisConfig {
    RedisConfig {
        url: Some(redis.url()),
        key_prefix: prefix.to_owned(),
        timeout_ms: 50,
        lease,
        replicas_hint: 3,
        ..RedisConfig::default()
    }
}

const DECISIONS: u64 = 20_000;
const IN_FLIGHT: u64 = 32;

/// One row of (a): µs a decision one at a time, decisions/s one at a time and with
/// `IN_FLIGHT` at once; plus round trips per decision (global rows).
struct Cost {
    name: String,
    us: f64,
    sequential: f64,
    concurrent: f64,
    round_trips: Option<f64>,
}

fn print_cost(c: &Cost) {
    let trips = c
        .round_trips
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
    println!(
        "{:<28} {:>10.2} {:>14.0} {:>18.0} {:>12}",
        c.name, c.us, c.sequential, c.concurrent, trips
    );
}

/// Times `DECISIONS` decisions of `decide` one at a time, then with `IN_FLIGHT` tasks.
async fn time<F, Fut>(decide: F) -> (f64, f64)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // Warm up (connect, load the script).
    for i in 0..200 {
        black_box(decide(i).await);
    }
    let began = Instant::now();
    let mut admitted = 0;
    for i in 0..DECISIONS {
        admitted += u64::from(black_box(decide(i).await));
    }
    let sequential = began.elapsed().as_secs_f64();
    assert_eq!(admitted, DECISIONS, "every call is admitted in this part");
    let began = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|t| {
            let decide = decide.clone();
            tokio::spawn(async move {
                let mut admitted = 0;
                for i in 0..DECISIONS / IN_FLIGHT {
                    admitted += u64::from(decide(t * DECISIONS + i).await);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap_or(0);
    }
    let concurrent = began.elapsed().as_secs_f64();
    assert_eq!(admitted, DECISIONS / IN_FLIGHT * IN_FLIGHT);
    (
        sequential,
        (DECISIONS / IN_FLIGHT * IN_FLIGHT) as f64 / concurrent,
    )
}

/// A row of (a) from what [`time`] measured.
fn row(name: impl Into<String>, (sequential, concurrent): (f64, f64)) -> Cost {
    Cost {
        name: name.into(),
        us: sequential * 1e6 / DECISIONS as f64,
        sequential: DECISIONS as f64 / sequential,
        concurrent,
        round_trips: None,
    }
}

async fn costs(redis: &Redis) -> Result<Vec<Cost>, String> {
    let mut rows = Vec::new();
    let key = Arc::new(RateKey::new("team-a", "simple"));
    // No limit: what the request path does when no limiter is configured (nothing).
    rows.push(row(
        "no limit",
        time(|i| async move { black_box(i) < u64::MAX }).await,
    ));
    let high = |scope| RateLimitConfig {
        per_tenant: Some(bucket(1e7, 10_000_000, scope)),
        ..RateLimitConfig::default()
    };
    let local = Arc::new(LocalRateLimiter::new(high(Scope::Local))?);
    let local_key = key.clone();
    let timed = time(move |_| {
        let (local, key) = (local.clone(), local_key.clone());
        async move { local.check(&key, Instant::now()).is_ok() }
    })
    .await;
    rows.push(row("local limit", timed));
    for lease in [1, 4, 16] {
        let prefix = format!("cost-{lease}");
        let global = Arc::new(GlobalLimiter::new(
            &high(Scope::Global),
            &store(redis, &prefix, lease),
            Default::default(),
        )?);
        let (limiter, global_key) = (global.clone(), key.clone());
        let timed = time(move |_| {
            let (global, key) = (limiter.clone(), global_key.clone());
            async move { global.check(&key).await.is_ok() }
        })
        .await;
        let decisions = 200 + DECISIONS + DECISIONS / IN_FLIGHT * IN_FLIGHT;
        if global.decisions_without_store() > 0 {
            println!(
                "  (lease {lease}: {} decisions fell back without Redis)",
                global.decisions_without_store()
            );
        }
        rows.push(Cost {
            round_trips: Some(global.round_trips() as f64 / decisions as f64),
            ..row(format!("global limit, lease {lease}"), timed)
        });
    }
    Ok(rows)
}

/// One row of (b).
struct Accuracy {
    lease: u32,
    burst: u32,
    admitted: u64,
    refused: u64,
    seconds: f64,
    round_trips: u64,
    from_lease: u64,
    admitted_from_lease: u64,
    without_store: u64,
}

/// Three replicas' limiters, each offered `per_replica` calls/s for `seconds`.
async fn accuracy(redis: &Redis, lease: u32, burst: u32) -> Result<Accuracy, String> {
    let (per_replica, seconds) = (100u64, 5u64);
    let limits = RateLimitConfig {
        per_tenant: Some(bucket(100.0, burst, Scope::Global)),
        ..RateLimitConfig::default()
    };
    let prefix = format!("accuracy-{lease}-{burst}");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let replica = Arc::new(GlobalLimiter::new(
            &limits,
            &store(redis, &prefix, lease),
            Default::default(),
        )?);
        // Connect and load the script before the clock starts (another tenant).
        let _ = replica.check(&RateKey::new("warm-up", "simple")).await;
        replicas.push(replica);
    }
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let runs: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let (replica, admitted, refused) = (replica.clone(), admitted.clone(), refused.clone());
            tokio::spawn(async move {
                let key = Arc::new(RateKey::new("team-a", "simple"));
                let mut ticker =
                    tokio::time::interval(Duration::from_micros(1_000_000 / per_replica));
                let mut calls = Vec::new();
                for _ in 0..per_replica * seconds {
                    ticker.tick().await;
                    let (replica, key, admitted, refused) = (
                        replica.clone(),
                        key.clone(),
                        admitted.clone(),
                        refused.clone(),
                    );
                    calls.push(tokio::spawn(async move {
                        match replica.check(&key).await {
                            Ok(()) => admitted.fetch_add(1, Ordering::Relaxed),
                            Err(limited) => {
                                assert!(limited.pushback() >= Duration::from_millis(1));
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }));
                }
                for call in calls {
                    let _ = call.await;
                }
            })
        })
        .collect();
    for run in runs {
        run.await.map_err(|e| format!("a replica's load: {e}"))?;
    }
    let seconds = began.elapsed().as_secs_f64().max(seconds as f64);
    let sum = |f: &dyn Fn(&GlobalLimiter) -> u64| replicas.iter().map(|r| f(r)).sum::<u64>();
    Ok(Accuracy {
        lease,
        burst,
        admitted: admitted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        seconds,
        // Less the three warm-up decisions.
        round_trips: sum(&|r| r.round_trips()).saturating_sub(3),
        from_lease: sum(&|r| r.leased_decisions()),
        admitted_from_lease: sum(&|r| r.leased_admissions()),
        without_store: sum(&|r| r.decisions_without_store()),
    })
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime of {workers} threads: {e}"))
}

fn main() -> Result<(), String> {
    let redis = Redis::start()?;
    println!(
        "profile: {}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("redis-server on 127.0.0.1:{}", redis.port);

    let one = runtime(1)?;
    println!(
        "\n(a) cost of an admitted call's decision, one worker thread, {DECISIONS} decisions a row"
    );
    println!(
        "{:<28} {:>10} {:>14} {:>18} {:>12}",
        "",
        "µs/decision",
        "decisions/s",
        format!("decisions/s ({IN_FLIGHT} at once)"),
        "trips/call"
    );
    for row in one.block_on(costs(&redis))? {
        print_cost(&row);
    }
    drop(one);

    let two = runtime(2)?;
    println!(
        "\n(b) 3 replicas, one global limit of 100/s for one tenant, 100/s offered to each for 5 s"
    );
    println!(
        "{:>6} {:>6} {:>10} {:>9} {:>11} {:>17} {:>12} {:>18} {:>16} {:>9}",
        "lease",
        "burst",
        "admitted",
        "refused",
        "rate",
        "less the burst",
        "round trips",
        "trips/admitted",
        "from lease (ok)",
        "fallback"
    );
    for (lease, burst) in [(1, 10), (4, 10), (1, 100), (16, 100)] {
        let a = two.block_on(accuracy(&redis, lease, burst))?;
        println!(
            "{:>6} {:>6} {:>10} {:>9} {:>9.1}/s {:>15.1}/s {:>12} {:>18.2} {:>16} {:>9}",
            a.lease,
            a.burst,
            a.admitted,
            a.refused,
            a.admitted as f64 / a.seconds,
            a.admitted.saturating_sub(u64::from(a.burst)) as f64 / a.seconds,
            a.round_trips,
            a.round_trips as f64 / a.admitted.max(1) as f64,
            format!("{} ({})", a.from_lease, a.admitted_from_lease),
            a.without_store
        );
    }
    Ok(())
}
