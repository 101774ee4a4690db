use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::Calls;
use crate::balance::{Balancer, EndpointStats};
use crate::strategy::Strategy;
use crate::Error;

/// The balancer inside a ready-made client, whatever its strategy and
/// classifier: its endpoints, and its graceful shutdown.
pub struct BalancerHandle<K> {
    inner: Arc<dyn Control<K>>,
    /// The calls of the client the balancer is inside, closed with it.
    client: Option<Calls>,
}

type Shutdown<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// What a client needs of its balancer once the types are erased.
trait Control<K>: Send + Sync {
    fn endpoints(&self) -> Vec<EndpointStats<K>>;
    fn in_flight(&self) -> usize;
    fn is_panicking(&self) -> bool;
    fn close(&self);
    fn is_closed(&self) -> bool;
    fn shutdown(&self, timeout: Duration) -> Shutdown<'_>;
}

impl<K, S, P, C, H> Control<K> for Balancer<K, S, P, C, H>
where
    K: Clone + Send + Sync + 'static,
    S: Send + Sync + 'static,
    P: Strategy,
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    fn endpoints(&self) -> Vec<EndpointStats<K>> {
        Balancer::endpoints(self)
    }

    fn in_flight(&self) -> usize {
        Balancer::in_flight(self)
    }

    fn is_panicking(&self) -> bool {
        Balancer::is_panicking(self)
    }

    fn close(&self) {
        Balancer::close(self)
    }

    fn is_closed(&self) -> bool {
        Balancer::is_closed(self)
    }

    fn shutdown(&self, timeout: Duration) -> Shutdown<'_> {
        Box::pin(Balancer::shutdown(self, timeout))
    }
}

impl<K> BalancerHandle<K> {
    pub(crate) fn new<S, P, C, H>(balancer: Balancer<K, S, P, C, H>) -> Self
    where
        K: Clone + Send + Sync + 'static,
        S: Send + Sync + 'static,
        P: Strategy,
        C: Send + Sync + 'static,
        H: Send + Sync + 'static,
    {
        Self {
            inner: Arc::new(balancer),
            client: None,
        }
    }

    /// The handle of the balancer inside the client counting `calls`:
    /// closing it closes the client as well.
    pub(crate) fn closing(mut self, calls: Calls) -> Self {
        self.client = Some(calls);
        self
    }

    /// A point-in-time view of every endpoint (see [`Balancer::endpoints`]).
    pub fn endpoints(&self) -> Vec<EndpointStats<K>> {
        self.inner.endpoints()
    }

    /// Requests in flight on all endpoints.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    /// True while too few endpoints are in service and requests go to
    /// ejected ones too.
    pub fn is_panicking(&self) -> bool {
        self.inner.is_panicking()
    }

    /// Stops taking requests; those in flight complete (see
    /// [`Balancer::close`]). The handle of a ready-made client's balancer
    /// closes the client too, so that its new calls fail as closed.
    pub fn close(&self) {
        if let Some(client) = &self.client {
            client.close();
        }
        self.inner.close()
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Closes, then waits up to `timeout` for the requests in flight (see
    /// [`Balancer::shutdown`]).
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), Error> {
        if let Some(client) = &self.client {
            client.close();
        }
        self.inner.shutdown(timeout).await
    }
}

/// The handle of a balancer you built yourself, to treat it like the one
/// inside a ready-made client.
impl<K, S, P, C, H> From<Balancer<K, S, P, C, H>> for BalancerHandle<K>
where
    K: Clone + Send + Sync + 'static,
    S: Send + Sync + 'static,
    P: Strategy,
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    fn from(balancer: Balancer<K, S, P, C, H>) -> Self {
        Self::new(balancer)
    }
}

impl<K> Clone for BalancerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            client: self.client.clone(),
        }
    }
}

impl<K> fmt::Debug for BalancerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerHandle")
            .field("in_flight", &self.in_flight())
            .field("closed", &self.is_closed())
            .finish()
    }
}
