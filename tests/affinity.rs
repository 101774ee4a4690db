//! Request affinity against real servers on loopback: a hash key per
//! request (from a header), consistent hashing with bounded loads
//! (`RingHash`) through the ready-made client and a bare balancer.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt};
use tower_lb::client::HttpClient;
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::request::{FromHeader, HashKey, HashKeyLayer};
use tower_lb::strategy::RingHash;
use tower_lb::{discover, Balancer};

use support::{wait_until, Body, TestServer};

const WAIT: Duration = Duration::from_secs(5);

/// A GET of user `user` (its `x-user-id` header).
fn get_of(user: usize) -> http::Request<Body> {
    http::Request::get("/")
        .header("x-user-id", format!("user-{user}"))
        .body(Body::new())
        .expect("a request")
}

fn hits(servers: &[TestServer]) -> Vec<usize> {
    servers.iter().map(TestServer::hits).collect()
}

/// Which server took user `user`'s `n` requests, sent one by one through
/// `client`; panics if they went to more than one.
async fn home_of<S>(client: &S, servers: &[TestServer], user: usize, n: usize) -> usize
where
    S: Service<http::Request<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    let before = hits(servers);
    for _ in 0..n {
        let response = client.clone().oneshot(get_of(user)).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
    let gained: Vec<usize> = hits(servers)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let homes: Vec<usize> = (0..servers.len()).filter(|&i| gained[i] > 0).collect();
    assert_eq!(homes.len(), 1, "user {user}'s requests went to {gained:?}");
    assert_eq!(gained[homes[0]], n);
    homes[0]
}

#[tokio::test]
async fn every_request_of_a_user_reaches_the_same_server_through_the_client() {
    let servers = support::servers(5, Duration::ZERO).await;
    let client: HttpClient<Body> = HttpClient::builder()
        .balancer(|b| b.strategy(RingHash::new()))
        .build(servers.iter().map(|s| s.addr));
    let client = ServiceBuilder::new()
        .layer(HashKeyLayer::header("x-user-id").expect("a header name"))
        .service(client);
    let mut used = HashSet::new();
    for user in 0..30 {
        used.insert(home_of(&client, &servers, user, 10).await);
    }
    assert!(used.len() >= 4, "30 users on only {used:?}");
}

type RingBalancer = Balancer<
    SocketAddr,
    HttpEndpoint<Body>,
    RingHash,
    tower_lb::classify::ErrorsAsFailures,
    tower_lb::balance::CallHints,
>;

/// A bare balancer with a ring over `servers`, keys from `x-user-id` (the
/// client), and a handle to change its endpoints.
fn ring_over(
    servers: &[TestServer],
    ring: RingHash,
) -> (
    tower_lb::discover::DiscoveryHandle<SocketAddr, HttpEndpoint<Body>>,
    HashKey<RingBalancer, FromHeader>,
    RingBalancer,
) {
    let http = lb_http::client::<Body>();
    let (handle, stream) = discover::channel();
    for server in servers {
        handle
            .insert(server.addr, HttpEndpoint::new(http.clone(), server.addr))
            .expect("insert");
    }
    let balancer = Balancer::builder()
        .strategy(ring)
        .avoid_tried_endpoints()
        .build(stream);
    let client = ServiceBuilder::new()
        .layer(HashKeyLayer::header("x-user-id").expect("a header name"))
        .service(balancer.clone());
    (handle, client, balancer)
}

#[tokio::test]
async fn a_server_leaving_moves_only_its_own_users() {
    let servers = support::servers(5, Duration::ZERO).await;
    let (handle, client, balancer) = ring_over(&servers, RingHash::new());
    wait_until(WAIT, || balancer.endpoints().len() == 5).await;
    let mut before = Vec::new();
    for user in 0..40 {
        before.push(home_of(&client, &servers, user, 3).await);
    }
    let leaving = before[0];
    handle.remove(servers[leaving].addr).expect("remove");
    wait_until(WAIT, || balancer.endpoints().len() == 4).await;
    for (user, &home) in before.iter().enumerate() {
        let now = home_of(&client, &servers, user, 3).await;
        if home == leaving {
            assert_ne!(now, leaving, "user {user} stayed on the server that left");
        } else {
            assert_eq!(now, home, "user {user} moved though its server stayed");
        }
    }
}

#[tokio::test]
async fn a_hot_key_spreads_beyond_its_server_within_the_bound() {
    // Every request of one user, 20 at once, each held 200 ms: its server
    // takes them only up to 1.25 x the mean in flight.
    let servers = support::servers(5, Duration::from_millis(200)).await;
    let (_handle, client, balancer) = ring_over(&servers, RingHash::new());
    wait_until(WAIT, || balancer.endpoints().len() == 5).await;
    let burst = |client: HashKey<RingBalancer, FromHeader>| async move {
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(client.clone().oneshot(get_of(7))))
            .collect();
        for call in calls {
            let response = call.await.expect("task");
            assert!(response.is_ok(), "{:?}", response.err());
        }
    };
    burst(client).await;
    let bounded = hits(&servers);
    let most = *bounded.iter().max().expect("servers");
    // 20 in flight over 5: at most ceil(1.25 x 20 / 5) = 5 each (the 20
    // are sent in one tick, before any answers).
    assert!(most <= 5, "{bounded:?}");

    // Unbounded: all 20 to the key's server.
    let servers = support::servers(5, Duration::from_millis(200)).await;
    let (_handle, client, balancer) = ring_over(&servers, RingHash::new().unbounded());
    wait_until(WAIT, || balancer.endpoints().len() == 5).await;
    burst(client).await;
    let unbounded = hits(&servers);
    assert_eq!(unbounded.iter().max(), Some(&20), "{unbounded:?}");
}
