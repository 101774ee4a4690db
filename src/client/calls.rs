use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tower::{Layer, Service};

use crate::error::BoxError;
use crate::Error;

/// The calls in progress through a ready-made client, counted at its
/// outermost layer: a call waiting between two attempts is in progress too,
/// though the balancer has nothing in flight for it.
#[derive(Clone, Default)]
pub(crate) struct Calls {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    open: AtomicUsize,
    closed: AtomicBool,
    idle: Notify,
}

impl Calls {
    pub(crate) fn open(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Closes, then waits until no call is open or `timeout` passes.
    pub(crate) async fn drain(&self, timeout: Duration) -> Result<(), Error> {
        self.close();
        crate::balance::wait_until_idle(&self.inner.idle, || self.open(), timeout).await
    }
}

impl fmt::Debug for Calls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Calls")
            .field("open", &self.open())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<S> Layer<S> for Calls {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls {
            inner,
            calls: self.clone(),
        }
    }
}

/// Counts each call from `call` until its future completes or is dropped,
/// and refuses new calls once closed. Per call: two atomic operations on one
/// shared counter and an `Arc` clone, the price of a shutdown that waits for
/// calls between attempts.
#[derive(Clone, Debug)]
pub(crate) struct CountCalls<S> {
    inner: S,
    calls: Calls,
}

impl<S, Req> Service<Req> for CountCalls<S>
where
    S: Service<Req, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CountedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Counted before the check: checking first would let a call that
        // read "open" be counted after `drain` read 0 and returned.
        self.calls.inner.open.fetch_add(1, Ordering::SeqCst);
        let open = Open(self.calls.clone());
        if self.calls.is_closed() {
            drop(open);
            return CountedCall {
                inner: None,
                _open: None,
            };
        }
        CountedCall {
            inner: Some(self.inner.call(req)),
            _open: Some(open),
        }
    }
}

/// Counts one open call until dropped.
struct Open(Calls);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.inner.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.idle.notify_waiters();
        }
    }
}

pin_project! {
    /// A call counted by [`CountCalls`]; `None` when it was refused.
    pub(crate) struct CountedCall<F> {
        #[pin]
        inner: Option<F>,
        _open: Option<Open>,
    }
}

impl<F, T> Future for CountedCall<F>
where
    F: Future<Output = Result<T, BoxError>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(inner) => {
                let output = ready!(inner.poll(cx));
                this._open.take();
                Poll::Ready(output)
            }
            None => Poll::Ready(Err(Box::new(Error::Closed))),
        }
    }
}
