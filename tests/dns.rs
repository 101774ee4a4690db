//! DNS discovery against a real DNS server on loopback whose zone the tests
//! change while discovery runs.
#![cfg(feature = "dns")]

mod support;

use std::future::poll_fn;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use tower::discover::Change;
use tower::ServiceExt;
use tower_lb::discover::{Dns, DnsDiscover, DnsEndpoint, DnsError, ResolveNow};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::WeightedRoundRobin;
use tower_lb::Balancer;

use support::dns::TestDns;
use support::CapturedLogs;

const LOCAL: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
];

/// A change, as the tests compare them: insert or remove, address, weight;
/// or the answer that the name has nothing, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Insert(SocketAddr, u16),
    Remove(SocketAddr),
    Nothing(String),
}

/// Host discovery of `name` at port 80 through `dns`, with `settings`
/// applied; services are the addresses themselves.
fn host(
    dns: &TestDns,
    name: &str,
    settings: impl FnOnce(Dns) -> Dns,
) -> (ResolveNow, DnsDiscover<SocketAddr>) {
    settings(Dns::host(name, 80).name_servers([dns.addr]))
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The next change, waiting up to `wait`.
async fn next(stream: &mut DnsDiscover<SocketAddr>, wait: Duration) -> Option<Seen> {
    let item = tokio::time::timeout(wait, poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)))
        .await
        .ok()??;
    Some(match item {
        Ok(Change::Insert(key, _)) => Seen::Insert(key.addr, key.weight),
        Ok(Change::Remove(key)) => Seen::Remove(key.addr),
        Err(empty) => Seen::Nothing(empty.to_string()),
    })
}

/// The next `expected` changes (each within a generous 5 s, for a loaded
/// machine), sorted; then checks that no more follow.
async fn changes(stream: &mut DnsDiscover<SocketAddr>, expected: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    while seen.len() < expected {
        match next(stream, Duration::from_secs(5)).await {
            Some(change) => seen.push(change),
            None => panic!("only {seen:?} of {expected} changes"),
        }
    }
    quiet(stream).await;
    seen.sort();
    seen
}

/// Asserts that nothing more is announced for a while.
async fn quiet(stream: &mut DnsDiscover<SocketAddr>) {
    if let Some(change) = next(stream, Duration::from_millis(300)).await {
        panic!("unexpected {change:?}");
    }
}

/// Asks for a resolution now and waits until the server has seen it.
async fn resolve_now(dns: &TestDns, refresh: &ResolveNow) {
    let before = dns.queries();
    refresh.resolve_now();
    support::wait_until(Duration::from_secs(5), || dns.queries() > before).await;
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[tokio::test]
async fn the_first_resolution_inserts_every_address() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    let (_, mut stream) = host(&dns, "api.test.", |d| d);
    assert_eq!(
        changes(&mut stream, 2).await,
        vec![
            Seen::Insert(at(LOCAL[0], 80), 1),
            Seen::Insert(at(LOCAL[1], 80), 1)
        ]
    );
}

#[tokio::test]
async fn an_added_and_a_removed_record_arrive_as_one_insert_and_one_remove() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    let (refresh, mut stream) = host(&dns, "api.test.", |d| d);
    assert_eq!(changes(&mut stream, 2).await.len(), 2);
    dns.set_a("api.test.", &LOCAL[1..], 60).await;
    resolve_now(&dns, &refresh).await;
    assert_eq!(
        changes(&mut stream, 2).await,
        vec![
            Seen::Insert(at(LOCAL[2], 80), 1),
            Seen::Remove(at(LOCAL[0], 80))
        ]
    );
    // Resolved again, nothing changed: nothing announced.
    resolve_now(&dns, &refresh).await;
    quiet(&mut stream).await;
}

#[tokio::test]
async fn a_replaced_only_address_is_inserted_before_the_old_one_is_removed() {
    // Removed first, a balancer could see a moment with no endpoint, and
    // fail requests at once for a routine address change.
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    let (refresh, mut stream) = host(&dns, "api.test.", |d| d);
    assert_eq!(changes(&mut stream, 1).await.len(), 1);
    dns.set_a("api.test.", &LOCAL[1..2], 60).await;
    resolve_now(&dns, &refresh).await;
    let wait = Duration::from_secs(5);
    assert_eq!(
        next(&mut stream, wait).await,
        Some(Seen::Insert(at(LOCAL[1], 80), 1))
    );
    assert_eq!(
        next(&mut stream, wait).await,
        Some(Seen::Remove(at(LOCAL[0], 80)))
    );
}

/// Resolutions of a host discovery of `name` during `period` (each is an A
/// and an AAAA query).
async fn resolutions(
    dns: &TestDns,
    name: &str,
    settings: impl FnOnce(Dns) -> Dns,
    period: Duration,
) -> usize {
    let before = dns.queries();
    let (_, stream) = host(dns, name, |d| {
        settings(d.jitter(0.0).expect("valid setting"))
    });
    tokio::time::sleep(period).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    (dns.queries() - before) / 2
}

#[tokio::test]
async fn refresh_follows_the_ttl_within_its_bounds() {
    let dns = TestDns::start("test.").await;
    dns.set_a("one.test.", &LOCAL[..1], 1).await;
    dns.set_a("long.test.", &LOCAL[..1], 60).await;
    dns.set_a("zero.test.", &LOCAL[..1], 0).await;
    let period = Duration::from_millis(2_300);
    // The TTL itself, between the bounds: at 0, 1 and 2 s.
    let within = |d: Dns| {
        d.ttl_bounds(Duration::from_millis(100), Duration::from_secs(5))
            .expect("valid setting")
    };
    assert_eq!(resolutions(&dns, "one.test.", within, period).await, 3);
    // A 60 s TTL held to 500 ms: at 0, 0.5, 1, 1.5 and 2 s.
    let capped = |d: Dns| {
        d.ttl_bounds(Duration::from_millis(100), Duration::from_millis(500))
            .expect("valid setting")
    };
    assert_eq!(resolutions(&dns, "long.test.", capped, period).await, 5);
    // A 0 s TTL held to at least 1 s: at 0, 1 and 2 s.
    let floored = |d: Dns| {
        d.ttl_bounds(Duration::from_secs(1), Duration::from_secs(5))
            .expect("valid setting")
    };
    assert_eq!(resolutions(&dns, "zero.test.", floored, period).await, 3);
}

#[tokio::test]
async fn resolve_now_in_a_loop_is_not_a_query_storm() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    let storm = |d: Dns| d;
    let before = dns.queries();
    let (refresh, stream) = host(&dns, "api.test.", storm);
    for _ in 0..500 {
        refresh.resolve_now();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(stream);
    let resolutions = (dns.queries() - before) / 2;
    // 500 calls over about 0.5 s or more: at most one resolution per 100 ms.
    assert!(resolutions <= 12, "{resolutions} resolutions");
}

#[tokio::test]
async fn srv_falls_back_to_the_next_priority_when_the_first_has_no_addresses() {
    let dns = TestDns::start("test.").await;
    dns.set_a("up.test.", &LOCAL[1..2], 60).await;
    dns.set_srv(
        "_http._tcp.test.",
        &[(0, 1, 8081, "gone.test."), (10, 2, 8082, "up.test.")],
        60,
    )
    .await;
    let (_, mut stream) = Dns::srv("_http._tcp.test.")
        .name_servers([dns.addr])
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        changes(&mut stream, 1).await,
        vec![Seen::Insert(at(LOCAL[1], 8082), 2)]
    );
}

#[tokio::test]
async fn srv_records_give_ports_and_weights_of_the_lowest_priority() {
    let dns = TestDns::start("test.").await;
    dns.set_a("a.test.", &LOCAL[..1], 60).await;
    dns.set_a("b.test.", &LOCAL[1..2], 60).await;
    dns.set_a("c.test.", &LOCAL[2..], 60).await;
    dns.set_srv(
        "_http._tcp.test.",
        &[
            (10, 5, 8081, "a.test."),
            (10, 1, 8082, "b.test."),
            (20, 1, 8083, "c.test."),
        ],
        60,
    )
    .await;
    let (_, mut stream) = Dns::srv("_http._tcp.test.")
        .name_servers([dns.addr])
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        changes(&mut stream, 2).await,
        vec![
            Seen::Insert(at(LOCAL[0], 8081), 5),
            Seen::Insert(at(LOCAL[1], 8082), 1)
        ]
    );
}

#[tokio::test]
async fn a_dns_outage_keeps_the_last_set() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    // Even opted in to empty answers: a SERVFAIL is not an empty answer.
    let (refresh, mut stream) = host(&dns, "api.test.", |d| {
        d.timeout(Duration::from_millis(300))
            .apply_empty_answers(true)
    });
    assert_eq!(changes(&mut stream, 2).await.len(), 2);
    dns.set_failing(true);
    resolve_now(&dns, &refresh).await;
    quiet(&mut stream).await;
    dns.set_failing(false);
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    // The retry after the failure (back-off 1 s) picks the change up.
    assert_eq!(
        changes(&mut stream, 1).await,
        vec![Seen::Remove(at(LOCAL[1], 80))]
    );
}

#[tokio::test]
async fn a_server_that_does_not_answer_keeps_the_last_set() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    let (refresh, mut stream) = host(&dns, "api.test.", |d| {
        d.timeout(Duration::from_millis(200))
            .apply_empty_answers(true)
    });
    assert_eq!(changes(&mut stream, 2).await.len(), 2);
    dns.stop();
    refresh.resolve_now();
    quiet(&mut stream).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    dns.resume().await;
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    assert_eq!(
        changes(&mut stream, 1).await,
        vec![Seen::Remove(at(LOCAL[1], 80))]
    );
}

#[tokio::test]
async fn an_empty_answer_after_records_keeps_the_set_unless_opted_in() {
    let dns = TestDns::start("test.").await;
    dns.set_a("kept.test.", &LOCAL[..1], 60).await;
    dns.set_a("applied.test.", &LOCAL[..1], 60).await;
    let (kept_refresh, mut kept) = host(&dns, "kept.test.", |d| d);
    let (applied_refresh, mut applied) =
        host(&dns, "applied.test.", |d| d.apply_empty_answers(true));
    assert_eq!(changes(&mut kept, 1).await.len(), 1);
    assert_eq!(changes(&mut applied, 1).await.len(), 1);
    dns.set_a("kept.test.", &[], 60).await;
    dns.set_a("applied.test.", &[], 60).await;
    resolve_now(&dns, &kept_refresh).await;
    resolve_now(&dns, &applied_refresh).await;
    quiet(&mut kept).await;
    assert_eq!(
        changes(&mut applied, 2).await,
        vec![
            Seen::Remove(at(LOCAL[0], 80)),
            Seen::Nothing("DNS name applied.test. does not exist (NXDOMAIN)".into())
        ]
    );
}

#[tokio::test]
async fn srv_with_every_priority_fails_over_from_the_lowest_priority_as_its_endpoints_fail() {
    let servers = support::servers(2, Duration::ZERO).await;
    let dns = TestDns::start("test.").await;
    dns.set_a("web.test.", &LOCAL[..1], 60).await;
    let (first, second) = (servers[0].addr.port(), servers[1].addr.port());
    dns.set_srv(
        "_http._tcp.test.",
        &[(0, 1, first, "web.test."), (10, 1, second, "web.test.")],
        60,
    )
    .await;
    let client = lb_http::client();
    let (_refresh, discover) = Dns::srv("_http._tcp.test.")
        .every_priority()
        .name_servers([dns.addr])
        .build(move |addr| HttpEndpoint::new(client.clone(), addr))
        .unwrap_or_else(|e| panic!("{e}"));
    let balancer = Balancer::builder()
        .metadata(DnsEndpoint::metadata)
        .classify(tower_lb::classify::HttpClassify::server_errors())
        .outlier_detection(tower_lb::health::OutlierDetection::new())
        .build(discover);
    let send = |n: usize| {
        let balancer = balancer.clone();
        async move {
            for _ in 0..n {
                let _ = balancer.clone().oneshot(support::get()).await;
            }
        }
    };
    send(50).await;
    assert_eq!((servers[0].hits(), servers[1].hits()), (50, 0));
    let mut priorities: Vec<u32> = balancer
        .endpoints()
        .iter()
        .map(|e| e.metadata.priority())
        .collect();
    priorities.sort_unstable();
    assert_eq!(priorities, [0, 10]);

    // The first priority's only server fails: ejected after five failures
    // in a row, its level has nothing in service, and the next takes over.
    servers[0].fail_every(1);
    send(5).await;
    support::wait_until(Duration::from_secs(5), || {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.state == tower_lb::EndpointState::Ejected)
    })
    .await;
    send(50).await;
    assert_eq!(servers[1].hits(), 50);
}

#[tokio::test]
async fn a_balancer_over_srv_discovery_weighs_endpoints_by_their_records() {
    let servers = support::servers(2, Duration::ZERO).await;
    let dns = TestDns::start("test.").await;
    dns.set_a("web.test.", &LOCAL[..1], 60).await;
    let (p1, p2) = (servers[0].addr.port(), servers[1].addr.port());
    dns.set_srv(
        "_http._tcp.test.",
        &[(0, 3, p1, "web.test."), (0, 1, p2, "web.test.")],
        60,
    )
    .await;
    let client = lb_http::client();
    let (refresh, discover) = Dns::srv("_http._tcp.test.")
        .name_servers([dns.addr])
        .build(move |addr| HttpEndpoint::new(client.clone(), addr))
        .unwrap_or_else(|e| panic!("{e}"));
    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new())
        .static_weights(DnsEndpoint::static_weight)
        .build(discover);
    for _ in 0..2_000 {
        let response = balancer.clone().oneshot(support::get()).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::OK)
        );
    }
    let share = servers[0].hits() as f64 / 2_000.0;
    assert!((share - 0.75).abs() < 0.02, "weight 3 of 4 got {share:.3}");

    // The weights change in DNS: the same endpoints, re-weighted.
    dns.set_srv(
        "_http._tcp.test.",
        &[(0, 1, p1, "web.test."), (0, 3, p2, "web.test.")],
        60,
    )
    .await;
    refresh.resolve_now();
    support::wait_until(Duration::from_secs(5), || {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.key.weight == 3 && e.key.addr.port() == p2 && e.static_weight == 3.0)
    })
    .await;
    let before = servers[0].hits();
    for _ in 0..2_000 {
        let response = balancer.clone().oneshot(support::get()).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::OK)
        );
    }
    let share = (servers[0].hits() - before) as f64 / 2_000.0;
    assert!((share - 0.25).abs() < 0.02, "weight 1 of 4 got {share:.3}");
}

/// Well under the default 5 s startup wait: an error that comes sooner did
/// not wait for an endpoint that DNS has said will not come.
const AT_ONCE: Duration = Duration::from_secs(1);

/// A balancer over the A/AAAA records of `name` at port 80, with `settings`.
fn balancer_over(
    dns: &TestDns,
    name: &str,
    settings: impl FnOnce(Dns) -> Dns,
) -> (
    Balancer<DnsEndpoint, HttpEndpoint<support::Body>>,
    ResolveNow,
) {
    let client = lb_http::client();
    let (refresh, discover) = settings(Dns::host(name, 80).name_servers([dns.addr]))
        .build(move |addr| HttpEndpoint::new(client.clone(), addr))
        .unwrap_or_else(|e| panic!("{e}"));
    (Balancer::builder().build(discover), refresh)
}

/// Sends one GET that must fail: its error, and how long it took.
async fn failure_and_time(
    balancer: &Balancer<DnsEndpoint, HttpEndpoint<support::Body>>,
) -> (tower_lb::Error, Duration) {
    let started = tokio::time::Instant::now();
    let err = balancer
        .clone()
        .oneshot(support::get())
        .await
        .expect_err("the name has no addresses");
    (err, started.elapsed())
}

#[tokio::test]
async fn a_name_that_does_not_exist_is_a_warning_and_fails_requests_at_once() {
    let logs = CapturedLogs::global();
    let dns = TestDns::start("test.").await;
    let (balancer, _) = balancer_over(&dns, "missing.test.", |d| d);
    let (err, took) = failure_and_time(&balancer).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: DNS name missing.test. does not exist (NXDOMAIN)"
    );
    let reason = match &err {
        tower_lb::Error::DiscoveredNone { reason } => reason.reason(),
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(reason.downcast_ref(), Some(DnsError::NxDomain { name }) if name == "missing.test."),
        "{reason:?}"
    );
    let warned = logs.lines_with(&["WARN", "name=missing.test.", "NXDOMAIN"]);
    assert!(!warned.is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn a_name_without_address_records_is_a_warning_and_fails_requests_at_once() {
    let logs = CapturedLogs::global();
    let dns = TestDns::start("test.").await;
    // The name exists (it has an SRV record) but has no A or AAAA record.
    dns.set_srv("bare.test.", &[(0, 1, 80, "elsewhere.test.")], 60)
        .await;
    let (balancer, _) = balancer_over(&dns, "bare.test.", |d| d);
    let (err, took) = failure_and_time(&balancer).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: DNS name bare.test. has no A or AAAA records"
    );
    let warned = logs.lines_with(&["WARN", "name=bare.test.", "no A or AAAA records"]);
    assert!(!warned.is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn a_name_emptied_in_dns_fails_requests_at_once_when_empty_answers_apply() {
    let dns = TestDns::start("test.").await;
    dns.set_a("gone.test.", &LOCAL[..1], 60).await;
    let (balancer, refresh) = balancer_over(&dns, "gone.test.", |d| d.apply_empty_answers(true));
    support::wait_until(Duration::from_secs(5), || balancer.endpoints().len() == 1).await;
    dns.set_a("gone.test.", &[], 60).await;
    resolve_now(&dns, &refresh).await;
    support::wait_until(Duration::from_secs(5), || {
        balancer
            .endpoints()
            .iter()
            .all(|e| e.state != tower_lb::EndpointState::Active)
    })
    .await;
    let (err, took) = failure_and_time(&balancer).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: DNS name gone.test. does not exist (NXDOMAIN)"
    );
}

/// A port free on both `127.0.0.2` and `127.0.0.3`, and a listener holding
/// it on `127.0.0.3` (the new home of a service whose old address,
/// `127.0.0.2`, now refuses connections).
async fn moved_service() -> (u16, tokio::net::TcpListener) {
    for _ in 0..20 {
        let listener = tokio::net::TcpListener::bind("127.0.0.3:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return (port, listener);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Serves HTTP/1.1 `200 ok` on `listener` and gRPC's health service
/// (SERVING) on the same port, through hyper's automatic protocol choice.
fn serve_ok(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (_reporter, health) = tonic_health::server::health_reporter();
        while let Ok((stream, _)) = listener.accept().await {
            let health = health.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let health = health.clone();
                        async move {
                            if req.version() == http::Version::HTTP_2 {
                                match health.oneshot(req).await {
                                    Ok(response) => Ok::<_, std::convert::Infallible>(response),
                                    Err(never) => match never {},
                                }
                            } else {
                                Ok(http::Response::new(tonic::body::Body::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                )))
                            }
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    })
}

/// Once the client knows the name's old address, the records move to the
/// new one (the old answer's TTL, five minutes, is not up).
async fn move_the_name(dns: &TestDns, handle: &tower_lb::client::BalancerHandle<DnsEndpoint>) {
    support::wait_until(Duration::from_secs(5), || handle.endpoints().len() == 1).await;
    dns.set_a("moved.test.", &[Ipv4Addr::new(127, 0, 0, 3)], 300)
        .await;
}

/// Waits (up to 3 s) until the client has the moved service's new address.
async fn found_the_new_address(handle: &tower_lb::client::BalancerHandle<DnsEndpoint>) {
    support::wait_until(Duration::from_secs(3), || {
        handle
            .endpoints()
            .iter()
            .any(|e| e.key.addr.ip() == Ipv4Addr::new(127, 0, 0, 3))
    })
    .await;
}

/// A name whose address moved: the records now name the new one, but the
/// old answer had a TTL of five minutes.
async fn name_that_moved(dns: &TestDns, port: u16) -> Dns {
    dns.set_a("moved.test.", &[Ipv4Addr::new(127, 0, 0, 2)], 300)
        .await;
    Dns::host("moved.test.", port).name_servers([dns.addr])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_resolves_again_at_once_when_it_cannot_connect_and_finds_the_new_address() {
    let (port, listener) = moved_service().await;
    let _server = serve_ok(listener);
    let dns = TestDns::start("test.").await;
    let client = tower_lb::client::HttpClient::builder()
        .build_dns::<support::Body>(name_that_moved(&dns, port).await)
        .unwrap_or_else(|e| panic!("{e}"));
    move_the_name(&dns, client.balancer()).await;
    let queries = dns.queries();

    // The old address refuses: this request fails, and makes the client ask.
    assert!(client.clone().oneshot(support::get()).await.is_err());
    found_the_new_address(client.balancer()).await;
    let response = client
        .clone()
        .oneshot(support::get())
        .await
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)));
    assert_eq!(response.status(), 200);
    // One more resolution (A and AAAA), not one per failed attempt.
    assert!(
        dns.queries() - queries <= 4,
        "{} queries",
        dns.queries() - queries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_channel_resolves_again_at_once_when_it_cannot_connect_and_finds_the_new_address() {
    let (port, listener) = moved_service().await;
    let _server = serve_ok(listener);
    let dns = TestDns::start("test.").await;
    let channel = tower_lb::client::GrpcChannel::builder()
        .build_dns(name_that_moved(&dns, port).await)
        .unwrap_or_else(|e| panic!("{e}"));
    move_the_name(&dns, channel.balancer()).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let request = || tonic_health::pb::HealthCheckRequest::default();
    assert!(health.check(request()).await.is_err());
    found_the_new_address(channel.balancer()).await;
    health
        .check(request())
        .await
        .unwrap_or_else(|status| panic!("{status}"));
}

/// A port free on both `127.0.0.2` and `127.0.0.3`, a listener holding it
/// on `127.0.0.3`, and on `127.0.0.2` a socket that listens and never
/// accepts, its backlog filled: a connect to it gets no answer at all
/// (the kernel drops the SYN), as to a host that is gone.
async fn service_moved_from_a_black_hole() -> (
    u16,
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    for _ in 0..20 {
        // Free on 127.0.0.2 a moment ago; another test may take it first.
        let (port, listener) = moved_service().await;
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            continue;
        };
        if socket
            .bind(SocketAddr::from(([127, 0, 0, 2], port)))
            .is_err()
        {
            continue;
        }
        let Ok(hole) = socket.listen(1) else { continue };
        // Fill the accept queue (a backlog of 1 takes about two).
        let mut held = Vec::new();
        for _ in 0..4 {
            let connect = tokio::net::TcpStream::connect(("127.0.0.2", port));
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await
            {
                held.push(stream);
            }
        }
        return (port, listener, held, hole);
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_resolves_again_when_a_connect_to_an_address_that_never_answers_is_given_up()
{
    let (port, listener, _held, _hole) = service_moved_from_a_black_hole().await;
    let _server = serve_ok(listener);
    let dns = TestDns::start("test.").await;
    let client = tower_lb::client::HttpClient::builder()
        .attempt_timeout(Duration::from_millis(300))
        .no_retries()
        .build_dns::<support::Body>(name_that_moved(&dns, port).await)
        .unwrap_or_else(|e| panic!("{e}"));
    move_the_name(&dns, client.balancer()).await;

    // The connect hangs; the attempt timeout gives up on it.
    assert!(client.clone().oneshot(support::get()).await.is_err());
    found_the_new_address(client.balancer()).await;
}
