//! Tower middleware for client-side load balancing.
//!
//! A [`Balancer`] spreads requests over a changing set of endpoints that a
//! discovery stream ([`tower::discover::Discover`]) provides. It is a cheap
//! `Clone` handle: many tasks pick through it at once with no lock and no
//! `Buffer`. Strategies ([`strategy`]) decide which endpoint gets each request:
//! round robin, and power of two choices by requests in flight or by Peak-EWMA
//! latency.
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
//! Or all of it at once: [`client::HttpClient`] goes from a list of
//! addresses or a DNS name to the whole stack with sensible defaults, every
//! part replaceable, and [`client::GrpcChannel`] does the same with one tonic
//! channel per endpoint, for generated gRPC clients.
//!
//! See the README for the design, the benchmarks and the feature table.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod balance;
mod capacity;
mod cause;
pub mod classify;
#[cfg(feature = "http")]
pub mod client;
pub mod discover;
pub mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod health;
pub mod hedge;
#[cfg(feature = "http")]
pub mod http;
pub mod load;
pub mod request;
pub mod retry;
pub mod strategy;
pub mod timeout;

pub use balance::{Balancer, Builder, EndpointState, EndpointStats};
pub use error::{BoxError, Error};
