//! The response cache and request coalescing (`[models.X] cache`), end to end: real
//! gateways in front of real simulated backends, backend calls counted at the sim, and
//! a real `redis-server` for the shared level.

use crate::common::*;
use crate::global_limits::Redis;
use infergate::config::{CacheConfig, Config, ModelConfig};
use infergate_proto::inference::infer_parameter::ParameterChoice;
use infergate_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

fn cached(backend: SocketAddr, tweak: impl FnOnce(&mut CacheConfig)) -> Config {
    let mut cfg = config(&[backend]);
    let mut cache = CacheConfig::default();
    tweak(&mut cache);
    cfg.models.insert(
        "simple".into(),
        ModelConfig {
            cache: Some(cache),
            ..ModelConfig::default()
        },
    );
    cfg
}

/// One call: the answer and the `infergate-cache` header, or the status.
async fn call(
    addr: SocketAddr,
    request: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<(ModelInferResponse, String), tonic::Status> {
    let mut c = client(addr).await;
    let mut request = tonic::Request::new(request);
    if let Some(t) = timeout {
        // As the header only: the gateway's answer is under test, not the client's timer.
        let value = format!("{}m", t.as_millis());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().expect("ascii"));
    }
    let response = c.model_infer(request).await?;
    let served = response
        .metadata()
        .get("infergate-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((response.into_inner(), served))
}

async fn ok(addr: SocketAddr, request: ModelInferRequest) -> (ModelInferResponse, String) {
    call(addr, request, None).await.expect("the call succeeds")
}

fn sums(response: &ModelInferResponse) -> Vec<i32> {
    decode_i32(&response.raw_output_contents[0])
}

fn with_param(mut r: ModelInferRequest, name: &str, v: i64) -> ModelInferRequest {
    r.parameters.insert(
        name.into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        },
    );
    r
}

#[tokio::test]
async fn a_repeat_is_a_hit_with_its_own_id_and_a_different_input_a_new_entry() {
    let sim = sim("gpu-0", |_| {});
    let gw = gateway(cached(sim.addr(), |_| {})).await;
    let (first, served) = ok(gw.addr(), simple_request("first", 1)).await;
    assert_eq!(served, "miss");
    assert_eq!(first.id, "first");
    assert_eq!(sim.control().started(), 1);

    let (again, served) = ok(gw.addr(), simple_request("second", 1)).await;
    assert_eq!(served, "hit");
    assert_eq!(again.id, "second", "the caller's own request id");
    assert_eq!(sums(&again), sums(&first));
    assert_eq!(again.outputs, first.outputs);
    assert_eq!(sim.control().started(), 1, "a hit makes no backend call");

    let (other, served) = ok(gw.addr(), simple_request("third", 2)).await;
    assert_eq!(served, "miss", "a different input is a different entry");
    assert_ne!(sums(&other), sums(&first));
    assert_eq!(sim.control().started(), 2);
    let (_, served) = ok(gw.addr(), simple_request("", 2)).await;
    assert_eq!(served, "hit");
    assert_eq!(sim.control().started(), 2);

    let stats = gw.gateway().cache.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].hits_l1, stats[0].misses, stats[0].entries),
        (2, 2, 2)
    );
}

#[tokio::test]
async fn an_entry_expires_after_its_ttl() {
    let sim = sim("gpu-0", |_| {});
    let gw = gateway(cached(sim.addr(), |c| c.ttl_ms = 300)).await;
    let (_, served) = ok(gw.addr(), simple_request("a", 1)).await;
    assert_eq!(served, "miss");
    let started = Instant::now();
    loop {
        let (_, served) = ok(gw.addr(), simple_request("b", 1)).await;
        if served == "miss" {
            break;
        }
        assert_eq!(served, "hit");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the entry never expired"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "served from the backend again before the ttl: {:?}",
        started.elapsed()
    );
    assert_eq!(sim.control().started(), 2);
}

#[tokio::test]
async fn answers_above_max_entry_bytes_errors_and_sequenced_calls_are_not_kept() {
    let sim = sim("gpu-0", |_| {});
    // `simple` answers two [1,16] INT32 outputs: well above 64 bytes.
    let small = gateway(cached(sim.addr(), |c| c.max_entry_bytes = 64)).await;
    for i in 0..2 {
        let (_, served) = ok(small.addr(), simple_request(&format!("s{i}"), 1)).await;
        assert_eq!(served, "miss");
    }
    assert_eq!(sim.control().started(), 2);

    let gw = gateway(cached(sim.addr(), |_| {})).await;
    sim.control().set_error_rate(1.0);
    for i in 0..2 {
        let failed = call(gw.addr(), simple_request(&format!("e{i}"), 7), None).await;
        assert_eq!(failed.expect_err("fails").code(), Code::Unavailable);
    }
    sim.control().set_error_rate(0.0);
    let before = sim.control().started();
    let (_, served) = ok(gw.addr(), simple_request("after", 7)).await;
    assert_eq!(served, "miss", "the errors were not kept");
    assert_eq!(sim.control().started(), before + 1);

    for name in ["priority", "sequence_id"] {
        for _ in 0..2 {
            let request = with_param(simple_request("p", 3), name, 1);
            let before = sim.control().started();
            let (_, served) = ok(gw.addr(), request).await;
            assert_eq!(served, "", "{name}: not looked up");
            assert_eq!(sim.control().started(), before + 1, "{name}");
        }
    }
}

#[tokio::test]
async fn fifty_identical_calls_make_one_backend_call_each_with_its_own_id() {
    let sim = sim("gpu-0", |_| {});
    sim.control().set_extra_latency_ms(300);
    let gw = gateway(cached(sim.addr(), |_| {})).await;
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let addr = gw.addr();
            tokio::spawn(async move { ok(addr, simple_request(&format!("c-{i}"), 5)).await })
        })
        .collect();
    let mut served = std::collections::BTreeMap::new();
    for (i, handle) in calls.into_iter().enumerate() {
        let (response, how) = handle.await.expect("joined");
        assert_eq!(response.id, format!("c-{i}"));
        assert_eq!(sums(&response), (5..21).collect::<Vec<i32>>());
        *served.entry(how).or_insert(0) += 1;
    }
    assert_eq!(sim.control().started(), 1, "served: {served:?}");
    assert_eq!(served.get("miss"), Some(&1), "{served:?}");
    assert_eq!(gw.gateway().cache.flights(), 0);
}

#[tokio::test]
async fn a_waiter_past_its_deadline_gets_deadline_exceeded_while_the_others_get_the_answer() {
    let sim = sim("gpu-0", |_| {});
    sim.control().set_extra_latency_ms(800);
    // The short deadline is the model's default, which only the gateway keeps (a
    // grpc-timeout would also arm the client's own timer, which may fire first).
    let mut cfg = cached(sim.addr(), |_| {});
    if let Some(model) = cfg.models.get_mut("simple") {
        model.deadline_default_ms = Some(150);
    }
    let gw = gateway(cfg).await;
    let addr = gw.addr();
    let long = Some(Duration::from_secs(10));
    let patient_call = move |id: String| async move {
        call(addr, simple_request(&id, 9), long)
            .await
            .expect("the call succeeds")
    };
    let leader = tokio::spawn(patient_call("leader".into()));
    eventually(
        "the leader reaches the backend",
        Duration::from_secs(5),
        || sim.control().in_flight() == 1,
    )
    .await;
    let short = tokio::spawn(async move { call(addr, simple_request("short", 9), None).await });
    let patient: Vec<_> = (0..5)
        .map(|i| tokio::spawn(patient_call(format!("w-{i}"))))
        .collect();
    let status = short.await.expect("joined").expect_err("past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("simple"), "{status:?}");
    assert_eq!(sim.control().in_flight(), 1, "the shared call goes on");
    let (answer, served) = leader.await.expect("joined");
    assert_eq!((answer.id.as_str(), served.as_str()), ("leader", "miss"));
    for (i, w) in patient.into_iter().enumerate() {
        let (answer, served) = w.await.expect("joined");
        assert_eq!(answer.id, format!("w-{i}"));
        assert_eq!(served, "coalesced");
    }
    assert_eq!(sim.control().started(), 1);
}

#[tokio::test]
async fn a_waiter_leads_when_the_leader_goes_away() {
    let sim = sim("gpu-0", |_| {});
    sim.control().set_extra_latency_ms(400);
    let gw = gateway(cached(sim.addr(), |_| {})).await;
    let addr = gw.addr();
    let leader = tokio::spawn(async move { ok(addr, simple_request("leader", 4)).await });
    eventually(
        "the leader reaches the backend",
        Duration::from_secs(5),
        || sim.control().in_flight() == 1,
    )
    .await;
    let waiter = tokio::spawn(async move { ok(addr, simple_request("waiter", 4)).await });
    eventually("the waiter joins", Duration::from_secs(5), || {
        gw.gateway().cache.flights() == 1
    })
    .await;
    leader.abort();
    let (answer, served) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter does not hang")
        .expect("joined");
    assert_eq!(answer.id, "waiter");
    assert_eq!(served, "miss", "it called the backend itself");
    assert_eq!(sums(&answer), (4..20).collect::<Vec<i32>>());
}

#[tokio::test]
async fn a_call_served_by_replica_a_is_an_l2_hit_on_replica_b() {
    let Some(redis) = Redis::start(0).await else {
        return;
    };
    let sim = sim("gpu-0", |_| {});
    let replica = |_: u8| {
        let mut cfg = cached(sim.addr(), |c| c.shared = true);
        cfg.redis.url = Some(redis.url());
        cfg.redis.key_prefix = format!("cache-test-{}", redis.port);
        cfg.redis.timeout_ms = 200;
        cfg
    };
    let a = gateway(replica(0)).await;
    let b = gateway(replica(1)).await;
    let (first, served) = ok(a.addr(), simple_request("on-a", 6)).await;
    assert_eq!(served, "miss");
    let (second, served) = ok(b.addr(), simple_request("on-b", 6)).await;
    assert_eq!(served, "hit");
    assert_eq!(second.id, "on-b");
    assert_eq!(sums(&second), sums(&first));
    assert_eq!(sim.control().started(), 1, "B made no backend call");
    let stats = b.gateway().cache.stats();
    assert_eq!((stats[0].hits_l2, stats[0].entries), (1, 1));
    // Now in B's own L1 too.
    let (_, served) = ok(b.addr(), simple_request("again", 6)).await;
    assert_eq!(served, "hit");
    assert_eq!(b.gateway().cache.stats()[0].hits_l1, 1);

    // A purge empties both levels: the next call on A goes to the backend.
    let purged = a.gateway().cache.purge("simple").await.expect("purged");
    assert_eq!((purged.l1, purged.l2), (1, 1));
    let (_, served) = ok(a.addr(), simple_request("after-purge", 6)).await;
    assert_eq!(served, "miss");
    assert_eq!(sim.control().started(), 2);
    let unknown = a.gateway().cache.purge("nobody").await;
    assert!(unknown.expect_err("no cache").contains("nobody"));
}

#[tokio::test]
async fn the_admin_api_shows_and_purges_the_cache() {
    use infergate_proto::admin::admin_client::AdminClient;
    use infergate_proto::admin::{CacheStatsRequest, PurgeCacheRequest};
    let sim = sim("gpu-0", |_| {});
    let gw = gateway(cached(sim.addr(), |c| c.max_entries = 100)).await;
    for (id, b) in [("a", 1), ("b", 1), ("c", 2)] {
        ok(gw.addr(), simple_request(id, b)).await;
    }
    let mut admin = AdminClient::new(channel(gw.admin_addr()).await);
    let stats = admin
        .cache_stats(CacheStatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.models.len(), 1);
    let m = &stats.models[0];
    assert_eq!(
        (
            m.model.as_str(),
            m.entries,
            m.hits_l1,
            m.misses,
            m.max_entries
        ),
        ("simple", 2, 1, 2, 100)
    );
    assert!(m.bytes > 0 && !m.shared && m.coalesce, "{m:?}");

    let purged = admin
        .purge_cache(PurgeCacheRequest {
            model: "simple".into(),
        })
        .await
        .expect("purged")
        .into_inner();
    assert_eq!((purged.l1_entries, purged.l2_keys), (2, 0));
    let after = admin
        .cache_stats(CacheStatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((after.models[0].entries, after.models[0].bytes), (0, 0));
    let (_, served) = ok(gw.addr(), simple_request("d", 1)).await;
    assert_eq!(served, "miss", "purged entries are gone");

    let unknown = admin
        .purge_cache(PurgeCacheRequest {
            model: "nobody".into(),
        })
        .await
        .expect_err("no cache there");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("nobody"), "{unknown:?}");
}

#[tokio::test]
async fn a_shared_cache_whose_redis_is_away_is_a_miss_not_a_failure() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = free.local_addr().expect("address").port();
    drop(free);
    let sim = sim("gpu-0", |_| {});
    let mut cfg = cached(sim.addr(), |c| c.shared = true);
    cfg.redis.url = Some(format!("redis://127.0.0.1:{port}"));
    cfg.redis.timeout_ms = 50;
    let gw = gateway(cfg).await;
    let (first, served) = ok(gw.addr(), simple_request("a", 8)).await;
    assert_eq!((first.id.as_str(), served.as_str()), ("a", "miss"));
    // L1 still serves.
    let (second, served) = ok(gw.addr(), simple_request("b", 8)).await;
    assert_eq!((second.id.as_str(), served.as_str()), ("b", "hit"));
    assert_eq!(sim.control().started(), 1);
}
