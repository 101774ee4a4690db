//! Timeouts, retries and the retry budget against real hyper servers on
//! loopback that record every request id they receive.
//!
//! Every test runs twice: `hand_built::*` through the stack this file
//! assembles from the crate's layers, `one_stop::*` through
//! `tower_lb::client::HttpClient` set up the same way (see [`Stack::build`]).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_lb::client::HttpClient;
use tower_lb::error::BoxError;
use tower_lb::http as lb_http;
use tower_lb::retry::{
    Backoff, BudgetExhausted, DeadlineTooClose, ReplayBody, ReplayLayer, RetryBudget, RetryLayer,
    RetryPolicy,
};
use tower_lb::strategy::P2c;
use tower_lb::timeout::{DeadlineLayer, Elapsed, TimeoutLayer, Timer};
use tower_lb::{discover, Balancer};

use support::recording::{
    addrs, received, request, start_all as start, Behaviour, RecordingServer,
};
use support::{AnyBody, StackKind};

type Body = Full<Bytes>;
type Client = support::Client<Body>;

/// What a test varies in the stack.
struct Stack {
    policy: RetryPolicy,
    budget: RetryBudget,
    attempt_timeout: Duration,
    deadline: Duration,
    replay_cap: usize,
}

impl Default for Stack {
    fn default() -> Self {
        Self {
            policy: RetryPolicy::new().backoff(Backoff::new().initial(Duration::from_millis(1))),
            budget: RetryBudget::new(),
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            replay_cap: tower_lb::retry::DEFAULT_REPLAY_CAP,
        }
    }
}

impl Stack {
    /// Deadline -> replay -> retry -> per-attempt timeout -> P2C
    /// least-requests over `addrs`, avoiding endpoints already tried. P2C
    /// picks at random among idle endpoints, so only the avoidance keeps a
    /// retry off the endpoint that just failed.
    ///
    /// The one-stop client has those layers in that order, avoids tried
    /// endpoints by default, and is given the same settings; its outlier
    /// detection is turned off, as the hand-built stack has none. It keeps
    /// its own classifier (5xx are failures), which without outlier
    /// detection only feeds a latency estimate least-requests ignores.
    fn build(self, kind: StackKind, addrs: impl IntoIterator<Item = SocketAddr>) -> Client {
        match kind {
            StackKind::HandBuilt => {
                let http = lb_http::client::<ReplayBody<Body>>();
                let balancer = Balancer::builder()
                    .strategy(P2c::least_requests())
                    .avoid_tried_endpoints()
                    .build(discover::fixed(lb_http::endpoints(&http, addrs)));
                let service = ServiceBuilder::new()
                    .layer(DeadlineLayer::new(self.deadline))
                    .layer(ReplayLayer::new(self.replay_cap))
                    .layer(RetryLayer::new(self.policy, self.budget))
                    .layer(TimeoutLayer::new(self.attempt_timeout))
                    .service(balancer);
                support::boxed(service)
            }
            StackKind::OneStop => support::boxed(
                HttpClient::builder()
                    .strategy(P2c::least_requests())
                    .no_outlier_detection()
                    .deadline(self.deadline)
                    .replay_cap(self.replay_cap)
                    .retry_policy(self.policy)
                    .retry_budget(self.budget)
                    .attempt_timeout(self.attempt_timeout)
                    .build::<Body>(addrs),
            ),
        }
    }
}

// The tests: each body below runs as `hand_built::<name>` and `one_stop::<name>`.
support::for_both_stacks! {
    #[tokio::test] a_post_is_never_received_twice_under_503s,
    #[tokio::test] a_post_is_never_received_twice_when_the_connection_resets_after_headers,
    #[tokio::test] a_post_is_never_received_twice_when_the_connection_resets_before_headers,
    #[tokio::test] a_post_is_never_received_twice_after_attempt_timeouts,
    #[tokio::test] a_post_is_retried_when_its_endpoint_refuses_connections,
    #[tokio::test] a_get_that_fails_on_one_endpoint_succeeds_on_another,
    #[tokio::test] retries_never_go_back_to_an_endpoint_while_others_are_untried,
    #[tokio::test] under_total_failure_the_budget_caps_attempts,
    #[tokio::test] an_exhausted_budget_names_itself_in_the_error,
    #[tokio::test(start_paused = true)] retry_after_delays_the_retry,
    #[tokio::test] a_retry_refused_by_the_deadline_names_it,
    #[tokio::test(start_paused = true)] the_deadline_ends_the_whole_call_and_says_so,
    #[tokio::test] a_retry_that_would_outlive_the_deadline_is_not_started,
    #[tokio::test] a_body_over_the_cap_is_sent_once_and_not_retried,
    #[tokio::test] a_body_under_the_cap_is_replayed_whole,
    #[tokio::test] an_idempotency_key_lets_a_post_be_retried,
}

fn post(id: &str) -> http::Request<Body> {
    request(http::Method::POST, id, "charge 10 EUR")
}

fn get(id: &str) -> http::Request<Body> {
    request(http::Method::GET, id, Bytes::new())
}

/// The response to `req`; any error fails the test.
async fn send(client: Client, req: http::Request<Body>) -> http::Response<AnyBody> {
    client.oneshot(req).await.unwrap_or_else(|e| panic!("{e}"))
}

/// The error `req` ends in; a response fails the test.
async fn fail(client: Client, req: http::Request<Body>) -> BoxError {
    client
        .oneshot(req)
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"))
}

/// `err` is an `E` whose message has `says`, wrapping the original
/// connection-refused error.
fn assert_refusal_keeps_the_error<E: std::error::Error + 'static>(err: &BoxError, says: &str) {
    assert!(err.downcast_ref::<E>().is_some(), "{err}");
    assert!(err.to_string().contains(says), "{err}");
    assert!(
        tower_lb::error::is_never_sent(&**err),
        "the original error is kept: {err}"
    );
}

async fn body_text(response: http::Response<AnyBody>) -> String {
    let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
    String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
}

async fn a_post_is_never_received_twice_under_503s(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = Stack::default().build(kind, addrs(&servers));
    for i in 0..30 {
        let id = format!("post-{i}");
        let response = client.clone().oneshot(post(&id)).await;
        assert!(response.is_ok(), "{response:?}");
        assert_eq!(received(&servers, &id), 1, "{id} was sent more than once");
    }
}

async fn a_post_is_never_received_twice_when_the_connection_resets_after_headers(kind: StackKind) {
    let servers = start(vec![Behaviour::ResetAfterHeaders, Behaviour::Answer]).await;
    let client = Stack::default().build(kind, addrs(&servers));
    let mut cut_off = 0;
    for i in 0..20 {
        let id = format!("post-{i}");
        let response = client
            .clone()
            .oneshot(post(&id))
            .await
            .unwrap_or_else(|e| panic!("{id}: the headers arrived, so no error: {e}"));
        if response.status() == 503 {
            let body = response.into_body().collect().await;
            assert!(body.is_err(), "{id}: the body was cut off");
            cut_off += 1;
        }
        assert_eq!(received(&servers, &id), 1, "{id} was sent more than once");
    }
    assert_eq!(cut_off, servers[0].hits());
    assert!(cut_off > 0, "no post reached the resetting server");
}

async fn a_post_is_never_received_twice_when_the_connection_resets_before_headers(kind: StackKind) {
    let servers = start(vec![Behaviour::ResetBeforeHeaders, Behaviour::Answer]).await;
    let client = Stack::default().build(kind, addrs(&servers));
    let mut failed = 0;
    for i in 0..20 {
        let id = format!("post-{i}");
        failed += usize::from(client.clone().oneshot(post(&id)).await.is_err());
        assert_eq!(received(&servers, &id), 1, "{id} was sent more than once");
    }
    assert_eq!(
        failed,
        servers[0].hits(),
        "every post the resetting server had fails, and only those"
    );
}

async fn a_post_is_never_received_twice_after_attempt_timeouts(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Stall(Duration::from_millis(500)),
        Behaviour::Answer,
    ])
    .await;
    let client = Stack {
        attempt_timeout: Duration::from_millis(50),
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    for i in 0..6 {
        let id = format!("post-{i}");
        let result = client.clone().oneshot(post(&id)).await;
        if let Err(err) = &result {
            assert!(Elapsed::is_attempt_timeout(&**err), "{err}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(received(&servers, &id), 1, "{id} was sent more than once");
    }
}

async fn a_post_is_retried_when_its_endpoint_refuses_connections(kind: StackKind) {
    let refusing = support::refusing_addr().await;
    let servers = start(vec![Behaviour::Answer]).await;
    let client = Stack::default().build(kind, [refusing, servers[0].addr]);
    for i in 0..10 {
        let id = format!("post-{i}");
        let response = client.clone().oneshot(post(&id)).await;
        assert!(response.is_ok(), "{id}: {response:?}");
        assert_eq!(servers[0].received(&id), 1);
    }
}

async fn a_get_that_fails_on_one_endpoint_succeeds_on_another(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = Stack::default().build(kind, addrs(&servers));
    for i in 0..10 {
        let id = format!("get-{i}");
        let response = client
            .clone()
            .oneshot(get(&id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), 200);
        assert_eq!(
            body_text(response).await,
            servers[1].addr.port().to_string()
        );
    }
}

async fn retries_never_go_back_to_an_endpoint_while_others_are_untried(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Answer,
    ])
    .await;
    let client = Stack {
        policy: RetryPolicy::new()
            .max_attempts(4)
            .expect("valid setting")
            .backoff(Backoff::new().initial(Duration::from_millis(1))),
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    for i in 0..20 {
        let id = format!("get-{i}");
        let response = client
            .clone()
            .oneshot(get(&id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            response.status(),
            200,
            "{id} did not reach the healthy server"
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

async fn under_total_failure_the_budget_caps_attempts(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Unavailable { retry_after: None },
        Behaviour::Unavailable { retry_after: None },
    ])
    .await;
    let budget = RetryBudget::new(); // 20 % plus 10/s over 10 s: a floor of 100
    let client = Stack {
        policy: RetryPolicy::new()
            .max_attempts(3)
            .expect("valid setting")
            .backoff(Backoff::new().initial(Duration::ZERO).max(Duration::ZERO)),
        budget: budget.clone(),
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    let requests = 1_000;
    for i in 0..requests {
        let response = client.clone().oneshot(get(&format!("get-{i}"))).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::SERVICE_UNAVAILABLE)
        );
    }
    let attempts = servers.iter().map(RecordingServer::hits).sum::<usize>();
    let stats = budget.stats();
    println!("{requests} requests, {attempts} attempts, {stats:?}");
    assert_eq!(stats.attempts() as usize, attempts);
    // 1.2 x requests plus the floor, and a little for windows turning over.
    assert!(
        attempts <= requests * 12 / 10 + 100 + 5,
        "{attempts} attempts"
    );
    assert!(
        attempts >= requests * 12 / 10,
        "the budget allowed too little: {attempts}"
    );
    assert!(stats.refused > 0);
}

async fn an_exhausted_budget_names_itself_in_the_error(kind: StackKind) {
    let refusing = support::refusing_addr().await;
    let budget = RetryBudget::new()
        .ratio(0.0)
        .expect("valid setting")
        .min_per_second(0);
    let client = Stack {
        budget,
        ..Stack::default()
    }
    .build(kind, [refusing]);
    let err = fail(client, get("get-1")).await;
    assert_refusal_keeps_the_error::<BudgetExhausted>(&err, "retry budget is exhausted");
}

async fn retry_after_delays_the_retry(kind: StackKind) {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: Some("1"),
    }])
    .await;
    let client = Stack::default().build(kind, addrs(&servers));
    let started = Instant::now();
    let response = send(client, get("get-1")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(servers[0].received("get-1"), 2);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert!(
        waited < Duration::from_millis(1_500),
        "retried after {waited:?}"
    );
}

async fn a_retry_refused_by_the_deadline_names_it(kind: StackKind) {
    let refusing = support::refusing_addr().await;
    let client = Stack {
        policy: RetryPolicy::new().backoff(
            Backoff::new()
                .initial(Duration::from_secs(5))
                .max(Duration::from_secs(5)),
        ),
        deadline: Duration::from_secs(1),
        ..Stack::default()
    }
    .build(kind, [refusing]);
    let err = fail(client, get("get-1")).await;
    assert_refusal_keeps_the_error::<DeadlineTooClose>(&err, "past the call's deadline");
}

async fn the_deadline_ends_the_whole_call_and_says_so(kind: StackKind) {
    let servers = start(vec![
        Behaviour::Stall(Duration::from_secs(10)),
        Behaviour::Stall(Duration::from_secs(10)),
    ])
    .await;
    let client = Stack {
        attempt_timeout: Duration::from_millis(400),
        deadline: Duration::from_secs(1),
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    let started = Instant::now();
    let err = fail(client, get("get-1")).await;
    let elapsed = err.downcast_ref::<Elapsed>().copied();
    assert_eq!(elapsed.map(|e| e.timer()), Some(Timer::Deadline), "{err}");
    assert!(
        err.to_string().contains("deadline passed after 1.0s"),
        "{err}"
    );
    assert!(started.elapsed() <= Duration::from_millis(1_050));
}

async fn a_retry_that_would_outlive_the_deadline_is_not_started(kind: StackKind) {
    let servers = start(vec![Behaviour::Unavailable {
        retry_after: Some("2"),
    }])
    .await;
    let client = Stack {
        deadline: Duration::from_secs(1),
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    let started = Instant::now();
    let response = send(client, get("get-1")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(servers[0].hits(), 1);
    assert!(started.elapsed() < Duration::from_millis(500), "it waited");
}

async fn a_body_over_the_cap_is_sent_once_and_not_retried(kind: StackKind) {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: None,
    }])
    .await;
    let client = Stack {
        replay_cap: 1024,
        ..Stack::default()
    }
    .build(kind, addrs(&servers));
    let big = vec![b'x'; 4096];
    let response = send(client, request(http::Method::PUT, "put-1", big)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(received(&servers, "put-1"), 1);
    assert_eq!(
        servers[0].body_lengths(),
        vec![4096],
        "the one attempt had the whole body"
    );
}

async fn a_body_under_the_cap_is_replayed_whole(kind: StackKind) {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: None,
    }])
    .await;
    let client = Stack::default().build(kind, addrs(&servers));
    let body = vec![b'y'; 10_000];
    let response = send(client, request(http::Method::PUT, "put-1", body)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(servers[0].body_lengths(), vec![10_000, 10_000]);
}

async fn an_idempotency_key_lets_a_post_be_retried(kind: StackKind) {
    let servers = start(vec![Behaviour::UnavailableFirst {
        times: 1,
        retry_after: None,
    }])
    .await;
    let client = Stack::default().build(kind, addrs(&servers));
    let mut req = post("post-1");
    req.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("k-1"));
    let response = send(client, req).await;
    assert_eq!(response.status(), 200);
    assert_eq!(received(&servers, "post-1"), 2);
}
