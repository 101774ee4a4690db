//! The retry middleware: its layer, service and response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::{Layer, Service};

use super::budget::{RetryBudget, Spend, Throttled};
use super::policy::{HttpRetryOn, ResponseVerdict, RetryOn, RetryPolicy};
use crate::error::BoxError;
use crate::request::{CallContext, Replayable, Safety};
use crate::timeout::CallDeadline;

/// A retry was due but the [`RetryBudget`] had no room, so the last
/// attempt's error is returned, inside this one (its `source()`).
#[derive(Debug, thiserror::Error)]
#[error(
    "not retried, the retry budget is exhausted (after {})",
    crate::error::count(u64::from(*.attempts), "attempt")
)]
pub struct BudgetExhausted {
    attempts: u32,
    #[source]
    source: BoxError,
}

/// A retry was due but its pause would have ended after the call's
/// [`CallDeadline`], so the last attempt's error is returned, inside this one
/// (its `source()`).
#[derive(Debug, thiserror::Error)]
#[error(
    "not retried, a retry after {} would end past the call's deadline (after {})",
    crate::error::duration(.pause),
    crate::error::count(u64::from(*.attempts), "attempt")
)]
pub struct DeadlineTooClose {
    attempts: u32,
    pause: Duration,
    #[source]
    source: BoxError,
}

impl DeadlineTooClose {
    /// Attempts made.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The pause the retry would have waited.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// The last attempt's error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl BudgetExhausted {
    /// Attempts made before the budget refused another.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The last attempt's error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

/// A [`Layer`] that retries what can safely be retried (see [`Retry`]).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_lb::retry::{RetryBudget, RetryLayer, RetryPolicy};
/// # use tower::service_fn;
/// # use tower_lb::retry::ReplayBody;
/// # type Body = http_body_util::Empty<bytes::Bytes>;
/// # let endpoint = service_fn(|_: http::Request<ReplayBody<Body>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// # });
///
/// // One budget for every clone of the client.
/// let budget = RetryBudget::new();
/// let client = ServiceBuilder::new()
///     .layer(RetryLayer::new(RetryPolicy::new(), budget.clone()))
///     .service(endpoint);
/// # let _: &dyn tower::Service<http::Request<ReplayBody<Body>>, Response = _, Error = _, Future = _> = &client;
/// ```
#[derive(Debug)]
pub struct RetryLayer<C = HttpRetryOn> {
    policy: Arc<RetryPolicy<C>>,
    budget: RetryBudget,
    jitter: Jitter,
}

// By hand: a derive would ask the retry rule to be `Clone`, which a shared
// policy does not need.
impl<C> Clone for RetryLayer<C> {
    fn clone(&self) -> Self {
        Self {
            policy: Arc::clone(&self.policy),
            budget: self.budget.clone(),
            jitter: self.jitter.clone(),
        }
    }
}

impl<C> RetryLayer<C> {
    /// Retries by `policy`, drawing from `budget` (share it with the hedge
    /// layer, if any, so retries and hedges together stay within it).
    pub fn new(policy: RetryPolicy<C>, budget: RetryBudget) -> Self {
        Self {
            policy: Arc::new(policy),
            budget,
            jitter: None,
        }
    }

    /// Makes the backoff jitter, and adaptive throttling's draws, a
    /// function of `seed`, for repeatable simulations (with a [seeded
    /// balancer](crate::balance::Builder::seed) and tokio's paused clock, a
    /// whole run repeats bit for bit). Every service this layer makes, and
    /// every call through them, draws from one shared sequence (one atomic
    /// add per retry, and per call while throttling refuses some). Without
    /// a seed (the default) the draws come from the thread-local generator.
    pub fn seed(mut self, seed: u64) -> Self {
        self.jitter = Some(Arc::new(crate::strategy::seeded_state(seed)));
        self
    }
}

/// Where the backoff jitter comes from: `None` for the thread-local
/// generator, else a seeded sequence shared by the layer's services.
type Jitter = Option<Arc<AtomicU64>>;

impl<S, C> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Retry<S, C> {
        Retry {
            inner,
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            jitter: self.jitter.clone(),
        }
    }
}

/// Sends a request again when an attempt fails in a way the policy retries
/// and retrying cannot do harm.
///
/// For each call it:
/// - counts the call in the [`RetryBudget`] (once per call and budget,
///   however many layers draw from it) and records its attempts in the
///   call's [`CallContext`](crate::request::CallContext), so that a
///   balancer built with
///   [`avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints)
///   sends each retry somewhere new;
/// - after a failed attempt, asks: may this request repeat
///   ([`Safety`]), or does the error prove it never left? Does the policy
///   retry this outcome? Are attempts left? Can the request be copied (its
///   body may have outgrown the replay buffer)? Would the pause (the
///   server's pushback, else the backoff) end after the call's
///   [`CallDeadline`]? Does the budget allow it? Any "no" returns the
///   attempt's result as it is, except that an error refused a retry by the
///   budget comes inside [`BudgetExhausted`], and one refused by the
///   deadline inside [`DeadlineTooClose`], so the caller sees why.
///
/// Requests must be [`Replayable`]: for HTTP that is
/// `http::Request<ReplayBody<B>>`, which the [`ReplayLayer`](super::ReplayLayer)
/// in front of this one makes.
///
/// The layer keeps a copy of each request's head (method, URI, headers,
/// and extensions unless they hold only the call's context, which it keeps
/// beside the copy: see [`Replayable::replay_kept`]) for as long as the call
/// runs, so that it can send it again: work per call that the balancer
/// beneath does not do.
#[derive(Debug)]
pub struct Retry<S, C = HttpRetryOn> {
    inner: S,
    policy: Arc<RetryPolicy<C>>,
    budget: RetryBudget,
    jitter: Jitter,
}

// By hand, as for `RetryLayer`: only the service needs to be `Clone`.
impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: Arc::clone(&self.policy),
            budget: self.budget.clone(),
            jitter: self.jitter.clone(),
        }
    }
}

impl<S, C> Retry<S, C> {
    /// The budget this layer draws from.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

impl<S, C, Req> Service<Req> for Retry<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: RetryOn<S::Response>,
    Req: Replayable,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let (safety, deadline) = self.budget.begin_call(&mut req);
        if let Err(throttled) = self.budget.admit(self.jitter.as_deref()) {
            return ResponseFuture {
                state: State::Throttled {
                    error: Some(throttled),
                },
                retries: None,
                safety,
                deadline,
                attempts: 0,
                policy: self.policy.clone(),
                budget: self.budget.clone(),
                jitter: self.jitter.clone(),
                awaiting: false,
            };
        }
        // Send the caller's request and keep a copy to make retries from;
        // without a copy (or with one attempt allowed) no retry can follow.
        // The caller's goes first because its header map has room to grow
        // (the endpoint may add `Host`, tonic its own headers), where a
        // copy's is cloned full and would have to grow.
        // The first attempt goes to the service `poll_ready` readied; a
        // clone (made ready in its turn) serves the retries, kept only when
        // there can be any.
        let retries = match self.policy.max_attempts > 1 {
            true => req.replay_kept().ok().map(|original| Retries {
                service: self.inner.clone(),
                // Kept beside the copy only when the copy left it out (plain
                // values and one `Arc`: no allocation).
                context: match original.call_context() {
                    Some(_) => None,
                    None => req.call_context().cloned(),
                },
                original,
            }),
            false => None,
        };
        ResponseFuture {
            state: State::First {
                future: self.inner.call(req),
            },
            retries,
            safety,
            deadline,
            attempts: 1,
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            jitter: self.jitter.clone(),
            awaiting: true,
        }
    }
}

pin_project! {
    /// The future of [`Retry`]: the attempts of one call, and the pauses
    /// between them.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        retries: Option<Retries<S, Req>>,
        safety: Safety,
        deadline: Option<CallDeadline>,
        attempts: u32,
        policy: Arc<RetryPolicy<C>>,
        budget: RetryBudget,
        jitter: Jitter,
        // An attempt was sent and its outcome not yet counted: a call
        // dropped now (an outer timeout, a caller gone) counts it as not
        // accepted, for adaptive throttling.
        awaiting: bool,
    }

    impl<S, Req, C> PinnedDrop for ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.awaiting {
                this.budget.not_accepted();
            }
        }
    }
}

/// What a call keeps to retry with: a service to send on, the copy each
/// retry is made from, and the call's context for a copy kept without it
/// (see [`Replayable::replay_kept`]).
struct Retries<S, Req> {
    service: S,
    original: Req,
    context: Option<CallContext>,
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // The first attempt, on the service readied by `poll_ready`: the
        // common case, with no service or request held beside the future.
        First {
            #[pin]
            future: S::Future,
        },
        // A retry, and the pause before it with the copy it will send, are
        // boxed: they are rare, and held inline they would make the future
        // of every call (which each layer above moves) hundreds of bytes
        // larger.
        Attempt {
            call: Pin<Box<Oneshot<S, Req>>>,
        },
        Pause {
            pause: Pin<Box<Pause<Req>>>,
        },
        // Refused by adaptive throttling: never sent.
        Throttled {
            error: Option<Throttled>,
        },
    }
}

pin_project! {
    /// The pause before a retry, and the copy of the request it will send.
    struct Pause<Req> {
        #[pin]
        sleep: Sleep,
        next: Option<Req>,
    }
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("safety", &self.safety)
            .finish_non_exhaustive()
    }
}

/// Why an outcome is not retried, for the debug event.
enum Stop {
    Accepted,
    NotRetryable,
    NoAttemptsLeft,
    NotReplayable(crate::request::NotReplayable),
    PushbackTooLong(Duration),
    PastDeadline(Duration),
    Budget,
    /// Adaptive throttling refused the retry.
    Throttled,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Accepted => f.write_str("the response stands"),
            Stop::NotRetryable => f.write_str("the outcome is not retryable for this request"),
            Stop::NoAttemptsLeft => f.write_str("no attempts left"),
            Stop::NotReplayable(why) => write!(f, "the request cannot be sent again: {why}"),
            Stop::PushbackTooLong(after) => {
                let after = crate::error::duration(after);
                write!(f, "the server asked to wait {after}, too long")
            }
            Stop::PastDeadline(pause) => {
                let pause = crate::error::duration(pause);
                write!(
                    f,
                    "a retry after {pause} would end past the call's deadline"
                )
            }
            Stop::Budget => f.write_str("the retry budget is exhausted"),
            Stop::Throttled => f.write_str("adaptive throttling refused the retry"),
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: RetryOn<S::Response>,
    Req: Replayable,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let result = match this.state.as_mut().project() {
                StateProj::First { future } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    *this.awaiting = false;
                    result
                }
                StateProj::Attempt { call } => {
                    let result = ready!(call.as_mut().poll(cx)).map_err(Into::into);
                    *this.awaiting = false;
                    result
                }
                StateProj::Throttled { error } => {
                    let error: BoxError = match error.take() {
                        Some(throttled) => Box::new(throttled),
                        None => "polled after it completed".into(),
                    };
                    return Poll::Ready(Err(error));
                }
                StateProj::Pause { pause } => {
                    let pause = pause.as_mut().project();
                    ready!(pause.sleep.poll(cx));
                    let (Some(next), Some(retries)) = (pause.next.take(), this.retries.as_ref())
                    else {
                        return Poll::Ready(Err("retry state lost its request copy".into()));
                    };
                    *this.attempts += 1;
                    *this.awaiting = true;
                    let call = Box::pin(Oneshot::new(retries.service.clone(), next));
                    this.state.set(State::Attempt { call });
                    continue;
                }
            };
            let (pause, next) = match self.as_mut().next_pause(&result) {
                Ok(retry) => retry,
                Err(Stop::Budget) => {
                    let attempts = self.attempts;
                    return Poll::Ready(result.map_err(|source| {
                        Box::new(BudgetExhausted { attempts, source }) as BoxError
                    }));
                }
                Err(Stop::PastDeadline(pause)) => {
                    let attempts = self.attempts;
                    return Poll::Ready(result.map_err(|source| {
                        Box::new(DeadlineTooClose {
                            attempts,
                            pause,
                            source,
                        }) as BoxError
                    }));
                }
                Err(stop) => {
                    if !matches!(stop, Stop::Accepted) {
                        tracing::debug!(attempts = self.attempts, reason = %stop, "not retrying");
                    }
                    return Poll::Ready(result);
                }
            };
            tracing::debug!(attempts = self.attempts, ?pause, "retrying");
            let pause = Box::pin(Pause {
                sleep: tokio::time::sleep(pause),
                next: Some(next),
            });
            self.as_mut().project().state.set(State::Pause { pause });
        }
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    C: RetryOn<S::Response>,
    Req: Replayable,
{
    /// The pause before the next attempt and the copy it sends, or why
    /// there is none. The budget is asked last, so that it is spent only on
    /// retries that happen.
    fn next_pause(
        self: Pin<&mut Self>,
        result: &Result<S::Response, BoxError>,
    ) -> Result<(Duration, Req), Stop> {
        let this = self.project();
        let policy = &**this.policy;
        let verdict = result
            .as_ref()
            .ok()
            .map(|response| policy.on.response(response));
        // Every attempt's outcome is what adaptive throttling counts (a
        // retry is a request to the backends too); nothing, when it is off.
        if verdict == Some(ResponseVerdict::Accept) {
            this.budget.accepted();
            return Err(Stop::Accepted);
        }
        this.budget.not_accepted();
        let pushback = match (result, verdict) {
            // A response proves the request arrived.
            (_, Some(ResponseVerdict::Retry { .. })) if !this.safety.may_repeat() => {
                return Err(Stop::NotRetryable)
            }
            (_, Some(ResponseVerdict::Retry { after })) => after,
            (Err(error), _) => {
                if !policy.retries_error(&**error, *this.safety) {
                    return Err(Stop::NotRetryable);
                }
                None
            }
            // Accepted above; an `Ok` always has a verdict.
            (Ok(_), _) => return Err(Stop::Accepted),
        };
        if *this.attempts >= policy.max_attempts {
            return Err(Stop::NoAttemptsLeft);
        }
        let next = match this.retries {
            None => {
                return Err(Stop::NotReplayable(
                    crate::request::NotReplayable::Unsupported,
                ))
            }
            Some(retries) => {
                let mut next = retries.original.replay().map_err(Stop::NotReplayable)?;
                if let (None, Some(context)) = (next.call_context(), &retries.context) {
                    *next.call_context_mut() = context.clone();
                }
                next
            }
        };
        let pause = match pushback {
            Some(after) if after > policy.max_pushback => return Err(Stop::PushbackTooLong(after)),
            Some(after) => after,
            None => match this.jitter {
                Some(sequence) => policy
                    .backoff
                    .delay(*this.attempts, &mut jitter_rng(sequence)),
                None => policy.backoff.delay(*this.attempts, &mut rand::rng()),
            },
        };
        if let Some(deadline) = this.deadline {
            // A pause too long to represent ends after any deadline.
            let ends = Instant::now().checked_add(pause);
            if ends.is_none_or(|ends| ends >= deadline.at()) {
                return Err(Stop::PastDeadline(pause));
            }
        }
        if !this
            .budget
            .admit_extra(Spend::Retry, this.jitter.as_deref())
        {
            return Err(Stop::Throttled);
        }
        if !this.budget.try_spend(Spend::Retry) {
            return Err(Stop::Budget);
        }
        Ok((pause, next))
    }
}

/// A generator for one backoff's jitter, from the next number of a seeded
/// sequence.
fn jitter_rng(sequence: &AtomicU64) -> rand::rngs::SmallRng {
    use rand::SeedableRng;
    rand::rngs::SmallRng::seed_from_u64(crate::strategy::next_seeded(sequence))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower::ServiceExt;

    use super::*;
    use crate::request::HasCallContext;
    use crate::retry::ReplayBody;

    type Request = http::Request<ReplayBody<Empty<Bytes>>>;

    /// The pauses between the attempts of 4 GETs answered 503 every time
    /// (5 attempts each), through a layer made by `layer`.
    async fn pauses(layer: RetryLayer) -> Vec<Duration> {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let seen = arrivals.clone();
        let unavailable = tower::service_fn(move |_: Request| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
            async {
                let mut response = http::Response::new(());
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, Infallible>(response)
            }
        });
        let service = layer.layer(unavailable);
        for _ in 0..4 {
            let request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
            let response = service.clone().oneshot(request).await;
            assert!(response.is_ok(), "{:?}", response.err());
        }
        let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        arrivals.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn layer() -> RetryLayer {
        RetryLayer::new(
            RetryPolicy::new().max_attempts(5).expect("valid setting"),
            RetryBudget::new().min_per_second(1_000),
        )
    }

    /// What one attempt carried: the caller's extension, the call's
    /// deadline, and how many attempts its tried set had seen.
    type Carried = (Option<&'static str>, Option<CallDeadline>, usize);

    /// Three attempts (503, 503, 200) of one GET with `caller` as its only
    /// extension (besides the context), and what each carried.
    async fn attempts_carrying(caller: Option<&'static str>) -> Vec<Carried> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let flaky = tower::service_fn(move |req: Request| {
            let context = req.call_context().cloned().unwrap_or_default();
            // As a balancer records the endpoint it picked.
            let tried = context.tried().map_or(0, |tried| {
                tried.record(7);
                tried.attempts()
            });
            let carried = (
                req.extensions().get::<&'static str>().copied(),
                context.deadline(),
                tried,
            );
            let mut seen = record.lock().unwrap_or_else(|e| e.into_inner());
            seen.push(carried);
            let status = match seen.len() {
                3 => http::StatusCode::OK,
                _ => http::StatusCode::SERVICE_UNAVAILABLE,
            };
            async move {
                let mut response = http::Response::new(());
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        });
        let mut request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        request
            .call_context_mut()
            .tighten_deadline(CallDeadline::after(Duration::from_secs(9)));
        let response = layer().layer(flaky).oneshot(request).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::OK)
        );
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn every_retry_carries_the_calls_context() {
        // The copy kept for retries leaves out extensions that hold only
        // the context; each retry gets the context back.
        let carried = attempts_carrying(None).await;
        let deadline = carried[0].1;
        assert!(deadline.is_some());
        assert_eq!(
            carried,
            [
                (None, deadline, 1),
                (None, deadline, 2),
                (None, deadline, 3)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_retry_carries_the_callers_extensions_and_the_calls_context() {
        let carried = attempts_carrying(Some("trace-7")).await;
        let deadline = carried[0].1;
        let caller = Some("trace-7");
        assert_eq!(
            carried,
            [
                (caller, deadline, 1),
                (caller, deadline, 2),
                (caller, deadline, 3)
            ]
        );
    }

    #[test]
    fn the_copy_kept_for_retries_leaves_out_extensions_that_hold_only_the_context() {
        let mut request: Request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
        request.call_context_mut();
        assert!(request.replay_kept().expect("copy").extensions().is_empty());
        request.extensions_mut().insert("trace-7");
        let kept = request.replay_kept().expect("copy");
        assert_eq!(kept.extensions().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_counts_the_answers_the_backends_accept() {
        // Every call answered 200 and counted as accepted: none refused,
        // however many there are.
        let ok =
            tower::service_fn(|_: Request| async { Ok::<_, Infallible>(http::Response::new(())) });
        let budget = RetryBudget::new()
            .adaptive_throttling(2.0)
            .expect("valid setting");
        let service = RetryLayer::new(RetryPolicy::new(), budget.clone()).layer(ok);
        for _ in 0..200 {
            let request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
            let answer = service.clone().oneshot(request).await;
            assert!(answer.is_ok(), "{:?}", answer.err());
        }
        let stats = budget.stats();
        assert_eq!((stats.accepted, stats.throttled), (200, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_keeps_calls_to_backends_that_turn_them_away_from_being_sent() {
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sent.clone();
        let unavailable = tower::service_fn(move |_: Request| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async {
                let mut response = http::Response::new(());
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, Infallible>(response)
            }
        });
        let budget = RetryBudget::new()
            .min_per_second(0)
            .adaptive_throttling(2.0)
            .expect("valid setting");
        let service = RetryLayer::new(RetryPolicy::new(), budget.clone()).layer(unavailable);
        let mut throttled = 0;
        for _ in 0..200 {
            let request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
            match service.clone().oneshot(request).await {
                Ok(response) => assert_eq!(response.status(), 503),
                Err(error) => {
                    assert!(error.is::<Throttled>(), "{error}");
                    throttled += 1;
                }
            }
        }
        // Nothing is accepted: past the floor of 10 calls, k x 0 accepts
        // lets almost nothing through.
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < 40, "{sent} sent");
        assert!(throttled > 160, "{throttled} throttled");
        assert_eq!(budget.stats().throttled, throttled);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_given_up_on_before_an_answer_count_as_not_accepted() {
        // A backend that never answers, and callers that give up (an outer
        // timeout): the calls they drop are what throttling sees.
        let silent = tower::service_fn(|_: Request| {
            std::future::pending::<Result<http::Response<()>, Infallible>>()
        });
        let budget = RetryBudget::new()
            .adaptive_throttling(2.0)
            .expect("valid setting");
        let service = RetryLayer::new(RetryPolicy::new(), budget.clone()).layer(silent);
        for _ in 0..50 {
            let request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
            let call = service.clone().oneshot(request);
            // Given up on (or, past the first few, refused).
            let _ = tokio::time::timeout(Duration::from_millis(10), call).await;
        }
        // 50 settled, none accepted: nearly every call is refused now.
        let mut refused = 0;
        for _ in 0..20 {
            let request = http::Request::new(ReplayBody::new(Empty::new(), 1024));
            let call = service.clone().oneshot(request);
            // Refused at once, or given up on in its turn.
            if let Ok(Err(error)) = tokio::time::timeout(Duration::from_millis(1), call).await {
                assert!(error.is::<Throttled>(), "{error}");
                refused += 1;
            }
        }
        assert!(refused >= 15, "{refused} of 20 refused");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_backoff_delays() {
        let first = pauses(layer().seed(7)).await;
        assert_eq!(first.len(), 19, "{first:?}");
        assert_eq!(first, pauses(layer().seed(7)).await);
        assert_ne!(first, pauses(layer().seed(8)).await, "the seed matters");
    }
}
