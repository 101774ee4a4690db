//! What an [`HttpClient`](super::HttpClient) learns from hyper-util's pool
//! (its route when given a connector or hyper-util settings of the user's)
//! through its connector: each connection attempt, and how it ended.
//!
//! The pool makes connections inside requests, behind one connector for
//! every endpoint, and says nothing of them; so the connector is wrapped
//! ([`ObservedConnector`]) to tell the client of each attempt that fails
//! (the clients over DNS re-resolve the name), and to keep each endpoint's
//! connection state for the balancer, by the rules of
//! [`ConnectionAttempts`] (which the endpoints' own HTTP/1.1 connections
//! follow too).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use http::uri::Authority;

use crate::connection::{ConnectFailureHook, ConnectionAttempts};
use crate::health::ConnectionStatus;

/// The pool's endpoints' connection states, by the authority their
/// requests (and so the connector's URIs) carry.
#[derive(Clone, Default)]
pub(crate) struct PoolConnections {
    /// Locked once per connection attempt (not per request), and when
    /// discovery inserts an endpoint.
    by_authority: Arc<Mutex<ByAuthority>>,
}

#[derive(Default)]
struct ByAuthority {
    map: HashMap<Authority, Arc<ConnectionAttempts>>,
    /// The size at which entries no endpoint holds are next dropped: twice
    /// the size after the last sweep, so that a start inserting many
    /// endpoints sweeps a few times, not at each one.
    sweep_at: usize,
}

impl PoolConnections {
    /// The status of the endpoint at `authority`, shared with any other
    /// endpoint at the same address; a fresh one when every endpoint that
    /// was at the address has left. Entries whose endpoints are all gone are
    /// dropped here, once the map has doubled since they were last looked
    /// for.
    pub(crate) fn register(&self, authority: &Authority) -> ConnectionStatus {
        let mut guard = self
            .by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ByAuthority { map, sweep_at } = &mut *guard;
        if map.len() >= *sweep_at {
            map.retain(|_, c| c.status().is_shared());
            *sweep_at = (map.len() * 2).max(16);
        }
        let connection = map
            .entry(authority.clone())
            .and_modify(|c| {
                if !c.status().is_shared() {
                    // Its endpoints left: what it learnt of their connection
                    // is not the newcomer's.
                    *c = ConnectionAttempts::new();
                }
            })
            .or_insert_with(ConnectionAttempts::new);
        connection.status().clone()
    }

    fn find(&self, uri: &http::Uri) -> Option<Arc<ConnectionAttempts>> {
        let authority = uri.authority()?;
        let guard = self
            .by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.map.get(authority).cloned()
    }
}

pin_project_lite::pin_project! {
    /// The connection future of [`ObservedConnector`]: reports a
    /// connection that failed, or that was given up on while it was being
    /// made (hyper-util makes a request's connection inside the request's
    /// future, so an attempt timeout or a deadline drops a connect to an
    /// address that does not answer before it can fail).
    pub(crate) struct ObservedConnect<F> {
        #[pin]
        inner: F,
        // Taken when the connect ends.
        hook: Option<ConnectFailureHook>,
        connection: Option<Arc<ConnectionAttempts>>,
        polled: bool,
    }

    impl<F> PinnedDrop for ObservedConnect<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Never polled: hyper-util dropped a connect it did not need.
            if *this.polled {
                if let Some(hook) = this.hook.take() {
                    hook.connect_failed();
                }
                if let Some(connection) = this.connection.take() {
                    connection.failed();
                }
            }
        }
    }
}

impl<F, T, E> Future for ObservedConnect<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.polled {
            *this.polled = true;
            if let Some(connection) = this.connection {
                connection.attempt_started();
            }
        }
        let made = ready!(this.inner.poll(cx));
        let hook = this.hook.take();
        let connection = this.connection.take();
        if made.is_err() {
            if let Some(hook) = hook {
                hook.connect_failed();
            }
        }
        if let Some(connection) = connection {
            if made.is_ok() {
                connection.made();
            } else {
                connection.failed();
            }
        }
        Poll::Ready(made)
    }
}

/// The pool's connector, telling the client of each connection it cannot
/// make, and keeping each endpoint's connection state (see the module
/// docs). Per connection, not per request.
#[derive(Clone)]
pub(crate) struct ObservedConnector<C> {
    inner: C,
    hook: Option<ConnectFailureHook>,
    connections: PoolConnections,
}

impl<C> ObservedConnector<C> {
    pub(crate) fn new(
        inner: C,
        hook: Option<ConnectFailureHook>,
        connections: PoolConnections,
    ) -> Self {
        Self {
            inner,
            hook,
            connections,
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for ObservedConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl<C: tower::Service<http::Uri>> tower::Service<http::Uri> for ObservedConnector<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = ObservedConnect<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connection = self.connections.find(&uri);
        ObservedConnect {
            inner: self.inner.call(uri),
            hook: self.hook.clone(),
            connection,
            polled: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ConnectionState;

    fn authority(s: &str) -> Authority {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    /// An endpoint at 127.0.0.1:80 registered in `connections`: its status,
    /// and the entry the connector finds for its URIs.
    fn registered(connections: &PoolConnections) -> (ConnectionStatus, Arc<ConnectionAttempts>) {
        let status = connections.register(&authority("127.0.0.1:80"));
        let uri: http::Uri = "http://127.0.0.1:80/"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let connection = connections
            .find(&uri)
            .unwrap_or_else(|| panic!("registered"));
        (status, connection)
    }

    #[test]
    fn endpoints_at_one_address_share_a_status() {
        let connections = PoolConnections::default();
        let a = connections.register(&authority("127.0.0.1:80"));
        let b = connections.register(&authority("127.0.0.1:80"));
        a.set(ConnectionState::Ready);
        assert_eq!(b.get(), ConnectionState::Ready);
    }

    #[test]
    fn statuses_no_endpoint_holds_are_dropped_once_the_map_has_doubled() {
        let connections = PoolConnections::default();
        let uri: http::Uri = "http://127.0.0.1:80/"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        drop(connections.register(&authority("127.0.0.1:80")));
        let mut kept = Vec::new();
        for port in 81..96 {
            kept.push(connections.register(&authority(&format!("127.0.0.1:{port}"))));
        }
        assert!(connections.find(&uri).is_some(), "15 kept: not swept yet");
        kept.push(connections.register(&authority("127.0.0.1:96")));
        assert!(connections.find(&uri).is_none(), "swept at 16");
        assert_eq!(
            connections.by_authority.lock().map(|m| m.map.len()).ok(),
            Some(16)
        );
    }

    #[test]
    fn an_address_whose_endpoints_left_starts_afresh() {
        let connections = PoolConnections::default();
        let (status, _) = registered(&connections);
        status.set(ConnectionState::Failed);
        drop(status);
        let (again, _) = registered(&connections);
        assert_eq!(again.get(), ConnectionState::Idle);
    }
}
