//! Every Rust snippet of the README, compiled, so that none can rot.
//!
//! Each snippet sits below between a `// README begin` and a `// README end`
//! line, inside an `async fn` that returns a `Result` (so `.await` and `?`
//! work as they do in a user's `main`). The test at the bottom reads the
//! README and checks that its Rust blocks and these snippets are the same
//! text, one for one: a snippet changed on one side only fails it.
//!
//! The snippets are compiled, not run: they talk to servers at fixed
//! addresses, as a user's code would. The examples (`cargo run --example
//! quickstart`, `hyper_client`, `tonic_channel`, `dns`) run the same calls
//! against real servers, and the integration tests prove each behaviour.

// The functions are never called (see above), and a snippet may show a value
// it then leaves alone (`let answer = ...`) to say what a call returns.
#![allow(dead_code, unused_variables)]

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn any_tower_service() -> Result<(), BoxError> {
    // README begin
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::{service_fn, ServiceBuilder, ServiceExt};
    use tower_lb::{discover, strategy::P2c, Balancer};

    let (discovery, stream) = discover::channel();
    for port in [8080, 8081, 8082] {
        let endpoint = service_fn(move |req: String| async move {
            Ok::<_, Infallible>(format!("{port} answered {req}"))
        });
        discovery.insert(port, endpoint)?;
    }

    let balancer = Balancer::builder()
        .strategy(P2c::least_requests()) // default: P2c::peak_ewma()
        .startup_wait(Duration::from_secs(2)) // default: 5 s
        .build(stream); // spawns the driver task

    let client = ServiceBuilder::new()
        .concurrency_limit(64)
        .service(balancer.clone());
    let answer = client.oneshot("ping".to_string()).await?;

    discovery.remove(8081)?; // 8081 drains: no new requests, in-flight ones finish
    for endpoint in balancer.endpoints() {
        // key, state, in flight, latency, requests, successes, failures, ejections
        println!("{endpoint:?}");
    }
    balancer.shutdown(Duration::from_secs(5)).await?; // refuse new requests, wait for in-flight ones
                                                      // README end
    Ok(())
}

async fn hyper_endpoints() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower::ServiceExt;
    use tower_lb::{discover, http as lb_http, Balancer};

    let client = lb_http::client::<Empty<Bytes>>(); // one hyper-util Client, shared
    let addrs: [SocketAddr; 2] = ["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
    let balancer = Balancer::builder().build(discover::fixed(lb_http::endpoints(&client, addrs)));

    let response = balancer
        .oneshot(http::Request::get("/hello").body(Empty::new())?)
        .await?;
    // README end
    Ok(())
}

async fn http_client() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use tower::ServiceExt;
    use tower_lb::client::HttpClient;

    let addrs: [SocketAddr; 2] = ["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
    let client = HttpClient::builder().build::<Full<Bytes>>(addrs); // or .build_dns(Dns::host("api.internal", 8080))?
    let response = client
        .clone()
        .oneshot(http::Request::get("/users/7").body(Full::new(Bytes::new()))?)
        .await?;

    client.balancer().endpoints(); // per-endpoint stats: state (active / ejected / draining), requests, latency
    client.retry_stats(); // requests, retries, hedges, refusals, amplification
    client.shutdown(Duration::from_secs(5)).await?; // refuse new calls, let calls in progress finish, retries included
                                                    // README end
    Ok(())
}

async fn grpc_channel() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;
    use std::time::Duration;

    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tower_lb::client::GrpcChannel;
    use tower_lb::grpc::MethodSafety;
    use tower_lb::request::Safety;

    let addrs: [SocketAddr; 2] = ["127.0.0.1:50051".parse()?, "127.0.0.1:50052".parse()?];
    let channel = GrpcChannel::builder()
        .method_safety(MethodSafety::new().service("grpc.health.v1.Health", Safety::Safe))
        .configure_endpoint(|e| Ok(e.http2_keep_alive_interval(Duration::from_secs(30)))) // tonic's settings: a tonic Channel per endpoint
        .build(addrs); // or .build_dns(Dns::srv("_grpc._tcp.orders.internal"))?
    let mut client = HealthClient::new(channel.clone());
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    // README end
    Ok(())
}

async fn outlier_detection() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::classify::HttpClassify;
    use tower_lb::health::{OutlierDetection, SuccessRate};
    use tower_lb::{discover, http as lb_http, Balancer};

    let client = lb_http::client::<Empty<Bytes>>();
    let addrs: [SocketAddr; 2] = ["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
    let balancer = Balancer::builder()
        .classify(HttpClassify::server_errors()) // 5xx and errors are failures; 4xx are not
        .outlier_detection(
            OutlierDetection::new() // Envoy's defaults
                .consecutive_failures(5)? // eject after 5 in a row (the default)
                .success_rate(SuccessRate::new()) // mean - 1.9 x stdev, >= 5 hosts x 100 requests
                .base_ejection_time(Duration::from_secs(30))
                .max_ejection_percent(10)?,
        )
        .panic_threshold(50)? // below 50 % in service, use everything
        .build(discover::fixed(lb_http::endpoints(&client, addrs)));
    // README end
    Ok(())
}

async fn active_health_checks() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;
    use std::time::Duration;

    use tower_lb::client::{GrpcChannel, HttpClient};
    use tower_lb::health::HealthCheck;

    let addrs: [SocketAddr; 2] = ["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
    // gRPC: grpc.health.v1.Health/Watch for the whole server (""), as gRPC's A17.
    let channel = GrpcChannel::builder()
        .health_check(HealthCheck::grpc(""))
        .build(addrs);
    // HTTP: GET /healthz every 2 s; out after 3 failures in a row, back after 2 passes.
    let client = HttpClient::builder()
        .health_check(
            HealthCheck::http_get("/healthz")?
                .interval(Duration::from_secs(2))?
                .expected_statuses(200..=399)?,
        )
        .build::<String>(addrs);
    // README end
    Ok(())
}

async fn timeouts_retries_and_hedging() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_lb::classify::HttpClassify;
    use tower_lb::health::OutlierDetection;
    use tower_lb::hedge::HedgeLayer;
    use tower_lb::retry::{ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryPolicy};
    use tower_lb::timeout::{DeadlineLayer, TimeoutLayer};
    use tower_lb::{discover, http as lb_http, Balancer};

    let addrs: [SocketAddr; 2] = ["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
    let http = lb_http::client::<ReplayBody<Full<Bytes>>>(); // bodies the retry layer can replay
    let balancer = Balancer::builder()
        .classify(HttpClassify::server_errors())
        .outlier_detection(OutlierDetection::new())
        .avoid_tried_endpoints() // a retry or hedge goes to an endpoint the call has not tried, and takes no round-robin turn
        .build(discover::fixed(lb_http::endpoints(&http, addrs)));

    let budget = RetryBudget::new(); // 20 % of recent requests + 10/s, shared by every clone
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(2))) // the whole call, every attempt and pause
        .layer(ReplayLayer::default()) // buffer bodies as they are sent, up to 64 KiB
        .layer(RetryLayer::new(RetryPolicy::new(), budget.clone())) // 3 attempts, 25 ms doubling to 250 ms, ±20 %
        .layer(HedgeLayer::new(budget.clone())) // after p95 of recent calls, at least 10 ms
        .layer(TimeoutLayer::new(Duration::from_millis(500))) // each attempt
        .service(balancer);

    let response = client
        .oneshot(http::Request::get("/orders/7").body(Full::default())?)
        .await?;
    println!("{:?}", budget.stats()); // requests, retries, hedges, refused; amplification()
                                      // README end
    Ok(())
}

fn a_request_type_of_your_own() {
    // README begin
    use tower_lb::request::{CallContext, HasCallContext, NotReplayable, Replayable, Safety};

    #[derive(Clone)]
    struct Lookup {
        key: String,
        call: Option<CallContext>,
    }

    impl HasCallContext for Lookup {
        fn call_context(&self) -> Option<&CallContext> {
            self.call.as_ref()
        }
        fn call_context_mut(&mut self) -> &mut CallContext {
            self.call.get_or_insert_with(CallContext::new)
        }
    }

    impl Replayable for Lookup {
        fn safety(&self) -> Safety {
            Safety::Safe
        }
        fn replay(&self) -> Result<Self, NotReplayable> {
            Ok(self.clone())
        }
    }
    // README end
}

async fn weighted_round_robin() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::classify::HttpClassify;
    use tower_lb::http::{self as lb_http, HttpEndpoint};
    use tower_lb::load::OrcaLoadReports;
    use tower_lb::strategy::WeightedRoundRobin;
    use tower_lb::{discover, Balancer};

    let client = lb_http::client::<Empty<Bytes>>();
    let weighted: [(SocketAddr, u32); 2] =
        [("10.0.0.1:8080".parse()?, 3), ("10.0.0.2:8080".parse()?, 1)];
    let endpoints = weighted.map(|key| (key, HttpEndpoint::new(client.clone(), key.0)));

    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new()) // gRPC A58 defaults
        .classify(HttpClassify::server_errors().load_reports(OrcaLoadReports)) // read endpoint-load-metrics
        .static_weights(|&(_, weight): &(SocketAddr, u32)| f64::from(weight)) // until reports come in
        .build(discover::fixed(endpoints));
    // README end
    Ok(())
}

async fn endpoint_metadata() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::http::{self as lb_http, HttpEndpoint};
    use tower_lb::topology::EndpointMetadata;
    use tower_lb::{discover, Balancer};

    let client = lb_http::client::<Empty<Bytes>>();
    // The key carries what discovery knows: (address, zone, priority).
    type Key = (SocketAddr, &'static str, u32);
    let keys: [Key; 3] = [
        ("10.0.1.1:8080".parse()?, "zone-a", 0),
        ("10.0.2.1:8080".parse()?, "zone-b", 0),
        ("10.9.0.1:8080".parse()?, "dr-site", 1), // a fallback
    ];
    let endpoints = keys.map(|key| (key, HttpEndpoint::new(client.clone(), key.0)));

    let balancer = Balancer::builder()
        .metadata(|&(_, zone, priority): &Key| {
            EndpointMetadata::new()
                .with_zone(zone)
                .with_priority(priority)
        })
        .build(discover::fixed(endpoints));
    // README end
    Ok(())
}

async fn dns_discovery() -> Result<(), BoxError> {
    // README begin
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::discover::{Dns, DnsEndpoint};
    use tower_lb::http::{self as lb_http, HttpEndpoint};
    use tower_lb::strategy::WeightedRoundRobin;
    use tower_lb::Balancer;

    let client = lb_http::client::<Empty<Bytes>>();

    // A and AAAA records of a name, at one port (a Kubernetes headless service):
    let http = client.clone();
    let (refresh, discover) = Dns::host("api.default.svc.cluster.local", 8080)
        .ttl_bounds(Duration::from_secs(5), Duration::from_secs(60))?
        .build(move |addr| HttpEndpoint::new(http.clone(), addr))?;

    // Or SRV records (Consul: _api._tcp.service.consul), weighted by the records:
    let http = client.clone();
    let (refresh, discover) = Dns::srv("_api._tcp.service.consul")
        .name_servers(["127.0.0.1:8600".parse()?])
        .build(move |addr| HttpEndpoint::new(http.clone(), addr))?;
    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new())
        .static_weights(DnsEndpoint::static_weight)
        .build(discover);

    refresh.resolve_now(); // a deploy just finished: look again now
                           // README end
    Ok(())
}

async fn affinity() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_lb::client::HttpClient;
    use tower_lb::request::HashKeyLayer;
    use tower_lb::strategy::RingHash;

    let addrs: [SocketAddr; 2] = ["10.0.0.1:8080".parse()?, "10.0.0.2:8080".parse()?];
    let client: HttpClient<Empty<Bytes>> = HttpClient::builder()
        .balancer(|b| b.strategy(RingHash::new())) // bounded at 1.25 x the mean
        .build(addrs);
    // The key of each request: its `x-user-id` header (or gRPC metadata).
    let client = ServiceBuilder::new()
        .layer(HashKeyLayer::header("x-user-id")?)
        .service(client);
    let request = http::Request::get("/cart")
        .header("x-user-id", "42")
        .body(Empty::new())?;
    let response = client.oneshot(request).await?; // user 42's server, while it can
                                                   // README end
    Ok(())
}

async fn subsetting() -> Result<(), BoxError> {
    // README begin
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::client::HttpClient;
    use tower_lb::discover::{self, Subset};

    // This replica's ordinal and the fleet's size (a StatefulSet's, say).
    let (replica, replicas): (u32, u32) = (3, 200);
    let addrs: Vec<SocketAddr> = vec!["10.0.0.1:8080".parse()?, "10.0.0.2:8080".parse()?];
    let subset = Subset::aperture(replica, replicas, 10)?; // 10 backends each
    let endpoints = discover::fixed(addrs.into_iter().map(|addr| (addr, addr)));
    let client: HttpClient<Empty<Bytes>> =
        HttpClient::builder().build_discover(subset.discover(endpoints));
    // README end
    Ok(())
}

// Behind tower-lb's `kubernetes` feature (off by default), which CI's tests
// turn on; the downstream crate, which has no such feature, leaves it out.
#[cfg(feature = "kubernetes")]
async fn kubernetes() -> Result<(), BoxError> {
    // README begin
    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_lb::client::HttpClient;
    use tower_lb::discover::{EndpointSlices, KubernetesEndpoint};
    use tower_lb::topology::ZoneAware;

    // In a pod: the service account's token and the API server's address.
    let kube = kube::Client::try_default().await?;
    let discover = EndpointSlices::new(kube, "shop", "checkout")
        .port("http") // the Service port's name; not needed with one port
        .build(|addr| addr)?;
    let client: HttpClient<Empty<Bytes>, KubernetesEndpoint> = HttpClient::builder()
        .balancer(|b| {
            b.metadata(KubernetesEndpoint::metadata) // readiness, zone, labels
                .zone_aware(ZoneAware::new("eu-west-1a"))
        })
        .build_discover(discover);
    // README end
    Ok(())
}

/// The README's Rust blocks, each without its fences.
fn readme_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_else(|e| panic!("cannot read README.md: {e}"));
    between(&readme, "```rust", "```")
}

/// The snippets of this file, each without the indent it has here.
fn snippets() -> Vec<String> {
    between(
        include_str!("readme.rs"),
        "// README begin",
        "// README end",
    )
}

/// The runs of lines of `text` between a line that is `open` and the next
/// that is `close` (surrounding whitespace aside), each dedented.
fn between(text: &str, open: &str, close: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match (&mut current, line.trim()) {
            (None, marker) if marker == open => current = Some(Vec::new()),
            (Some(lines), marker) if marker == close => {
                runs.push(dedent(lines));
                current = None;
            }
            (Some(lines), _) => lines.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "a run opened by {open:?} is not closed");
    runs
}

/// `lines` without the whitespace they all start with.
fn dedent(lines: &[&str]) -> String {
    let indent = lines
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|line| line.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_rust_block_of_the_readme_is_a_compiled_snippet_and_the_other_way_round() {
    let blocks = readme_blocks();
    let snippets = snippets();
    assert!(!blocks.is_empty(), "no ```rust block found in the README");
    for (i, block) in blocks.iter().enumerate() {
        assert!(
            snippets.contains(block),
            "README Rust block {} is not a snippet of tests/readme.rs (copy it there, \
             or copy the snippet's new text to the README):\n{block}",
            i + 1
        );
    }
    for snippet in &snippets {
        assert!(
            blocks.contains(snippet),
            "this snippet of tests/readme.rs is not in the README:\n{snippet}"
        );
    }
}

/// The `[dependencies]` lines of a manifest, but tower-lb's own (the README
/// names a version, the downstream crate a path).
fn dependency_lines(manifest: &str) -> Vec<&str> {
    manifest
        .lines()
        .skip_while(|line| line.trim() != "[dependencies]")
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter(|line| !line.trim().is_empty() && !line.starts_with("tower-lb"))
        .collect()
}

#[test]
fn the_crate_ci_builds_on_the_minimum_rust_has_the_readmes_install_lines() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_else(|e| panic!("cannot read README.md: {e}"));
    let install = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("the README has no ```toml install block"));
    let downstream = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/ci/downstream/Cargo.toml"
    ))
    .unwrap_or_else(|e| panic!("cannot read ci/downstream/Cargo.toml: {e}"));
    assert!(
        install.lines().any(|line| line.starts_with("tower-lb = ")),
        "the install block does not name tower-lb:\n{install}"
    );
    assert_eq!(
        dependency_lines(install),
        dependency_lines(&downstream),
        "the README's install lines and ci/downstream/Cargo.toml differ"
    );
}
