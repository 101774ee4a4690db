//! Topology against real servers on loopback: endpoints described by their
//! discovery key, priority levels failing over by Envoy's 1.4 rule as
//! active checks take primaries out, and back when they heal.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::health::CheckStatus;
use tower_lb::topology::{EndpointMetadata, Readiness};

use support::checked::{fast_http_check, HealthzServer};
use support::{get, wait_until, Body};

const WAIT: Duration = Duration::from_secs(5);

/// An `HttpClient` over `primaries` (priority 0) and `fallbacks` (priority
/// 1), checked actively, with a seeded balancer so that the level draws
/// repeat.
fn client(primaries: &[HealthzServer], fallbacks: &[HealthzServer]) -> HttpClient<Body> {
    let fallback: Arc<HashSet<SocketAddr>> = Arc::new(fallbacks.iter().map(|s| s.addr).collect());
    let all: Vec<SocketAddr> = primaries.iter().chain(fallbacks).map(|s| s.addr).collect();
    HttpClient::builder()
        .health_check(fast_http_check())
        .balancer(|b| {
            b.seed(7).metadata(move |addr: &SocketAddr| {
                let priority = u32::from(fallback.contains(addr));
                EndpointMetadata::new().with_priority(priority)
            })
        })
        .build::<Body>(all)
}

fn passing(client: &HttpClient<Body>, servers: &[HealthzServer]) -> usize {
    let all = client.balancer().endpoints();
    servers
        .iter()
        .filter(|s| {
            all.iter()
                .any(|e| e.key == s.addr && e.health_check == Some(CheckStatus::Passing))
        })
        .count()
}

/// Sends `n` GETs one after another; returns how many reached `servers`.
async fn share_of(client: &HttpClient<Body>, servers: &[HealthzServer], n: usize) -> usize {
    let before: usize = servers.iter().map(HealthzServer::traffic).sum();
    for i in 0..n {
        let response = client.clone().oneshot(get()).await;
        let response =
            response.unwrap_or_else(|e| panic!("GET {i}: {}", tower_lb::error::report(&*e)));
        assert_eq!(response.status(), 200);
    }
    servers.iter().map(HealthzServer::traffic).sum::<usize>() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_primaries_move_traffic_to_the_next_level_by_the_overprovisioning_rule_and_back() {
    let mut primaries = Vec::new();
    for _ in 0..4 {
        primaries.push(HealthzServer::start().await);
    }
    let fallbacks = vec![HealthzServer::start().await, HealthzServer::start().await];
    let client = client(&primaries, &fallbacks);
    wait_until(WAIT, || {
        passing(&client, &primaries) == 4 && passing(&client, &fallbacks) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    // All primaries in service: they take everything.
    assert_eq!(share_of(&client, &fallbacks, 200).await, 0);
    let levels: Vec<u32> = client
        .balancer()
        .endpoints()
        .iter()
        .map(|e| e.metadata.priority())
        .collect();
    assert_eq!(levels.iter().filter(|&&p| p == 1).count(), 2, "{levels:?}");

    // 3 of 4 in service: 75 % x 1.4 covers it; still everything.
    primaries[0].set_health(503);
    wait_until(WAIT, || passing(&client, &primaries) == 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(share_of(&client, &fallbacks, 200).await, 0);

    // 2 of 4: 50 % x 1.4 = 70 % stays, 30 % moves to the fallbacks.
    primaries[1].set_health(503);
    wait_until(WAIT, || passing(&client, &primaries) == 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let moved = share_of(&client, &fallbacks, 1000).await;
    assert!(
        (240..=360).contains(&moved),
        "{moved} of 1000 to the fallbacks, not about 300"
    );

    // None: everything to the fallbacks, nothing to the failing primaries.
    primaries[2].set_health(503);
    primaries[3].set_health(503);
    wait_until(WAIT, || passing(&client, &primaries) == 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(share_of(&client, &fallbacks, 200).await, 200);
    assert!(!client.balancer().endpoints().is_empty());

    // Healed: back to the primaries.
    for primary in &primaries {
        primary.set_health(200);
    }
    wait_until(WAIT, || passing(&client, &primaries) == 4).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(share_of(&client, &fallbacks, 200).await, 0);
}

#[tokio::test]
async fn a_terminating_endpoint_gets_requests_only_while_none_of_its_level_is_ready() {
    let (ready, terminating) = (
        support::TestServer::start().await,
        support::TestServer::start().await,
    );
    let stopping = terminating.addr;
    let client = |addrs: Vec<SocketAddr>| {
        HttpClient::builder()
            .balancer(|b| {
                b.metadata(move |addr: &SocketAddr| {
                    let readiness = if *addr == stopping {
                        Readiness::Terminating
                    } else {
                        Readiness::Ready
                    };
                    EndpointMetadata::new().with_readiness(readiness)
                })
            })
            .build::<Body>(addrs)
    };
    let send = |client: HttpClient<Body>| async move {
        for _ in 0..20 {
            let response = client.clone().oneshot(get()).await;
            assert!(response.is_ok());
        }
    };
    send(client(vec![ready.addr, terminating.addr])).await;
    assert_eq!((ready.hits(), terminating.hits()), (20, 0));
    // Alone in its level, it still serves: a last resort, not out of service.
    send(client(vec![terminating.addr])).await;
    assert_eq!(terminating.hits(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_routing_keeps_requests_local_and_spills_what_the_zone_lacks() {
    let mut servers = Vec::new();
    for _ in 0..9 {
        servers.push(HealthzServer::start().await);
    }
    // Three zones of three: a (the client's), b, c.
    let zone_of: Arc<Vec<(SocketAddr, &'static str)>> = Arc::new(
        servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.addr, ["a", "b", "c"][i / 3]))
            .collect(),
    );
    let all: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .balancer(|b| {
            b.seed(11)
                .zone_aware(tower_lb::topology::ZoneAware::new("a"))
                .metadata(move |addr: &SocketAddr| {
                    let zone = zone_of.iter().find(|(a, _)| a == addr).map_or("?", |z| z.1);
                    EndpointMetadata::new().with_zone(zone)
                })
        })
        .build::<Body>(all);
    let (local, remote) = servers.split_at(3);
    wait_until(WAIT, || passing(&client, &servers) == 9).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        share_of(&client, remote, 300).await,
        0,
        "a whole zone keeps everything"
    );

    // Two of the three local servers fail their check: the zone has 1 of 7
    // in service for a third of the clients, so it keeps 3/7 of the
    // requests, and b and c share the rest.
    local[0].set_health(503);
    local[1].set_health(503);
    wait_until(WAIT, || passing(&client, local) == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let spilled = share_of(&client, remote, 1000).await;

    assert!(
        (500..=640).contains(&spilled),
        "{spilled} of 1000 left the zone, not about 571"
    );
    let (b, c) = remote.split_at(3);
    let to_b: usize = b.iter().map(HealthzServer::traffic).sum();
    let to_c: usize = c.iter().map(HealthzServer::traffic).sum();
    assert!(
        to_b.abs_diff(to_c) < 120,
        "b {to_b}, c {to_c}: not about even"
    );

    // Healed: everything stays in the zone again.
    local[0].set_health(200);
    local[1].set_health(200);
    wait_until(WAIT, || passing(&client, local) == 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(share_of(&client, remote, 300).await, 0);
}

/// Seven servers: one in zone a answering in 60 ms, three each in zones b
/// and c answering at once; and a client in zone a, which holds a third of
/// the clients, with or without the load-aware spill.
async fn short_slow_zone(spill: bool) -> (Vec<support::TestServer>, HttpClient<Body>) {
    let mut servers = vec![support::TestServer::with_delay(Duration::from_millis(60)).await];
    for _ in 0..6 {
        servers.push(support::TestServer::start().await);
    }
    let zones: Vec<(SocketAddr, &'static str)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (s.addr, ["a", "b", "b", "b", "c", "c", "c"][i]))
        .collect();
    let routing = tower_lb::topology::ZoneAware::new("a")
        .client_shares([("a", 1.0), ("b", 1.0), ("c", 1.0)])
        .unwrap_or_else(|e| panic!("{e}"));
    let routing = if spill {
        routing
    } else {
        routing.no_latency_spill()
    };
    let all: Vec<SocketAddr> = zones.iter().map(|(addr, _)| *addr).collect();
    let client = HttpClient::builder()
        .balancer(|b| {
            b.seed(5)
                .zone_aware(routing)
                .metadata(move |addr: &SocketAddr| {
                    let zone = zones.iter().find(|(a, _)| a == addr).map_or("?", |z| z.1);
                    EndpointMetadata::new().with_zone(zone)
                })
        })
        .build::<Body>(all);
    (servers, client)
}

/// Sends `n` GETs one after another; returns how many reached zone a.
async fn kept_local(servers: &[support::TestServer], client: &HttpClient<Body>, n: usize) -> usize {
    for i in 0..n {
        let response = client.clone().oneshot(get()).await;
        assert!(response.is_ok(), "GET {i}");
    }
    servers[0].hits()
}

#[tokio::test]
async fn a_short_local_zone_keeps_its_share_by_the_rule_alone() {
    let (servers, client) = short_slow_zone(false).await;
    // 1 of 7 endpoints for a third of the clients: 3/7 of the requests.
    let local = kept_local(&servers, &client, 200).await;
    assert!(
        (65..=105).contains(&local),
        "{local} of 200 stayed, not about 86"
    );
}

#[tokio::test]
async fn a_short_local_zone_slower_than_the_others_sheds_more_than_the_rule_says() {
    let (servers, client) = short_slow_zone(true).await;
    let local = kept_local(&servers, &client, 200).await;
    assert!(local < 40, "{local} of 200 stayed in a zone 60 ms slower");
}

/// A strategy of a user's own that reads the metadata: the endpoint
/// labelled `track=canary` in the schedule, else the first.
struct PreferCanary;

impl tower_lb::strategy::Strategy for PreferCanary {
    type Schedule = usize;

    fn schedule<C: tower_lb::strategy::Candidates + ?Sized>(
        &self,
        candidates: &C,
        _: &tower_lb::strategy::PickContext<'_>,
    ) -> usize {
        (0..candidates.len())
            .find(|&i| candidates.metadata(i).label("track") == Some("canary"))
            .unwrap_or(0)
    }

    fn pick<C: tower_lb::strategy::Candidates + ?Sized>(
        &self,
        canary: &usize,
        _: &C,
        _: &tower_lb::strategy::PickContext<'_>,
    ) -> Option<usize> {
        Some(*canary)
    }
}

#[tokio::test]
async fn a_strategy_of_ones_own_reads_the_endpoints_labels() {
    let servers = support::servers(3, Duration::ZERO).await;
    let canary = servers[1].addr;
    let all: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let client = HttpClient::builder()
        .strategy(PreferCanary)
        .balancer(|b| {
            b.metadata(move |addr: &SocketAddr| match *addr == canary {
                true => EndpointMetadata::new().with_label("track", "canary"),
                false => EndpointMetadata::new(),
            })
        })
        .build::<Body>(all);
    for _ in 0..10 {
        let response = client.clone().oneshot(get()).await;
        assert!(response.is_ok());
    }
    let hits: Vec<usize> = servers.iter().map(support::TestServer::hits).collect();
    assert_eq!(hits, [0, 10, 0]);
    let labelled = client.balancer().endpoints();
    let labelled = labelled.iter().find(|e| e.key == canary);
    assert_eq!(
        labelled.and_then(|e| e.metadata.label("track")),
        Some("canary")
    );
}
