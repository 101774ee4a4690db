use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::Stream;
use pin_project_lite::pin_project;
use tower::discover::{Change, Discover};

pin_project! {
    /// A discovery stream of addresses turned into one of endpoint services:
    /// each inserted address becomes `make(address)`, or is left out.
    pub(crate) struct MapEndpoints<D, F> {
        #[pin]
        discover: D,
        make: F,
    }
}

impl<D, F> MapEndpoints<D, F> {
    pub(crate) fn new(discover: D, make: F) -> Self {
        Self { discover, make }
    }
}

impl<D, F, E> Stream for MapEndpoints<D, F>
where
    D: Discover,
    F: FnMut(D::Service) -> Option<E>,
{
    type Item = Result<Change<D::Key, E>, D::Error>;

    /// An address `make` cannot turn into an endpoint is left out (`make`
    /// says why); a later removal of its key is then an unknown one.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let change = match ready!(this.discover.as_mut().poll_discover(cx)) {
                Some(Ok(Change::Insert(key, address))) => match (this.make)(address) {
                    Some(endpoint) => Change::Insert(key, endpoint),
                    None => continue,
                },
                Some(Ok(Change::Remove(key))) => Change::Remove(key),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(change)));
        }
    }
}

impl<D, F> fmt::Debug for MapEndpoints<D, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapEndpoints").finish_non_exhaustive()
    }
}
