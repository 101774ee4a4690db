use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::Service;

use super::{BalancerHandle, Calls};
use crate::error::BoxError;
use crate::retry::{RetryBudget, RetryStats};

/// A ready-made client: [`HttpClient`](super::HttpClient) or
/// [`GrpcChannel`] (feature `grpc`), which are this type for their
/// protocol's requests and responses. Build one with
/// [`HttpClient::builder`](super::HttpClient::builder) or
/// [`GrpcChannel::builder`].
///
/// A cheap `Clone` handle; every clone shares the endpoints, their
/// connections, and the client's open/closed state.
///
#[cfg_attr(
    feature = "grpc",
    doc = "
[`GrpcChannel`]: super::GrpcChannel
[`GrpcChannel::builder`]: super::GrpcChannel::builder
"
)]
#[cfg_attr(
    not(feature = "grpc"),
    doc = "
[`GrpcChannel`]: crate#cargo-features
[`GrpcChannel::builder`]: crate#cargo-features
"
)]
pub struct BalancedClient<Req, Resp, K> {
    service: BoxCloneSyncService<Req, Resp, BoxError>,
    calls: Calls,
    balancer: BalancerHandle<K>,
    budget: Option<RetryBudget>,
    #[cfg(feature = "dns")]
    resolve_now: Option<crate::discover::ResolveNow>,
}

impl<Req, Resp, K> BalancedClient<Req, Resp, K> {
    /// `service` (the whole stack, with a layer counting `calls`) over
    /// `balancer`.
    pub(crate) fn new(
        service: BoxCloneSyncService<Req, Resp, BoxError>,
        calls: Calls,
        balancer: BalancerHandle<K>,
        budget: Option<RetryBudget>,
    ) -> Self {
        Self {
            service,
            // Closing the balancer through the handle closes the client
            // too: the client's own flag is the one its calls check.
            balancer: balancer.closing(calls.clone()),
            calls,
            budget,
            #[cfg(feature = "dns")]
            resolve_now: None,
        }
    }

    #[cfg(feature = "dns")]
    pub(crate) fn with_resolve_now(mut self, resolve_now: crate::discover::ResolveNow) -> Self {
        self.resolve_now = Some(resolve_now);
        self
    }

    /// The balancer: its endpoints and their state. Closing it closes the
    /// client too.
    pub fn balancer(&self) -> &BalancerHandle<K> {
        &self.balancer
    }

    /// Stops taking calls: new ones fail at once (with
    /// [`Error::Closed`](crate::Error::Closed); a `GrpcChannel`'s with
    /// `UNAVAILABLE`), while calls in progress go on, retries included.
    /// Affects every clone.
    pub fn close(&self) {
        self.calls.close();
    }

    /// Calls in progress: from `call` until the response (its headers)
    /// arrives, pauses between retries included.
    pub fn calls_in_progress(&self) -> usize {
        self.calls.open()
    }

    /// Graceful shutdown: [`close`](Self::close)s, waits until the calls in
    /// progress are over (retries included) or `timeout` passes, then closes
    /// the balancer.
    ///
    /// # Errors
    ///
    /// [`Error::ShutdownTimedOut`](crate::Error::ShutdownTimedOut) when calls
    /// were still in progress after `timeout`.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), crate::Error> {
        let drained = self.calls.drain(timeout).await;
        self.balancer.close();
        drained
    }

    /// What the retry budget has seen (requests, retries, hedges, refusals),
    /// or `None` without retries and hedging.
    pub fn retry_stats(&self) -> Option<RetryStats> {
        self.budget.as_ref().map(RetryBudget::stats)
    }

    /// For a client built with
    /// [`build_dns`](super::ClientBuilder::build_dns): a handle that asks for
    /// a resolution now.
    #[cfg(feature = "dns")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
    pub fn resolve_now(&self) -> Option<&crate::discover::ResolveNow> {
        self.resolve_now.as_ref()
    }
}

impl<Req, Resp, K> Service<Req> for BalancedClient<Req, Resp, K> {
    type Response = Resp;
    type Error = BoxError;
    type Future = <BoxCloneSyncService<Req, Resp, BoxError> as Service<Req>>::Future;

    /// Ready when the stack is. Once the client is closed, a refusal of the
    /// stack beneath is not an error here (a generated gRPC client would
    /// turn it into `UNKNOWN`): `call` answers it, as the protocol says
    /// "closed".
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.service.poll_ready(cx) {
            Poll::Ready(Err(_)) if self.calls.is_closed() => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.service.call(req)
    }
}

impl<Req, Resp, K> Clone for BalancedClient<Req, Resp, K> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            calls: self.calls.clone(),
            balancer: self.balancer.clone(),
            budget: self.budget.clone(),
            #[cfg(feature = "dns")]
            resolve_now: self.resolve_now.clone(),
        }
    }
}

impl<Req, Resp, K> fmt::Debug for BalancedClient<Req, Resp, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedClient")
            .field("balancer", &self.balancer)
            .field("calls", &self.calls)
            .field("retry_stats", &self.retry_stats())
            .finish_non_exhaustive()
    }
}
