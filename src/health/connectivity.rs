//! What an endpoint's connection says about it: made, being made, or
//! failing to be made.
//!
//! A connection being made or failing to be made is no judgement of the
//! server (it may be starting, or the network briefly away), so it does not
//! take the endpoint out of service the way outlier detection or an active
//! check does. It only makes the endpoint the last choice: while another
//! endpoint in service has a connection that takes requests, the balancer
//! leaves it out of the picks, as gRPC's `round_robin` picks only `READY`
//! subchannels. When none has, every endpoint in service is picked as
//! before, and a request waits for (or fails with) the connection under
//! way.
//!
//! The balancer learns the state through [`ConnectionStates`]
//! ([`Builder::connection_states`](crate::balance::Builder::connection_states));
//! the ready-made clients wire their own connections in.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

/// Where an endpoint's connection stands, as its service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// No connection, and none being made: the first request (or the
    /// service itself) makes one. Takes requests.
    Idle,
    /// A connection is being made. Left out of the picks while another
    /// endpoint's connection takes requests.
    Connecting,
    /// Connected. Takes requests.
    Ready,
    /// The last attempt to connect failed; the service tries again (after a
    /// back-off, or on the next request). Left out of the picks while
    /// another endpoint's connection takes requests.
    Failed,
}

impl ConnectionState {
    /// Whether a request sent now would not wait for a connection being
    /// made, or go to one known not to answer.
    pub(crate) fn takes_requests(self) -> bool {
        matches!(self, Self::Idle | Self::Ready)
    }
}

/// A cheap `Clone` handle to one connection's [`ConnectionState`], shared by
/// the service that makes the connection (which sets it) and the balancer
/// (which is woken by each change).
///
/// ```
/// use tower_lb::health::{ConnectionState, ConnectionStatus};
///
/// let status = ConnectionStatus::new();
/// assert_eq!(status.get(), ConnectionState::Idle);
/// status.set(ConnectionState::Connecting);
/// status.clone().set(ConnectionState::Ready);
/// assert_eq!(status.get(), ConnectionState::Ready);
/// ```
#[derive(Clone)]
pub struct ConnectionStatus {
    state: Arc<watch::Sender<ConnectionState>>,
}

impl ConnectionStatus {
    /// A connection not made yet: [`Idle`](ConnectionState::Idle).
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(ConnectionState::Idle)),
        }
    }

    /// Records the connection's new state. Setting the state it has wakes
    /// nobody.
    pub fn set(&self, state: ConnectionState) {
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// The state now.
    pub fn get(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// Whether a handle besides this one exists: whether anything still
    /// reports or reads it.
    // Used by the clients' connections only.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.state) > 1
    }

    /// Told of every change from now on; ends when every handle is gone.
    pub(crate) fn changes(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }
}

impl Default for ConnectionStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConnectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionStatus")
            .field(&self.get())
            .finish()
    }
}

/// Where the balancer finds an endpoint's [`ConnectionStatus`]: its service.
///
/// Implemented by [`NoConnectionStates`] (no endpoint reports one: the
/// default) and by any `Fn(&S) -> Option<ConnectionStatus>`.
///
/// ```
/// use std::convert::Infallible;
/// use tower::service_fn;
/// use tower_lb::health::{ConnectionState, ConnectionStatus};
/// use tower_lb::{discover, Balancer};
///
/// #[derive(Clone)]
/// struct Backend {
///     status: ConnectionStatus,
/// }
///
/// impl tower::Service<u32> for Backend {
///     type Response = u32;
///     type Error = Infallible;
///     type Future = std::future::Ready<Result<u32, Infallible>>;
///     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
///         std::task::Poll::Ready(Ok(()))
///     }
///     fn call(&mut self, req: u32) -> Self::Future {
///         std::future::ready(Ok(req))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let backends = (0..2).map(|i| (i, Backend { status: ConnectionStatus::new() }));
/// let balancer = Balancer::builder()
///     .connection_states(|backend: &Backend| Some(backend.status.clone()))
///     .build(discover::fixed(backends));
/// # let _ = balancer;
/// # }
/// ```
pub trait ConnectionStates<S>: Send + 'static {
    /// The status of `service`'s connection, or `None` if it reports none
    /// (it is then always picked as if connected).
    fn connection_status(&self, service: &S) -> Option<ConnectionStatus>;
}

/// No endpoint reports a connection state: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConnectionStates;

impl<S> ConnectionStates<S> for NoConnectionStates {
    fn connection_status(&self, _: &S) -> Option<ConnectionStatus> {
        None
    }
}

impl<S, F> ConnectionStates<S> for F
where
    F: Fn(&S) -> Option<ConnectionStatus> + Send + 'static,
{
    fn connection_status(&self, service: &S) -> Option<ConnectionStatus> {
        self(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_wakes_a_watcher() {
        let status = ConnectionStatus::new();
        let mut changes = status.changes();
        status.set(ConnectionState::Connecting);
        changes.changed().await.unwrap();
        assert_eq!(*changes.borrow_and_update(), ConnectionState::Connecting);
    }

    #[tokio::test]
    async fn setting_the_same_state_wakes_nobody() {
        let status = ConnectionStatus::new();
        let changes = status.changes();
        status.set(ConnectionState::Idle);
        assert!(!changes.has_changed().unwrap());
    }

    #[test]
    fn only_idle_and_ready_connections_take_requests() {
        use ConnectionState::*;
        let taking: Vec<_> = [Idle, Connecting, Ready, Failed]
            .into_iter()
            .filter(|s| s.takes_requests())
            .collect();
        assert_eq!(taking, [Idle, Ready]);
    }
}
