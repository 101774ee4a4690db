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
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::uri::Authority;

use crate::connection::{ConnectFailureHook, ConnectionAttempts, ObservedConnect};
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
        let attempts = self.connections.find(&uri);
        ObservedConnect::new(self.inner.call(uri), self.hook.clone(), attempts)
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
