//! Glue for HTTP with hyper: a per-endpoint service over one shared
//! hyper-util [`Client`][hyper-util Client].
//!
//! [`HttpEndpoint`] sends an [`http::Request`] through the shared client to
//! one endpoint's address: it rewrites the request's scheme and authority and
//! keeps its path, query, headers and body. The client's connection pool is
//! keyed by authority, so all endpoints share one pool and one set of settings.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use http_body_util::Empty;
//! use hyper::body::Bytes;
//! use tower::ServiceExt;
//! use tower_lb::{discover, http as lb_http, Balancer};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let addrs: Vec<SocketAddr> = vec!["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?];
//! let client = lb_http::client::<Empty<Bytes>>();
//! let balancer = Balancer::builder().build(discover::fixed(lb_http::endpoints(&client, addrs)));
//!
//! let request = http::Request::get("/hello").body(Empty::new())?;
//! let response = balancer.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! [hyper-util Client]: https://docs.rs/hyper-util/0.1/hyper_util/client/legacy/struct.Client.html

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::TokioExecutor;
use tower::Service;

use crate::connection::{
    H1Pool, H1Settings, H2Connection, H2Settings, Http1SendFuture, Http2SendFuture,
};
use crate::error::{BoxError, RefusedByClient};
use crate::health::ConnectionStatus;

mod body;

pub use body::EndpointBody;

/// A hyper-util client for plain HTTP (HTTP/1.1, or HTTP/2 with prior
/// knowledge if you build your own) on the tokio runtime, ready to be shared
/// by [`HttpEndpoint`]s. Its connections send at once (`TCP_NODELAY`, as
/// tonic's and Go's do): with Nagle's algorithm, hyper-util's default, an
/// HTTP/2 request's body waits for the server's delayed ACK of its headers.
pub fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One [`HttpEndpoint`] per address, keyed by the address, sharing `client`:
/// ready for [`discover::fixed`](crate::discover::fixed).
pub fn endpoints<B, C, I>(client: &Client<C, B>, addrs: I) -> Vec<(SocketAddr, HttpEndpoint<B, C>)>
where
    C: Clone,
    I: IntoIterator<Item = SocketAddr>,
{
    addrs
        .into_iter()
        .map(|addr| (addr, HttpEndpoint::new(client.clone(), addr)))
        .collect()
}

/// Sends requests through a shared hyper-util [`Client`][hyper-util Client]
/// to one endpoint (or, for an [`HttpClient`](crate::client::HttpClient),
/// over connections of the endpoint's own: HTTP/1.1 by default, one HTTP/2
/// connection with `http2_only()`).
///
/// [hyper-util Client]: https://docs.rs/hyper-util/0.1/hyper_util/client/legacy/struct.Client.html
pub struct HttpEndpoint<B, C = HttpConnector> {
    /// Shared by the endpoint's clones: the balancer clones an endpoint's
    /// service for every request it sends there, and a hyper-util `Client`
    /// is half a dozen reference counts and settings to copy and drop.
    origin: Arc<Origin<B, C>>,
    /// Connections of the endpoint's own, with no shared pool in between
    /// (an [`HttpClient`](crate::client::HttpClient)'s), when it has them.
    /// Outside the `Arc`: each clone waits for an HTTP/2 connection attempt
    /// on its own.
    connection: Option<Own<B>>,
}

/// An endpoint's own connections.
enum Own<B> {
    /// HTTP/2 (prior knowledge): one connection, every request on it.
    Http2(H2Connection),
    /// HTTP/1.1: a request per connection, idle ones kept.
    Http1(H1Pool<B>),
}

impl<B> Clone for Own<B> {
    fn clone(&self) -> Self {
        match self {
            Own::Http2(connection) => Own::Http2(connection.clone()),
            Own::Http1(pool) => Own::Http1(pool.clone()),
        }
    }
}

/// Where an [`HttpEndpoint`] sends requests, and through which pool.
struct Origin<B, C> {
    /// The shared client, unless the endpoint has its own connection.
    pool: Option<Client<C, B>>,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` of requests that name none, when it is not `authority`.
    host: Option<http::HeaderValue>,
    /// Its connection state in the pool, when an `HttpClient` keeps one
    /// (see `client::pool`).
    pool_status: Option<ConnectionStatus>,
}

impl<B, C> HttpEndpoint<B, C> {
    /// An endpoint at `addr`, over plain `http`.
    pub fn new(client: Client<C, B>, addr: SocketAddr) -> Self {
        Self::with_address(client, Scheme::HTTP, addr)
    }

    /// An endpoint at `addr`, over `scheme` (`https` with a TLS-capable
    /// connector).
    pub fn with_address(client: Client<C, B>, scheme: Scheme, addr: SocketAddr) -> Self {
        Self::with_origin(client, scheme, address_authority(addr))
    }

    /// An endpoint at `scheme://authority` (for example `https` with a
    /// TLS-capable connector, or a host name).
    pub fn with_origin(client: Client<C, B>, scheme: Scheme, authority: Authority) -> Self {
        Self {
            origin: Origin::new(Some(client), scheme, authority, None),
            connection: None,
        }
    }

    /// The state of its own HTTP/2 connection, or of its connections in
    /// the pool, when it is kept.
    pub(crate) fn connection_status(&self) -> Option<ConnectionStatus> {
        match &self.connection {
            Some(Own::Http2(connection)) => Some(connection.status().clone()),
            Some(Own::Http1(pool)) => Some(pool.status().clone()),
            None => self.origin.pool_status.clone(),
        }
    }
}

impl<B, C> Origin<B, C> {
    /// Requests to `scheme://authority`; `host` is the `Host` of those that
    /// name none, when the connection does not take it from the URI.
    fn new(
        pool: Option<Client<C, B>>,
        scheme: Scheme,
        authority: Authority,
        host: Option<http::HeaderValue>,
    ) -> Arc<Self> {
        Arc::new(Origin {
            pool,
            scheme,
            authority,
            host,
            pool_status: None,
        })
    }
}

impl<B, C> HttpEndpoint<B, C>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// An endpoint at plain-text `http://addr` over one HTTP/2 connection
    /// of its own (prior knowledge), made at once and kept open (see
    /// `H2Connection::kept_open`).
    pub(crate) fn http2_connection(addr: SocketAddr, settings: H2Settings) -> Self {
        Self {
            origin: Origin::new(None, Scheme::HTTP, address_authority(addr), None),
            connection: Some(Own::Http2(H2Connection::kept_open(addr, settings))),
        }
    }

    /// An endpoint at plain-text `http://addr` over HTTP/1.1 connections of
    /// its own (see `H1Pool`).
    pub(crate) fn http1_connections(addr: SocketAddr, settings: H1Settings) -> Self {
        let authority = address_authority(addr);
        // hyper-util's client takes the `Host` from the absolute URI; a bare
        // connection writes the URI it is given, so it gets the path and
        // the endpoint's address goes in `Host`.
        let host = host_value(&authority, &Scheme::HTTP)
            .unwrap_or_else(|_| unreachable!("an authority is a valid header value"));
        Self {
            origin: Origin::new(None, Scheme::HTTP, authority, Some(host)),
            connection: Some(Own::Http1(H1Pool::new(addr, settings))),
        }
    }
}

impl<B, C> HttpEndpoint<B, C> {
    /// The `host:port` requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.origin.authority
    }

    /// Points the request at this endpoint. Refuses what cannot be balanced
    /// without changing its meaning: a CONNECT (its target is the tunnel's),
    /// and an absolute URI of another scheme (an `https` request must never go
    /// out as plain `http`). An absolute URI's authority is kept as the `Host`
    /// header, so virtual hosts still route.
    fn address(&self, parts: &mut http::request::Parts) -> Result<(), BoxError> {
        if parts.method == http::Method::CONNECT {
            return Err("a CONNECT request cannot be balanced".into());
        }
        let own_http1 = matches!(self.connection, Some(Own::Http1(_)));
        // hyper writes HTTP/1.0 and 1.1 heads only (and panics on others).
        if own_http1
            && !matches!(
                parts.version,
                http::Version::HTTP_10 | http::Version::HTTP_11
            )
        {
            return Err(format!(
                "an {:?} request cannot go over the endpoint's HTTP/1.1 connections",
                parts.version
            )
            .into());
        }
        if let Some(scheme) = parts.uri.scheme() {
            if *scheme != self.origin.scheme {
                return Err(format!(
                    "the request is for {scheme} but the endpoint speaks {}",
                    self.origin.scheme
                )
                .into());
            }
        }
        if !parts.headers.contains_key(http::header::HOST) {
            if let Some(authority) = parts.uri.authority() {
                let host = host_value(authority, &self.origin.scheme)?;
                parts.headers.insert(http::header::HOST, host);
            } else if let Some(host) = &self.origin.host {
                parts.headers.insert(http::header::HOST, host.clone());
            }
        }
        parts.uri = if own_http1 {
            origin_form(std::mem::take(&mut parts.uri))
        } else {
            self.rewrite(std::mem::take(&mut parts.uri))?
        };
        Ok(())
    }

    fn rewrite(&self, uri: Uri) -> Result<Uri, http::Error> {
        absolute_uri(uri, &self.origin.scheme, &self.origin.authority)
    }
}

/// `uri`'s path and query (`/` if it has none) at `scheme://authority`.
pub(crate) fn absolute_uri(
    uri: Uri,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<Uri, http::Error> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Ok(Uri::from_parts(parts)?)
}

/// The `Host` of requests to `authority` over `scheme`, as hyper-util's
/// client writes it: the host, and the port unless it is the scheme's
/// default; never the user information (`user:password@`) an absolute URI
/// may carry.
fn host_value(
    authority: &Authority,
    scheme: &Scheme,
) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let has_user = authority.as_str().contains('@');
    match authority.port_u16() {
        Some(port) if port == default_port => http::HeaderValue::from_str(authority.host()),
        Some(port) if has_user => {
            http::HeaderValue::from_str(&format!("{}:{port}", authority.host()))
        }
        None if has_user => http::HeaderValue::from_str(authority.host()),
        _ => http::HeaderValue::from_str(authority.as_str()),
    }
}

/// `uri`'s path and query alone (`/` if it has none): the request target
/// of an HTTP/1.1 request to an origin server (RFC 9112, 3.2.1).
fn origin_form(uri: Uri) -> Uri {
    match uri.into_parts().path_and_query {
        Some(path) => Uri::from(path),
        None => Uri::from_static("/"),
    }
}

impl<B, C: Clone> HttpEndpoint<B, C> {
    /// The endpoint, its connection state in the pool kept in `status`.
    pub(crate) fn with_pool_status(self, status: ConnectionStatus) -> Self {
        let host = self.origin.host.clone();
        self.with_origin_changed(host, Some(status))
    }

    /// The endpoint with its origin's `host` and `pool_status` replaced.
    fn with_origin_changed(
        self,
        host: Option<http::HeaderValue>,
        pool_status: Option<ConnectionStatus>,
    ) -> Self {
        let Origin {
            pool,
            scheme,
            authority,
            ..
        } = &*self.origin;
        Self {
            origin: Arc::new(Origin {
                pool: pool.clone(),
                scheme: scheme.clone(),
                authority: authority.clone(),
                host,
                pool_status,
            }),
            connection: self.connection,
        }
    }

    /// HTTP/1 requests that name no host (a path, no `Host` header) say they
    /// are for `host` (a DNS name, say) rather than for the endpoint's
    /// address, so that virtual hosts and sidecars still route. Not for
    /// HTTP/2, whose `:authority` comes from the URI (the address) and must
    /// agree with `Host`.
    pub fn with_host(self, host: &Authority) -> Self {
        let pool_status = self.origin.pool_status.clone();
        self.with_origin_changed(http::HeaderValue::from_str(host.as_str()).ok(), pool_status)
    }
}

impl<B, C> Clone for HttpEndpoint<B, C> {
    fn clone(&self) -> Self {
        Self {
            origin: self.origin.clone(),
            connection: self.connection.clone(),
        }
    }
}

/// `addr` as an authority (`127.0.0.1:80`, `[::1]:80`).
pub(crate) fn address_authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| unreachable!("a socket address is a valid authority"))
}

impl<B, C> fmt::Debug for HttpEndpoint<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HttpEndpoint({}://{})",
            self.origin.scheme, self.origin.authority
        )
    }
}

impl<B, C> Service<Request<B>> for HttpEndpoint<B, C>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<EndpointBody>;
    type Error = HttpError;
    type Future = HttpResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HttpError>> {
        match &mut self.connection {
            Some(Own::Http2(connection)) => connection.poll_ready(cx).map_err(|source| HttpError {
                kind: Kind::Connect,
                source,
            }),
            // Connections are made inside each request's future.
            Some(Own::Http1(_)) | None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> HttpResponseFuture {
        let (mut parts, body) = req.into_parts();
        if let Err(error) = self.address(&mut parts) {
            return HttpResponseFuture {
                sending: Sending::Refused(Some(HttpError {
                    kind: Kind::InvalidUri,
                    source: Box::new(RefusedByClient::new(error)),
                })),
            };
        }
        let req = Request::from_parts(parts, body);
        HttpResponseFuture {
            sending: match (&mut self.connection, &self.origin.pool) {
                (Some(Own::Http2(connection)), _) => Sending::Http2(connection.send(req)),
                (Some(Own::Http1(pool)), _) => Sending::Http1(pool.send(req)),
                (None, Some(client)) => Sending::Pool(client.request(req)),
                (None, None) => {
                    unreachable!("an endpoint without a connection of its own has a pool")
                }
            },
        }
    }
}

/// The future returned by [`HttpEndpoint`].
pub struct HttpResponseFuture {
    sending: Sending,
}

/// A request on its way, by route.
enum Sending {
    Pool(legacy::ResponseFuture),
    /// On an HTTP/1.1 connection of the endpoint's own.
    Http1(Http1SendFuture),
    /// On its HTTP/2 connection.
    Http2(Http2SendFuture),
    /// The request could not be addressed; it went nowhere.
    Refused(Option<HttpError>),
}

impl Future for HttpResponseFuture {
    type Output = Result<Response<EndpointBody>, HttpError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match &mut self.sending {
            Sending::Pool(sending) => ready!(Pin::new(sending).poll(cx))
                .map(|response| response.map(EndpointBody::hyper))
                .map_err(HttpError::from_client),
            Sending::Http1(sending) => ready!(sending.as_mut().poll(cx))
                .map(|response| response.map(EndpointBody::hyper))
                .map_err(HttpError::from_connection),
            Sending::Http2(sending) => ready!(sending.as_mut().poll(cx))
                .map(|response| response.map(EndpointBody::http2))
                .map_err(HttpError::from_connection),
            Sending::Refused(error) => match error.take() {
                Some(error) => Err(error),
                None => panic!("HttpResponseFuture polled after completion"),
            },
        })
    }
}

impl fmt::Debug for HttpResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture").finish_non_exhaustive()
    }
}

/// Why an HTTP request to an endpoint failed, and whether it can have reached
/// the endpoint. It says what happened; the client's error, which says why,
/// is its [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct HttpError {
    kind: Kind,
    source: BoxError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    /// The HTTP/2 server said it did not process the stream.
    Unprocessed(crate::error::Unprocessed),
    /// The connection closed before the request was written to it.
    Unsent,
    Request,
    InvalidUri,
}

impl HttpError {
    fn from_client(error: legacy::Error) -> Self {
        let kind = if error.is_connect() {
            Kind::Connect
        } else if let Some(unprocessed) = crate::error::unprocessed_stream(&error) {
            Kind::Unprocessed(unprocessed)
        } else {
            Kind::Request
        };
        Self {
            kind,
            source: error.into(),
        }
    }

    /// A request sent on the endpoint's own connections, its chain read
    /// once.
    fn from_connection(error: BoxError) -> Self {
        let (mut unprocessed, mut connect, mut never_sent) = (None, false, false);
        for link in crate::error::chain(&*error) {
            unprocessed = unprocessed.or_else(|| crate::error::unprocessed_link(link));
            connect |= link.is::<crate::error::ConnectFailed>();
            never_sent |= crate::error::never_sent_link(link);
        }
        let kind = match unprocessed {
            Some(unprocessed) => Kind::Unprocessed(unprocessed),
            None if connect => Kind::Connect,
            None if never_sent => Kind::Unsent,
            None => Kind::Request,
        };
        Self {
            kind,
            source: error,
        }
    }

    /// Connecting to the endpoint failed (refused, unreachable, timed out).
    pub fn is_connect(&self) -> bool {
        self.kind == Kind::Connect
    }

    /// The request provably never reached the server's application (a
    /// connect failure; an HTTP/2 stream the server refused before any
    /// processing, or left unprocessed when it went away gracefully with
    /// `GOAWAY(NO_ERROR)`; a connection that closed before the request was
    /// written to it; a request that could not be addressed to the
    /// endpoint), so sending it again cannot duplicate it.
    pub fn is_never_sent(&self) -> bool {
        matches!(
            self.kind,
            Kind::Connect | Kind::Unprocessed(_) | Kind::Unsent | Kind::InvalidUri
        )
    }

    /// The client refused to address the request to the endpoint (a CONNECT,
    /// or a scheme the endpoint does not speak): the caller's mistake, which
    /// says nothing about the endpoint's health.
    pub fn is_refused_by_client(&self) -> bool {
        self.kind == Kind::InvalidUri
    }

    #[cfg(test)]
    pub(crate) fn refused_for_test() -> Self {
        Self {
            kind: Kind::InvalidUri,
            source: Box::new(RefusedByClient::new("CONNECT is not balanced")),
        }
    }
}

impl fmt::Display for HttpError {
    /// What happened at this level; the client's error, which says why, is
    /// the [`source`](std::error::Error::source).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Connect => "could not connect to the endpoint, so the request was never sent",
            Kind::Unprocessed(crate::error::Unprocessed::Refused) => {
                "the endpoint refused the request's stream before processing it"
            }
            Kind::Unprocessed(crate::error::Unprocessed::GoingAway) => {
                "the endpoint is shutting down and did not process the request"
            }
            Kind::Unsent => "the connection closed before the request was sent",
            Kind::Request => "the HTTP request to the endpoint failed",
            Kind::InvalidUri => "could not address the request to the endpoint",
        })
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_http_error_says_its_own_part_and_hands_out_the_clients_error() {
        let error = HttpError::refused_for_test();
        assert_eq!(
            error.to_string(),
            "could not address the request to the endpoint"
        );
        assert_eq!(
            error.source().map(ToString::to_string).as_deref(),
            Some("CONNECT is not balanced")
        );
    }
}
