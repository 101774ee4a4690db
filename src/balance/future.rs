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

pin_project! {
    /// The call to the picked endpoint's service.
    #[project = EndpointCallProj]
    pub(crate) enum EndpointCall<S, Req>
    where
        S: Service<Req>,
    {
        /// The service was ready when asked (nearly always: a hyper-util
        /// client or a tonic channel with room): its call, started.
        Started {
            #[pin]
            future: S::Future,
        },
        /// It was not: a `Oneshot` drives it to readiness, then calls it.
        /// Boxed, because it is rare and holds the whole request, which would
        /// otherwise make every call's future (moved by each layer above) the
        /// request's size larger.
        Readying { call: Pin<Box<Oneshot<S, Req>>> },
        /// Its readiness failed.
        NotReady { error: Option<S::Error> },
    }
}

impl<S: Service<Req>, Req> EndpointCall<S, Req> {
    /// Asks `service` once whether it is ready, with a waker that does
    /// nothing (the `Oneshot`, if needed, asks again with the caller's), and
    /// calls it if so.
    pub(crate) fn start(mut service: S, req: Req) -> Self {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match service.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Self::Started {
                future: service.call(req),
            },
            Poll::Ready(Err(error)) => Self::NotReady { error: Some(error) },
            Poll::Pending => Self::Readying {
                call: Box::pin(Oneshot::new(service, req)),
            },
        }
    }
}

impl<S: Service<Req>, Req> Future for EndpointCall<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EndpointCallProj::Started { future } => future.poll(cx),
            EndpointCallProj::Readying { call } => call.as_mut().poll(cx),
            EndpointCallProj::NotReady { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("tower_lb::ResponseFuture polled after completion"),
            },
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
            call: EndpointCall<S, Req>,
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
            state: State::Calling {
                call,
                guard: Some(guard),
            },
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
                StateProj::Calling { call, guard } => {
                    let result = ready!(call.poll(cx));
                    let Some(guard) = guard.take() else {
                        panic!("tower_lb::ResponseFuture polled after completion");
                    };
                    let started = guard.started();
                    let endpoint = guard.complete();
                    return Poll::Ready(match result {
                        Ok(response) => {
                            let report = OutcomeReport::new(endpoint);
                            Ok(this.classify.classify_response(response, report))
                        }
                        Err(source) => {
                            let source: BoxError = source.into();
                            match this.classify.classify_error(&*source) {
                                Some(Outcome::Failure)
                                    if crate::error::is_connection_lost(&*source) =>
                                {
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
                    });
                }
                StateProj::Failed { error } => match error.take() {
                    Some(error) => return Poll::Ready(Err(error)),
                    None => panic!("tower_lb::ResponseFuture polled after completion"),
                },
            };
            self.as_mut().project().state.set(State::Calling {
                call: dispatched.0,
                guard: Some(dispatched.1),
            });
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
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
