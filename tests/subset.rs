//! Subsetting against real servers on loopback: clients of one fleet, each
//! over its own subset of the servers (`discover::Subset`), through the
//! ready-made HTTP client.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::discover::{self, Subset};

use support::{wait_until, Body, TestServer};

const WAIT: Duration = Duration::from_secs(5);

fn hits(servers: &[TestServer]) -> Vec<usize> {
    servers.iter().map(TestServer::hits).collect()
}

/// Sends `n` GETs through `client`, one by one; each must succeed.
async fn send_n<K>(client: &HttpClient<Body, K>, n: usize) {
    for _ in 0..n {
        let response = client.clone().oneshot(support::get()).await;
        assert!(
            response.as_ref().is_ok_and(|r| r.status() == 200),
            "{:?}",
            response.map(|r| r.status())
        );
    }
}

/// The servers (by number) a client's balancer holds.
fn subset_of(client: &HttpClient<Body>, servers: &[TestServer]) -> BTreeSet<usize> {
    client
        .balancer()
        .endpoints()
        .iter()
        .filter_map(|e| servers.iter().position(|s| s.addr == e.key))
        .collect()
}

fn addrs(servers: &[TestServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

/// Client `client` of `clients`, with an aperture of `size`.
fn aperture_client(
    servers: &[TestServer],
    client: u32,
    clients: u32,
    size: u32,
) -> HttpClient<Body> {
    let subset = Subset::aperture(client, clients, size).expect("valid subset");
    let endpoints = discover::fixed(addrs(servers).into_iter().map(|a| (a, a)));
    HttpClient::builder().build_discover(subset.discover(endpoints))
}

#[tokio::test]
async fn a_client_sends_only_to_its_aperture_and_the_fleet_covers_every_server_once() {
    let servers = support::servers(6, Duration::ZERO).await;
    let fleet: Vec<_> = (0..3).map(|i| aperture_client(&servers, i, 3, 2)).collect();
    for client in &fleet {
        wait_until(WAIT, || client.balancer().endpoints().len() == 2).await;
    }

    send_n(&fleet[0], 40).await;
    let mine = subset_of(&fleet[0], &servers);
    for (i, &n) in hits(&servers).iter().enumerate() {
        if mine.contains(&i) {
            assert!(n > 0, "server {i} of the subset got nothing");
        } else {
            assert_eq!(n, 0, "server {i} is not in client 0's subset {mine:?}");
        }
    }

    // Three subsets of two over six servers: each server in exactly one.
    let mut covered = Vec::new();
    for client in &fleet {
        covered.extend(subset_of(client, &servers));
    }
    covered.sort_unstable();
    assert_eq!(covered, (0..6).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_random_subset_sends_to_its_size_of_the_servers() {
    let servers = support::servers(8, Duration::ZERO).await;
    let subset = Subset::random(7, 3).expect("valid subset");
    let endpoints = discover::fixed(addrs(&servers).into_iter().map(|a| (a, a)));
    let client: HttpClient<Body> = HttpClient::builder().build_discover(subset.discover(endpoints));
    wait_until(WAIT, || client.balancer().endpoints().len() == 3).await;
    send_n(&client, 60).await;
    let reached = hits(&servers).iter().filter(|&&n| n > 0).count();
    assert_eq!(reached, 3, "{:?}", hits(&servers));
}

#[tokio::test]
async fn a_server_leaving_the_subset_is_replaced_and_no_request_fails() {
    let servers = support::servers(6, Duration::ZERO).await;
    let (handle, stream) = discover::channel();
    for server in &servers {
        handle.insert(server.addr, server.addr).expect("open");
    }
    let subset = Subset::aperture(0, 3, 2).expect("valid subset");
    let client: HttpClient<Body> = HttpClient::builder().build_discover(subset.discover(stream));
    wait_until(WAIT, || client.balancer().endpoints().len() == 2).await;
    let before = subset_of(&client, &servers);
    let gone = *before.iter().next().expect("a member");

    // Requests go on while the server leaves and another joins.
    let sending = tokio::spawn({
        let client = client.clone();
        async move { send_n(&client, 100).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    handle.remove(servers[gone].addr).expect("open");
    wait_until(WAIT, || {
        let now = subset_of(&client, &servers);
        now.len() == 2 && !now.contains(&gone)
    })
    .await;
    sending.await.expect("every request answered 200");
    let after = subset_of(&client, &servers);
    assert_eq!(
        after.intersection(&before).count(),
        1,
        "{before:?} -> {after:?}"
    );

    let left = servers[gone].hits();
    send_n(&client, 40).await;
    assert_eq!(
        servers[gone].hits(),
        left,
        "the server that left got requests"
    );
    for &i in &after {
        assert!(servers[i].hits() > 0, "server {i} joined but got nothing");
    }
}
