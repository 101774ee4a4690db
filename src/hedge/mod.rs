//! Hedged requests: when an attempt is slower than most, send a copy to
//! another endpoint and take whichever answers first ("The Tail at Scale",
//! Dean and Barroso, 2013).
//!
//! Unlike `tower::hedge`, the delay adapts on its own (a latency percentile
//! of recent calls, with a floor), only requests that may repeat are hedged,
//! hedges draw from the same [`RetryBudget`] as retries, and, under a
//! balancer built with
//! [`avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints), the
//! copy goes to a different endpoint.
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_lb::hedge::HedgeLayer;
//! use tower_lb::retry::{ReplayLayer, RetryBudget};
//! # use tower::service_fn;
//! # use tower_lb::retry::ReplayBody;
//! # type Body = http_body_util::Empty<bytes::Bytes>;
//! # let endpoint = service_fn(|_: http::Request<ReplayBody<Body>>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! # });
//!
//! let client = ServiceBuilder::new()
//!     .layer(ReplayLayer::default())
//!     .layer(HedgeLayer::new(RetryBudget::new()).min_delay(Duration::from_millis(5)))
//!     .service(endpoint);
//! # let _ = client;
//! ```

mod latency;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::{Layer, Service};

use self::latency::LatencyWindows;
use crate::error::BoxError;
use crate::request::Replayable;
use crate::retry::{RetryBudget, Spend};
use crate::setting::{self, InvalidSetting};

/// How often the hedge delay is recomputed from the latency windows; in
/// between, requests read it from one atomic.
const REFRESH_NS: u64 = 10_000_000;
/// The cached delay when there is none (too few samples).
const NO_DELAY: u64 = u64::MAX;

/// A [`Layer`] that hedges slow requests (see [`Hedge`]). Every service it
/// makes shares one latency estimate.
#[derive(Clone)]
pub struct HedgeLayer {
    settings: Settings,
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    percentile: f64,
    min_delay: Duration,
    min_samples: u64,
    window: Duration,
}

struct Shared {
    settings: Settings,
    budget: RetryBudget,
    latency: LatencyWindows,
    epoch: Instant,
    /// The current delay in microseconds, or `NO_DELAY`.
    delay_us: AtomicU64,
    next_refresh_ns: AtomicU64,
    /// Calls measured since the layer was made, so that the first delay is
    /// computed as soon as there are enough rather than at the next refresh.
    measured: AtomicU64,
}

impl HedgeLayer {
    /// Hedges after the 95th percentile of recent latencies, at least 10 ms,
    /// once 20 calls have been measured, drawing each hedge from `budget`
    /// (and, when it throttles, sending one only with the probability a
    /// call would be sent: see [`RetryBudget::adaptive_throttling`]).
    /// The latencies are those of the last 10 to 20 s.
    pub fn new(budget: RetryBudget) -> Self {
        let settings = Settings {
            percentile: 0.95,
            min_delay: Duration::from_millis(10),
            min_samples: 20,
            window: Duration::from_secs(10),
        };
        Self {
            shared: Shared::new(settings, budget.clone()),
            settings,
        }
    }

    /// The latency percentile (0 to 1) after which a copy is sent. Default
    /// 0.95: about 5 % of calls are hedged.
    ///
    /// # Errors
    ///
    /// When `percentile` is not within 0 to 1 (NaN included).
    pub fn percentile(self, percentile: f64) -> Result<Self, InvalidSetting> {
        let percentile = setting::within(
            "HedgeLayer::percentile",
            percentile,
            0.0,
            1.0,
            "a fraction, 0 to 1",
        )?;
        let settings = Settings {
            percentile,
            ..self.settings
        };
        Ok(self.with(settings))
    }

    /// The shortest hedge delay, however fast recent calls were, so that a
    /// fast service is not hedged on noise. Default 10 ms.
    pub fn min_delay(self, min_delay: Duration) -> Self {
        let settings = Settings {
            min_delay,
            ..self.settings
        };
        self.with(settings)
    }

    /// Calls measured before the first hedge. Default 20.
    pub fn min_samples(self, min_samples: u64) -> Self {
        let settings = Settings {
            min_samples,
            ..self.settings
        };
        self.with(settings)
    }

    /// The length of each of the two windows of latencies the percentile is
    /// taken over. Default 10 s.
    ///
    /// # Errors
    ///
    /// When `window` is zero.
    pub fn window(self, window: Duration) -> Result<Self, InvalidSetting> {
        let window = setting::check(
            "HedgeLayer::window",
            window,
            !window.is_zero(),
            "longer than zero",
        )?;
        let settings = Settings {
            window,
            ..self.settings
        };
        Ok(self.with(settings))
    }

    /// The same settings, drawing on `budget` (and with a fresh latency
    /// estimate).
    #[cfg(feature = "http")]
    pub(crate) fn budget(self, budget: RetryBudget) -> Self {
        Self {
            shared: Shared::new(self.settings, budget),
            settings: self.settings,
        }
    }

    fn with(self, settings: Settings) -> Self {
        Self {
            shared: Shared::new(settings, self.shared.budget.clone()),
            settings,
        }
    }
}

impl Default for HedgeLayer {
    /// [`HedgeLayer::new`]'s defaults, with a [`RetryBudget::new`] of its
    /// own: for the ready-made clients' `hedging`, which give it theirs.
    fn default() -> Self {
        Self::new(RetryBudget::new())
    }
}

impl fmt::Debug for HedgeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl Shared {
    fn new(settings: Settings, budget: RetryBudget) -> Arc<Self> {
        Arc::new(Self {
            settings,
            budget,
            latency: LatencyWindows::new(settings.window),
            epoch: Instant::now(),
            delay_us: AtomicU64::new(NO_DELAY),
            next_refresh_ns: AtomicU64::new(0),
            measured: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The hedge delay now: recomputed by one caller every `REFRESH_NS`,
    /// read from an atomic by the rest.
    fn delay(&self, now_ns: u64) -> Option<Duration> {
        let due = self.next_refresh_ns.load(Ordering::Relaxed);
        let first = self.delay_us.load(Ordering::Relaxed) == NO_DELAY
            && self.measured.load(Ordering::Relaxed) >= self.settings.min_samples;
        if (now_ns >= due || first)
            && self
                .next_refresh_ns
                .compare_exchange(
                    due,
                    now_ns + REFRESH_NS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let settings = &self.settings;
            let delay = self
                .latency
                .quantile(now_ns, settings.percentile, settings.min_samples.max(1))
                .map_or(NO_DELAY, |q| {
                    let us = q.max(settings.min_delay).as_micros();
                    u64::try_from(us).unwrap_or(NO_DELAY - 1)
                });
            self.delay_us.store(delay, Ordering::Relaxed);
        }
        match self.delay_us.load(Ordering::Relaxed) {
            NO_DELAY => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn record(&self, started: Instant) {
        self.measured.fetch_add(1, Ordering::Relaxed);
        self.latency.record(self.now_ns(), started.elapsed());
    }
}

/// Sends a copy of a slow request to another endpoint and returns the first
/// success; the other attempt is dropped, which cancels it.
///
/// A call is hedged when: its [`Safety`](crate::request::Safety) lets it
/// repeat; enough calls have been measured to know the percentile; it is
/// still running after the delay; it can be copied whole when the delay
/// ends (its body fully sent and under the replay cap; otherwise this call
/// is not hedged); and the [`RetryBudget`] allows one more attempt. At most one copy is sent per call (per attempt, under a retry
/// layer). An attempt that fails while the other is running is set aside:
/// the other may still succeed.
///
/// The layer keeps a copy of each request's head (method, URI, headers,
/// extensions) while the call runs, an allocation per call, so that the
/// hedge can be sent.
#[derive(Clone)]
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Hedge<S> {
    /// The current hedge delay, `None` until enough calls were measured.
    pub fn delay(&self) -> Option<Duration> {
        self.shared.delay(self.shared.now_ns())
    }
}

impl<S: fmt::Debug> fmt::Debug for Hedge<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("delay", &self.delay())
            .finish()
    }
}

impl<S, Req> Service<Req> for Hedge<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Replayable,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let (safety, _) = self.shared.budget.begin_call(&mut req);
        let delay = match safety.may_repeat() {
            true => self.shared.delay(self.shared.now_ns()),
            false => None,
        };
        // With a delay, keep a copy to make the hedge from. The caller's
        // request goes first either way: its header map has room to grow,
        // where a copy's is cloned full.
        let original = delay.and_then(|_| req.replay().ok());
        let timer = original.as_ref().and(delay).map(tokio::time::sleep);
        // Only a call with a copy to send can hedge.
        let service = original.as_ref().map(|_| self.inner.clone());
        let now = Instant::now();
        ResponseFuture {
            // The service `poll_ready` readied takes the first attempt; a
            // clone, made ready in its turn, the hedge.
            primary: Some(self.inner.call(req)),
            primary_started: now,
            timer,
            hedge: None,
            hedge_started: now,
            original,
            service,
            shared: self.shared.clone(),
        }
    }
}

pin_project! {
    /// The future of [`Hedge`]: the first attempt, the timer, and the copy
    /// once sent.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        primary: Option<S::Future>,
        primary_started: Instant,
        #[pin]
        timer: Option<Sleep>,
        #[pin]
        hedge: Option<Oneshot<S, Req>>,
        hedge_started: Instant,
        original: Option<Req>,
        service: Option<S>,
        shared: Arc<Shared>,
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("primary_running", &self.primary.is_some())
            .field("hedged", &self.hedge.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Replayable,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(primary) = this.primary.as_mut().as_pin_mut() {
            if let Poll::Ready(result) = primary.poll(cx) {
                this.primary.set(None);
                match result {
                    Ok(response) => {
                        this.shared.record(*this.primary_started);
                        return Poll::Ready(Ok(response));
                    }
                    // Nothing else is running, or will be: the call failed.
                    Err(error) if this.hedge.is_none() => {
                        return Poll::Ready(Err(error.into()));
                    }
                    // The hedge may still succeed; the timer no longer
                    // matters.
                    Err(_) => this.timer.set(None),
                }
            }
        }
        if let Some(timer) = this.timer.as_mut().as_pin_mut() {
            if timer.poll(cx).is_ready() {
                this.timer.set(None);
                let copy = this.original.as_ref().map(Replayable::replay_complete);
                match (copy, this.service.take()) {
                    (Some(Ok(copy)), Some(service)) => {
                        let budget = &this.shared.budget;
                        if !budget.admit_extra(Spend::Hedge, None) {
                            tracing::debug!("not hedging: adaptive throttling refused the copy");
                        } else if budget.try_spend(Spend::Hedge) {
                            tracing::debug!("hedging a slow request");
                            *this.hedge_started = Instant::now();
                            this.hedge.set(Some(Oneshot::new(service, copy)));
                        } else {
                            tracing::debug!("not hedging: the retry budget is exhausted");
                        }
                    }
                    (Some(Err(why)), _) => tracing::debug!(%why, "not hedging"),
                    _ => {}
                }
            }
        }
        if let Some(hedge) = this.hedge.as_mut().as_pin_mut() {
            if let Poll::Ready(result) = hedge.poll(cx) {
                this.hedge.set(None);
                match result {
                    Ok(response) => {
                        this.shared.record(*this.hedge_started);
                        // The primary's time so far is a lower bound on its
                        // latency; without it the slow tail that hedging hides
                        // would drop out of the percentile and the delay drift
                        // down.
                        if this.primary.is_some() {
                            this.shared.record(*this.primary_started);
                        }
                        return Poll::Ready(Ok(response));
                    }
                    Err(error) if this.primary.is_none() => {
                        return Poll::Ready(Err(error.into()));
                    }
                    Err(_) => {}
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_zero_is_refused_by_name() {
        let error = HedgeLayer::default().window(Duration::ZERO).unwrap_err();
        assert_eq!(error.setting(), "HedgeLayer::window");
        assert!(HedgeLayer::default().window(Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_percentile_outside_0_to_1_is_refused_by_name() {
        for bad in [f64::NAN, 1.5, -0.1, f64::INFINITY] {
            let error = HedgeLayer::default().percentile(bad).unwrap_err();
            assert_eq!(error.setting(), "HedgeLayer::percentile");
        }
    }
}
