//! Glue for tonic: a balanced channel for generated gRPC clients.
//!
//! [`GrpcChannel`](crate::client::GrpcChannel) balances one HTTP/2 connection per endpoint (each
//! made on the endpoint's first call, and again after it closes) with a
//! [`Balancer`](crate::Balancer), with a deadline, retries, a per-attempt
//! timeout and outlier detection around it. It is a
//! `Service<http::Request<tonic::body::Body>>` like tonic's own `Channel`,
//! so any generated client takes it unchanged:
//!
//! ```no_run
//! use tonic_health::pb::health_client::HealthClient;
//! use tonic_health::pb::HealthCheckRequest;
//! use tower_lb::client::GrpcChannel;
//! use tower_lb::grpc::MethodSafety;
//! use tower_lb::request::Safety;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_lb::BoxError> {
//! let channel = GrpcChannel::builder()
//!     .method_safety(MethodSafety::new().service("grpc.health.v1.Health", Safety::Safe))
//!     .build(["127.0.0.1:50051".parse()?, "127.0.0.1:50052".parse()?]);
//!
//! let mut client = HealthClient::new(channel);
//! let reply = client.check(HealthCheckRequest { service: String::new() }).await?;
//! # let _ = reply;
//! # Ok(())
//! # }
//! ```
//!
//! What gRPC adds to the [ready-made client](crate::client) defaults:
//!
//! - **Classification** by gRPC status ([`HttpClassify::grpc`](crate::classify::HttpClassify::grpc)): `UNKNOWN`,
//!   `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and
//!   `DATA_LOSS` count against the endpoint, read from the headers or the
//!   trailers; ORCA reports in the `endpoint-load-metrics-bin` trailer feed
//!   [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin).
//! - **Retries**: `UNAVAILABLE` (and HTTP 502/503/504 from a proxy) is
//!   retried, no other code. A call is sent again only if its method may
//!   repeat ([`MethodSafety`], or a [`Safety`](crate::request::Safety) in the
//!   call's extensions) or it provably never left (the connection could not
//!   be made): gRPC calls are POSTs, unsafe unless said otherwise.
//! - **Deadlines** are the caller's: no channel deadline or attempt timeout
//!   by default (set them with [`ClientBuilder::deadline`](crate::client::ClientBuilder::deadline) and
//!   [`ClientBuilder::attempt_timeout`](crate::client::ClientBuilder::attempt_timeout)); a call's `grpc-timeout`
//!   (`tonic::Request::set_timeout`) bounds the call, retries included
//!   ([`GrpcTimeoutLayer`]), and each attempt tells the server the time left.
//!   A deadline running out is not held against the endpoint. Connecting
//!   times out after [`DEFAULT_CONNECT_TIMEOUT`](crate::client::DEFAULT_CONNECT_TIMEOUT).
//! - **Errors** reach the generated client as a `tonic::Status` with the
//!   right code ([`status_from_error`]): `DEADLINE_EXCEEDED` for timeouts,
//!   `UNAVAILABLE` when there is no endpoint, the channel is closed, or the
//!   connection broke under the call (reset, closed), even in the middle of
//!   the answer.
//! - **Transport**: a call goes from the balancer straight to its
//!   endpoint's HTTP/2 connection, which tower-lb makes and keeps, with no
//!   queue in between (a tonic `Channel` puts a `Buffer` and a worker task
//!   in front of each connection). With
//!   [`ClientBuilder::configure_endpoint`](crate::client::ClientBuilder::configure_endpoint), or over `https`, each
//!   endpoint is a tonic [`Channel`](tonic::transport::Channel) made from the configured `Endpoint`
//!   instead, so every tonic setting (keep-alive, TLS, limits) applies.
//! - **TLS**: [`ClientBuilder::scheme`](crate::client::ClientBuilder::scheme)`(Scheme::HTTPS)`, with one of tonic's
//!   TLS features enabled in your `Cargo.toml` (tonic then applies TLS to
//!   `https` endpoints, or the `tls_config` you give
//!   [`ClientBuilder::configure_endpoint`](crate::client::ClientBuilder::configure_endpoint)).

mod endpoint;
mod safety;
mod status;
mod timeout;

pub(crate) use self::endpoint::ConfigureEndpoint;
pub use self::endpoint::{EndpointBody, GrpcEndpoint, GrpcResponseFuture};
pub use self::safety::{MethodSafety, WithMethodSafety};
pub use self::status::status_from_error;
pub(crate) use self::status::StatusBody;
pub use self::timeout::{GrpcTimeout, GrpcTimeoutLayer};
