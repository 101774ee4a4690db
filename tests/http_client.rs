//! The one-stop `HttpClient` on its defaults (the table in the `client`
//! module's docs), against real hyper servers on loopback.
//!
//! How it behaves with the same settings as a stack built by hand is proven
//! by the `one_stop::*` tests of `retry.rs`, `health.rs` and `balancer.rs`;
//! these are about what it does when left alone.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_lb::client::{HttpClient, ResponseBody};
use tower_lb::timeout::{Elapsed, Timer};
use tower_lb::EndpointState;

use support::raw_h2::{RawH2Behaviour, RawH2Server};
use support::recording::{
    addrs, received, request, start_all as start, Behaviour, RecordingServer,
};
use support::{servers, wait_until};

type Body = Full<Bytes>;

fn get(id: &str) -> http::Request<Body> {
    request(http::Method::GET, id, Bytes::new())
}

use support::send_ok as send;

async fn body_text(response: http::Response<ResponseBody>) -> String {
    let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
    String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn by_default_a_get_answered_503_is_retried_on_an_endpoint_it_has_not_tried() {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = HttpClient::builder().build(addrs(&servers));
    for i in 0..10 {
        let id = format!("get-{i}");
        let response = send(&client, get(&id)).await;
        assert_eq!(response.status(), 200, "{id}");
        assert_eq!(
            body_text(response).await,
            servers[1].addr.port().to_string()
        );
        for server in &servers {
            assert!(
                server.received(&id) <= 1,
                "{id} went to {} twice",
                server.addr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_backend_answering_only_503_is_ejected_after_five_and_callers_see_none() {
    let all = servers(3, Duration::ZERO).await;
    all[1].fail_every(1);
    let client = HttpClient::builder().build(all.iter().map(|s| s.addr));
    wait_until(Duration::from_secs(5), || {
        client.balancer().endpoints().len() == 3
    })
    .await;
    let failing = || {
        client
            .balancer()
            .endpoints()
            .into_iter()
            .find(|e| e.key == all[1].addr)
            .expect("endpoint known")
    };

    // Each failure raises its cost, and with nothing in flight elsewhere
    // P2C sends it a request again only once its failures are forgotten
    // (about every 2.4 s): the fifth comes after about ten seconds.
    let started = Instant::now();
    while failing().state != EndpointState::Ejected {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not ejected after {:?} ({} requests reached it)",
            started.elapsed(),
            all[1].hits()
        );
        let response = send(&client, get("get")).await;
        assert_eq!(response.status(), 200, "a retry elsewhere answered");
    }

    assert_eq!(all[1].hits(), 5);
    let stats = failing();
    assert_eq!((stats.failures, stats.ejections), (5, 1));
    assert!(stats.returns_in.expect("ejected") <= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn by_default_a_call_gets_three_attempts_of_five_seconds_within_fifteen() {
    let servers = start(vec![Behaviour::Stall(Duration::from_secs(60)); 4]).await;
    let client = HttpClient::builder().build(addrs(&servers));
    let started = Instant::now();

    let err = client
        .clone()
        .oneshot(get("get-1"))
        .await
        .expect_err("every server stalls");

    let elapsed = err.downcast_ref::<Elapsed>().copied();
    assert_eq!(elapsed.map(|e| e.timer()), Some(Timer::Deadline), "{err}");
    assert!(
        err.to_string().contains("deadline passed after 15.0s"),
        "{err}"
    );
    assert!(started.elapsed() <= Duration::from_millis(15_050));
    assert!(servers.iter().all(|s| s.received("get-1") <= 1));
    // Attempts at 0 s, 5 s and 10 s, each on a server not tried yet: each
    // retry follows an attempt's 5 s timeout and a backoff of 25, then 50 ms
    // (± 20 %).
    let mut at: Vec<Duration> = servers
        .iter()
        .flat_map(|s| s.arrivals("get-1"))
        .map(|arrival| arrival - started)
        .collect();
    at.sort();
    let ms = Duration::from_millis;
    assert!(
        at.len() == 3
            && (ms(5_019)..=ms(5_031)).contains(&at[1])
            && (ms(5_039)..=ms(5_061)).contains(&(at[2] - at[1])),
        "{at:?}"
    );
}

#[tokio::test]
async fn by_default_a_body_of_64_kib_is_replayed_whole() {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: None,
    }])
    .await;
    let client = HttpClient::builder().build(addrs(&servers));
    let body = vec![b'y'; 64 * 1024];
    let response = send(&client, request(http::Method::PUT, "put-1", body)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(servers[0].body_lengths(), vec![64 * 1024, 64 * 1024]);
}

#[tokio::test]
async fn by_default_a_body_over_64_kib_is_sent_once_and_not_retried() {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: None,
    }])
    .await;
    let client = HttpClient::builder().build(addrs(&servers));
    let body = vec![b'x'; 64 * 1024 + 1];
    let response = send(&client, request(http::Method::PUT, "put-1", body)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(servers[0].body_lengths(), vec![64 * 1024 + 1]);
}

#[tokio::test]
async fn retry_stats_count_the_requests_and_retries_of_every_clone() {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = HttpClient::builder()
        .no_outlier_detection()
        .build(addrs(&servers));
    for i in 0..20 {
        let response = send(&client.clone(), get(&format!("get-{i}"))).await;
        assert_eq!(response.status(), 200);
    }

    let stats = client.retry_stats().expect("retries are on");
    assert_eq!(stats.requests, 20);
    assert_eq!(stats.retries as usize, servers[0].hits());
    assert_eq!(
        stats.attempts() as usize,
        servers.iter().map(RecordingServer::hits).sum::<usize>()
    );
}

#[tokio::test]
async fn without_retries_or_hedging_there_are_no_retry_stats() {
    let servers = start(vec![Behaviour::Answer]).await;
    let client = HttpClient::builder()
        .no_retries()
        .build::<Body>(addrs(&servers));
    assert_eq!(client.retry_stats(), None);
}

#[tokio::test]
async fn with_hedging_but_no_retries_the_budget_still_counts_every_call() {
    let servers = start(vec![Behaviour::Answer]).await;
    let client = HttpClient::builder()
        .no_retries()
        .hedging(tower_lb::hedge::HedgeLayer::default())
        .build(addrs(&servers));
    for i in 0..5 {
        send(&client, get(&format!("get-{i}"))).await;
    }
    assert_eq!(client.retry_stats().map(|s| s.requests), Some(5));
}

#[tokio::test]
async fn shutdown_waits_for_a_call_between_two_attempts() {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let slow_backoff = tower_lb::retry::Backoff::new().initial(Duration::from_millis(300));
    let client = HttpClient::builder()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .retry_policy(tower_lb::retry::RetryPolicy::new().backoff(slow_backoff))
        .build::<Body>(addrs(&servers));
    // Round robin starts at random: find the 503 with a first call. Its
    // retry takes no turn, so the next call starts on the healthy server
    // and the one after on the 503 again.
    let mut id = 0;
    while servers[0].hits() == 0 {
        id += 1;
        send(&client, get(&format!("warm-{id}"))).await;
    }
    send(&client, get("the-healthy-ones-turn")).await;
    let in_progress = {
        let client = client.clone();
        tokio::spawn(async move { client.oneshot(get("slow-retry")).await })
    };
    wait_until(Duration::from_secs(5), || {
        received(&servers, "slow-retry") == 1
    })
    .await;
    assert_eq!(client.calls_in_progress(), 1);
    client
        .shutdown(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let response = in_progress
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("the call in progress failed: {e}"));
    assert_eq!(response.status(), http::StatusCode::OK);
    let refused = client.clone().oneshot(get("late")).await;
    let error = refused
        .err()
        .unwrap_or_else(|| panic!("a call after shutdown was sent"));
    assert!(
        support::find_error::<tower_lb::Error>(&*error)
            .is_some_and(|e| matches!(e, tower_lb::Error::Closed)),
        "{error}"
    );
    assert_eq!(received(&servers, "late"), 0);
}

#[tokio::test]
async fn an_https_client_without_a_tls_connector_never_sends_plain_text() {
    let servers = start(vec![Behaviour::Answer]).await;
    let client = HttpClient::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .build::<Body>(addrs(&servers));
    let result = client.clone().oneshot(get("tls")).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(servers[0].hits(), 0);
}

#[tokio::test]
async fn an_explicit_host_wins_over_the_endpoints_address() {
    let server = support::TestServer::start().await;
    let client = HttpClient::builder()
        .authority(http::uri::Authority::from_static("orders.internal"))
        .build::<Body>([server.addr]);
    send(&client, get("named")).await;
    assert_eq!(server.last_host().as_deref(), Some("orders.internal"));
    // A request that names its host keeps it.
    let mut own = get("own");
    own.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("other.internal"),
    );
    send(&client, own).await;
    assert_eq!(server.last_host().as_deref(), Some("other.internal"));
}

async fn a_post_whose_stream_was_refused_is_sent_elsewhere_once(route: H2Route) {
    let refusing = support::RefusingH2Server::start().await;
    let answering = support::GrpcTrailersServer::start(0).await;
    let client = route
        .builder()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .no_outlier_detection()
        .build::<Body>([refusing.addr, answering.addr]);
    for i in 0..10 {
        let response = send(
            &client,
            request(http::Method::POST, &format!("p{i}"), "pay"),
        )
        .await;
        assert_eq!(response.status(), http::StatusCode::OK);
    }
    assert!(
        refusing.refused() >= 4,
        "round robin drew the refusing server: {}",
        refusing.refused()
    );
    assert_eq!(
        answering.hits(),
        10,
        "each POST reached the answering server once"
    );
}

/// The two ways an `HttpClient` speaks HTTP/2 only: through hyper-util's
/// pool, or over a connection of each endpoint's own.
#[derive(Debug, Clone, Copy)]
enum H2Route {
    /// `hyper` settings with `http2_only(true)`.
    Pool,
    /// The builder's `http2_only()`.
    OwnConnection,
}

impl H2Route {
    fn builder(
        self,
    ) -> tower_lb::client::ClientBuilder<
        tower_lb::client::Http,
        tower_lb::balance::Builder<
            tower_lb::strategy::P2c,
            tower_lb::client::DefaultHttpClassify,
            tower_lb::balance::CallHints,
        >,
    > {
        match self {
            H2Route::Pool => {
                let mut http2 = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                );
                http2.http2_only(true);
                HttpClient::builder().hyper(http2)
            }
            H2Route::OwnConnection => HttpClient::builder().http2_only(),
        }
    }
}

/// Runs each test body (an `async fn(H2Route)`) on both HTTP/2 routes.
macro_rules! for_both_h2_routes {
    ($($name:ident),+ $(,)?) => {
        mod pool {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::H2Route::Pool).await
                }
            )+
        }

        mod own_connection {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::H2Route::OwnConnection).await
                }
            )+
        }
    };
}

for_both_h2_routes!(
    a_post_whose_stream_was_refused_is_sent_elsewhere_once,
    a_post_the_server_did_not_process_before_a_graceful_goaway_is_sent_elsewhere_once,
    a_graceful_goaway_is_not_held_against_the_server,
    a_post_cut_off_by_a_goaway_with_an_error_code_is_not_sent_again,
    sequential_http2_calls_with_a_body_are_not_held_back_by_nagle,
);

/// An HTTP/2-only client over `endpoints`, taking turns, with the default
/// retries and outlier detection.
fn http2_client(route: H2Route, endpoints: Vec<std::net::SocketAddr>) -> HttpClient<Body> {
    route
        .builder()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .build::<Body>(endpoints)
}

async fn a_post_the_server_did_not_process_before_a_graceful_goaway_is_sent_elsewhere_once(
    route: H2Route,
) {
    let going = RawH2Server::start(RawH2Behaviour::GoAway(0)).await;
    let answering = support::GrpcTrailersServer::start(0).await;
    let client = http2_client(route, vec![going.addr, answering.addr]);
    for i in 0..10 {
        let response = send(
            &client,
            request(http::Method::POST, &format!("p{i}"), "pay"),
        )
        .await;
        assert_eq!(response.status(), http::StatusCode::OK);
    }
    assert!(
        going.streams() >= 4,
        "round robin drew the server going away: {}",
        going.streams()
    );
    assert_eq!(
        answering.hits(),
        10,
        "each POST reached the answering server once"
    );
}

async fn a_graceful_goaway_is_not_held_against_the_server(route: H2Route) {
    let going = RawH2Server::start(RawH2Behaviour::GoAway(0)).await;
    let answering = support::GrpcTrailersServer::start(0).await;
    let client = http2_client(route, vec![going.addr, answering.addr]);
    for i in 0..10 {
        send(&client, get(&format!("g{i}"))).await;
    }
    let stats = client
        .balancer()
        .endpoints()
        .into_iter()
        .find(|e| e.key == going.addr)
        .expect("endpoint known");
    assert!(going.streams() >= 4, "{}", going.streams());
    assert_eq!(
        (stats.failures, stats.state),
        (0, EndpointState::Active),
        "{stats:?}"
    );
}

async fn a_post_cut_off_by_a_goaway_with_an_error_code_is_not_sent_again(route: H2Route) {
    // INTERNAL_ERROR: h2 hands such an error to every open stream, so it
    // proves nothing about what the server processed.
    let going = RawH2Server::start(RawH2Behaviour::GoAway(2)).await;
    let answering = support::GrpcTrailersServer::start(0).await;
    let client = http2_client(route, vec![going.addr, answering.addr]);
    let mut failed = 0;
    for i in 0..10 {
        let post = request(http::Method::POST, &format!("p{i}"), "pay");
        if client.clone().oneshot(post).await.is_err() {
            failed += 1;
        }
    }
    assert!(
        failed >= 4,
        "round robin drew the server going away: {failed}"
    );
    assert_eq!(
        answering.hits(),
        10 - failed,
        "no failed POST was sent to the answering server"
    );
}

#[tokio::test]
async fn an_error_printed_link_by_link_says_each_message_once() {
    // On both of the client's own routes: HTTP/1.1 connections, and one
    // HTTP/2 connection (whose calls wait for its attempt).
    for http2_only in [false, true] {
        let builder = HttpClient::builder().no_retries();
        let builder = if http2_only {
            builder.http2_only()
        } else {
            builder
        };
        let client = builder.build::<Body>([support::refusing_addr().await]);
        let error = client
            .clone()
            .oneshot(get("refused"))
            .await
            .err()
            .unwrap_or_else(|| panic!("nothing listens"));
        let mut messages = Vec::new();
        let mut link: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
        while let Some(error) = link {
            messages.push(error.to_string());
            link = error.source();
        }
        let printed = messages.join("\n");
        assert!(messages.len() >= 3, "{printed}");
        for message in &messages {
            assert_eq!(printed.matches(message.as_str()).count(), 1, "{printed}");
        }
        assert_eq!(
            tower_lb::error::report(&*error).to_string(),
            messages.join(": ")
        );
        assert!(tower_lb::error::is_never_sent(&*error), "{printed}");
    }
}

/// A hyper server on loopback that counts the connections it accepts.
async fn connection_counting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn an_idle_connection_is_closed_before_common_servers_close_it() {
    // Node.js and Apache close idle connections after 5 s: a client that
    // keeps them longer races the server's close with its next request.
    let (addr, connections) = connection_counting_server().await;
    let client: HttpClient<Body> = HttpClient::builder().build([addr]);
    let first = send(&client, get("a")).await;
    first.into_body().collect().await.expect("body");
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(4_500)).await;
    tokio::time::resume();
    let second = send(&client, get("b")).await;
    second.into_body().collect().await.expect("body");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "the idle one was reused"
    );
}

#[tokio::test]
async fn a_connection_idle_for_less_than_the_timeout_is_reused() {
    let (addr, connections) = connection_counting_server().await;
    let client: HttpClient<Body> = HttpClient::builder().build([addr]);
    for id in ["a", "b", "c"] {
        let response = send(&client, get(id)).await;
        response.into_body().collect().await.expect("body");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

/// The error of a call that must be refused.
async fn refused(client: &HttpClient<Body>, id: &str) -> tower_lb::BoxError {
    client
        .clone()
        .oneshot(get(id))
        .await
        .err()
        .unwrap_or_else(|| panic!("{id} was answered"))
}

#[tokio::test]
async fn a_closed_client_refuses_new_calls_as_closed() {
    let servers = start(vec![Behaviour::Answer]).await;
    let client = HttpClient::builder().build(addrs(&servers));
    assert_eq!(send(&client, get("before")).await.status(), 200);
    client.close();
    let error = refused(&client, "after").await;
    assert!(
        matches!(error.downcast_ref(), Some(tower_lb::Error::Closed)),
        "{}",
        tower_lb::error::report(&*error)
    );
    assert_eq!(servers[0].hits(), 1, "nothing was sent after closing");
}

#[tokio::test]
async fn closing_a_clients_balancer_closes_the_client_too() {
    let servers = start(vec![Behaviour::Answer]).await;
    let client = HttpClient::builder().build(addrs(&servers));
    client.balancer().close();
    // Closed as a client, not only as a balancer: it is ready, and refuses
    // each call as closed (a generated gRPC client would turn a failed
    // `poll_ready` into `UNKNOWN`).
    let mut ready = client.clone();
    assert!(ready.ready().await.is_ok(), "a closed client is ready");
    let error = refused(&client, "after").await;
    assert!(
        matches!(error.downcast_ref(), Some(tower_lb::Error::Closed)),
        "{}",
        tower_lb::error::report(&*error)
    );
    assert_eq!(client.calls_in_progress(), 0);
    assert_eq!(servers[0].hits(), 0);
}

#[tokio::test]
async fn a_retry_rule_of_the_users_own_retries_what_it_asks_for() {
    // A 200 that carries `x-try-elsewhere` is not one the built-in rule
    // retries; this rule does, so every GET ends at the other server.
    let servers = start(vec![
        Behaviour::AnswerWithHeader("x-try-elsewhere"),
        Behaviour::Answer,
    ])
    .await;
    let client = HttpClient::builder()
        .retry_policy(tower_lb::retry::RetryPolicy::new().retry_on(RetryWhenAsked))
        .no_outlier_detection()
        .build(addrs(&servers));
    let plain = servers[1].addr.port().to_string();
    for i in 0..20 {
        let id = format!("get-{i}");
        let response = send(&client, get(&id)).await;
        assert_eq!(body_text(response).await, plain, "{id}");
        assert_eq!(servers[1].received(&id), 1, "{id}");
    }
    let asked: usize = (0..20)
        .map(|i| servers[0].received(&format!("get-{i}")))
        .sum();
    assert!(asked > 0, "no GET reached the server that asks for a retry");
}

/// An HTTP/2 server on loopback that answers every request with the body
/// it read. Its own sockets send at once (TCP_NODELAY), so any wait a
/// client sees is the client's.
async fn h2_echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
                    });
                support::serve_h2(stream, service).await;
            });
        }
    });
    addr
}

async fn sequential_http2_calls_with_a_body_are_not_held_back_by_nagle(route: H2Route) {
    // Without TCP_NODELAY (hyper-util's default) a request's DATA frame,
    // written after its HEADERS, waits until the server acknowledges the
    // HEADERS, which a server holds back for its delayed ACK: 40 ms a call
    // on Linux, where loopback otherwise answers in well under 1 ms.
    let client = http2_client(route, vec![h2_echo_server().await]);
    let body = Bytes::from(vec![b'x'; 1024]);
    // The first call connects; the calls after it are the measure.
    let first = send(&client, request(http::Method::POST, "first", body.clone())).await;
    assert_eq!(body_text(first).await.len(), 1024);
    let started = Instant::now();
    for i in 0..20 {
        let response = send(
            &client,
            request(http::Method::POST, &format!("call-{i}"), body.clone()),
        )
        .await;
        assert_eq!(body_text(response).await.len(), 1024);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(400),
        "20 calls took {took:?}: about 40 ms each is Nagle's algorithm waiting on a delayed ACK"
    );
}

/// A retry rule of the user's own: retries responses that carry
/// `x-try-elsewhere`, whatever their status, and nothing else.
struct RetryWhenAsked;

impl<B> tower_lb::retry::RetryOn<http::Response<B>> for RetryWhenAsked {
    fn response(&self, response: &http::Response<B>) -> tower_lb::retry::ResponseVerdict {
        match response.headers().get("x-try-elsewhere") {
            Some(_) => tower_lb::retry::ResponseVerdict::Retry { after: None },
            None => tower_lb::retry::ResponseVerdict::Accept,
        }
    }
}

#[tokio::test]
async fn a_retry_rule_of_the_users_own_replaces_the_built_in_one() {
    // The built-in rule retries a 503 on the other server (the test above);
    // this rule does not, so each GET is answered by the first server it
    // reaches, 503 or 200, and received once in all.
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = HttpClient::builder()
        .retry_policy(tower_lb::retry::RetryPolicy::new().retry_on(RetryWhenAsked))
        .no_outlier_detection()
        .build(addrs(&servers));
    let mut unavailable = 0;
    for i in 0..20 {
        let id = format!("get-{i}");
        let response = send(&client, get(&id)).await;
        if response.status() == 503 {
            unavailable += 1;
        }
        assert_eq!(received(&servers, &id), 1, "{id}");
    }
    assert!(unavailable > 0, "no GET reached the server answering 503");
}

/// An HTTP/2-only hyper server on `addr` (port 0 for any) that counts the
/// connections it accepts and answers `200 ok`; killed the hard way when
/// its handle drops.
struct H2CountingServer {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    serving: support::killable::Killable,
}

impl H2CountingServer {
    async fn start_at(addr: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (counted, answered) = (connections.clone(), requests.clone());
        let serving = support::killable::Killable::serve(listener, move |stream| {
            counted.fetch_add(1, Ordering::SeqCst);
            let answered = answered.clone();
            async move {
                let service = hyper::service::service_fn(move |_req| {
                    answered.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                support::serve_h2(stream, service).await;
            }
        });
        Self {
            addr,
            connections,
            requests,
            serving,
        }
    }

    async fn start() -> Self {
        Self::start_at(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for H2CountingServer {
    fn drop(&mut self) {
        self.serving.kill();
    }
}

#[tokio::test]
async fn with_http2_only_requests_made_at_once_share_one_connection_per_server() {
    let servers = [
        H2CountingServer::start().await,
        H2CountingServer::start().await,
    ];
    let client = HttpClient::builder()
        .http2_only()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .build::<Body>(servers.iter().map(|s| s.addr));
    let requests = (0..40).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let response = send(&client, get(&format!("at-once-{i}"))).await;
            (response.version(), body_text(response).await)
        })
    });
    for request in requests.collect::<Vec<_>>() {
        let answer = request.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, (http::Version::HTTP_2, "ok".to_owned()));
    }
    let connections: Vec<usize> = servers.iter().map(H2CountingServer::connections).collect();
    assert_eq!(connections, vec![1, 1]);
}

#[tokio::test]
async fn with_http2_only_a_server_restarted_on_its_address_is_connected_to_again() {
    let first = H2CountingServer::start().await;
    let addr = first.addr;
    let client = HttpClient::builder()
        .http2_only()
        .no_outlier_detection()
        .build::<Body>([addr]);
    assert_eq!(body_text(send(&client, get("before")).await).await, "ok");
    drop(first);
    let down = client.clone().oneshot(get("down")).await;
    assert!(down.is_err(), "a request succeeded with the server down");
    let second = H2CountingServer::start_at(addr).await;
    assert_eq!(body_text(send(&client, get("after")).await).await, "ok");
    assert_eq!(second.connections(), 1);
}

#[tokio::test]
async fn with_http2_only_a_post_whose_connection_is_refused_is_sent_to_another_endpoint() {
    // Nothing listens on either port, so neither connection is ready and
    // both stay in the picks (while one is ready, the other gets nothing:
    // see tests/connection_state.rs).
    let closed = [
        support::refusing_addr().await,
        support::refusing_addr().await,
    ];
    let client = HttpClient::builder()
        .http2_only()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .no_outlier_detection()
        .build::<Body>(closed);
    let post = request(http::Method::POST, "p", "pay");
    let error = client.clone().oneshot(post).await.err();
    let report = error.map(|e| tower_lb::error::report(&*e).to_string());
    assert!(
        report.as_deref().is_some_and(|r| r.contains("connect")),
        "{report:?}"
    );
    let requests: Vec<u64> = client
        .balancer()
        .endpoints()
        .iter()
        .map(|e| e.requests)
        .collect();
    assert!(
        requests.iter().all(|&r| r >= 1),
        "each was tried: {requests:?}"
    );
}

#[tokio::test]
async fn with_http2_only_an_https_client_never_sends_plain_text() {
    let server = H2CountingServer::start().await;
    let client = HttpClient::builder()
        .http2_only()
        .scheme(http::uri::Scheme::HTTPS)
        .build::<Body>([server.addr]);
    let result = client.clone().oneshot(get("tls")).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(server.connections(), 0);
}

/// Pings generous for a loaded machine: a busy server's own connection
/// must not miss one (200 ms / 200 ms failed one run in six under the whole
/// file's load). Without pings, and without an attempt timeout (off in
/// these tests), a GET caught on a server that answers nothing waits for
/// the 15 s deadline.
fn generous_keep_alive() -> tower_lb::client::Http2KeepAlive {
    tower_lb::client::Http2KeepAlive::new(Duration::from_millis(500), Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `count` GETs one after another: each is answered 200 within 6 s
/// (a ping's interval and timeout, a retry, and room to spare).
async fn every_get_answered_within_six_seconds(
    client: &HttpClient<Body>,
    name: &str,
    count: usize,
) {
    for i in 0..count {
        let call = std::time::Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(8),
            send(client, get(&format!("{name}-{i}"))),
        )
        .await
        .unwrap_or_else(|_| panic!("GET {name}-{i} hung"));
        assert_eq!(response.status(), 200);
        assert!(
            call.elapsed() < Duration::from_secs(6),
            "GET {name}-{i} took {:?}",
            call.elapsed()
        );
    }
}

/// A server that takes connections and bytes and never answers (a hung
/// process): its port is open, so only HTTP/2 pings can tell.
async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            // Read and drop everything, answer nothing, close nothing.
            held.push(tokio::spawn(async move {
                let mut stream = stream;
                let mut sink = [0u8; 4096];
                loop {
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                std::future::pending::<()>().await;
            }));
        }
    });
    (addr, accept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_http2_only_keep_alive_finds_a_server_that_never_answers_and_no_get_fails() {
    let answering = H2CountingServer::start().await;
    let (silent, _silent) = silent_server().await;
    let client = HttpClient::builder()
        .http2_only()
        .http2_keep_alive(generous_keep_alive())
        .no_attempt_timeout()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .build::<Body>([answering.addr, silent]);
    every_get_answered_within_six_seconds(&client, "get", 20).await;
    assert_eq!(answering.requests(), 20);
}

#[tokio::test]
async fn hyper_settings_without_a_timer_do_not_panic_under_the_default_keep_alive() {
    let server = H2CountingServer::start().await;
    // A builder as a user writes it: HTTP/2, no timer. hyper panics ("You
    // must supply a timer") if pings are set without one.
    let mut hyper =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    hyper.http2_only(true);
    let client = HttpClient::builder()
        .hyper(hyper)
        .build::<Body>([server.addr]);
    let response = send(&client, get("over-the-pool")).await;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(body_text(response).await, "ok");
}

/// A TCP relay to `target` that a test can freeze: from then on it passes
/// nothing either way and closes nothing, as a server that was stopped
/// (`kill -STOP`) after its connections were made.
async fn freezable_relay(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let flag = flag.clone();
            tokio::spawn(async move {
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let pass = |mut from: tokio::net::tcp::OwnedReadHalf,
                            mut to: tokio::net::tcp::OwnedWriteHalf,
                            flag: Arc<std::sync::atomic::AtomicBool>| async move {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut from, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if flag.load(std::sync::atomic::Ordering::SeqCst) {
                            // Frozen: keep reading, pass nothing, close nothing.
                            continue;
                        }
                        if tokio::io::AsyncWriteExt::write_all(&mut to, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    std::future::pending::<()>().await;
                };
                let up = pass(in_read, out_write, flag.clone());
                let down = pass(out_read, in_write, flag);
                tokio::join!(up, down);
            });
        }
    });
    (addr, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_hyper_utils_pool_keep_alive_finds_a_server_stopped_after_connecting() {
    let answering = H2CountingServer::start().await;
    let stopping = H2CountingServer::start().await;
    let (relay, frozen) = freezable_relay(stopping.addr).await;
    let mut hyper =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    hyper.http2_only(true);
    let client = HttpClient::builder()
        .hyper(hyper)
        .http2_keep_alive(generous_keep_alive())
        .no_attempt_timeout()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .build::<Body>([answering.addr, relay]);
    // Both connections made and used.
    for i in 0..4 {
        send(&client, get(&format!("before-{i}"))).await;
    }
    assert!(stopping.requests() >= 1);

    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    every_get_answered_within_six_seconds(&client, "after", 10).await;
}
