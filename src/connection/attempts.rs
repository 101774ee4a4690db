//! One endpoint's connection attempts, as the balancer sees them: its
//! [`ConnectionStatus`] and the failed attempts in a row that set its
//! back-off, kept by [`ObservedConnect`] around each attempt. Shared by the
//! routes whose connections are made inside requests: hyper-util's pool
//! (through `client::pool`'s observed connector) and the endpoint's own
//! HTTP/1.1 connections ([`H1Pool`]).
//!
//! [`H1Pool`]: super::H1Pool

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use super::ConnectFailureHook;
use crate::health::{ConnectionState, ConnectionStatus};
use crate::retry::Backoff;

/// An endpoint's connection state, kept from its connection attempts:
/// ready once a connection is made, failed when one cannot be, idle again
/// after gRPC's connection back-off so that a request tries it once more,
/// and connecting while that try is under way. A new endpoint is not
/// marked connecting while its first connection is made: connections are
/// made per request, so other requests would go elsewhere only while the
/// endpoint is unknown, and at a client's start every endpoint is; it
/// stays in the picks, as without connection states, until an attempt
/// fails. Connections that close are not watched: the next request makes
/// one again, the endpoint still ready.
pub(crate) struct ConnectionAttempts {
    status: ConnectionStatus,
    failures: AtomicU32,
}

impl ConnectionAttempts {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            status: ConnectionStatus::new(),
            failures: AtomicU32::new(0),
        })
    }

    /// The state the balancer reads.
    pub(crate) fn status(&self) -> &ConnectionStatus {
        &self.status
    }

    /// Marks the endpoint connecting when it is trying again after a
    /// failure (see the type's docs).
    fn attempt_started(&self) {
        if self.failures.load(Ordering::Relaxed) > 0 && self.status.get() != ConnectionState::Ready
        {
            self.status.set(ConnectionState::Connecting);
        }
    }

    fn made(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.status.set(ConnectionState::Ready);
    }

    /// Failed, until a back-off has passed: then idle, so that a request
    /// may try again (unless another attempt has changed the state, or
    /// failed again, since).
    fn failed(self: &Arc<Self>) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        self.status.set(ConnectionState::Failed);
        let delay = Backoff::CONNECTION.delay(failures, &mut rand::rng());
        let this = Arc::clone(self);
        // Dropped with the runtime if it ends first: nothing to do then.
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // Only this failure's timer: a later failure's back-off is
                // longer, and its own timer ends it.
                let latest = this.failures.load(Ordering::Relaxed) == failures;
                if latest && this.status.get() == ConnectionState::Failed && this.status.is_shared()
                {
                    this.status.set(ConnectionState::Idle);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// One connection attempt, observed: it marks the endpoint connecting
    /// when it starts (after a failure), ready or failed when it ends, and
    /// tells the hook of a failure. An attempt given up while it was being
    /// made (the request's timeout or deadline dropped it: the address did
    /// not answer in time) failed; one dropped before it was ever polled
    /// (hyper-util's pool dropping a connect it did not need) tells nothing.
    pub(crate) struct ObservedConnect<F> {
        #[pin]
        inner: F,
        // Taken when the attempt ends.
        hook: Option<ConnectFailureHook>,
        attempts: Option<Arc<ConnectionAttempts>>,
        polled: bool,
    }

    impl<F> PinnedDrop for ObservedConnect<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.polled {
                if let Some(hook) = this.hook.take() {
                    hook.connect_failed();
                }
                if let Some(attempts) = this.attempts.take() {
                    attempts.failed();
                }
            }
        }
    }
}

impl<F> ObservedConnect<F> {
    /// `inner`, a connection attempt, reported to `hook` (on failure) and
    /// kept in `attempts`.
    pub(crate) fn new(
        inner: F,
        hook: Option<ConnectFailureHook>,
        attempts: Option<Arc<ConnectionAttempts>>,
    ) -> Self {
        Self {
            inner,
            hook,
            attempts,
            polled: false,
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
            if let Some(attempts) = this.attempts {
                attempts.attempt_started();
            }
        }
        let made = ready!(this.inner.poll(cx));
        let hook = this.hook.take();
        let attempts = this.attempts.take();
        if made.is_err() {
            if let Some(hook) = hook {
                hook.connect_failed();
            }
        }
        if let Some(attempts) = attempts {
            if made.is_ok() {
                attempts.made();
            } else {
                attempts.failed();
            }
        }
        Poll::Ready(made)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_connection_is_idle_again_after_the_back_off() {
        let attempts = ConnectionAttempts::new();
        let status = attempts.status().clone();
        attempts.attempt_started();
        attempts.failed();
        assert_eq!(status.get(), ConnectionState::Failed);
        // gRPC's first back-off: 1 s, ±20 %.
        tokio::time::sleep(Duration::from_millis(790)).await;
        assert_eq!(status.get(), ConnectionState::Failed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(status.get(), ConnectionState::Idle);
    }

    #[test]
    fn only_a_try_after_a_failure_is_shown_as_connecting() {
        let attempts = ConnectionAttempts::new();
        attempts.attempt_started();
        assert_eq!(
            attempts.status().get(),
            ConnectionState::Idle,
            "a first connection"
        );
        attempts.failures.store(1, Ordering::Relaxed);
        attempts.attempt_started();
        assert_eq!(attempts.status().get(), ConnectionState::Connecting);
        attempts.made();
        assert_eq!(attempts.status().get(), ConnectionState::Ready);
    }
}
