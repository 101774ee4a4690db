//! Per-endpoint load signals: requests in flight and a Peak-EWMA latency
//! estimate, kept in atomics so that recording and reading them takes no lock.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::setting::{self, InvalidSetting};

mod clock;
mod report;
mod reported;

pub use self::clock::LatencyClock;
pub(crate) use self::clock::RequestClock;

#[cfg(feature = "orca")]
#[cfg_attr(docsrs, doc(cfg(feature = "orca")))]
pub use self::report::OrcaLoadReports;
pub use self::report::{
    LoadExtractor, LoadReport, LoadReportError, NoLoadReports, UtilizationHeader,
};
pub use self::reported::ReportedLoad;
use self::reported::ReportedLoadCell;

/// Samples before an estimate counts as a measurement, each replacing the
/// last. The first request to an endpoint usually pays for connecting (a
/// TCP handshake, TLS, an HTTP/2 preface), which a peak-sensitive estimate
/// would keep: on loopback a first sample of 1.5 ms against peers at 0.5
/// and 1.0 ms kept a new endpoint out of one caller's rotation until its
/// estimate went stale. The second answer comes over a warm connection.
pub(crate) const SETTLED: u8 = 2;

/// How the per-endpoint latency estimate behaves: the value assumed before the
/// first response, and how fast old samples are forgotten.
///
/// The estimate is peak-sensitive, as in Finagle, Linkerd and tower: a sample
/// above the estimate replaces it at once; samples below pull it down with the
/// weight of the time since the last update; and with no traffic it decays
/// towards zero with time constant `decay`, so an endpoint that was slow is
/// tried again eventually.
///
/// Differences on purpose:
/// - The default RTT is only a prior, and the first sample replaces it,
///   the second the first (which usually paid for connecting; until then
///   P2C does not count the endpoint as measured). In tower and Finagle samples below the default pull it down at the
///   rate of the decay, so with the usual 30 ms default and 10 s decay every
///   endpoint of a fast service looks the same for tens of seconds and the
///   estimate says nothing; here it is meaningful from the first response,
///   and peak sensitivity still catches any slower one.
/// - A sample that comes more than [`probe_after`](Self::probe_after)
///   (by default the decay, 10 s) after the previous one replaces the
///   estimate too: the
///   old value says how the endpoint was, the new sample how it is. This is
///   what lets a recovered endpoint back in after one probe (see
///   [`P2c`](crate::strategy::P2c)), rather than after tens of seconds of
///   decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RttEstimate {
    pub(crate) default_rtt_ns: f64,
    /// `1 / decay` in nanoseconds: the request path multiplies rather than
    /// divides.
    pub(crate) decay_rate: f64,
    /// An estimate with no sample for longer than this is stale.
    pub(crate) probe_after_ns: u64,
}

impl RttEstimate {
    /// Linkerd's defaults: 30 ms assumed before the first response, 10 s
    /// decay; and stale after one decay, 10 s, without a sample.
    pub const DEFAULT: RttEstimate = RttEstimate {
        default_rtt_ns: 30e6,
        decay_rate: 1.0 / 10e9,
        probe_after_ns: 10_000_000_000,
    };

    /// An estimate that starts at `default_rtt` and decays with time constant
    /// `decay`, and is stale after `decay` without a sample. A zero `decay`
    /// is raised to one nanosecond.
    pub fn new(default_rtt: Duration, decay: Duration) -> Self {
        Self {
            default_rtt_ns: default_rtt.as_nanos() as f64,
            decay_rate: 1.0 / (decay.as_nanos() as f64).max(1.0),
            probe_after_ns: u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// How long without a sample makes an estimate stale (default: the
    /// decay, one time constant, by when the estimate has lost most of its
    /// weight anyway): its next sample replaces it, and while it is idle and
    /// above its peers' typical estimate,
    /// [`P2c::peak_ewma`](crate::strategy::P2c::peak_ewma) counts it at that
    /// typical value, so that it gets one probe. At most one request per
    /// period per balancer goes to an endpoint that stays slow; but one good
    /// probe puts an endpoint back in rotation, so one that stalls now and
    /// then (a garbage-collection pause every few seconds) is tried again
    /// once per period, and the requests it then gets during its next stall
    /// wait for it. Shorter periods bring recovered endpoints back sooner at
    /// that price. `Duration::MAX` turns probes off.
    pub fn probe_after(mut self, after: Duration) -> Self {
        self.probe_after_ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// See [`probe_after`](Self::probe_after).
    pub fn stale_after(&self) -> Duration {
        Duration::from_nanos(self.probe_after_ns)
    }

    /// The latency assumed for an endpoint that has not answered yet.
    pub fn default_rtt(&self) -> Duration {
        Duration::from_nanos(self.default_rtt_ns as u64)
    }

    /// The decay time constant.
    pub fn decay(&self) -> Duration {
        Duration::from_nanos((1.0 / self.decay_rate).round() as u64)
    }
}

impl Default for RttEstimate {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How long an endpoint's failures weigh on its cost (see
/// [`EndpointLoad::failure_factor`]): each counts `exp(-age / 1 s)`. Short,
/// so that a healthy endpoint's occasional failure is soon forgotten; the
/// failures of one that keeps failing keep coming.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(1);

const FAILURE_MEMORY_NS: f64 = FAILURE_MEMORY.as_nanos() as f64;

/// The longest pause a server's overload signal is weighed at (see
/// [`OutcomeReport::overloaded`](crate::classify::OutcomeReport::overloaded)):
/// a `Retry-After` of an hour raises the endpoint's cost as one of 10 s
/// does. The cost of a pause `p` is `e^(p / 1 s)`, so it is back to 1 when
/// the pause is over; ten seconds of it already weigh 22,000 failures.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// What an overload signal adds to the failure score: 1, or for a pause,
/// enough to decay back to about 1 when the pause is over.
pub(crate) fn overload_weight(pause: Option<Duration>) -> f64 {
    match pause {
        None => 1.0,
        Some(pause) => (pause.min(MAX_PAUSE).as_secs_f64() / FAILURE_MEMORY.as_secs_f64()).exp(),
    }
}

/// A failure score that has decayed below this is forgotten (set to 0).
///
/// Not a vanishing value: P2C compares two endpoints with as many requests
/// in flight by their failure factors alone, so any score left, however
/// small, loses every such tie. Under light load (nothing in flight most
/// of the time) an endpoint that failed once would be passed over until
/// the score underflowed, and one that kept failing would be tried again
/// only when latency noise happened to favour it. A tenth (a factor of
/// 1.1, inside the noise of a latency estimate) forgets one failure after
/// `ln 10`, 2.3 memories, and tries an endpoint that fails every request
/// about every 2.4 s.
const FAILURE_FORGOTTEN_SCORE: f64 = 0.1;

/// Bits of `EndpointLoad::counters` that count requests in flight: up to
/// 16.7 million at once on one endpoint; the 40 bits above count requests
/// started, modulo 2^40 (about 10^12).
const IN_FLIGHT_BITS: u32 = 24;
const ONE_STARTED: u64 = 1 << IN_FLIGHT_BITS;
const IN_FLIGHT_MASK: u64 = ONE_STARTED - 1;

/// The live load of one endpoint, as strategies see it.
///
/// All fields are atomics updated by the balancer's response futures; reads
/// are racy snapshots, which is all a load balancer needs.
//
// `repr(C)`, in this order: the fields a request reads or writes come first,
// together in 48 bytes. The balancer keeps the load first in its endpoint,
// so they start 16 bytes after the `Arc`'s reference count that each request
// also bumps: with allocations 16-byte aligned, the count and the in-flight
// counts share a cache line in three allocations out of four. With two cores
// picking through one balancer this took the 64-task benchmark from 78 to
// about 70 ns per request.
#[derive(Debug)]
#[repr(C)]
pub struct EndpointLoad {
    /// Requests in flight (low `IN_FLIGHT_BITS` bits) and requests started
    /// (the bits above), packed so that starting a request is one atomic add.
    counters: AtomicU64,
    /// Latency estimate in nanoseconds, as `f64` bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last written, in nanoseconds on the latency clock
    /// (see `LatencyClock`).
    rtt_stamp_ns: AtomicU64,
    /// Failures since the last success, for outlier detection.
    consecutive_failures: AtomicU32,
    /// Samples taken, up to [`SETTLED`]: below it the estimate does not
    /// yet say how the endpoint answers (see `rtt_for_pick`).
    samples: AtomicU8,
    /// The endpoint's recent failures, decayed over [`FAILURE_MEMORY`], as
    /// `f64` bits (0 until its first failure): read by every P2C pick.
    failure_score: AtomicU64,
    /// When `failure_score` was last written, on the latency clock.
    failure_stamp_ns: AtomicU64,
    /// The weight discovery gave it (1 unless set), as `f64` bits.
    static_weight: AtomicU64,
    /// Its slow-start factor (1 when not in slow start), as `f64` bits.
    slow_start: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    /// What the endpoint last reported about its own load.
    reported: ReportedLoadCell,
}

impl EndpointLoad {
    /// A fresh load record, as of `now_ns` (nanoseconds on the balancer's
    /// [`LatencyClock`]), with the estimate at `rtt`'s default: for testing
    /// and benchmarking a [`Strategy`](crate::strategy::Strategy) of your
    /// own, with [`with_static_weight`](Self::with_static_weight) and
    /// [`with_reported_load`](Self::with_reported_load) to give it a state.
    /// A strategy only ever sees `&EndpointLoad` and cannot change one: the
    /// balancer alone records what happens to its endpoints.
    ///
    /// ```
    /// use tower_lb::load::{EndpointLoad, RttEstimate};
    ///
    /// let load = EndpointLoad::new(0, &RttEstimate::DEFAULT).with_static_weight(3.0)?;
    /// assert_eq!(load.static_weight(), 3.0);
    /// # Ok::<_, tower_lb::error::InvalidSetting>(())
    /// ```
    ///
    /// What a strategy holds, it can read but not change:
    ///
    /// ```compile_fail
    /// fn pick(load: &tower_lb::load::EndpointLoad) {
    ///     load.set_static_weight(10.0); // not public: only the balancer records
    /// }
    /// ```
    pub fn new(now_ns: u64, rtt: &RttEstimate) -> Self {
        Self {
            counters: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            rtt_ns: AtomicU64::new(rtt.default_rtt_ns.to_bits()),
            rtt_stamp_ns: AtomicU64::new(now_ns),
            samples: AtomicU8::new(0),
            failure_score: AtomicU64::new(0),
            failure_stamp_ns: AtomicU64::new(0),
            reported: ReportedLoadCell::default(),
            static_weight: AtomicU64::new(1.0f64.to_bits()),
            slow_start: AtomicU64::new(1.0f64.to_bits()),
        }
    }

    /// The share of its weight the endpoint gets while in
    /// [slow start](crate::health::SlowStart): from the minimum up to 1.
    #[inline]
    pub fn slow_start_factor(&self) -> f64 {
        f64::from_bits(self.slow_start.load(Ordering::Relaxed))
    }

    pub(crate) fn set_slow_start_factor(&self, factor: f64) {
        self.slow_start.store(factor.to_bits(), Ordering::Relaxed);
    }

    /// The weight discovery gave the endpoint (see
    /// [`Builder::static_weights`](crate::balance::Builder::static_weights)); 1 unless
    /// set. Weighted round robin uses it while no load reports are in, and
    /// P2C draws candidates in proportion to it. Always finite and positive.
    #[inline]
    pub fn static_weight(&self) -> f64 {
        f64::from_bits(self.static_weight.load(Ordering::Relaxed))
    }

    /// This record with a static weight, as discovery would give it.
    ///
    /// # Errors
    ///
    /// When `weight` is not a finite number above 0.
    pub fn with_static_weight(self, weight: f64) -> Result<Self, InvalidSetting> {
        let kept = self.set_static_weight(weight);
        setting::check(
            "EndpointLoad::with_static_weight",
            weight,
            kept,
            "a finite number above 0",
        )?;
        Ok(self)
    }

    /// Sets the static weight; a weight that is not finite and positive is
    /// refused (the weight stays as it was) and false returned.
    pub(crate) fn set_static_weight(&self, weight: f64) -> bool {
        if !(weight.is_finite() && weight > 0.0) {
            return false;
        }
        self.static_weight
            .store(weight.to_bits(), Ordering::Relaxed);
        true
    }

    /// The endpoint's last usable load report, if a run of them is current
    /// (see [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin)).
    pub fn reported_load(&self) -> Option<ReportedLoad> {
        self.reported.get()
    }

    /// Records a load report: `qps` and `eps` per second, `utilization` as a
    /// fraction (may exceed 1), at `now_ns` on the balancer's health clock
    /// (tokio's, as in [`Strategy::schedule`](crate::strategy::Strategy::schedule)). Reports
    /// with no load (`qps` or `utilization` zero) or with values that are not
    /// finite and non-negative are ignored, as gRPC's A58 says; returns
    /// whether it was kept.
    pub(crate) fn record_reported_load(
        &self,
        qps: f64,
        eps: f64,
        utilization: f64,
        now_ns: u64,
    ) -> bool {
        self.reported.record(qps, eps, utilization, now_ns)
    }

    /// This record with one more load report from the endpoint, at
    /// `now_ns`, as the balancer records one (see
    /// [`reported_load`](Self::reported_load)): a report with no load or
    /// with a value that is not finite and non-negative is left out, as
    /// gRPC's A58 says, and counts as nothing.
    pub fn with_reported_load(self, qps: f64, eps: f64, utilization: f64, now_ns: u64) -> Self {
        self.record_reported_load(qps, eps, utilization, now_ns);
        self
    }

    /// Forgets the endpoint's run of load reports (its weight expired); the
    /// next report starts a new blackout period.
    pub(crate) fn forget_reported_load(&self) {
        self.reported.forget();
    }

    /// Load reports from the endpoint that could not be read.
    pub fn malformed_load_reports(&self) -> u64 {
        self.reported.malformed()
    }

    /// Takes over a replaced service's load reports. Not its static weight:
    /// that comes with the new key (a DNS SRV weight that changed, say).
    pub(crate) fn inherit_reported_load(&self, old: &EndpointLoad) {
        self.reported.copy_from(&old.reported);
    }

    /// Takes over a replaced service's failure score: the same server,
    /// failing as much as it was.
    pub(crate) fn inherit_failure_cost(&self, old: &EndpointLoad) {
        let score = old.failure_score.load(Ordering::Relaxed);
        let stamp = old.failure_stamp_ns.load(Ordering::Relaxed);
        self.failure_stamp_ns.store(stamp, Ordering::Relaxed);
        self.failure_score.store(score, Ordering::Relaxed);
    }

    pub(crate) fn count_malformed_load_report(&self) {
        self.reported.count_malformed();
    }

    /// The request rate this client sends the endpoint, over the last whole
    /// second (see `ReportedLoadCell::observed_qps`).
    pub(crate) fn observed_qps(&self, now_ns: u64) -> f64 {
        self.reported.observed_qps(self.requests(), now_ns)
    }

    /// Requests sent to the endpoint that have not completed or been dropped.
    #[inline]
    pub fn in_flight(&self) -> usize {
        (self.counters.load(Ordering::Relaxed) & IN_FLIGHT_MASK) as usize
    }

    /// The in-flight count with `SeqCst`, for the shutdown and drain checks
    /// that pair a store with a load of the other side's value.
    pub(crate) fn in_flight_seq_cst(&self) -> usize {
        (self.counters.load(Ordering::SeqCst) & IN_FLIGHT_MASK) as usize
    }

    /// Requests sent to the endpoint so far (modulo 2^40).
    #[inline]
    pub fn requests(&self) -> u64 {
        self.counters.load(Ordering::Relaxed) >> IN_FLIGHT_BITS
    }

    /// Requests [classified](crate::classify) as successes (counted only
    /// when the balancer runs outlier detection).
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// Requests [classified](crate::classify) as failures: errors from the
    /// endpoint service and, with an HTTP classifier, 5xx responses.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The Peak-EWMA latency estimate in nanoseconds at `now_ns`, decayed for
    /// the time since the last sample.
    ///
    /// `now_ns` is on the [`LatencyClock`], the clock the samples were
    /// stamped with: in [`Strategy::pick`](crate::strategy::Strategy::pick)
    /// that is `ctx.now_ns()`; in `schedule` it is not (there `now_ns()` is
    /// tokio's time), so a schedule should not read estimates.
    #[inline]
    pub fn rtt_estimate_ns(&self, now_ns: u64, settings: &RttEstimate) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.rtt_stamp_ns.load(Ordering::Relaxed);
        let elapsed = ns_as_f64(now_ns.saturating_sub(stamp));
        rtt * decay_factor(elapsed * settings.decay_rate)
    }

    /// The estimate as of its last sample, without the decay since; `None`
    /// until it is a measurement (two samples). Needs no clock, so a
    /// [`schedule`](crate::strategy::Strategy::schedule) may read it.
    pub fn last_rtt_estimate_ns(&self) -> Option<f64> {
        self.is_settled()
            .then(|| f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)))
    }

    /// Whether the estimate is a measurement: [`SETTLED`] samples taken.
    #[inline]
    fn is_settled(&self) -> bool {
        self.samples.load(Ordering::Relaxed) >= SETTLED
    }

    /// The latency P2C Peak-EWMA weighs the endpoint by, at `now_ns` on the
    /// latency clock, given the typical estimate of its peers (`NaN` when
    /// none is known): the estimate; but the typical value while it is not
    /// yet measured (fewer than two samples: a new endpoint starts level
    /// with its peers, not at the default nor at a first answer that paid
    /// for connecting), and while it is idle, stale (no sample for
    /// `probe_after`) and above the typical value (a probe, so that a
    /// recovered endpoint is measured again instead of waiting for decay);
    /// and `NaN`, no latency, while it is not measured and no typical value
    /// is known (start-up), which P2C takes as "compare by requests in flight".
    ///
    /// Times `failing`, its [failure factor](Self::failure_factor), and
    /// while it is failing no less than the typical value times it: a
    /// failure that came back fast (a 503 in a millisecond, a refused
    /// connection) says nothing about how fast the endpoint serves, so it
    /// must not let the endpoint look faster than its peers.
    #[inline]
    pub(crate) fn rtt_for_pick(
        &self,
        now_ns: u64,
        settings: &RttEstimate,
        typical: f64,
        idle: bool,
        failing: f64,
    ) -> f64 {
        let rtt = self.latency_for_pick(now_ns, settings, typical, idle);
        if failing == 1.0 {
            return rtt;
        }
        // `max` takes the other side of a `NaN` (no typical value yet).
        rtt.max(typical) * failing
    }

    /// [`rtt_for_pick`](Self::rtt_for_pick) before failures.
    #[inline]
    fn latency_for_pick(
        &self,
        now_ns: u64,
        settings: &RttEstimate,
        typical: f64,
        idle: bool,
    ) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.rtt_stamp_ns.load(Ordering::Relaxed);
        let since = now_ns.saturating_sub(stamp);
        let estimate = rtt * decay_factor(ns_as_f64(since) * settings.decay_rate);
        let measured = self.is_settled();
        // At start-up nobody had a sample when the typical value was last
        // computed (it is `NaN`), and until the next computation (up to a
        // second) the first endpoints to answer would beat the default
        // prior of all the others: one caller's requests would stay on
        // them. No latency at all (`NaN`, which compares false) makes P2C
        // weigh such an endpoint by its requests in flight alone.
        if !measured && typical.is_nan() {
            return f64::NAN;
        }
        // `NaN` compares false: a measured endpoint without a typical value
        // keeps its estimate.
        if estimate > typical && (!measured || (idle && since > settings.probe_after_ns)) {
            return typical;
        }
        estimate
    }

    /// Counts a request as started. `SeqCst` pairs with the shutdown path: a
    /// request that raced `close()` either sees the flag or is seen in flight.
    #[inline]
    ///
    /// Returns the request's number among those started on the endpoint
    /// (modulo 2^40): the add returns it anyway, and it tells which requests
    /// were already under way when a connection was lost.
    pub(crate) fn start(&self) -> u64 {
        self.counters.fetch_add(ONE_STARTED + 1, Ordering::SeqCst) >> IN_FLIGHT_BITS
    }

    /// Takes back the started count of a request that was turned away before
    /// it was sent (its in-flight count is released by `finish`).
    #[inline]
    pub(crate) fn uncount_start(&self) {
        self.counters.fetch_sub(ONE_STARTED, Ordering::Relaxed);
    }

    /// Counts a request as finished (completed or dropped); returns how many
    /// were in flight before.
    #[inline]
    pub(crate) fn finish(&self) -> usize {
        (self.counters.fetch_sub(1, Ordering::SeqCst) & IN_FLIGHT_MASK) as usize
    }

    #[inline]
    pub(crate) fn record_success(&self) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        // Read before writing: a healthy endpoint's line is not dirtied for
        // a store that changes nothing.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failure, and one more in a row; returns the failures in a row
    /// so far.
    pub(crate) fn record_failure_in_a_row(&self) -> u32 {
        self.record_failure();
        self.consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1)
    }

    pub(crate) fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure (`weight` 1) or an overload signal into the
    /// endpoint's cost, at `now_ns` on the latency clock: its failure score,
    /// which decays over [`FAILURE_MEMORY`], grows by `weight`.
    ///
    /// Two failures recorded at once may lose one of them (plain stores, as
    /// for the latency estimate): the score is a cost, not a count.
    pub(crate) fn record_failure_cost(&self, now_ns: u64, weight: f64) {
        let score = self.failure_score_at(now_ns) + weight;
        self.failure_score.store(score.to_bits(), Ordering::Relaxed);
        self.failure_stamp_ns.store(now_ns, Ordering::Relaxed);
    }

    /// The failure score decayed to `now_ns`.
    #[inline]
    fn failure_score_at(&self, now_ns: u64) -> f64 {
        let score = f64::from_bits(self.failure_score.load(Ordering::Relaxed));
        // The common case, an endpoint that has never failed: one load.
        if score == 0.0 {
            return 0.0;
        }
        let since = now_ns.saturating_sub(self.failure_stamp_ns.load(Ordering::Relaxed));
        let decayed = score * decay_factor(ns_as_f64(since) / FAILURE_MEMORY_NS);
        // Forgotten: the score is set back to 0, so that picks skip the
        // clock and the exponential again (a failure recorded at the same
        // moment may be lost, as two at once may).
        if decayed < FAILURE_FORGOTTEN_SCORE {
            self.failure_score.store(0, Ordering::Relaxed);
            return 0.0;
        }
        decayed
    }

    /// Whether the endpoint has failed since it was added (its failures may
    /// be long forgotten): false means [`failure_factor`](Self::failure_factor)
    /// is 1, known from one load and no arithmetic.
    #[inline]
    pub(crate) fn has_failed(&self) -> bool {
        self.failure_score.load(Ordering::Relaxed) != 0
    }

    /// How many times its load an endpoint costs for its recent failures:
    /// 1 plus its failure score (about the failures of the last
    /// [`FAILURE_MEMORY`], each weighing less as it ages), at `now_ns` on
    /// the latency clock.
    ///
    /// P2C multiplies its load by this, so an endpoint that fails fast does
    /// not look fast: one that fails every request is picked only while the
    /// endpoints it is compared with have as many requests in flight as it
    /// has failed lately, and the failures it then makes keep it there.
    /// A healthy endpoint's rare failure costs it a factor of 2, which is
    /// gone within a few seconds.
    #[inline]
    pub fn failure_factor(&self, now_ns: u64) -> f64 {
        1.0 + self.failure_score_at(now_ns)
    }

    /// Folds one latency sample into the estimate.
    ///
    /// Two responses finishing at once may both read the old estimate and the
    /// last store wins; losing one sample of an estimate is harmless and keeps
    /// the update a pair of plain stores instead of a CAS loop.
    #[inline]
    pub(crate) fn record_rtt(&self, sample_ns: u64, now_ns: u64, rtt: &RttEstimate) {
        let sample = ns_as_f64(sample_ns);
        let prior = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let since = now_ns.saturating_sub(self.rtt_stamp_ns.load(Ordering::Relaxed));
        let samples = self.samples.load(Ordering::Relaxed);
        if samples < SETTLED {
            // A lost increment (two first answers at once) costs one more
            // replacing sample.
            self.samples.store(samples + 1, Ordering::Relaxed);
        }
        let next = if samples < SETTLED || sample > prior || since > rtt.probe_after_ns {
            sample
        } else {
            let decay = decay_factor(ns_as_f64(since) * rtt.decay_rate);
            prior * decay + sample * (1.0 - decay)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_stamp_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Takes `sample_ns` as the endpoint's measurement, as if it had
    /// answered in that time [`SETTLED`] times.
    #[cfg(test)]
    pub(crate) fn settle_rtt(&self, sample_ns: u64, now_ns: u64, rtt: &RttEstimate) {
        for _ in 0..SETTLED {
            self.record_rtt(sample_ns, now_ns, rtt);
        }
    }

    /// Folds in a sample known only to be a lower bound (a request dropped
    /// before its answer): it can only raise the estimate, as a peak, and
    /// never stands in for the first real measurement.
    #[inline]
    pub(crate) fn record_rtt_at_least(&self, sample_ns: u64, now_ns: u64, rtt: &RttEstimate) {
        let prior = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if self.samples.load(Ordering::Relaxed) > 0 && ns_as_f64(sample_ns) > prior {
            self.record_rtt(sample_ns, now_ns, rtt);
        }
    }

    #[cfg(test)]
    pub(crate) fn set_in_flight(&self, n: usize) {
        self.counters.store(n as u64, Ordering::Relaxed);
    }
}

/// Nanoseconds as `f64` through a signed conversion (one instruction on
/// x86-64, where `u64 as f64` takes several), saturating at 292 years.
#[inline]
fn ns_as_f64(ns: u64) -> f64 {
    ns.min(i64::MAX as u64) as i64 as f64
}

/// `exp(-x)` for `x >= 0`. A busy endpoint is read and updated every few
/// microseconds against a decay of seconds, so `x` is nearly always tiny; there
/// a second-order Taylor step is exact to 2e-7 and far cheaper than `exp`,
/// which this path would otherwise call three times per request.
#[inline]
fn decay_factor(x: f64) -> f64 {
    if x < 0.01 {
        1.0 - x + 0.5 * x * x
    } else {
        (-x).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_factor_matches_exp_on_both_sides_of_the_fast_path() {
        for x in [0.0, 1e-9, 1e-4, 0.005, 0.00999, 0.01, 0.5, 3.0, 50.0] {
            let err = (decay_factor(x) - (-x).exp()).abs();
            assert!(err < 2e-7, "x={x} err={err}");
        }
    }

    #[test]
    fn each_failure_adds_one_to_the_cost_factor_and_is_forgotten_within_seconds() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        assert_eq!(load.failure_factor(0), 1.0);
        load.record_failure_cost(0, 1.0);
        load.record_failure_cost(0, 1.0);
        assert_eq!(load.failure_factor(0), 3.0);
        // One memory later, each weighs 1/e.
        let after_a_second = load.failure_factor(1_000_000_000);
        assert!((after_a_second - (1.0 + 2.0 / std::f64::consts::E)).abs() < 1e-6);
        assert!(load.failure_factor(5_000_000_000) < 1.02);
        assert_eq!(load.failure_factor(25_000_000_000), 1.0);
    }

    #[test]
    fn an_overload_weighs_one_failure_and_a_pause_decays_back_to_one_when_it_is_over() {
        assert_eq!(overload_weight(None), 1.0);
        assert_eq!(overload_weight(Some(Duration::ZERO)), 1.0);
        let two_seconds = overload_weight(Some(Duration::from_secs(2)));
        assert!((two_seconds - std::f64::consts::E.powi(2)).abs() < 1e-9);
        // A pause longer than the cap weighs as the cap.
        assert_eq!(
            overload_weight(Some(Duration::from_secs(3_600))),
            overload_weight(Some(MAX_PAUSE))
        );
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        load.record_failure_cost(0, two_seconds);
        assert!((load.failure_factor(2_000_000_000) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn a_failure_is_forgotten_once_it_weighs_less_than_a_tenth() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        load.record_failure_cost(0, 1.0);
        // e^-2.2 = 0.11, e^-2.4 = 0.09.
        assert!(load.failure_factor(2_200_000_000) > 1.1);
        assert_eq!(load.failure_factor(2_400_000_000), 1.0);
    }

    #[test]
    fn a_forgotten_failure_no_longer_counts_as_one() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        load.record_failure_cost(0, 1.0);
        assert!(load.has_failed());
        assert_eq!(load.failure_factor(25_000_000_000), 1.0);
        assert!(!load.has_failed(), "picks would read the clock for nothing");
    }

    #[test]
    fn a_record_replacing_another_takes_over_its_failure_score() {
        let old = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        old.record_failure_cost(0, 1.0);
        let replacing = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        replacing.inherit_failure_cost(&old);
        assert_eq!(replacing.failure_factor(0), 2.0);
    }

    #[test]
    fn a_new_failure_adds_to_what_is_left_of_the_old_ones() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        load.record_failure_cost(0, 1.0);
        load.record_failure_cost(1_000_000_000, 1.0);
        let expected = 1.0 + 1.0 + 1.0 / std::f64::consts::E;
        assert!((load.failure_factor(1_000_000_000) - expected).abs() < 1e-6);
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn estimate_starts_at_the_default_rtt() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        assert_eq!(load.rtt_estimate_ns(0, &RttEstimate::DEFAULT), 30e6);
    }

    #[test]
    fn a_sample_above_the_estimate_replaces_it_at_once() {
        let rtt = RttEstimate::new(Duration::from_millis(1), Duration::from_secs(10));
        let load = EndpointLoad::new(0, &rtt);
        load.record_rtt(500 * MS, MS, &rtt);
        assert_eq!(load.rtt_estimate_ns(MS, &rtt), 500e6);
    }

    #[test]
    fn the_first_sample_replaces_the_default() {
        let rtt = RttEstimate::new(Duration::from_millis(30), Duration::from_secs(10));
        let load = EndpointLoad::new(0, &rtt);
        load.record_rtt(2 * MS, MS, &rtt);
        assert_eq!(load.rtt_estimate_ns(MS, &rtt), 2e6);
    }

    #[test]
    fn samples_below_pull_the_estimate_down_by_elapsed_time() {
        let rtt = RttEstimate::new(Duration::from_millis(1), Duration::from_secs(1))
            .probe_after(Duration::from_secs(2));
        let load = EndpointLoad::new(0, &rtt);
        load.settle_rtt(100 * MS, 0, &rtt);
        // One decay constant later (not yet stale), the old value keeps
        // weight 1/e.
        load.record_rtt(10 * MS, 1000 * MS, &rtt);
        let expected = 100e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        let got = load.rtt_estimate_ns(1000 * MS, &rtt);
        assert!((got - expected).abs() < 1.0, "{got} vs {expected}");
    }

    #[test]
    fn a_sample_after_a_stale_estimate_replaces_it() {
        let rtt = RttEstimate::new(Duration::from_millis(1), Duration::from_secs(10))
            .probe_after(Duration::from_secs(1));
        let load = EndpointLoad::new(0, &rtt);
        load.settle_rtt(500 * MS, MS, &rtt);
        load.record_rtt(2 * MS, 1_002 * MS, &rtt);
        assert_eq!(load.rtt_estimate_ns(1_002 * MS, &rtt), 2e6);
    }

    #[test]
    fn an_endpoint_without_samples_is_weighed_at_the_typical_estimate() {
        let rtt = RttEstimate::DEFAULT;
        let load = EndpointLoad::new(0, &rtt);
        assert_eq!(load.rtt_for_pick(MS, &rtt, 2e6, true, 1.0), 2e6);
        assert_eq!(load.rtt_for_pick(MS, &rtt, 2e6, false, 1.0), 2e6);
    }

    #[test]
    fn an_endpoint_without_samples_has_no_latency_while_no_typical_is_known() {
        let rtt = RttEstimate::DEFAULT;
        let load = EndpointLoad::new(0, &rtt);
        assert!(load.rtt_for_pick(0, &rtt, f64::NAN, true, 1.0).is_nan());
        load.settle_rtt(3 * MS, MS, &rtt);
        assert_eq!(load.rtt_for_pick(MS, &rtt, f64::NAN, true, 1.0), 3e6);
    }

    #[test]
    fn the_second_sample_replaces_the_first_which_paid_for_connecting() {
        let rtt = RttEstimate::DEFAULT;
        let load = EndpointLoad::new(0, &rtt);
        load.record_rtt(5 * MS, MS, &rtt);
        // One sample: still weighed at the typical value.
        assert_eq!(load.rtt_for_pick(MS, &rtt, 2e6, true, 1.0), 2e6);
        load.record_rtt(MS, 2 * MS, &rtt);
        assert_eq!(load.rtt_estimate_ns(2 * MS, &rtt), 1e6);
        assert_eq!(load.rtt_for_pick(2 * MS, &rtt, 2e6, true, 1.0), 1e6);
        // From then on, peaks stick.
        load.record_rtt(4 * MS, 3 * MS, &rtt);
        load.record_rtt(MS, 4 * MS, &rtt);
        assert!(load.rtt_estimate_ns(4 * MS, &rtt) > 3.9e6);
    }

    #[test]
    fn only_an_idle_stale_estimate_above_the_typical_one_is_probed() {
        let rtt = RttEstimate::new(Duration::from_millis(1), Duration::from_secs(10))
            .probe_after(Duration::from_secs(1));
        let load = EndpointLoad::new(0, &rtt);
        load.settle_rtt(500 * MS, 0, &rtt);
        // Fresh: its own estimate.
        assert!(load.rtt_for_pick(500 * MS, &rtt, 2e6, true, 1.0) > 400e6);
        // Stale but busy (the probe is in flight): its own estimate.
        assert!(load.rtt_for_pick(1_500 * MS, &rtt, 2e6, false, 1.0) > 400e6);
        // Stale and idle: the typical value, once.
        assert_eq!(load.rtt_for_pick(1_500 * MS, &rtt, 2e6, true, 1.0), 2e6);
        // Stale but already below the typical value: its own.
        assert!(load.rtt_for_pick(1_500 * MS, &rtt, 900e6, true, 1.0) < 900e6);
    }

    #[test]
    fn started_and_in_flight_counts_share_one_word_without_interfering() {
        let load = EndpointLoad::new(0, &RttEstimate::DEFAULT);
        for _ in 0..5 {
            load.start();
        }
        assert_eq!(load.finish(), 5);
        assert_eq!(load.finish(), 4);
        assert_eq!((load.in_flight(), load.requests()), (3, 5));
    }

    #[test]
    fn an_idle_estimate_decays_towards_zero() {
        let rtt = RttEstimate::new(Duration::from_millis(100), Duration::from_secs(1));
        let load = EndpointLoad::new(0, &rtt);
        let later = load.rtt_estimate_ns(5_000 * MS, &rtt);
        assert!(later < 1e6, "{later}");
    }

    #[test]
    fn a_lower_bound_only_raises_the_estimate() {
        let rtt = RttEstimate::new(Duration::from_millis(30), Duration::from_secs(10));
        let load = EndpointLoad::new(0, &rtt);
        load.record_rtt_at_least(MS, MS, &rtt);
        let default_only = load.rtt_estimate_ns(MS, &rtt);
        assert!(
            default_only > 29.9 * MS as f64,
            "not a first sample: {default_only}"
        );
        load.record_rtt(100 * MS, MS, &rtt);
        load.record_rtt_at_least(MS, 2 * MS, &rtt);
        assert!(
            load.rtt_estimate_ns(2 * MS, &rtt) >= 99.0 * MS as f64,
            "a short bound pulled it down"
        );
        load.record_rtt_at_least(300 * MS, 3 * MS, &rtt);
        assert!(
            load.rtt_estimate_ns(3 * MS, &rtt) >= 299.0 * MS as f64,
            "a long bound is a peak"
        );
    }
}
