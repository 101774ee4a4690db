use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::Stream;
use pin_project_lite::pin_project;
use tower::discover::{Change, Discover};

pin_project! {
    /// A discovery stream of addresses turned into one of endpoint services:
    /// each inserted address becomes `make(address)`.
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
    F: FnMut(D::Service) -> E,
{
    type Item = Result<Change<D::Key, E>, D::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let change = ready!(this.discover.poll_discover(cx));
        Poll::Ready(change.map(|change| {
            change.map(|change| match change {
                Change::Insert(key, address) => Change::Insert(key, (this.make)(address)),
                Change::Remove(key) => Change::Remove(key),
            })
        }))
    }
}

impl<D, F> fmt::Debug for MapEndpoints<D, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapEndpoints").finish_non_exhaustive()
    }
}
