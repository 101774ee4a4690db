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
use tower_lb::discover::{Dns, DnsDiscover, DnsEndpoint, ResolveNow};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::WeightedRoundRobin;
use tower_lb::Balancer;

use support::dns::TestDns;

const LOCAL: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
];

/// A change, as the tests compare them: insert or remove, address, weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Insert(SocketAddr, u16),
    Remove(SocketAddr),
}

/// Host discovery of `name` at port 80 through `dns`, with `settings`
/// applied; services are the addresses themselves.
fn host(
    dns: &TestDns,
    name: &str,
    settings: impl FnOnce(Dns) -> Dns,
) -> (DnsDiscover<SocketAddr>, ResolveNow) {
    settings(Dns::host(name, 80).name_servers([dns.addr]))
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The next changes the stream yields within `wait` of each other, sorted.
async fn changes(stream: &mut DnsDiscover<SocketAddr>, wait: Duration) -> Vec<Seen> {
    let mut seen = Vec::new();
    while let Ok(Some(item)) =
        tokio::time::timeout(wait, poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx))).await
    {
        seen.push(match item {
            Ok(Change::Insert(key, _)) => Seen::Insert(key.addr, key.weight),
            Ok(Change::Remove(key)) => Seen::Remove(key.addr),
            Err(never) => match never {},
        });
    }
    seen.sort();
    seen
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn the_first_resolution_inserts_every_address() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    let (mut stream, _) = host(&dns, "api.test.", |d| d);
    assert_eq!(
        changes(&mut stream, QUIET).await,
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
    let (mut stream, refresh) = host(&dns, "api.test.", |d| d);
    assert_eq!(changes(&mut stream, QUIET).await.len(), 2);
    dns.set_a("api.test.", &LOCAL[1..], 60).await;
    refresh.resolve_now();
    assert_eq!(
        changes(&mut stream, QUIET).await,
        vec![
            Seen::Insert(at(LOCAL[2], 80), 1),
            Seen::Remove(at(LOCAL[0], 80))
        ]
    );
    // Nothing changed: nothing announced.
    refresh.resolve_now();
    assert_eq!(changes(&mut stream, QUIET).await, vec![]);
}

#[tokio::test]
async fn refresh_follows_the_ttl_within_its_bounds() {
    let dns = TestDns::start("test.").await;
    // A 60 s TTL held to at most 250 ms; a 0 s TTL to at least 400 ms.
    dns.set_a("long.test.", &LOCAL[..1], 60).await;
    dns.set_a("short.test.", &LOCAL[1..2], 0).await;
    let bounds = |d: Dns| {
        d.ttl_bounds(Duration::from_millis(400), Duration::from_millis(250))
            .jitter(0.0)
    };
    let capped = |d: Dns| {
        d.ttl_bounds(Duration::from_millis(100), Duration::from_millis(250))
            .jitter(0.0)
    };

    let before = dns.queries();
    let (long, _) = host(&dns, "long.test.", capped);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let long_queries = dns.queries() - before;
    drop(long);
    // At 0, 250, 500, 750 and 1,000 ms; a query may be A and AAAA.
    assert!(
        (5..=12).contains(&long_queries),
        "{long_queries} queries in 1.1 s at most 250 ms apart"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = dns.queries();
    let (short, _) = host(&dns, "short.test.", bounds);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let short_queries = dns.queries() - before;
    drop(short);
    // The minimum wins over the larger maximum here: at 0, 400 and 800 ms.
    assert!(
        (3..=6).contains(&short_queries),
        "{short_queries} queries in 1.1 s at least 400 ms apart"
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
    let (mut stream, _) = Dns::srv("_http._tcp.test.")
        .name_servers([dns.addr])
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        changes(&mut stream, QUIET).await,
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
    let (mut stream, refresh) = host(&dns, "api.test.", |d| {
        d.timeout(Duration::from_millis(300))
            .apply_empty_answers(true)
    });
    assert_eq!(changes(&mut stream, QUIET).await.len(), 2);
    dns.set_failing(true);
    refresh.resolve_now();
    assert_eq!(
        changes(&mut stream, Duration::from_millis(800)).await,
        vec![],
        "no removes"
    );
    dns.set_failing(false);
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    refresh.resolve_now();
    // The retry after the failure picks the change up (back-off 1 s).
    assert_eq!(
        changes(&mut stream, Duration::from_millis(1_500)).await,
        vec![Seen::Remove(at(LOCAL[1], 80))]
    );
}

#[tokio::test]
async fn a_server_that_does_not_answer_keeps_the_last_set() {
    let dns = TestDns::start("test.").await;
    dns.set_a("api.test.", &LOCAL[..2], 60).await;
    let (mut stream, refresh) = host(&dns, "api.test.", |d| {
        d.timeout(Duration::from_millis(200))
            .apply_empty_answers(true)
    });
    assert_eq!(changes(&mut stream, QUIET).await.len(), 2);
    dns.stop();
    refresh.resolve_now();
    assert_eq!(
        changes(&mut stream, Duration::from_millis(800)).await,
        vec![],
        "no removes"
    );
    dns.resume().await;
    dns.set_a("api.test.", &LOCAL[..1], 60).await;
    refresh.resolve_now();
    assert_eq!(
        changes(&mut stream, Duration::from_millis(1_500)).await,
        vec![Seen::Remove(at(LOCAL[1], 80))]
    );
}

#[tokio::test]
async fn an_empty_answer_after_records_keeps_the_set_unless_opted_in() {
    let dns = TestDns::start("test.").await;
    dns.set_a("kept.test.", &LOCAL[..1], 60).await;
    dns.set_a("applied.test.", &LOCAL[..1], 60).await;
    let (mut kept, kept_refresh) = host(&dns, "kept.test.", |d| d);
    let (mut applied, applied_refresh) =
        host(&dns, "applied.test.", |d| d.apply_empty_answers(true));
    assert_eq!(changes(&mut kept, QUIET).await.len(), 1);
    assert_eq!(changes(&mut applied, QUIET).await.len(), 1);
    dns.set_a("kept.test.", &[], 60).await;
    dns.set_a("applied.test.", &[], 60).await;
    kept_refresh.resolve_now();
    applied_refresh.resolve_now();
    assert_eq!(changes(&mut kept, QUIET).await, vec![]);
    assert_eq!(
        changes(&mut applied, QUIET).await,
        vec![Seen::Remove(at(LOCAL[0], 80))]
    );
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
    let (discover, _) = Dns::srv("_http._tcp.test.")
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
}
