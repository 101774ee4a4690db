//! Subsetting: each client of a fleet talks to a few of the backends.

use std::collections::VecDeque;
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use indexmap::{IndexMap, IndexSet};
use pin_project_lite::pin_project;
use tower::discover::{Change, Discover};

use crate::request::stable_hash;
use crate::setting::{self, InvalidSetting};

/// Which backends of a discovery stream one client of a fleet uses: a
/// deterministic aperture (Finagle's) or a random subset (gRPC's A68).
///
/// With 200 clients each balancing over all of 100 backends there are
/// 20,000 connections, every backend holds 200, and each connection
/// carries a trickle. With subsets of 10 there are 2,000 (90 % fewer).
/// What matters then is that the subsets together load every backend
/// alike, and that a change of backends moves few connections.
///
/// - [`Subset::aperture`]: Finagle's deterministic aperture. The backends
///   are ordered by a hash of their keys (the one that places endpoints on
///   [`RingHash`](crate::strategy::RingHash)'s ring: xxHash64, the same on
///   every platform) and laid on a ring, the clients are spread evenly over the same
///   ring, and client `i` of `n` takes the `size` backends from position
///   `i x backends / n` on. Every backend is then in as many subsets as
///   any other, to within one (exactly when `size x clients / backends`
///   is a whole number): connections and load are even. Each client must know its index and the fleet's size (a
///   StatefulSet ordinal and its replica count, say). A change of backends
///   shifts the positions after it, so some clients trade an edge backend
///   as well as the one that changed.
/// - [`Subset::random`]: gRPC's random subsetting (A68). Each backend
///   scores `hash(seed, key)` and the client keeps the `size` highest.
///   Nothing to coordinate (a random seed per client will do), and a
///   change of backends moves only the subsets that held or now win the
///   backend that changed; but the subsets overlap at random, so some
///   backends are in more of them than others (with 200 clients, 100
///   backends and subsets of 10: 20 on average, up to 30 or more).
///
/// A `size` of at least the number of backends keeps them all. Both are
/// functions of the set alone, so the subset is the same whatever order
/// discovery announced the backends in, and every client of the fleet must
/// use the same keys for the same backends (their addresses, say).
///
/// ```
/// use tower_lb::discover::{self, Subset};
/// # fn main() -> Result<(), tower_lb::error::InvalidSetting> {
/// # let addrs: Vec<std::net::SocketAddr> = Vec::new();
/// // The third of 200 replicas, 10 backends each.
/// let endpoints = Subset::aperture(2, 200, 10)?
///     .discover(discover::fixed(addrs.iter().map(|&addr| (addr, addr))));
/// # let _ = endpoints;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subset {
    rule: Rule,
    size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Aperture { client: u64, clients: u64 },
    Random { seed: u64 },
}

impl Subset {
    /// Finagle's deterministic aperture: client `client` of `clients`
    /// (numbered from 0) takes `size` backends, so that every backend is in
    /// as many subsets as any other. When the clients are too few to cover
    /// every backend with `size` each, each takes more:
    /// `ceil(backends / clients)`.
    ///
    /// Errors when `clients` or `size` is 0, or `client` is not below
    /// `clients`.
    pub fn aperture(client: u32, clients: u32, size: u32) -> Result<Self, InvalidSetting> {
        let clients = setting::at_least_one("Subset::aperture clients", clients)?;
        setting::check(
            "Subset::aperture client",
            client,
            client < clients,
            "below the number of clients (clients are numbered from 0)",
        )?;
        let size = setting::at_least_one("Subset::aperture size", size)?;
        Ok(Self {
            rule: Rule::Aperture {
                client: u64::from(client),
                clients: u64::from(clients),
            },
            size: size as usize,
        })
    }

    /// gRPC's random subsetting (A68): the `size` backends that score
    /// highest for `seed` (rendezvous hashing). Give each client a seed of
    /// its own, random or derived from its name.
    ///
    /// Errors when `size` is 0.
    pub fn random(seed: u64, size: u32) -> Result<Self, InvalidSetting> {
        let size = setting::at_least_one("Subset::random size", size)?;
        Ok(Self {
            rule: Rule::Random { seed },
            size: size as usize,
        })
    }

    /// Passes on, of what `discover` finds, only the backends of this
    /// client's subset; see [`SubsetDiscover`].
    pub fn discover<D>(self, discover: D) -> SubsetDiscover<D>
    where
        D: Discover,
    {
        SubsetDiscover {
            inner: discover,
            subset: self,
            all: IndexMap::new(),
            members: IndexSet::new(),
            queued: VecDeque::new(),
            error: None,
            ended: false,
        }
    }

    /// The subset of `keys`, as indices into it.
    fn members<K: Hash>(&self, keys: &[&K]) -> Vec<usize> {
        let n = keys.len();
        if n <= self.size {
            return (0..n).collect();
        }
        match self.rule {
            Rule::Aperture { client, clients } => {
                // The ring's order: by stable hash, every client the same.
                let mut ring: Vec<(u64, usize)> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, key)| (stable_hash(key), i))
                    .collect();
                ring.sort_unstable();
                let backends = n as u64;
                // Too few clients to cover the ring with `size` each.
                let size = (self.size as u64).max(backends.div_ceil(clients));
                // `client < clients` and `n` fits a `usize`: no overflow
                // in 128 bits, and the start is below `n`.
                let start =
                    (u128::from(client) * u128::from(backends) / u128::from(clients)) as u64;
                (0..size.min(backends))
                    .map(|offset| ring[((start + offset) % backends) as usize].1)
                    .collect()
            }
            Rule::Random { seed } => {
                let mut scored: Vec<(u64, usize)> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, key)| (stable_hash(&(seed, key)), i))
                    .collect();
                // Highest scores first; the subset is the first `size`.
                scored.sort_unstable_by(|a, b| b.cmp(a));
                scored.truncate(self.size);
                scored.into_iter().map(|(_, i)| i).collect()
            }
        }
    }
}

/// Changes taken from the inner stream before the subset is worked out
/// again and the task yields.
const MAX_BATCH: usize = 1024;

pin_project! {
    /// A discovery stream that passes on only one client's
    /// [`Subset`] of the backends another stream finds: made by
    /// [`Subset::discover`].
    ///
    /// It keeps every backend the inner stream announced (so services
    /// must be `Clone`: a backend leaving the subset and coming back is
    /// announced again), and after each batch of changes (what the inner
    /// stream has ready) works out the subset again and announces the
    /// difference: the backends that joined first, then those that left,
    /// so that a balancer never sees its set empty in between. A new
    /// service for a backend in the subset is passed on; errors (an
    /// [`Empty`](crate::discover::Empty) answer among them) are passed on
    /// after the changes before them, and the stream ends when the inner
    /// one does.
    pub struct SubsetDiscover<D: Discover> {
        #[pin]
        inner: D,
        subset: Subset,
        all: IndexMap<D::Key, D::Service>,
        // In the subset's order (ring or score), so that removals are
        // announced in the same order in every process: the balancer's
        // endpoint order, and so a seeded balancer's picks, follow it.
        members: IndexSet<D::Key>,
        queued: VecDeque<Change<D::Key, D::Service>>,
        error: Option<D::Error>,
        ended: bool,
    }
}

impl<D: Discover> SubsetDiscover<D>
where
    D::Key: Hash + Eq,
{
    /// The keys of the backends in the subset, as last worked out (the
    /// balancer may not have been told of the latest changes yet).
    pub fn members(&self) -> impl Iterator<Item = &D::Key> {
        self.members.iter()
    }

    /// How many backends the inner stream has announced, in the subset or
    /// not.
    pub fn discovered(&self) -> usize {
        self.all.len()
    }
}

impl<D> fmt::Debug for SubsetDiscover<D>
where
    D: Discover + fmt::Debug,
    D::Key: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubsetDiscover")
            .field("inner", &self.inner)
            .field("subset", &self.subset)
            .field("members", &self.members)
            .field("discovered", &self.all.len())
            .finish_non_exhaustive()
    }
}

impl<D> Stream for SubsetDiscover<D>
where
    D: Discover,
    D::Key: Hash + Eq + Clone,
    D::Service: Clone,
{
    type Item = Result<Change<D::Key, D::Service>, D::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(change) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if let Some(error) = this.error.take() {
                return Poll::Ready(Some(Err(error)));
            }
            if *this.ended {
                return Poll::Ready(None);
            }
            // What the inner stream has ready (up to a batch), then the
            // subset once.
            let mut set_changed = false;
            let mut batch = 0;
            loop {
                if batch == MAX_BATCH {
                    // A stream that is always ready must not keep this task:
                    // the rest waits for the next poll.
                    cx.waker().wake_by_ref();
                    break;
                }
                batch += 1;
                match this.inner.as_mut().poll_discover(cx) {
                    Poll::Ready(Some(Ok(Change::Insert(key, service)))) => {
                        if this.members.contains(&key) {
                            this.queued
                                .push_back(Change::Insert(key.clone(), service.clone()));
                        }
                        set_changed |= this.all.insert(key, service).is_none();
                    }
                    Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                        set_changed |= this.all.swap_remove(&key).is_some();
                    }
                    Poll::Ready(Some(Err(error))) => {
                        *this.error = Some(error);
                        break;
                    }
                    Poll::Ready(None) => {
                        *this.ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if set_changed {
                let keys: Vec<&D::Key> = this.all.keys().collect();
                let now: IndexSet<D::Key> = this
                    .subset
                    .members(&keys)
                    .into_iter()
                    .map(|i| keys[i].clone())
                    .collect();
                for key in now.iter() {
                    if !this.members.contains(key) {
                        if let Some(service) = this.all.get(key) {
                            this.queued
                                .push_back(Change::Insert(key.clone(), service.clone()));
                        }
                    }
                }
                for key in this.members.iter() {
                    if !now.contains(key) {
                        this.queued.push_back(Change::Remove(key.clone()));
                    }
                }
                *this.members = now;
            }
            if this.queued.is_empty() && this.error.is_none() && !*this.ended {
                // Nothing to say yet: the inner stream is pending (it will
                // wake this task), or a full batch changed nothing (woken
                // above).
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(subset: Subset, keys: &[u32]) -> Vec<u32> {
        let refs: Vec<&u32> = keys.iter().collect();
        let mut picked: Vec<u32> = subset.members(&refs).into_iter().map(|i| keys[i]).collect();
        picked.sort_unstable();
        picked
    }

    /// How many of `clients` subsets each of `backends` is in.
    fn coverage(subset_of: impl Fn(u32) -> Subset, clients: u32, backends: &[u32]) -> Vec<usize> {
        let mut count = vec![0; backends.len()];
        for client in 0..clients {
            for key in members(subset_of(client), backends) {
                count[key as usize] += 1;
            }
        }
        count
    }

    #[test]
    fn every_backend_is_in_as_many_apertures_when_the_clients_are_a_multiple_of_the_backends() {
        let backends: Vec<u32> = (0..100).collect();
        let count = coverage(
            |c| Subset::aperture(c, 200, 10).expect("valid"),
            200,
            &backends,
        );
        assert!(count.iter().all(|&n| n == 20), "{count:?}");
    }

    #[test]
    fn apertures_cover_backends_within_one_of_each_other_otherwise() {
        let backends: Vec<u32> = (0..90).collect();
        let count = coverage(
            |c| Subset::aperture(c, 200, 10).expect("valid"),
            200,
            &backends,
        );
        let (min, max) = (count.iter().min(), count.iter().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 1),
            "{count:?}"
        );
    }

    #[test]
    fn too_few_clients_each_take_more_so_that_every_backend_is_covered() {
        let backends: Vec<u32> = (0..100).collect();
        let count = coverage(|c| Subset::aperture(c, 4, 10).expect("valid"), 4, &backends);
        assert!(count.iter().all(|&n| n == 1), "{count:?}");
    }

    #[test]
    fn a_subset_depends_on_the_set_not_the_order_it_was_announced_in() {
        let forward: Vec<u32> = (0..50).collect();
        let backward: Vec<u32> = (0..50).rev().collect();
        for subset in [
            Subset::aperture(3, 20, 5).expect("valid"),
            Subset::random(42, 5).expect("valid"),
        ] {
            assert_eq!(members(subset, &forward), members(subset, &backward));
            assert_eq!(members(subset, &forward).len(), 5);
        }
    }

    #[test]
    fn a_random_subset_keeps_its_members_when_another_backend_goes() {
        let subset = Subset::random(7, 10).expect("valid");
        let all: Vec<u32> = (0..100).collect();
        let before = members(subset, &all);
        let outsider = (0..100)
            .find(|k| !before.contains(k))
            .expect("one left out");
        let fewer: Vec<u32> = all.iter().copied().filter(|&k| k != outsider).collect();
        assert_eq!(members(subset, &fewer), before);
    }

    #[test]
    fn random_seeds_give_different_subsets() {
        let all: Vec<u32> = (0..100).collect();
        let a = members(Subset::random(1, 10).expect("valid"), &all);
        let b = members(Subset::random(2, 10).expect("valid"), &all);
        assert_ne!(a, b);
    }

    #[test]
    fn a_subset_as_large_as_the_set_keeps_every_backend() {
        let all: Vec<u32> = (0..8).collect();
        for subset in [
            Subset::aperture(0, 3, 8).expect("valid"),
            Subset::random(0, 20).expect("valid"),
        ] {
            assert_eq!(members(subset, &all), all);
        }
    }

    use crate::discover::{channel, ChannelDiscover, DiscoveryHandle};
    use std::future::poll_fn;

    type Subsetted = SubsetDiscover<ChannelDiscover<u32, &'static str>>;

    /// A stream over the subset of size 2 that client 0 of 5 takes, fed
    /// by the returned handle.
    fn subsetted() -> (DiscoveryHandle<u32, &'static str>, Subsetted) {
        let (handle, stream) = channel();
        let subset = Subset::aperture(0, 5, 2).expect("valid");
        (handle, subset.discover(stream))
    }

    /// [`subsetted`] after ten backends (0 to 9, service "v1") were
    /// announced and the stream has passed on its subset of them.
    async fn ten_announced() -> (DiscoveryHandle<u32, &'static str>, Subsetted) {
        let (handle, mut stream) = subsetted();
        for key in 0..10 {
            handle.insert(key, "v1").expect("open");
        }
        drain(&mut stream).await;
        (handle, stream)
    }

    /// The changes the stream yields until it goes quiet or ends, in order
    /// (an error as "error", the end as "end").
    async fn drain(stream: &mut Subsetted) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(item) = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)),
        )
        .await
        {
            seen.push(match item {
                Some(Ok(Change::Insert(k, s))) => format!("+{k}={s}"),
                Some(Ok(Change::Remove(k))) => format!("-{k}"),
                Some(Err(_)) => "error".to_owned(),
                None => {
                    seen.push("end".to_owned());
                    break;
                }
            });
        }
        seen
    }

    /// The members of the stream's subset, sorted.
    fn subset_of(stream: &Subsetted) -> Vec<u32> {
        let mut keys: Vec<u32> = stream.members().copied().collect();
        keys.sort_unstable();
        keys
    }

    #[tokio::test]
    async fn only_the_members_of_the_subset_are_announced() {
        let (handle, mut stream) = subsetted();
        for key in 0..10 {
            handle.insert(key, "v1").expect("open");
        }
        let mut seen = drain(&mut stream).await;
        seen.sort();
        let expected: Vec<String> = subset_of(&stream)
            .iter()
            .map(|k| format!("+{k}=v1"))
            .collect();
        assert_eq!(seen, expected);
        assert_eq!((expected.len(), stream.discovered()), (2, 10));
    }

    #[tokio::test]
    async fn a_member_that_leaves_is_replaced_by_the_next_and_the_newcomer_comes_first() {
        let (handle, mut stream) = ten_announced().await;
        let before = subset_of(&stream);
        handle.remove(before[0]).expect("open");
        let seen = drain(&mut stream).await;
        let after = subset_of(&stream);
        let newcomer = after
            .iter()
            .find(|k| !before.contains(k))
            .expect("a newcomer");
        assert_eq!(seen, [format!("+{newcomer}=v1"), format!("-{}", before[0])]);
    }

    #[tokio::test]
    async fn changes_outside_the_subset_announce_nothing() {
        let (handle, mut stream) = ten_announced().await;
        let before = subset_of(&stream);
        let outsider = (0..10).find(|k| !before.contains(k)).expect("an outsider");
        handle.insert(outsider, "v2").expect("open");
        assert_eq!(drain(&mut stream).await, Vec::<String>::new());
        // A new service for a member is passed on.
        handle.insert(before[1], "v2").expect("open");
        assert_eq!(drain(&mut stream).await, [format!("+{}=v2", before[1])]);
    }

    #[tokio::test]
    async fn errors_and_the_end_are_passed_on_after_the_changes_before_them() {
        let (handle, mut stream) = subsetted();
        handle.insert(1, "v1").expect("open");
        assert_eq!(drain(&mut stream).await, ["+1=v1"]);
        handle.replace_all([]).expect("open");
        drop(handle);
        // Out, then "none found", then the end.
        assert_eq!(drain(&mut stream).await, ["-1", "error", "end"]);
    }

    /// A stream that always has another backend ready.
    struct Endless(u32);

    impl Stream for Endless {
        type Item = Result<Change<u32, &'static str>, std::convert::Infallible>;

        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0 += 1;
            Poll::Ready(Some(Ok(Change::Insert(self.0, "v1"))))
        }
    }

    #[test]
    fn a_stream_that_is_always_ready_does_not_keep_the_task() {
        let mut stream = Subset::random(1, 2).expect("valid").discover(Endless(0));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Each poll returns: a change, or a pause after a full batch.
        for _ in 0..10 {
            let _ = Pin::new(&mut stream).poll_next(&mut cx);
        }
        assert!(stream.discovered() <= 10 * MAX_BATCH);
    }

    #[test]
    fn settings_that_cannot_be_used_are_refused_with_what_they_must_be() {
        let error = Subset::aperture(5, 5, 10).expect_err("client 5 of 5");
        assert_eq!(error.setting(), "Subset::aperture client");
        assert!(Subset::aperture(0, 0, 10).is_err());
        assert!(Subset::aperture(0, 1, 0).is_err());
        let error = Subset::random(0, 0).expect_err("size 0");
        assert_eq!(
            error.to_string(),
            "invalid setting Subset::random size = 0: it must be 1 or more"
        );
    }
}
