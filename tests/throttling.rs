//! Client-side adaptive throttling against a real server that turns calls
//! away, and then recovers.

mod support;

use std::time::Duration;

use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::retry::{RetryBudget, Throttled};

use support::{get, Body, TestServer};

/// A client of `server` throttling with k = 2 over a 500 ms window.
fn throttled_client(server: &TestServer) -> (HttpClient<Body>, RetryBudget) {
    let budget = RetryBudget::new()
        .window(Duration::from_millis(500))
        .and_then(|b| b.adaptive_throttling(2.0))
        .expect("valid settings");
    let client = HttpClient::builder()
        .retry_budget(budget.clone())
        .no_outlier_detection()
        .build([server.addr]);
    (client, budget)
}

/// Sends `n` GETs one by one; returns how many were answered 200 and how
/// many the client throttled.
async fn send(client: &HttpClient<Body>, n: usize) -> (usize, usize) {
    let (mut ok, mut throttled) = (0, 0);
    for _ in 0..n {
        match client.clone().oneshot(get()).await {
            Ok(response) if response.status() == 200 => ok += 1,
            Ok(_) => {}
            Err(error) => {
                let chain = std::iter::successors(
                    Some(&*error as &(dyn std::error::Error + 'static)),
                    |e| e.source(),
                );
                if chain.clone().any(|e| e.is::<Throttled>()) {
                    throttled += 1;
                }
            }
        }
    }
    (ok, throttled)
}

#[tokio::test]
async fn a_server_that_turns_calls_away_is_sent_few_until_it_recovers() {
    let server = TestServer::start().await;
    let (client, budget) = throttled_client(&server);
    assert_eq!(
        send(&client, 50).await,
        (50, 0),
        "healthy: nothing throttled"
    );

    // Every call answered 503: after a window, the client keeps most of
    // them to itself (and retries none of those).
    server.fail_every(1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = server.hits();
    let (_, throttled) = send(&client, 300).await;
    let reached = server.hits() - before;
    assert!(throttled > 200, "{throttled} of 300 throttled");
    assert!(reached < 150, "{reached} attempts reached the server");
    assert_eq!(budget.stats().throttled as usize, throttled);

    // It recovers: as calls get through and are accepted, more are let
    // through (k = 2 sends about twice what was accepted), until none is
    // throttled: a few windows.
    server.fail_every(0);
    let started = tokio::time::Instant::now();
    let mut recovered = None;
    while started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if send(&client, 20).await == (20, 0) {
            recovered = Some(started.elapsed());
            break;
        }
    }
    let took = recovered.expect("still throttled 10 s after the server recovered");
    println!("every call let through again {took:?} after the server recovered");
}

#[tokio::test]
async fn a_cap_on_calls_in_flight_fails_the_calls_beyond_it_at_once_with_overloaded() {
    // Envoy's `max_requests` circuit breaker, from tower: `load_shed` over
    // `concurrency_limit` fails a call at once when the cap is reached,
    // instead of queueing it.
    let server = TestServer::with_delay(Duration::from_millis(300)).await;
    let client: HttpClient<Body> = HttpClient::builder().build([server.addr]);
    let capped = tower::ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(2)
        .service(client);
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(capped.clone().oneshot(get())))
        .collect();
    let (mut answered, mut overloaded) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(response) => {
                assert_eq!(response.status(), 200);
                answered += 1;
            }
            Err(error) => {
                assert!(error.is::<tower::load_shed::error::Overloaded>(), "{error}");
                overloaded += 1;
            }
        }
    }
    assert_eq!((answered, overloaded), (2, 3));
    // The two in flight took the server's 300 ms; the others failed first.
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(server.hits(), 2);
}
