use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tower::discover::Change;

use super::Empty;
use crate::capacity::shrink_target;

/// A discovery stream fed through a handle: the balancer consumes the
/// [`ChannelDiscover`], your code keeps the [`DiscoveryHandle`] (cloneable)
/// and pushes changes as it learns of them.
///
/// The channel is unbounded so that pushing never waits: discovery changes
/// are rare next to requests, and each is applied in one batch by the
/// balancer. When every handle is dropped the stream ends and the balancer
/// keeps the last set.
///
/// A [`replace_all`](DiscoveryHandle::replace_all) that leaves the set
/// empty says there are no endpoints (the stream yields an [`Empty`]
/// answer after the removals): requests fail at once rather than wait for
/// one, even before any endpoint was inserted.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::discover::DiscoveryClosed> {
/// use tower_lb::{discover, Balancer};
/// # let (svc_a, svc_b, svc_c) = ((), (), ());
/// # fn assert_stream<T: futures_core::Stream>(_: &T) {}
/// let (handle, stream) = discover::channel();
/// # assert_stream(&stream);
/// handle.insert("a", svc_a)?;
/// handle.insert("b", svc_b)?;
/// handle.remove("a")?;
/// handle.replace_all([("b", svc_c)])?;
/// # Ok(())
/// # }
/// ```
pub fn channel<K, S>() -> (DiscoveryHandle<K, S>, ChannelDiscover<K, S>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        DiscoveryHandle { tx },
        ChannelDiscover {
            rx,
            known: HashSet::new(),
            pending: VecDeque::new(),
            empty_pending: false,
        },
    )
}

enum Update<K, S> {
    Insert(K, S),
    Remove(K),
    ReplaceAll(Vec<(K, S)>),
}

/// Pushes endpoint changes to a balancer; see [`channel`].
pub struct DiscoveryHandle<K, S> {
    tx: mpsc::UnboundedSender<Update<K, S>>,
}

impl<K, S> DiscoveryHandle<K, S> {
    /// Adds an endpoint, or replaces the service of a known key (the old
    /// service drains).
    pub fn insert(&self, key: K, service: S) -> Result<(), DiscoveryClosed> {
        self.send(Update::Insert(key, service))
    }

    /// Removes an endpoint; its in-flight requests finish. Removing an
    /// unknown key does nothing.
    pub fn remove(&self, key: K) -> Result<(), DiscoveryClosed> {
        self.send(Update::Remove(key))
    }

    /// Makes `endpoints` the whole set: keys not in it are removed, new keys
    /// are inserted, and keys already present keep their current service and
    /// load state (the service given here for them is dropped). With a key
    /// given twice, the last one counts.
    pub fn replace_all<I>(&self, endpoints: I) -> Result<(), DiscoveryClosed>
    where
        I: IntoIterator<Item = (K, S)>,
    {
        self.send(Update::ReplaceAll(endpoints.into_iter().collect()))
    }

    /// True once the balancer consuming the stream is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn send(&self, update: Update<K, S>) -> Result<(), DiscoveryClosed> {
        self.tx.send(update).map_err(|_| DiscoveryClosed(()))
    }
}

impl<K, S> Clone for DiscoveryHandle<K, S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K, S> std::fmt::Debug for DiscoveryHandle<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The discovery stream returned by [`channel`]; give it to the balancer.
pub struct ChannelDiscover<K, S> {
    rx: mpsc::UnboundedReceiver<Update<K, S>>,
    /// Keys inserted and not removed, so `replace_all` can emit the removals.
    known: HashSet<K>,
    /// Changes expanded from a `replace_all`, not yet yielded.
    pending: VecDeque<Change<K, S>>,
    /// A `replace_all` left the set empty: say so once `pending` is out.
    empty_pending: bool,
}

impl<K, S> ChannelDiscover<K, S>
where
    K: Hash + Eq + Clone,
{
    /// New keys are inserted before missing ones are removed, so that a
    /// balancer applying the changes in several batches never sees a set
    /// smaller than the old and new ones.
    fn expand_replace_all(&mut self, endpoints: Vec<(K, S)>) {
        let wanted: HashMap<K, S> = endpoints.into_iter().collect();
        let gone: Vec<K> = self
            .known
            .iter()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        for (key, service) in wanted {
            if self.known.insert(key.clone()) {
                self.pending.push_back(Change::Insert(key, service));
            }
        }
        for key in gone {
            self.known.remove(&key);
            self.pending.push_back(Change::Remove(key));
        }
        self.empty_pending = self.known.is_empty();
        self.shrink_known();
    }

    /// Gives back the memory of a set that was much larger.
    fn shrink_known(&mut self) {
        if let Some(capacity) = shrink_target(self.known.len(), self.known.capacity()) {
            self.known.shrink_to(capacity);
        }
    }
}

// No field is ever pinned, so the stream can move whatever K and S are.
impl<K, S> Unpin for ChannelDiscover<K, S> {}

impl<K, S> Stream for ChannelDiscover<K, S>
where
    K: Hash + Eq + Clone,
{
    /// Never fails: the only error is the [`Empty`] answer of a
    /// `replace_all` with nothing.
    type Item = Result<Change<K, S>, Empty>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if std::mem::take(&mut self.empty_pending) {
                let reason = "the discovery channel's set was replaced with an empty one";
                return Poll::Ready(Some(Err(Empty::new(reason))));
            }
            // A large `replace_all` is over: give its queue back.
            if self.pending.capacity() > 1024 {
                self.pending.shrink_to_fit();
            }
            // `try_recv` first: `poll_recv` spends tokio's cooperative
            // budget, which would hand the balancer at most 128 changes per
            // turn of its task, and a busy producer would run ahead of it.
            // The balancer yields after a batch of its own.
            let update = match self.rx.try_recv() {
                Ok(update) => update,
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => match self.rx.poll_recv(cx) {
                    Poll::Ready(Some(update)) => update,
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                },
            };
            match update {
                Update::Insert(key, service) => {
                    self.known.insert(key.clone());
                    return Poll::Ready(Some(Ok(Change::Insert(key, service))));
                }
                Update::Remove(key) => {
                    self.known.remove(&key);
                    self.shrink_known();
                    return Poll::Ready(Some(Ok(Change::Remove(key))));
                }
                Update::ReplaceAll(endpoints) => self.expand_replace_all(endpoints),
            }
        }
    }
}

impl<K, S> std::fmt::Debug for ChannelDiscover<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDiscover")
            .field("known", &self.known.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// The balancer that consumed the discovery stream is gone, so the change was
/// not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the balancer consuming this discovery channel is gone")]
pub struct DiscoveryClosed(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// The changes the stream yields until it goes quiet, in order (an
    /// [`Empty`] answer as "none").
    async fn drain(stream: &mut ChannelDiscover<&'static str, u32>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(Some(item)) = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)),
        )
        .await
        {
            seen.push(match item {
                Ok(Change::Insert(k, s)) => format!("+{k}={s}"),
                Ok(Change::Remove(k)) => format!("-{k}"),
                Err(_) => "none".to_owned(),
            });
        }
        seen
    }

    async fn drain_sorted(stream: &mut ChannelDiscover<&'static str, u32>) -> Vec<String> {
        let mut seen = drain(stream).await;
        seen.sort();
        seen
    }

    #[tokio::test]
    async fn replace_all_removes_missing_inserts_new_and_keeps_present() {
        let (handle, mut stream) = channel();
        handle.insert("a", 1).unwrap();
        handle.insert("b", 2).unwrap();
        assert_eq!(drain_sorted(&mut stream).await, ["+a=1", "+b=2"]);

        handle.replace_all([("b", 20), ("c", 3)]).unwrap();
        assert_eq!(drain_sorted(&mut stream).await, ["+c=3", "-a"]);
    }

    #[tokio::test]
    async fn replace_all_inserts_before_it_removes() {
        let (handle, mut stream) = channel();
        handle.insert("a", 1).unwrap();
        handle.insert("b", 2).unwrap();
        drain(&mut stream).await;
        handle.replace_all([("c", 3), ("d", 4)]).unwrap();
        let kinds: Vec<char> = drain(&mut stream)
            .await
            .iter()
            .filter_map(|change| change.chars().next())
            .collect();
        assert_eq!(kinds, ['+', '+', '-', '-']);
    }

    #[tokio::test]
    async fn replace_all_with_an_empty_set_removes_everything_then_says_none_are_left() {
        let (handle, mut stream) = channel();
        handle.insert("a", 1).unwrap();
        handle.insert("b", 2).unwrap();
        drain(&mut stream).await;
        handle.replace_all([]).unwrap();
        let seen = drain(&mut stream).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[2], "none");
    }

    #[tokio::test]
    async fn replace_all_with_an_empty_set_at_startup_says_none_are_left() {
        let (handle, mut stream) = channel::<&str, u32>();
        handle.replace_all([]).unwrap();
        assert_eq!(drain(&mut stream).await, ["none"]);
    }

    #[tokio::test]
    async fn a_replace_all_that_shrinks_the_set_gives_memory_back() {
        let (handle, mut stream) = channel::<u32, u32>();
        handle
            .replace_all((0..20_000).map(|k| (k, k)))
            .expect("the stream is alive");
        for _ in 0..20_000 {
            poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await;
        }
        let largest = stream.known.capacity();
        handle
            .replace_all((0..10).map(|k| (k, k)))
            .expect("the stream is alive");
        poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await;
        assert!(
            stream.known.capacity() <= largest / 2,
            "{} slots for 10 keys, {largest} at 20,000",
            stream.known.capacity()
        );
    }

    #[tokio::test]
    async fn stream_ends_when_every_handle_is_dropped() {
        let (handle, mut stream) = channel::<&str, u32>();
        drop(handle);
        let next = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await;
        assert!(next.is_none());
    }

    #[test]
    fn pushing_after_the_stream_is_gone_says_so() {
        let (handle, stream) = channel::<&str, u32>();
        drop(stream);
        let err = handle.insert("a", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the balancer consuming this discovery channel is gone"
        );
        assert!(handle.is_closed());
    }
}
