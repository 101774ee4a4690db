//! Kubernetes EndpointSlice discovery against a loopback API server that
//! speaks list and watch with real EndpointSlice JSON (tests/support/
//! kube_api.rs): no cluster runs here. The pods are real HTTP servers on
//! loopback addresses 127.0.0.2 and up, one port for all, as a Service's
//! pods share their target port.
#![cfg(feature = "kubernetes")]

mod support;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use tokio::net::TcpListener;
use tower::discover::Change;
use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::discover::{Empty, EndpointSlices, KubernetesDiscover, KubernetesEndpoint};
use tower_lb::retry::Backoff;
use tower_lb::topology::{Readiness, ZoneAware};

use support::kube_api::{slice, KubeApi, Pod, Seen, NAMESPACE};
use support::{get, wait_until, Body, TestServer};

const WAIT: Duration = Duration::from_secs(10);

/// Retries after 50 ms, up to 200 ms: the tests' API server fails on
/// purpose, and kube-runtime's 800 ms would only make them slow.
fn quick_backoff() -> Backoff {
    Backoff::new()
        .initial(Duration::from_millis(50))
        .max(Duration::from_millis(200))
}

fn discover(api: &KubeApi, service: &str) -> KubernetesDiscover<SocketAddr> {
    EndpointSlices::new(api.client(), NAMESPACE, service)
        .backoff(quick_backoff())
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A slice of the `web` Service, its port named `http`.
fn web(name: &str, port: u16, pods: &[Pod]) -> serde_json::Value {
    slice(name, "web", "http", port, pods)
}

/// `n` HTTP servers at 127.0.0.2, 127.0.0.3, ..., all on one port.
async fn pods(n: usize) -> (u16, Vec<TestServer>) {
    'attempt: for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut listeners = vec![first];
        for i in 1..n {
            match TcpListener::bind((format!("127.0.0.{}", i + 2), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        return (port, listeners.into_iter().map(TestServer::on).collect());
    }
    panic!("no port free on every loopback address");
}

fn ip(i: usize) -> String {
    format!("127.0.0.{}", i + 2)
}

/// What the stream yields next.
async fn next(
    discover: &mut KubernetesDiscover<SocketAddr>,
) -> Result<Change<KubernetesEndpoint, SocketAddr>, Empty> {
    tokio::time::timeout(WAIT, poll_fn(|cx| Pin::new(&mut *discover).poll_next(cx)))
        .await
        .expect("a change within the wait")
        .expect("the stream goes on")
}

/// The next `n` changes, as (insert or remove, address, readiness).
async fn changes(
    discover: &mut KubernetesDiscover<SocketAddr>,
    n: usize,
) -> Vec<(&'static str, SocketAddr, Readiness)> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let next = next(discover)
            .await
            .unwrap_or_else(|e| panic!("an answer of nothing: {e}"));
        seen.push(match next {
            Change::Insert(key, addr) => {
                assert_eq!(
                    key.addr, addr,
                    "the service is built from the key's address"
                );
                ("insert", key.addr, key.readiness)
            }
            Change::Remove(key) => ("remove", key.addr, key.readiness),
        });
    }
    seen.sort_by_key(|(what, addr, _)| (*what, *addr));
    seen
}

/// A Service of one pod (127.0.0.2:8080) in slice `web-a`, its stream
/// past that pod's insertion, and its watch open.
async fn watching_one_pod() -> (KubeApi, KubernetesDiscover<SocketAddr>) {
    let api = KubeApi::start().await;
    api.apply(web("web-a", 8080, &[Pod::ready(ip(0), "a")]));
    let mut discover = discover(&api, "web");
    changes(&mut discover, 1).await;
    wait_until(WAIT, || api.open_watches() == 1).await;
    (api, discover)
}

/// Nothing more arrives for a while.
async fn quiet(discover: &mut KubernetesDiscover<SocketAddr>) {
    let next = tokio::time::timeout(
        Duration::from_millis(300),
        poll_fn(|cx| Pin::new(&mut *discover).poll_next(cx)),
    )
    .await;
    assert!(next.is_err(), "an unexpected change: {next:?}");
}

fn at(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// A client of the Service's pods, by their metadata.
fn client(api: &KubeApi, service: &str) -> HttpClient<Body, KubernetesEndpoint> {
    HttpClient::builder()
        .balancer(|b| b.metadata(KubernetesEndpoint::metadata))
        .build_discover(discover(api, service))
}

async fn send(client: &HttpClient<Body, KubernetesEndpoint>, n: usize) {
    for _ in 0..n {
        let response = client.clone().oneshot(get()).await;
        let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
        assert!(response.status().is_success());
    }
}

fn addrs_in_service(client: &HttpClient<Body, KubernetesEndpoint>) -> Vec<SocketAddr> {
    let mut addrs: Vec<_> = client
        .balancer()
        .endpoints()
        .iter()
        .map(|e| e.key.addr)
        .collect();
    addrs.sort();
    addrs
}

#[tokio::test]
async fn every_slice_of_the_service_becomes_endpoints_with_their_readiness() {
    let api = KubeApi::start().await;
    api.apply(web(
        "web-a",
        8080,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "b")],
    ));
    api.apply(web(
        "web-b",
        8080,
        &[
            Pod::ready(ip(2), "c").terminating(),
            Pod::ready(ip(3), "c").not_ready(),
        ],
    ));
    // Another Service's slice in the namespace is not this one's.
    api.apply(slice(
        "api-a",
        "api",
        "http",
        9090,
        &[Pod::ready(ip(4), "a")],
    ));
    let mut discover = discover(&api, "web");
    assert_eq!(
        changes(&mut discover, 4).await,
        [
            ("insert", at(&ip(0), 8080), Readiness::Ready),
            ("insert", at(&ip(1), 8080), Readiness::Ready),
            ("insert", at(&ip(2), 8080), Readiness::Terminating),
            ("insert", at(&ip(3), 8080), Readiness::NotServing),
        ]
    );
    quiet(&mut discover).await;
}

#[tokio::test]
async fn a_change_announces_only_what_changed() {
    let api = KubeApi::start().await;
    api.apply(web(
        "web-a",
        8080,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "a")],
    ));
    let mut discover = discover(&api, "web");
    changes(&mut discover, 2).await;
    // Pod 1 starts terminating and pod 2 arrives in another slice.
    api.apply(web(
        "web-a",
        8080,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "a").terminating()],
    ));
    api.apply(web("web-b", 8080, &[Pod::ready(ip(2), "b")]));
    assert_eq!(
        changes(&mut discover, 2).await,
        [
            ("insert", at(&ip(1), 8080), Readiness::Terminating),
            ("insert", at(&ip(2), 8080), Readiness::Ready),
        ]
    );
    api.delete("web-a");
    assert_eq!(
        changes(&mut discover, 2).await,
        [
            ("remove", at(&ip(0), 8080), Readiness::Ready),
            ("remove", at(&ip(1), 8080), Readiness::Terminating),
        ]
    );
    quiet(&mut discover).await;
}

#[tokio::test]
async fn requests_reach_ready_pods_and_a_terminating_pod_drains() {
    let (port, servers) = pods(3).await;
    let api = KubeApi::start().await;
    let all: Vec<Pod> = (0..3).map(|i| Pod::ready(ip(i), "a")).collect();
    api.apply(web("web-a", port, &all));
    let client = client(&api, "web");
    send(&client, 30).await;
    assert!(
        servers.iter().all(|s| s.hits() > 0),
        "every ready pod is used"
    );

    // A request under way on pod 2 when it starts terminating finishes.
    // Every pod slow for now, so that the picks spread evenly.
    for server in &servers {
        server.set_delay(Duration::from_millis(400));
    }
    let under_way: Vec<_> = (0..9)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    servers[2].wait_in_flight(1).await;
    let mut draining = all.clone();
    draining[2] = draining[2].clone().terminating();
    api.apply(web("web-a", port, &draining));
    wait_until(WAIT, || {
        client
            .balancer()
            .endpoints()
            .iter()
            .any(|e| e.metadata.readiness() == Readiness::Terminating)
    })
    .await;
    assert!(
        servers[2].in_flight() >= 1,
        "the terminating pod still had its request when the change arrived"
    );
    for request in under_way {
        let response = request
            .await
            .expect("task")
            .expect("a request under way finishes");
        assert!(response.status().is_success());
    }
    for server in &servers {
        server.set_delay(Duration::ZERO);
    }
    let drained_hits = servers[2].hits();
    send(&client, 30).await;
    assert_eq!(
        servers[2].hits(),
        drained_hits,
        "no new request to the terminating pod"
    );

    // Gone from the slice: gone from the balancer.
    api.apply(web("web-a", port, &all[..2]));
    wait_until(WAIT, || addrs_in_service(&client).len() == 2).await;
}

#[tokio::test]
async fn a_terminating_pod_is_used_while_no_pod_is_ready() {
    let (port, servers) = pods(1).await;
    let api = KubeApi::start().await;
    api.apply(web("web-a", port, &[Pod::ready(ip(0), "a").terminating()]));
    let client = client(&api, "web");
    send(&client, 5).await;
    assert_eq!(servers[0].hits(), 5);
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_version_without_listing_again() {
    let (api, mut discover) = watching_one_pod().await;
    api.drop_watches();
    api.apply(web(
        "web-a",
        8080,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "a")],
    ));
    assert_eq!(
        changes(&mut discover, 1).await,
        [("insert", at(&ip(1), 8080), Readiness::Ready)]
    );
    assert_eq!(api.lists(), 1, "{:?}", api.seen());
    // Two watches, the second from the version the first had reached.
    let watches: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Watch(_)))
        .collect();
    assert_eq!(watches, [Seen::Watch(1), Seen::Watch(1)]);
}

#[tokio::test]
async fn a_bookmark_moves_the_watch_on_so_compaction_needs_no_list() {
    let (api, mut discover) = watching_one_pod().await;
    let marked = api.bookmark_compact_and_end_watches();
    wait_until(WAIT, || api.open_watches() == 1).await;
    assert_eq!(api.seen().last(), Some(&Seen::Watch(marked)));
    assert_eq!(api.lists(), 1, "{:?}", api.seen());
    quiet(&mut discover).await;
}

#[tokio::test]
async fn a_list_that_keeps_failing_is_asked_for_ever_less_often() {
    let api = KubeApi::start().await;
    api.fail_lists(true);
    let _discover = EndpointSlices::new(api.client(), NAMESPACE, "web")
        .backoff(
            quick_backoff()
                .max(Duration::from_secs(5))
                .jitter(0.0)
                .expect("jitter"),
        )
        .build(|addr| addr)
        .unwrap_or_else(|e| panic!("{e}"));
    // 50, 100, 200, 400, 800 ms apart: six lists in 1.6 s; at a steady
    // 50 ms, about thirty.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let lists = api.lists();
    assert!((4..=8).contains(&lists), "{lists} lists");
}

#[tokio::test]
async fn dropping_the_stream_ends_the_watch() {
    let (api, discover) = watching_one_pod().await;
    drop(discover);
    wait_until(WAIT, || api.open_watches() == 0).await;
}

#[tokio::test]
async fn a_service_with_no_endpoints_is_said_once_until_it_has_some() {
    let api = KubeApi::start().await;
    let mut discover = discover(&api, "web");
    let said = next(&mut discover).await.expect_err("no endpoints");
    assert_eq!(
        said.to_string(),
        "Kubernetes Service shop/web has no endpoints"
    );
    api.apply(web("web-a", 8080, &[]));
    quiet(&mut discover).await;
    api.apply(web("web-a", 8080, &[Pod::ready(ip(0), "a")]));
    changes(&mut discover, 1).await;
    api.apply(web("web-a", 8080, &[]));
    changes(&mut discover, 1).await;
    assert!(next(&mut discover).await.is_err(), "no endpoints, again");
}

#[tokio::test]
async fn a_service_whose_slices_cannot_be_read_says_so() {
    let api = KubeApi::start().await;
    let mut web = web("web-a", 8080, &[Pod::ready(ip(0), "a")]);
    web["ports"]
        .as_array_mut()
        .expect("ports")
        .push(serde_json::json!({ "name": "grpc", "protocol": "TCP", "port": 9000 }));
    api.apply(web);
    let mut discover = discover(&api, "web");
    let said = next(&mut discover).await.expect_err("no endpoints");
    assert_eq!(
        said.to_string(),
        "Kubernetes Service shop/web has no endpoints it can use (1 EndpointSlice left out: see the warning)"
    );
}

#[tokio::test]
async fn a_410_gone_watch_event_lists_again_and_announces_only_the_difference() {
    let api = KubeApi::start().await;
    api.apply(web("web-a", 8080, &[Pod::ready(ip(0), "a")]));
    api.apply(web("web-b", 8080, &[Pod::ready(ip(1), "a")]));
    let mut discover = discover(&api, "web");
    changes(&mut discover, 2).await;
    wait_until(WAIT, || api.open_watches() == 1).await;
    api.change_unseen(|api| {
        api.delete("web-b");
        api.apply(web("web-c", 8080, &[Pod::ready(ip(2), "b")]));
    });
    // Pod 0, in both lists, is not announced again (its connections and
    // health stay); the others are.
    assert_eq!(
        changes(&mut discover, 2).await,
        [
            ("insert", at(&ip(2), 8080), Readiness::Ready),
            ("remove", at(&ip(1), 8080), Readiness::Ready),
        ]
    );
    quiet(&mut discover).await;
    assert_eq!(api.lists(), 2, "{:?}", api.seen());
}

#[tokio::test]
async fn a_410_gone_answer_to_the_watch_request_lists_again() {
    // kube-runtime 2 retries such a watch with the same version for ever;
    // the discovery starts a new watcher, which lists.
    let (api, mut discover) = watching_one_pod().await;
    api.answer_gone_with_status();
    api.change_unseen(|api| {
        api.apply(web("web-b", 8080, &[Pod::ready(ip(1), "a")]));
    });
    assert_eq!(
        changes(&mut discover, 1).await,
        [("insert", at(&ip(1), 8080), Readiness::Ready)]
    );
    assert_eq!(api.lists(), 2, "{:?}", api.seen());
}

#[tokio::test]
async fn an_api_server_restart_keeps_the_last_set_and_catches_up() {
    let (port, servers) = pods(3).await;
    let api = KubeApi::start().await;
    api.apply(web(
        "web-a",
        port,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "a")],
    ));
    let client = client(&api, "web");
    send(&client, 10).await;
    wait_until(WAIT, || api.open_watches() == 1).await;

    api.stop();
    // Down: the watch fails and is retried; requests go on to the last set.
    for _ in 0..10 {
        send(&client, 5).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(servers[0].hits() + servers[1].hits(), 60);
    assert_eq!(addrs_in_service(&client).len(), 2);

    // While it was down, pod 0 went away and pod 2 came.
    api.apply(web(
        "web-a",
        port,
        &[Pod::ready(ip(1), "a"), Pod::ready(ip(2), "a")],
    ));
    api.restart().await;
    wait_until(WAIT, || {
        addrs_in_service(&client) == [at(&ip(1), port), at(&ip(2), port)]
    })
    .await;
    let before = servers[0].hits();
    send(&client, 20).await;
    assert_eq!(servers[0].hits(), before);
    assert!(servers[2].hits() > 0);
}

#[tokio::test]
async fn a_malformed_watch_event_is_survived() {
    let (api, mut discover) = watching_one_pod().await;
    api.send_raw(r#"{"type":"ADDED","object":{"kind":"EndpointSlice","addressType":7"#);
    api.send_raw("not json at all");
    api.apply(web(
        "web-a",
        8080,
        &[Pod::ready(ip(0), "a"), Pod::ready(ip(1), "a")],
    ));
    assert_eq!(
        changes(&mut discover, 1).await,
        [("insert", at(&ip(1), 8080), Readiness::Ready)]
    );
}

#[tokio::test]
async fn a_service_without_endpoints_fails_requests_at_once_saying_so() {
    let api = KubeApi::start().await;
    let client = client(&api, "web");
    let started = tokio::time::Instant::now();
    let error = client
        .clone()
        .oneshot(get())
        .await
        .expect_err("nothing to send to");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let chain: Vec<String> =
        std::iter::successors(Some(&*error as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .map(ToString::to_string)
        .collect();
    assert!(
        chain
            .iter()
            .any(|e| e == "no endpoints available: Kubernetes Service shop/web has no endpoints"),
        "{chain:?}"
    );
}

#[tokio::test]
async fn the_named_port_is_used_when_the_service_has_several() {
    let (port, servers) = pods(1).await;
    let api = KubeApi::start().await;
    let mut web = web("web-a", port, &[Pod::ready(ip(0), "a")]);
    web["ports"]
        .as_array_mut()
        .expect("ports")
        .push(serde_json::json!({ "name": "metrics", "protocol": "TCP", "port": 9102 }));
    api.apply(web);
    let client = HttpClient::builder().build_discover::<Body, _>(
        EndpointSlices::new(api.client(), NAMESPACE, "web")
            .port("http")
            .backoff(quick_backoff())
            .build(|addr| addr)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    send(&client, 3).await;
    assert_eq!(servers[0].hits(), 3);
}

#[tokio::test]
async fn zone_hints_decide_where_a_zone_aware_client_sends() {
    // Six pods, two per zone; the controller hints one of zone b's for
    // zone a (zone a's clients need more), the rest for their own zone.
    let (port, servers) = pods(6).await;
    let zones = ["a", "a", "b", "b", "c", "c"];
    let hints = ["a", "a", "a", "b", "c", "c"];
    let all: Vec<Pod> = (0..6)
        .map(|i| Pod::ready(ip(i), zones[i]).hinted_for(hints[i]))
        .collect();
    let api = KubeApi::start().await;
    api.apply(web("web-a", port, &all));
    let client: HttpClient<Body, KubernetesEndpoint> = HttpClient::builder()
        .balancer(|b| {
            b.metadata(KubernetesEndpoint::metadata)
                .zone_aware(ZoneAware::new("a"))
        })
        .build_discover(discover(&api, "web"));
    wait_until(WAIT, || addrs_in_service(&client).len() == 6).await;
    send(&client, 60).await;
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    assert!(hits[..3].iter().all(|&h| h > 0), "{hits:?}");
    assert_eq!(hits[3..].iter().sum::<usize>(), 0, "{hits:?}");
}

#[test]
fn a_name_that_is_not_a_kubernetes_name_is_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let api = KubeApi::start().await;
        let error = EndpointSlices::new(api.client(), NAMESPACE, "web,api")
            .build(|addr| addr)
            .expect_err("not a name");
        assert_eq!(
            error.to_string(),
            "invalid Kubernetes discovery settings: the Service name \"web,api\" is not a valid Kubernetes name (lowercase letters, digits and '-', 1 to 63 characters, a letter or digit at each end)"
        );
    });
}
