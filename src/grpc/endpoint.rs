use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::USER_AGENT as USER_AGENT_NAME;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use http_body::Body;
use http_body_util::Either;
use pin_project_lite::pin_project;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use super::timeout::{format_grpc_timeout, parse_grpc_timeout, GRPC_TIMEOUT};
use crate::connection::{H2Connection, H2Settings, Http2Body, Http2SendFuture};
use crate::error::{chain, BoxError, NeverSent};
use crate::timeout::{CallDeadline, Elapsed, Timer};

/// How each endpoint's tonic [`Endpoint`] is made: from its `scheme://addr`
/// URI, by the user's closure.
pub(crate) type ConfigureEndpoint =
    Arc<dyn Fn(Endpoint) -> Result<Endpoint, tonic::transport::Error> + Send + Sync>;

/// One endpoint of a balanced gRPC channel: an HTTP/2 connection of its own
/// (what [`GrpcChannel`](crate::client::GrpcChannel) makes by default), or a
/// tonic [`Channel`], to one address. It tells retry layers when a call
/// never left.
///
/// Requests of body type `B` (tonic's by default) go to its own connection
/// as they are; a channel takes them boxed as tonic's body. Its responses'
/// body is an [`EndpointBody`]: h2's or tonic's, as the transport gives.
///
/// - A call whose connection could not be made (refused, timed out, TLS
///   handshake failed), or whose HTTP/2 stream the server refused before
///   processing it or left unprocessed as it shut down gracefully (a
///   `GOAWAY` with `NO_ERROR`), fails with its error wrapped in [`NeverSent`], so even a
///   non-idempotent method is sent elsewhere.
/// - Each attempt tells the server the time it has left: its `grpc-timeout`
///   is set from the call's [`CallDeadline`], so the server can give up on
///   work the client no longer waits for.
/// - Over a channel, tonic's own `grpc-timeout` timer ends a call at its
///   deadline: the error is an [`Elapsed`] of that deadline (the caller's
///   time ran out; the endpoint is not to blame), not tonic's `CANCELLED`.
///   Over its own connection the endpoint arms no timer: the deadline
///   layer above it ends the call.
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
pub struct GrpcEndpoint<B = tonic::body::Body> {
    transport: Transport,
    /// Typed by the request body it takes (tonic's, by default).
    _body: PhantomData<fn(B)>,
}

/// How calls reach the server.
#[derive(Clone)]
enum Transport {
    /// A tonic channel: the user's, or one made from their tonic
    /// [`Endpoint`] settings.
    Channel(Channel),
    /// tower-lb's own HTTP/2 connection (see `crate::connection`), calls
    /// addressed to `origin`.
    Connection {
        connection: H2Connection,
        origin: Arc<Origin>,
    },
}

impl<B> Clone for GrpcEndpoint<B> {
    fn clone(&self) -> Self {
        Self {
            transport: self.transport.clone(),
            _body: PhantomData,
        }
    }
}

/// The scheme and authority every call through a connection is for.
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl GrpcEndpoint {
    /// Sends calls through `channel`.
    pub fn new(channel: Channel) -> Self {
        Self::over(channel)
    }
}

impl<B> GrpcEndpoint<B> {
    /// Sends calls with bodies of type `B` through `channel`.
    fn over(channel: Channel) -> Self {
        Self {
            transport: Transport::Channel(channel),
            _body: PhantomData,
        }
    }

    /// The state of its own HTTP/2 connection, when it has one (a tonic
    /// channel reports none: its readiness says nothing of the connection).
    pub(crate) fn connection_status(&self) -> Option<crate::health::ConnectionStatus> {
        match &self.transport {
            Transport::Connection { connection, .. } => Some(connection.status().clone()),
            Transport::Channel(_) => None,
        }
    }
}

impl<B> GrpcEndpoint<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// An endpoint for `scheme://addr`.
    ///
    /// With no `configure` and plain-text `http`, it is one HTTP/2
    /// connection of tower-lb's own, which calls reach with no queue in
    /// between, made at once and kept open (see `H2Connection::kept_open`).
    /// Otherwise it is a tonic channel made by `configure` from
    /// tonic's default [`Endpoint`] (which is where TLS comes from). `None`,
    /// with a `warn` event, when the configuration fails for this address:
    /// the address is left out rather than kept as an endpoint that fails
    /// every call in no time (which P2C would favour).
    pub(crate) fn for_address(
        addr: SocketAddr,
        scheme: &Scheme,
        authority: Option<&Authority>,
        configure: Option<&ConfigureEndpoint>,
        h2: H2Settings,
    ) -> Option<Self> {
        if configure.is_none() && *scheme == Scheme::HTTP {
            let origin = Origin {
                scheme: scheme.clone(),
                authority: authority
                    .cloned()
                    .unwrap_or_else(|| crate::http::address_authority(addr)),
            };
            return Some(Self {
                transport: Transport::Connection {
                    connection: H2Connection::kept_open(addr, h2),
                    origin: Arc::new(origin),
                },
                _body: PhantomData,
            });
        }
        let made = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map(|e| e.connect_timeout(crate::client::DEFAULT_CONNECT_TIMEOUT))
            .map(|e| match authority.and_then(|a| origin(scheme, a)) {
                Some(origin) => e.origin(origin),
                None => e,
            })
            .and_then(|e| match configure {
                Some(configure) => configure(e),
                None => Ok(e),
            });
        match made {
            Ok(endpoint) => Some(Self::over(endpoint.connect_lazy())),
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

impl<B> fmt::Debug for GrpcEndpoint<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcEndpoint").finish_non_exhaustive()
    }
}

/// What gRPC clients say they are, as tonic's channel says `tonic/<version>`.
const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("grpc-rust-tower-lb/", env!("CARGO_PKG_VERSION")));

impl<B> Service<http::Request<B>> for GrpcEndpoint<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<EndpointBody>;
    type Error = BoxError;
    type Future = GrpcResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.transport {
            Transport::Channel(channel) => {
                Service::<http::Request<tonic::body::Body>>::poll_ready(channel, cx)
                    .map_err(|error| never_sent_if_unconnected(error, None))
            }
            Transport::Connection { connection, .. } => connection.poll_ready(cx),
        }
    }

    fn call(&mut self, mut req: http::Request<B>) -> GrpcResponseFuture {
        let deadline = tell_the_server_the_time_left(&mut req);
        let inner = match &mut self.transport {
            Transport::Channel(channel) => {
                Sending::Channel(channel.call(req.map(tonic::body::Body::new)))
            }
            Transport::Connection { connection, origin } => {
                if let Err(error) = address(&mut req, origin) {
                    return GrpcResponseFuture {
                        inner: Sending::Refused(Some(error)),
                        deadline,
                    };
                }
                // No timer here, where tonic's channel has one: the
                // `GrpcChannel` that makes these endpoints ends the call at
                // its deadline already (its deadline layer, or each
                // attempt's timeout), and a second would be armed for nothing.
                Sending::Connection(connection.send(req))
            }
        };
        GrpcResponseFuture { inner, deadline }
    }
}

/// Makes `req` a call for `origin`, as tonic's channel does: its URI with
/// the origin's scheme and authority, and a `user-agent` if it has none.
fn address<B>(req: &mut http::Request<B>, origin: &Origin) -> Result<(), BoxError> {
    let uri = std::mem::take(req.uri_mut());
    *req.uri_mut() =
        crate::http::absolute_uri(uri, &origin.scheme, &origin.authority).map_err(|error| {
            crate::error::RefusedByClient::new(format!("cannot address the call: {error}"))
        })?;
    req.headers_mut()
        .entry(USER_AGENT_NAME)
        .or_insert(USER_AGENT);
    Ok(())
}

/// Sets the attempt's `grpc-timeout` to the time left before the call's
/// deadline, and returns that deadline: the call's [`CallDeadline`], or
/// the one a caller's own `grpc-timeout` sets; none when there is no real
/// deadline.
fn tell_the_server_the_time_left<B>(req: &mut http::Request<B>) -> Option<CallDeadline> {
    let Some(deadline) = CallDeadline::of(req) else {
        return crate::header::get(req.headers(), &GRPC_TIMEOUT)
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
    inner: Sending,
    deadline: Option<CallDeadline>,
}

/// A call on its way, by transport.
enum Sending {
    Channel(tonic::transport::channel::ResponseFuture),
    Connection(Http2SendFuture),
    /// The call could not be addressed; it went nowhere.
    Refused(Option<BoxError>),
}

impl Future for GrpcResponseFuture {
    type Output = Result<http::Response<EndpointBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let deadline = self.deadline;
        let result = match &mut self.inner {
            Sending::Channel(call) => ready!(Pin::new(call).poll(cx))
                .map(|response| response.map(EndpointBody::channel))
                .map_err(|error| never_sent_if_unconnected(error, deadline)),
            Sending::Connection(call) => ready!(Pin::new(call).poll(cx))
                .map(|response| response.map(EndpointBody::connection)),
            Sending::Refused(error) => match error.take() {
                Some(error) => Err(error),
                None => panic!("GrpcResponseFuture polled after completion"),
            },
        };
        Poll::Ready(result.map(|mut response| {
            // Says the server was told the caller's deadline, so that its
            // DEADLINE_EXCEEDED when that runs out is not held against it
            // (see `HttpClassify`). Only calls with a deadline pay for it:
            // the response's extension map (a map and a box, unless tonic
            // made one already).
            if let Some(deadline) = deadline {
                response.extensions_mut().insert(deadline);
            }
            response
        }))
    }
}

pin_project! {
    /// The body of a [`GrpcEndpoint`]'s responses, as its transport gives
    /// it: h2's from a connection of the endpoint's own, tonic's from a
    /// channel.
    pub struct EndpointBody {
        #[pin]
        inner: Either<Http2Body, tonic::body::Body>,
    }
}

impl EndpointBody {
    fn connection(body: Http2Body) -> Self {
        Self {
            inner: Either::Left(body),
        }
    }

    fn channel(body: tonic::body::Body) -> Self {
        Self {
            inner: Either::Right(body),
        }
    }
}

impl Body for EndpointBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl fmt::Debug for EndpointBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match &self.inner {
            Either::Left(_) => "connection",
            Either::Right(_) => "channel",
        };
        f.debug_struct("EndpointBody")
            .field("transport", &transport)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for GrpcResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcResponseFuture").finish_non_exhaustive()
    }
}

/// tonic marks a failure to connect (or to complete a TLS handshake) with
/// [`tonic::ConnectError`] somewhere in the chain; no byte of the call was
/// written then. (A stream the server refused or left unprocessed needs no
/// mark: `is_never_sent` reads h2's error itself.) tonic's timer firing
/// once the call's deadline has
/// passed is that deadline; any other tonic timeout (an `Endpoint::timeout`)
/// stays the endpoint's error.
fn never_sent_if_unconnected(
    error: tonic::transport::Error,
    deadline: Option<CallDeadline>,
) -> BoxError {
    if chain(&error).any(|link| link.is::<tonic::ConnectError>()) {
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
