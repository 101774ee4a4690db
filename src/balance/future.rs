//! The balancer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::Service;

use super::endpoint::InFlight;
use crate::classify::{Classify, Outcome, OutcomeReport, RecordOutcome};
use crate::error::BoxError;
use crate::Error;

/// A request bound to its endpoint: the call to the endpoint's service and
/// the guard that counts it in flight.
pub(crate) type Dispatched<K, S, Req> = (EndpointCall<S, Req>, InFlight<K, S>);

/// The call to the picked endpoint's service.
pub(crate) enum EndpointCall<S: Service<Req>, Req> {
    /// The service was ready when asked (nearly always: a hyper-util
    /// client or a tonic channel with room): its call, started.
    Started(S::Future),
    /// It was not: a `Oneshot` drives it to readiness, then calls it.
    /// Boxed, because it is rare and holds the whole request, which would
    /// otherwise make every call's future (moved by each layer above) the
    /// request's size larger.
    Readying(Pin<Box<Oneshot<S, Req>>>),
    /// Its readiness failed.
    Failed(S::Error),
}

impl<S: Service<Req>, Req> EndpointCall<S, Req> {
    /// Asks `service` once whether it is ready, with a waker that does
    /// nothing (the `Oneshot`, if needed, asks again with the caller's), and
    /// calls it if so.
    pub(crate) fn start(mut service: S, req: Req) -> Self {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match service.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Self::Started(service.call(req)),
            Poll::Ready(Err(error)) => Self::Failed(error),
            Poll::Pending => Self::Readying(Box::pin(Oneshot::new(service, req))),
        }
    }
}

/// Waits for endpoints to appear (the startup wait), then dispatches. Boxed:
/// this path runs only while the balancer has no endpoints.
pub(crate) type Waiting<K, S, Req> =
    Pin<Box<dyn Future<Output = Result<Dispatched<K, S, Req>, Error>> + Send>>;

pin_project! {
    /// The future returned by [`Balancer`](crate::Balancer)'s `call`.
    ///
    /// It drives the picked endpoint's service to readiness and then calls it
    /// (the `oneshot` pattern), so one slow endpoint never holds up the
    /// balancer's `poll_ready`. Dropping it before it completes releases the
    /// request's in-flight count.
    pub struct ResponseFuture<K, S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<K, S, Req>,
        classify: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<K, S, Req>
    where
        S: Service<Req>,
    {
        Waiting { wait: Waiting<K, S, Req> },
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<InFlight<K, S>>,
        },
        Readying {
            call: Pin<Box<Oneshot<S, Req>>>,
            guard: Option<InFlight<K, S>>,
        },
        NotReady {
            error: Option<S::Error>,
            guard: Option<InFlight<K, S>>,
        },
        Failed { error: Option<Error> },
    }
}

impl<K, S, Req, C> ResponseFuture<K, S, Req, C>
where
    S: Service<Req>,
{
    pub(crate) fn dispatched((call, guard): Dispatched<K, S, Req>, classify: C) -> Self {
        Self {
            state: State::calling(call, guard),
            classify,
        }
    }

    pub(crate) fn waiting(wait: Waiting<K, S, Req>, classify: C) -> Self {
        Self {
            state: State::Waiting { wait },
            classify,
        }
    }

    pub(crate) fn failed(error: Error, classify: C) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            classify,
        }
    }
}

impl<K, S, Req, C> Future for ResponseFuture<K, S, Req, C>
where
    K: fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<C::Response, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let dispatched = match this.state.project() {
                StateProj::Waiting { wait } => match ready!(wait.as_mut().poll(cx)) {
                    Ok(dispatched) => dispatched,
                    Err(error) => return Poll::Ready(Err(error)),
                },
                StateProj::Calling { future, guard } => {
                    let result = ready!(future.poll(cx));
                    return Poll::Ready(complete(result, guard.take(), this.classify));
                }
                StateProj::Readying { call, guard } => {
                    let result = ready!(call.as_mut().poll(cx));
                    return Poll::Ready(complete(result, guard.take(), this.classify));
                }
                StateProj::NotReady { error, guard } => {
                    let Some(error) = error.take() else {
                        panic!("tower_lb::ResponseFuture polled after completion");
                    };
                    return Poll::Ready(complete(Err(error), guard.take(), this.classify));
                }
                StateProj::Failed { error } => match error.take() {
                    Some(error) => return Poll::Ready(Err(error)),
                    None => panic!("tower_lb::ResponseFuture polled after completion"),
                },
            };
            let (call, guard) = dispatched;
            self.as_mut()
                .project()
                .state
                .set(State::calling(call, guard));
        }
    }
}

impl<K, S: Service<Req>, Req> State<K, S, Req> {
    fn calling(call: EndpointCall<S, Req>, guard: InFlight<K, S>) -> Self {
        let guard = Some(guard);
        match call {
            EndpointCall::Started(future) => State::Calling { future, guard },
            EndpointCall::Readying(call) => State::Readying { call, guard },
            EndpointCall::Failed(error) => State::NotReady {
                error: Some(error),
                guard,
            },
        }
    }
}

/// The endpoint's answer, or its error, classified and recorded against it
/// (the guard, taken once, ends the request's time in flight).
fn complete<K, S, Req, C>(
    result: Result<S::Response, S::Error>,
    guard: Option<InFlight<K, S>>,
    classify: &mut C,
) -> Result<C::Response, Error>
where
    K: fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    let Some(guard) = guard else {
        panic!("tower_lb::ResponseFuture polled after completion");
    };
    let started = guard.started();
    let endpoint = guard.complete();
    match result {
        Ok(response) => {
            let report = OutcomeReport::new(endpoint);
            Ok(classify.classify_response(response, report))
        }
        Err(source) => {
            let source: BoxError = source.into();
            match classify.classify_error(&*source) {
                Some(Outcome::Failure) if crate::error::is_connection_lost(&*source) => {
                    endpoint.record_connection_lost(started);
                }
                Some(outcome) => endpoint.record_outcome(outcome),
                None => {}
            }
            Err(Error::Endpoint {
                endpoint: format!("{:?}", endpoint.key()),
                source,
            })
        }
    }
}

impl<K, S, Req, C> fmt::Debug for ResponseFuture<K, S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for endpoints",
            State::Calling { .. } | State::Readying { .. } | State::NotReady { .. } => "calling",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
