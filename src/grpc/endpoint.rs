use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use crate::error::{chain, BoxError, NeverSent};

/// One endpoint of a balanced gRPC channel: a tonic [`Channel`] to one
/// address, that takes any request body and tells retry layers when a call
/// never left.
///
/// A call whose connection could not be made (refused, TLS handshake
/// failed) fails with its error wrapped in [`NeverSent`], so even a
/// non-idempotent method is sent elsewhere.
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

    /// A channel to `http://addr` made by `configure` from tonic's default
    /// [`Endpoint`], connected lazily: on the first call, and again after the
    /// connection drops.
    pub(crate) fn lazy(addr: SocketAddr, configure: &dyn Fn(Endpoint) -> Endpoint) -> Self {
        // `http://` and a socket address always make a valid URI.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|_| unreachable!("a socket address is a valid authority"));
        Self::new(configure(endpoint).connect_lazy())
    }
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
            .map_err(never_sent_if_unconnected)
    }

    fn call(&mut self, req: http::Request<B>) -> GrpcResponseFuture {
        GrpcResponseFuture {
            inner: self.channel.call(req.map(tonic::body::Body::new)),
        }
    }
}

/// The future of a call through a [`GrpcEndpoint`].
pub struct GrpcResponseFuture {
    inner: tonic::transport::channel::ResponseFuture,
}

impl Future for GrpcResponseFuture {
    type Output = Result<http::Response<tonic::body::Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.inner).poll(cx));
        Poll::Ready(result.map_err(never_sent_if_unconnected))
    }
}

impl fmt::Debug for GrpcResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcResponseFuture").finish_non_exhaustive()
    }
}

/// tonic marks a failure to connect (or to complete a TLS handshake) with
/// [`tonic::ConnectError`] somewhere in the chain; no byte of the call was
/// written then.
fn never_sent_if_unconnected(error: tonic::transport::Error) -> BoxError {
    if chain(&error).any(|link| link.is::<tonic::ConnectError>()) {
        Box::new(NeverSent::new(error))
    } else {
        Box::new(error)
    }
}
