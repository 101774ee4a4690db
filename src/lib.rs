//! Tower middleware for client-side load balancing.
//!
//! A [`Balancer`] spreads requests over a changing set of endpoints that a
//! discovery stream ([`tower::discover::Discover`]) provides. It is a cheap
//! `Clone` handle: many tasks pick through it at once with no lock and no
//! `Buffer`. Strategies ([`strategy`]) decide which endpoint gets each request:
//! round robin; weighted round robin by the load that endpoints report about
//! themselves (ORCA, as in gRPC's A58), or by static weights from discovery
//! until reports come in; and power of two choices by requests in flight or
//! by Peak-EWMA latency.
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_lb::{discover, Balancer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let (handle, stream) = discover::channel();
//! for port in [8080, 8081, 8082] {
//!     let endpoint = service_fn(move |req: String| async move {
//!         Ok::<_, Infallible>(format!("{port} answered {req}"))
//!     });
//!     handle.insert(port, endpoint)?;
//! }
//!
//! let client = ServiceBuilder::new()
//!     .concurrency_limit(64)
//!     .service(Balancer::builder().build(stream));
//!
//! let answer = client.oneshot("ping".to_string()).await?;
//! assert!(answer.ends_with("answered ping"));
//! # Ok(())
//! # }
//! ```
//!
//! Around the balancer, as tower layers: [`timeout`] (per attempt, and a
//! deadline for the whole call), [`retry`] (gated by each request's
//! [`Safety`](request::Safety) class, paced by backoff and server pushback,
//! capped by a shared budget, with replayable bodies) and [`hedge`] (a second
//! attempt after an adaptive latency percentile). [`health`] ejects failing
//! endpoints and slow-starts new ones; [`classify`] decides what a failure
//! is and reads the load reports that weighted round robin balances by.
//! Endpoints come from any discovery stream, or from [`discover`]'s fixed
//! list, push channel or DNS.
//!
//! Or all of it at once: [`client::HttpClient`] (feature `http`) goes from a
//! list of addresses or a DNS name to the whole stack with sensible
//! defaults, every part replaceable, and [`client::GrpcChannel`] (feature
//! `grpc`) does the same for generated gRPC clients, over one HTTP/2
//! connection per endpoint.
//!
//! ## Cargo features
//!
//! | feature | default | enables | pulls in |
//! |---|---|---|---|
//! | `orca` | yes | ORCA load reports: [`load::OrcaLoadReports`] and the parsers of the `endpoint-load-metrics` header (`TEXT`, `JSON`, `BIN`) and gRPC's `endpoint-load-metrics-bin` | `prost`, `serde`, `serde_json`, `base64` |
//! | `http` | yes | [`http`] (a per-endpoint service over one shared hyper-util client, or over an HTTP/2 connection of its own), [`client`] ([`client::HttpClient`]), [`classify::HttpClassify`] (HTTP and gRPC outcomes over tower-http's `classify`), and the HTTP GET health check (`health::HealthCheck::http_get`); turns on `orca` (the clients read ORCA reports by default) | `hyper`, `hyper-util`, `tower-http`, `h2`, and `orca`'s |
//! | `dns` | yes | [`discover::Dns`]: A/AAAA or SRV records, re-resolved when their TTL runs out; with `http`, the clients' `build_dns` and `resolve_now` | `hickory-resolver` |
//! | `grpc` | yes | [`grpc`] and [`client::GrpcChannel`]: one HTTP/2 connection (or, configured, one tonic `Channel`) per endpoint, balanced, for generated clients; the gRPC health check (`health::HealthCheck::grpc`); turns on `http` | `tonic` (its `channel` feature), `tonic-health`, and all of `http`'s |
//! | `kubernetes` | no | [`discover::EndpointSlices`]: a Kubernetes Service's endpoints from its EndpointSlices, watched with kube-runtime (list, watch, bookmarks, relist on 410 Gone), their readiness and zone as [`topology::EndpointMetadata`]. As with any crate built on kube, the application picks the Kubernetes version with one of k8s-openapi's `v1_*` features | `kube` (client, runtime, rustls), `k8s-openapi` |
//!
//! With none of them (`default-features = false`) the crate still has the
//! balancer and every strategy, the fixed list and push channel discovery,
//! outlier detection, active TCP health checks and slow start, weighted round robin (with
//! `UtilizationHeader` or a `LoadExtractor` of your own), and the
//! timeout, retry and hedge layers, for `http::Request`s or any request type
//! that implements [`Replayable`](request::Replayable). The `http` and
//! `http-body` crates stay dependencies even then: those layers know
//! `http::Request`, whatever sends it.
//!
//! See the README for the design, the benchmarks and the status of each
//! part.
//!
// Links to items behind a feature: to the item when the feature is on,
// to the table above when it is off, so that rustdoc finds no broken link
// in any feature set.
#![cfg_attr(
    feature = "http",
    doc = "
[`http`]: crate::http
[`client`]: crate::client
[`client::HttpClient`]: crate::client::HttpClient
[`classify::HttpClassify`]: crate::classify::HttpClassify
"
)]
#![cfg_attr(feature = "dns", doc = "[`discover::Dns`]: crate::discover::Dns")]
#![cfg_attr(
    feature = "grpc",
    doc = "
[`grpc`]: crate::grpc
[`client::GrpcChannel`]: crate::client::GrpcChannel
"
)]
#![cfg_attr(
    not(feature = "http"),
    doc = "
[`http`]: #cargo-features
[`client`]: #cargo-features
[`client::HttpClient`]: #cargo-features
[`classify::HttpClassify`]: #cargo-features
"
)]
#![cfg_attr(not(feature = "dns"), doc = "[`discover::Dns`]: #cargo-features")]
#![cfg_attr(
    not(feature = "kubernetes"),
    doc = "[`discover::EndpointSlices`]: #cargo-features"
)]
#![cfg_attr(
    feature = "orca",
    doc = "[`load::OrcaLoadReports`]: crate::load::OrcaLoadReports"
)]
#![cfg_attr(
    not(feature = "orca"),
    doc = "[`load::OrcaLoadReports`]: #cargo-features"
)]
#![cfg_attr(
    not(feature = "grpc"),
    doc = "
[`grpc`]: #cargo-features
[`client::GrpcChannel`]: #cargo-features
"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod balance;
mod capacity;
mod cause;
pub mod classify;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod client;
#[cfg(feature = "http")]
mod connection;
pub mod discover;
pub mod error;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;
mod header;
pub mod health;
pub mod hedge;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod load;
pub mod request;
pub mod retry;
mod setting;
pub mod strategy;
pub mod timeout;
pub mod topology;

pub use balance::{Balancer, EndpointState, EndpointStats};
pub use error::{BoxError, Error};
