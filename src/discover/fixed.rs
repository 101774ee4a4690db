use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tower::discover::Change;

/// A discovery stream over a list known up front: it inserts each endpoint,
/// then ends (the balancer keeps the set).
///
/// ```
/// use tower_lb::discover;
/// # let (a, b) = ((), ());
/// let endpoints = discover::fixed([("10.0.0.1:80", a), ("10.0.0.2:80", b)]);
/// # let _ = endpoints;
/// ```
pub fn fixed<K, S, I>(endpoints: I) -> Fixed<K, S>
where
    I: IntoIterator<Item = (K, S)>,
{
    Fixed {
        endpoints: endpoints.into_iter().collect::<Vec<_>>().into_iter(),
    }
}

/// The stream returned by [`fixed`].
#[derive(Debug)]
pub struct Fixed<K, S> {
    endpoints: std::vec::IntoIter<(K, S)>,
}

// No field is ever pinned, so the stream can move whatever K and S are.
impl<K, S> Unpin for Fixed<K, S> {}

impl<K, S> Stream for Fixed<K, S> {
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(
            self.endpoints
                .next()
                .map(|(key, service)| Ok(Change::Insert(key, service))),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.endpoints.size_hint()
    }
}
