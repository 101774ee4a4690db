//! [`EndpointBody`]: an [`HttpEndpoint`](super::HttpEndpoint)'s response
//! body, whichever way its response came.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::connection::Http2Body;
use crate::error::BoxError;

pin_project! {
    /// The body of an [`HttpEndpoint`](super::HttpEndpoint)'s responses:
    /// hyper's, from hyper-util's pool or an HTTP/1.1 connection of the
    /// endpoint's own, or h2's, from an HTTP/2 connection of its own. Its
    /// errors are hyper's or h2's, boxed (h2's under a word on why tower-lb
    /// closed the connection, when it did); `tower_lb::error` reads both.
    pub struct EndpointBody {
        #[pin]
        inner: Either<Incoming, Http2Body>,
    }
}

impl EndpointBody {
    pub(crate) fn hyper(body: Incoming) -> Self {
        Self {
            inner: Either::Left(body),
        }
    }

    pub(crate) fn http2(body: Http2Body) -> Self {
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
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl fmt::Debug for EndpointBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = match &self.inner {
            Either::Left(_) => "hyper",
            Either::Right(_) => "h2",
        };
        f.debug_struct("EndpointBody")
            .field("from", &from)
            .finish_non_exhaustive()
    }
}
