//! Bounds on time: [`Timeout`] for one attempt, [`Deadline`] for the whole
//! call.
//!
//! In a tower-lb stack the deadline sits outermost and the timeout just
//! above the balancer:
//!
//! ```text
//! Deadline -> Retry -> Hedge -> Timeout -> Balancer
//! ```
//!
//! so the deadline covers every attempt and every backoff, and the per-attempt
//! timeout turns one stalled endpoint into a retryable error. The deadline
//! travels in the call's [`CallContext`](crate::request::CallContext) as a
//! [`CallDeadline`], where the retry layer reads it: a retry whose backoff
//! would outlive it is not started.
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_lb::timeout::{DeadlineLayer, TimeoutLayer};
//! # use tower::service_fn;
//! # let endpoint = service_fn(|_: http::Request<()>| async { Ok::<_, std::convert::Infallible>(()) });
//!
//! let client = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Duration::from_secs(2)))
//!     .layer(TimeoutLayer::new(Duration::from_millis(500)))
//!     .service(endpoint);
//! # let _ = client;
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::BoxError;
use crate::request::HasCallContext;

pub use crate::request::CallDeadline;

/// Which timer ended a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The per-attempt [`Timeout`]: this attempt took too long, another may
    /// not.
    Attempt,
    /// The call's [`Deadline`]: no attempt may run any longer.
    Deadline,
}

/// A request ran out of time.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::timeout::{Elapsed, Timer};
///
/// let err = Elapsed::new(Timer::Attempt, Duration::from_millis(250));
/// assert_eq!(err.to_string(), "the per-attempt timeout fired after 250ms");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", match .timer {
    Timer::Attempt => format!("the per-attempt timeout fired after {}", crate::error::duration(.after)),
    Timer::Deadline => format!("the call's deadline passed after {}", crate::error::duration(.after)),
})]
pub struct Elapsed {
    timer: Timer,
    after: Duration,
}

impl Elapsed {
    /// `timer` fired after `after`.
    pub fn new(timer: Timer, after: Duration) -> Self {
        Self { timer, after }
    }

    /// The timer that fired.
    pub fn timer(&self) -> Timer {
        self.timer
    }

    /// How long the request had run when it fired.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// True when `error`, or an error in its `source()` chain, is a
    /// per-attempt timeout.
    pub fn is_attempt_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
        crate::error::chain(error).any(|err| {
            err.downcast_ref::<Elapsed>()
                .is_some_and(|e| e.timer == Timer::Attempt)
        })
    }
}

/// A [`Layer`] that bounds each attempt (see [`Timeout`]).
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Each request through the layer's services fails with [`Elapsed`]
    /// ([`Timer::Attempt`]) after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Fails a request that has not completed after a fixed time, dropping (and
/// so cancelling) it.
///
/// Unlike `tower::timeout::Timeout`, the error says which timer fired and
/// after how long, and the retry layer recognises it as an attempt timeout:
/// retryable for requests that may repeat, never for unsafe ones (the
/// endpoint may be processing it still).
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: Some(tokio::time::sleep(self.timeout)),
            fired: Elapsed::new(Timer::Attempt, self.timeout),
        }
    }
}

/// The ready-made clients' per-attempt timeout: [`Timeout`], but an attempt
/// also ends at the call's [`CallDeadline`] when that comes first, failing
/// with [`Elapsed`] ([`Timer::Deadline`]). With it under a
/// [`Deadline`] that arms no timer, a call arms one timer per attempt
/// instead of two. (Crate-internal: reading the deadline needs the
/// request's [`CallContext`](crate::request::CallContext), which the public
/// `Timeout` does not ask for.)
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptTimeoutLayer(TimeoutLayer);

#[cfg(feature = "http")]
impl AttemptTimeoutLayer {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self(TimeoutLayer::new(timeout))
    }
}

#[cfg(feature = "http")]
impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout(self.0.layer(inner))
    }
}

/// See [`AttemptTimeoutLayer`].
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub(crate) struct AttemptTimeout<S>(Timeout<S>);

#[cfg(feature = "http")]
impl<S, Req> Service<Req> for AttemptTimeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: HasCallContext,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let timeout = self.0.timeout;
        let ends = CallDeadline::after(timeout).at();
        // At the deadline no attempt may go on, and none would be retried.
        let (ends, fired) = match CallDeadline::of(&req) {
            Some(deadline) if deadline.at() <= ends => (deadline.at(), deadline_elapsed(&deadline)),
            _ => (ends, Elapsed::new(Timer::Attempt, timeout)),
        };
        ResponseFuture {
            inner: self.0.inner.call(req),
            sleep: Some(tokio::time::sleep_until(ends)),
            fired,
        }
    }
}

/// The [`Elapsed`] of a call whose deadline passed.
fn deadline_elapsed(deadline: &CallDeadline) -> Elapsed {
    Elapsed::new(Timer::Deadline, deadline.budget())
}

/// A [`Layer`] that bounds the whole call (see [`Deadline`]).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    budget: Option<Duration>,
    timer: bool,
}

impl DeadlineLayer {
    /// Each call through the layer's services must be over `budget` after it
    /// starts, all attempts and backoffs included.
    pub fn new(budget: Duration) -> Self {
        Self {
            budget: Some(budget),
            timer: true,
        }
    }

    /// No budget of the layer's own: only a deadline the caller put in the
    /// request ([`CallDeadline`]) is enforced. A call without one passes
    /// through with no timer.
    pub fn callers_only() -> Self {
        Self {
            budget: None,
            timer: true,
        }
    }

    /// Sets the deadline but arms no timer of its own: for a stack in which
    /// every attempt ends by the deadline anyway ([`AttemptTimeout`]) and
    /// the retry layer pauses no further than it, so that a call arms one
    /// timer per attempt instead of two.
    #[cfg(feature = "http")]
    pub(crate) fn enforced_by_attempts(self) -> Self {
        Self {
            timer: false,
            ..self
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            budget: self.budget,
            timer: self.timer,
        }
    }
}

/// Bounds a whole call and tells the layers beneath how long they have.
///
/// Each request gets a [`CallDeadline`] in its
/// [`CallContext`](crate::request::CallContext), `budget` from now; if it
/// already carries an earlier one (the caller's own), that one stands.
/// When it passes, the call fails with [`Elapsed`] ([`Timer::Deadline`])
/// and whatever attempt is running is cancelled.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    budget: Option<Duration>,
    timer: bool,
}

impl<S, Req> Service<Req> for Deadline<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: HasCallContext,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let deadline = match self.budget {
            // The call's context is made here, the outermost layer that
            // needs one, with the deadline in it.
            Some(budget) => Some(
                req.call_context_mut()
                    .tighten_deadline(CallDeadline::after(budget)),
            ),
            None => CallDeadline::of(&req),
        };
        until_deadline(self.inner.call(req), deadline.filter(|_| self.timer))
    }
}

/// `inner`, or [`Elapsed`] when `deadline` passes first; no timer without
/// a deadline.
pub(crate) fn until_deadline<F>(inner: F, deadline: Option<CallDeadline>) -> DeadlineFuture<F> {
    ResponseFuture {
        inner,
        sleep: deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline.at()))),
        fired: deadline.map_or(Elapsed::new(Timer::Deadline, Duration::ZERO), |d| {
            deadline_elapsed(&d)
        }),
    }
}

/// The future of [`Deadline`]: the inner future, or [`Elapsed`] when the
/// call's deadline passes first.
///
/// Its timer is boxed: in the ready-made clients most calls arm none here
/// (each attempt's timeout ends by the deadline, and gRPC calls without a
/// `grpc-timeout` have no deadline at all), and this future sits inside
/// every layer above it, each of which moves it once. A timer held inline
/// would be 100-odd bytes copied that often for nothing; boxed, a call with
/// a timer pays one allocation.
pub type DeadlineFuture<F> = ResponseFuture<F, Pin<Box<Sleep>>>;

pin_project! {
    /// The future of [`Timeout`] (and, with its timer boxed, of
    /// [`Deadline`]): the inner future, or [`Elapsed`] when the timer fires
    /// first.
    pub struct ResponseFuture<F, T = Sleep> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<T>,
        fired: Elapsed,
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timer", &self.fired.timer)
            .field("armed", &self.sleep.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, T, R, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    T: Future<Output = ()>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner future first: an answer that is ready when the timer
        // fires still counts.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Box::new(*this.fired))),
            Some(Poll::Pending) | None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tokio::time::Instant;
    use tower::{service_fn, ServiceExt};

    fn slow(
        delay: Duration,
    ) -> impl Service<http::Request<()>, Response = (), Error = Infallible> + Clone {
        service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(())
        })
    }

    fn get() -> http::Request<()> {
        http::Request::new(())
    }

    fn elapsed(err: &BoxError) -> Elapsed {
        *err.downcast_ref::<Elapsed>()
            .unwrap_or_else(|| panic!("not an Elapsed: {err}"))
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fails_a_slow_attempt_and_says_so() {
        let svc = TimeoutLayer::new(Duration::from_millis(100)).layer(slow(Duration::from_secs(1)));
        let err = svc
            .oneshot(get())
            .await
            .err()
            .unwrap_or_else(|| panic!("no timeout"));
        assert_eq!(
            elapsed(&err),
            Elapsed::new(Timer::Attempt, Duration::from_millis(100))
        );
        assert!(Elapsed::is_attempt_timeout(&*err));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_lets_a_fast_attempt_through() {
        let svc = TimeoutLayer::new(Duration::from_secs(1)).layer(slow(Duration::from_millis(10)));
        assert!(svc.oneshot(get()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_ends_the_call_and_names_itself() {
        let svc =
            DeadlineLayer::new(Duration::from_millis(300)).layer(slow(Duration::from_secs(5)));
        let started = Instant::now();
        let err = svc
            .oneshot(get())
            .await
            .err()
            .unwrap_or_else(|| panic!("no deadline"));
        assert_eq!(elapsed(&err).timer(), Timer::Deadline);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(err.to_string().contains("deadline passed after 300ms"));
        assert!(!Elapsed::is_attempt_timeout(&*err));
    }

    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn an_attempt_ends_at_the_calls_deadline_when_that_comes_first() {
        let svc = DeadlineLayer::new(Duration::from_millis(300))
            .enforced_by_attempts()
            .layer(
                AttemptTimeoutLayer::new(Duration::from_secs(1))
                    .layer(slow(Duration::from_secs(5))),
            );
        let started = Instant::now();
        let err = svc
            .oneshot(get())
            .await
            .err()
            .unwrap_or_else(|| panic!("no deadline"));
        assert_eq!(
            elapsed(&err),
            Elapsed::new(Timer::Deadline, Duration::from_millis(300))
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(!Elapsed::is_attempt_timeout(&*err));
    }

    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn an_attempt_ends_at_its_own_timeout_before_a_later_deadline() {
        let svc = DeadlineLayer::new(Duration::from_secs(10))
            .enforced_by_attempts()
            .layer(
                AttemptTimeoutLayer::new(Duration::from_millis(100))
                    .layer(slow(Duration::from_secs(5))),
            );
        let err = svc
            .oneshot(get())
            .await
            .err()
            .unwrap_or_else(|| panic!("no timeout"));
        assert_eq!(
            elapsed(&err),
            Elapsed::new(Timer::Attempt, Duration::from_millis(100))
        );
        assert!(Elapsed::is_attempt_timeout(&*err));
    }

    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn a_deadline_enforced_by_attempts_sets_the_deadline_but_arms_no_timer() {
        let svc = DeadlineLayer::new(Duration::from_millis(100))
            .enforced_by_attempts()
            .layer(service_fn(|req: http::Request<()>| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, Infallible>(CallDeadline::of(&req).map(|d| d.budget()))
            }));
        // Nothing under it ends the call: the answer comes, late.
        let budget = svc.oneshot(get()).await.ok().flatten();
        assert_eq!(budget, Some(Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_is_visible_to_inner_layers() {
        let seen = service_fn(|req: http::Request<()>| async move {
            Ok::<_, Infallible>(CallDeadline::of(&req).map(|d| d.remaining()))
        });
        let svc = DeadlineLayer::new(Duration::from_secs(2)).layer(seen);
        let remaining = svc.oneshot(get()).await.ok().flatten();
        assert_eq!(remaining, Some(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_from_the_caller_stands() {
        let svc = DeadlineLayer::new(Duration::from_secs(10)).layer(slow(Duration::from_secs(5)));
        let mut req = get();
        req.extensions_mut()
            .insert(CallDeadline::after(Duration::from_secs(1)));
        let err = svc
            .oneshot(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("no deadline"));
        assert_eq!(
            elapsed(&err),
            Elapsed::new(Timer::Deadline, Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_budget_of_its_own_only_the_callers_deadline_holds() {
        let svc = DeadlineLayer::callers_only().layer(slow(Duration::from_secs(5)));
        let mut req = get();
        req.extensions_mut()
            .insert(CallDeadline::after(Duration::from_secs(1)));
        let err = svc
            .clone()
            .oneshot(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("no deadline"));
        assert_eq!(
            elapsed(&err),
            Elapsed::new(Timer::Deadline, Duration::from_secs(1))
        );
        // Without one the call runs its course, and gets no deadline.
        let seen = DeadlineLayer::callers_only()
            .layer(service_fn(|req: http::Request<()>| async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, Infallible>(CallDeadline::of(&req))
            }))
            .oneshot(get())
            .await;
        assert!(matches!(seen, Ok(None)), "{seen:?}");
    }

    #[test]
    fn an_unrepresentable_budget_is_no_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            let deadline = CallDeadline::after(Duration::MAX);
            assert!(deadline.remaining() > Duration::from_secs(86_400 * 365));
        });
    }
}
