use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use super::timeout::{format_grpc_timeout, parse_grpc_timeout, GRPC_TIMEOUT};
use crate::error::{chain, BoxError, NeverSent};
use crate::timeout::{CallDeadline, Elapsed, Timer};

/// How each endpoint's tonic [`Endpoint`] is made: from its `scheme://addr`
/// URI, by the user's closure.
pub(crate) type ConfigureEndpoint =
    Arc<dyn Fn(Endpoint) -> Result<Endpoint, tonic::transport::Error> + Send + Sync>;

/// One endpoint of a balanced gRPC channel: a tonic [`Channel`] to one
/// address, that takes any request body and tells retry layers when a call
/// never left.
///
/// - A call whose connection could not be made (refused, timed out, TLS
///   handshake failed), or whose HTTP/2 stream the server refused before
///   processing it or left unprocessed as it shut down gracefully (a
///   `GOAWAY` with `NO_ERROR`), fails with its error wrapped in [`NeverSent`], so even a
///   non-idempotent method is sent elsewhere.
/// - Each attempt tells the server the time it has left: its `grpc-timeout`
///   is set from the call's [`CallDeadline`], so the server can give up on
///   work the client no longer waits for.
/// - When tonic's own `grpc-timeout` timer ends the call at its deadline,
///   the error is an [`Elapsed`] of that deadline (the caller's time ran
///   out; the endpoint is not to blame), not tonic's `CANCELLED`.
///
/// ```
/// use tonic::transport::Endpoint;
/// use tower_lb::grpc::GrpcEndpoint;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tonic::transport::Error> {
/// let channel = Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
/// let endpoint = GrpcEndpoint::new(channel);
/// # let _ = endpoint;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct GrpcEndpoint {
    channel: Channel,
}

impl GrpcEndpoint {
    /// Sends calls through `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// A channel to `scheme://addr` made by `configure` from tonic's default
    /// [`Endpoint`], connected lazily: on the first call, and again after the
    /// connection drops. `None`, with a `warn` event, when the configuration
    /// fails for this address: the address is left out rather than kept as
    /// an endpoint that fails every call in no time (which P2C would favour).
    pub(crate) fn lazy(
        addr: SocketAddr,
        scheme: &Scheme,
        authority: Option<&Authority>,
        configure: &ConfigureEndpoint,
    ) -> Option<Self> {
        let made = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map(|e| e.connect_timeout(crate::client::DEFAULT_CONNECT_TIMEOUT))
            .map(|e| match authority.and_then(|a| origin(scheme, a)) {
                Some(origin) => e.origin(origin),
                None => e,
            })
            .and_then(|e| configure(e));
        match made {
            Ok(endpoint) => Some(Self::new(endpoint.connect_lazy())),
            Err(error) => {
                let error = crate::error::report(&error);
                tracing::warn!(%addr, %error, "the gRPC endpoint could not be configured; it is left out");
                None
            }
        }
    }
}

/// `scheme://authority`, the origin calls say they are for.
fn origin(scheme: &Scheme, authority: &Authority) -> Option<http::Uri> {
    http::Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .ok()
}

impl fmt::Debug for GrpcEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcEndpoint").finish_non_exhaustive()
    }
}

impl<B> Service<http::Request<B>> for GrpcEndpoint
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = GrpcResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.channel, cx)
            .map_err(|error| never_sent_if_unconnected(error, None))
    }

    fn call(&mut self, mut req: http::Request<B>) -> GrpcResponseFuture {
        let deadline = tell_the_server_the_time_left(&mut req);
        GrpcResponseFuture {
            inner: self.channel.call(req.map(tonic::body::Body::new)),
            deadline,
        }
    }
}

/// Sets the attempt's `grpc-timeout` to the time left before the call's
/// deadline, and returns that deadline: the call's [`CallDeadline`], or
/// the one a caller's own `grpc-timeout` sets; none when there is no real
/// deadline.
fn tell_the_server_the_time_left<B>(req: &mut http::Request<B>) -> Option<CallDeadline> {
    let Some(deadline) = CallDeadline::of(req) else {
        return req
            .headers()
            .get(&GRPC_TIMEOUT)
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .map(CallDeadline::after);
    };
    // One small string per attempt of a call with a deadline: the value
    // changes with every attempt, so it cannot be made once.
    req.headers_mut()
        .insert(GRPC_TIMEOUT, format_grpc_timeout(deadline.remaining()));
    Some(deadline)
}

/// The future of a call through a [`GrpcEndpoint`].
pub struct GrpcResponseFuture {
    inner: tonic::transport::channel::ResponseFuture,
    deadline: Option<CallDeadline>,
}

impl Future for GrpcResponseFuture {
    type Output = Result<http::Response<tonic::body::Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.inner).poll(cx));
        let deadline = self.deadline;
        Poll::Ready(match result {
            Ok(mut response) => {
                // Says the server was told the caller's deadline, so that its
                // DEADLINE_EXCEEDED when that runs out is not held against it
                // (see `HttpClassify`). Only calls with a deadline pay for it:
                // the response's extension map (a map and a box, unless tonic
                // made one already).
                if let Some(deadline) = deadline {
                    response.extensions_mut().insert(deadline);
                }
                Ok(response)
            }
            Err(error) => Err(never_sent_if_unconnected(error, deadline)),
        })
    }
}

impl fmt::Debug for GrpcResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcResponseFuture").finish_non_exhaustive()
    }
}

/// tonic marks a failure to connect (or to complete a TLS handshake) with
/// [`tonic::ConnectError`] somewhere in the chain; no byte of the call was
/// written then. A stream the server refused (`REFUSED_STREAM`), or left
/// unprocessed as it went away gracefully (`GOAWAY` with `NO_ERROR`), was
/// not processed either. tonic's timer firing once the call's deadline has
/// passed is that deadline; any other tonic timeout (an `Endpoint::timeout`)
/// stays the endpoint's error.
fn never_sent_if_unconnected(
    error: tonic::transport::Error,
    deadline: Option<CallDeadline>,
) -> BoxError {
    if chain(&error).any(|link| link.is::<tonic::ConnectError>())
        || crate::error::unprocessed_stream(&error).is_some()
    {
        return Box::new(NeverSent::new(error));
    }
    let timed_out = chain(&error).any(|link| link.is::<tonic::TimeoutExpired>());
    match deadline {
        Some(deadline) if timed_out && deadline.remaining().is_zero() => {
            Box::new(Elapsed::new(Timer::Deadline, deadline.budget()))
        }
        _ => Box::new(error),
    }
}
