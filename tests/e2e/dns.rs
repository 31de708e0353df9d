//! DNS discovery end to end: a real authoritative DNS server (hickory-server, in-memory
//! zone) answers real queries over UDP (and TCP) on 127.0.0.1, and `infergate::dns`
//! watches a name in it while the zone changes under it, while the server goes away,
//! and against a name server that is not there.
//!
//! Nothing sleeps to synchronise: `apply` calls arrive on a channel and resolution
//! rounds on the watcher's status, both awaited with a deadline. Nothing here is
//! random (the resolver's query ids and source ports are, and do not matter).

use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use infergate::config::DnsConfig;
use infergate::dns::{Change, DnsStatus, DnsWatcher};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};

const ORIGIN: &str = "infergate.test.";
const HOST: &str = "backends.infergate.test.";
/// The backends' gRPC port: DNS carries none, the config supplies it.
const PORT: u16 = 8001;
/// Longest any single expectation may take.
const WAIT: Duration = Duration::from_secs(10);

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("valid name")
}

fn a_record(ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(HOST), 1, RData::A(A(ip)))
}

fn backend(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((ip, PORT))
}

/// The zone `infergate.test.` with `backends` holding one A record per address.
fn zone(ips: &[[u8; 4]]) -> Arc<Zone> {
    let mut zone = Zone::empty(name(ORIGIN), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        name("ns.infergate.test."),
        name("admin.infergate.test."),
        1,
        3600,
        600,
        86400,
        1,
    );
    assert!(zone.upsert_mut(Record::from_rdata(name(ORIGIN), 1, RData::SOA(soa)), 1));
    for ip in ips {
        assert!(zone.upsert_mut(a_record(Ipv4Addr::from(*ip)), 1));
    }
    Arc::new(zone)
}

/// Replaces the A record set of `backends` in one step, while the server runs.
async fn set_backends(zone: &Zone, ips: &[[u8; 4]], serial: u32) {
    let mut set = RecordSet::new(name(HOST), RecordType::A, serial);
    for ip in ips {
        assert!(set.insert(a_record(Ipv4Addr::from(*ip)), serial));
    }
    let key = RrKey::new(LowerName::from(name(HOST)), RecordType::A);
    zone.records_mut().await.insert(key, Arc::new(set));
}

/// An authoritative server for `zone` on `addr` (UDP, and TCP on the same port).
async fn serve(addr: SocketAddr, zone: Arc<Zone>) -> (Server<Catalog>, SocketAddr) {
    let (udp, tcp, addr) = bind_both(addr).await;
    let mut catalog = Catalog::new();
    let handler: Arc<dyn ZoneHandler> = zone;
    catalog.upsert(LowerName::from(name(ORIGIN)), vec![handler]);
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 32);
    (server, addr)
}

/// A UDP socket and a TCP listener on the same port: `addr`'s, or (port 0) the first
/// free for both, trying again when another test holds the TCP side of a UDP port.
async fn bind_both(addr: SocketAddr) -> (UdpSocket, TcpListener, SocketAddr) {
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await.expect("bind DNS/UDP");
        let bound = udp.local_addr().expect("UDP address");
        match TcpListener::bind(bound).await {
            Ok(tcp) => return (udp, tcp, bound),
            Err(e) if addr.port() != 0 => panic!("bind DNS/TCP on {bound}: {e}"),
            Err(_) => continue,
        }
    }
    panic!("no port free for both UDP and TCP on {}", addr.ip());
}

/// A UDP and TCP port on 127.0.0.1 that both were free a moment ago.
async fn free_loopback() -> SocketAddr {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = udp.local_addr().expect("UDP address");
        if TcpListener::bind(addr).await.is_ok() {
            return addr;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

fn watcher(nameserver: SocketAddr) -> DnsWatcher {
    let config = DnsConfig {
        name: HOST.into(),
        port: PORT,
        interval_ms: 50,
        nameserver: Some(nameserver),
    };
    DnsWatcher::new(config).expect("watcher")
}

/// Runs `watcher`; its `apply` calls come out of the returned channel.
fn spawn(
    watcher: DnsWatcher,
) -> (
    mpsc::UnboundedReceiver<Change>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(watcher.run(
        move |change| {
            let _ = tx.send(change);
        },
        shutdown,
    ));
    (rx, stop, task)
}

async fn next_change(rx: &mut mpsc::UnboundedReceiver<Change>) -> Change {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a change within the deadline")
        .expect("watcher still running")
}

async fn wait_status(
    status: &mut watch::Receiver<DnsStatus>,
    what: &str,
    f: impl FnMut(&DnsStatus) -> bool,
) -> DnsStatus {
    tokio::time::timeout(WAIT, status.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("watcher status")
        .clone()
}

async fn stop(stop: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
    stop.send(true).expect("watcher listening");
    tokio::time::timeout(WAIT, task)
        .await
        .expect("watcher stops on shutdown")
        .expect("watcher task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_zone_as_it_changes() {
    let zone = zone(&[[127, 0, 0, 1], [127, 0, 0, 2]]);
    let (_server, dns) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), zone.clone()).await;
    let watcher = watcher(dns);

    // One direct resolution, and the two kinds of empty answer.
    let once = watcher.resolve_once().await.expect("resolves");
    assert_eq!(
        once,
        BTreeSet::from([backend([127, 0, 0, 1]), backend([127, 0, 0, 2])])
    );
    for (what, other) in [
        ("NXDOMAIN", "missing.infergate.test."),
        ("no A/AAAA", ORIGIN),
    ] {
        let mut config = watcher.config().clone();
        config.name = other.into();
        let empty = DnsWatcher::new(config)
            .expect("watcher")
            .resolve_once()
            .await;
        assert_eq!(empty, Ok(BTreeSet::new()), "{what} is an empty set");
    }

    let (mut changes, stop_tx, task) = spawn(watcher);
    assert_eq!(
        next_change(&mut changes).await,
        Change {
            added: vec![backend([127, 0, 0, 1]), backend([127, 0, 0, 2])],
            removed: vec![],
        },
        "the first resolution reports everything as added"
    );

    set_backends(&zone, &[[127, 0, 0, 1], [127, 0, 0, 3]], 2).await;
    assert_eq!(
        next_change(&mut changes).await,
        Change {
            added: vec![backend([127, 0, 0, 3])],
            removed: vec![backend([127, 0, 0, 2])],
        }
    );

    stop(stop_tx, task).await;
    assert!(
        changes.try_recv().is_err(),
        "no further change was reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_keeps_the_previous_set() {
    let addr = free_loopback().await;
    let (mut server, dns) = serve(addr, zone(&[[127, 0, 0, 1], [127, 0, 0, 2]])).await;
    let watcher = watcher(dns);
    let mut status = watcher.status();
    let (mut changes, stop_tx, task) = spawn(watcher);
    let first = next_change(&mut changes).await;
    assert_eq!(first.added.len(), 2);

    // The name server goes away: rounds fail, nothing is removed.
    server
        .shutdown_gracefully()
        .await
        .expect("DNS server stops");
    drop(server);
    let failed = wait_status(&mut status, "two failed rounds", |s| {
        s.consecutive_failures >= 2
    })
    .await;
    let error = failed.last_error.expect("the failure is recorded");
    assert!(
        error.contains(HOST),
        "the error names the DNS name: {error}"
    );
    assert_eq!(
        failed.addresses,
        Some(BTreeSet::from([
            backend([127, 0, 0, 1]),
            backend([127, 0, 0, 2])
        ])),
        "the last good set is kept"
    );
    assert!(
        changes.try_recv().is_err(),
        "a failed lookup reports no change"
    );

    // It comes back (same port) with a different zone: the change is relative to the
    // set from before the outage, so nothing was dropped in between.
    let (_server, again) = serve(dns, zone(&[[127, 0, 0, 1], [127, 0, 0, 3]])).await;
    assert_eq!(again, dns);
    assert_eq!(
        next_change(&mut changes).await,
        Change {
            added: vec![backend([127, 0, 0, 3])],
            removed: vec![backend([127, 0, 0, 2])],
        }
    );
    let recovered = wait_status(&mut status, "a successful round", |s| {
        s.consecutive_failures == 0
    })
    .await;
    assert_eq!(recovered.last_error, None);
    assert!(recovered.failures >= 2);

    stop(stop_tx, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_name_server_is_an_error_not_an_empty_set() {
    // Nothing listens here.
    let nowhere = free_loopback().await;
    let watcher = watcher(nowhere);
    let error = watcher
        .resolve_once()
        .await
        .expect_err("no name server answers");
    assert!(
        error.contains(HOST),
        "the error names the DNS name: {error}"
    );

    let mut status = watcher.status();
    let (mut changes, stop_tx, task) = spawn(watcher);
    let failed = wait_status(&mut status, "a failed round", |s| s.failures >= 1).await;
    assert_eq!(failed.addresses, None, "no set yet");
    assert!(
        changes.try_recv().is_err(),
        "a failed lookup reports nothing"
    );
    stop(stop_tx, task).await;
}

/// The gateway end to end: backends come and go with the zone's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_adds_and_drains_backends_as_records_change() {
    // Three simulated backends on 127.0.0.1, .2 and .3, all on one port.
    let first = infergate_sim::spawn(infergate_sim::SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        name: "dns-1".into(),
        latency_ms: 1.0,
        ..Default::default()
    })
    .expect("sim on 127.0.0.1");
    let port = first.addr().port();
    let at = |ip: [u8; 4], n: &str| {
        infergate_sim::spawn(infergate_sim::SimConfig {
            listen: SocketAddr::from((ip, port)),
            name: n.into(),
            latency_ms: 1.0,
            ..Default::default()
        })
        .expect("sim on another loopback address")
    };
    let (second, third) = (at([127, 0, 0, 2], "dns-2"), at([127, 0, 0, 3], "dns-3"));
    let zone = zone(&[[127, 0, 0, 1], [127, 0, 0, 2]]);
    let (_server, dns) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), zone.clone()).await;

    let mut cfg = infergate::config::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Default::default()
    };
    cfg.health.interval_ms = 100;
    cfg.balancer.slow_start_ms = 0;
    cfg.dns = vec![DnsConfig {
        name: HOST.into(),
        port,
        interval_ms: 50,
        nameserver: Some(dns),
    }];
    let gw = infergate::server::start(cfg, "test")
        .await
        .expect("gateway");
    let addresses = |gw: &infergate::server::GatewayHandle| -> BTreeSet<String> {
        gw.pool()
            .endpoints()
            .iter()
            .map(|e| e.address().to_owned())
            .collect()
    };
    let expect = |ips: &[u8]| -> BTreeSet<String> {
        ips.iter().map(|i| format!("127.0.0.{i}:{port}")).collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while addresses(&gw) != expect(&[1, 2])
        || !gw
            .pool()
            .endpoints()
            .iter()
            .all(|e| e.is_eligible() && e.serves("simple"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backends from DNS: {:?}",
            addresses(&gw)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client =
        infergate_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            channel,
        );
    let request = || infergate_proto::inference::ModelInferRequest {
        model_name: "simple".into(),
        inputs: ["INPUT0", "INPUT1"]
            .iter()
            .map(
                |n| infergate_proto::inference::model_infer_request::InferInputTensor {
                    name: (*n).into(),
                    datatype: "INT32".into(),
                    shape: vec![1, 16],
                    ..Default::default()
                },
            )
            .collect(),
        raw_input_contents: vec![vec![0u8; 64], vec![0u8; 64]],
        ..Default::default()
    };
    for _ in 0..40 {
        client.model_infer(request()).await.expect("served");
    }
    assert!(first.control().started() > 0 && second.control().started() > 0);

    // The record for .2 goes, one for .3 comes: .3 joins, .2 is drained and removed.
    set_backends(&zone, &[[127, 0, 0, 1], [127, 0, 0, 3]], 2).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while addresses(&gw) != expect(&[1, 3])
        || !gw
            .pool()
            .endpoints()
            .iter()
            .all(|e| e.is_eligible() && e.serves("simple"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backends after the change: {:?}",
            addresses(&gw)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = second.control().started();
    for _ in 0..40 {
        client.model_infer(request()).await.expect("served");
    }
    assert_eq!(
        second.control().started(),
        before,
        "the removed backend gets nothing"
    );
    assert!(
        third.control().started() > 0,
        "the added backend takes traffic"
    );
    let sources: BTreeSet<String> = gw
        .pool()
        .endpoints()
        .iter()
        .map(|e| e.source().to_owned())
        .collect();
    assert_eq!(sources, BTreeSet::from(["dns".to_owned()]));
}
