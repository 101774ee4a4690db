use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use super::timeout::{format_grpc_timeout, parse_grpc_timeout};
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
///   processing it, fails with its error wrapped in [`NeverSent`], so even a
///   non-idempotent method is sent elsewhere.
/// - Each attempt tells the server the time it has left: its `grpc-timeout`
///   is set from the call's [`CallDeadline`], so the server can give up on
///   work the client no longer waits for.
/// - When tonic's own `grpc-timeout` timer ends the call, the error is an
///   [`Elapsed`] of the call's deadline (the caller's time ran out; the
///   endpoint is not to blame), not tonic's `CANCELLED`.
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
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Channel(Channel),
    /// The user's endpoint configuration failed for this address: every
    /// call fails with the reason, and nothing is sent.
    Misconfigured(Arc<str>),
}

impl GrpcEndpoint {
    /// Sends calls through `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            kind: Kind::Channel(channel),
        }
    }

    /// A channel to `scheme://addr` made by `configure` from tonic's default
    /// [`Endpoint`], connected lazily: on the first call, and again after the
    /// connection drops. A configuration that fails is reported once (a
    /// `warn` event) and fails every call.
    pub(crate) fn lazy(
        addr: SocketAddr,
        scheme: &Scheme,
        authority: Option<&Authority>,
        configure: &ConfigureEndpoint,
    ) -> Self {
        let made = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map(|e| e.connect_timeout(super::DEFAULT_CONNECT_TIMEOUT))
            .map(|e| match authority.and_then(|a| origin(scheme, a)) {
                Some(origin) => e.origin(origin),
                None => e,
            })
            .and_then(|e| configure(e));
        match made {
            Ok(endpoint) => Self::new(endpoint.connect_lazy()),
            Err(error) => {
                tracing::warn!(%addr, %error, "the gRPC endpoint could not be configured");
                Self {
                    kind: Kind::Misconfigured(error.to_string().into()),
                }
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
        match &self.kind {
            Kind::Channel(_) => f.debug_struct("GrpcEndpoint").finish_non_exhaustive(),
            Kind::Misconfigured(why) => f
                .debug_struct("GrpcEndpoint")
                .field("misconfigured", why)
                .finish(),
        }
    }
}

/// The user's endpoint configuration failed: the caller's problem, the same
/// on every endpoint, so it is neither retried nor held against the
/// endpoint.
#[derive(Debug, thiserror::Error)]
#[error("the gRPC endpoint could not be configured, so the call was not sent: {0}")]
pub struct EndpointMisconfigured(Arc<str>);

impl<B> Service<http::Request<B>> for GrpcEndpoint
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = GrpcResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.kind {
            Kind::Channel(channel) => {
                Service::<http::Request<tonic::body::Body>>::poll_ready(channel, cx)
                    .map_err(|error| never_sent_if_unconnected(error, None))
            }
            Kind::Misconfigured(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, mut req: http::Request<B>) -> GrpcResponseFuture {
        let channel = match &mut self.kind {
            Kind::Channel(channel) => channel,
            Kind::Misconfigured(why) => {
                return GrpcResponseFuture {
                    inner: Err(Some(EndpointMisconfigured(why.clone()))),
                    timeout: None,
                }
            }
        };
        let timeout = tell_the_server_the_time_left(&mut req);
        GrpcResponseFuture {
            inner: Ok(channel.call(req.map(tonic::body::Body::new))),
            timeout,
        }
    }
}

/// Sets the attempt's `grpc-timeout` to the time left before the call's
/// deadline (none when the call has no real deadline), and returns the
/// timeout the attempt carries.
fn tell_the_server_the_time_left<B>(req: &mut http::Request<B>) -> Option<Duration> {
    let Some(deadline) = CallDeadline::of(req) else {
        return req
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
    };
    // `Duration::MAX` is how the ready-made clients say "no deadline of
    // our own": there is nothing to tell.
    if deadline.budget() == Duration::MAX {
        return None;
    }
    let left = deadline.remaining();
    req.headers_mut()
        .insert("grpc-timeout", format_grpc_timeout(left));
    Some(left)
}

/// The future of a call through a [`GrpcEndpoint`].
pub struct GrpcResponseFuture {
    inner: Result<tonic::transport::channel::ResponseFuture, Option<EndpointMisconfigured>>,
    timeout: Option<Duration>,
}

impl Future for GrpcResponseFuture {
    type Output = Result<http::Response<tonic::body::Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let timeout = self.timeout;
        match &mut self.inner {
            Ok(inner) => {
                let result = ready!(Pin::new(inner).poll(cx));
                Poll::Ready(result.map_err(|error| never_sent_if_unconnected(error, timeout)))
            }
            Err(misconfigured) => match misconfigured.take() {
                Some(error) => Poll::Ready(Err(Box::new(error))),
                None => panic!("GrpcResponseFuture polled after completion"),
            },
        }
    }
}

impl fmt::Debug for GrpcResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcResponseFuture").finish_non_exhaustive()
    }
}

/// tonic marks a failure to connect (or to complete a TLS handshake) with
/// [`tonic::ConnectError`] somewhere in the chain; no byte of the call was
/// written then. A stream the server refused (`REFUSED_STREAM`) was not
/// processed either. tonic's `grpc-timeout` timer firing is the call's
/// deadline.
fn never_sent_if_unconnected(
    error: tonic::transport::Error,
    timeout: Option<Duration>,
) -> BoxError {
    if chain(&error).any(|link| link.is::<tonic::ConnectError>())
        || crate::error::is_refused_stream(&error)
    {
        Box::new(NeverSent::new(error))
    } else if chain(&error).any(|link| link.is::<tonic::TimeoutExpired>()) {
        Box::new(Elapsed::new(Timer::Deadline, timeout.unwrap_or_default()))
    } else {
        Box::new(error)
    }
}
