//! The balancer: a cheap `Clone` handle that many tasks pick through at once.
//!
//! # How it works
//!
//! The endpoints live in an immutable snapshot published through
//! [`arc_swap::ArcSwap`]; each endpoint's load is a handful of atomics. A
//! request loads the snapshot (no lock), asks the [`Strategy`] for an index,
//! counts itself in flight on that endpoint, clones the endpoint's service and
//! drives it (`ready`, then `call`) inside its [`ResponseFuture`]. Nothing on
//! that path locks or allocates, so clones of one [`Balancer`] scale across
//! threads without a [`Buffer`].
//!
//! A driver task, spawned when the balancer is built, consumes the discovery
//! stream and publishes new snapshots. It ends when the last handle drops.
//!
//! [`Buffer`]: https://docs.rs/tower/0.5/tower/buffer/struct.Buffer.html

mod builder;
mod driver;
mod endpoint;
mod future;
mod snapshot;
mod tried;

pub use self::builder::{
    Builder, Describe, MetadataFn, NoStaticWeights, StaticWeights, WeightsOnly,
};
pub use self::endpoint::{EndpointState, EndpointStats};
pub use self::future::ResponseFuture;
pub use self::tried::{CallHints, NoHints, RequestHints};

pub(crate) use self::endpoint::Endpoint;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tower::discover::Discover;
use tower::Service;

use self::endpoint::{InFlight, Refused, Shared};
use self::future::{Dispatched, EndpointCall};
use self::snapshot::{EndpointList, Group, Level, Snapshot};
use crate::classify::{Classify, ErrorsAsFailures};
use crate::error::BoxError;
use crate::error::Empty;
use crate::strategy::{P2c, PickContext, Strategy};
use crate::topology::zone::WHOLE;
use crate::Error;

/// A load balancer over a changing set of endpoints: a [`tower::Service`]
/// that sends each request to one endpoint picked by its strategy `P`.
///
/// `K` is the discovery key of an endpoint (an address, say), `S` its service
/// (a hyper-util client bound to that address, a tonic `Channel`, ...). `S`
/// must be `Clone`: the balancer clones it for each request, so it should be a
/// cheap handle.
///
/// `Balancer` itself is a cheap `Clone` handle; all clones share one set of
/// endpoints and pick concurrently.
///
/// `poll_ready` is always ready (unless the balancer is closed). A request
/// that arrives before discovery has produced any endpoint waits for one, up to
/// the [startup wait](Builder::startup_wait), and then fails with
/// [`Error::NoEndpoints`]. That wait lives in the response future rather than
/// in `poll_ready`, because tower treats an error from `poll_ready` as the end
/// of a service (`Buffer`, for one, would never recover). Once discovery has
/// said there are no endpoints (its stream ended empty, it removed them all,
/// or it yielded an [`Empty`] answer), requests fail
/// at once with [`Error::DiscoveredNone`] instead, until an endpoint is
/// inserted: see [the discovery docs](crate::discover).
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceExt};
/// use tower_lb::{discover, Balancer, strategy::RoundRobin};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::Error> {
/// let endpoints = (0..3).map(|i| {
///     let svc = service_fn(move |req: u32| async move { Ok::<_, Infallible>(req + i) });
///     (i, svc)
/// });
/// let balancer = Balancer::builder()
///     .strategy(RoundRobin::new())
///     .build(discover::fixed(endpoints));
///
/// let answer = balancer.clone().oneshot(10).await?;
/// assert!((10..13).contains(&answer));
/// # Ok(())
/// # }
/// ```
pub struct Balancer<K, S, P = P2c, C = ErrorsAsFailures, H = NoHints>
where
    P: Strategy,
{
    inner: Arc<Inner<K, S, P, C, H>>,
}

pub(crate) struct Inner<K, S, P: Strategy, C, H> {
    snapshot: ArcSwap<Snapshot<K, S, P::Schedule>>,
    strategy: P,
    shared: Arc<Shared>,
    /// Bumped on every publish and on close; requests in the startup wait
    /// watch it.
    published: watch::Sender<u64>,
    /// Set by the driver while discovery says there are no endpoints: why.
    /// Read only by requests that found no endpoint to pick.
    discovered_none: ArcSwapOption<Empty>,
    startup_wait: Duration,
    /// Decides what counts as a failure of an endpoint.
    classify: C,
    /// Reads the endpoints a request's call has tried.
    hints: H,
    /// Dropped by `close`, or with the last handle: either stops the
    /// driver. (A lock, taken once by `close` and never by requests.)
    stop_driver: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

/// What happened when a request tried to pick an endpoint.
enum Dispatch<K, S, Req>
where
    S: Service<Req>,
{
    Sent(Dispatched<K, S, Req>),
    NoEndpoints(Req),
    Failed(Error),
}

/// How much slower than the other zone's pick (beyond the spill factor) the
/// local pick must be before a request spills: Peak-EWMA estimates jump to
/// every slow response and decay over seconds, so on fast services one
/// stray millisecond-scale answer would otherwise send the zone's requests
/// away for seconds.
const SPILL_MARGIN_NS: f64 = 5_000_000.0;

/// Picks that may land on an endpoint taken out of service since the
/// snapshot was published before the balancer scans for one in service.
const REPICKS: usize = 2;

impl<K, S, P: Strategy, C, H> Inner<K, S, P, C, H> {
    /// What requests that find no endpoint do: fail at once with `reason`,
    /// or (`None`) wait for one. Those already waiting look again.
    fn set_discovered_none(&self, reason: Option<Empty>) {
        self.discovered_none.store(reason.map(Arc::new));
        self.published.send_modify(|generation| *generation += 1);
    }

    fn dispatch<Req>(&self, req: Req) -> Dispatch<K, S, Req>
    where
        S: Service<Req> + Clone,
        H: RequestHints<Req>,
    {
        let shared = &self.shared;
        if shared.is_closed() {
            return Dispatch::Failed(Error::Closed);
        }
        let snapshot = self.snapshot.load();
        if snapshot.is_empty() {
            if snapshot.awaiting_checks {
                return Dispatch::NoEndpoints(req);
            }
            if !snapshot.out_of_service.is_empty() {
                return Dispatch::Failed(out_of_service(&snapshot.out_of_service));
            }
            // Read after the snapshot: the driver sets it after publishing
            // an empty set and clears it before publishing a non-empty one,
            // so a request never fails for a reason that is out of date.
            if let Some(reason) = self.discovered_none.load_full() {
                return Dispatch::Failed(Error::DiscoveredNone {
                    reason: Empty::clone(&reason),
                });
            }
            return Dispatch::NoEndpoints(req);
        }
        let start_ns = shared.request_start();
        // Borrowed from `req`: read and recorded before `req` moves into
        // the call, so no reference count is taken.
        let (tried, hash_key) = self.hints.read(&req);
        // The first attempt has nothing to avoid but must still be recorded.
        let avoid = tried.filter(|t| !t.is_empty());
        // A retry must not take a round-robin turn (see `is_retry`).
        let ctx = shared
            .request_pick_context(start_ns)
            // `avoid` is there exactly when an attempt was made: a retry.
            .with_attempt(avoid.map_or(0, |t| u32::try_from(t.attempts()).unwrap_or(u32::MAX)))
            .with_hash_key(hash_key);
        let level = snapshot.level(&ctx);
        let mut group = level.group(&ctx);
        if let (true, Some(now_ns)) = (group.local, start_ns) {
            group = self.spill(level, group, now_ns, &ctx);
        }
        let eligible = &group.eligible[..];
        let untried = |e: &Endpoint<K, S>| avoid.is_none_or(|t| !t.contains(e.id()));
        // The snapshot leaves ejected endpoints out (unless in panic mode),
        // but one can trip between two snapshots; and a retry should not go
        // back to an endpoint its call tried. Pick again, and after `REPICKS`
        // tries take the next endpoint that suits.
        let avoid_ejected = !level.panic;
        let mut attempt = 0;
        loop {
            let picked = self
                .strategy
                .pick(&group.schedule, eligible, &ctx)
                .filter(|&i| i < eligible.len());
            let Some(mut index) = picked else {
                return Dispatch::Failed(Error::NoPick {
                    endpoints: eligible.len(),
                });
            };
            let last_try = attempt == REPICKS;
            if last_try {
                index = next_suitable(eligible, index, untried);
            } else if !untried(&eligible[index]) {
                attempt += 1;
                continue;
            }
            let endpoint = &eligible[index];
            match InFlight::start(endpoint.clone(), start_ns, avoid_ejected && !last_try) {
                Ok(guard) => {
                    if let Some(tried) = tried {
                        tried.record(endpoint.id());
                    }
                    let call = EndpointCall::start(endpoint.service().clone(), req);
                    return Dispatch::Sent((call, guard));
                }
                Err(Refused::Closed) => return Dispatch::Failed(Error::Closed),
                // Removed while we picked it (a race of nanoseconds): the slow
                // path picks again from the snapshot that no longer has it.
                Err(Refused::Draining) => return Dispatch::NoEndpoints(req),
                Err(Refused::Ejected) => attempt += 1,
            }
        }
    }

    /// Zone-aware routing's load-aware spill: the group of another zone
    /// when the strategy's pick in the local `group` has a latency estimate
    /// more than the level's factor times its pick's there, else `group`.
    fn spill<'a, Sch>(
        &self,
        level: &'a Level<K, S, Sch>,
        group: &'a Group<K, S, Sch>,
        now_ns: u64,
        ctx: &PickContext<'_>,
    ) -> &'a Group<K, S, Sch>
    where
        P: Strategy<Schedule = Sch>,
    {
        let Some((remote, factor)) = level.spill_target(ctx) else {
            return group;
        };
        let rtt = |group: &Group<K, S, Sch>| {
            let i = self
                .strategy
                .pick(&group.schedule, &group.eligible[..], ctx)
                .filter(|&i| i < group.eligible.len())?;
            let load = group.eligible[i].load();
            Some(load.rtt_estimate_ns(now_ns, &self.shared.rtt))
        };
        match (rtt(group), rtt(remote)) {
            (Some(local), Some(other)) if local > factor * other + SPILL_MARGIN_NS => remote,
            _ => group,
        }
    }

    /// The startup wait: dispatches as soon as an endpoint is published, or
    /// fails after `startup_wait`.
    async fn dispatch_when_ready<Req>(
        self: Arc<Self>,
        mut req: Req,
    ) -> Result<Dispatched<K, S, Req>, Error>
    where
        S: Service<Req> + Clone,
        H: RequestHints<Req>,
    {
        let started = Instant::now();
        let deadline = started.checked_add(self.startup_wait);
        // Subscribed before looking, so a publish in between is not missed.
        let mut published = self.published.subscribe();
        loop {
            match self.dispatch(req) {
                Dispatch::Sent(dispatched) => return Ok(dispatched),
                Dispatch::Failed(error) => return Err(error),
                Dispatch::NoEndpoints(back) => req = back,
            }
            match until(deadline, published.changed()).await {
                Some(Ok(())) => continue,
                Some(Err(_)) | None => {
                    return Err(Error::NoEndpoints {
                        waited: started.elapsed(),
                    })
                }
            }
        }
    }
}

/// Why there is nowhere to send a request when every endpoint in the set
/// is out of service.
fn out_of_service<K, S>(endpoints: &[Arc<Endpoint<K, S>>]) -> Error {
    let failing_checks = endpoints.iter().filter(|e| e.fails_check()).count();
    match failing_checks {
        0 => Error::AllEjected {
            endpoints: endpoints.len(),
        },
        _ => Error::AllOutOfService {
            endpoints: endpoints.len(),
            failing_checks,
        },
    }
}

/// The first endpoint from `from` on (cyclically) that is in service and
/// `untried`, else the first in service, else `from` itself.
fn next_suitable<K, S>(
    eligible: &[Arc<Endpoint<K, S>>],
    from: usize,
    untried: impl Fn(&Endpoint<K, S>) -> bool,
) -> usize {
    let cycle = || (0..eligible.len()).map(|step| (from + step) % eligible.len());
    cycle()
        .find(|&i| eligible[i].is_in_service() && untried(&eligible[i]))
        .or_else(|| cycle().find(|&i| eligible[i].is_in_service()))
        .unwrap_or(from)
}

impl Balancer<(), (), P2c> {
    /// A builder with the defaults: [`P2c::peak_ewma`], a 5 s startup wait,
    /// Linkerd's latency-estimate settings, every error a failure and no
    /// outlier detection.
    pub fn builder() -> Builder<P2c> {
        Builder::new()
    }
}

impl<K, S, P: Strategy, C, H> Balancer<K, S, P, C, H> {
    /// A point-in-time view of every endpoint: those in service, then the
    /// ejected ones, then those still draining.
    pub fn endpoints(&self) -> Vec<EndpointStats<K>>
    where
        K: Clone,
    {
        let snapshot = self.inner.snapshot.load();
        let mut all: Vec<EndpointStats<K>> = snapshot.all().map(|e| e.stats()).collect();
        // In panic mode ejected endpoints sit among the eligible ones.
        all.sort_by_key(|e| match e.state {
            EndpointState::Active => 0,
            EndpointState::Ejected | EndpointState::Unhealthy => 1,
            _ => 2,
        });
        all
    }

    /// True while too few endpoints are in service and requests go to
    /// ejected ones too (see [`Builder::panic_threshold`]).
    pub fn is_panicking(&self) -> bool {
        self.inner.snapshot.load().panic
    }

    /// Requests in flight on all endpoints, draining ones included.
    pub fn in_flight(&self) -> usize {
        self.inner.snapshot.load().in_flight()
    }

    /// Stops taking requests: from now on `poll_ready` and `call` fail with
    /// [`Error::Closed`] (requests waiting for a first endpoint too), while
    /// requests already sent complete normally. Affects every clone.
    ///
    /// The driver task stops too, and with it discovery (a DNS discovery
    /// stops resolving), outlier detection and its timers: a closed balancer
    /// never takes a request again, so nothing it would do matters, and its
    /// logs would only be noise. [`endpoints`](Self::endpoints) shows the
    /// set as it was.
    pub fn close(&self) {
        self.inner.shared.close();
        let stop = self
            .inner
            .stop_driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(stop);
        self.inner
            .published
            .send_modify(|generation| *generation += 1);
    }

    /// True once [`close`](Self::close) or [`shutdown`](Self::shutdown) was
    /// called on any clone.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// Graceful shutdown: [`close`](Self::close)s the balancer, then waits
    /// until no request is in flight, or fails with
    /// [`Error::ShutdownTimedOut`] after `timeout`.
    ///
    /// A request counts as in flight until its response future completes,
    /// that is until the endpoint's response (for HTTP, its headers) has
    /// arrived; a response body still streaming is not waited for.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), Error> {
        self.close();
        wait_until_idle(&self.inner.shared.idle, || self.in_flight(), timeout).await
    }
}

impl<K, S, P: Strategy, C, H> Clone for Balancer<K, S, P, C, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K: fmt::Debug, S, P: Strategy + fmt::Debug, C, H> fmt::Debug for Balancer<K, S, P, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.inner.snapshot.load();
        let keys: Vec<&K> = snapshot
            .levels()
            .flat_map(|level| level.groups())
            .flat_map(|group| group.eligible.iter())
            .map(|e| e.key())
            .collect();
        f.debug_struct("Balancer")
            .field("strategy", &self.inner.strategy)
            .field("endpoints", &keys)
            .field("out_of_service", &snapshot.out_of_service.len())
            .field("panic", &snapshot.panic)
            .field("draining", &snapshot.draining.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<K, S, P, C, H, Req> Service<Req> for Balancer<K, S, P, C, H>
where
    K: fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    P: Strategy,
    C: Classify<S::Response>,
    H: RequestHints<Req>,
    Req: Send + 'static,
{
    type Response = C::Response;
    type Error = Error;
    type Future = ResponseFuture<K, S, Req, C>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.inner.shared.is_closed() {
            Poll::Ready(Err(Error::Closed))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let classify = self.inner.classify.clone();
        match self.inner.dispatch(req) {
            Dispatch::Sent(dispatched) => ResponseFuture::dispatched(dispatched, classify),
            Dispatch::Failed(error) => ResponseFuture::failed(error, classify),
            Dispatch::NoEndpoints(req) => ResponseFuture::waiting(
                Box::pin(self.inner.clone().dispatch_when_ready(req)),
                classify,
            ),
        }
    }
}

/// Waits until `open()` is 0, woken by `idle` whenever it may have dropped;
/// fails with [`Error::ShutdownTimedOut`] after `timeout`. The graceful
/// shutdown of a balancer and of the ready-made clients.
pub(crate) async fn wait_until_idle(
    idle: &Notify,
    open: impl Fn() -> usize,
    timeout: Duration,
) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout);
    loop {
        let notified = idle.notified();
        tokio::pin!(notified);
        // Registered before counting, so a completion in between wakes us.
        notified.as_mut().enable();
        if open() == 0 {
            return Ok(());
        }
        if until(deadline, notified).await.is_none() {
            return Err(Error::ShutdownTimedOut {
                waited: started.elapsed(),
                in_flight: open(),
            });
        }
    }
}

/// Runs `future` until `deadline`; `None` if the deadline came first. No
/// deadline (a wait too long to represent, like `Duration::MAX`) waits
/// forever.
async fn until<F: std::future::Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// What the builder hands to [`spawn`].
pub(crate) struct Settings<P, C, H, W, A, N> {
    pub(crate) strategy: P,
    pub(crate) classify: C,
    pub(crate) hints: H,
    pub(crate) sources: driver::EndpointSources<W, A, N>,
    pub(crate) startup_wait: Duration,
    pub(crate) zone_aware: Option<crate::topology::ZoneAware>,
    pub(crate) health: crate::health::HealthSettings,
}

/// Builds the shared state and spawns the driver; used by the builder.
pub(crate) fn spawn<D, P, C, H, W, A, N>(
    discover: D,
    settings: Settings<P, C, H, W, A, N>,
    shared: Shared,
) -> Balancer<D::Key, D::Service, P, C, H>
where
    D: Discover + Send + 'static,
    D::Key: std::hash::Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Service: Send + Sync + 'static,
    D::Error: Into<BoxError>,
    P: Strategy,
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
    W: Describe<D::Key>,
    A: crate::health::ActiveCheck<D::Key>,
    N: crate::health::ConnectionStates<D::Service>,
{
    let Settings {
        strategy,
        classify,
        hints,
        sources,
        startup_wait,
        zone_aware,
        health,
    } = settings;
    let shared = Arc::new(shared);
    let empty: EndpointList<D::Key, D::Service> = Box::new([]);
    let schedule = strategy.schedule(&empty[..], &shared.pick_context(0));
    let (stop_tx, stop_rx) = oneshot::channel();
    let inner = Arc::new(Inner {
        snapshot: ArcSwap::from_pointee(Snapshot {
            first: Level {
                first: Group {
                    eligible: empty,
                    schedule,
                    below: WHOLE,
                    local: false,
                },
                more: Box::new([]),
                panic: false,
                below: 100,
                latency_spill: None,
            },
            more: Box::new([]),
            out_of_service: Box::new([]),
            awaiting_checks: false,
            panic: false,
            unconnected: Box::new([]),
            standby: Box::new([]),
            draining: Box::new([]),
        }),
        strategy,
        shared: shared.clone(),
        published: watch::Sender::new(0),
        discovered_none: ArcSwapOption::empty(),
        startup_wait,
        classify,
        hints,
        stop_driver: std::sync::Mutex::new(Some(stop_tx)),
    });
    tokio::spawn(driver::run(
        discover,
        Arc::downgrade(&inner),
        shared,
        health,
        zone_aware,
        sources,
        stop_rx,
    ));
    Balancer { inner }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RttEstimate;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint<usize, ()>>> {
        let detection = crate::health::OutlierDetection::new();
        let shared = Arc::new(Shared::new(
            RttEstimate::DEFAULT,
            None,
            None,
            false,
            false,
            Some(&detection),
        ));
        (0..n)
            .map(|i| Arc::new(Endpoint::new(i, (), shared.clone())))
            .collect()
    }

    fn any<K, S>(_: &Endpoint<K, S>) -> bool {
        true
    }

    #[test]
    fn next_suitable_keeps_the_pick_when_it_is_in_service() {
        let all = endpoints(4);
        assert_eq!(next_suitable(&all, 2, any), 2);
    }

    #[test]
    fn next_suitable_skips_ejected_endpoints_cyclically() {
        let all = endpoints(4);
        all[3].eject(u64::MAX);
        all[0].eject(u64::MAX);
        assert_eq!(next_suitable(&all, 3, any), 1);
    }

    #[test]
    fn next_suitable_keeps_the_pick_when_none_is_in_service() {
        let all = endpoints(3);
        for e in &all {
            e.eject(u64::MAX);
        }
        assert_eq!(next_suitable(&all, 1, any), 1);
    }

    #[test]
    fn next_suitable_prefers_an_untried_endpoint() {
        let all = endpoints(3);
        let tried = [all[1].id(), all[2].id()];
        let untried = |e: &Endpoint<usize, ()>| !tried.contains(&e.id());
        assert_eq!(next_suitable(&all, 1, untried), 0);
    }

    #[test]
    fn next_suitable_falls_back_to_a_tried_endpoint_in_service() {
        let all = endpoints(3);
        all[0].eject(u64::MAX);
        let tried = [all[1].id(), all[2].id()];
        let untried = |e: &Endpoint<usize, ()>| !tried.contains(&e.id());
        assert_eq!(next_suitable(&all, 0, untried), 1);
    }
}
