//! The `tracing` events the balancer emits, captured by one global subscriber
//! (see `CapturedLogs::global`).

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_lb::classify::HttpClassify;
use tower_lb::discover;
use tower_lb::health::OutlierDetection;
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::RoundRobin;
use tower_lb::{Balancer, EndpointState};

use support::{get, servers, wait_until, Body, CapturedLogs, Scripted};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn discovery_error_is_reported_as_a_warning_with_its_cause() {
    let logs = CapturedLogs::global();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let balancer = Balancer::builder().build(Scripted(rx));
    tx.send(Err(std::io::Error::other("registry unreachable")))
        .unwrap();
    wait_until(WAIT, || {
        !logs.lines_with(&["registry unreachable"]).is_empty()
    })
    .await;
    let line = &logs.lines_with(&["registry unreachable"])[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("keeping the last known endpoints"), "{line}");
    drop(balancer);
}

#[tokio::test]
async fn removing_an_unknown_endpoint_is_reported_as_a_debug_event() {
    let logs = CapturedLogs::global();
    let (handle, stream) = discover::channel::<u32, HttpEndpoint<Body>>();
    let balancer = Balancer::builder().build(stream);
    handle.remove(4242).unwrap();
    let needles = ["unknown endpoint", "endpoint=4242"];
    wait_until(WAIT, || !logs.lines_with(&needles).is_empty()).await;
    let line = &logs.lines_with(&needles)[0];
    assert!(line.contains("DEBUG"), "{line}");
    assert!(balancer.endpoints().is_empty());
}

#[tokio::test]
async fn ejection_and_return_are_reported_with_the_reason_and_numbers() {
    let logs = CapturedLogs::global();
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let base = Duration::from_secs(30);
    let client = lb_http::client();
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .classify(HttpClassify::server_errors())
        .outlier_detection(OutlierDetection::new().base_ejection_time(base))
        .build(discover::fixed(lb_http::endpoints(
            &client,
            all.iter().map(|s| s.addr),
        )));
    wait_until(WAIT, || balancer.endpoints().len() == 2).await;
    for _ in 0..10 {
        let response = balancer.clone().oneshot(get()).await.expect("response");
        response.into_body().collect().await.expect("body");
    }
    let addr = all[0].addr.to_string();
    wait_until(WAIT, || {
        !logs.lines_with(&["endpoint ejected", &addr]).is_empty()
    })
    .await;
    tokio::time::pause();
    tokio::time::advance(base).await;
    wait_until(WAIT, || {
        !logs.lines_with(&["back in service", &addr]).is_empty()
    })
    .await;

    let ejection = &logs.lines_with(&["endpoint ejected", &addr])[0];
    assert!(ejection.contains("WARN"), "{ejection}");
    assert!(ejection.contains("5 consecutive failures"), "{ejection}");
    assert!(ejection.contains("ejection_time=30s"), "{ejection}");
    assert!(ejection.contains("multiplier=1"), "{ejection}");
    let back = &logs.lines_with(&["back in service", &addr])[0];
    assert!(back.contains("INFO"), "{back}");
    assert!(balancer
        .endpoints()
        .iter()
        .all(|e| e.state == EndpointState::Active));
}
